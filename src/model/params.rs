//! The parameter list (names, shapes, init) and each parameter's storage by level.

use super::config::{Level, ModelConfig};
use crate::backend::BResult;
use crate::backend::Backend;
use fp8sim::half16::f16;
use fp8sim::rng;

/// Which parameters are FP8 linear weights (the rest keep higher precision in compute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    LinearWeight,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal(f32),
    Zeros,
    Ones,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// Tensor name in checkpoints (see README: checkpoint tensor names).
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: Kind,
    /// AdamW weight decay applies (2-D weights only, as GPT-2 training does).
    pub decay: bool,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Parameters per transformer block, in order.
pub const PER_LAYER: usize = 12;
/// Offsets inside a block.
pub const LN1_W: usize = 0;
pub const LN1_B: usize = 1;
pub const QKV_W: usize = 2;
pub const QKV_B: usize = 3;
pub const PROJ_W: usize = 4;
pub const PROJ_B: usize = 5;
pub const LN2_W: usize = 6;
pub const LN2_B: usize = 7;
pub const FC_W: usize = 8;
pub const FC_B: usize = 9;
pub const FCPROJ_W: usize = 10;
pub const FCPROJ_B: usize = 11;
/// Global indices.
pub const WTE: usize = 0;
pub const WPE: usize = 1;
pub fn layer_param(l: usize, which: usize) -> usize {
    2 + l * PER_LAYER + which
}
pub fn lnf_w(cfg: &ModelConfig) -> usize {
    2 + cfg.n_layer * PER_LAYER
}

/// Parameters of the whole model (a tensor-parallel rank holds pieces of them).
pub fn whole_count(cfg: &ModelConfig) -> usize {
    specs(cfg).iter().map(ParamSpec::numel).sum()
}

/// All parameters in order: wte, wpe, the blocks, lnf. GPT-2 init: N(0, 0.02),
/// residual projections N(0, 0.02 / sqrt(2 * n_layer)), biases 0, LN weights 1.
pub fn specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let (c, v, t) = (cfg.n_embd, cfg.vocab_size, cfg.seq_len);
    let std = 0.02f32;
    let resid_std = std / ((2 * cfg.n_layer) as f32).sqrt();
    let p = |name: String, shape: Vec<usize>, kind, decay, init| ParamSpec { name, shape, kind, decay, init };
    let mut s = vec![
        p("wte".into(), vec![v, c], Kind::Other, true, Init::Normal(std)),
        p("wpe".into(), vec![t, c], Kind::Other, true, Init::Normal(std)),
    ];
    for l in 0..cfg.n_layer {
        let n = |x: &str| format!("h.{l}.{x}");
        s.push(p(n("ln_1.weight"), vec![c], Kind::Other, false, Init::Ones));
        s.push(p(n("ln_1.bias"), vec![c], Kind::Other, false, Init::Zeros));
        s.push(p(n("attn.qkv.weight"), vec![3 * c, c], Kind::LinearWeight, true, Init::Normal(std)));
        s.push(p(n("attn.qkv.bias"), vec![3 * c], Kind::Other, false, Init::Zeros));
        s.push(p(n("attn.proj.weight"), vec![c, c], Kind::LinearWeight, true, Init::Normal(resid_std)));
        s.push(p(n("attn.proj.bias"), vec![c], Kind::Other, false, Init::Zeros));
        s.push(p(n("ln_2.weight"), vec![c], Kind::Other, false, Init::Ones));
        s.push(p(n("ln_2.bias"), vec![c], Kind::Other, false, Init::Zeros));
        s.push(p(n("mlp.fc.weight"), vec![4 * c, c], Kind::LinearWeight, true, Init::Normal(std)));
        s.push(p(n("mlp.fc.bias"), vec![4 * c], Kind::Other, false, Init::Zeros));
        s.push(p(n("mlp.proj.weight"), vec![c, 4 * c], Kind::LinearWeight, true, Init::Normal(resid_std)));
        s.push(p(n("mlp.proj.bias"), vec![c], Kind::Other, false, Init::Zeros));
    }
    s.push(p("ln_f.weight".into(), vec![c], Kind::Other, false, Init::Ones));
    s.push(p("ln_f.bias".into(), vec![c], Kind::Other, false, Init::Zeros));
    s
}

