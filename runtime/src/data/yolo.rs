//! YOLO txt labels (Darknet / Ultralytics): one `.txt` per image, one object per line,
//! `class cx cy w h` with the centre and size normalised by the image's width and height.
//!
//! Layout: `labels` mirrors `images` (`images/train/a.jpg` -> `labels/train/a.txt`); by
//! default the labels directory is the image directory with its last `images` component
//! replaced by `labels`, as Ultralytics does. An image without a label file has no objects
//! (a background image). Class names come from the spec or from a `classes.txt` (one name per
//! line) in the labels directory or its parent.
//!
//! Validation (ours): exactly five fields; the class an integer below the number of classes;
//! `cx, cy` in `[0, 1]`, `w, h` in `(0, 1]`; the box's edges inside `[0, 1]` up to
//! [`EDGE_TOLERANCE`] (rounding in writers), clipped to the image when converted to pixels.
//! Polygon ("segment") lines are refused with a message saying so.

use std::path::{Component, Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::error::quoted;
use super::folder::list_images;
use super::image::read_rgb;
use super::{out_of_range, read_file, BoxAnnotation, DataError, Sample, SampleSource};

/// How far (normalised) a box edge may stick out of `[0, 1]` before it is an error.
pub const EDGE_TOLERANCE: f32 = 1e-3;

/// One label line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct YoloBox {
    pub class: usize,
    /// `[cx, cy, w, h]`, normalised.
    pub cxcywh: [f32; 4],
}

impl YoloBox {
    /// The box in pixels of a `width` x `height` image, clipped to it.
    pub fn xyxy(&self, width: u32, height: u32) -> [f32; 4] {
        let [cx, cy, w, h] = self.cxcywh;
        let (fw, fh) = (width as f32, height as f32);
        [
            ((cx - w / 2.0) * fw).clamp(0.0, fw),
            ((cy - h / 2.0) * fh).clamp(0.0, fh),
            ((cx + w / 2.0) * fw).clamp(0.0, fw),
            ((cy + h / 2.0) * fh).clamp(0.0, fh),
        ]
    }
}

const FIELDS: [&str; 5] = ["class", "cx", "cy", "w", "h"];

/// Parses and validates a label file's bytes; `path` names it in errors.
pub fn parse_labels(
    bytes: &[u8],
    path: &Path,
    num_classes: usize,
) -> Result<Vec<YoloBox>, DataError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        DataError::syntax(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    let mut boxes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let line_no = i + 1;
        let at = |field: &str| format!("line {line_no}, {field}");
        if fields.len() != 5 {
            let hint = if fields.len() > 5 && fields.len() % 2 == 1 {
                "; polygon (segment) labels are not supported"
            } else {
                ""
            };
            return Err(DataError::field(
                path,
                format!("line {line_no}"),
                format!(
                    "expected 5 fields (class cx cy w h), found {}{hint}",
                    fields.len()
                ),
            ));
        }
        let class = match fields[0].parse::<usize>() {
            Ok(c) if c < num_classes => c,
            Ok(c) => {
                return Err(DataError::field(
                    path,
                    at("class"),
                    format!("{c} is not below the number of classes ({num_classes})"),
                ))
            }
            Err(_) => {
                return Err(DataError::field(
                    path,
                    at("class"),
                    format!("expected a class index, found {}", quoted(fields[0])),
                ))
            }
        };
        let mut v = [0f32; 4];
        for k in 0..4 {
            let name = FIELDS[k + 1];
            let x = fields[k + 1]
                .parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| {
                    DataError::field(
                        path,
                        at(name),
                        format!("expected a number, found {}", quoted(fields[k + 1])),
                    )
                })?;
            let ok = if k < 2 {
                (0.0..=1.0).contains(&x)
            } else {
                x > 0.0 && x <= 1.0
            };
            if !ok {
                let range = if k < 2 { "[0, 1]" } else { "(0, 1]" };
                return Err(DataError::field(
                    path,
                    at(name),
                    format!(
                        "{x} is outside {range} (coordinates are normalised by the image size)"
                    ),
                ));
            }
            v[k] = x;
        }
        for (edge, value) in [
            ("cx - w/2", v[0] - v[2] / 2.0),
            ("cx + w/2", v[0] + v[2] / 2.0),
            ("cy - h/2", v[1] - v[3] / 2.0),
            ("cy + h/2", v[1] + v[3] / 2.0),
        ] {
            if !(-EDGE_TOLERANCE..=1.0 + EDGE_TOLERANCE).contains(&value) {
                return Err(DataError::field(
                    path,
                    format!("line {line_no}"),
                    format!("the box sticks out of the image: {edge} = {value}"),
                ));
            }
        }
        boxes.push(YoloBox { class, cxcywh: v });
    }
    Ok(boxes)
}

