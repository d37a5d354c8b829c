//! The detector end to end through the CLI, CI-sized: `densa synth` -> `densa finetune --task
//! detect` (random init, tiny synthetic set, 64 px) -> `densa export detector` -> checks:
//! - the model learns: validation AP50 above a threshold a broken loss, target assignment or
//!   decoding would not reach (chance is ~0);
//! - the exported detector gives the same outputs on densa-tract, densa-ort and the
//!   `onnxruntime` Python package (boxes IoU >= 0.99, scores within 1e-4);
//! - `densa eval detect --json` equals pycocotools run on `densa detect --json`'s output;
//! - a corrupt image in a served folder is reported and skipped, the rest served.

use crate::common;

use std::path::Path;

use common::*;
use densa::runtime::data::coco::load_dataset;
use densa::runtime::npy;
use densa::runtime::Tensor;
use ndarray::ArrayD;

fn ok(args: &[&str]) -> String {
    let o = run_densa(args);
    let err = stderr(&o);
    assert!(o.status.success(), "densa {args:?} failed:\n{err}");
    String::from_utf8_lossy(&o.stdout).into_owned() + &err
}

fn iou(a: &[f32], b: &[f32]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |v: &[f32]| (v[2] - v[0]) * (v[3] - v[1]);
    inter / (area(a) + area(b) - inter).max(1e-9)
}

/// Outputs of two runs agree: same labels, scores within 1e-4, boxes IoU >= 0.99 (for boxes
/// larger than a pixel; degenerate clipped boxes compare by coordinates).
fn assert_same_detections(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    let get = |o: &[(String, Tensor)], n: &str| {
        o.iter()
            .find(|(k, _)| k == n)
            .unwrap_or_else(|| panic!("{what}: no output {n}"))
            .1
            .to_f32()
    };
    let (ba, bb) = (get(a, "boxes"), get(b, "boxes"));
    let (sa, sb) = (get(a, "scores"), get(b, "scores"));
    let (la, lb) = (get(a, "labels"), get(b, "labels"));
    assert_eq!(ba.shape(), bb.shape(), "{what}");
    let k = sa.len();
    let ba = ba.into_shape_with_order((k, 4)).unwrap();
    let bb = bb.into_shape_with_order((k, 4)).unwrap();
    let mut worst_iou = 1f32;
    let mut worst_score = 0f32;
    for i in 0..k {
        let (x, y) = (ba.row(i).to_vec(), bb.row(i).to_vec());
        // Top-k of near-equal scores may swap order between backends; match by best IoU among
        // the same label within the score tolerance.
        let j = (0..k)
            .filter(|&j| la.as_slice().unwrap()[i] == lb.as_slice().unwrap()[j])
            .filter(|&j| (sa.as_slice().unwrap()[i] - sb.as_slice().unwrap()[j]).abs() <= 1e-4)
            .max_by(|&p, &q| iou(&x, &bb.row(p).to_vec()).total_cmp(&iou(&x, &bb.row(q).to_vec())))
            .unwrap_or_else(|| panic!("{what}: detection {i} has no counterpart"));
        let yj = bb.row(j).to_vec();
        let big = (x[2] - x[0]) > 1.0 && (x[3] - x[1]) > 1.0;
        let v = if big {
            iou(&x, &yj)
        } else {
            if x.iter().zip(&yj).all(|(p, q)| (p - q).abs() < 1e-2) {
                1.0
            } else {
                0.0
            }
        };
        worst_iou = worst_iou.min(v);
        worst_score =
            worst_score.max((sa.as_slice().unwrap()[i] - sb.as_slice().unwrap()[j]).abs());
        let _ = y;
    }
    eprintln!("{what}: worst matched IoU {worst_iou:.5}, worst score difference {worst_score:.2e}");
    assert!(worst_iou >= 0.99, "{what}: IoU {worst_iou}");
}

