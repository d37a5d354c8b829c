//! Efficient graph-based image segmentation (Felzenszwalb & Huttenlocher, IJCV 2004).
//!
//! The image is smoothed with a Gaussian, each pixel becomes a node of an 8-neighbour graph
//! whose edge weights are colour distances, and edges are visited by increasing weight: two
//! components merge when the edge is no heavier than both of their thresholds
//! `Int(C) + k / |C|`, where `Int(C)` is the heaviest edge of the component's spanning tree
//! (the merging edge, since edges come sorted). A second pass over the sorted edges merges
//! every component smaller than `min_size` into its neighbour across the lightest edge.
//!
//! Choices (ours, documented): the edge weight is the Euclidean distance over all channels of
//! the smoothed image (as OpenCV's `ximgproc::segmentation::GraphSegmentation`; the paper's
//! code segments each channel separately and intersects); the smoothing kernel has radius
//! `ceil(4 sigma)` with clamped borders (the paper's code); ties between equal weights are
//! broken by pixel index, so the result is deterministic. The graph is 8-connected as in the
//! paper by default; [`Connectivity::Four`] builds OpenCV's 4-connected one.

use serde::{Deserialize, Serialize};

use super::image::Planes;

/// Which pixels the graph joins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Connectivity {
    /// Left/right and up/down neighbours (OpenCV's `GraphSegmentation`).
    Four,
    /// Also the diagonals (the paper's).
    #[default]
    Eight,
}

impl std::str::FromStr for Connectivity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "4" | "four" => Ok(Connectivity::Four),
            "8" | "eight" => Ok(Connectivity::Eight),
            other => Err(format!("unknown connectivity {other:?} (expected 4 or 8)")),
        }
    }
}

/// Parameters of the segmentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GraphSegmentConfig {
    /// Scale of observation: larger k prefers larger components. Default 300 (the paper's and
    /// OpenCV's default).
    pub k: f32,
    /// Standard deviation of the Gaussian smoothing, in pixels. Default 0.8 (the paper's, and
    /// OpenCV's selective search). 0 disables smoothing.
    pub sigma: f32,
    /// Components smaller than this (in pixels) are merged into a neighbour. Default 100
    /// (OpenCV's default; the paper's demo uses 20).
    pub min_size: usize,
    /// Default [`Connectivity::Eight`] (the paper's).
    pub connectivity: Connectivity,
}

impl Default for GraphSegmentConfig {
    fn default() -> Self {
        GraphSegmentConfig {
            k: 300.0,
            sigma: 0.8,
            min_size: 100,
            connectivity: Connectivity::Eight,
        }
    }
}

/// A segmentation: one label per pixel, `0..regions`, numbered in raster order of first
/// appearance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segmentation {
    pub width: usize,
    pub height: usize,
    /// Row-major labels.
    pub labels: Vec<u32>,
    pub regions: usize,
}

/// One graph edge between pixels `a < b` (row-major indices).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Edge {
    pub w: f32,
    pub a: u32,
    pub b: u32,
}

/// Normalised 1-D Gaussian of radius `ceil(4 sigma)` (at least 1 tap).
pub(crate) fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return vec![1.0];
    }
    let radius = (4.0 * sigma).ceil() as i32;
    let mut k: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    k
}

/// Separable convolution of one plane with `kx` along rows and `ky` along columns, borders
/// clamped to the edge pixel.
///
/// # Shapes
/// `plane`: `height * width` row-major; returns the same.
pub(crate) fn convolve_separable(
    plane: &[f32],
    width: usize,
    height: usize,
    kx: &[f32],
    ky: &[f32],
) -> Vec<f32> {
    let rx = (kx.len() / 2) as isize;
    let ry = (ky.len() / 2) as isize;
    let clamp = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
    let mut tmp = vec![0.0f32; plane.len()];
    for y in 0..height {
        let row = &plane[y * width..(y + 1) * width];
        for x in 0..width {
            let mut acc = 0.0;
            for (t, &kv) in kx.iter().enumerate() {
                acc += kv * row[clamp(x as isize + t as isize - rx, width)];
            }
            tmp[y * width + x] = acc;
        }
    }
    let mut out = vec![0.0f32; plane.len()];
    for y in 0..height {
        for x in 0..width {
            let mut acc = 0.0;
            for (t, &kv) in ky.iter().enumerate() {
                acc += kv * tmp[clamp(y as isize + t as isize - ry, height) * width + x];
            }
            out[y * width + x] = acc;
        }
    }
    out
}

