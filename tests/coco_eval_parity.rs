//! `densa eval coco` equals pycocotools' COCOeval: every one of the 12 stats within 1e-6, and
//! every per-category AP, on random cases (seeded) with crowds, empty images, images without
//! detections, a category without ground truth, detections of unknown categories, tiny and
//! huge objects, more than 100 detections per image, tied scores, and the three ways results
//! come (boxes, boxes + masks, masks only). Also: malformed files give errors naming the file
//! and the field, never a panic.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use densa::runtime::mask::Rle;
use serde_json::{json, Value};

/// SplitMix64: deterministic cases with no RNG crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// How the detections of a case are written.
#[derive(Clone, Copy, Debug)]
enum DtForm {
    /// `bbox` only.
    Boxes,
    /// `bbox` and a compressed-RLE `segmentation`.
    BoxesAndMasks,
    /// `segmentation` only (pycocotools derives boxes and areas from the masks).
    MasksOnly,
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// A polygon around the box `[x, y, w, h]`: `n` vertices on a jittered ellipse.
fn polygon(rng: &mut Rng, b: [f64; 4]) -> Vec<f64> {
    let n = 3 + rng.below(8) as usize;
    let (cx, cy) = (b[0] + b[2] / 2.0, b[1] + b[3] / 2.0);
    (0..n)
        .flat_map(|i| {
            let a = std::f64::consts::TAU * (i as f64 + rng.range(-0.3, 0.3)) / n as f64;
            let r = rng.range(0.6, 1.0);
            [
                round2(cx + r * b[2] / 2.0 * a.cos()),
                round2(cy + r * b[3] / 2.0 * a.sin()),
            ]
        })
        .collect()
}

fn poly_box(p: &[f64]) -> [f64; 4] {
    let xs = p.iter().step_by(2);
    let ys = p.iter().skip(1).step_by(2);
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (y0, y1) = ys.fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    [x0, y0, round2(x1 - x0), round2(y1 - y0)]
}

/// An object's box: tiny (< 4 px), small, medium, large or huge (most of the image).
fn random_box(rng: &mut Rng, w: f64, h: f64) -> [f64; 4] {
    let (bw, bh) = match rng.below(5) {
        0 => (rng.range(0.5, 4.0), rng.range(0.5, 4.0)),
        1 => (rng.range(4.0, 30.0), rng.range(4.0, 30.0)),
        2 => (rng.range(30.0, 90.0), rng.range(30.0, 90.0)),
        3 => (rng.range(90.0, 200.0), rng.range(90.0, 200.0)),
        _ => (rng.range(0.6, 1.0) * w, rng.range(0.6, 1.0) * h),
    };
    let (bw, bh) = (bw.min(w), bh.min(h));
    [
        round2(rng.range(-0.05 * bw, w - 0.95 * bw)),
        round2(rng.range(-0.05 * bh, h - 0.95 * bh)),
        round2(bw),
        round2(bh),
    ]
}

fn jitter(rng: &mut Rng, b: [f64; 4], amount: f64) -> [f64; 4] {
    let (dx, dy) = (b[2] * amount, b[3] * amount);
    [
        round2(b[0] + rng.range(-dx, dx)),
        round2(b[1] + rng.range(-dy, dy)),
        round2((b[2] + rng.range(-dx, dx)).max(0.5)),
        round2((b[3] + rng.range(-dy, dy)).max(0.5)),
    ]
}

/// A rectangle-ish crowd mask as an uncompressed RLE (counts list), like COCO's crowds.
fn crowd_rle(b: [f64; 4], w: u32, h: u32) -> Value {
    let mut mask = vec![0u8; (w * h) as usize];
    let x0 = b[0].max(0.0) as u32;
    let y0 = b[1].max(0.0) as u32;
    let x1 = ((b[0] + b[2]).ceil() as u32).min(w);
    let y1 = ((b[1] + b[3]).ceil() as u32).min(h);
    for y in y0..y1 {
        for x in x0..x1 {
            // Holes, so the crowd is not a plain box.
            if (x + 2 * y) % 7 != 0 {
                mask[(y * w + x) as usize] = 1;
            }
        }
    }
    let rle = Rle::from_mask(&mask, h, w);
    json!({"size": [h, w], "counts": rle.counts})
}

/// One random case: (ground truth, detections).
fn make_case(seed: u64, form: DtForm) -> (Value, Value) {
    let mut rng = Rng(seed);
    let categories = [1u64, 2, 3, 5, 9]; // 9 has no ground truth
    let n_images = 20;
    let mut images = Vec::new();
    let mut anns = Vec::new();
    let mut dets = Vec::new();
    let mut det_for = |rng: &mut Rng, image: u64, cat: u64, b: [f64; 4], w: u32, h: u32| {
        // Scores on a 0.05 grid: many ties, which file order must break.
        let score = round2((rng.below(20) as f64 + 1.0) * 0.05);
        let mut d = json!({"image_id": image, "category_id": cat, "score": score});
        if !matches!(form, DtForm::MasksOnly) {
            d["bbox"] = json!(b);
        }
        if !matches!(form, DtForm::Boxes) {
            let rle = Rle::from_polygon(&polygon(rng, b), h, w);
            d["segmentation"] = json!({"size": [h, w], "counts": rle.to_compressed()});
        }
        dets.push(d);
    };
    for image in 1..=n_images as u64 {
        let (w, h) = if rng.chance(0.3) {
            (640, 480)
        } else {
            (60 + rng.below(260) as u32, 50 + rng.below(200) as u32)
        };
        images.push(
            json!({"id": image, "file_name": format!("{image}.jpg"), "width": w, "height": h}),
        );
        // Image 3: no ground truth (detections only); image 4: nothing at all.
        let n_gt = match image {
            3 | 4 => 0,
            _ => rng.below(8),
        };
        let with_dets = image != 4 && image != 5; // image 5: ground truth, no detections
        for _ in 0..n_gt {
            let cat = categories[rng.below(4) as usize];
            let b = random_box(&mut rng, w as f64, h as f64);
            let crowd = rng.chance(0.12);
            let id = anns.len() as u64 + 1;
            let (seg, bbox) = if crowd {
                (crowd_rle(b, w, h), b)
            } else if rng.chance(0.15) {
                // A compressed RLE ground truth.
                let p = polygon(&mut rng, b);
                let rle = Rle::from_polygon(&p, h, w);
                (
                    json!({"size": [h, w], "counts": rle.to_compressed()}),
                    poly_box(&p),
                )
            } else if rng.chance(0.2) {
                // Two polygon parts.
                let p = polygon(&mut rng, b);
                let moved = jitter(&mut rng, b, 0.5);
                let q = polygon(&mut rng, moved);
                let bb = poly_box(&p);
                (json!([p, q]), bb)
            } else {
                let p = polygon(&mut rng, b);
                let bb = poly_box(&p);
                (json!([p]), bb)
            };
            // COCO's area is the mask's; any value will do for parity, as both read the field.
            let area = round2(bbox[2] * bbox[3] * rng.range(0.5, 0.9));
            let mut ann = json!({
                "id": id, "image_id": image, "category_id": cat, "bbox": bbox,
                "area": area, "iscrowd": crowd as u8, "segmentation": seg,
            });
            if rng.chance(0.1) {
                // pycocotools overwrites `ignore` with `iscrowd`: no effect.
                ann["ignore"] = json!(1);
            }
            anns.push(ann);
            if with_dets {
                for _ in 0..rng.below(3) {
                    let jittered = jitter(&mut rng, bbox, 0.2);
                    det_for(&mut rng, image, cat, jittered, w, h);
                }
            }
        }
        if with_dets {
            for _ in 0..rng.below(6) {
                let cat = [1u64, 2, 3, 5, 9, 77][rng.below(6) as usize]; // 77: unknown
                let b = random_box(&mut rng, w as f64, h as f64);
                det_for(&mut rng, image, cat, b, w, h);
            }
        }
        if image == 7 {
            // 130 detections of one category in one image: pycocotools keeps the best 100.
            for _ in 0..130 {
                let b = random_box(&mut rng, w as f64, h as f64);
                det_for(&mut rng, image, 1, b, w, h);
            }
        }
    }
    let gt = json!({
        "images": images,
        "annotations": anns,
        "categories": categories.iter().map(|&id| json!({"id": id, "name": format!("cat{id}")})).collect::<Vec<_>>(),
    });
    (gt, Value::Array(dets))
}

/// `python3` with pycocotools, or `None` (with a note); with `DENSA_REQUIRE_ORT=1` (CI) its
/// absence fails the test.
fn pycocotools_python() -> Option<String> {
    let python = std::env::var("DENSA_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import pycocotools.cocoeval, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(python)
    } else if std::env::var("DENSA_REQUIRE_ORT").is_ok_and(|v| v == "1") {
        panic!("DENSA_REQUIRE_ORT=1 but `{python}` lacks pycocotools (pip install pycocotools)");
    } else {
        eprintln!("note: skipping the pycocotools comparison: {python} lacks pycocotools");
        None
    }
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_vec(v).unwrap()).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn stats_and_per_class_ap_equal_pycocotools() {
    let cases: [(u64, &str, DtForm); 6] = [
        (1, "bbox", DtForm::Boxes),
        (2, "bbox", DtForm::BoxesAndMasks),
        (3, "bbox", DtForm::MasksOnly),
        (4, "segm", DtForm::BoxesAndMasks),
        (5, "segm", DtForm::MasksOnly),
        (6, "segm", DtForm::Boxes),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut ours = Vec::new();
    let mut reference_args: Vec<String> = Vec::new();
    for (seed, iou_type, form) in cases {
        let (gt, dt) = make_case(seed, form);
        let gt_path = dir.path().join(format!("gt{seed}.json"));
        let dt_path = dir.path().join(format!("dt{seed}.json"));
        write_json(&gt_path, &gt);
        write_json(&dt_path, &dt);
        let report = dir.path().join(format!("report{seed}"));
        let o = run_densa(&[
            "eval",
            "coco",
            "--gt",
            s(&gt_path),
            "--dt",
            s(&dt_path),
            "--iou-type",
            iou_type,
            "--json",
            "--report",
            s(&report),
        ]);
        assert!(o.status.success(), "case {seed}: {}", stderr(&o));
        let stdout = String::from_utf8(o.stdout).unwrap();
        // Exactly one JSON object with the 12 keys.
        let stats: serde_json::Map<String, Value> = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("case {seed}: not one JSON object ({e}): {stdout}"));
        let keys: Vec<&str> = stats.keys().map(String::as_str).collect();
        let mut want = vec![
            "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
        ];
        want.sort();
        let mut got = keys.clone();
        got.sort();
        assert_eq!(got, want, "case {seed}");
        let metrics: Value =
            serde_json::from_slice(&std::fs::read(report.join("metrics.json")).unwrap()).unwrap();
        for png in ["pr_curves.png", "class_ap.png"] {
            let bytes = std::fs::read(report.join(png)).unwrap();
            assert!(bytes.starts_with(b"\x89PNG"), "case {seed}: {png}");
        }
        ours.push((seed, iou_type, stats, metrics));
        reference_args.extend([s(&gt_path).into(), s(&dt_path).into(), iou_type.into()]);
    }
    let Some(python) = pycocotools_python() else {
        return;
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/coco_reference.py");
    let o = Command::new(python)
        .arg(script)
        .args(&reference_args)
        .output()
        .unwrap();
    assert!(o.status.success(), "pycocotools failed:\n{}", stderr(&o));
    let lines: Vec<Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), ours.len());
    let names = [
        "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
    ];
    for ((seed, iou_type, stats, metrics), reference) in ours.iter().zip(&lines) {
        let want = reference["stats"].as_array().unwrap();
        for (i, name) in names.iter().enumerate() {
            let (a, b) = (stats[*name].as_f64().unwrap(), want[i].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-6,
                "case {seed} ({iou_type}) {name}: densa {a} pycocotools {b}"
            );
        }
        // Non-trivial: some stats are defined and not all equal.
        assert!(
            want.iter().any(|v| v.as_f64().unwrap() > 0.05),
            "case {seed}: {want:?}"
        );
        for entry in metrics["per_class"].as_array().unwrap() {
            let id = entry["id"].as_u64().unwrap().to_string();
            let (a, b) = (&entry["AP"], &reference["per_class"][&id]);
            match (a.as_f64(), b.as_f64()) {
                (Some(a), Some(b)) => assert!(
                    (a - b).abs() <= 1e-6,
                    "case {seed} category {id}: densa {a} pycocotools {b}"
                ),
                _ => assert!(
                    a.is_null() && b.is_null(),
                    "case {seed} category {id}: {a} vs {b}"
                ),
            }
        }
        assert!(
            metrics["per_class"][4]["AP"].is_null(),
            "category 9 has no ground truth"
        );
    }
}

