//! FCOS target assignment on the host (Tian et al. 2019, "FCOS: Fully Convolutional One-Stage
//! Object Detection", with the centre sampling of its later versions).
//!
//! Every feature location (the centre of its cell, `(x + 0.5) * stride`) of every pyramid level
//! is a candidate. A location is positive for a ground-truth box when it lies inside the box
//! *and* within `center_radius * stride` of the box centre (centre sampling), and when the
//! largest of its four distances to the box sides falls in the level's scale range. When several
//! boxes qualify, the smallest-area box wins. Positives get a one-hot class target, regression
//! targets `(l, t, r, b) / stride` and the centerness `sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`.
//!
//! Our choices: scale ranges are in input pixels and default to values suited to small inputs
//! (128 px: `[0, 24)`, `[24, 48)`, `[48, inf)` for strides 8, 16, 32 rather than FCOS' 64/128/...
//! for 800 px images); regression targets are divided by the stride (FCOS' `norm_reg_targets`).

/// One pyramid level as the assigner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Level {
    /// Stride in input pixels.
    pub stride: f32,
    /// Feature map size `(height, width)`.
    pub size: (usize, usize),
    /// Scale range `[lo, hi)` of `max(l, t, r, b)` in input pixels.
    pub range: (f32, f32),
}

/// Assignment parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct AssignConfig {
    pub levels: Vec<Level>,
    /// Number of classes (one-hot width).
    pub num_classes: usize,
    /// Centre-sampling radius in strides (FCOS: 1.5); `None` = anywhere inside the box.
    pub center_radius: Option<f32>,
}

/// Per-location training targets of one image (locations level by level, row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct Targets {
    /// One-hot classes, `[L, C]` row-major (all zero for negatives).
    pub cls: Vec<f32>,
    /// `(l, t, r, b) / stride`, `[L, 4]` (1 for negatives, so every value stays finite).
    pub reg: Vec<f32>,
    /// Centerness, `[L]` (0 for negatives).
    pub ctr: Vec<f32>,
    /// 1 for positives, 0 for negatives, `[L]`.
    pub pos: Vec<f32>,
}

impl Targets {
    /// Number of positive locations.
    pub fn positives(&self) -> usize {
        self.pos.iter().filter(|&&p| p > 0.0).count()
    }
}

impl AssignConfig {
    /// Total number of locations over all levels.
    pub fn locations(&self) -> usize {
        self.levels.iter().map(|l| l.size.0 * l.size.1).sum()
    }

    /// The centre `(x, y)` in input pixels and stride of every location, level by level.
    pub fn location_points(&self) -> Vec<(f32, f32, f32)> {
        let mut points = Vec::with_capacity(self.locations());
        for level in &self.levels {
            let (h, w) = level.size;
            for y in 0..h {
                for x in 0..w {
                    points.push((
                        (x as f32 + 0.5) * level.stride,
                        (y as f32 + 0.5) * level.stride,
                        level.stride,
                    ));
                }
            }
        }
        points
    }

