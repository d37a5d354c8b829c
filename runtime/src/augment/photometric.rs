//! Photometric transforms with torchvision 0.14's semantics on `uint8` image tensors
//! (`torchvision.transforms.functional` on a `uint8` tensor):
//!
//! - `adjust_brightness(f)`: `trunc(clamp(f x, 0, 255))`.
//! - `adjust_contrast(f)`: blend with the mean `m` of the (truncated, `uint8`) grayscale image:
//!   `trunc(clamp(f x + (1 - f) m))`.
//! - `adjust_saturation(f)`: blend with the pixel's own grayscale value.
//! - `adjust_hue(h)`: to `f32` in `[0, 1]`, RGB -> HSV (Pillow's formulas, as torchvision), hue
//!   shifted by `h` modulo 1, HSV -> RGB, `trunc(255 v)`.
//! - `rgb_to_grayscale`: `trunc(0.2989 r + 0.587 g + 0.114 b)` evaluated in `f32`.
//! - `gaussian_blur(k, sigma)`: normalised `f32` kernel `exp(-x^2 / 2 sigma^2)` on
//!   `x = -(k-1)/2 .. (k-1)/2`, reflect padding, `round` half to even.
//! - `solarize(t)`: `x >= t ? 255 - x : x`.
//!
//! Every blend truncates toward zero as torch's `.to(uint8)` does. All arithmetic is `f32` in
//! torchvision's order, so results match bit for bit except where the order of a sum differs:
//! torch convolves with the 2-D outer-product kernel, densa blurs separably (rows, then
//! columns), so a blurred value that lands within float rounding of `k + 0.5` may round the
//! other way (±1). `tests/augment_parity.rs` checks every op against torchvision within ±1.
//!
//! **ColorJitter** is torchvision's: the four adjustments in a random order
//! (`torch.randperm(4)`), factors uniform in `[max(0, 1 - x), 1 + x]` for brightness, contrast
//! and saturation and in `[-h, h]` for hue; an adjustment whose strength is 0 is skipped.
//!
//! **Gaussian blur kernel size** (our choice, configurable): torchvision's `GaussianBlur` takes a
//! fixed kernel size (SimCLR/BYOL use about 10% of the crop side, 23 for 224); MoCo's code uses
//! Pillow's `GaussianBlur(radius = sigma)`. densa's default, [`KernelSize::Sigmas`]`(4.0)`,
//! truncates the kernel at 4 sigma (`k = 2 ceil(4 sigma) + 1`, as SciPy's default): the weights
//! beyond hold under 0.007% of the mass, so the result stays within one level of the 23-tap
//! kernel while costing at most 17 taps.

use image::RgbImage;
use ndarray::{Array3, ArrayViewMut3};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::{check_interval, check_probability, check_range, coin, uniform, AugmentError};

const GRAY_R: f32 = 0.2989;
const GRAY_G: f32 = 0.587;
const GRAY_B: f32 = 0.114;

#[inline(always)]
fn gray_f32(p: &[u8]) -> f32 {
    GRAY_R * p[0] as f32 + GRAY_G * p[1] as f32 + GRAY_B * p[2] as f32
}

/// `y as u8` (truncation) for `y` in `[0, 256)`, written without a float-to-int conversion so
/// that loops over it vectorise on baseline x86-64 (SSE2 has no saturating vector
/// conversion): `2^23 + y` holds `y` rounded to an integer in its low mantissa bits; one is
/// taken off when that rounded up.
#[inline(always)]
fn trunc_u8(y: f32) -> u8 {
    const MAGIC: f32 = 8_388_608.0;
    let r = y + MAGIC;
    let bits = r.to_bits() - ((r - MAGIC) > y) as u32;
    bits as u8
}

