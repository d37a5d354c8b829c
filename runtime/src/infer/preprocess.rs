//! Image -> model input, and the transform that maps model pixels back to the image.

use image::RgbImage;
use ndarray::Array3;

use super::spec::{Channels, InputSpec, ResizeMode};
use crate::augment::spatial::resize;

/// How model-input pixels relate to original-image pixels: `model = image * scale + offset`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageTransform {
    pub scale: [f32; 2],
    pub offset: [f32; 2],
    /// Original image size `(width, height)`.
    pub image_size: [u32; 2],
}

impl ImageTransform {
    /// Maps an `[x1, y1, x2, y2]` box in model pixels to image pixels, clipped to the image.
    pub fn box_to_image(&self, b: [f32; 4]) -> [f32; 4] {
        let [w, h] = self.image_size.map(|v| v as f32);
        let x = |v: f32| ((v - self.offset[0]) / self.scale[0]).clamp(0.0, w);
        let y = |v: f32| ((v - self.offset[1]) / self.scale[1]).clamp(0.0, h);
        [x(b[0]), y(b[1]), x(b[2]), y(b[3])]
    }
}

/// Resizes (Pillow's antialiased bilinear, bit-exact: what a PIL-based Python pipeline feeds
/// the same model) or letterboxes `img` to the input size, then normalises into a `[3, H, W]`
/// float array: `(pixel * scale - mean) / std`, channels in the spec's order.
///
/// # Shapes
/// `H x W x 3 (u8) -> [3, size[1], size[0]]`.
pub fn prepare(img: &RgbImage, spec: &InputSpec) -> (Array3<f32>, ImageTransform) {
    let [tw, th] = spec.size;
    let (iw, ih) = img.dimensions();
    let (canvas, transform) = match spec.resize {
        ResizeMode::Stretch => {
            let resized = resize(img, (tw, th));
            let t = ImageTransform {
                scale: [tw as f32 / iw as f32, th as f32 / ih as f32],
                offset: [0.0, 0.0],
                image_size: [iw, ih],
            };
            (resized, t)
        }
        ResizeMode::Letterbox => {
            let r = (tw as f32 / iw as f32).min(th as f32 / ih as f32);
            let nw = ((iw as f32 * r).round() as u32).clamp(1, tw);
            let nh = ((ih as f32 * r).round() as u32).clamp(1, th);
            let resized = resize(img, (nw, nh));
            let (ox, oy) = ((tw - nw) / 2, (th - nh) / 2);
            let mut canvas = RgbImage::from_pixel(tw, th, image::Rgb([spec.pad_value; 3]));
            image::imageops::replace(&mut canvas, &resized, ox as i64, oy as i64);
            let t = ImageTransform {
                scale: [nw as f32 / iw as f32, nh as f32 / ih as f32],
                offset: [ox as f32, oy as f32],
                image_size: [iw, ih],
            };
            (canvas, t)
        }
    };
    let mut out = Array3::<f32>::zeros((3, th as usize, tw as usize));
    for (x, y, p) in canvas.enumerate_pixels() {
        for c in 0..3 {
            let src = match spec.channels {
                Channels::Rgb => c,
                Channels::Bgr => 2 - c,
            };
            out[[c, y as usize, x as usize]] =
                (p.0[src] as f32 * spec.scale - spec.mean[c]) / spec.std[c];
        }
    }
    (out, transform)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::spec::InputLayout;

    fn spec(resize: ResizeMode) -> InputSpec {
        InputSpec {
            name: None,
            layout: InputLayout::Nchw,
            size: [64, 64],
            resize,
            pad_value: 114,
            scale: 1.0 / 255.0,
            mean: [0.0; 3],
            std: [1.0; 3],
            channels: Channels::Rgb,
        }
    }

    #[test]
    fn letterbox_keeps_aspect_and_maps_boxes_back() {
        let img = RgbImage::from_pixel(200, 100, image::Rgb([255, 0, 0]));
        let (x, t) = prepare(&img, &spec(ResizeMode::Letterbox));
        assert_eq!(x.shape(), &[3, 64, 64]);
        assert_eq!(t.offset, [0.0, 16.0]);
        assert!((x[[0, 32, 32]] - 1.0).abs() < 1e-6, "image area is red");
        assert!(
            (x[[0, 2, 32]] - 114.0 / 255.0).abs() < 1e-6,
            "padding above"
        );
        let b = t.box_to_image([0.0, 16.0, 64.0, 48.0]);
        for (got, want) in b.iter().zip([0.0, 0.0, 200.0, 100.0]) {
            assert!((got - want).abs() < 1e-3, "{b:?}");
        }
    }

    #[test]
    fn stretch_and_bgr() {
        let img = RgbImage::from_pixel(10, 20, image::Rgb([10, 20, 30]));
        let mut s = spec(ResizeMode::Stretch);
        s.channels = Channels::Bgr;
        s.scale = 1.0;
        let (x, t) = prepare(&img, &s);
        assert_eq!(x[[0, 5, 5]], 30.0);
        assert_eq!(x[[2, 5, 5]], 10.0);
        assert_eq!(
            t.box_to_image([0.0, 0.0, 64.0, 64.0]),
            [0.0, 0.0, 10.0, 20.0]
        );
    }
}
