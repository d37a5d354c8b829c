//! RegionCL (Xu, Zhang, Wang, Tao; ECCV 2022, "RegionCL: Exploring Contrastive Region Pairs
//! for Self-Supervised Representation Learning"), on top of MoCo-v2.
//!
//! Region swapping: image `i` of the batch and its partner `B-1-i` (the reversed batch) each
//! lose a region to the other. The composite of `i` is `view0_i * (1 - mask_i) +
//! view0_{B-1-i} * mask_i`: its *canvas* (outside the region) shows image `i`, its *paste*
//! (inside) shows the partner. The student encodes the plain query view (instance InfoNCE of
//! MoCo-v2) and the composite; on the composite's last feature map the canvas feature is the
//! masked mean outside the region and the paste feature the mean inside, both through the
//! MoCo-v2 MLP head. Region InfoNCE: the canvas's positive is the key of its own image, the
//! paste's the key of its source image (`k_{B-1-i}`); negatives are the queue plus the other
//! region of the same composite (detached, as in the official code). Loss `instance +
//! region_weight * region`, the region term averaged over the `2B` canvas and paste queries.
//!
//! # Our choices
//! - Regions are drawn per sample (the official code draws one position for the whole batch),
//!   on the host, from a generator seeded by the sample's view geometry (which the sample seed
//!   decides), so a sample's region is deterministic per sample seed. Width and height are drawn
//!   independently from `region_sides` (as the official code does), in cells of the backbone's
//!   stride-32 grid, scaled from the paper's 224-pixel views: a feature grid of `S` cells gets
//!   sides `clamp(round(side * S / grid_cells), 1, S - 1)` cells (`grid_cells` = 7: 3, 4, 5 cells
//!   at 224 px, 1 cell at 64 px), at a cell-aligned position. Then the feature-level mask is
//!   binary and the pixel mask covers exactly those cells (`[32 c, min(32 (c + 1), H))`).
//! - A grid of one cell (views of 32 pixels or less) cannot hold a canvas and a paste. There the
//!   region is `round(side * H / grid_cells)` pixels (at least 1, at most `H - 1`) at any pixel
//!   position, and the feature mask is the fraction of the one cell it covers, so canvas and
//!   paste pool the same cell and the region term degenerates to an instance term. The method
//!   needs views of 64 pixels or more to be itself; the 32-pixel smoke test only runs it.
//! - The composite is built in the graph (the partner is the batch reversed by a `Gather`),
//!   since a per-sample host input cannot see its partner. Data parallel, each rank reverses
//!   its own batch, as the official code does on each GPU.
//! - Both views keep MoCo-v2's recipe; the composite is made from `view0`.
//! - The student's pass over the composites normalises with their own batch statistics but
//!   does not update the running statistics (the plain view's pass does, once per step).

use densa_exporter::builder::{attr, Dim};
use densa_exporter::{DType, GraphBuilder, Tensor, Value};
use densa_runtime::augment::{View, ViewConfig};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::mocov2::{contrastive_defaults, moco_views, two_view_inputs, Contrastive};
use super::ops::{self, MlpHead};
use super::settings::{common, Hyper, Settings};
use super::twin::momentum_twin;
use super::{Family, MethodInfo, Pretext, PretextContext, PretextError};
use crate::backbone::ResNet;
use crate::train_step::ForwardGraph;

pub static INFO: MethodInfo = MethodInfo {
    name: "regioncl",
    title:
        "RegionCL: Exploring Contrastive Region Pairs for Self-Supervised Representation Learning",
    paper: "Xu, Zhang, Wang, Tao; ECCV 2022",
    summary: "MoCo-v2 + region swapping between image pairs: canvas and paste regions contrasted",
    hyper,
    create,
    tiny: TINY,
    family: Family::Backbone,
};

/// Small heads and queue for smoke tests (see [`MethodInfo::tiny`]).
pub const TINY: &[(&str, &str)] = &[("queue_size", "8"), ("hidden_dim", "16"), ("dim", "8")];

/// Host input: the pixel mask of the swapped region, `[1, H, W]` per sample (1 inside).
pub const PIXEL_MASK: &str = "region_pixels";
/// Host input: the region's share of each cell of the last feature map, `[1, S, S]` per sample.
pub const CELL_MASK: &str = "region_cells";

/// Stride of the last feature map (c5) of every ResNet.
const STRIDE: usize = 32;

