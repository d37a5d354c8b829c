//! PixPro (Xie, Lin, Zhang, Cao, Lin, Hu 2021, "Propagate Yourself: Exploring Pixel-Level
//! Consistency for Unsupervised Visual Representation Learning"): pixel-to-propagation
//! consistency.
//!
//! Both views go through the student (backbone, then the projector `conv1x1 -> hidden -> BN ->
//! ReLU -> conv1x1 -> dim`) and through its momentum twin. The student's projected map `x`
//! passes the pixel propagation module (PPM):
//! `y_i = sum_j max(cos(x_i, x_j), 0)^gamma * g(x_j)`, `g` a 1x1 convolution (PixPro's one
//! transform layer). Feature cells of the two views are *positive* when their centres, mapped
//! to the original image, are closer than `pos_ratio` (0.7) times the larger cell diagonal; the
//! loss is `-cos(y_i, k_j)` averaged over the positive pairs `(i, j)` of each image (then over
//! the batch), with `k` the momentum encoder's projection of the other view, and summed over the
//! two directions (view 0 -> view 1 and view 1 -> view 0). The teacher's momentum follows
//! PixPro's cosine ramp `m = 1 - (1 - m0) (cos(pi t / T) + 1) / 2` from `m0` (0.99) to 1
//! ([`Pretext::schedule`] returns it as `ema.momentum`). LARS, base lr 1.0 at batch 256, weight
//! decay 1e-5 (biases and norm parameters excluded, as LARS does here).
//!
//! Our choices:
//! - Distances for the positive mask are measured in original-image *pixels*
//!   ([`DistanceFrame::OriginalPixels`]); PixPro's code measures them in `x / W, y / H`, which
//!   differs only for non-square images. The mask is a per-sample host input
//!   `pixpro.positive` (`[S*S, S*S]`, view 0's cells by view 1's cells, 1.0 for positives),
//!   computed by [`pixpro_positive_mask`].
//! - As in PixPro's code, `g(x)` is L2-normalised per cell before propagation, and a pair
//!   count of zero (views that don't overlap) gives that image a loss of zero
//!   (`sum / (count + 1e-6)`).
//! - The loss is the paper's `-cos` (PixPro's code reports `-2 cos`, the same up to a factor
//!   the learning rate absorbs).
//! - `ppm_layers`: 0 (identity), 1 (a 1x1 conv with bias, the default) or 2 (PixPro's
//!   `MLP2d`: conv-BN-ReLU-conv); the instance branch (BYOL-style global loss, off in PixPro's
//!   reference setting) is not implemented.
//! - No warm-up by default (`warmup_steps`, PixPro uses 5 epochs: set it for long runs).
//! - The student (and the teacher) runs once per view, as PixPro's code does; the running
//!   statistics of the two passes are chained as two PyTorch calls would update them
//!   ([`chain_norm_state`]).
//! - The mask assumes the `c5` grid of `ceil(size / 32)` cells per side (checked at build time);
//!   on 32-pixel smoke-test views that is one cell per view.
//! - Metric `positive_pairs`: positive pairs per image in the batch.

use densa_exporter::{DType, GraphBuilder, Value};
use densa_runtime::augment::{
    pixpro_positive_mask, DistanceFrame, FeatureGrid, TwoViewConfig, View, ViewConfig,
};

use super::mocov2::two_view_inputs;
use super::ops::{self, ConvHead};
use super::settings::{common, Hyper, Settings};
use super::twin::{momentum_twin, EMA_MOMENTUM};
use super::{Family, MethodInfo, Pretext, PretextContext, PretextError};
use crate::backbone::ResNet;
use crate::nn::{Conv2d, Conv2dConfig, NormMode};
use crate::train_step::ForwardGraph;

pub static INFO: MethodInfo = MethodInfo {
    name: "pixpro",
    title: "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised Visual Representation Learning",
    paper: "Xie, Lin, Zhang, Cao, Lin, Hu; CVPR 2021",
    summary: "pixel propagation of the student map vs the momentum map at positive cell pairs",
    hyper,
    create,
    tiny: TINY,
    family: Family::Backbone,
};

/// Small heads for smoke tests (see [`MethodInfo::tiny`]).
pub const TINY: &[(&str, &str)] = &[("hidden_dim", "16"), ("dim", "8")];

/// Name of the per-sample positive-mask host input.
pub const POSITIVE_MASK: &str = "pixpro.positive";

/// Stride of the backbone's last feature map (`c5`) in view pixels.
pub const C5_STRIDE: u32 = 32;

