//! DetReg (Bar et al., CVPR 2022, "DETReg: Unsupervised Pretraining with Region Priors for
//! Object Detection"): the whole DETR learns, without labels, to find the boxes of an
//! unsupervised region-proposal method and to predict, for each, the embedding that a frozen
//! self-supervised encoder gives the box's crop.
//!
//! - **Targets** (computed once per image before training, [`DetReg::prepare`], kept in
//!   memory and under `OUT/cache/detreg/` so that a resume reuses them): selective search on
//!   the image resized to 128x128 (`selective_search_resized`, OpenCV's fast mode), the top 10
//!   boxes (`ProposalFilter::detreg()`, `--set proposals=K`; the paper's 30 are for DETR's 100
//!   or Deformable DETR's 300 queries: 10 keeps DETR's share for our 30, leaving queries to
//!   learn "no object"); for each box, the crop resized to
//!   `crop_size` pixels through the frozen encoder (`--set encoder=PATH`: a wave-1
//!   `backbone.safetensors`, e.g. SwAV's, or the folder holding it) and global average pooling
//!   of its C5: an `E`-vector (`E` = the encoder's C5 channels). An image without proposals
//!   has no targets (all its queries learn "no object").
//! - **Heads** (Deformable DETR's, as DETReg's code has them): class (one sigmoid logit,
//!   "object", with the focal loss), box, and an embedding MLP `d_model -> d_model -> E`
//!   (paper: 256-256-512) on the last decoder layer ([`EmbeddingConfig::detreg`]).
//! - **Loss** after the Hungarian matching on every decoder layer (costs: focal class 2, L1 5,
//!   GIoU 2): the set criterion with the sigmoid focal class loss (alpha 0.25, gamma 2,
//!   weight 2), L1 5, GIoU 2 ([`LossConfig::deformable`]), + 1 x L1 of the embeddings on the
//!   last layer. The backbone starts from the encoder's weights (the paper's SwAV backbone;
//!   `--set init_backbone=false`: the detector's random one) and is frozen, batch norm
//!   included (running statistics, `FrozenBatchNorm2d`).
//! - Horizontal flips (probability 1/2, `--set flip=false` to turn off) flip the image and its
//!   boxes; the embedding stays the box's.
//!
//! Our choices: the transformer is densa's DETR (plain attention, one feature level), not
//! Deformable DETR's multi-scale deformable attention; the crop size defaults to 64 (paper
//! 128) for CPU budgets; there is no fallback without an encoder: the method refuses to start
//! and names the flag.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use densa_exporter::weights::{load_safetensors, save_safetensors, StateDict};
use densa_exporter::Tensor;
use densa_runtime::backend::Session;
use densa_runtime::data::image::read_rgb;
use densa_runtime::proposals::{
    filter_proposals, selective_search_resized, ProposalError, ProposalFilter,
    SelectiveSearchConfig,
};
use image::RgbImage;
use ndarray::{Array4, ArrayD, Axis, IxDyn};
use rand_chacha::ChaCha8Rng;

use super::loss::{EmbeddingConfig, LossConfig};
use super::matcher::{xyxy_to_cxcywh, ImageTargets};
use super::pretext::{
    backbone_file, detr_config, detr_hyper, keyed_cache_dir, prepared_batch, DetrBatch,
    DetrPretext, DetrPretextContext, PrepareContext, SampleImage,
};
use super::train::{step_graphs, DetrStepGraphs};
use super::DetrConfig;
use crate::backbone::Arch;
use crate::pretext::settings::{Hyper, Settings};
use crate::pretext::{detector_only, Family, MethodInfo, PretextError};
use crate::train_step::TrainStepConfig;

pub static INFO: MethodInfo = MethodInfo {
    name: "detreg",
    title: "DETReg: Unsupervised Pretraining with Region Priors for Object Detection",
    paper: "Bar, Wang, Kantorov, Reed, Herzig, Chechik, Rohrbach, Darrell, Globerson; CVPR 2022",
    summary: "the whole DETR regresses selective-search boxes and a frozen SwAV encoder's \
              embedding of each box",
    hyper,
    create: detector_only,
    tiny: TINY,
    family: Family::Detector(create),
};

