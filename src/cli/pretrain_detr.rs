//! `densa pretrain --method <detector method>` (DetReg, UP-DETR, Pair DETR): pretrains a whole
//! DETR-family detector ([`densa_models::detr`]) without labels, with the method's
//! [`DetrPretext`] supplying the detector, the trainable set and each step's images, targets
//! and extra inputs. Same flags and conventions as the backbone driver ([`super::pretrain`]).
//!
//! The output directory holds `pretrain.json` (the [`RunSpec`]: a resume must match it),
//! `checkpoints/step-NNNNNNNN/` (`state.safetensors`: parameters, buffers and optimizer slots;
//! `progress.json`; written every `--checkpoint-every` steps and at the end, atomically, the
//! newest two kept), `cache/` (the method's per-image work, e.g. DetReg's proposals and
//! embeddings), `train_log.jsonl`, `loss.png`, and at every checkpoint `detr.json` (the
//! [`DetrConfig`]) + `state.safetensors` (the detector's tensors) + `backbone.safetensors`
//! (torchvision names): `densa finetune --task detect --detector detr --init OUT` loads the
//! whole detector, `--detector dense --init OUT` or `densa export backbone` the backbone.
//!
//! Each step: the batch's images (a seeded permutation per epoch, so a resume continues the
//! same order), the method's batch (with a generator seeded by the run's seed and the step),
//! then the split train step with the host matching ([`DetrTrainer`]). AdamW with the
//! method's settings, gradient clipping (`grad_clip`), warmup + cosine learning rate. Ctrl-C
//! finishes the step and checkpoints.
//!
//! Under `mpirun -np N` each rank takes its `--batch` images of the global batch of N x
//! `--batch` (the same permutation on every rank), matches them on its own host (DETR's
//! matching is per image) and the ranks apply one averaged update ([`DetrTrainer::for_ranks`]);
//! the box count that normalises the losses is summed over the ranks first, as DETR's
//! `all_reduce(num_boxes)`. Rank 0 prepares the per-image cache before the others read it,
//! and writes the log, the checkpoints and the detector files. The class loss is a weighted
//! mean over each rank's queries, as in DETR's multi-GPU runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use densa_exporter::train::clip::ClipConfig;
use densa_exporter::weights::{load_safetensors, save_safetensors, StateDict};
use densa_models::detr::pretext::{
    grad_clip, DetrPretext, DetrPretextContext, PrepareContext, SampleImage,
};
use densa_models::detr::train::DetrTrainer;
use densa_models::detr::DetrConfig;
use densa_models::pretext::data::image_files;
use densa_models::pretext::{self, backbone_state};
use densa_models::train_step::TrainStepConfig;
use densa_runtime::data::image::read_rgb;
use densa_runtime::open_backend;
use densa_runtime::train::log::{
    plot_loss, read_records, JsonlLog, StepRecord, LOG_FILE, PLOT_FILE,
};
use densa_runtime::train::{Communicator, WarmupCosine};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::finetune_detr::DETR_CONFIG_FILE;
use super::pretrain::{data_dir, overrides, PretrainArgs, RunSpec, BACKBONE_FILE, SPEC_FILE};

/// The detector's tensors at the top of the output (what `--init OUT` loads).
pub const STATE_FILE: &str = "state.safetensors";
/// Checkpoints inside the output.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The method's per-image caches inside the output.
pub const CACHE_DIR: &str = "cache";
const PROGRESS_FILE: &str = "progress.json";
/// Checkpoints kept.
const KEEP: usize = 2;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The first Ctrl-C stops the run after its step, with a checkpoint; the second quits at once.
fn install_ctrl_c() {
    let installed = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "densa: interrupted: finishing the step, then checkpointing (Ctrl-C again quits now)"
        );
    });
    if let Err(e) = installed {
        eprintln!("densa: warning: Ctrl-C will not checkpoint: {e}");
    }
}

/// Where a run stands, beside each checkpoint's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Progress {
    /// Steps completed.
    step: u64,
    /// Training time so far, seconds.
    elapsed_s: f64,
}

