//! View geometry: where each augmented view came from, and the correspondences dense
//! self-supervised methods derive from it.
//!
//! A view is an axis-aligned crop of the original image ([`CropBox`], float pixel coordinates,
//! possibly reaching outside the image for letterboxed views), resized to `out_size` and
//! possibly mirrored left-right. That is an affine map per axis, so composing crops, flips and
//! resizes stays in this form ([`ViewGeometry::compose`]).
//!
//! What each method takes from here:
//! - PixPro: [`ViewGeometry::normalised_coords`] (its `coord` tensor: x0/W, y0/H, x1/W, y1/H
//!   with x swapped on flip) and [`pixpro_positive_mask`] (cells closer than
//!   `0.7 x` the larger cell diagonal).
//! - DenseSiam, LC-loss: [`overlap`] (the shared region in each view's pixels) and
//!   [`grid_sample_grid`] (resample view B's feature map at view A's cell centres with ONNX
//!   `GridSample`, `align_corners = 0`).
//! - Any method: [`cell_correspondence`] (A's cells in B's feature-grid coordinates plus a
//!   validity mask) and [`ViewGeometry::cell_centres`].
//!
//! Our choices: a feature cell `(i, j)` of a map with stride `s` covers view pixels
//! `[j s, (j+1) s) x [i s, (i+1) s)`, so its centre is `((j + 0.5) s, (i + 0.5) s)`; PixPro's
//! code places bin centres the same way (`(k + 0.5)` bins of width `crop / grid`), which is
//! identical whenever `grid * stride = out_size` (224 px at stride 32). Distances for PixPro's
//! mask are in original-image pixels by default; [`DistanceFrame::NormalisedImage`] measures
//! them as PixPro's code does (x / W, y / H), which differs only for non-square images.

use ndarray::{Array2, Array3};

/// An axis-aligned box `[x0, y0, x1, y1]` in original-image pixel coordinates (floats; pixel
/// `(i, j)` covers `[j, j+1) x [i, i+1)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

impl CropBox {
    pub fn new(x0: f32, y0: f32, x1: f32, y1: f32) -> Self {
        CropBox { x0, y0, x1, y1 }
    }

    /// The whole of a `width x height` image.
    pub fn full(width: u32, height: u32) -> Self {
        CropBox::new(0.0, 0.0, width as f32, height as f32)
    }

    pub fn width(&self) -> f32 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> f32 {
        self.y1 - self.y0
    }

    pub fn area(&self) -> f32 {
        self.width().max(0.0) * self.height().max(0.0)
    }

    /// The common part of two boxes, `None` when it has no area.
    pub fn intersect(&self, other: &CropBox) -> Option<CropBox> {
        let b = CropBox::new(
            self.x0.max(other.x0),
            self.y0.max(other.y0),
            self.x1.min(other.x1),
            self.y1.min(other.y1),
        );
        (b.x1 > b.x0 && b.y1 > b.y0).then_some(b)
    }

    /// Whether the point lies inside (half-open: `x0 <= x < x1`).
    pub fn contains(&self, [x, y]: [f32; 2]) -> bool {
        x >= self.x0 && x < self.x1 && y >= self.y0 && y < self.y1
    }

    /// `[x0, y0, x1, y1]`.
    pub fn to_array(&self) -> [f32; 4] {
        [self.x0, self.y0, self.x1, self.y1]
    }
}

/// Where a view came from: `crop` of the original `image_size` image, resized to `out_size`
/// (width, height) and mirrored left-right when `flipped`.
///
/// View pixel `(u, v)` (continuous) shows original point
/// `x = x0 + u * crop_w / out_w` (or `x1 - u * crop_w / out_w` when flipped),
/// `y = y0 + v * crop_h / out_h`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewGeometry {
    pub crop: CropBox,
    pub flipped: bool,
    pub out_size: (u32, u32),
    pub image_size: (u32, u32),
}

impl ViewGeometry {
    /// The untouched image: full crop, no flip, same size.
    pub fn identity(image_size: (u32, u32)) -> Self {
        ViewGeometry {
            crop: CropBox::full(image_size.0, image_size.1),
            flipped: false,
            out_size: image_size,
            image_size,
        }
    }

