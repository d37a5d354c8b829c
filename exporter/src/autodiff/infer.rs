//! What the backward pass knows about each forward value: element type, shape (fixed,
//! symbolic or unknown dimensions), the value itself for small constants, and - for the 1-D
//! integer tensors that shape arithmetic builds (`Shape -> Slice -> Concat -> Reshape`) - the
//! dimensions they hold. This is a light, forward-only version of ONNX shape inference
//! (`onnx.shape_inference` with symbolic dims): rules use it to emit static attributes where
//! sizes are known and dynamic `Shape`-based subgraphs where they are not.
//!
//! Declared `value_info`, graph inputs and initializers seed it; unknown ops give unknown facts
//! (never wrong ones).

use std::collections::HashMap;

use crate::builder::ops::broadcast;
use crate::builder::{attr, read_value_info, Dim};
use crate::onnx::{GraphProto, NodeProto};
use crate::tensor::{DType, Tensor};

/// Constants above this many elements are not kept (rules only read small ones: axes, pads,
/// scales, shapes).
const MAX_CONST: usize = 4096;

/// What is known about one value.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Element type.
    pub dtype: Option<DType>,
    /// Shape (its length is the rank).
    pub shape: Option<Vec<Dim>>,
    /// The value, for small constants.
    pub value: Option<Tensor>,
    /// For 1-D integer values that hold dimensions (shape arithmetic): their entries.
    pub dims: Option<Vec<Dim>>,
}

impl Facts {
    fn typed(dtype: Option<DType>, shape: Option<Vec<Dim>>) -> Facts {
        Facts {
            dtype,
            shape,
            ..Default::default()
        }
    }

    /// The entries of a 1-D (or scalar) integer value, when known.
    pub fn dim_values(&self) -> Option<Vec<Dim>> {
        if let Some(d) = &self.dims {
            return Some(d.clone());
        }
        self.ints().map(|v| v.into_iter().map(Dim::Fixed).collect())
    }

    /// The value as integers, when it is a known integer constant.
    pub fn ints(&self) -> Option<Vec<i64>> {
        match self.value.as_ref()? {
            Tensor::I64(a) => Some(a.iter().copied().collect()),
            Tensor::I32(a) => Some(a.iter().map(|&v| v as i64).collect()),
            _ => None,
        }
    }

    /// The value as f64, when it is a known floating constant.
    pub fn floats(&self) -> Option<Vec<f64>> {
        match self.value.as_ref()? {
            Tensor::F32(a) => Some(a.iter().map(|&v| v as f64).collect()),
            Tensor::F64(a) => Some(a.iter().copied().collect()),
            Tensor::F16(a) => Some(a.iter().map(|v| v.to_f64()).collect()),
            _ => None,
        }
    }

    /// The fixed sizes of the shape, when all are known.
    pub fn fixed_shape(&self) -> Option<Vec<i64>> {
        self.shape.as_ref()?.iter().map(Dim::fixed).collect()
    }
}

/// Facts about every value of a graph.
#[derive(Clone, Debug, Default)]
pub struct ShapeInfo {
    facts: HashMap<String, Facts>,
}

impl ShapeInfo {
    /// Infers facts for every value of `graph` (nodes in topological order).
    pub fn infer(graph: &GraphProto) -> ShapeInfo {
        let mut info = ShapeInfo::default();
        for t in &graph.initializer {
            let dims: Vec<Dim> = t.dims.iter().map(|&d| Dim::Fixed(d)).collect();
            let count: i64 = t.dims.iter().product();
            let value = if count as usize <= MAX_CONST {
                Tensor::from_proto(t).ok()
            } else {
                None
            };
            info.facts.insert(
                t.name.clone(),
                Facts {
                    dtype: DType::from_onnx(t.data_type),
                    shape: Some(dims),
                    value,
                    dims: None,
                },
            );
        }
        let declared: HashMap<&str, (Option<DType>, Option<Vec<Dim>>)> = graph
            .input
            .iter()
            .chain(&graph.value_info)
            .chain(&graph.output)
            .filter_map(|vi| read_value_info(vi).map(|f| (vi.name.as_str(), f)))
            .collect();
        for vi in &graph.input {
            if info.facts.contains_key(&vi.name) {
                continue;
            }
            if let Some((dtype, shape)) = declared.get(vi.name.as_str()) {
                info.facts
                    .insert(vi.name.clone(), Facts::typed(*dtype, shape.clone()));
            }
        }
        for node in &graph.node {
            let inputs: Vec<Facts> = node
                .input
                .iter()
                .map(|n| info.facts.get(n).cloned().unwrap_or_default())
                .collect();
            let mut outs = infer_node(node, &inputs);
            outs.resize(node.output.len(), Facts::default());
            for (name, mut f) in node.output.iter().zip(outs) {
                if name.is_empty() {
                    continue;
                }
                // Declared types fill what inference could not tell.
                if let Some((dtype, shape)) = declared.get(name.as_str()) {
                    if f.dtype.is_none() {
                        f.dtype = *dtype;
                    }
                    f.shape = merge_shapes(f.shape, shape.clone());
                }
                info.facts.insert(name.clone(), f);
            }
        }
        info
    }

