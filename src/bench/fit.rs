//! `fp8train bench fit`: the largest batch of a model shape that fits a GPU's memory at
//! each level and `train.recompute` setting, by the memory estimate (`model::memory`,
//! held within a few percent of measured peaks by `tests/memory.rs` and, on an H200, by
//! `bench step`'s pool high-water mark), with the fast path's attention scratch. A plan
//! to confirm with `bench step --batch N`, not a measurement.

use crate::backend::cuda::{cuda_memory_overhead, flash_scratch_bytes, op_scratch_without_attention};
use crate::backend::OpScratch;
use crate::cli::FitBenchArgs;
use crate::model::memory::{estimate, gib};
use crate::model::{Level, Recompute};
use fp8sim::ops::attention::AttnShape;
use serde::Serialize;

#[derive(Serialize, Debug, PartialEq)]
pub struct FitRow {
    pub model: String,
    pub level: String,
    pub recompute: String,
    /// Largest batch (rows of the model's sequence length) that fits; 0: none.
    pub max_batch: usize,
    /// The estimate at that batch, bytes.
    pub bytes: u64,
}

/// Estimated bytes of `model` at `level` / `recompute` for batch `b` on one GPU, with
/// the GPU's allocator slack (what `train` and `bench step` check).
fn bytes(cfg: &crate::model::ModelConfig, level: Level, recompute: Recompute, b: usize) -> u64 {
    let shape = AttnShape { b, t: cfg.seq_len, c: cfg.n_embd, nh: cfg.n_head };
    let scratch = OpScratch { attention: flash_scratch_bytes(shape), ..op_scratch_without_attention() };
    let est = estimate(cfg, level, recompute, 1, b, cfg.seq_len, scratch);
    est.total() + cuda_memory_overhead(&est)
}

/// The largest batch in 1..=limit whose estimate is within `memory` bytes (0: none).
pub fn max_batch(
    cfg: &crate::model::ModelConfig,
    level: Level,
    recompute: Recompute,
    memory: u64,
    limit: usize,
) -> usize {
    if bytes(cfg, level, recompute, 1) > memory {
        return 0;
    }
    let (mut lo, mut hi) = (1, limit.max(1)); // bytes(lo) fits
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if bytes(cfg, level, recompute, mid) <= memory {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

pub fn plan(models: &[String], memory_gib: f64, limit: usize) -> Result<Vec<FitRow>, String> {
    if models.is_empty() {
        return Err("--models: give at least one shape (gpt2-124m, gpt-1.3b, gpt-6.7b, gpt-13b)".into());
    }
    if !(memory_gib.is_finite() && memory_gib > 0.0) {
        return Err(format!("--memory {memory_gib}: give the GPU memory available in GiB, e.g. 139.25 for an H200"));
    }
    let memory = (memory_gib * (1u64 << 30) as f64) as u64;
    let mut rows = Vec::new();
    for name in models {
        let (cfg, _) = super::step::preset(name)?;
        for level in [Level::Bf16, Level::O1, Level::O2] {
            for recompute in [Recompute::None, Recompute::Gelu, Recompute::Cheap, Recompute::Full] {
                let b = max_batch(&cfg, level, recompute, memory, limit);
                let used = if b > 0 { bytes(&cfg, level, recompute, b) } else { bytes(&cfg, level, recompute, 1) };
                rows.push(FitRow {
                    model: name.clone(),
                    level: level.to_string(),
                    recompute: recompute.to_string(),
                    max_batch: b,
                    bytes: used,
                });
            }
        }
    }
    Ok(rows)
}

pub fn run(a: &FitBenchArgs) -> Result<(), String> {
    let models: Vec<String> = a.models.split(',').map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
    let rows = plan(&models, a.memory, a.max_batch)?;
    if a.json {
        println!("{}", serde_json::to_string(&rows).expect("rows serialise"));
        return Ok(());
    }
    println!(
        "largest batch by the memory estimate on {:.1} GiB (one GPU; confirm with `bench step --batch N`)",
        a.memory
    );
    println!("| model | level | recompute | max batch | estimate |");
    println!("| --- | --- | --- | --- | --- |");
    for r in &rows {
        let what = if r.max_batch == 0 { format!("none fits ({} at batch 1)", gib(r.bytes)) } else { gib(r.bytes) };
        println!("| {} | {} | {} | {} | {} |", r.model, r.level, r.recompute, r.max_batch, what);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_batch_fits_and_one_more_does_not() {
        let (cfg, _) = crate::bench::step::preset("gpt-1.3b").unwrap();
        let mem = 139u64 << 30;
        for level in [Level::Bf16, Level::O2] {
            for rc in [Recompute::None, Recompute::Full] {
                let b = max_batch(&cfg, level, rc, mem, 4096);
                assert!(b > 0 && bytes(&cfg, level, rc, b) <= mem, "{level} {rc}");
                assert!(bytes(&cfg, level, rc, b + 1) > mem, "{level} {rc}: {b} is not the largest");
            }
        }
        // Leaner levels and more recomputation fit more.
        let b = |l, r| max_batch(&cfg, l, r, mem, 4096);
        assert!(b(Level::O2, Recompute::None) > b(Level::Bf16, Recompute::None));
        assert!(b(Level::O2, Recompute::Full) > b(Level::O2, Recompute::Cheap));
        assert!(b(Level::O2, Recompute::Cheap) > b(Level::O2, Recompute::None));
        // A shape that cannot fit says so.
        let (big, _) = crate::bench::step::preset("gpt-13b").unwrap();
        assert_eq!(max_batch(&big, Level::Bf16, Recompute::Full, mem, 64), 0, "13B at bf16 needs 16 bytes a parameter");
        assert!(max_batch(&big, Level::O2, Recompute::Full, mem, 64) >= 1);
        assert!(plan(&["gpt-1.3b".into()], -1.0, 8).unwrap_err().contains("--memory"));
        assert!(plan(&["gpt-99b".into()], 80.0, 8).unwrap_err().contains("unknown shape"));
        assert!(plan(&[], 80.0, 8).unwrap_err().contains("--models"));
    }

    /// The GPU estimate (with its allocator slack) against what an H200 (139.80 GiB,
    /// 139.25 free after the context) did with GPT-1.3B O2 (`bench step`, thirteenth
    /// session, `docs/largest-batch-gpt-1.3b-h200-session13.txt`): every batch that ran
    /// is allowed and estimated at or above its device memory in use less the context,
    /// and batch 166 with full recomputation, which failed to allocate, is refused.
    #[test]
    fn the_gpu_estimate_brackets_the_h200_runs() {
        let (cfg, _) = crate::bench::step::preset("gpt-1.3b").unwrap();
        let gib = |x: f64| (x * (1u64 << 30) as f64) as u64;
        let (free, context) = (gib(139.25), gib(0.55));
        for (rc, b, in_use) in [
            (Recompute::None, 8, 30.36),
            (Recompute::None, 50, 136.86),
            (Recompute::Cheap, 53, 138.77),
            (Recompute::Full, 160, 138.14),
            (Recompute::Full, 161, 138.92),
        ] {
            let need = bytes(&cfg, Level::O2, rc, b);
            assert!(need <= free, "O2 {rc} b{b} ran, but the estimate refuses it: {}", crate::model::memory::gib(need));
            assert!(
                need >= gib(in_use) - context,
                "O2 {rc} b{b}: estimate {} below the {in_use} GiB it used",
                crate::model::memory::gib(need)
            );
        }
        assert!(bytes(&cfg, Level::O2, Recompute::Full, 166) > free, "b166 full ran out of memory on the device");
    }
}
