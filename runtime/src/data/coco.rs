//! COCO "instances" JSON: the types of the file (images, annotations, categories) and of the
//! results format (detections), shared by the readers, the synthetic scene writer and the
//! evaluator.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::mask::Rle;

/// A COCO instances file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Dataset {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub licenses: Vec<serde_json::Value>,
    pub images: Vec<Image>,
    #[serde(default)]
    pub annotations: Vec<Annotation>,
    #[serde(default)]
    pub categories: Vec<Category>,
}

/// One image entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Image {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
}

/// One object annotation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Annotation {
    pub id: u64,
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, width, height]` in pixels, top-left origin.
    pub bbox: [f64; 4],
    #[serde(default)]
    pub area: f64,
    /// 0 or 1.
    #[serde(default)]
    pub iscrowd: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<Segmentation>,
}

/// An instance mask as COCO writes it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Segmentation {
    /// One or more polygons, each `[x1, y1, x2, y2, ...]`.
    Polygons(Vec<Vec<f64>>),
    /// Run-length encoding (column-major runs starting with background), `counts` either a
    /// list (uncompressed) or COCO's compressed string.
    Rle { size: [u32; 2], counts: RleCounts },
}

/// RLE counts: uncompressed list or compressed string.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RleCounts {
    Uncompressed(Vec<u32>),
    Compressed(String),
}

/// One category.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Category {
    pub id: u64,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supercategory: Option<String>,
}

/// One detection in the COCO results format.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Detection {
    pub image_id: u64,
    pub category_id: u64,
    pub bbox: [f64; 4],
    pub score: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<Segmentation>,
    /// densa adds the image's file name when serving; ignored by evaluators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Reading and validating files.
//
// `load_dataset` and `load_results` parse with typed serde (fast); only when that fails is the
// file parsed again with the JSON path tracked, so an error names the field
// (`annotations[17].bbox`) at no cost to good files. Checks that serde cannot make (ids that
// must exist, sizes that must agree) follow, with the same field names.

/// What is wrong with a COCO file (or with in-memory detections).
#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not JSON, or JSON of the wrong shape; `field` is the JSON path.
    #[error("{path}: {field}: {message}")]
    Json {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// Well-formed JSON whose content is inconsistent; `origin` is the file (or "detections").
    #[error("{origin}: {field}: {problem}")]
    Invalid {
        origin: String,
        field: String,
        problem: String,
    },
}

fn invalid(origin: &str, field: String, problem: impl Into<String>) -> CocoError {
    CocoError::Invalid {
        origin: origin.to_string(),
        field,
        problem: problem.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CocoError> {
    std::fs::read(path).map_err(|source| CocoError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses `bytes` as `T`; on failure, parses again tracking the JSON path for the message.
/// `root` names the top level in paths (`detections` gives `detections[3].bbox`).
fn parse<T: serde::de::DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
    root: &str,
) -> Result<T, CocoError> {
    match serde_json::from_slice(bytes) {
        Ok(v) => Ok(v),
        Err(first) => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let (field, message) = match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Err(e) => (e.path().to_string(), e.into_inner().to_string()),
                Ok(_) => (".".to_string(), first.to_string()),
            };
            // serde_path_to_error writes `?` for a position it could not name (e.g. the end of
            // a truncated file).
            let field = field.trim_end_matches(".?").trim_end_matches('?');
            let field = match field {
                "." | "" if root.is_empty() => "(top level)".to_string(),
                "." | "" => root.to_string(),
                f if f.starts_with('[') => format!("{root}{f}"),
                f if root.is_empty() => f.to_string(),
                f => format!("{root}.{f}"),
            };
            let message = message
                .replace(
                    "data did not match any variant of untagged enum Segmentation",
                    "expected a list of polygons [[x1, y1, x2, y2, ...], ...] or an RLE object \
                 {\"size\": [h, w], \"counts\": ...}",
                )
                .replace(
                    "struct RawDataset with 5 elements",
                    "an object with images, annotations and categories",
                );
            Err(CocoError::Json {
                path: path.to_path_buf(),
                field,
                message,
            })
        }
    }
}

#[derive(Deserialize)]
struct RawDataset {
    #[serde(default)]
    info: Option<serde_json::Value>,
    #[serde(default)]
    licenses: Vec<serde_json::Value>,
    images: Vec<Image>,
    #[serde(default)]
    annotations: Vec<RawAnnotation>,
    #[serde(default)]
    categories: Vec<Category>,
}

#[derive(Deserialize)]
struct RawAnnotation {
    id: u64,
    image_id: u64,
    category_id: u64,
    bbox: Vec<f64>,
    #[serde(default)]
    area: Option<f64>,
    #[serde(default)]
    iscrowd: u8,
    #[serde(default)]
    segmentation: Option<Segmentation>,
}

/// A box `[x, y, w, h]`: 4 finite numbers, `w, h >= 0`.
fn check_box(origin: &str, field: impl Fn() -> String, b: &[f64]) -> Result<[f64; 4], CocoError> {
    let bb: [f64; 4] = b.try_into().map_err(|_| {
        invalid(
            origin,
            field(),
            format!("expected 4 numbers, got {}", b.len()),
        )
    })?;
    if bb.iter().any(|v| !v.is_finite()) || bb[2] < 0.0 || bb[3] < 0.0 {
        return Err(invalid(
            origin,
            field(),
            format!("{bb:?} is not a box [x, y, w, h] with w, h >= 0"),
        ));
    }
    Ok(bb)
}

/// The mask of `seg` on `image`, with an RLE's `size` checked against the image's.
fn image_mask(
    origin: &str,
    field: impl Fn() -> String,
    seg: &Segmentation,
    image: &Image,
) -> Result<Rle, CocoError> {
    let rle = Rle::from_segmentation(seg, image.height, image.width)
        .map_err(|e| invalid(origin, field(), e.to_string()))?;
    if (rle.height, rle.width) != (image.height, image.width) {
        return Err(invalid(
            origin,
            field(),
            format!(
                "RLE size [{}, {}] differs from image {}'s [height, width] = [{}, {}]",
                rle.height, rle.width, image.id, image.height, image.width
            ),
        ));
    }
    Ok(rle)
}

/// Reads and checks a COCO instances file: image, annotation and category ids are unique,
/// every annotation's `image_id` and `category_id` exist, boxes have 4 numbers with `w, h >=
/// 0`, images have a positive size.
///
/// An annotation without `area` (pycocotools' evaluation needs one and fails) gets the area of
/// its `segmentation` mask when it has one, else of its box, as detectron2's COCO converter
/// computes it. A key `ignore` is not read: pycocotools' `COCOeval` overwrites it with
/// `iscrowd` too.
pub fn load_dataset(path: impl AsRef<Path>) -> Result<Dataset, CocoError> {
    let path = path.as_ref();
    parse_dataset(&read(path)?, path)
}

