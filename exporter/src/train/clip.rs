//! Gradient clipping by global norm: `torch.nn.utils.clip_grad_norm_`.
//!
//! The norm is taken over all gradients together, as if they were concatenated:
//! `total = ||(||g_1||, ..., ||g_k||)||` (PyTorch's order of operations), then every gradient
//! is multiplied by `min(max_norm / (total + 1e-6), 1)`. PyTorch multiplies by the clamped
//! coefficient even when it is 1, and so does the graph (no host round trip).
//! The L2 and the infinity norm are supported (PyTorch's other p-norms are not).

use super::{fixed_f32_shape, Fragment, TrainError};
use crate::builder::{GraphBuilder, Value};
use crate::tensor::DType;

/// PyTorch's epsilon in the clipping coefficient.
pub const CLIP_EPSILON: f32 = 1e-6;

/// Which norm [`clip_grad_norm`] measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormType {
    /// The Euclidean norm (PyTorch's default `norm_type=2.0`).
    L2,
    /// The largest absolute value (`norm_type=inf`).
    Inf,
}

/// Configuration of [`clip_grad_norm`].
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    /// Default of the hyperparameter input `{prefix}.max_norm`; default 1.0 (no PyTorch
    /// default; DETR uses 0.1, many recipes 1.0).
    pub max_norm: f64,
    /// Default [`NormType::L2`].
    pub norm_type: NormType,
    /// Name prefix of the inputs; default `clip`.
    pub prefix: String,
}

impl Default for ClipConfig {
    fn default() -> Self {
        ClipConfig {
            max_norm: 1.0,
            norm_type: NormType::L2,
            prefix: "clip".into(),
        }
    }
}

/// The clipped gradients and the norm they had.
#[derive(Clone, Debug)]
pub struct Clipped {
    /// The gradients scaled by the clipping coefficient, in the order given.
    pub grads: Vec<Value>,
    /// The total norm before clipping (float32 scalar): what `clip_grad_norm_` returns, worth
    /// logging.
    pub total_norm: Value,
    /// The hyperparameter input `{prefix}.max_norm`.
    pub fragment: Fragment,
}

/// Clips `grads` by their global norm.
///
/// # Shapes
/// Gradients of any fixed shapes; each clipped gradient has its input's shape; the total norm
/// is a scalar `[]`.
pub fn clip_grad_norm(
    b: &mut GraphBuilder,
    grads: &[Value],
    config: &ClipConfig,
) -> Result<Clipped, TrainError> {
    const F: &str = "clip_grad_norm";
    if grads.is_empty() {
        return Err(TrainError::Empty {
            fragment: F,
            what: "gradients",
        });
    }
    if !(config.max_norm.is_finite() && config.max_norm > 0.0) {
        return Err(TrainError::Hyperparameter {
            fragment: F,
            name: "max_norm",
            value: config.max_norm,
            expected: "max_norm > 0",
        });
    }
    for g in grads {
        fixed_f32_shape(F, g)?;
    }
    let mut fragment = Fragment::default();
    let max_norm =
        fragment.hyperparameter(b, &format!("{}.max_norm", config.prefix), config.max_norm)?;
    let max_norm = b.cast(&max_norm, DType::F32);
    let norms: Vec<Value> = grads
        .iter()
        .map(|g| -> Result<Value, TrainError> {
            Ok(match config.norm_type {
                NormType::L2 => super::optim::frobenius(b, g)?,
                NormType::Inf => {
                    let a = b.abs(g);
                    b.reduce(crate::builder::math::Reduction::Max, &a, &[], false)?
                }
            })
        })
        .collect::<Result<_, _>>()?;
    let refs: Vec<&Value> = norms.iter().collect();
    let total_norm = match config.norm_type {
        NormType::L2 => {
            let squares: Vec<Value> = norms
                .iter()
                .map(|n| b.mul(n, n))
                .collect::<Result<_, _>>()?;
            let refs: Vec<&Value> = squares.iter().collect();
            let sum = b.sum_all(&refs)?;
            b.sqrt(&sum)
        }
        NormType::Inf if refs.len() == 1 => norms[0].clone(),
        NormType::Inf => b.node1("Max", None, &refs, vec![], DType::F32, vec![]),
    };
    let eps = b.const_f32(CLIP_EPSILON);
    let padded = b.add(&total_norm, &eps)?;
    let coefficient = b.div(&max_norm, &padded)?;
    let one = b.const_f32(1.0);
    let coefficient = b.min2(&coefficient, &one)?;
    let grads = grads
        .iter()
        .map(|g| b.mul(g, &coefficient))
        .collect::<Result<_, _>>()?;
    Ok(Clipped {
        grads,
        total_norm,
        fragment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_keeps_shapes_and_names_its_input() {
        let mut b = GraphBuilder::new("t", 0);
        let g1 = b.input("g1", DType::F32, vec![3.into(), 2.into()]).unwrap();
        let g2 = b.input("g2", DType::F32, vec![4.into()]).unwrap();
        let c = clip_grad_norm(&mut b, &[g1.clone(), g2.clone()], &ClipConfig::default()).unwrap();
        assert_eq!(c.grads[0].shape(), g1.shape());
        assert_eq!(c.grads[1].shape(), g2.shape());
        assert!(c.total_norm.shape().is_empty());
        let hyper: Vec<(&str, f64)> = c.fragment.hyperparameters().collect();
        assert_eq!(hyper, [("clip.max_norm", 1.0)]);
        let bad = ClipConfig {
            max_norm: 0.0,
            prefix: "clip2".into(),
            ..ClipConfig::default()
        };
        let e = clip_grad_norm(&mut b, &[g1], &bad).unwrap_err().to_string();
        assert!(e.contains("max_norm = 0"), "{e}");
    }
}
