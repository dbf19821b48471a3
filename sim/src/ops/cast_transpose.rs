//! Fused cast + transpose into FP8: from one read of `x` (row-major `rows x cols`),
//! the saturating scaled FP8 codes in both layouts and the amax of `x`.
//!
//! The backward pass needs both: the forward GEMM reads the activation as `X`
//! (rows = tokens) and the weight-gradient GEMM reads it as `X^T`; Hopper's FP8
//! tensor cores take only K-major operands, so the GPU path keeps both copies.
//! Every code equals `encode(fmt, x * scale, true)`, so both layouts hold the same
//! values and match [`crate::fp8::encode_scaled`] bit for bit.

use crate::fp8::{encode, Fp8Format};
use crate::scaling::ScaledTensor;
use rayon::prelude::*;

/// Tile edge of the blocked transpose.
const TILE: usize = 32;

/// Result of [`cast_transpose`].
#[derive(Clone, Debug, PartialEq)]
pub struct CastTransposed {
    /// `rows x cols` codes.
    pub q: ScaledTensor,
    /// `cols x rows` codes (the transpose), same scale.
    pub qt: ScaledTensor,
    /// amax of the input (NaN if it holds a NaN), for delayed scaling.
    pub amax: f32,
}

#[derive(Clone, Copy)]
struct OutPtr(*mut u8);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// Through a method, so closures capture the whole (Sync) wrapper.
    fn get(self) -> *mut u8 {
        self.0
    }
}

/// Cast `x` (`rows x cols`, row-major) to FP8 with `scale`, in both layouts.
pub fn cast_transpose(x: &[f32], rows: usize, cols: usize, fmt: Fp8Format, scale: f32) -> CastTransposed {
    assert_eq!(x.len(), rows * cols, "cast_transpose: data length is not rows x cols");
    let mut q = vec![0u8; x.len()];
    let mut qt = vec![0u8; x.len()];
    let qt_ptr = OutPtr(qt.as_mut_ptr());
    let amax_nan = if rows == 0 || cols == 0 {
        (0.0f32, false)
    } else {
        q.par_chunks_mut(TILE * cols)
            .enumerate()
            .map(|(rb, qrows)| {
                let r0 = rb * TILE;
                let h = qrows.len() / cols;
                let (mut amax, mut nan) = (0.0f32, false);
                for c0 in (0..cols).step_by(TILE) {
                    let w = TILE.min(cols - c0);
                    for r in 0..h {
                        for c in c0..c0 + w {
                            let v = x[(r0 + r) * cols + c];
                            let a = v.abs();
                            nan |= v.is_nan();
                            amax = if a > amax { a } else { amax };
                            let code = encode(fmt, v * scale, true);
                            qrows[r * cols + c] = code;
                            // SAFETY: column block r0..r0+h of the transpose belongs to
                            // this task; (c, r0 + r) is inside the cols x rows output.
                            unsafe { *qt_ptr.get().add(c * rows + r0 + r) = code };
                        }
                    }
                }
                (amax, nan)
            })
            .reduce(|| (0.0, false), |a, b| (if b.0 > a.0 { b.0 } else { a.0 }, a.1 | b.1))
    };
    let amax = if amax_nan.1 { f32::NAN } else { amax_nan.0 };
    CastTransposed {
        q: ScaledTensor { codes: q, fmt, scale, shape: vec![rows, cols] },
        qt: ScaledTensor { codes: qt, fmt, scale, shape: vec![cols, rows] },
        amax,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fp8, reduce, rng};

    #[test]
    fn both_layouts_match_the_plain_cast() {
        for (rows, cols) in [(1, 1), (3, 70), (64, 32), (100, 33), (257, 129)] {
            let mut x = vec![0f32; rows * cols];
            rng::fill_normal(5, rows as u64, 0, 0.0, 3.0, &mut x);
            if x.len() > 10 {
                x[7] = 1e9; // saturates
            }
            for fmt in Fp8Format::ALL {
                let ct = cast_transpose(&x, rows, cols, fmt, 16.0);
                let mut want = vec![0u8; x.len()];
                fp8::encode_scaled(fmt, &x, 16.0, &mut want);
                assert_eq!(ct.q.codes, want);
                for r in 0..rows {
                    for c in 0..cols {
                        assert_eq!(ct.qt.codes[c * rows + r], want[r * cols + c]);
                    }
                }
                assert_eq!(ct.amax, reduce::amax(&x));
                assert_eq!(ct.qt.shape, vec![cols, rows]);
            }
        }
        let mut x = vec![1.0f32; 40 * 40];
        x[1000] = f32::NAN;
        let ct = cast_transpose(&x, 40, 40, Fp8Format::E4M3, 1.0);
        assert!(ct.amax.is_nan());
        assert_eq!(ct.q.codes[1000], fp8::SAT_NAN_CODE);
    }
}
