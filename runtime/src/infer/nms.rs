//! Box utilities and non-maximum suppression.

/// Intersection over union of two `[x1, y1, x2, y2]` boxes (0 when either is empty).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Greedy NMS: indices of the kept boxes, highest score first. Boxes of different `classes`
/// never suppress each other (class-aware NMS, as torchvision's `batched_nms`). Ties in score
/// keep the lower index first (stable), so results are deterministic.
pub fn nms(
    boxes: &[[f32; 4]],
    scores: &[f32],
    classes: &[usize],
    iou_threshold: f32,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]).then(i.cmp(&j)));
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        if kept
            .iter()
            .all(|&k| classes[k] != classes[i] || iou(&boxes[k], &boxes[i]) <= iou_threshold)
        {
            kept.push(i);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, written differently: a box is kept iff no kept box of its class with a
    /// higher rank overlaps it too much (computed by scanning ranks, O(n^2) without early exit).
    fn brute_force(boxes: &[[f32; 4]], scores: &[f32], classes: &[usize], t: f32) -> Vec<usize> {
        let n = boxes.len();
        let rank = |i: usize| {
            (0..n)
                .filter(|&j| scores[j] > scores[i] || (scores[j] == scores[i] && j < i))
                .count()
        };
        let mut by_rank: Vec<usize> = (0..n).collect();
        by_rank.sort_by_key(|&i| rank(i));
        let mut keep = vec![false; n];
        for (r, &i) in by_rank.iter().enumerate() {
            let suppressed = by_rank[..r]
                .iter()
                .any(|&j| keep[j] && classes[j] == classes[i] && iou(&boxes[j], &boxes[i]) > t);
            keep[i] = !suppressed;
        }
        by_rank.into_iter().filter(|&i| keep[i]).collect()
    }

    fn arb_box() -> impl Strategy<Value = [f32; 4]> {
        (0f32..50.0, 0f32..50.0, 1f32..30.0, 1f32..30.0)
            .prop_map(|(x, y, w, h)| [x, y, x + w, y + h])
    }

    proptest! {
        #[test]
        fn nms_equals_brute_force(
            items in prop::collection::vec((arb_box(), 0u8..20, 0usize..3), 0..40),
            t in 0.1f32..0.9,
        ) {
            let boxes: Vec<[f32; 4]> = items.iter().map(|x| x.0).collect();
            let scores: Vec<f32> = items.iter().map(|x| x.1 as f32 / 20.0).collect();
            let classes: Vec<usize> = items.iter().map(|x| x.2).collect();
            prop_assert_eq!(nms(&boxes, &scores, &classes, t), brute_force(&boxes, &scores, &classes, t));
        }

        #[test]
        fn iou_is_symmetric_and_bounded(a in arb_box(), b in arb_box()) {
            let v = iou(&a, &b);
            prop_assert!((0.0..=1.0).contains(&v));
            prop_assert!((v - iou(&b, &a)).abs() < 1e-6);
            prop_assert!((iou(&a, &a) - 1.0).abs() < 1e-6);
        }
    }
}
