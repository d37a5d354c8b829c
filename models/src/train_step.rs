//! Train-step composition: a forward graph with a scalar loss becomes a training artifact.
//!
//! What PyTorch spells `loss.backward(); clip_grad_norm_(...); optimizer.step()` (plus the
//! running-statistic updates `model.train()` makes), here one ONNX graph built once:
//!
//! 1. the caller builds the **forward** graph with a [`GraphBuilder`]: batch inputs declared
//!    with [`GraphBuilder::input`] (images, and any target tensor the host computes), learned
//!    parameters and buffers as initializers ([`GraphBuilder::param`], `ParamKind::Param` /
//!    `ParamKind::Buffer`, named as the checkpoint names them), batch norm in training mode
//!    ([`NormMode::train`](crate::nn::NormMode::train)) and a scalar float32 loss;
//! 2. [`build_train_step`] differentiates the loss with respect to the trainable parameters
//!    ([`densa_exporter::autodiff`]), optionally clips the gradients by their global norm, adds
//!    the optimizer's update ([`densa_exporter::train::optim`]), turns every parameter and
//!    buffer into a state input and names every output;
//! 3. [`train_step_artifact`] wraps that with an inference-mode **eval** graph into a
//!    [`densa_runtime::train::Artifact`] (`train_step.onnx`, `eval.onnx`, `state.safetensors`,
//!    `manifest.json`), which the [`Trainer`](densa_runtime::train::Trainer) runs on ONNX
//!    Runtime or tract.
//!
//! # The artifact's interface (the manifest contract)
//! - batch inputs: the forward graph's inputs, as declared (role `batch`);
//! - `param` inputs: every `ParamKind::Param` initializer, named as in the forward graph
//!   (torchvision names for the model zoo), next value `{name}.next`;
//! - `buffer` inputs: every `ParamKind::Buffer` initializer (`bn1.running_mean`...), next value
//!   `{name}.next` (the batch-norm update in training mode);
//! - `optimizer` inputs: the optimizer's slots and step counter (`optim.momentum_buffer.{p}`,
//!   `optim.step`), next value `{name}.next`;
//! - `hyper` inputs: float64 scalars with defaults (`optim.lr`, `optim.momentum`,
//!   `optim.weight_decay`, ..., `clip.max_norm`);
//! - outputs: `loss` (role `loss`), the caller's metrics (role `metric`; `grad_norm` too when
//!   clipping) and the `.next` values (role `state`).
//!
//! # Choices that are ours
//! - Every parameter and buffer is state, also frozen ones: a frozen parameter, a parameter the
//!   loss does not depend on (PyTorch: `p.grad is None`, so `optimizer.step()` skips it) and a
//!   buffer nothing updates are passed through unchanged (`Identity`). Checkpoints therefore
//!   always hold the whole model, and eval graphs take any checkpoint ([`eval_with_state`]).
//! - Weight decay applies to every trained parameter for SGD and AdamW (PyTorch's default with
//!   one parameter group); LARS excludes biases and normalisation parameters
//!   ([`is_bias_or_norm`]) as the self-supervised papers do. [`TrainStepConfig::exclude_bias_and_norm`]
//!   overrides either.
//! - The eval graph is the caller's inference-mode forward with the *same* parameter names and
//!   no batch-norm folding, so the trained state can replace its initializers by name.
//!
//! # Example
//! ```
//! use densa_exporter::{DType, GraphBuilder};
//! use densa_models::nn::{BatchNorm2dConfig, Conv2dConfig, NormMode};
//! use densa_models::train_step::{
//!     cross_entropy, train_step_artifact, ForwardGraph, OptimizerConfig, TrainStepConfig,
//! };
//!
//! // One builder per mode; the same seed gives the same initial weights.
//! let build = |mode: &mut NormMode, train: bool| -> Result<(GraphBuilder, _), Box<dyn std::error::Error>> {
//!     let mut b = GraphBuilder::new("tiny", 0);
//!     let x = b.input("images", DType::F32, vec!["N".into(), 3.into(), 8.into(), 8.into()])?;
//!     let conv = Conv2dConfig::new(3, 4, 3).padding(1).init(&mut b, "conv")?;
//!     let bn = BatchNorm2dConfig::new(4).init(&mut b, "bn")?;
//!     let h = conv.forward(&mut b, &x)?;
//!     let h = bn.forward_mode(&mut b, &h, mode)?;
//!     let h = b.relu(&h);
//!     let h = b.global_avg_pool(&h)?;
//!     let logits = b.flatten(&h, 1);
//!     if train {
//!         let labels = b.input("labels", DType::I64, vec!["N".into()])?;
//!         let loss = cross_entropy(&mut b, &logits, &labels)?;
//!         Ok((b, Some(loss)))
//!     } else {
//!         b.output(&logits, "logits")?;
//!         Ok((b, None))
//!     }
//! };
//! let mut mode = NormMode::train();
//! let (b, loss) = build(&mut mode, true).unwrap();
//! let forward = ForwardGraph::new(b, loss.unwrap()).norm_state(mode.into_state());
//! let (eval, _) = build(&mut NormMode::Inference, false).unwrap();
//! let config = TrainStepConfig::new(OptimizerConfig::sgd(0.1, 0.9, 1e-4));
//! let artifact = train_step_artifact(forward, Some(eval.finish()), &config).unwrap();
//! assert!(artifact.manifest().input("optim.momentum_buffer.conv.weight").is_some());
//! assert!(artifact.manifest().input("bn.running_mean").is_some());
//! ```

use std::collections::{HashMap, HashSet};

use densa_exporter::autodiff::{
    gradients, prepare_forward, AutodiffError, ConvWeightGrad, GradRequest,
};
use densa_exporter::builder::{attr, tensor_type, Dim};
use densa_exporter::onnx::{ModelProto, NodeProto, ValueInfoProto};
use densa_exporter::train::clip::{clip_grad_norm, ClipConfig};
use densa_exporter::train::optim::{
    is_bias_or_norm, AdamWConfig, LarsConfig, Optimizer, ParamGrad, SgdConfig,
};
use densa_exporter::train::{next_name, Fragment, InputRole as FragmentRole, TrainError};
use densa_exporter::weights::StateDict;
use densa_exporter::{BuildError, DType, GraphBuilder, ParamKind, Value};
use densa_runtime::train::manifest::{
    DataParallelGraphs, GlobalMean, GradEntry, HostStep, SinkhornExchange,
};
use densa_runtime::train::{Artifact, InputRole, Manifest, ManifestError, OutputRole};

/// Why a train step could not be composed. Each variant names the value or setting concerned.
#[derive(Debug, thiserror::Error)]
pub enum TrainStepError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Fragment(#[from] TrainError),
    #[error("differentiating `loss`: {0}")]
    Autodiff(#[from] AutodiffError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "the loss `{name}` is {dtype} with shape {shape}; a train step needs a float32 scalar"
    )]
    Loss {
        name: String,
        dtype: DType,
        shape: String,
    },
    #[error("trainable prefix `{prefix}` matches no parameter (parameters: {available})")]
    UnknownPrefix { prefix: String, available: String },
    #[error("nothing to train: no parameter is trainable and reaches the loss")]
    NothingToTrain,
    #[error("metric `{0}` uses a reserved name (`loss`, `grad_norm`, `*.next`, or a graph input)")]
    ReservedName(String),
    #[error("splitting the train step: {0}")]
    Split(String),
    #[error("buffer-update input `{0}` is state; declare it as a buffer initializer instead")]
    BufferState(String),
    #[error("loading weights: {0}")]
    Weights(String),
    #[error("initializer `{0}` has no value in the forward graph")]
    MissingValue(String),
}

