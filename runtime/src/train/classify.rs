//! Classification data for the training engine: an image folder (class = subfolder, as
//! torchvision's `ImageFolder`) and a synthetic set, both as [`Samples`] yielding `images`
//! float32 `[3, S, S]` (ImageNet-normalised RGB) and `labels` int64 `[]`.
//!
//! Our choices: images are resized to `S x S` (bilinear, aspect ratio not kept) with no
//! augmentation; held-out samples are chosen per class, deterministically (every k-th file in
//! name order), so a resumed run and a fresh one split alike.

use std::path::{Path, PathBuf};

use densa_exporter::Tensor;
use ndarray::{Array3, ArrayD};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::data::{Batch, DataError, Samples};
use crate::data::image::{is_image_file, read_rgb};

/// ImageNet mean and standard deviation (RGB), torchvision's normalisation.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// An image as the network input: `[3, S, S]`, `(x / 255 - mean) / std`.
pub fn to_input(img: &image::RgbImage, size: u32) -> Array3<f32> {
    let img = if img.dimensions() == (size, size) {
        img.clone()
    } else {
        image::imageops::resize(img, size, size, image::imageops::FilterType::Triangle)
    };
    let s = size as usize;
    Array3::from_shape_fn((3, s, s), |(c, y, x)| {
        let v = img.get_pixel(x as u32, y as u32)[c] as f32 / 255.0;
        (v - MEAN[c]) / STD[c]
    })
}

fn sample(image: Array3<f32>, label: usize) -> Batch {
    vec![
        ("images".into(), Tensor::F32(image.into_dyn())),
        (
            "labels".into(),
            Tensor::I64(ArrayD::from_elem(vec![], label as i64)),
        ),
    ]
}

/// Which part of a split to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Everything but the held-out samples.
    Train,
    /// Every `holdout_every`-th sample of each class.
    HeldOut,
}

/// A folder of class subfolders (`root/cat/1.jpg`, `root/dog/2.png`); classes are the
/// subfolder names in sorted order, as in torchvision's `ImageFolder`.
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    files: Vec<(PathBuf, usize)>,
    size: u32,
}

impl ImageFolder {
    /// Lists `root`; with `holdout_every = k > 0`, file `i` (name order) of each class is held
    /// out when `i % k == k - 1`. Errors name the folder (missing, no classes, a class without
    /// images).
    pub fn open(
        root: &Path,
        size: u32,
        holdout_every: usize,
        split: Split,
    ) -> Result<ImageFolder, DataError> {
        let err = |message: String| DataError::Source {
            source_name: root.display().to_string(),
            message,
        };
        let mut classes = Vec::new();
        let entries =
            std::fs::read_dir(root).map_err(|e| err(format!("cannot list the folder: {e}")))?;
        for e in entries {
            let e = e.map_err(|e| err(format!("cannot list the folder: {e}")))?;
            if e.path().is_dir() {
                classes.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        classes.sort();
        if classes.len() < 2 {
            return Err(err(format!(
                "found {} class subfolder(s); an image folder needs one subfolder per class, at least 2",
                classes.len()
            )));
        }
        let mut files = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| err(format!("cannot list {}: {e}", dir.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_image_file(p))
                .collect();
            names.sort();
            if names.is_empty() {
                return Err(err(format!(
                    "class `{class}` ({}) has no images",
                    dir.display()
                )));
            }
            for (i, p) in names.into_iter().enumerate() {
                let held = holdout_every > 0 && i % holdout_every == holdout_every - 1;
                if held == (split == Split::HeldOut) {
                    files.push((p, label));
                }
            }
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            classes,
            files,
            size,
        })
    }

    /// The class names, index = label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
}

impl Samples for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn sample(&mut self, index: usize, _: &mut ChaCha8Rng) -> Result<Batch, DataError> {
        let (path, label) = &self.files[index];
        let img = read_rgb(path).map_err(|e| DataError::Source {
            source_name: self.root.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(sample(to_input(&img, self.size), *label))
    }

    fn describe(&self) -> String {
        format!(
            "image-folder:{} classes={} n={}",
            self.root.display(),
            self.classes.len(),
            self.files.len()
        )
    }
}

/// A synthetic classification set: on a noisy grey background, one filled square whose colour
/// is the class (a fixed palette of 10 colours; the square's size, position and brightness and
/// the noise vary). Sample `i` depends only on `(seed, i)`.
pub struct SyntheticSquares {
    n: usize,
    classes: usize,
    size: u32,
    seed: u64,
}

/// The class colours of [`SyntheticSquares`].
pub const PALETTE: [[f32; 3]; 10] = [
    [0.9, 0.1, 0.1],
    [0.1, 0.8, 0.1],
    [0.1, 0.2, 0.9],
    [0.9, 0.9, 0.1],
    [0.9, 0.1, 0.9],
    [0.1, 0.9, 0.9],
    [1.0, 0.5, 0.0],
    [0.5, 0.0, 1.0],
    [0.0, 0.0, 0.0],
    [1.0, 1.0, 1.0],
];

impl SyntheticSquares {
    /// `n` samples of `classes` (2..=10) classes at `size x size`, from `seed`.
    pub fn new(
        n: usize,
        classes: usize,
        size: u32,
        seed: u64,
    ) -> Result<SyntheticSquares, DataError> {
        if !(2..=PALETTE.len()).contains(&classes) || size < 4 {
            return Err(DataError::Source {
                source_name: "synthetic-squares".into(),
                message: format!(
                    "{classes} classes at {size}x{size}: the synthetic set has 2 to 10 classes and images of at least 4x4"
                ),
            });
        }
        Ok(SyntheticSquares {
            n,
            classes,
            size,
            seed,
        })
    }

