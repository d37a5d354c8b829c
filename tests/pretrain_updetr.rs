//! `densa pretrain --method updetr` through the CLI on a tiny `densa synth` set with a random
//! backbone: it writes the detector (`detr.json` with the query-patch options, `state.safetensors`)
//! and the unchanged frozen backbone, and `densa finetune --task detect --detector detr --init
//! OUT` loads the pretrained transformer into a plain DETR.

use crate::common;

use common::{finetune_detr_from, ok, random_backbone};

#[test]
fn updetr_pretrains_with_a_frozen_backbone_and_initialises_detr_finetuning() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |rel: &str| tmp.path().join(rel).display().to_string();
    ok(&[
        "synth",
        "--out",
        &p("scenes"),
        "--images",
        "4",
        "--seed",
        "0",
        "--size",
        "64x64",
        "--max-objects",
        "2",
    ]);
    std::fs::create_dir_all(tmp.path().join("swav")).unwrap();
    let init = random_backbone(&tmp.path().join("swav/backbone.safetensors"), 11);
    let backbone = format!("backbone={}", p("swav"));
    let (stdout, _) = ok(&[
        "pretrain",
        "--method",
        "updetr",
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
        "patch_size=32",
        "--set",
        "reference_batch=2",
        "--set",
        "lr=0.001",
        "--out",
        &p("run"),
    ]);
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
        assert!(l["metrics"]["loss_embed.1"].as_f64().unwrap() > 0.0, "{l}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("detr.json")).unwrap()).unwrap();
    assert_eq!(config["classes"], serde_json::json!(["object"]));
    assert_eq!(config["query_patches"], 3);
    assert_eq!(config["self_attn_mask"], true);
    assert_eq!(
        config["embedding"]["dim"], 128,
        "the edge backbone's C5 channels"
    );
    // The frozen backbone is the given one, unchanged (parameters and running statistics).
    let state = densa::exporter::weights::load_safetensors(&out.join("state.safetensors")).unwrap();
    for (name, t) in init.iter() {
        assert_eq!(
            state.get(name).unwrap().to_f32(),
            t.to_f32(),
            "`{name}` changed"
        );
    }
    assert!(state.get("patch2query.weight").is_some());

    // A plain DETR (no query patches, no mask) fine-tunes from it.
    let loaded = finetune_detr_from(&p("run"), &p("scenes/annotations.json"), &p("ft"));
    let n: usize = loaded.split_whitespace().nth(2).unwrap().parse().unwrap();
    let transformer = state
        .iter()
        .filter(|(k, _)| k.starts_with("transformer."))
        .count();
    assert!(transformer > 10 && n > transformer, "{loaded}");
}
