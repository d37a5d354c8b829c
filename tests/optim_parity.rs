//! Optimizer, clipping and EMA fragments against PyTorch 1.13, on tract and ONNX Runtime.
//!
//! Each optimizer case of tests/fixtures/optim/ (made by make_fixtures.py with
//! `torch.optim.SGD` / `torch.optim.AdamW`, and a LARS reference written after the paper) holds
//! parameters, three steps of gradients and learning rates, and every parameter and state
//! tensor after each step. The test builds the update graph once, runs the three steps on each
//! backend carrying the state from one step's outputs to the next step's inputs (as the trainer
//! does) and compares everything after every step.

use crate::common;

use std::collections::HashMap;

use common::*;
use densa::exporter::train::clip::{clip_grad_norm, ClipConfig, NormType};
use densa::exporter::train::ema::{ema_update, EmaConfig};
use densa::exporter::train::optim::{
    AdamWConfig, LarsConfig, Optimizer, ParamGrad, SgdConfig, TrustRatio,
};
use densa::exporter::train::schedule::{Decay, Schedule, Warmup};
use densa::exporter::train::{carry_state, next_name, Fragment, InputRole};
use densa::exporter::{DType, Dim, GraphBuilder, Tensor};
use densa::runtime::npy;
use ndarray::ArrayD;

/// Relative tolerance against PyTorch: float32 rounding of a few operations.
const TOLERANCE: f32 = 1e-5;

struct Fixture {
    order: Vec<String>,
    values: HashMap<String, Tensor>,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let entries = npy::read_npz(&fixture(&format!("optim/{name}.npz"))).unwrap();
        Fixture {
            order: entries.iter().map(|(n, _)| n.clone()).collect(),
            values: entries.into_iter().collect(),
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.values
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no `{key}`"))
    }

    fn scalar(&self, key: &str) -> f64 {
        match self.get(key) {
            Tensor::F64(a) => a.iter().copied().next().unwrap(),
            other => panic!("`{key}` is {}, expected float64", other.dtype()),
        }
    }

    /// Keys `prefix*` with the prefix removed, in archive order.
    fn with_prefix(&self, prefix: &str) -> Vec<String> {
        self.order
            .iter()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
            .collect()
    }
}

fn backends() -> Vec<Box<dyn densa::runtime::Backend>> {
    let mut backends = vec![tract_backend()];
    backends.extend(ort_backend());
    backends
}

fn f64_scalar(v: f64) -> Tensor {
    Tensor::F64(ArrayD::from_elem(vec![], v))
}

/// Compares with PyTorch; returns the relative difference (0 for exact types).
fn compare(what: &str, ours: &Tensor, theirs: &Tensor) -> f32 {
    assert_eq!(ours.dtype(), theirs.dtype(), "{what}: element type");
    match theirs {
        Tensor::F32(_) => {
            let d = max_rel_diff(&ours.to_f32(), &theirs.to_f32());
            assert!(d <= TOLERANCE, "{what}: relative difference {d}");
            d
        }
        _ => {
            assert_eq!(ours, theirs, "{what}");
            0.0
        }
    }
}

