//! Serving semantic segmenters: the self-description densa's segmenter exports carry, batched
//! inference, class maps mapped back to the original image, label PNGs and colour overlays.
//!
//! A densa segmenter export has outputs `logits` `[N, C, H, W]` and `class_map` int64
//! `[N, H, W]` (`ArgMax` in the graph) at its input resolution, and carries a
//! [`SegmenterSpec`] as TOML under the metadata key [`SEGMENTER_SPEC_KEY`] (the image input as
//! detectors describe it, [`InputSpec`], plus the outputs and class names).
//!
//! Choices that are ours: the class map is brought back to the original image by
//! nearest-neighbour sampling at pixel centres through the inverse of the preprocessing
//! transform (letterbox padding is cut away); label PNGs hold class indices (0 = background,
//! `i` = the `i`-th category by ascending id, as `densa finetune --task segment` trains them);
//! overlays blend each non-background class's colour at 50 %.

use image::{GrayImage, Luma, RgbImage};
use ndarray::{ArrayD, Axis};
use serde::{Deserialize, Serialize};

use super::draw::class_colour;
use super::preprocess::{prepare, ImageTransform};
use super::spec::InputSpec;
use crate::backend::{BackendError, Session};
use crate::Tensor;
use densa_exporter::onnx::ModelProto;

/// The metadata key of a segmenter's [`SegmenterSpec`].
pub const SEGMENTER_SPEC_KEY: &str = "densa.segmenter";

/// The outputs of a segmenter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegOutputSpec {
    /// Name of the float logits output `[N, C, H, W]`.
    pub logits: String,
    /// Name of the int64 class map output `[N, H, W]`.
    pub class_map: String,
    /// Class names, index = class (0 = background).
    pub classes: Vec<String>,
}

/// What it takes to serve a segmenter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmenterSpec {
    pub input: InputSpec,
    pub output: SegOutputSpec,
}

/// Why a segmenter could not be served.
#[derive(Debug, thiserror::Error)]
pub enum SegServeError {
    #[error(
        "{model} carries no segmenter description (metadata `{SEGMENTER_SPEC_KEY}`): export it \
         with `densa export segmenter`"
    )]
    Missing { model: String },
    #[error("{model}: invalid segmenter description: {message}")]
    Invalid { model: String, message: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{model}: output `{name}` {problem}")]
    Output {
        model: String,
        name: String,
        problem: String,
    },
}

impl SegmenterSpec {
    /// The spec a densa segmenter export carries.
    pub fn from_model(
        model: &ModelProto,
        model_name: &str,
    ) -> Result<SegmenterSpec, SegServeError> {
        let text = model
            .metadata_props
            .iter()
            .find(|e| e.key == SEGMENTER_SPEC_KEY)
            .map(|e| e.value.clone())
            .ok_or_else(|| SegServeError::Missing {
                model: model_name.into(),
            })?;
        Self::from_toml(&text, model_name)
    }

    /// Parses the TOML form; `model_name` names it in errors.
    pub fn from_toml(text: &str, model_name: &str) -> Result<SegmenterSpec, SegServeError> {
        let invalid = |message: String| SegServeError::Invalid {
            model: model_name.into(),
            message,
        };
        let spec: SegmenterSpec = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if spec.input.size.contains(&0) {
            return Err(invalid(format!(
                "input.size {:?} must be positive",
                spec.input.size
            )));
        }
        if spec.input.std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(invalid("input.std must be finite and non-zero".into()));
        }
        if spec.output.classes.is_empty() || spec.output.classes.len() > 255 {
            return Err(invalid(format!(
                "{} classes; 1 to 255 are supported",
                spec.output.classes.len()
            )));
        }
        Ok(spec)
    }

    /// As TOML, for the export's metadata.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a spec always serialises")
    }

    /// Number of classes, background included.
    pub fn num_classes(&self) -> usize {
        self.output.classes.len()
    }
}

/// Runs the segmenter on `images` (one batch) and returns each image's class map at its
/// original size.
///
/// # Shapes
/// `images[i]`: `H_i x W_i x 3` -> `H_i x W_i` class indices.
pub fn segment_batch(
    session: &mut dyn Session,
    spec: &SegmenterSpec,
    images: &[&RgbImage],
    model_name: &str,
) -> Result<Vec<GrayImage>, SegServeError> {
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let prepared: Vec<_> = images.iter().map(|img| prepare(img, &spec.input)).collect();
    let views: Vec<_> = prepared.iter().map(|(x, _)| x.view()).collect();
    let batch = ndarray::stack(Axis(0), &views).expect("prepared images share one size");
    let input_name = spec.input.name.clone().unwrap_or_else(|| "images".into());
    let outputs = session.run(vec![(input_name, Tensor::F32(batch.into_dyn()))])?;
    let output_err = |problem: String| SegServeError::Output {
        model: model_name.into(),
        name: spec.output.class_map.clone(),
        problem,
    };
    let map = outputs
        .into_iter()
        .find(|(n, _)| *n == spec.output.class_map)
        .ok_or_else(|| output_err("is missing from the model's outputs".into()))?
        .1;
    let map: ArrayD<i64> = match map {
        Tensor::I64(a) => a,
        other => return Err(output_err(format!("is {}, expected int64", other.dtype()))),
    };
    let [w, h] = spec.input.size;
    if map.shape() != [images.len(), h as usize, w as usize] {
        return Err(output_err(format!(
            "has shape {:?}, expected [{}, {h}, {w}]",
            map.shape(),
            images.len()
        )));
    }
    let classes = spec.num_classes() as i64;
    if let Some(bad) = map.iter().find(|&&c| !(0..classes).contains(&c)) {
        return Err(output_err(format!(
            "holds class {bad}, outside 0..{classes}"
        )));
    }
    Ok(prepared
        .iter()
        .enumerate()
        .map(|(i, (_, t))| {
            let m = map.index_axis(Axis(0), i);
            to_image_grid(|x, y| m[[y, x]] as u8, [w as usize, h as usize], t)
        })
        .collect())
}

