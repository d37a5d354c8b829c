//! CCOP (Yang, Huang, Crowley; arXiv 2021, "Contrastive Object-level Pre-training with Spatial
//! Noise Curriculum Learning"): MoCo-v2 plus object-level contrast between region proposals.
//!
//! Each image's region proposals come from selective search, once per image, cached in memory
//! ([`Pretext::prepare_image`]). A proposal takes part in a pair of views only if each view's
//! crop keeps more than `survive` (60%) of its area ([`surviving`]); up to `boxes` (`K`) of
//! the survivors are drawn per sample, the other slots are masked out. Losses, summed:
//! - image-level InfoNCE of MoCo-v2 (query `view0` by the student, key `view1` by the
//!   momentum encoder, queue `queue.global`);
//! - RoI-level InfoNCE: RoIAlign of the box in each view's last feature map (`roi_size` x
//!   `roi_size` bilinear samples at the bin centres, ONNX `GridSample` on host-computed grids),
//!   averaged and passed through an MLP head (`roi_head`, to `dim`); the key is the momentum
//!   encoder's, the negatives a queue of RoI keys (`queue.roi`); averaged over valid boxes;
//! - intra-image discrimination `relu(s_ij - s_ii + margin)` between the query RoI `i` and
//!   the key RoIs `j` of the same image whose boxes overlap with IoU < `intra_iou` (0.05),
//!   averaged over those pairs.
//!
//! Curriculum: every key box is jittered `jitters` (10) times; the jitter magnitudes grow
//! linearly over training (`xy` 0.15 -> 0.6, `wh` 0.35 -> 1.4) and the IoU floor falls (0.8 ->
//! 0.4) ([`Curriculum`]). Among the jitters with IoU >= floor, the one whose key is least
//! similar to the query is the positive (in the graph: `ArgMax` of the masked negative
//! similarity, no gradient through the choice).
//!
//! # Our choices
//! - Jitter of a box `(cx, cy, w, h)` with noise `u` uniform in `[-1, 1]^4`: `cx + u0 xy w`,
//!   `cy + u1 xy h`, `w (1 + wh)^u2`, `h (1 + wh)^u3` (scales stay positive), clipped to the
//!   key view's crop; its IoU is measured against the box's part inside that crop. The noise
//!   is drawn per sample from a generator seeded by the views' geometry (itself decided by
//!   the sample seed); the step only scales it. The unjittered box is candidate 0 and is the
//!   positive only when no jitter is valid.
//! - The RoIAlign bins are averaged before the MLP head (a `C * 7 * 7`-input MLP would hold
//!   hundreds of millions of weights on ResNet-50).
//! - Selective search runs on the image resized to `search_size` squared (DetReg's 128) with
//!   the boxes mapped back; the paper's `side > 20 px` (for COCO-sized images, long side 640)
//!   becomes `side > min_box_side * long_side / 640` in original pixels.
//! - Empty slots (fewer than `K` survivors) hold the whole view with mask 0: they add nothing
//!   to the losses, and their keys (whole-view RoIs) enter the RoI queue with the others so
//!   the queue advances by a fixed `B K` per step.
//! - Views of 32 pixels or less give a 1x1 last feature map: every RoI pools the same cell, the
//!   RoI term degenerates to an image-level one and the intra-image hinge sits at its margin.
//!   The method needs views of 64 pixels or more to be itself; the 32-pixel smoke runs only
//!   run it.
//! - The step reaches the host work through [`Pretext::sample_inputs`] (see
//!   [`super::data::PretextSource`]); the curriculum position is `step / (total - 1)`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use densa_exporter::builder::{attr, Dim};
use densa_exporter::{DType, GraphBuilder, Tensor, Value};
use densa_runtime::augment::{CropBox, FeatureGrid, View, ViewConfig, ViewGeometry};
use densa_runtime::proposals::{
    filter_proposals, selective_search_resized, ProposalFilter, SelectiveSearchConfig,
};
use image::RgbImage;
use rand::RngExt;

use super::densesiam::grid_sample;
use super::mocov2::{contrastive_defaults, moco_views, two_view_inputs, Contrastive};
use super::ops::{self, MlpHead};
use super::regioncl::{feature_side, geometry_rng};
use super::settings::{common, Hyper, Settings};
use super::twin::momentum_twin;
use super::{Family, MethodInfo, Pretext, PretextContext, PretextError, SampleInfo};
use crate::backbone::ResNet;
use crate::train_step::ForwardGraph;

