//! Semantic segmentation: a semantic-FPN head (Kirillov et al. 2019, "Panoptic Feature Pyramid
//! Networks", the semantic branch) on a ResNet backbone + FPN, trained with per-pixel
//! cross-entropy that skips an ignore index.
//!
//! # Choices that are ours
//! - The head is the paper's branch shortened for edge devices: every FPN level `P2..P5` gets
//!   **one** `3x3 conv + GroupNorm + ReLU` and is bilinearly resized straight to the stride-4
//!   grid (the paper stacks one conv + 2x upsampling per octave); the levels are summed and a
//!   `1x1` convolution gives the class logits at stride 4, which are bilinearly upsampled
//!   (half-pixel centres, PyTorch's `align_corners=False`) to the input resolution.
//! - The loss is computed **at input resolution** on the upsampled logits: labels are an `int64`
//!   batch input `[N, H, W]` at the image size, so masks need no host-side downsampling and the
//!   exported graph's `logits` are exactly what was trained.
//! - Cross-entropy is written with standard ops and no gather: `onehot = Cast(Equal(labels,
//!   0..C))`, `loss = -sum(onehot * LogSoftmax(logits)) / max(sum(onehot), 1)`. A label outside
//!   `0..C` (the ignore index 255 in particular) matches no class, so its row of `onehot` is zero:
//!   it adds nothing to the loss and nothing to the pixel count (PyTorch's
//!   `F.cross_entropy(ignore_index=255, reduction="mean")`). A batch of only ignored pixels has
//!   loss 0, not NaN.
//! - Backbone names are torchvision's at the root (`conv1.weight`, `layer1.0...`), so imported and
//!   self-supervised backbones load as they are; the neck is under `fpn.`, the head under `head.`.

use densa_exporter::builder::attr;
use densa_exporter::onnx::ModelProto;
use densa_exporter::passes::{fold_batch_norm, PassError};
use densa_exporter::train::norm::{GroupNorm, GroupNormConfig};
use densa_exporter::train::{Fragment, TrainError};
use densa_exporter::validate::{validate, ValidationError};
use densa_exporter::weights::StateDict;
use densa_exporter::{BuildError, DType, Dim, GraphBuilder, Init, ParamKind, Tensor, Value};
use serde::{Deserialize, Serialize};

use crate::backbone::resnet::ResNet;
use crate::backbone::Arch;
use crate::neck::fpn::{Fpn, FpnConfig};
use crate::nn::{Conv2d, Conv2dConfig, NormMode};

/// Label value that the loss and the metrics skip.
pub const IGNORE_INDEX: i64 = 255;

/// Why a segmenter graph could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error("the exported segmenter is invalid: {0}")]
    Invalid(#[from] ValidationError),
    #[error("segmenter config: {0}")]
    Config(String),
    #[error("state `{name}`: {problem}")]
    State { name: String, problem: String },
}

impl From<BuildError> for SegmentError {
    fn from(e: BuildError) -> Self {
        SegmentError::Train(TrainError::Build(e))
    }
}

/// Shape of a semantic-FPN segmenter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmenterConfig {
    /// Backbone. Default `resnet-edge`. Stored by its command-line name.
    #[serde(with = "arch_name")]
    pub arch: Arch,
    /// Classes including the background (class 0 in `densa synth` masks). No default.
    pub num_classes: usize,
    /// Channels of the FPN levels. Default 64 (the paper: 256; ours is sized for edge CPUs).
    pub fpn_channels: usize,
    /// Channels of the head's per-level convolutions. Default 64 (the paper: 128).
    pub head_channels: usize,
    /// GroupNorm groups in the head. Default 8 (the paper: 32 with 128 channels).
    pub groups: usize,
}

impl SegmenterConfig {
    /// The defaults above for `num_classes` classes.
    pub fn new(arch: Arch, num_classes: usize) -> SegmenterConfig {
        SegmenterConfig {
            arch,
            num_classes,
            fpn_channels: 64,
            head_channels: 64,
            groups: 8,
        }
    }