/// A small detector and crops for smoke tests.
pub const TINY: &[(&str, &str)] = &[
    ("d_model", "16"),
    ("heads", "2"),
    ("encoder_layers", "1"),
    ("decoder_layers", "2"),
    ("ffn_dim", "32"),
    ("num_queries", "10"),
    ("crop_size", "32"),
    ("proposals", "5"),
];

/// Where the per-image targets are cached inside the run's cache folder.
pub const CACHE_SUBDIR: &str = "detreg";

/// The settings the cached targets depend on (see [`keyed_cache_dir`]).
const CACHE_KEYS: &[&str] = &[
    "encoder",
    "encoder_arch",
    "crop_size",
    "proposal_size",
    "proposals",
];

fn hyper() -> Vec<Hyper> {
    let mut h = detr_hyper();
    h.extend([
        Hyper::text(
            "encoder",
            "",
            "frozen self-supervised encoder for the box embeddings: a backbone.safetensors \
             (e.g. of `densa pretrain --method swav`) or the folder holding it (required)",
        ),
        Hyper::text(
            "encoder_arch",
            "",
            "the encoder's architecture (empty: its folder's pretrain.json, else --arch)",
        ),
        Hyper::int(
            "crop_size",
            64,
            "box crops are resized to this side (paper 128)",
        ),
        Hyper::int(
            "proposals",
            10,
            "selective-search boxes kept per image (paper 30 for DETR's 100 queries; 10 keeps \
             that share of our 30)",
        ),
        Hyper::int(
            "proposal_size",
            128,
            "selective search runs on the image resized to this square (paper 128)",
        ),
        Hyper::int(
            "embedding_layers",
            3,
            "layers of the embedding MLP (paper 3)",
        ),
        Hyper::float(
            "embedding_weight",
            1.0,
            "weight of the L1 embedding loss (paper 1)",
        ),
        Hyper::bool("flip", true, "random horizontal flips of image and boxes"),
        Hyper::bool(
            "init_backbone",
            true,
            "start the detector's frozen backbone from the encoder's weights, as the paper \
             does with SwAV's (the encoder's architecture must be --arch)",
        ),
    ]);
    h
}

fn create(settings: Settings) -> Result<Box<dyn DetrPretext>, PretextError> {
    Ok(Box::new(DetReg::new(settings)?))
}

/// DetReg (see the module docs).
pub struct DetReg {
    settings: Settings,
    /// The encoder's weights file.
    encoder: PathBuf,
    /// The encoder's architecture, when known before `config` (from the settings or the
    /// encoder folder's `pretrain.json`); else the detector's.
    encoder_arch: Option<Arch>,
    /// Per image (by index): its targets once prepared.
    targets: Vec<Option<ImageTargets>>,
    /// The encoder's weights for the detector's backbone (`init_backbone`), once prepared.
    backbone_tensors: Option<StateDict>,
}

/// The encoder's architecture as a wave-1 output's `pretrain.json` names it.
fn arch_of_run(dir: &Path) -> Option<Arch> {
    let text = std::fs::read_to_string(dir.join("pretrain.json")).ok()?;
    let key = "\"arch\"";
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let name = rest.strip_prefix('"')?.split('"').next()?;
    name.parse().ok()
}

