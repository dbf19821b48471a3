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
//! (the residual add, GELU, or `add_bias`), again the same f32 addition.
//!
//! Delayed scaling starts with an empty history: the first cast of a tensor uses its
//! own amax (just-in-time) instead of the initial scale 1, so step 1 does not flush
//! small gradients to zero. (Transformer Engine starts from 1.)

use crate::backend::BResult;
use crate::backend::{ActOut, Backend, Operand, Product};
use fp8sim::half16::{bf16, f16};
use fp8sim::scaling::{scale_from_amax, DelayedScaling, ScalingConfig};
use fp8sim::Fp8Format::{E4M3, E5M2};

/// Delayed-scaling state of one FP8 linear layer.
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

/// The scale to cast with now: the delayed one, or just-in-time when there is no history.
fn scale_now<B: Backend>(be: &B, ds: &DelayedScaling, x: &B::Buf<f32>) -> BResult<f32> {
    Ok({
        if ds.history().next().is_none() {
            scale_from_amax(ds.config.fmt, be.amax(x)?, ds.config.margin, ds.scale())
        } else {
            ds.scale()
        }
    })
}

/// The weight as the GEMMs read it this step.
pub enum WeightView<B: Backend> {
    Bf16(B::Buf<bf16>),
    Fp8 { codes: B::Buf<u8>, scale: f32 },
}

impl<B: Backend> WeightView<B> {
    pub fn new(be: &B, fp8: bool, numel: usize) -> BResult<Self> {
        Ok({
            if fp8 {
                WeightView::Fp8 { codes: be.zeros(numel)?, scale: 1.0 }
            } else {
                WeightView::Bf16(be.zeros(numel)?)
            }
        })
    }

    /// Re-derive from the master (just-in-time scale for FP8). An FP16 master is read
    /// as its decoded f32 values (`decode_f16`) without writing them out.
    pub fn update(&mut self, be: &B, master: MasterRef<'_, B>) -> BResult<()> {
        match (self, master) {
            (WeightView::Bf16(b), MasterRef::F32(w)) => be.cast_bf16(b, w)?,
            (WeightView::Fp8 { codes, scale }, MasterRef::F32(w)) => {
                *scale = scale_from_amax(E4M3, be.amax(w)?, 0, *scale);
                be.cast_fp8_only(codes, w, E4M3, *scale)?;
            }
            (WeightView::Fp8 { codes, scale }, MasterRef::F16(h, master_scale)) => {
                let inv = 1.0 / master_scale;
                *scale = scale_from_amax(E4M3, be.amax_f16(h, inv)?, 0, *scale);
                be.cast_f16_fp8(codes, h, inv, E4M3, *scale)?;
            }
            (WeightView::Bf16(_), MasterRef::F16(..)) => {
                unreachable!("BF16 weight views come with f32 masters (bf16 level)")
            }
        }
        Ok(())
    }

    fn operand(&self) -> (Operand<'_, B>, f32) {
        match self {
            WeightView::Bf16(b) => (Operand::Bf16(b), 1.0),
            WeightView::Fp8 { codes, scale } => (Operand::Fp8(codes, E4M3), 1.0 / scale),
        }
    }
}