/// Gaussian smoothing of every channel.
pub fn smooth(planes: &Planes, sigma: f32) -> Planes {
    let k = gaussian_kernel(sigma);
    Planes {
        width: planes.width,
        height: planes.height,
        channels: planes
            .channels
            .iter()
            .map(|c| convolve_separable(c, planes.width, planes.height, &k, &k))
            .collect(),
    }
}

/// The pixel graph of an image, edges sorted by `(weight, a, b)`.
pub(crate) fn sorted_edges(smoothed: &Planes, connectivity: Connectivity) -> Vec<Edge> {
    let diagonals = connectivity == Connectivity::Eight;
    let (w, h) = (smoothed.width, smoothed.height);
    let dist = |p: usize, q: usize| {
        smoothed
            .channels
            .iter()
            .map(|c| (c[p] - c[q]) * (c[p] - c[q]))
            .sum::<f32>()
            .sqrt()
    };
    let mut edges = Vec::with_capacity(w * h * 4);
    for y in 0..h {
        for x in 0..w {
            let p = y * w + x;
            let mut push = |q: usize| {
                edges.push(Edge {
                    w: dist(p, q),
                    a: p as u32,
                    b: q as u32,
                })
            };
            if x + 1 < w {
                push(p + 1);
            }
            if y + 1 < h {
                if diagonals && x > 0 {
                    push(p + w - 1);
                }
                push(p + w);
                if diagonals && x + 1 < w {
                    push(p + w + 1);
                }
            }
        }
    }
    edges.sort_unstable_by(|e, f| e.w.total_cmp(&f.w).then(e.a.cmp(&f.a)).then(e.b.cmp(&f.b)));
    edges
}

/// Union-find with union by size and path halving.
struct DisjointSets {
    parent: Vec<u32>,
    size: Vec<u32>,
}

impl DisjointSets {
    fn new(n: usize) -> Self {
        DisjointSets {
            parent: (0..n as u32).collect(),
            size: vec![1; n],
        }
    }

    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let grand = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = grand;
            x = grand;
        }
        x
    }

    /// Joins two roots; returns the new root.
    fn union(&mut self, a: u32, b: u32) -> u32 {
        let (big, small) = if self.size[a as usize] >= self.size[b as usize] {
            (a, b)
        } else {
            (b, a)
        };
        self.parent[small as usize] = big;
        self.size[big as usize] += self.size[small as usize];
        big
    }
}

