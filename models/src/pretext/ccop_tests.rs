use std::collections::HashMap;

use densa_exporter::{DType, GraphBuilder, Tensor};
use densa_runtime::augment::{CropBox, SampleSeed, View, ViewGeometry};
use densa_runtime::backend::tract::TractBackend;
use densa_runtime::backend::Backend;
use image::{Rgb, RgbImage};
use ndarray::{Array2, ArrayD, Axis};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::pretext::pixpro::tests::{artifact, check_ema, ctx, run_step};
use crate::train_step::{train_step_artifact, TrainStepConfig};

fn ccop(extra: &[(&str, &str)]) -> Ccop {
    let overrides: Vec<(String, String)> = TINY
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let settings = Settings::resolve("ccop", &hyper(), &overrides).unwrap();
    let config = CcopConfig::read(&settings).unwrap();
    Ccop {
        settings,
        config,
        proposals: Mutex::new(HashMap::new()),
    }
}

fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(shape.to_vec(), || rng.random_range(-1.0f32..1.0))
}

/// A 64x64 scene: grey ground and four coloured rectangles (objects for selective search).
fn scene(seed: u64) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut img = RgbImage::from_pixel(64, 64, Rgb([120, 120, 120]));
    for _ in 0..4 {
        let (w, h) = (rng.random_range(12..28), rng.random_range(12..28));
        let (x0, y0) = (rng.random_range(0..64 - w), rng.random_range(0..64 - h));
        let c = Rgb([
            rng.random_range(0..255u8),
            rng.random_range(0..255u8),
            rng.random_range(0..255u8),
        ]);
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                img.put_pixel(x, y, c);
            }
        }
    }
    img
}

/// A view of a 64x64 image with an integer crop, 32-pixel output.
fn view(crop: [f32; 4], flipped: bool, size: u32) -> View {
    View {
        pixels: random(&[3, size as usize, size as usize], 1)
            .into_dimensionality()
            .unwrap(),
        geometry: ViewGeometry {
            crop: CropBox::new(crop[0], crop[1], crop[2], crop[3]),
            flipped,
            out_size: (size, size),
            image_size: (64, 64),
        },
    }
}

fn int_box(rng: &mut ChaCha8Rng, side: i32) -> [i32; 4] {
    let (x0, y0) = (
        rng.random_range(-4..side - 2),
        rng.random_range(-4..side - 2),
    );
    let (w, h) = (rng.random_range(1..side / 2), rng.random_range(1..side / 2));
    [x0, y0, x0 + w, y0 + h]
}

fn to_box(b: [i32; 4]) -> CropBox {
    CropBox::new(b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32)
}

#[test]
fn ccop_box_survival_equals_brute_force_in_original_coordinates() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut survived = 0;
    for case in 0..30 {
        let crops = [0, 1].map(|_| {
            // Crops of 32 to 60 pixels.
            let (x0, y0) = (rng.random_range(-4..16), rng.random_range(-4..16));
            [
                x0,
                y0,
                x0 + rng.random_range(32..60),
                y0 + rng.random_range(32..60),
            ]
        });
        let mut boxes: Vec<[i32; 4]> = (0..20).map(|_| int_box(&mut rng, 64)).collect();
        boxes.sort();
        boxes.dedup();
        // Brute force: count the unit pixels of each box inside each crop.
        let inside = |b: &[i32; 4], c: &[i32; 4]| {
            let mut n = 0;
            for y in b[1]..b[3] {
                for x in b[0]..b[2] {
                    if x >= c[0] && x < c[2] && y >= c[1] && y < c[3] {
                        n += 1;
                    }
                }
            }
            n
        };
        let want: Vec<usize> = (0..boxes.len())
            .filter(|&i| {
                let b = &boxes[i];
                let area = (b[2] - b[0]) * (b[3] - b[1]);
                crops
                    .iter()
                    .all(|c| inside(b, c) as f64 > 0.6 * area as f64)
            })
            .collect();
        survived += want.len();
        let props: Vec<CropBox> = boxes.iter().map(|&b| to_box(b)).collect();
        let views = [
            view(crops[0].map(|v| v as f32), false, 32),
            view(crops[1].map(|v| v as f32), case % 2 == 0, 32),
        ];
        let g: Vec<&ViewGeometry> = views.iter().map(|v| &v.geometry).collect();
        assert_eq!(surviving(&props, &g, 0.6), want, "case {case}");
        // The sampled slots: all survivors when K holds them, else K of them; empty slots
        // masked.
        for k in [2usize, 20] {
            let m = ccop(&[("boxes", &k.to_string())]);
            let s = m.sample_boxes(&props, &views, &Curriculum::paper().at(0, 10));
            let mut chosen: Vec<usize> = s
                .boxes
                .iter()
                .flatten()
                .map(|b| props.iter().position(|p| p == b).unwrap())
                .collect();
            chosen.sort();
            chosen.dedup();
            assert_eq!(chosen.len(), want.len().min(k), "case {case}");
            assert!(chosen.iter().all(|i| want.contains(i)), "case {case}");
            let inputs = m.inputs_of(&s, &views);
            let valid = inputs[3].1.to_f32();
            assert_eq!(valid.sum() as usize, chosen.len());
        }
    }
    assert!(survived > 20, "only {survived} survivors in 30 cases");
}

