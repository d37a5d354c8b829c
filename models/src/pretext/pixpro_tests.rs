//! PixPro's tests, and small helpers the dense methods' tests share.

use std::collections::HashMap;

use densa_exporter::{DType, GraphBuilder, Tensor};
use densa_runtime::augment::{CropBox, View, ViewGeometry};
use densa_runtime::backend::tract::TractBackend;
use densa_runtime::backend::Backend;
use densa_runtime::train::{Artifact, InputRole};
use ndarray::{Array3, ArrayD};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::pretext::{create, method_info, PretextContext};
use crate::train_step::{train_step_artifact, TrainStepConfig};

pub(crate) fn ctx() -> PretextContext {
    PretextContext {
        arch: crate::backbone::ResNetConfig::edge(),
        batch: 4,
        image_size: 32,
        seed: 3,
    }
}

pub(crate) fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(shape.to_vec(), || rng.random_range(-1.0f32..1.0))
}

/// A random view geometry of a `w x h` image at `out x out` pixels, possibly flipped.
pub(crate) fn random_geometry(rng: &mut ChaCha8Rng, (w, h): (u32, u32), out: u32) -> ViewGeometry {
    let (wf, hf) = (w as f32, h as f32);
    let cw = rng.random_range(0.2f32..1.0) * wf;
    let ch = rng.random_range(0.2f32..1.0) * hf;
    let x0 = rng.random_range(0.0..=(wf - cw));
    let y0 = rng.random_range(0.0..=(hf - ch));
    ViewGeometry {
        crop: CropBox::new(x0, y0, x0 + cw, y0 + ch),
        flipped: rng.random_range(0..2) == 1,
        out_size: (out, out),
        image_size: (w, h),
    }
}

/// A view with that geometry (the pixels don't matter to host inputs).
pub(crate) fn view(geometry: ViewGeometry) -> View {
    View {
        pixels: Array3::zeros((
            3,
            geometry.out_size.1 as usize,
            geometry.out_size.0 as usize,
        )),
        geometry,
    }
}

/// Original-image point of view pixel `(u, v)`, written out from the definition of a view
/// (crop, resize, mirror) rather than through the geometry module.
pub(crate) fn original_of(g: &ViewGeometry, u: f64, v: f64) -> (f64, f64) {
    let c = g.crop;
    let sx = (c.x1 - c.x0) as f64 / g.out_size.0 as f64;
    let sy = (c.y1 - c.y0) as f64 / g.out_size.1 as f64;
    let x = if g.flipped {
        c.x1 as f64 - u * sx
    } else {
        c.x0 as f64 + u * sx
    };
    (x, c.y0 as f64 + v * sy)
}

