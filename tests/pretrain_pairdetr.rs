//! `densa pretrain --method pairdetr` through the CLI on a tiny `densa synth` set: it trains
//! Pair DETR on cached selective-search boxes from a given (frozen) backbone, writes the DETR
//! checkpoint (`detr.json`, `state.safetensors`, DETR's names), and `densa finetune --task
//! detect --detector detr --init OUT` loads it.

use crate::common;

use std::path::Path;

use common::{assert_clean_failure, finetune_detr_from, ok, random_backbone, run_densa};

#[test]
fn pairdetr_pretrains_from_a_frozen_backbone_and_initialises_detr_finetuning() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |rel: &str| tmp.path().join(rel).display().to_string();
    ok(&[
        "synth",
        "--out",
        &p("scenes"),
        "--images",
        "6",
        "--seed",
        "0",
        "--size",
        "64x64",
        "--max-objects",
        "2",
    ]);
    std::fs::create_dir_all(tmp.path().join("swav")).unwrap();
    let given = tmp.path().join("swav/backbone.safetensors");
    random_backbone(&given, 11);
    let backbone = format!("backbone={}", p("swav"));
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "pretrain",
            "--method",
            "pairdetr",
            "--arch",
            "resnet-edge",
            "--data",
            &p("scenes"),
            "--steps",
            "3",
            "--batch",
            "2",
            "--image-size",
            "64",
            "--backend",
            "tract",
            "--set",
            &backbone,
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
    let v = args(&[]);
    let refs: Vec<&str> = v.iter().map(String::as_str).collect();
    let (stdout, _) = ok(&refs);
    let out = tmp.path().join("run");
    for f in [
        "pretrain.json",
        "detr.json",
        "state.safetensors",
        "backbone.safetensors",
    ] {
        assert!(out.join(f).is_file(), "no {f}: {stdout}");
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for l in &lines {
        assert!(l["loss"].as_f64().unwrap().is_finite(), "{l}");
        assert!(l["metrics"]["loss_pair.1"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["metrics"]["loss_giou.0"].as_f64().unwrap() > 0.0, "{l}");
    }
    let keyed: Vec<_> = std::fs::read_dir(out.join("cache/pairdetr"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(keyed.len(), 1, "one settings key: {keyed:?}");
    assert_eq!(std::fs::read_dir(&keyed[0]).unwrap().count(), 6);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("detr.json")).unwrap()).unwrap();
    assert_eq!(config["classes"], serde_json::json!(["object"]));
    // The detector file holds DETR's names only; the backbone is the given one, unchanged
    // (loaded, then frozen; batch norm statistics aside).
    let load = |f: &Path| densa::exporter::weights::load_safetensors(f).unwrap();
    let state = load(&out.join("state.safetensors"));
    assert!(state.iter().all(|(k, _)| !k.starts_with("top_left.")));
    assert!(state
        .get("transformer.decoder.layers.1.cross_attn.q_proj.weight")
        .is_some());
    let (given, written) = (load(&given), load(&out.join("backbone.safetensors")));
    // (Batch norm's running statistics move: batch statistics while training.)
    let mut same = 0;
    for (name, t) in given
        .iter()
        .filter(|(n, _)| !n.contains("running_") && !n.contains("num_batches"))
    {
        let w = written
            .get(name)
            .unwrap_or_else(|| panic!("backbone.safetensors lacks `{name}`"));
        assert_eq!(t.to_f32(), w.to_f32(), "`{name}`");
        same += 1;
    }
    assert!(same > 20 && given.get("conv1.weight").is_some(), "{same}");

    // A missing backbone file is named.
    let v = args(&["--set", "backbone=/nowhere/backbone.safetensors"]);
    let refs: Vec<&str> = v.iter().map(String::as_str).collect();
    let msg = assert_clean_failure(&run_densa(&refs));
    assert!(msg.contains("/nowhere/backbone.safetensors"), "{msg}");

    // The pretrained detector initialises DETR fine-tuning: everything but the class head.
    let loaded = finetune_detr_from(&p("run"), &p("scenes/annotations.json"), &p("ft"));
    let words: Vec<&str> = loaded.split_whitespace().collect();
    let (n, total): (usize, usize) = (words[2].parse().unwrap(), words[4].parse().unwrap());
    let transformer = state
        .iter()
        .filter(|(k, _)| k.starts_with("transformer."))
        .count();
    assert!(transformer > 20, "{transformer}");
    assert!(n + 2 >= total && n > transformer, "{loaded}");
}
