//! UP-DETR (Dai et al. 2021, "UP-DETR: Unsupervised Pre-training for Object Detection with
//! Transformers"): *random query patch detection*. Per image, `P` random patches are cropped,
//! resized and colour-jittered, encoded by the frozen backbone (global average pooling of C5)
//! and fed to the decoder: a trainable linear `patch2query` maps each patch feature to
//! `d_model` and adds it to the query embeddings of its group of `Q / P` object queries
//! ([`DetrConfig::query_patches`]). The detector must find each patch in the image (DETR's
//! Hungarian loss with the single class "object") and reconstruct its feature from the matched
//! query (`||norm(pred) - norm(feature)||^2`).
//!
//! *Multi-query localisation*: each step the queries are shuffled into `P` groups (a host
//! permutation), the patch of group `g` is added to group `g`'s queries, and a block-diagonal
//! additive decoder self-attention mask ([`DetrConfig::self_attn_mask`], [`GROUP_MASK`] across
//! groups) keeps the groups from seeing each other. *Patch feature dropout*: a query's patch
//! addition is dropped with probability `feature_drop` (UP-DETR's `mask_ratio`, 0.1), per image
//! and query, through the host input `queries.patch_assign`.
//!
//! This module is the host side: sampling the patches and their boxes, the groups, the mask,
//! the assignment, and the patch encoder (an inference session of the frozen backbone + GAP,
//! run each step: the backbone is frozen, so no gradient is lost). Our choices, for small
//! inputs: 3 patches for our 30 queries (the paper: 10 for 100, the same 10 queries per patch),
//! patches resized to 64 px (the paper: 128), and the detector's input is the whole image
//! resized (stretched) to the square input size, so the patch boxes normalised by the image
//! size are the boxes in the input. Patch sides are drawn as UP-DETR's code draws them: width
//! and height independently and uniformly in `[min_side, side - min_side]` pixels of the
//! decoded image, the position uniformly where the patch fits; the image is flipped
//! horizontally with probability 1/2 before the patches are drawn (UP-DETR flips image and
//! boxes together).
//!
//! [`UpDetr`] is the method for `densa pretrain --method updetr` ([`DetrPretext`]): its
//! `backbone` setting (a wave-1 `backbone.safetensors`, the paper's SwAV) gives the patch
//! encoder's weights and the detector's frozen starting backbone alike (empty: the detector's
//! random initial backbone); the reconstruction head is the generic embedding head
//! ([`DetrConfig::embedding`], 2 layers, [`EmbeddingLoss::NormalizedSquared`], weight 1).

use std::path::PathBuf;
use std::sync::Mutex;

use densa_exporter::onnx::ModelProto;
use densa_exporter::weights::{load_safetensors, StateDict};
use densa_exporter::{DType, Dim, GraphBuilder, Tensor};
use densa_runtime::augment::photometric::ColorJitterConfig;
use densa_runtime::augment::spatial::{resize, resized_crop};
use densa_runtime::augment::{CropBox, Normalize};
use densa_runtime::backend::{Backend, Session};
use image::RgbImage;
use ndarray::{Array2, Array4, ArrayD, Axis, IxDyn};
use rand::seq::SliceRandom;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::loss::{EmbeddingConfig, EmbeddingLoss};
use super::matcher::{xyxy_to_cxcywh, ImageTargets};
use super::pretext::{
    backbone_file, detr_config, detr_hyper, DetrBatch, DetrPretext, DetrPretextContext,
    PrepareContext, SampleImage,
};
use super::train::{step_graphs, DetrStepGraphs};
use super::{names, DetrConfig, DetrError};
use crate::nn::NormMode;
use crate::pretext::settings::{Hyper, Settings};
use crate::pretext::{detector_only, Family, MethodInfo, PretextError};
use crate::train_step::TrainStepConfig;

/// The additive self-attention mask between queries of different groups (softmax weight
/// `exp(-1e9)` = 0 in f32; finite, so no `inf - inf` anywhere).
pub const GROUP_MASK: f32 = -1e9;

/// Why an UP-DETR batch could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum UpDetrError {
    #[error("UP-DETR config: {field} {problem}")]
    Config {
        field: &'static str,
        problem: String,
    },
    #[error("UP-DETR: image {index} is {width}x{height} pixels; patches need at least 2x2")]
    Image {
        index: usize,
        width: u32,
        height: u32,
    },
    #[error("UP-DETR patch encoder: {0}")]
    Encoder(String),
    #[error(transparent)]
    Detr(#[from] DetrError),
}

