//! The simulator backend: every op is the `fp8sim` reference on host memory.

use super::{
    amax_slot_bits, slot_amax, ActOut, AdamState, BResult, Backend, CastStats, Delayed, Elem, EmbedTable, GeluIn,
    GradOut, GradRef, JitSrc, LossGrad, OpScratch, Operand, Product, Scalar, ScaleSlot, Slot, DELAYED_E5M2,
    SCALE_STRIDE,
};
use fp8sim::fp8::{self, Fp8Format};
use fp8sim::half16::{self, bf16, f16};
use fp8sim::ops::adamw::{self, AdamStep, Grad, ScaledE4m3, ScaledF16, StepControl};
use fp8sim::ops::attention::{self, AttnShape};
use fp8sim::ops::gemm::{self, MatRef};
use fp8sim::ops::{crossentropy, encoder, gelu, layernorm};
use fp8sim::scaling::{record_ring, scale_from_amax};
use fp8sim::{par, reduce};

/// BF16 values as f32 (exact).
fn widen(x: &[bf16]) -> BResult<Vec<f32>> {
    let mut y = host_vec(x.len())?;
    y.extend(x.iter().map(|v| v.to_f32()));
    Ok(y)
}

/// One of the linear layer's products (see `Product`), exact; `accumulate`: add to `out`
/// (scale 1) instead of overwriting it.
#[allow(clippy::too_many_arguments)]
fn product_exact(
    out: &mut [f32],
    a: &Operand<'_, Sim>,
    b: &Operand<'_, Sim>,
    product: Product,
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    accumulate: bool,
) {
    // The host's scale, then the FP8 operands' inverse scales (the kernels' order).
    let scale = scale * inv_of(a) * inv_of(b);
    let (a, b) = (op(a), op(b));
    let (x, y) = match product {
        Product::Forward => (MatRef::row_major(a, m, k), MatRef::row_major(b, n, k).t()),
        Product::Dgrad => (MatRef::row_major(a, m, n), MatRef::row_major(b, n, k)),
        Product::Wgrad => (MatRef::row_major(a, m, n).t(), MatRef::row_major(b, m, k)),
    };
    let r = if accumulate { gemm::gemm_exact_accumulate(x, y, out) } else { gemm::gemm_exact(x, y, scale, out) };
    r.expect("model GEMM shapes are consistent");
}

/// An FP8 operand's inverse scale (1 for others).
fn inv_of(o: &Operand<'_, Sim>) -> f32 {
    match *o {
        Operand::Fp8(_, _, inv) => value(inv),
        _ => 1.0,
    }
}

/// A scalar's value (the simulator's device memory is the host's).
fn value(s: Scalar<'_, Sim>) -> f32 {
    match s {
        Scalar::Host(v) => v,
        Scalar::Dev(buf, at) => buf[at],
    }
}

/// Store a just-in-time scale and its inverse in its slot.
fn store_scale(slot: ScaleSlot<'_, Sim>, s: f32) {
    slot.buf[slot.at] = 1.0 / s;
    slot.buf[slot.at + 1] = s;
}

/// Record an amax in its slot (the largest pattern stays, as the GPU's atomicMax).
fn put_amax(slot: Slot<'_, Sim>, amax: f32) {
    let v = &mut slot.buf[slot.at];
    *v = (*v).max(amax_slot_bits(amax));
}

/// Store f32 values into an activation output (E4M3: their amax into its slot).
fn store_act(y: ActOut<'_, Sim>, vals: &[f32]) {
    match y {
        ActOut::F32(o) => o.copy_from_slice(vals),
        ActOut::Bf16(o) => half16::to_bf16_slice(vals, o),
        ActOut::E4m3(q, scale, slot) => {
            fp8::encode_scaled(Fp8Format::E4M3, vals, value(scale), q);
            put_amax(slot, reduce::amax(vals));
        }
    }
}

