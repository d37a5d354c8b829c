//! The detector-pretraining methods (DetReg, UP-DETR, Pair DETR): what `densa pretrain
//! --method <detector method>` runs. Unlike a backbone [`Pretext`](crate::pretext::Pretext),
//! such a method trains a whole DETR ([`super`]) with the Hungarian matching on the host
//! ([`DetrTrainer`](super::train::DetrTrainer)): it says which detector
//! ([`DetrPretext::config`], one class `"object"`), which parameters train
//! ([`DetrPretext::trainable`]: DetReg and UP-DETR freeze the backbone), and per step the
//! normalised images, each image's targets (boxes, and for the embedding head their vectors)
//! and any extra batch inputs (UP-DETR's query-group mask) ([`DetrPretext::batch`]).
//! Per-image work that is done once and cached (DetReg's proposals and their embeddings) goes
//! in [`DetrPretext::prepare`].
//!
//! The shape of the detector comes from settings every detector method shares
//! ([`detr_hyper`]: `d_model`, `heads`, layers, `num_queries`, `feature_stride`,
//! `grad_clip`), resolved into a [`DetrConfig`] by [`detr_config`].
//!
//! Our choices: images are stretched to the square input (no letterbox: no boxes come with
//! them), bilinear, then normalised with ImageNet's mean and std like every densa backbone.

use std::path::{Path, PathBuf};

use densa_exporter::Tensor;
use densa_runtime::backend::Backend;
use image::RgbImage;
use ndarray::Array4;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::matcher::ImageTargets;
use super::train::{step_graphs, DetrStepGraphs};
use super::DetrConfig;
use crate::backbone::Arch;
use crate::pretext::settings::{Hyper, Settings};
use crate::pretext::{MethodInfo, PretextError};
use crate::train_step::{OptimizerConfig, TrainStepConfig, Trainable};

/// The backbone's top-level parameter prefixes (torchvision names): what
/// [`Trainable::Frozen`] takes to freeze it.
pub const BACKBONE_PREFIXES: [&str; 6] = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"];

/// The single class of the pretraining detectors.
pub const OBJECT_CLASS: &str = "object";

/// What the method builds for.
#[derive(Clone, Debug)]
pub struct DetrPretextContext {
    /// Backbone architecture.
    pub arch: Arch,
    /// Images per step (fixed in the graph).
    pub batch: usize,
    /// Square input side in pixels.
    pub image_size: u32,
    /// Seed of the initial weights and of the host's randomness.
    pub seed: u64,
}

/// One training image as a method receives it: its index in the run's file list (a key for
/// per-image caches) and its decoded pixels.
#[derive(Clone, Debug)]
pub struct SampleImage {
    pub index: usize,
    pub image: RgbImage,
}

/// What one step feeds [`DetrTrainer::step`](super::train::DetrTrainer::step).
#[derive(Clone, Debug)]
pub struct DetrBatch {
    /// `[N, 3, S, S]` normalised.
    pub images: Tensor,
    /// One entry per image (boxes normalised cxcywh, labels 0, embeddings when the config
    /// has an embedding head). An image without targets has only "no object" queries.
    pub targets: Vec<ImageTargets>,
    /// Other batch inputs of the step graphs (`decoder.self_attn_mask`).
    pub extra: Vec<(String, Tensor)>,
}

/// What [`DetrPretext::prepare`] works with.
pub struct PrepareContext<'a> {
    /// The run's images; [`SampleImage::index`] indexes this list.
    pub files: &'a [PathBuf],
    /// A folder inside the run's output for caches that a resume reuses.
    pub cache_dir: &'a Path,
    /// The backend for inference sessions (DetReg's frozen encoder).
    pub backend: &'a dyn Backend,
    /// Reports `(done, total)` while working (the driver draws a progress bar).
    pub progress: &'a (dyn Fn(u64, u64) + Sync),
}

/// A detector-pretraining method (see the module docs).
pub trait DetrPretext: Send {
    /// The registry entry.
    fn info(&self) -> &'static MethodInfo;

    /// The resolved hyperparameters.
    fn settings(&self) -> &Settings;

    /// The detector it trains. Default: [`detr_config`] of the settings (no method options).
    fn config(&self, ctx: &DetrPretextContext) -> Result<DetrConfig, PretextError> {
        detr_config(self.settings(), ctx)
    }

    /// Which parameters train. Default: everything but the backbone
    /// ([`BACKBONE_PREFIXES`] frozen).
    fn trainable(&self) -> Trainable {
        Trainable::Frozen(BACKBONE_PREFIXES.map(String::from).to_vec())
    }

    /// The split train step. Default: [`step_graphs`] of `config`.
    fn step_graphs(
        &self,
        config: &DetrConfig,
        batch: usize,
        train: &TrainStepConfig,
        seed: u64,
    ) -> Result<DetrStepGraphs, PretextError> {
        Ok(step_graphs(config, batch, train, seed)?)
    }

