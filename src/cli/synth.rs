//! `densa synth`: writes a synthetic scene dataset (COCO JSON + images + semantic masks).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use densa_runtime::data::synth::{self, SynthConfig, SynthStyle};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory: images/, masks/ and annotations.json are written there.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 100)]
    pub images: usize,
    /// Seed: the same seed gives byte-identical files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of object classes (1-6: disk, square, triangle, ring, cross, star).
    #[arg(long, default_value_t = 3)]
    pub classes: usize,
    /// Image size, WIDTHxHEIGHT.
    #[arg(long, default_value = "128x128", value_parser = parse_size)]
    pub size: (u32, u32),
    /// Most objects placed per image (occluded ones are then dropped).
    #[arg(long, default_value_t = 5)]
    pub max_objects: usize,
    /// Background style: a (light, muted) or b (dark, saturated), for domain-shift studies.
    #[arg(long, default_value = "a")]
    pub style: SynthStyle,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("expected WIDTHxHEIGHT (e.g. 128x96), found {s:?}"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("expected WIDTHxHEIGHT (e.g. 128x96), found {s:?}"))
    };
    Ok((parse(w)?, parse(h)?))
}

pub fn run(args: SynthArgs) -> Result<()> {
    let config = SynthConfig {
        images: args.images,
        seed: args.seed,
        classes: args.classes,
        width: args.size.0,
        height: args.size.1,
        max_objects: args.max_objects,
        min_objects: SynthConfig::default().min_objects.min(args.max_objects),
        style: args.style,
        ..SynthConfig::default()
    };
    let bar = ProgressBar::new(args.images as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} images ({per_sec}, {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix("synth");
    let report = synth::generate(&config, &args.out, &|| bar.inc(1))
        .with_context(|| format!("writing synthetic scenes to {}", args.out.display()))?;
    bar.finish_and_clear();
    println!(
        "wrote {} images with {} objects ({} dropped as occluded) to {}",
        report.images,
        report.objects,
        report.dropped,
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("128x96"), Ok((128, 96)));
        assert_eq!(parse_size("64X64"), Ok((64, 64)));
        assert!(parse_size("128").is_err());
        assert!(parse_size("ax3").is_err());
    }
}
