//! The project's own exp, log and tanh (contract rule 4).
//!
//! libm's and CUDA's `expf`/`logf`/`tanhf` differ from each other in the last bits,
//! so neither backend calls them. These functions use only f32 `+ - * /`, exact
//! bit manipulation and `round_ties_even` (CUDA: `rintf`), written in one fixed
//! operation order, which the CUDA header in `kernels/` repeats line for line. No FMA:
//! the CUDA side compiles with `--fmad=false`. Constants are given by their bits.
//!
//! Algorithms: Cody-Waite range reduction with a rational correction for exp and a
//! polynomial in s = f/(2+f) for log (the classic fdlibm/FreeBSD schemes); tanh is an
//! odd polynomial on |x| < 0.55 (coefficients fitted here for relative error) and
//! `1 - 2/(exp(2|x|) + 1)` above. Measured accuracy against f64 is in the tests.

#[inline(always)]
const fn c(bits: u32) -> f32 {
    f32::from_bits(bits)
}

const INV_LN2: f32 = c(0x3fb8_aa3b); // 1.442695
const EXP_LN2_HI: f32 = c(0x3f31_7200); // 15 significant bits: k * hi is exact for |k| < 2^8
const EXP_LN2_LO: f32 = c(0x35bf_be8e);
const EXP_P1: f32 = c(0x3e2a_aa8f); // 0xaaaa8f * 2^-26
const EXP_P2: f32 = c(0xbb35_5215); // -0xb55215 * 2^-32
const EXP_OVERFLOW: f32 = c(0x42b1_7218); // above: +inf
const EXP_UNDERFLOW: f32 = c(0xc2cf_f1b5); // below: +0

/// `y * 2^k` for |k| <= 150, in the fixed two-step form used for the extremes.
#[inline(always)]
fn scale_pow2(y: f32, k: i32) -> f32 {
    if k > 127 {
        y * 2.0 * c(((k - 1 + 127) as u32) << 23)
    } else if k < -126 {
        y * c(((k + 64 + 127) as u32) << 23) * c(((-64 + 127) as u32) << 23)
    } else {
        y * c(((k + 127) as u32) << 23)
    }
}

/// e^x.
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return f32::NAN;
    }
    if x > EXP_OVERFLOW {
        return f32::INFINITY;
    }
    if x < EXP_UNDERFLOW {
        return 0.0;
    }
    let kf = (x * INV_LN2).round_ties_even();
    let hi = x - kf * EXP_LN2_HI;
    let lo = kf * EXP_LN2_LO;
    let r = hi - lo;
    let rr = r * r;
    let cc = r - rr * (EXP_P1 + rr * EXP_P2);
    let y = 1.0 + ((r * cc / (2.0 - cc) - lo) + hi);
    scale_pow2(y, kf as i32)
}

const LOG_LN2_HI: f32 = c(0x3f31_7180);
const LOG_LN2_LO: f32 = c(0x3717_f7d1);
const LG1: f32 = c(0x3f2a_aaaa); // 0xaaaaaa * 2^-24
const LG2: f32 = c(0x3ecc_ce13); // 0xccce13 * 2^-25
const LG3: f32 = c(0x3e91_e9ee); // 0x91e9ee * 2^-25
const LG4: f32 = c(0x3e78_9e26); // 0xf89e26 * 2^-26
const SQRT_HALF_BITS: u32 = 0x3f35_04f3;

/// Natural logarithm. log(0) = -inf, log(x < 0) = NaN, log(inf) = inf.
#[inline]
pub fn log(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    let mut ix = x.to_bits();
    let mut k: i32 = 0;
    if ix < 0x0080_0000 {
        // subnormal: scale into the normal range (exact)
        k = -25;
        ix = (x * c(0x4c00_0000)).to_bits(); // 2^25
    }
    // Reduce x to m in [sqrt(1/2), sqrt(2)), x = m * 2^k.
    ix += 0x3f80_0000 - SQRT_HALF_BITS;
    k += (ix >> 23) as i32 - 127;
    ix = (ix & 0x007f_ffff) + SQRT_HALF_BITS;
    let f = c(ix) - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * (LG2 + w * LG4);
    let t2 = z * (LG1 + w * LG3);
    let r = t2 + t1;
    let hfsq = 0.5 * f * f;
    let dk = k as f32;
    (((s * (hfsq + r) + dk * LOG_LN2_LO) - hfsq) + f) + dk * LOG_LN2_HI
}

