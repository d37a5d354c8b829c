//! The segmenter's cross-entropy with ignore index: value against a host computation, gradient
//! against the closed form `(softmax - onehot) / valid_pixels` (zero on ignored pixels) and
//! against central finite differences, on tract; and the whole training graph's gradient of one
//! head parameter against finite differences.

use crate::common;

use densa::exporter::autodiff::{with_gradients, GradRequest};
use densa::exporter::{DType, Dim, GraphBuilder, Tensor};
use densa::models::segment::{cross_entropy, training_graph, SegmenterConfig};
use densa::models::Arch;
use ndarray::{ArrayD, IxDyn};

/// A small deterministic generator (SplitMix64) for test inputs.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next() as f32
    }
    /// A class in `0..classes`, or 255 with probability `ignore`.
    fn label(&mut self, classes: usize, ignore: f64) -> i64 {
        if self.next() < ignore {
            255
        } else {
            ((self.next() * classes as f64) as i64).min(classes as i64 - 1)
        }
    }
}

const C: usize = 3;
const SHAPE: [usize; 4] = [2, C, 4, 5];

fn loss_graph() -> densa::exporter::onnx::ModelProto {
    let mut b = GraphBuilder::new("ce", 0);
    let dims = |s: &[usize]| s.iter().map(|&d| Dim::from(d)).collect::<Vec<_>>();
    let logits = b.input("logits", DType::F32, dims(&SHAPE)).unwrap();
    let labels = b
        .input("labels", DType::I64, dims(&[SHAPE[0], SHAPE[2], SHAPE[3]]))
        .unwrap();
    let loss = cross_entropy(&mut b, &logits, &labels, C).unwrap();
    b.output(&loss, "loss").unwrap();
    let m = b.finish();
    with_gradients(&m, &GradRequest::new("loss", &["logits"])).unwrap()
}

fn run(
    model: &densa::exporter::onnx::ModelProto,
    logits: &ArrayD<f32>,
    labels: &ArrayD<i64>,
) -> (f64, ArrayD<f32>) {
    let backend = common::tract_backend();
    let mut s = backend.load_model(model, "ce").unwrap();
    let out = s
        .run(vec![
            ("logits".into(), Tensor::F32(logits.clone())),
            ("labels".into(), Tensor::I64(labels.clone())),
        ])
        .unwrap();
    let loss = out[0].1.to_f32().iter().next().copied().unwrap() as f64;
    (loss, out[1].1.to_f32())
}

/// Host reference: mean over valid pixels of `-log softmax[label]`, and its gradient.
fn reference(logits: &ArrayD<f32>, labels: &ArrayD<i64>) -> (f64, ArrayD<f64>) {
    let [n, c, h, w] = SHAPE;
    let mut grad = ArrayD::<f64>::zeros(IxDyn(&SHAPE));
    let mut total = 0.0;
    let mut count = 0usize;
    for i in 0..n {
        for y in 0..h {
            for x in 0..w {
                let label = labels[[i, y, x]];
                if !(0..c as i64).contains(&label) {
                    continue;
                }
                count += 1;
                let z: Vec<f64> = (0..c).map(|k| logits[[i, k, y, x]] as f64).collect();
                let m = z.iter().cloned().fold(f64::MIN, f64::max);
                let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                total += lse - z[label as usize];
                for k in 0..c {
                    grad[[i, k, y, x]] = (z[k] - lse).exp() - (k as i64 == label) as i32 as f64;
                }
            }
        }
    }
    let d = count.max(1) as f64;
    (total / d, grad.mapv(|g| g / d))
}

fn random_case(seed: u64, ignore_share: f64) -> (ArrayD<f32>, ArrayD<i64>) {
    let mut rng = Gen(seed);
    let logits = ArrayD::from_shape_fn(IxDyn(&SHAPE), |_| rng.uniform(-3.0, 3.0));
    let labels = ArrayD::from_shape_fn(IxDyn(&[SHAPE[0], SHAPE[2], SHAPE[3]]), |_| {
        rng.label(C, ignore_share)
    });
    (logits, labels)
}

