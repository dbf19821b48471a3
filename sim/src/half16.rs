//! BF16 and FP16 (through the `half` crate) with the contract's rounding: every
//! rounding from f32 is round-to-nearest-even and every NaN becomes one canonical
//! quiet NaN (sign cleared), so both backends produce the same bits.

pub use half::{bf16, f16};

/// Canonical NaN bit patterns.
pub const BF16_NAN_BITS: u16 = 0x7fc0;
pub const F16_NAN_BITS: u16 = 0x7e00;

/// f32 -> BF16, round-to-nearest-even, canonical NaN.
#[inline]
pub fn to_bf16(x: f32) -> bf16 {
    if x.is_nan() {
        bf16::from_bits(BF16_NAN_BITS)
    } else {
        bf16::from_f32(x)
    }
}

/// f32 -> FP16, round-to-nearest-even (overflow -> inf, as IEEE), canonical NaN.
#[inline]
pub fn to_f16(x: f32) -> f16 {
    if x.is_nan() {
        f16::from_bits(F16_NAN_BITS)
    } else {
        f16::from_f32(x)
    }
}

/// Bulk f32 -> BF16.
pub fn to_bf16_slice(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "to_bf16_slice: length mismatch");
    crate::par::for_chunks2(src, dst, |s, d| {
        for (o, &x) in d.iter_mut().zip(s) {
            *o = to_bf16(x);
        }
    });
}

/// Bulk f32 -> FP16.
pub fn to_f16_slice(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "to_f16_slice: length mismatch");
    crate::par::for_chunks2(src, dst, |s, d| {
        for (o, &x) in d.iter_mut().zip(s) {
            *o = to_f16(x);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference RNE to BF16 by integer arithmetic on the f32 bits.
    fn bf16_ref(x: f32) -> u16 {
        let b = x.to_bits();
        let lsb = (b >> 16) & 1;
        ((b + 0x7fff + lsb) >> 16) as u16
    }

    #[test]
    fn bf16_rounds_to_nearest_even_with_canonical_nan() {
        let mut s = 0x1234_5678u32;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let x = f32::from_bits(s);
            if x.is_nan() {
                assert_eq!(to_bf16(x).to_bits(), BF16_NAN_BITS);
            } else {
                assert_eq!(to_bf16(x).to_bits(), bf16_ref(x), "x = {x:e} ({s:#x})");
            }
        }
        // Exact tie: 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1).
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8)).to_f32(), 1.0);
        assert_eq!(to_bf16(1.0 + 3.0 * 2f32.powi(-8)).to_f32(), 1.0 + 2f32.powi(-6));
    }

    #[test]
    fn f16_rounding_and_range() {
        assert_eq!(to_f16(65504.0).to_f32(), 65504.0);
        assert_eq!(to_f16(65520.0).to_f32(), f32::INFINITY); // tie above max -> inf
        assert_eq!(to_f16(1.0 + 2f32.powi(-11)).to_f32(), 1.0); // tie to even
        assert_eq!(to_f16(2f32.powi(-25)).to_bits(), 0); // half of the smallest subnormal: to even (0)
        assert_eq!(to_f16(3.0 * 2f32.powi(-25)).to_bits(), 2);
        assert_eq!(to_f16(-f32::NAN).to_bits(), F16_NAN_BITS);
        let src: Vec<f32> = (0..40_000).map(|i| i as f32 * 0.001 - 20.0).collect();
        let mut dst = vec![f16::ZERO; src.len()];
        to_f16_slice(&src, &mut dst);
        assert!(src.iter().zip(&dst).all(|(&x, &h)| to_f16(x) == h));
    }
}