/// Segments an image (any number of channels, values on any scale: `k` is relative to it).
pub fn segment(planes: &Planes, config: &GraphSegmentConfig) -> Segmentation {
    let (w, h) = (planes.width, planes.height);
    let n = w * h;
    let smoothed = smooth(planes, config.sigma);
    let edges = sorted_edges(&smoothed, config.connectivity);
    let mut sets = DisjointSets::new(n);
    let mut threshold = vec![config.k; n];
    for e in &edges {
        let (a, b) = (sets.find(e.a), sets.find(e.b));
        if a != b && e.w <= threshold[a as usize] && e.w <= threshold[b as usize] {
            let root = sets.union(a, b);
            threshold[root as usize] = e.w + config.k / sets.size[root as usize] as f32;
        }
    }
    for e in &edges {
        let (a, b) = (sets.find(e.a), sets.find(e.b));
        if a != b
            && ((sets.size[a as usize] as usize) < config.min_size
                || (sets.size[b as usize] as usize) < config.min_size)
        {
            sets.union(a, b);
        }
    }
    let mut id = vec![u32::MAX; n];
    let mut regions = 0u32;
    let mut labels = Vec::with_capacity(n);
    for p in 0..n as u32 {
        let root = sets.find(p) as usize;
        if id[root] == u32::MAX {
            id[root] = regions;
            regions += 1;
        }
        labels.push(id[root]);
    }
    Segmentation {
        width: w,
        height: h,
        labels,
        regions: regions as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn planes_from(width: usize, height: usize, channels: Vec<Vec<f32>>) -> Planes {
        Planes {
            width,
            height,
            channels,
        }
    }

    /// Relabels a partition by first appearance, so equal partitions compare equal.
    fn canonical(labels: &[usize]) -> Vec<u32> {
        let mut map = std::collections::HashMap::new();
        labels
            .iter()
            .map(|l| {
                let next = map.len() as u32;
                *map.entry(*l).or_insert(next)
            })
            .collect()
    }

    /// The paper's algorithm written as directly as possible: a label per pixel relabelled
    /// on every merge, `Int(C)` recomputed as the heaviest accepted edge inside C, sizes
    /// counted, all pairs of 8-neighbours enumerated and sorted by (weight, a, b).
    fn brute_force(planes: &Planes, config: &GraphSegmentConfig) -> Vec<u32> {
        let s = smooth(planes, config.sigma);
        let (w, h) = (s.width as isize, s.height as isize);
        let mut pairs = Vec::new();
        for p in 0..(w * h) {
            for q in (p + 1)..(w * h) {
                let (dx, dy) = ((p % w - q % w).abs(), (p / w - q / w).abs());
                let four = config.connectivity == Connectivity::Four;
                if dx <= 1 && dy <= 1 && !(four && dx + dy == 2) {
                    let d: f32 = s
                        .channels
                        .iter()
                        .map(|c| (c[p as usize] - c[q as usize]).powi(2))
                        .sum::<f32>()
                        .sqrt();
                    pairs.push((d, p as usize, q as usize));
                }
            }
        }
        pairs.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        let mut label: Vec<usize> = (0..(w * h) as usize).collect();
        let mut accepted: Vec<(f32, usize, usize)> = Vec::new();
        let size = |label: &[usize], c: usize| label.iter().filter(|&&l| l == c).count();
        let internal = |label: &[usize], accepted: &[(f32, usize, usize)], c: usize| {
            accepted
                .iter()
                .filter(|e| label[e.1] == c && label[e.2] == c)
                .map(|e| e.0)
                .fold(0.0f32, f32::max)
        };
        let relabel = |label: &mut Vec<usize>, from: usize, to: usize| {
            label
                .iter_mut()
                .filter(|l| **l == from)
                .for_each(|l| *l = to)
        };
        for &(d, p, q) in &pairs {
            let (a, b) = (label[p], label[q]);
            if a == b {
                continue;
            }
            let ta = internal(&label, &accepted, a) + config.k / size(&label, a) as f32;
            let tb = internal(&label, &accepted, b) + config.k / size(&label, b) as f32;
            if d <= ta && d <= tb {
                relabel(&mut label, b, a);
                accepted.push((d, p, q));
            }
        }
        for &(_, p, q) in &pairs {
            let (a, b) = (label[p], label[q]);
            if a != b && (size(&label, a) < config.min_size || size(&label, b) < config.min_size) {
                relabel(&mut label, b, a);
            }
        }
        canonical(&label)
    }

    #[test]
    fn gaussian_kernel_is_normalised_and_symmetric() {
        let k = gaussian_kernel(0.8);
        assert_eq!(k.len(), 2 * 4 + 1);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for i in 0..k.len() / 2 {
            assert_eq!(k[i], k[k.len() - 1 - i]);
        }
        assert_eq!(gaussian_kernel(0.0), vec![1.0]);
    }

    #[test]
    fn smoothing_equals_direct_2d_convolution() {
        let (w, h) = (7usize, 5usize);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let plane: Vec<f32> = (0..w * h).map(|_| (rng.next_u32() % 256) as f32).collect();
        let k = gaussian_kernel(0.7);
        let r = (k.len() / 2) as isize;
        let fast = convolve_separable(&plane, w, h, &k, &k);
        for y in 0..h as isize {
            for x in 0..w as isize {
                let mut acc = 0.0f64;
                for dy in -r..=r {
                    for dx in -r..=r {
                        let yy = (y + dy).clamp(0, h as isize - 1) as usize;
                        let xx = (x + dx).clamp(0, w as isize - 1) as usize;
                        acc += (k[(dy + r) as usize] * k[(dx + r) as usize]) as f64
                            * plane[yy * w + xx] as f64;
                    }
                }
                let got = fast[y as usize * w + x as usize] as f64;
                assert!((got - acc).abs() < 1e-3, "({x}, {y}): {got} vs {acc}");
            }
        }
    }

    #[test]
    fn two_flat_regions_give_exactly_two_segments() {
        // 12x8, left 5 columns dark, right 7 bright, in three channels.
        let (w, h) = (12usize, 8usize);
        let plane: Vec<f32> = (0..w * h)
            .map(|p| if p % w < 5 { 20.0 } else { 200.0 })
            .collect();
        let planes = planes_from(w, h, vec![plane.clone(), plane.clone(), plane]);
        // Unsmoothed; and smoothed, where the two blurred boundary columns (8 px each) stay
        // apart until min_size 10 folds each into its side across the lighter edge.
        for (sigma, min_size) in [(0.0, 1), (0.8, 10)] {
            let config = GraphSegmentConfig {
                k: 50.0,
                sigma,
                min_size,
                ..Default::default()
            };
            let seg = segment(&planes, &config);
            assert_eq!(seg.regions, 2, "{config:?}");
            for p in 0..w * h {
                let expected = if p % w < 5 { 0 } else { 1 };
                assert_eq!(seg.labels[p], expected, "pixel {p}, {config:?}");
            }
        }
    }

    #[test]
    fn connectivity_decides_whether_diagonal_pixels_join() {
        // A 2x2 checkerboard: equal pixels touch only across the diagonals.
        let planes = planes_from(2, 2, vec![vec![0.0, 100.0, 100.0, 0.0]]);
        let config = |connectivity| GraphSegmentConfig {
            k: 1.0,
            sigma: 0.0,
            min_size: 1,
            connectivity,
        };
        let eight = segment(&planes, &config(Connectivity::Eight));
        assert_eq!(eight.labels, vec![0, 1, 1, 0]);
        let four = segment(&planes, &config(Connectivity::Four));
        assert_eq!(four.labels, vec![0, 1, 2, 3]);
    }

    #[test]
    fn min_size_is_honoured() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (w, h) = (32usize, 32usize);
        let plane: Vec<f32> = (0..w * h).map(|_| (rng.next_u32() % 256) as f32).collect();
        let planes = planes_from(w, h, vec![plane]);
        let mut previous = usize::MAX;
        for min_size in [1usize, 4, 10, 30] {
            let config = GraphSegmentConfig {
                k: 20.0,
                sigma: 0.0,
                min_size,
                ..Default::default()
            };
            let seg = segment(&planes, &config);
            let mut counts = vec![0usize; seg.regions];
            seg.labels.iter().for_each(|&l| counts[l as usize] += 1);
            assert!(seg.regions > 1, "min_size {min_size}: one region");
            assert!(
                seg.regions < previous,
                "min_size {min_size}: no fewer regions"
            );
            previous = seg.regions;
            assert!(
                counts.iter().all(|&c| c >= min_size),
                "min_size {min_size}: sizes {counts:?}"
            );
        }
        // Without the post-merge this noise image has components below every size tested.
        let raw = segment(
            &planes,
            &GraphSegmentConfig {
                k: 20.0,
                sigma: 0.0,
                min_size: 1,
                ..Default::default()
            },
        );
        let mut counts = vec![0usize; raw.regions];
        raw.labels.iter().for_each(|&l| counts[l as usize] += 1);
        assert!(counts.iter().any(|&c| c < 4));
    }

    #[test]
    fn matches_brute_force_on_tiny_random_images() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..24 {
            let w = 3 + (rng.next_u32() % 6) as usize;
            let h = 3 + (rng.next_u32() % 6) as usize;
            let channels = if case % 2 == 0 { 3 } else { 1 };
            // Few grey levels so that flat patches and equal weights occur.
            let levels = 2 + rng.next_u32() % 6;
            let planes = planes_from(
                w,
                h,
                (0..channels)
                    .map(|_| {
                        (0..w * h)
                            .map(|_| (rng.next_u32() % levels) as f32 * 40.0)
                            .collect()
                    })
                    .collect(),
            );
            let config = GraphSegmentConfig {
                k: [10.0, 60.0, 200.0][case % 3],
                sigma: [0.0, 0.5, 0.8][(case / 3) % 3],
                min_size: 1 + (rng.next_u32() % 5) as usize,
                connectivity: if case % 4 < 2 {
                    Connectivity::Eight
                } else {
                    Connectivity::Four
                },
            };
            let fast = segment(&planes, &config);
            let slow = brute_force(&planes, &config);
            assert_eq!(fast.labels, slow, "case {case}: {w}x{h}, {config:?}");
            assert_eq!(fast.regions, *slow.iter().max().unwrap() as usize + 1);
        }
    }
}
