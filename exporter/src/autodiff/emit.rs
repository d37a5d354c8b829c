//! The node writer of the backward pass: fresh names, deduplicated constants, and the small
//! idioms every rule uses (reductions, reshapes, zeros of a shape), written for the opset of the
//! model being differentiated (attribute or input forms of `axes`).

use std::collections::{HashMap, HashSet};

use ndarray::ArrayD;

use crate::builder::attr;
use crate::onnx::{AttributeProto, NodeProto, TensorProto};
use crate::tensor::{DType, Tensor};

/// Writes the nodes and constants of the backward graph.
pub(crate) struct Emitter {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    used: HashSet<String>,
    constants: HashMap<(i32, Vec<usize>, Vec<u8>), String>,
    scope: String,
    /// The opset of the default domain the emitted nodes must belong to.
    pub opset: i64,
    /// Gradients of static one-axis slices (a `Pad` of the slice's gradient), by output name:
    /// [`super::accumulate`] concatenates those that tile their input instead of summing
    /// zero-padded full-size copies.
    pub slice_grads: HashMap<String, SliceGrad>,
}

/// The gradient of `Slice(x)[begin..end]` along `axis` (`x` has `dim` there): `dy` placed at
/// `begin` in zeros shaped like `x`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SliceGrad {
    pub dy: String,
    pub axis: usize,
    pub rank: usize,
    pub begin: i64,
    pub end: i64,
    pub dim: i64,
}

impl Emitter {
    /// A writer whose names avoid every name in `taken`.
    pub fn new(taken: HashSet<String>, opset: i64) -> Emitter {
        Emitter {
            nodes: Vec::new(),
            initializers: Vec::new(),
            used: taken,
            constants: HashMap::new(),
            scope: "grad".into(),
            opset,
            slice_grads: HashMap::new(),
        }
    }

    /// Names the nodes that follow after the forward node they differentiate.
    pub fn set_scope(&mut self, scope: &str) {
        self.scope = format!("grad/{scope}");
    }

    /// Reserves `name` exactly; false when it is taken.
    pub fn claim(&mut self, name: &str) -> bool {
        self.used.insert(name.to_string())
    }

