//! The `exact` GEMM (contract rule 6): `C = (A x B) * scale` where, for every output
//! element, the accumulator starts at +0 and takes one `fma(a[i][p], b[p][j], acc)`
//! per p = 0, 1, ..., k-1 in ascending order, in f32; the scale product (for FP8
//! inputs `(1/s_a) * (1/s_b)`, computed by the caller in f32) multiplies the finished
//! accumulator once. FP8 x FP8 and BF16 x BF16 products are exact in f32, so the only
//! roundings are the k additions inside the fma chain and the final multiply.
//!
//! The fast implementation is a BLIS-style blocked GEMM: operands are decoded to f32
//! while being packed, and register-tiled micro-kernels (AVX-512, AVX2 or portable)
//! vectorise over output *columns*. k is blocked for the caches, but an output tile's
//! accumulators are stored and reloaded between k blocks, never summed from partial
//! results, so every element still sees the same fma chain as [`gemm_naive`]. Work is
//! split over output tiles (never over k), so the thread count cannot change a bit.
//!
//! Operands are strided views ([`MatRef`]), which covers every layout of the linear
//! layer: forward `Y = X W^T`, data gradient `dX = dY W`, weight gradient `dW = dY^T X`
//! (see [`forward`], [`dgrad`], [`wgrad`]).

use crate::fp8::Fp8Format;
use crate::half16::bf16;
use rayon::prelude::*;

/// The element data of one operand.
#[derive(Clone, Copy, Debug)]
pub enum Operand<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    /// FP8 codes of the given format (unscaled values; the scales go into `scale`).
    Fp8(&'a [u8], Fp8Format),
}

impl Operand<'_> {
    fn len(&self) -> usize {
        match self {
            Operand::F32(d) => d.len(),
            Operand::Bf16(d) => d.len(),
            Operand::Fp8(d, _) => d.len(),
        }
    }

    /// Short type name, e.g. for error messages and benchmark tables.
    pub fn type_name(&self) -> &'static str {
        match self {
            Operand::F32(_) => "f32",
            Operand::Bf16(_) => "bf16",
            Operand::Fp8(_, Fp8Format::E4M3) => "e4m3",
            Operand::Fp8(_, Fp8Format::E5M2) => "e5m2",
        }
    }
}

/// A strided matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: Operand<'a>,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn row_major(data: Operand<'a>, rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    fn check_bounds(&self, name: &str) -> Result<(), GemmError> {
        if self.rows == 0 || self.cols == 0 {
            return Ok(());
        }
        let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        if last >= self.data.len() {
            return Err(GemmError::Shape(format!(
                "operand {name} ({} x {}, strides {} / {}) needs {} elements but has {}",
                self.rows,
                self.cols,
                self.row_stride,
                self.col_stride,
                last + 1,
                self.data.len()
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GemmError {
    #[error("gemm shape error: {0}")]
    Shape(String),
    #[error(
        "gemm: unsupported operand types {0} x {1} (allowed: f32 x f32, bf16 x bf16, FP8 x FP8 except e5m2 x e5m2)"
    )]
    Types(&'static str, &'static str),
}

/// Check shapes and operand types; returns (m, n, k).
fn validate(a: &MatRef, b: &MatRef, c_len: usize) -> Result<(usize, usize, usize), GemmError> {
    use Operand::*;
    match (a.data, b.data) {
        (F32(_), F32(_)) | (Bf16(_), Bf16(_)) => {}
        (Fp8(_, fa), Fp8(_, fb)) if !(fa == Fp8Format::E5M2 && fb == Fp8Format::E5M2) => {}
        _ => return Err(GemmError::Types(a.data.type_name(), b.data.type_name())),
    }
    if a.cols != b.rows {
        return Err(GemmError::Shape(format!(
            "inner dimensions differ: A is {} x {}, B is {} x {}",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    a.check_bounds("A")?;
    b.check_bounds("B")?;
    if c_len != a.rows * b.cols {
        return Err(GemmError::Shape(format!(
            "output has {} elements, expected {} x {} = {}",
            c_len,
            a.rows,
            b.cols,
            a.rows * b.cols
        )));
    }
    Ok((a.rows, b.cols, a.cols))
}

/// The specification, written as the plain triple loop. Slow; the reference for tests.
pub fn gemm_naive(a: MatRef, b: MatRef, scale: f32) -> Result<Vec<f32>, GemmError> {
    let mut c = vec![0f32; a.rows * b.cols];
    let (m, n, k) = validate(&a, &b, c.len())?;
    let get = |x: &MatRef, i: usize, j: usize| -> f32 {
        let idx = i * x.row_stride + j * x.col_stride;
        match x.data {
            Operand::F32(d) => d[idx],
            Operand::Bf16(d) => d[idx].to_f32(),
            Operand::Fp8(d, f) => crate::fp8::decode(f, d[idx]),
        }
    };
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f32;
            for p in 0..k {
                acc = get(&a, i, p).mul_add(get(&b, p, j), acc);
            }
            c[i * n + j] = acc * scale;
        }
    }
    Ok(c)
}

/// Which micro-kernel runs. All give identical bits; they differ in speed only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable `mul_add` kernel (4 x 8 tile).
    Portable,
    /// AVX2 + FMA (6 x 16 tile).
    Avx2,
    /// AVX-512F (8 x 32 tile).
    Avx512,
}

impl Isa {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every kernel this CPU can run.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    /// Register tile (rows, columns).
    fn tile(self) -> (usize, usize) {
        match self {
            Isa::Portable => (4, 8),
            Isa::Avx2 => (6, 16),
            Isa::Avx512 => (8, 32),
        }
    }
}

/// Cache blocking: k block, rows per task, columns per packed B panel.
const KC: usize = 256;
const MC: usize = 96; // a multiple of every tile's rows
const NC: usize = 4096; // a multiple of every tile's columns

/// Element access after decoding to f32, monomorphised per operand type.
trait Source: Sync {
    fn get(&self, idx: usize) -> f32;
}
struct SrcF32<'a>(&'a [f32]);
struct SrcBf16<'a>(&'a [bf16]);
struct SrcFp8<'a>(&'a [u8], &'static [f32; 256]);
impl Source for SrcF32<'_> {
    #[inline(always)]
    fn get(&self, idx: usize) -> f32 {
        self.0[idx]
    }
}
impl Source for SrcBf16<'_> {
    #[inline(always)]
    fn get(&self, idx: usize) -> f32 {
        self.0[idx].to_f32()
    }
}
impl Source for SrcFp8<'_> {
    #[inline(always)]
    fn get(&self, idx: usize) -> f32 {
        self.1[self.0[idx] as usize]
    }
}

