//! `densa finetune --task detect --detector detr ...`: fine-tunes the DETR-family detector
//! ([`densa_models::detr`]) on COCO-format data, with the same data, subset, validation and
//! output conventions as the dense detector ([`super::finetune_detect`]).
//!
//! - Each step runs the split train step: the forward graph, the Hungarian matching of every
//!   image on the host for every decoder layer, then the backward graph and the update
//!   ([`DetrTrainer`]). AdamW, gradient clipping by global norm 0.1 (DETR's), warmup + cosine
//!   learning rate set by the host.
//! - Samples are letterboxed exactly as serving does and flipped horizontally with
//!   probability 1/2; boxes become normalised cxcywh targets.
//! - The whole training state (parameters, buffers, optimizer slots) is written to
//!   `OUT/detr-state/` after every epoch (atomically: temporary file, then rename) with the
//!   epoch reached; re-running the same command resumes from there.
//! - Every `--val-every` epochs the model is exported and scored with COCOeval; the best state
//!   by AP goes to `OUT/best/` (`state.safetensors`, `detr.json`, `metrics.json`), which
//!   `densa export detector --ckpt OUT` turns into a served model.
//! - Under `mpirun -np N` each rank trains on its `--batch-size` images of every global batch
//!   of N x `--batch-size` (the same shuffle and flips on every rank), matches them itself and
//!   the ranks apply one averaged update ([`DetrTrainer::for_ranks`]); rank 0 writes the
//!   state, validates and keeps the best.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use densa_exporter::onnx::ModelProto;
use densa_exporter::train::clip::ClipConfig;
use densa_exporter::weights::{load_safetensors, save_safetensors, StateDict};
use densa_exporter::Tensor;
use densa_models::detr::matcher::xyxy_to_cxcywh;
use densa_models::detr::train::{step_graphs, DetrTrainer};
use densa_models::detr::{DetrConfig, ImageTargets};
use densa_models::train_step::{OptimizerConfig, TrainStepConfig, Trainable};
use densa_runtime::data::coco::load_dataset;
use densa_runtime::data::{CocoSource, CocoSpec, SampleSource};
use densa_runtime::infer::preprocess::prepare;
use densa_runtime::infer::spec::{InputSpec, ModelSpec};
use densa_runtime::open_backend;
use densa_runtime::train::Communicator;
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{s, Array4, Axis};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::eval_detect::{evaluate_model, images_dir};
use super::export_detector::{BEST_DIR, STATE_FILE};
use super::finetune::{load_backbone_init, FinetuneArgs};
use super::finetune_detect::{label_subset, ValRecord};

/// The DETR description beside its state (the dense detector's is `detector.json`).
pub const DETR_CONFIG_FILE: &str = "detr.json";
/// The resumable training state's folder inside a fine-tuning output.
const STATE_DIR: &str = "detr-state";
/// Default learning rate (AdamW peak).
const DEFAULT_LR: f64 = 1e-3;
/// Default square input size.
const DEFAULT_SIZE: u32 = 128;

/// The serving spec of a DETR export: letterboxed square input, `pixel / 255` then the config's
/// mean/std, boxes-scores-labels outputs already final (DETR needs no NMS).
pub fn detr_spec(config: &DetrConfig) -> ModelSpec {
    super::export_detector::letterbox_spec(
        config.image_size,
        config.mean,
        config.std,
        config.classes.clone(),
        None,
    )
}

/// The inference model of `config` with `state` (extra entries such as optimizer slots are
/// ignored), carrying its spec.
pub fn detr_model(config: &DetrConfig, state: &StateDict, top_k: usize) -> Result<ModelProto> {
    let spec = detr_spec(config).to_toml();
    Ok(config.inference_graph(
        Some(state),
        top_k,
        &[(densa_runtime::infer::spec::SPEC_KEY, spec.as_str())],
    )?)
}

