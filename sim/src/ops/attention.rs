//! Causal multi-head self-attention on a packed `qkv` (`b x t x 3c`: q, k, v, each
//! split into `nh` heads of `hs = c / nh` channels). Output `b x t x c`.
//!
//! Forward, per (batch, head, query i), the contract's online softmax over key blocks
//! of [`KEY_BLOCK`]:
//! - score `s_j = dot(q_i, k_j) * scale`, `dot` = sequential fma over channels from +0,
//!   `scale = 1 / sqrt(hs)` (correctly rounded), keys j = 0..=i;
//! - `m = -inf, l = 0, o = 0`; per block: `m' = max(m, max s_j)`, `alpha = exp(m - m')`,
//!   `p_j = exp(s_j - m')`, `l = l * alpha + sum(p)` (contract sum), `o = o * alpha`,
//!   then `o = fma(p_j, v_j, o)` for j ascending; `m = m'`;
//! - `out = o / l`; `(m, l)` are saved for backward.
//!
//! Backward (recomputes scores with the same fma chains): `P_ij = exp(s_ij - m_i) / l_i`,
//! `D_i = sum_d(dO_i * O_i)`, `dP_ij = dot(dO_i, v_j)`, `dS_ij = P_ij * (dP_ij - D_i)`;
//! `dq_i = (sum_j fma(dS_ij, k_j)) * scale` (j ascending), `dk_j = (sum_i fma(dS_ij, q_i))
//! * scale` and `dv_j = sum_i fma(P_ij, dO_i)` (i ascending from j).

use crate::math::exp;
use crate::reduce;
use rayon::prelude::*;

/// Keys per online-softmax block (part of the contract).
pub const KEY_BLOCK: usize = 64;

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |acc, (&x, &y)| x.mul_add(y, acc))
}

/// Geometry of one call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub nh: usize,
}

impl AttnShape {
    fn hs(&self) -> usize {
        self.c / self.nh
    }
    fn scale(&self) -> f32 {
        1.0 / (self.hs() as f32).sqrt()
    }
    fn check(&self, qkv: usize, out: usize, stats: usize) {
        let AttnShape { b, t, c, nh } = *self;
        assert!(nh > 0 && c % nh == 0, "attention: channels {c} not divisible by heads {nh}");
        assert!(qkv == b * t * 3 * c && out == b * t * c && stats == b * nh * t * 2, "attention: buffer sizes");
    }
    /// Offset of head h of part `part` (0 = q, 1 = k, 2 = v) of row (bb, i) in qkv.
    fn at(&self, bb: usize, i: usize, part: usize, h: usize) -> usize {
        (bb * self.t + i) * 3 * self.c + part * self.c + h * self.hs()
    }
}

/// `out` and `stats` (`b x nh x t x 2`: m, l) from `qkv`.
pub fn attention_forward(out: &mut [f32], stats: &mut [f32], qkv: &[f32], s: AttnShape) {
    s.check(qkv.len(), out.len(), stats.len());
    let (hs, scale) = (s.hs(), s.scale());
    let results: Vec<(Vec<f32>, Vec<f32>)> = (0..s.b * s.nh)
        .into_par_iter()
        .map(|bh| {
            let (bb, h) = (bh / s.nh, bh % s.nh);
            let mut o_all = vec![0f32; s.t * hs];
            let mut st = vec![0f32; s.t * 2];
            let mut scores = vec![0f32; KEY_BLOCK];
            for i in 0..s.t {
                let q = &qkv[s.at(bb, i, 0, h)..][..hs];
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                let o = &mut o_all[i * hs..(i + 1) * hs];
                for j0 in (0..=i).step_by(KEY_BLOCK) {
                    let j1 = (j0 + KEY_BLOCK).min(i + 1);
                    let sc = &mut scores[..j1 - j0];
                    for (jj, v) in sc.iter_mut().enumerate() {
                        *v = dot(q, &qkv[s.at(bb, j0 + jj, 1, h)..][..hs]) * scale;
                    }
                    let m_new = m.max(reduce::max(sc));
                    let alpha = exp(m - m_new);
                    for v in sc.iter_mut() {
                        *v = exp(*v - m_new);
                    }
                    l = l * alpha + reduce::sum(sc);
                    for (d, od) in o.iter_mut().enumerate() {
                        let mut acc = *od * alpha;
                        for (jj, &p) in sc.iter().enumerate() {
                            acc = p.mul_add(qkv[s.at(bb, j0 + jj, 2, h) + d], acc);
                        }
                        *od = acc;
                    }
                    m = m_new;
                }
                for od in o.iter_mut() {
                    *od /= l;
                }
                st[2 * i] = m;
                st[2 * i + 1] = l;
            }
            (o_all, st)
        })
        .collect();
    for (bh, (o_all, st)) in results.into_iter().enumerate() {
        let (bb, h) = (bh / s.nh, bh % s.nh);
        for i in 0..s.t {
            out[(bb * s.t + i) * s.c + h * hs..][..hs].copy_from_slice(&o_all[i * hs..(i + 1) * hs]);
        }
        stats[bh * s.t * 2..(bh + 1) * s.t * 2].copy_from_slice(&st);
    }
}