/// RNG stream tag of parameter init.
pub const INIT_TAG: u16 = 1;

/// Initial values of parameter `idx` (counter-based: independent of order and threads).
pub fn init_values(spec: &ParamSpec, seed: u64, idx: usize) -> Vec<f32> {
    init_runs(spec, seed, idx, &[(0, spec.numel())])
}

/// The initial values of the elements of parameter `idx` in `runs` ((first element,
/// length) of the whole tensor, one after another: a tensor-parallel piece, see
/// `shard::piece_runs`), each element drawn by its index in the whole tensor, so a
/// piece gets the values of that piece of the whole tensor without the whole tensor
/// being made.
pub fn init_runs(spec: &ParamSpec, seed: u64, idx: usize, runs: &[(usize, usize)]) -> Vec<f32> {
    let mut v = vec![0f32; runs.iter().map(|r| r.1).sum()];
    let mut at = 0;
    for &(first, len) in runs {
        let out = &mut v[at..at + len];
        match spec.init {
            Init::Normal(std) => {
                rng::fill_normal(seed, rng::stream(INIT_TAG, 0, idx as u32), first as u64, 0.0, std, out)
            }
            Init::Zeros => {}
            Init::Ones => out.fill(1.0),
        }
        at += len;
    }
    v
}

/// Master weights.
pub enum Master<B: Backend> {
    F32(B::Buf<f32>),
    /// FP16 codes with their scale (`[1/scale, scale]` on the device: value = code / scale).
    F16 {
        codes: B::Buf<f16>,
        scale: B::Buf<f32>,
    },
    /// O3, owned by another rank: this rank holds only the compute copy it receives
    /// each step (FP8 for linear weights, FP16 for the others).
    Remote,
}

/// A scale as the device keeps it: `[1/scale, scale]` (1/scale exact: a power of two;
/// first, where the products read it: see `backend::ScaleSlot`).
pub fn scale_pair<B: Backend>(be: &B, scale: f32) -> BResult<B::Buf<f32>> {
    be.upload(&[1.0 / scale, scale])
}

/// The scale of a `[1/scale, scale]` pair (a read-back: checkpoints, reports).
pub fn read_scale<B: Backend>(be: &B, pair: &B::Buf<f32>) -> BResult<f32> {
    Ok(be.download(pair)?[1])
}

/// Stored gradient (between backward and the optimizer step).
pub enum GradStore<B: Backend> {
    F32(B::Buf<f32>),
    /// E4M3 codes with a just-in-time scale (`[1/scale, scale]` on the device, where
    /// the cast that made the codes stored it).
    Fp8 {
        codes: B::Buf<u8>,
        scale: B::Buf<f32>,
    },
}

/// Adam moments.
pub enum Moments<B: Backend> {
    F32 {
        m: B::Buf<f32>,
        v: B::Buf<f32>,
    },
    /// E4M3 first moment, FP16 second moment, each with a scale (`scales`: m's
    /// `[1/scale, scale]`, then v's, on the device where AdamW keeps them).
    Scaled {
        m: B::Buf<u8>,
        v: B::Buf<f16>,
        scales: B::Buf<f32>,
    },
    /// O3, owned by another rank.
    Remote,
}

/// One parameter: spec + all its persistent state.
pub struct Param<B: Backend> {
    pub spec: ParamSpec,
    /// Rank holding the master and optimizer state (O3); this rank otherwise.
    pub owner: usize,
    pub master: Master<B>,
    pub grad: GradStore<B>,
    pub moments: Moments<B>,
}

