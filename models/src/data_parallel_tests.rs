//! Data-parallel training equals one process with the N-times batch: ranks as threads
//! ([`LocalGroup`]), tract, a tiny convolutional classifier (see
//! `densa_runtime::train::distributed` for what is and isn't equivalent).

use std::sync::Arc;

use densa_exporter::weights::StateDict;
use densa_exporter::{DType, GraphBuilder, Tensor, Value};
use densa_runtime::backend::tract::TractBackend;
use densa_runtime::train::{
    Artifact, Batch, Communicator, DataError, Defaults, Length, LocalGroup, Samples, Shuffled,
    TrainOptions, Trainer,
};
use ndarray::ArrayD;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::nn::{BatchNorm2dConfig, Conv2d, Conv2dConfig, NormMode};
use crate::train_step::{
    cross_entropy, train_step_artifact, ForwardGraph, OptimizerConfig, TrainStepConfig,
};

/// Random 3x8x8 images whose label is the index mod 4, with per-sample noise from the
/// sample's generator (so sharding must hand each rank the right generators too).
struct Noisy(usize);

impl Samples for Noisy {
    fn len(&self) -> usize {
        self.0
    }
    fn sample(&mut self, index: usize, rng: &mut ChaCha8Rng) -> Result<Batch, DataError> {
        let label = (index % 4) as i64;
        let img: Vec<f32> = (0..3 * 8 * 8)
            .map(|k| ((k * (label as usize + 1)) % 7) as f32 * 0.1 + rng.random::<f32>() * 0.5)
            .collect();
        Ok(vec![
            (
                "images".into(),
                Tensor::F32(ArrayD::from_shape_vec(vec![3, 8, 8], img).unwrap()),
            ),
            (
                "labels".into(),
                Tensor::I64(ArrayD::from_elem(vec![], label)),
            ),
        ])
    }
}

/// The tiny network's input `images` (`[n, 3, 8, 8]`) and its layers: `conv` (3 -> 6, 3x3)
/// and `head` (6 -> 4, 1x1).
fn tiny_layers(b: &mut GraphBuilder, n: densa_exporter::Dim) -> (Value, Conv2d, Conv2d) {
    let x = b
        .input("images", DType::F32, vec![n, 3.into(), 8.into(), 8.into()])
        .unwrap();
    let conv = Conv2dConfig::new(3, 6, 3)
        .padding(1)
        .init(b, "conv")
        .unwrap();
    let head = Conv2dConfig::new(6, 4, 1).init(b, "head").unwrap();
    (x, conv, head)
}

/// AdamW with gradient clipping: an update that is not linear in the gradient, so only
/// averaging the gradients (not the updated parameters) reproduces the doubled batch.
fn artifact(batch_norm: bool) -> Artifact {
    build_artifact(batch_norm, None, None)
}