#[test]
fn detector_finetunes_exports_serves_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |rel: &str| dir.join(rel).display().to_string();
    ok(&[
        "synth",
        "--out",
        &p("train"),
        "--images",
        "192",
        "--seed",
        "0",
        "--size",
        "64x64",
        "--max-objects",
        "3",
    ]);
    ok(&[
        "synth",
        "--out",
        &p("val"),
        "--images",
        "32",
        "--seed",
        "1",
        "--size",
        "64x64",
        "--max-objects",
        "3",
    ]);
    let log = ok(&[
        "finetune",
        "--task",
        "detect",
        "--data",
        &p("train/annotations.json"),
        "--val-data",
        &p("val/annotations.json"),
        "--image-size",
        "64",
        "--epochs",
        "20",
        "--val-every",
        "10",
        "--batch-size",
        "8",
        "--out",
        &p("run"),
        "--backend",
        "auto",
    ]);
    eprintln!("{log}");
    ok(&[
        "export",
        "detector",
        "--ckpt",
        &p("run"),
        "--out",
        &p("det.onnx"),
    ]);

    // 1. It learned: COCO AP50 on held-out scenes.
    let out = ok(&[
        "eval",
        "detect",
        &p("det.onnx"),
        "--data",
        &p("val/annotations.json"),
        "--json",
        "--backend",
        "tract",
    ]);
    let line = out
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let stats: serde_json::Value = serde_json::from_str(line).unwrap();
    let ap50 = stats["AP50"].as_f64().unwrap();
    eprintln!(
        "validation AP50 {ap50:.4}, AP {:.4}",
        stats["AP"].as_f64().unwrap()
    );
    // Measured: AP50 0.305 (AP 0.149) with this seed on tract and ONNX Runtime; a model that
    // learned nothing scores near 0. The margin covers float differences between CPUs.
    assert!(
        ap50 >= 0.25,
        "AP50 {ap50} after fine-tuning: the detector did not learn"
    );

    // 2. Same outputs on tract, ort and Python onnxruntime.
    let model = densa::exporter::io::load(Path::new(&p("det.onnx"))).unwrap();
    let mut x = ArrayD::<f32>::zeros(vec![2, 3, 64, 64]);
    for (i, v) in x.iter_mut().enumerate() {
        *v = ((i * 7919 % 255) as f32 / 255.0 - 0.45) / 0.22;
    }
    let input = vec![("images".to_string(), Tensor::F32(x.clone()))];
    let tract = tract_backend()
        .load_model(&model, "det")
        .unwrap()
        .run(input.clone())
        .unwrap();
    if let Some(ort) = ort_backend() {
        let o = ort
            .load_model(&model, "det")
            .unwrap()
            .run(input.clone())
            .unwrap();
        assert_same_detections(&tract, &o, "tract vs ort");
    }
    if let Some(python) = python_peers() {
        let xin = dir.join("x.npy");
        npy::write_npy(&xin, &Tensor::F32(x)).unwrap();
        let out = dir.join("py.npz");
        python_reference(
            &python,
            Path::new(&p("det.onnx")),
            &[("images", &xin)],
            &out,
        );
        let py = npy::read_npz(&out).unwrap();
        assert_same_detections(&tract, &py, "tract vs python onnxruntime");
    }

    // 3. `densa eval detect` equals pycocotools on `densa detect --json`.
    ok(&[
        "detect",
        &p("det.onnx"),
        &p("val/images"),
        "--json",
        &p("dets.json"),
        "--score-threshold",
        "0.001",
        "--batch",
        "8",
        "--backend",
        "tract",
    ]);
    let gt = load_dataset(dir.join("val/annotations.json")).unwrap();
    let mut dets: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dets.json")).unwrap()).unwrap();
    for d in &mut dets {
        let name = d["file_name"].as_str().unwrap().to_string();
        let id = gt.images.iter().find(|im| im.file_name == name).unwrap().id;
        d["image_id"] = id.into();
        // densa detect writes model labels; the synthetic categories are numbered from 1.
        let label = d["category_id"].as_u64().unwrap();
        let mut cats: Vec<u64> = gt.categories.iter().map(|c| c.id).collect();
        cats.sort_unstable();
        d["category_id"] = cats[label as usize].into();
    }
    std::fs::write(
        dir.join("dets_coco.json"),
        serde_json::to_string(&dets).unwrap(),
    )
    .unwrap();
    if let Some(python) = python_peers() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/coco_reference.py");
        let o = std::process::Command::new(&python)
            .arg(script)
            .arg(dir.join("val/annotations.json"))
            .arg(dir.join("dets_coco.json"))
            .arg("bbox")
            .output()
            .unwrap();
        assert!(o.status.success(), "pycocotools: {}", stderr(&o));
        let reference: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap())
                .unwrap();
        let names = [
            "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
        ];
        for (k, name) in names.iter().enumerate() {
            let ours = stats[name].as_f64().unwrap();
            let theirs = reference["stats"][k].as_f64().unwrap();
            assert!(
                (ours - theirs).abs() <= 1e-6,
                "{name}: densa {ours}, pycocotools {theirs}"
            );
        }
    }

    // 4. A corrupt image is reported and skipped; the rest are served.
    let served = dir.join("serve");
    std::fs::create_dir_all(&served).unwrap();
    for im in gt.images.iter().take(3) {
        std::fs::copy(
            dir.join("val/images").join(&im.file_name),
            served.join(&im.file_name),
        )
        .unwrap();
    }
    std::fs::write(served.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let o = run_densa(&[
        "detect",
        &p("det.onnx"),
        &served.display().to_string(),
        "--backend",
        "tract",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("broken.png") && err.contains("skipping"),
        "{err}"
    );
    assert!(
        err.contains("3 image(s) served") && err.contains("1 skipped"),
        "{err}"
    );
}
