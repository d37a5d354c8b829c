//! What the runtime needs to know to serve a model: the input (name, layout, size, resize,
//! normalisation) and the output layout. densa's exports carry it in their metadata (key
//! `densa.spec`, TOML); third-party exports are described by the same TOML in a spec file:
//!
//! ```toml
//! [input]
//! name = "images"              # optional when the model has one input
//! layout = "NCHW"              # NCHW (batched) or CHW (one image per run)
//! size = [320, 320]            # width, height fed to the model
//! resize = "letterbox"         # stretch | letterbox
//! pad_value = 114              # letterbox padding (0-255)
//! scale = 0.003921569          # pixel (0-255) * scale, then (x - mean) / std
//! mean = [0.0, 0.0, 0.0]
//! std = [1.0, 1.0, 1.0]
//! channels = "RGB"             # RGB or BGR
//!
//! [output]
//! layout = "yolov8"            # boxes-scores-labels | yolov8
//! classes = ["disk", "square"] # optional names; index = label
//! ```

use serde::{Deserialize, Serialize};

use densa_exporter::onnx::ModelProto;

/// The metadata key densa exports carry their spec under.
pub const SPEC_KEY: &str = "densa.spec";

/// How an image is brought to the model's input size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Resize both sides to the input size (aspect ratio not kept).
    #[default]
    Stretch,
    /// Keep the aspect ratio, pad the rest (centred), as YOLO exports expect.
    Letterbox,
}

/// Tensor layout of the image input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputLayout {
    /// `[N, 3, H, W]`: images are batched.
    #[default]
    #[serde(rename = "NCHW")]
    Nchw,
    /// `[3, H, W]`: one image per run (torchvision detection exports).
    #[serde(rename = "CHW")]
    Chw,
}

/// Channel order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Channels {
    #[default]
    #[serde(rename = "RGB")]
    Rgb,
    #[serde(rename = "BGR")]
    Bgr,
}

fn default_scale() -> f32 {
    1.0 / 255.0
}
fn default_mean() -> [f32; 3] {
    [0.0; 3]
}
fn default_std() -> [f32; 3] {
    [1.0; 3]
}
fn default_pad() -> u8 {
    114
}

/// The image input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Input name; `None` = the model's only input.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub layout: InputLayout,
    /// `[width, height]` fed to the model.
    pub size: [u32; 2],
    #[serde(default)]
    pub resize: ResizeMode,
    #[serde(default = "default_pad")]
    pub pad_value: u8,
    #[serde(default = "default_scale")]
    pub scale: f32,
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    #[serde(default = "default_std")]
    pub std: [f32; 3],
    #[serde(default)]
    pub channels: Channels,
}

/// How the model's outputs encode detections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputLayout {
    /// Outputs `boxes` `[K, 4]` (xyxy, input pixels), `scores` `[K]`, `labels` `[K]`, optionally
    /// with a leading batch axis: torchvision's detection exports, and densa's detectors.
    #[serde(rename = "boxes-scores-labels")]
    BoxesScoresLabels,
    /// One output `[N, 4 + classes, anchors]`: `cx, cy, w, h` (input pixels) then per-class
    /// scores, as Ultralytics exports YOLOv8; NMS runs on the host.
    #[serde(rename = "yolov8")]
    Yolov8,
}

fn default_boxes() -> String {
    "boxes".into()
}
fn default_scores() -> String {
    "scores".into()
}
fn default_labels() -> String {
    "labels".into()
}
fn default_nms_iou() -> f32 {
    0.7
}

/// The outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub layout: OutputLayout,
    /// Output names for `boxes-scores-labels`.
    #[serde(default = "default_boxes")]
    pub boxes: String,
    #[serde(default = "default_scores")]
    pub scores: String,
    #[serde(default = "default_labels")]
    pub labels: String,
    /// Subtracted from the model's labels (torchvision counts the background as 0: use 1).
    #[serde(default)]
    pub label_offset: i64,
    /// IoU threshold of the host-side NMS (`yolov8`; `boxes-scores-labels` outputs are taken
    /// as already suppressed unless `host_nms` is set).
    #[serde(default = "default_nms_iou")]
    pub nms_iou: f32,
    /// Run NMS on the host for `boxes-scores-labels` outputs too.
    #[serde(default)]
    pub host_nms: bool,
    /// Class names, index = label (after `label_offset`).
    #[serde(default)]
    pub classes: Vec<String>,
}

