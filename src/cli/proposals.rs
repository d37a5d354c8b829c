//! `densa proposals`: selective search region proposals for images (boxes printed, written as
//! JSON, drawn).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use densa_runtime::data::image::read_rgb;
use densa_runtime::proposals::{
    draw_proposals, selective_search, Connectivity, Mode, Proposal, SelectiveSearchConfig,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::detect::collect_images;

#[derive(Debug, Args)]
pub struct ProposalsArgs {
    /// Images, or directories searched recursively for jpg/png/bmp/webp files.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// single (HSV, one k, 1 strategy), fast (HSV+Lab, 3 k, 2 strategies) or quality
    /// (5 colour images, 5 k, 4 strategies), as OpenCV's selective search.
    #[arg(long, default_value = "fast")]
    pub mode: Mode,
    /// Keep only the N best-ranked proposals (print, draw and JSON). Without it: all in the
    /// JSON, 20 printed, 50 drawn.
    #[arg(long)]
    pub max: Option<usize>,
    /// Draw the proposals: a PNG file for one image, a directory for several.
    #[arg(long)]
    pub draw: Option<PathBuf>,
    /// Write every image's proposals as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Smallest segmentation scale k (the others step by --inc-k).
    #[arg(long, default_value_t = 150.0)]
    pub base_k: f32,
    #[arg(long, default_value_t = 150.0)]
    pub inc_k: f32,
    /// Gaussian smoothing before segmentation (pixels).
    #[arg(long, default_value_t = 0.8)]
    pub sigma: f32,
    /// Smallest initial region (pixels).
    #[arg(long, default_value_t = 100)]
    pub min_size: usize,
    /// Segmentation graph: 8 (the paper's) or 4 (OpenCV's) neighbours per pixel.
    #[arg(long, default_value = "8")]
    pub connectivity: Connectivity,
    /// Seed of the ranking's random values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// One image's entry in the JSON output.
#[derive(Debug, Serialize)]
struct ImageProposals {
    file: String,
    width: u32,
    height: u32,
    /// Selective search time for this image.
    seconds: f64,
    /// Proposals before `--max`.
    total: usize,
    /// `[x0, y0, x1, y1]` (pixels, x1/y1 exclusive), best ranked first.
    boxes: Vec<[f32; 4]>,
}

#[derive(Debug, Serialize)]
struct ProposalsJson<'a> {
    config: &'a SelectiveSearchConfig,
    images: Vec<ImageProposals>,
}

fn top(proposals: &[Proposal], n: usize) -> &[Proposal] {
    &proposals[..n.min(proposals.len())]
}

pub fn run(args: ProposalsArgs) -> Result<()> {
    let config = SelectiveSearchConfig {
        mode: args.mode,
        base_k: args.base_k,
        inc_k: args.inc_k,
        sigma: args.sigma,
        min_size: args.min_size,
        connectivity: args.connectivity,
        seed: args.seed,
    };
    config.validate()?;
    let files = collect_images(&args.inputs)?;
    if files.is_empty() {
        bail!("no images found in {:?}", args.inputs);
    }
    let draw_dir = match &args.draw {
        Some(d) if files.len() > 1 => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            Some(d.clone())
        }
        _ => None,
    };
    let bar = if files.len() > 1 {
        let bar = ProgressBar::new(files.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} images ({per_sec}, {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix("proposals");
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut entries = Vec::new();
    let started = Instant::now();
    let mut search_secs = 0.0;
    for path in &files {
        let img = read_rgb(path).with_context(|| format!("reading image {}", path.display()))?;
        let t = Instant::now();
        let proposals = selective_search(&img, &config)
            .with_context(|| format!("selective search on {}", path.display()))?;
        let seconds = t.elapsed().as_secs_f64();
        search_secs += seconds;
        let kept = top(&proposals, args.max.unwrap_or(usize::MAX));
        if let Some(out) = &args.draw {
            let out = match &draw_dir {
                Some(dir) => {
                    let name = path.file_stem().unwrap_or(path.as_os_str());
                    dir.join(Path::new(name).with_extension("png"))
                }
                None => out.clone(),
            };
            let mut canvas = img.clone();
            draw_proposals(&mut canvas, top(kept, args.max.unwrap_or(50)));
            canvas
                .save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
        }
        if args.json.is_none() {
            bar.suspend(|| {
                println!(
                    "{}: {} proposal(s) in {:.3} s",
                    path.display(),
                    proposals.len(),
                    seconds
                );
                for p in top(kept, args.max.unwrap_or(20)) {
                    println!(
                        "  {:>4}  [{:.0}, {:.0}, {:.0}, {:.0}]",
                        p.rank, p.x0, p.y0, p.x1, p.y1
                    );
                }
            });
        }
        entries.push(ImageProposals {
            file: path.display().to_string(),
            width: img.width(),
            height: img.height(),
            seconds,
            total: proposals.len(),
            boxes: kept.iter().map(Proposal::xyxy).collect(),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(path) = &args.json {
        let text = serde_json::to_string(&ProposalsJson {
            config: &config,
            images: entries,
        })?;
        densa_exporter::io::write_atomic(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "densa: selective search ({:?}) on {} image(s): {:.3} s searching, {:.1} images/s, {:.2} s in all",
        config.mode,
        files.len(),
        search_secs,
        files.len() as f64 / search_secs.max(1e-9),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