/// PyTorch's `grid_sample(bilinear, border, align_corners=False)` of channel `c` of image
/// `n`, at feature-pixel coordinates `(fx, fy)` (pixel centres at integers).
fn bilinear(x: &ArrayD<f32>, n: usize, c: usize, fx: f64, fy: f64) -> f64 {
    let (h, w) = (x.shape()[2], x.shape()[3]);
    let fx = fx.clamp(0.0, (w - 1) as f64);
    let fy = fy.clamp(0.0, (h - 1) as f64);
    let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (ax, ay) = (fx - x0 as f64, fy - y0 as f64);
    let v = |yy: usize, xx: usize| x[[n, c, yy, xx]] as f64;
    (1.0 - ay) * ((1.0 - ax) * v(y0, x0) + ax * v(y0, x1))
        + ay * ((1.0 - ax) * v(y1, x0) + ax * v(y1, x1))
}

#[test]
fn ccop_roi_features_equal_a_host_bilinear_reference() {
    // 128-pixel views: a 4x4 map of stride 32. Two images, two boxes each, 3x3 bins.
    let (batch, ch, side, n, r) = (2usize, 3usize, 4usize, 2usize, 3usize);
    let geoms = [
        ViewGeometry {
            crop: CropBox::new(10.0, 20.0, 138.0, 148.0),
            flipped: false,
            out_size: (128, 128),
            image_size: (256, 256),
        },
        ViewGeometry {
            crop: CropBox::new(0.0, 0.0, 256.0, 200.0),
            flipped: true,
            out_size: (128, 128),
            image_size: (256, 256),
        },
    ];
    let boxes = [
        [
            CropBox::new(30.0, 40.0, 90.0, 70.0),
            CropBox::new(12.0, 22.0, 130.0, 140.0),
        ],
        [
            CropBox::new(5.0, 10.0, 100.0, 60.0),
            CropBox::new(150.0, 90.0, 250.0, 190.0),
        ],
    ];
    let mut grid = Vec::new();
    for i in 0..batch {
        for b in &boxes[i] {
            grid.extend(roi_grid(b, &geoms[i], r));
        }
    }
    let grid = ArrayD::from_shape_vec(vec![batch, n * r, r, 2], grid).unwrap();
    let map = random(&[batch, ch, side, side], 7);
    let mut b = GraphBuilder::new("t", 0);
    let m = b
        .input(
            "map",
            DType::F32,
            vec![batch.into(), ch.into(), side.into(), side.into()],
        )
        .unwrap();
    let g = b
        .input(
            "grid",
            DType::F32,
            vec![batch.into(), (n * r).into(), r.into(), 2.into()],
        )
        .unwrap();
    let f = roi_features(&mut b, &m, &g, n, r).unwrap();
    b.output(&f, "f").unwrap();
    let mut s = TractBackend::new().load_model(&b.finish(), "t").unwrap();
    let out = s
        .run(vec![
            ("map".into(), Tensor::F32(map.clone())),
            ("grid".into(), Tensor::F32(grid)),
        ])
        .unwrap();
    let got = out[0].1.to_f32();
    assert_eq!(got.shape(), &[batch * n, ch]);
    for i in 0..batch {
        let g = &geoms[i];
        let (sx, sy) = (
            g.crop.width() as f64 / 128.0,
            g.crop.height() as f64 / 128.0,
        );
        for (k, bx) in boxes[i].iter().enumerate() {
            // The box clipped to nothing: the view pixels of its corners, by hand.
            let to_u = |x: f64| {
                if g.flipped {
                    (g.crop.x1 as f64 - x) / sx
                } else {
                    (x - g.crop.x0 as f64) / sx
                }
            };
            let (ua, ub) = (to_u(bx.x0 as f64), to_u(bx.x1 as f64));
            let (u0, u1) = (ua.min(ub), ua.max(ub));
            let v0 = (bx.y0 as f64 - g.crop.y0 as f64) / sy;
            let v1 = (bx.y1 as f64 - g.crop.y0 as f64) / sy;
            for c in 0..ch {
                let mut sum = 0.0;
                for bi in 0..r {
                    for bj in 0..r {
                        let u = u0 + (bj as f64 + 0.5) * (u1 - u0) / r as f64;
                        let v = v0 + (bi as f64 + 0.5) * (v1 - v0) / r as f64;
                        sum += bilinear(&map, i, c, u / 32.0 - 0.5, v / 32.0 - 0.5);
                    }
                }
                let want = sum / (r * r) as f64;
                let have = got[[i * n + k, c]] as f64;
                assert!(
                    (have - want).abs() < 1e-5,
                    "image {i} box {k} ch {c}: {have} vs {want}"
                );
            }
        }
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_f32().iter().next().copied().unwrap() as f64
}

fn unit_rows(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut a = random(shape, seed);
    let d = *shape.last().unwrap();
    for mut row in a.lanes_mut(Axis(shape.len() - 1)) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.mapv_inplace(|x| x / norm);
    }
    assert_eq!(a.shape()[shape.len() - 1], d);
    a
}

