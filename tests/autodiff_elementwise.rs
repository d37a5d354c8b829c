//! Gradients of elementwise ops vs central finite differences (ONNX Runtime, f64 where it has
//! kernels), and tract agreeing on the gradient graphs.

use crate::gradcheck;

use densa::exporter::DType;
use gradcheck::*;
use proptest::prelude::*;

fn shape_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..4, 1..4)
}

/// Unary ops with f64 kernels in ONNX Runtime, and the input range each needs.
const UNARY_F64: &[(&str, f64, f64)] = &[
    ("Neg", -2.0, 2.0),
    ("Abs", -2.0, 2.0),
    ("Relu", -2.0, 2.0),
    ("Sigmoid", -3.0, 3.0),
    ("Tanh", -2.0, 2.0),
    ("Exp", -1.0, 1.0),
    ("Log", 0.5, 2.0),
    ("Sqrt", 0.5, 2.0),
    ("Reciprocal", 0.5, 2.0),
    ("Sin", -2.0, 2.0),
    ("Cos", -2.0, 2.0),
];

/// Unary ops ONNX Runtime only has in f32.
const UNARY_F32: &[(&str, f64, f64)] = &[
    ("Erf", -1.5, 1.5),
    ("LeakyRelu", -2.0, 2.0),
    ("Elu", -2.0, 2.0),
    ("Selu", -2.0, 2.0),
    ("Softplus", -2.0, 2.0),
    ("HardSigmoid", -4.0, 4.0),
    ("HardSwish", -4.0, 4.0),
];

fn unary_case(op: &str, dtype: DType, lo: f64, hi: f64, shape: &[usize], seed: u64) {
    let mut rng = Gen::new(seed);
    let mut net = Net::new(dtype);
    let n: usize = shape.iter().product();
    // Away from the kinks of Relu/Abs/LeakyRelu/Elu/Selu and the corners of HardSigmoid/HardSwish.
    let v: Vec<f64> = (0..n)
        .map(|_| loop {
            let v = rng.uniform(lo, hi);
            let kinks = [0.0, -2.5, 2.5, -3.0, 3.0];
            if kinks.iter().all(|k| (v - k).abs() > 0.1) {
                break v;
            }
        })
        .collect();
    let x = net.input("x", tensor(dtype, shape, v), false);
    let y = net.node(op, &[&x], vec![]);
    let c = if dtype == DType::F64 {
        // tract lacks f64 kernels for several of these forward ops: f32 covers tract.
        Check::f64().no_tract()
    } else {
        Check::f32_smooth()
    };
    check(&format!("{op} {shape:?}"), &net, &y, &["x"], &mut rng, &c);
}

