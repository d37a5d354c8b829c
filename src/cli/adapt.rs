//! `densa adapt MODEL.onnx --data DIR_OR_COCO.json --out ADAPTED.onnx`: adapts a deployed
//! detector, segmenter or classifier on the device's CPU, starting from the `.onnx` itself (no training checkpoint),
//! and writes a new `.onnx` the same runtime serves ([`densa_models::adapt`] has the graph
//! surgery and the objectives).
//!
//! - `--method supervised` (labels from a COCO file): the detector's own training loss on the
//!   device's labeled images (letterboxed as serving does, random horizontal flip).
//! - `--method consistency` (no labels needed): Mean-Teacher prediction consistency between a
//!   momentum teacher on the serving view and the student on a photometrically perturbed view.
//! - Segmenters (`densa.task = segment`): `--method supervised`, per-pixel cross-entropy on the
//!   COCO file's masks (`densa eval segment` scores them before and after).
//! - `--method pixpro|densecl` (no labels needed): the pretext method's dense objective on the
//!   backbone features between two crops of each image, with a momentum teacher; the
//!   backbone is trained ([`super::adapt_dense`]).
//! - `--method bn-stats`: re-estimates batch-norm statistics on the device's images, for models
//!   that kept `BatchNormalization` nodes (densa's exports fold them: then it is an error).
//! - Classifiers (`densa.task = classify`, `densa train`'s `model.onnx`): images in class
//!   subfolders, accuracy before and after ([`super::adapt_classify`]).
//!
//! Memory is bounded by construction: one image per graph run (gradients accumulated over
//! `--batch` images on the host), and by default only the head is trainable (the backward graph
//! stops at the head). The peak resident memory is measured and reported, and checked against
//! `--memory-budget`. The output is written atomically (temporary file, rename) and never over
//! the input model; a JSON report (loss curve, timings, memory, before/after AP when labels
//! exist) and `loss.png` are written beside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use densa_exporter::onnx::ModelProto;
use densa_exporter::Tensor;
use densa_models::adapt::{
    bn_stats_graph, with_parameters, AdamW, BatchNormStats, ConsistencyConfig, DenseObjective,
    DeployedDetector, DeployedSegmenter, ImageMeta, TrainSelection, TEACHER_BOX, TEACHER_CLS,
    TEACHER_CTR,
};
use densa_models::detect::names;
use densa_runtime::data::coco::Dataset;
use densa_runtime::data::{CocoSource, CocoSpec, FolderSpec, ImageFolder, SampleSource};
use densa_runtime::infer::preprocess::prepare;
use densa_runtime::train::{Samples, StepRecord};
use densa_runtime::{open_backend, Backend};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array3, ArrayD, Axis};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::adapt_classify::stretch_input;
use super::adapt_dense::{adapt_dense, DenseTask};
use super::eval_detect::{evaluate_model, images_dir};
use super::finetune_detect::DetectSamples;
use super::finetune_segment::{open_source, SegSamples};
use super::BackendArgs;

/// Where the labels come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Labels {
    /// COCO when `--data` is a `.json` file; for a classifier, folders when `--data` has
    /// subfolders; otherwise none.
    Auto,
    /// No labels: the images only (a folder, or a COCO file's images).
    None,
    /// COCO instances JSON.
    Coco,
    /// Class subfolders named as a classifier's classes (`DIR/<class>/*.png`).
    Folders,
}

#[derive(Debug, Args)]
pub struct AdaptArgs {
    /// The deployed model: a detector or segmenter (`densa export detector|segmenter`) or a
    /// classifier (`model.onnx` of `densa train`).
    pub model: PathBuf,
    /// The device's data: a COCO instances JSON (labeled), a folder of images, or for a
    /// classifier a folder of class subfolders (labeled).
    #[arg(long)]
    pub data: PathBuf,
    /// Folder of the COCO file's images (default: `images/` beside --data).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Labels: auto, none, coco or folders.
    #[arg(long, value_enum, default_value = "auto")]
    pub labels: Labels,
    /// Trainable parameters: head, all, or comma-separated name patterns (`fpn.*,head.*`).
    /// Default: head; for the pretext objectives (pixpro, densecl), every parameter the
    /// backbone features depend on (a selection is narrowed to those).
    #[arg(long)]
    pub train: Option<TrainSelection>,
    /// supervised, consistency (unlabeled, momentum teacher on the predictions), pixpro or
    /// densecl (unlabeled, the pretext method's dense objective on the backbone features with
    /// a momentum teacher) or bn-stats. Default: supervised with labels, consistency without.
    #[arg(long)]
    pub method: Option<String>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 50)]
    pub steps: u64,
    /// Images per step (one image per graph run, gradients accumulated).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Use at most this many of the data's images (a seeded random subset).
    #[arg(long)]
    pub max_images: Option<usize>,
    /// Teacher EMA momentum (consistency, pixpro, densecl).
    #[arg(long, default_value_t = 0.99)]
    pub teacher_momentum: f32,
    /// Stop with an error when the process's peak resident memory exceeds this many MB.
    #[arg(long)]
    pub memory_budget: Option<f64>,
    /// Labeled images to score before and after (COCO JSON); default: --data when labeled.
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Folder of --val-data's images (default: `images/` beside it).
    #[arg(long)]
    pub val_images: Option<PathBuf>,
    /// Skip the before/after evaluation.
    #[arg(long)]
    pub no_eval: bool,
    /// Seed of the image order, flips and perturbations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The adapted model to write (never the input model).
    #[arg(long)]
    pub out: PathBuf,
    /// The JSON report (default: OUT with `.report.json`); `loss.png` goes beside it.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// The method `--method` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Supervised,
    Consistency,
    BnStats,
    /// PixPro's pixel-propagation consistency on the backbone features.
    Pixpro,
    /// DenseCL's dense InfoNCE on the backbone features.
    Densecl,
}