pub static INFO: MethodInfo = MethodInfo {
    name: "ccop",
    title: "Contrastive Object-level Pre-training with Spatial Noise Curriculum Learning",
    paper: "Yang, Huang, Crowley; arXiv 2021",
    summary: "MoCo-v2 + RoI InfoNCE and intra-image discrimination over selective-search boxes, \
              box-jitter curriculum",
    hyper,
    create,
    tiny: TINY,
    family: Family::Backbone,
};

/// Small heads, queues and box counts for smoke tests (see [`MethodInfo::tiny`]).
pub const TINY: &[(&str, &str)] = &[
    ("queue_size", "8"),
    ("roi_queue_size", "16"),
    ("hidden_dim", "16"),
    ("dim", "8"),
    ("boxes", "2"),
    ("jitters", "3"),
    ("roi_size", "2"),
    ("search_size", "64"),
];

/// Host input: RoIAlign sampling grid of the query boxes in `view0`, `[K R, R, 2]` per sample.
pub const QUERY_GRID: &str = "ccop.query_grid";
/// Host input: sampling grid of every key candidate in `view1`, `[K J R, R, 2]` per sample
/// (`J = jitters + 1`, candidate 0 unjittered).
pub const KEY_GRID: &str = "ccop.key_grid";
/// Host input: 1 where a key candidate may be the positive, `[K, J]` per sample.
pub const KEY_VALID: &str = "ccop.key_valid";
/// Host input: 1 for boxes that survive into both views, `[K, 1]` per sample.
pub const BOX_VALID: &str = "ccop.box_valid";
/// Host input: 1 for intra-image pairs `(i, j)` of valid boxes with IoU < `intra_iou`,
/// `[K, K]` per sample.
pub const PAIRS: &str = "ccop.pairs";

/// Stride of the last feature map (c5) of every ResNet.
const STRIDE: usize = 32;
/// Long side of the images the paper's `min_box_side` is meant for (COCO).
const REFERENCE_SIDE: f32 = 640.0;

fn hyper() -> Vec<Hyper> {
    let mut h = common("sgd", 0.03, 256, 1e-4);
    h.push(super::settings::batch_norm());
    h.extend(contrastive_defaults());
    h.extend([
        Hyper::int("roi_queue_size", 65536, "RoI keys kept as negatives"),
        Hyper::int(
            "boxes",
            8,
            "boxes per image in the graph (K), masked when fewer survive",
        ),
        Hyper::int("jitters", 10, "jittered copies of each key box"),
        Hyper::int("roi_size", 7, "RoIAlign output side"),
        Hyper::float("survive", 0.6, "share of a box's area each crop must keep"),
        Hyper::float("roi_weight", 1.0, "weight of the RoI InfoNCE"),
        Hyper::float(
            "intra_weight",
            1.0,
            "weight of the intra-image discrimination",
        ),
        Hyper::float("intra_margin", 0.4, "margin of the intra-image hinge"),
        Hyper::float(
            "intra_iou",
            0.05,
            "pairs below this IoU are intra-image negatives",
        ),
        Hyper::float(
            "jitter_xy_start",
            0.15,
            "centre jitter (box sides) at the start",
        ),
        Hyper::float("jitter_xy_end", 0.6, "centre jitter (box sides) at the end"),
        Hyper::float(
            "jitter_wh_start",
            0.35,
            "size jitter at the start: scale (1 + wh)^u",
        ),
        Hyper::float("jitter_wh_end", 1.4, "size jitter at the end"),
        Hyper::float(
            "iou_floor_start",
            0.8,
            "smallest IoU of a valid jitter at the start",
        ),
        Hyper::float(
            "iou_floor_end",
            0.4,
            "smallest IoU of a valid jitter at the end",
        ),
        Hyper::float(
            "min_box_side",
            20.0,
            "proposal sides must exceed this many pixels of a 640-pixel image (scaled)",
        ),
        Hyper::int(
            "search_size",
            128,
            "selective search on the image resized to this square",
        ),
    ]);
    h
}

