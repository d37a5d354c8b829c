//! Hierarchical grouping (Uijlings et al., "Selective Search for Object Recognition", IJCV
//! 2013, Sec. 3.1-3.2): starting from a graph-based segmentation, the two most similar
//! neighbouring regions merge until one region is left; every region of the hierarchy is a
//! proposal.
//!
//! Similarities, each in `[0, 1]`, summed over the measures a [`Strategy`] enables:
//! - colour: intersection of L1-normalised colour histograms, 25 bins per channel over
//!   `[0, 256)`;
//! - texture: intersection of L1-normalised texture histograms, 10 bins for each of 8
//!   oriented Gaussian-derivative maps per channel (see below);
//! - size: `1 - (|r_i| + |r_j|) / |image|`, so small regions merge first;
//! - fill: `1 - (|BB_ij| - |r_i| - |r_j|) / |image|`, `BB_ij` the box around both.
//!
//! A merged region's histograms are the size-weighted average of its parts' (equal to the
//! histogram of the union: tested), its box the union of boxes.
//!
//! Texture (our documented simplification of the paper's SIFT-like measure, close to OpenCV's
//! implementation): per channel, Gaussian derivatives `gx, gy` with sigma 1; the directional
//! derivatives along 0, 45, 90 and 135 degrees, each split into its positive and negative
//! part, give 8 non-negative maps; each map is divided by its maximum over the image and
//! binned into 10 bins.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::felzenszwalb::{convolve_separable, gaussian_kernel, Segmentation};
use super::image::Planes;

/// Colour histogram bins per channel (the paper's 25).
pub const COLOUR_BINS: usize = 25;
/// Texture histogram bins per oriented map (the paper's 10).
pub const TEXTURE_BINS: usize = 10;
/// Oriented derivative maps per channel.
pub const TEXTURE_ORIENTATIONS: usize = 8;

/// Which similarity measures a grouping sums (the paper's `a_i` in `{0, 1}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Strategy {
    pub colour: bool,
    pub texture: bool,
    pub size: bool,
    pub fill: bool,
}

impl Strategy {
    /// Colour + texture + size + fill.
    pub const CTSF: Strategy = Strategy {
        colour: true,
        texture: true,
        size: true,
        fill: true,
    };
    /// Texture + size + fill.
    pub const TSF: Strategy = Strategy {
        colour: false,
        texture: true,
        size: true,
        fill: true,
    };
    /// Fill only.
    pub const F: Strategy = Strategy {
        colour: false,
        texture: false,
        size: false,
        fill: true,
    };
    /// Size only.
    pub const S: Strategy = Strategy {
        colour: false,
        texture: false,
        size: true,
        fill: false,
    };
}

/// Per-pixel histogram bin indices of one colour image, shared by every `k` and strategy.
///
/// # Shapes
/// `colour[c]`: `height * width` bins in `0..COLOUR_BINS`; `texture[c * 8 + o]`:
/// `height * width` bins in `0..TEXTURE_BINS`.
pub struct PixelBins {
    pub width: usize,
    pub height: usize,
    pub colour: Vec<Vec<u8>>,
    pub texture: Vec<Vec<u8>>,
}

/// Bins `value` in `[0, range)` into `bins` bins (values outside are clamped).
fn bin(value: f32, range: f32, bins: usize) -> u8 {
    ((value / range * bins as f32).floor().max(0.0) as usize).min(bins - 1) as u8
}

