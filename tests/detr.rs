//! The DETR-family detector end to end: the split train step (forward, host Hungarian
//! matching, backward) on tract and ONNX Runtime agreeing; the exported inference graph on
//! tract, ONNX Runtime (Rust) and ONNX Runtime from Python after `onnx.checker`.

use crate::common;

use common::{max_rel_diff, ort_backend, python_peers, python_reference, tract_backend};
use densa::exporter::Tensor;
use densa::models::detr::matcher::xyxy_to_cxcywh;
use densa::models::detr::train::{step_graphs, DetrTrainer};
use densa::models::detr::{DetrConfig, ImageTargets};
use densa::models::train_step::{OptimizerConfig, TrainStepConfig};
use densa::models::Arch;
use densa::runtime::npy::{read_npz, write_npy};
use ndarray::{ArrayD, IxDyn};

fn tiny() -> DetrConfig {
    let mut c = DetrConfig::new(Arch::Edge, vec!["square".into(), "bar".into()]);
    c.image_size = 64;
    c.d_model = 16;
    c.heads = 2;
    c.encoder_layers = 1;
    c.decoder_layers = 2;
    c.ffn_dim = 32;
    c.num_queries = 6;
    c
}

/// Two 64 px scenes: noise with bright rectangles, and their normalised cxcywh targets.
fn scenes() -> (Tensor, Vec<ImageTargets>) {
    let s = 64usize;
    let rects: [&[([usize; 4], usize)]; 2] = [
        &[([8, 10, 30, 32], 0), ([40, 36, 60, 44], 1)],
        &[([20, 20, 48, 50], 0)],
    ];
    let mut x: Vec<f32> = (0..2 * 3 * s * s)
        .map(|i| ((i * 7919 % 101) as f32 / 101.0) * 0.2 - 1.0)
        .collect();
    let mut targets = Vec::new();
    for (n, list) in rects.iter().enumerate() {
        let mut t = ImageTargets::default();
        for &([x1, y1, x2, y2], label) in list.iter() {
            for c in 0..3 {
                for y in y1..y2 {
                    for xx in x1..x2 {
                        x[((n * 3 + c) * s + y) * s + xx] = if label == 0 { 1.5 } else { 0.8 };
                    }
                }
            }
            let f = |v: usize| v as f32 / s as f32;
            t.boxes.push(xyxy_to_cxcywh([f(x1), f(y1), f(x2), f(y2)]));
            t.labels.push(label);
        }
        targets.push(t);
    }
    (
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, 3, s, s]), x).unwrap()),
        targets,
    )
}

#[test]
fn split_steps_agree_on_tract_and_onnx_runtime_and_the_export_serves_on_both() {
    let c = tiny();
    let train = TrainStepConfig::new(OptimizerConfig::adamw(2e-3, 1e-4));
    let graphs = step_graphs(&c, 2, &train, 0).unwrap();
    let (images, targets) = scenes();
    let tract = tract_backend();
    let mut t = DetrTrainer::new(&c, &graphs, 2, tract.as_ref()).unwrap();
    let tract_losses: Vec<f32> = (0..3)
        .map(|_| t.step(images.clone(), &targets, &[]).unwrap().loss)
        .collect();
    if let Some(ort) = ort_backend() {
        let mut o = DetrTrainer::new(&c, &graphs, 2, ort.as_ref()).unwrap();
        for (k, &tl) in tract_losses.iter().enumerate() {
            let ol = o.step(images.clone(), &targets, &[]).unwrap().loss;
            assert!(
                (ol - tl).abs() <= 1e-3 * tl.abs(),
                "step {k}: ort loss {ol}, tract {tl}"
            );
        }
        let (a, b) = (
            o.state().get("class_embed.weight").unwrap().to_f32(),
            t.state().get("class_embed.weight").unwrap().to_f32(),
        );
        assert!(max_rel_diff(&a, &b) < 1e-3);
    }

    // Export the trained state (optimizer slots are ignored by name) and serve it.
    let model = c.inference_graph(Some(t.state()), 6, &[]).unwrap();
    let tract_out = tract
        .load_model(&model, "detr")
        .unwrap()
        .run(vec![("images".into(), images.clone())])
        .unwrap();
    let get = |outs: &[(String, Tensor)], name: &str| {
        outs.iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .unwrap()
    };
    let boxes = get(&tract_out, "boxes").to_f32();
    assert_eq!(boxes.shape(), &[2, 6, 4]);
    if let Some(ort) = ort_backend() {
        let ort_out = ort
            .load_model(&model, "detr")
            .unwrap()
            .run(vec![("images".into(), images.clone())])
            .unwrap();
        for name in ["boxes", "scores"] {
            let d = max_rel_diff(
                &get(&ort_out, name).to_f32(),
                &get(&tract_out, name).to_f32(),
            );
            assert!(d < 1e-4, "{name}: ort vs tract differ by {d}");
        }
        assert_eq!(get(&ort_out, "labels"), get(&tract_out, "labels"));
    }
    if let Some(python) = python_peers() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("detr.onnx");
        densa::exporter::io::save(&model, &m).unwrap();
        let x = dir.path().join("images.npy");
        write_npy(&x, &images).unwrap();
        let out = dir.path().join("out.npz");
        python_reference(&python, &m, &[("images", &x)], &out);
        let py = read_npz(&out).unwrap();
        for name in ["boxes", "scores"] {
            let d = max_rel_diff(&get(&py, name).to_f32(), &get(&tract_out, name).to_f32());
            assert!(
                d < 1e-4,
                "{name}: Python ONNX Runtime vs tract differ by {d}"
            );
        }
    }
}