    fn check(&self) -> Result<(), SegmentError> {
        if !(1..=IGNORE_INDEX as usize).contains(&self.num_classes) {
            return Err(SegmentError::Config(format!(
                "num_classes {} must be in 1..={IGNORE_INDEX}",
                self.num_classes
            )));
        }
        if self.groups == 0 || !self.head_channels.is_multiple_of(self.groups) {
            return Err(SegmentError::Config(format!(
                "{} GroupNorm groups do not divide {} head channels",
                self.groups, self.head_channels
            )));
        }
        Ok(())
    }

    /// Creates every parameter: backbone at the root, `fpn.*`, `head.*`.
    pub fn init(&self, b: &mut GraphBuilder) -> Result<Segmenter, SegmentError> {
        self.check()?;
        let backbone_config = self.arch.config();
        let backbone = backbone_config.init(b)?;
        let fpn = b.scoped("fpn", |b| {
            FpnConfig::new(&backbone_config.out_channels(), self.fpn_channels).init(b)
        })?;
        let mut levels = Vec::new();
        let mut head = b.scoped("head", |b| -> Result<_, TrainError> {
            for i in 0..4 {
                let conv = Conv2dConfig::new(self.fpn_channels, self.head_channels, 3)
                    .padding(1)
                    .bias(false)
                    .weight_init(Init::KaimingNormalFanOut)
                    .init(b, &format!("levels.{i}.conv"))?;
                let norm = GroupNormConfig::new(self.groups, self.head_channels)
                    .init(b, &format!("levels.{i}.norm"))?;
                levels.push((conv, norm));
            }
            // Small logits at the start: every class equally likely.
            let classifier = Conv2dConfig::new(self.head_channels, self.num_classes, 1)
                .weight_init(Init::Normal(0.01))
                .bias_init(Init::Zeros)
                .init(b, "classifier")?;
            Ok(vec![classifier])
        })?;
        Ok(Segmenter {
            config: self.clone(),
            backbone,
            fpn,
            levels,
            classifier: head.remove(0),
        })
    }
}

/// A segmenter whose parameters exist in the graph.
#[derive(Clone, Debug)]
pub struct Segmenter {
    pub config: SegmenterConfig,
    backbone: ResNet,
    fpn: Fpn,
    levels: Vec<(Conv2d, GroupNorm)>,
    classifier: Conv2d,
}

impl Segmenter {
    /// Class logits at the input resolution; batch norm as `mode` says.
    ///
    /// # Shapes
    /// `images [N, 3, H, W] -> logits [N, num_classes, H, W]` (H and W multiples of 32 keep every
    /// level aligned; other sizes work, the resizes absorb the rounding).
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        images: &Value,
        mode: &mut NormMode,
    ) -> Result<Value, TrainError> {
        let stages = self.backbone.forward_mode(b, images, mode)?;
        let pyramid = b.scoped("fpn", |b| self.fpn.forward(b, &stages.as_array()))?;
        let mut sum: Option<Value> = None;
        for (i, ((conv, norm), p)) in self.levels.iter().zip(&pyramid).enumerate() {
            let mut h = conv.forward(b, p)?;
            h = norm.forward(b, &h)?;
            h = b.scoped(format!("head.levels.{i}"), |b| b.relu(&h));
            if i > 0 {
                h = b.scoped(format!("head.levels.{i}"), |b| {
                    b.resize_bilinear_like(&h, &pyramid[0])
                })?;
            }
            sum = Some(match sum {
                None => h,
                Some(s) => b.scoped("head", |b| b.add(&s, &h))?,
            });
        }
        let features = sum.expect("four levels");
        let logits = self.classifier.forward(b, &features)?;
        Ok(b.scoped("head", |b| b.resize_bilinear_like(&logits, images))?)
    }

    /// Names of the backbone's parameters (what `--freeze-backbone` keeps fixed).
    pub fn is_backbone(name: &str) -> bool {
        !(name.starts_with("fpn.") || name.starts_with("head."))
    }
}

