//! `fp8train bench report DIR`: one report from a bench folder (what the launch kit's
//! `bench` job writes): the collectives' table and a bus-bandwidth-against-size plot from
//! `comm.json` (`bench comm --json`), and every training run's throughput from its run
//! folder's `metrics.jsonl`, with tokens/s against ranks when runs of several sizes are
//! there. Writes `report.md`, `comm-busbw.svg` and `tokps-ranks.svg` into DIR.

use serde::Deserialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct CommIn {
    ranks: usize,
    transport: String,
    iters: usize,
    rows: Vec<RowIn>,
    wire: Option<WireIn>,
}

#[derive(Deserialize)]
struct RowIn {
    op: String,
    bytes: u64,
    us: f64,
    busbw_gbs: f64,
}

#[derive(Deserialize)]
struct WireIn {
    model: String,
    params: u64,
    fp8: u64,
    fp8_scales: u64,
    bf16: u64,
    fp32: u64,
}

/// One training run of the folder, from its metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub name: String,
    pub level: String,
    pub ranks: usize,
    pub steps: usize,
    pub median_tok_s: f64,
    pub median_ms: f64,
    pub final_val_loss: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The run in `dir` (a run folder with metrics.jsonl), or None if it has none.
fn read_run(dir: &Path) -> Result<Option<RunSummary>, String> {
    let path = dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let (mut level, mut ranks, mut toks, mut ms, mut val) = (String::from("?"), 1usize, Vec::new(), Vec::new(), None);
    for line in text.lines() {
        // A torn last line (a killed run) is skipped, as `report` does.
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        match v["kind"].as_str() {
            Some("data") => {
                level = v["level"].as_str().unwrap_or("?").to_string();
                ranks = v["ranks"].as_u64().unwrap_or(1) as usize;
            }
            Some("step") if v["skipped"] != true => {
                toks.extend(v["tok_s"].as_f64());
                ms.extend(v["ms"].as_f64());
            }
            Some("final") => val = v["val_loss"].as_f64(),
            _ => {}
        }
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let steps = toks.len();
    Ok(Some(RunSummary {
        name,
        level,
        ranks,
        steps,
        median_tok_s: median(toks),
        median_ms: median(ms),
        final_val_loss: val,
    }))
}

/// Human size: 1K, 64M.
fn size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

/// A line chart as an SVG document: `series` of (label, points); log2 x axis when
/// `log_x` (sizes), linear y from 0.
fn chart(title: &str, xlabel: &str, ylabel: &str, series: &[(String, Vec<(f64, f64)>)], log_x: bool) -> String {
    const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
    let (w, h, ml, mr, mt, mb) = (800.0, 480.0, 70.0, 240.0, 40.0, 50.0);
    let fx = |x: f64| if log_x { x.max(1.0).log2() } else { x };
    let pts = series.iter().flat_map(|s| s.1.iter()).filter(|p| p.1.is_finite());
    let (xmin, xmax) =
        pts.clone().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| (a.0.min(fx(p.0)), a.1.max(fx(p.0))));
    let (xmin, xmax) =
        if xmin.is_finite() && xmax > xmin { (xmin, xmax) } else { (xmin.min(0.0), xmin.max(0.0) + 1.0) };
    let ymax = pts.map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.05;
    let px = |x: f64| ml + (fx(x) - xmin) / (xmax - xmin) * (w - ml - mr);
    let py = |y: f64| mt + (1.0 - y / ymax) * (h - mt - mb);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ =
        writeln!(o, r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{title}</text>"#, (ml + w - mr) / 2.0);
    let _ = writeln!(o, r#"<line x1="{ml}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, h - mb, w - mr, h - mb);
    let _ = writeln!(o, r#"<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{}" stroke="black"/>"#, h - mb);
    for i in 0..=5 {
        let yv = ymax * i as f64 / 5.0;
        let _ = writeln!(o, r#"<text x="{}" y="{}" text-anchor="end">{yv:.3}</text>"#, ml - 6.0, py(yv) + 4.0);
    }
    let mut xs: Vec<f64> = series.iter().flat_map(|s| s.1.iter().map(|p| p.0)).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        let label = if log_x { size(x as u64) } else { format!("{x}") };
        let _ = writeln!(o, r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#, px(x), h - mb + 18.0);
    }
    let _ = writeln!(o, r#"<text x="{}" y="{}" text-anchor="middle">{xlabel}</text>"#, (ml + w - mr) / 2.0, h - 10.0);
    let mid = (mt + h - mb) / 2.0;
    let _ =
        writeln!(o, r#"<text x="16" y="{mid}" transform="rotate(-90 16 {mid})" text-anchor="middle">{ylabel}</text>"#);
    for (i, (label, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let line: Vec<String> =
            points.iter().filter(|p| p.1.is_finite()).map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1))).collect();
        let _ = writeln!(o, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, line.join(" "));
        for p in points.iter().filter(|p| p.1.is_finite()) {
            let _ = writeln!(o, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, px(p.0), py(p.1));
        }
        let y = mt + 10.0 + 16.0 * i as f64;
        let _ = writeln!(
            o,
            r#"<rect x="{}" y="{}" width="14" height="3" fill="{color}"/><text x="{}" y="{y}">{label}</text>"#,
            w - mr + 10.0,
            y - 4.0,
            w - mr + 30.0
        );
    }
    o.push_str("</svg>\n");
    o
}

/// Build the report of bench folder `dir`; the files written.
pub fn build(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let comm_path = dir.join("comm.json");
    let comm: Option<CommIn> = match std::fs::read_to_string(&comm_path) {
        Ok(t) => Some(
            serde_json::from_str(t.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or(""))
                .map_err(|e| format!("{}: not a `bench comm --json` document: {e}", comm_path.display()))?,
        ),
        Err(_) => None,
    };
    let mut runs = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("bench report: cannot read {}: {e}", dir.display()))?;
    let mut dirs: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for d in dirs {
        runs.extend(read_run(&d)?);
    }
    if comm.is_none() && runs.is_empty() {
        return Err(format!(
            "bench report: {} holds neither comm.json nor run folders with metrics.jsonl (run the launch kit's bench job first)",
            dir.display()
        ));
    }
    let mut md = format!("# fp8train bench report: {}\n\n", dir.display());
    let mut written = Vec::new();
    if let Some(c) = &comm {
        let _ = writeln!(md, "## Collectives ({} ranks, {}, median of {} iterations)\n", c.ranks, c.transport, c.iters);
        let mut ops: Vec<&str> = Vec::new();
        let mut sizes: Vec<u64> = Vec::new();
        for r in &c.rows {
            if !ops.contains(&r.op.as_str()) {
                ops.push(&r.op);
            }
            if !sizes.contains(&r.bytes) {
                sizes.push(r.bytes);
            }
        }
        sizes.sort();
        let _ = writeln!(md, "Bus bandwidth, GB/s (time in us):\n");
        let _ = writeln!(md, "| op | {} |", sizes.iter().map(|&b| size(b)).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(md, "| --- |{}", " --- |".repeat(sizes.len()));
        for op in &ops {
            let cells: Vec<String> = sizes
                .iter()
                .map(|&b| match c.rows.iter().find(|r| r.op == *op && r.bytes == b) {
                    Some(r) => format!("{:.3} ({:.1})", r.busbw_gbs, r.us),
                    None => "-".into(),
                })
                .collect();
            let _ = writeln!(md, "| {op} | {} |", cells.join(" | "));
        }
        if let Some(wb) = &c.wire {
            let _ = writeln!(
                md,
                "\nGradient bytes on the wire per rank and step, {} ({} parameters): FP8 {} (+ {} of scales), BF16 {}, FP32 {} (FP8 / FP32 = {:.3})",
                wb.model,
                wb.params,
                wb.fp8,
                wb.fp8_scales,
                wb.bf16,
                wb.fp32,
                wb.fp8 as f64 / wb.fp32.max(1) as f64
            );
        }
        let series: Vec<(String, Vec<(f64, f64)>)> = ops
            .iter()
            .map(|op| {
                let pts = c.rows.iter().filter(|r| r.op == *op).map(|r| (r.bytes as f64, r.busbw_gbs)).collect();
                (op.to_string(), pts)
            })
            .collect();
        let title = format!("bus bandwidth, {} ranks ({})", c.ranks, c.transport);
        let p = dir.join("comm-busbw.svg");
        std::fs::write(&p, chart(&title, "message size", "GB/s", &series, true))
            .map_err(|e| format!("bench report: cannot write {}: {e}", p.display()))?;
        let _ = writeln!(md, "\n![bus bandwidth](comm-busbw.svg)\n");
        written.push(p);
    }
    if !runs.is_empty() {
        let _ = writeln!(md, "## Training runs\n");
        let _ = writeln!(md, "| run | level | ranks | steps | tok/s (median) | step ms (median) | final val loss |");
        let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
        for r in &runs {
            let val = r.final_val_loss.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.0} | {:.2} | {val} |",
                r.name, r.level, r.ranks, r.steps, r.median_tok_s, r.median_ms
            );
        }
        let mut levels: Vec<&str> = runs.iter().map(|r| r.level.as_str()).collect();
        levels.sort();
        levels.dedup();
        let series: Vec<(String, Vec<(f64, f64)>)> = levels
            .iter()
            .map(|l| {
                let mut pts: Vec<(f64, f64)> =
                    runs.iter().filter(|r| r.level == *l).map(|r| (r.ranks as f64, r.median_tok_s)).collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (l.to_string(), pts)
            })
            .collect();
        let p = dir.join("tokps-ranks.svg");
        std::fs::write(&p, chart("tokens/s against ranks", "ranks", "tokens/s", &series, false))
            .map_err(|e| format!("bench report: cannot write {}: {e}", p.display()))?;
        let _ = writeln!(md, "\n![tokens/s against ranks](tokps-ranks.svg)");
        written.push(p);
    }
    let p = dir.join("report.md");
    std::fs::write(&p, md).map_err(|e| format!("bench report: cannot write {}: {e}", p.display()))?;
    written.insert(0, p);
    Ok(written)
}

pub fn run(a: &crate::cli::BenchReportArgs) -> Result<(), String> {
    for p in build(&a.dir)? {
        println!("{}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_from_comm_json_and_run_folders() {
        let dir = tempfile::tempdir().unwrap();
        let comm = r#"{"bench":"comm","ranks":2,"transport":"MPI","iters":3,"rows":[
            {"op":"allreduce f32 (rank order)","bytes":1024,"us":5.0,"algbw_gbs":0.2,"busbw_gbs":0.2},
            {"op":"allreduce f32 (rank order)","bytes":65536,"us":50.0,"algbw_gbs":1.3,"busbw_gbs":1.3},
            {"op":"fp8 reduction (contract)","bytes":1024,"us":9.0,"algbw_gbs":0.1,"busbw_gbs":0.11}],
            "wire":{"model":"gpt2-124m","params":124475904,"fp8":124475904,"fp8_scales":592,"bf16":248951808,"fp32":497903616}}"#;
        std::fs::write(dir.path().join("comm.json"), comm.replace('\n', "")).unwrap();
        for (name, level, ranks, toks) in
            [("dp-O2", "O2", 2, [100.0, 300.0, 200.0]), ("one-O2", "O2", 1, [90.0, 110.0, 100.0])]
        {
            let run = dir.path().join(name);
            std::fs::create_dir(&run).unwrap();
            let mut m = format!("{{\"kind\":\"data\",\"level\":\"{level}\",\"ranks\":{ranks}}}\n");
            for (i, t) in toks.iter().enumerate() {
                m += &format!(
                    "{{\"kind\":\"step\",\"step\":{},\"tok_s\":{t},\"ms\":{},\"skipped\":false}}\n",
                    i + 1,
                    10 * (i + 1)
                );
            }
            m += "{\"kind\":\"final\",\"val_loss\":2.5}\n{\"kind\":\"st"; // a torn line
            std::fs::write(run.join("metrics.jsonl"), m).unwrap();
        }
        let files = build(dir.path()).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("| allreduce f32 (rank order) | 0.200 (5.0) | 1.300 (50.0) |"), "{md}");
        assert!(md.contains("| fp8 reduction (contract) | 0.110 (9.0) | - |"), "{md}");
        assert!(md.contains("FP8 / FP32 = 0.250"), "{md}");
        assert!(md.contains("| dp-O2 | O2 | 2 | 3 | 200 | 20.00 | 2.5000 |"), "{md}");
        assert!(md.contains("| one-O2 | O2 | 1 | 3 | 100 | 20.00 | 2.5000 |"), "{md}");
        let svg = std::fs::read_to_string(dir.path().join("comm-busbw.svg")).unwrap();
        assert!(svg.contains("<polyline") && svg.contains("64K") && svg.contains("fp8 reduction"), "{svg}");
        let svg = std::fs::read_to_string(dir.path().join("tokps-ranks.svg")).unwrap();
        assert_eq!(svg.matches("<circle").count(), 2, "{svg}");
    }

    #[test]
    fn an_empty_folder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = build(dir.path()).unwrap_err();
        assert!(e.contains("neither comm.json nor run folders"), "{e}");
        std::fs::write(dir.path().join("comm.json"), "not json").unwrap();
        assert!(build(dir.path()).unwrap_err().contains("not a `bench comm --json` document"));
    }
}