fn hyper() -> Vec<Hyper> {
    let mut h = common("lars", 1.0, 256, 1e-5);
    h.push(super::settings::batch_norm());
    h.extend([
        Hyper::float(
            "momentum",
            0.99,
            "EMA momentum of the momentum encoder at step 0 (cosine-ramped to 1)",
        ),
        Hyper::float(
            "pos_ratio",
            0.7,
            "cells are positive when closer than this times the larger cell diagonal",
        ),
        Hyper::float("ppm_gamma", 2.0, "sharpness exponent of the PPM similarity"),
        Hyper::int(
            "ppm_layers",
            1,
            "PPM transform g: 0 identity, 1 conv1x1, 2 conv-BN-ReLU-conv",
        ),
        Hyper::int("hidden_dim", 4096, "hidden width of the projector"),
        Hyper::int("dim", 256, "projection dimension"),
    ]);
    h
}

fn create(settings: Settings) -> Result<Box<dyn Pretext>, PretextError> {
    Ok(Box::new(PixPro { settings }))
}

/// The PixPro method.
pub struct PixPro {
    settings: Settings,
}

/// PixPro's cosine momentum ramp: `1 - (1 - base) (cos(pi step / total) + 1) / 2`, `base` at
/// step 0, 1 at `step == total` (steps past the end stay at 1).
pub fn momentum_ramp(base: f64, step: u64, total: u64) -> f64 {
    let t = if total == 0 {
        1.0
    } else {
        (step as f64 / total as f64).min(1.0)
    };
    1.0 - (1.0 - base) * ((std::f64::consts::PI * t).cos() + 1.0) / 2.0
}

/// The PPM's value transform `g`.
#[derive(Clone, Debug)]
pub enum PpmTransform {
    Identity,
    Conv(Conv2d),
    Mlp(Box<ConvHead>),
}

impl PpmTransform {
    /// `layers` 0, 1 or 2 (see the module docs), parameters under `name`.
    pub fn init(
        b: &mut GraphBuilder,
        name: &str,
        dim: usize,
        layers: i64,
    ) -> Result<PpmTransform, PretextError> {
        Ok(match layers {
            0 => PpmTransform::Identity,
            1 => PpmTransform::Conv(Conv2dConfig::new(dim, dim, 1).init(b, name)?),
            2 => PpmTransform::Mlp(Box::new(ConvHead::init(b, name, dim, dim, dim, true)?)),
            _ => {
                return Err(PretextError::Invalid {
                    method: "pixpro".into(),
                    problem: format!("ppm_layers = {layers}: expected 0, 1 or 2"),
                })
            }
        })
    }

    /// # Shapes
    /// `[N, C, H, W] -> [N, C, H, W]`.
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
        mode: &mut NormMode,
    ) -> Result<Value, PretextError> {
        Ok(match self {
            PpmTransform::Identity => b.unary("Identity", x),
            PpmTransform::Conv(c) => c.forward(b, x)?,
            PpmTransform::Mlp(h) => h.forward(b, x, mode)?,
        })
    }
}

/// The pixel propagation module: `y_i = sum_j max(cos(x_i, x_j), 0)^gamma * n(g(x_j))`, `n` the
/// per-cell L2 normalisation (PixPro's code).
///
/// # Shapes
/// `x`: `[N, C, H, W]` -> `[N, C, H*W]`.
pub fn pixel_propagation(
    b: &mut GraphBuilder,
    x: &Value,
    g: &PpmTransform,
    gamma: f64,
    mode: &mut NormMode,
) -> Result<Value, PretextError> {
    let gx = g.forward(b, x, mode)?;
    let gx = ops::flatten_cells(b, &gx)?;
    let value = ops::l2_normalize(b, &gx, 1)?;
    let xf = ops::flatten_cells(b, x)?;
    let xn = ops::l2_normalize(b, &xf, 1)?;
    let xt = ops::transpose(b, &xn, &[0, 2, 1])?;
    // sim[n, i, j] = cos(x_i, x_j).
    let sim = ops::matmul(b, &xt, &xn)?;
    let mut sim = b.relu(&sim);
    if gamma < 1.0 {
        // PixPro's code: keeps the power's gradient finite at zero.
        let eps = b.const_f32(1e-6);
        sim = b.add(&sim, &eps)?;
    }
    let attn = if gamma == 2.0 {
        b.mul(&sim, &sim)?
    } else {
        let p = b.const_f32(gamma as f32);
        b.pow(&sim, &p)?
    };
    // y[n, :, i] = sum_j value[n, :, j] attn[n, i, j].
    let attn_t = ops::transpose(b, &attn, &[0, 2, 1])?;
    Ok(ops::matmul(b, &value, &attn_t)?)
}

