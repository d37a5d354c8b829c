//! Unsupervised region proposals by selective search (Uijlings, van de Sande, Gevers and
//! Smeulders, "Selective Search for Object Recognition", IJCV 2013), used by the
//! detector-pretraining methods (CCOP, DetReg).
//!
//! Pipeline: for each colour image of the diversification (colour space) and each `k`, a
//! graph-based segmentation ([`felzenszwalb`]) gives the initial regions; for each similarity
//! [`grouping::Strategy`], hierarchical grouping ([`grouping`]) merges them into a hierarchy
//! whose every region's box is a proposal. All hierarchies are pooled and ranked as the paper
//! does: region at hierarchy position `i` (1 = the top, the whole image) gets the value
//! `RND * i`, lowest first, then duplicate boxes are dropped (first kept).
//!
//! Modes ([`Mode`]) follow OpenCV's `ximgproc::segmentation::SelectiveSearchSegmentation`:
//! - single: HSV, one `k` (`base_k`), colour + texture + size + fill;
//! - fast (the paper's "Selective Search Fast"): HSV and Lab, `k` in `{base_k, base_k + inc_k,
//!   base_k + 2 inc_k}` (150, 300, 450), strategies C+T+S+F and T+S+F: 12 hierarchies;
//! - quality: HSV, Lab, grey, hue and rgI, five `k` from `base_k` by `inc_k`, strategies
//!   C+T+S+F, T+S+F, F and S: 100 hierarchies (the paper's quality mode has 80).
//!
//! Choices (ours): OpenCV's `min_size` (100) for the segmentations; the random ranking values
//! come from ChaCha8 keyed by the seed and the hierarchy's index, so the result is the same
//! for a seed whatever the thread count; OpenCV ranks the hierarchy bottom-up (its comment
//! says inverted from the paper), we rank top-down as the paper. Boxes use the data module's
//! convention: continuous pixel coordinates, `x1` exclusive.

pub mod felzenszwalb;
pub mod grouping;
pub mod image;

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use self::felzenszwalb::{segment, Connectivity, GraphSegmentConfig, Segmentation};
pub use self::grouping::Strategy;
pub use self::image::{ColourSpace, Planes};
use crate::data::RgbImage;
use crate::infer::nms::iou;

/// Errors of the proposal generator.
#[derive(Debug, thiserror::Error)]
pub enum ProposalError {
    #[error("selective search needs a non-empty image, got {width}x{height}")]
    EmptyImage { width: u32, height: u32 },
    #[error("selective search config: {field} = {value} is invalid: {problem}")]
    Config {
        field: &'static str,
        value: String,
        problem: &'static str,
    },
}

/// Which diversification to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Single,
    #[default]
    Fast,
    Quality,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "single" => Ok(Mode::Single),
            "fast" => Ok(Mode::Fast),
            "quality" => Ok(Mode::Quality),
            other => Err(format!(
                "unknown mode {other:?} (expected single, fast or quality)"
            )),
        }
    }
}

/// Selective search parameters. Defaults are OpenCV's `switchToSelectiveSearchFast()`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SelectiveSearchConfig {
    /// Default [`Mode::Fast`].
    pub mode: Mode,
    /// Smallest segmentation scale `k`. Default 150.
    pub base_k: f32,
    /// Step between the scales. Default 150.
    pub inc_k: f32,
    /// Smoothing before segmentation. Default 0.8.
    pub sigma: f32,
    /// Smallest initial region, pixels. Default 100 (OpenCV).
    pub min_size: usize,
    /// The segmentation graph. Default [`Connectivity::Eight`] (the paper's; OpenCV's is
    /// four).
    pub connectivity: Connectivity,
    /// Seed of the ranking's random values. Default 0.
    pub seed: u64,
}

impl Default for SelectiveSearchConfig {
    fn default() -> Self {
        SelectiveSearchConfig {
            mode: Mode::Fast,
            base_k: 150.0,
            inc_k: 150.0,
            sigma: 0.8,
            min_size: 100,
            connectivity: Connectivity::Eight,
            seed: 0,
        }
    }
}

