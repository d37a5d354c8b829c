//! `densa adapt` end to end through the CLI, on a tiny deployed detector (resnet-edge, 64 px)
//! and `densa synth` scenes of the shifted style:
//! - supervised `--train head`: only `head.*` initializers change (every one of them), the
//!   inputs, outputs, nodes and metadata are those of the deployed model, the input file is
//!   untouched, the report has a finite loss per step and a peak memory;
//! - unlabeled `--method consistency` with a name pattern: only the matching tensors change;
//! - the adapted model passes `onnx.checker` (full) and gives the same detections on
//!   densa-tract, densa-ort and the `onnxruntime` Python package;
//! - bad input (a backbone instead of a detector, the input as `--out`, corrupt JSON, a corrupt
//!   image, a folded model for bn-stats) fails with exit status 1 and a message naming it.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;
use densa::exporter::onnx::ModelProto;
use densa::models::detect::DetectorConfig;
use densa::models::Arch;
use densa::runtime::infer::spec::{
    Channels, InputLayout, InputSpec, ModelSpec, OutputLayout, OutputSpec, ResizeMode, SPEC_KEY,
};
use densa::runtime::npy;
use densa::runtime::Tensor;
use ndarray::ArrayD;

fn ok(args: &[&str]) -> String {
    let o = run_densa(args);
    let err = stderr(&o);
    assert!(o.status.success(), "densa {args:?} failed:\n{err}");
    String::from_utf8_lossy(&o.stdout).into_owned() + &err
}

/// A deployed detector as `densa export detector` writes it (random initial weights: the
/// invariants do not need a trained one), and shifted-style scenes with labels.
fn setup(dir: &Path) -> PathBuf {
    let mut config = DetectorConfig::new(
        Arch::Edge,
        vec!["disk".into(), "square".into(), "triangle".into()],
    );
    config.image_size = 64;
    let spec = ModelSpec {
        input: InputSpec {
            name: Some("images".into()),
            layout: InputLayout::Nchw,
            size: [64, 64],
            resize: ResizeMode::Letterbox,
            pad_value: 114,
            scale: 1.0 / 255.0,
            mean: config.mean,
            std: config.std,
            channels: Channels::Rgb,
        },
        output: OutputSpec {
            layout: OutputLayout::BoxesScoresLabels,
            boxes: "boxes".into(),
            scores: "scores".into(),
            labels: "labels".into(),
            label_offset: 0,
            nms_iou: 0.6,
            host_nms: true,
            classes: config.classes.clone(),
        },
    };
    let state = config.initial_state(1).unwrap();
    let model = config
        .inference_graph(Some(&state), 100, &[(SPEC_KEY, spec.to_toml().as_str())])
        .unwrap();
    let path = dir.join("det.onnx");
    densa::exporter::io::save(&model, &path).unwrap();
    let unfolded = config
        .inference_graph_bn(
            Some(&state),
            100,
            None,
            &[(SPEC_KEY, spec.to_toml().as_str())],
            false,
        )
        .unwrap();
    densa::exporter::io::save(&unfolded, &dir.join("det_bn.onnx")).unwrap();
    let scenes = dir.join("shift");
    ok(&[
        "synth",
        "--out",
        scenes.to_str().unwrap(),
        "--images",
        "6",
        "--size",
        "64x64",
        "--seed",
        "3",
        "--style",
        "b",
    ]);
    path
}

fn load(p: &Path) -> ModelProto {
    densa::exporter::io::load(p).unwrap()
}

