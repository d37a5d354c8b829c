//! Unlabeled adaptation: prediction consistency between a student and a momentum teacher
//! (Mean Teacher, Tarvainen & Valpola 2017; applied to dense detectors as in Unbiased Teacher,
//! Liu et al. 2021, without pseudo-box thresholding).
//!
//! The teacher (an EMA of the student's trainable parameters, frozen ones shared) sees a weak
//! view of each device image (the serving letterbox); the student sees a strong photometric
//! view of the same geometry (so locations correspond one to one). The loss, per image:
//! - classification: `sum BCE(cls_s, p_t) / max(1, sum w)` with the teacher's class
//!   probabilities `p_t` as soft targets and `w = max_c p_t` the teacher's confidence per
//!   location;
//! - centerness: `sum w * BCE(ctr_s, q_t) / max(1, sum w)` with the teacher's probability `q_t`;
//! - boxes: `sum w * |box_s - box_t|_1 / max(1, sum w)` on the log-distances.
//!
//! Our choices: soft targets with confidence weighting instead of thresholded pseudo-boxes
//! (no threshold to tune on a device), photometric-only strong views, L1 on log-distances.

use densa_exporter::builder::math::Reduction;
use densa_exporter::onnx::ModelProto;
use densa_exporter::{BuildError, DType, Dim, GraphBuilder, Value};

use super::graph::{differentiate, output_losses, LossGraph};
use super::{AdaptError, DeployedDetector};
use crate::detect::{bce_with_logits, RawOutputs};

/// Input names of the teacher's predictions.
pub const TEACHER_CLS: &str = "teacher.cls_prob";
pub const TEACHER_CTR: &str = "teacher.ctr_prob";
pub const TEACHER_BOX: &str = "teacher.box_log";

/// The momentum teacher's settings.
#[derive(Clone, Debug)]
pub struct ConsistencyConfig {
    /// EMA momentum of the teacher (`t <- m t + (1 - m) s` after each step). Default 0.99.
    pub momentum: f32,
    /// Weight of the box term. Default 1.
    pub box_weight: f32,
}

impl Default for ConsistencyConfig {
    fn default() -> Self {
        ConsistencyConfig {
            momentum: 0.99,
            box_weight: 1.0,
        }
    }
}

impl DeployedDetector {
    /// The consistency loss graph with gradients: inputs the image, the `trainable`
    /// parameters and the teacher's predictions ([`TEACHER_CLS`] `[N, L, C]`, [`TEACHER_CTR`]
    /// `[N, L]` probabilities, [`TEACHER_BOX`] `[N, L, 4]` log-distances); outputs `loss` and
    /// `grad.<p>`.
    pub fn consistency_graph(
        &self,
        trainable: &[String],
        config: &ConsistencyConfig,
    ) -> Result<ModelProto, AdaptError> {
        let forward = self.consistency_forward(trainable, config)?;
        differentiate(&forward, trainable)
    }

    /// The forward part of [`Self::consistency_graph`]: outputs `loss`, `loss_cls`,
    /// `loss_box`, `loss_ctr`.
    pub fn consistency_forward(
        &self,
        trainable: &[String],
        config: &ConsistencyConfig,
    ) -> Result<ModelProto, AdaptError> {
        let mut b = GraphBuilder::new("densa-adapt-consistency", 0);
        let raw = self.raw_inputs(&mut b)?;
        let n = Dim::from("N");
        let l = Dim::Fixed(self.config.assigner().locations() as i64);
        let c = Dim::Fixed(self.config.num_classes() as i64);
        let t_cls = b.input(
            TEACHER_CLS,
            DType::F32,
            vec![n.clone(), l.clone(), c.clone()],
        )?;
        let t_ctr = b.input(TEACHER_CTR, DType::F32, vec![n.clone(), l.clone()])?;
        let t_box = b.input(TEACHER_BOX, DType::F32, vec![n, l, Dim::Fixed(4)])?;
        let box_weight = config.box_weight;
        let losses = b.scoped("adapt.consistency", |b| {
            consistency_loss(b, &raw, &t_cls, &t_ctr, &t_box, box_weight)
        })?;
        output_losses(&mut b, &losses)?;
        self.merged(trainable, Some(&LossGraph { model: b.finish() }), false)
    }
}

/// # Shapes
/// `raw` as [`RawOutputs`], `t_cls [N, L, C]`, `t_ctr [N, L]`, `t_box [N, L, 4]` ->
/// `[total, cls, box, ctr]` scalars.
fn consistency_loss(
    b: &mut GraphBuilder,
    raw: &RawOutputs,
    t_cls: &Value,
    t_ctr: &Value,
    t_box: &Value,
    box_weight: f32,
) -> Result<[Value; 4], BuildError> {
    let one = b.const_f32(1.0);
    let w = b.reduce(Reduction::Max, t_cls, &[2], false)?;
    let w_sum = b.reduce_sum(&w, &[], false)?;
    let norm = b.max2(&w_sum, &one)?;
    let ce = bce_with_logits(b, &raw.cls, t_cls)?;
    let ce_sum = b.reduce_sum(&ce, &[], false)?;
    let loss_cls = b.div(&ce_sum, &norm)?;
    let ctr_ce = bce_with_logits(b, &raw.ctr, t_ctr)?;
    let ctr_w = b.mul(&ctr_ce, &w)?;
    let ctr_sum = b.reduce_sum(&ctr_w, &[], false)?;
    let loss_ctr = b.div(&ctr_sum, &norm)?;
    let diff = b.sub(&raw.box_log, t_box)?;
    let l1 = b.abs(&diff);
    let l1 = b.reduce_sum(&l1, &[2], false)?;
    let l1 = b.mul(&l1, &w)?;
    let box_sum = b.reduce_sum(&l1, &[], false)?;
    let loss_box = b.div(&box_sum, &norm)?;
    let bw = b.const_f32(box_weight);
    let weighted_box = b.mul(&loss_box, &bw)?;
    let total = b.add(&loss_cls, &weighted_box)?;
    let total = b.add(&total, &loss_ctr)?;
    Ok([total, loss_cls, loss_box, loss_ctr])
}
