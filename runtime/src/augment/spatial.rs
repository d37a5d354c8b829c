//! Spatial transforms: RandomResizedCrop, resizing, horizontal flip, letterbox.
//!
//! - **RandomResizedCrop** samples its box exactly as torchvision 0.14's
//!   `RandomResizedCrop.get_params`: up to 10 attempts of (area fraction uniform in `scale`,
//!   log-aspect uniform in `log(ratio)`), width/height rounded half-to-even like Python's
//!   `round`, accepted when the box fits; then a centre crop clamped to the ratio range.
//!   Boxes are whole pixels.
//! - **Resizing** is Pillow's `Image.resize(..., BILINEAR)`, which torchvision uses on PIL
//!   images: a separable triangle filter whose support grows with the downscaling factor
//!   (i.e. *antialiased*, like torchvision's tensor `resize(antialias=True)`; torchvision 0.14's
//!   tensor default `antialias=False` aliases on downscaling and is not what PIL pipelines such
//!   as MoCo's do). Same coefficient formula, same 22-bit fixed-point arithmetic, horizontal
//!   pass first with a `u8` intermediate, as Pillow 9.4 (`libImaging/Resample.c`). A crop is
//!   resampled as torchvision's `resized_crop` does on PIL images: crop to whole pixels first
//!   (so the filter never reads outside the crop), then resize.
//! - **Label maps** use nearest neighbour: output pixel `u` reads source pixel
//!   `floor(x0 + (u + 0.5) * scale)`; pixels outside the image get the fill value (255 =
//!   ignore). Pillow's NEAREST uses 16.16 fixed point and can differ on exact ties.
//! - **Letterbox** (YOLO-style, our integer choices): scale `r = min(W'/W, H'/H)` (`<= 1` unless
//!   `scale_up`), resized size `round(W r) x round(H r)`, placed at offset
//!   `((W' - w) / 2, (H' - h) / 2)` (integer division), the rest filled with `pad_value`.

use image::{GrayImage, RgbImage};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::geometry::{CropBox, ViewGeometry};
use super::{check_interval, uniform, AugmentError};

/// torchvision's `RandomResizedCrop(size, scale, ratio)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomResizedCropConfig {
    /// Output (width, height). Default 224x224.
    pub size: (u32, u32),
    /// Range of the crop's area as a fraction of the image's. Default (0.08, 1.0)
    /// (torchvision; MoCo-v2 uses (0.2, 1.0), PixPro (0.08, 1.0)).
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio (width / height). Default (3/4, 4/3).
    pub ratio: (f64, f64),
}