/// `densa finetune --task detect --detector detr` -> resume -> `densa export detector` ->
/// `densa eval detect` and `densa detect`, CI-sized (24 images of 64 px, 3 epochs).
#[test]
fn detr_finetunes_resumes_exports_and_serves_through_the_cli() {
    use common::{assert_clean_failure, run_densa, stderr};
    let tmp = tempfile::tempdir().unwrap();
    let p = |rel: &str| tmp.path().join(rel).display().to_string();
    let ok = |args: &[&str]| {
        let o = run_densa(args);
        assert!(o.status.success(), "densa {args:?} failed:\n{}", stderr(&o));
        (String::from_utf8_lossy(&o.stdout).into_owned(), stderr(&o))
    };
    for (dir, n, seed) in [("train", "24", "0"), ("val", "8", "1")] {
        ok(&[
            "synth",
            "--out",
            &p(dir),
            "--images",
            n,
            "--seed",
            seed,
            "--size",
            "64x64",
            "--max-objects",
            "2",
        ]);
    }
    let finetune_args = |epochs: &str, size: &str, batch: &str| -> Vec<String> {
        [
            "finetune",
            "--task",
            "detect",
            "--detector",
            "detr",
            "--data",
            &p("train/annotations.json"),
            "--val-data",
            &p("val/annotations.json"),
            "--image-size",
            size,
            "--epochs",
            epochs,
            "--val-every",
            "1",
            "--batch-size",
            batch,
            "--out",
            &p("run"),
            "--backend",
            "tract",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let finetune = |epochs: &str| {
        let args = finetune_args(epochs, "64", "4");
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (_, log) = finetune("2");
    assert!(log.contains("epoch 2/2 step 12"), "{log}");
    let (_, log) = finetune("3");
    assert!(log.contains("resuming after epoch 2 (step 12)"), "{log}");
    assert!(log.contains("epoch 3/3 step 18"), "{log}");
    let val = std::fs::read_to_string(tmp.path().join("run/val.jsonl")).unwrap();
    assert_eq!(val.lines().count(), 3, "{val}");
    // Other arguments are refused by name, before anything is written.
    let config = std::fs::read_to_string(tmp.path().join("run/detr.json")).unwrap();
    let args = finetune_args("4", "96", "2");
    let err = assert_clean_failure(&run_densa(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(
        err.contains("image_size: 64 -> 96") && err.contains("batch_size: 4 -> 2"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("run/detr.json")).unwrap(),
        config
    );
    let (_, log) = ok(&[
        "export",
        "detector",
        "--ckpt",
        &p("run"),
        "--out",
        &p("detr.onnx"),
        "--top-k",
        "10",
    ]);
    assert!(log.contains("DETR on resnet-edge"), "{log}");
    let model = densa::exporter::io::load(std::path::Path::new(&p("detr.onnx"))).unwrap();
    let spec = model
        .metadata_props
        .iter()
        .find(|m| m.key == "densa.spec")
        .map(|m| m.value.clone())
        .expect("densa.spec metadata");
    assert!(spec.contains("host_nms = false"), "{spec}");
    let (out, _) = ok(&[
        "eval",
        "detect",
        &p("detr.onnx"),
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
    assert_eq!(stats["images"].as_u64(), Some(8));
    ok(&[
        "detect",
        &p("detr.onnx"),
        &p("val/images"),
        "--json",
        &p("dets.json"),
        "--score-threshold",
        "0",
        "--backend",
        "tract",
    ]);
    let dets: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("dets.json")).unwrap())
            .unwrap();
    assert_eq!(dets.len(), 8 * 10, "top 10 per image, no NMS");
    // A whole DETR initialises another fine-tuning.
    let (_, log) = ok(&[
        "finetune",
        "--task",
        "detect",
        "--detector",
        "detr",
        "--data",
        &p("train/annotations.json"),
        "--val-data",
        &p("val/annotations.json"),
        "--image-size",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--init",
        &p("run"),
        "--out",
        &p("run2"),
        "--backend",
        "tract",
    ]);
    let loaded = log
        .lines()
        .find(|l| l.starts_with("init: loaded"))
        .unwrap_or_else(|| panic!("{log}"));
    let counts: Vec<&str> = loaded.split_whitespace().collect();
    assert_eq!(counts[2], counts[4], "every tensor loaded: {loaded}");
    let e = assert_clean_failure(&run_densa(&[
        "export",
        "detector",
        "--ckpt",
        &p("run"),
        "--out",
        &p("x.onnx"),
        "--nms-in-graph",
    ]));
    assert!(e.contains("DETR") && e.contains("--nms-in-graph"), "{e}");
}

/// `MultiHeadAttention` with an additive mask and the sine positional encoding against
/// PyTorch 1.13 (`nn.MultiheadAttention`, DETR's `PositionEmbeddingSine`), fixtures made by
/// `tests/fixtures/detr/make_fixtures.py`.
#[test]
fn attention_and_positional_encoding_match_pytorch() {
    use densa::exporter::{DType, Dim, GraphBuilder};
    use densa::models::detr::transformer::{sine_position_encoding, MultiHeadAttention};
    let fx = read_npz(&common::fixture("detr/mha.npz")).unwrap();
    let get = |name: &str| {
        fx.iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("fixture has no `{name}`"))
    };
    let mut b = GraphBuilder::new("mha", 0);
    let dims = |t: &Tensor| t.shape().iter().map(|&d| Dim::from(d)).collect::<Vec<_>>();
    let q = b.input("q", DType::F32, dims(&get("q"))).unwrap();
    let k = b.input("k", DType::F32, dims(&get("k"))).unwrap();
    let v = b.input("v", DType::F32, dims(&get("v"))).unwrap();
    let mask = b.input("mask", DType::F32, dims(&get("mask"))).unwrap();
    let attn = MultiHeadAttention::new(&mut b, "attn", 8, 2).unwrap();
    for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        for part in ["weight", "bias"] {
            b.set_initializer(
                &format!("attn.{proj}.{part}"),
                get(&format!("{proj}_{part}")),
            )
            .unwrap();
        }
    }
    let y = attn.forward(&mut b, &q, &k, &v, Some(&mask)).unwrap();
    b.output(&y, "y").unwrap();
    let model = b.finish();
    let feed: Vec<(String, Tensor)> = ["q", "k", "v", "mask"]
        .iter()
        .map(|n| (n.to_string(), get(n)))
        .collect();
    let mut backends = vec![tract_backend()];
    backends.extend(ort_backend());
    for backend in backends {
        let out = backend
            .load_model(&model, "mha")
            .unwrap()
            .run(feed.clone())
            .unwrap();
        let d = max_rel_diff(&out[0].1.to_f32(), &get("y").to_f32());
        assert!(d < 1e-5, "{}: differs from PyTorch by {d}", backend.name());
    }
    let pos = read_npz(&common::fixture("detr/pos.npz")).unwrap();
    let ours = sine_position_encoding(2, 3, 8, 10000.0).to_f32();
    let d = max_rel_diff(&ours, &pos[0].1.to_f32());
    assert!(d < 1e-6, "positional encoding differs from DETR's by {d}");
}
