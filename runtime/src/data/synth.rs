//! Synthetic scenes: a deterministic generator of images with object boxes, instance masks and
//! semantic masks, so that every pipeline (pretraining, detection, segmentation, evaluation,
//! domain shift) can be exercised and benchmarked without downloads.
//!
//! A scene is a procedural background (value noise, stripes, checkers... per [`SynthStyle`])
//! with objects painted one after the other. Each class is a **shape and a texture family**
//! ([`SHAPES`]): disks carry stripes, squares checkers, triangles dots, rings sectors, crosses
//! nested squares, stars a gradient; colours, scale (log-uniform, small to large), rotation,
//! texture frequency and phase vary per instance, and backgrounds use the same kinds of
//! texture, so a detector has to learn shapes rather than threshold a colour.
//!
//! Occlusion: later objects cover earlier ones. An object is dropped when fewer than
//! [`SynthConfig::min_area`] pixels or less than [`SynthConfig::min_visible`] of its in-image
//! area stay visible; dropped objects are not painted at all (the scene is rasterised again
//! without them), so every painted object pixel is annotated and every annotation is exactly
//! its visible pixels. Edges are hard (no anti-aliasing) for the same reason; a small pixel
//! noise is added to the colours.
//!
//! Output of [`generate`] (choices ours):
//! - `images/NNNNNN.png`: RGB.
//! - `masks/NNNNNN.png`: 8-bit gray semantic masks, 0 = background, `class + 1` (= the COCO
//!   category id) for objects; 255 (ignore) is not used.
//! - `annotations.json`: COCO instances. Image ids `1..=N` in file order, category ids
//!   `1..=K` named after [`SHAPES`], annotation ids from 1. `bbox` is the tight box of the
//!   visible pixels (`[x, y, w, h]`, pixel edges), `area` their count, `segmentation` an
//!   uncompressed RLE (COCO's column-major counts), `iscrowd` 0.
//!
//! Everything is a function of the configuration: each image draws from its own ChaCha8 stream
//! (seed, image index), so the files are byte-identical for the same seed whatever the number
//! of threads.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::coco::{Annotation, Category, Dataset, Image, RleCounts, Segmentation};
use super::image::{write_png_gray, write_png_rgb, GrayImage, RgbImage};
use super::rng::DetRng;
use super::DataError;
use crate::mask::Rle;

/// The object classes, in category order: a shape each, with its texture family.
pub const SHAPES: [&str; 6] = ["disk", "square", "triangle", "ring", "cross", "star"];

/// Background look, for domain-shift experiments (objects are drawn the same way in both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SynthStyle {
    /// Muted, light palettes; value noise, soft stripes, checkers.
    #[default]
    A,
    /// Saturated, dark palettes; gradients with grain, plaid, Voronoi cells.
    B,
}

impl FromStr for SynthStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "a" => Ok(SynthStyle::A),
            "b" => Ok(SynthStyle::B),
            other => Err(format!("unknown style {other:?} (expected a or b)")),
        }
    }
}

impl fmt::Display for SynthStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SynthStyle::A => "a",
            SynthStyle::B => "b",
        })
    }
}

/// What to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SynthConfig {
    /// Number of images. Default 100.
    pub images: usize,
    /// Default 0.
    pub seed: u64,
    /// Number of classes, the first `classes` of [`SHAPES`] (1..=6). Default 3.
    pub classes: usize,
    /// Image width in pixels. Default 128.
    pub width: u32,
    /// Image height in pixels. Default 128.
    pub height: u32,
    /// Objects placed per image, before dropping occluded ones. Default 1..=5.
    pub min_objects: usize,
    pub max_objects: usize,
    /// Smallest visible fraction of an object's in-image area to keep it. Default 0.4.
    pub min_visible: f32,
    /// Smallest visible area in pixels to keep an object. Default 16.
    pub min_area: u32,
    /// Default [`SynthStyle::A`].
    pub style: SynthStyle,
    /// Amplitude of the uniform per-pixel colour noise (0..=255). Default 6.
    pub noise: u8,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            images: 100,
            seed: 0,
            classes: 3,
            width: 128,
            height: 128,
            min_objects: 1,
            max_objects: 5,
            min_visible: 0.4,
            min_area: 16,
            style: SynthStyle::A,
            noise: 6,
        }
    }
}