impl Default for RandomResizedCropConfig {
    fn default() -> Self {
        RandomResizedCropConfig {
            size: (224, 224),
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

impl RandomResizedCropConfig {
    pub fn validate(&self) -> Result<(), AugmentError> {
        if self.size.0 == 0 || self.size.1 == 0 {
            return Err(AugmentError::InvalidConfig {
                field: "random_resized_crop.size",
                value: format!("{:?}", self.size),
                expected: "a positive width and height",
            });
        }
        check_interval(
            "random_resized_crop.scale",
            self.scale,
            0.0,
            "0 <= min <= max (area fractions)",
        )?;
        if self.scale.1 <= 0.0 {
            return Err(AugmentError::InvalidConfig {
                field: "random_resized_crop.scale",
                value: format!("{:?}", self.scale),
                expected: "a positive maximum area fraction",
            });
        }
        check_interval(
            "random_resized_crop.ratio",
            self.ratio,
            f64::MIN_POSITIVE,
            "0 < min <= max (aspect ratios)",
        )
    }

    /// The crop box (whole pixels) for a `width x height` image, torchvision's `get_params`.
    pub fn sample(&self, width: u32, height: u32, rng: &mut ChaCha8Rng) -> CropBox {
        let (wi, hi) = (width as i64, height as i64);
        let area = (wi * hi) as f64;
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect = uniform(rng, lr0, lr1).exp();
            let w = (target_area * aspect).sqrt().round_ties_even() as i64;
            let h = (target_area / aspect).sqrt().round_ties_even() as i64;
            if 0 < w && w <= wi && 0 < h && h <= hi {
                let top = rng.random_range(0..=hi - h);
                let left = rng.random_range(0..=wi - w);
                return pixel_box(left, top, w, h);
            }
        }
        let (w, h) = centre_fallback_size(width, height, self.ratio);
        pixel_box((wi - w) / 2, (hi - h) / 2, w, h)
    }

    /// Samples a crop and resamples it to `size` (not flipped).
    pub fn apply(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> (RgbImage, ViewGeometry) {
        let crop = self.sample(img.width(), img.height(), rng);
        let out = resized_crop(img, &crop, self.size, false);
        (
            out,
            ViewGeometry {
                crop,
                flipped: false,
                out_size: self.size,
                image_size: img.dimensions(),
            },
        )
    }
}

/// The centre crop torchvision falls back to after 10 failed attempts: the whole image,
/// narrowed to the nearest aspect ratio inside `ratio`.
pub fn centre_fallback_size(width: u32, height: u32, ratio: (f64, f64)) -> (i64, i64) {
    let (w, h) = (width as i64, height as i64);
    let in_ratio = width as f64 / height as f64;
    let (rmin, rmax) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    if in_ratio < rmin {
        (w, ((w as f64 / rmin).round_ties_even() as i64).max(1))
    } else if in_ratio > rmax {
        (((h as f64 * rmax).round_ties_even() as i64).max(1), h)
    } else {
        (w, h)
    }
}

fn pixel_box(left: i64, top: i64, w: i64, h: i64) -> CropBox {
    CropBox::new(left as f32, top as f32, (left + w) as f32, (top + h) as f32)
}

/// Pillow's fixed-point precision for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel filter taps along one axis (Pillow's `precompute_coeffs`).
struct Taps {
    /// First source index of each output pixel (absolute, in the uncropped image).
    start: Vec<usize>,
    /// Number of taps of each output pixel.
    count: Vec<usize>,
    /// `ksize` fixed-point weights per output pixel.
    weights: Vec<i32>,
    ksize: usize,
}

/// Triangle-filter taps resampling source span `[in0, in1)` to `out_size` pixels, reading
/// only source pixels in `clip` (`[clip.0, clip.1)`, whole pixels).
fn bilinear_taps(in0: f64, in1: f64, clip: (usize, usize), out_size: usize) -> Taps {
    // Pillow works on the cropped image: coordinates relative to the clip origin.
    let in_size = (clip.1 - clip.0) as i64;
    let in0 = in0 - clip.0 as f64;
    let in1 = in1 - clip.0 as f64;
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the triangle filter's support is 1
    let ksize = support.ceil() as usize * 2 + 1;
    let mut taps = Taps {
        start: Vec::with_capacity(out_size),
        count: Vec::with_capacity(out_size),
        weights: vec![0; out_size * ksize],
        ksize,
    };
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; negatives are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size);
        let count = (xmax - xmin).max(0) as usize;
        let mut total = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(count) {
            let t = ((x as i64 + xmin) as f64 - center + 0.5) * ss;
            *wx = (1.0 - t.abs()).max(0.0);
            total += *wx;
        }
        let k = &mut taps.weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..count {
            let v = if total != 0.0 { w[x] / total } else { w[x] };
            k[x] = if v < 0.0 {
                (-0.5 + v * (1 << PRECISION_BITS) as f64) as i32
            } else {
                (0.5 + v * (1 << PRECISION_BITS) as f64) as i32
            };
        }
        taps.start.push(xmin as usize + clip.0);
        taps.count.push(count);
    }
    taps
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's horizontal pass (`ImagingResampleHorizontal_8bpc`) of one source row into `dst`.
///
/// Each pixel accumulates in four lanes (`C <= 4` channels, the rest zero) so that a tap is one
/// vector multiply-add. No clamp is needed before narrowing: the triangle filter's weights are
/// non-negative and sum to `2^22` up to half a unit each, so `acc` stays in `[2^21, 256 * 2^22)`
/// (Pillow clamps because its other filters have negative lobes).
#[inline(always)]
fn horizontal_row<const C: usize>(srow: &[u8], hx: &Taps, dst: &mut [u8]) {
    let half = 1i32 << (PRECISION_BITS - 1);
    for (xx, out_px) in dst.chunks_exact_mut(C).enumerate() {
        let n = hx.count[xx];
        let k = &hx.weights[xx * hx.ksize..xx * hx.ksize + n];
        let s0 = hx.start[xx] * C;
        let taps = &srow[s0..s0 + n * C];
        let mut acc = [half; 4];
        for (p, &w) in taps.chunks_exact(C).zip(k) {
            let mut v = [0i32; 4];
            for c in 0..C {
                v[c] = p[c] as i32;
            }
            for c in 0..4 {
                acc[c] += v[c] * w;
            }
        }
        for c in 0..C {
            debug_assert!((0..256 << PRECISION_BITS).contains(&acc[c]));
            out_px[c] = (acc[c] >> PRECISION_BITS) as u8;
        }
    }
}

/// Pixel span of a float box, clipped to `[0, limit)`: `[floor(lo), ceil(hi))`.
fn clip_span(lo: f32, hi: f32, limit: u32) -> (usize, usize) {
    let a = (lo.floor().max(0.0) as usize).min(limit as usize);
    let b = (hi.ceil().max(0.0) as usize).min(limit as usize);
    (a, b.max(a))
}

/// Antialiased bilinear resampling of `crop` (source pixels, inside the image) to `out`
/// (width, height), mirrored left-right when `flip`; `C` interleaved channels.
#[inline(always)]
fn resample_bilinear<const C: usize>(
    src: &[u8],
    (sw, sh): (u32, u32),
    crop: &CropBox,
    (ow, oh): (u32, u32),
    flip: bool,
) -> Vec<u8> {
    const { assert!(C <= 4, "horizontal_row accumulates at most 4 channels") };
    let (ow, oh) = (ow as usize, oh as usize);
    let xclip = clip_span(crop.x0, crop.x1, sw);
    let yclip = clip_span(crop.y0, crop.y1, sh);
    let mut out = vec![0u8; ow * oh * C];
    if xclip.1 == xclip.0 || yclip.1 == yclip.0 || ow == 0 || oh == 0 {
        return out;
    }
    let hx = bilinear_taps(crop.x0 as f64, crop.x1 as f64, xclip, ow);
    let vy = bilinear_taps(crop.y0 as f64, crop.y1 as f64, yclip, oh);
    let stride = sw as usize * C;
    let half = 1i32 << (PRECISION_BITS - 1);
    // Pillow skips a pass that would be the identity; the result is the same either way but
    // skipping saves the work (and the u8 round trip is exact anyway).
    let need_h = !(xclip.0 == 0
        && xclip.1 == sw as usize
        && ow == sw as usize
        && crop.x0 == 0.0
        && crop.x1 == sw as f32);
    let row_len = ow * C;
    // Horizontally resampled rows live in a ring of `ksize` rows: output row `yy` reads the
    // consecutive source rows `start[yy]..start[yy] + count[yy]` (at most `ksize`), and
    // `start` never decreases, so a row is evicted only once no later output needs it.
    let ring_rows = vy.ksize;
    let mut ring = vec![0u8; if need_h { ring_rows * row_len } else { 0 }];
    let mut ring_holds = vec![usize::MAX; ring_rows];
    // Vertical pass, column order mirrored on the way out when flipping.
    let mut acc = vec![0i32; row_len];
    for yy in 0..oh {
        acc.fill(half);
        let (start, n) = (vy.start[yy], vy.count[yy]);
        let k = &vy.weights[yy * vy.ksize..yy * vy.ksize + n];
        for (y, &w) in k.iter().enumerate() {
            let row = start + y;
            let line = if need_h {
                let slot = row % ring_rows;
                let dst = &mut ring[slot * row_len..(slot + 1) * row_len];
                if ring_holds[slot] != row {
                    horizontal_row::<C>(&src[row * stride..(row + 1) * stride], &hx, dst);
                    ring_holds[slot] = row;
                }
                &ring[slot * row_len..(slot + 1) * row_len]
            } else {
                &src[row * stride..row * stride + row_len]
            };
            for (a, &p) in acc.iter_mut().zip(line) {
                *a += p as i32 * w;
            }
        }
        let orow = &mut out[yy * row_len..(yy + 1) * row_len];
        if flip {
            for xx in 0..ow {
                let o = (ow - 1 - xx) * C;
                for c in 0..C {
                    orow[o + c] = clip8(acc[xx * C + c]);
                }
            }
        } else {
            for (o, &a) in orow.iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
    }
    out
}

#[inline(always)]
fn resample_rgb(
    src: &[u8],
    size: (u32, u32),
    crop: &CropBox,
    out: (u32, u32),
    flip: bool,
) -> Vec<u8> {
    resample_bilinear::<3>(src, size, crop, out, flip)
}

avx2_build!(resample_rgb_avx2 => resample_rgb(src: &[u8], size: (u32, u32), crop: &CropBox, out: (u32, u32), flip: bool) -> Vec<u8>);

/// torchvision's `resized_crop` on a PIL image, then an optional horizontal flip: crop `crop`
/// (whole pixels for exact parity; fractional boxes are resampled as Pillow's `box=`
/// argument, reading only the pixels the box touches) and resize to `out` (width, height).
///
/// # Shapes
/// `img`: `H x W` RGB; returns `out.1 x out.0` RGB.
pub fn resized_crop(img: &RgbImage, crop: &CropBox, out: (u32, u32), flip: bool) -> RgbImage {
    let size = img.dimensions();
    let data = dispatch_avx2!(
        resample_rgb_avx2,
        resample_rgb(img.as_raw(), size, crop, out, flip)
    );
    RgbImage::from_raw(out.0, out.1, data).expect("buffer sized from out")
}

/// Pillow's bilinear resize of the whole image to `out` (width, height), antialiased.
pub fn resize(img: &RgbImage, out: (u32, u32)) -> RgbImage {
    resized_crop(img, &CropBox::full(img.width(), img.height()), out, false)
}

/// Mirrors the image left-right in place.
pub fn hflip_in_place(img: &mut RgbImage) {
    let w = img.width() as usize;
    for row in img.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                row.swap(a + c, b + c);
            }
        }
    }
}

