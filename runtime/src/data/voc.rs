//! Pascal VOC: `Annotations/<id>.xml` (objects with boxes, `difficult`, `truncated`),
//! `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (palette masks) and the split lists
//! `ImageSets/{Main,Segmentation}/<split>.txt`.
//!
//! Choices: VOC box corners are 1-based inclusive pixel indices; densa's continuous
//! coordinates are `[xmin - 1, ymin - 1, xmax, ymax]` (detectron2 does the same), and a
//! `xmin`/`ymin` of 0 (written by some 0-based tools) becomes 0. The XML is parsed by
//! `roxmltree` (DTDs refused, so no entity expansion). `difficult` and `truncated` default to
//! 0 when absent and must otherwise be 0 or 1. A box must have `xmin <= xmax`,
//! `ymin <= ymax` and lie inside `<size>` when the file gives one. Images are
//! `JPEGImages/<id>.jpg` whatever `<filename>` says (as torchvision and detectron2 read VOC).

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use roxmltree::{Document, Node, ParsingOptions};
use serde::{Deserialize, Serialize};

use super::error::quoted;
use super::image::read_rgb;
use super::mask::{check_classes, read_mask_png};
use super::{out_of_range, read_file, BoxAnnotation, DataError, Sample, SampleSource};

/// The 20 Pascal VOC classes, in the standard order (mask value = index + 1).
pub const VOC_CLASSES: [&str; 20] = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// One VOC annotation file.
#[derive(Clone, Debug, PartialEq)]
pub struct VocAnnotation {
    /// `<filename>`, when present.
    pub filename: Option<String>,
    /// `<size>`: `(width, height)`, when present.
    pub size: Option<(u32, u32)>,
    pub objects: Vec<VocObject>,
}

/// One `<object>`.
#[derive(Clone, Debug, PartialEq)]
pub struct VocObject {
    /// `<name>`, trimmed.
    pub name: String,
    /// `<bndbox>` as written: `[xmin, ymin, xmax, ymax]`, 1-based inclusive pixel indices.
    pub bndbox: [f32; 4],
    pub difficult: bool,
    pub truncated: bool,
}

impl VocObject {
    /// The box in densa's continuous pixel coordinates: `[xmin - 1, ymin - 1, xmax, ymax]`,
    /// the first two clamped at 0.
    pub fn xyxy(&self) -> [f32; 4] {
        let [x0, y0, x1, y1] = self.bndbox;
        [(x0 - 1.0).max(0.0), (y0 - 1.0).max(0.0), x1, y1]
    }
}

/// Parses one VOC annotation file from bytes; `path` names it in errors.
pub fn parse_annotation(bytes: &[u8], path: &Path) -> Result<VocAnnotation, DataError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        DataError::syntax(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    let options = ParsingOptions {
        allow_dtd: false,
        ..ParsingOptions::default()
    };
    let doc = Document::parse_with_options(text, options)
        .map_err(|e| DataError::syntax(path, format!("malformed XML: {e}")))?;
    let cx = Cx { doc: &doc, path };
    let root = doc.root_element();
    if root.tag_name().name() != "annotation" {
        return Err(cx.field(
            root,
            format!("<{}>", root.tag_name().name()),
            "the root element must be <annotation>",
        ));
    }
    let filename = cx
        .unique_child(root, "filename", "")?
        .map(|n| n.text().unwrap_or("").trim().to_string());
    let size = match cx.unique_child(root, "size", "")? {
        Some(node) => {
            let w = cx.dimension(node, "width", "<size>/")?;
            let h = cx.dimension(node, "height", "<size>/")?;
            Some((w, h))
        }
        None => None,
    };
    let mut objects = Vec::new();
    for (i, node) in root
        .children()
        .filter(|n| n.has_tag_name("object"))
        .enumerate()
    {
        objects.push(cx.object(node, &format!("<object>[{}]/", i + 1), size)?);
    }
    Ok(VocAnnotation {
        filename,
        size,
        objects,
    })
}

