//! Exported backbones: valid for `onnx.checker` (full check), and densa-tract, densa-ort and
//! the `onnxruntime` Python package agree on every output (relative difference <= 1e-4).

use crate::common;

use common::*;
use densa::runtime::{npy, Tensor};
use ndarray::ArrayD;

fn check_arch(arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(format!("{arch}.onnx"));
    let o = run_densa(&[
        "export",
        "backbone",
        "--arch",
        arch,
        "--seed",
        "7",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "export failed: {}", stderr(&o));

    // Batch 2 and a non-square size that is not a multiple of 32.
    let shape = [2usize, 3, 48, 72];
    let n: usize = shape.iter().product();
    let x = ArrayD::from_shape_vec(
        shape.to_vec(),
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect(),
    )
    .unwrap();
    let input = dir.path().join("x.npy");
    npy::write_npy(&input, &Tensor::F32(x.clone())).unwrap();

    let tract = tract_backend()
        .load_file(&model)
        .unwrap()
        .run(vec![("images".into(), Tensor::F32(x.clone()))])
        .unwrap();
    let names: Vec<&str> = tract.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["c2", "c3", "c4", "c5"]);
    let strides = [4usize, 8, 16, 32];
    for ((name, t), s) in tract.iter().zip(strides) {
        assert_eq!(
            &t.shape()[2..],
            &[shape[2].div_ceil(s), shape[3].div_ceil(s)],
            "{arch} {name}"
        );
    }

    if let Some(ort) = ort_backend() {
        let out = ort
            .load_file(&model)
            .unwrap()
            .run(vec![("images".into(), Tensor::F32(x.clone()))])
            .unwrap();
        for ((name, a), (_, b)) in tract.iter().zip(&out) {
            let d = max_rel_diff(&a.to_f32(), &b.to_f32());
            assert!(
                d <= 1e-4,
                "{arch} {name}: tract vs ort relative difference {d}"
            );
        }
    }
    if let Some(python) = python_peers() {
        let reference = dir.path().join("ref.npz");
        python_reference(&python, &model, &[("images", &input)], &reference);
        let reference = npy::read_npz(&reference).unwrap();
        assert_eq!(reference.len(), 4);
        for ((name, ours), (rname, theirs)) in tract.iter().zip(&reference) {
            assert_eq!(name, rname);
            let d = max_rel_diff(&ours.to_f32(), &theirs.to_f32());
            assert!(
                d <= 1e-4,
                "{arch} {name}: tract vs onnxruntime (Python) relative difference {d}"
            );
        }
        // And densa's ort backend through the CLI, against the same reference.
        if ort_backend().is_some() {
            let out = dir.path().join("ort.npz");
            let o = run_densa(&[
                "run",
                model.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--backend",
                "ort",
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "densa run failed: {}", stderr(&o));
            for ((name, ours), (_, theirs)) in npy::read_npz(&out).unwrap().iter().zip(&reference) {
                let d = max_rel_diff(&ours.to_f32(), &theirs.to_f32());
                assert!(
                    d <= 1e-4,
                    "{arch} {name}: densa-ort vs onnxruntime (Python) relative difference {d}"
                );
            }
        }
    }
}

#[test]
fn resnet18_backbone_agrees_everywhere() {
    check_arch("resnet18");
}

#[test]
fn resnet34_backbone_agrees_everywhere() {
    check_arch("resnet34");
}

#[test]
fn resnet50_backbone_agrees_everywhere() {
    check_arch("resnet50");
}

#[test]
fn edge_backbone_agrees_everywhere() {
    check_arch("resnet-edge");
}