/// Nearest-neighbour resampling of a label map: output pixel `(u, v)` takes source pixel
/// `(floor(x0 + (u + 0.5) sx), floor(y0 + (v + 0.5) sy))`, or `fill` when that lies outside
/// the map; mirrored left-right when `flip` (the same result as resampling, then flipping).
///
/// # Shapes
/// `mask`: `H x W`; returns `out.1 x out.0`.
pub fn resized_crop_nearest(
    mask: &GrayImage,
    crop: &CropBox,
    out: (u32, u32),
    flip: bool,
    fill: u8,
) -> GrayImage {
    let (mw, mh) = (mask.width() as i64, mask.height() as i64);
    let (ow, oh) = (out.0 as usize, out.1 as usize);
    let sx = (crop.x1 as f64 - crop.x0 as f64) / ow.max(1) as f64;
    let sy = (crop.y1 as f64 - crop.y0 as f64) / oh.max(1) as f64;
    let cols: Vec<i64> = (0..ow)
        .map(|u| {
            let x = (crop.x0 as f64 + (u as f64 + 0.5) * sx).floor() as i64;
            if (0..mw).contains(&x) {
                x
            } else {
                -1
            }
        })
        .collect();
    let mut data = vec![fill; ow * oh];
    let src = mask.as_raw();
    for v in 0..oh {
        let y = (crop.y0 as f64 + (v as f64 + 0.5) * sy).floor() as i64;
        if !(0..mh).contains(&y) {
            continue;
        }
        let srow = &src[y as usize * mw as usize..(y as usize + 1) * mw as usize];
        let orow = &mut data[v * ow..(v + 1) * ow];
        for (u, &x) in cols.iter().enumerate() {
            if x >= 0 {
                let o = if flip { ow - 1 - u } else { u };
                orow[o] = srow[x as usize];
            }
        }
    }
    GrayImage::from_raw(out.0, out.1, data).expect("buffer sized from out")
}

