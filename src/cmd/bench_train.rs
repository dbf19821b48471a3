//! `fp8train bench train`: the embedded default at every level, side by side.

use crate::backend::sim::Sim;
use crate::cli::TrainBenchArgs;
use crate::data::Dataset;
use crate::model::Level;
use crate::train::config::Config;
use crate::train::{self, Start};
use fp8cluster::world::World;
use serde::Serialize;
use slog::{info, Logger};
use std::path::PathBuf;

/// `bench train`'s JSON document.
#[derive(Serialize)]
struct BenchTrainDoc {
    bench: &'static str,
    steps: u64,
    entropy_floor: Option<f64>,
    unigram_entropy: f64,
    rows: Vec<BenchTrainRow>,
}

/// One level's run.
#[derive(Serialize)]
struct BenchTrainRow {
    level: String,
    final_val_loss: f32,
    rel_vs_bf16: f32,
    tok_s: f64,
    bytes_per_param: f64,
    scale_meta_bytes: usize,
    skipped_steps: u64,
}

pub fn bench_train_cmd(a: &TrainBenchArgs, log: &Logger) -> Result<(), String> {
    let mut sets = a.sets.clone();
    if let Some(s) = a.steps {
        sets.push(format!("train.steps={s}"));
    }
    let tmp = tempfile::Builder::new().prefix("fp8train-bench-").tempdir().map_err(|e| e.to_string())?;
    let out_dir = a.out.clone().map(PathBuf::from).unwrap_or_else(|| tmp.path().to_path_buf());
    let mut rows = Vec::new();
    for level in Level::ALL {
        let mut cfg = Config::default().with_overrides(&sets)?;
        cfg.train.level = level;
        cfg.validate()?;
        let run_dir = out_dir.join(format!("bench-{level}"));
        if run_dir.exists() {
            return Err(format!("bench train: {} exists already; choose another --out", run_dir.display()));
        }
        info!(log, "bench train"; "level" => level.to_string(), "steps" => cfg.train.steps);
        let console = if a.json { train::Console::Quiet } else { train::Console::Lines };
        let o = train::train(&Sim, &cfg, Start::Fresh, &run_dir, log, console, &World::single())?;
        rows.push((level, o, cfg));
    }
    let base = rows[0].1.final_val_loss;
    let ds = Dataset::load(&rows[0].2.data, rows[0].2.train.seed)?;
    let mut table = format!(
        "embedded default, {} steps each, simulator, {} threads; entropy floor {}, unigram entropy {:.4}\n",
        rows[0].2.train.steps,
        rayon::current_num_threads(),
        ds.entropy_floor.map(|f| format!("{f:.4}")).unwrap_or_else(|| "n/a".into()),
        ds.unigram_entropy
    );
    table += "level | final val loss | vs bf16 | sim tok/s | bytes/param (+ scale bytes) | skipped steps\n";
    table += "------|----------------|---------|-----------|-----------------------------|--------------\n";
    let mut json_rows = Vec::new();
    for (level, o, _) in &rows {
        let rel = (o.final_val_loss - base) / base;
        table += &format!(
            "{:<5} | {:>14.4} | {:>+6.2}% | {:>9.0} | {:>10.2} (+ {} B) | {:>13}\n",
            level.to_string(),
            o.final_val_loss,
            100.0 * rel,
            o.tokens_per_s,
            o.bytes_per_param,
            o.meta_bytes,
            o.skipped_steps
        );
        json_rows.push(BenchTrainRow {
            level: level.to_string(),
            final_val_loss: o.final_val_loss,
            rel_vs_bf16: rel,
            tok_s: o.tokens_per_s,
            bytes_per_param: o.bytes_per_param,
            scale_meta_bytes: o.meta_bytes,
            skipped_steps: o.skipped_steps,
        });
    }
    let doc = BenchTrainDoc {
        bench: "train",
        steps: rows[0].2.train.steps,
        entropy_floor: ds.entropy_floor,
        unigram_entropy: ds.unigram_entropy,
        rows: json_rows,
    };
    if !a.json {
        print!("{table}");
    }
    println!("{}", serde_json::to_string(&doc).map_err(|e| format!("bench train: {e}"))?);
    Ok(())
}
