//! The graph builder: write models as ONNX graphs from Rust.
//!
//! A [`GraphBuilder`] accumulates nodes, initializers, inputs and outputs. Values are typed
//! handles ([`Value`]: name, element type, shape) so every op can check its operands and compute
//! the shape of its result; the shapes are what lets `finish` write every graph output's type.
//! Names are scoped the way PyTorch names modules: inside `b.scoped("layer1.0", ..)` a parameter
//! called `conv1.weight` becomes the initializer `layer1.0.conv1.weight`.
//!
//! The ops live in [`ops`]; each is a method on the builder that adds one node.

pub mod attr;
pub mod math;
pub mod ops;

use std::collections::{HashMap, HashSet};
use std::fmt;

use ndarray::ArrayD;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::onnx::{
    tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::tensor::{DType, Tensor};

/// The ONNX opset densa emits.
pub const OPSET: i64 = 17;
/// The IR version that goes with [`OPSET`].
pub const IR_VERSION: i64 = 8;

/// One dimension of a shape as far as the builder knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A known size.
    Fixed(i64),
    /// A named symbolic size (`N`, `H`); equal names are equal sizes.
    Param(String),
    /// Not known at build time.
    Unknown,
}

impl Dim {
    /// The size if it is known.
    pub fn fixed(&self) -> Option<i64> {
        match self {
            Dim::Fixed(v) => Some(*v),
            _ => None,
        }
    }
}

impl From<i64> for Dim {
    fn from(v: i64) -> Dim {
        Dim::Fixed(v)
    }
}

impl From<i32> for Dim {
    fn from(v: i32) -> Dim {
        Dim::Fixed(v as i64)
    }
}

impl From<usize> for Dim {
    fn from(v: usize) -> Dim {
        Dim::Fixed(v as i64)
    }
}

impl From<&str> for Dim {
    fn from(v: &str) -> Dim {
        Dim::Param(v.to_string())
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Param(p) => f.write_str(p),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A shape as far as the builder knows it.
pub type Shape = Vec<Dim>;

/// Formats a shape as `[N,3,?,?]`.
pub fn shape_string(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape.iter().map(Dim::to_string).collect();
    format!("[{}]", dims.join(","))
}

/// A handle on a value of the graph under construction.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    name: String,
    dtype: DType,
    shape: Shape,
}

impl Value {
    /// The ONNX value name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The shape.
    pub fn shape(&self) -> &[Dim] {
        &self.shape
    }
    /// The rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Dimension `axis` (negative counts from the end).
    pub fn dim(&self, axis: i64) -> &Dim {
        let r = self.rank() as i64;
        let a = if axis < 0 { axis + r } else { axis };
        &self.shape[a as usize]
    }
}

/// What a named initializer is to training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// Learned by gradient descent (`weight`, `bias`).
    Param,
    /// State that is not learned by gradient (`running_mean`, `running_var`).
    Buffer,
    /// A constant of the graph (shapes, axes, scales): never part of a state dict.
    Constant,
}

/// How a parameter is initialised when no weights are loaded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// A constant.
    Constant(f32),
    /// Kaiming normal with `fan_out` mode and ReLU gain: torchvision's ResNet conv init.
    KaimingNormalFanOut,
    /// PyTorch's default conv / linear init: kaiming uniform with a = sqrt(5) on fan_in, i.e.
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    KaimingUniformFanIn,
    /// Normal with this standard deviation.
    Normal(f32),
    /// Uniform in (-bound, bound).
    Uniform(f32),
}

/// A named initializer of the graph and its role.
#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// Full (scoped) name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Role.
    pub kind: ParamKind,
}

/// Errors raised while building a graph. They name the node or value concerned.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{op} `{node}`: {message}")]
    Op {
        op: String,
        node: String,
        message: String,
    },
    #[error("name `{0}` is already used in this graph")]
    DuplicateName(String),
    #[error("initializer `{name}`: value has shape {got:?}, the model expects {expected:?}")]
    ParamShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("no value named `{0}` in this graph")]
    UnknownValue(String),
}