/// UP-DETR's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct UpDetrConfig {
    /// Query patches per image, `P`; must divide the query count. Default 3 (paper: 10).
    pub patches: usize,
    /// Side the patches are resized to before the backbone. Default 64 (paper: 128).
    pub patch_size: u32,
    /// Smallest patch side in pixels; the largest is `side - min_side`. Default 8 (paper).
    pub min_side: u32,
    /// Probability that a query's patch feature is dropped. Default 0.1 (paper).
    pub feature_drop: f64,
    /// Shuffle the queries into groups each step. Default true (paper).
    pub shuffle: bool,
    /// Colour jitter of the patches. Default MoCo-v2's (UP-DETR's code uses the same).
    pub jitter: ColorJitterConfig,
}

impl Default for UpDetrConfig {
    fn default() -> Self {
        UpDetrConfig {
            patches: 3,
            patch_size: 64,
            min_side: 8,
            feature_drop: 0.1,
            shuffle: true,
            jitter: ColorJitterConfig::default(),
        }
    }
}

impl UpDetrConfig {
    /// Checks the settings against the detector that trains with them.
    pub fn check(&self, detr: &DetrConfig) -> Result<(), UpDetrError> {
        let bad = |field, problem: String| Err(UpDetrError::Config { field, problem });
        if self.patches == 0 || !detr.num_queries.is_multiple_of(self.patches) {
            return bad(
                "patches",
                format!(
                    "{} does not divide the {} queries",
                    self.patches, detr.num_queries
                ),
            );
        }
        if self.patch_size < 32 {
            return bad("patch_size", format!("{} is below 32", self.patch_size));
        }
        if !(0.0..1.0).contains(&self.feature_drop) {
            return bad(
                "feature_drop",
                format!("{} is not a probability below 1", self.feature_drop),
            );
        }
        if detr.query_patches != self.patches || !detr.self_attn_mask {
            return bad(
                "patches",
                format!(
                    "the detector has query_patches {} and self_attn_mask {}; UP-DETR needs {} \
                     and true (use UpDetrConfig::detr)",
                    detr.query_patches, detr.self_attn_mask, self.patches
                ),
            );
        }
        self.jitter
            .validate()
            .map_err(|e| UpDetrError::Config {
                field: "jitter",
                problem: e.to_string(),
            })
            .map(|_| ())
    }

    /// `base` with what UP-DETR needs: one class "object", the group mask input, the patch
    /// inputs, and a frozen backbone's batch norm (running statistics, as DETR's
    /// `FrozenBatchNorm2d`).
    pub fn detr(&self, base: &DetrConfig) -> DetrConfig {
        DetrConfig {
            classes: vec!["object".into()],
            self_attn_mask: true,
            query_patches: self.patches,
            train_batch_norm: false,
            ..base.clone()
        }
    }
}

/// `count` random patches of a `width x height` image: width and height each uniform in
/// `[min_side, side - min_side]` (clamped to `[1, side]` for images under `2 * min_side`),
/// position uniform where the patch fits; whole pixels.
pub fn sample_patch_boxes(
    width: u32,
    height: u32,
    count: usize,
    min_side: u32,
    rng: &mut ChaCha8Rng,
) -> Vec<CropBox> {
    let side = |rng: &mut ChaCha8Rng, size: u32| {
        let lo = min_side.clamp(1, size);
        let hi = size.saturating_sub(min_side).max(lo);
        rng.random_range(lo..=hi)
    };
    (0..count)
        .map(|_| {
            let (w, h) = (side(rng, width), side(rng, height));
            let x = rng.random_range(0..=width - w);
            let y = rng.random_range(0..=height - h);
            CropBox::new(x as f32, y as f32, (x + w) as f32, (y + h) as f32)
        })
        .collect()
}

