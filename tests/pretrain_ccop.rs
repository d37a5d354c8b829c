//! `densa pretrain --method ccop` on a tiny `densa synth` output: the proposals are prepared,
//! the curriculum runs, the loss goes down, and the backbone it writes initialises
//! `densa finetune --task detect --init OUT`.

use crate::common;

use std::path::Path;

use densa::exporter::weights::load_safetensors;

fn ok(args: &[&str]) -> String {
    let o = common::run_densa(args);
    assert!(
        o.status.success(),
        "densa {}: {}",
        args.join(" "),
        common::stderr(&o)
    );
    common::stderr(&o)
}

fn log(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn ccop_pretrains_on_synth_and_initialises_a_detector() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |rel: &str| tmp.path().join(rel).display().to_string();
    ok(&[
        "synth",
        "--out",
        &p("data"),
        "--images",
        "16",
        "--size",
        "64x64",
        "--seed",
        "3",
        "--max-objects",
        "2",
    ]);
    let info = densa::models::pretext::method_info("ccop").unwrap();
    let mut args: Vec<String> = [
        "pretrain",
        "--method",
        "ccop",
        "--data",
        &p("data"),
        "--steps",
        "40",
        "--batch",
        "4",
        "--image-size",
        "32",
        "--backend",
        "tract",
        "--set",
        "reference_batch=4",
        "--out",
        &p("run"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (k, v) in info.tiny {
        args.push("--set".into());
        args.push(format!("{k}={v}"));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs);
    let entries = log(&tmp.path().join("run"));
    assert_eq!(entries.len(), 40);
    let series = |get: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Vec<f64> {
        entries
            .iter()
            .map(|e| get(e).unwrap_or_else(|| panic!("{e}")))
            .collect()
    };
    let loss = series(&|e| e["loss"].as_f64());
    let roi = series(&|e| e["metrics"]["loss_roi"].as_f64());
    assert!(loss.iter().all(|x| x.is_finite()), "{loss:?}");
    // Boxes survive in the synthetic scenes: the RoI term is live.
    assert!(roi.iter().any(|x| *x > 0.0), "{roi:?}");
    // The same criterion as tests/pretrain.rs (means of steps 5..20 and 25..40).
    let mean = |w: &[f64]| w.iter().sum::<f64>() / w.len() as f64;
    let (first, last) = (mean(&loss[5..20]), mean(&loss[25..40]));
    eprintln!("ccop tract: {first:.4} -> {last:.4}");
    assert!(last < first, "{first} -> {last}: {loss:?}");

    // The backbone initialises detection fine-tuning (frozen: it stays exactly as written).
    let stderr = ok(&[
        "finetune",
        "--task",
        "detect",
        "--data",
        &p("data/annotations.json"),
        "--init",
        &p("run"),
        "--freeze-backbone",
        "--image-size",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--out",
        &p("det"),
        "--backend",
        "tract",
    ]);
    assert!(stderr.contains("loaded"), "{stderr}");
    let bb = load_safetensors(&tmp.path().join("run/backbone.safetensors")).unwrap();
    let state = load_safetensors(&tmp.path().join("det/best/state.safetensors")).unwrap();
    let mut compared = 0;
    for name in bb.names() {
        // Parameters are frozen; batch-norm running statistics may still follow the data.
        if name.contains("running_") || name.ends_with("num_batches_tracked") {
            continue;
        }
        if let Some(got) = state.get(name) {
            assert_eq!(got.to_f32(), bb.get(name).unwrap().to_f32(), "{name}");
            compared += 1;
        }
    }
    assert!(
        compared > 20,
        "only {compared} backbone tensors in the detector"
    );
}
