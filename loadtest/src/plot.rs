//! The latency percentile curve as a PNG: x is the percentile on a log "nines" scale
//! (0 %, 90 %, 99 %, 99.9 %, ...), y the latency in milliseconds. Drawn pixel by pixel with a
//! built-in 5x7 font and written as an uncompressed (stored-deflate) palette PNG, so no image
//! crate is needed.

use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;

const WIDTH: usize = 900;
const HEIGHT: usize = 540;
const LEFT: usize = 80;
const RIGHT: usize = 60;
const TOP: usize = 50;
const BOTTOM: usize = 60;

const WHITE: u8 = 0;
const BLACK: u8 = 1;
const GRID: u8 = 2;
const CURVE: u8 = 3;
const PALETTE: [[u8; 3]; 4] = [[255, 255, 255], [0, 0, 0], [215, 215, 215], [20, 90, 200]];

/// A palette image.
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize) -> Canvas {
        Canvas { width, height, pixels: vec![WHITE; width * height] }
    }

    fn set(&mut self, x: i64, y: i64, color: u8) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            self.pixels[y as usize * self.width + x as usize] = color;
        }
    }

    fn hline(&mut self, x0: usize, x1: usize, y: usize, color: u8) {
        for x in x0..=x1 {
            self.set(x as i64, y as i64, color);
        }
    }

    fn vline(&mut self, x: usize, y0: usize, y1: usize, color: u8) {
        for y in y0..=y1 {
            self.set(x as i64, y as i64, color);
        }
    }

    /// A 2-pixel-wide line (Bresenham).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: u8) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, color);
            self.set(x + 1, y, color);
            self.set(x, y + 1, color);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with the top-left corner at (x, y), each font pixel `scale` pixels wide.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: u8) {
        for (i, ch) in text.chars().enumerate() {
            let rows = glyph(ch);
            let ox = x + i as i64 * 6 * scale;
            for (r, bits) in rows.iter().enumerate() {
                for c in 0..5 {
                    if bits & (0x10 >> c) != 0 {
                        for py in 0..scale {
                            for px in 0..scale {
                                self.set(ox + c * scale + px, y + r as i64 * scale + py, color);
                            }
                        }
                    }
                }
            }
        }
    }

    fn text_width(text: &str, scale: i64) -> i64 {
        text.chars().count() as i64 * 6 * scale - scale
    }

    /// The image as PNG bytes: 8-bit palette, zlib stream of stored blocks.
    pub fn to_png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.width + 1) * self.height);
        for row in self.pixels.chunks(self.width) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 3, 0, 0, 0]);
        chunk(&mut png, b"IHDR", &ihdr);
        let plte: Vec<u8> = PALETTE.iter().flatten().copied().collect();
        chunk(&mut png, b"PLTE", &plte);
        chunk(&mut png, b"IDAT", &zlib_stored(&raw));
        chunk(&mut png, b"IEND", &[]);
        png
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 (IEEE, as PNG uses), bitwise.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for b in data {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for x in chunk {
            a += u32::from(*x);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

/// A zlib stream holding `data` in uncompressed deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = data.chunks(65_535).collect();
    if blocks.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xFF, 0xFF]);
    }
    for (i, block) in blocks.iter().enumerate() {
        out.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// 5x7 glyphs (each row's low 5 bits, leftmost pixel = 0x10); unknown characters are blank.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        _ => [0; 7],
    }
}

/// A "nice" step (1, 2 or 5 times a power of ten) giving about `target` intervals up to `max`.
pub fn nice_step(max: f64, target: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / target;
    let power = 10f64.powf(raw.log10().floor());
    let fraction = raw / power;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

fn percentile_label(nines: u32) -> String {
    match nines {
        0 => "0%".into(),
        1 => "90%".into(),
        2 => "99%".into(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)),
    }
}

fn value_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{v:.decimals$}")
}

