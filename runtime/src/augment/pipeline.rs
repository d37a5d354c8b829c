//! View pipelines: one augmented view from a [`ViewConfig`], the two-view presets of the
//! contrastive methods, and batches computed in parallel (rayon over samples).
//!
//! A view is torchvision's
//! `Compose([RandomResizedCrop, RandomHorizontalFlip, RandomApply([ColorJitter], p),
//! RandomGrayscale(p), RandomApply([GaussianBlur], p), RandomApply([solarize], p), ToTensor,
//! Normalize])`. MoCo-v2's code flips last and PixPro's (BYOL's) right after the crop; every
//! photometric op here commutes with a left-right flip (the blur kernel is symmetric), so densa
//! folds the flip into the resampling, which costs nothing.
//!
//! Presets (the papers' official code):
//! - [`TwoViewConfig::moco_v2`]: both views RandomResizedCrop(224, scale (0.2, 1)), jitter
//!   (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, blur sigma (0.1, 2) p 0.5, flip p 0.5.
//! - [`TwoViewConfig::pixpro`]: BYOL's asymmetric pair as PixPro's code uses it: crop scale
//!   (0.08, 1), jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2; view 1 blur p 1.0; view 2
//!   blur p 0.1 and solarize p 0.2.

use std::path::{Path, PathBuf};

use image::RgbImage;
use ndarray::{Array3, Array4, ArrayViewMut3};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::geometry::ViewGeometry;
use super::photometric::{
    grayscale_in_place, solarize, ColorJitterConfig, GaussianBlurConfig, Normalize,
};
use super::spatial::{resized_crop, RandomResizedCropConfig};
use super::{check_probability, coin, AugmentError, SampleSeed};

/// The recipe of one view. Setting a probability to 0 disables that step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewConfig {
    pub crop: RandomResizedCropConfig,
    /// Probability of a horizontal flip. Default 0.5.
    pub flip_p: f64,
    pub jitter: ColorJitterConfig,
    /// `RandomGrayscale(p)`. Default 0.2.
    pub grayscale_p: f64,
    pub blur: GaussianBlurConfig,
    /// Probability of solarizing. Default 0 (BYOL/PixPro's second view: 0.2).
    pub solarize_p: f64,
    /// Values `>= threshold` are inverted. Default 128 (Pillow's `ImageOps.solarize`).
    pub solarize_threshold: u8,
    pub normalize: Normalize,
}

impl Default for ViewConfig {
    /// MoCo-v2's view.
    fn default() -> Self {
        ViewConfig::moco_v2()
    }
}

impl ViewConfig {
    /// MoCo-v2's augmentation (`main_moco.py --aug-plus`).
    pub fn moco_v2() -> Self {
        ViewConfig {
            crop: RandomResizedCropConfig {
                scale: (0.2, 1.0),
                ..Default::default()
            },
            flip_p: 0.5,
            jitter: ColorJitterConfig::default(),
            grayscale_p: 0.2,
            blur: GaussianBlurConfig::default(),
            solarize_p: 0.0,
            solarize_threshold: 128,
            normalize: Normalize::default(),
        }
    }

    pub fn validate(&self) -> Result<(), AugmentError> {
        self.crop.validate()?;
        check_probability("flip_p", self.flip_p)?;
        self.jitter.validate()?;
        check_probability("grayscale_p", self.grayscale_p)?;
        self.blur.validate()?;
        check_probability("solarize_p", self.solarize_p)?;
        self.normalize.validate()
    }