/// The newest checkpoint: its folder and progress.
fn latest_checkpoint(out: &Path) -> Result<Option<(PathBuf, Progress)>> {
    let dir = out.join(CHECKPOINTS_DIR);
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(PathBuf, Progress)> = None;
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = e
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let name = path.file_name().map(|n| n.to_string_lossy().to_string());
        if !name.is_some_and(|n| n.starts_with("step-")) {
            continue;
        }
        let p = path.join(PROGRESS_FILE);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let progress: Progress =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        if best.as_ref().is_none_or(|(_, b)| progress.step > b.step) {
            best = Some((path, progress));
        }
    }
    Ok(best)
}

/// The detector's own tensors of a training state (no optimizer slots).
fn model_state(config: &DetrConfig, state: &StateDict) -> Result<StateDict> {
    let names = config.initial_state(0)?;
    let mut out = StateDict::new();
    for (name, _) in names.iter() {
        let t = state
            .get(name)
            .with_context(|| format!("the training state has no `{name}`"))?;
        out.insert(name.to_string(), t.clone());
    }
    Ok(out)
}

/// Writes a checkpoint (atomically: a temporary folder renamed), keeps the newest [`KEEP`],
/// and refreshes the detector files at the top of `out`.
fn checkpoint(
    out: &Path,
    config: &DetrConfig,
    arch: densa_models::Arch,
    state: &StateDict,
    progress: &Progress,
) -> Result<()> {
    let dir = out.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!("step-{:08}", progress.step);
    let tmp = dir.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    save_safetensors(state, &tmp.join(STATE_FILE))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::write(tmp.join(PROGRESS_FILE), serde_json::to_string(progress)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    let final_dir = dir.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("removing {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming to {}", final_dir.display()))?;
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect();
    steps.sort();
    for old in steps.iter().rev().skip(KEEP) {
        std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
    }
    let write = |path: PathBuf, f: &dyn Fn(&Path) -> Result<()>| -> Result<()> {
        let tmp = path.with_extension("tmp");
        f(&tmp)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
    };
    let model = model_state(config, state)?;
    write(out.join(STATE_FILE), &|p| {
        save_safetensors(&model, p).with_context(|| format!("writing {}", p.display()))
    })?;
    let backbone = backbone_state(&arch.config(), state)?;
    write(out.join(BACKBONE_FILE), &|p| {
        save_safetensors(&backbone, p).with_context(|| format!("writing {}", p.display()))
    })?;
    let text = serde_json::to_string_pretty(config)?;
    write(out.join(DETR_CONFIG_FILE), &|p| {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))
    })
}

/// The permutation of `n` images for `epoch` (Fisher-Yates, ChaCha8 on the epoch's stream).
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

