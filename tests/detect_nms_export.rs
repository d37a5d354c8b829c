//! `densa export detector --nms-in-graph`: class-aware NMS with the standard ONNX
//! `NonMaxSuppression` op in the exported graph. On a detector checkpoint made here (random
//! init from a seed, 3 classes, 64 px), served by `densa detect` on tract and ONNX Runtime, the
//! NMS'd export gives the same detections as the plain export followed by densa's host NMS
//! (IoU threshold 0.3 in both, so that the random detector's overlapping candidates are pruned):
//! same count per image, same labels, scores within 1e-4, boxes IoU >= 0.99. The plain
//! export's top-100 candidates per image are checked to be more than what NMS keeps (so NMS
//! did suppress), the `onnx` checker (full check) accepts the NMS'd export, and `densa eval
//! detect` scores both exports the same.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use densa::exporter::weights::save_safetensors;
use densa::models::detect::DetectorConfig;
use densa::models::Arch;

fn ok(args: &[&str]) -> String {
    let o = run_densa(args);
    let err = stderr(&o);
    assert!(o.status.success(), "densa {args:?} failed:\n{err}");
    String::from_utf8_lossy(&o.stdout).into_owned() + &err
}

/// (label, score, xyxy) per file name, from `densa detect --json`.
type Dets = BTreeMap<String, Vec<(u64, f64, [f64; 4])>>;

fn read_dets(json: &Path) -> Dets {
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let mut out = Dets::new();
    for d in v {
        let b: Vec<f64> = d["bbox"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        out.entry(d["file_name"].as_str().unwrap().to_string())
            .or_default()
            .push((
                d["category_id"].as_u64().unwrap(),
                d["score"].as_f64().unwrap(),
                [b[0], b[1], b[0] + b[2], b[1] + b[3]],
            ));
    }
    out
}

fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |v: &[f64; 4]| (v[2] - v[0]) * (v[3] - v[1]);
    inter / (area(a) + area(b) - inter).max(1e-12)
}

/// Every detection of `a` has a distinct counterpart in `b` (same label, score within 1e-4,
/// best IoU), IoU >= 0.99; same counts.
fn assert_same(a: &Dets, b: &Dets, what: &str) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    let mut worst_iou = 1f64;
    let mut worst_score = 0f64;
    for (file, da) in a {
        let db = &b[file];
        assert_eq!(
            da.len(),
            db.len(),
            "{what}: {file}: detection counts differ"
        );
        let mut used = vec![false; db.len()];
        for (la, sa, ba) in da {
            let j = (0..db.len())
                .filter(|&j| !used[j] && db[j].0 == *la && (db[j].1 - sa).abs() <= 1e-4)
                .max_by(|&p, &q| iou(ba, &db[p].2).total_cmp(&iou(ba, &db[q].2)))
                .unwrap_or_else(|| {
                    panic!("{what}: {file}: ({la}, {sa}, {ba:?}) has no counterpart")
                });
            used[j] = true;
            worst_iou = worst_iou.min(iou(ba, &db[j].2));
            worst_score = worst_score.max((db[j].1 - sa).abs());
        }
    }
    eprintln!("{what}: worst matched IoU {worst_iou:.5}, worst score difference {worst_score:.2e}");
    assert!(worst_iou >= 0.99, "{what}: IoU {worst_iou}");
}

#[test]
fn nms_in_graph_equals_host_nms_on_tract_and_ort() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |rel: &str| dir.join(rel).display().to_string();
    ok(&[
        "synth",
        "--out",
        &p("data"),
        "--images",
        "6",
        "--size",
        "64x64",
        "--seed",
        "5",
        "--classes",
        "3",
    ]);
    // A checkpoint folder: detector.json + state.safetensors (what `export detector` reads).
    let classes = ["a", "b", "c"].map(String::from).to_vec();
    let mut config = DetectorConfig::new(Arch::Edge, classes);
    config.image_size = 64;
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(
        ckpt.join("detector.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    save_safetensors(
        &config.initial_state(3).unwrap(),
        &ckpt.join("state.safetensors"),
    )
    .unwrap();
    ok(&[
        "export",
        "detector",
        "--ckpt",
        &p("ckpt"),
        "--out",
        &p("plain.onnx"),
        "--nms-iou",
        "0.3",
    ]);
    let log = ok(&[
        "export",
        "detector",
        "--ckpt",
        &p("ckpt"),
        "--out",
        &p("nms.onnx"),
        "--nms-in-graph",
        "--nms-iou",
        "0.3",
    ]);
    assert!(log.contains("NMS in the graph"), "{log}");
    let model = densa::exporter::io::load(&dir.join("nms.onnx")).unwrap();
    let graph = model.graph.unwrap();
    assert!(graph.node.iter().any(|n| n.op_type == "NonMaxSuppression"));
    if let Some(python) = python_peers() {
        let check = std::process::Command::new(python)
            .args([
                "-c",
                "import onnx, sys; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)",
                &p("nms.onnx"),
            ])
            .output()
            .unwrap();
        assert!(check.status.success(), "onnx checker: {}", stderr(&check));
    }

    let mut backends = vec!["tract"];
    if ort_backend().is_some() {
        backends.push("ort");
    }
    let detect = |model: &str, backend: &str, json: &str| {
        ok(&[
            "detect",
            &p(model),
            &p("data/images"),
            "--backend",
            backend,
            "--score-threshold",
            "0",
            "--json",
            &p(json),
        ]);
        read_dets(&dir.join(json))
    };
    // The plain export's candidates before NMS: top-100 per image, served without host NMS.
    let spec = dir.join("no-nms.toml");
    std::fs::write(
        &spec,
        "[input]\nsize = [64, 64]\nresize = \"letterbox\"\nmean = [0.485, 0.456, 0.406]\n\
         std = [0.229, 0.224, 0.225]\n[output]\nlayout = \"boxes-scores-labels\"\n",
    )
    .unwrap();
    ok(&[
        "detect",
        &p("plain.onnx"),
        &p("data/images"),
        "--spec",
        &spec.display().to_string(),
        "--backend",
        "tract",
        "--score-threshold",
        "0",
        "--json",
        &p("raw.json"),
    ]);
    let raw = read_dets(&dir.join("raw.json"));
    for backend in &backends {
        let host = detect("plain.onnx", backend, &format!("host-{backend}.json"));
        let graph = detect("nms.onnx", backend, &format!("graph-{backend}.json"));
        let kept: usize = graph.values().map(Vec::len).sum();
        let candidates: usize = raw.values().map(Vec::len).sum();
        eprintln!("{backend}: NMS kept {kept} of {candidates} candidates");
        // NMS pruned a good share; class-agnostic NMS would also drop the other classes' boxes
        // on the same locations, which the comparison with the host's class-aware NMS catches.
        assert!(
            kept > 0 && kept * 10 < candidates * 9,
            "{backend}: {kept} of {candidates}"
        );
        assert_same(&graph, &host, &format!("{backend}: graph NMS vs host NMS"));
    }

    // `densa eval detect` serves the CHW NMS'd model too, with the same result.
    let eval = |model: &str| -> serde_json::Value {
        let out = ok(&[
            "eval",
            "detect",
            &p(model),
            "--data",
            &p("data/annotations.json"),
            "--json",
            "--backend",
            "tract",
        ]);
        serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap()).unwrap()
    };
    let (a, b) = (eval("plain.onnx"), eval("nms.onnx"));
    for key in ["AP", "AP50"] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!((x - y).abs() < 1e-6, "{key}: plain {x}, nms {y}");
    }
}
