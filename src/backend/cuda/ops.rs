//! The CUDA backend: every op of the [`Backend`] interface as a kernel of `kernels/`
//! (same names, same operation order as the simulator). Buffers are device memory;
//! the steering scalars (amax, sums, loss) come back to the host. Kernels are written
//! for bit-identity first (one thread per row, per output element or per chunk).

use super::lt::{Lt, LtOut, LtType, Major};
use super::Gpu;
use crate::backend::{
    slot_amax, ActOut, AdamState, BResult, Backend, BackendError, CastStats, Delayed, Elem, EmbedTable, GeluIn,
    GradOut, GradRef, JitSrc, Later, LossGrad, MemoryStats, OpScratch, OpTime, Operand, Phase, Product, Scalar,
    ScaleSlot, Slot,
};
use crate::model::memory::Estimate;
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use cudarc::nccl::{Comm, Id, NcclType};
use fp8cluster::reduce::CommBytes;
use fp8cluster::world::{Collectives, World};
use fp8sim::half16::{bf16, f16};
use fp8sim::ops::adamw::{AdamStep, StepControl};
use fp8sim::ops::attention::AttnShape;
use fp8sim::scaling::scale_from_amax;
use fp8sim::Fp8Format;

/// Words of the kernels' `AdamItem` (adamw.cu) and elements per block of its launches.
const ADAM_ITEM_WORDS: usize = 32;
const ADAM_CHUNK: usize = 16384;

/// The kernels' `AdamStep` (adamw.cu) as table words, in its field order.
fn adam_step_words(h: &AdamStep) -> [u32; 10] {
    [h.lr, h.beta1, h.beta2, h.eps, h.omb1, h.omb2, h.bc1, h.bc2, h.decay, h.grad_scale].map(f32::to_bits)
}