    /// Facts about `name` (empty facts when nothing is known).
    pub fn get(&self, name: &str) -> Facts {
        self.facts.get(name).cloned().unwrap_or_default()
    }

    /// The element type of `name`.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.facts.get(name).and_then(|f| f.dtype)
    }

    /// The shape of `name`.
    pub fn shape(&self, name: &str) -> Option<Vec<Dim>> {
        self.facts.get(name).and_then(|f| f.shape.clone())
    }

    /// The rank of `name`.
    pub fn rank(&self, name: &str) -> Option<usize> {
        self.facts
            .get(name)
            .and_then(|f| f.shape.as_ref().map(Vec::len))
    }

    /// Records facts about a value the backward pass creates.
    pub fn set(&mut self, name: &str, facts: Facts) {
        self.facts.insert(name.to_string(), facts);
    }
}

fn merge_shapes(inferred: Option<Vec<Dim>>, declared: Option<Vec<Dim>>) -> Option<Vec<Dim>> {
    match (inferred, declared) {
        (Some(a), Some(b)) if a.len() == b.len() => Some(
            a.into_iter()
                .zip(b)
                .map(|(x, y)| match (&x, &y) {
                    (Dim::Fixed(_), _) => x,
                    (_, Dim::Fixed(_)) => y,
                    (Dim::Param(_), _) => x,
                    _ => y,
                })
                .collect(),
        ),
        (Some(a), _) => Some(a),
        (None, b) => b,
    }
}

/// Normalises a possibly negative axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> usize {
    if axis < 0 {
        (axis + rank as i64).max(0) as usize
    } else {
        axis as usize
    }
}

fn dim_op(a: &Dim, b: &Dim, f: impl Fn(i64, i64) -> i64) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => Dim::Fixed(f(*x, *y)),
        _ => Dim::Unknown,
    }
}

/// The axes given by attribute `axes` or, from the opset that made it one, the input at
/// `index`.
fn axes_of(node: &NodeProto, inputs: &[Facts], index: usize) -> Option<Vec<i64>> {
    if let Some(a) = attr::get_ints(&node.attribute, "axes") {
        return Some(a.to_vec());
    }
    match node.input.get(index) {
        Some(n) if !n.is_empty() => inputs[index].ints(),
        _ => Some(vec![]),
    }
}

fn shape_of_dims(dims: &[Dim]) -> Option<Vec<Dim>> {
    Some(vec![Dim::Fixed(dims.len() as i64)])
}

fn spatial_out(
    node: &NodeProto,
    x: &[Dim],
    kernel: &[Dim],
    transpose: bool,
    ceil_mode: bool,
) -> Vec<Dim> {
    let n = kernel.len();
    let a = &node.attribute;
    let strides = attr::get_ints(a, "strides")
        .map(<[i64]>::to_vec)
        .unwrap_or(vec![1; n]);
    let dil = attr::get_ints(a, "dilations")
        .map(<[i64]>::to_vec)
        .unwrap_or(vec![1; n]);
    let pads = attr::get_ints(a, "pads")
        .map(<[i64]>::to_vec)
        .unwrap_or(vec![0; 2 * n]);
    let auto_pad = attr::get_string(a, "auto_pad").unwrap_or_else(|| "NOTSET".into());
    let out_pad = attr::get_ints(a, "output_padding")
        .map(<[i64]>::to_vec)
        .unwrap_or(vec![0; n]);
    if transpose {
        if let Some(os) = attr::get_ints(a, "output_shape") {
            if os.len() == n {
                return os.iter().map(|&v| Dim::Fixed(v)).collect();
            }
        }
    }
    (0..n)
        .map(|i| {
            let (Some(&s), Some(&d)) = (strides.get(i), dil.get(i)) else {
                return Dim::Unknown;
            };
            let Some(k) = kernel[i].fixed() else {
                return Dim::Unknown;
            };
            let keff = d * (k - 1) + 1;
            if auto_pad.starts_with("SAME") {
                return match (&x[i], transpose) {
                    (Dim::Fixed(v), false) => Dim::Fixed((v + s - 1) / s),
                    (Dim::Fixed(v), true) => Dim::Fixed(v * s),
                    (other, _) if s == 1 => other.clone(),
                    _ => Dim::Unknown,
                };
            }
            let (pb, pe) = if auto_pad == "VALID" {
                (0, 0)
            } else {
                (
                    pads.get(i).copied().unwrap_or(0),
                    pads.get(i + n).copied().unwrap_or(0),
                )
            };
            match &x[i] {
                Dim::Fixed(v) if transpose => {
                    Dim::Fixed(s * (v - 1) + out_pad.get(i).copied().unwrap_or(0) + keff - pb - pe)
                }
                Dim::Fixed(v) => {
                    let span = v + pb + pe - keff;
                    let o = if ceil_mode {
                        let mut o = (span + s - 1).div_euclid(s) + 1;
                        // The last window must start inside the input or the begin padding.
                        if (o - 1) * s >= v + pb {
                            o -= 1;
                        }
                        o
                    } else {
                        span.div_euclid(s) + 1
                    };
                    Dim::Fixed(o)
                }
                other if s == 1 && pb + pe == keff - 1 => other.clone(),
                _ => Dim::Unknown,
            }
        })
        .collect()
}

