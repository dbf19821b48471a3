//! LayerNorm over the last dimension (`n` rows of `c` channels).
//!
//! Forward, per row: `mean = sum(x) / c`; `d_i = x_i - mean`; `var = sum(d_i * d_i) / c`;
//! `rstd = 1 / sqrt(var + 1e-5)`; `y_i = (d_i * rstd) * w_i + b_i`. Sums follow the
//! contract's order (`reduce::sum`), no FMA, division and sqrt correctly rounded.
//!
//! The forward pass also stores the normalized row `xhat_i = bf16(d_i * rstd)`: what the
//! backward pass reads instead of the f32 input (half the bytes kept per layernorm for
//! the backward pass, and no f32 input to keep at all where nothing else needs it).
//!
//! Backward, per row: `n_i = xhat_i` (the BF16 value, exact in f32), `g_i = w_i * dy_i`,
//! `s1 = sum(g) / c`, `s2 = sum(g_i * n_i) / c`, `dx_i = ((g_i - s1) - n_i * s2) * rstd`;
//! `dw = column_sums(dy * n)`, `db = column_sums(dy)` over all rows.

use crate::half16::{self, bf16};
use crate::reduce;
use rayon::prelude::*;

pub const EPS: f32 = 1e-5;

/// `y`, `xhat`, `mean`, `rstd` from `x` (`n x c`), weight `w` and bias `b` (`c`).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    y: &mut [f32],
    xhat: &mut [bf16],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    c: usize,
) {
    assert!(x.len() == n * c && y.len() == n * c && xhat.len() == n * c && mean.len() == n && rstd.len() == n);
    assert!(w.len() == c && b.len() == c);
    let rows = y.par_chunks_mut(c).zip(xhat.par_chunks_mut(c));
    rows.zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).enumerate().for_each(|(r, ((yr, hr), (m, rs)))| {
        let xr = &x[r * c..(r + 1) * c];
        let mu = reduce::sum(xr) / c as f32;
        let d: Vec<f32> = xr.iter().map(|&v| v - mu).collect();
        let var = reduce::sum_sq(&d) / c as f32;
        let s = 1.0 / (var + EPS).sqrt();
        for i in 0..c {
            yr[i] = (d[i] * s) * w[i] + b[i];
            hr[i] = half16::to_bf16(d[i] * s);
        }
        *m = mu;
        *rs = s;
    });
}

/// `dx` (overwritten), `dw` and `db` (overwritten) from `dy` and the forward pass's
/// `xhat` and `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    xhat: &[bf16],
    w: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    assert!(xhat.len() == n * c && dy.len() == n * c && dx.len() == n * c && rstd.len() == n);
    let mut dyn_ = vec![0f32; n * c]; // dy * normalized, for dw
    dx.par_chunks_mut(c).zip(dyn_.par_chunks_mut(c)).enumerate().for_each(|(r, (dxr, pr))| {
        let (xr, dyr) = (&xhat[r * c..(r + 1) * c], &dy[r * c..(r + 1) * c]);
        let nrm: Vec<f32> = xr.iter().map(|v| v.to_f32()).collect();
        let g: Vec<f32> = w.iter().zip(dyr).map(|(&wi, &d)| wi * d).collect();
        let gn: Vec<f32> = g.iter().zip(&nrm).map(|(&a, &b)| a * b).collect();
        let s1 = reduce::sum(&g) / c as f32;
        let s2 = reduce::sum(&gn) / c as f32;
        for i in 0..c {
            dxr[i] = ((g[i] - s1) - nrm[i] * s2) * rstd[r];
            pr[i] = dyr[i] * nrm[i];
        }
    });
    reduce::column_sums(&dyn_, n, c, dw);
    reduce::column_sums(dy, n, c, db);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    fn reference(x: &[f64], w: &[f64], b: &[f64], n: usize, c: usize) -> Vec<f64> {
        let mut y = vec![0.0; n * c];
        for r in 0..n {
            let xr = &x[r * c..(r + 1) * c];
            let m = xr.iter().sum::<f64>() / c as f64;
            let v = xr.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / c as f64;
            for i in 0..c {
                y[r * c + i] = (xr[i] - m) / (v + EPS as f64).sqrt() * w[i] + b[i];
            }
        }
        y
    }

    #[test]
    fn forward_and_gradients_match_f64() {
        let (n, c) = (5, 40);
        let x = randn(n * c, 1, 2.0);
        let w = randn(c, 2, 1.0);
        let b = randn(c, 3, 1.0);
        let dy = randn(n * c, 4, 1.0);
        let (mut y, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        let mut xhat = vec![bf16::ZERO; n * c];
        layernorm_forward(&mut y, &mut xhat, &mut mean, &mut rstd, &x, &w, &b, n, c);
        let yref = reference(&f64s(&x), &f64s(&w), &f64s(&b), n, c);
        assert_close("y", &y, &yref, 1e-5);
        let (mut dx, mut dw, mut db) = (vec![0f32; n * c], vec![0f32; c], vec![0f32; c]);
        layernorm_backward(&mut dx, &mut dw, &mut db, &dy, &xhat, &w, &rstd, n, c);
        let (xd, wd, bd, dyd) = (f64s(&x), f64s(&w), f64s(&b), f64s(&dy));
        // The backward pass reads the normalized input in BF16 (8 significant bits):
        // gradients within a few BF16 roundings of the exact ones, no closer.
        assert_close("dx", &dx, &numeric_grad(&xd, &dyd, |v| reference(v, &wd, &bd, n, c)), 2e-2);
        assert_close("dw", &dw, &numeric_grad(&wd, &dyd, |v| reference(&xd, v, &bd, n, c)), 1e-2);
        assert_close("db", &db, &numeric_grad(&bd, &dyd, |v| reference(&xd, &wd, v, n, c)), 1e-4);
        // ... and exactly the formula on the stored BF16 values.
        for r in 0..n {
            let h: Vec<f32> = xhat[r * c..(r + 1) * c].iter().map(|v| v.to_f32()).collect();
            let g: Vec<f32> = (0..c).map(|i| w[i] * dy[r * c + i]).collect();
            let gn: Vec<f32> = (0..c).map(|i| g[i] * h[i]).collect();
            let (s1, s2) = (reduce::sum(&g) / c as f32, reduce::sum(&gn) / c as f32);
            for i in 0..c {
                let want = ((g[i] - s1) - h[i] * s2) * rstd[r];
                assert_eq!(dx[r * c + i].to_bits(), want.to_bits(), "dx[{r}, {i}]");
                let exact = ((x[r * c + i] - mean[r]) * rstd[r]).to_bits();
                assert_eq!(xhat[r * c + i], half16::to_bf16(f32::from_bits(exact)), "xhat[{r}, {i}]");
            }
        }
    }
}
