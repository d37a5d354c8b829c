//! Gradients of linear algebra (MatMul, Gemm, Einsum), reductions, Softmax/LogSoftmax,
//! normalisation, shape ops and indexing vs finite differences on ONNX Runtime (f64), and tract
//! agreement.

use crate::gradcheck;

use densa::exporter::{DType, Tensor};
use gradcheck::*;
use ndarray::ArrayD;
use proptest::prelude::*;

fn i64_tensor(shape: &[usize], v: Vec<i64>) -> Tensor {
    Tensor::I64(ArrayD::from_shape_vec(shape, v).unwrap())
}

proptest! {
    #![proptest_config(cases(10))]

    /// MatMul: batched, broadcasting batch axes, 1-D operands; shapes declared or unknown.
    #[test]
    fn matmul(
        batch in prop::collection::vec(1usize..3, 0..3),
        mask in any::<u8>(),
        n in 1usize..4, k in 1usize..4, m in 1usize..4,
        a_vec in any::<bool>(), b_vec in any::<bool>(),
        dynamic in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Gen::new(seed);
        let mut net = Net::new(DType::F64);
        let (sa, sb) = if a_vec || b_vec {
            let sa = if a_vec { vec![k] } else { [batch.clone(), vec![n, k]].concat() };
            let sb = if b_vec { vec![k] } else { [batch.clone(), vec![k, m]].concat() };
            (sa, sb)
        } else {
            // Operand a broadcasts some batch axes (size 1) and may lack the leading one.
            let ba: Vec<usize> = batch.iter().enumerate().map(|(i, &d)| if mask >> i & 1 == 1 { 1 } else { d }).collect();
            let ba = if mask & 0x80 != 0 && !ba.is_empty() { ba[1..].to_vec() } else { ba };
            ([ba, vec![n, k]].concat(), [batch.clone(), vec![k, m]].concat())
        };
        let na: usize = sa.iter().product();
        let nb: usize = sb.iter().product();
        let a = net.input("a", tensor(DType::F64, &sa, (0..na).map(|_| rng.uniform(-1.0, 1.0)).collect()), dynamic);
        let b = net.input("b", tensor(DType::F64, &sb, (0..nb).map(|_| rng.uniform(-1.0, 1.0)).collect()), dynamic);
        let y = net.node("MatMul", &[&a, &b], vec![]);
        check(&format!("MatMul {sa:?} {sb:?}"), &net, &y, &["a", "b"], &mut rng, &Check::f64());
    }

    /// Gemm with every transposition, alpha, beta and a broadcast C.
    #[test]
    fn gemm(m in 1usize..4, k in 1usize..4, n in 1usize..4, ta in any::<bool>(), tb in any::<bool>(), c_kind in 0usize..4, seed in any::<u64>()) {
        let mut rng = Gen::new(seed);
        let mut net = Net::new(DType::F64);
        let sa = if ta { vec![k, m] } else { vec![m, k] };
        let sb = if tb { vec![n, k] } else { vec![k, n] };
        let sc = [vec![m, n], vec![n], vec![1, n], vec![m, 1]][c_kind].clone();
        let a = net.rand_input(&mut rng, "a", &sa, -1.0, 1.0);
        let b = net.rand_input(&mut rng, "b", &sb, -1.0, 1.0);
        let c = net.rand_input(&mut rng, "c", &sc, -1.0, 1.0);
        let y = net.node("Gemm", &[&a, &b, &c], vec![
            int("transA", ta as i64), int("transB", tb as i64), float("alpha", 0.75), float("beta", -1.5),
        ]);
        // tract's f64 Gemm mixes an f32 beta into f64 (its forward fails): f64 on ONNX Runtime,
        // then the same graph in f32 on both.
        check("Gemm", &net, &y, &["a", "b", "c"], &mut rng, &Check::f64().no_tract());
        let mut net32 = Net::new(DType::F32);
        net32.nodes = net.nodes.clone();
        for (name, t) in &net.feeds {
            net32.input(name, densa::exporter::Tensor::F32(t.to_f32()), false);
        }
        check("Gemm f32", &net32, &y, &["a", "b", "c"], &mut rng, &Check::f32_linear());
    }

    /// Reductions over random axes, keepdims on/off, axes as attribute or input.
    #[test]
    fn reductions(shape in prop::collection::vec(1usize..4, 1..4), axes_mask in 1u8..8, keep in any::<bool>(), seed in any::<u64>()) {
        let mut rng = Gen::new(seed);
        let r = shape.len();
        let axes: Vec<i64> = (0..r as i64).filter(|&i| axes_mask >> i & 1 == 1).collect();
        let axes = if axes.is_empty() { vec![-1] } else { axes };
        for op in ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp"] {
            let mut net = Net::new(DType::F64);
            let n = shape.iter().product();
            let x = net.input("x", tensor(DType::F64, &shape, rng.distinct(n, 0.1).into_iter().map(|v| v + 0.05).collect()), false);
            // opset 17: ReduceSum takes axes as an input, the others as an attribute.
            let y = if op == "ReduceSum" {
                let a = net.ints(&axes);
                net.node(op, &[&x, &a], vec![int("keepdims", keep as i64)])
            } else {
                net.node(op, &[&x], vec![ints("axes", &axes), int("keepdims", keep as i64)])
            };
            check(&format!("{op} {shape:?} axes {axes:?} keep={keep}"), &net, &y, &["x"], &mut rng, &Check::f64());
        }
    }

    #[test]
    fn softmax(shape in prop::collection::vec(1usize..5, 1..4), axis in -3i64..3, seed in any::<u64>()) {
        let r = shape.len() as i64;
        prop_assume!(axis >= -r && axis < r);
        let mut rng = Gen::new(seed);
        for op in ["Softmax", "LogSoftmax"] {
            let mut net = Net::new(DType::F64);
            let x = net.rand_input(&mut rng, "x", &shape, -2.0, 2.0);
            let y = net.node(op, &[&x], vec![int("axis", axis)]);
            check(&format!("{op} {shape:?} axis {axis}"), &net, &y, &["x"], &mut rng, &Check::f64());
        }
    }

    /// Shape ops chained: Transpose -> Reshape/Flatten -> Unsqueeze/Squeeze -> Expand -> Tile.
    #[test]
    fn shape_ops(d0 in 1usize..4, d1 in 1usize..4, d2 in 1usize..4, reps in prop::collection::vec(1i64..3, 4), seed in any::<u64>()) {
        let mut rng = Gen::new(seed);
        let mut net = Net::new(DType::F64);
        let x = net.rand_input(&mut rng, "x", &[d0, d1, d2], -1.0, 1.0);
        let t = net.node("Transpose", &[&x], vec![ints("perm", &[2, 0, 1])]);
        let t2 = net.node("Transpose", &[&t], vec![]);
        let shape = net.ints(&[-1, d1 as i64]);
        let rs = net.node("Reshape", &[&t2, &shape], vec![]);
        let fl = net.node("Flatten", &[&rs], vec![int("axis", 1)]);
        let ax = net.ints(&[0, 2]);
        let un = net.node("Unsqueeze", &[&fl, &ax], vec![]);
        let ax1 = net.ints(&[0]);
        let sq = net.node("Squeeze", &[&un, &ax1], vec![]);
        let target = net.ints(&[2, 1, 1, 1]);
        let ex = net.node("Expand", &[&sq, &target], vec![]);
        let rp = net.ints(&reps);
        let y = net.node("Tile", &[&ex, &rp], vec![]);
        check("shape ops", &net, &y, &["x"], &mut rng, &Check::f64());
    }

    /// Concat and Split (with a part left unused), Slice with negative bounds and steps, Pad in
    /// every mode.
    #[test]
    fn concat_split_slice_pad(
        shape in prop::collection::vec(2usize..5, 2),
        start in -4i64..4, end in -5i64..6, step in prop::sample::select(vec![-2i64, -1, 1, 2, 3]),
        pads in prop::collection::vec(0i64..3, 4),
        mode in 0usize..3,
        dynamic in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Gen::new(seed);
        let mut net = Net::new(DType::F64);
        let n = shape.iter().product();
        let a = net.input("a", tensor(DType::F64, &shape, (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect()), dynamic);
        let b = net.rand_input(&mut rng, "b", &[shape[0], 2], -1.0, 1.0);
        let cat = net.node("Concat", &[&a, &b], vec![int("axis", -1)]);
        let split = net.ints(&[1, (shape[1] + 1) as i64]);
        let parts = net.node_n("Split", &[&cat, &split], vec![int("axis", 1)], 2);
        let starts = net.ints(&[start]);
        let ends = net.ints(&[end]);
        let axes = net.ints(&[1]);
        let steps = net.ints(&[step]);
        let sl = net.node("Slice", &[&parts[1], &starts, &ends, &axes, &steps], vec![]);
        // An empty slice has nothing to differentiate: pad it so the loss is defined anyway.
        let mode = ["constant", "reflect", "edge"][mode];
        let pv = net.ints(&pads);
        let y = net.node("Pad", &[&sl, &pv], vec![string("mode", mode)]);
        let label = format!("Concat/Split/Slice[{start}:{end}:{step}]/Pad {mode} {pads:?} dynamic={dynamic}");
        // reflect needs at least 2 elements along a padded axis; edge needs 1.
        let len = {
            let d = shape[1] as i64 + 1;
            let norm = |v: i64| if v < 0 { v + d } else { v };
            let (b, e) = if step > 0 { (norm(start).clamp(0, d), norm(end).clamp(0, d)) } else { (norm(start).clamp(0, d - 1), norm(end).clamp(-1, d - 1)) };
            if step > 0 { ((e - b + step - 1) / step).max(0) } else { ((b - e - step - 1) / -step).max(0) }
        };
        prop_assume!(len > 0 && (mode != "reflect" || (len > pads[1].max(pads[3]) && shape[0] as i64 > pads[0].max(pads[2]))));
        check(&label, &net, &y, &["a", "b"], &mut rng, &Check::f64());
    }

    /// Several static slices of one value along one axis (tiling it, with gaps, or
    /// overlapping), each scaled differently, plus a full-size use: the slice gradients are
    /// concatenated instead of summed as zero-padded copies when they are disjoint.
    #[test]
    fn slices_of_one_value(
        rows in 1usize..4, cols in 4usize..9,
        cuts in prop::collection::vec((0i64..9, 1i64..5), 2..5),
        full_use in any::<bool>(),
        dynamic in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Gen::new(seed);
        let mut net = Net::new(DType::F64);
        let x = net.rand_input(&mut rng, "x", &[rows, cols], -1.0, 1.0);
        let x = if dynamic {
            // The same values through an op whose output shape the rules cannot see.
            let shape = net.node("Shape", &[&x], vec![]);
            net.node("Reshape", &[&x, &shape], vec![])
        } else {
            x
        };
        let axes = net.ints(&[1]);
        let mut outs = Vec::new();
        for (k, &(begin, len)) in cuts.iter().enumerate() {
            let begin = begin % cols as i64;
            let end = (begin + len).min(cols as i64);
            let (st, en) = (net.ints(&[begin]), net.ints(&[end]));
            let sl = net.node("Slice", &[&x, &st, &en, &axes], vec![]);
            let c = net.init(tensor(DType::F64, &[], vec![1.0 + k as f64]));
            outs.push(net.node("Mul", &[&sl, &c], vec![]));
        }
        if full_use {
            outs.push(net.node("Tanh", &[&x], vec![]));
        }
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        let y = net.node("Concat", &refs, vec![int("axis", 1)]);
        check(&format!("slices {cuts:?} of [{rows}, {cols}] full={full_use} dynamic={dynamic}"), &net, &y, &["x"], &mut rng, &Check::f64());
    }

    /// Gather (index ranks 0-2, negative and repeated indices), GatherElements, GatherND, TopK.
    #[test]
    fn indexing(shape in prop::collection::vec(2usize..5, 2..4), axis in 0usize..3, qrank in 0usize..3, seed in any::<u64>()) {
        let r = shape.len();
        let axis = axis % r;
        let mut rng = Gen::new(seed);
        let n: usize = shape.iter().product();
        let d = shape[axis] as i64;
        // Gather.
        let mut net = Net::new(DType::F64);
        let x = net.input("x", tensor(DType::F64, &shape, rng.distinct(n, 0.1)), false);
        let ishape = vec![2usize; qrank];
        let ni: usize = ishape.iter().product();
        let iv: Vec<i64> = (0..ni).map(|_| rng.below(-d, d)).collect();
        let idx = net.init(i64_tensor(&ishape, iv));
        let y = net.node("Gather", &[&x, &idx], vec![int("axis", axis as i64)]);
        check(&format!("Gather axis {axis} q {qrank}"), &net, &y, &["x"], &mut rng, &Check::f64());
        // GatherElements.
        let mut net = Net::new(DType::F64);
        let x = net.input("x", tensor(DType::F64, &shape, rng.distinct(n, 0.1)), false);
        let iv: Vec<i64> = (0..n).map(|_| rng.below(-d, d)).collect();
        let idx = net.init(i64_tensor(&shape, iv));
        let y = net.node("GatherElements", &[&x, &idx], vec![int("axis", axis as i64)]);
        check("GatherElements", &net, &y, &["x"], &mut rng, &Check::f64());
        // GatherND over the first two axes (non-negative indices: tract's forward GatherND
        // panics on negative ones).
        let mut net = Net::new(DType::F64);
        let x = net.input("x", tensor(DType::F64, &shape, rng.distinct(n, 0.1)), false);
        let iv: Vec<i64> = (0..3).flat_map(|_| [rng.below(0, shape[0] as i64), rng.below(0, shape[1] as i64)]).collect();
        let idx = net.init(i64_tensor(&[3, 2], iv));
        let y = net.node("GatherND", &[&x, &idx], vec![]);
        check("GatherND", &net, &y, &["x"], &mut rng, &Check::f64());
        // TopK along the axis.
        let mut net = Net::new(DType::F64);
        let x = net.input("x", tensor(DType::F64, &shape, rng.distinct(n, 0.1)), false);
        let k = net.ints(&[(d + 1) / 2]);
        let y = net.node_n("TopK", &[&x, &k], vec![int("axis", axis as i64)], 2).remove(0);
        check("TopK", &net, &y, &["x"], &mut rng, &Check::f64());
    }

    /// Einsum: matrix products, batched with ellipsis, outer products, operand-private sums,
    /// implicit output.
    #[test]
    fn einsum(case in 0usize..8, seed in any::<u64>()) {
        let (eq, sa, sb): (&str, Vec<usize>, Vec<usize>) = [
            ("ij,jk->ik", vec![2, 3], vec![3, 4]),
            ("bij,bjk->bik", vec![2, 2, 3], vec![2, 3, 2]),
            ("...ij,...jk->...ik", vec![2, 1, 2, 3], vec![2, 3, 3, 2]),
            ("i,j->ij", vec![3], vec![4]),
            ("ij,kj", vec![2, 3], vec![4, 3]),
            ("bchw,bc->bhw", vec![2, 3, 2, 2], vec![2, 3]),
            ("ijk,j->i", vec![2, 3, 2], vec![3]),
            ("nchw,nckhw->nck", vec![1, 2, 2, 3], vec![1, 2, 2, 2, 3]),
        ][case].clone();
        let mut rng = Gen::new(seed);
        let mut net = Net::new(DType::F64);
        let a = net.rand_input(&mut rng, "a", &sa, -1.0, 1.0);
        let b = net.rand_input(&mut rng, "b", &sb, -1.0, 1.0);
        let y = net.node("Einsum", &[&a, &b], vec![string("equation", eq)]);
        check(&format!("Einsum {eq}"), &net, &y, &["a", "b"], &mut rng, &Check::f64());
    }

    /// BatchNormalization (inference) w.r.t. all five inputs, LayerNormalization w.r.t. input,
    /// scale and bias.
    #[test]
    fn normalisation(n in 1usize..3, c in 1usize..4, hw in prop::collection::vec(1usize..4, 0..3), axis in 1i64..3, seed in any::<u64>()) {
        let mut rng = Gen::new(seed);
        let shape = [vec![n, c], hw.clone()].concat();
        let mut net = Net::new(DType::F64);
        let x = net.rand_input(&mut rng, "x", &shape, -1.0, 1.0);
        let s = net.rand_input(&mut rng, "scale", &[c], 0.5, 1.5);
        let b = net.rand_input(&mut rng, "bias", &[c], -1.0, 1.0);
        let m = net.rand_input(&mut rng, "mean", &[c], -0.5, 0.5);
        let v = net.rand_input(&mut rng, "var", &[c], 0.5, 1.5);
        let y = net.node("BatchNormalization", &[&x, &s, &b, &m, &v], vec![float("epsilon", 1e-3)]);
        // tract refuses BatchNormalization whose parameters are graph inputs (DESIGN.md).
        check("BatchNormalization", &net, &y, &["x", "scale", "bias", "mean", "var"], &mut rng, &Check::f64().no_tract());

        let axis = axis.min(shape.len() as i64 - 1);
        let normalized = &shape[axis as usize..];
        // Over one or two elements the normalised value hardly depends on x (cancellation).
        prop_assume!(normalized.iter().product::<usize>() >= 3);
        let mut net = Net::new(DType::F64);
        let x = net.rand_input(&mut rng, "x", &shape, -1.0, 1.0);
        let s = net.rand_input(&mut rng, "scale", normalized, 0.5, 1.5);
        let b = net.rand_input(&mut rng, "bias", normalized, -1.0, 1.0);
        let y = net.node("LayerNormalization", &[&x, &s, &b], vec![int("axis", axis), float("epsilon", 1e-3)]);
        // tract's f64 LayerNormalization is only float32-accurate (differences of a few 1e-6):
        // f64 on ONNX Runtime, then the same graph in f32 on both.
        check("LayerNormalization", &net, &y, &["x", "scale", "bias"], &mut rng, &Check::f64().no_tract());
        let mut net32 = Net::new(DType::F32);
        net32.nodes = net.nodes.clone();
        for (name, t) in &net.feeds {
            net32.input(name, densa::exporter::Tensor::F32(t.to_f32()), false);
        }
        check("LayerNormalization f32", &net32, &y, &["x", "scale", "bias"], &mut rng, &Check::f32_smooth());
    }
}

/// BatchNormalization with its parameters as initializers (the layout tract accepts): the
/// input gradient agrees with tract.
#[test]
fn batch_norm_on_tract() {
    let mut rng = Gen::new(5);
    let mut net = Net::new(DType::F32);
    let x = net.rand_input(&mut rng, "x", &[2, 3, 2, 2], -1.0, 1.0);
    let params: Vec<String> = [(0.5, 1.5), (-1.0, 1.0), (-0.5, 0.5), (0.5, 1.5)]
        .iter()
        .map(|&(lo, hi)| {
            net.init(tensor(
                DType::F32,
                &[3],
                (0..3).map(|_| rng.uniform(lo, hi)).collect(),
            ))
        })
        .collect();
    let y = net.node(
        "BatchNormalization",
        &[&x, &params[0], &params[1], &params[2], &params[3]],
        vec![],
    );
    check(
        "BatchNormalization (initializers)",
        &net,
        &y,
        &["x"],
        &mut rng,
        &Check::f32_linear(),
    );
}
