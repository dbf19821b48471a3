//! `fp8train verify --backend cuda`: the GPU against the simulator, op by op. So far:
//! the saturating E4M3/E5M2 casts and the project's exp, log and tanh, each over every
//! one of the 2^32 f32 bit patterns (exact class: 0 mismatches required).

use crate::backend::cuda::{Cuda, Gpu};
use crate::backend::sim::Sim;
use crate::backend::BResult;
use crate::backend::{
    amax_slot_bits, ActOut, AdamState, Backend, Delayed, EmbedTable, GeluIn, GradOut, GradRef, JitSrc, LossGrad,
    Operand, Product, Scalar, ScaleSlot, Slot, DELAYED_E5M2,
};
use crate::cli::{Backend as CliBackend, VerifyArgs};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use fp8sim::fp8::{encode, Fp8Format};
use fp8sim::half16::{bf16, f16, to_bf16, to_f16};
use fp8sim::math;
use fp8sim::ops::adamw::{AdamStep, StepControl};
use fp8sim::ops::attention::AttnShape;
use fp8sim::rng;
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

/// One of exp, log, tanh, exp2_fast over `total` bit patterns from 0.
fn sweep_math(gpu: &Gpu, total: u64, op: i32) -> Result<Row, String> {
    let t = std::time::Instant::now();
    let (name, reference): (&str, fn(f32) -> f32) = match op {
        0 => ("exp", math::exp),
        1 => ("log", math::log),
        2 => ("tanh", math::tanh),
        _ => ("exp2_fast (polynomial)", math::exp2_fast),
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

/// One op on fresh random inputs.
#[derive(Clone, Debug)]
enum Case {
    Gemm {
        ta: &'static str,
        tb: &'static str,
        product: Product,
        m: usize,
        n: usize,
        k: usize,
    },
    LayerNorm {
        n: usize,
        c: usize,
    },
    /// `rows x c` elements; GELU without and with a bias of `c` columns.
    Gelu {
        rows: usize,
        c: usize,
        every_code: bool,
    },
    /// `bf16(a b^T / 4096 + bias)` (`matmul_bias_bf16`), operands of type `ta`; with
    /// `residual`, `res + (a b^T / 4096 + bias)` in f32 (the product, then
    /// `residual_forward`, as the projections run).
    GemmBias {
        ta: &'static str,
        m: usize,
        n: usize,
        k: usize,
        residual: bool,
    },
    Residual {
        rows: usize,
        c: usize,
    },
    Encoder {
        b: usize,
        t: usize,
        c: usize,
        v: usize,
    },
    Attention {
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    },
    /// With `special`, rows 0, 1 and 2 hold a +inf, a NaN and a -inf logit.
    CrossEntropy {
        n: usize,
        v: usize,
        special: bool,
    },
    ColumnSums {
        rows: usize,
        cols: usize,
    },
    Casts {
        n: usize,
    },
    Reductions {
        n: usize,
    },
    /// Per-tensor sums of squares of many gradients at once (the gradient norm).
    GradSums,
    /// A BF16 weight-gradient product over rows split in two, the second accumulating.
    GemmAcc {
        m1: usize,
        m2: usize,
        n: usize,
        k: usize,
    },
    Adam {
        level: &'static str,
        n: usize,
        fp8_grad: bool,
    },
}

impl Case {
    fn describe(&self) -> (String, String) {
        match self {
            Case::Gemm { ta, tb, product, m, n, k } => {
                (format!("gemm exact {ta} x {tb} {product:?}"), format!("{m}x{n}x{k}"))
            }
            Case::LayerNorm { n, c } => ("layernorm fwd (f32/bf16/e4m3 out) + bwd".into(), format!("{n}x{c}")),
            Case::Gelu { rows, c, every_code: false } => (
                "bf16(x + bias), gelu fwd (f32/bf16/e4m3 out) + bwd (f32, bf16 + bias sums, e5m2 + bias sums)".into(),
                format!("{rows}x{c}"),
            ),
            Case::Gelu { rows, c, every_code: true } => {
                ("gelu fwd + bwd of every bf16 code below 2^60 (the tables)".into(), format!("{rows}x{c}"))
            }
            Case::Residual { rows, c } => ("residual + bias".into(), format!("{rows}x{c}")),
            Case::GemmBias { ta, m, n, k, residual } => (
                format!(
                    "gemm {ta} x {ta} Forward, {}",
                    if *residual { "res + (out + bias)" } else { "bf16(out + bias)" }
                ),
                format!("{m}x{n}x{k}"),
            ),
            Case::Encoder { b, t, c, v } => ("encoder fwd+bwd".into(), format!("b{b} t{t} c{c} v{v}")),
            Case::Attention { b, t, c, nh } => ("attention fwd+bwd".into(), format!("b{b} t{t} c{c} h{nh}")),
            Case::CrossEntropy { n, v, special } => (
                format!("softmax cross-entropy{}", if *special { " (inf, NaN, -inf logits)" } else { "" }),
                format!("{n}x{v}"),
            ),
            Case::ColumnSums { rows, cols } => {
                ("column sums (bias grad) [+ e5m2 cast, + bf16 copy; of bf16]".into(), format!("{rows}x{cols}"))
            }
            Case::Casts { n } => {
                ("casts e4m3/e5m2/bf16/f16 + decode, f16 -> e4m3/bf16, bf16 -> e4m3".into(), format!("{n}"))
            }
            Case::Reductions { n } => ("sum, sum of squares, amax".into(), format!("{n}")),
            Case::GemmAcc { m1, m2, n, k } => {
                ("gemm exact bf16 Wgrad, rows in two chunks (accumulate)".into(), format!("{m1}+{m2}x{n}x{k}"))
            }
            Case::GradSums => ("gradient sums of squares (f32 + e4m3, many tensors)".into(), "1..9000001".into()),
            Case::Adam { level, n, fp8_grad } => {
                (format!("adamw {level}{}", if *fp8_grad { " (e4m3 grad)" } else { "" }), format!("{n}"))
            }
        }
    }
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (ta, tb) in [("f32", "f32"), ("bf16", "bf16"), ("e4m3", "e4m3"), ("e5m2", "e4m3")] {
        for product in [Product::Forward, Product::Dgrad, Product::Wgrad] {
            for (m, n, k) in [(7, 13, 5), (64, 96, 130), (33, 65, 300)] {
                v.push(Case::Gemm { ta, tb, product, m, n, k });
            }
        }
    }
    // (GPUs: the backward in 32-row blocks, several rounds of rows each, a short last
    // block, 1, 2 and 4 column groups per thread (768, 2048, 4096 columns); 257 columns
    // take the row kernel and the separate sums; 3000 rows, trees in two passes.)
    v.extend(
        [(5, 40), (64, 64), (33, 257), (70, 768), (9, 2048), (4, 4096), (1000, 768), (100, 2048), (3000, 64)]
            .map(|(n, c)| Case::LayerNorm { n, c }),
    );
    v.extend([(125, 8), (241, 17), (64, 768)].map(|(rows, c)| Case::Gelu { rows, c, every_code: false }));
    v.push(Case::Gelu { rows: 64, c: 1024, every_code: true });
    v.extend([(125, 8), (241, 17), (33, 3072)].map(|(rows, c)| Case::Residual { rows, c }));
    v.extend([(2, 5, 20, 7), (4, 16, 64, 256), (8, 128, 96, 37)].map(|(b, t, c, v)| Case::Encoder { b, t, c, v }));
    // Head sizes 4 (one thread per query), 16, 64 and 128 (tiled, several key blocks).
    v.extend(
        [(2, 7, 12, 3), (1, 70, 32, 2), (4, 64, 64, 4), (2, 130, 128, 2), (1, 200, 256, 2)]
            .map(|(b, t, c, nh)| Case::Attention { b, t, c, nh }),
    );
    // More rows than a GPU has SMs too. The GPU's kernels by width: a row per block in
    // BF16 (v a multiple of 8, up to ~51k; 1000: a last chunk of 8), in f32 with
    // persistent blocks (up to ~55k, or v a multiple of 4 only: 1004, 52000), else the
    // plain one (50, 300000).
    v.extend(
        [(6, 50), (64, 256), (3, 5000), (5, 50304), (2, 300_000), (1000, 64), (300, 50304), (3, 1000), (7, 1004)]
            .into_iter()
            .chain([(4, 52000), (300, 52000)])
            .map(|(n, v)| Case::CrossEntropy { n, v, special: false }),
    );
    v.extend([(4, 50), (4, 1004), (4, 5000)].map(|(n, v)| Case::CrossEntropy { n, v, special: true }));
    // (GPUs: the trees over more than 64 and more than 4096 chunk partials take two and
    // three passes when their columns are few, one pass over 66 partials when they are
    // many.)
    v.extend(
        [(1000, 64), (33, 7), (2048, 96), (5000, 40), (140_000, 4), (2100, 4352)]
            .map(|(rows, cols)| Case::ColumnSums { rows, cols }),
    );
    v.push(Case::Casts { n: 100_003 });
    // One block, several blocks, and more than 1024 blocks (two tree passes).
    for n in [100_003, 9_000_001] {
        v.push(Case::Reductions { n });
    }
    v.push(Case::GradSums);
    v.push(Case::GemmAcc { m1: 70, m2: 33, n: 50, k: 24 });
    for level in ["f32", "O1", "O2"] {
        for fp8_grad in [false, true] {
            v.push(Case::Adam { level, n: 5001, fp8_grad });
        }
    }
    v
}

/// One operand's storage: exactly one buffer is present.
type Bufs<B> =
    (Option<<B as Backend>::Buf<f32>>, Option<<B as Backend>::Buf<bf16>>, Option<<B as Backend>::Buf<u8>>, Fp8Format);

/// `x` uploaded as an operand of type `t` (f32, bf16, e5m2, else e4m3; FP8 codes of
/// `x * 64`).
fn operand_bufs<B: Backend>(be: &B, x: &[f32], t: &str) -> BResult<Bufs<B>> {
    let e8 = |f: Fp8Format| x.iter().map(|&v| encode(f, v * 64.0, true)).collect::<Vec<u8>>();
    Ok(match t {
        "f32" => (Some(be.upload(x)?), None, None, Fp8Format::E4M3),
        "bf16" => (None, Some(be.upload(&x.iter().map(|&v| to_bf16(v)).collect::<Vec<_>>())?), None, Fp8Format::E4M3),
        "e5m2" => (None, None, Some(be.upload(&e8(Fp8Format::E5M2))?), Fp8Format::E5M2),
        _ => (None, None, Some(be.upload(&e8(Fp8Format::E4M3))?), Fp8Format::E4M3),
    })
}

/// The operand among the one present buffer (FP8 codes with the inverse scale `inv`).
fn pick<'a, B: Backend>(
    f: &'a Option<B::Buf<f32>>,
    h: &'a Option<B::Buf<bf16>>,
    q: &'a Option<B::Buf<u8>>,
    fmt: Fp8Format,
    inv: Scalar<'a, B>,
) -> Operand<'a, B> {
    if let Some(x) = f.as_ref() {
        Operand::F32(x)
    } else if let Some(x) = h.as_ref() {
        Operand::Bf16(x)
    } else {
        Operand::Fp8(q.as_ref().expect("one operand buffer"), fmt, inv)
    }
}

