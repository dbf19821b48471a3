//! AdamW for every precision level (contract rule 9: the operation order is the spec).
//!
//! Per element, with host-computed f32 constants (`omb1 = 1 - b1`, `omb2 = 1 - b2`,
//! `bc1 = 1 - b1^t`, `bc2 = 1 - b2^t`, `decay = 1 - lr * wd`, `grad_scale` = clip / mu):
//! ```text
//! g = g * grad_scale
//! m = b1 * m + omb1 * g
//! v = b2 * v + omb2 * (g * g)
//! p = p * decay                                   (decoupled decay first)
//! p = p - lr * ((m / bc1) / (sqrt(v / bc2) + eps))
//! ```
//! Storage per level: `bf16` level f32 p/m/v; `O1` FP16 master with a scale, f32 m/v;
//! `O2` FP16 master, E4M3 m and FP16 v, each with a scale. Decoding is
//! `value = code * (1 / scale)`. Scaled states are updated in two passes: pass 1
//! decodes, updates in f32 and takes the amax of the new values; pass 2 picks fresh
//! just-in-time power-of-two scales (margin 0) and re-encodes (RNE, saturating for FP8).
//! Gradients arrive either as f32 (`bf16` level) or as E4M3 codes with a scale.

use crate::fp8::{self, Fp8Format};
use crate::half16::{f16, to_f16};
use crate::reduce;
use crate::scaling::{scale_for_max, scale_from_amax, F16_MAX};
use rayon::prelude::*;

/// Host-computed constants of one step for one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1 - beta1, 1 - beta2
    pub omb1: f32,
    pub omb2: f32,
    /// bias corrections 1 - beta^t
    pub bc1: f32,
    pub bc2: f32,
    /// 1 - lr * weight_decay (1 for tensors without decay)
    pub decay: f32,
    /// multiplies every gradient element first (clip factor / gradient scale mu)
    pub grad_scale: f32,
}

impl AdamStep {
    /// Constants for step `t` (1-based). Powers are taken by repeated f32 multiplication.
    #[allow(clippy::too_many_arguments)]
    pub fn new(lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32, t: u64, grad_scale: f32) -> Self {
        let (mut p1, mut p2) = (1f32, 1f32);
        for _ in 0..t.min(100_000) {
            p1 *= beta1;
            p2 *= beta2;
        }
        AdamStep {
            lr,
            beta1,
            beta2,
            eps,
            omb1: 1.0 - beta1,
            omb2: 1.0 - beta2,
            bc1: 1.0 - p1,
            bc2: 1.0 - p2,
            decay: 1.0 - lr * weight_decay,
            grad_scale,
        }
    }

    /// One element: returns the new (p, m, v).
    #[inline(always)]
    pub fn update(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let g = g * self.grad_scale;
        let m = self.beta1 * m + self.omb1 * g;
        let v = self.beta2 * v + self.omb2 * (g * g);
        let p = p * self.decay;
        let p = p - self.lr * ((m / self.bc1) / ((v / self.bc2).sqrt() + self.eps));
        (p, m, v)
    }
}

impl AdamStep {
    /// These constants with the ones the step controller keeps ([`step_control`]:
    /// the bias corrections and the gradient's multiplier) taken from its words.
    pub fn with_control(mut self, ctl: &[f32]) -> AdamStep {
        self.bc1 = ctl[ctl::BC1];
        self.bc2 = ctl[ctl::BC2];
        self.grad_scale = ctl[ctl::GRAD_SCALE];
        self
    }
}

/// Word positions of the step controller's state (f32 words; counters are u32 bit
/// patterns): what the training loop decides between the backward pass and AdamW,
/// kept where the device can work it out so the step needs no read-back.
pub mod ctl {
    /// The gradient scale mu (powers of two) the next backward pass multiplies by.
    pub const MU: usize = 0;
    /// The step's mean loss (over ranks once agreed).
    pub const LOSS: usize = 1;
    /// The gradient norm (NaN on a skipped step).
    pub const NORM: usize = 2;
    /// AdamW's gradient multiplier: clip factor / (mu * ranks).
    pub const GRAD_SCALE: usize = 3;
    /// Bias corrections 1 - beta^t and the powers beta^t (t capped at 100000).
    pub const BC1: usize = 4;
    pub const BC2: usize = 5;
    pub const P1: usize = 6;
    pub const P2: usize = 7;
    /// 1 when a gradient held a non-finite value (the step is skipped), else 0.
    pub const OVERFLOW: usize = 8;
    /// Clean steps since mu last changed (u32 bits).
    pub const GOOD_STEPS: usize = 9;
    /// Optimizer steps taken (u32 bits).
    pub const OPT_STEPS: usize = 10;
    /// mu as this step's backward pass used it.
    pub const MU_BEFORE: usize = 11;
    pub const LEN: usize = 12;
}

