//! Pascal VOC detection AP (`voc_eval.py` of the VOC devkit's Python port, as py-faster-rcnn,
//! detectron and mmdetection use it).
//!
//! Per class: detections of all images sorted by score, highest first; each takes the ground
//! truth of its image with the highest IoU (first on ties). IoU strictly above the threshold
//! (0.5) and that ground truth not yet taken: true positive; taken already: false positive (a
//! duplicate); the ground truth `difficult`: neither (ignored). No ground truth above the
//! threshold: false positive. Recall is over non-difficult ground truths.
//!
//! - [`VocMetric::Voc07`]: the VOC2007 11-point AP, the mean over `t = 0, 0.1, ..., 1.0` of
//!   the highest precision at recall >= t (0 if none). `t` is `i * 0.1` as numpy's `arange`
//!   makes it, so `t = 0.30000000000000004`, which a recall of exactly 0.3 does not reach.
//! - [`VocMetric::AllPoints`]: VOC2010+ "area" AP, the area under the precision envelope.
//!
//! Boxes are corners `[x1, y1, x2, y2]`. With `pixel_inclusive` (the devkit's convention for
//! integer pixel boxes, our default) a box spans `x2 - x1 + 1` pixels; without it, `x2 - x1`
//! (continuous coordinates, as COCO boxes). Our choices: ties in score keep input order
//! (`voc_eval.py`'s unstable argsort leaves them arbitrary); detections on images without
//! ground truth are false positives; a class without non-difficult ground truth has no AP
//! (`None`) and is left out of the mean.

use std::collections::HashMap;

use serde::Serialize;

/// Which VOC AP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VocMetric {
    /// VOC2007's 11-point interpolated AP.
    Voc07,
    /// VOC2010+'s all-points (area under the envelope) AP.
    AllPoints,
}

/// VOC evaluation settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct VocConfig {
    /// Matches need IoU strictly above this. Default 0.5.
    pub iou_threshold: f64,
    /// Default [`VocMetric::AllPoints`].
    pub metric: VocMetric,
    /// Boxes include their last pixel row/column (`+ 1` in widths). Default true (the devkit).
    pub pixel_inclusive: bool,
}

impl Default for VocConfig {
    fn default() -> Self {
        VocConfig {
            iou_threshold: 0.5,
            metric: VocMetric::AllPoints,
            pixel_inclusive: true,
        }
    }
}

/// One ground-truth object.
#[derive(Clone, Debug, PartialEq)]
pub struct VocObject {
    pub image_id: u64,
    pub class_id: u64,
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f64; 4],
    pub difficult: bool,
}

/// One detection.
#[derive(Clone, Debug, PartialEq)]
pub struct VocDetection {
    pub image_id: u64,
    pub class_id: u64,
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f64; 4],
    pub score: f64,
}

/// Per-class AP and their mean.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VocEvaluation {
    /// `(class_id, AP)` for every class with ground truth or detections, ascending id.
    pub per_class: Vec<(u64, Option<f64>)>,
    /// Mean over classes with an AP; `None` when there are none.
    pub map: Option<f64>,
}

/// AP from a precision-recall sequence (`voc_ap`), detections in score order.
///
/// # Shapes
/// `recall`, `precision`: `[D]`.
pub fn voc_ap(recall: &[f64], precision: &[f64], metric: VocMetric) -> f64 {
    match metric {
        VocMetric::Voc07 => {
            let mut ap = 0.0;
            for i in 0..11 {
                let t = i as f64 * 0.1;
                let p = recall
                    .iter()
                    .zip(precision)
                    .filter(|(&r, _)| r >= t)
                    .map(|(_, &p)| p)
                    .fold(None, |m: Option<f64>, p| Some(m.map_or(p, |m| m.max(p))))
                    .unwrap_or(0.0);
                ap += p / 11.0;
            }
            ap
        }
        VocMetric::AllPoints => {
            let mut mrec = Vec::with_capacity(recall.len() + 2);
            mrec.push(0.0);
            mrec.extend_from_slice(recall);
            mrec.push(1.0);
            let mut mpre = Vec::with_capacity(precision.len() + 2);
            mpre.push(0.0);
            mpre.extend_from_slice(precision);
            mpre.push(0.0);
            for i in (1..mpre.len()).rev() {
                mpre[i - 1] = mpre[i - 1].max(mpre[i]);
            }
            (0..mrec.len() - 1)
                .filter(|&i| mrec[i + 1] != mrec[i])
                .map(|i| (mrec[i + 1] - mrec[i]) * mpre[i + 1])
                .sum()
        }
    }
}

