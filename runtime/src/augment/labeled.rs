//! Labeled transforms: the geometric ops of [`spatial`](super::spatial) applied to an image
//! together with its boxes (xyxy pixels, one class label each) and semantic mask (`u8` label
//! map), for detection and segmentation fine-tuning.
//!
//! - The image is resampled bilinearly (Pillow's antialiased filter), the mask by nearest
//!   neighbour; mask pixels from outside the image (letterbox padding) get [`IGNORE`] (255).
//! - Boxes are mapped exactly through the geometry (a flip swaps x0/x1), clipped to the output,
//!   and dropped by [`BoxFilter`] when too little is left; labels and the boxes' source
//!   indices (`box_ids`) stay aligned with the boxes.
//! - Every sample carries its [`ViewGeometry`] relative to the *original* image; each op
//!   composes onto it, so predictions on the transformed image map back with
//!   [`ViewGeometry::box_to_original`].
//!
//! Our choice: the default [`BoxFilter`] follows Ultralytics' `box_candidates` (a box survives
//! when its clipped sides are at least 2 px and at least 10% of its area is still visible);
//! CCOP's "keeps more than 60% of its area" is `min_visible: 0.6`.

use image::{GrayImage, RgbImage};
use rand_chacha::ChaCha8Rng;

use super::geometry::{CropBox, ViewGeometry};
use super::spatial::{
    letterbox_mask, resized_crop, resized_crop_nearest, LetterboxConfig, LetterboxPlacement,
    RandomResizedCropConfig,
};
use super::AugmentError;

/// The mask value for "no label" (padding, ignored by losses and metrics).
pub const IGNORE: u8 = 255;

/// When a transformed box is kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxFilter {
    /// Minimum width and height after clipping, in output pixels. Default 2.
    pub min_side: f32,
    /// Minimum fraction of the box's area (in output pixels, before clipping) that must remain
    /// after clipping. Default 0.1.
    pub min_visible: f32,
}

impl Default for BoxFilter {
    fn default() -> Self {
        BoxFilter {
            min_side: 2.0,
            min_visible: 0.1,
        }
    }
}

impl BoxFilter {
    /// The box clipped to `[0, w] x [0, h]`, or `None` when the filter drops it.
    pub fn clip(&self, b: &CropBox, (w, h): (u32, u32)) -> Option<CropBox> {
        let full = b.area();
        let c = CropBox::new(
            b.x0.clamp(0.0, w as f32),
            b.y0.clamp(0.0, h as f32),
            b.x1.clamp(0.0, w as f32),
            b.y1.clamp(0.0, h as f32),
        );
        let keep = c.width() >= self.min_side
            && c.height() >= self.min_side
            && c.area() >= self.min_visible * full;
        keep.then_some(c)
    }
}

/// An image with its boxes, labels and optional mask, plus its geometry relative to the
/// original image.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledSample {
    pub image: RgbImage,
    /// `[x0, y0, x1, y1]` in this image's pixels.
    pub boxes: Vec<[f32; 4]>,
    /// One class label per box.
    pub labels: Vec<u32>,
    /// Index of each box in the original annotation list.
    pub box_ids: Vec<usize>,
    /// Semantic label map of the image's size, [`IGNORE`] = no label.
    pub mask: Option<GrayImage>,
    /// This image as a view of the original one.
    pub geometry: ViewGeometry,
}

impl LabeledSample {
    /// Checks the annotation: one label per box, finite ordered boxes, mask of the image's size.
    pub fn new(
        image: RgbImage,
        boxes: Vec<[f32; 4]>,
        labels: Vec<u32>,
        mask: Option<GrayImage>,
    ) -> Result<Self, AugmentError> {
        if image.width() == 0 || image.height() == 0 {
            return Err(AugmentError::EmptyImage {
                width: image.width(),
                height: image.height(),
            });
        }
        if boxes.len() != labels.len() {
            return Err(AugmentError::LabelCount {
                boxes: boxes.len(),
                labels: labels.len(),
            });
        }
        for (index, b) in boxes.iter().enumerate() {
            if !(b.iter().all(|v| v.is_finite()) && b[0] <= b[2] && b[1] <= b[3]) {
                return Err(AugmentError::InvalidBox { index, xyxy: *b });
            }
        }
        if let Some(m) = &mask {
            if m.dimensions() != image.dimensions() {
                return Err(AugmentError::MaskSize {
                    mask_width: m.width(),
                    mask_height: m.height(),
                    image_width: image.width(),
                    image_height: image.height(),
                });
            }
        }
        Ok(LabeledSample {
            geometry: ViewGeometry::identity(image.dimensions()),
            box_ids: (0..boxes.len()).collect(),
            image,
            boxes,
            labels,
            mask,
        })
    }

