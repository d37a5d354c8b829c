//! Whole-model check: densa's ResNet-18 (inference-mode batch norm) at 1x3x32x32 with a
//! linear classifier and a cross-entropy loss written with standard ops. The gradient of every
//! parameter (62 tensors) is checked against central finite differences on sampled
//! coordinates (ONNX Runtime; the perturbed parameter fed as an input), the gradient graph runs
//! on tract and agrees with ONNX Runtime, and - where PyTorch is installed - float64 PyTorch
//! (torchvision's resnet18 with the same weights) gives the same gradients.

use crate::gradcheck;

use densa::exporter::autodiff::{with_gradients, GradRequest};
use densa::exporter::builder::{attr, tensor_type, Dim, GraphBuilder, Init, ParamKind};
use densa::exporter::onnx::{ModelProto, ValueInfoProto};
use densa::exporter::{DType, Tensor};
use densa::models::Arch;
use gradcheck::*;
use ndarray::ArrayD;

/// ResNet-18 + global pool + fc(10) + cross-entropy against class 3. Returns the model and the
/// names of the learned parameters.
fn resnet18_with_loss(rng: &mut Gen) -> (ModelProto, Vec<String>, Tensor) {
    let mut b = GraphBuilder::new("resnet18-train", 7);
    let images = b
        .input(
            "images",
            DType::F32,
            vec![1.into(), 3.into(), 32.into(), 32.into()],
        )
        .unwrap();
    let net = Arch::ResNet18.config().init(&mut b).unwrap();
    let stages = net.forward(&mut b, &images).unwrap();
    let pooled = b.global_avg_pool(&stages.c5).unwrap();
    let flat = b.flatten(&pooled, 1);
    let w = b
        .param(
            "fc.weight",
            &[10, 512],
            Init::KaimingUniformFanIn,
            ParamKind::Param,
        )
        .unwrap();
    let bias = b
        .param("fc.bias", &[10], Init::Uniform(0.05), ParamKind::Param)
        .unwrap();
    let logits = b.linear(Some("fc"), &flat, &w, Some(&bias)).unwrap();
    let logp = b.node1(
        "LogSoftmax",
        None,
        &[&logits],
        vec![attr::int("axis", -1)],
        DType::F32,
        vec![1.into(), 10.into()],
    );
    let mut onehot = ArrayD::zeros(vec![1, 10]);
    onehot[[0, 3]] = 1.0f32;
    let target = b.constant(Tensor::F32(onehot));
    let picked = b.binary("Mul", &logp, &target).unwrap();
    let sum = b.node1(
        "ReduceSum",
        None,
        &[&picked],
        vec![attr::int("keepdims", 0)],
        DType::F32,
        vec![],
    );
    let loss = b.unary("Neg", &sum);
    b.output(&loss, "loss").unwrap();
    // Non-trivial batch-norm statistics and affine parameters.
    let bn: Vec<(String, Vec<usize>)> = b
        .params()
        .iter()
        .filter(|p| p.name.contains("bn") || p.name.contains("downsample.1"))
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    for (name, shape) in bn {
        let n: usize = shape.iter().product();
        let (lo, hi) = match name.rsplit('.').next().unwrap() {
            "weight" => (0.5, 1.5),
            "bias" => (-0.2, 0.2),
            "running_mean" => (-0.2, 0.2),
            _ => (0.5, 1.5),
        };
        let v: Vec<f32> = (0..n).map(|_| rng.uniform(lo, hi) as f32).collect();
        b.set_initializer(
            &name,
            Tensor::F32(ArrayD::from_shape_vec(shape, v).unwrap()),
        )
        .unwrap();
    }
    let params: Vec<String> = b
        .params()
        .iter()
        .filter(|p| p.kind == ParamKind::Param)
        .map(|p| p.name.clone())
        .collect();
    let x: Vec<f64> = (0..3 * 32 * 32).map(|_| rng.uniform(-1.0, 1.0)).collect();
    (b.finish(), params, tensor(DType::F32, &[1, 3, 32, 32], x))
}

/// The same model with the named initializers turned into graph inputs, and their values.
fn params_as_inputs(m: &ModelProto, names: &[String]) -> (ModelProto, Vec<(String, Tensor)>) {
    let mut m = m.clone();
    let g = m.graph.as_mut().unwrap();
    let mut feeds = Vec::new();
    g.initializer.retain(|t| {
        if names.contains(&t.name) {
            let v = Tensor::from_proto(t).unwrap();
            let shape: Vec<Dim> = v.shape().iter().map(|&d| Dim::Fixed(d as i64)).collect();
            g.input.push(ValueInfoProto {
                name: t.name.clone(),
                r#type: Some(tensor_type(DType::F32, &shape)),
                ..Default::default()
            });
            feeds.push((t.name.clone(), v));
            false
        } else {
            true
        }
    });
    (m, feeds)
}