fn bar(total: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{prefix} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// Runs a detector-pretraining method (the method's family is `detector`).
pub fn run(args: PretrainArgs, comm: &Arc<dyn Communicator>) -> Result<()> {
    let (rank, ranks) = (comm.rank(), comm.size());
    let leader = rank == 0;
    let mut method: Box<dyn DetrPretext> =
        pretext::create_detector(&args.method, &overrides(&args)?)?;
    let spec = RunSpec {
        method: args.method.clone(),
        arch: args.arch.name().to_string(),
        batch: args.batch,
        image_size: args.image_size,
        seed: args.seed,
        settings: method
            .settings()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        processes: ranks,
    };
    if args.batch == 0 {
        bail!("--batch 0: a step needs at least one image");
    }
    let ctx = DetrPretextContext {
        arch: args.arch,
        batch: args.batch,
        image_size: args.image_size,
        seed: args.seed,
    };
    let config = method
        .config(&ctx)
        .with_context(|| format!("configuring the {} detector", spec.method))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let spec_path = args.out.join(SPEC_FILE);
    let resume = latest_checkpoint(&args.out)?;
    if resume.is_some() {
        spec.check_resume(&args.out)?;
    } else if leader {
        std::fs::write(&spec_path, serde_json::to_string_pretty(&spec)?)
            .with_context(|| format!("writing {}", spec_path.display()))?;
    }

    let dir = data_dir(&args.data)?;
    let files = image_files(&dir)?;
    if files.is_empty() {
        bail!("--data {}: no images (png, jpg, bmp, webp)", dir.display());
    }
    let global_batch = args.batch * ranks;
    if files.len() < global_batch {
        bail!(
            "--data {}: {} image(s) make no batch of {}{}; lower --batch",
            dir.display(),
            files.len(),
            global_batch,
            super::distributed::ranks_note(ranks)
        );
    }
    let backend = open_backend(args.backend.backend, &args.backend.options())
        .context("opening the backend")?;

    let prep = bar(files.len() as u64, &format!("{} targets", spec.method));
    if !leader {
        prep.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let cache = args.out.join(CACHE_DIR);
    let progress = |done: u64, total: u64| {
        prep.set_length(total);
        prep.set_position(done);
    };
    // Rank 0 computes and writes the cache; the others then read it.
    let mut prepare = || {
        method
            .prepare(
                &ctx,
                &PrepareContext {
                    files: &files,
                    cache_dir: &cache,
                    backend: backend.as_ref(),
                    progress: &progress,
                },
            )
            .with_context(|| format!("preparing the {} targets", spec.method))
    };
    if leader {
        prepare()?;
    }
    comm.barrier();
    if !leader {
        prepare()?;
    }
    prep.finish_and_clear();

    let mut train = TrainStepConfig::new(method.optimizer(global_batch)?);
    train.data_parallel = ranks > 1;
    train.task = Some("pretrain-detr".into());
    train.trainable = method.trainable();
    train.clip = grad_clip(method.settings())?.map(|max_norm| ClipConfig {
        max_norm,
        ..ClipConfig::default()
    });
    if leader {
        eprintln!(
            "densa: building the {} train step (detr-{} at {}px, batch {}, {} queries{})",
            spec.method,
            spec.arch,
            config.image_size,
            args.batch,
            config.num_queries,
            super::distributed::ranks_note(ranks)
        );
    }
    let graphs = method
        .step_graphs(&config, args.batch, &train, args.seed)
        .context("building the detector train step")?;
    let mut trainer =
        DetrTrainer::for_ranks(&config, &graphs, args.batch, backend.as_ref(), comm.clone())?;
    let lr = graphs
        .whole
        .manifest
        .input("optim.lr")
        .and_then(|e| e.default)
        .context("the train step has no `optim.lr` input")?;

    let per_epoch = (files.len() / global_batch) as u64;
    let total = match (args.steps, args.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e * per_epoch,
        (None, None) => 100 * per_epoch,
    };
    let (start, elapsed0) = match &resume {
        Some((dir, p)) => {
            let path = dir.join(STATE_FILE);
            let state =
                load_safetensors(&path).with_context(|| format!("reading {}", path.display()))?;
            trainer
                .load_state(&state)
                .with_context(|| format!("resuming from {}", path.display()))?;
            if leader {
                eprintln!(
                    "densa: resuming {} from {} (step {})",
                    spec.method,
                    args.out.display(),
                    p.step
                );
            }
            (p.step, p.elapsed_s)
        }
        None => (0, 0.0),
    };
    let log_path = args.out.join(LOG_FILE);
    let mut log = match (leader, start > 0) {
        (false, _) => None,
        (true, true) => Some(JsonlLog::resume(&log_path, start)?),
        (true, false) => Some(JsonlLog::create(&log_path)?),
    };
    let cosine = WarmupCosine {
        input: "optim.lr".into(),
        peak: lr,
        floor: 0.0,
        warmup: method.settings().i64("warmup_steps").max(0) as u64,
        total,
    };
    if leader {
        eprintln!(
            "densa: pretraining {} on {} images ({per_epoch} steps per epoch, {total} steps), \
             backend {}{}",
            spec.method,
            files.len(),
            backend.label(),
            super::distributed::ranks_note(ranks)
        );
    }
    let progress_bar = bar(total, &spec.method);
    if !leader {
        progress_bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    progress_bar.set_position(start);
    install_ctrl_c();
    let clock = Instant::now();
    let mut order: Option<(u64, Vec<usize>)> = None;
    let mut last_loss = None;
    let mut step = start;
    while step < total {
        let epoch = step / per_epoch;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            order = Some((epoch, epoch_order(files.len(), args.seed, epoch)));
        }
        let index_in_epoch = (step % per_epoch) as usize;
        let t0 = Instant::now();
        // This rank's share of the global batch.
        let first = index_in_epoch * global_batch + rank * args.batch;
        let ids = &order.as_ref().expect("set above").1[first..first + args.batch];
        let images = ids
            .iter()
            .map(|&index| {
                read_rgb(&files[index])
                    .map(|image| SampleImage { index, image })
                    .with_context(|| format!("reading {}", files[index].display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0xD37E_0000_0000_0001);
        rng.set_stream(step * ranks as u64 + rank as u64);
        let batch = method
            .batch(&config, &images, step, &mut rng)
            .with_context(|| format!("step {step}: the {} batch", spec.method))?;
        let lr_now = cosine.at(step);
        trainer.set_hyper("optim.lr", lr_now)?;
        let report = trainer
            .step(batch.images, &batch.targets, &batch.extra)
            .with_context(|| format!("step {step}"))?;
        step += 1;
        last_loss = Some(report.loss);
        let record = StepRecord {
            step,
            epoch,
            loss: Some(report.loss as f64),
            metrics: report
                .metrics
                .iter()
                .map(|(k, v)| (k.clone(), v.is_finite().then_some(*v as f64)))
                .collect::<BTreeMap<_, _>>(),
            hyper: [("optim.lr".to_string(), lr_now)].into_iter().collect(),
            images_per_s: global_batch as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            time_s: elapsed0 + clock.elapsed().as_secs_f64(),
            skipped: false,
            note: None,
        };
        if let Some(log) = log.as_mut() {
            log.append(&record)?;
        }
        progress_bar.set_message(format!(
            "loss {:.4} boxes {}",
            report.loss, report.num_boxes
        ));
        progress_bar.inc(1);
        // Every rank stops at the same step when any was interrupted.
        let mut flag = [if INTERRUPTED.load(Ordering::SeqCst) {
            1.0
        } else {
            0.0
        }];
        if ranks > 1 {
            comm.all_reduce_sum(&mut flag);
        }
        let interrupted = flag[0] > 0.0;
        let due = step.is_multiple_of(args.checkpoint_every.max(1)) || step == total;
        if leader && (due || interrupted) {
            checkpoint(
                &args.out,
                &config,
                args.arch,
                trainer.state(),
                &Progress {
                    step,
                    elapsed_s: elapsed0 + clock.elapsed().as_secs_f64(),
                },
            )?;
        }
        if interrupted {
            break;
        }
    }
    progress_bar.finish_and_clear();
    if !leader {
        return Ok(());
    }
    if let Some(s) = trainer.comm_stats() {
        super::distributed::report_stats(&s);
    }
    if start == total {
        // Nothing left to train: refresh the detector files from the checkpoint.
        checkpoint(
            &args.out,
            &config,
            args.arch,
            trainer.state(),
            &Progress {
                step,
                elapsed_s: elapsed0,
            },
        )?;
    }
    let records = read_records(&log_path)?;
    let plot = args.out.join(PLOT_FILE);
    plot_loss(
        &records,
        &plot,
        &format!("densa pretrain --method {}", spec.method),
        (800, 500),
    )?;
    println!(
        "step {step}, last loss {}, detector {} + {} ({} classes), backbone {}, log {}",
        last_loss.map_or("-".to_string(), |l| format!("{l:.5}")),
        args.out.join(DETR_CONFIG_FILE).display(),
        args.out.join(STATE_FILE).display(),
        config.classes.len(),
        args.out.join(BACKBONE_FILE).display(),
        log_path.display()
    );
    if step < total {
        println!("interrupted; run the same command again to resume");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_that_differ_by_epoch() {
        let a = epoch_order(10, 3, 0);
        let b = epoch_order(10, 3, 1);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(a, epoch_order(10, 3, 0));
    }
}
