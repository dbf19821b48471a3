//! Tensor + sequence parallelism in the model (Megatron-style, the FP8-LM way; issue
//! "FP8 tensor and sequence parallelism"): what a block needs at its four boundaries,
//! over backend buffers. The pieces' split is `shard`'s; the collectives' definitions
//! are `fp8cluster::tp`'s.
//!
//! A rank of a group of `size` holds rows `rank * n / size ..` of the `n = b * t` rows
//! in the sequence-parallel regions (residual stream, layernorms, the projections' bias
//! and residual adds) and every row of its columns in the tensor-parallel ones (QKV by
//! heads, attention, MLP-up, GELU). Entering a column-parallel layer, the layernorm's
//! output (E4M3 with the layer's scale, which the agreed amax histories make the same
//! on every rank; BF16 at the bf16 level) is all-gathered; leaving a row-parallel layer,
//! the partial products are reduce-scattered (moved as E4M3, each rank's with its own
//! scale, summed in rank order in f32: `reduce_scatter_fp8`); the backward pass mirrors
//! them with E5M2 gradients. The collectives go through host memory here (download,
//! collective, upload): the simulator's buffers are host memory already; on GPUs this
//! is the correct-first path, NCCL the fast one to come.

use super::linear::{GradCast, Saved};
use crate::backend::{BResult, Backend, Elem, Scalar};
use fp8cluster::tp::{self as ctp, TpBytes};
use fp8cluster::world::{Collectives, Equivalence};
use fp8sim::half16::{bf16, to_bf16};
use fp8sim::scaling::scale_from_amax;
use fp8sim::Fp8Format;
use rayon::prelude::*;

/// This rank's place in its tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpPlace {
    pub rank: usize,
    pub size: usize,
}

impl TpPlace {
    /// No tensor parallelism.
    pub const ONE: TpPlace = TpPlace { rank: 0, size: 1 };
}

/// A group of one (tp = 1): every collective is a copy.
pub struct Solo;

impl Collectives for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn barrier(&self) {}
    fn broadcast<T: Equivalence + bytemuck::Pod>(&self, _: &mut [T], _: usize) {}
    fn all_gather<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]) {
        recv.copy_from_slice(send)
    }
    fn all_to_all<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]) {
        recv.copy_from_slice(send)
    }
    fn all_reduce_max(&self, _: &mut [f32]) {}
}

/// Bytes this rank sent in tensor-parallel collectives over a step, by kind, next to what
/// BF16 values would have needed (the target: FP8 moves half).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TpTraffic {
    pub all_gather: TpBytes,
    pub reduce_scatter: TpBytes,
    /// Everything else: the vocabulary-parallel loss and embedding, the replicated
    /// parameters' gradient sums, statistics (f32 / u64 values).
    pub other: u64,
}

impl TpTraffic {
    /// `b` added into `to`.
    pub fn add(to: &mut TpBytes, b: TpBytes) {
        to.payload += b.payload;
        to.meta += b.meta;
        to.bf16_payload += b.bf16_payload;
    }
    /// What the same step would send with the FP8-moved collectives moving BF16 values
    /// (their scales and amaxes dropped; everything else as it is).
    pub fn bf16_equivalent(&self) -> u64 {
        self.all_gather.bf16_payload + self.reduce_scatter.bf16_payload + self.other
    }
    /// All bytes sent.
    pub fn total(&self) -> u64 {
        self.all_gather.payload
            + self.all_gather.meta
            + self.reduce_scatter.payload
            + self.reduce_scatter.meta
            + self.other
    }
}

fn bits_of(x: &[bf16]) -> Vec<u16> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// `full` (size times `local`'s length) = every rank's `local` in rank order, moved as
/// they are (codes or BF16 bits).
pub fn all_gather<B: Backend, T: Elem + Equivalence + bytemuck::Pod, C: Collectives>(
    be: &B,
    g: &C,
    local: &B::Buf<T>,
    full: &mut B::Buf<T>,
) -> BResult<u64> {
    let mine = be.download(local)?;
    let mut all = vec![T::default(); mine.len() * g.size()];
    g.all_gather(&mine, &mut all);
    *full = be.upload(&all)?;
    Ok(((g.size() - 1) * std::mem::size_of_val(mine.as_slice())) as u64)
}

/// [`all_gather`] of BF16 values (as their bits).
pub fn all_gather_bf16<B: Backend, C: Collectives>(
    be: &B,
    g: &C,
    local: &B::Buf<bf16>,
    full: &mut B::Buf<bf16>,
) -> BResult<TpBytes> {
    let mine = bits_of(&be.download(local)?);
    let mut all = vec![0u16; mine.len() * g.size()];
    g.all_gather(&mine, &mut all);
    *full = be.upload(&all.into_iter().map(bf16::from_bits).collect::<Vec<_>>())?;
    let b = ((g.size() - 1) * 2 * mine.len()) as u64;
    Ok(TpBytes { payload: b, meta: 0, bf16_payload: b })
}

/// A saved linear input (FP8 codes or BF16) all-gathered from this rank's rows.
pub fn gather_saved<B: Backend, C: Collectives>(
    be: &B,
    g: &C,
    local: &Saved<B>,
    full: &mut Saved<B>,
) -> BResult<TpBytes> {
    match (local, full) {
        (Saved::Fp8(l), Saved::Fp8(f)) => {
            let b = all_gather(be, g, l, f)?;
            Ok(TpBytes { payload: b, meta: 0, bf16_payload: 2 * b })
        }
        (Saved::Bf16(l), Saved::Bf16(f)) => all_gather_bf16(be, g, l, f),
        _ => unreachable!("a level's saved inputs are all FP8 or all BF16"),
    }
}

