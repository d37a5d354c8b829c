//! The DETR-family detector (Carion et al. 2020, "End-to-End Object Detection with
//! Transformers"): backbone C5 -> 1x1 projection -> tokens + 2-D sine positional encoding ->
//! transformer encoder -> decoder over learned object queries -> a class head (classes + "no
//! object" under a softmax, or Deformable DETR's one sigmoid per class with the focal loss:
//! [`LossConfig::class`]) and a box head (3-layer MLP, sigmoid, normalised cxcywh) on every
//! decoder layer.
//! Training matches predictions to ground truth one-to-one on the host (Hungarian matching,
//! [`hungarian`], [`matcher`]) and applies the set criterion ([`loss`]) to every decoder
//! layer's output (auxiliary losses).
//!
//! The pieces are meant for the detector-pretraining methods too (DetReg, UP-DETR, Pair DETR):
//! the matcher and the losses take plain per-query tensors, the decoder takes an optional
//! additive self-attention mask ([`DetrConfig::self_attn_mask`], UP-DETR's query groups), and
//! an optional per-query embedding head ([`DetrConfig::embedding`]) learns the matched
//! target's vector (DetReg's region embeddings, UP-DETR's patch features). `pretext` is the
//! interface of those methods.
//!
//! Our choices, for small inputs and CPU budgets:
//! - Small defaults ([`DetrConfig::new`]): d_model 64, 4 heads, 2 encoder and 2 decoder
//!   layers, feed-forward 256, 30 queries (DETR: 256, 8, 6, 6, 2048, 100); all selectable.
//! - A square input of fixed size (the token count is fixed at build time), no padding mask.
//! - The transformer reads C5 (DETR) or, for small inputs, C4 ([`DetrConfig::feature_stride`]).
//! - Backbone parameter names as torchvision's at the root (as the dense detector), so a
//!   pretrained backbone checkpoint initialises it; the transformer is `transformer.*`.
//! - Batch norm as the dense detector: batch statistics while training by default
//!   ([`DetrConfig::train_batch_norm`]), folded into the convolutions on export.
//! - Inference keeps the last decoder layer: score and label are the best class probability
//!   (softmax without "no object", or the sigmoids), the top-k queries by score; no NMS (DETR
//!   needs none).

#[cfg(feature = "train")]
pub mod detreg;
pub mod hungarian;
pub mod loss;
pub mod matcher;
pub mod pair;
#[cfg(feature = "train")]
pub mod pretext;
#[cfg(feature = "train")]
pub mod train;
pub mod transformer;
#[cfg(feature = "train")]
pub mod updetr;

use densa_exporter::builder::attr;
use densa_exporter::onnx::ModelProto;
use densa_exporter::passes::fold_batch_norm;
use densa_exporter::train::{Fragment, TrainError};
use densa_exporter::validate::validate;
use densa_exporter::weights::StateDict;
use densa_exporter::{BuildError, DType, Dim, GraphBuilder, Init, ParamKind, Tensor, Value};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

use crate::backbone::resnet::ResNet;
use crate::backbone::Arch;
use crate::export::ExportError;
use crate::nn::{Conv2d, Conv2dConfig, NormMode};
pub use hungarian::{linear_sum_assignment, Assignment, AssignmentError};
pub use loss::{ClassLoss, EmbeddingConfig, EmbeddingLoss, LayerTargets, LossConfig, SetLosses};
pub use matcher::{query_embeddings, ImageTargets, MatchError, MatcherConfig, QueryTargets};
use transformer::{DecoderLayer, EncoderLayer, Linear, Mlp};

/// Why a DETR detector could not be built or trained.
#[derive(Debug, thiserror::Error)]
pub enum DetrError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Match(#[from] MatchError),
    #[error("DETR config: {field} {problem}")]
    Config {
        field: &'static str,
        problem: String,
    },
    #[error("state: parameter `{name}` {problem}")]
    State { name: String, problem: String },
    /// Boxed: the train-step error is large and rare.
    #[cfg(feature = "train")]
    #[error(transparent)]
    TrainStep(Box<crate::train_step::TrainStepError>),
    #[error("DETR step: {0}")]
    Step(String),
}

