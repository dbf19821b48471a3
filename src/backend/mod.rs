//! The op interface every backend implements (candle-style: one interface, backends
//! behind it). The model and the training loop are written once against [`Backend`];
//! `sim` runs the ops on the CPU with `fp8sim` (the reference numerics), `cuda` will
//! run the kernels of `kernels/` with the same names and the same contract.
//!
//! Buffers are the backend's own (`Vec<T>` in the simulator, device memory on GPUs).
//! Scalars that steer the step (amax, loss, norms) come back to the host as f32.

pub mod cuda;
pub mod sim;

use fp8cluster::reduce::CommBytes;
use fp8cluster::world::World;
use fp8sim::half16::{bf16, f16};
use fp8sim::ops::adamw::{AdamStep, StepControl};
use fp8sim::ops::attention::AttnShape;
use fp8sim::Fp8Format;

/// Element types a buffer can hold (on the host and in GPU memory).
pub trait Elem:
    Copy + Default + Send + Sync + std::fmt::Debug + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + 'static
{
}
impl Elem for f32 {}
impl Elem for u8 {}
impl Elem for u32 {}
impl Elem for u64 {}
impl Elem for u16 {}
impl Elem for f16 {}
impl Elem for bf16 {}

/// An f32 an op reads when it runs: a value the host has, or element `at` of a
/// device buffer (a scale worked out on the device, which the host never reads back:
/// the fast path's "no host round trip"). Ops take scales, inverse scales and the loss
/// gradient's mu this way.
pub enum Scalar<'a, B: Backend + ?Sized> {
    Host(f32),
    Dev(&'a B::Buf<f32>, usize),
}
impl<B: Backend + ?Sized> Clone for Scalar<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for Scalar<'_, B> {}
impl<B: Backend + ?Sized> From<f32> for Scalar<'_, B> {
    fn from(v: f32) -> Self {
        Scalar::Host(v)
    }
}

/// A scale an op works out on the device and stores there: `buf[at]` holds its
/// inverse, what the products read (`Scalar::Dev(buf, at)`: cuBLASLt takes it by
/// address, which must be 16-byte aligned, so slots start there), and `buf[at + 1]`
/// the scale (read first as the previous one, which a zero or non-finite amax keeps).
/// Every device scale is kept as such a pair, `[1/s, s]`.
pub struct ScaleSlot<'a, B: Backend + ?Sized> {
    pub buf: &'a mut B::Buf<f32>,
    pub at: usize,
}

/// Delayed scaling's state on the device, `n` tracked tensors (two per linear layer:
/// its input, E4M3, and its output gradient, E5M2): tensor i's last `window` amaxes at
/// `hist[i * window..]` with `recorded[i]` (see `fp8sim::scaling::record_ring`), its
/// `[1/s, s]` pair at `scales[SCALE_STRIDE * i..]` (so every inverse is aligned for
/// cuBLASLt), and `slots[i]`: its amax slot in the step's statistics, with bit 31 set
/// for E5M2.
pub struct Delayed<'a, B: Backend + ?Sized> {
    pub hist: &'a mut B::Buf<f32>,
    pub recorded: &'a mut B::Buf<u32>,
    pub scales: &'a mut B::Buf<f32>,
    pub slots: &'a B::Buf<u32>,
    pub window: usize,
}

/// Floats between two tracked tensors' scale pairs in [`Delayed`] (256 bytes: every
/// inverse starts an aligned block whatever alignment cuBLASLt asks of scale pointers).
pub const SCALE_STRIDE: usize = 64;

/// Bit 31 of a [`Delayed`] slot word: the tensor is E5M2.
pub const DELAYED_E5M2: u32 = 1 << 31;

/// A GEMM operand held by backend `B`.
pub enum Operand<'a, B: Backend + ?Sized> {
    F32(&'a B::Buf<f32>),
    Bf16(&'a B::Buf<bf16>),
    /// FP8 codes and their inverse scale (value = decode(code) * inverse), which
    /// multiplies the product: `scale * inv(a) * inv(b)`, in that order.
    Fp8(&'a B::Buf<u8>, Fp8Format, Scalar<'a, B>),
}
impl<B: Backend + ?Sized> Clone for Operand<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for Operand<'_, B> {}

/// The token-embedding table as the encoder reads it: f32 values, or FP16 master codes
/// with their inverse scale (value = code * inv_scale, what `decode_f16` gives), so an
/// FP16 master needs no f32 copy of the whole table.
pub enum EmbedTable<'a, B: Backend + ?Sized> {
    F32(&'a B::Buf<f32>),
    F16(&'a B::Buf<f16>, Scalar<'a, B>),
}

/// The loss gradient per row, `mu / rows` (f32 division; rows: the whole batch's, of
/// which a chunk of the LM head is part), with mu where the step controller keeps it.
pub struct LossGrad<'a, B: Backend + ?Sized> {
    pub mu: Scalar<'a, B>,
    pub rows: f32,
}
impl<B: Backend + ?Sized> Clone for LossGrad<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for LossGrad<'_, B> {}
impl<B: Backend + ?Sized> LossGrad<'_, B> {
    /// No gradient (evaluation): 0.
    pub fn none() -> Self {
        LossGrad { mu: Scalar::Host(0.0), rows: 1.0 }
    }
}