impl Method {
    /// `how_to_label` completes "give labels: ..." in the error for an unlabeled supervised run.
    pub(super) fn parse(name: Option<&str>, labeled: bool, how_to_label: &str) -> Result<Method> {
        match name {
            None if labeled => Ok(Method::Supervised),
            None => Ok(Method::Consistency),
            Some("supervised") if !labeled => {
                bail!("--method supervised needs labels: {how_to_label}")
            }
            Some("supervised") => Ok(Method::Supervised),
            Some("consistency") | Some("mean-teacher") => Ok(Method::Consistency),
            Some("bn-stats") => Ok(Method::BnStats),
            Some("pixpro") => Ok(Method::Pixpro),
            Some("densecl") => Ok(Method::Densecl),
            Some(other) => {
                let pretext = densa_models::pretext::registry::method_info(other).is_ok();
                if pretext {
                    bail!(
                        "--method {other}: this pretext method has no dense adaptation objective; \
                         the pretext objectives for adaptation are {}",
                        DenseObjective::NAMES.join(", ")
                    )
                }
                bail!(
                    "--method {other}: unknown; use supervised, consistency, bn-stats, {}",
                    DenseObjective::NAMES.join(", ")
                )
            }
        }
    }

    /// The pretext objective of `pixpro` / `densecl`.
    pub(super) fn dense_objective(self) -> Option<DenseObjective> {
        match self {
            Method::Pixpro => DenseObjective::named("pixpro"),
            Method::Densecl => DenseObjective::named("densecl"),
            _ => None,
        }
    }
}

impl AdaptArgs {
    /// `--train`, head when not given (the pretext objectives choose their own default).
    pub(super) fn selection(&self) -> TrainSelection {
        self.train.clone().unwrap_or(TrainSelection::Head)
    }

    /// What the report says was trained.
    pub(super) fn trained(&self, method: Method) -> String {
        match (method, &self.train) {
            (Method::BnStats, _) => "batch-norm statistics".into(),
            (m, None) if m.dense_objective().is_some() => "backbone".into(),
            (_, t) => t.clone().unwrap_or(TrainSelection::Head).to_string(),
        }
    }
}

/// The score of a model before or after: COCO AP for a detector, accuracy for a classifier.
#[derive(Clone, Debug, Serialize)]
pub struct Scores {
    /// COCO AP (detectors).
    #[serde(rename = "AP", skip_serializing_if = "Option::is_none")]
    pub ap: Option<f64>,
    #[serde(rename = "AP50", skip_serializing_if = "Option::is_none")]
    pub ap50: Option<f64>,
    /// Top-1 accuracy (classifiers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    pub images: usize,
}

/// What `densa adapt` writes beside the model.
#[derive(Clone, Debug, Serialize)]
pub struct AdaptReport {
    pub model: String,
    pub out: String,
    pub method: Method,
    pub train: String,
    pub trainable_tensors: usize,
    pub trainable_values: usize,
    pub images: usize,
    pub steps: u64,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    pub backend: String,
    /// Mean loss of each step.
    pub losses: Vec<f64>,
    /// Wall time from start to the adapted model (reading, graph building, steps).
    pub seconds: f64,
    /// Time of the optimizer steps alone (data, forward, backward, update) per step.
    pub seconds_per_step: f64,
    /// Peak resident memory of the process (VmHWM) at the end of the adaptation (before the
    /// before/after evaluation), MB: model, data and graphs included.
    pub peak_memory_mb: Option<f64>,
    /// Scored on this set (`val_data`, else the adaptation data).
    pub eval_data: Option<String>,
    pub before: Option<Scores>,
    pub after: Option<Scores>,
}

