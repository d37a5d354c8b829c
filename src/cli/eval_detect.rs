//! `densa eval detect MODEL.onnx --data COCO.json --images DIR [--json] [--report DIR]`: runs a
//! detector on a COCO-annotated image set (the serving path of `densa detect`: decode, resize
//! per the model's spec, run, decode, NMS) and scores it with COCOeval
//! (`densa_runtime::eval::coco`, equal to pycocotools), with a per-class table, PR curves and
//! images/s. The detection loop here is also what fine-tuning validates with and the demo
//! evaluates with.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use densa_exporter::onnx::ModelProto;
use densa_runtime::backend::Session;
use densa_runtime::data::coco::{check_results, load_dataset, Dataset, Detection as CocoDetection};
use densa_runtime::eval::coco::{evaluate, CocoEvaluation, CocoParams, IouType};
use densa_runtime::infer::decode::decode;
use densa_runtime::infer::preprocess::prepare;
use densa_runtime::infer::spec::InputLayout;
use densa_runtime::infer::ModelSpec;
use densa_runtime::{open_backend, Backend, Tensor};
use ndarray::Axis;

use super::BackendArgs;

#[derive(Debug, Args)]
pub struct EvalDetectArgs {
    /// The detector (.onnx exported by `densa export detector`, or any with --spec).
    pub model: PathBuf,
    /// Ground truth: COCO instances JSON.
    #[arg(long)]
    pub data: PathBuf,
    /// Folder of the images (default: `images/` beside --data).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// TOML spec of a third-party model (see README).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Keep detections scoring at least this (COCO AP wants a low threshold).
    #[arg(long, default_value_t = 0.001)]
    pub score_threshold: f32,
    /// Images per run.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Print one JSON object (the 12 COCO stats, plus images_per_s) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write pr_curves.png, class_ap.png, metrics.json and detections.json here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Detections of a model over a COCO image set.
pub struct DetectRun {
    /// COCO results (category ids of the ground truth, `file_name` set).
    pub detections: Vec<CocoDetection>,
    /// Images served and seconds spent (decode + preprocess + run + decode).
    pub served: usize,
    pub skipped: Vec<(PathBuf, String)>,
    pub seconds: f64,
}

impl DetectRun {
    pub fn images_per_s(&self) -> f64 {
        self.served as f64 / self.seconds.max(1e-9)
    }
}

/// The images folder of a COCO file: `images/` beside it unless given.
pub fn images_dir(data: &Path, images: Option<&Path>) -> PathBuf {
    images.map(Path::to_path_buf).unwrap_or_else(|| {
        data.parent()
            .unwrap_or_else(|| Path::new("."))
            .join("images")
    })
}

/// Runs `session` on every image of `gt` (in `images`), `batch` at a time. Unreadable images
/// are skipped and reported; model labels map to the ground truth's categories by class name
/// (spec `classes`), else by position in id order.
pub fn detect_dataset(
    session: &mut dyn Session,
    spec: &ModelSpec,
    gt: &Dataset,
    images: &Path,
    batch: usize,
    score_threshold: f32,
    model_label: &str,
) -> Result<DetectRun> {
    let mut categories: Vec<_> = gt.categories.iter().collect();
    categories.sort_by_key(|c| c.id);
    let category_of = |label: usize| -> Option<u64> {
        match spec.output.classes.get(label) {
            Some(name) => categories.iter().find(|c| &c.name == name).map(|c| c.id),
            None => categories.get(label).map(|c| c.id),
        }
    };
    let input_name = match &spec.input.name {
        Some(n) => n.clone(),
        None => session
            .interface()
            .inputs
            .first()
            .map(|p| p.name.clone())
            .context("the model has no input")?,
    };
    let mut run = DetectRun {
        detections: Vec::new(),
        served: 0,
        skipped: Vec::new(),
        seconds: 0.0,
    };
    let started = Instant::now();
    // CHW models (torchvision's, densa's with NMS in the graph) take one image per run.
    let batch = if spec.input.layout == InputLayout::Chw {
        1
    } else {
        batch.max(1)
    };
    for chunk in gt.images.chunks(batch) {
        let mut loaded = Vec::new();
        for im in chunk {
            let path = images.join(&im.file_name);
            match image::open(&path) {
                Ok(img) => loaded.push((im, img.to_rgb8())),
                Err(e) => {
                    eprintln!("densa: warning: skipping {}: {e}", path.display());
                    run.skipped.push((path, e.to_string()));
                }
            }
        }
        if loaded.is_empty() {
            continue;
        }
        let prepared: Vec<_> = loaded
            .iter()
            .map(|(_, img)| prepare(img, &spec.input))
            .collect();
        let views: Vec<_> = prepared.iter().map(|(x, _)| x.view()).collect();
        let mut input = ndarray::stack(Axis(0), &views)?.into_dyn();
        if spec.input.layout == InputLayout::Chw {
            input = input.index_axis_move(Axis(0), 0);
        }
        let outputs = session
            .run(vec![(input_name.clone(), Tensor::F32(input))])
            .with_context(|| format!("running {model_label}"))?;
        let transforms: Vec<_> = prepared.iter().map(|(_, t)| *t).collect();
        let dets = decode(&outputs, spec, &transforms, score_threshold, model_label)?;
        for ((im, _), dets) in loaded.iter().zip(dets) {
            run.served += 1;
            for d in dets {
                let Some(category_id) = category_of(d.label) else {
                    continue;
                };
                run.detections.push(CocoDetection {
                    image_id: im.id,
                    category_id,
                    bbox: [
                        d.bbox[0] as f64,
                        d.bbox[1] as f64,
                        (d.bbox[2] - d.bbox[0]) as f64,
                        (d.bbox[3] - d.bbox[1]) as f64,
                    ],
                    score: d.score as f64,
                    segmentation: None,
                    file_name: Some(im.file_name.clone()),
                });
            }
        }
    }
    run.seconds = started.elapsed().as_secs_f64();
    Ok(run)
}

/// COCO box evaluation of `run` against `gt`.
pub fn coco_metrics(gt: &Dataset, run: &DetectRun) -> Result<CocoEvaluation> {
    let results = check_results(run.detections.clone(), gt).context("checking the detections")?;
    Ok(evaluate(gt, &results, &CocoParams::new(IouType::Bbox))?)
}

/// Loads `model` on `backend` and evaluates it on `gt`.
pub fn evaluate_model(
    model: &ModelProto,
    spec: &ModelSpec,
    backend: &dyn Backend,
    gt: &Dataset,
    images: &Path,
    batch: usize,
    label: &str,
) -> Result<(DetectRun, CocoEvaluation)> {
    let mut session = backend.load_model(model, label)?;
    let run = detect_dataset(session.as_mut(), spec, gt, images, batch, 0.001, label)?;
    let e = coco_metrics(gt, &run)?;
    Ok((run, e))
}

pub fn run(args: EvalDetectArgs) -> Result<()> {
    let label = args.model.display().to_string();
    let model =
        densa_exporter::io::load(&args.model).with_context(|| format!("reading model {label}"))?;
    let spec = match &args.spec {
        Some(p) => ModelSpec::from_file(p)?,
        None => ModelSpec::from_model(&model, &label)?,
    };
    let gt = load_dataset(&args.data)
        .with_context(|| format!("reading the ground truth {}", args.data.display()))?;
    let images = images_dir(&args.data, args.images.as_deref());
    let backend = open_backend(args.backend.backend, &args.backend.options())?;
    let mut session = backend.load_model(&model, &label)?;
    let run = detect_dataset(
        session.as_mut(),
        &spec,
        &gt,
        &images,
        args.batch,
        args.score_threshold,
        &label,
    )?;
    if run.served == 0 {
        bail!(
            "none of the {} image(s) of {} could be read from {}",
            gt.images.len(),
            args.data.display(),
            images.display()
        );
    }
    let e = coco_metrics(&gt, &run)?;
    if let Some(dir) = &args.report {
        super::eval::write_report(dir, &gt, &e)
            .with_context(|| format!("writing the report {}", dir.display()))?;
        let path = dir.join("detections.json");
        std::fs::write(&path, serde_json::to_string(&run.detections)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        let mut v = serde_json::to_value(e.stats)?;
        v["images_per_s"] = run.images_per_s().into();
        v["images"] = run.served.into();
        v["skipped"] = run.skipped.len().into();
        println!("{v}");
    } else {
        super::eval::print_table(&gt, &e);
        println!();
        println!(
            "{} image(s) on {} in {:.2} s: {:.1} images/s{}",
            run.served,
            backend.label(),
            run.seconds,
            run.images_per_s(),
            if run.skipped.is_empty() {
                String::new()
            } else {
                format!(" ({} skipped)", run.skipped.len())
            }
        );
    }
    Ok(())
}
