use densa_exporter::{DType, GraphBuilder, Tensor};
use densa_runtime::backend::tract::TractBackend;
use densa_runtime::backend::Backend;
use ndarray::{Array3, ArrayD, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::pretext::create;
use crate::pretext::regioncl::tests::{check_ema, ctx, fake_view, random};

#[test]
fn detco_jigsaw_patches_equal_brute_force() {
    for (size, shuffle) in [(32usize, false), (32, true), (64, false), (224, true)] {
        let pixels: Array3<f32> = random(&[3, size, size], size as u64)
            .into_dimensionality()
            .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (got, order) = jigsaw_patches(&pixels, shuffle.then_some(&mut rng));
        let p = (size as f64 / 3.0).round() as usize;
        assert_eq!(got.dim(), (9, 3, p, p));
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..9).collect::<Vec<_>>());
        if !shuffle {
            assert_eq!(order, (0..9).collect::<Vec<_>>());
        }
        for (k, &g) in order.iter().enumerate() {
            let (r, c) = (g / 3, g % 3);
            // Brute force: the documented offsets, clamped inside the view.
            let off = |j: usize| ((j * size) as f64 / 3.0).round().min((size - p) as f64) as usize;
            for ch in 0..3 {
                for y in 0..p {
                    for x in 0..p {
                        assert_eq!(
                            got[[k, ch, y, x]],
                            pixels[[ch, off(r) + y, off(c) + x]],
                            "{size} patch {g}"
                        );
                    }
                }
            }
        }
        // The patches cover the view but for the `V - 3p` rows skipped when `3p < V`.
        let mut seen = vec![false; size];
        for j in 0..3 {
            let o = patch_offset(j, size);
            seen[o..o + p].fill(true);
        }
        let missed = seen.iter().filter(|&&s| !s).count();
        assert_eq!(missed, size.saturating_sub(3 * p), "{size}");
    }
    // Host inputs: one patch set per view, deterministic per sample.
    let m = create("detco", &[("shuffle_patches".into(), "true".into())]).unwrap();
    let c = ctx(32);
    let views = vec![fake_view(0, 0, 32), fake_view(0, 1, 32)];
    let a = m.host_inputs(&c, &views).unwrap();
    let again = m.host_inputs(&c, &views).unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!((a[0].0.as_str(), a[1].0.as_str()), ("patches0", "patches1"));
    assert_eq!(a[0].1.shape(), &[9, 3, 11, 11]);
    assert_eq!(a[1].1.to_f32(), again[1].1.to_f32());
}

#[test]
fn detco_multi_level_loss_equals_direct_computation() {
    let (n, d, k, t) = (3usize, 4usize, 5usize, 0.2f64);
    let weights = [0.1, 0.4, 0.7, 1.0];
    let mut b = GraphBuilder::new("t", 0);
    let mut levels = Vec::new();
    let mut feeds: Vec<(String, ArrayD<f32>)> = Vec::new();
    let unit = |seed: u64, rows: usize| {
        let mut a = random(&[rows, d], seed);
        for mut r in a.axis_iter_mut(Axis(0)) {
            let nrm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.mapv_inplace(|x| x / nrm);
        }
        a
    };
    for (l, &w) in weights.iter().enumerate() {
        let mut input = |b: &mut GraphBuilder, name: &str, rows: usize, seed: u64| {
            let full = format!("{name}{l}");
            feeds.push((full.clone(), unit(seed, rows)));
            b.input(&full, DType::F32, vec![rows.into(), d.into()])
                .unwrap()
        };
        let s = 10 * l as u64;
        let e = LevelEmbeddings {
            q_global: input(&mut b, "qg", n, s),
            q_local: input(&mut b, "ql", n, s + 1),
            k_global: input(&mut b, "kg", n, s + 2),
            k_local: input(&mut b, "kl", n, s + 3),
        };
        let q = LevelQueues {
            gg: input(&mut b, "gg", k, s + 4),
            ll: input(&mut b, "ll", k, s + 5),
            gl: input(&mut b, "gl", k, s + 6),
        };
        levels.push((e, q, w));
    }
    let (loss, per_level) = multi_level_loss(&mut b, &levels, t).unwrap();
    b.output(&loss, "loss").unwrap();
    for (l, v) in per_level.iter().enumerate() {
        b.output(v, &format!("level{l}")).unwrap();
    }
    let mut sess = TractBackend::new().load_model(&b.finish(), "t").unwrap();
    let out = sess
        .run(
            feeds
                .iter()
                .map(|(n, v)| (n.clone(), Tensor::F32(v.clone())))
                .collect(),
        )
        .unwrap();
    let get = |name: &str| -> &ArrayD<f32> { &feeds.iter().find(|(n, _)| n == name).unwrap().1 };
    let nce = |q: &ArrayD<f32>, kk: &ArrayD<f32>, queue: &ArrayD<f32>| -> f64 {
        let dot = |a: &ArrayD<f32>, i: usize, b: &ArrayD<f32>, j: usize| -> f64 {
            (0..d).map(|c| a[[i, c]] as f64 * b[[j, c]] as f64).sum()
        };
        let mut s = 0.0;
        for i in 0..n {
            let mut logits = vec![dot(q, i, kk, i) / t];
            logits.extend((0..k).map(|j| dot(q, i, queue, j) / t));
            let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
            s += lse - logits[0];
        }
        s / n as f64
    };
    let mut want = 0.0;
    for (l, &w) in weights.iter().enumerate() {
        let g = |x: &str| get(&format!("{x}{l}"));
        let level = nce(g("qg"), g("kg"), g("gg"))
            + nce(g("ql"), g("kl"), g("ll"))
            + nce(g("qg"), g("kl"), g("gl"));
        let got = out[1 + l].1.to_f32().iter().next().copied().unwrap() as f64;
        assert!(
            (got - level).abs() < 1e-5 * level.max(1.0),
            "level {l}: {got} vs {level}"
        );
        want += w * level;
    }
    let got = out[0].1.to_f32().iter().next().copied().unwrap() as f64;
    assert!((got - want).abs() < 1e-5 * want.max(1.0), "{got} vs {want}");
}

#[test]
fn detco_momentum_encoder_gets_no_gradient_and_follows_by_ema() {
    let out = check_ema("detco", &ctx(32));
    for level in ["res2", "res3", "res4", "res5"] {
        let v = out[&format!("loss_{level}")]
            .to_f32()
            .iter()
            .next()
            .copied()
            .unwrap();
        assert!(v.is_finite() && v > 0.0, "{level}: {v}");
        for q in ["gg", "ll", "gl"] {
            let next = out[&format!("queue.{level}.{q}.next")].to_f32();
            assert_eq!(next.shape(), &[8, 8]);
        }
    }
    // The local-local and global-local queues receive the same new keys.
    let ll = out["queue.res5.ll.next"].to_f32();
    let gl = out["queue.res5.gl.next"].to_f32();
    for i in 0..4 {
        for j in 0..8 {
            assert_eq!(ll[[i, j]], gl[[i, j]]);
        }
    }
}
