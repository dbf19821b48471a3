//! `fp8train bench comm`: the collectives of the gradient path and of tensor parallelism,
//! timed over the ranks of an `mpirun` (nccl-tests style: time per size, algorithm and
//! bus bandwidth), and the gradient bytes a model's step puts on the wire per rank in
//! FP8 against BF16 and FP32. This build measures the MPI collectives (the simulator's
//! transport); NCCL on device buffers is the GPU follow-up (issue "GPU scale").

use crate::cli::CommBenchArgs;
use fp8cluster::reduce::{reduce_f32, reduce_fp8};
use fp8cluster::tp::{all_gather_fp8, reduce_scatter_fp8};
use fp8cluster::world::{Collectives, World};
use fp8sim::Fp8Format;
use serde::Serialize;
use std::time::Instant;

/// One collective at one size.
#[derive(Serialize, Debug, Clone)]
pub struct CommRow {
    pub op: &'static str,
    /// Message size in bytes (nccl-tests' convention: the whole buffer, of the op's type).
    pub bytes: u64,
    /// Median over the timed iterations of the slowest rank's time.
    pub us: f64,
    pub algbw_gbs: f64,
    pub busbw_gbs: f64,
}

/// A model's gradient bytes on the wire per rank and step.
#[derive(Serialize, Debug, Clone)]
pub struct WireBytes {
    pub model: String,
    pub params: u64,
    pub fp8: u64,
    pub fp8_scales: u64,
    pub bf16: u64,
    pub fp32: u64,
}

#[derive(Serialize, Debug)]
pub struct CommReport {
    pub bench: &'static str,
    pub ranks: usize,
    pub transport: &'static str,
    pub iters: usize,
    pub rows: Vec<CommRow>,
    pub wire: Option<WireBytes>,
}

/// Parse "4K", "1M", "65536" (bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("--sizes: {s:?} is not a size (e.g. 4K, 1M, 65536)"))?;
    if n == 0 || n * mul > 1 << 31 {
        return Err(format!("--sizes: {s:?} must be between 1 byte and 2 GiB"));
    }
    Ok(n * mul)
}

/// The slowest rank's seconds for `op`, median over `iters` runs after one warm-up.
fn time<C: Collectives>(c: &C, iters: usize, mut op: impl FnMut()) -> f64 {
    op();
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        c.barrier();
        let t0 = Instant::now();
        op();
        let mut s = [t0.elapsed().as_secs_f32()];
        c.all_reduce_max(&mut s);
        t.push(s[0] as f64);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

/// Every collective at every size on `c`.
pub fn measure<C: Collectives>(c: &C, sizes: &[u64], iters: usize) -> Vec<CommRow> {
    let n = c.size().max(1);
    let ring = (n - 1) as f64 / n as f64;
    let mut rows = Vec::new();
    for &bytes in sizes {
        let row = |op: &'static str, bytes: u64, secs: f64, factor: f64| {
            let alg = bytes as f64 / secs.max(1e-9) / 1e9;
            CommRow { op, bytes, us: secs * 1e6, algbw_gbs: alg, busbw_gbs: alg * factor }
        };
        // f32 all-reduce in rank order (all-gather + adds), as the bf16 level reduces.
        let nf = (bytes as usize / 4).max(n);
        let mut g = vec![1e-3f32; nf];
        let s = time(c, iters, || {
            reduce_f32(c, &mut g);
        });
        rows.push(row("allreduce f32 (rank order)", 4 * nf as u64, s, 2.0 * ring));
        // The contract's FP8 reduction: all-to-all of codes, rank-order f32 sums,
        // requantised, all-gather.
        let nb = (bytes as usize).max(n);
        let mut codes = vec![0x38u8; nb];
        let mut scale = 1.0f32;
        let s = time(c, iters, || {
            reduce_fp8(c, &mut codes, &mut scale);
        });
        rows.push(row("fp8 reduction (contract)", nb as u64, s, 2.0 * ring));
        // All-gather of bytes (O3's weight sharing, the TP all-gather's transport).
        let per = (bytes as usize / n).max(1);
        let send = vec![1u8; per];
        let mut recv = vec![0u8; per * n];
        let s = time(c, iters, || c.all_gather(&send, &mut recv));
        rows.push(row("allgather u8", (per * n) as u64, s, ring));
        // Reduce-scatter of f32 in rank order.
        let k = (bytes as usize / 4 / n).max(1);
        let part = vec![1e-3f32; k * n];
        let mut out = vec![0f32; k];
        let s = time(c, iters, || c.reduce_scatter_sum(&part, &mut out));
        rows.push(row("reducescatter f32 (rank order)", (4 * k * n) as u64, s, ring));
        // Tensor parallelism in FP8: the all-gather with one shared scale, the
        // reduce-scatter of FP8 partials.
        let shard = vec![0.5f32; per];
        let s = time(c, iters, || {
            all_gather_fp8(c, &shard, Fp8Format::E4M3, 1.0);
        });
        rows.push(row("tp allgather e4m3", (per * n) as u64, s, ring));
        let kb = (bytes as usize / n).max(1);
        let partial = vec![0.25f32; kb * n];
        let mut out = vec![0f32; kb];
        let s = time(c, iters, || {
            reduce_scatter_fp8(c, &partial, Fp8Format::E5M2, &mut out);
        });
        rows.push(row("tp reducescatter e5m2", (kb * n) as u64, s, ring));
    }
    rows
}