/// `a.max(b)` for non-NaN values, as a plain comparison that vectorises.
#[inline(always)]
fn fmax(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn fmin(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn clamp_f32(x: f32, lo: f32, hi: f32) -> f32 {
    fmin(fmax(x, lo), hi)
}

/// Pixels per block in the vectorised per-pixel loops (fixed-size arrays compile to SIMD).
const LANES: usize = 16;

/// Runs `$body` with `$px: &mut [u8; 3 * LANES]` bound to every run of `LANES` RGB pixels of
/// `$img`; the tail goes through a padded copy. A macro, not a closure-taking function, so the
/// body is compiled inside its caller (and gets the caller's target features).
macro_rules! for_each_block {
    ($img:expr, |$px:ident| $body:expr) => {{
        let mut blocks = $img.chunks_exact_mut(3 * LANES);
        for b in &mut blocks {
            let $px: &mut [u8; 3 * LANES] = b.try_into().expect("chunk of 3 * LANES");
            $body;
        }
        let tail = blocks.into_remainder();
        if !tail.is_empty() {
            let mut buf = [0u8; 3 * LANES];
            buf[..tail.len()].copy_from_slice(tail);
            {
                let $px = &mut buf;
                $body;
            }
            let n = tail.len();
            tail.copy_from_slice(&buf[..n]);
        }
    }};
}

/// torch's `_blend` for `uint8`: `trunc(clamp(ratio * a + (1 - ratio) * b, 0, 255))`.
#[inline]
fn blend_u8(ratio: f32, one_minus: f32, a: f32, b: f32) -> u8 {
    (ratio * a + one_minus * b).clamp(0.0, 255.0) as u8
}

/// torch's two blend weights for a Python-float `ratio`: `ratio` and `1 - ratio` (computed in
/// double precision), each rounded to `f32` when it multiplies a `float32` tensor.
fn blend_weights(ratio: f64) -> (f32, f32) {
    (ratio as f32, (1.0 - ratio) as f32)
}

/// A 256-entry table `x -> blend(f, x, other)` for a constant `other`.
fn blend_lut(factor: f64, other: f32) -> [u8; 256] {
    let (ratio, one_minus) = blend_weights(factor);
    std::array::from_fn(|x| blend_u8(ratio, one_minus, x as f32, other))
}

fn apply_lut(img: &mut RgbImage, lut: &[u8; 256]) {
    for v in img.iter_mut() {
        *v = lut[*v as usize];
    }
}

/// `adjust_brightness`: blend with black.
pub fn adjust_brightness(img: &mut RgbImage, factor: f64) {
    apply_lut(img, &blend_lut(factor, 0.0));
}

/// The mean of the truncated grayscale image, as `f32` (what `adjust_contrast` blends with).
pub fn grayscale_mean(img: &RgbImage) -> f32 {
    let n = (img.width() as u64 * img.height() as u64).max(1);
    let sum = dispatch_avx2!(gray_sum_avx2, gray_sum(img.as_raw()));
    sum as f32 / n as f32
}

avx2_build!(gray_sum_avx2 => gray_sum(px: &[u8]) -> u64);

/// Sum of the truncated grey levels of interleaved RGB pixels.
#[inline(always)]
fn gray_sum(px: &[u8]) -> u64 {
    let mut blocks = px.chunks_exact(3 * LANES);
    let mut total = 0u64;
    for b in &mut blocks {
        let mut s = [0u32; LANES];
        for (i, acc) in s.iter_mut().enumerate() {
            *acc = trunc_u8(gray_f32(&b[3 * i..3 * i + 3])) as u32;
        }
        total += s.iter().map(|&v| v as u64).sum::<u64>();
    }
    for p in blocks.remainder().chunks_exact(3) {
        total += trunc_u8(gray_f32(p)) as u64;
    }
    total
}

/// `adjust_contrast`: blend with the mean grey level.
pub fn adjust_contrast(img: &mut RgbImage, factor: f64) {
    let mean = grayscale_mean(img);
    apply_lut(img, &blend_lut(factor, mean));
}

/// `adjust_saturation`: blend each pixel with its own grey level.
pub fn adjust_saturation(img: &mut RgbImage, factor: f64) {
    let (ratio, one_minus) = blend_weights(factor);
    dispatch_avx2!(saturation_avx2, saturation_kernel(img, ratio, one_minus))
}

avx2_build!(saturation_avx2 => saturation_kernel(img: &mut [u8], ratio: f32, one_minus: f32));

#[inline(always)]
fn saturation_kernel(img: &mut [u8], ratio: f32, one_minus: f32) {
    for_each_block!(img, |px| {
        let mut gray = [0f32; LANES];
        for (i, g) in gray.iter_mut().enumerate() {
            *g = one_minus * trunc_u8(gray_f32(&px[3 * i..3 * i + 3])) as f32;
        }
        for (i, v) in px.iter_mut().enumerate() {
            *v = trunc_u8(clamp_f32(ratio * *v as f32 + gray[i / 3], 0.0, 255.0));
        }
    });
}

/// `adjust_hue` on `LANES` interleaved RGB pixels: torchvision's `_rgb2hsv`, the shift and
/// `_hsv2rgb`, in `f32`, branch-free so that it vectorises.
///
/// Exactness notes: `fmod(h / 6 + 1, 1)` has its argument in `[5/6, 11/6)`, where it equals a
/// conditional `- 1` exactly (Sterbenz); likewise `(h + hue) % 1` on `[-0.5, 1.5)` is `- 1`
/// above 1 and torch's `+ 1` below 0. `floor(6 h)` for `6 h` in `[0, 6]` is counted with
/// comparisons, and sector 6 (`h` rounding up to 1) is torch's `i % 6 = 0`.
#[inline(always)]
fn hue_block(px: &mut [u8; 3 * LANES], hue_factor: f32) {
    const L: usize = LANES;
    let (mut ro, mut go, mut bo) = ([0f32; L], [0f32; L], [0f32; L]);
    for i in 0..L {
        let r = px[3 * i] as f32 / 255.0;
        let g = px[3 * i + 1] as f32 / 255.0;
        let b = px[3 * i + 2] as f32 / 255.0;
        let maxc = fmax(fmax(r, g), b);
        let minc = fmin(fmin(r, g), b);
        let eqc = maxc == minc;
        let cr = maxc - minc;
        let s = cr / if eqc { 1.0 } else { maxc };
        let cr_div = if eqc { 1.0 } else { cr };
        let rc = (maxc - r) / cr_div;
        let gc = (maxc - g) / cr_div;
        let bc = (maxc - b) / cr_div;
        let h = if maxc == r {
            bc - gc
        } else if maxc == g {
            2.0 + rc - bc
        } else {
            4.0 + gc - rc
        };
        let h = h / 6.0 + 1.0;
        let h = if h >= 1.0 { h - 1.0 } else { h };
        let h = h + hue_factor;
        let h = if h >= 1.0 {
            h - 1.0
        } else if h < 0.0 {
            h + 1.0
        } else {
            h
        };
        let v = maxc;
        let h6 = h * 6.0;
        let floor = (h6 >= 1.0) as u8 as f32
            + (h6 >= 2.0) as u8 as f32
            + (h6 >= 3.0) as u8 as f32
            + (h6 >= 4.0) as u8 as f32
            + (h6 >= 5.0) as u8 as f32
            + (h6 >= 6.0) as u8 as f32;
        let f = h6 - floor;
        let sector = if floor >= 6.0 { 0.0 } else { floor };
        let p = clamp_f32(v * (1.0 - s), 0.0, 1.0);
        let q = clamp_f32(v * (1.0 - s * f), 0.0, 1.0);
        let t = clamp_f32(v * (1.0 - s * (1.0 - f)), 0.0, 1.0);
        // torchvision's table for sectors 0..5: r = (v, q, p, p, t, v),
        // g = (t, v, v, q, p, p), b = (p, p, t, v, v, q).
        ro[i] = if sector == 0.0 || sector == 5.0 {
            v
        } else if sector == 1.0 {
            q
        } else if sector == 4.0 {
            t
        } else {
            p
        };
        go[i] = if sector == 0.0 {
            t
        } else if sector == 1.0 || sector == 2.0 {
            v
        } else if sector == 3.0 {
            q
        } else {
            p
        };
        bo[i] = if sector <= 1.0 {
            p
        } else if sector == 2.0 {
            t
        } else if sector == 5.0 {
            q
        } else {
            v
        };
    }
    for i in 0..L {
        px[3 * i] = trunc_u8(ro[i] * 255.0);
        px[3 * i + 1] = trunc_u8(go[i] * 255.0);
        px[3 * i + 2] = trunc_u8(bo[i] * 255.0);
    }
}

/// `adjust_hue`: rotate the hue by `hue_factor` turns (`[-0.5, 0.5]`).
pub fn adjust_hue(img: &mut RgbImage, hue_factor: f64) {
    dispatch_avx2!(hue_avx2, hue_kernel(img, hue_factor as f32))
}

avx2_build!(hue_avx2 => hue_kernel(img: &mut [u8], hue_factor: f32));

#[inline(always)]
fn hue_kernel(img: &mut [u8], hue_factor: f32) {
    for_each_block!(img, |px| hue_block(px, hue_factor));
}

/// `rgb_to_grayscale(img, num_output_channels=3)`: the grey level in all three channels.
pub fn grayscale_in_place(img: &mut RgbImage) {
    for_each_block!(img, |px| {
        for p in px.chunks_exact_mut(3) {
            let g = trunc_u8(gray_f32(p));
            p.fill(g);
        }
    });
}

/// `solarize(img, threshold)`: invert every value `>= threshold`.
pub fn solarize(img: &mut RgbImage, threshold: u8) {
    let lut: [u8; 256] = std::array::from_fn(|x| {
        if x as u8 >= threshold {
            255 - x as u8
        } else {
            x as u8
        }
    });
    apply_lut(img, &lut);
}

/// torchvision's `_get_gaussian_kernel1d`: `exp(-0.5 (x / sigma)^2)` normalised, `f32`.
pub fn gaussian_kernel(kernel_size: usize, sigma: f32) -> Vec<f32> {
    let half = (kernel_size as f32 - 1.0) * 0.5;
    let pdf: Vec<f32> = (0..kernel_size)
        .map(|i| {
            let x = -half + i as f32;
            (-0.5 * (x / sigma).powi(2)).exp()
        })
        .collect();
    let sum: f32 = pdf.iter().sum();
    pdf.into_iter().map(|v| v / sum).collect()
}

/// Reflect-padded index (`torch.nn.functional.pad(mode="reflect")`, edge not repeated).
#[inline]
fn reflect(i: isize, n: isize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let mut m = i.rem_euclid(period);
    if m >= n {
        m = period - m;
    }
    m as usize
}

/// `gaussian_blur(img, [k, k], [sigma, sigma])`: separable, reflect padding, round half to
/// even. `kernel_size` must be odd.
pub fn gaussian_blur(img: &RgbImage, kernel_size: usize, sigma: f32) -> RgbImage {
    let mut out = img.clone();
    gaussian_blur_in_place(&mut out, kernel_size, sigma);
    out
}

/// [`gaussian_blur`] overwriting its input.
///
/// The horizontal pass keeps only the rows the vertical pass still needs, in a ring of
/// `min(k, H)` rows: output row `y` reads source rows `reflect(y - r ..= y + r)`, which always
/// lie in a window of at most `k` consecutive rows starting no earlier than `y - r`, so a row
/// is filtered before its output overwrites it and evicted only once no later output needs it.
pub fn gaussian_blur_in_place(img: &mut RgbImage, kernel_size: usize, sigma: f32) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return;
    }
    let k = gaussian_kernel(kernel_size, sigma);
    dispatch_avx2!(blur_avx2, blur_kernel(img, w, h, &k))
}

