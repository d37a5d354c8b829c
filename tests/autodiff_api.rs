//! The contract of `densa_exporter::autodiff`: errors that name the node and op, frozen
//! parameters, stop_gradient, absent gradients, accumulation over several consumers, a seed
//! input for split forward/backward graphs, gradients with respect to intermediate values.

use crate::gradcheck;

use std::collections::HashSet;

use densa::exporter::autodiff::{gradients, with_gradients, AutodiffError, GradRequest};
use densa::exporter::DType;
use gradcheck::*;

fn run(
    model: &densa::exporter::onnx::ModelProto,
    feeds: &[(String, densa::exporter::Tensor)],
) -> Vec<(String, Vec<f64>)> {
    let b = backends();
    let mut s = b.reference.load_model(model, "api").unwrap();
    s.run(feeds.to_vec())
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, to_f64(&t)))
        .collect()
}

#[test]
fn unsupported_op_on_the_path_names_node_and_op() {
    let mut rng = Gen::new(1);
    let mut net = Net::new(DType::F32);
    let x = net.rand_input(&mut rng, "x", &[4], -1.0, 1.0);
    let axis = net.init(densa::exporter::Tensor::I64(ndarray::ArrayD::from_elem(
        vec![],
        0,
    )));
    let c = net.node("CumSum", &[&x, &axis], vec![]);
    let y = net.node("ReduceSum", &[&c], vec![int("keepdims", 0)]);
    let err = with_gradients(&net.model(&y), &GradRequest::new(&y, &["x"])).unwrap_err();
    match &err {
        AutodiffError::Unsupported { node, op, .. } => {
            assert_eq!(op, "CumSum");
            assert!(node.starts_with("cumsum_"), "{node}");
        }
        other => panic!("expected Unsupported, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("CumSum") && msg.contains("cumsum_"), "{msg}");
}

#[test]
fn unsupported_op_off_the_path_is_fine() {
    // CumSum only sees a frozen value: it is not differentiated.
    let mut rng = Gen::new(2);
    let mut net = Net::new(DType::F32);
    let x = net.rand_input(&mut rng, "x", &[4], -1.0, 1.0);
    let frozen = net.rand_input(&mut rng, "frozen", &[4], -1.0, 1.0);
    let axis = net.init(densa::exporter::Tensor::I64(ndarray::ArrayD::from_elem(
        vec![],
        0,
    )));
    let c = net.node("CumSum", &[&frozen, &axis], vec![]);
    let p = net.node("Mul", &[&x, &c], vec![]);
    check(
        "frozen CumSum",
        &net,
        &p,
        &["x"],
        &mut rng,
        &Check::f32_smooth(),
    );
}

#[test]
fn unknown_names_and_stopped_wrt_are_errors() {
    let mut rng = Gen::new(3);
    let mut net = Net::new(DType::F32);
    let x = net.rand_input(&mut rng, "x", &[2], -1.0, 1.0);
    let y = net.node("Relu", &[&x], vec![]);
    let m = net.model(&y);
    let e = with_gradients(&m, &GradRequest::new(&y, &["nope"])).unwrap_err();
    assert!(
        matches!(e, AutodiffError::UnknownValue { role: "wrt", .. }),
        "{e}"
    );
    let e = with_gradients(&m, &GradRequest::new("nope", &["x"])).unwrap_err();
    assert!(
        matches!(e, AutodiffError::UnknownValue { role: "loss", .. }),
        "{e}"
    );
    let mut req = GradRequest::new(&y, &["x"]);
    req.stop_gradient.insert("x".into());
    assert!(matches!(
        with_gradients(&m, &req).unwrap_err(),
        AutodiffError::WrtStopped(_)
    ));
}

/// loss = sum(x·w + stop(x·w)): the stopped branch contributes nothing, so d/dw = x (not 2x).
#[test]
fn stop_gradient_cuts_the_flow() {
    let mut rng = Gen::new(4);
    let mut net = Net::new(DType::F64);
    let x = net.rand_input(&mut rng, "x", &[3], -1.0, 1.0);
    let w = net.rand_input(&mut rng, "w", &[3], -1.0, 1.0);
    let a = net.node("Mul", &[&x, &w], vec![]);
    let b = net.node("Identity", &[&a], vec![]);
    let s = net.node("Add", &[&a, &b], vec![]);
    let loss = net.node("ReduceSum", &[&s], vec![int("keepdims", 0)]);
    let mut req = GradRequest::new(&loss, &["w"]);
    req.stop_gradient = HashSet::from([b.clone()]);
    let out = run(
        &with_gradients(&net.model(&loss), &req).unwrap(),
        &net.feeds,
    );
    let xv = to_f64(&net.feeds[0].1);
    assert_eq!(out[1].0, "grad.w");
    for (g, x) in out[1].1.iter().zip(&xv) {
        assert!((g - x).abs() < 1e-12, "{g} vs {x}");
    }
    // Without the stop, the same graph gives 2x.
    let out = run(
        &with_gradients(&net.model(&loss), &GradRequest::new(&loss, &["w"])).unwrap(),
        &net.feeds,
    );
    for (g, x) in out[1].1.iter().zip(&xv) {
        assert!((g - 2.0 * x).abs() < 1e-12, "{g} vs 2 * {x}");
    }
}

/// Training a subset: frozen parameters get no backward nodes; a wrt the loss does not depend
/// on is absent from `gradients` and zero in `with_gradients`.
#[test]
fn frozen_and_absent() {
    let mut rng = Gen::new(5);
    let mut net = Net::new(DType::F64);
    let x1 = net.rand_input(&mut rng, "x1", &[3], -1.0, 1.0);
    let x2 = net.rand_input(&mut rng, "x2", &[3], -1.0, 1.0);
    let w1 = net.rand_input(&mut rng, "w1", &[3], -1.0, 1.0);
    let w2 = net.rand_input(&mut rng, "w2", &[3], -1.0, 1.0);
    net.rand_input(&mut rng, "unused", &[3], -1.0, 1.0);
    let a = net.node("Mul", &[&x1, &w1], vec![]);
    let b = net.node("Mul", &[&x2, &w2], vec![]);
    let s = net.node("Add", &[&a, &b], vec![]);
    let loss = net.node("ReduceSum", &[&s], vec![int("keepdims", 0)]);
    let m = net.model(&loss);
    let g = gradients(
        m.graph.as_ref().unwrap(),
        &GradRequest::new(&loss, &["w1", "unused"]),
    )
    .unwrap();
    assert_eq!(g.grads.len(), 1);
    assert_eq!(g.grads[0].0, "w1");
    assert_eq!(g.absent, vec!["unused".to_string()]);
    // Nothing of the frozen branch (x2·w2) is differentiated.
    for n in &g.nodes {
        assert!(
            !n.input.iter().any(|i| i == &x2 || i == &w2 || i == &b),
            "frozen branch differentiated: {n:?}"
        );
    }
    let out = run(
        &with_gradients(&m, &GradRequest::new(&loss, &["w1", "unused"])).unwrap(),
        &net.feeds,
    );
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, [loss.as_str(), "grad.w1", "grad.unused"]);
    assert_eq!(out[2].1, vec![0.0; 3]);
    assert_eq!(out[1].1, to_f64(&net.feeds[0].1));
}

/// A value with several consumers (x used three times) gets the sum of its partial gradients.
#[test]
fn accumulation_over_consumers() {
    let mut rng = Gen::new(6);
    let mut net = Net::new(DType::F64);
    let x = net.rand_input(&mut rng, "x", &[2, 3], 0.5, 1.5);
    let a = net.node("Mul", &[&x, &x], vec![]);
    let b = net.node("Exp", &[&x], vec![]);
    let s = net.node("Sum", &[&a, &b, &x], vec![]);
    check(
        "x·x + exp(x) + x",
        &net,
        &s,
        &["x"],
        &mut rng,
        &Check::f64(),
    );
    let m = net.model(&s);
    let g = gradients(m.graph.as_ref().unwrap(), &GradRequest::new(&s, &["x"])).unwrap();
    assert!(
        g.nodes.iter().any(|n| n.op_type == "Sum"),
        "no accumulation node"
    );
}

/// Static slices that tile a value (a multi-crop batch cut into its crops): the gradient is
/// one `Concat` of the slices' gradients, not a sum of full-size zero-padded copies; with a
/// gap, one `Pad` per contiguous run; slices taken twice, two concatenations summed.
#[test]
fn tiling_slices_concatenate_their_gradients() {
    // (slices, Pads, Sum inputs): a tiling, a gap, and a tiling whose slices are all taken
    // twice (two concatenations, summed).
    for (cuts, pads, sums) in [
        (vec![(0, 2), (2, 4), (4, 6)], 0, 0),
        (vec![(0, 2), (3, 4), (4, 6)], 2, 2),
        (vec![(0, 3), (3, 6), (0, 3), (3, 6)], 0, 2),
    ] {
        let mut rng = Gen::new(7);
        let mut net = Net::new(DType::F64);
        let x = net.rand_input(&mut rng, "x", &[3, 6], -1.0, 1.0);
        let axes = net.ints(&[1]);
        let mut outs = Vec::new();
        for (k, &(b, e)) in cuts.iter().enumerate() {
            let (st, en) = (net.ints(&[b]), net.ints(&[e]));
            let sl = net.node("Slice", &[&x, &st, &en, &axes], vec![]);
            let c = net.init(tensor(DType::F64, &[], vec![2.0 + k as f64]));
            outs.push(net.node("Mul", &[&sl, &c], vec![]));
        }
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        let y = net.node("Concat", &refs, vec![int("axis", 1)]);
        check("tiling slices", &net, &y, &["x"], &mut rng, &Check::f64());
        let m = net.model(&y);
        let g = gradients(m.graph.as_ref().unwrap(), &GradRequest::new(&y, &["x"])).unwrap();
        let count = |op: &str| g.nodes.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count("Pad"), pads, "{cuts:?}");
        assert!(count("Concat") >= 1, "{cuts:?}");
        let sum_inputs: usize = g
            .nodes
            .iter()
            .filter(|n| n.op_type == "Sum")
            .map(|n| n.input.len())
            .sum();
        assert_eq!(sum_inputs, sums, "{cuts:?}");
    }
}

