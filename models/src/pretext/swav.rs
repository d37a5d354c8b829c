//! SwAV (Caron, Misra, Mairal, Goyal, Bojanowski, Joulin; NeurIPS 2020, "Unsupervised Learning
//! of Visual Features by Contrasting Cluster Assignments"): swapped assignment between views.
//!
//! Multi-crop views of each image (`nmb_crops_large` large crops at the context's image size,
//! scale (0.14, 1); `nmb_crops_small` small ones at `round(image_size * 96 / 224)`, scale
//! (0.05, 0.14)) go through the backbone, global average pooling and the projection head
//! (`Linear, BatchNorm1d, ReLU, Linear` to 128), are L2-normalised to `z` and scored against
//! 3000 prototypes `c` (a linear layer without bias): `p = z c^T`. The codes `q` of each large
//! crop come from `sinkhorn_iterations` Sinkhorn-Knopp steps on `exp(p / epsilon)` (no
//! gradient); every other crop predicts them: the loss for large crop `i` is
//! `-mean_b sum_k q_i log softmax(p_v / temperature)` averaged over the other crops `v`, then
//! averaged over the large crops (SwAV's `main_swav.py`).
//!
//! # Our choices
//! - **Prototype normalisation in the graph.** SwAV re-normalises the prototype rows in place
//!   before every step; we keep the raw parameter and use `normalize(c)` in the forward. The
//!   prototypes the loss sees are the same unit vectors; the gradient reaching the raw
//!   parameter is SwAV's gradient projected onto the sphere's tangent (the radial part is
//!   dropped) and divided by the row norm, so the trajectories differ slightly.
//! - **Prototype freezing** (SwAV's `freeze_prototypes_niters`: the prototype gradient is
//!   dropped for the first iterations) is the hyper input `swav.prototype_grad`, scheduled 0
//!   for the first `freeze_prototypes_steps` steps and 1 after: the prototypes used are
//!   `stopgrad(c) + s * (c - stopgrad(c))`, the same value, gradient scaled by `s`. PyTorch's
//!   `p.grad = None` also skips the optimizer; ours still applies weight decay to the
//!   zero-gradient prototypes (LARS: `lr * weight_decay * c` per step, 1e-6 relative).
//! - **Queue** (`queue_length > 0`): one zero-initialised FIFO buffer per large crop
//!   (`queue.swav.{i}`, `[queue_length, dim]`), filled with that crop's embeddings once the
//!   hyper input `swav.queue_on` is 1 (scheduled from `queue_start_steps`, SwAV's
//!   `epoch_queue_starts` in steps); its rows are scored with the prototypes and put before the
//!   batch's scores for Sinkhorn once the queue is full (SwAV's test: its last row is non-zero).
//!   Sinkhorn masks the queue columns while the queue is not full, which gives exactly the
//!   batch-only codes.
//! - Batch norm runs once per crop resolution (as SwAV's multi-resolution forward does); the
//!   running statistics are updated twice per step, in that order ([`chain_norm_state`]).
//! - Optimizer: LARS at SwAV's lr 4.8 for batch 4096, weight decay 1e-6 (`common` settings).
//!   SwAV's Apex LARC adapts every parameter; densa's train step excludes biases and
//!   normalisation parameters from LARS's decay and adaptation by default (see
//!   [`crate::train_step`]). No final-lr floor (SwAV: 0.0048) and no warm-up by default.
//! - One process: Sinkhorn runs in the graph (the single-process `distributed_sinkhorn`).
//!   Data parallel (`mpirun -np N densa pretrain --method swav`): the gradient graph is cut
//!   before the codes and the host computes them over every rank's scores with all-reduced
//!   sums, SwAV's `distributed_sinkhorn` ([`densa_runtime::train::sinkhorn_codes`]). The queue
//!   is gathered from every rank (one queue of the global batch's embeddings, counted once)
//!   where SwAV keeps one queue per GPU of `queue_length / world_size` rows.

use densa_exporter::builder::attr;
use densa_exporter::train::Fragment;
use densa_exporter::{BuildError, DType, GraphBuilder, Init, ParamKind, Value};
use densa_runtime::augment::{MultiCropConfig, ViewConfig};
use densa_runtime::train::manifest::{SinkhornExchange, SinkhornStage};