#[cfg(feature = "train")]
impl From<crate::train_step::TrainStepError> for DetrError {
    fn from(e: crate::train_step::TrainStepError) -> Self {
        DetrError::TrainStep(Box::new(e))
    }
}

impl From<densa_exporter::passes::PassError> for DetrError {
    fn from(e: densa_exporter::passes::PassError) -> Self {
        DetrError::Export(e.into())
    }
}

impl From<densa_exporter::validate::ValidationError> for DetrError {
    fn from(e: densa_exporter::validate::ValidationError) -> Self {
        DetrError::Export(e.into())
    }
}

/// The detector's shape and training settings; serialised next to checkpoints
/// (`detector.json`) like the dense detector's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetrConfig {
    /// Backbone architecture (name as `Arch` parses it).
    pub arch: String,
    /// Class names; label `k` is `classes[k]`, label `classes.len()` is "no object".
    pub classes: Vec<String>,
    /// Square input size in pixels (a multiple of 32 keeps every token). Default 128.
    pub image_size: u32,
    /// Transformer width. Default 64 (DETR: 256). A multiple of 4 and of `heads`.
    pub d_model: usize,
    /// Attention heads. Default 4 (DETR: 8).
    pub heads: usize,
    /// Encoder layers. Default 2 (DETR: 6).
    pub encoder_layers: usize,
    /// Decoder layers, each with its own loss. Default 2 (DETR: 6).
    pub decoder_layers: usize,
    /// Feed-forward width. Default 256 (DETR: 2048).
    pub ffn_dim: usize,
    /// Object queries. Default 30 (DETR: 100).
    pub num_queries: usize,
    /// Temperature of the sine positional encoding. Default 10000.
    pub temperature: f32,
    /// Matching costs. Default [`MatcherConfig::default`].
    #[serde(default)]
    pub matcher: MatcherConfig,
    /// Loss weights. Default [`LossConfig::default`].
    #[serde(default)]
    pub loss: LossConfig,
    /// Normalisation of `pixel / 255`: mean and std (ImageNet's).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Train the backbone's batch norms with batch statistics. Default true.
    #[serde(default = "default_true")]
    pub train_batch_norm: bool,
    /// Stride of the backbone features the transformer reads: 32 (C5, DETR) or 16 (C4, more
    /// tokens for small inputs; DETR-DC5 reaches stride 16 by dilation instead). Default 32.
    #[serde(default = "default_stride")]
    pub feature_stride: u32,
    /// Give the decoder's self-attention an additive mask input `decoder.self_attn_mask`
    /// `[Q, Q]` (UP-DETR's query groups). Default false.
    #[serde(default)]
    pub self_attn_mask: bool,
    /// A per-query embedding head on every decoder layer (`feature_embed.*`) with its loss
    /// against the host input `targets.{l}.embeddings [N, Q, E]`. Default none.
    #[serde(default)]
    pub embedding: Option<EmbeddingConfig>,
    /// UP-DETR's query patches: `P > 0` adds the batch inputs `queries.patch_features
    /// [N, P, C]` (C: the backbone's C5 channels) and `queries.patch_assign [N, Q, P]`, and a
    /// trainable linear `patch2query` C -> d_model; query `q` of image `n` gets
    /// `sum_p assign[n, q, p] * patch2query(features[n, p])` added to its query embedding
    /// (training graph only; inference adds nothing). Default 0 (off).
    #[serde(default)]
    pub query_patches: usize,
}

fn default_true() -> bool {
    true
}

fn default_stride() -> u32 {
    32
}