/// Parses an einsum equation into operand subscripts and the output subscript, expanding
/// `...` into upper-case letters given the operand ranks. `None` when malformed.
pub fn parse_einsum(eq: &str, ranks: &[Option<usize>]) -> Option<(Vec<Vec<char>>, Vec<char>)> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != ranks.len() {
        return None;
    }
    let ell: Vec<char> = ('A'..='Z').collect();
    let mut max_ell = 0usize;
    let mut operands = Vec::new();
    for (t, r) in terms.iter().zip(ranks) {
        if let Some((pre, post)) = t.split_once("...") {
            let explicit = pre.chars().count() + post.chars().count();
            let k = r.as_ref()?.checked_sub(explicit)?;
            max_ell = max_ell.max(k);
            let mut s: Vec<char> = pre.chars().collect();
            // Ellipsis dims align on the right, as in broadcasting.
            s.extend(ell[ell.len() - k..].iter().copied());
            s.extend(post.chars());
            operands.push(s);
        } else {
            operands.push(t.chars().collect());
        }
    }
    let ell_used: Vec<char> = ell[ell.len() - max_ell..].to_vec();
    let output = match rhs {
        Some(r) => {
            if let Some((pre, post)) = r.split_once("...") {
                let mut s: Vec<char> = pre.chars().collect();
                s.extend(ell_used.iter().copied());
                s.extend(post.chars());
                s
            } else {
                r.chars().collect()
            }
        }
        None => {
            // Implicit mode: ellipsis dims, then the letters that appear once, sorted.
            let mut counts: HashMap<char, usize> = HashMap::new();
            for s in &operands {
                for &c in s {
                    if c.is_ascii_lowercase() {
                        *counts.entry(c).or_default() += 1;
                    }
                }
            }
            let mut once: Vec<char> = counts
                .into_iter()
                .filter(|&(_, n)| n == 1)
                .map(|(c, _)| c)
                .collect();
            once.sort();
            let mut s = ell_used.clone();
            s.extend(once);
            s
        }
    };
    Some((operands, output))
}