use super::ops::{self, Linear};
use super::settings::{common, Hyper, Settings};
use super::{Family, MethodInfo, Pretext, PretextContext, PretextError};
use crate::backbone::ResNet;
use crate::nn::{BatchNorm2d, BatchNorm2dConfig, NormMode};
use crate::train_step::ForwardGraph;

pub static INFO: MethodInfo = MethodInfo {
    name: "swav",
    title: "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
    paper: "Caron, Misra, Mairal, Goyal, Bojanowski, Joulin; NeurIPS 2020",
    summary: "multi-crop; each crop predicts the Sinkhorn-Knopp prototype codes of the other views",
    hyper,
    create,
    tiny: TINY,
    family: Family::Backbone,
};

/// Small head, few prototypes, a short queue (see [`MethodInfo::tiny`]).
pub const TINY: &[(&str, &str)] = &[
    ("hidden_mlp", "16"),
    ("dim", "8"),
    ("nmb_prototypes", "10"),
    ("nmb_crops_small", "2"),
    ("queue_length", "8"),
    ("freeze_prototypes_steps", "1"),
];

/// Name of the prototype-gradient scale hyper input.
pub const PROTOTYPE_GRAD: &str = "swav.prototype_grad";
/// Name of the queue switch hyper input (present when `queue_length > 0`).
pub const QUEUE_ON: &str = "swav.queue_on";

fn hyper() -> Vec<Hyper> {
    let mut h = common("lars", 4.8, 4096, 1e-6);
    h.push(super::settings::batch_norm());
    h.extend([
        Hyper::int(
            "nmb_crops_large",
            2,
            "large crops (the ones codes are computed for)",
        ),
        Hyper::int("nmb_crops_small", 6, "small crops"),
        Hyper::float(
            "small_crop_ratio",
            96.0 / 224.0,
            "side of the small crops relative to image_size (96/224)",
        ),
        Hyper::float("large_scale_min", 0.14, "min area fraction of large crops"),
        Hyper::float("large_scale_max", 1.0, "max area fraction of large crops"),
        Hyper::float("small_scale_min", 0.05, "min area fraction of small crops"),
        Hyper::float("small_scale_max", 0.14, "max area fraction of small crops"),
        Hyper::int("hidden_mlp", 2048, "hidden width of the projection head"),
        Hyper::int("dim", 128, "embedding dimension (feat_dim)"),
        Hyper::int("nmb_prototypes", 3000, "number of prototypes"),
        Hyper::float(
            "temperature",
            0.1,
            "softmax temperature of the swapped prediction",
        ),
        Hyper::float("epsilon", 0.05, "Sinkhorn-Knopp entropy regularisation"),
        Hyper::int("sinkhorn_iterations", 3, "Sinkhorn-Knopp iterations"),
        Hyper::int(
            "freeze_prototypes_steps",
            313,
            "steps with no prototype gradient (SwAV: 313 iterations, one epoch at batch 4096)",
        ),
        Hyper::int(
            "queue_length",
            0,
            "embeddings queued per large crop (0: none; SwAV advises 3840 for small batches)",
        ),
        Hyper::int(
            "queue_start_steps",
            0,
            "step from which the queue fills (SwAV: epoch_queue_starts = 15 epochs)",
        ),
    ]);
    h
}

fn create(settings: Settings) -> Result<Box<dyn Pretext>, PretextError> {
    Ok(Box::new(Swav { settings }))
}

/// The SwAV method.
pub struct Swav {
    settings: Settings,
}

/// Multi-crop views: `n_large` copies of `large` then `n_small` of `small`, as `ViewConfig`s.
pub fn multi_crop_views(mc: &MultiCropConfig) -> Vec<ViewConfig> {
    let mut v = vec![mc.large; mc.n_large];
    v.extend(std::iter::repeat_n(mc.small, mc.n_small));
    v
}

/// The side of a small crop: `round(image_size * ratio)`, at least 1.
pub fn small_crop_size(image_size: u32, ratio: f64) -> u32 {
    ((image_size as f64 * ratio).round() as u32).max(1)
}