const TANH_T1: f32 = c(0xbeaa_aaa5);
const TANH_T2: f32 = c(0x3e08_8685);
const TANH_T3: f32 = c(0xbd5c_9221);
const TANH_T4: f32 = c(0x3cac_8eb2);
const TANH_T5: f32 = c(0xbbcd_4554);
const TANH_POLY_LIMIT: f32 = 0.55;
const TANH_ONE_LIMIT: f32 = 10.0; // tanh rounds to 1 above this

/// Hyperbolic tangent.
#[inline]
pub fn tanh(x: f32) -> f32 {
    if x.is_nan() {
        return f32::NAN;
    }
    let ax = x.abs();
    let r = if ax < TANH_POLY_LIMIT {
        let z = ax * ax;
        let p = (((TANH_T5 * z + TANH_T4) * z + TANH_T3) * z + TANH_T2) * z + TANH_T1;
        ax + ax * z * p
    } else if ax < TANH_ONE_LIMIT {
        1.0 - 2.0 / (exp(ax + ax) + 1.0)
    } else {
        1.0
    };
    if x.is_sign_negative() {
        -r
    } else {
        r
    }
}

/// log2(e) rounded to f32 (the same bits as `INV_LN2`), the cross-entropy's exponent factor.
pub const LOG2E: f32 = INV_LN2;
const EXP2_ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer (RNE)
/// The degree-4 polynomial of `exp2_fast`, fitted for relative error on [-1/2, 1/2],
/// highest degree first.
const EXP2_P: [f32; 5] = [c(0x3c1c_cb1a), c(0x3d65_0994), c(0x3e76_036d), c(0x3f31_7070), c(0x3f7f_fff4)];

/// 2^y by a polynomial, without division or branches (the CUDA header's
/// `fp8train_exp2_fast`, operation for operation): y clamped to [-126, 127] (a NaN
/// becomes -126 there and is returned at the end), k = round(y) by adding 1.5 * 2^23
/// (the sum's low bits are k), f = y - k in [-1/2, 1/2], p(f) by Horner with fused
/// multiply-adds, then k added to p's exponent field. Inputs below -126 (-inf included)
/// give about 2^-126 instead of 0. Relative error below 2.7e-6 (`exp2_fast_accuracy`):
/// used where the result is rounded far coarser or only summed (the cross-entropy's
/// exponentials, the fast-class attention's probabilities), never for a reported figure
/// on its own.
#[inline(always)]
pub fn exp2_fast(y: f32) -> f32 {
    let cl = y.clamp(-126.0, 127.0); // (a NaN stays NaN here; y is returned below)
    let t = cl + EXP2_ROUND;
    let k = t - EXP2_ROUND;
    let f = cl - k;
    let mut p = EXP2_P[0];
    for &q in &EXP2_P[1..] {
        p = p.mul_add(f, q);
    }
    let r = f32::from_bits(p.to_bits().wrapping_add(t.to_bits() << 23));
    if y.is_nan() {
        y
    } else {
        r
    }
}