    /// Work done once per image before training, cached under
    /// [`PrepareContext::cache_dir`] so that a resumed run does not redo it. Default: none.
    fn prepare(
        &mut self,
        _ctx: &DetrPretextContext,
        _work: &PrepareContext<'_>,
    ) -> Result<(), PretextError> {
        Ok(())
    }

    /// The inputs of one step from the batch's images (`images.len()` is the batch), at `step`
    /// (from 0), with a generator seeded by the run's seed and the step.
    fn batch(
        &self,
        config: &DetrConfig,
        images: &[SampleImage],
        step: u64,
        rng: &mut ChaCha8Rng,
    ) -> Result<DetrBatch, PretextError>;

    /// The optimizer from the common settings, its learning rate scaled to `batch`.
    fn optimizer(&self, batch: usize) -> Result<OptimizerConfig, PretextError> {
        self.settings().optimizer(batch)
    }
}

/// The settings every detector method shares: the optimizer (AdamW, Deformable DETR's lr 2e-4
/// at batch 32, weight decay 1e-4), gradient clipping and the detector's shape (densa's small
/// DETR defaults, [`DetrConfig::new`]).
pub fn detr_hyper() -> Vec<Hyper> {
    let mut h = crate::pretext::settings::common("adamw", 2e-4, 32, 1e-4);
    h.extend([
        Hyper::float(
            "grad_clip",
            0.1,
            "clip gradients to this global norm (DETR's 0.1; 0 = off)",
        ),
        Hyper::int("d_model", 64, "transformer width (DETR: 256)"),
        Hyper::int("heads", 4, "attention heads (DETR: 8)"),
        Hyper::int("encoder_layers", 2, "encoder layers (DETR: 6)"),
        Hyper::int(
            "decoder_layers",
            2,
            "decoder layers, each with its loss (DETR: 6)",
        ),
        Hyper::int("ffn_dim", 256, "feed-forward width (DETR: 2048)"),
        Hyper::int("num_queries", 30, "object queries (DETR: 100)"),
        Hyper::int(
            "feature_stride",
            32,
            "backbone stride the transformer reads: 32 (C5) or 16 (C4, small inputs)",
        ),
    ]);
    h
}

/// The [`DetrConfig`] of [`detr_hyper`]'s settings for `ctx`, one class ([`OBJECT_CLASS`]).
/// Batch norm keeps densa's DETR default (batch statistics, running statistics updated, as
/// PyTorch's `model.train()` with frozen parameters); DetReg and UP-DETR turn it into DETR's
/// `FrozenBatchNorm2d` ([`DetrConfig::train_batch_norm`] false: running statistics).
pub fn detr_config(
    settings: &Settings,
    ctx: &DetrPretextContext,
) -> Result<DetrConfig, PretextError> {
    let mut c = DetrConfig::new(ctx.arch, vec![OBJECT_CLASS.to_string()]);
    c.image_size = ctx.image_size;
    c.d_model = settings.positive("d_model")?;
    c.heads = settings.positive("heads")?;
    c.encoder_layers = settings.i64("encoder_layers").max(0) as usize;
    c.decoder_layers = settings.positive("decoder_layers")?;
    c.ffn_dim = settings.positive("ffn_dim")?;
    c.num_queries = settings.positive("num_queries")?;
    c.feature_stride = settings.positive("feature_stride")? as u32;
    Ok(c)
}

/// The folder of `method`'s per-image cache inside `cache_dir`: `{method}/{key}`, `key` the
/// FNV-1a hash (16 hex digits) of the `settings` named in `keys` with their values. Targets
/// made with other settings (another `proposals`, another encoder path) are never reused, a
/// copied cache included; a different file under the same encoder path is not noticed.
pub fn keyed_cache_dir(
    cache_dir: &Path,
    method: &str,
    settings: &Settings,
    keys: &[&str],
) -> PathBuf {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    for (k, v) in settings.iter().filter(|(k, _)| keys.contains(k)) {
        h.write(format!("{k}={v};").as_bytes());
    }
    cache_dir.join(method).join(format!("{:016x}", h.finish()))
}

/// The weights file a path setting names (DetReg's `encoder`, UP-DETR's and Pair DETR's
/// `backbone`): a `backbone.safetensors`, or a run folder holding one (what `densa pretrain`
/// writes). `None` when the setting is empty; an error naming the setting when the file is
/// not there.
pub fn backbone_file(settings: &Settings, key: &str) -> Result<Option<PathBuf>, PretextError> {
    let given = settings.text(key);
    if given.is_empty() {
        return Ok(None);
    }
    let given = Path::new(given);
    let file = if given.is_dir() {
        given.join("backbone.safetensors")
    } else {
        given.to_path_buf()
    };
    if !file.is_file() {
        return Err(settings.bad(
            key,
            &format!("{} is not a file (a backbone.safetensors)", file.display()),
        ));
    }
    Ok(Some(file))
}

