//! Training fragments: the parts of a training-step graph around the gradient.
//!
//! A training step is one ONNX graph whose inputs are the batch, the state and scalar
//! hyperparameters and whose outputs are the loss and the new state (see DESIGN.md). This
//! module builds the pieces of such a graph that are not the model's gradient, from standard
//! ONNX operators only so they run on ONNX Runtime and on tract:
//!
//! - [`norm`]: training-mode batch norm (batch statistics, PyTorch's running-statistic update),
//!   group norm and layer norm from primitive ops.
//! - [`optim`]: SGD (momentum, Nesterov), AdamW (amsgrad too) and LARS updates with
//!   `torch.optim` semantics.
//! - [`clip`]: gradient clipping by global norm (`torch.nn.utils.clip_grad_norm_`).
//! - [`ema`]: the exponential moving average of momentum encoders (MoCo, BYOL, DINO).
//! - [`schedule`]: host-side learning-rate and momentum schedules (warmup, cosine, steps).
//!
//! # Conventions shared by every fragment
//! - A fragment takes values of the graph under construction (parameters, gradients: graph
//!   inputs or outputs of other nodes) and adds nodes; it returns a [`Fragment`] listing the
//!   graph inputs it created and the state it updates.
//! - State is named after what it belongs to: the updated parameter `layer1.0.conv1.weight` is
//!   output as `layer1.0.conv1.weight.next` ([`next_name`]); optimizer slots are inputs named
//!   `{prefix}.{slot}.{param}` with PyTorch's slot names (`optim.momentum_buffer.fc.weight`,
//!   `optim.exp_avg.fc.weight`, `optim.exp_avg_sq.fc.weight`), the step counter is
//!   `{prefix}.step` (int64 scalar, the number of updates done so far, like PyTorch's `step`).
//! - Hyperparameters are scalar graph inputs `{prefix}.{name}` (`optim.lr`, `ema.momentum`)
//!   whose defaults the fragment records, so the host can schedule any of them. They are
//!   **float64**: PyTorch does scalar arithmetic (`1 - beta2`, `lr / (1 - beta1^t)`) in Python
//!   double precision and rounds to float32 only where a scalar meets a tensor; the fragments do
//!   the same, which keeps them within float32 rounding of PyTorch.
//! - Parameters, gradients and state are float32 with shapes fixed at build time.
//! - The host runs a step with the parameters, [`Fragment::initial_values`] (first step) or the
//!   previous step's outputs renamed by [`carry_state`], and the batch.

pub mod clip;
pub mod ema;
pub mod norm;
pub mod optim;
pub mod schedule;

use ndarray::ArrayD;

use crate::builder::{shape_string, BuildError, GraphBuilder, Value};
use crate::tensor::{DType, Tensor};

/// Errors of the training fragments. They name the fragment and the value concerned.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(
        "{fragment}: `{name}` has shape {shape}; training state needs a shape fixed at build time"
    )]
    DynamicShape {
        fragment: &'static str,
        name: String,
        shape: String,
    },
    #[error("{fragment}: `{name}` is {dtype}; expected {expected}")]
    DType {
        fragment: &'static str,
        name: String,
        dtype: DType,
        expected: DType,
    },
    #[error(
        "{fragment}: `{value}` has shape {got}, expected {expected} (the shape of `{reference}`)"
    )]
    ShapeMismatch {
        fragment: &'static str,
        value: String,
        got: String,
        reference: String,
        expected: String,
    },
    #[error("{fragment}: {name} = {value} is invalid: {expected}")]
    Hyperparameter {
        fragment: &'static str,
        name: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("{fragment}: {what}")]
    Unsupported {
        fragment: &'static str,
        what: String,
    },
    #[error("{fragment}: nothing to update (no {what} given)")]
    Empty {
        fragment: &'static str,
        what: &'static str,
    },
}

/// What a graph input created by a fragment is to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputRole {
    /// State carried from step to step (optimizer slots, step counters): the graph outputs its
    /// next value as `{name}.next`.
    State,
    /// A scalar hyperparameter the host may schedule; [`FragmentInput::initial`] is its default.
    Hyperparameter,
}

/// A graph input created by a fragment.
#[derive(Clone, Debug, PartialEq)]
pub struct FragmentInput {
    /// The graph input's name.
    pub name: String,
    /// State or hyperparameter.
    pub role: InputRole,
    /// The value to feed at the first step (its element type and shape are the input's).
    pub initial: Tensor,
}

/// One tensor of state and its value after the step.
#[derive(Clone, Debug, PartialEq)]
pub struct StateUpdate {
    /// The name of the state (a graph input, or an initializer in an eval-style graph).
    pub name: String,
    /// Its new value; the step graph outputs it as [`next_name`]`(name)`.
    pub next: Value,
}

/// What a fragment added to the graph: the inputs it created and the state it updates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fragment {
    /// Graph inputs created by the fragment (state slots and hyperparameters).
    pub inputs: Vec<FragmentInput>,
    /// New values of the state: parameters, optimizer slots, running statistics, teachers.
    pub updates: Vec<StateUpdate>,
}

impl Fragment {
    /// Appends another fragment's inputs and updates.
    pub fn extend(&mut self, other: Fragment) {
        self.inputs.extend(other.inputs);
        self.updates.extend(other.updates);
    }

    /// Declares every update as a graph output named `{name}.next`; returns the outputs.
    pub fn declare_outputs(&self, b: &mut GraphBuilder) -> Result<Vec<Value>, BuildError> {
        self.updates
            .iter()
            .map(|u| b.output(&u.next, &next_name(&u.name)))
            .collect()
    }