/// Settings of the step controller (the training config's, and the ranks).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepControl {
    pub grad_clip: f32,
    pub ranks: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub mu_growth_interval: u32,
    pub mu_min: f32,
    pub mu_max: f32,
}

/// The step's decisions after its backward pass (overflow flag set, gradients summed
/// over ranks), from `sq`, each stored gradient's sum of squares in parameter order:
/// a skipped step halves mu; otherwise the gradient norm, the clip factor, the
/// optimizer step count and its bias corrections, and mu's growth after a run of clean
/// steps. The contract's definition (the order of these f32 operations is the spec);
/// the GPU's `step_control` (kernels/scaling.cu) runs it in one thread.
pub fn step_control(w: &mut [f32], sq: &[f32], c: &StepControl) {
    let count = |x: f32| x.to_bits();
    let word = f32::from_bits;
    let mu = w[ctl::MU];
    w[ctl::MU_BEFORE] = mu;
    let mut good = count(w[ctl::GOOD_STEPS]);
    if w[ctl::OVERFLOW] != 0.0 {
        w[ctl::MU] = (mu * 0.5).max(c.mu_min);
        w[ctl::NORM] = f32::NAN;
        good = 0;
    } else {
        // Gradients hold mu times the sum over ranks of each rank's mean.
        let unscale = mu * c.ranks;
        let total = sq.iter().fold(0f32, |t, &s| t + s);
        let norm = total.sqrt() / unscale;
        let clip = if c.grad_clip > 0.0 && norm > c.grad_clip { c.grad_clip / norm } else { 1.0 };
        let t = count(w[ctl::OPT_STEPS]).saturating_add(1);
        w[ctl::OPT_STEPS] = word(t);
        if t <= 100_000 {
            w[ctl::P1] *= c.beta1;
            w[ctl::P2] *= c.beta2;
        }
        w[ctl::BC1] = 1.0 - w[ctl::P1];
        w[ctl::BC2] = 1.0 - w[ctl::P2];
        w[ctl::GRAD_SCALE] = clip / unscale;
        w[ctl::NORM] = norm;
        good += 1;
        if good >= c.mu_growth_interval {
            w[ctl::MU] = (mu * 2.0).min(c.mu_max);
            good = 0;
        }
    }
    w[ctl::GOOD_STEPS] = word(good);
}

/// A fresh controller's words: mu, no steps taken (beta powers 1).
pub fn control_words(mu: f32, opt_steps: u32, good_steps: u32, beta1: f32, beta2: f32) -> Vec<f32> {
    let mut w = vec![0f32; ctl::LEN];
    w[ctl::MU] = mu;
    w[ctl::MU_BEFORE] = mu;
    w[ctl::OPT_STEPS] = f32::from_bits(opt_steps);
    w[ctl::GOOD_STEPS] = f32::from_bits(good_steps);
    let (mut p1, mut p2) = (1f32, 1f32);
    for _ in 0..opt_steps.min(100_000) {
        p1 *= beta1;
        p2 *= beta2;
    }
    w[ctl::P1] = p1;
    w[ctl::P2] = p2;
    w[ctl::BC1] = 1.0 - p1;
    w[ctl::BC2] = 1.0 - p2;
    w
}

/// A gradient as the optimizer reads it.
#[derive(Clone, Copy, Debug)]
pub enum Grad<'a> {
    F32(&'a [f32]),
    /// E4M3 codes with `inv_scale` = 1 / scale.
    Fp8 {
        codes: &'a [u8],
        inv_scale: f32,
    },
}

impl Grad<'_> {
    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        match self {
            Grad::F32(g) => g[i],
            Grad::Fp8 { codes, inv_scale } => fp8::decode(Fp8Format::E4M3, codes[i]) * inv_scale,
        }
    }
    fn len(&self) -> usize {
        match self {
            Grad::F32(g) => g.len(),
            Grad::Fp8 { codes, .. } => codes.len(),
        }
    }
}

/// `bf16` level: f32 parameters and moments, updated in place.
pub fn adamw_f32(p: &mut [f32], g: Grad, m: &mut [f32], v: &mut [f32], h: &AdamStep) {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len(), "adamw_f32: sizes");
    p.par_iter_mut().zip(m.par_iter_mut().zip(v.par_iter_mut())).enumerate().for_each(|(i, (pi, (mi, vi)))| {
        let (np, nm, nv) = h.update(*pi, g.get(i), *mi, *vi);
        *pi = np;
        *mi = nm;
        *vi = nv;
    });
}

