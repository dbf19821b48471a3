//! `fp8train verify --backend cuda`: the GPU against the simulator, op by op. So far:
//! the saturating E4M3/E5M2 casts and the project's exp, log and tanh, each over every
//! one of the 2^32 f32 bit patterns (exact class: 0 mismatches required).

use crate::backend::cuda::Gpu;
use crate::cli::{Backend, VerifyArgs};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use fp8sim::fp8::{encode, Fp8Format};
use fp8sim::math;
use rayon::prelude::*;
use serde::Serialize;
use slog::{info, Logger};

#[derive(Serialize, Debug)]
pub struct Row {
    pub op: String,
    pub inputs: u64,
    pub class: &'static str,
    pub mismatches: u64,
    /// First mismatching input (f32 bits), GPU and simulator outputs.
    pub first: Option<String>,
    pub seconds: f64,
}

const CHUNK: u32 = 1 << 24;

fn launch_cfg(n: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Both FP8 casts over `total` bit patterns from 0.
fn sweep_fp8(gpu: &Gpu, total: u64) -> Result<[Row; 2], String> {
    let t = std::time::Instant::now();
    let f = gpu.function("fp8_encode_sweep")?;
    let err = |e: cudarc::driver::DriverError| format!("CUDA: {e}");
    let mut d4 = gpu.stream.alloc_zeros::<u8>(CHUNK as usize).map_err(err)?;
    let mut d5 = gpu.stream.alloc_zeros::<u8>(CHUNK as usize).map_err(err)?;
    let (mut h4, mut h5) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut bad: [(u64, Option<String>); 2] = [(0, None), (0, None)];
    let mut start = 0u64;
    while start < total {
        let count = (total - start).min(CHUNK as u64) as u32;
        let s32 = start as u32;
        // SAFETY: the kernel writes `count` bytes into buffers of CHUNK >= count bytes.
        unsafe {
            gpu.stream.launch_builder(&f).arg(&mut d4).arg(&mut d5).arg(&s32).arg(&count).launch(launch_cfg(count))
        }
        .map_err(err)?;
        gpu.stream.memcpy_dtoh(&d4, &mut h4[..]).map_err(err)?;
        gpu.stream.memcpy_dtoh(&d5, &mut h5[..]).map_err(err)?;
        for (k, (fmt, h)) in [(Fp8Format::E4M3, &h4), (Fp8Format::E5M2, &h5)].into_iter().enumerate() {
            let (n, first) = h[..count as usize]
                .par_iter()
                .enumerate()
                .filter_map(|(i, &got)| {
                    let bits = s32.wrapping_add(i as u32);
                    let want = encode(fmt, f32::from_bits(bits), true);
                    (got != want).then(|| (1u64, Some(format!("{bits:#010x}: gpu {got:#04x}, sim {want:#04x}"))))
                })
                .reduce(|| (0, None), |a, b| (a.0 + b.0, a.1.or(b.1)));
            bad[k].0 += n;
            if bad[k].1.is_none() {
                bad[k].1 = first;
            }
        }
        start += count as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    let row = |name: &str, b: &(u64, Option<String>)| Row {
        op: name.into(),
        inputs: total,
        class: "exact",
        mismatches: b.0,
        first: b.1.clone(),
        seconds: secs,
    };
    Ok([row("cast f32 -> e4m3 (saturating)", &bad[0]), row("cast f32 -> e5m2 (saturating)", &bad[1])])
}

/// One of exp, log, tanh over `total` bit patterns from 0.
fn sweep_math(gpu: &Gpu, total: u64, op: i32) -> Result<Row, String> {
    let t = std::time::Instant::now();
    let (name, reference): (&str, fn(f32) -> f32) = match op {
        0 => ("exp", math::exp),
        1 => ("log", math::log),
        _ => ("tanh", math::tanh),
    };
    let f = gpu.function("math_sweep")?;
    let err = |e: cudarc::driver::DriverError| format!("CUDA: {e}");
    let mut dy = gpu.stream.alloc_zeros::<f32>(CHUNK as usize).map_err(err)?;
    let mut hy = vec![0f32; CHUNK as usize];
    let (mut n_bad, mut first) = (0u64, None);
    let mut start = 0u64;
    while start < total {
        let count = (total - start).min(CHUNK as u64) as u32;
        let s32 = start as u32;
        // SAFETY: the kernel writes `count` floats into a buffer of CHUNK >= count.
        unsafe { gpu.stream.launch_builder(&f).arg(&mut dy).arg(&s32).arg(&count).arg(&op).launch(launch_cfg(count)) }
            .map_err(err)?;
        gpu.stream.memcpy_dtoh(&dy, &mut hy[..]).map_err(err)?;
        let (n, f1) = hy[..count as usize]
            .par_iter()
            .enumerate()
            .filter_map(|(i, &got)| {
                let bits = s32.wrapping_add(i as u32);
                let want = reference(f32::from_bits(bits));
                (got.to_bits() != want.to_bits()).then(|| {
                    (1u64, Some(format!("{bits:#010x}: gpu {:#010x}, sim {:#010x}", got.to_bits(), want.to_bits())))
                })
            })
            .reduce(|| (0, None), |a, b| (a.0 + b.0, a.1.or(b.1)));
        n_bad += n;
        if first.is_none() {
            first = f1;
        }
        start += count as u64;
    }
    Ok(Row {
        op: name.into(),
        inputs: total,
        class: "exact",
        mismatches: n_bad,
        first,
        seconds: t.elapsed().as_secs_f64(),
    })
}

pub fn verify_cmd(a: &VerifyArgs, log: &Logger) -> Result<(), String> {
    if a.backend == Backend::Sim {
        return Err("verify compares the CUDA backend with the simulator: use --backend cuda".into());
    }
    let gpu = Gpu::open(0).map_err(|e| format!("verify --backend cuda: no usable GPU: {e}"))?;
    info!(log, "verify"; "gpu" => &gpu.name, "arch" => &gpu.arch, "nvrtc_ms" => format!("{:.0}", gpu.compile_ms));
    let total: u64 = if a.quick { 1 << 28 } else { 1 << 32 };
    let mut rows: Vec<Row> = sweep_fp8(&gpu, total)?.into_iter().collect();
    for op in 0..3 {
        rows.push(sweep_math(&gpu, total, op)?);
    }
    let failed = rows.iter().filter(|r| r.mismatches > 0).count();
    if a.json {
        println!("{}", serde_json::json!({"gpu": gpu.name, "arch": gpu.arch, "rows": rows}));
    } else {
        println!("fp8train verify: {} ({}), kernels compiled by NVRTC in {:.0} ms", gpu.name, gpu.arch, gpu.compile_ms);
        println!("op                            | inputs        | class | mismatches | seconds | first mismatch");
        println!("------------------------------|---------------|-------|------------|---------|---------------");
        for r in &rows {
            println!(
                "{:<29} | {:>13} | {:<5} | {:>10} | {:>7.1} | {}",
                r.op,
                r.inputs,
                r.class,
                r.mismatches,
                r.seconds,
                r.first.clone().unwrap_or_else(|| "-".into())
            );
        }
    }
    if failed > 0 {
        Err(format!("verify: {failed} op(s) differ between the GPU and the simulator"))
    } else {
        Ok(())
    }
}