/// Parsing context: the document (for line numbers) and the file name.
struct Cx<'a, 'input> {
    doc: &'a Document<'input>,
    path: &'a Path,
}

impl Cx<'_, '_> {
    fn field(&self, node: Node, field: String, problem: impl std::fmt::Display) -> DataError {
        let line = self.doc.text_pos_at(node.range().start).row;
        DataError::field(self.path, field, format!("{problem} (line {line})"))
    }

    /// The only child element called `name`; two of them is an error.
    fn unique_child<'a, 'input>(
        &self,
        parent: Node<'a, 'input>,
        name: &str,
        prefix: &str,
    ) -> Result<Option<Node<'a, 'input>>, DataError> {
        let mut found = parent.children().filter(|n| n.has_tag_name(name));
        let first = found.next();
        if let Some(second) = found.next() {
            return Err(self.field(
                second,
                format!("{prefix}<{name}>"),
                "appears more than once",
            ));
        }
        Ok(first)
    }

    fn required_child<'a, 'input>(
        &self,
        parent: Node<'a, 'input>,
        name: &str,
        prefix: &str,
    ) -> Result<Node<'a, 'input>, DataError> {
        self.unique_child(parent, name, prefix)?
            .ok_or_else(|| self.field(parent, format!("{prefix}<{name}>"), "missing"))
    }

    fn number(&self, parent: Node, name: &str, prefix: &str) -> Result<f32, DataError> {
        let node = self.required_child(parent, name, prefix)?;
        let text = node.text().unwrap_or("").trim();
        match text.parse::<f32>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(self.field(
                node,
                format!("{prefix}<{name}>"),
                format!("expected a number, found {}", quoted(text)),
            )),
        }
    }

    fn dimension(&self, parent: Node, name: &str, prefix: &str) -> Result<u32, DataError> {
        let node = self.required_child(parent, name, prefix)?;
        let text = node.text().unwrap_or("").trim();
        match text.parse::<u32>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(self.field(
                node,
                format!("{prefix}<{name}>"),
                format!("expected a positive integer, found {}", quoted(text)),
            )),
        }
    }

    fn flag(&self, parent: Node, name: &str, prefix: &str) -> Result<bool, DataError> {
        let Some(node) = self.unique_child(parent, name, prefix)? else {
            return Ok(false);
        };
        match node.text().unwrap_or("").trim() {
            "0" => Ok(false),
            "1" => Ok(true),
            other => Err(self.field(
                node,
                format!("{prefix}<{name}>"),
                format!("expected 0 or 1, found {}", quoted(other)),
            )),
        }
    }

    fn object(
        &self,
        node: Node,
        prefix: &str,
        size: Option<(u32, u32)>,
    ) -> Result<VocObject, DataError> {
        let name_node = self.required_child(node, "name", prefix)?;
        let name = name_node.text().unwrap_or("").trim().to_string();
        if name.is_empty() {
            return Err(self.field(name_node, format!("{prefix}<name>"), "empty"));
        }
        let bndbox = self.required_child(node, "bndbox", prefix)?;
        let p = format!("{prefix}<bndbox>/");
        let b = [
            self.number(bndbox, "xmin", &p)?,
            self.number(bndbox, "ymin", &p)?,
            self.number(bndbox, "xmax", &p)?,
            self.number(bndbox, "ymax", &p)?,
        ];
        for (axis, lo, hi, extent) in [
            ("x", b[0], b[2], size.map(|s| s.0)),
            ("y", b[1], b[3], size.map(|s| s.1)),
        ] {
            if lo < 0.0 {
                return Err(self.field(
                    bndbox,
                    format!("{p}<{axis}min>"),
                    format!("{lo} is negative"),
                ));
            }
            if lo > hi {
                return Err(self.field(
                    bndbox,
                    format!("{p}<{axis}max>"),
                    format!("{hi} is less than {axis}min {lo}"),
                ));
            }
            if let Some(extent) = extent.filter(|&e| hi > e as f32) {
                let dim = if axis == "x" { "width" } else { "height" };
                return Err(self.field(
                    bndbox,
                    format!("{p}<{axis}max>"),
                    format!("{hi} lies outside the image (<size>/<{dim}> is {extent})"),
                ));
            }
        }
        Ok(VocObject {
            name,
            bndbox: b,
            difficult: self.flag(node, "difficult", prefix)?,
            truncated: self.flag(node, "truncated", prefix)?,
        })
    }
}