proptest! {
    #![proptest_config(cases(8))]

    /// In f64 (tight finite differences), then in f32 (tract has f32 kernels for all).
    #[test]
    fn unary_f64(shape in shape_strategy(), seed in any::<u64>()) {
        for &(op, lo, hi) in UNARY_F64 {
            unary_case(op, DType::F64, lo, hi, &shape, seed);
            unary_case(op, DType::F32, lo, hi, &shape, seed);
        }
    }

    #[test]
    fn unary_f32(shape in shape_strategy(), seed in any::<u64>()) {
        for &(op, lo, hi) in UNARY_F32 {
            unary_case(op, DType::F32, lo, hi, &shape, seed);
        }
    }

    /// Add/Sub/Mul/Div/Pow with NumPy broadcasting, shapes declared (static reduction) or
    /// unknown (reduction axes found at run time).
    #[test]
    fn binary_broadcasting(
        out_shape in prop::collection::vec(1usize..4, 1..4),
        mask_a in any::<u8>(),
        mask_b in any::<u8>(),
        drop_a in 0usize..2,
        dynamic in any::<bool>(),
        seed in any::<u64>(),
    ) {
        for op in ["Add", "Sub", "Mul", "Div", "Pow"] {
            let mut rng = Gen::new(seed);
            let mut net = Net::new(DType::F64);
            // Each operand: a suffix of the output shape with some axes set to 1.
            let operand = |mask: u8, drop: usize| -> Vec<usize> {
                let r = out_shape.len();
                let drop = drop.min(r - 1);
                out_shape[drop..]
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| if mask >> i & 1 == 1 { 1 } else { d })
                    .collect()
            };
            let sa = operand(mask_a, drop_a);
            let sb = operand(mask_b, 0);
            let positive = op == "Pow" || op == "Div";
            let (lo, hi) = if positive { (0.5, 2.0) } else { (-2.0, 2.0) };
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            let av = (0..na).map(|_| rng.uniform(lo, hi)).collect();
            let bv = (0..nb).map(|_| rng.uniform(lo, hi)).collect();
            let a = net.input("a", tensor(DType::F64, &sa, av), dynamic);
            let b = net.input("b", tensor(DType::F64, &sb, bv), dynamic);
            let y = net.node(op, &[&a, &b], vec![]);
            check(&format!("{op} {sa:?} {sb:?} dynamic={dynamic}"), &net, &y, &["a", "b"], &mut rng, &Check::f64());
        }
    }

    /// Max/Min (variadic, broadcasting), Sum, Mean, Where, Clip, PRelu.
    #[test]
    fn selections(shape in prop::collection::vec(1usize..4, 1..4), seed in any::<u64>()) {
        let n: usize = shape.iter().product();
        let mut rng = Gen::new(seed);
        let last = vec![shape[shape.len() - 1]];
        for op in ["Max", "Min", "Sum", "Mean"] {
            // ONNX Runtime has no f64 Mean.
            let dtype = if op == "Mean" { DType::F32 } else { DType::F64 };
            let mut net = Net::new(dtype);
            // Distinct values so that no two operands tie.
            let all = rng.distinct(3 * n, 0.1);
            let a = net.input("a", tensor(dtype, &shape, all[..n].to_vec()), false);
            let b = net.input("b", tensor(dtype, &shape, all[n..2 * n].to_vec()), false);
            let c = net.input("c", tensor(dtype, &last, all[2 * n..2 * n + last[0]].to_vec()), false);
            let y = net.node(op, &[&a, &b, &c], vec![]);
            let check_with = if dtype == DType::F64 { Check::f64() } else { Check::f32_linear() };
            check(&format!("{op} {shape:?}"), &net, &y, &["a", "b", "c"], &mut rng, &check_with);
        }
        // Where with a broadcast condition.
        let mut net = Net::new(DType::F64);
        let cond: Vec<bool> = (0..n).map(|_| rng.below(0, 2) == 1).collect();
        let cv = net.input("cond", densa::exporter::Tensor::Bool(ndarray::ArrayD::from_shape_vec(shape.clone(), cond).unwrap()), false);
        let a = net.rand_input(&mut rng, "a", &shape, -1.0, 1.0);
        let b = net.rand_input(&mut rng, "b", &[1], -1.0, 1.0);
        let y = net.node("Where", &[&cv, &a, &b], vec![]);
        check("Where", &net, &y, &["a", "b"], &mut rng, &Check::f64());
        // Clip with both bounds as inputs, away from the bounds.
        let mut net = Net::new(DType::F64);
        let v = rng.away_from_zero(n, -2.0, 2.0, 0.0).into_iter().map(|x| if (x.abs() - 1.0).abs() < 0.05 { x * 1.2 } else { x }).collect();
        let x = net.input("x", tensor(DType::F64, &shape, v), false);
        let lo = net.input("lo", tensor(DType::F64, &[], vec![-1.0]), false);
        let hi = net.input("hi", tensor(DType::F64, &[], vec![1.0]), false);
        let y = net.node("Clip", &[&x, &lo, &hi], vec![]);
        check("Clip", &net, &y, &["x", "lo", "hi"], &mut rng, &Check::f64());
        // PRelu with a per-last-axis slope.
        let mut net = Net::new(DType::F64);
        let v = rng.away_from_zero(n, -2.0, 2.0, 0.05);
        let x = net.input("x", tensor(DType::F64, &shape, v), false);
        let sl = net.rand_input(&mut rng, "slope", &last, 0.1, 0.5);
        let y = net.node("PRelu", &[&x, &sl], vec![]);
        check("PRelu", &net, &y, &["x", "slope"], &mut rng, &Check::f64());
    }
}

/// Pow with a constant integer exponent, Cast round trip, Identity, inference Dropout.
#[test]
fn pow_cast_identity() {
    let mut rng = Gen::new(3);
    let mut net = Net::new(DType::F64);
    let x = net.rand_input(&mut rng, "x", &[2, 3], -2.0, 2.0);
    let two = net.init(densa::exporter::Tensor::I64(ndarray::ArrayD::from_elem(
        vec![],
        3,
    )));
    let p = net.node("Pow", &[&x, &two], vec![]);
    let c = net.node("Cast", &[&p], vec![int("to", DType::F32.onnx() as i64)]);
    let c = net.node("Cast", &[&c], vec![int("to", DType::F64.onnx() as i64)]);
    let i = net.node("Identity", &[&c], vec![]);
    let d = net.node("Dropout", &[&i], vec![]);
    let mut c = Check::f64();
    c.tol = 1e-5; // the f32 round trip
    c.eps = 1e-3;
    check("Pow/Cast/Identity/Dropout", &net, &d, &["x"], &mut rng, &c);
}