/// Letterboxing: keep the aspect ratio, pad to a fixed size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LetterboxConfig {
    /// Output (width, height). Default 640x640.
    pub size: (u32, u32),
    /// Colour of the padding. Default (114, 114, 114) (YOLO's grey).
    pub pad_value: [u8; 3],
    /// Allow enlarging images smaller than `size`. Default true.
    pub scale_up: bool,
}

impl Default for LetterboxConfig {
    fn default() -> Self {
        LetterboxConfig {
            size: (640, 640),
            pad_value: [114; 3],
            scale_up: true,
        }
    }
}

impl LetterboxConfig {
    pub fn validate(&self) -> Result<(), AugmentError> {
        if self.size.0 == 0 || self.size.1 == 0 {
            return Err(AugmentError::InvalidConfig {
                field: "letterbox.size",
                value: format!("{:?}", self.size),
                expected: "a positive width and height",
            });
        }
        Ok(())
    }

    /// Where a `width x height` image goes on the canvas.
    pub fn placement(&self, width: u32, height: u32) -> LetterboxPlacement {
        let (tw, th) = self.size;
        let mut r = (tw as f64 / width as f64).min(th as f64 / height as f64);
        if !self.scale_up {
            r = r.min(1.0);
        }
        let rw = ((width as f64 * r).round() as u32).clamp(1, tw);
        let rh = ((height as f64 * r).round() as u32).clamp(1, th);
        LetterboxPlacement {
            scale: r as f32,
            resized: (rw, rh),
            offset: ((tw - rw) / 2, (th - rh) / 2),
            image_size: (width, height),
            out_size: self.size,
        }
    }