/// Values on their way to the host ([`Backend::download_later`]).
pub struct Later<T>(Box<dyn FnOnce() -> BResult<Vec<T>>>);

impl<T> Later<T> {
    pub fn new(f: impl FnOnce() -> BResult<Vec<T>> + 'static) -> Self {
        Later(Box::new(f))
    }
    /// Wait for the copy; its values.
    pub fn wait(self) -> BResult<Vec<T>> {
        (self.0)()
    }
}

/// A slot of a statistics buffer (`Buf<u64>`, zeroed before the step): ops that
/// measure what they store leave the figure there instead of returning it, so a step
/// reads all of them back at once (no wait on the device per op). An amax slot holds
/// the largest `|v|` bit pattern seen (0 for none; above 0x7f800000: a NaN was seen),
/// read with [`slot_amax`]; a count slot holds the count.
pub struct Slot<'a, B: Backend + ?Sized> {
    pub buf: &'a mut B::Buf<u64>,
    pub at: usize,
}

/// The amax an amax slot holds (NaN if a NaN was seen).
pub fn slot_amax(bits: u64) -> f32 {
    if bits > 0x7f80_0000 {
        f32::NAN
    } else {
        f32::from_bits(bits as u32)
    }
}

/// An amax as its slot holds it (the inverse of [`slot_amax`] for values `amax`
/// reports: non-negative, or NaN).
pub fn amax_slot_bits(amax: f32) -> u64 {
    if amax.is_nan() {
        0x7fc0_0000
    } else {
        (amax.to_bits() & 0x7fff_ffff) as u64
    }
}

/// Where an op writes an activation that a linear layer reads next: the value is
/// computed in f32 as always, then stored in the form the consumer takes (contract:
/// storage types), so no f32 copy and no separate cast pass are needed.
pub enum ActOut<'a, B: Backend + ?Sized> {
    F32(&'a mut B::Buf<f32>),
    Bf16(&'a mut B::Buf<bf16>),
    /// E4M3 codes of `value * scale` (the saturating scaled cast); the values' amax
    /// goes to the slot, as `cast_fp8` would report it.
    E4m3(&'a mut B::Buf<u8>, Scalar<'a, B>, Slot<'a, B>),
}

/// GELU's pre-activation as its backward pass reads it: the BF16 values the forward
/// pass read (the bf16 level), or their E4M3 codes at scale 1 (the FP8 levels: half the
/// bytes kept per layer; |x| > 448 saturates, where gelu' is 0 or 1 either way).
pub enum GeluIn<'a, B: Backend + ?Sized> {
    Bf16(&'a B::Buf<bf16>),
    E4m3(&'a B::Buf<u8>),
}

impl<B: Backend + ?Sized> Clone for GeluIn<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for GeluIn<'_, B> {}

impl<B: Backend> GeluIn<'_, B> {
    /// Elements.
    pub fn elements(&self, be: &B) -> usize {
        match *self {
            GeluIn::Bf16(x) => be.len(x),
            GeluIn::E4m3(x) => be.len(x),
        }
    }
}

/// Where an op writes a linear layer's output gradient (that layer's backward reads it
/// next): f32, or already in the form the backward takes: the bias gradient (`db`, the
/// contract's column sums) and the gradient's BF16 copy or scaled FP8 cast (statistics
/// to two slots, as `column_sums_cast`), without the f32 tensor. The same values and
/// bits either way ([`GradOut::finish`] is the definition).
pub enum GradOut<'a, B: Backend + ?Sized> {
    F32(&'a mut B::Buf<f32>),
    Bf16 { db: &'a mut B::Buf<f32>, q: &'a mut B::Buf<bf16> },
    Fp8 { db: &'a mut B::Buf<f32>, q: &'a mut B::Buf<u8>, fmt: Fp8Format, scale: Scalar<'a, B>, stats: Slot<'a, B> },
}

impl<B: Backend + ?Sized> GradOut<'_, B> {
    /// Store the f32 gradient `g` (`rows x cols`) as `self` asks: what a backend that
    /// writes the narrow forms directly must match.
    pub fn finish(self, be: &B, g: &B::Buf<f32>, rows: usize, cols: usize) -> BResult<()> {
        match self {
            GradOut::F32(out) => be.copy_range(out, 0, g, 0, rows * cols),
            GradOut::Bf16 { db, q } => {
                be.column_sums(db, g, rows, cols)?;
                be.cast_bf16(q, g)
            }
            GradOut::Fp8 { db, q, fmt, scale, stats } => be.column_sums_cast(db, q, g, rows, cols, fmt, scale, stats),
        }
    }
}

/// What a just-in-time FP8 cast reads: an f32 tensor, or FP16 codes decoded as
/// `decode_f16` does (`value * inv_scale`) without writing the f32 copy.
pub enum JitSrc<'a, B: Backend + ?Sized> {
    F32(&'a B::Buf<f32>),
    F16(&'a B::Buf<f16>, Scalar<'a, B>),
}

/// The three products of a linear layer (row-major buffers; see `fp8sim::ops::gemm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Product {
    /// `Y[m x n] = X[m x k] W[n x k]^T`
    Forward,
    /// `dX[m x k] = dY[m x n] W[n x k]`
    Dgrad,
    /// `dW[n x k] = dY[m x n]^T X[m x k]`
    Wgrad,
}