    fn with_boxes(
        &self,
        image: RgbImage,
        mask: Option<GrayImage>,
        step: &ViewGeometry,
        filter: &BoxFilter,
    ) -> LabeledSample {
        let mut boxes = Vec::with_capacity(self.boxes.len());
        let mut labels = Vec::with_capacity(self.boxes.len());
        let mut box_ids = Vec::with_capacity(self.boxes.len());
        for ((b, &label), &id) in self.boxes.iter().zip(&self.labels).zip(&self.box_ids) {
            let mapped = step.box_to_view(&CropBox::new(b[0], b[1], b[2], b[3]));
            if let Some(c) = filter.clip(&mapped, step.out_size) {
                boxes.push(c.to_array());
                labels.push(label);
                box_ids.push(id);
            }
        }
        LabeledSample {
            image,
            boxes,
            labels,
            box_ids,
            mask,
            geometry: self.geometry.compose(step),
        }
    }

    /// The general op: take `step.crop` of *this* image (its pixels), resize to
    /// `step.out_size`, flip if `step.flipped`. Crops should lie inside the image (the image is
    /// read only there; the mask is filled with [`IGNORE`] outside).
    pub fn warp(&self, step: &ViewGeometry, filter: &BoxFilter) -> LabeledSample {
        let image = resized_crop(&self.image, &step.crop, step.out_size, step.flipped);
        let mask = self
            .mask
            .as_ref()
            .map(|m| resized_crop_nearest(m, &step.crop, step.out_size, step.flipped, IGNORE));
        self.with_boxes(image, mask, step, filter)
    }

    fn step(&self, crop: CropBox, out_size: (u32, u32), flipped: bool) -> ViewGeometry {
        ViewGeometry {
            crop,
            flipped,
            out_size,
            image_size: self.image.dimensions(),
        }
    }

    /// Crops `crop` (this image's pixels) without resizing; the output is
    /// `round(crop width) x round(crop height)`.
    pub fn crop(&self, crop: CropBox, filter: &BoxFilter) -> LabeledSample {
        let size = (
            (crop.width().round() as u32).max(1),
            (crop.height().round() as u32).max(1),
        );
        self.warp(&self.step(crop, size, false), filter)
    }

    /// Mirrors left-right (boxes never leave the image, so none is dropped).
    pub fn hflip(&self) -> LabeledSample {
        let step = self.step(
            CropBox::full(self.image.width(), self.image.height()),
            self.image.dimensions(),
            true,
        );
        let keep_all = BoxFilter {
            min_side: f32::NEG_INFINITY,
            min_visible: f32::NEG_INFINITY,
        };
        self.warp(&step, &keep_all)
    }

    /// Resizes the whole image to `out` (width, height), aspect ratio not kept.
    pub fn resize(&self, out: (u32, u32), filter: &BoxFilter) -> LabeledSample {
        let step = self.step(
            CropBox::full(self.image.width(), self.image.height()),
            out,
            false,
        );
        self.warp(&step, filter)
    }

    /// RandomResizedCrop, then a flip with probability `flip_p`, with the randomness from `rng`.
    pub fn random_resized_crop(
        &self,
        cfg: &RandomResizedCropConfig,
        flip_p: f64,
        rng: &mut ChaCha8Rng,
        filter: &BoxFilter,
    ) -> LabeledSample {
        let crop = cfg.sample(self.image.width(), self.image.height(), rng);
        let flipped = super::coin(rng, flip_p);
        self.warp(&self.step(crop, cfg.size, flipped), filter)
    }