/// The group of each of `queries` queries: a permutation (identity without `shuffle`) cut into
/// `patches` consecutive groups of `queries / patches`: query `perm[i]` is in group
/// `i / (queries / patches)`.
pub fn query_groups(
    queries: usize,
    patches: usize,
    shuffle: bool,
    rng: &mut ChaCha8Rng,
) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..queries).collect();
    if shuffle {
        perm.shuffle(rng);
    }
    let per = (queries / patches.max(1)).max(1);
    let mut groups = vec![0; queries];
    for (i, &q) in perm.iter().enumerate() {
        groups[q] = (i / per).min(patches.saturating_sub(1));
    }
    groups
}

/// The block-diagonal additive self-attention mask of `groups`: 0 between queries of one
/// group, [`GROUP_MASK`] across groups.
///
/// # Shapes
/// -> `[Q, Q]`.
pub fn group_mask(groups: &[usize]) -> Tensor {
    let q = groups.len();
    let values = (0..q * q)
        .map(|k| {
            if groups[k / q] == groups[k % q] {
                0.0
            } else {
                GROUP_MASK
            }
        })
        .collect();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[q, q]), values).expect("[Q, Q]"))
}

/// Which patch's projection each query of each of `images` images receives: one-hot of its
/// group, the row zeroed with probability `drop` (per image and query).
///
/// # Shapes
/// -> `[N, Q, P]`.
pub fn patch_assign(
    groups: &[usize],
    patches: usize,
    images: usize,
    drop: f64,
    rng: &mut ChaCha8Rng,
) -> Tensor {
    let q = groups.len();
    let mut a = ndarray::Array3::<f32>::zeros((images, q, patches));
    for n in 0..images {
        for (i, &g) in groups.iter().enumerate() {
            if rng.random::<f64>() >= drop {
                a[[n, i, g]] = 1.0;
            }
        }
    }
    Tensor::F32(a.into_dyn())
}

/// The detection targets of one image's patches: class 0 ("object"), boxes normalised
/// `cxcywh` (by the image size, which the stretched detector input keeps).
pub fn patch_targets(boxes: &[CropBox], width: u32, height: u32) -> ImageTargets {
    let (w, h) = (width as f32, height as f32);
    ImageTargets {
        boxes: boxes
            .iter()
            .map(|b| xyxy_to_cxcywh([b.x0 / w, b.y0 / h, b.x1 / w, b.y1 / h]))
            .collect(),
        labels: vec![0; boxes.len()],
        embeddings: Vec::new(),
    }
}

/// The patches cropped from `img`, resized to `size x size` and colour-jittered.
pub fn render_patches(
    img: &RgbImage,
    boxes: &[CropBox],
    size: u32,
    jitter: &ColorJitterConfig,
    rng: &mut ChaCha8Rng,
) -> Vec<RgbImage> {
    boxes
        .iter()
        .map(|b| {
            let mut p = resized_crop(img, b, (size, size), false);
            jitter.apply(&mut p, rng);
            p
        })
        .collect()
}

/// The frozen backbone + global average pooling of C5, as an inference session.
pub struct PatchEncoder {
    session: Box<dyn Session>,
    size: u32,
    channels: usize,
    normalize: Normalize,
}

/// Input and output names of the patch encoder graph.
pub const PATCHES: &str = "patches";
pub const PATCH_FEATURES_OUT: &str = "features";

impl PatchEncoder {
    /// The encoder graph of `detr`'s backbone with the weights in `state` (the detector's
    /// state, names as in training): input `patches [M, 3, size, size]` (normalised as the
    /// detector's images), output `features [M, C5]`; batch norm with running statistics.
    pub fn graph(detr: &DetrConfig, size: u32, state: &StateDict) -> Result<ModelProto, DetrError> {
        let mut b = GraphBuilder::new("densa-updetr-patches", 0);
        let s = size as i64;
        let patches = b.input(
            PATCHES,
            DType::F32,
            vec![Dim::from("M"), 3.into(), s.into(), s.into()],
        )?;
        let backbone = detr.backbone()?.config().init(&mut b)?;
        crate::export::set_state(&mut b, state).map_err(|e| match e {
            crate::export::StateError::Tensor { name, problem } => {
                DetrError::State { name, problem }
            }
            crate::export::StateError::Build(e) => DetrError::Build(e),
        })?;
        let stages = backbone.forward_mode(&mut b, &patches, &mut NormMode::Inference)?;
        let pooled = crate::pretext::ops::pool(&mut b, &stages.c5)?;
        b.output(&pooled, PATCH_FEATURES_OUT)?;
        Ok(b.finish())
    }

