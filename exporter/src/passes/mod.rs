//! Graph passes. Each takes a model and returns a new one; none mutates its input.

pub mod dce;
pub mod fold_bn;

pub use dce::eliminate_dead_code;
pub use fold_bn::fold_batch_norm;

/// Why a pass could not run.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("the model has no graph")]
    NoGraph,
    #[error("node `{node}`: {message}")]
    Node { node: String, message: String },
    #[error(transparent)]
    Tensor(#[from] crate::tensor::TensorError),
}