/// A DETR checkpoint in `dir` (`best/` of a fine-tuning output, or a folder with `detr.json`
/// and `state.safetensors`); `None` when `dir` holds no DETR description.
pub fn load_detr_checkpoint(dir: &Path) -> Result<Option<(DetrConfig, StateDict, String)>> {
    for d in [dir.join(BEST_DIR), dir.to_path_buf()] {
        let config_path = d.join(DETR_CONFIG_FILE);
        if !config_path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let config: DetrConfig = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", config_path.display()))?;
        let state_path = d.join(STATE_FILE);
        let state = if state_path.is_file() {
            load_safetensors(&state_path)
                .with_context(|| format!("reading {}", state_path.display()))?
        } else {
            let p = d.join(STATE_DIR).join(STATE_FILE);
            load_safetensors(&p).with_context(|| {
                format!(
                    "{}: {DETR_CONFIG_FILE} but no {STATE_FILE} (nor {STATE_DIR}/{STATE_FILE})",
                    d.display()
                )
            })?
        };
        return Ok(Some((config, state, d.display().to_string())));
    }
    Ok(None)
}

/// Where a run stands, beside the state in `OUT/detr-state/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Progress {
    epoch: u64,
    step: u64,
    /// The processes the run trains on (1 in a file written before this field): the global
    /// batch, the step count and the learning rate depend on it.
    #[serde(default = "one_process")]
    processes: usize,
    /// What the run was started with (absent in a file written before this field).
    #[serde(default)]
    run: Option<RunArgs>,
}

/// The arguments a resume must repeat: they shape the model, the data or the optimisation.
/// `--epochs` and `--val-every` may change (a run can be extended).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RunArgs {
    arch: String,
    classes: Vec<String>,
    image_size: u32,
    batch_size: usize,
    lr: f64,
    seed: u64,
    label_fraction: Option<f64>,
    shots: Option<usize>,
    freeze_backbone: bool,
}

impl RunArgs {
    /// The fields that differ, as `name: before -> now`.
    fn differences(&self, now: &RunArgs) -> Vec<String> {
        let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
            (serde_json::to_value(self), serde_json::to_value(now))
        else {
            return vec!["(unreadable)".into()];
        };
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "{k}: {v} -> {}",
                    b.get(k).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect()
    }
}

fn one_process() -> usize {
    1
}

fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// One letterboxed (and maybe flipped) training sample and its normalised cxcywh targets.
fn sample(
    source: &CocoSource,
    index: usize,
    input: &InputSpec,
    flip: bool,
) -> Result<(ndarray::Array3<f32>, ImageTargets)> {
    let sample = source
        .load(index)
        .with_context(|| format!("loading training image {index}"))?;
    let (x, t) = prepare(&sample.image, input);
    let side = input.size[0] as f32;
    let mut targets = ImageTargets::default();
    for b in sample.boxes.iter().filter(|b| !b.iscrowd) {
        let [x0, y0, x1, y1] = b.xyxy;
        let mx = |v: f32| v * t.scale[0] + t.offset[0];
        let my = |v: f32| v * t.scale[1] + t.offset[1];
        let (a, c) = if flip {
            (side - mx(x1), side - mx(x0))
        } else {
            (mx(x0), mx(x1))
        };
        let clamp = |v: f32| (v / side).clamp(0.0, 1.0);
        let xyxy = [clamp(a), clamp(my(y0)), clamp(c), clamp(my(y1))];
        if xyxy[2] - xyxy[0] > 1e-4 && xyxy[3] - xyxy[1] > 1e-4 {
            targets.boxes.push(xyxy_to_cxcywh(xyxy));
            targets.labels.push(b.class);
        }
    }
    let x = if flip {
        x.slice(s![.., .., ..;-1]).to_owned()
    } else {
        x
    };
    Ok((x, targets))
}

/// `peak` after a linear warmup of `warmup` steps, then cosine down to 1% of it at `total`.
fn learning_rate(step: u64, peak: f64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    let floor = peak * 0.01;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
}

