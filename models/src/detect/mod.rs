//! FCOS-style dense one-stage detector (Tian et al. 2019): backbone ([`Arch`]) + FPN on
//! `c3..c5` (P3-P5, strides 8/16/32) + heads shared across levels (a classification tower and
//! a box tower of 3x3 convolutions with GroupNorm and ReLU), trained with focal loss
//! (classification), GIoU loss (boxes, weighted by the centerness target) and binary
//! cross-entropy (centerness). Targets are assigned on the host ([`assign`]) and fed as batch
//! inputs.
//!
//! Our choices, for small inputs and CPU budgets:
//! - Three levels P3-P5 (FCOS uses P3-P7) and no per-level learnable scale: boxes are regressed
//!   as `log(distance / stride)` (so `exp` of the head output, as FCOS, with targets normalised
//!   by the stride, as FCOS' `norm_reg_targets`); GIoU is scale invariant, so the box loss is
//!   computed on the normalised distances directly.
//! - The backbone's batch norms train with batch statistics by default
//!   ([`DetectorConfig::train_batch_norm`]); `false` keeps the stored statistics (detectron2's
//!   `FrozenBatchNorm2d`). Inference folds them into the convolutions.
//! - Inference scores are `sqrt(sigmoid(cls) * sigmoid(centerness))` (FCOS' later versions);
//!   decoding (distances -> boxes in input pixels, top-k over locations x classes) is in the
//!   graph, NMS per class on the host (`host_nms` in the spec).

pub mod assign;

use densa_exporter::builder::attr;
use densa_exporter::onnx::ModelProto;
use densa_exporter::passes::fold_batch_norm;
use densa_exporter::train::norm::{GroupNorm, GroupNormConfig};
use densa_exporter::train::TrainError;
use densa_exporter::validate::validate;
use densa_exporter::weights::StateDict;
use densa_exporter::{BuildError, DType, Dim, GraphBuilder, Init, ParamKind, Tensor, Value};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

use crate::backbone::resnet::ResNet;
use crate::backbone::Arch;
use crate::export::ExportError;
use crate::neck::{Fpn, FpnConfig};
use crate::nn::{Conv2d, Conv2dConfig, NormMode};
pub use assign::{AssignConfig, Level, Targets};

/// Why a detector could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("detector config: {field} {problem}")]
    Config {
        field: &'static str,
        problem: String,
    },
    #[error("state: parameter `{name}` {problem}")]
    State { name: String, problem: String },
}

impl From<densa_exporter::passes::PassError> for DetectError {
    fn from(e: densa_exporter::passes::PassError) -> Self {
        DetectError::Export(e.into())
    }
}

impl From<densa_exporter::validate::ValidationError> for DetectError {
    fn from(e: densa_exporter::validate::ValidationError) -> Self {
        DetectError::Export(e.into())
    }
}

/// The detector's shape and training targets. Serialised into fine-tuning output directories
/// (`detector.json`), which is what export needs besides the state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectorConfig {
    /// Backbone architecture (name as `Arch` parses it).
    pub arch: String,
    /// Class names; label `k` is `classes[k]`.
    pub classes: Vec<String>,
    /// Square input size in pixels. Default 128.
    pub image_size: u32,
    /// FPN and head channels. Default 64.
    pub channels: usize,
    /// 3x3 conv + GroupNorm + ReLU blocks per tower (FCOS: 4). Default 2.
    pub head_convs: usize,
    /// GroupNorm groups (FCOS: 32 with 256 channels). Default 16.
    pub gn_groups: usize,
    /// Upper bounds of the scale ranges of P3, P4 (P5 takes the rest), input pixels.
    /// Default `[24, 48]`.
    pub scale_bounds: [f32; 2],
    /// Centre-sampling radius in strides. Default 1.5.
    pub center_radius: f32,
    /// Focal loss alpha (0.25) and gamma (2).
    pub focal_alpha: f32,
    pub focal_gamma: f32,
    /// Prior probability of the classification bias init (0.01).
    pub prior_prob: f32,
    /// Normalisation of `pixel / 255`: mean and std (ImageNet's).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Train the backbone's batch norms with batch statistics (PyTorch's `model.train()`),
    /// updating their running statistics; false keeps the stored statistics (detectron2's
    /// frozen BN, for pretrained backbones and tiny batches). Default true.
    #[serde(default = "default_true")]
    pub train_batch_norm: bool,
}

