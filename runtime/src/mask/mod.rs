//! COCO run-length encoded (RLE) instance masks, as pycocotools' `maskApi` defines them.
//!
//! A mask of `height x width` pixels is read in **column-major** order (down the first column,
//! then the next) and stored as alternating run lengths, the first run being background (it is 0
//! when the mask starts with a foreground pixel). COCO files write the runs either as a list
//! ("uncompressed RLE") or as a compact string ("compressed RLE": each run, from the third on,
//! as the difference to the run two before, in 5-bit little-endian groups with a continuation
//! bit, offset into ASCII 48..111).
//!
//! Everything here reproduces pycocotools 2.0.x bit for bit where it defines a result:
//! [`Rle::from_polygon`] is `rleFrPoly` (the polygon is upsampled 5x, walked along its edges and
//! sampled at pixel centres), [`Rle::from_segmentation`] is `COCO.annToRLE` / `frPyObjects`
//! (polygons of one object are merged by union), [`Rle::bbox`] is the
//! current `rleToBbox`, [`Rle::iou`] and [`box_iou`] are `rleIou` / `bbIou` with COCO's crowd
//! rule (for a crowd ground truth the union is the detection's own area).
//!
//! Our choices: masks are handed in and out row-major (`mask[y * width + x]`), as images are;
//! a polygon needs an even count of at least 4 numbers (pycocotools 2.0.11 crashes on a list
//! whose first polygon has 4, and reads odd counts short);
//! run lists are kept canonical (no empty runs except a leading one), so unions of
//! non-canonical inputs may differ from pycocotools in their run lists, never in the pixels;
//! counts are validated (they must sum to `height * width`) instead of read out of bounds;
//! polygon coordinates must be finite and within [`polygon_margin`] of the image (the edge walk
//! costs memory in proportion to an edge's length, so a vertex at `1e20` would ask for gigabytes;
//! pycocotools overflows its `int` there).

use crate::data::coco::{RleCounts, Segmentation};

/// What can be wrong with a mask read from a file.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MaskError {
    #[error("RLE counts sum to {sum} but the mask has {height}x{width} = {expected} pixels")]
    CountsSum {
        sum: u64,
        height: u32,
        width: u32,
        expected: u64,
    },
    #[error("compressed RLE: byte {byte:?} at position {position} is outside '0'..'o'")]
    BadByte { byte: char, position: usize },
    #[error("compressed RLE: the string ends in the middle of a run")]
    Truncated,
    #[error("compressed RLE: run {index} decodes to {value}, outside 0..2^32")]
    RunOutOfRange { index: usize, value: i64 },
    #[error("polygon {index} has {len} numbers; a polygon needs an even count, at least 4")]
    BadPolygon { index: usize, len: usize },
    #[error("empty polygon list")]
    NoPolygons,
    #[error("mask size {height}x{width} is empty")]
    EmptySize { height: u32, width: u32 },
    #[error(
        "polygon {index}: coordinate {position} is {value}, not a finite number within \
         {margin} pixels of the {height}x{width} image"
    )]
    PolygonOutOfRange {
        index: usize,
        position: usize,
        value: f64,
        margin: f64,
        height: u32,
        width: u32,
    },
}

/// How far outside a `height x width` image a polygon vertex may lie: four image sizes, and at
/// least 1024 pixels. Real annotations stray a few pixels; this bounds the rasteriser's work.
pub fn polygon_margin(height: u32, width: u32) -> f64 {
    (4.0 * height.max(width) as f64).max(1024.0)
}

/// A run-length encoded binary mask (pycocotools' `RLE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rle {
    pub height: u32,
    pub width: u32,
    /// Alternating run lengths in column-major order, background first.
    pub counts: Vec<u32>,
}

/// Builds canonical run lists: merges neighbours of equal value, drops empty runs (except the
/// leading background run, which is 0 when the mask starts with foreground).
struct RunBuilder {
    counts: Vec<u32>,
    value: bool,
}