avx2_build!(blur_avx2 => blur_kernel(data: &mut [u8], w: usize, h: usize, k: &[f32]));

#[inline(always)]
fn blur_kernel(data: &mut [u8], w: usize, h: usize, k: &[f32]) {
    let kernel_size = k.len();
    let r = kernel_size / 2;
    let row_len = w * 3;
    let ring_rows = kernel_size.min(h);
    let mut ring = vec![0f32; ring_rows * row_len];
    let mut ring_holds = vec![usize::MAX; ring_rows];
    let mut padded = vec![0f32; (w + 2 * r) * 3];
    let mut acc_row = vec![0f32; row_len];
    let mut slots = vec![0usize; kernel_size];
    for y in 0..h {
        for (t, slot) in slots.iter_mut().enumerate() {
            let row = reflect(y as isize + t as isize - r as isize, h as isize);
            *slot = row % ring_rows;
            if ring_holds[*slot] == row {
                continue;
            }
            // Horizontal pass of source row `row` over the reflect-padded interleaved row:
            // out[i] = sum_t k[t] * padded[i + 3 t].
            let srow = &data[row * row_len..(row + 1) * row_len];
            for (d, &v) in padded[r * 3..r * 3 + row_len].iter_mut().zip(srow) {
                *d = v as f32;
            }
            for e in 0..r {
                let (left, right) = (r - 1 - e, r + w + e);
                let (sl, sr) = (
                    reflect(left as isize - r as isize, w as isize),
                    reflect(right as isize - r as isize, w as isize),
                );
                for c in 0..3 {
                    padded[left * 3 + c] = srow[sl * 3 + c] as f32;
                    padded[right * 3 + c] = srow[sr * 3 + c] as f32;
                }
            }
            let out = &mut ring[*slot * row_len..(*slot + 1) * row_len];
            blur_row(out, k, |t| &padded[t * 3..t * 3 + row_len]);
            ring_holds[*slot] = row;
        }
        // Vertical pass, then torch.round into u8.
        blur_row(&mut acc_row, k, |t| {
            &ring[slots[t] * row_len..(slots[t] + 1) * row_len]
        });
        for (o, &a) in data[y * row_len..(y + 1) * row_len]
            .iter_mut()
            .zip(&acc_row)
        {
            *o = round_u8(a);
        }
    }
}