fn iou(a: &[f64; 4], b: &[f64; 4], inclusive: bool) -> f64 {
    let one = if inclusive { 1.0 } else { 0.0 };
    let iw = (a[2].min(b[2]) - a[0].max(b[0]) + one).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1]) + one).max(0.0);
    let inter = iw * ih;
    let area = |x: &[f64; 4]| (x[2] - x[0] + one) * (x[3] - x[1] + one);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// AP of one class; `None` without non-difficult ground truth.
fn class_ap(gts: &[&VocObject], dets: &mut Vec<&VocDetection>, config: &VocConfig) -> Option<f64> {
    let npos = gts.iter().filter(|g| !g.difficult).count();
    let mut by_image: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, g) in gts.iter().enumerate() {
        by_image.entry(g.image_id).or_default().push(i);
    }
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut taken = vec![false; gts.len()];
    let (mut tp, mut fp) = (0.0f64, 0.0f64);
    let mut recall = Vec::with_capacity(dets.len());
    let mut precision = Vec::with_capacity(dets.len());
    for d in dets.iter() {
        let mut best: Option<(usize, f64)> = None;
        for &g in by_image.get(&d.image_id).into_iter().flatten() {
            let o = iou(&d.bbox, &gts[g].bbox, config.pixel_inclusive);
            if best.is_none_or(|(_, b)| o > b) {
                best = Some((g, o));
            }
        }
        match best {
            Some((g, o)) if o > config.iou_threshold => {
                if !gts[g].difficult {
                    if taken[g] {
                        fp += 1.0;
                    } else {
                        taken[g] = true;
                        tp += 1.0;
                    }
                }
            }
            _ => fp += 1.0,
        }
        recall.push(tp / npos as f64);
        precision.push(tp / (tp + fp).max(f64::EPSILON));
    }
    (npos > 0).then(|| voc_ap(&recall, &precision, config.metric))
}