    /// Resizes and pads `img`.
    pub fn apply(&self, img: &RgbImage) -> (RgbImage, LetterboxPlacement) {
        let p = self.placement(img.width(), img.height());
        let resized = resize(img, p.resized);
        let mut canvas =
            RgbImage::from_pixel(p.out_size.0, p.out_size.1, image::Rgb(self.pad_value));
        paste(&mut canvas, &resized, p.offset);
        (canvas, p)
    }
}

/// The recorded placement of a letterboxed image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LetterboxPlacement {
    /// The nominal scale factor `r` (the effective per-axis factors are `resized / image_size`).
    pub scale: f32,
    /// Size of the resized image on the canvas.
    pub resized: (u32, u32),
    /// Top-left corner of the resized image on the canvas (x, y).
    pub offset: (u32, u32),
    pub image_size: (u32, u32),
    pub out_size: (u32, u32),
}

impl LetterboxPlacement {
    /// The canvas as a view of the original image: its crop box extends past the image by the
    /// padding, so canvas points map to original coordinates like any other view's.
    pub fn geometry(&self) -> ViewGeometry {
        let fx = self.image_size.0 as f64 / self.resized.0 as f64;
        let fy = self.image_size.1 as f64 / self.resized.1 as f64;
        let (ox, oy) = (self.offset.0 as f64, self.offset.1 as f64);
        ViewGeometry {
            crop: CropBox::new(
                (-ox * fx) as f32,
                (-oy * fy) as f32,
                ((self.out_size.0 as f64 - ox) * fx) as f32,
                ((self.out_size.1 as f64 - oy) * fy) as f32,
            ),
            flipped: false,
            out_size: self.out_size,
            image_size: self.image_size,
        }
    }
}

/// Copies `src` onto `dst` with its top-left corner at `offset` (clipped to `dst`).
fn paste<P: image::Pixel>(
    dst: &mut image::ImageBuffer<P, Vec<P::Subpixel>>,
    src: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    offset: (u32, u32),
) {
    let c = P::CHANNEL_COUNT as usize;
    let (dw, dh) = (dst.width() as usize, dst.height() as usize);
    let (sw, sh) = (src.width() as usize, src.height() as usize);
    let (ox, oy) = (offset.0 as usize, offset.1 as usize);
    let w = sw.min(dw.saturating_sub(ox));
    for y in 0..sh.min(dh.saturating_sub(oy)) {
        let s = &src.as_raw()[y * sw * c..(y * sw + w) * c];
        let d0 = ((oy + y) * dw + ox) * c;
        let dst_raw: &mut [P::Subpixel] = dst;
        dst_raw[d0..d0 + w * c].copy_from_slice(s);
    }
}

