//! Geometry-tracked data augmentation for self-supervised and supervised training.
//!
//! What the papers call "two views", "multi-crop" and "the MoCo-v2 augmentation" is built here
//! from torchvision's transforms, re-implemented with the same semantics, plus the bookkeeping
//! dense methods need: every view remembers where it came from ([`ViewGeometry`]: crop box in
//! original-image pixel coordinates, horizontal flip, output size), so correspondences between
//! views (DenseCL's ablations, PixPro's positive mask, DenseSiam's and LC-loss's overlap
//! resampling) are computed from geometry on the host.
//!
//! - [`geometry`]: [`CropBox`], [`ViewGeometry`], point and feature-cell mapping between views
//!   and the original image, overlaps, `GridSample` grids, PixPro's positive mask.
//! - [`spatial`]: RandomResizedCrop (torchvision's sampling), Pillow's antialiased bilinear
//!   resampling, horizontal flip, letterbox, nearest-neighbour resampling for label maps.
//! - [`photometric`]: ColorJitter, grayscale, Gaussian blur, solarize, normalisation to CHW
//!   `f32`, with torchvision's `uint8` tensor semantics.
//! - [`pipeline`]: one view from a [`ViewConfig`], two-view presets (MoCo-v2, PixPro), batches
//!   over rayon, decoding.
//! - [`multicrop`]: SwAV's multi-crop (2 large + k small views).
//! - [`labeled`]: the same geometric ops on images with boxes (xyxy pixels) and semantic masks.
//!
//! # Determinism
//! Every random choice of a view comes from its own [`ChaCha8Rng`], seeded from the tuple
//! (base seed, epoch, sample index, view index) by [`SampleSeed`]: a view depends on that tuple
//! only, never on which thread ran it or in which order.
//!
//! # Pixel coordinates
//! Continuous, origin at the top-left *corner* of the top-left pixel: pixel `(i, j)` covers
//! `[j, j+1) x [i, i+1)` and has its centre at `(j + 0.5, i + 0.5)` (Pillow's and torchvision's
//! convention for resizing). Boxes are `[x0, y0, x1, y1]` in the same coordinates, so a box
//! around pixels `a..b` has `x1 = b`.

/// Declares `$wrapper`: `$kernel` (an `#[inline(always)]` function) compiled with AVX2
/// enabled, on x86-64. Same arithmetic, wider vectors: Rust never fuses or reorders float
/// operations, so both builds give bit-identical results.
macro_rules! avx2_build {
    ($wrapper:ident => $kernel:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $wrapper($($arg: $ty),*) $(-> $ret)? {
            $kernel($($arg),*)
        }
    };
}

/// Calls the AVX2 build (see `avx2_build!`) when the CPU has AVX2, the portable one otherwise.
/// Baseline x86-64 is SSE2 only; the per-pixel kernels run 2-3x faster with AVX2.
macro_rules! dispatch_avx2 {
    ($wrapper:ident, $kernel:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        let result = if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the wrapper is only `$kernel` compiled for AVX2, which the CPU has.
            unsafe { $wrapper($($arg),*) }
        } else {
            $kernel($($arg),*)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let result = $kernel($($arg),*);
        result
    }};
}

pub mod geometry;
pub mod labeled;
pub mod multicrop;
pub mod photometric;
pub mod pipeline;
pub mod spatial;

use std::path::PathBuf;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use geometry::{
    cell_correspondence, grid_sample_grid, overlap, pixpro_positive_mask, CellCorrespondence,
    CropBox, DistanceFrame, FeatureGrid, Overlap, ViewGeometry,
};
pub use labeled::{BoxFilter, LabeledSample};
pub use multicrop::{MultiCropAugment, MultiCropConfig};
pub use photometric::{ColorJitterConfig, GaussianBlurConfig, KernelSize, Normalize};
pub use pipeline::{
    augment_two_view_batch, decode_image, stack_views, TwoViewAugment, TwoViewBatch, TwoViewConfig,
    View, ViewConfig,
};
pub use spatial::{LetterboxConfig, LetterboxPlacement, RandomResizedCropConfig};

/// Errors of the augmentation module: invalid configurations, unreadable images, labels that
/// don't fit their image.
#[derive(Debug, thiserror::Error)]
pub enum AugmentError {
    #[error("augmentation config: {field} = {value} is invalid ({expected})")]
    InvalidConfig {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{path}: cannot decode image: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("image of {width}x{height} pixels: augmentation needs at least 1x1")]
    EmptyImage { width: u32, height: u32 },
    #[error("mask is {mask_width}x{mask_height} but its image is {image_width}x{image_height}")]
    MaskSize {
        mask_width: u32,
        mask_height: u32,
        image_width: u32,
        image_height: u32,
    },
    #[error("{boxes} boxes but {labels} labels: every box needs exactly one class label")]
    LabelCount { boxes: usize, labels: usize },
    #[error("box {index} = {xyxy:?} is not a finite box with x0 <= x1 and y0 <= y1")]
    InvalidBox { index: usize, xyxy: [f32; 4] },
    #[error("cannot stack views: view {index} is {got:?} (CHW) but view 0 is {expected:?}")]
    ViewShape {
        index: usize,
        got: [usize; 3],
        expected: [usize; 3],
    },
}

