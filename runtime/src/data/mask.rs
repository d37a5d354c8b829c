//! Semantic masks as PNG: one class index per pixel, 255 = ignore.
//!
//! A mask PNG is a palette image (the pixel is the palette index, as in VOC's
//! `SegmentationClass`; the palette colours only help people look at it) or a gray image (the
//! pixel is the value; 16-bit gray must stay below 256). Colour-coded RGB masks are refused:
//! their colour-to-class table is not in the file.
//!
//! Conventions:
//! - **plain**: values are indices into the class names given (which name the background
//!   class, if any), 255 = ignore.
//! - **VOC**: plain, with names `background` + the 20 VOC classes; 255 marks object
//!   boundaries and is ignored.
//! - **Cityscapes**: `*_gtFine_labelIds.png` hold label ids 0..=33, mapped to the 19 train ids
//!   of the benchmark by [`CITYSCAPES_TRAIN_IDS`] (cityscapesScripts' `labels.py`); the 15
//!   label ids that are not evaluated map to 255. Any other value is an error (the file is
//!   probably a `*_trainIds.png` or a colour mask). Images are
//!   `leftImg8bit/<split>/<city>/<name>_leftImg8bit.png` and masks
//!   `gtFine/<split>/<city>/<name>_gtFine_labelIds.png`: point `images` at
//!   `leftImg8bit/<split>` and `masks` at `gtFine/<split>`.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::folder::list_images;
use super::image::{read_rgb, RgbImage};
use super::voc::VOC_CLASSES;
use super::{out_of_range, read_file, DataError, Sample, SampleSource, SemanticMask, IGNORE_INDEX};

/// Cityscapes label id (index) -> train id, 255 = not evaluated. From cityscapesScripts'
/// `labels.py`: road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2, wall 12 -> 3, fence 13 -> 4,
/// pole 17 -> 5, traffic light 19 -> 6, traffic sign 20 -> 7, vegetation 21 -> 8,
/// terrain 22 -> 9, sky 23 -> 10, person 24 -> 11, rider 25 -> 12, car 26 -> 13,
/// truck 27 -> 14, bus 28 -> 15, train 31 -> 16, motorcycle 32 -> 17, bicycle 33 -> 18.
pub const CITYSCAPES_TRAIN_IDS: [u8; 34] = [
    255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9,
    10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18,
];

/// The 19 Cityscapes train-id classes.
pub const CITYSCAPES_CLASSES: [&str; 19] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
];

/// Decodes a palette or gray PNG mask to its raw values; `path` names it in errors.
pub fn decode_mask_png(bytes: &[u8], path: &Path) -> Result<SemanticMask, DataError> {
    let bad = |problem: String| DataError::syntax(path, problem);
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|e| bad(format!("not a readable PNG: {e}")))?;
    let (width, height, color, depth) = {
        let info = reader.info();
        (info.width, info.height, info.color_type, info.bit_depth)
    };
    match color {
        png::ColorType::Indexed | png::ColorType::Grayscale => {}
        other => {
            return Err(bad(format!(
                "a mask must be a palette or grayscale PNG holding class indices, found {other:?} \
                 (colour-coded masks need converting to indices first)"
            )))
        }
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad(format!("{width}x{height} is too large")))?;
    let mut buf = vec![0u8; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(format!("corrupt PNG data: {e}")))?;
    let bits = depth as usize;
    let (w, h) = (width as usize, height as usize);
    let mut values = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = &buf[y * frame.line_size..(y + 1) * frame.line_size];
        for x in 0..w {
            let v = match bits {
                8 => row[x],
                16 => {
                    let v = u16::from_be_bytes([row[2 * x], row[2 * x + 1]]);
                    u8::try_from(v).map_err(|_| {
                        DataError::field(
                            path,
                            format!("pixel ({x}, {y})"),
                            format!("value {v} in a 16-bit mask; class indices must be below 256"),
                        )
                    })?
                }
                _ => {
                    // 1, 2 or 4 bits per pixel, most significant first.
                    let per_byte = 8 / bits;
                    let byte = row[x / per_byte];
                    let shift = 8 - bits * (x % per_byte + 1);
                    (byte >> shift) & ((1u8 << bits) - 1)
                }
            };
            values.push(v);
        }
    }
    SemanticMask::from_raw(width, height, values)
        .ok_or_else(|| bad("pixel buffer does not match the size".into()))
}

/// Reads a mask PNG file (see [`decode_mask_png`]).
pub fn read_mask_png(path: &Path) -> Result<SemanticMask, DataError> {
    decode_mask_png(&read_file(path)?, path)
}

