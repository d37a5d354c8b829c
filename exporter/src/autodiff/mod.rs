//! Reverse-mode automatic differentiation of ONNX graphs into standard ONNX operators.
//!
//! What the literature calls *source transformation* (as opposed to taping): the backward pass
//! is itself an ONNX graph, built once from the forward graph and run by any stock runtime
//! (ONNX Runtime CPU/CUDA, tract). No `com.microsoft` training ops, no runtime support needed.
//!
//! # How
//! 1. Facts about every forward value (element type, shape with fixed or symbolic dims, small
//!    constants) are inferred ([`infer`]).
//! 2. Only the subgraph between the `wrt` values and the loss is differentiated: a node is
//!    visited when one of its inputs depends on a `wrt` value (not through a `stop_gradient`
//!    value, an integer value or a piecewise-constant op such as `Floor`) and one of its outputs
//!    reaches the loss.
//! 3. Nodes are visited in reverse topological order. A value consumed several times gets the
//!    `Sum` of its partial gradients. Each op's rule (one module per op family) writes the
//!    vector-Jacobian product as standard ops. Gradients that are structurally zero stay
//!    *absent* (no zero tensors are materialised), as in `onnx-ad` and PyTorch's `None`.
//! 4. An op without a rule on the path is an error naming the node and the op
//!    ([`AutodiffError::Unsupported`]): never a silently wrong graph.
//!
//! # Choices that are ours
//! - Static where known, dynamic where not: rules emit constant attributes and axes when the
//!   inferred shapes decide them, and `Shape`-based subgraphs otherwise (e.g. which axes of a
//!   broadcast operand to sum over, the size of a strided convolution's input gradient).
//! - Convolution weight gradients have three formulations ([`ConvWeightGrad`]); they differ in
//!   speed per backend and per shape (DESIGN.md, "Facts measured"), not in value.
//! - The loss may be any tensor: with the default seed its gradient is ones (the gradient of
//!   `sum(loss)`); with [`GradRequest::seed_name`] it is a graph input, which is what a backward
//!   graph split from its forward graph needs.
//! - `MaxPool` is differentiated through its `Indices` output. [`with_gradients`] adds that
//!   output to the forward node (a patch of the copy it returns); [`gradients`], which emits
//!   backward nodes only, recomputes the pooling with indices when the forward node lacks them.
//!
//! # Ops with rules
//! Elementwise: Add, Sub, Mul, Div, Pow, Neg, Abs, Relu, LeakyRelu, PRelu, Elu, Selu, Sigmoid,
//! HardSigmoid, HardSwish, Tanh, Exp, Log, Sqrt, Reciprocal, Sin, Cos, Erf, Softplus, Clip, Max,
//! Min, Sum, Mean, Where, Cast, Identity, Dropout (inference). Linear algebra: MatMul (batched,
//! broadcasting, 1-D), Gemm, Einsum. Convolution: Conv, ConvTranspose (any spatial rank,
//! strides, pads, dilations, groups). Pooling: MaxPool, AveragePool, GlobalAveragePool,
//! GlobalMaxPool. Normalisation: BatchNormalization (inference mode), LayerNormalization.
//! Reductions: ReduceSum, ReduceMean, ReduceMax, ReduceMin, ReduceSumSquare, ReduceL2,
//! ReduceLogSumExp. Softmax, LogSoftmax. Shape: Reshape, Flatten, Transpose, Squeeze,
//! Unsqueeze, Expand, Tile, Concat, Split, Slice, Pad. Indexing: Gather, GatherElements,
//! GatherND, TopK. Resampling: Resize (every mode, through the transposed interpolation
//! matrix), GridSample (bilinear/nearest input gradient and bilinear grid gradient).

mod broadcast;
mod conv;
mod einsum;
mod elementwise;
pub(crate) mod emit;
mod gather;
pub mod infer;
mod linalg;
mod norm;
mod pool;
mod reduce;
mod resize;
mod shape;
mod softmax;

use std::collections::{HashMap, HashSet};

