//! Normalisation layers for training graphs, written with primitive ONNX ops.
//!
//! - Batch norm in training mode (`nn.BatchNorm1d/2d/3d` in `train()` mode, Ioffe & Szegedy
//!   2015): normalises with the batch statistics over every axis but the channel axis, using the
//!   biased variance, and returns PyTorch's running-statistic update
//!   `running_mean = (1 - m) * running_mean + m * mean`,
//!   `running_var = (1 - m) * running_var + m * var * n / (n - 1)` (the unbiased variance).
//! - Group norm (`nn.GroupNorm`, Wu & He 2018) and layer norm (`nn.LayerNorm`, Ba et al.
//!   2016): the same in training and inference; written here from primitives so that densa's
//!   autodiff needs rules for primitive ops only.
//!
//! Why primitives: tract rejects `BatchNormalization` with `training_mode=1` (and with
//! parameters that are graph inputs), and ONNX Runtime's training mode updates the running
//! variance with the biased variance. Inference exports keep `BatchNormalization` (folded into
//! the convolution). Our choices: the statistics are computed in float32 in two passes (mean,
//! then the mean of squared deviations; PyTorch's CPU kernels accumulate in double), and
//! PyTorch's cumulative-average mode (`momentum=None`) is not offered.

use super::{Fragment, TrainError};
use crate::builder::{shape_string, Dim, GraphBuilder, Init, ParamKind, Value};
use crate::tensor::DType;

fn float_input(fragment: &'static str, x: &Value, min_rank: usize) -> Result<(), TrainError> {
    if x.dtype() != DType::F32 {
        return Err(TrainError::DType {
            fragment,
            name: x.name().to_string(),
            dtype: x.dtype(),
            expected: DType::F32,
        });
    }
    if x.rank() < min_rank {
        return Err(TrainError::Unsupported {
            fragment,
            what: format!(
                "input `{}` {} has rank {}, at least {min_rank} is needed",
                x.name(),
                shape_string(x.shape()),
                x.rank()
            ),
        });
    }
    Ok(())
}

/// Checks that an affine parameter or running statistic has shape `expected`.
fn expect_shape(
    fragment: &'static str,
    v: &Value,
    expected: &[Dim],
    x: &Value,
) -> Result<(), TrainError> {
    if v.dtype() != DType::F32 {
        return Err(TrainError::DType {
            fragment,
            name: v.name().to_string(),
            dtype: v.dtype(),
            expected: DType::F32,
        });
    }
    if v.shape() != expected {
        return Err(TrainError::ShapeMismatch {
            fragment,
            value: v.name().to_string(),
            got: shape_string(v.shape()),
            reference: x.name().to_string(),
            expected: shape_string(expected),
        });
    }
    Ok(())
}

/// `x - mean` and `1 / sqrt(var + eps)` applied: the normalised value and the batch mean and
/// biased variance (kept dims) over `axes`.
fn standardize(
    b: &mut GraphBuilder,
    x: &Value,
    axes: &[i64],
    epsilon: f32,
) -> Result<(Value, Value, Value), TrainError> {
    let mean = b.reduce_mean(x, axes, true)?;
    let centered = b.sub(x, &mean)?;
    let squared = b.mul(&centered, &centered)?;
    let var = b.reduce_mean(&squared, axes, true)?;
    let eps = b.const_f32(epsilon);
    let padded = b.add(&var, &eps)?;
    let std = b.sqrt(&padded);
    let y = b.div(&centered, &std)?;
    Ok((y, mean, var))
}

/// `y * weight + bias` with per-channel `[C]` parameters broadcast over `[N, C, *]`.
fn channel_affine(
    b: &mut GraphBuilder,
    y: &Value,
    channels: i64,
    weight: Option<&Value>,
    bias: Option<&Value>,
) -> Result<Value, TrainError> {
    let mut target = vec![channels];
    target.extend(std::iter::repeat_n(1, y.rank() - 2));
    let mut y = y.clone();
    if let Some(w) = weight {
        let w = b.reshape(w, &target)?;
        y = b.mul(&y, &w)?;
    }
    if let Some(bias) = bias {
        let bias = b.reshape(bias, &target)?;
        y = b.add(&y, &bias)?;
    }
    Ok(y)
}

/// Configuration of [`batch_norm_train`].
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormTrainConfig {
    /// Added to the variance; default 1e-5, as in PyTorch.
    pub epsilon: f32,
    /// Weight of the batch statistic in the running average; default 0.1, as in PyTorch.
    pub momentum: f32,
}

impl Default for BatchNormTrainConfig {
    fn default() -> Self {
        BatchNormTrainConfig {
            epsilon: 1e-5,
            momentum: 0.1,
        }
    }
}