/// Names of the initializers whose values differ between `a` and `b` (same names required).
fn changed(a: &ModelProto, b: &ModelProto) -> Vec<String> {
    let (ga, gb) = (a.graph.as_ref().unwrap(), b.graph.as_ref().unwrap());
    assert_eq!(ga.node, gb.node, "nodes differ");
    assert_eq!(ga.input, gb.input, "inputs differ");
    assert_eq!(ga.output, gb.output, "outputs differ");
    assert_eq!(a.metadata_props, b.metadata_props, "metadata differs");
    assert_eq!(a.opset_import, b.opset_import);
    assert_eq!(ga.initializer.len(), gb.initializer.len());
    ga.initializer
        .iter()
        .zip(&gb.initializer)
        .filter_map(|(x, y)| {
            assert_eq!(x.name, y.name);
            assert_eq!(x.dims, y.dims, "{}", x.name);
            (x != y).then(|| x.name.clone())
        })
        .collect()
}

fn parameters(m: &ModelProto, select: impl Fn(&str) -> bool) -> Vec<String> {
    m.graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| (n.ends_with(".weight") || n.ends_with(".bias")) && select(n))
        .collect()
}

#[test]
fn supervised_head_adaptation_changes_only_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let det = setup(dir);
    let before_bytes = std::fs::read(&det).unwrap();
    let out = dir.join("adapted.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let log = ok(&[
        "adapt",
        &s(&det),
        "--data",
        &s(&dir.join("shift/annotations.json")),
        "--train",
        "head",
        "--steps",
        "3",
        "--batch",
        "2",
        "--backend",
        "tract",
        "--out",
        &s(&out),
    ]);
    assert!(log.contains("AP "), "no before/after line:\n{log}");
    assert_eq!(
        std::fs::read(&det).unwrap(),
        before_bytes,
        "input model modified"
    );
    let (a, b) = (load(&det), load(&out));
    let mut got = changed(&a, &b);
    got.sort();
    let mut head = parameters(&a, |n| n.starts_with("head."));
    head.sort();
    assert!(!head.is_empty());
    assert_eq!(got, head, "exactly the head's parameters change");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapted.report.json")).unwrap())
            .unwrap();
    let losses = report["losses"].as_array().unwrap();
    assert_eq!(losses.len(), 3);
    assert!(losses
        .iter()
        .all(|l| l.as_f64().is_some_and(f64::is_finite)));
    assert!(report["peak_memory_mb"].as_f64().unwrap() > 0.0);
    assert!(report["before"]["AP"].as_f64().is_some());
    assert!(report["after"]["AP"].as_f64().is_some());
    assert_eq!(
        report["trainable_tensors"].as_u64().unwrap() as usize,
        head.len()
    );
    assert!(dir.join("adapted.loss.png").is_file());
}

#[test]
fn unlabeled_consistency_with_a_pattern_changes_only_matches_and_peers_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let det = setup(dir);
    let out = dir.join("c.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(&[
        "adapt",
        &s(&det),
        "--data",
        &s(&dir.join("shift/images")),
        "--method",
        "consistency",
        "--train",
        "fpn.layer_blocks.*,head.cls_logits",
        "--steps",
        "2",
        "--batch",
        "2",
        "--lr",
        "0.01",
        "--backend",
        "tract",
        "--out",
        &s(&out),
    ]);
    let (a, b) = (load(&det), load(&out));
    let mut got = changed(&a, &b);
    got.sort();
    let mut want = parameters(&a, |n| {
        n.starts_with("fpn.layer_blocks.") || n.starts_with("head.cls_logits.")
    });
    want.sort();
    assert_eq!(got, want);

    // The adapted model on tract, ort and Python onnxruntime (with onnx.checker).
    let mut x = ArrayD::<f32>::zeros(vec![2, 3, 64, 64]);
    for (i, v) in x.iter_mut().enumerate() {
        *v = ((i * 7919 % 255) as f32 / 255.0 - 0.45) / 0.22;
    }
    let input = vec![("images".to_string(), Tensor::F32(x.clone()))];
    let tract = tract_backend()
        .load_model(&b, "adapted")
        .unwrap()
        .run(input.clone())
        .unwrap();
    if let Some(ort) = ort_backend() {
        let o = ort.load_model(&b, "adapted").unwrap().run(input).unwrap();
        same_detections(&tract, &o, "tract vs ort");
    }
    if let Some(python) = python_peers() {
        let xin = dir.join("x.npy");
        npy::write_npy(&xin, &Tensor::F32(x)).unwrap();
        let py_out = dir.join("py.npz");
        python_reference(&python, &out, &[("images", &xin)], &py_out);
        let py = npy::read_npz(&py_out).unwrap();
        same_detections(&tract, &py, "tract vs python onnxruntime");
    }
}

