//! Fixed-order reductions (contract rule 5).
//!
//! A sum over `x[0..n]` is defined as:
//! 1. split `x` into chunks of [`CHUNK`] = 32 consecutive elements (the last may be
//!    shorter); each chunk's partial is `((0 + x0) + x1) + ...`, sequential, in f32;
//! 2. the partials are combined by a fixed pairwise tree: each level adds neighbours
//!    `p[2i] + p[2i+1]`, an odd last element passes up unchanged, until one remains.
//!
//! The empty sum is +0. A CUDA kernel follows the same order (one chunk per thread,
//! then the same tree), whatever the launch shape; here chunks are computed in
//! parallel and the result does not depend on the thread count.
//!
//! `max`/`amax` are order-free; any NaN in the input makes the result NaN.

use rayon::prelude::*;

/// Elements per sequential chunk.
pub const CHUNK: usize = 32;

/// Chunks per parallel task (a multiple of nothing in particular: order is fixed by
/// the chunking above, not by the tasks).
const CHUNKS_PER_TASK: usize = 512;

fn chunk_partials(x: &[f32], term: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let chunk_sum = |c: &[f32]| c.iter().fold(0.0f32, |acc, &v| acc + term(v));
    if x.len() <= CHUNK * CHUNKS_PER_TASK {
        x.chunks(CHUNK).map(chunk_sum).collect()
    } else {
        x.par_chunks(CHUNK * CHUNKS_PER_TASK)
            .flat_map_iter(|t| t.chunks(CHUNK).map(chunk_sum).collect::<Vec<_>>())
            .collect()
    }
}

/// Combine partials with the contract's pairwise tree (in place; returns the root).
pub fn tree_sum(partials: &mut [f32]) -> f32 {
    let mut n = partials.len();
    if n == 0 {
        return 0.0;
    }
    while n > 1 {
        let half = n / 2;
        for i in 0..half {
            partials[i] = partials[2 * i] + partials[2 * i + 1];
        }
        if n % 2 == 1 {
            partials[half] = partials[n - 1];
            n = half + 1;
        } else {
            n = half;
        }
    }
    partials[0]
}

/// Sum in the contract's order.
pub fn sum(x: &[f32]) -> f32 {
    tree_sum(&mut chunk_partials(x, |v| v))
}

/// Sum of squares in the contract's order; each square is one rounded multiply (no FMA).
pub fn sum_sq(x: &[f32]) -> f32 {
    tree_sum(&mut chunk_partials(x, |v| v * v))
}

fn fold_max(x: &[f32], f: impl Fn(f32) -> f32) -> (f32, bool) {
    let mut m = f32::NEG_INFINITY;
    let mut nan = false;
    for &v in x {
        let v = f(v);
        nan |= v.is_nan();
        m = if v > m { v } else { m };
    }
    (m, nan)
}

fn max_by(x: &[f32], empty: f32, f: impl Fn(f32) -> f32 + Sync + Send + Copy) -> f32 {
    let (m, nan) = if x.len() <= crate::par::CHUNK {
        fold_max(x, f)
    } else {
        x.par_chunks(crate::par::CHUNK)
            .map(|c| fold_max(c, f))
            .reduce(|| (f32::NEG_INFINITY, false), |a, b| (if b.0 > a.0 { b.0 } else { a.0 }, a.1 | b.1))
    };
    if nan {
        f32::NAN
    } else if x.is_empty() {
        empty
    } else {
        m
    }
}

/// Maximum; NaN if any element is NaN; -inf for an empty slice.
pub fn max(x: &[f32]) -> f32 {
    max_by(x, f32::NEG_INFINITY, |v| v)
}

/// Maximum absolute value; NaN if any element is NaN; 0 for an empty slice.
pub fn amax(x: &[f32]) -> f32 {
    max_by(x, 0.0, f32::abs)
}

/// Column sums of a row-major `rows x cols` matrix, each column in the contract's
/// order (chunks of 32 rows summed sequentially, then the pairwise tree over chunks).
/// Used for bias and layernorm parameter gradients (a sum over all tokens).
pub fn column_sums(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    assert_eq!(out.len(), cols, "column_sums: output length is not cols");
    let mut partial = column_chunk_partials(x, rows, cols);
    column_tree(&mut partial, rows.div_ceil(CHUNK), cols, out);
}

/// The first half of [`column_sums`]: `partial[ch * cols + j]` = rows `32 ch ..` of
/// column j summed sequentially from +0.
pub fn column_chunk_partials(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * cols, "column_sums: data is not rows x cols");
    let chunks = rows.div_ceil(CHUNK);
    let mut partial = vec![0f32; chunks * cols];
    let work = |ch: usize, p: &mut [f32]| {
        for r in ch * CHUNK..((ch + 1) * CHUNK).min(rows) {
            for (acc, &v) in p.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
                *acc += v;
            }
        }
    };
    if rows * cols <= crate::par::CHUNK {
        partial.chunks_mut(cols).enumerate().for_each(|(ch, p)| work(ch, p));
    } else {
        partial.par_chunks_mut(cols).enumerate().for_each(|(ch, p)| work(ch, p));
    }
    partial
}

