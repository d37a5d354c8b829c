//! DETR's `HungarianMatcher` on the host: the matching cost between every prediction and every
//! ground-truth box of one image, and the minimum-cost one-to-one matching
//! ([`super::hungarian`]), turned into per-query training targets for the loss graph
//! ([`super::loss`]).
//!
//! Cost (DETR, Eq. 2 with the probability instead of its log):
//! `w_class * -p(class) + w_l1 * L1(cxcywh) + w_giou * -GIoU(xyxy)`, with `p` the softmax over
//! the classes and "no object". Boxes are `(cx, cy, w, h)` normalised to `[0, 1]` by the image
//! size, as in DETR.
//!
//! A sigmoid focal class head ([`ClassLoss::SigmoidFocal`], Deformable DETR's and DetReg's)
//! replaces `-p(class)` by the focal loss's difference between predicting the class and not
//! predicting it, `p = sigmoid(logit of the class)`:
//! `alpha (1 - p)^gamma (-ln(p + 1e-8)) - (1 - alpha) p^gamma (-ln(1 - p + 1e-8))`.

use super::hungarian::{linear_sum_assignment_f32, AssignmentError};
use super::loss::ClassLoss;

/// Weights of the matching cost. Defaults: class 2, L1 5, GIoU 2 (Deformable DETR's, as
/// DetReg and UP-DETR's code use; DETR's own class weight is 1).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MatcherConfig {
    pub cost_class: f32,
    pub cost_bbox: f32,
    pub cost_giou: f32,
}

impl Default for MatcherConfig {
    fn default() -> Self {
        MatcherConfig {
            cost_class: 2.0,
            cost_bbox: 5.0,
            cost_giou: 2.0,
        }
    }
}

/// One image's ground truth: `boxes[k]` (normalised cxcywh) has class `labels[k]` and, for
/// the detector-pretraining methods, the embedding `embeddings[k]` (empty: no embeddings;
/// else one vector of the embedding head's length per box).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageTargets {
    pub boxes: Vec<[f32; 4]>,
    pub labels: Vec<usize>,
    pub embeddings: Vec<Vec<f32>>,
}

/// Why a matching could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    #[error("matching: {what} has {got} values, expected {expected}")]
    Shape {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("matching: target {index} has label {label}, but there are {classes} classes")]
    Label {
        index: usize,
        label: usize,
        classes: usize,
    },
    #[error("matching: target {index} box {value:?} is not finite with positive size")]
    Box { index: usize, value: [f32; 4] },
    #[error("matching: target {index} embedding {problem}")]
    Embedding { index: usize, problem: String },
    #[error(transparent)]
    Assignment(#[from] AssignmentError),
}

/// `(cx, cy, w, h) -> (x1, y1, x2, y2)`.
pub fn cxcywh_to_xyxy(b: [f32; 4]) -> [f32; 4] {
    [
        b[0] - 0.5 * b[2],
        b[1] - 0.5 * b[3],
        b[0] + 0.5 * b[2],
        b[1] + 0.5 * b[3],
    ]
}

/// `(x1, y1, x2, y2) -> (cx, cy, w, h)`.
pub fn xyxy_to_cxcywh(b: [f32; 4]) -> [f32; 4] {
    [
        0.5 * (b[0] + b[2]),
        0.5 * (b[1] + b[3]),
        b[2] - b[0],
        b[3] - b[1],
    ]
}

/// Generalised IoU (Rezatofighi et al. 2019) of two `xyxy` boxes with positive area:
/// `IoU - (enclosing area - union) / enclosing area`, in `[-1, 1]`.
pub fn generalized_iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let area = |x: [f32; 4]| (x[2] - x[0]) * (x[3] - x[1]);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    let ew = a[2].max(b[2]) - a[0].min(b[0]);
    let eh = a[3].max(b[3]) - a[1].min(b[1]);
    let enclose = ew * eh;
    inter / union - (enclose - union) / enclose
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|&x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn check_targets(t: &ImageTargets, classes: usize) -> Result<(), MatchError> {
    if t.labels.len() != t.boxes.len() {
        return Err(MatchError::Shape {
            what: "labels",
            got: t.labels.len(),
            expected: t.boxes.len(),
        });
    }
    for (index, (&label, &bx)) in t.labels.iter().zip(&t.boxes).enumerate() {
        if label >= classes {
            return Err(MatchError::Label {
                index,
                label,
                classes,
            });
        }
        if bx.iter().any(|v| !v.is_finite()) || bx[2] <= 0.0 || bx[3] <= 0.0 {
            return Err(MatchError::Box { index, value: bx });
        }
    }
    if !t.embeddings.is_empty() && t.embeddings.len() != t.boxes.len() {
        return Err(MatchError::Shape {
            what: "embeddings",
            got: t.embeddings.len(),
            expected: t.boxes.len(),
        });
    }
    if let Some(index) = t
        .embeddings
        .iter()
        .position(|e| e.iter().any(|v| !v.is_finite()))
    {
        return Err(MatchError::Embedding {
            index,
            problem: "has a value that is not finite".into(),
        });
    }
    Ok(())
}

