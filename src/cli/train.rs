//! `densa train`: trains a classifier on an image folder or the synthetic classification set,
//! with the train-step artifact of `densa export train` (built from the arguments, or given
//! with `--artifact`), checkpoints and automatic resume, and held-out accuracy at the end.
//!
//! The output directory holds `artifact/` (the artifact trained, so a resume never depends on
//! rebuilding it), `checkpoints/`, `train_log.jsonl`, `loss.png`, `eval.json` and `model.onnx`
//! (the trained classifier with its `densa.*` metadata: what `densa run` serves and `densa
//! adapt` adapts).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use densa_exporter::Tensor;
use densa_models::train_step::{deployed_classifier, eval_with_state};
use densa_runtime::train::classify::{ImageFolder, Split, SyntheticSquares};
use densa_runtime::train::{
    checkpoint, Artifact, Communicator, Length, Samples, Shuffled, StopReason, TrainOptions,
    Trainer, WarmupCosine,
};
use densa_runtime::{open_backend, Backend};
use ndarray::{ArrayD, Axis};

use super::export_train::{self, ExportTrainArgs, OptimizerKind, Task};
use super::{distributed, BackendArgs};

/// Seed of the synthetic training samples (the held-out samples use the next one).
const SYNTHETIC_SEED: u64 = 0x5EED;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// An image folder: one subfolder per class (`cat/*.jpg`, `dog/*.png`).
    #[arg(long, conflicts_with = "synthetic")]
    pub data: Option<PathBuf>,
    /// Train on this many synthetic samples instead (coloured squares, `--classes` classes).
    #[arg(long)]
    pub synthetic: Option<usize>,
    /// Number of classes of the synthetic set (an image folder has one per subfolder).
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Hold out every k-th image of each class of a folder (synthetic: a quarter as many fresh
    /// samples) for the accuracy at the end; 0: no held-out evaluation.
    #[arg(long, default_value_t = 5)]
    pub holdout_every: usize,
    /// Use this artifact directory (`densa export train`) instead of building one.
    #[arg(long)]
    pub artifact: Option<PathBuf>,
    /// Architecture: resnet18, resnet34, resnet50 or resnet-edge.
    #[arg(long, default_value = "resnet-edge")]
    pub arch: densa_models::Arch,
    /// Height and width of the images (resized).
    #[arg(long, default_value_t = 64)]
    pub image_size: usize,
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: OptimizerKind,
    /// Peak learning rate (warm-up then cosine to 0). Default: the optimizer's (0.1 SGD, 1e-3
    /// AdamW, 0.2 LARS).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Warm-up steps of the learning rate.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Backbone weights (safetensors or PyTorch checkpoint, torchvision names).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Steps to train (or --epochs).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Checkpoint every this many steps (also on Ctrl-C and at the end).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Seed of the initial weights and of the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Resume from the newest checkpoint in --out (automatic when one exists; with this flag a
    /// missing checkpoint is an error).
    #[arg(long)]
    pub resume: bool,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// The training or held-out samples the arguments name.
fn samples(args: &TrainArgs, size: u32, split: Split) -> Result<Option<Box<dyn Samples>>> {
    if let Some(dir) = &args.data {
        if split == Split::HeldOut && args.holdout_every == 0 {
            return Ok(None);
        }
        let f = ImageFolder::open(dir, size, args.holdout_every, split)
            .with_context(|| format!("reading the image folder {}", dir.display()))?;
        if f.is_empty() {
            return Ok(None);
        }
        return Ok(Some(Box::new(f)));
    }
    let Some(n) = args.synthetic else {
        bail!("give the data: --data DIR (one subfolder per class) or --synthetic N");
    };
    let (n, seed) = match split {
        Split::Train => (n, SYNTHETIC_SEED),
        Split::HeldOut if args.holdout_every == 0 => return Ok(None),
        Split::HeldOut => ((n / 4).max(args.classes), SYNTHETIC_SEED + 1),
    };
    Ok(Some(Box::new(
        SyntheticSquares::new(n, args.classes, size, seed).context("the synthetic data set")?,
    )))
}

fn classes(args: &TrainArgs) -> Result<usize> {
    match &args.data {
        Some(dir) => Ok(ImageFolder::open(dir, 1, 0, Split::Train)
            .with_context(|| format!("reading the image folder {}", dir.display()))?
            .classes()
            .len()),
        None => Ok(args.classes),
    }
}

/// The class names, index = label: the folder's subfolders, or `square-<k>` for the
/// synthetic set.
fn class_names(args: &TrainArgs) -> Result<Vec<String>> {
    match &args.data {
        Some(dir) => Ok(ImageFolder::open(dir, 1, 0, Split::Train)
            .with_context(|| format!("reading the image folder {}", dir.display()))?
            .classes()
            .to_vec()),
        None => Ok((0..args.classes).map(|k| format!("square-{k}")).collect()),
    }
}

/// The artifact: the saved one when resuming, `--artifact`, or built from the arguments.
fn artifact(args: &TrainArgs, resuming: bool, ranks: usize, leader: bool) -> Result<Artifact> {
    let saved = args.out.join("artifact");
    if resuming {
        return Artifact::load(&saved)
            .with_context(|| format!("loading the artifact of the run {}", saved.display()));
    }
    let artifact = match &args.artifact {
        Some(dir) => Artifact::load(dir).with_context(|| format!("loading {}", dir.display()))?,
        None => export_train::build(&ExportTrainArgs {
            arch: args.arch,
            task: Task::Classify,
            classes: classes(args)?,
            optimizer: args.optimizer,
            lr: args.lr,
            momentum: args.momentum,
            weight_decay: args.weight_decay,
            clip_grad_norm: None,
            weights: args.weights.clone(),
            strip_prefix: None,
            image_size: args.image_size,
            seed: args.seed,
            out: saved.clone(),
            data_parallel: ranks > 1,
        })?,
    };
    if leader {
        artifact
            .save(&saved)
            .with_context(|| format!("writing {}", saved.display()))?;
    }
    Ok(artifact)
}

/// The image size and class count an artifact's `images`/eval graph declare.
fn image_size(artifact: &Artifact) -> Result<u32> {
    let g = artifact
        .graph()
        .graph
        .as_ref()
        .context("the train step has no graph")?;
    let images = g
        .input
        .iter()
        .find(|i| i.name == "images")
        .context("the train step has no `images` input: not a classification artifact")?;
    let (_, shape) =
        densa_exporter::builder::read_value_info(images).context("`images` has no type")?;
    let shape = shape.context("`images` has no shape")?;
    match shape.last().and_then(|d| d.fixed()) {
        Some(s) if s > 0 => Ok(s as u32),
        _ => bail!("`images` of the train step has no fixed size; export it with --image-size"),
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let comm = distributed::communicator()?;
    distributed::or_abort(&comm, run_rank(args, &comm))
}

fn run_rank(args: TrainArgs, comm: &Arc<dyn Communicator>) -> Result<()> {
    let (rank, ranks) = (comm.rank(), comm.size());
    let has_checkpoint = checkpoint::latest(&args.out)
        .with_context(|| format!("looking for checkpoints in {}", args.out.display()))?
        .is_some();
    if args.resume && !has_checkpoint {
        bail!("--resume: no checkpoint in {}", args.out.display());
    }
    let backend = open_backend(args.backend.backend, &args.backend.options())
        .context("opening the backend")?;
    let artifact = artifact(&args, has_checkpoint, ranks, rank == 0)?;
    let size = image_size(&artifact)?;
    let train = samples(&args, size, Split::Train)?.context("no training samples")?;
    let data = Shuffled::new(train, args.batch_size)
        .and_then(|d| d.shard(rank, ranks))
        .context("batching the training data")?;
    let mut options = TrainOptions::new(&args.out);
    options.seed = args.seed;
    options.checkpoint_every = args.checkpoint_every;
    options.length = match (args.steps, args.epochs) {
        (Some(s), _) => Length::Steps(s),
        (None, Some(e)) => Length::Epochs(e),
        (None, None) => Length::Epochs(10),
    };
    let total = match options.length {
        Length::Steps(s) => s,
        Length::Epochs(e) => e * densa_runtime::train::DataSource::batches_per_epoch(&data),
    };
    let peak = artifact
        .manifest()
        .input("optim.lr")
        .and_then(|e| e.default)
        .context("the artifact has no `optim.lr` input")?;
    let schedule = WarmupCosine {
        input: "optim.lr".into(),
        peak,
        floor: 0.0,
        warmup: args.warmup,
        total,
    };
    let eval_graph = artifact.eval_graph().cloned();
    let mut trainer = if has_checkpoint {
        if rank == 0 {
            eprintln!("densa: resuming from {}", args.out.display());
        }
        Trainer::resume(
            &args.out,
            artifact,
            backend.as_ref(),
            data,
            schedule,
            options,
        )
    } else {
        Trainer::new(artifact, backend.as_ref(), data, schedule, options)
    }
    .context("starting the trainer")?
    .data_parallel(backend.as_ref(), comm.clone())
    .context("starting data-parallel training")?;
    if rank == 0 {
        eprintln!("densa: training on backend {}", backend.label());
    }
    let summary = trainer.run().context("training")?;
    if rank != 0 {
        return Ok(());
    }
    distributed::report(&trainer);
    println!(
        "step {} (epoch {}), last loss {}, log {}{}",
        summary.position.step,
        summary.position.epoch,
        summary
            .last_loss
            .map_or("-".to_string(), |l| format!("{l:.5}")),
        summary.log.display(),
        summary
            .checkpoint
            .as_ref()
            .map_or(String::new(), |c| format!(", checkpoint {}", c.display()))
    );
    if summary.stop == StopReason::Interrupted {
        println!("interrupted; run the same command again to resume");
        return Ok(());
    }
    if let Some(eval) = &eval_graph {
        let classes = class_names(&args)?;
        let arch = eval
            .graph
            .as_ref()
            .and_then(|g| g.name.strip_prefix("densa-"))
            .and_then(|n| n.strip_suffix("-classify"))
            .map(str::to_string)
            .unwrap_or_else(|| args.arch.name().to_string());
        let deployed = deployed_classifier(eval, &trainer.state(), &arch, &classes, size)
            .context("the deployed classifier")?;
        let path = args.out.join("model.onnx");
        densa_exporter::io::save(&deployed, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("classifier {}", path.display());
    }
    if let (Some(eval), Some(held_out)) = (eval_graph, samples(&args, size, Split::HeldOut)?) {
        let eval = eval_with_state(&eval, &trainer.state()).context("the eval graph")?;
        let (correct, n) = evaluate(backend.as_ref(), &eval, held_out, args.batch_size)?;
        let acc = correct as f64 / n as f64;
        println!("held-out accuracy {acc:.4} ({correct}/{n})");
        let path = args.out.join("eval.json");
        let json = serde_json::json!({"held_out_accuracy": acc, "correct": correct, "samples": n,
                                      "step": summary.position.step});
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Runs the eval graph (`images` -> `logits`) over `samples`; returns (correct, total).
pub fn evaluate(
    backend: &dyn Backend,
    eval: &densa_exporter::onnx::ModelProto,
    mut samples: Box<dyn Samples>,
    batch_size: usize,
) -> Result<(usize, usize)> {
    let mut session = backend
        .load_model(eval, "eval.onnx")
        .context("loading eval.onnx")?;
    let mut rng = densa_runtime::train::BatchAt {
        seed: 0,
        epoch: 0,
        index: 0,
        step: 0,
    }
    .rng();
    let (mut correct, n) = (0usize, samples.len());
    let mut start = 0;
    while start < n {
        let end = (start + batch_size.max(1)).min(n);
        let mut images = Vec::new();
        let mut labels = Vec::new();
        for i in start..end {
            for (name, t) in samples.sample(i, &mut rng)? {
                match (name.as_str(), t) {
                    ("images", Tensor::F32(a)) => images.push(a),
                    ("labels", Tensor::I64(a)) => {
                        labels.push(a.iter().next().copied().unwrap_or(-1))
                    }
                    _ => {}
                }
            }
        }
        let views: Vec<_> = images.iter().map(|a| a.view()).collect();
        let batch: ArrayD<f32> = ndarray::stack(Axis(0), &views).context("stacking images")?;
        let out = session
            .run(vec![("images".into(), Tensor::F32(batch))])
            .context("running eval.onnx")?;
        let logits = out
            .into_iter()
            .find(|(n, _)| n == "logits")
            .context("eval.onnx has no `logits` output")?
            .1
            .to_f32();
        for (row, &label) in logits.axis_iter(Axis(0)).zip(&labels) {
            let pred = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |m, (i, &v)| if v > m.1 { (i, v) } else { m },
                )
                .0;
            correct += (pred as i64 == label) as usize;
        }
        start = end;
    }
    Ok((correct, n))
}
