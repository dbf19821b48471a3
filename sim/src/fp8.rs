//! FP8 formats (contract rule 1): OCP E4M3 (`E4M3FN`: no infinity, NaN = S.1111.111,
//! max 448) and E5M2 (IEEE-like, max 57344, has infinity).
//!
//! Decode is exact (a 256-entry table built at compile time). Encode from f32 is
//! round-to-nearest-even, in two modes:
//! - non-saturating, as ml_dtypes / PyTorch `.to(float8)`: E4M3 overflow -> NaN,
//!   E5M2 overflow -> infinity;
//! - saturating, as CUDA's `__NV_SATFINITE` / PTX `cvt.rn.satfinite`: |x| > max and
//!   infinities -> +-max, any NaN -> 0x7f (sign dropped). Every scaled cast uses it.

/// The two FP8 formats of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// 4 exponent bits (bias 7), 3 mantissa bits; finite only; max 448.
    E4M3,
    /// 5 exponent bits (bias 15), 2 mantissa bits; has infinities; max 57344.
    E5M2,
}

/// The code every saturating cast gives a NaN, in both formats.
pub const SAT_NAN_CODE: u8 = 0x7f;

impl Fp8Format {
    pub const ALL: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];

    /// Largest finite value.
    pub const fn max(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// Code of the largest finite positive value.
    pub const fn max_code(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7e,
            Fp8Format::E5M2 => 0x7b,
        }
    }

    pub const fn mantissa_bits(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 3,
            Fp8Format::E5M2 => 2,
        }
    }

    pub const fn bias(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 7,
            Fp8Format::E5M2 => 15,
        }
    }

    /// Lower-case name as used on the command line and in files.
    pub const fn name(self) -> &'static str {
        match self {
            Fp8Format::E4M3 => "e4m3",
            Fp8Format::E5M2 => "e5m2",
        }
    }

    /// The exact value of every code, indexed by code.
    pub fn decode_table(self) -> &'static [f32; 256] {
        match self {
            Fp8Format::E4M3 => &E4M3_TABLE,
            Fp8Format::E5M2 => &E5M2_TABLE,
        }
    }
}

impl std::fmt::Display for Fp8Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Fp8Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "e4m3" | "e4m3fn" => Ok(Fp8Format::E4M3),
            "e5m2" => Ok(Fp8Format::E5M2),
            other => Err(format!("unknown FP8 format '{other}' (allowed: e4m3, e5m2)")),
        }
    }
}

/// f32 bit pattern of `code` decoded in the format with `m` mantissa bits and `bias`.
const fn decode_bits(e5m2: bool, code: u8) -> u32 {
    let (m, bias) = if e5m2 { (2u32, 15i32) } else { (3u32, 7i32) };
    let c = code as u32;
    let sign = (c & 0x80) << 24;
    let exp = (c & 0x7f) >> m;
    let man = c & ((1 << m) - 1);
    let exp_all_ones = (1u32 << (7 - m)) - 1;
    if e5m2 && exp == exp_all_ones {
        return if man == 0 { sign | 0x7f80_0000 } else { sign | 0x7fc0_0000 };
    }
    if !e5m2 && exp == exp_all_ones && man == (1 << m) - 1 {
        return sign | 0x7fc0_0000;
    }
    if exp == 0 {
        if man == 0 {
            return sign;
        }
        // Subnormal: man * 2^(1 - bias - m); normalise around its leading one at bit p.
        let p = 31 - man.leading_zeros();
        let e = 1 - bias - m as i32 + p as i32;
        let frac = (man - (1 << p)) << (23 - p);
        return sign | (((e + 127) as u32) << 23) | frac;
    }
    sign | (((exp as i32 - bias + 127) as u32) << 23) | (man << (23 - m))
}

const fn build_table(e5m2: bool) -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = f32::from_bits(decode_bits(e5m2, i as u8));
        i += 1;
    }
    t
}

static E4M3_TABLE: [f32; 256] = build_table(false);
static E5M2_TABLE: [f32; 256] = build_table(true);

/// Exact value of an FP8 code. NaN codes decode to the canonical quiet NaN of their sign.
#[inline]
pub fn decode(fmt: Fp8Format, code: u8) -> f32 {
    fmt.decode_table()[code as usize]
}

