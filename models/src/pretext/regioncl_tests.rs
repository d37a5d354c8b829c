use std::collections::HashMap;

use densa_exporter::{DType, GraphBuilder, Tensor};
use densa_runtime::augment::{CropBox, View, ViewGeometry};
use densa_runtime::backend::tract::TractBackend;
use densa_runtime::backend::Backend;
use densa_runtime::train::{Artifact, InputRole};
use ndarray::{Array3, ArrayD, Axis};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::pretext::{create, method_info};
use crate::train_step::{train_step_artifact, TrainStepConfig};

pub(crate) fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(shape.to_vec(), || rng.random_range(-1.0f32..1.0))
}

pub(crate) fn ctx(image_size: u32) -> PretextContext {
    PretextContext {
        arch: crate::backbone::ResNetConfig::edge(),
        batch: 4,
        image_size,
        seed: 3,
    }
}

fn run(b: GraphBuilder, inputs: Vec<(&str, ArrayD<f32>)>) -> Vec<ArrayD<f32>> {
    let mut s = TractBackend::new().load_model(&b.finish(), "t").unwrap();
    let out = s
        .run(
            inputs
                .into_iter()
                .map(|(n, v)| (n.to_string(), Tensor::F32(v)))
                .collect(),
        )
        .unwrap();
    out.into_iter().map(|(_, t)| t.to_f32()).collect()
}

/// A fake view of sample `i`: random pixels and a geometry of its own.
pub(crate) fn fake_view(i: usize, k: usize, size: usize) -> View {
    let geometry = ViewGeometry {
        crop: CropBox::new(
            i as f32 * 3.0 + k as f32,
            2.0 * k as f32,
            200.0,
            180.0 + i as f32,
        ),
        flipped: k % 2 == 1,
        out_size: (size as u32, size as u32),
        image_size: (256, 256),
    };
    let pixels: Array3<f32> = random(&[3, size, size], (10 * i + k) as u64)
        .into_dimensionality()
        .unwrap();
    View { pixels, geometry }
}

/// The method's artifact at `ctx` with its smoke-test settings, EMA momentum 0.9 and `extra`.
pub(crate) fn artifact(
    method: &str,
    c: &PretextContext,
    extra: &[(&str, &str)],
) -> (Box<dyn Pretext>, Artifact) {
    let info = method_info(method).unwrap();
    let settings: Vec<(String, String)> = info
        .tiny
        .iter()
        .chain(&[("momentum", "0.9"), ("lr", "0.5")])
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let m = create(method, &settings).unwrap();
    let forward = m.build(c).unwrap();
    let config = TrainStepConfig::new(m.optimizer(c.batch).unwrap());
    let a = train_step_artifact(forward, None, &config).unwrap();
    (m, a)
}

/// One step on tract with fake views and the method's host inputs for them: the inputs and
/// the outputs, by name.
pub(crate) fn run_step(
    m: &dyn Pretext,
    a: &Artifact,
    c: &PretextContext,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let s = c.image_size as usize;
    let n_views = m.views(c.image_size).len();
    let mut batch: HashMap<String, Vec<ArrayD<f32>>> = HashMap::new();
    for i in 0..c.batch {
        let views: Vec<View> = (0..n_views).map(|k| fake_view(i, k, s)).collect();
        for (k, v) in views.iter().enumerate() {
            batch
                .entry(format!("view{k}"))
                .or_default()
                .push(v.pixels.clone().into_dyn());
        }
        for (name, t) in m.host_inputs(c, &views).unwrap() {
            batch.entry(name).or_default().push(t.to_f32());
        }
    }
    let mut inputs: Vec<(String, Tensor)> = Vec::new();
    for e in &a.manifest().inputs {
        let t = match e.role {
            InputRole::Batch => {
                let parts = &batch[&e.name];
                let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
                Tensor::F32(ndarray::stack(Axis(0), &views).unwrap())
            }
            InputRole::Hyper => Tensor::F64(ArrayD::from_elem(vec![], e.default.unwrap())),
            _ => a.state().get(&e.name).unwrap().clone(),
        };
        inputs.push((e.name.clone(), t));
    }
    let mut session = TractBackend::new().load_model(a.graph(), "step").unwrap();
    let out = session.run(inputs.clone()).unwrap();
    (inputs.into_iter().collect(), out.into_iter().collect())
}

