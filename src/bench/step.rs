//! `fp8train bench step`: whole training steps of a GPT shape on one device, exactly as
//! `train` runs them (`train::train_step`), on random tokens. Prints tokens/s, the
//! median step time, achieved TFLOP/s and MFU against the chip's dense BF16 and FP8
//! peaks, peak device memory (the pool's high-water mark and the device total in use),
//! and where the device time of one profiled step went (CUDA events per phase).
//!
//! Under mpirun (`--tp N` for tensor parallel, data parallel over the rest) every rank
//! runs the step; rank 0 reports tokens/s of all ranks, per-GPU TFLOP/s and MFU, the
//! largest peak memory of any rank and the bytes a rank sent per step (gradient
//! reduction; tensor-parallel collectives next to their BF16 equivalent).
//!
//! FLOPs per token follow the PaLM / nanoGPT convention: 6 N (N = all parameters,
//! the tied LM head counted once) + 12 L d T for attention (causal masking not
//! discounted), times 1 token; MFU = achieved / peak.

use crate::backend::cuda::Cuda;
use crate::backend::sim::Sim;
use crate::backend::{Backend, MemoryStats, OpTime, Phase};
use crate::cli::{Backend as CliBackend, Gemm, StepBenchArgs};
use crate::model::config::ModelConfig;
use crate::model::{Gpt, Level};
use crate::train::checkpoint::LoopState;
use crate::train::config::TrainConfig;
use fp8cluster::world::World;
use fp8sim::rng;
use serde::Serialize;
use slog::{info, Logger};
use std::time::Instant;

/// Dense peaks of an H100/H200 SXM (NVIDIA datasheet), TFLOP/s.
pub const PEAK_BF16_TFLOPS: f64 = 989.4;
pub const PEAK_FP8_TFLOPS: f64 = 1978.9;

/// A named model shape and its usual (batch, seq).
pub fn preset(name: &str) -> Result<(ModelConfig, usize), String> {
    let m = |n_layer, n_embd, n_head, seq_len| ModelConfig { n_layer, n_embd, n_head, seq_len, vocab_size: 50304 };
    Ok(match name {
        "gpt2-124m" => (m(12, 768, 12, 1024), 16),
        "gpt-1.3b" => (m(24, 2048, 16, 2048), 8),
        "gpt-6.7b" => (m(32, 4096, 32, 2048), 1),
        "gpt-13b" => (m(40, 5120, 40, 2048), 1),
        "default" => (ModelConfig::default(), 16),
        other => {
            return Err(format!(
                "--model {other}: unknown shape (allowed: gpt2-124m, gpt-1.3b, gpt-6.7b, gpt-13b, default)"
            ))
        }
    })
}

#[derive(Serialize, Debug)]
pub struct StepReport {
    pub bench: &'static str,
    pub model: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub vocab_size: usize,
    pub params: usize,
    pub batch: usize,
    pub seq: usize,
    pub level: String,
    pub gemm: String,
    /// `train.recompute`.
    pub recompute: String,
    pub backend: &'static str,
    pub device: String,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    pub tokens_per_s: f64,
    pub flops_per_token: f64,
    pub tflops: f64,
    pub mfu_bf16: f64,
    pub mfu_fp8: f64,
    pub memory: Option<MemoryStats>,
    /// What the memory check estimated before allocating (`model::memory`: state,
    /// workspace and largest temporary) and the device's allocator slack on top
    /// (`Backend::memory_overhead`), bytes: next to the measured peaks they show how
    /// far `bench fit`'s plan can be trusted.
    pub estimate_bytes: u64,
    pub estimate_slack_bytes: u64,
    /// Device milliseconds of one profiled step, per phase (`idle`: nothing queued).
    pub phases_ms: Vec<(Phase, f64)>,
    /// The same step per op, longest first.
    pub ops: Vec<OpTime>,
    pub final_loss: f32,
    pub fast_fallbacks: u64,
    /// Ranks, and their grid (data parallel x tensor parallel).
    pub ranks: usize,
    pub dp: usize,
    pub tp: usize,
    /// Bytes rank 0 sent per step: the data-parallel gradient reduction, and the
    /// tensor-parallel collectives with what BF16 values would have needed.
    pub grad_comm_bytes: u64,
    pub tp_comm_bytes: Option<u64>,
    pub tp_comm_bf16_bytes: Option<u64>,
}