/// Round-to-nearest-even of a finite non-negative f32 (given by its bits) to the FP8
/// code grid, with no overflow check: the result may exceed the largest code.
///
/// FP8 codes of non-negative values are ordered like the values and the subnormal
/// grid joins the normal one, so a carry out of the mantissa is exactly the next code.
#[inline]
fn round_to_code(fmt: Fp8Format, abs_bits: u32) -> u32 {
    let m = fmt.mantissa_bits();
    let emin = 1 - fmt.bias(); // exponent of the smallest normal
    let exp_field = (abs_bits >> 23) as i32;
    let frac = abs_bits & 0x7f_ffff;
    // value = sig * 2^(e - 23)
    let (sig, e) = if exp_field == 0 { (frac, -126) } else { (frac | 0x80_0000, exp_field - 127) };
    let (q, rem, shift) = if e >= emin {
        let shift = 23 - m;
        let q = (((e + fmt.bias()) as u32) << m) | (frac >> shift);
        (q, frac & ((1 << shift) - 1), shift)
    } else {
        // Subnormal target: units of 2^(emin - m).
        let shift = (23 + emin - m as i32 - e) as u32;
        if shift > 24 {
            // sig < 2^24 <= half a unit: rounds to zero.
            return 0;
        }
        (sig >> shift, sig & ((1 << shift) - 1), shift)
    };
    let half = 1u32 << (shift - 1);
    if rem > half || (rem == half && q & 1 == 1) {
        q + 1
    } else {
        q
    }
}

/// Encode `x` as FP8, round-to-nearest-even.
///
/// `saturate = false`: ml_dtypes semantics (E4M3 overflow -> NaN 0x7f/0xff, E5M2
/// overflow -> +-inf). `saturate = true`: the contract's scaled cast (|x| > max and
/// infinities -> +-max, NaN -> 0x7f).
#[inline]
pub fn encode(fmt: Fp8Format, x: f32, saturate: bool) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    if x.is_nan() {
        return if saturate { SAT_NAN_CODE } else { sign | 0x7f };
    }
    let abs_bits = bits & 0x7fff_ffff;
    if saturate {
        if f32::from_bits(abs_bits) > fmt.max() {
            return sign | fmt.max_code();
        }
        return sign | round_to_code(fmt, abs_bits) as u8;
    }
    let q = if abs_bits >= 0x7f80_0000 {
        u32::MAX // infinity
    } else {
        round_to_code(fmt, abs_bits)
    };
    if q > fmt.max_code() as u32 {
        return match fmt {
            Fp8Format::E4M3 => sign | 0x7f,
            Fp8Format::E5M2 => sign | 0x7c,
        };
    }
    sign | q as u8
}

/// Saturating scaled cast of a slice: `dst[i] = encode(fmt, src[i] * scale, true)`.
/// The product is one f32 multiply (exact for the power-of-two scales of the contract
/// unless it under/overflows, then correctly rounded).
pub fn encode_scaled(fmt: Fp8Format, src: &[f32], scale: f32, dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "encode_scaled: length mismatch");
    crate::par::for_chunks2(src, dst, |s, d| {
        for (q, &x) in d.iter_mut().zip(s) {
            *q = encode(fmt, x * scale, true);
        }
    });
}