/// e^(l - m) as the cross-entropy computes it: 2^(l log2(e) - m log2(e)), the exponent
/// one fused multiply-add from `m_log2e = m * LOG2E` (one rounded product per row).
#[inline(always)]
pub fn exp_from_max(l: f32, m_log2e: f32) -> f32 {
    exp2_fast(l.mul_add(LOG2E, -m_log2e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place of `want` (rounded to f32), counting
    /// subnormal spacing for tiny values.
    fn ulps(got: f32, want: f64) -> f64 {
        if got as f64 == want {
            return 0.0;
        }
        let w32 = want as f32;
        let spacing = if w32.abs() < f32::MIN_POSITIVE {
            f32::from_bits(1) as f64
        } else {
            let b = w32.abs().to_bits();
            (f32::from_bits(b + 1) - f32::from_bits(b)) as f64
        };
        (got as f64 - want).abs() / spacing
    }

    /// Sweep every `stride`-th f32 magnitude in [lo, hi], with each sign in `signs`,
    /// and return the max ulp error of `f` against `reference` and where it occurred.
    fn sweep(lo: f32, hi: f32, stride: u32, signs: &[f32], f: fn(f32) -> f32, reference: fn(f64) -> f64) -> (f64, f32) {
        let mut worst = (0.0, 0.0);
        let mut bits = lo.to_bits();
        while bits <= hi.to_bits() {
            for &sign in signs {
                let x = f32::from_bits(bits) * sign;
                let u = ulps(f(x), reference(x as f64));
                if u > worst.0 {
                    worst = (u, x);
                }
            }
            bits += stride;
        }
        worst
    }

    #[test]
    fn exp_accuracy() {
        let (worst, at) = sweep(1e-10, 88.7, 61, &[1.0, -1.0], exp, f64::exp);
        eprintln!("exp: max error {worst:.3} ulp at {at:e}");
        assert!(worst <= 1.0, "exp: {worst} ulp at {at:e}");
        // Underflowing into subnormals (two-step scaling): still within 1 subnormal ulp.
        let (worst, at) = sweep(87.4, 103.9, 7, &[-1.0], exp, f64::exp);
        eprintln!("exp (subnormal results): max error {worst:.3} ulp at {at:e}");
        assert!(worst <= 1.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(-104.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn log_accuracy() {
        let (worst, at) = sweep(f32::from_bits(1), f32::MAX, 97, &[1.0], log, f64::ln);
        eprintln!("log: max error {worst:.3} ulp at {at:e}");
        assert!(worst <= 1.0, "log: {worst} ulp at {at:e}");
        assert_eq!(log(1.0), 0.0);
        assert_eq!(log(0.0), f32::NEG_INFINITY);
        assert!(log(-1.0).is_nan());
        assert_eq!(log(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn tanh_accuracy() {
        let (worst, at) = sweep(f32::from_bits(1), 12.0, 23, &[1.0, -1.0], tanh, f64::tanh);
        eprintln!("tanh: max error {worst:.3} ulp at {at:e}");
        assert!(worst <= 2.0, "tanh: {worst} ulp at {at:e}");
        assert_eq!(tanh(0.0).to_bits(), 0);
        assert_eq!(tanh(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
    }

    #[test]
    fn exp2_fast_accuracy() {
        // Relative error against f64 over [-126, 127] (every 7th f32 pattern of each sign).
        let mut worst = (0f64, 0f32);
        for sign in [1.0f32, -1.0] {
            let mut bits = 0u32;
            while f32::from_bits(bits) <= if sign > 0.0 { 127.0 } else { 126.0 } {
                let y = f32::from_bits(bits) * sign;
                let want = (y as f64).exp2();
                let rel = ((exp2_fast(y) as f64 - want) / want).abs();
                if rel > worst.0 {
                    worst = (rel, y);
                }
                bits += 7;
            }
        }
        eprintln!("exp2_fast: max relative error {:.3e} at {:e}", worst.0, worst.1);
        assert!(worst.0 < 2.7e-6, "exp2_fast: relative error {:e} at {:e}", worst.0, worst.1);
        // p(0) is the fit's value, not 1; integer inputs are p(0) times exact powers of two.
        let one = exp2_fast(0.0);
        assert!((one - 1.0).abs() < 1e-6, "{one}");
        for k in [-125i32, -20, -1, 1, 10, 127] {
            assert_eq!(exp2_fast(k as f32), one * 2f32.powi(k), "2^{k}");
        }
        assert!(exp2_fast(f32::NAN).is_nan());
        // Below -126 (-inf too): about 2^-126, not 0.
        let tiny = exp2_fast(f32::NEG_INFINITY);
        assert!(tiny > 0.0 && tiny < 2.0 * f32::MIN_POSITIVE, "{tiny:e}");
        assert_eq!(exp2_fast(-500.0), tiny);
        // The cross-entropy's form: e^(l - m) within 2e-5 relative for |l - m| < 30 (the
        // exponent's own rounding adds to the polynomial's error).
        for &(l, m) in &[(0.0f32, 0.0f32), (-3.25, 1.5), (7.0, 9.5), (-20.0, 9.0), (12.0, 12.0)] {
            let got = exp_from_max(l, m * LOG2E) as f64;
            let want = ((l - m) as f64).exp();
            assert!(((got - want) / want).abs() < 2e-5, "e^({l} - {m}): {got} vs {want}");
        }
    }
}