/// `out[i] = sum_t k[t] * line(t)[i]`, summed in ascending `t` for every `i`. Blocks of 32
/// outputs stay in registers across the taps.
#[inline(always)]
fn blur_row<'a>(out: &mut [f32], k: &[f32], line: impl Fn(usize) -> &'a [f32]) {
    const B: usize = 32;
    let n = out.len();
    let full = n / B * B;
    for i0 in (0..full).step_by(B) {
        let mut acc = [0f32; B];
        for (t, &kt) in k.iter().enumerate() {
            let src: &[f32; B] = line(t)[i0..i0 + B].try_into().expect("block of B");
            for j in 0..B {
                acc[j] += kt * src[j];
            }
        }
        out[i0..i0 + B].copy_from_slice(&acc);
    }
    for (i, o) in out.iter_mut().enumerate().skip(full) {
        let mut a = 0.0;
        for (t, &kt) in k.iter().enumerate() {
            a += kt * line(t)[i];
        }
        *o = a;
    }
}

/// `torch.round(x).to(uint8)` for a blurred value (clamped to `[0, 255]` first; the
/// normalised positive kernel keeps it there up to float rounding): adding `2^23` rounds to
/// the nearest integer, ties to even, into the low mantissa bits.
#[inline(always)]
fn round_u8(x: f32) -> u8 {
    (clamp_f32(x, 0.0, 255.0) + 8_388_608.0).to_bits() as u8
}

