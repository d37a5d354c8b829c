//! COCO detection and instance segmentation evaluation: pycocotools' `COCOeval` (iouType
//! `bbox` or `segm`), reproduced number for number.
//!
//! What COCOeval does, and so what this does:
//! - Per image and category, detections are sorted by score (stable, as numpy's mergesort:
//!   equal scores keep file order) and cut to the largest `maxDets` (100): more than 100
//!   detections of one class in one image are dropped lowest score first.
//! - IoU is box IoU (`bbox`) or mask IoU (`segm`; polygons rasterised like `rleFrPoly`). A crowd
//!   ground truth (`iscrowd: 1`) counts intersection over the *detection's* area, can absorb
//!   any number of detections, and is ignored: matching it neither helps nor hurts.
//! - For each area range (all, small < 32², medium < 96², large; bounds inclusive on both sides)
//!   a ground truth is ignored when crowd or its `area` field is outside the range, and an
//!   unmatched detection is ignored when its area (box `w*h` when the results have boxes, else
//!   the mask's) is outside. Ignored ground truths are tried last; a detection takes the best
//!   IoU >= threshold (`min(t, 1 - 1e-10)`) among ground truths not yet taken, and never leaves
//!   a regular match for an ignored one.
//! - Matching is done once with 100 detections per image; the `maxDets` 1 and 10 settings keep
//!   the first 1 or 10 of each image with the matches found with 100.
//! - Per category, area range and maxDets: detections of all images are sorted by score
//!   (stable), precision is made monotone from the right, and sampled at the recall thresholds
//!   0:.01:1 (first index with recall >= threshold; 0 beyond the reached recall). Categories
//!   without (non-ignored) ground truth are -1 and left out of the means; a summary stat with
//!   nothing to average is -1.
//! - Thresholds are numpy's `linspace` values (`i * step + start`), so recall comparisons tie
//!   exactly as in pycocotools.
//!
//! Our choices: a matched ground truth is tracked by index, not by id, so a ground truth with
//! id 0 matches normally (pycocotools stores ids in a float array where 0 means "unmatched").
//! Categories and images are processed in parallel (rayon); results do not depend on it.

use std::collections::HashMap;

use ndarray::{s, Array4, Array5};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::coco::{Dataset, Results, Segmentation};
use crate::mask::{box_iou, Rle};

/// Which overlap COCOeval measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IouType {
    /// Box IoU on `bbox` `[x, y, w, h]`.
    Bbox,
    /// Mask IoU on `segmentation` (polygons or RLE).
    Segm,
}

impl std::fmt::Display for IouType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IouType::Bbox => "bbox",
            IouType::Segm => "segm",
        })
    }
}

/// One area range: a label and inclusive bounds in pixels².
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AreaRange {
    pub label: String,
    pub min: f64,
    pub max: f64,
}

/// COCOeval's `Params` for `bbox`/`segm`. [`CocoParams::new`] gives pycocotools' defaults;
/// [`CocoEvaluation::stats`] assumes them (as `summarize` does).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CocoParams {
    pub iou_type: IouType,
    /// `linspace(.5, .95, 10)`.
    pub iou_thresholds: Vec<f64>,
    /// `linspace(0, 1, 101)`.
    pub recall_thresholds: Vec<f64>,
    /// `[1, 10, 100]`, ascending; the last is the per-image, per-category cut.
    pub max_dets: Vec<usize>,
    /// all `[0, 1e5²]`, small `[0, 32²]`, medium `[32², 96²]`, large `[96², 1e5²]`.
    pub area_ranges: Vec<AreaRange>,
}

