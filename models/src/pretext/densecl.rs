//! DenseCL (Wang, Zhang, Shen, Kong, Li 2021, "Dense Contrastive Learning for Self-Supervised
//! Visual Pre-Training").
//!
//! MoCo-v2 plus a dense branch: a 1x1-conv head turns the backbone's last feature map into an
//! `S x S` grid of embeddings. Each query cell's positive is the key cell whose *backbone*
//! feature is most similar (argmax of cosine similarity, no gradient); negatives come from a
//! second queue holding the average-pooled dense key of past images. Loss
//! `(1 - lambda) * global InfoNCE + lambda * dense InfoNCE`.
//!
//! Our choices are MoCo-v2's ([`super::mocov2`]). The correspondence uses the query backbone
//! features as computed in this step (they carry no gradient through the argmax: `ArgMax` is
//! piecewise constant).

use densa_exporter::builder::{attr, Dim};
use densa_exporter::{DType, GraphBuilder, Value};
use densa_runtime::augment::ViewConfig;

use super::mocov2::{contrastive_defaults, moco_views, two_view_inputs, Contrastive, TINY};
use super::ops::{self, ConvHead, MlpHead};
use super::settings::{common, Hyper, Settings};
use super::twin::momentum_twin;
use super::{Family, MethodInfo, Pretext, PretextContext, PretextError};
use crate::backbone::ResNet;
use crate::nn::NormMode;
use crate::train_step::ForwardGraph;

pub static INFO: MethodInfo = MethodInfo {
    name: "densecl",
    title: "Dense Contrastive Learning for Self-Supervised Visual Pre-Training",
    paper: "Wang, Zhang, Shen, Kong, Li; CVPR 2021",
    summary: "global + dense InfoNCE; positive key cell by backbone-feature argmax",
    hyper,
    create,
    tiny: TINY,
    family: Family::Backbone,
};

fn hyper() -> Vec<Hyper> {
    let mut h = common("sgd", 0.03, 256, 1e-4);
    h.push(super::settings::batch_norm());
    h.extend(contrastive_defaults());
    h.push(Hyper::float(
        "loss_lambda",
        0.5,
        "weight of the dense loss (global gets 1 - lambda)",
    ));
    h
}

fn create(settings: Settings) -> Result<Box<dyn Pretext>, PretextError> {
    Ok(Box::new(DenseCl { settings }))
}

/// The DenseCL method.
pub struct DenseCl {
    settings: Settings,
}

/// The student's or teacher's modules: backbone, global MLP head, dense head.
type Encoder = (ResNet, MlpHead, ConvHead);

/// What one encoder computes on a view.
struct Encoded {
    /// Global embedding `[N, D]`, normalised.
    global: Value,
    /// Dense embeddings `[N, D, S*S]`, normalised per cell.
    dense: Value,
    /// Average-pooled dense embedding `[N, D]`, normalised (what the dense queue stores).
    dense_pooled: Value,
    /// Backbone features `[N, C, S*S]`, normalised per cell.
    backbone: Value,
}

fn encode(
    b: &mut GraphBuilder,
    (net, mlp, dense): &Encoder,
    x: &Value,
    mode: &mut NormMode,
) -> Result<Encoded, PretextError> {
    let f = net.forward_mode(b, x, mode)?;
    let pooled = ops::pool(b, &f.c5)?;
    let g = mlp.forward(b, &pooled)?;
    let global = ops::l2_normalize(b, &g, 1)?;
    let d = dense.forward(b, &f.c5, mode)?;
    let dp = ops::pool(b, &d)?;
    let dense_pooled = ops::l2_normalize(b, &dp, 1)?;
    let d = ops::flatten_cells(b, &d)?;
    let dense = ops::l2_normalize(b, &d, 1)?;
    let bb = ops::flatten_cells(b, &f.c5)?;
    let backbone = ops::l2_normalize(b, &bb, 1)?;
    Ok(Encoded {
        global,
        dense,
        dense_pooled,
        backbone,
    })
}

