//! Semantic segmentation metrics: confusion matrix, per-class IoU (Jaccard), mIoU, pixel
//! accuracy, as mmsegmentation's `IoUMetric` and torchvision's segmentation reference compute
//! them.
//!
//! Pixels whose ground truth is the ignore index (255 by default) are left out. With `C` the
//! confusion matrix (rows: ground truth, columns: prediction), class `c` has IoU `C[c,c] /
//! (row_c + col_c - C[c,c])`, undefined (`None`, `null` in JSON) when the class is in neither
//! the ground truth nor the prediction; **mIoU is the mean over the defined classes** (numpy's
//! `nanmean`, mmsegmentation's convention). Pixel accuracy is `trace / total`, per-class
//! accuracy `C[c,c] / row_c` (undefined without ground truth), mean accuracy their mean.
//!
//! Our choice: a label outside `0..num_classes` (other than the ignore index) in the ground
//! truth, or any label outside it in the prediction, is an error naming the file and pixel
//! (mmsegmentation drops such pixels silently).
//!
//! Label maps are PNG files, grayscale (8 or 16 bit, any bit depth) or palette (the pixel is the
//! palette index, not its colour), pixel value = class index.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// What prevents a segmentation evaluation.
#[derive(Debug, thiserror::Error)]
pub enum SegError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a readable PNG: {message}")]
    Png { path: PathBuf, message: String },
    #[error(
        "{path}: a {color} PNG; label maps must be grayscale or palette PNGs whose pixel value \
         (or palette index) is the class"
    )]
    NotLabels { path: PathBuf, color: String },
    #[error("{path}: pixel (x {x}, y {y}) has label {value}, outside 0..{num_classes}{ignore}")]
    LabelRange {
        path: PathBuf,
        x: usize,
        y: usize,
        value: u32,
        num_classes: usize,
        ignore: String,
    },
    #[error("{prediction} is {pw}x{ph} but its ground truth {ground_truth} is {gw}x{gh}")]
    SizeMismatch {
        prediction: PathBuf,
        ground_truth: PathBuf,
        pw: u32,
        ph: u32,
        gw: u32,
        gh: u32,
    },
    #[error("{dir}: no prediction {name} for the ground truth {ground_truth}")]
    MissingPrediction {
        dir: PathBuf,
        name: String,
        ground_truth: PathBuf,
    },
    #[error("{dir}: no .png label maps")]
    NoLabelMaps { dir: PathBuf },
    #[error("num_classes must be at least 1")]
    NoClasses,
}

/// A label map: `labels[y * width + x]` is the class of pixel (x, y).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMap {
    pub width: u32,
    pub height: u32,
    /// # Shapes
    /// `[height * width]`, row-major.
    pub labels: Vec<u32>,
}

/// Reads a grayscale or palette PNG as class indices (palette PNGs are not expanded to colours).
pub fn read_label_png(path: &Path) -> Result<LabelMap, SegError> {
    let file = std::fs::File::open(path).map_err(|source| SegError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let png_err = |e: png::DecodingError| SegError::Png {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(png_err)?;
    let (color, depth) = reader.output_color_type();
    if !matches!(color, png::ColorType::Grayscale | png::ColorType::Indexed) {
        return Err(SegError::NotLabels {
            path: path.to_path_buf(),
            color: format!("{color:?}"),
        });
    }
    let size = reader.output_buffer_size().ok_or_else(|| SegError::Png {
        path: path.to_path_buf(),
        message: "image too large".into(),
    })?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(png_err)?;
    let (w, h) = (info.width as usize, info.height as usize);
    let bits = depth as usize;
    let mut labels = Vec::with_capacity(w * h);
    for row in buf.chunks(info.line_size).take(h) {
        match bits {
            16 => labels.extend(
                row.chunks_exact(2)
                    .take(w)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]) as u32),
            ),
            8 => labels.extend(row.iter().take(w).map(|&b| b as u32)),
            _ => {
                // 1, 2 or 4 bits per pixel, packed from the high bits.
                let per_byte = 8 / bits;
                let mask = (1u32 << bits) - 1;
                labels.extend((0..w).map(|x| {
                    let byte = row[x / per_byte] as u32;
                    let shift = 8 - bits * (x % per_byte + 1);
                    (byte >> shift) & mask
                }));
            }
        }
    }
    Ok(LabelMap {
        width: info.width,
        height: info.height,
        labels,
    })
}

/// A `num_classes x num_classes` confusion matrix, rows ground truth, columns prediction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfusionMatrix {
    pub num_classes: usize,
    /// # Shapes
    /// `[num_classes * num_classes]`, `counts[gt * num_classes + pred]`.
    pub counts: Vec<u64>,
}

