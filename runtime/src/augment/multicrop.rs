//! SwAV's multi-crop: a few large views plus several small ones of each image.
//!
//! Defaults are SwAV's ImageNet recipe (`main_swav.py`): 2 crops at 224 px with scale
//! (0.14, 1) and 6 at 96 px with scale (0.05, 0.14); every crop gets a flip (p 0.5), SwAV's
//! colour distortion (ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale p 0.2) and
//! Gaussian blur (sigma (0.1, 2), p 0.5). SCFS uses the same machinery with other numbers
//! (2 x (0.25, 1) + 8 x (0.05, 0.25)): set the fields.
//!
//! View indices for seeding: large crops are views `0..n_large`, small crops follow.

use image::RgbImage;
use ndarray::Array4;
use rayon::prelude::*;

use super::geometry::ViewGeometry;
use super::photometric::ColorJitterConfig;
use super::pipeline::{View, ViewConfig};
use super::spatial::RandomResizedCropConfig;
use super::{AugmentError, SampleSeed};

/// Multi-crop: `n_large` views of `large`, then `n_small` views of `small`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiCropConfig {
    pub large: ViewConfig,
    /// Default 2.
    pub n_large: usize,
    pub small: ViewConfig,
    /// Default 6.
    pub n_small: usize,
}

impl Default for MultiCropConfig {
    fn default() -> Self {
        MultiCropConfig::swav()
    }
}

impl MultiCropConfig {
    /// SwAV's 2 x 224 + 6 x 96.
    pub fn swav() -> Self {
        let view = |size: u32, scale: (f64, f64)| ViewConfig {
            crop: RandomResizedCropConfig {
                size: (size, size),
                scale,
                ..Default::default()
            },
            jitter: ColorJitterConfig {
                brightness: 0.8,
                contrast: 0.8,
                saturation: 0.8,
                hue: 0.2,
                p: 0.8,
            },
            ..ViewConfig::moco_v2()
        };
        MultiCropConfig {
            large: view(224, (0.14, 1.0)),
            n_large: 2,
            small: view(96, (0.05, 0.14)),
            n_small: 6,
        }
    }

    pub fn validate(&self) -> Result<(), AugmentError> {
        self.large.validate()?;
        self.small.validate()
    }

    fn view_config(&self, view: usize) -> &ViewConfig {
        if view < self.n_large {
            &self.large
        } else {
            &self.small
        }
    }
}

/// A validated multi-crop augmentation.
#[derive(Debug, Clone)]
pub struct MultiCropAugment {
    config: MultiCropConfig,
}

/// A batch of multi-crop views: one `[N, 3, H, W]` tensor per crop index.
#[derive(Debug, Clone)]
pub struct MultiCropBatch {
    /// `crops[k]`: crop `k` of every sample, `[N, 3, H_k, W_k]`.
    pub crops: Vec<Array4<f32>>,
    /// `geometry[n][k]`: sample `n`'s crop `k`.
    pub geometry: Vec<Vec<ViewGeometry>>,
}

impl MultiCropAugment {
    pub fn new(config: MultiCropConfig) -> Result<Self, AugmentError> {
        config.validate()?;
        Ok(MultiCropAugment { config })
    }

    pub fn config(&self) -> &MultiCropConfig {
        &self.config
    }

    /// Number of views per image.
    pub fn len(&self) -> usize {
        self.config.n_large + self.config.n_small
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All views of one image, large first; `seed.view` is ignored.
    pub fn apply(&self, img: &RgbImage, seed: SampleSeed) -> Vec<View> {
        (0..self.len())
            .map(|k| {
                self.config
                    .view_config(k)
                    .apply(img, seed.with_view(k as u64))
            })
            .collect()
    }

    /// All views of every image, in parallel over samples; `sample_ids` seed them as in
    /// [`TwoViewAugment::batch`](super::TwoViewAugment::batch).
    pub fn batch(
        &self,
        images: &[RgbImage],
        sample_ids: &[u64],
        base_seed: u64,
        epoch: u64,
    ) -> MultiCropBatch {
        assert_eq!(images.len(), sample_ids.len(), "one sample id per image");
        let per_sample: Vec<Vec<View>> = images
            .par_iter()
            .zip(sample_ids.par_iter())
            .map(|(img, &id)| self.apply(img, SampleSeed::new(base_seed, epoch, id, 0)))
            .collect();
        let n = images.len();
        let crops = (0..self.len())
            .map(|k| {
                let size = self.config.view_config(k).crop.size;
                let mut t = Array4::zeros((n, 3, size.1 as usize, size.0 as usize));
                for (mut slot, views) in t.outer_iter_mut().zip(&per_sample) {
                    slot.assign(&views[k].pixels);
                }
                t
            })
            .collect();
        let geometry = per_sample
            .iter()
            .map(|vs| vs.iter().map(|v| v.geometry).collect())
            .collect();
        MultiCropBatch { crops, geometry }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swav_defaults_and_crop_sizes() {
        let aug = MultiCropAugment::new(MultiCropConfig::swav()).unwrap();
        assert_eq!(aug.len(), 8);
        let img = RgbImage::from_fn(120, 100, |x, y| image::Rgb([x as u8, y as u8, 77]));
        let views = aug.apply(&img, SampleSeed::new(3, 0, 0, 0));
        let area = 120.0 * 100.0;
        for (k, v) in views.iter().enumerate() {
            let (size, (lo, hi)) = if k < 2 {
                (224, (0.14, 1.0))
            } else {
                (96, (0.05, 0.14))
            };
            assert_eq!(v.pixels.dim(), (3, size, size));
            assert_eq!(v.geometry.out_size, (size as u32, size as u32));
            // Whole-pixel rounding of a 120x100 image can move the fraction by about 1%.
            let f = v.geometry.crop.area() as f64 / area;
            assert!(
                f > lo - 0.02 && f < hi + 0.02,
                "crop {k}: area fraction {f}"
            );
        }
        let again = aug.apply(&img, SampleSeed::new(3, 0, 0, 0));
        assert_eq!(views, again);
        let batch = aug.batch(&[img.clone(), img], &[0, 1], 3, 0);
        assert_eq!(batch.crops.len(), 8);
        assert_eq!(batch.crops[1].dim(), (2, 3, 224, 224));
        assert_eq!(batch.crops[7].dim(), (2, 3, 96, 96));
        assert_eq!(
            batch.geometry[0],
            views.iter().map(|v| v.geometry).collect::<Vec<_>>()
        );
    }
}