impl SynthConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.images == 0 {
            return Err(DataError::config("images", "must be at least 1"));
        }
        if !(1..=SHAPES.len()).contains(&self.classes) {
            return Err(DataError::config(
                "classes",
                format!(
                    "{} given; 1 to {} are available ({})",
                    self.classes,
                    SHAPES.len(),
                    SHAPES.join(", ")
                ),
            ));
        }
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if !(16..=8192).contains(&v) {
                return Err(DataError::config(name, format!("{v} is outside 16..=8192")));
            }
        }
        if self.min_objects > self.max_objects || self.max_objects == 0 || self.max_objects > 64 {
            return Err(DataError::config(
                "objects",
                format!(
                    "{}..={} per image; need 0 <= min <= max and 1 <= max <= 64",
                    self.min_objects, self.max_objects
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_visible) {
            return Err(DataError::config(
                "min_visible",
                format!("{} is outside [0, 1]", self.min_visible),
            ));
        }
        Ok(())
    }
}

/// One annotated object of a rendered scene.
#[derive(Clone, Debug, PartialEq)]
pub struct SceneObject {
    /// Index into [`SHAPES`].
    pub class: usize,
    /// Visible pixels.
    pub area: u32,
    /// Tight box of the visible pixels, `[x0, y0, x1, y1]` with exclusive ends.
    pub bbox: [u32; 4],
}

/// A rendered scene.
#[derive(Clone, Debug)]
pub struct Scene {
    pub image: RgbImage,
    /// Row-major, 0 = background, `k` = `objects[k - 1]`.
    pub instance_map: Vec<u8>,
    pub objects: Vec<SceneObject>,
    /// Objects placed but dropped as too occluded or too small.
    pub dropped: usize,
}

impl Scene {
    /// The semantic mask: 0 = background, `class + 1` for objects.
    pub fn semantic_mask(&self) -> GrayImage {
        let values = self
            .instance_map
            .iter()
            .map(|&k| {
                if k == 0 {
                    0
                } else {
                    self.objects[k as usize - 1].class as u8 + 1
                }
            })
            .collect();
        GrayImage::from_raw(self.image.width(), self.image.height(), values)
            .expect("the instance map has one value per pixel")
    }

    /// The binary mask (row-major) of `objects[i]`.
    pub fn instance_mask(&self, i: usize) -> Vec<bool> {
        self.instance_map
            .iter()
            .map(|&k| k as usize == i + 1)
            .collect()
    }
}

type Rgb = [f32; 3];

fn hsv(h: f32, s: f32, v: f32) -> Rgb {
    let h = h.rem_euclid(1.0) * 6.0;
    let c = v * s;
    let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [(r + m) * 255.0, (g + m) * 255.0, (b + m) * 255.0]
}

fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn smoothstep(t: f32) -> f32 {
    t * t * (3.0 - 2.0 * t)
}

/// A procedural background.
enum Background {
    /// Smooth value noise on a `cell`-pixel lattice between two colours.
    Noise {
        cell: f32,
        lattice: Vec<f32>,
        cols: usize,
        colors: [Rgb; 2],
    },
    /// Soft sinusoidal stripes at an angle.
    Stripes {
        dir: [f32; 2],
        period: f32,
        phase: f32,
        colors: [Rgb; 2],
    },
    /// Rotated checkers.
    Checkers {
        dir: [f32; 2],
        cell: f32,
        colors: [Rgb; 2],
    },
    /// Linear gradient with grain (the grain comes from the pixel noise and a fine lattice).
    Gradient {
        dir: [f32; 2],
        span: f32,
        colors: [Rgb; 2],
        grain: Box<Background>,
    },
    /// Two crossing stripe sets over three colours.
    Plaid { period: [f32; 2], colors: [Rgb; 3] },
    /// Voronoi cells, each with its own colour.
    Cells { seeds: Vec<([f32; 2], Rgb)> },
}

impl Background {
    fn draw(style: SynthStyle, rng: &mut DetRng, w: u32, h: u32) -> Self {
        let color = |rng: &mut DetRng| match style {
            SynthStyle::A => hsv(rng.unit(), rng.float(0.1, 0.45), rng.float(0.5, 0.95)),
            SynthStyle::B => hsv(rng.unit(), rng.float(0.55, 1.0), rng.float(0.15, 0.6)),
        };
        let angle = rng.float(0.0, std::f32::consts::PI);
        let dir = [angle.cos(), angle.sin()];
        let size = w.min(h) as f32;
        let noise = |rng: &mut DetRng, cell: f32, colors| {
            let cols = (w as f32 / cell) as usize + 2;
            let rows = (h as f32 / cell) as usize + 2;
            let lattice = (0..cols * rows).map(|_| rng.unit()).collect();
            Background::Noise {
                cell,
                lattice,
                cols,
                colors,
            }
        };
        match (style, rng.below(3)) {
            (SynthStyle::A, 0) => {
                let colors = [color(rng), color(rng)];
                let cell = rng.float(size / 16.0, size / 4.0).max(4.0);
                noise(rng, cell, colors)
            }
            (SynthStyle::A, 1) => Background::Stripes {
                dir,
                period: rng.float(size / 24.0, size / 6.0).max(4.0),
                phase: rng.float(0.0, std::f32::consts::TAU),
                colors: [color(rng), color(rng)],
            },
            (SynthStyle::A, _) => Background::Checkers {
                dir,
                cell: rng.float(size / 20.0, size / 6.0).max(3.0),
                colors: [color(rng), color(rng)],
            },
            (SynthStyle::B, 0) => {
                let colors = [color(rng), color(rng)];
                let grain_colors = [[0.0; 3], [40.0; 3]];
                Background::Gradient {
                    dir,
                    span: size,
                    colors,
                    grain: Box::new(noise(rng, 3.0, grain_colors)),
                }
            }
            (SynthStyle::B, 1) => Background::Plaid {
                period: [
                    rng.float(size / 12.0, size / 4.0).max(4.0),
                    rng.float(size / 12.0, size / 4.0).max(4.0),
                ],
                colors: [color(rng), color(rng), color(rng)],
            },
            (SynthStyle::B, _) => {
                let n = rng.int(5, 14);
                let seeds = (0..n)
                    .map(|_| {
                        (
                            [rng.float(0.0, w as f32), rng.float(0.0, h as f32)],
                            color(rng),
                        )
                    })
                    .collect();
                Background::Cells { seeds }
            }
        }
    }

    fn at(&self, x: f32, y: f32) -> Rgb {
        match self {
            Background::Noise {
                cell,
                lattice,
                cols,
                colors,
            } => {
                let (gx, gy) = (x / cell, y / cell);
                let (ix, iy) = (gx as usize, gy as usize);
                let (fx, fy) = (smoothstep(gx.fract()), smoothstep(gy.fract()));
                let v = |i: usize, j: usize| lattice[j * cols + i];
                let top = v(ix, iy) + (v(ix + 1, iy) - v(ix, iy)) * fx;
                let bottom = v(ix, iy + 1) + (v(ix + 1, iy + 1) - v(ix, iy + 1)) * fx;
                mix(colors[0], colors[1], top + (bottom - top) * fy)
            }
            Background::Stripes {
                dir,
                period,
                phase,
                colors,
            } => {
                let t = (x * dir[0] + y * dir[1]) / period * std::f32::consts::TAU + phase;
                mix(colors[0], colors[1], 0.5 + 0.5 * t.sin())
            }
            Background::Checkers { dir, cell, colors } => {
                let u = (x * dir[0] + y * dir[1]) / cell;
                let v = (-x * dir[1] + y * dir[0]) / cell;
                colors[((u.floor() + v.floor()) as i64).rem_euclid(2) as usize]
            }
            Background::Gradient {
                dir,
                span,
                colors,
                grain,
            } => {
                let t = ((x * dir[0] + y * dir[1]) / span).rem_euclid(1.0);
                let g = grain.at(x, y)[0];
                let c = mix(colors[0], colors[1], t);
                [c[0] + g - 20.0, c[1] + g - 20.0, c[2] + g - 20.0]
            }
            Background::Plaid { period, colors } => {
                let a = ((x / period[0]) as i64).rem_euclid(2) as usize;
                let b = ((y / period[1]) as i64).rem_euclid(2) as usize;
                let base = mix(colors[0], colors[1], 0.5 * a as f32 + 0.25 * b as f32);
                if b == 1 && a == 1 {
                    colors[2]
                } else {
                    base
                }
            }
            Background::Cells { seeds } => {
                let nearest = seeds
                    .iter()
                    .min_by(|a, b| {
                        let da = (a.0[0] - x).powi(2) + (a.0[1] - y).powi(2);
                        let db = (b.0[0] - x).powi(2) + (b.0[1] - y).powi(2);
                        da.total_cmp(&db)
                    })
                    .map(|s| s.1);
                nearest.unwrap_or([128.0; 3])
            }
        }
    }
}

/// One placed object: shape and texture of its class, instance parameters.
struct Object {
    class: usize,
    center: [f32; 2],
    radius: f32,
    /// cos and sin of the rotation.
    rot: [f32; 2],
    colors: [Rgb; 2],
    freq: f32,
    phase: f32,
}

const SQRT3_2: f32 = 0.866_025_4;

impl Object {
    fn draw(rng: &mut DetRng, classes: usize, w: u32, h: u32) -> Self {
        let size = w.min(h) as f32;
        let (r_min, r_max) = ((size * 0.04).max(4.0), size * 0.4);
        let radius = (r_min.ln() + rng.unit() * (r_max.ln() - r_min.ln())).exp();
        let angle = rng.float(0.0, std::f32::consts::TAU);
        let hue = rng.unit();
        let c1 = hsv(hue, rng.float(0.3, 1.0), rng.float(0.3, 1.0));
        let c2 = hsv(
            hue + rng.float(0.25, 0.75),
            rng.float(0.3, 1.0),
            rng.float(0.3, 1.0),
        );
        Object {
            class: rng.below(classes as u64) as usize,
            center: [rng.float(0.0, w as f32), rng.float(0.0, h as f32)],
            radius,
            rot: [angle.cos(), angle.sin()],
            colors: [c1, c2],
            freq: rng.float(1.5, 3.5),
            phase: rng.float(0.0, std::f32::consts::TAU),
        }
    }

    /// Pixel centre -> the object's unit frame (shape inscribed in the unit circle).
    fn local(&self, x: f32, y: f32) -> [f32; 2] {
        let (dx, dy) = (
            (x - self.center[0]) / self.radius,
            (y - self.center[1]) / self.radius,
        );
        [
            dx * self.rot[0] + dy * self.rot[1],
            -dx * self.rot[1] + dy * self.rot[0],
        ]
    }

    fn contains(&self, [u, v]: [f32; 2]) -> bool {
        let rho2 = u * u + v * v;
        match self.class {
            0 => rho2 <= 1.0,
            1 => u.abs().max(v.abs()) <= 0.7,
            2 => v <= 0.5 && -SQRT3_2 * u - 0.5 * v <= 0.5 && SQRT3_2 * u - 0.5 * v <= 0.5,
            3 => (0.3..=1.0).contains(&rho2),
            4 => (u.abs() <= 0.3 && v.abs() <= 0.95) || (v.abs() <= 0.3 && u.abs() <= 0.95),
            _ => {
                // Five-pointed star: fold the angle into one half-spike and test against the
                // edge from the outer vertex (1, 0) to the inner vertex at 36 degrees.
                let sector = std::f32::consts::TAU / 5.0;
                let mut a = v.atan2(u).rem_euclid(sector);
                if a > sector / 2.0 {
                    a = sector - a;
                }
                let rho = rho2.sqrt();
                let (qx, qy) = (rho * a.cos(), rho * a.sin());
                let inner = 0.45f32;
                let (bx, by) = (inner * (sector / 2.0).cos(), inner * (sector / 2.0).sin());
                // Inside when q is on the origin's side of the line A -> B.
                let cross = |px: f32, py: f32| (bx - 1.0) * py - by * (px - 1.0);
                cross(qx, qy) * cross(0.0, 0.0) >= 0.0
            }
        }
    }

    fn texture(&self, [u, v]: [f32; 2]) -> Rgb {
        let f = self.freq;
        let pick = |b: bool| self.colors[b as usize];
        match self.class {
            0 => pick((std::f32::consts::PI * f * u + self.phase).sin() > 0.0),
            1 => pick((((u + 1.0) * f).floor() + ((v + 1.0) * f).floor()) as i64 % 2 == 0),
            2 => {
                let (a, b) = (
                    ((u + 1.0) * f * 1.5).fract() - 0.5,
                    ((v + 1.0) * f * 1.5).fract() - 0.5,
                );
                pick(a * a + b * b < 0.09)
            }
            3 => {
                let sectors = (2.0 * f).round().max(3.0);
                let t = (v.atan2(u) + self.phase) / std::f32::consts::TAU * sectors;
                pick((t.floor() as i64).rem_euclid(2) == 0)
            }
            4 => pick(((u.abs().max(v.abs()) * f * 2.0) as i64) % 2 == 0),
            _ => mix(
                self.colors[0],
                self.colors[1],
                (0.5 + 0.5 * v).clamp(0.0, 1.0),
            ),
        }
    }

    /// Pixel bounds `[x0, y0, x1, y1)` of the unit circle, clipped to the image.
    fn pixel_bounds(&self, w: u32, h: u32) -> [u32; 4] {
        let clip = |v: f32, hi: u32| v.clamp(0.0, hi as f32) as u32;
        [
            clip((self.center[0] - self.radius).floor(), w),
            clip((self.center[1] - self.radius).floor(), h),
            clip((self.center[0] + self.radius).ceil() + 1.0, w),
            clip((self.center[1] + self.radius).ceil() + 1.0, h),
        ]
    }
}

/// Paints the shapes in order into an instance map; returns it and each shape's in-image area.
fn rasterize(objects: &[&Object], w: u32, h: u32) -> (Vec<u8>, Vec<u32>) {
    let mut map = vec![0u8; (w * h) as usize];
    let mut full = vec![0u32; objects.len()];
    for (k, object) in objects.iter().enumerate() {
        let [x0, y0, x1, y1] = object.pixel_bounds(w, h);
        for y in y0..y1 {
            for x in x0..x1 {
                if object.contains(object.local(x as f32 + 0.5, y as f32 + 0.5)) {
                    map[(y * w + x) as usize] = k as u8 + 1;
                    full[k] += 1;
                }
            }
        }
    }
    (map, full)
}

/// Renders image `index` of the dataset `config` describes (deterministic).
pub fn render_scene(config: &SynthConfig, index: u64) -> Scene {
    let (w, h) = (config.width, config.height);
    let mut rng = DetRng::new(config.seed, b"synthscn", index);
    let background = Background::draw(config.style, &mut rng, w, h);
    let n = rng.int(config.min_objects, config.max_objects.min(254));
    let placed: Vec<Object> = (0..n)
        .map(|_| Object::draw(&mut rng, config.classes, w, h))
        .collect();

    let all: Vec<&Object> = placed.iter().collect();
    let (map, full) = rasterize(&all, w, h);
    let mut visible = vec![0u32; placed.len()];
    for &k in &map {
        if k > 0 {
            visible[k as usize - 1] += 1;
        }
    }
    let keep: Vec<&Object> = placed
        .iter()
        .zip(visible.iter().zip(&full))
        .filter(|(_, (&vis, &full))| {
            vis >= config.min_area.max(1) && vis as f32 >= config.min_visible * full as f32
        })
        .map(|(o, _)| o)
        .collect();
    let dropped = placed.len() - keep.len();
    // Without the dropped shapes every kept one is at least as visible as before.
    let map = if dropped > 0 {
        rasterize(&keep, w, h).0
    } else {
        map
    };

    let mut objects: Vec<SceneObject> = keep
        .iter()
        .map(|o| SceneObject {
            class: o.class,
            area: 0,
            bbox: [u32::MAX, u32::MAX, 0, 0],
        })
        .collect();
    let amplitude = config.noise as i64;
    let mut image = RgbImage::new(w, h);
    for y in 0..h {
        for x in 0..w {
            let k = map[(y * w + x) as usize] as usize;
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let color = if k == 0 {
                background.at(px, py)
            } else {
                let o = &mut objects[k - 1];
                o.area += 1;
                o.bbox = [
                    o.bbox[0].min(x),
                    o.bbox[1].min(y),
                    o.bbox[2].max(x + 1),
                    o.bbox[3].max(y + 1),
                ];
                keep[k - 1].texture(keep[k - 1].local(px, py))
            };
            let mut pixel = [0u8; 3];
            for (c, p) in color.iter().zip(pixel.iter_mut()) {
                let jitter = if amplitude > 0 {
                    rng.below(2 * amplitude as u64 + 1) as i64 - amplitude
                } else {
                    0
                };
                *p = (c.round() as i64 + jitter).clamp(0, 255) as u8;
            }
            image.put_pixel(x, y, image::Rgb(pixel));
        }
    }
    Scene {
        image,
        instance_map: map,
        objects,
        dropped,
    }
}

/// What [`generate`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthReport {
    pub images: usize,
    pub objects: usize,
    /// Objects placed but dropped as too occluded or too small.
    pub dropped: usize,
    pub annotations: PathBuf,
}