impl RunBuilder {
    fn new() -> Self {
        RunBuilder {
            counts: vec![0],
            value: false,
        }
    }

    fn push(&mut self, value: bool, len: u32) {
        if len == 0 {
            return;
        }
        if value != self.value {
            self.counts.push(0);
            self.value = value;
        }
        // The caller's runs sum to height * width, which fits u32 (checked on construction).
        *self.counts.last_mut().expect("never empty") += len;
    }

    fn finish(self, height: u32, width: u32) -> Rle {
        let mut counts = self.counts;
        if counts.len() == 1 && counts[0] == 0 && height as u64 * width as u64 > 0 {
            counts[0] = height * width;
        }
        Rle {
            height,
            width,
            counts,
        }
    }
}

/// Walks a run list run by run, skipping empty runs.
struct RunCursor<'a> {
    counts: &'a [u32],
    next: usize,
    left: u32,
    value: bool,
}

impl<'a> RunCursor<'a> {
    fn new(counts: &'a [u32]) -> Self {
        let mut c = RunCursor {
            counts,
            next: 0,
            left: 0,
            value: true, // toggled to background by the first advance
        };
        c.advance();
        c
    }

    /// Moves to the next non-empty run; `left == 0` afterwards means the end.
    fn advance(&mut self) {
        while self.left == 0 && self.next < self.counts.len() {
            self.left = self.counts[self.next];
            self.next += 1;
            self.value = !self.value;
        }
    }

    fn take(&mut self, n: u32) {
        self.left -= n;
        if self.left == 0 {
            self.advance();
        }
    }
}

impl Rle {
    fn pixels(height: u32, width: u32) -> u64 {
        height as u64 * width as u64
    }

    /// Encodes a row-major mask (`mask[y * width + x] != 0` is foreground).
    ///
    /// # Shapes
    /// `mask`: `[height * width]`, row-major.
    pub fn from_mask(mask: &[u8], height: u32, width: u32) -> Rle {
        let (h, w) = (height as usize, width as usize);
        assert_eq!(mask.len(), h * w, "mask length must be height * width");
        let mut runs = RunBuilder::new();
        for x in 0..w {
            for y in 0..h {
                runs.push(mask[y * w + x] != 0, 1);
            }
        }
        runs.finish(height, width)
    }

    /// Decodes to a row-major mask of 0/1.
    ///
    /// # Shapes
    /// returns `[height * width]`, row-major.
    pub fn to_mask(&self) -> Vec<u8> {
        let (h, w) = (self.height as usize, self.width as usize);
        let mut mask = vec![0u8; h * w];
        let mut pos = 0usize;
        for (i, &c) in self.counts.iter().enumerate() {
            if i % 2 == 1 {
                for p in pos..pos + c as usize {
                    let (x, y) = (p / h, p % h);
                    mask[y * w + x] = 1;
                }
            }
            pos += c as usize;
        }
        mask
    }

    /// Uncompressed RLE (a list of runs), checked to cover exactly `height * width` pixels.
    pub fn from_counts(counts: Vec<u32>, height: u32, width: u32) -> Result<Rle, MaskError> {
        let sum: u64 = counts.iter().map(|&c| c as u64).sum();
        let expected = Self::pixels(height, width);
        if sum != expected {
            return Err(MaskError::CountsSum {
                sum,
                height,
                width,
                expected,
            });
        }
        Ok(Rle {
            height,
            width,
            counts,
        })
    }

