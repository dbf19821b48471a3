//! Linear layers by level (contract: FP8 linear layers).
//!
//! - `bf16`: input and weight rounded to BF16, exact GEMM, input saved in BF16;
//!   output gradient rounded to BF16 for both backward GEMMs.
//! - `O1`/`O2`: input cast to E4M3 with its delayed scale (saved in FP8 for backward),
//!   weight cast to E4M3 just-in-time; output gradient cast to E5M2 with its delayed
//!   scale; `dX = dY8 x W8`, `dW = dY8^T x X8`; each GEMM's scale product is the product
//!   of the two inverse scales. Bias gradients come from the f32 output gradient.
//!
//! The input's producer (layernorm, GELU) writes it straight into the saved BF16 or
//! E4M3 copy when its scale is known before the values (BF16, or delayed scaling with
//! a history): the same values and rounding as an f32 tensor cast afterwards, without
//! the f32 tensor (see `produce_input`). The bias is added by the op after the product
//! (the residual add, or the BF16 cast that stores the QKV output and the MLP
//! pre-activation), again the same f32 addition.
//!
//! Statistics (amax of every cast, saturated counts) go to slots of the step's
//! statistics buffer; the model reads them back once and records them afterwards
//! (`LinearScaling::record`, `WeightView::settle`), the same values in the same
//! histories as recording each on the spot.
//!
//! Delayed scaling starts with an empty history: the first cast of a tensor uses its
//! own amax (just-in-time) instead of the initial scale 1, so step 1 does not flush
//! small gradients to zero. (Transformer Engine starts from 1.)

use super::tp;
use crate::backend::BResult;
use crate::backend::{
    ActOut, Backend, Delayed, GradOut, JitSrc, Operand, Product, Scalar, ScaleSlot, Slot, DELAYED_E5M2, SCALE_STRIDE,
};
use fp8cluster::tp::TpBytes;
use fp8cluster::world::Collectives;
use fp8sim::half16::{bf16, f16};
use fp8sim::scaling::{ring_history, DelayedScaling, ScalingConfig};
use fp8sim::Fp8Format::{E4M3, E5M2};

/// Delayed-scaling state of one FP8 linear layer, as checkpoints hold it (the model
/// keeps it on the device: [`DelayedState`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LinearScaling {
    /// Input activations (E4M3).
    pub act: DelayedScaling,
    /// Output gradients (E5M2).
    pub grad: DelayedScaling,
}

impl LinearScaling {
    pub fn new(window: usize) -> Self {
        LinearScaling {
            act: DelayedScaling::new(ScalingConfig { window, ..ScalingConfig::delayed(E4M3) }),
            grad: DelayedScaling::new(ScalingConfig { window, ..ScalingConfig::delayed(E5M2) }),
        }
    }
}

/// Every FP8 linear layer's delayed scaling on the device (`Backend::Delayed`), so no
/// scale is read back during a step: linear k's input is tracked tensor 2k, its output
/// gradient 2k + 1, each with its `[1/s, s]` pair `SCALE_STRIDE` floats apart, their
/// amax windows and counts beside them. The step's casts
/// read the scales where they are; `update` records the step's amaxes at its end.
pub struct DelayedState<B: Backend> {
    hist: B::Buf<f32>,
    recorded: B::Buf<u32>,
    scales: B::Buf<f32>,
    slots: B::Buf<u32>,
    window: usize,
    /// Nothing recorded yet (a fresh model, or a checkpoint saved before any step): the
    /// casts take their tensor's own amax (just-in-time) instead of the delayed scale,
    /// so step 1 does not flush small values to zero. (Transformer Engine starts from
    /// scale 1.) Known to the host, so no step waits on the device to choose.
    pub fresh: bool,
}