/// What a saturating scaled FP8 cast saw.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CastStats {
    /// amax of the input (NaN if it held a NaN).
    pub amax: f32,
    /// Elements whose scaled magnitude exceeded the format's max (clipped).
    pub saturated: u64,
}

/// The optimizer state of one tensor, by level, as the backend holds it. Scales live on
/// the device beside their tensors (each with its inverse: `[1/s, s]`), where AdamW
/// reads and replaces them.
pub enum AdamState<'a, B: Backend + ?Sized> {
    /// `bf16` level: f32 master, f32 moments.
    F32 { master: &'a mut B::Buf<f32>, m: &'a mut B::Buf<f32>, v: &'a mut B::Buf<f32> },
    /// `O1`: FP16 master with its scale (`[1/s, s]`), f32 moments.
    O1 {
        master: &'a mut B::Buf<f16>,
        master_scale: &'a mut B::Buf<f32>,
        m: &'a mut B::Buf<f32>,
        v: &'a mut B::Buf<f32>,
    },
    /// `O2`: FP16 master, E4M3 m, FP16 v, each with a scale (`moment_scales`: m's
    /// `[1/s, s]`, then v's).
    O2 {
        master: &'a mut B::Buf<f16>,
        master_scale: &'a mut B::Buf<f32>,
        m: &'a mut B::Buf<u8>,
        v: &'a mut B::Buf<f16>,
        moment_scales: &'a mut B::Buf<f32>,
    },
}

/// A gradient as the optimizer reads it.
pub enum GradRef<'a, B: Backend + ?Sized> {
    F32(&'a B::Buf<f32>),
    /// E4M3 codes and their inverse scale.
    Fp8(&'a B::Buf<u8>, Scalar<'a, B>),
}

/// Where device time goes, for `bench step`'s breakdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Matrix products (linear layers and the LM head).
    Matmul,
    /// Attention (both products and the softmax).
    Attention,
    /// The optimizer step.
    Optimizer,
    /// Gradient reduction between ranks.
    Communication,
    /// Everything else: casts, reductions, layernorm, GELU, loss, embeddings.
    Other,
    /// Nothing queued: the GPU waited for the host (launches, read-backs, host work).
    Idle,
}

/// A device operation that failed: which op, and what the device said (a failed
/// launch, an out-of-memory, an NCCL error). The run stops with it, naming the rank.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{op}: {detail}")]
pub struct BackendError {
    pub op: String,
    pub detail: String,
}

impl BackendError {
    pub fn new(op: impl Into<String>, detail: impl std::fmt::Display) -> BackendError {
        BackendError { op: op.into(), detail: detail.to_string() }
    }
}

/// What every device operation returns.
pub type BResult<T> = Result<T, BackendError>;

/// The command line's errors are strings: a device error becomes its message.
impl From<BackendError> for String {
    fn from(e: BackendError) -> String {
        e.to_string()
    }
}

/// Device time of one op (all its calls) in a profiled stretch.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpTime {
    pub phase: Phase,
    pub op: &'static str,
    pub ms: f64,
    pub calls: u64,
}

/// Device memory as a backend sees it.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct MemoryStats {
    /// Most bytes the backend's pool held in buffers at once.
    pub pool_high_water: u64,
    /// Bytes of the device in use by every process (total - free), now.
    pub device_used: u64,
    pub device_total: u64,
}

/// The temporaries a backend's ops allocate beyond their inputs and outputs, as the
/// memory estimate (`model::memory`) counts them: the largest is what a step needs on
/// top of its state and workspace.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpScratch {
    /// The attention ops' (`Backend::attention_scratch_bytes`).
    pub attention: u64,
    /// Bytes per token and model channel that the activation ops' temporaries hold at
    /// once (an f32 product or gradient before its narrower store, f32 copies of
    /// inputs): the simulator 48 (GELU's backward: its f32 gradient, n x 4c, and both
    /// inputs widened), the GPU 21 (measured: see `cuda::op_scratch_without_attention`).
    pub activation_bytes_per_token_channel: u64,
    /// Whether the LM head's products copy a chunk's operands and its logits to f32
    /// (the simulator's GEMM packs its operands; cuBLASLt reads BF16 in place).
    pub head_f32_copies: bool,
}

/// The ops of a training step. Shapes: `n` rows (tokens) of `c` channels, row-major.
#[allow(clippy::too_many_arguments)]
pub trait Backend {
    type Buf<T: Elem>: Send + Sync;

    fn name(&self) -> &'static str;