fn randn(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let mut x = vec![0f32; n];
    rng::fill_normal(seed, 11, 0, 0.0, std, &mut x);
    x
}

/// `randn` rounded to BF16 (the gradients that products store in BF16).
fn randn16(n: usize, seed: u64, std: f32) -> Vec<bf16> {
    randn(n, seed, std).into_iter().map(to_bf16).collect()
}

fn bits16<B: Backend>(be: &B, x: &B::Buf<bf16>) -> BResult<Vec<u32>> {
    Ok(be.download(x)?.iter().map(|v| v.to_bits() as u32).collect())
}

fn bits<B: Backend>(be: &B, x: &B::Buf<f32>) -> BResult<Vec<u32>> {
    Ok(be.download(x)?.iter().map(|v| v.to_bits()).collect())
}

/// `produce` run into each storage type of an activation output (`n` values): f32,
/// BF16, E4M3 codes (scale 8) and the amax the op reported with them.
fn act_rows<B: Backend>(
    be: &B,
    n: usize,
    mut produce: impl FnMut(ActOut<'_, B>) -> BResult<()>,
) -> BResult<Vec<(&'static str, Vec<u32>)>> {
    let mut y = be.zeros::<f32>(n)?;
    produce(ActOut::F32(&mut y))?;
    let mut h = be.zeros::<bf16>(n)?;
    produce(ActOut::Bf16(&mut h))?;
    // (The scale read from device memory, as the training step passes it.)
    let (mut q, mut amax, scale) = (be.zeros::<u8>(n)?, be.zeros::<u64>(2)?, be.upload(&[0.125f32, 8.0])?);
    produce(ActOut::E4m3(&mut q, Scalar::Dev(&scale, 1), Slot { buf: &mut amax, at: 1 }))?;
    Ok(vec![
        ("y", bits(be, &y)?),
        ("y bf16", be.download(&h)?.iter().map(|v| v.to_bits() as u32).collect()),
        ("y e4m3", be.download(&q)?.iter().map(|&v| v as u32).collect()),
        ("y amax slots", be.download(&amax)?.iter().map(|&v| v as u32).collect()),
    ])
}

/// Run one case on backend `be`; named outputs as bit patterns.
fn run_case<B: Backend>(be: &B, case: &Case) -> BResult<Vec<(&'static str, Vec<u32>)>> {
    Ok({
        match *case {
            Case::Gemm { ta, tb, product, m, n, k } => {
                let (ra, ca, rb, cb) = match product {
                    Product::Forward => (m, k, n, k),
                    Product::Dgrad => (m, n, n, k),
                    Product::Wgrad => (m, n, m, k),
                };
                let (xa, xb) = (randn(ra * ca, 1, 1.0), randn(rb * cb, 2, 1.0));
                let out_len = match product {
                    Product::Forward => m * n,
                    Product::Dgrad => m * k,
                    Product::Wgrad => n * k,
                };
                let mut out = be.zeros::<f32>(out_len)?;
                let (a32, a16, a8, fa) = operand_bufs(be, &xa, ta)?;
                let (b32, b16, b8, fb) = operand_bufs(be, &xb, tb)?;
                let op = pick::<B>;
                // FP8 operands' inverse scales from device memory (as the step's), each
                // 16-byte aligned as cuBLASLt needs: 1/4096 in all with the host's scale.
                let inv = be.upload(&[0.5f32, 0.0, 0.0, 0.0, 0.25])?;
                let (ia, ib) = (Scalar::Dev(&inv, 0), Scalar::Dev(&inv, 4));
                let scale = match (ta, a8.is_some() && b8.is_some()) {
                    ("f32", _) => 1.0,
                    (_, true) => 1.0 / 512.0,
                    _ => 1.0 / 4096.0,
                };
                let (a, b) = (op(&a32, &a16, &a8, fa, ia), op(&b32, &b16, &b8, fb, ib));
                be.matmul(&mut out, a, b, product, m, n, k, scale)?;
                // The same product stored in BF16 (the input gradients, the logits).
                let mut out16 = be.zeros::<bf16>(out_len)?;
                be.matmul_bf16(&mut out16, a, b, product, m, n, k, scale)?;
                vec![("out", bits(be, &out)?), ("out bf16", bits16(be, &out16)?)]
            }
            Case::GemmBias { ta, m, n, k, residual } => {
                let (xa, xb) = (randn(m * k, 1, 1.0), randn(n * k, 2, 1.0));
                let bias = be.upload(&randn(n, 28, 8.0))?;
                let (a32, a16, a8, fa) = operand_bufs(be, &xa, ta)?;
                let (b32, b16, b8, fb) = operand_bufs(be, &xb, ta)?;
                let op = pick::<B>;
                let mut scratch = be.zeros::<bf16>(m * n)?;
                let (a, b) = (op(&a32, &a16, &a8, fa, 1.0.into()), op(&b32, &b16, &b8, fb, 1.0.into()));
                if residual {
                    let (res, mut out) = (be.upload(&randn(m * n, 29, 30.0))?, be.zeros::<f32>(m * n)?);
                    be.matmul_bf16(&mut scratch, a, b, Product::Forward, m, n, k, 1.0 / 4096.0)?;
                    be.residual_forward(&mut out, &res, &scratch, &bias)?;
                    vec![("out", bits(be, &out)?)]
                } else {
                    let mut y = be.zeros::<bf16>(m * n)?;
                    be.matmul_bias_bf16(&mut y, a, b, m, n, k, 1.0 / 4096.0, &bias)?;
                    vec![("y", be.download(&y)?.iter().map(|v| v.to_f32().to_bits()).collect())]
                }
            }
            Case::LayerNorm { n, c } => {
                let (x, w, b, dy) = (
                    be.upload(&randn(n * c, 3, 2.0))?,
                    be.upload(&randn(c, 4, 1.0))?,
                    be.upload(&randn(c, 5, 1.0))?,
                    be.upload(&randn16(n * c, 6, 1.0))?,
                );
                let (mut mean, mut rstd, mut xhat) = (be.zeros(n)?, be.zeros(n)?, be.zeros::<bf16>(n * c)?);
                let mut outs = act_rows(be, n * c, |y| {
                    be.layernorm_forward(y, &mut xhat, &mut mean, &mut rstd, &x, &w, &b, n, c)
                })?;
                let (mut dx, mut dw, mut db) = (be.zeros(n * c)?, be.zeros(c)?, be.zeros(c)?);
                be.layernorm_backward(&mut dx, false, &mut dw, &mut db, &dy, &xhat, &w, &rstd, n, c)?;
                let mut dacc = be.upload(&randn(n * c, 26, 1.0))?;
                be.layernorm_backward(&mut dacc, true, &mut dw, &mut db, &dy, &xhat, &w, &rstd, n, c)?;
                outs.push(("dx (accumulated)", bits(be, &dacc)?));
                outs.extend([
                    ("xhat", be.download(&xhat)?.iter().map(|v| v.to_bits() as u32).collect()),
                    ("mean", bits(be, &mean)?),
                    ("rstd", bits(be, &rstd)?),
                    ("dx", bits(be, &dx)?),
                    ("dw", bits(be, &dw)?),
                    ("db", bits(be, &db)?),
                ]);
                outs
            }
            Case::Gelu { rows, c, every_code } => {
                let n = rows * c;
                let dy = be.upload(&randn16(n, 8, 1.0))?;
                let mut x = be.zeros::<bf16>(n)?;
                let mut outs = Vec::new();
                if every_code {
                    // Every BF16 code of magnitude below 2^60 once (subnormals, both
                    // signs); the others (NaN, infinities, |v| >= 2^64 where v * v
                    // overflows and the derivative is inf * 0) become 0: their results are
                    // NaN, whose sign and payload x86 and GPUs write differently, which the
                    // contract leaves unspecified (ARCHITECTURE.md).
                    let code = |i: usize| bf16::from_bits(i as u16);
                    let small = |v: bf16| v.to_f32().abs() < 2f32.powi(60);
                    let codes: Vec<bf16> =
                        (0..n).map(|i| if small(code(i)) { code(i) } else { bf16::from_bits(0) }).collect();
                    x = be.upload(&codes)?;
                } else {
                    // The pre-activation as the model stores it: bf16(product + bias).
                    let x32 = be.upload(&randn(n, 7, 3.0))?;
                    let bias = be.upload(&randn(c, 9, 1.0))?;
                    be.cast_bf16_bias(&mut x, &x32, &bias)?;
                    outs.push(("x (bf16 of x + bias)", be.download(&x)?.iter().map(|v| v.to_bits() as u32).collect()));
                }
                let mut x8 = be.zeros::<u8>(n)?;
                outs.extend(act_rows(be, n, |y| be.gelu_forward(y, &x, Some(&mut x8)))?);
                outs.push(("x e4m3 (scale 1)", be.download(&x8)?.iter().map(|&v| v as u32).collect()));
                let mut dx = be.zeros(n)?;
                be.gelu_backward(GradOut::F32(&mut dx), GeluIn::Bf16(&x), &dy, c)?;
                outs.push(("dx", bits(be, &dx)?));
                be.gelu_backward(GradOut::F32(&mut dx), GeluIn::E4m3(&x8), &dy, c)?;
                outs.push(("dx (e4m3 x)", bits(be, &dx)?));
                // Straight into the next layer's forms: bias sums + BF16, bias sums + E5M2
                // (a scale that saturates the largest gradients, so the count is tested).
                let (mut db, mut q) = (be.zeros(c)?, be.zeros::<bf16>(n)?);
                be.gelu_backward(GradOut::Bf16 { db: &mut db, q: &mut q }, GeluIn::Bf16(&x), &dy, c)?;
                outs.push(("db (with bf16 dx)", bits(be, &db)?));
                outs.push(("dx bf16", be.download(&q)?.iter().map(|v| v.to_bits() as u32).collect()));
                let (mut db, mut q) = (be.zeros(c)?, be.zeros::<u8>(n)?);
                let s = be.upload(&[16384.0f32])?;
                // The BF16 input, then the FP8 levels' form (the E4M3 input), straight into
                // E5M2 with the sums.
                let forms = [
                    (GeluIn::Bf16(&x), ["db (with e5m2 dx)", "dx e5m2", "amax, saturated slots"]),
                    (GeluIn::E4m3(&x8), ["db (e4m3 x, e5m2 dx)", "dx e5m2 (e4m3 x)", "amax, saturated slots (e4m3 x)"]),
                ];
                for (input, [db_name, dx_name, stats_name]) in forms {
                    let mut st = be.zeros::<u64>(2)?;
                    let stats = Slot { buf: &mut st, at: 0 };
                    let fp8 =
                        GradOut::Fp8 { db: &mut db, q: &mut q, fmt: Fp8Format::E5M2, scale: Scalar::Dev(&s, 0), stats };
                    be.gelu_backward(fp8, input, &dy, c)?;
                    outs.push((db_name, bits(be, &db)?));
                    outs.push((dx_name, be.download(&q)?.iter().map(|&v| v as u32).collect()));
                    outs.push((stats_name, be.download(&st)?.iter().map(|&v| v as u32).collect()));
                }
                outs
            }
            Case::Residual { rows, c } => {
                let n = rows * c;
                let (res, x, bias) =
                    (be.upload(&randn(n, 23, 2.0))?, be.upload(&randn16(n, 24, 1.0))?, be.upload(&randn(c, 25, 1.0))?);
                let mut out = be.zeros(n)?;
                be.residual_forward(&mut out, &res, &x, &bias)?;
                vec![("out", bits(be, &out)?)]
            }
            Case::Encoder { b, t, c, v } => {
                let toks: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % v) as u32).collect();
                let tokens = be.upload(&toks)?;
                let (wte, wpe, dout) = (
                    be.upload(&randn(v * c, 9, 1.0))?,
                    be.upload(&randn(t * c, 10, 1.0))?,
                    be.upload(&randn(b * t * c, 11, 1.0))?,
                );
                let mut out = be.zeros(b * t * c)?;
                be.encoder_forward(&mut out, &tokens, EmbedTable::F32(&wte), &wpe, b, t, c)?;
                // From FP16 master codes and their scale, as an FP16 token embedding is read.
                let codes: Vec<f16> = randn(v * c, 9, 1.0).iter().map(|&x| to_f16(x * 1024.0)).collect();
                let (h, mut out16) = (be.upload(&codes)?, be.zeros(b * t * c)?);
                let inv = be.upload(&[1024.0f32, 1.0 / 1024.0])?;
                be.encoder_forward(&mut out16, &tokens, EmbedTable::F16(&h, Scalar::Dev(&inv, 1)), &wpe, b, t, c)?;
                let (mut dwte, mut dwpe) = (be.upload(&randn(v * c, 12, 1.0))?, be.zeros(t * c)?);
                be.encoder_backward(&mut dwte, &mut dwpe, &dout, &tokens, &toks, b, t, c)?;
                vec![
                    ("out", bits(be, &out)?),
                    ("out (fp16 table)", bits(be, &out16)?),
                    ("dwte", bits(be, &dwte)?),
                    ("dwpe", bits(be, &dwpe)?),
                ]
            }
            Case::Attention { b, t, c, nh } => {
                let s = AttnShape { b, t, c, nh };
                let q32 = be.upload(&randn(b * t * 3 * c, 13, 1.0))?;
                let bias = be.upload(&randn(3 * c, 27, 0.5))?;
                let mut qkv = be.zeros::<bf16>(b * t * 3 * c)?;
                be.cast_bf16_bias(&mut qkv, &q32, &bias)?;
                let dout = be.upload(&randn16(b * t * c, 14, 1.0))?;
                let (mut out, mut stats) = (be.zeros(b * t * c)?, be.zeros(b * nh * t * 2)?);
                be.attention_forward(&mut out, &mut stats, &qkv, s)?;
                let mut dqkv = be.zeros(b * t * 3 * c)?;
                be.attention_backward(&mut dqkv, &dout, &qkv, &out, &stats, s)?;
                // The output and dqkv are BF16: compared as their f32 widenings (the flash
                // rows by value).
                let wide = |x: Vec<bf16>| -> Vec<u32> { x.iter().map(|v| v.to_f32().to_bits()).collect() };
                let (out, dqkv) = (wide(be.download(&out)?), wide(be.download(&dqkv)?));
                vec![("out", out), ("stats", bits(be, &stats)?), ("dqkv", dqkv)]
            }
            Case::CrossEntropy { n, v, special } => {
                let mut l16 = randn16(n * v, 15, 3.0);
                if special {
                    for (r, x) in [f32::INFINITY, f32::NAN, f32::NEG_INFINITY].into_iter().enumerate() {
                        l16[r * v + (7 * r + 3) % v] = to_bf16(x);
                    }
                }
                // (A NaN loss's payload is the hardware's: x86 and GPUs write different NaNs.)
                let bits = |be: &B, x: &B::Buf<f32>| -> BResult<Vec<u32>> {
                    Ok(bits(be, x)?
                        .into_iter()
                        .map(|b| if f32::from_bits(b).is_nan() { 0x7fc0_0000 } else { b })
                        .collect())
                };
                let targets = be.upload(&(0..n).map(|i| ((i * 13) % v) as u32).collect::<Vec<_>>())?;
                let mut only = be.zeros(n)?;
                let mut logits = be.upload(&l16)?;
                be.crossentropy(&mut only, &mut logits, false, &targets, LossGrad::none(), n, v)?;
                let kept = be.download(&logits)? == l16;
                // With the gradient, written over the logits.
                let mut losses = be.zeros(n)?;
                // dloss = mu / rows with mu in device memory, as the step's controller has it.
                let mu = be.upload(&[0.375f32])?;
                let dloss = LossGrad { mu: Scalar::Dev(&mu, 0), rows: 3.0 };
                be.crossentropy(&mut losses, &mut logits, true, &targets, dloss, n, v)?;
                vec![
                    ("losses", bits(be, &losses)?),
                    ("dlogits (bf16, over the logits)", bits16(be, &logits)?),
                    ("losses (no grad)", bits(be, &only)?),
                    ("logits kept without grad", vec![u32::from(kept)]),
                ]
            }
            Case::ColumnSums { rows, cols } => {
                let x = be.upload(&randn(rows * cols, 16, 1.0))?;
                let mut out = be.zeros(cols)?;
                be.column_sums(&mut out, &x, rows, cols)?;
                // With the output gradient's E5M2 cast in the same pass.
                let (mut out2, mut q, mut st) = (be.zeros(cols)?, be.zeros::<u8>(rows * cols)?, be.zeros::<u64>(2)?);
                be.column_sums_cast(
                    &mut out2,
                    &mut q,
                    &x,
                    rows,
                    cols,
                    Fp8Format::E5M2,
                    8192.0.into(),
                    Slot { buf: &mut st, at: 0 },
                )?;
                // With the BF16 copy instead (the bf16 level).
                let (mut out3, mut h) = (be.zeros(cols)?, be.zeros::<bf16>(rows * cols)?);
                be.column_sums_cast_bf16(&mut out3, &mut h, &x, rows, cols)?;
                // Of BF16 values (attention's dqkv), alone and with the E5M2 cast.
                let (mut out4, mut out5) = (be.zeros(cols)?, be.zeros(cols)?);
                be.column_sums_bf16(&mut out4, &h, rows, cols)?;
                let (mut q2, mut st2) = (be.zeros::<u8>(rows * cols)?, be.zeros::<u64>(2)?);
                let slot = Slot { buf: &mut st2, at: 0 };
                let s = be.upload(&[8192.0f32])?;
                let s = Scalar::Dev(&s, 0);
                be.column_sums_cast_from_bf16(&mut out5, &mut q2, &h, rows, cols, Fp8Format::E5M2, s, slot)?;
                vec![
                    ("sums of bf16", bits(be, &out4)?),
                    ("sums of bf16 (with cast)", bits(be, &out5)?),
                    ("e5m2 of bf16", be.download(&q2)?.iter().map(|&c| c as u32).collect()),
                    ("amax, saturated slots (bf16)", be.download(&st2)?.iter().map(|&v| v as u32).collect()),
                    ("sums", bits(be, &out)?),
                    ("sums (with cast)", bits(be, &out2)?),
                    ("sums (with bf16 copy)", bits(be, &out3)?),
                    ("bf16 copy", be.download(&h)?.iter().map(|v| u32::from(v.to_bits())).collect()),
                    ("e5m2", be.download(&q)?.iter().map(|&c| c as u32).collect()),
                    ("amax, saturated slots", be.download(&st)?.iter().map(|&v| v as u32).collect()),
                ]
            }
            Case::Casts { n } => {
                let mut host = randn(n, 17, 100.0);
                host[5] = f32::NAN;
                host[6] = 1e30;
                host[7] = -f32::INFINITY;
                let x = be.upload(&host)?;
                let mut outs = Vec::new();
                for (name, fmt) in [("e4m3", Fp8Format::E4M3), ("e5m2", Fp8Format::E5M2)] {
                    let mut q = be.zeros::<u8>(n)?;
                    let st = be.cast_fp8(&mut q, &x, fmt, 4.0)?;
                    let mut back = be.zeros::<f32>(n)?;
                    be.decode_fp8(&mut back, &q, fmt, 0.25)?;
                    outs.push((name, be.download(&q)?.iter().map(|&c| c as u32).collect()));
                    outs.push(("decoded", bits(be, &back)?));
                    outs.push(("amax, saturated", vec![st.amax.to_bits(), st.saturated as u32]));
                }
                let mut hb = be.zeros::<bf16>(n)?;
                be.cast_bf16(&mut hb, &x)?;
                outs.push(("bf16", be.download(&hb)?.iter().map(|h| h.to_bits() as u32).collect()));
                // Many at once (the bf16 level's weight views): the tensor (its length not a
                // multiple of 4: the per-element tail) and another.
                let tail = be.upload(&host[3..])?;
                let (mut m0, mut m1) = (be.zeros::<bf16>(n)?, be.zeros::<bf16>(n - 3)?);
                be.cast_bf16_many(vec![(&mut m0, &x), (&mut m1, &tail)])?;
                outs.push(("bf16, many", bits16(be, &m0)?.into_iter().chain(bits16(be, &m1)?).collect()));
                // From BF16 values (the attention output): widened, and cast to E4M3
                // with its statistics in slots.
                let mut wide = be.zeros::<f32>(n)?;
                be.widen_bf16(&mut wide, &hb)?;
                outs.push(("bf16 widened", bits(be, &wide)?));
                let (mut q, mut st) = (be.zeros::<u8>(n)?, be.zeros::<u64>(2)?);
                be.cast_fp8_bf16_to(&mut q, &hb, Fp8Format::E4M3, 4.0.into(), Slot { buf: &mut st, at: 0 })?;
                outs.push(("bf16 -> e4m3", be.download(&q)?.iter().map(|&c| c as u32).collect()));
                outs.push(("its amax, saturated slots", be.download(&st)?.iter().map(|&v| v as u32).collect()));
                let mut hh = be.zeros::<f16>(n)?;
                be.cast_f16(&mut hh, &x, 8.0)?;
                let mut back = be.zeros::<f32>(n)?;
                be.decode_f16(&mut back, &hh, 0.125.into())?;
                outs.push(("f16", be.download(&hh)?.iter().map(|h| h.to_bits() as u32).collect()));
                outs.push(("f16 decoded", bits(be, &back)?));
                let mut hb16 = be.zeros::<bf16>(n)?;
                let inv = be.upload(&[8.0f32, 0.125])?;
                be.cast_bf16_from_f16(&mut hb16, &hh, Scalar::Dev(&inv, 1))?;
                outs.push(("f16 -> bf16", be.download(&hb16)?.iter().map(|h| h.to_bits() as u32).collect()));
                // Just-in-time casts (scale worked out on the device from the amax):
                // a weight view from its FP16 master, a gradient from f32; with and
                // without a NaN (which keeps the previous scale).
                let slots = |s: Vec<u64>| s.iter().map(|&v| v as u32).collect::<Vec<u32>>();
                let finite: Vec<f32> = host.iter().map(|&v| if v.is_finite() { v } else { 1.5 }).collect();
                let xf = be.upload(&finite)?;
                let mut hf = be.zeros::<f16>(n)?;
                be.cast_f16(&mut hf, &xf, 8.0)?;
                let mut st = be.zeros::<u64>(8)?;
                // Each cast's scale slot starts at [4, 0.25] (the previous scale, which a
                // NaN keeps) and ends with the inverse and the scale it used.
                let mut scales = be.upload(&[4.0f32, 0.25].repeat(5))?;
                for (k, (name, src)) in [
                    ("jit f16 -> e4m3", JitSrc::F16(&hf, Scalar::Dev(&inv, 1))),
                    ("jit f16 (NaN) -> e4m3", JitSrc::F16(&hh, 0.125.into())),
                    ("jit f32 -> e4m3", JitSrc::F32(&xf)),
                    ("jit f32 (NaN) -> e4m3", JitSrc::F32(&x)),
                ]
                .into_iter()
                .enumerate()
                {
                    let mut q = be.zeros::<u8>(n)?;
                    let scale = ScaleSlot { buf: &mut scales, at: 2 * k };
                    be.cast_fp8_jit(&mut q, src, Fp8Format::E4M3, scale, Slot { buf: &mut st, at: k })?;
                    outs.push((name, be.download(&q)?.iter().map(|&c| c as u32).collect()));
                }
                outs.push(("jit scales and inverses", bits(be, &scales)?));
                let mut q = be.zeros::<u8>(n)?;
                be.cast_fp8_to(&mut q, &xf, Fp8Format::E5M2, 1e-3.into(), Slot { buf: &mut st, at: 4 })?;
                outs.push(("e5m2 (stats in slots)", be.download(&q)?.iter().map(|&c| c as u32).collect()));
                be.amax_to(&x, Slot { buf: &mut st, at: 6 })?;
                outs.push(("amaxes and counts in slots", slots(be.download(&st)?)));
                // The same four just-in-time casts in one batch (cast_fp8_jit_many),
                // plus a tensor of 7 values (one partial chunk, no vector accesses).
                let tail = be.upload(&finite[..7])?;
                let (mut q0, mut q1, mut q2, mut q3) = (be.zeros(n)?, be.zeros(n)?, be.zeros(n)?, be.zeros(n)?);
                let mut q4 = be.zeros::<u8>(7)?;
                let mut st2 = be.zeros::<u64>(5)?;
                let mut sc: Vec<B::Buf<f32>> = (0..5).map(|_| be.upload(&[4.0f32, 0.25])).collect::<BResult<_>>()?;
                let [s0, s1, s2, s3, s4] = &mut sc[..] else { unreachable!("five scale slots") };
                let slot = |buf| ScaleSlot { buf, at: 0 };
                let items = vec![
                    (&mut q0, JitSrc::F16(&hf, Scalar::Dev(&inv, 1)), slot(s0), 0),
                    (&mut q1, JitSrc::F16(&hh, 0.125.into()), slot(s1), 1),
                    (&mut q2, JitSrc::F32(&xf), slot(s2), 2),
                    (&mut q3, JitSrc::F32(&x), slot(s3), 3),
                    (&mut q4, JitSrc::F32(&tail), slot(s4), 4),
                ];
                be.cast_fp8_jit_many(items, Fp8Format::E4M3, &mut st2)?;
                let mut all = Vec::new();
                for s in &sc {
                    all.extend(bits(be, s)?);
                }
                outs.push(("jit many: scales and inverses", all));
                for (name, q) in [("jit many: f16", &q0), ("f16 (NaN)", &q1), ("f32", &q2), ("f32 (NaN)", &q3)] {
                    outs.push((name, be.download(q)?.iter().map(|&c| c as u32).collect()));
                }
                outs.push(("jit many: 7 values", be.download(&q4)?.iter().map(|&c| c as u32).collect()));
                outs.push(("jit many: amax slots", slots(be.download(&st2)?)));
                let h7 = be.upload(&be.download(&hf)?[..7])?;
                let (mut d0, mut d1) = (be.zeros::<f32>(n)?, be.zeros::<f32>(7)?);
                be.decode_f16_many(vec![(&mut d0, &hf, Scalar::Dev(&inv, 1)), (&mut d1, &h7, 0.5.into())])?;
                outs.push(("f16 decoded, many", bits(be, &d0)?));
                outs.push(("f16 decoded, many (7 values)", bits(be, &d1)?));
                let mut st3 = be.zeros::<u64>(3)?;
                be.amax_many(vec![(&x, 0), (&xf, 1), (&tail, 2)], &mut st3)?;
                outs.push(("amax many (with a NaN, without, 7 values)", slots(be.download(&st3)?)));
                outs
            }
            Case::Reductions { n } => {
                let mut host = randn(n, 18, 5.0);
                let x = be.upload(&host)?;
                let sums = vec![be.sum_sq(&x)?.to_bits(), be.mean(&x)?.to_bits(), be.amax(&x)?.to_bits()];
                host[n / 2] = f32::NAN;
                let with_nan = be.upload(&host)?;
                vec![("sum_sq, mean, amax", sums), ("amax with a NaN", vec![be.amax(&with_nan)?.to_bits()])]
            }
            Case::GemmAcc { m1, m2, n, k } => {
                let b16 = |x: Vec<f32>| x.iter().map(|&v| to_bf16(v)).collect::<Vec<_>>();
                let (dy, x) = (b16(randn((m1 + m2) * n, 40, 1.0)), b16(randn((m1 + m2) * k, 41, 1.0)));
                let (dy1, dy2) = (be.upload(&dy[..m1 * n])?, be.upload(&dy[m1 * n..])?);
                let (x1, x2) = (be.upload(&x[..m1 * k])?, be.upload(&x[m1 * k..])?);
                let mut out = be.zeros::<f32>(n * k)?;
                be.matmul(&mut out, Operand::Bf16(&dy1), Operand::Bf16(&x1), Product::Wgrad, m1, n, k, 1.0)?;
                be.matmul_acc(&mut out, Operand::Bf16(&dy2), Operand::Bf16(&x2), Product::Wgrad, m2, n, k)?;
                vec![("dw", bits(be, &out)?)]
            }
            Case::GradSums => {
                let sizes = [1usize, 7, 8192, 8193, 100_003, 9_000_001, 300];
                let mut f32s = Vec::new();
                let mut codes = Vec::new();
                for (k, &n) in sizes.iter().enumerate() {
                    let x = randn(n, 30 + k as u64, 0.01);
                    let q: Vec<u8> = x.iter().map(|&v| encode(Fp8Format::E4M3, v * 4096.0, true)).collect();
                    codes.push(be.upload(&q)?);
                    f32s.push(be.upload(&x)?);
                }
                let mut grads = Vec::new();
                let inv = be.upload(&[4096.0f32, 1.0 / 4096.0])?;
                for (k, (x, q)) in f32s.iter().zip(&codes).enumerate() {
                    grads.push(if k % 2 == 0 { GradRef::F32(x) } else { GradRef::Fp8(q, Scalar::Dev(&inv, 1)) });
                    grads.push(if k % 2 == 0 { GradRef::Fp8(q, (1.0 / 4096.0).into()) } else { GradRef::F32(x) });
                }
                // Left on the device (the step's norm), then the step controller over them.
                let mut on_device = be.zeros::<f32>(grads.len())?;
                be.grad_sq_sums_to(&grads, &mut on_device)?;
                let mut ctl = be.upload(&fp8sim::ops::adamw::control_words(1024.0, 99_999, 2, 0.9, 0.95))?;
                let c = StepControl {
                    grad_clip: 0.5,
                    ranks: 2.0,
                    beta1: 0.9,
                    beta2: 0.95,
                    mu_growth_interval: 3,
                    mu_min: 1.0,
                    mu_max: 65536.0,
                };
                be.step_control(&mut ctl, &on_device, &c)?;
                let after_one = bits(be, &ctl)?;
                be.step_control(&mut ctl, &on_device, &c)?;
                // The step's end: the mean loss into a controller word, the overflow flag
                // of amax slots with and without a NaN, delayed scaling of three tensors
                // (window 2: the window wraps) over three steps, a NaN and an infinity
                // among the amaxes (not recorded).
                let mut words = be.zeros::<f32>(4)?;
                be.mean_to(&f32s[0], &mut words, 1)?;
                let amaxes = |a: [f32; 3]| a.map(amax_slot_bits).to_vec();
                let (clean, bad) = (be.upload(&amaxes([1.0, 3.5, 1e-3]))?, be.upload(&amaxes([1.0, f32::NAN, 2.0]))?);
                let all = be.upload(&[0u32, 1, 2])?;
                be.flag_nonfinite(&mut words, 2, &clean, &all)?;
                be.flag_nonfinite(&mut words, 3, &bad, &all)?;
                let (mut hist, mut rec) = (be.zeros::<f32>(6)?, be.zeros::<u32>(3)?);
                let mut dscales = be.upload(&[1.0f32; 3 * crate::backend::SCALE_STRIDE])?;
                let dslots = be.upload(&[2u32, DELAYED_E5M2, 1])?;
                for a in [[1.0, 3.5, 1e-3], [1.0, f32::NAN, 2.0], [0.25, f32::INFINITY, 7.0]] {
                    let stats = be.upload(&amaxes(a))?;
                    let d = Delayed {
                        hist: &mut hist,
                        recorded: &mut rec,
                        scales: &mut dscales,
                        slots: &dslots,
                        window: 2,
                    };
                    be.delayed_scaling_update(d, &stats)?;
                }
                vec![
                    ("sums", be.grad_sq_sums(&grads)?.iter().map(|v| v.to_bits()).collect()),
                    ("mean, overflow flags", bits(be, &words)?),
                    (
                        "delayed scaling: windows, counts, scales",
                        [bits(be, &hist)?, be.download(&rec)?, bits(be, &dscales)?].concat(),
                    ),
                    ("sums on the device", bits(be, &on_device)?),
                    ("step control words (one step, then two)", after_one.into_iter().chain(bits(be, &ctl)?).collect()),
                ]
            }
            Case::Adam { level, n, fp8_grad } => {
                let h = AdamStep::new(1e-3, 0.9, 0.95, 1e-8, 0.1, 3, 0.5);
                let g = randn(n, 19, 0.01);
                let gq: Vec<u8> = g.iter().map(|&v| encode(Fp8Format::E4M3, v * 8192.0, true)).collect();
                let (g32, g8, ginv) = (be.upload(&g)?, be.upload(&gq)?, be.upload(&[1.0f32 / 8192.0, 8192.0])?);
                let grad = || if fp8_grad { GradRef::Fp8(&g8, Scalar::Dev(&ginv, 0)) } else { GradRef::F32(&g32) };
                let p0 = randn(n, 20, 0.02);
                let (m0, v0) = (randn(n, 21, 0.001), randn(n, 22, 1e-6).iter().map(|x| x.abs()).collect::<Vec<_>>());
                // Three steps: the host's constants; a step controller's (its bias
                // corrections and multiplier); the controller marking an overflow (a no-op).
                let mut w = fp8sim::ops::adamw::control_words(1.0, 4, 0, 0.9, 0.95);
                w[fp8sim::ops::adamw::ctl::GRAD_SCALE] = 0.25;
                let ctl = be.upload(&w)?;
                w[fp8sim::ops::adamw::ctl::OVERFLOW] = 1.0;
                let skip = be.upload(&w)?;
                let ctls = [None, Some(&ctl), Some(&skip)];
                let mut outs = Vec::new();
                let mut last = Vec::new();
                let mut unchanged = true;
                let mut keep = |state: Vec<u32>, k: usize| {
                    if k == 2 {
                        unchanged &= state == last;
                    }
                    last = state.clone();
                    state
                };
                match level {
                    "f32" => {
                        let (mut p, mut m, mut v) = (be.upload(&p0)?, be.upload(&m0)?, be.upload(&v0)?);
                        for (k, c) in ctls.into_iter().enumerate() {
                            be.adamw(AdamState::F32 { master: &mut p, m: &mut m, v: &mut v }, grad(), &h, c)?;
                            let all = [bits(be, &p)?, bits(be, &m)?, bits(be, &v)?].concat();
                            outs.push((["p, m, v", "p, m, v (controller)", "p, m, v (skipped)"][k], keep(all, k)));
                        }
                    }
                    "O1" => {
                        let mut p = be.upload(&p0.iter().map(|&x| to_f16(x * 1024.0)).collect::<Vec<_>>())?;
                        let (mut ps, mut m, mut v) =
                            (be.upload(&[1.0f32 / 1024.0, 1024.0])?, be.upload(&m0)?, be.upload(&v0)?);
                        for (k, c) in ctls.into_iter().enumerate() {
                            let state = AdamState::O1 { master: &mut p, master_scale: &mut ps, m: &mut m, v: &mut v };
                            be.adamw(state, grad(), &h, c)?;
                            let pb: Vec<u32> = be.download(&p)?.iter().map(|x| x.to_bits() as u32).collect();
                            let all = [pb, bits(be, &ps)?, bits(be, &m)?, bits(be, &v)?].concat();
                            let names = ["p, scale, m, v", "p, scale, m, v (controller)", "p, scale, m, v (skipped)"];
                            outs.push((names[k], keep(all, k)));
                        }
                    }
                    _ => {
                        let mut p = be.upload(&p0.iter().map(|&x| to_f16(x * 1024.0)).collect::<Vec<_>>())?;
                        let mut m = be.upload(
                            &m0.iter().map(|&x| encode(Fp8Format::E4M3, x * 65536.0, true)).collect::<Vec<_>>(),
                        )?;
                        let mut v = be.upload(&v0.iter().map(|&x| to_f16(x * 1e9)).collect::<Vec<_>>())?;
                        let mut ps = be.upload(&[1.0f32 / 1024.0, 1024.0])?;
                        let mut mvs = be.upload(&[1.0f32 / 65536.0, 65536.0, 1e-9, 1e9])?;
                        for (k, c) in ctls.into_iter().enumerate() {
                            let state = AdamState::O2 {
                                master: &mut p,
                                master_scale: &mut ps,
                                m: &mut m,
                                v: &mut v,
                                moment_scales: &mut mvs,
                            };
                            be.adamw(state, grad(), &h, c)?;
                            let pb: Vec<u32> = be.download(&p)?.iter().map(|x| x.to_bits() as u32).collect();
                            let mb: Vec<u32> = be.download(&m)?.iter().map(|&x| x as u32).collect();
                            let vb: Vec<u32> = be.download(&v)?.iter().map(|x| x.to_bits() as u32).collect();
                            let all = [pb, mb, vb, bits(be, &ps)?, bits(be, &mvs)?].concat();
                            let names =
                                ["p, m, v, scales", "p, m, v, scales (controller)", "p, m, v, scales (skipped)"];
                            outs.push((names[k], keep(all, k)));
                        }
                    }
                }
                outs.push(("a skipped step changed nothing", vec![u32::from(unchanged)]));
                outs
            }
        }
    })
}