/// torchvision's `ColorJitter(brightness, contrast, saturation, hue)` wrapped in
/// `RandomApply(p)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColorJitterConfig {
    /// Brightness factor drawn from `[max(0, 1 - b), 1 + b]`. MoCo-v2: 0.4.
    pub brightness: f64,
    /// Contrast factor range, as brightness. MoCo-v2: 0.4.
    pub contrast: f64,
    /// Saturation factor range, as brightness. MoCo-v2: 0.4.
    pub saturation: f64,
    /// Hue shift drawn from `[-h, h]`, `h <= 0.5`. MoCo-v2: 0.1.
    pub hue: f64,
    /// Probability of applying the jitter at all. MoCo-v2: 0.8.
    pub p: f64,
}

impl Default for ColorJitterConfig {
    /// MoCo-v2's `RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)`.
    fn default() -> Self {
        ColorJitterConfig {
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
            p: 0.8,
        }
    }
}

/// One of ColorJitter's four adjustments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JitterOp {
    Brightness,
    Contrast,
    Saturation,
    Hue,
}

/// The sampled parameters of one ColorJitter application.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColorJitterParams {
    pub order: [JitterOp; 4],
    pub brightness: Option<f64>,
    pub contrast: Option<f64>,
    pub saturation: Option<f64>,
    pub hue: Option<f64>,
}

impl ColorJitterConfig {
    pub fn validate(&self) -> Result<(), AugmentError> {
        for (field, v) in [
            ("color_jitter.brightness", self.brightness),
            ("color_jitter.contrast", self.contrast),
            ("color_jitter.saturation", self.saturation),
        ] {
            check_range(field, v, 0.0, f64::MAX, "a non-negative strength")?;
        }
        check_range(
            "color_jitter.hue",
            self.hue,
            0.0,
            0.5,
            "a hue strength in [0, 0.5]",
        )?;
        check_probability("color_jitter.p", self.p)
    }

    /// Draws the order and the factors (torchvision's `ColorJitter.get_params`); `None` for
    /// an adjustment whose strength is 0.
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> ColorJitterParams {
        let mut order = [
            JitterOp::Brightness,
            JitterOp::Contrast,
            JitterOp::Saturation,
            JitterOp::Hue,
        ];
        order.shuffle(rng);
        let factor = |rng: &mut ChaCha8Rng, x: f64| {
            (x > 0.0).then(|| uniform(rng, (1.0 - x).max(0.0), 1.0 + x))
        };
        let brightness = factor(rng, self.brightness);
        let contrast = factor(rng, self.contrast);
        let saturation = factor(rng, self.saturation);
        let hue = (self.hue > 0.0).then(|| uniform(rng, -self.hue, self.hue));
        ColorJitterParams {
            order,
            brightness,
            contrast,
            saturation,
            hue,
        }
    }

    /// With probability `p`, samples and applies a jitter; returns what was applied.
    pub fn apply(&self, img: &mut RgbImage, rng: &mut ChaCha8Rng) -> Option<ColorJitterParams> {
        if !coin(rng, self.p) {
            return None;
        }
        let params = self.sample(rng);
        params.apply(img);
        Some(params)
    }
}

impl ColorJitterParams {
    /// Applies the adjustments in `order`.
    pub fn apply(&self, img: &mut RgbImage) {
        for op in self.order {
            match op {
                JitterOp::Brightness => {
                    if let Some(f) = self.brightness {
                        adjust_brightness(img, f)
                    }
                }
                JitterOp::Contrast => {
                    if let Some(f) = self.contrast {
                        adjust_contrast(img, f)
                    }
                }
                JitterOp::Saturation => {
                    if let Some(f) = self.saturation {
                        adjust_saturation(img, f)
                    }
                }
                JitterOp::Hue => {
                    if let Some(h) = self.hue {
                        adjust_hue(img, h)
                    }
                }
            }
        }
    }
}

/// How the blur kernel's size follows sigma.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelSize {
    /// A fixed odd size (torchvision's `GaussianBlur(kernel_size)`; SimCLR/BYOL: 23 at 224 px).
    Fixed(usize),
    /// `2 ceil(n sigma) + 1`: truncate the kernel at `n` standard deviations.
    Sigmas(f32),
}

