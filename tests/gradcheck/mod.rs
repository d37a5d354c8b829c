//! Gradient checking for the autodiff tests: a forward graph, a loss `sum(y · w)` with fixed
//! random weights `w` (so the whole vector-Jacobian product is checked, not a sum), the
//! gradient graph from `densa_exporter::autodiff::with_gradients`, and central finite
//! differences of the loss on the reference backend (ONNX Runtime, or tract when ONNX Runtime
//! is unavailable and not required). The same gradient graph then runs on tract and must agree.
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::OnceLock;

use densa::exporter::autodiff::{with_gradients, ConvWeightGrad, GradRequest};
use densa::exporter::builder::{attr, tensor_type, Dim};
use densa::exporter::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    ValueInfoProto,
};
use densa::exporter::{DType, Tensor};
use densa::runtime::Backend;
use ndarray::ArrayD;

pub(crate) use crate::common;

/// The reference backend (ONNX Runtime when available) and tract.
pub struct Backends {
    pub reference: Box<dyn Backend>,
    pub reference_is_ort: bool,
    pub tract: Box<dyn Backend>,
}

pub fn backends() -> &'static Backends {
    static B: OnceLock<Backends> = OnceLock::new();
    B.get_or_init(|| match common::ort_backend() {
        Some(ort) => Backends {
            reference: ort,
            reference_is_ort: true,
            tract: common::tract_backend(),
        },
        None => Backends {
            reference: common::tract_backend(),
            reference_is_ort: false,
            tract: common::tract_backend(),
        },
    })
}

/// A deterministic generator (SplitMix64) for test values.
#[derive(Clone, Debug)]
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in [lo, hi).
    pub fn below(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo) as u64) as i64
    }
    /// Values in [lo, hi) whose magnitude is at least `gap` (away from kinks at 0).
    pub fn away_from_zero(&mut self, n: usize, lo: f64, hi: f64, gap: f64) -> Vec<f64> {
        (0..n)
            .map(|_| loop {
                let v = self.uniform(lo, hi);
                if v.abs() >= gap {
                    break v;
                }
            })
            .collect()
    }
    /// `n` distinct values at least `gap` apart, shuffled (for max/argmax ops).
    pub fn distinct(&mut self, n: usize, gap: f64) -> Vec<f64> {
        let mut v: Vec<f64> = (0..n).map(|i| (i as f64 - n as f64 / 2.0) * gap).collect();
        for i in (1..n).rev() {
            let j = self.below(0, i as i64 + 1) as usize;
            v.swap(i, j);
        }
        v
    }
}

/// A tensor of `dtype` from f64 values.
pub fn tensor(dtype: DType, shape: &[usize], v: Vec<f64>) -> Tensor {
    match dtype {
        DType::F64 => Tensor::F64(ArrayD::from_shape_vec(shape, v).unwrap()),
        DType::F32 => Tensor::F32(
            ArrayD::from_shape_vec(shape, v.into_iter().map(|x| x as f32).collect()).unwrap(),
        ),
        other => panic!("no float tensor of {other}"),
    }
}

pub fn to_f64(t: &Tensor) -> Vec<f64> {
    match t {
        Tensor::F64(a) => a.iter().copied().collect(),
        Tensor::F32(a) => a.iter().map(|&v| v as f64).collect(),
        other => other.to_f32().iter().map(|&v| v as f64).collect(),
    }
}

fn with_value(t: &Tensor, i: usize, v: f64) -> Tensor {
    let mut t = t.clone();
    match &mut t {
        Tensor::F64(a) => *a.iter_mut().nth(i).unwrap() = v,
        Tensor::F32(a) => *a.iter_mut().nth(i).unwrap() = v as f32,
        _ => panic!("perturbing a non-float tensor"),
    }
    t
}

/// A forward graph under construction, written node by node.
pub struct Net {
    pub dtype: DType,
    pub nodes: Vec<NodeProto>,
    pub inputs: Vec<ValueInfoProto>,
    pub initializers: Vec<TensorProto>,
    /// Values fed at run time (graph inputs).
    pub feeds: Vec<(String, Tensor)>,
    count: usize,
    pub opset: i64,
}

