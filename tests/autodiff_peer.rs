//! densa's gradients vs an independent ONNX differentiator: `onnx-ad` (PyPI, source
//! transformation in Python) on a small convolutional network, both run on ONNX Runtime.
//! Skipped with a note when `onnx-ad` is not installed (`pip install onnx-ad==0.3.0`).

use crate::gradcheck;

use std::process::Command;

use densa::exporter::autodiff::{with_gradients, GradRequest};
use densa::exporter::DType;
use densa::runtime::npy;
use gradcheck::*;

#[test]
fn conv_net_matches_onnx_ad() {
    let python = std::env::var("DENSA_PYTHON").unwrap_or_else(|_| "python3".into());
    let available = Command::new(&python)
        .args(["-c", "import onnx_ad, onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available || !backends().reference_is_ort {
        eprintln!("note: skipping the onnx-ad comparison: `{python}` lacks onnx_ad (pip install onnx-ad==0.3.0) or ONNX Runtime is unavailable");
        return;
    }
    // x -> Conv(stride 2, pad 1) + bias -> Relu -> Conv(pad 1) -> MaxPool -> GlobalAveragePool
    // -> Flatten -> Gemm -> LogSoftmax -> pick class 1 -> scalar.
    let mut rng = Gen::new(42);
    let mut net = Net::new(DType::F32);
    let x = net.rand_input(&mut rng, "x", &[2, 3, 8, 8], -1.0, 1.0);
    let w1 = net.rand_input(&mut rng, "w1", &[4, 3, 3, 3], -0.5, 0.5);
    let b1 = net.rand_input(&mut rng, "b1", &[4], -0.1, 0.1);
    let w2 = net.rand_input(&mut rng, "w2", &[5, 4, 3, 3], -0.5, 0.5);
    let fc = net.rand_input(&mut rng, "fc", &[3, 5], -0.5, 0.5);
    let c1 = net.node(
        "Conv",
        &[&x, &w1, &b1],
        vec![
            ints("kernel_shape", &[3, 3]),
            ints("strides", &[2, 2]),
            ints("pads", &[1, 1, 1, 1]),
        ],
    );
    let r1 = net.node("Relu", &[&c1], vec![]);
    let c2 = net.node(
        "Conv",
        &[&r1, &w2],
        vec![ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1])],
    );
    let mp = net.node(
        "MaxPool",
        &[&c2],
        vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
    );
    let gp = net.node("GlobalAveragePool", &[&mp], vec![]);
    let fl = net.node("Flatten", &[&gp], vec![int("axis", 1)]);
    let logits = net.node("Gemm", &[&fl, &fc], vec![int("transB", 1)]);
    let logp = net.node("LogSoftmax", &[&logits], vec![int("axis", 1)]);
    let idx = net.ints(&[1]);
    let picked = net.node("Gather", &[&logp, &idx], vec![int("axis", 1)]);
    let loss = net.node("ReduceSum", &[&picked], vec![int("keepdims", 0)]);
    let model = net.model(&loss);

    let wrt = ["x", "w1", "b1", "w2", "fc"];
    let ours = with_gradients(&model, &GradRequest::new(&loss, &wrt)).unwrap();
    let b = backends();
    let grads = b
        .reference
        .load_model(&ours, "densa")
        .unwrap()
        .run(net.feeds.clone())
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    densa::exporter::io::save(&model, &dir.path().join("m.onnx")).unwrap();
    npy::write_npz(&dir.path().join("feeds.npz"), &net.feeds).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/onnx_ad_reverse.py");
    let o = Command::new(&python)
        .arg(script)
        .arg(dir.path().join("m.onnx"))
        .arg(dir.path().join("feeds.npz"))
        .arg(dir.path().join("out.npz"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "onnx-ad failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let peer = npy::read_npz(&dir.path().join("out.npz")).unwrap();
    for (k, w) in wrt.iter().enumerate() {
        let (name, g) = &grads[k + 1];
        assert_eq!(name, &format!("grad.{w}"));
        let (_, p) = peer.iter().find(|(n, _)| n == w).expect("onnx-ad adjoint");
        let (a, p) = (to_f64(g), to_f64(p));
        let scale = p.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        let d = a
            .iter()
            .zip(&p)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        assert!(d < 1e-5, "{w}: densa vs onnx-ad relative {d:.2e}");
        eprintln!("{w}: densa vs onnx-ad relative difference {d:.1e}");
    }
}