    /// A name that is free, derived from `base`.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut candidate = base.to_string();
        let mut k = 1;
        while self.used.contains(&candidate) {
            candidate = format!("{base}_{k}");
            k += 1;
        }
        self.used.insert(candidate.clone());
        candidate
    }

    /// Adds a node with `n` outputs; returns their names. Empty input names are optional
    /// inputs left out.
    pub fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        let base = format!("{}/{}", self.scope, op);
        let name = self.fresh(&base);
        let outputs: Vec<String> = if n == 1 {
            vec![name.clone()]
        } else {
            (0..n).map(|i| self.fresh(&format!("{name}:{i}"))).collect()
        };
        self.nodes.push(NodeProto {
            name,
            op_type: op.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            attribute: attributes,
            ..Default::default()
        });
        outputs
    }

    /// Adds a single-output node; returns the output name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        self.op_n(op, inputs, attributes, 1).remove(0)
    }

    /// A constant (initializer of the backward graph), shared between identical uses.
    pub fn constant(&mut self, t: Tensor) -> String {
        let key = (t.dtype().onnx() as i32, t.shape().to_vec(), t.to_le_bytes());
        if let Some(name) = self.constants.get(&key) {
            return name.clone();
        }
        let name = self.fresh("grad/const");
        self.initializers.push(t.to_proto(&name));
        self.constants.insert(key, name.clone());
        name
    }

    /// A 1-D int64 constant.
    pub fn i64s(&mut self, v: &[i64]) -> String {
        self.constant(Tensor::I64(
            ArrayD::from_shape_vec(vec![v.len()], v.to_vec()).expect("1-D"),
        ))
    }

    /// A rank-0 int64 constant.
    pub fn i64_scalar(&mut self, v: i64) -> String {
        self.constant(Tensor::I64(ArrayD::from_elem(vec![], v)))
    }

    /// A rank-0 floating constant of element type `dtype`.
    pub fn scalar(&mut self, dtype: DType, v: f64) -> String {
        self.constant(scalar_tensor(dtype, v))
    }

    pub fn add(&mut self, a: &str, b: &str) -> String {
        self.op("Add", &[a, b], vec![])
    }
    pub fn sub(&mut self, a: &str, b: &str) -> String {
        self.op("Sub", &[a, b], vec![])
    }
    pub fn mul(&mut self, a: &str, b: &str) -> String {
        self.op("Mul", &[a, b], vec![])
    }
    pub fn div(&mut self, a: &str, b: &str) -> String {
        self.op("Div", &[a, b], vec![])
    }
    pub fn neg(&mut self, a: &str) -> String {
        self.op("Neg", &[a], vec![])
    }

    /// `Shape(x)`.
    pub fn shape(&mut self, x: &str) -> String {
        self.op("Shape", &[x], vec![])
    }

    /// `Shape(x)[start..end]` (opset 15 attributes, or a Slice before).
    pub fn shape_range(&mut self, x: &str, start: i64, end: Option<i64>) -> String {
        if self.opset >= 15 {
            let mut attrs = vec![attr::int("start", start)];
            if let Some(e) = end {
                attrs.push(attr::int("end", e));
            }
            self.op("Shape", &[x], attrs)
        } else {
            let s = self.shape(x);
            let starts = self.i64s(&[start]);
            let ends = self.i64s(&[end.unwrap_or(i64::MAX)]);
            self.op("Slice", &[&s, &starts, &ends], vec![])
        }
    }

    /// `Reshape(x, Shape(like))`.
    pub fn reshape_like(&mut self, x: &str, like: &str) -> String {
        let s = self.shape(like);
        self.op("Reshape", &[x, &s], vec![])
    }

    /// `Reshape(x, shape)` with a constant target.
    pub fn reshape_const(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.i64s(shape);
        self.op("Reshape", &[x, &s], vec![])
    }

    /// `Expand(x, Shape(like))`.
    pub fn expand_like(&mut self, x: &str, like: &str) -> String {
        let s = self.shape(like);
        self.op("Expand", &[x, &s], vec![])
    }

    /// A tensor of zeros with the shape of `like` and element type `dtype`.
    pub fn zeros_like(&mut self, like: &str, dtype: DType) -> String {
        let s = self.shape(like);
        self.zeros_of_shape(&s, dtype)
    }

    /// A tensor of zeros whose shape is the 1-D int64 value `shape`.
    pub fn zeros_of_shape(&mut self, shape: &str, dtype: DType) -> String {
        let value = scalar_tensor(dtype, 0.0).to_proto("value");
        let value = TensorProto {
            dims: vec![1],
            ..value
        };
        self.op(
            "ConstantOfShape",
            &[shape],
            vec![attr::tensor("value", value)],
        )
    }

    /// `Transpose`.
    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op("Transpose", &[x], vec![attr::ints("perm", perm)])
    }

    /// `Cast` to `dtype`.
    pub fn cast(&mut self, x: &str, dtype: DType) -> String {
        self.op("Cast", &[x], vec![attr::int("to", dtype.onnx() as i64)])
    }

    /// `Unsqueeze` (axes as input from opset 13).
    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        if self.opset >= 13 {
            let a = self.i64s(axes);
            self.op("Unsqueeze", &[x, &a], vec![])
        } else {
            self.op("Unsqueeze", &[x], vec![attr::ints("axes", axes)])
        }
    }

    /// `Squeeze` (axes as input from opset 13).
    pub fn squeeze(&mut self, x: &str, axes: &[i64]) -> String {
        if self.opset >= 13 {
            let a = self.i64s(axes);
            self.op("Squeeze", &[x, &a], vec![])
        } else {
            self.op("Squeeze", &[x], vec![attr::ints("axes", axes)])
        }
    }

    /// `ReduceSum` over constant `axes` (an empty list reduces nothing).
    pub fn reduce_sum(&mut self, x: &str, axes: &[i64], keepdims: bool) -> String {
        if axes.is_empty() {
            return x.to_string();
        }
        self.reduce("ReduceSum", x, axes, keepdims)
    }

    /// A reduction over constant, non-empty `axes`: axes as an input where the opset has it
    /// (ReduceSum from 13, the others from 18), as an attribute before.
    pub fn reduce(&mut self, op: &str, x: &str, axes: &[i64], keepdims: bool) -> String {
        let keep = attr::int("keepdims", keepdims as i64);
        let input_form = if op == "ReduceSum" {
            self.opset >= 13
        } else {
            self.opset >= 18
        };
        if input_form {
            let a = self.i64s(axes);
            self.op(op, &[x, &a], vec![keep])
        } else {
            self.op(op, &[x], vec![attr::ints("axes", axes), keep])
        }
    }

    /// `Sum` of several values (the value itself when there is one).
    pub fn sum(&mut self, values: &[String]) -> String {
        match values {
            [one] => one.clone(),
            _ => {
                let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                self.op("Sum", &refs, vec![])
            }
        }
    }

    /// The number of elements of `x` as a rank-0 value of `dtype`.
    pub fn size_as(&mut self, x: &str, dtype: DType) -> String {
        let n = self.op("Size", &[x], vec![]);
        self.cast(&n, dtype)
    }
}

/// A rank-0 tensor of a floating (or integer) element type holding `v`.
pub(crate) fn scalar_tensor(dtype: DType, v: f64) -> Tensor {
    let s: Vec<usize> = vec![];
    match dtype {
        DType::F64 => Tensor::F64(ArrayD::from_elem(s, v)),
        DType::F16 => Tensor::F16(ArrayD::from_elem(s, half::f16::from_f64(v))),
        DType::BF16 => Tensor::BF16(ArrayD::from_elem(s, half::bf16::from_f64(v))),
        DType::I64 => Tensor::I64(ArrayD::from_elem(s, v as i64)),
        DType::I32 => Tensor::I32(ArrayD::from_elem(s, v as i32)),
        DType::I8 => Tensor::I8(ArrayD::from_elem(s, v as i8)),
        DType::U8 => Tensor::U8(ArrayD::from_elem(s, v as u8)),
        DType::Bool => Tensor::Bool(ArrayD::from_elem(s, v != 0.0)),
        DType::F32 => Tensor::F32(ArrayD::from_elem(s, v as f32)),
    }
}
