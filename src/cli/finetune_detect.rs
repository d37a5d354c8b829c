//! `densa finetune --task detect`: fine-tunes the FCOS-style detector
//! ([`densa_models::detect`]) on COCO-format data.
//!
//! - Low-label subsets (`--label-fraction F`, `--shots K`) are drawn from a ChaCha8 permutation
//!   of the images seeded by `--seed`: the same seed gives the same subset.
//! - Each sample is letterboxed to the model's square input exactly as serving does
//!   ([`densa_runtime::infer::preprocess::prepare`]), flipped horizontally with probability 1/2
//!   (boxes follow), and its FCOS targets assigned on the host.
//! - The train step (AdamW, gradient clipping by global norm 10, warmup + cosine learning rate)
//!   runs on the [`Trainer`]; every `--val-every` epochs the state is exported to the inference
//!   graph and scored with COCOeval on the validation set (`--val-data`, else the training
//!   images outside the labelled subset). The best state by AP is kept in `OUT/best/`
//!   (`state.safetensors`, `detector.json`, `metrics.json`): what `densa export detector` reads.
//! - Re-running on the same `--out` resumes from its newest checkpoint.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use densa_exporter::train::clip::ClipConfig;
use densa_exporter::weights::{save_safetensors, StateDict};
use densa_exporter::Tensor;
use densa_models::detect::{names, AssignConfig, DetectorConfig};
use densa_models::train_step::{
    train_step_artifact, ForwardGraph, OptimizerConfig, TrainStepConfig, Trainable,
};
use densa_runtime::data::coco::{load_dataset, Dataset};
use densa_runtime::data::{CocoSource, CocoSpec, SampleSource};
use densa_runtime::infer::preprocess::prepare;
use densa_runtime::infer::spec::InputSpec;
use densa_runtime::train::{
    checkpoint, Artifact, Batch, Communicator, DataError, Length, Samples, Shuffled, SingleProcess,
    StopReason, TrainOptions, Trainer, WarmupCosine,
};
use densa_runtime::{open_backend, Backend};
use ndarray::{s, ArrayD};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::eval_detect::{evaluate_model, images_dir};
use super::export_detector::{detector_model, detector_spec, BEST_DIR, CONFIG_FILE, STATE_FILE};
use super::finetune::{apply_backbone_init, load_backbone_init, BackboneInit, FinetuneArgs};

/// Default learning rate (AdamW peak).
const DEFAULT_LR: f64 = 2e-3;
/// Default square input size.
const DEFAULT_SIZE: u32 = 128;

/// The images of a low-label subset: `fraction` of all images (at least one), or `shots`
/// images per class (greedy over a seeded permutation: an image is taken while one of its
/// classes has fewer than `shots`), or all. Sorted.
pub fn label_subset(
    boxes: &[Vec<usize>],
    fraction: Option<f64>,
    shots: Option<usize>,
    seed: u64,
) -> Vec<usize> {
    let n = boxes.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(0x5ab5e7);
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    let mut chosen: Vec<usize> = if let Some(f) = fraction {
        let k = ((f * n as f64).ceil() as usize).clamp(1, n.max(1));
        order.into_iter().take(k).collect()
    } else if let Some(k) = shots {
        let classes = boxes.iter().flatten().max().map_or(0, |m| m + 1);
        let mut count = vec![0usize; classes];
        let mut out = Vec::new();
        for i in order {
            if boxes[i].iter().any(|&c| count[c] < k) {
                for &c in &boxes[i] {
                    count[c] += 1;
                }
                out.push(i);
            }
        }
        out
    } else {
        order
    };
    chosen.sort_unstable();
    chosen
}

/// Training samples: letterboxed, flipped, with FCOS targets.
pub struct DetectSamples {
    source: Arc<CocoSource>,
    indices: Vec<usize>,
    input: InputSpec,
    assigner: AssignConfig,
    flip: bool,
}

impl DetectSamples {
    pub fn new(
        source: Arc<CocoSource>,
        indices: Vec<usize>,
        config: &DetectorConfig,
        flip: bool,
    ) -> DetectSamples {
        DetectSamples {
            source,
            indices,
            input: detector_spec(config, 0.6).input,
            assigner: config.assigner(),
            flip,
        }
    }
}

