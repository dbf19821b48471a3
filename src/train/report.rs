//! The loss-curve plot of a run (SVG, no dependencies), made from `metrics.jsonl`, so
//! `fp8train report RUN` can regenerate it at any time.

use std::fmt::Write;
use std::path::{Path, PathBuf};

/// What the metrics file says about a run.
#[derive(Debug, Default)]
pub struct Series {
    pub steps: Vec<(f64, f64)>,
    pub evals: Vec<(f64, f64)>,
    pub entropy_floor: Option<f64>,
    pub unigram_entropy: Option<f64>,
    pub level: String,
    /// Step records whose loss is not finite (NaN/inf; written as `null` + `loss_bits`).
    pub nonfinite_steps: usize,
    /// Lines that are not JSON (a torn last line of a killed run, or damage), skipped.
    pub unreadable_lines: Vec<usize>,
}

/// The loss of a step record: `loss`, or, when JSON could not hold it (NaN and
/// infinities are written as null), its exact bits in `loss_bits`.
fn step_loss(v: &serde_json::Value) -> Option<f64> {
    v["loss"].as_f64().or_else(|| v["loss_bits"].as_u64().map(|b| f32::from_bits(b as u32) as f64))
}

pub fn read_series(run_dir: &Path) -> Result<Series, String> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{}: cannot read metrics ({e}); is this a run folder?", path.display()))?;
    let mut s = Series::default();
    for (i, line) in text.lines().enumerate() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            s.unreadable_lines.push(i + 1);
            continue;
        };
        let num = |k: &str| v[k].as_f64();
        match v["kind"].as_str() {
            Some("data") => {
                s.entropy_floor = num("entropy_floor");
                s.unigram_entropy = num("unigram_entropy");
                s.level = v["level"].as_str().unwrap_or("").to_string();
            }
            Some("step") => {
                if let (Some(st), Some(l)) = (num("step"), step_loss(&v)) {
                    s.nonfinite_steps += usize::from(!l.is_finite());
                    s.steps.push((st, l));
                }
            }
            Some("eval") => {
                if let (Some(st), Some(l)) = (num("step"), num("val_loss")) {
                    s.evals.push((st, l));
                }
            }
            _ => {}
        }
    }
    if s.steps.is_empty() {
        return Err(format!("{}: no training steps recorded", path.display()));
    }
    Ok(s)
}