/// Strided view over a decoded source.
struct View<S> {
    src: S,
    rs: usize,
    cs: usize,
}

/// `C = (A x B) * scale` by the contract's exact rule, on rayon's current pool, with
/// the fastest kernel of this CPU. `c` is row-major `m x n`.
pub fn gemm_exact(a: MatRef, b: MatRef, scale: f32, c: &mut [f32]) -> Result<(), GemmError> {
    gemm_exact_isa(Isa::best(), a, b, scale, c)
}

/// `C += A x B`: the fma chain of every element continues from the value in `c`
/// instead of +0 (scale 1). A product over k = k1 + k2 split into two calls, the
/// second accumulating, gives the bits of one call over the whole k (the chunked LM
/// head's weight gradient).
pub fn gemm_exact_accumulate(a: MatRef, b: MatRef, c: &mut [f32]) -> Result<(), GemmError> {
    exact(Isa::best(), a, b, 1.0, c, true)
}

/// [`gemm_exact`] with a chosen kernel (tests run every kernel).
pub fn gemm_exact_isa(isa: Isa, a: MatRef, b: MatRef, scale: f32, c: &mut [f32]) -> Result<(), GemmError> {
    exact(isa, a, b, scale, c, false)
}

fn exact(isa: Isa, a: MatRef, b: MatRef, scale: f32, c: &mut [f32], accumulate: bool) -> Result<(), GemmError> {
    validate(&a, &b, c.len())?;
    if !Isa::available().contains(&isa) {
        return Err(GemmError::Shape(format!("kernel {isa:?} is not supported by this CPU")));
    }
    macro_rules! view {
        ($m:expr, $src:expr) => {
            View { src: $src, rs: $m.row_stride, cs: $m.col_stride }
        };
    }
    match (a.data, b.data) {
        (Operand::F32(x), Operand::F32(y)) => run(isa, &a, view!(a, SrcF32(x)), &b, view!(b, SrcF32(y)), c, accumulate),
        (Operand::Bf16(x), Operand::Bf16(y)) => {
            run(isa, &a, view!(a, SrcBf16(x)), &b, view!(b, SrcBf16(y)), c, accumulate)
        }
        (Operand::Fp8(x, fx), Operand::Fp8(y, fy)) => {
            let (va, vb) = (view!(a, SrcFp8(x, fx.decode_table())), view!(b, SrcFp8(y, fy.decode_table())));
            run(isa, &a, va, &b, vb, c, accumulate)
        }
        _ => unreachable!("validated above"),
    }
    if scale != 1.0 {
        crate::par::for_chunks_mut(c, |_, chunk| {
            for v in chunk {
                *v *= scale;
            }
        });
    }
    Ok(())
}

