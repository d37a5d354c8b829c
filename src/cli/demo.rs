//! `densa demo [--out DIR]`: the whole pipeline on synthetic data, on the CPU, in minutes:
//! `densa synth` scenes -> self-supervised pretraining of the backbone on every training image
//! (unlabelled; the method is [`DemoPlan::pretrain`]) -> fine-tuning the detector on 10% of the
//! labels -> export -> serving on tract (the embedded default backend) -> COCO evaluation ->
//! `DIR/report.md` with the metrics, a table of timings and drawn detections.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use densa_models::Arch;
use densa_runtime::backend::tract::TractBackend;
use densa_runtime::data::coco::load_dataset;
use densa_runtime::data::synth::{self, SynthConfig};
use densa_runtime::infer::decode::decode;
use densa_runtime::infer::draw::draw_detections;
use densa_runtime::infer::preprocess::prepare;
use densa_runtime::infer::ModelSpec;
use densa_runtime::{Backend, BackendKind, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use super::eval_detect::{coco_metrics, detect_dataset};
use super::export_detector::load_checkpoint;
use super::finetune::{FinetuneArgs, Task};
use super::{BackendArgs, DemoArgs, DeviceArg};

/// The demo's pretraining: a method of `densa methods` and its budget.
pub struct PretrainPlan {
    pub method: &'static str,
    pub steps: u64,
    pub batch: usize,
    pub image_size: u32,
    /// Hyperparameter overrides (`key=value`), e.g. the queue length for 3000 images.
    pub set: Vec<String>,
}

/// Sizes of the demo: chosen so that 2 CPU cores finish in well under 15 minutes.
pub struct DemoPlan {
    /// Self-supervised pretraining before fine-tuning; `None`: random initialisation.
    pub pretrain: Option<PretrainPlan>,
    pub train_images: usize,
    pub val_images: usize,
    pub label_fraction: f64,
    pub epochs: u64,
    pub batch_size: usize,
}

impl Default for DemoPlan {
    fn default() -> Self {
        DemoPlan {
            pretrain: Some(PretrainPlan {
                method: DEMO_METHOD,
                steps: 600,
                batch: 32,
                image_size: 64,
                set: Vec::new(),
            }),
            train_images: 3000,
            val_images: 100,
            label_fraction: 0.1,
            epochs: 24,
            batch_size: 8,
        }
    }
}

/// The demo's pretext method: the best detection row of `benches/pretrain_table.sh` at the
/// demo's budget (600 steps of batch 32 at 64 px on the 3000 scenes, seed 0; AP / AP50 after
/// fine-tuning on 10% of the labels: PixPro 0.238 / 0.425, MoCo-v2 0.221 / 0.390, DenseCL
/// 0.218 / 0.390, random 0.216 / 0.387).
pub const DEMO_METHOD: &str = "pixpro";

fn stage(name: &str) {
    eprintln!("\n== densa demo: {name}");
}

fn synth_set(dir: &Path, images: usize, seed: u64) -> Result<()> {
    let config = SynthConfig {
        images,
        seed,
        ..SynthConfig::default()
    };
    let bar = ProgressBar::new(images as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} images")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix("synth");
    synth::generate(&config, dir, &|| bar.inc(1))
        .with_context(|| format!("writing synthetic scenes to {}", dir.display()))?;
    bar.finish_and_clear();
    Ok(())
}

pub fn run(args: DemoArgs) -> Result<()> {
    run_plan(&args.out, &DemoPlan::default())
}

/// Runs the demo with `plan` into `out`.
pub fn run_plan(out: &Path, plan: &DemoPlan) -> Result<()> {
    let total = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut timings: Vec<(String, f64)> = Vec::new();

    stage("1/6 synthetic data");
    let t = Instant::now();
    let train = out.join("data/train");
    let val = out.join("data/val");
    synth_set(&train, plan.train_images, 0)?;
    synth_set(&val, plan.val_images, 1)?;
    timings.push(("synthetic data".into(), t.elapsed().as_secs_f64()));
    eprintln!(
        "{} training and {} validation scenes (128x128, 3 classes) in {}",
        plan.train_images,
        plan.val_images,
        out.join("data").display()
    );

    stage("2/6 self-supervised pretraining (no labels)");
    let t = Instant::now();
    let pretrain_dir = out.join("pretrain");
    let init = match &plan.pretrain {
        Some(p) => {
            eprintln!(
                "{}: {} steps of batch {} ({}px views) on the {} training images",
                p.method, p.steps, p.batch, p.image_size, plan.train_images
            );
            super::pretrain::run(super::pretrain::PretrainArgs {
                method: p.method.into(),
                arch: Arch::Edge,
                data: train.join("images"),
                epochs: None,
                steps: Some(p.steps),
                batch: p.batch,
                image_size: p.image_size,
                set: p.set.clone(),
                config: None,
                checkpoint_every: 200,
                seed: 0,
                out: pretrain_dir.clone(),
                backend: BackendArgs {
                    backend: BackendKind::Auto,
                    threads: None,
                    no_download: false,
                    device: DeviceArg::Fixed(Device::Cpu),
                },
            })?;
            timings.push((
                format!("pretraining ({})", p.method),
                t.elapsed().as_secs_f64(),
            ));
            pretrain_dir.display().to_string()
        }
        None => {
            eprintln!(
                "no pretraining in this plan: the backbone starts from random initialisation"
            );
            timings.push(("pretraining (none: random init)".into(), 0.0));
            "random".into()
        }
    };

    stage("3/6 fine-tuning on 10% of the labels");
    let t = Instant::now();
    let run_dir = out.join("finetune");
    let args = FinetuneArgs {
        task: Task::Detect,
        arch: Arch::Edge.into(),
        data: train.join("annotations.json"),
        images: None,
        val_data: Some(val.join("annotations.json")),
        val_images: None,
        masks: None,
        val_masks: None,
        init,
        label_fraction: Some(plan.label_fraction),
        shots: None,
        freeze_backbone: false,
        detector: Some(super::finetune::DetectorKind::Fcos),
        epochs: plan.epochs,
        batch_size: plan.batch_size,
        lr: None,
        image_size: None,
        val_every: (plan.epochs / 4).max(1),
        seed: 0,
        out: run_dir.clone(),
        backend: BackendArgs {
            backend: BackendKind::Auto,
            threads: None,
            no_download: false,
            device: DeviceArg::Fixed(Device::Cpu),
        },
    };
    let outcome = super::finetune_detect::finetune(&args, &|line| eprintln!("{line}"))?;
    timings.push(("fine-tuning".into(), t.elapsed().as_secs_f64()));

    stage("4/6 export");
    let t = Instant::now();
    let (config, state, from) = load_checkpoint(&run_dir)?;
    let model = super::export_detector::detector_model(&config, &state, 100, 0.6)?;
    let model_path = out.join("detector.onnx");
    densa_exporter::io::save(&model, &model_path)
        .with_context(|| format!("writing {}", model_path.display()))?;
    timings.push(("export".into(), t.elapsed().as_secs_f64()));
    eprintln!("{} (from {})", model_path.display(), from.display());

    stage("5/6 serving on tract and evaluating");
    let t = Instant::now();
    let model = densa_exporter::io::load(&model_path)?;
    let spec = ModelSpec::from_model(&model, &model_path.display().to_string())?;
    let backend = TractBackend;
    let mut session = backend.load_model(&model, "detector.onnx")?;
    let gt = load_dataset(val.join("annotations.json"))?;
    let run = detect_dataset(
        session.as_mut(),
        &spec,
        &gt,
        &val.join("images"),
        8,
        0.001,
        "detector.onnx",
    )?;
    let e = coco_metrics(&gt, &run)?;
    super::eval::write_report(&out.join("eval"), &gt, &e)?;
    timings.push(("serve + evaluate (tract)".into(), t.elapsed().as_secs_f64()));

    stage("6/6 drawing detections and writing the report");
    let drawn = out.join("detections");
    std::fs::create_dir_all(&drawn)?;
    let mut pictures = Vec::new();
    for im in gt.images.iter().take(6) {
        let path = val.join("images").join(&im.file_name);
        let img = image::open(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .to_rgb8();
        let (x, tr) = prepare(&img, &spec.input);
        let outputs = session.run(vec![(
            "images".into(),
            Tensor::F32(x.insert_axis(ndarray::Axis(0)).into_dyn()),
        )])?;
        let dets = decode(&outputs, &spec, &[tr], 0.3, "detector.onnx")?.remove(0);
        let mut canvas = img;
        draw_detections(&mut canvas, &dets, |l| spec.class_name(l));
        let file = drawn.join(&im.file_name).with_extension("png");
        canvas
            .save(&file)
            .with_context(|| format!("writing {}", file.display()))?;
        pictures.push(file);
    }
    let seconds = total.elapsed().as_secs_f64();
    let mut md = String::new();
    md.push_str("# densa demo\n\n");
    md.push_str(&format!(
        "Synthetic scenes (`densa synth`, 128x128, 3 classes) -> pretraining -> fine-tuning an \
         FCOS-style detector ({} backbone + FPN P3-P5 + GroupNorm heads) on {} labelled images \
         ({:.0}% of {}) for {} epochs ({} steps) -> export (`detector.onnx`, batch norm folded, \
         decoding in the graph) -> serving on tract -> COCO evaluation on {} held-out images.\n\n",
        config.arch,
        outcome.train_images,
        plan.label_fraction * 100.0,
        plan.train_images,
        plan.epochs,
        outcome.steps,
        run.served
    ));
    match &plan.pretrain {
        Some(p) => md.push_str(&format!(
            "**Pretraining:** `{}` ({} steps of batch {}, {}px views, {}) on all {} training \
             images without their labels; its backbone (`pretrain/backbone.safetensors`) \
             initialises fine-tuning. `benches/pretrain_table.sh` compares every method with \
             random initialisation.\n\n",
            p.method,
            p.steps,
            p.batch,
            p.image_size,
            if p.set.is_empty() {
                "paper defaults".to_string()
            } else {
                format!("`{}`", p.set.join(" "))
            },
            plan.train_images
        )),
        None => md
            .push_str("**Pretraining:** none; the backbone starts from random initialisation.\n\n"),
    }
    md.push_str(
        "## Metrics (validation set, served on tract)\n\n| metric | value |\n| --- | --- |\n",
    );
    for (name, v) in densa_runtime::eval::coco::CocoStats::NAMES
        .iter()
        .zip(e.stats.to_array())
    {
        md.push_str(&format!("| {name} | {v:.4} |\n"));
    }
    md.push_str(&format!(
        "| images/s (tract, batch 8, incl. decode) | {:.1} |\n\n",
        run.images_per_s()
    ));
    if let Some(best) = &outcome.best {
        md.push_str(&format!(
            "Best validation during fine-tuning: epoch {} (AP {:.4}, AP50 {:.4}).\n\n",
            best.epoch, best.ap, best.ap50
        ));
    }
    md.push_str("Per-class AP and PR curves: `eval/class_ap.png`, `eval/pr_curves.png`.\n\n");
    md.push_str("## Timings\n\n| stage | seconds |\n| --- | --- |\n");
    for (name, s) in &timings {
        md.push_str(&format!("| {name} | {s:.1} |\n"));
    }
    md.push_str(&format!("| **total** | **{seconds:.1}** |\n\n"));
    md.push_str("## Detections (score >= 0.3)\n\n");
    for p in &pictures {
        let rel = p.strip_prefix(out).unwrap_or(p);
        md.push_str(&format!("![]({})\n", rel.display()));
    }
    let report = out.join("report.md");
    std::fs::write(&report, md).with_context(|| format!("writing {}", report.display()))?;
    eprintln!(
        "\ndensa demo: AP50 {:.3}, AP {:.3} in {:.0} s; report: {}",
        e.stats.ap50,
        e.stats.ap,
        seconds,
        report.display()
    );
    Ok(())
}