/// A label map letterboxed like its image: nearest-neighbour resize, padding `fill`.
pub fn letterbox_mask(mask: &GrayImage, placement: &LetterboxPlacement, fill: u8) -> GrayImage {
    let resized = resized_crop_nearest(
        mask,
        &CropBox::full(mask.width(), mask.height()),
        placement.resized,
        false,
        fill,
    );
    let mut canvas = GrayImage::from_pixel(
        placement.out_size.0,
        placement.out_size.1,
        image::Luma([fill]),
    );
    paste(&mut canvas, &resized, placement.offset);
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::SampleSeed;
    use proptest::prelude::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 255 / w.max(1)) as u8,
                (y * 255 / h.max(1)) as u8,
                ((x * 7 + y * 13) % 256) as u8,
            ])
        })
    }

    proptest! {
        /// Crops from an accepted attempt respect the bounds up to the rounding of w and h to
        /// whole pixels; otherwise the crop is exactly torchvision's centre fallback.
        #[test]
        fn random_resized_crop_respects_scale_and_ratio(
            w in 1u32..1500, h in 1u32..1500, seed in any::<u64>(),
            smin in 0.01f64..0.6, sspan in 0.0f64..0.6, rmin in 0.3f64..1.0, rspan in 0.0f64..2.0,
        ) {
            let cfg = RandomResizedCropConfig {
                size: (32, 32),
                scale: (smin, (smin + sspan).min(1.0)),
                ratio: (rmin, rmin + rspan),
            };
            let mut rng = SampleSeed::new(seed, 0, 0, 0).rng();
            let c = cfg.sample(w, h, &mut rng);
            prop_assert!(c.x0 >= 0.0 && c.y0 >= 0.0 && c.x1 <= w as f32 && c.y1 <= h as f32);
            prop_assert!(c.x0.fract() == 0.0 && c.x1.fract() == 0.0 && c.y0.fract() == 0.0 && c.y1.fract() == 0.0);
            let (cw, ch) = (c.width() as f64, c.height() as f64);
            prop_assert!(cw >= 1.0 && ch >= 1.0);
            let area = (w as f64) * (h as f64);
            // Rounding moves each side by at most half a pixel.
            let area_lo = (cw - 0.5).max(0.0) * (ch - 0.5).max(0.0) / area;
            let area_hi = (cw + 0.5) * (ch + 0.5) / area;
            let ratio_lo = (cw - 0.5) / (ch + 0.5);
            let ratio_hi = (cw + 0.5) / (ch - 0.5).max(1e-9);
            let in_bounds = area_lo <= cfg.scale.1 + 1e-9 && area_hi >= cfg.scale.0 - 1e-9
                && ratio_lo <= cfg.ratio.1 + 1e-9 && ratio_hi >= cfg.ratio.0 - 1e-9;
            let (fw, fh) = centre_fallback_size(w, h, cfg.ratio);
            let fallback = c == pixel_box((w as i64 - fw) / 2, (h as i64 - fh) / 2, fw, fh);
            prop_assert!(in_bounds || fallback, "{c:?} of {w}x{h} with {cfg:?}");
        }
    }

    #[test]
    fn random_resized_crop_usually_succeeds_and_covers_the_range() {
        let cfg = RandomResizedCropConfig {
            scale: (0.2, 1.0),
            ..Default::default()
        };
        let (mut lo, mut hi) = (1.0f64, 0.0f64);
        for i in 0..2000 {
            let mut rng = SampleSeed::new(1, 0, i, 0).rng();
            let c = cfg.sample(640, 480, &mut rng);
            let frac = c.area() as f64 / (640.0 * 480.0);
            lo = lo.min(frac);
            hi = hi.max(frac);
        }
        assert!(lo < 0.22 && lo > 0.19, "smallest area fraction {lo}");
        assert!(hi > 0.9, "largest area fraction {hi}");
    }

    #[test]
    fn centre_fallback_matches_torchvision() {
        // in_ratio 10 > 4/3: h = 10, w = round(10 * 4/3) = 13, centred.
        assert_eq!(centre_fallback_size(100, 10, (0.75, 4.0 / 3.0)), (13, 10));
        // in_ratio 0.1 < 3/4: w = 10, h = round(10 / 0.75) = 13.
        assert_eq!(centre_fallback_size(10, 100, (0.75, 4.0 / 3.0)), (10, 13));
        assert_eq!(centre_fallback_size(50, 40, (0.75, 4.0 / 3.0)), (50, 40));
        // An impossible scale forces the fallback.
        let cfg = RandomResizedCropConfig {
            scale: (2.0, 3.0),
            ..Default::default()
        };
        let c = cfg.sample(100, 10, &mut SampleSeed::new(0, 0, 0, 0).rng());
        assert_eq!(c, CropBox::new(43.0, 0.0, 56.0, 10.0));
    }

    #[test]
    fn avx2_and_portable_resampling_agree() {
        let img = gradient(97, 61);
        let crop = CropBox::new(5.0, 3.0, 90.0, 58.0);
        for (out, flip) in [((31, 17), false), ((200, 90), true)] {
            let a = resized_crop(&img, &crop, out, flip);
            let b = resample_rgb(img.as_raw(), img.dimensions(), &crop, out, flip);
            assert_eq!(a.as_raw(), &b);
        }
    }

    #[test]
    fn identity_resize_and_flip_twice_are_exact() {
        let img = gradient(37, 23);
        assert_eq!(resize(&img, (37, 23)), img);
        let flipped = resized_crop(&img, &CropBox::full(37, 23), (37, 23), true);
        let mut twice = flipped.clone();
        hflip_in_place(&mut twice);
        assert_eq!(twice, img);
        assert_ne!(flipped, img);
    }

    #[test]
    fn resize_of_a_constant_image_is_constant_and_flip_matches_hflip() {
        let img = RgbImage::from_pixel(50, 40, image::Rgb([10, 200, 77]));
        let out = resized_crop(&img, &CropBox::new(3.0, 5.0, 44.0, 39.0), (17, 29), false);
        assert!(out.pixels().all(|p| p.0 == [10, 200, 77]));
        let img = gradient(60, 45);
        let crop = CropBox::new(7.0, 3.0, 51.0, 40.0);
        let mut a = resized_crop(&img, &crop, (20, 30), false);
        hflip_in_place(&mut a);
        assert_eq!(a, resized_crop(&img, &crop, (20, 30), true));
    }

    #[test]
    fn nearest_resample_fills_outside_and_flips() {
        let mask = GrayImage::from_fn(4, 2, |x, y| image::Luma([(y * 4 + x) as u8]));
        let out = resized_crop_nearest(
            &mask,
            &CropBox::new(-2.0, 0.0, 6.0, 2.0),
            (8, 2),
            false,
            255,
        );
        assert_eq!(
            out.as_raw(),
            &[255, 255, 0, 1, 2, 3, 255, 255, 255, 255, 4, 5, 6, 7, 255, 255]
        );
        let out = resized_crop_nearest(&mask, &CropBox::full(4, 2), (2, 1), true, 255);
        // Centres at x = 1, 3 (y = 1): values 5, 7, mirrored.
        assert_eq!(out.as_raw(), &[7, 5]);
    }

    #[test]
    fn letterbox_places_and_records_geometry() {
        let img = gradient(200, 100);
        let cfg = LetterboxConfig {
            size: (64, 64),
            ..Default::default()
        };
        let (out, p) = cfg.apply(&img);
        assert_eq!(p.resized, (64, 32));
        assert_eq!(p.offset, (0, 16));
        assert_eq!(out.dimensions(), (64, 64));
        assert_eq!(out.get_pixel(10, 5).0, [114; 3]);
        assert_eq!(out.get_pixel(10, 60).0, [114; 3]);
        let g = p.geometry();
        // Canvas (0, 16) is the image's top-left corner; (64, 48) its bottom-right.
        let tl = g.to_original([0.0, 16.0]);
        let br = g.to_original([64.0, 48.0]);
        assert!(tl[0].abs() < 1e-4 && tl[1].abs() < 1e-4, "{tl:?}");
        assert!(
            (br[0] - 200.0).abs() < 1e-3 && (br[1] - 100.0).abs() < 1e-3,
            "{br:?}"
        );
        let small = LetterboxConfig {
            size: (64, 64),
            scale_up: false,
            ..Default::default()
        };
        let p = small.placement(20, 10);
        assert_eq!((p.resized, p.offset), ((20, 10), (22, 27)));
    }
}