/// For each query cell, the key cell of greatest cosine similarity between the normalised
/// backbone features `q_b`, `k_b` (`[N, C, S2]`): `[N, S2]` int64 indices.
pub fn argmax_correspondence(
    b: &mut GraphBuilder,
    q_b: &Value,
    k_b: &Value,
) -> Result<Value, PretextError> {
    let d = ops::dims(b, q_b)?;
    let qt = ops::transpose(b, q_b, &[0, 2, 1])?;
    let sim = ops::matmul(b, &qt, k_b)?;
    Ok(b.node1(
        "ArgMax",
        Some("correspondence"),
        &[&sim],
        vec![attr::int("axis", 2), attr::int("keepdims", 0)],
        DType::I64,
        vec![Dim::from(d[0]), Dim::from(d[2])],
    ))
}

/// `grid [N, D, S2]` gathered along the cells at `index [N, S2]`: `out[n, :, i] =
/// grid[n, :, index[n, i]]`.
pub fn gather_cells(
    b: &mut GraphBuilder,
    grid: &Value,
    index: &Value,
) -> Result<Value, PretextError> {
    let d = ops::dims(b, grid)?;
    let axes = b.const_i64(&[1]);
    let idx = b.node1(
        "Unsqueeze",
        None,
        &[index, &axes],
        vec![],
        DType::I64,
        vec![Dim::from(d[0]), Dim::from(1), Dim::from(d[2])],
    );
    let shape = b.const_i64(&[d[0] as i64, d[1] as i64, d[2] as i64]);
    let idx = b.node1(
        "Expand",
        None,
        &[&idx, &shape],
        vec![],
        DType::I64,
        d.iter().map(|&x| Dim::from(x)).collect(),
    );
    Ok(b.node1(
        "GatherElements",
        Some("positive_cells"),
        &[grid, &idx],
        vec![attr::int("axis", 2)],
        DType::F32,
        grid.shape().to_vec(),
    ))
}

impl Pretext for DenseCl {
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
        let lambda = s.checked(
            "loss_lambda",
            |v| (0.0..=1.0).contains(&v),
            "must be in [0, 1]",
        )?;
        let (k_size, hidden, dim) = (c.queue_size, c.hidden_dim, c.dim);
        let mut b = GraphBuilder::new("densecl", ctx.seed);
        let [v0, v1] = two_view_inputs(&mut b, ctx)?;
        let c5 = ctx.arch.out_channels()[3];
        let twin = momentum_twin(&mut b, m, |b| -> Result<Encoder, PretextError> {
            Ok((
                ctx.arch.init(b)?,
                MlpHead::init(b, "head.global", c5, hidden, dim)?,
                ConvHead::init(b, "head.dense", c5, hidden, dim, false)?,
            ))
        })?;
        let queue = ops::queue(&mut b, "queue.global", k_size, dim)?;
        let queue_dense = ops::queue(&mut b, "queue.dense", k_size, dim)?;
        let mut mode = self.settings.norm_mode()?;
        let q = encode(&mut b, &twin.student, &v0, &mut mode)?;
        let k = encode(&mut b, &twin.teacher, &v1, &mut mode)?;

        let global = ops::info_nce(&mut b, &q.global, &k.global, &queue, t)?;
        let index = argmax_correspondence(&mut b, &q.backbone, &k.backbone)?;
        let k_pos = gather_cells(&mut b, &k.dense, &index)?;
        // Every cell is a query of its own: [N, D, S2] -> [N * S2, D].
        let cells = |b: &mut GraphBuilder, x: &Value| -> Result<Value, PretextError> {
            let d = ops::dims(b, x)?;
            let xt = ops::transpose(b, x, &[0, 2, 1])?;
            Ok(b.reshape(&xt, &[(d[0] * d[2]) as i64, d[1] as i64])?)
        };
        let q_cells = cells(&mut b, &q.dense)?;
        let k_cells = cells(&mut b, &k_pos)?;
        let dense = ops::info_nce(&mut b, &q_cells, &k_cells, &queue_dense, t)?;
        let wg = b.const_f32((1.0 - lambda) as f32);
        let wd = b.const_f32(lambda as f32);
        let lg = b.mul(&global, &wg)?;
        let ld = b.mul(&dense, &wd)?;
        let loss = b.add(&lg, &ld)?;

        let mut state = mode.into_state();
        ops::enqueue(&mut b, &queue, &k.global, &mut state)?;
        ops::enqueue(&mut b, &queue_dense, &k.dense_pooled, &mut state)?;
        state.extend(twin.ema);
        Ok(ForwardGraph::new(b, loss)
            .metric("loss_global", global)
            .metric("loss_dense", dense)
            .norm_state(state))
    }
}