/// The `[queries, targets]` matching cost of one image (row-major). `logits` are
/// `[queries, class.outputs(classes)]` (softmax: the last column is no object), `boxes`
/// `[queries, 4]` normalised cxcywh.
pub fn cost_matrix(
    config: &MatcherConfig,
    class: &ClassLoss,
    logits: &[f32],
    boxes: &[f32],
    queries: usize,
    classes: usize,
    targets: &ImageTargets,
) -> Result<Vec<f32>, MatchError> {
    let k = class.outputs(classes);
    if logits.len() != queries * k {
        return Err(MatchError::Shape {
            what: "logits",
            got: logits.len(),
            expected: queries * k,
        });
    }
    if boxes.len() != queries * 4 {
        return Err(MatchError::Shape {
            what: "boxes",
            got: boxes.len(),
            expected: queries * 4,
        });
    }
    check_targets(targets, classes)?;
    let t = targets.boxes.len();
    let mut cost = Vec::with_capacity(queries * t);
    for q in 0..queries {
        let row = &logits[q * k..(q + 1) * k];
        let class_cost: Vec<f32> = match *class {
            ClassLoss::Softmax => softmax(row).into_iter().map(|p| -p).collect(),
            ClassLoss::SigmoidFocal { alpha, gamma } => row
                .iter()
                .map(|&x| {
                    let p = 1.0 / (1.0 + (-x).exp());
                    let pos = alpha * (1.0 - p).powf(gamma) * -(p + 1e-8).ln();
                    let neg = (1.0 - alpha) * p.powf(gamma) * -(1.0 - p + 1e-8).ln();
                    pos - neg
                })
                .collect(),
        };
        let pb: [f32; 4] = boxes[q * 4..q * 4 + 4].try_into().expect("4 values");
        let pxy = cxcywh_to_xyxy(pb);
        for (tb, &label) in targets.boxes.iter().zip(&targets.labels) {
            let l1: f32 = pb.iter().zip(tb).map(|(a, b)| (a - b).abs()).sum();
            let giou = generalized_iou(pxy, cxcywh_to_xyxy(*tb));
            cost.push(
                config.cost_bbox * l1 + config.cost_class * class_cost[label]
                    - config.cost_giou * giou,
            );
        }
    }
    Ok(cost)
}

/// The minimum-cost matching of one image: for each query, the target it predicts (or
/// `None`: no object). Every target gets exactly one query when `queries >= targets`.
pub fn match_image(
    config: &MatcherConfig,
    class: &ClassLoss,
    logits: &[f32],
    boxes: &[f32],
    queries: usize,
    classes: usize,
    targets: &ImageTargets,
) -> Result<Vec<Option<usize>>, MatchError> {
    let cost = cost_matrix(config, class, logits, boxes, queries, classes, targets)?;
    let a = linear_sum_assignment_f32(&cost, queries, targets.boxes.len())?;
    Ok(a.col_of_rows(queries))
}

/// Per-query targets of a batch for one decoder layer's loss, row-major `[N, Q]` /
/// `[N, Q, 4]`: what [`super::loss::set_loss`] takes as host inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryTargets {
    /// The matched target's class, or `classes` (no object).
    pub classes: Vec<i64>,
    /// The matched target's box (cxcywh); unmatched queries hold the whole image
    /// `(0.5, 0.5, 1, 1)`, a valid box that the mask zeroes out.
    pub boxes: Vec<f32>,
    /// 1 where the query is matched.
    pub mask: Vec<f32>,
}

