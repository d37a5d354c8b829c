//! Training artifacts: a train-step graph, its initial state and a manifest of roles.
//!
//! An artifact is a directory (tools outside densa read it; the layout is a contract):
//!
//! ```text
//! DIR/manifest.json       roles of every graph input and output (this module's `Manifest`)
//! DIR/train_step.onnx     one training step: batch + state + hyperparameters -> loss, new state
//! DIR/eval.onnx           optional evaluation graph (`eval_graph`)
//! DIR/grad_step.onnx      optional, data parallel: batch + params + buffers -> loss, grads
//! DIR/update_step.onnx    optional, data parallel: params + grads + optimizer -> new state
//! DIR/state.safetensors   initial value of every state input
//! ```
//!
//! `manifest.json`:
//!
//! ```json
//! {"schema_version": 1, "graph": "train_step.onnx", "state": "state.safetensors",
//!  "inputs": [{"name": "x", "role": "batch"},
//!             {"name": "w", "role": "param", "next": "w.next"},
//!             {"name": "lr", "role": "hyper", "default": 0.05}],
//!  "outputs": [{"name": "loss", "role": "loss"}, {"name": "w.next", "role": "state"}]}
//! ```
//!
//! Input roles: `batch` (fed from the data each step), `param`, `optimizer` and `buffer` (the
//! state: fed from the host's copy, replaced each step by the output named in `next`), `hyper`
//! (a scalar fed from the schedule, `default` when the schedule gives none). Output roles:
//! `loss` (exactly one scalar), `metric` (logged), `state` (the `next` of exactly one state
//! input). Unknown top-level fields are kept (`extra`), so producers may add their own.
//!
//! Our choices: the manifest must list every graph input and output (a graph input nobody
//! feeds is an error here, not at the first step); a state input and its `next` output must
//! declare the same element type and shape; hyperparameters are scalars (rank 0 or all dims 1).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use densa_exporter::io::OnnxIoError;
use densa_exporter::onnx::ModelProto;
use densa_exporter::weights::{load_safetensors, save_safetensors, StateDict, WeightsError};
use densa_exporter::{DType, Dim, Shape, Tensor};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::backend::{Interface, Port};

/// The manifest schema version this densa writes and reads.
pub const SCHEMA_VERSION: u32 = 1;
/// File name of the manifest inside an artifact directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Default file name of the train-step graph.
pub const GRAPH_FILE: &str = "train_step.onnx";
/// Default file name of the evaluation graph.
pub const EVAL_FILE: &str = "eval.onnx";
/// Default file name of the initial state.
pub const STATE_FILE: &str = "state.safetensors";

/// What a graph input is to the training loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputRole {
    /// Data, fed from the [`DataSource`](super::DataSource) each step.
    Batch,
    /// A learned parameter (state).
    Param,
    /// An optimizer slot (momentum, Adam moments, step counters) (state).
    Optimizer,
    /// Other state: running statistics, EMA teachers, queues (state).
    Buffer,
    /// A scalar hyperparameter (learning rate, momentum), fed from the schedule.
    Hyper,
}

impl InputRole {
    /// Whether inputs of this role are state (carried from step to step through `next`).
    pub fn is_state(self) -> bool {
        matches!(
            self,
            InputRole::Param | InputRole::Optimizer | InputRole::Buffer
        )
    }

    /// The name written in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            InputRole::Batch => "batch",
            InputRole::Param => "param",
            InputRole::Optimizer => "optimizer",
            InputRole::Buffer => "buffer",
            InputRole::Hyper => "hyper",
        }
    }
}

/// What a graph output is to the training loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputRole {
    /// The training loss (exactly one, a scalar).
    Loss,
    /// A value to log (its mean when it is not a scalar).
    Metric,
    /// The updated value of a state input.
    State,
}

impl OutputRole {
    /// The name written in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputRole::Loss => "loss",
            OutputRole::Metric => "metric",
            OutputRole::State => "state",
        }
    }
}

/// One graph input in the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputEntry {
    /// The graph input's name.
    pub name: String,
    /// Its role.
    pub role: InputRole,
    /// For state inputs: the output that carries the updated value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// For hyper inputs: the value used when the schedule gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<f64>,
}

/// One graph output in the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputEntry {
    /// The graph output's name.
    pub name: String,
    /// Its role.
    pub role: OutputRole,
}

fn schema_v1() -> u32 {
    SCHEMA_VERSION
}

fn state_file() -> String {
    STATE_FILE.into()
}

