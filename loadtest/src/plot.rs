//! The latency chart as a PNG (`--plot`), drawn with plotters into a memory buffer and encoded
//! with png: above, latency by percentile on a log "nines" axis (0 %, 90 %, 99 %, 99.9 %, ...);
//! below, latency over the measured window, second by second (p50, p99, max).
//!
//! Text needs a font file. The chart looks for one at run time ([`FONT_PATHS`], or the file
//! named by `CITYCARD_PLOT_FONT`); without one it is drawn without any text rather than not
//! at all.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Context};
use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::stats::Sample;

/// A line of the over-time panel: its legend, colour and value.
type Line = (&'static str, RGBColor, fn(&Sample) -> u64);

/// Chart size in pixels.
pub const WIDTH: u32 = 1000;
pub const HEIGHT: u32 = 800;
/// Font files tried in order: DejaVu Sans and Liberation Sans where Debian (fonts-dejavu-core,
/// fonts-liberation), Fedora and Arch put them.
pub const FONT_PATHS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];
/// Environment variable naming a font file to use instead.
pub const FONT_ENV: &str = "CITYCARD_PLOT_FONT";
/// A font file larger than this is not read (DejaVu Sans is about 0.7 MB).
const MAX_FONT_BYTES: u64 = 32 * 1024 * 1024;
/// The family name the font is registered under.
const FAMILY: &str = "sans-serif";
/// Most nines on the percentile axis (99.9999 %).
const MAX_NINES: u32 = 6;
/// Points per nine on the percentile curve.
const POINTS_PER_NINE: u32 = 200;

const CURVE: RGBColor = RGBColor(20, 90, 200);
const P99: RGBColor = RGBColor(200, 40, 40);
const MAX: RGBColor = RGBColor(150, 150, 150);

/// Whether text can be drawn: registers the first usable font once per process. The font's
/// bytes are leaked on purpose: plotters keeps a `'static` reference to them.
pub fn font_available() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let explicit = std::env::var_os(FONT_ENV).map(PathBuf::from);
        let candidates = explicit.into_iter().chain(FONT_PATHS.iter().map(PathBuf::from));
        for path in candidates {
            let fits =
                std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() <= MAX_FONT_BYTES);
            let Some(bytes) = fits.then(|| std::fs::read(&path).ok()).flatten() else {
                continue;
            };
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        false
    })
}

fn percentile_label(nines: u32) -> String {
    match nines {
        0 => "0%".into(),
        1 => "90%".into(),
        2 => "99%".into(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)),
    }
}

/// The quantile that lies `nines` nines out: 0 -> 0, 1 -> 0.9, 2 -> 0.99, ...
fn quantile_of(nines: f64) -> f64 {
    1.0 - 10f64.powf(-nines)
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e:?}")
}