    /// Original pixels per view pixel along x and y.
    pub fn scale(&self) -> (f64, f64) {
        (
            self.crop.width() as f64 / self.out_size.0 as f64,
            self.crop.height() as f64 / self.out_size.1 as f64,
        )
    }

    fn original_point(&self, u: f64, v: f64) -> (f64, f64) {
        let (sx, sy) = self.scale();
        let x = if self.flipped {
            self.crop.x1 as f64 - u * sx
        } else {
            self.crop.x0 as f64 + u * sx
        };
        (x, self.crop.y0 as f64 + v * sy)
    }

    fn view_point(&self, x: f64, y: f64) -> (f64, f64) {
        let (sx, sy) = self.scale();
        let u = if self.flipped {
            (self.crop.x1 as f64 - x) / sx
        } else {
            (x - self.crop.x0 as f64) / sx
        };
        (u, (y - self.crop.y0 as f64) / sy)
    }

    /// A point in this view's pixel coordinates -> original-image coordinates.
    pub fn to_original(self, [u, v]: [f32; 2]) -> [f32; 2] {
        let (x, y) = self.original_point(u as f64, v as f64);
        [x as f32, y as f32]
    }

    /// A point in original-image coordinates -> this view's pixel coordinates (may fall
    /// outside `[0, out_w) x [0, out_h)` when the point is outside the crop).
    pub fn to_view(self, [x, y]: [f32; 2]) -> [f32; 2] {
        let (u, v) = self.view_point(x as f64, y as f64);
        [u as f32, v as f32]
    }

    /// A box in view pixels -> original coordinates (corners reordered after a flip).
    pub fn box_to_original(&self, b: &CropBox) -> CropBox {
        let [ax, ay] = self.to_original([b.x0, b.y0]);
        let [bx, by] = self.to_original([b.x1, b.y1]);
        CropBox::new(ax.min(bx), ay.min(by), ax.max(bx), ay.max(by))
    }

    /// A box in original coordinates -> view pixels (corners reordered after a flip).
    pub fn box_to_view(&self, b: &CropBox) -> CropBox {
        let [ax, ay] = self.to_view([b.x0, b.y0]);
        let [bx, by] = self.to_view([b.x1, b.y1]);
        CropBox::new(ax.min(bx), ay.min(by), ax.max(bx), ay.max(by))
    }

    /// The same view mirrored left-right.
    pub fn flip(&self) -> ViewGeometry {
        ViewGeometry {
            flipped: !self.flipped,
            ..*self
        }
    }

    /// The geometry of a view taken *of this view*: `inner.crop` is in this view's pixels,
    /// `inner.image_size` should equal `self.out_size`. The result maps the inner view's pixels
    /// straight to the original image.
    pub fn compose(&self, inner: &ViewGeometry) -> ViewGeometry {
        ViewGeometry {
            crop: self.box_to_original(&inner.crop),
            flipped: self.flipped ^ inner.flipped,
            out_size: inner.out_size,
            image_size: self.image_size,
        }
    }

    /// PixPro's `coord`: `[x0/W, y0/H, x1/W, y1/H]` of the crop, x0 and x1 swapped when the
    /// view is flipped (so bin centres interpolate from `x0` to `x1` in view order).
    pub fn normalised_coords(&self) -> [f32; 4] {
        let (w, h) = (self.image_size.0 as f32, self.image_size.1 as f32);
        let (x0, x1) = if self.flipped {
            (self.crop.x1, self.crop.x0)
        } else {
            (self.crop.x0, self.crop.x1)
        };
        [x0 / w, self.crop.y0 / h, x1 / w, self.crop.y1 / h]
    }

    /// Centres of the cells of a feature map of this view, in original-image coordinates.
    ///
    /// # Shapes
    /// returns `[grid.height, grid.width, 2]`, last axis `(x, y)`.
    pub fn cell_centres(&self, grid: FeatureGrid) -> Array3<f32> {
        Array3::from_shape_fn((grid.height, grid.width, 2), |(i, j, k)| {
            let [u, v] = grid.cell_centre(i, j);
            let (x, y) = self.original_point(u as f64, v as f64);
            if k == 0 {
                x as f32
            } else {
                y as f32
            }
        })
    }