/// An FP16 tensor with a power-of-two scale: value = code * (1 / scale).
pub struct ScaledF16<'a> {
    pub codes: &'a mut [f16],
    pub scale: &'a mut f32,
}

/// An E4M3 tensor with a power-of-two scale.
pub struct ScaledE4m3<'a> {
    pub codes: &'a mut [u8],
    pub scale: &'a mut f32,
}

/// Re-encode `vals` into FP16 with a fresh scale from their amax.
pub fn encode_f16_jit(vals: &[f32], codes: &mut [f16], scale: &mut f32) {
    *scale = scale_for_max(F16_MAX, reduce::amax(vals), 0, *scale);
    let s = *scale;
    codes.par_iter_mut().zip(vals.par_iter()).for_each(|(c, &x)| *c = to_f16(x * s));
}

/// Re-encode `vals` into E4M3 with a fresh scale from their amax.
pub fn encode_e4m3_jit(vals: &[f32], codes: &mut [u8], scale: &mut f32) {
    *scale = scale_from_amax(Fp8Format::E4M3, reduce::amax(vals), 0, *scale);
    fp8::encode_scaled(Fp8Format::E4M3, vals, *scale, codes);
}

/// `O1`: FP16 master with a scale, f32 moments.
pub fn adamw_o1(master: ScaledF16, g: Grad, m: &mut [f32], v: &mut [f32], h: &AdamStep) {
    let n = master.codes.len();
    assert!(g.len() == n && m.len() == n && v.len() == n, "adamw_o1: sizes");
    let inv = 1.0 / *master.scale;
    let mut newp = vec![0f32; n];
    newp.par_iter_mut().zip(m.par_iter_mut().zip(v.par_iter_mut())).enumerate().for_each(|(i, (np, (mi, vi)))| {
        let (p1, m1, v1) = h.update(master.codes[i].to_f32() * inv, g.get(i), *mi, *vi);
        *np = p1;
        *mi = m1;
        *vi = v1;
    });
    encode_f16_jit(&newp, master.codes, master.scale);
}

