//! Counter-based randomness (contract rule 7): Philox4x32-10 (Salmon et al., SC'11,
//! "Parallel random numbers: as easy as 1, 2, 3").
//!
//! Every draw is a pure function of `(seed, stream, index)`:
//! - key = the 64-bit seed (low word, high word);
//! - counter = (index / 4 low, index / 4 high, stream low, stream high), and element
//!   `index` takes word `index % 4` of that block.
//!
//! `stream` names what is drawn (parameter init of tensor t, dropout at step s, data
//! sampling, ...): build it with [`stream`]. No thread or block id enters, so any
//! thread count and any GPU launch shape give the same numbers element by element.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// One Philox4x32-10 block.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// A stream id from a purpose tag, a step and a tensor id (16 + 24 + 24 bits).
pub const fn stream(tag: u16, step: u32, tensor: u32) -> u64 {
    ((tag as u64) << 48) | (((step & 0xff_ffff) as u64) << 24) | (tensor & 0xff_ffff) as u64
}

/// The 4 words of the block holding `index`.
#[inline]
fn block(seed: u64, stream: u64, index: u64) -> [u32; 4] {
    let b = index / 4;
    philox4x32_10(
        [b as u32, (b >> 32) as u32, stream as u32, (stream >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// The raw 32-bit draw of element `index`.
#[inline]
pub fn bits(seed: u64, stream: u64, index: u64) -> u32 {
    block(seed, stream, index)[(index % 4) as usize]
}

/// Uniform in [0, 1): the top 24 bits times 2^-24 (exact).
#[inline]
pub fn uniform_from_bits(r: u32) -> f32 {
    (r >> 8) as f32 * c_pow2_m24()
}

/// Uniform in the open interval (0, 1): (2j + 1) * 2^-24 from the top 23 bits j (exact).
#[inline]
pub fn uniform_open_from_bits(r: u32) -> f32 {
    ((r >> 9) * 2 + 1) as f32 * c_pow2_m24()
}

#[inline(always)]
fn c_pow2_m24() -> f32 {
    f32::from_bits((127 - 24) << 23)
}

// Acklam's rational approximation of the inverse normal CDF (relative error
// 1.15e-9 in exact arithmetic), evaluated in f32 with the project's own log.
// Acklam's double coefficients rounded to the nearest f32 (shortest round-trip form).
const A: [f32; 6] = [-39.69683, 220.9461, -275.9285, 138.35776, -30.664799, 2.5066283];
const B: [f32; 5] = [-54.476097, 161.58583, -155.69897, 66.801315, -13.280682];
const C: [f32; 6] = [-7.784894e-3, -0.32239646, -2.4007583, -2.5497324, 4.3746643, 2.938164];
const D: [f32; 4] = [7.784696e-3, 0.32246712, 2.4451342, 3.7544086];
const P_LOW: f32 = 0.02425;

/// Standard normal quantile of `p` in (0, 1), in the fixed f32 operation order.
#[inline]
pub fn normal_quantile(p: f32) -> f32 {
    let tail = |q: f32| {
        let num = ((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5];
        let den = (((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0;
        num / den
    };
    if p < P_LOW {
        tail((-2.0 * crate::math::log(p)).sqrt())
    } else if p > 1.0 - P_LOW {
        -tail((-2.0 * crate::math::log(1.0 - p)).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        let num = (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q;
        let den = ((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0;
        num / den
    }
}

/// Uniform [0, 1) draw of element `index`.
#[inline]
pub fn uniform(seed: u64, stream: u64, index: u64) -> f32 {
    uniform_from_bits(bits(seed, stream, index))
}

/// Standard normal draw of element `index` (inverse CDF of an open uniform).
#[inline]
pub fn normal(seed: u64, stream: u64, index: u64) -> f32 {
    normal_quantile(uniform_open_from_bits(bits(seed, stream, index)))
}

/// `out[i] = f(raw draw of element offset + i)`, one Philox block per 4 elements.
fn fill_with(seed: u64, stream: u64, offset: u64, out: &mut [f32], f: impl Fn(u32) -> f32 + Sync) {
    crate::par::for_chunks_mut(out, |start, chunk| {
        let mut cached: Option<(u64, [u32; 4])> = None;
        for (i, o) in chunk.iter_mut().enumerate() {
            let index = offset + (start + i) as u64;
            let b = index / 4;
            let words = match cached {
                Some((cb, w)) if cb == b => w,
                _ => {
                    let w = block(seed, stream, index);
                    cached = Some((b, w));
                    w
                }
            };
            *o = f(words[(index % 4) as usize]);
        }
    });
}

/// Fill with uniform [0, 1) draws of elements `offset..offset + out.len()`.
pub fn fill_uniform(seed: u64, stream: u64, offset: u64, out: &mut [f32]) {
    fill_with(seed, stream, offset, out, uniform_from_bits);
}

/// Fill with `mean + std * normal` draws of elements `offset..offset + out.len()`
/// (one multiply, then one add).
pub fn fill_normal(seed: u64, stream: u64, offset: u64, mean: f32, std: f32, out: &mut [f32]) {
    fill_with(seed, stream, offset, out, |r| mean + std * normal_quantile(uniform_open_from_bits(r)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random123_known_answers() {
        // Known-answer vectors of Philox4x32-10 from the Random123 distribution.
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]);
        assert_eq!(
            philox4x32_10([0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344], [0xa409_3822, 0x299f_31d0]),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn draws_are_keyed_by_element_whatever_the_threads() {
        let n = 100_003;
        let mut want = vec![0f32; n];
        for (i, w) in want.iter_mut().enumerate() {
            *w = 0.5 + 0.02 * normal(42, stream(1, 7, 3), 1000 + i as u64);
        }
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut got = vec![0f32; n];
            pool.install(|| fill_normal(42, stream(1, 7, 3), 1000, 0.5, 0.02, &mut got));
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "threads={threads}");
        }
        // A sub-range drawn on its own equals the same elements of the whole.
        let mut part = vec![0f32; 10];
        fill_normal(42, stream(1, 7, 3), 1000 + 5001, 0.5, 0.02, &mut part);
        assert_eq!(&part[..], &want[5001..5011]);
        // Different streams and seeds differ.
        assert_ne!(bits(42, stream(1, 7, 3), 0), bits(42, stream(1, 7, 4), 0));
        assert_ne!(bits(42, 0, 0), bits(43, 0, 0));
    }

    #[test]
    fn distributions() {
        let n = 1 << 20;
        let mut u = vec![0f32; n];
        fill_uniform(1, 2, 0, &mut u);
        let mean_u = u.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        assert!((mean_u - 0.5).abs() < 2e-3, "uniform mean {mean_u}");
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mut z = vec![0f32; n];
        fill_normal(1, 3, 0, 0.0, 1.0, &mut z);
        let mean = z.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = z.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let tail = z.iter().filter(|&&x| x.abs() > 1.959_964).count() as f64 / n as f64;
        assert!(mean.abs() < 4e-3, "normal mean {mean}");
        assert!((var - 1.0).abs() < 6e-3, "normal variance {var}");
        assert!((tail - 0.05).abs() < 1.5e-3, "two-sided 5% tail {tail}");
        assert!(z.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn quantile_values() {
        for (p, want) in [(0.975f32, 1.959_964f32), (0.5, 0.0), (0.001, -3.090_232), (0.999_9, 3.719_016)] {
            let got = normal_quantile(p);
            assert!((got - want).abs() < 2e-4 * want.abs().max(1.0), "p={p}: {got} vs {want}");
        }
        let extreme = normal_quantile(uniform_open_from_bits(0));
        assert!(extreme.is_finite() && extreme < -5.0);
    }
}
