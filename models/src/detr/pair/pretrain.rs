//! `densa pretrain --method pairdetr`: Pair DETR ([`super`]) pretrained without labels.
//!
//! Pair DETR is a detector, not a pretext task; our choice for pretraining it is DetReg's
//! unsupervised targets without DetReg's embeddings: per image the top `proposals`
//! selective-search boxes (on the image resized to `proposal_size`, OpenCV's fast mode,
//! `ProposalFilter::detreg()`), one class "object", computed once before training and cached
//! under `OUT/cache/pairdetr/` (a resume reuses them). The whole Pair DETR learns to find
//! them (set criterion + pair association); horizontal flips flip image and boxes.
//!
//! Our choices:
//! - **Backbone**: frozen by default (`freeze_backbone=true`, as DetReg): its parameters stay,
//!   batch norm uses batch statistics and updates its running ones (as DetReg's driver; tract
//!   loads no inference-mode batch norm on state inputs); `--set backbone=PATH` initialises it
//!   from a wave-1 `backbone.safetensors` (e.g. SwAV's) or the folder holding it; empty keeps
//!   the random initialisation (then `freeze_backbone=false` is the sensible choice).
//! - The output is a DETR checkpoint (`detr.json` + `state.safetensors`, DETR's names): the
//!   backbone, encoder, centre decoder and heads; fine-tune it with `densa finetune --task
//!   detect --detector detr --init OUT`. The top-left decoder is kept in the resumable
//!   checkpoints only.

use std::path::{Path, PathBuf};

use densa_exporter::weights::{load_safetensors, save_safetensors, StateDict};
use densa_exporter::Tensor;
use densa_runtime::data::image::read_rgb;
use image::RgbImage;
use ndarray::{ArrayD, IxDyn};
use rand_chacha::ChaCha8Rng;

use super::super::matcher::{xyxy_to_cxcywh, ImageTargets};
use super::super::pretext::{
    backbone_file, detr_config, detr_hyper, prepared_batch, DetrBatch, DetrPretext,
    DetrPretextContext, PrepareContext, SampleImage, BACKBONE_PREFIXES,
};
use super::super::train::DetrStepGraphs;
use super::super::DetrConfig;
use super::PairDetrConfig;
use crate::pretext::settings::{Hyper, Settings};
use crate::pretext::{detector_only, Family, MethodInfo, PretextError};
use crate::train_step::{TrainStepConfig, Trainable};

/// The registry entry.
pub static INFO: MethodInfo = MethodInfo {
    name: "pairdetr",
    title: "Pair DETR: Contrastive Learning Speeds Up DETR Training",
    paper: "Iranmanesh, Chen, Lien; arXiv 2022 (unreleased)",
    summary: "a box is a (centre, top-left) keypoint pair from two decoders over one encoder, \
              tied by InfoNCE; pretrained on selective-search boxes",
    hyper,
    create: detector_only,
    tiny: TINY,
    family: Family::Detector(create),
};

/// A small detector and few proposals for smoke tests.
pub const TINY: &[(&str, &str)] = &[
    ("d_model", "16"),
    ("heads", "2"),
    ("encoder_layers", "1"),
    ("decoder_layers", "2"),
    ("ffn_dim", "32"),
    ("num_queries", "10"),
    ("proposals", "5"),
    ("pair_embed_dim", "8"),
];

/// Where the per-image boxes are cached inside the run's cache folder.
pub const CACHE_SUBDIR: &str = "pairdetr";

fn hyper() -> Vec<Hyper> {
    let mut h = detr_hyper();
    h.extend([
        Hyper::int("pair_embed_dim", 64, "association embedding dimensions"),
        Hyper::float(
            "pair_temperature",
            0.1,
            "InfoNCE temperature of the pair association",
        ),
        Hyper::float("pair_weight", 1.0, "weight of the pair association loss"),
        Hyper::bool(
            "pair_symmetric",
            true,
            "also contrast each top-left query against the other centre queries",
        ),
        Hyper::float(
            "min_size",
            1e-3,
            "smallest box side a pair gives (normalised)",
        ),
        Hyper::int(
            "proposals",
            10,
            "selective-search boxes kept per image (DetReg's: 10 for our 30 queries)",
        ),
        Hyper::int(
            "proposal_size",
            128,
            "selective search runs on the image resized to this square (DetReg's 128)",
        ),
        Hyper::text(
            "backbone",
            "",
            "initial backbone: a backbone.safetensors (e.g. of `densa pretrain --method swav`) \
             or the folder holding it; empty = random",
        ),
        Hyper::bool(
            "freeze_backbone",
            true,
            "keep the backbone fixed (DetReg's choice)",
        ),
        Hyper::bool("flip", true, "random horizontal flips of image and boxes"),
    ]);
    h
}

