//! The `fast` GEMM class: cuBLASLt (FP8 E4M3 x E4M3 forward, E5M2 x E4M3 backward,
//! BF16 x BF16), fast accumulation off, with the scale product applied through the A
//! scale pointer. Both operands are passed K-major ("TN", what Hopper's FP8 tensor cores
//! take), so the data and weight gradients use transposed copies. Held to a measured
//! error bound against the exact class (see `fp8train verify`), never to bits. Each
//! problem's algorithm is chosen once per process by timing the heuristic's first
//! candidates (`FP8TRAIN_LT_TUNE`, default 8; 1 keeps the heuristic's first, the same
//! choice in every run): two runs may pick different algorithms, hence differ in the
//! products' last bits, as PyTorch's autotuned kernels do.

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use std::ffi::c_void;
use std::sync::Arc;

/// How a product's operand is laid out in memory (row-major): K-major (rows of K
/// elements: `A[m x k]`, `B[n x k]`) or the transpose of that.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Major {
    K,
    /// `A` stored as `[k x m]`, `B` stored as `[k x n]`.
    Outer,
}

/// Where a product goes: f32 `D` (with `accumulate`, added to what it holds), or BF16
/// `D`, with a per-column bias (BF16, one per output column) added in cuBLASLt's epilogue
/// when `bias` is not 0.
/// (The residual add in the epilogue, C = the residual stream with an f32 or BF16 bias,
/// was measured slower than the product + `residual_forward` on an H200 and dropped.)
#[derive(Clone, Copy, Debug)]
pub enum LtOut {
    F32(u64),
    Bf16 { d: u64, bias: u64 },
}

/// What selects an algorithm: the problem, not the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AlgoKey {
    ta: LtType,
    tb: LtType,
    ma: Major,
    mb: Major,
    m: usize,
    n: usize,
    k: usize,
    amax: bool,
    /// The bias epilogue.
    epilogue: bool,
    /// BF16 out (else f32).
    bf16_out: bool,
}

pub struct Lt {
    handle: sys::cublasLtHandle_t,
    /// The algorithm of each problem: the fastest of the heuristic's first candidates,
    /// timed on the problem's first product that overwrites its output (see `tune`).
    algos: std::collections::HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>,
    /// Candidates timed per problem (`FP8TRAIN_LT_TUNE`, default 8; 1 = the heuristic's
    /// first, the same algorithm in every run).
    tune: usize,
    /// Problems the heuristic had no algorithm for (not asked again).
    refused: std::collections::HashSet<AlgoKey>,
    workspace: CudaSlice<u8>,
    /// cuBLASLt refused the output amax once (it does for f32 outputs on CUDA 13 /
    /// H200): stop asking.
    amax_refused: bool,
}

const WORKSPACE: usize = 32 << 20;

/// Element type of an operand as cuBLASLt names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LtType {
    E4M3,
    E5M2,
    Bf16,
}

impl LtType {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            LtType::E4M3 => sys::cudaDataType::CUDA_R_8F_E4M3,
            LtType::E5M2 => sys::cudaDataType::CUDA_R_8F_E5M2,
            LtType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        }
    }
}

