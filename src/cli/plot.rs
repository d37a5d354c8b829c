//! `densa plot`: curves from JSONL logs as one PNG: a fine-tuning's `val.jsonl` (AP against
//! epochs), a run's `train_log.jsonl` (loss or a metric against steps), a benchmark's results.
//!
//! ```text
//! densa plot ft-random/val.jsonl=random ft-detreg/val.jsonl=DetReg --x epoch --y AP --out ap.png
//! ```
//!
//! Every line of a log is a JSON object; `--x` and `--y` name numeric fields (dotted paths reach
//! nested ones, `metrics/loss_ce.0`). Lines where a field is
//! missing or `null` are skipped; a log where no line has both is an error naming it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use densa_runtime::train::{plot_series, Series};
use serde_json::Value;

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// JSONL logs, each `PATH` or `PATH=LABEL` (the label defaults to the log's folder name).
    #[arg(required = true, value_name = "LOG[=LABEL]")]
    pub logs: Vec<String>,
    /// Field on the horizontal axis (`/` separates nested fields).
    #[arg(long, default_value = "step")]
    pub x: String,
    /// Field on the vertical axis (`/` separates nested fields).
    #[arg(long, default_value = "loss")]
    pub y: String,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Title above the plot (default: "Y vs X").
    #[arg(long)]
    pub title: Option<String>,
    /// Image width and height in pixels.
    #[arg(long, default_value_t = 800)]
    pub width: u32,
    #[arg(long, default_value_t = 500)]
    pub height: u32,
}

/// Splits `PATH=LABEL`; a whole argument naming an existing file is a path.
fn log_and_label(arg: &str) -> (PathBuf, String) {
    let folder_name = |p: &Path| {
        p.parent()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    };
    if !Path::new(arg).exists() {
        if let Some((path, label)) = arg.rsplit_once('=') {
            return (PathBuf::from(path), label.to_string());
        }
    }
    let path = PathBuf::from(arg);
    let label = folder_name(&path);
    (path, label)
}

/// The number at `field` (`a/b` for nested objects) of `line`, if any.
fn number_at(line: &Value, field: &str) -> Option<f64> {
    field
        .split('/')
        .try_fold(line, |v, key| v.get(key))
        .and_then(Value::as_f64)
}

/// The `(x, y)` points of the log at `path`.
pub fn read_points(path: &Path, x: &str, y: &str) -> Result<Vec<(f64, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut points = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // A line torn by a kill at the very end is not an error.
            Err(_) if i + 1 == lines.len() => continue,
            Err(e) => bail!("{}: line {}: not JSON: {e}", path.display(), i + 1),
        };
        if let (Some(a), Some(b)) = (number_at(&value, x), number_at(&value, y)) {
            points.push((a, b));
        }
    }
    if points.is_empty() {
        bail!(
            "{}: no line has both numeric fields `{x}` and `{y}`",
            path.display()
        );
    }
    Ok(points)
}

pub fn run(args: PlotArgs) -> Result<()> {
    let mut series = Vec::new();
    for arg in &args.logs {
        let (path, label) = log_and_label(arg);
        let points = read_points(&path, &args.x, &args.y)?;
        series.push(Series { label, points });
    }
    let title = args
        .title
        .clone()
        .unwrap_or_else(|| format!("{} vs {}", args.y, args.x));
    plot_series(
        &series,
        &args.out,
        &title,
        (&args.x, &args.y),
        (args.width, args.height),
    )
    .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "{}: {} curve(s) of {} vs {}",
        args.out.display(),
        series.len(),
        args.y,
        args.x
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_fields_and_skipped_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("val.jsonl");
        std::fs::write(
            &log,
            "{\"epoch\": 1, \"ap\": 0.1, \"m\": {\"x\": 2}}\n{\"epoch\": 2}\n\
             {\"epoch\": 3, \"ap\": null}\n{\"epoch\": 4, \"ap\": 0.3, \"m\": {\"x\": 5}}\n{\"ep",
        )
        .unwrap();
        assert_eq!(
            read_points(&log, "epoch", "ap").unwrap(),
            vec![(1.0, 0.1), (4.0, 0.3)]
        );
        assert_eq!(
            read_points(&log, "m/x", "ap").unwrap(),
            vec![(2.0, 0.1), (5.0, 0.3)]
        );
        let err = read_points(&log, "epoch", "AP").unwrap_err().to_string();
        assert!(err.contains("val.jsonl") && err.contains("`AP`"), "{err}");
        std::fs::write(&log, "{\"epoch\": 1}\nnot json\n{}\n").unwrap();
        let err = read_points(&log, "epoch", "ap").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn labels_default_to_the_folder() {
        let (p, l) = log_and_label("runs/ft-random/val.jsonl");
        assert_eq!(
            (p, l.as_str()),
            (PathBuf::from("runs/ft-random/val.jsonl"), "ft-random")
        );
        let (p, l) = log_and_label("runs/a/val.jsonl=DetReg");
        assert_eq!(
            (p, l.as_str()),
            (PathBuf::from("runs/a/val.jsonl"), "DetReg")
        );
    }
}
