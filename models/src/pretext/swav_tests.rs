use std::collections::HashMap;

use densa_exporter::{DType, GraphBuilder, Init, ParamKind, Tensor};
use densa_runtime::backend::tract::TractBackend;
use densa_runtime::backend::Backend;
use densa_runtime::train::{Artifact, InputRole};
use ndarray::{Array2, ArrayD, Ix2};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::nn::NormMode;
use crate::pretext::{create, PretextContext};
use crate::train_step::{train_step_artifact, OptimizerConfig, TrainStepConfig};

fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(shape.to_vec(), || rng.random_range(-1.0f32..1.0))
}

/// SwAV's `distributed_sinkhorn` on one process, in f64, on `out [B, K]`.
fn host_sinkhorn(out: &Array2<f64>, eps: f64, iters: usize) -> Array2<f64> {
    let mut q = out.t().mapv(|x| (x / eps).exp()); // [K, B]
    let (k, bn) = (q.nrows() as f64, q.ncols() as f64);
    let s = q.sum();
    q /= s;
    for _ in 0..iters {
        let rows = q.sum_axis(ndarray::Axis(1));
        for (mut r, s) in q.rows_mut().into_iter().zip(rows.iter()) {
            r /= *s;
            r /= k;
        }
        let cols = q.sum_axis(ndarray::Axis(0));
        for (mut c, s) in q.columns_mut().into_iter().zip(cols.iter()) {
            c /= *s;
            c /= bn;
        }
    }
    q *= bn;
    q.t().to_owned()
}

fn f64_2(a: &ArrayD<f32>) -> Array2<f64> {
    a.mapv(|x| x as f64).into_dimensionality::<Ix2>().unwrap()
}

fn run_graph(b: GraphBuilder, inputs: Vec<(&str, Tensor)>) -> Vec<ArrayD<f32>> {
    let mut s = TractBackend::new().load_model(&b.finish(), "t").unwrap();
    let out = s
        .run(
            inputs
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect(),
        )
        .unwrap();
    out.into_iter().map(|(_, t)| t.to_f32()).collect()
}

fn assert_close(got: &Array2<f64>, want: &Array2<f64>, rel: f64, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs())).max(1e-12);
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= rel * scale, "{what}: {g} vs {w}");
    }
}

#[test]
fn sinkhorn_equals_swav_distributed_sinkhorn() {
    let (n, k) = (6usize, 5usize);
    let mut b = GraphBuilder::new("t", 0);
    let x = b.input("x", DType::F32, vec![n.into(), k.into()]).unwrap();
    let q = sinkhorn_codes(&mut b, &x, 0.05, 3, None).unwrap();
    b.output(&q, "q").unwrap();
    let xv = random(&[n, k], 11);
    let got = run_graph(b, vec![("x", Tensor::F32(xv.clone()))]);
    let want = host_sinkhorn(&f64_2(&xv), 0.05, 3);
    assert_close(&f64_2(&got[0]), &want, 1e-5, "codes");
    // Codes are assignments: every sample's row sums to 1.
    for row in want.rows() {
        assert!((row.sum() - 1.0).abs() < 1e-9);
    }
}

#[test]
fn masked_sinkhorn_equals_sinkhorn_on_the_kept_rows() {
    let (l, n, k) = (4usize, 3usize, 5usize);
    let xv = random(&[l + n, k], 12);
    for used in [0.0f32, 1.0] {
        let mut b = GraphBuilder::new("t", 0);
        let x = b
            .input("x", DType::F32, vec![(l + n).into(), k.into()])
            .unwrap();
        let mut m = vec![used; l];
        m.extend(vec![1.0; n]);
        let mask = b.constant(ops::host_tensor(&[l + n, 1], m));
        let count = b.const_f32(n as f32 + used * l as f32);
        let q = sinkhorn_codes(&mut b, &x, 0.05, 3, Some((&mask, &count))).unwrap();
        b.output(&q, "q").unwrap();
        let got = f64_2(&run_graph(b, vec![("x", Tensor::F32(xv.clone()))])[0]);
        let all = f64_2(&xv);
        let (kept, from) = if used == 1.0 {
            (host_sinkhorn(&all, 0.05, 3), 0)
        } else {
            let rows = all.slice(ndarray::s![l.., ..]).to_owned();
            (host_sinkhorn(&rows, 0.05, 3), l)
        };
        let got_kept = got.slice(ndarray::s![from.., ..]).to_owned();
        assert_close(&got_kept, &kept, 1e-5, "kept rows");
        if used == 0.0 {
            assert!(got.slice(ndarray::s![..l, ..]).iter().all(|&v| v == 0.0));
        }
    }
}

