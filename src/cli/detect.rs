//! `densa detect`: serve a detector on images.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use densa_runtime::data::coco::Detection as CocoDetection;
use densa_runtime::infer::decode::decode;
use densa_runtime::infer::draw::draw_detections;
use densa_runtime::infer::preprocess::prepare;
use densa_runtime::infer::spec::InputLayout;
use densa_runtime::infer::ModelSpec;
use densa_runtime::{open_backend, Tensor};
use ndarray::{Axis, IxDyn};

use super::BackendArgs;

#[derive(Debug, Args)]
pub struct DetectArgs {
    /// The detector (.onnx). densa exports describe themselves; others need --spec.
    pub model: PathBuf,
    /// Images, or directories searched recursively for jpg/png/bmp/webp files.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// TOML spec of a third-party model's input and output layout (see README).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Drop detections scoring below this.
    #[arg(long, default_value_t = 0.25)]
    pub score_threshold: f32,
    /// Write the detections in the COCO results format (with `file_name`).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write each image with its detections drawn into this directory.
    #[arg(long)]
    pub draw: Option<PathBuf>,
    /// Images per run (NCHW models with a dynamic batch axis).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// The image files named by `inputs` (directories recursively, sorted).
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if densa_runtime::data::image::is_image_file(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.exists() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(out)
}

pub fn run(args: DetectArgs) -> Result<()> {
    let model_label = args.model.display().to_string();
    let model = densa_exporter::io::load(&args.model)
        .with_context(|| format!("reading model {model_label}"))?;
    let spec = match &args.spec {
        Some(p) => ModelSpec::from_file(p)?,
        None => ModelSpec::from_model(&model, &model_label)?,
    };
    let backend = open_backend(args.backend.backend, &args.backend.options())?;
    let mut session = backend.load_model(&model, &model_label)?;
    let input_name =
        match &spec.input.name {
            Some(n) => n.clone(),
            None => match session.interface().inputs.as_slice() {
                [one] => one.name.clone(),
                many => bail!(
                "{model_label} has {} inputs ({}); name the image input in the spec (input.name)",
                many.len(),
                many.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
            },
        };
    let batch = if spec.input.layout == InputLayout::Chw {
        1
    } else {
        args.batch.max(1)
    };
    let files = collect_images(&args.inputs)?;
    if files.is_empty() {
        bail!("no images found in {:?}", args.inputs);
    }
    if let Some(dir) = &args.draw {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut results: Vec<CocoDetection> = Vec::new();
    let (mut served, mut skipped) = (0usize, 0usize);
    let started = Instant::now();
    for (chunk_index, chunk) in files.chunks(batch).enumerate() {
        let mut images = Vec::new();
        for path in chunk {
            match image::open(path) {
                Ok(img) => images.push((path, img.to_rgb8())),
                Err(e) => {
                    eprintln!("densa: warning: skipping {}: {e}", path.display());
                    skipped += 1;
                }
            }
        }
        if images.is_empty() {
            continue;
        }
        let prepared: Vec<_> = images
            .iter()
            .map(|(_, img)| prepare(img, &spec.input))
            .collect();
        let views: Vec<_> = prepared.iter().map(|(x, _)| x.view()).collect();
        let stacked = ndarray::stack(Axis(0), &views)?;
        let input = match spec.input.layout {
            InputLayout::Nchw => stacked.into_dyn(),
            InputLayout::Chw => {
                let shape = stacked.shape()[1..].to_vec();
                stacked.into_shape_with_order(IxDyn(&shape))?
            }
        };
        let outputs = session
            .run(vec![(input_name.clone(), Tensor::F32(input))])
            .with_context(|| format!("running {model_label} on batch {chunk_index}"))?;
        let transforms: Vec<_> = prepared.iter().map(|(_, t)| *t).collect();
        let detections = decode(
            &outputs,
            &spec,
            &transforms,
            args.score_threshold,
            &model_label,
        )?;
        for ((path, img), dets) in images.into_iter().zip(detections) {
            served += 1;
            let file_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for d in &dets {
                results.push(CocoDetection {
                    image_id: served as u64,
                    category_id: d.label as u64,
                    bbox: [
                        d.bbox[0] as f64,
                        d.bbox[1] as f64,
                        (d.bbox[2] - d.bbox[0]) as f64,
                        (d.bbox[3] - d.bbox[1]) as f64,
                    ],
                    score: d.score as f64,
                    segmentation: None,
                    file_name: Some(file_name.clone()),
                });
            }
            if let Some(dir) = &args.draw {
                let mut canvas = img;
                draw_detections(&mut canvas, &dets, |l| spec.class_name(l));
                let out = dir.join(Path::new(&file_name).with_extension("png"));
                canvas
                    .save(&out)
                    .with_context(|| format!("writing {}", out.display()))?;
            }
            if args.json.is_none() {
                println!("{}: {} detection(s)", path.display(), dets.len());
                for d in &dets {
                    println!(
                        "  {:<12} {:.3}  [{:.1}, {:.1}, {:.1}, {:.1}]",
                        spec.class_name(d.label),
                        d.score,
                        d.bbox[0],
                        d.bbox[1],
                        d.bbox[2],
                        d.bbox[3]
                    );
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&results)?;
        densa_exporter::io::write_atomic(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "densa: {served} image(s) served on {} in {secs:.2} s ({:.1} images/s){}",
        backend.label(),
        served as f64 / secs.max(1e-9),
        if skipped > 0 {
            format!(", {skipped} skipped")
        } else {
            String::new()
        }
    );
    if served == 0 {
        bail!("none of the {} image(s) could be read", files.len());
    }
    Ok(())
}