pub fn flops_per_token(cfg: &ModelConfig, params: usize) -> f64 {
    6.0 * params as f64 + 12.0 * (cfg.n_layer * cfg.n_embd * cfg.seq_len) as f64
}

pub fn run(a: &StepBenchArgs, log: &Logger) -> Result<(), String> {
    let (base, batch_default) = preset(&a.model)?;
    let mut cfg = crate::train::config::Config { model: base, ..Default::default() };
    cfg = cfg.with_overrides(&a.sets)?;
    if let Some(t) = a.seq {
        cfg.model.seq_len = t;
    }
    cfg.model.validate()?;
    let level: Level = a.level;
    if !(a.warmup_s.is_finite() && (0.0..=600.0).contains(&a.warmup_s)) {
        return Err(format!("--warmup-s {}: give seconds between 0 and 600", a.warmup_s));
    }
    if a.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    let mut world = World::init(1)?;
    world.set_grid(a.tp)?;
    if level == Level::O3 && world.dp == 1 {
        return Err("bench step: O3 shards the optimizer state over data-parallel ranks; at one it is O2 \
                    (measure O3 under mpirun with more ranks than --tp)"
            .into());
    }
    if a.tp > 1 {
        crate::model::shard::check(&cfg.model, a.tp)?;
    }
    let r = run_on(a, &cfg, level, batch_default, log, &world);
    if let Err(e) = &r {
        if world.size > 1 {
            world.abort(e);
        }
    }
    r
}

