//! Per-tensor scaling (contract rule 2).
//!
//! A scale is a power of two, `s = 2^(floor(log2(fmt_max / amax)) - margin)`, so
//! multiplying by it (and by `1/s`) is exact. amax = 0 or non-finite keeps the
//! previous scale. Stored `q = sat_encode(x * s)`; value `x ~ decode(q) * (1/s)`.
//!
//! Two recipes: *delayed* scaling (the scale for this step comes from an amax history
//! of earlier steps; activations and output gradients) and *just-in-time* scaling
//! (from the tensor's own amax; weights and weight gradients).

use crate::fp8::{self, Fp8Format};
use crate::reduce;
use std::collections::VecDeque;

/// Smallest and largest exponents of a scale: 2^e and 2^-e are normal f32 numbers.
pub const MIN_EXP: i32 = -126;
pub const MAX_EXP: i32 = 126;

/// `(significand in [2^23, 2^24), exponent)` with `x = sig * 2^(exp - 23)`, for finite x > 0.
fn split(x: f32) -> (u32, i32) {
    let b = x.to_bits() & 0x7fff_ffff;
    let e = (b >> 23) as i32;
    if e == 0 {
        let frac = b & 0x7f_ffff; // subnormal: normalise
        let lz = frac.leading_zeros() - 8; // shift to bring the leading one to bit 23
        (frac << lz, -126 - lz as i32)
    } else {
        ((b & 0x7f_ffff) | 0x80_0000, e - 127)
    }
}

/// `floor(log2(num / den))` computed exactly (no rounded division, no libm), for
/// finite positive `num` and `den`.
pub fn floor_log2_ratio(num: f32, den: f32) -> i32 {
    let (sn, en) = split(num);
    let (sd, ed) = split(den);
    en - ed - i32::from(sn < sd)
}

/// 2^e as f32, for `MIN_EXP <= e <= MAX_EXP`.
pub fn pow2(e: i32) -> f32 {
    debug_assert!((MIN_EXP..=MAX_EXP).contains(&e));
    f32::from_bits(((e + 127) as u32) << 23)
}

/// The contract's scale for `amax`, or `prev` when amax is 0 or not finite.
/// The exponent is clamped to `[MIN_EXP, MAX_EXP]` so that `s` and `1/s` stay normal.
pub fn scale_from_amax(fmt: Fp8Format, amax: f32, margin: i32, prev: f32) -> f32 {
    scale_for_max(fmt.max(), amax, margin, prev)
}

/// Largest finite FP16 value: scaled FP16 tensors (master weights, Adam's second
/// moment) use the same power-of-two rule with this maximum.
pub const F16_MAX: f32 = 65504.0;

/// The power-of-two scale that maps `amax` to at most `max_value` (see [`scale_from_amax`]).
pub fn scale_for_max(max_value: f32, amax: f32, margin: i32, prev: f32) -> f32 {
    if !(amax.is_finite() && amax > 0.0) {
        return prev;
    }
    let e = floor_log2_ratio(max_value, amax) - margin;
    pow2(e.clamp(MIN_EXP, MAX_EXP))
}

/// How a delayed-scaling history is reduced to one amax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmaxAlgo {
    /// Largest amax in the window (Transformer Engine's default `max`).
    Max,
    /// The most recent amax.
    MostRecent,
}

/// Settings of one scaled tensor's recipe.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScalingConfig {
    pub fmt: Fp8Format,
    /// Powers of two of headroom subtracted from the exponent.
    pub margin: i32,
    /// History length; 1 = just-in-time.
    pub window: usize,
    pub algo: AmaxAlgo,
}

impl ScalingConfig {
    /// Activations / output gradients: delayed, window 16, max (FP8-LM, TE defaults).
    pub fn delayed(fmt: Fp8Format) -> Self {
        ScalingConfig { fmt, margin: 0, window: 16, algo: AmaxAlgo::Max }
    }
    /// Weights / weight gradients: just-in-time.
    pub fn just_in_time(fmt: Fp8Format) -> Self {
        ScalingConfig { fmt, margin: 0, window: 1, algo: AmaxAlgo::MostRecent }
    }
}

/// Scaling state of one tensor under delayed scaling: the scale to use now, and the
/// amax history it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct DelayedScaling {
    pub config: ScalingConfig,
    history: VecDeque<f32>,
    scale: f32,
}

impl DelayedScaling {
    /// Starts with scale 1 and an empty history.
    pub fn new(config: ScalingConfig) -> Self {
        assert!(config.window >= 1, "amax history window must be at least 1");
        DelayedScaling { config, history: VecDeque::with_capacity(config.window), scale: 1.0 }
    }

    /// The scale to quantize with now.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// `1/scale` (exact: the scale is a power of two).
    pub fn inv_scale(&self) -> f32 {
        1.0 / self.scale
    }