/// Draws the chart of `h` (microseconds) and `series` into an RGB buffer of
/// `WIDTH * HEIGHT * 3` bytes, with text when `text` is true (a font must then be registered).
pub fn render(
    h: &Histogram<u64>,
    series: &[Sample],
    title: &str,
    text: bool,
) -> anyhow::Result<Vec<u8>> {
    let mut buffer = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = if text {
            root.titled(title, (FAMILY, 22)).map_err(draw_err)?
        } else {
            root.margin(10, 0, 0, 0)
        };
        let (upper, lower) = root.split_vertically(HEIGHT * 55 / 100);
        draw_percentiles(&upper, h, text)?;
        draw_over_time(&lower, series, text)?;
        root.present().map_err(draw_err)?;
    }
    Ok(buffer)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_percentiles(area: &Area<'_>, h: &Histogram<u64>, text: bool) -> anyhow::Result<()> {
    let count = h.len().max(1) as f64;
    let nines = (count.log10().ceil() as u32).clamp(1, MAX_NINES);
    let top_ms = (h.max() as f64 / 1000.0).max(0.001) * 1.05;
    let mut builder = ChartBuilder::on(area);
    builder.margin(15).margin_right(45);
    if text {
        builder
            .caption("latency by percentile", (FAMILY, 18))
            .x_label_area_size(40)
            .y_label_area_size(70);
    }
    let mut chart =
        builder.build_cartesian_2d(0f64..f64::from(nines), 0f64..top_ms).map_err(draw_err)?;
    let x_label = |v: &f64| {
        let rounded = v.round();
        if (v - rounded).abs() < 1e-9 {
            percentile_label(rounded as u32)
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_labels(nines as usize + 1).max_light_lines(0);
    if text {
        mesh.x_label_formatter(&x_label)
            .y_desc("latency, ms")
            .x_desc("percentile")
            .label_style((FAMILY, 14));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(draw_err)?;
    if h.is_empty() {
        return Ok(());
    }
    // Sampled every 1/POINTS_PER_NINE of a nine; the last point is the maximum.
    let steps = POINTS_PER_NINE * nines;
    let points = (0..=steps).map(|i| {
        let x = f64::from(i) / f64::from(POINTS_PER_NINE);
        let value = if i == steps { h.max() } else { h.value_at_quantile(quantile_of(x)) };
        (x, value as f64 / 1000.0)
    });
    chart.draw_series(LineSeries::new(points, CURVE.stroke_width(2))).map_err(draw_err)?;
    Ok(())
}

fn draw_over_time(area: &Area<'_>, series: &[Sample], text: bool) -> anyhow::Result<()> {
    let end_s = series.last().map_or(1.0, |s| s.t_s).max(1.0);
    let top_ms = series.iter().map(|s| s.max_us).max().unwrap_or(1) as f64 / 1000.0 * 1.05;
    let mut builder = ChartBuilder::on(area);
    builder.margin(15).margin_right(45);
    if text {
        let mean_tps = if series.is_empty() {
            0.0
        } else {
            series.iter().map(|s| s.tps).sum::<f64>() / series.len() as f64
        };
        builder
            .caption(
                format!("latency over time, per second (mean {mean_tps:.0} tx/s)"),
                (FAMILY, 18),
            )
            .x_label_area_size(40)
            .y_label_area_size(70);
    }
    let mut chart =
        builder.build_cartesian_2d(0f64..end_s, 0f64..top_ms.max(0.001)).map_err(draw_err)?;
    let mut mesh = chart.configure_mesh();
    mesh.max_light_lines(0);
    if text {
        mesh.y_desc("latency, ms")
            .x_desc("seconds into the measured window")
            .label_style((FAMILY, 14));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(draw_err)?;
    let lines: [Line; 3] =
        [("max", MAX, |s| s.max_us), ("p99", P99, |s| s.p99_us), ("p50", CURVE, |s| s.p50_us)];
    for (name, color, value) in lines {
        let points = series.iter().map(|s| (s.t_s, value(s) as f64 / 1000.0));
        let drawn =
            chart.draw_series(LineSeries::new(points, color.stroke_width(2))).map_err(draw_err)?;
        if text {
            drawn.label(name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FAMILY, 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Encodes an RGB buffer of `WIDTH * HEIGHT` pixels as a PNG.
pub fn encode_png(rgb: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("writing the PNG header")?;
    writer.write_image_data(rgb).context("encoding the PNG")?;
    writer.finish().context("finishing the PNG")?;
    Ok(out)
}

/// Draws the chart (with text when a font is found) and writes it to `path` as a PNG.
pub fn write_png(
    h: &Histogram<u64>,
    series: &[Sample],
    title: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let text = font_available();
    if !text {
        eprintln!(
            "note: no font file found ({FONT_ENV} or fonts-dejavu-core): the chart has no text"
        );
    }
    let png = encode_png(&render(h, series, title, text)?)?;
    std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_histogram;

    fn example() -> (Histogram<u64>, Vec<Sample>) {
        let mut h = new_histogram().expect("histogram");
        for v in 1..=20_000u64 {
            h.record(200 + v % 1_000 + if v % 997 == 0 { 9_000 } else { 0 }).expect("record");
        }
        let series = (1..=10u32)
            .map(|s| Sample {
                t_s: f64::from(s),
                tps: 2_000.0,
                p50_us: 700 + u64::from(s) * 10,
                p99_us: 1_200 + u64::from(s) * 30,
                max_us: 9_000 + u64::from(s) * 100,
            })
            .collect();
        (h, series)
    }

    /// Decodes a PNG and returns (width, height, distinct colours seen).
    fn decode(bytes: &[u8]) -> (u32, u32, usize) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("PNG header");
        let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut pixels).expect("PNG data");
        let colours: std::collections::HashSet<&[u8]> =
            pixels[..info.buffer_size()].chunks(3).collect();
        (info.width, info.height, colours.len())
    }

    #[test]
    fn the_chart_is_a_valid_png_with_and_without_text() {
        let (h, series) = example();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("latency.png");
        write_png(&h, &series, "closed loop, 8 conns: 2000 tx/s", &path).expect("write");
        let (w, hgt, colours) = decode(&std::fs::read(&path).expect("read"));
        assert_eq!((w, hgt), (WIDTH, HEIGHT));
        // White, black axes and the three line colours at least.
        assert!(colours >= 5, "{colours} colours");

        let bare =
            encode_png(&render(&h, &series, "ignored", false).expect("render")).expect("png");
        let (w, hgt, colours) = decode(&bare);
        assert_eq!((w, hgt), (WIDTH, HEIGHT));
        assert!(colours >= 4, "{colours} colours");
    }

    #[test]
    fn an_empty_run_still_draws() {
        let h = new_histogram().expect("histogram");
        let bytes = encode_png(&render(&h, &[], "nothing", false).expect("render")).expect("png");
        assert_eq!(decode(&bytes).0, WIDTH);
    }

    #[test]
    fn percentile_labels_and_quantiles() {
        assert_eq!(percentile_label(0), "0%");
        assert_eq!(percentile_label(2), "99%");
        assert_eq!(percentile_label(4), "99.99%");
        assert!((quantile_of(3.0) - 0.999).abs() < 1e-12);
    }
}