/// Checks one coordinate: central difference within `tol`, or - where a ReLU/MaxPool kink lies
/// within the step (f32 needs steps of 1e-3) - the analytic value between the forward and
/// backward differences (a one-sided derivative is the gradient on that side of the kink).
/// Returns whether the kink rule was needed, or a failure message.
fn check_coordinate(
    f: &mut dyn FnMut(f64) -> f64,
    x: f64,
    h: f64,
    analytic: f64,
    scale: f64,
    tol: f64,
) -> Result<bool, String> {
    let (fp, f0, fm) = (f(x + h), f(x), f(x - h));
    let central = (fp - fm) / (2.0 * h);
    if (central - analytic).abs() <= tol * scale {
        return Ok(false);
    }
    let (d_plus, d_minus) = ((fp - f0) / h, (f0 - fm) / h);
    let (lo, hi) = (d_plus.min(d_minus), d_plus.max(d_minus));
    if analytic >= lo - tol * scale && analytic <= hi + tol * scale {
        Ok(true)
    } else {
        Err(format!(
            "analytic {analytic} vs central difference {central} (forward {d_plus}, backward {d_minus})"
        ))
    }
}

#[test]
fn resnet18_every_parameter_vs_finite_differences() {
    let mut rng = Gen::new(2024);
    let (model, params, images) = resnet18_with_loss(&mut rng);
    assert_eq!(params.len(), 62, "20 convs, 20 batch norms x 2, fc x 2");
    let wrt: Vec<&str> = params.iter().map(String::as_str).collect();
    let req = GradRequest::new("loss", &wrt);
    let b = backends();
    let grad = with_gradients(&model, &req).unwrap();
    let image_feed = vec![("images".to_string(), images.clone())];
    let grads = b
        .reference
        .load_model(&grad, "grad")
        .unwrap()
        .run(image_feed.clone())
        .unwrap();

    // Finite differences: the perturbed parameter becomes a graph input (one at a time, so
    // each run copies only that tensor).
    let (mut checked, mut kinks) = (0, 0);
    for (k, name) in params.iter().enumerate() {
        let (gname, g) = &grads[k + 1];
        assert_eq!(gname, &format!("grad.{name}"));
        let analytic = to_f64(g);
        let scale = analytic.iter().fold(1e-4f64, |m, v| m.max(v.abs()));
        let (fwd_in, param) = params_as_inputs(&model, std::slice::from_ref(name));
        let base = param[0].1.clone();
        let values = to_f64(&base);
        let mut fwd = b.reference.load_model(&fwd_in, "forward").unwrap();
        for _ in 0..3 {
            let i = rng.below(0, values.len() as i64) as usize;
            let mut f = |v: f64| -> f64 {
                let mut t = base.as_f32().unwrap().clone();
                *t.iter_mut().nth(i).unwrap() = v as f32;
                let feeds = vec![
                    ("images".to_string(), images.clone()),
                    (name.clone(), Tensor::F32(t)),
                ];
                to_f64(&fwd.run(feeds).unwrap()[0].1)[0]
            };
            match check_coordinate(&mut f, values[i], 1e-3, analytic[i], scale, 1e-2) {
                Ok(kink) => kinks += kink as usize,
                Err(e) => panic!("ResNet-18: d loss / d {name}[{i}]: {e}"),
            }
            checked += 1;
        }
    }
    eprintln!("ResNet-18: {checked} coordinates of 62 parameters checked, {kinks} next to a kink");
    assert!(
        kinks * 10 <= checked,
        "{kinks} of {checked} coordinates needed the kink rule"
    );

    // Parameters as initializers (the deployable layout): tract agrees with ONNX Runtime.
    if !b.reference_is_ort {
        return;
    }
    let r = grads;
    let t = b
        .tract
        .load_model(&grad, "tract")
        .unwrap()
        .run(image_feed)
        .unwrap();
    assert_eq!(r.len(), 63);
    let mut worst = 0f64;
    for ((name, a), (_, b)) in r.iter().zip(&t) {
        let (a, b) = (to_f64(a), to_f64(b));
        let scale = a.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        let d = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        assert!(d < 1e-3, "{name}: tract vs ONNX Runtime relative {d:.2e}");
        worst = worst.max(d);
    }
    eprintln!("ResNet-18: tract vs ONNX Runtime, worst relative difference {worst:.2e}");
    torch_reference(&model, &images, &r);
}

/// Where Debian's PyTorch is installed (not in CI), the same network in float64 PyTorch
/// (torchvision's resnet18, same parameter names) gives the same gradients.
fn torch_reference(model: &ModelProto, images: &Tensor, ort: &[(String, Tensor)]) {
    let python = "/usr/bin/python3";
    let has_torch = std::process::Command::new(python)
        .args(["-c", "import torch, torchvision"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_torch {
        eprintln!("note: PyTorch not installed; skipping the float64 PyTorch comparison");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let weights: Vec<(String, Tensor)> = model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .filter(|t| !t.name.starts_with("const"))
        .map(|t| (t.name.clone(), Tensor::from_proto(t).unwrap()))
        .collect();
    let npy = densa::runtime::npy::write_npz;
    npy(&dir.path().join("w.npz"), &weights).unwrap();
    npy(&dir.path().join("g.npz"), ort).unwrap();
    densa::runtime::npy::write_npy(&dir.path().join("x.npy"), images).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/resnet18_grad_torch.py");
    let o = std::process::Command::new(python)
        .arg(script)
        .arg(dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "PyTorch comparison failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("ResNet-18 vs PyTorch float64: {}", out.trim());
}
