//! # densa
//!
//! Self-supervised pretraining, fine-tuning, ONNX export and edge serving of dense-prediction
//! models. This facade re-exports the three crates:
//!
//! - [`exporter`] (`densa-exporter`): ONNX IR, graph builder, passes, weight import.
//! - [`runtime`] (`densa-runtime`): execution backends (tract, ONNX Runtime), tensors.
//! - [`models`] (`densa-models`): backbones, necks, exports.

pub use densa_exporter as exporter;
pub use densa_models as models;
pub use densa_runtime as runtime;
