//! UP-DETR's host pieces against brute-force constructions, the patch projection against a
//! direct computation, and a train step with the frozen backbone.

use std::collections::HashMap;

use densa_runtime::backend::tract::TractBackend;
use densa_runtime::backend::Backend;
use image::{Rgb, RgbImage};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use super::*;
use crate::detr::train::DetrTrainer;
use crate::train_step::{OptimizerConfig, TrainStepConfig, Trainable};
use crate::Arch;

fn tiny() -> DetrConfig {
    let mut c = DetrConfig::new(Arch::Edge, vec!["x".into()]);
    c.image_size = 64;
    c.d_model = 16;
    c.heads = 2;
    c.encoder_layers = 1;
    c.decoder_layers = 2;
    c.ffn_dim = 32;
    c.num_queries = 6;
    c
}

fn small_config() -> UpDetrConfig {
    UpDetrConfig {
        patches: 2,
        patch_size: 32,
        ..UpDetrConfig::default()
    }
}

/// Random-ish scenes: noise with a few coloured rectangles.
fn scene(seed: u64, w: u32, h: u32) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut img = RgbImage::from_fn(w, h, |_, _| {
        Rgb([
            rng.random_range(0..60u8),
            rng.random_range(0..60u8),
            rng.random_range(0..60u8),
        ])
    });
    for _ in 0..3 {
        let (x0, y0) = (rng.random_range(0..w / 2), rng.random_range(0..h / 2));
        let (x1, y1) = (rng.random_range(x0 + 4..w), rng.random_range(y0 + 4..h));
        let c = Rgb([
            rng.random_range(80..255u8),
            rng.random_range(80..255u8),
            rng.random_range(80..255u8),
        ]);
        for y in y0..y1 {
            for x in x0..x1 {
                img.put_pixel(x, y, c);
            }
        }
    }
    img
}

#[test]
fn the_mask_is_the_block_diagonal_mask_of_the_shuffled_groups() {
    let (q, p) = (12, 3);
    for seed in 0..5 {
        let groups = query_groups(q, p, true, &mut ChaCha8Rng::seed_from_u64(seed));
        // Brute force: the same permutation, queries at permuted positions `a` and `b` share
        // a block iff `a / 4 == b / 4`.
        let mut perm: Vec<usize> = (0..q).collect();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let mut want = vec![0f32; q * q];
        for a in 0..q {
            for b in 0..q {
                if a / (q / p) != b / (q / p) {
                    want[perm[a] * q + perm[b]] = -1e9;
                }
            }
        }
        let mask = group_mask(&groups).to_f32();
        assert_eq!(mask.shape(), &[q, q]);
        assert_eq!(
            mask.iter().copied().collect::<Vec<_>>(),
            want,
            "seed {seed}"
        );
        for g in 0..p {
            assert_eq!(groups.iter().filter(|&&x| x == g).count(), q / p);
        }
        // The shuffle shuffles: the groups are not the contiguous ones.
        let contiguous: Vec<usize> = (0..q).map(|i| i / (q / p)).collect();
        assert_ne!(groups, contiguous, "seed {seed}");
    }
    let fixed = query_groups(q, p, false, &mut ChaCha8Rng::seed_from_u64(0));
    assert_eq!(fixed, (0..q).map(|i| i / 4).collect::<Vec<_>>());
}