/// The 8 oriented, half-wave rectified Gaussian-derivative maps of one plane.
pub(crate) fn texture_maps(plane: &[f32], width: usize, height: usize) -> Vec<Vec<f32>> {
    let g = gaussian_kernel(1.0);
    let r = (g.len() / 2) as f32;
    // Derivative-of-Gaussian taps for `convolve_separable` (a correlation): x * G(x) at
    // offset x, sigma = 1, so that a rising edge gives a positive response.
    let dg: Vec<f32> = g
        .iter()
        .enumerate()
        .map(|(i, v)| (i as f32 - r) * v)
        .collect();
    let gx = convolve_separable(plane, width, height, &dg, &g);
    let gy = convolve_separable(plane, width, height, &g, &dg);
    let mut maps = Vec::with_capacity(TEXTURE_ORIENTATIONS);
    for o in 0..TEXTURE_ORIENTATIONS / 2 {
        let theta = o as f32 * std::f32::consts::FRAC_PI_4;
        let (c, s) = (theta.cos(), theta.sin());
        let d: Vec<f32> = gx.iter().zip(&gy).map(|(x, y)| c * x + s * y).collect();
        maps.push(d.iter().map(|v| v.max(0.0)).collect());
        maps.push(d.iter().map(|v| (-v).max(0.0)).collect());
    }
    maps
}

impl PixelBins {
    pub fn new(planes: &Planes) -> Self {
        let (w, h) = (planes.width, planes.height);
        let colour = planes
            .channels
            .iter()
            .map(|c| c.iter().map(|&v| bin(v, 256.0, COLOUR_BINS)).collect())
            .collect();
        let mut texture = Vec::with_capacity(planes.channels.len() * TEXTURE_ORIENTATIONS);
        for c in &planes.channels {
            for map in texture_maps(c, w, h) {
                let max = map.iter().fold(0.0f32, |m, &v| m.max(v));
                texture.push(
                    map.iter()
                        .map(|&v| {
                            if max > 0.0 {
                                bin(v, max, TEXTURE_BINS)
                            } else {
                                0
                            }
                        })
                        .collect(),
                );
            }
        }
        PixelBins {
            width: w,
            height: h,
            colour,
            texture,
        }
    }

    fn colour_len(&self) -> usize {
        self.colour.len() * COLOUR_BINS
    }

    fn texture_len(&self) -> usize {
        self.texture.len() * TEXTURE_BINS
    }
}

/// A region of the hierarchy.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    /// Pixels.
    pub size: u32,
    /// `[x0, y0, x1, y1]`, exclusive ends.
    pub bbox: [u32; 4],
    /// L1-normalised colour histogram, channel-major.
    pub colour: Vec<f32>,
    /// L1-normalised texture histogram, (channel, orientation)-major.
    pub texture: Vec<f32>,
}

fn intersection(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x.min(*y)).sum()
}

fn union_box(a: &[u32; 4], b: &[u32; 4]) -> [u32; 4] {
    [
        a[0].min(b[0]),
        a[1].min(b[1]),
        a[2].max(b[2]),
        a[3].max(b[3]),
    ]
}

fn box_area(b: &[u32; 4]) -> u64 {
    (b[2] - b[0]) as u64 * (b[3] - b[1]) as u64
}

/// The similarity of two regions under `strategy` (sum of the enabled measures).
pub fn similarity(a: &Region, b: &Region, strategy: Strategy, image_pixels: u64) -> f32 {
    let n = image_pixels as f32;
    let mut s = 0.0;
    if strategy.colour {
        s += intersection(&a.colour, &b.colour);
    }
    if strategy.texture {
        s += intersection(&a.texture, &b.texture);
    }
    if strategy.size {
        s += 1.0 - (a.size + b.size) as f32 / n;
    }
    if strategy.fill {
        let bb = box_area(&union_box(&a.bbox, &b.bbox)) as f32;
        s += 1.0 - (bb - a.size as f32 - b.size as f32) / n;
    }
    s
}

/// The union of two regions (histograms by size-weighted average).
pub fn merge(a: &Region, b: &Region) -> Region {
    let size = a.size + b.size;
    let (wa, wb) = (a.size as f32 / size as f32, b.size as f32 / size as f32);
    let mix = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| wa * p + wb * q).collect();
    Region {
        size,
        bbox: union_box(&a.bbox, &b.bbox),
        colour: mix(&a.colour, &b.colour),
        texture: mix(&a.texture, &b.texture),
    }
}

