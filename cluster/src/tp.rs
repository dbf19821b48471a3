//! Tensor-parallel communication in FP8 (the FP8-LM design, issue "FP8 tensor and
//! sequence parallelism"), on a tensor-parallel group ([`crate::world::World::groups`]):
//!
//! - [`all_gather_fp8`], entering a column-parallel layer: every rank casts its shard of
//!   the activations (E4M3) or gradients (E5M2) with one shared scale, from the
//!   all-reduce MAX of the shard amaxes (so every rank quantises alike and the gathered
//!   tensor has one scale), then the codes are gathered in rank order.
//! - [`reduce_scatter_fp8`], after a row-parallel layer: every rank casts its partial
//!   products with its own scale; chunk r of every rank's codes goes to rank r, which
//!   sums `decode(q) * (1 / s)` over ranks in rank order in f32 (the contract's rule 8,
//!   deterministic).
//!
//! Both move one byte per element where BF16 would move two; the figures come back as
//! [`TpBytes`] so a step can print them.

use crate::world::Collectives;
use fp8sim::fp8::{self, Fp8Format};
use fp8sim::reduce::amax;
use fp8sim::scaling::scale_from_amax;

/// Bytes this rank sent for one tensor-parallel collective, and what BF16 values would
/// have needed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TpBytes {
    /// FP8 codes.
    pub payload: u64,
    /// Scales and amaxes.
    pub meta: u64,
    /// The same collective moving BF16 values.
    pub bf16_payload: u64,
}

/// The shared scale of a tensor whose shards the group's ranks hold: `scale_from_amax`
/// of the largest shard amax (a NaN or infinity anywhere keeps `prev`, as a
/// non-finite amax does).
pub fn shared_scale<C: Collectives>(g: &C, shard: &[f32], fmt: Fp8Format, prev: f32) -> f32 {
    let a = amax(shard);
    // MPI's MAX on NaN is unspecified: a non-finite amax travels as infinity.
    let mut m = [if a.is_finite() { a } else { f32::INFINITY }];
    g.all_reduce_max(&mut m);
    scale_from_amax(fmt, m[0], 0, prev)
}

/// All-gather of `shard` (the same length on every rank) as FP8 of format `fmt` with
/// the group's shared scale: the whole tensor's codes in rank order, and the scale
/// (value = code / scale).
pub fn all_gather_fp8<C: Collectives>(g: &C, shard: &[f32], fmt: Fp8Format, prev: f32) -> (Vec<u8>, f32, TpBytes) {
    let scale = shared_scale(g, shard, fmt, prev);
    let mut q = vec![0u8; shard.len()];
    fp8::encode_scaled(fmt, shard, scale, &mut q);
    let mut all = vec![0u8; shard.len() * g.size()];
    g.all_gather(&q, &mut all);
    let peers = (g.size() - 1) as u64;
    let n = shard.len() as u64;
    (all, scale, TpBytes { payload: peers * n, meta: peers * 4, bf16_payload: 2 * peers * n })
}

/// Reduce-scatter of the partial products `partial` (`out.len()` times the group size;
/// chunk r for rank r) moved as FP8 of format `fmt`, each rank's with its own scale;
/// `out` = this rank's chunk summed over the ranks in rank order in f32.
pub fn reduce_scatter_fp8<C: Collectives>(g: &C, partial: &[f32], fmt: Fp8Format, out: &mut [f32]) -> TpBytes {
    let (ranks, k) = (g.size(), out.len());
    assert_eq!(partial.len(), k * ranks, "reduce_scatter_fp8: buffer sizes");
    let scale = scale_from_amax(fmt, amax(partial), 0, 1.0);
    let mut q = vec![0u8; partial.len()];
    fp8::encode_scaled(fmt, partial, scale, &mut q);
    let mut recv = vec![0u8; partial.len()];
    g.all_to_all(&q, &mut recv);
    let mut scales = vec![0f32; ranks];
    g.all_gather(&[scale], &mut scales);
    crate::reduce::rank_order_decoded_sums(&recv, k, &scales, fmt, out);
    let peers = (ranks - 1) as u64;
    TpBytes { payload: peers * k as u64, meta: peers * 4, bf16_payload: 2 * peers * k as u64 }
}

