//! # densa-exporter
//!
//! Everything that builds, transforms and stores graphs; this crate never executes one
//! (`densa-runtime` does).
//!
//! - [`onnx`]: the ONNX messages (prost types).
//! - [`tensor`]: host tensors and their conversion to and from `TensorProto`.
//! - [`builder`]: the graph builder, typed value handles, ops with shape bookkeeping.
//! - [`validate`]: structural checks with errors that name the node.
//! - [`passes`]: batch-norm folding, dead-code removal.
//! - [`io`]: `.onnx` read/write (atomic, external data).
//! - [`weights`]: safetensors and PyTorch checkpoint import.
//! - [`inspect`]: summaries of a model (op histogram, parameters, FLOPs).
//! - [`train`]: training-mode normalisation, optimizers, clipping, EMA, schedules.
//! - [`autodiff`]: reverse-mode differentiation of a graph into standard ONNX ops.

pub mod autodiff;
pub mod builder;
pub mod init;
pub mod inspect;
pub mod io;
pub mod onnx;
pub mod passes;
pub mod tensor;
pub mod train;
pub mod validate;
pub mod weights;

pub use builder::{BuildError, Dim, GraphBuilder, Init, ParamKind, Shape, Value};
pub use tensor::{DType, Tensor};