use crate::builder::{tensor_type, Dim};
use crate::onnx::{GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use crate::tensor::DType;

use emit::Emitter;
use infer::ShapeInfo;

/// How the weight gradient of a convolution is computed. All three give the same values; speed
/// differs per backend and shape (measured on ResNet-18's convolutions: patches + batched
/// MatMul is fastest on ONNX Runtime CPU, the Conv trick on tract).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConvWeightGrad {
    /// A convolution of the input (batch and channels swapped) with the output gradient as
    /// kernel, dilation = the forward stride, stride = the forward dilation. One op; skinny
    /// GEMMs on large maps.
    #[default]
    ConvTrick,
    /// `k^d` strided `Slice`s of the padded input (one per kernel tap) and one `Einsum` with the
    /// output gradient.
    PatchesEinsum,
    /// The same patches, a batched `MatMul` per sample and a `ReduceSum` over the batch.
    PatchesMatMul,
}

/// Options of the backward pass.
#[derive(Clone, Debug)]
pub struct GradOptions {
    /// Weight-gradient formulation of Conv and ConvTranspose. Default: [`ConvWeightGrad::ConvTrick`].
    pub conv_weight_grad: ConvWeightGrad,
    /// The opset of the default domain of the model being differentiated (the emitted nodes
    /// belong to it). [`with_gradients`] reads it from the model. Default:
    /// [`crate::builder::OPSET`]. At least 13.
    pub opset: i64,
}

impl Default for GradOptions {
    fn default() -> Self {
        GradOptions {
            conv_weight_grad: ConvWeightGrad::default(),
            opset: crate::builder::OPSET,
        }
    }
}

/// What to differentiate.
#[derive(Clone, Debug, Default)]
pub struct GradRequest {
    /// The value to differentiate (a scalar loss, or any tensor: see `seed_name`).
    pub loss: String,
    /// The values to differentiate with respect to: initializers, graph inputs or intermediate
    /// values. Parameters not listed are frozen.
    pub wrt: Vec<String>,
    /// Values through which no gradient flows (PyTorch's `detach`).
    pub stop_gradient: HashSet<String>,
    /// A graph input holding the gradient of the final objective with respect to `loss` (same
    /// shape as `loss`). `None`: ones, i.e. the gradient of `sum(loss)`.
    pub seed_name: Option<String>,
    /// Formulation choices and the opset.
    pub options: GradOptions,
}

