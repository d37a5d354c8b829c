//! Planar float images and the colour spaces selective search diversifies over.
//!
//! Values follow OpenCV's 8-bit conventions so that `k` and the histogram ranges mean the
//! same as in `cv2.ximgproc.segmentation` (every channel in `[0, 256)`): HSV with
//! `H = degrees / 2` in `[0, 180)`, `S, V` in `[0, 255]`; CIE Lab (sRGB, D65) with
//! `L * 255 / 100`, `a + 128`, `b + 128`; grey `0.299 R + 0.587 G + 0.114 B`. Converted values
//! are rounded to integers, as an 8-bit image stores them.

use image::RgbImage;

/// A float image stored one plane per channel.
///
/// # Shapes
/// `channels[c]`: `height * width`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Planes {
    pub width: usize,
    pub height: usize,
    pub channels: Vec<Vec<f32>>,
}

/// The colour images of the paper's diversification (Uijlings et al. 2013, Table 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ColourSpace {
    Rgb,
    Hsv,
    Lab,
    /// Intensity (grey), one channel.
    Gray,
    /// The hue channel of HSV alone.
    Hue,
    /// Red, green and intensity.
    RgI,
}

fn hsv_u8(r: f32, g: f32, b: f32) -> [f32; 3] {
    let v = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = v - min;
    let s = if v > 0.0 { 255.0 * delta / v } else { 0.0 };
    let mut h = if delta == 0.0 {
        0.0
    } else if v == r {
        60.0 * (g - b) / delta
    } else if v == g {
        120.0 + 60.0 * (b - r) / delta
    } else {
        240.0 + 60.0 * (r - g) / delta
    };
    if h < 0.0 {
        h += 360.0;
    }
    let hue = (h / 2.0).round();
    [if hue >= 180.0 { 0.0 } else { hue }, s.round(), v]
}

fn srgb_to_linear(c: f32) -> f32 {
    let c = c / 255.0;
    if c <= 0.04045 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

fn lab_u8(r: f32, g: f32, b: f32) -> [f32; 3] {
    let (r, g, b) = (srgb_to_linear(r), srgb_to_linear(g), srgb_to_linear(b));
    // sRGB -> XYZ (D65), divided by the white point.
    let x = (0.412453 * r + 0.357580 * g + 0.180423 * b) / 0.950456;
    let y = 0.212671 * r + 0.715160 * g + 0.072169 * b;
    let z = (0.019334 * r + 0.119193 * g + 0.950227 * b) / 1.088754;
    let f = |t: f32| {
        if t > 0.008856 {
            t.cbrt()
        } else {
            7.787 * t + 16.0 / 116.0
        }
    };
    let l = if y > 0.008856 {
        116.0 * y.cbrt() - 16.0
    } else {
        903.3 * y
    };
    let a = 500.0 * (f(x) - f(y));
    let bb = 200.0 * (f(y) - f(z));
    [
        (l * 255.0 / 100.0).round().clamp(0.0, 255.0),
        (a + 128.0).round().clamp(0.0, 255.0),
        (bb + 128.0).round().clamp(0.0, 255.0),
    ]
}

fn gray_u8(r: f32, g: f32, b: f32) -> f32 {
    (0.299 * r + 0.587 * g + 0.114 * b).round()
}

impl ColourSpace {
    /// Number of channels of the converted image.
    pub fn channels(self) -> usize {
        match self {
            ColourSpace::Gray | ColourSpace::Hue => 1,
            _ => 3,
        }
    }

    /// Converts an RGB image.
    pub fn convert(self, img: &RgbImage) -> Planes {
        let (width, height) = (img.width() as usize, img.height() as usize);
        let mut channels = vec![Vec::with_capacity(width * height); self.channels()];
        for px in img.pixels() {
            let [r, g, b] = px.0.map(f32::from);
            let values: [f32; 3] = match self {
                ColourSpace::Rgb => [r, g, b],
                ColourSpace::Hsv | ColourSpace::Hue => hsv_u8(r, g, b),
                ColourSpace::Lab => lab_u8(r, g, b),
                ColourSpace::Gray => [gray_u8(r, g, b), 0.0, 0.0],
                ColourSpace::RgI => [r, g, gray_u8(r, g, b)],
            };
            for (c, plane) in channels.iter_mut().enumerate() {
                plane.push(values[c]);
            }
        }
        Planes {
            width,
            height,
            channels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsv_of_primaries_and_grey() {
        assert_eq!(hsv_u8(255.0, 0.0, 0.0), [0.0, 255.0, 255.0]);
        assert_eq!(hsv_u8(0.0, 255.0, 0.0), [60.0, 255.0, 255.0]);
        assert_eq!(hsv_u8(0.0, 0.0, 255.0), [120.0, 255.0, 255.0]);
        assert_eq!(hsv_u8(128.0, 128.0, 128.0), [0.0, 0.0, 128.0]);
        assert_eq!(hsv_u8(0.0, 0.0, 0.0), [0.0, 0.0, 0.0]);
    }

    #[test]
    fn lab_of_white_black_and_red() {
        assert_eq!(lab_u8(255.0, 255.0, 255.0), [255.0, 128.0, 128.0]);
        assert_eq!(lab_u8(0.0, 0.0, 0.0), [0.0, 128.0, 128.0]);
        // sRGB red: L 53.24, a 80.09, b 67.20 (CIE formulas).
        assert_eq!(lab_u8(255.0, 0.0, 0.0), [136.0, 208.0, 195.0]);
    }

    #[test]
    fn conversion_keeps_layout() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 50, y as u8 * 100, 7]));
        let p = ColourSpace::RgI.convert(&img);
        assert_eq!((p.width, p.height, p.channels.len()), (3, 2, 3));
        assert_eq!(p.channels[0], vec![0.0, 50.0, 100.0, 0.0, 50.0, 100.0]);
        assert_eq!(p.channels[1], vec![0.0, 0.0, 0.0, 100.0, 100.0, 100.0]);
        assert_eq!(ColourSpace::Hue.convert(&img).channels.len(), 1);
    }
}
