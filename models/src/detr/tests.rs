//! The DETR graph pieces against direct host computations (f64) on small hand-made cases:
//! the set criterion's value and its gradient (central finite differences of the host
//! reference), multi-head attention with a mask, the positional encoding, the detector's
//! interface.

use std::collections::HashMap;

use densa_exporter::autodiff::{with_gradients, GradRequest};
use densa_runtime::backend::tract::TractBackend;
use densa_runtime::backend::Backend;
use ndarray::{ArrayD, IxDyn};

use super::hungarian::tests::Rng;
use super::*;

fn run(model: &ModelProto, inputs: Vec<(String, Tensor)>) -> HashMap<String, Tensor> {
    let mut s = TractBackend::new().load_model(model, "test").unwrap();
    s.run(inputs).unwrap().into_iter().collect()
}

fn f32s(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

const N: usize = 2;
const Q: usize = 3;
const C: usize = 2;
const K: usize = C + 1;

/// The case: logits, predicted boxes, matched classes / boxes / mask, num_boxes.
struct Case {
    logits: Vec<f64>,
    boxes: Vec<f64>,
    classes: Vec<i64>,
    tboxes: Vec<f64>,
    mask: Vec<f64>,
    num_boxes: f64,
}

fn case() -> Case {
    let mut rng = Rng::new(3);
    let logits = (0..N * Q * K).map(|_| rng.next_f64() * 4.0 - 2.0).collect();
    let mut boxes = Vec::new();
    for _ in 0..N * Q {
        boxes.extend([
            0.3 + 0.4 * rng.next_f64(),
            0.3 + 0.4 * rng.next_f64(),
            0.1 + 0.3 * rng.next_f64(),
            0.1 + 0.3 * rng.next_f64(),
        ]);
    }
    // Image 0: queries 0 and 2 matched (classes 1, 0); image 1: query 1 (class 1).
    let classes = vec![1, 2, 0, 2, 1, 2];
    let mask = vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
    let tboxes = vec![
        0.5, 0.4, 0.3, 0.2, //
        0.5, 0.5, 1.0, 1.0, //
        0.35, 0.6, 0.2, 0.3, //
        0.5, 0.5, 1.0, 1.0, //
        0.6, 0.55, 0.25, 0.15, //
        0.5, 0.5, 1.0, 1.0,
    ];
    Case {
        logits,
        boxes,
        classes,
        tboxes,
        mask,
        num_boxes: 3.0,
    }
}

fn giou64(p: &[f64], t: &[f64]) -> f64 {
    let xy = |b: &[f64]| {
        [
            b[0] - b[2] / 2.0,
            b[1] - b[3] / 2.0,
            b[0] + b[2] / 2.0,
            b[1] + b[3] / 2.0,
        ]
    };
    let (a, b) = (xy(p), xy(t));
    let area = |x: [f64; 4]| (x[2] - x[0]) * (x[3] - x[1]);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    let enclose = (a[2].max(b[2]) - a[0].min(b[0])) * (a[3].max(b[3]) - a[1].min(b[1]));
    inter / union - (enclose - union) / enclose
}

/// Host reference of the set criterion: `[total, ce, bbox, giou]`.
fn reference(c: &Case, logits: &[f64], boxes: &[f64], cfg: &LossConfig) -> [f64; 4] {
    let (mut wnll, mut wsum, mut l1, mut g) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..N * Q {
        let row = &logits[i * K..(i + 1) * K];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        let cls = c.classes[i] as usize;
        let w = if cls == C { cfg.eos_coef as f64 } else { 1.0 };
        wnll += w * (lse - row[cls]);
        wsum += w;
        if c.mask[i] > 0.0 {
            let p = &boxes[i * 4..i * 4 + 4];
            let t = &c.tboxes[i * 4..i * 4 + 4];
            l1 += p.iter().zip(t).map(|(a, b)| (a - b).abs()).sum::<f64>();
            g += 1.0 - giou64(p, t);
        }
    }
    let ce = wnll / wsum;
    let bbox = l1 / c.num_boxes;
    let giou = g / c.num_boxes;
    let total =
        cfg.weight_ce as f64 * ce + cfg.weight_bbox as f64 * bbox + cfg.weight_giou as f64 * giou;
    [total, ce, bbox, giou]
}

/// The loss graph (outputs `loss`, `ce`, `bbox`, `giou`) and its gradient graph (`loss`,
/// `grad.logits`, `grad.boxes`); `logits` are `[N, Q, cfg.class.outputs(C)]`.
fn loss_model(cfg: &LossConfig) -> (ModelProto, ModelProto) {
    let mut b = GraphBuilder::new("set-loss", 0);
    let d = |s: &[usize]| s.iter().map(|&x| Dim::from(x)).collect::<Vec<_>>();
    let k = cfg.class.outputs(C);
    let logits = b.input("logits", DType::F32, d(&[N, Q, k])).unwrap();
    let boxes = b.input("boxes", DType::F32, d(&[N, Q, 4])).unwrap();
    let targets = LayerTargets {
        classes: b.input("classes", DType::I64, d(&[N, Q])).unwrap(),
        boxes: b.input("tboxes", DType::F32, d(&[N, Q, 4])).unwrap(),
        mask: b.input("mask", DType::F32, d(&[N, Q])).unwrap(),
    };
    let num = b.input("num_boxes", DType::F32, vec![]).unwrap();
    let l = loss::set_loss(&mut b, &logits, &boxes, &targets, &num, C, cfg).unwrap();
    b.output(&l.total, "loss").unwrap();
    b.output(&l.ce, "ce").unwrap();
    b.output(&l.bbox, "bbox").unwrap();
    b.output(&l.giou, "giou").unwrap();
    let m = b.finish();
    let g = with_gradients(&m, &GradRequest::new("loss", &["logits", "boxes"])).unwrap();
    (m, g)
}

fn feed(c: &Case) -> Vec<(String, Tensor)> {
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    vec![
        ("logits".into(), f32s(&[N, Q, K], f(&c.logits))),
        ("boxes".into(), f32s(&[N, Q, 4], f(&c.boxes))),
        (
            "classes".into(),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[N, Q]), c.classes.clone()).unwrap()),
        ),
        ("tboxes".into(), f32s(&[N, Q, 4], f(&c.tboxes))),
        ("mask".into(), f32s(&[N, Q], f(&c.mask))),
        (
            "num_boxes".into(),
            Tensor::F32(ArrayD::from_elem(IxDyn(&[]), c.num_boxes as f32)),
        ),
    ]
}