/// What a VOC source reads: boxes (`ImageSets/Main`) or masks (`ImageSets/Segmentation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VocTask {
    #[default]
    Detection,
    Segmentation,
}

/// A VOC dataset (e.g. `VOCdevkit/VOC2012`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VocSpec {
    pub root: PathBuf,
    /// Split list name (`train`, `val`, `trainval`, `test`); without one, every annotation
    /// (detection) or mask (segmentation) file in the tree, sorted by id.
    #[serde(default)]
    pub split: Option<String>,
    #[serde(default)]
    pub task: VocTask,
    /// Class names (default: [`VOC_CLASSES`]); an object whose name is not listed is an error.
    #[serde(default)]
    pub classes: Option<Vec<String>>,
}

/// A VOC dataset, indexed and validated.
#[derive(Debug)]
pub struct VocSource {
    task: VocTask,
    classes: Vec<String>,
    segment_classes: Vec<String>,
    ids: Vec<String>,
    images: Vec<PathBuf>,
    /// Detection: the boxes of each image.
    boxes: Vec<Vec<BoxAnnotation>>,
    /// Segmentation: the mask file of each image.
    masks: Vec<PathBuf>,
}

impl VocSource {
    /// Reads the split list and (for detection) parses every annotation file.
    pub fn open(spec: &VocSpec) -> Result<Self, DataError> {
        let classes: Vec<String> = match &spec.classes {
            Some(c) => c.clone(),
            None => VOC_CLASSES.iter().map(|s| s.to_string()).collect(),
        };
        if classes.is_empty() || classes.len() > 254 {
            return Err(DataError::config(
                "VOC classes",
                format!(
                    "{} names given; between 1 and 254 are allowed",
                    classes.len()
                ),
            ));
        }
        let (list_dir, files_dir, ext) = match spec.task {
            VocTask::Detection => ("Main", "Annotations", "xml"),
            VocTask::Segmentation => ("Segmentation", "SegmentationClass", "png"),
        };
        let ids = match &spec.split {
            Some(split) => {
                let list = spec
                    .root
                    .join("ImageSets")
                    .join(list_dir)
                    .join(format!("{split}.txt"));
                read_id_list(&list)?
            }
            None => ids_in(&spec.root.join(files_dir), ext)?,
        };
        let images = ids
            .iter()
            .map(|id| spec.root.join("JPEGImages").join(format!("{id}.jpg")))
            .collect();
        let (boxes, masks, segment_classes) = match spec.task {
            VocTask::Detection => {
                let dir = spec.root.join("Annotations");
                let boxes = ids
                    .par_iter()
                    .map(|id| read_boxes(&dir.join(format!("{id}.xml")), &classes))
                    .collect::<Result<Vec<_>, _>>()?;
                (boxes, Vec::new(), Vec::new())
            }
            VocTask::Segmentation => {
                let dir = spec.root.join("SegmentationClass");
                let masks = ids.iter().map(|id| dir.join(format!("{id}.png"))).collect();
                let mut seg = vec!["background".to_string()];
                seg.extend(classes.iter().cloned());
                (vec![Vec::new(); ids.len()], masks, seg)
            }
        };
        Ok(VocSource {
            task: spec.task,
            classes,
            segment_classes,
            ids,
            images,
            boxes,
            masks,
        })
    }

