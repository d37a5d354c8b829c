//! # densa-models
//!
//! The model zoo as ONNX graphs: layers ([`nn`]), backbones ([`backbone`]: torchvision ResNets
//! and densa's edge backbone), necks ([`neck`]: FPN), and the exports built from them
//! ([`export`]).

pub mod backbone;
pub mod detect;
pub mod detr;
pub mod export;
pub mod neck;
pub mod nn;

pub use backbone::Arch;
#[cfg(feature = "train")]
pub mod adapt;
#[cfg(all(test, feature = "train"))]
mod data_parallel_tests;
#[cfg(feature = "train")]
pub mod pretext;
pub mod segment;
#[cfg(feature = "train")]
pub mod train_step;