/// Peak resident set size of this process in MB (Linux `VmHWM`), `None` elsewhere.
pub fn peak_memory_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub(super) fn check_budget(budget: Option<f64>) -> Result<()> {
    if let (Some(budget), Some(peak)) = (budget, peak_memory_mb()) {
        if peak > budget {
            bail!(
                "peak memory {peak:.0} MB exceeds --memory-budget {budget:.0} MB; train fewer \
                 parameters (--train head) or use a smaller model"
            );
        }
    }
    Ok(())
}

pub fn run(args: AdaptArgs) -> Result<()> {
    let report = adapt(&args)?;
    println!(
        "adapted {} -> {} ({:?}, {} steps x {} images, {:.2} s/step, peak {} MB)",
        report.model,
        report.out,
        report.method,
        report.steps,
        report.batch,
        report.seconds_per_step,
        report
            .peak_memory_mb
            .map_or("?".to_string(), |m| format!("{m:.0}"))
    );
    if let (Some(b), Some(a)) = (&report.before, &report.after) {
        let on = format!(
            "on {} images ({})",
            a.images,
            report.eval_data.as_deref().unwrap_or("")
        );
        if let (Some(b_ap), Some(a_ap), Some(b50), Some(a50)) = (b.ap, a.ap, b.ap50, a.ap50) {
            println!("AP {b_ap:.4} -> {a_ap:.4}, AP50 {b50:.4} -> {a50:.4} {on}");
        }
        if let (Some(b_acc), Some(a_acc)) = (b.accuracy, a.accuracy) {
            println!("accuracy {b_acc:.4} -> {a_acc:.4} {on}");
        }
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Runs the adaptation `args` describe and writes the model and the report.
pub fn adapt(args: &AdaptArgs) -> Result<AdaptReport> {
    if same_file(&args.model, &args.out) || args.model == args.out {
        bail!(
            "--out {} is the input model; adaptation never overwrites it, choose another path",
            args.out.display()
        );
    }
    if args.batch == 0 {
        bail!("--batch 0: must be at least 1");
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr {}: must be positive", args.lr);
    }
    if !(0.0..1.0).contains(&args.teacher_momentum) {
        bail!(
            "--teacher-momentum {}: must be in [0, 1)",
            args.teacher_momentum
        );
    }
    let model = densa_exporter::io::load(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    let label = args.model.display().to_string();
    if model
        .metadata_props
        .iter()
        .any(|p| p.key == "densa.task" && p.value == "classify")
    {
        let report = super::adapt_classify::adapt(args, &model, &label)?;
        write_outputs(args, &report)?;
        return Ok(report);
    }
    let is_json = args
        .data
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let labeled = match args.labels {
        Labels::Auto => is_json,
        Labels::Coco => {
            if !is_json {
                bail!(
                    "--labels coco: --data {} is not a COCO .json file",
                    args.data.display()
                );
            }
            true
        }
        Labels::None => false,
        Labels::Folders => bail!(
            "--labels folders: class subfolders label a classifier's images; {label} is not a \
             classifier (`densa.task = classify`)"
        ),
    };
    let method = Method::parse(
        args.method.as_deref(),
        labeled,
        "give a COCO JSON as --data (--labels coco)",
    )?;
    let segmenter = model
        .metadata_props
        .iter()
        .any(|p| p.key == "densa.task" && p.value == "segment");
    if segmenter && method == Method::Consistency {
        bail!("{label}: a segmenter adapts with --method supervised (COCO labels with masks) or bn-stats");
    }
    let backend = open_backend(args.backend.backend, &args.backend.options())?;
    let started = Instant::now();

    // The device's images.
    let images = images_dir(&args.data, args.images.as_deref());
    let coco: Option<Arc<CocoSource>> = if is_json {
        Some(Arc::new(
            CocoSource::open(&CocoSpec {
                annotations: args.data.clone(),
                images: images.clone(),
                masks: None,
            })
            .with_context(|| format!("reading {}", args.data.display()))?,
        ))
    } else {
        None
    };
    let source: Arc<dyn SampleSource + Send + Sync> = if let Some(c) = &coco {
        c.clone()
    } else {
        Arc::new(
            ImageFolder::open(&FolderSpec {
                root: args.data.clone(),
            })
            .with_context(|| format!("reading {}", args.data.display()))?,
        )
    };
    let subset = choose_subset(source.len(), args.max_images, args.seed);
    if subset.is_empty() {
        bail!("{}: no images", args.data.display());
    }

    // Before/after scoring set.
    // Segmenters: `densa eval segment` before and after (no detection AP here).
    let eval_set: Option<(Dataset, PathBuf, String)> = if args.no_eval || segmenter {
        None
    } else if let Some(v) = &args.val_data {
        let gt = densa_runtime::data::coco::load_dataset(v)
            .with_context(|| format!("reading {}", v.display()))?;
        Some((
            gt,
            images_dir(v, args.val_images.as_deref()),
            v.display().to_string(),
        ))
    } else if labeled {
        let gt = densa_runtime::data::coco::load_dataset(&args.data)
            .with_context(|| format!("reading {}", args.data.display()))?;
        let keep: std::collections::HashSet<u64> = subset
            .iter()
            .filter_map(|&i| gt.images.get(i).map(|im| im.id))
            .collect();
        let gt = Dataset {
            images: gt
                .images
                .iter()
                .filter(|im| keep.contains(&im.id))
                .cloned()
                .collect(),
            annotations: gt
                .annotations
                .iter()
                .filter(|a| keep.contains(&a.image_id))
                .cloned()
                .collect(),
            ..gt
        };
        Some((
            gt,
            images.clone(),
            format!("{} (the adaptation images)", args.data.display()),
        ))
    } else {
        None
    };

    let (adapted, losses, trainable, values_count, loop_seconds) = if method == Method::BnStats {
        let spec = densa_runtime::infer::ModelSpec::from_model(&model, &label)
            .with_context(|| format!("reading the spec of {label}"))?;
        let input = spec.input.name.clone().unwrap_or_else(|| "images".into());
        let (adapted, names, count) = bn_stats(
            args,
            &model,
            &label,
            backend.as_ref(),
            &input,
            &subset,
            |i| {
                let sample = source
                    .load(i)
                    .with_context(|| format!("reading image {i} of {}", args.data.display()))?;
                Ok(prepare(&sample.image, &spec.input).0)
            },
        )?;
        let seconds = started.elapsed().as_secs_f64();
        (adapted, Vec::new(), names, count, seconds)
    } else if let Some(objective) = method.dense_objective() {
        let source = source.as_ref();
        let read = |i: usize| {
            let i = subset[i];
            source.load(i).with_context(|| {
                format!(
                    "reading {}",
                    source
                        .image_path(i)
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| args.data.display().to_string())
                )
            })
        };
        let o = if segmenter {
            let seg = DeployedSegmenter::from_model(&model, &label)?;
            let meta = ImageMeta {
                size: seg.image_size,
                mean: seg.mean,
                std: seg.std,
            };
            let load = |i: usize| Ok(stretch_input(&read(i)?.image, &meta));
            let task = DenseTask {
                model: &model,
                label: &label,
                input: "images".into(),
                mean: seg.mean,
                std: seg.std,
                batched: true,
                items: subset.len(),
                load: &load,
            };
            adapt_dense(args, &task, objective, backend.as_ref())?
        } else {
            let det = DeployedDetector::from_model(&model, &label)?;
            let load = |i: usize| Ok(prepare(&read(i)?.image, &det.spec.input).0);
            let task = DenseTask {
                model: &model,
                label: &label,
                input: det.input_name(),
                mean: det.spec.input.mean,
                std: det.spec.input.std,
                batched: !det.chw,
                items: subset.len(),
                load: &load,
            };
            adapt_dense(args, &task, objective, backend.as_ref())?
        };
        (o.adapted, o.losses, o.trainable, o.values, o.seconds)
    } else if segmenter {
        let seg = DeployedSegmenter::from_model(&model, &label)?;
        let trainable = seg.trainable(&args.selection())?;
        let mut params: BTreeMap<String, ArrayD<f32>> = seg
            .values(&trainable)?
            .into_iter()
            .map(|(n, t)| (n, t.to_f32()))
            .collect();
        let count = params.values().map(|a| a.len()).sum();
        let (losses, loop_seconds) = supervised_segmenter(
            args,
            &seg,
            &trainable,
            &mut params,
            backend.as_ref(),
            &subset,
        )?;
        let new: BTreeMap<String, Tensor> = params
            .into_iter()
            .map(|(n, a)| (n, Tensor::F32(a)))
            .collect();
        (
            with_parameters(&model, &new)?,
            losses,
            trainable,
            count,
            loop_seconds,
        )
    } else {
        let det = DeployedDetector::from_model(&model, &label)?;
        let trainable = det.trainable(&args.selection())?;
        let mut params: BTreeMap<String, ArrayD<f32>> = det
            .values(&trainable)?
            .into_iter()
            .map(|(n, t)| (n, t.to_f32()))
            .collect();
        let count = params.values().map(|a| a.len()).sum();
        let (losses, loop_seconds) = match method {
            Method::Supervised => supervised(
                args,
                &det,
                &trainable,
                &mut params,
                backend.as_ref(),
                coco.clone()
                    .context("supervised adaptation needs a COCO file")?,
                &subset,
            )?,
            _ => consistency(
                args,
                &det,
                &trainable,
                &mut params,
                backend.as_ref(),
                source.as_ref(),
                &subset,
            )?,
        };
        let new: BTreeMap<String, Tensor> = params
            .into_iter()
            .map(|(n, a)| (n, Tensor::F32(a)))
            .collect();
        (
            with_parameters(&model, &new)?,
            losses,
            trainable,
            count,
            loop_seconds,
        )
    };
    let seconds = started.elapsed().as_secs_f64();
    // Adaptation's peak, before the evaluation runs anything else.
    let peak = peak_memory_mb();
    save_model(args, &adapted)?;

    let (before, after) = match &eval_set {
        Some((gt, dir, name)) => {
            let spec = densa_runtime::infer::ModelSpec::from_model(&model, &label)
                .with_context(|| format!("reading the spec of {label}"))?;
            let score = |m: &densa_exporter::onnx::ModelProto, what: &str| -> Result<Scores> {
                let (run, e) = evaluate_model(m, &spec, backend.as_ref(), gt, dir, 8, what)
                    .with_context(|| format!("scoring the {what} model on {name}"))?;
                Ok(Scores {
                    ap: Some(e.stats.ap),
                    ap50: Some(e.stats.ap50),
                    accuracy: None,
                    images: run.served,
                })
            };
            (
                Some(score(&model, "deployed")?),
                Some(score(&adapted, "adapted")?),
            )
        }
        None => (None, None),
    };
    let steps = losses.len() as u64;
    let report = AdaptReport {
        model: args.model.display().to_string(),
        out: args.out.display().to_string(),
        method,
        train: args.trained(method),
        trainable_tensors: trainable.len(),
        trainable_values: values_count,
        images: subset.len(),
        steps,
        batch: args.batch,
        lr: args.lr,
        seed: args.seed,
        backend: backend.name().to_string(),
        seconds_per_step: if steps > 0 {
            loop_seconds / steps as f64
        } else {
            0.0
        },
        losses: losses.clone(),
        seconds,
        peak_memory_mb: peak,
        eval_data: eval_set.as_ref().map(|e| e.2.clone()),
        before,
        after,
    };
    write_outputs(args, &report)?;
    Ok(report)
}

/// Writes the adapted model (atomically): before the before/after scoring, so a failure
/// there loses no adaptation.
pub(super) fn save_model(args: &AdaptArgs, adapted: &ModelProto) -> Result<()> {
    densa_exporter::io::save(adapted, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))
}

/// Writes the JSON report and the loss curve beside the adapted model.
fn write_outputs(args: &AdaptArgs, report: &AdaptReport) -> Result<()> {
    let report_path = args.report.clone().unwrap_or_else(|| {
        let stem = args
            .out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapted".into());
        args.out.with_file_name(format!("{stem}.report.json"))
    });
    densa_exporter::io::write_atomic(
        &report_path,
        serde_json::to_string_pretty(report)?.as_bytes(),
    )
    .with_context(|| format!("writing {}", report_path.display()))?;
    if !report.losses.is_empty() {
        let records: Vec<StepRecord> = report
            .losses
            .iter()
            .enumerate()
            .map(|(i, &l)| StepRecord {
                step: i as u64 + 1,
                epoch: 0,
                loss: Some(l),
                metrics: BTreeMap::new(),
                hyper: BTreeMap::new(),
                images_per_s: 0.0,
                time_s: 0.0,
                skipped: false,
                note: None,
            })
            .collect();
        let png = report_path.with_file_name(format!(
            "{}.loss.png",
            report_path
                .file_name()
                .map(|s| s
                    .to_string_lossy()
                    .trim_end_matches(".report.json")
                    .to_string())
                .unwrap_or_default()
        ));
        densa_runtime::train::log::plot_loss(
            &records,
            &png,
            &format!("densa adapt ({:?}) loss", report.method),
            (640, 360),
        )
        .with_context(|| format!("writing {}", png.display()))?;
    }
    Ok(())
}

/// The images to adapt on: all `n`, or a random subset of `max` (seeded), in order.
pub(super) fn choose_subset(n: usize, max: Option<usize>, seed: u64) -> Vec<usize> {
    let mut subset: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    if let Some(k) = max {
        for i in (1..subset.len()).rev() {
            let j = rng.random_range(0..=i);
            subset.swap(i, j);
        }
        subset.truncate(k.max(1));
        subset.sort_unstable();
    }
    subset
}

/// `--method bn-stats`: runs the batch-statistics graph of `model` over `items` in batches of
/// `--batch` (`load` prepares one `[3, S, S]` input) and writes the averaged statistics into a
/// copy of the model. Returns it, the statistic tensors' names and their value count.
#[allow(clippy::too_many_arguments)]
pub(super) fn bn_stats(
    args: &AdaptArgs,
    model: &ModelProto,
    label: &str,
    backend: &dyn Backend,
    input: &str,
    items: &[usize],
    mut load: impl FnMut(usize) -> Result<Array3<f32>>,
) -> Result<(ModelProto, Vec<String>, usize)> {
    let (graph, sites) = bn_stats_graph(model, label)?;
    let mut session = backend.load_model(&graph, "bn-stats graph")?;
    let mut stats = BatchNormStats::new(sites);
    let bar = progress(items.len() as u64, "bn-stats");
    for chunk in items.chunks(args.batch) {
        let mut xs = Vec::new();
        for &i in chunk {
            xs.push(load(i)?);
            bar.inc(1);
        }
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        let batch = ndarray::stack(Axis(0), &views)?;
        let outs = session
            .run(vec![(input.to_string(), Tensor::F32(batch.into_dyn()))])
            .context("running the bn-stats graph")?;
        stats.add(&outs, chunk.len())?;
        check_budget(args.memory_budget)?;
    }
    bar.finish_and_clear();
    let new = stats.finish();
    let count = new.values().map(|t| t.len()).sum();
    let names: Vec<String> = new.keys().cloned().collect();
    Ok((with_parameters(model, &new)?, names, count))
}

/// The momentum teacher's step: `t <- m t + (1 - m) s` for every teacher tensor the student
/// has.
pub(super) fn ema_update(
    teacher: &mut BTreeMap<String, ArrayD<f32>>,
    student: &BTreeMap<String, ArrayD<f32>>,
    m: f32,
) {
    for (name, t) in teacher.iter_mut() {
        if let Some(s) = student.get(name) {
            ndarray::Zip::from(t)
                .and(s)
                .for_each(|t, &s| *t = m * *t + (1.0 - m) * s);
        }
    }
}

/// The loop every adaptation method shares: each step runs `args.batch` one-image passes
/// (`one(item, rng, params, grads)` returns the image's loss and adds its gradients), averages
/// the gradients, takes one AdamW step and calls `after_step` (the consistency teacher's EMA).
/// Items are drawn without replacement from `items`, reshuffled with `rng` at each pass.
/// Returns the per-step losses and the seconds the loop took.
pub(super) fn adaptation_loop(
    args: &AdaptArgs,
    params: &mut BTreeMap<String, ArrayD<f32>>,
    items: &[usize],
    rng: &mut ChaCha8Rng,
    mut one: impl FnMut(
        usize,
        &mut ChaCha8Rng,
        &BTreeMap<String, ArrayD<f32>>,
        &mut BTreeMap<String, ArrayD<f32>>,
    ) -> Result<f64>,
    mut after_step: impl FnMut(&BTreeMap<String, ArrayD<f32>>),
) -> Result<(Vec<f64>, f64)> {
    let mut opt = AdamW::new(args.lr);
    let bar = progress(args.steps, "adapt");
    let loop_started = Instant::now();
    let mut losses = Vec::new();
    let mut order: Vec<usize> = Vec::new();
    for step in 1..=args.steps {
        let mut sum = BTreeMap::new();
        let mut total = 0.0;
        for _ in 0..args.batch {
            if order.is_empty() {
                order = items.to_vec();
                // Fisher-Yates with `random_range(0..=i)`: the draws the benchmark figures in
                // README.md were measured with (`SliceRandom::shuffle` draws differently).
                for i in (1..order.len()).rev() {
                    let j = rng.random_range(0..=i);
                    order.swap(i, j);
                }
            }
            let item = order.pop().context("no images to adapt on")?;
            total += one(item, rng, params, &mut sum)?;
        }
        let loss = total / args.batch as f64;
        apply(&mut opt, params, sum, args.batch, loss, step)?;
        after_step(params);
        losses.push(loss);
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
        check_budget(args.memory_budget)?;
    }
    bar.finish_and_clear();
    Ok((losses, loop_started.elapsed().as_secs_f64()))
}

pub(super) fn progress(total: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// Gradients of one run, by parameter name (outputs `grad.<p>`).
pub(super) fn grads_of(
    outs: Vec<(String, Tensor)>,
    sum: &mut BTreeMap<String, ArrayD<f32>>,
) -> Result<f64> {
    let mut loss = None;
    for (name, t) in outs {
        if name == names::LOSS {
            loss = t.to_f32().iter().next().map(|&v| v as f64);
        } else if let Some(p) = name.strip_prefix("grad.") {
            let g = t.to_f32();
            match sum.get_mut(p) {
                Some(acc) => *acc += &g,
                None => {
                    sum.insert(p.to_string(), g);
                }
            }
        }
    }
    loss.context("the adaptation graph gave no loss")
}

/// Averages accumulated gradients over `n` images and takes an optimizer step; a non-finite
/// loss or gradient is an error (the state is not updated).
pub(super) fn apply(
    opt: &mut AdamW,
    params: &mut BTreeMap<String, ArrayD<f32>>,
    mut sum: BTreeMap<String, ArrayD<f32>>,
    n: usize,
    loss: f64,
    step: u64,
) -> Result<()> {
    if !loss.is_finite() || sum.values().any(|g| g.iter().any(|v| !v.is_finite())) {
        bail!("step {step}: the loss or a gradient is not finite (loss {loss}); lower --lr");
    }
    for g in sum.values_mut() {
        g.mapv_inplace(|v| v / n as f32);
    }
    opt.step(params, &sum);
    Ok(())
}

pub(super) fn param_inputs(params: &BTreeMap<String, ArrayD<f32>>) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|(n, a)| (n.clone(), Tensor::F32(a.clone())))
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn supervised(
    args: &AdaptArgs,
    det: &DeployedDetector,
    trainable: &[String],
    params: &mut BTreeMap<String, ArrayD<f32>>,
    backend: &dyn Backend,
    coco: Arc<CocoSource>,
    subset: &[usize],
) -> Result<(Vec<f64>, f64)> {
    let graph = det
        .supervised_graph(trainable)
        .context("building the adaptation graph")?;
    let mut session = backend.load_model(&graph, "adaptation graph")?;
    let mut samples = DetectSamples::new(coco, subset.to_vec(), &det.config, true);
    let input = det.input_name();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
    let items: Vec<usize> = (0..subset.len()).collect();
    let one = |index: usize,
               rng: &mut ChaCha8Rng,
               params: &BTreeMap<String, ArrayD<f32>>,
               sum: &mut BTreeMap<String, ArrayD<f32>>|
     -> Result<f64> {
        let sample = samples
            .sample(index, rng)
            .with_context(|| format!("reading {}", args.data.display()))?;
        let mut inputs = param_inputs(params);
        for (name, t) in sample {
            if name == names::IMAGES {
                let x = t.to_f32().into_dimensionality::<ndarray::Ix3>()?;
                inputs.push((input.clone(), det.image_input(x)));
            } else {
                inputs.push((name, Tensor::F32(t.to_f32().insert_axis(Axis(0)))));
            }
        }
        let outs = session
            .run(inputs)
            .context("running the adaptation graph")?;
        grads_of(outs, sum)
    };
    adaptation_loop(args, params, &items, &mut rng, one, |_| {})
}

/// A strong photometric view of a normalised image `[3, S, S]` (same geometry): brightness,
/// contrast and per-channel gains, Gaussian noise, in pixel space `[0, 1]`.
pub(super) fn perturb(
    x: &Array3<f32>,
    mean: [f32; 3],
    std: [f32; 3],
    rng: &mut ChaCha8Rng,
) -> Array3<f32> {
    let brightness = 0.6 + 0.8 * rng.random::<f32>();
    let contrast = 0.6 + 0.8 * rng.random::<f32>();
    let gains: Vec<f32> = (0..3).map(|_| 0.85 + 0.3 * rng.random::<f32>()).collect();
    let mut out = x.clone();
    let pixel_mean: f32 = (0..3)
        .map(|c| x.index_axis(Axis(0), c).mean().unwrap_or(0.0) * std[c] + mean[c])
        .sum::<f32>()
        / 3.0;
    for c in 0..3 {
        let mut ch = out.index_axis_mut(Axis(0), c);
        ch.mapv_inplace(|v| {
            let p = v * std[c] + mean[c];
            let p = (p - pixel_mean) * contrast + pixel_mean;
            let p = p * brightness * gains[c];
            // Box-Muller noise, sigma 0.03.
            let (u1, u2) = (rng.random::<f32>().max(1e-7), rng.random::<f32>());
            let n = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
            let p = (p + 0.03 * n).clamp(0.0, 1.0);
            (p - mean[c]) / std[c]
        });
    }
    out
}

fn sigmoid(a: ArrayD<f32>) -> ArrayD<f32> {
    a.mapv(|v| 1.0 / (1.0 + (-v).exp()))
}

#[allow(clippy::too_many_arguments)]
fn consistency(
    args: &AdaptArgs,
    det: &DeployedDetector,
    trainable: &[String],
    params: &mut BTreeMap<String, ArrayD<f32>>,
    backend: &dyn Backend,
    source: &dyn SampleSource,
    subset: &[usize],
) -> Result<(Vec<f64>, f64)> {
    let config = ConsistencyConfig {
        momentum: args.teacher_momentum,
        ..ConsistencyConfig::default()
    };
    let graph = det
        .consistency_graph(trainable, &config)
        .context("building the consistency graph")?;
    let mut student = backend.load_model(&graph, "consistency graph")?;
    let mut teacher_session = backend.load_model(&det.raw_graph(trainable)?, "teacher graph")?;
    let teacher = params.clone();
    let input = det.input_name();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x7eac);
    let (mean, std) = (det.spec.input.mean, det.spec.input.std);
    let teacher = std::cell::RefCell::new(teacher);
    let one = |i: usize,
               rng: &mut ChaCha8Rng,
               params: &BTreeMap<String, ArrayD<f32>>,
               sum: &mut BTreeMap<String, ArrayD<f32>>|
     -> Result<f64> {
        let sample = source.load(i).with_context(|| {
            format!(
                "reading {}",
                source
                    .image_path(i)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| args.data.display().to_string())
            )
        })?;
        let (weak, _) = prepare(&sample.image, &det.spec.input);
        let strong = perturb(&weak, mean, std, rng);
        let mut t_in = param_inputs(&teacher.borrow());
        t_in.push((input.clone(), det.image_input(weak)));
        let t_out = teacher_session.run(t_in).context("running the teacher")?;
        let get = |name: &str| -> Result<ArrayD<f32>> {
            t_out
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.to_f32())
                .with_context(|| format!("the teacher graph gave no `{name}`"))
        };
        let mut s_in = param_inputs(params);
        s_in.push((input.clone(), det.image_input(strong)));
        s_in.push((TEACHER_CLS.into(), Tensor::F32(sigmoid(get(&det.raw.cls)?))));
        s_in.push((TEACHER_CTR.into(), Tensor::F32(sigmoid(get(&det.raw.ctr)?))));
        s_in.push((TEACHER_BOX.into(), Tensor::F32(get(&det.raw.box_log)?)));
        let outs = student.run(s_in).context("running the consistency graph")?;
        grads_of(outs, sum)
    };
    let m = config.momentum;
    let ema =
        |params: &BTreeMap<String, ArrayD<f32>>| ema_update(&mut teacher.borrow_mut(), params, m);
    // The student is the adapted model (the teacher lags it by design).
    adaptation_loop(args, params, subset, &mut rng, one, ema)
}