/// What it takes to serve a detector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub input: InputSpec,
    pub output: OutputSpec,
}

/// Why no usable spec was found.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{source_name}: invalid spec: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
    #[error(
        "{model} carries no densa metadata (`{SPEC_KEY}`): it was not exported by densa. Describe \
         its input and outputs in a TOML spec file and pass it with --spec FILE.toml (see README, \
         \"Serving third-party models\")"
    )]
    Missing { model: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl ModelSpec {
    /// Parses a spec from TOML; `source_name` names it in errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<ModelSpec, SpecError> {
        let spec: ModelSpec = toml::from_str(text).map_err(|e| SpecError::Invalid {
            source_name: source_name.into(),
            message: e.to_string(),
        })?;
        spec.check(source_name)?;
        Ok(spec)
    }

    /// Reads a spec file.
    pub fn from_file(path: &std::path::Path) -> Result<ModelSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The spec a densa export carries in its metadata.
    pub fn from_model(model: &ModelProto, model_name: &str) -> Result<ModelSpec, SpecError> {
        let text = model
            .metadata_props
            .iter()
            .find(|e| e.key == SPEC_KEY)
            .map(|e| e.value.clone())
            .ok_or_else(|| SpecError::Missing {
                model: model_name.into(),
            })?;
        Self::from_toml(&text, &format!("{model_name} (metadata {SPEC_KEY})"))
    }

    /// As TOML, for embedding in an export's metadata.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a spec always serialises")
    }

    fn check(&self, source_name: &str) -> Result<(), SpecError> {
        let bad = |m: String| {
            Err(SpecError::Invalid {
                source_name: source_name.into(),
                message: m,
            })
        };
        if self.input.size.contains(&0) {
            return bad(format!(
                "input.size {:?}: both sides must be positive",
                self.input.size
            ));
        }
        if self.input.std.iter().any(|&s| s == 0.0 || !s.is_finite())
            || !self.input.scale.is_finite()
        {
            return bad("input.std must be non-zero and input.scale finite".into());
        }
        if !(0.0..=1.0).contains(&self.output.nms_iou) {
            return bad(format!(
                "output.nms_iou {} must be in [0, 1]",
                self.output.nms_iou
            ));
        }
        Ok(())
    }

    /// The class name of `label`, or its number.
    pub fn class_name(&self, label: usize) -> String {
        self.output
            .classes
            .get(label)
            .cloned()
            .unwrap_or_else(|| label.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults_and_round_trips() {
        let s = ModelSpec::from_toml(
            "[input]\nsize = [64, 48]\nresize = \"letterbox\"\n[output]\nlayout = \"yolov8\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(s.input.layout, InputLayout::Nchw);
        assert_eq!(s.input.pad_value, 114);
        assert_eq!(s.output.nms_iou, 0.7);
        assert_eq!(ModelSpec::from_toml(&s.to_toml(), "again").unwrap(), s);
    }

    #[test]
    fn errors_name_the_source_and_field() {
        let e = ModelSpec::from_toml(
            "[input]\nsize = [64]\n[output]\nlayout = \"yolov8\"\n",
            "bad.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("bad.toml"), "{e}");
        let e = ModelSpec::from_toml(
            "[input]\nsize = [64, 64]\nsizes = 1\n[output]\nlayout = \"yolov8\"\n",
            "bad.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("sizes"), "{e}");
        let e = ModelSpec::from_toml(
            "[input]\nsize = [0, 64]\n[output]\nlayout = \"yolov8\"\n",
            "z.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("positive"), "{e}");
    }
}
