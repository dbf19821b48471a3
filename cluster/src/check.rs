//! A self-check of a [`Collectives`] implementation and of the gradient reductions
//! on it, against values every rank computes locally (each rank can recompute every
//! other rank's inputs: they are counter-based random numbers). Run under mpirun by
//! the tests (MPI) and by `fp8train verify --collectives` (MPI and NCCL on GPUs).

use crate::reduce::{reduce_f32, reduce_fp8};
use crate::world::Collectives;
use fp8sim::fp8::{self, Fp8Format};
use fp8sim::rng;
use fp8sim::scaling::scale_from_amax;

fn grad(r: usize, n: usize) -> Vec<f32> {
    let mut g = vec![0f32; n];
    rng::fill_normal(7, r as u64, 0, 0.0, 0.01 * (r + 1) as f32, &mut g);
    for (i, v) in g.iter_mut().enumerate() {
        if i % 97 == 0 {
            *v = 0.0;
        }
    }
    g
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("collectives check failed: {what}"))
    }
}

fn gather<C: Collectives, T: mpi::datatype::Equivalence + bytemuck::Pod + Default>(w: &C, send: &[T]) -> Vec<T> {
    let mut out = vec![T::default(); send.len() * w.size()];
    w.all_gather(send, &mut out);
    out
}

/// Every collective and both reductions on `w`; the first failing check as the error.
pub fn check_collectives<C: Collectives>(w: &C) -> Result<(), String> {
    let (me, n) = (w.rank(), w.size());
    // all_gather / broadcast / all_reduce_max / all_reduce_sum / all_to_all / reduce_scatter
    let gathered = gather(w, &[me as u32 * 10, me as u32 * 10 + 1]);
    check(gathered == (0..n as u32).flat_map(|r| [r * 10, r * 10 + 1]).collect::<Vec<_>>(), "all_gather")?;
    let mut b = [if me == n - 1 { 42u64 } else { 0 }];
    w.broadcast(&mut b, n - 1);
    check(b[0] == 42, "broadcast")?;
    let mut m = [me as f32, -(me as f32)];
    w.all_reduce_max(&mut m);
    check(m == [(n - 1) as f32, 0.0], "all_reduce_max")?;
    let vals = |r: usize| [0.1f32 * (r + 1) as f32, 1e8 + r as f32];
    let mut s = vals(me);
    w.all_reduce_sum(&mut s);
    let want: Vec<f32> = (0..2).map(|i| (0..n).fold(0f32, |a, r| a + vals(r)[i])).collect();
    check(s.to_vec() == want, "all_reduce_sum in rank order")?;
    let send: Vec<u32> = (0..n as u32).map(|dst| me as u32 * 100 + dst).collect();
    let mut recv = vec![0u32; n];
    w.all_to_all(&send, &mut recv);
    check(recv == (0..n as u32).map(|src| src * 100 + me as u32).collect::<Vec<_>>(), "all_to_all")?;
    let rs_send: Vec<f32> = (0..n).map(|c| (me * n + c) as f32).collect();
    let mut rs = [0f32];
    w.reduce_scatter_sum(&rs_send, &mut rs);
    check(rs[0] == (0..n).fold(0f32, |a, r| a + (r * n + me) as f32), "reduce_scatter_sum")?;

    // The contract's FP8 reduction: every rank ends with the same codes and scale, equal
    // to sat_encode(sum_r decode(q_r)/s_r * s) with s from the amax of the sum.
    let len = 1001; // not a multiple of the rank count
    let quant = |r: usize| {
        let g = grad(r, len);
        let s = scale_from_amax(Fp8Format::E4M3, fp8sim::reduce::amax(&g), 0, 1.0);
        let mut q = vec![0u8; len];
        fp8::encode_scaled(Fp8Format::E4M3, &g, s, &mut q);
        (q, s)
    };
    let (mut codes, mut scale) = quant(me);
    let bytes = reduce_fp8(w, &mut codes, &mut scale);
    let sum: Vec<f32> = (0..len)
        .map(|i| {
            (0..n).fold(0f32, |a, r| {
                let (q, s) = quant(r);
                a + fp8::decode(Fp8Format::E4M3, q[i]) * (1.0 / s)
            })
        })
        .collect();
    let shared = scale_from_amax(Fp8Format::E4M3, fp8sim::reduce::amax(&sum), 0, 1.0);
    let mut want = vec![0u8; len];
    fp8::encode_scaled(Fp8Format::E4M3, &sum, shared, &mut want);
    check(scale == shared && codes == want, "reduce_fp8 equals the rank-order f32 sum, requantised")?;
    check(bytes.payload == 2 * (n as u64 - 1) * len.div_ceil(n) as u64, "reduce_fp8 bytes")?;
    let mut g = grad(me, len);
    let b32 = reduce_f32(w, &mut g);
    let want32: Vec<f32> = (0..len).map(|i| (0..n).fold(0f32, |a, r| a + grad(r, len)[i])).collect();
    check(g == want32, "reduce_f32 equals the rank-order sum")?;
    check(b32.payload == 4 * bytes.payload, "FP32 traffic is 4x FP8")?;
    let all = gather(w, &[crate::world::fnv1a(&codes)]);
    check(all.iter().all(|&h| h == all[0]), "every rank holds the same reduced codes")?;
    Ok(())
}

