//! `densa pretrain`: self-supervised pretraining of a backbone with one of the pretext methods
//! of `densa methods`, on a folder of unlabelled images (or a `densa synth` output).
//!
//! The output directory holds `pretrain.json` (method, settings, backbone, batch, view size),
//! `artifact/` (the train step, so a resume never depends on rebuilding it), `checkpoints/`,
//! `train_log.jsonl`, `loss.png` and `backbone.safetensors` (the student backbone in
//! torchvision names: `densa finetune --init DIR` and `densa export backbone --weights` take it).
//! Running the same command again resumes from the newest checkpoint; a different method or
//! settings on an existing run is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use densa_exporter::weights::save_safetensors;
use densa_models::pretext::data::{image_files, PretextSamples, PretextSource};
use densa_models::pretext::{self, backbone_state, Pretext, PretextContext, Settings};
use densa_models::train_step::{train_step_artifact, TrainStepConfig};
use densa_models::Arch;
use densa_runtime::open_backend;
use densa_runtime::train::Communicator;
use densa_runtime::train::{
    checkpoint, Artifact, DataSource, Length, Samples, Shuffled, StopReason, TrainOptions, Trainer,
    WarmupCosine,
};
use serde::{Deserialize, Serialize};

use super::{distributed, BackendArgs};

#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Pretext method (`densa methods` lists them): mocov2, densecl, ...
    #[arg(long)]
    pub method: String,
    /// Backbone architecture: resnet18, resnet34, resnet50 or resnet-edge.
    #[arg(long, default_value = "resnet-edge")]
    pub arch: Arch,
    /// Folder of unlabelled images (searched recursively), or a `densa synth` output (its
    /// `images/` folder is used).
    #[arg(long)]
    pub data: PathBuf,
    /// Training epochs (passes over the images); or --steps.
    #[arg(long, conflicts_with = "steps")]
    pub epochs: Option<u64>,
    /// Training steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Side of the (large) views in pixels (the papers use 224).
    #[arg(long, default_value_t = 64)]
    pub image_size: u32,
    /// Override a hyperparameter of the method (repeatable): `--set temperature=0.1`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// A TOML file of hyperparameter overrides (flat `key = value`); --set wins over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Checkpoint every this many steps (also on Ctrl-C and at the end).
    #[arg(long, default_value_t = 200)]
    pub checkpoint_every: u64,
    /// Seed of the initial weights, the views and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (an existing run there is resumed).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// What a run was started with: a resume must match it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub method: String,
    pub arch: String,
    pub batch: usize,
    pub image_size: u32,
    pub seed: u64,
    /// Every hyperparameter, resolved.
    pub settings: std::collections::BTreeMap<String, String>,
    /// The processes it trains on (`mpirun -np N`; 1 in a spec written before this field):
    /// `batch` is per process, so the global batch, the data order and the learning rate all
    /// depend on it.
    #[serde(default = "one_process")]
    pub processes: usize,
}

fn one_process() -> usize {
    1
}

impl RunSpec {
    /// Refuses to resume the run whose spec `out` holds unless this launch matches it.
    pub(super) fn check_resume(&self, out: &Path) -> Result<()> {
        let path = out.join(SPEC_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} to resume", path.display()))?;
        let old: RunSpec =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        distributed::check_process_count(out, old.processes, self.processes)
            .with_context(|| format!("resuming `{}`", old.method))?;
        if old != *self {
            bail!(
                "{} holds a run of `{}` with other settings ({}); use another --out, or the same \
                 arguments to resume it",
                out.display(),
                old.method,
                path.display()
            );
        }
        Ok(())
    }
}

pub const SPEC_FILE: &str = "pretrain.json";
pub const BACKBONE_FILE: &str = "backbone.safetensors";

pub(super) fn overrides(args: &PretrainArgs) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    if let Some(path) = &args.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        out.extend(
            Settings::parse_toml(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("parsing {}", path.display()))?,
        );
    }
    out.extend(Settings::parse_assignments(&args.set).map_err(anyhow::Error::msg)?);
    Ok(out)
}