/// A raw output pointer shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// Through a method, so closures capture the whole (Sync) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn run<SA: Source, SB: Source>(
    isa: Isa,
    am: &MatRef,
    a: View<SA>,
    bm: &MatRef,
    b: View<SB>,
    c: &mut [f32],
    accumulate: bool,
) {
    let (m, n, k) = (am.rows, bm.cols, am.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let (mr, nr) = isa.tile();
    let out = OutPtr(c.as_mut_ptr());
    let threads = rayon::current_num_threads().max(1);
    let mut bpack: Vec<f32> = Vec::new();
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        let slivers = nc.div_ceil(nr);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let first = pc == 0 && !accumulate; // start from +0, else from the stored value
                                                // Pack B[pc..pc+kc, jc..jc+nc] as column slivers of width nr, zero-padded.
            bpack.clear();
            bpack.resize(slivers * nr * kc, 0.0);
            bpack.par_chunks_mut(nr * kc).enumerate().for_each(|(s, dst)| {
                let j0 = jc + s * nr;
                let w = nr.min(n - j0);
                for p in 0..kc {
                    let row = &mut dst[p * nr..p * nr + w];
                    let base = (pc + p) * b.rs + j0 * b.cs;
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = b.src.get(base + j * b.cs);
                    }
                }
            });
            // Tasks: row blocks of MC, and when there are too few of them for the
            // threads, column groups of slivers as well.
            let row_blocks = m.div_ceil(MC);
            let col_groups = (2 * threads).div_ceil(row_blocks).clamp(1, slivers);
            let per_group = slivers.div_ceil(col_groups);
            let bpack = &bpack;
            let a = &a;
            (0..row_blocks * col_groups).into_par_iter().for_each(|t| {
                let (ib, g) = (t / col_groups, t % col_groups);
                let ic = ib * MC;
                let mc = MC.min(m - ic);
                let panels = mc.div_ceil(mr);
                // Pack A[ic..ic+mc, pc..pc+kc] as row panels of height mr, zero-padded.
                let mut apack = vec![0f32; panels * mr * kc];
                for (pi, dst) in apack.chunks_mut(mr * kc).enumerate() {
                    let i0 = ic + pi * mr;
                    let h = mr.min(m - i0);
                    for p in 0..kc {
                        let base = i0 * a.rs + (pc + p) * a.cs;
                        for r in 0..h {
                            dst[p * mr + r] = a.src.get(base + r * a.rs);
                        }
                    }
                }
                let s_end = ((g + 1) * per_group).min(slivers);
                for s in g * per_group..s_end {
                    let j0 = jc + s * nr;
                    let w = nr.min(n - j0);
                    let bp = &bpack[s * nr * kc..(s + 1) * nr * kc];
                    for (pi, ap) in apack.chunks(mr * kc).enumerate() {
                        let i0 = ic + pi * mr;
                        let h = mr.min(m - i0);
                        // SAFETY: tile (i0..i0+h, j0..j0+w) lies inside the m x n output
                        // and belongs to this task alone.
                        unsafe { tile(isa, kc, ap, bp, out.get().add(i0 * n + j0), n, h, w, first) };
                    }
                }
            });
        }
    }
}

/// Run one register tile: `C[h x w] (+)= Apanel x Bsliver` over kc steps. Partial
/// tiles go through a full-size scratch tile.
///
/// # Safety
/// `c` must point to an `h x w` block with row stride `ldc` that nobody else touches.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(isa: Isa, kc: usize, a: &[f32], b: &[f32], c: *mut f32, ldc: usize, h: usize, w: usize, first: bool) {
    let (mr, nr) = isa.tile();
    let full = h == mr && w == nr;
    let mut scratch = [0f32; 8 * 32];
    let (dst, ld) = if full {
        (c, ldc)
    } else {
        if !first {
            for r in 0..h {
                for j in 0..w {
                    scratch[r * nr + j] = *c.add(r * ldc + j);
                }
            }
        }
        (scratch.as_mut_ptr(), nr)
    };
    let load = !first || !full;
    match isa {
        Isa::Portable => kernel_portable(kc, a, b, dst, ld, load),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::kernel_avx2(kc, a.as_ptr(), b.as_ptr(), dst, ld, load),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::kernel_avx512(kc, a.as_ptr(), b.as_ptr(), dst, ld, load),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("x86 kernels are not offered on this architecture"),
    }
    if !full {
        for r in 0..h {
            for j in 0..w {
                *c.add(r * ldc + j) = scratch[r * nr + j];
            }
        }
    }
}