/// numpy's `linspace(start, stop, num)` bit for bit: `i * step + start`, the last exactly `stop`.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / (num - 1) as f64;
    (0..num)
        .map(|i| {
            if i == num - 1 {
                stop
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

impl CocoParams {
    pub fn new(iou_type: IouType) -> Self {
        let range = |label: &str, min: f64, max: f64| AreaRange {
            label: label.to_string(),
            min,
            max,
        };
        CocoParams {
            iou_type,
            iou_thresholds: linspace(0.5, 0.95, 10),
            recall_thresholds: linspace(0.0, 1.0, 101),
            max_dets: vec![1, 10, 100],
            area_ranges: vec![
                range("all", 0.0, 1e5 * 1e5),
                range("small", 0.0, 32.0 * 32.0),
                range("medium", 32.0 * 32.0, 96.0 * 96.0),
                range("large", 96.0 * 96.0, 1e5 * 1e5),
            ],
        }
    }
}

/// What prevents an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("ground truth annotations[{index}] (id {id}): segmentation: {problem}")]
    GtSegmentation {
        index: usize,
        id: u64,
        problem: String,
    },
    #[error("detections[{index}].segmentation: {problem}")]
    DtSegmentation { index: usize, problem: String },
    #[error("detections[{index}].image_id {image_id} is not an image of the ground truth")]
    UnknownImage { index: usize, image_id: u64 },
    #[error("ground truth annotations[{index}].image_id {image_id} is not in images")]
    UnknownGtImage { index: usize, image_id: u64 },
    #[error("detections[{index}].score {score} is not a finite number")]
    Score { index: usize, score: f64 },
    #[error("{areas} detection areas for {detections} detections")]
    AreasLength { areas: usize, detections: usize },
    #[error("parameters: {0}")]
    Params(String),
}

/// pycocotools' `stats`, in its order. -1 where nothing defines the value.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CocoStats {
    /// AP @ IoU .50:.95, all areas, 100 detections.
    #[serde(rename = "AP")]
    pub ap: f64,
    #[serde(rename = "AP50")]
    pub ap50: f64,
    #[serde(rename = "AP75")]
    pub ap75: f64,
    #[serde(rename = "APs")]
    pub ap_small: f64,
    #[serde(rename = "APm")]
    pub ap_medium: f64,
    #[serde(rename = "APl")]
    pub ap_large: f64,
    /// AR @ IoU .50:.95 with 1 detection per image.
    #[serde(rename = "AR1")]
    pub ar1: f64,
    #[serde(rename = "AR10")]
    pub ar10: f64,
    #[serde(rename = "AR100")]
    pub ar100: f64,
    #[serde(rename = "ARs")]
    pub ar_small: f64,
    #[serde(rename = "ARm")]
    pub ar_medium: f64,
    #[serde(rename = "ARl")]
    pub ar_large: f64,
}

impl CocoStats {
    /// The names pycocotools' stats are known by, in order.
    pub const NAMES: [&'static str; 12] = [
        "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
    ];

    pub fn to_array(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }
}

/// The accumulated evaluation (`COCOeval.eval`) and its summary.
#[derive(Clone, Debug)]
pub struct CocoEvaluation {
    pub params: CocoParams,
    /// Evaluated category ids, ascending (the `K` axis).
    pub category_ids: Vec<u64>,
    /// Number of evaluated images.
    pub num_images: usize,
    /// Interpolated precision `[T, R, K, A, M]`; -1 where the category has no ground truth.
    pub precision: Array5<f64>,
    /// Highest recall reached `[T, K, A, M]`; -1 where the category has no ground truth.
    pub recall: Array4<f64>,
    /// Score at each sampled recall `[T, R, K, A, M]`.
    pub scores: Array5<f64>,
    pub stats: CocoStats,
}

/// One ground truth of one (image, category).
struct GtItem {
    area: f64,
    crowd: bool,
}

/// What matching leaves for one image, category and area range (`evaluateImg`), detections in
/// score order.
struct ImageEval {
    scores: Vec<f64>,
    /// `[T, D]`: matched a ground truth.
    matched: Vec<bool>,
    /// `[T, D]`: matched an ignored ground truth, or unmatched and outside the area range.
    ignored: Vec<bool>,
    /// Ground truths not ignored.
    num_gt: usize,
}

/// `(category index, image index) -> item indices`, grouped per category: `groups[k]` lists
/// `(image, items)` by image index, items in input order.
type Groups = Vec<Vec<(usize, Vec<usize>)>>;

fn group(keys: Vec<(usize, usize, usize)>, num_categories: usize) -> Groups {
    let mut keys = keys;
    // Stable: items of one (category, image) keep input order.
    keys.sort_by_key(|&(k, i, _)| (k, i));
    let mut groups: Groups = vec![Vec::new(); num_categories];
    for (k, i, item) in keys {
        let list = &mut groups[k];
        match list.last_mut() {
            Some((last, items)) if *last == i => items.push(item),
            _ => list.push((i, vec![item])),
        }
    }
    groups
}

/// Runs COCOeval (`evaluate`, `accumulate`, `summarize`) on checked ground truth and results
/// (see [`crate::data::coco::load_dataset`], [`crate::data::coco::load_results`]).
pub fn evaluate(
    gt: &Dataset,
    dt: &Results,
    params: &CocoParams,
) -> Result<CocoEvaluation, EvalError> {
    if dt.areas.len() != dt.detections.len() {
        return Err(EvalError::AreasLength {
            areas: dt.areas.len(),
            detections: dt.detections.len(),
        });
    }
    if let Some((index, d)) = dt
        .detections
        .iter()
        .enumerate()
        .find(|(_, d)| !d.score.is_finite())
    {
        return Err(EvalError::Score {
            index,
            score: d.score,
        });
    }
    if params.max_dets.is_empty() || params.max_dets.windows(2).any(|w| w[0] > w[1]) {
        return Err(EvalError::Params(format!(
            "max_dets {:?} must be non-empty and ascending",
            params.max_dets
        )));
    }
    let mut image_ids: Vec<u64> = gt.images.iter().map(|im| im.id).collect();
    image_ids.sort_unstable();
    image_ids.dedup();
    let mut category_ids: Vec<u64> = gt.categories.iter().map(|c| c.id).collect();
    category_ids.sort_unstable();
    category_ids.dedup();
    let image_index: HashMap<u64, usize> = image_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, i))
        .collect();
    let category_index: HashMap<u64, usize> = category_ids
        .iter()
        .enumerate()
        .map(|(k, &id)| (id, k))
        .collect();
    let image_size: HashMap<u64, (u32, u32)> = gt
        .images
        .iter()
        .map(|im| (im.id, (im.height, im.width)))
        .collect();

    let mut gt_keys = Vec::with_capacity(gt.annotations.len());
    for (index, a) in gt.annotations.iter().enumerate() {
        let Some(&i) = image_index.get(&a.image_id) else {
            return Err(EvalError::UnknownGtImage {
                index,
                image_id: a.image_id,
            });
        };
        // pycocotools only loads annotations of the evaluated categories.
        if let Some(&k) = category_index.get(&a.category_id) {
            gt_keys.push((k, i, index));
        }
    }
    let mut dt_keys = Vec::with_capacity(dt.detections.len());
    for (index, d) in dt.detections.iter().enumerate() {
        let Some(&i) = image_index.get(&d.image_id) else {
            return Err(EvalError::UnknownImage {
                index,
                image_id: d.image_id,
            });
        };
        if let Some(&k) = category_index.get(&d.category_id) {
            dt_keys.push((k, i, index));
        }
    }
    let (k_count, i_count) = (category_ids.len(), image_ids.len());
    let gt_groups = group(gt_keys, k_count);
    let dt_groups = group(dt_keys, k_count);

    let (t_count, r_count) = (params.iou_thresholds.len(), params.recall_thresholds.len());
    let (a_count, m_count) = (params.area_ranges.len(), params.max_dets.len());
    let ctx = Context {
        gt,
        dt,
        params,
        image_ids: &image_ids,
        image_size: &image_size,
    };
    let per_category: Vec<CategoryResult> = (0..k_count)
        .into_par_iter()
        .map(|k| ctx.category(&gt_groups[k], &dt_groups[k]))
        .collect::<Result<_, _>>()?;

    let mut precision = Array5::from_elem((t_count, r_count, k_count, a_count, m_count), -1.0);
    let mut scores = Array5::from_elem((t_count, r_count, k_count, a_count, m_count), -1.0);
    let mut recall = Array4::from_elem((t_count, k_count, a_count, m_count), -1.0);
    for (k, res) in per_category.into_iter().enumerate() {
        precision
            .slice_mut(s![.., .., k, .., ..])
            .assign(&res.precision);
        scores.slice_mut(s![.., .., k, .., ..]).assign(&res.scores);
        recall.slice_mut(s![.., k, .., ..]).assign(&res.recall);
    }
    let mut out = CocoEvaluation {
        params: params.clone(),
        category_ids,
        num_images: i_count,
        precision,
        recall,
        scores,
        stats: CocoStats {
            ap: -1.0,
            ap50: -1.0,
            ap75: -1.0,
            ap_small: -1.0,
            ap_medium: -1.0,
            ap_large: -1.0,
            ar1: -1.0,
            ar10: -1.0,
            ar100: -1.0,
            ar_small: -1.0,
            ar_medium: -1.0,
            ar_large: -1.0,
        },
    };
    out.stats = out.summarize();
    Ok(out)
}