/// The view inputs `view{first}..view{first + n}` of `[batch, 3, size, size]`, concatenated
/// along the batch axis (`[n * batch, 3, size, size]`, crop-major as SwAV's `torch.cat`).
pub fn crop_group_input(
    b: &mut GraphBuilder,
    batch: usize,
    size: u32,
    first: usize,
    n: usize,
) -> Result<Value, PretextError> {
    let s = size as usize;
    let mut views = Vec::with_capacity(n);
    for k in first..first + n {
        views.push(b.input(
            &format!("view{k}"),
            DType::F32,
            vec![batch.into(), 3.into(), s.into(), s.into()],
        )?);
    }
    if views.len() == 1 {
        return Ok(views.pop().expect("one view"));
    }
    let refs: Vec<&Value> = views.iter().collect();
    Ok(b.concat(&refs, 0)?)
}

/// `x` with its gradient scaled by the scalar float32 `scale`: `stopgrad(x) + scale * (x -
/// stopgrad(x))` (the value is `x`). Returns the value and the `Identity` to register with
/// [`ForwardGraph::stop_gradient`].
pub fn scale_gradient(
    b: &mut GraphBuilder,
    x: &Value,
    scale: &Value,
) -> Result<(Value, Value), BuildError> {
    let frozen = b.unary("Identity", x);
    let d = b.sub(x, &frozen)?;
    let d = b.mul(&d, scale)?;
    Ok((b.add(&frozen, &d)?, frozen))
}

/// Batch norm over the features of `[N, C]` (PyTorch's `BatchNorm1d` in a head), through a
/// `BatchNorm2d` on `[N, C, 1, 1]`: the same statistics and parameters.
pub fn batch_norm_1d(
    b: &mut GraphBuilder,
    bn: &BatchNorm2d,
    x: &Value,
    mode: &mut NormMode,
) -> Result<Value, PretextError> {
    let d = ops::dims(b, x)?;
    let x4 = b.reshape(x, &[d[0] as i64, d[1] as i64, 1, 1])?;
    let y = bn.forward_mode(b, &x4, mode)?;
    Ok(b.reshape(&y, &[d[0] as i64, d[1] as i64])?)
}

/// SwAV's projection head `Linear (in -> hidden), BatchNorm1d, ReLU, Linear (hidden -> dim)`:
/// `{name}.0.*`, `{name}.1.*`, `{name}.3.*` (PyTorch's `Sequential` numbering).
#[derive(Clone, Debug)]
pub struct SwavHead {
    pub fc1: Linear,
    pub bn: BatchNorm2d,
    pub fc2: Linear,
}

impl SwavHead {
    pub fn init(
        b: &mut GraphBuilder,
        name: &str,
        inp: usize,
        hidden: usize,
        out: usize,
    ) -> Result<SwavHead, BuildError> {
        b.scoped(name, |b| {
            Ok(SwavHead {
                fc1: Linear::init(b, "0", inp, hidden, true)?,
                bn: BatchNorm2dConfig::new(hidden).init(b, "1")?,
                fc2: Linear::init(b, "3", hidden, out, true)?,
            })
        })
    }

    /// # Shapes
    /// `[N, in] -> [N, out]`.
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
        mode: &mut NormMode,
    ) -> Result<Value, PretextError> {
        let h = self.fc1.forward(b, x)?;
        let h = batch_norm_1d(b, &self.bn, &h, mode)?;
        let h = b.relu(&h);
        Ok(self.fc2.forward(b, &h)?)
    }
}