impl GradRequest {
    /// A request for the gradient of `loss` with respect to `wrt`, default options.
    pub fn new(loss: &str, wrt: &[&str]) -> GradRequest {
        GradRequest {
            loss: loss.to_string(),
            wrt: wrt.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }
}

/// The backward graph: nodes and constants to append to the forward graph.
#[derive(Clone, Debug, Default)]
pub struct Gradients {
    /// Backward nodes, in topological order, after the forward nodes.
    pub nodes: Vec<NodeProto>,
    /// Constants the backward nodes use (new initializers).
    pub initializers: Vec<TensorProto>,
    /// `(wrt, gradient value)` for every `wrt` that the loss depends on, in request order.
    pub grads: Vec<(String, String)>,
    /// The `wrt` values the loss does not depend on (their gradient is zero and not emitted).
    pub absent: Vec<String>,
}

/// Why a graph could not be differentiated.
#[derive(Debug, thiserror::Error)]
pub enum AutodiffError {
    #[error("node `{node}` ({op}): no gradient rule{}", if .reason.is_empty() { String::new() } else { format!(": {}", .reason) })]
    Unsupported {
        node: String,
        op: String,
        reason: String,
    },
    #[error("node `{node}` ({op}): the gradient needs the {what} of `{value}`, which could not be inferred; declare it in the graph's value_info")]
    UnknownShape {
        node: String,
        op: String,
        value: String,
        what: &'static str,
    },
    #[error("{role} `{name}` is not a value of the graph")]
    UnknownValue { role: &'static str, name: String },
    #[error("`{0}` is both in `wrt` and in `stop_gradient`")]
    WrtStopped(String),
    #[error("node `{node}` ({op}): the gradient needs opset {needed} ({why}); the model imports opset {found}")]
    Opset {
        node: String,
        op: String,
        needed: i64,
        found: i64,
        why: &'static str,
    },
    #[error("the model imports opset {0} of the default domain; autodiff needs 13 or later")]
    OldOpset(i64),
    #[error("the model has no graph")]
    NoGraph,
    #[error("node `{node}` ({op}) uses `{value}` before any node defines it: the graph is not in topological order")]
    NotTopological {
        node: String,
        op: String,
        value: String,
    },
    #[error("name `{0}` is already used in the graph")]
    NameTaken(String),
    #[error(transparent)]
    Pass(#[from] crate::passes::PassError),
}

/// One forward node being differentiated.
pub(crate) struct Step<'a> {
    pub node: &'a NodeProto,
    /// The node's name, or `#index` when it has none.
    pub label: String,
    /// Gradient of each output (None: no gradient reaches it).
    pub dy: Vec<Option<String>>,
    /// Whether each input needs a gradient.
    pub needs: Vec<bool>,
}

impl Step<'_> {
    /// The name of input `i`, when present.
    pub fn input(&self, i: usize) -> Option<&str> {
        self.node
            .input
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Input `i`, which the op requires.
    pub fn x(&self, i: usize) -> Result<&str, AutodiffError> {
        self.input(i)
            .ok_or_else(|| self.unsupported(format!("input {i} is missing")))
    }

    /// Output `i`.
    pub fn y(&self, i: usize) -> &str {
        &self.node.output[i]
    }

    /// Whether input `i` needs a gradient.
    pub fn need(&self, i: usize) -> bool {
        self.needs.get(i).copied().unwrap_or(false)
    }

    /// The gradient of output 0 (visited nodes have one).
    pub fn dy0(&self) -> Result<&str, AutodiffError> {
        self.dy
            .first()
            .and_then(|d| d.as_deref())
            .ok_or_else(|| self.unsupported("only the gradient of output 0 is supported"))
    }

    pub fn unsupported(&self, reason: impl Into<String>) -> AutodiffError {
        AutodiffError::Unsupported {
            node: self.label.clone(),
            op: self.node.op_type.clone(),
            reason: reason.into(),
        }
    }

    pub fn unknown(&self, value: &str, what: &'static str) -> AutodiffError {
        AutodiffError::UnknownShape {
            node: self.label.clone(),
            op: self.node.op_type.clone(),
            value: value.to_string(),
            what,
        }
    }

    /// `n` empty slots for the input gradients.
    pub fn none(&self) -> Vec<Option<String>> {
        vec![None; self.node.input.len()]
    }
}

/// The state rules work with: the node writer, the facts, the options.
pub(crate) struct Ctx<'a> {
    pub e: Emitter,
    pub info: ShapeInfo,
    pub options: &'a GradOptions,
}

impl Ctx<'_> {
    /// The element type of `v`, required.
    pub fn dtype(&self, s: &Step, v: &str) -> Result<DType, AutodiffError> {
        self.info
            .dtype(v)
            .ok_or_else(|| s.unknown(v, "element type"))
    }

    /// The rank of `v`, required.
    pub fn rank(&self, s: &Step, v: &str) -> Result<usize, AutodiffError> {
        self.info.rank(v).ok_or_else(|| s.unknown(v, "rank"))
    }

    /// The shape of `v`, required (dims may be symbolic or unknown).
    pub fn shape(&self, s: &Step, v: &str) -> Result<Vec<Dim>, AutodiffError> {
        self.info.shape(v).ok_or_else(|| s.unknown(v, "shape"))
    }

    /// Fails unless the opset is at least `needed`.
    pub fn require_opset(
        &self,
        s: &Step,
        needed: i64,
        why: &'static str,
    ) -> Result<(), AutodiffError> {
        if self.e.opset < needed {
            return Err(AutodiffError::Opset {
                node: s.label.clone(),
                op: s.node.op_type.clone(),
                needed,
                found: self.e.opset,
                why,
            });
        }
        Ok(())
    }
}

type Rule = fn(&mut Ctx, &Step) -> Result<Vec<Option<String>>, AutodiffError>;

