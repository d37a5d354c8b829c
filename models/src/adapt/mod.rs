//! On-device adaptation of a deployed detector, segmenter or classifier `.onnx` (densa issue
//! 9): the inference graph is turned back into a trainable one, trained on the device's
//! images, and the new parameter values are written into a copy of the deployed model.
//!
//! What the literature calls *test-time* or *on-device adaptation*; the unlabeled objective is
//! a Mean-Teacher-style prediction consistency (Tarvainen & Valpola 2017; Unbiased Teacher,
//! Liu et al. 2021, for detectors) and `bn-stats` is AdaBN (Li et al. 2016) / PyTorch's
//! `swa_utils.update_bn` (cumulative average of batch statistics).
//!
//! # How
//! - [`DeployedDetector::from_model`] reads a densa detector export: `densa.task = detect`,
//!   `densa.arch`, `densa.spec` (input size, normalisation, classes) and the decoder's nodes
//!   (`decode.min`, `decode.sigmoid`, `decode.sigmoid_1`), whose inputs are the head's raw
//!   outputs (`cls [N, L, C]`, `box_log [N, L, 4]`, `ctr [N, L]`).
//! - Parameters are the float initializers named `*.weight` / `*.bias`; [`TrainSelection`]
//!   picks the trainable ones. Those become graph inputs (fed by the host each step); the rest
//!   stay initializers, frozen. Folded batch norm stays folded: the backbone's convolutions
//!   carry it as an affine bias, so no statistics are needed or changed.
//! - [`DeployedDetector::supervised_graph`] appends the detector's training loss
//!   ([`crate::detect::detection_loss`]) to the raw outputs, drops the decoder (dead code) and
//!   differentiates with [`densa_exporter::autodiff::with_gradients`]: outputs `loss` and
//!   `grad.<param>`. [`DeployedDetector::consistency_graph`] does the same with the consistency
//!   loss against a teacher's predictions ([`DeployedDetector::raw_graph`] computes them).
//! - The optimiser runs on the host ([`AdamW`]): one image per graph run, gradients averaged
//!   over `batch` images (gradient accumulation), so memory is one image's forward and
//!   backward whatever the batch.
//! - Segmenters ([`DeployedSegmenter`]): the same surgery with the per-pixel cross-entropy on
//!   the `logits` output; classifiers ([`DeployedClassifier`]) with the cross-entropy on theirs.
//! - The pretext objectives ([`dense_consistency_graph`]: PixPro, DenseCL) work on any of them:
//!   the loss is appended to the backbone's last-stage features instead of the head.
//! - [`with_parameters`] writes new values into the deployed model: same inputs, outputs,
//!   nodes and metadata; only the named initializers differ.
//!
//! Our choices: the loss is averaged per image (each image's FCOS loss normalised by its own
//! positives) rather than per batch; AdamW runs on the host (not in the graph) because the
//! step happens once per accumulated batch; the target assignment uses the fine-tuning
//! recipe's defaults ([`DetectorConfig::new`]: scale bounds, centre radius, focal alpha/gamma),
//! which a deployed model does not record.

mod bn_stats;
mod classify;
mod consistency;
mod dense;
mod graph;
mod optim;
mod segment;
#[cfg(test)]
mod tests;

pub use bn_stats::{bn_stats_graph, BatchNormStats};
pub use classify::{DeployedClassifier, CLASS_LABELS, LOGITS, TEACHER_PROBS};
pub use consistency::{ConsistencyConfig, TEACHER_BOX, TEACHER_CLS, TEACHER_CTR};
pub use dense::{
    backbone_feature, dense_consistency_graph, feature_graph, upstream_parameters, DenseObjective,
    POSITIVES, TEACHER_KEYS,
};
pub use graph::{parameters_of, with_parameters};
pub use optim::AdamW;
pub use segment::{DeployedSegmenter, ImageMeta, LABELS};

use std::collections::{BTreeMap, HashSet};

use densa_exporter::autodiff::AutodiffError;
use densa_exporter::onnx::ModelProto;
use densa_exporter::passes::PassError;
use densa_exporter::{BuildError, Tensor};
use densa_runtime::infer::spec::{InputLayout, ModelSpec};

use crate::detect::{DetectError, DetectorConfig};