/// Builds one ONNX graph and the model around it.
pub struct GraphBuilder {
    graph_name: String,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<(String, Tensor)>,
    initializer_index: HashMap<String, usize>,
    params: Vec<ParamInfo>,
    used_names: HashSet<String>,
    scope: Vec<String>,
    metadata: Vec<(String, String)>,
    rng: ChaCha8Rng,
}

impl GraphBuilder {
    /// A new, empty graph. `seed` drives the random initialisation of parameters.
    pub fn new(graph_name: &str, seed: u64) -> GraphBuilder {
        GraphBuilder {
            graph_name: graph_name.to_string(),
            nodes: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            initializers: Vec::new(),
            initializer_index: HashMap::new(),
            params: Vec::new(),
            used_names: HashSet::new(),
            scope: Vec::new(),
            metadata: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Runs `f` with `name` appended to the current scope (`layer1` then `0` gives `layer1.0`).
    pub fn scoped<R>(&mut self, name: impl fmt::Display, f: impl FnOnce(&mut Self) -> R) -> R {
        self.scope.push(name.to_string());
        let r = f(self);
        self.scope.pop();
        r
    }

    /// Runs `f` with an empty scope (for nodes that carry a full module name already).
    pub fn scoped_root<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let saved = std::mem::take(&mut self.scope);
        let r = f(self);
        self.scope = saved;
        r
    }

    /// The current scope joined with `name`.
    pub fn scoped_name(&self, name: &str) -> String {
        if self.scope.is_empty() {
            name.to_string()
        } else if name.is_empty() {
            self.scope.join(".")
        } else {
            format!("{}.{}", self.scope.join("."), name)
        }
    }

    /// A name that is free in the graph, derived from `base` (`base`, `base_1`, `base_2`...).
    pub fn unique_name(&mut self, base: &str) -> String {
        let mut candidate = base.to_string();
        let mut k = 1;
        while self.used_names.contains(&candidate) {
            candidate = format!("{base}_{k}");
            k += 1;
        }
        self.used_names.insert(candidate.clone());
        candidate
    }

    fn claim_exact(&mut self, name: &str) -> Result<(), BuildError> {
        if !self.used_names.insert(name.to_string()) {
            return Err(BuildError::DuplicateName(name.to_string()));
        }
        Ok(())
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, dtype: DType, shape: Shape) -> Result<Value, BuildError> {
        self.claim_exact(name)?;
        let v = Value {
            name: name.to_string(),
            dtype,
            shape,
        };
        self.inputs.push(value_info(&v, &v.name));
        Ok(v)
    }

    /// Declares `value` as a graph output called `name` (adding an `Identity` when the value
    /// carries another name).
    pub fn output(&mut self, value: &Value, name: &str) -> Result<Value, BuildError> {
        let v = if value.name == name {
            value.clone()
        } else {
            self.claim_exact(name)?;
            let out = Value {
                name: name.to_string(),
                ..value.clone()
            };
            self.nodes.push(NodeProto {
                name: name.to_string(),
                op_type: "Identity".into(),
                input: vec![value.name.clone()],
                output: vec![name.to_string()],
                ..Default::default()
            });
            out
        };
        self.outputs.push(value_info(&v, &v.name));
        Ok(v)
    }

    /// A parameter or buffer, named in the current scope, initialised by `init`.
    pub fn param(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        kind: ParamKind,
    ) -> Result<Value, BuildError> {
        let values = crate::init::initialise(init, shape, &mut self.rng);
        self.initializer(name, Tensor::F32(values), kind)
    }

    /// A named initializer with the given value, in the current scope.
    pub fn initializer(
        &mut self,
        name: &str,
        value: Tensor,
        kind: ParamKind,
    ) -> Result<Value, BuildError> {
        let full = self.scoped_name(name);
        self.claim_exact(&full)?;
        let v = Value {
            name: full.clone(),
            dtype: value.dtype(),
            shape: value.shape().iter().map(|&d| Dim::from(d)).collect(),
        };
        self.params.push(ParamInfo {
            name: full.clone(),
            shape: value.shape().to_vec(),
            kind,
        });
        self.initializer_index
            .insert(full.clone(), self.initializers.len());
        self.initializers.push((full, value));
        Ok(v)
    }

    /// An unnamed constant (an initializer of kind [`ParamKind::Constant`]).
    pub fn constant(&mut self, value: Tensor) -> Value {
        let base = self.scoped_name("const");
        let name = self.unique_name(&base);
        let v = Value {
            name: name.clone(),
            dtype: value.dtype(),
            shape: value.shape().iter().map(|&d| Dim::from(d)).collect(),
        };
        self.params.push(ParamInfo {
            name: name.clone(),
            shape: value.shape().to_vec(),
            kind: ParamKind::Constant,
        });
        self.initializer_index
            .insert(name.clone(), self.initializers.len());
        self.initializers.push((name, value));
        v
    }

    /// A constant 1-D int64 tensor.
    pub fn const_i64(&mut self, values: &[i64]) -> Value {
        self.constant(Tensor::I64(
            ArrayD::from_shape_vec(vec![values.len()], values.to_vec()).expect("1-D"),
        ))
    }

    /// A constant f32 scalar.
    pub fn const_f32(&mut self, value: f32) -> Value {
        self.constant(Tensor::F32(ArrayD::from_elem(vec![], value)))
    }

    /// Replaces the value of the initializer `name` (full name); the shape must match.
    pub fn set_initializer(&mut self, name: &str, value: Tensor) -> Result<(), BuildError> {
        let &i = self
            .initializer_index
            .get(name)
            .ok_or_else(|| BuildError::UnknownValue(name.to_string()))?;
        let expected = self.initializers[i].1.shape().to_vec();
        if value.shape() != expected.as_slice() {
            return Err(BuildError::ParamShape {
                name: name.to_string(),
                expected,
                got: value.shape().to_vec(),
            });
        }
        self.initializers[i].1 = value;
        Ok(())
    }

    /// Changes the role of every parameter or buffer under `prefix` (whole name components:
    /// `teacher` matches `teacher.conv1.weight`) to `kind`; returns how many changed. A
    /// momentum encoder is built like its student, then becomes buffers: no gradient, state
    /// updated by its own rule.
    pub fn set_param_kind(&mut self, prefix: &str, kind: ParamKind) -> usize {
        let mut n = 0;
        for p in &mut self.params {
            let under = p.name == prefix
                || (p.name.starts_with(prefix) && p.name[prefix.len()..].starts_with('.'));
            if under && p.kind != ParamKind::Constant && p.kind != kind {
                p.kind = kind;
                n += 1;
            }
        }
        n
    }

    /// A handle on the initializer `name` (full name), to use it in new nodes.
    pub fn initializer_handle(&self, name: &str) -> Option<Value> {
        let &i = self.initializer_index.get(name)?;
        let t = &self.initializers[i].1;
        Some(Value {
            name: name.to_string(),
            dtype: t.dtype(),
            shape: t.shape().iter().map(|&d| Dim::from(d)).collect(),
        })
    }

    /// The named initializers created so far (parameters, buffers and constants).
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }

    /// The current value of an initializer.
    pub fn initializer_value(&self, name: &str) -> Option<&Tensor> {
        self.initializer_index
            .get(name)
            .map(|&i| &self.initializers[i].1)
    }

    /// Adds a `key = value` entry to the model's `metadata_props`.
    pub fn metadata(&mut self, key: &str, value: &str) {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value.to_string()));
    }

    /// Adds a node of `op_type` whose outputs have the given types; returns the output values.
    /// The node is named after the current scope (or `name_hint` inside it).
    pub fn node(
        &mut self,
        op_type: &str,
        name_hint: Option<&str>,
        inputs: &[Option<&Value>],
        attributes: Vec<AttributeProto>,
        outputs: Vec<(DType, Shape)>,
    ) -> Vec<Value> {
        // Ops without a module name of their own are named after the op: `layer1.0.relu`.
        let hint = name_hint
            .map(str::to_string)
            .unwrap_or_else(|| op_type.to_lowercase());
        let base = self.scoped_name(&hint);
        let node_name = self.unique_name(&base);
        let values: Vec<Value> = if outputs.len() == 1 {
            let (dtype, shape) = outputs.into_iter().next().expect("one output");
            vec![Value {
                name: node_name.clone(),
                dtype,
                shape,
            }]
        } else {
            outputs
                .into_iter()
                .enumerate()
                .map(|(i, (dtype, shape))| {
                    let name = self.unique_name(&format!("{node_name}:{i}"));
                    Value { name, dtype, shape }
                })
                .collect()
        };
        self.nodes.push(NodeProto {
            name: node_name,
            op_type: op_type.to_string(),
            input: inputs
                .iter()
                .map(|v| v.map(|v| v.name.clone()).unwrap_or_default())
                .collect(),
            output: values.iter().map(|v| v.name.clone()).collect(),
            attribute: attributes,
            ..Default::default()
        });
        values
    }

    /// Like [`node`](Self::node) for the common single-output case.
    pub fn node1(
        &mut self,
        op_type: &str,
        name_hint: Option<&str>,
        inputs: &[&Value],
        attributes: Vec<AttributeProto>,
        dtype: DType,
        shape: Shape,
    ) -> Value {
        let inputs: Vec<Option<&Value>> = inputs.iter().map(|v| Some(*v)).collect();
        self.node(
            op_type,
            name_hint,
            &inputs,
            attributes,
            vec![(dtype, shape)],
        )
        .pop()
        .expect("one output")
    }

    /// An error about the op being added, naming the node it would have been.
    pub fn op_error(&self, op: &str, message: impl Into<String>) -> BuildError {
        BuildError::Op {
            op: op.to_string(),
            node: self.scoped_name(&op.to_lowercase()),
            message: message.into(),
        }
    }

    /// The finished model (opset [`OPSET`]).
    pub fn finish(self) -> ModelProto {
        let graph = GraphProto {
            name: self.graph_name,
            node: self.nodes,
            initializer: self
                .initializers
                .iter()
                .map(|(n, t)| t.to_proto(n))
                .collect(),
            input: self.inputs,
            output: self.outputs,
            ..Default::default()
        };
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "densa".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(graph),
            metadata_props: self
                .metadata
                .into_iter()
                .map(|(key, value)| StringStringEntryProto { key, value })
                .collect(),
            ..Default::default()
        }
    }
}