fn rule(op: &str) -> Option<Rule> {
    Some(match op {
        "Add" | "Sub" | "Mul" | "Div" | "Pow" => elementwise::binary,
        "Neg" | "Abs" | "Relu" | "LeakyRelu" | "Elu" | "Selu" | "Sigmoid" | "HardSigmoid"
        | "HardSwish" | "Tanh" | "Exp" | "Log" | "Sqrt" | "Reciprocal" | "Sin" | "Cos" | "Erf"
        | "Softplus" => elementwise::unary,
        "PRelu" => elementwise::prelu,
        "Clip" => elementwise::clip,
        "Max" | "Min" => elementwise::max_min,
        "Sum" | "Mean" => elementwise::sum_mean,
        "Where" => elementwise::where_,
        "Cast" => elementwise::cast,
        "Identity" => elementwise::identity,
        "Dropout" => elementwise::dropout,
        "MatMul" => linalg::matmul,
        "Gemm" => linalg::gemm,
        "Einsum" => einsum::einsum,
        "Conv" => conv::conv,
        "ConvTranspose" => conv::conv_transpose,
        "MaxPool" => pool::max_pool,
        "AveragePool" => pool::average_pool,
        "GlobalAveragePool" => pool::global_average_pool,
        "GlobalMaxPool" => pool::global_max_pool,
        "BatchNormalization" => norm::batch_norm,
        "LayerNormalization" => norm::layer_norm,
        "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceSumSquare" | "ReduceL2"
        | "ReduceLogSumExp" => reduce::reduce,
        "Softmax" | "LogSoftmax" => softmax::softmax,
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => shape::reshape,
        "Transpose" => shape::transpose,
        "Expand" => shape::expand,
        "Tile" => shape::tile,
        "Concat" => shape::concat,
        "Split" => shape::split,
        "Slice" => shape::slice,
        "Pad" => shape::pad,
        "Gather" => gather::gather,
        "GatherElements" => gather::gather_elements,
        "GatherND" => gather::gather_nd,
        "TopK" => gather::top_k,
        "Resize" => resize::resize,
        "GridSample" => resize::grid_sample,
        _ => return None,
    })
}

/// Ops whose floating outputs have a zero (or undefined) derivative everywhere: no gradient
/// flows through them.
const PIECEWISE_CONSTANT: &[&str] = &[
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Hardmax",
    "EyeLike",
    "ConstantOfShape",
    "RandomNormalLike",
    "RandomUniformLike",
    "Bernoulli",
];

/// Which nodes are differentiated and which of their inputs need a gradient.
struct Path {
    /// Values that depend on a `wrt` value through differentiable edges.
    active: HashSet<String>,
    /// Node indices to visit (active input and an output that reaches the loss).
    visit: Vec<bool>,
}

fn is_float(info: &ShapeInfo, v: &str) -> bool {
    info.dtype(v).is_none_or(DType::is_float)
}

fn find_path(graph: &GraphProto, req: &GradRequest, info: &ShapeInfo) -> Path {
    let mut active: HashSet<String> = req
        .wrt
        .iter()
        .filter(|w| !req.stop_gradient.contains(*w))
        .cloned()
        .collect();
    for node in &graph.node {
        let live = node.input.iter().any(|i| active.contains(i));
        if !live || PIECEWISE_CONSTANT.contains(&node.op_type.as_str()) {
            continue;
        }
        for o in &node.output {
            if !o.is_empty() && !req.stop_gradient.contains(o) && is_float(info, o) {
                active.insert(o.clone());
            }
        }
    }
    let mut reaches: HashSet<&str> = HashSet::from([req.loss.as_str()]);
    let mut visit = vec![false; graph.node.len()];
    for (i, node) in graph.node.iter().enumerate().rev() {
        let out_live = node
            .output
            .iter()
            .any(|o| reaches.contains(o.as_str()) && active.contains(o));
        if out_live {
            visit[i] = true;
            for inp in &node.input {
                if active.contains(inp) {
                    reaches.insert(inp);
                }
            }
        }
    }
    Path { active, visit }
}

fn check_names(graph: &GraphProto, req: &GradRequest) -> Result<HashSet<String>, AutodiffError> {
    let mut defined: HashSet<String> = graph
        .input
        .iter()
        .map(|i| i.name.clone())
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .collect();
    for (i, node) in graph.node.iter().enumerate() {
        for inp in node.input.iter().filter(|s| !s.is_empty()) {
            if !defined.contains(inp) {
                return Err(AutodiffError::NotTopological {
                    node: label(node, i),
                    op: node.op_type.clone(),
                    value: inp.clone(),
                });
            }
        }
        defined.extend(node.output.iter().filter(|o| !o.is_empty()).cloned());
    }
    if !defined.contains(&req.loss) {
        return Err(AutodiffError::UnknownValue {
            role: "loss",
            name: req.loss.clone(),
        });
    }
    for w in &req.wrt {
        if !defined.contains(w) {
            return Err(AutodiffError::UnknownValue {
                role: "wrt",
                name: w.clone(),
            });
        }
        if req.stop_gradient.contains(w) {
            return Err(AutodiffError::WrtStopped(w.clone()));
        }
    }
    // Every name of the graph, node names included, is taken for the writer.
    let mut taken = defined;
    taken.extend(graph.node.iter().map(|n| n.name.clone()));
    taken.extend(graph.output.iter().map(|o| o.name.clone()));
    taken.extend(graph.value_info.iter().map(|o| o.name.clone()));
    Ok(taken)
}

