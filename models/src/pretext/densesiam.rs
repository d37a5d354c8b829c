//! DenseSiam (Zhang, Pang, Chen, Loy 2022, "Dense Siamese Network for Dense Unsupervised
//! Learning"): SimSiam at the pixel level.
//!
//! No negatives, no momentum encoder. Both views go through the same network: backbone, a dense
//! projector (`conv1x1 -> hidden -> BN -> ReLU -> conv1x1 -> dim`) giving `z`, and a dense
//! predictor (`conv1x1 -> pred_hidden -> BN -> ReLU -> conv1x1 -> dim`) giving `p = h(z)`.
//! *Pixel consistency*: both views' maps are resampled (ONNX `GridSample`, bilinear) at the
//! same `grid_size x grid_size` lattice of points of their overlap region, so lattice cell `i`
//! of one view and cell `i` of the other show the same point of the original image; the loss is
//! SimSiam's symmetric negative cosine `D(p0, sg(z1)) / 2 + D(p1, sg(z0)) / 2` per lattice cell
//! (`sg`: stop-gradient, [`ForwardGraph::stop_gradient`]), averaged over cells and images.
//! *Region consistency* adds `0.1 x` an InfoNCE between region embeddings pooled from the
//! overlap of the two views (temperature 0.1, see below).
//! SGD, lr 0.05 at batch 256, weight decay 1e-4 (SimSiam's values).
//!
//! Our choices:
//! - Head widths 128 (`hidden_dim`, `dim`, `pred_hidden_dim`), the official dense heads'
//!   (`out_channels = hid_channels = 128`). The official projector ends in 27 codes compared by
//!   the cross-entropy of their softmaxes; ours ends in 128 features compared by SimSiam's
//!   cosine. SimSiam's image-level widths (2048, predictor 512), our earlier defaults, made a
//!   step 8x slower (0.96 s vs 0.12 s: batch 32 of 64 px views, `resnet-edge`, ONNX Runtime on
//!   2 cores), as wide 1x1 convolutions on every cell of both views.
//! - The heads run on the whole `c5` map and their outputs are resampled (a 1x1-conv head
//!   commutes with the choice of points, up to the bilinear mixing of neighbouring cells).
//! - The lattice: cell centres of a regular `grid_size x grid_size` grid over the overlap box in
//!   original-image coordinates, mapped into each view ([`overlap_grids`]); `GridSample` with
//!   `align_corners = 0` and `padding_mode = border` (points between the outermost cell centres
//!   and the map's edge take the edge cells' values instead of fading to zero). Views that don't
//!   overlap get `densesiam.valid = 0` and no pixel loss (the loss averages over valid images).
//! - Host inputs per sample: `densesiam.grid0`, `densesiam.grid1` (`[S, S, 2]`, `(x, y)` in
//!   `[-1, 1]`) and `densesiam.valid` (`[1]`).
//! - *Region consistency* ([`region_consistency`], weight `region_weight` 0.1, temperature
//!   `region_temperature` 0.1): a 1x1 conv `head.region` (`dim -> num_regions`, our default 4)
//!   and a softmax give each lattice point of a view a soft assignment to regions; a region's
//!   embedding is the assignment-weighted mean of that view's resampled projector features (each
//!   view uses its own assignment, so the same head must find the same region in both); InfoNCE
//!   pairs the two views' embeddings of the same region of an image against the image's other
//!   regions (as the official `kernel_contrast` does, `einsum('bnc,bmc->bnm')`), both
//!   directions. The region term is differentiable all the way (no stop-gradient). The official
//!   code takes the regions from the projector's own softmax and passes their embeddings through
//!   a projector and predictor of their own; we use a separate assignment conv and compare the
//!   embeddings directly.
//! - Both terms are means over the images whose views overlap, declared as global means
//!   ([`ForwardGraph::global_mean`]): data-parallel ranks share their counts, and as every image
//!   is its own contrast, N ranks of B train like one process of N x B (up to batch norm).
//! - Not implemented: an image-level SimSiam term; SimSiam's fixed predictor learning rate (the
//!   predictor follows the same cosine schedule here); the projector has two layers (SimSiam's
//!   has three, with a BN on its output).
//! - Running statistics of the two views' passes are chained as two PyTorch calls would
//!   ([`super::pixpro::chain_norm_state`]).

use densa_exporter::builder::{attr, Dim};
use densa_exporter::{DType, GraphBuilder, Tensor, Value};
use densa_runtime::augment::{overlap, FeatureGrid, View, ViewConfig, ViewGeometry};
use ndarray::Array3;

use super::mocov2::{moco_views, two_view_inputs};
use super::ops::{self, ConvHead};
use super::pixpro::C5_STRIDE;
use super::settings::{common, Hyper, Settings};
use super::{Family, MethodInfo, Pretext, PretextContext, PretextError};
use crate::nn::{Conv2d, Conv2dConfig};
use crate::train_step::ForwardGraph;