/// The fused cast + transpose against the simulator's.
fn verify_cast_transpose(gpu: &Cuda) -> BResult<Vec<Row>> {
    Ok({
        let mut rows = Vec::new();
        for (r, c) in [(1, 1), (100, 33), (257, 129), (1024, 768)] {
            for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
                let t = std::time::Instant::now();
                let mut x = randn(r * c, 23, 50.0);
                x[0] = f32::NAN;
                let want = fp8sim::ops::cast_transpose::cast_transpose(&x, r, c, fmt, 4.0);
                let (q, qt, amax) = gpu.cast_transpose(&gpu.upload(&x)?, r, c, fmt, 4.0)?;
                let (q, qt) = (gpu.download(&q)?, gpu.download(&qt)?);
                let mut mismatches = q.iter().zip(&want.q.codes).filter(|(a, b)| a != b).count() as u64;
                mismatches += qt.iter().zip(&want.qt.codes).filter(|(a, b)| a != b).count() as u64;
                mismatches += u64::from(amax.to_bits() != want.amax.to_bits());
                rows.push(Row {
                    op: format!("cast-transpose {fmt} [{r}x{c}]"),
                    inputs: 2 * q.len() as u64 + 1,
                    class: "exact",
                    mismatches,
                    first: None,
                    seconds: t.elapsed().as_secs_f64(),
                });
            }
        }
        rows
    })
}