fn hyper() -> Vec<Hyper> {
    let mut h = common("sgd", 0.03, 256, 1e-4);
    h.push(super::settings::batch_norm());
    h.extend(contrastive_defaults());
    h.push(Hyper::float(
        "region_weight",
        1.0,
        "weight of the region InfoNCE (the instance InfoNCE has weight 1)",
    ));
    h.push(Hyper::text(
        "region_sides",
        "3,4,5",
        "region sides in cells of the paper's grid (32-pixel cells of a 224-pixel view)",
    ));
    h.push(Hyper::int(
        "grid_cells",
        7,
        "cells per side of the paper's grid (224 / 32): region sides scale by S / grid_cells",
    ));
    h
}

fn create(settings: Settings) -> Result<Box<dyn Pretext>, PretextError> {
    let sides = parse_sides(&settings)?;
    settings.positive("grid_cells")?;
    Ok(Box::new(RegionCl { settings, sides }))
}

fn parse_sides(s: &Settings) -> Result<Vec<f64>, PretextError> {
    let text = s.text("region_sides");
    let sides: Vec<f64> = text
        .split(',')
        .map(|t| t.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| s.bad("region_sides", "expected comma-separated numbers"))?;
    if sides.is_empty() || sides.iter().any(|v| !v.is_finite() || *v <= 0.0) {
        return Err(s.bad("region_sides", "expected positive numbers"));
    }
    Ok(sides)
}

/// The RegionCL method.
pub struct RegionCl {
    settings: Settings,
    sides: Vec<f64>,
}

/// Side of a ResNet's last feature map for an input side of `h` pixels (the exact output
/// sizes of the stem convolution, the max pool and the three strided stages).
pub fn feature_side(h: usize) -> usize {
    let conv = |x: usize, k: usize, s: usize, p: usize| (x + 2 * p - k) / s + 1;
    let mut x = conv(h, 7, 2, 3);
    x = conv(x, 3, 2, 1);
    for _ in 0..3 {
        x = conv(x, 3, 2, 1);
    }
    x
}

/// A swapped region in view pixels: columns `x0..x1`, rows `y0..y1`, and its share of each
/// cell of the `s_h x s_w` feature grid (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    pub x0: usize,
    pub x1: usize,
    pub y0: usize,
    pub y1: usize,
    pub grid: (usize, usize),
    pub cells: Vec<f32>,
}

/// One axis of a region: `(start, end)` in pixels and the covered share of each cell.
fn draw_axis(
    rng: &mut ChaCha8Rng,
    pixels: usize,
    cells: usize,
    sides: &[f64],
    grid_cells: usize,
) -> ((usize, usize), Vec<f32>) {
    let side = sides[rng.random_range(0..sides.len())];
    if cells >= 2 {
        let n = ((side * cells as f64 / grid_cells as f64).round() as usize).clamp(1, cells - 1);
        let c0 = rng.random_range(0..=cells - n);
        let start = c0 * STRIDE;
        let end = ((c0 + n) * STRIDE).min(pixels);
        let share = (0..cells)
            .map(|c| if c >= c0 && c < c0 + n { 1.0 } else { 0.0 })
            .collect();
        ((start, end), share)
    } else {
        let n = ((side * pixels as f64 / grid_cells as f64).round() as usize)
            .clamp(1, pixels.saturating_sub(1).max(1));
        let start = rng.random_range(0..=pixels - n);
        ((start, start + n), vec![n as f32 / pixels as f32])
    }
}

/// Draws the swapped region of a `h x w` view (see the module docs for the rule).
pub fn draw_region(
    rng: &mut ChaCha8Rng,
    h: usize,
    w: usize,
    sides: &[f64],
    grid_cells: usize,
) -> Region {
    let (sh, sw) = (feature_side(h), feature_side(w));
    let ((y0, y1), ry) = draw_axis(rng, h, sh, sides, grid_cells);
    let ((x0, x1), rx) = draw_axis(rng, w, sw, sides, grid_cells);
    let cells = ry
        .iter()
        .flat_map(|a| rx.iter().map(move |b| a * b))
        .collect();
    Region {
        x0,
        x1,
        y0,
        y1,
        grid: (sh, sw),
        cells,
    }
}

impl Region {
    /// The host inputs: pixel mask `[1, h, w]` and cell mask `[1, S_h, S_w]`.
    pub fn masks(&self, h: usize, w: usize) -> (Tensor, Tensor) {
        let mut px = vec![0.0f32; h * w];
        for y in self.y0..self.y1 {
            for x in self.x0..self.x1 {
                px[y * w + x] = 1.0;
            }
        }
        (
            ops::host_tensor(&[1, h, w], px),
            ops::host_tensor(&[1, self.grid.0, self.grid.1], self.cells.clone()),
        )
    }
}