/// SwAV's loss on `scores [V * B, K]` with codes for the first `n_large` crops, in f64.
fn host_loss(scores: &Array2<f64>, batch: usize, n_large: usize, t: f64) -> f64 {
    let v_total = scores.nrows() / batch;
    let crop = |v: usize| {
        scores
            .slice(ndarray::s![v * batch..(v + 1) * batch, ..])
            .to_owned()
    };
    let mut loss = 0.0;
    for i in 0..n_large {
        let q = host_sinkhorn(&crop(i), 0.05, 3);
        let mut sub = 0.0;
        for v in (0..v_total).filter(|&v| v != i) {
            let p = crop(v);
            let mut term = 0.0;
            for r in 0..batch {
                let lse = p.row(r).iter().map(|x| (x / t).exp()).sum::<f64>().ln();
                term += (0..p.ncols())
                    .map(|c| q[[r, c]] * (p[[r, c]] / t - lse))
                    .sum::<f64>();
            }
            sub -= term / batch as f64;
        }
        loss += sub / (v_total - 1) as f64;
    }
    loss / n_large as f64
}

#[test]
fn swapped_prediction_loss_equals_a_direct_computation() {
    let (batch, v, k) = (3usize, 4usize, 5usize);
    let mut b = GraphBuilder::new("t", 0);
    let x = b
        .input("x", DType::F32, vec![(v * batch).into(), k.into()])
        .unwrap();
    let out = swav_loss(&mut b, &x, batch, 2, &[], 0.1, 0.05, 3).unwrap();
    b.output(&out.loss, "loss").unwrap();
    let xv = random(&[v * batch, k], 13);
    let got = run_graph(b, vec![("x", Tensor::F32(xv.clone()))])[0]
        .iter()
        .next()
        .copied()
        .unwrap() as f64;
    let want = host_loss(&f64_2(&xv), batch, 2, 0.1);
    assert!(
        (got - want).abs() < 1e-5 * want.abs().max(1.0),
        "{got} vs {want}"
    );
}

/// Runs one step of `a` on tract with `batch` inputs and `hyper` overrides.
fn run_step(
    a: &Artifact,
    batch: &HashMap<String, Tensor>,
    hyper: &[(&str, f64)],
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let mut inputs: Vec<(String, Tensor)> = Vec::new();
    for e in &a.manifest().inputs {
        let t = match e.role {
            InputRole::Batch => batch[&e.name].clone(),
            InputRole::Hyper => {
                let v = hyper
                    .iter()
                    .find(|(n, _)| *n == e.name)
                    .map_or(e.default.unwrap(), |(_, v)| *v);
                Tensor::F64(ArrayD::from_elem(vec![], v))
            }
            _ => a.state().get(&e.name).unwrap().clone(),
        };
        inputs.push((e.name.clone(), t));
    }
    let mut session = TractBackend::new().load_model(a.graph(), "step").unwrap();
    let out = session.run(inputs.clone()).unwrap();
    (inputs.into_iter().collect(), out.into_iter().collect())
}

