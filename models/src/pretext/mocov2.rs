//! MoCo-v2 (Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive
//! Learning"): the baseline every dense method is compared with.
//!
//! Query `q = normalize(head(GAP(backbone(view0))))`, key `k` the same through the momentum
//! encoder on `view1`, loss InfoNCE(q, k, queue; T) with the queue of past keys as negatives;
//! after the step the keys enter the queue and the teacher follows the student by EMA.
//!
//! Our choices: the asymmetric loss of the paper (one direction); no shuffled batch norm (one
//! process: the key encoder normalises with its own batch's statistics, see the module docs of
//! [`super`]); the queue is a FIFO ([`super::ops::enqueue`]).

use densa_exporter::{DType, GraphBuilder};
use densa_runtime::augment::ViewConfig;

use super::ops::{self, MlpHead};
use super::settings::{common, Hyper, Settings};
use super::twin::momentum_twin;
use super::{Family, MethodInfo, Pretext, PretextContext, PretextError};
use crate::backbone::ResNet;
use crate::nn::NormMode;
use crate::train_step::ForwardGraph;

pub static INFO: MethodInfo = MethodInfo {
    name: "mocov2",
    title: "Improved Baselines with Momentum Contrastive Learning",
    paper: "Chen, Fan, Girshick, He; arXiv 2020",
    summary: "global InfoNCE between a query and its momentum-encoder key, queue of negatives",
    hyper,
    create,
    tiny: TINY,
    family: Family::Backbone,
};

/// Small heads and queue for smoke tests (see [`MethodInfo::tiny`]).
pub const TINY: &[(&str, &str)] = &[("queue_size", "8"), ("hidden_dim", "16"), ("dim", "8")];

fn hyper() -> Vec<Hyper> {
    let mut h = common("sgd", 0.03, 256, 1e-4);
    h.push(super::settings::batch_norm());
    h.extend(contrastive_defaults());
    h
}

/// The MoCo-v2 hyperparameters DenseCL, DetCo and RegionCL share.
pub fn contrastive_defaults() -> Vec<Hyper> {
    vec![
        Hyper::float("temperature", 0.2, "InfoNCE temperature"),
        Hyper::int(
            "queue_size",
            65536,
            "negatives kept (shrink for small data: at most the number of images)",
        ),
        Hyper::float("momentum", 0.999, "EMA momentum of the key encoder"),
        Hyper::int("hidden_dim", 2048, "hidden width of the MLP head"),
        Hyper::int("dim", 128, "embedding dimension"),
    ]
}

/// The [`contrastive_defaults`] settings, checked against the batch they are built for.
pub struct Contrastive {
    /// InfoNCE temperature.
    pub temperature: f64,
    /// EMA momentum of the key encoder.
    pub momentum: f64,
    /// Keys in each queue (at least one batch).
    pub queue_size: usize,
    /// Hidden width of the MLP head.
    pub hidden_dim: usize,
    /// Embedding dimension.
    pub dim: usize,
}

impl Contrastive {
    /// Reads and checks the settings; errors name the setting.
    pub fn read(s: &Settings, batch: usize) -> Result<Contrastive, PretextError> {
        let c = Contrastive {
            temperature: s.checked("temperature", |v| v > 0.0, "must be positive")?,
            momentum: s.checked(
                "momentum",
                |v| (0.0..=1.0).contains(&v),
                "must be in [0, 1]",
            )?,
            queue_size: s.positive("queue_size")?,
            hidden_dim: s.positive("hidden_dim")?,
            dim: s.positive("dim")?,
        };
        if c.queue_size < batch {
            return Err(s.bad("queue_size", "must hold at least one batch"));
        }
        Ok(c)
    }
}

fn create(settings: Settings) -> Result<Box<dyn Pretext>, PretextError> {
    Ok(Box::new(MocoV2 { settings }))
}

/// The MoCo-v2 method.
pub struct MocoV2 {
    settings: Settings,
}

/// Views of the MoCo-v2 recipe at `size` pixels: the two views of every MoCo-style method.
pub fn moco_views(size: u32) -> Vec<ViewConfig> {
    let mut v = ViewConfig::moco_v2();
    v.crop.size = (size, size);
    vec![v, v]
}

/// The two view inputs `view0`, `view1` of `[batch, 3, size, size]`.
pub fn two_view_inputs(
    b: &mut GraphBuilder,
    ctx: &PretextContext,
) -> Result<[densa_exporter::Value; 2], PretextError> {
    let shape = || {
        vec![
            ctx.batch.into(),
            3.into(),
            (ctx.image_size as usize).into(),
            (ctx.image_size as usize).into(),
        ]
    };
    Ok([
        b.input("view0", DType::F32, shape())?,
        b.input("view1", DType::F32, shape())?,
    ])
}

impl Pretext for MocoV2 {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn views(&self, image_size: u32) -> Vec<ViewConfig> {
        moco_views(image_size)
    }

    fn build(&self, ctx: &PretextContext) -> Result<ForwardGraph, PretextError> {
        let s = &self.settings;
        let c = Contrastive::read(s, ctx.batch)?;
        let (t, m) = (c.temperature, c.momentum);
        let (k_size, hidden, dim) = (c.queue_size, c.hidden_dim, c.dim);
        let mut b = GraphBuilder::new("mocov2", ctx.seed);
        let [v0, v1] = two_view_inputs(&mut b, ctx)?;
        let c5 = ctx.arch.out_channels()[3];
        let twin = momentum_twin(&mut b, m, |b| -> Result<(ResNet, MlpHead), PretextError> {
            Ok((
                ctx.arch.init(b)?,
                MlpHead::init(b, "head", c5, hidden, dim)?,
            ))
        })?;
        let queue = ops::queue(&mut b, "queue.global", k_size, dim)?;
        let mut mode = self.settings.norm_mode()?;
        let embed = |b: &mut GraphBuilder,
                     (net, head): &(ResNet, MlpHead),
                     x,
                     mode: &mut NormMode|
         -> Result<_, PretextError> {
            let f = net.forward_mode(b, x, mode)?;
            let p = ops::pool(b, &f.c5)?;
            let z = head.forward(b, &p)?;
            Ok(ops::l2_normalize(b, &z, 1)?)
        };
        let q = embed(&mut b, &twin.student, &v0, &mut mode)?;
        let k = embed(&mut b, &twin.teacher, &v1, &mut mode)?;
        let loss = ops::info_nce(&mut b, &q, &k, &queue, t)?;
        let mut state = mode.into_state();
        ops::enqueue(&mut b, &queue, &k, &mut state)?;
        state.extend(twin.ema);
        Ok(ForwardGraph::new(b, loss).norm_state(state))
    }
}