/// With `queue: Some(batch)` (a graph built for that batch, as pretext artifacts are): MoCo's
/// structure in miniature. The normalised logits (stop-gradient) are the step's keys, enqueued
/// into a 16-row `queue` buffer; the loss has the queue's similarities as extra negative
/// classes, so it depends on what earlier steps enqueued.
///
/// With `center: Some(name)`: DINO's centring in miniature. The logits minus a `[1, 4]`
/// buffer `name` enter the loss; the buffer's next value is `0.9 c + 0.1 mean(logits)` over
/// the batch, so later losses depend on every earlier batch's mean.
fn build_artifact(batch_norm: bool, queue: Option<usize>, center: Option<&str>) -> Artifact {
    let mut b = GraphBuilder::new("tiny", 3);
    let n = queue.map_or(densa_exporter::Dim::from("N"), |n| n.into());
    let (x, conv, head) = tiny_layers(&mut b, n.clone());
    let mut mode = NormMode::train();
    let mut h = conv.forward(&mut b, &x).unwrap();
    if batch_norm {
        let bn = BatchNorm2dConfig::new(6).init(&mut b, "bn").unwrap();
        h = bn.forward_mode(&mut b, &h, &mut mode).unwrap();
    }
    let h = b.relu(&h);
    let h = head.forward(&mut b, &h).unwrap();
    let h = b.global_avg_pool(&h).unwrap();
    let logits = b.flatten(&h, 1);
    let labels = b.input("labels", DType::I64, vec![n]).unwrap();
    let mut state = mode.into_state();
    let logits = match center {
        Some(name) => {
            let c = b
                .param(
                    name,
                    &[1, 4],
                    densa_exporter::Init::Zeros,
                    densa_exporter::ParamKind::Buffer,
                )
                .unwrap();
            let centred = b.sub(&logits, &c).unwrap();
            let next = crate::pretext::scfs::center_update(&mut b, &c, &logits, 0.9).unwrap();
            state.update(c.name(), next);
            centred
        }
        None => logits,
    };
    let mut stopped = None;
    let logits = if queue.is_some() {
        use crate::pretext::ops;
        let q = ops::queue(&mut b, "queue", 16, 4).unwrap();
        let keys = ops::l2_normalize(&mut b, &logits, 1).unwrap();
        let qt = ops::transpose(&mut b, &q, &[1, 0]).unwrap();
        let sims = ops::matmul(&mut b, &logits, &qt).unwrap();
        ops::enqueue(&mut b, &q, &keys, &mut state).unwrap();
        stopped = Some(keys);
        b.concat(&[&logits, &sims], 1).unwrap()
    } else {
        logits
    };
    let loss = cross_entropy(&mut b, &logits, &labels).unwrap();
    let mut forward = ForwardGraph::new(b, loss).norm_state(state);
    if let Some(keys) = &stopped {
        forward = forward.stop_gradient(keys);
    }
    let mut config = TrainStepConfig::new(OptimizerConfig::adamw(0.02, 0.01));
    config.clip = Some(densa_exporter::train::clip::ClipConfig {
        max_norm: 0.5,
        ..Default::default()
    });
    config.data_parallel = true;
    train_step_artifact(forward, None, &config).unwrap()
}

fn options(dir: &std::path::Path, steps: u64) -> TrainOptions {
    let mut o = TrainOptions::new(dir);
    o.length = Length::Steps(steps);
    o.checkpoint_every = 0;
    o.progress = false;
    o.plot = false;
    o.handle_ctrl_c = false;
    o.seed = 5;
    o
}

fn one_process(artifact: &Artifact, batch: usize, steps: u64) -> StateDict {
    let dir = tempfile::tempdir().unwrap();
    let data = Shuffled::new(Noisy(40), batch).unwrap();
    let mut t = Trainer::new(
        artifact.clone(),
        &TractBackend,
        data,
        Defaults,
        options(dir.path(), steps),
    )
    .unwrap();
    t.run().unwrap();
    t.state()
}