impl DetReg {
    /// Checks the settings; the encoder file must exist.
    pub fn new(settings: Settings) -> Result<DetReg, PretextError> {
        let Some(encoder) = backbone_file(&settings, "encoder")? else {
            return Err(settings.bad(
                "encoder",
                "DetReg needs a frozen self-supervised encoder for its box embeddings: pass \
                 --set encoder=PATH with a backbone.safetensors (e.g. the output folder of \
                 `densa pretrain --method swav`)",
            ));
        };
        let folder = encoder.parent().map(Path::to_path_buf);
        let encoder_arch = match settings.text("encoder_arch") {
            "" => folder.as_deref().and_then(arch_of_run),
            name => Some(
                name.parse::<Arch>()
                    .map_err(|e| settings.bad("encoder_arch", &e.to_string()))?,
            ),
        };
        for key in [
            "crop_size",
            "proposals",
            "proposal_size",
            "embedding_layers",
        ] {
            settings.positive(key)?;
        }
        settings.checked("embedding_weight", |v| v >= 0.0, "must be >= 0")?;
        Ok(DetReg {
            settings,
            encoder,
            encoder_arch,
            targets: Vec::new(),
            backbone_tensors: None,
        })
    }

    fn encoder_arch(&self, ctx: &DetrPretextContext) -> Arch {
        self.encoder_arch.unwrap_or(ctx.arch)
    }

    /// The encoder's embedding length: its C5 channels.
    pub fn embedding_dim(&self, ctx: &DetrPretextContext) -> usize {
        self.encoder_arch(ctx).config().out_channels()[3]
    }

    /// The targets of image `index`, once prepared.
    pub fn targets_of(&self, index: usize) -> Option<&ImageTargets> {
        self.targets.get(index).and_then(Option::as_ref)
    }
}

/// The frozen encoder: an inference session of the backbone with the encoder's weights.
pub struct Encoder {
    session: Mutex<Box<dyn Session>>,
    crop_size: u32,
}

impl Encoder {
    /// Loads `weights` into a `arch` backbone (batch norm in inference mode) on `backend`.
    pub fn load(
        arch: Arch,
        weights: &Path,
        crop_size: u32,
        backend: &dyn densa_runtime::backend::Backend,
    ) -> Result<Encoder, PretextError> {
        let invalid = |problem: String| PretextError::Invalid {
            method: "detreg".into(),
            problem,
        };
        let sd = load_safetensors(weights)
            .map_err(|e| invalid(format!("reading the encoder {}: {e}", weights.display())))?;
        let options = crate::export::WeightOptions {
            state_dict: Some(&sd),
            strip_prefix: None,
        };
        let (model, _) = crate::export::backbone(arch, &options, 0).map_err(|e| {
            invalid(format!(
                "the encoder {} is not a {} backbone: {e}",
                weights.display(),
                arch.name()
            ))
        })?;
        let session = backend
            .load_model(&model, "detreg-encoder")
            .map_err(|e| invalid(format!("loading the encoder: {e}")))?;
        Ok(Encoder {
            session: Mutex::new(session),
            crop_size,
        })
    }

    /// The embeddings of the `xyxy` pixel boxes of `image`: each crop resized to the crop
    /// size, normalised with ImageNet's mean and std, C5 averaged over its cells.
    ///
    /// # Shapes
    /// `K` boxes -> `K` vectors of the encoder's C5 channels.
    pub fn embed(
        &self,
        image: &RgbImage,
        boxes: &[[f32; 4]],
    ) -> Result<Vec<Vec<f32>>, PretextError> {
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.crop_size;
        let s = c as usize;
        let mut x = Array4::<f32>::zeros((boxes.len(), 3, s, s));
        let (w, h) = image.dimensions();
        for (k, b) in boxes.iter().enumerate() {
            let x0 = (b[0].floor().max(0.0) as u32).min(w - 1);
            let y0 = (b[1].floor().max(0.0) as u32).min(h - 1);
            let x1 = (b[2].ceil() as u32).clamp(x0 + 1, w);
            let y1 = (b[3].ceil() as u32).clamp(y0 + 1, h);
            let crop = image::imageops::crop_imm(image, x0, y0, x1 - x0, y1 - y0).to_image();
            let chw = super::pretext::image_chw(
                &crop,
                c,
                false,
                crate::export::IMAGENET_MEAN,
                crate::export::IMAGENET_STD,
            );
            x.index_axis_mut(Axis(0), k).assign(&chw);
        }
        let mut session = self.session.lock().map_err(|_| PretextError::Invalid {
            method: "detreg".into(),
            problem: "the encoder session was poisoned by an earlier panic".into(),
        })?;
        let out = session
            .run(vec![("images".into(), Tensor::F32(x.into_dyn()))])
            .map_err(|e| PretextError::Invalid {
                method: "detreg".into(),
                problem: format!("running the encoder: {e}"),
            })?;
        let c5 = out
            .into_iter()
            .find(|(n, _)| n == "c5")
            .map(|(_, t)| t.to_f32())
            .ok_or_else(|| PretextError::Invalid {
                method: "detreg".into(),
                problem: "the encoder gave no `c5`".into(),
            })?;
        let pooled = c5
            .mean_axis(Axis(3))
            .and_then(|m| m.mean_axis(Axis(2)))
            .ok_or_else(|| PretextError::Invalid {
                method: "detreg".into(),
                problem: "the encoder's c5 is empty".into(),
            })?;
        Ok(pooled
            .outer_iter()
            .map(|r| r.iter().copied().collect())
            .collect())
    }
}