/// A generator determined by the views' geometry (itself decided by the sample seed).
pub fn geometry_rng(views: &[View]) -> ChaCha8Rng {
    let mut h: u64 = 0x5245_4749_4f4e_434c; // "REGIONCL"
    let mut mix = |v: u64| {
        // splitmix64 step over the running hash.
        h ^= v;
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h = z ^ (z >> 31);
    };
    for v in views {
        let g = &v.geometry;
        for f in [g.crop.x0, g.crop.y0, g.crop.x1, g.crop.y1] {
            mix(f.to_bits() as u64);
        }
        mix(g.flipped as u64);
        mix(((g.out_size.0 as u64) << 32) | g.out_size.1 as u64);
        mix(((g.image_size.0 as u64) << 32) | g.image_size.1 as u64);
    }
    ChaCha8Rng::seed_from_u64(h)
}

/// `x [B, ...]` with its batch reversed: row `i` is row `B-1-i`.
pub fn reverse_batch(b: &mut GraphBuilder, x: &Value) -> Result<Value, PretextError> {
    let d = ops::dims(b, x)?;
    let idx: Vec<i64> = (0..d[0] as i64).rev().collect();
    let idx = b.const_i64(&idx);
    Ok(b.node1(
        "Gather",
        Some("partner"),
        &[x, &idx],
        vec![attr::int("axis", 0)],
        x.dtype(),
        x.shape().to_vec(),
    ))
}

/// The composites `view * (1 - mask) + reverse_batch(view) * mask`.
///
/// # Shapes
/// `view [B, 3, H, W], mask [B, 1, H, W] -> [B, 3, H, W]`.
pub fn composite(b: &mut GraphBuilder, view: &Value, mask: &Value) -> Result<Value, PretextError> {
    let partner = reverse_batch(b, view)?;
    let one = b.const_f32(1.0);
    let keep = b.sub(&one, mask)?;
    let canvas = b.mul(view, &keep)?;
    let paste = b.mul(&partner, mask)?;
    Ok(b.add(&canvas, &paste)?)
}

/// Canvas and paste features: the means of `features` weighted by `1 - mask` and by `mask`.
///
/// # Shapes
/// `features [B, C, S, S], mask [B, 1, S, S] -> canvas [B, C], paste [B, C]`.
pub fn masked_means(
    b: &mut GraphBuilder,
    features: &Value,
    mask: &Value,
) -> Result<(Value, Value), PretextError> {
    let mean = |b: &mut GraphBuilder, w: &Value| -> Result<Value, PretextError> {
        let fw = b.mul(features, w)?;
        let num = b.reduce_sum(&fw, &[2, 3], false)?;
        let den = b.reduce_sum(w, &[2, 3], false)?;
        Ok(b.div(&num, &den)?)
    };
    let one = b.const_f32(1.0);
    let outside = b.sub(&one, mask)?;
    let canvas = mean(b, &outside)?;
    let paste = mean(b, mask)?;
    Ok((canvas, paste))
}

/// InfoNCE with one extra negative per query: `CE([q.k, q.extra, q.queue^T] / t, 0)`, mean over
/// `N` (RegionCL's region loss; `extra` is the other region of the same composite).
///
/// # Shapes
/// `q, k, extra [N, D], queue [K, D] -> []`.
pub fn info_nce_extra(
    b: &mut GraphBuilder,
    q: &Value,
    k: &Value,
    extra: &Value,
    queue: &Value,
    t: f64,
) -> Result<Value, PretextError> {
    let pos = ops::dot(b, q, k, 1)?;
    let intra = ops::dot(b, q, extra, 1)?;
    let qt = ops::transpose(b, queue, &[1, 0])?;
    let neg = ops::matmul(b, q, &qt)?;
    let logits = b.concat(&[&pos, &intra, &neg], 1)?;
    let inv_t = b.const_f32((1.0 / t) as f32);
    let logits = b.mul(&logits, &inv_t)?;
    Ok(ops::ce_first(b, &logits)?)
}

/// The per-sample mask input of shape `[B, 1, h, w]`.
fn mask_input(
    b: &mut GraphBuilder,
    name: &str,
    batch: usize,
    h: usize,
    w: usize,
) -> Result<Value, PretextError> {
    Ok(b.input(
        name,
        DType::F32,
        vec![Dim::from(batch), Dim::from(1), Dim::from(h), Dim::from(w)],
    )?)
}