/// Render the series as an SVG document.
pub fn svg(s: &Series, title: &str) -> String {
    let (w, h, ml, mr, mt, mb) = (800.0, 480.0, 70.0, 20.0, 40.0, 50.0);
    let xmax = s.steps.iter().map(|p| p.0).fold(1.0, f64::max);
    let mut ys: Vec<f64> = s.steps.iter().chain(&s.evals).map(|p| p.1).filter(|v| v.is_finite()).collect();
    ys.extend(s.entropy_floor);
    ys.extend(s.unigram_entropy);
    let ymin = ys.iter().cloned().fold(f64::INFINITY, f64::min).min(0.0);
    let ymax = ys.iter().cloned().fold(f64::NEG_INFINITY, f64::max).max(ymin + 1e-6) * 1.05;
    let px = |x: f64| ml + (x / xmax) * (w - ml - mr);
    let py = |y: f64| mt + (1.0 - (y - ymin) / (ymax - ymin)) * (h - mt - mb);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(o, r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{title}</text>"#, w / 2.0);
    let _ = writeln!(o, r#"<line x1="{ml}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, h - mb, w - mr, h - mb);
    let _ = writeln!(o, r#"<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{}" stroke="black"/>"#, h - mb);
    for i in 0..=5 {
        let yv = ymin + (ymax - ymin) * i as f64 / 5.0;
        let xv = xmax * i as f64 / 5.0;
        let _ = writeln!(o, r#"<text x="{}" y="{}" text-anchor="end">{yv:.2}</text>"#, ml - 6.0, py(yv) + 4.0);
        let _ = writeln!(o, r#"<text x="{}" y="{}" text-anchor="middle">{xv:.0}</text>"#, px(xv), h - mb + 18.0);
    }
    let _ = writeln!(o, r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#, (ml + w - mr) / 2.0, h - 10.0);
    let _ = writeln!(
        o,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">loss (nats/token)</text>"#,
        (mt + h - mb) / 2.0,
        (mt + h - mb) / 2.0
    );
    let poly = |pts: &[(f64, f64)]| {
        pts.iter()
            .filter(|p| p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(o, r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##, poly(&s.steps));
    if !s.evals.is_empty() {
        let _ =
            writeln!(o, r##"<polyline fill="none" stroke="#d62728" stroke-width="2" points="{}"/>"##, poly(&s.evals));
        for p in &s.evals {
            let _ = writeln!(o, r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#d62728"/>"##, px(p.0), py(p.1));
        }
    }
    let mut legend = vec![("#1f77b4", "train loss".to_string()), ("#d62728", "validation loss".to_string())];
    for (val, color, name) in
        [(s.unigram_entropy, "#7f7f7f", "unigram entropy"), (s.entropy_floor, "#2ca02c", "entropy floor (exact)")]
    {
        if let Some(v) = val {
            let _ = writeln!(
                o,
                r#"<line x1="{ml}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{color}" stroke-dasharray="6,4"/>"#,
                w - mr,
                y = py(v)
            );
            legend.push((color, format!("{name} {v:.3}")));
        }
    }
    for (i, (color, label)) in legend.iter().enumerate() {
        let y = mt + 10.0 + 16.0 * i as f64;
        let _ = writeln!(
            o,
            r#"<rect x="{}" y="{}" width="14" height="3" fill="{color}"/><text x="{}" y="{}">{label}</text>"#,
            w - 230.0,
            y - 4.0,
            w - 210.0,
            y
        );
    }
    o.push_str("</svg>\n");
    o
}

/// (Re)write `RUN/loss.svg` from `RUN/metrics.jsonl`.
pub fn write_plot(run_dir: &Path) -> Result<PathBuf, String> {
    let s = read_series(run_dir)?;
    let title = format!(
        "fp8train {} — {}",
        if s.level.is_empty() { "run" } else { &s.level },
        run_dir.file_name().and_then(|n| n.to_str()).unwrap_or("run")
    );
    let path = run_dir.join("loss.svg");
    std::fs::write(&path, svg(&s, &title)).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// A short text summary of a run.
pub fn summary(run_dir: &Path) -> Result<String, String> {
    let s = read_series(run_dir)?;
    let last = s.steps.last().expect("non-empty");
    let mut out =
        format!("run {}: level {}, {} steps, last train loss {:.4}", run_dir.display(), s.level, last.0, last.1);
    if let Some(v) = s.evals.last() {
        let _ = write!(out, ", val loss {:.4} at step {}", v.1, v.0);
    }
    if let Some(u) = s.unigram_entropy {
        let _ = write!(out, ", unigram entropy {u:.4}");
    }
    if let Some(f) = s.entropy_floor {
        let _ = write!(out, ", entropy floor {f:.4}");
    }
    if s.nonfinite_steps > 0 {
        let _ = write!(out, "; {} steps with a non-finite loss (skipped steps)", s.nonfinite_steps);
    }
    if !s.unreadable_lines.is_empty() {
        let _ = write!(
            out,
            "; skipped {} unreadable line(s) of metrics.jsonl (line {:?}: a torn record of a killed run?)",
            s.unreadable_lines.len(),
            s.unreadable_lines
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_losses_count_as_nan_steps_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let nan = f32::NAN.to_bits();
        let text = format!(
            "{{\"kind\":\"data\",\"level\":\"O2\"}}\n{{\"kind\":\"step\",\"step\":1,\"loss\":5.5,\"loss_bits\":{}}}\n\
             {{\"kind\":\"step\",\"step\":2,\"loss\":null,\"loss_bits\":{nan}}}\n{{\"kind\":\"step\",\"st",
            5.5f32.to_bits()
        );
        std::fs::write(dir.path().join("metrics.jsonl"), text).unwrap();
        let s = read_series(dir.path()).unwrap();
        assert_eq!(s.steps.len(), 2);
        assert!(s.steps[1].1.is_nan());
        assert_eq!((s.nonfinite_steps, s.unreadable_lines.clone()), (1, vec![4]));
        let text = summary(dir.path()).unwrap();
        assert!(text.contains("2 steps") && text.contains("1 steps with a non-finite loss"), "{text}");
        assert!(text.contains("skipped 1 unreadable line"), "{text}");
    }
}
