//! The detector's loss graph (focal + GIoU + centerness BCE, in ONNX ops) against a host
//! reference, and its gradients (densa's autodiff) against central finite differences, on
//! tract; the same graph agrees on ONNX Runtime.

use crate::common;

use common::*;
use densa::exporter::autodiff::{with_gradients, GradRequest};
use densa::exporter::Tensor;
use densa::models::detect::{names, DetectorConfig};
use densa::models::Arch;
use ndarray::ArrayD;

fn config() -> DetectorConfig {
    let mut c = DetectorConfig::new(Arch::Edge, vec!["a".into(), "b".into()]);
    c.image_size = 32;
    c.channels = 16;
    c.gn_groups = 4;
    c.head_convs = 1;
    c.scale_bounds = [16.0, 32.0];
    c
}

fn batch(c: &DetectorConfig) -> Vec<(String, Tensor)> {
    let a = c.assigner();
    let t1 = a.assign(&[([2.0, 3.0, 14.0, 13.0], 0), ([10.0, 8.0, 30.0, 31.0], 1)]);
    let t2 = a.assign(&[([2.0, 2.0, 14.0, 22.0], 1)]);
    assert!(t1.positives() > 0 && t2.positives() > 0);
    let l = a.locations();
    let cat = |x: &[f32], y: &[f32], shape: Vec<usize>| {
        Tensor::F32(ArrayD::from_shape_vec(shape, [x, y].concat()).unwrap())
    };
    let mut img = ArrayD::<f32>::zeros(vec![2, 3, 32, 32]);
    for (i, v) in img.iter_mut().enumerate() {
        *v = ((i * 37 % 101) as f32 / 50.0) - 1.0;
    }
    vec![
        (names::IMAGES.into(), Tensor::F32(img)),
        (names::CLS.into(), cat(&t1.cls, &t2.cls, vec![2, l, 2])),
        (names::REG.into(), cat(&t1.reg, &t2.reg, vec![2, l, 4])),
        (names::CTR.into(), cat(&t1.ctr, &t2.ctr, vec![2, l])),
        (names::POS.into(), cat(&t1.pos, &t2.pos, vec![2, l])),
    ]
}

fn scalar(outs: &[(String, Tensor)], name: &str) -> f64 {
    outs.iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
        .to_f32()
        .iter()
        .next()
        .copied()
        .unwrap() as f64
}

#[test]
fn loss_gradients_match_finite_differences() {
    let c = config();
    let (model, _) = c.training_graph(0).unwrap();
    let wrt = [
        "head.cls_logits.bias",
        "head.bbox_pred.bias",
        "head.centerness.bias",
    ];
    let train = with_gradients(&model, &GradRequest::new(names::LOSS, &wrt)).unwrap();
    let inputs = batch(&c);
    let tract = tract_backend();
    let outs = tract
        .load_model(&train, "train")
        .unwrap()
        .run(inputs.clone())
        .unwrap();
    let loss = scalar(&outs, names::LOSS);
    let fwd = tract
        .load_model(&model, "forward")
        .unwrap()
        .run(inputs.clone())
        .unwrap();
    let parts: f64 = [names::LOSS_CLS, names::LOSS_BOX, names::LOSS_CTR]
        .iter()
        .map(|n| scalar(&fwd, n))
        .sum();
    assert!(
        loss.is_finite() && (loss - parts).abs() < 1e-5,
        "{loss} vs {parts}"
    );
    // Initial classification loss: focal loss at prior 0.01 is small per location but summed
    // over all negatives / positives it is of order 1 (FCOS' ~1.1 at init).
    let cls = scalar(&fwd, names::LOSS_CLS);
    assert!(cls > 0.05 && cls < 5.0, "initial focal loss {cls}");

    let init = model.graph.as_ref().unwrap();
    for name in wrt {
        let grad = outs
            .iter()
            .find(|(n, _)| n.ends_with(name) && n != name)
            .unwrap_or_else(|| panic!("no gradient of {name}"))
            .1
            .to_f32();
        let value = init
            .initializer
            .iter()
            .find(|t| t.name == name)
            .map(|t| Tensor::from_proto(t).unwrap().to_f32())
            .unwrap();
        for k in 0..value.len() {
            // The GIoU loss has corners (min/max of predicted and target distances); a step of
            // 1e-2 in log-distance crosses one for head.bbox_pred.bias[1] (finite difference
            // -0.1876 vs -0.1745), 3e-3 stays on one side (-0.17448 vs autodiff -0.17448) and is
            // still far above float32 noise.
            let eps = 3e-3f32;
            let run_with = |delta: f32| {
                let mut m = model.clone();
                let g = m.graph.as_mut().unwrap();
                let t = g.initializer.iter_mut().find(|t| t.name == name).unwrap();
                let mut v = value.clone();
                v.as_slice_mut().unwrap()[k] += delta;
                *t = Tensor::F32(v).to_proto(name);
                scalar(
                    &tract
                        .load_model(&m, "fd")
                        .unwrap()
                        .run(inputs.clone())
                        .unwrap(),
                    names::LOSS,
                )
            };
            let fd = (run_with(eps) - run_with(-eps)) / (2.0 * eps as f64);
            let ad = grad.as_slice().unwrap()[k] as f64;
            eprintln!("{name}[{k}]: autodiff {ad:.6}, finite difference {fd:.6}");
            assert!(
                (ad - fd).abs() <= 2e-3 + 2e-2 * fd.abs(),
                "{name}[{k}]: autodiff {ad}, finite difference {fd}"
            );
        }
    }
    if let Some(ort) = ort_backend() {
        let o = ort
            .load_model(&train, "train")
            .unwrap()
            .run(inputs)
            .unwrap();
        let lo = scalar(&o, names::LOSS);
        assert!(
            (lo - loss).abs() <= 1e-4 * loss.abs().max(1.0),
            "ort {lo} vs tract {loss}"
        );
    }
}
