//! DETR's set criterion (`SetCriterion` with `labels` and `boxes` losses) as graph ops, on
//! per-query targets the host fills in after matching ([`super::matcher::QueryTargets`]).
//!
//! For one decoder layer, with `p` the predictions and `t` the matched targets:
//! - `loss_ce`: cross-entropy over `classes + 1` (the last is "no object") of every query,
//!   weighted by class (no object: `eos_coef`, 0.1), as PyTorch's
//!   `F.cross_entropy(logits, classes, weight)`: `sum(w * nll) / sum(w)`;
//! - `loss_bbox`: `sum |p - t|` over matched queries and the four cxcywh coordinates, divided by
//!   the number of target boxes in the batch;
//! - `loss_giou`: `sum (1 - GIoU(p, t))` over matched queries / the number of target boxes.
//!
//! The layer's loss is `w_ce * loss_ce + w_bbox * loss_bbox + w_giou * loss_giou`; DETR sums it
//! over the decoder layers (auxiliary losses), each matched on its own.
//!
//! With [`ClassLoss::SigmoidFocal`] (Deformable DETR's head, which DetReg pretrains) the class
//! head has `classes` logits, each an independent sigmoid, and `loss_ce` is the focal loss of
//! Lin et al. against the one-hot matched class (all zeros for "no object"):
//! `sum over queries and classes of a_t * (1 - p_t)^gamma * BCE(x, t)`, divided by the number
//! of target boxes (Deformable DETR's `sigmoid_focal_loss(...) * num_queries`: the mean over
//! the queries times their number), with `p_t = p` where `t = 1` and `1 - p` elsewhere,
//! `a_t = alpha` where `t = 1` and `1 - alpha` elsewhere.
//!
//! The detector-pretraining methods add a per-query embedding loss ([`embedding_loss`]) on the
//! matched queries, divided by the number of target boxes like the box losses: L1 averaged
//! over the embedding's values (DetReg's `loss_object_embedding`, PyTorch's
//! `l1_loss(p, t, reduction='mean')` over the matched `[boxes, E]`) or the squared distance of
//! the L2-normalised vectors summed over them (UP-DETR's `loss_feature`, PyTorch's
//! `mse_loss(normalize(p), normalize(t), reduction='none').sum() / num_boxes`). DetReg's code
//! puts its embedding head and loss on the last decoder layer only
//! ([`EmbeddingConfig::last_layer_only`]); UP-DETR's here has them on every layer.

use densa_exporter::builder::{attr, Dim};
use densa_exporter::{BuildError, DType, GraphBuilder, Tensor, Value};
use ndarray::ArrayD;

/// How the class head scores a query, in the loss, the matching cost and at inference.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ClassLoss {
    /// DETR: `classes + 1` logits (the last: no object) under a softmax; cross-entropy with
    /// the no-object class weighted by [`LossConfig::eos_coef`].
    #[default]
    Softmax,
    /// Deformable DETR: `classes` logits, each a sigmoid; the focal loss (see the module
    /// docs). Deformable DETR and DetReg: alpha 0.25, gamma 2.
    SigmoidFocal { alpha: f32, gamma: f32 },
}

impl ClassLoss {
    /// Deformable DETR's focal loss: alpha 0.25, gamma 2.
    pub const FOCAL: ClassLoss = ClassLoss::SigmoidFocal {
        alpha: 0.25,
        gamma: 2.0,
    };

    /// Width of the class head for `classes` classes.
    pub fn outputs(&self, classes: usize) -> usize {
        match self {
            ClassLoss::Softmax => classes + 1,
            ClassLoss::SigmoidFocal { .. } => classes,
        }
    }

    /// Initial bias of the class head: 0 for the softmax; for sigmoids, Deformable DETR's
    /// prior (every class starts at probability 0.01, `-ln((1 - 0.01) / 0.01)`), so that the
    /// many "no object" queries do not swamp the focal loss at the start.
    pub fn initial_bias(&self) -> f32 {
        match self {
            ClassLoss::Softmax => 0.0,
            ClassLoss::SigmoidFocal { .. } => -((1.0f32 - 0.01) / 0.01).ln(),
        }
    }
}

/// Weights of the set criterion. Defaults (DETR): CE 1, L1 5, GIoU 2, no-object weight 0.1,
/// softmax classes.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossConfig {
    pub weight_ce: f32,
    pub weight_bbox: f32,
    pub weight_giou: f32,
    /// Weight of "no object" in the softmax cross-entropy (unused by the focal loss).
    pub eos_coef: f32,
    /// The class loss. Default [`ClassLoss::Softmax`].
    #[serde(default)]
    pub class: ClassLoss,
}