/// The teacher and queues are buffers without optimizer slots; after one step every teacher
/// parameter is exactly `m t + (1 - m) s` (m = 0.9) and the student's layer4 moved. Returns
/// the step's outputs.
pub(crate) fn check_ema(method: &str, c: &PretextContext) -> HashMap<String, Tensor> {
    let (m, a) = artifact(method, c, &[]);
    let man = a.manifest();
    assert_eq!(man.input("ema.momentum").unwrap().default, Some(0.9));
    for e in &man.inputs {
        if e.name.starts_with("teacher.") || e.name.starts_with("queue.") {
            assert_eq!(e.role, InputRole::Buffer, "{method}: {}", e.name);
        }
        assert!(
            !e.name.starts_with("optim.momentum_buffer.teacher."),
            "{method}: {}",
            e.name
        );
    }
    let (inputs, out) = run_step(m.as_ref(), &a, c);
    let (mf, rest) = (0.9f32, (1.0f64 - 0.9) as f32);
    let mut checked = 0;
    for e in man.inputs.iter().filter(|e| e.role == InputRole::Buffer) {
        let Some(student) = e.name.strip_prefix("teacher.") else {
            continue;
        };
        if student.contains("running_") || student.ends_with("num_batches_tracked") {
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
        if student.ends_with("weight") && student.starts_with("layer4") {
            let s_next = out[&format!("{student}.next")].to_f32();
            assert!(s_next != s, "{method}: {student} did not train");
        }
        checked += 1;
    }
    assert!(checked > 20, "{method}: only {checked} teacher tensors");
    let loss = out["loss"].to_f32().iter().next().copied().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{method}: loss {loss}");
    out
}

/// The pixel extent of feature cell `c` of `cells` over `pixels`.
fn cell_extent(c: usize, cells: usize, pixels: usize) -> (usize, usize) {
    if cells == 1 {
        (0, pixels)
    } else {
        (32 * c, (32 * (c + 1)).min(pixels))
    }
}

#[test]
fn regioncl_masks_and_composites_equal_brute_force() {
    let sides = [3.0, 4.0, 5.0];
    for (size, seed) in [
        (224usize, 1u64),
        (224, 2),
        (96, 3),
        (64, 4),
        (48, 5),
        (32, 6),
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = draw_region(&mut rng, size, size, &sides, 7);
        let (px, cells) = r.masks(size, size);
        let (px, cells) = (px.to_f32(), cells.to_f32());
        let s = feature_side(size);
        assert_eq!(s, size.div_ceil(32));
        assert_eq!(cells.shape(), &[1, s, s]);
        // Every cell's share is the covered fraction of its pixels, computed pixel by pixel.
        let mut inside = 0.0;
        for cy in 0..s {
            for cx in 0..s {
                let (y0, y1) = cell_extent(cy, s, size);
                let (x0, x1) = cell_extent(cx, s, size);
                let mut covered = 0usize;
                for y in y0..y1 {
                    for x in x0..x1 {
                        let inr = (r.y0..r.y1).contains(&y) && (r.x0..r.x1).contains(&x);
                        assert_eq!(px[[0, y, x]], if inr { 1.0 } else { 0.0 });
                        covered += inr as usize;
                    }
                }
                let share = covered as f32 / ((y1 - y0) * (x1 - x0)) as f32;
                assert!((cells[[0, cy, cx]] - share).abs() < 1e-6, "{size}: {share}");
                inside += cells[[0, cy, cx]];
            }
        }
        // Canvas and paste both exist.
        assert!(inside > 0.0 && inside < (s * s) as f32, "{size}: {inside}");
        if s >= 2 {
            // Aligned to the stride-32 grid, binary at the feature level.
            assert_eq!((r.x0 % 32, r.y0 % 32), (0, 0));
            assert!(cells.iter().all(|&v| v == 0.0 || v == 1.0));
        }
        if size == 224 {
            for side in [r.x1 - r.x0, r.y1 - r.y0] {
                assert!([96, 128, 160].contains(&side), "{side}");
            }
        }
    }

    // Deterministic per sample: the same views give the same region, other views another.
    let m = create("regioncl", &[]).unwrap();
    let c = ctx(224);
    let views = |i| vec![fake_view(i, 0, 224), fake_view(i, 1, 224)];
    let a = m.host_inputs(&c, &views(0)).unwrap();
    let again = m.host_inputs(&c, &views(0)).unwrap();
    assert_eq!(a[0].1.to_f32(), again[0].1.to_f32());
    assert_eq!(a[0].0, PIXEL_MASK);
    assert_eq!(a[1].0, CELL_MASK);
    let differ =
        (1..8).any(|i| m.host_inputs(&c, &views(i)).unwrap()[0].1.to_f32() != a[0].1.to_f32());
    assert!(differ);

    // The composite graph vs brute force.
    let (n, h) = (4usize, 8usize);
    let mut b = GraphBuilder::new("t", 0);
    let v = b
        .input(
            "v",
            DType::F32,
            vec![n.into(), 3.into(), h.into(), h.into()],
        )
        .unwrap();
    let mk = b
        .input(
            "m",
            DType::F32,
            vec![n.into(), 1.into(), h.into(), h.into()],
        )
        .unwrap();
    let out = composite(&mut b, &v, &mk).unwrap();
    b.output(&out, "c").unwrap();
    let vv = random(&[n, 3, h, h], 7);
    let mv = random(&[n, 1, h, h], 8).mapv(|x| if x > 0.0 { 1.0 } else { 0.0 });
    let got = &run(b, vec![("v", vv.clone()), ("m", mv.clone())])[0];
    for i in 0..n {
        for ch in 0..3 {
            for y in 0..h {
                for x in 0..h {
                    let src = if mv[[i, 0, y, x]] == 1.0 {
                        n - 1 - i
                    } else {
                        i
                    };
                    assert_eq!(got[[i, ch, y, x]], vv[[src, ch, y, x]]);
                }
            }
        }
    }
}

#[test]
fn regioncl_masked_means_equal_direct_computation() {
    let (n, c, s) = (2usize, 3usize, 3usize);
    let mut b = GraphBuilder::new("t", 0);
    let f = b
        .input(
            "f",
            DType::F32,
            vec![n.into(), c.into(), s.into(), s.into()],
        )
        .unwrap();
    let mk = b
        .input(
            "m",
            DType::F32,
            vec![n.into(), 1.into(), s.into(), s.into()],
        )
        .unwrap();
    let (canvas, paste) = masked_means(&mut b, &f, &mk).unwrap();
    b.output(&canvas, "canvas").unwrap();
    b.output(&paste, "paste").unwrap();
    let fv = random(&[n, c, s, s], 1);
    // Sample 0 binary, sample 1 soft shares.
    let mut mv = ArrayD::<f32>::zeros(vec![n, 1, s, s]);
    for (y, x) in [(0, 1), (1, 1), (2, 2)] {
        mv[[0, 0, y, x]] = 1.0;
    }
    for y in 0..s {
        for x in 0..s {
            mv[[1, 0, y, x]] = 0.1 * (1 + y * s + x) as f32;
        }
    }
    let out = run(b, vec![("f", fv.clone()), ("m", mv.clone())]);
    for i in 0..n {
        for ch in 0..c {
            let (mut ci, mut wi, mut po, mut wo) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            for y in 0..s {
                for x in 0..s {
                    let (v, w) = (fv[[i, ch, y, x]] as f64, mv[[i, 0, y, x]] as f64);
                    po += v * w;
                    wo += w;
                    ci += v * (1.0 - w);
                    wi += 1.0 - w;
                }
            }
            let (want_c, want_p) = (ci / wi, po / wo);
            assert!(
                (out[0][[i, ch]] as f64 - want_c).abs() < 1e-6,
                "canvas {i} {ch}"
            );
            assert!(
                (out[1][[i, ch]] as f64 - want_p).abs() < 1e-6,
                "paste {i} {ch}"
            );
        }
    }
}

#[test]
fn regioncl_region_info_nce_equals_direct_computation() {
    // The region loss as the method builds it: canvas queries against their own keys, paste
    // queries against their source's keys (reversed batch), the other region as an extra
    // negative, then the queue; mean of the two terms.
    let (n, d, k, t) = (4usize, 3usize, 5usize, 0.2f64);
    let mut b = GraphBuilder::new("t", 0);
    let shape = |r: usize| vec![r.into(), d.into()];
    let qc = b.input("qc", DType::F32, shape(n)).unwrap();
    let qp = b.input("qp", DType::F32, shape(n)).unwrap();
    let kk = b.input("k", DType::F32, shape(n)).unwrap();
    let queue = b.input("queue", DType::F32, shape(k)).unwrap();
    let ks = reverse_batch(&mut b, &kk).unwrap();
    let lc = info_nce_extra(&mut b, &qc, &kk, &qp, &queue, t).unwrap();
    let lp = info_nce_extra(&mut b, &qp, &ks, &qc, &queue, t).unwrap();
    let sum = b.add(&lc, &lp).unwrap();
    let half = b.const_f32(0.5);
    let region = b.mul(&sum, &half).unwrap();
    b.output(&region, "loss").unwrap();
    let unit = |seed, rows| {
        let mut a = random(&[rows, d], seed);
        for mut r in a.axis_iter_mut(Axis(0)) {
            let nrm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.mapv_inplace(|x| x / nrm);
        }
        a
    };
    let (qcv, qpv, kv, uv) = (unit(1, n), unit(2, n), unit(3, n), unit(4, k));
    let got = run(
        b,
        vec![
            ("qc", qcv.clone()),
            ("qp", qpv.clone()),
            ("k", kv.clone()),
            ("queue", uv.clone()),
        ],
    )[0]
    .iter()
    .next()
    .copied()
    .unwrap() as f64;
    let dot = |a: &ArrayD<f32>, i: usize, b: &ArrayD<f32>, j: usize| -> f64 {
        (0..d).map(|c| a[[i, c]] as f64 * b[[j, c]] as f64).sum()
    };
    let mut want = 0.0;
    for i in 0..n {
        for (q, pos, extra) in [(&qcv, (&kv, i), &qpv), (&qpv, (&kv, n - 1 - i), &qcv)] {
            let mut logits = vec![dot(q, i, pos.0, pos.1) / t, dot(q, i, extra, i) / t];
            logits.extend((0..k).map(|j| dot(q, i, &uv, j) / t));
            let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
            want += lse - logits[0];
        }
    }
    want /= 2.0 * n as f64;
    assert!(
        (got - want).abs() < 1e-5 * want.abs().max(1.0),
        "{got} vs {want}"
    );
}

#[test]
fn regioncl_momentum_encoder_gets_no_gradient_and_follows_by_ema() {
    for size in [32, 64] {
        let out = check_ema("regioncl", &ctx(size));
        for name in ["loss_instance", "loss_region"] {
            let v = out[name].to_f32().iter().next().copied().unwrap();
            assert!(v.is_finite() && v > 0.0, "{size}: {name} {v}");
        }
        // Queue: the new keys (unit vectors) enter at the front.
        let q = out["queue.global.next"].to_f32();
        for i in 0..4 {
            let norm: f32 = (0..q.shape()[1])
                .map(|j| q[[i, j]] * q[[i, j]])
                .sum::<f32>()
                .sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        }
    }
}

#[test]
fn regioncl_extra_negative_is_detached() {
    // One SGD step (lr 1, no momentum, no decay) on queries q = normalize(a) whose extra
    // negative is the reversed batch's query, detached: the step must equal the finite-difference gradient with
    // the extra negative held fixed, and differ from the one where it is not.
    use crate::train_step::OptimizerConfig;
    use densa_exporter::{Init, ParamKind};
    let (n, d, k, t) = (3usize, 4usize, 5usize, 0.5f64);
    let mut b = GraphBuilder::new("t", 1);
    let a = b
        .param("a", &[n, d], Init::Normal(1.0), ParamKind::Param)
        .unwrap();
    let kk = b.input("k", DType::F32, vec![n.into(), d.into()]).unwrap();
    let queue = b
        .input("queue", DType::F32, vec![k.into(), d.into()])
        .unwrap();
    let q = ops::l2_normalize(&mut b, &a, 1).unwrap();
    let extra = reverse_batch(&mut b, &q).unwrap();
    let loss = info_nce_extra(&mut b, &q, &kk, &extra, &queue, t).unwrap();
    let fg = ForwardGraph::new(b, loss).stop_gradient(&extra);
    let config = TrainStepConfig::new(OptimizerConfig::sgd(1.0, 0.0, 0.0));
    let art = train_step_artifact(fg, None, &config).unwrap();
    let (kv, uv) = (random(&[n, d], 11), random(&[k, d], 12));
    let mut inputs: Vec<(String, Tensor)> = Vec::new();
    for e in &art.manifest().inputs {
        let t = match (e.role, e.name.as_str()) {
            (InputRole::Batch, "k") => Tensor::F32(kv.clone()),
            (InputRole::Batch, _) => Tensor::F32(uv.clone()),
            (InputRole::Hyper, _) => Tensor::F64(ArrayD::from_elem(vec![], e.default.unwrap())),
            _ => art.state().get(&e.name).unwrap().clone(),
        };
        inputs.push((e.name.clone(), t));
    }
    let av = art.state().get("a").unwrap().to_f32();
    let mut s = TractBackend::new().load_model(art.graph(), "step").unwrap();
    let out: HashMap<String, Tensor> = s.run(inputs).unwrap().into_iter().collect();
    let step = &av - &out["a.next"].to_f32();

    let norm = |a: &[f64]| -> Vec<f64> {
        let mut r = a.to_vec();
        for row in r.chunks_mut(d) {
            let l = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            row.iter_mut().for_each(|x| *x /= l);
        }
        r
    };
    let host_loss = |a: &[f64], extra: &[f64]| -> f64 {
        let q = norm(a);
        let mut total = 0.0;
        for i in 0..n {
            let dot = |v: &dyn Fn(usize) -> f64| (0..d).map(|c| q[i * d + c] * v(c)).sum::<f64>();
            let mut logits = vec![
                dot(&|c| kv[[i, c]] as f64) / t,
                dot(&|c| extra[(n - 1 - i) * d + c]) / t,
            ];
            logits.extend((0..k).map(|j| dot(&|c| uv[[j, c]] as f64) / t));
            let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
            total += lse - logits[0];
        }
        total / n as f64
    };
    let a0: Vec<f64> = av.iter().map(|&x| x as f64).collect();
    let fixed = norm(&a0);
    let (mut worst_fixed, mut worst_free) = (0.0f64, 0.0f64);
    for idx in 0..n * d {
        let h = 1e-5;
        let (mut ap, mut am) = (a0.clone(), a0.clone());
        ap[idx] += h;
        am[idx] -= h;
        let g_fixed = (host_loss(&ap, &fixed) - host_loss(&am, &fixed)) / (2.0 * h);
        let g_free = (host_loss(&ap, &norm(&ap)) - host_loss(&am, &norm(&am))) / (2.0 * h);
        let got = step.as_slice().unwrap()[idx] as f64;
        worst_fixed = worst_fixed.max((got - g_fixed).abs());
        worst_free = worst_free.max((got - g_free).abs());
    }
    assert!(worst_fixed < 1e-4, "detached gradient off by {worst_fixed}");
    assert!(
        worst_free > 1e-3,
        "the extra negative made no difference: {worst_free}"
    );
}
