//! `densa proposals` end to end: JSON and drawing on a synthetic scene, equality with the
//! library, `--max`, and clean errors for missing and corrupt images.

use crate::common;

use common::{assert_clean_failure, run_densa};
use densa::runtime::data::synth::{render_scene, SynthConfig};
use densa::runtime::infer::nms::iou;
use densa::runtime::proposals::{selective_search, Mode, SelectiveSearchConfig};

fn scene_png(dir: &std::path::Path) -> (std::path::PathBuf, Vec<[f32; 4]>, image::RgbImage) {
    let config = SynthConfig {
        width: 96,
        height: 80,
        seed: 4,
        max_objects: 3,
        ..SynthConfig::default()
    };
    let scene = render_scene(&config, 0);
    let path = dir.join("scene.png");
    scene.image.save(&path).unwrap();
    let boxes = scene
        .objects
        .iter()
        .map(|o| o.bbox.map(|v| v as f32))
        .collect();
    (path, boxes, scene.image)
}

#[test]
fn json_and_drawing_match_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let (png, gts, img) = scene_png(dir.path());
    let (json, drawn) = (dir.path().join("p.json"), dir.path().join("drawn.png"));
    let out = run_densa(&[
        "proposals",
        png.to_str().unwrap(),
        "--mode",
        "single",
        "--json",
        json.to_str().unwrap(),
        "--draw",
        drawn.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let entry = &v["images"][0];
    assert_eq!(entry["width"], 96);
    assert_eq!(entry["height"], 80);
    let boxes: Vec<[f32; 4]> = serde_json::from_value(entry["boxes"].clone()).unwrap();
    let expected = selective_search(
        &img,
        &SelectiveSearchConfig {
            mode: Mode::Single,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(boxes.len(), expected.len());
    assert_eq!(entry["total"], expected.len());
    assert!(boxes.iter().zip(&expected).all(|(b, e)| *b == e.xyxy()));
    // Every object is at least roughly found (IoU 0.5), even by the single strategy.
    assert!(!gts.is_empty());
    for gt in &gts {
        let best = boxes.iter().map(|b| iou(b, gt)).fold(0.0f32, f32::max);
        assert!(best >= 0.5, "{gt:?}: best IoU {best}");
    }
    let canvas = image::open(&drawn).unwrap().to_rgb8();
    assert_eq!(canvas.dimensions(), (96, 80));
    assert_ne!(canvas, img, "boxes were drawn");
}

#[test]
fn max_limits_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let (png, _, _) = scene_png(dir.path());
    let json = dir.path().join("p.json");
    let out = run_densa(&[
        "proposals",
        png.to_str().unwrap(),
        "--max",
        "5",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["images"][0]["boxes"].as_array().unwrap().len(), 5);
    assert!(v["images"][0]["total"].as_u64().unwrap() > 5);
    assert_eq!(v["config"]["mode"], "fast");
}

#[test]
fn missing_and_corrupt_images_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.png");
    let err = assert_clean_failure(&run_densa(&["proposals", missing.to_str().unwrap()]));
    assert!(err.contains("nope.png"), "{err}");
    let corrupt = dir.path().join("broken.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    let err = assert_clean_failure(&run_densa(&["proposals", corrupt.to_str().unwrap()]));
    assert!(err.contains("broken.png"), "{err}");
    // A bad flag is a usage error (clap's status 2), named.
    let out = run_densa(&["proposals", corrupt.to_str().unwrap(), "--mode", "slow"]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown mode \"slow\""), "{err}");
}