impl SelectiveSearchConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ProposalError> {
        let bad = |field, value: f32, problem| ProposalError::Config {
            field,
            value: value.to_string(),
            problem,
        };
        if !(self.base_k.is_finite() && self.base_k > 0.0) {
            return Err(bad("base_k", self.base_k, "must be finite and positive"));
        }
        if !(self.inc_k.is_finite() && self.inc_k >= 0.0) {
            return Err(bad("inc_k", self.inc_k, "must be finite and >= 0"));
        }
        if !(self.sigma.is_finite() && self.sigma >= 0.0 && self.sigma <= 50.0) {
            return Err(bad("sigma", self.sigma, "must be in [0, 50]"));
        }
        Ok(())
    }

    /// The colour spaces, segmentation scales and strategies of the mode.
    pub fn plan(&self) -> (Vec<ColourSpace>, Vec<f32>, Vec<Strategy>) {
        let ks = |n: usize| {
            (0..n)
                .map(|i| self.base_k + i as f32 * self.inc_k)
                .collect()
        };
        match self.mode {
            Mode::Single => (vec![ColourSpace::Hsv], ks(1), vec![Strategy::CTSF]),
            Mode::Fast => (
                vec![ColourSpace::Hsv, ColourSpace::Lab],
                ks(3),
                vec![Strategy::CTSF, Strategy::TSF],
            ),
            Mode::Quality => (
                vec![
                    ColourSpace::Hsv,
                    ColourSpace::Lab,
                    ColourSpace::Gray,
                    ColourSpace::Hue,
                    ColourSpace::RgI,
                ],
                ks(5),
                vec![Strategy::CTSF, Strategy::TSF, Strategy::F, Strategy::S],
            ),
        }
    }
}

/// One proposal box, `[x0, y0, x1, y1]` in pixels (continuous, `x1` exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
    /// Position in the ranked list, 0 = first.
    pub rank: usize,
}

impl Proposal {
    pub fn xyxy(&self) -> [f32; 4] {
        [self.x0, self.y0, self.x1, self.y1]
    }
    pub fn width(&self) -> f32 {
        self.x1 - self.x0
    }
    pub fn height(&self) -> f32 {
        self.y1 - self.y0
    }
}

/// The ranked hierarchy boxes of one (colour image, k, strategy) run: `(value, box)`.
fn ranked_hierarchy(
    initial: &(Vec<grouping::Region>, Vec<Vec<u32>>),
    pixels: u64,
    strategy: Strategy,
    seed: u64,
    run: u64,
) -> Vec<(f64, [u32; 4])> {
    let (regions, adjacency) = initial.clone();
    let hierarchy = grouping::hierarchical_grouping(regions, adjacency, strategy, pixels);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(b"selsearc");
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(run);
    hierarchy
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let rnd = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            (rnd * (i + 1) as f64, r.bbox)
        })
        .collect()
}

/// Selective search on an RGB image: ranked, deduplicated boxes in image pixels.
pub fn selective_search(
    img: &RgbImage,
    config: &SelectiveSearchConfig,
) -> Result<Vec<Proposal>, ProposalError> {
    config.validate()?;
    if img.width() == 0 || img.height() == 0 {
        return Err(ProposalError::EmptyImage {
            width: img.width(),
            height: img.height(),
        });
    }
    let (spaces, ks, strategies) = config.plan();
    // Colour conversion and per-pixel bins once per colour space; segmentation once per
    // (space, k); grouping per (space, k, strategy). Parallel over (space, k).
    let prepared: Vec<(Planes, grouping::PixelBins)> = spaces
        .par_iter()
        .map(|s| {
            let planes = s.convert(img);
            let bins = grouping::PixelBins::new(&planes);
            (planes, bins)
        })
        .collect();
    let jobs: Vec<(usize, usize)> = (0..spaces.len())
        .flat_map(|s| (0..ks.len()).map(move |k| (s, k)))
        .collect();
    let mut pooled: Vec<(f64, [u32; 4])> = jobs
        .par_iter()
        .flat_map_iter(|&(s, k)| {
            let (planes, bins) = &prepared[s];
            let seg = segment(
                planes,
                &GraphSegmentConfig {
                    k: ks[k],
                    sigma: config.sigma,
                    min_size: config.min_size,
                    connectivity: config.connectivity,
                },
            );
            let initial = grouping::initial_regions(&seg, bins);
            let pixels = (seg.width * seg.height) as u64;
            let runs: Vec<_> = strategies
                .iter()
                .enumerate()
                .flat_map(|(j, &strategy)| {
                    let run = ((s * ks.len() + k) * strategies.len() + j) as u64;
                    ranked_hierarchy(&initial, pixels, strategy, config.seed, run)
                })
                .collect();
            runs.into_iter()
        })
        .collect();
    pooled.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut seen = HashSet::new();
    Ok(pooled
        .into_iter()
        .filter(|(_, b)| seen.insert(*b))
        .enumerate()
        .map(|(rank, (_, b))| Proposal {
            x0: b[0] as f32,
            y0: b[1] as f32,
            x1: b[2] as f32,
            y1: b[3] as f32,
            rank,
        })
        .collect())
}