/// Which parameters the optimizer updates (the others are frozen: passed through unchanged).
/// Prefixes match whole name components: `layer4` matches `layer4.0.conv1.weight`, not
/// `layer40.weight`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Trainable {
    /// Every parameter (`ParamKind::Param` initializer). The default.
    #[default]
    All,
    /// Only parameters under one of these prefixes (a linear probe: `["fc"]`).
    Only(Vec<String>),
    /// Every parameter except those under these prefixes (a frozen backbone stem: `["conv1",
    /// "bn1", "layer1"]`).
    Frozen(Vec<String>),
}

fn under(name: &str, prefix: &str) -> bool {
    name == prefix
        || (name.starts_with(prefix) && name[prefix.len()..].starts_with('.'))
        || prefix.is_empty()
}

impl Trainable {
    /// Whether parameter `name` is trained.
    pub fn trains(&self, name: &str) -> bool {
        match self {
            Trainable::All => true,
            Trainable::Only(p) => p.iter().any(|p| under(name, p)),
            Trainable::Frozen(p) => !p.iter().any(|p| under(name, p)),
        }
    }

    fn prefixes(&self) -> &[String] {
        match self {
            Trainable::All => &[],
            Trainable::Only(p) | Trainable::Frozen(p) => p,
        }
    }
}

/// The optimizer of a train step: `torch.optim.SGD`, `torch.optim.AdamW` or LARS (see
/// [`densa_exporter::train::optim`] for the exact update and the hyperparameter inputs).
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerConfig {
    Sgd(SgdConfig),
    AdamW(AdamWConfig),
    Lars(LarsConfig),
}

impl OptimizerConfig {
    /// SGD with momentum (dampening 0, no Nesterov) and L2 weight decay.
    pub fn sgd(lr: f64, momentum: f64, weight_decay: f64) -> OptimizerConfig {
        OptimizerConfig::Sgd(SgdConfig {
            lr,
            momentum,
            weight_decay,
            ..SgdConfig::default()
        })
    }

    /// AdamW with PyTorch's betas and eps, decoupled weight decay.
    pub fn adamw(lr: f64, weight_decay: f64) -> OptimizerConfig {
        OptimizerConfig::AdamW(AdamWConfig {
            lr,
            weight_decay,
            ..AdamWConfig::default()
        })
    }

    /// LARS with the papers' trust coefficient.
    pub fn lars(lr: f64, momentum: f64, weight_decay: f64) -> OptimizerConfig {
        OptimizerConfig::Lars(LarsConfig {
            lr,
            momentum,
            weight_decay,
            ..LarsConfig::default()
        })
    }

    fn optimizer(&self) -> &dyn Optimizer {
        match self {
            OptimizerConfig::Sgd(c) => c,
            OptimizerConfig::AdamW(c) => c,
            OptimizerConfig::Lars(c) => c,
        }
    }

    /// `sgd`, `adamw`, `lars`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd(_) => "sgd",
            OptimizerConfig::AdamW(_) => "adamw",
            OptimizerConfig::Lars(_) => "lars",
        }
    }
}

impl Default for OptimizerConfig {
    /// [`SgdConfig::default`].
    fn default() -> Self {
        OptimizerConfig::Sgd(SgdConfig::default())
    }
}

/// How a train step is composed.
#[derive(Clone, Debug, Default)]
pub struct TrainStepConfig {
    /// Default: SGD with [`SgdConfig::default`].
    pub optimizer: OptimizerConfig,
    /// Default: [`Trainable::All`].
    pub trainable: Trainable,
    /// Gradient clipping by global norm (before the optimizer); default none.
    pub clip: Option<ClipConfig>,
    /// Exclude biases and normalisation parameters from weight decay (and LARS adaptation).
    /// Default `None`: yes for LARS, no for SGD and AdamW (see the module docs).
    pub exclude_bias_and_norm: Option<bool>,
    /// The manifest's `task`; default none.
    pub task: Option<String>,
    /// Convolution weight-gradient formulation; default [`ConvWeightGrad::ConvTrick`].
    pub conv_weight_grad: ConvWeightGrad,
    /// Also emit the step cut in two for data-parallel training: a gradient graph and an
    /// update graph ([`TrainStep::data_parallel`]). The fused graph is the same either way.
    /// Default false.
    pub data_parallel: bool,
}

impl TrainStepConfig {
    /// Defaults with this optimizer.
    pub fn new(optimizer: OptimizerConfig) -> TrainStepConfig {
        TrainStepConfig {
            optimizer,
            ..TrainStepConfig::default()
        }
    }
}

/// A forward graph under construction, ready to become a train step.
pub struct ForwardGraph {
    /// The builder holding the forward graph: batch inputs, parameters, buffers, nodes.
    /// Outputs declared on it (other than the loss and metrics) are dropped.
    pub builder: GraphBuilder,
    /// The scalar float32 loss.
    pub loss: Value,
    /// Values logged every step, by output name.
    pub metrics: Vec<(String, Value)>,
    /// Buffer updates recorded while building (batch-norm running statistics:
    /// [`NormMode::into_state`](crate::nn::NormMode::into_state), momentum-encoder averages,
    /// queues). Hyperparameter inputs the fragments created (`ema.momentum`) become `hyper`
    /// inputs of the step.
    pub norm: Fragment,
    /// Values no gradient flows through (PyTorch's `detach`: SimSiam's stop-gradient branch,
    /// Sinkhorn codes).
    pub stop_gradient: HashSet<String>,
    /// Values the graph computes over its own batch which data-parallel training must compute
    /// over the global batch (SwAV's Sinkhorn codes, LC-loss's and CCOP's counts of valid
    /// entries): with [`TrainStepConfig::data_parallel`] the gradient graph is cut before them
    /// and the host computes them with every rank. The fused step keeps the graph's own.
    pub host: HostStep,
}

impl ForwardGraph {
    /// A forward graph with its loss, no metrics, no buffer updates.
    pub fn new(builder: GraphBuilder, loss: Value) -> ForwardGraph {
        ForwardGraph {
            builder,
            loss,
            metrics: Vec::new(),
            norm: Fragment::default(),
            stop_gradient: HashSet::new(),
            host: HostStep::default(),
        }
    }

    /// Declares the graph's Sinkhorn codes (see [`ForwardGraph::host`]).
    pub fn host_sinkhorn(mut self, exchange: SinkhornExchange) -> ForwardGraph {
        self.host.sinkhorn = Some(exchange);
        self
    }

    /// Declares a mean over the selected entries of the batch, `sum / denominator` with
    /// `denominator = max(count, floor)` (see [`ForwardGraph::host`], [`GlobalMean`]).
    pub fn global_mean(mut self, count: &Value, denominator: &Value, floor: f64) -> ForwardGraph {
        self.host.means.push(GlobalMean {
            count: count.name().to_string(),
            denominator: denominator.name().to_string(),
            floor,
        });
        self
    }

    /// Stops the gradient at `value` (PyTorch: `value.detach()`).
    pub fn stop_gradient(mut self, value: &Value) -> ForwardGraph {
        self.stop_gradient.insert(value.name().to_string());
        self
    }

    /// Adds a metric output.
    pub fn metric(mut self, name: &str, value: Value) -> ForwardGraph {
        self.metrics.push((name.to_string(), value));
        self
    }

    /// Sets the buffer updates (usually `mode.into_state()`).
    pub fn norm_state(mut self, norm: Fragment) -> ForwardGraph {
        self.norm.extend(norm);
        self
    }
}

/// A composed train step: the graph, its manifest and its initial state (see the module docs
/// for the interface).
#[derive(Clone, Debug)]
pub struct TrainStep {
    pub graph: ModelProto,
    pub manifest: Manifest,
    pub state: StateDict,
    /// The values computed by the forward pass (before the backward and the update), for
    /// [`split_train_step`].
    pub forward_values: HashSet<String>,
    /// With [`TrainStepConfig::data_parallel`]: the gradient and update graphs, the
    /// (parameter, gradient) pairs and the host step, for [`Artifact::with_data_parallel`].
    pub data_parallel: Option<(DataParallelGraphs, Vec<GradEntry>, HostStep)>,
}

