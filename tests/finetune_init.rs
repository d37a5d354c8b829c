//! `densa finetune --init`: a backbone from a weights file or a pretraining directory is
//! overlaid on the fresh detector/segmenter (heads random), through the CLI on tiny synthetic
//! scenes:
//! - detect, `--init FILE` holding a MoCo-style checkpoint (query and key encoders under
//!   `module.encoder_q.` / `module.encoder_k.`, a head): the query encoder is loaded, and with
//!   `--freeze-backbone` the backbone's parameters still equal the file's after two steps;
//! - segment, `--init DIR` with `backbone.safetensors`: after two AdamW steps of learning rate
//!   `lr` every backbone parameter is within `2 lr` of the file's value (a random backbone is
//!   orders of magnitude further away);
//! - a file of another architecture (wrong shape), a missing file and a directory without
//!   `backbone.safetensors` fail cleanly with messages naming the tensor / the file.

use crate::common;

use std::path::Path;

use common::*;
use densa::exporter::weights::{load_safetensors, save_safetensors, StateDict};
use densa::exporter::{GraphBuilder, ParamKind, Tensor};
use densa::models::Arch;
use ndarray::ArrayD;

fn ok(args: &[&str]) -> String {
    let o = run_densa(args);
    let err = stderr(&o);
    assert!(o.status.success(), "densa {args:?} failed:\n{err}");
    String::from_utf8_lossy(&o.stdout).into_owned() + &err
}

/// A resnet-edge backbone initialised from `seed`: (state by torchvision names, names of the
/// trainable parameters).
fn backbone_state(seed: u64) -> (StateDict, Vec<String>) {
    let mut b = GraphBuilder::new("bb", seed);
    Arch::Edge.config().init(&mut b).unwrap();
    let mut sd = StateDict::new();
    let mut params = Vec::new();
    for p in b.params() {
        if p.kind == ParamKind::Constant {
            continue;
        }
        if p.kind == ParamKind::Param {
            params.push(p.name.clone());
        }
        sd.insert(
            p.name.clone(),
            b.initializer_value(&p.name).unwrap().clone(),
        );
    }
    (sd, params)
}

fn prefixed(sd: &StateDict, prefix: &str) -> StateDict {
    sd.iter()
        .map(|(k, t)| (format!("{prefix}{k}"), t.clone()))
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_f32(), b.to_f32());
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn synth(dir: &Path) {
    ok(&[
        "synth",
        "--out",
        &dir.display().to_string(),
        "--images",
        "16",
        "--size",
        "64x64",
        "--seed",
        "3",
        "--max-objects",
        "2",
    ]);
}

#[test]
fn detector_init_file_loads_the_query_encoder_and_freezing_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |rel: &str| dir.join(rel).display().to_string();
    synth(&dir.join("data"));
    let (query, params) = backbone_state(7);
    let (key, _) = backbone_state(8);
    let mut file = prefixed(&query, "module.encoder_q.");
    for (k, t) in prefixed(&key, "module.encoder_k.").iter() {
        file.insert(k, t.clone());
    }
    file.insert("module.head.weight", Tensor::F32(ArrayD::zeros(vec![4, 8])));
    save_safetensors(&file, &dir.join("moco.safetensors")).unwrap();

    let log = ok(&[
        "finetune",
        "--task",
        "detect",
        "--data",
        &p("data/annotations.json"),
        "--init",
        &p("moco.safetensors"),
        "--freeze-backbone",
        "--image-size",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--out",
        &p("run"),
        "--backend",
        "tract",
    ]);
    let loaded = format!("loaded {} backbone tensors", query.len());
    assert!(log.contains(&loaded), "{loaded:?} not in:\n{log}");
    assert!(log.contains("module.encoder_q."), "{log}");

    let state = load_safetensors(&dir.join("run/best/state.safetensors")).unwrap();
    for name in &params {
        let got = state.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(
            max_abs_diff(got, query.get(name).unwrap()),
            0.0,
            "frozen `{name}` moved away from the file's value"
        );
    }
    // Heads were trained (not frozen, not from the file).
    let fresh = load_safetensors(&dir.join("run/best/state.safetensors")).unwrap();
    assert!(
        fresh.names().any(|n| n.starts_with("head")),
        "no head tensors"
    );
}

#[test]
fn segmenter_init_directory_starts_from_its_backbone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |rel: &str| dir.join(rel).display().to_string();
    synth(&dir.join("data"));
    let (bb, params) = backbone_state(11);
    std::fs::create_dir_all(dir.join("pretrain")).unwrap();
    save_safetensors(&bb, &dir.join("pretrain/backbone.safetensors")).unwrap();

    let lr = 1e-3f32;
    let log = ok(&[
        "finetune",
        "--task",
        "segment",
        "--data",
        &p("data/annotations.json"),
        "--init",
        &p("pretrain"),
        "--image-size",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--lr",
        &lr.to_string(),
        "--out",
        &p("run"),
        "--backend",
        "tract",
    ]);
    assert!(
        log.contains(&format!("loaded {} backbone tensors", bb.len())),
        "{log}"
    );
    let state = load_safetensors(&dir.join("run/last.safetensors")).unwrap();
    let (random, _) = backbone_state(0);
    let mut worst = 0f32;
    let mut random_gap = 0f32;
    for name in &params {
        let got = state.get(name).unwrap_or_else(|| panic!("{name} missing"));
        worst = worst.max(max_abs_diff(got, bb.get(name).unwrap()));
        random_gap = random_gap.max(max_abs_diff(
            random.get(name).unwrap(),
            bb.get(name).unwrap(),
        ));
    }
    // Two AdamW steps move a parameter by at most ~lr each (weight decay adds lr * wd * |p|).
    assert!(
        worst <= 2.0 * lr * 1.05,
        "a backbone parameter is {worst} away from the file after two steps"
    );
    assert!(
        random_gap > 100.0 * lr,
        "the test's two inits are too alike"
    );
}

#[test]
fn bad_init_files_fail_with_the_tensor_or_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |rel: &str| dir.join(rel).display().to_string();
    synth(&dir.join("data"));
    let (mut bb, _) = backbone_state(1);
    let shape = bb.get("conv1.weight").unwrap().shape().to_vec();
    let wrong = vec![shape[0] * 2, shape[1], shape[2], shape[3]];
    bb.insert("conv1.weight", Tensor::F32(ArrayD::zeros(wrong.clone())));
    save_safetensors(&bb, &dir.join("wide.safetensors")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();

    let finetune = |task: &str, init: &str| {
        run_densa(&[
            "finetune",
            "--task",
            task,
            "--data",
            &p("data/annotations.json"),
            "--init",
            init,
            "--image-size",
            "64",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            &p(&format!("run-{task}")),
            "--backend",
            "tract",
        ])
    };
    for task in ["detect", "segment"] {
        let err = assert_clean_failure(&finetune(task, &p("wide.safetensors")));
        assert!(err.contains("conv1.weight"), "{err}");
        assert!(err.contains(&format!("{shape:?}")), "{err}");
        assert!(err.contains(&format!("{wrong:?}")), "{err}");
        assert!(err.contains("wide.safetensors"), "{err}");

        let err = assert_clean_failure(&finetune(task, &p("nope.pth")));
        assert!(
            err.contains("nope.pth") && err.contains("no such file"),
            "{err}"
        );

        let err = assert_clean_failure(&finetune(task, &p("empty")));
        assert!(err.contains("backbone.safetensors"), "{err}");
    }
}