    /// Letterboxes image and mask (mask padding [`IGNORE`]) and maps the boxes.
    pub fn letterbox(
        &self,
        cfg: &LetterboxConfig,
        filter: &BoxFilter,
    ) -> (LabeledSample, LetterboxPlacement) {
        let (image, placement) = cfg.apply(&self.image);
        let mask = self
            .mask
            .as_ref()
            .map(|m| letterbox_mask(m, &placement, IGNORE));
        let step = placement.geometry();
        (self.with_boxes(image, mask, &step, filter), placement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::SampleSeed;
    use proptest::prelude::*;

    const BG: [u8; 3] = [60, 60, 60];
    const COLOURS: [[u8; 3]; 3] = [[240, 30, 30], [30, 240, 30], [30, 30, 240]];

    /// A 200x150 scene with three filled rectangles (labels 1, 2, 3, each its own colour),
    /// the same rectangles in the mask, and their boxes.
    fn scene() -> LabeledSample {
        let rects = [
            (20u32, 15u32, 70u32, 60u32),
            (110, 30, 180, 50),
            (60, 90, 95, 140),
        ];
        let mut image = RgbImage::from_pixel(200, 150, image::Rgb(BG));
        let mut mask = GrayImage::from_pixel(200, 150, image::Luma([0]));
        let mut boxes = vec![];
        for (k, &(x0, y0, x1, y1)) in rects.iter().enumerate() {
            for y in y0..y1 {
                for x in x0..x1 {
                    image.put_pixel(x, y, image::Rgb(COLOURS[k]));
                    mask.put_pixel(x, y, image::Luma([k as u8 + 1]));
                }
            }
            boxes.push([x0 as f32, y0 as f32, x1 as f32, y1 as f32]);
        }
        LabeledSample::new(image, boxes, vec![1, 2, 3], Some(mask)).unwrap()
    }

    fn l1(a: [u8; 3], b: [u8; 3]) -> i32 {
        (0..3).map(|c| (a[c] as i32 - b[c] as i32).abs()).sum()
    }

    /// Checks every kept box against the pixels of its colour and the mask pixels of its
    /// label; returns how many boxes had their mask compared pixel by pixel.
    ///
    /// A pixel is "clearly coloured" when it is closer to the rectangle's colour than to the
    /// background by more than rounding (a 50/50 blend +- 1.25%), "clearly not" the other way.
    /// The rectangle on a flat background is separable: a pixel's coverage is
    /// `cover_x(x) * cover_y(y)`. Along the row and the column through the box's middle (fully
    /// covered across) a pixel is majority-coloured exactly when its centre is inside the box -
    /// the mask's nearest-neighbour rule - so the mask must equal `inside_x(x) && inside_y(y)`
    /// read from them, for every pixel whose row and column are clear. After a chain of
    /// resamplings the mask's edges are quantised once per step, so disagreements are allowed
    /// for pixels whose centre lies within `band` output pixels of the box's edges (0 for a
    /// single step). So are the view's outermost rows and columns.
    fn assert_aligned(s: &LabeledSample, what: &str, band: f32) -> usize {
        let (w, h) = s.image.dimensions();
        let mask = s.mask.as_ref().unwrap();
        assert_eq!(mask.dimensions(), (w, h), "{what}");
        assert_eq!(s.labels.len(), s.boxes.len());
        assert_eq!(s.box_ids.len(), s.boxes.len());
        let mut mask_checked = 0;
        for (b, &label) in s.boxes.iter().zip(&s.labels) {
            let colour = COLOURS[label as usize - 1];
            let class = |x: u32, y: u32| -> Option<bool> {
                let p = s.image.get_pixel(x, y).0;
                let (dr, db) = (l1(p, colour), l1(p, BG));
                ((dr - db).abs() > 6).then_some(dr < db)
            };
            let labelled = |x: u32, y: u32| mask.get_pixel(x, y).0[0] == label as u8;
            let (mut lo, mut hi) = ([u32::MAX; 2], [0u32; 2]);
            let (mut mlo, mut mhi) = ([u32::MAX; 2], [0u32; 2]);
            for y in 0..h {
                for x in 0..w {
                    if class(x, y) == Some(true) {
                        lo = [lo[0].min(x), lo[1].min(y)];
                        hi = [hi[0].max(x + 1), hi[1].max(y + 1)];
                    }
                    if labelled(x, y) {
                        mlo = [mlo[0].min(x), mlo[1].min(y)];
                        mhi = [mhi[0].max(x + 1), mhi[1].max(y + 1)];
                    }
                }
            }
            if lo[0] == u32::MAX {
                // Nothing clearly coloured: only possible for a box about a pixel wide.
                assert!(
                    b[2] - b[0] <= 3.0 || b[3] - b[1] <= 3.0,
                    "{what}: {b:?} shows no pixels"
                );
                continue;
            }
            let got = [lo[0], lo[1], hi[0], hi[1]].map(|v| v as f32);
            let m = [mlo[0], mlo[1], mhi[0], mhi[1]].map(|v| v as f32);
            // One pixel for a single resampling; a chain adds its band.
            let tol = 1.0f32.max(band + 0.5);
            for i in 0..4 {
                assert!(
                    (got[i] - b[i]).abs() <= tol,
                    "{what}: label {label}: box {b:?} vs coloured pixels {got:?}"
                );
                assert!(
                    (m[i] - b[i]).abs() <= tol,
                    "{what}: label {label}: box {b:?} vs mask {m:?}"
                );
            }
            let xm = (((b[0] + b[2]) / 2.0) as u32).min(w - 1);
            let ym = (((b[1] + b[3]) / 2.0) as u32).min(h - 1);
            if l1(s.image.get_pixel(xm, ym).0, colour) > 2 {
                continue; // too thin to be fully covered anywhere
            }
            let inside_x: Vec<Option<bool>> = (0..w).map(|x| class(x, ym)).collect();
            let inside_y: Vec<Option<bool>> = (0..h).map(|y| class(xm, y)).collect();
            for y in 0..h {
                for x in 0..w {
                    if let (Some(ix), Some(iy)) = (inside_x[x as usize], inside_y[y as usize]) {
                        let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
                        let near_edge = [cx - b[0], b[2] - cx, cy - b[1], b[3] - cy]
                            .iter()
                            .any(|d| d.abs() <= band);
                        // The view's outermost pixels see a one-sided filter (Pillow reads only
                        // inside the crop), which shifts their 50% point.
                        let view_border = x == 0 || y == 0 || x == w - 1 || y == h - 1;
                        assert!(
                            labelled(x, y) == (ix && iy) || near_edge || view_border,
                            "{what}: label {label}, box {b:?}: mask and pixels disagree at ({x}, {y}); geometry {:?}",
                            s.geometry
                        );
                    }
                }
            }
            mask_checked += 1;
        }
        mask_checked
    }

    #[test]
    fn plain_ops_keep_boxes_masks_and_pixels_aligned() {
        let s = scene();
        assert_eq!(assert_aligned(&s, "original", 0.0), 3);
        assert_eq!(assert_aligned(&s.hflip(), "hflip", 0.0), 3);
        assert_eq!(
            assert_aligned(
                &s.resize((77, 91), &BoxFilter::default()),
                "resize down",
                0.0
            ),
            3
        );
        assert_eq!(
            assert_aligned(
                &s.resize((431, 260), &BoxFilter::default()),
                "resize up",
                0.0
            ),
            3
        );
        let cropped = s.crop(
            CropBox::new(40.0, 20.0, 150.0, 120.0),
            &BoxFilter::default(),
        );
        assert_eq!(assert_aligned(&cropped, "crop", 0.0), 3);
        // Box 0 is cut at x = 40, y = 20: clipped, not dropped.
        assert_eq!(cropped.boxes[0], [0.0, 0.0, 30.0, 40.0]);
        let (lb, p) = s.letterbox(
            &LetterboxConfig {
                size: (128, 128),
                ..Default::default()
            },
            &BoxFilter::default(),
        );
        assert_eq!(p.offset, (0, 16));
        assert_eq!(assert_aligned(&lb, "letterbox", 0.0), 3);
        let mask = lb.mask.as_ref().unwrap();
        assert_eq!(mask.get_pixel(5, 5).0[0], IGNORE);
        assert_eq!(mask.get_pixel(5, 120).0[0], IGNORE);
        assert_eq!(mask.get_pixel(5, 20).0[0], 0);
        // Chains compose their geometry: a point of the final view maps back to the original.
        let chain = lb.hflip().crop(
            CropBox::new(10.0, 20.0, 100.0, 110.0),
            &BoxFilter::default(),
        );
        // Letterbox (0.64 output px per original px), then exact flip and crop: one resampling.
        assert!(assert_aligned(&chain, "letterbox + flip + crop", 0.0) >= 2);
        for (b, id) in chain.boxes.iter().zip(&chain.box_ids) {
            let back = chain
                .geometry
                .box_to_original(&CropBox::new(b[0], b[1], b[2], b[3]));
            let orig = CropBox::new(
                s.boxes[*id][0],
                s.boxes[*id][1],
                s.boxes[*id][2],
                s.boxes[*id][3],
            );
            // Clipping can only shrink a box.
            assert!(
                back.x0 >= orig.x0 - 1e-3 && back.x1 <= orig.x1 + 1e-3,
                "{back:?} {orig:?}"
            );
            assert!(
                back.y0 >= orig.y0 - 1e-3 && back.y1 <= orig.y1 + 1e-3,
                "{back:?} {orig:?}"
            );
        }
    }

    #[test]
    fn boxes_mostly_outside_are_dropped_with_their_labels() {
        let s = scene();
        // Keeps x in [60, 200): box 0 (20..70) keeps 10 of 50 px = 20%; box 2 (60..95) all.
        let c = s.crop(CropBox::new(60.0, 0.0, 200.0, 150.0), &BoxFilter::default());
        assert_eq!(c.labels, vec![1, 2, 3]);
        let strict = BoxFilter {
            min_visible: 0.6,
            ..Default::default()
        };
        let c = s.crop(CropBox::new(60.0, 0.0, 200.0, 150.0), &strict);
        assert_eq!(c.labels, vec![2, 3]);
        assert_eq!(c.box_ids, vec![1, 2]);
        assert_eq!(c.boxes[1], [0.0, 90.0, 35.0, 140.0]);
        // A sliver under min_side goes too.
        let c = s.crop(
            CropBox::new(69.0, 0.0, 200.0, 150.0),
            &BoxFilter {
                min_visible: 0.0,
                ..Default::default()
            },
        );
        assert_eq!(c.labels, vec![2, 3]);
    }

    #[test]
    fn bad_annotations_are_reported() {
        let img = RgbImage::new(10, 10);
        assert!(matches!(
            LabeledSample::new(img.clone(), vec![[0.0, 0.0, 1.0, 1.0]], vec![], None),
            Err(AugmentError::LabelCount {
                boxes: 1,
                labels: 0
            })
        ));
        assert!(matches!(
            LabeledSample::new(img.clone(), vec![[5.0, 0.0, 1.0, 1.0]], vec![0], None),
            Err(AugmentError::InvalidBox { index: 0, .. })
        ));
        assert!(matches!(
            LabeledSample::new(img.clone(), vec![[0.0, f32::NAN, 1.0, 1.0]], vec![0], None),
            Err(AugmentError::InvalidBox { index: 0, .. })
        ));
        assert!(matches!(
            LabeledSample::new(img, vec![], vec![], Some(GrayImage::new(9, 10))),
            Err(AugmentError::MaskSize { mask_width: 9, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        /// Random crops (any scale, flips), then maybe a resize or a letterbox: boxes, masks and
        /// pixels stay aligned after every step.
        #[test]
        fn random_chains_keep_alignment(seed in any::<u64>(), out_w in 24u32..160, out_h in 24u32..160,
                                        then in 0u8..3, lb in 32u32..200) {
            let s = scene();
            let cfg = RandomResizedCropConfig { size: (out_w, out_h), scale: (0.1, 1.0), ..Default::default() };
            let mut rng = SampleSeed::new(seed, 0, 0, 0).rng();
            let v = s.random_resized_crop(&cfg, 0.5, &mut rng, &BoxFilter::default());
            assert_aligned(&v, "random resized crop", 0.0);
            let next = match then {
                0 => v.resize((out_h, out_w), &BoxFilter::default()),
                1 => v.letterbox(&LetterboxConfig { size: (lb, lb * 3 / 4), ..Default::default() }, &BoxFilter::default()).0,
                _ => v.hflip(),
            };
            // Output pixels per pixel of the first view: the first step's mask quantisation
            // (half a pixel) seen at the second step's scale, plus the second's own half pixel.
            let (s1, s2) = (v.geometry.scale(), next.geometry.scale());
            let zoom = (s1.0 / s2.0).max(s1.1 / s2.1) as f32;
            let band = if then == 2 { 0.0 } else { 0.5 * zoom + 0.5 + 1e-3 };
            assert_aligned(&next, "second step", band);
            // The composed geometry is the sampled crop's.
            prop_assert_eq!(v.geometry.image_size, (200, 150));
        }
    }
}