impl Lt {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Lt, String> {
        // SAFETY: only tries to load the library.
        if !unsafe { sys::is_culib_present() } {
            return Err("cuBLASLt (libcublasLt.so) is not present; put its folder on LD_LIBRARY_PATH".into());
        }
        let handle = result::create_handle().map_err(|e| format!("cuBLASLt: {e:?}"))?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE).map_err(|e| format!("CUDA: {e}"))?;
        let tune =
            std::env::var("FP8TRAIN_LT_TUNE").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(8).clamp(1, 32);
        Ok(Lt { handle, workspace, amax_refused: false, algos: Default::default(), refused: Default::default(), tune })
    }

    /// Row-major `C[m x n] = (A x B^T) * scale * sa * sb` for A (m x k) and B (n x k)
    /// laid out as `ma`, `mb` say; `scale` a host value (alpha), `sa`, `sb` device
    /// addresses of FP8 operands' inverse scales (cuBLASLt's scale pointers; not read
    /// for BF16 products). FP8 operands must be K-major (what Hopper's FP8 tensor cores
    /// take); BF16 ones may be either.
    /// Returns Err when cuBLASLt has no algorithm for the shape (the caller falls back).
    /// With `amax_dev`, FP8 products also ask cuBLASLt for the output's amax; if that
    /// combination is refused, the product runs without it (Ok(false)).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &mut self,
        stream: &Arc<CudaStream>,
        c: LtOut,
        a: (u64, LtType, Major),
        b: (u64, LtType, Major),
        (m, n, k): (usize, usize, usize),
        scale: f32,
        scale_ptrs: (u64, u64),
        amax_dev: Option<&mut CudaSlice<f32>>,
        accumulate: bool,
    ) -> Result<bool, String> {
        if let Some(am) = amax_dev.filter(|_| !self.amax_refused) {
            let (ap, _) = am.device_ptr_mut(stream);
            if self.run(stream, c, a, b, (m, n, k), scale, scale_ptrs, Some(ap), accumulate).is_ok() {
                return Ok(true);
            }
            self.amax_refused = true;
        }
        self.run(stream, c, a, b, (m, n, k), scale, scale_ptrs, None, accumulate).map(|_| false)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        stream: &Arc<CudaStream>,
        c: LtOut,
        (a_ptr, ta, ma): (u64, LtType, Major),
        (b_ptr, tb, mb): (u64, LtType, Major),
        (m, n, k): (usize, usize, usize),
        scale: f32,
        (sa, sb): (u64, u64),
        amax_ptr: Option<u64>,
        accumulate: bool,
    ) -> Result<(), String> {
        let err = |e: cudarc::cublaslt::result::CublasError| format!("cuBLASLt: {e:?}");
        // Column-major: D[n x m] = op(A')[n x k] * op(B')[k x m] with A' = our B and
        // B' = our A. K-major B is column-major k x n (ld k), used transposed; K-major A
        // is column-major k x m (ld k), used as is; the outer-major forms the other way.
        unsafe {
            let desc =
                result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
                    .map_err(err)?;
            let set = |attr, v: *const c_void, size: usize| result::set_matmul_desc_attribute(desc, attr, v, size);
            let trans_a: i32 = i32::from(mb == Major::K);
            let trans_b: i32 = i32::from(ma == Major::Outer);
            let fast: i8 = 0;
            set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &trans_a as *const i32 as _, 4)
                .map_err(err)?;
            set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &trans_b as *const i32 as _, 4)
                .map_err(err)?;
            let fp8 = ta != LtType::Bf16;
            if fp8 {
                set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast as *const i8 as _, 1)
                    .map_err(err)?;
                // (cuBLASLt's A is our B and its B our A: see above.)
                set(
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                    &sb as *const u64 as _,
                    8,
                )
                .map_err(err)?;
                set(
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                    &sa as *const u64 as _,
                    8,
                )
                .map_err(err)?;
                if let Some(ap) = amax_ptr {
                    set(
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_AMAX_D_POINTER,
                        &ap as *const u64 as _,
                        8,
                    )
                    .map_err(err)?;
                }
            }
            let la = match mb {
                Major::K => result::create_matrix_layout(tb.cuda(), k as u64, n as u64, k as i64),
                Major::Outer => result::create_matrix_layout(tb.cuda(), n as u64, k as u64, n as i64),
            }
            .map_err(err)?;
            let lb = match ma {
                Major::K => result::create_matrix_layout(ta.cuda(), k as u64, m as u64, k as i64),
                Major::Outer => result::create_matrix_layout(ta.cuda(), m as u64, k as u64, m as i64),
            }
            .map_err(err)?;
            let with_bias = |bias: u64, bty: sys::cudaDataType| {
                let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
                set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi as *const _ as _, 4)?;
                set(
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias as *const u64 as _,
                    8,
                )?;
                set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bty as *const _ as _, 4)
            };
            let (dptr, dty) = match c {
                LtOut::F32(d) => (d, sys::cudaDataType::CUDA_R_32F),
                LtOut::Bf16 { d, bias } => {
                    if bias != 0 {
                        with_bias(bias, sys::cudaDataType::CUDA_R_16BF).map_err(err)?;
                    }
                    (d, sys::cudaDataType::CUDA_R_16BF)
                }
            };
            let ld = result::create_matrix_layout(dty, n as u64, m as u64, n as i64).map_err(err)?;
            let pref = result::create_matmul_pref().map_err(err)?;
            let ws = WORKSPACE as u64;
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as _,
                8,
            )
            .map_err(err)?;
            let epilogue = matches!(c, LtOut::Bf16 { bias, .. } if bias != 0);
            let bf16_out = matches!(c, LtOut::Bf16 { .. });
            let key = AlgoKey { ta, tb, ma, mb, m, n, k, amax: amax_ptr.is_some(), epilogue, bf16_out };
            // alpha carries the host's scale; FP8 operands' inverse scales come by pointer.
            let alpha: f32 = scale;
            // D = C = c: beta 1 adds the product to what c holds.
            let beta: f32 = if accumulate { 1.0 } else { 0.0 };
            let (wptr, _) = self.workspace.device_ptr_mut(stream);
            let handle = self.handle;
            let launch = |algo: &sys::cublasLtMatmulAlgo_t| {
                result::matmul(
                    handle,
                    desc,
                    &alpha as *const f32 as _,
                    &beta as *const f32 as _,
                    b_ptr as *const c_void,
                    la,
                    a_ptr as *const c_void,
                    lb,
                    dptr as *const c_void,
                    ld,
                    dptr as *mut c_void,
                    ld,
                    algo,
                    wptr as *mut c_void,
                    WORKSPACE,
                    stream.cu_stream() as _,
                )
                .map_err(err)
            };
            let outcome = (|| {
                if self.refused.contains(&key) {
                    return Err("cuBLASLt has no algorithm for this problem".to_string());
                }
                let algo = match self.algos.get(&key) {
                    Some(a) => *a,
                    None => {
                        let want = if accumulate { 1 } else { self.tune };
                        let cands = heuristic(handle, desc, la, lb, ld, pref, want).map_err(|e| {
                            self.refused.insert(key);
                            err(e)
                        })?;
                        // A product that adds to its output is not run more than once: it
                        // takes the heuristic's first without keeping it (a later product
                        // of the problem that overwrites its output times the candidates).
                        if accumulate {
                            return launch(&cands[0]);
                        }
                        let best = fastest(stream, &cands, &launch).unwrap_or(cands[0]);
                        self.algos.insert(key, best);
                        best
                    }
                };
                launch(&algo)
            })();
            let _ = result::destroy_matmul_pref(pref);
            let _ = result::destroy_matrix_layout(la);
            let _ = result::destroy_matrix_layout(lb);
            let _ = result::destroy_matrix_layout(ld);
            let _ = result::destroy_matmul_desc(desc);
            outcome
        }
    }
}