/// Sinkhorn-Knopp codes of `scores [N, K]` (samples x prototypes), SwAV's
/// `distributed_sinkhorn` on one process, written on the transpose: `Q = exp(scores /
/// epsilon)`, `Q /= sum(Q)`, then `iterations` times { each prototype's column divided by its
/// sum and by `K`; each sample's row divided by its sum and by `B` }, finally `Q *= B`.
///
/// `mask` (`[N, 1]`, 1 or 0) leaves out samples: their rows are zero, `B` is the number of
/// kept rows, and the kept rows' codes equal the codes of the kept rows alone. `count` is that
/// `B` (a float32 scalar) when `mask` is given.
///
/// # Shapes
/// `scores [N, K] -> codes [N, K]`.
pub fn sinkhorn_codes(
    b: &mut GraphBuilder,
    scores: &Value,
    epsilon: f64,
    iterations: usize,
    mask: Option<(&Value, &Value)>,
) -> Result<Value, BuildError> {
    let d = ops::dims(b, scores)?;
    let inv_eps = b.const_f32((1.0 / epsilon) as f32);
    let q = b.mul(scores, &inv_eps)?;
    let mut q = b.unary("Exp", &q);
    let (count, unmasked) = match mask {
        Some((m, count)) => {
            q = b.mul(&q, m)?;
            // Masked rows sum to 0; dividing them by (0 + 1) keeps them 0 and the kept rows'
            // sums unchanged.
            let one = b.const_f32(1.0);
            (count.clone(), Some(b.sub(&one, m)?))
        }
        None => (b.const_f32(d[0] as f32), None),
    };
    let k = b.const_f32(d[1] as f32);
    let total = b.reduce_sum(&q, &[], false)?;
    q = b.div(&q, &total)?;
    for _ in 0..iterations {
        let per_prototype = b.reduce_sum(&q, &[0], true)?;
        q = b.div(&q, &per_prototype)?;
        q = b.div(&q, &k)?;
        let mut per_sample = b.reduce_sum(&q, &[1], true)?;
        if let Some(u) = &unmasked {
            per_sample = b.add(&per_sample, u)?;
        }
        q = b.div(&q, &per_sample)?;
        q = b.div(&q, &count)?;
    }
    b.mul(&q, &count)
}

/// `-mean_n sum_k codes * log_softmax(scores / temperature)`: one term of the swapped
/// prediction.
///
/// # Shapes
/// `codes, scores [N, K] -> []`.
pub fn swapped_term(
    b: &mut GraphBuilder,
    codes: &Value,
    scores: &Value,
    temperature: f64,
) -> Result<Value, BuildError> {
    let inv_t = b.const_f32((1.0 / temperature) as f32);
    let x = b.mul(scores, &inv_t)?;
    let logp = b.node1(
        "LogSoftmax",
        None,
        &[&x],
        vec![attr::int("axis", 1)],
        DType::F32,
        x.shape().to_vec(),
    );
    let p = b.mul(codes, &logp)?;
    let s = b.reduce_sum(&p, &[1], false)?;
    let m = b.reduce_mean(&s, &[0], false)?;
    Ok(b.neg(&m))
}

/// What [`swav_loss`] built.
pub struct SwavLoss {
    /// The scalar loss.
    pub loss: Value,
    /// The codes of each large crop `[B, K]`.
    pub codes: Vec<Value>,
    /// Values to register with [`ForwardGraph::stop_gradient`] (Sinkhorn's inputs).
    pub detached: Vec<Value>,
    /// Each large crop's Sinkhorn problem by value names, for data-parallel training
    /// ([`ForwardGraph::host_sinkhorn`]).
    pub stages: Vec<SinkhornStage>,
}

/// A large crop's queue for [`swav_loss`]: the queue's scores `[L, K]` against the
/// prototypes, and whether it is used (float32 scalar 1 or 0).
pub struct QueueScores {
    pub scores: Value,
    pub used: Value,
}