fn ranks(artifact: &Artifact, n: usize, batch: usize, steps: u64) -> Vec<StateDict> {
    let dir = tempfile::tempdir().unwrap();
    let handles: Vec<_> = LocalGroup::new(n)
        .into_iter()
        .map(|comm| {
            let artifact = artifact.clone();
            let out = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let rank = comm.rank();
                let data = Shuffled::new(Noisy(40), batch)
                    .unwrap()
                    .shard(rank, n)
                    .unwrap();
                let comm: Arc<dyn Communicator> = Arc::new(comm);
                let mut t = Trainer::new(
                    artifact,
                    &TractBackend,
                    data,
                    Defaults,
                    options(&out, steps),
                )
                .unwrap()
                .data_parallel(&TractBackend, comm)
                .unwrap();
                let summary = t.run().unwrap();
                assert_eq!(
                    summary.checkpoint.is_some(),
                    rank == 0,
                    "only rank 0 writes"
                );
                t.state()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn max_diff(a: &StateDict, b: &StateDict, prefix: &str) -> f32 {
    let mut worst = 0.0f32;
    for (name, t) in a.iter() {
        if !name.starts_with(prefix) {
            continue;
        }
        let (x, y) = (t.to_f32(), b.get(name).unwrap().to_f32());
        for (p, q) in x.iter().zip(y.iter()) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

#[test]
fn two_ranks_of_batch_4_train_like_one_process_of_batch_8() {
    let artifact = artifact(false);
    let reference = one_process(&artifact, 8, 6);
    let dp = ranks(&artifact, 2, 4, 6);
    // Parameters and AdamW's slots agree to float summation order...
    for state in &dp {
        let d = max_diff(&reference, state, "");
        assert!(d < 2e-6, "data parallel vs doubled batch: max |diff| {d}");
    }
    // ...and the ranks agree exactly with each other.
    assert_eq!(max_diff(&dp[0], &dp[1], ""), 0.0);
    // The check can fail: one process with the single batch trains elsewhere.
    let single = one_process(&artifact, 4, 6);
    let d = max_diff(&reference, &single, "conv");
    assert!(d > 1e-3, "batch 4 vs 8 differ by only {d}");
}

/// A queue of keys (MoCo, DenseCL): each rank's keys are gathered and enqueued in rank order,
/// so the queue, and with it every later loss, is the doubled batch's.
#[test]
fn queues_gather_every_ranks_keys() {
    let (whole, shard) = (
        build_artifact(false, Some(8), None),
        build_artifact(false, Some(4), None),
    );
    let reference = one_process(&whole, 8, 5);
    let dp = ranks(&shard, 2, 4, 5);
    assert_eq!(max_diff(&dp[0], &dp[1], ""), 0.0);
    let init = whole.state();
    assert_eq!(max_diff(init, shard.state(), ""), 0.0, "same initial state");
    let moved = max_diff(&reference, init, "queue");
    assert!(moved > 0.1, "the queue did not change ({moved})");
    for state in &dp {
        let q = max_diff(&reference, state, "queue");
        assert!(q < 2e-6, "queue: data parallel vs doubled batch {q}");
        let d = max_diff(&reference, state, "");
        assert!(d < 2e-6, "data parallel vs doubled batch: max |diff| {d}");
    }
}

/// A centre (DINO, SCFS: `center.*`): each rank's update is averaged, which is DINO's
/// all-reduce of the batch centre, so the centre and every later loss are the doubled
/// batch's. The same buffer under a name the trainer does not average keeps each rank's own
/// update, and the ranks drift apart: the check can fail.
#[test]
fn centres_are_averaged_across_ranks() {
    let artifact = build_artifact(false, None, Some("center.logits"));
    let reference = one_process(&artifact, 8, 5);
    let dp = ranks(&artifact, 2, 4, 5);
    assert_eq!(max_diff(&dp[0], &dp[1], ""), 0.0);
    let moved = max_diff(&reference, artifact.state(), "center");
    assert!(moved > 0.01, "the centre did not move ({moved})");
    for state in &dp {
        let c = max_diff(&reference, state, "center");
        assert!(c < 2e-6, "centre: data parallel vs doubled batch {c}");
        let d = max_diff(&reference, state, "");
        assert!(d < 2e-6, "data parallel vs doubled batch: max |diff| {d}");
    }
    let local = build_artifact(false, None, Some("centroid"));
    let reference = one_process(&local, 8, 5);
    let dp = ranks(&local, 2, 4, 5);
    let apart = max_diff(&dp[0], &dp[1], "centroid");
    let off = max_diff(&reference, &dp[0], "centroid");
    // 50x the tolerance above (the shards' means are close: balanced labels).
    assert!(
        apart > 1e-4 && off > 1e-4,
        "rank-local centres should differ from each other ({apart}) and from the doubled \
         batch's ({off})"
    );
}

#[test]
fn with_batch_norm_the_running_mean_is_exact_the_weights_are_not() {
    // Per-shard batch statistics (no SyncBatchNorm): documented, not hidden. After one step
    // the averaged running mean is the doubled batch's (the mean of equal shards' means), the
    // gradient and so the weights are not.
    let artifact = artifact(true);
    let reference = one_process(&artifact, 8, 1);
    let dp = ranks(&artifact, 2, 4, 1);
    assert_eq!(max_diff(&dp[0], &dp[1], ""), 0.0);
    let weights = max_diff(&reference, &dp[0], "conv.weight");
    assert!(
        weights > 1e-5,
        "per-shard statistics should change the gradient ({weights})"
    );
    let mean = max_diff(&reference, &dp[0], "bn.running_mean");
    assert!(mean < 1e-6, "averaged running means differ by {mean}");
}

/// PixPro (batch norm, EMA teacher, a host-computed mask): the gradient and update graphs run
/// by the split engine on one rank compute what the fused step computes.
#[test]
fn pixpro_split_engine_on_one_rank_matches_the_fused_step() {
    split_engine_matches_the_fused_step("pixpro", &[("hidden_dim", "16"), ("dim", "8")], 2, 1e-6);
}

/// SwAV (multi-crop, batch norm, a queue of one batch, full after the first step and used from
/// the second): on one rank the split engine cuts the gradient graph before the codes and
/// computes Sinkhorn on the host (in f64, the graph in f32). After one step the state agrees
/// to 1e-6 relative (the two Sinkhorns round differently); later states part faster than the
/// losses (batch norm over 2 images turns 1e-7 in the parameters into 1e-4 in the next
/// gradient), so steps 2-4, which use the queue, are compared by their losses.
#[test]
fn swav_split_engine_with_host_sinkhorn_matches_the_fused_step() {
    let mut settings = crate::pretext::swav::TINY.to_vec();
    settings.push(("queue_length", "2"));
    split_engine_matches_the_fused_step("swav", &settings, 4, 5e-6);
}

/// `method` trained for `steps` steps of batch 2 by the fused step and by the split engine on
/// one rank: the state after the first step agrees within `tolerance` (relative, and moved),
/// every step's loss within 10 x `tolerance` (relative).
fn split_engine_matches_the_fused_step(
    method: &str,
    overrides: &[(&str, &str)],
    steps: u64,
    tolerance: f32,
) {
    use densa_runtime::train::SingleProcess;

    use crate::pretext::data::{image_files, PretextSamples};
    use crate::pretext::{self, PretextContext};

    let dir = pretext_images(4, (48, 48));
    let overrides: Vec<(String, String)> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let method: Arc<dyn pretext::Pretext> = Arc::from(pretext::create(method, &overrides).unwrap());
    let ctx = PretextContext {
        arch: crate::Arch::Edge.config(),
        batch: 2,
        image_size: 32,
        seed: 0,
    };
    let mut config = TrainStepConfig::new(method.optimizer(2).unwrap());
    config.data_parallel = true;
    let artifact = train_step_artifact(method.build(&ctx).unwrap(), None, &config).unwrap();
    // The state after the first step and every step's loss.
    let run = |split: bool| -> (StateDict, Vec<f64>) {
        let out = tempfile::tempdir().unwrap();
        let files = image_files(dir.path()).unwrap();
        let (samples, _) = PretextSamples::new(files, method.clone(), ctx.clone());
        let data = Shuffled::new(samples, 2).unwrap();
        let m = method.clone();
        let t = Trainer::new(
            artifact.clone(),
            &TractBackend,
            data,
            move |step: u64| m.schedule(step, steps),
            options(out.path(), steps),
        )
        .unwrap();
        let mut t = if split {
            t.split_engine(&TractBackend, Arc::new(SingleProcess))
                .unwrap()
        } else {
            t
        };
        let mut first = None;
        let mut losses = Vec::new();
        for _ in 0..steps {
            losses.push(t.step().unwrap().loss.expect("a finite loss"));
            first.get_or_insert_with(|| t.state());
        }
        (first.unwrap(), losses)
    };
    let ((fused, fused_losses), (split, split_losses)) = (run(false), run(true));
    let moved = max_diff(&fused, artifact.state(), "");
    let d = relative_diff(&fused, &split);
    assert!(moved > 1e-4, "the first step changed nothing ({moved})");
    assert!(
        d < tolerance,
        "split engine vs fused step: max relative diff {d} after one step (it moved {moved})"
    );
    for (step, (a, b)) in fused_losses.iter().zip(&split_losses).enumerate() {
        let rel = (a - b).abs() / a.abs().max(1.0);
        assert!(
            rel < 10.0 * f64::from(tolerance),
            "step {}: loss {a} fused, {b} split",
            step + 1
        );
    }
}

/// `n` small distinct RGB images of `width x height` in a temporary folder.
fn pretext_images(n: u32, (width, height): (u32, u32)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([
                (x * 5 + i * 40) as u8,
                (y * 5 + i * 3) as u8,
                ((x + y) * 3 + i * 7) as u8,
            ])
        });
        img.save(dir.path().join(format!("{i}.png"))).unwrap();
    }
    dir
}

/// A real method (augmented views, host inputs, for PixPro the EMA teacher with its momentum
/// ramp and LARS) with `settings`, trained `steps` steps: one process of batch 4, and 2 ranks
/// of batch 2 (threads). Returns the largest difference between the one process and rank 0,
/// and how far the one process moved.
fn two_ranks_vs_doubled_batch(
    method: &str,
    settings: &[(&str, &str)],
    images: (u32, u32),
    steps: u64,
) -> (f32, f32) {
    use crate::pretext::data::{image_files, PretextSamples};
    use crate::pretext::{self, Pretext, PretextContext};

    let dir = pretext_images(8, images);
    let overrides: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let method: Arc<dyn Pretext> = Arc::from(pretext::create(method, &overrides).unwrap());
    let ctx = |batch| PretextContext {
        arch: crate::Arch::Edge.config(),
        batch,
        image_size: 32,
        seed: 0,
    };
    // The learning rate of the global batch, as `densa pretrain` scales it.
    let mut config = TrainStepConfig::new(method.optimizer(4).unwrap());
    config.data_parallel = true;
    let artifact =
        |batch| train_step_artifact(method.build(&ctx(batch)).unwrap(), None, &config).unwrap();
    let (whole, shard) = (artifact(4), artifact(2));
    assert_eq!(max_diff(whole.state(), shard.state(), ""), 0.0);
    let trainer = |artifact: &Artifact, batch, rank, out: &std::path::Path| {
        let files = image_files(dir.path()).unwrap();
        let (samples, _) = PretextSamples::new(files, method.clone(), ctx(batch));
        let data = Shuffled::new(samples, batch)
            .unwrap()
            .shard(rank, 4 / batch)
            .unwrap();
        let m = method.clone();
        Trainer::new(
            artifact.clone(),
            &TractBackend,
            data,
            move |step: u64| m.schedule(step, steps),
            options(out, steps),
        )
        .unwrap()
    };
    let out = tempfile::tempdir().unwrap();
    let mut one = trainer(&whole, 4, 0, out.path());
    one.run().unwrap();
    let reference = one.state();
    let states: Vec<StateDict> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .map(|comm| {
                let (trainer, shard) = (&trainer, &shard);
                s.spawn(move || {
                    let out = tempfile::tempdir().unwrap();
                    let rank = comm.rank();
                    let comm: Arc<dyn Communicator> = Arc::new(comm);
                    let mut t = trainer(shard, 2, rank, out.path())
                        .data_parallel(&TractBackend, comm)
                        .unwrap();
                    t.run().unwrap();
                    t.state()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(max_diff(&states[0], &states[1], ""), 0.0);
    (
        max_diff(&reference, &states[0], ""),
        max_diff(&reference, whole.state(), ""),
    )
}

/// A dense method trains on 2 ranks like one process with the doubled batch when its batch
/// norms use running statistics (`batch_norm=frozen`): PixPro, 3 steps, within float
/// tolerance. With batch statistics (the papers' setting, no SyncBatchNorm) each rank
/// normalises with its own shard's and the runs part: the check can fail.
#[test]
fn pixpro_with_frozen_batch_norm_trains_like_the_doubled_batch() {
    let pixpro = |batch_norm| {
        let settings = [
            ("hidden_dim", "16"),
            ("dim", "8"),
            ("batch_norm", batch_norm),
        ];
        two_ranks_vs_doubled_batch("pixpro", &settings, (48, 48), 3)
    };
    let (d, moved) = pixpro("frozen");
    assert!(moved > 1e-3, "the steps changed nothing ({moved})");
    assert!(
        d < 1e-5,
        "data parallel vs doubled batch: max |diff| {d} (moved {moved})"
    );
    let (d, _) = pixpro("batch");
    assert!(
        d > 1e-4,
        "per-shard batch statistics gave the doubled batch's run ({d})"
    );
}

/// DenseSiam's region term contrasts each image's regions among themselves (its official
/// code's `einsum('bnc,bmc->bnm')`) and its means over overlapping view pairs count every
/// rank's pairs: with running-statistics batch norm, 2 ranks train like the doubled batch.
/// With the batch's regions as negatives the shards would see other negatives, and with each
/// rank's own count of pairs (2 of the 12 do not overlap here) the runs end 0.03 apart: the
/// check can fail.
#[test]
fn densesiam_with_frozen_batch_norm_trains_like_the_doubled_batch() {
    let mut settings = crate::pretext::densesiam::TINY.to_vec();
    settings.push(("batch_norm", "frozen"));
    // Wide images: crops at either end of one don't overlap, so the shards hold different
    // numbers of valid pairs.
    let (d, moved) = two_ranks_vs_doubled_batch("densesiam", &settings, (160, 40), 3);
    assert!(moved > 1e-3, "the steps changed nothing ({moved})");
    assert!(
        d < 1e-5,
        "data parallel vs doubled batch: max |diff| {d} (moved {moved})"
    );
}

/// The largest `max |a - b| / max(1, max |a|)` over the tensors of `a`.
fn relative_diff(a: &StateDict, b: &StateDict) -> f32 {
    let mut worst = 0.0f32;
    for (name, t) in a.iter() {
        let (x, y) = (t.to_f32(), b.get(name).unwrap().to_f32());
        let scale = x.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let d = x
            .iter()
            .zip(y.iter())
            .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
        worst = worst.max(d / scale);
    }
    worst
}

/// SwAV's loss in miniature, without batch norm: two views of each image (the image and its
/// negative) through the tiny network, scored against 5 normalised prototypes, each view
/// predicting the other's Sinkhorn codes. Built for a fixed `batch` (SwAV's loss slices crops
/// by it). With `host`, the codes are declared for the data-parallel host step; without, each
/// rank's gradient graph keeps its own in-graph Sinkhorn over its shard. With `queue`, each view
/// has SwAV's queue of that many embeddings (used once full).
fn swav_artifact(batch: usize, host: bool, queue: Option<usize>) -> Artifact {
    use crate::pretext::{ops, swav};
    let mut b = GraphBuilder::new("tiny-swav", 3);
    let (x, conv, head) = tiny_layers(&mut b, batch.into());
    // The labels are not used; the data source provides them.
    let _ = b.input("labels", DType::I64, vec![batch.into()]).unwrap();
    let protos = b
        .param(
            "prototypes",
            &[5, 4],
            densa_exporter::Init::KaimingUniformFanIn,
            densa_exporter::ParamKind::Param,
        )
        .unwrap();
    let protos = ops::l2_normalize(&mut b, &protos, 1).unwrap();
    let protos_t = ops::transpose(&mut b, &protos, &[1, 0]).unwrap();
    let negative = b.neg(&x);
    let mut views = Vec::new();
    for v in [&x, &negative] {
        let h = conv.forward(&mut b, v).unwrap();
        let h = b.relu(&h);
        let h = head.forward(&mut b, &h).unwrap();
        let h = b.global_avg_pool(&h).unwrap();
        let z = b.flatten(&h, 1);
        views.push(ops::l2_normalize(&mut b, &z, 1).unwrap());
    }
    let z = b.concat(&[&views[0], &views[1]], 0).unwrap();
    let scores = ops::matmul(&mut b, &z, &protos_t).unwrap();
    let mut state = densa_exporter::train::Fragment::default();
    let mut queues = Vec::new();
    if let Some(length) = queue {
        let one = b.const_f32(1.0);
        let half = b.const_f32(0.5);
        let on = b.greater(&one, &half).unwrap();
        for (i, v) in views.iter().enumerate() {
            let name = format!("queue.{i}");
            let q = swav::crop_queue(&mut b, &name, length, &protos_t, v, &on, &mut state);
            queues.push(q.unwrap());
        }
    }
    let out = swav::swav_loss(&mut b, &scores, batch, 2, &queues, 0.1, 0.05, 3).unwrap();
    let mut forward = ForwardGraph::new(b, out.loss).norm_state(state);
    for d in &out.detached {
        forward = forward.stop_gradient(d);
    }
    if host {
        forward = forward.host_sinkhorn(densa_runtime::train::manifest::SinkhornExchange {
            epsilon: 0.05,
            iterations: 3,
            stages: out.stages,
        });
    }
    let mut config = TrainStepConfig::new(OptimizerConfig::sgd(0.2, 0.9, 0.0));
    config.data_parallel = true;
    train_step_artifact(forward, None, &config).unwrap()
}

/// SwAV's Sinkhorn over the global batch: each rank keeps its scores, the sums are
/// all-reduced (`distributed_sinkhorn`), and 2 ranks of 4 train like one process of 8, with
/// and without a queue (gathered from both ranks, its rows counted once). With each rank's
/// own in-graph Sinkhorn (over its shard) they do not: the check can fail.
#[test]
fn swav_sinkhorn_sums_cross_ranks() {
    for queue in [None, Some(12)] {
        swav_two_ranks_train_like_the_doubled_batch(queue);
    }
}

fn swav_two_ranks_train_like_the_doubled_batch(queue: Option<usize>) {
    let whole = swav_artifact(8, true, queue);
    let shard = swav_artifact(4, true, queue);
    assert_eq!(max_diff(whole.state(), shard.state(), ""), 0.0);
    let entry = shard.data_parallel().unwrap().0;
    assert!(entry.forward_graph.is_some() && entry.host.sinkhorn.is_some());
    let local = swav_artifact(4, false, queue);
    let reference = two_ranks_match_the_doubled_batch(&whole, &shard, &local, "Sinkhorn");
    if queue.is_some() {
        let q = max_diff(&reference, whole.state(), "queue");
        assert!(q > 0.1, "the queue did not fill ({q})");
    }
}

/// 5 steps of one process of 8 on `whole` against 2 ranks of 4 on `shard` (within 2e-6, the
/// ranks equal) and on `local` (the same model with the batch-wide `what` computed per shard:
/// more than 1e-4 away). Returns the one process's state.
fn two_ranks_match_the_doubled_batch(
    whole: &Artifact,
    shard: &Artifact,
    local: &Artifact,
    what: &str,
) -> StateDict {
    let reference = one_process(whole, 8, 5);
    let moved = max_diff(&reference, whole.state(), "");
    assert!(moved > 1e-3, "the steps changed nothing ({moved})");
    let dp = ranks(shard, 2, 4, 5);
    assert_eq!(max_diff(&dp[0], &dp[1], ""), 0.0);
    for state in &dp {
        let d = max_diff(&reference, state, "");
        assert!(d < 2e-6, "data parallel vs doubled batch: max |diff| {d}");
    }
    let apart = ranks(local, 2, 4, 5);
    let d = max_diff(&reference, &apart[0], "");
    assert!(
        d > 1e-4,
        "{what} per shard trains like {what} over the global batch ({d})"
    );
    reference
}

/// A mean over the selected samples of the batch (LC-loss's valid locations, CCOP's valid
/// boxes in miniature): the tiny network's `sum_c (logit_c - 1)^2` averaged over the samples
/// whose label is not 0. With `global`, the count is declared for the data-parallel host step.
fn masked_mean_artifact(global: bool) -> Artifact {
    use crate::pretext::ops;
    let mut b = GraphBuilder::new("tiny-masked", 3);
    let n = densa_exporter::Dim::from("N");
    let (x, conv, head) = tiny_layers(&mut b, n.clone());
    let labels = b.input("labels", DType::I64, vec![n]).unwrap();
    let h = conv.forward(&mut b, &x).unwrap();
    let h = b.relu(&h);
    let h = head.forward(&mut b, &h).unwrap();
    let h = b.global_avg_pool(&h).unwrap();
    let logits = b.flatten(&h, 1);
    let one = b.const_f32(1.0);
    let off = b.sub(&logits, &one).unwrap();
    let sq = b.mul(&off, &off).unwrap();
    let per = b.reduce_sum(&sq, &[1], false).unwrap();
    let lf = b.cast(&labels, DType::F32);
    let half = b.const_f32(0.5);
    let valid = b.greater(&lf, &half).unwrap();
    let valid = b.cast(&valid, DType::F32);
    let picked = b.mul(&per, &valid).unwrap();
    let total = b.reduce_sum(&picked, &[0], false).unwrap();
    let count = b.reduce_sum(&valid, &[0], false).unwrap();
    let m = ops::masked_mean(&mut b, &total, &count).unwrap();
    let loss = b.reshape(&m.mean, &[1]).unwrap();
    let mut forward = ForwardGraph::new(b, loss);
    if global {
        forward = forward.global_mean(&m.count, &m.denominator, 1.0);
    }
    let mut config = TrainStepConfig::new(OptimizerConfig::sgd(0.05, 0.9, 0.0));
    config.data_parallel = true;
    train_step_artifact(forward, None, &config).unwrap()
}

/// Means over the selected samples (LC-loss, CCOP): the ranks' counts are summed between the
/// halves of the gradient graph, so 2 ranks of 4 train like one process of 8 although the
/// shards select different numbers of samples. Each rank's own mean (the mean of the shards'
/// means) trains differently: the check can fail.
#[test]
fn masked_means_count_every_ranks_samples() {
    let artifact = masked_mean_artifact(true);
    assert!(artifact.data_parallel().unwrap().0.forward_graph.is_some());
    let local = masked_mean_artifact(false);
    two_ranks_match_the_doubled_batch(&artifact, &artifact, &local, "the masked mean");
}