/// Runs a finished graph on tract.
pub(crate) fn run_graph(b: GraphBuilder, inputs: Vec<(&str, Tensor)>) -> HashMap<String, Tensor> {
    let mut s = TractBackend::new().load_model(&b.finish(), "t").unwrap();
    s.run(
        inputs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
    .unwrap()
    .into_iter()
    .collect()
}

/// The train-step artifact of `method` with its tiny settings, EMA momentum 0.9 (if it has
/// one) and `extra`.
pub(crate) fn artifact(method: &str, extra: &[(&str, &str)]) -> Artifact {
    let info = method_info(method).unwrap();
    let has_momentum = (info.hyper)().iter().any(|h| h.key == "momentum");
    let momentum: &[(&str, &str)] = if has_momentum {
        &[("momentum", "0.9")]
    } else {
        &[]
    };
    let overrides: Vec<(String, String)> = info
        .tiny
        .iter()
        .chain(momentum)
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let m = create(method, &overrides).unwrap();
    let forward = m.build(&ctx()).unwrap();
    let config = TrainStepConfig::new(m.optimizer(ctx().batch).unwrap());
    train_step_artifact(forward, None, &config).unwrap()
}

/// One step on tract: random views, `host` for the other batch inputs, defaults for hypers.
pub(crate) fn run_step(
    a: &Artifact,
    host: &HashMap<String, Tensor>,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let c = ctx();
    let s = c.image_size as usize;
    let mut inputs: Vec<(String, Tensor)> = Vec::new();
    for (k, e) in a.manifest().inputs.iter().enumerate() {
        let t = match e.role {
            InputRole::Batch if e.name.starts_with("view") => {
                Tensor::F32(random(&[c.batch, 3, s, s], k as u64))
            }
            InputRole::Batch => host
                .get(&e.name)
                .unwrap_or_else(|| panic!("no host input {}", e.name))
                .clone(),
            InputRole::Hyper => Tensor::F64(ArrayD::from_elem(vec![], e.default.unwrap())),
            _ => a.state().get(&e.name).unwrap().clone(),
        };
        inputs.push((e.name.clone(), t));
    }
    let mut session = TractBackend::new().load_model(a.graph(), "step").unwrap();
    let out = session.run(inputs.clone()).unwrap();
    (inputs.into_iter().collect(), out.into_iter().collect())
}

/// The losses of `steps` train steps on tract over one fixed batch (random views, `host`),
/// the state fed back from each step's outputs.
pub(crate) fn losses_over_steps(
    a: &Artifact,
    host: &HashMap<String, Tensor>,
    steps: usize,
) -> Vec<f32> {
    let (mut inputs, _) = run_step(a, host);
    let names: Vec<(String, Option<String>)> = a
        .manifest()
        .inputs
        .iter()
        .map(|e| (e.name.clone(), e.next.clone()))
        .collect();
    let mut session = TractBackend::new().load_model(a.graph(), "step").unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let feed: Vec<(String, Tensor)> = names
            .iter()
            .map(|(n, _)| (n.clone(), inputs[n].clone()))
            .collect();
        let out: HashMap<String, Tensor> = session.run(feed).unwrap().into_iter().collect();
        losses.push(out["loss"].to_f32().iter().next().copied().unwrap());
        for (n, next) in &names {
            if let Some(next) = next {
                inputs.insert(n.clone(), out[next].clone());
            }
        }
    }
    losses
}

/// The momentum encoder is made of buffers (no gradient, no optimizer slot) and its update is
/// exactly `m t + (1 - m) s` with `m` 0.9; returns how many tensors were checked.
pub(crate) fn check_ema(
    a: &Artifact,
    inputs: &HashMap<String, Tensor>,
    out: &HashMap<String, Tensor>,
) -> usize {
    let m = a.manifest();
    assert_eq!(m.input("ema.momentum").unwrap().default, Some(0.9));
    for e in &m.inputs {
        if e.name.starts_with("teacher.") {
            assert_eq!(e.role, InputRole::Buffer, "{}", e.name);
        }
        assert!(
            !e.name.starts_with("optim.") || !e.name.contains("teacher."),
            "{}",
            e.name
        );
    }
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
        assert!(err <= 2.0 * f32::EPSILON * scale, "{}: {err}", e.name);
        checked += 1;
    }
    checked
}

#[test]
fn positive_mask_equals_brute_force_in_original_coordinates() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let size = 224u32;
    let (s, stride) = (7usize, 32.0f64);
    let mut positives = 0;
    for case in 0..40 {
        let image = (rng.random_range(200..600), rng.random_range(200..600));
        let a = random_geometry(&mut rng, image, size);
        let b = random_geometry(&mut rng, image, size);
        let got = positive_mask_tensor(&[view(a), view(b)], size, 0.7).unwrap();
        let got = got.to_f32();
        assert_eq!(got.shape(), &[s * s, s * s]);
        let centre = |g: &ViewGeometry, cell: usize| {
            let (i, j) = (cell / s, cell % s);
            original_of(g, (j as f64 + 0.5) * stride, (i as f64 + 0.5) * stride)
        };
        let diag = |g: &ViewGeometry| {
            let (x0, y0) = original_of(g, 0.0, 0.0);
            let (x1, y1) = original_of(g, stride, stride);
            ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt()
        };
        let limit = 0.7 * diag(&a).max(diag(&b));
        for p in 0..s * s {
            for q in 0..s * s {
                let (pa, pb) = (centre(&a, p), centre(&b, q));
                let d = ((pa.0 - pb.0).powi(2) + (pa.1 - pb.1).powi(2)).sqrt();
                if (d / limit - 1.0).abs() < 1e-5 {
                    continue; // within float rounding of the threshold
                }
                let want = if d < limit { 1.0 } else { 0.0 };
                assert_eq!(got[[p, q]], want, "case {case}: cells {p}, {q}");
                positives += (d < limit) as usize;
            }
        }
    }
    assert!(
        positives > 100,
        "only {positives} positives: the test saw too few"
    );
    let e = positive_mask_tensor(&[view(ViewGeometry::identity((64, 64)))], 64, 0.7)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("2 views"), "{e}");
}