/// GridSample on a small map with more channels than cells (a backbone's last stage sampled on
/// a lattice): the input gradient is a product with the sampling weights, no scatter.
#[test]
fn grid_sample_on_a_small_map_multiplies_by_the_sampling_weights() {
    let mut rng = Gen::new(8);
    let mut net = Net::new(DType::F32);
    let x = net.rand_input(&mut rng, "x", &[2, 8, 2, 2], -1.0, 1.0);
    let grid = net.init(tensor(
        DType::F32,
        &[2, 3, 3, 2],
        (0..36).map(|i| -0.83 + 0.047 * i as f64).collect(),
    ));
    let y = net.node("GridSample", &[&x, &grid], vec![]);
    check(
        "GridSample 2x2 map",
        &net,
        &y,
        &["x"],
        &mut rng,
        &Check::f32_linear(),
    );
    let m = net.model(&y);
    let g = gradients(m.graph.as_ref().unwrap(), &GradRequest::new(&y, &["x"])).unwrap();
    assert!(g.nodes.iter().any(|n| n.op_type == "MatMul"));
    assert!(!g.nodes.iter().any(|n| n.op_type == "ScatterElements"));
}

/// The seed as a graph input (split forward/backward): the gradient of a non-scalar output
/// for a seed s equals the gradient of sum(y · s).
#[test]
fn seed_input_and_intermediate_wrt() {
    let mut rng = Gen::new(7);
    let mut net = Net::new(DType::F64);
    let x = net.rand_input(&mut rng, "x", &[2, 3], -1.0, 1.0);
    let w = net.rand_input(&mut rng, "w", &[3, 4], -1.0, 1.0);
    let h = net.node("MatMul", &[&x, &w], vec![]);
    let y = net.node("Tanh", &[&h], vec![]);
    let seed: Vec<f64> = (0..8).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let mut req = GradRequest::new(&y, &["w", &h]);
    req.seed_name = Some("dy".into());
    let m = with_gradients(&net.model(&y), &req).unwrap();
    let mut feeds = net.feeds.clone();
    feeds.push(("dy".into(), tensor(DType::F64, &[2, 4], seed.clone())));
    let out = run(&m, &feeds);
    // dh = dy · (1 - y²).
    let yv = &out[0].1;
    for ((g, s), y) in out[2].1.iter().zip(&seed).zip(yv) {
        assert!((g - s * (1.0 - y * y)).abs() < 1e-12);
    }
    // dw = xᵀ · dh.
    let xv = to_f64(&net.feeds[0].1);
    for i in 0..3 {
        for j in 0..4 {
            let want: f64 = (0..2).map(|n| xv[n * 3 + i] * out[2].1[n * 4 + j]).sum();
            assert!((out[1].1[i * 4 + j] - want).abs() < 1e-12);
        }
    }
}

