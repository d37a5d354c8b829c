//! `densa pretrain --method detreg` through the CLI on a tiny `densa synth` set with a random
//! encoder backbone: it writes the detector (`detr.json`, `state.safetensors`) and the
//! backbone, caches its targets, resumes, refuses other settings, and `densa finetune --task
//! detect --detector detr --init OUT` loads the pretrained transformer.

use crate::common;

use std::path::Path;

use common::{assert_clean_failure, finetune_detr_from, ok, random_backbone, run_densa};

fn log_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn detreg_pretrains_resumes_and_initialises_detr_finetuning() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |rel: &str| tmp.path().join(rel).display().to_string();
    ok(&[
        "synth",
        "--out",
        &p("scenes"),
        "--images",
        "8",
        "--seed",
        "0",
        "--size",
        "64x64",
        "--max-objects",
        "2",
    ]);
    std::fs::create_dir_all(tmp.path().join("swav")).unwrap();
    random_backbone(&tmp.path().join("swav/backbone.safetensors"), 7);
    let encoder = format!("encoder={}", p("swav"));
    let args = |steps: &'static str, extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "pretrain",
            "--method",
            "detreg",
            "--arch",
            "resnet-edge",
            "--data",
            &p("scenes"),
            "--steps",
            steps,
            "--batch",
            "2",
            "--image-size",
            "64",
            "--checkpoint-every",
            "2",
            "--backend",
            "tract",
            "--set",
            &encoder,
            "--set",
            "crop_size=32",
            "--set",
            "proposals=5",
            "--set",
            "reference_batch=2",
            "--set",
            "lr=0.001",
            "--out",
            &p("run"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |v: &[String]| {
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        ok(&refs)
    };
    let (stdout, _) = run(&args("4", &[]));
    let out = tmp.path().join("run");
    for f in [
        "pretrain.json",
        "detr.json",
        "state.safetensors",
        "backbone.safetensors",
        "loss.png",
    ] {
        assert!(out.join(f).is_file(), "no {f}: {stdout}");
    }
    let lines = log_lines(&out);
    assert_eq!(lines.len(), 4);
    for l in &lines {
        let loss = l["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{l}");
        assert!(l["metrics"]["loss_embed.1"].as_f64().unwrap() > 0.0, "{l}");
    }
    // One cached target file per image.
    assert_eq!(cached_files(&out.join("cache/detreg")), 8);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("detr.json")).unwrap()).unwrap();
    assert_eq!(config["classes"], serde_json::json!(["object"]));
    assert_eq!(
        config["embedding"]["dim"], 128,
        "the edge encoder's C5 channels"
    );
    // The backbone is frozen: the pretraining's backbone equals the detector's initial one,
    // while the transformer moved.
    let state = densa::exporter::weights::load_safetensors(&out.join("state.safetensors")).unwrap();
    let backbone =
        densa::exporter::weights::load_safetensors(&out.join("backbone.safetensors")).unwrap();
    assert!(backbone.get("layer4.0.conv2.weight").is_some());
    assert!(state
        .get("transformer.decoder.layers.0.cross_attn.q_proj.weight")
        .is_some());
    assert!(state.get("feature_embed.layers.2.weight").is_some());

    // Same command, longer: resumes from step 4 without recomputing the targets.
    let (_, log) = run(&args("6", &[]));
    assert!(log.contains("resuming detreg"), "{log}");
    assert_eq!(log_lines(&out).len(), 6);
    // Other settings on the same --out: refused.
    let v = args("6", &["--set", "proposals=7"]);
    let refs: Vec<&str> = v.iter().map(String::as_str).collect();
    let msg = assert_clean_failure(&run_densa(&refs));
    assert!(msg.contains("other settings"), "{msg}");

    // The whole pretrained detector initialises DETR fine-tuning.
    let loaded = finetune_detr_from(&p("run"), &p("scenes/annotations.json"), &p("ft"));
    let words: Vec<&str> = loaded.split_whitespace().collect();
    let (n, total): (usize, usize) = (words[2].parse().unwrap(), words[4].parse().unwrap());
    // Everything but the class head (1 pretraining class, the scenes' classes here).
    let transformer = state
        .iter()
        .filter(|(k, _)| k.starts_with("transformer."))
        .count();
    assert!(transformer > 20, "{transformer}");
    assert!(n + 2 >= total && n > transformer, "{loaded}");
}

#[test]
fn detreg_refuses_a_missing_encoder_with_the_flag_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |rel: &str| tmp.path().join(rel).display().to_string();
    ok(&[
        "synth",
        "--out",
        &p("scenes"),
        "--images",
        "2",
        "--seed",
        "0",
        "--size",
        "32x32",
    ]);
    let base = [
        "pretrain",
        "--method",
        "detreg",
        "--data",
        &p("scenes"),
        "--steps",
        "1",
        "--batch",
        "2",
        "--out",
        &p("run"),
    ];
    let msg = assert_clean_failure(&run_densa(&base));
    assert!(msg.contains("encoder") && msg.contains("--set"), "{msg}");
    let mut missing = base.to_vec();
    let set = format!("encoder={}", p("nowhere/backbone.safetensors"));
    missing.extend(["--set", &set]);
    let msg = assert_clean_failure(&run_densa(&missing));
    assert!(msg.contains("nowhere"), "{msg}");
    // `densa methods` lists DetReg as a detector method.
    let (text, _) = ok(&["methods"]);
    assert!(
        text.contains("detreg") && text.contains("pretrains a detector"),
        "{text}"
    );
}

/// Files in the one settings-keyed folder under a method's cache folder.
fn cached_files(dir: &std::path::Path) -> usize {
    let keyed: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(keyed.len(), 1, "one settings key: {keyed:?}");
    std::fs::read_dir(&keyed[0]).unwrap().count()
}