    /// The augmented view as 8-bit pixels, and its geometry. All randomness comes from `rng`.
    pub fn render(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> (RgbImage, ViewGeometry) {
        let crop = self.crop.sample(img.width(), img.height(), rng);
        let flipped = coin(rng, self.flip_p);
        let mut out = resized_crop(img, &crop, self.crop.size, flipped);
        self.jitter.apply(&mut out, rng);
        if coin(rng, self.grayscale_p) {
            grayscale_in_place(&mut out);
        }
        self.blur.apply(&mut out, rng);
        if coin(rng, self.solarize_p) {
            solarize(&mut out, self.solarize_threshold);
        }
        let geometry = ViewGeometry {
            crop,
            flipped,
            out_size: self.crop.size,
            image_size: img.dimensions(),
        };
        (out, geometry)
    }

    /// The view normalised into `out` (`[3, H, W]`), seeded by `seed` alone.
    pub fn apply_into(
        &self,
        img: &RgbImage,
        seed: SampleSeed,
        out: ArrayViewMut3<f32>,
    ) -> ViewGeometry {
        let (pixels, geometry) = self.render(img, &mut seed.rng());
        self.normalize.write_chw(&pixels, out);
        geometry
    }

    /// The normalised view, seeded by `seed` alone.
    pub fn apply(&self, img: &RgbImage, seed: SampleSeed) -> View {
        let (h, w) = (self.crop.size.1 as usize, self.crop.size.0 as usize);
        let mut pixels = Array3::zeros((3, h, w));
        let geometry = self.apply_into(img, seed, pixels.view_mut());
        View { pixels, geometry }
    }
}

/// A normalised view and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// `[3, H, W]`, `(x / 255 - mean) / std`.
    pub pixels: Array3<f32>,
    pub geometry: ViewGeometry,
}

/// The two views of a contrastive method (possibly asymmetric).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TwoViewConfig {
    pub view1: ViewConfig,
    pub view2: ViewConfig,
}

impl Default for TwoViewConfig {
    fn default() -> Self {
        TwoViewConfig::moco_v2()
    }
}

impl TwoViewConfig {
    /// MoCo-v2 (and DenseCL, DetCo, RegionCL, which reuse it): two views of the same recipe.
    pub fn moco_v2() -> Self {
        TwoViewConfig {
            view1: ViewConfig::moco_v2(),
            view2: ViewConfig::moco_v2(),
        }
    }

    /// PixPro's asymmetric pair (BYOL's augmentation with crop scale (0.08, 1)).
    pub fn pixpro() -> Self {
        let base = ViewConfig {
            crop: RandomResizedCropConfig {
                scale: (0.08, 1.0),
                ..Default::default()
            },
            jitter: ColorJitterConfig {
                saturation: 0.2,
                ..Default::default()
            },
            ..ViewConfig::moco_v2()
        };
        TwoViewConfig {
            view1: ViewConfig {
                blur: GaussianBlurConfig {
                    p: 1.0,
                    ..base.blur
                },
                ..base
            },
            view2: ViewConfig {
                blur: GaussianBlurConfig {
                    p: 0.1,
                    ..base.blur
                },
                solarize_p: 0.2,
                ..base
            },
        }
    }

    pub fn validate(&self) -> Result<(), AugmentError> {
        self.view1.validate()?;
        self.view2.validate()
    }
}

/// A validated two-view augmentation.
#[derive(Debug, Clone)]
pub struct TwoViewAugment {
    config: TwoViewConfig,
}

/// Two batches of views, `views[0][n]` and `views[1][n]` from sample `n`.
#[derive(Debug, Clone)]
pub struct TwoViewBatch {
    /// `[N, 3, H1, W1]` and `[N, 3, H2, W2]`.
    pub views: [Array4<f32>; 2],
    /// Per sample: the geometry of its view 1 and view 2.
    pub geometry: Vec<[ViewGeometry; 2]>,
}

impl Default for TwoViewBatch {
    /// Empty tensors, to be filled by [`TwoViewAugment::batch_into`].
    fn default() -> Self {
        TwoViewBatch {
            views: [Array4::zeros((0, 3, 0, 0)), Array4::zeros((0, 3, 0, 0))],
            geometry: vec![],
        }
    }
}

impl TwoViewAugment {
    pub fn new(config: TwoViewConfig) -> Result<Self, AugmentError> {
        config.validate()?;
        Ok(TwoViewAugment { config })
    }

    pub fn config(&self) -> &TwoViewConfig {
        &self.config
    }

    /// The two views of one image; `seed.view` is ignored (views 0 and 1 are used).
    pub fn apply(&self, img: &RgbImage, seed: SampleSeed) -> [View; 2] {
        [
            self.config.view1.apply(img, seed.with_view(0)),
            self.config.view2.apply(img, seed.with_view(1)),
        ]
    }

