//! Layers: config structs with PyTorch's defaults, `init` to create parameters in the current
//! scope of the builder, `forward` to add nodes.

use densa_exporter::builder::ops::Window2d;
use densa_exporter::train::norm::{batch_norm_train, BatchNormTrainConfig, BatchNormTrainOutputs};
use densa_exporter::train::{Fragment, TrainError};
use densa_exporter::{BuildError, GraphBuilder, Init, ParamKind, Value};

pub use densa_exporter::builder::BuildError as LayerError;

/// `nn.Conv2d`.
#[derive(Clone, Debug)]
pub struct Conv2dConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    /// Default 1.
    pub stride: usize,
    /// Symmetric padding; default 0.
    pub padding: usize,
    /// Default 1.
    pub groups: usize,
    /// Default true, as in PyTorch.
    pub bias: bool,
    /// Default: PyTorch's kaiming-uniform on fan_in.
    pub weight_init: Init,
    /// Default: PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    pub bias_init: Init,
}

impl Conv2dConfig {
    /// A `kernel x kernel` convolution with PyTorch's defaults.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize) -> Conv2dConfig {
        let fan_in = (in_channels * kernel * kernel).max(1) as f32;
        Conv2dConfig {
            in_channels,
            out_channels,
            kernel,
            stride: 1,
            padding: 0,
            groups: 1,
            bias: true,
            weight_init: Init::KaimingUniformFanIn,
            bias_init: Init::Uniform(1.0 / fan_in.sqrt()),
        }
    }
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = s;
        self
    }
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = p;
        self
    }
    pub fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }
    pub fn weight_init(mut self, i: Init) -> Self {
        self.weight_init = i;
        self
    }
    pub fn bias_init(mut self, i: Init) -> Self {
        self.bias_init = i;
        self
    }

    /// Creates `name.weight` (and `name.bias`) in the current scope.
    pub fn init(&self, b: &mut GraphBuilder, name: &str) -> Result<Conv2d, BuildError> {
        b.scoped(name, |b| {
            let w = b.param(
                "weight",
                &[
                    self.out_channels,
                    self.in_channels / self.groups,
                    self.kernel,
                    self.kernel,
                ],
                self.weight_init,
                ParamKind::Param,
            )?;
            let bias = if self.bias {
                Some(b.param(
                    "bias",
                    &[self.out_channels],
                    self.bias_init,
                    ParamKind::Param,
                )?)
            } else {
                None
            };
            Ok(Conv2d {
                name: b.scoped_name(""),
                config: self.clone(),
                weight: w,
                bias,
            })
        })
    }
}

/// A convolution whose parameters exist in the graph.
#[derive(Clone, Debug)]
pub struct Conv2d {
    name: String,
    pub config: Conv2dConfig,
    pub weight: Value,
    pub bias: Option<Value>,
}

impl Conv2d {
    /// # Shapes
    /// `[N, in_channels, H, W] -> [N, out_channels, H', W']`.
    pub fn forward(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
        let c = &self.config;
        let window = Window2d::square(c.kernel as i64, c.stride as i64, c.padding as i64);
        let name = self.name.clone();
        // The node takes the module's full name (`layer1.0.conv1`), outside the current scope.
        b.scoped_root(|b| {
            b.conv2d(
                Some(&name),
                x,
                &self.weight,
                self.bias.as_ref(),
                &window,
                c.groups as i64,
            )
        })
    }
}

/// `nn.BatchNorm2d`.
#[derive(Clone, Debug)]
pub struct BatchNorm2dConfig {
    pub channels: usize,
    /// Default 1e-5.
    pub epsilon: f32,
    /// Initial value of the scale (gamma); default 1. ResNet's zero-init-residual uses 0.
    pub gamma_init: f32,
}

impl BatchNorm2dConfig {
    pub fn new(channels: usize) -> BatchNorm2dConfig {
        BatchNorm2dConfig {
            channels,
            epsilon: 1e-5,
            gamma_init: 1.0,
        }
    }

    /// Creates `name.weight`, `name.bias`, `name.running_mean`, `name.running_var`.
    pub fn init(&self, b: &mut GraphBuilder, name: &str) -> Result<BatchNorm2d, BuildError> {
        b.scoped(name, |b| {
            let c = self.channels;
            Ok(BatchNorm2d {
                name: b.scoped_name(""),
                epsilon: self.epsilon,
                weight: b.param(
                    "weight",
                    &[c],
                    Init::Constant(self.gamma_init),
                    ParamKind::Param,
                )?,
                bias: b.param("bias", &[c], Init::Zeros, ParamKind::Param)?,
                running_mean: b.param("running_mean", &[c], Init::Zeros, ParamKind::Buffer)?,
                running_var: b.param("running_var", &[c], Init::Ones, ParamKind::Buffer)?,
            })
        })
    }
}

/// A batch norm whose parameters exist in the graph.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    name: String,
    pub epsilon: f32,
    pub weight: Value,
    pub bias: Value,
    pub running_mean: Value,
    pub running_var: Value,
}