/// What a training-mode batch norm computes.
#[derive(Clone, Debug)]
pub struct BatchNormTrainOutputs {
    /// The normalised (and scaled, shifted) input.
    pub y: Value,
    /// The new running mean `[C]`.
    pub running_mean: Value,
    /// The new running variance `[C]` (updated with the unbiased batch variance).
    pub running_var: Value,
    /// The two updates, named after the running-statistic values given (`bn1.running_mean`
    /// -> `bn1.running_mean.next`).
    pub state: Fragment,
}

/// Batch norm in training mode, PyTorch's `F.batch_norm(training=True)`.
///
/// The batch has `n = N * (product of the spatial dims)` values per channel; `n` is computed
/// in the graph when the dims are symbolic. With `n = 1` the unbiased variance is infinite
/// (PyTorch refuses such batches; a graph cannot).
///
/// # Shapes
/// `x`: `[N, C, *]` (rank >= 2, `C` fixed); `weight`, `bias`, `running_mean`, `running_var`:
/// `[C]`; `y`: `[N, C, *]`.
pub fn batch_norm_train(
    b: &mut GraphBuilder,
    x: &Value,
    weight: Option<&Value>,
    bias: Option<&Value>,
    running_mean: &Value,
    running_var: &Value,
    config: &BatchNormTrainConfig,
) -> Result<BatchNormTrainOutputs, TrainError> {
    const F: &str = "BatchNorm (training)";
    float_input(F, x, 2)?;
    let channels = x.dim(1).fixed().ok_or_else(|| TrainError::DynamicShape {
        fragment: F,
        name: x.name().to_string(),
        shape: shape_string(x.shape()),
    })?;
    let c = [Dim::Fixed(channels)];
    for v in [weight, bias, Some(running_mean), Some(running_var)]
        .into_iter()
        .flatten()
    {
        expect_shape(F, v, &c, x)?;
    }
    if !(0.0..=1.0).contains(&config.momentum) {
        return Err(TrainError::Hyperparameter {
            fragment: F,
            name: "momentum",
            value: config.momentum as f64,
            expected: "0 <= momentum <= 1",
        });
    }
    let axes: Vec<i64> = std::iter::once(0).chain(2..x.rank() as i64).collect();
    let (normalized, mean, var) = standardize(b, x, &axes, config.epsilon)?;
    let y = channel_affine(b, &normalized, channels, weight, bias)?;

    let mean = b.reshape(&mean, &[channels])?;
    let var = b.reshape(&var, &[channels])?;
    let n = b.count_over(x, &axes, DType::F32)?;
    let one = b.const_f32(1.0);
    let n_minus_1 = b.sub(&n, &one)?;
    let bessel = b.div(&n, &n_minus_1)?;
    let unbiased = b.mul(&var, &bessel)?;
    let momentum = b.const_f32(config.momentum);
    // 1 - m rounded once, as PyTorch's `(1 - momentum)` in double then stored as float.
    let keep = b.const_f32((1.0 - config.momentum as f64) as f32);
    let mut running = |old: &Value, batch: &Value| -> Result<Value, TrainError> {
        let kept = b.mul(old, &keep)?;
        let fresh = b.mul(batch, &momentum)?;
        Ok(b.add(&kept, &fresh)?)
    };
    let new_mean = running(running_mean, &mean)?;
    let new_var = running(running_var, &unbiased)?;
    let mut state = Fragment::default();
    state.update(running_mean.name(), new_mean.clone());
    state.update(running_var.name(), new_var.clone());
    Ok(BatchNormTrainOutputs {
        y,
        running_mean: new_mean,
        running_var: new_var,
        state,
    })
}

/// Group norm, PyTorch's `F.group_norm`: the channels are split into `num_groups` groups and
/// each (sample, group) is normalised over its channels and spatial positions.
///
/// # Shapes
/// `x`: `[N, C, *]` (rank >= 2, `C` divisible by `num_groups`); `weight`, `bias`: `[C]`;
/// result: `[N, C, *]`.
pub fn group_norm(
    b: &mut GraphBuilder,
    x: &Value,
    num_groups: usize,
    weight: Option<&Value>,
    bias: Option<&Value>,
    epsilon: f32,
) -> Result<Value, TrainError> {
    const F: &str = "GroupNorm";
    float_input(F, x, 2)?;
    let groups = num_groups as i64;
    if groups == 0 || x.dim(1).fixed().is_some_and(|c| c % groups != 0) {
        return Err(TrainError::Unsupported {
            fragment: F,
            what: format!(
                "{num_groups} groups do not divide the {} channels of `{}`",
                x.dim(1),
                x.name()
            ),
        });
    }
    if weight.is_some() || bias.is_some() {
        let channels = x.dim(1).fixed().ok_or_else(|| TrainError::DynamicShape {
            fragment: F,
            name: x.name().to_string(),
            shape: shape_string(x.shape()),
        })?;
        for v in [weight, bias].into_iter().flatten() {
            expect_shape(F, v, &[Dim::Fixed(channels)], x)?;
        }
    }
    let grouped = b.reshape(x, &[0, groups, -1])?;
    let (normalized, _, _) = standardize(b, &grouped, &[2], epsilon)?;
    let normalized = b.reshape_like(&normalized, x);
    match x.dim(1).fixed() {
        Some(c) => channel_affine(b, &normalized, c, weight, bias),
        None => Ok(normalized),
    }
}