/// A linear weight's master as a view is derived from it.
pub enum MasterRef<'a, B: Backend> {
    F32(&'a B::Buf<f32>),
    /// FP16 codes and their scale (value = decoded / scale).
    F16(&'a B::Buf<f16>, f32),
}

/// The layer input kept for backward (BF16 or E4M3 with its scale)?.
pub enum Saved<B: Backend> {
    Bf16(B::Buf<bf16>),
    Fp8 { codes: B::Buf<u8>, scale: f32 },
}

impl<B: Backend> Saved<B> {
    pub fn new(be: &B, fp8: bool, numel: usize) -> BResult<Self> {
        Ok({
            if fp8 {
                Saved::Fp8 { codes: be.zeros(numel)?, scale: 1.0 }
            } else {
                Saved::Bf16(be.zeros(numel)?)
            }
        })
    }
    fn operand(&self) -> (Operand<'_, B>, f32) {
        match self {
            Saved::Bf16(b) => (Operand::Bf16(b), 1.0),
            Saved::Fp8 { codes, scale } => (Operand::Fp8(codes, E4M3), 1.0 / scale),
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
    fn operand(&self) -> Operand<'_, B> {
        match self {
            GradCast::Bf16(b) => Operand::Bf16(b),
            GradCast::Fp8(c) => Operand::Fp8(c, E5M2),
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

/// Fill `saved` with a layer's input, cast from the f32 tensor `x` (BF16, or E4M3 with
/// the delayed scale, just-in-time when there is no history yet). `record`: update the
/// amax history (training) or not (evaluation).
pub fn cast_input<B: Backend>(
    be: &B,
    saved: &mut Saved<B>,
    x: &B::Buf<f32>,
    sc: &mut LinearScaling,
    record: bool,
) -> BResult<()> {
    match saved {
        Saved::Bf16(b) => be.cast_bf16(b, x)?,
        Saved::Fp8 { codes, scale } => {
            *scale = scale_now(be, &sc.act, x)?;
            let stats = be.cast_fp8(codes, x, E4M3, *scale)?;
            if record {
                sc.act.record(stats.amax);
            }
        }
    }
    Ok(())
}

/// Fill `saved` with a layer's input made by `produce`, which writes its values into
/// the `ActOut` it is given and returns their amax for E4M3 (a layernorm or GELU
/// forward). The values go straight into the saved copy when their scale is known
/// first; at the first FP8 step (no history, a just-in-time scale) they go through the
/// f32 `scratch` and [`cast_input`]. Either way the same bits are saved and recorded.
pub fn produce_input<B: Backend>(
    be: &B,
    saved: &mut Saved<B>,
    scratch: &mut B::Buf<f32>,
    sc: &mut LinearScaling,
    record: bool,
    produce: impl FnOnce(ActOut<'_, B>) -> BResult<f32>,
) -> BResult<()> {
    match saved {
        Saved::Bf16(b) => {
            produce(ActOut::Bf16(b))?;
        }
        Saved::Fp8 { codes, scale } if sc.act.history().next().is_some() => {
            *scale = sc.act.scale();
            let amax = produce(ActOut::E4m3(codes, *scale))?;
            if record {
                sc.act.record(amax);
            }
        }
        Saved::Fp8 { .. } => {
            produce(ActOut::F32(scratch))?;
            cast_input(be, saved, scratch, sc, record)?;
        }
    }
    Ok(())
}

/// `out = x W^T` from the saved input (the caller adds the bias: see the module notes).
pub fn forward<B: Backend>(be: &B, out: &mut B::Buf<f32>, w: &WeightView<B>, saved: &Saved<B>, d: Dims) -> BResult<()> {
    let (xa, xs) = saved.operand();
    let (wa, ws) = w.operand();
    be.matmul(out, xa, wa, Product::Forward, d.n, d.oc, d.ic, xs * ws)
}

/// Backward: `dx`, `dw`, `db` (all overwritten) from `dy`. Returns how many output
/// gradient elements saturated in the E5M2 cast.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    be: &B,
    dx: &mut B::Buf<f32>,
    dw: &mut B::Buf<f32>,
    db: &mut B::Buf<f32>,
    dy: &B::Buf<f32>,
    w: &WeightView<B>,
    saved: &Saved<B>,
    sc: &mut LinearScaling,
    dyq: &mut GradCast<B>,
    d: Dims,
) -> BResult<u64> {
    Ok({
        be.column_sums(db, dy, d.n, d.oc)?;
        let (mut saturated, mut dys) = (0, 1.0);
        match dyq {
            GradCast::Bf16(b) => be.cast_bf16(b, dy)?,
            GradCast::Fp8(codes) => {
                let s = scale_now(be, &sc.grad, dy)?;
                let stats = be.cast_fp8(codes, dy, E5M2, s)?;
                sc.grad.record(stats.amax);
                saturated = stats.saturated;
                dys = 1.0 / s;
            }
        }
        let (wa, ws) = w.operand();
        be.matmul(dx, dyq.operand(), wa, Product::Dgrad, d.n, d.oc, d.ic, dys * ws)?;
        let (xa, xs) = saved.operand();
        be.matmul(dw, dyq.operand(), xa, Product::Wgrad, d.n, d.oc, d.ic, dys * xs)?;
        saturated
    })
}
