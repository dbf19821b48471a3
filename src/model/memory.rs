//! What a run will allocate, computed from the shapes before anything is allocated, so
//! a model, batch, sequence or vocabulary too large for the machine is refused with the
//! figures instead of aborting in the middle of an allocation. The terms follow
//! `Gpt::new` (parameters by level) and `Gpt::workspace` (activations) buffer by buffer;
//! `tests/memory.rs` holds the sum against the peak a counting allocator sees.

use super::{Level, ModelConfig, Recompute};
use crate::backend::{Backend, OpScratch};
use fp8sim::ops::attention::AttnShape;

/// Bytes a training (or evaluation) process needs, in three parts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Weights, gradients and optimizer state (this rank's share at O3).
    pub state: u64,
    /// The workspace: activations, their gradients, weight views, logits.
    pub activations: u64,
    /// The largest temporary an op allocates (attention scores, optimizer scratch).
    pub transient: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.state + self.activations + self.transient
    }
}

/// GiB with two decimals, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The estimate for `cfg` at `level` with `ranks` data-parallel ranks, batch `b`,
/// sequence `t`; `scratch`: what the backend's ops allocate beyond their inputs and
/// outputs for this shape (`Backend::op_scratch`).
pub fn estimate(
    cfg: &ModelConfig,
    level: Level,
    recompute: Recompute,
    ranks: usize,
    b: usize,
    t: usize,
    scratch: OpScratch,
) -> Estimate {
    estimate_tp(cfg, level, recompute, ranks, 1, b, t, scratch)
}

