//! `densa export ...`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use densa_exporter::weights;
use densa_models::export::{self, WeightOptions};
use densa_models::Arch;

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// A backbone as an inference graph: input `images` [N,3,H,W], outputs c2..c5.
    Backbone(BackboneArgs),
    /// A fine-tuned detector (`densa finetune --task detect` output) as a served model.
    Detector(super::export_detector::ExportDetectorArgs),
    /// A fine-tuned segmenter (`densa finetune --task segment` directory): outputs logits and
    /// class map at input resolution, self-describing metadata.
    Segmenter(super::export_segmenter::SegmenterArgs),
    /// A training artifact: train_step.onnx, eval.onnx, state.safetensors, manifest.json.
    Train(super::export_train::ExportTrainArgs),
}

#[derive(Debug, Args)]
pub struct BackboneArgs {
    /// Architecture: resnet18, resnet34, resnet50 or resnet-edge.
    #[arg(long)]
    pub arch: Arch,
    /// Weights: a safetensors file or a PyTorch checkpoint (.pth/.pt), torchvision names.
    /// Without it the backbone is randomly initialised (torchvision's scheme, --seed).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Prefix to strip from the checkpoint's keys (e.g. `module.encoder_q.`); detected when
    /// unambiguous.
    #[arg(long)]
    pub strip_prefix: Option<String>,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The .onnx file to write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(cmd: ExportCommand) -> Result<()> {
    match cmd {
        ExportCommand::Backbone(args) => backbone(args),
        ExportCommand::Detector(args) => super::export_detector::run(args),
        ExportCommand::Segmenter(args) => super::export_segmenter::run(args),
        ExportCommand::Train(args) => super::export_train::run(args),
    }
}

fn backbone(args: BackboneArgs) -> Result<()> {
    let state_dict = match &args.weights {
        Some(path) => Some(
            weights::load(path).with_context(|| format!("reading weights {}", path.display()))?,
        ),
        None => None,
    };
    let options = WeightOptions {
        state_dict: state_dict.as_ref(),
        strip_prefix: args.strip_prefix.as_deref(),
    };
    let (model, report) =
        export::backbone(args.arch, &options, args.seed).with_context(|| match &args.weights {
            Some(w) => format!("exporting {} with weights {}", args.arch, w.display()),
            None => format!("exporting {}", args.arch),
        })?;
    if let Some(prefix) = report.prefix.as_deref().filter(|p| !p.is_empty()) {
        eprintln!("densa: stripped the prefix `{prefix}` from the checkpoint's keys");
    }
    if !report.unused_keys.is_empty() {
        let shown: Vec<&str> = report
            .unused_keys
            .iter()
            .take(8)
            .map(String::as_str)
            .collect();
        let more = report.unused_keys.len().saturating_sub(shown.len());
        eprintln!(
            "densa: ignored {} checkpoint key(s) the backbone does not use: {}{}",
            report.unused_keys.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    densa_exporter::io::save(&model, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let summary = densa_exporter::inspect::summarize(&model);
    println!(
        "wrote {} ({}, {:.1} M parameters, opset {})",
        args.out.display(),
        args.arch,
        summary.parameters as f64 / 1e6,
        densa_exporter::builder::OPSET
    );
    Ok(())
}
