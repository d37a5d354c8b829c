//! Training-mode normalisation from primitive ops against PyTorch 1.13, on tract and ONNX
//! Runtime: `nn.BatchNorm2d` / `nn.BatchNorm1d` in train mode (output and running statistics,
//! two batches carried), `nn.GroupNorm`, `nn.LayerNorm`. References:
//! tests/fixtures/optim/norm.npz, made by tests/fixtures/optim/make_fixtures.py.

use crate::common;

use std::collections::HashMap;

use common::*;
use densa::exporter::train::norm::{
    batch_norm_train, group_norm, layer_norm, BatchNormTrainConfig,
};
use densa::exporter::train::{carry_state, Fragment};
use densa::exporter::{DType, Dim, GraphBuilder, Tensor};
use densa::models::nn::{BatchNorm2dConfig, NormMode};
use densa::runtime::npy;

/// Relative tolerance against PyTorch (whose CPU kernels accumulate in double).
const TOLERANCE: f32 = 1e-5;

fn load() -> HashMap<String, Tensor> {
    npy::read_npz(&fixture("optim/norm.npz"))
        .unwrap()
        .into_iter()
        .collect()
}

fn get<'a>(fx: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    fx.get(key)
        .unwrap_or_else(|| panic!("fixture has no `{key}`"))
}

fn dims(t: &Tensor) -> Vec<Dim> {
    t.shape().iter().map(|&d| d.into()).collect()
}

fn backends() -> Vec<Box<dyn densa::runtime::Backend>> {
    let mut backends = vec![tract_backend()];
    backends.extend(ort_backend());
    backends
}

fn check(what: &str, ours: &Tensor, theirs: &Tensor) {
    let d = max_rel_diff(&ours.to_f32(), &theirs.to_f32());
    eprintln!("{what}: relative difference {d:.2e}");
    assert!(d <= TOLERANCE, "{what}: relative difference to PyTorch {d}");
}

/// Runs a batch-norm graph for the fixture's two batches, carrying the running statistics.
fn run_batch_norm(
    case: &str,
    model: &densa::exporter::onnx::ModelProto,
    fx: &HashMap<String, Tensor>,
    params: &[(String, Tensor)],
    stats: Vec<(String, Tensor)>,
) {
    for backend in backends() {
        let mut session = backend.load_model(model, case).unwrap();
        let mut state = stats.clone();
        for k in 0..2 {
            let mut feeds = params.to_vec();
            feeds.extend(state.clone());
            feeds.push(("x".into(), get(fx, &format!("{case}.x.{k}")).clone()));
            let out = session.run(feeds).unwrap();
            assert_eq!(out.len(), 3);
            let on = |n: &str| format!("{case} batch {k} {n} on {}", backend.name());
            check(&on("y"), &out[0].1, get(fx, &format!("{case}.y.{k}")));
            for (name, ours) in &out[1..] {
                let stat = name.rsplit('.').nth(1).unwrap();
                check(&on(stat), ours, get(fx, &format!("{case}.{stat}.{k}")));
            }
            state = carry_state(out);
        }
    }
}

/// Batch norm over `[N, C]`, `[N, C, L]` and `[N, C, H, W]` with the batch and spatial sizes
/// symbolic (the element count is computed in the graph) and every parameter a graph input,
/// as in a training step.
#[test]
fn batch_norm_train_matches_torch() {
    let fx = load();
    for case in ["bn2d", "bn1d_ncl", "bn1d_nc"] {
        let x0 = get(&fx, &format!("{case}.x.0"));
        let rank = x0.shape().len();
        let channels = x0.shape()[1];
        let mut shape = vec![Dim::from("N"), channels.into()];
        shape.extend((2..rank).map(|i| Dim::from(format!("S{i}").as_str())));
        let mut b = GraphBuilder::new(case, 0);
        let x = b.input("x", DType::F32, shape).unwrap();
        let names = ["weight", "bias", "running_mean", "running_var"];
        let inputs: Vec<_> = names
            .iter()
            .map(|n| {
                let t = get(&fx, &format!("{case}.{n}"));
                b.input(&format!("bn.{n}"), DType::F32, dims(t)).unwrap()
            })
            .collect();
        let config = BatchNormTrainConfig {
            momentum: match get(&fx, &format!("{case}.momentum")) {
                Tensor::F64(a) => a.iter().copied().next().unwrap() as f32,
                other => panic!("momentum is {}", other.dtype()),
            },
            ..BatchNormTrainConfig::default()
        };
        let out = batch_norm_train(
            &mut b,
            &x,
            Some(&inputs[0]),
            Some(&inputs[1]),
            &inputs[2],
            &inputs[3],
            &config,
        )
        .unwrap();
        b.output(&out.y, "y").unwrap();
        out.state.declare_outputs(&mut b).unwrap();
        let model = b.finish();
        densa::exporter::validate::validate(&model).unwrap();
        let value = |n: &str| (format!("bn.{n}"), get(&fx, &format!("{case}.{n}")).clone());
        let params = [value("weight"), value("bias")];
        let stats = vec![value("running_mean"), value("running_var")];
        run_batch_norm(case, &model, &fx, &params, stats);
    }
}

