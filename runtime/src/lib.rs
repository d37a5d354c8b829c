//! # densa-runtime
//!
//! Runs ONNX graphs. [`backend`] holds the execution backends behind one trait: tract (pure
//! Rust, embedded, always compiled) and ONNX Runtime (feature `ort`, loaded dynamically).
//! The runtime knows no model architecture: what it needs to serve a model is in the model.

pub mod augment;
pub mod backend;
pub mod data;
pub mod eval;
pub mod infer;
pub mod mask;
pub mod npy;
pub mod proposals;
#[cfg(feature = "train")]
pub mod train;

pub use backend::{
    open_backend, Backend, BackendError, BackendKind, BackendOptions, Device, ResidentState,
    Session,
};
pub use densa_exporter::{DType, Tensor};