impl<B: Backend> DelayedState<B> {
    /// Scales 1, empty windows of `window`; `slots[k]` = linear k's (input, output
    /// gradient) amax slots in the step's statistics.
    pub fn new(be: &B, window: usize, slots: &[(usize, usize)]) -> BResult<Self> {
        let n = 2 * slots.len();
        let words: Vec<u32> = slots.iter().flat_map(|&(a, g)| [a as u32, g as u32 | DELAYED_E5M2]).collect();
        let mut scales = vec![0f32; SCALE_STRIDE * n];
        for pair in scales.chunks_mut(SCALE_STRIDE) {
            pair[..2].copy_from_slice(&[1.0, 1.0]);
        }
        Ok(DelayedState {
            hist: be.zeros(n * window.max(1))?,
            recorded: be.zeros(n)?,
            scales: be.upload(&scales)?,
            slots: be.upload(&words)?,
            window: window.max(1),
            fresh: true,
        })
    }

    /// The amax window's length.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Where tracked tensor i's `[1/s, s]` pair starts.
    pub fn pair(i: usize) -> usize {
        SCALE_STRIDE * i
    }
    /// Linear k's input scale (`inv`: its inverse).
    pub fn act(&self, k: usize, inv: bool) -> Scalar<'_, B> {
        Scalar::Dev(&self.scales, Self::pair(2 * k) + usize::from(!inv))
    }
    /// Linear k's output-gradient scale (`inv`: its inverse).
    pub fn dy(&self, k: usize, inv: bool) -> Scalar<'_, B> {
        Scalar::Dev(&self.scales, Self::pair(2 * k + 1) + usize::from(!inv))
    }

    /// Record the step's amaxes (the statistics slots) and derive the next scales.
    pub fn update(&mut self, be: &B, stats: &B::Buf<u64>) -> BResult<()> {
        let d = Delayed {
            hist: &mut self.hist,
            recorded: &mut self.recorded,
            scales: &mut self.scales,
            slots: &self.slots,
            window: self.window,
        };
        be.delayed_scaling_update(d, stats)?;
        self.fresh = false;
        Ok(())
    }

    /// The state as checkpoints hold it (a read-back).
    pub fn to_host(&self, be: &B) -> BResult<Vec<LinearScaling>> {
        let (hist, recorded, scales) =
            (be.download(&self.hist)?, be.download(&self.recorded)?, be.download(&self.scales)?);
        let w = self.window;
        let one = |i: usize, fmt| {
            let cfg = ScalingConfig { window: w, ..ScalingConfig::delayed(fmt) };
            let scale = scales[Self::pair(i) + 1];
            DelayedScaling::restore(cfg, &ring_history(&hist[i * w..(i + 1) * w], recorded[i]), scale)
        };
        Ok((0..recorded.len() / 2)
            .map(|k| LinearScaling { act: one(2 * k, E4M3), grad: one(2 * k + 1, E5M2) })
            .collect())
    }

    /// Take a saved state (each history at most the window, oldest first).
    pub fn restore(&mut self, be: &B, saved: &[LinearScaling]) -> BResult<()> {
        let w = self.window;
        let n = 2 * saved.len();
        let (mut hist, mut recorded, mut scales) = (vec![0f32; n * w], vec![0u32; n], vec![0f32; SCALE_STRIDE * n]);
        let mut any = false;
        for (k, s) in saved.iter().enumerate() {
            for (j, ds) in [&s.act, &s.grad].into_iter().enumerate() {
                let i = 2 * k + j;
                let h: Vec<f32> = ds.history().collect();
                let h = &h[h.len().saturating_sub(w)..];
                hist[i * w..i * w + h.len()].copy_from_slice(h);
                recorded[i] = h.len() as u32;
                scales[Self::pair(i)] = ds.inv_scale();
                scales[Self::pair(i) + 1] = ds.scale();
                any |= !h.is_empty();
            }
        }
        self.hist = be.upload(&hist)?;
        self.recorded = be.upload(&recorded)?;
        self.scales = be.upload(&scales)?;
        self.fresh = !any;
        Ok(())
    }

    /// A copy of the scales (see [`DelayedState::put_back`]).
    pub fn keep(&self, be: &B) -> BResult<B::Buf<f32>> {
        let mut k = be.zeros(be.len(&self.scales))?;
        be.copy(&mut k, &self.scales)?;
        Ok(k)
    }
    /// Put kept scales back: an evaluation of a fresh model leaves them as they were
    /// (its just-in-time casts store their scales here).
    pub fn put_back(&mut self, be: &B, kept: &B::Buf<f32>) -> BResult<()> {
        be.copy(&mut self.scales, kept)
    }
}

