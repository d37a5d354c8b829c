//! LC-loss (Islam et al. 2023, "Self-Supervised Learning with Local Contrastive Loss for
//! Detection and Semantic Segmentation"; its code is unreleased): MoCo-v2 plus a pixel-level
//! InfoNCE between corresponding locations of the two views.
//!
//! MoCo-v2 as in [`super::mocov2`] (query `view0` through the student, key `view1` through the
//! momentum encoder, global InfoNCE against a queue). The local term: a dense head turns each
//! encoder's `c5` map into per-location embeddings; the key map is resampled bilinearly
//! (`GridSample`) at the centres of the query's cells, mapped into the key view through the
//! crop/flip geometry ([`grid_sample_grid`]). For query location `i` the positive is the
//! resampled key at `i`; the negatives are the resampled keys at the other locations `j` of the
//! same image: `L_i = -log(exp(q_i.k_i / T) / sum_j exp(q_i.k_j / T))`. Loss
//! `global + local_weight * mean_i L_i`.
//!
//! Our choices (the paper leaves them open or its code is not public):
//! - Head: DenseCL's dense head (`conv1x1 -> hidden -> ReLU -> conv1x1 -> dim`, no BN) on both
//!   encoders, embeddings L2-normalised per location; the same `hidden_dim`, `dim` as the global
//!   MLP head.
//! - `local_temperature` 0.2 (MoCo-v2's) and `local_weight` 1.0 (the local term *added* to the
//!   existing method, as the paper describes it).
//! - Locations outside the overlap: a query cell whose centre falls outside the key view has no
//!   positive and is left out of the mean; a key location `j` outside the overlap is left out of
//!   every softmax (its logit gets `-1e4`). The host input `lcloss.valid` (`[S*S]`, 1.0 inside)
//!   marks them; an image whose views don't overlap contributes only its global loss.
//! - `GridSample` with `align_corners = 0` and `padding_mode = border` (points between the key
//!   map's outer cell centres and its edge take the edge cells' values).
//! - Host inputs per sample: `lcloss.grid` (`[S, S, 2]`, view 0's cells in view 1's map) and
//!   `lcloss.valid`.
//! - On 32-pixel views `c5` is one cell: the local term is then `log 1 = 0` (the smoke tests
//!   train only the global term; use 64 px or more for a local signal).

use densa_exporter::builder::math::Reduction;
use densa_exporter::{DType, GraphBuilder, Tensor, Value};
use densa_runtime::augment::{grid_sample_grid, FeatureGrid, View, ViewConfig};

use super::densesiam::grid_sample;
use super::mocov2::{contrastive_defaults, moco_views, two_view_inputs, Contrastive, TINY};
use super::ops::{self, ConvHead, MlpHead};
use super::pixpro::C5_STRIDE;
use super::settings::{common, Hyper, Settings};
use super::twin::momentum_twin;
use super::{Family, MethodInfo, Pretext, PretextContext, PretextError};
use crate::backbone::ResNet;
use crate::nn::NormMode;
use crate::train_step::ForwardGraph;

pub static INFO: MethodInfo = MethodInfo {
    name: "lcloss",
    title: "Self-Supervised Learning with Local Contrastive Loss for Detection and Semantic Segmentation",
    paper: "Islam, Lundell, Sawhney, Sinha, Morales, Radke; WACV 2023 (code unreleased)",
    summary: "MoCo-v2 + InfoNCE between corresponding locations of the two views",
    hyper,
    create,
    tiny: TINY,
    family: Family::Backbone,
};

/// Host input names: the query cells in the key map, and which of them lie in the key view.
pub const GRID: &str = "lcloss.grid";
pub const VALID: &str = "lcloss.valid";

/// The logit given to key locations outside the overlap (out of every softmax).
const MASKED_LOGIT: f32 = -1e4;

fn hyper() -> Vec<Hyper> {
    let mut h = common("sgd", 0.03, 256, 1e-4);
    h.push(super::settings::batch_norm());
    h.extend(contrastive_defaults());
    h.extend([
        Hyper::float("local_temperature", 0.2, "temperature of the local InfoNCE"),
        Hyper::float("local_weight", 1.0, "weight of the local loss"),
    ]);
    h
}

fn create(settings: Settings) -> Result<Box<dyn Pretext>, PretextError> {
    Ok(Box::new(LcLoss { settings }))
}

/// The LC-loss method.
pub struct LcLoss {
    settings: Settings,
}

