//! Subcommands. Each lives in its own module; errors carry the file and the step (anyhow
//! context) and end the process with a non-zero status.

mod adapt;
mod adapt_classify;
mod adapt_dense;
mod demo;
mod detect;
mod distributed;
mod eval;
mod eval_detect;
mod eval_segment;
mod export;
mod export_detector;
mod export_segmenter;
mod export_train;
mod finetune;
mod finetune_detect;
mod finetune_detr;
mod finetune_segment;
mod inspect;
mod methods;
mod plot;
mod pretrain;
mod pretrain_detr;
mod proposals;
mod run;
mod segment;
mod synth;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use densa_runtime::{BackendKind, BackendOptions, Device};

/// densa: self-supervised pretraining, fine-tuning, export and edge serving of dense-prediction
/// models, with ONNX as the only graph format.
#[derive(Debug, Parser)]
#[command(name = "densa", version, about, long_about = None)]
pub struct Cli {
    /// More logging (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Export a model to ONNX.
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// Run any ONNX model on .npy inputs and write every output to an .npz file.
    Run(run::RunArgs),
    /// Describe an ONNX model: inputs, outputs, ops, parameters, FLOPs, metadata.
    Inspect(inspect::InspectArgs),
    /// Plot numeric fields of JSONL logs (val.jsonl, train_log.jsonl) as curves in a PNG.
    Plot(plot::PlotArgs),
    /// Detect objects in images with a detector (densa export, or any ONNX detector + --spec).
    Detect(detect::DetectArgs),
    /// Time a model on a backend (used by the benchmarks in benches/).
    Bench(run::BenchArgs),
    /// Evaluate predictions: COCO AP (pycocotools-equal), semantic segmentation mIoU.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Fine-tune a detector or a segmenter on COCO-format data.
    Finetune(finetune::FinetuneArgs),
    /// Write a synthetic scene dataset: images, COCO JSON, semantic masks.
    Synth(synth::SynthArgs),
    /// The whole pipeline on synthetic data: pretrain, fine-tune, export, serve, evaluate.
    Demo(DemoArgs),
    /// Segment images with a segmenter exported by densa: label PNGs and colour overlays.
    Segment(segment::SegmentArgs),
    /// Train a classifier (image folder or synthetic data) with checkpoints and resume.
    Train(train::TrainArgs),
    /// Self-supervised pretraining of a backbone with a pretext method (`densa methods`).
    Pretrain(pretrain::PretrainArgs),
    /// List the pretext methods with their papers and default hyperparameters.
    Methods(methods::MethodsArgs),
    /// Adapt a deployed detector, segmenter or classifier .onnx on the device's images (labeled or not); writes a new .onnx.
    Adapt(adapt::AdaptArgs),
    /// Region proposals by selective search (boxes printed, drawn, or written as JSON).
    Proposals(proposals::ProposalsArgs),
}

/// Backend selection, shared by the commands that run models.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Execution backend: auto (ONNX Runtime if found, else tract), tract, or ort.
    #[arg(long, default_value = "auto")]
    pub backend: BackendKind,
    /// Intra-op threads for ONNX Runtime (default: the runtime's choice).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Never fetch the ONNX Runtime library with pip when it is missing.
    #[arg(long)]
    pub no_download: bool,
    /// Where to run: cpu, or cuda[:N] (ONNX Runtime's CUDA provider; needs the onnxruntime-gpu
    /// build and CUDA 13; without them densa says why and runs on the CPU). `cuda` without N
    /// under `mpirun` (or `srun`) gives each process on a machine its own GPU, by its local
    /// rank (modulo the GPUs in CUDA_VISIBLE_DEVICES when set); `cuda:N` puts every process on
    /// GPU N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
}

/// `--device`: a device, or `cuda` for each process's own GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// This device, whatever the launch.
    Fixed(Device),
    /// GPU number local rank (0 outside a multi-process launch), modulo the visible GPUs
    /// when their number is known.
    RanksGpu,
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cuda" | "gpu" => Ok(DeviceArg::RanksGpu),
            _ => s.parse().map(DeviceArg::Fixed),
        }
    }
}