    /// Loads [`graph`](Self::graph) on `backend`.
    pub fn new(
        detr: &DetrConfig,
        size: u32,
        state: &StateDict,
        backend: &dyn Backend,
    ) -> Result<PatchEncoder, UpDetrError> {
        let model = Self::graph(detr, size, state)?;
        let session = backend
            .load_model(&model, "updetr-patches")
            .map_err(|e| UpDetrError::Encoder(format!("loading the graph: {e}")))?;
        Ok(PatchEncoder {
            session,
            size,
            channels: detr.backbone()?.config().out_channels()[3],
            normalize: Normalize {
                mean: detr.mean,
                std: detr.std,
            },
        })
    }

    /// Feature channels `C`.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The features of `patches` (each `size x size`).
    ///
    /// # Shapes
    /// `M` patches -> `[M, C]`.
    pub fn encode(&mut self, patches: &[RgbImage]) -> Result<Array2<f32>, UpDetrError> {
        let s = self.size as usize;
        let mut x = Array4::<f32>::zeros((patches.len(), 3, s, s));
        for (i, p) in patches.iter().enumerate() {
            if p.dimensions() != (self.size, self.size) {
                return Err(UpDetrError::Encoder(format!(
                    "patch {i} is {:?}, expected {s}x{s}",
                    p.dimensions()
                )));
            }
            self.normalize.write_chw(p, x.index_axis_mut(Axis(0), i));
        }
        let out = self
            .session
            .run(vec![(PATCHES.into(), Tensor::F32(x.into_dyn()))])
            .map_err(|e| UpDetrError::Encoder(e.to_string()))?;
        let f = out
            .into_iter()
            .find(|(n, _)| n == PATCH_FEATURES_OUT)
            .ok_or_else(|| UpDetrError::Encoder("no `features` output".into()))?
            .1
            .to_f32();
        f.into_dimensionality()
            .map_err(|e| UpDetrError::Encoder(format!("features: {e}")))
    }
}

/// One prepared batch.
#[derive(Clone, Debug)]
pub struct UpDetrBatch {
    /// `[N, 3, S, S]` normalised detector inputs.
    pub images: Tensor,
    /// Per image: the patch boxes (class 0) and features (the reconstruction targets).
    pub targets: Vec<ImageTargets>,
    /// Per image `[P, C]`: the patch features (inputs and reconstruction targets).
    pub features: Vec<Array2<f32>>,
    /// The query group of every query (this step's shuffle).
    pub groups: Vec<usize>,
    /// `decoder.self_attn_mask`, `queries.patch_features`, `queries.patch_assign`.
    pub extra: Vec<(String, Tensor)>,
}

/// Prepares a batch: the detector inputs (each image flipped horizontally with probability
/// 1/2 when `flip`, stretched to the input size), `P` patches per image, their boxes and
/// features, the groups, the mask and the assignment.
pub fn prepare_batch(
    config: &UpDetrConfig,
    detr: &DetrConfig,
    encoder: &mut PatchEncoder,
    images: &[&RgbImage],
    flip: bool,
    rng: &mut ChaCha8Rng,
) -> Result<UpDetrBatch, UpDetrError> {
    let s = detr.image_size;
    let (n, p, c) = (images.len(), config.patches, encoder.channels());
    let normalize = Normalize {
        mean: detr.mean,
        std: detr.std,
    };
    let mut x = Array4::<f32>::zeros((n, 3, s as usize, s as usize));
    let mut targets = Vec::with_capacity(n);
    let mut features = Vec::with_capacity(n);
    let mut flat = Vec::with_capacity(n * p * c);
    for (i, img) in images.iter().enumerate() {
        let (w, h) = img.dimensions();
        if w < 2 || h < 2 {
            return Err(UpDetrError::Image {
                index: i,
                width: w,
                height: h,
            });
        }
        let flipped;
        let img = if flip && rng.random::<bool>() {
            flipped = image::imageops::flip_horizontal(*img);
            &flipped
        } else {
            *img
        };
        normalize.write_chw(&resize(img, (s, s)), x.index_axis_mut(Axis(0), i));
        let boxes = sample_patch_boxes(w, h, p, config.min_side, rng);
        let crops = render_patches(img, &boxes, config.patch_size, &config.jitter, rng);
        let f = encoder.encode(&crops)?;
        flat.extend(f.iter().copied());
        let mut t = patch_targets(&boxes, w, h);
        t.embeddings = f.outer_iter().map(|r| r.to_vec()).collect();
        targets.push(t);
        features.push(f);
    }
    let groups = query_groups(detr.num_queries, p, config.shuffle, rng);
    let extra = vec![
        (names::SELF_ATTN_MASK.to_string(), group_mask(&groups)),
        (
            names::PATCH_FEATURES.to_string(),
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n, p, c]), flat).expect("[N, P, C]")),
        ),
        (
            names::PATCH_ASSIGN.to_string(),
            patch_assign(&groups, p, n, config.feature_drop, rng),
        ),
    ];
    Ok(UpDetrBatch {
        images: Tensor::F32(x.into_dyn()),
        targets,
        features,
        groups,
        extra,
    })
}