#[test]
fn ccop_losses_equal_a_direct_computation() {
    let (bt, k, j, d, qn, t, margin) = (2usize, 3usize, 4usize, 5usize, 6usize, 0.2f64, 0.4f64);
    let n = bt * k;
    let q = unit_rows(&[n, d], 1);
    let keys = unit_rows(&[n, j, d], 2);
    let queue = unit_rows(&[qn, d], 3);
    // Validity: row 0 only candidate 2, row 1 all, row 2 candidates 0 and 3, ...
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut valid = ArrayD::from_shape_fn(vec![n, j], |_| rng.random_range(0..2) as f32);
    for row in 0..n {
        if valid.index_axis(Axis(0), row).sum() == 0.0 {
            valid[[row, 1]] = 1.0;
        }
    }
    let bvalid = ArrayD::from_shape_vec(vec![n, 1], vec![1.0, 1.0, 0.0, 1.0, 0.0, 1.0]).unwrap();
    let mut pairs = ArrayD::zeros(vec![bt, k, k]);
    for (i, a, c) in [(0, 0, 1), (0, 1, 0), (1, 0, 2), (1, 2, 1), (1, 1, 2)] {
        pairs[[i, a, c]] = 1.0f32;
    }

    let mut b = GraphBuilder::new("t", 0);
    let shape = |s: &[usize]| s.iter().map(|&x| x.into()).collect::<Vec<_>>();
    let qv = b.input("q", DType::F32, shape(&[n, d])).unwrap();
    let kv = b.input("keys", DType::F32, shape(&[n, j, d])).unwrap();
    let vv = b.input("valid", DType::F32, shape(&[n, j])).unwrap();
    let uv = b.input("queue", DType::F32, shape(&[qn, d])).unwrap();
    let bv = b.input("bvalid", DType::F32, shape(&[n, 1])).unwrap();
    let pv = b.input("pairs", DType::F32, shape(&[bt, k, k])).unwrap();
    let pos = hardest_key(&mut b, &qv, &kv, &vv).unwrap();
    let roi = masked_info_nce(&mut b, &qv, &pos, &uv, &bv, t)
        .unwrap()
        .mean;
    let q3 = b.reshape(&qv, &[bt as i64, k as i64, d as i64]).unwrap();
    let p3 = b.reshape(&pos, &[bt as i64, k as i64, d as i64]).unwrap();
    let intra = intra_loss(&mut b, &q3, &p3, &pv, margin).unwrap().mean;
    b.output(&pos, "pos").unwrap();
    b.output(&roi, "roi").unwrap();
    b.output(&intra, "intra").unwrap();
    let mut s = TractBackend::new().load_model(&b.finish(), "t").unwrap();
    let feed = [
        ("q", &q),
        ("keys", &keys),
        ("valid", &valid),
        ("queue", &queue),
        ("bvalid", &bvalid),
        ("pairs", &pairs),
    ];
    let out = s
        .run(
            feed.iter()
                .map(|(k, v)| (k.to_string(), Tensor::F32((*v).clone())))
                .collect(),
        )
        .unwrap();
    let (got_pos, got_roi, got_intra) = (out[0].1.to_f32(), scalar(&out[1].1), scalar(&out[2].1));
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum::<f64>();
    let row = |a: &ArrayD<f32>, idx: &[usize]| {
        let mut v = a.view();
        for &i in idx {
            v = v.index_axis_move(Axis(0), i);
        }
        v.iter().copied().collect::<Vec<f32>>()
    };
    // The positive: least similar valid candidate.
    let mut want_pos = Vec::new();
    for r in 0..n {
        let qr = row(&q, &[r]);
        let best = (0..j)
            .filter(|&c| valid[[r, c]] == 1.0)
            .min_by(|&a, &c| {
                dot(&qr, &row(&keys, &[r, a])).total_cmp(&dot(&qr, &row(&keys, &[r, c])))
            })
            .unwrap();
        let p = row(&keys, &[r, best]);
        assert_eq!(row(&got_pos, &[r]), p, "row {r}");
        want_pos.push(p);
    }
    // RoI InfoNCE over the valid rows.
    let (mut sum, mut count) = (0.0, 0.0);
    for r in 0..n {
        if bvalid[[r, 0]] == 0.0 {
            continue;
        }
        let qr = row(&q, &[r]);
        let mut logits = vec![dot(&qr, &want_pos[r]) / t];
        logits.extend((0..qn).map(|u| dot(&qr, &row(&queue, &[u])) / t));
        let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
        sum += lse - logits[0];
        count += 1.0;
    }
    let want_roi = sum / count;
    assert!(
        (got_roi - want_roi).abs() < 1e-5 * want_roi.max(1.0),
        "{got_roi} vs {want_roi}"
    );
    // Intra-image hinge over the marked pairs.
    let (mut sum, mut count) = (0.0, 0.0);
    for i in 0..bt {
        for a in 0..k {
            for c in 0..k {
                if pairs[[i, a, c]] == 0.0 {
                    continue;
                }
                let qa = row(&q, &[i * k + a]);
                let h = dot(&qa, &want_pos[i * k + c]) - dot(&qa, &want_pos[i * k + a]) + margin;
                sum += h.max(0.0);
                count += 1.0;
            }
        }
    }
    let want_intra = sum / count;
    assert!(want_intra > 0.0);
    assert!(
        (got_intra - want_intra).abs() < 1e-5,
        "{got_intra} vs {want_intra}"
    );
}