/// SwAV's loss over `scores [(n_crops) * B, K]` (crop-major): codes for the first `n_large`
/// crops (Sinkhorn on their detached scores, after their queue's scores if any), each predicted
/// by every other crop; `sum_i sum_{v != i} term(q_i, p_v) / (n_crops - 1) / n_large`.
///
/// # Shapes
/// `scores [V * B, K]`; queue scores `[L, K]`; loss `[]`.
#[allow(clippy::too_many_arguments)]
pub fn swav_loss(
    b: &mut GraphBuilder,
    scores: &Value,
    batch: usize,
    n_large: usize,
    queues: &[QueueScores],
    temperature: f64,
    epsilon: f64,
    iterations: usize,
) -> Result<SwavLoss, BuildError> {
    let d = ops::dims(b, scores)?;
    let n_crops = d[0] / batch;
    if n_crops * batch != d[0] || n_crops < 2 || n_large == 0 || n_large > n_crops {
        return Err(b.op_error(
            "swav",
            format!(
                "scores {d:?} don't hold {n_large} large crops of {batch} among at least 2 crops"
            ),
        ));
    }
    let crops: Vec<Value> = (0..n_crops)
        .map(|v| ops::slice(b, scores, 0, v * batch, (v + 1) * batch))
        .collect::<Result<_, _>>()?;
    let mut codes = Vec::new();
    let mut detached = Vec::new();
    let mut stages = Vec::new();
    let mut total: Option<Value> = None;
    for i in 0..n_large {
        let (out, mask) = match queues.get(i) {
            Some(q) => {
                let l = ops::dims(b, &q.scores)?[0];
                let cat = b.concat(&[&q.scores, &crops[i]], 0)?;
                // Row mask: queue rows count only when the queue is used.
                let ones = b.const_f32(1.0);
                let ql = b.reshape(&q.used, &[1, 1])?;
                let qshape = b.const_i64(&[l as i64, 1]);
                let qrows = b.node1(
                    "Expand",
                    None,
                    &[&ql, &qshape],
                    vec![],
                    DType::F32,
                    vec![l.into(), 1.into()],
                );
                let bshape = b.const_i64(&[batch as i64, 1]);
                let brows = b.node1(
                    "Expand",
                    None,
                    &[&ones, &bshape],
                    vec![],
                    DType::F32,
                    vec![batch.into(), 1.into()],
                );
                let mask = b.concat(&[&qrows, &brows], 0)?;
                let lf = b.const_f32(l as f32);
                let extra = b.mul(&q.used, &lf)?;
                let bf = b.const_f32(batch as f32);
                let count = b.add(&bf, &extra)?;
                (cat, Some((mask, count, l)))
            }
            None => (crops[i].clone(), None),
        };
        let frozen = b.unary("Identity", &out);
        detached.push(frozen.clone());
        let q = match &mask {
            Some((m, count, l)) => {
                let all = sinkhorn_codes(b, &frozen, epsilon, iterations, Some((m, count)))?;
                ops::slice(b, &all, 0, *l, l + batch)?
            }
            None => sinkhorn_codes(b, &frozen, epsilon, iterations, None)?,
        };
        stages.push(SinkhornStage {
            scores: frozen.name().to_string(),
            queue_rows: mask.as_ref().map_or(0, |(_, _, l)| *l),
            queue_used: queues.get(i).map(|q| q.used.name().to_string()),
            codes: q.name().to_string(),
        });
        let mut sub: Option<Value> = None;
        for (v, p) in crops.iter().enumerate() {
            if v == i {
                continue;
            }
            let t = swapped_term(b, &q, p, temperature)?;
            sub = Some(match sub {
                Some(s) => b.add(&s, &t)?,
                None => t,
            });
        }
        let sub = sub.expect("at least one other crop");
        let w = b.const_f32(1.0 / ((n_crops - 1) * n_large) as f32);
        let sub = b.mul(&sub, &w)?;
        total = Some(match total {
            Some(s) => b.add(&s, &sub)?,
            None => sub,
        });
        codes.push(q);
    }
    let loss = b.reshape(&total.expect("n_large >= 1"), &[1])?;
    Ok(SwavLoss {
        loss,
        codes,
        detached,
        stages,
    })
}

/// A large crop's queue: a zero-initialised `[length, D]` buffer `name` whose rows are scored
/// against the prototypes (`protos_t`, `[D, K]`) and used once full (SwAV's test: its last row
/// is not all zeros); while `on` (a boolean scalar) it takes the crop's embeddings `z` `[B, D]`
/// in front, FIFO, recorded in `state`.
pub fn crop_queue(
    b: &mut GraphBuilder,
    name: &str,
    length: usize,
    protos_t: &Value,
    z: &Value,
    on: &Value,
    state: &mut Fragment,
) -> Result<QueueScores, PretextError> {
    let dim = ops::dims(b, z)?[1];
    let queue = b.param(name, &[length, dim], Init::Zeros, ParamKind::Buffer)?;
    let last = ops::slice(b, &queue, 0, length - 1, length)?;
    let mag = b.abs(&last);
    let mag = b.reduce_sum(&mag, &[], false)?;
    let zero = b.const_f32(0.0);
    let full = b.greater(&mag, &zero)?;
    let used = b.cast(&full, DType::F32);
    let scores = ops::matmul(b, &queue, protos_t)?;
    let mut fifo = Fragment::default();
    ops::enqueue(b, &queue, z, &mut fifo)?;
    let filled = fifo
        .next_of(queue.name())
        .expect("enqueue records it")
        .clone();
    let next = b.select(on, &filled, &queue)?;
    state.update(queue.name(), next);
    Ok(QueueScores { scores, used })
}

