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
//!
//! The vocabulary-parallel pieces: [`crossentropy_vocab_parallel`] (the tied LM head's
//! loss) and [`encoder_vocab_parallel_forward`] / [`encoder_vocab_parallel_backward`]
//! (the token embedding), each the unsplit op's bits.

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

/// A step's amax slots agreed over the group before any scale is recorded (statistics
/// slots hold `|v|` bit patterns, above 0x7f800000 for a NaN; see the model's slots):
/// each slot becomes the group's largest, so every rank records the same histories and
/// keeps the same scales. Order-free; a NaN anywhere reads as infinity on every rank
/// (MPI's MAX on NaN is unspecified), which the consumers treat alike: not finite, so
/// not recorded, and the step's overflow.
pub fn amax_slots_max<C: Collectives>(g: &C, slots: &mut [u64]) {
    let mut v: Vec<f32> =
        slots.iter().map(|&b| if b > 0x7f80_0000 { f32::INFINITY } else { f32::from_bits(b as u32) }).collect();
    g.all_reduce_max(&mut v);
    for (s, a) in slots.iter_mut().zip(v) {
        *s = u64::from(a.to_bits());
    }
}

/// `fp8::encode_scaled` of `x` in blocks on the thread pool (elementwise: the same codes).
fn encode_par(fmt: Fp8Format, x: &[f32], scale: f32) -> Vec<u8> {
    use rayon::prelude::*;
    let mut q = vec![0u8; x.len()];
    q.par_chunks_mut(1 << 16).zip(x.par_chunks(1 << 16)).for_each(|(q, x)| fp8::encode_scaled(fmt, x, scale, q));
    q
}

/// All-gather of `shard` (the same length on every rank) as FP8 of format `fmt` with
/// the group's shared scale: the whole tensor's codes in rank order, and the scale
/// (value = code / scale).
pub fn all_gather_fp8<C: Collectives>(g: &C, shard: &[f32], fmt: Fp8Format, prev: f32) -> (Vec<u8>, f32, TpBytes) {
    let scale = shared_scale(g, shard, fmt, prev);
    let q = encode_par(fmt, shard, scale);
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
    let q = encode_par(fmt, partial, scale);
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
/// each rank sums its own 32-element chunks of `e^(l - m)` (`exp_from_max`) sequentially and the chunk
/// partials are gathered in rank order, which is the global chunk order, so the
/// contract's tree over them gives the sum, the loss and the gradient of the unsplit
/// cross-entropy bit for bit (`fp8sim::ops::crossentropy`). `losses`: every row's loss
/// on every rank; `dlogits`: this rank's columns of `(e * (1 / z) - [j == target]) * dloss`.
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
    use fp8sim::math::{exp_from_max, log, LOG2E};
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
    // (Rows in parallel: every element and every chunk's sum as one thread computes it.)
    use rayon::prelude::*;
    let mut m: Vec<f32> = logits.par_chunks(vs).map(max).collect();
    g.all_reduce_max(&mut m);
    let mut e = vec![0f32; n * vs];
    e.par_chunks_mut(vs).zip(logits.par_chunks(vs)).zip(&m).for_each(|((er, lr), &mr)| {
        let ml = mr * LOG2E;
        for (o, &l) in er.iter_mut().zip(lr) {
            *o = exp_from_max(l, ml);
        }
    });
    let cs = vs / CHUNK;
    let part: Vec<f32> = e.par_chunks(CHUNK).map(|c| c.iter().fold(0f32, |acc, &x| acc + x)).collect(); // n x cs, row-major
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
    z.par_iter_mut().zip(losses.par_iter_mut()).enumerate().for_each(|(r, (zr, loss))| {
        let mut p: Vec<f32> =
            (0..ranks).flat_map(|k| all[k * n * cs + r * cs..k * n * cs + (r + 1) * cs].to_vec()).collect();
        *zr = tree_sum(&mut p);
        let t = targets[r] as usize;
        *loss = (log(*zr) + m[r]) - tl[(t / vs) * n + r];
    });
    if let Some(d) = dlogits {
        assert_eq!(d.len(), n * vs, "crossentropy_vocab_parallel: gradient size");
        d.par_chunks_mut(vs).zip(e.par_chunks(vs)).enumerate().for_each(|(r, (dr, er))| {
            let rz = 1.0 / z[r];
            for (k, (out, &ek)) in dr.iter_mut().zip(er).enumerate() {
                let ind = if lo + k == targets[r] as usize { 1.0 } else { 0.0 };
                *out = (ek * rz - ind) * dloss;
            }
        });
    }
    Ok(())
}

