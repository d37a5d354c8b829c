use std::collections::HashMap;

use densa_exporter::{DType, GraphBuilder, Tensor};
use densa_runtime::backend::tract::TractBackend;
use densa_runtime::backend::Backend;
use densa_runtime::train::InputRole;
use ndarray::{ArrayD, IxDyn};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::pretext::{create, PretextContext};
use crate::train_step::{train_step_artifact, TrainStepConfig};

fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(shape.to_vec(), || rng.random_range(-1.0f32..1.0))
}

fn run_graph(b: GraphBuilder, inputs: Vec<(&str, ArrayD<f32>)>) -> Vec<ArrayD<f32>> {
    let mut s = TractBackend::new().load_model(&b.finish(), "t").unwrap();
    let out = s
        .run(
            inputs
                .into_iter()
                .map(|(n, t)| (n.to_string(), Tensor::F32(t)))
                .collect(),
        )
        .unwrap();
    out.into_iter().map(|(_, t)| t.to_f32()).collect()
}

fn input(b: &mut GraphBuilder, name: &str, shape: &[usize]) -> densa_exporter::Value {
    b.input(name, DType::F32, shape.iter().map(|&d| d.into()).collect())
        .unwrap()
}

#[test]
fn feature_search_equals_a_direct_computation() {
    let (bsz, c, h, w, crops, hl, wl) = (2usize, 3usize, 2usize, 3usize, 2usize, 2usize, 2usize);
    let mut b = GraphBuilder::new("t", 0);
    let t = input(&mut b, "t", &[bsz, c, h, w]);
    let l = input(&mut b, "l", &[crops * bsz, c, hl, wl]);
    let found = feature_search(&mut b, &t, &l).unwrap();
    b.output(&found.attention, "attention").unwrap();
    b.output(&found.target, "target").unwrap();
    let (tv, lv) = (
        random(&[bsz, c, h, w], 1),
        random(&[crops * bsz, c, hl, wl], 2),
    );
    let got = run_graph(b, vec![("t", tv.clone()), ("l", lv.clone())]);
    for n in 0..crops * bsz {
        let img = n % bsz; // crop-major: row n is crop n / B of image n % B
        let mut u: Vec<f64> = (0..c)
            .map(|ch| {
                let mut s = 0.0;
                for y in 0..hl {
                    for x in 0..wl {
                        s += lv[[n, ch, y, x]] as f64;
                    }
                }
                s / (hl * wl) as f64
            })
            .collect();
        let un = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        u.iter_mut().for_each(|v| *v /= un);
        for y in 0..h {
            for x in 0..w {
                let f: Vec<f64> = (0..c).map(|ch| tv[[img, ch, y, x]] as f64).collect();
                let fnorm = f.iter().map(|v| v * v).sum::<f64>().sqrt();
                let a: f64 = f.iter().zip(&u).map(|(fv, uv)| fv / fnorm * uv).sum();
                let ga = got[0][[n, 0, y, x]] as f64;
                assert!((ga - a).abs() < 1e-5, "attention {n} {y} {x}: {ga} vs {a}");
                for ch in 0..c {
                    let want = a * f[ch];
                    let gt = got[1][[n, ch, y, x]] as f64;
                    assert!((gt - want).abs() < 1e-5, "target: {gt} vs {want}");
                }
            }
        }
    }
}

#[test]
fn dino_loss_with_centring_equals_a_direct_computation() {
    let (bsz, v, k, tt, st) = (2usize, 4usize, 5usize, 0.05f64, 0.1f64);
    let mut b = GraphBuilder::new("t", 0);
    let s = input(&mut b, "s", &[v * bsz, k]);
    let t = input(&mut b, "t", &[2 * bsz, k]);
    let c = input(&mut b, "c", &[1, k]);
    let temp = b.const_f32(tt as f32);
    let loss = dino_loss(&mut b, &s, &t, Some(&c), &temp, st, bsz).unwrap();
    let next = center_update(&mut b, &c, &t, 0.9).unwrap();
    b.output(&loss, "loss").unwrap();
    b.output(&next, "center").unwrap();
    let (sv, tv, cv) = (
        random(&[v * bsz, k], 3),
        random(&[2 * bsz, k], 4),
        random(&[1, k], 5),
    );
    let got = run_graph(
        b,
        vec![("s", sv.clone()), ("t", tv.clone()), ("c", cv.clone())],
    );
    let softmax = |row: Vec<f64>| {
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect::<Vec<f64>>()
    };
    let mut total = 0.0;
    let mut terms = 0;
    for iq in 0..2 {
        for iv in (0..v).filter(|&iv| iv != iq) {
            let mut ce = 0.0;
            for n in 0..bsz {
                let q = softmax(
                    (0..k)
                        .map(|j| (tv[[iq * bsz + n, j]] - cv[[0, j]]) as f64 / tt)
                        .collect(),
                );
                let p = softmax((0..k).map(|j| sv[[iv * bsz + n, j]] as f64 / st).collect());
                ce -= (0..k).map(|j| q[j] * p[j].ln()).sum::<f64>();
            }
            total += ce / bsz as f64;
            terms += 1;
        }
    }
    let want = total / terms as f64;
    let gl = got[0].iter().next().copied().unwrap() as f64;
    assert!(
        (gl - want).abs() < 1e-5 * want.abs().max(1.0),
        "{gl} vs {want}"
    );
    // Centre: c * 0.9 + mean(t) * 0.1, in float32 as the graph computes it.
    for j in 0..k {
        let mean = (0..2 * bsz).map(|n| tv[[n, j]]).sum::<f32>() / (2 * bsz) as f32;
        let want = cv[[0, j]] * 0.9f32 + mean * (1.0f64 - 0.9) as f32;
        let g = got[1][[0, j]];
        assert!(
            (g - want).abs() <= 2.0 * f32::EPSILON * want.abs().max(1e-3),
            "center {j}: {g} vs {want}"
        );
    }
}