#[test]
fn patch_boxes_lie_inside_the_image_with_sides_in_range() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for &(w, h) in &[(64u32, 48u32), (100, 100), (17, 300), (10, 12)] {
        let boxes = sample_patch_boxes(w, h, 400, 8, &mut rng);
        assert_eq!(boxes.len(), 400);
        let (mut min_w, mut max_w) = (f32::MAX, 0f32);
        for b in &boxes {
            assert!(b.x0 >= 0.0 && b.y0 >= 0.0, "{b:?} in {w}x{h}");
            assert!(b.x1 <= w as f32 && b.y1 <= h as f32, "{b:?} in {w}x{h}");
            for (side, size) in [(b.width(), w), (b.height(), h)] {
                let lo = 8f32.min(size as f32);
                let hi = (size as f32 - 8.0).max(lo);
                assert!(side >= lo && side <= hi, "{b:?}: side {side} in {w}x{h}");
            }
            min_w = min_w.min(b.width());
            max_w = max_w.max(b.width());
        }
        if w >= 64 {
            // The whole range is drawn: near both ends in 400 draws.
            assert!(
                min_w <= 12.0 && max_w >= w as f32 - 12.0,
                "{min_w}..{max_w}"
            );
        }
        let t = patch_targets(&boxes, w, h);
        for (bx, b) in t.boxes.iter().zip(&boxes) {
            let want = [
                (b.x0 + b.x1) / 2.0 / w as f32,
                (b.y0 + b.y1) / 2.0 / h as f32,
                b.width() / w as f32,
                b.height() / h as f32,
            ];
            for k in 0..4 {
                assert!((bx[k] - want[k]).abs() < 1e-6, "{bx:?} vs {want:?}");
            }
        }
        assert!(t.labels.iter().all(|&l| l == 0));
    }
}

#[test]
fn the_assignment_drops_about_the_asked_fraction() {
    let groups = query_groups(30, 3, true, &mut ChaCha8Rng::seed_from_u64(1));
    let a = patch_assign(&groups, 3, 200, 0.1, &mut ChaCha8Rng::seed_from_u64(2)).to_f32();
    assert_eq!(a.shape(), &[200, 30, 3]);
    let kept: f32 = a.iter().sum();
    let frac = 1.0 - kept / (200.0 * 30.0);
    assert!((frac - 0.1).abs() < 0.02, "dropped {frac}");
    for n in 0..200 {
        for (q, &g) in groups.iter().enumerate() {
            for p in 0..3 {
                assert!(a[[n, q, p]] == 0.0 || p == g);
            }
        }
    }
}

#[test]
fn each_group_receives_its_own_patch_projection() {
    let mut c = tiny();
    c.query_patches = 2;
    let (n, q, p, d) = (2, c.num_queries, 2, c.d_model);
    let ch = Arch::Edge.config().out_channels()[3];
    let mut b = GraphBuilder::new("t", 5);
    let f = b
        .input("f", DType::F32, vec![n.into(), p.into(), ch.into()])
        .unwrap();
    let a = b
        .input("a", DType::F32, vec![n.into(), q.into(), p.into()])
        .unwrap();
    let net = c.init(&mut b).unwrap();
    let out = net.patch_queries(&mut b, &f, &a).unwrap();
    b.output(&out, "out").unwrap();
    let w = b.initializer_value("patch2query.weight").unwrap().to_f32();
    let bias = b.initializer_value("patch2query.bias").unwrap().to_f32();
    let model = b.finish();

    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let fv: Vec<f32> = (0..n * p * ch).map(|_| rng.random::<f32>() * 2.0).collect();
    let groups = query_groups(q, p, true, &mut rng);
    let mut assign = patch_assign(&groups, p, n, 0.0, &mut rng).to_f32();
    assign[[1, 0, groups[0]]] = 0.0; // a dropped query
    let got = TractBackend::new()
        .load_model(&model, "t")
        .unwrap()
        .run(vec![
            (
                "f".into(),
                Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n, p, ch]), fv.clone()).unwrap()),
            ),
            ("a".into(), Tensor::F32(assign)),
        ])
        .unwrap()
        .remove(0)
        .1
        .to_f32();
    assert_eq!(got.shape(), &[n, q, d]);
    for i in 0..n {
        for (k, &g) in groups.iter().enumerate() {
            for j in 0..d {
                let want = if i == 1 && k == 0 {
                    0.0
                } else {
                    bias[[j]]
                        + (0..ch)
                            .map(|m| w[[j, m]] as f64 * fv[(i * p + g) * ch + m] as f64)
                            .sum::<f64>() as f32
                };
                let v = got[[i, k, j]];
                assert!(
                    (v - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "image {i} query {k} (group {g}) dim {j}: {v} vs {want}"
                );
            }
        }
    }
}