/// Run `f` into `y` directly when it is f32, else into a scratch stored with
/// [`store_act`] (the same values, then the storage type's rounding).
fn into_act(y: ActOut<'_, Sim>, n: usize, f: impl FnOnce(&mut [f32])) -> BResult<()> {
    if let ActOut::F32(o) = y {
        f(o);
        return Ok(());
    }
    let mut tmp = host_vec(n)?;
    tmp.resize(n, 0f32);
    f(&mut tmp);
    store_act(y, &tmp);
    Ok(())
}

/// The simulator's op temporaries other than attention's: GELU's backward holds its
/// f32 gradient (n x 4c) and both inputs widened to f32 (12 f32 values per token and
/// channel); the LM head's GEMM packs a chunk's operands in f32 and its product and
/// cross-entropy hold the chunk's logits in f32.
pub fn sim_op_scratch() -> OpScratch {
    OpScratch { attention: 0, activation_bytes_per_token_channel: 48, head_f32_copies: true }
}

/// The CPU simulator (uses rayon's current pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sim;

impl Sim {
    /// `x + bias` (rows of `bias.len()` columns, the bias added to each row) in a new buffer.
    fn with_bias(&self, x: &[f32], bias: &[f32]) -> BResult<Vec<f32>> {
        let mut y = self.upload(x)?;
        let c = bias.len();
        par::for_chunks_mut(&mut y, |start, ys| {
            for (i, v) in ys.iter_mut().enumerate() {
                *v += bias[(start + i) % c];
            }
        });
        Ok(y)
    }
}

fn op<'a>(o: &Operand<'a, Sim>) -> gemm::Operand<'a> {
    match *o {
        Operand::F32(b) => gemm::Operand::F32(b),
        Operand::Bf16(b) => gemm::Operand::Bf16(b),
        Operand::Fp8(b, f, _) => gemm::Operand::Fp8(b, f),
    }
}

impl Backend for Sim {
    type Buf<T: Elem> = Vec<T>;