impl Pretext for RegionCl {
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
        let Some(v0) = views.first() else {
            return Err(PretextError::Invalid {
                method: INFO.name.into(),
                problem: "no views".into(),
            });
        };
        let (_, h, w) = v0.pixels.dim();
        if h < 2 || w < 2 {
            return Err(PretextError::Invalid {
                method: INFO.name.into(),
                problem: format!("view of {w}x{h} pixels has no room for a region"),
            });
        }
        let grid_cells = self.settings.positive("grid_cells")?;
        let mut rng = geometry_rng(views);
        let region = draw_region(&mut rng, h, w, &self.sides, grid_cells);
        let (px, cells) = region.masks(h, w);
        Ok(vec![(PIXEL_MASK.into(), px), (CELL_MASK.into(), cells)])
    }

    fn build(&self, ctx: &PretextContext) -> Result<ForwardGraph, PretextError> {
        let s = &self.settings;
        let c = Contrastive::read(s, ctx.batch)?;
        let (t, m) = (c.temperature, c.momentum);
        let weight = s.checked("region_weight", |v| v >= 0.0, "must be non-negative")?;
        let (k_size, hidden, dim) = (c.queue_size, c.hidden_dim, c.dim);
        let size = ctx.image_size as usize;
        let grid = feature_side(size);
        let mut b = GraphBuilder::new("regioncl", ctx.seed);
        let [v0, v1] = two_view_inputs(&mut b, ctx)?;
        let px_mask = mask_input(&mut b, PIXEL_MASK, ctx.batch, size, size)?;
        let cell_mask = mask_input(&mut b, CELL_MASK, ctx.batch, grid, grid)?;
        let c5 = ctx.arch.out_channels()[3];
        let twin = momentum_twin(&mut b, m, |b| -> Result<(ResNet, MlpHead), PretextError> {
            Ok((
                ctx.arch.init(b)?,
                MlpHead::init(b, "head", c5, hidden, dim)?,
            ))
        })?;
        let queue = ops::queue(&mut b, "queue.global", k_size, dim)?;
        let mut mode = self.settings.norm_mode()?;
        let embed = |b: &mut GraphBuilder, head: &MlpHead, p: &Value| -> Result<_, PretextError> {
            let z = head.forward(b, p)?;
            Ok(ops::l2_normalize(b, &z, 1)?)
        };
        let (net, head) = &twin.student;
        let f = net.forward_mode(&mut b, &v0, &mut mode)?;
        let p = ops::pool(&mut b, &f.c5)?;
        let q = embed(&mut b, head, &p)?;

        let mixed = composite(&mut b, &v0, &px_mask)?;
        // Batch statistics of the composites, but their running statistics are not recorded:
        // the plain view's pass updates them (one update per buffer and step).
        let fm = net.forward_mode(&mut b, &mixed, &mut self.settings.norm_mode()?)?;
        let (canvas, paste) = masked_means(&mut b, &fm.c5, &cell_mask)?;
        let q_canvas = embed(&mut b, head, &canvas)?;
        let q_paste = embed(&mut b, head, &paste)?;

        let (tnet, thead) = &twin.teacher;
        let fk = tnet.forward_mode(&mut b, &v1, &mut mode)?;
        let pk = ops::pool(&mut b, &fk.c5)?;
        let k = embed(&mut b, thead, &pk)?;
        let k_source = reverse_batch(&mut b, &k)?;

        let instance = ops::info_nce(&mut b, &q, &k, &queue, t)?;
        // The other region of the same composite, detached (official code's `.detach()`).
        let canvas_neg = b.unary("Identity", &q_canvas);
        let paste_neg = b.unary("Identity", &q_paste);
        let l_canvas = info_nce_extra(&mut b, &q_canvas, &k, &paste_neg, &queue, t)?;
        let l_paste = info_nce_extra(&mut b, &q_paste, &k_source, &canvas_neg, &queue, t)?;
        let sum = b.add(&l_canvas, &l_paste)?;
        let half = b.const_f32(0.5);
        let region = b.mul(&sum, &half)?;
        let w = b.const_f32(weight as f32);
        let weighted = b.mul(&region, &w)?;
        let loss = b.add(&instance, &weighted)?;

        let mut state = mode.into_state();
        ops::enqueue(&mut b, &queue, &k, &mut state)?;
        state.extend(twin.ema);
        Ok(ForwardGraph::new(b, loss)
            .metric("loss_instance", instance)
            .metric("loss_region", region)
            .stop_gradient(&canvas_neg)
            .stop_gradient(&paste_neg)
            .norm_state(state))
    }
}

#[cfg(test)]
#[path = "regioncl_tests.rs"]
pub(crate) mod tests;