#[test]
fn loss_and_gradient_skip_ignored_pixels() {
    let model = loss_graph();
    let (logits, labels) = random_case(7, 0.3);
    let ignored = labels.iter().filter(|&&l| l == 255).count();
    assert!(ignored > 3 && ignored < labels.len() - 3, "{ignored}");
    let (loss, grad) = run(&model, &logits, &labels);
    let (want, want_grad) = reference(&logits, &labels);
    assert!(
        (loss - want).abs() < 1e-5 * want.abs().max(1.0),
        "{loss} vs {want}"
    );
    let mut max_err = 0f64;
    for (g, w) in grad.iter().zip(want_grad.iter()) {
        max_err = max_err.max((*g as f64 - w).abs());
    }
    assert!(max_err < 1e-6, "closed-form gradient differs by {max_err}");
    // Ignored pixels get exactly zero gradient.
    for i in 0..SHAPE[0] {
        for y in 0..SHAPE[2] {
            for x in 0..SHAPE[3] {
                if labels[[i, y, x]] == 255 {
                    for k in 0..C {
                        assert_eq!(grad[[i, k, y, x]], 0.0);
                    }
                }
            }
        }
    }
    // Central finite differences on a few logits (f32 graph: step 1e-2).
    let eps = 1e-2f32;
    for flat in [0usize, 7, 19, 33, 58, 101] {
        let idx = IxDyn(&unravel(flat));
        let mut plus = logits.clone();
        plus[&idx] += eps;
        let mut minus = logits.clone();
        minus[&idx] -= eps;
        let fd =
            (run(&model, &plus, &labels).0 - run(&model, &minus, &labels).0) / (2.0 * eps as f64);
        let g = grad[&idx] as f64;
        assert!(
            (fd - g).abs() < 2e-4,
            "logit {flat}: autodiff {g}, finite difference {fd}"
        );
    }
}

fn unravel(mut flat: usize) -> Vec<usize> {
    let mut idx = vec![0; 4];
    for a in (0..4).rev() {
        idx[a] = flat % SHAPE[a];
        flat /= SHAPE[a];
    }
    idx
}

#[test]
fn an_all_ignored_batch_has_zero_loss_and_gradient() {
    let model = loss_graph();
    let (logits, _) = random_case(3, 0.0);
    let labels = ArrayD::from_elem(IxDyn(&[SHAPE[0], SHAPE[2], SHAPE[3]]), 255i64);
    let (loss, grad) = run(&model, &logits, &labels);
    assert_eq!(loss, 0.0);
    assert!(grad.iter().all(|&g| g == 0.0));
}

#[test]
fn training_graph_gradient_matches_finite_differences() {
    let config = SegmenterConfig {
        fpn_channels: 8,
        head_channels: 8,
        groups: 2,
        ..SegmenterConfig::new(Arch::Edge, 3)
    };
    let size = 32;
    let g = training_graph(&config, size, false, 1).unwrap();
    let param = "head.classifier.bias";
    let model = with_gradients(&g.model, &GradRequest::new("loss", &[param])).unwrap();
    let mut rng = Gen(5);
    let images = ArrayD::from_shape_fn(IxDyn(&[2, 3, size, size]), |_| rng.uniform(-1.0, 1.0));
    let labels = ArrayD::from_shape_fn(IxDyn(&[2, size, size]), |_| rng.label(3, 0.2));
    let backend = common::tract_backend();
    let bias0 = model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name == param)
        .map(|t| Tensor::from_proto(t).unwrap().to_f32())
        .unwrap();
    let eval = |bias: &ArrayD<f32>| {
        let mut m = model.clone();
        for t in m.graph.as_mut().unwrap().initializer.iter_mut() {
            if t.name == param {
                *t = Tensor::F32(bias.clone()).to_proto(param);
            }
        }
        let mut s = backend.load_model(&m, "train").unwrap();
        let out = s
            .run(vec![
                ("images".into(), Tensor::F32(images.clone())),
                ("labels".into(), Tensor::I64(labels.clone())),
            ])
            .unwrap();
        (out[0].1.to_f32()[IxDyn(&[])] as f64, out[1].1.to_f32())
    };
    let (_, grad) = eval(&bias0);
    let eps = 1e-2f32;
    for k in 0..3 {
        let mut plus = bias0.clone();
        plus[[k]] += eps;
        let mut minus = bias0.clone();
        minus[[k]] -= eps;
        let fd = (eval(&plus).0 - eval(&minus).0) / (2.0 * eps as f64);
        let a = grad[[k]] as f64;
        assert!(
            (fd - a).abs() < 1e-3,
            "bias {k}: autodiff {a}, finite difference {fd}"
        );
    }
}