/// Why a model cannot be adapted.
#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    #[error("{model}: metadata `{key}` is missing (not a densa export; adapt needs `densa.task`, `densa.arch` and `densa.spec`)")]
    MissingMetadata { model: String, key: &'static str },
    #[error("{model}: a `{task}` model (`densa.task`), expected a `{expected}` model")]
    WrongTask {
        model: String,
        task: String,
        expected: &'static str,
    },
    #[error("{model}: {problem}")]
    Structure { model: String, problem: String },
    #[error("{model}: --train {selection}: {problem}")]
    Selection {
        model: String,
        selection: String,
        problem: String,
    },
    #[error("{model}: {problem}")]
    NoBatchNorm { model: String, problem: String },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error("differentiating the adaptation graph: {0}")]
    Autodiff(#[from] AutodiffError),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error("parameter `{name}`: {problem}")]
    Parameter { name: String, problem: String },
}

/// Which initializers `--train` makes trainable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrainSelection {
    /// The detection head: parameters under `head.` (towers, classifier, box and centerness
    /// predictors). The default: the smallest graph and the least memory.
    Head,
    /// Every parameter.
    All,
    /// Parameters matching any of these patterns (`*` matches any run of characters; a
    /// pattern without `*` matches that name or that prefix followed by `.`).
    Patterns(Vec<String>),
}

impl std::str::FromStr for TrainSelection {
    type Err = String;

    /// `head`, `all`, or comma-separated patterns (`fpn.*,head.cls_logits.*`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "head" => Ok(TrainSelection::Head),
            "all" => Ok(TrainSelection::All),
            "" => Err("empty: expected head, all or name patterns".into()),
            other => Ok(TrainSelection::Patterns(
                other
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
            )),
        }
    }
}

impl std::fmt::Display for TrainSelection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainSelection::Head => f.write_str("head"),
            TrainSelection::All => f.write_str("all"),
            TrainSelection::Patterns(p) => f.write_str(&p.join(",")),
        }
    }
}

impl TrainSelection {
    /// Whether the parameter `name` is selected.
    pub fn selects(&self, name: &str) -> bool {
        match self {
            TrainSelection::Head => name.starts_with("head."),
            TrainSelection::All => true,
            TrainSelection::Patterns(patterns) => patterns.iter().any(|p| {
                if p.contains('*') {
                    glob_match(p, name)
                } else {
                    name == p || name.starts_with(&format!("{p}."))
                }
            }),
        }
    }
}

/// `*`-only glob matching (no other metacharacters).
fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// A densa detector export, read back for adaptation.
#[derive(Clone, Debug)]
pub struct DeployedDetector {
    /// The deployed model, unchanged.
    pub model: ModelProto,
    /// Names the model in errors (its path).
    pub label: String,
    /// The detector's configuration as far as the export records it (arch, classes, input
    /// size, normalisation); training-only settings take [`DetectorConfig::new`]'s defaults.
    pub config: DetectorConfig,
    /// The serving spec (`densa.spec`).
    pub spec: ModelSpec,
    /// The head's raw output values: `cls [N, L, C]`, `box_log [N, L, 4]`, `ctr [N, L]`.
    pub raw: RawNames,
    /// Whether the input is one CHW image (NMS-in-graph exports) instead of an NCHW batch.
    pub chw: bool,
    /// Every parameter (float initializer named `*.weight` / `*.bias`), in graph order.
    pub parameters: Vec<String>,
}

/// The names of the head's raw outputs in a deployed graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawNames {
    pub cls: String,
    pub box_log: String,
    pub ctr: String,
}