/// Gradient bytes one rank sends per step for a model with these tensor sizes over
/// `ranks` ranks: the contract's FP8 reduction (codes, plus scales and amaxes), and a
/// ring all-reduce of BF16 and of FP32 values.
pub fn wire_bytes(model: &str, numels: &[usize], ranks: usize) -> WireBytes {
    // The FP8 reduction moves a ring all-reduce's traffic in one-byte codes: BF16 and
    // FP32 values would move 2 and 4 times as many bytes.
    let mut total = fp8cluster::reduce::CommBytes::default();
    for &n in numels {
        total += fp8cluster::reduce::fp8_reduction_bytes(n, ranks);
    }
    let p = numels.iter().map(|&n| n as u64).sum();
    let fp8 = total.payload;
    WireBytes { model: model.to_string(), params: p, fp8, fp8_scales: total.meta, bf16: 2 * fp8, fp32: 4 * fp8 }
}

pub fn table(r: &CommReport) -> String {
    let mut s = format!("bench comm: {} rank(s) over {}, median of {} iterations\n", r.ranks, r.transport, r.iters);
    s += "op                             |      bytes |        us | algbw GB/s | busbw GB/s\n";
    s += "-------------------------------|------------|-----------|------------|-----------\n";
    for x in &r.rows {
        s += &format!(
            "{:<30} | {:>10} | {:>9.1} | {:>10.3} | {:>10.3}\n",
            x.op, x.bytes, x.us, x.algbw_gbs, x.busbw_gbs
        );
    }
    if let Some(w) = &r.wire {
        s += &format!(
            "gradient bytes per rank and step, {} ({} params): FP8 {} (+ {} of scales), BF16 {}, FP32 {} (FP8/FP32 = {:.3})\n",
            w.model,
            w.params,
            w.fp8,
            w.fp8_scales,
            w.bf16,
            w.fp32,
            if w.fp32 > 0 { w.fp8 as f64 / w.fp32 as f64 } else { 0.0 }
        );
    }
    s
}

pub fn run(a: &CommBenchArgs) -> Result<(), String> {
    if a.backend != crate::cli::Backend::Sim {
        return Err("bench comm: this build measures the MPI collectives (--backend sim); NCCL on device buffers is not built yet".into());
    }
    if a.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    let sizes = a.sizes.split(',').map(parse_size).collect::<Result<Vec<_>, _>>()?;
    let world = World::init(1)?;
    let rows = measure(&world, &sizes, a.iters);
    let wire = match &a.model {
        Some(m) => {
            let (cfg, _) = crate::bench::step::preset(m)?;
            let numels: Vec<usize> = crate::model::params::specs(&cfg).iter().map(|s| s.numel()).collect();
            Some(wire_bytes(m, &numels, world.size))
        }
        None => None,
    };
    let report = CommReport { bench: "comm", ranks: world.size, transport: "MPI", iters: a.iters, rows, wire };
    if world.rank == 0 {
        let json = serde_json::to_string(&report).map_err(|e| e.to_string())?;
        if a.json {
            println!("{json}");
        } else {
            print!("{}", table(&report));
            println!("{json}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_bad_ones_are_named() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert!(parse_size("4Q").unwrap_err().contains("\"4Q\""));
        assert!(parse_size("3G").unwrap_err().contains("between"));
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn fp8_gradient_bytes_are_a_quarter_of_fp32() {
        let w = wire_bytes("x", &[1000, 4096, 7], 4);
        // Per tensor: 2 (r - 1) ceil(n / r) bytes of codes against 4x that in FP32.
        assert_eq!(w.fp8, 2 * 3 * (250 + 1024 + 2));
        assert_eq!((w.fp32, w.bf16), (4 * w.fp8, 2 * w.fp8));
        assert_eq!(w.fp8_scales, 3 * 2 * 3 * 4);
        assert_eq!(wire_bytes("x", &[10], 1).fp8, 0);
    }

    #[test]
    fn one_rank_measures_every_op() {
        let rows = measure(&World::single(), &[4096], 2);
        assert_eq!(rows.len(), 6);
        assert!(rows.iter().all(|r| r.us >= 0.0 && r.busbw_gbs == 0.0), "{rows:?}");
    }
}
