//! Execution backends.
//!
//! A [`Backend`] turns model bytes into a [`Session`]; a session runs named tensors in and out.
//! Both backends take the same `.onnx` bytes and must agree (tests run both).

#[cfg(any(feature = "ort", feature = "tract-cuda"))]
pub mod cuda_libs;
#[cfg(feature = "ort")]
pub mod ort;
#[cfg(feature = "ort")]
pub mod ort_lib;
pub mod tract;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use densa_exporter::onnx::ModelProto;
use densa_exporter::Tensor;

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// ONNX Runtime when its library can be found, tract otherwise (with a warning).
    #[default]
    Auto,
    /// tract, the embedded pure-Rust backend.
    Tract,
    /// ONNX Runtime; an error when its library cannot be found.
    Ort,
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "tract" => Ok(BackendKind::Tract),
            "ort" | "onnxruntime" => Ok(BackendKind::Ort),
            _ => Err(format!("unknown backend `{s}`; choose auto, tract or ort")),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Tract => "tract",
            BackendKind::Ort => "ort",
        })
    }
}

/// Where a backend runs the graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// The host's CPU cores.
    #[default]
    Cpu,
    /// NVIDIA GPU number `n` (ONNX Runtime's CUDA execution provider).
    Cuda(i32),
}

impl Device {
    /// Whether this is a GPU.
    pub fn is_gpu(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown device `{s}`; choose cpu, cuda or cuda:N (N a GPU number)");
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<i32>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .map(Device::Cuda)
                    .ok_or_else(bad),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Options shared by the backends.
#[derive(Clone, Debug)]
pub struct BackendOptions {
    /// Intra-op threads (ONNX Runtime); `None` lets the backend choose.
    pub threads: Option<usize>,
    /// Whether a missing ONNX Runtime library may be fetched with pip.
    pub allow_download: bool,
    /// Where to run. A GPU that cannot be used (no CUDA provider in the ONNX Runtime library,
    /// CUDA libraries missing) falls back to the CPU with a warning on stderr.
    pub device: Device,
    /// Whether sessions keep training state inside the backend between steps
    /// ([`Session::resident_state`]). `None`: on a GPU only, where it saves the host round trip.
    pub resident_state: Option<bool>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            threads: None,
            allow_download: true,
            device: Device::Cpu,
            resident_state: None,
        }
    }
}

/// Errors of the backends. They say which model, input or output is concerned.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{backend} could not load {model}: {message}")]
    Load {
        backend: &'static str,
        model: String,
        message: String,
    },
    #[error("{backend} failed to run {model}: {message}")]
    Run {
        backend: &'static str,
        model: String,
        message: String,
    },
    #[error("{model}: input `{name}` is not an input of the model (inputs: {expected})")]
    UnknownInput {
        model: String,
        name: String,
        expected: String,
    },
    #[error("{model}: input `{name}` is missing")]
    MissingInput { model: String, name: String },
    #[error("{model}: input `{name}` is {got}, the model expects {expected}")]
    InputType {
        model: String,
        name: String,
        expected: String,
        got: String,
    },
    #[error("{model}: input `{name}` has shape {got:?}, the model expects {expected}")]
    InputShape {
        model: String,
        name: String,
        expected: String,
        got: Vec<usize>,
    },
    #[error("{backend}: element type {dtype} is not supported here")]
    UnsupportedType {
        backend: &'static str,
        dtype: String,
    },
    #[error("ONNX Runtime is not available: {0}")]
    OrtUnavailable(String),
    #[error("this densa was built without ONNX Runtime support (cargo feature `ort`)")]
    OrtNotCompiled,
}

/// A declared graph input or output.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: String,
    pub dtype: Option<densa_exporter::DType>,
    pub shape: Option<densa_exporter::Shape>,
}

/// The interface of a model: its inputs (initializers excluded) and outputs.
#[derive(Clone, Debug)]
pub struct Interface {
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
}