/// Softmax cross-entropy over a vocabulary split across the group: this rank holds
/// columns `rank * vs .. (rank + 1) * vs` of every row's logits (`logits`: `n x vs`,
/// `vs = v / size`, a multiple of 32). Per row the maximum is all-reduced (order-free),
/// each rank sums its own 32-element chunks of `exp(l - m)` sequentially and the chunk
/// partials are gathered in rank order, which is the global chunk order, so the
/// contract's tree over them gives the sum, the loss and the gradient of the unsplit
/// cross-entropy bit for bit (`fp8sim::ops::crossentropy`). `losses`: every row's loss
/// on every rank; `dlogits`: this rank's columns of `(e / z - [j == target]) * dloss`.
#[allow(clippy::too_many_arguments)]
pub fn crossentropy_vocab_parallel<C: Collectives>(
    g: &C,
    losses: &mut [f32],
    dlogits: Option<&mut [f32]>,
    logits: &[f32],
    targets: &[u32],
    dloss: f32,
    n: usize,
    v: usize,
) -> Result<(), String> {
    use fp8sim::math::{exp, log};
    use fp8sim::reduce::{max, tree_sum, CHUNK};
    let (ranks, me) = (g.size(), g.rank());
    if !v.is_multiple_of(CHUNK * ranks) {
        return Err(format!(
            "vocabulary-parallel cross-entropy: the vocabulary ({v}) must be a multiple of 32 x the tensor-parallel size ({ranks})"
        ));
    }
    let vs = v / ranks;
    assert!(logits.len() == n * vs && targets.len() == n && losses.len() == n, "crossentropy_vocab_parallel: sizes");
    let lo = me * vs;
    // Row maxima (order-free). A NaN logit makes its row's loss NaN whether or not MPI's
    // MAX passes the NaN on (exp of it is NaN on the rank that holds it).
    let mut m: Vec<f32> = (0..n).map(|r| max(&logits[r * vs..(r + 1) * vs])).collect();
    g.all_reduce_max(&mut m);
    let e: Vec<f32> = (0..n * vs).map(|i| exp(logits[i] - m[i / vs])).collect();
    let cs = vs / CHUNK;
    let part: Vec<f32> = e.chunks(CHUNK).map(|c| c.iter().fold(0f32, |acc, &x| acc + x)).collect(); // n x cs, row-major
    let mut all = vec![0f32; part.len() * ranks];
    g.all_gather(&part, &mut all);
    // The logit of each row's target, from the rank that holds it.
    let mine: Vec<f32> = (0..n)
        .map(|r| {
            let t = targets[r] as usize;
            if (lo..lo + vs).contains(&t) {
                logits[r * vs + t - lo]
            } else {
                0.0
            }
        })
        .collect();
    let mut tl = vec![0f32; n * ranks];
    g.all_gather(&mine, &mut tl);
    let mut z = vec![0f32; n];
    for r in 0..n {
        let mut p: Vec<f32> =
            (0..ranks).flat_map(|k| all[k * n * cs + r * cs..k * n * cs + (r + 1) * cs].to_vec()).collect();
        z[r] = tree_sum(&mut p);
        let t = targets[r] as usize;
        losses[r] = (log(z[r]) + m[r]) - tl[(t / vs) * n + r];
    }
    if let Some(d) = dlogits {
        assert_eq!(d.len(), n * vs, "crossentropy_vocab_parallel: gradient size");
        for (i, out) in d.iter_mut().enumerate() {
            let (r, j) = (i / vs, lo + i % vs);
            let ind = if j == targets[r] as usize { 1.0 } else { 0.0 };
            *out = (e[i] / z[r] - ind) * dloss;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::World;

    #[test]
    fn on_one_rank_the_collectives_are_the_casts() {
        let w = World::single();
        let x = [0.5f32, -3.0, 100.0, 1e-3];
        let (codes, scale, bytes) = all_gather_fp8(&w, &x, Fp8Format::E4M3, 1.0);
        let want_scale = scale_from_amax(Fp8Format::E4M3, 100.0, 0, 1.0);
        let mut want = vec![0u8; 4];
        fp8::encode_scaled(Fp8Format::E4M3, &x, want_scale, &mut want);
        assert_eq!((codes, scale, bytes.payload), (want, want_scale, 0));
        let mut out = [0f32; 4];
        reduce_scatter_fp8(&w, &x, Fp8Format::E5M2, &mut out);
        let s = scale_from_amax(Fp8Format::E5M2, 100.0, 0, 1.0);
        for (o, v) in out.iter().zip(x) {
            let mut q = [0u8];
            fp8::encode_scaled(Fp8Format::E5M2, &[v], s, &mut q);
            assert_eq!(o.to_bits(), (fp8::decode(Fp8Format::E5M2, q[0]) * (1.0 / s)).to_bits());
        }
        // A NaN keeps the previous scale.
        assert_eq!(shared_scale(&w, &[1.0, f32::NAN], Fp8Format::E4M3, 0.25), 0.25);
    }
}