#[test]
fn ccop_jitters_follow_the_curriculum_and_valid_ones_keep_the_iou_floor() {
    let c = Curriculum::paper();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    let s0 = c.at(0, 101);
    assert!(close(s0.xy, 0.15) && close(s0.wh, 0.35) && close(s0.iou_floor, 0.8));
    let s1 = c.at(50, 101);
    assert!(close(s1.xy, 0.375) && close(s1.wh, 0.875) && close(s1.iou_floor, 0.6));
    let s2 = c.at(100, 101);
    assert!(close(s2.xy, 0.6) && close(s2.wh, 1.4) && close(s2.iou_floor, 0.4));
    assert_eq!(c.at(500, 101), s2);
    assert_eq!(c.at(7, 0), s0);
    // One jitter, unclipped: the centre moves by u * xy * side, the sides scale by
    // (1 + wh)^u.
    let b = CropBox::new(10.0, 20.0, 50.0, 40.0);
    let big = CropBox::new(-1e4, -1e4, 1e4, 1e4);
    let u = [0.5, -0.25, 1.0, -1.0];
    let jt = jitter(&b, u, &s2, &big).unwrap();
    let cx = (jt.x0 + jt.x1) / 2.0;
    let cy = (jt.y0 + jt.y1) / 2.0;
    assert!((cx - (30.0 + 0.5 * 0.6 * 40.0)).abs() < 1e-4, "{cx}");
    assert!((cy - (30.0 - 0.25 * 0.6 * 20.0)).abs() < 1e-4, "{cy}");
    assert!((jt.width() - 40.0 * 2.4).abs() < 1e-3, "{}", jt.width());
    assert!((jt.height() - 20.0 / 2.4).abs() < 1e-3, "{}", jt.height());

    // Over a run: the sampled jitters of the same sample grow, valid ones keep the floor.
    let m = ccop(&[("boxes", "4"), ("jitters", "10")]);
    let props: Vec<CropBox> = (0..12)
        .map(|i| {
            let x = (i % 4) as f32 * 14.0 + 2.0;
            let y = (i / 4) as f32 * 18.0 + 3.0;
            CropBox::new(x, y, x + 12.0, y + 14.0)
        })
        .collect();
    let views = [
        view([0.0, 0.0, 64.0, 64.0], false, 32),
        view([2.0, 1.0, 62.0, 63.0], true, 32),
    ];
    let total = 11;
    let mut mean_iou = Vec::new();
    let mut valid_share = Vec::new();
    for step in 0..total {
        let scale = m.config().curriculum.at(step, total);
        let s = m.sample_boxes(&props, &views, &scale);
        let (mut ious, mut valid, mut all) = (Vec::new(), 0, 0);
        for (slot, cands) in s.candidates.iter().enumerate() {
            let Some(b) = s.boxes[slot] else { continue };
            let key = b.intersect(&views[1].geometry.crop).unwrap();
            assert_eq!(cands[0].0, key);
            let any_jitter = cands[1..].iter().any(|(_, v)| *v);
            // The unjittered box is the positive only when no jitter is valid.
            assert_eq!(cands[0].1, !any_jitter, "step {step} slot {slot}");
            for (jt, (cb, v)) in cands[1..].iter().enumerate() {
                let o = iou(cb, &key);
                assert_eq!(o, s.jitter_iou[slot][jt]);
                assert_eq!(*v, o as f64 >= scale.iou_floor, "step {step}: IoU {o}");
                if *v {
                    assert!(o as f64 >= scale.iou_floor);
                    valid += 1;
                }
                // Inside the key view's crop.
                assert!(views[1].geometry.crop.intersect(cb) == Some(*cb));
                ious.push(o as f64);
                all += 1;
            }
        }
        mean_iou.push(ious.iter().sum::<f64>() / ious.len() as f64);
        valid_share.push(valid as f64 / all as f64);
    }
    assert!(
        mean_iou[total as usize - 1] < mean_iou[0] - 0.1,
        "{mean_iou:?}"
    );
    assert!(valid_share.iter().all(|v| *v > 0.0), "{valid_share:?}");
}