pub static INFO: MethodInfo = MethodInfo {
    name: "densesiam",
    title: "Dense Siamese Network for Dense Unsupervised Learning",
    paper: "Zhang, Pang, Chen, Loy; ECCV 2022",
    summary: "SimSiam per pixel: predictor vs stop-grad projection at matching overlap points",
    hyper,
    create,
    tiny: TINY,
    family: Family::Backbone,
};

/// Small heads and lattice for smoke tests (see [`MethodInfo::tiny`]).
pub const TINY: &[(&str, &str)] = &[
    ("hidden_dim", "16"),
    ("dim", "8"),
    ("pred_hidden_dim", "4"),
    ("grid_size", "2"),
];

/// Host input names: the two views' sampling grids and the overlap flag.
pub const GRIDS: [&str; 2] = ["densesiam.grid0", "densesiam.grid1"];
pub const VALID: &str = "densesiam.valid";

fn hyper() -> Vec<Hyper> {
    let mut h = common("sgd", 0.05, 256, 1e-4);
    h.push(super::settings::batch_norm());
    h.extend([
        Hyper::int("hidden_dim", 128, "hidden width of the dense projector"),
        Hyper::int("dim", 128, "output width of the projector and predictor"),
        Hyper::int(
            "pred_hidden_dim",
            128,
            "hidden width of the dense predictor",
        ),
        Hyper::int(
            "grid_size",
            7,
            "side of the lattice of overlap points compared (7 = c5 of 224 px)",
        ),
        Hyper::int("num_regions", 4, "regions of the region-consistency term"),
        Hyper::float(
            "region_weight",
            0.1,
            "weight of the region-consistency InfoNCE (0 turns it off)",
        ),
        Hyper::float(
            "region_temperature",
            0.1,
            "temperature of the region-consistency InfoNCE",
        ),
    ]);
    h
}

fn create(settings: Settings) -> Result<Box<dyn Pretext>, PretextError> {
    Ok(Box::new(DenseSiam { settings }))
}

/// The DenseSiam method.
pub struct DenseSiam {
    settings: Settings,
}

/// The `GridSample` grids that resample view `a`'s and view `b`'s feature maps (`grid_a`,
/// `grid_b`: their cells in view pixels) at the same `size x size` lattice of original-image
/// points: the cell centres of a regular grid over the views' overlap. `None` when the views
/// don't overlap.
///
/// # Shapes
/// two `[size, size, 2]`, `(x, y)` last, in `GridSample`'s `align_corners = 0` coordinates.
pub fn overlap_grids(
    a: &ViewGeometry,
    grid_a: FeatureGrid,
    b: &ViewGeometry,
    grid_b: FeatureGrid,
    size: usize,
) -> Option<[Array3<f32>; 2]> {
    let o = overlap(a, b)?.original;
    let lattice = |i: usize, j: usize| {
        [
            o.x0 + (j as f32 + 0.5) * o.width() / size as f32,
            o.y0 + (i as f32 + 0.5) * o.height() / size as f32,
        ]
    };
    let to_grid = |g: &ViewGeometry, grid: FeatureGrid| {
        // The map spans `width * stride` view pixels: -1 and 1 are its outer edges.
        let (w, h) = (
            grid.width as f32 * grid.stride,
            grid.height as f32 * grid.stride,
        );
        Array3::from_shape_fn((size, size, 2), |(i, j, k)| {
            let [u, v] = g.to_view(lattice(i, j));
            if k == 0 {
                2.0 * u / w - 1.0
            } else {
                2.0 * v / h - 1.0
            }
        })
    };
    Some([to_grid(a, grid_a), to_grid(b, grid_b)])
}

/// `GridSample` of `x` (`[N, C, H, W]`) at `grid` (`[N, S, S, 2]`): bilinear,
/// `padding_mode = border`, `align_corners = 0`.
///
/// # Shapes
/// `[N, C, H, W]`, `[N, S, S, 2]` -> `[N, C, S, S]`.
pub fn grid_sample(b: &mut GraphBuilder, x: &Value, grid: &Value) -> Result<Value, PretextError> {
    let (dx, dg) = (ops::dims(b, x)?, ops::dims(b, grid)?);
    if dx.len() != 4 || dg.len() != 4 || dg[0] != dx[0] || dg[3] != 2 {
        return Err(PretextError::Invalid {
            method: "grid sample".into(),
            problem: format!("map {dx:?} and grid {dg:?} don't fit"),
        });
    }
    Ok(b.node1(
        "GridSample",
        None,
        &[x, grid],
        vec![
            attr::string("mode", "bilinear"),
            attr::string("padding_mode", "border"),
            attr::int("align_corners", 0),
        ],
        DType::F32,
        [dx[0], dx[1], dg[1], dg[2]]
            .into_iter()
            .map(Dim::from)
            .collect(),
    ))
}

