use std::collections::HashMap;

use densa_exporter::{DType, GraphBuilder, Tensor};
use densa_runtime::backend::tract::TractBackend;
use densa_runtime::backend::Backend;
use densa_runtime::train::{Artifact, InputRole};
use ndarray::{Array2, ArrayD, Axis};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::train_step::{train_step_artifact, TrainStepConfig};

/// The method's smoke-test settings, EMA momentum 0.9, and `extra`.
fn tiny(method: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let info = method_info(method).unwrap();
    let v: Vec<(String, String)> = info
        .tiny
        .iter()
        .chain(&[("momentum", "0.9")])
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    v
}

fn ctx() -> PretextContext {
    PretextContext {
        arch: crate::backbone::ResNetConfig::edge(),
        batch: 4,
        image_size: 32,
        seed: 3,
    }
}

fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(shape.to_vec(), || rng.random_range(-1.0f32..1.0))
}

fn artifact(method: &str, lr: &str) -> Artifact {
    let m = create(method, &tiny(method, &[("lr", lr)])).unwrap();
    let forward = m.build(&ctx()).unwrap();
    let config = TrainStepConfig::new(m.optimizer(ctx().batch).unwrap());
    train_step_artifact(forward, None, &config).unwrap()
}

/// One step on tract with random views: the inputs' state and the outputs, by name.
fn run_step(a: &Artifact) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let c = ctx();
    let s = c.image_size as usize;
    let mut inputs: Vec<(String, Tensor)> = Vec::new();
    for (k, e) in a.manifest().inputs.iter().enumerate() {
        let t = match e.role {
            InputRole::Batch => Tensor::F32(random(&[c.batch, 3, s, s], k as u64)),
            InputRole::Hyper => Tensor::F64(ArrayD::from_elem(vec![], e.default.unwrap())),
            _ => a.state().get(&e.name).unwrap().clone(),
        };
        inputs.push((e.name.clone(), t));
    }
    let mut session = TractBackend::new().load_model(a.graph(), "step").unwrap();
    let out = session.run(inputs.clone()).unwrap();
    (inputs.into_iter().collect(), out.into_iter().collect())
}

#[test]
fn registry_lists_methods_and_resolves_settings() {
    let names: Vec<&str> = methods().iter().map(|m| m.name).collect();
    assert_eq!(names[0], "mocov2");
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len());
    let m = create("densecl", &[("temperature".into(), "0.3".into())]).unwrap();
    assert_eq!(m.settings().f64("temperature"), 0.3);
    assert_eq!(m.settings().f64("loss_lambda"), 0.5);
    let e = create("densecl", &[("temprature".into(), "0.3".into())])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`temprature`") && e.contains("temperature"),
        "{e}"
    );
    let e = create("mocov2", &[("queue_size".into(), "many".into())])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("queue_size") && e.contains("integer"), "{e}");
    let e = create("simclr", &[]).err().unwrap().to_string();
    assert!(e.contains("mocov2"), "{e}");
    let toml = Settings::parse_toml("temperature = 0.1\nqueue_size = 16\n").unwrap();
    let m = create("mocov2", &toml).unwrap();
    assert_eq!(m.settings().i64("queue_size"), 16);
    // Every backbone method has `batch_norm`; a value it does not know fails the build by name.
    for info in methods().iter().filter(|m| !m.family.is_detector()) {
        let m = create(info.name, &[("batch_norm".into(), "group".into())]).unwrap();
        let e = m.settings().norm_mode().err().unwrap().to_string();
        assert!(
            e.contains("batch_norm") && e.contains("batch or frozen"),
            "{e}"
        );
    }
}

#[test]
fn info_nce_equals_a_direct_computation() {
    let (n, d, k, t) = (3usize, 4usize, 5usize, 0.2f64);
    let mut b = GraphBuilder::new("t", 0);
    let q = b.input("q", DType::F32, vec![n.into(), d.into()]).unwrap();
    let kk = b.input("k", DType::F32, vec![n.into(), d.into()]).unwrap();
    let queue = b
        .input("queue", DType::F32, vec![k.into(), d.into()])
        .unwrap();
    let loss = ops::info_nce(&mut b, &q, &kk, &queue, t).unwrap();
    b.output(&loss, "loss").unwrap();
    let (qv, kv, uv) = (random(&[n, d], 1), random(&[n, d], 2), random(&[k, d], 3));
    let mut s = TractBackend::new().load_model(&b.finish(), "t").unwrap();
    let out = s
        .run(vec![
            ("q".into(), Tensor::F32(qv.clone())),
            ("k".into(), Tensor::F32(kv.clone())),
            ("queue".into(), Tensor::F32(uv.clone())),
        ])
        .unwrap();
    let got = out[0].1.to_f32().iter().next().copied().unwrap() as f64;
    let mut want = 0.0;
    for i in 0..n {
        let dot = |a: &ArrayD<f32>, ai: usize, b: &ArrayD<f32>, bi: usize| -> f64 {
            (0..d).map(|j| (a[[ai, j]] * b[[bi, j]]) as f64).sum()
        };
        let mut logits = vec![dot(&qv, i, &kv, i) / t];
        logits.extend((0..k).map(|j| dot(&qv, i, &uv, j) / t));
        let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
        want += lse - logits[0];
    }
    want /= n as f64;
    assert!(
        (got - want).abs() < 1e-5 * want.abs().max(1.0),
        "{got} vs {want}"
    );
}