/// Every op on both backends: rows of (op, shape, outputs, mismatching elements).
fn verify_ops(gpu: &Cuda) -> BResult<Vec<Row>> {
    Ok({
        let mut rows = verify_cast_transpose(gpu)?;
        for case in cases().iter() {
            let t = std::time::Instant::now();
            let (op, shape) = case.describe();
            let (want, got) = (run_case(&Sim, case)?, run_case(gpu, case)?);
            let mut mismatches = 0u64;
            let mut first = None;
            let mut inputs = 0u64;
            for ((name, w), (_, g)) in want.iter().zip(&got) {
                inputs += w.len() as u64;
                for (i, (a, b)) in w.iter().zip(g).enumerate() {
                    if a != b {
                        mismatches += 1;
                        first.get_or_insert_with(|| format!("{name}[{i}]: gpu {b:#010x}, sim {a:#010x}"));
                    }
                }
                if w.len() != g.len() {
                    mismatches += 1;
                }
            }
            rows.push(Row {
                op: format!("{op} [{shape}]"),
                inputs,
                class: "exact",
                mismatches,
                first,
                seconds: t.elapsed().as_secs_f64(),
            });
        }
        rows
    })
}

/// Relative Frobenius error of `got` against `exact` (sums in f64, in element order).
fn rel_frobenius(exact: &[f32], got: &[f32]) -> f64 {
    let num: f64 = exact.iter().zip(got).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
    let den: f64 = exact.iter().map(|a| (*a as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Bit patterns as f32 values.
fn floats(bits: &[u32]) -> Vec<f32> {
    bits.iter().map(|&b| f32::from_bits(b)).collect()
}

/// Relative Frobenius error bound of the fast class (cuBLASLt, fast accumulation off)
/// against the exact class. Measured on an H200: see the README.
pub const FAST_BOUND: f64 = 1e-3;

/// The fast GEMM (cuBLASLt) against the exact one: relative Frobenius error.
fn verify_fast(fast: &Cuda) -> BResult<Vec<Row>> {
    fast.report_fast_amax(true);
    Ok({
        let mut rows = Vec::new();
        for (ta, tb, product) in [
            ("e4m3", "e4m3", Product::Forward),
            ("e5m2", "e4m3", Product::Dgrad),
            ("e5m2", "e4m3", Product::Wgrad),
            ("bf16", "bf16", Product::Forward),
            ("bf16", "bf16", Product::Dgrad),
            ("bf16", "bf16", Product::Wgrad),
        ] {
            for (m, n, k) in [(1024, 256, 64), (1024, 768, 3072)] {
                let t = std::time::Instant::now();
                let case = Case::Gemm { ta, tb, product, m, n, k };
                let exact = floats(&run_case(&Sim, &case)?[0].1);
                let before = fast.fast_fallbacks();
                let got = floats(&run_case(fast, &case)?[0].1);
                let fell_back = fast.fast_fallbacks() > before;
                let out_amax = got.iter().fold(0f32, |m, v| m.max(v.abs()));
                let amax_note = match fast.last_fast_amax() {
                    Some(a) if ta != "bf16" => format!("; output amax from cuBLASLt {a:.6e} vs {out_amax:.6e}"),
                    _ => String::new(),
                };
                let amax_bad =
                    matches!(fast.last_fast_amax(), Some(a) if ta != "bf16" && a.to_bits() != out_amax.to_bits());
                let rel = rel_frobenius(&exact, &got);
                rows.push(Row {
                    op: format!("gemm fast (cuBLASLt) {ta} x {tb} {product:?} [{m}x{n}x{k}]"),
                    inputs: exact.len() as u64,
                    class: "fast",
                    mismatches: u64::from(fell_back || amax_bad || rel.is_nan() || rel > FAST_BOUND),
                    first: Some(if fell_back {
                        "cuBLASLt had no algorithm: ran the exact kernel".to_string()
                    } else {
                        format!("relative Frobenius error {rel:.2e} (bound {FAST_BOUND:.0e}){amax_note}")
                    }),
                    seconds: t.elapsed().as_secs_f64(),
                });
            }
        }
        rows
    })
}

/// Bound of the fast BF16-output product with the bias in cuBLASLt's epilogue (the bias
/// rounded to BF16, the output rounded once more) against the exact product +
/// `cast_bf16_bias`. Measured on an H200: see the README.
pub const FAST_BF16_BOUND: f64 = 1e-2;

/// The fast products in their model forms (QKV / MLP-up: BF16 out + bias in the
/// epilogue; projections: then the residual add + bias) against the simulator's exact
/// definitions.
fn verify_fast_epilogues(fast: &Cuda) -> BResult<Vec<Row>> {
    Ok({
        let mut rows = Vec::new();
        for (ta, residual) in [("e4m3", false), ("bf16", false), ("e4m3", true), ("bf16", true)] {
            for (m, n, k) in [(1024, 2304, 768), (320, 96, 64)] {
                let t = std::time::Instant::now();
                let case = Case::GemmBias { ta, m, n, k, residual };
                let (bound, form) = if residual {
                    (FAST_BOUND, "then res + (out + bias)")
                } else {
                    (FAST_BF16_BOUND, "bf16 out + bias in the epilogue")
                };
                let exact = floats(&run_case(&Sim, &case)?[0].1);
                let before = fast.fast_fallbacks();
                let got = floats(&run_case(fast, &case)?[0].1);
                let fell_back = fast.fast_fallbacks() > before;
                let rel = rel_frobenius(&exact, &got);
                rows.push(Row {
                    op: format!("gemm fast (cuBLASLt) {ta} x {ta} Forward, {form} [{m}x{n}x{k}]"),
                    inputs: exact.len() as u64,
                    class: "fast",
                    mismatches: u64::from(fell_back || rel.is_nan() || rel > bound),
                    first: Some(if fell_back {
                        "cuBLASLt refused the epilogue: ran the exact-class definition".to_string()
                    } else {
                        format!("relative Frobenius error {rel:.2e} (bound {bound:.0e})")
                    }),
                    seconds: t.elapsed().as_secs_f64(),
                });
            }
        }
        rows
    })
}

/// Relative Frobenius error bound of flash attention (BF16 operands and probabilities,
/// f32 accumulation) against the exact kernels. Measured on an H200: see the README.
pub const FLASH_BOUND: f64 = 2e-2;

/// Flash attention (fast mode, head sizes 64 and 128) against the simulator's exact
/// attention: relative Frobenius error of the output, the softmax statistics and dqkv.
fn verify_flash(fast: &Cuda) -> BResult<Vec<Row>> {
    Ok({
        let mut rows = Vec::new();
        // Hopper has two kinds: the warpgroup kernels (used) and the mma.sync ones.
        let kinds: &[(&str, bool)] =
            if fast.has_wgmma_flash() { &[("wgmma", false), ("mma.sync", true)] } else { &[("mma.sync", true)] };
        for &(kind, mma) in kinds {
            fast.use_mma_flash(mma);
            for (b, t, c, nh) in [(2, 256, 128, 2), (1, 300, 256, 2), (2, 1024, 768, 12)] {
                let t0 = std::time::Instant::now();
                let case = Case::Attention { b, t, c, nh };
                let exact = run_case(&Sim, &case)?;
                let got = run_case(fast, &case)?;
                for ((name, e), (_, g)) in exact.iter().zip(&got) {
                    let rel = rel_frobenius(&floats(e), &floats(g));
                    rows.push(Row {
                        op: format!("attention fast (flash {kind}, bf16) {name} [b{b} t{t} c{c} h{nh}]"),
                        inputs: e.len() as u64,
                        class: "fast",
                        mismatches: u64::from(rel.is_nan() || rel > FLASH_BOUND),
                        first: Some(format!("relative Frobenius error {rel:.2e} (bound {FLASH_BOUND:.0e})")),
                        seconds: t0.elapsed().as_secs_f64(),
                    });
                }
            }
        }
        fast.use_mma_flash(false);
        rows
    })
}

pub fn verify_cmd(a: &VerifyArgs, log: &Logger) -> Result<(), String> {
    if a.collectives {
        let world = fp8cluster::world::World::init(1)?;
        fp8cluster::check::check_collectives(&world).map_err(|e| format!("MPI: {e}"))?;
        let mut over = "MPI".to_string();
        if a.backend != CliBackend::Sim {
            let cuda = Cuda::new(world.local_rank).map_err(|e| format!("verify --collectives: no usable GPU: {e}"))?;
            let nccl = crate::backend::cuda::nccl::NcclCollectives { cuda: &cuda, world: &world };
            fp8cluster::check::check_collectives(&nccl).map_err(|e| format!("NCCL: {e}"))?;
            over += " and NCCL";
        }
        if world.rank == 0 {
            println!("collectives ok on {} ranks over {over}", world.size);
        }
        return Ok(());
    }
    if a.backend == CliBackend::Sim {
        return Err("verify compares the CUDA backend with the simulator: use --backend cuda".into());
    }
    let cuda = Cuda::new(0).map_err(|e| format!("verify --backend cuda: no usable GPU: {e}"))?;
    let gpu: &Gpu = cuda.gpu();
    info!(log, "verify"; "gpu" => &gpu.name, "arch" => &gpu.arch, "nvrtc_ms" => format!("{:.0}", gpu.compile_ms));
    let total: u64 = if a.quick { 1 << 28 } else { 1 << 32 };
    let mut rows: Vec<Row> = verify_ops(&cuda)?;
    match Cuda::new_fast(0) {
        Ok(fast) => {
            rows.extend(verify_fast(&fast)?);
            rows.extend(verify_fast_epilogues(&fast)?);
            rows.extend(verify_flash(&fast)?);
        }
        Err(e) => rows.push(Row {
            op: "gemm fast (cuBLASLt)".into(),
            inputs: 0,
            class: "fast",
            mismatches: 1,
            first: Some(format!("cuBLASLt unavailable: {e}")),
            seconds: 0.0,
        }),
    }
    rows.extend(sweep_fp8(gpu, total)?);
    for op in 0..4 {
        rows.push(sweep_math(gpu, total, op)?);
    }
    let failed = rows.iter().filter(|r| r.mismatches > 0).count();
    if a.json {
        println!("{}", serde_json::json!({"gpu": gpu.name, "arch": gpu.arch, "rows": rows}));
    } else {
        println!("fp8train verify: {} ({}), kernels compiled by NVRTC in {:.0} ms", gpu.name, gpu.arch, gpu.compile_ms);
        println!("{:<58} | outputs/inputs | class | mismatches | seconds | first mismatch", "op [shape]");
        println!("{}|----------------|-------|------------|---------|---------------", "-".repeat(59));
        for r in &rows {
            println!(
                "{:<58} | {:>14} | {:<5} | {:>10} | {:>7.2} | {}",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_runs_on_the_simulator() {
        for case in cases() {
            let out = run_case(&Sim, &case).unwrap();
            assert!(!out.is_empty() && out.iter().all(|(_, v)| !v.is_empty()), "{case:?}");
            // Deterministic: the comparison with the GPU is meaningful.
            assert_eq!(out, run_case(&Sim, &case).unwrap(), "{case:?}");
        }
    }
}