impl QueryTargets {
    /// Lays out the matchings (`matches[n][q]`, from [`match_image`]) of a batch.
    pub fn from_matches(
        matches: &[Vec<Option<usize>>],
        targets: &[ImageTargets],
        classes: usize,
    ) -> QueryTargets {
        let mut out = QueryTargets {
            classes: Vec::new(),
            boxes: Vec::new(),
            mask: Vec::new(),
        };
        for (m, t) in matches.iter().zip(targets) {
            for q in m {
                match q {
                    Some(k) => {
                        out.classes.push(t.labels[*k] as i64);
                        out.boxes.extend_from_slice(&t.boxes[*k]);
                        out.mask.push(1.0);
                    }
                    None => {
                        out.classes.push(classes as i64);
                        out.boxes.extend_from_slice(&[0.5, 0.5, 1.0, 1.0]);
                        out.mask.push(0.0);
                    }
                }
            }
        }
        out
    }
}

/// The matched targets' embeddings of a batch, row-major `[N, Q, dim]`: the matched box's
/// vector at each matched query, zeros elsewhere (the mask of [`QueryTargets`] zeroes their
/// loss). An image without boxes needs no embeddings; one with boxes needs one `dim`-vector
/// per box.
pub fn query_embeddings(
    matches: &[Vec<Option<usize>>],
    targets: &[ImageTargets],
    dim: usize,
) -> Result<Vec<f32>, MatchError> {
    let mut out = Vec::new();
    for (m, t) in matches.iter().zip(targets) {
        if t.embeddings.len() != t.boxes.len() {
            return Err(MatchError::Shape {
                what: "embeddings",
                got: t.embeddings.len(),
                expected: t.boxes.len(),
            });
        }
        if let Some((index, e)) = t
            .embeddings
            .iter()
            .enumerate()
            .find(|(_, e)| e.len() != dim)
        {
            return Err(MatchError::Embedding {
                index,
                problem: format!("has {} values, the head predicts {dim}", e.len()),
            });
        }
        for q in m {
            match q {
                Some(k) => out.extend_from_slice(&t.embeddings[*k]),
                None => out.extend(std::iter::repeat_n(0.0, dim)),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn giou_of_hand_made_boxes() {
        let a = [0.0, 0.0, 2.0, 2.0];
        assert!((generalized_iou(a, a) - 1.0).abs() < 1e-6);
        // Half overlap: inter 2, union 6, enclosing 6 -> 1/3.
        let b = [1.0, 0.0, 3.0, 2.0];
        assert!((generalized_iou(a, b) - 1.0 / 3.0).abs() < 1e-6);
        // Disjoint: inter 0, union 2, enclosing 2 * 4 = 8 -> 0 - 6/8.
        let c = [3.0, 0.0, 4.0, 1.0];
        let g = generalized_iou(a, c);
        assert!((g - (0.0 - (8.0 - 5.0) / 8.0)).abs() < 1e-6, "{g}");
        let r = xyxy_to_cxcywh(cxcywh_to_xyxy([0.3, 0.4, 0.2, 0.1]));
        assert!((r[0] - 0.3).abs() < 1e-6 && (r[3] - 0.1).abs() < 1e-6);
    }

    #[test]
    fn cost_matrix_equals_a_direct_computation_and_matching_follows_it() {
        // Two queries, one class (+ no object), two targets.
        let logits = [2.0f32, 0.0, 0.0, 1.0];
        let boxes = [0.25f32, 0.25, 0.2, 0.2, 0.7, 0.7, 0.4, 0.4];
        let targets = ImageTargets {
            boxes: vec![[0.7, 0.7, 0.4, 0.4], [0.3, 0.2, 0.2, 0.2]],
            labels: vec![0, 0],
            ..Default::default()
        };
        let cfg = MatcherConfig::default();
        let cost = cost_matrix(&cfg, &ClassLoss::Softmax, &logits, &boxes, 2, 1, &targets).unwrap();
        // Query 0: p(class 0) = e^2 / (e^2 + 1).
        let p0 = (2.0f32.exp()) / (2.0f32.exp() + 1.0);
        let p1 = 1.0 / (1.0 + 1.0f32.exp());
        // q0 vs t1: L1 = 0.05 + 0.05; boxes [0.15,0.15,0.35,0.35] vs [0.2,0.1,0.4,0.3]:
        // inter 0.15*0.15, union 0.08 - 0.0225, enclosing 0.25*0.25.
        let inter = 0.15f32 * 0.15;
        let union = 0.08 - inter;
        let g01 = inter / union - (0.0625 - union) / 0.0625;
        let c01 = 5.0 * 0.1 - 2.0 * p0 - 2.0 * g01;
        assert!((cost[1] - c01).abs() < 1e-5, "{} vs {c01}", cost[1]);
        // q1 vs t0: identical boxes.
        let c10 = -2.0 * p1 - 2.0;
        assert!((cost[2] - c10).abs() < 1e-5, "{} vs {c10}", cost[2]);
        let m = match_image(&cfg, &ClassLoss::Softmax, &logits, &boxes, 2, 1, &targets).unwrap();
        assert_eq!(m, vec![Some(1), Some(0)]);
        let qt = QueryTargets::from_matches(
            &[m, vec![None, None]],
            &[targets.clone(), ImageTargets::default()],
            1,
        );
        assert_eq!(qt.classes, vec![0, 0, 1, 1]);
        assert_eq!(qt.mask, vec![1.0, 1.0, 0.0, 0.0]);
        assert_eq!(&qt.boxes[..4], &[0.3, 0.2, 0.2, 0.2]);
    }

    #[test]
    fn bad_targets_are_errors() {
        let logits = [0.0f32; 4];
        let boxes = [0.5f32; 8];
        let bad_label = ImageTargets {
            boxes: vec![[0.5, 0.5, 0.1, 0.1]],
            labels: vec![3],
            ..Default::default()
        };
        let e = match_image(
            &MatcherConfig::default(),
            &ClassLoss::Softmax,
            &logits,
            &boxes,
            2,
            1,
            &bad_label,
        );
        assert!(e.unwrap_err().to_string().contains("label 3"));
        let nan = ImageTargets {
            boxes: vec![[f32::NAN, 0.5, 0.1, 0.1]],
            labels: vec![0],
            ..Default::default()
        };
        assert!(match_image(
            &MatcherConfig::default(),
            &ClassLoss::Softmax,
            &logits,
            &boxes,
            2,
            1,
            &nan
        )
        .is_err());
        let e = cost_matrix(
            &MatcherConfig::default(),
            &ClassLoss::Softmax,
            &logits[..3],
            &boxes,
            2,
            1,
            &nan,
        );
        assert!(e.unwrap_err().to_string().contains("logits"));
        // A NaN prediction reaches the assignment, which refuses it.
        let mut nan_logits = logits;
        nan_logits[0] = f32::NAN;
        let ok = ImageTargets {
            boxes: vec![[0.5, 0.5, 0.1, 0.1]],
            labels: vec![0],
            ..Default::default()
        };
        let e = match_image(
            &MatcherConfig::default(),
            &ClassLoss::Softmax,
            &nan_logits,
            &boxes,
            2,
            1,
            &ok,
        );
        assert!(matches!(e, Err(MatchError::Assignment(_))), "{e:?}");
    }

    #[test]
    fn query_embeddings_follow_the_matches() {
        // Two images, three queries, E = 2: image 0 has two boxes (matched to queries 2 and
        // 0), image 1 none.
        let t0 = ImageTargets {
            boxes: vec![[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]],
            labels: vec![0, 0],
            embeddings: vec![vec![1.0, -2.0], vec![0.5, 4.0]],
        };
        let matches = vec![vec![Some(1), None, Some(0)], vec![None, None, None]];
        let targets = [t0.clone(), ImageTargets::default()];
        let e = query_embeddings(&matches, &targets, 2).unwrap();
        // Direct: for each (image, query), the matched box's vector or zeros.
        let mut want = Vec::new();
        for (m, t) in matches.iter().zip(&targets) {
            for q in m {
                want.extend(q.map_or(vec![0.0; 2], |k| t.embeddings[k].clone()));
            }
        }
        assert_eq!(e, want);
        assert_eq!(&e[..6], &[0.5, 4.0, 0.0, 0.0, 1.0, -2.0]);
        assert_eq!(e.len(), 2 * 3 * 2);
        // Wrong length, missing vectors, non-finite values.
        let err = query_embeddings(&matches, &targets, 3).unwrap_err();
        assert!(err.to_string().contains("3"), "{err}");
        let mut missing = t0.clone();
        missing.embeddings.pop();
        let err = query_embeddings(&matches[..1], &[missing.clone()], 2).unwrap_err();
        assert!(err.to_string().contains("embeddings"), "{err}");
        let logits = [0.0f32; 6];
        let boxes = [0.5f32; 12];
        let cfg = MatcherConfig::default();
        assert!(match_image(&cfg, &ClassLoss::Softmax, &logits, &boxes, 3, 1, &missing).is_err());
        let mut nan = t0;
        nan.embeddings[1][0] = f32::NAN;
        let err = match_image(&cfg, &ClassLoss::Softmax, &logits, &boxes, 3, 1, &nan).unwrap_err();
        assert!(
            matches!(err, MatchError::Embedding { index: 1, .. }),
            "{err}"
        );
    }
}