impl KernelSize {
    /// The (odd) size for `sigma`.
    pub fn for_sigma(self, sigma: f32) -> usize {
        match self {
            KernelSize::Fixed(k) => k,
            KernelSize::Sigmas(n) => 2 * (n * sigma).ceil().max(1.0) as usize + 1,
        }
    }
}

/// `RandomApply([GaussianBlur(kernel, sigma=(lo, hi))], p)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianBlurConfig {
    /// Probability of blurring. MoCo-v2: 0.5.
    pub p: f64,
    /// Range sigma is drawn from uniformly. MoCo-v2: (0.1, 2.0).
    pub sigma: (f32, f32),
    /// Kernel size rule. Default `Sigmas(4.0)` (see the module docs).
    pub kernel: KernelSize,
}

impl Default for GaussianBlurConfig {
    fn default() -> Self {
        GaussianBlurConfig {
            p: 0.5,
            sigma: (0.1, 2.0),
            kernel: KernelSize::Sigmas(4.0),
        }
    }
}

impl GaussianBlurConfig {
    pub fn validate(&self) -> Result<(), AugmentError> {
        check_probability("gaussian_blur.p", self.p)?;
        check_interval(
            "gaussian_blur.sigma",
            (self.sigma.0 as f64, self.sigma.1 as f64),
            1e-6,
            "0 < min <= max",
        )?;
        match self.kernel {
            KernelSize::Fixed(k) if k % 2 == 0 => Err(AugmentError::InvalidConfig {
                field: "gaussian_blur.kernel",
                value: k.to_string(),
                expected: "an odd kernel size",
            }),
            KernelSize::Sigmas(n) => check_range(
                "gaussian_blur.kernel",
                n as f64,
                0.5,
                100.0,
                "a truncation of 0.5 to 100 standard deviations",
            ),
            _ => Ok(()),
        }
    }

    /// With probability `p`, draws sigma and blurs; returns the sigma used.
    pub fn apply(&self, img: &mut RgbImage, rng: &mut ChaCha8Rng) -> Option<f32> {
        if !coin(rng, self.p) {
            return None;
        }
        let sigma = uniform(rng, self.sigma.0 as f64, self.sigma.1 as f64) as f32;
        // Reflect padding needs the kernel radius below the image side.
        let side = img.width().min(img.height()) as usize;
        let mut k = self.kernel.for_sigma(sigma);
        let max_k = if side >= 2 { 2 * (side - 1) - 1 } else { 1 };
        if k > max_k {
            k = max_k | 1;
        }
        gaussian_blur_in_place(img, k, sigma);
        Some(sigma)
    }
}

