//! A COCO instances file as a [`SampleSource`]: boxes and `iscrowd` from the JSON, images from
//! a directory, and optionally semantic masks from PNGs beside them (as `densa synth` writes).
//!
//! Choices: samples come in the file's `images` order; class `i` is the `i`-th category by
//! ascending id (COCO's ids have gaps); boxes are `[x, y, x + w, y + h]`. Semantic mask PNGs
//! (optional) are named like their image with a `.png` extension, hold COCO category ids
//! (0 = background, 255 = ignore) and are remapped on load to `class + 1`, so
//! [`SampleSource::segment_classes`] is `background` followed by the classes. Validation here
//! is basic (syntax, unique ids, references between sections, finite boxes).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::coco::Dataset;
use super::image::read_rgb;
use super::mask::{check_classes, read_mask_png};
use super::{
    out_of_range, read_file, BoxAnnotation, DataError, Sample, SampleSource, IGNORE_INDEX,
};

/// Parses a COCO instances file from bytes with basic validation; `path` names it in errors.
pub fn parse_coco(bytes: &[u8], path: &Path) -> Result<Dataset, DataError> {
    let dataset: Dataset = serde_json::from_slice(bytes)
        .map_err(|e| DataError::syntax(path, format!("not a COCO instances file: {e}")))?;
    let mut image_ids = HashSet::new();
    for (i, image) in dataset.images.iter().enumerate() {
        if !image_ids.insert(image.id) {
            return Err(DataError::field(
                path,
                format!("images[{i}].id"),
                format!("{} is used by an earlier image", image.id),
            ));
        }
    }
    let mut category_ids = HashSet::new();
    for (i, category) in dataset.categories.iter().enumerate() {
        if !category_ids.insert(category.id) {
            return Err(DataError::field(
                path,
                format!("categories[{i}].id"),
                format!("{} is used by an earlier category", category.id),
            ));
        }
    }
    for (i, a) in dataset.annotations.iter().enumerate() {
        if !image_ids.contains(&a.image_id) {
            return Err(DataError::field(
                path,
                format!("annotations[{i}].image_id"),
                format!("{} is not the id of an image", a.image_id),
            ));
        }
        if !category_ids.contains(&a.category_id) {
            return Err(DataError::field(
                path,
                format!("annotations[{i}].category_id"),
                format!("{} is not the id of a category", a.category_id),
            ));
        }
        let [x, y, w, h] = a.bbox;
        if !(x.is_finite() && y.is_finite() && w.is_finite() && h.is_finite()) || w < 0.0 || h < 0.0
        {
            return Err(DataError::field(
                path,
                format!("annotations[{i}].bbox"),
                format!(
                    "{:?} is not [x, y, width, height] with finite values and width, height >= 0",
                    a.bbox
                ),
            ));
        }
    }
    Ok(dataset)
}

/// A COCO dataset on disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CocoSpec {
    /// The instances JSON file.
    pub annotations: PathBuf,
    /// The directory `file_name`s are relative to.
    pub images: PathBuf,
    /// Optional directory of semantic mask PNGs (category ids, 0 = background).
    #[serde(default)]
    pub masks: Option<PathBuf>,
}

/// A COCO dataset, parsed and validated.
#[derive(Debug)]
pub struct CocoSource {
    dataset: Dataset,
    classes: Vec<String>,
    segment_classes: Vec<String>,
    images: Vec<PathBuf>,
    masks: Option<Vec<PathBuf>>,
    /// Mask value (category id) -> class + 1; 255 stays 255; `None` = not a category id.
    mask_lut: [Option<u8>; 256],
    boxes: Vec<Vec<BoxAnnotation>>,
}

impl CocoSource {
    /// Parses and validates the JSON; checks mask files exist when a mask directory is given.
    pub fn open(spec: &CocoSpec) -> Result<Self, DataError> {
        let dataset = parse_coco(&read_file(&spec.annotations)?, &spec.annotations)?;
        Self::from_dataset(dataset, spec)
    }