    fn batch_with<T: Sync>(
        &self,
        items: &[T],
        sample_ids: &[u64],
        base_seed: u64,
        epoch: u64,
        out: &mut TwoViewBatch,
        load: impl Fn(&T) -> Result<std::borrow::Cow<'_, RgbImage>, AugmentError> + Sync,
    ) -> Result<(), AugmentError> {
        assert_eq!(items.len(), sample_ids.len(), "one sample id per image");
        let n = items.len();
        let dims = |v: &ViewConfig| (3, v.crop.size.1 as usize, v.crop.size.0 as usize);
        let (d1, d2) = (dims(&self.config.view1), dims(&self.config.view2));
        for (t, (c, h, w)) in out.views.iter_mut().zip([d1, d2]) {
            if t.dim() != (n, c, h, w) || !t.is_standard_layout() {
                *t = Array4::zeros((n, c, h, w));
            }
        }
        let [v1, v2] = &mut out.views;
        let s1 = v1.as_slice_mut().expect("standard layout");
        let s2 = v2.as_slice_mut().expect("standard layout");
        let (per1, per2) = (d1.0 * d1.1 * d1.2, d2.0 * d2.1 * d2.2);
        let geometry = s1
            .par_chunks_mut(per1.max(1))
            .zip(s2.par_chunks_mut(per2.max(1)))
            .zip(items.par_iter().zip(sample_ids.par_iter()))
            .map(|((o1, o2), (item, &id))| {
                let img = load(item)?;
                let seed = SampleSeed::new(base_seed, epoch, id, 0);
                let view = |c: &ViewConfig, o: &mut [f32], d, s: SampleSeed| {
                    let out = ArrayViewMut3::from_shape(d, o).expect("chunk sized from the view");
                    c.apply_into(&img, s, out)
                };
                Ok([
                    view(&self.config.view1, o1, d1, seed.with_view(0)),
                    view(&self.config.view2, o2, d2, seed.with_view(1)),
                ])
            })
            .collect::<Result<Vec<_>, AugmentError>>()?;
        out.geometry = geometry;
        Ok(())
    }

    /// Both views of every image, in parallel over samples (rayon's global pool).
    /// `sample_ids[n]` is image `n`'s index in the dataset: it seeds its views, so a sample
    /// gets the same views whatever batch or thread it lands in.
    pub fn batch(
        &self,
        images: &[RgbImage],
        sample_ids: &[u64],
        base_seed: u64,
        epoch: u64,
    ) -> TwoViewBatch {
        let mut out = TwoViewBatch::default();
        self.batch_with(images, sample_ids, base_seed, epoch, &mut out, |img| {
            Ok(std::borrow::Cow::Borrowed(img))
        })
        .expect("borrowing an image cannot fail");
        out
    }

    /// As [`batch`](Self::batch), decoding the image files inside the parallel loop. Fails with
    /// the first file that does not decode.
    pub fn batch_from_files(
        &self,
        paths: &[PathBuf],
        sample_ids: &[u64],
        base_seed: u64,
        epoch: u64,
    ) -> Result<TwoViewBatch, AugmentError> {
        let mut out = TwoViewBatch::default();
        self.batch_from_files_into(paths, sample_ids, base_seed, epoch, &mut out)?;
        Ok(out)
    }

    /// As [`batch_from_files`](Self::batch_from_files), writing into `out` and reusing its
    /// tensors when they have the right shape (a training loop keeps one batch alive and
    /// saves allocating and page-faulting ~19 MB per 32 x 224 px batch).
    pub fn batch_from_files_into(
        &self,
        paths: &[PathBuf],
        sample_ids: &[u64],
        base_seed: u64,
        epoch: u64,
        out: &mut TwoViewBatch,
    ) -> Result<(), AugmentError> {
        self.batch_with(paths, sample_ids, base_seed, epoch, out, |p| {
            decode_image(p).map(std::borrow::Cow::Owned)
        })
    }

    /// As [`batch`](Self::batch), writing into `out` (reusing its tensors when they fit).
    pub fn batch_into(
        &self,
        images: &[RgbImage],
        sample_ids: &[u64],
        base_seed: u64,
        epoch: u64,
        out: &mut TwoViewBatch,
    ) {
        self.batch_with(images, sample_ids, base_seed, epoch, out, |img| {
            Ok(std::borrow::Cow::Borrowed(img))
        })
        .expect("borrowing an image cannot fail")
    }
}