#[test]
fn a_step_trains_the_transformer_and_leaves_the_frozen_backbone_unchanged() {
    let up = small_config();
    let c = up.detr(&tiny());
    up.check(&c).unwrap();
    assert!(
        up.check(&tiny()).is_err(),
        "a detector without the query inputs"
    );
    let frozen: Vec<String> = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
        .map(String::from)
        .to_vec();
    let train = TrainStepConfig {
        trainable: Trainable::Frozen(frozen.clone()),
        ..TrainStepConfig::new(OptimizerConfig::adamw(1e-3, 1e-4))
    };
    let graphs = step_graphs(&c, 2, &train, 0).unwrap();
    let backend = TractBackend::new();
    let mut t = DetrTrainer::new(&c, &graphs, 2, &backend).unwrap();
    let mut enc = PatchEncoder::new(&c, up.patch_size, t.state(), &backend).unwrap();
    let images = [scene(1, 80, 64), scene(2, 64, 96)];
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let batch =
        prepare_batch(&up, &c, &mut enc, &[&images[0], &images[1]], true, &mut rng).unwrap();
    assert_eq!(batch.images.shape(), &[2, 3, 64, 64]);
    let extra: HashMap<_, _> = batch.extra.iter().cloned().collect();
    let pf = extra[names::PATCH_FEATURES].to_f32();
    assert_eq!(pf.shape(), &[2, 2, 128]);
    for (i, f) in batch.features.iter().enumerate() {
        assert_eq!(f.view().into_dyn(), pf.index_axis(Axis(0), i));
    }
    let before = t.state().clone();
    let r1 = t
        .step(batch.images.clone(), &batch.targets, &batch.extra)
        .unwrap();
    let r2 = t
        .step(batch.images.clone(), &batch.targets, &batch.extra)
        .unwrap();
    assert!(r1.loss.is_finite() && r2.loss < r1.loss, "{r1:?} {r2:?}");
    let mut moved = Vec::new();
    for (name, v) in before.iter() {
        let now = t.state().get(name).unwrap();
        if frozen.iter().any(|p| name.starts_with(&format!("{p}."))) {
            assert_eq!(now.to_f32(), v.to_f32(), "frozen `{name}` changed");
        } else if now.to_f32() != v.to_f32() {
            moved.push(name.to_string());
        }
    }
    for name in [
        "patch2query.weight",
        "query_embed.weight",
        "input_proj.weight",
    ] {
        assert!(moved.iter().any(|m| m == name), "`{name}` did not move");
    }
    // The patch inputs matter: other features give another loss on the same state.
    let mut other = batch.extra.clone();
    for (name, v) in other.iter_mut() {
        if name == names::PATCH_FEATURES {
            *v = Tensor::F32(v.to_f32().mapv(|x| x * 3.0 + 1.0));
        }
    }
    let mut t2 = DetrTrainer::new(&c, &graphs, 2, &backend).unwrap();
    let r_other = t2
        .step(batch.images.clone(), &batch.targets, &other)
        .unwrap();
    assert_ne!(r_other.loss, r1.loss);
}

#[test]
fn a_frozen_batch_norm_computes_what_inference_batch_norm_computes() {
    // Primitive ops (NormMode::Frozen, the training graph's) against ONNX BatchNormalization.
    let run = |mode: &mut NormMode| {
        let mut b = GraphBuilder::new("bn", 3);
        let x = b
            .input(
                "x",
                DType::F32,
                vec![2.into(), 4.into(), 3.into(), 3.into()],
            )
            .unwrap();
        let bn = crate::nn::BatchNorm2dConfig::new(4)
            .init(&mut b, "bn")
            .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (name, lo) in [
            ("bn.weight", 0.5f32),
            ("bn.bias", -1.0),
            ("bn.running_mean", -1.0),
            ("bn.running_var", 0.2),
        ] {
            let v: Vec<f32> = (0..4).map(|_| lo + rng.random::<f32>() * 2.0).collect();
            b.set_initializer(
                name,
                Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[4]), v).unwrap()),
            )
            .unwrap();
        }
        let y = bn.forward_mode(&mut b, &x, mode).unwrap();
        b.output(&y, "y").unwrap();
        let xs: Vec<f32> = (0..72).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        TractBackend::new()
            .load_model(&b.finish(), "bn")
            .unwrap()
            .run(vec![(
                "x".into(),
                Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, 4, 3, 3]), xs).unwrap()),
            )])
            .unwrap()
            .remove(0)
            .1
            .to_f32()
    };
    let (a, f) = (run(&mut NormMode::Inference), run(&mut NormMode::Frozen));
    let d = a
        .iter()
        .zip(f.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-5, "{d}");
    assert!(a.iter().any(|v| v.abs() > 0.5));
}

