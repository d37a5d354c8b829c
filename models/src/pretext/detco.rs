//! DetCo (Xie, Ding, Wang, Zhan, Xu, Sun, Li, Luo; ICCV 2021, "DetCo: Unsupervised Contrastive
//! Learning for Object Detection"), whose pretext code is unreleased: this module is our
//! reading of the paper.
//!
//! MoCo-v2 made multi-level and global-local. Every backbone stage (Res2..Res5) gets its own
//! contrastive heads and queues, and the level losses are summed with weights 0.1, 0.4, 0.7,
//! 1.0. Each view has a *global* input (the view itself) and a *local* one (a 3x3 jigsaw of
//! patches of the view, each patch encoded by the same backbone; per stage the pooled features
//! of the nine patches are concatenated and passed through an MLP). Per level `l`:
//! `L_l = InfoNCE(q_g, k_g) + InfoNCE(q_l, k_l) + InfoNCE(q_g, k_l)` (global-global,
//! local-local, global-local), each against its own queue; `L = sum_l w_l L_l`.
//!
//! # Our choices (the paper leaves them open or has no code)
//! - Patches are cut on the host from each MoCo-v2 view (host inputs `patches0`, `patches1`,
//!   `[9, 3, p, p]` per sample): `p = round(V / 3)` for views of `V` pixels, patch `(r, c)` at
//!   offset `(o_r, o_c)` with `o_j = min(round(j V / 3), V - p)` (neighbours share a pixel row
//!   when `3 p > V`; one row is left out when `3 p < V`, e.g. `V = 64`). At `V = 32` the patches are 11 pixels, which the ResNets take (their
//!   last map is 1x1), so no resizing is needed. The paper follows PIRL's jigsaw (crops of a
//!   255-pixel resize); we cut the 224-pixel view directly.
//! - Patch order: raster order by default, so the concatenation keeps positions; with
//!   `shuffle_patches` every view's nine patches are permuted at random (PIRL's jigsaw),
//!   deterministically per sample (the generator is seeded by the views' geometry).
//! - The global-local term contrasts the global query with the local key of the other view
//!   (`q_g` vs `k_l`); its queue holds past local keys (a queue of its own, as the paper says,
//!   fed the same keys as the local-local queue).
//! - Global and local heads are separate MLPs per level (`head.global.{l}`, `head.local.{l}`,
//!   MoCo-v2's `fc, ReLU, fc`; the local one takes `9 C_l` inputs). Queues are
//!   `queue.res{l}.{gg,ll,gl}`.
//! - The backbone's passes over the patches normalise with their own batch statistics but do
//!   not update the running statistics (each encoder's view pass does, once per step).

use densa_exporter::builder::Dim;
use densa_exporter::{DType, GraphBuilder, Tensor, Value};
use densa_runtime::augment::{View, ViewConfig};
use ndarray::{s, Array3, Array4};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::mocov2::{contrastive_defaults, moco_views, two_view_inputs, Contrastive};
use super::ops::{self, MlpHead};
use super::regioncl::geometry_rng;
use super::settings::{common, Hyper, Settings};
use super::twin::momentum_twin;
use super::{Family, MethodInfo, Pretext, PretextContext, PretextError};
use crate::backbone::ResNet;
use crate::nn::NormMode;
use crate::train_step::ForwardGraph;

pub static INFO: MethodInfo = MethodInfo {
    name: "detco",
    title: "DetCo: Unsupervised Contrastive Learning for Object Detection",
    paper: "Xie, Ding, Wang, Zhan, Xu, Sun, Li, Luo; ICCV 2021",
    summary: "multi-level (Res2..Res5) global and local (3x3 jigsaw) InfoNCE",
    hyper,
    create,
    tiny: TINY,
    family: Family::Backbone,
};

/// Small heads and queues for smoke tests (see [`MethodInfo::tiny`]).
pub const TINY: &[(&str, &str)] = &[("queue_size", "8"), ("hidden_dim", "16"), ("dim", "8")];