/// Checks that `value` lies in `[lo, hi]` (and is not NaN) for config validation.
pub(crate) fn check_range(
    field: &'static str,
    value: f64,
    lo: f64,
    hi: f64,
    expected: &'static str,
) -> Result<(), AugmentError> {
    if value.is_nan() || value < lo || value > hi {
        return Err(AugmentError::InvalidConfig {
            field,
            value: value.to_string(),
            expected,
        });
    }
    Ok(())
}

/// Checks a probability.
pub(crate) fn check_probability(field: &'static str, p: f64) -> Result<(), AugmentError> {
    check_range(field, p, 0.0, 1.0, "a probability in [0, 1]")
}

/// Checks a `(min, max)` range: both finite, `lo <= min <= max`.
pub(crate) fn check_interval(
    field: &'static str,
    (min, max): (f64, f64),
    lo: f64,
    expected: &'static str,
) -> Result<(), AugmentError> {
    if !(min.is_finite() && max.is_finite() && min >= lo && min <= max) {
        return Err(AugmentError::InvalidConfig {
            field,
            value: format!("({min}, {max})"),
            expected,
        });
    }
    Ok(())
}

/// Which view of which sample in which epoch: the whole source of a view's randomness.
///
/// The 32-byte ChaCha key is the four numbers little-endian, so every tuple gets its own
/// independent stream (ChaCha is a keyed permutation; no hashing is needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleSeed {
    pub base: u64,
    pub epoch: u64,
    pub sample: u64,
    pub view: u64,
}

impl SampleSeed {
    pub fn new(base: u64, epoch: u64, sample: u64, view: u64) -> Self {
        SampleSeed {
            base,
            epoch,
            sample,
            view,
        }
    }

    /// The same sample, another view.
    pub fn with_view(self, view: u64) -> Self {
        SampleSeed { view, ..self }
    }

    /// The generator all of this view's random choices come from.
    pub fn rng(&self) -> ChaCha8Rng {
        let mut key = [0u8; 32];
        for (i, v) in [self.base, self.epoch, self.sample, self.view]
            .into_iter()
            .enumerate()
        {
            key[i * 8..(i + 1) * 8].copy_from_slice(&v.to_le_bytes());
        }
        ChaCha8Rng::from_seed(key)
    }
}

/// Uniform sample in `[lo, hi)` (`lo` when the interval is empty), as torch's `uniform_`:
/// `lo + (hi - lo) * u`, `u` uniform in `[0, 1)`. Unlike `random_range` it accepts `lo == hi`.
pub(crate) fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    use rand::RngExt;
    lo + (hi - lo) * rng.random::<f64>()
}

/// `true` with probability `p` (`p` in `[0, 1]`).
pub(crate) fn coin(rng: &mut ChaCha8Rng, p: f64) -> bool {
    use rand::RngExt;
    // `random::<f64>() < p` is exact at both ends: never for 0, always for 1.
    rng.random::<f64>() < p
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    #[test]
    fn sample_seed_streams_are_reproducible_and_distinct() {
        let s = SampleSeed::new(7, 1, 42, 0);
        let a: Vec<u64> = (0..4).map(|_| s.rng().random()).collect();
        let mut r1 = s.rng();
        let mut r2 = s.rng();
        assert_eq!(r1.random::<u64>(), r2.random::<u64>());
        assert!(a.iter().all(|v| *v == a[0]));
        let mut others = [
            SampleSeed::new(8, 1, 42, 0),
            SampleSeed::new(7, 2, 42, 0),
            SampleSeed::new(7, 1, 43, 0),
            SampleSeed::new(7, 1, 42, 1),
        ]
        .map(|s| s.rng().random::<u64>())
        .to_vec();
        others.push(a[0]);
        others.sort();
        others.dedup();
        assert_eq!(
            others.len(),
            5,
            "each field of the tuple must change the stream"
        );
    }

    #[test]
    fn coin_edges_and_uniform_empty_interval() {
        let mut rng = SampleSeed::new(0, 0, 0, 0).rng();
        for _ in 0..1000 {
            assert!(!coin(&mut rng, 0.0));
            assert!(coin(&mut rng, 1.0));
            assert_eq!(uniform(&mut rng, 0.3, 0.3), 0.3);
            let u = uniform(&mut rng, -1.0, 2.0);
            assert!((-1.0..2.0).contains(&u));
        }
    }
}