/// Selective search on the image resized to `width x height` (bilinear), boxes scaled back
/// to the original image (DetReg runs it at 128x128).
pub fn selective_search_resized(
    img: &RgbImage,
    width: u32,
    height: u32,
    config: &SelectiveSearchConfig,
) -> Result<Vec<Proposal>, ProposalError> {
    if img.width() == 0 || img.height() == 0 || width == 0 || height == 0 {
        return Err(ProposalError::EmptyImage {
            width: img.width().min(width),
            height: img.height().min(height),
        });
    }
    let small = ::image::imageops::resize(img, width, height, ::image::imageops::Triangle);
    let (sx, sy) = (
        img.width() as f32 / width as f32,
        img.height() as f32 / height as f32,
    );
    Ok(selective_search(&small, config)?
        .into_iter()
        .map(|p| Proposal {
            x0: p.x0 * sx,
            y0: p.y0 * sy,
            x1: p.x1 * sx,
            y1: p.y1 * sy,
            rank: p.rank,
        })
        .collect())
}

/// How downstream methods filter proposals.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProposalFilter {
    /// Kept when `min_aspect <= width / height <= max_aspect`.
    pub min_aspect: f32,
    pub max_aspect: f32,
    /// Kept when both sides are strictly longer (pixels).
    pub min_side: f32,
    /// A box overlapping a better-ranked kept box with IoU above this is dropped.
    pub nms_iou: f32,
    /// At most this many are kept, best ranked first.
    pub keep: usize,
}

impl ProposalFilter {
    /// CCOP's filter: aspect in [1/3, 3], sides > 20 px, NMS 0.5, keep 50.
    pub fn ccop() -> Self {
        ProposalFilter {
            min_aspect: 1.0 / 3.0,
            max_aspect: 3.0,
            min_side: 20.0,
            nms_iou: 0.5,
            keep: 50,
        }
    }

    /// DetReg's: the top 30, nothing else.
    pub fn detreg() -> Self {
        ProposalFilter {
            min_aspect: 0.0,
            max_aspect: f32::INFINITY,
            min_side: 0.0,
            nms_iou: 1.0,
            keep: 30,
        }
    }
}

/// Filters ranked proposals: aspect and side first, then greedy NMS in rank order (the
/// better-ranked box suppresses), then the first `keep`. Ranks are kept as they were.
pub fn filter_proposals(proposals: &[Proposal], filter: &ProposalFilter) -> Vec<Proposal> {
    let mut ordered: Vec<&Proposal> = proposals.iter().collect();
    ordered.sort_by_key(|p| p.rank);
    let mut kept: Vec<Proposal> = Vec::new();
    for p in ordered {
        if kept.len() >= filter.keep {
            break;
        }
        let (w, h) = (p.width(), p.height());
        if !(w > filter.min_side && h > filter.min_side) || h <= 0.0 {
            continue;
        }
        let aspect = w / h;
        if aspect < filter.min_aspect || aspect > filter.max_aspect {
            continue;
        }
        if kept
            .iter()
            .any(|k| iou(&k.xyxy(), &p.xyxy()) > filter.nms_iou)
        {
            continue;
        }
        kept.push(*p);
    }
    kept
}