/// `dqkv` (overwritten) from `dout`, given the forward's `qkv`, `out` and `stats`.
pub fn attention_backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], out: &[f32], stats: &[f32], s: AttnShape) {
    s.check(qkv.len(), out.len(), stats.len());
    assert_eq!(dqkv.len(), qkv.len());
    let (hs, scale, t) = (s.hs(), s.scale(), s.t);
    let results: Vec<[Vec<f32>; 3]> = (0..s.b * s.nh)
        .into_par_iter()
        .map(|bh| {
            let (bb, h) = (bh / s.nh, bh % s.nh);
            let row = |i: usize| (bb * t + i) * s.c + h * hs;
            let part = |i: usize, p: usize| &qkv[s.at(bb, i, p, h)..][..hs];
            let mut p_mat = vec![0f32; t * t];
            let mut ds = vec![0f32; t * t];
            for i in 0..t {
                let (m, l) = (stats[(bh * t + i) * 2], stats[(bh * t + i) * 2 + 1]);
                let d_o = &dout[row(i)..][..hs];
                let prod: Vec<f32> = d_o.iter().zip(&out[row(i)..][..hs]).map(|(a, b)| a * b).collect();
                let di = reduce::sum(&prod);
                for j in 0..=i {
                    let sij = dot(part(i, 0), part(j, 1)) * scale;
                    let p = exp(sij - m) / l;
                    let dp = dot(d_o, part(j, 2));
                    p_mat[i * t + j] = p;
                    ds[i * t + j] = p * (dp - di);
                }
            }
            let (mut dq, mut dk, mut dv) = (vec![0f32; t * hs], vec![0f32; t * hs], vec![0f32; t * hs]);
            for i in 0..t {
                for d in 0..hs {
                    let mut acc = 0f32;
                    for j in 0..=i {
                        acc = ds[i * t + j].mul_add(part(j, 1)[d], acc);
                    }
                    dq[i * hs + d] = acc * scale;
                }
            }
            for j in 0..t {
                for d in 0..hs {
                    let (mut ak, mut av) = (0f32, 0f32);
                    for i in j..t {
                        ak = ds[i * t + j].mul_add(part(i, 0)[d], ak);
                        av = p_mat[i * t + j].mul_add(dout[row(i) + d], av);
                    }
                    dk[j * hs + d] = ak * scale;
                    dv[j * hs + d] = av;
                }
            }
            [dq, dk, dv]
        })
        .collect();
    for (bh, parts) in results.into_iter().enumerate() {
        let (bb, h) = (bh / s.nh, bh % s.nh);
        for (p, buf) in parts.iter().enumerate() {
            for i in 0..t {
                dqkv[s.at(bb, i, p, h)..][..hs].copy_from_slice(&buf[i * hs..(i + 1) * hs]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    fn reference(qkv: &[f64], s: AttnShape) -> Vec<f64> {
        let hs = s.c / s.nh;
        let scale = 1.0 / (hs as f64).sqrt();
        let mut out = vec![0.0; s.b * s.t * s.c];
        for bb in 0..s.b {
            for h in 0..s.nh {
                for i in 0..s.t {
                    let q = &qkv[s.at(bb, i, 0, h)..][..hs];
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| q.iter().zip(&qkv[s.at(bb, j, 1, h)..][..hs]).map(|(a, b)| a * b).sum::<f64>() * scale)
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|v| (v - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hs {
                        out[(bb * s.t + i) * s.c + h * hs + d] =
                            (0..=i).map(|j| e[j] / z * qkv[s.at(bb, j, 2, h) + d]).sum::<f64>();
                    }
                }
            }
        }
        out
    }

    fn run(s: AttnShape, tol_fwd: f64, check_grad: bool) {
        let qkv = randn(s.b * s.t * 3 * s.c, 11, 1.0);
        let mut out = vec![0f32; s.b * s.t * s.c];
        let mut stats = vec![0f32; s.b * s.nh * s.t * 2];
        attention_forward(&mut out, &mut stats, &qkv, s);
        assert_close("out", &out, &reference(&f64s(&qkv), s), tol_fwd);
        if check_grad {
            let dout = randn(out.len(), 12, 1.0);
            let mut dqkv = vec![0f32; qkv.len()];
            attention_backward(&mut dqkv, &dout, &qkv, &out, &stats, s);
            let num = numeric_grad(&f64s(&qkv), &f64s(&dout), |v| reference(v, s));
            assert_close("dqkv", &dqkv, &num, 1e-4);
        }
    }

    #[test]
    fn forward_and_gradient_match_f64() {
        run(AttnShape { b: 2, t: 7, c: 12, nh: 3 }, 1e-5, true);
    }

    #[test]
    fn several_key_blocks() {
        // t > KEY_BLOCK exercises the online rescaling across blocks.
        run(AttnShape { b: 1, t: KEY_BLOCK * 2 + 5, c: 8, nh: 2 }, 1e-5, false);
    }
}