/// VOC AP of every class present in `gts` or `dets`.
pub fn evaluate_voc(gts: &[VocObject], dets: &[VocDetection], config: &VocConfig) -> VocEvaluation {
    let mut classes: Vec<u64> = gts
        .iter()
        .map(|g| g.class_id)
        .chain(dets.iter().map(|d| d.class_id))
        .collect();
    classes.sort_unstable();
    classes.dedup();
    let per_class: Vec<(u64, Option<f64>)> = classes
        .iter()
        .map(|&c| {
            let g: Vec<&VocObject> = gts.iter().filter(|g| g.class_id == c).collect();
            let mut d: Vec<&VocDetection> = dets.iter().filter(|d| d.class_id == c).collect();
            (c, class_ap(&g, &mut d, config))
        })
        .collect();
    let defined: Vec<f64> = per_class.iter().filter_map(|&(_, ap)| ap).collect();
    let map = (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64);
    VocEvaluation { per_class, map }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(image_id: u64, bbox: [f64; 4], difficult: bool) -> VocObject {
        VocObject {
            image_id,
            class_id: 1,
            bbox,
            difficult,
        }
    }

    fn det(image_id: u64, bbox: [f64; 4], score: f64) -> VocDetection {
        VocDetection {
            image_id,
            class_id: 1,
            bbox,
            score,
        }
    }

    /// Two images; one true positive, a detection on a difficult object (ignored), a false
    /// positive, a second true positive: recall [.5, .5, .5, 1], precision [1, 1, .5, 2/3].
    fn case() -> (Vec<VocObject>, Vec<VocDetection>) {
        let a = [10.0, 10.0, 50.0, 50.0];
        let b = [0.0, 0.0, 20.0, 30.0];
        let c = [60.0, 60.0, 90.0, 80.0];
        let gts = vec![obj(1, a, false), obj(2, b, false), obj(2, c, true)];
        let dets = vec![
            det(2, b, 0.6),
            det(1, a, 0.9),
            det(2, c, 0.8),
            det(1, [200.0, 200.0, 220.0, 220.0], 0.7),
        ];
        (gts, dets)
    }

    #[test]
    fn voc07_eleven_point_by_hand() {
        let (gts, dets) = case();
        let config = VocConfig {
            metric: VocMetric::Voc07,
            ..VocConfig::default()
        };
        let e = evaluate_voc(&gts, &dets, &config);
        // t = 0 .. 0.5 (6 points): max precision 1; t = 0.6 .. 1.0 (5 points): 2/3.
        let expected = (6.0 + 5.0 * (2.0 / 3.0)) / 11.0;
        assert!((e.map.unwrap() - expected).abs() < 1e-12, "{e:?}");
    }

    #[test]
    fn all_points_area_by_hand() {
        let (gts, dets) = case();
        let e = evaluate_voc(&gts, &dets, &VocConfig::default());
        // Envelope: 1 up to recall 0.5, then 2/3 up to recall 1.
        let expected = 0.5 * 1.0 + 0.5 * (2.0 / 3.0);
        assert!((e.map.unwrap() - expected).abs() < 1e-12, "{e:?}");
    }

    #[test]
    fn duplicates_are_false_positives_and_eleven_points_use_numpy_arange() {
        // 10 objects, 3 found, then a duplicate: recall 0.3 exactly, which the 11-point
        // threshold 0.30000000000000004 does not reach.
        let gts: Vec<VocObject> = (0..10)
            .map(|i| obj(i, [0.0, 0.0, 10.0, 10.0], false))
            .collect();
        let dets: Vec<VocDetection> = (0..3)
            .map(|i| det(i, [0.0, 0.0, 10.0, 10.0], 0.9 - i as f64 * 0.1))
            .chain([det(0, [0.0, 0.0, 10.0, 10.0], 0.1)])
            .collect();
        let e07 = evaluate_voc(
            &gts,
            &dets,
            &VocConfig {
                metric: VocMetric::Voc07,
                ..VocConfig::default()
            },
        );
        // t = 0, 0.1, 0.2 reach precision 1; 0.30000000000000004 and above: nothing.
        assert!((e07.map.unwrap() - 3.0 / 11.0).abs() < 1e-12, "{e07:?}");
        let all = evaluate_voc(&gts, &dets, &VocConfig::default());
        assert!((all.map.unwrap() - 0.3).abs() < 1e-12, "{all:?}");
    }

    #[test]
    fn pixel_inclusive_changes_the_overlap_and_the_threshold_is_strict() {
        let gts = vec![obj(1, [0.0, 0.0, 1.0, 2.0], false)];
        let dets = vec![det(1, [0.0, 0.0, 1.0, 1.0], 0.5)];
        // Inclusive: 2x2 in 2x3 -> IoU 2/3, a match. Continuous: 1x1 in 1x2 -> IoU 0.5, which
        // is not above 0.5.
        let inclusive = evaluate_voc(&gts, &dets, &VocConfig::default());
        assert_eq!(inclusive.map, Some(1.0));
        let continuous = evaluate_voc(
            &gts,
            &dets,
            &VocConfig {
                pixel_inclusive: false,
                ..VocConfig::default()
            },
        );
        assert_eq!(continuous.map, Some(0.0));
    }

    #[test]
    fn classes_without_ground_truth_have_no_ap() {
        let mut dets = case().1;
        dets.push(VocDetection {
            class_id: 7,
            ..det(1, [0.0, 0.0, 5.0, 5.0], 0.3)
        });
        let e = evaluate_voc(&case().0, &dets, &VocConfig::default());
        assert_eq!(e.per_class.len(), 2);
        assert_eq!(e.per_class[1], (7, None));
        assert!((e.map.unwrap() - (0.5 + 1.0 / 3.0)).abs() < 1e-12);
        // Only difficult objects: no AP either.
        let gts = vec![obj(1, [0.0, 0.0, 5.0, 5.0], true)];
        let e = evaluate_voc(&gts, &[], &VocConfig::default());
        assert_eq!(e.per_class, vec![(1, None)]);
        assert_eq!(e.map, None);
    }
}