/// The names of the graphs' inputs and outputs.
pub mod names {
    pub const IMAGES: &str = "images";
    /// Float32 scalar: target boxes in the batch, at least 1.
    pub const NUM_BOXES: &str = "targets.num_boxes";
    pub const SELF_ATTN_MASK: &str = "decoder.self_attn_mask";
    /// `[N, P, C]` features of UP-DETR's query patches ([`super::DetrConfig::query_patches`]).
    pub const PATCH_FEATURES: &str = "queries.patch_features";
    /// `[N, Q, P]` which patch's projection each query receives (0/1, rows may be all 0).
    pub const PATCH_ASSIGN: &str = "queries.patch_assign";
    pub const LOSS: &str = "loss";
    /// int64 `[N, Q]` matched classes of decoder layer `l`.
    pub fn classes(l: usize) -> String {
        format!("targets.{l}.classes")
    }
    /// `[N, Q, 4]` matched boxes of decoder layer `l`.
    pub fn boxes(l: usize) -> String {
        format!("targets.{l}.boxes")
    }
    /// `[N, Q]` matched-query mask of decoder layer `l`.
    pub fn mask(l: usize) -> String {
        format!("targets.{l}.mask")
    }
    /// `[N, Q, K]` logits of decoder layer `l` (`K`: [`super::DetrConfig::class_outputs`]).
    pub fn pred_logits(l: usize) -> String {
        format!("pred.{l}.logits")
    }
    /// `[N, Q, 4]` boxes (normalised cxcywh) of decoder layer `l`.
    pub fn pred_boxes(l: usize) -> String {
        format!("pred.{l}.boxes")
    }
    /// `[N, Q, E]` matched targets' embeddings of decoder layer `l` (zeros where unmatched).
    pub fn embeddings(l: usize) -> String {
        format!("targets.{l}.embeddings")
    }
    /// `[N, Q, E]` predicted embeddings of decoder layer `l`.
    pub fn pred_embeddings(l: usize) -> String {
        format!("pred.{l}.embeddings")
    }
}