fn label(node: &NodeProto, i: usize) -> String {
    if node.name.is_empty() {
        format!("#{i}")
    } else {
        node.name.clone()
    }
}

/// The backward graph of `graph` for `req`: nodes and constants to append to the forward graph,
/// and the name of each gradient. The forward graph is not changed.
///
/// Errors: an unknown `loss`/`wrt` name, an op without a rule on the differentiated path, a
/// shape a rule needs that cannot be inferred, an opset below 13.
pub fn gradients(graph: &GraphProto, req: &GradRequest) -> Result<Gradients, AutodiffError> {
    if req.options.opset < 13 {
        return Err(AutodiffError::OldOpset(req.options.opset));
    }
    let taken = check_names(graph, req)?;
    let info = ShapeInfo::infer(graph);
    let path = find_path(graph, req, &info);
    let mut cx = Ctx {
        e: Emitter::new(taken, req.options.opset),
        info,
        options: &req.options,
    };
    let mut grads: HashMap<String, Vec<String>> = HashMap::new();

    // The seed.
    if path.active.contains(&req.loss) {
        let seed = match &req.seed_name {
            Some(s) => {
                if !cx.e.claim(s) {
                    return Err(AutodiffError::NameTaken(s.clone()));
                }
                s.clone()
            }
            None => {
                let dtype = cx.info.dtype(&req.loss).unwrap_or(DType::F32);
                cx.e.set_scope("seed");
                match cx.info.rank(&req.loss) {
                    Some(0) => cx.e.scalar(dtype, 1.0),
                    _ => {
                        let zeros = cx.e.zeros_like(&req.loss, dtype);
                        let one = cx.e.scalar(dtype, 1.0);
                        cx.e.add(&zeros, &one)
                    }
                }
            }
        };
        grads.insert(req.loss.clone(), vec![seed]);
    }

    for (i, node) in graph.node.iter().enumerate().rev() {
        if !path.visit[i] {
            continue;
        }
        let lab = label(node, i);
        cx.e.set_scope(&lab);
        let dy: Vec<Option<String>> = node
            .output
            .iter()
            .map(|o| accumulate(&mut cx.e, &mut grads, o))
            .collect();
        if dy.iter().all(Option::is_none) {
            continue;
        }
        let needs: Vec<bool> = node
            .input
            .iter()
            .map(|v| !v.is_empty() && path.active.contains(v))
            .collect();
        let step = Step {
            node,
            label: lab,
            dy,
            needs,
        };
        let f = rule(&node.op_type).ok_or_else(|| {
            step.unsupported(match node.op_type.as_str() {
                "If" | "Loop" | "Scan" => "control flow is not differentiated",
                _ => "",
            })
        })?;
        let dx = f(&mut cx, &step)?;
        for (k, g) in dx.into_iter().enumerate() {
            if let (Some(g), true) = (g, step.need(k)) {
                grads.entry(node.input[k].clone()).or_default().push(g);
            }
        }
    }

    cx.e.set_scope("acc");
    let mut result = Gradients::default();
    for w in &req.wrt {
        match accumulate(&mut cx.e, &mut grads, w) {
            Some(g) => result.grads.push((w.clone(), g)),
            None => result.absent.push(w.clone()),
        }
    }
    let keep: HashSet<&str> = result.grads.iter().map(|(_, g)| g.as_str()).collect();
    let (nodes, initializers) = prune(cx.e.nodes, cx.e.initializers, &keep);
    result.nodes = nodes;
    result.initializers = initializers;
    Ok(result)
}