    fn name(&self) -> &'static str {
        "sim"
    }
    fn available_memory(&self) -> Option<(u64, String)> {
        host_available().map(|b| (b, "this machine".to_string()))
    }
    fn op_scratch(&self, s: AttnShape) -> OpScratch {
        OpScratch { attention: self.attention_scratch_bytes(s), ..sim_op_scratch() }
    }
    fn attention_scratch_bytes(&self, s: AttnShape) -> u64 {
        // Backward: probabilities and their gradients (t x t f32 each) per head in flight.
        let heads = (s.b * s.nh).min(rayon::current_num_threads()) as u64;
        // + qkv widened to f32.
        heads * 8 * (s.t * s.t) as u64 + 4 * (s.b * s.t * s.c) as u64 + 12 * (s.b * s.t * s.c) as u64
    }

    fn zeros<T: Elem>(&self, n: usize) -> BResult<Vec<T>> {
        let mut v = host_vec(n)?;
        v.resize(n, T::default());
        Ok(v)
    }
    fn upload<T: Elem>(&self, data: &[T]) -> BResult<Vec<T>> {
        let mut v = host_vec(data.len())?;
        v.extend_from_slice(data);
        Ok(v)
    }
    fn download<T: Elem>(&self, buf: &Vec<T>) -> BResult<Vec<T>> {
        Ok(buf.clone())
    }
    fn len<T: Elem>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn copy<T: Elem>(&self, dst: &mut Vec<T>, src: &Vec<T>) -> BResult<()> {
        dst.copy_from_slice(src);
        Ok(())
    }

    fn amax(&self, x: &Vec<f32>) -> BResult<f32> {
        Ok(reduce::amax(x))
    }
    fn cast_fp8(&self, q: &mut Vec<u8>, x: &Vec<f32>, fmt: Fp8Format, scale: f32) -> BResult<CastStats> {
        Ok({
            fp8::encode_scaled(fmt, x, scale, q);
            let max = fmt.max();
            let saturated = x.iter().filter(|&&v| (v * scale).abs() > max).count() as u64;
            CastStats { amax: reduce::amax(x), saturated }
        })
    }
    fn amax_to(&self, x: &Vec<f32>, slot: Slot<'_, Self>) -> BResult<()> {
        put_amax(slot, reduce::amax(x));
        Ok(())
    }
    fn cast_fp8_bf16_to(
        &self,
        q: &mut Vec<u8>,
        x: &Vec<bf16>,
        fmt: Fp8Format,
        scale: Scalar<'_, Self>,
        stats: Slot<'_, Self>,
    ) -> BResult<()> {
        self.cast_fp8_to(q, &widen(x)?, fmt, scale, stats)
    }
    fn widen_bf16(&self, out: &mut Vec<f32>, x: &Vec<bf16>) -> BResult<()> {
        for (o, v) in out.iter_mut().zip(x) {
            *o = v.to_f32();
        }
        Ok(())
    }
    fn cast_fp8_to(
        &self,
        q: &mut Vec<u8>,
        x: &Vec<f32>,
        fmt: Fp8Format,
        scale: Scalar<'_, Self>,
        stats: Slot<'_, Self>,
    ) -> BResult<()> {
        let st = self.cast_fp8(q, x, fmt, value(scale))?;
        stats.buf[stats.at + 1] += st.saturated;
        put_amax(stats, st.amax);
        Ok(())
    }
    fn cast_fp8_jit(
        &self,
        q: &mut Vec<u8>,
        x: JitSrc<'_, Self>,
        fmt: Fp8Format,
        scale: ScaleSlot<'_, Self>,
        amax: Slot<'_, Self>,
    ) -> BResult<()> {
        let decoded;
        let x = match x {
            JitSrc::F32(x) => x,
            JitSrc::F16(h, inv) => {
                let mut d = self.zeros::<f32>(h.len())?;
                self.decode_f16(&mut d, h, inv)?;
                decoded = d;
                &decoded
            }
        };
        let a = reduce::amax(x);
        let s = scale_from_amax(fmt, a, 0, scale.buf[scale.at + 1]);
        fp8::encode_scaled(fmt, x, s, q);
        store_scale(scale, s);
        put_amax(amax, a);
        Ok(())
    }
    fn decode_fp8(&self, x: &mut Vec<f32>, q: &Vec<u8>, fmt: Fp8Format, inv_scale: f32) -> BResult<()> {
        fp8::decode_scaled(fmt, q, inv_scale, x);
        Ok(())
    }
    fn cast_bf16(&self, y: &mut Vec<bf16>, x: &Vec<f32>) -> BResult<()> {
        half16::to_bf16_slice(x, y);
        Ok(())
    }
    fn cast_f16(&self, y: &mut Vec<f16>, x: &Vec<f32>, scale: f32) -> BResult<()> {
        par::for_chunks2(x, y, |xs, ys| {
            for (o, &v) in ys.iter_mut().zip(xs) {
                *o = half16::to_f16(v * scale);
            }
        });
        Ok(())
    }
    fn decode_f16(&self, x: &mut Vec<f32>, h: &Vec<f16>, inv_scale: Scalar<'_, Self>) -> BResult<()> {
        let inv_scale = value(inv_scale);
        par::for_chunks2(h, x, |hs, xs| {
            for (o, &v) in xs.iter_mut().zip(hs) {
                *o = v.to_f32() * inv_scale;
            }
        });
        Ok(())
    }
    fn sum_sq(&self, x: &Vec<f32>) -> BResult<f32> {
        Ok(reduce::sum_sq(x))
    }
    fn mean(&self, x: &Vec<f32>) -> BResult<f32> {
        Ok(crossentropy::mean_loss(x))
    }
    fn mean_to(&self, x: &Vec<f32>, out: &mut Vec<f32>, at: usize) -> BResult<()> {
        out[at] = crossentropy::mean_loss(x);
        Ok(())
    }
    fn delayed_scaling_update(&self, d: Delayed<'_, Self>, stats: &Vec<u64>) -> BResult<()> {
        let w = d.window;
        for (i, &slot) in d.slots.iter().enumerate() {
            let fmt = if slot & DELAYED_E5M2 != 0 { Fp8Format::E5M2 } else { Fp8Format::E4M3 };
            let amax = slot_amax(stats[(slot & !DELAYED_E5M2) as usize]);
            let at = SCALE_STRIDE * i;
            let mut s = d.scales[at + 1];
            if record_ring(fmt, &mut d.hist[i * w..(i + 1) * w], &mut d.recorded[i], &mut s, amax) {
                d.scales[at] = 1.0 / s;
                d.scales[at + 1] = s;
            }
        }
        Ok(())
    }
    fn flag_nonfinite(&self, out: &mut Vec<f32>, at: usize, stats: &Vec<u64>, slots: &Vec<u32>) -> BResult<()> {
        let bad = slots.iter().any(|&k| !slot_amax(stats[k as usize]).is_finite());
        out[at] = if bad { 1.0 } else { 0.0 };
        Ok(())
    }
    fn grad_sq_sums_to(&self, grads: &[GradRef<'_, Self>], out: &mut Vec<f32>) -> BResult<()> {
        let sums = self.grad_sq_sums(grads)?;
        out[..sums.len()].copy_from_slice(&sums);
        Ok(())
    }
    fn step_control(&self, ctl: &mut Vec<f32>, sq: &Vec<f32>, c: &StepControl) -> BResult<()> {
        adamw::step_control(ctl, sq, c);
        Ok(())
    }

    fn matmul(
        &self,
        out: &mut Vec<f32>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        product: Product,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
    ) -> BResult<()> {
        product_exact(out, &a, &b, product, m, n, k, scale, false);
        Ok(())
    }
    fn matmul_acc(
        &self,
        out: &mut Vec<f32>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        product: Product,
        m: usize,
        n: usize,
        k: usize,
    ) -> BResult<()> {
        product_exact(out, &a, &b, product, m, n, k, 1.0, true);
        Ok(())
    }
    fn copy_range<T: Elem>(
        &self,
        dst: &mut Vec<T>,
        dst_at: usize,
        src: &Vec<T>,
        src_at: usize,
        len: usize,
    ) -> BResult<()> {
        dst[dst_at..dst_at + len].copy_from_slice(&src[src_at..src_at + len]);
        Ok(())
    }
    fn column_sums(&self, out: &mut Vec<f32>, x: &Vec<f32>, rows: usize, cols: usize) -> BResult<()> {
        reduce::column_sums(x, rows, cols, out);
        Ok(())
    }
    fn residual_forward(&self, out: &mut Vec<f32>, res: &Vec<f32>, x: &Vec<bf16>, bias: &Vec<f32>) -> BResult<()> {
        let c = bias.len();
        par::for_chunks_mut(out, |start, o| {
            for (i, v) in o.iter_mut().enumerate() {
                let k = start + i;
                *v = res[k] + (x[k].to_f32() + bias[k % c]);
            }
        });
        Ok(())
    }
    fn set(&self, x: &mut Vec<f32>, i: usize, v: f32) -> BResult<()> {
        x[i] = v;
        Ok(())
    }

    fn encoder_forward(
        &self,
        out: &mut Vec<f32>,
        tokens: &Vec<u32>,
        wte: EmbedTable<'_, Self>,
        wpe: &Vec<f32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> BResult<()> {
        match wte {
            EmbedTable::F32(w) => encoder::encoder_forward(out, tokens, w, wpe, b, t, c),
            EmbedTable::F16(h, inv) => encoder::encoder_forward_f16(out, tokens, h, value(inv), wpe, b, t, c),
        }
        Ok(())
    }
    fn encoder_backward(
        &self,
        dwte: &mut Vec<f32>,
        dwpe: &mut Vec<f32>,
        dout: &Vec<f32>,
        tokens: &Vec<u32>,
        _host_tokens: &[u32],
        b: usize,
        t: usize,
        c: usize,
    ) -> BResult<()> {
        encoder::encoder_backward(dwte, dwpe, dout, tokens, b, t, c);
        Ok(())
    }
    fn layernorm_forward(
        &self,
        y: ActOut<'_, Self>,
        xhat: &mut Vec<bf16>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> BResult<()> {
        into_act(y, n * c, |yv| layernorm::layernorm_forward(yv, xhat, mean, rstd, x, w, b, n, c))
    }
    fn layernorm_backward(
        &self,
        dx: &mut Vec<f32>,
        accumulate: bool,
        dw: &mut Vec<f32>,
        db: &mut Vec<f32>,
        dy: &Vec<bf16>,
        xhat: &Vec<bf16>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> BResult<()> {
        let dy = &widen(dy)?;
        if !accumulate {
            layernorm::layernorm_backward(dx, dw, db, dy, xhat, w, rstd, n, c);
            return Ok(());
        }
        let mut g = self.zeros::<f32>(n * c)?;
        layernorm::layernorm_backward(&mut g, dw, db, dy, xhat, w, rstd, n, c);
        par::for_chunks_mut(dx, |start, o| {
            for (i, v) in o.iter_mut().enumerate() {
                *v += g[start + i];
            }
        });
        Ok(())
    }
    fn attention_forward(
        &self,
        out: &mut Vec<bf16>,
        stats: &mut Vec<f32>,
        qkv: &Vec<bf16>,
        shape: AttnShape,
    ) -> BResult<()> {
        let mut o32 = host_vec(out.len())?;
        o32.resize(out.len(), 0f32);
        attention::attention_forward(&mut o32, stats, &widen(qkv)?, shape);
        half16::to_bf16_slice(&o32, out);
        Ok(())
    }
    fn attention_backward(
        &self,
        dqkv: &mut Vec<bf16>,
        dout: &Vec<bf16>,
        qkv: &Vec<bf16>,
        out: &Vec<bf16>,
        stats: &Vec<f32>,
        shape: AttnShape,
    ) -> BResult<()> {
        let mut d32 = host_vec(dqkv.len())?;
        d32.resize(dqkv.len(), 0f32);
        attention::attention_backward(&mut d32, &widen(dout)?, &widen(qkv)?, &widen(out)?, stats, shape);
        half16::to_bf16_slice(&d32, dqkv);
        Ok(())
    }
    fn gelu_forward(&self, y: ActOut<'_, Self>, x: &Vec<bf16>, x8: Option<&mut Vec<u8>>) -> BResult<()> {
        let xf = widen(x)?;
        if let Some(q) = x8 {
            fp8::encode_scaled(Fp8Format::E4M3, &xf, 1.0, q);
        }
        into_act(y, x.len(), |yv| gelu::gelu_forward(yv, &xf, None))
    }
    fn gelu_backward(&self, dx: GradOut<'_, Self>, x: GeluIn<'_, Self>, dy: &Vec<bf16>, cols: usize) -> BResult<()> {
        let xf = match x {
            GeluIn::Bf16(x) => widen(x)?,
            GeluIn::E4m3(q) => {
                let mut v = self.zeros::<f32>(q.len())?;
                fp8::decode_scaled(Fp8Format::E4M3, q, 1.0, &mut v);
                v
            }
        };
        let dy = &widen(dy)?;
        if let GradOut::F32(o) = dx {
            gelu::gelu_backward(o, &xf, None, dy);
            return Ok(());
        }
        let mut g = self.zeros::<f32>(xf.len())?;
        gelu::gelu_backward(&mut g, &xf, None, dy);
        dx.finish(self, &g, xf.len() / cols.max(1), cols)
    }
    fn cast_bf16_bias(&self, y: &mut Vec<bf16>, x: &Vec<f32>, bias: &Vec<f32>) -> BResult<()> {
        half16::to_bf16_slice(&self.with_bias(x, bias)?, y);
        Ok(())
    }
    fn crossentropy(
        &self,
        losses: &mut Vec<f32>,
        logits: &mut Vec<bf16>,
        with_grad: bool,
        targets: &Vec<u32>,
        dloss: LossGrad<'_, Self>,
        n: usize,
        v: usize,
    ) -> BResult<()> {
        let dloss = value(dloss.mu) / dloss.rows;
        let l32 = widen(logits)?;
        let dlogits = with_grad.then_some(logits.as_mut_slice());
        crossentropy::crossentropy_forward_backward(losses, dlogits, &l32, targets, dloss, n, v, half16::to_bf16);
        Ok(())
    }

    fn adamw(
        &self,
        state: AdamState<'_, Self>,
        grad: GradRef<'_, Self>,
        step: &AdamStep,
        ctl: Option<&Vec<f32>>,
    ) -> BResult<()> {
        let step = match ctl {
            Some(w) if w[adamw::ctl::OVERFLOW] != 0.0 => return Ok(()),
            Some(w) => step.with_control(w),
            None => *step,
        };
        let step = &step;
        let g = match grad {
            GradRef::F32(g) => Grad::F32(g),
            GradRef::Fp8(codes, inv) => Grad::Fp8 { codes, inv_scale: value(inv) },
        };
        // (A scale's inverse is stored before it: [1/s, s].)
        let inverse = |s: &mut [f32]| s[0] = 1.0 / s[1];
        match state {
            AdamState::F32 { master, m, v } => adamw::adamw_f32(master, g, m, v, step),
            AdamState::O1 { master, master_scale, m, v } => {
                adamw::adamw_o1(ScaledF16 { codes: master, scale: &mut master_scale[1] }, g, m, v, step);
                inverse(master_scale);
            }
            AdamState::O2 { master, master_scale, m, v, moment_scales } => {
                let (ms, vs) = moment_scales.split_at_mut(2);
                adamw::adamw_o2(
                    ScaledF16 { codes: master, scale: &mut master_scale[1] },
                    g,
                    ScaledE4m3 { codes: m, scale: &mut ms[1] },
                    ScaledF16 { codes: v, scale: &mut vs[1] },
                    step,
                );
                inverse(master_scale);
                inverse(ms);
                inverse(vs);
            }
        }
        Ok(())
    }
}

/// An empty vector with room for `n` elements: an allocation the host refuses is an
/// error naming its size, not an abort.
fn host_vec<T>(n: usize) -> BResult<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| {
        let gib = n as f64 * std::mem::size_of::<T>() as f64 / (1u64 << 30) as f64;
        super::BackendError::new("host allocation", format!("{gib:.2} GiB: {e}"))
    })?;
    Ok(v)
}

/// Host memory a process may still take: MemAvailable, or less under a cgroup limit.
pub fn host_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let mut avail = kib * 1024;
    let read = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok()?.trim().parse::<u64>().ok();
    if let (Some(max), Some(cur)) = (read("memory.max"), read("memory.current")) {
        avail = avail.min(max.saturating_sub(cur));
    }
    Some(avail)
}

