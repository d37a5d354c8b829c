//! With torchvision-format weights, densa's ResNets and FPN reproduce PyTorch's outputs
//! (relative difference <= 1e-4) on tract and on ONNX Runtime.
//!
//! The weights are not committed: every state-dict entry is a formula of its name and flat
//! index, evaluated here and in tests/fixtures/torchvision/make_fixtures.py (which made the
//! reference outputs with torchvision 0.14). The weights go through a safetensors file and
//! `densa export backbone --weights`, the path a user's checkpoint takes.

use crate::common;

use common::*;
use densa::exporter::weights::{save_safetensors, StateDict};
use densa::exporter::{DType, Dim, GraphBuilder, ParamKind, Tensor};
use densa::models::neck::FpnConfig;
use densa::models::Arch;
use densa::runtime::npy;
use ndarray::{ArrayD, IxDyn};

fn name_key(name: &str) -> f64 {
    (name
        .bytes()
        .enumerate()
        .map(|(j, b)| (j + 1) * b as usize)
        .sum::<usize>()
        % 997) as f64
}

/// The value of state-dict entry `name` (mirror of `formula_value` in make_fixtures.py).
fn formula_value(name: &str, shape: &[usize]) -> Tensor {
    if name.ends_with("num_batches_tracked") {
        return Tensor::I64(ArrayD::zeros(IxDyn(shape)));
    }
    let n: usize = shape.iter().product();
    let k = name_key(name);
    let fan_in: usize = shape.iter().skip(1).product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let s = (i as f64 * 0.61803 + k * 1.7 + 0.1).sin();
            let v = if name.ends_with("running_var") {
                1.0 + 0.25 * (1.0 + s)
            } else if name.ends_with("running_mean") || name.ends_with("bias") {
                0.1 * s
            } else if shape.len() == 1 {
                1.0 + 0.1 * s
            } else {
                s / (fan_in as f64).sqrt()
            };
            v as f32
        })
        .collect();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

fn formula_input(shape: &[usize]) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    ArrayD::from_shape_vec(
        IxDyn(shape),
        (0..n).map(|i| (i as f64 * 0.37).sin() as f32).collect(),
    )
    .unwrap()
}

/// A torchvision-style state dict for `arch`: the backbone's parameters and buffers plus what
/// torchvision adds (`num_batches_tracked`, the classifier `fc`).
fn torchvision_state_dict(arch: Arch) -> StateDict {
    let mut b = GraphBuilder::new("names", 0);
    let config = arch.config();
    config.init(&mut b).unwrap();
    let mut sd = StateDict::new();
    for p in b.params().iter().filter(|p| p.kind != ParamKind::Constant) {
        sd.insert(p.name.clone(), formula_value(&p.name, &p.shape));
        if let Some(bn) = p.name.strip_suffix(".running_var") {
            let key = format!("{bn}.num_batches_tracked");
            sd.insert(key.clone(), formula_value(&key, &[]));
        }
    }
    let c5 = config.out_channels()[3];
    sd.insert("fc.weight", formula_value("fc.weight", &[1000, c5]));
    sd.insert("fc.bias", formula_value("fc.bias", &[1000]));
    sd
}

fn check_resnet(arch: Arch) {
    let reference = npy::read_npz(&fixture(&format!("torchvision/{}.npz", arch.name()))).unwrap();
    let shape: Vec<usize> = match &reference[0] {
        (name, Tensor::I64(s)) if name == "input_shape" => s.iter().map(|&d| d as usize).collect(),
        other => panic!("unexpected fixture layout: {}", other.0),
    };
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("weights.safetensors");
    save_safetensors(&torchvision_state_dict(arch), &weights).unwrap();
    let model = dir.path().join("model.onnx");
    let o = run_densa(&[
        "export",
        "backbone",
        "--arch",
        arch.name(),
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "export failed: {}", stderr(&o));
    assert!(
        stderr(&o).contains("fc.weight"),
        "unused keys are reported: {}",
        stderr(&o)
    );

    let x = formula_input(&shape);
    let mut backends = vec![tract_backend()];
    backends.extend(ort_backend());
    for backend in backends {
        let out = backend
            .load_file(&model)
            .unwrap()
            .run(vec![("images".into(), Tensor::F32(x.clone()))])
            .unwrap();
        for ((name, ours), (rname, theirs)) in out.iter().zip(&reference[1..]) {
            assert_eq!(name, rname);
            let d = max_rel_diff(&ours.to_f32(), &theirs.to_f32());
            assert!(
                d <= 1e-4,
                "{arch} {name} on {}: relative difference to PyTorch {d}",
                backend.name()
            );
        }
    }
}

#[test]
fn resnet18_matches_torchvision() {
    check_resnet(Arch::ResNet18);
}

#[test]
fn resnet34_matches_torchvision() {
    check_resnet(Arch::ResNet34);
}

#[test]
fn resnet50_matches_torchvision() {
    check_resnet(Arch::ResNet50);
}

#[test]
fn fpn_matches_torchvision() {
    let reference = npy::read_npz(&fixture("torchvision/fpn.npz")).unwrap();
    let get = |k: &str| reference.iter().find(|(n, _)| n == k).unwrap().1.clone();
    let mut b = GraphBuilder::new("fpn", 0);
    let config = FpnConfig {
        extra_max_pool: true,
        ..FpnConfig::new(&[16, 32, 64, 128], 32)
    };
    let inputs: Vec<_> = (0..4)
        .map(|i| {
            let c = config.in_channels[i] as i64;
            b.input(
                &format!("x{i}"),
                DType::F32,
                vec![
                    Dim::from("N"),
                    Dim::Fixed(c),
                    Dim::from(format!("H{i}").as_str()),
                    Dim::from(format!("W{i}").as_str()),
                ],
            )
            .unwrap()
        })
        .collect();
    let fpn = config.init(&mut b).unwrap();
    let names: Vec<(String, Vec<usize>)> = b
        .params()
        .iter()
        .filter(|p| p.kind == ParamKind::Param)
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    assert_eq!(names.len(), 16);
    for (name, shape) in names {
        b.set_initializer(&name, formula_value(&name, &shape))
            .unwrap();
    }
    let refs: Vec<&_> = inputs.iter().collect();
    let outs = fpn.forward(&mut b, &refs).unwrap();
    for (i, o) in outs.iter().enumerate() {
        b.output(o, &format!("p{i}")).unwrap();
    }
    let model = b.finish();
    densa::exporter::validate::validate(&model).unwrap();
    let feeds: Vec<(String, Tensor)> = (0..4)
        .map(|i| (format!("x{i}"), get(&format!("in_x{i}"))))
        .collect();
    let mut backends = vec![tract_backend()];
    backends.extend(ort_backend());
    for backend in backends {
        let out = backend
            .load_model(&model, "fpn")
            .unwrap()
            .run(feeds.clone())
            .unwrap();
        assert_eq!(out.len(), 5);
        for (i, (_, ours)) in out.iter().enumerate() {
            let d = max_rel_diff(&ours.to_f32(), &get(&format!("out_{i}")).to_f32());
            assert!(
                d <= 1e-4,
                "fpn level {i} on {}: relative difference to PyTorch {d}",
                backend.name()
            );
        }
    }
}