/// Composes the train step of `forward` (see the module docs).
pub fn build_train_step(
    forward: ForwardGraph,
    config: &TrainStepConfig,
) -> Result<TrainStep, TrainStepError> {
    let ForwardGraph {
        builder: mut b,
        loss,
        metrics,
        norm,
        stop_gradient,
        host,
    } = forward;
    if loss.dtype() != DType::F32 || !loss.shape().iter().all(|d| d.fixed() == Some(1)) {
        return Err(TrainStepError::Loss {
            name: loss.name().to_string(),
            dtype: loss.dtype(),
            shape: densa_exporter::builder::shape_string(loss.shape()),
        });
    }

    // The model's state: parameters and buffers, with their values.
    let mut params: Vec<(String, Vec<usize>)> = Vec::new();
    let mut buffers: Vec<(String, Vec<usize>)> = Vec::new();
    let mut state = StateDict::new();
    for p in b.params() {
        let list = match p.kind {
            ParamKind::Param => &mut params,
            ParamKind::Buffer => &mut buffers,
            ParamKind::Constant => continue,
        };
        list.push((p.name.clone(), p.shape.clone()));
        let value = b
            .initializer_value(&p.name)
            .ok_or_else(|| TrainStepError::MissingValue(p.name.clone()))?;
        state.insert(p.name.clone(), value.clone());
    }
    for prefix in config.trainable.prefixes() {
        if !params.iter().any(|(n, _)| under(n, prefix)) {
            let available: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
            return Err(TrainStepError::UnknownPrefix {
                prefix: prefix.clone(),
                available: available.join(", "),
            });
        }
    }

    // Forward outputs: loss, metrics, buffer updates.
    b.output(&loss, "loss")?;
    let mut metric_names = Vec::new();
    for (name, v) in &metrics {
        if name == "loss" || name == "grad_norm" || name.ends_with(".next") {
            return Err(TrainStepError::ReservedName(name.clone()));
        }
        b.output(v, name)?;
        metric_names.push(name.clone());
    }
    norm.declare_outputs(&mut b)?;
    let norm_fragment = Fragment {
        inputs: norm.inputs.clone(),
        updates: Vec::new(),
    };
    if let Some(i) = norm.inputs.iter().find(|i| i.role == FragmentRole::State) {
        return Err(TrainStepError::BufferState(i.name.clone()));
    }
    let updated_buffers: HashSet<String> = norm.updates.iter().map(|u| u.name.clone()).collect();
    let model = b.finish();
    let graph = model.graph.as_ref().ok_or(AutodiffError::NoGraph)?;
    let batch_inputs: Vec<String> = graph
        .input
        .iter()
        .map(|i| i.name.clone())
        .filter(|n| !norm_fragment.inputs.iter().any(|f| &f.name == n))
        .collect();
    if metric_names.iter().any(|m| batch_inputs.contains(m)) {
        let m = metric_names.iter().find(|m| batch_inputs.contains(m));
        return Err(TrainStepError::ReservedName(m.cloned().unwrap_or_default()));
    }
    // Only the outputs the step declares (loss, metrics, buffer `.next`).
    let keep: HashSet<String> = std::iter::once("loss".to_string())
        .chain(metric_names.iter().cloned())
        .chain(norm.updates.iter().map(|u| next_name(&u.name)))
        .collect();
    let mut graph = graph.clone();
    graph.output.retain(|o| keep.contains(&o.name));

    // Backward.
    let wrt: Vec<String> = params
        .iter()
        .filter(|(n, _)| config.trainable.trains(n))
        .map(|(n, _)| n.clone())
        .collect();
    let mut req = GradRequest {
        loss: "loss".into(),
        wrt: wrt.clone(),
        stop_gradient,
        ..GradRequest::default()
    };
    req.options.conv_weight_grad = config.conv_weight_grad;
    if let Some(o) = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
    {
        req.options.opset = o.version;
    }
    let mut graph = prepare_forward(&graph, &req)?;
    let forward_values: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .collect();
    let grads = gradients(&graph, &req)?;
    graph.node.extend(grads.nodes);
    graph.initializer.extend(grads.initializers);
    if grads.grads.is_empty() {
        return Err(TrainStepError::NothingToTrain);
    }

    // The optimizer, built in its own builder whose inputs are the parameters and gradients,
    // then appended. Every name of the graph so far is claimed first so nothing collides.
    let shapes: HashMap<&str, &Vec<usize>> = params.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let mut ob = GraphBuilder::new("optimizer", 0);
    let fixed = |s: &[usize]| s.iter().map(|&d| Dim::from(d)).collect::<Vec<_>>();
    let mut pg = Vec::new();
    let mut glue = HashSet::new();
    for (p, g) in &grads.grads {
        let shape = fixed(shapes[p.as_str()]);
        let pv = ob.input(p, DType::F32, shape.clone())?;
        let gv = ob.input(g, DType::F32, shape)?;
        glue.insert(p.clone());
        glue.insert(g.clone());
        pg.push((pv, gv));
    }
    for name in graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().chain(std::iter::once(&n.name)))
        .chain(graph.initializer.iter().map(|t| &t.name))
        .chain(graph.input.iter().map(|i| &i.name))
        .chain(params.iter().chain(&buffers).map(|(n, _)| n))
    {
        if !glue.contains(name) {
            ob.unique_name(name);
        }
    }
    let mut fragment = Fragment::default();
    let mut grad_values: Vec<Value> = pg.iter().map(|(_, g)| g.clone()).collect();
    if let Some(clip) = &config.clip {
        let clipped = clip_grad_norm(&mut ob, &grad_values, clip)?;
        grad_values = clipped.grads;
        ob.output(&clipped.total_norm, "grad_norm")?;
        metric_names.push("grad_norm".into());
        fragment.extend(clipped.fragment);
    }
    let exclude = config
        .exclude_bias_and_norm
        .unwrap_or(matches!(config.optimizer, OptimizerConfig::Lars(_)));
    let param_grads: Vec<ParamGrad> = pg
        .iter()
        .zip(&grad_values)
        .map(|((p, _), g)| ParamGrad {
            param: p.clone(),
            grad: g.clone(),
            exclude: exclude && is_bias_or_norm(p.name(), p.rank()),
        })
        .collect();
    fragment.extend(config.optimizer.optimizer().update(&mut ob, &param_grads)?);
    fragment.declare_outputs(&mut ob)?;
    let opt = ob.finish().graph.unwrap_or_default();
    let data_parallel = if config.data_parallel {
        let grad_pairs: Vec<(String, String)> = grads.grads.clone();
        let (graphs, entries) = data_parallel_graphs(
            &model,
            &graph,
            &opt,
            &grad_pairs,
            &params,
            &buffers,
            &updated_buffers,
        )?;
        let graphs = if host.is_empty() {
            graphs
        } else {
            host_step_cut(graphs, &host, &forward_values)?
        };
        Some((graphs, entries, host))
    } else {
        None
    };
    graph.node.extend(opt.node);
    graph.initializer.extend(opt.initializer);
    graph
        .input
        .extend(opt.input.into_iter().filter(|i| !glue.contains(&i.name)));
    graph.output.extend(opt.output);

    // Parameters and buffers become state inputs; the ones nothing updates pass through.
    let updated: HashSet<&str> = fragment
        .updates
        .iter()
        .map(|u| u.name.as_str())
        .chain(updated_buffers.iter().map(String::as_str))
        .collect();
    let state_names: HashSet<&str> = params
        .iter()
        .chain(&buffers)
        .map(|(n, _)| n.as_str())
        .collect();
    graph
        .initializer
        .retain(|t| !state_names.contains(t.name.as_str()));
    for (name, shape) in params.iter().chain(&buffers) {
        let ty = tensor_type(DType::F32, &fixed(shape));
        graph.input.push(ValueInfoProto {
            name: name.clone(),
            r#type: Some(ty.clone()),
            ..Default::default()
        });
        if !updated.contains(name.as_str()) {
            let next = next_name(name);
            graph.node.push(NodeProto {
                name: next.clone(),
                op_type: "Identity".into(),
                input: vec![name.clone()],
                output: vec![next.clone()],
                ..Default::default()
            });
            graph.output.push(ValueInfoProto {
                name: next,
                r#type: Some(ty),
                ..Default::default()
            });
        }
    }
    // The manifest, in a stable order: batch, params, buffers, optimizer state, hyper.
    let mut manifest = Manifest::new();
    if let Some(task) = &config.task {
        manifest = manifest.task(task);
    }
    for name in &batch_inputs {
        manifest = manifest.batch(name);
    }
    for (name, _) in &params {
        manifest = manifest.state(name, InputRole::Param, &next_name(name));
    }
    for (name, _) in &buffers {
        manifest = manifest.state(name, InputRole::Buffer, &next_name(name));
    }
    for input in &fragment.inputs {
        match input.role {
            FragmentRole::State => {
                manifest =
                    manifest.state(&input.name, InputRole::Optimizer, &next_name(&input.name));
                state.insert(input.name.clone(), input.initial.clone());
            }
            FragmentRole::Hyperparameter => {}
        }
    }
    for (name, default) in norm_fragment.hyperparameters() {
        manifest = manifest.hyper(name, default);
    }
    for (name, default) in fragment.hyperparameters() {
        manifest = manifest.hyper(name, default);
    }
    manifest = manifest.output("loss", OutputRole::Loss);
    for m in &metric_names {
        manifest = manifest.output(m, OutputRole::Metric);
    }
    rename_prefix_nodes(&mut graph);
    let mut model = model;
    model.graph = Some(graph);
    let model = densa_exporter::passes::eliminate_dead_code(&model).map_err(AutodiffError::from)?;
    Ok(TrainStep {
        graph: model,
        manifest,
        state,
        forward_values,
        data_parallel,
    })
}