/// Maps a Cityscapes `labelIds` mask to train ids in place.
pub fn cityscapes_to_train_ids(mask: &mut SemanticMask, path: &Path) -> Result<(), DataError> {
    for (x, y, p) in mask.enumerate_pixels_mut() {
        let id = p.0[0];
        p.0[0] = *CITYSCAPES_TRAIN_IDS.get(id as usize).ok_or_else(|| {
            DataError::field(
                path,
                format!("pixel ({x}, {y})"),
                format!(
                    "{id} is not a Cityscapes label id (0..=33); is this a *_gtFine_labelIds.png?"
                ),
            )
        })?;
    }
    Ok(())
}

/// Checks that a mask matches its image's size and holds only values below `classes` or 255.
pub fn check_classes(
    mask: &SemanticMask,
    mask_path: &Path,
    classes: usize,
    image: &RgbImage,
    image_path: &Path,
) -> Result<(), DataError> {
    if mask.dimensions() != image.dimensions() {
        return Err(DataError::field(
            mask_path,
            "size",
            format!(
                "{}x{} but its image {} is {}x{}",
                mask.width(),
                mask.height(),
                image_path.display(),
                image.width(),
                image.height()
            ),
        ));
    }
    if let Some((x, y, p)) = mask
        .enumerate_pixels()
        .find(|(_, _, p)| p.0[0] as usize >= classes && p.0[0] != IGNORE_INDEX)
    {
        return Err(DataError::field(
            mask_path,
            format!("pixel ({x}, {y})"),
            format!(
                "class {}, but the dataset has {classes} classes (0..={}, 255 = ignore)",
                p.0[0],
                classes - 1
            ),
        ));
    }
    Ok(())
}

/// How mask values are to be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskConvention {
    /// Values are indices into the given class names.
    #[default]
    Plain,
    /// Plain with VOC's names (`background` + 20 classes) unless names are given.
    Voc,
    /// Cityscapes label ids mapped to the 19 train ids, `_leftImg8bit.png` /
    /// `_gtFine_labelIds.png` file names unless suffixes are given.
    Cityscapes,
}

/// Images and their semantic masks in two parallel directory trees.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaskSpec {
    pub images: PathBuf,
    pub masks: PathBuf,
    #[serde(default)]
    pub convention: MaskConvention,
    /// Names of the mask values (required for `plain`; the convention's otherwise).
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// The end of an image's file name that its mask's name replaces. Default: the
    /// extension (`.jpg`, ...); Cityscapes: `_leftImg8bit.png`. Images not ending with it are
    /// not part of the dataset.
    #[serde(default)]
    pub image_suffix: Option<String>,
    /// What replaces it. Default: `.png`; Cityscapes: `_gtFine_labelIds.png`.
    #[serde(default)]
    pub mask_suffix: Option<String>,
}

/// A semantic segmentation dataset, paired and indexed.
#[derive(Debug)]
pub struct MaskSource {
    convention: MaskConvention,
    segment_classes: Vec<String>,
    names: Vec<String>,
    images: Vec<PathBuf>,
    masks: Vec<PathBuf>,
}

impl MaskSource {
    /// Lists the images, pairs each with its mask (a missing mask is an error).
    pub fn open(spec: &MaskSpec) -> Result<Self, DataError> {
        let cityscapes = spec.convention == MaskConvention::Cityscapes;
        let segment_classes: Vec<String> = match (&spec.classes, spec.convention) {
            (Some(names), _) => names.clone(),
            (None, MaskConvention::Voc) => std::iter::once("background")
                .chain(VOC_CLASSES)
                .map(str::to_string)
                .collect(),
            (None, MaskConvention::Cityscapes) => {
                CITYSCAPES_CLASSES.iter().map(|s| s.to_string()).collect()
            }
            (None, MaskConvention::Plain) => {
                return Err(DataError::config(
                    "mask classes",
                    "plain masks need the names of their values (`classes`)",
                ))
            }
        };
        if segment_classes.is_empty() || segment_classes.len() > 255 {
            return Err(DataError::config(
                "mask classes",
                format!(
                    "{} names; between 1 and 255 are allowed",
                    segment_classes.len()
                ),
            ));
        }
        let image_suffix = spec
            .image_suffix
            .clone()
            .or_else(|| cityscapes.then(|| "_leftImg8bit.png".to_string()));
        let mask_suffix = spec.mask_suffix.clone().unwrap_or_else(|| {
            if cityscapes {
                "_gtFine_labelIds.png"
            } else {
                ".png"
            }
            .to_string()
        });
        let mut names = Vec::new();
        let mut images = Vec::new();
        let mut masks = Vec::new();
        for rel in list_images(&spec.images)? {
            let rel_str = rel.to_string_lossy();
            let stem = match &image_suffix {
                Some(suffix) => match rel_str.strip_suffix(suffix.as_str()) {
                    Some(stem) => stem.to_string(),
                    None => continue,
                },
                None => rel.with_extension("").to_string_lossy().into_owned(),
            };
            let mask = spec.masks.join(format!("{stem}{mask_suffix}"));
            if !mask.is_file() {
                return Err(DataError::layout(
                    &mask,
                    format!(
                        "missing: the mask of image {}",
                        spec.images.join(&rel).display()
                    ),
                ));
            }
            names.push(stem);
            images.push(spec.images.join(&rel));
            masks.push(mask);
        }
        if images.is_empty() {
            return Err(DataError::layout(
                &spec.images,
                match &image_suffix {
                    Some(s) => format!("no images whose name ends with {s:?}"),
                    None => "no images found".to_string(),
                },
            ));
        }
        Ok(MaskSource {
            convention: spec.convention,
            segment_classes,
            names,
            images,
            masks,
        })
    }