/// Column sums over the rows of a sequence-parallel region (a replicated parameter's
/// gradient: the layernorms' weights and biases, the projections' biases): this rank
/// holds rows `rank * rows .. (rank + 1) * rows` of the whole `x` (`rows x cols` here, a
/// multiple of 32 rows, so no chunk of the contract's column sums straddles two ranks).
/// Each rank sums its own 32-row chunks, the chunk partials are gathered in rank order,
/// which is the global chunk order, and every rank runs the contract's tree over them:
/// the unsplit column sums bit for bit, on every rank.
pub fn column_sums_sequence_parallel<C: Collectives>(
    g: &C,
    x: &[f32],
    rows: usize,
    cols: usize,
    out: &mut [f32],
) -> Result<(), String> {
    use fp8sim::reduce::{column_chunk_partials, column_tree, CHUNK};
    if !rows.is_multiple_of(CHUNK) {
        return Err(format!(
            "sequence-parallel column sums: {rows} rows per rank; the contract's 32-row chunks must not straddle \
             ranks (tokens per rank, batch x seq_len / tp, a multiple of 32)"
        ));
    }
    let part = column_chunk_partials(x, rows, cols);
    let mut all = vec![0f32; part.len() * g.size()];
    g.all_gather(&part, &mut all);
    column_tree(&mut all, rows / CHUNK * g.size(), cols, out);
    Ok(())
}

/// The gradient norm's sum of squares over a tensor-parallel group: `sums[i]` is this
/// rank's sum of squares of parameter i's gradient (its piece when `sharded[i]`, else the
/// whole replicated tensor, the same on every rank). A sharded tensor's sum is its
/// pieces' sums added in rank order from +0 (gathered, so every rank adds the same
/// values); the tensors are added in parameter order, as at tp = 1. Every rank gets the
/// same bits; at one rank it is the tp = 1 sum itself.
pub fn grad_sum_sq_over_pieces<C: Collectives>(g: &C, sums: &[f32], sharded: &[bool]) -> f32 {
    assert_eq!(sums.len(), sharded.len(), "grad_sum_sq_over_pieces: one flag per tensor");
    let n = sums.len();
    let mut all = vec![0f32; n * g.size()];
    g.all_gather(sums, &mut all);
    (0..n).fold(0f32, |total, i| {
        let s =
            if sharded[i] && g.size() > 1 { (0..g.size()).fold(0f32, |acc, r| acc + all[r * n + i]) } else { sums[i] };
        total + s
    })
}

/// The token + position embedding with the token table split over the group by
/// vocabulary rows (rank r holds rows `r * vs .. (r + 1) * vs`, `vs = v / size`) and the
/// output sequence-parallel (rank r gets rows `r * n / size ..` of the `n = b * t`
/// rows). Every rank looks up the tokens its rows hold (zeros elsewhere); an all-to-all
/// brings each output row's candidates from every rank together and the row takes the
/// owner's (no arithmetic: `-0.0` stays `-0.0`), then adds its position's as
/// `fp8sim::ops::encoder::encoder_forward` does. The same bits as the unsplit encoder's
/// rows. `tokens`: all `n` rows' ids; `out`: this rank's `n / size` rows.
#[allow(clippy::too_many_arguments)]
pub fn encoder_vocab_parallel_forward<C: Collectives>(
    g: &C,
    out: &mut [f32],
    tokens: &[u32],
    wte_piece: &[f32],
    wpe: &[f32],
    (b, t, c): (usize, usize, usize),
    v: usize,
) -> Result<(), String> {
    let (ranks, me) = (g.size(), g.rank());
    let n = b * t;
    if !v.is_multiple_of(ranks) || !n.is_multiple_of(ranks) {
        return Err(format!(
            "vocabulary-parallel embedding: the vocabulary ({v}) and the batch's rows ({n}) must be multiples of the \
             tensor-parallel size ({ranks})"
        ));
    }
    let (vs, rows) = (v / ranks, n / ranks);
    assert!(tokens.len() == n && wte_piece.len() == vs * c && out.len() == rows * c, "encoder_vocab_parallel: sizes");
    if let Some(&bad) = tokens.iter().find(|&&k| k as usize >= v) {
        return Err(format!("vocabulary-parallel embedding: token id {bad} is not below the vocabulary ({v})"));
    }
    let lo = me * vs;
    let mut mine = vec![0f32; n * c];
    for (row, &tok) in mine.chunks_mut(c).zip(tokens) {
        let k = tok as usize;
        if (lo..lo + vs).contains(&k) {
            row.copy_from_slice(&wte_piece[(k - lo) * c..(k - lo + 1) * c]);
        }
    }
    let mut cand = vec![0f32; n * c];
    g.all_to_all(&mine, &mut cand); // place k: rank k's candidates for this rank's rows
    for (i, o) in out.chunks_mut(c).enumerate() {
        let row = me * rows + i;
        let owner = tokens[row] as usize / vs;
        let e = &cand[(owner * rows + i) * c..(owner * rows + i + 1) * c];
        let p = &wpe[(row % t) * c..(row % t + 1) * c];
        for j in 0..c {
            o[j] = e[j] + p[j];
        }
    }
    Ok(())
}

