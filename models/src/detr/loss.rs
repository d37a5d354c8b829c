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
//! The detector-pretraining methods add a per-query embedding loss ([`embedding_loss`]) on the
//! matched queries, divided by the number of target boxes like the box losses: L1 averaged
//! over the embedding's values (DetReg's `loss_object_embedding`, PyTorch's
//! `l1_loss(p, t, reduction='mean')` over the matched `[boxes, E]`) or the squared distance of
//! the L2-normalised vectors summed over them (UP-DETR's `loss_feature`, PyTorch's
//! `mse_loss(normalize(p), normalize(t), reduction='none').sum() / num_boxes`). DetReg's code
//! puts its embedding loss on the last decoder layer only; here every layer with the head has
//! it (our choice: one head configuration for both methods).

use densa_exporter::builder::{attr, Dim};
use densa_exporter::{BuildError, DType, GraphBuilder, Tensor, Value};
use ndarray::ArrayD;

/// Weights of the set criterion. Defaults (DETR): CE 1, L1 5, GIoU 2, no-object weight 0.1.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossConfig {
    pub weight_ce: f32,
    pub weight_bbox: f32,
    pub weight_giou: f32,
    pub eos_coef: f32,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            weight_ce: 1.0,
            weight_bbox: 5.0,
            weight_giou: 2.0,
            eos_coef: 0.1,
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
/// (`feature_embed.layers.{i}`) from every decoder layer's output to `dim` values, trained
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
}

impl EmbeddingConfig {
    /// DetReg's head: a 3-layer MLP, L1 with weight 1.
    pub fn detreg(dim: usize) -> EmbeddingConfig {
        EmbeddingConfig {
            dim,
            layers: 3,
            loss: EmbeddingLoss::L1,
            weight: 1.0,
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
/// `logits [N, Q, classes + 1]`, `boxes [N, Q, 4]`, targets as [`LayerTargets`],
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
    let k = classes + 1;
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
    // Cross-entropy with class weights.
    let logp = b.node1(
        "LogSoftmax",
        Some("log_softmax"),
        &[logits],
        vec![attr::int("axis", -1)],
        DType::F32,
        logits.shape().to_vec(),
    );
    let axes = b.const_i64(&[-1]);
    let mut idx_shape = targets.classes.shape().to_vec();
    idx_shape.push(Dim::Fixed(1));
    let idx = b.node1(
        "Unsqueeze",
        None,
        &[&targets.classes, &axes],
        vec![],
        DType::I64,
        idx_shape.clone(),
    );
    let picked = b.node1(
        "GatherElements",
        None,
        &[&logp, &idx],
        vec![attr::int("axis", -1)],
        DType::F32,
        idx_shape,
    );
    let mut w = vec![1.0f32; k];
    w[classes] = config.eos_coef;
    let class_weight = b.constant(Tensor::F32(
        ArrayD::from_shape_vec(vec![k], w).expect("[K]"),
    ));
    let weights = b.node1(
        "Gather",
        None,
        &[&class_weight, &targets.classes],
        vec![attr::int("axis", 0)],
        DType::F32,
        targets.classes.shape().to_vec(),
    );
    let picked = b.reshape_like(&picked, &weights);
    let wnll = b.mul(&picked, &weights)?;
    let wnll = b.reduce_sum(&wnll, &[], false)?;
    let wsum = b.reduce_sum(&weights, &[], false)?;
    let ce = b.div(&wnll, &wsum)?;
    let ce = b.neg(&ce);
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