/// SimSiam's symmetric pixel loss over matching lattice points: `p_k`, `z_k` (`[N, C, H, W]`,
/// view `k`'s predictor and projector maps) resampled at `grids[k]` (`[N, S, S, 2]`), then
/// `-(cos(p0_i, z1_i) + cos(p1_i, z0_i)) / 2` averaged over the `S*S` points of each image and
/// over the images with `valid = 1` (`[N, 1]`). (Both directions count as samples of the mean:
/// `2 x` valid images.)
///
/// Returns the loss and the values the caller must stop the gradient at.
pub fn pixel_consistency(
    b: &mut GraphBuilder,
    p: [&Value; 2],
    z: [&Value; 2],
    grids: [&Value; 2],
    valid: &Value,
) -> Result<PixelConsistency, PretextError> {
    let mut ps = Vec::new();
    let mut zs = Vec::new();
    for k in 0..2 {
        let pk = grid_sample(b, p[k], grids[k])?;
        let zk = grid_sample(b, z[k], grids[k])?;
        let pk = ops::flatten_cells(b, &pk)?;
        ps.push(ops::l2_normalize(b, &pk, 1)?);
        zs.push(zk);
    }
    // The targets are copies of the resampled maps: the copies are what the gradient stops at,
    // the maps themselves stay differentiable for the region term.
    let stopped: Vec<Value> = zs.iter().map(|z| b.unary("Identity", z)).collect();
    let mut targets = Vec::new();
    for zk in &stopped {
        let f = ops::flatten_cells(b, zk)?;
        targets.push(ops::l2_normalize(b, &f, 1)?);
    }
    // cos per point, both directions: [N, 1, S2] each.
    let c01 = ops::dot(b, &ps[0], &targets[1], 1)?;
    let c10 = ops::dot(b, &ps[1], &targets[0], 1)?;
    let both = b.add(&c01, &c10)?;
    let per_image = b.reduce_mean(&both, &[1, 2], false)?; // [N]
    let d = ops::dims(b, valid)?;
    let valid = b.reshape(valid, &[d[0] as i64])?;
    let weighted = b.mul(&per_image, &valid)?;
    let total = b.reduce_sum(&weighted, &[0], true)?;
    let images = b.reduce_sum(&valid, &[0], true)?;
    let two = b.const_f32(2.0);
    let count = b.mul(&images, &two)?;
    let m = ops::masked_mean(b, &total, &count)?;
    let loss = ops::MaskedMean {
        mean: b.neg(&m.mean),
        ..m
    };
    let [s0, s1]: [Value; 2] = stopped.try_into().expect("two views");
    let [z0, z1]: [Value; 2] = zs.try_into().expect("two views");
    Ok(PixelConsistency {
        loss,
        stop: [s0, s1],
        sampled_z: [z0, z1],
    })
}

/// What [`pixel_consistency`] builds.
pub struct PixelConsistency {
    /// `[1]`, a mean over the valid images (with the values to share it across ranks).
    pub loss: ops::MaskedMean,
    /// The targets, which the caller must stop the gradient at
    /// ([`ForwardGraph::stop_gradient`]).
    pub stop: [Value; 2],
    /// The projector maps resampled at the lattice, `[N, C, S, S]` (differentiable).
    pub sampled_z: [Value; 2],
}