impl Samples for DetectSamples {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn sample(&mut self, index: usize, rng: &mut ChaCha8Rng) -> Result<Batch, DataError> {
        let i = self.indices[index];
        let sample = self.source.load(i).map_err(|e| DataError::Source {
            source_name: self.describe(),
            message: e.to_string(),
        })?;
        let (x, t) = prepare(&sample.image, &self.input);
        let side = self.input.size[0] as f32;
        let flip = self.flip && rng.random::<f32>() < 0.5;
        let boxes: Vec<([f32; 4], usize)> = sample
            .boxes
            .iter()
            .filter(|b| !b.iscrowd)
            .map(|b| {
                let [x0, y0, x1, y1] = b.xyxy;
                let mx = |v: f32| v * t.scale[0] + t.offset[0];
                let my = |v: f32| v * t.scale[1] + t.offset[1];
                let (a, c) = if flip {
                    (side - mx(x1), side - mx(x0))
                } else {
                    (mx(x0), mx(x1))
                };
                ([a, my(y0), c, my(y1)], b.class)
            })
            .collect();
        let x = if flip {
            x.slice(s![.., .., ..;-1]).to_owned()
        } else {
            x
        };
        let targets = self.assigner.assign(&boxes);
        let l = self.assigner.locations();
        let c = self.assigner.num_classes;
        let arr = |shape: Vec<usize>, v: Vec<f32>| {
            Tensor::F32(ArrayD::from_shape_vec(shape, v).expect("target sizes match"))
        };
        Ok(vec![
            (names::IMAGES.into(), Tensor::F32(x.into_dyn())),
            (names::CLS.into(), arr(vec![l, c], targets.cls)),
            (names::REG.into(), arr(vec![l, 4], targets.reg)),
            (names::CTR.into(), arr(vec![l], targets.ctr)),
            (names::POS.into(), arr(vec![l], targets.pos)),
        ])
    }

    fn describe(&self) -> String {
        format!("coco-detect n={}", self.indices.len())
    }
}

/// The train-step artifact of a detector: AdamW, clipping, `optim.lr` scheduled by the host;
/// the backbone from `init` when given (the rest initialised from `seed`).
pub fn detector_artifact(
    config: &DetectorConfig,
    seed: u64,
    lr: f64,
    freeze_backbone: bool,
    init: Option<&BackboneInit>,
    data_parallel: bool,
) -> Result<Artifact> {
    let (mut b, losses) = config.training_forward(seed)?;
    if let Some(init) = init {
        apply_backbone_init(&mut b, init)?;
    }
    let forward = ForwardGraph::new(b, losses.loss)
        .norm_state(losses.norm_state)
        .metric(names::LOSS_CLS, losses.cls)
        .metric(names::LOSS_BOX, losses.boxes)
        .metric(names::LOSS_CTR, losses.ctr);
    let mut step = TrainStepConfig::new(OptimizerConfig::adamw(lr, 1e-4));
    step.clip = Some(ClipConfig {
        max_norm: 10.0,
        ..ClipConfig::default()
    });
    step.task = Some("detect".into());
    step.data_parallel = data_parallel;
    if freeze_backbone {
        step.trainable = Trainable::Frozen(
            ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
                .map(String::from)
                .to_vec(),
        );
    }
    Ok(train_step_artifact(forward, None, &step)?)
}

/// What a validation found, kept beside the best state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValRecord {
    pub epoch: u64,
    pub step: u64,
    #[serde(rename = "AP")]
    pub ap: f64,
    #[serde(rename = "AP50")]
    pub ap50: f64,
    pub images: usize,
    pub images_per_s: f64,
}

/// The model weights of a train-step state (optimizer slots dropped).
fn model_state(config: &DetectorConfig, state: &StateDict) -> Result<StateDict> {
    let fresh = config.initial_state(0)?;
    let mut out = StateDict::new();
    for (name, _) in fresh.iter() {
        let t = state
            .get(name)
            .with_context(|| format!("the training state has no `{name}`"))?;
        out.insert(name.to_string(), t.clone());
    }
    Ok(out)
}

/// A COCO dataset of `gt`'s images at `keep` positions (annotations and categories kept).
fn sub_dataset(gt: &Dataset, keep: &[usize]) -> Dataset {
    let images: Vec<_> = keep.iter().map(|&i| gt.images[i].clone()).collect();
    let ids: std::collections::HashSet<u64> = images.iter().map(|im| im.id).collect();
    Dataset {
        info: None,
        licenses: Vec::new(),
        images,
        annotations: gt
            .annotations
            .iter()
            .filter(|a| ids.contains(&a.image_id))
            .cloned()
            .collect(),
        categories: gt.categories.clone(),
    }
}