    /// Decodes COCO's compressed RLE string (`rleFrString`).
    pub fn from_compressed(s: &str, height: u32, width: u32) -> Result<Rle, MaskError> {
        let bytes = s.as_bytes();
        let mut counts: Vec<u32> = Vec::with_capacity(bytes.len());
        let mut p = 0;
        while p < bytes.len() {
            let mut x: i64 = 0;
            let mut k = 0u32;
            loop {
                let Some(&b) = bytes.get(p) else {
                    return Err(MaskError::Truncated);
                };
                if !(48..=111).contains(&b) {
                    return Err(MaskError::BadByte {
                        byte: b as char,
                        position: p,
                    });
                }
                let c = (b - 48) as i64;
                if k >= 12 {
                    // 12 groups of 5 bits already exceed any 32-bit run.
                    return Err(MaskError::RunOutOfRange {
                        index: counts.len(),
                        value: i64::MAX,
                    });
                }
                x |= (c & 0x1f) << (5 * k);
                p += 1;
                k += 1;
                if c & 0x20 == 0 {
                    if c & 0x10 != 0 {
                        x |= -1i64 << (5 * k);
                    }
                    break;
                }
            }
            if counts.len() > 2 {
                x += counts[counts.len() - 2] as i64;
            }
            let run = u32::try_from(x).map_err(|_| MaskError::RunOutOfRange {
                index: counts.len(),
                value: x,
            })?;
            counts.push(run);
        }
        Self::from_counts(counts, height, width)
    }