/// The contents of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Schema version (1). Absent means 1.
    #[serde(default = "schema_v1")]
    pub schema_version: u32,
    /// The train-step graph, relative to the artifact directory.
    pub graph: String,
    /// The evaluation graph, relative to the artifact directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_graph: Option<String>,
    /// The initial state, relative to the artifact directory. Default `state.safetensors`.
    #[serde(default = "state_file")]
    pub state: String,
    /// What the artifact trains (`regression`, `densecl`, `detect`...); free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The train step cut in two for data-parallel training (see [`DataParallelEntry`]);
    /// absent for single-process artifacts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_parallel: Option<DataParallelEntry>,
    /// Every graph input.
    pub inputs: Vec<InputEntry>,
    /// Every graph output.
    pub outputs: Vec<OutputEntry>,
    /// Fields densa does not know, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    /// An empty manifest for the graph file `train_step.onnx`.
    pub fn new() -> Manifest {
        Manifest {
            schema_version: SCHEMA_VERSION,
            graph: GRAPH_FILE.into(),
            eval_graph: None,
            state: STATE_FILE.into(),
            task: None,
            data_parallel: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Adds a `batch` input.
    pub fn batch(mut self, name: &str) -> Manifest {
        self.inputs.push(InputEntry {
            name: name.into(),
            role: InputRole::Batch,
            next: None,
            default: None,
        });
        self
    }

    /// Adds a state input (`param`, `optimizer` or `buffer`) updated by the output `next`,
    /// and that output with role `state`.
    pub fn state(mut self, name: &str, role: InputRole, next: &str) -> Manifest {
        self.inputs.push(InputEntry {
            name: name.into(),
            role,
            next: Some(next.into()),
            default: None,
        });
        self.outputs.push(OutputEntry {
            name: next.into(),
            role: OutputRole::State,
        });
        self
    }

    /// Adds a `hyper` input with its default.
    pub fn hyper(mut self, name: &str, default: f64) -> Manifest {
        self.inputs.push(InputEntry {
            name: name.into(),
            role: InputRole::Hyper,
            next: None,
            default: Some(default),
        });
        self
    }

    /// Adds an output (`loss` or `metric`; state outputs come with [`Manifest::state`]).
    pub fn output(mut self, name: &str, role: OutputRole) -> Manifest {
        self.outputs.push(OutputEntry {
            name: name.into(),
            role,
        });
        self
    }

    /// Sets `task`.
    pub fn task(mut self, task: &str) -> Manifest {
        self.task = Some(task.into());
        self
    }

    /// Parses `manifest.json` text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = serde_json::from_str(text).map_err(|e| ManifestError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if manifest.schema_version != SCHEMA_VERSION {
            return Err(ManifestError::SchemaVersion {
                path: path.to_path_buf(),
                version: manifest.schema_version,
            });
        }
        Ok(manifest)
    }

    /// The manifest as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest always serialises")
    }

    /// The input entry called `name`.
    pub fn input(&self, name: &str) -> Option<&InputEntry> {
        self.inputs.iter().find(|e| e.name == name)
    }

    /// The state inputs (params, optimizer slots, buffers), in manifest order.
    pub fn state_inputs(&self) -> impl Iterator<Item = &InputEntry> {
        self.inputs.iter().filter(|e| e.role.is_state())
    }

    /// Checks the manifest against the graph's interface (`graph`, as [`Interface::of`] reads
    /// it). `path` names the manifest in errors.
    pub fn validate(&self, graph: &Interface, path: &Path) -> Result<(), ManifestError> {
        let entry_err = |name: &str, problem: String| ManifestError::Entry {
            path: path.to_path_buf(),
            name: name.to_string(),
            problem,
        };
        let names = |ports: &[Port]| {
            ports
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let graph_inputs: HashMap<&str, &Port> =
            graph.inputs.iter().map(|p| (p.name.as_str(), p)).collect();
        let graph_outputs: HashMap<&str, &Port> =
            graph.outputs.iter().map(|p| (p.name.as_str(), p)).collect();

        let mut seen = HashSet::new();
        for e in &self.inputs {
            if !seen.insert(e.name.as_str()) {
                return Err(ManifestError::Duplicate {
                    path: path.to_path_buf(),
                    side: "input",
                    name: e.name.clone(),
                });
            }
            if !graph_inputs.contains_key(e.name.as_str()) {
                return Err(ManifestError::UnknownName {
                    path: path.to_path_buf(),
                    side: "input",
                    name: e.name.clone(),
                    available: names(&graph.inputs),
                });
            }
        }
        let mut seen = HashSet::new();
        for e in &self.outputs {
            if !seen.insert(e.name.as_str()) {
                return Err(ManifestError::Duplicate {
                    path: path.to_path_buf(),
                    side: "output",
                    name: e.name.clone(),
                });
            }
            if !graph_outputs.contains_key(e.name.as_str()) {
                return Err(ManifestError::UnknownName {
                    path: path.to_path_buf(),
                    side: "output",
                    name: e.name.clone(),
                    available: names(&graph.outputs),
                });
            }
        }
        for (side, ports, listed) in [
            (
                "input",
                &graph.inputs,
                self.inputs
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect::<HashSet<_>>(),
            ),
            (
                "output",
                &graph.outputs,
                self.outputs.iter().map(|e| e.name.as_str()).collect(),
            ),
        ] {
            if let Some(p) = ports.iter().find(|p| !listed.contains(p.name.as_str())) {
                return Err(ManifestError::NotListed {
                    path: path.to_path_buf(),
                    side,
                    name: p.name.clone(),
                });
            }
        }

        let outputs: HashMap<&str, &OutputEntry> =
            self.outputs.iter().map(|e| (e.name.as_str(), e)).collect();
        let mut next_of: HashMap<&str, &str> = HashMap::new();
        for e in &self.inputs {
            let port = graph_inputs[e.name.as_str()];
            let role = e.role.as_str();
            if e.role.is_state() {
                let Some(next) = e.next.as_deref() else {
                    return Err(entry_err(
                        &e.name,
                        format!("a `{role}` input needs `next`, the output with its new value"),
                    ));
                };
                let Some(out) = outputs.get(next) else {
                    return Err(entry_err(
                        &e.name,
                        format!("`next` names `{next}`, which is not an output in the manifest"),
                    ));
                };
                if out.role != OutputRole::State {
                    return Err(entry_err(
                        &e.name,
                        format!(
                            "`next` names `{next}`, whose role is `{}`, not `state`",
                            out.role.as_str()
                        ),
                    ));
                }
                if let Some(other) = next_of.insert(next, &e.name) {
                    return Err(entry_err(
                        &e.name,
                        format!("`next` names `{next}`, which is already the next of `{other}`"),
                    ));
                }
                let out_port = graph_outputs[next];
                if let Some(problem) = port_mismatch(port, out_port) {
                    return Err(entry_err(
                        &e.name,
                        format!("its `next` output `{next}` {problem}"),
                    ));
                }
            } else if e.next.is_some() {
                return Err(entry_err(
                    &e.name,
                    format!("a `{role}` input has no `next` (only param, optimizer and buffer inputs do)"),
                ));
            }
            match (e.role, e.default) {
                (InputRole::Hyper, None) => {
                    return Err(entry_err(
                        &e.name,
                        "a `hyper` input needs a `default`".into(),
                    ))
                }
                (InputRole::Hyper, Some(v)) => {
                    if !v.is_finite() {
                        return Err(entry_err(&e.name, format!("`default` is {v}")));
                    }
                    hyper_shape(port).map_err(|p| entry_err(&e.name, p))?;
                }
                (_, Some(_)) => {
                    return Err(entry_err(
                        &e.name,
                        format!("a `{role}` input has no `default` (only hyper inputs do)"),
                    ))
                }
                (_, None) => {}
            }
        }
        for e in &self.outputs {
            let port = graph_outputs[e.name.as_str()];
            match e.role {
                OutputRole::State if !next_of.contains_key(e.name.as_str()) => {
                    return Err(entry_err(
                        &e.name,
                        "a `state` output must be the `next` of a state input".into(),
                    ))
                }
                OutputRole::Loss | OutputRole::Metric => {
                    if let Some(dt) = port.dtype {
                        if !dt.is_float() {
                            return Err(entry_err(
                                &e.name,
                                format!(
                                    "a `{}` output must be floating point, the graph declares {dt}",
                                    e.role.as_str()
                                ),
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        let losses: Vec<&str> = self
            .outputs
            .iter()
            .filter(|e| e.role == OutputRole::Loss)
            .map(|e| e.name.as_str())
            .collect();
        if losses.len() != 1 {
            return Err(ManifestError::LossCount {
                path: path.to_path_buf(),
                found: losses.iter().map(|s| s.to_string()).collect(),
            });
        }
        let loss_port = graph_outputs[losses[0]];
        if let Some(shape) = &loss_port.shape {
            if shape.iter().any(|d| d.fixed().is_some_and(|v| v != 1)) {
                return Err(entry_err(
                    losses[0],
                    format!(
                        "the loss must be a scalar, the graph declares {}",
                        densa_exporter::builder::shape_string(shape)
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Default for Manifest {
    fn default() -> Manifest {
        Manifest::new()
    }
}

/// Why a state input and its `next` output do not fit, or `None` when they do. Dimensions
/// unknown on either side are not compared.
fn port_mismatch(input: &Port, output: &Port) -> Option<String> {
    if let (Some(a), Some(b)) = (input.dtype, output.dtype) {
        if a != b {
            return Some(format!("is {b}, the input is {a}"));
        }
    }
    if let (Some(a), Some(b)) = (&input.shape, &output.shape) {
        let dims_fit = |x: &Dim, y: &Dim| match (x, y) {
            (Dim::Fixed(p), Dim::Fixed(q)) => p == q,
            (Dim::Param(p), Dim::Param(q)) => p == q,
            _ => true,
        };
        if a.len() != b.len() || !a.iter().zip(b).all(|(x, y)| dims_fit(x, y)) {
            return Some(format!(
                "has shape {}, the input has {}",
                densa_exporter::builder::shape_string(b),
                densa_exporter::builder::shape_string(a)
            ));
        }
    }
    None
}

/// The concrete shape of a hyperparameter input: rank 0, or every dim 1.
pub(crate) fn hyper_shape(port: &Port) -> Result<Vec<usize>, String> {
    let shape: &Shape = match &port.shape {
        Some(s) => s,
        None => return Ok(Vec::new()),
    };
    if shape.iter().all(|d| matches!(d, Dim::Fixed(1))) {
        Ok(vec![1; shape.len()])
    } else {
        Err(format!(
            "a `hyper` input must be a scalar (rank 0 or every dim 1), the graph declares {}",
            densa_exporter::builder::shape_string(shape)
        ))
    }
}

/// Why an artifact or its manifest was refused. Every variant names the file; manifest
/// problems also name the entry.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid training manifest: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: schema_version {version} is not supported (this densa reads version {SCHEMA_VERSION})")]
    SchemaVersion { path: PathBuf, version: u32 },
    #[error("{path}: {side} `{name}` is listed twice")]
    Duplicate {
        path: PathBuf,
        side: &'static str,
        name: String,
    },
    #[error("{path}: {side} `{name}` is not a graph {side} (the graph has: {available})")]
    UnknownName {
        path: PathBuf,
        side: &'static str,
        name: String,
        available: String,
    },
    #[error(
        "{path}: graph {side} `{name}` is not listed in the manifest (every {side} needs a role)"
    )]
    NotListed {
        path: PathBuf,
        side: &'static str,
        name: String,
    },
    #[error("{path}: `{name}`: {problem}")]
    Entry {
        path: PathBuf,
        name: String,
        problem: String,
    },
    #[error("{path}: exactly one output must have role `loss`, found {found:?}")]
    LossCount { path: PathBuf, found: Vec<String> },
    #[error("{path}: state `{name}`: {problem}")]
    State {
        path: PathBuf,
        name: String,
        problem: String,
    },
    #[error(transparent)]
    Graph(#[from] OnnxIoError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// The data-parallel form of a train step (`manifest.json`'s `data_parallel`): the same
/// computation as the fused graph, cut where the gradients exist, so the host can all-reduce
/// them between the two halves (see [`crate::train::distributed`]).
///
/// - `grad_graph`: batch inputs + `param` + `buffer` inputs + the buffers' hyperparameters ->
///   `loss`, the metrics the forward computes, every buffer's `next`, and one gradient output
///   per trained parameter (`grads[i].grad`).
/// - `update_graph`: the trained parameters, their gradients (inputs named `grads[i].grad`),
///   the `optimizer` inputs and the optimizer's hyperparameters -> the trained parameters'
///   and the optimizer slots' `next` (and `grad_norm` when clipping).
///
/// Every input and output is named as in the fused graph's manifest, so the host routes
/// values by name; parameters the update graph does not output (frozen) keep their value.
///
/// With a [`HostStep`] (SwAV's Sinkhorn codes, LC-loss's and CCOP's means over the valid
/// entries of the batch), the gradient graph is itself cut in two around values that depend on
/// the whole global batch: `forward_graph` (batch, state, hyperparameters -> the host step's
/// inputs, the forward's activations and its state updates), then the host computes the
/// values with every rank ([`crate::train::distributed::sinkhorn_codes`], summed counts), then
/// `grad_graph` takes them and the activations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataParallelEntry {
    /// The gradient graph, relative to the artifact directory.
    pub grad_graph: String,
    /// The update graph, relative to the artifact directory.
    pub update_graph: String,
    /// Trained parameters and the name of their gradient, in the order they are all-reduced.
    pub grads: Vec<GradEntry>,
    /// The forward half of the gradient graph, when a host step sits inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_graph: Option<String>,
    /// The host step between `forward_graph` and `grad_graph`.
    #[serde(flatten)]
    pub host: HostStep,
}

/// What the host computes with every rank between the two halves of a data-parallel gradient
/// graph: values that depend on the whole global batch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostStep {
    /// Sinkhorn-Knopp codes (SwAV).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sinkhorn: Option<SinkhornExchange>,
    /// Means over the selected entries of the whole batch (LC-loss's valid locations, CCOP's
    /// valid boxes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub means: Vec<GlobalMean>,
}

impl HostStep {
    /// Whether there is nothing to compute.
    pub fn is_empty(&self) -> bool {
        self.sinkhorn.is_none() && self.means.is_empty()
    }
}

/// A mean over the selected entries of a batch, `sum / max(count, floor)`, made a mean over the
/// global batch: the forward half outputs the rank's `count`; the host sums it over the ranks
/// and feeds `max(total, floor) / N` as the gradient graph's `denominator`, so the average of
/// the ranks' losses (and gradients) is the global sum over the global count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalMean {
    /// Output of the forward graph: this rank's count (any shape, one value).
    pub count: String,
    /// Input of the gradient graph, in the fused graph `max(count, floor)`.
    pub denominator: String,
    /// The smallest denominator (1: an empty selection gives 0, not NaN).
    pub floor: f64,
}

/// Sinkhorn-Knopp codes computed over every rank's samples (SwAV's `distributed_sinkhorn`):
/// the graph's in-step Sinkhorn, cut out of the data-parallel gradient graph and run on the
/// host with all-reduced sums.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SinkhornExchange {
    /// Entropy regularisation: `exp(scores / epsilon)`.
    pub epsilon: f64,
    /// Sinkhorn-Knopp iterations.
    pub iterations: usize,
    /// One per set of codes (SwAV: per large crop).
    pub stages: Vec<SinkhornStage>,
}

/// One Sinkhorn problem of a [`SinkhornExchange`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkhornStage {
    /// Output of the forward graph: the detached scores `[queue_rows + B, K]` (queue rows
    /// first).
    pub scores: String,
    /// Leading rows of `scores` that come from a queue shared by every rank (gathered, so the
    /// same on every rank): they count once, on rank 0.
    #[serde(default)]
    pub queue_rows: usize,
    /// Output of the forward graph: a float32 scalar, > 0 when the queue rows take part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_used: Option<String>,
    /// Input of the gradient graph: the codes of the batch rows `[B, K]`.
    pub codes: String,
}

/// A trained parameter and its gradient output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GradEntry {
    pub param: String,
    pub grad: String,
}

/// File names of the data-parallel graphs.
pub const GRAD_FILE: &str = "grad_step.onnx";
pub const UPDATE_FILE: &str = "update_step.onnx";

/// File name of the forward half of the gradient graph ([`DataParallelEntry::forward_graph`]).
pub const GRAD_FORWARD_FILE: &str = "grad_forward.onnx";

/// The graphs of [`DataParallelEntry`].
#[derive(Clone, Debug)]
pub struct DataParallelGraphs {
    pub grad: ModelProto,
    pub update: ModelProto,
    /// With a host step: the forward half of the gradient graph.
    pub forward: Option<ModelProto>,
}

/// A training artifact in memory: manifest, graphs and initial state, checked against each
/// other.
#[derive(Clone, Debug)]
pub struct Artifact {
    manifest: Manifest,
    graph: ModelProto,
    eval_graph: Option<ModelProto>,
    data_parallel: Option<DataParallelGraphs>,
    state: StateDict,
    /// Where it was loaded from (for error messages), if from disk.
    dir: Option<PathBuf>,
}

impl Artifact {
    /// An artifact from its parts; validates the manifest against the graph and the state.
    pub fn new(
        manifest: Manifest,
        graph: ModelProto,
        state: StateDict,
    ) -> Result<Artifact, ManifestError> {
        let artifact = Artifact {
            manifest,
            graph,
            eval_graph: None,
            data_parallel: None,
            state,
            dir: None,
        };
        artifact.validate()?;
        Ok(artifact)
    }

    /// Adds the evaluation graph (written as `eval.onnx` unless the manifest names another).
    pub fn with_eval_graph(mut self, eval: ModelProto) -> Artifact {
        if self.manifest.eval_graph.is_none() {
            self.manifest.eval_graph = Some(EVAL_FILE.into());
        }
        self.eval_graph = Some(eval);
        self
    }

    /// Adds the data-parallel graphs (written as `grad_step.onnx` and `update_step.onnx`);
    /// `grads` lists the trained parameters and their gradient names. Checks that every
    /// gradient is an output of `grad` and an input of `update`.
    ///
    /// `host` is the host step inside the gradient graph; when not empty it needs
    /// `graphs.forward`.
    pub fn with_data_parallel(
        mut self,
        graphs: DataParallelGraphs,
        grads: Vec<GradEntry>,
        host: HostStep,
    ) -> Result<Artifact, ManifestError> {
        self.manifest.data_parallel = Some(DataParallelEntry {
            grad_graph: GRAD_FILE.into(),
            update_graph: UPDATE_FILE.into(),
            grads,
            forward_graph: graphs.forward.as_ref().map(|_| GRAD_FORWARD_FILE.into()),
            host,
        });
        self.data_parallel = Some(graphs);
        self.validate_data_parallel()?;
        Ok(self)
    }

    /// The data-parallel graphs, if the artifact has them.
    pub fn data_parallel(&self) -> Option<(&DataParallelEntry, &DataParallelGraphs)> {
        self.manifest
            .data_parallel
            .as_ref()
            .zip(self.data_parallel.as_ref())
    }

    fn validate_data_parallel(&self) -> Result<(), ManifestError> {
        let Some((entry, graphs)) = self.data_parallel() else {
            return Ok(());
        };
        let path = self.manifest_path();
        let grad_if = Interface::of(&graphs.grad);
        let update_if = Interface::of(&graphs.update);
        if !entry.host.is_empty() {
            let fail = |problem: String| ManifestError::Entry {
                path: path.clone(),
                name: "data_parallel".into(),
                problem,
            };
            let Some(forward) = &graphs.forward else {
                return Err(fail(
                    "a host step needs the forward half of the gradient graph (`forward_graph`)"
                        .into(),
                ));
            };
            let forward_if = Interface::of(forward);
            let stages = entry.host.sinkhorn.iter().flat_map(|ex| &ex.stages);
            let outputs = stages
                .clone()
                .flat_map(|st| std::iter::once(&st.scores).chain(&st.queue_used))
                .chain(entry.host.means.iter().map(|m| &m.count));
            let inputs = stages
                .map(|st| &st.codes)
                .chain(entry.host.means.iter().map(|m| &m.denominator));
            for o in outputs {
                if !forward_if.outputs.iter().any(|p| &p.name == o) {
                    return Err(fail(format!("`{o}` is not an output of the forward graph")));
                }
            }
            for i in inputs {
                if !grad_if.inputs.iter().any(|p| &p.name == i) {
                    return Err(fail(format!("`{i}` is not an input of the gradient graph")));
                }
            }
        }
        for g in &entry.grads {
            let problem = if self.manifest.input(&g.param).map(|e| e.role) != Some(InputRole::Param)
            {
                Some("is not a `param` input of the train step")
            } else if !grad_if.outputs.iter().any(|p| p.name == g.grad) {
                Some("has no gradient output in the gradient graph")
            } else if !update_if.inputs.iter().any(|p| p.name == g.grad) {
                Some("has no gradient input in the update graph")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(ManifestError::Entry {
                    path,
                    name: g.param.clone(),
                    problem: format!("data_parallel: {problem} (`{}`)", g.grad),
                });
            }
        }
        Ok(())
    }

    /// Reads and validates the artifact in `dir`.
    pub fn load(dir: &Path) -> Result<Artifact, ManifestError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path).map_err(|source| ManifestError::Io {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest = Manifest::parse(&text, &manifest_path)?;
        let graph = densa_exporter::io::load(&relative(dir, &manifest.graph, &manifest_path)?)?;
        let eval_graph = match &manifest.eval_graph {
            Some(file) => Some(densa_exporter::io::load(&relative(
                dir,
                file,
                &manifest_path,
            )?)?),
            None => None,
        };
        let state = load_safetensors(&relative(dir, &manifest.state, &manifest_path)?)?;
        let data_parallel = match &manifest.data_parallel {
            Some(e) => Some(DataParallelGraphs {
                grad: densa_exporter::io::load(&relative(dir, &e.grad_graph, &manifest_path)?)?,
                update: densa_exporter::io::load(&relative(dir, &e.update_graph, &manifest_path)?)?,
                forward: match &e.forward_graph {
                    Some(f) => Some(densa_exporter::io::load(&relative(
                        dir,
                        f,
                        &manifest_path,
                    )?)?),
                    None => None,
                },
            }),
            None => None,
        };
        let artifact = Artifact {
            manifest,
            graph,
            eval_graph,
            data_parallel,
            state,
            dir: Some(dir.to_path_buf()),
        };
        artifact.validate()?;
        artifact.validate_data_parallel()?;
        Ok(artifact)
    }

    /// Writes the artifact into `dir` (created if needed); every file is written atomically.
    pub fn save(&self, dir: &Path) -> Result<(), ManifestError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        std::fs::create_dir_all(dir).map_err(|source| ManifestError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        densa_exporter::io::save(
            &self.graph,
            &relative(dir, &self.manifest.graph, &manifest_path)?,
        )?;
        if let (Some(file), Some(eval)) = (&self.manifest.eval_graph, &self.eval_graph) {
            densa_exporter::io::save(eval, &relative(dir, file, &manifest_path)?)?;
        }
        if let Some((entry, graphs)) = self.data_parallel() {
            densa_exporter::io::save(
                &graphs.grad,
                &relative(dir, &entry.grad_graph, &manifest_path)?,
            )?;
            densa_exporter::io::save(
                &graphs.update,
                &relative(dir, &entry.update_graph, &manifest_path)?,
            )?;
            if let (Some(file), Some(forward)) = (&entry.forward_graph, &graphs.forward) {
                densa_exporter::io::save(forward, &relative(dir, file, &manifest_path)?)?;
            }
        }
        save_safetensors(
            &self.state,
            &relative(dir, &self.manifest.state, &manifest_path)?,
        )?;
        densa_exporter::io::write_atomic(&manifest_path, self.manifest.to_json().as_bytes())
            .map_err(|source| ManifestError::Io {
                path: manifest_path.clone(),
                source,
            })
    }

    /// Checks the manifest against the graph, and the state against both.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let manifest_path = self.manifest_path();
        let interface = Interface::of(&self.graph);
        self.manifest.validate(&interface, &manifest_path)?;
        let state_path = self.state_path();
        let state_err = |name: &str, problem: String| ManifestError::State {
            path: state_path.clone(),
            name: name.to_string(),
            problem,
        };
        for e in self.manifest.state_inputs() {
            let Some(t) = self.state.get(&e.name) else {
                return Err(state_err(
                    &e.name,
                    "missing (every state input needs an initial value)".into(),
                ));
            };
            let port = interface
                .inputs
                .iter()
                .find(|p| p.name == e.name)
                .expect("validated above");
            if let Some(dt) = port.dtype {
                if dt != t.dtype() {
                    return Err(state_err(
                        &e.name,
                        format!("is {}, the graph input is {dt}", t.dtype()),
                    ));
                }
            }
            if let Some(shape) = &port.shape {
                let fits = shape.len() == t.shape().len()
                    && shape
                        .iter()
                        .zip(t.shape())
                        .all(|(d, &n)| d.fixed().is_none_or(|v| v == n as i64));
                if !fits {
                    return Err(state_err(
                        &e.name,
                        format!(
                            "has shape {:?}, the graph input is {}",
                            t.shape(),
                            densa_exporter::builder::shape_string(shape)
                        ),
                    ));
                }
            }
        }
        if let Some((name, _)) = self
            .state
            .iter()
            .find(|(n, _)| self.manifest.input(n).is_none_or(|e| !e.role.is_state()))
        {
            return Err(state_err(
                name,
                "is not a state input of the manifest".into(),
            ));
        }
        Ok(())
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The train-step graph.
    pub fn graph(&self) -> &ModelProto {
        &self.graph
    }

    /// The evaluation graph, if any.
    pub fn eval_graph(&self) -> Option<&ModelProto> {
        self.eval_graph.as_ref()
    }

    /// The initial state.
    pub fn state(&self) -> &StateDict {
        &self.state
    }

    /// Replaces the initial value of the state input `name` (e.g. with pretrained weights);
    /// element type and shape must stay those of the current value.
    pub fn set_state(&mut self, name: &str, value: Tensor) -> Result<(), ManifestError> {
        let current = self.state.get(name).ok_or_else(|| ManifestError::State {
            path: self.state_path(),
            name: name.to_string(),
            problem: "is not a state input of the manifest".into(),
        })?;
        if current.dtype() != value.dtype() || current.shape() != value.shape() {
            return Err(ManifestError::State {
                path: self.state_path(),
                name: name.to_string(),
                problem: format!(
                    "the new value is {} {:?}, the state is {} {:?}",
                    value.dtype(),
                    value.shape(),
                    current.dtype(),
                    current.shape()
                ),
            });
        }
        self.state.insert(name, value);
        Ok(())
    }

    /// Identifies the train step: FNV-1a (64 bit) of the encoded graph and the manifest JSON,
    /// as `fnv1a64:<16 hex digits>`. Checkpoints record it; resuming with another artifact is
    /// refused. It does not cover the initial state, which a resumed run does not use.
    pub fn fingerprint(&self) -> String {
        use std::hash::Hasher;
        let mut h = fnv::FnvHasher::default();
        h.write(&self.graph.encode_to_vec());
        h.write(self.manifest.to_json().as_bytes());
        format!("fnv1a64:{:016x}", h.finish())
    }

    /// The artifact directory or `<in memory>`, for messages.
    pub fn label(&self) -> String {
        match &self.dir {
            Some(d) => d.display().to_string(),
            None => "<in memory>".into(),
        }
    }

    fn manifest_path(&self) -> PathBuf {
        self.dir
            .as_deref()
            .unwrap_or(Path::new("<in memory>"))
            .join(MANIFEST_FILE)
    }

    fn state_path(&self) -> PathBuf {
        self.dir
            .as_deref()
            .unwrap_or(Path::new("<in memory>"))
            .join(&self.manifest.state)
    }
}

/// `dir/file`, refusing absolute paths and `..` (an artifact is self-contained).
fn relative(dir: &Path, file: &str, manifest: &Path) -> Result<PathBuf, ManifestError> {
    let rel = Path::new(file);
    let escapes = rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    if file.is_empty() || escapes {
        return Err(ManifestError::Entry {
            path: manifest.to_path_buf(),
            name: file.to_string(),
            problem: "file names must be relative paths inside the artifact directory".into(),
        });
    }
    Ok(dir.join(rel))
}

impl fmt::Display for InputRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for OutputRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The element type to feed a hyperparameter as, and the tensor holding `value`.
pub(crate) fn hyper_tensor(port: &Port, value: f64) -> Result<Tensor, String> {
    let shape = hyper_shape(port)?;
    let dim = ndarray::IxDyn(&shape);
    Ok(match port.dtype.unwrap_or(DType::F32) {
        DType::F32 => Tensor::F32(ndarray::ArrayD::from_elem(dim, value as f32)),
        DType::F64 => Tensor::F64(ndarray::ArrayD::from_elem(dim, value)),
        DType::I64 => Tensor::I64(ndarray::ArrayD::from_elem(dim, value as i64)),
        DType::I32 => Tensor::I32(ndarray::ArrayD::from_elem(dim, value as i32)),
        other => return Err(format!("hyperparameters of type {other} are not supported")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::toy;

    #[test]
    fn the_toy_artifact_validates_and_round_trips() {
        let config = toy::MlpConfig::default();
        let artifact = toy::mlp_artifact(&config).unwrap();
        let dir = tempfile::tempdir().unwrap();
        artifact.save(dir.path()).unwrap();
        let loaded = Artifact::load(dir.path()).unwrap();
        assert_eq!(loaded.manifest(), artifact.manifest());
        // Same tensors under the same names (safetensors stores them sorted by name).
        assert_eq!(loaded.state().len(), artifact.state().len());
        for (name, tensor) in artifact.state().iter() {
            assert_eq!(loaded.state().get(name), Some(tensor), "{name}");
        }
        assert_eq!(loaded.fingerprint(), artifact.fingerprint());
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap())
                .unwrap();
        assert_eq!(json["graph"], "train_step.onnx");
        assert_eq!(json["inputs"][2]["role"], "param");
        assert_eq!(json["inputs"][2]["next"], "fc1.weight.next");
        assert_eq!(json["schema_version"], 1);
    }

    #[test]
    fn the_fingerprint_follows_graph_and_manifest() {
        let a = toy::mlp_artifact(&toy::MlpConfig::default()).unwrap();
        let b = toy::mlp_artifact(&toy::MlpConfig {
            lr: 0.01,
            ..Default::default()
        })
        .unwrap();
        let c = toy::mlp_artifact(&toy::MlpConfig {
            hidden: 8,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            a.fingerprint(),
            toy::mlp_artifact(&toy::MlpConfig::default())
                .unwrap()
                .fingerprint()
        );
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert!(a.fingerprint().starts_with("fnv1a64:"));
    }

    #[test]
    fn set_state_refuses_another_shape() {
        let mut a = toy::mlp_artifact(&toy::MlpConfig::default()).unwrap();
        let e = a
            .set_state("fc1.bias", Tensor::zeros(DType::F32, &[3]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fc1.bias") && e.contains("[3]"), "{e}");
        a.set_state("fc1.bias", Tensor::zeros(DType::F32, &[16]))
            .unwrap();
    }
}