/// [`load_dataset`] on bytes already read; `path` names the file in errors.
pub fn parse_dataset(bytes: &[u8], path: &Path) -> Result<Dataset, CocoError> {
    let raw: RawDataset = parse(path, bytes, "")?;
    let origin = path.display().to_string();
    let origin = origin.as_str();

    let mut images: HashMap<u64, usize> = HashMap::with_capacity(raw.images.len());
    for (i, im) in raw.images.iter().enumerate() {
        if let Some(first) = images.insert(im.id, i) {
            return Err(invalid(
                origin,
                format!("images[{i}].id"),
                format!("{} is already the id of images[{first}]", im.id),
            ));
        }
        if im.width == 0 || im.height == 0 {
            return Err(invalid(
                origin,
                format!("images[{i}]"),
                format!("size {}x{} is empty", im.width, im.height),
            ));
        }
    }
    let mut categories = HashSet::with_capacity(raw.categories.len());
    for (i, c) in raw.categories.iter().enumerate() {
        if !categories.insert(c.id) {
            return Err(invalid(
                origin,
                format!("categories[{i}].id"),
                format!("{} appears twice", c.id),
            ));
        }
    }
    let mut ann_ids = HashSet::with_capacity(raw.annotations.len());
    let mut annotations = Vec::with_capacity(raw.annotations.len());
    for (i, a) in raw.annotations.into_iter().enumerate() {
        if !ann_ids.insert(a.id) {
            return Err(invalid(
                origin,
                format!("annotations[{i}].id"),
                format!("{} appears twice", a.id),
            ));
        }
        let Some(&image) = images.get(&a.image_id) else {
            return Err(invalid(
                origin,
                format!("annotations[{i}].image_id"),
                format!("{} is not in images", a.image_id),
            ));
        };
        if !categories.contains(&a.category_id) {
            return Err(invalid(
                origin,
                format!("annotations[{i}].category_id"),
                format!("{} is not in categories", a.category_id),
            ));
        }
        let bbox = check_box(origin, || format!("annotations[{i}].bbox"), &a.bbox)?;
        if a.iscrowd > 1 {
            return Err(invalid(
                origin,
                format!("annotations[{i}].iscrowd"),
                format!("{} is not 0 or 1", a.iscrowd),
            ));
        }
        let area = match (a.area, &a.segmentation) {
            (Some(area), _) if area.is_finite() && area >= 0.0 => area,
            (Some(area), _) => {
                return Err(invalid(
                    origin,
                    format!("annotations[{i}].area"),
                    format!("{area} is not a finite number >= 0"),
                ))
            }
            (None, Some(seg)) => image_mask(
                origin,
                || format!("annotations[{i}].segmentation"),
                seg,
                &raw.images[image],
            )?
            .area() as f64,
            (None, None) => bbox[2] * bbox[3],
        };
        annotations.push(Annotation {
            id: a.id,
            image_id: a.image_id,
            category_id: a.category_id,
            bbox,
            area,
            iscrowd: a.iscrowd,
            segmentation: a.segmentation,
        });
    }
    Ok(Dataset {
        info: raw.info,
        licenses: raw.licenses,
        images: raw.images,
        annotations,
        categories: raw.categories,
    })
}