/// Supervised adaptation of a segmenter: `finetune --task segment`'s samples (stretched to the
/// input size, random flip), per-pixel cross-entropy, one image per run.
fn supervised_segmenter(
    args: &AdaptArgs,
    seg: &DeployedSegmenter,
    trainable: &[String],
    params: &mut BTreeMap<String, ArrayD<f32>>,
    backend: &dyn Backend,
    subset: &[usize],
) -> Result<(Vec<f64>, f64)> {
    let source = Arc::new(open_source(&args.data, &args.images, &None)?);
    if source.segment_classes().len() != seg.classes.len() {
        bail!(
            "{}: {} mask classes ({}), the model {} has {} ({})",
            args.data.display(),
            source.segment_classes().len(),
            source.segment_classes().join(", "),
            seg.label,
            seg.classes.len(),
            seg.classes.join(", ")
        );
    }
    let graph = seg
        .supervised_graph(trainable)
        .context("building the adaptation graph")?;
    let mut session = backend.load_model(&graph, "adaptation graph")?;
    let mut samples = SegSamples {
        source,
        indices: subset.to_vec(),
        size: seg.image_size,
        mean: seg.mean,
        std: seg.std,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5e9);
    let items: Vec<usize> = (0..subset.len()).collect();
    let one = |index: usize,
               rng: &mut ChaCha8Rng,
               params: &BTreeMap<String, ArrayD<f32>>,
               sum: &mut BTreeMap<String, ArrayD<f32>>|
     -> Result<f64> {
        let sample = samples
            .sample(index, rng)
            .with_context(|| format!("reading {}", args.data.display()))?;
        let mut inputs = param_inputs(params);
        for (name, t) in sample {
            let t = match t {
                Tensor::I64(a) => Tensor::I64(a.insert_axis(Axis(0))),
                other => Tensor::F32(other.to_f32().insert_axis(Axis(0))),
            };
            inputs.push((name, t));
        }
        let outs = session
            .run(inputs)
            .context("running the adaptation graph")?;
        grads_of(outs, sum)
    };
    adaptation_loop(args, params, &items, &mut rng, one, |_| {})
}
