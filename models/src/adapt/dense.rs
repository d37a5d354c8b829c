//! Unlabeled adaptation with a pretext method's dense objective on the backbone features
//! (`densa adapt --method pixpro|densecl`): two views of each device image, the student (the
//! trainable parameters) on one, a momentum teacher (their EMA) on the other, and the method's
//! dense loss between the student's feature cells and the teacher's.
//!
//! - **PixPro** (Xie et al. 2021): positive cell pairs are those whose centres, mapped back to
//!   the image, lie within `pos_ratio` (0.7) cell diagonals; the student's cells go through the
//!   pixel propagation module `y_i = sum_j max(cos(x_i, x_j), 0)^gamma * x_j / |x_j|` (gamma 2)
//!   and the loss is `-sum_ij P_ij cos(y_i, k_j) / sum_ij P_ij`.
//! - **DenseCL** (Wang et al. 2021): each student cell's positive is the teacher cell of the
//!   other view most similar to the teacher's own feature of that cell (argmax of
//!   `cos(k^a_i, k^b_j)`, computed by the host from two teacher runs); the loss is the dense
//!   InfoNCE `-mean_i log softmax_j(cos(x_i, k_j) / tau)[j*(i)]` (tau 0.2) with the other
//!   view's cells as negatives.
//!
//! Our choices, for adapting a deployed model rather than pretraining one: there are no
//! projection heads (the deployed model has none, and they would be thrown away); the features
//! are the backbone's last stage ([`backbone_feature`]); one direction per image and step (the
//! student's view is drawn at random, so both directions are trained over the steps) keeps one
//! image per run; DenseCL has no queue (a device holds tens of images), so its negatives are
//! the other view's cells.

use std::collections::HashSet;

use densa_exporter::onnx::ModelProto;
use densa_exporter::{BuildError, DType, Dim, GraphBuilder, Value};

use super::graph::{differentiate, merge, LossGraph};
use super::AdaptError;
use crate::detect::names;
use crate::pretext::ops;

/// The teacher's features of the other view, `[1, C, H*W]`.
pub const TEACHER_KEYS: &str = "teacher.keys";
/// Positive pairs, `[1, H*W, H*W]`: student cell (row) by teacher cell (column).
pub const POSITIVES: &str = "adapt.positives";

/// Which pretext objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DenseObjective {
    /// PixPro's pixel-propagation consistency; `gamma` sharpens the propagation weights.
    PixPro { gamma: f32, pos_ratio: f32 },
    /// DenseCL's dense InfoNCE at temperature `tau`.
    DenseCl { tau: f32 },
}

impl DenseObjective {
    /// The objective named `name` with its paper defaults (PixPro gamma 2, threshold 0.7;
    /// DenseCL tau 0.2), or `None` for a method without a dense adaptation objective.
    pub fn named(name: &str) -> Option<DenseObjective> {
        match name {
            "pixpro" => Some(DenseObjective::PixPro {
                gamma: 2.0,
                pos_ratio: 0.7,
            }),
            "densecl" => Some(DenseObjective::DenseCl { tau: 0.2 }),
            _ => None,
        }
    }