impl LossConfig {
    /// Deformable DETR's criterion, as DetReg's code trains it: focal class loss (alpha 0.25,
    /// gamma 2) with weight 2, L1 5, GIoU 2.
    pub fn deformable() -> LossConfig {
        LossConfig {
            weight_ce: 2.0,
            class: ClassLoss::FOCAL,
            ..LossConfig::default()
        }
    }
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            weight_ce: 1.0,
            weight_bbox: 5.0,
            weight_giou: 2.0,
            eos_coef: 0.1,
            class: ClassLoss::Softmax,
        }
    }
}

/// How a predicted per-query embedding is compared with its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingLoss {
    /// `mean |p - t|` over the embedding's values (DetReg).
    L1,
    /// `sum (p / |p| - t / |t|)^2`, norms clamped below at 1e-12 (UP-DETR).
    NormalizedSquared,
}

/// The per-query embedding head of the detector-pretraining methods: an MLP
/// (`feature_embed.layers.{i}`) from the decoder layers' outputs to `dim` values, trained
/// against the matched target's vector ([`super::matcher::ImageTargets::embeddings`]).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EmbeddingConfig {
    /// `E`, the target vectors' length.
    pub dim: usize,
    /// Linear layers of the MLP (`d_model -> d_model -> ... -> dim`). DetReg: 3.
    pub layers: usize,
    /// The comparison.
    pub loss: EmbeddingLoss,
    /// Weight of the loss in each decoder layer's total. DetReg: 1.
    pub weight: f32,
    /// Only the last decoder layer has the head and its loss (DetReg's code); else every
    /// layer (UP-DETR here). Default false.
    #[serde(default)]
    pub last_layer_only: bool,
}

impl EmbeddingConfig {
    /// Whether decoder layer `l` of `layers` has the head.
    pub fn on_layer(&self, l: usize, layers: usize) -> bool {
        !self.last_layer_only || l + 1 == layers
    }
}

impl EmbeddingConfig {
    /// DetReg's head: a 3-layer MLP on the last decoder layer, L1 with weight 1.
    pub fn detreg(dim: usize) -> EmbeddingConfig {
        EmbeddingConfig {
            dim,
            layers: 3,
            loss: EmbeddingLoss::L1,
            weight: 1.0,
            last_layer_only: true,
        }
    }
}

/// One decoder layer's matched targets as graph values.
pub struct LayerTargets {
    /// `[N, Q]` int64: class of the matched target, `classes` (no object) elsewhere.
    pub classes: Value,
    /// `[N, Q, 4]` cxcywh of the matched target (any valid box elsewhere).
    pub boxes: Value,
    /// `[N, Q]` 1 at matched queries.
    pub mask: Value,
}

/// One layer's losses (scalars).
pub struct SetLosses {
    /// The weighted sum.
    pub total: Value,
    pub ce: Value,
    pub bbox: Value,
    pub giou: Value,
}

/// The last axis (size 4) as four `[.., 1]` values.
pub(crate) fn split4(b: &mut GraphBuilder, x: &Value) -> [Value; 4] {
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
    outs.try_into().expect("four outputs")
}

/// `(cx, cy, w, h) -> (x1, y1, x2, y2)` as four `[.., 1]` values.
pub(crate) fn cxcywh_to_xyxy(b: &mut GraphBuilder, x: &Value) -> Result<[Value; 4], BuildError> {
    let [cx, cy, w, h] = split4(b, x);
    let half = b.const_f32(0.5);
    let hw = b.mul(&w, &half)?;
    let hh = b.mul(&h, &half)?;
    Ok([
        b.sub(&cx, &hw)?,
        b.sub(&cy, &hh)?,
        b.add(&cx, &hw)?,
        b.add(&cy, &hh)?,
    ])
}

/// Elementwise GIoU of cxcywh boxes `[.., 4]` -> `[.., 1]`.
pub fn generalized_iou(b: &mut GraphBuilder, p: &Value, t: &Value) -> Result<Value, BuildError> {
    let [px1, py1, px2, py2] = cxcywh_to_xyxy(b, p)?;
    let [tx1, ty1, tx2, ty2] = cxcywh_to_xyxy(b, t)?;
    let zero = b.const_f32(0.0);
    let pw = b.sub(&px2, &px1)?;
    let ph = b.sub(&py2, &py1)?;
    let tw = b.sub(&tx2, &tx1)?;
    let th = b.sub(&ty2, &ty1)?;
    let area_p = b.mul(&pw, &ph)?;
    let area_t = b.mul(&tw, &th)?;
    let ix1 = b.max2(&px1, &tx1)?;
    let iy1 = b.max2(&py1, &ty1)?;
    let ix2 = b.min2(&px2, &tx2)?;
    let iy2 = b.min2(&py2, &ty2)?;
    let iw = b.sub(&ix2, &ix1)?;
    let iw = b.max2(&iw, &zero)?;
    let ih = b.sub(&iy2, &iy1)?;
    let ih = b.max2(&ih, &zero)?;
    let inter = b.mul(&iw, &ih)?;
    let sum = b.add(&area_p, &area_t)?;
    let union = b.sub(&sum, &inter)?;
    let iou = b.div(&inter, &union)?;
    let ex1 = b.min2(&px1, &tx1)?;
    let ey1 = b.min2(&py1, &ty1)?;
    let ex2 = b.max2(&px2, &tx2)?;
    let ey2 = b.max2(&py2, &ty2)?;
    let ew = b.sub(&ex2, &ex1)?;
    let eh = b.sub(&ey2, &ey1)?;
    let enclose = b.mul(&ew, &eh)?;
    let gap = b.sub(&enclose, &union)?;
    let gap = b.div(&gap, &enclose)?;
    b.sub(&iou, &gap)
}