/// Name of the gradient of parameter `param` in the data-parallel graphs.
pub fn grad_name(param: &str) -> String {
    format!("grad.{param}")
}

/// Cuts the step for data parallelism (see [`DataParallelEntry`](densa_runtime::train::manifest::DataParallelEntry)):
/// `fwd_bwd` is the forward + backward graph (parameters and buffers still initializers),
/// `opt` the optimizer graph whose inputs are the parameters and the gradients (`grads`:
/// parameter, internal gradient name).
fn data_parallel_graphs(
    model: &ModelProto,
    fwd_bwd: &densa_exporter::onnx::GraphProto,
    opt: &densa_exporter::onnx::GraphProto,
    grads: &[(String, String)],
    params: &[(String, Vec<usize>)],
    buffers: &[(String, Vec<usize>)],
    updated_buffers: &HashSet<String>,
) -> Result<(DataParallelGraphs, Vec<GradEntry>), TrainStepError> {
    let shapes: HashMap<&str, &Vec<usize>> = params.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let ty = |shape: &[usize]| {
        tensor_type(
            DType::F32,
            &shape.iter().map(|&d| Dim::from(d)).collect::<Vec<_>>(),
        )
    };
    let identity = |from: &str, to: &str| NodeProto {
        name: to.to_string(),
        op_type: "Identity".into(),
        input: vec![from.to_string()],
        output: vec![to.to_string()],
        ..Default::default()
    };
    let vi = |name: &str, shape: &[usize]| ValueInfoProto {
        name: name.to_string(),
        r#type: Some(ty(shape)),
        ..Default::default()
    };
    let state_names: HashSet<&str> = params
        .iter()
        .chain(buffers)
        .map(|(n, _)| n.as_str())
        .collect();

    // The gradient graph: parameters and buffers become inputs, every gradient an output.
    let mut g = fwd_bwd.clone();
    g.initializer
        .retain(|t| !state_names.contains(t.name.as_str()));
    for (name, shape) in params.iter().chain(buffers) {
        g.input.push(vi(name, shape));
    }
    for (name, shape) in buffers {
        if !updated_buffers.contains(name) {
            let next = next_name(name);
            g.node.push(identity(name, &next));
            g.output.push(vi(&next, shape));
        }
    }
    let mut entries = Vec::new();
    for (p, internal) in grads {
        let out = grad_name(p);
        g.node.push(identity(internal, &out));
        g.output.push(vi(&out, shapes[p.as_str()]));
        entries.push(GradEntry {
            param: p.clone(),
            grad: out,
        });
    }
    rename_prefix_nodes(&mut g);
    let mut grad_model = model.clone();
    grad_model.graph = Some(g);
    let grad_model =
        densa_exporter::passes::eliminate_dead_code(&grad_model).map_err(AutodiffError::from)?;

    // The update graph: the optimizer with its gradient inputs renamed `grad.{param}`.
    let rename: HashMap<&str, String> = grads
        .iter()
        .map(|(p, internal)| (internal.as_str(), grad_name(p)))
        .collect();
    let mut u = opt.clone();
    for n in u.node.iter_mut() {
        for i in n.input.iter_mut() {
            if let Some(r) = rename.get(i.as_str()) {
                *i = r.clone();
            }
        }
    }
    for i in u.input.iter_mut() {
        if let Some(r) = rename.get(i.name.as_str()) {
            i.name = r.clone();
        }
    }
    rename_prefix_nodes(&mut u);
    let mut update_model = model.clone();
    update_model.graph = Some(u);
    let update_model =
        densa_exporter::passes::eliminate_dead_code(&update_model).map_err(AutodiffError::from)?;
    Ok((
        DataParallelGraphs {
            grad: grad_model,
            update: update_model,
            forward: None,
        },
        entries,
    ))
}

/// Cuts the gradient graph of `graphs` around `host`'s values: the nodes computing each value
/// the host provides (Sinkhorn codes, a mean's denominator) go, the values they are computed
/// from (the detached scores, the count) become outputs of the forward half, the provided
/// values inputs of the rest, and the graph is split where the forward pass meets them
/// ([`cut_graph`]).
fn host_step_cut(
    mut graphs: DataParallelGraphs,
    host: &HostStep,
    forward_values: &HashSet<String>,
) -> Result<DataParallelGraphs, TrainStepError> {
    use densa_exporter::autodiff::infer::ShapeInfo;
    let fail = |problem: String| TrainStepError::Split(format!("host step: {problem}"));
    let mut g = graphs.grad.graph.clone().ok_or(AutodiffError::NoGraph)?;
    let info = ShapeInfo::infer(&g);
    let typed = |name: &str| -> Result<ValueInfoProto, TrainStepError> {
        let shape = info
            .shape(name)
            .ok_or_else(|| fail(format!("the shape of `{name}` is not known")))?;
        Ok(ValueInfoProto {
            name: name.to_string(),
            r#type: Some(tensor_type(info.dtype(name).unwrap_or(DType::F32), &shape)),
            ..Default::default()
        })
    };
    // (values from the forward pass for the host, values from the host replacing the graph's)
    let mut pairs: Vec<(Vec<&String>, &String)> = Vec::new();
    for st in host.sinkhorn.iter().flat_map(|ex| &ex.stages) {
        pairs.push((
            std::iter::once(&st.scores).chain(&st.queue_used).collect(),
            &st.codes,
        ));
    }
    for m in &host.means {
        pairs.push((vec![&m.count], &m.denominator));
    }
    let mut host_inputs = Vec::new();
    let mut host_outputs = Vec::new();
    for (outputs, replaced) in pairs {
        for o in outputs {
            if !forward_values.contains(o) {
                return Err(fail(format!("`{o}` is not a value of the forward pass")));
            }
            if !host_outputs.contains(o) {
                g.output.push(typed(o)?);
                host_outputs.push(o.clone());
            }
        }
        let producer = g
            .node
            .iter()
            .position(|n| n.output.iter().any(|o| o == replaced))
            .ok_or_else(|| fail(format!("no node computes `{replaced}`")))?;
        g.input.push(typed(replaced)?);
        g.node.remove(producer);
        host_inputs.push(replaced.clone());
    }
    let model = ModelProto {
        graph: Some(g),
        ..graphs.grad.clone()
    };
    // What computed the replaced values (the graph's own Sinkhorn) is now dead.
    let model = densa_exporter::passes::eliminate_dead_code(&model).map_err(AutodiffError::from)?;
    let g = model.graph.as_ref().ok_or(AutodiffError::NoGraph)?;
    let inputs: Vec<&str> = host_inputs.iter().map(String::as_str).collect();
    let outputs: Vec<&str> = host_outputs.iter().map(String::as_str).collect();
    let (forward, rest, _) = cut_graph(g, forward_values, &inputs, &outputs)?;
    graphs.forward = Some(ModelProto {
        graph: Some(forward),
        ..model.clone()
    });
    graphs.grad = ModelProto {
        graph: Some(rest),
        ..model
    };
    Ok(graphs)
}

