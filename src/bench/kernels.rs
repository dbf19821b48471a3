//! `fp8train bench kernels`: the bandwidth-bound ops of a training step (everything
//! that is not a matrix product or attention) at a model's shapes, each as bytes moved
//! per second and as a fraction of a device-to-device copy measured in the same run
//! (the fast-path issue's target: 70% each). Bytes are what each op must read and write
//! at least (its inputs and outputs once), not what its kernels happen to move.

use super::step::preset;
use crate::backend::cuda::Cuda;
use crate::backend::sim::Sim;
use crate::backend::{
    ActOut, AdamState, BResult, Backend, GeluIn, GradOut, GradRef, JitSrc, LossGrad, Phase, Scalar, ScaleSlot, Slot,
};
use crate::cli::{Backend as CliBackend, KernelsBenchArgs};
use fp8sim::fp8::Fp8Format;
use fp8sim::half16::{bf16, f16, to_bf16, to_f16};
use fp8sim::ops::adamw::AdamStep;
use fp8sim::rng;
use serde::Serialize;
use std::time::Instant;

#[derive(Serialize, Debug)]
pub struct KernelRow {
    pub op: &'static str,
    pub shape: String,
    pub ms: f64,
    pub bytes: u64,
    pub gb_per_s: f64,
    /// Bandwidth over the copy's in the same run.
    pub of_copy: f64,
}

#[derive(Serialize, Debug)]
pub struct KernelsReport {
    pub bench: &'static str,
    pub device: String,
    pub model: String,
    pub tokens: usize,
    pub n_embd: usize,
    pub copy_gb_per_s: f64,
    pub rows: Vec<KernelRow>,
}

pub fn run(a: &KernelsBenchArgs) -> Result<KernelsReport, String> {
    let (cfg, batch) = preset(&a.model).map_err(|e| format!("bench kernels: {e}"))?;
    let batch = a.batch.unwrap_or(batch);
    if batch == 0 || a.reps == 0 {
        return Err("bench kernels: --batch and --reps must be at least 1".into());
    }
    match a.backend {
        CliBackend::Sim => measure(&Sim, "cpu (simulator)".into(), a, &cfg, batch),
        CliBackend::Cuda | CliBackend::Auto => {
            let gpu = Cuda::new_fast(0).map_err(|e| format!("bench kernels: no usable GPU: {e}"))?;
            let name = gpu.gpu().name.clone();
            measure(&gpu, name, a, &cfg, batch)
        }
    }
}

fn randn(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let mut x = vec![0f32; n];
    rng::fill_normal(seed, 17, 0, 0.0, std, &mut x);
    x
}