impl BatchNorm2d {
    /// Inference-mode batch norm (running statistics); folded into the preceding convolution
    /// on export.
    ///
    /// # Shapes
    /// `[N, C, H, W] -> [N, C, H, W]`.
    pub fn forward(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
        let name = self.name.clone();
        b.scoped_root(|b| {
            let params = [
                &self.weight,
                &self.bias,
                &self.running_mean,
                &self.running_var,
            ];
            b.batch_norm(Some(&name), x, params, self.epsilon)
        })
    }
}

/// How [`BatchNorm2d::forward_mode`] normalises: PyTorch's `model.eval()` / `model.train()`.
#[derive(Clone, Debug, Default)]
pub enum NormMode {
    /// Running statistics; folded into the convolution on export. The default.
    #[default]
    Inference,
    /// Batch statistics; each batch norm adds the update of its running statistics to `state`
    /// (`bn1.running_mean` -> `bn1.running_mean.next`).
    Train {
        /// Weight of the batch statistic in the running average (PyTorch: 0.1).
        momentum: f32,
        /// The running-statistic updates recorded so far.
        state: Fragment,
    },
    /// Running statistics, written with primitive ops (`x * s + t` per channel, `s = weight /
    /// sqrt(running_var + eps)`, `t = bias - running_mean * s`): a frozen batch norm inside a
    /// training graph, whose parameters are graph inputs (tract rejects `BatchNormalization`
    /// with non-constant parameters; DETR's `FrozenBatchNorm2d`).
    Frozen,
}

impl NormMode {
    /// Training mode with PyTorch's momentum 0.1.
    pub fn train() -> NormMode {
        NormMode::Train {
            momentum: 0.1,
            state: Fragment::default(),
        }
    }

    /// A mode of the same kind with nothing recorded (a pass whose running statistics are not
    /// kept: training mode with the same momentum, the other modes as they are).
    pub fn fresh(&self) -> NormMode {
        match self {
            NormMode::Train { momentum, .. } => NormMode::Train {
                momentum: *momentum,
                state: Fragment::default(),
            },
            NormMode::Inference => NormMode::Inference,
            NormMode::Frozen => NormMode::Frozen,
        }
    }

    /// The running-statistic updates recorded in training mode (none in inference mode).
    pub fn into_state(self) -> Fragment {
        match self {
            NormMode::Inference | NormMode::Frozen => Fragment::default(),
            NormMode::Train { state, .. } => state,
        }
    }
}

impl BatchNorm2d {
    /// Training-mode batch norm (batch statistics, biased variance) built from primitive ops,
    /// returning the output and PyTorch's update of the running statistics (see
    /// [`densa_exporter::train::norm`]).
    ///
    /// # Shapes
    /// `[N, C, H, W] -> [N, C, H, W]`; running statistics `[C]`.
    pub fn forward_train(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
        momentum: f32,
    ) -> Result<BatchNormTrainOutputs, TrainError> {
        let name = self.name.clone();
        let config = BatchNormTrainConfig {
            epsilon: self.epsilon,
            momentum,
        };
        b.scoped_root(|b| {
            b.scoped(&name, |b| {
                batch_norm_train(
                    b,
                    x,
                    Some(&self.weight),
                    Some(&self.bias),
                    &self.running_mean,
                    &self.running_var,
                    &config,
                )
            })
        })
    }

    /// [`forward`](Self::forward) in primitive ops ([`NormMode::Frozen`]).
    ///
    /// # Shapes
    /// `[N, C, H, W] -> [N, C, H, W]`.
    pub fn forward_frozen(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
        let name = self.name.clone();
        b.scoped_root(|b| {
            b.scoped(&name, |b| {
                let eps = b.const_f32(self.epsilon);
                let var = b.add(&self.running_var, &eps)?;
                let sd = b.sqrt(&var);
                let s = b.div(&self.weight, &sd)?;
                let ms = b.mul(&self.running_mean, &s)?;
                let t = b.sub(&self.bias, &ms)?;
                let s = b.reshape(&s, &[-1, 1, 1])?;
                let t = b.reshape(&t, &[-1, 1, 1])?;
                let y = b.mul(x, &s)?;
                b.add(&y, &t)
            })
        })
    }

    /// [`forward`](Self::forward) or [`forward_train`](Self::forward_train) as `mode` says;
    /// in training mode the running-statistic updates go to `mode`.
    ///
    /// # Shapes
    /// `[N, C, H, W] -> [N, C, H, W]`.
    pub fn forward_mode(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
        mode: &mut NormMode,
    ) -> Result<Value, TrainError> {
        match mode {
            NormMode::Inference => Ok(self.forward(b, x)?),
            NormMode::Frozen => Ok(self.forward_frozen(b, x)?),
            NormMode::Train { momentum, state } => {
                let out = self.forward_train(b, x, *momentum)?;
                state.extend(out.state);
                Ok(out.y)
            }
        }
    }
}