/// The resolved settings SwAV builds with.
struct Resolved {
    n_large: usize,
    n_small: usize,
    hidden: usize,
    dim: usize,
    prototypes: usize,
    temperature: f64,
    epsilon: f64,
    iterations: usize,
    queue_length: usize,
}

impl Swav {
    fn resolved(&self) -> Result<Resolved, PretextError> {
        let s = &self.settings;
        let n_large = s.positive("nmb_crops_large")?;
        let small = s.i64("nmb_crops_small");
        if small < 0 {
            return Err(s.bad("nmb_crops_small", "must be >= 0"));
        }
        let n_small = small as usize;
        if n_large + n_small < 2 {
            return Err(s.bad("nmb_crops_small", "SwAV needs at least two crops in all"));
        }
        let queue = s.i64("queue_length");
        if queue < 0 {
            return Err(s.bad("queue_length", "must be >= 0"));
        }
        if s.i64("freeze_prototypes_steps") < 0 {
            return Err(s.bad("freeze_prototypes_steps", "must be >= 0"));
        }
        if s.i64("queue_start_steps") < 0 {
            return Err(s.bad("queue_start_steps", "must be >= 0"));
        }
        Ok(Resolved {
            n_large,
            n_small,
            hidden: s.positive("hidden_mlp")?,
            dim: s.positive("dim")?,
            prototypes: s.positive("nmb_prototypes")?,
            temperature: s.checked("temperature", |v| v > 0.0, "must be positive")?,
            epsilon: s.checked("epsilon", |v| v > 0.0, "must be positive")?,
            iterations: s.positive("sinkhorn_iterations")?,
            queue_length: queue as usize,
        })
    }

    fn multi_crop(&self, image_size: u32) -> Result<MultiCropConfig, PretextError> {
        let s = &self.settings;
        let r = self.resolved()?;
        let scale = |lo: &str, hi: &str| -> Result<(f64, f64), PretextError> {
            let (a, c) = (s.f64(lo), s.f64(hi));
            if !(a > 0.0 && a <= c && c <= 1.0) {
                return Err(s.bad(lo, &format!("need 0 < {lo} <= {hi} <= 1")));
            }
            Ok((a, c))
        };
        let ratio = s.checked("small_crop_ratio", |v| v > 0.0, "must be positive")?;
        let mut mc = MultiCropConfig::swav();
        mc.n_large = r.n_large;
        mc.n_small = r.n_small;
        mc.large.crop.size = (image_size, image_size);
        mc.large.crop.scale = scale("large_scale_min", "large_scale_max")?;
        let small = small_crop_size(image_size, ratio);
        mc.small.crop.size = (small, small);
        mc.small.crop.scale = scale("small_scale_min", "small_scale_max")?;
        Ok(mc)
    }
}

impl Pretext for Swav {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn views(&self, image_size: u32) -> Vec<ViewConfig> {
        // Settings are checked again (with errors) by `build`; fall back to the recipe.
        let mc = self.multi_crop(image_size).unwrap_or_else(|_| {
            let mut mc = MultiCropConfig::swav();
            mc.large.crop.size = (image_size, image_size);
            let s = small_crop_size(image_size, 96.0 / 224.0);
            mc.small.crop.size = (s, s);
            mc
        });
        multi_crop_views(&mc)
    }

    fn schedule(&self, step: u64, _total: u64) -> Vec<(String, f64)> {
        let freeze = self.settings.i64("freeze_prototypes_steps").max(0) as u64;
        let mut out = vec![(
            PROTOTYPE_GRAD.to_string(),
            if step < freeze { 0.0 } else { 1.0 },
        )];
        if self.settings.i64("queue_length") > 0 {
            let start = self.settings.i64("queue_start_steps").max(0) as u64;
            out.push((QUEUE_ON.to_string(), if step >= start { 1.0 } else { 0.0 }));
        }
        out
    }