    /// Image ids in order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }
}

/// Parses one annotation file and maps its object names to class indices.
pub fn read_boxes(path: &Path, classes: &[String]) -> Result<Vec<BoxAnnotation>, DataError> {
    let annotation = parse_annotation(&read_file(path)?, path)?;
    annotation
        .objects
        .iter()
        .enumerate()
        .map(|(i, object)| {
            let class = classes
                .iter()
                .position(|c| *c == object.name)
                .ok_or_else(|| {
                    DataError::field(
                        path,
                        format!("<object>[{}]/<name>", i + 1),
                        format!(
                            "unknown class {} (the classes are: {})",
                            quoted(&object.name),
                            classes.join(", ")
                        ),
                    )
                })?;
            Ok(BoxAnnotation {
                xyxy: object.xyxy(),
                class,
                difficult: object.difficult,
                truncated: object.truncated,
                iscrowd: false,
            })
        })
        .collect()
}

/// Ids listed one per line (the first word of each line: class-specific lists add a label).
fn read_id_list(path: &Path) -> Result<Vec<String>, DataError> {
    let bytes = read_file(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let ids: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        return Err(DataError::layout(path, "the split list is empty"));
    }
    Ok(ids)
}

/// Sorted stems of the files with extension `ext` in `dir`.
fn ids_in(dir: &Path, ext: &str) -> Result<Vec<String>, DataError> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case(ext))
        {
            if let Some(stem) = path.file_stem() {
                ids.push(stem.to_string_lossy().into_owned());
            }
        }
    }
    if ids.is_empty() {
        return Err(DataError::layout(dir, format!("no .{ext} files")));
    }
    ids.sort();
    Ok(ids)
}