impl Net {
    pub fn new(dtype: DType) -> Net {
        Net {
            dtype,
            nodes: vec![],
            inputs: vec![],
            initializers: vec![],
            feeds: vec![],
            count: 0,
            opset: 17,
        }
    }

    /// A graph input with these values; `dynamic` declares its dims unknown.
    pub fn input(&mut self, name: &str, value: Tensor, dynamic: bool) -> String {
        let shape: Vec<Dim> = value
            .shape()
            .iter()
            .map(|&d| {
                if dynamic {
                    Dim::Unknown
                } else {
                    Dim::Fixed(d as i64)
                }
            })
            .collect();
        self.inputs.push(ValueInfoProto {
            name: name.into(),
            r#type: Some(tensor_type(value.dtype(), &shape)),
            ..Default::default()
        });
        self.feeds.push((name.into(), value));
        name.into()
    }

    /// A random float input in [lo, hi).
    pub fn rand_input(
        &mut self,
        rng: &mut Gen,
        name: &str,
        shape: &[usize],
        lo: f64,
        hi: f64,
    ) -> String {
        let n = shape.iter().product();
        let v = (0..n).map(|_| rng.uniform(lo, hi)).collect();
        let t = tensor(self.dtype, shape, v);
        self.input(name, t, false)
    }

    /// An initializer.
    pub fn init(&mut self, value: Tensor) -> String {
        self.count += 1;
        let name = format!("c{}", self.count);
        self.initializers.push(value.to_proto(&name));
        name
    }