    /// Encodes as COCO's compressed RLE string (`rleToString`).
    pub fn to_compressed(&self) -> String {
        let mut s = String::with_capacity(self.counts.len() * 2);
        for (i, &c) in self.counts.iter().enumerate() {
            let mut x = c as i64;
            if i > 2 {
                x -= self.counts[i - 2] as i64;
            }
            loop {
                let mut c = (x & 0x1f) as u8;
                x >>= 5;
                let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    c |= 0x20;
                }
                s.push((c + 48) as char);
                if !more {
                    break;
                }
            }
        }
        s
    }

    /// Foreground pixel count (`rleArea`).
    pub fn area(&self) -> u64 {
        self.counts
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&c| c as u64)
            .sum()
    }

    /// Bounding box `[x, y, w, h]` of the foreground (`rleToBbox`); all zeros for an empty mask.
    pub fn bbox(&self) -> [f64; 4] {
        let h = self.height as u64;
        let (mut xs, mut ys, mut xe, mut ye) = (u64::MAX, u64::MAX, 0u64, 0u64);
        let mut start = 0u64;
        let mut any = false;
        for (j, &c) in self.counts.iter().enumerate() {
            let end = start + c as u64;
            if j % 2 == 1 && c > 0 {
                any = true;
                let (x0, y0) = (start / h, start % h);
                let (x1, y1) = ((end - 1) / h, (end - 1) % h);
                xs = xs.min(x0);
                xe = xe.max(x1);
                if x0 < x1 {
                    ys = 0;
                    ye = h - 1;
                } else {
                    ys = ys.min(y0);
                    ye = ye.max(y1);
                }
            }
            start = end;
        }
        if !any {
            return [0.0; 4];
        }
        [
            xs as f64,
            ys as f64,
            (xe - xs + 1) as f64,
            (ye - ys + 1) as f64,
        ]
    }

    /// Rasterises one polygon `[x1, y1, x2, y2, ...]` exactly as pycocotools' `rleFrPoly`:
    /// vertices are scaled by 5 and rounded, the edges walked pixel by pixel, and a pixel is
    /// inside when its centre is below a crossing of the upsampled boundary in its column.
    ///
    /// Coordinates are first clamped to [`polygon_margin`] around the image (NaN to 0), which
    /// bounds the work; [`Rle::from_segmentation`] refuses polygons that would be clamped. For an
    /// axis-aligned box (as [`Rle::from_bbox`]) the clamp never changes a pixel.
    pub fn from_polygon(xy: &[f64], height: u32, width: u32) -> Rle {
        const SCALE: f64 = 5.0;
        let k = xy.len() / 2;
        let (h, w) = (height as i64, width as i64);
        if k == 0 {
            return RunBuilder::new().finish(height, width);
        }
        let margin = polygon_margin(height, width);
        let clamp = |v: f64, size: u32| {
            if v.is_nan() {
                0.0
            } else {
                v.clamp(-margin, size as f64 + margin)
            }
        };
        // Vertices on the 5x grid; `as i32` truncates toward zero like C's `(int)` cast.
        let px: Vec<i32> = (0..=k)
            .map(|j| (SCALE * clamp(xy[(j % k) * 2], width) + 0.5) as i32)
            .collect();
        let py: Vec<i32> = (0..=k)
            .map(|j| (SCALE * clamp(xy[(j % k) * 2 + 1], height) + 0.5) as i32)
            .collect();
        // Dense boundary points along every edge.
        let mut u: Vec<i32> = Vec::new();
        let mut v: Vec<i32> = Vec::new();
        for j in 0..k {
            let (mut xs, mut xe, mut ys, mut ye) = (px[j], px[j + 1], py[j], py[j + 1]);
            let dx = (xe - xs).abs();
            let dy = (ys - ye).abs();
            let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
            if flip {
                std::mem::swap(&mut xs, &mut xe);
                std::mem::swap(&mut ys, &mut ye);
            }
            if dx >= dy {
                let s = if dx == 0 {
                    0.0
                } else {
                    (ye - ys) as f64 / dx as f64
                };
                for d in 0..=dx {
                    let t = if flip { dx - d } else { d };
                    u.push(t + xs);
                    v.push((ys as f64 + s * t as f64 + 0.5) as i32);
                }
            } else {
                let s = (xe - xs) as f64 / dy as f64;
                for d in 0..=dy {
                    let t = if flip { dy - d } else { d };
                    v.push(t + ys);
                    u.push((xs as f64 + s * t as f64 + 0.5) as i32);
                }
            }
        }
        // Where the boundary crosses a column centre: the first pixel row below it.
        let mut toggles: Vec<u64> = Vec::new();
        for j in 1..u.len() {
            if u[j] == u[j - 1] {
                continue;
            }
            let col = if u[j] < u[j - 1] { u[j] } else { u[j] - 1 };
            let xd = (col as f64 + 0.5) / SCALE - 0.5;
            if xd.floor() != xd || xd < 0.0 || xd > (w - 1) as f64 {
                continue;
            }
            let row = v[j].min(v[j - 1]);
            let yd = ((row as f64 + 0.5) / SCALE - 0.5)
                .clamp(0.0, h as f64)
                .ceil();
            toggles.push((xd as i64 * h + yd as i64) as u64);
        }
        toggles.push((h * w) as u64);
        toggles.sort_unstable();
        // Toggle positions -> runs; two toggles at one position cancel.
        let mut runs = RunBuilder::new();
        let mut value = false;
        let mut prev = 0u64;
        for t in toggles {
            runs.push(value, (t - prev) as u32);
            prev = t;
            value = !value;
        }
        runs.finish(height, width)
    }

    /// A box `[x, y, w, h]` rasterised as its polygon (`rleFrBbox`).
    pub fn from_bbox(bb: [f64; 4], height: u32, width: u32) -> Rle {
        let (xs, ys) = (bb[0], bb[1]);
        let (xe, ye) = (xs + bb[2], ys + bb[3]);
        Self::from_polygon(&[xs, ys, xs, ye, xe, ye, xe, ys], height, width)
    }

    /// The mask of a COCO `segmentation` (`COCO.annToRLE`): polygons are rasterised at
    /// `height x width` and merged; RLEs keep their own `size` (the caller compares it with the
    /// image's).
    pub fn from_segmentation(
        seg: &Segmentation,
        height: u32,
        width: u32,
    ) -> Result<Rle, MaskError> {
        match seg {
            Segmentation::Polygons(polys) => {
                if polys.is_empty() {
                    return Err(MaskError::NoPolygons);
                }
                if height == 0 || width == 0 {
                    return Err(MaskError::EmptySize { height, width });
                }
                let mut parts = Vec::with_capacity(polys.len());
                for (index, p) in polys.iter().enumerate() {
                    if p.len() % 2 != 0 || p.len() < 4 {
                        return Err(MaskError::BadPolygon {
                            index,
                            len: p.len(),
                        });
                    }
                    let margin = polygon_margin(height, width);
                    let outside = p.iter().enumerate().find(|&(position, &v)| {
                        let size = if position % 2 == 0 { width } else { height };
                        !(v >= -margin && v <= size as f64 + margin)
                    });
                    if let Some((position, &value)) = outside {
                        return Err(MaskError::PolygonOutOfRange {
                            index,
                            position,
                            value,
                            margin,
                            height,
                            width,
                        });
                    }
                    parts.push(Self::from_polygon(p, height, width));
                }
                Ok(Self::union(&parts))
            }
            Segmentation::Rle { size, counts } => {
                let (h, w) = (size[0], size[1]);
                match counts {
                    RleCounts::Uncompressed(c) => Self::from_counts(c.clone(), h, w),
                    RleCounts::Compressed(s) => Self::from_compressed(s, h, w),
                }
            }
        }
    }

    /// Union of masks of one size (`rleMerge` with `intersect = 0`).
    pub fn union(masks: &[Rle]) -> Rle {
        Self::merge(masks, false)
    }

    /// Intersection of masks of one size (`rleMerge` with `intersect = 1`).
    pub fn intersection(masks: &[Rle]) -> Rle {
        Self::merge(masks, true)
    }

    fn merge(masks: &[Rle], intersect: bool) -> Rle {
        let Some(first) = masks.first() else {
            return Rle {
                height: 0,
                width: 0,
                counts: Vec::new(),
            };
        };
        let mut acc = first.clone();
        for m in &masks[1..] {
            assert_eq!(
                (m.height, m.width),
                (acc.height, acc.width),
                "merged masks must have one size"
            );
            acc = combine(&acc, m, intersect);
        }
        acc
    }

    /// Intersection over union with a ground-truth mask (`rleIou`). With `crowd`, the union
    /// is this (detection) mask's area. 0 when they do not intersect.
    pub fn iou(&self, gt: &Rle, crowd: bool) -> f64 {
        let (inter, union) = overlap(self, gt);
        if inter == 0 {
            return 0.0;
        }
        let denom = if crowd { self.area() } else { union };
        inter as f64 / denom as f64
    }
}