/// Patches per side of the jigsaw.
pub const GRID: usize = 3;
/// Patches per view.
pub const PATCHES: usize = GRID * GRID;

/// Stage names and the keys of their loss weights.
const LEVELS: [(&str, &str); 4] = [
    ("res2", "weight_res2"),
    ("res3", "weight_res3"),
    ("res4", "weight_res4"),
    ("res5", "weight_res5"),
];

fn hyper() -> Vec<Hyper> {
    let mut h = common("sgd", 0.03, 256, 1e-4);
    h.push(super::settings::batch_norm());
    h.extend(contrastive_defaults());
    h.push(Hyper::float(
        "weight_res2",
        0.1,
        "loss weight of stage Res2",
    ));
    h.push(Hyper::float(
        "weight_res3",
        0.4,
        "loss weight of stage Res3",
    ));
    h.push(Hyper::float(
        "weight_res4",
        0.7,
        "loss weight of stage Res4",
    ));
    h.push(Hyper::float(
        "weight_res5",
        1.0,
        "loss weight of stage Res5",
    ));
    h.push(Hyper::bool(
        "shuffle_patches",
        false,
        "permute each view's nine jigsaw patches at random (PIRL's jigsaw)",
    ));
    h
}

fn create(settings: Settings) -> Result<Box<dyn Pretext>, PretextError> {
    Ok(Box::new(DetCo { settings }))
}

/// The DetCo method.
pub struct DetCo {
    settings: Settings,
}

/// Side of a jigsaw patch of a view of `size` pixels: `round(size / 3)`.
pub fn patch_size(size: usize) -> usize {
    ((size as f64 / GRID as f64).round() as usize).max(1)
}

/// Offset of patch row or column `j` in a view of `size` pixels.
pub fn patch_offset(j: usize, size: usize) -> usize {
    let p = patch_size(size);
    ((j as f64 * size as f64 / GRID as f64).round() as usize).min(size - p)
}

/// The nine patches of `pixels [3, H, W]` in raster order, or permuted by `rng`: patch `k`
/// of the output is grid patch `order[k]` (returned).
///
/// # Shapes
/// `[3, H, W] -> [9, 3, round(H / 3), round(W / 3)]`.
pub fn jigsaw_patches(
    pixels: &Array3<f32>,
    rng: Option<&mut ChaCha8Rng>,
) -> (Array4<f32>, Vec<usize>) {
    let (c, h, w) = pixels.dim();
    let (ph, pw) = (patch_size(h), patch_size(w));
    let mut order: Vec<usize> = (0..PATCHES).collect();
    if let Some(rng) = rng {
        order.shuffle(rng);
    }
    let mut out = Array4::zeros((PATCHES, c, ph, pw));
    for (k, &g) in order.iter().enumerate() {
        let (y, x) = (patch_offset(g / GRID, h), patch_offset(g % GRID, w));
        out.slice_mut(s![k, .., .., ..])
            .assign(&pixels.slice(s![.., y..y + ph, x..x + pw]));
    }
    (out, order)
}

/// The embeddings of one level: global and local queries (student, first view) and keys
/// (teacher, second view), each `[N, D]`, L2-normalised.
pub struct LevelEmbeddings {
    pub q_global: Value,
    pub q_local: Value,
    pub k_global: Value,
    pub k_local: Value,
}

/// The queues of one level: global-global, local-local, global-local, each `[K, D]`.
pub struct LevelQueues {
    pub gg: Value,
    pub ll: Value,
    pub gl: Value,
}

