//! Pair DETR (METHODS.md, "Pair DETR"; unreleased, no public code): a box is a pair of
//! keypoints, its **centre** and its **top-left corner**, each predicted by its own decoder over
//! one shared encoder, and the two halves of a pair are tied together by an association loss.
//!
//! The model, on top of plain DETR ([`DetrConfig`]):
//! - the backbone, input projection and encoder are DETR's, shared by both decoders;
//! - the **centre decoder** is DETR's decoder with DETR's names (`transformer.decoder.*`,
//!   `query_embed.weight`) and DETR's heads: the class head `class_embed` and the point head
//!   `bbox_embed`, whose first two outputs (sigmoid) are the centre `(cx, cy)`;
//! - the **top-left decoder** has its own layers, norm and learned queries
//!   (`top_left.decoder.*`, `top_left.query_embed.weight`) and a point head
//!   `top_left.point_embed` (3-layer MLP, sigmoid, 2 coordinates); top-left query `i` pairs with
//!   centre query `i` (Q pairs);
//! - each decoder has an association (embedding) head, `centre.pair_embed` and
//!   `top_left.pair_embed` (2-layer MLP to `pair_embed_dim` dims), on every decoder layer.
//!
//! Per decoder layer, the box of pair `i` is `(cx, cy, w, h)` with
//! `w = max(|2 (cx - x_tl)|, min_size)`, `h = max(|2 (cy - y_tl)|, min_size)`, so DETR's matcher
//! and set criterion ([`super::loss::set_loss`]: CE, 5 L1, 2 GIoU) apply unchanged, and the
//! pair association loss ([`pair_info_nce`]) is added with weight `pair_weight`:
//! InfoNCE between matched centre query `i`'s embedding and top-left query `i`'s embedding
//! (L2-normalised, cosine similarity over `pair_temperature`), the image's other top-left
//! queries as negatives; with `pair_symmetric` also the other way round (the image's other
//! centre queries as negatives for top-left query `i`), the two halves averaged. Only matched
//! pairs count (the set loss's `targets.{l}.mask`); the sum is divided by the number of target
//! boxes, as the L1 and GIoU terms are.
//!
//! Our choices (the paper leaves them open or is unavailable):
//! - **The size guard**: `|.|` instead of a clamp at zero, so a top-left point on the wrong
//!   side of its centre reads as the mirrored corner and still gets a gradient (a clamp would
//!   freeze it, and half the pairs start on the wrong side); `min_size` (default 1e-3) keeps
//!   GIoU's areas positive.
//! - **Names**: everything DETR has keeps DETR's name and shape ([`DetrConfig::initial_state`]),
//!   the centre point head being DETR's box head (its width/height outputs get no gradient
//!   here), so `densa finetune --detector detr --init DIR` loads the backbone, the encoder, the
//!   centre decoder and the heads of a Pair DETR checkpoint; the top-left decoder and the
//!   association heads are the only extra parameters and are left out of a DETR.
//! - **Training** runs through DETR's split step ([`super::train::DetrTrainer`]): the forward
//!   graph gives `pred.{l}.logits` and `pred.{l}.boxes` (the pair boxes), the host matches them,
//!   the backward graph takes the same `targets.*` inputs as DETR's.
//! - No decoder self-attention mask (DETR's `self_attn_mask` option is refused).

use densa_exporter::builder::{attr, Dim};
use densa_exporter::train::norm::{LayerNorm, LayerNormConfig};
use densa_exporter::train::TrainError;
use densa_exporter::weights::StateDict;
use densa_exporter::{BuildError, DType, GraphBuilder, Init, ParamKind, Tensor, Value};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

use super::loss::{set_loss, split4, LayerTargets};
use super::transformer::{self, DecoderLayer, Mlp};
use super::{names, Detr, DetrConfig, DetrError, DetrTraining};
use crate::nn::NormMode;

/// Prefix of the top-left decoder's parameters.
pub const TOP_LEFT: &str = "top_left";
/// Prefix of the centre decoder's association head (the rest of it has DETR's names).
pub const CENTRE: &str = "centre";