    fn build(&self, ctx: &PretextContext) -> Result<ForwardGraph, PretextError> {
        let r = self.resolved()?;
        let mc = self.multi_crop(ctx.image_size)?;
        let bsz = ctx.batch;
        if r.queue_length > 0 && r.queue_length < bsz {
            return Err(self
                .settings
                .bad("queue_length", "must hold at least one batch"));
        }
        let mut b = GraphBuilder::new("swav", ctx.seed);
        let large = crop_group_input(&mut b, bsz, mc.large.crop.size.0, 0, r.n_large)?;
        let small = if r.n_small > 0 {
            Some(crop_group_input(
                &mut b,
                bsz,
                mc.small.crop.size.0,
                r.n_large,
                r.n_small,
            )?)
        } else {
            None
        };
        let c5 = ctx.arch.out_channels()[3];
        let net: ResNet = ctx.arch.init(&mut b)?;
        let head = SwavHead::init(&mut b, "head.projection", c5, r.hidden, r.dim)?;
        let protos = b.param(
            "head.prototypes.weight",
            &[r.prototypes, r.dim],
            Init::KaimingUniformFanIn,
            ParamKind::Param,
        )?;
        let mut hyper = Fragment::default();
        let freeze = self.settings.i64("freeze_prototypes_steps");
        let grad_scale =
            hyper.hyperparameter(&mut b, PROTOTYPE_GRAD, if freeze > 0 { 0.0 } else { 1.0 })?;
        let grad_scale = b.cast(&grad_scale, DType::F32);
        let (protos_used, protos_frozen) = scale_gradient(&mut b, &protos, &grad_scale)?;
        let protos_n = ops::l2_normalize(&mut b, &protos_used, 1)?;
        let protos_t = ops::transpose(&mut b, &protos_n, &[1, 0])?;

        let embed = |b: &mut GraphBuilder, x: &Value, mode: &mut NormMode| {
            let f = net.forward_mode(b, x, mode)?;
            let p = ops::pool(b, &f.c5)?;
            let z = head.forward(b, &p, mode)?;
            Ok::<_, PretextError>(ops::l2_normalize(b, &z, 1)?)
        };
        let mut mode_large = self.settings.norm_mode()?;
        let z_large = embed(&mut b, &large, &mut mode_large)?;
        let mut norm = mode_large.into_state();
        let z = match &small {
            Some(x) => {
                let mut mode_small = self.settings.norm_mode()?;
                let z_small = embed(&mut b, x, &mut mode_small)?;
                norm = ops::chain_norm_state(&mut b, norm, mode_small.into_state(), 0.1)?;
                b.concat(&[&z_large, &z_small], 0)?
            }
            None => z_large.clone(),
        };
        let scores = ops::matmul(&mut b, &z, &protos_t)?;

        let mut queues = Vec::new();
        if r.queue_length > 0 {
            let on = hyper.hyperparameter(
                &mut b,
                QUEUE_ON,
                if self.settings.i64("queue_start_steps") == 0 {
                    1.0
                } else {
                    0.0
                },
            )?;
            let on_bool = {
                let half = b.const_scalar(DType::F64, 0.5)?;
                b.greater(&on, &half)?
            };
            for i in 0..r.n_large {
                let zi = ops::slice(&mut b, &z_large, 0, i * bsz, (i + 1) * bsz)?;
                queues.push(crop_queue(
                    &mut b,
                    &format!("queue.swav.{i}"),
                    r.queue_length,
                    &protos_t,
                    &zi,
                    &on_bool,
                    &mut norm,
                )?);
            }
        }
        let out = swav_loss(
            &mut b,
            &scores,
            bsz,
            r.n_large,
            &queues,
            r.temperature,
            r.epsilon,
            r.iterations,
        )?;
        norm.extend(hyper);
        let mut g = ForwardGraph::new(b, out.loss)
            .norm_state(norm)
            .stop_gradient(&protos_frozen)
            .host_sinkhorn(SinkhornExchange {
                epsilon: r.epsilon,
                iterations: r.iterations,
                stages: out.stages,
            });
        for d in &out.detached {
            g = g.stop_gradient(d);
        }
        Ok(g)
    }
}

#[cfg(test)]
#[path = "swav_tests.rs"]
mod tests;