/// [`estimate`] for one rank of a tensor-parallel group of `tp` (`ranks`: the
/// data-parallel ranks): its pieces of the parameters (`shard::layout`), its
/// sequence-parallel rows and its columns of the column-parallel activations. At tp > 1
/// the terms shared with tp = 1 that do not shrink (the head's and the workspace's
/// whole-row buffers) are kept whole, so the figure errs high there.
#[allow(clippy::too_many_arguments)]
pub fn estimate_tp(
    cfg: &ModelConfig,
    level: Level,
    recompute: Recompute,
    ranks: usize,
    tp: usize,
    b: usize,
    t: usize,
    scratch: OpScratch,
) -> Estimate {
    let tp = tp.max(1);
    let pieces: Vec<u64> =
        super::shard::layout(cfg, tp).iter().map(|(_, _, shape)| shape.iter().product::<usize>() as u64).collect();
    let p: u64 = pieces.iter().sum();
    let largest: u64 = pieces.iter().copied().max().unwrap_or(0);
    let ranks = ranks.max(1) as u64;
    // master + gradient + moments, bytes per parameter (params.rs).
    let state = match level {
        Level::Bf16 => 16 * p,
        Level::O1 => 11 * p,
        Level::O2 => 6 * p,
        Level::O3 => p + (5 * p).div_ceil(ranks),
    };
    let (c, v, l, nh) = (cfg.n_embd as u64, cfg.vocab_size as u64, cfg.n_layer as u64, cfg.n_head as u64);
    let (n, b, t) = ((b * t) as u64, b as u64, t as u64);
    // This rank's rows of the sequence-parallel regions, columns of the column-parallel
    // ones, heads and vocabulary (all of them at tp = 1).
    let q = tp as u64;
    let (nl, cl, nhl, vl) = (n / q, c / q, nh / q, v / q);
    let w = if level.fp8() { 1 } else { 2 }; // FP8 codes or BF16 views of linear operands
    let f32s = 4u64;
    // What a block keeps for its backward pass (`gpt::Kept`; per set of activations:
    // one per block, or one for all with everything recomputed), and the buffers one
    // serves all blocks: f32 layernorm statistics and attention's row statistics; the
    // block's output and the residual after attention (f32); the layernorms' normalized
    // inputs (BF16, 2 x c); qkv (BF16, 3c) and the attention output (BF16, c); the MLP
    // pre-activation (BF16, 4c) and its E4M3 copy at the FP8 levels; the saved linear
    // inputs (7c) in FP8 or BF16. Recomputed inputs (GELU's 4c; with "cheap" all 7c and
    // the attention output) are one buffer each, not one per block.
    let kept = crate::model::gpt::Kept::new(recompute, level.fp8());
    let per = |keep: bool, bytes: u64| if keep { bytes } else { 0 };
    let once = |keep: bool, bytes: u64| if keep { 0 } else { bytes };
    let (res_mid, xhat, fc, fc8) = (f32s * nl * c, 2 * 2 * nl * c, 2 * 4 * n * cl, 4 * n * cl);
    let block = f32s * (4 * nl + 2 * b * nhl * t)
        + 2 * 3 * n * cl
        + per(kept.res_mid, res_mid)
        + per(kept.xhat, xhat)
        + per(kept.fc, fc)
        + per(kept.fc8, fc8);
    let shared = once(kept.res_mid, res_mid) + once(kept.xhat, xhat) + once(kept.fc, fc) + per(kept.fc8_shared, fc8);
    let att = 2 * n * cl;
    // The saved linear inputs' widths: the two gathered layernorm outputs (c each), the
    // attention output (its heads' columns) and GELU's output (4c of columns).
    let (ln_in, att_in, gelu_in) = (2 * c, cl, 4 * cl);
    let (sets, saved_per_set, saved_once, att_sets) = match recompute {
        Recompute::None => (l, ln_in + att_in + gelu_in, 0, l),
        Recompute::Gelu => (l, ln_in + att_in, gelu_in, l),
        Recompute::Cheap => (l, 0, ln_in + att_in + gelu_in, l.min(1)),
        Recompute::Full => (l.min(1), ln_in + att_in + gelu_in, 0, l.min(1)),
    };
    let outputs = if kept.res { l } else { l.min(2) };
    let blocks = outputs * f32s * nl * c + sets * (block + w * saved_per_set * n) + att_sets * att + shared;
    // f32 copies of FP16 masters, but not of linear weights (views come from the codes).
    // (At O1/O2 the token embedding is read from its FP16 codes: no f32 copy; at O3 a
    // rank that does not own it keeps one.)
    let decoded = match level {
        Level::Bf16 => 0,
        Level::O1 | Level::O2 => f32s * (p - l * 12 * c * cl - vl * c),
        Level::O3 => f32s * (p - l * 12 * c * cl),
    };
    let views = l * 12 * c * cl * w + 2 * vl * c;
    // f32: encoded, dres; BF16: a projection's product (lin_out), the final layernorm's
    // output and normalized input, the products' input gradients dln, datt, dgelu (4),
    // attention's dqkv (3);
    // the LM head's chunk of r rows:
    // input (BF16), targets, logits (BF16, their gradient written over them), losses,
    // input gradients (BF16).
    let r = crate::model::gpt::head_rows_for(n as usize, vl as usize) as u64;
    let head_chunk = r * (2 * c + 4 + 2 * vl + 4 + 2 * c);
    let global = f32s * (2 * n * c + 3 * n) + 2 * 12 * n * c + 8 * n + head_chunk;
    // The output gradients' E5M2 / BF16 copies (3c + c + 4c + c; at the bf16 level the
    // QKV layer's products read dqkv itself).
    let grad_casts = if level.fp8() { 9 * n * c } else { 2 * 6 * n * c };
    // (At the FP8 levels the small parameters' gradients wait in f32 for one batch cast:
    // per block the biases 3c + c + 4c + c and the layernorms' 4c, the final layernorm's 2c.)
    let staged = if level.fp8() { f32s * (l * 13 * c + 2 * c) } else { 0 };
    let grad_bufs = f32s * (12 * c * cl + 9 * c + 2 * c + vl * c + cfg.seq_len as u64 * c) + staged;
    let activations = blocks + w * saved_once * n + decoded + views + global + grad_casts + grad_bufs;
    // AdamW's new values before re-encoding (three f32 per element of the largest tensor).
    let optimizer = if level.fp8() { 3 * f32s * largest } else { 0 };
    // The LM head's products: f32 copies of the operands of one chunk (the simulator's
    // GEMM packs them) and an f32 copy of its logits (the simulator's product before
    // rounding, its cross-entropy's widening).
    let head = if scratch.head_f32_copies { f32s * (2 * r * vl + (r + vl) * c) } else { 0 };
    // f32 temporaries of the activation ops: an activation or a gradient computed in f32
    // before it is stored narrower (the first FP8 step's just-in-time scales, the exact
    // class's QKV / MLP-up products), with f32 copies of BF16 inputs where the backend
    // makes them (the simulator's GELU backward: GELU's gradient, n x 4c, and both
    // inputs widened: 48 bytes per token and channel; the GPU's, measured: 21).
    let act_scratch = scratch.activation_bytes_per_token_channel * n * c;
    // The LM head's BF16 copy of an FP16 token embedding is cast through an f32 copy.
    let head_copy = if level.fp8() { f32s * vl * c } else { 0 };
    let transient = optimizer.max(scratch.attention + head).max(act_scratch).max(head_copy);
    Estimate { state, activations, transient }
}