/// Samples a model-grid label map at the centres of the original image's pixels.
fn to_image_grid(
    at: impl Fn(usize, usize) -> u8,
    [w, h]: [usize; 2],
    t: &ImageTransform,
) -> GrayImage {
    let [iw, ih] = t.image_size;
    GrayImage::from_fn(iw, ih, |x, y| {
        let mx = (x as f32 + 0.5) * t.scale[0] + t.offset[0];
        let my = (y as f32 + 0.5) * t.scale[1] + t.offset[1];
        let mx = (mx.floor().max(0.0) as usize).min(w - 1);
        let my = (my.floor().max(0.0) as usize).min(h - 1);
        Luma([at(mx, my)])
    })
}

/// The image with every non-background class blended in its colour at 50 %.
pub fn overlay(image: &RgbImage, labels: &GrayImage) -> RgbImage {
    let mut out = image.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        let class = labels.get_pixel(x, y).0[0] as usize;
        if class == 0 {
            continue;
        }
        let c = class_colour(class).0;
        for (v, c) in p.0.iter_mut().zip(c) {
            *v = ((*v as u16 + c as u16) / 2) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::spec::{Channels, InputLayout, ResizeMode};

    fn spec(resize: ResizeMode) -> SegmenterSpec {
        SegmenterSpec {
            input: InputSpec {
                name: None,
                layout: InputLayout::Nchw,
                size: [8, 8],
                resize,
                pad_value: 0,
                scale: 1.0 / 255.0,
                mean: [0.0; 3],
                std: [1.0; 3],
                channels: Channels::Rgb,
            },
            output: SegOutputSpec {
                logits: "logits".into(),
                class_map: "class_map".into(),
                classes: vec!["background".into(), "disk".into()],
            },
        }
    }

    #[test]
    fn spec_round_trips_and_is_checked() {
        let s = spec(ResizeMode::Stretch);
        assert_eq!(SegmenterSpec::from_toml(&s.to_toml(), "m").unwrap(), s);
        let mut bad = s.clone();
        bad.output.classes.clear();
        let e = SegmenterSpec::from_toml(&bad.to_toml(), "m.onnx")
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.onnx") && e.contains("0 classes"), "{e}");
        let e = SegmenterSpec::from_model(&ModelProto::default(), "x.onnx")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.onnx") && e.contains("densa export segmenter"),
            "{e}"
        );
    }

    #[test]
    fn class_map_maps_back_through_stretch_and_letterbox() {
        // Model grid 8x8: left half class 0, right half class 1.
        let at = |x: usize, _y: usize| (x >= 4) as u8;
        // Stretch of a 16x4 image: columns 0..8 -> class 0, 8..16 -> class 1.
        let t = ImageTransform {
            scale: [0.5, 2.0],
            offset: [0.0, 0.0],
            image_size: [16, 4],
        };
        let m = to_image_grid(at, [8, 8], &t);
        assert_eq!(m.dimensions(), (16, 4));
        assert_eq!(m.get_pixel(7, 1).0[0], 0);
        assert_eq!(m.get_pixel(8, 1).0[0], 1);
        // Letterbox of a 4x16 image into 8x8: scale 0.5, x offset 3 (content in columns 3..5).
        let t = ImageTransform {
            scale: [0.5, 0.5],
            offset: [3.0, 0.0],
            image_size: [4, 16],
        };
        let m = to_image_grid(at, [8, 8], &t);
        assert_eq!(m.dimensions(), (4, 16));
        // Image column 1 centre -> model x 3.75 (class 0); column 2 -> 4.25 (class 1).
        assert_eq!(m.get_pixel(1, 5).0[0], 0);
        assert_eq!(m.get_pixel(2, 5).0[0], 1);
    }

    #[test]
    fn overlay_leaves_background_alone() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([100, 100, 100]));
        let labels = GrayImage::from_raw(2, 1, vec![0, 1]).unwrap();
        let o = overlay(&img, &labels);
        assert_eq!(o.get_pixel(0, 0).0, [100, 100, 100]);
        assert_ne!(o.get_pixel(1, 0).0, [100, 100, 100]);
    }
}