    /// Targets for one image's boxes (`[x1, y1, x2, y2]` in input pixels, class index).
    /// Boxes of an unknown class or without area are ignored.
    pub fn assign(&self, boxes: &[([f32; 4], usize)]) -> Targets {
        let n = self.locations();
        let c = self.num_classes;
        let mut t = Targets {
            cls: vec![0.0; n * c],
            reg: vec![1.0; n * 4],
            ctr: vec![0.0; n],
            pos: vec![0.0; n],
        };
        let boxes: Vec<&([f32; 4], usize)> = boxes
            .iter()
            .filter(|(b, k)| *k < c && b[2] > b[0] && b[3] > b[1])
            .collect();
        let mut i = 0;
        for level in &self.levels {
            let (h, w) = level.size;
            let s = level.stride;
            for y in 0..h {
                for x in 0..w {
                    let (px, py) = ((x as f32 + 0.5) * s, (y as f32 + 0.5) * s);
                    let mut best: Option<(f32, usize, [f32; 4])> = None;
                    for (bb, k) in &boxes {
                        let ltrb = [px - bb[0], py - bb[1], bb[2] - px, bb[3] - py];
                        if ltrb.iter().any(|&d| d <= 0.0) {
                            continue;
                        }
                        if let Some(r) = self.center_radius {
                            let (cx, cy) = ((bb[0] + bb[2]) / 2.0, (bb[1] + bb[3]) / 2.0);
                            if (px - cx).abs() >= r * s || (py - cy).abs() >= r * s {
                                continue;
                            }
                        }
                        let m = ltrb.iter().cloned().fold(0.0f32, f32::max);
                        if m < level.range.0 || m >= level.range.1 {
                            continue;
                        }
                        let area = (bb[2] - bb[0]) * (bb[3] - bb[1]);
                        if best.is_none_or(|(a, _, _)| area < a) {
                            best = Some((area, *k, ltrb));
                        }
                    }
                    if let Some((_, k, [l, tp, r, bt])) = best {
                        t.pos[i] = 1.0;
                        t.cls[i * c + k] = 1.0;
                        t.reg[i * 4..i * 4 + 4].copy_from_slice(&[l / s, tp / s, r / s, bt / s]);
                        t.ctr[i] = ((l.min(r) / l.max(r)) * (tp.min(bt) / tp.max(bt))).sqrt();
                    }
                    i += 1;
                }
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(radius: Option<f32>) -> AssignConfig {
        AssignConfig {
            levels: vec![
                Level {
                    stride: 8.0,
                    size: (8, 8),
                    range: (0.0, 16.0),
                },
                Level {
                    stride: 16.0,
                    size: (4, 4),
                    range: (16.0, f32::INFINITY),
                },
            ],
            num_classes: 3,
            center_radius: radius,
        }
    }

    #[test]
    fn inside_box_and_scale_range_decide_positives() {
        let cfg = config(None);
        // A 16x16 box at (8, 8): max distance < 16 everywhere inside -> level 0 only.
        let t = cfg.assign(&[([8.0, 8.0, 24.0, 24.0], 2)]);
        // Level-0 centres inside (8, 24): x, y in {12, 20} -> 4 positives.
        assert_eq!(t.positives(), 4);
        let i = 8 + 1; // (x=1, y=1): centre (12, 12)
        assert_eq!(t.pos[i], 1.0);
        assert_eq!(&t.cls[i * 3..i * 3 + 3], &[0.0, 0.0, 1.0]);
        assert_eq!(&t.reg[i * 4..i * 4 + 4], &[0.5, 0.5, 1.5, 1.5]);
        let expected_ctr = ((0.5f32 / 1.5) * (0.5 / 1.5)).sqrt();
        assert!((t.ctr[i] - expected_ctr).abs() < 1e-6);
        // Negatives keep finite dummy regression targets and zero centerness.
        assert_eq!(&t.reg[0..4], &[1.0; 4]);
        assert_eq!(t.ctr[0], 0.0);
    }

    #[test]
    fn large_boxes_go_to_the_coarse_level_and_smallest_area_wins() {
        let cfg = config(None);
        let big = ([0.0, 0.0, 64.0, 64.0], 0);
        let t = cfg.assign(&[big]);
        // Level 1 (stride 16): centre (8, 8) has max distance 56 -> positive; so are all 16.
        let level1: Vec<f32> = t.pos[64..].to_vec();
        assert!(level1.iter().all(|&p| p == 1.0));
        // Level 0 only where max distance < 16: none for a 64 px box.
        assert!(t.pos[..64].iter().all(|&p| p == 0.0));
        // A small box inside the big one takes its locations on level 0, and the big box's
        // coarse locations stay with it (different level).
        let small = ([16.0, 16.0, 32.0, 32.0], 1);
        let t2 = cfg.assign(&[big, small]);
        let i = 2 * 8 + 2; // centre (20, 20)
        assert_eq!(&t2.cls[i * 3..i * 3 + 3], &[0.0, 1.0, 0.0]);
        // Two overlapping boxes on the same level: the smaller one wins the shared location.
        let a = ([0.0, 0.0, 30.0, 30.0], 0);
        let b = ([8.0, 8.0, 28.0, 28.0], 2);
        let cfg2 = AssignConfig {
            levels: vec![Level {
                stride: 8.0,
                size: (8, 8),
                range: (0.0, f32::INFINITY),
            }],
            ..config(None)
        };
        let t3 = cfg2.assign(&[a, b]);
        let i = 2 * 8 + 2; // centre (20, 20), inside both
        assert_eq!(&t3.cls[i * 3..i * 3 + 3], &[0.0, 0.0, 1.0]);
    }

    #[test]
    fn centre_sampling_restricts_to_the_box_centre() {
        let wide = ([0.0, 0.0, 64.0, 16.0], 0);
        let cfg = AssignConfig {
            levels: vec![Level {
                stride: 8.0,
                size: (8, 8),
                range: (0.0, f32::INFINITY),
            }],
            ..config(Some(1.5))
        };
        let t = cfg.assign(&[wide]);
        // Centre (32, 8); radius 12 px (strict): x centres 28 and 36 qualify, y centres 4, 12.
        assert_eq!(t.positives(), 4);
        let without = AssignConfig {
            center_radius: None,
            ..cfg
        };
        assert_eq!(without.assign(&[wide]).positives(), 16);
    }

    #[test]
    fn brute_force_agrees_on_random_boxes() {
        // Property: every positive is inside its box, in range, and no qualifying box is
        // smaller than the assigned one.
        let cfg = config(Some(1.5));
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as f32 / (1u64 << 31) as f32
        };
        for _ in 0..50 {
            let boxes: Vec<([f32; 4], usize)> = (0..4)
                .map(|k| {
                    let (x, y) = (rnd() * 56.0, rnd() * 56.0);
                    let (w, h) = (4.0 + rnd() * 40.0, 4.0 + rnd() * 40.0);
                    ([x, y, (x + w).min(64.0), (y + h).min(64.0)], k % 3)
                })
                .collect();
            let t = cfg.assign(&boxes);
            for (i, &(px, py, s)) in cfg.location_points().iter().enumerate() {
                let level = if s == 8.0 {
                    &cfg.levels[0]
                } else {
                    &cfg.levels[1]
                };
                let qualifying: Vec<f32> = boxes
                    .iter()
                    .filter(|(b, _)| {
                        let d = [px - b[0], py - b[1], b[2] - px, b[3] - py];
                        let m = d.iter().cloned().fold(0.0f32, f32::max);
                        let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
                        d.iter().all(|&v| v > 0.0)
                            && (px - cx).abs() < 1.5 * s
                            && (py - cy).abs() < 1.5 * s
                            && m >= level.range.0
                            && m < level.range.1
                    })
                    .map(|(b, _)| (b[2] - b[0]) * (b[3] - b[1]))
                    .collect();
                assert_eq!(t.pos[i] == 1.0, !qualifying.is_empty(), "location {i}");
                if t.pos[i] == 1.0 {
                    let r = &t.reg[i * 4..i * 4 + 4];
                    let area = (r[0] + r[2]) * (r[1] + r[3]) * s * s;
                    let min = qualifying.iter().cloned().fold(f32::INFINITY, f32::min);
                    assert!((area - min).abs() < 1e-2 * min.max(1.0), "{area} vs {min}");
                }
            }
        }
    }
}