fn create(settings: Settings) -> Result<Box<dyn DetrPretext>, PretextError> {
    Ok(Box::new(PairDetrPretrain::new(settings)?))
}

fn invalid(problem: String) -> PretextError {
    PretextError::Invalid {
        method: "pairdetr".into(),
        problem,
    }
}

/// The method: settings, the initial backbone file and the prepared boxes.
pub struct PairDetrPretrain {
    settings: Settings,
    backbone: Option<PathBuf>,
    /// Per image of the run (by index): its targets, once prepared.
    targets: Vec<Option<ImageTargets>>,
}

impl PairDetrPretrain {
    /// Checks the settings (the backbone file must exist when given).
    pub fn new(settings: Settings) -> Result<PairDetrPretrain, PretextError> {
        let backbone = backbone_file(&settings, "backbone")?;
        Ok(PairDetrPretrain {
            settings,
            backbone,
            targets: Vec::new(),
        })
    }

    /// The Pair DETR around the DETR `config`, with the settings' pair options.
    pub fn pair_config(&self, config: &DetrConfig) -> Result<PairDetrConfig, PretextError> {
        let s = &self.settings;
        Ok(PairDetrConfig {
            detr: config.clone(),
            pair_embed_dim: s.positive("pair_embed_dim")?,
            pair_temperature: s.checked("pair_temperature", |v| v > 0.0, "must be > 0")? as f32,
            pair_weight: s.checked("pair_weight", |v| v >= 0.0, "must be >= 0")? as f32,
            pair_symmetric: s.bool("pair_symmetric"),
            min_size: s.checked("min_size", |v| v > 0.0 && v < 1.0, "must be in (0, 1)")? as f32,
        })
    }

    /// The prepared targets of image `index`.
    pub fn targets_of(&self, index: usize) -> Option<&ImageTargets> {
        self.targets.get(index).and_then(Option::as_ref)
    }
}

/// The unsupervised targets of one image: the top `keep` selective-search boxes (on the image
/// resized to `proposal_size`) as normalised cxcywh, label 0.
pub fn proposal_targets(
    image: &RgbImage,
    proposal_size: u32,
    keep: usize,
) -> Result<ImageTargets, PretextError> {
    let boxes = crate::detr::detreg::proposal_boxes(image, proposal_size, keep)
        .map_err(|e| invalid(format!("selective search: {e}")))?;
    let (w, h) = (image.width() as f32, image.height() as f32);
    Ok(ImageTargets {
        labels: vec![0; boxes.len()],
        boxes: boxes
            .iter()
            .map(|b| xyxy_to_cxcywh([b[0] / w, b[1] / h, b[2] / w, b[3] / h]))
            .collect(),
        ..ImageTargets::default()
    })
}