impl DeployedDetector {
    /// Reads `model` (named `label` in errors): checks the metadata and finds the head's raw
    /// outputs and the parameters.
    pub fn from_model(model: &ModelProto, label: &str) -> Result<DeployedDetector, AdaptError> {
        let meta = |key: &'static str| {
            model
                .metadata_props
                .iter()
                .find(|p| p.key == key)
                .map(|p| p.value.clone())
                .ok_or_else(|| AdaptError::MissingMetadata {
                    model: label.to_string(),
                    key,
                })
        };
        let task = meta("densa.task")?;
        if task != "detect" {
            return Err(AdaptError::WrongTask {
                model: label.to_string(),
                task,
                expected: "detect",
            });
        }
        let arch = meta("densa.arch")?;
        meta(densa_runtime::infer::spec::SPEC_KEY)?;
        let structure = |problem: String| AdaptError::Structure {
            model: label.to_string(),
            problem,
        };
        let spec = ModelSpec::from_model(model, label).map_err(|e| structure(e.to_string()))?;
        let arch: crate::Arch = arch
            .parse()
            .map_err(|e| structure(format!("densa.arch {arch:?}: {e}")))?;
        let mut config = DetectorConfig::new(arch, spec.output.classes.clone());
        if spec.input.size[0] != spec.input.size[1] {
            return Err(structure(format!(
                "input size {:?} is not square (densa detectors are)",
                spec.input.size
            )));
        }
        config.image_size = spec.input.size[0];
        config.mean = spec.input.mean;
        config.std = spec.input.std;
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| structure("has no graph".into()))?;
        let input_of = |node: &str| -> Result<String, AdaptError> {
            graph
                .node
                .iter()
                .find(|n| n.name == node)
                .and_then(|n| n.input.first().cloned())
                .ok_or_else(|| {
                    structure(format!(
                        "no decoder node `{node}`: not a densa FCOS detector export"
                    ))
                })
        };
        let raw = RawNames {
            cls: input_of("decode.sigmoid")?,
            box_log: input_of("decode.min")?,
            ctr: input_of("decode.sigmoid_1")?,
        };
        // The location grid the decoder was exported with must be the assigner's.
        let points = input_of("decode.sub")?;
        let exported_l = graph
            .initializer
            .iter()
            .find(|t| t.name == points)
            .and_then(|t| t.dims.first().copied())
            .ok_or_else(|| structure(format!("decoder constant `{points}` not found")))?;
        let l = config.assigner().locations() as i64;
        if exported_l != l {
            return Err(structure(format!(
                "the decoder has {exported_l} locations, a {}x{} input gives {l}",
                config.image_size, config.image_size
            )));
        }
        let chw = spec.input.layout == InputLayout::Chw;
        let parameters = graph
            .initializer
            .iter()
            .filter(|t| {
                (t.name.ends_with(".weight") || t.name.ends_with(".bias"))
                    && t.data_type == densa_exporter::DType::F32.onnx() as i32
            })
            .map(|t| t.name.clone())
            .collect();
        Ok(DeployedDetector {
            model: model.clone(),
            label: label.to_string(),
            config,
            spec,
            raw,
            chw,
            parameters,
        })
    }

    /// The parameters `selection` makes trainable (graph order); an error when none match.
    pub fn trainable(&self, selection: &TrainSelection) -> Result<Vec<String>, AdaptError> {
        select(&self.parameters, selection, &self.label)
    }

    /// The current values of `names` (initializers of the deployed model).
    pub fn values(&self, names: &[String]) -> Result<BTreeMap<String, Tensor>, AdaptError> {
        let all = parameters_of(&self.model)?;
        let wanted: HashSet<&String> = names.iter().collect();
        let out: BTreeMap<String, Tensor> = all
            .into_iter()
            .filter(|(n, _)| wanted.contains(n))
            .collect();
        for n in names {
            if !out.contains_key(n) {
                return Err(AdaptError::Parameter {
                    name: n.clone(),
                    problem: format!("is not an initializer of {}", self.label),
                });
            }
        }
        Ok(out)
    }

    /// The image input's name.
    pub fn input_name(&self) -> String {
        self.spec
            .input
            .name
            .clone()
            .unwrap_or_else(|| crate::detect::names::IMAGES.to_string())
    }

    /// One prepared image `[3, S, S]` as the model's input tensor (`[1, 3, S, S]` for NCHW
    /// models, as is for CHW ones).
    pub fn image_input(&self, chw: ndarray::Array3<f32>) -> Tensor {
        if self.chw {
            Tensor::F32(chw.into_dyn())
        } else {
            Tensor::F32(chw.insert_axis(ndarray::Axis(0)).into_dyn())
        }
    }
}

/// The parameters of `parameters` that `selection` picks (order kept); an error naming the
/// model (`label`) when none match.
pub fn select(
    parameters: &[String],
    selection: &TrainSelection,
    label: &str,
) -> Result<Vec<String>, AdaptError> {
    let chosen: Vec<String> = parameters
        .iter()
        .filter(|p| selection.selects(p))
        .cloned()
        .collect();
    if chosen.is_empty() {
        return Err(AdaptError::Selection {
            model: label.to_string(),
            selection: selection.to_string(),
            problem: format!(
                "matches none of the model's {} parameters (e.g. {})",
                parameters.len(),
                parameters
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    Ok(chosen)
}