    /// The amax history, oldest first.
    pub fn history(&self) -> impl Iterator<Item = f32> + '_ {
        self.history.iter().copied()
    }

    /// Record this step's amax and derive the scale for the next step. A non-finite
    /// amax is not recorded and keeps the scale (the step that produced it is skipped
    /// by the overflow guard); returns whether it was recorded.
    pub fn record(&mut self, amax: f32) -> bool {
        if !amax.is_finite() {
            return false;
        }
        if self.history.len() == self.config.window {
            self.history.pop_front();
        }
        self.history.push_back(amax);
        let reduced = match self.config.algo {
            AmaxAlgo::Max => self.history.iter().fold(0.0f32, |m, &a| if a > m { a } else { m }),
            AmaxAlgo::MostRecent => amax,
        };
        self.scale = scale_from_amax(self.config.fmt, reduced, self.config.margin, self.scale);
        true
    }

    /// Restore a saved state (checkpoints).
    pub fn restore(config: ScalingConfig, history: &[f32], scale: f32) -> Self {
        let start = history.len().saturating_sub(config.window);
        DelayedScaling { config, history: history[start..].iter().copied().collect(), scale }
    }
}

/// [`DelayedScaling::record`] (window max, margin 0) on state a device can hold: the
/// last `hist.len()` (the window) recorded amaxes in a ring, `recorded` counting the
/// amaxes recorded (less a multiple of the window once past two windows: the next goes
/// to `hist[recorded % window]`, the first `min(recorded, window)` entries are live),
/// and the scale. The same scales as
/// `DelayedScaling` for any sequence of amaxes (`record_ring_is_delayed_scaling`); the
/// GPU's `delayed_scaling_update` (kernels/scaling.cu) runs this per tensor.
pub fn record_ring(fmt: Fp8Format, hist: &mut [f32], recorded: &mut u32, scale: &mut f32, amax: f32) -> bool {
    if !amax.is_finite() {
        return false;
    }
    let window = hist.len() as u32;
    hist[(*recorded % window) as usize] = amax;
    // (Kept below 2 window, so it never wraps: the position and the live count stay right.)
    *recorded += 1;
    if *recorded >= 2 * window {
        *recorded -= window;
    }
    let live = (*recorded).min(window) as usize;
    let reduced = hist[..live].iter().fold(0.0f32, |m, &a| if a > m { a } else { m });
    *scale = scale_from_amax(fmt, reduced, 0, *scale);
    true
}

/// A ring's live amaxes oldest first (what `DelayedScaling::history` lists), for
/// checkpoints.
pub fn ring_history(hist: &[f32], recorded: u32) -> Vec<f32> {
    let window = hist.len() as u32;
    if recorded < window {
        hist[..recorded as usize].to_vec()
    } else {
        let at = (recorded % window) as usize;
        hist[at..].iter().chain(&hist[..at]).copied().collect()
    }
}

/// An FP8 tensor with its per-tensor scale: value `~ decode(codes[i]) / scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaledTensor {
    pub codes: Vec<u8>,
    pub fmt: Fp8Format,
    pub scale: f32,
    pub shape: Vec<usize>,
}

impl ScaledTensor {
    /// Quantize with a given scale (saturating cast of `x * scale`).
    pub fn quantize(x: &[f32], shape: &[usize], fmt: Fp8Format, scale: f32) -> Self {
        assert_eq!(shape.iter().product::<usize>(), x.len(), "ScaledTensor: shape does not match data length");
        let mut codes = vec![0u8; x.len()];
        fp8::encode_scaled(fmt, x, scale, &mut codes);
        ScaledTensor { codes, fmt, scale, shape: shape.to_vec() }
    }

    /// Quantize just-in-time: the scale comes from this tensor's own amax
    /// (`prev` is kept when that amax is 0 or not finite).
    pub fn quantize_jit(x: &[f32], shape: &[usize], fmt: Fp8Format, margin: i32, prev: f32) -> Self {
        let scale = scale_from_amax(fmt, reduce::amax(x), margin, prev);
        Self::quantize(x, shape, fmt, scale)
    }

    pub fn inv_scale(&self) -> f32 {
        1.0 / self.scale
    }

    pub fn len(&self) -> usize {
        self.codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// `decode(q) * (1/scale)` for every element.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.codes.len()];
        fp8::decode_scaled(self.fmt, &self.codes, self.inv_scale(), &mut out);
        out
    }

