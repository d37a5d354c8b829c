//! densa's augmentation ops against torchvision 0.14 / Pillow 9.4 outputs
//! (`tests/fixtures/augment/make_fixtures.py` made `photometric.npz` once with Debian's
//! PyTorch; CI only reads it).
//!
//! Tolerance: ±1 intensity level. Where densa and torch round differently it is documented in
//! `runtime/src/augment/photometric.rs`: blur sums separably (torch: 2-D kernel), so values
//! within float rounding of `k + 0.5` may round the other way; every other op computes the same
//! `f32` expressions in the same order and is expected to match exactly (the test reports how
//! many values differ at all).

use std::path::PathBuf;

use densa_exporter::Tensor;
use densa_runtime::augment::photometric::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, gaussian_blur,
    grayscale_in_place, solarize,
};
use densa_runtime::augment::spatial::resized_crop;
use densa_runtime::augment::CropBox;
use densa_runtime::npy::read_npz;
use image::RgbImage;
use ndarray::{ArrayD, Axis};

struct Fixture(Vec<(String, Tensor)>);

impl Fixture {
    fn load() -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/augment/photometric.npz");
        Fixture(read_npz(&path).unwrap_or_else(|e| panic!("{e}")))
    }

    fn get(&self, name: &str) -> &Tensor {
        &self
            .0
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("fixture has no {name}"))
            .1
    }

    fn u8(&self, name: &str) -> ArrayD<u8> {
        match self.get(name) {
            Tensor::U8(a) => a.clone(),
            t => panic!("{name}: expected uint8, got {:?}", t.dtype()),
        }
    }

    fn f64(&self, name: &str) -> ArrayD<f64> {
        match self.get(name) {
            Tensor::F64(a) => a.clone(),
            t => panic!("{name}: expected float64, got {:?}", t.dtype()),
        }
    }

    fn i64(&self, name: &str) -> ArrayD<i64> {
        match self.get(name) {
            Tensor::I64(a) => a.clone(),
            t => panic!("{name}: expected int64, got {:?}", t.dtype()),
        }
    }
}

fn to_image(a: &ArrayD<u8>) -> RgbImage {
    let s = a.shape();
    assert_eq!(s.len(), 3, "HWC image");
    RgbImage::from_raw(s[1] as u32, s[0] as u32, a.iter().copied().collect()).unwrap()
}

/// (largest difference, number of differing values).
fn compare(got: &RgbImage, want: &ArrayD<u8>, what: &str) -> (u8, usize) {
    assert_eq!(
        [got.height() as usize, got.width() as usize, 3],
        want.shape(),
        "{what}: shape"
    );
    let mut worst = 0;
    let mut differ = 0;
    for (a, b) in got.iter().zip(want.iter()) {
        let d = a.abs_diff(*b);
        worst = worst.max(d);
        differ += (d > 0) as usize;
    }
    assert!(
        worst <= 1,
        "{what}: differs from torchvision by up to {worst} levels"
    );
    (worst, differ)
}

#[test]
fn colour_jitter_ops_match_torchvision() {
    let fx = Fixture::load();
    let img = to_image(&fx.u8("image"));
    type Op = fn(&mut RgbImage, f64);
    let ops: [(&str, Op); 4] = [
        ("brightness", adjust_brightness),
        ("contrast", adjust_contrast),
        ("saturation", adjust_saturation),
        ("hue", adjust_hue),
    ];
    for (name, op) in ops {
        let factors = fx.f64(&format!("{name}_factors"));
        let want = fx.u8(name);
        for (i, f) in factors.iter().enumerate() {
            let mut got = img.clone();
            // Factors are Python floats (double) in torchvision; so are densa's.
            op(&mut got, *f);
            let (_, differ) = compare(
                &got,
                &want.index_axis(Axis(0), i).to_owned(),
                &format!("{name}({f})"),
            );
            // Same f32 expressions in the same order: expected bit-exact.
            assert_eq!(
                differ, 0,
                "{name}({f}): {differ} values differ by one level"
            );
        }
    }
}

#[test]
fn grayscale_and_solarize_match_torchvision() {
    let fx = Fixture::load();
    let img = to_image(&fx.u8("image"));
    let mut g = img.clone();
    grayscale_in_place(&mut g);
    assert_eq!(compare(&g, &fx.u8("grayscale"), "rgb_to_grayscale").1, 0);
    let mut s = img.clone();
    solarize(&mut s, 128);
    assert_eq!(compare(&s, &fx.u8("solarize_128"), "solarize(128)").1, 0);
}

#[test]
fn gaussian_blur_matches_torchvision_within_one_level() {
    let fx = Fixture::load();
    let img = to_image(&fx.u8("image"));
    let params = fx.f64("blur_params");
    let want = fx.u8("blur");
    let mut total_differ = 0;
    for (i, p) in params.outer_iter().enumerate() {
        let (k, sigma) = (p[0] as usize, p[1] as f32);
        let got = gaussian_blur(&img, k, sigma);
        let (_, differ) = compare(
            &got,
            &want.index_axis(Axis(0), i).to_owned(),
            &format!("gaussian_blur(k={k}, sigma={sigma})"),
        );
        total_differ += differ;
    }
    // Rounding ties differ only rarely.
    let n = params.shape()[0] * img.len();
    eprintln!("gaussian_blur: {total_differ} of {n} values differ from torchvision by one level");
    assert!(
        total_differ * 50 <= n,
        "{total_differ} of {n} blurred values differ by one level"
    );
}

#[test]
fn resized_crop_matches_pillow() {
    let fx = Fixture::load();
    let img = to_image(&fx.u8("image"));
    let params = fx.i64("crop_params");
    for (i, p) in params.outer_iter().enumerate() {
        let (top, left, h, w, oh, ow) = (p[0], p[1], p[2], p[3], p[4], p[5]);
        let crop = CropBox::new(left as f32, top as f32, (left + w) as f32, (top + h) as f32);
        for flip in [false, true] {
            let got = resized_crop(&img, &crop, (ow as u32, oh as u32), flip);
            let name = if flip {
                format!("crop_{i}_flipped")
            } else {
                format!("crop_{i}")
            };
            // Pillow's coefficients and fixed-point arithmetic: expected bit-exact.
            let (_, differ) = compare(
                &got,
                &fx.u8(&name),
                &format!("resized_crop {p:?} flip {flip}"),
            );
            assert_eq!(
                differ, 0,
                "resized_crop {p:?} flip {flip}: {differ} values differ"
            );
        }
    }
}
