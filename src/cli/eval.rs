//! `densa eval ...`: metrics on files, equal to the reference tools'.
//!
//! - `densa eval coco --gt GT.json --dt DT.json [--iou-type bbox|segm] [--json] [--report DIR]`:
//!   pycocotools' COCOeval. With `--json`, exactly one JSON object with the 12 stats
//!   (`AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl`, -1 where undefined).
//! - `densa eval seg --gt DIR --pred DIR --classes N [--ignore 255] [--json]`: mIoU and friends
//!   over PNG label maps matched by file name.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use densa_runtime::data::coco::{load_dataset, load_results, Dataset, Results};
use densa_runtime::eval::coco::{evaluate, CocoEvaluation, CocoParams, IouType};
use densa_runtime::eval::{plot, seg};

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// COCO box or mask AP/AR of detections (COCO results format) against a COCO ground truth,
    /// as pycocotools' COCOeval computes them.
    Coco(CocoArgs),
    /// Semantic segmentation metrics (mIoU, pixel accuracy) of PNG label maps.
    Seg(SegArgs),
    /// Run a detector on a COCO image set and score it (COCO AP, per class, PR curves, images/s).
    Detect(super::eval_detect::EvalDetectArgs),
    /// Serve a densa segmenter on a COCO dataset with masks: mIoU, per-class IoU, images/s.
    Segment(super::eval_segment::EvalSegmentArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum IouTypeArg {
    Bbox,
    Segm,
}

#[derive(Debug, Args)]
pub struct CocoArgs {
    /// Ground truth: a COCO instances JSON file.
    #[arg(long)]
    pub gt: PathBuf,
    /// Detections: a JSON array of {image_id, category_id, bbox, score[, segmentation]}.
    #[arg(long)]
    pub dt: PathBuf,
    /// Box IoU (bbox) or mask IoU (segm).
    #[arg(long, value_enum, default_value = "bbox")]
    pub iou_type: IouTypeArg,
    /// Print one JSON object with the 12 stats instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write pr_curves.png, class_ap.png and metrics.json (stats, per-class AP, PR curves)
    /// into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SegArgs {
    /// Directory of ground-truth label maps (.png; pixel = class index).
    #[arg(long)]
    pub gt: PathBuf,
    /// Directory of predicted label maps, same file names.
    #[arg(long)]
    pub pred: PathBuf,
    /// Number of classes (labels 0..N-1).
    #[arg(long)]
    pub classes: usize,
    /// Ground-truth label to skip.
    #[arg(long, default_value_t = 255)]
    pub ignore: u32,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Coco(args) => coco(args),
        EvalCommand::Seg(args) => segmentation(args),
        EvalCommand::Detect(args) => super::eval_detect::run(args),
        EvalCommand::Segment(args) => super::eval_segment::run(args),
    }
}

fn coco(args: CocoArgs) -> Result<()> {
    let iou_type = match args.iou_type {
        IouTypeArg::Bbox => IouType::Bbox,
        IouTypeArg::Segm => IouType::Segm,
    };
    let gt = load_dataset(&args.gt).context("reading the ground truth")?;
    let dt = load_results(&args.dt, &gt).context("reading the detections")?;
    warn_about(&gt, &dt, iou_type);
    let e = evaluate(&gt, &dt, &CocoParams::new(iou_type)).with_context(|| {
        format!(
            "evaluating {} against {}",
            args.dt.display(),
            args.gt.display()
        )
    })?;
    if let Some(dir) = &args.report {
        write_report(dir, &gt, &e)
            .with_context(|| format!("writing the report {}", dir.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&e.stats)?);
    } else {
        print_table(&gt, &e);
    }
    Ok(())
}

/// Notes on stderr where the input is evaluated the way pycocotools does but may not be what
/// was meant.
fn warn_about(gt: &Dataset, dt: &Results, iou_type: IouType) {
    let known: std::collections::HashSet<u64> = gt.categories.iter().map(|c| c.id).collect();
    let unknown = dt
        .detections
        .iter()
        .filter(|d| !known.contains(&d.category_id))
        .count();
    if unknown > 0 {
        eprintln!(
            "densa: note: {unknown} detection(s) have a category_id that is not among the ground \
             truth's categories; they are ignored (as pycocotools does)"
        );
    }
    if iou_type == IouType::Segm {
        let boxes_only = dt
            .detections
            .iter()
            .filter(|d| d.segmentation.is_none())
            .count();
        if boxes_only > 0 {
            eprintln!(
                "densa: note: {boxes_only} detection(s) have no segmentation; their boxes are \
                 used as masks (as pycocotools does)"
            );
        }
    }
}