/// The weight as the GEMMs read it this step (FP8: its codes and `[1/scale, scale]`,
/// which the just-in-time cast works out and stores on the device).
pub enum WeightView<B: Backend> {
    Bf16(B::Buf<bf16>),
    Fp8 { codes: B::Buf<u8>, scale: B::Buf<f32> },
}

impl<B: Backend> WeightView<B> {
    pub fn new(be: &B, fp8: bool, numel: usize) -> BResult<Self> {
        Ok({
            if fp8 {
                WeightView::Fp8 { codes: be.zeros(numel)?, scale: be.upload(&[1.0, 1.0])? }
            } else {
                WeightView::Bf16(be.zeros(numel)?)
            }
        })
    }

    /// A BF16 view's rounding from its master as `Backend::cast_bf16_many` takes it
    /// (output, f32 master).
    pub fn bf16_item<'a>(&'a mut self, master: MasterRef<'a, B>) -> (&'a mut B::Buf<bf16>, &'a B::Buf<f32>) {
        match (self, master) {
            (WeightView::Bf16(b), MasterRef::F32(w)) => (b, w),
            _ => unreachable!("BF16 weight views come with f32 masters (bf16 level)"),
        }
    }

    /// An FP8 view's just-in-time cast from its master as `Backend::cast_fp8_jit_many`
    /// takes it: codes, source (an FP16 master read as its decoded values without writing
    /// them), the view's scale slot.
    pub fn jit_item<'a>(
        &'a mut self,
        master: MasterRef<'a, B>,
    ) -> (&'a mut B::Buf<u8>, JitSrc<'a, B>, ScaleSlot<'a, B>) {
        match (self, master) {
            (WeightView::Fp8 { codes, scale }, MasterRef::F32(w)) => {
                (codes, JitSrc::F32(w), ScaleSlot { buf: scale, at: 0 })
            }
            (WeightView::Fp8 { codes, scale }, MasterRef::F16(h, inv)) => {
                (codes, JitSrc::F16(h, inv), ScaleSlot { buf: scale, at: 0 })
            }
            (WeightView::Bf16(_), _) => unreachable!("a BF16 view has no just-in-time cast (use bf16_item)"),
        }
    }

    pub fn is_fp8(&self) -> bool {
        matches!(self, WeightView::Fp8 { .. })
    }

    fn operand(&self) -> Operand<'_, B> {
        match self {
            WeightView::Bf16(b) => Operand::Bf16(b),
            WeightView::Fp8 { codes, scale } => Operand::Fp8(codes, E4M3, Scalar::Dev(scale, 0)),
        }
    }
}

/// A linear weight's master as a view is derived from it.
pub enum MasterRef<'a, B: Backend> {
    F32(&'a B::Buf<f32>),
    /// FP16 codes and their inverse scale (value = decoded * inverse).
    F16(&'a B::Buf<f16>, Scalar<'a, B>),
}

/// The layer input kept for backward: BF16, or E4M3 codes (cast with the layer's input
/// scale, which stays in [`DelayedState`] until the step ends).
pub enum Saved<B: Backend> {
    Bf16(B::Buf<bf16>),
    Fp8(B::Buf<u8>),
}

impl<B: Backend> Saved<B> {
    pub fn new(be: &B, fp8: bool, numel: usize) -> BResult<Self> {
        Ok({
            if fp8 {
                Saved::Fp8(be.zeros(numel)?)
            } else {
                Saved::Bf16(be.zeros(numel)?)
            }
        })
    }
    fn operand<'a>(&'a self, ds: &'a DelayedState<B>, k: usize) -> Operand<'a, B> {
        match self {
            Saved::Bf16(b) => Operand::Bf16(b),
            Saved::Fp8(codes) => Operand::Fp8(codes, E4M3, ds.act(k, true)),
        }
    }
}

/// Scratch for the output gradient's low-precision copy.
pub enum GradCast<B: Backend> {
    Bf16(B::Buf<bf16>),
    Fp8(B::Buf<u8>),
}