    pub fn ints(&mut self, v: &[i64]) -> String {
        self.init(Tensor::I64(
            ArrayD::from_shape_vec(vec![v.len()], v.to_vec()).unwrap(),
        ))
    }

    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.node_n(op, inputs, attrs, 1).remove(0)
    }

    pub fn node_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        self.count += 1;
        let name = format!("{}_{}", op.to_lowercase(), self.count);
        let outputs: Vec<String> = (0..n).map(|i| format!("{name}:{i}")).collect();
        self.nodes.push(NodeProto {
            name,
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            attribute: attrs,
            ..Default::default()
        });
        outputs
    }

    /// The model whose output is `y` (element type declared, shape left to inference).
    pub fn model(&self, y: &str) -> ModelProto {
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: self.opset,
            }],
            producer_name: "densa-tests".into(),
            graph: Some(GraphProto {
                name: "forward".into(),
                node: self.nodes.clone(),
                initializer: self.initializers.clone(),
                input: self.inputs.clone(),
                output: vec![untyped_output(y, self.dtype)],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

fn untyped_output(name: &str, dtype: DType) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(densa::exporter::onnx::TypeProto {
            value: Some(densa::exporter::onnx::type_proto::Value::TensorType(
                densa::exporter::onnx::type_proto::Tensor {
                    elem_type: dtype.onnx() as i32,
                    shape: None,
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How strictly to check.
#[derive(Clone, Debug)]
pub struct Check {
    /// Finite-difference step.
    pub eps: f64,
    /// Tolerance of `max |analytic - fd| / max |analytic|`.
    pub tol: f64,
    /// Tolerance of tract against the reference backend (relative to the largest value; f32:
    /// 1e-4 as in `backbone_export.rs`, tract's transcendental kernels differ in the last bits).
    pub tract_tol: f64,
    /// Coordinates checked per `wrt` (all when there are fewer).
    pub max_coords: usize,
    /// Run the gradient graph on tract too.
    pub tract: bool,
    pub conv: ConvWeightGrad,
}

impl Check {
    /// For f64 graphs: tight.
    pub fn f64() -> Check {
        Check {
            eps: 1e-6,
            tol: 1e-6,
            // tract's f64 kernels (MatMul, LayerNormalization) sum in another order.
            tract_tol: 1e-6,
            max_coords: 48,
            tract: true,
            conv: ConvWeightGrad::default(),
        }
    }
    /// For f32 graphs of ops that are linear in the perturbed value (convolutions, pooling,
    /// resampling): a large step is exact up to rounding.
    pub fn f32_linear() -> Check {
        Check {
            eps: 0.25,
            tol: 2e-4,
            tract_tol: 1e-4,
            max_coords: 48,
            tract: true,
            conv: ConvWeightGrad::default(),
        }
    }
    /// For f32 graphs of smooth non-linear ops.
    pub fn f32_smooth() -> Check {
        Check {
            eps: 1e-2,
            tol: 1e-2,
            tract_tol: 1e-4,
            max_coords: 48,
            tract: true,
            conv: ConvWeightGrad::default(),
        }
    }
    pub fn with_eps(mut self, eps: f64) -> Check {
        self.eps = eps;
        self
    }
    pub fn no_tract(mut self) -> Check {
        self.tract = false;
        self
    }
    pub fn conv(mut self, c: ConvWeightGrad) -> Check {
        self.conv = c;
        self
    }
}

/// Appends `loss = ReduceSum(y * w)` for random fixed `w` shaped like `y` (run once to learn
/// the shape). Returns the forward+loss model.
pub fn with_loss(net: &Net, y: &str, rng: &mut Gen) -> ModelProto {
    let b = backends();
    let fwd = net.model(y);
    let mut s = b
        .reference
        .load_model(&fwd, "forward")
        .unwrap_or_else(|e| panic!("forward model does not load: {e}"));
    let out = s.run(net.feeds.clone()).expect("forward runs");
    let shape = out[0].1.shape().to_vec();
    let n: usize = shape.iter().product();
    let w = tensor(
        net.dtype,
        &shape,
        (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect(),
    );
    let mut m = fwd;
    let g = m.graph.as_mut().unwrap();
    g.initializer.push(w.to_proto("loss.w"));
    g.node.push(NodeProto {
        name: "loss.mul".into(),
        op_type: "Mul".into(),
        input: vec![y.into(), "loss.w".into()],
        output: vec!["loss.prod".into()],
        ..Default::default()
    });
    g.node.push(NodeProto {
        name: "loss".into(),
        op_type: "ReduceSum".into(),
        input: vec!["loss.prod".into()],
        output: vec!["loss".into()],
        attribute: vec![attr::int("keepdims", 0)],
        ..Default::default()
    });
    g.output = vec![untyped_output("loss", net.dtype)];
    m
}

/// The result of one check, for reporting.
#[derive(Debug)]
pub struct Report {
    pub fd_error: f64,
    pub tract_error: Option<f64>,
}

/// Checks the gradients of `sum(y · w)` with respect to `wrt` against finite differences and
/// (optionally) tract. Panics with a description on failure.
pub fn check(label: &str, net: &Net, y: &str, wrt: &[&str], rng: &mut Gen, c: &Check) -> Report {
    let req = GradRequest {
        loss: "loss".into(),
        wrt: wrt.iter().map(|s| s.to_string()).collect(),
        stop_gradient: HashSet::new(),
        seed_name: None,
        options: densa::exporter::autodiff::GradOptions {
            conv_weight_grad: c.conv,
            opset: net.opset,
        },
    };
    let forward = with_loss(net, y, rng);
    let model = with_gradients(&forward, &req)
        .unwrap_or_else(|e| panic!("{label}: differentiation failed: {e}"));
    check_model(label, &forward, &model, &net.feeds, wrt, rng, c)
}

/// Like [`check`] with a prepared forward+loss model and its gradient model.
pub fn check_model(
    label: &str,
    forward: &ModelProto,
    model: &ModelProto,
    feeds: &[(String, Tensor)],
    wrt: &[&str],
    rng: &mut Gen,
    c: &Check,
) -> Report {
    let b = backends();
    let mut gs = b
        .reference
        .load_model(model, label)
        .unwrap_or_else(|e| panic!("{label}: gradient graph does not load: {e}"));
    let grads = gs
        .run(feeds.to_vec())
        .unwrap_or_else(|e| panic!("{label}: gradient graph fails: {e}"));
    let mut fs = b.reference.load_model(forward, "forward").unwrap();
    let mut loss_at =
        |feeds: Vec<(String, Tensor)>| -> f64 { to_f64(&fs.run(feeds).unwrap()[0].1)[0] };
    let mut worst = 0f64;
    for (k, w) in wrt.iter().enumerate() {
        let (_, g) = &grads[k + 1];
        assert_eq!(grads[k + 1].0, format!("grad.{w}"), "{label}: output order");
        let analytic = to_f64(g);
        let pos = feeds.iter().position(|(n, _)| n == w).expect("wrt is fed");
        let x = feeds[pos].1.clone();
        assert_eq!(x.shape(), g.shape(), "{label}: gradient shape of {w}");
        let n = x.len();
        let coords: Vec<usize> = if n <= c.max_coords {
            (0..n).collect()
        } else {
            (0..c.max_coords)
                .map(|_| rng.below(0, n as i64) as usize)
                .collect()
        };
        let scale = analytic.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
        let xv = to_f64(&x);
        for &i in &coords {
            let mut plus = feeds.to_vec();
            plus[pos].1 = with_value(&x, i, xv[i] + c.eps);
            let mut minus = feeds.to_vec();
            minus[pos].1 = with_value(&x, i, xv[i] - c.eps);
            let fd = (loss_at(plus) - loss_at(minus)) / (2.0 * c.eps);
            let err = (fd - analytic[i]).abs() / scale;
            worst = worst.max(err);
            assert!(
                err <= c.tol,
                "{label}: d loss / d {w}[{i}]: analytic {} vs finite difference {fd} (relative error {err:.2e} > {:.1e})",
                analytic[i],
                c.tol
            );
        }
    }
    let tract_error = if c.tract && b.reference_is_ort && tract_runs_forward(label, forward, feeds)
    {
        let mut ts = b
            .tract
            .load_model(model, label)
            .unwrap_or_else(|e| panic!("{label}: tract cannot load the gradient graph: {e}"));
        let tg = ts
            .run(feeds.to_vec())
            .unwrap_or_else(|e| panic!("{label}: tract fails on the gradient graph: {e}"));
        let mut worst_t = 0f64;
        for (k, ((name, a), (_, r))) in tg.iter().zip(&grads).enumerate() {
            let (a, r) = (to_f64(a), to_f64(r));
            assert_eq!(a.len(), r.len(), "{label}: {name} size on tract");
            // The loss is a sum of terms of both signs: compare it at the scale of its terms.
            let floor = if k == 0 { 1.0 } else { 1e-6 };
            let scale = r.iter().fold(0f64, |m, v| m.max(v.abs())).max(floor);
            let d = a
                .iter()
                .zip(&r)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
                / scale;
            assert!(
                d <= c.tract_tol,
                "{label}: tract and the reference differ on {name}: relative {d:.2e}"
            );
            worst_t = worst_t.max(d);
        }
        Some(worst_t)
    } else {
        None
    };
    Report {
        fd_error: worst,
        tract_error,
    }
}

/// Proptest settings of these tests: few cases, no failure files.
pub fn cases(n: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: n,
        failure_persistence: None,
        ..Default::default()
    }
}

/// Whether tract runs the forward graph and agrees with the reference on it. Where it does not
/// (a tract limitation of the forward op), the gradient graph cannot be compared and a note
/// says so.
pub fn tract_runs_forward(label: &str, forward: &ModelProto, feeds: &[(String, Tensor)]) -> bool {
    let b = backends();
    let reference = b
        .reference
        .load_model(forward, "forward")
        .unwrap()
        .run(feeds.to_vec())
        .unwrap();
    let tract = b
        .tract
        .load_model(forward, "forward")
        .and_then(|mut s| s.run(feeds.to_vec()));
    let why = match tract {
        Err(e) => e.to_string().lines().next().unwrap_or_default().to_string(),
        Ok(t) => {
            let (r, t) = (to_f64(&reference[0].1), to_f64(&t[0].1));
            let scale = r.iter().fold(1f64, |m, v| m.max(v.abs()));
            let d = r
                .iter()
                .zip(&t)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            if r.len() == t.len() && d <= 1e-5 {
                return true;
            }
            format!("forward loss differs by {d:.1e}")
        }
    };
    eprintln!("note: {label}: tract not compared: {why}");
    false
}

pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
    attr::ints(name, v)
}
pub fn int(name: &str, v: i64) -> AttributeProto {
    attr::int(name, v)
}
pub fn float(name: &str, v: f32) -> AttributeProto {
    attr::float(name, v)
}
pub fn string(name: &str, v: &str) -> AttributeProto {
    attr::string(name, v)
}
