//! Evaluation plots as PNG files: precision-recall curves and per-class AP bars.
//!
//! Drawn with `plotters` into an RGB buffer and written with `png`. Text uses DejaVu Sans,
//! embedded in the binary (the `dejavu` crate) and rasterised by `ab_glyph`: no system fonts or
//! fontconfig are needed, so plots render the same on a bare server or device.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

/// What prevents a plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {message}")]
    Encode { path: PathBuf, message: String },
}

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded DejaVu Sans is a valid TrueType font; failing here is a build defect.
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .unwrap_or_else(|_| panic!("the embedded DejaVu Sans font is invalid"));
    });
}

/// Renders `draw` into a `width x height` RGB image and writes it as PNG to `path`.
fn render(
    path: &Path,
    width: u32,
    height: u32,
    draw: impl FnOnce(
        &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    ) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<(), PlotError> {
    register_font();
    let draw_err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        draw(&root).map_err(|e| draw_err(&e))?;
        root.present().map_err(|e| draw_err(&e))?;
    }
    let file = std::fs::File::create(path).map_err(|source| PlotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let encode_err = |e: png::EncodingError| PlotError::Encode {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    enc.write_header()
        .map_err(encode_err)?
        .write_image_data(&buf)
        .map_err(encode_err)
}

/// Precision-recall curves, one line per `(label, [(recall, precision)])`, on `[0, 1]²`.
pub fn pr_curves_png(
    path: &Path,
    title: &str,
    curves: &[(String, Vec<(f64, f64)>)],
) -> Result<(), PlotError> {
    render(path, 800, 600, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)?;
        chart
            .configure_mesh()
            .x_desc("recall")
            .y_desc("precision")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()?;
        for (i, (label, points)) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

/// Horizontal bars of per-class AP in `[0, 1]`, the first class on top; a class without AP
/// (`None`) gets no bar and "(no ground truth)" after its name.
pub fn class_ap_png(
    path: &Path,
    title: &str,
    bars: &[(String, Option<f64>)],
) -> Result<(), PlotError> {
    let n = bars.len().max(1);
    let height = (110 + 22 * n).min(16_000) as u32;
    let names: Vec<String> = bars
        .iter()
        .map(|(name, ap)| match ap {
            Some(_) => name.clone(),
            None => format!("{name} (no ground truth)"),
        })
        .collect();
    let label_width = names
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(4)
        .clamp(4, 48) as u32
        * 8
        + 16;
    render(path, 900, height, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(label_width)
            .build_cartesian_2d(0f64..1f64, (0..n).into_segmented())?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("AP")
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) if *i < n => {
                    names.get(n - 1 - i).cloned().unwrap_or_default()
                }
                SegmentValue::CenterOf(_) | SegmentValue::Exact(_) => String::new(),
                SegmentValue::Last => String::new(),
            })
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 17))
            .draw()?;
        let fill = Palette99::pick(0).to_rgba().filled();
        // Rows count from the bottom: class i is drawn in row n - 1 - i.
        chart.draw_series(bars.iter().enumerate().filter_map(|(i, (_, ap))| {
            let i = n - 1 - i;
            ap.map(|ap| {
                let mut bar = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (ap, SegmentValue::Exact(i + 1)),
                    ],
                    fill,
                );
                bar.set_margin(3, 3, 0, 0);
                bar
            })
        }))?;
        chart.draw_series(bars.iter().enumerate().filter_map(|(i, (_, ap))| {
            let i = n - 1 - i;
            ap.map(|ap| {
                Text::new(
                    format!("{ap:.3}"),
                    ((ap + 0.01).min(0.93), SegmentValue::CenterOf(i)),
                    (FONT, 13).into_font().color(&BLACK),
                )
            })
        }))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back an RGB PNG: (width, height, pixels).
    fn read_rgb(path: &Path) -> (u32, u32, Vec<u8>) {
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        (info.width, info.height, buf)
    }

    fn dark_pixels(buf: &[u8]) -> usize {
        buf.chunks(3).filter(|p| p.iter().all(|&c| c < 80)).count()
    }

    #[test]
    fn pr_curves_render_lines_and_text_without_system_fonts() {
        let dir = tempfile::tempdir().unwrap();
        let curve: Vec<(f64, f64)> = (0..=100)
            .map(|i| (i as f64 / 100.0, 1.0 - (i as f64 / 100.0).powi(2)))
            .collect();
        let with_text = dir.path().join("pr.png");
        pr_curves_png(
            &with_text,
            "Precision-recall (bbox)",
            &[("IoU=.50".into(), curve.clone())],
        )
        .unwrap();
        let (w, h, buf) = read_rgb(&with_text);
        assert_eq!((w, h), (800, 600));
        // Text (title, axis labels) draws dark pixels: compare with the same plot untitled.
        let plain = dir.path().join("plain.png");
        pr_curves_png(&plain, "", &[("".into(), curve)]).unwrap();
        let (_, _, plain_buf) = read_rgb(&plain);
        assert!(
            dark_pixels(&buf) > dark_pixels(&plain_buf) + 200,
            "title and legend text should add glyph pixels: {} vs {}",
            dark_pixels(&buf),
            dark_pixels(&plain_buf)
        );
    }

    #[test]
    fn class_ap_bars_scale_with_classes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ap.png");
        let bars: Vec<(String, Option<f64>)> = (0..12)
            .map(|i| (format!("class{i}"), (i != 3).then_some(i as f64 / 12.0)))
            .collect();
        class_ap_png(&path, "AP per class", &bars).unwrap();
        let (w, h, buf) = read_rgb(&path);
        assert_eq!((w, h), (900, 110 + 22 * 12));
        // The bars are filled with the first palette colour.
        let bar = Palette99::pick(0).to_rgba();
        let filled = buf
            .chunks(3)
            .filter(|p| p == &[bar.0, bar.1, bar.2])
            .count();
        assert!(filled > 1000, "{filled} bar pixels");
    }

    #[test]
    fn unwritable_path_is_an_error() {
        let e = pr_curves_png(Path::new("/nonexistent-dir/pr.png"), "t", &[]).unwrap_err();
        assert!(
            e.to_string().starts_with("writing /nonexistent-dir/pr.png"),
            "{e}"
        );
    }
}