/// The tensor-parallel groups of `w` (`World::groups`) and the FP8 tensor-parallel
/// collectives on them (`crate::tp`), against what every rank computes locally from
/// every rank's counter-based inputs.
pub fn check_tp_collectives(w: &crate::world::World) -> Result<(), String> {
    use crate::tp::{all_gather_fp8, reduce_scatter_fp8};
    let (tp, dp) = w.groups();
    let (me, t) = (w.rank, w.tp);
    let first = me - me % t; // the TP group is world ranks first .. first + t
    check(tp.rank() == me % t && tp.size() == t && dp.rank() == me / t && dp.size() == w.dp, "group ranks and sizes")?;
    let members = gather(&tp, &[me as u32]);
    check(members == (first as u32..(first + t) as u32).collect::<Vec<_>>(), "the TP group is consecutive ranks")?;
    let across = gather(&dp, &[me as u32]);
    check(across == (0..w.dp).map(|d| (d * t + me % t) as u32).collect::<Vec<_>>(), "the DP group strides by tp")?;

    // All-gather entering a column-parallel layer: one shared scale, codes in rank order.
    let len = 37;
    let shard = |r: usize| grad(r, len);
    for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
        let (codes, scale, bytes) = all_gather_fp8(&tp, &shard(me), fmt, 1.0);
        let whole: Vec<f32> = (first..first + t).flat_map(shard).collect();
        let want_scale = scale_from_amax(fmt, fp8sim::reduce::amax(&whole), 0, 1.0);
        let mut want = vec![0u8; whole.len()];
        fp8::encode_scaled(fmt, &whole, want_scale, &mut want);
        check(scale == want_scale && codes == want, "all_gather_fp8 equals the cast of the whole tensor")?;
        check(
            bytes.bf16_payload == 2 * bytes.payload && bytes.payload == ((t - 1) * len) as u64,
            "all_gather_fp8 bytes",
        )?;
    }
    // Reduce-scatter after a row-parallel layer: per-rank scales, rank-order f32 sums.
    let k = 29;
    let partial = |r: usize| grad(r + 100, k * t);
    for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
        let mut out = vec![0f32; k];
        let bytes = reduce_scatter_fp8(&tp, &partial(me), fmt, &mut out);
        let want: Vec<f32> = (0..k)
            .map(|i| {
                (first..first + t).fold(0f32, |acc, r| {
                    let p = partial(r);
                    let s = scale_from_amax(fmt, fp8sim::reduce::amax(&p), 0, 1.0);
                    let mut q = [0u8];
                    fp8::encode_scaled(fmt, &p[(me % t) * k + i..(me % t) * k + i + 1], s, &mut q);
                    acc + fp8::decode(fmt, q[0]) * (1.0 / s)
                })
            })
            .collect();
        check(
            out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "reduce_scatter_fp8 equals the rank-order sum",
        )?;
        check(bytes.bf16_payload == 2 * bytes.payload, "reduce_scatter_fp8 moves half of BF16")?;
    }
    // Vocabulary-parallel cross-entropy: the unsplit one's bits (loss and gradient).
    let (n, v) = (7, 96 * t); // 3 chunks per rank: the chunks pair up across ranks in the tree
    let mut full = vec![0f32; n * v];
    fp8sim::rng::fill_normal(11, 0, 0, 0.0, 3.0, &mut full);
    let targets: Vec<u32> = (0..n).map(|r| ((r * 37 + 5) % v) as u32).collect();
    let (mut want_l, mut want_d) = (vec![0f32; n], vec![0f32; n * v]);
    fp8sim::ops::crossentropy::crossentropy_forward_backward(
        &mut want_l,
        Some(&mut want_d),
        &full,
        &targets,
        0.2,
        n,
        v,
        |x| x,
    );
    let vs = v / t;
    let mine: Vec<f32> = (0..n).flat_map(|r| full[r * v + (me % t) * vs..r * v + (me % t + 1) * vs].to_vec()).collect();
    let (mut l, mut d) = (vec![0f32; n], vec![0f32; n * vs]);
    crate::tp::crossentropy_vocab_parallel(&tp, &mut l, Some(&mut d), &mine, &targets, 0.2, n, v)?;
    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let want_mine: Vec<f32> =
        (0..n).flat_map(|r| want_d[r * v + (me % t) * vs..r * v + (me % t + 1) * vs].to_vec()).collect();
    check(bits(&l) == bits(&want_l), "vocabulary-parallel cross-entropy: the unsplit losses")?;
    check(bits(&d) == bits(&want_mine), "vocabulary-parallel cross-entropy: the unsplit gradient")?;
    check(
        crate::tp::crossentropy_vocab_parallel(&tp, &mut l, None, &mine[..n * (vs - 8)], &targets, 0.2, n, v - 8 * t)
            .is_err(),
        "a vocabulary that does not split into 32-element chunks is refused",
    )?;
    Ok(())
}