/// Dequantize a slice: `dst[i] = decode(fmt, src[i]) * inv_scale`.
pub fn decode_scaled(fmt: Fp8Format, src: &[u8], inv_scale: f32, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "decode_scaled: length mismatch");
    let table = fmt.decode_table();
    crate::par::for_chunks2(src, dst, |s, d| {
        for (y, &q) in d.iter_mut().zip(s) {
            *y = table[q as usize] * inv_scale;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use Fp8Format::*;

    #[test]
    fn known_values() {
        assert_eq!(decode(E4M3, 0x7e), 448.0);
        assert_eq!(decode(E5M2, 0x7b), 57344.0);
        assert_eq!(decode(E4M3, 0x01), 2f32.powi(-9));
        assert_eq!(decode(E5M2, 0x01), 2f32.powi(-16));
        assert!(decode(E4M3, 0x7f).is_nan() && decode(E4M3, 0xff).is_nan());
        assert_eq!(decode(E5M2, 0x7c), f32::INFINITY);
        assert_eq!(decode(E5M2, 0xfc), f32::NEG_INFINITY);
        // MS-AMP vectors: 0x4A = 5, 0x50 = 8, 0x55 = 13, 0x58 = 16, 0x5C = 24, 0x62 = 40.
        for (c, v) in [(0x4a, 5.0), (0x50, 8.0), (0x55, 13.0), (0x58, 16.0), (0x5c, 24.0), (0x62, 40.0)] {
            assert_eq!(decode(E4M3, c), v);
            assert_eq!(encode(E4M3, v, false), c);
        }
    }

    #[test]
    fn overflow_and_ties_at_the_top() {
        // E4M3: 464 is the midpoint of 448 and (NaN-coded) 480: ties to even = 448.
        assert_eq!(encode(E4M3, 464.0, false), 0x7e);
        assert_eq!(encode(E4M3, 464.0001, false), 0x7f);
        assert_eq!(encode(E4M3, -1e9, false), 0xff);
        assert_eq!(encode(E4M3, f32::INFINITY, false), 0x7f);
        // E5M2: 61440 is the midpoint of 57344 and 2^16: ties to even = 2^16 = inf.
        assert_eq!(encode(E5M2, 61439.996, false), 0x7b);
        assert_eq!(encode(E5M2, 61440.0, false), 0x7c);
        assert_eq!(encode(E5M2, f32::NEG_INFINITY, false), 0xfc);
    }

    #[test]
    fn saturating_mode() {
        for fmt in Fp8Format::ALL {
            let mc = fmt.max_code();
            assert_eq!(encode(fmt, 1e30, true), mc);
            assert_eq!(encode(fmt, -1e30, true), 0x80 | mc);
            assert_eq!(encode(fmt, f32::INFINITY, true), mc);
            assert_eq!(encode(fmt, f32::NEG_INFINITY, true), 0x80 | mc);
            assert_eq!(encode(fmt, f32::NAN, true), SAT_NAN_CODE);
            assert_eq!(encode(fmt, -f32::NAN, true), SAT_NAN_CODE);
            assert_eq!(encode(fmt, fmt.max(), true), mc);
            // In range, saturating and non-saturating agree.
            for code in 0..=255u8 {
                let v = decode(fmt, code);
                if v.is_finite() && v != 0.0 {
                    assert_eq!(encode(fmt, v, true), code);
                }
            }
        }
    }

    #[test]
    fn every_code_round_trips() {
        for fmt in Fp8Format::ALL {
            for code in 0..=255u8 {
                let v = decode(fmt, code);
                if v.is_nan() {
                    assert!(decode(fmt, encode(fmt, v, false)).is_nan());
                } else {
                    assert_eq!(encode(fmt, v, false), code, "{fmt} code {code:#04x} value {v}");
                }
            }
        }
    }

    #[test]
    fn subnormal_rounding_ties_to_even() {
        // E4M3 smallest subnormal 2^-9: half of it ties to 0 (even), 1.5 units to 2 units.
        let u = 2f32.powi(-9);
        assert_eq!(encode(E4M3, 0.5 * u, false), 0x00);
        assert_eq!(encode(E4M3, 0.50001 * u, false), 0x01);
        assert_eq!(encode(E4M3, 1.5 * u, false), 0x02);
        assert_eq!(encode(E4M3, 2.5 * u, false), 0x02);
        assert_eq!(encode(E4M3, -0.25 * u, false), 0x80);
        // Largest subnormal rounds up into the smallest normal.
        assert_eq!(encode(E4M3, 7.5 * u, false), 0x08);
        assert_eq!(encode(E5M2, f32::from_bits(1), false), 0x00);
    }

    #[test]
    fn scaled_slices() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        let mut q = vec![0u8; x.len()];
        encode_scaled(E4M3, &x, 2.0, &mut q);
        let mut y = vec![0f32; x.len()];
        decode_scaled(E4M3, &q, 0.5, &mut y);
        for i in 0..x.len() {
            assert_eq!(q[i], encode(E4M3, x[i] * 2.0, true));
            assert_eq!(y[i], decode(E4M3, q[i]) * 0.5);
        }
    }
}