fn infer_node(node: &NodeProto, inputs: &[Facts]) -> Vec<Facts> {
    let a = &node.attribute;
    let x = inputs.first().cloned().unwrap_or_default();
    let same = || vec![Facts::typed(x.dtype, x.shape.clone())];
    let bcast_all = |facts: &[Facts]| -> Option<Vec<Dim>> {
        let mut s: Vec<Dim> = Vec::new();
        for f in facts {
            s = broadcast(&s, f.shape.as_ref()?)?;
        }
        Some(s)
    };
    match node.op_type.as_str() {
        "Identity" => {
            let mut f = x.clone();
            f.value = x.value.clone();
            vec![f]
        }
        "Relu"
        | "Sigmoid"
        | "Tanh"
        | "Exp"
        | "Log"
        | "Sqrt"
        | "Abs"
        | "Neg"
        | "Sign"
        | "Floor"
        | "Ceil"
        | "Round"
        | "Erf"
        | "LeakyRelu"
        | "Elu"
        | "Selu"
        | "Celu"
        | "Softplus"
        | "Softsign"
        | "HardSigmoid"
        | "HardSwish"
        | "Reciprocal"
        | "Sin"
        | "Cos"
        | "Softmax"
        | "LogSoftmax"
        | "Hardmax"
        | "Mish"
        | "Clip"
        | "LpNormalization"
        | "CumSum"
        | "InstanceNormalization"
        | "GroupNormalization"
        | "Trilu"
        | "EyeLike"
        | "Shrink"
        | "ThresholdedRelu"
        | "Gelu"
        | "PRelu" => same(),
        "Not" | "IsNaN" | "IsInf" => vec![Facts::typed(Some(DType::Bool), x.shape.clone())],
        "BatchNormalization" | "LayerNormalization" | "Dropout" => {
            let mut v = same();
            if node.op_type == "Dropout" {
                v.push(Facts::typed(Some(DType::Bool), x.shape.clone()));
            }
            v
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Sum" | "Mean" | "Mod" => {
            let mut f = Facts::typed(x.dtype, bcast_all(inputs));
            // Integer shape arithmetic: keep the dims it computes.
            if let (Some(l), Some(r)) = (
                inputs.first().and_then(Facts::dim_values),
                inputs.get(1).and_then(Facts::dim_values),
            ) {
                if inputs.len() == 2 && matches!(x.dtype, Some(DType::I64) | Some(DType::I32)) {
                    let n = l.len().max(r.len());
                    let pick = |v: &Vec<Dim>, i: usize| {
                        if v.len() == 1 {
                            v[0].clone()
                        } else {
                            v.get(i).cloned().unwrap_or(Dim::Unknown)
                        }
                    };
                    let dims: Vec<Dim> = (0..n)
                        .map(|i| {
                            let (p, q) = (pick(&l, i), pick(&r, i));
                            match (node.op_type.as_str(), &p, &q) {
                                ("Mul", d, Dim::Fixed(1)) | ("Mul", Dim::Fixed(1), d) => d.clone(),
                                ("Add" | "Sub", d, Dim::Fixed(0)) => d.clone(),
                                ("Add", Dim::Fixed(0), d) => d.clone(),
                                ("Div", d, Dim::Fixed(1)) => d.clone(),
                                ("Add", _, _) => dim_op(&p, &q, |u, v| u + v),
                                ("Sub", _, _) => dim_op(&p, &q, |u, v| u - v),
                                ("Mul", _, _) => dim_op(&p, &q, |u, v| u * v),
                                ("Div", _, _) => {
                                    dim_op(&p, &q, |u, v| if v == 0 { 0 } else { u.div_euclid(v) })
                                }
                                _ => Dim::Unknown,
                            }
                        })
                        .collect();
                    f.dims = Some(dims);
                }
            }
            vec![f]
        }
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" => {
            vec![Facts::typed(Some(DType::Bool), bcast_all(inputs))]
        }
        "Where" => {
            let d = inputs.get(1).and_then(|f| f.dtype);
            vec![Facts::typed(d, bcast_all(inputs))]
        }
        "Cast" => {
            let to = DType::from_onnx(attr::get_int(a, "to", 0) as i32);
            let mut f = Facts::typed(to, x.shape.clone());
            if matches!(to, Some(DType::I64) | Some(DType::I32)) {
                f.dims = x.dim_values();
            }
            vec![f]
        }
        "Shape" => {
            let mut f = Facts::typed(Some(DType::I64), None);
            if let Some(s) = &x.shape {
                let r = s.len() as i64;
                let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let start = clamp(attr::get_int(a, "start", 0));
                let end = clamp(attr::get_int(a, "end", r));
                let dims = s[start..end.max(start)].to_vec();
                f.shape = shape_of_dims(&dims);
                f.dims = Some(dims);
            } else {
                f.shape = Some(vec![Dim::Unknown]);
            }
            vec![f]
        }
        "Size" => {
            let mut f = Facts::typed(Some(DType::I64), Some(vec![]));
            if let Some(v) = x.fixed_shape() {
                f.dims = Some(vec![Dim::Fixed(v.iter().product())]);
            }
            vec![f]
        }
        "Constant" => {
            let t = attr::find(a, "value").and_then(|v| v.t.as_ref());
            if let Some(t) = t {
                let value = Tensor::from_proto(t).ok();
                vec![Facts {
                    dtype: DType::from_onnx(t.data_type),
                    shape: Some(t.dims.iter().map(|&d| Dim::Fixed(d)).collect()),
                    value,
                    dims: None,
                }]
            } else if let Some(v) = attr::find(a, "value_ints") {
                let n = v.ints.len();
                vec![Facts {
                    dtype: Some(DType::I64),
                    shape: Some(vec![Dim::Fixed(n as i64)]),
                    value: Some(Tensor::I64(
                        ndarray::ArrayD::from_shape_vec(vec![n], v.ints.clone()).expect("1-D"),
                    )),
                    dims: None,
                }]
            } else if let Some(v) = attr::find(a, "value_int") {
                vec![Facts {
                    dtype: Some(DType::I64),
                    shape: Some(vec![]),
                    value: Some(Tensor::I64(ndarray::ArrayD::from_elem(vec![], v.i))),
                    dims: None,
                }]
            } else if let Some(v) = attr::find(a, "value_float") {
                vec![Facts {
                    dtype: Some(DType::F32),
                    shape: Some(vec![]),
                    value: Some(Tensor::F32(ndarray::ArrayD::from_elem(vec![], v.f))),
                    dims: None,
                }]
            } else {
                vec![Facts::default()]
            }
        }
        "ConstantOfShape" => {
            let dtype = attr::find(a, "value")
                .and_then(|v| v.t.as_ref())
                .map(|t| DType::from_onnx(t.data_type))
                .unwrap_or(Some(DType::F32));
            vec![Facts::typed(dtype, x.dim_values())]
        }
        "Reshape" => {
            let target = inputs.get(1).and_then(Facts::dim_values);
            let allowzero = attr::get_int(a, "allowzero", 0) == 1;
            let shape = target.map(|t| {
                let mut out: Vec<Dim> = t
                    .iter()
                    .enumerate()
                    .map(|(i, d)| match d {
                        Dim::Fixed(0) if !allowzero => x
                            .shape
                            .as_ref()
                            .and_then(|s| s.get(i).cloned())
                            .unwrap_or(Dim::Unknown),
                        other => other.clone(),
                    })
                    .collect();
                if let Some(p) = out.iter().position(|d| *d == Dim::Fixed(-1)) {
                    let total: Option<i64> = x.fixed_shape().map(|v| v.iter().product());
                    let known: Option<i64> = out
                        .iter()
                        .enumerate()
                        .filter(|&(i, _)| i != p)
                        .map(|(_, d)| d.fixed())
                        .product();
                    out[p] = match (total, known) {
                        (Some(t), Some(k)) if k > 0 => Dim::Fixed(t / k),
                        _ => Dim::Unknown,
                    };
                }
                out
            });
            let mut f = Facts::typed(x.dtype, shape);
            if x.dims.is_some() {
                f.dims = x.dims.clone();
            }
            vec![f]
        }
        "Flatten" => {
            let shape = x.shape.as_ref().map(|s| {
                let axis = norm_axis(attr::get_int(a, "axis", 1), s.len());
                let prod = |d: &[Dim]| -> Dim {
                    if d.len() == 1 {
                        return d[0].clone();
                    }
                    d.iter()
                        .try_fold(1i64, |acc, d| d.fixed().map(|v| acc * v))
                        .map(Dim::Fixed)
                        .unwrap_or(Dim::Unknown)
                };
                vec![prod(&s[..axis]), prod(&s[axis..])]
            });
            vec![Facts::typed(x.dtype, shape)]
        }
        "Transpose" => {
            let shape = x.shape.as_ref().map(|s| {
                let perm: Vec<i64> = attr::get_ints(a, "perm")
                    .map(<[i64]>::to_vec)
                    .unwrap_or_else(|| (0..s.len() as i64).rev().collect());
                perm.iter()
                    .map(|&p| s.get(p as usize).cloned().unwrap_or(Dim::Unknown))
                    .collect()
            });
            vec![Facts::typed(x.dtype, shape)]
        }
        "Squeeze" => {
            let axes = axes_of(node, inputs, 1);
            let shape = match (&x.shape, axes) {
                (Some(s), Some(axes)) if !axes.is_empty() => {
                    let axes: Vec<usize> = axes.iter().map(|&v| norm_axis(v, s.len())).collect();
                    Some(
                        s.iter()
                            .enumerate()
                            .filter(|(i, _)| !axes.contains(i))
                            .map(|(_, d)| d.clone())
                            .collect(),
                    )
                }
                (Some(s), Some(_)) if s.iter().all(|d| d.fixed().is_some()) => {
                    Some(s.iter().filter(|d| **d != Dim::Fixed(1)).cloned().collect())
                }
                _ => None,
            };
            let mut f = Facts::typed(x.dtype, shape);
            f.dims = x.dim_values();
            vec![f]
        }
        "Unsqueeze" => {
            let shape = match (&x.shape, axes_of(node, inputs, 1)) {
                (Some(s), Some(axes)) => {
                    let r = s.len() + axes.len();
                    let axes: Vec<usize> = axes.iter().map(|&v| norm_axis(v, r)).collect();
                    let mut it = s.iter();
                    Some(
                        (0..r)
                            .map(|i| {
                                if axes.contains(&i) {
                                    Dim::Fixed(1)
                                } else {
                                    it.next().cloned().unwrap_or(Dim::Unknown)
                                }
                            })
                            .collect(),
                    )
                }
                _ => None,
            };
            let mut f = Facts::typed(x.dtype, shape);
            f.dims = x.dim_values();
            vec![f]
        }
        "Concat" => {
            let shape = (|| {
                let first = x.shape.as_ref()?;
                let axis = norm_axis(attr::get_int(a, "axis", 0), first.len());
                let mut s = first.clone();
                let mut total = Some(0i64);
                for f in inputs {
                    let fs = f.shape.as_ref()?;
                    total = total.and_then(|t| fs.get(axis)?.fixed().map(|v| t + v));
                }
                s[axis] = total.map(Dim::Fixed).unwrap_or(Dim::Unknown);
                Some(s)
            })();
            let mut f = Facts::typed(x.dtype, shape);
            if matches!(x.dtype, Some(DType::I64) | Some(DType::I32)) {
                f.dims = inputs
                    .iter()
                    .map(Facts::dim_values)
                    .collect::<Option<Vec<_>>>()
                    .map(|v| v.concat());
            }
            vec![f]
        }
        "Split" => {
            let n = node.output.len();
            let Some(s) = x.shape.clone() else {
                return vec![Facts::typed(x.dtype, None); n];
            };
            let axis = norm_axis(attr::get_int(a, "axis", 0), s.len());
            let sizes: Option<Vec<i64>> = attr::get_ints(a, "split")
                .map(<[i64]>::to_vec)
                .or_else(|| inputs.get(1).and_then(Facts::ints))
                .or_else(|| {
                    let d = s.get(axis)?.fixed()?;
                    let chunk = (d + n as i64 - 1) / n as i64;
                    Some(
                        (0..n as i64)
                            .map(|i| (d - i * chunk).clamp(0, chunk))
                            .collect(),
                    )
                });
            (0..n)
                .map(|i| {
                    let mut o = s.clone();
                    o[axis] = sizes
                        .as_ref()
                        .and_then(|v| v.get(i).copied())
                        .map(Dim::Fixed)
                        .unwrap_or(Dim::Unknown);
                    Facts::typed(x.dtype, Some(o))
                })
                .collect()
        }
        "Slice" => {
            let get = |i: usize| -> Option<Vec<i64>> {
                match node.input.get(i) {
                    Some(n) if !n.is_empty() => inputs[i].ints(),
                    _ => None,
                }
            };
            let (starts, ends) = (get(1), get(2));
            let shape = x.shape.as_ref().map(|s| {
                let r = s.len();
                let mut out = s.clone();
                let (Some(starts), Some(ends)) = (starts.clone(), ends.clone()) else {
                    // Unknown bounds: every axis named (or every axis) becomes unknown.
                    match get(3) {
                        Some(axes) => {
                            for ax in axes {
                                out[norm_axis(ax, r)] = Dim::Unknown;
                            }
                        }
                        None => out.iter_mut().for_each(|d| *d = Dim::Unknown),
                    }
                    return out;
                };
                let axes = get(3).unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps = get(4).unwrap_or_else(|| vec![1; starts.len()]);
                for (k, &ax) in axes.iter().enumerate() {
                    let ax = norm_axis(ax, r);
                    out[ax] = match s[ax].fixed() {
                        Some(d) => {
                            let (b, e) = slice_bounds(starts[k], ends[k], steps[k], d);
                            Dim::Fixed(slice_len(b, e, steps[k]))
                        }
                        None if starts[k] == 0 && ends[k] >= i32::MAX as i64 && steps[k] == 1 => {
                            s[ax].clone()
                        }
                        None => Dim::Unknown,
                    };
                }
                out
            });
            let mut f = Facts::typed(x.dtype, shape);
            if let (Some(v), Some(st), Some(en)) = (x.dim_values(), starts, ends) {
                if get(3).is_none_or(|ax| ax == [0]) && get(4).is_none_or(|s| s == [1]) {
                    let (b, e) = slice_bounds(st[0], en[0], 1, v.len() as i64);
                    f.dims = Some(v[b as usize..e.max(b) as usize].to_vec());
                }
            }
            vec![f]
        }
        "Gather" => {
            let idx = inputs.get(1).cloned().unwrap_or_default();
            let shape = match (&x.shape, &idx.shape) {
                (Some(s), Some(i)) => {
                    let axis = norm_axis(attr::get_int(a, "axis", 0), s.len());
                    let mut o = s[..axis].to_vec();
                    o.extend(i.iter().cloned());
                    o.extend(s[axis + 1..].iter().cloned());
                    Some(o)
                }
                _ => None,
            };
            let mut f = Facts::typed(x.dtype, shape);
            if let (Some(v), Some(ix)) = (x.dim_values(), idx.ints()) {
                let n = v.len() as i64;
                f.dims = ix
                    .iter()
                    .map(|&i| v.get((if i < 0 { i + n } else { i }) as usize).cloned())
                    .collect();
            }
            vec![f]
        }
        "GatherElements" => vec![Facts::typed(
            x.dtype,
            inputs.get(1).and_then(|f| f.shape.clone()),
        )],
        "GatherND" => {
            let shape = (|| {
                let s = x.shape.as_ref()?;
                let i = inputs.get(1)?.shape.as_ref()?;
                let last = i.last()?.fixed()? as usize;
                let b = attr::get_int(a, "batch_dims", 0) as usize;
                let mut o = i[..i.len() - 1].to_vec();
                o.extend(s.get(b + last..)?.iter().cloned());
                Some(o)
            })();
            vec![Facts::typed(x.dtype, shape)]
        }
        "ScatterElements" | "ScatterND" | "Scatter" => same(),
        "Expand" => {
            let target = inputs.get(1).and_then(Facts::dim_values);
            let shape = match (&x.shape, target) {
                (Some(s), Some(t)) => {
                    broadcast(s, &t).or(Some(vec![Dim::Unknown; s.len().max(t.len())]))
                }
                _ => None,
            };
            vec![Facts::typed(x.dtype, shape)]
        }
        "Tile" => {
            let reps = inputs.get(1).and_then(Facts::ints);
            let shape = match (&x.shape, reps) {
                (Some(s), Some(r)) if r.len() == s.len() => Some(
                    s.iter()
                        .zip(&r)
                        .map(|(d, &k)| {
                            if k == 1 {
                                d.clone()
                            } else {
                                dim_op(d, &Dim::Fixed(k), |u, v| u * v)
                            }
                        })
                        .collect(),
                ),
                (Some(s), _) => Some(vec![Dim::Unknown; s.len()]),
                _ => None,
            };
            vec![Facts::typed(x.dtype, shape)]
        }
        "Pad" => {
            let pads = attr::get_ints(a, "pads")
                .map(<[i64]>::to_vec)
                .or_else(|| inputs.get(1).and_then(Facts::ints));
            let axes = match node.input.get(3) {
                Some(n) if !n.is_empty() => inputs[3].ints(),
                _ => None,
            };
            let shape = x.shape.as_ref().map(|s| {
                let r = s.len();
                let axes: Vec<usize> = axes
                    .map(|v| v.iter().map(|&x| norm_axis(x, r)).collect())
                    .unwrap_or_else(|| (0..r).collect());
                let mut o = s.clone();
                match &pads {
                    Some(p) if p.len() == 2 * axes.len() => {
                        for (k, &ax) in axes.iter().enumerate() {
                            let add = p[k] + p[k + axes.len()];
                            if add != 0 {
                                o[ax] = dim_op(&s[ax], &Dim::Fixed(add), |u, v| u + v);
                            }
                        }
                    }
                    _ => o.iter_mut().for_each(|d| *d = Dim::Unknown),
                }
                o
            });
            vec![Facts::typed(x.dtype, shape)]
        }
        "Conv" | "ConvTranspose" | "MaxPool" | "AveragePool" | "LpPool" => {
            let transpose = node.op_type == "ConvTranspose";
            let is_conv = node.op_type.starts_with("Conv");
            let shape = (|| {
                let s = x.shape.as_ref()?;
                if s.len() < 3 {
                    return None;
                }
                let n = s.len() - 2;
                let w = inputs.get(1).and_then(|f| f.shape.clone());
                let kernel: Vec<Dim> = match attr::get_ints(a, "kernel_shape") {
                    Some(k) => k.iter().map(|&v| Dim::Fixed(v)).collect(),
                    None => w.as_ref()?.get(2..)?.to_vec(),
                };
                if kernel.len() != n {
                    return None;
                }
                let channels = if !is_conv {
                    s[1].clone()
                } else if transpose {
                    let g = attr::get_int(a, "group", 1);
                    dim_op(&w.as_ref()?[1], &Dim::Fixed(g), |u, v| u * v)
                } else {
                    w.as_ref()?[0].clone()
                };
                let ceil = attr::get_int(a, "ceil_mode", 0) == 1;
                let mut o = vec![s[0].clone(), channels];
                o.extend(spatial_out(node, &s[2..], &kernel, transpose, ceil));
                Some(o)
            })();
            let mut v = vec![Facts::typed(x.dtype, shape.clone())];
            if node.op_type == "MaxPool" {
                v.push(Facts::typed(Some(DType::I64), shape));
            }
            v
        }
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => {
            let shape = x.shape.as_ref().map(|s| {
                s.iter()
                    .enumerate()
                    .map(|(i, d)| if i < 2 { d.clone() } else { Dim::Fixed(1) })
                    .collect()
            });
            vec![Facts::typed(x.dtype, shape)]
        }
        "Gemm" => {
            let shape = (|| {
                let sa = x.shape.as_ref()?;
                let sb = inputs.get(1)?.shape.as_ref()?;
                if sa.len() != 2 || sb.len() != 2 {
                    return None;
                }
                let m = if attr::get_int(a, "transA", 0) == 1 {
                    &sa[1]
                } else {
                    &sa[0]
                };
                let n = if attr::get_int(a, "transB", 0) == 1 {
                    &sb[0]
                } else {
                    &sb[1]
                };
                Some(vec![m.clone(), n.clone()])
            })();
            vec![Facts::typed(x.dtype, shape)]
        }
        "MatMul" => {
            let shape = (|| {
                let sa = x.shape.clone()?;
                let sb = inputs.get(1)?.shape.clone()?;
                matmul_shape(&sa, &sb)
            })();
            vec![Facts::typed(x.dtype, shape)]
        }
        "Einsum" => {
            let shape = (|| {
                let eq = attr::get_string(a, "equation")?;
                let ranks: Vec<Option<usize>> = inputs
                    .iter()
                    .map(|f| f.shape.as_ref().map(Vec::len))
                    .collect();
                let (ops, out) = parse_einsum(&eq, &ranks)?;
                let mut sizes: HashMap<char, Dim> = HashMap::new();
                for (subs, f) in ops.iter().zip(inputs) {
                    let s = f.shape.as_ref()?;
                    for (c, d) in subs.iter().zip(s) {
                        let e = sizes.entry(*c).or_insert(Dim::Fixed(1));
                        if *e == Dim::Fixed(1) {
                            *e = d.clone();
                        }
                    }
                }
                out.iter().map(|c| sizes.get(c).cloned()).collect()
            })();
            vec![Facts::typed(x.dtype, shape)]
        }
        "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1"
        | "ReduceL2" | "ReduceSumSquare" | "ReduceLogSumExp" | "ReduceLogSum" | "ArgMax"
        | "ArgMin" => {
            let arg = node.op_type.starts_with("Arg");
            let dtype = if arg { Some(DType::I64) } else { x.dtype };
            let keep = attr::get_int(a, "keepdims", 1) == 1;
            let axes = if arg {
                Some(vec![attr::get_int(a, "axis", 0)])
            } else {
                axes_of(node, inputs, 1)
            };
            let noop = attr::get_int(a, "noop_with_empty_axes", 0) == 1;
            let shape = match (&x.shape, axes) {
                (Some(s), Some(axes)) => {
                    let r = s.len();
                    let axes: Vec<usize> = if axes.is_empty() {
                        if noop {
                            vec![]
                        } else {
                            (0..r).collect()
                        }
                    } else {
                        axes.iter().map(|&v| norm_axis(v, r)).collect()
                    };
                    Some(
                        s.iter()
                            .enumerate()
                            .filter_map(|(i, d)| {
                                if !axes.contains(&i) {
                                    Some(d.clone())
                                } else if keep {
                                    Some(Dim::Fixed(1))
                                } else {
                                    None
                                }
                            })
                            .collect(),
                    )
                }
                _ => None,
            };
            vec![Facts::typed(dtype, shape)]
        }
        "Resize" | "Upsample" => {
            let sizes = match node.input.get(3) {
                Some(n) if !n.is_empty() => inputs[3].dim_values(),
                _ => None,
            };
            let scales_index = if node.op_type == "Upsample" { 1 } else { 2 };
            let scales = match node.input.get(scales_index) {
                Some(n) if !n.is_empty() => inputs[scales_index].floats(),
                _ => None,
            };
            let shape = match (&x.shape, sizes, scales) {
                (_, Some(s), _) if attr::find(a, "axes").is_none() => Some(s),
                (Some(s), None, Some(sc)) if sc.len() == s.len() => Some(
                    s.iter()
                        .zip(&sc)
                        .map(|(d, &k)| match d {
                            _ if k == 1.0 => d.clone(),
                            Dim::Fixed(v) => {
                                // Runtimes multiply in f32 or f64: unknown when they differ.
                                let a = (*v as f32 * k as f32).floor() as i64;
                                let b = (*v as f64 * k).floor() as i64;
                                if a == b {
                                    Dim::Fixed(a)
                                } else {
                                    Dim::Unknown
                                }
                            }
                            _ => Dim::Unknown,
                        })
                        .collect(),
                ),
                (Some(s), _, _) => Some(vec![Dim::Unknown; s.len()]),
                _ => None,
            };
            vec![Facts::typed(x.dtype, shape)]
        }
        "GridSample" => {
            let shape = (|| {
                let s = x.shape.as_ref()?;
                let g = inputs.get(1)?.shape.as_ref()?;
                let mut o = vec![s[0].clone(), s[1].clone()];
                o.extend(g[1..g.len() - 1].iter().cloned());
                Some(o)
            })();
            vec![Facts::typed(x.dtype, shape)]
        }
        "Range" => vec![Facts::typed(x.dtype, Some(vec![Dim::Unknown]))],
        "NonZero" => vec![Facts::typed(
            Some(DType::I64),
            x.shape
                .as_ref()
                .map(|s| vec![Dim::Fixed(s.len() as i64), Dim::Unknown]),
        )],
        "TopK" => {
            let shape = x.shape.as_ref().map(|s| {
                let mut o = s.clone();
                let ax = norm_axis(attr::get_int(a, "axis", -1), s.len());
                o[ax] = inputs
                    .get(1)
                    .and_then(Facts::ints)
                    .and_then(|k| k.first().copied())
                    .map(Dim::Fixed)
                    .unwrap_or(Dim::Unknown);
                o
            });
            vec![
                Facts::typed(x.dtype, shape.clone()),
                Facts::typed(Some(DType::I64), shape),
            ]
        }
        "RandomNormalLike" | "RandomUniformLike" => same(),
        _ => vec![],
    }
}