/// `sum_l w_l (InfoNCE(q_g, k_g; gg) + InfoNCE(q_l, k_l; ll) + InfoNCE(q_g, k_l; gl))` and the
/// unweighted per-level losses.
///
/// # Shapes
/// Embeddings `[N, D]`, queues `[K, D]` -> scalars.
pub fn multi_level_loss(
    b: &mut GraphBuilder,
    levels: &[(LevelEmbeddings, LevelQueues, f64)],
    t: f64,
) -> Result<(Value, Vec<Value>), PretextError> {
    let mut total: Option<Value> = None;
    let mut per_level = Vec::new();
    for (e, q, w) in levels {
        let gg = ops::info_nce(b, &e.q_global, &e.k_global, &q.gg, t)?;
        let ll = ops::info_nce(b, &e.q_local, &e.k_local, &q.ll, t)?;
        let gl = ops::info_nce(b, &e.q_global, &e.k_local, &q.gl, t)?;
        let sum = b.add(&gg, &ll)?;
        let level = b.add(&sum, &gl)?;
        let wv = b.const_f32(*w as f32);
        let weighted = b.mul(&level, &wv)?;
        total = Some(match total {
            None => weighted,
            Some(acc) => b.add(&acc, &weighted)?,
        });
        per_level.push(level);
    }
    let total = total.ok_or_else(|| PretextError::Invalid {
        method: INFO.name.into(),
        problem: "no levels".into(),
    })?;
    Ok((total, per_level))
}

/// The student's or teacher's modules: backbone, global and local heads per level.
type Encoder = (ResNet, Vec<MlpHead>, Vec<MlpHead>);

/// Global and local embeddings of every level for one view and its patches.
///
/// # Shapes
/// `view [N, 3, V, V], patches [N, 9, 3, p, p] -> 4 x ([N, D], [N, D])`.
fn encode(
    b: &mut GraphBuilder,
    (net, global, local): &Encoder,
    view: &Value,
    patches: &Value,
    mode: &mut NormMode,
) -> Result<Vec<(Value, Value)>, PretextError> {
    let d = ops::dims(b, patches)?;
    let (n, p) = (d[0], d[3]);
    let f = net.forward_mode(b, view, mode)?;
    let flat = b.reshape(patches, &[(n * PATCHES) as i64, 3, p as i64, d[4] as i64])?;
    let fp = net.forward_mode(b, &flat, &mut mode.fresh())?;
    let mut out = Vec::new();
    for (l, (fg, fl)) in f.as_array().into_iter().zip(fp.as_array()).enumerate() {
        let pg = ops::pool(b, fg)?;
        let zg = global[l].forward(b, &pg)?;
        let zg = ops::l2_normalize(b, &zg, 1)?;
        let pl = ops::pool(b, fl)?;
        let c = ops::dims(b, &pl)?[1];
        let cat = b.reshape(&pl, &[n as i64, (PATCHES * c) as i64])?;
        let zl = local[l].forward(b, &cat)?;
        let zl = ops::l2_normalize(b, &zl, 1)?;
        out.push((zg, zl));
    }
    Ok(out)
}

impl Pretext for DetCo {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn views(&self, image_size: u32) -> Vec<ViewConfig> {
        moco_views(image_size)
    }

    fn host_inputs(
        &self,
        _ctx: &PretextContext,
        views: &[View],
    ) -> Result<Vec<(String, Tensor)>, PretextError> {
        let mut rng = geometry_rng(views);
        let shuffle = self.settings.bool("shuffle_patches");
        let mut out = Vec::new();
        for (k, v) in views.iter().enumerate() {
            let (_, h, w) = v.pixels.dim();
            if h < GRID || w < GRID {
                return Err(PretextError::Invalid {
                    method: INFO.name.into(),
                    problem: format!("view {k} of {w}x{h} pixels is too small for a 3x3 jigsaw"),
                });
            }
            let (p, _) = jigsaw_patches(&v.pixels, shuffle.then_some(&mut rng));
            out.push((format!("patches{k}"), Tensor::F32(p.into_dyn())));
        }
        Ok(out)
    }