    /// The image and label of sample `index`.
    pub fn make(&self, index: usize) -> (Array3<f32>, usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let label = index % self.classes;
        let s = self.size as usize;
        let side = rng.random_range(s / 4..=s / 2).max(2);
        let (y0, x0) = (
            rng.random_range(0..=s - side),
            rng.random_range(0..=s - side),
        );
        let gain: f32 = rng.random_range(0.7..1.0);
        let colour = PALETTE[label];
        let mut img = Array3::<f32>::zeros((3, s, s));
        for y in 0..s {
            for x in 0..s {
                let inside = (y0..y0 + side).contains(&y) && (x0..x0 + side).contains(&x);
                for c in 0..3 {
                    let noise: f32 = rng.random_range(-0.1..0.1);
                    let v = if inside { colour[c] * gain } else { 0.5 } + noise;
                    img[[c, y, x]] = (v.clamp(0.0, 1.0) - MEAN[c]) / STD[c];
                }
            }
        }
        (img, label)
    }
}

impl Samples for SyntheticSquares {
    fn len(&self) -> usize {
        self.n
    }

    fn sample(&mut self, index: usize, _: &mut ChaCha8Rng) -> Result<Batch, DataError> {
        let (img, label) = self.make(index);
        Ok(sample(img, label))
    }

    fn describe(&self) -> String {
        format!(
            "synthetic-squares n={} classes={} size={} seed={}",
            self.n, self.classes, self.size, self.seed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_samples_are_deterministic_and_labelled_by_index() {
        let s = SyntheticSquares::new(20, 4, 16, 3).unwrap();
        let (a, la) = s.make(5);
        let (b, lb) = s.make(5);
        assert_eq!(a, b);
        assert_eq!((la, lb), (1, 1));
        assert_ne!(s.make(6).0, a);
        assert!(SyntheticSquares::new(20, 11, 16, 3).is_err());
    }

    #[test]
    fn image_folder_errors_name_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("only")).unwrap();
        let e = ImageFolder::open(dir.path(), 8, 0, Split::Train)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&dir.path().display().to_string()) && e.contains("class"),
            "{e}"
        );
    }
}