/// A model that kept its batch norms: `bn-stats` changes exactly the running statistics, and
/// `--train all` trains through the batch norms on tract (their scale and bias included).
#[test]
fn bn_stats_and_training_through_unfolded_batch_norm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let det = dir.join("det_bn.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let stats = dir.join("stats.onnx");
    ok(&[
        "adapt",
        &s(&det),
        "--data",
        &s(&dir.join("shift/images")),
        "--method",
        "bn-stats",
        "--batch",
        "3",
        "--backend",
        "tract",
        "--out",
        &s(&stats),
    ]);
    let a = load(&det);
    let mut got = changed(&a, &load(&stats));
    got.sort();
    let mut want: Vec<String> = a
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| n.ends_with(".running_mean") || n.ends_with(".running_var"))
        .collect();
    want.sort();
    assert!(!want.is_empty());
    assert_eq!(got, want);

    let all = dir.join("all.onnx");
    ok(&[
        "adapt",
        &s(&det),
        "--data",
        &s(&dir.join("shift/annotations.json")),
        "--train",
        "all",
        "--steps",
        "1",
        "--batch",
        "1",
        "--no-eval",
        "--backend",
        "tract",
        "--out",
        &s(&all),
    ]);
    let mut got = changed(&a, &load(&all));
    got.sort();
    let mut want = parameters(&a, |_| true);
    want.sort();
    assert!(want.contains(&"bn1.weight".to_string()));
    assert_eq!(got, want);
}

/// A deployed segmenter (metadata as `densa export segmenter` writes it): supervised head
/// adaptation on the scenes' masks changes exactly the `head.*` parameters.
#[test]
fn segmenter_supervised_adaptation_changes_only_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let config = densa::models::segment::SegmenterConfig::new(Arch::Edge, 4);
    let metadata: Vec<(String, String)> = [
        ("densa.task", "segment"),
        ("densa.arch", "resnet-edge"),
        ("densa.classes", "background,disk,square,triangle"),
        ("densa.input_size", "64x64"),
        ("densa.resize", "stretch"),
        ("densa.mean", "0.485,0.456,0.406"),
        ("densa.std", "0.229,0.224,0.225"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let model = densa::models::segment::inference_graph(&config, None, &metadata, 2).unwrap();
    let seg = dir.join("seg.onnx");
    densa::exporter::io::save(&model, &seg).unwrap();
    let out = dir.join("seg_adapted.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(&[
        "adapt",
        &s(&seg),
        "--data",
        &s(&dir.join("shift/annotations.json")),
        "--steps",
        "2",
        "--batch",
        "2",
        "--backend",
        "tract",
        "--out",
        &s(&out),
    ]);
    let a = load(&seg);
    let mut got = changed(&a, &load(&out));
    got.sort();
    let mut want = parameters(&a, |n| n.starts_with("head."));
    want.sort();
    assert!(!want.is_empty());
    assert_eq!(got, want);
}

fn output(o: &[(String, Tensor)], n: &str) -> ArrayD<f32> {
    o.iter().find(|(k, _)| k == n).unwrap().1.to_f32()
}