/// The models crate's `BatchNorm2d` in training mode: parameters as initializers with
/// PyTorch's names, fixed shapes (the element count is a constant), running statistics
/// recorded in the `NormMode` and output as `bn1.running_mean.next`.
#[test]
fn models_batch_norm_in_train_mode_matches_torch() {
    let fx = load();
    let case = "bn2d";
    let x0 = get(&fx, &format!("{case}.x.0"));
    let mut b = GraphBuilder::new("bn", 0);
    let x = b.input("x", DType::F32, dims(x0)).unwrap();
    let bn = BatchNorm2dConfig::new(x0.shape()[1])
        .init(&mut b, "bn1")
        .unwrap();
    for n in ["weight", "bias", "running_mean", "running_var"] {
        b.set_initializer(
            &format!("bn1.{n}"),
            get(&fx, &format!("{case}.{n}")).clone(),
        )
        .unwrap();
    }
    let mut mode = NormMode::train();
    let y = bn.forward_mode(&mut b, &x, &mut mode).unwrap();
    b.output(&y, "y").unwrap();
    let state: Fragment = mode.into_state();
    let names: Vec<&str> = state.updates.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["bn1.running_mean", "bn1.running_var"]);
    state.declare_outputs(&mut b).unwrap();
    let model = b.finish();
    // The running statistics are initializers here, so one batch (PyTorch's first step).
    for backend in backends() {
        let out = backend
            .load_model(&model, "bn")
            .unwrap()
            .run(vec![("x".into(), x0.clone())])
            .unwrap();
        let on = |n: &str| format!("models bn2d {n} on {}", backend.name());
        check(&on("y"), &out[0].1, get(&fx, &format!("{case}.y.0")));
        check(
            &on("running_mean"),
            &out[1].1,
            get(&fx, &format!("{case}.running_mean.0")),
        );
        check(
            &on("running_var"),
            &out[2].1,
            get(&fx, &format!("{case}.running_var.0")),
        );
    }
}

#[test]
fn group_norm_matches_torch() {
    let fx = load();
    let x0 = get(&fx, "gn.x");
    for (case, affine) in [("gn", true), ("gn_plain", false)] {
        let mut b = GraphBuilder::new(case, 0);
        // Symbolic batch and spatial dims: the grouping reshape must not need them.
        let shape = vec![
            Dim::from("N"),
            x0.shape()[1].into(),
            Dim::from("H"),
            Dim::from("W"),
        ];
        let x = b.input("x", DType::F32, shape).unwrap();
        let mut feeds = vec![("x".to_string(), x0.clone())];
        let (weight, bias) = if affine {
            let w = get(&fx, &format!("{case}.weight"));
            let bias = get(&fx, &format!("{case}.bias"));
            feeds.push(("weight".into(), w.clone()));
            feeds.push(("bias".into(), bias.clone()));
            (
                Some(b.input("weight", DType::F32, dims(w)).unwrap()),
                Some(b.input("bias", DType::F32, dims(bias)).unwrap()),
            )
        } else {
            (None, None)
        };
        let y = group_norm(&mut b, &x, 3, weight.as_ref(), bias.as_ref(), 1e-5).unwrap();
        b.output(&y, "y").unwrap();
        let model = b.finish();
        for backend in backends() {
            let out = backend
                .load_model(&model, case)
                .unwrap()
                .run(feeds.clone())
                .unwrap();
            let what = format!("{case} on {}", backend.name());
            check(&what, &out[0].1, get(&fx, &format!("{case}.y")));
        }
    }
}

#[test]
fn layer_norm_matches_torch() {
    let fx = load();
    let x0 = get(&fx, "ln.x");
    for (case, normalized) in [("ln2", vec![5usize, 6]), ("ln1", vec![6])] {
        let mut b = GraphBuilder::new(case, 0);
        let shape = vec![Dim::from("N"), 5.into(), 6.into()];
        let x = b.input("x", DType::F32, shape).unwrap();
        let w = get(&fx, &format!("{case}.weight"));
        let bias = get(&fx, &format!("{case}.bias"));
        let wv = b.input("weight", DType::F32, dims(w)).unwrap();
        let bv = b.input("bias", DType::F32, dims(bias)).unwrap();
        let y = layer_norm(&mut b, &x, &normalized, Some(&wv), Some(&bv), 1e-5).unwrap();
        b.output(&y, "y").unwrap();
        let model = b.finish();
        let feeds = vec![
            ("x".to_string(), x0.clone()),
            ("weight".to_string(), w.clone()),
            ("bias".to_string(), bias.clone()),
        ];
        for backend in backends() {
            let out = backend
                .load_model(&model, case)
                .unwrap()
                .run(feeds.clone())
                .unwrap();
            let what = format!("{case} on {}", backend.name());
            check(&what, &out[0].1, get(&fx, &format!("{case}.y")));
        }
    }
}