/// The gradient of `v`, summing its parts when there are several.
fn accumulate(
    e: &mut Emitter,
    grads: &mut HashMap<String, Vec<String>>,
    v: &str,
) -> Option<String> {
    let parts = grads.get_mut(v)?;
    if parts.len() > 1 {
        let merged = concat_slice_grads(e, parts);
        let s = e.sum(&merged);
        *parts = vec![s];
    }
    parts.first().cloned()
}

/// Rewrites the gradient parts that come from static slices of one value along one axis
/// (`Pad(dy_i)` of [`emit::SliceGrad`]) as concatenations of the `dy_i`: the slices are dealt
/// into as few sets of pairwise disjoint ones as possible (a crop sliced twice lands in two
/// sets), and each contiguous run of a set becomes one `Concat` (padded once if it does not
/// cover the axis), instead of one full-size zero-padded tensor per slice, all summed. The
/// same values: each position of a set receives the one slice gradient that covers it, or
/// zero, and the sets are summed.
fn concat_slice_grads(e: &mut Emitter, parts: &[String]) -> Vec<String> {
    let mut slices: Vec<emit::SliceGrad> = Vec::new();
    let mut rest: Vec<String> = Vec::new();
    for p in parts {
        match e.slice_grads.get(p) {
            Some(g) if g.end > g.begin => slices.push(g.clone()),
            _ => rest.push(p.clone()),
        }
    }
    let first = match slices.first() {
        Some(f) if slices.len() > 1 => f.clone(),
        _ => return parts.to_vec(),
    };
    if !slices
        .iter()
        .all(|g| (g.axis, g.rank, g.dim) == (first.axis, first.rank, first.dim))
    {
        return parts.to_vec();
    }
    let (axis, rank, dim) = (first.axis, first.rank, first.dim);
    slices.sort_by_key(|g| (g.begin, g.end));
    let mut sets: Vec<Vec<emit::SliceGrad>> = Vec::new();
    for g in slices {
        match sets
            .iter_mut()
            .find(|set| set.last().is_some_and(|l| l.end <= g.begin))
        {
            Some(set) => set.push(g),
            None => sets.push(vec![g]),
        }
    }
    for set in sets {
        let mut runs: Vec<Vec<emit::SliceGrad>> = Vec::new();
        for g in set {
            match runs.last_mut() {
                Some(run) if run.last().is_some_and(|l| l.end == g.begin) => run.push(g),
                _ => runs.push(vec![g]),
            }
        }
        for run in runs {
            let pieces: Vec<&str> = run.iter().map(|g| g.dy.as_str()).collect();
            let block = if pieces.len() == 1 {
                pieces[0].to_string()
            } else {
                e.op(
                    "Concat",
                    &pieces,
                    vec![crate::builder::attr::int("axis", axis as i64)],
                )
            };
            let (begin, end) = (run[0].begin, run[run.len() - 1].end);
            if begin == 0 && end == dim {
                rest.push(block);
            } else {
                let mut pads = vec![0i64; 2 * rank];
                pads[axis] = begin;
                pads[rank + axis] = dim - end;
                let p = e.i64s(&pads);
                rest.push(e.op("Pad", &[&block, &p], vec![]));
            }
        }
    }
    rest
}

/// Drops backward nodes and constants that no kept value needs.
fn prune(
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    keep: &HashSet<&str>,
) -> (Vec<NodeProto>, Vec<TensorProto>) {
    let mut needed: HashSet<String> = keep.iter().map(|s| s.to_string()).collect();
    let mut alive = vec![false; nodes.len()];
    for (i, n) in nodes.iter().enumerate().rev() {
        if n.output.iter().any(|o| needed.contains(o)) {
            alive[i] = true;
            needed.extend(n.input.iter().cloned());
        }
    }
    let nodes = nodes
        .into_iter()
        .zip(alive)
        .filter_map(|(n, a)| a.then_some(n))
        .collect();
    let initializers = initializers
        .into_iter()
        .filter(|t| needed.contains(&t.name))
        .collect();
    (nodes, initializers)
}

