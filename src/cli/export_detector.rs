//! `densa export detector --ckpt DIR --out MODEL.onnx [--top-k K] [--nms-in-graph]`: a fine-tuned detector as a
//! self-describing inference model: batch norm folded, decoding in the graph (boxes in input
//! pixels, scores, labels; top-k over locations x classes), and the `densa.spec` metadata
//! (input size, letterbox, normalisation, output layout, class names) that lets
//! `densa detect MODEL.onnx imgs/` serve it with no other argument.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use densa_exporter::onnx::ModelProto;
use densa_exporter::weights::{load_safetensors, StateDict};
use densa_models::detect::DetectorConfig;
use densa_runtime::infer::spec::{
    Channels, InputLayout, InputSpec, ModelSpec, OutputLayout, OutputSpec, ResizeMode,
};
use densa_runtime::train::checkpoint;

/// The fine-tuning output's detector description.
pub const CONFIG_FILE: &str = "detector.json";
/// The best checkpoint's folder inside a fine-tuning output.
pub const BEST_DIR: &str = "best";
/// The state file of `best/`.
pub const STATE_FILE: &str = "state.safetensors";

#[derive(Debug, Args)]
pub struct ExportDetectorArgs {
    /// A `densa finetune --task detect` output directory (its best checkpoint, else its newest),
    /// or a folder with `detector.json` and `state.safetensors`.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// The .onnx file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Candidates kept per image before NMS.
    #[arg(long, default_value_t = 100)]
    pub top_k: usize,
    /// Suppress in the graph (class-aware, ONNX NonMaxSuppression; runs on ONNX Runtime and
    /// tract) instead of on the host. The model then takes one image `images [3, S, S]` and
    /// outputs the kept detections `boxes [M, 4]`, `scores [M]`, `labels [M]`; its spec says
    /// CHW input and no host NMS, so `densa detect` serves it one image per run.
    #[arg(long)]
    pub nms_in_graph: bool,
    /// IoU threshold of the NMS (in the graph with --nms-in-graph, else written into the spec
    /// for the host).
    #[arg(long, default_value_t = 0.6)]
    pub nms_iou: f32,
    /// Keep the backbone's batch norms as BatchNormalization nodes instead of folding them
    /// (so that `densa adapt --method bn-stats` can re-estimate their statistics on a device).
    #[arg(long)]
    pub keep_batch_norm: bool,
}

/// The serving spec of a detector: letterboxed square input, `pixel / 255` then the config's
/// mean/std, boxes-scores-labels outputs with class-aware NMS on the host.
pub fn detector_spec(config: &DetectorConfig, nms_iou: f32) -> ModelSpec {
    letterbox_spec(
        config.image_size,
        config.mean,
        config.std,
        config.classes.clone(),
        Some(nms_iou),
    )
}

/// The spec every densa detector export shares: input `images` NCHW letterboxed to `size`
/// (pad 114), `pixel / 255` then `mean`/`std`, outputs `boxes`, `scores`, `labels`; with
/// `host_nms = Some(iou)` class-aware NMS on the host, with `None` the outputs are final.
pub fn letterbox_spec(
    size: u32,
    mean: [f32; 3],
    std: [f32; 3],
    classes: Vec<String>,
    host_nms: Option<f32>,
) -> ModelSpec {
    ModelSpec {
        input: InputSpec {
            name: Some("images".into()),
            layout: InputLayout::Nchw,
            size: [size, size],
            resize: ResizeMode::Letterbox,
            pad_value: 114,
            scale: 1.0 / 255.0,
            mean,
            std,
            channels: Channels::Rgb,
        },
        output: OutputSpec {
            layout: OutputLayout::BoxesScoresLabels,
            boxes: "boxes".into(),
            scores: "scores".into(),
            labels: "labels".into(),
            label_offset: 0,
            nms_iou: host_nms.unwrap_or(1.0),
            host_nms: host_nms.is_some(),
            classes,
        },
    }
}

/// The serving spec of a detector with NMS in the graph: one CHW image per run, outputs
/// already suppressed (the `boxes-scores-labels` layout without host NMS, as torchvision's
/// exports).
pub fn detector_spec_nms_in_graph(config: &DetectorConfig, nms_iou: f32) -> ModelSpec {
    let mut spec = detector_spec(config, nms_iou);
    spec.input.layout = InputLayout::Chw;
    spec.output.host_nms = false;
    spec
}

/// The inference model of `config` with `state`, carrying its spec.
pub fn detector_model(
    config: &DetectorConfig,
    state: &StateDict,
    top_k: usize,
    nms_iou: f32,
) -> Result<ModelProto> {
    let spec = detector_spec(config, nms_iou).to_toml();
    Ok(config.inference_graph(
        Some(state),
        top_k,
        &[(densa_runtime::infer::spec::SPEC_KEY, spec.as_str())],
    )?)
}