/// Renames nodes whose name is a module prefix of a value name (`conv` and the input
/// `conv.bias`): tract names the parts it splits a node into `{node}.{part}` and refuses
/// graphs where such a name is also a graph input. Node names carry no meaning in ONNX.
fn rename_prefix_nodes(graph: &mut densa_exporter::onnx::GraphProto) {
    let values: HashSet<String> = graph
        .input
        .iter()
        .map(|i| i.name.clone())
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .chain(graph.node.iter().flat_map(|n| n.output.iter().cloned()))
        .collect();
    let mut prefixes: HashSet<&str> = HashSet::new();
    for v in &values {
        for (i, c) in v.char_indices() {
            if c == '.' {
                prefixes.insert(&v[..i]);
            }
        }
    }
    let clashing: Vec<usize> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| prefixes.contains(n.name.as_str()))
        .map(|(i, _)| i)
        .collect();
    let mut taken: HashSet<String> = graph.node.iter().map(|n| n.name.clone()).collect();
    for i in clashing {
        let base = format!("{}/{}", graph.node[i].name, graph.node[i].op_type);
        let mut name = base.clone();
        let mut k = 1;
        while taken.contains(&name) || values.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        taken.insert(name.clone());
        graph.node[i].name = name;
    }
}

/// [`build_train_step`] as a validated [`Artifact`], with `eval` (the inference-mode forward,
/// same parameter names) as its eval graph.
pub fn train_step_artifact(
    forward: ForwardGraph,
    eval: Option<ModelProto>,
    config: &TrainStepConfig,
) -> Result<Artifact, TrainStepError> {
    let step = build_train_step(forward, config)?;
    let mut artifact = Artifact::new(step.manifest, step.graph, step.state)?;
    if let Some((graphs, grads, host)) = step.data_parallel {
        artifact = artifact.with_data_parallel(graphs, grads, host)?;
    }
    Ok(match eval {
        Some(e) => artifact.with_eval_graph(e),
        None => artifact,
    })
}

/// `eval` with every initializer that `state` names replaced by the state's value (trained
/// parameters and running statistics into an inference graph). Entries of `state` the graph
/// does not have (optimizer slots) are ignored; a shape mismatch is an error.
pub fn eval_with_state(eval: &ModelProto, state: &StateDict) -> Result<ModelProto, BuildError> {
    let mut out = eval.clone();
    if let Some(g) = out.graph.as_mut() {
        for t in g.initializer.iter_mut() {
            if let Some(v) = state.get(&t.name) {
                let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                if v.shape() != dims.as_slice() {
                    return Err(BuildError::ParamShape {
                        name: t.name.clone(),
                        expected: dims,
                        got: v.shape().to_vec(),
                    });
                }
                *t = v.to_proto(&t.name);
            }
        }
    }
    Ok(out)
}

/// A trained classifier as a deployable model: `eval` (input `images [N, 3, S, S]`, output
/// `logits [N, C]`) with `state` written in ([`eval_with_state`]) and self-describing
/// metadata, `densa.task = classify`, `densa.arch`, `densa.classes` (comma-separated, index =
/// label), `densa.input_size` (`SxS`), `densa.mean` / `densa.std` (the ImageNet normalisation
/// of `(x / 255 - mean) / std`, images resized to `S x S`). `densa adapt` reads it back.
pub fn deployed_classifier(
    eval: &ModelProto,
    state: &StateDict,
    arch: &str,
    classes: &[String],
    size: u32,
) -> Result<ModelProto, BuildError> {
    use densa_exporter::onnx::StringStringEntryProto;
    let mut out = eval_with_state(eval, state)?;
    let triple = |v: [f32; 3]| format!("{},{},{}", v[0], v[1], v[2]);
    let meta = [
        ("densa.task", "classify".to_string()),
        ("densa.arch", arch.to_string()),
        ("densa.classes", classes.join(",")),
        ("densa.input_size", format!("{size}x{size}")),
        ("densa.mean", triple(densa_runtime::train::classify::MEAN)),
        ("densa.std", triple(densa_runtime::train::classify::STD)),
    ];
    out.metadata_props
        .retain(|p| !meta.iter().any(|(k, _)| *k == p.key));
    out.metadata_props
        .extend(meta.into_iter().map(|(key, value)| StringStringEntryProto {
            key: key.to_string(),
            value,
        }));
    Ok(out)
}

/// Mean cross-entropy of `logits` `[N, C]` against class indices `labels` (int64 `[N]`):
/// PyTorch's `F.cross_entropy(logits, labels)` (reduction mean, no weights, no smoothing).
///
/// # Shapes
/// `logits [N, C]`, `labels [N]` -> `[]`.
pub fn cross_entropy(
    b: &mut GraphBuilder,
    logits: &Value,
    labels: &Value,
) -> Result<Value, BuildError> {
    if logits.rank() != 2 || labels.rank() != 1 || labels.dtype() != DType::I64 {
        return Err(b.op_error(
            "CrossEntropy",
            format!(
                "expects logits [N, C] and int64 labels [N]; got `{}` {} and `{}` {} {}",
                logits.name(),
                densa_exporter::builder::shape_string(logits.shape()),
                labels.name(),
                labels.dtype(),
                densa_exporter::builder::shape_string(labels.shape()),
            ),
        ));
    }
    let logp = b.node1(
        "LogSoftmax",
        Some("log_softmax"),
        &[logits],
        vec![attr::int("axis", 1)],
        DType::F32,
        logits.shape().to_vec(),
    );
    let axes = b.const_i64(&[1]);
    let idx = b.node1(
        "Unsqueeze",
        None,
        &[labels, &axes],
        vec![],
        DType::I64,
        vec![labels.dim(0).clone(), Dim::from(1)],
    );
    let picked = b.node1(
        "GatherElements",
        None,
        &[&logp, &idx],
        vec![attr::int("axis", 1)],
        DType::F32,
        vec![labels.dim(0).clone(), Dim::from(1)],
    );
    let mean = b.reduce_mean(&picked, &[], false)?;
    Ok(b.neg(&mean))
}

/// Fraction of rows of `logits` `[N, C]` whose arg-max is the label (int64 `[N]`): a metric.
///
/// # Shapes
/// `logits [N, C]`, `labels [N]` -> `[]`.
pub fn accuracy(b: &mut GraphBuilder, logits: &Value, labels: &Value) -> Result<Value, BuildError> {
    let pred = b.node1(
        "ArgMax",
        Some("argmax"),
        &[logits],
        vec![attr::int("axis", 1), attr::int("keepdims", 0)],
        DType::I64,
        vec![logits.dim(0).clone()],
    );
    let hit = b.equal(&pred, labels)?;
    let hit = b.cast(&hit, DType::F32);
    b.reduce_mean(&hit, &[], false)
}