fn save_boxes(path: &Path, t: &ImageTargets) -> Result<(), String> {
    let k = t.boxes.len();
    let mut sd = StateDict::new();
    let boxes: Vec<f32> = t.boxes.iter().flatten().copied().collect();
    let arr = ArrayD::from_shape_vec(IxDyn(&[k, 4]), boxes).map_err(|e| e.to_string())?;
    sd.insert("boxes".to_string(), Tensor::F32(arr));
    let tmp = path.with_extension("tmp");
    save_safetensors(&sd, &tmp).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

fn load_boxes(path: &Path) -> Option<ImageTargets> {
    let sd = load_safetensors(path).ok()?;
    let boxes = sd.get("boxes")?.to_f32();
    if boxes.ndim() != 2 || boxes.shape()[1] != 4 {
        return None;
    }
    let mut t = ImageTargets::default();
    for r in boxes.outer_iter() {
        t.boxes.push([r[0], r[1], r[2], r[3]]);
        t.labels.push(0);
    }
    Some(t)
}

impl DetrPretext for PairDetrPretrain {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn config(&self, ctx: &DetrPretextContext) -> Result<DetrConfig, PretextError> {
        let mut c = detr_config(&self.settings, ctx)?;
        // Batch statistics whether the backbone is frozen or not (PyTorch's `model.train()`
        // with frozen parameters; our choice, Pair DETR's code being unreleased).
        c.train_batch_norm = true;
        self.pair_config(&c)?
            .check()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(c)
    }

    fn trainable(&self) -> Trainable {
        if self.settings.bool("freeze_backbone") {
            Trainable::Frozen(BACKBONE_PREFIXES.map(String::from).to_vec())
        } else {
            Trainable::All
        }
    }

    fn step_graphs(
        &self,
        config: &DetrConfig,
        batch: usize,
        train: &TrainStepConfig,
        seed: u64,
    ) -> Result<DetrStepGraphs, PretextError> {
        let pair = self.pair_config(config)?;
        let mut graphs = super::step_graphs(&pair, batch, train, seed)?;
        if let Some(path) = &self.backbone {
            let loaded = load_safetensors(path)
                .map_err(|e| invalid(format!("reading {}: {e}", path.display())))?;
            let mut n = 0;
            for (name, t) in loaded.iter() {
                let backbone = BACKBONE_PREFIXES
                    .iter()
                    .any(|p| name.starts_with(&format!("{p}.")));
                let Some(cur) = graphs.whole.state.get(name) else {
                    continue;
                };
                if !backbone {
                    continue;
                }
                if cur.shape() != t.shape() {
                    return Err(invalid(format!(
                        "{}: `{name}` has shape {:?}, the {} backbone's {:?}",
                        path.display(),
                        t.shape(),
                        config.arch,
                        cur.shape()
                    )));
                }
                let v = if t.dtype().is_float() {
                    Tensor::F32(t.to_f32())
                } else {
                    t.clone()
                };
                graphs.whole.state.insert(name, v);
                n += 1;
            }
            if n == 0 {
                return Err(invalid(format!(
                    "{} holds no tensor of the {} backbone",
                    path.display(),
                    config.arch
                )));
            }
        }
        Ok(graphs)
    }

    fn prepare(
        &mut self,
        _ctx: &DetrPretextContext,
        work: &PrepareContext<'_>,
    ) -> Result<(), PretextError> {
        let dir = crate::detr::pretext::keyed_cache_dir(
            work.cache_dir,
            CACHE_SUBDIR,
            &self.settings,
            &["proposal_size", "proposals"],
        );
        std::fs::create_dir_all(&dir)
            .map_err(|e| invalid(format!("creating {}: {e}", dir.display())))?;
        let size = self.settings.positive("proposal_size")? as u32;
        let keep = self.settings.positive("proposals")?;
        let total = work.files.len() as u64;
        let mut targets = Vec::with_capacity(work.files.len());
        for (i, file) in work.files.iter().enumerate() {
            let path = crate::detr::detreg::cache_file(&dir, i, file);
            let t = match load_boxes(&path) {
                Some(t) => t,
                None => {
                    let image = read_rgb(file).map_err(|e| invalid(e.to_string()))?;
                    let t = proposal_targets(&image, size, keep)
                        .map_err(|e| invalid(format!("{}: {e}", file.display())))?;
                    save_boxes(&path, &t)
                        .map_err(|e| invalid(format!("writing {}: {e}", path.display())))?;
                    t
                }
            };
            targets.push(Some(t));
            (work.progress)(i as u64 + 1, total);
        }
        self.targets = targets;
        Ok(())
    }

    fn batch(
        &self,
        config: &DetrConfig,
        images: &[SampleImage],
        _step: u64,
        rng: &mut ChaCha8Rng,
    ) -> Result<DetrBatch, PretextError> {
        let flip = self.settings.bool("flip");
        prepared_batch(
            "pairdetr",
            config,
            images,
            |i| self.targets_of(i),
            flip,
            rng,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::Arch;
    use densa_runtime::backend::tract::TractBackend;
    use rand::SeedableRng;

    fn settings(overrides: &[(&str, &str)]) -> Settings {
        let o: Vec<(String, String)> = overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::resolve("pairdetr", &hyper(), &o).unwrap()
    }

    /// Two bright rectangles on a dark background.
    fn scene(s: u32) -> RgbImage {
        RgbImage::from_fn(s, s, |x, y| {
            if (6..22).contains(&x) && (8..30).contains(&y) {
                image::Rgb([230, 40, 40])
            } else if (28..44).contains(&x) && (26..40).contains(&y) {
                image::Rgb([40, 200, 60])
            } else {
                image::Rgb([20, 20, 30])
            }
        })
    }

    #[test]
    fn pairdetr_targets_are_cached_selective_search_boxes_and_flips_follow_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = scene(48);
        let files = [dir.path().join("a.png"), dir.path().join("b.png")];
        img.save(&files[0]).unwrap();
        img.save(&files[1]).unwrap();
        let ctx = DetrPretextContext {
            arch: Arch::Edge,
            batch: 2,
            image_size: 64,
            seed: 0,
        };
        let backend = TractBackend::new();
        let cache = dir.path().join("cache");
        let progress = |_: u64, _: u64| {};
        let work = PrepareContext {
            files: &files,
            cache_dir: &cache,
            backend: &backend,
            progress: &progress,
        };
        let mut m = PairDetrPretrain::new(settings(&[("proposals", "4")])).unwrap();
        m.prepare(&ctx, &work).unwrap();
        let want = proposal_targets(&img, 128, 4).unwrap();
        assert!(!want.boxes.is_empty());
        assert_eq!(m.targets_of(0), Some(&want));
        // A second run reads the cache (same targets) instead of searching again.
        let folders = || std::fs::read_dir(cache.join(CACHE_SUBDIR)).unwrap().count();
        assert_eq!(folders(), 1);
        let keyed = crate::detr::pretext::keyed_cache_dir(
            &cache,
            CACHE_SUBDIR,
            &m.settings,
            &["proposal_size", "proposals"],
        );
        assert_eq!(std::fs::read_dir(&keyed).unwrap().count(), 2);
        let mut again = PairDetrPretrain::new(settings(&[("proposals", "4")])).unwrap();
        again.prepare(&ctx, &work).unwrap();
        assert_eq!(again.targets_of(1), Some(&want));
        assert_eq!(folders(), 1);
        // Other settings never reuse those targets: a cache of their own.
        let mut fewer = PairDetrPretrain::new(settings(&[("proposals", "1")])).unwrap();
        fewer.prepare(&ctx, &work).unwrap();
        assert_eq!(folders(), 2);
        assert_eq!(fewer.targets_of(1).unwrap().boxes.len(), 1);
        // The config: one class, frozen backbone with frozen batch norm by default.
        let config = m.config(&ctx).unwrap();
        assert_eq!(config.classes, vec!["object".to_string()]);
        assert!(config.train_batch_norm);
        assert!(matches!(m.trainable(), Trainable::Frozen(_)));
        let free = PairDetrPretrain::new(settings(&[("freeze_backbone", "false")])).unwrap();
        assert!(free.config(&ctx).unwrap().train_batch_norm);
        assert_eq!(free.trainable(), Trainable::All);
        // Flips mirror the boxes of the flipped images only.
        let samples: Vec<SampleImage> = (0..2)
            .map(|index| SampleImage {
                index,
                image: img.clone(),
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut flipped = 0;
        for _ in 0..4 {
            let b = m.batch(&config, &samples, 0, &mut rng).unwrap();
            assert_eq!(b.images.to_f32().shape(), &[2, 3, 64, 64]);
            for t in &b.targets {
                if t.boxes != want.boxes {
                    flipped += 1;
                    for (f, w) in t.boxes.iter().zip(&want.boxes) {
                        assert!((f[0] - (1.0 - w[0])).abs() < 1e-6 && f[1..] == w[1..]);
                    }
                }
            }
        }
        assert!(flipped > 0 && flipped < 8, "{flipped}");
        let e = PairDetrPretrain::new(settings(&[("backbone", "/nowhere/b.safetensors")]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nowhere/b.safetensors"), "{e}");
    }
}