/// `O2`: FP16 master, E4M3 first moment, FP16 second moment, each with a scale.
pub fn adamw_o2(master: ScaledF16, g: Grad, m: ScaledE4m3, v: ScaledF16, h: &AdamStep) {
    let n = master.codes.len();
    assert!(g.len() == n && m.codes.len() == n && v.codes.len() == n, "adamw_o2: sizes");
    let (ip, im, iv) = (1.0 / *master.scale, 1.0 / *m.scale, 1.0 / *v.scale);
    let (mut np, mut nm, mut nv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    np.par_iter_mut().zip(nm.par_iter_mut().zip(nv.par_iter_mut())).enumerate().for_each(|(i, (a, (b, c)))| {
        let p0 = master.codes[i].to_f32() * ip;
        let m0 = fp8::decode(Fp8Format::E4M3, m.codes[i]) * im;
        let v0 = v.codes[i].to_f32() * iv;
        let (p1, m1, v1) = h.update(p0, g.get(i), m0, v0);
        *a = p1;
        *b = m1;
        *c = v1;
    });
    encode_f16_jit(&np, master.codes, master.scale);
    encode_e4m3_jit(&nm, m.codes, m.scale);
    encode_f16_jit(&nv, v.codes, v.scale);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::randn;

    #[test]
    fn one_step_by_hand() {
        let h = AdamStep::new(0.1, 0.9, 0.95, 1e-8, 0.5, 1, 0.5);
        assert_eq!((h.bc1, h.decay), (1.0 - 0.9f32, 1.0 - 0.1f32 * 0.5));
        let (p, m, v) = h.update(1.0, 2.0, 0.0, 0.0);
        // g = 1; m = 0.1; v = 0.05*1; mhat = 1, vhat = 1 -> p = 0.95 - 0.1 * 1/(1 + 1e-8)
        assert_eq!(m, 0.9f32 * 0.0 + (1.0 - 0.9f32) * 1.0);
        assert_eq!(v, (1.0 - 0.95f32) * 1.0);
        assert!((p - (0.95 - 0.1)).abs() < 1e-6, "{p}");
    }

    /// The controller's bias corrections are `AdamStep::new`'s for the same step count
    /// (including past the cap), its norm and multiplier the loop's, and a skipped step
    /// takes no optimizer step.
    #[test]
    fn step_control_matches_the_host_constants() {
        let c = StepControl {
            grad_clip: 0.1,
            ranks: 2.0,
            beta1: 0.9,
            beta2: 0.95,
            mu_growth_interval: 3,
            mu_min: 1.0,
            mu_max: 65536.0,
        };
        let mut w = control_words(1024.0, 99_998, 0, c.beta1, c.beta2);
        let sq = [3.0f32, 0.25, 1e6];
        for t in 99_999..=100_002u64 {
            step_control(&mut w, &sq, &c);
            let h = AdamStep::new(1e-3, c.beta1, c.beta2, 1e-8, 0.0, t, 1.0);
            assert_eq!((w[ctl::BC1], w[ctl::BC2]), (h.bc1, h.bc2), "t {t}");
            assert_eq!(w[ctl::OPT_STEPS].to_bits() as u64, t);
        }
        let mu = w[ctl::MU];
        let norm = (3.0f32 + 0.25 + 1e6).sqrt() / (mu * 2.0);
        step_control(&mut w, &sq, &c);
        assert_eq!(w[ctl::NORM], norm);
        assert!(norm > 0.1);
        assert_eq!(w[ctl::GRAD_SCALE], (0.1 / norm) / (mu * 2.0));
        // Growth after 3 clean steps (steps 99_999..100_001), then a skip halves mu.
        assert_eq!((mu, w[ctl::MU]), (2048.0, 2048.0));
        w[ctl::OVERFLOW] = 1.0;
        step_control(&mut w, &sq, &c);
        assert_eq!((w[ctl::MU], w[ctl::MU_BEFORE], w[ctl::OPT_STEPS].to_bits()), (1024.0, 2048.0, 100_003));
        assert!(w[ctl::NORM].is_nan());
    }

    /// Minimise sum((p - target)^2) with each level; all reach the target.
    #[test]
    fn every_level_optimises_a_quadratic() {
        let n = 1000;
        let target = randn(n, 1, 0.05);
        let init = randn(n, 2, 0.05);
        let run = |level: usize| -> f32 {
            let mut p32 = init.clone();
            let (mut m32, mut v32) = (vec![0f32; n], vec![0f32; n]);
            let mut ph: Vec<f16> = vec![f16::ZERO; n];
            let mut ps = 1.0f32;
            encode_f16_jit(&init, &mut ph, &mut ps);
            let (mut m8, mut ms) = (vec![0u8; n], 1.0f32);
            let (mut vh, mut vs) = (vec![f16::ZERO; n], 1.0f32);
            for t in 1..=300 {
                let cur: Vec<f32> = match level {
                    0 => p32.clone(),
                    _ => ph.iter().map(|c| c.to_f32() / ps).collect(),
                };
                let g: Vec<f32> = cur.iter().zip(&target).map(|(a, b)| 2.0 * (a - b)).collect();
                let h = AdamStep::new(1e-3, 0.9, 0.95, 1e-8, 0.0, t, 1.0);
                match level {
                    0 => adamw_f32(&mut p32, Grad::F32(&g), &mut m32, &mut v32, &h),
                    1 => adamw_o1(ScaledF16 { codes: &mut ph, scale: &mut ps }, Grad::F32(&g), &mut m32, &mut v32, &h),
                    _ => {
                        let gs = scale_from_amax(Fp8Format::E4M3, reduce::amax(&g), 0, 1.0);
                        let mut gq = vec![0u8; n];
                        fp8::encode_scaled(Fp8Format::E4M3, &g, gs, &mut gq);
                        adamw_o2(
                            ScaledF16 { codes: &mut ph, scale: &mut ps },
                            Grad::Fp8 { codes: &gq, inv_scale: 1.0 / gs },
                            ScaledE4m3 { codes: &mut m8, scale: &mut ms },
                            ScaledF16 { codes: &mut vh, scale: &mut vs },
                            &h,
                        )
                    }
                }
            }
            let fin: Vec<f32> = match level {
                0 => p32,
                _ => ph.iter().map(|c| c.to_f32() / ps).collect(),
            };
            let err: f32 = fin.iter().zip(&target).map(|(a, b)| (a - b) * (a - b)).sum();
            let start: f32 = init.iter().zip(&target).map(|(a, b)| (a - b) * (a - b)).sum();
            err / start
        };
        for level in 0..3 {
            let rel = run(level);
            assert!(rel < 0.01, "level {level}: remaining error {rel}");
        }
    }
}