/// One GPU as a backend.
pub struct Cuda {
    gpu: Gpu,
    /// NCCL communicator over the data-parallel ranks, made at the first reduction.
    nccl: std::cell::OnceCell<Comm>,
    /// cuBLASLt for the `fast` GEMM class (None: every GEMM is exact).
    lt: std::cell::RefCell<Option<Lt>>,
    /// Fast-class GEMMs that fell back to the exact kernel (no cuBLASLt algorithm).
    fallbacks: std::cell::Cell<u64>,
    /// The output amax cuBLASLt reported for the last fast FP8 GEMM (None: not offered).
    last_amax: std::cell::Cell<Option<f32>>,
    /// Ask cuBLASLt for FP8 GEMMs' output amax and read it back (verify only: a read-back
    /// per product would make the host wait on every GEMM).
    report_amax: std::cell::Cell<bool>,
    /// Kernels looked up once by name (with the dynamic shared memory they were opened for).
    functions: std::cell::RefCell<std::collections::HashMap<&'static str, (CudaFunction, u32)>>,
    /// With profiling on: an event where each op starts and ends (see [`Prof`]).
    profile: std::cell::RefCell<Option<Prof>>,
    /// GELU and its derivative factor of every BF16 code (gelu.cu), made at first use.
    gelu_tab: std::cell::OnceCell<CudaSlice<f32>>,
    /// Device copies of host scalars that kernels and cuBLASLt read by address
    /// (`Scalar::Host`: power-of-two scales, 1.0, mu in tests), by bit pattern: uploaded
    /// once, not once per use.
    scalars: std::cell::RefCell<std::collections::HashMap<u32, CudaSlice<f32>>>,
    /// Keep the `mma.sync` flash kernels on Hopper too (verify runs both kinds).
    flash_mma: std::cell::Cell<bool>,
    /// FP8TRAIN_FLASH=mma: the same for the whole process (read once, at start-up).
    flash_mma_env: bool,
    /// Streaming multiprocessors and the dynamic shared memory a block may opt into
    /// (bytes), read once at start-up (launch decisions on hot paths use them).
    sms: u32,
    max_smem: u32,
    /// The layernorm backward's launch per channel count (see `ln_chunks_launch`).
    ln_launch: std::cell::RefCell<std::collections::HashMap<usize, Option<(LaunchConfig, &'static str)>>>,
}

fn cfg(n: usize) -> LaunchConfig {
    let n = n.max(1) as u32;
    LaunchConfig { grid_dim: (n.div_ceil(128), 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
}

/// Kernels sized to run two blocks per SM in its largest shared-memory configuration,
/// which the driver is asked for (it may otherwise pick a smaller one that holds one).
const FULL_CARVEOUT: &[&str] = &["crossentropy_rows"];

/// Launch kernel `$name` over `$n` threads (or with the launch configuration `with $c`)
/// with the given arguments.
macro_rules! launch {
    ($self:expr, $name:expr, $n:expr, [$($arg:expr),* $(,)?]) => {
        launch!($self, $name, with cfg($n), [$($arg),*])
    };
    ($self:expr, $name:expr, with $c:expr, [$($arg:expr),* $(,)?]) => {{
        let c: LaunchConfig = $c;
        let f = $self.function($name, c.shared_mem_bytes)?;
        let mut b = $self.gpu.stream.launch_builder(&f);
        $( b.arg($arg); )*
        // SAFETY: every kernel checks its index against the sizes it is given.
        unsafe { b.launch(c) }.map_err(|e| BackendError::new(format!("CUDA kernel {}", $name), e))?;
    }};
}

/// Ends a phase (see [`Cuda::phase`]).
struct PhaseGuard<'a>(&'a Cuda);

/// One tensor of a multi-tensor amax / just-in-time cast (JitItem in elementwise.cu).
struct JitRow {
    src: u64,
    q: u64,
    at: usize,
    n: usize,
    f16: u32,
    /// Device address of the FP16 source's inverse scale (0: 1).
    inv: u64,
    /// Device address of the scale slot (scale in, scale and inverse out; 0: none).
    sslot: u64,
    e5m2: u32,
}

/// Where a product goes: f32, or BF16 rounded from the f32 result.
enum ProductOut<'a> {
    F32(&'a mut CudaSlice<f32>),
    Bf16(&'a mut CudaSlice<bf16>),
}
impl Drop for PhaseGuard<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Events in stream order: where each outermost op starts (with its phase and name) and
/// where it ends (`Phase::Idle`): the device time between an op's end and the next op's
/// start is time the GPU had nothing queued (launch and host gaps). Ops called inside
/// an op (adamw's casts) count as the outer op, except parts marked as their own
/// (`begin_part`: the FP8 products' transposed copies).
#[derive(Default)]
struct Prof {
    /// (phase, op, event, whether the mark starts a call of the op: a part of an op
    /// resumed after a sub-op does not).
    marks: Vec<(Phase, &'static str, cudarc::driver::CudaEvent, bool)>,
    depth: usize,
}

/// A buffer's device address.
/// The device address of element `at` of `b` (4-byte elements).
fn dptr_at(s: &std::sync::Arc<cudarc::driver::CudaStream>, b: &CudaSlice<f32>, at: usize) -> u64 {
    assert!(at < b.len(), "scalar {at} of a buffer of {}", b.len());
    dptr(s, b) + 4 * at as u64
}

fn dptr<T>(s: &std::sync::Arc<cudarc::driver::CudaStream>, b: &CudaSlice<T>) -> u64 {
    use cudarc::driver::DevicePtr;
    b.device_ptr(s).0
}

/// Whether a column kernel can take four adjacent columns per thread: `cols` a multiple
/// of 4 and every (address, alignment) pair aligned.
fn by_four(cols: u32, ptrs: &[(u64, u64)]) -> bool {
    cols.is_multiple_of(4) && ptrs.iter().all(|&(p, a)| p.is_multiple_of(a))
}

/// Blocks for a grid-stride kernel over `n` elements (any count gives the same result).
fn stride_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 132 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// A grid-stride kernel over `items` that stages the GELU table slice (gelu.cu: 2 *
/// GT_N + 256 floats of dynamic shared memory per block, the last 256 the backward's
/// factors by E4M3 code): at most 8 blocks per SM, so the
/// copies stay a small part of the work.
fn gelu_cfg(items: usize) -> LaunchConfig {
    let blocks = items.div_ceil(256).clamp(1, 132 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: (2 * 24 * 128 + 256) * 4 }
}

/// One warp per row; shared memory (floats, see layernorm.cu): `shared_rows` block-wide
/// staged rows (weights, bias) of 32 chunks each, then per warp `per_warp_chunks` times
/// the chunk count, rounded up to a multiple of 4 (16-byte aligned rows). The warps per
/// block (1 to 16, at most 160 KiB per block) that put the most warps on an SM of 227 KiB
/// (Hopper; fewer blocks fit on a smaller one, which only lowers occupancy).
fn ln_cfg(n: usize, c: usize, shared_rows: usize, per_warp_chunks: usize) -> LaunchConfig {
    let chunks = c.div_ceil(32);
    let per_warp = (per_warp_chunks * chunks).next_multiple_of(4);
    let fixed = shared_rows * 32 * chunks;
    let bytes = |w: usize| (fixed + w * per_warp) * 4;
    let per_sm = |w: usize| ((227 << 10) / bytes(w)).min(64 / w) * w;
    let warps = (1..=16).filter(|&w| bytes(w) <= 160 << 10).max_by_key(|&w| (per_sm(w), usize::MAX - w)).unwrap_or(1);
    LaunchConfig {
        grid_dim: (n.div_ceil(warps).max(1) as u32, 1, 1),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: bytes(warps) as u32,
    }
}

/// The byte transpose for 4-aligned FP8 operands (elementwise.cu): kernel, tile side,
/// block. 128 x 128 tiles; `FP8TRAIN_TRANSPOSE64=1` keeps the 64 x 64 kernel for
/// comparison (the same bytes). Read once per process, not per copy.
fn transpose_u8x4_kernel() -> (&'static str, u32, (u32, u32, u32)) {
    static OLD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OLD.get_or_init(|| std::env::var_os("FP8TRAIN_TRANSPOSE64").is_some()) {
        ("transpose_u8x4", 64, (16, 16, 1))
    } else {
        ("transpose_u8x4_128", 128, (32, 8, 1))
    }
}

/// Shared memory per warp of the layernorm backward kernels, in chunks of 32 floats:
/// the staged xhat and dy (BF16, 16 each) and 4 of scratch (layernorm.cu's
/// LN_BWD_WARP_CHUNKS).
const LN_BWD_WARP_CHUNKS: usize = 36;

/// The layernorm backward chunk kernel's launches for `c` channels in the order they are
/// tried (8 warps first, then 16, 4, 2, 1): (warps, kernel, dynamic shared memory bytes)
/// for the warp counts whose column groups fit 4 per thread and whose shared memory (the
/// weights' 32 chunks, then LN_BWD_WARP_CHUNKS per warp rounded up to a multiple of 4 floats,
/// layernorm.cu) fits `max_shared`. Empty when c is not a multiple of 4.
fn ln_chunks_candidates(c: usize, max_shared: usize) -> Vec<(usize, &'static str, usize)> {
    if c == 0 || !c.is_multiple_of(4) {
        return Vec::new();
    }
    let chunks = c.div_ceil(32);
    let bytes = |w: usize| (32 * chunks + w * (LN_BWD_WARP_CHUNKS * chunks).next_multiple_of(4)) * 4;
    [8, 16, 4, 2, 1]
        .into_iter()
        .filter_map(|w| {
            let cols = (c / 4).div_ceil(32 * w).next_power_of_two();
            let name = match cols {
                1 => "layernorm_backward_chunks1",
                2 => "layernorm_backward_chunks2",
                4 => "layernorm_backward_chunks4",
                _ => return None,
            };
            (bytes(w) <= max_shared).then_some((w, name, bytes(w)))
        })
        .collect()
}

/// Device time per (phase, op) from the spans between consecutive profile marks
/// (phase, op, ms, whether the span starts a call): an op's time is the sum of its
/// spans, its calls the spans that start one (a part's resumed op does not).
fn op_times(spans: impl Iterator<Item = (Phase, &'static str, f64, bool)>) -> Vec<OpTime> {
    let mut per: std::collections::BTreeMap<(Phase, &'static str), (f64, u64)> = Default::default();
    for (phase, op, ms, call) in spans {
        let e = per.entry((phase, op)).or_default();
        e.0 += ms;
        e.1 += u64::from(call);
    }
    per.into_iter().map(|((phase, op), (ms, calls))| OpTime { phase, op, ms, calls }).collect()
}

/// The passes of the column trees over `chunks` partials, as (partials in, group size,
/// groups out): passes over aligned groups of `group` while more than `group` are left
/// (unless `single`), then one pass over all that are left (a group of at least 1: no
/// partials give 0).
fn column_tree_passes(mut chunks: u32, group: u32, single: bool) -> Vec<(u32, u32, u32)> {
    let mut passes = Vec::new();
    while chunks > group && !single {
        let groups = chunks.div_ceil(group);
        passes.push((chunks, group, groups));
        chunks = groups;
    }
    passes.push((chunks, chunks.max(1), 1));
    passes
}

/// The flash-attention kernels of one head size (fast class).
struct Flash {
    forward: &'static str,
    kv: &'static str,
    dq: &'static str,
    forward_smem: u32,
    kv_smem: u32,
    dq_smem: u32,
}

impl Flash {
    /// `wgmma`: Hopper's warpgroup kernels (flash_attention_sm90.cu, built for sm_90a),
    /// else the mma.sync ones (flash_attention.cu).
    fn for_head_size(hs: usize, wgmma: bool) -> Option<Flash> {
        let (forward, kv, dq) = match (wgmma, hs) {
            (false, 64) => ("flash_forward_hs64", "flash_backward_kv_hs64", "flash_backward_dq_hs64"),
            (false, 128) => ("flash_forward_hs128", "flash_backward_kv_hs128", "flash_backward_dq_hs128"),
            (true, 64) => ("flash90_forward_hs64", "flash90_backward_kv_hs64", "flash90_backward_dq_hs64"),
            (true, 128) => ("flash90_forward_hs128", "flash90_backward_kv_hs128", "flash90_backward_dq_hs128"),
            _ => return None,
        };
        let (forward_smem, kv_smem, dq_smem) = if wgmma {
            // Unpadded tiles of 64 rows of hs: forward Q + 3 x (K, V); kv: K, V + 2 x (Q,
            // dO, 64 aux rows of 16 bytes); dq: 2 x (K, a 64 x 64 dS tile).
            let tile = 2 * 64 * hs;
            (7 * tile, 2 * tile + 2 * (2 * tile + 64 * 16), 2 * (tile + 2 * 64 * 64))
        } else {
            // BF16 tiles of 64 rows of hs + 8, double-buffered: forward 2 x (K, V); kv: K,
            // V + 2 x (Q, dO, 64 aux rows of 16 bytes); dq: 2 x (K, a dS tile of 64 rows of 72).
            let tile = 2 * 64 * (hs + 8);
            (4 * tile, 6 * tile + 2 * 64 * 16, 2 * (tile + 2 * 64 * 72))
        };
        Some(Flash {
            forward,
            kv,
            dq,
            forward_smem: forward_smem as u32,
            kv_smem: kv_smem as u32,
            dq_smem: dq_smem as u32,
        })
    }
}

/// What the flash backward allocates for shape `s` (fast mode, head sizes 64 and 128):
/// per-row statistics and the dS tiles (dout arrives in BF16, so no copy of it). Needs
/// no device, so memory plans (`bench fit`) use it too.
pub fn flash_scratch_bytes(s: AttnShape) -> u64 {
    let (b, t, nh) = (s.b as u64, s.t as u64, s.nh as u64);
    16 * b * nh * t + 2 * flash_ds_len(s) as u64
}

/// The GPU's op temporaries other than attention's (`Backend::op_scratch`). Its
/// largest single activation temporary is an f32 product of n x 4c (the MLP-up product
/// before its BF16 / E4M3 store at the exact class or a fresh model's first FP8 step:
/// 16 bytes per token and channel), but the pool's high-water mark says more is held
/// at once: GPT-1.3B O2 on an H200 (`bench step`, thirteenth session) peaked at 130.24
/// GiB at batch 160 with full recomputation, 13.0 GiB above the state and workspace
/// (the flash backward's dS tiles and the head's f32 terms give 11.6, 16 bytes 10.0):
/// 21 bytes per token and channel covers it (13.1 GiB). The LM head's f32 terms are
/// kept (its BF16 products at the exact class go through f32).
pub fn op_scratch_without_attention() -> OpScratch {
    OpScratch { attention: 0, activation_bytes_per_token_channel: 21, head_f32_copies: true }
}

/// What a run needs on a GPU beyond its estimate: the stream-ordered pool keeps freed
/// blocks and mixed sizes fragment it, so the device holds more than the pool's live
/// peak, and more the larger the temporaries that come and go. Measured on an H200
/// (GPT-1.3B O2, `bench step`; device memory in use less the pool's high-water mark
/// less the 0.55 GiB context): 0.43 GiB at batch 8 (largest temporary ~1.7 GiB), 2.58
/// at batch 50 (~4.4), 2.68 at batch 53 with `cheap` (~4.6), 7.35 at batch 160 with
/// `full` (~13.0); 4/7 of the largest temporary + 256 MiB covers each (batch 166 with
/// `full`, 0.4 GiB over the device by this rule, failed to allocate).
pub fn cuda_memory_overhead(est: &Estimate) -> u64 {
    est.transient / 7 * 4 + (256 << 20)
}

/// Elements of the flash backward's dS tiles: 64 x 64 per causal (query tile, key tile)
/// pair of every head.
fn flash_ds_len(s: AttnShape) -> usize {
    let tiles = s.t.div_ceil(64);
    s.b * s.nh * tiles * (tiles + 1) / 2 * 64 * 64
}

/// The tiled attention kernels (forward, backward scores) for head size `hs`, if built.
fn tiled_attention(hs: usize) -> Option<(&'static str, &'static str)> {
    match hs {
        16 => Some(("attention_forward_hs16", "attention_backward_scores_hs16")),
        32 => Some(("attention_forward_hs32", "attention_backward_scores_hs32")),
        64 => Some(("attention_forward_hs64", "attention_backward_scores_hs64")),
        128 => Some(("attention_forward_hs128", "attention_backward_scores_hs128")),
        _ => None,
    }
}

/// An allocation that failed, with its size.
fn oom(bytes: usize, e: impl std::fmt::Display) -> BackendError {
    BackendError::new("CUDA allocation", format!("{:.2} GiB: {e}", bytes as f64 / (1u64 << 30) as f64))
}

fn e5(fmt: Fp8Format) -> i32 {
    i32::from(fmt == Fp8Format::E5M2)
}

impl Cuda {
    /// The GPU of node-local rank `ordinal`.
    pub fn new(ordinal: usize) -> Result<Cuda, String> {
        use cudarc::driver::sys::CUdevice_attribute::{
            CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN as OPTIN,
            CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT as SMS,
        };
        let gpu = Gpu::open(ordinal)?;
        let sms = gpu.ctx.attribute(SMS).map(|c| c.max(1) as u32).unwrap_or(1);
        let max_smem = gpu.ctx.attribute(OPTIN).map(|b| b as u32).unwrap_or(48 << 10);
        Ok(Cuda {
            gpu,
            nccl: std::cell::OnceCell::new(),
            lt: std::cell::RefCell::new(None),
            fallbacks: std::cell::Cell::new(0),
            last_amax: std::cell::Cell::new(None),
            report_amax: std::cell::Cell::new(false),
            functions: Default::default(),
            profile: Default::default(),
            gelu_tab: std::cell::OnceCell::new(),
            scalars: Default::default(),
            flash_mma: std::cell::Cell::new(false),
            flash_mma_env: std::env::var("FP8TRAIN_FLASH").is_ok_and(|v| v == "mma"),
            sms,
            max_smem,
            ln_launch: Default::default(),
        })
    }

    /// Kernel `name`, opened for `shared` bytes of dynamic shared memory (above the
    /// default 48 KiB the kernel must be allowed more first).
    fn function(&self, name: &'static str, shared: u32) -> BResult<CudaFunction> {
        let mut cache = self.functions.borrow_mut();
        if !cache.contains_key(name) {
            let f = self.gpu.function(name).map_err(|e| BackendError::new(format!("CUDA kernel {name}"), e))?;
            if FULL_CARVEOUT.contains(&name) {
                use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT as CARVEOUT;
                // SAFETY: the function exists (it was just loaded from the module).
                unsafe { cudarc::driver::result::function::set_function_attribute(f.cu_function(), CARVEOUT, 100) }
                    .map_err(|e| {
                        BackendError::new(format!("CUDA kernel {name}"), format!("shared-memory carveout: {e}"))
                    })?;
            }
            cache.insert(name, (f, 48 << 10));
        }
        let entry = cache.get_mut(name).expect("inserted above");
        if shared > entry.1 {
            use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SMEM;
            // SAFETY: the function exists (it was just loaded from the module).
            unsafe {
                cudarc::driver::result::function::set_function_attribute(entry.0.cu_function(), MAX_SMEM, shared as i32)
            }
            .map_err(|e| {
                BackendError::new(
                    format!("CUDA kernel {name}"),
                    format!("cannot allow {shared} bytes of shared memory: {e}"),
                )
            })?;
            entry.1 = shared;
        }
        Ok(entry.0.clone())
    }

    /// BF16 values as f32 in scratch (what the exact attention kernels read).
    fn widen(&self, x: &CudaSlice<bf16>) -> BResult<CudaSlice<f32>> {
        let mut y = self.scratch::<f32>(x.len())?;
        self.widen_bf16(&mut y, x)?;
        Ok(y)
    }

    /// The flash-attention kernels, in fast mode, for head size `hs` (64 or 128).
    fn flash(&self, hs: usize) -> Option<Flash> {
        if self.lt.borrow().is_some() {
            // FP8TRAIN_FLASH=mma keeps the mma.sync kernels on Hopper (to compare them).
            let mma = self.flash_mma.get() || self.flash_mma_env;
            Flash::for_head_size(hs, self.has_wgmma_flash() && !mma)
        } else {
            None
        }
    }

    /// Work queued until the guard drops belongs to op `name` of `phase`.
    fn op(&self, phase: Phase, name: &'static str) -> PhaseGuard<'_> {
        if let Some(p) = self.profile.borrow_mut().as_mut() {
            p.depth += 1;
            if p.depth == 1 {
                if let Some(e) = self.event() {
                    p.marks.push((phase, name, e, true));
                }
            }
        }
        PhaseGuard(self)
    }

    fn leave(&self) {
        if let Some(p) = self.profile.borrow_mut().as_mut() {
            p.depth = p.depth.saturating_sub(1);
            if p.depth == 0 {
                if let Some(e) = self.event() {
                    p.marks.push((Phase::Idle, "idle (launch and host gaps)", e, false));
                }
            }
        }
    }

    /// Profiling only: the device time from here on, inside the current op, counts as
    /// `name` (a part worth its own line, e.g. a product's transposed copies) until
    /// [`Cuda::end_part`] with what this returns (the op to resume).
    fn begin_part(&self, phase: Phase, name: &'static str) -> Option<(Phase, &'static str)> {
        let mut prof = self.profile.borrow_mut();
        let p = prof.as_mut()?;
        let outer = p.marks.last().filter(|_| p.depth >= 1).map(|m| (m.0, m.1))?;
        let e = self.event()?;
        p.marks.push((phase, name, e, true));
        Some(outer)
    }

    /// The end of a part begun by [`Cuda::begin_part`]: the op it interrupted resumes.
    fn end_part(&self, resume: Option<(Phase, &'static str)>) {
        let Some((phase, name)) = resume else { return };
        if let (Some(p), Some(e)) = (self.profile.borrow_mut().as_mut(), self.event()) {
            p.marks.push((phase, name, e, false));
        }
    }

    /// A timing event (profiling only: a failure loses the mark, nothing else).
    fn event(&self) -> Option<cudarc::driver::CudaEvent> {
        self.gpu.stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).ok()
    }

    /// A device buffer whose contents are not initialised (scratch every element of
    /// which is written before it is read).
    fn scratch<T: Elem>(&self, n: usize) -> BResult<CudaSlice<T>> {
        // SAFETY: callers write every element they later read.
        unsafe { self.gpu.stream.alloc::<T>(n.max(1)) }.map_err(|e| oom(n * std::mem::size_of::<T>(), e))
    }

    /// The GPU with the `fast` GEMM class: FP8 and BF16 products on cuBLASLt.
    pub fn new_fast(ordinal: usize) -> Result<Cuda, String> {
        let c = Cuda::new(ordinal)?;
        *c.lt.borrow_mut() = Some(Lt::new(&c.gpu.stream)?);
        Ok(c)
    }

    /// `fast` class: K-major copies, then cuBLASLt. Inner Err: no algorithm or an
    /// operand type it does not take (use exact); outer Err: a device error.
    #[allow(clippy::too_many_arguments)]
    fn matmul_fast(
        &self,
        out: LtOut,
        a: &Operand<'_, Self>,
        b: &Operand<'_, Self>,
        product: Product,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        accumulate: bool,
    ) -> BResult<Result<(), String>> {
        let mut guard = self.lt.borrow_mut();
        let Some(lt) = guard.as_mut() else { return Ok(Err("exact mode".into())) };
        let kind = |o: &Operand<'_, Self>| match o {
            Operand::Fp8(_, Fp8Format::E4M3, _) => Some(LtType::E4M3),
            Operand::Fp8(_, Fp8Format::E5M2, _) => Some(LtType::E5M2),
            Operand::Bf16(_) => Some(LtType::Bf16),
            Operand::F32(_) => None,
        };
        let (Some(ta), Some(tb)) = (kind(a), kind(b)) else { return Ok(Err("f32 operands".into())) };
        let (pa, _) = self.operand(a);
        let (pb, _) = self.operand(b);
        // Transposed copy of a row-major rows x cols operand, as (pointer, buffer).
        let copy_t = |p: u64, ty: LtType, rows: usize, cols: usize| -> BResult<(u64, Box<dyn std::any::Any>)> {
            use cudarc::driver::DevicePtr;
            let (r, c) = (rows as u32, cols as u32);
            let tiles = LaunchConfig {
                grid_dim: (c.div_ceil(32), r.div_ceil(32), 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            if ty == LtType::Bf16 {
                let mut dst = self.scratch::<u16>(rows * cols)?;
                launch!(self, "transpose_u16", with tiles, [&p, &mut dst, &r, &c]);
                let ptr = dst.device_ptr(&self.gpu.stream).0;
                Ok((ptr, Box::new(dst)))
            } else if rows.is_multiple_of(4) && cols.is_multiple_of(4) && p.is_multiple_of(4) {
                let mut dst = self.scratch::<u8>(rows * cols)?;
                let (kernel, tile, block_dim) = transpose_u8x4_kernel();
                let tiles =
                    LaunchConfig { grid_dim: (c.div_ceil(tile), r.div_ceil(tile), 1), block_dim, shared_mem_bytes: 0 };
                launch!(self, kernel, with tiles, [&p, &mut dst, &r, &c]);
                let ptr = dst.device_ptr(&self.gpu.stream).0;
                Ok((ptr, Box::new(dst)))
            } else {
                let mut dst = self.scratch::<u8>(rows * cols)?;
                launch!(self, "transpose_u8", with tiles, [&p, &mut dst, &r, &c]);
                let ptr = dst.device_ptr(&self.gpu.stream).0;
                Ok((ptr, Box::new(dst)))
            }
        };
        // (In a profile the copies are a line of their own.)
        let tr = |p: u64, ty: LtType, rows: usize, cols: usize| {
            let part = self.begin_part(Phase::Matmul, "transposed copies (FP8 products)");
            let copy = copy_t(p, ty, rows, cols);
            self.end_part(part);
            copy
        };
        // BF16 operands are read in place (cuBLASLt transposes them); FP8 ones must be
        // K-major, so the data and weight gradients read transposed copies.
        let bf16 = ta == LtType::Bf16 && tb == LtType::Bf16;
        let (a_op, b_op, mm, nn, kk, _keep) = match product {
            Product::Forward => ((pa, ta, Major::K), (pb, tb, Major::K), m, n, k, Vec::new()),
            Product::Dgrad if bf16 => ((pa, ta, Major::K), (pb, tb, Major::Outer), m, k, n, Vec::new()),
            Product::Wgrad if bf16 => ((pa, ta, Major::Outer), (pb, tb, Major::Outer), n, k, m, Vec::new()),
            Product::Dgrad => {
                let (wt, hold) = tr(pb, tb, n, k)?; // W[n x k] -> W^T[k x n]
                ((pa, ta, Major::K), (wt, tb, Major::K), m, k, n, vec![hold])
            }
            Product::Wgrad => {
                let (dyt, h1) = tr(pa, ta, m, n)?; // dY[m x n] -> dY^T[n x m]
                let (xt, h2) = tr(pb, tb, m, k)?; // X[m x k] -> X^T[k x m]
                ((dyt, ta, Major::K), (xt, tb, Major::K), n, k, m, vec![h1, h2])
            }
        };
        // cuBLASLt reads the inverse scales by address, 16-byte aligned (the model's are:
        // see backend::ScaleSlot); any other is first copied to an aligned scratch.
        let mut staged = Vec::new();
        let mut aligned = |p: u64| -> BResult<u64> {
            if p.is_multiple_of(16) {
                return Ok(p);
            }
            let d = self.scratch::<f32>(1)?;
            let dp = dptr(&self.gpu.stream, &d);
            // SAFETY: `p` addresses one f32 of a live buffer the operand borrows, `d` is
            // a fresh one-float buffer; the copy is ordered on the compute stream.
            unsafe { cudarc::driver::result::memcpy_dtod_async(dp, p, 4, self.gpu.stream.cu_stream()) }
                .map_err(|e| BackendError::new("CUDA copy", e))?;
            staged.push(d);
            Ok(dp)
        };
        let scale_ptrs = (aligned(self.inv_ptr(a)?)?, aligned(self.inv_ptr(b)?)?);
        // The output amax only when verify asks for it (a zeroed buffer and a read-back).
        let mut amax = if ta != LtType::Bf16 && self.report_amax.get() { Some(self.alloc::<f32>(1)?) } else { None };
        let got = match lt.matmul(
            &self.gpu.stream,
            out,
            a_op,
            b_op,
            (mm, nn, kk),
            scale,
            scale_ptrs,
            amax.as_mut(),
            accumulate,
        ) {
            Ok(got) => got,
            Err(why) => return Ok(Err(why)),
        };
        self.last_amax.set(match amax {
            Some(a) if got => Some(self.scalar(&a)?),
            _ => None,
        });
        drop(staged);
        Ok(Ok(()))
    }

    /// Whether the device has the warpgroup (sm_90a) flash kernels.
    pub fn has_wgmma_flash(&self) -> bool {
        self.gpu.arch == "sm_90a"
    }

    /// Use the `mma.sync` flash kernels even where the warpgroup ones exist.
    pub fn use_mma_flash(&self, on: bool) {
        self.flash_mma.set(on);
    }

    /// Have fast FP8 GEMMs report their output amax ([`Cuda::last_fast_amax`]).
    pub fn report_fast_amax(&self, on: bool) {
        self.report_amax.set(on);
    }

    /// The output amax cuBLASLt computed for the last fast FP8 GEMM, if it offered one
    /// and reporting is on.
    pub fn last_fast_amax(&self) -> Option<f32> {
        self.last_amax.get()
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Fused cast + transpose into FP8 (both layouts) and the input's amax.
    pub fn cast_transpose(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        fmt: Fp8Format,
        scale: f32,
    ) -> BResult<(CudaSlice<u8>, CudaSlice<u8>, f32)> {
        Ok({
            let (mut q, mut qt) = (self.alloc::<u8>(rows * cols)?, self.alloc::<u8>(rows * cols)?);
            let (r, c, f) = (rows as u32, cols as u32, e5(fmt));
            launch!(self, "cast_transpose", rows * cols, [x, &mut q, &mut qt, &scale, &r, &c, &f]);
            (q, qt, self.amax(x)?)
        })
    }

    /// How many fast-class GEMMs ran the exact kernel instead (f32 operands, or no
    /// cuBLASLt algorithm for the shape).
    pub fn fast_fallbacks(&self) -> u64 {
        self.fallbacks.get()
    }

    fn alloc<T: Elem>(&self, n: usize) -> BResult<CudaSlice<T>> {
        self.gpu.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| oom(n * std::mem::size_of::<T>(), e))
    }

    /// The NCCL communicator of `world`: rank 0 makes the id, MPI broadcasts its bytes.
    pub(crate) fn comm(&self, world: &World) -> BResult<&Comm> {
        if self.nccl.get().is_none() {
            let mut internal = [0 as std::ffi::c_char; 128];
            if world.rank == 0 {
                let id = Id::new()
                    .map_err(|e| BackendError::new("NCCL", format!("cannot make a communicator id: {e:?}")))?;
                internal = *id.internal();
            }
            world.broadcast(&mut internal, 0);
            let c = Comm::from_rank(self.gpu.stream.clone(), world.rank, world.size, Id::uninit(internal))
                .map_err(|e| BackendError::new("NCCL", format!("cannot join the communicator: {e:?}")))?;
            let _ = self.nccl.set(c);
        }
        Ok(self.nccl.get().expect("set above"))
    }

    /// All-to-all of equal chunks over NCCL (grouped sends and receives).
    pub(crate) fn all_to_all<T: Elem + NcclType>(
        &self,
        comm: &Comm,
        send: &CudaSlice<T>,
        k: usize,
    ) -> BResult<CudaSlice<T>> {
        Ok({
            let ranks = comm.world_size();
            let mut parts: Vec<CudaSlice<T>> = (0..ranks).map(|_| self.alloc::<T>(k)).collect::<BResult<_>>()?;
            {
                let mut g = comm.group();
                for (r, part) in parts.iter_mut().enumerate() {
                    g.send(send.slice(r * k..(r + 1) * k), r as i32)
                        .map_err(|e| BackendError::new("NCCL send", format!("{e:?}")))?;
                    g.recv(part.slice_mut(..), r as i32)
                        .map_err(|e| BackendError::new("NCCL recv", format!("{e:?}")))?;
                }
            }
            let mut recv = self.alloc::<T>(k * ranks)?;
            for (r, part) in parts.iter().enumerate() {
                self.gpu
                    .stream
                    .memcpy_dtod(part, &mut recv.slice_mut(r * k..(r + 1) * k))
                    .map_err(|e| BackendError::new("CUDA copy", e))?;
            }
            recv
        })
    }

    fn scalar(&self, d: &CudaSlice<f32>) -> BResult<f32> {
        Ok(self.gpu.stream.clone_dtoh(d).map_err(|e| BackendError::new("CUDA copy", e))?[0])
    }

    /// The contract's sum (mode 0) or sum of squares (mode 1): blocks of 256 chunks,
    /// then aligned sub-trees of 1024 partials until one is left (see reduce.cu).
    fn csum(&self, x: &CudaSlice<f32>, mode: i32) -> BResult<f32> {
        self.scalar(&self.sum_device(x, mode)?)
    }

    /// The contract's sum (`mode` 0) or sum of squares (1) of `x`, left on the device in
    /// element 0 (0 for an empty `x`).
    fn sum_device(&self, x: &CudaSlice<f32>, mode: i32) -> BResult<CudaSlice<f32>> {
        let n = x.len() as u32;
        if n == 0 {
            return self.alloc::<f32>(1);
        }
        self.csum_device(n, |c, part| {
            launch!(self, "reduce_sum_blocks", with c, [x, &n, &mode, part]);
            Ok(())
        })
    }

    /// Every gradient's sum of squares in the contract's order, left on the device: the
    /// partials buffer and where each tensor's sum is in it (u32::MAX: an empty tensor,
    /// 0); None when every tensor is empty.
    #[allow(clippy::type_complexity)]
    fn sq_sums_device(&self, grads: &[GradRef<'_, Self>]) -> BResult<Option<(CudaSlice<f32>, Vec<u32>)>> {
        use cudarc::driver::DevicePtr;
        let s = &self.gpu.stream;
        // First pass over every tensor in one launch (8192 elements per block).
        let (mut desc, mut m, mut blocks) = (Vec::with_capacity(7 * grads.len()), Vec::new(), 0u32);
        for g in grads {
            let (p, inv, n, fp8) = match g {
                GradRef::F32(x) => (x.device_ptr(s).0, 0u64, x.len() as u32, 0u32),
                GradRef::Fp8(q, inv) => (q.device_ptr(s).0, self.sptr(*inv)?, q.len() as u32, 1),
            };
            let nb = n.div_ceil(32 * 256);
            desc.extend_from_slice(&[p as u32, (p >> 32) as u32, inv as u32, (inv >> 32) as u32, n, fp8, blocks]);
            m.push(nb);
            blocks += nb;
        }
        if blocks == 0 {
            return Ok(None);
        }
        let (d, nt) = (self.upload(&desc)?, grads.len() as u32);
        let mut part = self.scratch::<f32>(blocks as usize)?;
        let cf = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "sq_blocks_multi", with cf, [&d, &nt, &mut part]);
        // Tree passes over 1024 aligned partials per tensor until one is left per tensor
        // (tensors already down to one partial pass it on: a tree of one is itself).
        let mut at: Vec<u32> = m.iter().scan(0, |o, &k| Some(std::mem::replace(o, *o + k))).collect();
        while m.iter().any(|&k| k > 1) {
            let (mut tdesc, mut outs, mut next_at) = (Vec::new(), 0u32, Vec::with_capacity(m.len()));
            let live: Vec<usize> = (0..m.len()).filter(|&i| m[i] > 0).collect();
            for &i in &live {
                let groups = m[i].div_ceil(1024);
                tdesc.extend_from_slice(&[at[i], m[i], outs, outs]);
                next_at.push((i, outs, groups));
                outs += groups;
            }
            let (td, lt) = (self.upload(&tdesc)?, live.len() as u32);
            let mut next = self.scratch::<f32>(outs as usize)?;
            let cf = LaunchConfig { grid_dim: (outs, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
            launch!(self, "tree_blocks_multi", with cf, [&td, &lt, &part, &mut next]);
            for (i, o, g) in next_at {
                at[i] = o;
                m[i] = g;
            }
            part = next;
        }
        Ok(Some((part, (0..grads.len()).map(|i| if m[i] == 0 { u32::MAX } else { at[i] }).collect())))
    }
    /// The contract's sum over `n` elements left on the device (element 0 of the
    /// result); `first` launches the first pass into the block partials.
    fn csum_device(
        &self,
        n: u32,
        first: impl FnOnce(LaunchConfig, &mut CudaSlice<f32>) -> BResult<()>,
    ) -> BResult<CudaSlice<f32>> {
        let blocks = n.div_ceil(32 * 256).max(1);
        let mut part = self.scratch::<f32>(blocks as usize)?;
        first(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }, &mut part)?;
        let mut m = blocks;
        while m > 1 {
            let next = m.div_ceil(1024);
            let mut out = self.scratch::<f32>(next as usize)?;
            let c = LaunchConfig { grid_dim: (next, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
            launch!(self, "reduce_tree_blocks", with c, [&part, &m, &mut out]);
            part = out;
            m = next;
        }
        Ok(part)
    }

    /// `layernorm_backward_chunks<cols>`'s launch for `n` rows of `c` channels (the
    /// kernel's name and configuration): a block per 32-row column chunk, its warps (a
    /// divisor of 32) taking that many rows at a time, each thread keeping at most 4
    /// column groups of 4 (`cols` 1, 2 or 4 by the warps). Warps: 8 where a block fits
    /// (shared memory: the weights' 32 chunks and 36 per warp, as ln_cfg; at least one
    /// block per SM by the driver's occupancy), else 16, 4, 2, 1: measured on an H200 at
    /// 768 and 2048 channels, 8 beat 16, 4 and 2 (the most resident warps picked 4 at 768,
    /// 30% slower). FP8TRAIN_LN_WARPS=w forces w (measurements). None when c is not a
    /// multiple of 4 or no count fits.
    fn ln_chunks_launch(&self, n: usize, c: usize) -> BResult<Option<(LaunchConfig, &'static str)>> {
        if c == 0 || !c.is_multiple_of(4) || n == 0 {
            return Ok(None);
        }
        if let Some(hit) = self.ln_launch.borrow().get(&c) {
            return Ok(hit.map(|(cfg, name)| (LaunchConfig { grid_dim: (n.div_ceil(32) as u32, 1, 1), ..cfg }, name)));
        }
        let forced = std::env::var("FP8TRAIN_LN_WARPS").ok().and_then(|v| v.parse::<usize>().ok());
        let mut pick = None;
        for (w, name, bytes) in ln_chunks_candidates(c, self.max_shared() as usize) {
            if forced.is_some_and(|f| f != w) {
                continue;
            }
            let f = self.function(name, bytes as u32)?;
            let blocks = f
                .occupancy_max_active_blocks_per_multiprocessor(32 * w as u32, bytes, None)
                .map_err(|e| BackendError::new(format!("CUDA kernel {name}"), e))? as usize;
            if blocks > 0 {
                let block_dim = (32 * w as u32, 1, 1);
                pick = Some((LaunchConfig { grid_dim: (1, 1, 1), block_dim, shared_mem_bytes: bytes as u32 }, name));
                break;
            }
        }
        self.ln_launch.borrow_mut().insert(c, pick);
        self.ln_chunks_launch(n, c)
    }

    /// Streaming multiprocessors of this device.
    fn sm_count(&self) -> u32 {
        self.sms
    }

    /// Dynamic shared memory a block may opt into on this device (bytes).
    fn max_shared(&self) -> u32 {
        self.max_smem
    }

    /// A linear layer's product into `out`, f32 or BF16 (see `Backend::matmul_bf16`): fast
    /// class when cuBLASLt takes it, else exact; `accumulate`: add to `out` (scale 1)
    /// instead of overwriting it.
    #[allow(clippy::too_many_arguments)]
    fn product_into(
        &self,
        mut out: ProductOut<'_>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        product: Product,
        (m, n, k): (usize, usize, usize),
        scale: f32,
        accumulate: bool,
    ) -> BResult<()> {
        use cudarc::driver::DevicePtrMut;
        let _op = self.op(Phase::Matmul, "matmul");
        let s = &self.gpu.stream;
        let ptr = match &mut out {
            ProductOut::F32(o) => o.device_ptr_mut(s).0,
            ProductOut::Bf16(o) => o.device_ptr_mut(s).0,
        };
        if self.lt.borrow().is_some() {
            let o = match out {
                ProductOut::F32(_) => LtOut::F32(ptr),
                ProductOut::Bf16(_) => LtOut::Bf16 { d: ptr, bias: 0 },
            };
            match self.matmul_fast(o, &a, &b, product, m, n, k, scale, accumulate)? {
                Ok(()) => return Ok(()),
                Err(_) => self.fallbacks.set(self.fallbacks.get() + 1),
            }
        }
        // (rows, cols, row stride, col stride) of the logical A and B.
        let (ma, na, ka) = (m as u32, n as u32, k as u32);
        let (dims, a_s, b_s) = match product {
            Product::Forward => ((ma, na, ka), (ka, 1u32), (1u32, ka)), // A = X[m x k], B = W^T
            Product::Dgrad => ((ma, ka, na), (na, 1), (ka, 1)),         // A = dY[m x n], B = W[n x k]
            Product::Wgrad => ((na, ka, ma), (1, na), (ka, 1)),         // A = dY^T, B = X[m x k]
        };
        let (pa, ta) = self.operand(&a);
        let (pb, tb) = self.operand(&b);
        let (sa, sb) = (self.inv_ptr(&a)?, self.inv_ptr(&b)?);
        let (mm, nn, kk) = dims;
        let total = (mm as usize) * (nn as usize);
        match out {
            ProductOut::F32(_) => {
                let acc = i32::from(accumulate);
                launch!(
                    self,
                    "gemm_exact",
                    total,
                    [&ptr, &pa, &ta, &a_s.0, &a_s.1, &pb, &tb, &b_s.0, &b_s.1, &mm, &nn, &kk, &scale, &sa, &sb, &acc]
                );
            }
            ProductOut::Bf16(_) => {
                assert!(!accumulate, "a BF16 product does not accumulate");
                launch!(
                    self,
                    "gemm_exact_bf16",
                    total,
                    [&ptr, &pa, &ta, &a_s.0, &a_s.1, &pb, &tb, &b_s.0, &b_s.1, &mm, &nn, &kk, &scale, &sa, &sb]
                );
            }
        }
        Ok(())
    }

    /// An activation output as the kernels take it: (pointer, mode, scale, amax slot
    /// pointer or 0); see fp8train_act_store in fp8train_common.cuh.
    fn act_out(&self, y: &mut ActOut<'_, Self>) -> BResult<(u64, i32, u64, u64)> {
        use cudarc::driver::DevicePtrMut;
        let s = &self.gpu.stream;
        Ok(match y {
            ActOut::F32(b) => (b.device_ptr_mut(s).0, 0, 0, 0),
            ActOut::Bf16(b) => (b.device_ptr_mut(s).0, 1, 0, 0),
            ActOut::E4m3(b, scale, slot) => {
                let (pa, sp) = (self.slot_ptr(slot), self.sptr(*scale)?);
                (b.device_ptr_mut(s).0, 2, sp, pa)
            }
        })
    }

    /// The device address of a scalar: its element, or the device copy of a host value
    /// (uploaded once per bit pattern: host values are powers of two and a few constants).
    fn sptr(&self, v: Scalar<'_, Self>) -> BResult<u64> {
        let value = match v {
            Scalar::Dev(b, at) => return Ok(dptr_at(&self.gpu.stream, b, at)),
            Scalar::Host(value) => value,
        };
        if !self.scalars.borrow().contains_key(&value.to_bits()) {
            let d = self.upload(&[value])?;
            self.scalars.borrow_mut().insert(value.to_bits(), d);
        }
        Ok(dptr(&self.gpu.stream, &self.scalars.borrow()[&value.to_bits()]))
    }

    /// An operand's inverse scale as the products read it (0: none, i.e. 1).
    fn inv_ptr(&self, o: &Operand<'_, Self>) -> BResult<u64> {
        match o {
            Operand::Fp8(_, _, inv) => self.sptr(*inv),
            _ => Ok(0),
        }
    }

    /// Column sums of the `rows x cols` values at `x` (f32, or BF16 with `bf16`) in the
    /// contract's order: chunk partials, four columns per thread when the width and the
    /// address allow, then the tree.
    fn column_sums_at(&self, out: &mut CudaSlice<f32>, x: u64, bf16: bool, rows: usize, cols: usize) -> BResult<()> {
        let (by4, one, align) = if bf16 {
            ("column_chunk_sums4_bf16", "column_chunk_sums_bf16", 8)
        } else {
            ("column_chunk_sums4", "column_chunk_sums", 16)
        };
        let four = by_four(cols as u32, &[(x, align)]);
        self.column_sums_via(out, rows, cols, four, |part, r, c, items| {
            launch!(self, if four { by4 } else { one }, items, [&x, part, &r, &c]);
            Ok(())
        })
    }

    /// Column sums in the contract's order through a chunk-partials kernel: `launch`
    /// gets the partials' scratch (a float per 32-row chunk and column), the rows, the
    /// columns and its thread count (one per chunk and column, or per chunk and four
    /// columns with `by4`); then the tree per column.
    fn column_sums_via(
        &self,
        out: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        by4: bool,
        launch: impl FnOnce(&mut CudaSlice<f32>, u32, u32, usize) -> BResult<()>,
    ) -> BResult<()> {
        let (r, c) = (rows as u32, cols as u32);
        let chunks = r.div_ceil(32);
        let mut part = self.scratch::<f32>((chunks * c) as usize)?;
        launch(&mut part, r, c, (chunks * if by4 { c / 4 } else { c }) as usize)?;
        self.column_tree(out, part, chunks, c)
    }

    /// The multi-tensor amax (and with `cast`, the just-in-time casts) of `rows`: the
    /// table of JitItem rows (elementwise.cu) and of (tensor, first element) chunks.
    fn jit_multi(&self, rows: Vec<JitRow>, stats: &mut CudaSlice<u64>, cast: bool) -> BResult<()> {
        use cudarc::driver::DevicePtrMut;
        for r in &rows {
            assert!(r.at < stats.len(), "statistics slot {} of {}", r.at, stats.len());
        }
        let base = stats.device_ptr_mut(&self.gpu.stream).0;
        let kernels: &[&'static str] = if cast { &["jit_amax_multi", "jit_cast_multi"] } else { &["jit_amax_multi"] };
        self.multi_launch(&rows, base, kernels)
    }

    /// Launch each of `kernels` over the JitItem table of `rows` (slot i at
    /// `slot_base + 8 * at`) and its chunk table, a block per 16384-element chunk.
    fn multi_launch(&self, rows: &[JitRow], slot_base: u64, kernels: &[&'static str]) -> BResult<()> {
        const JIT_CHUNK: usize = 16384;
        let (mut table, mut chunks) = (Vec::with_capacity(14 * rows.len()), Vec::new());
        for (i, r) in rows.iter().enumerate() {
            let n32 = u32::try_from(r.n).map_err(|_| {
                BackendError::new("multi-tensor op", format!("a tensor of {} elements (at most 2^32 - 1)", r.n))
            })?;
            for p in [r.src, r.q, slot_base + 8 * r.at as u64] {
                table.extend([p as u32, (p >> 32) as u32]);
            }
            table.extend([n32, r.f16]);
            for p in [r.inv, r.sslot] {
                table.extend([p as u32, (p >> 32) as u32]);
            }
            table.extend([r.e5m2, 0]);
            for first in (0..n32).step_by(JIT_CHUNK) {
                chunks.extend([i as u32, first]);
            }
        }
        if chunks.is_empty() {
            return Ok(());
        }
        let (tb, cb) = (self.upload(&table)?, self.upload(&chunks)?);
        let cfg =
            LaunchConfig { grid_dim: ((chunks.len() / 2) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        for k in kernels {
            launch!(self, *k, with cfg, [&tb, &cb]);
        }
        Ok(())
    }

    /// The device address of a statistics slot.
    fn slot_ptr(&self, slot: &mut Slot<'_, Self>) -> u64 {
        use cudarc::driver::DevicePtrMut;
        assert!(slot.at < slot.buf.len(), "statistics slot {} of {}", slot.at, slot.buf.len());
        slot.buf.device_ptr_mut(&self.gpu.stream).0 + 8 * slot.at as u64
    }

    /// The scaled cast kernel `kernel` (`cast_fp8` of f32 values, `cast_fp8_bf16` of BF16
    /// ones) over the `n` values at `src`; amax and saturated count into two slots.
    #[allow(clippy::too_many_arguments)]
    fn cast_fp8_launch(
        &self,
        kernel: &'static str,
        src: u64,
        n: usize,
        q: &mut CudaSlice<u8>,
        fmt: Fp8Format,
        scale: Scalar<'_, Self>,
        mut stats: Slot<'_, Self>,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "cast_fp8");
        assert!(stats.at + 1 < stats.buf.len(), "cast statistics need two slots");
        let (nn, f, p, scale) = (n as u32, e5(fmt), self.slot_ptr(&mut stats), self.sptr(scale)?);
        launch!(self, kernel, with stride_cfg(n), [&src, q, &scale, &nn, &f, &p]);
        Ok(())
    }

    /// Device address of one half of the GELU table (0: gelu values, 1: derivative
    /// factors), made by `gelu_table` at first use.
    fn gelu_table(&self, half: u64) -> BResult<u64> {
        use cudarc::driver::DevicePtr;
        if self.gelu_tab.get().is_none() {
            let mut t = self.alloc::<f32>(2 * 65536)?;
            launch!(self, "gelu_table", 2 * 65536, [&mut t]);
            let _ = self.gelu_tab.set(t);
        }
        let t = self.gelu_tab.get().expect("set above");
        Ok(t.device_ptr(&self.gpu.stream).0 + half * 65536 * 4)
    }

    /// The contract's tree over `chunks` column-chunk partials (`part`, chunk-major)
    /// into `out` (see reduce.cu).
    fn column_tree(&self, out: &mut CudaSlice<f32>, part: CudaSlice<f32>, chunks: u32, c: u32) -> BResult<()> {
        self.column_trees(out, part, None, chunks, c)
    }

    /// The contract's tree per column over `chunks` partials of `c` columns (`part`, chunk
    /// major) into `out`, and the same for a second pair in the same launches. Passes
    /// over aligned groups of COLUMN_GROUP partials (each a sub-tree: more blocks, little
    /// shared memory) leave the next level's partials, until one pass takes them all.
    fn column_trees(
        &self,
        out: &mut CudaSlice<f32>,
        part: CudaSlice<f32>,
        second: Option<(&mut CudaSlice<f32>, CudaSlice<f32>)>,
        chunks: u32,
        c: u32,
    ) -> BResult<()> {
        const COLUMN_GROUP: u32 = 64;
        let st = &self.gpu.stream;
        let pairs = if second.is_some() { 2 } else { 1 };
        // One pass when its blocks (32 columns each) fill the SMs and its shared memory
        // fits: a pass more costs more than the parallelism it adds (measured: bias sums
        // of 2048+ columns).
        let single = c.div_ceil(32) * pairs >= self.sm_count() && (chunks + chunks / 2 + 1) * 32 * 4 <= 160 << 10;
        let launch_pass = |parts: [u64; 2], outs: [u64; 2], chunks: u32, group: u32, groups: u32| -> BResult<()> {
            let cfg = LaunchConfig {
                grid_dim: (c.div_ceil(32).max(1), groups, pairs),
                block_dim: (32, 32, 1),
                shared_mem_bytes: (group + group / 2 + 1) * 32 * 4,
            };
            launch!(self, "column_tree_block", with cfg, [&parts[0], &outs[0], &parts[1], &outs[1], &chunks, &c, &group]);
            Ok(())
        };
        // (The second pair's pointers repeat the first's when there is none: never read.)
        let (second_out, second_part) = match second {
            Some((o, p)) => (Some(o), Some(p)),
            None => (None, None),
        };
        let mut parts = [dptr(st, &part), dptr(st, second_part.as_ref().unwrap_or(&part))];
        let mut held: Vec<CudaSlice<f32>> = Vec::new();
        let passes = column_tree_passes(chunks, COLUMN_GROUP, single);
        let (last, grouped) = passes.split_last().expect("at least one pass");
        for &(chunks, group, groups) in grouped {
            let next: Vec<CudaSlice<f32>> =
                (0..pairs).map(|_| self.scratch::<f32>((groups * c) as usize)).collect::<BResult<_>>()?;
            let outs = [dptr(st, &next[0]), dptr(st, &next[next.len() - 1])];
            launch_pass(parts, outs, chunks, group, groups)?;
            parts = outs;
            held = next;
        }
        let first = dptr(st, out);
        let outs = [first, second_out.map(|o| dptr(st, o)).unwrap_or(first)];
        launch_pass(parts, outs, last.0, last.1, last.2)?;
        // (The partials go back to the stream-ordered pool after the launches using them.)
        drop((held, part, second_part));
        Ok(())
    }

    fn operand(&self, o: &Operand<'_, Self>) -> (u64, i32) {
        use cudarc::driver::DevicePtr;
        let s = &self.gpu.stream;
        match o {
            Operand::F32(b) => (b.device_ptr(s).0, 0),
            Operand::Bf16(b) => (b.device_ptr(s).0, 1),
            Operand::Fp8(b, f, _) => (b.device_ptr(s).0, 2 + e5(*f)),
        }
    }
}

impl Backend for Cuda {
    type Buf<T: Elem> = CudaSlice<T>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn synchronize(&self) -> BResult<()> {
        self.gpu.stream.synchronize().map_err(|e| BackendError::new("CUDA synchronize", e))?;
        Ok(())
    }
    fn set_profiling(&self, on: bool) {
        *self.profile.borrow_mut() = on.then(Prof::default);
        self.leave();
    }
    fn take_profile(&self) -> Vec<OpTime> {
        self.leave();
        let Some(prof) = self.profile.borrow_mut().replace(Prof::default()) else { return Vec::new() };
        // Measurement only: a failed synchronize leaves the events unfinished, and their
        // times read as zero; the next device op reports the error itself.
        let _ = self.gpu.stream.synchronize();
        let spans = prof
            .marks
            .windows(2)
            .map(|w| (w[0].0, w[0].1, f64::from(w[0].2.elapsed_ms(&w[1].2).unwrap_or(0.0)), w[0].3));
        let times = op_times(spans);
        self.leave();
        times
    }
    fn memory(&self) -> Option<MemoryStats> {
        let (free, total) = self.gpu.ctx.mem_get_info().ok()?;
        Some(MemoryStats {
            pool_high_water: self.gpu.pool.high_water(),
            device_used: (total - free) as u64,
            device_total: total as u64,
        })
    }
    fn reset_memory_peak(&self) {
        self.gpu.pool.reset_high_water();
    }
    fn available_memory(&self) -> Option<(u64, String)> {
        let (free, _) = self.gpu.ctx.mem_get_info().ok()?;
        Some((free as u64, format!("GPU {} ({})", self.gpu.ctx.ordinal(), self.gpu.name)))
    }
    fn op_scratch(&self, s: AttnShape) -> OpScratch {
        OpScratch { attention: self.attention_scratch_bytes(s), ..op_scratch_without_attention() }
    }
    fn memory_overhead(&self, est: &Estimate) -> u64 {
        cuda_memory_overhead(est)
    }
    fn attention_scratch_bytes(&self, s: AttnShape) -> u64 {
        let (b, t, c, nh) = (s.b as u64, s.t as u64, s.c as u64, s.nh as u64);
        if self.flash(s.c / s.nh).is_some() {
            flash_scratch_bytes(s)
        } else {
            // Probabilities and their gradients, t x t f32 each per head; qkv as f32.
            8 * b * nh * t * t + 12 * b * t * c
        }
    }

    fn zeros<T: Elem>(&self, n: usize) -> BResult<CudaSlice<T>> {
        self.gpu.stream.alloc_zeros::<T>(n).map_err(|e| oom(n * std::mem::size_of::<T>(), e))
    }
    fn upload<T: Elem>(&self, data: &[T]) -> BResult<CudaSlice<T>> {
        self.gpu.stream.clone_htod(data).map_err(|e| BackendError::new("CUDA copy to the device", e))
    }
    fn download<T: Elem>(&self, buf: &CudaSlice<T>) -> BResult<Vec<T>> {
        self.gpu.stream.clone_dtoh(buf).map_err(|e| BackendError::new("CUDA copy from the device", e))
    }
    fn len<T: Elem>(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }
    /// Into pinned host memory, behind the queued work; `wait` waits on its event.
    fn download_later<T: Elem>(&self, buf: &CudaSlice<T>) -> BResult<Later<T>> {
        let err = |e| BackendError::new("CUDA copy from the device", e);
        // SAFETY: every element is written by the copy below before `wait` reads it.
        let mut host = unsafe { self.gpu.ctx.alloc_pinned_with_flags::<T>(buf.len(), 0) }.map_err(err)?;
        self.gpu.stream.memcpy_dtoh(buf, &mut host).map_err(err)?;
        // (An event of our own: with cudarc's per-buffer event tracking off, the pinned
        // slice's own event is never recorded, so waiting on it would not wait. Measured:
        // the first step's figures read as zeros.)
        let done = self.gpu.stream.record_event(None).map_err(err)?;
        Ok(Later::new(move || {
            done.synchronize().map_err(err)?;
            Ok(host.as_slice().map_err(err)?.to_vec())
        }))
    }
    fn copy<T: Elem>(&self, dst: &mut CudaSlice<T>, src: &CudaSlice<T>) -> BResult<()> {
        let _op = self.op(Phase::Other, "copy");
        self.gpu.stream.memcpy_dtod(src, dst).map_err(|e| BackendError::new("CUDA copy", e))?;
        Ok(())
    }

    fn amax(&self, x: &CudaSlice<f32>) -> BResult<f32> {
        Ok({
            let _op = self.op(Phase::Other, "amax");
            let n = x.len() as u32;
            let mut out = self.alloc::<u64>(1)?;
            launch!(self, "amax_bits", with stride_cfg(n as usize), [x, &n, &mut out]);
            slot_amax(self.gpu.stream.clone_dtoh(&out).map_err(|e| BackendError::new("CUDA copy", e))?[0])
        })
    }
    fn cast_fp8(&self, q: &mut CudaSlice<u8>, x: &CudaSlice<f32>, fmt: Fp8Format, scale: f32) -> BResult<CastStats> {
        Ok({
            let _op = self.op(Phase::Other, "cast_fp8");
            let n = x.len() as u32;
            let mut stats = self.alloc::<u64>(2)?;
            let (f, sp) = (e5(fmt), self.sptr(Scalar::Host(scale))?);
            launch!(self, "cast_fp8", with stride_cfg(n as usize), [x, q, &sp, &n, &f, &mut stats]);
            let st = self.gpu.stream.clone_dtoh(&stats).map_err(|e| BackendError::new("CUDA copy", e))?;
            CastStats { amax: slot_amax(st[0]), saturated: st[1] }
        })
    }
    fn decode_fp8(&self, x: &mut CudaSlice<f32>, q: &CudaSlice<u8>, fmt: Fp8Format, inv_scale: f32) -> BResult<()> {
        let _op = self.op(Phase::Other, "decode_fp8");
        let (n, f, ip) = (q.len() as u32, e5(fmt), self.sptr(Scalar::Host(inv_scale))?);
        launch!(self, "decode_fp8", n as usize, [q, x, &ip, &n, &f]);
        Ok(())
    }
    fn cast_bf16(&self, y: &mut CudaSlice<bf16>, x: &CudaSlice<f32>) -> BResult<()> {
        let _op = self.op(Phase::Other, "cast_bf16");
        let n = x.len() as u32;
        launch!(self, "cast_bf16", (n as usize).div_ceil(4), [x, y, &n]);
        Ok(())
    }
    fn cast_f16(&self, y: &mut CudaSlice<f16>, x: &CudaSlice<f32>, scale: f32) -> BResult<()> {
        let _op = self.op(Phase::Other, "cast_f16");
        let n = x.len() as u32;
        launch!(self, "cast_f16", n as usize, [x, y, &scale, &n]);
        Ok(())
    }
    fn decode_f16(&self, x: &mut CudaSlice<f32>, h: &CudaSlice<f16>, inv_scale: Scalar<'_, Self>) -> BResult<()> {
        let _op = self.op(Phase::Other, "decode_f16");
        let (n, ip) = (h.len() as u32, self.sptr(inv_scale)?);
        launch!(self, "decode_f16", n as usize, [h, x, &ip, &n]);
        Ok(())
    }
    fn cast_bf16_from_f16(
        &self,
        y: &mut CudaSlice<bf16>,
        h: &CudaSlice<f16>,
        inv_scale: Scalar<'_, Self>,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "cast_bf16");
        let (n, ip) = (h.len() as u32, self.sptr(inv_scale)?);
        launch!(self, "cast_bf16_from_f16", (n as usize).div_ceil(4), [h, y, &ip, &n]);
        Ok(())
    }
    fn amax_to(&self, x: &CudaSlice<f32>, mut slot: Slot<'_, Self>) -> BResult<()> {
        let _op = self.op(Phase::Other, "amax");
        let (n, p) = (x.len() as u32, self.slot_ptr(&mut slot));
        launch!(self, "amax_bits", with stride_cfg(n as usize), [x, &n, &p]);
        Ok(())
    }
    fn cast_fp8_bf16_to(
        &self,
        q: &mut CudaSlice<u8>,
        x: &CudaSlice<bf16>,
        fmt: Fp8Format,
        scale: Scalar<'_, Self>,
        stats: Slot<'_, Self>,
    ) -> BResult<()> {
        use cudarc::driver::DevicePtr;
        self.cast_fp8_launch("cast_fp8_bf16", x.device_ptr(&self.gpu.stream).0, x.len(), q, fmt, scale, stats)
    }
    fn widen_bf16(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<bf16>) -> BResult<()> {
        let _op = self.op(Phase::Other, "widen_bf16");
        let n = x.len() as u32;
        launch!(self, "widen_bf16", n as usize, [x, out, &n]);
        Ok(())
    }
    fn cast_fp8_to(
        &self,
        q: &mut CudaSlice<u8>,
        x: &CudaSlice<f32>,
        fmt: Fp8Format,
        scale: Scalar<'_, Self>,
        stats: Slot<'_, Self>,
    ) -> BResult<()> {
        use cudarc::driver::DevicePtr;
        self.cast_fp8_launch("cast_fp8", x.device_ptr(&self.gpu.stream).0, x.len(), q, fmt, scale, stats)
    }
    fn cast_fp8_jit(
        &self,
        q: &mut CudaSlice<u8>,
        x: JitSrc<'_, Self>,
        fmt: Fp8Format,
        scale: ScaleSlot<'_, Self>,
        mut amax: Slot<'_, Self>,
    ) -> BResult<()> {
        use cudarc::driver::DevicePtr;
        let _op = self.op(Phase::Other, "cast_fp8_jit");
        let (f, p) = (e5(fmt), self.slot_ptr(&mut amax));
        let s = &self.gpu.stream;
        assert!(scale.at + 1 < scale.buf.len(), "a scale slot holds the scale and its inverse");
        let sslot = dptr_at(s, scale.buf, scale.at);
        let (src, f16, inv, n) = match x {
            JitSrc::F32(x) => {
                let n = x.len() as u32;
                launch!(self, "amax_bits", with stride_cfg(n as usize), [x, &n, &p]);
                (x.device_ptr(s).0, 0i32, 0u64, n)
            }
            JitSrc::F16(h, inv) => {
                let (n, ip) = (h.len() as u32, self.sptr(inv)?);
                launch!(self, "amax_f16", with stride_cfg(n as usize), [h, &ip, &n, &p]);
                (h.device_ptr(s).0, 1, ip, n)
            }
        };
        launch!(self, "cast_fp8_jit", (n as usize).div_ceil(4), [&src, &f16, &inv, q, &sslot, &n, &f, &p]);
        Ok(())
    }
    /// All the tensors' amaxes in one launch, all the casts in a second (a block per
    /// 16384-element chunk; the table's rows are JitItem's, elementwise.cu).
    fn cast_fp8_jit_many(
        &self,
        items: Vec<(&mut CudaSlice<u8>, JitSrc<'_, Self>, ScaleSlot<'_, Self>, usize)>,
        fmt: Fp8Format,
        stats: &mut CudaSlice<u64>,
    ) -> BResult<()> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let _op = self.op(Phase::Other, "cast_fp8_jit");
        let s = &self.gpu.stream;
        let rows = items
            .into_iter()
            .map(|(q, x, sat, at)| {
                let (src, f16, inv, n) = match x {
                    JitSrc::F32(x) => (x.device_ptr(s).0, 0u32, 0u64, x.len()),
                    JitSrc::F16(h, inv) => (h.device_ptr(s).0, 1, self.sptr(inv)?, h.len()),
                };
                assert!(sat.at + 1 < sat.buf.len(), "a scale slot holds the scale and its inverse");
                let sslot = dptr_at(s, sat.buf, sat.at);
                Ok(JitRow { src, q: q.device_ptr_mut(s).0, at, n, f16, inv, sslot, e5m2: e5(fmt) as u32 })
            })
            .collect::<BResult<Vec<_>>>()?;
        self.jit_multi(rows, stats, true)
    }
    /// Every tensor's BF16 copy in one launch (the table's `q` is the BF16 output).
    fn cast_bf16_many(&self, items: Vec<(&mut CudaSlice<bf16>, &CudaSlice<f32>)>) -> BResult<()> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let _op = self.op(Phase::Other, "cast_bf16");
        let s = &self.gpu.stream;
        let rows = items
            .into_iter()
            .map(|(y, x)| {
                assert_eq!(x.len(), y.len(), "cast_bf16_many: sizes");
                let (src, q) = (x.device_ptr(s).0, y.device_ptr_mut(s).0);
                JitRow { src, q, at: 0, n: x.len(), f16: 0, inv: 0, sslot: 0, e5m2: 0 }
            })
            .collect::<Vec<_>>();
        self.multi_launch(&rows, 0, &["cast_bf16_multi"])
    }
    /// Every FP16 master's f32 copy in one launch (the table's `q` is the f32 output).
    fn decode_f16_many(&self, items: Vec<(&mut CudaSlice<f32>, &CudaSlice<f16>, Scalar<'_, Self>)>) -> BResult<()> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let _op = self.op(Phase::Other, "decode_f16");
        let s = &self.gpu.stream;
        let rows = items
            .into_iter()
            .map(|(x, h, inv)| {
                assert_eq!(x.len(), h.len(), "decode_f16_many: sizes");
                let (src, q) = (h.device_ptr(s).0, x.device_ptr_mut(s).0);
                Ok(JitRow { src, q, at: 0, n: h.len(), f16: 1, inv: self.sptr(inv)?, sslot: 0, e5m2: 0 })
            })
            .collect::<BResult<Vec<_>>>()?;
        self.multi_launch(&rows, 0, &["decode_f16_multi"])
    }
    /// Every tensor's amax in one launch (jit_amax_multi without the casts).
    fn amax_many(&self, items: Vec<(&CudaSlice<f32>, usize)>, stats: &mut CudaSlice<u64>) -> BResult<()> {
        use cudarc::driver::DevicePtr;
        let _op = self.op(Phase::Other, "amax");
        let s = &self.gpu.stream;
        let rows = items
            .into_iter()
            .map(|(x, at)| JitRow { src: x.device_ptr(s).0, q: 0, at, n: x.len(), f16: 0, inv: 0, sslot: 0, e5m2: 0 })
            .collect::<Vec<_>>();
        self.jit_multi(rows, stats, false)
    }
    /// Every gradient's sum of squares on the device (E4M3 codes decoded on the fly),
    /// one read-back for all.
    fn grad_sq_sums(&self, grads: &[GradRef<'_, Self>]) -> BResult<Vec<f32>> {
        let _op = self.op(Phase::Other, "grad_sq_sums");
        let Some((part, at)) = self.sq_sums_device(grads)? else { return Ok(vec![0.0; grads.len()]) };
        let host = self.download(&part)?;
        Ok(at.iter().map(|&k| if k == u32::MAX { 0.0 } else { host[k as usize] }).collect())
    }
    fn grad_sq_sums_to(&self, grads: &[GradRef<'_, Self>], out: &mut CudaSlice<f32>) -> BResult<()> {
        let _op = self.op(Phase::Other, "grad_sq_sums");
        let n = grads.len() as u32;
        assert!(out.len() >= grads.len(), "grad_sq_sums_to: {} sums into {}", grads.len(), out.len());
        let (part, at) = match self.sq_sums_device(grads)? {
            Some(found) => found,
            None => (self.alloc::<f32>(1)?, vec![u32::MAX; grads.len()]),
        };
        let idx = self.upload(&at)?;
        launch!(self, "gather_f32", n as usize, [out, &part, &idx, &n]);
        Ok(())
    }
    fn mean_to(&self, x: &CudaSlice<f32>, out: &mut CudaSlice<f32>, at: usize) -> BResult<()> {
        let _op = self.op(Phase::Other, "mean");
        let o = dptr_at(&self.gpu.stream, out, at);
        let sum = self.sum_device(x, 0)?;
        let nf = x.len() as f32;
        launch!(self, "mean_finish", 1, [&o, &sum, &nf]);
        Ok(())
    }
    fn delayed_scaling_update(&self, d: Delayed<'_, Self>, stats: &CudaSlice<u64>) -> BResult<()> {
        let _op = self.op(Phase::Other, "delayed_scaling");
        let (n, w) = (d.slots.len() as u32, d.window as u32);
        let pairs = crate::backend::SCALE_STRIDE * n as usize;
        assert!(d.hist.len() >= (n * w) as usize && d.recorded.len() >= n as usize && d.scales.len() >= pairs);
        launch!(self, "delayed_scaling_update", n as usize, [d.hist, d.recorded, d.scales, d.slots, &n, &w, stats]);
        Ok(())
    }
    fn flag_nonfinite(
        &self,
        out: &mut CudaSlice<f32>,
        at: usize,
        stats: &CudaSlice<u64>,
        slots: &CudaSlice<u32>,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "flag_nonfinite");
        let (o, n) = (dptr_at(&self.gpu.stream, out, at), slots.len() as u32);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "flag_nonfinite", with cfg, [&o, stats, slots, &n]);
        Ok(())
    }
    fn step_control(&self, ctl: &mut CudaSlice<f32>, sq: &CudaSlice<f32>, c: &StepControl) -> BResult<()> {
        let _op = self.op(Phase::Optimizer, "step_control");
        assert!(ctl.len() >= fp8sim::ops::adamw::ctl::LEN, "step controller words");
        let n = sq.len() as u32;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        let (gc, r, b1, b2, gi, lo, hi) =
            (c.grad_clip, c.ranks, c.beta1, c.beta2, c.mu_growth_interval, c.mu_min, c.mu_max);
        launch!(self, "step_control", with cfg, [ctl, sq, &n, &gc, &r, &b1, &b2, &gi, &lo, &hi]);
        Ok(())
    }

    fn sum_sq(&self, x: &CudaSlice<f32>) -> BResult<f32> {
        Ok({
            let _op = self.op(Phase::Other, "sum_sq");
            self.csum(x, 1)?
        })
    }
    fn mean(&self, x: &CudaSlice<f32>) -> BResult<f32> {
        Ok({
            let _op = self.op(Phase::Other, "mean");
            self.csum(x, 0)? / x.len() as f32
        })
    }

    fn matmul(
        &self,
        out: &mut CudaSlice<f32>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        product: Product,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
    ) -> BResult<()> {
        self.product_into(ProductOut::F32(out), a, b, product, (m, n, k), scale, false)
    }
    fn matmul_bf16(
        &self,
        y: &mut CudaSlice<bf16>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        product: Product,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
    ) -> BResult<()> {
        self.product_into(ProductOut::Bf16(y), a, b, product, (m, n, k), scale, false)
    }
    fn matmul_acc(
        &self,
        out: &mut CudaSlice<f32>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        product: Product,
        m: usize,
        n: usize,
        k: usize,
    ) -> BResult<()> {
        self.product_into(ProductOut::F32(out), a, b, product, (m, n, k), 1.0, true)
    }
    fn copy_range<T: Elem>(
        &self,
        dst: &mut CudaSlice<T>,
        dst_at: usize,
        src: &CudaSlice<T>,
        src_at: usize,
        len: usize,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "copy");
        self.gpu
            .stream
            .memcpy_dtod(&src.slice(src_at..src_at + len), &mut dst.slice_mut(dst_at..dst_at + len))
            .map_err(|e| BackendError::new("CUDA copy", e))
    }
    fn column_sums(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, rows: usize, cols: usize) -> BResult<()> {
        let _op = self.op(Phase::Other, "column_sums");
        self.column_sums_at(out, dptr(&self.gpu.stream, x), false, rows, cols)
    }
    fn column_sums_cast(
        &self,
        out: &mut CudaSlice<f32>,
        q: &mut CudaSlice<u8>,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        fmt: Fp8Format,
        scale: Scalar<'_, Self>,
        mut stats: Slot<'_, Self>,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "column_sums_cast");
        assert!(stats.at + 1 < stats.buf.len(), "cast statistics need two slots");
        let (f, p, scale) = (e5(fmt), self.slot_ptr(&mut stats), self.sptr(scale)?);
        let s = &self.gpu.stream;
        let four = by_four(cols as u32, &[(dptr(s, x), 16), (dptr(s, q), 4)]);
        let kernel = if four { "column_chunk_sums_cast4" } else { "column_chunk_sums_cast" };
        self.column_sums_via(out, rows, cols, four, |part, r, c, items| {
            launch!(self, kernel, items, [x, part, &r, &c, q, &scale, &f, &p]);
            Ok(())
        })
    }
    fn column_sums_bf16(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<bf16>, rows: usize, cols: usize) -> BResult<()> {
        let _op = self.op(Phase::Other, "column_sums");
        self.column_sums_at(out, dptr(&self.gpu.stream, x), true, rows, cols)
    }
    fn column_sums_cast_from_bf16(
        &self,
        out: &mut CudaSlice<f32>,
        q: &mut CudaSlice<u8>,
        x: &CudaSlice<bf16>,
        rows: usize,
        cols: usize,
        fmt: Fp8Format,
        scale: Scalar<'_, Self>,
        mut stats: Slot<'_, Self>,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "column_sums_cast");
        assert!(stats.at + 1 < stats.buf.len(), "cast statistics need two slots");
        let (f, p, scale) = (e5(fmt), self.slot_ptr(&mut stats), self.sptr(scale)?);
        let s = &self.gpu.stream;
        let four = by_four(cols as u32, &[(dptr(s, x), 8), (dptr(s, q), 4)]);
        self.column_sums_via(out, rows, cols, four, |part, r, c, items| {
            let by4 = i32::from(four);
            launch!(self, "column_chunk_sums_cast_from_bf16", items, [x, part, &r, &c, q, &scale, &f, &p, &by4]);
            Ok(())
        })
    }
    fn column_sums_cast_bf16(
        &self,
        out: &mut CudaSlice<f32>,
        q: &mut CudaSlice<bf16>,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "column_sums_cast");
        let s = &self.gpu.stream;
        let four = by_four(cols as u32, &[(dptr(s, x), 16), (dptr(s, q), 8)]);
        self.column_sums_via(out, rows, cols, four, |part, r, c, items| {
            let by4 = i32::from(four);
            launch!(self, "column_chunk_sums_bf16_copy", items, [x, part, &r, &c, q, &by4]);
            Ok(())
        })
    }
    fn residual_forward(
        &self,
        out: &mut CudaSlice<f32>,
        res: &CudaSlice<f32>,
        x: &CudaSlice<bf16>,
        bias: &CudaSlice<f32>,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "residual_forward");
        let (n, c) = (out.len() as u32, bias.len() as u32);
        launch!(self, "residual_forward", (n as usize).div_ceil(4), [out, res, x, bias, &c, &n]);
        Ok(())
    }
    fn set(&self, x: &mut CudaSlice<f32>, i: usize, v: f32) -> BResult<()> {
        let _op = self.op(Phase::Other, "set");
        let mut host = self.download(x)?;
        host[i] = v;
        *x = self.upload(&host)?;
        Ok(())
    }

    fn encoder_forward(
        &self,
        out: &mut CudaSlice<f32>,
        tokens: &CudaSlice<u32>,
        wte: EmbedTable<'_, Self>,
        wpe: &CudaSlice<f32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "encoder_forward");
        let (bb, tt, cc) = (b as u32, t as u32, c as u32);
        match wte {
            EmbedTable::F32(w) => launch!(self, "encoder_forward", b * t * c, [out, tokens, w, wpe, &bb, &tt, &cc]),
            EmbedTable::F16(h, inv) => {
                let ip = self.sptr(inv)?;
                launch!(self, "encoder_forward_f16", b * t * c, [out, tokens, h, &ip, wpe, &bb, &tt, &cc])
            }
        }
        Ok(())
    }
    fn encoder_backward(
        &self,
        dwte: &mut CudaSlice<f32>,
        dwpe: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        tokens: &CudaSlice<u32>,
        host_tokens: &[u32],
        b: usize,
        t: usize,
        c: usize,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "encoder_backward");
        // Positions grouped by token on the host (stable, so ascending within a token),
        // from the caller's copy: no read-back, the queue keeps running.
        if host_tokens.len() != tokens.len() {
            return Err(BackendError::new("encoder_backward", "host and device token counts differ"));
        }
        let toks = host_tokens;
        let mut order: Vec<u32> = (0..toks.len() as u32).collect();
        order.sort_by_key(|&i| toks[i as usize]);
        let (mut seg, mut segtok) = (Vec::new(), Vec::new());
        for (k, &i) in order.iter().enumerate() {
            if k == 0 || toks[i as usize] != toks[order[k - 1] as usize] {
                seg.push(k as u32);
                segtok.push(toks[i as usize]);
            }
        }
        seg.push(order.len() as u32);
        let (bb, tt, cc) = (b as u32, t as u32, c as u32);
        if !segtok.is_empty() {
            let (order, seg, segtok) = (self.upload(&order)?, self.upload(&seg)?, self.upload(&segtok)?);
            let cf = LaunchConfig {
                grid_dim: ((seg.len() - 1) as u32, cc.div_ceil(128), 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(self, "encoder_backward_wte", with cf, [&mut *dwte, dout, &order, &seg, &segtok, &cc]);
        }
        launch!(self, "encoder_backward_wpe", t * c, [dwpe, dout, &bb, &tt, &cc]);
        Ok(())
    }
    fn layernorm_forward(
        &self,
        mut y: ActOut<'_, Self>,
        xhat: &mut CudaSlice<bf16>,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        n: usize,
        c: usize,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "layernorm_forward");
        let (nn, cc) = (n as u32, c as u32);
        let (py, mode, scale, pa) = self.act_out(&mut y)?;
        let st = &self.gpu.stream;
        // Staged row and 2 chunks of scratch per warp: 34 chunks.
        let aligned = [(py, 16), (dptr(st, x), 16), (dptr(st, w), 16), (dptr(st, b), 16), (dptr(st, xhat), 8)];
        let vec = i32::from(by_four(cc, &aligned));
        let cfg = ln_cfg(n, c, 2, 34);
        launch!(self, "layernorm_forward", with cfg, [&py, &mode, &scale, &pa, xhat, mean, rstd, x, w, b, &nn, &cc, &vec]);
        Ok(())
    }
    fn layernorm_backward(
        &self,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
        dw: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
        dy: &CudaSlice<bf16>,
        xhat: &CudaSlice<bf16>,
        w: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        n: usize,
        c: usize,
    ) -> BResult<()> {
        let (nn, cc) = (n as u32, c as u32);
        let acc = i32::from(accumulate);
        let st = &self.gpu.stream;
        let vec = by_four(cc, &[(dptr(st, dx), 16), (dptr(st, dy), 8), (dptr(st, xhat), 8), (dptr(st, w), 16)]);
        let chunks = nn.div_ceil(32);
        let mut pw = self.scratch::<f32>((chunks * cc) as usize)?;
        let mut pb = self.scratch::<f32>((chunks * cc) as usize)?;
        if let Some((cfg, name)) = self.ln_chunks_launch(n, c)?.filter(|_| vec) {
            // dx and both gradients' chunk partials in one pass over x and dy.
            let _op = self.op(Phase::Other, "layernorm_backward");
            launch!(self, name, with cfg, [&mut *dx, &acc, dy, xhat, w, rstd, &nn, &cc, &mut pw, &mut pb]);
        } else {
            {
                let _op = self.op(Phase::Other, "layernorm_backward");
                let vec = i32::from(vec);
                // Staged xhat and dy (BF16, 16 chunks each) and 4 chunks of scratch per
                // warp (LN_BWD_WARP_CHUNKS).
                let cfg = ln_cfg(n, c, 1, LN_BWD_WARP_CHUNKS);
                launch!(self, "layernorm_backward_rows", with cfg, [&mut *dx, &acc, dy, xhat, w, rstd, &nn, &cc, &vec]);
            }
            // The weight and bias gradients: both columns' chunk sums in one pass.
            let _op = self.op(Phase::Other, "column_sums");
            if by_four(cc, &[(dptr(st, xhat), 8), (dptr(st, dy), 8)]) {
                let items = (chunks * cc / 4) as usize;
                launch!(self, "layernorm_param_sums4", items, [&mut pw, &mut pb, xhat, dy, &nn, &cc]);
            } else {
                let items = (chunks * cc) as usize;
                launch!(self, "layernorm_param_sums", items, [&mut pw, &mut pb, xhat, dy, &nn, &cc]);
            }
        }
        let _op = self.op(Phase::Other, "column_sums");
        self.column_trees(dw, pw, Some((db, pb)), chunks, cc)
    }
    fn attention_forward(
        &self,
        out: &mut CudaSlice<bf16>,
        stats: &mut CudaSlice<f32>,
        qkv: &CudaSlice<bf16>,
        s: AttnShape,
    ) -> BResult<()> {
        let _op = self.op(Phase::Attention, "attention_forward");
        let (b, t, c, nh) = (s.b as u32, s.t as u32, s.c as u32, s.nh as u32);
        if let Some(k) = self.flash(s.c / s.nh) {
            let cf = LaunchConfig {
                grid_dim: (t.div_ceil(64).max(1), (s.b * s.nh).max(1) as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: k.forward_smem,
            };
            launch!(self, k.forward, with cf, [out, stats, qkv, &t, &c, &nh]);
            return Ok(());
        }
        // The exact kernels read qkv as f32 and write the output in f32, rounded to
        // BF16 after (the contract's storage of the attention output).
        let wide = self.widen(qkv)?;
        let qkv = &wide;
        let mut o32 = self.scratch::<f32>(out.len())?;
        let no = out.len() as u32;
        if let Some((fwd, _)) = tiled_attention(s.c / s.nh) {
            let hs = s.c / s.nh;
            let shared = ((64 * (hs + 1) + 64 * hs + 64 * 65) * 4) as u32;
            let cf = LaunchConfig {
                grid_dim: (t.div_ceil(64).max(1), (s.b * s.nh).max(1) as u32, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: shared,
            };
            launch!(self, fwd, with cf, [&mut o32, stats, qkv, &t, &c, &nh]);
        } else {
            launch!(self, "attention_forward", s.b * s.nh * s.t, [&mut o32, stats, qkv, &b, &t, &c, &nh]);
        }
        launch!(self, "cast_bf16", (no as usize).div_ceil(4), [&o32, out, &no]);
        Ok(())
    }
    fn attention_backward(
        &self,
        dqkv: &mut CudaSlice<bf16>,
        dout: &CudaSlice<bf16>,
        qkv: &CudaSlice<bf16>,
        out: &CudaSlice<bf16>,
        stats: &CudaSlice<f32>,
        s: AttnShape,
    ) -> BResult<()> {
        let _op = self.op(Phase::Attention, "attention_backward");
        let (b, t, c, nh) = (s.b as u32, s.t as u32, s.c as u32, s.nh as u32);
        if let Some(k) = self.flash(s.c / s.nh) {
            // Per query row: (max in base-2 units, 1 / sum, D = dout . out, 0); 8 threads a row.
            let mut aux = self.scratch::<f32>(4 * s.b * s.nh * s.t)?;
            launch!(self, "flash_backward_prep", 8 * s.b * s.nh * s.t, [&mut aux, dout, out, stats, &b, &t, &c, &nh]);
            // dS of every causal (query tile, key tile) pair, 64 x 64 BF16: the dK/dV
            // kernel writes it, the dQ kernel multiplies it by K.
            let mut ds = self.scratch::<u16>(flash_ds_len(s))?;
            let grid = (t.div_ceil(64).max(1), (s.b * s.nh).max(1) as u32, 1);
            let kv = LaunchConfig { grid_dim: grid, block_dim: (128, 1, 1), shared_mem_bytes: k.kv_smem };
            launch!(self, k.kv, with kv, [&mut *dqkv, &mut ds, dout, qkv, &aux, &t, &c, &nh]);
            let qc = LaunchConfig { grid_dim: grid, block_dim: (128, 1, 1), shared_mem_bytes: k.dq_smem };
            launch!(self, k.dq, with qc, [&mut *dqkv, &ds, qkv, &t, &c, &nh]);
            return Ok(());
        }
        let (wide, out32, dout32) = (self.widen(qkv)?, self.widen(out)?, self.widen(dout)?);
        let (qkv, out, dout) = (&wide, &out32, &dout32);
        if let Some((_, bwd)) = tiled_attention(s.c / s.nh) {
            // Entries above the diagonal are neither written nor read: no zeroing.
            let mut pm = self.scratch::<f32>(s.b * s.nh * s.t * s.t)?;
            let mut ds = self.scratch::<f32>(s.b * s.nh * s.t * s.t)?;
            let hs = s.c / s.nh;
            let shared = ((2 * 64 * (hs + 1) + 2 * 64 * hs + 2 * 64 * 65) * 4) as u32;
            let cf = LaunchConfig {
                grid_dim: (t.div_ceil(64).max(1), (s.b * s.nh).max(1) as u32, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: shared,
            };
            launch!(self, bwd, with cf, [&mut pm, &mut ds, dout, qkv, out, stats, &t, &c, &nh]);
            launch!(self, "attention_backward_grads", s.b * s.t * s.c, [dqkv, &pm, &ds, dout, qkv, &b, &t, &c, &nh]);
            return Ok(());
        }
        let mut pm = self.alloc::<f32>(s.b * s.nh * s.t * s.t)?;
        let mut ds = self.alloc::<f32>(s.b * s.nh * s.t * s.t)?;
        launch!(
            self,
            "attention_backward_scores",
            s.b * s.nh * s.t,
            [&mut pm, &mut ds, dout, qkv, out, stats, &b, &t, &c, &nh]
        );
        launch!(self, "attention_backward_grads", s.b * s.t * s.c, [dqkv, &pm, &ds, dout, qkv, &b, &t, &c, &nh]);
        Ok(())
    }
    fn gelu_forward(
        &self,
        mut y: ActOut<'_, Self>,
        x: &CudaSlice<bf16>,
        x8: Option<&mut CudaSlice<u8>>,
    ) -> BResult<()> {
        use cudarc::driver::DevicePtrMut;
        let _op = self.op(Phase::Other, "gelu_forward");
        let n = x.len() as u32;
        let tab = self.gelu_table(0)?;
        let (py, mode, scale, pa) = self.act_out(&mut y)?;
        let p8: u64 = match x8 {
            Some(q) => {
                assert_eq!(q.len(), x.len(), "gelu_forward: the E4M3 copy's length");
                q.device_ptr_mut(&self.gpu.stream).0
            }
            None => 0,
        };
        launch!(self, "gelu_forward", with gelu_cfg((n as usize).div_ceil(4)), [&py, &mode, &scale, &pa, &p8, x, &n, &tab]);
        Ok(())
    }
    fn gelu_backward(
        &self,
        dx: GradOut<'_, Self>,
        x: GeluIn<'_, Self>,
        dy: &CudaSlice<bf16>,
        cols: usize,
    ) -> BResult<()> {
        use cudarc::driver::DevicePtrMut;
        let _op = self.op(Phase::Other, "gelu_backward");
        let n = x.elements(self) as u32;
        let tab = self.gelu_table(1)?;
        let s = &self.gpu.stream;
        // The input's address, whether it is E4M3 and the alignment a 4-element load needs.
        let (px, e4m3, x_align) = match x {
            GeluIn::Bf16(x) => (dptr(s, x), 0i32, 8),
            GeluIn::E4m3(q) => (dptr(s, q), 1i32, 4),
        };
        let (db, q, mode, scale, f, p) = match dx {
            GradOut::F32(dx) => {
                launch!(self, "gelu_backward", with gelu_cfg((n as usize).div_ceil(4)), [dx, &px, &e4m3, dy, &n, &tab]);
                return Ok(());
            }
            GradOut::Bf16 { db, q } => (db, q.device_ptr_mut(&self.gpu.stream).0, 1i32, 0u64, 0i32, 0u64),
            GradOut::Fp8 { db, q, fmt, scale, mut stats } => {
                assert!(stats.at + 1 < stats.buf.len(), "cast statistics need two slots");
                let (p, sp) = (self.slot_ptr(&mut stats), self.sptr(scale)?);
                (db, q.device_ptr_mut(&self.gpu.stream).0, 2, sp, e5(fmt), p)
            }
        };
        let (rows, c) = (n / cols.max(1) as u32, cols as u32);
        let chunks = rows.div_ceil(32);
        let mut part = self.scratch::<f32>((chunks * c) as usize)?;
        let args_by_four = by_four(c, &[(px, x_align), (dptr(s, dy), 8), (q, if mode == 1 { 8 } else { 4 })]);
        let (kernel, items) =
            if args_by_four { ("gelu_backward_sums4", chunks * c / 4) } else { ("gelu_backward_sums", chunks * c) };
        let cf = gelu_cfg(items as usize);
        launch!(self, kernel, with cf, [&mut part, &q, &mode, &scale, &f, &p, &px, &e4m3, dy, &rows, &c, &tab]);
        self.column_tree(db, part, chunks, c)
    }
    fn matmul_bias_bf16(
        &self,
        y: &mut CudaSlice<bf16>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        bias: &CudaSlice<f32>,
    ) -> BResult<()> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        if self.lt.borrow().is_some() {
            // Fast class: BF16 out of cuBLASLt with the bias (rounded to BF16, the type
            // its epilogue takes) added before the output is rounded.
            let _op = self.op(Phase::Matmul, "matmul");
            let mut b16 = self.scratch::<bf16>(bias.len())?;
            let nb = bias.len() as u32;
            launch!(self, "cast_bf16", (nb as usize).div_ceil(4), [bias, &mut b16, &nb]);
            let s = &self.gpu.stream;
            let o = LtOut::Bf16 { d: y.device_ptr_mut(s).0, bias: b16.device_ptr(s).0 };
            match self.matmul_fast(o, &a, &b, Product::Forward, m, n, k, scale, false)? {
                Ok(()) => return Ok(()),
                Err(_) => self.fallbacks.set(self.fallbacks.get() + 1),
            }
        }
        // Exact class (or no algorithm): the product in f32 pool scratch, then the cast.
        let mut scratch = self.scratch::<f32>(m * n)?;
        self.matmul(&mut scratch, a, b, Product::Forward, m, n, k, scale)?;
        self.cast_bf16_bias(y, &scratch, bias)
    }
    fn cast_bf16_bias(&self, y: &mut CudaSlice<bf16>, x: &CudaSlice<f32>, bias: &CudaSlice<f32>) -> BResult<()> {
        let _op = self.op(Phase::Other, "cast_bf16_bias");
        let (n, c) = (x.len() as u32, bias.len() as u32);
        launch!(self, "cast_bf16_bias", (n as usize).div_ceil(4), [x, bias, y, &c, &n]);
        Ok(())
    }
    fn crossentropy(
        &self,
        losses: &mut CudaSlice<f32>,
        logits: &mut CudaSlice<bf16>,
        with_grad: bool,
        targets: &CudaSlice<u32>,
        dloss: LossGrad<'_, Self>,
        n: usize,
        v: usize,
    ) -> BResult<()> {
        let _op = self.op(Phase::Other, "crossentropy");
        let (mu, rows) = (self.sptr(dloss.mu)?, dloss.rows);
        let (nn, vv, with) = (n as u32, v as u32, i32::from(with_grad));
        let chunks = v.div_ceil(32);
        let scratch = ((chunks + chunks / 2 + 1 + 64) * 4) as u32;
        // The row as BF16, a row per block and two blocks per SM, when two fit (GPT-2's
        // 50304 classes: 108 KiB each; an SM has 228 KiB, 1 KiB of it reserved per block).
        let rows_kernel = scratch + (2 * 32 * chunks) as u32;
        if v.is_multiple_of(8) && 2 * (rows_kernel + 1024) <= self.max_shared() + 1024 {
            let c = LaunchConfig {
                grid_dim: (n.max(1) as u32, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: rows_kernel,
            };
            launch!(self, "crossentropy_rows", with c, [losses, logits, targets, &mu, &rows, &nn, &vv, &with]);
            return Ok(());
        }
        let staged = scratch + (4 * 32 * chunks) as u32;
        // Else the row's f32 values, then its exponentials, in shared memory when they fit.
        if v.is_multiple_of(4) && staged <= self.max_shared() {
            // Persistent blocks, one per SM (the shared memory holds one row), each
            // loading its next row while it computes this one.
            let blocks = n.clamp(1, self.sm_count() as usize) as u32;
            let c = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: staged };
            launch!(self, "crossentropy_staged", with c, [losses, logits, targets, &mu, &rows, &nn, &vv, &with]);
            return Ok(());
        }
        let c = LaunchConfig { grid_dim: (n.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: scratch };
        launch!(self, "crossentropy", with c, [losses, logits, targets, &mu, &rows, &nn, &vv, &with]);
        Ok(())
    }

    /// NCCL's broadcast in place, device to device (on the compute stream, so it is
    /// ordered with the kernels that write and read `buf`).
    fn broadcast_u8(&self, world: &World, buf: &mut CudaSlice<u8>, root: usize) -> BResult<()> {
        let _op = self.op(Phase::Communication, "broadcast");
        let comm = self.comm(world)?;
        comm.broadcast_in_place(buf, root as i32).map_err(|e| BackendError::new("NCCL broadcast", format!("{e:?}")))?;
        Ok(())
    }
    /// [`Cuda::broadcast_u8`] of the codes' bytes.
    fn broadcast_f16(&self, world: &World, buf: &mut CudaSlice<f16>, root: usize) -> BResult<()> {
        let _op = self.op(Phase::Communication, "broadcast");
        let comm = self.comm(world)?;
        let n = buf.len();
        // SAFETY: FP16 codes are two plain bytes each; the view covers exactly the buffer.
        let mut bytes = unsafe { buf.transmute_mut::<u8>(2 * n) }
            .ok_or_else(|| BackendError::new("NCCL broadcast", "FP16 codes as bytes"))?;
        comm.broadcast_in_place(&mut bytes, root as i32)
            .map_err(|e| BackendError::new("NCCL broadcast", format!("{e:?}")))?;
        Ok(())
    }

    /// The contract's reduction with NCCL moving the bytes and kernels doing the sums.
    /// (The scales, a few bytes, go over MPI: a read-back per tensor, data parallel only.)
    fn reduce_grad_fp8(
        &self,
        world: &World,
        codes: &mut CudaSlice<u8>,
        scale: &mut CudaSlice<f32>,
    ) -> BResult<CommBytes> {
        Ok({
            let _op = self.op(Phase::Communication, "reduce_grad_fp8");
            let ranks = world.size;
            if ranks == 1 {
                return Ok(CommBytes::default());
            }
            let comm = self.comm(world)?;
            let n = codes.len();
            let k = n.div_ceil(ranks).max(1);
            let mut send = self.alloc::<u8>(k * ranks)?;
            self.gpu
                .stream
                .memcpy_dtod(codes, &mut send.slice_mut(0..n))
                .map_err(|e| BackendError::new("CUDA copy", e))?;
            let recv = self.all_to_all(comm, &send, k)?;
            let scales = world.all_gather_vec(&[self.download(scale)?[1]]);
            let inv = self.upload(&scales.iter().map(|s| 1.0 / s).collect::<Vec<f32>>())?;
            let mine = n.saturating_sub(world.rank * k).min(k) as u32;
            let (rr, kk) = (ranks as u32, k as u32);
            let mut sums = self.alloc::<f32>(k)?;
            launch!(self, "fp8_reduce_sum", k, [&recv, &inv, &rr, &kk, &mine, &mut sums]);
            let mut a = [self.amax(&sums)?];
            world.all_reduce_max(&mut a);
            let shared = scale_from_amax(Fp8Format::E4M3, a[0], 0, 1.0);
            let mut q = self.alloc::<u8>(k)?;
            self.cast_fp8(&mut q, &sums, Fp8Format::E4M3, shared)?;
            let mut all = self.alloc::<u8>(k * ranks)?;
            comm.all_gather(&q, &mut all).map_err(|e| BackendError::new("NCCL all-gather", format!("{e:?}")))?;
            self.gpu.stream.memcpy_dtod(&all.slice(0..n), codes).map_err(|e| BackendError::new("CUDA copy", e))?;
            *scale = self.upload(&[1.0 / shared, shared])?;
            let peers = (ranks - 1) as u64;
            CommBytes { payload: 2 * peers * k as u64, meta: 2 * peers * 4 }
        })
    }

    fn reduce_grad_f32(&self, world: &World, g: &mut CudaSlice<f32>) -> BResult<CommBytes> {
        Ok({
            let _op = self.op(Phase::Communication, "reduce_grad_f32");
            let ranks = world.size;
            if ranks == 1 {
                return Ok(CommBytes::default());
            }
            let comm = self.comm(world)?;
            let n = g.len();
            let k = n.div_ceil(ranks).max(1);
            let mut send = self.alloc::<f32>(k * ranks)?;
            self.gpu.stream.memcpy_dtod(g, &mut send.slice_mut(0..n)).map_err(|e| BackendError::new("CUDA copy", e))?;
            let recv = self.all_to_all(comm, &send, k)?;
            let mine = n.saturating_sub(world.rank * k).min(k) as u32;
            let (rr, kk) = (ranks as u32, k as u32);
            let mut sums = self.alloc::<f32>(k)?;
            launch!(self, "f32_reduce_sum", k, [&recv, &rr, &kk, &mine, &mut sums]);
            let mut all = self.alloc::<f32>(k * ranks)?;
            comm.all_gather(&sums, &mut all).map_err(|e| BackendError::new("NCCL all-gather", format!("{e:?}")))?;
            self.gpu.stream.memcpy_dtod(&all.slice(0..n), g).map_err(|e| BackendError::new("CUDA copy", e))?;
            let peers = (ranks - 1) as u64;
            CommBytes { payload: 2 * peers * 4 * k as u64, meta: 0 }
        })
    }

    fn adamw(
        &self,
        state: AdamState<'_, Self>,
        grad: GradRef<'_, Self>,
        step: &AdamStep,
        ctl: Option<&CudaSlice<f32>>,
    ) -> BResult<()> {
        self.adamw_many(vec![(state, grad, *step)], ctl)
    }
    /// Three launches over all tensors, nothing read back (see adamw.cu).
    fn adamw_many(
        &self,
        items: Vec<(AdamState<'_, Self>, GradRef<'_, Self>, AdamStep)>,
        ctl: Option<&CudaSlice<f32>>,
    ) -> BResult<()> {
        let _op = self.op(Phase::Optimizer, "adamw");
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let s = &self.gpu.stream;
        let amax = self.alloc::<u64>(3 * items.len().max(1))?;
        let amax_base = amax.device_ptr(s).0;
        let ctl_ptr = ctl.map(|c| dptr(s, c)).unwrap_or(0);
        let ptr = |p: u64, w: &mut Vec<u32>| w.extend([p as u32, (p >> 32) as u32]);
        // The kernels' AdamItem, 32 words per tensor, and the (tensor, first element)
        // chunk of every block.
        let mut table: Vec<u32> = Vec::with_capacity(ADAM_ITEM_WORDS * items.len());
        let mut chunks: Vec<u32> = Vec::new();
        let mut scaled = false;
        for (i, (state, grad, step)) in items.into_iter().enumerate() {
            let (g32, gq, ginv) = match grad {
                GradRef::F32(g) => (g.device_ptr(s).0, 0u64, 0u64),
                GradRef::Fp8(q, inv) => (0u64, q.device_ptr(s).0, self.sptr(inv)?),
            };
            let (master, m, v, n, level, ps, mvs) = match state {
                AdamState::F32 { master, m, v } => {
                    let n = master.len();
                    (master.device_ptr(s).0, m.device_ptr(s).0, v.device_ptr(s).0, n, 0u32, 0u64, 0u64)
                }
                AdamState::O1 { master, master_scale, m, v } => {
                    let n = master.len();
                    let ps = master_scale.device_ptr_mut(s).0;
                    (master.device_ptr(s).0, m.device_ptr(s).0, v.device_ptr(s).0, n, 1, ps, 0)
                }
                AdamState::O2 { master, master_scale, m, v, moment_scales } => {
                    let n = master.len();
                    let (ps, mvs) = (master_scale.device_ptr_mut(s).0, moment_scales.device_ptr_mut(s).0);
                    (master.device_ptr(s).0, m.device_ptr(s).0, v.device_ptr(s).0, n, 2, ps, mvs)
                }
            };
            scaled |= level > 0;
            for p in [master, g32, gq, m, v, amax_base + 24 * i as u64] {
                ptr(p, &mut table);
            }
            let n32 = u32::try_from(n)
                .map_err(|_| BackendError::new("adamw", format!("a tensor of {n} elements (at most 2^32 - 1)")))?;
            table.extend([n32, level]);
            for p in [ginv, ps, mvs, ctl_ptr] {
                ptr(p, &mut table);
            }
            table.extend(adam_step_words(&step));
            for first in (0..n32).step_by(ADAM_CHUNK) {
                chunks.extend([i as u32, first]);
            }
        }
        let nt = (table.len() / ADAM_ITEM_WORDS) as u32;
        let (tb, chunk_buf) = (self.upload(&table)?, self.upload(&chunks)?);
        let cfg = LaunchConfig {
            grid_dim: ((chunks.len() / 2).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        if scaled {
            launch!(self, "adamw_multi_amax", with cfg, [&tb, &chunk_buf]);
        }
        launch!(self, "adamw_multi_apply", with cfg, [&tb, &chunk_buf]);
        if scaled {
            launch!(self, "adamw_multi_scales", nt as usize, [&tb, &nt]);
        }
        drop(amax);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layernorm backward's chunk-kernel launches: every candidate's threads cover
    /// the columns 4 at a time in at most 4 groups each (the kernel's COLS), its shared
    /// memory fits, 8 warps come first; GPT-2's 768, GPT-1.3B's 2048 and GPT-6.7B's 4096
    /// channels take 8 warps on an H200 (227 KiB); the 13B shape's 5120 (too wide) and
    /// channels not a multiple of 4 none (the row kernel and separate sums).
    #[test]
    fn layernorm_chunk_launches_cover_their_columns() {
        let h200 = 227 << 10;
        for c in [4, 40, 64, 768, 1024, 2048, 4096, 5120, 257] {
            let cands = ln_chunks_candidates(c, h200);
            for &(w, name, bytes) in &cands {
                let cols = [1, 2, 4].into_iter().find(|k| name.ends_with(&k.to_string())).unwrap();
                assert!(4 * cols * 32 * w >= c, "c {c}, {w} warps: {cols} groups of 4 per thread cover the row");
                assert!(bytes <= h200 && bytes.is_multiple_of(16), "c {c}, {w} warps: {bytes} bytes");
            }
            let first = cands.first().map(|x| x.0);
            match c {
                768 | 2048 | 4096 | 40 | 64 | 4 | 1024 => assert_eq!(first, Some(8), "c {c}"),
                5120 | 257 => assert!(cands.is_empty(), "c {c}: {cands:?}"),
                _ => unreachable!(),
            }
        }
    }

    /// A profile's spans: an op interrupted by a part (its transposed copies) keeps one
    /// call and the time of both its pieces; the part is a line of its own; idle spans
    /// count no calls.
    #[test]
    fn profile_parts_are_lines_of_their_own() {
        let (mm, tc, idle) = ("matmul", "transposed copies (FP8 products)", "idle (launch and host gaps)");
        let spans = [
            (Phase::Matmul, mm, 1.0, true),
            (Phase::Matmul, tc, 0.25, true),
            (Phase::Matmul, mm, 2.0, false),
            (Phase::Idle, idle, 0.5, false),
            (Phase::Other, "crossentropy", 3.0, true),
            (Phase::Idle, idle, 0.125, false),
            (Phase::Matmul, mm, 4.0, true),
        ];
        let times = op_times(spans.into_iter());
        let get = |op: &str| times.iter().find(|t| t.op == op).map(|t| (t.ms, t.calls));
        assert_eq!(get(mm), Some((7.0, 2)));
        assert_eq!(get(tc), Some((0.25, 1)));
        assert_eq!(get(idle), Some((0.625, 0)));
        assert_eq!(get("crossentropy"), Some((3.0, 1)));
        assert_eq!(times.len(), 4);
    }

    /// What the column-tree passes compute (each pass: the contract's tree over each
    /// aligned group, column_tree_block) is the contract's tree over all partials, bit
    /// for bit, for one pass or several, and the passes chain (each takes what the one
    /// before left).
    #[test]
    fn column_tree_passes_give_the_contracts_tree() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 11) as f32 / (1u64 << 53) as f32 - 0.5) * 2f32.powi((seed % 40) as i32 - 20)
        };
        for chunks in [0u32, 1, 2, 63, 64, 65, 512, 4097, 4375, 70_001] {
            let parts: Vec<f32> = (0..chunks).map(|_| next()).collect();
            let whole = if parts.is_empty() { 0.0 } else { fp8sim::reduce::tree_sum(&mut parts.clone()) };
            for single in [false, true] {
                let passes = column_tree_passes(chunks, 64, single);
                let mut level = parts.clone();
                for &(m, group, groups) in &passes {
                    assert_eq!(m as usize, level.len(), "chunks {chunks}: a pass takes what the last left");
                    level = if m == 0 {
                        vec![0.0]
                    } else {
                        level.chunks(group as usize).map(|g| fp8sim::reduce::tree_sum(&mut g.to_vec())).collect()
                    };
                    assert_eq!(level.len(), groups as usize, "chunks {chunks}");
                }
                assert_eq!(passes.last().map(|p| p.2), Some(1), "chunks {chunks}: one root");
                assert_eq!(passes.len() == 1, single || chunks <= 64, "chunks {chunks}, single {single}");
                assert_eq!(level[0].to_bits(), whole.to_bits(), "chunks {chunks}, single {single}");
            }
        }
    }

    /// The layernorm kernels carve their shared memory as ln_cfg sizes it (layernorm.cu:
    /// `shared_rows` rows of 32 chunks, then per warp `per_warp_chunks` chunks rounded up
    /// to a multiple of 4 floats), every warp's region 16-byte aligned, within the block
    /// limit, and the grid covers every row.
    #[test]
    fn layernorm_launches_fit_their_shared_memory() {
        for c in [1, 40, 257, 768, 2048, 4096, 5120, 8192] {
            for (shared_rows, per_warp_chunks) in [(2, 34), (1, LN_BWD_WARP_CHUNKS)] {
                let n = 16384;
                let cfg = ln_cfg(n, c, shared_rows, per_warp_chunks);
                let chunks = c.div_ceil(32);
                let warps = cfg.block_dim.0 as usize / 32;
                let per_warp = (per_warp_chunks * chunks + 3) & !3;
                let fixed = shared_rows * 32 * chunks;
                assert_eq!(cfg.shared_mem_bytes as usize, (fixed + warps * per_warp) * 4, "c {c}");
                assert!(fixed.is_multiple_of(4) && per_warp.is_multiple_of(4), "c {c}: 16-byte aligned rows");
                assert!(cfg.shared_mem_bytes <= 160 << 10, "c {c}: {} bytes", cfg.shared_mem_bytes);
                assert!((1..=16).contains(&warps), "c {c}");
                assert!(cfg.grid_dim.0 as usize * warps >= n, "c {c}: every row has a warp");
            }
        }
    }
}
