//! Self-supervised pretext methods: what the papers call "pretraining" a backbone without
//! labels, one module per method (`../shared/METHODS.md` is the digest).
//!
//! A method is a [`Pretext`]: the views it needs of each image ([`Pretext::views`]), the
//! training graph it builds around the backbone ([`Pretext::build`]: heads, momentum encoder,
//! queues, losses, all in ONNX ops so one train step runs on tract or ONNX Runtime), the host
//! work per sample ([`Pretext::host_inputs`]: correspondences from view geometry) and the
//! hyperparameters the host schedules per step ([`Pretext::schedule`]: momentum ramps).
//! [`registry`] lists the methods with their paper titles and default hyperparameters (and
//! their [`Family`]: the detector-pretraining methods implement
//! [`DetrPretext`](crate::detr::pretext::DetrPretext) instead of [`Pretext`]);
//! [`Settings`] resolves user overrides (`--set key=value`, a TOML table) against them.
//!
//! # Conventions (our choices)
//! - The student backbone keeps torchvision's names at the root (`conv1.weight`,
//!   `layer1.0.bn1.running_mean`), heads live under `head.*`, the momentum encoder under
//!   `teacher.*` (buffers: it gets no gradient), queues under `queue.*`. A pretraining
//!   checkpoint's backbone is therefore the state entries with backbone names
//!   ([`backbone_state`]).
//! - The batch size is fixed at build time: queues and per-sample host inputs need it.
//! - Views are batch inputs `view0`, `view1`, ... (`[B, 3, H, W]` each), in the order of
//!   [`Pretext::views`]; host inputs are named by the method.
//! - Momentum encoders compute the keys with the teacher *before* this step's EMA update (the
//!   order of BYOL's and DINO's code; MoCo's code updates first). The update itself is
//!   `k <- m k + (1 - m) q` with the student's parameters before the optimizer step, exactly as
//!   in MoCo, and the keys of step `t` differ from MoCo's by one EMA step.
//! - The learning rate is the paper's value at its reference batch, scaled linearly to the batch
//!   used (`lr * batch / reference_batch`, Goyal et al.), with a cosine decay.

pub mod ccop;
pub mod data;
pub mod densecl;
pub mod densesiam;
pub mod detco;
pub mod lcloss;
pub mod mocov2;
pub mod ops;
pub mod pixpro;
pub mod regioncl;
pub mod registry;
pub mod scfs;
pub mod settings;
pub mod swav;
pub mod twin;

use std::fmt;

use densa_exporter::weights::StateDict;
use densa_exporter::{BuildError, GraphBuilder};
use densa_runtime::augment::{View, ViewConfig};

use crate::backbone::ResNetConfig;
use crate::train_step::{ForwardGraph, OptimizerConfig, TrainStepError};

pub use registry::{create, create_detector, method_info, methods};
pub use settings::{Hyper, HyperValue, Settings};

/// Why a pretext method could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum PretextError {
    #[error("unknown method `{name}`; available: {available}")]
    UnknownMethod { name: String, available: String },
    #[error("{method}: unknown setting `{key}`; settings: {available}")]
    UnknownSetting {
        method: String,
        key: String,
        available: String,
    },
    #[error("{method}: setting `{key}` = `{value}`: {problem}")]
    BadSetting {
        method: String,
        key: String,
        value: String,
        problem: String,
    },
    #[error("{method}: {problem}")]
    Invalid { method: String, problem: String },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Train(#[from] densa_exporter::train::TrainError),
    /// Building the train step (boxed: large and rare).
    #[error(transparent)]
    TrainStep(Box<TrainStepError>),
    /// A detector-pretraining method's DETR (boxed: large and rare).
    #[error(transparent)]
    Detr(Box<crate::detr::DetrError>),
}

impl From<TrainStepError> for PretextError {
    fn from(e: TrainStepError) -> Self {
        PretextError::TrainStep(Box::new(e))
    }
}

impl From<crate::detr::DetrError> for PretextError {
    fn from(e: crate::detr::DetrError) -> Self {
        PretextError::Detr(Box::new(e))
    }
}

/// What a method pretrains, and so which driver runs it.
#[derive(Clone, Copy)]
pub enum Family {
    /// A backbone (a [`Pretext`]: `MethodInfo::create`, `densa pretrain`'s wave-1 driver).
    Backbone,
    /// A whole DETR-family detector (a [`DetrPretext`](crate::detr::pretext::DetrPretext)
    /// built by this function from resolved settings; `densa pretrain` hands the method to its
    /// detector driver). Such methods' `create` is [`detector_only`].
    Detector(fn(Settings) -> Result<Box<dyn crate::detr::pretext::DetrPretext>, PretextError>),
}

impl Family {
    /// `backbone` or `detector` (what `densa methods` prints).
    pub fn name(&self) -> &'static str {
        match self {
            Family::Backbone => "backbone",
            Family::Detector(_) => "detector",
        }
    }

    pub fn is_detector(&self) -> bool {
        matches!(self, Family::Detector(_))
    }
}

impl fmt::Debug for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `MethodInfo::create` of a detector-pretraining method: it has no backbone [`Pretext`].
pub fn detector_only(settings: Settings) -> Result<Box<dyn Pretext>, PretextError> {
    Err(PretextError::Invalid {
        method: settings.method().to_string(),
        problem: "pretrains a whole DETR detector, not a backbone pretext: run it with `densa \
                  pretrain --method NAME` (the detector driver) or `detr::pretext::create`"
            .into(),
    })
}