/// Two views of every image with MoCo-v2's default pipeline, or any other; see
/// [`TwoViewAugment::batch`].
pub fn augment_two_view_batch(
    augment: &TwoViewAugment,
    images: &[RgbImage],
    sample_ids: &[u64],
    base_seed: u64,
    epoch: u64,
) -> TwoViewBatch {
    augment.batch(images, sample_ids, base_seed, epoch)
}

/// Stacks same-sized views into a batch.
///
/// # Shapes
/// `views[i].pixels`: `[3, H, W]`; returns `[N, 3, H, W]`.
pub fn stack_views(views: &[View]) -> Result<Array4<f32>, AugmentError> {
    let Some(first) = views.first() else {
        return Ok(Array4::zeros((0, 3, 0, 0)));
    };
    let expected: [usize; 3] = first.pixels.dim().into();
    for (index, v) in views.iter().enumerate() {
        let got: [usize; 3] = v.pixels.dim().into();
        if got != expected {
            return Err(AugmentError::ViewShape {
                index,
                got,
                expected,
            });
        }
    }
    let [c, h, w] = expected;
    let mut out = Array4::zeros((views.len(), c, h, w));
    for (mut slot, v) in out.outer_iter_mut().zip(views) {
        slot.assign(&v.pixels);
    }
    Ok(out)
}