/// The images of `data`: its `images/` folder when it is a `densa synth` output.
pub(super) fn data_dir(data: &Path) -> Result<PathBuf> {
    if !data.is_dir() {
        bail!("--data {}: not a folder of images", data.display());
    }
    let images = data.join("images");
    Ok(if images.is_dir() {
        images
    } else {
        data.to_path_buf()
    })
}

pub fn run(args: PretrainArgs) -> Result<()> {
    let comm = distributed::communicator()?;
    if pretext::method_info(&args.method)?.family.is_detector() {
        let result = super::pretrain_detr::run(args, &comm);
        return distributed::or_abort(&comm, result);
    }
    distributed::or_abort(&comm, run_rank(args, &comm))
}

/// Pretrains a backbone method on this rank of `comm`.
///
/// Every backbone method runs data parallel, and its run is the doubled-batch run up to batch
/// norm (see `densa_runtime::train::distributed`): the loss is a mean of per-image terms, the
/// momentum teacher is identical on every rank, and the only other cross-step state is queues
/// of keys, which the trainer gathers from every rank (MoCo's `concat_all_gather`; DetCo's 12),
/// or centres, which it averages (DINO's all-reduced batch centre; SCFS). Values of the whole
/// batch are computed between the halves of the gradient graph with every rank: SwAV's
/// Sinkhorn codes (all-reduced sums, SwAV's `distributed_sinkhorn`), and the counts behind
/// means over valid entries (LC-loss's locations, CCOP's boxes, DenseSiam's overlapping view
/// pairs: summed). RegionCL swaps regions with a partner in each rank's own batch (image
/// `B-1-i`), as its official code does on each GPU (`torch.arange(B - 1, -1, -1)` on the local
/// batch): N ranks of B are its multi-GPU run, not one process of N x B. DenseSiam's region
/// term contrasts an image's regions with the same image's other regions only, so the batch
/// does not enter it.
fn run_rank(args: PretrainArgs, comm: &Arc<dyn Communicator>) -> Result<()> {
    let (rank, ranks) = (comm.rank(), comm.size());
    let method: Arc<dyn Pretext> = Arc::from(pretext::create(&args.method, &overrides(&args)?)?);
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
    if args.batch < 2 {
        bail!(
            "--batch {}: contrastive methods need at least 2 images per step",
            args.batch
        );
    }
    let ctx = PretextContext {
        arch: args.arch.config(),
        batch: args.batch,
        image_size: args.image_size,
        seed: args.seed,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let has_checkpoint = checkpoint::latest(&args.out)
        .with_context(|| format!("looking for checkpoints in {}", args.out.display()))?
        .is_some();
    let spec_path = args.out.join(SPEC_FILE);
    let artifact_dir = args.out.join("artifact");
    let artifact = if has_checkpoint {
        spec.check_resume(&args.out)?;
        if rank == 0 {
            eprintln!(
                "densa: resuming {} from {}",
                spec.method,
                args.out.display()
            );
        }
        Artifact::load(&artifact_dir)
            .with_context(|| format!("loading {}", artifact_dir.display()))?
    } else {
        if rank == 0 {
            eprintln!(
                "densa: building the {} train step ({} at {}px, batch {}{})",
                spec.method,
                spec.arch,
                spec.image_size,
                spec.batch,
                distributed::ranks_note(ranks)
            );
        }
        let forward = method
            .build(&ctx)
            .context("building the pretraining graph")?;
        // The learning rate follows the global batch (every rank's images).
        let mut config = TrainStepConfig::new(method.optimizer(args.batch * ranks)?);
        config.task = Some("pretrain".into());
        config.data_parallel = ranks > 1;
        let artifact = train_step_artifact(forward, None, &config)
            .context("composing the pretraining train step")?;
        if rank == 0 {
            artifact
                .save(&artifact_dir)
                .with_context(|| format!("writing {}", artifact_dir.display()))?;
            std::fs::write(&spec_path, serde_json::to_string_pretty(&spec)?)
                .with_context(|| format!("writing {}", spec_path.display()))?;
        }
        artifact
    };

    let dir = data_dir(&args.data)?;
    let files = image_files(&dir)?;
    if files.is_empty() {
        bail!("--data {}: no images (png, jpg, bmp, webp)", dir.display());
    }
    let (samples, skipped) = PretextSamples::new(files, method.clone(), ctx);
    for s in &skipped {
        eprintln!("densa: skipping {}: {}", s.path.display(), s.problem);
    }
    if method.prepares_images() {
        // Per-image work done once (CCOP's selective search), cached in memory.
        let bar = if rank == 0 {
            super::adapt::progress(samples.len() as u64, "preparing images")
        } else {
            indicatif::ProgressBar::hidden()
        };
        samples
            .prepare(&|| bar.inc(1))
            .context("preparing the images")?;
        bar.finish_and_clear();
    }
    let n = samples.len();
    for (key, value) in method.settings().iter() {
        if key.starts_with("queue") {
            if let pretext::HyperValue::Int(k) = value {
                if *k as usize > n {
                    eprintln!(
                        "densa: warning: {key} = {k} exceeds the {n} images: the queue holds \
                         several keys of the same image (--set {key}=... to shrink it)"
                    );
                }
            }
        }
    }
    let data = PretextSource::new(
        Shuffled::new(samples, args.batch)
            .and_then(|d| d.shard(rank, ranks))
            .context("batching the images")?,
    );
    let per_epoch = data.batches_per_epoch();
    let length = match (args.steps, args.epochs) {
        (Some(s), _) => Length::Steps(s),
        (None, Some(e)) => Length::Epochs(e),
        (None, None) => Length::Epochs(100),
    };
    let total = match length {
        Length::Steps(s) => s,
        Length::Epochs(e) => e * per_epoch,
    };
    data.samples().set_total_steps(total);
    let lr = artifact
        .manifest()
        .input("optim.lr")
        .and_then(|e| e.default)
        .context("the artifact has no `optim.lr` input")?;
    let cosine = WarmupCosine {
        input: "optim.lr".into(),
        peak: lr,
        floor: 0.0,
        warmup: method.settings().i64("warmup_steps").max(0) as u64,
        total,
    };
    let m = method.clone();
    let schedule = move |step: u64| {
        let mut v = vec![("optim.lr".to_string(), cosine.at(step))];
        v.extend(m.schedule(step, total));
        v
    };
    let mut options = TrainOptions::new(&args.out);
    options.seed = args.seed;
    options.length = length;
    options.checkpoint_every = args.checkpoint_every;
    let backend = open_backend(args.backend.backend, &args.backend.options())
        .context("opening the backend")?;
    if rank == 0 {
        eprintln!(
            "densa: pretraining {} on {n} images ({per_epoch} steps per epoch, {total} steps{}), backend {}",
            spec.method,
            distributed::ranks_note(ranks),
            backend.label()
        );
    }
    let mut trainer = if has_checkpoint {
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
    let summary = trainer.run().context("pretraining")?;
    if rank != 0 {
        return Ok(());
    }
    distributed::report(&trainer);
    let backbone = backbone_state(&args.arch.config(), &trainer.state())?;
    let path = args.out.join(BACKBONE_FILE);
    save_safetensors(&backbone, &path).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "step {} (epoch {}), last loss {}, backbone {} ({} tensors), log {}",
        summary.position.step,
        summary.position.epoch,
        summary
            .last_loss
            .map_or("-".to_string(), |l| format!("{l:.5}")),
        path.display(),
        backbone.len(),
        summary.log.display(),
    );
    if summary.stop == StopReason::Interrupted {
        println!("interrupted; run the same command again to resume");
    }
    Ok(())
}