/// Draws the latency-by-percentile curve of `h` (microseconds) with `title` above it.
pub fn render(h: &Histogram<u64>, title: &str) -> Canvas {
    let mut c = Canvas::new(WIDTH, HEIGHT);
    let (x0, x1) = (LEFT, WIDTH - RIGHT);
    let (y0, y1) = (TOP, HEIGHT - BOTTOM);
    let count = h.len().max(1) as f64;
    let max_nines = (count.log10().ceil() as u32).clamp(1, 6);
    let max_ms = (h.max() as f64 / 1000.0).max(0.001);
    let step = nice_step(max_ms, 8.0);
    let top_ms = (max_ms / step).ceil() * step;
    let px = |nines: f64| x0 as f64 + nines / f64::from(max_nines) * (x1 - x0) as f64;
    let py = |value_ms: f64| y1 as f64 - value_ms / top_ms * (y1 - y0) as f64;

    // Grid and labels.
    for n in 0..=max_nines {
        let x = px(f64::from(n)).round() as usize;
        c.vline(x, y0, y1, GRID);
        let label = percentile_label(n);
        let w = Canvas::text_width(&label, 2);
        c.text(x as i64 - w / 2, y1 as i64 + 10, &label, 2, BLACK);
    }
    let mut v = 0.0;
    while v <= top_ms + step / 2.0 {
        let y = py(v).round() as usize;
        c.hline(x0, x1, y, GRID);
        let label = value_label(v, step);
        let w = Canvas::text_width(&label, 2);
        c.text(x0 as i64 - 8 - w, y as i64 - 7, &label, 2, BLACK);
        v += step;
    }
    c.hline(x0, x1, y1, BLACK);
    c.vline(x0, y0, y1, BLACK);
    let scale = if Canvas::text_width(title, 2) <= (WIDTH - x0 - 10) as i64 { 2 } else { 1 };
    c.text(x0 as i64, 15, title, scale, BLACK);
    c.text(8, 8, "ms", 2, BLACK);
    let xlabel = "percentile";
    c.text(
        (x0 + x1) as i64 / 2 - Canvas::text_width(xlabel, 2) / 2,
        HEIGHT as i64 - 24,
        xlabel,
        2,
        BLACK,
    );

    // The curve, sampled every 1/200 of a nine; past the last sample it is the maximum.
    if !h.is_empty() {
        let steps = 200 * max_nines;
        let mut prev: Option<(i64, i64)> = None;
        for i in 0..=steps {
            let nines = f64::from(i) / 200.0;
            let quantile = 1.0 - 10f64.powf(-nines);
            let value = if i == steps { h.max() } else { h.value_at_quantile(quantile) };
            let point = (px(nines).round() as i64, py(value as f64 / 1000.0).round() as i64);
            if let Some(p) = prev {
                c.line(p, point, CURVE);
            }
            prev = Some(point);
        }
    }
    c
}

/// Renders and writes the PNG.
pub fn write_png(h: &Histogram<u64>, title: &str, path: &Path) -> anyhow::Result<()> {
    let png = render(h, title).to_png();
    std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_and_adler_match_known_values() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn png_has_signature_header_and_end() {
        let mut h = crate::stats::new_histogram().expect("histogram");
        for v in 1..1000u64 {
            h.record(v * 7).expect("record");
        }
        let png = render(&h, "test").to_png();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes([png[16], png[17], png[18], png[19]]), 900);
        assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
        // Raw rows fit stored blocks: size is about width * height plus overhead.
        assert!(png.len() > WIDTH * HEIGHT);
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(10.0, 10.0), 1.0);
        assert_eq!(nice_step(12.0, 8.0), 2.0);
        assert!((nice_step(0.3, 8.0) - 0.05).abs() < 1e-12);
        assert_eq!(percentile_label(2), "99%");
        assert_eq!(percentile_label(3), "99.9%");
        assert_eq!(value_label(0.25, 0.05), "0.25");
    }
}
