//! Bad input gets a clear error naming the file, a non-zero exit and no panic.

use crate::common;

use std::path::Path;

use common::*;
use densa::exporter::weights::{save_safetensors, StateDict};
use densa::exporter::{GraphBuilder, ParamKind, Tensor};
use densa::models::Arch;
use densa::runtime::npy;
use ndarray::ArrayD;

fn export(arch: &str, out: &Path) {
    let o = run_densa(&[
        "export",
        "backbone",
        "--arch",
        arch,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn truncated_model_is_refused_by_run_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("edge.onnx");
    export("resnet-edge", &model);
    let bytes = std::fs::read(&model).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let x = dir.path().join("x.npy");
    npy::write_npy(&x, &Tensor::F32(ArrayD::zeros(vec![1, 3, 32, 32]))).unwrap();
    for backend in ["tract", "auto"] {
        let err = assert_clean_failure(&run_densa(&[
            "run",
            truncated.to_str().unwrap(),
            "--input",
            x.to_str().unwrap(),
            "--backend",
            backend,
            "--out",
            dir.path().join("o.npz").to_str().unwrap(),
        ]));
        assert!(
            err.contains("truncated.onnx") && err.contains("not a valid ONNX model"),
            "{err}"
        );
    }
    let err = assert_clean_failure(&run_densa(&["inspect", truncated.to_str().unwrap()]));
    assert!(
        err.contains("truncated.onnx") && err.contains("not a valid ONNX model"),
        "{err}"
    );
    assert!(
        !dir.path().join("o.npz").exists(),
        "no output is written for a failed run"
    );
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.onnx");
    let err = assert_clean_failure(&run_densa(&["inspect", missing.to_str().unwrap()]));
    assert!(err.contains("nope.onnx"), "{err}");
    let err = assert_clean_failure(&run_densa(&[
        "export",
        "backbone",
        "--arch",
        "resnet18",
        "--weights",
        dir.path().join("w.pth").to_str().unwrap(),
        "--out",
        dir.path().join("m.onnx").to_str().unwrap(),
    ]));
    assert!(err.contains("w.pth"), "{err}");
    assert!(!dir.path().join("m.onnx").exists());
    let model = dir.path().join("edge.onnx");
    export("resnet-edge", &model);
    let err = assert_clean_failure(&run_densa(&[
        "run",
        model.to_str().unwrap(),
        "--input",
        dir.path().join("x.npy").to_str().unwrap(),
        "--out",
        dir.path().join("o.npz").to_str().unwrap(),
        "--backend",
        "tract",
    ]));
    assert!(err.contains("x.npy"), "{err}");
}

#[test]
fn wrong_input_shape_and_name_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("edge.onnx");
    export("resnet-edge", &model);
    let x = dir.path().join("x.npy");
    npy::write_npy(&x, &Tensor::F32(ArrayD::zeros(vec![1, 4, 32, 32]))).unwrap();
    let out = dir.path().join("o.npz");
    let err = assert_clean_failure(&run_densa(&[
        "run",
        model.to_str().unwrap(),
        "--input",
        x.to_str().unwrap(),
        "--backend",
        "tract",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(
        err.contains("`images`") && err.contains("[1, 4, 32, 32]") && err.contains("[N,3,H,W]"),
        "{err}"
    );
    let spec = format!("pixels={}", x.display());
    let err = assert_clean_failure(&run_densa(&[
        "run",
        model.to_str().unwrap(),
        "--input",
        &spec,
        "--backend",
        "tract",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("`pixels`") && err.contains("images"), "{err}");
    let ints = dir.path().join("ints.npy");
    npy::write_npy(&ints, &Tensor::I64(ArrayD::zeros(vec![1, 3, 32, 32]))).unwrap();
    let err = assert_clean_failure(&run_densa(&[
        "run",
        model.to_str().unwrap(),
        "--input",
        ints.to_str().unwrap(),
        "--backend",
        "tract",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("int64") && err.contains("float32"), "{err}");
}

#[test]
fn resnet18_weights_into_resnet50_list_the_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = GraphBuilder::new("names", 0);
    Arch::ResNet18.config().init(&mut b).unwrap();
    let mut sd = StateDict::new();
    for p in b.params().iter().filter(|p| p.kind != ParamKind::Constant) {
        sd.insert(p.name.clone(), Tensor::F32(ArrayD::zeros(p.shape.clone())));
    }
    let weights = dir.path().join("resnet18.safetensors");
    save_safetensors(&sd, &weights).unwrap();
    let out = dir.path().join("r50.onnx");
    let err = assert_clean_failure(&run_densa(&[
        "export",
        "backbone",
        "--arch",
        "resnet50",
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(
        err.contains("resnet18.safetensors") || err.contains("resnet50"),
        "{err}"
    );
    assert!(
        err.contains("missing") && err.contains("layer1.0.conv3.weight"),
        "{err}"
    );
    assert!(
        err.contains("shape") && err.contains("layer1.0.conv1.weight"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn malicious_checkpoint_is_refused_without_running_it() {
    let dir = tempfile::tempdir().unwrap();
    let marker = Path::new("/tmp/densa-weights-fixture-pwned");
    let _ = std::fs::remove_file(marker);
    let evil =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("exporter/tests/fixtures/weights/malicious.pth");
    let out = dir.path().join("m.onnx");
    let err = assert_clean_failure(&run_densa(&[
        "export",
        "backbone",
        "--arch",
        "resnet18",
        "--weights",
        evil.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(
        err.contains("malicious.pth") && err.contains("os.system"),
        "{err}"
    );
    assert!(!marker.exists(), "the pickle's command ran");
    assert!(!out.exists());
}

#[test]
fn unknown_architecture_lists_the_choices() {
    let o = run_densa(&["export", "backbone", "--arch", "vgg16", "--out", "x.onnx"]);
    let err = stderr(&o);
    // A usage error: clap's status 2.
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("vgg16") && err.contains("resnet18, resnet34, resnet50, resnet-edge"),
        "{err}"
    );
}