/// Scores equal within 1e-4 in order; each box matches a box of the same label whose score is
/// within 1e-4 (top-k of near-ties may order them differently) to 0.01 px.
fn same_detections(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    let (sa, sb) = (output(a, "scores"), output(b, "scores"));
    assert_eq!(sa.shape(), sb.shape(), "{what}");
    let diff = sa
        .iter()
        .zip(sb.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-4, "{what}: scores differ by {diff}");
    let (ba, bb) = (output(a, "boxes"), output(b, "boxes"));
    let (la, lb) = (output(a, "labels"), output(b, "labels"));
    let n = sa.shape()[0];
    let k = sa.shape()[1];
    let ba = ba.into_shape_with_order((n, k, 4)).unwrap();
    let bb = bb.into_shape_with_order((n, k, 4)).unwrap();
    for img in 0..n {
        for i in 0..k {
            let found = (0..k).any(|j| {
                la[[img, i]] == lb[[img, j]]
                    && (sa[[img, i]] - sb[[img, j]]).abs() <= 1e-4
                    && (0..4).all(|c| (ba[[img, i, c]] - bb[[img, j, c]]).abs() <= 1e-2)
            });
            assert!(
                found,
                "{what}: detection {i} of image {img} has no counterpart"
            );
        }
    }
}

#[test]
fn bad_input_fails_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let det = setup(dir);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let data = s(&dir.join("shift/annotations.json"));
    let out = s(&dir.join("x.onnx"));

    // A backbone is not a detector.
    let bb = dir.join("bb.onnx");
    ok(&[
        "export",
        "backbone",
        "--arch",
        "resnet-edge",
        "--out",
        &s(&bb),
    ]);
    let err = assert_clean_failure(&run_densa(&[
        "adapt",
        &s(&bb),
        "--data",
        &data,
        "--out",
        &out,
    ]));
    assert!(err.contains("bb.onnx") && err.contains("backbone"), "{err}");

    // Never over the input model.
    let err = assert_clean_failure(&run_densa(&[
        "adapt",
        &s(&det),
        "--data",
        &data,
        "--out",
        &s(&det),
    ]));
    assert!(err.contains("input model"), "{err}");

    // Corrupt JSON names the file.
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"images\": [").unwrap();
    let err = assert_clean_failure(&run_densa(&[
        "adapt",
        &s(&det),
        "--data",
        &s(&bad),
        "--out",
        &out,
    ]));
    assert!(err.contains("bad.json"), "{err}");

    // A corrupt image in an unlabeled folder names the image.
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::write(imgs.join("broken.png"), b"\x89PNG not really").unwrap();
    let err = assert_clean_failure(&run_densa(&[
        "adapt",
        &s(&det),
        "--data",
        &s(&imgs),
        "--steps",
        "1",
        "--batch",
        "1",
        "--backend",
        "tract",
        "--out",
        &out,
    ]));
    assert!(err.contains("broken.png"), "{err}");

    // bn-stats on a folded export, a selection that matches nothing.
    let err = assert_clean_failure(&run_densa(&[
        "adapt",
        &s(&det),
        "--data",
        &data,
        "--method",
        "bn-stats",
        "--out",
        &out,
    ]));
    assert!(err.contains("folded"), "{err}");
    let err = assert_clean_failure(&run_densa(&[
        "adapt",
        &s(&det),
        "--data",
        &data,
        "--train",
        "nothing.*",
        "--out",
        &out,
    ]));
    assert!(err.contains("nothing.*"), "{err}");
    // A memory budget below what the process needs stops it.
    let err = assert_clean_failure(&run_densa(&[
        "adapt",
        &s(&det),
        "--data",
        &data,
        "--steps",
        "1",
        "--batch",
        "1",
        "--memory-budget",
        "1",
        "--backend",
        "tract",
        "--out",
        &out,
    ]));
    assert!(err.contains("--memory-budget"), "{err}");
    assert!(
        !dir.join("x.onnx").exists(),
        "a failed run wrote its output"
    );
}