/// `(intersection, union)` pixel counts of two masks of one size.
fn overlap(a: &Rle, b: &Rle) -> (u64, u64) {
    let (mut ca, mut cb) = (RunCursor::new(&a.counts), RunCursor::new(&b.counts));
    let (mut inter, mut union) = (0u64, 0u64);
    while ca.left > 0 && cb.left > 0 {
        let n = ca.left.min(cb.left);
        if ca.value || cb.value {
            union += n as u64;
            if ca.value && cb.value {
                inter += n as u64;
            }
        }
        ca.take(n);
        cb.take(n);
    }
    (inter, union)
}

fn combine(a: &Rle, b: &Rle, intersect: bool) -> Rle {
    let (mut ca, mut cb) = (RunCursor::new(&a.counts), RunCursor::new(&b.counts));
    let mut runs = RunBuilder::new();
    while ca.left > 0 && cb.left > 0 {
        let n = ca.left.min(cb.left);
        let v = if intersect {
            ca.value && cb.value
        } else {
            ca.value || cb.value
        };
        runs.push(v, n);
        ca.take(n);
        cb.take(n);
    }
    runs.finish(a.height, a.width)
}

/// Box intersection over union, boxes `[x, y, w, h]` (`bbIou`): 0 without positive overlap;
/// with `crowd`, the union is the detection's area.
pub fn box_iou(dt: &[f64; 4], gt: &[f64; 4], crowd: bool) -> f64 {
    let w = (dt[2] + dt[0]).min(gt[2] + gt[0]) - dt[0].max(gt[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (dt[3] + dt[1]).min(gt[3] + gt[1]) - dt[1].max(gt[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let da = dt[2] * dt[3];
    let u = if crowd { da } else { da + gt[2] * gt[3] - i };
    i / u
}

#[cfg(test)]
mod tests;
