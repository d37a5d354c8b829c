//! The training engine's host side: artifacts, the trainer loop, checkpoints and logs
//! (cargo feature `train`, on by default; inference-only builds leave it out).
//!
//! A training step is one ONNX graph (see DESIGN.md, "The one idea"): batch + state +
//! hyperparameters in; loss, metrics and new state out. This module runs such graphs:
//!
//! - [`manifest`]: the artifact directory and its `manifest.json` (roles of every input and
//!   output), validation against the graph, [`Artifact::load`] / [`Artifact::save`].
//! - [`trainer`]: [`Trainer`], the loop (state swapping, non-finite handling, Ctrl-C).
//! - [`data`]: [`DataSource`] (batches as a function of seed, epoch, index) and [`Shuffled`].
//! - [`distributed`]: data-parallel training ([`Communicator`]: one process, threads, MPI with
//!   the cargo feature `mpi`; [`Trainer::data_parallel`]; [`Shuffled::shard`]).
//! - [`schedule`]: host-side hyperparameter schedules ([`Schedule`], [`WarmupCosine`]).
//! - [`checkpoint`]: atomic checkpoints and exact resume.
//! - [`log`]: the JSONL step log, the PNG loss curve, the progress bar.
//! - [`toy`]: a two-layer MLP regression train step with hand-written gradients, and its data:
//!   the reference the engine is tested on.
//!
//! ```no_run
//! use densa_runtime::train::{toy, Artifact, Shuffled, Trainer, TrainOptions, Length, WarmupCosine};
//! use densa_runtime::backend::tract::TractBackend;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let artifact = Artifact::load("mlp-artifact".as_ref())?;
//! let data = Shuffled::new(toy::RegressionSamples::new(256, 4, 0), 16)?;
//! let lr = WarmupCosine { input: "lr".into(), peak: 0.1, floor: 0.0, warmup: 10, total: 300 };
//! let mut options = TrainOptions::new("runs/mlp");
//! options.length = Length::Epochs(20);
//! let summary = Trainer::new(artifact, &TractBackend, data, lr, options)?.run()?;
//! println!("loss {:?} after {} steps", summary.last_loss, summary.position.step);
//! # Ok(()) }
//! ```

pub mod checkpoint;
pub mod classify;
pub mod data;
pub mod distributed;
pub mod log;
pub mod manifest;
pub mod schedule;
pub mod toy;
pub mod trainer;

use std::path::PathBuf;

pub use checkpoint::{CheckpointError, CheckpointManifest, CheckpointReason};
pub use data::{Batch, BatchAt, DataError, DataSource, FnSource, Samples, Shuffled};
pub use distributed::{
    from_env, launched_local_rank, sinkhorn_codes, Communicator, LocalGroup, SingleProcess,
};
pub use log::{plot_series, LogError, Series, StepRecord};
pub use manifest::{
    Artifact, InputEntry, InputRole, Manifest, ManifestError, OutputEntry, OutputRole,
};
pub use schedule::{Defaults, Schedule, WarmupCosine};
pub use trainer::{CommStats, Length, Position, StopReason, TrainOptions, TrainSummary, Trainer};

use crate::backend::BackendError;

/// Why training could not start or continue. Each variant names the step, file or input.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("step {step}: {source}")]
    Data { step: u64, source: DataError },
    #[error("{source_name}: no batch in an epoch")]
    EmptyData { source_name: String },
    #[error("{source_name}: batch tensor `{name}` is not a batch input of the train step (batch inputs: {expected})")]
    BatchInput {
        source_name: String,
        name: String,
        expected: String,
    },
    #[error("step {step}: the schedule sets `{name}`, which is not a hyper input (hyper inputs: {expected})")]
    Schedule {
        step: u64,
        name: String,
        expected: String,
    },
    #[error("step {step}: {in_row} non-finite steps in a row (last: {last}); stopping. Lower the learning rate or check the data; the last checkpoint holds the last finite state")]
    NonFinite {
        step: u64,
        in_row: u32,
        last: String,
    },
    #[error("step {step}: the new value of `{name}` is {got}, the state is {expected}")]
    StateShape {
        step: u64,
        name: String,
        expected: String,
        got: String,
    },
    #[error("{path}: state `{name}` {problem}")]
    CheckpointState {
        path: PathBuf,
        name: String,
        problem: String,
    },
    #[error("cannot resume from {checkpoint}: its {field} is {in_checkpoint}, now {now}")]
    Resume {
        checkpoint: PathBuf,
        field: String,
        in_checkpoint: String,
        now: String,
    },
    #[error("{artifact}: data parallel: {problem}")]
    DataParallel { artifact: String, problem: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}