/// The gradient clipping of the settings' `grad_clip` (`None` at 0).
pub fn grad_clip(settings: &Settings) -> Result<Option<f64>, PretextError> {
    let v = settings.checked("grad_clip", |v| v >= 0.0, "must be >= 0")?;
    Ok((v > 0.0).then_some(v))
}

/// Resizes `image` to the square `size` (bilinear), flips it horizontally when `flip`, and
/// normalises `pixel / 255` with `mean`/`std`.
///
/// # Shapes
/// `H x W` RGB -> `[3, size, size]`.
pub fn image_chw(
    image: &RgbImage,
    size: u32,
    flip: bool,
    mean: [f32; 3],
    std: [f32; 3],
) -> ndarray::Array3<f32> {
    let resized = if image.dimensions() == (size, size) {
        image.clone()
    } else {
        image::imageops::resize(image, size, size, image::imageops::FilterType::Triangle)
    };
    let s = size as usize;
    let mut x = ndarray::Array3::<f32>::zeros((3, s, s));
    for (px, py, p) in resized.enumerate_pixels() {
        let col = if flip {
            s - 1 - px as usize
        } else {
            px as usize
        };
        for c in 0..3 {
            x[[c, py as usize, col]] = (p.0[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    x
}

/// A batch of [`image_chw`] images, `flips[i]` for image `i`.
///
/// # Shapes
/// `N` images -> `[N, 3, size, size]`.
pub fn images_tensor(config: &DetrConfig, images: &[&RgbImage], flips: &[bool]) -> Tensor {
    let s = config.image_size as usize;
    let mut x = Array4::<f32>::zeros((images.len(), 3, s, s));
    for (i, img) in images.iter().enumerate() {
        let flip = flips.get(i).copied().unwrap_or(false);
        x.index_axis_mut(ndarray::Axis(0), i).assign(&image_chw(
            img,
            config.image_size,
            flip,
            config.mean,
            config.std,
        ));
    }
    Tensor::F32(x.into_dyn())
}

/// Normalised cxcywh boxes of a horizontally flipped image.
pub fn flip_boxes(boxes: &mut [[f32; 4]]) {
    for b in boxes {
        b[0] = 1.0 - b[0];
    }
}

/// The batch of a method whose targets are prepared once per image (DetReg's and Pair DETR's
/// proposals): each image's targets from `targets_of(index)`, the image and its boxes flipped
/// horizontally with probability 1/2 when `flip`; an image without prepared targets is an
/// error naming `method`.
pub fn prepared_batch<'a>(
    method: &str,
    config: &DetrConfig,
    images: &[SampleImage],
    targets_of: impl Fn(usize) -> Option<&'a ImageTargets>,
    flip: bool,
    rng: &mut ChaCha8Rng,
) -> Result<DetrBatch, PretextError> {
    let mut flips = Vec::with_capacity(images.len());
    let mut targets = Vec::with_capacity(images.len());
    for s in images {
        let mut t = targets_of(s.index)
            .cloned()
            .ok_or_else(|| PretextError::Invalid {
                method: method.into(),
                problem: format!("image {} has no prepared targets", s.index),
            })?;
        let f = flip && rng.random::<bool>();
        if f {
            flip_boxes(&mut t.boxes);
        }
        flips.push(f);
        targets.push(t);
    }
    let refs: Vec<&RgbImage> = images.iter().map(|s| &s.image).collect();
    Ok(DetrBatch {
        images: images_tensor(config, &refs, &flips),
        targets,
        extra: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_resized_flipped_and_normalised() {
        let mut img = RgbImage::new(4, 2);
        img.put_pixel(0, 0, image::Rgb([255, 0, 0]));
        let mut c = DetrConfig::new(Arch::Edge, vec!["object".into()]);
        c.image_size = 4;
        c.mean = [0.5, 0.5, 0.5];
        c.std = [0.5, 0.5, 0.5];
        let square = image::imageops::resize(&img, 4, 4, image::imageops::FilterType::Triangle);
        let t = images_tensor(&c, &[&img, &img], &[false, true]).to_f32();
        assert_eq!(t.shape(), &[2, 3, 4, 4]);
        for y in 0..4 {
            for x in 0..4 {
                let p = square.get_pixel(x, y).0;
                let want = (p[0] as f32 / 255.0 - 0.5) / 0.5;
                assert!((t[[0, 0, y as usize, x as usize]] - want).abs() < 1e-6);
                assert!((t[[1, 0, y as usize, 3 - x as usize]] - want).abs() < 1e-6);
            }
        }
        let mut b = [[0.2, 0.5, 0.1, 0.1]];
        flip_boxes(&mut b);
        assert!((b[0][0] - 0.8).abs() < 1e-6);
    }
}