/// The backward of [`encoder_vocab_parallel_forward`]: the sequence-parallel output
/// gradients are gathered (every rank then holds all `n` rows), each rank adds the rows
/// whose token it holds into its piece of the token-embedding gradient (rows in
/// ascending order per channel, starting from what `dwte_piece` holds: the contract's
/// order restricted to its vocabulary rows) and every rank computes the whole position
/// gradient (replicated), as `fp8sim::ops::encoder::encoder_backward` does: the same
/// bits as the unsplit backward's pieces.
pub fn encoder_vocab_parallel_backward<C: Collectives>(
    g: &C,
    dwte_piece: &mut [f32],
    dwpe: &mut [f32],
    dout_piece: &[f32],
    tokens: &[u32],
    (b, t, c): (usize, usize, usize),
    v: usize,
) {
    let (ranks, me) = (g.size(), g.rank());
    let (n, vs) = (b * t, v / ranks);
    assert!(dout_piece.len() * ranks == n * c && dwte_piece.len() == vs * c, "encoder_vocab_parallel: sizes");
    let mut dout = vec![0f32; n * c];
    g.all_gather(dout_piece, &mut dout);
    let lo = me * vs;
    for (row, &tok) in dout.chunks(c).zip(tokens) {
        let k = tok as usize;
        if (lo..lo + vs).contains(&k) {
            for (d, &x) in dwte_piece[(k - lo) * c..(k - lo + 1) * c].iter_mut().zip(row) {
                *d += x;
            }
        }
    }
    for (p, d) in dwpe[..t * c].chunks_mut(c).enumerate() {
        for j in 0..c {
            let mut acc = 0f32;
            for bb in 0..b {
                acc += dout[(bb * t + p) * c + j];
            }
            d[j] = acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::World;

    /// Amax slots agreed over the group: each the largest rank's, a NaN anywhere an
    /// infinity everywhere, the same on every rank; one rank's unchanged (but a NaN).
    #[test]
    fn amax_slots_take_the_groups_largest() {
        let bits = |v: f32| u64::from(v.to_bits());
        for size in [1, 2, 4] {
            let got = crate::local::run_group(size, |g| {
                let r = g.rank() as f32;
                // slot 0: rank-dependent; 1: zero everywhere; 2: a NaN on the last rank.
                let nan = if g.rank() + 1 == g.size() { 0x7fc0_0000 } else { bits(1.0) };
                let mut s = vec![bits(0.5 + r), 0, nan];
                amax_slots_max(g, &mut s);
                s
            });
            for s in &got {
                assert_eq!(s, &vec![bits(0.5 + (size - 1) as f32), 0, bits(f32::INFINITY)], "{size} ranks");
            }
        }
    }

    /// The gradient norm's sum over pieces: at one rank the parameter-order fold itself;
    /// at 2 and 4 ranks the same bits on every rank, each sharded tensor's pieces added
    /// in rank order, a replicated one counted once.
    #[test]
    fn the_gradient_norm_over_pieces_is_the_same_on_every_rank() {
        let whole = [3.5f32, 1e-3, 250.0, 7.25];
        let sharded = [false, true, true, false];
        let plain = whole.iter().fold(0f32, |t, &s| t + s);
        let one = crate::local::run_group(1, |g| grad_sum_sq_over_pieces(g, &whole, &sharded));
        assert_eq!(one[0].to_bits(), plain.to_bits());
        for size in [2, 4] {
            // Rank r's piece of a sharded tensor holds a share of its sum (r + 1 parts).
            let share = |i: usize, r: usize| whole[i] * (r + 1) as f32 / (size * (size + 1) / 2) as f32;
            let got = crate::local::run_group(size, |g| {
                let mine: Vec<f32> =
                    (0..whole.len()).map(|i| if sharded[i] { share(i, g.rank()) } else { whole[i] }).collect();
                grad_sum_sq_over_pieces(g, &mine, &sharded)
            });
            let want = (0..whole.len()).fold(0f32, |t, i| {
                t + if sharded[i] { (0..size).fold(0f32, |a, r| a + share(i, r)) } else { whole[i] }
            });
            for (r, v) in got.iter().enumerate() {
                assert_eq!(v.to_bits(), want.to_bits(), "{size} ranks, rank {r}");
            }
            assert!((want - plain).abs() <= 1e-4 * plain, "{size} ranks: {want} vs {plain}");
        }
    }

    /// At 1, 2 and 4 ranks (threads), sequence-parallel column sums are the unsplit ones
    /// bit for bit on every rank (values of mixed magnitudes, so the order shows, and a
    /// row count whose chunk tree has odd levels); rows per rank not a multiple of 32 are
    /// an error.
    #[test]
    fn sequence_parallel_column_sums_are_the_unsplit_ones() {
        let (rows, cols) = (32 * 12, 5);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((((i * 2654435761) % 2001) as f32) - 1000.0) * 2f32.powi((i % 23) as i32 - 11))
            .collect();
        let mut want = vec![0f32; cols];
        fp8sim::reduce::column_sums(&x, rows, cols, &mut want);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for size in [1, 2, 4] {
            let mine = rows / size;
            let got = crate::local::run_group(size, |g| {
                let piece = &x[g.rank() * mine * cols..(g.rank() + 1) * mine * cols];
                let mut out = vec![0f32; cols];
                column_sums_sequence_parallel(g, piece, mine, cols, &mut out).unwrap();
                let odd =
                    column_sums_sequence_parallel(g, &piece[..(mine - 1) * cols], mine - 1, cols, &mut out.clone());
                (out, odd.is_err())
            });
            for (r, (out, refused)) in got.iter().enumerate() {
                assert_eq!(bits(out), bits(&want), "{size} ranks, rank {r}");
                assert!(refused, "{size} ranks: rows per rank not a multiple of 32");
            }
        }
    }

    /// At 1, 2 and 4 ranks (threads), the vocabulary-parallel embedding's output rows and
    /// gradient pieces are the unsplit encoder's, bit for bit (a -0.0 table entry
    /// included); a token id past the vocabulary is an error.
    #[test]
    fn the_vocabulary_parallel_embedding_is_the_unsplit_one() {
        use fp8sim::ops::encoder::{encoder_backward, encoder_forward};
        let (b, t, c, v) = (2, 8, 6, 32);
        let n = b * t;
        let val = |i: usize, s: usize| (((i * 2654435761 + s) % 1000) as f32 - 500.0) / 64.0;
        let mut wte: Vec<f32> = (0..v * c).map(|i| val(i, 1)).collect();
        wte[3 * c + 2] = -0.0;
        let mut wpe: Vec<f32> = (0..t * c).map(|i| val(i, 2)).collect();
        wpe[2] = -0.0;
        let mut tokens: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % v) as u32).collect();
        tokens[0] = 3; // the -0.0 entry at position 0's -0.0
        let dout: Vec<f32> = (0..n * c).map(|i| val(i, 3)).collect();
        let mut out = vec![0f32; n * c];
        encoder_forward(&mut out, &tokens, &wte, &wpe, b, t, c);
        let dwte0: Vec<f32> = (0..v * c).map(|i| val(i, 4) / 8.0).collect();
        let (mut dwte, mut dwpe) = (dwte0.clone(), vec![0f32; t * c]);
        encoder_backward(&mut dwte, &mut dwpe, &dout, &tokens, b, t, c);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for size in [1, 2, 4] {
            let (vs, rows) = (v / size, n / size);
            let got = crate::local::run_group(size, |g| {
                let r = g.rank();
                let piece = &wte[r * vs * c..(r + 1) * vs * c];
                let mut o = vec![0f32; rows * c];
                encoder_vocab_parallel_forward(g, &mut o, &tokens, piece, &wpe, (b, t, c), v).unwrap();
                let mut dw = dwte0[r * vs * c..(r + 1) * vs * c].to_vec();
                let mut dp = vec![0f32; t * c];
                let dpiece = &dout[r * rows * c..(r + 1) * rows * c];
                encoder_vocab_parallel_backward(g, &mut dw, &mut dp, dpiece, &tokens, (b, t, c), v);
                let mut bad = tokens.clone();
                bad[1] = v as u32;
                let err = encoder_vocab_parallel_forward(g, &mut o.clone(), &bad, piece, &wpe, (b, t, c), v);
                (o, dw, dp, err.is_err())
            });
            assert_eq!(
                bits(&got.iter().flat_map(|x| x.0.clone()).collect::<Vec<_>>()),
                bits(&out),
                "out, {size} ranks"
            );
            assert_eq!(bits(&got.iter().flat_map(|x| x.1.clone()).collect::<Vec<_>>()), bits(&dwte), "dwte, {size}");
            for x in &got {
                assert_eq!(bits(&x.2), bits(&dwpe), "dwpe, {size} ranks");
                assert!(x.3, "a token past the vocabulary is an error");
            }
        }
        assert_eq!(out[2].to_bits(), (-0.0f32).to_bits(), "the test reaches a -0.0 sum");
    }

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
