//! Adaptation of a deployed classifier (`densa train` writes it as `model.onnx`): the same
//! surgery as the detector's ([`super::graph`]) on the `logits` output.
//!
//! - supervised: the mean cross-entropy of [`crate::train_step::cross_entropy`] against the
//!   device's labels (class subfolders named as the model's classes);
//! - consistency (unlabeled): Mean Teacher on the predictions, the cross-entropy of the
//!   student's log-probabilities on a perturbed view against the momentum teacher's
//!   probabilities on the plain view, `-mean_n sum_c p_t log softmax(z_s)`.
//!
//! "Head" is the final linear layer (`fc.*`).

use std::collections::{BTreeMap, HashSet};

use densa_exporter::onnx::ModelProto;
use densa_exporter::{DType, Dim, GraphBuilder, Tensor};

use super::graph::{differentiate, merge, parameters_of, LossGraph};
use super::segment::ImageMeta;
use super::{select, AdaptError, TrainSelection};
use crate::detect::names;

/// The classifier's labels input: int64 `[N]`, class index per image.
pub const CLASS_LABELS: &str = "labels";
/// The teacher's class probabilities input of the consistency graph, `[N, C]`.
pub const TEACHER_PROBS: &str = "teacher.probs";
/// The classifier's output.
pub const LOGITS: &str = "logits";

/// A densa classifier export, read back for adaptation.
#[derive(Clone, Debug)]
pub struct DeployedClassifier {
    pub model: ModelProto,
    pub label: String,
    /// Class names (`densa.classes`), index = label.
    pub classes: Vec<String>,
    /// Square input side (`densa.input_size`), mean and std of the normalisation.
    pub image: ImageMeta,
    /// The input's name (the graph's only non-initializer input).
    pub input: String,
    /// Every parameter (float initializer named `*.weight` / `*.bias`), sorted by name.
    pub parameters: Vec<String>,
}