/// Three classes of coloured squares on grey, 32 px; `shifted` swaps red and blue and washes
/// the colours out (the device's camera): the deployed classifier confuses red and blue there.
fn squares(root: &Path, per_class: usize, shifted: bool, seed: u64) {
    let colours = [
        ("blue", [0.1f32, 0.2, 0.9]),
        ("green", [0.1, 0.8, 0.1]),
        ("red", [0.9, 0.1, 0.1]),
    ];
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32) / (1u64 << 31) as f32
    };
    for (name, colour) in colours {
        std::fs::create_dir_all(root.join(name)).unwrap();
        for i in 0..per_class {
            let side = 8 + (next() * 9.0) as u32;
            let (x0, y0) = (
                (next() * (32 - side) as f32) as u32,
                (next() * (32 - side) as f32) as u32,
            );
            let gain = 0.7 + 0.3 * next();
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let inside = (x0..x0 + side).contains(&x) && (y0..y0 + side).contains(&y);
                let mut px = [0u8; 3];
                for (c, out) in px.iter_mut().enumerate() {
                    let c_src = if shifted { 2 - c } else { c };
                    let mut v = if inside { colour[c_src] * gain } else { 0.5 };
                    v += (next() - 0.5) * 0.2;
                    if shifted {
                        v = v * 0.6 + 0.3;
                    }
                    *out = (v.clamp(0.0, 1.0) * 255.0) as u8;
                }
                image::Rgb(px)
            });
            img.save(root.join(name).join(format!("{i:03}.png")))
                .unwrap();
        }
    }
}

/// A classifier trained by `densa train` (its `model.onnx`), adapted with labels on the
/// shifted domain: only `fc.*` changes with `--train head`, held-out accuracy on the shifted
/// domain rises, the adapted model passes `onnx.checker` and gives tract's logits on Python
/// onnxruntime; `bn-stats` changes exactly the running statistics; labels that are not the
/// model's classes and COCO labels are refused with a message.
#[test]
fn classifier_adaptation_with_labels_fixes_a_shift() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    squares(&dir.join("src"), 24, false, 1);
    squares(&dir.join("tgt"), 8, true, 2);
    squares(&dir.join("tgt_val"), 12, true, 3);
    ok(&[
        "train",
        "--data",
        &s(&dir.join("src")),
        "--image-size",
        "32",
        "--steps",
        "60",
        "--batch-size",
        "16",
        "--holdout-every",
        "0",
        "--out",
        &s(&dir.join("run")),
    ]);
    let model = dir.join("run/model.onnx");
    let a = load(&model);
    let meta = |k: &str| {
        a.metadata_props
            .iter()
            .find(|p| p.key == k)
            .map(|p| p.value.clone())
    };
    assert_eq!(meta("densa.task").as_deref(), Some("classify"));
    assert_eq!(meta("densa.classes").as_deref(), Some("blue,green,red"));
    assert_eq!(meta("densa.input_size").as_deref(), Some("32x32"));

    let out = dir.join("adapted.onnx");
    ok(&[
        "adapt",
        &s(&model),
        "--data",
        &s(&dir.join("tgt")),
        "--val-data",
        &s(&dir.join("tgt_val")),
        "--steps",
        "60",
        "--lr",
        "0.01",
        "--backend",
        "tract",
        "--out",
        &s(&out),
    ]);
    let b = load(&out);
    let mut got = changed(&a, &b);
    got.sort();
    assert_eq!(got, vec!["fc.bias".to_string(), "fc.weight".to_string()]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapted.report.json")).unwrap())
            .unwrap();
    let before = report["before"]["accuracy"].as_f64().unwrap();
    let after = report["after"]["accuracy"].as_f64().unwrap();
    assert!(
        after >= before + 0.2,
        "accuracy on the shifted domain {before} -> {after}"
    );

    let mut x = ArrayD::<f32>::zeros(vec![2, 3, 32, 32]);
    for (i, v) in x.iter_mut().enumerate() {
        *v = ((i * 7919 % 255) as f32 / 255.0 - 0.45) / 0.22;
    }
    let input = vec![("images".to_string(), Tensor::F32(x.clone()))];
    let tract = tract_backend()
        .load_model(&b, "adapted")
        .unwrap()
        .run(input)
        .unwrap();
    if let Some(python) = python_peers() {
        let xin = dir.join("x.npy");
        npy::write_npy(&xin, &Tensor::F32(x)).unwrap();
        let py_out = dir.join("py.npz");
        python_reference(&python, &out, &[("images", &xin)], &py_out);
        let py = npy::read_npz(&py_out).unwrap();
        let d = max_rel_diff(&output(&tract, "logits"), &output(&py, "logits"));
        assert!(d < 1e-4, "tract vs python onnxruntime logits: {d}");
    }

    let stats = dir.join("stats.onnx");
    ok(&[
        "adapt",
        &s(&model),
        "--data",
        &s(&dir.join("tgt")),
        "--method",
        "bn-stats",
        "--no-eval",
        "--backend",
        "tract",
        "--out",
        &s(&stats),
    ]);
    let mut got = changed(&a, &load(&stats));
    got.sort();
    let mut want: Vec<String> = a
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| n.ends_with(".running_mean") || n.ends_with(".running_var"))
        .collect();
    want.sort();
    assert!(!want.is_empty());
    assert_eq!(got, want);

    std::fs::create_dir_all(dir.join("tgt/yellow")).unwrap();
    std::fs::copy(dir.join("tgt/red/000.png"), dir.join("tgt/yellow/000.png")).unwrap();
    let o = run_densa(&[
        "adapt",
        &s(&model),
        "--data",
        &s(&dir.join("tgt")),
        "--out",
        &s(&dir.join("x.onnx")),
    ]);
    let err = assert_clean_failure(&o);
    assert!(err.contains("`yellow` is not a class"), "{err}");
    let o = run_densa(&[
        "adapt",
        &s(&model),
        "--data",
        &s(&dir.join("tgt")),
        "--labels",
        "coco",
        "--out",
        &s(&dir.join("x.onnx")),
    ]);
    let err = assert_clean_failure(&o);
    assert!(err.contains("is a classifier"), "{err}");
}