/// Decodes an image file (PNG, JPEG, BMP, WebP; format sniffed from the bytes) to 8-bit RGB.
pub fn decode_image(path: &Path) -> Result<RgbImage, AugmentError> {
    let fail = |message: String| AugmentError::Decode {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    decode_image_bytes(&bytes, path)
}

/// Decodes image bytes; `path` names them in errors.
pub fn decode_image_bytes(bytes: &[u8], path: &Path) -> Result<RgbImage, AugmentError> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| AugmentError::Decode {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .into_rgb8();
    if img.width() == 0 || img.height() == 0 {
        return Err(AugmentError::EmptyImage {
            width: img.width(),
            height: img.height(),
        });
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                if (x / 8 + y / 8) % 2 == 0 { 30 } else { 220 },
            ])
        })
    }

    fn small(cfg: ViewConfig) -> ViewConfig {
        ViewConfig {
            crop: RandomResizedCropConfig {
                size: (32, 24),
                ..cfg.crop
            },
            ..cfg
        }
    }

    fn two_small(cfg: TwoViewConfig) -> TwoViewAugment {
        TwoViewAugment::new(TwoViewConfig {
            view1: small(cfg.view1),
            view2: small(cfg.view2),
        })
        .unwrap()
    }

    #[test]
    fn same_seed_same_views_different_seeds_differ() {
        let img = scene(80, 60);
        let aug = two_small(TwoViewConfig::moco_v2());
        let a = aug.apply(&img, SampleSeed::new(1, 0, 5, 0));
        let b = aug.apply(&img, SampleSeed::new(1, 0, 5, 0));
        assert_eq!(a, b);
        assert_ne!(a[0], a[1], "the two views of one sample differ");
        for other in [
            SampleSeed::new(2, 0, 5, 0),
            SampleSeed::new(1, 1, 5, 0),
            SampleSeed::new(1, 0, 6, 0),
        ] {
            let c = aug.apply(&img, other);
            assert_ne!(a[0], c[0], "{other:?}");
        }
    }

    #[test]
    fn batches_do_not_depend_on_threads_or_batch_composition() {
        let imgs: Vec<RgbImage> = (0..6).map(|i| scene(50 + i * 7, 40 + i * 3)).collect();
        let ids: Vec<u64> = (100..106).collect();
        let aug = two_small(TwoViewConfig::pixpro());
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| aug.batch(&imgs, &ids, 9, 3));
        let many = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap()
            .install(|| aug.batch(&imgs, &ids, 9, 3));
        assert_eq!(one.views, many.views);
        assert_eq!(one.geometry, many.geometry);
        // Reusing a batch (even one of another shape) gives the same result.
        let mut reused = TwoViewBatch::default();
        aug.batch_into(&imgs[..2], &ids[..2], 9, 3, &mut reused);
        aug.batch_into(&imgs, &ids, 9, 3, &mut reused);
        let before = reused.views[0].as_ptr();
        aug.batch_into(&imgs, &ids, 9, 3, &mut reused);
        assert_eq!(
            reused.views[0].as_ptr(),
            before,
            "same-shaped batch is reused in place"
        );
        assert_eq!(reused.views, one.views);
        assert_eq!(reused.geometry, one.geometry);
        // Sample 103 alone gets the same views as inside the batch.
        let alone = aug.apply(&imgs[3], SampleSeed::new(9, 3, 103, 0));
        assert_eq!(
            alone[0].pixels,
            one.views[0].index_axis(ndarray::Axis(0), 3)
        );
        assert_eq!(alone[1].geometry, one.geometry[3][1]);
    }

    #[test]
    fn pixpro_preset_is_asymmetric_and_valid() {
        let c = TwoViewConfig::pixpro();
        c.validate().unwrap();
        assert_eq!(c.view1.blur.p, 1.0);
        assert_eq!((c.view2.blur.p, c.view2.solarize_p), (0.1, 0.2));
        assert_eq!(c.view1.crop.scale, (0.08, 1.0));
        let m = TwoViewConfig::moco_v2();
        assert_eq!(m.view1.crop.scale, (0.2, 1.0));
        assert_eq!(
            (
                m.view1.jitter.brightness,
                m.view1.jitter.hue,
                m.view1.jitter.p
            ),
            (0.4, 0.1, 0.8)
        );
    }

    #[test]
    fn view_geometry_describes_the_pixels() {
        // With photometric ops off, a view equals resized_crop of its recorded geometry.
        let img = scene(90, 70);
        let cfg = ViewConfig {
            jitter: ColorJitterConfig {
                p: 0.0,
                ..Default::default()
            },
            grayscale_p: 0.0,
            blur: GaussianBlurConfig {
                p: 0.0,
                ..Default::default()
            },
            normalize: Normalize {
                mean: [0.0; 3],
                std: [1.0 / 255.0; 3],
            },
            ..small(ViewConfig::moco_v2())
        };
        let mut flips = 0;
        for i in 0..20 {
            let v = cfg.apply(&img, SampleSeed::new(0, 0, i, 0));
            let g = v.geometry;
            flips += g.flipped as usize;
            let expect = resized_crop(&img, &g.crop, g.out_size, g.flipped);
            let got = v.pixels.mapv(|x| x.round() as u8);
            for ((c, y, x), val) in got.indexed_iter() {
                assert_eq!(*val, expect.get_pixel(x as u32, y as u32).0[c]);
            }
        }
        assert!(flips > 0 && flips < 20);
    }

    #[test]
    fn bad_files_and_shapes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.jpg");
        std::fs::write(&path, b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
        let err = decode_image(&path).unwrap_err();
        assert!(err.to_string().contains("broken.jpg"), "{err}");
        let aug = two_small(TwoViewConfig::moco_v2());
        let err = aug
            .batch_from_files(std::slice::from_ref(&path), &[0], 0, 0)
            .unwrap_err();
        assert!(matches!(err, AugmentError::Decode { .. }));
        let a = View {
            pixels: Array3::zeros((3, 4, 4)),
            geometry: ViewGeometry::identity((4, 4)),
        };
        let b = View {
            pixels: Array3::zeros((3, 4, 5)),
            ..a.clone()
        };
        assert_eq!(
            stack_views(&[a.clone(), a.clone()]).unwrap().dim(),
            (2, 3, 4, 4)
        );
        assert!(matches!(
            stack_views(&[a, b]),
            Err(AugmentError::ViewShape { index: 1, .. })
        ));
        let bad = TwoViewConfig {
            view2: ViewConfig {
                flip_p: 1.5,
                ..ViewConfig::moco_v2()
            },
            ..TwoViewConfig::moco_v2()
        };
        assert!(matches!(
            TwoViewAugment::new(bad),
            Err(AugmentError::InvalidConfig {
                field: "flip_p",
                ..
            })
        ));
    }
}