#[test]
fn set_loss_and_its_gradient_equal_a_direct_computation() {
    let cfg = LossConfig::default();
    let c = case();
    let (plain, with_grads) = loss_model(&cfg);
    let mut out = run(&plain, feed(&c));
    out.extend(run(&with_grads, feed(&c)));
    let want = reference(&c, &c.logits, &c.boxes, &cfg);
    for (name, w) in ["loss", "ce", "bbox", "giou"].iter().zip(want) {
        let got = out[*name].to_f32().iter().next().copied().unwrap() as f64;
        assert!(
            (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{name}: graph {got}, host {w}"
        );
    }
    // The terms are all active: a loss that ignored the mask or the weights would differ.
    assert!(want[2] > 0.05 && want[3] > 0.1, "{want:?}");
    // Gradient vs central finite differences of the host reference.
    let eps = 1e-6;
    for (input, grad_name, values) in [
        ("logits", "grad.logits", &c.logits),
        ("boxes", "grad.boxes", &c.boxes),
    ] {
        let g = out
            .get(grad_name)
            .unwrap_or_else(|| panic!("no `{grad_name}` in {:?}", out.keys()))
            .to_f32();
        for (k, &gk) in g.iter().enumerate() {
            let at = |d: f64| {
                let mut v = values.clone();
                v[k] += d;
                if input == "logits" {
                    reference(&c, &v, &c.boxes, &cfg)[0]
                } else {
                    reference(&c, &c.logits, &v, &cfg)[0]
                }
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (gk as f64 - fd).abs() <= 1e-4 + 1e-3 * fd.abs(),
                "{input}[{k}]: graph {gk}, finite differences {fd}"
            );
        }
    }
    // Unmatched queries get no box gradient; their class gradient pushes to "no object".
    let gb = out["grad.boxes"].to_f32();
    assert!(gb.as_slice().unwrap()[4..8].iter().all(|&v| v == 0.0));
}

/// Host multi-head attention in f64 with the builder's parameter values.
#[allow(clippy::too_many_arguments)]
fn attention_reference(
    params: &HashMap<String, Vec<f32>>,
    q_in: &[f32],
    k_in: &[f32],
    v_in: &[f32],
    mask: &[f32],
    (n, tq, tk, d, h): (usize, usize, usize, usize, usize),
) -> Vec<f64> {
    let lin = |name: &str, x: &[f32], t: usize| -> Vec<f64> {
        let w = &params[&format!("{name}.weight")];
        let bias = &params[&format!("{name}.bias")];
        let mut y = vec![0.0; n * t * d];
        for r in 0..n * t {
            for o in 0..d {
                let mut s = bias[o] as f64;
                for i in 0..d {
                    s += w[o * d + i] as f64 * x[r * d + i] as f64;
                }
                y[r * d + o] = s;
            }
        }
        y
    };
    let q = lin("attn.q_proj", q_in, tq);
    let k = lin("attn.k_proj", k_in, tk);
    let v = lin("attn.v_proj", v_in, tk);
    let dh = d / h;
    let mut heads = vec![0.0; n * tq * d];
    for b in 0..n {
        for hh in 0..h {
            for i in 0..tq {
                let logits: Vec<f64> = (0..tk)
                    .map(|j| {
                        let dot: f64 = (0..dh)
                            .map(|e| {
                                q[(b * tq + i) * d + hh * dh + e]
                                    * k[(b * tk + j) * d + hh * dh + e]
                            })
                            .sum();
                        dot / (dh as f64).sqrt() + mask[i * tk + j] as f64
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
                let s: f64 = e.iter().sum();
                for f in 0..dh {
                    heads[(b * tq + i) * d + hh * dh + f] = (0..tk)
                        .map(|j| e[j] / s * v[(b * tk + j) * d + hh * dh + f])
                        .sum();
                }
            }
        }
    }
    let heads32: Vec<f32> = heads.iter().map(|&x| x as f32).collect();
    // out_proj on the f64 values (rounded once to f32 is below the tolerance).
    lin("attn.out_proj", &heads32, tq)
}

#[test]
fn multi_head_attention_with_a_mask_equals_a_direct_computation() {
    let (n, tq, tk, d, h) = (2, 3, 4, 8, 2);
    let mut b = GraphBuilder::new("mha", 11);
    let dims = |s: &[usize]| s.iter().map(|&x| Dim::from(x)).collect::<Vec<_>>();
    let qv = b.input("q", DType::F32, dims(&[n, tq, d])).unwrap();
    let kv = b.input("k", DType::F32, dims(&[n, tk, d])).unwrap();
    let vv = b.input("v", DType::F32, dims(&[n, tk, d])).unwrap();
    let mv = b.input("mask", DType::F32, dims(&[tq, tk])).unwrap();
    let attn = transformer::MultiHeadAttention::new(&mut b, "attn", d, h).unwrap();
    let y = attn.forward(&mut b, &qv, &kv, &vv, Some(&mv)).unwrap();
    b.output(&y, "y").unwrap();
    let params: HashMap<String, Vec<f32>> = b
        .params()
        .iter()
        .filter(|p| p.kind == ParamKind::Param)
        .map(|p| {
            let t = b.initializer_value(&p.name).unwrap().to_f32();
            (p.name.clone(), t.iter().copied().collect())
        })
        .collect();
    assert_eq!(params.len(), 8);
    let model = b.finish();
    let mut rng = Rng::new(5);
    let mut draw = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
            .collect()
    };
    let (q, k, v) = (draw(n * tq * d), draw(n * tk * d), draw(n * tk * d));
    // Block pattern: query 0 sees keys 0-1 only, the others every key.
    let mut mask = vec![0.0f32; tq * tk];
    mask[2] = -1e9;
    mask[3] = -1e9;
    let out = run(
        &model,
        vec![
            ("q".into(), f32s(&[n, tq, d], q.clone())),
            ("k".into(), f32s(&[n, tk, d], k.clone())),
            ("v".into(), f32s(&[n, tk, d], v.clone())),
            ("mask".into(), f32s(&[tq, tk], mask.clone())),
        ],
    );
    let got = out["y"].to_f32();
    let want = attention_reference(&params, &q, &k, &v, &mask, (n, tq, tk, d, h));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((*g as f64 - w).abs() < 1e-5, "y[{i}]: graph {g}, host {w}");
    }
    // The mask matters: keys 2-3 hidden from query 0 change its output.
    let unmasked = attention_reference(&params, &q, &k, &v, &[0.0; 12], (n, tq, tk, d, h));
    assert!((0..d).any(|i| (unmasked[i] - want[i]).abs() > 1e-3));
}

#[test]
fn sine_position_encoding_follows_detr() {
    let (h, w, d) = (2, 3, 8);
    let pe = transformer::sine_position_encoding(h, w, d, 10000.0).to_f32();
    assert_eq!(pe.shape(), &[6, 8]);
    let two_pi = 2.0 * std::f64::consts::PI;
    // Token (row 1, col 2) = index 5: y = 2 / 2 * 2π, x = 3 / 3 * 2π (up to eps).
    let y = 2.0 / (2.0 + 1e-6) * two_pi;
    let x = 3.0 / (3.0 + 1e-6) * two_pi;
    let f1 = 10000f64.powf(2.0 / 4.0);
    let row = pe.index_axis(ndarray::Axis(0), 5);
    let expect = [
        y.sin(),
        y.cos(),
        (y / f1).sin(),
        (y / f1).cos(),
        x.sin(),
        x.cos(),
        (x / f1).sin(),
        (x / f1).cos(),
    ];
    for (i, e) in expect.iter().enumerate() {
        assert!(
            (row[i] as f64 - e).abs() < 1e-5,
            "channel {i}: {} vs {e}",
            row[i]
        );
    }
}

fn tiny() -> DetrConfig {
    let mut c = DetrConfig::new(Arch::Edge, vec!["disk".into(), "square".into()]);
    c.image_size = 64;
    c.d_model = 16;
    c.heads = 2;
    c.encoder_layers = 1;
    c.decoder_layers = 2;
    c.ffn_dim = 32;
    c.num_queries = 5;
    c
}

#[test]
fn config_checks_and_sizes() {
    let c = tiny();
    assert_eq!(c.feature_size(), 2);
    assert_eq!(c.tokens(), 4);
    let mut c4 = tiny();
    c4.feature_stride = 16;
    assert_eq!(c4.tokens(), 16);
    let s4 = c4.initial_state(0).unwrap();
    assert_eq!(
        s4.get("input_proj.weight").unwrap().shape(),
        &[16, 64, 1, 1]
    );
    c4.feature_stride = 8;
    let e = c4.initial_state(0).unwrap_err().to_string();
    assert!(e.contains("feature_stride"), "{e}");
    let mut bad = tiny();
    bad.heads = 3;
    let e = bad.initial_state(0).unwrap_err().to_string();
    assert!(e.contains("heads"), "{e}");
    let mut bad = tiny();
    bad.arch = "vgg".into();
    assert!(bad
        .initial_state(0)
        .unwrap_err()
        .to_string()
        .contains("vgg"));
    let s = c.initial_state(0).unwrap();
    for name in [
        "conv1.weight",
        "input_proj.weight",
        "transformer.encoder.layers.0.self_attn.q_proj.weight",
        "transformer.decoder.layers.1.cross_attn.out_proj.bias",
        "transformer.decoder.norm.weight",
        "query_embed.weight",
        "class_embed.weight",
        "bbox_embed.layers.2.bias",
    ] {
        assert!(s.get(name).is_some(), "no `{name}`");
    }
    assert_eq!(s.get("class_embed.weight").unwrap().shape(), &[3, 16]);
}

#[test]
fn inference_graph_gives_top_k_boxes_in_pixels() {
    let c = tiny();
    let model = c
        .inference_graph(None, 3, &[("densa.input_size", "64")])
        .unwrap();
    let meta: HashMap<&str, &str> = model
        .metadata_props
        .iter()
        .map(|p| (p.key.as_str(), p.value.as_str()))
        .collect();
    assert_eq!(meta["densa.task"], "detect");
    assert_eq!(meta["densa.classes"], "disk,square");
    let mut rng = Rng::new(9);
    let x: Vec<f32> = (0..2 * 3 * 64 * 64)
        .map(|_| rng.next_f64() as f32)
        .collect();
    let out = run(&model, vec![("images".into(), f32s(&[2, 3, 64, 64], x))]);
    let boxes = out["boxes"].to_f32();
    let scores = out["scores"].to_f32();
    assert_eq!(boxes.shape(), &[2, 3, 4]);
    assert_eq!(scores.shape(), &[2, 3]);
    assert!(boxes.iter().all(|&v| (0.0..=64.0).contains(&v)));
    for n in 0..2 {
        for k in 0..3 {
            assert!(boxes[[n, k, 2]] >= boxes[[n, k, 0]] && boxes[[n, k, 3]] >= boxes[[n, k, 1]]);
            assert!(scores[[n, k]] > 0.0 && scores[[n, k]] < 1.0);
            if k > 0 {
                assert!(scores[[n, k]] <= scores[[n, k - 1]]);
            }
        }
    }
    let labels = match &out["labels"] {
        Tensor::I64(a) => a.clone(),
        other => panic!("labels are {:?}", other.dtype()),
    };
    assert!(labels.iter().all(|&l| l == 0 || l == 1));
}

/// Fixed matched targets for the tiny config (2 images, 5 queries, 2 classes).
fn training_inputs(c: &DetrConfig) -> Vec<(String, Tensor)> {
    let q = c.num_queries;
    let mut rng = Rng::new(21);
    let x: Vec<f32> = (0..2 * 3 * 64 * 64)
        .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
        .collect();
    let mut inputs = vec![(names::IMAGES.to_string(), f32s(&[2, 3, 64, 64], x))];
    for l in 0..c.decoder_layers {
        // Image 0: query l -> class 0, query 3 -> class 1; image 1: query 1 -> class 1.
        let mut classes = vec![2i64; 2 * q];
        let mut mask = vec![0f32; 2 * q];
        let mut boxes = vec![0.5f32; 2 * q * 4];
        for (slot, class, bx) in [
            (l, 0, [0.3, 0.3, 0.2, 0.25]),
            (3, 1, [0.7, 0.6, 0.3, 0.2]),
            (q + 1, 1, [0.5, 0.45, 0.4, 0.3]),
        ] {
            classes[slot] = class;
            mask[slot] = 1.0;
            boxes[slot * 4..slot * 4 + 4].copy_from_slice(&bx);
        }
        inputs.push((
            names::classes(l),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2, q]), classes).unwrap()),
        ));
        inputs.push((names::boxes(l), f32s(&[2, q, 4], boxes)));
        inputs.push((names::mask(l), f32s(&[2, q], mask)));
    }
    inputs.push((
        names::NUM_BOXES.to_string(),
        Tensor::F32(ArrayD::from_elem(IxDyn(&[]), 3.0)),
    ));
    inputs
}