/// Detections checked against a ground truth, ready for evaluation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Results {
    /// In file order (pycocotools numbers them 1, 2, ... in this order; ties in score keep it).
    pub detections: Vec<Detection>,
    /// Each detection's area for COCO's area ranges, as pycocotools' `loadRes` sets it: the box
    /// `w * h` when the first detection has a box, else the mask's pixel count.
    pub areas: Vec<f64>,
}

#[derive(Deserialize)]
struct RawDetection {
    image_id: u64,
    category_id: u64,
    #[serde(default)]
    bbox: Option<Vec<f64>>,
    score: f64,
    #[serde(default)]
    segmentation: Option<Segmentation>,
    #[serde(default)]
    file_name: Option<String>,
}

/// Reads detections in the COCO results format (a JSON array of `{image_id, category_id,
/// bbox, score[, segmentation]}`) and checks them against `gt` (see [`check_results`]).
pub fn load_results(path: impl AsRef<Path>, gt: &Dataset) -> Result<Results, CocoError> {
    let path = path.as_ref();
    let bytes = read(path)?;
    let raw: Vec<RawDetection> = parse(path, &bytes, "detections").map_err(|e| match e {
        CocoError::Json {
            path,
            field,
            message,
        } if field == "detections"
            && bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') =>
        {
            CocoError::Json {
                path,
                field,
                message: format!(
                    "{message}: the COCO results format is a JSON array of detections \
                     [{{\"image_id\", \"category_id\", \"bbox\", \"score\"}}, ...], not an \
                     object (is this a ground-truth file?)"
                ),
            }
        }
        e => e,
    })?;
    check_raw_results(&path.display().to_string(), raw, gt)
}

/// Checks in-memory detections against `gt` (as [`load_results`] does for a file).
pub fn check_results(detections: Vec<Detection>, gt: &Dataset) -> Result<Results, CocoError> {
    let raw = detections
        .into_iter()
        .map(|d| RawDetection {
            image_id: d.image_id,
            category_id: d.category_id,
            bbox: Some(d.bbox.to_vec()),
            score: d.score,
            segmentation: d.segmentation,
            file_name: d.file_name,
        })
        .collect();
    check_raw_results("detections", raw, gt)
}

