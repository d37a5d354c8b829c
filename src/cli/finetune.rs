//! `densa finetune --task detect|segment ...`: fine-tunes a detector or a segmenter from a
//! backbone (random, imported or self-supervised) on a COCO-format dataset. The arguments are
//! shared; each task lives in its own module.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use densa_models::Arch;

use super::BackendArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// FCOS-style one-stage detector.
    Detect,
    /// Semantic segmentation head on the FPN.
    Segment,
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// What to train.
    #[arg(long)]
    pub task: Task,
    /// Backbone architecture: resnet18, resnet34, resnet50 or resnet-edge.
    #[arg(long, default_value = "resnet-edge")]
    pub arch: Arch,
    /// Training annotations, COCO instances JSON (`densa synth` writes one).
    #[arg(long)]
    pub data: PathBuf,
    /// Folder of the training images (default: `images/` beside --data).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Validation annotations (COCO JSON); validated every --val-every epochs, best kept.
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Folder of the validation images (default: `images/` beside --val-data).
    #[arg(long)]
    pub val_images: Option<PathBuf>,
    /// Semantic masks folder for `--task segment` (default: `masks/` beside --data).
    #[arg(long)]
    pub masks: Option<PathBuf>,
    /// Validation masks folder for `--task segment` (default: `masks/` beside --val-data).
    #[arg(long)]
    pub val_masks: Option<PathBuf>,
    /// Backbone initialisation: `random`, or a weights file (safetensors, .pth) or a
    /// pretraining checkpoint directory.
    #[arg(long, default_value = "random")]
    pub init: String,
    /// Train on this fraction of the labelled images (deterministic per --seed), e.g. 0.1.
    #[arg(long)]
    pub label_fraction: Option<f64>,
    /// Train on K images per class (k-shot; deterministic per --seed).
    #[arg(long, conflicts_with = "label_fraction")]
    pub shots: Option<usize>,
    /// Keep the backbone's weights fixed; train the neck and heads only.
    #[arg(long)]
    pub freeze_backbone: bool,
    /// Training epochs.
    #[arg(long, default_value_t = 12)]
    pub epochs: u64,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Peak learning rate (default: the task's).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Square training input size in pixels (default: the task's).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Validate every N epochs.
    #[arg(long, default_value_t = 1)]
    pub val_every: u64,
    /// Seed of initialisation, subsets, augmentation and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory: artifacts, checkpoints, logs, best checkpoint. An existing run there
    /// is resumed from its last checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub backend: BackendArgs,
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    match args.task {
        Task::Detect => super::finetune_detect::run(&args),
        Task::Segment => super::finetune_segment::run(&args),
    }
}