/// The second half of [`column_sums`]: the pairwise tree over `chunks` chunk partials
/// (chunk major, `cols` per chunk; used as scratch), elementwise across columns; no
/// chunks give 0.
pub fn column_tree(partial: &mut [f32], chunks: usize, cols: usize, out: &mut [f32]) {
    assert_eq!(partial.len(), chunks * cols, "column_tree: partials are not chunks x cols");
    assert_eq!(out.len(), cols, "column_tree: output length is not cols");
    if chunks == 0 {
        out.fill(0.0);
        return;
    }
    // Tree over chunks, elementwise across columns (same shape as tree_sum).
    let mut n = chunks;
    while n > 1 {
        let half = n / 2;
        for i in 0..half {
            let (lo, hi) = partial.split_at_mut((2 * i + 1) * cols);
            let right = &hi[..cols];
            let left_src = &lo[2 * i * cols..];
            let sum: Vec<f32> = left_src[..cols].iter().zip(right).map(|(a, b)| a + b).collect();
            partial[i * cols..(i + 1) * cols].copy_from_slice(&sum);
        }
        if n % 2 == 1 {
            partial.copy_within((n - 1) * cols..n * cols, half * cols);
            n = half + 1;
        } else {
            n = half;
        }
    }
    out.copy_from_slice(&partial[..cols]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the GPU kernels rely on (kernels/reduce.cu): cutting the partials into
    /// aligned groups of a power of two, taking each group's tree, then the tree over
    /// the group roots (again in groups) gives the root of the whole tree, bit for bit.
    #[test]
    fn aligned_subtrees_compose() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // values of mixed magnitude so that the order of additions shows in the bits
            ((seed >> 11) as f32 / (1u64 << 53) as f32 - 0.5) * 2f32.powi((seed % 40) as i32 - 20)
        };
        for n in [1usize, 2, 3, 255, 256, 257, 1023, 1024, 1025, 4097, 70_001, 300_000] {
            let parts: Vec<f32> = (0..n).map(|_| next()).collect();
            let whole = tree_sum(&mut parts.clone());
            // (64, 64): the CUDA backend's column trees (groups of 64 partials per pass).
            for (first, later) in [(256usize, 1024usize), (4, 2), (1024, 256), (64, 64)] {
                let mut level: Vec<f32> = parts.chunks(first).map(|g| tree_sum(&mut g.to_vec())).collect();
                while level.len() > 1 {
                    level = level.chunks(later).map(|g| tree_sum(&mut g.to_vec())).collect();
                }
                assert_eq!(level[0].to_bits(), whole.to_bits(), "n = {n}, groups {first} then {later}");
            }
        }
    }

    /// The contract written as plainly as possible.
    fn sum_spec(x: &[f32]) -> f32 {
        let mut level: Vec<f32> = x
            .chunks(32)
            .map(|c| {
                let mut acc = 0.0f32;
                for &v in c {
                    acc += v;
                }
                acc
            })
            .collect();
        if level.is_empty() {
            return 0.0;
        }
        while level.len() > 1 {
            let mut next = Vec::new();
            let mut i = 0;
            while i + 1 < level.len() {
                next.push(level[i] + level[i + 1]);
                i += 2;
            }
            if i < level.len() {
                next.push(level[i]);
            }
            level = next;
        }
        level[0]
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                // wide dynamic range so the order matters
                (s as f32 / u32::MAX as f32 - 0.5) * 2f32.powi((s % 24) as i32 - 8)
            })
            .collect()
    }

    #[test]
    fn sum_follows_the_spec_for_any_length_and_thread_count() {
        for n in [0, 1, 31, 32, 33, 95, 1000, 16_384, 16_385, 100_003, 1_000_001] {
            let x = data(n, n as u32 + 7);
            let want = sum_spec(&x);
            let want_sq = sum_spec(&x.iter().map(|v| v * v).collect::<Vec<_>>());
            for threads in [1, 2, 4] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let (s, sq) = pool.install(|| (sum(&x), sum_sq(&x)));
                assert_eq!(s.to_bits(), want.to_bits(), "n={n} threads={threads}");
                assert_eq!(sq.to_bits(), want_sq.to_bits(), "n={n} threads={threads}");
            }
        }
    }

    #[test]
    fn the_order_is_observable() {
        // A naive left-to-right sum differs from the contract's on this input, so the
        // test above would notice a change of order.
        let x = data(100_003, 100_010);
        let naive = x.iter().fold(0.0f32, |a, &v| a + v);
        assert_ne!(naive.to_bits(), sum(&x).to_bits());
    }

    #[test]
    fn column_sums_follow_the_spec() {
        for (rows, cols) in [(1, 3), (31, 5), (33, 7), (1000, 64), (4097, 3)] {
            let x = data(rows * cols, rows as u32);
            let mut out = vec![0f32; cols];
            column_sums(&x, rows, cols, &mut out);
            for c in 0..cols {
                let col: Vec<f32> = (0..rows).map(|r| x[r * cols + c]).collect();
                assert_eq!(out[c].to_bits(), sum_spec(&col).to_bits(), "{rows}x{cols} column {c}");
            }
        }
    }

    #[test]
    fn max_and_amax() {
        let mut x = data(50_000, 3);
        x[1234] = -1e6;
        assert_eq!(amax(&x), 1e6);
        assert!(max(&x) < 1e6);
        x[40_000] = f32::NAN;
        assert!(amax(&x).is_nan() && max(&x).is_nan());
        assert_eq!(amax(&[]), 0.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(amax(&[-0.0, -3.0, f32::NEG_INFINITY]), f32::INFINITY);
    }
}