struct Context<'a> {
    gt: &'a Dataset,
    dt: &'a Results,
    params: &'a CocoParams,
    image_ids: &'a [u64],
    image_size: &'a HashMap<u64, (u32, u32)>,
}

/// `precision[:, :, k, :, :]`, `scores[:, :, k, :, :]`, `recall[:, k, :, :]`.
struct CategoryResult {
    precision: ndarray::Array4<f64>,
    scores: ndarray::Array4<f64>,
    recall: ndarray::Array3<f64>,
}

impl Context<'_> {
    /// Evaluates and accumulates one category over all images.
    fn category(
        &self,
        gt_groups: &[(usize, Vec<usize>)],
        dt_groups: &[(usize, Vec<usize>)],
    ) -> Result<CategoryResult, EvalError> {
        let p = self.params;
        let (t_count, r_count) = (p.iou_thresholds.len(), p.recall_thresholds.len());
        let (a_count, m_count) = (p.area_ranges.len(), p.max_dets.len());
        let max_det = *p.max_dets.last().expect("checked non-empty");
        // Images with ground truth or detections of this category, ascending.
        let (mut g, mut d) = (0, 0);
        // evals[a] lists the images' results for area range a, in image order.
        let mut evals: Vec<Vec<ImageEval>> = (0..a_count).map(|_| Vec::new()).collect();
        let empty: Vec<usize> = Vec::new();
        while g < gt_groups.len() || d < dt_groups.len() {
            let gi = gt_groups.get(g).map_or(usize::MAX, |x| x.0);
            let di = dt_groups.get(d).map_or(usize::MAX, |x| x.0);
            let image = gi.min(di);
            let gts = if gi == image {
                g += 1;
                &gt_groups[g - 1].1
            } else {
                &empty
            };
            let dts = if di == image {
                d += 1;
                &dt_groups[d - 1].1
            } else {
                &empty
            };
            // Detections by score, highest first, stable; at most max_det.
            let mut dts = dts.clone();
            dts.sort_by(|&x, &y| {
                let (sx, sy) = (self.dt.detections[x].score, self.dt.detections[y].score);
                sy.partial_cmp(&sx).expect("scores are finite")
            });
            dts.truncate(max_det);
            let ious = self.ious(image, gts, &dts)?;
            let gt_items: Vec<GtItem> = gts
                .iter()
                .map(|&index| {
                    let a = &self.gt.annotations[index];
                    GtItem {
                        area: a.area,
                        crowd: a.iscrowd != 0,
                    }
                })
                .collect();
            for (a, range) in p.area_ranges.iter().enumerate() {
                evals[a].push(self.match_image(&gt_items, &dts, &ious, range));
            }
        }

        let mut precision = ndarray::Array4::from_elem((t_count, r_count, a_count, m_count), -1.0);
        let mut scores = ndarray::Array4::from_elem((t_count, r_count, a_count, m_count), -1.0);
        let mut recall = ndarray::Array3::from_elem((t_count, a_count, m_count), -1.0);
        for (a, images) in evals.iter().enumerate() {
            if images.is_empty() {
                continue;
            }
            let num_gt: usize = images.iter().map(|e| e.num_gt).sum();
            if num_gt == 0 {
                continue;
            }
            for (m, &max_det) in p.max_dets.iter().enumerate() {
                // (score, image, detection) of the first max_det of each image, image order.
                let mut order: Vec<(f64, u32, u32)> = Vec::new();
                for (e, im) in images.iter().enumerate() {
                    for (j, &s) in im.scores.iter().take(max_det).enumerate() {
                        order.push((s, e as u32, j as u32));
                    }
                }
                order.sort_by(|x, y| y.0.partial_cmp(&x.0).expect("scores are finite"));
                let nd = order.len();
                let mut rc = vec![0.0; nd];
                let mut pr = vec![0.0; nd];
                for t in 0..t_count {
                    let (mut tp, mut fp) = (0.0f64, 0.0f64);
                    for (j, &(_, e, det)) in order.iter().enumerate() {
                        let im = &images[e as usize];
                        let slot = t * im.scores.len() + det as usize;
                        if !im.ignored[slot] {
                            if im.matched[slot] {
                                tp += 1.0;
                            } else {
                                fp += 1.0;
                            }
                        }
                        rc[j] = tp / num_gt as f64;
                        pr[j] = tp / (fp + tp + f64::EPSILON);
                    }
                    recall[[t, a, m]] = if nd > 0 { rc[nd - 1] } else { 0.0 };
                    // Precision envelope: monotone from the right.
                    for j in (1..nd).rev() {
                        if pr[j] > pr[j - 1] {
                            pr[j - 1] = pr[j];
                        }
                    }
                    // numpy.searchsorted(rc, recThrs, side='left'); 0 beyond the last.
                    let mut j = 0;
                    for (r, &thr) in p.recall_thresholds.iter().enumerate() {
                        while j < nd && rc[j] < thr {
                            j += 1;
                        }
                        if j < nd {
                            precision[[t, r, a, m]] = pr[j];
                            scores[[t, r, a, m]] = order[j].0;
                        } else {
                            for rest in r..r_count {
                                precision[[t, rest, a, m]] = 0.0;
                                scores[[t, rest, a, m]] = 0.0;
                            }
                            break;
                        }
                    }
                }
            }
        }
        Ok(CategoryResult {
            precision,
            scores,
            recall,
        })
    }

    /// `[D, G]` IoUs, detections in score order, ground truths in input order.
    fn ious(&self, image: usize, gts: &[usize], dts: &[usize]) -> Result<Vec<f64>, EvalError> {
        let mut out = vec![0.0; dts.len() * gts.len()];
        if gts.is_empty() || dts.is_empty() {
            return Ok(out);
        }
        let crowd: Vec<bool> = gts
            .iter()
            .map(|&g| self.gt.annotations[g].iscrowd != 0)
            .collect();
        match self.params.iou_type {
            IouType::Bbox => {
                for (d, &di) in dts.iter().enumerate() {
                    let db = &self.dt.detections[di].bbox;
                    for (g, &gi) in gts.iter().enumerate() {
                        out[d * gts.len() + g] =
                            box_iou(db, &self.gt.annotations[gi].bbox, crowd[g]);
                    }
                }
            }
            IouType::Segm => {
                let image_id = self.image_ids[image];
                let (h, w) = self.image_size[&image_id];
                let gt_masks = gts
                    .iter()
                    .map(|&g| self.gt_mask(g, h, w))
                    .collect::<Result<Vec<_>, _>>()?;
                let gt_boxes: Vec<[f64; 4]> = gt_masks.iter().map(Rle::bbox).collect();
                for (d, &di) in dts.iter().enumerate() {
                    let dm = self.dt_mask(di, h, w)?;
                    let db = dm.bbox();
                    for (g, gm) in gt_masks.iter().enumerate() {
                        // Masks that intersect have overlapping bounding boxes.
                        if box_iou(&db, &gt_boxes[g], crowd[g]) > 0.0 {
                            out[d * gts.len() + g] = dm.iou(gm, crowd[g]);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn gt_mask(&self, index: usize, h: u32, w: u32) -> Result<Rle, EvalError> {
        let a = &self.gt.annotations[index];
        let err = |problem: String| EvalError::GtSegmentation {
            index,
            id: a.id,
            problem,
        };
        let seg = a
            .segmentation
            .as_ref()
            .ok_or_else(|| err("missing (iouType segm needs one)".into()))?;
        checked_mask(seg, h, w).map_err(err)
    }

    /// A detection's mask; detections without one are their box as a polygon, as
    /// pycocotools' `loadRes` makes them.
    fn dt_mask(&self, index: usize, h: u32, w: u32) -> Result<Rle, EvalError> {
        let d = &self.dt.detections[index];
        match &d.segmentation {
            Some(seg) => checked_mask(seg, h, w)
                .map_err(|problem| EvalError::DtSegmentation { index, problem }),
            None => {
                let [x, y, bw, bh] = d.bbox;
                let (x2, y2) = (x + bw, y + bh);
                Ok(Rle::from_polygon(&[x, y, x, y2, x2, y2, x2, y], h, w))
            }
        }
    }

    /// `evaluateImg` for one area range.
    fn match_image(
        &self,
        gts: &[GtItem],
        dts: &[usize],
        ious: &[f64],
        range: &AreaRange,
    ) -> ImageEval {
        let p = self.params;
        let t_count = p.iou_thresholds.len();
        let outside = |area: f64| area < range.min || area > range.max;
        let ignore: Vec<bool> = gts.iter().map(|g| g.crowd || outside(g.area)).collect();
        // Regular ground truths first, ignored last, each group in input order.
        let mut order: Vec<usize> = (0..gts.len()).collect();
        order.sort_by_key(|&g| ignore[g]);
        let (n_gt, n_dt) = (gts.len(), dts.len());
        let mut matched = vec![false; t_count * n_dt];
        let mut ignored = vec![false; t_count * n_dt];
        let mut taken = vec![false; n_gt];
        for (t, &thr) in p.iou_thresholds.iter().enumerate() {
            taken.iter_mut().for_each(|x| *x = false);
            for d in 0..n_dt {
                let mut best = thr.min(1.0 - 1e-10);
                let mut m: Option<usize> = None;
                for &g in &order {
                    if taken[g] && !gts[g].crowd {
                        continue;
                    }
                    // Matched a regular ground truth and only ignored ones are left.
                    if m.is_some_and(|m| !ignore[m]) && ignore[g] {
                        break;
                    }
                    let iou = ious[d * n_gt + g];
                    if iou < best {
                        continue;
                    }
                    best = iou;
                    m = Some(g);
                }
                if let Some(g) = m {
                    taken[g] = true;
                    matched[t * n_dt + d] = true;
                    ignored[t * n_dt + d] = ignore[g];
                }
            }
        }
        for (d, &di) in dts.iter().enumerate() {
            if outside(self.dt.areas[di]) {
                for t in 0..t_count {
                    if !matched[t * n_dt + d] {
                        ignored[t * n_dt + d] = true;
                    }
                }
            }
        }
        ImageEval {
            scores: dts.iter().map(|&d| self.dt.detections[d].score).collect(),
            matched,
            ignored,
            num_gt: ignore.iter().filter(|&&i| !i).count(),
        }
    }
}

fn checked_mask(seg: &Segmentation, h: u32, w: u32) -> Result<Rle, String> {
    let rle = Rle::from_segmentation(seg, h, w).map_err(|e| e.to_string())?;
    if (rle.height, rle.width) != (h, w) {
        return Err(format!(
            "RLE size [{}, {}] differs from the image's [height, width] = [{h}, {w}]",
            rle.height, rle.width
        ));
    }
    Ok(rle)
}

impl CocoEvaluation {
    fn area_index(&self, label: &str) -> Option<usize> {
        self.params
            .area_ranges
            .iter()
            .position(|r| r.label == label)
    }

    fn max_det_index(&self, max_det: usize) -> Option<usize> {
        self.params.max_dets.iter().position(|&m| m == max_det)
    }

    fn iou_index(&self, iou: f64) -> Option<usize> {
        self.params.iou_thresholds.iter().position(|&t| t == iou)
    }

    /// `_summarize`: the mean of the defined (> -1) entries, -1 when there are none.
    fn summary(&self, ap: bool, iou: Option<f64>, area: &str, max_det: usize) -> f64 {
        let (Some(a), Some(m)) = (self.area_index(area), self.max_det_index(max_det)) else {
            return -1.0;
        };
        let t_range = match iou {
            Some(v) => match self.iou_index(v) {
                Some(t) => t..t + 1,
                None => return -1.0,
            },
            None => 0..self.params.iou_thresholds.len(),
        };
        let values: Vec<f64> = if ap {
            self.precision
                .slice(s![t_range, .., .., a, m])
                .iter()
                .copied()
                .collect()
        } else {
            self.recall
                .slice(s![t_range, .., a, m])
                .iter()
                .copied()
                .collect()
        };
        mean_defined(&values)
    }

    /// The 12 numbers of `summarize()`.
    fn summarize(&self) -> CocoStats {
        let md = &self.params.max_dets;
        let at = |i: usize| md.get(i).copied().unwrap_or(usize::MAX);
        let (m0, m1, m2) = (at(0), at(1), at(2));
        CocoStats {
            ap: self.summary(true, None, "all", m2),
            ap50: self.summary(true, Some(0.5), "all", m2),
            ap75: self.summary(true, Some(0.75), "all", m2),
            ap_small: self.summary(true, None, "small", m2),
            ap_medium: self.summary(true, None, "medium", m2),
            ap_large: self.summary(true, None, "large", m2),
            ar1: self.summary(false, None, "all", m0),
            ar10: self.summary(false, None, "all", m1),
            ar100: self.summary(false, None, "all", m2),
            ar_small: self.summary(false, None, "small", m2),
            ar_medium: self.summary(false, None, "medium", m2),
            ar_large: self.summary(false, None, "large", m2),
        }
    }

    /// Per-category AP @ IoU `iou` (None: mean over .50:.95), all areas, the largest maxDets;
    /// `None` for a category without ground truth. In `category_ids` order.
    pub fn category_ap(&self, iou: Option<f64>) -> Vec<Option<f64>> {
        let (Some(a), Some(&max_det)) = (self.area_index("all"), self.params.max_dets.last())
        else {
            return vec![None; self.category_ids.len()];
        };
        let m = self.max_det_index(max_det).expect("the last exists");
        let t_range = match iou.map(|v| self.iou_index(v)) {
            Some(Some(t)) => t..t + 1,
            Some(None) => return vec![None; self.category_ids.len()],
            None => 0..self.params.iou_thresholds.len(),
        };
        (0..self.category_ids.len())
            .map(|k| {
                let values: Vec<f64> = self
                    .precision
                    .slice(s![t_range.clone(), .., k, a, m])
                    .iter()
                    .copied()
                    .collect();
                let v = mean_defined(&values);
                (v > -1.0).then_some(v)
            })
            .collect()
    }

    /// The precision-recall curve at IoU `iou` (None: averaged over .50:.95): at each recall
    /// threshold, the mean over categories with ground truth; all areas, the largest maxDets.
    /// Empty when no category has ground truth.
    pub fn pr_curve(&self, iou: Option<f64>) -> Vec<(f64, f64)> {
        let (Some(a), Some(&max_det)) = (self.area_index("all"), self.params.max_dets.last())
        else {
            return Vec::new();
        };
        let m = self.max_det_index(max_det).expect("the last exists");
        let t_range = match iou.map(|v| self.iou_index(v)) {
            Some(Some(t)) => t..t + 1,
            Some(None) => return Vec::new(),
            None => 0..self.params.iou_thresholds.len(),
        };
        let mut curve = Vec::new();
        for (r, &rec) in self.params.recall_thresholds.iter().enumerate() {
            let values: Vec<f64> = self
                .precision
                .slice(s![t_range.clone(), r, .., a, m])
                .iter()
                .copied()
                .collect();
            let v = mean_defined(&values);
            if v <= -1.0 {
                return Vec::new();
            }
            curve.push((rec, v));
        }
        curve
    }

    /// pycocotools' printed summary, one line per stat.
    pub fn summary_lines(&self) -> Vec<String> {
        let md = &self.params.max_dets;
        let at = |i: usize| md.get(i).copied().unwrap_or(0);
        let rows: [(bool, Option<f64>, &str, usize); 12] = [
            (true, None, "all", at(2)),
            (true, Some(0.5), "all", at(2)),
            (true, Some(0.75), "all", at(2)),
            (true, None, "small", at(2)),
            (true, None, "medium", at(2)),
            (true, None, "large", at(2)),
            (false, None, "all", at(0)),
            (false, None, "all", at(1)),
            (false, None, "all", at(2)),
            (false, None, "small", at(2)),
            (false, None, "medium", at(2)),
            (false, None, "large", at(2)),
        ];
        let t = &self.params.iou_thresholds;
        rows.iter()
            .zip(self.stats.to_array())
            .map(|(&(ap, iou, area, max_det), value)| {
                let title = if ap {
                    "Average Precision  (AP)"
                } else {
                    "Average Recall     (AR)"
                };
                let iou = match iou {
                    Some(v) => format!("{v:0.2}"),
                    None => format!(
                        "{:0.2}:{:0.2}",
                        t.first().copied().unwrap_or(0.0),
                        t.last().copied().unwrap_or(0.0)
                    ),
                };
                format!(
                    " {title} @[ IoU={iou:<9} | area={area:>6} | maxDets={max_det:>3} ] = {value:0.3}"
                )
            })
            .collect()
    }
}

/// Mean of the entries > -1 (numpy's `mean(s[s > -1])`), -1 when there are none.
fn mean_defined(values: &[f64]) -> f64 {
    let (sum, n) = values
        .iter()
        .filter(|&&v| v > -1.0)
        .fold((0.0, 0usize), |(s, n), &v| (s + v, n + 1));
    if n == 0 {
        -1.0
    } else {
        sum / n as f64
    }
}

#[cfg(test)]
mod tests;
