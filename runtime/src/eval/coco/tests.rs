//! Small cases whose COCOeval numbers follow from the definition; parity with pycocotools on
//! random cases is `tests/coco_eval_parity.rs`.

use super::*;
use crate::data::coco::{check_results, Annotation, Category, Detection, Image};

fn dataset(anns: Vec<(u64, u64, [f64; 4], u8)>, categories: &[u64]) -> Dataset {
    Dataset {
        images: (1..=3)
            .map(|id| Image {
                id,
                file_name: format!("{id}.jpg"),
                width: 640,
                height: 480,
            })
            .collect(),
        annotations: anns
            .into_iter()
            .enumerate()
            .map(|(i, (image_id, category_id, bbox, iscrowd))| Annotation {
                id: i as u64 + 1,
                image_id,
                category_id,
                bbox,
                area: bbox[2] * bbox[3],
                iscrowd,
                segmentation: None,
            })
            .collect(),
        categories: categories
            .iter()
            .map(|&id| Category {
                id,
                name: format!("c{id}"),
                supercategory: None,
            })
            .collect(),
        ..Dataset::default()
    }
}

fn det(image_id: u64, category_id: u64, bbox: [f64; 4], score: f64) -> Detection {
    Detection {
        image_id,
        category_id,
        bbox,
        score,
        segmentation: None,
        file_name: None,
    }
}

fn run(gt: &Dataset, dets: Vec<Detection>) -> CocoEvaluation {
    let results = check_results(dets, gt).unwrap();
    evaluate(gt, &results, &CocoParams::new(IouType::Bbox)).unwrap()
}

#[test]
fn thresholds_are_numpy_linspace() {
    let p = CocoParams::new(IouType::Bbox);
    assert_eq!(p.iou_thresholds.len(), 10);
    assert_eq!(p.iou_thresholds[5], 0.75);
    assert_eq!(p.recall_thresholds.len(), 101);
    // numpy: linspace(0, 1, 101)[3] == 0.03, [29] == 0.29 (as 29 * 0.01).
    assert_eq!(p.recall_thresholds[29], 29.0 * 0.01);
    assert_eq!(p.recall_thresholds[100], 1.0);
}

#[test]
fn perfect_detections_score_one_and_absent_areas_are_minus_one() {
    // Two medium objects (40x40 = 1600 px²) of one class.
    let b1 = [10.0, 10.0, 40.0, 40.0];
    let b2 = [100.0, 100.0, 40.0, 40.0];
    let gt = dataset(vec![(1, 1, b1, 0), (2, 1, b2, 0)], &[1]);
    let e = run(&gt, vec![det(1, 1, b1, 0.9), det(2, 1, b2, 0.8)]);
    let s = e.stats;
    assert_eq!((s.ap, s.ap50, s.ap75, s.ap_medium), (1.0, 1.0, 1.0, 1.0));
    assert_eq!((s.ar1, s.ar10, s.ar100, s.ar_medium), (1.0, 1.0, 1.0, 1.0));
    // No small or large ground truth: undefined.
    assert_eq!(
        (s.ap_small, s.ap_large, s.ar_small, s.ar_large),
        (-1.0, -1.0, -1.0, -1.0)
    );
    assert_eq!(e.category_ap(None), vec![Some(1.0)]);
}

#[test]
fn a_false_positive_above_the_true_one_halves_precision() {
    let b = [10.0, 10.0, 40.0, 40.0];
    let gt = dataset(vec![(1, 1, b, 0)], &[1, 2]);
    // Higher-scored miss, then the hit: precision 1/2 at recall 1 for every threshold.
    let e = run(
        &gt,
        vec![
            det(1, 1, [300.0, 300.0, 40.0, 40.0], 0.9),
            det(1, 1, b, 0.5),
        ],
    );
    assert!((e.stats.ap - 0.5).abs() < 1e-12, "{:?}", e.stats);
    // maxDets 1 keeps only the miss.
    assert_eq!(e.stats.ar1, 0.0);
    assert_eq!(e.stats.ar10, 1.0);
    // Category 2 has no ground truth: left out, reported as None.
    assert_eq!(e.category_ap(None), vec![Some(0.5), None]);
}

#[test]
fn crowd_absorbs_detections_without_counting() {
    let b = [10.0, 10.0, 40.0, 40.0];
    let crowd = [200.0, 200.0, 200.0, 200.0];
    let gt = dataset(vec![(1, 1, b, 0), (1, 1, crowd, 1)], &[1]);
    // Three detections inside the crowd region (IoU = intersection / detection area = 1):
    // ignored, so the real hit keeps precision 1 even though it scores lowest.
    let dets = vec![
        det(1, 1, [210.0, 210.0, 20.0, 20.0], 0.9),
        det(1, 1, [250.0, 250.0, 30.0, 30.0], 0.8),
        det(1, 1, [300.0, 300.0, 10.0, 10.0], 0.7),
        det(1, 1, b, 0.6),
    ];
    let e = run(&gt, dets);
    // One true positive has precision 1 / (1 + eps), as in pycocotools.
    assert!((e.stats.ap - 1.0).abs() < 1e-12, "{:?}", e.stats);
    assert_eq!(e.stats.ar100, 1.0);
}

#[test]
fn only_the_100_best_detections_per_image_and_class_count() {
    let b = [10.0, 10.0, 40.0, 40.0];
    let gt = dataset(vec![(1, 1, b, 0)], &[1]);
    // 100 misses above the hit: the hit is cut, recall 0.
    let mut dets: Vec<Detection> = (0..100)
        .map(|i| det(1, 1, [400.0, 300.0, 10.0, 10.0 + i as f64], 0.9))
        .collect();
    dets.push(det(1, 1, b, 0.5));
    let e = run(&gt, dets.clone());
    assert_eq!(e.stats.ar100, 0.0);
    // With one miss fewer, the hit is the 100th.
    dets.remove(0);
    let e = run(&gt, dets);
    assert_eq!(e.stats.ar100, 1.0);
}

#[test]
fn equal_scores_keep_file_order() {
    let b = [10.0, 10.0, 40.0, 40.0];
    let gt = dataset(vec![(1, 1, b, 0)], &[1]);
    let miss = [300.0, 300.0, 40.0, 40.0];
    // Same score: file order decides which is ranked first.
    let hit_first = run(&gt, vec![det(1, 1, b, 0.5), det(1, 1, miss, 0.5)]);
    let miss_first = run(&gt, vec![det(1, 1, miss, 0.5), det(1, 1, b, 0.5)]);
    assert!((hit_first.stats.ap - 1.0).abs() < 1e-12);
    assert!((miss_first.stats.ap - 0.5).abs() < 1e-12);
}

#[test]
fn no_ground_truth_at_all_gives_minus_one_everywhere() {
    let gt = dataset(vec![], &[1]);
    let e = run(&gt, vec![det(1, 1, [0.0, 0.0, 5.0, 5.0], 0.3)]);
    assert!(e.stats.to_array().iter().all(|&v| v == -1.0));
    assert!(e.pr_curve(None).is_empty());
}

#[test]
fn segm_without_ground_truth_masks_names_the_annotation() {
    let gt = dataset(vec![(1, 1, [0.0, 0.0, 5.0, 5.0], 0)], &[1]);
    let results = check_results(vec![det(1, 1, [0.0, 0.0, 5.0, 5.0], 0.3)], &gt).unwrap();
    let e = evaluate(&gt, &results, &CocoParams::new(IouType::Segm)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ground truth annotations[0] (id 1): segmentation: missing (iouType segm needs one)"
    );
}