/// Metrics of a confusion matrix. `None` where undefined.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SegMetrics {
    /// Mean IoU over classes present in the ground truth or the prediction.
    #[serde(rename = "mIoU")]
    pub miou: Option<f64>,
    pub pixel_accuracy: Option<f64>,
    /// Mean of the per-class accuracies (classes with ground truth).
    pub mean_accuracy: Option<f64>,
    pub per_class_iou: Vec<Option<f64>>,
    pub per_class_accuracy: Vec<Option<f64>>,
    /// Pixels counted (not ignored).
    pub pixels: u64,
}

impl ConfusionMatrix {
    pub fn new(num_classes: usize) -> Self {
        ConfusionMatrix {
            num_classes,
            counts: vec![0; num_classes * num_classes],
        }
    }

    /// Adds one image. `ignore`: the ground-truth label to skip. Out-of-range labels are an
    /// error (see [`SegError::LabelRange`]); `gt_path`/`pred_path` name the files in it.
    ///
    /// # Shapes
    /// `gt`, `pred`: `[height * width]` of one size.
    pub fn add(
        &mut self,
        gt: &LabelMap,
        pred: &LabelMap,
        ignore: Option<u32>,
        gt_path: &Path,
        pred_path: &Path,
    ) -> Result<(), SegError> {
        if (gt.width, gt.height) != (pred.width, pred.height) {
            return Err(SegError::SizeMismatch {
                prediction: pred_path.to_path_buf(),
                ground_truth: gt_path.to_path_buf(),
                pw: pred.width,
                ph: pred.height,
                gw: gt.width,
                gh: gt.height,
            });
        }
        let n = self.num_classes;
        let w = gt.width as usize;
        let range_err =
            |path: &Path, i: usize, value: u32, ignore: Option<u32>| SegError::LabelRange {
                path: path.to_path_buf(),
                x: i % w.max(1),
                y: i / w.max(1),
                value,
                num_classes: n,
                ignore: ignore.map_or(String::new(), |v| format!(" or the ignore index {v}")),
            };
        for (i, (&g, &p)) in gt.labels.iter().zip(&pred.labels).enumerate() {
            if Some(g) == ignore {
                continue;
            }
            if g as usize >= n {
                return Err(range_err(gt_path, i, g, ignore));
            }
            if p as usize >= n {
                return Err(range_err(pred_path, i, p, None));
            }
            self.counts[g as usize * n + p as usize] += 1;
        }
        Ok(())
    }

    pub fn metrics(&self) -> SegMetrics {
        let n = self.num_classes;
        let at = |g: usize, p: usize| self.counts[g * n + p];
        let row: Vec<u64> = (0..n).map(|c| (0..n).map(|p| at(c, p)).sum()).collect();
        let col: Vec<u64> = (0..n).map(|c| (0..n).map(|g| at(g, c)).sum()).collect();
        let total: u64 = row.iter().sum();
        let trace: u64 = (0..n).map(|c| at(c, c)).sum();
        let per_class_iou: Vec<Option<f64>> = (0..n)
            .map(|c| {
                let union = row[c] + col[c] - at(c, c);
                (union > 0).then(|| at(c, c) as f64 / union as f64)
            })
            .collect();
        let per_class_accuracy: Vec<Option<f64>> = (0..n)
            .map(|c| (row[c] > 0).then(|| at(c, c) as f64 / row[c] as f64))
            .collect();
        SegMetrics {
            miou: mean_some(&per_class_iou),
            pixel_accuracy: (total > 0).then(|| trace as f64 / total as f64),
            mean_accuracy: mean_some(&per_class_accuracy),
            per_class_iou,
            per_class_accuracy,
            pixels: total,
        }
    }
}

fn mean_some(values: &[Option<f64>]) -> Option<f64> {
    let defined: Vec<f64> = values.iter().flatten().copied().collect();
    (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64)
}