    fn build(&self, ctx: &PretextContext) -> Result<ForwardGraph, PretextError> {
        let s = &self.settings;
        let c = Contrastive::read(s, ctx.batch)?;
        let (t, m) = (c.temperature, c.momentum);
        let mut weights = [0.0; 4];
        for (w, (_, key)) in weights.iter_mut().zip(LEVELS) {
            *w = s.checked(key, |v| v >= 0.0, "must be non-negative")?;
        }
        let (k_size, hidden, dim) = (c.queue_size, c.hidden_dim, c.dim);
        let size = ctx.image_size as usize;
        if size < GRID {
            return Err(PretextError::Invalid {
                method: INFO.name.into(),
                problem: format!("views of {size} pixels are too small for a 3x3 jigsaw"),
            });
        }
        let p = patch_size(size);
        let mut b = GraphBuilder::new("detco", ctx.seed);
        let [v0, v1] = two_view_inputs(&mut b, ctx)?;
        let patch_shape = || -> Vec<Dim> {
            vec![
                ctx.batch.into(),
                PATCHES.into(),
                3.into(),
                p.into(),
                p.into(),
            ]
        };
        let p0 = b.input("patches0", DType::F32, patch_shape())?;
        let p1 = b.input("patches1", DType::F32, patch_shape())?;
        let channels = ctx.arch.out_channels();
        let twin = momentum_twin(&mut b, m, |b| -> Result<Encoder, PretextError> {
            let net = ctx.arch.init(b)?;
            let mut global = Vec::new();
            let mut local = Vec::new();
            for (l, &c) in channels.iter().enumerate() {
                global.push(MlpHead::init(
                    b,
                    &format!("head.global.{l}"),
                    c,
                    hidden,
                    dim,
                )?);
            }
            for (l, &c) in channels.iter().enumerate() {
                local.push(MlpHead::init(
                    b,
                    &format!("head.local.{l}"),
                    PATCHES * c,
                    hidden,
                    dim,
                )?);
            }
            Ok((net, global, local))
        })?;
        let mut queues = Vec::new();
        for (name, _) in LEVELS {
            queues.push(LevelQueues {
                gg: ops::queue(&mut b, &format!("queue.{name}.gg"), k_size, dim)?,
                ll: ops::queue(&mut b, &format!("queue.{name}.ll"), k_size, dim)?,
                gl: ops::queue(&mut b, &format!("queue.{name}.gl"), k_size, dim)?,
            });
        }
        let mut mode = self.settings.norm_mode()?;
        let q = encode(&mut b, &twin.student, &v0, &p0, &mut mode)?;
        let k = encode(&mut b, &twin.teacher, &v1, &p1, &mut mode)?;
        let levels: Vec<(LevelEmbeddings, LevelQueues, f64)> = q
            .into_iter()
            .zip(k)
            .zip(queues)
            .zip(weights)
            .map(|((((qg, ql), (kg, kl)), queues), w)| {
                (
                    LevelEmbeddings {
                        q_global: qg,
                        q_local: ql,
                        k_global: kg,
                        k_local: kl,
                    },
                    queues,
                    w,
                )
            })
            .collect();
        let (loss, per_level) = multi_level_loss(&mut b, &levels, t)?;

        let mut state = mode.into_state();
        for (e, q, _) in &levels {
            ops::enqueue(&mut b, &q.gg, &e.k_global, &mut state)?;
            ops::enqueue(&mut b, &q.ll, &e.k_local, &mut state)?;
            ops::enqueue(&mut b, &q.gl, &e.k_local, &mut state)?;
        }
        state.extend(twin.ema);
        let mut g = ForwardGraph::new(b, loss);
        for ((name, _), l) in LEVELS.iter().zip(per_level) {
            g = g.metric(&format!("loss_{name}"), l);
        }
        Ok(g.norm_state(state))
    }
}

#[cfg(test)]
#[path = "detco_tests.rs"]
mod tests;