/// Names of the extra graph values.
pub mod pair_names {
    /// `[N, Q, 2]` top-left points (normalised xy) of decoder layer `l`.
    pub fn top_left(l: usize) -> String {
        format!("pred.{l}.top_left")
    }
    /// Scalar pair association loss of decoder layer `l` (a metric of the step).
    pub fn loss_pair(l: usize) -> String {
        format!("loss_pair.{l}")
    }
}

/// Pair DETR's shape and training settings: a DETR plus the pair options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairDetrConfig {
    /// The shared parts and the centre decoder (and the DETR a checkpoint initialises).
    pub detr: DetrConfig,
    /// Dimensions of the association embeddings. Default 64.
    #[serde(default = "default_embed_dim")]
    pub pair_embed_dim: usize,
    /// InfoNCE temperature. Default 0.1.
    #[serde(default = "default_temperature")]
    pub pair_temperature: f32,
    /// Weight of the association loss in each decoder layer's loss. Default 1.
    #[serde(default = "default_weight")]
    pub pair_weight: f32,
    /// Also contrast each top-left query against the other centre queries. Default true.
    #[serde(default = "default_symmetric")]
    pub pair_symmetric: bool,
    /// Smallest box side (normalised) the pair gives. Default 1e-3.
    #[serde(default = "default_min_size")]
    pub min_size: f32,
}

fn default_embed_dim() -> usize {
    64
}
fn default_temperature() -> f32 {
    0.1
}
fn default_weight() -> f32 {
    1.0
}
fn default_symmetric() -> bool {
    true
}
fn default_min_size() -> f32 {
    1e-3
}

impl PairDetrConfig {
    /// The defaults above around `detr`.
    pub fn new(detr: DetrConfig) -> PairDetrConfig {
        PairDetrConfig {
            detr,
            pair_embed_dim: default_embed_dim(),
            pair_temperature: default_temperature(),
            pair_weight: default_weight(),
            pair_symmetric: default_symmetric(),
            min_size: default_min_size(),
        }
    }

    fn check(&self) -> Result<(), DetrError> {
        let bad = |field, problem: String| Err(DetrError::Config { field, problem });
        if self.detr.self_attn_mask {
            return bad(
                "self_attn_mask",
                "is not supported by Pair DETR (its queries come in pairs)".into(),
            );
        }
        if self.detr.embedding.is_some() {
            return bad(
                "embedding",
                "is not supported by Pair DETR (its association heads are its embeddings)".into(),
            );
        }
        if self.pair_embed_dim == 0 {
            return bad("pair_embed_dim", "must be positive".into());
        }
        if !(self.pair_temperature.is_finite() && self.pair_temperature > 0.0) {
            return bad(
                "pair_temperature",
                format!("{} is not a positive number", self.pair_temperature),
            );
        }
        if !(self.pair_weight.is_finite() && self.pair_weight >= 0.0) {
            return bad(
                "pair_weight",
                format!("{} is not a non-negative number", self.pair_weight),
            );
        }
        if !(self.min_size.is_finite() && self.min_size > 0.0 && self.min_size < 1.0) {
            return bad("min_size", format!("{} is not in (0, 1)", self.min_size));
        }
        Ok(())
    }