/// Refuse a run whose estimate exceeds what the device has free, naming both figures.
/// `overhead`: what the device needs beyond the estimate (`Backend::memory_overhead`);
/// `full`: everything is recomputed already (the message does not suggest it).
pub fn check_fits(
    est: &Estimate,
    overhead: u64,
    full: bool,
    available: Option<(u64, String)>,
    what: &str,
) -> Result<(), String> {
    let Some((free, device)) = available else { return Ok(()) };
    if est.total() + overhead <= free {
        return Ok(());
    }
    let slack = if overhead > 0 { format!(", {} allocator slack", gib(overhead)) } else { String::new() };
    Err(format!(
        "{what} needs about {} ({} weights + gradients + optimizer state, {} activations, {} largest temporary{slack}) \
         but {device} has {} available; use a smaller model, batch or sequence (train.batch_size, model.seq_len; --batch, --seq), \
         {}or a leaner level (O2: 6 bytes of state per parameter)",
        gib(est.total() + overhead),
        gib(est.state),
        gib(est.activations),
        gib(est.transient),
        gib(free),
        if full { "" } else { "more recomputation (train.recompute = \"full\"), " }
    ))
}

/// [`estimate`] for backend `be` (its op temporaries), checked against what `be` has
/// available less its allocator slack; `b` rows of the model's sequence length.
#[allow(clippy::too_many_arguments)]
pub fn check<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    level: Level,
    recompute: Recompute,
    ranks: usize,
    tp: usize,
    b: usize,
    what: &str,
) -> Result<Estimate, String> {
    let t = cfg.seq_len;
    let tp = tp.max(1);
    let shape = AttnShape { b, t, c: cfg.n_embd / tp, nh: cfg.n_head / tp };
    let est = estimate_tp(cfg, level, recompute, ranks, tp, b, t, be.op_scratch(shape));
    let full = recompute == Recompute::Full;
    check_fits(&est, be.memory_overhead(&est), full, be.available_memory(), what)?;
    Ok(est)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rank of a tensor-parallel group needs a share of what one rank alone does:
    /// the parameters' pieces exactly (6 bytes each at O2), the activations mostly; at
    /// tp = 1 the estimate is the plain one.
    #[test]
    fn a_tensor_parallel_rank_needs_its_share() {
        let (cfg, b) = crate::bench::step::preset("gpt-1.3b").unwrap();
        let t = cfg.seq_len;
        let none = OpScratch::default();
        let one = estimate(&cfg, Level::O2, Recompute::None, 1, b, t, none);
        assert_eq!(estimate_tp(&cfg, Level::O2, Recompute::None, 1, 1, b, t, none), one);
        let two = estimate_tp(&cfg, Level::O2, Recompute::None, 1, 2, b, t, none);
        let pieces: usize =
            crate::model::shard::layout(&cfg, 2).iter().map(|(_, _, s)| s.iter().product::<usize>()).sum();
        assert_eq!(two.state, 6 * pieces as u64);
        let whole = crate::model::params::whole_count(&cfg) as u64;
        assert!(two.state < 6 * whole * 52 / 100 && two.state > 6 * whole / 2, "{two:?}");
        let ratio = two.total() as f64 / one.total() as f64;
        assert!((0.5..0.75).contains(&ratio), "tp 2 / tp 1 = {ratio:.3}: {two:?} vs {one:?}");
    }
}