/// The local InfoNCE: query embeddings `q` (`[N, D, H, W]`) against the key map `k`
/// (`[N, D, Hk, Wk]`) resampled at `grid` (`[N, H, W, 2]`, query cell -> key map), both
/// L2-normalised per location; positive of location `i` the key at `i`, negatives the keys at
/// the image's other locations; locations with `valid = 0` (`[N, H*W]`) are left out as queries
/// and as keys. Mean over the valid queries of the batch (0 when there are none).
///
/// # Shapes
/// mean `[1]`.
pub fn local_info_nce(
    b: &mut GraphBuilder,
    q: &Value,
    k: &Value,
    grid: &Value,
    valid: &Value,
    t: f64,
) -> Result<ops::MaskedMean, PretextError> {
    let dq = ops::dims(b, q)?;
    let (n, cells) = (dq[0], dq[2] * dq[3]);
    let ks = grid_sample(b, k, grid)?;
    let ks = ops::flatten_cells(b, &ks)?;
    let kn = ops::l2_normalize(b, &ks, 1)?;
    let qf = ops::flatten_cells(b, q)?;
    let qn = ops::l2_normalize(b, &qf, 1)?;
    let qt = ops::transpose(b, &qn, &[0, 2, 1])?;
    let logits = ops::matmul(b, &qt, &kn)?; // [N, S, S]: query i, key j
    let inv_t = b.const_f32((1.0 / t) as f32);
    let logits = b.mul(&logits, &inv_t)?;
    // Keys outside the overlap: (valid - 1) * 1e4 added to their column.
    let one = b.const_f32(1.0);
    let off = b.sub(valid, &one)?;
    let big = b.const_f32(-MASKED_LOGIT);
    let bias = b.mul(&off, &big)?;
    let bias = b.reshape(&bias, &[n as i64, 1, cells as i64])?;
    let logits = b.add(&logits, &bias)?;
    // -log softmax at the diagonal, as logsumexp - positive logit; the logsumexp subtracts the
    // row maximum (tract's LogSoftmax returns -inf for the masked logits, and an image with no
    // valid location must stay finite).
    let max = b.reduce(Reduction::Max, &logits, &[2], true)?;
    let shifted = b.sub(&logits, &max)?;
    let e = b.unary("Exp", &shifted);
    let sum = b.reduce_sum(&e, &[2], true)?;
    let log_sum = b.unary("Log", &sum);
    let lse = b.add(&log_sum, &max)?;
    let eye = ops::host_tensor(
        &[cells, cells],
        (0..cells * cells)
            .map(|x| if x / cells == x % cells { 1.0 } else { 0.0 })
            .collect(),
    );
    let eye = b.constant(eye);
    let diag = b.mul(&logits, &eye)?;
    let positive = b.reduce_sum(&diag, &[2], true)?;
    let ce = b.sub(&lse, &positive)?;
    let ce = b.reshape(&ce, &[n as i64, cells as i64])?;
    let picked = b.mul(&ce, valid)?;
    let total = b.reduce_sum(&picked, &[0, 1], true)?;
    let count = b.reduce_sum(valid, &[0, 1], true)?;
    let mut m = ops::masked_mean(b, &total, &count)?;
    m.mean = b.reshape(&m.mean, &[1])?;
    Ok(m)
}

impl Pretext for LcLoss {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn views(&self, image_size: u32) -> Vec<ViewConfig> {
        moco_views(image_size)
    }

    fn host_inputs(
        &self,
        ctx: &PretextContext,
        views: &[View],
    ) -> Result<Vec<(String, Tensor)>, PretextError> {
        let [a, b] = views else {
            return Err(PretextError::Invalid {
                method: "lcloss".into(),
                problem: format!("expected 2 views, got {}", views.len()),
            });
        };
        let s = ctx.image_size;
        for v in [a, b] {
            if v.geometry.out_size != (s, s) {
                return Err(PretextError::Invalid {
                    method: "lcloss".into(),
                    problem: format!(
                        "view of {:?} pixels, the graph expects {s}x{s}",
                        v.geometry.out_size
                    ),
                });
            }
        }
        let grid = FeatureGrid::of_view((s, s), C5_STRIDE);
        let (g, valid) = grid_sample_grid(&a.geometry, grid, &b.geometry, grid);
        Ok(vec![
            (GRID.to_string(), Tensor::F32(g.into_dyn())),
            (
                VALID.to_string(),
                ops::host_tensor(
                    &[grid.len()],
                    valid.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect(),
                ),
            ),
        ])
    }