/// `sum_{i,j} P[n,i,j] cos(y[n,:,i], k[n,:,j])` per image, with `P = mask` (`[N, Sy, Sk]`) or,
/// when `mask_rows_are_keys`, `P = mask^T` (`mask` is `[N, Sk, Sy]`: the other direction of
/// the same host mask, without transposing it).
///
/// # Shapes
/// `y`: `[N, C, Sy]`, `k`: `[N, C, Sk]` -> `[N]`.
pub fn masked_cosine_sum(
    b: &mut GraphBuilder,
    y: &Value,
    k: &Value,
    mask: &Value,
    mask_rows_are_keys: bool,
) -> Result<Value, PretextError> {
    let yn = ops::l2_normalize(b, y, 1)?;
    let kn = ops::l2_normalize(b, k, 1)?;
    let cos = if mask_rows_are_keys {
        let kt = ops::transpose(b, &kn, &[0, 2, 1])?;
        ops::matmul(b, &kt, &yn)?
    } else {
        let yt = ops::transpose(b, &yn, &[0, 2, 1])?;
        ops::matmul(b, &yt, &kn)?
    };
    let masked = b.mul(&cos, mask)?;
    Ok(b.reduce_sum(&masked, &[1, 2], false)?)
}

/// PixPro's symmetric loss: with `P` the positive mask of view 0's cells (rows) by view 1's
/// cells, `-mean_n [(sum_{i,j} P_ij cos(y0_i, k1_j) + sum_{i,j} P_ij cos(y1_j, k0_i)) /
/// (sum_{i,j} P_ij + 1e-6)]`: the two directions' losses, each averaged over the image's
/// positive pairs, summed.
///
/// # Shapes
/// `y0`, `y1`, `k0`, `k1`: `[N, C, S]`, `mask`: `[N, S, S]` -> `[1]`.
pub fn pixpro_loss(
    b: &mut GraphBuilder,
    [y0, y1]: [&Value; 2],
    [k0, k1]: [&Value; 2],
    mask: &Value,
) -> Result<Value, PretextError> {
    let s01 = masked_cosine_sum(b, y0, k1, mask, false)?;
    let s10 = masked_cosine_sum(b, y1, k0, mask, true)?;
    // One division for both directions: tract 0.23.9 miscompiles two identical ones (its
    // duplicate-merging pass leaves a dangling node).
    let sum = b.add(&s01, &s10)?;
    let count = b.reduce_sum(mask, &[1, 2], false)?;
    let eps = b.const_f32(1e-6);
    let count = b.add(&count, &eps)?;
    let per_image = b.div(&sum, &count)?;
    let mean = b.reduce_mean(&per_image, &[0], true)?;
    Ok(b.neg(&mean))
}

/// The positive mask of two views as the host input `[S*S, S*S]` (1.0 for positives), for
/// `c5` grids of views of `image_size` pixels.
pub fn positive_mask_tensor(
    views: &[View],
    image_size: u32,
    pos_ratio: f64,
) -> Result<densa_exporter::Tensor, PretextError> {
    let [a, b] = views else {
        return Err(PretextError::Invalid {
            method: "pixpro".into(),
            problem: format!("expected 2 views, got {}", views.len()),
        });
    };
    let grid = FeatureGrid::of_view((image_size, image_size), C5_STRIDE);
    for v in [a, b] {
        if v.geometry.out_size != (image_size, image_size) {
            return Err(PretextError::Invalid {
                method: "pixpro".into(),
                problem: format!(
                    "view of {:?} pixels, the graph expects {image_size}x{image_size}",
                    v.geometry.out_size
                ),
            });
        }
    }
    let mask = pixpro_positive_mask(
        &a.geometry,
        grid,
        &b.geometry,
        grid,
        pos_ratio as f32,
        DistanceFrame::OriginalPixels,
    );
    let s = grid.len();
    Ok(ops::host_tensor(
        &[s, s],
        mask.iter().map(|&p| if p { 1.0 } else { 0.0 }).collect(),
    ))
}

impl Pretext for PixPro {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn views(&self, image_size: u32) -> Vec<ViewConfig> {
        let mut v = TwoViewConfig::pixpro();
        v.view1.crop.size = (image_size, image_size);
        v.view2.crop.size = (image_size, image_size);
        vec![v.view1, v.view2]
    }