impl DetrConfig {
    /// The defaults above for `arch` and `classes`.
    pub fn new(arch: Arch, classes: Vec<String>) -> DetrConfig {
        DetrConfig {
            arch: arch.name().to_string(),
            classes,
            image_size: 128,
            d_model: 64,
            heads: 4,
            encoder_layers: 2,
            decoder_layers: 2,
            ffn_dim: 256,
            num_queries: 30,
            temperature: 10000.0,
            matcher: MatcherConfig::default(),
            loss: LossConfig::default(),
            mean: crate::export::IMAGENET_MEAN,
            std: crate::export::IMAGENET_STD,
            train_batch_norm: true,
            feature_stride: 32,
            self_attn_mask: false,
            embedding: None,
            query_patches: 0,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Width of the class head: `classes + 1` (softmax, the last is "no object") or
    /// `classes` (sigmoid focal), as [`LossConfig::class`] says.
    pub fn class_outputs(&self) -> usize {
        self.loss.class.outputs(self.num_classes())
    }

    /// The backbone architecture.
    pub fn backbone(&self) -> Result<Arch, DetrError> {
        <Arch as std::str::FromStr>::from_str(&self.arch).map_err(|e| DetrError::Config {
            field: "arch",
            problem: format!("{:?}: {e}", self.arch),
        })
    }

    /// Side of the feature map (C5, or C4 with `feature_stride` 16; torchvision's stride-2
    /// steps: `s -> (s - 1) / 2 + 1`).
    pub fn feature_size(&self) -> usize {
        let steps = if self.feature_stride == 16 { 4 } else { 5 };
        (0..steps).fold(self.image_size as usize, |s, _| (s - 1) / 2 + 1)
    }

    /// Encoder tokens: the feature map's cells.
    pub fn tokens(&self) -> usize {
        self.feature_size() * self.feature_size()
    }

    fn check(&self) -> Result<(), DetrError> {
        let bad = |field, problem: String| Err(DetrError::Config { field, problem });
        if self.classes.is_empty() {
            return bad("classes", "is empty".into());
        }
        if self.image_size < 32 {
            return bad("image_size", format!("{} is below 32", self.image_size));
        }
        if self.d_model == 0 || !self.d_model.is_multiple_of(4) {
            return bad(
                "d_model",
                format!("{} is not a multiple of 4", self.d_model),
            );
        }
        if self.heads == 0 || !self.d_model.is_multiple_of(self.heads) {
            return bad(
                "heads",
                format!("{} does not divide d_model {}", self.heads, self.d_model),
            );
        }
        if self.feature_stride != 16 && self.feature_stride != 32 {
            return bad(
                "feature_stride",
                format!("{} is neither 16 (C4) nor 32 (C5)", self.feature_stride),
            );
        }
        if self.decoder_layers == 0 || self.num_queries == 0 || self.ffn_dim == 0 {
            return bad(
                "decoder_layers/num_queries/ffn_dim",
                "must be positive".into(),
            );
        }
        if self.query_patches > self.num_queries {
            return bad(
                "query_patches",
                format!(
                    "{} exceeds num_queries {}",
                    self.query_patches, self.num_queries
                ),
            );
        }
        if let Some(e) = &self.embedding {
            if e.dim == 0 || e.layers == 0 {
                return bad(
                    "embedding",
                    format!("dim {} and layers {} must be positive", e.dim, e.layers),
                );
            }
            if !e.weight.is_finite() || e.weight < 0.0 {
                return bad("embedding", format!("weight {} must be >= 0", e.weight));
            }
        }
        self.backbone().map(|_| ())
    }

    /// Creates every parameter: the backbone (torchvision names), `input_proj`,
    /// `transformer.encoder.layers.{i}`, `transformer.decoder.layers.{i}`,
    /// `transformer.decoder.norm`, `query_embed.weight`, `class_embed`, `bbox_embed`, and with
    /// [`embedding`](Self::embedding) `feature_embed`.
    pub fn init(&self, b: &mut GraphBuilder) -> Result<Detr, DetrError> {
        self.check()?;
        let backbone_config = self.backbone()?.config();
        let backbone = backbone_config.init(b)?;
        let level = if self.feature_stride == 16 { 2 } else { 3 };
        let channels = backbone_config.out_channels()[level];
        let d = self.d_model;
        let input_proj = Conv2dConfig::new(channels, d, 1).init(b, "input_proj")?;
        let (encoder, decoder, decoder_norm) = b.scoped("transformer", |b| {
            let encoder = (0..self.encoder_layers)
                .map(|i| {
                    EncoderLayer::new(
                        b,
                        &format!("encoder.layers.{i}"),
                        d,
                        self.heads,
                        self.ffn_dim,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let decoder = (0..self.decoder_layers)
                .map(|i| {
                    DecoderLayer::new(
                        b,
                        &format!("decoder.layers.{i}"),
                        d,
                        self.heads,
                        self.ffn_dim,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let norm =
                densa_exporter::train::norm::LayerNormConfig::new(&[d]).init(b, "decoder.norm")?;
            Ok::<_, TrainError>((encoder, decoder, norm))
        })?;
        let query_embed = b.scoped("query_embed", |b| {
            b.param(
                "weight",
                &[self.num_queries, d],
                Init::Normal(1.0),
                ParamKind::Param,
            )
        })?;
        let class_embed = match self.loss.class {
            ClassLoss::Softmax => Linear::new(b, "class_embed", d, self.class_outputs())?,
            focal => Linear::with_bias_init(
                b,
                "class_embed",
                d,
                self.class_outputs(),
                Init::Constant(focal.initial_bias()),
            )?,
        };
        let bbox_embed = Mlp::new(b, "bbox_embed", d, d, 4, 3)?;
        let feature_embed = self
            .embedding
            .map(|e| Mlp::new(b, "feature_embed", d, d, e.dim, e.layers))
            .transpose()?;
        let patch2query = if self.query_patches > 0 {
            let c5 = backbone_config.out_channels()[3];
            Some(Linear::new(b, "patch2query", c5, d)?)
        } else {
            None
        };
        let h = self.feature_size();
        let pos = transformer::sine_position_encoding(h, h, d, self.temperature);
        let pos = b.constant(pos);
        Ok(Detr {
            config: self.clone(),
            backbone,
            input_proj,
            encoder,
            decoder,
            decoder_norm,
            query_embed,
            class_embed,
            bbox_embed,
            feature_embed,
            patch2query,
            pos,
        })
    }

    /// The initial state of a fresh detector (parameters and buffers by name) with `seed`.
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

/// A DETR detector whose parameters exist in the graph.
pub struct Detr {
    pub config: DetrConfig,
    backbone: ResNet,
    input_proj: Conv2d,
    encoder: Vec<EncoderLayer>,
    decoder: Vec<DecoderLayer>,
    decoder_norm: densa_exporter::train::norm::LayerNorm,
    query_embed: Value,
    class_embed: Linear,
    bbox_embed: Mlp,
    feature_embed: Option<Mlp>,
    /// UP-DETR's patch projection ([`DetrConfig::query_patches`]).
    patch2query: Option<Linear>,
    /// `[T, D]` positional encoding (a constant).
    pos: Value,
}

/// One decoder layer's predictions.
#[derive(Clone, Debug)]
pub struct LayerOutputs {
    /// `[N, Q, K]`, `K` = [`DetrConfig::class_outputs`].
    pub logits: Value,
    /// `[N, Q, 4]` normalised cxcywh in `(0, 1)`.
    pub boxes: Value,
    /// `[N, Q, E]` on the layers with [`DetrConfig::embedding`]'s head.
    pub embeddings: Option<Value>,
}

impl Detr {
    /// Every decoder layer's predictions (the last is the detector's output).
    ///
    /// # Shapes
    /// `images [N, 3, S, S]`, `self_attn_mask [Q, Q]` -> per decoder layer
    /// `logits [N, Q, K]` ([`DetrConfig::class_outputs`]), `boxes [N, Q, 4]`,
    /// `embeddings [N, Q, E]`.
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        images: &Value,
        mode: &mut NormMode,
        self_attn_mask: Option<&Value>,
    ) -> Result<Vec<LayerOutputs>, DetrError> {
        self.forward_with(b, images, mode, self_attn_mask, None)
    }

    /// UP-DETR's per-query addition: `assign @ patch2query(features)`.
    ///
    /// # Shapes
    /// `features [N, P, C]`, `assign [N, Q, P]` -> `[N, Q, D]`.
    pub fn patch_queries(
        &self,
        b: &mut GraphBuilder,
        features: &Value,
        assign: &Value,
    ) -> Result<Value, DetrError> {
        let proj = self.patch2query.as_ref().ok_or_else(|| DetrError::Config {
            field: "query_patches",
            problem: "is 0: the detector has no patch projection".into(),
        })?;
        let p = proj.forward(b, features)?;
        Ok(transformer::matmul(b, assign, &p)?)
    }

    /// [`forward`](Self::forward) with `query_add` (e.g. [`patch_queries`](Self::patch_queries))
    /// added to the query embedding.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward); `query_add [N, Q, D]`.
    pub fn forward_with(
        &self,
        b: &mut GraphBuilder,
        images: &Value,
        mode: &mut NormMode,
        self_attn_mask: Option<&Value>,
        query_add: Option<&Value>,
    ) -> Result<Vec<LayerOutputs>, DetrError> {
        let stages = self.backbone.forward_mode(b, images, mode)?;
        let d = self.config.d_model as i64;
        let t = self.config.tokens() as i64;
        let q = self.config.num_queries;
        let features = if self.config.feature_stride == 16 {
            &stages.c4
        } else {
            &stages.c5
        };
        let proj = self.input_proj.forward(b, features)?;
        let flat = b.reshape(&proj, &[0, d, t])?;
        let tokens = transformer::transpose(b, &flat, &[0, 2, 1]);
        let mut memory = tokens;
        for layer in &self.encoder {
            memory = layer.forward(b, &memory, Some(&self.pos))?;
        }
        let mut tgt = transformer::zeros_batch(b, &memory, q, self.config.d_model)?;
        let query_pos = match query_add {
            Some(add) => b.add(&self.query_embed, add)?,
            None => self.query_embed.clone(),
        };
        let mut outs = Vec::new();
        for (l, layer) in self.decoder.iter().enumerate() {
            tgt = layer.forward(
                b,
                &tgt,
                &memory,
                &query_pos,
                Some(&self.pos),
                self_attn_mask,
            )?;
            let h = self.decoder_norm.forward(b, &tgt)?;
            let logits = self.class_embed.forward(b, &h)?;
            let raw = self.bbox_embed.forward(b, &h)?;
            let boxes = b.unary("Sigmoid", &raw);
            let logits = b.node1(
                "Identity",
                Some(&names::pred_logits(l)),
                &[&logits],
                vec![],
                DType::F32,
                logits.shape().to_vec(),
            );
            let boxes = b.node1(
                "Identity",
                Some(&names::pred_boxes(l)),
                &[&boxes],
                vec![],
                DType::F32,
                boxes.shape().to_vec(),
            );
            let layers = self.config.decoder_layers;
            let embeddings = match &self.feature_embed {
                Some(head) if self.config.embedding.is_some_and(|e| e.on_layer(l, layers)) => {
                    let e = head.forward(b, &h)?;
                    Some(b.node1(
                        "Identity",
                        Some(&names::pred_embeddings(l)),
                        &[&e],
                        vec![],
                        DType::F32,
                        e.shape().to_vec(),
                    ))
                }
                _ => None,
            };
            outs.push(LayerOutputs {
                logits,
                boxes,
                embeddings,
            });
        }
        Ok(outs)
    }
}

/// The training forward graph's values: what a train-step composer and the step driver need.
pub struct DetrTraining {
    /// Sum over decoder layers of each layer's set criterion.
    pub loss: Value,
    /// Per layer: `(ce, bbox, giou)` scalars.
    pub layer_losses: Vec<(Value, Value, Value)>,
    /// `(layer, embedding loss (unweighted))` of each layer with the embedding head
    /// ([`DetrConfig::embedding`]); empty without it.
    pub embedding_losses: Vec<(usize, Value)>,
    /// Per layer predictions (host outputs of the split step), value names.
    pub predictions: Vec<(String, String)>,
    /// Host inputs: the targets of every layer and `targets.num_boxes`.
    pub host_inputs: Vec<String>,
    /// Running-statistic updates of the backbone.
    pub norm_state: Fragment,
}

impl DetrConfig {
    /// The forward graph with the set criterion on every decoder layer. Inputs: `images
    /// [N, 3, S, S]` (`batch` fixes N, else symbolic), per layer `l` `targets.{l}.classes
    /// [N, Q]` int64, `targets.{l}.boxes [N, Q, 4]`, `targets.{l}.mask [N, Q]`, and
    /// `targets.num_boxes []`; with [`self_attn_mask`](Self::self_attn_mask) also
    /// `decoder.self_attn_mask [Q, Q]`; with [`embedding`](Self::embedding) also
    /// `targets.{l}.embeddings [N, Q, E]`, whose loss (times its weight) joins each layer's.
    /// `decoder.self_attn_mask [Q, Q]`; with [`query_patches`](Self::query_patches) also
    /// `queries.patch_features [N, P, C]` and `queries.patch_assign [N, Q, P]`.
    pub fn training_forward(
        &self,
        seed: u64,
        batch: Option<usize>,
    ) -> Result<(GraphBuilder, DetrTraining), DetrError> {
        let mut b = GraphBuilder::new("densa-detr-train", seed);
        let s = self.image_size as i64;
        let n = batch.map(Dim::from).unwrap_or_else(|| Dim::from("N"));
        let q = self.num_queries as i64;
        let images = b.input(
            names::IMAGES,
            DType::F32,
            vec![n.clone(), 3.into(), s.into(), s.into()],
        )?;
        let mut host_inputs = Vec::new();
        let mut targets = Vec::new();
        let mut target_embeddings = Vec::new();
        for l in 0..self.decoder_layers {
            let classes = b.input(&names::classes(l), DType::I64, vec![n.clone(), q.into()])?;
            let boxes = b.input(
                &names::boxes(l),
                DType::F32,
                vec![n.clone(), q.into(), 4.into()],
            )?;
            let mask = b.input(&names::mask(l), DType::F32, vec![n.clone(), q.into()])?;
            host_inputs.extend([names::classes(l), names::boxes(l), names::mask(l)]);
            match &self.embedding {
                Some(e) if e.on_layer(l, self.decoder_layers) => {
                    target_embeddings.push(Some(b.input(
                        &names::embeddings(l),
                        DType::F32,
                        vec![n.clone(), q.into(), e.dim.into()],
                    )?));
                    host_inputs.push(names::embeddings(l));
                }
                _ => target_embeddings.push(None),
            }
            targets.push(LayerTargets {
                classes,
                boxes,
                mask,
            });
        }
        let num_boxes = b.input(names::NUM_BOXES, DType::F32, vec![])?;
        host_inputs.push(names::NUM_BOXES.to_string());
        let mask = if self.self_attn_mask {
            Some(b.input(names::SELF_ATTN_MASK, DType::F32, vec![q.into(), q.into()])?)
        } else {
            None
        };
        let patches = if self.query_patches > 0 {
            let (p, c5) = (
                self.query_patches as i64,
                self.backbone()?.config().out_channels()[3],
            );
            let features = b.input(
                names::PATCH_FEATURES,
                DType::F32,
                vec![n.clone(), p.into(), (c5 as i64).into()],
            )?;
            let assign = b.input(
                names::PATCH_ASSIGN,
                DType::F32,
                vec![n.clone(), q.into(), p.into()],
            )?;
            Some((features, assign))
        } else {
            None
        };
        let net = self.init(&mut b)?;
        let mut mode = if self.train_batch_norm {
            NormMode::train()
        } else {
            NormMode::Frozen
        };
        let query_add = match &patches {
            Some((features, assign)) => Some(net.patch_queries(&mut b, features, assign)?),
            None => None,
        };
        let outs = net.forward_with(
            &mut b,
            &images,
            &mut mode,
            mask.as_ref(),
            query_add.as_ref(),
        )?;
        let mut totals = Vec::new();
        let mut layer_losses = Vec::new();
        let mut embedding_losses = Vec::new();
        let mut predictions = Vec::new();
        for (l, (o, t)) in outs.iter().zip(&targets).enumerate() {
            let losses = b.scoped(format!("loss.{l}"), |b| {
                loss::set_loss(
                    b,
                    &o.logits,
                    &o.boxes,
                    t,
                    &num_boxes,
                    self.num_classes(),
                    &self.loss,
                )
            })?;
            let mut total = losses.total;
            if let (Some(cfg), Some(pred), Some(target)) = (
                &self.embedding,
                o.embeddings.as_ref(),
                target_embeddings[l].as_ref(),
            ) {
                let e = b.scoped(format!("loss.{l}.embedding"), |b| {
                    let e = loss::embedding_loss(b, pred, target, &t.mask, &num_boxes, cfg.loss)?;
                    let w = b.const_f32(cfg.weight);
                    let weighted = b.mul(&e, &w)?;
                    total = b.add(&total, &weighted)?;
                    Ok::<_, BuildError>(e)
                })?;
                embedding_losses.push((l, e));
            }
            totals.push(total);
            layer_losses.push((losses.ce, losses.bbox, losses.giou));
            predictions.push((o.logits.name().to_string(), o.boxes.name().to_string()));
        }
        let refs: Vec<&Value> = totals.iter().collect();
        let loss = b.sum_all(&refs)?;
        Ok((
            b,
            DetrTraining {
                loss,
                layer_losses,
                embedding_losses,
                predictions,
                host_inputs,
                norm_state: mode.into_state(),
            },
        ))
    }

    /// The inference graph: input `images [N, 3, S, S]` (normalised as `mean`/`std` say),
    /// outputs `boxes [N, K, 4]` (xyxy, input pixels), `scores [N, K]`, `labels [N, K]`
    /// (int64) for the `K = min(top_k, Q)` best queries of the last decoder layer, by their
    /// best class probability. Batch norm folded; `state` sets the weights (names as in
    /// training); `metadata` is added to the model's `densa.*` entries.
    pub fn inference_graph(
        &self,
        state: Option<&StateDict>,
        top_k: usize,
        metadata: &[(&str, &str)],
    ) -> Result<ModelProto, DetrError> {
        let mut b = GraphBuilder::new("densa-detr", 0);
        let s = self.image_size as i64;
        let images = b.input(
            names::IMAGES,
            DType::F32,
            vec![Dim::from("N"), 3.into(), s.into(), s.into()],
        )?;
        let net = self.init(&mut b)?;
        if let Some(state) = state {
            crate::export::set_state(&mut b, state).map_err(|e| match e {
                crate::export::StateError::Tensor { name, problem } => {
                    DetrError::State { name, problem }
                }
                crate::export::StateError::Build(e) => DetrError::Build(e),
            })?;
        }
        let mask = if self.self_attn_mask {
            let q = self.num_queries;
            Some(b.constant(Tensor::F32(ArrayD::zeros(vec![q, q]))))
        } else {
            None
        };
        let outs = net.forward(&mut b, &images, &mut NormMode::Inference, mask.as_ref())?;
        let last = outs.last().expect("at least one decoder layer");
        let c = self.num_classes() as i64;
        let q = self.num_queries as i64;
        let k = top_k.clamp(1, self.num_queries) as i64;
        let [boxes, scores, labels] = b.scoped("decode", |b| -> Result<_, BuildError> {
            let prob = match self.loss.class {
                // Softmax over the classes and "no object", then the classes only.
                ClassLoss::Softmax => {
                    let prob = b.node1(
                        "Softmax",
                        None,
                        &[&last.logits],
                        vec![attr::int("axis", -1)],
                        DType::F32,
                        last.logits.shape().to_vec(),
                    );
                    let starts = b.const_i64(&[0]);
                    let ends = b.const_i64(&[c]);
                    let axes = b.const_i64(&[2]);
                    b.node1(
                        "Slice",
                        None,
                        &[&prob, &starts, &ends, &axes],
                        vec![],
                        DType::F32,
                        vec![Dim::from("N"), q.into(), c.into()],
                    )
                }
                ClassLoss::SigmoidFocal { .. } => b.unary("Sigmoid", &last.logits),
            };
            let best = b.reduce(
                densa_exporter::builder::math::Reduction::Max,
                &prob,
                &[-1],
                false,
            )?;
            let label = b.node1(
                "ArgMax",
                None,
                &[&prob],
                vec![attr::int("axis", -1), attr::int("keepdims", 0)],
                DType::I64,
                vec![Dim::from("N"), q.into()],
            );
            let kk = b.const_i64(&[k]);
            let top = b.node(
                "TopK",
                None,
                &[Some(&best), Some(&kk)],
                vec![attr::int("axis", 1)],
                vec![
                    (DType::F32, vec![Dim::from("N"), k.into()]),
                    (DType::I64, vec![Dim::from("N"), k.into()]),
                ],
            );
            let (scores, idx) = (top[0].clone(), top[1].clone());
            let labels = b.node1(
                "GatherElements",
                None,
                &[&label, &idx],
                vec![attr::int("axis", 1)],
                DType::I64,
                vec![Dim::from("N"), k.into()],
            );
            let [x1, y1, x2, y2] = loss::cxcywh_to_xyxy(b, &last.boxes)?;
            let xyxy = b.concat(&[&x1, &y1, &x2, &y2], 2)?;
            let side = b.const_f32(s as f32);
            let xyxy = b.mul(&xyxy, &side)?;
            let zero = b.const_f32(0.0);
            let xyxy = b.max2(&xyxy, &zero)?;
            let xyxy = b.min2(&xyxy, &side)?;
            let idx3 = b.reshape(&idx, &[0, k, 1])?;
            let four = b.const_i64(&[1, 1, 4]);
            let idx4 = b.node1(
                "Expand",
                None,
                &[&idx3, &four],
                vec![],
                DType::I64,
                vec![Dim::from("N"), k.into(), 4.into()],
            );
            let boxes = b.node1(
                "GatherElements",
                None,
                &[&xyxy, &idx4],
                vec![attr::int("axis", 1)],
                DType::F32,
                vec![Dim::from("N"), k.into(), 4.into()],
            );
            Ok([boxes, scores, labels])
        })?;
        b.output(&boxes, "boxes")?;
        b.output(&scores, "scores")?;
        b.output(&labels, "labels")?;
        b.metadata("densa.task", "detect");
        b.metadata("densa.arch", &format!("detr-{}", self.arch));
        b.metadata("densa.classes", &self.classes.join(","));
        for (key, value) in metadata {
            b.metadata(key, value);
        }
        let model = fold_batch_norm(&b.finish())?;
        validate(&model)?;
        Ok(model)
    }
}

#[cfg(test)]
mod tests;