    /// The initial value of every input the fragment created: zeros for optimizer slots,
    /// 0 for step counters, the defaults of hyperparameters.
    pub fn initial_values(&self) -> Vec<(String, Tensor)> {
        self.inputs
            .iter()
            .map(|i| (i.name.clone(), i.initial.clone()))
            .collect()
    }

    /// The hyperparameter inputs and their defaults.
    pub fn hyperparameters(&self) -> impl Iterator<Item = (&str, f64)> {
        self.inputs
            .iter()
            .filter(|i| i.role == InputRole::Hyperparameter)
            .map(|i| {
                let default = match &i.initial {
                    Tensor::F64(a) => a.iter().next().copied().unwrap_or(f64::NAN),
                    other => other.to_f32().iter().next().map_or(f64::NAN, |&v| v as f64),
                };
                (i.name.as_str(), default)
            })
    }

    /// The new value of state `name`, if this fragment updates it.
    pub fn next_of(&self, name: &str) -> Option<&Value> {
        self.updates
            .iter()
            .find(|u| u.name == name)
            .map(|u| &u.next)
    }
}

/// The output name of the next value of state `name`: `{name}.next`.
pub fn next_name(name: &str) -> String {
    format!("{name}.next")
}

/// The state for the next step from a step's outputs: every output `{name}.next` becomes
/// `name`; other outputs (loss, metrics) are dropped.
pub fn carry_state(outputs: impl IntoIterator<Item = (String, Tensor)>) -> Vec<(String, Tensor)> {
    outputs
        .into_iter()
        .filter_map(|(n, t)| n.strip_suffix(".next").map(|s| (s.to_string(), t)))
        .collect()
}

/// The fixed shape of a float32 value, or the error that says why it has none.
pub(crate) fn fixed_f32_shape(fragment: &'static str, v: &Value) -> Result<Vec<usize>, TrainError> {
    if v.dtype() != DType::F32 {
        return Err(TrainError::DType {
            fragment,
            name: v.name().to_string(),
            dtype: v.dtype(),
            expected: DType::F32,
        });
    }
    v.shape()
        .iter()
        .map(|d| d.fixed().filter(|&n| n >= 0).map(|n| n as usize))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| TrainError::DynamicShape {
            fragment,
            name: v.name().to_string(),
            shape: shape_string(v.shape()),
        })
}

/// Checks that `value` is float32 with exactly the (fixed) shape of `reference`.
pub(crate) fn expect_same_shape(
    fragment: &'static str,
    value: &Value,
    reference: &Value,
) -> Result<(), TrainError> {
    if value.dtype() != reference.dtype() {
        return Err(TrainError::DType {
            fragment,
            name: value.name().to_string(),
            dtype: value.dtype(),
            expected: reference.dtype(),
        });
    }
    if value.shape() != reference.shape() {
        return Err(TrainError::ShapeMismatch {
            fragment,
            value: value.name().to_string(),
            got: shape_string(value.shape()),
            reference: reference.name().to_string(),
            expected: shape_string(reference.shape()),
        });
    }
    Ok(())
}

impl Fragment {
    /// Creates a float64 scalar hyperparameter input `name` with `default`.
    pub fn hyperparameter(
        &mut self,
        b: &mut GraphBuilder,
        name: &str,
        default: f64,
    ) -> Result<Value, BuildError> {
        let v = b.input(name, DType::F64, vec![])?;
        self.inputs.push(FragmentInput {
            name: name.to_string(),
            role: InputRole::Hyperparameter,
            initial: Tensor::F64(ArrayD::from_elem(vec![], default)),
        });
        Ok(v)
    }

    /// Creates a state input `name` whose first value is `initial`.
    pub(crate) fn state(
        &mut self,
        b: &mut GraphBuilder,
        name: &str,
        initial: Tensor,
    ) -> Result<Value, BuildError> {
        let shape = initial.shape().iter().map(|&d| d.into()).collect();
        let v = b.input(name, initial.dtype(), shape)?;
        self.inputs.push(FragmentInput {
            name: name.to_string(),
            role: InputRole::State,
            initial,
        });
        Ok(v)
    }

    /// Records that state `name` becomes `next`.
    pub fn update(&mut self, name: &str, next: Value) {
        self.updates.push(StateUpdate {
            name: name.to_string(),
            next,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Dim;

    #[test]
    fn carry_state_renames_next_outputs_and_drops_the_rest() {
        let t = Tensor::zeros(DType::F32, &[2]);
        let carried = carry_state(vec![
            ("loss".to_string(), t.clone()),
            ("fc.weight.next".to_string(), t.clone()),
            (
                "optim.step.next".to_string(),
                Tensor::zeros(DType::I64, &[]),
            ),
        ]);
        let names: Vec<&str> = carried.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["fc.weight", "optim.step"]);
    }

    #[test]
    fn state_shapes_must_be_fixed_float32() {
        let mut b = GraphBuilder::new("t", 0);
        let x = b
            .input("x", DType::F32, vec![Dim::from("N"), 3.into()])
            .unwrap();
        let e = fixed_f32_shape("SGD", &x).unwrap_err().to_string();
        assert!(
            e.contains("SGD") && e.contains("`x`") && e.contains("[N,3]"),
            "{e}"
        );
        let i = b.input("i", DType::I64, vec![3.into()]).unwrap();
        let e = fixed_f32_shape("SGD", &i).unwrap_err().to_string();
        assert!(e.contains("int64") && e.contains("float32"), "{e}");
    }
}