/// A YOLO dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct YoloSpec {
    /// The image directory (searched recursively).
    pub images: PathBuf,
    /// The label directory; default: `images` with its last `images` component replaced by
    /// `labels`.
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// Class names; default: read from `classes.txt` in the labels directory or its parent.
    #[serde(default)]
    pub classes: Option<Vec<String>>,
}

/// A YOLO dataset, indexed and validated.
#[derive(Debug)]
pub struct YoloSource {
    classes: Vec<String>,
    names: Vec<String>,
    images: Vec<PathBuf>,
    labels: Vec<Vec<YoloBox>>,
}

impl YoloSource {
    /// Lists the images and parses every label file.
    pub fn open(spec: &YoloSpec) -> Result<Self, DataError> {
        let labels_dir = match &spec.labels {
            Some(dir) => dir.clone(),
            None => default_labels_dir(&spec.images).ok_or_else(|| {
                DataError::layout(
                    &spec.images,
                    "cannot infer the labels directory (no `images` component to replace with \
                     `labels`); give it explicitly",
                )
            })?,
        };
        let classes = match &spec.classes {
            Some(c) => c.clone(),
            None => read_class_names(&labels_dir)?,
        };
        if classes.is_empty() {
            return Err(DataError::config("YOLO classes", "no class names"));
        }
        let files = list_images(&spec.images)?;
        if files.is_empty() {
            return Err(DataError::layout(&spec.images, "no images found"));
        }
        let labels = files
            .par_iter()
            .map(|rel| {
                let path = labels_dir.join(rel.with_extension("txt"));
                match std::fs::read(&path) {
                    Ok(bytes) => parse_labels(&bytes, &path, classes.len()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                    Err(e) => Err(DataError::io(&path, e)),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(YoloSource {
            classes,
            names: files
                .iter()
                .map(|f| f.with_extension("").to_string_lossy().into_owned())
                .collect(),
            images: files.iter().map(|f| spec.images.join(f)).collect(),
            labels,
        })
    }
}

/// `.../images/...` -> `.../labels/...` (the last `images` component).
fn default_labels_dir(images: &Path) -> Option<PathBuf> {
    let components: Vec<Component> = images.components().collect();
    let last = components.iter().rposition(|c| c.as_os_str() == "images")?;
    let mut out = PathBuf::new();
    for (i, c) in components.iter().enumerate() {
        if i == last {
            out.push("labels");
        } else {
            out.push(c.as_os_str());
        }
    }
    Some(out)
}

fn read_class_names(labels_dir: &Path) -> Result<Vec<String>, DataError> {
    let candidates = [
        Some(labels_dir.join("classes.txt")),
        labels_dir.parent().map(|p| p.join("classes.txt")),
    ];
    for path in candidates.into_iter().flatten() {
        if path.is_file() {
            let text = String::from_utf8_lossy(&read_file(&path)?).into_owned();
            return Ok(text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect());
        }
    }
    Err(DataError::layout(
        labels_dir,
        "no class names: give them in the spec or write classes.txt (one name per line) here \
         or in the parent directory",
    ))
}

impl SampleSource for YoloSource {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn segment_classes(&self) -> &[String] {
        &[]
    }

    fn image_path(&self, index: usize) -> Option<&Path> {
        self.images.get(index).map(PathBuf::as_path)
    }

    fn load(&self, index: usize) -> Result<Sample, DataError> {
        let path = self
            .images
            .get(index)
            .ok_or_else(|| out_of_range(index, self.len()))?;
        let image = read_rgb(path)?;
        let (w, h) = image.dimensions();
        Ok(Sample {
            id: index as u64 + 1,
            name: self.names[index].clone(),
            path: path.clone(),
            boxes: self.labels[index]
                .iter()
                .map(|b| BoxAnnotation::new(b.xyxy(w, h), b.class))
                .collect(),
            image,
            mask: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::{write_png_rgb, RgbImage};

    fn parse(text: &str) -> Result<Vec<YoloBox>, DataError> {
        parse_labels(text.as_bytes(), Path::new("labels/a.txt"), 3)
    }

    #[test]
    fn parses_lines_and_converts_to_pixels() {
        let boxes = parse("0 0.5 0.5 0.5 0.25\n\n2 0.1 0.9 0.2 0.2  \r\n").unwrap();
        assert_eq!(boxes.len(), 2);
        assert_eq!(boxes[0].xyxy(200, 100), [50.0, 37.5, 150.0, 62.5]);
        assert_eq!(boxes[1].class, 2);
        let b = boxes[1].xyxy(10, 10);
        assert!(
            (b[0] - 0.0).abs() < 1e-6 && (b[3] - 10.0).abs() < 1e-5,
            "{b:?}"
        );
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn malformed_lines_name_file_line_and_field() {
        let cases = [
            (
                "0 0.5 0.5 0.5",
                "labels/a.txt: line 1: expected 5 fields (class cx cy w h), found 4",
            ),
            (
                "0 0.1 0.1 0.2 0.1 0.2 0.2",
                "found 7; polygon (segment) labels are not supported",
            ),
            (
                "\n3 0.5 0.5 0.1 0.1",
                "labels/a.txt: line 2, class: 3 is not below the number of classes (3)",
            ),
            (
                "x 0.5 0.5 0.1 0.1",
                "line 1, class: expected a class index, found \"x\"",
            ),
            (
                "-1 0.5 0.5 0.1 0.1",
                "line 1, class: expected a class index, found \"-1\"",
            ),
            (
                "0 0.5 abc 0.1 0.1",
                "line 1, cy: expected a number, found \"abc\"",
            ),
            ("0 1.5 0.5 0.1 0.1", "line 1, cx: 1.5 is outside [0, 1]"),
            ("0 0.5 0.5 0 0.1", "line 1, w: 0 is outside (0, 1]"),
            (
                "0 0.5 0.5 0.1 nan",
                "line 1, h: expected a number, found \"nan\"",
            ),
            (
                "0 0.05 0.5 0.2 0.1",
                "line 1: the box sticks out of the image: cx - w/2 = -0.05",
            ),
        ];
        for (text, expected) in cases {
            let msg = parse(text).unwrap_err().to_string();
            assert!(msg.contains(expected), "expected {expected:?} in {msg:?}");
        }
        // Rounding within the tolerance is accepted.
        assert!(parse("0 0.0005 0.5 0.002 0.1").is_ok());
    }

    #[test]
    fn dataset_pairs_images_with_labels_and_reads_classes_txt() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("data/images/train");
        let labels = dir.path().join("data/labels/train");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&labels).unwrap();
        std::fs::write(dir.path().join("data/labels/classes.txt"), "cat\ndog\n").unwrap();
        write_png_rgb(&images.join("a.png"), &RgbImage::new(20, 10)).unwrap();
        write_png_rgb(&images.join("b.png"), &RgbImage::new(20, 10)).unwrap();
        std::fs::write(labels.join("a.txt"), "1 0.5 0.5 0.5 0.5\n").unwrap();
        let spec = YoloSpec {
            images: images.clone(),
            labels: None,
            classes: None,
        };
        let source = YoloSource::open(&spec).unwrap();
        assert_eq!(source.classes(), ["cat", "dog"]);
        let a = source.load(0).unwrap();
        assert_eq!(a.boxes, vec![BoxAnnotation::new([5.0, 2.5, 15.0, 7.5], 1)]);
        assert!(
            source.load(1).unwrap().boxes.is_empty(),
            "no label file: background"
        );

        std::fs::write(labels.join("b.txt"), "2 0.5 0.5 0.5 0.5\n").unwrap();
        let msg = YoloSource::open(&spec).unwrap_err().to_string();
        assert!(
            msg.contains("b.txt: line 1, class: 2 is not below"),
            "{msg}"
        );
    }
}
