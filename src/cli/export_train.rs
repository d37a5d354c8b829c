//! `densa export train`: a training artifact (train_step.onnx, eval.onnx, state.safetensors,
//! manifest.json) for a task, built by `densa_models::train_step`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use densa_exporter::weights;
use densa_models::export::WeightOptions;
use densa_models::train_step::{
    classifier_artifact, ClassifierConfig, OptimizerConfig, TrainStepConfig,
};
use densa_models::Arch;
use densa_runtime::train::Artifact;

/// What the artifact trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// Image classification: batch inputs `images` [N,3,S,S] and `labels` int64 [N], mean
    /// cross-entropy, metric `accuracy`.
    Classify,
}

/// The optimizer of the train step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimizerKind {
    /// torch.optim.SGD (momentum, L2 weight decay).
    Sgd,
    /// torch.optim.AdamW (decoupled weight decay).
    Adamw,
    /// LARS (trust ratio; biases and norm parameters excluded from decay and adaptation).
    Lars,
}

#[derive(Debug, Clone, Args)]
pub struct ExportTrainArgs {
    /// Architecture: resnet18, resnet34, resnet50 or resnet-edge.
    #[arg(long)]
    pub arch: Arch,
    /// The task.
    #[arg(long, value_enum, default_value = "classify")]
    pub task: Task,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: OptimizerKind,
    /// Default learning rate (the `optim.lr` input's default; schedules override it). Default:
    /// 0.1 for SGD, 1e-3 for AdamW, 0.2 for LARS.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Momentum (SGD, LARS).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Weight decay (L2 for SGD and LARS, decoupled for AdamW).
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm (adds the `clip.max_norm` input and the
    /// `grad_norm` metric).
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    /// Backbone weights (safetensors or a PyTorch checkpoint, torchvision names); `fc` is
    /// always initialised fresh. Without it: torchvision's random initialisation (--seed).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Prefix to strip from the checkpoint's keys; detected when unambiguous.
    #[arg(long)]
    pub strip_prefix: Option<String>,
    /// Height and width of the training images.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The artifact directory to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the gradient and update graphs for data-parallel training (`mpirun -np N
    /// densa train --artifact ...`).
    #[arg(long)]
    pub data_parallel: bool,
}

impl ExportTrainArgs {
    /// The optimizer configuration the arguments describe.
    pub fn optimizer(&self) -> OptimizerConfig {
        match self.optimizer {
            OptimizerKind::Sgd => {
                OptimizerConfig::sgd(self.lr.unwrap_or(0.1), self.momentum, self.weight_decay)
            }
            OptimizerKind::Adamw => {
                OptimizerConfig::adamw(self.lr.unwrap_or(1e-3), self.weight_decay)
            }
            OptimizerKind::Lars => {
                OptimizerConfig::lars(self.lr.unwrap_or(0.2), self.momentum, self.weight_decay)
            }
        }
    }
}

/// Builds the artifact the arguments describe (not written).
pub fn build(args: &ExportTrainArgs) -> Result<Artifact> {
    if args.classes < 2 {
        bail!(
            "--classes {}: a classifier needs at least 2 classes",
            args.classes
        );
    }
    if args.image_size < 32 {
        bail!(
            "--image-size {}: ResNets downsample by 32; use at least 32",
            args.image_size
        );
    }
    let state_dict = match &args.weights {
        Some(path) => Some(
            weights::load(path).with_context(|| format!("reading weights {}", path.display()))?,
        ),
        None => None,
    };
    let wopts = WeightOptions {
        state_dict: state_dict.as_ref(),
        strip_prefix: args.strip_prefix.as_deref(),
    };
    let mut step = TrainStepConfig::new(args.optimizer());
    step.data_parallel = args.data_parallel;
    if let Some(max_norm) = args.clip_grad_norm {
        step.clip = Some(densa_exporter::train::clip::ClipConfig {
            max_norm,
            ..Default::default()
        });
    }
    let config = ClassifierConfig {
        image_size: args.image_size,
        seed: args.seed,
        ..ClassifierConfig::new(args.arch, args.classes)
    };
    let (artifact, report) =
        classifier_artifact(&config, &wopts, &step).with_context(|| match &args.weights {
            Some(w) => format!(
                "building the {} train step with weights {}",
                args.arch,
                w.display()
            ),
            None => format!("building the {} train step", args.arch),
        })?;
    if let Some(prefix) = report.prefix.as_deref().filter(|p| !p.is_empty()) {
        eprintln!("densa: stripped the prefix `{prefix}` from the checkpoint's keys");
    }
    let unused: Vec<&String> = report
        .unused_keys
        .iter()
        .filter(|k| !k.starts_with("fc."))
        .collect();
    if !unused.is_empty() {
        eprintln!(
            "densa: ignored {} checkpoint key(s) the backbone does not use (first: {})",
            unused.len(),
            unused[0]
        );
    }
    Ok(artifact)
}

pub fn run(args: ExportTrainArgs) -> Result<()> {
    let artifact = build(&args)?;
    artifact
        .save(&args.out)
        .with_context(|| format!("writing the artifact to {}", args.out.display()))?;
    let m = artifact.manifest();
    let count = |f: fn(&densa_runtime::train::InputRole) -> bool| {
        m.inputs.iter().filter(|e| f(&e.role)).count()
    };
    println!(
        "wrote {} ({} {:?}, {}: {} params, {} buffers, {} optimizer slots, {} hyperparameters)",
        args.out.display(),
        args.arch,
        args.task,
        args.optimizer().name(),
        count(|r| *r == densa_runtime::train::InputRole::Param),
        count(|r| *r == densa_runtime::train::InputRole::Buffer),
        count(|r| *r == densa_runtime::train::InputRole::Optimizer),
        count(|r| *r == densa_runtime::train::InputRole::Hyper),
    );
    Ok(())
}