    /// The diagonal of one feature cell, measured in `frame`.
    pub fn cell_diagonal(&self, grid: FeatureGrid, frame: DistanceFrame) -> f64 {
        let (sx, sy) = self.scale();
        let (fx, fy) = frame.factors(self.image_size);
        let (w, h) = (grid.stride as f64 * sx * fx, grid.stride as f64 * sy * fy);
        (w * w + h * h).sqrt()
    }
}

/// A feature map laid over a view: `height x width` cells of `stride` view pixels each.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureGrid {
    pub height: usize,
    pub width: usize,
    pub stride: f32,
}

impl FeatureGrid {
    pub fn new(height: usize, width: usize, stride: f32) -> Self {
        FeatureGrid {
            height,
            width,
            stride,
        }
    }

    /// The grid a strided backbone produces on an `out_size` view: `ceil(out / stride)` cells
    /// per axis (what stride-2 convolutions with padding give), e.g. 7x7 for 224 px, stride 32.
    pub fn of_view(out_size: (u32, u32), stride: u32) -> Self {
        let s = stride.max(1);
        FeatureGrid::new(
            out_size.1.div_ceil(s) as usize,
            out_size.0.div_ceil(s) as usize,
            s as f32,
        )
    }

    /// Centre of cell `(i, j)` in view pixels, `(x, y)`.
    pub fn cell_centre(&self, i: usize, j: usize) -> [f32; 2] {
        [
            (j as f32 + 0.5) * self.stride,
            (i as f32 + 0.5) * self.stride,
        ]
    }