    // ---- measurement (no effect on results)
    /// Wait for all queued work.
    fn synchronize(&self) -> BResult<()> {
        Ok(())
    }
    /// Start (or stop) attributing device time to phases.
    fn set_profiling(&self, _on: bool) {}
    /// Device time per op since profiling started; restarts the count.
    fn take_profile(&self) -> Vec<OpTime> {
        Vec::new()
    }
    /// Device memory figures, where the backend has a device.
    fn memory(&self) -> Option<MemoryStats> {
        None
    }
    /// Restart the pool's high-water mark from what is in use now.
    fn reset_memory_peak(&self) {}
    /// Memory this backend can still allocate (bytes, and where), if it can tell.
    fn available_memory(&self) -> Option<(u64, String)> {
        None
    }
    /// Bytes the attention ops allocate for shape `s` beyond their inputs and outputs.
    fn attention_scratch_bytes(&self, _s: AttnShape) -> u64 {
        0
    }
    /// What this backend's ops allocate beyond their inputs and outputs, for the
    /// memory estimate (one layer's attention shape `s`).
    fn op_scratch(&self, s: AttnShape) -> OpScratch {
        OpScratch { attention: self.attention_scratch_bytes(s), ..OpScratch::default() }
    }
    /// Bytes beyond the estimate `est` a run needs on this device (allocator slack,
    /// library workspaces).
    fn memory_overhead(&self, _est: &crate::model::memory::Estimate) -> u64 {
        0
    }

    // ---- memory
    fn zeros<T: Elem>(&self, n: usize) -> BResult<Self::Buf<T>>;
    fn upload<T: Elem>(&self, data: &[T]) -> BResult<Self::Buf<T>>;
    fn download<T: Elem>(&self, buf: &Self::Buf<T>) -> BResult<Vec<T>>;
    /// [`Backend::download`] that completes later: the copy is queued behind the work
    /// already queued, and [`Later::wait`] returns its values (a GPU backend copies into
    /// pinned memory and waits on an event then, not now). This default copies now.
    fn download_later<T: Elem>(&self, buf: &Self::Buf<T>) -> BResult<Later<T>> {
        let v = self.download(buf)?;
        Ok(Later::new(move || Ok(v)))
    }
    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    fn copy<T: Elem>(&self, dst: &mut Self::Buf<T>, src: &Self::Buf<T>) -> BResult<()>;
    /// The value of a scalar (a read-back when it is on the device: not for the step's
    /// hot path).
    fn scalar(&self, s: Scalar<'_, Self>) -> BResult<f32> {
        Ok(match s {
            Scalar::Host(v) => v,
            Scalar::Dev(buf, at) => self.download(buf)?[at],
        })
    }