/// A train step cut in two, for methods that need the host between the forward pass and the
/// loss (DETR's Hungarian matching): [`split_train_step`].
#[derive(Clone, Debug)]
pub struct SplitStep {
    /// The forward pass: the batch inputs it needs, parameters, buffers -> `host_outputs`, the
    /// `activations` and the forward's own state updates (running statistics `.next`).
    pub forward: ModelProto,
    /// The rest (loss, backward, update): `activations` + host-computed inputs + state +
    /// hyperparameters -> loss, metrics, new state.
    pub backward: ModelProto,
    /// Values the forward outputs and the backward takes, by the same name: everything the
    /// backward needs from the forward pass (nothing is computed twice).
    pub activations: Vec<String>,
}

/// Cuts `step` after the forward pass. `host_inputs` are batch inputs the host computes from
/// the forward's results (targets after matching); every forward node that depends on them
/// moves to the backward graph. `host_outputs` are values the host needs from the forward pass
/// (predictions); they must be computable without `host_inputs`.
///
/// The cut: a node stays in the forward graph when it belongs to the forward pass and does not
/// depend on a host input; every value crossing the cut becomes an output of the forward graph
/// and an input of the backward graph. Graph outputs go with the node that computes them.
pub fn split_train_step(
    step: &TrainStep,
    host_inputs: &[&str],
    host_outputs: &[&str],
) -> Result<SplitStep, TrainStepError> {
    let graph = step.graph.graph.as_ref().ok_or(AutodiffError::NoGraph)?;
    let (forward, backward, activations) =
        cut_graph(graph, &step.forward_values, host_inputs, host_outputs)?;
    let model = |g| ModelProto {
        graph: Some(g),
        ..step.graph.clone()
    };
    Ok(SplitStep {
        forward: model(forward),
        backward: model(backward),
        activations,
    })
}

/// The data-parallel graphs of a split step: [`split_train_step`]'s cut applied to the gradient
/// graph of a step built with [`TrainStepConfig::data_parallel`].
#[derive(Clone, Debug)]
pub struct SplitDataParallel {
    /// The forward pass, as [`SplitStep::forward`].
    pub forward: ModelProto,
    /// The rest of the gradient graph: activations + host-computed inputs + state +
    /// hyperparameters -> loss, metrics, gradients, buffer updates.
    pub grad: ModelProto,
    /// The update: state + averaged gradients + hyperparameters -> new parameters and slots.
    pub update: ModelProto,
    /// (parameter, gradient) names.
    pub grads: Vec<GradEntry>,
}

/// Cuts `step`'s gradient graph like [`split_train_step`] cuts the whole step; `None` when
/// `step` was built without data parallelism.
pub fn split_data_parallel(
    step: &TrainStep,
    host_inputs: &[&str],
    host_outputs: &[&str],
) -> Result<Option<SplitDataParallel>, TrainStepError> {
    let Some((graphs, grads, host)) = &step.data_parallel else {
        return Ok(None);
    };
    if !host.is_empty() {
        return Err(TrainStepError::Split(
            "a step with a host step of its own cannot be split again".into(),
        ));
    }
    let graph = graphs.grad.graph.as_ref().ok_or(AutodiffError::NoGraph)?;
    let (forward, grad, _) = cut_graph(graph, &step.forward_values, host_inputs, host_outputs)?;
    let model = |g| ModelProto {
        graph: Some(g),
        ..graphs.grad.clone()
    };
    Ok(Some(SplitDataParallel {
        forward: model(forward),
        grad: model(grad),
        update: graphs.update.clone(),
        grads: grads.clone(),
    }))
}

/// The cut of [`split_train_step`] on any graph whose forward nodes output `forward_values`:
/// the forward part, the rest, and the activations crossing between them.
fn cut_graph(
    graph: &densa_exporter::onnx::GraphProto,
    forward_values: &HashSet<String>,
    host_inputs: &[&str],
    host_outputs: &[&str],
) -> Result<
    (
        densa_exporter::onnx::GraphProto,
        densa_exporter::onnx::GraphProto,
        Vec<String>,
    ),
    TrainStepError,
