//! The contract's gradient reduction (rule 8) over N ranks: all-to-all of shards (FP8
//! codes with every rank's scale), per element `sum_r decode(q_r) * (1/s_r)` in f32 in
//! rank order, requantised with one shared scale (from an all-reduce MAX of the shard
//! amaxes), then all-gather. The same bytes on the wire as a ring all-reduce, no
//! patched NCCL, deterministic. The f32 variant (bf16 level) moves f32 values instead.
//!
//! The result is the *sum* over ranks; the optimizer divides by N (in its gradient
//! scale), so for a power-of-two N the mean is exact.

use crate::world::Collectives;
use fp8sim::fp8::{self, Fp8Format};
use fp8sim::reduce::amax;
use fp8sim::scaling::scale_from_amax;

/// Bytes this rank sent for one reduction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommBytes {
    /// Gradient values (codes or f32).
    pub payload: u64,
    /// Scales and amaxes.
    pub meta: u64,
}

impl std::ops::AddAssign for CommBytes {
    fn add_assign(&mut self, o: Self) {
        self.payload += o.payload;
        self.meta += o.meta;
    }
}

/// Shard length: tensors are cut into N equal chunks (the last zero-padded).
fn chunk(n: usize, ranks: usize) -> usize {
    n.div_ceil(ranks).max(1)
}

/// Bytes one rank sends in [`reduce_fp8`] of an `n`-element tensor over `ranks` ranks:
/// the all-to-all and the all-gather of `ceil(n / ranks)`-code shards, and two scalars
/// (scale, amax) to each peer.
pub fn fp8_reduction_bytes(n: usize, ranks: usize) -> CommBytes {
    if ranks <= 1 {
        return CommBytes::default();
    }
    let peers = (ranks - 1) as u64;
    CommBytes { payload: 2 * peers * chunk(n, ranks) as u64, meta: 2 * peers * 4 }
}

/// `out[i] = sum_r decode(recv[r * k + i]) * (1 / scales[r])` in f32, ranks in order from
/// +0 (the contract's rule 8), for the first `out.len()` elements of `k`-long chunks:
/// what [`reduce_fp8`] and the tensor-parallel reduce-scatter add.
pub fn rank_order_decoded_sums(recv: &[u8], k: usize, scales: &[f32], fmt: Fp8Format, out: &mut [f32]) {
    use rayon::prelude::*;
    let inv: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
    let table = fmt.decode_table();
    // (Elements in parallel; each element's sum in rank order as one thread adds it.)
    out.par_iter_mut().enumerate().for_each(|(i, o)| {
        let mut acc = 0f32;
        for (r, v) in inv.iter().enumerate() {
            acc += table[recv[r * k + i] as usize] * v;
        }
        *o = acc;
    });
}

/// Reduce an E4M3 gradient with scale `scale` (value = code / scale) across ranks; on
/// return every rank holds the same codes and shared scale of the sum.
pub fn reduce_fp8<C: Collectives>(c: &C, codes: &mut [u8], scale: &mut f32) -> CommBytes {
    let ranks = c.size();
    if ranks == 1 {
        return CommBytes::default();
    }
    let n = codes.len();
    let k = chunk(n, ranks);
    let mut send = vec![0u8; k * ranks];
    send[..n].copy_from_slice(codes);
    let mut recv = vec![0u8; k * ranks];
    c.all_to_all(&send, &mut recv);
    let mut scales = vec![0f32; ranks];
    c.all_gather(&[*scale], &mut scales);
    let mine = n.saturating_sub(c.rank() * k).min(k);
    let mut sums = vec![0f32; k];
    rank_order_decoded_sums(&recv, k, &scales, Fp8Format::E4M3, &mut sums[..mine]);
    let mut a = [amax(&sums[..mine])];
    c.all_reduce_max(&mut a);
    let shared = scale_from_amax(Fp8Format::E4M3, a[0], 0, 1.0);
    let mut q = vec![0u8; k];
    fp8::encode_scaled(Fp8Format::E4M3, &sums, shared, &mut q);
    c.all_gather(&q, &mut recv);
    codes.copy_from_slice(&recv[..n]);
    *scale = shared;
    fp8_reduction_bytes(n, ranks)
}

/// Reduce an f32 gradient across ranks (sum in rank order); every rank ends with it.
pub fn reduce_f32<C: Collectives>(c: &C, g: &mut [f32]) -> CommBytes {
    let ranks = c.size();
    if ranks == 1 {
        return CommBytes::default();
    }
    let n = g.len();
    let k = chunk(n, ranks);
    let mut send = vec![0f32; k * ranks];
    send[..n].copy_from_slice(g);
    let mut recv = vec![0f32; k * ranks];
    c.all_to_all(&send, &mut recv);
    let mine = n.saturating_sub(c.rank() * k).min(k);
    let mut sums = vec![0f32; k];
    for (i, s) in sums.iter_mut().enumerate().take(mine) {
        let mut acc = 0f32;
        for r in 0..ranks {
            acc += recv[r * k + i];
        }
        *s = acc;
    }
    c.all_gather(&sums, &mut recv);
    g.copy_from_slice(&recv[..n]);
    let peers = (ranks - 1) as u64;
    CommBytes { payload: 2 * peers * 4 * k as u64, meta: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::World;

    #[test]
    fn one_rank_is_the_identity() {
        let w = World::single();
        let mut codes = vec![1u8, 2, 3];
        let mut s = 4.0;
        assert_eq!(reduce_fp8(&w, &mut codes, &mut s), CommBytes::default());
        assert_eq!((codes, s), (vec![1, 2, 3], 4.0));
    }
}