    fn host_inputs(
        &self,
        ctx: &PretextContext,
        views: &[View],
    ) -> Result<Vec<(String, densa_exporter::Tensor)>, PretextError> {
        let r = self
            .settings
            .checked("pos_ratio", |v| v > 0.0, "must be positive")?;
        Ok(vec![(
            POSITIVE_MASK.to_string(),
            positive_mask_tensor(views, ctx.image_size, r)?,
        )])
    }

    fn schedule(&self, step: u64, total: u64) -> Vec<(String, f64)> {
        vec![(
            EMA_MOMENTUM.to_string(),
            momentum_ramp(self.settings.f64("momentum"), step, total),
        )]
    }

    fn build(&self, ctx: &PretextContext) -> Result<ForwardGraph, PretextError> {
        let s = &self.settings;
        let m = s.checked(
            "momentum",
            |v| (0.0..=1.0).contains(&v),
            "must be in [0, 1]",
        )?;
        s.checked("pos_ratio", |v| v > 0.0, "must be positive")?;
        let gamma = s.checked("ppm_gamma", |v| v > 0.0, "must be positive")?;
        let layers = s.i64("ppm_layers");
        if !(0..=2).contains(&layers) {
            return Err(s.bad("ppm_layers", "expected 0, 1 or 2"));
        }
        let (hidden, dim) = (s.positive("hidden_dim")?, s.positive("dim")?);
        let mut b = GraphBuilder::new("pixpro", ctx.seed);
        let [v0, v1] = two_view_inputs(&mut b, ctx)?;
        let grid = FeatureGrid::of_view((ctx.image_size, ctx.image_size), C5_STRIDE);
        let cells = grid.len();
        let mask = b.input(
            POSITIVE_MASK,
            DType::F32,
            vec![ctx.batch.into(), cells.into(), cells.into()],
        )?;
        let c5 = ctx.arch.out_channels()[3];
        let twin = momentum_twin(&mut b, m, |b| -> Result<(ResNet, ConvHead), PretextError> {
            Ok((
                ctx.arch.init(b)?,
                ConvHead::init(b, "head.projector", c5, hidden, dim, true)?,
            ))
        })?;
        let ppm = PpmTransform::init(&mut b, "head.ppm", dim, layers)?;
        // One batch-norm pass per view, chained as PyTorch's two forward calls would be.
        let mut modes = [self.settings.norm_mode()?, self.settings.norm_mode()?];
        let project = |b: &mut GraphBuilder,
                       (net, head): &(ResNet, ConvHead),
                       x: &Value,
                       mode: &mut NormMode|
         -> Result<Value, PretextError> {
            let f = net.forward_mode(b, x, mode)?;
            let d = ops::dims(b, &f.c5)?;
            if d[2] * d[3] != cells {
                return Err(PretextError::Invalid {
                    method: "pixpro".into(),
                    problem: format!(
                        "c5 is {}x{}, the positive mask assumes {}x{} (stride {C5_STRIDE})",
                        d[2], d[3], grid.height, grid.width
                    ),
                });
            }
            head.forward(b, &f.c5, mode)
        };
        let [mode0, mode1] = &mut modes;
        let q0 = project(&mut b, &twin.student, &v0, mode0)?;
        let q1 = project(&mut b, &twin.student, &v1, mode1)?;
        let y0 = pixel_propagation(&mut b, &q0, &ppm, gamma, mode0)?;
        let y1 = pixel_propagation(&mut b, &q1, &ppm, gamma, mode1)?;
        let k0 = project(&mut b, &twin.teacher, &v0, mode0)?;
        let k1 = project(&mut b, &twin.teacher, &v1, mode1)?;
        let k0 = ops::flatten_cells(&mut b, &k0)?;
        let k1 = ops::flatten_cells(&mut b, &k1)?;
        let loss = pixpro_loss(&mut b, [&y0, &y1], [&k0, &k1], &mask)?;
        let pairs = b.reduce_sum(&mask, &[0, 1, 2], true)?;
        let n = b.const_f32(ctx.batch as f32);
        let pairs = b.div(&pairs, &n)?;
        let [mode0, mode1] = modes;
        let mut state = ops::chain_norm_state(&mut b, mode0.into_state(), mode1.into_state(), 0.1)?;
        state.extend(twin.ema);
        Ok(ForwardGraph::new(b, loss)
            .metric("positive_pairs", pairs)
            .norm_state(state))
    }
}

#[cfg(test)]
#[path = "pixpro_tests.rs"]
pub(crate) mod tests;