/// `y = PPM(x)` written out in f64 (`[n][channel][cell]`).
#[allow(clippy::needless_range_loop)] // index-by-index on purpose: a reference
fn ppm_reference(
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
    bias: &ArrayD<f32>,
    gamma: f64,
) -> Vec<Vec<Vec<f64>>> {
    let (n, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let s = h * wd;
    let mut out = vec![vec![vec![0.0; s]; c]; n];
    for b in 0..n {
        let xv = |ch: usize, k: usize| x[[b, ch, k / wd, k % wd]] as f64;
        // g(x_j) = W x_j + bias, normalised.
        let g: Vec<Vec<f64>> = (0..s)
            .map(|k| {
                let v: Vec<f64> = (0..c)
                    .map(|o| {
                        bias[[o]] as f64
                            + (0..c)
                                .map(|i| w[[o, i, 0, 0]] as f64 * xv(i, k))
                                .sum::<f64>()
                    })
                    .collect();
                let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
                v.iter().map(|a| a / norm).collect()
            })
            .collect();
        let norm = |k: usize| (0..c).map(|i| xv(i, k).powi(2)).sum::<f64>().sqrt();
        for i in 0..s {
            for j in 0..s {
                let cos = (0..c).map(|ch| xv(ch, i) * xv(ch, j)).sum::<f64>() / (norm(i) * norm(j));
                let a = cos.max(0.0).powf(gamma);
                for ch in 0..c {
                    out[b][ch][i] += a * g[j][ch];
                }
            }
        }
    }
    out
}

#[test]
fn ppm_and_loss_equal_a_direct_computation() {
    let (n, c, h, w) = (2usize, 3usize, 2usize, 2usize);
    let s = h * w;
    for gamma in [2.0, 3.0] {
        let mut b = GraphBuilder::new("t", 0);
        let map = || vec![n.into(), c.into(), h.into(), w.into()];
        let x0 = b.input("x0", DType::F32, map()).unwrap();
        let x1 = b.input("x1", DType::F32, map()).unwrap();
        let cells = || vec![n.into(), c.into(), s.into()];
        let k0 = b.input("k0", DType::F32, cells()).unwrap();
        let k1 = b.input("k1", DType::F32, cells()).unwrap();
        let mask = b
            .input("mask", DType::F32, vec![n.into(), s.into(), s.into()])
            .unwrap();
        let g = PpmTransform::init(&mut b, "ppm", c, 1).unwrap();
        let PpmTransform::Conv(conv) = &g else {
            panic!("one layer is a convolution")
        };
        let wv = b.initializer_value(conv.weight.name()).unwrap().to_f32();
        let bv = b
            .initializer_value(conv.bias.as_ref().unwrap().name())
            .unwrap()
            .to_f32();
        let mut mode = NormMode::train();
        let y0 = pixel_propagation(&mut b, &x0, &g, gamma, &mut mode).unwrap();
        let y1 = pixel_propagation(&mut b, &x1, &g, gamma, &mut mode).unwrap();
        let loss = pixpro_loss(&mut b, [&y0, &y1], [&k0, &k1], &mask).unwrap();
        b.output(&y0, "y0").unwrap();
        b.output(&loss, "loss").unwrap();
        // Hand-made: image 0 has three positive pairs, image 1 none (its loss is 0).
        let mut mv = ArrayD::zeros(vec![n, s, s]);
        mv[[0, 0, 0]] = 1.0;
        mv[[0, 1, 3]] = 1.0;
        mv[[0, 3, 2]] = 1.0;
        let (xv0, xv1) = (random(&[n, c, h, w], 21), random(&[n, c, h, w], 23));
        let (kv0, kv1) = (random(&[n, c, s], 22), random(&[n, c, s], 24));
        let out = run_graph(
            b,
            vec![
                ("x0", Tensor::F32(xv0.clone())),
                ("x1", Tensor::F32(xv1.clone())),
                ("k0", Tensor::F32(kv0.clone())),
                ("k1", Tensor::F32(kv1.clone())),
                ("mask", Tensor::F32(mv.clone())),
            ],
        );
        let (want_y0, want_y1) = (
            ppm_reference(&xv0, &wv, &bv, gamma),
            ppm_reference(&xv1, &wv, &bv, gamma),
        );
        let got_y = out["y0"].to_f32();
        for bi in 0..n {
            for ch in 0..c {
                for i in 0..s {
                    let (g, e) = (got_y[[bi, ch, i]] as f64, want_y0[bi][ch][i]);
                    assert!((g - e).abs() < 1e-5 * e.abs().max(1.0), "y {g} vs {e}");
                }
            }
        }
        let cos = |y: &Vec<Vec<f64>>, i: usize, k: &ArrayD<f32>, bi: usize, j: usize| {
            let dot: f64 = (0..c).map(|ch| y[ch][i] * k[[bi, ch, j]] as f64).sum();
            let ny = (0..c).map(|ch| y[ch][i].powi(2)).sum::<f64>().sqrt();
            let nk = (0..c)
                .map(|ch| (k[[bi, ch, j]] as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            dot / (ny * nk)
        };
        let mut want = 0.0;
        for bi in 0..n {
            let (mut l01, mut l10, mut count) = (0.0, 0.0, 0.0);
            for i in 0..s {
                for j in 0..s {
                    if mv[[bi, i, j]] == 0.0 {
                        continue;
                    }
                    // View 0's cell i and view 1's cell j are positive: both directions.
                    l01 -= cos(&want_y0[bi], i, &kv1, bi, j);
                    l10 -= cos(&want_y1[bi], j, &kv0, bi, i);
                    count += 1.0;
                }
            }
            want += (l01 + l10) / (count + 1e-6) / n as f64;
        }
        let got = out["loss"].to_f32().iter().next().copied().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "gamma {gamma}: {got} vs {want}");
        assert!(want.abs() > 0.01, "degenerate case");
    }
}

#[test]
fn momentum_encoder_gets_no_gradient_and_follows_the_student_by_ema() {
    let a = artifact("pixpro", &[("lr", "0.5")]);
    let c = ctx();
    let cells = 1; // c5 of 32-pixel views is 1x1
    let mut host = HashMap::new();
    host.insert(
        POSITIVE_MASK.to_string(),
        Tensor::F32(ArrayD::from_elem(vec![c.batch, cells, cells], 1.0)),
    );
    let (inputs, out) = run_step(&a, &host);
    assert!(check_ema(&a, &inputs, &out) > 20);
    // The student trained: its projector moved.
    let name = "head.projector.0.weight";
    assert!(inputs[name].to_f32() != out[&format!("{name}.next")].to_f32());
    let loss = out["loss"].to_f32().iter().next().copied().unwrap();
    assert!(loss.is_finite() && loss.abs() <= 2.0, "loss {loss}");
}

#[test]
fn schedule_ramps_the_momentum_from_its_base_to_one() {
    let m = create("pixpro", &[]).unwrap();
    let at = |step| {
        let s = m.schedule(step, 1000);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, "ema.momentum");
        s[0].1
    };
    assert!((at(0) - 0.99).abs() < 1e-12);
    assert!((at(500) - 0.995).abs() < 1e-12);
    // A quarter: 1 - 0.01 (cos(pi / 4) + 1) / 2.
    let quarter = 1.0 - 0.01 * ((std::f64::consts::FRAC_PI_4).cos() + 1.0) / 2.0;
    assert!((at(250) - quarter).abs() < 1e-12);
    assert!((at(1000) - 1.0).abs() < 1e-12);
    assert!((at(2000) - 1.0).abs() < 1e-12);
    let opt = m.optimizer(256).unwrap();
    assert_eq!(opt.name(), "lars");
    assert_eq!(m.settings().f64("lr"), 1.0);
    assert_eq!(m.settings().f64("weight_decay"), 1e-5);
    // The host input: one mask per sample, c5 cells by c5 cells (one cell at 32 px).
    let g = ViewGeometry::identity((32, 32));
    let host = m.host_inputs(&ctx(), &[view(g), view(g.flip())]).unwrap();
    assert_eq!(host.len(), 1);
    assert_eq!(host[0].0, POSITIVE_MASK);
    assert_eq!(host[0].1.to_f32(), ArrayD::from_elem(vec![1, 1], 1.0));
}

#[test]
fn two_batch_norm_passes_update_the_running_statistics_in_sequence() {
    let (n, c, h) = (3usize, 2usize, 2usize);
    let mut b = GraphBuilder::new("t", 0);
    let shape = || vec![n.into(), c.into(), h.into(), h.into()];
    let x0 = b.input("x0", DType::F32, shape()).unwrap();
    let x1 = b.input("x1", DType::F32, shape()).unwrap();
    let bn = crate::nn::BatchNorm2dConfig::new(c)
        .init(&mut b, "bn")
        .unwrap();
    let (mut m0, mut m1) = (NormMode::train(), NormMode::train());
    bn.forward_mode(&mut b, &x0, &mut m0).unwrap();
    bn.forward_mode(&mut b, &x1, &mut m1).unwrap();
    let state =
        crate::pretext::ops::chain_norm_state(&mut b, m0.into_state(), m1.into_state(), 0.1)
            .unwrap();
    assert_eq!(state.updates.len(), 2);
    for u in &state.updates {
        b.output(&u.next, &format!("{}.next", u.name)).unwrap();
    }
    let (v0, v1) = (random(&[n, c, h, h], 31), random(&[n, c, h, h], 32));
    let out = run_graph(
        b,
        vec![
            ("x0", Tensor::F32(v0.clone())),
            ("x1", Tensor::F32(v1.clone())),
        ],
    );
    // PyTorch: r <- 0.9 r + 0.1 stat, once per pass; running_mean starts at 0, var at 1.
    for ch in 0..c {
        let stats = |x: &ArrayD<f32>| {
            let v: Vec<f64> = x
                .indexed_iter()
                .filter(|(i, _)| i[1] == ch)
                .map(|(_, &a)| a as f64)
                .collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
            (mean, var)
        };
        let ((m0, s0), (m1, s1)) = (stats(&v0), stats(&v1));
        let mean = 0.9 * (0.9 * 0.0 + 0.1 * m0) + 0.1 * m1;
        let var = 0.9 * (0.9 * 1.0 + 0.1 * s0) + 0.1 * s1;
        let got_m = out["bn.running_mean.next"].to_f32()[[ch]] as f64;
        let got_v = out["bn.running_var.next"].to_f32()[[ch]] as f64;
        assert!((got_m - mean).abs() < 1e-6, "{got_m} vs {mean}");
        assert!((got_v - var).abs() < 1e-6, "{got_v} vs {var}");
    }
}

#[test]
fn a_few_steps_on_one_batch_lower_the_loss() {
    let a = artifact("pixpro", &[("lr", "4.0")]);
    let mut host = HashMap::new();
    host.insert(
        POSITIVE_MASK.to_string(),
        Tensor::F32(ArrayD::from_elem(vec![ctx().batch, 1, 1], 1.0)),
    );
    let losses = losses_over_steps(&a, &host, 8);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[7] < losses[0] - 0.05, "{losses:?}");
}