/// Portable 4 x 8 kernel: the fma chain written with `mul_add`.
unsafe fn kernel_portable(kc: usize, a: &[f32], b: &[f32], c: *mut f32, ldc: usize, load: bool) {
    const MR: usize = 4;
    const NR: usize = 8;
    let mut acc = [[0f32; NR]; MR];
    if load {
        for (r, row) in acc.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = *c.add(r * ldc + j);
            }
        }
    }
    for p in 0..kc {
        let bv = &b[p * NR..p * NR + NR];
        for (r, row) in acc.iter_mut().enumerate() {
            let av = a[p * MR + r];
            for (v, &bj) in row.iter_mut().zip(bv) {
                *v = av.mul_add(bj, *v);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            *c.add(r * ldc + j) = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX2 6 x 16 kernel: 12 accumulators, one broadcast of A and two loads of B per k.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_avx2(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, load: bool) {
        const MR: usize = 6;
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        if load {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = _mm256_loadu_ps(c.add(r * ldc));
                row[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
            }
        }
        for p in 0..kc {
            let b0 = _mm256_loadu_ps(b.add(p * 16));
            let b1 = _mm256_loadu_ps(b.add(p * 16 + 8));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(p * MR + r));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), row[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), row[1]);
        }
    }

    /// AVX-512 8 x 32 kernel: 16 accumulators, one broadcast of A and two loads of B per k.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_avx512(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, load: bool) {
        const MR: usize = 8;
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if load {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(c.add(r * ldc));
                row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
            }
        }
        for p in 0..kc {
            let b0 = _mm512_loadu_ps(b.add(p * 32));
            let b1 = _mm512_loadu_ps(b.add(p * 32 + 16));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(p * MR + r));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc), row[0]);
            _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
        }
    }
}

/// Linear forward: `Y[m x n] = (X[m x k] x W[n x k]^T) * scale`.
pub fn forward(
    x: Operand,
    w: Operand,
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    y: &mut [f32],
) -> Result<(), GemmError> {
    gemm_exact(MatRef::row_major(x, m, k), MatRef::row_major(w, n, k).t(), scale, y)
}

/// Linear data gradient: `dX[m x k] = (dY[m x n] x W[n x k]) * scale`.
pub fn dgrad(
    dy: Operand,
    w: Operand,
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    dx: &mut [f32],
) -> Result<(), GemmError> {
    gemm_exact(MatRef::row_major(dy, m, n), MatRef::row_major(w, n, k), scale, dx)
}

/// Linear weight gradient: `dW[n x k] = (dY[m x n]^T x X[m x k]) * scale`.
pub fn wgrad(
    dy: Operand,
    x: Operand,
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    dw: &mut [f32],
) -> Result<(), GemmError> {
    gemm_exact(MatRef::row_major(dy, m, n).t(), MatRef::row_major(x, m, k), scale, dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulating_over_a_split_k_gives_the_bits_of_one_product() {
        let (m, n, k1, k2) = (37, 29, 300, 211);
        let k = k1 + k2;
        let val = |i: usize| ((i as f32 * 0.754_877_6).sin() * 3.0).round() / 8.0 + (i % 7) as f32 * 1e-3;
        let a: Vec<f32> = (0..k * m).map(val).collect(); // A^T stored [k x m] (the wgrad layout)
        let b: Vec<f32> = (0..k * n).map(|i| val(i + 99)).collect();
        let at =
            |r: std::ops::Range<usize>| MatRef::row_major(Operand::F32(&a[r.start * m..r.end * m]), r.len(), m).t();
        let bt = |r: std::ops::Range<usize>| MatRef::row_major(Operand::F32(&b[r.start * n..r.end * n]), r.len(), n);
        let mut whole = vec![0f32; m * n];
        gemm_exact(at(0..k), bt(0..k), 1.0, &mut whole).unwrap();
        let mut split = vec![0f32; m * n];
        gemm_exact(at(0..k1), bt(0..k1), 1.0, &mut split).unwrap();
        gemm_exact_accumulate(at(k1..k), bt(k1..k), &mut split).unwrap();
        assert!(whole.iter().zip(&split).all(|(x, y)| x.to_bits() == y.to_bits()));
        let naive = gemm_naive(at(0..k), bt(0..k), 1.0).unwrap();
        assert!(whole.iter().zip(&naive).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