    /// Creates every parameter: DETR's ([`DetrConfig::init`], the centre decoder being DETR's
    /// decoder), then `top_left.decoder.layers.{i}`, `top_left.decoder.norm`,
    /// `top_left.query_embed.weight`, `top_left.point_embed`, `top_left.pair_embed` and
    /// `centre.pair_embed`.
    pub fn init(&self, b: &mut GraphBuilder) -> Result<PairDetr, DetrError> {
        self.check()?;
        let detr = self.detr.init(b)?;
        let c = &self.detr;
        let d = c.d_model;
        let e = self.pair_embed_dim;
        let (decoder, decoder_norm, query_embed, point_embed, pair_embed) =
            b.scoped(TOP_LEFT, |b| {
                let decoder = (0..c.decoder_layers)
                    .map(|i| {
                        DecoderLayer::new(b, &format!("decoder.layers.{i}"), d, c.heads, c.ffn_dim)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let norm = LayerNormConfig::new(&[d]).init(b, "decoder.norm")?;
                let query_embed = b.scoped("query_embed", |b| {
                    b.param(
                        "weight",
                        &[c.num_queries, d],
                        Init::Normal(1.0),
                        ParamKind::Param,
                    )
                })?;
                let point = Mlp::new(b, "point_embed", d, d, 2, 3)?;
                let pair = Mlp::new(b, "pair_embed", d, d, e, 2)?;
                Ok::<_, TrainError>((decoder, norm, query_embed, point, pair))
            })?;
        let centre_pair_embed = b.scoped(CENTRE, |b| Mlp::new(b, "pair_embed", d, d, e, 2))?;
        Ok(PairDetr {
            config: self.clone(),
            detr,
            top_left: TopLeftDecoder {
                decoder,
                decoder_norm,
                query_embed,
                point_embed,
                pair_embed,
            },
            centre_pair_embed,
        })
    }

    /// The initial state of a fresh Pair DETR (parameters and buffers by name) with `seed`.
    pub fn initial_state(&self, seed: u64) -> Result<StateDict, DetrError> {
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

/// The top-left decoder's own parameters.
struct TopLeftDecoder {
    decoder: Vec<DecoderLayer>,
    decoder_norm: LayerNorm,
    query_embed: Value,
    point_embed: Mlp,
    pair_embed: Mlp,
}

/// A Pair DETR whose parameters exist in the graph.
pub struct PairDetr {
    pub config: PairDetrConfig,
    detr: Detr,
    top_left: TopLeftDecoder,
    centre_pair_embed: Mlp,
}

/// One decoder layer's predictions.
#[derive(Clone, Debug)]
pub struct PairLayerOutputs {
    /// `[N, Q, K]` (centre decoder; `K`: [`DetrConfig::class_outputs`]).
    pub logits: Value,
    /// `[N, Q, 4]` normalised cxcywh of the pairs.
    pub boxes: Value,
    /// `[N, Q, 2]` centre points, normalised xy.
    pub centre: Value,
    /// `[N, Q, 2]` top-left points, normalised xy.
    pub top_left: Value,
    /// `[N, Q, E]` association embeddings of the centre queries (not normalised).
    pub centre_embed: Value,
    /// `[N, Q, E]` association embeddings of the top-left queries (not normalised).
    pub top_left_embed: Value,
}

/// `[.., 2]` as two `[.., 1]` values.
fn split2(b: &mut GraphBuilder, x: &Value) -> [Value; 2] {
    let mut shape = x.shape().to_vec();
    let last = shape.len() - 1;
    shape[last] = Dim::Fixed(1);
    let sizes = b.const_i64(&[1, 1]);
    let outs = b.node(
        "Split",
        None,
        &[Some(x), Some(&sizes)],
        vec![attr::int("axis", last as i64)],
        vec![(x.dtype(), shape); 2],
    );
    outs.try_into().expect("two outputs")
}

/// The box of a (centre, top-left) pair: `(cx, cy, max(|2 (cx - x_tl)|, min_size),
/// max(|2 (cy - y_tl)|, min_size))`.
///
/// # Shapes
/// `centre [.., 2]`, `top_left [.., 2]` -> `[.., 4]` cxcywh.
pub fn pair_boxes(
    b: &mut GraphBuilder,
    centre: &Value,
    top_left: &Value,
    min_size: f32,
) -> Result<Value, BuildError> {
    let [cx, cy] = split2(b, centre);
    let [x0, y0] = split2(b, top_left);
    let two = b.const_f32(2.0);
    let floor = b.const_f32(min_size);
    let side = |b: &mut GraphBuilder, c: &Value, t: &Value| -> Result<Value, BuildError> {
        let half = b.sub(c, t)?;
        let s = b.mul(&half, &two)?;
        let s = b.abs(&s);
        b.max2(&s, &floor)
    };
    let w = side(b, &cx, &x0)?;
    let h = side(b, &cy, &y0)?;
    b.concat(&[&cx, &cy, &w, &h], -1)
}

/// `x / sqrt(sum x² + 1e-12)` over the last axis.
fn l2_normalize(b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
    let ss = b.reduce_sum_square(x, &[-1], true)?;
    let eps = b.const_f32(1e-12);
    let ss = b.add(&ss, &eps)?;
    let norm = b.sqrt(&ss);
    b.div(x, &norm)
}

/// The pair association loss (InfoNCE) of one decoder layer: for every matched pair `i` of
/// image `n`, `-log softmax_j(s[n, i, j])[i]` with `s[n, i, j] = cos(centre[n, i],
/// top_left[n, j]) / temperature`; with `symmetric`, the mean of that and
/// `-log softmax_j(s[n, j, i])[i]`. Summed over matched pairs (`mask`) and divided by
/// `num_boxes`.
///
/// # Shapes
/// `centre [N, Q, E]`, `top_left [N, Q, E]`, `mask [N, Q]`, `num_boxes []` -> scalar.
pub fn pair_info_nce(
    b: &mut GraphBuilder,
    centre: &Value,
    top_left: &Value,
    mask: &Value,
    num_boxes: &Value,
    temperature: f32,
    symmetric: bool,
) -> Result<Value, BuildError> {
    let q = match (centre.dim(1).fixed(), top_left.dim(1).fixed()) {
        (Some(a), Some(b2)) if a == b2 && centre.rank() == 3 && top_left.rank() == 3 => a as usize,
        _ => {
            return Err(b.op_error(
                "PairInfoNce",
                format!(
                    "embeddings `{}` {} and `{}` {} should both be [N, Q, E] with a fixed Q",
                    centre.name(),
                    densa_exporter::builder::shape_string(centre.shape()),
                    top_left.name(),
                    densa_exporter::builder::shape_string(top_left.shape())
                ),
            ))
        }
    };
    let c = l2_normalize(b, centre)?;
    let t = l2_normalize(b, top_left)?;
    let tt = transformer::transpose(b, &t, &[0, 2, 1]);
    let sim = transformer::matmul(b, &c, &tt)?;
    let inv_t = b.const_f32(1.0 / temperature);
    let logits = b.mul(&sim, &inv_t)?;
    let mut eye = ArrayD::<f32>::zeros(vec![q, q]);
    for i in 0..q {
        eye[[i, i]] = 1.0;
    }
    let eye = b.constant(Tensor::F32(eye));
    let diag_log_softmax = |b: &mut GraphBuilder, x: &Value| -> Result<Value, BuildError> {
        let logp = b.node1(
            "LogSoftmax",
            None,
            &[x],
            vec![attr::int("axis", -1)],
            DType::F32,
            x.shape().to_vec(),
        );
        let d = b.mul(&logp, &eye)?;
        b.reduce_sum(&d, &[-1], false)
    };
    let mut logp = diag_log_softmax(b, &logits)?;
    if symmetric {
        let lt = transformer::transpose(b, &logits, &[0, 2, 1]);
        let other = diag_log_softmax(b, &lt)?;
        let sum = b.add(&logp, &other)?;
        let half = b.const_f32(0.5);
        logp = b.mul(&sum, &half)?;
    }
    let logp = b.reshape_like(&logp, mask);
    let matched = b.mul(&logp, mask)?;
    let total = b.reduce_sum(&matched, &[], false)?;
    let total = b.neg(&total);
    b.div(&total, num_boxes)
}

/// Names a value with an `Identity` node.
fn named(b: &mut GraphBuilder, x: &Value, name: &str) -> Value {
    b.node1(
        "Identity",
        Some(name),
        &[x],
        vec![],
        x.dtype(),
        x.shape().to_vec(),
    )
}

impl PairDetr {
    /// Every decoder layer's predictions (the centre and top-left decoders run side by side
    /// over the same memory).
    ///
    /// # Shapes
    /// `images [N, 3, S, S]` -> per decoder layer [`PairLayerOutputs`].
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        images: &Value,
        mode: &mut NormMode,
    ) -> Result<Vec<PairLayerOutputs>, DetrError> {
        let net = &self.detr;
        let c = &self.config.detr;
        let stages = net.backbone.forward_mode(b, images, mode)?;
        let d = c.d_model as i64;
        let t = c.tokens() as i64;
        let features = if c.feature_stride == 16 {
            &stages.c4
        } else {
            &stages.c5
        };
        let proj = net.input_proj.forward(b, features)?;
        let flat = b.reshape(&proj, &[0, d, t])?;
        let mut memory = transformer::transpose(b, &flat, &[0, 2, 1]);
        for layer in &net.encoder {
            memory = layer.forward(b, &memory, Some(&net.pos))?;
        }
        let mut tgt_c = transformer::zeros_batch(b, &memory, c.num_queries, c.d_model)?;
        let mut tgt_t = tgt_c.clone();
        let tl = &self.top_left;
        let mut outs = Vec::new();
        for (l, (layer_c, layer_t)) in net.decoder.iter().zip(&tl.decoder).enumerate() {
            tgt_c = layer_c.forward(b, &tgt_c, &memory, &net.query_embed, Some(&net.pos), None)?;
            tgt_t = layer_t.forward(b, &tgt_t, &memory, &tl.query_embed, Some(&net.pos), None)?;
            let hc = net.decoder_norm.forward(b, &tgt_c)?;
            let ht = tl.decoder_norm.forward(b, &tgt_t)?;
            let logits = net.class_embed.forward(b, &hc)?;
            let raw = net.bbox_embed.forward(b, &hc)?;
            let raw = b.unary("Sigmoid", &raw);
            let [cx, cy, _, _] = split4(b, &raw);
            let centre = b.concat(&[&cx, &cy], -1)?;
            let raw_tl = tl.point_embed.forward(b, &ht)?;
            let top_left = b.unary("Sigmoid", &raw_tl);
            let boxes = pair_boxes(b, &centre, &top_left, self.config.min_size)?;
            let centre_embed = self.centre_pair_embed.forward(b, &hc)?;
            let top_left_embed = tl.pair_embed.forward(b, &ht)?;
            outs.push(PairLayerOutputs {
                logits: named(b, &logits, &names::pred_logits(l)),
                boxes: named(b, &boxes, &names::pred_boxes(l)),
                centre,
                top_left: named(b, &top_left, &pair_names::top_left(l)),
                centre_embed,
                top_left_embed,
            });
        }
        Ok(outs)
    }
}

/// The training forward graph's values ([`DetrTraining`]) plus the per-layer pair losses.
pub struct PairTraining {
    /// Loss (sum over layers of set criterion + `pair_weight` × association), per-layer set
    /// losses, predictions, host inputs and running statistics, as DETR's.
    pub detr: DetrTraining,
    /// Per layer: the association loss (scalar, unweighted).
    pub pair_losses: Vec<Value>,
}

impl PairDetrConfig {
    /// The forward graph with the set criterion and the pair association loss on every
    /// decoder layer. Inputs exactly as [`DetrConfig::training_forward`]'s (`images`,
    /// `targets.{l}.classes/boxes/mask`, `targets.num_boxes`).
    pub fn training_forward(
        &self,
        seed: u64,
        batch: Option<usize>,
    ) -> Result<(GraphBuilder, PairTraining), DetrError> {
        let c = &self.detr;
        let mut b = GraphBuilder::new("densa-pairdetr-train", seed);
        let s = c.image_size as i64;
        let n = batch.map(Dim::from).unwrap_or_else(|| Dim::from("N"));
        let q = c.num_queries as i64;
        let images = b.input(
            names::IMAGES,
            DType::F32,
            vec![n.clone(), 3.into(), s.into(), s.into()],
        )?;
        let mut host_inputs = Vec::new();
        let mut targets = Vec::new();
        for l in 0..c.decoder_layers {
            let classes = b.input(&names::classes(l), DType::I64, vec![n.clone(), q.into()])?;
            let boxes = b.input(
                &names::boxes(l),
                DType::F32,
                vec![n.clone(), q.into(), 4.into()],
            )?;
            let mask = b.input(&names::mask(l), DType::F32, vec![n.clone(), q.into()])?;
            host_inputs.extend([names::classes(l), names::boxes(l), names::mask(l)]);
            targets.push(LayerTargets {
                classes,
                boxes,
                mask,
            });
        }
        let num_boxes = b.input(names::NUM_BOXES, DType::F32, vec![])?;
        host_inputs.push(names::NUM_BOXES.to_string());
        let net = self.init(&mut b)?;
        let mut mode = if c.train_batch_norm {
            NormMode::train()
        } else {
            NormMode::Inference
        };
        let outs = net.forward(&mut b, &images, &mut mode)?;
        let mut totals = Vec::new();
        let mut layer_losses = Vec::new();
        let mut pair_losses = Vec::new();
        let mut predictions = Vec::new();
        for (l, (o, t)) in outs.iter().zip(&targets).enumerate() {
            let (set, pair, total) = b.scoped(format!("loss.{l}"), |b| {
                let set = set_loss(
                    b,
                    &o.logits,
                    &o.boxes,
                    t,
                    &num_boxes,
                    c.num_classes(),
                    &c.loss,
                )?;
                let pair = pair_info_nce(
                    b,
                    &o.centre_embed,
                    &o.top_left_embed,
                    &t.mask,
                    &num_boxes,
                    self.pair_temperature,
                    self.pair_symmetric,
                )?;
                let w = b.const_f32(self.pair_weight);
                let weighted = b.mul(&pair, &w)?;
                let total = b.add(&set.total, &weighted)?;
                Ok::<_, BuildError>((set, pair, total))
            })?;
            totals.push(total);
            layer_losses.push((set.ce, set.bbox, set.giou));
            pair_losses.push(pair);
            predictions.push((o.logits.name().to_string(), o.boxes.name().to_string()));
        }
        let refs: Vec<&Value> = totals.iter().collect();
        let loss = b.sum_all(&refs)?;
        Ok((
            b,
            PairTraining {
                detr: DetrTraining {
                    loss,
                    layer_losses,
                    predictions,
                    host_inputs,
                    norm_state: mode.into_state(),
                    embedding_losses: Vec::new(),
                },
                pair_losses,
            },
        ))
    }
}

/// Pair DETR's train step, composed and split as DETR's ([`super::train::step_graphs`]): the
/// result runs on [`super::train::DetrTrainer`] with `config.detr`. Metrics: DETR's
/// `loss_ce.{l}`, `loss_bbox.{l}`, `loss_giou.{l}` and `loss_pair.{l}`.
#[cfg(feature = "train")]
pub fn step_graphs(
    config: &PairDetrConfig,
    batch: usize,
    train: &crate::train_step::TrainStepConfig,
    seed: u64,
) -> Result<super::train::DetrStepGraphs, DetrError> {
    use crate::train_step::{build_train_step, ForwardGraph};
    let (b, t) = config.training_forward(seed, Some(batch))?;
    let PairTraining {
        detr: t,
        pair_losses,
    } = t;
    let mut fwd = ForwardGraph::new(b, t.loss).norm_state(t.norm_state);
    for (l, ((ce, bbox, giou), pair)) in t.layer_losses.into_iter().zip(pair_losses).enumerate() {
        fwd = fwd
            .metric(&format!("loss_ce.{l}"), ce)
            .metric(&format!("loss_bbox.{l}"), bbox)
            .metric(&format!("loss_giou.{l}"), giou)
            .metric(&pair_names::loss_pair(l), pair);
    }
    let whole = build_train_step(fwd, train)?;
    super::train::DetrStepGraphs::split(whole, &t.host_inputs, t.predictions)
}

#[cfg(feature = "train")]
pub mod pretrain;
#[cfg(test)]
mod tests;