fn default_true() -> bool {
    true
}

impl DetectorConfig {
    /// The defaults above for `arch` and `classes`.
    pub fn new(arch: Arch, classes: Vec<String>) -> DetectorConfig {
        DetectorConfig {
            arch: arch.name().to_string(),
            classes,
            image_size: 128,
            channels: 64,
            head_convs: 2,
            gn_groups: 16,
            scale_bounds: [24.0, 48.0],
            center_radius: 1.5,
            focal_alpha: 0.25,
            focal_gamma: 2.0,
            prior_prob: 0.01,
            mean: crate::export::IMAGENET_MEAN,
            std: crate::export::IMAGENET_STD,
            train_batch_norm: true,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// The backbone architecture.
    pub fn backbone(&self) -> Result<Arch, DetectError> {
        <Arch as std::str::FromStr>::from_str(&self.arch).map_err(|e| DetectError::Config {
            field: "arch",
            problem: format!("{:?}: {e}", self.arch),
        })
    }

    fn check(&self) -> Result<(), DetectError> {
        let bad = |field, problem: String| Err(DetectError::Config { field, problem });
        if self.classes.is_empty() {
            return bad("classes", "is empty".into());
        }
        if self.image_size < 32 {
            return bad("image_size", format!("{} is below 32", self.image_size));
        }
        if self.gn_groups == 0 || !self.channels.is_multiple_of(self.gn_groups) {
            return bad(
                "gn_groups",
                format!(
                    "{} does not divide {} channels",
                    self.gn_groups, self.channels
                ),
            );
        }
        self.backbone().map(|_| ())
    }

    /// Strides of P3-P5.
    pub const STRIDES: [u32; 3] = [8, 16, 32];

    /// Feature map side of each level for the configured input size (torchvision's ResNet:
    /// each stride-2 step maps `s` to `floor((s - 1) / 2) + 1`).
    pub fn level_sizes(&self) -> [usize; 3] {
        let half = |s: usize| (s - 1) / 2 + 1;
        let mut s = self.image_size as usize;
        let mut sizes = Vec::new();
        for step in 0..5 {
            s = half(s);
            if step >= 2 {
                sizes.push(s);
            }
        }
        [sizes[0], sizes[1], sizes[2]]
    }

    /// The target assigner for this detector.
    pub fn assigner(&self) -> AssignConfig {
        let sizes = self.level_sizes();
        let [a, b] = self.scale_bounds;
        let ranges = [(0.0, a), (a, b), (b, f32::INFINITY)];
        AssignConfig {
            levels: (0..3)
                .map(|i| Level {
                    stride: Self::STRIDES[i] as f32,
                    size: (sizes[i], sizes[i]),
                    range: ranges[i],
                })
                .collect(),
            num_classes: self.num_classes(),
            center_radius: Some(self.center_radius),
        }
    }

    /// Creates every parameter (backbone names as torchvision's, `fpn.*`, `head.*`).
    pub fn init(&self, b: &mut GraphBuilder) -> Result<Detector, DetectError> {
        self.check()?;
        let arch = self.backbone()?;
        let backbone_config = arch.config();
        let backbone = backbone_config.init(b)?;
        let c = backbone_config.out_channels();
        let fpn = b.scoped("fpn", |b| {
            FpnConfig::new(&[c[1], c[2], c[3]], self.channels).init(b)
        })?;
        let head = b.scoped("head", |b| self.init_head(b))?;
        Ok(Detector {
            config: self.clone(),
            backbone,
            fpn,
            head,
        })
    }

    fn init_head(&self, b: &mut GraphBuilder) -> Result<Head, DetectError> {
        let ch = self.channels;
        let conv = |cout: usize| {
            Conv2dConfig::new(ch, cout, 3)
                .padding(1)
                .weight_init(Init::Normal(0.01))
                .bias_init(Init::Zeros)
        };
        let mut towers = Vec::new();
        for tower in ["cls_tower", "box_tower"] {
            let mut blocks = Vec::new();
            for i in 0..self.head_convs {
                let c = b.scoped(tower, |b| conv(ch).init(b, &format!("{i}.conv")))?;
                let gn = b.scoped(tower, |b| {
                    GroupNormConfig::new(self.gn_groups, ch).init(b, &format!("{i}.gn"))
                })?;
                blocks.push((c, gn));
            }
            towers.push(blocks);
        }
        let bias = -((1.0 - self.prior_prob) / self.prior_prob).ln();
        let cls_logits = conv(self.num_classes())
            .bias_init(Init::Constant(bias))
            .init(b, "cls_logits")?;
        let bbox_pred = conv(4).init(b, "bbox_pred")?;
        let centerness = conv(1).init(b, "centerness")?;
        let box_tower = towers.pop().expect("two towers");
        let cls_tower = towers.pop().expect("two towers");
        Ok(Head {
            cls_tower,
            box_tower,
            cls_logits,
            bbox_pred,
            centerness,
        })
    }
}

struct Head {
    cls_tower: Vec<(Conv2d, GroupNorm)>,
    box_tower: Vec<(Conv2d, GroupNorm)>,
    cls_logits: Conv2d,
    bbox_pred: Conv2d,
    centerness: Conv2d,
}

/// A detector whose parameters exist in the graph.
pub struct Detector {
    pub config: DetectorConfig,
    backbone: ResNet,
    fpn: Fpn,
    head: Head,
}

/// The head's outputs over all locations (levels concatenated, row-major per level).
pub struct RawOutputs {
    /// `[N, L, C]` classification logits.
    pub cls: Value,
    /// `[N, L, 4]` `log((l, t, r, b) / stride)`.
    pub box_log: Value,
    /// `[N, L]` centerness logits.
    pub ctr: Value,
}

impl Detector {
    /// # Shapes
    /// `images [N, 3, S, S]` -> cls `[N, L, C]`, box_log `[N, L, 4]`, ctr `[N, L]` with
    /// `L = sum over levels of H_l * W_l`.
    pub fn forward_raw(
        &self,
        b: &mut GraphBuilder,
        images: &Value,
        mode: &mut NormMode,
    ) -> Result<RawOutputs, DetectError> {
        let stages = self.backbone.forward_mode(b, images, mode)?;
        let feats = b.scoped("fpn", |b| {
            self.fpn.forward(b, &[&stages.c3, &stages.c4, &stages.c5])
        })?;
        let sizes = self.config.level_sizes();
        let mut cls = Vec::new();
        let mut boxes = Vec::new();
        let mut ctrs = Vec::new();
        for (level, f) in feats.iter().enumerate() {
            let hw = (sizes[level] * sizes[level]) as i64;
            let ct = tower(b, &self.head.cls_tower, f)?;
            let bt = tower(b, &self.head.box_tower, f)?;
            let c = self.head.cls_logits.forward(b, &ct)?;
            let r = self.head.bbox_pred.forward(b, &bt)?;
            let z = self.head.centerness.forward(b, &bt)?;
            cls.push(b.reshape(&c, &[0, self.config.num_classes() as i64, hw])?);
            boxes.push(b.reshape(&r, &[0, 4, hw])?);
            ctrs.push(b.reshape(&z, &[0, 1, hw])?);
        }
        let join = |b: &mut GraphBuilder, xs: &[Value]| -> Result<Value, BuildError> {
            let refs: Vec<&Value> = xs.iter().collect();
            let x = b.concat(&refs, 2)?;
            Ok(transpose(b, &x, &[0, 2, 1]))
        };
        let cls = b.scoped("head", |b| join(b, &cls))?;
        let box_log = b.scoped("head", |b| join(b, &boxes))?;
        let ctr = b.scoped("head", |b| -> Result<Value, BuildError> {
            let x = join(b, &ctrs)?;
            b.reshape(&x, &[0, -1])
        })?;
        Ok(RawOutputs { cls, box_log, ctr })
    }
}

fn tower(
    b: &mut GraphBuilder,
    blocks: &[(Conv2d, GroupNorm)],
    x: &Value,
) -> Result<Value, DetectError> {
    let mut x = x.clone();
    for (conv, gn) in blocks {
        x = conv.forward(b, &x)?;
        x = gn.forward(b, &x)?;
        x = b.relu(&x);
    }
    Ok(x)
}

fn transpose(b: &mut GraphBuilder, x: &Value, perm: &[i64]) -> Value {
    let shape = perm
        .iter()
        .map(|&p| x.shape()[p as usize].clone())
        .collect();
    b.node1(
        "Transpose",
        None,
        &[x],
        vec![attr::ints("perm", perm)],
        x.dtype(),
        shape,
    )
}

fn unary(b: &mut GraphBuilder, op: &str, x: &Value) -> Value {
    b.unary(op, x)
}

/// Splits the last axis (size 4) into four `[.., 1]` values.
fn split4(b: &mut GraphBuilder, x: &Value) -> [Value; 4] {
    let mut shape = x.shape().to_vec();
    let last = shape.len() - 1;
    shape[last] = Dim::Fixed(1);
    let sizes = b.const_i64(&[1, 1, 1, 1]);
    let outs = b.node(
        "Split",
        None,
        &[Some(x), Some(&sizes)],
        vec![attr::int("axis", last as i64)],
        vec![(x.dtype(), shape); 4],
    );
    let [a, bb, c, d]: [Value; 4] = outs.try_into().expect("four outputs");
    [a, bb, c, d]
}

/// `log(1 + exp(-|x|)) + max(x, 0) - x * t`: binary cross-entropy with logits, stable for any
/// `x` (built from Relu, Abs, Exp, Log, which every backend and the autodiff support).
pub(crate) fn bce_with_logits(
    b: &mut GraphBuilder,
    x: &Value,
    t: &Value,
) -> Result<Value, BuildError> {
    let a = b.abs(x);
    let na = b.neg(&a);
    let e = unary(b, "Exp", &na);
    let one = b.const_f32(1.0);
    let s = b.add(&e, &one)?;
    let l = unary(b, "Log", &s);
    let r = b.relu(x);
    let xt = b.mul(x, t)?;
    let y = b.add(&l, &r)?;
    b.sub(&y, &xt)
}

/// The FCOS training targets as graph values (see [`AssignConfig::assign`]).
pub struct TargetValues {
    /// `[N, L, C]` one-hot class targets (all zero off positives).
    pub cls: Value,
    /// `[N, L, 4]` `(l, t, r, b) / stride` distances of positives.
    pub reg: Value,
    /// `[N, L]` centerness targets.
    pub ctr: Value,
    /// `[N, L]` 1 at positive locations.
    pub pos: Value,
}

/// The detector's losses on raw head outputs: `[total, cls, box, ctr]` scalars. Focal loss
/// (`alpha`, `gamma`) summed over locations and classes / number of positives;
/// `sum(centerness_t * (1 - GIoU)) / sum(centerness_t)` over positives; centerness BCE over
/// positives / number of positives. Used by training and by on-device adaptation
/// (`crate::adapt`), which appends it to a deployed graph.
///
/// # Shapes
/// `raw.cls [N, L, C]`, `raw.box_log [N, L, 4]`, `raw.ctr [N, L]` and the targets as
/// [`TargetValues`] -> four scalars.
pub fn detection_loss(
    b: &mut GraphBuilder,
    raw: &RawOutputs,
    targets: &TargetValues,
    alpha: f32,
    gamma: f32,
) -> Result<[Value; 4], BuildError> {
    let one = b.const_f32(1.0);
    let total_pos = b.reduce_sum(&targets.pos, &[], false)?;
    let num_pos = b.max2(&total_pos, &one)?;
    // Focal loss (Lin et al. 2017).
    let ce = bce_with_logits(b, &raw.cls, &targets.cls)?;
    let p = unary(b, "Sigmoid", &raw.cls);
    let one_m_p = b.sub(&one, &p)?;
    let one_m_t = b.sub(&one, &targets.cls)?;
    let pt_a = b.mul(&p, &targets.cls)?;
    let pt_b = b.mul(&one_m_p, &one_m_t)?;
    let p_t = b.add(&pt_a, &pt_b)?;
    let miss = b.sub(&one, &p_t)?;
    let g = b.const_f32(gamma);
    let modulator = b.pow(&miss, &g)?;
    let a1 = b.const_f32(alpha);
    let a0 = b.const_f32(1.0 - alpha);
    let at_a = b.mul(&a1, &targets.cls)?;
    let at_b = b.mul(&a0, &one_m_t)?;
    let alpha_t = b.add(&at_a, &at_b)?;
    let f = b.mul(&ce, &modulator)?;
    let f = b.mul(&f, &alpha_t)?;
    let f_sum = b.reduce_sum(&f, &[], false)?;
    let loss_cls = b.div(&f_sum, &num_pos)?;
    // GIoU on (l, t, r, b) distances from the same point.
    let ten = b.const_f32(10.0);
    let clamped = b.min2(&raw.box_log, &ten)?;
    let pred = unary(b, "Exp", &clamped);
    let [pl, pt, pr, pb] = split4(b, &pred);
    let [tl, tt, tr, tb] = split4(b, &targets.reg);
    let pw = b.add(&pl, &pr)?;
    let ph = b.add(&pt, &pb)?;
    let tw = b.add(&tl, &tr)?;
    let th = b.add(&tt, &tb)?;
    let area_p = b.mul(&pw, &ph)?;
    let area_t = b.mul(&tw, &th)?;
    let mut side = |f: fn(&mut GraphBuilder, &Value, &Value) -> Result<Value, BuildError>,
                    x: &Value,
                    y: &Value,
                    u: &Value,
                    v: &Value|
     -> Result<Value, BuildError> {
        let a = f(b, x, y)?;
        let c = f(b, u, v)?;
        b.add(&a, &c)
    };
    let iw = side(GraphBuilder::min2, &pl, &tl, &pr, &tr)?;
    let ih = side(GraphBuilder::min2, &pt, &tt, &pb, &tb)?;
    let ew = side(GraphBuilder::max2, &pl, &tl, &pr, &tr)?;
    let eh = side(GraphBuilder::max2, &pt, &tt, &pb, &tb)?;
    let inter = b.mul(&iw, &ih)?;
    let enclose = b.mul(&ew, &eh)?;
    let sum_areas = b.add(&area_p, &area_t)?;
    let union = b.sub(&sum_areas, &inter)?;
    let iou = b.div(&inter, &union)?;
    let gap = b.sub(&enclose, &union)?;
    let gap = b.div(&gap, &enclose)?;
    let giou = b.sub(&iou, &gap)?;
    let giou_loss = b.sub(&one, &giou)?;
    let giou_loss = b.reshape(&giou_loss, &[0, -1])?;
    let w = b.mul(&targets.ctr, &targets.pos)?;
    let weighted = b.mul(&giou_loss, &w)?;
    let box_sum = b.reduce_sum(&weighted, &[], false)?;
    let w_sum = b.reduce_sum(&w, &[], false)?;
    let eps = b.const_f32(1e-6);
    let w_sum = b.max2(&w_sum, &eps)?;
    let loss_box = b.div(&box_sum, &w_sum)?;
    // Centerness BCE on positives.
    let ctr_ce = bce_with_logits(b, &raw.ctr, &targets.ctr)?;
    let ctr_ce = b.mul(&ctr_ce, &targets.pos)?;
    let ctr_sum = b.reduce_sum(&ctr_ce, &[], false)?;
    let loss_ctr = b.div(&ctr_sum, &num_pos)?;
    let total = b.add(&loss_cls, &loss_box)?;
    let total = b.add(&total, &loss_ctr)?;
    Ok([total, loss_cls, loss_box, loss_ctr])
}

/// The loss values of a training graph (scalars).
pub struct Losses {
    /// `cls + boxes + ctr`.
    pub loss: Value,
    pub cls: Value,
    pub boxes: Value,
    pub ctr: Value,
    /// The backbone's running-statistic updates (empty with frozen batch norm).
    pub norm_state: densa_exporter::train::Fragment,
}

/// The names of the training graph's batch inputs and loss outputs.
pub mod names {
    pub const IMAGES: &str = "images";
    pub const CLS: &str = "targets.cls";
    pub const REG: &str = "targets.reg";
    pub const CTR: &str = "targets.ctr";
    pub const POS: &str = "targets.pos";
    pub const LOSS: &str = "loss";
    pub const LOSS_CLS: &str = "loss_cls";
    pub const LOSS_BOX: &str = "loss_box";
    pub const LOSS_CTR: &str = "loss_ctr";
}

impl DetectorConfig {
    /// The forward graph with losses: inputs `images [N, 3, S, S]` and the targets
    /// (`targets.cls [N, L, C]`, `targets.reg [N, L, 4]`, `targets.ctr [N, L]`,
    /// `targets.pos [N, L]`, from [`AssignConfig::assign`]); outputs `loss` (scalar, the sum
    /// of the three) and `loss_cls`, `loss_box`, `loss_ctr`. Parameters are initializers
    /// (kind recorded in the builder); running statistics of the backbone are buffers.
    ///
    /// Losses (FCOS): focal loss summed over locations and classes / number of positives;
    /// `sum(centerness_t * (1 - GIoU)) / sum(centerness_t)` over positives; centerness BCE
    /// over positives / number of positives.
    pub fn training_graph(&self, seed: u64) -> Result<(ModelProto, Vec<String>), DetectError> {
        let (mut b, losses) = self.training_forward(seed)?;
        b.output(&losses.loss, names::LOSS)?;
        b.output(&losses.cls, names::LOSS_CLS)?;
        b.output(&losses.boxes, names::LOSS_BOX)?;
        b.output(&losses.ctr, names::LOSS_CTR)?;
        let trainable = b
            .params()
            .iter()
            .filter(|p| p.kind == ParamKind::Param)
            .map(|p| p.name.clone())
            .collect();
        Ok((b.finish(), trainable))
    }

    /// The builder of [`training_graph`](Self::training_graph) before its outputs are
    /// declared, and the loss values: what a train-step composer takes.
    pub fn training_forward(&self, seed: u64) -> Result<(GraphBuilder, Losses), DetectError> {
        let mut b = GraphBuilder::new("densa-fcos-train", seed);
        let s = self.image_size as i64;
        let l = self.assigner().locations() as i64;
        let c = self.num_classes() as i64;
        let n = Dim::from("N");
        let images = b.input(
            names::IMAGES,
            DType::F32,
            vec![n.clone(), 3.into(), s.into(), s.into()],
        )?;
        let t_cls = b.input(names::CLS, DType::F32, vec![n.clone(), l.into(), c.into()])?;
        let t_reg = b.input(names::REG, DType::F32, vec![n.clone(), l.into(), 4.into()])?;
        let t_ctr = b.input(names::CTR, DType::F32, vec![n.clone(), l.into()])?;
        let t_pos = b.input(names::POS, DType::F32, vec![n.clone(), l.into()])?;
        let net = self.init(&mut b)?;
        let mut mode = if self.train_batch_norm {
            NormMode::train()
        } else {
            NormMode::Inference
        };
        let raw = net.forward_raw(&mut b, &images, &mut mode)?;
        let targets = TargetValues {
            cls: t_cls,
            reg: t_reg,
            ctr: t_ctr,
            pos: t_pos,
        };
        let losses = b.scoped("loss", |b| {
            detection_loss(b, &raw, &targets, self.focal_alpha, self.focal_gamma)
        })?;
        let [loss, cls, boxes, ctr] = losses;
        let norm_state = mode.into_state();
        Ok((
            b,
            Losses {
                loss,
                cls,
                boxes,
                ctr,
                norm_state,
            },
        ))
    }

    /// The inference graph: input `images [N, 3, S, S]` (normalised as `mean`/`std` say),
    /// outputs `boxes [N, K, 4]` (xyxy, input pixels), `scores [N, K]`, `labels [N, K]`
    /// (int64): the `K = min(top_k, L * C)` best (location, class) pairs, before NMS. Batch
    /// norm is folded; `state` (a fine-tuning checkpoint's tensors) sets the weights, names as
    /// in [`training_graph`](Self::training_graph); `metadata` is added to the model.
    pub fn inference_graph(
        &self,
        state: Option<&StateDict>,
        top_k: usize,
        metadata: &[(&str, &str)],
    ) -> Result<ModelProto, DetectError> {
        self.inference_graph_with(state, top_k, None, metadata)
    }

    /// [`inference_graph`](Self::inference_graph), with class-aware NMS in the graph when
    /// `nms_iou` is given: then the input is one image `images [3, S, S]` (CHW, as torchvision's
    /// detection exports) and the outputs are the kept detections `boxes [M, 4]`, `scores [M]`,
    /// `labels [M]` (int64), `M <= K` only known at run time.
    ///
    /// The NMS is the standard ONNX `NonMaxSuppression` (opset 10+, runs on ONNX Runtime and
    /// tract) over the top-K candidates: each candidate scores its own class and `-1` in the
    /// others (`[1, C, K]`), and a score threshold of `-0.5` drops those fillers, so candidates
    /// of different classes never suppress each other; a box is suppressed when its IoU with a
    /// kept box of its class exceeds `nms_iou` (the host NMS's rule). Kept indices are gathered
    /// back into boxes, scores and labels; their order is NonMaxSuppression's (by class, then
    /// score).
    ///
    /// # Shapes
    /// `images [3, S, S]` -> `boxes [M, 4]`, `scores [M]`, `labels [M]`.
    pub fn inference_graph_with(
        &self,
        state: Option<&StateDict>,
        top_k: usize,
        nms_iou: Option<f32>,
        metadata: &[(&str, &str)],
    ) -> Result<ModelProto, DetectError> {
        self.inference_graph_bn(state, top_k, nms_iou, metadata, true)
    }

    /// [`inference_graph_with`](Self::inference_graph_with), with the backbone's batch norms
    /// folded into the convolutions (`fold_bn`, the default everywhere) or kept as
    /// inference-mode `BatchNormalization` nodes reading `*.running_mean` / `*.running_var`
    /// initializers (what `densa adapt --method bn-stats` re-estimates on a device).
    pub fn inference_graph_bn(
        &self,
        state: Option<&StateDict>,
        top_k: usize,
        nms_iou: Option<f32>,
        metadata: &[(&str, &str)],
        fold_bn: bool,
    ) -> Result<ModelProto, DetectError> {
        let mut b = GraphBuilder::new("densa-fcos", 0);
        let s = self.image_size as i64;
        let images = if nms_iou.is_some() {
            let chw = b.input(
                names::IMAGES,
                DType::F32,
                vec![3.into(), s.into(), s.into()],
            )?;
            b.reshape(&chw, &[1, 3, s, s])?
        } else {
            b.input(
                names::IMAGES,
                DType::F32,
                vec![Dim::from("N"), 3.into(), s.into(), s.into()],
            )?
        };
        let net = self.init(&mut b)?;
        if let Some(state) = state {
            crate::export::set_state(&mut b, state).map_err(|e| match e {
                crate::export::StateError::Tensor { name, problem } => {
                    DetectError::State { name, problem }
                }
                crate::export::StateError::Build(e) => DetectError::Build(e),
            })?;
        }
        let raw = net.forward_raw(&mut b, &images, &mut NormMode::Inference)?;
        let points = self.assigner().location_points();
        let l = points.len();
        let c = self.num_classes();
        let k = top_k.min(l * c).max(1) as i64;
        let outs = b.scoped("decode", |b| -> Result<[Value; 3], BuildError> {
            let column =
                |v: Vec<f32>| Tensor::F32(ArrayD::from_shape_vec(vec![l, 1], v).expect("[L, 1]"));
            let cx = b.constant(column(points.iter().map(|p| p.0).collect()));
            let cy = b.constant(column(points.iter().map(|p| p.1).collect()));
            let stride = b.constant(column(points.iter().map(|p| p.2).collect()));
            let ten = b.const_f32(10.0);
            let clamped = b.min2(&raw.box_log, &ten)?;
            let d = unary(b, "Exp", &clamped);
            let d = b.mul(&d, &stride)?;
            let [dl, dt, dr, db] = split4(b, &d);
            let x1 = b.sub(&cx, &dl)?;
            let y1 = b.sub(&cy, &dt)?;
            let x2 = b.add(&cx, &dr)?;
            let y2 = b.add(&cy, &db)?;
            let boxes = b.concat(&[&x1, &y1, &x2, &y2], 2)?;
            let zero = b.const_f32(0.0);
            let side = b.const_f32(s as f32);
            let boxes = b.max2(&boxes, &zero)?;
            let boxes = b.min2(&boxes, &side)?;
            let pc = unary(b, "Sigmoid", &raw.cls);
            let pz = unary(b, "Sigmoid", &raw.ctr);
            let pz = b.reshape(&pz, &[0, -1, 1])?;
            let joint = b.mul(&pc, &pz)?;
            let scores = b.sqrt(&joint);
            let flat = b.reshape(&scores, &[0, -1])?;
            let kk = b.const_i64(&[k]);
            let top = b.node(
                "TopK",
                None,
                &[Some(&flat), Some(&kk)],
                vec![attr::int("axis", 1)],
                vec![
                    (DType::F32, vec![Dim::from("N"), Dim::Fixed(k)]),
                    (DType::I64, vec![Dim::from("N"), Dim::Fixed(k)]),
                ],
            );
            let (top_scores, top_idx) = (&top[0], &top[1]);
            let cc = b.constant(Tensor::I64(ArrayD::from_elem(vec![], c as i64)));
            let loc = b.div(top_idx, &cc)?;
            let back = b.mul(&loc, &cc)?;
            let labels = b.sub(top_idx, &back)?;
            let loc3 = b.reshape(&loc, &[0, k, 1])?;
            let four = b.const_i64(&[1, 1, 4]);
            let idx = b.node1(
                "Expand",
                None,
                &[&loc3, &four],
                vec![],
                DType::I64,
                vec![Dim::from("N"), Dim::Fixed(k), Dim::Fixed(4)],
            );
            let picked = b.node1(
                "GatherElements",
                None,
                &[&boxes, &idx],
                vec![attr::int("axis", 1)],
                DType::F32,
                vec![Dim::from("N"), Dim::Fixed(k), Dim::Fixed(4)],
            );
            Ok([picked, top_scores.clone(), labels])
        })?;
        let [boxes, scores, labels] = outs;
        let [boxes, scores, labels] = match nms_iou {
            None => [boxes, scores, labels],
            Some(iou) => b.scoped("nms", |b| {
                nms_in_graph(b, &boxes, &scores, &labels, c, k, iou)
            })?,
        };
        b.output(&boxes, "boxes")?;
        b.output(&scores, "scores")?;
        b.output(&labels, "labels")?;
        b.metadata("densa.task", "detect");
        b.metadata("densa.arch", &self.arch);
        b.metadata("densa.classes", &self.classes.join(","));
        for (key, value) in metadata {
            b.metadata(key, value);
        }
        let model = if fold_bn {
            fold_batch_norm(&b.finish())?
        } else {
            b.finish()
        };
        validate(&model)?;
        Ok(model)
    }

    /// The initial state of a fresh detector (parameters and buffers by name), as the
    /// training graph has them with `seed`.
    pub fn initial_state(&self, seed: u64) -> Result<StateDict, DetectError> {
        let mut b = GraphBuilder::new("init", seed);
        self.init(&mut b)?;
        let mut sd = StateDict::new();
        for p in b.params().iter().filter(|p| p.kind != ParamKind::Constant) {
            if let Some(t) = b.initializer_value(&p.name) {
                sd.insert(p.name.clone(), t.clone());
            }
        }
        Ok(sd)
    }
}

/// Class-aware NMS over one image's top-K candidates with ONNX `NonMaxSuppression` (see
/// [`DetectorConfig::inference_graph_with`]).
///
/// # Shapes
/// `boxes [1, K, 4]`, `scores [1, K]`, `labels [1, K]` (int64) -> `[M, 4]`, `[M]`, `[M]`.
fn nms_in_graph(
    b: &mut GraphBuilder,
    boxes: &Value,
    scores: &Value,
    labels: &Value,
    classes: usize,
    k: i64,
    iou: f32,
) -> Result<[Value; 3], BuildError> {
    let c = classes as i64;
    let class_ids = b.constant(Tensor::I64(
        ArrayD::from_shape_vec(vec![1, classes, 1], (0..c).collect()).expect("[1, C, 1]"),
    ));
    let labels3 = b.reshape(labels, &[1, 1, k])?;
    let mine = b.equal(&labels3, &class_ids)?;
    let scores3 = b.reshape(scores, &[1, 1, k])?;
    let filler = b.const_f32(-1.0);
    let per_class = b.select(&mine, &scores3, &filler)?;
    let max_out = b.const_i64(&[k]);
    let iou = b.constant(Tensor::F32(ArrayD::from_elem(vec![1], iou)));
    let floor = b.constant(Tensor::F32(ArrayD::from_elem(vec![1], -0.5)));
    let selected = b.node1(
        "NonMaxSuppression",
        None,
        &[boxes, &per_class, &max_out, &iou, &floor],
        vec![attr::int("center_point_box", 0)],
        DType::I64,
        vec![Dim::from("M"), Dim::Fixed(3)],
    );
    let column = b.constant(Tensor::I64(ArrayD::from_elem(vec![], 2)));
    let kept = b.node1(
        "Gather",
        None,
        &[&selected, &column],
        vec![attr::int("axis", 1)],
        DType::I64,
        vec![Dim::from("M")],
    );
    let boxes2 = b.reshape(boxes, &[k, 4])?;
    let scores1 = b.reshape(scores, &[k])?;
    let labels1 = b.reshape(labels, &[k])?;
    let mut gather = |x: &Value, dtype: DType, shape: Vec<Dim>| {
        b.node1(
            "Gather",
            None,
            &[x, &kept],
            vec![attr::int("axis", 0)],
            dtype,
            shape,
        )
    };
    let out_boxes = gather(&boxes2, DType::F32, vec![Dim::from("M"), Dim::Fixed(4)]);
    let out_scores = gather(&scores1, DType::F32, vec![Dim::from("M")]);
    let out_labels = gather(&labels1, DType::I64, vec![Dim::from("M")]);
    Ok([out_boxes, out_scores, out_labels])
}

#[cfg(test)]
mod tests;