/// Writes `config.images` scenes under `out` (see the module docs for the layout), calling
/// `progress` once per image written (from the worker threads).
pub fn generate(
    config: &SynthConfig,
    out: &Path,
    progress: &(dyn Fn() + Sync),
) -> Result<SynthReport, DataError> {
    config.validate()?;
    let images_dir = out.join("images");
    let masks_dir = out.join("masks");
    for dir in [&images_dir, &masks_dir] {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    }
    let digits = (config.images - 1).to_string().len().max(6);
    let per_image = (0..config.images)
        .into_par_iter()
        .map(|i| {
            let scene = render_scene(config, i as u64);
            let name = format!("{i:0digits$}.png");
            write_png_rgb(&images_dir.join(&name), &scene.image)?;
            write_png_gray(&masks_dir.join(&name), &scene.semantic_mask())?;
            let annotations: Vec<(usize, [f64; 4], f64, Vec<u32>)> = scene
                .objects
                .iter()
                .enumerate()
                .map(|(k, o)| {
                    let [x0, y0, x1, y1] = o.bbox;
                    let bbox = [x0 as f64, y0 as f64, (x1 - x0) as f64, (y1 - y0) as f64];
                    let mask: Vec<u8> = scene.instance_mask(k).into_iter().map(u8::from).collect();
                    let counts = Rle::from_mask(&mask, config.height, config.width).counts;
                    (o.class, bbox, o.area as f64, counts)
                })
                .collect();
            progress();
            Ok((name, annotations, scene.dropped))
        })
        .collect::<Result<Vec<_>, DataError>>()?;

    let mut dataset = Dataset {
        info: Some(serde_json::json!({
            "description": "densa synthetic scenes",
            "seed": config.seed,
            "style": config.style.to_string(),
            "classes": config.classes,
        })),
        categories: (0..config.classes)
            .map(|k| Category {
                id: k as u64 + 1,
                name: SHAPES[k].to_string(),
                supercategory: Some("shape".to_string()),
            })
            .collect(),
        ..Dataset::default()
    };
    let mut dropped = 0;
    for (i, (name, annotations, d)) in per_image.into_iter().enumerate() {
        let image_id = i as u64 + 1;
        dataset.images.push(Image {
            id: image_id,
            file_name: name,
            width: config.width,
            height: config.height,
        });
        dropped += d;
        for (class, bbox, area, counts) in annotations {
            dataset.annotations.push(Annotation {
                id: dataset.annotations.len() as u64 + 1,
                image_id,
                category_id: class as u64 + 1,
                bbox,
                area,
                iscrowd: 0,
                segmentation: Some(Segmentation::Rle {
                    size: [config.height, config.width],
                    counts: RleCounts::Uncompressed(counts),
                }),
            });
        }
    }
    let path = out.join("annotations.json");
    let json =
        serde_json::to_vec(&dataset).map_err(|e| DataError::io(&path, std::io::Error::other(e)))?;
    let tmp = out.join(".annotations.json.tmp");
    std::fs::write(&tmp, json).map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))?;
    Ok(SynthReport {
        images: config.images,
        objects: dataset.annotations.len(),
        dropped,
        annotations: path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_fit_the_unit_circle_and_have_area() {
        for (class, name) in SHAPES.iter().enumerate() {
            let o = Object {
                class,
                center: [0.0, 0.0],
                radius: 1.0,
                rot: [1.0, 0.0],
                colors: [[0.0; 3]; 2],
                freq: 2.0,
                phase: 0.0,
            };
            let mut inside = 0;
            let n = 200;
            for i in 0..n {
                for j in 0..n {
                    let (u, v) = (
                        -1.2 + 2.4 * i as f32 / n as f32,
                        -1.2 + 2.4 * j as f32 / n as f32,
                    );
                    if o.contains([u, v]) {
                        assert!(u * u + v * v <= 1.0 + 1e-4, "{name} at ({u}, {v})");
                        inside += 1;
                    }
                }
            }
            let area = inside as f32 * (2.4 / n as f32).powi(2);
            assert!(area > 0.8, "{name}: area {area}");
        }
    }

    #[test]
    fn config_ranges_are_checked() {
        let bad = [
            SynthConfig {
                classes: 7,
                ..SynthConfig::default()
            },
            SynthConfig {
                classes: 0,
                ..SynthConfig::default()
            },
            SynthConfig {
                width: 8,
                ..SynthConfig::default()
            },
            SynthConfig {
                min_objects: 3,
                max_objects: 2,
                ..SynthConfig::default()
            },
            SynthConfig {
                min_visible: 1.5,
                ..SynthConfig::default()
            },
            SynthConfig {
                images: 0,
                ..SynthConfig::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
        assert!(SynthConfig::default().validate().is_ok());
        assert_eq!("B".parse::<SynthStyle>(), Ok(SynthStyle::B));
        assert!("c".parse::<SynthStyle>().is_err());
    }

    #[test]
    fn scenes_are_consistent_and_deterministic() {
        let config = SynthConfig {
            classes: 6,
            max_objects: 8,
            ..SynthConfig::default()
        };
        let mut total = 0;
        let mut classes_seen = [false; 6];
        for index in 0..20 {
            let scene = render_scene(&config, index);
            let again = render_scene(&config, index);
            assert_eq!(scene.image, again.image);
            assert_eq!(scene.instance_map, again.instance_map);
            let mask = scene.semantic_mask();
            for (k, o) in scene.objects.iter().enumerate() {
                total += 1;
                classes_seen[o.class] = true;
                let m = scene.instance_mask(k);
                let pixels: Vec<(u32, u32)> = (0..config.height)
                    .flat_map(|y| (0..config.width).map(move |x| (x, y)))
                    .filter(|&(x, y)| m[(y * config.width + x) as usize])
                    .collect();
                assert_eq!(o.area as usize, pixels.len());
                assert!(o.area >= config.min_area);
                let x0 = pixels.iter().map(|p| p.0).min().unwrap();
                let y0 = pixels.iter().map(|p| p.1).min().unwrap();
                let x1 = pixels.iter().map(|p| p.0).max().unwrap() + 1;
                let y1 = pixels.iter().map(|p| p.1).max().unwrap() + 1;
                assert_eq!(o.bbox, [x0, y0, x1, y1], "tight box");
                for &(x, y) in &pixels {
                    assert_eq!(mask.get_pixel(x, y).0[0] as usize, o.class + 1);
                }
            }
            let object_pixels = scene.instance_map.iter().filter(|&&k| k > 0).count();
            let mask_pixels = mask.as_raw().iter().filter(|&&v| v > 0).count();
            assert_eq!(object_pixels, mask_pixels);
        }
        assert!(total > 40, "{total} objects in 20 scenes");
        assert!(classes_seen.iter().all(|&s| s), "{classes_seen:?}");
        let other = render_scene(
            &SynthConfig {
                seed: 1,
                ..config.clone()
            },
            0,
        );
        assert_ne!(other.image, render_scene(&config, 0).image);
    }

    #[test]
    fn styles_differ_in_background_brightness() {
        // Style A is light and muted, style B dark and saturated: the mean background
        // brightness separates them over a few scenes.
        let mean = |style| {
            let config = SynthConfig {
                style,
                max_objects: 1,
                min_objects: 0,
                ..SynthConfig::default()
            };
            let mut sum = 0f64;
            let mut n = 0f64;
            for i in 0..10 {
                let s = render_scene(&config, i);
                for (p, &k) in s.image.pixels().zip(&s.instance_map) {
                    if k == 0 {
                        sum += p.0.iter().map(|&c| c as f64).sum::<f64>() / 3.0;
                        n += 1.0;
                    }
                }
            }
            sum / n
        };
        let (a, b) = (mean(SynthStyle::A), mean(SynthStyle::B));
        assert!(a > b + 40.0, "style a {a}, style b {b}");
    }
}
