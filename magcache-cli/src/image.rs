//! Pictures: image planes as a PNG grid, and the per-call compute/reuse map as an SVG plot.

use crate::CallReport;
use candle_core::Tensor;
use magcache_core::{Error, Result};
use std::fmt::Write as _;

/// Renders rows of `[N, H, W]` planes as one grayscale PNG: each row of the picture holds one set of
/// planes side by side (wrapping after `per_row` planes), values mapped linearly from `lo..hi` to
/// black..white, every pixel drawn as a `scale x scale` block, 2-pixel gaps.
pub fn planes_png(
    rows: &[Tensor],
    lo: f32,
    hi: f32,
    per_row: usize,
    scale: usize,
) -> Result<Vec<u8>> {
    if per_row == 0 {
        return Err(Error::msg("a picture needs at least one plane per row"));
    }
    let mut sets = Vec::new();
    for r in rows {
        let (n, h, w) = r.dims3()?;
        sets.push((n, h, w, r.flatten_all()?.to_vec1::<f32>()?));
    }
    let (_, h, w, _) = *sets.first().ok_or_else(|| Error::msg("nothing to draw"))?;
    let gap = 2;
    let cols = sets.iter().map(|s| s.0.min(per_row)).max().unwrap_or(1);
    let lines: usize = sets.iter().map(|s| s.0.div_ceil(per_row)).sum();
    let (cw, ch) = (w * scale + gap, h * scale + gap);
    let (width, height) = (cols * cw + gap, lines * ch + gap);
    let mut img = vec![40u8; width * height];
    let mut line = 0;
    for (n, hh, ww, data) in &sets {
        if (*hh, *ww) != (h, w) {
            return Err(Error::msg("all rows of a picture need planes of one size"));
        }
        for p in 0..*n {
            let (r, c) = (line + p / per_row, p % per_row);
            for y in 0..h {
                for x in 0..w {
                    let v = data[p * h * w + y * w + x];
                    let g = (((v - lo) / (hi - lo).max(f32::MIN_POSITIVE)).clamp(0.0, 1.0) * 255.0)
                        .round() as u8;
                    for dy in 0..scale {
                        let row = gap + r * ch + y * scale + dy;
                        let start = row * width + gap + c * cw + x * scale;
                        img[start..start + scale].fill(g);
                    }
                }
            }
        }
        line += n.div_ceil(per_row);
    }
    encode_png(width, height, png::ColorType::Grayscale, &img)
}

/// 8-bit PNG bytes of `pixels` (row-major, `color`'s channels per pixel).
pub fn encode_png(
    width: usize,
    height: usize,
    color: png::ColorType,
    pixels: &[u8],
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc
            .write_header()
            .map_err(|e| Error::msg(format!("png: {e}")))?;
        wr.write_image_data(pixels)
            .map_err(|e| Error::msg(format!("png: {e}")))?;
    }
    Ok(out)
}

/// An SVG of every scope's calls over the steps (filled: computed, hollow: reused) and the strategy's
/// metric per call with its threshold.
pub fn calls_svg(
    title: &str,
    calls: &[CallReport],
    threshold: Option<f64>,
    metric_name: &str,
) -> String {
    let steps = calls
        .iter()
        .map(|c| c.step)
        .max()
        .map(|m| m + 1)
        .unwrap_or(1);
    let mut scopes: Vec<(usize, String)> =
        calls.iter().map(|c| (c.expert, c.branch.clone())).collect();
    scopes.sort();
    scopes.dedup();
    let (left, top, cell, lane) = (150.0, 40.0, (700.0 / steps as f64).clamp(6.0, 40.0), 26.0);
    let width = left + cell * steps as f64 + 40.0;
    let chart_top = top + lane * scopes.len() as f64 + 30.0;
    let chart_h = 160.0;
    let height = chart_top + chart_h + 50.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14">{}</text>"#,
        xml(title)
    );
    lanes_svg(&mut s, calls, &scopes, (left, top, cell, lane));
    let metrics: Vec<(usize, f64)> = calls
        .iter()
        .filter_map(|c| c.metric.filter(|m| m.is_finite()).map(|m| (c.step, m)))
        .collect();
    let maxm = metrics
        .iter()
        .map(|m| m.1)
        .chain(threshold)
        .fold(1e-12f64, f64::max)
        * 1.1;
    let ybase = chart_top + chart_h;
    let _ = writeln!(
        s,
        r#"<text x="10" y="{}">{}</text>"#,
        chart_top + 12.0,
        xml(metric_name)
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{ybase}" x2="{}" y2="{ybase}" stroke="black"/>"#,
        left + cell * steps as f64
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{chart_top}" x2="{left}" y2="{ybase}" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end">{maxm:.3}</text><text x="{}" y="{ybase}" text-anchor="end">0</text>"#,
        left - 4.0,
        chart_top + 10.0,
        left - 4.0
    );
    if let Some(t) = threshold {
        let y = ybase - chart_h * t / maxm;
        let _ = writeln!(
            s,
            r#"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="red" stroke-dasharray="5,4"/><text x="{}" y="{}" fill="red">threshold {t}</text>"#,
            left + cell * steps as f64,
            left + 4.0,
            y - 4.0
        );
    }
    for (step, m) in &metrics {
        let x = left + cell * (*step as f64 + 0.5);
        let y = ybase - chart_h * m / maxm;
        let _ = writeln!(s, r##"<circle cx="{x}" cy="{y}" r="3" fill="#c05020"/>"##);
    }
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="{}">step (0 .. {})</text>"#,
        ybase + 20.0,
        steps - 1
    );
    s.push_str("</svg>\n");
    s
}

/// One lane per scope: a cell per call, filled when computed, hollow when reused.
fn lanes_svg(
    s: &mut String,
    calls: &[CallReport],
    scopes: &[(usize, String)],
    (left, top, cell, lane): (f64, f64, f64, f64),
) {
    for (li, (e, b)) in scopes.iter().enumerate() {
        let y = top + lane * li as f64;
        let _ = writeln!(s, r#"<text x="10" y="{}">expert {e} {b}</text>"#, y + 15.0);
        for c in calls.iter().filter(|c| c.expert == *e && &c.branch == b) {
            let x = left + cell * c.step as f64;
            let fill = if c.computed == Some(false) {
                "white"
            } else {
                "#3060c0"
            };
            let _ = writeln!(
                s,
                r##"<rect x="{x}" y="{y}" width="{}" height="18" fill="{fill}" stroke="#3060c0"><title>step {} {}</title></rect>"##,
                cell - 2.0,
                c.step,
                if c.computed == Some(false) {
                    "reused"
                } else {
                    "computed"
                }
            );
        }
    }
}

fn xml(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