/// Builds `optimizer`'s update for the fixture's parameters and checks three steps.
fn check_optimizer(case: &str, optimizer: &dyn Optimizer) {
    let fx = Fixture::load(case);
    let names = fx.with_prefix("param.");
    let exclude = match fx.get("exclude") {
        Tensor::Bool(a) => a.iter().copied().collect::<Vec<bool>>(),
        other => panic!("`exclude` is {}", other.dtype()),
    };
    assert_eq!(names.len(), exclude.len());

    let mut b = GraphBuilder::new(case, 0);
    let mut params = Vec::new();
    for (name, &excluded) in names.iter().zip(&exclude) {
        let shape: Vec<Dim> = fx
            .get(&format!("param.{name}"))
            .shape()
            .iter()
            .map(|&d| d.into())
            .collect();
        let p = b.input(name, DType::F32, shape.clone()).unwrap();
        let g = b.input(&format!("grad.{name}"), DType::F32, shape).unwrap();
        params.push(ParamGrad {
            exclude: excluded,
            ..ParamGrad::new(&p, &g)
        });
    }
    let fragment = optimizer.update(&mut b, &params).unwrap();
    fragment.declare_outputs(&mut b).unwrap();
    let model = b.finish();
    densa::exporter::validate::validate(&model).unwrap();
    let lr_input = format!("{}.lr", "optim");

    for backend in backends() {
        let mut session = backend.load_model(&model, case).unwrap();
        let mut state: Vec<(String, Tensor)> = names
            .iter()
            .map(|n| (n.clone(), fx.get(&format!("param.{n}")).clone()))
            .collect();
        state.extend(
            fragment
                .inputs
                .iter()
                .filter(|i| i.role == InputRole::State)
                .map(|i| (i.name.clone(), i.initial.clone())),
        );
        let mut worst = 0f32;
        for k in 0..3i64 {
            let mut feeds = state.clone();
            for (name, default) in fragment.hyperparameters() {
                let v = if name == lr_input {
                    fx.scalar(&format!("lr.{k}"))
                } else {
                    default
                };
                feeds.push((name.to_string(), f64_scalar(v)));
            }
            for n in &names {
                feeds.push((
                    format!("grad.{n}"),
                    fx.get(&format!("grad.{k}.{n}")).clone(),
                ));
            }
            let outputs = session.run(feeds).unwrap();
            // Every tensor PyTorch reports after the step is an output, and vice versa, but
            // for the step counter, which torch.optim.SGD does not keep.
            let step_name = "optim.step.next";
            let expected = fx.with_prefix(&format!("after.{k}."));
            let has_step = expected.iter().any(|n| n == "optim.step");
            let step_output = outputs.iter().any(|(n, _)| n == step_name);
            let compared = outputs.len() - usize::from(step_output && !has_step);
            assert_eq!(compared, expected.len(), "{case}: outputs {outputs:?}");
            for (out_name, ours) in &outputs {
                let name = out_name.strip_suffix(".next").unwrap();
                let what = format!("{case} step {k} `{name}` on {}", backend.name());
                if out_name == step_name && !has_step {
                    assert_eq!(
                        ours,
                        &Tensor::I64(ArrayD::from_elem(vec![], k + 1)),
                        "{what}"
                    );
                    continue;
                }
                let theirs = fx.get(&format!("after.{k}.{name}"));
                worst = worst.max(compare(&what, ours, theirs));
            }
            state = carry_state(outputs);
        }
        eprintln!(
            "{case} on {}: largest relative difference {worst:.2e}",
            backend.name()
        );
    }
}

fn config_flag(fx: &Fixture, key: &str) -> bool {
    fx.scalar(key) != 0.0
}

fn sgd_case(case: &str) {
    let fx = Fixture::load(case);
    let config = SgdConfig {
        lr: fx.scalar("lr.0"),
        momentum: fx.scalar("config.momentum"),
        dampening: fx.scalar("config.dampening"),
        weight_decay: fx.scalar("config.weight_decay"),
        nesterov: config_flag(&fx, "config.nesterov"),
        ..SgdConfig::default()
    };
    check_optimizer(case, &config);
}

#[test]
fn sgd_momentum_matches_torch() {
    sgd_case("sgd_momentum");
}

#[test]
fn sgd_nesterov_matches_torch() {
    sgd_case("sgd_nesterov");
}

/// With dampening, PyTorch's first step clones the gradient into the buffer instead of
/// applying `(1 - dampening)`: the step counter's `Where` is what makes this case pass.
#[test]
fn sgd_dampening_first_step_matches_torch() {
    sgd_case("sgd_dampening");
}

fn adamw_case(case: &str) {
    let fx = Fixture::load(case);
    let config = AdamWConfig {
        lr: fx.scalar("lr.0"),
        beta1: fx.scalar("config.beta1"),
        beta2: fx.scalar("config.beta2"),
        eps: fx.scalar("config.eps"),
        weight_decay: fx.scalar("config.weight_decay"),
        amsgrad: config_flag(&fx, "config.amsgrad"),
        ..AdamWConfig::default()
    };
    check_optimizer(case, &config);
}

#[test]
fn adamw_matches_torch() {
    adamw_case("adamw");
}

#[test]
fn adamw_amsgrad_matches_torch() {
    adamw_case("adamw_amsgrad");
}

fn lars_case(case: &str, trust_ratio: TrustRatio) {
    let fx = Fixture::load(case);
    let config = LarsConfig {
        lr: fx.scalar("lr.0"),
        momentum: fx.scalar("config.momentum"),
        weight_decay: fx.scalar("config.weight_decay"),
        eta: fx.scalar("config.eta"),
        trust_ratio,
        ..LarsConfig::default()
    };
    check_optimizer(case, &config);
}