    /// Bytes held: codes plus the f32 scale.
    pub fn bytes(&self) -> usize {
        self.codes.len() + std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Fp8Format::*;

    #[test]
    fn ms_amp_vectors() {
        assert_eq!(scale_from_amax(E4M3, 10.0, 0, 1.0), 32.0);
        assert_eq!(scale_from_amax(E4M3, 10000.0, 0, 1.0), 1.0 / 32.0);
        assert_eq!(scale_from_amax(E4M3, 0.0, 0, 1.0), 1.0);
    }

    #[test]
    fn exact_at_powers_of_two_and_margin() {
        // amax * s must never exceed max, and 2 * amax * s must exceed it.
        for fmt in Fp8Format::ALL {
            for e in -140..120 {
                for mant in [1.0f32, 1.0000001, 1.5, 1.75, 1.7500001, 1.9999999] {
                    let amax = mant * 2f32.powi(e);
                    if amax == 0.0 || !amax.is_finite() {
                        continue;
                    }
                    let s = scale_from_amax(fmt, amax, 0, 1.0);
                    let k = floor_log2_ratio(fmt.max(), amax);
                    if (MIN_EXP..=MAX_EXP).contains(&k) {
                        assert!((amax as f64) * (s as f64) <= fmt.max() as f64, "{fmt} amax {amax:e}");
                        assert!(2.0 * (amax as f64) * (s as f64) > fmt.max() as f64, "{fmt} amax {amax:e}");
                    }
                    assert_eq!(scale_from_amax(fmt, amax, 2, 1.0), pow2((k - 2).clamp(MIN_EXP, MAX_EXP)));
                }
            }
        }
        // 448 / 1.75 = 256 exactly: floor(log2) = 8; just above 1.75 gives 7.
        assert_eq!(scale_from_amax(E4M3, 1.75, 0, 1.0), 256.0);
        assert_eq!(scale_from_amax(E4M3, 1.7500001, 0, 1.0), 128.0);
    }

    #[test]
    fn bad_amax_keeps_previous_scale() {
        for bad in [0.0, f32::NAN, f32::INFINITY, -1.0] {
            assert_eq!(scale_from_amax(E5M2, bad, 0, 0.125), 0.125);
        }
    }

    #[test]
    fn delayed_scaling_window_and_algorithms() {
        let mut d = DelayedScaling::new(ScalingConfig { window: 3, ..ScalingConfig::delayed(E4M3) });
        assert_eq!(d.scale(), 1.0);
        d.record(10.0); // -> 32
        assert_eq!(d.scale(), 32.0);
        d.record(1.0); // max(10, 1) = 10 -> 32
        assert_eq!(d.scale(), 32.0);
        d.record(1.0);
        assert_eq!(d.scale(), 32.0);
        d.record(1.0); // 10 left the window: max = 1 -> 256
        assert_eq!(d.scale(), 256.0);
        assert!(!d.record(f32::NAN));
        assert_eq!(d.scale(), 256.0);
        assert_eq!(d.history().collect::<Vec<_>>(), vec![1.0, 1.0, 1.0]);

        let mut r = DelayedScaling::new(ScalingConfig { algo: AmaxAlgo::MostRecent, ..ScalingConfig::delayed(E4M3) });
        r.record(10.0);
        r.record(1.0);
        assert_eq!(r.scale(), 256.0);
        r.record(0.0); // zero keeps the scale
        assert_eq!(r.scale(), 256.0);

        let restored = DelayedScaling::restore(d.config, &[5.0, 1.0, 1.0, 1.0], 256.0);
        assert_eq!(restored, d);
    }

    #[test]
    fn record_ring_is_delayed_scaling() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for window in [1usize, 2, 3, 16] {
            for fmt in [E4M3, E5M2] {
                let mut d = DelayedScaling::new(ScalingConfig { window, ..ScalingConfig::delayed(fmt) });
                let (mut hist, mut recorded, mut scale) = (vec![0f32; window], 0u32, 1.0f32);
                for step in 0..200 {
                    let r = next();
                    let amax = match r % 17 {
                        0 => f32::NAN,
                        1 => f32::INFINITY,
                        2 => 0.0,
                        _ => f32::from_bits(0x3000_0000 + (r >> 40) as u32 % 0x1800_0000),
                    };
                    assert_eq!(record_ring(fmt, &mut hist, &mut recorded, &mut scale, amax), d.record(amax));
                    assert_eq!(scale.to_bits(), d.scale().to_bits(), "window {window} step {step}");
                    assert_eq!(ring_history(&hist, recorded), d.history().collect::<Vec<_>>());
                }
            }
        }
    }

    #[test]
    fn scaled_tensor_round_trip() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.01).collect();
        let t = ScaledTensor::quantize_jit(&x, &[8, 8], E4M3, 0, 1.0);
        assert_eq!(t.scale, 1024.0); // amax 0.315: 448/0.315 = 1422 -> 2^10
        let y = t.dequantize();
        for (a, b) in x.iter().zip(&y) {
            // E4M3 has 3 mantissa bits: relative error <= 2^-4 for normal values
            assert!((a - b).abs() <= a.abs() / 16.0 + 1e-9, "{a} vs {b}");
        }
        assert_eq!(t.bytes(), 68);
        // Values beyond the scaled range saturate rather than becoming NaN.
        let big = ScaledTensor::quantize(&[1e6, -1e6], &[2], E4M3, 1.0);
        assert_eq!(big.dequantize(), vec![448.0, -448.0]);
    }
}
