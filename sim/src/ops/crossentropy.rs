//! Fused softmax + cross-entropy over logits (`n x v`), the loss and its gradient.
//!
//! Per row: `m = max(logits)`, `e_j = exp2_fast(fma(l_j, log2(e), -m log2(e)))` (e^(l_j - m)
//! by the polynomial exponential, `math::exp_from_max`), `z = sum(e)` (contract sum),
//! `loss = (log(z) + m) - l_target`. Gradient: `dlogits_j = (e_j * (1 / z) - [j ==
//! target]) * dloss`, where `dloss` is the caller's factor (for a mean loss times the
//! gradient scale mu: `mu / n`, computed once in f32). Mean loss = `sum(losses) / n`
//! (contract sum). The exponentials and the reciprocal are the contract's cheap forms
//! (since the thirteenth session; before: the exact `exp` and a division per element):
//! the kernel is bound by memory, not by ~90 instructions per element of exact
//! exponential and division, and the loss moves by about 3e-6 at most.

use crate::math::{exp_from_max, log, LOG2E};
use crate::reduce;
use rayon::prelude::*;

/// Per-row losses into `losses`; when `dlogits` is given, also the gradient, each
/// element stored through `store` (f32 kept as is, or rounded to the storage type).
#[allow(clippy::too_many_arguments)]
pub fn crossentropy_forward_backward<T: Send>(
    losses: &mut [f32],
    dlogits: Option<&mut [T]>,
    logits: &[f32],
    targets: &[u32],
    dloss: f32,
    n: usize,
    v: usize,
    store: impl Fn(f32) -> T + Sync,
) {
    assert!(logits.len() == n * v && targets.len() == n && losses.len() == n, "crossentropy: sizes");
    assert!(targets.iter().all(|&t| (t as usize) < v), "crossentropy: target id out of range");
    let row = |r: usize, dl: Option<&mut [T]>| -> f32 {
        let lr = &logits[r * v..(r + 1) * v];
        let m = reduce::max(lr);
        let ml = m * LOG2E;
        let e: Vec<f32> = lr.iter().map(|&x| exp_from_max(x, ml)).collect();
        let z = reduce::sum(&e);
        let tgt = targets[r] as usize;
        if let Some(d) = dl {
            let rz = 1.0 / z;
            for j in 0..v {
                let ind = if j == tgt { 1.0 } else { 0.0 };
                d[j] = store((e[j] * rz - ind) * dloss);
            }
        }
        (log(z) + m) - lr[tgt]
    };
    match dlogits {
        Some(d) => {
            assert_eq!(d.len(), n * v);
            losses.par_iter_mut().zip(d.par_chunks_mut(v)).enumerate().for_each(|(r, (l, dr))| *l = row(r, Some(dr)));
        }
        None => losses.par_iter_mut().enumerate().for_each(|(r, l)| *l = row(r, None)),
    }
}

/// Mean of per-row losses in the contract's order.
pub fn mean_loss(losses: &[f32]) -> f32 {
    reduce::sum(losses) / losses.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    fn reference(logits: &[f64], targets: &[u32], v: usize) -> Vec<f64> {
        logits
            .chunks(v)
            .zip(targets)
            .map(|(r, &t)| {
                let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                (r.iter().map(|x| (x - m).exp()).sum::<f64>()).ln() + m - r[t as usize]
            })
            .collect()
    }

    #[test]
    fn loss_and_gradient_match_f64() {
        let (n, v) = (6, 50);
        let logits = randn(n * v, 21, 3.0);
        let targets: Vec<u32> = (0..n as u32).map(|i| i * 7 % v as u32).collect();
        let mut losses = vec![0f32; n];
        let mut d = vec![0f32; n * v];
        crossentropy_forward_backward(&mut losses, Some(&mut d), &logits, &targets, 1.0, n, v, |x| x);
        let lref = reference(&f64s(&logits), &targets, v);
        assert_close("loss", &losses, &lref, 1e-6);
        let num = numeric_grad(&f64s(&logits), &vec![1.0; n], |x| reference(x, &targets, v));
        assert_close("dlogits", &d, &num, 1e-5);
        let mut only = vec![0f32; n];
        crossentropy_forward_backward(&mut only, None::<&mut [f32]>, &logits, &targets, 1.0, n, v, |x| x);
        assert_eq!(only, losses);
        assert!((mean_loss(&losses) as f64 - lref.iter().sum::<f64>() / n as f64).abs() < 1e-5);
    }
}
