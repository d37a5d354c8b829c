//! Inference pipelines: what `densa detect` runs. A served model is described by a
//! [`spec::ModelSpec`] (read from a densa export's metadata, or from a TOML spec file for
//! third-party exports); [`preprocess`] turns images into the model's input, the session runs,
//! [`decode`] turns its outputs into detections in original-image pixels, [`nms`] removes
//! duplicates, [`draw`] renders them.

pub mod decode;
pub mod draw;
pub mod nms;
pub mod preprocess;
pub mod spec;

pub use decode::Detection;
pub use spec::{ModelSpec, OutputLayout, ResizeMode};
pub mod segment;
