//! What a run reports: one JSON object per step (JSONL), a progress bar, a PNG loss curve.
//!
//! `OUT/train_log.jsonl` holds one [`StepRecord`] per line. A resumed run first cuts the log
//! back to the checkpoint's step (dropping lines of steps the checkpoint does not contain and a
//! line torn by a kill), so the finished log reads as if the run had never stopped.
//! `OUT/loss.png` plots the finite losses against the step (log scale when every loss is
//! positive). Text is drawn with DejaVu Sans from the `dejavu` crate through plotters'
//! `ab_glyph` backend: no system fonts or fontconfig are needed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// File name of the step log inside the output directory.
pub const LOG_FILE: &str = "train_log.jsonl";
/// File name of the loss curve inside the output directory.
pub const PLOT_FILE: &str = "loss.png";

/// One line of the step log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Steps completed, this one included (1 for the first step).
    pub step: u64,
    /// Epoch of this step's batch, from 0.
    pub epoch: u64,
    /// The loss; `null` when it was not finite.
    pub loss: Option<f64>,
    /// Metric outputs (mean over their elements); `null` when not finite.
    pub metrics: BTreeMap<String, Option<f64>>,
    /// Every hyper input's value at this step (`lr`, `momentum`...).
    pub hyper: BTreeMap<String, f64>,
    /// Samples (the leading dimension of the batch) per second of this step, data included.
    pub images_per_s: f64,
    /// Training time since the run started, seconds (resumed runs continue the clock).
    pub time_s: f64,
    /// Whether the update was skipped (non-finite loss or new state); the state was kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Why it was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Why a log or plot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: line {line}: not a step record: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: drawing the loss curve failed: {message}")]
    Plot { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The step log being appended to.
pub struct JsonlLog {
    path: PathBuf,
    file: File,
}

impl JsonlLog {
    /// Starts a new log at `path` (an existing one is replaced).
    pub fn create(path: &Path) -> Result<JsonlLog, LogError> {
        let file = File::create(path).map_err(io(path))?;
        Ok(JsonlLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Continues the log at `path` after step `step`: lines of later steps, and a torn last
    /// line, are dropped first.
    pub fn resume(path: &Path, step: u64) -> Result<JsonlLog, LogError> {
        let kept: Vec<StepRecord> = if path.is_file() {
            read_records(path)?
                .into_iter()
                .filter(|r| r.step <= step)
                .collect()
        } else {
            Vec::new()
        };
        let mut text = String::new();
        for r in &kept {
            text.push_str(&serde_json::to_string(r).expect("a record serialises"));
            text.push('\n');
        }
        densa_exporter::io::write_atomic(path, text.as_bytes()).map_err(io(path))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(JsonlLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record (one line, flushed).
    pub fn append(&mut self, record: &StepRecord) -> Result<(), LogError> {
        let mut line = serde_json::to_string(record).expect("a record serialises");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(io(&self.path))?;
        self.file.flush().map_err(io(&self.path))
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a step log. A last line that does not parse (torn by a kill) is ignored; any other
/// bad line is an error naming it.
pub fn read_records(path: &Path) -> Result<Vec<StepRecord>, LogError> {
    let file = File::open(path).map_err(io(path))?;
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(io(path))?;
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<StepRecord>(line) {
            Ok(r) => records.push(r),
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => {
                return Err(LogError::Parse {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(records)
}

const FONT: &str = "sans-serif";

fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(
                FONT,
                plotters::style::FontStyle::Normal,
                dejavu::sans::regular(),
            )
            .map_err(|_| "the embedded DejaVu Sans font did not load".to_string())
        })
        .clone()
}

/// One named curve of [`plot_series`].
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub label: String,
    /// `(x, y)` points in drawing order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// Colours of successive series (colour-blind friendly, Okabe-Ito).
const PALETTE: [(u8, u8, u8); 8] = [
    (0, 114, 178),
    (213, 94, 0),
    (0, 158, 115),
    (204, 121, 167),
    (230, 159, 0),
    (86, 180, 233),
    (0, 0, 0),
    (240, 228, 66),
];

/// Draws `series` as lines with markers and a legend on linear axes labelled `x_desc` and
/// `y_desc`, as a `width` x `height` PNG at `path` (written atomically). An empty series list
/// draws empty axes.
pub fn plot_series(
    series: &[Series],
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    (width, height): (u32, u32),
) -> Result<(), LogError> {
    use plotters::prelude::*;

    let fail = |message: String| LogError::Plot {
        path: path.to_path_buf(),
        message,
    };
    register_font().map_err(fail)?;
    let finite: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let all = finite.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = all.fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let xpad = ((x1 - x0) * 0.03).max(0.5);
    let ypad = ((y1 - y0) * 0.05).max(1e-3);
    let mut pixels = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| fail(e.to_string());
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0 - xpad..x1 + xpad, y0 - ypad..y1 + ypad)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for (i, (s, points)) in series.iter().zip(&finite).enumerate() {
            let (r, g, b) = PALETTE[i % PALETTE.len()];
            let colour = RGBColor(r, g, b);
            let style = ShapeStyle::from(&colour).stroke_width(2);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), style))
                .map_err(err)?
                .label(s.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(err)?;
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    write_png(path, &pixels, (width, height))
}

/// Draws the loss curve of `records` (finite losses only) as a `width` x `height` PNG at
/// `path`, written atomically. `title` goes above the plot.
pub fn plot_loss(
    records: &[StepRecord],
    path: &Path,
    title: &str,
    (width, height): (u32, u32),
) -> Result<(), LogError> {
    use plotters::prelude::*;

    let fail = |message: String| LogError::Plot {
        path: path.to_path_buf(),
        message,
    };
    register_font().map_err(fail)?;
    let points: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.loss.filter(|l| l.is_finite()).map(|l| (r.step as f64, l)))
        .collect();
    let mut pixels = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| fail(e.to_string());
        root.fill(&WHITE).map_err(err)?;
        let x_max = points.last().map(|p| p.0).unwrap_or(1.0).max(1.0);
        let (lo, hi) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                (lo.min(p.1), hi.max(p.1))
            });
        let (lo, hi) = if points.is_empty() {
            (0.0, 1.0)
        } else {
            (lo, hi)
        };
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70);
        let line = |c: &RGBColor| ShapeStyle::from(c).stroke_width(2);
        if lo > 0.0 {
            let mut chart = builder
                .build_cartesian_2d(0.0..x_max, (lo * 0.9..hi * 1.1).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc("loss (log scale)")
                .label_style((FONT, 14))
                .draw()
                .map_err(err)?;
            chart
                .draw_series(LineSeries::new(points.iter().copied(), line(&BLUE)))
                .map_err(err)?;
        } else {
            let pad = ((hi - lo) * 0.05).max(1e-12);
            let mut chart = builder
                .build_cartesian_2d(0.0..x_max, lo - pad..hi + pad)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc("loss")
                .label_style((FONT, 14))
                .draw()
                .map_err(err)?;
            chart
                .draw_series(LineSeries::new(points.iter().copied(), line(&BLUE)))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    write_png(path, &pixels, (width, height))
}

/// The progress bar of a run (hidden when stderr is not a terminal or when disabled).
pub struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    /// A bar over `total` steps, already at `done`.
    pub fn new(total: u64, done: u64, visible: bool) -> Progress {
        let bar = if visible {
            indicatif::ProgressBar::new(total)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} steps  {msg}  ({elapsed} < {eta})",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix("train");
        bar.set_position(done);
        Progress { bar }
    }

    /// Moves to `record.step` and shows its loss, learning rate and throughput.
    pub fn update(&self, record: &StepRecord) {
        let loss = record
            .loss
            .map(|l| format!("loss {l:.4e}"))
            .unwrap_or_else(|| "loss non-finite".into());
        let lr = record
            .hyper
            .get("lr")
            .map(|v| format!("  lr {v:.3e}"))
            .unwrap_or_default();
        self.bar
            .set_message(format!("{loss}{lr}  {:.1} samples/s", record.images_per_s));
        self.bar.set_position(record.step);
    }

    /// Runs `f` with the bar cleared (for warnings).
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Leaves the bar at its final state.
    pub fn finish(&self) {
        self.bar.abandon();
    }
}

/// Encodes RGB `pixels` as a PNG and writes it atomically to `path`.
fn write_png(path: &Path, pixels: &[u8], (width, height): (u32, u32)) -> Result<(), LogError> {
    let fail = |e: png::EncodingError| LogError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut png_bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png_bytes, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(fail)?;
        writer.write_image_data(pixels).map_err(fail)?;
    }
    densa_exporter::io::write_atomic(path, &png_bytes).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, loss: Option<f64>) -> StepRecord {
        StepRecord {
            step,
            epoch: 0,
            loss,
            metrics: BTreeMap::new(),
            hyper: BTreeMap::from([("lr".to_string(), 0.1)]),
            images_per_s: 10.0,
            time_s: step as f64,
            skipped: loss.is_none(),
            note: None,
        }
    }

    #[test]
    fn resume_cuts_later_steps_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut log = JsonlLog::create(&path).unwrap();
        for s in 1..=5 {
            log.append(&record(s, Some(1.0 / s as f64))).unwrap();
        }
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"step\": 6, \"ep").unwrap();
        drop(f);
        let mut log = JsonlLog::resume(&path, 3).unwrap();
        log.append(&record(4, None)).unwrap();
        let records = read_records(&path).unwrap();
        assert_eq!(
            records.iter().map(|r| r.step).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(records[3].skipped && records[3].loss.is_none());
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        std::fs::write(&path, "{\"step\": 1}\nnot json\n{}\n").unwrap();
        let e = read_records(&path).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn plot_renders_without_system_fonts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PLOT_FILE);
        let records: Vec<_> = (1..=50).map(|s| record(s, Some(2.0 / s as f64))).collect();
        plot_loss(&records, &path, "loss", (320, 200)).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(File::open(&path).unwrap()));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (320, 200));
    }

    fn pixels_of(path: &Path) -> (Vec<u8>, u32, u32) {
        let decoder = png::Decoder::new(std::io::BufReader::new(File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (buf, info.width, info.height)
    }

    #[test]
    fn series_plot_draws_each_curve_in_its_colour() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ap.png");
        let series = vec![
            Series {
                label: "random".into(),
                points: vec![(1.0, 0.0), (2.0, 0.1), (3.0, f64::NAN), (4.0, 0.2)],
            },
            Series {
                label: "pretrained".into(),
                points: vec![(1.0, 0.1), (2.0, 0.3), (4.0, 0.4)],
            },
        ];
        plot_series(&series, &path, "AP", ("epoch", "AP"), (400, 300)).unwrap();
        let (px, w, h) = pixels_of(&path);
        assert_eq!((w, h), (400, 300));
        let count = |(r, g, b): (u8, u8, u8)| {
            px.chunks(3)
                .filter(|p| p[0] == r && p[1] == g && p[2] == b)
                .count()
        };
        assert!(count(PALETTE[0]) > 50, "first curve missing");
        assert!(count(PALETTE[1]) > 50, "second curve missing");
        assert_eq!(count(PALETTE[2]), 0, "only two curves were drawn");
        // Nothing to draw is still a valid (empty) plot.
        plot_series(&[], &path, "empty", ("x", "y"), (200, 100)).unwrap();
        assert_eq!(pixels_of(&path).1, 200);
    }
}