fn create(settings: Settings) -> Result<Box<dyn Pretext>, PretextError> {
    let c = CcopConfig::read(&settings)?;
    Ok(Box::new(Ccop {
        settings,
        config: c,
        proposals: Mutex::new(HashMap::new()),
    }))
}

/// The box-jitter curriculum: magnitudes and IoU floor, linear in training progress.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Curriculum {
    pub xy: (f64, f64),
    pub wh: (f64, f64),
    pub iou_floor: (f64, f64),
}

/// The curriculum at one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JitterScale {
    pub xy: f64,
    pub wh: f64,
    pub iou_floor: f64,
}

impl Curriculum {
    /// The paper's: xy 0.15 -> 0.6, wh 0.35 -> 1.4, IoU floor 0.8 -> 0.4.
    pub fn paper() -> Curriculum {
        Curriculum {
            xy: (0.15, 0.6),
            wh: (0.35, 1.4),
            iou_floor: (0.8, 0.4),
        }
    }

    /// The values at `step` of `total` (progress `step / (total - 1)`, clamped to `[0, 1]`;
    /// the start values when `total` is unknown (0)).
    pub fn at(&self, step: u64, total: u64) -> JitterScale {
        let t = if total > 1 {
            (step as f64 / (total - 1) as f64).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let lerp = |(a, b): (f64, f64)| a + (b - a) * t;
        JitterScale {
            xy: lerp(self.xy),
            wh: lerp(self.wh),
            iou_floor: lerp(self.iou_floor),
        }
    }
}

/// The resolved, checked settings of CCOP beyond MoCo-v2's.
#[derive(Clone, Debug)]
pub struct CcopConfig {
    pub boxes: usize,
    pub jitters: usize,
    pub roi_size: usize,
    pub survive: f32,
    pub intra_iou: f32,
    pub curriculum: Curriculum,
    pub min_box_side: f32,
    pub search_size: u32,
}

impl CcopConfig {
    fn read(s: &Settings) -> Result<CcopConfig, PretextError> {
        let unit = |k: &str| s.checked(k, |v| (0.0..=1.0).contains(&v), "must be in [0, 1]");
        let nonneg = |k: &str| s.checked(k, |v| v >= 0.0, "must be non-negative");
        Ok(CcopConfig {
            boxes: s.positive("boxes")?,
            jitters: s.positive("jitters")?,
            roi_size: s.positive("roi_size")?,
            survive: unit("survive")? as f32,
            intra_iou: unit("intra_iou")? as f32,
            curriculum: Curriculum {
                xy: (nonneg("jitter_xy_start")?, nonneg("jitter_xy_end")?),
                wh: (nonneg("jitter_wh_start")?, nonneg("jitter_wh_end")?),
                iou_floor: (unit("iou_floor_start")?, unit("iou_floor_end")?),
            },
            min_box_side: nonneg("min_box_side")? as f32,
            search_size: s.positive("search_size")? as u32,
        })
    }