fn run_on(
    a: &StepBenchArgs,
    cfg: &crate::train::config::Config,
    level: Level,
    batch: usize,
    log: &Logger,
    world: &World,
) -> Result<(), String> {
    let batch = a.batch.unwrap_or(batch);
    if batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    match a.backend {
        CliBackend::Sim => {
            if a.gemm == Gemm::Fast {
                return Err("bench step --gemm fast needs --backend cuda (the simulator is exact only)".into());
            }
            measure(&Sim, "cpu".into(), cfg, level, batch, a, log, world, || 0)
        }
        CliBackend::Cuda | CliBackend::Auto => {
            let d = crate::cmd::cuda_device(world.local_rank)?;
            let gpu = if a.gemm == Gemm::Fast { Cuda::new_fast(d) } else { Cuda::new(d) }
                .map_err(|e| format!("bench step: no usable GPU: {e}"))?;
            let name = gpu.gpu().name.clone();
            let r = measure(&gpu, name, cfg, level, batch, a, log, world, || gpu.fast_fallbacks());
            let fb = gpu.fast_fallbacks();
            if fb > 0 {
                info!(log, "fast GEMMs that ran the exact kernel"; "count" => fb);
            }
            r
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn measure<B: Backend>(
    be: &B,
    device: String,
    cfg: &crate::train::config::Config,
    level: Level,
    batch: usize,
    a: &StepBenchArgs,
    log: &Logger,
    world: &World,
    fast_fallbacks: impl Fn() -> u64,
) -> Result<(), String> {
    let grid = crate::train::dist::Grid::new(world);
    let model_cfg = &cfg.model;
    // --set train.recompute=... is the one training setting a step measurement takes.
    let tc = TrainConfig { level, recompute: cfg.train.recompute, tp: world.tp, ..Default::default() };
    let t = model_cfg.seq_len;
    let n = batch * t;
    let est = crate::model::memory::check(be, model_cfg, level, tc.recompute, world.dp, world.tp, batch, "bench step")?;
    let t0 = Instant::now();
    let mut model = Gpt::new_tp(be, model_cfg, level, 1, tc.amax_window, grid.dp.rank, grid.dp.size, grid.tp_place())?;
    model.recompute = tc.recompute;
    let mut ws = model.workspace(be, batch, t)?;
    be.synchronize()?;
    info!(log, "model ready"; "params" => model.num_params(), "seconds" => t0.elapsed().as_secs_f64());
    // Each data-parallel rank its rows; the ranks of a tensor-parallel group the same.
    let dp_rank = grid.dp.rank as u32;
    let tokens = |step: u64| -> (Vec<u32>, Vec<u32>) {
        let v = model_cfg.vocab_size as u64;
        let r: Vec<u32> =
            (0..=n as u64).map(|i| (rng::bits(7, rng::stream(9, step as u32, dp_rank), i) as u64 % v) as u32).collect();
        (r[..n].to_vec(), r[1..].to_vec())
    };
    let mut ls = LoopState { step: 0, opt_steps: 0, mu_bits: 1f32.to_bits(), good_steps: 0 };
    crate::train::start_control(be, &mut model, &tc, &ls)?;
    let lr = 1e-4f32;
    let mut loss = f32::NAN;
    let mut sent = (0u64, None);
    let mut step = |k: u64, ls: &mut LoopState| {
        let (x, y) = tokens(k);
        let so = crate::train::train_step(be, &mut model, &mut ws, &tc, (&x, &y), lr, ls, &grid, false)?;
        be.synchronize()?;
        sent = (so.comm.payload + so.comm.meta, so.tp);
        crate::backend::BResult::Ok(so.stats.loss)
    };
    // At least --warmup steps, and on a GPU at least --warmup-s seconds (in three calls
    // on an H200 the first `bench step` after an idle spell ran 2% slower than the same
    // binary right after it; runs after other GPU work agreed within 0.6%). The extra
    // steps are counted from the slowest rank's figures, so every rank runs as many
    // (each step has collectives).
    let (warm_start, min_s) = (Instant::now(), if be.name() == "cuda" { a.warmup_s } else { 0.0 });
    let mut warm = 0;
    let mut warm_step = |warm: &mut usize, ls: &mut LoopState| -> Result<f64, String> {
        let s = Instant::now();
        loss = step(*warm as u64, ls)?;
        *warm += 1;
        let ms = s.elapsed().as_secs_f64() * 1e3;
        info!(log, "warm-up step"; "step" => *warm, "ms" => ms, "loss" => loss);
        Ok(ms)
    };
    let mut last_ms = 0.0;
    while warm < a.warmup.max(usize::from(min_s > 0.0)) {
        last_ms = warm_step(&mut warm, &mut ls)?;
    }
    let left_ms = (min_s * 1e3 - warm_start.elapsed().as_secs_f64() * 1e3).max(0.0);
    let extra = if last_ms > 0.0 { (left_ms / last_ms).ceil() as u64 } else { 0 };
    let extra = world.all_gather_vec(&[extra]).into_iter().max().unwrap_or(0);
    for _ in 0..extra {
        warm_step(&mut warm, &mut ls)?;
    }
    let mut times = Vec::new();
    for k in 0..a.steps {
        let s = Instant::now();
        loss = step((warm + k) as u64, &mut ls)?;
        times.push(s.elapsed().as_secs_f64() * 1e3);
    }
    be.set_profiling(true);
    step((warm + a.steps) as u64, &mut ls)?;
    let mut ops = be.take_profile();
    be.set_profiling(false);
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    let mut per: std::collections::BTreeMap<Phase, f64> = Default::default();
    for o in &ops {
        *per.entry(o.phase).or_default() += o.ms;
    }
    let phases: Vec<(Phase, f64)> = per.into_iter().collect();
    // The largest pool high-water mark and device use of any rank.
    let memory = be.memory().map(|mut m| {
        let all = world.all_gather_vec(&[m.pool_high_water, m.device_used]);
        m.pool_high_water = all.iter().step_by(2).copied().max().unwrap_or(0);
        m.device_used = all.iter().skip(1).step_by(2).copied().max().unwrap_or(0);
        m
    });
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    // The whole model's parameters (a rank holds pieces at tp > 1); tokens of every
    // data-parallel rank; TFLOP/s and MFU per GPU.
    let params = crate::model::params::whole_count(model_cfg);
    let fpt = flops_per_token(model_cfg, params);
    let tok_s = (n * world.dp) as f64 / (median / 1e3);
    let tflops = fpt * tok_s / 1e12 / world.size as f64;
    let r = StepReport {
        bench: "step",
        model: a.model.clone(),
        n_layer: model_cfg.n_layer,
        n_embd: model_cfg.n_embd,
        n_head: model_cfg.n_head,
        vocab_size: model_cfg.vocab_size,
        params,
        batch,
        seq: t,
        level: level.to_string(),
        gemm: a.gemm.to_string(),
        recompute: tc.recompute.to_string(),
        backend: be.name(),
        device,
        warmup_steps: warm,
        timed_steps: a.steps,
        step_ms_median: median,
        step_ms_min: sorted[0],
        tokens_per_s: tok_s,
        flops_per_token: fpt,
        tflops,
        mfu_bf16: tflops / PEAK_BF16_TFLOPS,
        mfu_fp8: tflops / PEAK_FP8_TFLOPS,
        memory,
        estimate_bytes: est.total(),
        estimate_slack_bytes: be.memory_overhead(&est),
        phases_ms: phases,
        ops,
        final_loss: loss,
        fast_fallbacks: fast_fallbacks(),
        ranks: world.size,
        dp: world.dp,
        tp: world.tp,
        grad_comm_bytes: sent.0,
        tp_comm_bytes: sent.1.map(|x| x.total()),
        tp_comm_bf16_bytes: sent.1.map(|x| x.bf16_equivalent()),
    };
    if world.rank != 0 {
        return Ok(());
    }
    let json = serde_json::to_string(&r).map_err(|e| e.to_string())?;
    if !a.json {
        print!("{}", table(&r));
    }
    println!("{json}");
    Ok(())
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// The human-readable report.
pub fn table(r: &StepReport) -> String {
    let mut s = format!(
        "bench step: {} ({}L d{} h{} v{}, {:.1}M params), batch {} x seq {}, level {}, gemm {}, recompute {}, {} ({})\n",
        r.model,
        r.n_layer,
        r.n_embd,
        r.n_head,
        r.vocab_size,
        r.params as f64 / 1e6,
        r.batch,
        r.seq,
        r.level,
        r.gemm,
        r.recompute,
        r.backend,
        r.device
    );
    s += &format!(
        "tok/s {:.0} | step {:.2} ms (median of {}, min {:.2}) | {:.1} TFLOP/s | MFU {:.1}% of BF16 peak, {:.1}% of FP8 peak\n",
        r.tokens_per_s,
        r.step_ms_median,
        r.timed_steps,
        r.step_ms_min,
        r.tflops,
        100.0 * r.mfu_bf16,
        100.0 * r.mfu_fp8
    );
    if let Some(m) = &r.memory {
        s += &format!(
            "memory: pool high-water {:.2} GiB (estimate {:.2}) | device in use {:.2} of {:.2} GiB (estimate with allocator slack {:.2})\n",
            gib(m.pool_high_water),
            gib(r.estimate_bytes),
            gib(m.device_used),
            gib(m.device_total),
            gib(r.estimate_bytes + r.estimate_slack_bytes)
        );
    } else {
        let mib = r.estimate_bytes as f64 / (1u64 << 20) as f64;
        s += &format!("memory: estimate {mib:.2} MiB (the backend reports no peaks)\n");
    }
    if r.ranks > 1 {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        s += &format!(
            "{} ranks (data parallel {} x tensor parallel {}; tok/s of all, TFLOP/s and MFU per GPU, memory of the \
             fullest): gradient reduction {:.1} MiB per rank per step",
            r.ranks,
            r.dp,
            r.tp,
            mib(r.grad_comm_bytes)
        );
        if let (Some(x), Some(bf)) = (r.tp_comm_bytes, r.tp_comm_bf16_bytes) {
            s += &format!(" | tensor parallel {:.1} MiB (BF16 would move {:.1})", mib(x), mib(bf));
        }
        s += "\n";
    }
    let total: f64 = r.phases_ms.iter().map(|p| p.1).sum();
    if total > 0.0 {
        s += "phase          |       ms |     %\n";
        for (p, ms) in &r.phases_ms {
            s += &format!("{:<14} | {:>8.2} | {:>5.1}\n", format!("{p:?}").to_lowercase(), ms, 100.0 * ms / total);
        }
        s += &format!("{:<14} | {:>8.2} |  (one step with an event around every op)\n", "profiled step", total);
        s += "top ops: ";
        let top: Vec<String> =
            r.ops.iter().take(10).map(|o| format!("{} {:.2} ms ({} calls)", o.op, o.ms, o.calls)).collect();
        s += &top.join(", ");
        s += "\n";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_flops() {
        let (m, b) = preset("gpt2-124m").unwrap();
        assert_eq!((m.n_layer, m.n_embd, m.n_head, m.seq_len, b), (12, 768, 12, 1024, 16));
        assert!(preset("gpt-7").unwrap_err().contains("unknown shape"));
        // 6N + 12 L d T
        assert_eq!(flops_per_token(&m, 1000), 6000.0 + 12.0 * 12.0 * 768.0 * 1024.0);
    }
}