impl Interface {
    /// Reads the interface from the model's declarations.
    pub fn of(model: &ModelProto) -> Interface {
        let graph = model.graph.clone().unwrap_or_default();
        let inits: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let port = |vi: &densa_exporter::onnx::ValueInfoProto| {
            let (dtype, shape) =
                densa_exporter::builder::read_value_info(vi).unwrap_or((None, None));
            Port {
                name: vi.name.clone(),
                dtype,
                shape,
            }
        };
        Interface {
            inputs: graph
                .input
                .iter()
                .filter(|i| !inits.contains(i.name.as_str()))
                .map(port)
                .collect(),
            outputs: graph.output.iter().map(port).collect(),
        }
    }

    /// Orders `inputs` as the model declares them, checking names, types and fixed dims.
    pub fn arrange(
        &self,
        model: &str,
        inputs: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>, BackendError> {
        let expected = || {
            self.inputs
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut slots: Vec<Option<Tensor>> = vec![None; self.inputs.len()];
        for (name, t) in inputs {
            let Some(i) = self.inputs.iter().position(|p| p.name == name) else {
                return Err(BackendError::UnknownInput {
                    model: model.into(),
                    name,
                    expected: expected(),
                });
            };
            let port = &self.inputs[i];
            if let Some(dt) = port.dtype {
                if dt != t.dtype() {
                    return Err(BackendError::InputType {
                        model: model.into(),
                        name,
                        expected: dt.to_string(),
                        got: t.dtype().to_string(),
                    });
                }
            }
            if let Some(shape) = &port.shape {
                let fits = shape.len() == t.shape().len()
                    && shape
                        .iter()
                        .zip(t.shape())
                        .all(|(d, &n)| d.fixed().is_none_or(|v| v == n as i64));
                if !fits {
                    return Err(BackendError::InputShape {
                        model: model.into(),
                        name,
                        expected: densa_exporter::builder::shape_string(shape),
                        got: t.shape().to_vec(),
                    });
                }
            }
            slots[i] = Some(t);
        }
        self.inputs
            .iter()
            .zip(slots)
            .map(|(p, t)| {
                t.map(|t| (p.name.clone(), t))
                    .ok_or_else(|| BackendError::MissingInput {
                        model: model.into(),
                        name: p.name.clone(),
                    })
            })
            .collect()
    }
}

/// A model loaded on a backend, ready to run.
pub trait Session: Send {
    /// The model's declared inputs and outputs.
    fn interface(&self) -> &Interface;
    /// Runs the model on named inputs; returns every output, by name, in declaration order.
    fn run(&mut self, inputs: Vec<(String, Tensor)>)
        -> Result<Vec<(String, Tensor)>, BackendError>;
    /// The session's way of keeping state between runs, where it has one and the options ask
    /// for it (ONNX Runtime: on a GPU, or when [`BackendOptions::resident_state`] says so).
    fn resident_state(&mut self) -> Option<&mut dyn ResidentState> {
        None
    }
}

/// State kept inside a session between runs: a train step's parameters, optimizer slots and
/// buffers stay where the graph runs (ONNX Runtime IoBinding: GPU memory) instead of travelling
/// to the host and back every step. Each state input is paired with the output that holds its
/// next value; a run leaves the new values pending until [`ResidentState::commit`], so a step
/// whose loss is not finite can be dropped with [`ResidentState::discard`].
pub trait ResidentState {
    /// Where the state lives, for messages (`cuda:0`, `cpu`).
    fn location(&self) -> String;
    /// Places the state: `(input, next output)` pairs and their current values, in that order.
    fn set(&mut self, pairs: &[(String, String)], values: Vec<Tensor>) -> Result<(), BackendError>;
    /// Runs with `inputs` (every input but the state's) and the current state. Returns the
    /// outputs that are not state, on the host, in declaration order; the new state is pending.
    fn run(&mut self, inputs: Vec<(String, Tensor)>)
        -> Result<Vec<(String, Tensor)>, BackendError>;
    /// Makes the pending state current.
    fn commit(&mut self);
    /// Drops the pending state; the current state stays.
    fn discard(&mut self);
    /// The current state, copied to the host, in the order of [`ResidentState::set`].
    fn get(&self) -> Result<Vec<Tensor>, BackendError>;
}

/// An execution backend.
pub trait Backend: Send + Sync {
    /// `tract` or `ort`.
    fn name(&self) -> &'static str;
    /// Where its sessions run.
    fn device(&self) -> Device {
        Device::Cpu
    }
    /// The name and device, for messages: `ort`, `ort on cuda:0`.
    fn label(&self) -> String {
        match self.device() {
            Device::Cpu => self.name().to_string(),
            d => format!("{} on {d}", self.name()),
        }
    }
    /// Loads a model from its encoded bytes; `label` (usually the file path) names it in errors.
    fn load(&self, bytes: &[u8], label: &str) -> Result<Box<dyn Session>, BackendError>;

    /// Loads a model file.
    fn load_file(&self, path: &Path) -> Result<Box<dyn Session>, BackendError> {
        let label = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| BackendError::Load {
            backend: self.name(),
            model: label.clone(),
            message: e.to_string(),
        })?;
        self.load(&bytes, &label)
    }

    /// Loads an in-memory model.
    fn load_model(
        &self,
        model: &ModelProto,
        label: &str,
    ) -> Result<Box<dyn Session>, BackendError> {
        use prost::Message;
        self.load(&model.encode_to_vec(), label)
    }
}

/// Opens the backend `kind`. `Auto` prefers ONNX Runtime and falls back to tract with a
/// one-line warning on stderr when the library is not found.
pub fn open_backend(
    kind: BackendKind,
    options: &BackendOptions,
) -> Result<Box<dyn Backend>, BackendError> {
    if kind == BackendKind::Tract && options.device.is_gpu() {
        return Ok(tract_on_gpu(options.device));
    }
    match kind {
        BackendKind::Tract => Ok(Box::new(tract::TractBackend::new())),
        BackendKind::Ort => open_ort(options),
        BackendKind::Auto => match open_ort(options) {
            Ok(b) => Ok(b),
            Err(e) => {
                let reason = e.to_string();
                let first = reason.lines().next().unwrap_or_default();
                eprintln!("densa: warning: using tract, ONNX Runtime is unavailable ({first})");
                Ok(Box::new(tract::TractBackend::new()))
            }
        },
    }
}

/// tract for `--device cuda`: its CUDA runtime with the `tract-cuda` feature, else the CPU (and
/// a warning that says why).
fn tract_on_gpu(device: Device) -> Box<dyn Backend> {
    #[cfg(feature = "tract-cuda")]
    {
        if device != Device::Cuda(0) {
            eprintln!("densa: warning: --device {device}: tract-cuda uses GPU 0");
        }
        match tract::TractCudaBackend::new() {
            Ok(b) => return Box::new(b),
            Err(e) => eprintln!(
                "densa: warning: --device {device}: tract's CUDA runtime cannot start ({e}); \
                 running on the CPU"
            ),
        }
    }
    #[cfg(not(feature = "tract-cuda"))]
    eprintln!(
        "densa: warning: --device {device}: this densa was built without the `tract-cuda` \
         feature, so tract runs on the CPU; use --backend ort (ONNX Runtime's CUDA provider) or \
         build with `--features tract-cuda`"
    );
    Box::new(tract::TractBackend::new())
}

#[cfg(feature = "ort")]
fn open_ort(options: &BackendOptions) -> Result<Box<dyn Backend>, BackendError> {
    Ok(Box::new(ort::OrtBackend::new(options)?))
}

#[cfg(not(feature = "ort"))]
fn open_ort(_: &BackendOptions) -> Result<Box<dyn Backend>, BackendError> {
    Err(BackendError::OrtNotCompiled)
}

pub(crate) fn decode_model(
    bytes: &[u8],
    label: &str,
    backend: &'static str,
) -> Result<ModelProto, BackendError> {
    densa_exporter::io::decode(bytes, Path::new(label)).map_err(|e| BackendError::Load {
        backend,
        model: label.to_string(),
        message: e.to_string(),
    })
}