    /// A source over an already parsed dataset (`spec.annotations` names it in errors).
    pub fn from_dataset(dataset: Dataset, spec: &CocoSpec) -> Result<Self, DataError> {
        let mut categories: Vec<_> = dataset.categories.iter().collect();
        categories.sort_by_key(|c| c.id);
        let class_of: HashMap<u64, usize> = categories
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id, i))
            .collect();
        let classes: Vec<String> = categories.iter().map(|c| c.name.clone()).collect();
        let position: HashMap<u64, usize> = dataset
            .images
            .iter()
            .enumerate()
            .map(|(i, im)| (im.id, i))
            .collect();
        let mut boxes = vec![Vec::new(); dataset.images.len()];
        for a in &dataset.annotations {
            // parse_coco checked both references; a dataset built in code may not have been.
            let (Some(&i), Some(&class)) =
                (position.get(&a.image_id), class_of.get(&a.category_id))
            else {
                return Err(DataError::field(
                    &spec.annotations,
                    format!("annotations (id {})", a.id),
                    "refers to a missing image or category",
                ));
            };
            let [x, y, w, h] = a.bbox;
            boxes[i].push(BoxAnnotation {
                xyxy: [x as f32, y as f32, (x + w) as f32, (y + h) as f32],
                class,
                difficult: false,
                truncated: false,
                iscrowd: a.iscrowd != 0,
            });
        }
        let images: Vec<PathBuf> = dataset
            .images
            .iter()
            .map(|im| spec.images.join(&im.file_name))
            .collect();
        let mut mask_lut = [None; 256];
        let (masks, segment_classes) = match &spec.masks {
            None => (None, Vec::new()),
            Some(dir) => {
                mask_lut[0] = Some(0);
                mask_lut[IGNORE_INDEX as usize] = Some(IGNORE_INDEX);
                for (i, c) in categories.iter().enumerate() {
                    if c.id == 0 || c.id >= IGNORE_INDEX as u64 {
                        return Err(DataError::field(
                            &spec.annotations,
                            format!("categories (id {})", c.id),
                            "category ids must be 1..=254 to be stored in mask PNGs",
                        ));
                    }
                    mask_lut[c.id as usize] = Some(i as u8 + 1);
                }
                let masks = dataset
                    .images
                    .iter()
                    .map(|im| {
                        let path = dir.join(Path::new(&im.file_name).with_extension("png"));
                        if path.is_file() {
                            Ok(path)
                        } else {
                            Err(DataError::layout(
                                &path,
                                format!("missing: the mask of image {}", im.file_name),
                            ))
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut seg = vec!["background".to_string()];
                seg.extend(classes.iter().cloned());
                (Some(masks), seg)
            }
        };
        Ok(CocoSource {
            dataset,
            classes,
            segment_classes,
            images,
            masks,
            mask_lut,
            boxes,
        })
    }

    /// The parsed file.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }
}

impl SampleSource for CocoSource {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn segment_classes(&self) -> &[String] {
        &self.segment_classes
    }

    fn image_path(&self, index: usize) -> Option<&Path> {
        self.images.get(index).map(PathBuf::as_path)
    }

    fn load(&self, index: usize) -> Result<Sample, DataError> {
        let path = self
            .images
            .get(index)
            .ok_or_else(|| out_of_range(index, self.len()))?;
        let entry = &self.dataset.images[index];
        let image = read_rgb(path)?;
        if image.dimensions() != (entry.width, entry.height) {
            return Err(DataError::Image {
                path: path.clone(),
                problem: format!(
                    "{}x{}, but the annotation file says {}x{}",
                    image.width(),
                    image.height(),
                    entry.width,
                    entry.height
                ),
            });
        }
        let mask = match &self.masks {
            None => None,
            Some(masks) => {
                let mask_path = &masks[index];
                let mut mask = read_mask_png(mask_path)?;
                for (x, y, p) in mask.enumerate_pixels_mut() {
                    p.0[0] = self.mask_lut[p.0[0] as usize].ok_or_else(|| {
                        DataError::field(
                            mask_path,
                            format!("pixel ({x}, {y})"),
                            format!("{} is not a category id, 0 (background) or 255", p.0[0]),
                        )
                    })?;
                }
                check_classes(&mask, mask_path, self.segment_classes.len(), &image, path)?;
                Some(mask)
            }
        };
        Ok(Sample {
            id: entry.id,
            name: Path::new(&entry.file_name)
                .with_extension("")
                .to_string_lossy()
                .into_owned(),
            path: path.clone(),
            image,
            boxes: self.boxes[index].clone(),
            mask,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::{write_png_rgb, RgbImage};

    const GOOD: &str = r#"{
      "images": [{"id": 7, "file_name": "a.png", "width": 8, "height": 4},
                 {"id": 3, "file_name": "sub/b.png", "width": 8, "height": 4}],
      "annotations": [
        {"id": 1, "image_id": 7, "category_id": 5, "bbox": [1, 0, 2, 3], "area": 6, "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 8, 4], "area": 32, "iscrowd": 1},
        {"id": 3, "image_id": 3, "category_id": 5, "bbox": [4.5, 1, 1, 1]}
      ],
      "categories": [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}]
    }"#;

    fn err(text: &str) -> String {
        parse_coco(text.as_bytes(), Path::new("instances.json"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn reads_boxes_classes_and_crowd_flags() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("img/sub")).unwrap();
        write_png_rgb(&dir.path().join("img/a.png"), &RgbImage::new(8, 4)).unwrap();
        write_png_rgb(&dir.path().join("img/sub/b.png"), &RgbImage::new(8, 4)).unwrap();
        std::fs::write(dir.path().join("ann.json"), GOOD).unwrap();
        let spec = CocoSpec {
            annotations: dir.path().join("ann.json"),
            images: dir.path().join("img"),
            masks: None,
        };
        let source = CocoSource::open(&spec).unwrap();
        assert_eq!(source.classes(), ["dog", "cat"], "sorted by category id");
        let a = source.load(0).unwrap();
        assert_eq!((a.id, a.name.as_str()), (7, "a"));
        assert_eq!(a.boxes[0].xyxy, [1.0, 0.0, 3.0, 3.0]);
        assert_eq!(a.boxes[0].class, 1);
        assert!(!a.boxes[0].iscrowd && a.boxes[1].iscrowd);
        let b = source.load(1).unwrap();
        assert_eq!((b.id, b.boxes.len()), (3, 1));

        // An image whose size disagrees with the file is a bad image.
        write_png_rgb(&dir.path().join("img/a.png"), &RgbImage::new(9, 4)).unwrap();
        let e = source.load(0).unwrap_err();
        assert!(
            e.is_bad_image() && e.to_string().contains("the annotation file says 8x4"),
            "{e}"
        );
    }

    #[test]
    fn malformed_files_are_clear_errors() {
        let cases = [
            (
                &GOOD[..GOOD.len() / 2],
                "instances.json: not a COCO instances file: EOF while parsing",
            ),
            ("[]", "instances.json: not a COCO instances file: invalid"),
            (
                &GOOD.replace("\"id\": 3, \"file_name\"", "\"id\": 7, \"file_name\""),
                "images[1].id: 7 is used by an earlier image",
            ),
            (
                &GOOD.replace("\"image_id\": 3", "\"image_id\": 4"),
                "annotations[2].image_id: 4 is not the id of an image",
            ),
            (
                &GOOD.replace("\"category_id\": 2", "\"category_id\": 9"),
                "annotations[1].category_id: 9 is not the id of a category",
            ),
            (
                &GOOD.replace("[1, 0, 2, 3]", "[1, 0, -2, 3]"),
                "annotations[0].bbox: [1.0, 0.0, -2.0, 3.0] is not",
            ),
            (
                &GOOD.replace(
                    "{\"id\": 2, \"name\": \"dog\"}",
                    "{\"id\": 5, \"name\": \"dog\"}",
                ),
                "categories[1].id: 5 is used by an earlier category",
            ),
        ];
        for (text, expected) in cases {
            let msg = err(text);
            assert!(msg.contains(expected), "expected {expected:?} in {msg:?}");
        }
    }
}