impl<B: Backend> GradCast<B> {
    pub fn new(be: &B, fp8: bool, numel: usize) -> BResult<Self> {
        Ok({
            if fp8 {
                GradCast::Fp8(be.zeros(numel)?)
            } else {
                GradCast::Bf16(be.zeros(numel)?)
            }
        })
    }
    fn operand<'a>(&'a self, ds: &'a DelayedState<B>, k: usize) -> Operand<'a, B> {
        match self {
            GradCast::Bf16(b) => Operand::Bf16(b),
            GradCast::Fp8(c) => Operand::Fp8(c, E5M2, ds.dy(k, true)),
        }
    }
}

/// Rows, input and output features.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub n: usize,
    pub ic: usize,
    pub oc: usize,
}

/// Fill `saved` with linear k's input, cast from the f32 tensor `x` (BF16, or E4M3 with
/// the delayed scale; just-in-time on a fresh model, the scale stored as the layer's);
/// the cast's statistics go to `stats` (two slots).
pub fn cast_input<B: Backend>(
    be: &B,
    saved: &mut Saved<B>,
    x: &B::Buf<f32>,
    ds: &mut DelayedState<B>,
    k: usize,
    stats: Slot<'_, B>,
) -> BResult<()> {
    match saved {
        Saved::Bf16(b) => be.cast_bf16(b, x),
        Saved::Fp8(codes) if ds.fresh => {
            let at = DelayedState::<B>::pair(2 * k);
            be.cast_fp8_jit(codes, JitSrc::F32(x), E4M3, ScaleSlot { buf: &mut ds.scales, at }, stats)
        }
        Saved::Fp8(codes) => be.cast_fp8_to(codes, x, E4M3, ds.act(k, false), stats),
    }
}

/// [`cast_input`] from the BF16 values `x` (the attention output): the
/// BF16 copy is the values themselves, the E4M3 cast reads them directly with the
/// delayed scale, and on a fresh model they go through an f32 temporary for the
/// just-in-time scale. The same bits as casting their f32 widening.
pub fn cast_input_bf16<B: Backend>(
    be: &B,
    saved: &mut Saved<B>,
    x: &B::Buf<bf16>,
    ds: &mut DelayedState<B>,
    k: usize,
    stats: Slot<'_, B>,
) -> BResult<()> {
    match &mut *saved {
        Saved::Bf16(b) => be.copy_range(b, 0, x, 0, be.len(x)),
        Saved::Fp8(codes) if !ds.fresh => be.cast_fp8_bf16_to(codes, x, E4M3, ds.act(k, false), stats),
        Saved::Fp8(_) => {
            let mut wide = be.zeros::<f32>(be.len(x))?;
            be.widen_bf16(&mut wide, x)?;
            cast_input(be, saved, &wide, ds, k, stats)
        }
    }
}