/// Draws the proposals' boxes (2 px outlines, a colour per rank from the detector palette).
pub fn draw_proposals(img: &mut RgbImage, proposals: &[Proposal]) {
    use imageproc::drawing::draw_hollow_rect_mut;
    use imageproc::rect::Rect;
    for p in proposals {
        let colour = crate::infer::draw::class_colour(p.rank);
        for inset in 0..2u32 {
            let w = p.width() as i64 - 2 * inset as i64;
            let h = p.height() as i64 - 2 * inset as i64;
            if w <= 0 || h <= 0 {
                break;
            }
            let rect = Rect::at(p.x0 as i32 + inset as i32, p.y0 as i32 + inset as i32)
                .of_size(w as u32, h as u32);
            draw_hollow_rect_mut(img, rect, colour);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::image::Rgb;

    fn proposal(b: [f32; 4], rank: usize) -> Proposal {
        Proposal {
            x0: b[0],
            y0: b[1],
            x1: b[2],
            y1: b[3],
            rank,
        }
    }

    /// A light background with flat-coloured objects (rectangles and a disk); their boxes.
    fn flat_scene() -> (RgbImage, Vec<[f32; 4]>) {
        let (w, h) = (96u32, 80u32);
        let rects = [
            ([8u32, 10, 38, 36], [200u8, 30, 30]),
            ([50, 6, 88, 30], [30, 140, 40]),
            ([60, 44, 84, 74], [40, 40, 190]),
        ];
        let disk = ((24.0f32, 58.0f32), 14.0f32, [230u8, 200, 20]);
        let img = RgbImage::from_fn(w, h, |x, y| {
            for (r, c) in &rects {
                if x >= r[0] && x < r[2] && y >= r[1] && y < r[3] {
                    return Rgb(*c);
                }
            }
            let (dx, dy) = (x as f32 + 0.5 - disk.0 .0, y as f32 + 0.5 - disk.0 .1);
            if dx * dx + dy * dy <= disk.1 * disk.1 {
                return Rgb(disk.2);
            }
            Rgb([180, 180, 170])
        });
        let mut boxes: Vec<[f32; 4]> = rects.iter().map(|(r, _)| r.map(|v| v as f32)).collect();
        boxes.push([10.0, 44.0, 38.0, 72.0]);
        (img, boxes)
    }

    #[test]
    fn flat_objects_are_recalled_at_iou_07() {
        let (img, gts) = flat_scene();
        for mode in [Mode::Single, Mode::Fast] {
            let config = SelectiveSearchConfig {
                mode,
                ..Default::default()
            };
            let props = selective_search(&img, &config).unwrap();
            assert!(!props.is_empty());
            for gt in &gts {
                let best = props
                    .iter()
                    .map(|p| iou(&p.xyxy(), gt))
                    .fold(0.0f32, f32::max);
                assert!(best >= 0.7, "{mode:?}: {gt:?} best IoU {best}");
            }
        }
    }

    #[test]
    fn output_is_ranked_unique_and_deterministic_per_seed() {
        let (img, _) = flat_scene();
        let config = SelectiveSearchConfig::default();
        let a = selective_search(&img, &config).unwrap();
        let b = selective_search(&img, &config).unwrap();
        assert_eq!(a, b);
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| selective_search(&img, &config).unwrap());
        assert_eq!(a, one_thread, "the thread count does not change the result");
        let boxes: HashSet<[u32; 4]> = a.iter().map(|p| p.xyxy().map(|v| v as u32)).collect();
        assert_eq!(boxes.len(), a.len());
        assert!(a.iter().enumerate().all(|(i, p)| p.rank == i));
        assert!(a.iter().all(|p| p.x0 < p.x1
            && p.y0 < p.y1
            && p.x1 <= img.width() as f32
            && p.y1 <= img.height() as f32));
        // The whole image is in every hierarchy.
        assert!(a.iter().any(|p| p.xyxy() == [0.0, 0.0, 96.0, 80.0]));
        let other = selective_search(
            &img,
            &SelectiveSearchConfig {
                seed: 1,
                ..config.clone()
            },
        )
        .unwrap();
        let order = |v: &[Proposal]| v.iter().map(|p| p.xyxy()).collect::<Vec<_>>();
        assert_ne!(order(&a), order(&other), "the seed changes the ranking");
        let mut sa = order(&a);
        let mut so = order(&other);
        let key = |b: &[f32; 4]| b.map(|v| v as u32);
        sa.sort_by_key(key);
        so.sort_by_key(key);
        assert_eq!(sa, so, "but not the set of boxes");
    }

    #[test]
    fn modes_nest_in_hierarchy_count() {
        let c = SelectiveSearchConfig::default();
        let count = |mode| {
            let (s, k, st) = SelectiveSearchConfig { mode, ..c.clone() }.plan();
            s.len() * k.len() * st.len()
        };
        assert_eq!(count(Mode::Single), 1);
        assert_eq!(count(Mode::Fast), 12);
        assert_eq!(count(Mode::Quality), 100);
        assert_eq!(c.plan().1, vec![150.0, 300.0, 450.0]);
    }

    #[test]
    fn bad_config_and_empty_image_are_errors() {
        let img = RgbImage::new(0, 5);
        assert!(matches!(
            selective_search(&img, &SelectiveSearchConfig::default()),
            Err(ProposalError::EmptyImage { .. })
        ));
        let img = RgbImage::new(4, 4);
        let bad = SelectiveSearchConfig {
            sigma: f32::NAN,
            ..Default::default()
        };
        let err = selective_search(&img, &bad).unwrap_err().to_string();
        assert!(err.contains("sigma"), "{err}");
        // A flat 1x1 image has one region: one proposal.
        let one = selective_search(&RgbImage::new(1, 1), &Default::default()).unwrap();
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn resized_search_scales_boxes_back() {
        let (img, _) = flat_scene();
        let config = SelectiveSearchConfig::default();
        let props = selective_search_resized(&img, 48, 40, &config).unwrap();
        let small = ::image::imageops::resize(&img, 48, 40, ::image::imageops::Triangle);
        let direct = selective_search(&small, &config).unwrap();
        assert_eq!(props.len(), direct.len());
        for (p, d) in props.iter().zip(&direct) {
            assert_eq!(p.xyxy(), d.xyxy().map(|v| v * 2.0));
        }
    }

    #[test]
    fn drawing_outlines_the_box() {
        let mut img = RgbImage::new(10, 8);
        draw_proposals(&mut img, &[proposal([2.0, 1.0, 8.0, 7.0], 0)]);
        let lit = |x, y| img.get_pixel(x, y).0 != [0, 0, 0];
        assert!(lit(2, 1) && lit(7, 6) && lit(3, 2) && lit(5, 1));
        assert!(!lit(5, 4) && !lit(1, 1) && !lit(8, 7));
    }

    #[test]
    fn filter_applies_aspect_side_nms_and_keep() {
        let props = vec![
            proposal([0.0, 0.0, 100.0, 100.0], 0),
            proposal([0.0, 0.0, 10.0, 50.0], 1), // side 10: too thin
            proposal([0.0, 0.0, 200.0, 40.0], 2), // aspect 5
            proposal([5.0, 5.0, 100.0, 100.0], 3), // IoU 0.9 with rank 0
            proposal([100.0, 100.0, 150.0, 160.0], 4),
            proposal([0.0, 100.0, 30.0, 130.0], 5),
            proposal([200.0, 0.0, 221.0, 21.0], 6), // sides 21 > 20
            proposal([300.0, 0.0, 320.0, 40.0], 7), // side exactly 20: dropped
        ];
        let kept = filter_proposals(&props, &ProposalFilter::ccop());
        assert_eq!(
            kept.iter().map(|p| p.rank).collect::<Vec<_>>(),
            vec![0, 4, 5, 6]
        );
        let two = filter_proposals(
            &props,
            &ProposalFilter {
                keep: 2,
                ..ProposalFilter::ccop()
            },
        );
        assert_eq!(two.iter().map(|p| p.rank).collect::<Vec<_>>(), vec![0, 4]);
        // Rank order, not slice order, decides who suppresses whom.
        let mut reversed = props.clone();
        reversed.reverse();
        assert_eq!(filter_proposals(&reversed, &ProposalFilter::ccop()), kept);
        assert_eq!(filter_proposals(&props, &ProposalFilter::detreg()).len(), 8);
    }
}