/// The views (`view0`, `view1`) and host inputs of `c.batch` samples of scenes, at `step` of
/// `total`, stacked.
fn host_batch(m: &Ccop, c: &PretextContext, step: u64, total: u64) -> HashMap<String, Tensor> {
    let views = moco_views(c.image_size);
    let mut batch: HashMap<String, Vec<ArrayD<f32>>> = HashMap::new();
    for i in 0..c.batch {
        let img = scene(i as u64);
        let vs: Vec<View> = views
            .iter()
            .enumerate()
            .map(|(k, v)| v.apply(&img, SampleSeed::new(3, 0, i as u64, 0).with_view(k as u64)))
            .collect();
        for (k, v) in vs.iter().enumerate() {
            batch
                .entry(format!("view{k}"))
                .or_default()
                .push(v.pixels.clone().into_dyn());
        }
        let info = SampleInfo {
            image: &img,
            index: i,
            step,
            total,
        };
        for (name, t) in m.sample_inputs(c, &info, &vs).unwrap() {
            batch.entry(name).or_default().push(t.to_f32());
        }
    }
    batch
        .into_iter()
        .map(|(k, parts)| {
            let v: Vec<_> = parts.iter().map(|p| p.view()).collect();
            (k, Tensor::F32(ndarray::stack(Axis(0), &v).unwrap()))
        })
        .collect()
}