/// Adds an `Indices` output to every `MaxPool` on the differentiated path that lacks one, so the
/// backward pass reads the argmax instead of recomputing the pooling. Returns the patched copy.
pub fn prepare_forward(graph: &GraphProto, req: &GradRequest) -> Result<GraphProto, AutodiffError> {
    let mut taken = check_names(graph, req)?;
    let info = ShapeInfo::infer(graph);
    let path = find_path(graph, req, &info);
    let mut out = graph.clone();
    for (i, node) in out.node.iter_mut().enumerate() {
        if path.visit[i] && node.op_type == "MaxPool" && node.output.len() == 1 {
            let base = format!("{}.indices", node.output[0]);
            let mut name = base.clone();
            let mut k = 1;
            while taken.contains(&name) {
                name = format!("{base}_{k}");
                k += 1;
            }
            taken.insert(name.clone());
            node.output.push(name);
        }
    }
    Ok(out)
}

/// A new model computing the loss and the gradient of every `wrt` value: outputs `loss` (named
/// as in `req.loss`) and `grad.<wrt>` in request order; forward and backward in one graph. The
/// input model is not mutated. A `wrt` the loss does not depend on gets a zero gradient here
/// (so the outputs always match the request); [`gradients`] reports it as absent instead.
/// With a `seed_name`, the seed becomes a graph input shaped like the loss.
pub fn with_gradients(model: &ModelProto, req: &GradRequest) -> Result<ModelProto, AutodiffError> {
    let graph = model.graph.as_ref().ok_or(AutodiffError::NoGraph)?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(crate::builder::OPSET);
    let mut req = req.clone();
    req.options.opset = opset;
    let forward = prepare_forward(graph, &req)?;
    let g = gradients(&forward, &req)?;
    let info = ShapeInfo::infer(&forward);

    let mut out = forward;
    out.node.extend(g.nodes);
    out.initializer.extend(g.initializers);
    let value_info = |name: &str, of: &str| -> ValueInfoProto {
        let dtype = info.dtype(of).unwrap_or(DType::F32);
        let shape = info.shape(of);
        ValueInfoProto {
            name: name.to_string(),
            r#type: Some(match shape {
                Some(s) => tensor_type(dtype, &s),
                None => crate::onnx::TypeProto {
                    value: Some(crate::onnx::type_proto::Value::TensorType(
                        crate::onnx::type_proto::Tensor {
                            elem_type: dtype.onnx() as i32,
                            shape: None,
                        },
                    )),
                    ..Default::default()
                },
            }),
            ..Default::default()
        }
    };
    if let Some(seed) = &req.seed_name {
        out.input.push(value_info(seed, &req.loss));
    }
    let mut outputs = vec![value_info(&req.loss, &req.loss)];
    let mut taken: HashSet<String> = out
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(out.input.iter().map(|i| i.name.clone()))
        .chain(out.initializer.iter().map(|t| t.name.clone()))
        .collect();
    let grads: HashMap<&str, &str> = g
        .grads
        .iter()
        .map(|(w, v)| (w.as_str(), v.as_str()))
        .collect();
    for w in &req.wrt {
        let name = format!("grad.{w}");
        if !taken.insert(name.clone()) {
            return Err(AutodiffError::NameTaken(name));
        }
        let node = match grads.get(w.as_str()) {
            Some(v) => NodeProto {
                name: name.clone(),
                op_type: "Identity".into(),
                input: vec![v.to_string()],
                output: vec![name.clone()],
                ..Default::default()
            },
            None => {
                let mut shape = format!("{name}.shape");
                while !taken.insert(shape.clone()) {
                    shape.push('_');
                }
                out.node.push(NodeProto {
                    name: shape.clone(),
                    op_type: "Shape".into(),
                    input: vec![w.clone()],
                    output: vec![shape.clone()],
                    ..Default::default()
                });
                let dtype = info.dtype(w).unwrap_or(DType::F32);
                let zero = emit::scalar_tensor(dtype, 0.0).to_proto("value");
                NodeProto {
                    name: name.clone(),
                    op_type: "ConstantOfShape".into(),
                    input: vec![shape],
                    output: vec![name.clone()],
                    attribute: vec![crate::builder::attr::tensor(
                        "value",
                        TensorProto {
                            dims: vec![1],
                            ..zero
                        },
                    )],
                    ..Default::default()
                }
            }
        };
        out.node.push(node);
        outputs.push(value_info(&name, w));
    }
    out.output = outputs;
    let mut model = model.clone();
    model.graph = Some(out);
    Ok(crate::passes::eliminate_dead_code(&model)?)
}