/// The registry entry (`densa pretrain --method updetr`).
pub static INFO: MethodInfo = MethodInfo {
    name: "updetr",
    title: "UP-DETR: Unsupervised Pre-training for Object Detection with Transformers",
    paper: "Dai, Cai, Lin, Chen; CVPR 2021",
    summary: "the whole DETR finds random patches of the image, fed as frozen-backbone features \
              added to groups of object queries, and reconstructs their features",
    hyper,
    create: detector_only,
    tiny: TINY,
    family: Family::Detector(create),
};

/// A small detector and patches for smoke tests.
pub const TINY: &[(&str, &str)] = &[
    ("d_model", "16"),
    ("heads", "2"),
    ("encoder_layers", "1"),
    ("decoder_layers", "2"),
    ("ffn_dim", "32"),
    ("num_queries", "6"),
    ("patches", "2"),
    ("patch_size", "32"),
];

fn hyper() -> Vec<Hyper> {
    let mut h = detr_hyper();
    h.extend([
        Hyper::text(
            "backbone",
            "",
            "frozen backbone of the detector and the patch encoder: a backbone.safetensors (e.g. \
             of `densa pretrain --method swav`, as the paper's SwAV) or the folder holding it; \
             empty: the detector's random initial backbone",
        ),
        Hyper::int(
            "patches",
            3,
            "query patches per image; divides num_queries (paper 10 of 100)",
        ),
        Hyper::int(
            "patch_size",
            64,
            "patches are resized to this side (paper 128)",
        ),
        Hyper::int(
            "min_side",
            8,
            "smallest patch side in pixels; the largest is side - min_side",
        ),
        Hyper::float(
            "feature_drop",
            0.1,
            "probability of dropping a query's patch feature",
        ),
        Hyper::bool("shuffle", true, "shuffle the queries into groups each step"),
        Hyper::float(
            "feature_weight",
            1.0,
            "weight of the feature reconstruction loss (paper 1)",
        ),
        Hyper::int(
            "feature_layers",
            2,
            "layers of the reconstruction MLP (paper 2)",
        ),
        Hyper::bool(
            "flip",
            true,
            "random horizontal flips of image and patch boxes",
        ),
    ]);
    h
}

fn create(settings: Settings) -> Result<Box<dyn DetrPretext>, PretextError> {
    Ok(Box::new(UpDetr::new(settings)?))
}

/// UP-DETR as a [`DetrPretext`] (see the module docs).
pub struct UpDetr {
    settings: Settings,
    config: UpDetrConfig,
    /// The backbone weights file (`backbone` setting), if any.
    backbone: Option<PathBuf>,
    /// The patch encoder, made by [`DetrPretext::prepare`].
    encoder: Mutex<Option<PatchEncoder>>,
    /// The frozen backbone's tensors the encoder uses (the detector starts from them).
    backbone_tensors: Option<StateDict>,
}

fn invalid(problem: String) -> PretextError {
    PretextError::Invalid {
        method: "updetr".into(),
        problem,
    }
}

impl UpDetr {
    /// UP-DETR with resolved settings.
    pub fn new(settings: Settings) -> Result<UpDetr, PretextError> {
        let config = UpDetrConfig {
            patches: settings.positive("patches")?,
            patch_size: settings.positive("patch_size")? as u32,
            min_side: settings.positive("min_side")? as u32,
            feature_drop: settings.checked(
                "feature_drop",
                |v| (0.0..1.0).contains(&v),
                "must be in [0, 1)",
            )?,
            shuffle: settings.bool("shuffle"),
            jitter: ColorJitterConfig::default(),
        };
        let backbone = backbone_file(&settings, "backbone")?;
        Ok(UpDetr {
            settings,
            config,
            backbone,
            encoder: Mutex::new(None),
            backbone_tensors: None,
        })
    }