/// Includes a parameter with a zero gradient at step 1 (trust ratio falls back to 1) and an
/// excluded bias.
#[test]
fn lars_paper_trust_ratio_matches_reference() {
    lars_case("lars_paper", TrustRatio::Paper);
}

#[test]
fn lars_decayed_gradient_trust_ratio_matches_reference() {
    lars_case("lars_decayed", TrustRatio::DecayedGradient);
}

#[test]
fn clip_grad_norm_matches_torch() {
    let fx = Fixture::load("clip");
    let grads: Vec<Tensor> = (0..3)
        .map(|i| fx.get(&format!("grad.{i}")).clone())
        .collect();
    for (case, norm_type) in [
        ("l2_clip", NormType::L2),
        ("l2_noclip", NormType::L2),
        ("inf_clip", NormType::Inf),
    ] {
        let mut b = GraphBuilder::new(case, 0);
        let inputs: Vec<_> = grads
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let shape = g.shape().iter().map(|&d| d.into()).collect();
                b.input(&format!("grad.{i}"), DType::F32, shape).unwrap()
            })
            .collect();
        let config = ClipConfig {
            max_norm: fx.scalar(&format!("{case}.max_norm")),
            norm_type,
            ..ClipConfig::default()
        };
        let clipped = clip_grad_norm(&mut b, &inputs, &config).unwrap();
        b.output(&clipped.total_norm, "total_norm").unwrap();
        for (i, g) in clipped.grads.iter().enumerate() {
            b.output(g, &format!("clipped.{i}")).unwrap();
        }
        let model = b.finish();
        for backend in backends() {
            let mut feeds: Vec<(String, Tensor)> = grads
                .iter()
                .enumerate()
                .map(|(i, g)| (format!("grad.{i}"), g.clone()))
                .collect();
            feeds.extend(clipped.fragment.initial_values());
            let out = backend
                .load_model(&model, case)
                .unwrap()
                .run(feeds)
                .unwrap();
            for (name, ours) in &out {
                let what = format!("clip {case} `{name}` on {}", backend.name());
                let d = compare(&what, ours, fx.get(&format!("{case}.{name}")));
                eprintln!("{what}: relative difference {d:.2e}");
            }
        }
    }
}

#[test]
fn ema_update_matches_moco() {
    let fx = Fixture::load("ema");
    let mut b = GraphBuilder::new("ema", 0);
    let mut pairs = Vec::new();
    for i in 0..2 {
        let shape: Vec<Dim> = fx
            .get(&format!("teacher.{i}"))
            .shape()
            .iter()
            .map(|&d| d.into())
            .collect();
        let k = b
            .input(&format!("teacher.{i}"), DType::F32, shape.clone())
            .unwrap();
        let q = b.input(&format!("student.{i}"), DType::F32, shape).unwrap();
        pairs.push((k, q));
    }
    let fragment = ema_update(&mut b, &pairs, &EmaConfig::default()).unwrap();
    fragment.declare_outputs(&mut b).unwrap();
    let model = b.finish();
    for backend in backends() {
        let mut session = backend.load_model(&model, "ema").unwrap();
        let mut teachers: Vec<(String, Tensor)> = (0..2)
            .map(|i| {
                (
                    format!("teacher.{i}"),
                    fx.get(&format!("teacher.{i}")).clone(),
                )
            })
            .collect();
        for k in 0..3 {
            let mut feeds = teachers.clone();
            feeds.push((
                "ema.momentum".into(),
                fx.get(&format!("momentum.{k}")).clone(),
            ));
            for i in 0..2 {
                let student = fx.get(&format!("student.{k}.{i}")).clone();
                feeds.push((format!("student.{i}"), student));
            }
            let out = session.run(feeds).unwrap();
            for (name, ours) in &out {
                let i = name
                    .trim_start_matches("teacher.")
                    .trim_end_matches(".next");
                let what = format!("EMA step {k} `{name}` on {}", backend.name());
                let d = compare(&what, ours, fx.get(&format!("after.{k}.{i}")));
                eprintln!("{what}: relative difference {d:.2e}");
            }
            teachers = carry_state(out);
        }
    }
}