/// Fill `saved` with linear k's input made by `produce`, which writes its values into
/// the `ActOut` it is given (a layernorm or GELU forward). The values go straight into
/// the saved copy when their scale is known first (their amax into `stats`); on a fresh
/// model (a just-in-time scale) they go through an f32 temporary of `n` values and
/// [`cast_input`]. Either way the same bits are saved and measured.
pub fn produce_input<B: Backend>(
    be: &B,
    saved: &mut Saved<B>,
    n: usize,
    ds: &mut DelayedState<B>,
    k: usize,
    stats: Slot<'_, B>,
    produce: impl FnOnce(ActOut<'_, B>) -> BResult<()>,
) -> BResult<()> {
    match saved {
        Saved::Bf16(b) => produce(ActOut::Bf16(b)),
        Saved::Fp8(codes) if !ds.fresh => produce(ActOut::E4m3(codes, ds.act(k, false), stats)),
        Saved::Fp8(_) => {
            let mut scratch = be.zeros::<f32>(n)?;
            produce(ActOut::F32(&mut scratch))?;
            cast_input(be, saved, &scratch, ds, k, stats)
        }
    }
}

/// A recomputed input of linear k into `saved` by `produce`, with the scale the
/// forward pass used (the layer's input scale: unchanged until the step ends).
pub fn refill<B: Backend>(
    saved: &mut Saved<B>,
    ds: &DelayedState<B>,
    k: usize,
    slot: Slot<'_, B>,
    produce: impl FnOnce(ActOut<'_, B>) -> BResult<()>,
) -> BResult<()> {
    match saved {
        Saved::Fp8(codes) => produce(ActOut::E4m3(codes, ds.act(k, false), slot)),
        Saved::Bf16(h) => produce(ActOut::Bf16(h)),
    }
}

/// Tensor parallel, [`refill`] of a column-parallel layer's input: this rank's rows
/// produced into `local` with the forward pass's (shared) scale, then gathered into
/// `saved` as the forward pass gathered them ([`produce_input_gathered`]): the same codes.
#[allow(clippy::too_many_arguments)]
pub fn refill_gathered<B: Backend, C: Collectives>(
    be: &B,
    g: &C,
    local: &mut Saved<B>,
    saved: &mut Saved<B>,
    ds: &DelayedState<B>,
    k: usize,
    slot: Slot<'_, B>,
    produce: impl FnOnce(ActOut<'_, B>) -> BResult<()>,
) -> BResult<TpBytes> {
    refill(local, ds, k, slot, produce)?;
    tp::gather_saved(be, g, local, saved)
}

/// `y = bf16(x W^T + bias)` from linear k's saved input, for a layer whose consumer
/// reads BF16 (see `Backend::matmul_bias_bf16`).
#[allow(clippy::too_many_arguments)]
pub fn forward_bf16<B: Backend>(
    be: &B,
    y: &mut B::Buf<bf16>,
    w: &WeightView<B>,
    saved: &Saved<B>,
    ds: &DelayedState<B>,
    k: usize,
    bias: &B::Buf<f32>,
    d: Dims,
) -> BResult<()> {
    be.matmul_bias_bf16(y, saved.operand(ds, k), w.operand(), d.n, d.oc, d.ic, 1.0, bias)
}

/// `out = res + (bf16(x W^T) + bias)` from linear k's saved input, for a layer whose
/// output joins the residual stream: the product rounded to BF16 into `scratch` (what
/// PyTorch's autocast stores; `matmul_bf16`), then `residual_forward` (cuBLASLt's
/// residual epilogue measured slower on an H200, so the fast class does the same).
#[allow(clippy::too_many_arguments)]
pub fn forward_residual<B: Backend>(
    be: &B,
    out: &mut B::Buf<f32>,
    scratch: &mut B::Buf<bf16>,
    res: &B::Buf<f32>,
    w: &WeightView<B>,
    saved: &Saved<B>,
    ds: &DelayedState<B>,
    k: usize,
    bias: &B::Buf<f32>,
    d: Dims,
) -> BResult<()> {
    be.matmul_bf16(scratch, saved.operand(ds, k), w.operand(), Product::Forward, d.n, d.oc, d.ic, 1.0)?;
    be.residual_forward(out, res, scratch, bias)
}

/// Backward of linear k: `dx` (BF16, what layernorm, GELU and attention backward read),
/// `dw`, `db` (all overwritten) from `dy`; the E5M2 cast's amax and saturated count go
/// to `stats` (two slots).
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    be: &B,
    dx: &mut B::Buf<bf16>,
    dw: &mut B::Buf<f32>,
    db: &mut B::Buf<f32>,
    dy: &B::Buf<f32>,
    w: &WeightView<B>,
    saved: &Saved<B>,
    ds: &mut DelayedState<B>,
    k: usize,
    dyq: &mut GradCast<B>,
    d: Dims,
    stats: Slot<'_, B>,
) -> BResult<()> {
    match dyq {
        GradCast::Bf16(b) => be.column_sums_cast_bf16(db, b, dy, d.n, d.oc)?,
        GradCast::Fp8(codes) if ds.fresh => {
            be.column_sums(db, dy, d.n, d.oc)?;
            let at = DelayedState::<B>::pair(2 * k + 1);
            be.cast_fp8_jit(codes, JitSrc::F32(dy), E5M2, ScaleSlot { buf: &mut ds.scales, at }, stats)?;
        }
        GradCast::Fp8(codes) => be.column_sums_cast(db, codes, dy, d.n, d.oc, E5M2, ds.dy(k, false), stats)?,
    }
    products(be, dx, dw, w, saved.operand(ds, k), dyq.operand(ds, k), d)
}

/// [`backward`] from a BF16 output gradient (the QKV layer's, which attention's
/// backward stores in BF16): the bias gradient from its values widened, and at the bf16
/// level the products read it as it is (`dyq` is not used); at the FP8 levels its E5M2
/// copy from the same pass, or, on a fresh model (a just-in-time scale), through an f32
/// temporary and [`backward`]. The same bits as [`backward`] of its widening.
#[allow(clippy::too_many_arguments)]
pub fn backward_bf16<B: Backend>(
    be: &B,
    dx: &mut B::Buf<bf16>,
    dw: &mut B::Buf<f32>,
    db: &mut B::Buf<f32>,
    dy: &B::Buf<bf16>,
    w: &WeightView<B>,
    saved: &Saved<B>,
    ds: &mut DelayedState<B>,
    k: usize,
    dyq: &mut GradCast<B>,
    d: Dims,
    stats: Slot<'_, B>,
) -> BResult<()> {
    match &mut *dyq {
        GradCast::Bf16(_) => {
            be.column_sums_bf16(db, dy, d.n, d.oc)?;
            products(be, dx, dw, w, saved.operand(ds, k), Operand::Bf16(dy), d)
        }
        GradCast::Fp8(codes) if !ds.fresh => {
            be.column_sums_cast_from_bf16(db, codes, dy, d.n, d.oc, E5M2, ds.dy(k, false), stats)?;
            products(be, dx, dw, w, saved.operand(ds, k), dyq.operand(ds, k), d)
        }
        GradCast::Fp8(_) => {
            let mut wide = be.zeros::<f32>(d.n * d.oc)?;
            be.widen_bf16(&mut wide, dy)?;
            backward(be, dx, dw, db, &wide, w, saved, ds, k, dyq, d, stats)
        }
    }
}

/// [`backward`] of a layer whose output gradient is made by `produce` (GELU's
/// backward), which writes it into the `GradOut` it is given: straight into the bias
/// gradient and the BF16/E5M2 copy when the scale is known first (BF16, or delayed
/// scaling), else (a fresh model) into an f32 temporary and through [`backward`]. The
/// same bits either way.
#[allow(clippy::too_many_arguments)]
pub fn backward_from<B: Backend>(
    be: &B,
    dx: &mut B::Buf<bf16>,
    dw: &mut B::Buf<f32>,
    db: &mut B::Buf<f32>,
    w: &WeightView<B>,
    saved: &Saved<B>,
    ds: &mut DelayedState<B>,
    k: usize,
    dyq: &mut GradCast<B>,
    d: Dims,
    stats: Slot<'_, B>,
    produce: impl FnOnce(GradOut<'_, B>) -> BResult<()>,
) -> BResult<()> {
    match &mut *dyq {
        GradCast::Bf16(q) => produce(GradOut::Bf16 { db, q })?,
        GradCast::Fp8(q) if !ds.fresh => {
            produce(GradOut::Fp8 { db, q, fmt: E5M2, scale: ds.dy(k, false), stats })?;
        }
        GradCast::Fp8(_) => {
            let mut scratch = be.zeros::<f32>(d.n * d.oc)?;
            produce(GradOut::F32(&mut scratch))?;
            return backward(be, dx, dw, db, &scratch, w, saved, ds, k, dyq, d, stats);
        }
    }
    products(be, dx, dw, w, saved.operand(ds, k), dyq.operand(ds, k), d)
}

/// Tensor parallel: linear k's input made by `produce` on this rank's rows into `local`,
/// then all-gathered into `saved` (every row) with the same scale on every rank: the
/// delayed scale (the agreed amax histories make it the same), or on a fresh model a
/// just-in-time scale from the largest of the ranks' amaxes. BF16 at the bf16 level.
/// `n`: this rank's element count.
#[allow(clippy::too_many_arguments)]
pub fn produce_input_gathered<B: Backend, C: Collectives>(
    be: &B,
    g: &C,
    local: &mut Saved<B>,
    saved: &mut Saved<B>,
    n: usize,
    ds: &mut DelayedState<B>,
    k: usize,
    stats: Slot<'_, B>,
    produce: impl FnOnce(ActOut<'_, B>) -> BResult<()>,
) -> BResult<TpBytes> {
    match &mut *local {
        Saved::Bf16(b) => produce(ActOut::Bf16(b))?,
        Saved::Fp8(codes) if !ds.fresh => produce(ActOut::E4m3(codes, ds.act(k, false), stats))?,
        Saved::Fp8(codes) => {
            let mut scratch = be.zeros::<f32>(n)?;
            produce(ActOut::F32(&mut scratch))?;
            tp::shared_jit_scale(be, g, &scratch, E4M3, &mut ds.scales, DelayedState::<B>::pair(2 * k))?;
            be.cast_fp8_to(codes, &scratch, E4M3, ds.act(k, false), stats)?;
        }
    }
    tp::gather_saved(be, g, local, saved)
}

/// Tensor parallel, a row-parallel layer's forward product: this rank's partial
/// `x W^T` over its slice of the input features (BF16, every row) into `partial`, which
/// the caller reduce-scatters.
pub fn forward_partial<B: Backend>(
    be: &B,
    partial: &mut B::Buf<bf16>,
    w: &WeightView<B>,
    saved: &Saved<B>,
    ds: &DelayedState<B>,
    k: usize,
    d: Dims,
) -> BResult<()> {
    be.matmul_bf16(partial, saved.operand(ds, k), w.operand(), Product::Forward, d.n, d.oc, d.ic, 1.0)
}

/// The backward pass of a row-parallel layer (the projections) whose output gradient
/// `dy` is this rank's `rows` rows of its tensor-parallel group `g` (sequence parallel):
/// its bias gradient (the ranks' column sums added in rank order), its low-precision
/// copy (E5M2 with a scale every rank shares, or BF16) all-gathered from `dy_local` into
/// `dyq` (every row), then the products of [`backward`] on this rank's slice of the
/// input features; the bytes sent go into `traffic`. A group of one is [`backward`].
#[allow(clippy::too_many_arguments)]
pub fn backward_row_parallel<B: Backend, C: Collectives>(
    be: &B,
    g: &C,
    dx: &mut B::Buf<bf16>,
    dw: &mut B::Buf<f32>,
    db: &mut B::Buf<f32>,
    dy: &B::Buf<f32>,
    rows: usize,
    w: &WeightView<B>,
    saved: &Saved<B>,
    ds: &mut DelayedState<B>,
    k: usize,
    dy_local: &mut GradCast<B>,
    dyq: &mut GradCast<B>,
    d: Dims,
    stats: Slot<'_, B>,
    traffic: &mut tp::TpTraffic,
) -> BResult<()> {
    if g.size() == 1 {
        return backward(be, dx, dw, db, dy, w, saved, ds, k, dyq, d, stats);
    }
    match &mut *dy_local {
        GradCast::Bf16(b) => be.column_sums_cast_bf16(db, b, dy, rows, d.oc)?,
        GradCast::Fp8(codes) if ds.fresh => {
            be.column_sums(db, dy, rows, d.oc)?;
            tp::shared_jit_scale(be, g, dy, E5M2, &mut ds.scales, DelayedState::<B>::pair(2 * k + 1))?;
            be.cast_fp8_to(codes, dy, E5M2, ds.dy(k, false), stats)?;
        }
        GradCast::Fp8(codes) => be.column_sums_cast(db, codes, dy, rows, d.oc, E5M2, ds.dy(k, false), stats)?,
    }
    traffic.other += tp::sum_over_ranks(be, g, db)?;
    tp::TpTraffic::add(&mut traffic.all_gather, tp::gather_grad(be, g, dy_local, dyq)?);
    products(be, dx, dw, w, saved.operand(ds, k), dyq.operand(ds, k), d)
}

/// The two backward products from the output gradient's copy `dy` and the saved input
/// `x` (FP8 operands carry their inverse scales).
fn products<B: Backend>(
    be: &B,
    dx: &mut B::Buf<bf16>,
    dw: &mut B::Buf<f32>,
    w: &WeightView<B>,
    x: Operand<'_, B>,
    dy: Operand<'_, B>,
    d: Dims,
) -> BResult<()> {
    be.matmul_bf16(dx, dy, w.operand(), Product::Dgrad, d.n, d.oc, d.ic, 1.0)?;
    be.matmul(dw, dy, x, Product::Wgrad, d.n, d.oc, d.ic, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim::Sim;
    use fp8sim::half16::to_bf16;

    fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    /// dx, dw, db and the statistics slots of one backward pass, as bits.
    type Out = (Vec<u16>, Vec<u32>, Vec<u32>, Vec<u64>);

    /// `backward_bf16` of a BF16 output gradient and `backward` of its widening give the
    /// same bits at each level: BF16 operands, FP8 with a delayed scale, and FP8 at the
    /// first step (a just-in-time scale).
    #[test]
    fn a_bf16_output_gradient_gives_the_bits_of_its_widening() {
        let be = Sim;
        let d = Dims { n: 40, ic: 24, oc: 36 };
        let dy16: Vec<bf16> = randn(d.n * d.oc, 3, 2.0).into_iter().map(to_bf16).collect();
        let dy32: Vec<f32> = dy16.iter().map(|v| v.to_f32()).collect();
        let master = be.upload(&randn(d.oc * d.ic, 4, 0.2)).unwrap();
        let x = be.upload(&randn(d.n * d.ic, 5, 1.0)).unwrap();
        for (fp8, history) in [(false, false), (true, true), (true, false)] {
            let state = || {
                let mut ds = DelayedState::new(&be, 4, &[(0, 2)]).unwrap();
                if history {
                    let mut sc = LinearScaling::new(4);
                    sc.act.record(1.5);
                    sc.grad.record(3.0);
                    ds.restore(&be, &[sc]).unwrap();
                }
                ds
            };
            let mut stats = be.zeros::<u64>(4).unwrap();
            let mut w = WeightView::new(&be, fp8, d.oc * d.ic).unwrap();
            if fp8 {
                let (q, src, scale) = w.jit_item(MasterRef::F32(&master));
                be.cast_fp8_jit(q, src, E4M3, scale, Slot { buf: &mut stats, at: 2 }).unwrap();
            } else {
                let (b, m) = w.bf16_item(MasterRef::F32(&master));
                be.cast_bf16(b, m).unwrap();
            }
            let mut saved = Saved::new(&be, fp8, d.n * d.ic).unwrap();
            let mut ds0 = state();
            assert_eq!(ds0.fresh, !history);
            cast_input(&be, &mut saved, &x, &mut ds0, 0, Slot { buf: &mut stats, at: 2 }).unwrap();
            let run = |bf16_in: bool| -> Out {
                let mut ds = state();
                if ds0.fresh {
                    // The input's just-in-time scale as the forward pass stored it.
                    be.copy(&mut ds.scales, &ds0.scales).unwrap();
                }
                let (mut dx, mut dw, mut db) =
                    (be.zeros::<bf16>(d.n * d.ic).unwrap(), be.zeros(d.oc * d.ic).unwrap(), be.zeros(d.oc).unwrap());
                let mut q = GradCast::new(&be, fp8, d.n * d.oc).unwrap();
                let mut st = be.zeros::<u64>(2).unwrap();
                let slot = Slot { buf: &mut st, at: 0 };
                if bf16_in {
                    let dy = be.upload(&dy16).unwrap();
                    backward_bf16(&be, &mut dx, &mut dw, &mut db, &dy, &w, &saved, &mut ds, 0, &mut q, d, slot)
                        .unwrap();
                } else {
                    let dy = be.upload(&dy32).unwrap();
                    backward(&be, &mut dx, &mut dw, &mut db, &dy, &w, &saved, &mut ds, 0, &mut q, d, slot).unwrap();
                }
                let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                (
                    be.download(&dx).unwrap().iter().map(|v| v.to_bits()).collect(),
                    bits(be.download(&dw).unwrap()),
                    bits(be.download(&db).unwrap()),
                    be.download(&st).unwrap(),
                )
            };
            let (a, b) = (run(true), run(false));
            assert!(a.1.iter().any(|&v| v != 0), "the weight gradient is not all zero");
            assert_eq!(a, b, "fp8 {fp8}, history {history}");
        }
    }
}