/// Mean per-pixel cross-entropy over the pixels whose label is in `0..num_classes`; other labels
/// (the ignore index) are skipped. See the module docs for the formulation.
///
/// # Shapes
/// `logits [N, C, H, W]` (float32), `labels [N, H, W]` (int64) `-> loss []`.
pub fn cross_entropy(
    b: &mut GraphBuilder,
    logits: &Value,
    labels: &Value,
    num_classes: usize,
) -> Result<Value, BuildError> {
    if logits.rank() != 4 || labels.rank() != 3 || labels.dtype() != DType::I64 {
        return Err(b.op_error(
            "CrossEntropy",
            format!(
                "expected logits [N, C, H, W] and int64 labels [N, H, W], got `{}` rank {} and \
                 `{}` {} rank {}",
                logits.name(),
                logits.rank(),
                labels.name(),
                labels.dtype(),
                labels.rank()
            ),
        ));
    }
    b.scoped("loss", |b| {
        let log_p = b.node1(
            "LogSoftmax",
            None,
            &[logits],
            vec![attr::int("axis", 1)],
            DType::F32,
            logits.shape().to_vec(),
        );
        let axes = b.const_i64(&[1]);
        let mut shape = labels.shape().to_vec();
        shape.insert(1, Dim::Fixed(1));
        let labels4 = b.node1(
            "Unsqueeze",
            None,
            &[labels, &axes],
            vec![],
            DType::I64,
            shape,
        );
        let classes: Vec<i64> = (0..num_classes as i64).collect();
        let classes = b.constant(Tensor::I64(
            ndarray::ArrayD::from_shape_vec(vec![1, num_classes, 1, 1], classes).expect("C values"),
        ));
        let hit = b.equal(&labels4, &classes)?;
        let onehot = b.cast(&hit, DType::F32);
        let picked = b.mul(&onehot, &log_p)?;
        let total = b.reduce_sum(&picked, &[], false)?;
        let count = b.reduce_sum(&onehot, &[], false)?;
        let one = b.const_f32(1.0);
        let denom = b.max2(&count, &one)?;
        let mean = b.div(&total, &denom)?;
        Ok(b.neg(&mean))
    })
}

/// The training forward graph, unfinished, as a train step is composed from it
/// (`densa_models::train_step::ForwardGraph`): batch inputs `images` float32
/// `[N, 3, size, size]` and `labels` int64 `[N, size, size]`, batch norm in training mode.
pub struct TrainingForward {
    pub builder: GraphBuilder,
    /// The scalar loss ([`cross_entropy`]).
    pub loss: Value,
    /// The batch-norm running-statistic updates.
    pub norm: Fragment,
}

/// Builds the training forward graph (parameters initialised from `seed`).
pub fn training_forward(
    config: &SegmenterConfig,
    image_size: usize,
    seed: u64,
) -> Result<TrainingForward, SegmentError> {
    let mut b = GraphBuilder::new("densa-segmenter-train", seed);
    let s = image_size as i64;
    let images = b.input(
        "images",
        DType::F32,
        vec![Dim::from("N"), 3.into(), s.into(), s.into()],
    )?;
    let labels = b.input(
        "labels",
        DType::I64,
        vec![Dim::from("N"), s.into(), s.into()],
    )?;
    let net = config.init(&mut b)?;
    let mut mode = NormMode::train();
    let logits = net.forward(&mut b, &images, &mut mode)?;
    let loss = cross_entropy(&mut b, &logits, &labels, config.num_classes)?;
    Ok(TrainingForward {
        builder: b,
        loss,
        norm: mode.into_state(),
    })
}

/// The prefixes of the parameters that are not the backbone's (what `--freeze-backbone`
/// trains).
pub const HEAD_PREFIXES: [&str; 2] = ["fpn", "head"];

/// The training forward graph as a finished model with outputs `loss` and the running-statistic
/// updates (`*.next`): for tests and inspection.
#[derive(Debug)]
pub struct TrainingGraph {
    pub model: ModelProto,
    /// The batch-norm running-statistic updates (declared as outputs of `model`).
    pub state: Fragment,
    /// Parameters to train (all but the backbone's with `freeze_backbone`).
    pub trainable: Vec<String>,
    /// Buffers (running statistics) of the model.
    pub buffers: Vec<String>,
}