    fn build(&self, ctx: &PretextContext) -> Result<ForwardGraph, PretextError> {
        let s = &self.settings;
        let c = Contrastive::read(s, ctx.batch)?;
        let (t, m) = (c.temperature, c.momentum);
        let t_local = s.checked("local_temperature", |v| v > 0.0, "must be positive")?;
        let weight = s.checked("local_weight", |v| v >= 0.0, "must be >= 0")?;
        let (k_size, hidden, dim) = (c.queue_size, c.hidden_dim, c.dim);
        let mut b = GraphBuilder::new("lcloss", ctx.seed);
        let [v0, v1] = two_view_inputs(&mut b, ctx)?;
        let grid = FeatureGrid::of_view((ctx.image_size, ctx.image_size), C5_STRIDE);
        let g = b.input(
            GRID,
            DType::F32,
            vec![
                ctx.batch.into(),
                grid.height.into(),
                grid.width.into(),
                2.into(),
            ],
        )?;
        let valid = b.input(VALID, DType::F32, vec![ctx.batch.into(), grid.len().into()])?;
        let c5 = ctx.arch.out_channels()[3];
        type Encoder = (ResNet, MlpHead, ConvHead);
        let twin = momentum_twin(&mut b, m, |b| -> Result<Encoder, PretextError> {
            Ok((
                ctx.arch.init(b)?,
                MlpHead::init(b, "head.global", c5, hidden, dim)?,
                ConvHead::init(b, "head.local", c5, hidden, dim, false)?,
            ))
        })?;
        let queue = ops::queue(&mut b, "queue.global", k_size, dim)?;
        let mut mode = self.settings.norm_mode()?;
        let encode = |b: &mut GraphBuilder,
                      (net, mlp, local): &Encoder,
                      x: &Value,
                      mode: &mut NormMode|
         -> Result<(Value, Value), PretextError> {
            let f = net.forward_mode(b, x, mode)?;
            let d = ops::dims(b, &f.c5)?;
            if (d[2], d[3]) != (grid.height, grid.width) {
                return Err(PretextError::Invalid {
                    method: "lcloss".into(),
                    problem: format!(
                        "c5 is {}x{}, the correspondence assumes {}x{} (stride {C5_STRIDE})",
                        d[2], d[3], grid.height, grid.width
                    ),
                });
            }
            let p = ops::pool(b, &f.c5)?;
            let z = mlp.forward(b, &p)?;
            let global = ops::l2_normalize(b, &z, 1)?;
            let dense = local.forward(b, &f.c5, mode)?;
            Ok((global, dense))
        };
        let (q, q_dense) = encode(&mut b, &twin.student, &v0, &mut mode)?;
        let (k, k_dense) = encode(&mut b, &twin.teacher, &v1, &mut mode)?;
        let global = ops::info_nce(&mut b, &q, &k, &queue, t)?;
        let ops::MaskedMean {
            mean: local,
            count,
            denominator,
        } = local_info_nce(&mut b, &q_dense, &k_dense, &g, &valid, t_local)?;
        let w = b.const_f32(weight as f32);
        let weighted = b.mul(&local, &w)?;
        let loss = b.add(&global, &weighted)?;
        let mut state = mode.into_state();
        ops::enqueue(&mut b, &queue, &k, &mut state)?;
        state.extend(twin.ema);
        Ok(ForwardGraph::new(b, loss)
            .metric("loss_global", global)
            .metric("loss_local", local)
            .norm_state(state)
            .global_mean(&count, &denominator, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ndarray::ArrayD;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use densa_runtime::augment::ViewGeometry;
    use densa_runtime::backend::tract::TractBackend;
    use densa_runtime::backend::Backend;
    use densa_runtime::train::InputRole;

    use super::*;
    use crate::pretext::densesiam::tests::bilinear;
    use crate::pretext::pixpro::tests::{
        artifact, check_ema, ctx, original_of, random, random_geometry, run_graph, run_step, view,
    };

    #[test]
    fn correspondence_grid_equals_brute_force_in_original_coordinates() {
        let m = crate::pretext::create("lcloss", &[]).unwrap();
        let c = PretextContext {
            image_size: 96,
            ..ctx()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let (mut inside, mut outside) = (0, 0);
        for case in 0..60 {
            let image = (rng.random_range(100..400), rng.random_range(100..400));
            let a = random_geometry(&mut rng, image, 96);
            let b = random_geometry(&mut rng, image, 96);
            let host = m.host_inputs(&c, &[view(a), view(b)]).unwrap();
            assert_eq!((host[0].0.as_str(), host[1].0.as_str()), (GRID, VALID));
            let (g, valid) = (host[0].1.to_f32(), host[1].1.to_f32());
            assert_eq!((g.shape(), valid.shape()), (&[3, 3, 2][..], &[9][..]));
            for i in 0..3 {
                for j in 0..3 {
                    // View 0's cell centre in the original image.
                    let p = original_of(&a, (j as f64 + 0.5) * 32.0, (i as f64 + 0.5) * 32.0);
                    // The grid's point of view 1's map (align_corners = 0: -1..1 spans 96 px).
                    let u = (g[[i, j, 0]] as f64 + 1.0) / 2.0 * 96.0;
                    let v = (g[[i, j, 1]] as f64 + 1.0) / 2.0 * 96.0;
                    let back = original_of(&b, u, v);
                    assert!(
                        (p.0 - back.0).abs() < 1e-2 && (p.1 - back.1).abs() < 1e-2,
                        "case {case} ({i}, {j}): {p:?} vs {back:?}"
                    );
                    let c = b.crop;
                    let seen = p.0 >= c.x0 as f64
                        && p.0 < c.x1 as f64
                        && p.1 >= c.y0 as f64
                        && p.1 < c.y1 as f64;
                    // Only centres within rounding of the crop's edge may disagree.
                    let edge = [c.x0, c.x1].iter().any(|&e| (p.0 - e as f64).abs() < 1e-3)
                        || [c.y0, c.y1].iter().any(|&e| (p.1 - e as f64).abs() < 1e-3);
                    if !edge {
                        assert_eq!(valid[[i * 3 + j]], if seen { 1.0 } else { 0.0 });
                    }
                    if seen {
                        inside += 1;
                    } else {
                        outside += 1;
                    }
                }
            }
        }
        assert!(
            inside > 100 && outside > 20,
            "{inside} inside, {outside} outside"
        );
        // Views of another size than the graph's are refused, with the sizes.
        let small = ViewGeometry::identity((48, 48));
        let e = m
            .host_inputs(&c, &[view(small), view(small)])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("(48, 48)") && e.contains("96x96"), "{e}");
    }

    #[test]
    fn local_loss_equals_a_direct_computation() {
        let (n, d, h, hk, t) = (2usize, 3usize, 2usize, 3usize, 0.2f64);
        let s = h * h;
        let mut b = GraphBuilder::new("t", 0);
        let q = b
            .input(
                "q",
                DType::F32,
                vec![n.into(), d.into(), h.into(), h.into()],
            )
            .unwrap();
        let k = b
            .input(
                "k",
                DType::F32,
                vec![n.into(), d.into(), hk.into(), hk.into()],
            )
            .unwrap();
        let g = b
            .input(
                "g",
                DType::F32,
                vec![n.into(), h.into(), h.into(), 2.into()],
            )
            .unwrap();
        let valid = b
            .input("valid", DType::F32, vec![n.into(), s.into()])
            .unwrap();
        let loss = local_info_nce(&mut b, &q, &k, &g, &valid, t).unwrap().mean;
        b.output(&loss, "loss").unwrap();
        let (qv, kv) = (random(&[n, d, h, h], 70), random(&[n, d, hk, hk], 71));
        let gv = random(&[n, h, h, 2], 72).mapv(|v| v * 1.2);
        // Image 0: location 2 outside the overlap; image 1: all inside.
        let vv = ArrayD::from_shape_vec(vec![n, s], vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
            .unwrap();
        let out = run_graph(
            b,
            vec![
                ("q", Tensor::F32(qv.clone())),
                ("k", Tensor::F32(kv.clone())),
                ("g", Tensor::F32(gv.clone())),
                ("valid", Tensor::F32(vv.clone())),
            ],
        );
        let unit = |v: Vec<f64>| {
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.into_iter().map(|x| x / norm).collect::<Vec<f64>>()
        };
        let (mut want, mut count) = (0.0, 0.0);
        for bi in 0..n {
            let qs: Vec<Vec<f64>> = (0..s)
                .map(|l| unit((0..d).map(|c| qv[[bi, c, l / h, l % h]] as f64).collect()))
                .collect();
            let ks: Vec<Vec<f64>> = (0..s)
                .map(|l| {
                    let (gx, gy) = (gv[[bi, l / h, l % h, 0]], gv[[bi, l / h, l % h, 1]]);
                    unit((0..d).map(|c| bilinear(&kv, bi, c, gx, gy)).collect())
                })
                .collect();
            for i in (0..s).filter(|&i| vv[[bi, i]] == 1.0) {
                let logit =
                    |j: usize| qs[i].iter().zip(&ks[j]).map(|(a, b)| a * b).sum::<f64>() / t;
                let lse = (0..s)
                    .filter(|&j| vv[[bi, j]] == 1.0)
                    .map(|j| logit(j).exp())
                    .sum::<f64>()
                    .ln();
                want += lse - logit(i);
                count += 1.0;
            }
        }
        want /= count;
        let got = out["loss"].to_f32().iter().next().copied().unwrap() as f64;
        assert!(
            (got - want).abs() < 1e-5 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }

    #[test]
    fn momentum_encoder_follows_by_ema_and_the_losses_add_up() {
        let a = artifact("lcloss", &[("lr", "0.5")]);
        let c = ctx();
        let mut host = HashMap::new();
        host.insert(
            GRID.to_string(),
            Tensor::F32(ArrayD::zeros(vec![c.batch, 1, 1, 2])),
        );
        host.insert(
            VALID.to_string(),
            Tensor::F32(ArrayD::from_elem(vec![c.batch, 1], 1.0)),
        );
        let (inputs, out) = run_step(&a, &host);
        assert!(check_ema(&a, &inputs, &out) > 20);
        // The total is global + local_weight * local (weight 1); one cell: the local term is 0.
        let scalar = |k: &str| out[k].to_f32().iter().next().copied().unwrap();
        let (loss, global, local) = (scalar("loss"), scalar("loss_global"), scalar("loss_local"));
        assert!(loss.is_finite() && global > 0.0, "{loss} {global}");
        assert!(
            (loss - (global + local)).abs() < 1e-6,
            "{loss} {global} {local}"
        );
        assert!(local.abs() < 1e-6, "{local}");
    }

    #[test]
    fn the_local_head_trains_on_views_with_several_cells() {
        // 64-pixel views: c5 is 2x2, so the local term has negatives and a gradient.
        let c = PretextContext {
            image_size: 64,
            batch: 2,
            ..ctx()
        };
        let overrides: Vec<(String, String)> = TINY
            .iter()
            .chain(&[("lr", "0.5")])
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let m = crate::pretext::create("lcloss", &overrides).unwrap();
        let a = crate::train_step::train_step_artifact(
            m.build(&c).unwrap(),
            None,
            &crate::train_step::TrainStepConfig::new(m.optimizer(c.batch).unwrap()),
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let mut host: HashMap<String, Vec<ArrayD<f32>>> = HashMap::new();
        for _ in 0..c.batch {
            // Two large crops of one image: they overlap.
            let g0 = ViewGeometry {
                crop: densa_runtime::augment::CropBox::new(0.0, 0.0, 90.0, 90.0),
                flipped: false,
                out_size: (64, 64),
                image_size: (100, 100),
            };
            let g1 = random_geometry(&mut rng, (100, 100), 64);
            for (k, t) in m.host_inputs(&c, &[view(g0), view(g1)]).unwrap() {
                host.entry(k).or_default().push(t.to_f32());
            }
        }
        let mut feed = Vec::new();
        for (k, e) in a.manifest().inputs.iter().enumerate() {
            let t = match e.role {
                InputRole::Batch if e.name.starts_with("view") => {
                    Tensor::F32(random(&[c.batch, 3, 64, 64], k as u64))
                }
                InputRole::Batch => {
                    let views: Vec<_> = host[&e.name].iter().map(|t| t.view()).collect();
                    Tensor::F32(ndarray::stack(ndarray::Axis(0), &views).unwrap())
                }
                InputRole::Hyper => Tensor::F64(ArrayD::from_elem(vec![], e.default.unwrap())),
                _ => a.state().get(&e.name).unwrap().clone(),
            };
            feed.push((e.name.clone(), t));
        }
        let inputs: HashMap<String, Tensor> = feed.iter().cloned().collect();
        let out: HashMap<String, Tensor> = TractBackend::new()
            .load_model(a.graph(), "step")
            .unwrap()
            .run(feed)
            .unwrap()
            .into_iter()
            .collect();
        let local = out["loss_local"].to_f32().iter().next().copied().unwrap();
        assert!(local.is_finite() && local > 0.0, "local loss {local}");
        // Only the local term reaches the local head: it moved, so the term trains.
        let name = "head.local.0.weight";
        assert_ne!(inputs[name].to_f32(), out[&format!("{name}.next")].to_f32());
    }
}
