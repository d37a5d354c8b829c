//! Masks against pycocotools' own outputs (`testdata/pycocotools_rle.json`, written once by
//! `tests/py/make_rle_fixture.py`) and against brute-force pixel counts.

use super::*;
use serde_json::Value;

fn fixture() -> Value {
    serde_json::from_str(include_str!("testdata/pycocotools_rle.json")).expect("fixture parses")
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn polygons(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(f64s).collect()
}

fn dims(fx: &Value) -> (u32, u32) {
    (
        fx["height"].as_u64().unwrap() as u32,
        fx["width"].as_u64().unwrap() as u32,
    )
}

fn polygon_masks(fx: &Value) -> Vec<Rle> {
    let (h, w) = dims(fx);
    fx["polygon_cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            Rle::from_segmentation(&Segmentation::Polygons(polygons(&c["polygons"])), h, w).unwrap()
        })
        .collect()
}

/// A tiny deterministic generator (SplitMix64) so the tests need no RNG crate.
struct Mix(u64);
impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_mask(rng: &mut Mix, h: u32, w: u32) -> Vec<u8> {
    // Blobs: a few random rectangles, so runs are long and varied.
    let mut m = vec![0u8; (h * w) as usize];
    for _ in 0..rng.below(4) {
        let (x0, y0) = (rng.below(w as u64) as u32, rng.below(h as u64) as u32);
        let (x1, y1) = (
            (x0 + rng.below(w as u64) as u32).min(w),
            (y0 + rng.below(h as u64) as u32).min(h),
        );
        for y in y0..y1 {
            for x in x0..x1 {
                m[(y * w + x) as usize] = 1;
            }
        }
    }
    m
}

#[test]
fn polygons_rasterise_like_pycocotools() {
    let fx = fixture();
    let masks = polygon_masks(&fx);
    for (i, (case, rle)) in fx["polygon_cases"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&masks)
        .enumerate()
    {
        assert_eq!(
            rle.to_compressed(),
            case["counts"].as_str().unwrap(),
            "case {i}: {:?}",
            case["polygons"]
        );
        assert_eq!(rle.area(), case["area"].as_u64().unwrap(), "case {i} area");
        assert_eq!(rle.bbox().to_vec(), f64s(&case["bbox"]), "case {i} bbox");
    }
}

#[test]
fn encode_and_compressed_strings_match_pycocotools() {
    let fx = fixture();
    let (h, w) = dims(&fx);
    for (i, case) in fx["encode_cases"].as_array().unwrap().iter().enumerate() {
        let mask: Vec<u8> = case["mask_rows"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_str().unwrap().bytes().map(|b| b - b'0'))
            .collect();
        let rle = Rle::from_mask(&mask, h, w);
        let expected = case["counts"].as_str().unwrap();
        assert_eq!(rle.to_compressed(), expected, "case {i}");
        let runs: Vec<u32> = case["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(rle.counts, runs, "case {i} runs");
        let decoded = Rle::from_compressed(expected, h, w).unwrap();
        assert_eq!(decoded, rle, "case {i} decode");
        assert_eq!(decoded.to_mask(), mask, "case {i} pixels");
        assert_eq!(rle.area(), case["area"].as_u64().unwrap(), "case {i} area");
        assert_eq!(rle.bbox().to_vec(), f64s(&case["bbox"]), "case {i} bbox");
    }
}

#[test]
fn mask_iou_and_crowd_rule_match_pycocotools() {
    let fx = fixture();
    let masks = polygon_masks(&fx);
    let crowd: Vec<bool> = fx["iou"]["crowd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    let expected = fx["iou"]["values"].as_array().unwrap();
    for (d, row) in expected.iter().enumerate() {
        for (g, v) in f64s(row).into_iter().enumerate() {
            assert_eq!(masks[d].iou(&masks[g], crowd[g]), v, "dt {d} gt {g}");
        }
    }
    let inter = Rle::intersection(&[masks[6].clone(), masks[7].clone()]);
    assert_eq!(
        inter.to_compressed(),
        fx["intersection_6_7"].as_str().unwrap()
    );
}

#[test]
fn box_iou_matches_pycocotools() {
    let fx = fixture();
    let boxes: Vec<[f64; 4]> = fx["box_iou"]["boxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| f64s(b).try_into().unwrap())
        .collect();
    let crowd: Vec<bool> = fx["box_iou"]["crowd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    for (d, row) in fx["box_iou"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for (g, v) in f64s(row).into_iter().enumerate() {
            assert_eq!(box_iou(&boxes[d], &boxes[g], crowd[g]), v, "dt {d} gt {g}");
        }
    }
}

#[test]
fn union_intersection_iou_equal_pixel_brute_force() {
    let mut rng = Mix(7);
    for case in 0..200 {
        let (h, w) = (1 + rng.below(13) as u32, 1 + rng.below(11) as u32);
        let (a, b) = (random_mask(&mut rng, h, w), random_mask(&mut rng, h, w));
        let (ra, rb) = (Rle::from_mask(&a, h, w), Rle::from_mask(&b, h, w));
        let or: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x | y).collect();
        let and: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x & y).collect();
        assert_eq!(
            Rle::union(&[ra.clone(), rb.clone()]),
            Rle::from_mask(&or, h, w)
        );
        assert_eq!(
            Rle::intersection(&[ra.clone(), rb.clone()]),
            Rle::from_mask(&and, h, w)
        );
        let (i, u) = (
            and.iter().map(|&v| v as u64).sum::<u64>(),
            or.iter().map(|&v| v as u64).sum::<u64>(),
        );
        let area_a = a.iter().map(|&v| v as u64).sum::<u64>();
        let expected = if i == 0 { 0.0 } else { i as f64 / u as f64 };
        assert_eq!(ra.iou(&rb, false), expected, "case {case}");
        let crowd = if i == 0 {
            0.0
        } else {
            i as f64 / area_a as f64
        };
        assert_eq!(ra.iou(&rb, true), crowd, "case {case} crowd");
        // Round trips.
        assert_eq!(ra.to_mask(), a);
        assert_eq!(Rle::from_compressed(&ra.to_compressed(), h, w).unwrap(), ra);
        // Bounding box of the pixels.
        let fg: Vec<(u32, u32)> = (0..h * w)
            .filter(|&p| a[p as usize] != 0)
            .map(|p| (p % w, p / w))
            .collect();
        let bb = if fg.is_empty() {
            [0.0; 4]
        } else {
            let x0 = fg.iter().map(|p| p.0).min().unwrap();
            let x1 = fg.iter().map(|p| p.0).max().unwrap();
            let y0 = fg.iter().map(|p| p.1).min().unwrap();
            let y1 = fg.iter().map(|p| p.1).max().unwrap();
            [
                x0 as f64,
                y0 as f64,
                (x1 - x0 + 1) as f64,
                (y1 - y0 + 1) as f64,
            ]
        };
        assert_eq!(ra.bbox(), bb, "case {case} bbox");
    }
}