/// `--method pixpro` / `densecl` (unlabeled, the pretext objectives on the backbone features):
/// by default exactly the backbone's parameters change; a selection without backbone
/// parameters and a pretext method without a dense objective are refused with a message.
#[test]
fn pretext_objectives_adapt_the_backbone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let det = setup(dir);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let a = load(&det);
    let mut want = parameters(&a, |n| !n.starts_with("head.") && !n.starts_with("fpn."));
    want.sort();
    assert!(want.contains(&"conv1.weight".to_string()));
    for method in ["pixpro", "densecl"] {
        let out = dir.join(format!("{method}.onnx"));
        let log = ok(&[
            "adapt",
            &s(&det),
            "--data",
            &s(&dir.join("shift/images")),
            "--method",
            method,
            "--steps",
            "2",
            "--batch",
            "2",
            "--backend",
            "tract",
            "--out",
            &s(&out),
        ]);
        let mut got = changed(&a, &load(&out));
        got.sort();
        assert_eq!(got, want, "{method}:\n{log}");
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{method}.report.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(report["method"], method);
        assert_eq!(report["train"], "backbone");
        let losses = report["losses"].as_array().unwrap();
        assert_eq!(losses.len(), 2);
        assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite()));
    }
    let o = run_densa(&[
        "adapt",
        &s(&det),
        "--data",
        &s(&dir.join("shift/images")),
        "--method",
        "densecl",
        "--train",
        "head",
        "--out",
        &s(&dir.join("x.onnx")),
    ]);
    let err = assert_clean_failure(&o);
    assert!(
        err.contains("selects no parameter the backbone features"),
        "{err}"
    );
    let o = run_densa(&[
        "adapt",
        &s(&det),
        "--data",
        &s(&dir.join("shift/images")),
        "--method",
        "swav",
        "--out",
        &s(&dir.join("x.onnx")),
    ]);
    let err = assert_clean_failure(&o);
    assert!(err.contains("no dense adaptation objective"), "{err}");
}