/// Layer norm, PyTorch's `F.layer_norm`: each sample is normalised over its last
/// `normalized_shape.len()` axes.
///
/// # Shapes
/// `x`: `[*, normalized_shape...]`; `weight`, `bias`: `normalized_shape`; result: `x`'s shape.
pub fn layer_norm(
    b: &mut GraphBuilder,
    x: &Value,
    normalized_shape: &[usize],
    weight: Option<&Value>,
    bias: Option<&Value>,
    epsilon: f32,
) -> Result<Value, TrainError> {
    const F: &str = "LayerNorm";
    let k = normalized_shape.len();
    if k == 0 {
        return Err(TrainError::Unsupported {
            fragment: F,
            what: "normalized_shape is empty".into(),
        });
    }
    float_input(F, x, k)?;
    let expected: Vec<Dim> = normalized_shape.iter().map(|&d| d.into()).collect();
    let tail = &x.shape()[x.rank() - k..];
    if tail
        .iter()
        .zip(&expected)
        .any(|(d, e)| d.fixed().is_some() && d != e)
    {
        return Err(TrainError::ShapeMismatch {
            fragment: F,
            value: x.name().to_string(),
            got: shape_string(x.shape()),
            reference: "normalized_shape".into(),
            expected: format!("[*,{}]", shape_string(&expected).trim_matches(['[', ']'])),
        });
    }
    for v in [weight, bias].into_iter().flatten() {
        expect_shape(F, v, &expected, x)?;
    }
    let axes: Vec<i64> = (-(k as i64)..0).collect();
    let (mut y, _, _) = standardize(b, x, &axes, epsilon)?;
    if let Some(w) = weight {
        y = b.mul(&y, w)?;
    }
    if let Some(bias) = bias {
        y = b.add(&y, bias)?;
    }
    Ok(y)
}

/// `nn.GroupNorm`.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupNormConfig {
    pub num_groups: usize,
    pub num_channels: usize,
    /// Default 1e-5, as in PyTorch.
    pub epsilon: f32,
    /// Learnable per-channel `weight` (ones) and `bias` (zeros); default true, as in PyTorch.
    pub affine: bool,
}

impl GroupNormConfig {
    pub fn new(num_groups: usize, num_channels: usize) -> GroupNormConfig {
        GroupNormConfig {
            num_groups,
            num_channels,
            epsilon: 1e-5,
            affine: true,
        }
    }

    /// Creates `name.weight` and `name.bias` (when affine) in the current scope.
    pub fn init(&self, b: &mut GraphBuilder, name: &str) -> Result<GroupNorm, TrainError> {
        if self.num_groups == 0 || !self.num_channels.is_multiple_of(self.num_groups) {
            return Err(TrainError::Unsupported {
                fragment: "GroupNorm",
                what: format!(
                    "{} groups do not divide {} channels",
                    self.num_groups, self.num_channels
                ),
            });
        }
        b.scoped(name, |b| {
            let (weight, bias) = if self.affine {
                let c = [self.num_channels];
                (
                    Some(b.param("weight", &c, Init::Ones, ParamKind::Param)?),
                    Some(b.param("bias", &c, Init::Zeros, ParamKind::Param)?),
                )
            } else {
                (None, None)
            };
            Ok(GroupNorm {
                name: b.scoped_name(""),
                config: self.clone(),
                weight,
                bias,
            })
        })
    }
}

/// A group norm whose parameters exist in the graph.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    name: String,
    pub config: GroupNormConfig,
    pub weight: Option<Value>,
    pub bias: Option<Value>,
}