/// [`training_forward`], finished.
pub fn training_graph(
    config: &SegmenterConfig,
    image_size: usize,
    freeze_backbone: bool,
    seed: u64,
) -> Result<TrainingGraph, SegmentError> {
    let TrainingForward {
        mut builder,
        loss,
        norm,
    } = training_forward(config, image_size, seed)?;
    builder.output(&loss, "loss")?;
    norm.declare_outputs(&mut builder)?;
    let trainable = builder
        .params()
        .iter()
        .filter(|p| p.kind == ParamKind::Param)
        .filter(|p| !(freeze_backbone && Segmenter::is_backbone(&p.name)))
        .map(|p| p.name.clone())
        .collect();
    let buffers = builder
        .params()
        .iter()
        .filter(|p| p.kind == ParamKind::Buffer)
        .map(|p| p.name.clone())
        .collect();
    Ok(TrainingGraph {
        model: builder.finish(),
        state: norm,
        trainable,
        buffers,
    })
}

/// The inference graph: input `images` float32 `[N, 3, H, W]` (N, H, W dynamic), outputs
/// `logits` float32 `[N, C, H, W]` and `class_map` int64 `[N, H, W]` (`ArgMax` over classes),
/// batch norm folded, `metadata` written to `metadata_props`.
///
/// `state` must hold every parameter and buffer under the model's names (extra entries, such as
/// optimizer slots, are ignored); `None` keeps the random initialisation of `seed`.
pub fn inference_graph(
    config: &SegmenterConfig,
    state: Option<&StateDict>,
    metadata: &[(String, String)],
    seed: u64,
) -> Result<ModelProto, SegmentError> {
    let mut b = GraphBuilder::new("densa-segmenter", seed);
    let images = b.input(
        "images",
        DType::F32,
        vec![
            Dim::from("N"),
            Dim::Fixed(3),
            Dim::from("H"),
            Dim::from("W"),
        ],
    )?;
    let net = config.init(&mut b)?;
    if let Some(state) = state {
        load_state(&mut b, state)?;
    }
    let logits = net.forward(&mut b, &images, &mut NormMode::Inference)?;
    let class_map = b.node1(
        "ArgMax",
        Some("class_map"),
        &[&logits],
        vec![attr::int("axis", 1), attr::int("keepdims", 0)],
        DType::I64,
        vec![Dim::from("N"), Dim::from("H"), Dim::from("W")],
    );
    b.output(&logits, "logits")?;
    b.output(&class_map, "class_map")?;
    for (k, v) in metadata {
        b.metadata(k, v);
    }
    let model = fold_batch_norm(&b.finish())?;
    validate(&model)?;
    Ok(model)
}

/// Sets every parameter and buffer of the builder from `state` ([`crate::export::set_state`]).
fn load_state(b: &mut GraphBuilder, state: &StateDict) -> Result<(), SegmentError> {
    crate::export::set_state(b, state).map_err(|e| match e {
        crate::export::StateError::Tensor { name, problem } => {
            SegmentError::State { name, problem }
        }
        crate::export::StateError::Build(e) => e.into(),
    })
}

/// The file in a fine-tuning directory that describes the run to `densa export segmenter`.
pub const RUN_FILE: &str = "segmenter.json";
/// The weights (parameters and running statistics) with the best validation mIoU.
pub const BEST_STATE: &str = "best.safetensors";
/// The weights at the end of the last completed run (used when no validation ran).
pub const LAST_STATE: &str = "last.safetensors";

/// What `densa finetune --task segment` stores in its output directory ([`RUN_FILE`]) so that
/// the export needs no other arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmenterRun {
    pub model: SegmenterConfig,
    /// Class names, index = class (0 = background).
    pub classes: Vec<String>,
    /// Square input size the model was trained at (images are stretched to it).
    pub image_size: u32,
    /// Normalisation of `pixel / 255`: `(x - mean) / std`, RGB.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// `Arch` as its command-line name in JSON.
mod arch_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::backbone::Arch;

    pub fn serialize<S: Serializer>(arch: &Arch, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(arch.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arch, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