    /// The names [`Self::named`] knows.
    pub const NAMES: [&'static str; 2] = ["densecl", "pixpro"];
}

/// The backbone's last-stage feature map of a densa export: the output of the last node of
/// `layer4` (the ResNet's C5), which the FPN or the classifier's pooling consumes.
pub fn backbone_feature(model: &ModelProto, label: &str) -> Result<String, AdaptError> {
    let graph = model.graph.as_ref().ok_or_else(|| AdaptError::Structure {
        model: label.to_string(),
        problem: "has no graph".into(),
    })?;
    graph
        .node
        .iter()
        .rev()
        .find(|n| n.name.starts_with("layer4."))
        .and_then(|n| n.output.first().cloned())
        .ok_or_else(|| AdaptError::Structure {
            model: label.to_string(),
            problem: "no `layer4` node: not a densa ResNet backbone".into(),
        })
}

/// The parameters among `candidates` that the value `feature` depends on.
pub fn upstream_parameters(
    model: &ModelProto,
    feature: &str,
    candidates: &[String],
) -> Vec<String> {
    let Some(graph) = model.graph.as_ref() else {
        return Vec::new();
    };
    let mut needed: HashSet<&str> = [feature].into_iter().collect();
    for n in graph.node.iter().rev() {
        if n.output.iter().any(|o| needed.contains(o.as_str())) {
            needed.extend(n.input.iter().map(String::as_str));
        }
    }
    candidates
        .iter()
        .filter(|p| needed.contains(p.as_str()))
        .cloned()
        .collect()
}

/// The teacher's graph: the image and the `trainable` parameters in, `feature` out.
pub fn feature_graph(
    model: &ModelProto,
    label: &str,
    trainable: &[String],
    feature: &str,
) -> Result<ModelProto, AdaptError> {
    use densa_exporter::onnx::{type_proto, TypeProto, ValueInfoProto};
    let out = ValueInfoProto {
        name: feature.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DType::F32.onnx() as i32,
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    merge(model, label, trainable, None, vec![out], &HashSet::new())
}

/// The student's loss graph with gradients: inputs the image, the `trainable` parameters,
/// [`TEACHER_KEYS`] `[1, C, H*W]` and [`POSITIVES`] `[1, H*W, H*W]`; outputs `loss` and
/// `grad.<p>`. `shape` is the feature's `[C, H, W]`.
pub fn dense_consistency_graph(
    model: &ModelProto,
    label: &str,
    trainable: &[String],
    feature: &str,
    shape: [usize; 3],
    objective: DenseObjective,
) -> Result<ModelProto, AdaptError> {
    let mut b = GraphBuilder::new("densa-adapt-dense", 0);
    let [c, h, w] = shape;
    let x = b.input(
        feature,
        DType::F32,
        vec![Dim::Fixed(1), c.into(), h.into(), w.into()],
    )?;
    let s2 = h * w;
    let keys = b.input(
        TEACHER_KEYS,
        DType::F32,
        vec![Dim::Fixed(1), c.into(), s2.into()],
    )?;
    let pos = b.input(
        POSITIVES,
        DType::F32,
        vec![Dim::Fixed(1), s2.into(), s2.into()],
    )?;
    let loss = b.scoped("adapt.dense", |b| dense_loss(b, &x, &keys, &pos, objective))?;
    b.output(&loss, names::LOSS)?;
    let consumed: HashSet<&str> = [feature].into_iter().collect();
    let forward = merge(
        model,
        label,
        trainable,
        Some(&LossGraph { model: b.finish() }),
        Vec::new(),
        &consumed,
    )?;
    differentiate(&forward, trainable)
}

/// The objective's loss of student features `x` against teacher keys `k` with positives `p`.
///
/// # Shapes
/// `x [1, C, H, W]`, `k [1, C, S]`, `p [1, S, S]` (S = H*W) -> `[]`.
pub(crate) fn dense_loss(
    b: &mut GraphBuilder,
    x: &Value,
    k: &Value,
    p: &Value,
    objective: DenseObjective,
) -> Result<Value, BuildError> {
    let xf = ops::flatten_cells(b, x)?;
    let xn = ops::l2_normalize(b, &xf, 1)?;
    let kn = ops::l2_normalize(b, k, 1)?;
    match objective {
        DenseObjective::PixPro { gamma, .. } => {
            // sim[i, j] = cos(x_i, x_j); y[:, i] = sum_j relu(sim)^gamma x_j / |x_j|.
            let xt = ops::transpose(b, &xn, &[0, 2, 1])?;
            let sim = ops::matmul(b, &xt, &xn)?;
            let sim = b.relu(&sim);
            let attn = if gamma == 2.0 {
                b.mul(&sim, &sim)?
            } else {
                let eps = b.const_f32(1e-6);
                let sim = b.add(&sim, &eps)?;
                let g = b.const_f32(gamma);
                b.pow(&sim, &g)?
            };
            let attn_t = ops::transpose(b, &attn, &[0, 2, 1])?;
            let y = ops::matmul(b, &xn, &attn_t)?;
            let yn = ops::l2_normalize(b, &y, 1)?;
            let yt = ops::transpose(b, &yn, &[0, 2, 1])?;
            let cos = ops::matmul(b, &yt, &kn)?;
            let masked = b.mul(&cos, p)?;
            let sum = b.reduce_sum(&masked, &[], false)?;
            let count = b.reduce_sum(p, &[], false)?;
            let eps = b.const_f32(1e-6);
            let count = b.add(&count, &eps)?;
            let mean = b.div(&sum, &count)?;
            Ok(b.neg(&mean))
        }
        DenseObjective::DenseCl { tau } => {
            let xt = ops::transpose(b, &xn, &[0, 2, 1])?;
            let cos = ops::matmul(b, &xt, &kn)?;
            let t = b.const_f32(1.0 / tau);
            let logits = b.mul(&cos, &t)?;
            let shape = logits.shape().to_vec();
            let logp = b.node1(
                "LogSoftmax",
                Some("log_softmax"),
                &[&logits],
                vec![densa_exporter::builder::attr::int("axis", 2)],
                DType::F32,
                shape,
            );
            let picked = b.mul(&logp, p)?;
            let sum = b.reduce_sum(&picked, &[], false)?;
            let rows = b.reduce_sum(p, &[], false)?;
            let one = b.const_f32(1.0);
            let rows = b.max2(&rows, &one)?;
            let mean = b.div(&sum, &rows)?;
            Ok(b.neg(&mean))
        }
    }
}