/// The set criterion of one decoder layer (see the module docs). `num_boxes` is a float32
/// scalar: the number of target boxes in the batch, at least 1 (host input).
///
/// # Shapes
/// `logits [N, Q, K]` (`K` = `config.class.outputs(classes)`), `boxes [N, Q, 4]`, targets as
/// [`LayerTargets`],
/// `num_boxes []` -> four scalars.
pub fn set_loss(
    b: &mut GraphBuilder,
    logits: &Value,
    boxes: &Value,
    targets: &LayerTargets,
    num_boxes: &Value,
    classes: usize,
    config: &LossConfig,
) -> Result<SetLosses, BuildError> {
    let k = config.class.outputs(classes);
    if logits.dim(-1).fixed() != Some(k as i64) || logits.rank() != 3 {
        return Err(b.op_error(
            "SetLoss",
            format!(
                "logits `{}` {} should be [N, Q, {k}]",
                logits.name(),
                densa_exporter::builder::shape_string(logits.shape())
            ),
        ));
    }
    let ce = match config.class {
        ClassLoss::Softmax => softmax_ce(b, logits, &targets.classes, classes, config.eos_coef)?,
        ClassLoss::SigmoidFocal { alpha, gamma } => {
            focal_loss(b, logits, &targets.classes, num_boxes, alpha, gamma)?
        }
    };
    // L1 on matched queries.
    let diff = b.sub(boxes, &targets.boxes)?;
    let diff = b.abs(&diff);
    let l1 = b.reduce_sum(&diff, &[-1], false)?;
    let l1 = b.mul(&l1, &targets.mask)?;
    let l1 = b.reduce_sum(&l1, &[], false)?;
    let bbox = b.div(&l1, num_boxes)?;
    // GIoU on matched queries.
    let g = generalized_iou(b, boxes, &targets.boxes)?;
    let one = b.const_f32(1.0);
    let g = b.sub(&one, &g)?;
    let g = b.reshape_like(&g, &targets.mask);
    let g = b.mul(&g, &targets.mask)?;
    let g = b.reduce_sum(&g, &[], false)?;
    let giou = b.div(&g, num_boxes)?;
    let mut terms = Vec::new();
    for (v, weight) in [
        (&ce, config.weight_ce),
        (&bbox, config.weight_bbox),
        (&giou, config.weight_giou),
    ] {
        let wv = b.const_f32(weight);
        terms.push(b.mul(v, &wv)?);
    }
    let refs: Vec<&Value> = terms.iter().collect();
    let total = b.sum_all(&refs)?;
    Ok(SetLosses {
        total,
        ce,
        bbox,
        giou,
    })
}

/// Class-weighted softmax cross-entropy over `classes + 1` logits (see the module docs).
fn softmax_ce(
    b: &mut GraphBuilder,
    logits: &Value,
    target: &Value,
    classes: usize,
    eos_coef: f32,
) -> Result<Value, BuildError> {
    let k = classes + 1;
    let logp = b.node1(
        "LogSoftmax",
        Some("log_softmax"),
        &[logits],
        vec![attr::int("axis", -1)],
        DType::F32,
        logits.shape().to_vec(),
    );
    let idx = unsqueeze_last(b, target);
    let picked = b.node1(
        "GatherElements",
        None,
        &[&logp, &idx],
        vec![attr::int("axis", -1)],
        DType::F32,
        idx.shape().to_vec(),
    );
    let mut w = vec![1.0f32; k];
    w[classes] = eos_coef;
    let class_weight = b.constant(Tensor::F32(
        ArrayD::from_shape_vec(vec![k], w).expect("[K]"),
    ));
    let weights = b.node1(
        "Gather",
        None,
        &[&class_weight, target],
        vec![attr::int("axis", 0)],
        DType::F32,
        target.shape().to_vec(),
    );
    let picked = b.reshape_like(&picked, &weights);
    let wnll = b.mul(&picked, &weights)?;
    let wnll = b.reduce_sum(&wnll, &[], false)?;
    let wsum = b.reduce_sum(&weights, &[], false)?;
    let ce = b.div(&wnll, &wsum)?;
    Ok(b.neg(&ce))
}