impl DeviceArg {
    /// The device of the process with this local rank, `visible` GPUs (CUDA_VISIBLE_DEVICES;
    /// a launcher that gives each process one GPU makes it GPU 0 of each).
    pub fn resolve(self, local_rank: Option<usize>, visible: Option<usize>) -> Device {
        match self {
            DeviceArg::Fixed(d) => d,
            DeviceArg::RanksGpu => {
                let rank = local_rank.unwrap_or(0);
                let gpu = match visible {
                    Some(n) if n > 0 => rank % n,
                    _ => rank,
                };
                Device::Cuda(gpu as i32)
            }
        }
    }
}

/// How many GPUs CUDA_VISIBLE_DEVICES lists (`None` when it is not set).
fn visible_gpus() -> Option<usize> {
    let list = std::env::var("CUDA_VISIBLE_DEVICES").ok()?;
    Some(list.split(',').filter(|d| !d.trim().is_empty()).count())
}

impl BackendArgs {
    pub fn options(&self) -> BackendOptions {
        BackendOptions {
            threads: self.threads,
            allow_download: !self.no_download,
            device: self.device.resolve(local_rank(), visible_gpus()),
            // Benchmarks compare the GPU step with and without the state kept on the device.
            resident_state: match std::env::var("DENSA_RESIDENT_STATE").as_deref() {
                Ok("0") => Some(false),
                Ok("1") => Some(true),
                _ => None,
            },
        }
    }
}

/// This process's rank on its machine, when a launcher says it (a malformed value is warned
/// about and taken as none: the run goes on GPU 0).
fn local_rank() -> Option<usize> {
    densa_runtime::train::launched_local_rank().unwrap_or_else(|e| {
        tracing::warn!("{e}; using GPU 0");
        None
    })
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo writes its data, models and report.
    #[arg(long, default_value = "densa-demo")]
    pub out: PathBuf,
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(cli: Cli) -> Result<()> {
    let data_parallel = matches!(
        cli.command,
        Command::Train(_) | Command::Pretrain(_) | Command::Finetune(_)
    );
    if !data_parallel {
        // N copies of a single-process command would write the same outputs N times over.
        if let Some((var, n)) = densa_runtime::train::distributed::launched_size()? {
            if n > 1 {
                anyhow::bail!(
                    "launched as {n} processes ({var}={n}), but only `densa train`, `pretrain` \
                     and `finetune` run data parallel; run this command without mpirun"
                );
            }
        }
    }
    match cli.command {
        Command::Export(cmd) => export::run(cmd),
        Command::Run(args) => run::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Bench(args) => run::bench(args),
        Command::Detect(args) => detect::run(args),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Synth(args) => synth::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Segment(args) => segment::run(args),
        Command::Train(args) => train::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Methods(args) => methods::run(args),
        Command::Adapt(args) => adapt::run(args),
        Command::Proposals(args) => proposals::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_cuda_is_each_processs_own_gpu() {
        let cuda: DeviceArg = "cuda".parse().unwrap();
        assert_eq!(cuda.resolve(None, None), Device::Cuda(0));
        assert_eq!(cuda.resolve(Some(3), None), Device::Cuda(3));
        // Four GPUs for eight processes: two per GPU.
        assert_eq!(cuda.resolve(Some(5), Some(4)), Device::Cuda(1));
        // One visible GPU per process (a launcher's per-task CUDA_VISIBLE_DEVICES).
        assert_eq!(cuda.resolve(Some(3), Some(1)), Device::Cuda(0));
        let pinned: DeviceArg = "cuda:2".parse().unwrap();
        assert_eq!(pinned.resolve(Some(3), Some(4)), Device::Cuda(2));
        let cpu: DeviceArg = "cpu".parse().unwrap();
        assert_eq!(cpu.resolve(Some(1), None), Device::Cpu);
        assert!("tpu".parse::<DeviceArg>().is_err());
    }
}