/// Summary of a fine-tuning run.
pub struct FinetuneOutcome {
    pub best: Option<ValRecord>,
    pub train_images: usize,
    pub steps: u64,
}

pub fn run(args: &FinetuneArgs, comm: &Arc<dyn Communicator>) -> Result<()> {
    let outcome = finetune_ranks(args, &|line| eprintln!("{line}"), comm)?;
    if comm.rank() != 0 {
        return Ok(());
    }
    if let Some(best) = &outcome.best {
        println!(
            "best: epoch {} AP {:.4} AP50 {:.4}; state in {}",
            best.epoch,
            best.ap,
            best.ap50,
            args.out.join(BEST_DIR).display()
        );
    }
    Ok(())
}

/// Runs the fine-tuning `args` describe; `say` gets the progress lines (validations).
pub fn finetune(args: &FinetuneArgs, say: &dyn Fn(String)) -> Result<FinetuneOutcome> {
    let one: Arc<dyn Communicator> = Arc::new(SingleProcess);
    finetune_ranks(args, say, &one)
}

/// [`finetune`] as one rank of a data-parallel job (`mpirun -np N densa finetune --task
/// detect`): each rank trains on its shard of every global batch; rank 0 alone validates,
/// keeps the best state, writes and reports (the other ranks' outcome has no `best`).
pub fn finetune_ranks(
    args: &FinetuneArgs,
    say: &dyn Fn(String),
    comm: &Arc<dyn Communicator>,
) -> Result<FinetuneOutcome> {
    let (rank, ranks) = (comm.rank(), comm.size());
    let say = |line: String| {
        if rank == 0 {
            say(line)
        }
    };
    let images = images_dir(&args.data, args.images.as_deref());
    let source = CocoSource::open(&CocoSpec {
        annotations: args.data.clone(),
        images: images.clone(),
        masks: None,
    })
    .with_context(|| format!("reading {}", args.data.display()))?;
    let mut config = DetectorConfig::new(args.backbone(), source.classes().to_vec());
    config.image_size = args.image_size.unwrap_or(DEFAULT_SIZE);
    // The file CocoSource parsed; not read a second time.
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
    if subset.len() < args.batch_size * ranks {
        bail!(
            "{} labelled image(s) selected from {} make no batch of {}; lower --batch-size or \
             raise --label-fraction/--shots",
            subset.len(),
            args.data.display(),
            args.batch_size * ranks
        );
    }
    let (val_gt, val_images) = match &args.val_data {
        Some(v) => (
            load_dataset(v).with_context(|| format!("reading {}", v.display()))?,
            images_dir(v, args.val_images.as_deref()),
        ),
        None => {
            let rest: Vec<usize> = (0..gt.images.len())
                .filter(|i| !subset.contains(i))
                .collect();
            let keep = if rest.is_empty() {
                subset.clone()
            } else {
                rest
            };
            (sub_dataset(&gt, &keep), images.clone())
        }
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let config_path = args.out.join(CONFIG_FILE);
    if rank == 0 {
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("writing {}", config_path.display()))?;
    }
    say(format!(
        "finetune detect: {} on {} of {} images ({} classes, {}x{} input), validating on {} images",
        config.arch,
        subset.len(),
        gt.images.len(),
        config.num_classes(),
        config.image_size,
        config.image_size,
        val_gt.images.len()
    ));
    let init = load_backbone_init(&args.init, args.backbone())?;
    if let Some(init) = &init {
        say(init.describe());
    }
    let lr = args.lr.unwrap_or(DEFAULT_LR);
    let artifact = detector_artifact(
        &config,
        args.seed,
        lr,
        args.freeze_backbone,
        init.as_ref(),
        ranks > 1,
    )
    .context("building the detector's train step")?;
    let backend = open_backend(args.backend.backend, &args.backend.options())?;
    say(format!("backend {}", backend.label()));
    let source = Arc::new(source);
    let batches_per_epoch = (subset.len() / (args.batch_size * ranks)) as u64;
    let total_steps = batches_per_epoch * args.epochs;
    let spec = detector_spec(&config, 0.6);
    let best_dir = args.out.join(BEST_DIR);
    let mut best: Option<ValRecord> = std::fs::read_to_string(best_dir.join("metrics.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let val_every = args.val_every.max(1);
    let mut epoch_end = 0;
    let mut steps = 0;
    while epoch_end < args.epochs {
        epoch_end = (epoch_end + val_every).min(args.epochs);
        let done = match checkpoint::latest(&args.out)? {
            Some(dir) => checkpoint::read(&dir)?.0.step,
            None => 0,
        };
        if done >= epoch_end * batches_per_epoch && epoch_end < args.epochs {
            continue;
        }
        let data = Shuffled::new(
            DetectSamples::new(source.clone(), subset.clone(), &config, true),
            args.batch_size,
        )?
        .shard(rank, ranks)?;
        let schedule = WarmupCosine {
            input: "optim.lr".into(),
            peak: lr,
            floor: lr * 0.01,
            warmup: (total_steps / 10).min(100),
            total: total_steps,
        };
        let mut options = TrainOptions::new(&args.out);
        options.seed = args.seed;
        options.length = Length::Epochs(epoch_end);
        options.checkpoint_every = 0;
        options.keep_checkpoints = 2;
        let mut trainer = if done > 0 {
            Trainer::resume(
                &args.out,
                artifact.clone(),
                backend.as_ref(),
                data,
                schedule,
                options,
            )?
        } else {
            Trainer::new(artifact.clone(), backend.as_ref(), data, schedule, options)?
        }
        .data_parallel(backend.as_ref(), comm.clone())?;
        let summary = trainer.run()?;
        steps = summary.position.step;
        if summary.stop == StopReason::Interrupted {
            say(format!(
                "interrupted at step {steps}; run the same command again to resume"
            ));
            break;
        }
        if rank != 0 {
            // Rank 0 validates; the others wait for it in the next epoch's first step.
            continue;
        }
        if ranks > 1 {
            super::distributed::report(&trainer);
        }
        let state = model_state(&config, &trainer.state())?;
        drop(trainer);
        let record = validate(
            &config,
            &state,
            backend.as_ref(),
            &spec,
            &val_gt,
            &val_images,
            epoch_end,
            steps,
        )?;
        say(format!(
            "epoch {}/{} step {steps}: loss {:.4}  val AP {:.4} AP50 {:.4} ({:.1} images/s)",
            epoch_end,
            args.epochs,
            summary.last_loss.unwrap_or(f64::NAN),
            record.ap,
            record.ap50,
            record.images_per_s
        ));
        if best.as_ref().is_none_or(|b| record.ap > b.ap) {
            std::fs::create_dir_all(&best_dir)?;
            save_safetensors(&state, &best_dir.join(STATE_FILE))
                .with_context(|| format!("writing {}", best_dir.display()))?;
            std::fs::write(
                best_dir.join(CONFIG_FILE),
                serde_json::to_string_pretty(&config)?,
            )?;
            std::fs::write(
                best_dir.join("metrics.json"),
                serde_json::to_string_pretty(&record)?,
            )?;
            best = Some(record.clone());
        }
        let log = args.out.join("val.jsonl");
        let mut text = std::fs::read_to_string(&log).unwrap_or_default();
        text.push_str(&serde_json::to_string(&record)?);
        text.push('\n');
        std::fs::write(&log, text).with_context(|| format!("writing {}", log.display()))?;
    }
    Ok(FinetuneOutcome {
        best,
        train_images: subset.len(),
        steps,
    })
}

#[allow(clippy::too_many_arguments)]
fn validate(
    config: &DetectorConfig,
    state: &StateDict,
    backend: &dyn Backend,
    spec: &densa_runtime::infer::ModelSpec,
    gt: &Dataset,
    images: &Path,
    epoch: u64,
    step: u64,
) -> Result<ValRecord> {
    let model = detector_model(config, state, 100, spec.output.nms_iou)?;
    let (run, e) = evaluate_model(&model, spec, backend, gt, images, 16, "validation model")?;
    Ok(ValRecord {
        epoch,
        step,
        ap: e.stats.ap,
        ap50: e.stats.ap50,
        images: run.served,
        images_per_s: run.images_per_s(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_are_deterministic_per_seed() {
        let boxes: Vec<Vec<usize>> = (0..100).map(|i| vec![i % 3]).collect();
        let a = label_subset(&boxes, Some(0.1), None, 7);
        assert_eq!(a.len(), 10);
        assert_eq!(a, label_subset(&boxes, Some(0.1), None, 7));
        assert_ne!(a, label_subset(&boxes, Some(0.1), None, 8));
        let k = label_subset(&boxes, None, Some(2), 1);
        assert_eq!(k.len(), 6);
        for c in 0..3 {
            assert_eq!(k.iter().filter(|&&i| boxes[i][0] == c).count(), 2);
        }
        assert_eq!(label_subset(&boxes, None, None, 0).len(), 100);
    }
}
