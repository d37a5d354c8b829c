//! Model outputs -> detections in original-image pixels, per output layout.

use densa_exporter::Tensor;
use ndarray::{ArrayD, Axis, IxDyn};

use super::nms::nms;
use super::preprocess::ImageTransform;
use super::spec::{ModelSpec, OutputLayout};

/// One detection, in original-image pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    pub score: f32,
    pub label: usize,
}

/// Why outputs could not be decoded. The model named by `model`.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "{model}: output `{name}` is missing (outputs: {available}); check the spec's output names"
    )]
    MissingOutput {
        model: String,
        name: String,
        available: String,
    },
    #[error(
        "{model}: output `{name}` has shape {shape:?}; the `{layout}` layout expects {expected}"
    )]
    Shape {
        model: String,
        name: String,
        shape: Vec<usize>,
        layout: &'static str,
        expected: String,
    },
    #[error("{model}: output `{name}` has a negative label {label} after label_offset")]
    NegativeLabel {
        model: String,
        name: String,
        label: i64,
    },
}

/// Decodes the outputs of one run over `transforms.len()` images. Detections below
/// `score_threshold` are dropped; the rest are sorted by score.
pub fn decode(
    outputs: &[(String, Tensor)],
    spec: &ModelSpec,
    transforms: &[ImageTransform],
    score_threshold: f32,
    model: &str,
) -> Result<Vec<Vec<Detection>>, DecodeError> {
    let get = |name: &str| -> Result<&Tensor, DecodeError> {
        outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| DecodeError::MissingOutput {
                model: model.into(),
                name: name.into(),
                available: outputs
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    };
    let n = transforms.len();
    let mut per_image = match spec.output.layout {
        OutputLayout::BoxesScoresLabels => {
            let o = &spec.output;
            let boxes = batched(get(&o.boxes)?.to_f32(), 2, n);
            let scores = batched(get(&o.scores)?.to_f32(), 1, n);
            let labels = batched(get(&o.labels)?.to_f32(), 1, n);
            let shape_err = |name: &str, t: &Tensor, expected: &str| DecodeError::Shape {
                model: model.into(),
                name: name.into(),
                shape: t.shape().to_vec(),
                layout: "boxes-scores-labels",
                expected: expected.into(),
            };
            let boxes = boxes.ok_or_else(|| {
                shape_err(&o.boxes, get(&o.boxes).unwrap(), "[K, 4] or [N, K, 4]")
            })?;
            let scores = scores
                .ok_or_else(|| shape_err(&o.scores, get(&o.scores).unwrap(), "[K] or [N, K]"))?;
            let labels = labels
                .ok_or_else(|| shape_err(&o.labels, get(&o.labels).unwrap(), "[K] or [N, K]"))?;
            let mut all = Vec::with_capacity(n);
            for i in 0..n {
                let (b, s, l) = (
                    boxes.index_axis(Axis(0), i),
                    scores.index_axis(Axis(0), i),
                    labels.index_axis(Axis(0), i),
                );
                if b.shape()[0] != s.len() || s.len() != l.len() || b.shape()[1] != 4 {
                    return Err(shape_err(
                        &o.boxes,
                        get(&o.boxes).unwrap(),
                        "as many boxes as scores and labels",
                    ));
                }
                let mut dets = Vec::new();
                for k in 0..s.len() {
                    let label = l[k].round() as i64 - o.label_offset;
                    if label < 0 {
                        return Err(DecodeError::NegativeLabel {
                            model: model.into(),
                            name: o.labels.clone(),
                            label,
                        });
                    }
                    dets.push(Detection {
                        bbox: [b[[k, 0]], b[[k, 1]], b[[k, 2]], b[[k, 3]]],
                        score: s[k],
                        label: label as usize,
                    });
                }
                if o.host_nms {
                    dets = suppress(dets, o.nms_iou);
                }
                all.push(dets);
            }
            all
        }
        OutputLayout::Yolov8 => {
            let (name, t) = outputs.first().ok_or_else(|| DecodeError::MissingOutput {
                model: model.into(),
                name: "(any)".into(),
                available: String::new(),
            })?;
            let a = t.to_f32();
            if a.ndim() != 3 || a.shape()[0] != n || a.shape()[1] < 5 {
                return Err(DecodeError::Shape {
                    model: model.into(),
                    name: name.clone(),
                    shape: a.shape().to_vec(),
                    layout: "yolov8",
                    expected: format!("[{n}, 4 + classes, anchors]"),
                });
            }
            let classes = a.shape()[1] - 4;
            let mut all = Vec::with_capacity(n);
            for i in 0..n {
                let m = a.index_axis(Axis(0), i);
                let mut dets = Vec::new();
                for k in 0..m.shape()[1] {
                    let (mut best, mut label) = (f32::NEG_INFINITY, 0);
                    for c in 0..classes {
                        let v = m[[4 + c, k]];
                        if v > best {
                            best = v;
                            label = c;
                        }
                    }
                    if best < score_threshold {
                        continue;
                    }
                    let (cx, cy, w, h) = (m[[0, k]], m[[1, k]], m[[2, k]], m[[3, k]]);
                    dets.push(Detection {
                        bbox: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
                        score: best,
                        label,
                    });
                }
                all.push(suppress(dets, spec.output.nms_iou));
            }
            all
        }
    };
    for (dets, t) in per_image.iter_mut().zip(transforms) {
        dets.retain(|d| d.score >= score_threshold && d.score.is_finite());
        for d in dets.iter_mut() {
            d.bbox = t.box_to_image(d.bbox);
        }
        dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    }
    Ok(per_image)
}

fn suppress(dets: Vec<Detection>, iou: f32) -> Vec<Detection> {
    let boxes: Vec<[f32; 4]> = dets.iter().map(|d| d.bbox).collect();
    let scores: Vec<f32> = dets.iter().map(|d| d.score).collect();
    let labels: Vec<usize> = dets.iter().map(|d| d.label).collect();
    nms(&boxes, &scores, &labels, iou)
        .into_iter()
        .map(|i| dets[i].clone())
        .collect()
}

/// Gives `a` a leading batch axis of length `n` when it has rank `rank` (unbatched, only valid
/// for `n == 1`); `None` when the shape fits neither form.
fn batched(a: ArrayD<f32>, rank: usize, n: usize) -> Option<ArrayD<f32>> {
    if a.ndim() == rank && n == 1 {
        let mut shape = vec![1];
        shape.extend_from_slice(a.shape());
        a.into_shape_with_order(IxDyn(&shape)).ok()
    } else if a.ndim() == rank + 1 && a.shape()[0] == n {
        Some(a)
    } else {
        None
    }
}