/// Evaluates every `.png` in `gt_dir` against the file of the same name in `pred_dir`
/// (predictions without a ground truth are not read). Returns the matrix and the number of
/// images.
pub fn evaluate_dirs(
    gt_dir: &Path,
    pred_dir: &Path,
    num_classes: usize,
    ignore: Option<u32>,
) -> Result<(ConfusionMatrix, usize), SegError> {
    if num_classes == 0 {
        return Err(SegError::NoClasses);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SegError::Io { path, source }
    };
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(gt_dir).map_err(io(gt_dir))? {
        let entry = entry.map_err(io(gt_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.to_ascii_lowercase().ends_with(".png") && entry.path().is_file() {
            names.push(name);
        }
    }
    if names.is_empty() {
        return Err(SegError::NoLabelMaps {
            dir: gt_dir.to_path_buf(),
        });
    }
    names.sort();
    let mut matrix = ConfusionMatrix::new(num_classes);
    for name in &names {
        let gt_path = gt_dir.join(name);
        let pred_path = pred_dir.join(name);
        if !pred_path.is_file() {
            return Err(SegError::MissingPrediction {
                dir: pred_dir.to_path_buf(),
                name: name.clone(),
                ground_truth: gt_path,
            });
        }
        let gt = read_label_png(&gt_path)?;
        let pred = read_label_png(&pred_path)?;
        matrix.add(&gt, &pred, ignore, &gt_path, &pred_path)?;
    }
    Ok((matrix, names.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64, so the tests need no RNG crate.
    struct Mix(u64);
    impl Mix {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % n
        }
    }

    fn map(w: u32, h: u32, labels: Vec<u32>) -> LabelMap {
        LabelMap {
            width: w,
            height: h,
            labels,
        }
    }

    /// IoU by definition, on pixel sets: |{gt = c} ∩ {pred = c}| / |{gt = c} ∪ {pred = c}|.
    fn brute_force(pairs: &[(Vec<u32>, Vec<u32>)], n: usize, ignore: u32) -> SegMetrics {
        let kept: Vec<(u32, u32)> = pairs
            .iter()
            .flat_map(|(g, p)| g.iter().copied().zip(p.iter().copied()))
            .filter(|&(g, _)| g != ignore)
            .collect();
        let iou: Vec<Option<f64>> = (0..n as u32)
            .map(|c| {
                let inter = kept.iter().filter(|&&(g, p)| g == c && p == c).count();
                let union = kept.iter().filter(|&&(g, p)| g == c || p == c).count();
                (union > 0).then(|| inter as f64 / union as f64)
            })
            .collect();
        let acc: Vec<Option<f64>> = (0..n as u32)
            .map(|c| {
                let gt = kept.iter().filter(|&&(g, _)| g == c).count();
                let hit = kept.iter().filter(|&&(g, p)| g == c && p == c).count();
                (gt > 0).then(|| hit as f64 / gt as f64)
            })
            .collect();
        let correct = kept.iter().filter(|&&(g, p)| g == p).count();
        let defined: Vec<f64> = iou.iter().flatten().copied().collect();
        let defined_acc: Vec<f64> = acc.iter().flatten().copied().collect();
        SegMetrics {
            miou: (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64),
            pixel_accuracy: (!kept.is_empty()).then(|| correct as f64 / kept.len() as f64),
            mean_accuracy: (!defined_acc.is_empty())
                .then(|| defined_acc.iter().sum::<f64>() / defined_acc.len() as f64),
            per_class_iou: iou,
            per_class_accuracy: acc,
            pixels: kept.len() as u64,
        }
    }

    #[test]
    fn metrics_equal_brute_force_on_random_maps() {
        let mut rng = Mix(3);
        let here = Path::new("x.png");
        for case in 0..50 {
            let n = 1 + rng.below(6) as usize;
            let mut matrix = ConfusionMatrix::new(n);
            let mut pairs = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let (w, h) = (1 + rng.below(9) as u32, 1 + rng.below(9) as u32);
                // Labels from a subset of the classes, so some classes are absent; ~10% ignored.
                let used = 1 + rng.below(n as u64);
                let gt: Vec<u32> = (0..w * h)
                    .map(|_| {
                        if rng.below(10) == 0 {
                            255
                        } else {
                            rng.below(used) as u32
                        }
                    })
                    .collect();
                let pred: Vec<u32> = (0..w * h).map(|_| rng.below(used) as u32).collect();
                matrix
                    .add(
                        &map(w, h, gt.clone()),
                        &map(w, h, pred.clone()),
                        Some(255),
                        here,
                        here,
                    )
                    .unwrap();
                pairs.push((gt, pred));
            }
            let got = matrix.metrics();
            let want = brute_force(&pairs, n, 255);
            assert_eq!(got.per_class_iou, want.per_class_iou, "case {case}");
            assert_eq!(got.per_class_accuracy, want.per_class_accuracy);
            assert_eq!(got.pixels, want.pixels);
            assert_eq!(got.pixel_accuracy, want.pixel_accuracy);
            let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => (a - b).abs() < 1e-12,
                (a, b) => a == b,
            };
            assert!(close(got.miou, want.miou), "case {case}");
            assert!(close(got.mean_accuracy, want.mean_accuracy), "case {case}");
        }
    }

    #[test]
    fn absent_classes_are_undefined_and_left_out_of_the_mean() {
        // 3 classes; class 2 in neither map; class 1 only predicted.
        let gt = map(4, 1, vec![0, 0, 0, 255]);
        let pred = map(4, 1, vec![0, 1, 0, 2]);
        let mut m = ConfusionMatrix::new(3);
        let p = Path::new("a.png");
        m.add(&gt, &pred, Some(255), p, p).unwrap();
        let r = m.metrics();
        assert_eq!(r.per_class_iou, vec![Some(2.0 / 3.0), Some(0.0), None]);
        assert_eq!(r.miou, Some(1.0 / 3.0));
        assert_eq!(r.pixel_accuracy, Some(2.0 / 3.0));
        assert_eq!(r.per_class_accuracy, vec![Some(2.0 / 3.0), None, None]);
        assert_eq!(r.pixels, 3);
    }

    #[test]
    fn out_of_range_labels_and_sizes_are_errors() {
        let p = Path::new("gt/a.png");
        let q = Path::new("pred/a.png");
        let mut m = ConfusionMatrix::new(2);
        let e = m
            .add(
                &map(2, 1, vec![0, 7]),
                &map(2, 1, vec![0, 0]),
                Some(255),
                p,
                q,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "gt/a.png: pixel (x 1, y 0) has label 7, outside 0..2 or the ignore index 255"
        );
        let e = m
            .add(
                &map(2, 1, vec![0, 1]),
                &map(2, 1, vec![0, 2]),
                Some(255),
                p,
                q,
            )
            .unwrap_err();
        assert!(
            e.to_string().starts_with("pred/a.png: pixel (x 1, y 0)"),
            "{e}"
        );
        let e = m
            .add(&map(2, 1, vec![0, 1]), &map(1, 2, vec![0, 1]), None, p, q)
            .unwrap_err();
        assert!(matches!(e, SegError::SizeMismatch { .. }), "{e}");
    }

    fn write_png(
        path: &Path,
        w: u32,
        h: u32,
        color: png::ColorType,
        depth: png::BitDepth,
        data: &[u8],
        palette: Option<Vec<u8>>,
    ) {
        let file = std::fs::File::create(path).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
        enc.set_color(color);
        enc.set_depth(depth);
        if let Some(p) = palette {
            enc.set_palette(p);
        }
        enc.write_header().unwrap().write_image_data(data).unwrap();
    }

    #[test]
    fn png_label_maps_gray_palette_packed_and_16_bit() {
        let dir = tempfile::tempdir().unwrap();
        let gray = dir.path().join("gray.png");
        write_png(
            &gray,
            3,
            2,
            png::ColorType::Grayscale,
            png::BitDepth::Eight,
            &[0, 1, 2, 255, 4, 5],
            None,
        );
        assert_eq!(
            read_label_png(&gray).unwrap(),
            map(3, 2, vec![0, 1, 2, 255, 4, 5])
        );
        // Palette indices, not colours.
        let pal = dir.path().join("pal.png");
        let palette: Vec<u8> = (0..4u8).flat_map(|i| [i * 60, 255 - i * 60, 7]).collect();
        write_png(
            &pal,
            2,
            2,
            png::ColorType::Indexed,
            png::BitDepth::Eight,
            &[3, 0, 1, 2],
            Some(palette.clone()),
        );
        assert_eq!(read_label_png(&pal).unwrap(), map(2, 2, vec![3, 0, 1, 2]));
        // 2-bit palette: one row of 5 pixels packed into 2 bytes.
        let packed = dir.path().join("packed.png");
        write_png(
            &packed,
            5,
            1,
            png::ColorType::Indexed,
            png::BitDepth::Two,
            &[0b00_01_10_11, 0b01_000000],
            Some(palette),
        );
        assert_eq!(
            read_label_png(&packed).unwrap(),
            map(5, 1, vec![0, 1, 2, 3, 1])
        );
        let wide = dir.path().join("wide.png");
        write_png(
            &wide,
            2,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::Sixteen,
            &[1, 2, 0, 9],
            None,
        );
        assert_eq!(read_label_png(&wide).unwrap(), map(2, 1, vec![258, 9]));
        let rgb = dir.path().join("rgb.png");
        write_png(
            &rgb,
            1,
            1,
            png::ColorType::Rgb,
            png::BitDepth::Eight,
            &[1, 2, 3],
            None,
        );
        assert!(matches!(
            read_label_png(&rgb),
            Err(SegError::NotLabels { .. })
        ));
        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"not a png").unwrap();
        let e = read_label_png(&junk).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{}: not a readable PNG", junk.display())),
            "{e}"
        );
    }
}