#[cfg(test)]
mod tests {
    //! Gradient checks of the linear layer (the three GEMM products plus bias) and the
    //! embedding, through the backend interface, against f64 references.
    use super::*;

    #[test]
    fn a_refused_allocation_is_an_error_naming_its_size() {
        let e = Sim.zeros::<f32>(usize::MAX / 8).unwrap_err();
        assert_eq!(e.op, "host allocation");
        let msg = String::from(e);
        assert!(msg.starts_with("host allocation: ") && msg.contains("GiB"), "{msg}");
        assert_eq!(Sim.zeros::<f32>(3).unwrap(), vec![0.0; 3]);
    }

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0f32; n];
        fp8sim::rng::fill_normal(seed, 5, 0, 0.0, 1.0, &mut v);
        v
    }

    fn numeric(x: &[f64], w: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
        let mut xp = x.to_vec();
        (0..x.len())
            .map(|i| {
                let h = 1e-6;
                xp[i] = x[i] + h;
                let up: f64 = f(&xp).iter().zip(w).map(|(a, b)| a * b).sum();
                xp[i] = x[i] - h;
                let dn: f64 = f(&xp).iter().zip(w).map(|(a, b)| a * b).sum();
                xp[i] = x[i];
                (up - dn) / (2.0 * h)
            })
            .collect()
    }

    fn close(name: &str, got: &[f32], want: &[f64]) {
        let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() / scale < 1e-5, "{name}[{i}]: {g} vs {w}");
        }
    }

    #[test]
    fn linear_layer_gradients_match_f64() {
        let (n, ic, oc) = (5, 7, 6);
        let (x, w, b, dy) = (randn(n * ic, 1), randn(oc * ic, 2), randn(oc, 3), randn(n * oc, 4));
        let be = Sim;
        let f = |xv: &[f64], wv: &[f64], bv: &[f64]| {
            let mut y = vec![0f64; n * oc];
            for r in 0..n {
                for o in 0..oc {
                    y[r * oc + o] = (0..ic).map(|k| xv[r * ic + k] * wv[o * ic + k]).sum::<f64>() + bv[o];
                }
            }
            y
        };
        let d = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let (xd, wd, bd, dyd) = (d(&x), d(&w), d(&b), d(&dy));
        let mut y = vec![0f32; n * oc];
        be.matmul(&mut y, Operand::F32(&x), Operand::F32(&w), Product::Forward, n, oc, ic, 1.0).unwrap();
        let y = be.with_bias(&y, &b).unwrap();
        close("y", &y, &f(&xd, &wd, &bd));
        let (mut dx, mut dw, mut db) = (vec![0f32; n * ic], vec![0f32; oc * ic], vec![0f32; oc]);
        be.matmul(&mut dx, Operand::F32(&dy), Operand::F32(&w), Product::Dgrad, n, oc, ic, 1.0).unwrap();
        be.matmul(&mut dw, Operand::F32(&dy), Operand::F32(&x), Product::Wgrad, n, oc, ic, 1.0).unwrap();
        be.column_sums(&mut db, &dy, n, oc).unwrap();
        close("dx", &dx, &numeric(&xd, &dyd, |v| f(v, &wd, &bd)));
        close("dw", &dw, &numeric(&wd, &dyd, |v| f(&xd, v, &bd)));
        close("db", &db, &numeric(&bd, &dyd, |v| f(&xd, &wd, v)));
    }

    #[test]
    fn embedding_gradients_match_f64() {
        let (b, t, c, v) = (2, 3, 4, 5);
        let tokens: Vec<u32> = vec![1, 4, 1, 0, 1, 3];
        let (wte, wpe, dout) = (randn(v * c, 5), randn(t * c, 6), randn(b * t * c, 7));
        let be = Sim;
        let f = |te: &[f64], pe: &[f64]| {
            let mut o = vec![0f64; b * t * c];
            for nn in 0..b * t {
                for i in 0..c {
                    o[nn * c + i] = te[tokens[nn] as usize * c + i] + pe[(nn % t) * c + i];
                }
            }
            o
        };
        let d = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let (ted, ped, dd) = (d(&wte), d(&wpe), d(&dout));
        let (mut dwte, mut dwpe) = (vec![0f32; v * c], vec![0f32; t * c]);
        be.encoder_backward(&mut dwte, &mut dwpe, &dout, &tokens, &tokens, b, t, c).unwrap();
        close("dwte", &dwte, &numeric(&ted, &dd, |x| f(x, &ped)));
        close("dwpe", &dwpe, &numeric(&ped, &dd, |x| f(&ted, x)));
    }
}
