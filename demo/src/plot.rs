//! The loss-versus-time plot, as a small self-contained SVG.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `points` (seconds, loss), smoothed over 10 steps, with vertical
/// `marks` (seconds, label), to `path`.
pub fn write(path: &Path, points: &[(f64, f32)], marks: &[(f64, String)]) -> Result<()> {
    let (w, h, pad) = (800.0, 400.0, 50.0);
    let smooth: Vec<(f64, f64)> = points
        .iter()
        .enumerate()
        .map(|(i, &(t, _))| {
            let from = i.saturating_sub(9);
            let window = &points[from..=i];
            let mean = window.iter().map(|(_, l)| f64::from(*l)).sum::<f64>() / window.len() as f64;
            (t, mean)
        })
        .collect();
    let t_max = smooth.last().map_or(1.0, |p| p.0).max(1e-3);
    let l_max = smooth.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3);
    let x = |t: f64| pad + t / t_max * (w - 2.0 * pad);
    let y = |l: f64| h - pad - l / l_max * (h - 2.0 * pad);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"20\" font-size=\"14\">Phalanx demo: training loss (member 1, 10-step mean) vs time</text>\n\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\">{t_max:.1} s</text><text x=\"5\" y=\"{}\">{l_max:.2}</text><text x=\"30\" y=\"{}\">0</text>\n",
        h - pad,
        w - pad,
        h - pad,
        h - pad,
        w - pad - 30.0,
        h - pad + 20.0,
        pad + 4.0,
        h - pad,
    );
    let mut line = String::new();
    for &(t, l) in &smooth {
        let _ = write!(line, "{:.1},{:.1} ", x(t), y(l));
    }
    let _ = writeln!(
        svg,
        "<polyline fill=\"none\" stroke=\"#1f5fbf\" stroke-width=\"1.5\" points=\"{line}\"/>"
    );
    for (i, (t, label)) in marks.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<line x1=\"{0:.1}\" y1=\"{pad}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#c0392b\" stroke-dasharray=\"4 3\"/>\
             <text x=\"{2:.1}\" y=\"{3}\" fill=\"#c0392b\">{label}</text>",
            x(*t),
            h - pad,
            x(*t) + 4.0,
            pad + 14.0 + 14.0 * i as f64,
        );
    }
    svg += "</svg>\n";
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}