/// The `ValueInfoProto` of a value.
pub fn value_info(v: &Value, name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(tensor_type(v.dtype, &v.shape)),
        ..Default::default()
    }
}

/// A tensor `TypeProto`.
pub fn tensor_type(dtype: DType, shape: &[Dim]) -> TypeProto {
    TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: dtype.onnx() as i32,
            shape: Some(TensorShapeProto {
                dim: shape
                    .iter()
                    .map(|d| tensor_shape_proto::Dimension {
                        value: match d {
                            Dim::Fixed(v) => {
                                Some(tensor_shape_proto::dimension::Value::DimValue(*v))
                            }
                            Dim::Param(p) => {
                                Some(tensor_shape_proto::dimension::Value::DimParam(p.clone()))
                            }
                            Dim::Unknown => None,
                        },
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    }
}

/// The element type and shape written in a `ValueInfoProto`, when it is a tensor.
pub fn read_value_info(vi: &ValueInfoProto) -> Option<(Option<DType>, Option<Shape>)> {
    match vi.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => {
            let shape = t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(tensor_shape_proto::dimension::Value::DimValue(v)) => Dim::Fixed(*v),
                        Some(tensor_shape_proto::dimension::Value::DimParam(p)) => {
                            Dim::Param(p.clone())
                        }
                        None => Dim::Unknown,
                    })
                    .collect()
            });
            Some((DType::from_onnx(t.elem_type), shape))
        }
        _ => None,
    }
}