/// The top `keep` selective-search boxes of `image` searched at `proposal_size`², in
/// `image`'s pixels (xyxy, clamped to the image, at least a pixel wide and high): the
/// unsupervised targets of DetReg and Pair DETR.
pub fn proposal_boxes(
    image: &RgbImage,
    proposal_size: u32,
    keep: usize,
) -> Result<Vec<[f32; 4]>, ProposalError> {
    let proposals = selective_search_resized(
        image,
        proposal_size,
        proposal_size,
        &SelectiveSearchConfig::default(),
    )?;
    let filter = ProposalFilter {
        keep,
        ..ProposalFilter::detreg()
    };
    let (w, h) = (image.width() as f32, image.height() as f32);
    Ok(filter_proposals(&proposals, &filter)
        .iter()
        .map(|p| {
            [
                p.x0.clamp(0.0, w),
                p.y0.clamp(0.0, h),
                p.x1.clamp(0.0, w),
                p.y1.clamp(0.0, h),
            ]
        })
        .filter(|b| b[2] - b[0] >= 1.0 && b[3] - b[1] >= 1.0)
        .collect())
}

/// DetReg's targets of one image: the top `keep` selective-search boxes (on the image
/// resized to `proposal_size`) as normalised cxcywh, label 0, with their embeddings.
pub fn image_targets(
    image: &RgbImage,
    proposal_size: u32,
    keep: usize,
    encoder: &Encoder,
) -> Result<ImageTargets, PretextError> {
    let xyxy = proposal_boxes(image, proposal_size, keep).map_err(|e| PretextError::Invalid {
        method: "detreg".into(),
        problem: format!("selective search: {e}"),
    })?;
    let (w, h) = (image.width() as f32, image.height() as f32);
    let embeddings = encoder.embed(image, &xyxy)?;
    Ok(ImageTargets {
        boxes: xyxy
            .iter()
            .map(|b| xyxy_to_cxcywh([b[0] / w, b[1] / h, b[2] / w, b[3] / h]))
            .collect(),
        labels: vec![0; xyxy.len()],
        embeddings,
    })
}

/// The cache file of image `index` (its file name is part of it: another data folder does
/// not reuse it).
pub(crate) fn cache_file(dir: &Path, index: usize, file: &Path) -> PathBuf {
    let stem = file
        .file_stem()
        .map(|s| {
            s.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        })
        .unwrap_or_default();
    dir.join(format!("{index:06}-{stem}.safetensors"))
}