#[test]
fn whole_training_graph_gradients_match_finite_differences() {
    let mut c = tiny();
    c.train_batch_norm = false;
    let (mut b, t) = c.training_forward(0, Some(2)).unwrap();
    b.output(&t.loss, names::LOSS).unwrap();
    let model = b.finish();
    let wrt = [
        "class_embed.bias",
        "bbox_embed.layers.2.bias",
        "query_embed.weight",
        "transformer.decoder.layers.0.cross_attn.q_proj.bias",
        "transformer.encoder.layers.0.norm1.weight",
        "input_proj.bias",
    ];
    let train = with_gradients(&model, &GradRequest::new(names::LOSS, &wrt)).unwrap();
    let inputs = training_inputs(&c);
    let out = run(&train, inputs.clone());
    let loss = out[names::LOSS].to_f32().iter().next().copied().unwrap() as f64;
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
    let init = model.graph.as_ref().unwrap();
    let mut checked = 0;
    for name in wrt {
        let grad = out[&format!("grad.{name}")].to_f32();
        let value = init
            .initializer
            .iter()
            .find(|t| t.name == name)
            .map(|t| Tensor::from_proto(t).unwrap().to_f32())
            .unwrap();
        // The parameter becomes a graph input, so one loaded model serves every perturbation.
        let mut m = model.clone();
        let g = m.graph.as_mut().unwrap();
        let pos = g.initializer.iter().position(|t| t.name == name).unwrap();
        g.initializer.remove(pos);
        g.input.push(densa_exporter::onnx::ValueInfoProto {
            name: name.to_string(),
            r#type: Some(densa_exporter::builder::tensor_type(
                DType::F32,
                &value
                    .shape()
                    .iter()
                    .map(|&d| Dim::from(d))
                    .collect::<Vec<_>>(),
            )),
            ..Default::default()
        });
        // tract refuses a node named like the prefix of an input (`input_proj` and
        // `input_proj.bias`); node names carry no meaning.
        for (i, n) in g.node.iter_mut().enumerate() {
            n.name = format!("node{i}");
        }
        let mut session = TractBackend::new().load_model(&m, "fd").unwrap();
        for k in [0, 1, value.len() - 1] {
            let eps = 3e-3f32;
            let mut at = |delta: f32| {
                let mut v = value.clone();
                v.as_slice_mut().unwrap()[k] += delta;
                let mut feed = inputs.clone();
                feed.push((name.to_string(), Tensor::F32(v)));
                let out = session.run(feed).unwrap();
                out[0].1.to_f32().iter().next().copied().unwrap() as f64
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let ad = grad.as_slice().unwrap()[k] as f64;
            assert!(
                (ad - fd).abs() <= 2e-3 + 2e-2 * fd.abs(),
                "{name}[{k}]: autodiff {ad}, finite differences {fd}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 18);
}

const E: usize = 3;

/// Host reference of the embedding loss (f64).
fn embedding_reference(
    pred: &[f64],
    target: &[f64],
    mask: &[f64],
    num_boxes: f64,
    kind: EmbeddingLoss,
) -> f64 {
    let norm = |v: &[f64]| {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        v.iter().map(|x| x / n).collect::<Vec<_>>()
    };
    let mut sum = 0.0;
    for i in 0..N * Q {
        if mask[i] == 0.0 {
            continue;
        }
        let (p, t) = (&pred[i * E..(i + 1) * E], &target[i * E..(i + 1) * E]);
        sum += match kind {
            EmbeddingLoss::L1 => {
                p.iter().zip(t).map(|(a, b)| (a - b).abs()).sum::<f64>() / E as f64
            }
            EmbeddingLoss::NormalizedSquared => norm(p)
                .iter()
                .zip(norm(t))
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>(),
        };
    }
    sum / num_boxes
}

#[test]
fn embedding_losses_and_their_gradients_equal_a_direct_computation() {
    let mut rng = Rng::new(11);
    let pred: Vec<f64> = (0..N * Q * E).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
    // Matched rows hold vectors, unmatched rows zeros (as `query_embeddings` lays them out).
    let mask = case().mask;
    let target: Vec<f64> = (0..N * Q * E)
        .map(|i| {
            if mask[i / E] > 0.0 {
                rng.next_f64() * 4.0 - 2.0
            } else {
                0.0
            }
        })
        .collect();
    let num_boxes = 3.0;
    for kind in [EmbeddingLoss::L1, EmbeddingLoss::NormalizedSquared] {
        let mut b = GraphBuilder::new("embedding-loss", 0);
        let d = |s: &[usize]| s.iter().map(|&x| Dim::from(x)).collect::<Vec<_>>();
        let p = b.input("pred", DType::F32, d(&[N, Q, E])).unwrap();
        let t = b.input("target", DType::F32, d(&[N, Q, E])).unwrap();
        let m = b.input("mask", DType::F32, d(&[N, Q])).unwrap();
        let num = b.input("num_boxes", DType::F32, vec![]).unwrap();
        let l = loss::embedding_loss(&mut b, &p, &t, &m, &num, kind).unwrap();
        b.output(&l, "loss").unwrap();
        let model = with_gradients(&b.finish(), &GradRequest::new("loss", &["pred"])).unwrap();
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        let out = run(
            &model,
            vec![
                ("pred".into(), f32s(&[N, Q, E], f(&pred))),
                ("target".into(), f32s(&[N, Q, E], f(&target))),
                ("mask".into(), f32s(&[N, Q], f(&mask))),
                (
                    "num_boxes".into(),
                    Tensor::F32(ArrayD::from_elem(IxDyn(&[]), num_boxes as f32)),
                ),
            ],
        );
        let got = out["loss"].to_f32().iter().next().copied().unwrap() as f64;
        let want = embedding_reference(&pred, &target, &mask, num_boxes, kind);
        assert!(
            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "{kind:?}: graph {got}, host {want}"
        );
        assert!(want > 0.1, "{kind:?}: {want}");
        let g = out["grad.pred"].to_f32();
        let eps = 1e-6;
        for (k, &gk) in g.iter().enumerate() {
            let at = |dx: f64| {
                let mut v = pred.clone();
                v[k] += dx;
                embedding_reference(&v, &target, &mask, num_boxes, kind)
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (gk as f64 - fd).abs() <= 1e-4 + 1e-3 * fd.abs(),
                "{kind:?} pred[{k}]: graph {gk}, finite differences {fd}"
            );
            if mask[k / E] == 0.0 {
                assert_eq!(gk, 0.0, "unmatched query {} got a gradient", k / E);
            }
        }
    }
}

#[test]
fn the_embedding_head_adds_its_inputs_loss_and_parameters() {
    let mut c = tiny();
    c.embedding = Some(EmbeddingConfig::detreg(7));
    let s = c.initial_state(0).unwrap();
    assert_eq!(
        s.get("feature_embed.layers.2.weight").unwrap().shape(),
        &[7, 16]
    );
    assert!(s.get("feature_embed.layers.0.weight").is_some());
    // DetReg's head: the last of the two decoder layers only.
    let (b, t) = c.training_forward(0, Some(2)).unwrap();
    assert_eq!(t.embedding_losses.len(), 1);
    assert_eq!(t.embedding_losses[0].0, 1);
    assert!(t.host_inputs.contains(&"targets.1.embeddings".to_string()));
    assert!(!t.host_inputs.contains(&"targets.0.embeddings".to_string()));
    let inputs = |m: &ModelProto| -> Vec<String> {
        m.graph
            .as_ref()
            .unwrap()
            .input
            .iter()
            .map(|i| i.name.clone())
            .collect()
    };
    let model = b.finish();
    assert!(inputs(&model).contains(&"targets.1.embeddings".to_string()));
    assert!(!inputs(&model).contains(&"targets.0.embeddings".to_string()));
    // Every layer (UP-DETR's).
    c.embedding = Some(EmbeddingConfig {
        last_layer_only: false,
        ..EmbeddingConfig::detreg(7)
    });
    let (b, t) = c.training_forward(0, Some(2)).unwrap();
    assert_eq!(
        t.embedding_losses.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert!(inputs(&b.finish()).contains(&"targets.0.embeddings".to_string()));
    // Without the head, nothing changes.
    let plain = tiny().initial_state(0).unwrap();
    assert!(plain.get("feature_embed.layers.0.weight").is_none());
    // A bad head is refused by name.
    c.embedding = Some(EmbeddingConfig {
        dim: 0,
        ..EmbeddingConfig::detreg(1)
    });
    let e = c.initial_state(0).unwrap_err().to_string();
    assert!(e.contains("embedding"), "{e}");
}

/// Host reference of the sigmoid focal class loss over `[N, Q, C]` logits (no "no object"
/// column): the sum over queries and classes of `a_t (1 - p_t)^gamma BCE`, / `num_boxes`.
fn focal_reference(logits: &[f64], classes: &[i64], num_boxes: f64, alpha: f64, gamma: f64) -> f64 {
    let mut sum = 0.0;
    for (i, &x) in logits.iter().enumerate() {
        let t = if classes[i / C] == (i % C) as i64 {
            1.0
        } else {
            0.0
        };
        let p = 1.0 / (1.0 + (-x).exp());
        let bce = -(t * p.ln() + (1.0 - t) * (1.0 - p).ln());
        let p_t = p * t + (1.0 - p) * (1.0 - t);
        let a_t = alpha * t + (1.0 - alpha) * (1.0 - t);
        sum += a_t * (1.0 - p_t).powf(gamma) * bce;
    }
    sum / num_boxes
}

#[test]
fn focal_set_loss_and_its_gradient_equal_a_direct_computation() {
    let cfg = LossConfig::deformable();
    assert_eq!(cfg.class.outputs(C), C);
    let c = case();
    // C logits per query: drop the case's "no object" column.
    let logits: Vec<f64> = c
        .logits
        .chunks(K)
        .flat_map(|r| r[..C].iter().copied())
        .collect();
    let (plain, model) = loss_model(&cfg);
    let mut inputs = feed(&c);
    inputs[0] = (
        "logits".into(),
        f32s(&[N, Q, C], logits.iter().map(|&x| x as f32).collect()),
    );
    let mut out = run(&plain, inputs.clone());
    out.extend(run(&model, inputs));
    let want_ce = focal_reference(&logits, &c.classes, c.num_boxes, 0.25, 2.0);
    let [_, _, bbox, giou] = reference(&c, &c.logits, &c.boxes, &LossConfig::default());
    let want = 2.0 * want_ce + 5.0 * bbox + 2.0 * giou;
    for (name, w) in [("ce", want_ce), ("loss", want)] {
        let got = out[name].to_f32().iter().next().copied().unwrap() as f64;
        assert!(
            (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{name}: graph {got}, host {w}"
        );
    }
    assert!(want_ce > 0.05, "{want_ce}");
    // A plain BCE (gamma 0, alpha 1/2 x 2) would differ: the modulator is active.
    let bce = focal_reference(&logits, &c.classes, c.num_boxes, 0.5, 0.0) * 2.0;
    assert!((bce - want_ce).abs() > 0.1 * want_ce, "{bce} vs {want_ce}");
    let g = out["grad.logits"].to_f32();
    let eps = 1e-6;
    for (k, &gk) in g.iter().enumerate() {
        let at = |dx: f64| {
            let mut v = logits.clone();
            v[k] += dx;
            2.0 * focal_reference(&v, &c.classes, c.num_boxes, 0.25, 2.0)
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (gk as f64 - fd).abs() <= 1e-4 + 1e-3 * fd.abs(),
            "logits[{k}]: graph {gk}, finite differences {fd}"
        );
    }
    // Saturated logits stay finite (the stable BCE form), value and gradient.
    let mut inputs = feed(&c);
    inputs[0] = (
        "logits".into(),
        f32s(
            &[N, Q, C],
            (0..N * Q * C)
                .map(|i| if i % 2 == 0 { 120.0 } else { -120.0 })
                .collect(),
        ),
    );
    let out = run(&model, inputs);
    assert!(out["loss"].to_f32().iter().all(|v| v.is_finite()));
    assert!(out["grad.logits"].to_f32().iter().all(|v| v.is_finite()));
}

#[test]
fn focal_matching_cost_equals_a_direct_computation() {
    use super::matcher::cost_matrix;
    // Two queries, two classes (sigmoid logits), one target of class 1.
    let logits = [0.3f32, -1.2, 2.0, 0.5];
    let boxes = [0.5f32, 0.5, 0.2, 0.2, 0.6, 0.5, 0.2, 0.2];
    let targets = ImageTargets {
        boxes: vec![[0.5, 0.5, 0.2, 0.2]],
        labels: vec![1],
        ..Default::default()
    };
    let cfg = MatcherConfig::default();
    let cost = cost_matrix(&cfg, &ClassLoss::FOCAL, &logits, &boxes, 2, 2, &targets).unwrap();
    let focal = |x: f64| {
        let p = 1.0 / (1.0 + (-x).exp());
        let pos = 0.25 * (1.0 - p).powi(2) * -(p + 1e-8).ln();
        let neg = 0.75 * p.powi(2) * -(1.0 - p + 1e-8).ln();
        pos - neg
    };
    // Query 0: the same box (L1 0, GIoU 1); query 1: shifted by 0.1 in x.
    let c0 = 2.0 * focal(-1.2) - 2.0;
    let (inter, union) = (0.1 * 0.2, 0.08 - 0.1 * 0.2);
    let g1 = inter / union - (0.3 * 0.2 - union) / (0.3 * 0.2);
    let c1 = 2.0 * focal(0.5) + 5.0 * 0.1 - 2.0 * g1;
    for (got, want) in cost.iter().zip([c0, c1]) {
        assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }
    // The softmax cost needs `classes + 1` logits per query: a focal row is refused by it.
    assert!(cost_matrix(&cfg, &ClassLoss::Softmax, &logits, &boxes, 2, 2, &targets).is_err());
}

#[test]
fn a_focal_head_has_one_logit_per_class_a_prior_bias_and_sigmoid_scores() {
    let mut c = tiny();
    c.loss = LossConfig::deformable();
    let s = c.initial_state(0).unwrap();
    let bias = s.get("class_embed.bias").unwrap().to_f32();
    assert_eq!(bias.shape(), &[c.num_classes()]);
    let prior = -(0.99f32 / 0.01).ln();
    assert!(bias.iter().all(|&v| (v - prior).abs() < 1e-6), "{bias:?}");
    // Inference scores are the sigmoid of the best class logit: with the prior bias and a
    // zero class weight, every score is 0.01.
    let mut state = s.clone();
    let w = state.get("class_embed.weight").unwrap().to_f32();
    state.insert("class_embed.weight", Tensor::F32(ArrayD::zeros(w.shape())));
    let model = c.inference_graph(Some(&state), 5, &[]).unwrap();
    let side = c.image_size as usize;
    let out = run(
        &model,
        vec![(
            "images".into(),
            Tensor::F32(ArrayD::zeros(IxDyn(&[1, 3, side, side]))),
        )],
    );
    let scores = out["scores"].to_f32();
    assert!(
        scores.iter().all(|&p| (p - 0.01).abs() < 1e-5),
        "{scores:?}"
    );
}