#[test]
fn densecl_correspondence_equals_brute_force() {
    let (n, c, s2, dd) = (2usize, 6usize, 9usize, 4usize);
    let mut b = GraphBuilder::new("t", 0);
    let shape = |ch: usize| vec![n.into(), ch.into(), s2.into()];
    let qb = b.input("qb", DType::F32, shape(c)).unwrap();
    let kb = b.input("kb", DType::F32, shape(c)).unwrap();
    let kd = b.input("kd", DType::F32, shape(dd)).unwrap();
    let idx = densecl::argmax_correspondence(&mut b, &qb, &kb).unwrap();
    let picked = densecl::gather_cells(&mut b, &kd, &idx).unwrap();
    b.output(&idx, "idx").unwrap();
    b.output(&picked, "picked").unwrap();
    let (qv, kv, dv) = (
        random(&[n, c, s2], 4),
        random(&[n, c, s2], 5),
        random(&[n, dd, s2], 6),
    );
    let mut sess = TractBackend::new().load_model(&b.finish(), "t").unwrap();
    let out = sess
        .run(vec![
            ("qb".into(), Tensor::F32(qv.clone())),
            ("kb".into(), Tensor::F32(kv.clone())),
            ("kd".into(), Tensor::F32(dv.clone())),
        ])
        .unwrap();
    let Tensor::I64(got_idx) = &out[0].1 else {
        panic!("indices are int64")
    };
    let got = out[1].1.to_f32();
    for i in 0..n {
        for cell in 0..s2 {
            // Brute force: the key cell of largest dot product (the inputs stand for
            // normalised features; argmax is the same either way).
            let sim = |j: usize| {
                (0..c)
                    .map(|ch| qv[[i, ch, cell]] * kv[[i, ch, j]])
                    .sum::<f32>()
            };
            let best = (0..s2).max_by(|&a, &b| sim(a).total_cmp(&sim(b))).unwrap();
            assert_eq!(got_idx[[i, cell]], best as i64);
            for ch in 0..dd {
                assert_eq!(got[[i, ch, cell]], dv[[i, ch, best]]);
            }
        }
    }
}

#[test]
fn momentum_encoder_gets_no_gradient_and_follows_the_student_by_ema() {
    for method in ["mocov2", "densecl"] {
        let a = artifact(method, "0.5");
        let m = a.manifest();
        assert_eq!(m.input("ema.momentum").unwrap().default, Some(0.9));
        // The teacher and the queues are buffers: no optimizer slot, no gradient.
        for e in &m.inputs {
            if e.name.starts_with("teacher.") || e.name.starts_with("queue.") {
                assert_eq!(e.role, InputRole::Buffer, "{method}: {}", e.name);
            }
            assert!(
                !e.name.starts_with("optim.momentum_buffer.teacher."),
                "{method}: {}",
                e.name
            );
        }
        let (inputs, out) = run_step(&a);
        let (mf, rest) = (0.9f32, (1.0f64 - 0.9) as f32);
        let mut checked = 0;
        for e in m.inputs.iter().filter(|e| e.role == InputRole::Buffer) {
            let Some(student) = e.name.strip_prefix("teacher.") else {
                continue;
            };
            if student.ends_with("running_mean")
                || student.ends_with("running_var")
                || student.ends_with("num_batches_tracked")
            {
                continue;
            }
            let t = inputs[&e.name].to_f32();
            let s = inputs[student].to_f32();
            let next = out[&format!("{}.next", e.name)].to_f32();
            let want = &t * mf + &s * rest;
            let err = (&next - &want)
                .mapv(f32::abs)
                .fold(0.0f32, |a, &b| a.max(b));
            let scale = want.mapv(f32::abs).fold(0.0f32, |a, &b| a.max(b));
            assert!(
                err <= 2.0 * f32::EPSILON * scale,
                "{method}: {}: {err}",
                e.name
            );
            // The student itself moved (it is trained).
            let s_next = out[&format!("{student}.next")].to_f32();
            if student.ends_with("weight") && student.starts_with("layer4") {
                assert!(s_next != s, "{method}: {student} did not train");
            }
            checked += 1;
        }
        assert!(checked > 20, "{method}: only {checked} teacher tensors");
        // Queue: the oldest rows leave, the new keys (unit vectors) enter at the front.
        for q in m.inputs.iter().filter(|e| e.name.starts_with("queue.")) {
            let old = inputs[&q.name].to_f32();
            let next = out[&format!("{}.next", q.name)].to_f32();
            let (old, next): (Array2<f32>, Array2<f32>) = (
                old.into_dimensionality().unwrap(),
                next.into_dimensionality().unwrap(),
            );
            let b = ctx().batch;
            let k = old.nrows();
            assert_eq!(
                next.slice(ndarray::s![b.., ..]),
                old.slice(ndarray::s![..k - b, ..])
            );
            for row in next.axis_iter(Axis(0)).take(b) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-5, "{method}: key norm {norm}");
            }
        }
        let loss = out["loss"].to_f32().iter().next().copied().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{method}: loss {loss}");
    }
}

#[test]
fn backbone_state_keeps_only_the_student_backbone() {
    let a = artifact("mocov2", "0.03");
    let bb = backbone_state(&ctx().arch, a.state()).unwrap();
    assert!(bb.get("conv1.weight").is_some());
    assert!(bb.get("layer4.0.bn2.running_var").is_some());
    assert!(bb
        .iter()
        .all(|(k, _)| !k.starts_with("teacher") && !k.starts_with("head")));
}
