//! `densa export segmenter --ckpt DIR --out MODEL.onnx`: the inference graph of a fine-tuned
//! segmenter, batch norm folded, outputs `logits` and `class_map` at input resolution, and
//! metadata that lets `densa segment` / `densa eval segment` serve it with no other arguments.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use densa_exporter::weights::{self, StateDict};
use densa_models::segment::{self, SegmenterRun, BEST_STATE, LAST_STATE, RUN_FILE};
use densa_runtime::infer::segment::{SegOutputSpec, SegmenterSpec, SEGMENTER_SPEC_KEY};
use densa_runtime::infer::spec::{Channels, InputLayout, InputSpec, ResizeMode};

#[derive(Debug, Args)]
pub struct SegmenterArgs {
    /// The `densa finetune --task segment` output directory (segmenter.json + weights).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Weights file to export instead of the directory's best (or last) weights.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// The .onnx file to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// Reads the run description of a fine-tuning directory.
pub fn read_run(dir: &Path) -> Result<SegmenterRun> {
    let path = dir.join(RUN_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is {} a `densa finetune --task segment` directory?)",
            path.display(),
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The weights to export: `--weights`, else the best, else the last of the directory.
fn state_path(args: &SegmenterArgs) -> Result<PathBuf> {
    if let Some(w) = &args.weights {
        return Ok(w.clone());
    }
    for name in [BEST_STATE, LAST_STATE] {
        let p = args.ckpt.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{}: neither {BEST_STATE} nor {LAST_STATE} found; has the fine-tuning run finished an \
         epoch? (or pass --weights FILE)",
        args.ckpt.display()
    )
}

/// The serving description of a run.
pub fn serving_spec(run: &SegmenterRun) -> SegmenterSpec {
    SegmenterSpec {
        input: InputSpec {
            name: Some("images".into()),
            layout: InputLayout::Nchw,
            size: [run.image_size, run.image_size],
            resize: ResizeMode::Stretch,
            pad_value: 0,
            scale: 1.0 / 255.0,
            mean: run.mean,
            std: run.std,
            channels: Channels::Rgb,
        },
        output: SegOutputSpec {
            logits: "logits".into(),
            class_map: "class_map".into(),
            classes: run.classes.clone(),
        },
    }
}

pub fn run(args: SegmenterArgs) -> Result<()> {
    let run = read_run(&args.ckpt)?;
    let path = state_path(&args)?;
    let state: StateDict =
        weights::load(&path).with_context(|| format!("reading weights {}", path.display()))?;
    let spec = serving_spec(&run);
    let join = |v: &[f32]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let metadata: Vec<(String, String)> = [
        ("densa.task", "segment".to_string()),
        ("densa.arch", run.model.arch.name().to_string()),
        ("densa.classes", run.classes.join(",")),
        ("densa.input", "images:NCHW:RGB:float32:0-1".to_string()),
        (
            "densa.input_size",
            format!("{}x{}", run.image_size, run.image_size),
        ),
        ("densa.resize", "stretch".to_string()),
        ("densa.mean", join(&run.mean)),
        ("densa.std", join(&run.std)),
        (
            "densa.outputs",
            "logits:float32:NCHW,class_map:int64:NHW".to_string(),
        ),
        (SEGMENTER_SPEC_KEY, spec.to_toml()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let model = segment::inference_graph(&run.model, Some(&state), &metadata, 0)
        .with_context(|| format!("exporting the segmenter with weights {}", path.display()))?;
    densa_exporter::io::save(&model, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let summary = densa_exporter::inspect::summarize(&model);
    println!(
        "wrote {} (segmenter, {}, {} classes, {}x{} input, {:.2} M parameters, weights {})",
        args.out.display(),
        run.model.arch,
        run.classes.len(),
        run.image_size,
        run.image_size,
        summary.parameters as f64 / 1e6,
        path.display()
    );
    Ok(())
}