/// Up to `count` of the heuristic's algorithms for a problem, best first (at least one).
/// # Safety
/// The handles are live cuBLASLt objects of one problem.
unsafe fn heuristic(
    handle: sys::cublasLtHandle_t,
    desc: sys::cublasLtMatmulDesc_t,
    la: sys::cublasLtMatrixLayout_t,
    lb: sys::cublasLtMatrixLayout_t,
    ld: sys::cublasLtMatrixLayout_t,
    pref: sys::cublasLtMatmulPreference_t,
    count: usize,
) -> Result<Vec<sys::cublasLtMatmulAlgo_t>, cudarc::cublaslt::result::CublasError> {
    let mut out: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(count);
    let mut got = 0i32;
    // SAFETY: `out` has room for `count` results; cuBLASLt writes `got` of them.
    unsafe {
        sys::cublasLtMatmulAlgoGetHeuristic(
            handle,
            desc,
            la,
            lb,
            ld,
            ld,
            pref,
            count as i32,
            out.as_mut_ptr(),
            &mut got,
        )
        .result()?;
        out.set_len((got.max(0) as usize).min(count));
    }
    let algos: Vec<_> =
        out.iter().filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS).map(|r| r.algo).collect();
    if algos.is_empty() {
        return Err(cudarc::cublaslt::result::CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED));
    }
    Ok(algos)
}

/// The candidate with the shortest time over 5 runs after one warm-up (CUDA events on
/// the stream; the product's output is overwritten each run, the caller runs the chosen
/// one last), where it beats the heuristic's first (`cands[0]`) by 2% or more (else
/// that one: a timing difference smaller than the noise of one measurement is not a
/// reason to leave the heuristic). None when timing fails; candidates that fail to
/// launch are skipped.
fn fastest(
    stream: &Arc<CudaStream>,
    cands: &[sys::cublasLtMatmulAlgo_t],
    launch: &dyn Fn(&sys::cublasLtMatmulAlgo_t) -> Result<(), String>,
) -> Option<sys::cublasLtMatmulAlgo_t> {
    if cands.len() < 2 {
        return cands.first().copied();
    }
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut best: Option<(f32, sys::cublasLtMatmulAlgo_t)> = None;
    let mut first = None;
    for (i, algo) in cands.iter().enumerate() {
        if launch(algo).is_err() {
            continue;
        }
        let start = stream.record_event(flags).ok()?;
        if (0..5).any(|_| launch(algo).is_err()) {
            continue;
        }
        let end = stream.record_event(flags).ok()?;
        end.synchronize().ok()?;
        let ms = start.elapsed_ms(&end).ok()?;
        if i == 0 {
            first = Some(ms);
        }
        if best.is_none_or(|(b, _)| ms < b) {
            best = Some((ms, *algo));
        }
    }
    match (first, best) {
        (Some(f), Some((b, _))) if b > 0.98 * f => Some(cands[0]),
        (_, best) => best.map(|(_, a)| a),
    }
}