#[test]
fn codes_carry_no_gradient() {
    // scores = x w^T; one SGD step with lr 1 gives w.next = w - dL/dw, which must equal the
    // gradient with the codes held constant.
    let (batch, v, d, k, t) = (3usize, 3usize, 4usize, 5usize, 0.1f64);
    let mut b = GraphBuilder::new("t", 0);
    let x = b
        .input("x", DType::F32, vec![(v * batch).into(), d.into()])
        .unwrap();
    let w = b
        .param("w", &[k, d], Init::Normal(0.5), ParamKind::Param)
        .unwrap();
    let wt = ops::transpose(&mut b, &w, &[1, 0]).unwrap();
    let s = ops::matmul(&mut b, &x, &wt).unwrap();
    let out = swav_loss(&mut b, &s, batch, 2, &[], t, 0.05, 3).unwrap();
    let mut g = ForwardGraph::new(b, out.loss);
    for dv in &out.detached {
        g = g.stop_gradient(dv);
    }
    let config = TrainStepConfig::new(OptimizerConfig::sgd(1.0, 0.0, 0.0));
    let a = train_step_artifact(g, None, &config).unwrap();
    let xv = random(&[v * batch, d], 14);
    let batch_in: HashMap<String, Tensor> = [("x".to_string(), Tensor::F32(xv.clone()))].into();
    let (inputs, outs) = run_step(&a, &batch_in, &[]);
    let w0 = f64_2(&inputs["w"].to_f32());
    let w1 = f64_2(&outs["w.next"].to_f32());
    let xs = f64_2(&xv);
    let scores = xs.dot(&w0.t());
    let crop = |c: usize| {
        scores
            .slice(ndarray::s![c * batch..(c + 1) * batch, ..])
            .to_owned()
    };
    let mut grad_s = Array2::<f64>::zeros(scores.raw_dim());
    let weight = 1.0 / ((v - 1) * 2) as f64;
    for i in 0..2 {
        let q = host_sinkhorn(&crop(i), 0.05, 3);
        for c in (0..v).filter(|&c| c != i) {
            let p = crop(c);
            for r in 0..batch {
                let e: Vec<f64> = p.row(r).iter().map(|x| (x / t).exp()).collect();
                let z: f64 = e.iter().sum();
                let qsum: f64 = q.row(r).sum();
                for col in 0..k {
                    grad_s[[c * batch + r, col]] +=
                        weight * (e[col] / z * qsum - q[[r, col]]) / t / batch as f64;
                }
            }
        }
    }
    let grad_w = grad_s.t().dot(&xs);
    let want = &w0 - &grad_w;
    assert_close(&w1, &want, 1e-4, "w after one step");
    // And the step is not trivially small: the gradient moves w.
    assert!(grad_w.iter().any(|g| g.abs() > 1e-3));
}

fn ctx() -> PretextContext {
    PretextContext {
        arch: crate::backbone::ResNetConfig::edge(),
        batch: 4,
        image_size: 32,
        seed: 3,
    }
}

fn tiny(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    TINY.iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn tiny_artifact(extra: &[(&str, &str)]) -> (Artifact, Box<dyn Pretext>) {
    let m = create("swav", &tiny(extra)).unwrap();
    let forward = m.build(&ctx()).unwrap();
    let config = TrainStepConfig::new(m.optimizer(ctx().batch).unwrap());
    (train_step_artifact(forward, None, &config).unwrap(), m)
}

fn view_batch(m: &dyn Pretext) -> HashMap<String, Tensor> {
    m.views(ctx().image_size)
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let (w, h) = v.crop.size;
            (
                format!("view{k}"),
                Tensor::F32(random(
                    &[ctx().batch, 3, h as usize, w as usize],
                    20 + k as u64,
                )),
            )
        })
        .collect()
}

#[test]
fn views_follow_the_multi_crop_recipe() {
    let m = create("swav", &[]).unwrap();
    let v = m.views(224);
    assert_eq!(v.len(), 8);
    assert!(v[..2]
        .iter()
        .all(|c| c.crop.size == (224, 224) && c.crop.scale == (0.14, 1.0)));
    assert!(v[2..]
        .iter()
        .all(|c| c.crop.size == (96, 96) && c.crop.scale == (0.05, 0.14)));
    let m = create("swav", &tiny(&[("nmb_crops_small", "3")])).unwrap();
    let v = m.views(32);
    assert_eq!(v.len(), 5);
    assert_eq!(v[4].crop.size, (14, 14));
    let s = m.schedule(0, 10);
    assert!(s.contains(&(PROTOTYPE_GRAD.to_string(), 0.0)), "{s:?}");
    assert!(m
        .schedule(1, 10)
        .contains(&(PROTOTYPE_GRAD.to_string(), 1.0)));
}

#[test]
fn prototype_gradient_scale_zero_freezes_the_prototypes() {
    let (a, m) = tiny_artifact(&[("optimizer", "sgd"), ("weight_decay", "0"), ("lr", "1")]);
    let batch = view_batch(m.as_ref());
    let name = "head.prototypes.weight";
    let (inputs, out) = run_step(&a, &batch, &[(PROTOTYPE_GRAD, 0.0)]);
    assert_eq!(out[&format!("{name}.next")], inputs[name]);
    assert_ne!(
        out["head.projection.3.weight.next"], inputs["head.projection.3.weight"],
        "the head trains while the prototypes are frozen"
    );
    let (inputs, out) = run_step(&a, &batch, &[(PROTOTYPE_GRAD, 1.0)]);
    assert_ne!(out[&format!("{name}.next")], inputs[name]);
    let loss = out["loss"].to_f32().iter().next().copied().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
}