fn save_targets(path: &Path, t: &ImageTargets, dim: usize) -> Result<(), String> {
    let k = t.boxes.len();
    let mut sd = StateDict::new();
    sd.insert(
        "count".to_string(),
        Tensor::I64(ArrayD::from_elem(IxDyn(&[1]), k as i64)),
    );
    if k > 0 {
        let boxes: Vec<f32> = t.boxes.iter().flatten().copied().collect();
        let emb: Vec<f32> = t.embeddings.iter().flatten().copied().collect();
        let arr = |shape: &[usize], v: Vec<f32>| {
            ArrayD::from_shape_vec(IxDyn(shape), v).map_err(|e| e.to_string())
        };
        sd.insert("boxes".to_string(), Tensor::F32(arr(&[k, 4], boxes)?));
        sd.insert("embeddings".to_string(), Tensor::F32(arr(&[k, dim], emb)?));
    }
    let tmp = path.with_extension("tmp");
    save_safetensors(&sd, &tmp).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

fn load_targets(path: &Path, dim: usize) -> Option<ImageTargets> {
    let sd = load_safetensors(path).ok()?;
    let k = *sd.get("count")?.to_f32().iter().next()? as usize;
    if k == 0 {
        return Some(ImageTargets::default());
    }
    let boxes = sd.get("boxes")?.to_f32();
    let emb = sd.get("embeddings")?.to_f32();
    if boxes.shape() != [k, 4].as_slice() || emb.shape() != [k, dim].as_slice() {
        return None;
    }
    Some(ImageTargets {
        boxes: boxes
            .outer_iter()
            .map(|r| [r[0], r[1], r[2], r[3]])
            .collect(),
        labels: vec![0; k],
        embeddings: emb
            .outer_iter()
            .map(|r| r.iter().copied().collect())
            .collect(),
    })
}

impl DetrPretext for DetReg {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn config(&self, ctx: &DetrPretextContext) -> Result<DetrConfig, PretextError> {
        let mut c = detr_config(&self.settings, ctx)?;
        c.loss = LossConfig::deformable();
        // The frozen backbone's batch norm uses its running statistics (Deformable DETR's
        // `FrozenBatchNorm2d`).
        c.train_batch_norm = false;
        c.embedding = Some(EmbeddingConfig {
            layers: self.settings.positive("embedding_layers")?,
            weight: self.settings.f64("embedding_weight") as f32,
            ..EmbeddingConfig::detreg(self.embedding_dim(ctx))
        });
        Ok(c)
    }

    fn prepare(
        &mut self,
        ctx: &DetrPretextContext,
        work: &PrepareContext<'_>,
    ) -> Result<(), PretextError> {
        if self.settings.bool("init_backbone") {
            let encoder_arch = self.encoder_arch(ctx);
            if encoder_arch != ctx.arch {
                return Err(PretextError::Invalid {
                    method: "detreg".into(),
                    problem: format!(
                        "the encoder {} is a {encoder_arch} backbone but --arch is {}: pass \
                         --arch {encoder_arch} to start the frozen backbone from it, or \
                         --set init_backbone=false",
                        self.encoder.display(),
                        ctx.arch
                    ),
                });
            }
            let weights = load_safetensors(&self.encoder).map_err(|e| PretextError::Invalid {
                method: "detreg".into(),
                problem: format!("reading {}: {e}", self.encoder.display()),
            })?;
            self.backbone_tensors = Some(weights);
        }
        let dim = self.embedding_dim(ctx);
        let dir = keyed_cache_dir(work.cache_dir, CACHE_SUBDIR, &self.settings, CACHE_KEYS);
        std::fs::create_dir_all(&dir).map_err(|e| PretextError::Invalid {
            method: "detreg".into(),
            problem: format!("creating {}: {e}", dir.display()),
        })?;
        let total = work.files.len() as u64;
        let mut targets = Vec::with_capacity(work.files.len());
        let mut missing = Vec::new();
        for (i, f) in work.files.iter().enumerate() {
            let cached = load_targets(&cache_file(&dir, i, f), dim);
            if cached.is_none() {
                missing.push(i);
            }
            targets.push(cached);
        }
        let mut done = total - missing.len() as u64;
        (work.progress)(done, total);
        if !missing.is_empty() {
            let encoder = Encoder::load(
                self.encoder_arch(ctx),
                &self.encoder,
                self.settings.positive("crop_size")? as u32,
                work.backend,
            )?;
            let size = self.settings.positive("proposal_size")? as u32;
            let keep = self.settings.positive("proposals")?;
            for i in missing {
                let file = &work.files[i];
                let image = read_rgb(file).map_err(|e| PretextError::Invalid {
                    method: "detreg".into(),
                    problem: e.to_string(),
                })?;
                let t = image_targets(&image, size, keep, &encoder).map_err(|e| {
                    PretextError::Invalid {
                        method: "detreg".into(),
                        problem: format!("{}: {e}", file.display()),
                    }
                })?;
                let path = cache_file(&dir, i, file);
                save_targets(&path, &t, dim).map_err(|e| PretextError::Invalid {
                    method: "detreg".into(),
                    problem: format!("writing {}: {e}", path.display()),
                })?;
                targets[i] = Some(t);
                done += 1;
                (work.progress)(done, total);
            }
        }
        self.targets = targets;
        Ok(())
    }

    /// The split step, its backbone started from the encoder's weights (`init_backbone`):
    /// every backbone parameter and buffer must be in the encoder's file with its shape.
    fn step_graphs(
        &self,
        config: &DetrConfig,
        batch: usize,
        train: &TrainStepConfig,
        seed: u64,
    ) -> Result<DetrStepGraphs, PretextError> {
        let mut graphs = step_graphs(config, batch, train, seed)?;
        if let Some(weights) = &self.backbone_tensors {
            let backbone =
                crate::pretext::backbone_state(&config.backbone()?.config(), &graphs.whole.state)?;
            for (name, fresh) in backbone.iter() {
                let t = weights
                    .get(name)
                    .filter(|t| t.shape() == fresh.shape())
                    .ok_or_else(|| PretextError::Invalid {
                        method: "detreg".into(),
                        problem: format!(
                            "the encoder {} has no `{name}` of shape {:?} for the detector's \
                             backbone",
                            self.encoder.display(),
                            fresh.shape()
                        ),
                    })?;
                graphs.whole.state.insert(name, t.clone());
            }
        }
        Ok(graphs)
    }

    fn batch(
        &self,
        config: &DetrConfig,
        images: &[SampleImage],
        _step: u64,
        rng: &mut ChaCha8Rng,
    ) -> Result<DetrBatch, PretextError> {
        let flip = self.settings.bool("flip");
        prepared_batch("detreg", config, images, |i| self.targets_of(i), flip, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use densa_runtime::backend::tract::TractBackend;
    use densa_runtime::backend::Backend;
    use rand::SeedableRng;

    /// A random edge backbone in torchvision names (a stand-in for SwAV's).
    fn write_encoder(path: &Path) {
        let mut b = densa_exporter::GraphBuilder::new("encoder", 5);
        Arch::Edge.config().init(&mut b).unwrap();
        let mut sd = StateDict::new();
        for p in b.params() {
            if let Some(t) = b.initializer_value(&p.name) {
                sd.insert(p.name.clone(), t.clone());
            }
        }
        save_safetensors(&sd, path).unwrap();
    }

    /// Grey noise with a bright and a dark rectangle.
    fn scene(side: u32) -> RgbImage {
        let mut state = 1u32;
        RgbImage::from_fn(side, side, |x, y| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let noise = (state >> 28) as u8;
            if (6..20).contains(&x) && (8..30).contains(&y) {
                image::Rgb([230, 40 + noise, 30])
            } else if (26..44).contains(&x) && (20..40).contains(&y) {
                image::Rgb([20, 30 + noise, 200])
            } else {
                image::Rgb([120 + noise, 120, 120])
            }
        })
    }

    fn settings(encoder: &Path) -> Settings {
        let o = |k: &str, v: &str| (k.to_string(), v.to_string());
        Settings::resolve(
            "detreg",
            &hyper(),
            &[
                o("encoder", &encoder.display().to_string()),
                o("crop_size", "32"),
                o("proposals", "4"),
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_missing_encoder_is_refused_naming_the_flag() {
        let s = Settings::resolve("detreg", &hyper(), &[]).unwrap();
        let e = DetReg::new(s).err().unwrap().to_string();
        assert!(
            e.contains("encoder") && e.contains("--set encoder=PATH"),
            "{e}"
        );
        let s = settings(Path::new("/nowhere/backbone.safetensors"));
        let e = DetReg::new(s).err().unwrap().to_string();
        assert!(e.contains("/nowhere/backbone.safetensors"), "{e}");
        let e = crate::pretext::create("detreg", &[])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("detector driver"), "{e}");
    }

    #[test]
    fn the_frozen_backbone_starts_from_the_encoder() {
        let dir = tempfile::tempdir().unwrap();
        let enc = dir.path().join("backbone.safetensors");
        write_encoder(&enc);
        let file = dir.path().join("a.png");
        scene(48).save(&file).unwrap();
        let files = [file];
        let ctx = DetrPretextContext {
            arch: Arch::Edge,
            batch: 1,
            image_size: 64,
            seed: 0,
        };
        let backend = TractBackend::new();
        let progress = |_: u64, _: u64| {};
        let work = PrepareContext {
            files: &files,
            cache_dir: &dir.path().join("cache"),
            backend: &backend,
            progress: &progress,
        };
        let encoder = load_safetensors(&enc).unwrap();
        let train = TrainStepConfig::new(crate::train_step::OptimizerConfig::adamw(1e-4, 0.0));
        let start = |overrides: &[(&str, &str)]| {
            let mut s = vec![
                ("encoder".to_string(), enc.display().to_string()),
                ("crop_size".to_string(), "32".to_string()),
            ];
            s.extend(
                overrides
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            );
            let mut m = DetReg::new(Settings::resolve("detreg", &hyper(), &s).unwrap()).unwrap();
            m.prepare(&ctx, &work)?;
            let config = m.config(&ctx)?;
            m.step_graphs(&config, 1, &train, 3)
        };
        let graphs = start(&[]).unwrap();
        let conv = "layer1.0.conv1.weight";
        assert!(encoder.get(conv).is_some());
        let mut n = 0;
        for (name, t) in encoder.iter() {
            assert_eq!(graphs.whole.state.get(name), Some(t), "{name}");
            n += 1;
        }
        assert!(n > 10, "{n} encoder tensors");
        let random = start(&[("init_backbone", "false")]).unwrap();
        assert_ne!(random.whole.state.get(conv), encoder.get(conv));
        let e = start(&[("encoder_arch", "resnet18")])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("--arch resnet18") && e.contains("init_backbone=false"),
            "{e}"
        );
    }

    #[test]
    fn targets_are_selective_search_boxes_with_encoder_embeddings_cached_once() {
        let dir = tempfile::tempdir().unwrap();
        let enc = dir.path().join("backbone.safetensors");
        write_encoder(&enc);
        let img = scene(48);
        let files = [dir.path().join("a.png"), dir.path().join("b.png")];
        img.save(&files[0]).unwrap();
        image::imageops::flip_horizontal(&img)
            .save(&files[1])
            .unwrap();
        let ctx = DetrPretextContext {
            arch: Arch::Edge,
            batch: 2,
            image_size: 64,
            seed: 0,
        };
        let backend = TractBackend::new();
        let cache = dir.path().join("cache");
        let seen = Mutex::new(Vec::new());
        let progress = |d: u64, t: u64| seen.lock().unwrap().push((d, t));
        let work = PrepareContext {
            files: &files,
            cache_dir: &cache,
            backend: &backend,
            progress: &progress,
        };
        let mut m = DetReg::new(settings(&enc)).unwrap();
        m.prepare(&ctx, &work).unwrap();
        assert_eq!(seen.lock().unwrap().last(), Some(&(2, 2)));
        let t = m.targets_of(0).unwrap().clone();
        // The boxes: the top 4 proposals of selective search at 128x128, normalised.
        let props = filter_proposals(
            &selective_search_resized(&img, 128, 128, &SelectiveSearchConfig::default()).unwrap(),
            &ProposalFilter {
                keep: 4,
                ..ProposalFilter::detreg()
            },
        );
        assert_eq!(t.boxes.len(), props.len());
        assert!(!t.boxes.is_empty());
        for (b, p) in t.boxes.iter().zip(&props) {
            let want = xyxy_to_cxcywh(p.xyxy().map(|v| v.clamp(0.0, 48.0) / 48.0));
            assert!(
                b.iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-5),
                "{b:?} {want:?}"
            );
        }
        assert_eq!(t.labels, vec![0; t.boxes.len()]);
        assert_eq!(t.embeddings.len(), t.boxes.len());
        assert!(t.embeddings.iter().all(|e| e.len() == 128));
        // A whole-image box's embedding is the encoder's pooled C5 of the resized image.
        let encoder = Encoder::load(Arch::Edge, &enc, 32, &backend).unwrap();
        let whole = encoder.embed(&img, &[[0.0, 0.0, 48.0, 48.0]]).unwrap();
        let sd = load_safetensors(&enc).unwrap();
        let options = crate::export::WeightOptions {
            state_dict: Some(&sd),
            strip_prefix: None,
        };
        let (model, _) = crate::export::backbone(Arch::Edge, &options, 0).unwrap();
        let x = super::super::pretext::image_chw(
            &img,
            32,
            false,
            crate::export::IMAGENET_MEAN,
            crate::export::IMAGENET_STD,
        );
        let out = backend
            .load_model(&model, "direct")
            .unwrap()
            .run(vec![(
                "images".into(),
                Tensor::F32(x.insert_axis(Axis(0)).into_dyn()),
            )])
            .unwrap();
        let c5 = out.into_iter().find(|(n, _)| n == "c5").unwrap().1.to_f32();
        let (c, h, w) = (c5.shape()[1], c5.shape()[2], c5.shape()[3]);
        for ch in 0..c {
            let mut sum = 0.0f32;
            for y in 0..h {
                for xx in 0..w {
                    sum += c5[[0, ch, y, xx]];
                }
            }
            let want = sum / (h * w) as f32;
            assert!((whole[0][ch] - want).abs() <= 1e-5 * (1.0 + want.abs()));
        }
        // A second run reads the cache: a broken encoder file is never opened for the targets
        // (the backbone's start, `init_backbone`, reads it: off here).
        std::fs::write(&enc, b"not safetensors").unwrap();
        let s = Settings::resolve(
            "detreg",
            &hyper(),
            &[
                ("encoder".to_string(), enc.display().to_string()),
                ("crop_size".to_string(), "32".to_string()),
                ("proposals".to_string(), "4".to_string()),
                ("init_backbone".to_string(), "false".to_string()),
            ],
        )
        .unwrap();
        let mut again = DetReg::new(s).unwrap();
        again.prepare(&ctx, &work).unwrap();
        assert_eq!(again.targets_of(0), Some(&t));
        // Batches: flipped images flip their boxes, the embeddings stay.
        let mut c = again.config(&ctx).unwrap();
        assert_eq!(c.embedding.unwrap().dim, 128);
        c.image_size = 64;
        let samples: Vec<SampleImage> = (0..2)
            .map(|index| SampleImage {
                index,
                image: read_rgb(&files[index]).unwrap(),
            })
            .collect();
        let k = t
            .boxes
            .iter()
            .position(|b| (b[0] - 0.5).abs() > 0.01)
            .expect("a box off the vertical centre line");
        let mut flipped = 0;
        for seed in 0..8 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let b = again.batch(&c, &samples, 0, &mut rng).unwrap();
            assert_eq!(b.images.shape(), &[2, 3, 64, 64]);
            let got = &b.targets[0];
            assert_eq!(got.embeddings, t.embeddings);
            if (got.boxes[k][0] - t.boxes[k][0]).abs() > 1e-6 {
                assert!((got.boxes[k][0] - (1.0 - t.boxes[k][0])).abs() < 1e-6);
                flipped += 1;
            }
        }
        assert!(flipped > 0 && flipped < 8, "{flipped} of 8 flipped");
    }
}