> {
    use densa_exporter::autodiff::infer::ShapeInfo;
    for h in host_inputs {
        if !graph.input.iter().any(|i| i.name == *h) {
            return Err(TrainStepError::Split(format!(
                "host input `{h}` is not an input of the step"
            )));
        }
    }
    let mut tainted: HashSet<&str> = host_inputs.iter().copied().collect();
    let mut in_forward = vec![false; graph.node.len()];
    for (i, n) in graph.node.iter().enumerate() {
        let depends = n.input.iter().any(|v| tainted.contains(v.as_str()));
        if depends || !n.output.iter().all(|o| forward_values.contains(o)) {
            tainted.extend(n.output.iter().map(String::as_str));
        } else {
            in_forward[i] = true;
        }
    }
    let produced_fwd: HashSet<&str> = graph
        .node
        .iter()
        .zip(&in_forward)
        .filter(|(_, &f)| f)
        .flat_map(|(n, _)| n.output.iter().map(String::as_str))
        .collect();
    for h in host_outputs {
        if !produced_fwd.contains(h) {
            return Err(TrainStepError::Split(format!(
                "host output `{h}` is not computed by the forward pass without the host inputs"
            )));
        }
    }
    let info = ShapeInfo::infer(graph);
    let vi = |name: &str| -> ValueInfoProto {
        graph
            .output
            .iter()
            .chain(&graph.input)
            .chain(&graph.value_info)
            .find(|v| v.name == name)
            .cloned()
            .unwrap_or_else(|| ValueInfoProto {
                name: name.to_string(),
                r#type: Some(match info.shape(name) {
                    Some(shape) => tensor_type(info.dtype(name).unwrap_or(DType::F32), &shape),
                    None => densa_exporter::onnx::TypeProto {
                        value: Some(densa_exporter::onnx::type_proto::Value::TensorType(
                            densa_exporter::onnx::type_proto::Tensor {
                                elem_type: info.dtype(name).unwrap_or(DType::F32).onnx() as i32,
                                shape: None,
                            },
                        )),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            })
    };
    let mut activations: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for (n, _) in graph.node.iter().zip(&in_forward).filter(|(_, &f)| !f) {
        for v in &n.input {
            if produced_fwd.contains(v.as_str()) && seen.insert(v.clone()) {
                activations.push(v.clone());
            }
        }
    }
    let part = |forward: bool| -> densa_exporter::onnx::GraphProto {
        let nodes: Vec<NodeProto> = graph
            .node
            .iter()
            .zip(&in_forward)
            .filter(|(_, &f)| f == forward)
            .map(|(n, _)| n.clone())
            .collect();
        let used: HashSet<&str> = nodes
            .iter()
            .flat_map(|n| n.input.iter().map(String::as_str))
            .collect();
        let mut input: Vec<ValueInfoProto> = graph
            .input
            .iter()
            .filter(|i| {
                used.contains(i.name.as_str())
                    || (!forward && host_inputs.contains(&i.name.as_str()))
            })
            .cloned()
            .collect();
        let mut output: Vec<ValueInfoProto> = Vec::new();
        if forward {
            output.extend(host_outputs.iter().map(|h| vi(h)));
            output.extend(
                activations
                    .iter()
                    .filter(|a| !host_outputs.contains(&a.as_str()))
                    .map(|a| vi(a)),
            );
        } else {
            input.extend(activations.iter().map(|a| vi(a)));
        }
        let produced: HashSet<&str> = nodes
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        for o in &graph.output {
            let here = produced.contains(o.name.as_str())
                || (!forward
                    && !produced_fwd.contains(o.name.as_str())
                    && !produced.contains(o.name.as_str()));
            if here && !output.iter().any(|x| x.name == o.name) {
                output.push(o.clone());
            }
        }
        densa_exporter::onnx::GraphProto {
            name: format!(
                "{}-{}",
                graph.name,
                if forward { "forward" } else { "backward" }
            ),
            initializer: graph
                .initializer
                .iter()
                .filter(|t| used.contains(t.name.as_str()))
                .cloned()
                .collect(),
            node: nodes,
            input,
            output,
            ..Default::default()
        }
    };
    Ok((part(true), part(false), activations))
}

/// A torchvision-style classifier: backbone, global average pool, `fc` (PyTorch's `Linear`
/// init), in training or inference mode.
#[derive(Clone, Debug)]
pub struct ClassifierConfig {
    pub arch: crate::Arch,
    /// Number of classes (`fc` outputs).
    pub classes: usize,
    /// Height and width of the training images (the batch size stays dynamic). Default 224.
    pub image_size: usize,
    /// Seed of the random initialisation. Default 0.
    pub seed: u64,
}

impl ClassifierConfig {
    pub fn new(arch: crate::Arch, classes: usize) -> ClassifierConfig {
        ClassifierConfig {
            arch,
            classes,
            image_size: 224,
            seed: 0,
        }
    }
}

/// Builds the classifier; with `train`, batch inputs `images` float32 `[N, 3, S, S]` and
/// `labels` int64 `[N]`, the mean cross-entropy as loss and `accuracy` as metric; without,
/// input `images` and output `logits` `[N, classes]`. Backbone weights (not `fc`: its class
/// count differs from the checkpoint's) are loaded from `weights`.
pub fn classifier_graph(
    config: &ClassifierConfig,
    weights: &crate::export::WeightOptions,
    train: bool,
) -> Result<(ForwardGraph, crate::export::ExportReport), TrainStepError> {
    use crate::nn::NormMode;
    let s = config.image_size;
    let mut b = GraphBuilder::new(
        &format!("densa-{}-classify", config.arch.name()),
        config.seed,
    );
    let images = b.input(
        "images",
        DType::F32,
        vec![Dim::from("N"), 3.into(), s.into(), s.into()],
    )?;
    let net = config.arch.config().init(&mut b)?;
    let report = crate::export::load_weights(&mut b, weights).map_err(|e| match e {
        crate::export::ExportError::Build(e) => TrainStepError::Build(e),
        other => TrainStepError::Weights(other.to_string()),
    })?;
    let c5 = *config.arch.config().out_channels().last().unwrap_or(&0);
    let fan = (c5.max(1) as f32).sqrt();
    let w = b.param(
        "fc.weight",
        &[config.classes, c5],
        densa_exporter::Init::KaimingUniformFanIn,
        ParamKind::Param,
    )?;
    let bias = b.param(
        "fc.bias",
        &[config.classes],
        densa_exporter::Init::Uniform(1.0 / fan),
        ParamKind::Param,
    )?;
    let mut mode = if train {
        NormMode::train()
    } else {
        NormMode::Inference
    };
    let stages = net.forward_mode(&mut b, &images, &mut mode)?;
    let pooled = b.global_avg_pool(&stages.c5)?;
    let flat = b.flatten(&pooled, 1);
    let logits = b.linear(Some("fc"), &flat, &w, Some(&bias))?;
    if train {
        let labels = b.input("labels", DType::I64, vec![Dim::from("N")])?;
        let loss = cross_entropy(&mut b, &logits, &labels)?;
        let acc = accuracy(&mut b, &logits, &labels)?;
        let fwd = ForwardGraph::new(b, loss)
            .metric("accuracy", acc)
            .norm_state(mode.into_state());
        Ok((fwd, report))
    } else {
        b.output(&logits, "logits")?;
        Ok((ForwardGraph::new(b, logits), report))
    }
}

/// The classification training artifact of `config` (task `classify`): train step from
/// [`classifier_graph`] in training mode, eval graph in inference mode (input `images`, output
/// `logits`).
pub fn classifier_artifact(
    config: &ClassifierConfig,
    weights: &crate::export::WeightOptions,
    step: &TrainStepConfig,
) -> Result<(Artifact, crate::export::ExportReport), TrainStepError> {
    let (train, report) = classifier_graph(config, weights, true)?;
    let (eval, _) = classifier_graph(config, weights, false)?;
    let mut step = step.clone();
    step.task.get_or_insert_with(|| "classify".into());
    let artifact = train_step_artifact(train, Some(eval.builder.finish()), &step)?;
    Ok((artifact, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{BatchNorm2dConfig, Conv2dConfig, NormMode};
    use densa_exporter::{Init, Tensor};
    use densa_runtime::backend::tract::TractBackend;
    use densa_runtime::backend::Backend;
    use ndarray::{ArrayD, IxDyn};

    /// conv(3->4, 3x3) -> BN (train) -> ReLU -> global pool -> fc(4->3) -> cross-entropy.
    fn small_cnn(train: bool) -> (GraphBuilder, Option<Value>, Fragment) {
        let mut b = GraphBuilder::new("small-cnn", 5);
        let x = b
            .input(
                "images",
                DType::F32,
                vec![2.into(), 3.into(), 5.into(), 5.into()],
            )
            .unwrap();
        let conv = Conv2dConfig::new(3, 4, 3)
            .padding(1)
            .init(&mut b, "conv")
            .unwrap();
        let bn = BatchNorm2dConfig::new(4).init(&mut b, "bn").unwrap();
        let w = b
            .param(
                "fc.weight",
                &[3, 4],
                Init::KaimingUniformFanIn,
                ParamKind::Param,
            )
            .unwrap();
        let bias = b
            .param("fc.bias", &[3], Init::Uniform(0.5), ParamKind::Param)
            .unwrap();
        let mut mode = if train {
            NormMode::train()
        } else {
            NormMode::Inference
        };
        let h = conv.forward(&mut b, &x).unwrap();
        let h = bn.forward_mode(&mut b, &h, &mut mode).unwrap();
        let h = b.relu(&h);
        let h = b.global_avg_pool(&h).unwrap();
        let h = b.flatten(&h, 1);
        let logits = b.linear(Some("fc"), &h, &w, Some(&bias)).unwrap();
        if train {
            let labels = b.input("labels", DType::I64, vec![2.into()]).unwrap();
            let loss = cross_entropy(&mut b, &logits, &labels).unwrap();
            (b, Some(loss), mode.into_state())
        } else {
            b.output(&logits, "logits").unwrap();
            (b, None, Fragment::default())
        }
    }

    fn batch() -> Vec<(String, Tensor)> {
        let x: Vec<f32> = (0..150)
            .map(|i| ((i * 37 % 23) as f32 / 11.0) - 1.0)
            .collect();
        vec![
            (
                "images".into(),
                Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, 3, 5, 5]), x).unwrap()),
            ),
            (
                "labels".into(),
                Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![2, 0]).unwrap()),
            ),
        ]
    }

    fn artifact(config: &TrainStepConfig) -> Artifact {
        let (b, loss, norm) = small_cnn(true);
        let fwd = ForwardGraph::new(b, loss.unwrap()).norm_state(norm);
        let (eval, _, _) = small_cnn(false);
        train_step_artifact(fwd, Some(eval.finish()), config).unwrap()
    }

    /// Runs one step: every state input from `state`, hyperparameters at their defaults.
    fn run(a: &Artifact, state: &StateDict) -> HashMap<String, Tensor> {
        let mut session = TractBackend::new().load_model(a.graph(), "step").unwrap();
        let mut inputs = batch();
        for e in &a.manifest().inputs {
            match e.role {
                InputRole::Batch => {}
                InputRole::Hyper => inputs.push((
                    e.name.clone(),
                    Tensor::F64(ArrayD::from_elem(IxDyn(&[]), e.default.unwrap())),
                )),
                _ => inputs.push((e.name.clone(), state.get(&e.name).unwrap().clone())),
            }
        }
        session.run(inputs).unwrap().into_iter().collect()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_f32().iter().next().copied().unwrap() as f64
    }

    #[test]
    fn one_sgd_step_moves_every_parameter_by_lr_times_its_finite_difference_gradient() {
        let lr = 0.5;
        let a = artifact(&TrainStepConfig::new(OptimizerConfig::sgd(lr, 0.9, 0.0)));
        let m = a.manifest();
        assert_eq!(m.input("images").unwrap().role, InputRole::Batch);
        assert_eq!(m.input("labels").unwrap().role, InputRole::Batch);
        assert_eq!(m.input("conv.weight").unwrap().role, InputRole::Param);
        assert_eq!(m.input("bn.running_var").unwrap().role, InputRole::Buffer);
        assert_eq!(
            m.input("optim.momentum_buffer.fc.weight").unwrap().role,
            InputRole::Optimizer
        );
        assert_eq!(m.input("optim.lr").unwrap().default, Some(lr));
        let out = run(&a, a.state());
        assert_eq!(scalar(&out["optim.step.next"]), 1.0);
        // Momentum: the buffer is the gradient at the first step, so p.next = p - lr * g.
        for name in [
            "conv.weight",
            "conv.bias",
            "bn.weight",
            "bn.bias",
            "fc.weight",
            "fc.bias",
        ] {
            let p = a.state().get(name).unwrap().to_f32();
            let next = out[&next_name(name)].to_f32();
            let buf = out[&format!("optim.momentum_buffer.{name}.next")].to_f32();
            let n = p.len();
            for k in [0, n / 2, n - 1] {
                let g = (p.as_slice().unwrap()[k] - next.as_slice().unwrap()[k]) as f64 / lr;
                assert!((g - buf.as_slice().unwrap()[k] as f64).abs() < 1e-5);
                // Central difference of the loss, parameter fed perturbed.
                let eps = 3e-4f32;
                let at = |d: f32| {
                    let mut s = a.state().clone();
                    let mut v = p.clone();
                    v.as_slice_mut().unwrap()[k] += d;
                    s.insert(name, Tensor::F32(v));
                    scalar(&run(&a, &s)["loss"])
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                assert!(
                    (g - fd).abs() <= 2e-3 + 1e-2 * fd.abs(),
                    "{name}[{k}]: step gives gradient {g}, finite differences {fd}"
                );
            }
        }
        // Running statistics moved towards the batch's (momentum 0.1 from zeros/ones).
        let rm = out["bn.running_mean.next"].to_f32();
        assert!(rm.iter().any(|v| v.abs() > 1e-4));
    }

    #[test]
    fn frozen_parameters_pass_through_and_only_listed_ones_get_slots() {
        let mut config = TrainStepConfig::new(OptimizerConfig::adamw(1e-2, 0.1));
        config.trainable = Trainable::Only(vec!["fc".into()]);
        config.clip = Some(ClipConfig::default());
        let a = artifact(&config);
        let m = a.manifest();
        assert!(m.input("optim.exp_avg.fc.weight").is_some());
        assert!(m.input("optim.exp_avg.conv.weight").is_none());
        assert!(m.input("clip.max_norm").is_some());
        assert!(m
            .outputs
            .iter()
            .any(|o| o.name == "grad_norm" && o.role == OutputRole::Metric));
        let out = run(&a, a.state());
        assert_eq!(
            out["conv.weight.next"],
            *a.state().get("conv.weight").unwrap()
        );
        assert_ne!(out["fc.weight.next"], *a.state().get("fc.weight").unwrap());
        // BN still updates its running statistics in a frozen part (PyTorch's model.train()).
        assert_ne!(
            out["bn.running_mean.next"],
            *a.state().get("bn.running_mean").unwrap()
        );
    }

    #[test]
    fn a_split_step_computes_what_the_whole_step_computes() {
        let (b, loss, norm) = small_cnn(true);
        let fwd = ForwardGraph::new(b, loss.unwrap()).norm_state(norm);
        let whole = build_train_step(fwd, &TrainStepConfig::default()).unwrap();
        let a = Artifact::new(
            whole.manifest.clone(),
            whole.graph.clone(),
            whole.state.clone(),
        )
        .unwrap();
        let reference = run(&a, a.state());
        let logits = whole
            .graph
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .find(|n| n.input.iter().any(|i| i == "fc.weight"))
            .map(|n| n.output[0].clone())
            .unwrap();
        let split = split_train_step(&whole, &["labels"], &[logits.as_str()])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!split.activations.is_empty());
        let fg = split.forward.graph.as_ref().unwrap();
        assert!(!fg.input.iter().any(|i| i.name == "labels"));
        // Forward: batch (no labels) + state.
        let feed = |g: &densa_exporter::onnx::GraphProto, extra: &HashMap<String, Tensor>| {
            g.input
                .iter()
                .map(|i| {
                    let t = extra
                        .get(&i.name)
                        .cloned()
                        .or_else(|| {
                            batch()
                                .into_iter()
                                .find(|(n, _)| *n == i.name)
                                .map(|(_, t)| t)
                        })
                        .or_else(|| a.state().get(&i.name).cloned())
                        .or_else(|| {
                            a.manifest()
                                .input(&i.name)
                                .and_then(|e| e.default)
                                .map(|d| Tensor::F64(ArrayD::from_elem(IxDyn(&[]), d)))
                        })
                        .unwrap_or_else(|| panic!("nothing to feed `{}`", i.name));
                    (i.name.clone(), t)
                })
                .collect::<Vec<_>>()
        };
        let mut f = TractBackend::new()
            .load_model(&split.forward, "forward")
            .unwrap();
        let f_out: HashMap<String, Tensor> = f
            .run(feed(fg, &HashMap::new()))
            .unwrap()
            .into_iter()
            .collect();
        assert!(f_out.contains_key(&logits));
        let bg = split.backward.graph.as_ref().unwrap();
        let mut bk = TractBackend::new()
            .load_model(&split.backward, "backward")
            .unwrap();
        let b_out: HashMap<String, Tensor> =
            bk.run(feed(bg, &f_out)).unwrap().into_iter().collect();
        for (name, t) in &reference {
            let got = b_out
                .get(name)
                .or_else(|| f_out.get(name))
                .unwrap_or_else(|| panic!("`{name}` missing"));
            let (x, y) = (got.to_f32(), t.to_f32());
            let d = x
                .iter()
                .zip(y.iter())
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(d <= 1e-6, "`{name}` differs by {d}");
        }
    }

    #[test]
    fn bad_requests_are_named() {
        let (b, loss, _) = small_cnn(true);
        let config = TrainStepConfig {
            trainable: Trainable::Only(vec!["head".into()]),
            ..TrainStepConfig::default()
        };
        let e = build_train_step(ForwardGraph::new(b, loss.unwrap()), &config)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`head`") && e.contains("fc.weight"), "{e}");
        let (mut b, _, _) = small_cnn(true);
        let x = b.input("not_a_loss", DType::F32, vec![3.into()]).unwrap();
        let e = build_train_step(ForwardGraph::new(b, x), &TrainStepConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not_a_loss") && e.contains("scalar"), "{e}");
    }

    #[test]
    fn trained_state_replaces_the_eval_graphs_initializers() {
        let a = artifact(&TrainStepConfig::default());
        let mut state = a.state().clone();
        state.insert("fc.bias", Tensor::F32(ArrayD::from_elem(IxDyn(&[3]), 7.0)));
        let eval = eval_with_state(a.eval_graph().unwrap(), &state).unwrap();
        let t = eval
            .graph
            .unwrap()
            .initializer
            .into_iter()
            .find(|t| t.name == "fc.bias")
            .unwrap();
        assert_eq!(
            Tensor::from_proto(&t).unwrap().to_f32().iter().sum::<f32>(),
            21.0
        );
    }
}