#[test]
fn malformed_rles_are_errors() {
    assert_eq!(
        Rle::from_counts(vec![3, 4], 2, 3),
        Err(MaskError::CountsSum {
            sum: 7,
            height: 2,
            width: 3,
            expected: 6
        })
    );
    assert!(matches!(
        Rle::from_compressed("ab~", 4, 4),
        Err(MaskError::BadByte { byte: '~', .. })
    ));
    // A continuation bit on the last character.
    assert_eq!(Rle::from_compressed("P", 4, 4), Err(MaskError::Truncated));
    assert!(matches!(
        Rle::from_compressed("oooooooooooooO", 4, 4),
        Err(MaskError::RunOutOfRange { .. })
    ));
    let seg = Segmentation::Polygons(vec![vec![1.0, 2.0, 3.0]]);
    assert_eq!(
        Rle::from_segmentation(&seg, 4, 4),
        Err(MaskError::BadPolygon { index: 0, len: 3 })
    );
    assert_eq!(
        Rle::from_segmentation(&Segmentation::Polygons(vec![]), 4, 4),
        Err(MaskError::NoPolygons)
    );
}

#[test]
fn far_out_polygon_vertices_are_refused_not_walked() {
    // A vertex at 1e20 once asked the edge walk for 2^31 points (a fuzzed COCO file did this).
    let seg = Segmentation::Polygons(vec![vec![1.0, 1.0, 1e20, 1.0, 2.0, 3.0]]);
    let err = Rle::from_segmentation(&seg, 4, 4).unwrap_err();
    assert!(matches!(
        err,
        MaskError::PolygonOutOfRange {
            index: 0,
            position: 2,
            ..
        }
    ));
    assert!(err.to_string().contains("1e20") || err.to_string().contains("100000000000000000000"));
    let nan = Segmentation::Polygons(vec![vec![1.0, 1.0, 2.0, f64::NAN, 2.0, 3.0]]);
    assert!(matches!(
        Rle::from_segmentation(&nan, 4, 4),
        Err(MaskError::PolygonOutOfRange { position: 3, .. })
    ));
    // A few pixels outside the image is ordinary and accepted.
    let stray = Segmentation::Polygons(vec![vec![-3.0, -2.0, 7.5, -2.0, 7.5, 6.0]]);
    assert!(Rle::from_segmentation(&stray, 4, 4).is_ok());
}

#[test]
fn clamping_a_huge_box_changes_no_pixel() {
    // Detections without masks are rasterised as their box; a box reaching 1e12 must give the
    // same pixels as one that just covers the image edge (and finish at once).
    for (h, w) in [(5u32, 7u32), (40, 33)] {
        for &(x, y) in &[(-1e12, -1e12), (-2.0, -3.0), (1.5, 2.5)] {
            let far = Rle::from_bbox([x, y, 2e12, 2e12], h, w);
            let (x0, y0) = (x.max(-1.0), y.max(-1.0));
            let near = Rle::from_bbox([x0, y0, w as f64 + 1.0 - x0, h as f64 + 1.0 - y0], h, w);
            assert_eq!(far, near, "{h}x{w} box from ({x}, {y})");
        }
    }
}