    /// The backbone tensors of the `backbone` setting (torchvision names), checked against
    /// `detr`'s architecture; `None` without the setting.
    fn backbone_state(&self, detr: &DetrConfig) -> Result<Option<StateDict>, PretextError> {
        let Some(path) = &self.backbone else {
            return Ok(None);
        };
        let sd = load_safetensors(path)
            .map_err(|e| invalid(format!("reading the backbone {}: {e}", path.display())))?;
        let want =
            crate::pretext::backbone_state(&detr.backbone()?.config(), &detr.initial_state(0)?)?;
        let mut out = StateDict::new();
        for (name, t) in want.iter() {
            let got = sd.get(name).ok_or_else(|| {
                invalid(format!(
                    "the backbone {} has no `{name}` (not a {} backbone?)",
                    path.display(),
                    detr.arch
                ))
            })?;
            if got.shape() != t.shape() {
                return Err(invalid(format!(
                    "the backbone {}: `{name}` has shape {:?}, a {} backbone has {:?}",
                    path.display(),
                    got.shape(),
                    detr.arch,
                    t.shape()
                )));
            }
            out.insert(name, got.clone());
        }
        Ok(Some(out))
    }
}

impl DetrPretext for UpDetr {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn config(&self, ctx: &DetrPretextContext) -> Result<DetrConfig, PretextError> {
        let base = detr_config(&self.settings, ctx)?;
        let mut c = self.config.detr(&base);
        c.embedding = Some(EmbeddingConfig {
            dim: base.backbone()?.config().out_channels()[3],
            layers: self.settings.positive("feature_layers")?,
            loss: EmbeddingLoss::NormalizedSquared,
            weight: self.settings.f64("feature_weight") as f32,
            last_layer_only: false,
        });
        self.config.check(&c).map_err(|e| invalid(e.to_string()))?;
        Ok(c)
    }

    /// Makes the patch encoder: the `backbone` setting's weights, else the detector's initial
    /// backbone (seed `ctx.seed`); [`step_graphs`](DetrPretext::step_graphs) starts the
    /// detector's frozen backbone from the same tensors.
    fn prepare(
        &mut self,
        ctx: &DetrPretextContext,
        work: &PrepareContext<'_>,
    ) -> Result<(), PretextError> {
        let detr = self.config(ctx)?;
        let state = match self.backbone_state(&detr)? {
            Some(s) => s,
            None => detr.initial_state(ctx.seed)?,
        };
        let encoder = PatchEncoder::new(&detr, self.config.patch_size, &state, work.backend)
            .map_err(|e| invalid(e.to_string()))?;
        self.backbone_tensors = Some(crate::pretext::backbone_state(
            &detr.backbone()?.config(),
            &state,
        )?);
        *self.encoder.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(encoder);
        (work.progress)(work.files.len() as u64, work.files.len() as u64);
        Ok(())
    }

    fn step_graphs(
        &self,
        config: &DetrConfig,
        batch: usize,
        train: &TrainStepConfig,
        seed: u64,
    ) -> Result<DetrStepGraphs, PretextError> {
        let mut graphs = step_graphs(config, batch, train, seed)?;
        if let Some(b) = &self.backbone_tensors {
            for (name, t) in b.iter() {
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
        let mut guard = self
            .encoder
            .lock()
            .map_err(|_| invalid("the patch encoder failed".into()))?;
        let encoder = guard
            .as_mut()
            .ok_or_else(|| invalid("batch before prepare: no patch encoder".into()))?;
        let refs: Vec<&RgbImage> = images.iter().map(|s| &s.image).collect();
        let b = prepare_batch(
            &self.config,
            config,
            encoder,
            &refs,
            self.settings.bool("flip"),
            rng,
        )
        .map_err(|e| invalid(e.to_string()))?;
        Ok(DetrBatch {
            images: b.images,
            targets: b.targets,
            extra: b.extra,
        })
    }
}

#[cfg(test)]
#[path = "updetr_tests.rs"]
mod tests;
