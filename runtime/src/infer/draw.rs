//! Drawing detections: boxes and labels burnt into the image.

use image::{Rgb, RgbImage};
use imageproc::drawing::draw_hollow_rect_mut;
use imageproc::rect::Rect;

use super::decode::Detection;

/// A distinct colour per class (golden-ratio hue steps).
pub fn class_colour(label: usize) -> Rgb<u8> {
    let h = (label as f32 * 0.618_034).fract() * 6.0;
    let x = (1.0 - (h % 2.0 - 1.0).abs()) * 255.0;
    let (r, g, b) = match h as u32 {
        0 => (255.0, x, 0.0),
        1 => (x, 255.0, 0.0),
        2 => (0.0, 255.0, x),
        3 => (0.0, x, 255.0),
        4 => (x, 0.0, 255.0),
        _ => (255.0, 0.0, x),
    };
    Rgb([r as u8, g as u8, b as u8])
}

/// Draws `text` with the 8x8 bitmap font at `(x, y)` on a filled background.
pub fn draw_label(img: &mut RgbImage, x: i32, y: i32, text: &str, fg: Rgb<u8>, bg: Rgb<u8>) {
    use font8x8::UnicodeFonts;
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                let (px, py) = (x + (i as i32) * 8 + col, y + row as i32);
                if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                    let on = bits >> col & 1 == 1;
                    img.put_pixel(px as u32, py as u32, if on { fg } else { bg });
                }
            }
        }
    }
}

/// Draws every detection with `name(label) score`.
pub fn draw_detections(img: &mut RgbImage, dets: &[Detection], name: impl Fn(usize) -> String) {
    for d in dets {
        let colour = class_colour(d.label);
        let [x1, y1, x2, y2] = d.bbox;
        let w = (x2 - x1).round().max(1.0) as u32;
        let h = (y2 - y1).round().max(1.0) as u32;
        for t in 0..2 {
            let r = Rect::at(x1.round() as i32 - t, y1.round() as i32 - t)
                .of_size(w + 2 * t as u32, h + 2 * t as u32);
            draw_hollow_rect_mut(img, r, colour);
        }
        let text = format!("{} {:.2}", name(d.label), d.score);
        let ty = if y1 >= 10.0 {
            y1.round() as i32 - 10
        } else {
            y1.round() as i32 + 2
        };
        draw_label(img, x1.round() as i32, ty, &text, Rgb([0, 0, 0]), colour);
    }
}
