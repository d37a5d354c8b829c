//! `densa eval segment MODEL.onnx --data COCO.json --images DIR --masks DIR [--json]
//! [--report DIR]`: serves a densa segmenter on a COCO-format dataset with semantic masks (as
//! `densa synth` writes them) and reports mIoU, per-class IoU, pixel accuracy
//! ([`densa_runtime::eval::seg`]) and images/s (decode + preprocess + inference + mapping back).
//!
//! Mask PNGs hold COCO category ids (0 = background, 255 = ignore) and are compared in class
//! space (class `i + 1` = the `i`-th category by ascending id), as the segmenter was trained.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use densa_runtime::data::{CocoSource, CocoSpec, SampleSource};
use densa_runtime::eval::plot;
use densa_runtime::eval::seg::{ConfusionMatrix, LabelMap};
use densa_runtime::infer::segment::SegmenterSpec;
use densa_runtime::open_backend;

use super::BackendArgs;

#[derive(Debug, Args)]
pub struct EvalSegmentArgs {
    /// The segmenter (.onnx) written by `densa export segmenter`.
    pub model: PathBuf,
    /// COCO instances JSON of the evaluation images.
    #[arg(long)]
    pub data: PathBuf,
    /// Folder of the images (default: `images/` beside --data).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Folder of the semantic mask PNGs (default: `masks/` beside --data).
    #[arg(long)]
    pub masks: Option<PathBuf>,
    /// Print one JSON object (metrics, images, images/s) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write metrics.json and class_iou.png into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Images per run.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[command(flatten)]
    pub backend: BackendArgs,
}

pub fn run(args: EvalSegmentArgs) -> Result<()> {
    let model_label = args.model.display().to_string();
    let model = densa_exporter::io::load(&args.model)
        .with_context(|| format!("reading model {model_label}"))?;
    let spec = SegmenterSpec::from_model(&model, &model_label)?;
    let root = args.data.parent().map(PathBuf::from).unwrap_or_default();
    let source = CocoSource::open(&CocoSpec {
        annotations: args.data.clone(),
        images: args.images.clone().unwrap_or_else(|| root.join("images")),
        masks: Some(args.masks.clone().unwrap_or_else(|| root.join("masks"))),
    })
    .with_context(|| format!("opening the dataset {}", args.data.display()))?;
    let classes = spec.num_classes();
    if source.segment_classes().len() != classes {
        bail!(
            "{} has {} mask classes ({}) but {model_label} predicts {} ({})",
            args.data.display(),
            source.segment_classes().len(),
            source.segment_classes().join(", "),
            classes,
            spec.output.classes.join(", ")
        );
    }
    let backend = open_backend(args.backend.backend, &args.backend.options())?;
    let mut session = backend.load_model(&model, &model_label)?;
    let mut matrix = ConfusionMatrix::new(classes);
    let (mut served, mut skipped, mut secs) = (0usize, 0usize, 0f64);
    let batch = args.batch.max(1);
    let indices: Vec<usize> = (0..source.len()).collect();
    for chunk in indices.chunks(batch) {
        let mut samples = Vec::new();
        for &i in chunk {
            match source.load(i) {
                Ok(s) => samples.push(s),
                Err(e) => {
                    eprintln!("densa: warning: skipping {e}");
                    skipped += 1;
                }
            }
        }
        if samples.is_empty() {
            continue;
        }
        let started = std::time::Instant::now();
        let refs: Vec<_> = samples.iter().map(|s| &s.image).collect();
        let preds = densa_runtime::infer::segment::segment_batch(
            session.as_mut(),
            &spec,
            &refs,
            &model_label,
        )
        .with_context(|| format!("running {model_label} on {}", samples[0].path.display()))?;
        secs += started.elapsed().as_secs_f64();
        for (s, pred) in samples.iter().zip(&preds) {
            let Some(gt) = &s.mask else {
                bail!("{}: no mask loaded", s.path.display());
            };
            let to_map = |m: &image::GrayImage| LabelMap {
                width: m.width(),
                height: m.height(),
                labels: m.pixels().map(|p| p.0[0] as u32).collect(),
            };
            matrix
                .add(&to_map(gt), &to_map(pred), Some(255), &s.path, &args.model)
                .with_context(|| format!("scoring {}", s.path.display()))?;
            served += 1;
        }
    }
    if served == 0 {
        bail!("none of the {} image(s) could be read", source.len());
    }
    let m = matrix.metrics();
    let rate = served as f64 / secs.max(1e-9);
    let mut summary = serde_json::to_value(&m)?;
    summary["images"] = served.into();
    summary["skipped"] = skipped.into();
    summary["images_per_s"] = rate.into();
    summary["backend"] = backend.name().into();
    summary["classes"] = serde_json::to_value(&spec.output.classes)?;
    if let Some(dir) = &args.report {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("metrics.json");
        densa_exporter::io::write_atomic(&path, serde_json::to_string_pretty(&summary)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        let bars: Vec<(String, Option<f64>)> = spec
            .output
            .classes
            .iter()
            .cloned()
            .zip(m.per_class_iou.iter().copied())
            .collect();
        let png = dir.join("class_iou.png");
        plot::class_ap_png(&png, "IoU per class", &bars)
            .with_context(|| format!("writing {}", png.display()))?;
    }
    if args.json {
        println!("{summary}");
        return Ok(());
    }
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    println!(
        "Semantic segmentation: {served} images ({skipped} skipped), {classes} classes, {} pixels",
        m.pixels
    );
    println!("mIoU           {}", fmt(m.miou));
    println!("pixel accuracy {}", fmt(m.pixel_accuracy));
    println!("mean accuracy  {}", fmt(m.mean_accuracy));
    println!("images/s       {rate:.1} ({})", backend.name());
    println!();
    println!("{:<16} {:>8} {:>8}", "class", "IoU", "acc");
    for (c, (iou, acc)) in m
        .per_class_iou
        .iter()
        .zip(&m.per_class_accuracy)
        .enumerate()
    {
        println!(
            "{:<16} {:>8} {:>8}",
            spec.output.classes[c],
            fmt(*iou),
            fmt(*acc)
        );
    }
    Ok(())
}