/// The regions of a segmentation and which pairs touch (8-connectivity).
///
/// # Shapes
/// Returns `segmentation.regions` regions and, for each, its sorted neighbour list.
pub fn initial_regions(seg: &Segmentation, bins: &PixelBins) -> (Vec<Region>, Vec<Vec<u32>>) {
    let n = seg.regions;
    let (w, h) = (seg.width, seg.height);
    let (cl, tl) = (bins.colour_len(), bins.texture_len());
    let mut colour = vec![0u32; n * cl];
    let mut texture = vec![0u32; n * tl];
    let mut size = vec![0u32; n];
    let mut bbox = vec![[u32::MAX, u32::MAX, 0, 0]; n];
    let mut adjacency: Vec<Vec<u32>> = vec![Vec::new(); n];
    for y in 0..h {
        for x in 0..w {
            let p = y * w + x;
            let r = seg.labels[p] as usize;
            size[r] += 1;
            let b = &mut bbox[r];
            b[0] = b[0].min(x as u32);
            b[1] = b[1].min(y as u32);
            b[2] = b[2].max(x as u32 + 1);
            b[3] = b[3].max(y as u32 + 1);
            for (c, plane) in bins.colour.iter().enumerate() {
                colour[r * cl + c * COLOUR_BINS + plane[p] as usize] += 1;
            }
            for (m, plane) in bins.texture.iter().enumerate() {
                texture[r * tl + m * TEXTURE_BINS + plane[p] as usize] += 1;
            }
            let mut touch = |q: usize| {
                let s = seg.labels[q] as usize;
                if s != r {
                    adjacency[r].push(s as u32);
                    adjacency[s].push(r as u32);
                }
            };
            if x + 1 < w {
                touch(p + 1);
            }
            if y + 1 < h {
                if x > 0 {
                    touch(p + w - 1);
                }
                touch(p + w);
                if x + 1 < w {
                    touch(p + w + 1);
                }
            }
        }
    }
    adjacency.iter_mut().for_each(|a| {
        a.sort_unstable();
        a.dedup();
    });
    let normalise = |counts: &[u32]| {
        let total: u32 = counts.iter().sum();
        counts
            .iter()
            .map(|&c| {
                if total > 0 {
                    c as f32 / total as f32
                } else {
                    0.0
                }
            })
            .collect()
    };
    let regions = (0..n)
        .map(|r| Region {
            size: size[r],
            bbox: bbox[r],
            colour: normalise(&colour[r * cl..(r + 1) * cl]),
            texture: normalise(&texture[r * tl..(r + 1) * tl]),
        })
        .collect();
    (regions, adjacency)
}

/// A pair of live neighbours waiting in the queue.
struct Candidate {
    similarity: f32,
    a: u32,
    b: u32,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// Most similar first; ties: the pair with the smaller ids first.
    fn cmp(&self, other: &Self) -> Ordering {
        self.similarity
            .total_cmp(&other.similarity)
            .then(other.a.cmp(&self.a))
            .then(other.b.cmp(&self.b))
    }
}