/// pycocotools' `loadRes` rules: every `image_id` must be a ground-truth image ("Results do not
/// correspond to current coco set"); when the first detection has a box, every detection needs
/// one and areas are box areas; otherwise every detection needs a `segmentation`, areas are mask
/// areas and missing boxes are the masks' bounding boxes. Unknown category ids are kept (the
/// evaluation ignores them, as pycocotools does).
fn check_raw_results(
    origin: &str,
    raw: Vec<RawDetection>,
    gt: &Dataset,
) -> Result<Results, CocoError> {
    let images: HashMap<u64, &Image> = gt.images.iter().map(|im| (im.id, im)).collect();
    let boxes_given = raw
        .first()
        .is_some_and(|d| d.bbox.as_ref().is_some_and(|b| !b.is_empty()));
    let mut detections = Vec::with_capacity(raw.len());
    let mut areas = Vec::with_capacity(raw.len());
    for (i, d) in raw.into_iter().enumerate() {
        let Some(image) = images.get(&d.image_id) else {
            return Err(invalid(
                origin,
                format!("detections[{i}].image_id"),
                format!(
                    "{} is not an image of the ground truth (pycocotools: \"Results do not \
                     correspond to current coco set\")",
                    d.image_id
                ),
            ));
        };
        if !d.score.is_finite() {
            return Err(invalid(
                origin,
                format!("detections[{i}].score"),
                format!("{} is not a finite number", d.score),
            ));
        }
        let field = || format!("detections[{i}].bbox");
        let (bbox, area) = if boxes_given {
            let Some(b) = d.bbox.as_deref() else {
                return Err(invalid(
                    origin,
                    field(),
                    "missing, but detections[0] has one (all detections need a box)",
                ));
            };
            let bb = check_box(origin, field, b)?;
            (bb, bb[2] * bb[3])
        } else {
            let Some(seg) = &d.segmentation else {
                return Err(invalid(
                    origin,
                    format!("detections[{i}]"),
                    "has neither a bbox nor a segmentation",
                ));
            };
            let rle = image_mask(
                origin,
                || format!("detections[{i}].segmentation"),
                seg,
                image,
            )?;
            let bb = match d.bbox.as_deref() {
                Some(b) if !b.is_empty() => check_box(origin, field, b)?,
                _ => rle.bbox(),
            };
            (bb, rle.area() as f64)
        };
        areas.push(area);
        detections.push(Detection {
            image_id: d.image_id,
            category_id: d.category_id,
            bbox,
            score: d.score,
            segmentation: d.segmentation,
            file_name: d.file_name,
        });
    }
    Ok(Results { detections, areas })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const GT: &str = r#"{
        "images": [{"id": 7, "file_name": "a.jpg", "width": 10, "height": 8}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 4, 2], "area": 5.5},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 4, 2]},
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [0, 0, 4, 2],
             "segmentation": {"size": [8, 10], "counts": [2, 3, 75]}}
        ]}"#;

    #[test]
    fn missing_areas_come_from_the_mask_or_the_box() {
        let dir = tempfile::tempdir().unwrap();
        let gt = load_dataset(write(dir.path(), "gt.json", GT)).unwrap();
        let areas: Vec<f64> = gt.annotations.iter().map(|a| a.area).collect();
        assert_eq!(areas, vec![5.5, 8.0, 3.0]);
    }

    #[test]
    fn mask_only_results_get_mask_boxes_and_areas() {
        let dir = tempfile::tempdir().unwrap();
        let gt = load_dataset(write(dir.path(), "gt.json", GT)).unwrap();
        // Column-major runs: 10 background, 5 foreground (column 1, rows 2..7), rest background.
        let dt = r#"[{"image_id": 7, "category_id": 1, "score": 0.5,
                      "segmentation": {"size": [8, 10], "counts": [10, 5, 65]}}]"#;
        let r = load_results(write(dir.path(), "dt.json", dt), &gt).unwrap();
        assert_eq!(r.detections[0].bbox, [1.0, 2.0, 1.0, 5.0]);
        assert_eq!(r.areas, vec![5.0]);
        // With boxes (pycocotools decides by the first detection), areas are box areas.
        let dt = r#"[{"image_id": 7, "category_id": 1, "score": 0.5, "bbox": [1, 1, 3, 3],
                      "segmentation": {"size": [8, 10], "counts": [10, 5, 65]}}]"#;
        let r = load_results(write(dir.path(), "dt2.json", dt), &gt).unwrap();
        assert_eq!(r.areas, vec![9.0]);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let bad = GT.replace(
            r#""bbox": [0, 0, 4, 2], "area": 5.5"#,
            r#""bbox": [0, 0, 4, 2], "area": "x""#,
        );
        let path = write(dir.path(), "bad.json", &bad);
        let e = load_dataset(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}: annotations[0].area: invalid type: string",
                path.display()
            )),
            "{e}"
        );
        let gt = load_dataset(write(dir.path(), "gt.json", GT)).unwrap();
        let e = check_results(
            vec![Detection {
                image_id: 8,
                category_id: 1,
                bbox: [0.0; 4],
                score: 1.0,
                segmentation: None,
                file_name: None,
            }],
            &gt,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("detections: detections[0].image_id: 8 is not an image"),
            "{e}"
        );
    }
}