/// A paper's facts and the method's hyperparameters, as `densa methods` lists them.
pub struct MethodInfo {
    /// Registry name (`densecl`).
    pub name: &'static str,
    /// The paper's title.
    pub title: &'static str,
    /// Authors and venue, short.
    pub paper: &'static str,
    /// One line on what the method does.
    pub summary: &'static str,
    /// The method's own hyperparameters with their reference defaults (the common ones of
    /// [`settings::common`] are added to them).
    pub hyper: fn() -> Vec<Hyper>,
    /// Builds the method from resolved settings.
    pub create: fn(Settings) -> Result<Box<dyn Pretext>, PretextError>,
    /// Overrides that make the method small enough for smoke tests on 2 CPU cores (batch 4,
    /// 32-pixel views, the edge backbone): narrow heads, short queues, few prototypes.
    pub tiny: &'static [(&'static str, &'static str)],
    /// What it pretrains (a backbone, or a whole detector and how to build it).
    pub family: Family,
}

impl fmt::Debug for MethodInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MethodInfo")
            .field("name", &self.name)
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

/// What a method builds for: the backbone and the batch.
#[derive(Clone, Debug)]
pub struct PretextContext {
    /// The backbone's shape.
    pub arch: ResNetConfig,
    /// Images per step (fixed in the graph).
    pub batch: usize,
    /// Side of the large views in pixels (the paper's 224; smaller on small data).
    pub image_size: u32,
    /// Seed of the parameter initialisation.
    pub seed: u64,
}

/// What the data path knows about a sample besides its views ([`Pretext::sample_inputs`]).
#[derive(Clone, Copy, Debug)]
pub struct SampleInfo<'a> {
    /// The decoded image (RGB), before augmentation.
    pub image: &'a image::RgbImage,
    /// The image's index in the data set (stable over a run: a cache key).
    pub index: usize,
    /// Steps completed before this sample's batch.
    pub step: u64,
    /// Steps of the whole run (0 when unknown).
    pub total: u64,
}

/// A self-supervised pretext method (see the module docs).
pub trait Pretext: Send + Sync {
    /// The registry entry.
    fn info(&self) -> &'static MethodInfo;

    /// The resolved hyperparameters.
    fn settings(&self) -> &Settings;

    /// The view recipes of one image, in batch-input order (`view0`, `view1`, ...), for large
    /// views of `image_size` pixels.
    fn views(&self, image_size: u32) -> Vec<ViewConfig>;

    /// The training forward graph: batch inputs `view{k}` and the method's host inputs, the
    /// backbone at the root scope, a scalar loss, buffer updates (EMA, queues, running
    /// statistics) and metrics.
    fn build(&self, ctx: &PretextContext) -> Result<ForwardGraph, PretextError>;

    /// Per-sample host inputs computed from the views (without the batch axis; the loader
    /// stacks them). Default: none.
    fn host_inputs(
        &self,
        _ctx: &PretextContext,
        _views: &[View],
    ) -> Result<Vec<(String, densa_exporter::Tensor)>, PretextError> {
        Ok(Vec::new())
    }

    /// Per-sample host inputs from the views and what the data path knows besides them (the
    /// decoded image, its index, the training step): for methods whose host work needs the
    /// image (CCOP's region proposals) or follows a curriculum (CCOP's box jitter). Default:
    /// [`Pretext::host_inputs`].
    fn sample_inputs(
        &self,
        ctx: &PretextContext,
        _sample: &SampleInfo<'_>,
        views: &[View],
    ) -> Result<Vec<(String, densa_exporter::Tensor)>, PretextError> {
        self.host_inputs(ctx, views)
    }

    /// Whether [`Pretext::prepare_image`] does anything (the driver then runs it over every
    /// image before training, with progress). Default: false.
    fn prepares_images(&self) -> bool {
        false
    }

    /// Per-image work done once and cached by the method under the image's index (CCOP's
    /// selective search). Default: nothing.
    fn prepare_image(&self, _index: usize, _image: &image::RgbImage) -> Result<(), PretextError> {
        Ok(())
    }

    /// Values of hyper inputs other than the learning rate at `step` of `total` (momentum
    /// ramps, temperature warm-ups). Default: none (manifest defaults).
    fn schedule(&self, _step: u64, _total: u64) -> Vec<(String, f64)> {
        Vec::new()
    }

    /// The optimizer from the common settings, its learning rate scaled to `batch`.
    fn optimizer(&self, batch: usize) -> Result<OptimizerConfig, PretextError> {
        self.settings().optimizer(batch)
    }
}

/// The student backbone's entries of a pretraining state, by torchvision name: what
/// `densa finetune --init` and `densa export backbone --weights` read.
pub fn backbone_state(arch: &ResNetConfig, state: &StateDict) -> Result<StateDict, BuildError> {
    let mut b = GraphBuilder::new("names", 0);
    arch.init(&mut b)?;
    let mut out = StateDict::new();
    for p in b.params() {
        if let Some(v) = state.get(&p.name) {
            out.insert(p.name.clone(), v.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