#[test]
fn schedules_match_torch_schedulers() {
    let fx = Fixture::load("schedule");
    let none = Warmup::none();
    let cases = [
        (
            "step",
            Decay::Step {
                step_size: 3,
                gamma: 0.5,
            },
            none.clone(),
        ),
        (
            "multistep",
            Decay::MultiStep {
                milestones: vec![2, 5, 6],
                gamma: 0.1,
            },
            none.clone(),
        ),
        (
            "cosine",
            Decay::Cosine {
                total_steps: 20,
                final_value: 0.01,
            },
            none,
        ),
        (
            "linear_warmup",
            Decay::Constant,
            Warmup {
                steps: 4,
                start_factor: 0.25,
            },
        ),
    ];
    for (name, decay, warmup) in cases {
        let schedule = Schedule {
            base: 0.4,
            decay,
            warmup,
        };
        schedule.validate().unwrap();
        let Tensor::F64(theirs) = fx.get(name) else {
            panic!("`{name}` is not float64")
        };
        for (step, &want) in theirs.iter().enumerate() {
            let got = schedule.at(step as u64);
            // PyTorch's schedulers update multiplicatively (chainable form): float64 rounding.
            assert!(
                (got - want).abs() <= 1e-12 + 1e-9 * want.abs(),
                "{name} step {step}: {got} vs torch {want}"
            );
        }
    }
}

/// A training-step-shaped graph with every fragment (two optimizers, clipping, EMA) passes
/// `onnx.checker` with full shape inference and names its state as documented.
#[test]
fn fragments_pass_the_onnx_checker() {
    let mut b = GraphBuilder::new("step", 0);
    let mut inputs = Vec::new();
    for (name, shape) in [("conv.weight", vec![2, 3, 2, 2]), ("fc.bias", vec![3])] {
        let dims: Vec<Dim> = shape.iter().map(|&d: &i64| d.into()).collect();
        let p = b.input(name, DType::F32, dims.clone()).unwrap();
        let g = b.input(&format!("grad.{name}"), DType::F32, dims).unwrap();
        inputs.push((p, g));
    }
    let grads: Vec<_> = inputs.iter().map(|(_, g)| g.clone()).collect();
    let clipped = clip_grad_norm(&mut b, &grads, &ClipConfig::default()).unwrap();
    let mut fragment = Fragment::default();
    fragment.extend(clipped.fragment);
    let conv = ParamGrad::by_papers_rule(&inputs[0].0, &clipped.grads[0]);
    let bias = ParamGrad::by_papers_rule(&inputs[1].0, &clipped.grads[1]);
    fragment.extend(LarsConfig::default().update(&mut b, &[conv]).unwrap());
    let adamw = AdamWConfig {
        amsgrad: true,
        prefix: "optim_bias".into(),
        ..AdamWConfig::default()
    };
    fragment.extend(adamw.update(&mut b, &[bias]).unwrap());
    let teacher = b
        .input(
            "teacher.conv.weight",
            DType::F32,
            inputs[0].0.shape().to_vec(),
        )
        .unwrap();
    let student_next = fragment.next_of("conv.weight").unwrap().clone();
    let ema = ema_update(&mut b, &[(teacher, student_next)], &EmaConfig::default()).unwrap();
    fragment.extend(ema);
    fragment.declare_outputs(&mut b).unwrap();
    b.output(&clipped.total_norm, "grad_norm").unwrap();
    let model = b.finish();
    densa::exporter::validate::validate(&model).unwrap();

    let outputs: Vec<String> = model
        .graph
        .as_ref()
        .unwrap()
        .output
        .iter()
        .map(|o| o.name.clone())
        .collect();
    for name in [
        "conv.weight.next",
        "optim.momentum_buffer.conv.weight.next",
        "fc.bias.next",
        "optim_bias.step.next",
        "optim_bias.exp_avg.fc.bias.next",
        "optim_bias.max_exp_avg_sq.fc.bias.next",
        "teacher.conv.weight.next",
    ] {
        assert!(
            outputs.iter().any(|o| o == name),
            "no output `{name}` in {outputs:?}"
        );
    }
    assert_eq!(next_name("fc.bias"), "fc.bias.next");

    let Some(python) = python_peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("step.onnx");
    densa::exporter::io::save(&model, &path).unwrap();
    let o = std::process::Command::new(python)
        .args([
            "-c",
            "import onnx, sys; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "onnx.checker: {}", stderr(&o));
}