pub fn run(args: &FinetuneArgs, comm: &Arc<dyn Communicator>) -> Result<()> {
    let (rank, ranks) = (comm.rank(), comm.size());
    let leader = rank == 0;
    let images = images_dir(&args.data, args.images.as_deref());
    let source = CocoSource::open(&CocoSpec {
        annotations: args.data.clone(),
        images: images.clone(),
        masks: None,
    })
    .with_context(|| format!("reading {}", args.data.display()))?;
    let mut config = DetrConfig::new(args.backbone(), source.classes().to_vec());
    config.image_size = args.image_size.unwrap_or(DEFAULT_SIZE);
    let gt = source.dataset().clone();
    let classes_of: Vec<Vec<usize>> = {
        let mut cats: Vec<u64> = gt.categories.iter().map(|c| c.id).collect();
        cats.sort_unstable();
        gt.images
            .iter()
            .map(|im| {
                gt.annotations
                    .iter()
                    .filter(|a| a.image_id == im.id)
                    .filter_map(|a| cats.iter().position(|&c| c == a.category_id))
                    .collect()
            })
            .collect()
    };
    if let Some(f) = args.label_fraction {
        if !(f > 0.0 && f <= 1.0) {
            bail!("--label-fraction {f}: must be in (0, 1]");
        }
    }
    let subset = label_subset(&classes_of, args.label_fraction, args.shots, args.seed);
    let global_batch = args.batch_size * ranks;
    if args.batch_size == 0 || subset.len() < global_batch {
        bail!(
            "{} labelled image(s) selected from {} make no batch of {}{}; lower --batch-size or \
             raise --label-fraction/--shots",
            subset.len(),
            args.data.display(),
            global_batch,
            super::distributed::ranks_note(ranks)
        );
    }
    let (val_gt, val_images) = match &args.val_data {
        Some(v) => (
            load_dataset(v).with_context(|| format!("reading {}", v.display()))?,
            images_dir(v, args.val_images.as_deref()),
        ),
        None => {
            let keep: Vec<usize> = (0..gt.images.len())
                .filter(|i| !subset.contains(i))
                .collect();
            let keep = if keep.is_empty() {
                subset.clone()
            } else {
                keep
            };
            let mut d = gt.clone();
            d.images = keep.iter().map(|&i| gt.images[i].clone()).collect();
            let ids: std::collections::HashSet<u64> = d.images.iter().map(|im| im.id).collect();
            d.annotations.retain(|a| ids.contains(&a.image_id));
            (d, images.clone())
        }
    };
    std::fs::create_dir_all(args.out.join(STATE_DIR))
        .with_context(|| format!("creating {}", args.out.display()))?;
    let lr = args.lr.unwrap_or(DEFAULT_LR);
    let run_args = RunArgs {
        arch: config.arch.clone(),
        classes: config.classes.clone(),
        image_size: config.image_size,
        batch_size: args.batch_size,
        lr,
        seed: args.seed,
        label_fraction: args.label_fraction,
        shots: args.shots,
        freeze_backbone: args.freeze_backbone,
    };
    // A run to resume is checked before anything is written.
    let state_path = args.out.join(STATE_DIR).join(STATE_FILE);
    let progress_path = args.out.join(STATE_DIR).join("progress.json");
    let resume = if progress_path.is_file() {
        let p: Progress = serde_json::from_str(
            &std::fs::read_to_string(&progress_path)
                .with_context(|| format!("reading {}", progress_path.display()))?,
        )
        .with_context(|| format!("parsing {}", progress_path.display()))?;
        super::distributed::check_process_count(&args.out, p.processes, ranks)?;
        if let Some(old) = &p.run {
            let diff = old.differences(&run_args);
            if !diff.is_empty() {
                bail!(
                    "{} holds a run started with other arguments ({}); use another --out, or \
                     the same arguments to resume it",
                    args.out.display(),
                    diff.join(", ")
                );
            }
        }
        Some(p)
    } else {
        None
    };
    let config_path = args.out.join(DETR_CONFIG_FILE);
    if leader {
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("writing {}", config_path.display()))?;
        eprintln!(
            "finetune detect (DETR): detr-{} on {} of {} images ({} classes, {}x{} input, {} \
             queries), validating on {} images{}",
            config.arch,
            subset.len(),
            gt.images.len(),
            config.num_classes(),
            config.image_size,
            config.image_size,
            config.num_queries,
            val_gt.images.len(),
            super::distributed::ranks_note(ranks)
        );
    }
    let mut step_config = TrainStepConfig::new(OptimizerConfig::adamw(lr, 1e-4));
    step_config.clip = Some(ClipConfig {
        max_norm: 0.1,
        ..ClipConfig::default()
    });
    step_config.task = Some("detect-detr".into());
    step_config.data_parallel = ranks > 1;
    if args.freeze_backbone {
        step_config.trainable = Trainable::Frozen(
            ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
                .map(String::from)
                .to_vec(),
        );
    }
    let graphs = step_graphs(&config, args.batch_size, &step_config, args.seed)
        .context("building the DETR train step")?;
    let backend = open_backend(args.backend.backend, &args.backend.options())?;
    if leader {
        eprintln!("backend {}", backend.label());
    }
    let mut trainer = DetrTrainer::for_ranks(
        &config,
        &graphs,
        args.batch_size,
        backend.as_ref(),
        comm.clone(),
    )?;
    let mut start_epoch = 0;
    if let Some(p) = resume {
        let state = load_safetensors(&state_path)
            .with_context(|| format!("reading {}", state_path.display()))?;
        trainer
            .load_state(&state)
            .with_context(|| format!("resuming from {}", state_path.display()))?;
        start_epoch = p.epoch;
        if leader {
            eprintln!("resuming after epoch {} (step {})", p.epoch, p.step);
        }
    } else if let Some((init_config, state, from)) = match args.init.as_str() {
        "random" => None,
        dir if Path::new(dir).is_dir() => load_detr_checkpoint(Path::new(dir))?,
        _ => None,
    } {
        // A whole DETR (a pretraining method's or another fine-tuning's): every tensor whose
        // name and shape fit; the class head of another label set starts random.
        let mut fitting = StateDict::new();
        let fresh = config.initial_state(0)?;
        for (name, t) in state.iter() {
            if fresh.get(name).is_some_and(|f| f.shape() == t.shape()) {
                fitting.insert(name.to_string(), t.clone());
            }
        }
        let n = trainer.load_state(&fitting)?;
        // Every rank loads the same tensors; rank 0 says so.
        if leader {
            eprintln!(
                "init: loaded {n} of {} DETR tensors from {from} (detr-{}, {} classes)",
                fresh.len(),
                init_config.arch,
                init_config.classes.len()
            );
        }
    } else if let Some(init) = load_backbone_init(&args.init, args.backbone())? {
        let mut tensors = StateDict::new();
        for (name, t) in init.tensors.iter() {
            let v = if t.dtype().is_float() {
                Tensor::F32(t.to_f32())
            } else {
                t.clone()
            };
            tensors.insert(name.to_string(), v);
        }
        trainer.load_state(&tensors)?;
        if leader {
            eprintln!("{}", init.describe());
        }
    }
    let batches_per_epoch = (subset.len() / global_batch) as u64;
    let total_steps = batches_per_epoch * args.epochs;
    let warmup = (total_steps / 10).clamp(1, 100);
    let input = detr_spec(&config).input;
    let best_dir = args.out.join(BEST_DIR);
    let mut best: Option<ValRecord> = std::fs::read_to_string(best_dir.join("metrics.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let bar = ProgressBar::new(total_steps);
    bar.set_style(
        ProgressStyle::with_template("detr [{bar:30}] {pos}/{len} {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(start_epoch * batches_per_epoch);
    if !leader {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let model_names = config.initial_state(0)?;
    for epoch in start_epoch..args.epochs {
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ (epoch + 1).wrapping_mul(0x9E37));
        let mut order = subset.clone();
        for i in (1..order.len()).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        let mut last_loss = f32::NAN;
        for chunk in order.chunks_exact(global_batch) {
            let step = trainer.steps() + start_epoch * batches_per_epoch;
            trainer.set_hyper("optim.lr", learning_rate(step, lr, warmup, total_steps))?;
            let s = config.image_size as usize;
            let mut x = Array4::<f32>::zeros((args.batch_size, 3, s, s));
            let mut targets = Vec::with_capacity(args.batch_size);
            // Every rank draws the whole global batch's flips and keeps its own share.
            let flips: Vec<bool> = chunk.iter().map(|_| rng.random::<f32>() < 0.5).collect();
            let mine = rank * args.batch_size..(rank + 1) * args.batch_size;
            for (k, (&i, &flip)) in chunk[mine.clone()].iter().zip(&flips[mine]).enumerate() {
                let (img, t) = sample(&source, i, &input, flip)?;
                x.index_axis_mut(Axis(0), k).assign(&img);
                targets.push(t);
            }
            let report = trainer
                .step(Tensor::F32(x.into_dyn()), &targets, &[])
                .with_context(|| format!("epoch {} step {step}", epoch + 1))?;
            last_loss = report.loss;
            bar.set_message(format!("epoch {} loss {:.4}", epoch + 1, report.loss));
            bar.inc(1);
        }
        let step = start_epoch * batches_per_epoch + trainer.steps();
        if !leader {
            continue;
        }
        write_atomically(&state_path, |p| {
            save_safetensors(trainer.state(), p).with_context(|| format!("writing {}", p.display()))
        })?;
        write_atomically(&progress_path, |p| {
            let text = serde_json::to_string(&Progress {
                epoch: epoch + 1,
                step,
                processes: ranks,
                run: Some(run_args.clone()),
            })?;
            std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))
        })?;
        let done = epoch + 1;
        if !done.is_multiple_of(args.val_every.max(1)) && done != args.epochs {
            continue;
        }
        let mut state = StateDict::new();
        for (name, _) in model_names.iter() {
            let t = trainer
                .state()
                .get(name)
                .with_context(|| format!("the training state has no `{name}`"))?;
            state.insert(name.to_string(), t.clone());
        }
        let model = detr_model(&config, &state, config.num_queries)?;
        let (run, e) = evaluate_model(
            &model,
            &detr_spec(&config),
            backend.as_ref(),
            &val_gt,
            &val_images,
            args.batch_size.max(1),
            "validation model",
        )?;
        let record = ValRecord {
            epoch: done,
            step,
            ap: e.stats.ap,
            ap50: e.stats.ap50,
            images: run.served,
            images_per_s: run.images_per_s(),
        };
        bar.suspend(|| {
            eprintln!(
                "epoch {done}/{} step {step}: loss {last_loss:.4}  val AP {:.4} AP50 {:.4}",
                args.epochs, record.ap, record.ap50
            )
        });
        let line = serde_json::to_string(&record)?;
        if best.as_ref().is_none_or(|b| record.ap > b.ap) {
            std::fs::create_dir_all(&best_dir)?;
            save_safetensors(&state, &best_dir.join(STATE_FILE))
                .with_context(|| format!("writing {}", best_dir.display()))?;
            std::fs::write(
                best_dir.join(DETR_CONFIG_FILE),
                serde_json::to_string_pretty(&config)?,
            )?;
            std::fs::write(
                best_dir.join("metrics.json"),
                serde_json::to_string_pretty(&record)?,
            )?;
            best = Some(record);
        }
        let log = args.out.join("val.jsonl");
        let mut text = std::fs::read_to_string(&log).unwrap_or_default();
        text.push_str(&line);
        text.push('\n');
        std::fs::write(&log, text).with_context(|| format!("writing {}", log.display()))?;
    }
    bar.finish_and_clear();
    if !leader {
        return Ok(());
    }
    if let Some(s) = trainer.comm_stats() {
        super::distributed::report_stats(&s);
    }
    if let Some(best) = &best {
        println!(
            "best: epoch {} AP {:.4} AP50 {:.4}; state in {}",
            best.epoch,
            best.ap,
            best.ap50,
            best_dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_then_decays_to_one_percent() {
        assert!((learning_rate(0, 1.0, 10, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(100, 1.0, 10, 100) - 0.01).abs() < 1e-12);
    }
}