#[test]
fn the_method_starts_the_detector_from_the_backbone_its_patch_encoder_uses() {
    let dir = tempfile::tempdir().unwrap();
    // A backbone file (a stand-in for SwAV's) with other values than the detector's own.
    let mut b = GraphBuilder::new("swav", 77);
    Arch::Edge.config().init(&mut b).unwrap();
    let mut sd = StateDict::new();
    for p in b.params() {
        if let Some(t) = b.initializer_value(&p.name) {
            sd.insert(p.name.clone(), t.clone());
        }
    }
    densa_exporter::weights::save_safetensors(&sd, &dir.path().join("backbone.safetensors"))
        .unwrap();
    let mut overrides: Vec<(String, String)> = INFO
        .tiny
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    overrides.push(("backbone".into(), dir.path().display().to_string()));
    let mut m = crate::pretext::create_detector("updetr", &overrides).unwrap();
    let ctx = DetrPretextContext {
        arch: Arch::Edge,
        batch: 2,
        image_size: 64,
        seed: 0,
    };
    let c = m.config(&ctx).unwrap();
    assert_eq!(
        (c.query_patches, c.self_attn_mask, c.num_queries),
        (2, true, 6)
    );
    let e = c.embedding.unwrap();
    assert_eq!((e.dim, e.loss), (128, EmbeddingLoss::NormalizedSquared));
    let backend = TractBackend::new();
    m.prepare(
        &ctx,
        &PrepareContext {
            files: &[],
            cache_dir: dir.path(),
            backend: &backend,
            progress: &|_, _| {},
        },
    )
    .unwrap();
    let train = TrainStepConfig {
        trainable: m.trainable(),
        ..TrainStepConfig::new(OptimizerConfig::adamw(1e-3, 1e-4))
    };
    let graphs = m.step_graphs(&c, 2, &train, 0).unwrap();
    for (name, t) in sd.iter() {
        assert_eq!(graphs.whole.state.get(name).unwrap(), t, "`{name}`");
    }
    let mut t = DetrTrainer::new(&c, &graphs, 2, &backend).unwrap();
    let images = [scene(5, 64, 64), scene(6, 72, 64)].map(|image| SampleImage { index: 0, image });
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let batch = m.batch(&c, &images, 0, &mut rng).unwrap();
    // The reconstruction targets are the features of the given backbone's patch encoder.
    let mut enc = PatchEncoder::new(&c, 32, &sd, &backend).unwrap();
    let crops = render_patches(
        &images[0].image,
        &[CropBox::new(0.0, 0.0, 32.0, 32.0)],
        32,
        &ColorJitterConfig {
            p: 0.0,
            ..ColorJitterConfig::default()
        },
        &mut rng,
    );
    assert_eq!(enc.encode(&crops).unwrap().shape(), &[1, 128]);
    for tg in &batch.targets {
        assert_eq!((tg.boxes.len(), tg.embeddings.len()), (2, 2));
        assert!(tg.embeddings.iter().all(|e| e.len() == 128));
    }
    let report = t.step(batch.images, &batch.targets, &batch.extra).unwrap();
    let embed: Vec<f32> = report
        .metrics
        .iter()
        .filter(|(n, _)| n.starts_with("loss_embed."))
        .map(|(_, v)| *v)
        .collect();
    // Per layer: sum over the 4 patches of ||a - b||^2 of unit vectors, / 4 boxes: in (0, 4].
    assert_eq!(embed.len(), 2);
    assert!(embed.iter().all(|&v| v > 0.0 && v <= 4.0), "{embed:?}");
    for (name, v) in sd.iter() {
        assert_eq!(t.state().get(name).unwrap(), v, "frozen `{name}` changed");
    }
}