/// [`detector_model`] with class-aware NMS (IoU `nms_iou`) in the graph.
pub fn detector_model_nms_in_graph(
    config: &DetectorConfig,
    state: &StateDict,
    top_k: usize,
    nms_iou: f32,
) -> Result<ModelProto> {
    let spec = detector_spec_nms_in_graph(config, nms_iou).to_toml();
    Ok(config.inference_graph_with(
        Some(state),
        top_k,
        Some(nms_iou),
        &[(densa_runtime::infer::spec::SPEC_KEY, spec.as_str())],
    )?)
}

/// Reads `detector.json` in `dir`.
pub fn read_config(dir: &Path) -> Result<DetectorConfig> {
    let path = dir.join(CONFIG_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The detector config and state a `--ckpt` names (see [`ExportDetectorArgs::ckpt`]).
pub fn load_checkpoint(dir: &Path) -> Result<(DetectorConfig, StateDict, PathBuf)> {
    let best = dir.join(BEST_DIR);
    let (config_dir, state_path) = if best.join(STATE_FILE).is_file() {
        (best.clone(), best.join(STATE_FILE))
    } else if dir.join(STATE_FILE).is_file() {
        (dir.to_path_buf(), dir.join(STATE_FILE))
    } else {
        match checkpoint::latest(dir).with_context(|| format!("reading {}", dir.display()))? {
            Some(step_dir) => {
                let config = read_config(dir)?;
                let (_, state) = checkpoint::read(&step_dir)
                    .with_context(|| format!("reading checkpoint {}", step_dir.display()))?;
                return Ok((config, state, step_dir));
            }
            None => bail!(
                "{}: no detector checkpoint here (expected {BEST_DIR}/{STATE_FILE}, {STATE_FILE} \
                 with {CONFIG_FILE}, or a `densa finetune --task detect` output with checkpoints)",
                dir.display()
            ),
        }
    };
    let config = read_config(&config_dir)?;
    let state = load_safetensors(&state_path)
        .with_context(|| format!("reading {}", state_path.display()))?;
    Ok((config, state, state_path))
}

pub fn run(args: ExportDetectorArgs) -> Result<()> {
    if !(args.nms_iou > 0.0 && args.nms_iou <= 1.0) {
        bail!("--nms-iou {}: must be in (0, 1]", args.nms_iou);
    }
    if let Some((config, state, from)) = super::finetune_detr::load_detr_checkpoint(&args.ckpt)? {
        if args.nms_in_graph || args.keep_batch_norm {
            bail!("{from}: a DETR detector needs no NMS and folds its batch norms; drop --nms-in-graph/--keep-batch-norm");
        }
        let model = super::finetune_detr::detr_model(&config, &state, args.top_k)
            .with_context(|| format!("exporting the DETR detector of {from}"))?;
        densa_exporter::io::save(&model, &args.out)
            .with_context(|| format!("writing {}", args.out.display()))?;
        eprintln!(
            "densa: wrote {} (DETR on {}, {} classes, {}x{} input, top {} of {} queries, no NMS, from {from})",
            args.out.display(),
            config.arch,
            config.classes.len(),
            config.image_size,
            config.image_size,
            args.top_k.clamp(1, config.num_queries),
            config.num_queries,
        );
        return Ok(());
    }
    let (config, state, from) = load_checkpoint(&args.ckpt)?;
    let model = if args.keep_batch_norm {
        let spec = if args.nms_in_graph {
            detector_spec_nms_in_graph(&config, args.nms_iou)
        } else {
            detector_spec(&config, args.nms_iou)
        }
        .to_toml();
        config
            .inference_graph_bn(
                Some(&state),
                args.top_k,
                args.nms_in_graph.then_some(args.nms_iou),
                &[(densa_runtime::infer::spec::SPEC_KEY, spec.as_str())],
                false,
            )
            .map_err(anyhow::Error::from)
    } else if args.nms_in_graph {
        detector_model_nms_in_graph(&config, &state, args.top_k, args.nms_iou)
    } else {
        detector_model(&config, &state, args.top_k, args.nms_iou)
    }
    .with_context(|| format!("exporting the detector of {}", from.display()))?;
    densa_exporter::io::save(&model, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "densa: wrote {} (FCOS on {}, {} classes, {}x{} input, NMS {}, from {})",
        args.out.display(),
        config.arch,
        config.classes.len(),
        config.image_size,
        config.image_size,
        if args.nms_in_graph {
            "in the graph"
        } else {
            "on the host"
        },
        from.display()
    );
    Ok(())
}