/// DenseSiam's region consistency: a 1x1 conv `assign` (`C -> K`) and a softmax over `K` give
/// each lattice point of view `v` a soft assignment to `K` regions; region `k`'s embedding is the
/// assignment-weighted mean of the point features `z_v` (`[N, C, S, S]`), L2-normalised. InfoNCE
/// at temperature `t` between the two views' embeddings of the same region of an image, the
/// image's other regions as negatives (the official code's `einsum('bnc,bmc->bnm')`),
/// symmetric (mean of both directions), over the regions of images with `valid = 1` (`[N, 1]`).
///
/// Every image is its own contrast, so the term splits over data-parallel ranks; its mean over
/// valid images is a [`ops::MaskedMean`] for the ranks to share.
///
/// # Shapes
/// returns a mean of shape `[1]`.
pub fn region_consistency(
    b: &mut GraphBuilder,
    z: [&Value; 2],
    assign: &Conv2d,
    valid: &Value,
    t: f64,
) -> Result<ops::MaskedMean, PretextError> {
    let k = assign.config.out_channels;
    let mut emb = Vec::new();
    for zv in z {
        let logits = assign.forward(b, zv)?;
        let a = b.node1(
            "Softmax",
            None,
            &[&logits],
            vec![attr::int("axis", 1)],
            DType::F32,
            logits.shape().to_vec(),
        );
        let a = ops::flatten_cells(b, &a)?; // [N, K, S2]
        let f = ops::flatten_cells(b, zv)?;
        let ft = ops::transpose(b, &f, &[0, 2, 1])?; // [N, S2, C]
        let pooled = ops::matmul(b, &a, &ft)?; // [N, K, C]
        let mass = b.reduce_sum(&a, &[2], true)?;
        let mean = b.div(&pooled, &mass)?;
        emb.push(ops::l2_normalize(b, &mean, 2)?);
    }
    let eye = ops::host_tensor(
        &[k, k],
        (0..k * k)
            .map(|x| if x / k == x % k { 1.0 } else { 0.0 })
            .collect(),
    );
    let eye = b.constant(eye);
    let inv_t = b.const_f32((1.0 / t) as f32);
    let mut total = None;
    for (x, y) in [(&emb[0], &emb[1]), (&emb[1], &emb[0])] {
        let yt = ops::transpose(b, y, &[0, 2, 1])?;
        let logits = ops::matmul(b, x, &yt)?; // [N, K, K]
        let logits = b.mul(&logits, &inv_t)?;
        let logp = b.node1(
            "LogSoftmax",
            None,
            &[&logits],
            vec![attr::int("axis", 2)],
            DType::F32,
            logits.shape().to_vec(),
        );
        let diag = b.mul(&logp, &eye)?;
        let diag = b.reduce_sum(&diag, &[2], false)?; // [N, K]
        total = Some(match total {
            None => diag,
            Some(t) => b.add(&t, &diag)?,
        });
    }
    let total = total.expect("two directions");
    let picked = b.mul(&total, valid)?; // [N, K], valid [N, 1]
    let per_image = b.reduce_sum(&picked, &[1], false)?;
    let sum = b.reduce_sum(&per_image, &[0], true)?;
    let images = b.reduce_sum(valid, &[0], false)?; // [1]
    let two_k = b.const_f32((2 * k) as f32);
    let count = b.mul(&images, &two_k)?;
    let m = ops::masked_mean(b, &sum, &count)?;
    Ok(ops::MaskedMean {
        mean: b.neg(&m.mean),
        ..m
    })
}