    // ---- casts and reductions
    fn amax(&self, x: &Self::Buf<f32>) -> BResult<f32>;
    /// Saturating scaled cast `q = sat_encode(x * scale)`.
    fn cast_fp8(&self, q: &mut Self::Buf<u8>, x: &Self::Buf<f32>, fmt: Fp8Format, scale: f32) -> BResult<CastStats>;
    /// `x = decode(q) * inv_scale`.
    fn decode_fp8(&self, x: &mut Self::Buf<f32>, q: &Self::Buf<u8>, fmt: Fp8Format, inv_scale: f32) -> BResult<()>;
    fn cast_bf16(&self, y: &mut Self::Buf<bf16>, x: &Self::Buf<f32>) -> BResult<()>;
    /// `y = to_f16(x * scale)`.
    fn cast_f16(&self, y: &mut Self::Buf<f16>, x: &Self::Buf<f32>, scale: f32) -> BResult<()>;
    /// `x = h * inv_scale`.
    fn decode_f16(&self, x: &mut Self::Buf<f32>, h: &Self::Buf<f16>, inv_scale: Scalar<'_, Self>) -> BResult<()>;
    /// `y = bf16(h * inv_scale)`: `decode_f16` then `cast_bf16` (the LM head's BF16 copy
    /// of an FP16 token embedding), which this default does through an f32 temporary; a
    /// backend may do both in one pass (the same bits).
    fn cast_bf16_from_f16(
        &self,
        y: &mut Self::Buf<bf16>,
        h: &Self::Buf<f16>,
        inv_scale: Scalar<'_, Self>,
    ) -> BResult<()> {
        let mut x = self.zeros::<f32>(self.len(h))?;
        self.decode_f16(&mut x, h, inv_scale)?;
        self.cast_bf16(y, &x)
    }
    /// `amax` into a slot.
    fn amax_to(&self, x: &Self::Buf<f32>, slot: Slot<'_, Self>) -> BResult<()>;
    /// `cast_fp8` with its statistics into two slots (`at`: amax, `at + 1`: saturated).
    fn cast_fp8_to(
        &self,
        q: &mut Self::Buf<u8>,
        x: &Self::Buf<f32>,
        fmt: Fp8Format,
        scale: Scalar<'_, Self>,
        stats: Slot<'_, Self>,
    ) -> BResult<()>;
    /// `cast_fp8_to` of BF16 values (each widened to f32 exactly first): the attention
    /// output's cast for the projection.
    fn cast_fp8_bf16_to(
        &self,
        q: &mut Self::Buf<u8>,
        x: &Self::Buf<bf16>,
        fmt: Fp8Format,
        scale: Scalar<'_, Self>,
        stats: Slot<'_, Self>,
    ) -> BResult<()>;
    /// `out = x` widened to f32 (exact).
    fn widen_bf16(&self, out: &mut Self::Buf<f32>, x: &Self::Buf<bf16>) -> BResult<()>;
    /// The just-in-time cast: `q = sat_encode(x * s)` with `s = scale_from_amax(fmt,
    /// amax(x), 0, prev)`, `prev` read from the scale slot, where `s` and `1 / s` are
    /// then stored; the amax into the statistics slot. The scale is worked out where the
    /// data is (on a GPU, by the cast kernel from the amax slot), so nothing is read back.
    fn cast_fp8_jit(
        &self,
        q: &mut Self::Buf<u8>,
        x: JitSrc<'_, Self>,
        fmt: Fp8Format,
        scale: ScaleSlot<'_, Self>,
        amax: Slot<'_, Self>,
    ) -> BResult<()>;
    /// [`Backend::cast_fp8_jit`] of many tensors (the weight views at the start of a
    /// step, a layer's weight gradients): `(codes, source, scale slot, statistics slot
    /// index in stats)` each, one format. The same codes and slot values as one call per
    /// tensor (which is what this default does); a backend may batch them (two launches
    /// for all on GPUs).
    #[allow(clippy::type_complexity)]
    fn cast_fp8_jit_many(
        &self,
        items: Vec<(&mut Self::Buf<u8>, JitSrc<'_, Self>, ScaleSlot<'_, Self>, usize)>,
        fmt: Fp8Format,
        stats: &mut Self::Buf<u64>,
    ) -> BResult<()> {
        for (q, x, scale, at) in items {
            self.cast_fp8_jit(q, x, fmt, scale, Slot { buf: stats, at })?;
        }
        Ok(())
    }
    /// [`Backend::cast_bf16`] of many tensors `(out, values)` (the bf16 level's weight
    /// views at the start of a step); a backend may batch them.
    #[allow(clippy::type_complexity)]
    fn cast_bf16_many(&self, items: Vec<(&mut Self::Buf<bf16>, &Self::Buf<f32>)>) -> BResult<()> {
        for (y, x) in items {
            self.cast_bf16(y, x)?;
        }
        Ok(())
    }
    /// [`Backend::decode_f16`] of many tensors `(out, codes, inv_scale)` (the FP16
    /// masters' f32 copies at the start of a step); a backend may batch them.
    #[allow(clippy::type_complexity)]
    fn decode_f16_many(&self, items: Vec<(&mut Self::Buf<f32>, &Self::Buf<f16>, Scalar<'_, Self>)>) -> BResult<()> {
        for (x, h, inv) in items {
            self.decode_f16(x, h, inv)?;
        }
        Ok(())
    }
    /// [`Backend::amax_to`] of many tensors, each into its slot of `stats` (the f32
    /// gradients at the end of a bf16-level step); a backend may batch them.
    fn amax_many(&self, items: Vec<(&Self::Buf<f32>, usize)>, stats: &mut Self::Buf<u64>) -> BResult<()> {
        for (x, at) in items {
            self.amax_to(x, Slot { buf: stats, at })?;
        }
        Ok(())
    }
    /// Sum of squares in the contract's order.
    fn sum_sq(&self, x: &Self::Buf<f32>) -> BResult<f32>;
    /// Mean in the contract's order.
    fn mean(&self, x: &Self::Buf<f32>) -> BResult<f32>;
    /// [`Backend::mean`] into `out[at]`, left on the device.
    fn mean_to(&self, x: &Self::Buf<f32>, out: &mut Self::Buf<f32>, at: usize) -> BResult<()>;

    // ---- the step's decisions on the device (no read-back)
    /// Delayed scaling at the end of a step for every tracked tensor (see [`Delayed`]):
    /// `fp8sim::scaling::record_ring` of the amax in its statistics slot.
    fn delayed_scaling_update(&self, d: Delayed<'_, Self>, stats: &Self::Buf<u64>) -> BResult<()>;
    /// `out[at] = 1` when any of the amax slots `stats[slots[i]]` holds a non-finite
    /// value (a gradient overflowed), else 0.
    fn flag_nonfinite(
        &self,
        out: &mut Self::Buf<f32>,
        at: usize,
        stats: &Self::Buf<u64>,
        slots: &Self::Buf<u32>,
    ) -> BResult<()>;
    /// [`Backend::grad_sq_sums`] into `out` (one f32 per gradient), left on the device.
    fn grad_sq_sums_to(&self, grads: &[GradRef<'_, Self>], out: &mut Self::Buf<f32>) -> BResult<()>;
    /// `fp8sim::ops::adamw::step_control` on the controller's words `ctl` with the
    /// gradients' sums of squares `sq`.
    fn step_control(&self, ctl: &mut Self::Buf<f32>, sq: &Self::Buf<f32>, c: &StepControl) -> BResult<()>;

    // ---- GEMM (exact class) and its neighbours
    fn matmul(
        &self,
        out: &mut Self::Buf<f32>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        product: Product,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
    ) -> BResult<()>;
    /// `y = bf16(product * scale)`: a product whose consumer reads BF16 (the LM head's
    /// logits, and the input gradients entering layernorm, GELU and attention backward).
    /// Exact class: the f32 product of `matmul`, rounded once (RNE), which this default
    /// does through a temporary. A fast-class backend writes BF16 from the product's
    /// epilogue (held to `verify`'s bound).
    #[allow(clippy::too_many_arguments)]
    fn matmul_bf16(
        &self,
        y: &mut Self::Buf<bf16>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        product: Product,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
    ) -> BResult<()> {
        let mut out = self.zeros::<f32>(self.len(y))?;
        self.matmul(&mut out, a, b, product, m, n, k, scale)?;
        self.cast_bf16(y, &out)
    }
    /// `y = bf16(a b^T * scale + bias)`, a linear layer's forward product stored as its
    /// consumer reads it (QKV for attention, the MLP pre-activation for GELU). Exact
    /// class, the contract's definition: `matmul` into f32 (a temporary of the backend's),
    /// then `cast_bf16_bias`. A fast-class backend may write BF16 with the bias added in
    /// the product's epilogue (held to `verify`'s bound, like its products), needing no
    /// f32 room at all.
    #[allow(clippy::too_many_arguments)]
    fn matmul_bias_bf16(
        &self,
        y: &mut Self::Buf<bf16>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        bias: &Self::Buf<f32>,
    ) -> BResult<()> {
        let mut scratch = self.zeros::<f32>(m * n)?;
        self.matmul(&mut scratch, a, b, Product::Forward, m, n, k, scale)?;
        self.cast_bf16_bias(y, &scratch, bias)
    }
    /// `column_sums` of `x` and `cast_fp8_to` of it in one go (a linear layer's bias
    /// gradient and the FP8 copy of its output gradient; a backend may read `x` once).
    #[allow(clippy::too_many_arguments)]
    fn column_sums_cast(
        &self,
        out: &mut Self::Buf<f32>,
        q: &mut Self::Buf<u8>,
        x: &Self::Buf<f32>,
        rows: usize,
        cols: usize,
        fmt: Fp8Format,
        scale: Scalar<'_, Self>,
        stats: Slot<'_, Self>,
    ) -> BResult<()> {
        self.column_sums(out, x, rows, cols)?;
        self.cast_fp8_to(q, x, fmt, scale, stats)
    }
    /// `column_sums` and `cast_bf16` of `x` (a linear layer's output gradient at the
    /// bf16 level: its bias gradient and its BF16 copy), the same results; a backend may
    /// do both in one pass.
    fn column_sums_cast_bf16(
        &self,
        out: &mut Self::Buf<f32>,
        q: &mut Self::Buf<bf16>,
        x: &Self::Buf<f32>,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        self.column_sums(out, x, rows, cols)?;
        self.cast_bf16(q, x)
    }
    /// Column sums of BF16 values (each widened exactly), in the contract's order.
    fn column_sums_bf16(&self, out: &mut Self::Buf<f32>, x: &Self::Buf<bf16>, rows: usize, cols: usize) -> BResult<()> {
        let mut wide = self.zeros::<f32>(rows * cols)?;
        self.widen_bf16(&mut wide, x)?;
        self.column_sums(out, &wide, rows, cols)
    }
    /// `column_sums_bf16` and `cast_fp8_bf16_to` of BF16 `x` (the QKV layer's output
    /// gradient, which attention's backward stores in BF16): its bias gradient and its
    /// E5M2 copy, the same results; a backend may do both in one pass.
    #[allow(clippy::too_many_arguments)]
    fn column_sums_cast_from_bf16(
        &self,
        out: &mut Self::Buf<f32>,
        q: &mut Self::Buf<u8>,
        x: &Self::Buf<bf16>,
        rows: usize,
        cols: usize,
        fmt: Fp8Format,
        scale: Scalar<'_, Self>,
        stats: Slot<'_, Self>,
    ) -> BResult<()> {
        self.column_sums_bf16(out, x, rows, cols)?;
        self.cast_fp8_bf16_to(q, x, fmt, scale, stats)
    }
    /// `out += A x B` (scale 1; BF16 or f32 operands): every element's exact fma chain
    /// continues from the value in `out`, so a product over rows split into chunks, the
    /// later ones accumulating, gives the bits of one product (the chunked LM head's
    /// weight gradient).
    #[allow(clippy::too_many_arguments)]
    fn matmul_acc(
        &self,
        out: &mut Self::Buf<f32>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        product: Product,
        m: usize,
        n: usize,
        k: usize,
    ) -> BResult<()>;
    /// Copy `len` elements from `src[src_at..]` to `dst[dst_at..]`.
    fn copy_range<T: Elem>(
        &self,
        dst: &mut Self::Buf<T>,
        dst_at: usize,
        src: &Self::Buf<T>,
        src_at: usize,
        len: usize,
    ) -> BResult<()>;
    /// `y = bf16(x + bias)` (the bias, of `bias.len()` columns, added first in f32): a
    /// linear layer's output stored as its consumer reads it (attention, GELU).
    fn cast_bf16_bias(&self, y: &mut Self::Buf<bf16>, x: &Self::Buf<f32>, bias: &Self::Buf<f32>) -> BResult<()>;
    /// Column sums (bias gradients) in the contract's order.
    fn column_sums(&self, out: &mut Self::Buf<f32>, x: &Self::Buf<f32>, rows: usize, cols: usize) -> BResult<()>;
    /// The residual add of a linear layer's output, stored in BF16 before its bias was
    /// added: `out[r, j] = res[r, j] + (x[r, j] + bias[j])`, x widened exactly.
    fn residual_forward(
        &self,
        out: &mut Self::Buf<f32>,
        res: &Self::Buf<f32>,
        x: &Self::Buf<bf16>,
        bias: &Self::Buf<f32>,
    ) -> BResult<()>;
    /// Set element `i` (fault injection in tests).
    fn set(&self, x: &mut Self::Buf<f32>, i: usize, v: f32) -> BResult<()>;

    // ---- layers
    fn encoder_forward(
        &self,
        out: &mut Self::Buf<f32>,
        tokens: &Self::Buf<u32>,
        wte: EmbedTable<'_, Self>,
        wpe: &Self::Buf<f32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> BResult<()>;
    /// `host_tokens`: the same tokens in host memory (the caller has them), so a
    /// device backend can group positions by token without reading them back.
    #[allow(clippy::too_many_arguments)]
    fn encoder_backward(
        &self,
        dwte: &mut Self::Buf<f32>,
        dwpe: &mut Self::Buf<f32>,
        dout: &Self::Buf<f32>,
        tokens: &Self::Buf<u32>,
        host_tokens: &[u32],
        b: usize,
        t: usize,
        c: usize,
    ) -> BResult<()>;
    /// `y` stored per `y`, and `xhat`: the normalized input in BF16, what the backward
    /// pass reads (fp8sim::ops::layernorm).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        y: ActOut<'_, Self>,
        xhat: &mut Self::Buf<bf16>,
        mean: &mut Self::Buf<f32>,
        rstd: &mut Self::Buf<f32>,
        x: &Self::Buf<f32>,
        w: &Self::Buf<f32>,
        b: &Self::Buf<f32>,
        n: usize,
        c: usize,
    ) -> BResult<()>;
    /// `dx` is overwritten, or with `accumulate` added to (`dx = dx + grad`: the
    /// residual stream's gradient taking the branch's, as `accumulate` would).
    fn layernorm_backward(
        &self,
        dx: &mut Self::Buf<f32>,
        accumulate: bool,
        dw: &mut Self::Buf<f32>,
        db: &mut Self::Buf<f32>,
        dy: &Self::Buf<bf16>,
        xhat: &Self::Buf<bf16>,
        w: &Self::Buf<f32>,
        rstd: &Self::Buf<f32>,
        n: usize,
        c: usize,
    ) -> BResult<()>;
    /// Attention of `qkv` (`[b, t, 3c]`, stored in BF16: the QKV layer's output with its
    /// bias, see `cast_bf16_bias`; computed in f32 from the BF16 values).
    /// Causal attention; `out` is stored in BF16 (the contract's rounding of the f32
    /// result), what the projection's input cast and the backward pass read.
    fn attention_forward(
        &self,
        out: &mut Self::Buf<bf16>,
        stats: &mut Self::Buf<f32>,
        qkv: &Self::Buf<bf16>,
        shape: AttnShape,
    ) -> BResult<()>;
    /// `dqkv` in BF16 (RNE of the f32 gradient), as the QKV layer's backward reads it.
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf<bf16>,
        dout: &Self::Buf<bf16>,
        qkv: &Self::Buf<bf16>,
        out: &Self::Buf<bf16>,
        stats: &Self::Buf<f32>,
        shape: AttnShape,
    ) -> BResult<()>;
    /// `y = gelu(x)` of the BF16 pre-activation (computed in f32); with `x8`, also `x`
    /// as E4M3 codes at scale 1 (the saturating cast): what the backward pass reads at
    /// the FP8 levels ([`GeluIn::E4m3`]).
    fn gelu_forward(&self, y: ActOut<'_, Self>, x: &Self::Buf<bf16>, x8: Option<&mut Self::Buf<u8>>) -> BResult<()>;
    /// `dx = gelu'(x) * dy` (`x`, `dy`: rows of `cols`), stored as `dx` asks.
    fn gelu_backward(
        &self,
        dx: GradOut<'_, Self>,
        x: GeluIn<'_, Self>,
        dy: &Self::Buf<bf16>,
        cols: usize,
    ) -> BResult<()>;
    /// Per-row losses of the BF16 `logits` (computed in f32); `with_grad`: the gradient
    /// times `dloss`, rounded to BF16, written over the logits (the LM head's backward
    /// products read it there), so a chunk of the head holds one `[rows, vocab]` BF16
    /// tensor.
    #[allow(clippy::too_many_arguments)]
    fn crossentropy(
        &self,
        losses: &mut Self::Buf<f32>,
        logits: &mut Self::Buf<bf16>,
        with_grad: bool,
        targets: &Self::Buf<u32>,
        dloss: LossGrad<'_, Self>,
        n: usize,
        v: usize,
    ) -> BResult<()>;

    // ---- optimizer
    /// One tensor's AdamW step. With `ctl` (the step controller's words, see
    /// `fp8sim::ops::adamw::ctl`) the bias corrections and the gradient multiplier come
    /// from there instead of `step`, and a step it marks as overflowed changes nothing.
    fn adamw(
        &self,
        state: AdamState<'_, Self>,
        grad: GradRef<'_, Self>,
        step: &AdamStep,
        ctl: Option<&Self::Buf<f32>>,
    ) -> BResult<()>;

    /// Each gradient's sum of squares in the contract's order (an E4M3 gradient
    /// decoded with its scale first), as `sum_sq` on each; a backend may batch.
    fn grad_sq_sums(&self, grads: &[GradRef<'_, Self>]) -> BResult<Vec<f32>> {
        let mut out = Vec::with_capacity(grads.len());
        for g in grads {
            out.push(match g {
                GradRef::F32(x) => self.sum_sq(x)?,
                GradRef::Fp8(codes, inv) => {
                    let mut tmp = self.zeros::<f32>(self.len(*codes))?;
                    self.decode_fp8(&mut tmp, codes, Fp8Format::E4M3, self.scalar(*inv)?)?;
                    self.sum_sq(&tmp)?
                }
            });
        }
        Ok(out)
    }

    /// AdamW on many tensors in one go (the whole model's step): the same result as
    /// [`Backend::adamw`] on each in order; a backend may batch (one read-back of all
    /// scale statistics instead of one per tensor).
    fn adamw_many(
        &self,
        items: Vec<(AdamState<'_, Self>, GradRef<'_, Self>, AdamStep)>,
        ctl: Option<&Self::Buf<f32>>,
    ) -> BResult<()> {
        for (state, grad, step) in items {
            self.adamw(state, grad, &step, ctl)?;
        }
        Ok(())
    }

    // ---- O3's weight sharing
    /// Rank `root`'s `buf` onto every rank of `world` (every rank's `buf` has the same
    /// length). The default goes through host memory and MPI; a GPU backend sends it
    /// device to device.
    fn broadcast_u8(&self, world: &World, buf: &mut Self::Buf<u8>, root: usize) -> BResult<()> {
        broadcast_u8_host(self, world, buf, root)
    }
    /// [`Backend::broadcast_u8`] of FP16 codes.
    fn broadcast_f16(&self, world: &World, buf: &mut Self::Buf<f16>, root: usize) -> BResult<()> {
        broadcast_f16_host(self, world, buf, root)
    }

    // ---- data-parallel gradient reduction (numerics contract, rule 8)
    /// Reduce an E4M3 gradient and its scale (`[1/scale, scale]`) across the ranks of
    /// `world`. The default runs the contract's algorithm on host copies over MPI.
    fn reduce_grad_fp8(
        &self,
        world: &World,
        codes: &mut Self::Buf<u8>,
        scale: &mut Self::Buf<f32>,
    ) -> BResult<CommBytes> {
        reduce_grad_fp8_host(self, world, codes, scale)
    }
    /// Reduce an f32 gradient across the ranks of `world` (bf16 level).
    fn reduce_grad_f32(&self, world: &World, g: &mut Self::Buf<f32>) -> BResult<CommBytes> {
        reduce_grad_f32_host(self, world, g)
    }
}

/// [`Backend::broadcast_u8`] over any group `c`, through host copies (the default, and
/// O3's weight exchange over the data-parallel groups of a tensor-parallel run).
pub fn broadcast_u8_host<B: Backend + ?Sized, C: fp8cluster::world::Collectives>(
    be: &B,
    c: &C,
    buf: &mut B::Buf<u8>,
    root: usize,
) -> BResult<()> {
    let mine = c.rank() == root;
    let mut host = if mine { be.download(buf)? } else { vec![0u8; be.len(buf)] };
    c.broadcast(&mut host, root);
    if !mine {
        *buf = be.upload(&host)?;
    }
    Ok(())
}

/// [`Backend::broadcast_f16`] over any group `c`, through host copies.
pub fn broadcast_f16_host<B: Backend + ?Sized, C: fp8cluster::world::Collectives>(
    be: &B,
    c: &C,
    buf: &mut B::Buf<f16>,
    root: usize,
) -> BResult<()> {
    let mine = c.rank() == root;
    let mut bits: Vec<u16> =
        if mine { be.download(buf)?.iter().map(|h| h.to_bits()).collect() } else { vec![0u16; be.len(buf)] };
    c.broadcast(&mut bits, root);
    if !mine {
        *buf = be.upload(&bits.into_iter().map(f16::from_bits).collect::<Vec<_>>())?;
    }
    Ok(())
}

/// [`Backend::reduce_grad_fp8`] over any group `c`, through host copies (the default,
/// and the data-parallel groups of a tensor-parallel run on every backend).
pub fn reduce_grad_fp8_host<B: Backend + ?Sized, C: fp8cluster::world::Collectives>(
    be: &B,
    c: &C,
    codes: &mut B::Buf<u8>,
    scale: &mut B::Buf<f32>,
) -> BResult<CommBytes> {
    let mut host = be.download(codes)?;
    let mut s = be.download(scale)?[1];
    let bytes = fp8cluster::reduce::reduce_fp8(c, &mut host, &mut s);
    *codes = be.upload(&host)?;
    *scale = be.upload(&[1.0 / s, s])?;
    Ok(bytes)
}

/// [`Backend::reduce_grad_f32`] over any group `c`, through host copies.
pub fn reduce_grad_f32_host<B: Backend + ?Sized, C: fp8cluster::world::Collectives>(
    be: &B,
    c: &C,
    g: &mut B::Buf<f32>,
) -> BResult<CommBytes> {
    let mut host = be.download(g)?;
    let bytes = fp8cluster::reduce::reduce_f32(c, &mut host);
    *g = be.upload(&host)?;
    Ok(bytes)
}