#[test]
fn ccop_momentum_encoder_gets_no_gradient_ema_is_exact_and_queues_advance() {
    let m = ccop(&[]);
    // Selective search finds boxes in the scenes, cached per image.
    m.prepare_image(0, &scene(0)).unwrap();
    assert!(!m.lock()[&0].is_empty());
    let host = host_batch(&m, &ctx(), 0, 10);
    assert!(host[BOX_VALID].to_f32().sum() > 0.0, "no box survived");
    let a = artifact("ccop", &[("lr", "0.5")]);
    let (inputs, out) = run_step(&a, &host);
    let checked = check_ema(&a, &inputs, &out);
    assert!(checked > 20, "only {checked} teacher tensors");
    for name in ["teacher.roi_head.0.weight", "teacher.head.2.bias"] {
        assert!(inputs.contains_key(name), "{name}");
    }
    let s = "layer4.0.conv1.weight";
    assert!(out[&format!("{s}.next")].to_f32() != inputs[s].to_f32());
    let c = ctx();
    for (q, fresh) in [("queue.global", c.batch), ("queue.roi", c.batch * 2)] {
        let old: Array2<f32> = inputs[q].to_f32().into_dimensionality().unwrap();
        let next: Array2<f32> = out[&format!("{q}.next")]
            .to_f32()
            .into_dimensionality()
            .unwrap();
        let k = old.nrows();
        assert_eq!(
            next.slice(ndarray::s![fresh.., ..]),
            old.slice(ndarray::s![..k - fresh, ..])
        );
        for row in next.axis_iter(Axis(0)).take(fresh) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{q}: key norm {norm}");
        }
    }
    for metric in ["loss_image", "loss_roi", "loss_intra"] {
        let v = scalar(&out[metric]);
        assert!(v.is_finite() && v >= 0.0, "{metric} {v}");
    }
}

/// The losses `[loss, loss_roi, loss_intra]` of `steps` train steps on tract over one fixed
/// batch (`batch`: views and host inputs), the state fed back from each step's outputs except
/// the queues, which keep their initial random keys (with one batch repeated, fed-back queues
/// would hold the positives' own keys as negatives).
fn losses_with_fixed_queues(
    a: &densa_runtime::train::Artifact,
    batch: &HashMap<String, Tensor>,
    steps: usize,
) -> Vec<[f32; 3]> {
    use densa_runtime::train::InputRole;
    let mut inputs: HashMap<String, Tensor> = HashMap::new();
    for e in &a.manifest().inputs {
        let t = match e.role {
            InputRole::Batch => batch[&e.name].clone(),
            InputRole::Hyper => Tensor::F64(ArrayD::from_elem(vec![], e.default.unwrap())),
            _ => a.state().get(&e.name).unwrap().clone(),
        };
        inputs.insert(e.name.clone(), t);
    }
    let names: Vec<(String, Option<String>)> = a
        .manifest()
        .inputs
        .iter()
        .map(|e| (e.name.clone(), e.next.clone()))
        .collect();
    let mut session = TractBackend::new().load_model(a.graph(), "step").unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let feed: Vec<(String, Tensor)> = names
            .iter()
            .map(|(n, _)| (n.clone(), inputs[n].clone()))
            .collect();
        let out: HashMap<String, Tensor> = session.run(feed).unwrap().into_iter().collect();
        let v = |k: &str| scalar(&out[k]) as f32;
        losses.push([v("loss"), v("loss_roi"), v("loss_intra")]);
        for (n, next) in &names {
            if let Some(next) = next {
                if !n.starts_with("queue.") {
                    inputs.insert(n.clone(), out[next].clone());
                }
            }
        }
    }
    losses
}