/// Greedy grouping until one region per connected group is left.
///
/// Returns every region of the hierarchy, top first: the last merge is position 1, the one
/// before it position 2, ..., then the initial regions in label order (the paper's hierarchy
/// positions, used to rank proposals).
pub fn hierarchical_grouping(
    mut regions: Vec<Region>,
    mut neighbours: Vec<Vec<u32>>,
    strategy: Strategy,
    image_pixels: u64,
) -> Vec<Region> {
    let initial = regions.len();
    let mut alive = vec![true; initial];
    let mut queue = BinaryHeap::new();
    for (a, list) in neighbours.iter().enumerate() {
        for &b in list.iter().filter(|&&b| b as usize > a) {
            queue.push(Candidate {
                similarity: similarity(&regions[a], &regions[b as usize], strategy, image_pixels),
                a: a as u32,
                b,
            });
        }
    }
    while let Some(Candidate { a, b, .. }) = queue.pop() {
        let (a, b) = (a as usize, b as usize);
        if !alive[a] || !alive[b] {
            continue;
        }
        let t = regions.len();
        regions.push(merge(&regions[a], &regions[b]));
        alive[a] = false;
        alive[b] = false;
        alive.push(true);
        let mut joined: Vec<u32> = neighbours[a]
            .iter()
            .chain(&neighbours[b])
            .copied()
            .filter(|&m| m as usize != a && m as usize != b)
            .collect();
        joined.sort_unstable();
        joined.dedup();
        for &m in &joined {
            let list = &mut neighbours[m as usize];
            list.retain(|&x| x as usize != a && x as usize != b);
            list.push(t as u32);
            queue.push(Candidate {
                similarity: similarity(&regions[m as usize], &regions[t], strategy, image_pixels),
                a: m,
                b: t as u32,
            });
        }
        neighbours[a] = Vec::new();
        neighbours[b] = Vec::new();
        neighbours.push(joined);
    }
    let merged = regions.split_off(initial);
    let mut ordered: Vec<Region> = merged.into_iter().rev().collect();
    ordered.extend(regions);
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 6x4 three-channel image and a hand-made labelling into three regions.
    fn fixture() -> (Planes, Segmentation) {
        let (w, h) = (6usize, 4usize);
        #[rustfmt::skip]
        let labels: Vec<u32> = vec![
            0, 0, 1, 1, 1, 2,
            0, 0, 1, 1, 2, 2,
            0, 0, 0, 1, 2, 2,
            0, 0, 0, 2, 2, 2,
        ];
        let channels = (0..3)
            .map(|c| {
                (0..w * h)
                    .map(|p| ((p * 37 + c * 91 + (p * p) % 13 * 11) % 256) as f32)
                    .collect()
            })
            .collect();
        (
            Planes {
                width: w,
                height: h,
                channels,
            },
            Segmentation {
                width: w,
                height: h,
                labels,
                regions: 3,
            },
        )
    }

    /// The colour histogram of the pixels with label in `members`, counted directly.
    fn direct_colour(planes: &Planes, labels: &[u32], members: &[u32]) -> Vec<f32> {
        let mut h = vec![0.0f32; 3 * COLOUR_BINS];
        let mut total = 0.0;
        for (p, l) in labels.iter().enumerate() {
            if members.contains(l) {
                for c in 0..3 {
                    let b = (planes.channels[c][p] as usize * COLOUR_BINS / 256).min(24);
                    h[c * COLOUR_BINS + b] += 1.0;
                    total += 1.0;
                }
            }
        }
        h.iter().map(|v| v / total).collect()
    }

    #[test]
    fn similarities_equal_direct_formulas() {
        let (planes, seg) = fixture();
        let bins = PixelBins::new(&planes);
        let (regions, adjacency) = initial_regions(&seg, &bins);
        assert_eq!(adjacency, vec![vec![1, 2], vec![0, 2], vec![0, 1]]);
        assert_eq!(
            regions.iter().map(|r| r.size).collect::<Vec<_>>(),
            vec![10, 6, 8]
        );
        assert_eq!(regions[0].bbox, [0, 0, 3, 4]);
        assert_eq!(regions[1].bbox, [2, 0, 5, 3]);
        assert_eq!(regions[2].bbox, [3, 0, 6, 4]);
        for r in 0..3u32 {
            let direct = direct_colour(&planes, &seg.labels, &[r]);
            assert_eq!(regions[r as usize].colour, direct);
            let t: f32 = regions[r as usize].texture.iter().sum();
            assert!((t - 1.0).abs() < 1e-5);
        }
        let n = 24u64;
        let (r0, r1) = (&regions[0], &regions[1]);
        let only = |colour, texture, size, fill| Strategy {
            colour,
            texture,
            size,
            fill,
        };
        // size: 1 - (10 + 6) / 24
        let s = similarity(r0, r1, only(false, false, true, false), n);
        assert!((s - (1.0 - 16.0 / 24.0)).abs() < 1e-6);
        // fill: box of both is [0,0,5,4] = 20 px: 1 - (20 - 16) / 24
        let f = similarity(r0, r1, only(false, false, false, true), n);
        assert!((f - (1.0 - 4.0 / 24.0)).abs() < 1e-6);
        // colour: sum of bin minima, from the direct histograms.
        let (h0, h1) = (
            direct_colour(&planes, &seg.labels, &[0]),
            direct_colour(&planes, &seg.labels, &[1]),
        );
        let expected: f32 = h0.iter().zip(&h1).map(|(a, b)| a.min(*b)).sum();
        let c = similarity(r0, r1, only(true, false, false, false), n);
        assert!((c - expected).abs() < 1e-6);
        let texture: f32 = r0
            .texture
            .iter()
            .zip(&r1.texture)
            .map(|(a, b)| a.min(*b))
            .sum();
        let all = similarity(r0, r1, Strategy::CTSF, n);
        assert!((all - (expected + texture + s + f)).abs() < 1e-5);
    }

    #[test]
    fn merged_histograms_equal_the_histogram_of_the_union() {
        let (planes, seg) = fixture();
        let bins = PixelBins::new(&planes);
        let (regions, _) = initial_regions(&seg, &bins);
        let merged = merge(&regions[0], &regions[2]);
        // The same image labelled with regions 0 and 2 as one.
        let joined = Segmentation {
            labels: seg
                .labels
                .iter()
                .map(|&l| if l == 2 { 0 } else { l })
                .collect(),
            regions: 2,
            ..seg.clone()
        };
        let (direct, _) = initial_regions(&joined, &bins);
        assert_eq!(merged.size, direct[0].size);
        assert_eq!(merged.bbox, direct[0].bbox);
        for (a, b) in merged.colour.iter().zip(&direct[0].colour) {
            assert!((a - b).abs() < 1e-6);
        }
        for (a, b) in merged.texture.iter().zip(&direct[0].texture) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn texture_maps_respond_to_their_orientation() {
        // A vertical step edge (dark left, bright right): the x-derivative is positive, so the
        // 0-degree positive map fires and the 90-degree maps stay (near) zero.
        let (w, h) = (9usize, 9usize);
        let plane: Vec<f32> = (0..w * h)
            .map(|p| if p % w < 4 { 0.0 } else { 100.0 })
            .collect();
        let maps = texture_maps(&plane, w, h);
        let centre = 4 * w + 4;
        assert!(maps[0][centre] > 10.0);
        assert_eq!(maps[1][centre], 0.0);
        assert!(maps[4][centre].abs() < 1e-3 && maps[5][centre].abs() < 1e-3);
    }

    #[test]
    fn grouping_builds_a_full_hierarchy() {
        let (planes, seg) = fixture();
        let bins = PixelBins::new(&planes);
        let (regions, adjacency) = initial_regions(&seg, &bins);
        let hierarchy = hierarchical_grouping(regions.clone(), adjacency, Strategy::CTSF, 24);
        // 3 initial regions, 2 merges; the top covers the image.
        assert_eq!(hierarchy.len(), 5);
        assert_eq!(hierarchy[0].size, 24);
        assert_eq!(hierarchy[0].bbox, [0, 0, 6, 4]);
        assert_eq!(&hierarchy[2..], &regions[..]);
        // The first merge joined the most similar pair.
        let n = 24;
        let pairs = [(0, 1), (0, 2), (1, 2)];
        let best =
            pairs
                .iter()
                .max_by(|x, y| {
                    similarity(&regions[x.0], &regions[x.1], Strategy::CTSF, n)
                        .total_cmp(&similarity(&regions[y.0], &regions[y.1], Strategy::CTSF, n))
                })
                .unwrap();
        assert_eq!(hierarchy[1], merge(&regions[best.0], &regions[best.1]));
    }
}