impl DeployedClassifier {
    /// Reads a classifier export: `densa.task = classify`, `densa.classes`,
    /// `densa.input_size` (`SxS`), `densa.mean`, `densa.std` and a `logits` output `[N, C]`.
    pub fn from_model(model: &ModelProto, label: &str) -> Result<DeployedClassifier, AdaptError> {
        let (classes, image) = ImageMeta::read(model, label, "classify")?;
        let structure = |problem: String| AdaptError::Structure {
            model: label.to_string(),
            problem,
        };
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| structure("has no graph".into()))?;
        if !graph.output.iter().any(|o| o.name == LOGITS) {
            return Err(structure(format!("has no `{LOGITS}` output")));
        }
        let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<&str> = graph
            .input
            .iter()
            .map(|i| i.name.as_str())
            .filter(|n| !inits.contains(n))
            .collect();
        let [input] = inputs.as_slice() else {
            return Err(structure(format!(
                "expected one image input, found {}: {}",
                inputs.len(),
                inputs.join(", ")
            )));
        };
        let parameters = parameters_of(model)?.into_keys().collect();
        Ok(DeployedClassifier {
            model: model.clone(),
            label: label.to_string(),
            classes,
            image,
            input: input.to_string(),
            parameters,
        })
    }

    /// The parameters `selection` makes trainable (`head` is the final linear layer `fc`);
    /// an error when none match.
    pub fn trainable(&self, selection: &TrainSelection) -> Result<Vec<String>, AdaptError> {
        let selection = match selection {
            TrainSelection::Head => TrainSelection::Patterns(vec!["fc".into()]),
            other => other.clone(),
        };
        select(&self.parameters, &selection, &self.label)
    }

    /// The current values of `names`.
    pub fn values(&self, names: &[String]) -> Result<BTreeMap<String, Tensor>, AdaptError> {
        let wanted: HashSet<&String> = names.iter().collect();
        Ok(parameters_of(&self.model)?
            .into_iter()
            .filter(|(n, _)| wanted.contains(n))
            .collect())
    }

    /// The supervised loss graph with gradients: inputs the image, [`CLASS_LABELS`] and the
    /// `trainable` parameters; outputs `loss` (mean cross-entropy) and `grad.<p>`.
    ///
    /// # Shapes
    /// `images [N, 3, S, S]`, `labels [N]` -> `loss []`, `grad.<p>` like `p`.
    pub fn supervised_graph(&self, trainable: &[String]) -> Result<ModelProto, AdaptError> {
        let mut b = GraphBuilder::new("densa-adapt-classify-loss", 0);
        let n = Dim::from("N");
        let logits = self.logits_input(&mut b)?;
        let labels = b.input(CLASS_LABELS, DType::I64, vec![n])?;
        let loss = b.scoped("adapt", |b| {
            crate::train_step::cross_entropy(b, &logits, &labels)
        })?;
        b.output(&loss, names::LOSS)?;
        self.with_loss(trainable, b)
    }

    /// The consistency loss graph with gradients: inputs the (perturbed) image, the teacher's
    /// probabilities [`TEACHER_PROBS`] and the `trainable` parameters; outputs `loss`
    /// (`-mean_n sum_c p_t log softmax(z)`) and `grad.<p>`.
    ///
    /// # Shapes
    /// `images [N, 3, S, S]`, `teacher.probs [N, C]` -> `loss []`, `grad.<p>` like `p`.
    pub fn consistency_graph(&self, trainable: &[String]) -> Result<ModelProto, AdaptError> {
        let mut b = GraphBuilder::new("densa-adapt-classify-consistency", 0);
        let logits = self.logits_input(&mut b)?;
        let c = Dim::Fixed(self.classes.len() as i64);
        let probs = b.input(TEACHER_PROBS, DType::F32, vec![Dim::from("N"), c])?;
        let loss = b.scoped("adapt", |b| soft_cross_entropy(b, &logits, &probs))?;
        b.output(&loss, names::LOSS)?;
        self.with_loss(trainable, b)
    }

    /// The teacher's graph: the image and the `trainable` parameters in, `logits` out.
    pub fn logits_graph(&self, trainable: &[String]) -> Result<ModelProto, AdaptError> {
        let graph = self
            .model
            .graph
            .as_ref()
            .ok_or_else(|| AdaptError::Structure {
                model: self.label.clone(),
                problem: "has no graph".into(),
            })?;
        let outputs = graph
            .output
            .iter()
            .filter(|o| o.name == LOGITS)
            .cloned()
            .collect();
        merge(
            &self.model,
            &self.label,
            trainable,
            None,
            outputs,
            &HashSet::new(),
        )
    }

    fn logits_input(&self, b: &mut GraphBuilder) -> Result<densa_exporter::Value, AdaptError> {
        let c = Dim::Fixed(self.classes.len() as i64);
        Ok(b.input(LOGITS, DType::F32, vec![Dim::from("N"), c])?)
    }

    fn with_loss(&self, trainable: &[String], b: GraphBuilder) -> Result<ModelProto, AdaptError> {
        let consumed: HashSet<&str> = [LOGITS].into_iter().collect();
        let forward = merge(
            &self.model,
            &self.label,
            trainable,
            Some(&LossGraph { model: b.finish() }),
            Vec::new(),
            &consumed,
        )?;
        differentiate(&forward, trainable)
    }
}

/// `-mean_n sum_c p[n, c] log softmax(z)[n, c]`: the cross-entropy of soft targets.
///
/// # Shapes
/// `logits [N, C]`, `p [N, C]` -> `[]`.
pub(crate) fn soft_cross_entropy(
    b: &mut GraphBuilder,
    logits: &densa_exporter::Value,
    p: &densa_exporter::Value,
) -> Result<densa_exporter::Value, densa_exporter::BuildError> {
    let logp = b.node1(
        "LogSoftmax",
        Some("log_softmax"),
        &[logits],
        vec![densa_exporter::builder::attr::int("axis", 1)],
        DType::F32,
        logits.shape().to_vec(),
    );
    let prod = b.mul(p, &logp)?;
    let per_row = b.reduce_sum(&prod, &[1], false)?;
    let mean = b.reduce_mean(&per_row, &[], false)?;
    Ok(b.neg(&mean))
}