#[test]
fn table_output_has_the_summary_and_per_class_ap() {
    let dir = tempfile::tempdir().unwrap();
    let (gt, dt) = make_case(11, DtForm::Boxes);
    let (g, d) = (dir.path().join("gt.json"), dir.path().join("dt.json"));
    write_json(&g, &gt);
    write_json(&d, &dt);
    let o = run_densa(&["eval", "coco", "--gt", s(&g), "--dt", s(&d)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    assert!(
        out.contains(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = "),
        "{out}"
    );
    assert!(
        out.contains(" Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = ")
    );
    assert!(out.contains("cat9"), "{out}");
    assert!(stderr(&o).contains("category_id that is not among the ground truth's categories"));
}

/// Runs `densa eval coco` on the given file contents; returns the (clean) error text.
fn eval_error(gt: &str, dt: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (g, d) = (dir.path().join("GT.json"), dir.path().join("DT.json"));
    std::fs::write(&g, gt).unwrap();
    std::fs::write(&d, dt).unwrap();
    let o = run_densa(&[
        "eval",
        "coco",
        "--gt",
        s(&g),
        "--dt",
        s(&d),
        "--iou-type",
        "segm",
    ]);
    assert_clean_failure(&o)
}

const IMAGES: &str = r#""images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 8}],
    "categories": [{"id": 1, "name": "a"}]"#;

fn gt_with(ann: &str) -> String {
    format!(r#"{{{IMAGES}, "annotations": [{ann}]}}"#)
}

const GOOD_ANN: &str = r#"{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
        "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}"#;
const GOOD_DT: &str = r#"[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9}]"#;

#[test]
fn malformed_files_name_the_file_and_the_field() {
    let bad_gt: [(String, &str); 7] = [
        (
            gt_with(r#"{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4]}"#),
            "GT.json: annotations[0].bbox: expected 4 numbers, got 3",
        ),
        (
            gt_with(r#"{"id": 1, "image_id": 42, "category_id": 1, "bbox": [1, 1, 4, 4]}"#),
            "GT.json: annotations[0].image_id: 42 is not in images",
        ),
        (
            gt_with(r#"{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4]}"#),
            "GT.json: annotations[0].category_id: 3 is not in categories",
        ),
        (
            gt_with(r#"{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, -4, 4]}"#),
            "GT.json: annotations[0].bbox: [1.0, 1.0, -4.0, 4.0] is not a box",
        ),
        (
            gt_with(r#"{"id": 1, "image_id": 1, "category_id": 1, "bbox": "x"}"#),
            "GT.json: annotations[0].bbox: invalid type: string",
        ),
        (
            gt_with(&format!("{GOOD_ANN}, {GOOD_ANN}")),
            "GT.json: annotations[1].id: 1 appears twice",
        ),
        (
            gt_with(
                r#"{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16,
                 "segmentation": {"size": [8, 10], "counts": [3, 4]}}"#,
            ),
            "annotations[0] (id 1): segmentation: RLE counts sum to 7 but the mask has 8x10",
        ),
    ];
    for (gt, want) in &bad_gt {
        let err = eval_error(gt, GOOD_DT);
        assert!(err.contains(want), "want {want:?} in:\n{err}");
    }
    let gt = gt_with(GOOD_ANN);
    let bad_dt: [(&str, &str); 7] = [
        (
            r#"[{"image_id": 5, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9}]"#,
            "DT.json: detections[0].image_id: 5 is not an image of the ground truth",
        ),
        (
            r#"[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9},
             {"image_id": 1, "category_id": 1, "bbox": [1, 1], "score": 0.9}]"#,
            "DT.json: detections[1].bbox: expected 4 numbers, got 2",
        ),
        (
            r#"[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}]"#,
            "DT.json: detections[0]: missing field `score`",
        ),
        (
            r#"[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9,
              "segmentation": {"size": [8, 10], "counts": "~~"}}]"#,
            "detections[0].segmentation: compressed RLE: byte '~'",
        ),
        (
            r#"[{"image_id": 1, "category_id": 1, "score": 0.9,
              "segmentation": {"size": [4, 4], "counts": [16]}}]"#,
            "DT.json: detections[0].segmentation: RLE size [4, 4] differs from image 1's",
        ),
        (r#"{"annotations": []}"#, "(is this a ground-truth file?)"),
        (
            r#"[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9"#,
            "DT.json: detections[0]: EOF while parsing",
        ),
    ];
    for (dt, want) in bad_dt {
        let err = eval_error(&gt, dt);
        assert!(err.contains(want), "want {want:?} in:\n{err}");
    }
    let err = eval_error("{", GOOD_DT);
    assert!(
        err.contains("GT.json: (top level): EOF while parsing"),
        "{err}"
    );
    // A missing file names itself.
    let o = run_densa(&[
        "eval",
        "coco",
        "--gt",
        "/nonexistent/gt.json",
        "--dt",
        "x.json",
    ]);
    let err = assert_clean_failure(&o);
    assert!(err.contains("reading /nonexistent/gt.json"), "{err}");
}