#[test]
fn queue_is_a_fifo_of_large_crop_embeddings_and_waits_for_its_switch() {
    let (a, m) = tiny_artifact(&[]);
    let batch = view_batch(m.as_ref());
    let (b, l) = (ctx().batch, 8usize);
    let (inputs, out) = run_step(&a, &batch, &[(QUEUE_ON, 1.0)]);
    for i in 0..2 {
        let name = format!("queue.swav.{i}");
        let old = f64_2(&inputs[&name].to_f32());
        let next = f64_2(&out[&format!("{name}.next")].to_f32());
        assert!(old.iter().all(|&v| v == 0.0), "the queue starts empty");
        assert_eq!(
            next.slice(ndarray::s![b.., ..]),
            old.slice(ndarray::s![..l - b, ..])
        );
        for row in next.rows().into_iter().take(b) {
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "embedding norm {norm}");
        }
    }
    let (inputs, out) = run_step(&a, &batch, &[(QUEUE_ON, 0.0)]);
    assert_eq!(out["queue.swav.0.next"], inputs["queue.swav.0"]);
}

#[test]
fn two_batch_norm_passes_chain_their_running_statistics_like_pytorch() {
    let (n, c, h, w) = (3usize, 2usize, 2usize, 2usize);
    let mut b = GraphBuilder::new("t", 0);
    let bn = crate::nn::BatchNorm2dConfig::new(c)
        .init(&mut b, "bn")
        .unwrap();
    let x1 = b
        .input(
            "x1",
            DType::F32,
            vec![n.into(), c.into(), h.into(), w.into()],
        )
        .unwrap();
    let x2 = b
        .input(
            "x2",
            DType::F32,
            vec![n.into(), c.into(), h.into(), w.into()],
        )
        .unwrap();
    let mut m1 = NormMode::train();
    bn.forward_mode(&mut b, &x1, &mut m1).unwrap();
    let mut m2 = NormMode::train();
    bn.forward_mode(&mut b, &x2, &mut m2).unwrap();
    let state =
        crate::pretext::ops::chain_norm_state(&mut b, m1.into_state(), m2.into_state(), 0.1)
            .unwrap();
    let r = b.initializer_value("bn.running_mean").unwrap().to_f32();
    let v = b.initializer_value("bn.running_var").unwrap().to_f32();
    // Start from non-trivial running statistics.
    let (r0, v0) = (
        random(&[c], 30).mapv(|x| x * 0.5),
        random(&[c], 31).mapv(|x| 1.0 + 0.5 * x),
    );
    assert_eq!((r.len(), v.len()), (c, c));
    b.set_initializer("bn.running_mean", Tensor::F32(r0.clone()))
        .unwrap();
    b.set_initializer("bn.running_var", Tensor::F32(v0.clone()))
        .unwrap();
    b.output(state.next_of("bn.running_mean").unwrap(), "mean")
        .unwrap();
    b.output(state.next_of("bn.running_var").unwrap(), "var")
        .unwrap();
    let (a1, a2) = (random(&[n, c, h, w], 32), random(&[n, c, h, w], 33));
    let got = run_graph(
        b,
        vec![
            ("x1", Tensor::F32(a1.clone())),
            ("x2", Tensor::F32(a2.clone())),
        ],
    );
    let stats = |a: &ArrayD<f32>, ch: usize| {
        let vals: Vec<f64> = a
            .indexed_iter()
            .filter(|(i, _)| i[1] == ch)
            .map(|(_, &v)| v as f64)
            .collect();
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (vals.len() - 1) as f64;
        (m, var)
    };
    for ch in 0..c {
        let (mut rm, mut rv) = (r0[ch] as f64, v0[ch] as f64);
        for a in [&a1, &a2] {
            let (m, var) = stats(a, ch);
            rm = 0.9 * rm + 0.1 * m;
            rv = 0.9 * rv + 0.1 * var;
        }
        assert!(
            (got[0][ch] as f64 - rm).abs() < 1e-6,
            "mean {ch}: {} vs {rm}",
            got[0][ch]
        );
        assert!(
            (got[1][ch] as f64 - rv).abs() < 1e-6,
            "var {ch}: {} vs {rv}",
            got[1][ch]
        );
    }
}