impl<B: Backend> Param<B> {
    /// Allocate the storage of `level` holding `values` as master weights; with O3 a
    /// parameter owned by another rank holds no master and no optimizer state.
    pub fn new(be: &B, spec: ParamSpec, level: Level, values: &[f32], owner: usize, rank: usize) -> BResult<Self> {
        Ok({
            let n = spec.numel();
            if level == Level::O3 && owner != rank {
                return Ok(Param {
                    spec,
                    owner,
                    master: Master::Remote,
                    grad: GradStore::Fp8 { codes: be.zeros(n)?, scale: scale_pair(be, 1.0)? },
                    moments: Moments::Remote,
                });
            }
            let master = match level {
                Level::Bf16 => Master::F32(be.upload(values)?),
                Level::O1 | Level::O2 | Level::O3 => {
                    let x = be.upload(values)?;
                    let scale = fp8sim::scaling::scale_for_max(fp8sim::scaling::F16_MAX, be.amax(&x)?, 0, 1.0);
                    let mut codes = be.zeros::<f16>(n)?;
                    be.cast_f16(&mut codes, &x, scale)?;
                    Master::F16 { codes, scale: scale_pair(be, scale)? }
                }
            };
            let grad = match level {
                Level::Bf16 => GradStore::F32(be.zeros(n)?),
                _ => GradStore::Fp8 { codes: be.zeros(n)?, scale: scale_pair(be, 1.0)? },
            };
            let moments = match level {
                Level::Bf16 | Level::O1 => Moments::F32 { m: be.zeros(n)?, v: be.zeros(n)? },
                Level::O2 | Level::O3 => {
                    Moments::Scaled { m: be.zeros(n)?, v: be.zeros(n)?, scales: be.upload(&[1.0; 4])? }
                }
            };
            Param { spec, owner, master, grad, moments }
        })
    }

    /// Bytes of persistent state (weights + gradient + optimizer) and of scale metadata.
    /// A remote (O3) parameter counts its compute copy: 1 byte per element for FP8
    /// linear weights, 2 for the FP16 others.
    pub fn bytes(&self, be: &B) -> (usize, usize) {
        let mut data = 0;
        let mut meta = 0;
        match &self.master {
            Master::Remote => {
                data += self.spec.numel() * if self.spec.kind == Kind::LinearWeight { 1 } else { 2 };
                meta += 4;
            }
            Master::F32(b) => data += 4 * be.len(b),
            Master::F16 { codes, .. } => {
                data += 2 * be.len(codes);
                meta += 4;
            }
        }
        match &self.grad {
            GradStore::F32(b) => data += 4 * be.len(b),
            GradStore::Fp8 { codes, .. } => {
                data += be.len(codes);
                meta += 4;
            }
        }
        match &self.moments {
            Moments::F32 { m, v } => data += 4 * (be.len(m) + be.len(v)),
            Moments::Scaled { m, v, .. } => {
                data += be.len(m) + 2 * be.len(v);
                meta += 8;
            }
            Moments::Remote => {}
        }
        (data, meta)
    }

    /// Bytes of optimizer state alone (masters + moments), the part ZeRO shards.
    pub fn optimizer_bytes(&self, be: &B) -> usize {
        let master = match &self.master {
            Master::F32(b) => 4 * be.len(b),
            Master::F16 { codes, .. } => 2 * be.len(codes),
            Master::Remote => 0,
        };
        master
            + match &self.moments {
                Moments::F32 { m, v } => 4 * (be.len(m) + be.len(v)),
                Moments::Scaled { m, v, .. } => be.len(m) + 2 * be.len(v),
                Moments::Remote => 0,
            }
    }

    /// The master weights as f32 values (None for a remote O3 parameter).
    pub fn master_f32(&self, be: &B) -> BResult<Option<Vec<f32>>> {
        Ok(match &self.master {
            Master::F32(b) => Some(be.download(b)?),
            Master::F16 { codes, scale } => {
                let inv = be.download(scale)?[0];
                Some(be.download(codes)?.iter().map(|h| h.to_f32() * inv).collect())
            }
            Master::Remote => None,
        })
    }
}
