//! `densa eval seg`: PNG label maps in, mIoU / pixel accuracy out, through the real binary.

use crate::common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn write_gray(path: &Path, w: u32, h: u32, labels: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .unwrap()
        .write_image_data(labels)
        .unwrap();
}

fn write_palette(path: &Path, w: u32, h: u32, labels: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    // VOC-like colours: the class is the index, not the colour.
    enc.set_palette(
        (0..=255u8)
            .flat_map(|i| [i.wrapping_mul(37), i.wrapping_mul(91), i])
            .collect::<Vec<u8>>(),
    );
    enc.write_header()
        .unwrap()
        .write_image_data(labels)
        .unwrap();
}

fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (gt, pred) = (dir.path().join("gt"), dir.path().join("pred"));
    std::fs::create_dir_all(&gt).unwrap();
    std::fs::create_dir_all(&pred).unwrap();
    (dir, gt, pred)
}

#[test]
fn json_metrics_of_gray_and_palette_maps() {
    let (_dir, gt, pred) = dirs();
    // Image a: 2x2 gray. Image b: 3x1 palette, with an ignored pixel.
    write_gray(&gt.join("a.png"), 2, 2, &[0, 0, 1, 1]);
    write_gray(&pred.join("a.png"), 2, 2, &[0, 1, 1, 1]);
    write_palette(&gt.join("b.png"), 3, 1, &[2, 255, 0]);
    write_palette(&pred.join("b.png"), 3, 1, &[2, 0, 0]);
    let o = run_densa(&[
        "eval",
        "seg",
        "--gt",
        gt.to_str().unwrap(),
        "--pred",
        pred.to_str().unwrap(),
        "--classes",
        "4",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    // Counted pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (0,0).
    // Class 0: inter 2, union 3; class 1: inter 2, union 3; class 2: 1/1; class 3: absent.
    let iou: Vec<Option<f64>> = v["per_class_iou"]
        .as_array()
        .unwrap()
        .iter()
        .map(Value::as_f64)
        .collect();
    assert_eq!(iou, vec![Some(2.0 / 3.0), Some(2.0 / 3.0), Some(1.0), None]);
    assert!((v["mIoU"].as_f64().unwrap() - (2.0 / 3.0 + 2.0 / 3.0 + 1.0) / 3.0).abs() < 1e-12);
    assert!((v["pixel_accuracy"].as_f64().unwrap() - 5.0 / 6.0).abs() < 1e-12);
    assert_eq!(v["images"], 2);
    assert!(v["per_class_iou"][3].is_null());
}

#[test]
fn bad_label_maps_are_clean_errors() {
    let (_dir, gt, pred) = dirs();
    write_gray(&gt.join("a.png"), 2, 1, &[0, 9]);
    write_gray(&pred.join("a.png"), 2, 1, &[0, 1]);
    let args = |classes: &str| {
        vec![
            "eval".to_string(),
            "seg".into(),
            "--gt".into(),
            gt.to_str().unwrap().into(),
            "--pred".into(),
            pred.to_str().unwrap().into(),
            "--classes".into(),
            classes.into(),
        ]
    };
    let run = |classes: &str| {
        let a = args(classes);
        run_densa(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let err = assert_clean_failure(&run("3"));
    assert!(
        err.contains("gt/a.png: pixel (x 1, y 0) has label 9, outside 0..3"),
        "{err}"
    );
    write_gray(&gt.join("b.png"), 1, 1, &[0]);
    let err = assert_clean_failure(&run("10"));
    assert!(err.contains("no prediction b.png"), "{err}");
    std::fs::write(pred.join("b.png"), b"garbage").unwrap();
    let err = assert_clean_failure(&run("10"));
    assert!(err.contains("pred/b.png: not a readable PNG"), "{err}");
    write_gray(&pred.join("b.png"), 2, 2, &[0, 0, 0, 0]);
    let err = assert_clean_failure(&run("10"));
    assert!(err.contains("b.png is 2x2 but its ground truth"), "{err}");
}