/// The median over `reps` runs of `f`'s device time (the sum of its ops' event times
/// where the backend profiles; else the wall time around a synchronisation), in ms.
fn time<B: Backend>(be: &B, reps: usize, mut f: impl FnMut() -> BResult<()>) -> Result<f64, String> {
    f()?; // warm-up: pool, algorithm choice, tables
    be.synchronize()?;
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        be.set_profiling(true);
        let t = Instant::now();
        f()?;
        be.synchronize()?;
        let wall = t.elapsed().as_secs_f64() * 1e3;
        let prof = be.take_profile();
        be.set_profiling(false);
        let device: f64 = prof.iter().filter(|o| o.phase != Phase::Idle).map(|o| o.ms).sum();
        ms.push(if prof.is_empty() { wall } else { device });
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

fn measure<B: Backend>(
    be: &B,
    device: String,
    a: &KernelsBenchArgs,
    cfg: &crate::model::ModelConfig,
    batch: usize,
) -> Result<KernelsReport, String> {
    let (c, v) = (cfg.n_embd, cfg.vocab_size);
    let n = batch * cfg.seq_len;
    let reps = a.reps;
    let mut rows = Vec::new();
    let mut row = |op: &'static str, shape: String, ms: f64, bytes: u64| {
        rows.push(KernelRow { op, shape, ms, bytes, gb_per_s: bytes as f64 / (ms * 1e-3) / 1e9, of_copy: 0.0 });
    };
    let nc = format!("{n} x {c}");

    // The baseline: a device-to-device copy of an f32 [n, c] tensor (read + write).
    let src = be.upload(&randn(n * c, 1, 1.0))?;
    let mut dst = be.zeros::<f32>(n * c)?;
    let ms = time(be, reps, || be.copy(&mut dst, &src))?;
    row("copy (baseline)", nc.clone(), ms, 8 * (n * c) as u64);

    let (w, b) = (be.upload(&vec![1.0f32; c])?, be.upload(&vec![0.0f32; c])?);
    let (mut mean, mut rstd, mut xhat) = (be.zeros::<f32>(n)?, be.zeros::<f32>(n)?, be.zeros::<bf16>(n * c)?);
    let mut stats = be.zeros::<u64>(4)?;
    let (mut q, mut q4, mut qw) = (be.zeros::<u8>(n * c)?, be.zeros::<u8>(4 * n * c)?, be.zeros::<u8>(4 * c * c)?);
    let ms = time(be, reps, || {
        let y = ActOut::E4m3(&mut q, Scalar::Host(8.0), Slot { buf: &mut stats, at: 0 });
        be.layernorm_forward(y, &mut xhat, &mut mean, &mut rstd, &src, &w, &b, n, c)
    })?;
    // x read (f32), y (E4M3) and xhat (BF16) written.
    row("layernorm forward (f32 in, E4M3 + BF16 xhat out)", nc.clone(), ms, (7 * n * c + 8 * n) as u64);

    let dy16: Vec<bf16> = randn(n * c, 2, 1.0).into_iter().map(to_bf16).collect();
    let dy = be.upload(&dy16)?;
    let (mut dw, mut db) = (be.zeros::<f32>(c)?, be.zeros::<f32>(c)?);
    let ms = time(be, reps, || be.layernorm_backward(&mut dst, true, &mut dw, &mut db, &dy, &xhat, &w, &rstd, n, c))?;
    // dy and xhat (BF16) read, the residual gradient read and written, dw and db summed.
    row("layernorm backward (+ dw, db sums)", nc.clone(), ms, (12 * n * c + 4 * n) as u64);

    let x4: Vec<bf16> = randn(4 * n * c, 3, 2.0).into_iter().map(to_bf16).collect();
    let pre = be.upload(&x4)?;
    let n4 = format!("{n} x {}", 4 * c);
    let mut x8 = be.zeros::<u8>(4 * n * c)?;
    let ms = time(be, reps, || {
        be.gelu_forward(ActOut::E4m3(&mut q4, 8.0.into(), Slot { buf: &mut stats, at: 0 }), &pre, Some(&mut x8))
    })?;
    // x read (BF16), y and x's E4M3 copy written.
    row("GELU forward (BF16 in, E4M3 out + E4M3 x)", n4.clone(), ms, (16 * n * c) as u64);

    let g4: Vec<bf16> = randn(4 * n * c, 4, 1e-3).into_iter().map(to_bf16).collect();
    let dg = be.upload(&g4)?;
    let mut db4 = be.zeros::<f32>(4 * c)?;
    let ms = time(be, reps, || {
        let out = GradOut::Fp8 {
            db: &mut db4,
            q: &mut q4,
            fmt: Fp8Format::E5M2,
            scale: Scalar::Host(1024.0),
            stats: Slot { buf: &mut stats, at: 0 },
        };
        be.gelu_backward(out, GeluIn::E4m3(&x8), &dg, 4 * c)
    })?;
    // x (E4M3) and dy (BF16) read, dx (E5M2) written.
    row("GELU backward (E4M3 x, + bias sums, E5M2 out)", n4.clone(), ms, (16 * n * c) as u64);

    let res = be.upload(&randn(n * c, 5, 1.0))?;
    let x16 = be.upload(&randn(n * c, 6, 1.0).into_iter().map(fp8sim::half16::to_bf16).collect::<Vec<_>>())?;
    let ms = time(be, reps, || be.residual_forward(&mut dst, &res, &x16, &b))?;
    row("residual add (BF16 product + bias)", nc.clone(), ms, (10 * n * c) as u64);

    let ms = time(be, reps, || {
        let st = Slot { buf: &mut stats, at: 0 };
        be.column_sums_cast(&mut db, &mut q, &src, n, c, Fp8Format::E5M2, 64.0.into(), st)
    })?;
    row("bias sums + E5M2 cast of dy", nc.clone(), ms, (5 * n * c) as u64);

    let wgrad = be.upload(&randn(4 * c * c, 6, 1e-3))?;
    let mut wscale = be.upload(&[1.0f32, 1.0])?;
    let ms = time(be, reps, || {
        let scale = ScaleSlot { buf: &mut wscale, at: 0 };
        be.cast_fp8_jit(&mut qw, JitSrc::F32(&wgrad), Fp8Format::E4M3, scale, Slot { buf: &mut stats, at: 0 })
    })?;
    row("weight-gradient JIT cast (f32 -> E4M3)", format!("{} x {c}", 4 * c), ms, (9 * 4 * c * c) as u64);

    let rows_head = crate::model::gpt::head_rows_for(n, v);
    let l16: Vec<bf16> = randn(rows_head * v, 7, 3.0).into_iter().map(to_bf16).collect();
    let mut logits = be.upload(&l16)?;
    let targets = be.upload(&(0..rows_head).map(|i| ((i * 13) % v) as u32).collect::<Vec<_>>())?;
    let mut losses = be.zeros::<f32>(rows_head)?;
    let dloss = LossGrad { mu: Scalar::Host(1.0), rows: 1e4 };
    let ms = time(be, reps, || be.crossentropy(&mut losses, &mut logits, true, &targets, dloss, rows_head, v))?;
    row("cross-entropy (BF16 logits, gradient in place)", format!("{rows_head} x {v}"), ms, (4 * rows_head * v) as u64);

    // AdamW at O2 over one block's linear weights (12 c^2 parameters).
    let p = 12 * c * c;
    let mh: Vec<f16> = randn(p, 8, 0.02).into_iter().map(|x| to_f16(x * 1024.0)).collect();
    let mut master = be.upload(&mh)?;
    let mut m8 = be.zeros::<u8>(p)?;
    let mut vh = be.zeros::<f16>(p)?;
    let gq = be.upload(&vec![0x38u8; p])?;
    let step = AdamStep::new(1e-4, 0.9, 0.95, 1e-8, 0.1, 1, 1.0);
    let (mut ps, mut mvs) = (be.upload(&[1.0f32 / 1024.0, 1024.0])?, be.upload(&[1.0f32; 4])?);
    let ms = time(be, reps, || {
        let state = AdamState::O2 {
            master: &mut master,
            master_scale: &mut ps,
            m: &mut m8,
            v: &mut vh,
            moment_scales: &mut mvs,
        };
        be.adamw_many(vec![(state, GradRef::Fp8(&gq, 1.0.into()), step)], None)
    })?;
    row("AdamW O2 (two passes)", format!("{p} params"), ms, (17 * p) as u64);

    let copy = rows[0].gb_per_s;
    for r in &mut rows {
        r.of_copy = r.gb_per_s / copy;
    }
    Ok(KernelsReport {
        bench: "kernels",
        device,
        model: a.model.clone(),
        tokens: n,
        n_embd: c,
        copy_gb_per_s: copy,
        rows,
    })
}

pub fn table(r: &KernelsReport) -> String {
    let mut s = format!(
        "bench kernels: {} shapes ({} tokens, n_embd {}) on {}; bandwidth as a fraction of a device copy's ({:.0} GB/s)\n",
        r.model, r.tokens, r.n_embd, r.device, r.copy_gb_per_s
    );
    s += &format!("{:<48} | {:>16} | {:>9} | {:>8} | {:>7}\n", "op", "shape", "ms", "GB/s", "of copy");
    for row in &r.rows {
        s += &format!(
            "{:<48} | {:>16} | {:>9.3} | {:>8.0} | {:>6.0}%\n",
            row.op,
            row.shape,
            row.ms,
            row.gb_per_s,
            100.0 * row.of_copy
        );
    }
    s
}