impl GroupNorm {
    /// # Shapes
    /// `[N, num_channels, *] -> [N, num_channels, *]`.
    pub fn forward(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value, TrainError> {
        let name = self.name.clone();
        b.scoped_root(|b| {
            b.scoped(&name, |b| {
                group_norm(
                    b,
                    x,
                    self.config.num_groups,
                    self.weight.as_ref(),
                    self.bias.as_ref(),
                    self.config.epsilon,
                )
            })
        })
    }
}

/// `nn.LayerNorm`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormConfig {
    /// The trailing dims normalised over.
    pub normalized_shape: Vec<usize>,
    /// Default 1e-5, as in PyTorch.
    pub epsilon: f32,
    /// Learnable `weight` (ones) and `bias` (zeros) of `normalized_shape`; default true.
    pub elementwise_affine: bool,
}

impl LayerNormConfig {
    pub fn new(normalized_shape: &[usize]) -> LayerNormConfig {
        LayerNormConfig {
            normalized_shape: normalized_shape.to_vec(),
            epsilon: 1e-5,
            elementwise_affine: true,
        }
    }

    /// Creates `name.weight` and `name.bias` (when affine) in the current scope.
    pub fn init(&self, b: &mut GraphBuilder, name: &str) -> Result<LayerNorm, TrainError> {
        b.scoped(name, |b| {
            let (weight, bias) = if self.elementwise_affine {
                let s = &self.normalized_shape;
                (
                    Some(b.param("weight", s, Init::Ones, ParamKind::Param)?),
                    Some(b.param("bias", s, Init::Zeros, ParamKind::Param)?),
                )
            } else {
                (None, None)
            };
            Ok(LayerNorm {
                name: b.scoped_name(""),
                config: self.clone(),
                weight,
                bias,
            })
        })
    }
}

/// A layer norm whose parameters exist in the graph.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    name: String,
    pub config: LayerNormConfig,
    pub weight: Option<Value>,
    pub bias: Option<Value>,
}

impl LayerNorm {
    /// # Shapes
    /// `[*, normalized_shape...] -> [*, normalized_shape...]`.
    pub fn forward(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value, TrainError> {
        let name = self.name.clone();
        b.scoped_root(|b| {
            b.scoped(&name, |b| {
                layer_norm(
                    b,
                    x,
                    &self.config.normalized_shape,
                    self.weight.as_ref(),
                    self.bias.as_ref(),
                    self.config.epsilon,
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_norm_train_shapes_and_state_names() {
        let mut b = GraphBuilder::new("t", 0);
        let x = b
            .input(
                "x",
                DType::F32,
                vec![Dim::from("N"), 3.into(), 4.into(), 4.into()],
            )
            .unwrap();
        let rm = b
            .input("bn.running_mean", DType::F32, vec![3.into()])
            .unwrap();
        let rv = b
            .input("bn.running_var", DType::F32, vec![3.into()])
            .unwrap();
        let out = batch_norm_train(&mut b, &x, None, None, &rm, &rv, &Default::default()).unwrap();
        assert_eq!(out.y.shape(), x.shape());
        assert_eq!(out.running_mean.shape(), &[Dim::Fixed(3)]);
        assert!(out.state.next_of("bn.running_var").is_some());
        let wrong = b.input("w", DType::F32, vec![4.into()]).unwrap();
        let e = batch_norm_train(
            &mut b,
            &x,
            Some(&wrong),
            None,
            &rm,
            &rv,
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`w` has shape [4]") && e.contains("[3]"), "{e}");
    }

    #[test]
    fn group_norm_checks_groups_and_keeps_the_shape() {
        let mut b = GraphBuilder::new("t", 0);
        let x = b
            .input(
                "x",
                DType::F32,
                vec![2.into(), 6.into(), Dim::from("H"), 5.into()],
            )
            .unwrap();
        let gn = GroupNormConfig::new(3, 6).init(&mut b, "gn").unwrap();
        let y = gn.forward(&mut b, &x).unwrap();
        assert_eq!(y.shape(), x.shape());
        let e = group_norm(&mut b, &x, 4, None, None, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 groups do not divide the 6 channels"), "{e}");
        assert!(GroupNormConfig::new(4, 6).init(&mut b, "bad").is_err());
    }

    #[test]
    fn layer_norm_checks_the_normalized_shape() {
        let mut b = GraphBuilder::new("t", 0);
        let x = b
            .input("x", DType::F32, vec![Dim::from("N"), 7.into(), 8.into()])
            .unwrap();
        let ln = LayerNormConfig::new(&[7, 8]).init(&mut b, "ln").unwrap();
        assert_eq!(ln.forward(&mut b, &x).unwrap().shape(), x.shape());
        let e = layer_norm(&mut b, &x, &[8, 8], None, None, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`x` has shape [N,7,8]") && e.contains("[*,8,8]"),
            "{e}"
        );
    }
}