fn ctx() -> PretextContext {
    PretextContext {
        arch: crate::backbone::ResNetConfig::edge(),
        batch: 4,
        image_size: 32,
        seed: 3,
    }
}

#[test]
fn schedule_warms_the_teacher_temperature_and_ramps_the_momentum() {
    let m = create("scfs", &[]).unwrap();
    let at = |step| -> HashMap<String, f64> { m.schedule(step, 100).into_iter().collect() };
    assert_eq!(at(0)[TEACHER_TEMP], 0.04);
    assert!((at(12)[TEACHER_TEMP] - (0.04 + 0.03 * 12.0 / 24.0)).abs() < 1e-12);
    assert_eq!(at(25)[TEACHER_TEMP], 0.07);
    assert!((at(0)[EMA_MOMENTUM] - 0.996).abs() < 1e-12);
    assert!((at(100)[EMA_MOMENTUM] - 1.0).abs() < 1e-12);
    let v = m.views(224);
    assert_eq!(v.len(), 10);
    assert!(v[..2].iter().all(|c| c.crop.scale == (0.25, 1.0)));
    assert!(v[2..]
        .iter()
        .all(|c| c.crop.scale == (0.05, 0.25) && c.crop.size == (96, 96)));
}

#[test]
fn teacher_gets_no_gradient_and_follows_the_student_by_ema() {
    let overrides: Vec<(String, String)> = TINY
        .iter()
        .chain(&[("momentum", "0.9"), ("lr", "0.5")])
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let m = create("scfs", &overrides).unwrap();
    let c = ctx();
    let forward = m.build(&c).unwrap();
    let config = TrainStepConfig::new(m.optimizer(c.batch).unwrap());
    let a = train_step_artifact(forward, None, &config).unwrap();
    let views = m.views(c.image_size);
    let mut inputs: Vec<(String, Tensor)> = Vec::new();
    for e in &a.manifest().inputs {
        let t = match e.role {
            InputRole::Batch => {
                let k: usize = e.name.strip_prefix("view").unwrap().parse().unwrap();
                let (w, h) = views[k].crop.size;
                Tensor::F32(random(&[c.batch, 3, h as usize, w as usize], 10 + k as u64))
            }
            InputRole::Hyper => Tensor::F64(ArrayD::from_elem(IxDyn(&[]), e.default.unwrap())),
            _ => a.state().get(&e.name).unwrap().clone(),
        };
        assert!(
            !e.name.starts_with("optim.momentum_buffer.teacher."),
            "{}",
            e.name
        );
        if e.name.starts_with("teacher.") || e.name.starts_with("center.") {
            assert_eq!(e.role, InputRole::Buffer, "{}", e.name);
        }
        inputs.push((e.name.clone(), t));
    }
    let mut session = TractBackend::new().load_model(a.graph(), "step").unwrap();
    let out: HashMap<String, Tensor> = session.run(inputs.clone()).unwrap().into_iter().collect();
    let inputs: HashMap<String, Tensor> = inputs.into_iter().collect();
    let mut checked = 0;
    for (name, t) in inputs.iter().filter(|(n, _)| n.starts_with("teacher.")) {
        let student = name.strip_prefix("teacher.").unwrap();
        if student.contains("running_") || student.contains("num_batches") {
            continue;
        }
        let want = &t.to_f32() * 0.9f32 + &inputs[student].to_f32() * (1.0f64 - 0.9) as f32;
        let next = out[&format!("{name}.next")].to_f32();
        let err = (&next - &want)
            .mapv(f32::abs)
            .fold(0.0f32, |a, &b| a.max(b));
        let scale = want.mapv(f32::abs).fold(0.0f32, |a, &b| a.max(b));
        assert!(err <= 2.0 * f32::EPSILON * scale, "{name}: {err}");
        checked += 1;
    }
    assert!(checked > 20, "only {checked} teacher tensors");
    // The student trains, through the stage heads too.
    for p in [
        "layer4.0.conv1.weight",
        "head.layer2.2.weight",
        "head.dino.last_layer.weight_v",
    ] {
        assert_ne!(out[&format!("{p}.next")], inputs[p], "{p} did not train");
    }
    // Centres start at 0 and move.
    assert_ne!(out["center.layer3.next"], inputs["center.layer3"]);
    let loss = out["loss"].to_f32().iter().next().copied().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
}