fn category_names(gt: &Dataset, e: &CocoEvaluation) -> Vec<String> {
    e.category_ids
        .iter()
        .map(|id| {
            gt.categories
                .iter()
                .find(|c| c.id == *id)
                .map_or_else(|| id.to_string(), |c| c.name.clone())
        })
        .collect()
}

pub(super) fn print_table(gt: &Dataset, e: &CocoEvaluation) {
    println!(
        "COCO {} evaluation: {} images, {} categories",
        e.params.iou_type,
        e.num_images,
        e.category_ids.len()
    );
    for line in e.summary_lines() {
        println!("{line}");
    }
    let names = category_names(gt, e);
    let ap = e.category_ap(None);
    let ap50 = e.category_ap(Some(0.5));
    let width = names.iter().map(|n| n.len()).max().unwrap_or(8).max(8);
    println!();
    println!(
        "{:<width$} {:>8} {:>8} {:>8}",
        "category", "id", "AP", "AP50"
    );
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    for (k, name) in names.iter().enumerate() {
        println!(
            "{name:<width$} {:>8} {:>8} {:>8}",
            e.category_ids[k],
            fmt(ap[k]),
            fmt(ap50[k])
        );
    }
    if ap.iter().any(Option::is_none) {
        println!("(-: no ground truth of that category; left out of the means)");
    }
}

pub(super) fn write_report(dir: &Path, gt: &Dataset, e: &CocoEvaluation) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let iou = e.params.iou_type;
    let curves: Vec<(String, Vec<(f64, f64)>)> = [
        ("IoU=.50", Some(0.5)),
        ("IoU=.75", Some(0.75)),
        ("IoU=.50:.95", None),
    ]
    .into_iter()
    .map(|(label, t)| (label.to_string(), e.pr_curve(t)))
    .filter(|(_, c)| !c.is_empty())
    .collect();
    plot::pr_curves_png(
        &dir.join("pr_curves.png"),
        &format!("Precision-recall ({iou}, all areas, maxDets 100)"),
        &curves,
    )?;
    let names = category_names(gt, e);
    let ap = e.category_ap(None);
    let bars: Vec<(String, Option<f64>)> = names.iter().cloned().zip(ap.iter().copied()).collect();
    plot::class_ap_png(
        &dir.join("class_ap.png"),
        &format!("AP@[.50:.95] per category ({iou})"),
        &bars,
    )?;
    let per_class: Vec<serde_json::Value> = e
        .category_ids
        .iter()
        .zip(&names)
        .zip(ap.iter().zip(e.category_ap(Some(0.5))))
        .map(|((id, name), (ap, ap50))| {
            serde_json::json!({"id": id, "name": name, "AP": ap, "AP50": ap50})
        })
        .collect();
    let metrics = serde_json::json!({
        "iou_type": iou,
        "stats": e.stats,
        "per_class": per_class,
        "pr_curves": curves.iter().map(|(label, c)| serde_json::json!({
            "iou": label,
            "recall": c.iter().map(|p| p.0).collect::<Vec<_>>(),
            "precision": c.iter().map(|p| p.1).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let path = dir.join("metrics.json");
    std::fs::write(&path, serde_json::to_string_pretty(&metrics)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "densa: wrote {}, {} and {}",
        dir.join("pr_curves.png").display(),
        dir.join("class_ap.png").display(),
        path.display()
    );
    Ok(())
}

fn segmentation(args: SegArgs) -> Result<()> {
    let (matrix, images) =
        seg::evaluate_dirs(&args.gt, &args.pred, args.classes, Some(args.ignore)).with_context(
            || {
                format!(
                    "evaluating the label maps in {} against {}",
                    args.pred.display(),
                    args.gt.display()
                )
            },
        )?;
    let m = matrix.metrics();
    if args.json {
        let mut v = serde_json::to_value(&m)?;
        v["images"] = images.into();
        println!("{v}");
        return Ok(());
    }
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    println!(
        "Semantic segmentation: {images} images, {} classes, {} pixels (label {} ignored)",
        args.classes, m.pixels, args.ignore
    );
    println!("mIoU           {}", fmt(m.miou));
    println!("pixel accuracy {}", fmt(m.pixel_accuracy));
    println!("mean accuracy  {}", fmt(m.mean_accuracy));
    println!();
    println!("{:>5} {:>8} {:>8}", "class", "IoU", "acc");
    for (c, (iou, acc)) in m
        .per_class_iou
        .iter()
        .zip(&m.per_class_accuracy)
        .enumerate()
    {
        println!("{c:>5} {:>8} {:>8}", fmt(*iou), fmt(*acc));
    }
    if m.per_class_iou.iter().any(Option::is_none) {
        println!("(-: class in neither ground truth nor prediction; left out of mIoU)");
    }
    Ok(())
}