/// `Normalize(mean, std)` after `ToTensor()`: `(x / 255 - mean) / std`, channels first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Normalize {
    /// ImageNet statistics, as every method in METHODS.md uses.
    fn default() -> Self {
        Normalize {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

impl Normalize {
    pub fn validate(&self) -> Result<(), AugmentError> {
        for s in self.std {
            if !(s.is_finite() && s > 0.0) {
                return Err(AugmentError::InvalidConfig {
                    field: "normalize.std",
                    value: format!("{:?}", self.std),
                    expected: "positive finite standard deviations",
                });
            }
        }
        for m in self.mean {
            check_range(
                "normalize.mean",
                m as f64,
                f64::MIN,
                f64::MAX,
                "finite means",
            )?;
        }
        Ok(())
    }

    fn luts(&self) -> [[f32; 256]; 3] {
        std::array::from_fn(|c| {
            std::array::from_fn(|v| (v as f32 / 255.0 - self.mean[c]) / self.std[c])
        })
    }

    /// Writes the normalised image into `out` (`[3, H, W]`, e.g. one slot of a batch).
    pub fn write_chw(&self, img: &RgbImage, mut out: ArrayViewMut3<f32>) {
        let luts = self.luts();
        let (w, h) = (img.width() as usize, img.height() as usize);
        assert_eq!(out.shape(), &[3, h, w], "normalize: output slot shape");
        let src = img.as_raw();
        for c in 0..3 {
            let lut = &luts[c];
            let mut plane = out.index_axis_mut(ndarray::Axis(0), c);
            match plane.as_slice_mut() {
                Some(dst) => {
                    for (d, p) in dst.iter_mut().zip(src.chunks_exact(3)) {
                        *d = lut[p[c] as usize];
                    }
                }
                None => {
                    for ((y, x), d) in plane.indexed_iter_mut() {
                        *d = lut[src[(y * w + x) * 3 + c] as usize];
                    }
                }
            }
        }
    }

    /// The normalised image as a new tensor.
    ///
    /// # Shapes
    /// `img`: `H x W` RGB; returns `[3, H, W]`.
    pub fn to_chw(&self, img: &RgbImage) -> Array3<f32> {
        let mut out = Array3::zeros((3, img.height() as usize, img.width() as usize));
        self.write_chw(img, out.view_mut());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::SampleSeed;

    fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        RgbImage::from_fn(w, h, |_, _| {
            let mut px = [0u8; 3];
            for v in &mut px {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                *v = (s >> 24) as u8;
            }
            image::Rgb(px)
        })
    }

    /// torchvision's `_rgb2hsv` / `_hsv2rgb` for one pixel, written plainly (`fmod`, `floor`,
    /// `%`): the reference for the branch-free [`hue_block`].
    fn hue_reference(p: [u8; 3], hue_factor: f32) -> [u8; 3] {
        let [r, g, b] = p.map(|v| v as f32 / 255.0);
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        let eqc = maxc == minc;
        let cr = maxc - minc;
        let s = cr / if eqc { 1.0 } else { maxc };
        let d = if eqc { 1.0 } else { cr };
        let (rc, gc, bc) = ((maxc - r) / d, (maxc - g) / d, (maxc - b) / d);
        let h = if maxc == r {
            bc - gc
        } else if maxc == g {
            2.0 + rc - bc
        } else {
            4.0 + gc - rc
        };
        let h = (h / 6.0 + 1.0) % 1.0;
        let mut h = (h + hue_factor) % 1.0;
        if h < 0.0 {
            h += 1.0;
        }
        let i = (h * 6.0).floor();
        let f = h * 6.0 - i;
        let (v, i) = (maxc, (i as i32).rem_euclid(6));
        let p = (v * (1.0 - s)).clamp(0.0, 1.0);
        let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
        let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
        let rgb = [
            (v, t, p),
            (q, v, p),
            (p, v, t),
            (p, q, v),
            (t, p, v),
            (v, p, q),
        ][i as usize];
        [rgb.0, rgb.1, rgb.2].map(|x| (x * 255.0) as u8)
    }

    #[test]
    fn vectorised_hue_and_saturation_match_plain_references() {
        let img = noise(37, 29, 11); // 1073 pixels: blocks and a tail
        for hue in [-0.5f64, -0.31, -0.02, 0.0, 1e-7, 0.1, 0.33, 0.5] {
            let mut got = img.clone();
            adjust_hue(&mut got, hue);
            for (a, b) in got.pixels().zip(img.pixels()) {
                assert_eq!(
                    a.0,
                    hue_reference(b.0, hue as f32),
                    "hue {hue}, pixel {:?}",
                    b.0
                );
            }
        }
        for factor in [0.0f64, 0.35, 0.6, 1.0, 1.4, 2.7] {
            let mut got = img.clone();
            adjust_saturation(&mut got, factor);
            let (r, om) = (factor as f32, (1.0 - factor) as f32);
            for (a, b) in got.pixels().zip(img.pixels()) {
                let g = (GRAY_R * b.0[0] as f32 + GRAY_G * b.0[1] as f32 + GRAY_B * b.0[2] as f32)
                    as u8;
                let want =
                    b.0.map(|x| (r * x as f32 + om * g as f32).clamp(0.0, 255.0) as u8);
                assert_eq!(a.0, want, "saturation {factor}");
            }
        }
    }

    /// On a CPU with AVX2 the public ops run the AVX2 build; it must equal the portable one.
    #[test]
    fn avx2_and_portable_builds_agree() {
        let img = noise(53, 41, 12);
        let mut a = img.clone();
        adjust_hue(&mut a, 0.23);
        let mut b = img.clone();
        hue_kernel(&mut b, 0.23);
        assert_eq!(a, b);
        let mut a = img.clone();
        adjust_saturation(&mut a, 1.3);
        let mut b = img.clone();
        let (r, om) = blend_weights(1.3);
        saturation_kernel(&mut b, r, om);
        assert_eq!(a, b);
        let a = gaussian_blur(&img, 11, 1.4);
        let mut b = img.clone();
        blur_kernel(&mut b, 53, 41, &gaussian_kernel(11, 1.4));
        assert_eq!(a, b);
    }

    #[test]
    fn trunc_u8_is_truncation() {
        for i in 0..256 * 64 {
            let y = i as f32 / 64.0;
            for v in [
                y,
                f32::from_bits(y.to_bits().saturating_sub(1)),
                f32::from_bits(y.to_bits() + 1),
            ] {
                if v < 256.0 {
                    assert_eq!(trunc_u8(v), v as u8, "{v}");
                }
            }
        }
    }

    #[test]
    fn identity_factors_leave_the_image_alone() {
        let img = noise(13, 7, 1);
        let mut a = img.clone();
        adjust_brightness(&mut a, 1.0);
        adjust_contrast(&mut a, 1.0);
        adjust_saturation(&mut a, 1.0);
        assert_eq!(a, img);
        // Hue 0 round-trips through HSV; f32 rounding may lose one level after truncation.
        let mut a = img.clone();
        adjust_hue(&mut a, 0.0);
        assert!(a.iter().zip(img.iter()).all(|(x, y)| x.abs_diff(*y) <= 1));
    }

    #[test]
    fn saturation_zero_is_grayscale_and_solarize_inverts_the_top_half() {
        let img = noise(9, 5, 2);
        let mut a = img.clone();
        adjust_saturation(&mut a, 0.0);
        let mut g = img.clone();
        grayscale_in_place(&mut g);
        assert_eq!(a, g);
        let mut s = img.clone();
        solarize(&mut s, 128);
        for (o, i) in s.iter().zip(img.iter()) {
            assert_eq!(*o, if *i >= 128 { 255 - *i } else { *i });
        }
    }

    #[test]
    fn blur_preserves_constants_and_kernel_is_normalised() {
        let img = RgbImage::from_pixel(11, 6, image::Rgb([3, 128, 250]));
        assert_eq!(gaussian_blur(&img, 9, 1.7), img);
        let k = gaussian_kernel(23, 2.0);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((k[0] - k[22]).abs() < 1e-12 && k[11] > k[10]);
        assert_eq!(KernelSize::Sigmas(4.0).for_sigma(2.0), 17);
        assert_eq!(KernelSize::Sigmas(4.0).for_sigma(0.1), 3);
        assert_eq!(reflect(-1, 5), 1);
        assert_eq!(reflect(5, 5), 3);
        assert_eq!(reflect(-6, 5), 2);
    }

    #[test]
    fn sigma_rule_stays_within_one_level_of_the_23_tap_kernel() {
        let img = noise(40, 30, 3);
        for sigma in [0.1f32, 0.7, 1.3, 2.0] {
            let a = gaussian_blur(&img, 23, sigma);
            let b = gaussian_blur(&img, KernelSize::Sigmas(4.0).for_sigma(sigma), sigma);
            let worst = a
                .iter()
                .zip(b.iter())
                .map(|(x, y)| x.abs_diff(*y))
                .max()
                .unwrap();
            assert!(worst <= 1, "sigma {sigma}: {worst}");
        }
    }

    #[test]
    fn jitter_factors_lie_in_their_ranges_and_order_is_a_permutation() {
        let cfg = ColorJitterConfig::default();
        for i in 0..500 {
            let p = cfg.sample(&mut SampleSeed::new(5, 0, i, 0).rng());
            for f in [p.brightness, p.contrast, p.saturation] {
                let f = f.unwrap();
                assert!((0.6..=1.4).contains(&f), "{f}");
            }
            assert!(p.hue.unwrap().abs() <= 0.1);
            let mut o = p.order.map(|op| op as u8);
            o.sort();
            assert_eq!(o, [0, 1, 2, 3]);
        }
        let none = ColorJitterConfig {
            brightness: 0.0,
            hue: 0.0,
            ..cfg
        }
        .sample(&mut SampleSeed::new(5, 0, 0, 0).rng());
        assert!(none.brightness.is_none() && none.hue.is_none() && none.contrast.is_some());
        // Strength above 1: the lower end clamps at 0.
        let strong = ColorJitterConfig {
            brightness: 3.0,
            ..cfg
        };
        for i in 0..100 {
            let b = strong
                .sample(&mut SampleSeed::new(6, 0, i, 0).rng())
                .brightness
                .unwrap();
            assert!((0.0..=4.0).contains(&b));
        }
    }

    #[test]
    fn invalid_configs_are_reported() {
        let bad = ColorJitterConfig {
            hue: 0.7,
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(AugmentError::InvalidConfig {
                field: "color_jitter.hue",
                ..
            })
        ));
        let bad = GaussianBlurConfig {
            kernel: KernelSize::Fixed(4),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = GaussianBlurConfig {
            sigma: (2.0, 1.0),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = Normalize {
            std: [0.2, 0.0, 0.2],
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn normalize_matches_the_formula_in_chw_order() {
        let img = noise(4, 3, 4);
        let n = Normalize::default();
        let t = n.to_chw(&img);
        assert_eq!(t.shape(), &[3, 3, 4]);
        for y in 0..3 {
            for x in 0..4 {
                for c in 0..3 {
                    let v = img.get_pixel(x, y).0[c] as f32;
                    let want = (v / 255.0 - n.mean[c]) / n.std[c];
                    assert_eq!(t[[c, y as usize, x as usize]], want);
                }
            }
        }
    }
}