/// `numpy.matmul` shapes.
pub fn matmul_shape(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let a2: Vec<Dim> = if a.len() == 1 {
        vec![Dim::Fixed(1), a[0].clone()]
    } else {
        a.to_vec()
    };
    let b2: Vec<Dim> = if b.len() == 1 {
        vec![b[0].clone(), Dim::Fixed(1)]
    } else {
        b.to_vec()
    };
    let batch = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    let mut o = batch;
    if a.len() > 1 {
        o.push(a2[a2.len() - 2].clone());
    }
    if b.len() > 1 {
        o.push(b2[b2.len() - 1].clone());
    }
    Some(o)
}

/// Clamped `[begin, end)` of a Slice along an axis of size `d` (ONNX semantics).
pub fn slice_bounds(start: i64, end: i64, step: i64, d: i64) -> (i64, i64) {
    let norm = |v: i64| if v < 0 { v + d } else { v };
    if step > 0 {
        (norm(start).clamp(0, d), norm(end).clamp(0, d))
    } else {
        (norm(start).clamp(0, d - 1), norm(end).clamp(-1, d - 1))
    }
}

/// The number of elements a Slice selects between clamped bounds.
pub fn slice_len(begin: i64, end: i64, step: i64) -> i64 {
    if step > 0 {
        ((end - begin + step - 1) / step).max(0)
    } else {
        ((begin - end + (-step) - 1) / (-step)).max(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn einsum_parsing() {
        let (ops, out) = parse_einsum("ij,jk->ik", &[Some(2), Some(2)]).unwrap();
        assert_eq!(ops, vec![vec!['i', 'j'], vec!['j', 'k']]);
        assert_eq!(out, vec!['i', 'k']);
        let (ops, out) = parse_einsum("...ij,...jk", &[Some(3), Some(4)]).unwrap();
        assert_eq!(ops[0], vec!['Z', 'i', 'j']);
        assert_eq!(ops[1], vec!['Y', 'Z', 'j', 'k']);
        assert_eq!(out, vec!['Y', 'Z', 'i', 'k']);
    }

    #[test]
    fn slice_arithmetic() {
        assert_eq!(slice_bounds(0, i64::MAX, 1, 5), (0, 5));
        assert_eq!(slice_len(0, 5, 2), 3);
        assert_eq!(slice_bounds(-1, i64::MIN, -1, 5), (4, -1));
        assert_eq!(slice_len(4, -1, -2), 3);
    }
}