    /// The mask file of sample `index`.
    pub fn mask_path(&self, index: usize) -> Option<&Path> {
        self.masks.get(index).map(PathBuf::as_path)
    }
}

impl SampleSource for MaskSource {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn classes(&self) -> &[String] {
        &[]
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
        let mask_path = &self.masks[index];
        let mut mask = read_mask_png(mask_path)?;
        if self.convention == MaskConvention::Cityscapes {
            cityscapes_to_train_ids(&mut mask, mask_path)?;
        }
        check_classes(&mask, mask_path, self.segment_classes.len(), &image, path)?;
        Ok(Sample {
            id: index as u64 + 1,
            name: self.names[index].clone(),
            path: path.clone(),
            image,
            boxes: Vec::new(),
            mask: Some(mask),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::image::write_png_rgb;

    /// Encodes values as a PNG of the given colour type and bit depth (test fixtures).
    pub(crate) fn encode_png(
        width: u32,
        height: u32,
        values: &[u16],
        color: png::ColorType,
        depth: png::BitDepth,
    ) -> Vec<u8> {
        let bits = depth as usize;
        let mut data = Vec::new();
        for row in values.chunks(width as usize) {
            match bits {
                8 => data.extend(row.iter().map(|&v| v as u8)),
                16 => data.extend(row.iter().flat_map(|&v| v.to_be_bytes())),
                _ => {
                    let per_byte = 8 / bits;
                    for chunk in row.chunks(per_byte) {
                        let mut byte = 0u8;
                        for (i, &v) in chunk.iter().enumerate() {
                            byte |= (v as u8) << (8 - bits * (i + 1));
                        }
                        data.push(byte);
                    }
                }
            }
        }
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, width, height);
            encoder.set_color(color);
            encoder.set_depth(depth);
            if color == png::ColorType::Indexed {
                encoder.set_palette(
                    (0..=255u8)
                        .flat_map(|i| [i, 255 - i, i / 2])
                        .collect::<Vec<_>>(),
                );
            }
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&data).unwrap();
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Vec<u8>, DataError> {
        decode_mask_png(bytes, Path::new("m.png")).map(|m| m.into_raw())
    }

    #[test]
    fn palette_and_gray_of_every_depth_decode_to_indices() {
        let values: Vec<u16> = vec![0, 1, 3, 2, 1, 0, 3, 3, 0, 2, 1, 1, 0, 0, 2];
        let expected: Vec<u8> = values.iter().map(|&v| v as u8).collect();
        for (color, depth) in [
            (png::ColorType::Indexed, png::BitDepth::Two),
            (png::ColorType::Indexed, png::BitDepth::Four),
            (png::ColorType::Indexed, png::BitDepth::Eight),
            (png::ColorType::Grayscale, png::BitDepth::Two),
            (png::ColorType::Grayscale, png::BitDepth::Eight),
            (png::ColorType::Grayscale, png::BitDepth::Sixteen),
        ] {
            let png = encode_png(5, 3, &values, color, depth);
            assert_eq!(decode(&png).unwrap(), expected, "{color:?} {depth:?}");
        }
        let big = encode_png(
            2,
            1,
            &[255, 300],
            png::ColorType::Grayscale,
            png::BitDepth::Sixteen,
        );
        let msg = decode(&big).unwrap_err().to_string();
        assert!(msg.contains("m.png: pixel (1, 0): value 300"), "{msg}");
    }

    #[test]
    fn rgb_and_corrupt_masks_are_refused_clearly() {
        let rgb = encode_png(1, 1, &[1, 2, 3], png::ColorType::Rgb, png::BitDepth::Eight);
        let msg = decode(&rgb).unwrap_err().to_string();
        assert!(
            msg.contains("m.png: a mask must be a palette or grayscale PNG"),
            "{msg}"
        );
        let good = encode_png(
            4,
            4,
            &[1; 16],
            png::ColorType::Grayscale,
            png::BitDepth::Eight,
        );
        let msg = decode(&good[..good.len() - 20]).unwrap_err().to_string();
        assert!(msg.starts_with("m.png: "), "{msg}");
        let msg = decode(b"hello").unwrap_err().to_string();
        assert!(msg.contains("m.png: not a readable PNG"), "{msg}");
    }

    #[test]
    fn cityscapes_label_ids_map_to_train_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (img_dir, gt_dir) = (
            dir.path().join("leftImg8bit/val"),
            dir.path().join("gtFine/val"),
        );
        std::fs::create_dir_all(img_dir.join("aachen")).unwrap();
        std::fs::create_dir_all(gt_dir.join("aachen")).unwrap();
        write_png_rgb(
            &img_dir.join("aachen/a_000001_leftImg8bit.png"),
            &RgbImage::new(4, 1),
        )
        .unwrap();
        // road, unlabeled, bicycle, sky
        let ids = encode_png(
            4,
            1,
            &[7, 0, 33, 23],
            png::ColorType::Grayscale,
            png::BitDepth::Eight,
        );
        std::fs::write(gt_dir.join("aachen/a_000001_gtFine_labelIds.png"), ids).unwrap();
        let spec = MaskSpec {
            images: img_dir.clone(),
            masks: gt_dir.clone(),
            convention: MaskConvention::Cityscapes,
            classes: None,
            image_suffix: None,
            mask_suffix: None,
        };
        let source = MaskSource::open(&spec).unwrap();
        assert_eq!(source.segment_classes().len(), 19);
        let sample = source.load(0).unwrap();
        assert_eq!(sample.name, "aachen/a_000001");
        assert_eq!(sample.mask.unwrap().into_raw(), vec![0, 255, 18, 10]);
        // A value that is no label id.
        let bad = encode_png(
            4,
            1,
            &[7, 40, 0, 0],
            png::ColorType::Grayscale,
            png::BitDepth::Eight,
        );
        std::fs::write(gt_dir.join("aachen/a_000001_gtFine_labelIds.png"), bad).unwrap();
        let msg = source.load(0).unwrap_err().to_string();
        assert!(
            msg.contains("pixel (1, 0): 40 is not a Cityscapes label id"),
            "{msg}"
        );
    }

