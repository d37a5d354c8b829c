//! Supervised adaptation of a deployed semantic segmenter (`densa export segmenter`): the
//! per-pixel cross-entropy of [`crate::segment::cross_entropy`] (labels outside the classes,
//! such as 255, ignored) appended to the graph's `logits` output. The same surgery as the
//! detector's ([`super::graph`]): trainable initializers become inputs, `class_map` is dropped.

use std::collections::{BTreeMap, HashSet};

use densa_exporter::onnx::ModelProto;
use densa_exporter::{DType, Dim, GraphBuilder, Tensor};

use super::graph::{differentiate, merge, parameters_of, LossGraph};
use super::{select, AdaptError, TrainSelection};
use crate::detect::names;

/// The segmenter's labels input: int64 `[N, S, S]`, class index per pixel.
pub const LABELS: &str = "labels";

/// What an image model's metadata says about its input: `densa.input_size` (`SxS`),
/// `densa.mean`, `densa.std` (segmenters and classifiers; detectors carry `densa.spec`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageMeta {
    /// Square input side.
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageMeta {
    /// Checks `densa.task == task` and reads `densa.classes` and the input's metadata.
    pub fn read(
        model: &ModelProto,
        label: &str,
        task: &'static str,
    ) -> Result<(Vec<String>, ImageMeta), AdaptError> {
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
        let found = meta("densa.task")?;
        if found != task {
            return Err(AdaptError::WrongTask {
                model: label.to_string(),
                task: found,
                expected: task,
            });
        }
        let structure = |problem: String| AdaptError::Structure {
            model: label.to_string(),
            problem,
        };
        let classes: Vec<String> = meta("densa.classes")?
            .split(',')
            .map(str::to_string)
            .collect();
        let size = meta("densa.input_size")?;
        let image_size = size
            .split_once('x')
            .filter(|(w, h)| w == h)
            .and_then(|(w, _)| w.parse::<u32>().ok())
            .ok_or_else(|| structure(format!("densa.input_size {size:?}: expected SxS")))?;
        let triple = |key: &'static str| -> Result<[f32; 3], AdaptError> {
            let v = meta(key)?;
            let parsed: Vec<f32> = v
                .split(',')
                .map(|x| x.trim().parse::<f32>())
                .collect::<Result<_, _>>()
                .map_err(|_| structure(format!("{key} {v:?}: expected three numbers")))?;
            parsed
                .try_into()
                .map_err(|_| structure(format!("{key} {v:?}: expected three numbers")))
        };
        Ok((
            classes,
            ImageMeta {
                size: image_size,
                mean: triple("densa.mean")?,
                std: triple("densa.std")?,
            },
        ))
    }
}

/// A densa segmenter export, read back for adaptation.
#[derive(Clone, Debug)]
pub struct DeployedSegmenter {
    pub model: ModelProto,
    pub label: String,
    /// Class names (`densa.classes`, background first); the logits have one channel each.
    pub classes: Vec<String>,
    /// Square input side (`densa.input_size`).
    pub image_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Every parameter (float initializer named `*.weight` / `*.bias`), sorted by name.
    pub parameters: Vec<String>,
}

impl DeployedSegmenter {
    /// Reads a segmenter export: `densa.task = segment`, `densa.classes`, `densa.input_size`
    /// (`SxS`), `densa.mean`, `densa.std` and a `logits` output.
    pub fn from_model(model: &ModelProto, label: &str) -> Result<DeployedSegmenter, AdaptError> {
        let (
            classes,
            ImageMeta {
                size: image_size,
                mean,
                std,
            },
        ) = ImageMeta::read(model, label, "segment")?;
        let structure = |problem: String| AdaptError::Structure {
            model: label.to_string(),
            problem,
        };
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| structure("has no graph".into()))?;
        if !graph.output.iter().any(|o| o.name == "logits") {
            return Err(structure("has no `logits` output".into()));
        }
        let parameters = parameters_of(model)?.into_keys().collect();
        Ok(DeployedSegmenter {
            model: model.clone(),
            label: label.to_string(),
            classes,
            image_size,
            mean,
            std,
            parameters,
        })
    }

    /// The parameters `selection` makes trainable; an error when none match.
    pub fn trainable(&self, selection: &TrainSelection) -> Result<Vec<String>, AdaptError> {
        select(&self.parameters, selection, &self.label)
    }

    /// The current values of `names`.
    pub fn values(&self, names: &[String]) -> Result<BTreeMap<String, Tensor>, AdaptError> {
        let wanted: HashSet<&String> = names.iter().collect();
        Ok(parameters_of(&self.model)?
            .into_iter()
            .filter(|(n, _)| wanted.contains(n))
            .collect())
    }

    /// The loss graph with gradients: inputs `images [N, 3, S, S]`, [`LABELS`] int64
    /// `[N, S, S]` and the `trainable` parameters; outputs `loss` (mean cross-entropy over
    /// labeled pixels) and `grad.<p>`.
    ///
    /// # Shapes
    /// `images [N, 3, S, S]`, `labels [N, S, S]` -> `loss []`, `grad.<p>` like `p`.
    pub fn supervised_graph(&self, trainable: &[String]) -> Result<ModelProto, AdaptError> {
        let mut b = GraphBuilder::new("densa-adapt-segment-loss", 0);
        let n = Dim::from("N");
        let s = Dim::Fixed(self.image_size as i64);
        let c = Dim::Fixed(self.classes.len() as i64);
        let logits = b.input(
            "logits",
            DType::F32,
            vec![n.clone(), c, s.clone(), s.clone()],
        )?;
        let labels = b.input(LABELS, DType::I64, vec![n, s.clone(), s])?;
        let classes = self.classes.len();
        let loss = b.scoped("adapt", |b| {
            crate::segment::cross_entropy(b, &logits, &labels, classes)
        })?;
        b.output(&loss, names::LOSS)?;
        let consumed: HashSet<&str> = ["logits"].into_iter().collect();
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