impl Pretext for DenseSiam {
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
        ctx: &PretextContext,
        views: &[View],
    ) -> Result<Vec<(String, Tensor)>, PretextError> {
        let size = self.settings.positive("grid_size")?;
        let [a, b] = views else {
            return Err(PretextError::Invalid {
                method: "densesiam".into(),
                problem: format!("expected 2 views, got {}", views.len()),
            });
        };
        let s = ctx.image_size;
        for v in [a, b] {
            if v.geometry.out_size != (s, s) {
                return Err(PretextError::Invalid {
                    method: "densesiam".into(),
                    problem: format!(
                        "view of {:?} pixels, the graph expects {s}x{s}",
                        v.geometry.out_size
                    ),
                });
            }
        }
        let grid = FeatureGrid::of_view((s, s), C5_STRIDE);
        let (grids, valid) = match overlap_grids(&a.geometry, grid, &b.geometry, grid, size) {
            Some(g) => (g, 1.0),
            None => (
                [
                    Array3::zeros((size, size, 2)),
                    Array3::zeros((size, size, 2)),
                ],
                0.0,
            ),
        };
        let mut out: Vec<(String, Tensor)> = GRIDS
            .iter()
            .zip(grids)
            .map(|(name, g)| (name.to_string(), Tensor::F32(g.into_dyn())))
            .collect();
        out.push((VALID.to_string(), ops::host_tensor(&[1], vec![valid])));
        Ok(out)
    }

    fn build(&self, ctx: &PretextContext) -> Result<ForwardGraph, PretextError> {
        let s = &self.settings;
        let (hidden, dim, pred_hidden, size, regions) = (
            s.positive("hidden_dim")?,
            s.positive("dim")?,
            s.positive("pred_hidden_dim")?,
            s.positive("grid_size")?,
            s.positive("num_regions")?,
        );
        let region_weight = s.checked("region_weight", |v| v >= 0.0, "must be >= 0")?;
        let region_t = s.checked("region_temperature", |v| v > 0.0, "must be positive")?;
        let mut b = GraphBuilder::new("densesiam", ctx.seed);
        let [v0, v1] = two_view_inputs(&mut b, ctx)?;
        let grid_shape = || vec![ctx.batch.into(), size.into(), size.into(), 2.into()];
        let g0 = b.input(GRIDS[0], DType::F32, grid_shape())?;
        let g1 = b.input(GRIDS[1], DType::F32, grid_shape())?;
        let valid = b.input(VALID, DType::F32, vec![ctx.batch.into(), 1.into()])?;
        let c5 = ctx.arch.out_channels()[3];
        let net = ctx.arch.init(&mut b)?;
        let projector = ConvHead::init(&mut b, "head.projector", c5, hidden, dim, true)?;
        let predictor = ConvHead::init(&mut b, "head.predictor", dim, pred_hidden, dim, true)?;
        let assign = Conv2dConfig::new(dim, regions, 1).init(&mut b, "head.region")?;
        let mut modes = [self.settings.norm_mode()?, self.settings.norm_mode()?];
        let mut maps = Vec::new();
        for (x, mode) in [&v0, &v1].into_iter().zip(modes.iter_mut()) {
            let f = net.forward_mode(&mut b, x, mode)?;
            let z = projector.forward(&mut b, &f.c5, mode)?;
            let p = predictor.forward(&mut b, &z, mode)?;
            maps.push((p, z));
        }
        let pixel = pixel_consistency(
            &mut b,
            [&maps[0].0, &maps[1].0],
            [&maps[0].1, &maps[1].1],
            [&g0, &g1],
            &valid,
        )?;
        let mut graph_loss = pixel.loss.mean.clone();
        let mut region_term = None;
        if region_weight > 0.0 {
            let [z0, z1] = &pixel.sampled_z;
            let region = region_consistency(&mut b, [z0, z1], &assign, &valid, region_t)?;
            let w = b.const_f32(region_weight as f32);
            let weighted = b.mul(&region.mean, &w)?;
            graph_loss = b.add(&graph_loss, &weighted)?;
            region_term = Some(region);
        }
        let [m0, m1] = modes;
        let state = ops::chain_norm_state(&mut b, m0.into_state(), m1.into_state(), 0.1)?;
        let pixel_mean = pixel.loss;
        let mut fg = ForwardGraph::new(b, graph_loss)
            .metric("loss_pixel", pixel_mean.mean)
            .stop_gradient(&pixel.stop[0])
            .stop_gradient(&pixel.stop[1])
            .norm_state(state)
            .global_mean(&pixel_mean.count, &pixel_mean.denominator, 1.0);
        if let Some(r) = region_term {
            fg = fg
                .metric("loss_region", r.mean)
                .global_mean(&r.count, &r.denominator, 1.0);
        }
        Ok(fg)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use densa_exporter::{Init, ParamKind};
    use densa_runtime::train::InputRole;
    use ndarray::ArrayD;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::pretext::pixpro::tests::{
        artifact, ctx, losses_over_steps, original_of, random, random_geometry, run_graph, view,
    };
    use crate::train_step::{train_step_artifact, OptimizerConfig, TrainStepConfig};

    #[test]
    fn overlap_grids_map_each_lattice_cell_to_one_original_point_in_both_views() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (out, size) = (96u32, 5usize);
        let grid = FeatureGrid::of_view((out, out), C5_STRIDE); // 3x3 cells of 32 px
        let (mut checked, mut disjoint) = (0, 0);
        for case in 0..60 {
            let image = (rng.random_range(100..400), rng.random_range(100..400));
            let a = random_geometry(&mut rng, image, out);
            let b = random_geometry(&mut rng, image, out);
            // The overlap, by hand.
            let (x0, x1) = (a.crop.x0.max(b.crop.x0), a.crop.x1.min(b.crop.x1));
            let (y0, y1) = (a.crop.y0.max(b.crop.y0), a.crop.y1.min(b.crop.y1));
            let Some([ga, gb]) = overlap_grids(&a, grid, &b, grid, size) else {
                assert!(x1 <= x0 || y1 <= y0, "case {case}: views overlap");
                disjoint += 1;
                continue;
            };
            for i in 0..size {
                for j in 0..size {
                    let want = (
                        x0 as f64 + (j as f64 + 0.5) * (x1 - x0) as f64 / size as f64,
                        y0 as f64 + (i as f64 + 0.5) * (y1 - y0) as f64 / size as f64,
                    );
                    for (g, geo) in [(&ga, &a), (&gb, &b)] {
                        // GridSample's align_corners = 0: -1..1 spans the map's 96 pixels.
                        let u = (g[[i, j, 0]] as f64 + 1.0) / 2.0 * out as f64;
                        let v = (g[[i, j, 1]] as f64 + 1.0) / 2.0 * out as f64;
                        let p = original_of(geo, u, v);
                        assert!(
                            (p.0 - want.0).abs() < 1e-2 && (p.1 - want.1).abs() < 1e-2,
                            "case {case} cell ({i}, {j}): {p:?} vs {want:?}"
                        );
                        assert!((-1.0..=1.0).contains(&g[[i, j, 0]]));
                        assert!((-1.0..=1.0).contains(&g[[i, j, 1]]));
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 500 && disjoint < 30, "{checked} {disjoint}");
    }

    /// PyTorch's `grid_sample(bilinear, border, align_corners=False)` of one channel.
    pub(crate) fn bilinear(x: &ArrayD<f32>, n: usize, c: usize, gx: f32, gy: f32) -> f64 {
        let (h, w) = (x.shape()[2], x.shape()[3]);
        let unnorm = |g: f32, size: usize| {
            let p = ((g as f64 + 1.0) * size as f64 - 1.0) / 2.0;
            p.clamp(0.0, (size - 1) as f64)
        };
        let (px, py) = (unnorm(gx, w), unnorm(gy, h));
        let (x0, y0) = (px.floor() as usize, py.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (fx, fy) = (px - x0 as f64, py - y0 as f64);
        let at = |yy: usize, xx: usize| x[[n, c, yy, xx]] as f64;
        (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x1))
            + fy * ((1.0 - fx) * at(y1, x0) + fx * at(y1, x1))
    }

    #[test]
    fn pixel_loss_equals_a_direct_computation() {
        let (n, c, h, s) = (3usize, 4usize, 3usize, 2usize);
        let mut b = GraphBuilder::new("t", 0);
        let map = || vec![n.into(), c.into(), h.into(), h.into()];
        let names = ["p0", "p1", "z0", "z1"];
        let maps: Vec<Value> = names
            .iter()
            .map(|k| b.input(k, DType::F32, map()).unwrap())
            .collect();
        let gshape = || vec![n.into(), s.into(), s.into(), 2.into()];
        let g0 = b.input("g0", DType::F32, gshape()).unwrap();
        let g1 = b.input("g1", DType::F32, gshape()).unwrap();
        let valid = b
            .input("valid", DType::F32, vec![n.into(), 1.into()])
            .unwrap();
        let pixel = pixel_consistency(
            &mut b,
            [&maps[0], &maps[1]],
            [&maps[2], &maps[3]],
            [&g0, &g1],
            &valid,
        )
        .unwrap();
        b.output(&pixel.loss.mean, "loss").unwrap();
        let values: Vec<ArrayD<f32>> = (0..4).map(|k| random(&[n, c, h, h], 40 + k)).collect();
        // Grids reach past [-1, 1] to exercise the border padding.
        let grids: Vec<ArrayD<f32>> = (0..2)
            .map(|k| random(&[n, s, s, 2], 50 + k).mapv(|v| v * 1.3))
            .collect();
        // Image 1's views don't overlap: it doesn't count.
        let vv = ArrayD::from_shape_vec(vec![n, 1], vec![1.0, 0.0, 1.0]).unwrap();
        let mut inputs: Vec<(&str, Tensor)> = names
            .iter()
            .zip(&values)
            .map(|(k, v)| (*k, Tensor::F32(v.clone())))
            .collect();
        inputs.push(("g0", Tensor::F32(grids[0].clone())));
        inputs.push(("g1", Tensor::F32(grids[1].clone())));
        inputs.push(("valid", Tensor::F32(vv.clone())));
        let out = run_graph(b, inputs);
        let sample = |m: usize, g: usize, bi: usize, i: usize, j: usize| -> Vec<f64> {
            (0..c)
                .map(|ch| {
                    bilinear(
                        &values[m],
                        bi,
                        ch,
                        grids[g][[bi, i, j, 0]],
                        grids[g][[bi, i, j, 1]],
                    )
                })
                .collect()
        };
        let cos = |a: &[f64], b: &[f64]| {
            let d: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
            let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
            d / (na * nb)
        };
        let (mut want, mut images) = (0.0, 0.0);
        for bi in 0..n {
            if vv[[bi, 0]] == 0.0 {
                continue;
            }
            let mut l = 0.0;
            for i in 0..s {
                for j in 0..s {
                    let (p0, p1) = (sample(0, 0, bi, i, j), sample(1, 1, bi, i, j));
                    let (z0, z1) = (sample(2, 0, bi, i, j), sample(3, 1, bi, i, j));
                    l -= (cos(&p0, &z1) + cos(&p1, &z0)) / 2.0;
                }
            }
            want += l / (s * s) as f64;
            images += 1.0;
        }
        want /= images;
        let got = out["loss"].to_f32().iter().next().copied().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn region_loss_equals_a_direct_computation() {
        let (n, c, h, k, t) = (2usize, 3usize, 2usize, 2usize, 0.1f64);
        let cells = h * h;
        let map = || vec![n.into(), c.into(), h.into(), h.into()];
        // The graph, and the assignment conv's initial weight and bias.
        let build = || {
            let mut b = GraphBuilder::new("t", 0);
            let z0 = b.input("z0", DType::F32, map()).unwrap();
            let z1 = b.input("z1", DType::F32, map()).unwrap();
            let valid = b
                .input("valid", DType::F32, vec![n.into(), 1.into()])
                .unwrap();
            let assign = Conv2dConfig::new(c, k, 1).init(&mut b, "region").unwrap();
            let wv = b.initializer_value(assign.weight.name()).unwrap().to_f32();
            let bv = b
                .initializer_value(assign.bias.as_ref().unwrap().name())
                .unwrap()
                .to_f32();
            let loss = region_consistency(&mut b, [&z0, &z1], &assign, &valid, t).unwrap();
            b.output(&loss.mean, "loss").unwrap();
            (b, wv, bv)
        };
        let zs = [random(&[n, c, h, h], 80), random(&[n, c, h, h], 81)];
        for valid_rows in [[1.0f32, 1.0], [0.0, 1.0]] {
            let vv = ArrayD::from_shape_vec(vec![n, 1], valid_rows.to_vec()).unwrap();
            let (b, wv, bv) = build();
            let out = run_graph(
                b,
                vec![
                    ("z0", Tensor::F32(zs[0].clone())),
                    ("z1", Tensor::F32(zs[1].clone())),
                    ("valid", Tensor::F32(vv.clone())),
                ],
            );
            // Embeddings by hand: rows (image, region).
            let embed = |z: &ArrayD<f32>| -> Vec<Vec<f64>> {
                let mut rows = Vec::new();
                for bi in 0..n {
                    let feat = |ch: usize, p: usize| z[[bi, ch, p / h, p % h]] as f64;
                    let logits: Vec<Vec<f64>> = (0..cells)
                        .map(|p| {
                            (0..k)
                                .map(|r| {
                                    bv[[r]] as f64
                                        + (0..c)
                                            .map(|ch| wv[[r, ch, 0, 0]] as f64 * feat(ch, p))
                                            .sum::<f64>()
                                })
                                .collect()
                        })
                        .collect();
                    for r in 0..k {
                        let a: Vec<f64> = (0..cells)
                            .map(|p| {
                                let z: f64 = logits[p].iter().map(|l| l.exp()).sum();
                                logits[p][r].exp() / z
                            })
                            .collect();
                        let mass: f64 = a.iter().sum();
                        let e: Vec<f64> = (0..c)
                            .map(|ch| (0..cells).map(|p| a[p] * feat(ch, p)).sum::<f64>() / mass)
                            .collect();
                        let norm = e.iter().map(|x| x * x).sum::<f64>().sqrt();
                        rows.push(e.iter().map(|x| x / norm).collect());
                    }
                }
                rows
            };
            let (e0, e1) = (embed(&zs[0]), embed(&zs[1]));
            let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
            let (mut want, mut count) = (0.0, 0.0);
            for (x, y) in [(&e0, &e1), (&e1, &e0)] {
                for i in 0..n * k {
                    if valid_rows[i / k] == 0.0 {
                        continue;
                    }
                    // The negatives: the other regions of the same image.
                    let image = i / k * k;
                    let lse = (image..image + k)
                        .map(|j| (dot(&x[i], &y[j]) / t).exp())
                        .sum::<f64>()
                        .ln();
                    want += lse - dot(&x[i], &y[i]) / t;
                    count += 1.0;
                }
            }
            want /= count;
            let got = out["loss"].to_f32().iter().next().copied().unwrap() as f64;
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }

    /// A step whose `z` maps depend on a parameter `u` only, and `p` maps on `v` only: with the
    /// stop-gradient, `u` gets no gradient (it could only move through the stopped targets).
    fn stop_gradient_step(stop: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (n, c, h, s) = (2usize, 3usize, 2usize, 2usize);
        let mut b = GraphBuilder::new("t", 0);
        let map = || vec![n.into(), c.into(), h.into(), h.into()];
        let f0 = b.input("f0", DType::F32, map()).unwrap();
        let f1 = b.input("f1", DType::F32, map()).unwrap();
        let gshape = || vec![n.into(), s.into(), s.into(), 2.into()];
        let g0 = b.input("g0", DType::F32, gshape()).unwrap();
        let g1 = b.input("g1", DType::F32, gshape()).unwrap();
        let valid = b
            .input("valid", DType::F32, vec![n.into(), 1.into()])
            .unwrap();
        let u = b
            .param("u", &[1, c, 1, 1], Init::Normal(1.0), ParamKind::Param)
            .unwrap();
        let v = b
            .param("v", &[1, c, 1, 1], Init::Normal(1.0), ParamKind::Param)
            .unwrap();
        let (z0, z1) = (b.mul(&f0, &u).unwrap(), b.mul(&f1, &u).unwrap());
        let (p0, p1) = (b.mul(&f0, &v).unwrap(), b.mul(&f1, &v).unwrap());
        let pixel = pixel_consistency(&mut b, [&p0, &p1], [&z0, &z1], [&g0, &g1], &valid).unwrap();
        let mut fg = ForwardGraph::new(b, pixel.loss.mean);
        if stop {
            fg = fg
                .stop_gradient(&pixel.stop[0])
                .stop_gradient(&pixel.stop[1]);
        }
        let a = train_step_artifact(
            fg,
            None,
            &TrainStepConfig::new(OptimizerConfig::sgd(0.5, 0.0, 0.0)),
        )
        .unwrap();
        let mut feed = Vec::new();
        for (k, e) in a.manifest().inputs.iter().enumerate() {
            let t = match (e.role, e.name.as_str()) {
                (InputRole::Batch, "f0" | "f1") => Tensor::F32(random(&[n, c, h, h], k as u64)),
                (InputRole::Batch, "g0" | "g1") => {
                    Tensor::F32(random(&[n, s, s, 2], 60 + k as u64))
                }
                (InputRole::Batch, _) => Tensor::F32(ArrayD::from_elem(vec![n, 1], 1.0)),
                (InputRole::Hyper, _) => Tensor::F64(ArrayD::from_elem(vec![], e.default.unwrap())),
                _ => a.state().get(&e.name).unwrap().clone(),
            };
            feed.push((e.name.clone(), t));
        }
        let inputs: HashMap<String, Tensor> = feed.iter().cloned().collect();
        let out: HashMap<String, Tensor> = TractBackend::new()
            .load_model(a.graph(), "t")
            .unwrap()
            .run(feed)
            .unwrap()
            .into_iter()
            .collect();
        let next = |name: &str| {
            out.get(&format!("{name}.next"))
                .unwrap_or(&inputs[name])
                .to_f32()
                .iter()
                .copied()
                .collect::<Vec<f32>>()
        };
        let before = |name: &str| inputs[name].to_f32().iter().copied().collect::<Vec<f32>>();
        (before("u"), next("u"), before("v"), next("v"))
    }

    use densa_runtime::backend::tract::TractBackend;
    use densa_runtime::backend::Backend;

    #[test]
    fn the_stop_gradient_stops_the_target_branch() {
        let (u, u_next, v, v_next) = stop_gradient_step(true);
        assert_eq!(u, u_next, "the stopped branch moved a parameter");
        assert_ne!(v, v_next, "the predictor branch did not train");
        // Without the stop-gradient the same graph does move `u`: the check above can fail.
        let (u, u_next, _, _) = stop_gradient_step(false);
        assert_ne!(u, u_next);
    }

    #[test]
    fn host_inputs_and_a_few_steps_lower_the_loss() {
        let m = create(
            TINY.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let c = ctx();
        let a = ViewGeometry {
            crop: densa_runtime::augment::CropBox::new(0.0, 0.0, 40.0, 40.0),
            flipped: false,
            out_size: (32, 32),
            image_size: (64, 64),
        };
        let far = ViewGeometry {
            crop: densa_runtime::augment::CropBox::new(50.0, 50.0, 64.0, 64.0),
            ..a
        };
        let host = m.host_inputs(&c, &[view(a), view(a.flip())]).unwrap();
        let names: Vec<&str> = host.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, [GRIDS[0], GRIDS[1], VALID]);
        assert_eq!(host[0].1.shape(), &[2, 2, 2]);
        assert_eq!(host[2].1.to_f32()[[0]], 1.0);
        let host = m.host_inputs(&c, &[view(a), view(far)]).unwrap();
        assert_eq!(host[2].1.to_f32()[[0]], 0.0);

        let art = artifact("densesiam", &[("lr", "2.0")]);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut batch: HashMap<String, Vec<Tensor>> = HashMap::new();
        for _ in 0..c.batch {
            let g0 = random_geometry(&mut rng, (64, 64), 32);
            let g1 = random_geometry(&mut rng, (64, 64), 32);
            for (k, t) in m.host_inputs(&c, &[view(g0), view(g1)]).unwrap() {
                batch.entry(k).or_default().push(t);
            }
        }
        let host: HashMap<String, Tensor> = batch
            .into_iter()
            .map(|(k, ts)| {
                let views: Vec<_> = ts.iter().map(|t| t.to_f32()).collect();
                let views: Vec<_> = views.iter().map(|a| a.view()).collect();
                (
                    k,
                    Tensor::F32(ndarray::stack(ndarray::Axis(0), &views).unwrap()),
                )
            })
            .collect();
        let losses = losses_over_steps(&art, &host, 8);
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        assert!(losses[7] < losses[0] - 0.05, "{losses:?}");
    }

    fn create(overrides: Vec<(String, String)>) -> Box<dyn Pretext> {
        crate::pretext::create("densesiam", &overrides).unwrap()
    }
}