#[test]
fn ccop_a_few_steps_lower_the_loss() {
    // 64-pixel views of the scenes: a 2x2 last feature map, so boxes see different features.
    let c = PretextContext {
        image_size: 64,
        ..ctx()
    };
    let overrides: Vec<(String, String)> = TINY
        .iter()
        .chain(&[("boxes", "4"), ("momentum", "0.9"), ("lr", "0.5")])
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let m = crate::pretext::create("ccop", &overrides).unwrap();
    let forward = m.build(&c).unwrap();
    let config = TrainStepConfig::new(m.optimizer(c.batch).unwrap());
    let a = train_step_artifact(forward, None, &config).unwrap();
    let host = host_batch(&ccop(&[("boxes", "4")]), &c, 0, 10);
    let pairs = host[PAIRS].to_f32().sum();
    let l = losses_with_fixed_queues(&a, &host, 10);
    eprintln!("{pairs} intra-image pairs; [loss, roi, intra] per step: {l:?}");
    assert!(l.iter().flatten().all(|v| v.is_finite()), "{l:?}");
    let mean = |k: usize, r: std::ops::Range<usize>| {
        l[r.clone()].iter().map(|v| v[k]).sum::<f32>() / r.len() as f32
    };
    assert!(mean(0, 7..10) < mean(0, 0..3) - 0.3, "{l:?}");
    assert!(mean(1, 7..10) < mean(1, 0..3), "{l:?}");
    // Disjoint boxes exist in the scenes: the intra-image hinge is live.
    assert!(pairs > 0.0);
    assert!(l[0][2] > 0.0, "{l:?}");
    assert!(mean(2, 7..10) < mean(2, 0..3), "{l:?}");
}

#[test]
fn ccop_data_path_prepares_proposals_once_and_passes_the_step() {
    use densa_runtime::train::{BatchAt, DataSource, Shuffled};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::pretext::data::{PretextSamples, PretextSource};

    let dir = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..4)
        .map(|i| {
            let p = dir.path().join(format!("{i}.png"));
            scene(i).save(&p).unwrap();
            p
        })
        .collect();
    let m: Arc<dyn Pretext> = Arc::new(ccop(&[("boxes", "4")]));
    let (samples, skipped) = PretextSamples::new(files, m, ctx());
    assert!(skipped.is_empty());
    let ticks = AtomicUsize::new(0);
    samples
        .prepare(&|| {
            ticks.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    assert_eq!(ticks.load(Ordering::Relaxed), 4);
    let mut source = PretextSource::new(Shuffled::new(samples, 4).unwrap());
    source.samples().set_total_steps(100);
    let at = |step| BatchAt {
        seed: 1,
        epoch: 0,
        index: 0,
        step,
    };
    let get = |source: &mut PretextSource, step| -> HashMap<String, ArrayD<f32>> {
        source
            .batch(at(step))
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.to_f32()))
            .collect()
    };
    let start = get(&mut source, 0);
    let end = get(&mut source, 99);
    assert_eq!(start[KEY_GRID].shape(), &[4, 4 * 4 * 2, 2, 2]);
    // Same sample seed: the same views, boxes and query grids; the jitters grew.
    assert_eq!(start["view0"], end["view0"]);
    assert_eq!(start[QUERY_GRID], end[QUERY_GRID]);
    assert_eq!(start[BOX_VALID], end[BOX_VALID]);
    assert_ne!(start[KEY_GRID], end[KEY_GRID]);
    // A batch is a function of its position (resumes are exact).
    assert_eq!(get(&mut source, 0), start);
}