/// Ops that need opset 16 (ScatterElements with reduction) are refused below it, naming the
/// node.
#[test]
fn opset_too_old_for_a_rule() {
    let mut rng = Gen::new(8);
    let mut net = Net::new(DType::F32);
    net.opset = 15;
    let x = net.rand_input(&mut rng, "x", &[1, 1, 4, 4], -1.0, 1.0);
    let y = net.node("MaxPool", &[&x], vec![ints("kernel_shape", &[2, 2])]);
    let e = with_gradients(&net.model(&y), &GradRequest::new(&y, &["x"])).unwrap_err();
    assert!(
        matches!(
            e,
            AutodiffError::Opset {
                needed: 16,
                found: 15,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("maxpool_"), "{e}");
}

/// A training graph of a real densa model (resnet-edge, all parameters) is a valid ONNX model:
/// densa's validator, `onnx.checker` with full shape inference, and the `onnxruntime` Python
/// package gives the same gradients as densa's ONNX Runtime backend.
#[test]
fn edge_backbone_training_graph_is_valid_onnx() {
    use densa::exporter::builder::{attr, GraphBuilder, ParamKind};
    use densa::models::Arch;
    let mut b = GraphBuilder::new("edge-train", 3);
    let images = b
        .input(
            "images",
            DType::F32,
            vec!["N".into(), 3.into(), 32.into(), 32.into()],
        )
        .unwrap();
    let net = Arch::Edge.config().init(&mut b).unwrap();
    let stages = net.forward(&mut b, &images).unwrap();
    let sq = b.binary("Mul", &stages.c5, &stages.c5).unwrap();
    let loss = b.node1(
        "ReduceMean",
        None,
        &[&sq],
        vec![attr::int("keepdims", 0)],
        DType::F32,
        vec![],
    );
    b.output(&loss, "loss").unwrap();
    let params: Vec<String> = b
        .params()
        .iter()
        .filter(|p| p.kind == ParamKind::Param)
        .map(|p| p.name.clone())
        .collect();
    let wrt: Vec<&str> = params.iter().map(String::as_str).collect();
    let model = with_gradients(&b.finish(), &GradRequest::new("loss", &wrt)).unwrap();
    densa::exporter::validate::validate(&model).unwrap();

    let Some(python) = common::python_peers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.onnx");
    densa::exporter::io::save(&model, &path).unwrap();
    let mut rng = Gen::new(9);
    let x = tensor(
        DType::F32,
        &[2, 3, 32, 32],
        (0..2 * 3 * 32 * 32)
            .map(|_| rng.uniform(-1.0, 1.0))
            .collect(),
    );
    let xp = dir.path().join("x.npy");
    densa::runtime::npy::write_npy(&xp, &x).unwrap();
    let out = dir.path().join("out.npz");
    common::python_reference(&python, &path, &[("images", &xp)], &out);
    let reference = densa::runtime::npy::read_npz(&out).unwrap();
    let ours = run(&model, &[("images".into(), x)]);
    assert_eq!(reference.len(), params.len() + 1);
    for ((name, a), (rname, r)) in ours.iter().zip(&reference) {
        assert_eq!(name, rname);
        let r = to_f64(r);
        let scale = r.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        let d = a
            .iter()
            .zip(&r)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        assert!(
            d < 1e-4,
            "{name}: densa-ort vs onnxruntime (Python) relative {d:.2e}"
        );
    }
}

/// The same network differentiated with symbolic spatial sizes (dynamic formulations: run-time
/// output padding, slices and broadcast axes) and with fixed ones (static attributes) gives the
/// same gradients, on ONNX Runtime and on tract, at a size where every strided convolution
/// drops rows (40x22).
#[test]
fn dynamic_and_static_shapes_agree() {
    use densa::exporter::builder::{attr, Dim, GraphBuilder, ParamKind};
    use densa::models::Arch;
    let build = |h: Dim, w: Dim| {
        let mut b = GraphBuilder::new("edge-train", 3);
        let images = b
            .input("images", DType::F32, vec!["N".into(), 3.into(), h, w])
            .unwrap();
        let net = Arch::Edge.config().init(&mut b).unwrap();
        let stages = net.forward(&mut b, &images).unwrap();
        let sq = b.binary("Mul", &stages.c4, &stages.c4).unwrap();
        let loss = b.node1(
            "ReduceMean",
            None,
            &[&sq],
            vec![attr::int("keepdims", 0)],
            DType::F32,
            vec![],
        );
        b.output(&loss, "loss").unwrap();
        let params: Vec<String> = b
            .params()
            .iter()
            .filter(|p| p.kind == ParamKind::Param)
            .map(|p| p.name.clone())
            .collect();
        let wrt: Vec<&str> = params.iter().map(String::as_str).collect();
        with_gradients(&b.finish(), &GradRequest::new("loss", &wrt)).unwrap()
    };
    let dynamic = build("H".into(), "W".into());
    let fixed = build(40.into(), 22.into());
    let ops =
        |m: &densa::exporter::onnx::ModelProto| -> usize { m.graph.as_ref().unwrap().node.len() };
    assert!(
        ops(&dynamic) > ops(&fixed),
        "the dynamic graph should carry run-time shape arithmetic"
    );
    let mut rng = Gen::new(10);
    let x = tensor(
        DType::F32,
        &[2, 3, 40, 22],
        (0..2 * 3 * 40 * 22)
            .map(|_| rng.uniform(-1.0, 1.0))
            .collect(),
    );
    let feeds = vec![("images".to_string(), x)];
    let b = backends();
    let mut results = vec![];
    for (m, label) in [(&fixed, "fixed"), (&dynamic, "dynamic")] {
        results.push(
            b.reference
                .load_model(m, label)
                .unwrap()
                .run(feeds.clone())
                .unwrap(),
        );
        if b.reference_is_ort {
            results.push(
                b.tract
                    .load_model(m, label)
                    .unwrap()
                    .run(feeds.clone())
                    .unwrap(),
            );
        }
    }
    for other in &results[1..] {
        for ((name, a), (_, r)) in other.iter().zip(&results[0]) {
            let (a, r) = (to_f64(a), to_f64(r));
            let scale = r.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
            let d = a
                .iter()
                .zip(&r)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
                / scale;
            assert!(d < 1e-4, "{name}: relative {d:.2e}");
        }
    }
}
