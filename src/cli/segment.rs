//! `densa segment MODEL.onnx IMAGE_OR_DIR... [--out DIR] [--backend B] [--batch N]`: serves a
//! segmenter exported by `densa export segmenter`. Writes `DIR/labels/<stem>.png` (class index
//! per pixel, original image size) and `DIR/overlays/<stem>.png` (classes blended over the
//! image). Unreadable images are reported and skipped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use densa_runtime::backend::Session;
use densa_runtime::data::image::{write_png_gray, write_png_rgb};
use densa_runtime::infer::segment::{overlay, segment_batch, SegmenterSpec};
use densa_runtime::open_backend;
use image::{GrayImage, RgbImage};

use super::BackendArgs;

#[derive(Debug, Args)]
pub struct SegmentArgs {
    /// The segmenter (.onnx) written by `densa export segmenter`.
    pub model: PathBuf,
    /// Images, or directories searched recursively for jpg/png/bmp/webp files.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output directory: labels/ (label PNGs) and overlays/ (colour overlays).
    #[arg(long, default_value = "segment-out")]
    pub out: PathBuf,
    /// Images per run.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// What a serving loop did.
pub struct Served {
    pub served: usize,
    pub skipped: usize,
    /// Wall time of decoding, preprocessing, inference and mapping back (not of `on_image`).
    pub secs: f64,
}

/// Segments `files` in batches; calls `on_image(path, image, labels)` for each readable image
/// (labels at the image's size). Unreadable images are reported on stderr and skipped.
pub fn segment_files(
    session: &mut dyn Session,
    spec: &SegmenterSpec,
    files: &[PathBuf],
    batch: usize,
    model_label: &str,
    mut on_image: impl FnMut(&Path, &RgbImage, &GrayImage) -> Result<()>,
) -> Result<Served> {
    let (mut served, mut skipped) = (0usize, 0usize);
    let mut secs = 0.0;
    for (chunk_index, chunk) in files.chunks(batch.max(1)).enumerate() {
        let started = Instant::now();
        let mut images = Vec::new();
        for path in chunk {
            match densa_runtime::data::image::read_rgb(path) {
                Ok(img) => images.push((path, img)),
                Err(e) => {
                    eprintln!("densa: warning: skipping {e}");
                    skipped += 1;
                }
            }
        }
        if images.is_empty() {
            continue;
        }
        let refs: Vec<&RgbImage> = images.iter().map(|(_, i)| i).collect();
        let maps = segment_batch(session, spec, &refs, model_label).with_context(|| {
            format!(
                "running {model_label} on batch {chunk_index} ({})",
                chunk[0].display()
            )
        })?;
        secs += started.elapsed().as_secs_f64();
        for ((path, img), labels) in images.iter().zip(&maps) {
            served += 1;
            on_image(path, img, labels)?;
        }
    }
    Ok(Served {
        served,
        skipped,
        secs,
    })
}

pub fn run(args: SegmentArgs) -> Result<()> {
    let model_label = args.model.display().to_string();
    let model = densa_exporter::io::load(&args.model)
        .with_context(|| format!("reading model {model_label}"))?;
    let spec = SegmenterSpec::from_model(&model, &model_label)?;
    let backend = open_backend(args.backend.backend, &args.backend.options())?;
    let mut session = backend.load_model(&model, &model_label)?;
    let files = super::detect::collect_images(&args.inputs)?;
    if files.is_empty() {
        bail!("no images found in {:?}", args.inputs);
    }
    let labels_dir = args.out.join("labels");
    let overlays_dir = args.out.join("overlays");
    for d in [&labels_dir, &overlays_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let classes = spec.num_classes();
    let stats = segment_files(
        session.as_mut(),
        &spec,
        &files,
        args.batch,
        &model_label,
        |path, img, labels| {
            let name = Path::new(path.file_name().unwrap_or_default()).with_extension("png");
            write_png_gray(&labels_dir.join(&name), labels)?;
            write_png_rgb(&overlays_dir.join(&name), &overlay(img, labels))?;
            let mut counts = vec![0usize; classes];
            for p in labels.pixels() {
                counts[p.0[0] as usize] += 1;
            }
            let total = (labels.width() * labels.height()).max(1) as f64;
            let shares: Vec<String> = counts
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(c, &n)| {
                    format!(
                        "{} {:.1}%",
                        spec.output.classes[c],
                        100.0 * n as f64 / total
                    )
                })
                .collect();
            println!("{}: {}", path.display(), shares.join(", "));
            Ok(())
        },
    )?;
    eprintln!(
        "densa: {} image(s) segmented on {} in {:.2} s ({:.1} images/s){}; wrote {} and {}",
        stats.served,
        backend.name(),
        stats.secs,
        stats.served as f64 / stats.secs.max(1e-9),
        if stats.skipped > 0 {
            format!(", {} skipped", stats.skipped)
        } else {
            String::new()
        },
        labels_dir.display(),
        overlays_dir.display()
    );
    if stats.served == 0 {
        bail!("none of the {} image(s) could be read", files.len());
    }
    Ok(())
}