    /// Key candidates per box: the unjittered box and its jitters.
    pub fn candidates(&self) -> usize {
        self.jitters + 1
    }
}

/// The CCOP method.
pub struct Ccop {
    settings: Settings,
    config: CcopConfig,
    /// Filtered proposals per image index, original pixels.
    proposals: Mutex<HashMap<usize, Arc<Vec<CropBox>>>>,
}

/// Intersection over union of two boxes (0 when either is empty).
pub fn iou(a: &CropBox, b: &CropBox) -> f32 {
    let inter = a.intersect(b).map_or(0.0, |i| i.area());
    let union = a.area() + b.area() - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Whether `crop` keeps more than `keep` of the area of `b` (original coordinates).
pub fn survives(b: &CropBox, crop: &CropBox, keep: f32) -> bool {
    let inter = b.intersect(crop).map_or(0.0, |i| i.area());
    b.area() > 0.0 && inter > keep * b.area()
}

/// Indices of the boxes that survive into every view (see [`survives`]).
pub fn surviving(boxes: &[CropBox], views: &[&ViewGeometry], keep: f32) -> Vec<usize> {
    (0..boxes.len())
        .filter(|&i| views.iter().all(|g| survives(&boxes[i], &g.crop, keep)))
        .collect()
}

/// `b` jittered by noise `u` (each in `[-1, 1]`) at `scale` (see the module docs), clipped
/// to `crop`; `None` when nothing of it is left.
pub fn jitter(b: &CropBox, u: [f32; 4], scale: &JitterScale, crop: &CropBox) -> Option<CropBox> {
    let (w, h) = (b.width() as f64, b.height() as f64);
    let cx = (b.x0 + b.x1) as f64 / 2.0 + u[0] as f64 * scale.xy * w;
    let cy = (b.y0 + b.y1) as f64 / 2.0 + u[1] as f64 * scale.xy * h;
    let nw = w * (1.0 + scale.wh).powf(u[2] as f64);
    let nh = h * (1.0 + scale.wh).powf(u[3] as f64);
    let j = CropBox::new(
        (cx - nw / 2.0) as f32,
        (cy - nh / 2.0) as f32,
        (cx + nw / 2.0) as f32,
        (cy + nh / 2.0) as f32,
    );
    j.intersect(crop)
}

/// The feature map of a view: `feature_side` cells of [`STRIDE`] pixels per axis.
fn map_of(g: &ViewGeometry) -> FeatureGrid {
    FeatureGrid::new(
        feature_side(g.out_size.1 as usize),
        feature_side(g.out_size.0 as usize),
        STRIDE as f32,
    )
}

/// RoIAlign's sampling points of box `b` (original coordinates) in the feature map of the
/// view `g`: the centres of `size x size` bins of the box in view pixels, in `GridSample`'s
/// `align_corners = 0` coordinates (the map spans `cells * stride` view pixels).
///
/// # Shapes
/// returns `size * size * 2` values, row-major `[size, size, 2]`, `(x, y)` last.
pub fn roi_grid(b: &CropBox, g: &ViewGeometry, size: usize) -> Vec<f32> {
    let v = g.box_to_view(b);
    let map = map_of(g);
    let (w, h) = (
        map.width as f32 * map.stride,
        map.height as f32 * map.stride,
    );
    let mut out = Vec::with_capacity(size * size * 2);
    for i in 0..size {
        for j in 0..size {
            let u = v.x0 + (j as f32 + 0.5) * v.width() / size as f32;
            let y = v.y0 + (i as f32 + 0.5) * v.height() / size as f32;
            out.push(2.0 * u / w - 1.0);
            out.push(2.0 * y / h - 1.0);
        }
    }
    out
}

/// The host work of one sample: which boxes, their grids, the jitters and the masks.
#[derive(Clone, Debug)]
pub struct SampleBoxes {
    /// Per slot: the box (original coordinates) or `None` for an empty slot.
    pub boxes: Vec<Option<CropBox>>,
    /// Per slot and candidate: the key box (original coordinates, inside the key crop) and
    /// whether it may be the positive.
    pub candidates: Vec<Vec<(CropBox, bool)>>,
    /// IoU of each jitter (candidates 1..) with its box, for checks.
    pub jitter_iou: Vec<Vec<f32>>,
}

impl Ccop {
    /// The config.
    pub fn config(&self) -> &CcopConfig {
        &self.config
    }

    /// Selective search on `image` and the CCOP filter (see the module docs).
    pub fn proposals_of(&self, image: &RgbImage) -> Result<Vec<CropBox>, PretextError> {
        let s = self.config.search_size;
        let props = selective_search_resized(image, s, s, &SelectiveSearchConfig::default())
            .map_err(|e| PretextError::Invalid {
                method: INFO.name.into(),
                problem: format!("selective search: {e}"),
            })?;
        let long = image.width().max(image.height()) as f32;
        let filter = ProposalFilter {
            min_side: self.config.min_box_side * long / REFERENCE_SIDE,
            ..ProposalFilter::ccop()
        };
        Ok(filter_proposals(&props, &filter)
            .into_iter()
            .map(|p| CropBox::new(p.x0, p.y0, p.x1, p.y1))
            .collect())
    }

    fn cached_proposals(
        &self,
        index: usize,
        image: &RgbImage,
    ) -> Result<Arc<Vec<CropBox>>, PretextError> {
        if let Some(p) = self.lock().get(&index) {
            return Ok(p.clone());
        }
        let p = Arc::new(self.proposals_of(image)?);
        self.lock().insert(index, p.clone());
        Ok(p)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<Vec<CropBox>>>> {
        // A panic elsewhere cannot leave the map half-written (inserts are single calls).
        self.proposals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chooses the boxes of one sample among `proposals` and jitters them at `scale`, with
    /// noise from a generator seeded by the views' geometry.
    pub fn sample_boxes(
        &self,
        proposals: &[CropBox],
        views: &[View],
        scale: &JitterScale,
    ) -> SampleBoxes {
        let c = &self.config;
        let (g0, g1) = (&views[0].geometry, &views[1].geometry);
        let mut rng = geometry_rng(views);
        let mut alive = surviving(proposals, &[g0, g1], c.survive);
        // A random K of the survivors (partial Fisher-Yates).
        let k = c.boxes.min(alive.len());
        for i in 0..k {
            let j = rng.random_range(i..alive.len());
            alive.swap(i, j);
        }
        alive.truncate(k);
        let mut boxes = Vec::with_capacity(c.boxes);
        let mut candidates = Vec::with_capacity(c.boxes);
        let mut jitter_iou = Vec::with_capacity(c.boxes);
        for slot in 0..c.boxes {
            let Some(&i) = alive.get(slot) else {
                boxes.push(None);
                let mut cand = vec![(g1.crop, true)];
                cand.extend((0..c.jitters).map(|_| (g1.crop, false)));
                candidates.push(cand);
                jitter_iou.push(vec![0.0; c.jitters]);
                continue;
            };
            let b = proposals[i];
            let key = b.intersect(&g1.crop).unwrap_or(b);
            let mut cand = vec![(key, false)];
            let mut ious = Vec::with_capacity(c.jitters);
            for _ in 0..c.jitters {
                let u = [0; 4].map(|_: i32| rng.random_range(-1.0f32..=1.0));
                match jitter(&key, u, scale, &g1.crop) {
                    Some(j) => {
                        let o = iou(&j, &key);
                        ious.push(o);
                        cand.push((j, o as f64 >= scale.iou_floor));
                    }
                    None => {
                        ious.push(0.0);
                        cand.push((key, false));
                    }
                }
            }
            if !cand.iter().any(|(_, v)| *v) {
                cand[0].1 = true;
            }
            boxes.push(Some(b));
            candidates.push(cand);
            jitter_iou.push(ious);
        }
        SampleBoxes {
            boxes,
            candidates,
            jitter_iou,
        }
    }

    /// The host inputs of a sample from its boxes (see the input constants).
    pub fn inputs_of(&self, s: &SampleBoxes, views: &[View]) -> Vec<(String, Tensor)> {
        let c = &self.config;
        let (g0, g1) = (&views[0].geometry, &views[1].geometry);
        let (k, j, r) = (c.boxes, c.candidates(), c.roi_size);
        let mut qg = Vec::with_capacity(k * r * r * 2);
        let mut kg = Vec::with_capacity(k * j * r * r * 2);
        let mut kv = Vec::with_capacity(k * j);
        let mut bv = Vec::with_capacity(k);
        for slot in 0..k {
            let qbox = s.boxes[slot]
                .map(|b| b.intersect(&g0.crop).unwrap_or(b))
                .unwrap_or(g0.crop);
            qg.extend(roi_grid(&qbox, g0, r));
            for (cb, valid) in &s.candidates[slot] {
                kg.extend(roi_grid(cb, g1, r));
                kv.push(if *valid { 1.0 } else { 0.0 });
            }
            bv.push(if s.boxes[slot].is_some() { 1.0 } else { 0.0 });
        }
        let mut pairs = vec![0.0f32; k * k];
        for a in 0..k {
            for b in 0..k {
                if let (Some(x), Some(y)) = (s.boxes[a], s.boxes[b]) {
                    if a != b && iou(&x, &y) < c.intra_iou {
                        pairs[a * k + b] = 1.0;
                    }
                }
            }
        }
        vec![
            (QUERY_GRID.into(), ops::host_tensor(&[k * r, r, 2], qg)),
            (KEY_GRID.into(), ops::host_tensor(&[k * j * r, r, 2], kg)),
            (KEY_VALID.into(), ops::host_tensor(&[k, j], kv)),
            (BOX_VALID.into(), ops::host_tensor(&[k, 1], bv)),
            (PAIRS.into(), ops::host_tensor(&[k, k], pairs)),
        ]
    }
}

/// RoIAlign of `n` boxes per image, bins averaged: `GridSample` of `map` at `grid` (the boxes'
/// `r x r` grids stacked along the rows), then the mean over each box's bins.
///
/// # Shapes
/// `map [B, C, H, W], grid [B, n r, r, 2] -> [B n, C]`.
pub fn roi_features(
    b: &mut GraphBuilder,
    map: &Value,
    grid: &Value,
    n: usize,
    r: usize,
) -> Result<Value, PretextError> {
    let d = ops::dims(b, map)?;
    let (batch, c) = (d[0], d[1]);
    let s = grid_sample(b, map, grid)?;
    let s = b.reshape(&s, &[batch as i64, c as i64, n as i64, (r * r) as i64])?;
    let m = b.reduce_mean(&s, &[3], false)?;
    let m = ops::transpose(b, &m, &[0, 2, 1])?;
    Ok(b.reshape(&m, &[(batch * n) as i64, c as i64])?)
}

/// The hardest valid key: per row, the candidate of `keys` least similar to `q` among those
/// with `valid = 1`.
///
/// # Shapes
/// `q [N, D], keys [N, J, D], valid [N, J] -> [N, D]`.
pub fn hardest_key(
    b: &mut GraphBuilder,
    q: &Value,
    keys: &Value,
    valid: &Value,
) -> Result<Value, PretextError> {
    let d = ops::dims(b, keys)?;
    let (n, dim) = (d[0], d[2]);
    let q3 = b.reshape(q, &[n as i64, 1, dim as i64])?;
    let sim = ops::dot(b, &q3, keys, 2)?;
    let sim = b.reshape(&sim, &[n as i64, d[1] as i64])?;
    // Score -sim, invalid candidates pushed 10 below any similarity.
    let one = b.const_f32(1.0);
    let invalid = b.sub(&one, valid)?;
    let ten = b.const_f32(10.0);
    let penalty = b.mul(&invalid, &ten)?;
    let neg = b.neg(&sim);
    let score = b.sub(&neg, &penalty)?;
    let idx = b.node1(
        "ArgMax",
        Some("hardest_jitter"),
        &[&score],
        vec![attr::int("axis", 1), attr::int("keepdims", 1)],
        DType::I64,
        vec![Dim::from(n), Dim::from(1)],
    );
    let axes = b.const_i64(&[2]);
    let idx = b.node1(
        "Unsqueeze",
        None,
        &[&idx, &axes],
        vec![],
        DType::I64,
        vec![Dim::from(n), Dim::from(1), Dim::from(1)],
    );
    let shape = b.const_i64(&[n as i64, 1, dim as i64]);
    let idx = b.node1(
        "Expand",
        None,
        &[&idx, &shape],
        vec![],
        DType::I64,
        vec![Dim::from(n), Dim::from(1), Dim::from(dim)],
    );
    let picked = b.node1(
        "GatherElements",
        Some("positive_key"),
        &[keys, &idx],
        vec![attr::int("axis", 1)],
        DType::F32,
        vec![Dim::from(n), Dim::from(1), Dim::from(dim)],
    );
    Ok(b.reshape(&picked, &[n as i64, dim as i64])?)
}

/// `sum(x) / max(sum(w), 1)`: a mean over the entries a mask selects.
fn masked_mean(
    b: &mut GraphBuilder,
    x: &Value,
    w: &Value,
) -> Result<ops::MaskedMean, PretextError> {
    let xw = b.mul(x, w)?;
    let rank = ops::dims(b, &xw)?.len();
    let axes: Vec<i64> = (0..rank as i64).collect();
    let num = b.reduce_sum(&xw, &axes, false)?;
    let count = b.reduce_sum(
        w,
        &(0..ops::dims(b, w)?.len() as i64).collect::<Vec<_>>(),
        false,
    )?;
    Ok(ops::masked_mean(b, &num, &count)?)
}

/// InfoNCE of `q` against `k` and the `queue`, averaged over the rows with `valid = 1`.
///
/// # Shapes
/// `q, k [N, D], queue [K, D], valid [N, 1] -> []`.
pub fn masked_info_nce(
    b: &mut GraphBuilder,
    q: &Value,
    k: &Value,
    queue: &Value,
    valid: &Value,
    t: f64,
) -> Result<ops::MaskedMean, PretextError> {
    let pos = ops::dot(b, q, k, 1)?;
    let qt = ops::transpose(b, queue, &[1, 0])?;
    let neg = ops::matmul(b, q, &qt)?;
    let logits = b.concat(&[&pos, &neg], 1)?;
    let inv_t = b.const_f32((1.0 / t) as f32);
    let logits = b.mul(&logits, &inv_t)?;
    let logp = b.node1(
        "LogSoftmax",
        Some("roi_log_softmax"),
        &[&logits],
        vec![attr::int("axis", 1)],
        DType::F32,
        logits.shape().to_vec(),
    );
    let first = ops::slice(b, &logp, 1, 0, 1)?;
    let nll = b.neg(&first);
    masked_mean(b, &nll, valid)
}

/// Intra-image discrimination: `relu(q_i . k_j - q_i . k_i + margin)` averaged over the pairs
/// with `pairs[i, j] = 1`.
///
/// # Shapes
/// `q, k [B, K, D], pairs [B, K, K] -> []`.
pub fn intra_loss(
    b: &mut GraphBuilder,
    q: &Value,
    k: &Value,
    pairs: &Value,
    margin: f64,
) -> Result<ops::MaskedMean, PretextError> {
    let kt = ops::transpose(b, k, &[0, 2, 1])?;
    let s = ops::matmul(b, q, &kt)?;
    let own = ops::dot(b, q, k, 2)?;
    let d = b.sub(&s, &own)?;
    let m = b.const_f32(margin as f32);
    let d = b.add(&d, &m)?;
    let h = b.relu(&d);
    masked_mean(b, &h, pairs)
}

fn batch_input(
    b: &mut GraphBuilder,
    name: &str,
    batch: usize,
    dims: &[usize],
) -> Result<Value, PretextError> {
    let mut shape = vec![Dim::from(batch)];
    shape.extend(dims.iter().map(|&d| Dim::from(d)));
    Ok(b.input(name, DType::F32, shape)?)
}

impl Pretext for Ccop {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn views(&self, image_size: u32) -> Vec<ViewConfig> {
        moco_views(image_size)
    }

    fn prepares_images(&self) -> bool {
        true
    }

    fn prepare_image(&self, index: usize, image: &RgbImage) -> Result<(), PretextError> {
        self.cached_proposals(index, image).map(|_| ())
    }

    fn sample_inputs(
        &self,
        _ctx: &PretextContext,
        sample: &SampleInfo<'_>,
        views: &[View],
    ) -> Result<Vec<(String, Tensor)>, PretextError> {
        if views.len() != 2 {
            return Err(PretextError::Invalid {
                method: INFO.name.into(),
                problem: format!("expected 2 views, got {}", views.len()),
            });
        }
        let proposals = self.cached_proposals(sample.index, sample.image)?;
        let scale = self.config.curriculum.at(sample.step, sample.total);
        let boxes = self.sample_boxes(&proposals, views, &scale);
        Ok(self.inputs_of(&boxes, views))
    }

    fn host_inputs(
        &self,
        _ctx: &PretextContext,
        _views: &[View],
    ) -> Result<Vec<(String, Tensor)>, PretextError> {
        Err(PretextError::Invalid {
            method: INFO.name.into(),
            problem: "needs the decoded image for its proposals (use sample_inputs)".into(),
        })
    }

    fn build(&self, ctx: &PretextContext) -> Result<ForwardGraph, PretextError> {
        let s = &self.settings;
        let c = Contrastive::read(s, ctx.batch)?;
        let cfg = &self.config;
        let (t, m) = (c.temperature, c.momentum);
        let (hidden, dim) = (c.hidden_dim, c.dim);
        let (kb, j, r) = (cfg.boxes, cfg.candidates(), cfg.roi_size);
        let n = ctx.batch * kb;
        let roi_queue = s.positive("roi_queue_size")?;
        if roi_queue < n {
            return Err(s.bad(
                "roi_queue_size",
                "must hold the RoI keys of one batch (batch * boxes)",
            ));
        }
        let roi_w = s.checked("roi_weight", |v| v >= 0.0, "must be non-negative")?;
        let intra_w = s.checked("intra_weight", |v| v >= 0.0, "must be non-negative")?;
        let margin = s.f64("intra_margin");

        let mut b = GraphBuilder::new("ccop", ctx.seed);
        let [v0, v1] = two_view_inputs(&mut b, ctx)?;
        let qg = batch_input(&mut b, QUERY_GRID, ctx.batch, &[kb * r, r, 2])?;
        let kg = batch_input(&mut b, KEY_GRID, ctx.batch, &[kb * j * r, r, 2])?;
        let kvalid = batch_input(&mut b, KEY_VALID, ctx.batch, &[kb, j])?;
        let bvalid = batch_input(&mut b, BOX_VALID, ctx.batch, &[kb, 1])?;
        let pairs = batch_input(&mut b, PAIRS, ctx.batch, &[kb, kb])?;
        let c5 = ctx.arch.out_channels()[3];
        let twin = momentum_twin(
            &mut b,
            m,
            |b| -> Result<(ResNet, MlpHead, MlpHead), PretextError> {
                Ok((
                    ctx.arch.init(b)?,
                    MlpHead::init(b, "head", c5, hidden, dim)?,
                    MlpHead::init(b, "roi_head", c5, hidden, dim)?,
                ))
            },
        )?;
        let queue = ops::queue(&mut b, "queue.global", c.queue_size, dim)?;
        let rqueue = ops::queue(&mut b, "queue.roi", roi_queue, dim)?;
        let mut mode = self.settings.norm_mode()?;
        let embed = |b: &mut GraphBuilder, head: &MlpHead, p: &Value| -> Result<_, PretextError> {
            let z = head.forward(b, p)?;
            Ok(ops::l2_normalize(b, &z, 1)?)
        };

        let (net, head, roi_head) = &twin.student;
        let f = net.forward_mode(&mut b, &v0, &mut mode)?;
        let p = ops::pool(&mut b, &f.c5)?;
        let q = embed(&mut b, head, &p)?;
        let rq = roi_features(&mut b, &f.c5, &qg, kb, r)?;
        let qr = embed(&mut b, roi_head, &rq)?;

        let (tnet, thead, troi) = &twin.teacher;
        let fk = tnet.forward_mode(&mut b, &v1, &mut mode)?;
        let pk = ops::pool(&mut b, &fk.c5)?;
        let k = embed(&mut b, thead, &pk)?;
        let rk = roi_features(&mut b, &fk.c5, &kg, kb * j, r)?;
        let kc = embed(&mut b, troi, &rk)?;
        let kc = b.reshape(&kc, &[n as i64, j as i64, dim as i64])?;
        let kvalid = b.reshape(&kvalid, &[n as i64, j as i64])?;
        let kpos = hardest_key(&mut b, &qr, &kc, &kvalid)?;

        let image = ops::info_nce(&mut b, &q, &k, &queue, t)?;
        let bvalid = b.reshape(&bvalid, &[n as i64, 1])?;
        let roi_mean = masked_info_nce(&mut b, &qr, &kpos, &rqueue, &bvalid, t)?;
        let roi = roi_mean.mean.clone();
        let shape3 = [ctx.batch as i64, kb as i64, dim as i64];
        let qr3 = b.reshape(&qr, &shape3)?;
        let kp3 = b.reshape(&kpos, &shape3)?;
        let intra_mean = intra_loss(&mut b, &qr3, &kp3, &pairs, margin)?;
        let intra = intra_mean.mean.clone();

        let wr = b.const_f32(roi_w as f32);
        let wi = b.const_f32(intra_w as f32);
        let roi_term = b.mul(&roi, &wr)?;
        let intra_term = b.mul(&intra, &wi)?;
        let loss = b.add(&image, &roi_term)?;
        let loss = b.add(&loss, &intra_term)?;

        let mut state = mode.into_state();
        ops::enqueue(&mut b, &queue, &k, &mut state)?;
        ops::enqueue(&mut b, &rqueue, &kpos, &mut state)?;
        state.extend(twin.ema);
        Ok(ForwardGraph::new(b, loss)
            .metric("loss_image", image)
            .metric("loss_roi", roi)
            .metric("loss_intra", intra)
            .norm_state(state)
            .global_mean(&roi_mean.count, &roi_mean.denominator, 1.0)
            .global_mean(&intra_mean.count, &intra_mean.denominator, 1.0))
    }
}

#[cfg(test)]
#[path = "ccop_tests.rs"]
mod tests;