/// An output-gradient copy (E5M2 codes or BF16) all-gathered from this rank's rows.
pub fn gather_grad<B: Backend, C: Collectives>(
    be: &B,
    g: &C,
    local: &GradCast<B>,
    full: &mut GradCast<B>,
) -> BResult<TpBytes> {
    match (local, full) {
        (GradCast::Fp8(l), GradCast::Fp8(f)) => {
            let b = all_gather(be, g, l, f)?;
            Ok(TpBytes { payload: b, meta: 0, bf16_payload: 2 * b })
        }
        (GradCast::Bf16(l), GradCast::Bf16(f)) => all_gather_bf16(be, g, l, f),
        _ => unreachable!("a level's gradient copies are all FP8 or all BF16"),
    }
}

/// Partial products (BF16, `size` x `out`'s rows) reduce-scattered: `out` = this rank's
/// rows summed over the ranks in rank order in f32, rounded to BF16. `fmt`: moved as FP8
/// of that format, each rank's with its own scale (`fp8cluster::tp::reduce_scatter_fp8`);
/// None: moved as BF16.
pub fn reduce_scatter<B: Backend, C: Collectives>(
    be: &B,
    g: &C,
    partial: &B::Buf<bf16>,
    out: &mut B::Buf<bf16>,
    fmt: Option<Fp8Format>,
) -> BResult<TpBytes> {
    let p = be.download(partial)?;
    let k = p.len() / g.size();
    let mut sum = vec![0f32; k];
    let bytes = match fmt {
        Some(fmt) => {
            let wide: Vec<f32> = p.par_iter().map(|v| v.to_f32()).collect();
            ctp::reduce_scatter_fp8(g, &wide, fmt, &mut sum)
        }
        None => {
            let mut recv = vec![0u16; p.len()];
            g.all_to_all(&bits_of(&p), &mut recv);
            for (i, s) in sum.iter_mut().enumerate() {
                *s = (0..g.size()).fold(0f32, |acc, r| acc + bf16::from_bits(recv[r * k + i]).to_f32());
            }
            let b = ((g.size() - 1) * 2 * k) as u64;
            TpBytes { payload: b, meta: 0, bf16_payload: b }
        }
    };
    *out = be.upload(&sum.into_par_iter().map(to_bf16).collect::<Vec<_>>())?;
    Ok(bytes)
}

/// A replicated parameter's gradient made from this rank's rows: the ranks' values
/// added in rank order from +0 (the same bits on every rank).
pub fn sum_over_ranks<B: Backend, C: Collectives>(be: &B, g: &C, x: &mut B::Buf<f32>) -> BResult<u64> {
    let mut v = be.download(x)?;
    let mut all = vec![0f32; v.len() * g.size()];
    g.all_gather(&v, &mut all);
    let n = v.len();
    for (i, out) in v.iter_mut().enumerate() {
        *out = (0..g.size()).fold(0f32, |acc, r| acc + all[r * n + i]);
    }
    *x = be.upload(&v)?;
    Ok(((g.size() - 1) * 4 * v.len()) as u64)
}

/// A just-in-time scale every rank shares for a tensor whose rows the ranks hold (`x`,
/// this rank's rows): the largest of the ranks' amaxes (a non-finite one keeps the
/// previous scale, as `scale_from_amax`), stored as the pair at `pair` of `scales`.
pub fn shared_jit_scale<B: Backend, C: Collectives>(
    be: &B,
    g: &C,
    x: &B::Buf<f32>,
    fmt: Fp8Format,
    scales: &mut B::Buf<f32>,
    pair: usize,
) -> BResult<()> {
    let a = be.amax(x)?;
    let mut m = [if a.is_finite() { a } else { f32::INFINITY }];
    g.all_reduce_max(&mut m);
    let prev = be.download(scales)?[pair + 1];
    let s = scale_from_amax(fmt, m[0], 0, prev);
    be.set(scales, pair, 1.0 / s)?;
    be.set(scales, pair + 1, s)
}

/// A step's statistics agreed over the group before anything reads them: every amax
/// slot becomes the group's largest (`amax_slots_max`: the same histories, scales and
/// overflow flag on every rank), every saturated count the group's sum. `counts[i]`:
/// slot i is a count.
pub fn agree_stats<B: Backend, C: Collectives>(
    be: &B,
    g: &C,
    stats: &mut B::Buf<u64>,
    counts: &[bool],
) -> BResult<u64> {
    let mut s = be.download(stats)?;
    let mut all = vec![0u64; s.len() * g.size()];
    g.all_gather(&s, &mut all);
    let mut amaxes: Vec<u64> = s.iter().zip(counts).filter(|(_, &c)| !c).map(|(&v, _)| v).collect();
    ctp::amax_slots_max(g, &mut amaxes);
    let mut next = amaxes.into_iter();
    let n = s.len();
    for (i, v) in s.iter_mut().enumerate() {
        *v = if counts[i] {
            (0..g.size()).map(|r| all[r * n + i]).sum()
        } else {
            next.next().expect("one agreed amax per amax slot")
        };
    }
    *stats = be.upload(&s)?;
    Ok(((g.size() - 1) * 12 * n) as u64)
}

/// The f32 value of a scalar the backend holds (the loss gradient's mu at tp > 1,
/// where the vocabulary-parallel loss runs on the host).
pub fn host_scalar<B: Backend>(be: &B, s: Scalar<'_, B>) -> BResult<f32> {
    Ok(match s {
        Scalar::Host(v) => v,
        Scalar::Dev(buf, at) => be.download(buf)?[at],
    })
}