    pub fn len(&self) -> usize {
        self.height * self.width
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The coordinates distances between cell centres are measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DistanceFrame {
    /// Original-image pixels (isotropic).
    #[default]
    OriginalPixels,
    /// `x / W`, `y / H` of the original image, as PixPro's code measures them.
    NormalisedImage,
}

impl DistanceFrame {
    fn factors(self, image_size: (u32, u32)) -> (f64, f64) {
        match self {
            DistanceFrame::OriginalPixels => (1.0, 1.0),
            DistanceFrame::NormalisedImage => {
                (1.0 / image_size.0 as f64, 1.0 / image_size.1 as f64)
            }
        }
    }
}

/// Cells of view A located in view B.
#[derive(Debug, Clone, PartialEq)]
pub struct CellCorrespondence {
    /// `[Ha, Wa, 2]`: the centre of A's cell `(i, j)` in B's feature-grid coordinates `(x, y)`,
    /// continuous, B's cell `(k, l)` covering `[l, l+1) x [k, k+1)` (its centre at `l + 0.5`).
    pub points: Array3<f32>,
    /// `[Ha, Wa]`: whether that centre lies inside B's crop (B saw that part of the image).
    pub valid: Array2<bool>,
}

/// A's feature cells mapped through the original image into B's feature grid.
///
/// # Shapes
/// `points`: `[grid_a.height, grid_a.width, 2]`, `valid`: `[grid_a.height, grid_a.width]`.
pub fn cell_correspondence(
    a: &ViewGeometry,
    grid_a: FeatureGrid,
    b: &ViewGeometry,
    grid_b: FeatureGrid,
) -> CellCorrespondence {
    let (ha, wa) = (grid_a.height, grid_a.width);
    let mut points = Array3::zeros((ha, wa, 2));
    let mut valid = Array2::from_elem((ha, wa), false);
    let sb = grid_b.stride as f64;
    for i in 0..ha {
        for j in 0..wa {
            let [u, v] = grid_a.cell_centre(i, j);
            let (x, y) = a.original_point(u as f64, v as f64);
            let (ub, vb) = b.view_point(x, y);
            points[[i, j, 0]] = (ub / sb) as f32;
            points[[i, j, 1]] = (vb / sb) as f32;
            valid[[i, j]] =
                ub >= 0.0 && ub < b.out_size.0 as f64 && vb >= 0.0 && vb < b.out_size.1 as f64;
        }
    }
    CellCorrespondence { points, valid }
}

/// The sampling grid for ONNX `GridSample` (`align_corners = 0`, `padding_mode = zeros`) that
/// resamples view B's feature map at the centres of view A's cells.
///
/// With `align_corners = 0`, -1 and 1 are the outer *edges* of B's map, so a point at
/// feature-grid coordinate `u` (cell `l` spanning `[l, l+1)`) becomes `2 u / W_b - 1`. Points
/// outside B's view fall outside `[-1, 1]` (sampled as zeros); `valid` marks the others.
///
/// # Shapes
/// returns (`[Ha, Wa, 2]` with `(x, y)` last, `[Ha, Wa]`); stack to `[N, Ha, Wa, 2]` for a batch.
pub fn grid_sample_grid(
    a: &ViewGeometry,
    grid_a: FeatureGrid,
    b: &ViewGeometry,
    grid_b: FeatureGrid,
) -> (Array3<f32>, Array2<bool>) {
    let c = cell_correspondence(a, grid_a, b, grid_b);
    let mut grid = c.points;
    let (wb, hb) = (grid_b.width as f32, grid_b.height as f32);
    for mut p in grid.rows_mut() {
        p[0] = 2.0 * p[0] / wb - 1.0;
        p[1] = 2.0 * p[1] / hb - 1.0;
    }
    (grid, c.valid)
}

/// The region two views share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overlap {
    /// In original-image coordinates.
    pub original: CropBox,
    /// In view A's pixels (ordered corners, also after a flip).
    pub in_a: CropBox,
    /// In view B's pixels.
    pub in_b: CropBox,
}

/// The overlap of two views of the same image, `None` when their crops don't intersect.
pub fn overlap(a: &ViewGeometry, b: &ViewGeometry) -> Option<Overlap> {
    let original = a.crop.intersect(&b.crop)?;
    Some(Overlap {
        original,
        in_a: a.box_to_view(&original),
        in_b: b.box_to_view(&original),
    })
}

/// PixPro's positive pairs: A's cell `i` and B's cell `j` are positive when their centres,
/// in `frame` coordinates of the original image, are closer than
/// `threshold * max(diagonal of A's cell, diagonal of B's cell)` (PixPro: threshold 0.7).
///
/// # Shapes
/// returns `[Ha * Wa, Hb * Wb]`, cells in row-major order.
pub fn pixpro_positive_mask(
    a: &ViewGeometry,
    grid_a: FeatureGrid,
    b: &ViewGeometry,
    grid_b: FeatureGrid,
    threshold: f32,
    frame: DistanceFrame,
) -> Array2<bool> {
    let diag = a
        .cell_diagonal(grid_a, frame)
        .max(b.cell_diagonal(grid_b, frame));
    let limit = threshold as f64 * diag;
    let limit2 = limit * limit;
    let centres = |g: &ViewGeometry, grid: FeatureGrid| -> Vec<(f64, f64)> {
        let (fx, fy) = frame.factors(g.image_size);
        let mut out = Vec::with_capacity(grid.len());
        for i in 0..grid.height {
            for j in 0..grid.width {
                let [u, v] = grid.cell_centre(i, j);
                let (x, y) = g.original_point(u as f64, v as f64);
                out.push((x * fx, y * fy));
            }
        }
        out
    };
    let ca = centres(a, grid_a);
    let cb = centres(b, grid_b);
    let mut mask = Array2::from_elem((ca.len(), cb.len()), false);
    for (i, &(xa, ya)) in ca.iter().enumerate() {
        for (j, &(xb, yb)) in cb.iter().enumerate() {
            let (dx, dy) = (xa - xb, ya - yb);
            mask[[i, j]] = dx * dx + dy * dy < limit2;
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geometry() -> impl Strategy<Value = ViewGeometry> {
        (
            8u32..2000,
            8u32..2000,
            0.0f32..0.9,
            0.0f32..0.9,
            0.05f32..1.0,
            0.05f32..1.0,
            any::<bool>(),
            1u32..600,
            1u32..600,
        )
            .prop_map(|(w, h, fx0, fy0, fw, fh, flipped, ow, oh)| {
                let x0 = fx0 * w as f32;
                let y0 = fy0 * h as f32;
                let x1 = (x0 + fw * w as f32).min(w as f32).max(x0 + 1.0);
                let y1 = (y0 + fh * h as f32).min(h as f32).max(y0 + 1.0);
                ViewGeometry {
                    crop: CropBox::new(x0, y0, x1, y1),
                    flipped,
                    out_size: (ow, oh),
                    image_size: (w, h),
                }
            })
    }

    fn close(a: [f32; 2], b: [f32; 2], tol: f32) -> bool {
        (a[0] - b[0]).abs() <= tol && (a[1] - b[1]).abs() <= tol
    }

    proptest! {
        #[test]
        fn view_original_view_round_trip(g in geometry(), fu in 0.0f32..1.0, fv in 0.0f32..1.0) {
            let p = [fu * g.out_size.0 as f32, fv * g.out_size.1 as f32];
            let back = g.to_view(g.to_original(p));
            // f32 storage of the intermediate point: relative error ~1e-7 of coordinates < 2000.
            prop_assert!(close(p, back, 1e-3 * (1.0 + g.out_size.0.max(g.out_size.1) as f32 / 100.0)),
                "{p:?} -> {back:?}");
        }

        #[test]
        fn original_view_original_round_trip(g in geometry(), fx in 0.0f32..1.0, fy in 0.0f32..1.0) {
            let p = [g.crop.x0 + fx * g.crop.width(), g.crop.y0 + fy * g.crop.height()];
            let back = g.to_original(g.to_view(p));
            prop_assert!(close(p, back, 2e-3), "{p:?} -> {back:?}");
        }

        #[test]
        fn flip_mirrors_points(g in geometry(), fu in 0.0f32..1.0, fv in 0.0f32..1.0) {
            let p = [fu * g.out_size.0 as f32, fv * g.out_size.1 as f32];
            let mirrored = [g.out_size.0 as f32 - p[0], p[1]];
            prop_assert!(close(g.to_original(p), g.flip().to_original(mirrored), 2e-3));
        }

        #[test]
        fn compose_equals_mapping_twice(outer in geometry(), fx0 in 0.0f32..0.8, fy0 in 0.0f32..0.8,
                                        fw in 0.1f32..0.2, fh in 0.1f32..0.2, flipped in any::<bool>(),
                                        ow in 1u32..300, oh in 1u32..300, fu in 0.0f32..1.0, fv in 0.0f32..1.0) {
            let (w, h) = (outer.out_size.0 as f32, outer.out_size.1 as f32);
            let inner = ViewGeometry {
                crop: CropBox::new(fx0 * w, fy0 * h, (fx0 + fw) * w, (fy0 + fh) * h),
                flipped,
                out_size: (ow, oh),
                image_size: outer.out_size,
            };
            let composed = outer.compose(&inner);
            let p = [fu * ow as f32, fv * oh as f32];
            let twice = outer.to_original(inner.to_original(p));
            prop_assert!(close(composed.to_original(p), twice, 2e-2), "{:?} vs {twice:?}", composed.to_original(p));
        }

        #[test]
        fn overlap_maps_to_the_same_original_region(a in geometry(), fx0 in 0.0f32..0.9, fy0 in 0.0f32..0.9,
                                                    fw in 0.05f32..1.0, fh in 0.05f32..1.0, flipped in any::<bool>()) {
            let (w, h) = (a.image_size.0 as f32, a.image_size.1 as f32);
            let b = ViewGeometry {
                crop: CropBox::new(fx0 * w, fy0 * h, (fx0 * w + fw * w).min(w), (fy0 * h + fh * h).min(h)),
                flipped,
                out_size: (64, 48),
                image_size: a.image_size,
            };
            match overlap(&a, &b) {
                None => prop_assert!(a.crop.intersect(&b.crop).is_none()),
                Some(o) => {
                    let from_a = a.box_to_original(&o.in_a);
                    let from_b = b.box_to_original(&o.in_b);
                    for (x, y) in [(from_a, o.original), (from_b, o.original)] {
                        prop_assert!((x.x0 - y.x0).abs() < 0.05 && (x.x1 - y.x1).abs() < 0.05
                            && (x.y0 - y.y0).abs() < 0.05 && (x.y1 - y.y1).abs() < 0.05, "{x:?} vs {y:?}");
                    }
                    prop_assert!(o.in_a.x0 >= -0.01 && o.in_a.x1 <= a.out_size.0 as f32 + 0.01);
                    prop_assert!(o.in_b.y0 >= -0.01 && o.in_b.y1 <= b.out_size.1 as f32 + 0.01);
                }
            }
        }
    }

    /// PixPro's mask computed the way its code does: bin centres interpolated over the
    /// normalised `coord` box (x swapped on flip), distances over the larger bin diagonal,
    /// one explicit loop per pair.
    fn pixpro_mask_reference(
        a: &ViewGeometry,
        ga: FeatureGrid,
        b: &ViewGeometry,
        gb: FeatureGrid,
        threshold: f64,
        frame: DistanceFrame,
    ) -> Array2<bool> {
        let centres_and_diag = |g: &ViewGeometry, grid: FeatureGrid| {
            let (fx, fy) = match frame {
                DistanceFrame::OriginalPixels => (g.image_size.0 as f64, g.image_size.1 as f64),
                DistanceFrame::NormalisedImage => (1.0, 1.0),
            };
            let c = g.normalised_coords().map(|v| v as f64);
            let bin_w = (c[2] - c[0]) / grid.width as f64;
            let bin_h = (c[3] - c[1]) / grid.height as f64;
            let mut centres = vec![];
            for i in 0..grid.height {
                for j in 0..grid.width {
                    let x = c[0] + (j as f64 + 0.5) * bin_w;
                    let y = c[1] + (i as f64 + 0.5) * bin_h;
                    centres.push((x * fx, y * fy));
                }
            }
            let diag = ((bin_w * fx).powi(2) + (bin_h * fy).powi(2)).sqrt();
            (centres, diag)
        };
        let (ca, da) = centres_and_diag(a, ga);
        let (cb, db) = centres_and_diag(b, gb);
        let diag = da.max(db);
        let mut m = Array2::from_elem((ca.len(), cb.len()), false);
        for (i, p) in ca.iter().enumerate() {
            for (j, q) in cb.iter().enumerate() {
                let d = ((p.0 - q.0).powi(2) + (p.1 - q.1).powi(2)).sqrt() / diag;
                m[[i, j]] = d < threshold;
            }
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn pixpro_mask_matches_brute_force_reference(a in geometry(), b_crop in geometry(),
                                                     frame_norm in any::<bool>()) {
            // Two views of one image: give B A's image, keep B's relative crop and flip.
            let (w, h) = (a.image_size.0 as f32, a.image_size.1 as f32);
            let (bw, bh) = (b_crop.image_size.0 as f32, b_crop.image_size.1 as f32);
            let b = ViewGeometry {
                crop: CropBox::new(b_crop.crop.x0 / bw * w, b_crop.crop.y0 / bh * h,
                                   b_crop.crop.x1 / bw * w, b_crop.crop.y1 / bh * h),
                flipped: b_crop.flipped,
                out_size: (224, 224),
                image_size: a.image_size,
            };
            let a = ViewGeometry { out_size: (224, 224), ..a };
            let frame = if frame_norm { DistanceFrame::NormalisedImage } else { DistanceFrame::OriginalPixels };
            let g = FeatureGrid::of_view((224, 224), 32);
            let fast = pixpro_positive_mask(&a, g, &b, g, 0.7, frame);
            let reference = pixpro_mask_reference(&a, g, &b, g, 0.7, frame);
            // Pairs within float rounding of the threshold may legitimately differ.
            let disagree = fast.iter().zip(reference.iter()).filter(|(x, y)| x != y).count();
            prop_assert!(disagree <= 1, "{disagree} of {} pairs differ", fast.len());
        }
    }

    #[test]
    fn pixpro_mask_identical_views_is_the_diagonal_plus_nothing_far() {
        let a = ViewGeometry {
            crop: CropBox::new(10.0, 20.0, 234.0, 244.0),
            flipped: false,
            out_size: (224, 224),
            image_size: (300, 300),
        };
        let g = FeatureGrid::of_view((224, 224), 32);
        let m = pixpro_positive_mask(&a, g, &a, g, 0.7, DistanceFrame::OriginalPixels);
        // Neighbouring cells are 32 px apart, 0.7 * diag = 0.7 * 45.25 = 31.7: only i == j.
        assert_eq!(m, Array2::from_shape_fn((49, 49), |(i, j)| i == j));
        // The flipped view of the same crop pairs cell (i, j) with (i, 6 - j).
        let m = pixpro_positive_mask(&a, g, &a.flip(), g, 0.7, DistanceFrame::OriginalPixels);
        assert_eq!(
            m,
            Array2::from_shape_fn((49, 49), |(p, q)| p / 7 == q / 7 && p % 7 == 6 - q % 7)
        );
    }

    #[test]
    fn cell_correspondence_of_a_flipped_half_crop() {
        // A: the whole 64x64 image at 64 px. B: its right half, flipped, at 64 px.
        let a = ViewGeometry::identity((64, 64));
        let b = ViewGeometry {
            crop: CropBox::new(32.0, 0.0, 64.0, 64.0),
            flipped: true,
            out_size: (64, 64),
            image_size: (64, 64),
        };
        let ga = FeatureGrid::of_view((64, 64), 16); // 4x4, centres at 8, 24, 40, 56
        let gb = FeatureGrid::of_view((64, 64), 16);
        let c = cell_correspondence(&a, ga, &b, gb);
        for j in 0..4 {
            assert_eq!(c.valid[[0, j]], j >= 2, "column {j}");
        }
        // A's centre x = 40 -> B's view u = (64 - 40) * 2 = 48 -> B's cell coordinate 3.0.
        assert!((c.points[[0, 2, 0]] - 3.0).abs() < 1e-6);
        assert!((c.points[[0, 3, 0]] - 1.0).abs() < 1e-6);
        assert!((c.points[[1, 3, 1]] - 1.5).abs() < 1e-6);
        let (grid, valid) = grid_sample_grid(&a, ga, &b, gb);
        assert_eq!(valid, c.valid);
        // cell coordinate 3.0 of a 4-wide map -> 2 * 3 / 4 - 1 = 0.5; 1.5 -> -0.25.
        assert!((grid[[0, 2, 0]] - 0.5).abs() < 1e-6);
        assert!((grid[[1, 3, 1]] + 0.25).abs() < 1e-6);
        // Invalid cells land outside [-1, 1].
        assert!(grid[[0, 0, 0]] > 1.0);
    }

    #[test]
    fn overlap_of_disjoint_and_nested_views() {
        let a = ViewGeometry {
            crop: CropBox::new(0.0, 0.0, 50.0, 50.0),
            flipped: false,
            out_size: (100, 100),
            image_size: (200, 100),
        };
        let far = ViewGeometry {
            crop: CropBox::new(60.0, 0.0, 100.0, 50.0),
            ..a
        };
        assert!(overlap(&a, &far).is_none());
        let b = ViewGeometry {
            crop: CropBox::new(25.0, 0.0, 75.0, 50.0),
            flipped: true,
            ..a
        };
        let o = overlap(&a, &b).unwrap();
        assert_eq!(o.original, CropBox::new(25.0, 0.0, 50.0, 50.0));
        assert_eq!(o.in_a, CropBox::new(50.0, 0.0, 100.0, 100.0));
        // B is flipped: original x 25..50 is the right half of B's view.
        assert_eq!(o.in_b, CropBox::new(50.0, 0.0, 100.0, 100.0));
    }

    #[test]
    fn normalised_coords_swap_x_on_flip() {
        let g = ViewGeometry {
            crop: CropBox::new(10.0, 20.0, 60.0, 70.0),
            flipped: false,
            out_size: (10, 10),
            image_size: (100, 200),
        };
        assert_eq!(g.normalised_coords(), [0.1, 0.1, 0.6, 0.35]);
        assert_eq!(g.flip().normalised_coords(), [0.6, 0.1, 0.1, 0.35]);
    }
}