    #[test]
    fn plain_masks_pair_by_stem_and_check_classes_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let (img_dir, mask_dir) = (dir.path().join("img"), dir.path().join("ann"));
        std::fs::create_dir_all(&img_dir).unwrap();
        std::fs::create_dir_all(&mask_dir).unwrap();
        write_png_rgb(&img_dir.join("a.png"), &RgbImage::new(3, 1)).unwrap();
        let m = encode_png(
            3,
            1,
            &[0, 2, 255],
            png::ColorType::Indexed,
            png::BitDepth::Eight,
        );
        std::fs::write(mask_dir.join("a.png"), m).unwrap();
        let mut spec = MaskSpec {
            images: img_dir.clone(),
            masks: mask_dir.clone(),
            convention: MaskConvention::Plain,
            classes: Some(vec!["bg".into(), "a".into(), "b".into()]),
            image_suffix: None,
            mask_suffix: None,
        };
        let source = MaskSource::open(&spec).unwrap();
        assert_eq!(
            source.load(0).unwrap().mask.unwrap().into_raw(),
            vec![0, 2, 255]
        );

        spec.classes = Some(vec!["bg".into(), "a".into()]);
        let msg = MaskSource::open(&spec)
            .unwrap()
            .load(0)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("ann/a.png: pixel (1, 0): class 2, but the dataset has 2 classes"),
            "{msg}"
        );

        write_png_rgb(&img_dir.join("a.png"), &RgbImage::new(4, 1)).unwrap();
        let msg = MaskSource::open(&spec)
            .unwrap()
            .load(0)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("a.png: size: 3x1 but its image"), "{msg}");

        write_png_rgb(&img_dir.join("b.png"), &RgbImage::new(4, 1)).unwrap();
        let msg = MaskSource::open(&spec).unwrap_err().to_string();
        assert!(
            msg.contains("ann/b.png: missing: the mask of image"),
            "{msg}"
        );

        spec.classes = None;
        let msg = MaskSource::open(&spec).unwrap_err().to_string();
        assert!(msg.contains("plain masks need the names"), "{msg}");
    }
}