impl SampleSource for VocSource {
    fn len(&self) -> usize {
        self.ids.len()
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
        let image = read_rgb(path)?;
        let mask = match self.task {
            VocTask::Detection => None,
            VocTask::Segmentation => {
                let mask_path = &self.masks[index];
                let mask = read_mask_png(mask_path)?;
                check_classes(&mask, mask_path, self.segment_classes.len(), &image, path)?;
                Some(mask)
            }
        };
        Ok(Sample {
            id: index as u64 + 1,
            name: self.ids[index].clone(),
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

    const GOOD: &str = r#"<annotation>
  <folder>VOC2012</folder>
  <filename>2007_000027.jpg</filename>
  <size><width>486</width><height>500</height><depth>3</depth></size>
  <object>
    <name>person</name>
    <truncated>0</truncated>
    <difficult>0</difficult>
    <bndbox><xmin>174</xmin><ymin>101</ymin><xmax>349</xmax><ymax>351</ymax></bndbox>
    <part><name>head</name><bndbox><xmin>169</xmin><ymin>104</ymin><xmax>209</xmax><ymax>146</ymax></bndbox></part>
  </object>
  <object>
    <name> dog </name>
    <truncated>1</truncated>
    <difficult>1</difficult>
    <bndbox><xmin>1</xmin><ymin>1.5</ymin><xmax>486</xmax><ymax>500</ymax></bndbox>
  </object>
</annotation>"#;

    fn parse(text: &str) -> Result<VocAnnotation, DataError> {
        parse_annotation(text.as_bytes(), Path::new("annotations.xml"))
    }

    #[test]
    fn parses_objects_flags_and_parts() {
        let a = parse(GOOD).unwrap();
        assert_eq!(a.filename.as_deref(), Some("2007_000027.jpg"));
        assert_eq!(a.size, Some((486, 500)));
        assert_eq!(a.objects.len(), 2, "the <part> is not an object");
        assert_eq!(a.objects[0].name, "person");
        assert_eq!(a.objects[0].bndbox, [174.0, 101.0, 349.0, 351.0]);
        assert_eq!(a.objects[0].xyxy(), [173.0, 100.0, 349.0, 351.0]);
        assert!(!a.objects[0].difficult && !a.objects[0].truncated);
        assert_eq!(a.objects[1].name, "dog");
        assert!(a.objects[1].difficult && a.objects[1].truncated);
        assert_eq!(a.objects[1].xyxy(), [0.0, 0.5, 486.0, 500.0]);
    }

    #[test]
    fn flags_default_to_zero() {
        let a = parse("<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>").unwrap();
        assert!(!a.objects[0].difficult && !a.objects[0].truncated);
        assert_eq!(a.size, None);
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn bad_number_names_file_object_and_field() {
        let text = GOOD.replace("<xmax>486</xmax>", "<xmax>abc</xmax>");
        let msg = error_of(&text);
        assert!(
            msg.starts_with(
                r#"annotations.xml: <object>[2]/<bndbox>/<xmax>: expected a number, found "abc" (line"#
            ),
            "{msg}"
        );
    }

    #[test]
    fn malformed_variants_are_clear_errors() {
        let cases: &[(&str, &str)] = &[
            (&GOOD[..GOOD.len() / 2], "malformed XML"),
            (
                "<notvoc/>",
                "<notvoc>: the root element must be <annotation>",
            ),
            (
                &GOOD.replace("<name>person</name>", ""),
                "<object>[1]/<name>: missing",
            ),
            (
                &GOOD.replace("<name>person</name>", "<name> </name>"),
                "<object>[1]/<name>: empty",
            ),
            (
                &GOOD.replace("<ymax>351</ymax>", ""),
                "<object>[1]/<bndbox>/<ymax>: missing",
            ),
            (
                &GOOD.replace("<xmax>349</xmax>", "<xmax>100</xmax>"),
                "<object>[1]/<bndbox>/<xmax>: 100 is less than xmin 174",
            ),
            (
                &GOOD.replace("<xmax>349</xmax>", "<xmax>NaN</xmax>"),
                "<object>[1]/<bndbox>/<xmax>: expected a number, found \"NaN\"",
            ),
            (
                &GOOD.replace("<ymax>351</ymax>", "<ymax>501</ymax>"),
                "<object>[1]/<bndbox>/<ymax>: 501 lies outside the image (<size>/<height> is 500)",
            ),
            (
                &GOOD.replace("<ymin>101</ymin>", "<ymin>-3</ymin>"),
                "<object>[1]/<bndbox>/<ymin>: -3 is negative",
            ),
            (
                &GOOD.replace("<difficult>1</difficult>", "<difficult>yes</difficult>"),
                "<object>[2]/<difficult>: expected 0 or 1, found \"yes\"",
            ),
            (
                &GOOD.replace("<width>486</width>", "<width>0</width>"),
                "<size>/<width>: expected a positive integer, found \"0\"",
            ),
            (
                &GOOD.replace(
                    "<truncated>0</truncated>",
                    "<truncated>0</truncated><truncated>1</truncated>",
                ),
                "<object>[1]/<truncated>: appears more than once",
            ),
            (
                "<!DOCTYPE a [<!ENTITY x \"y\">]><annotation>&x;</annotation>",
                "malformed XML",
            ),
        ];
        for (text, expected) in cases {
            let msg = error_of(text);
            assert!(msg.starts_with("annotations.xml: "), "{msg}");
            assert!(msg.contains(expected), "expected {expected:?} in {msg:?}");
        }
        let msg = parse_annotation(b"<annotation>\xff</annotation>", Path::new("a.xml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not UTF-8"), "{msg}");
    }

    #[test]
    fn unknown_class_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.xml");
        std::fs::write(&path, GOOD).unwrap();
        let classes = vec!["person".to_string(), "cat".to_string()];
        let msg = read_boxes(&path, &classes).unwrap_err().to_string();
        assert!(
            msg.contains(
                "<object>[2]/<name>: unknown class \"dog\" (the classes are: person, cat)"
            ),
            "{msg}"
        );
    }
}
