//! Token + position embedding: `out[n, :] = wte[tok[n], :] + wpe[n % t, :]` for the
//! `b * t` rows of a batch.
//!
//! Backward adds into the (tied) token-embedding gradient: for each channel, rows
//! n = 0, 1, ... in ascending order, `dwte[tok[n], c] += dout[n, c]` (one f32 add
//! each, starting from what `dwte` holds, e.g. the LM head's gradient);
//! `dwpe[p, c]` = sequential sum over batch rows b = 0, 1, ... of `dout[b*t + p, c]`.
//! Threads split channels, never rows, so the order holds.

use crate::half16::f16;
use rayon::prelude::*;

#[allow(clippy::too_many_arguments)]
pub fn encoder_forward(out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], b: usize, t: usize, c: usize) {
    assert!(tokens.len() == b * t && out.len() == b * t * c && wpe.len() >= t * c);
    out.par_chunks_mut(c).enumerate().for_each(|(n, o)| {
        let tok = tokens[n] as usize;
        let (e, p) = (&wte[tok * c..(tok + 1) * c], &wpe[(n % t) * c..(n % t + 1) * c]);
        for i in 0..c {
            o[i] = e[i] + p[i];
        }
    });
}

/// [`encoder_forward`] with the token table as FP16 codes and their inverse scale: each
/// value is `code * inv_scale` (what decoding the table first gives) plus the position's.
#[allow(clippy::too_many_arguments)]
pub fn encoder_forward_f16(
    out: &mut [f32],
    tokens: &[u32],
    wte: &[f16],
    inv_scale: f32,
    wpe: &[f32],
    b: usize,
    t: usize,
    c: usize,
) {
    assert!(tokens.len() == b * t && out.len() == b * t * c && wpe.len() >= t * c);
    out.par_chunks_mut(c).enumerate().for_each(|(n, o)| {
        let tok = tokens[n] as usize;
        let (e, p) = (&wte[tok * c..(tok + 1) * c], &wpe[(n % t) * c..(n % t + 1) * c]);
        for i in 0..c {
            o[i] = e[i].to_f32() * inv_scale + p[i];
        }
    });
}

/// Channel block per task in the backward pass.
const CB: usize = 16;

#[derive(Clone, Copy)]
struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}
impl Ptr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dwte += scatter(dout)`, `dwpe = sum over the batch of dout`.
#[allow(clippy::too_many_arguments)]
pub fn encoder_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    assert!(tokens.len() == b * t && dout.len() == b * t * c && dwpe.len() >= t * c);
    let vocab = dwte.len() / c;
    assert!(tokens.iter().all(|&k| (k as usize) < vocab), "encoder_backward: token id out of range");
    let (pte, ppe) = (Ptr(dwte.as_mut_ptr()), Ptr(dwpe.as_mut_ptr()));
    (0..c.div_ceil(CB)).into_par_iter().for_each(|blk| {
        let (c0, c1) = (blk * CB, ((blk + 1) * CB).min(c));
        for n in 0..b * t {
            let tok = tokens[n] as usize;
            for i in c0..c1 {
                // SAFETY: this task alone owns channels c0..c1 of both outputs.
                unsafe { *pte.get().add(tok * c + i) += dout[n * c + i] };
            }
        }
        for p in 0..t {
            for i in c0..c1 {
                let mut acc = 0f32;
                for bb in 0..b {
                    acc += dout[(bb * t + p) * c + i];
                }
                unsafe { *ppe.get().add(p * c + i) = acc };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::randn;

    #[test]
    fn forward_and_backward() {
        let (b, t, c, v) = (3, 5, 20, 7);
        let tokens: Vec<u32> = (0..b * t).map(|i| (i * 3 % v) as u32).collect();
        let wte = randn(v * c, 1, 1.0);
        let wpe = randn(t * c, 2, 1.0);
        let mut out = vec![0f32; b * t * c];
        encoder_forward(&mut out, &tokens, &wte, &wpe, b, t, c);
        assert_eq!(out[(t + 2) * c + 3], wte[tokens[t + 2] as usize * c + 3] + wpe[2 * c + 3]);
        let dout = randn(b * t * c, 3, 1.0);
        let mut dwte = vec![0.5f32; v * c];
        let mut dwpe = vec![0f32; t * c];
        encoder_backward(&mut dwte, &mut dwpe, &dout, &tokens, b, t, c);
        for tok in 0..v {
            for i in 0..c {
                let mut want = 0.5f32;
                for n in 0..b * t {
                    if tokens[n] as usize == tok {
                        want += dout[n * c + i];
                    }
                }
                assert_eq!(dwte[tok * c + i].to_bits(), want.to_bits());
            }
        }
        assert_eq!(dwpe[c + 1], dout[c + 1] + dout[(t + 1) * c + 1] + dout[(2 * t + 1) * c + 1]);
    }
}