/// `x` with a trailing axis of size 1.
fn unsqueeze_last(b: &mut GraphBuilder, x: &Value) -> Value {
    let axes = b.const_i64(&[-1]);
    let mut shape = x.shape().to_vec();
    shape.push(Dim::Fixed(1));
    b.node1("Unsqueeze", None, &[x, &axes], vec![], x.dtype(), shape)
}

/// The sigmoid focal loss of `logits [N, Q, C]` against the one-hot of `target [N, Q]`
/// (int64; `C` = no object: all zeros), summed and divided by `num_boxes`. The binary
/// cross-entropy is taken in the stable form `max(x, 0) - x t + ln(1 + e^-|x|)`.
fn focal_loss(
    b: &mut GraphBuilder,
    logits: &Value,
    target: &Value,
    num_boxes: &Value,
    alpha: f32,
    gamma: f32,
) -> Result<Value, BuildError> {
    let c = logits.dim(-1).fixed().expect("checked by set_loss");
    let idx = unsqueeze_last(b, target);
    let range = b.constant(Tensor::I64(
        ArrayD::from_shape_vec(vec![c as usize], (0..c).collect()).expect("[C]"),
    ));
    let hit = b.equal(&idx, &range)?;
    let t = b.cast(&hit, DType::F32);
    let one = b.const_f32(1.0);
    let not_t = b.sub(&one, &t)?;
    let x = logits;
    let p = b.unary("Sigmoid", x);
    let relu = b.relu(x);
    let xt = b.mul(x, &t)?;
    let abs = b.abs(x);
    let neg_abs = b.neg(&abs);
    let tail = b.unary("Softplus", &neg_abs);
    let bce = b.sub(&relu, &xt)?;
    let bce = b.add(&bce, &tail)?;
    // 1 - p_t = (1 - p) t + p (1 - t)
    let q = b.sub(&one, &p)?;
    let miss_pos = b.mul(&q, &t)?;
    let miss_neg = b.mul(&p, &not_t)?;
    let miss = b.add(&miss_pos, &miss_neg)?;
    let g = b.const_f32(gamma);
    let modulator = b.pow(&miss, &g)?;
    let a_pos = b.const_f32(alpha);
    let a_neg = b.const_f32(1.0 - alpha);
    let at_pos = b.mul(&t, &a_pos)?;
    let at_neg = b.mul(&not_t, &a_neg)?;
    let a_t = b.add(&at_pos, &at_neg)?;
    let l = b.mul(&bce, &modulator)?;
    let l = b.mul(&l, &a_t)?;
    let l = b.reduce_sum(&l, &[], false)?;
    b.div(&l, num_boxes)
}

/// `x / max(||x||_2, 1e-12)` along the last axis (PyTorch's `F.normalize`).
fn normalize_last(b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
    let sq = b.reduce_sum_square(x, &[-1], true)?;
    let norm = b.sqrt(&sq);
    let eps = b.const_f32(1e-12);
    let norm = b.max2(&norm, &eps)?;
    b.div(x, &norm)
}

/// The per-query embedding loss of one decoder layer (unweighted; see the module docs):
/// the matched queries' distances (L1: per value, averaged) summed, divided by `num_boxes`.
///
/// # Shapes
/// `pred [N, Q, E]`, `target [N, Q, E]` (any values where unmatched), `mask [N, Q]`,
/// `num_boxes []` -> a scalar.
pub fn embedding_loss(
    b: &mut GraphBuilder,
    pred: &Value,
    target: &Value,
    mask: &Value,
    num_boxes: &Value,
    kind: EmbeddingLoss,
) -> Result<Value, BuildError> {
    if pred.rank() != 3 || target.rank() != 3 || pred.dim(-1) != target.dim(-1) {
        return Err(b.op_error(
            "EmbeddingLoss",
            format!(
                "prediction `{}` {} and target `{}` {} should both be [N, Q, E]",
                pred.name(),
                densa_exporter::builder::shape_string(pred.shape()),
                target.name(),
                densa_exporter::builder::shape_string(target.shape())
            ),
        ));
    }
    let per_query = match kind {
        EmbeddingLoss::L1 => {
            let diff = b.sub(pred, target)?;
            let diff = b.abs(&diff);
            b.reduce_mean(&diff, &[-1], false)?
        }
        EmbeddingLoss::NormalizedSquared => {
            let p = normalize_last(b, pred)?;
            let t = normalize_last(b, target)?;
            let diff = b.sub(&p, &t)?;
            b.reduce_sum_square(&diff, &[-1], false)?
        }
    };
    let masked = b.mul(&per_query, mask)?;
    let total = b.reduce_sum(&masked, &[], false)?;
    b.div(&total, num_boxes)
}
