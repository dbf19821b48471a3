//! Model shape and precision level.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// GPT-2 architecture sizes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub seq_len: usize,
    pub vocab_size: usize,
}

impl Default for ModelConfig {
    /// The embedded default: a small byte-level GPT that trains in the simulator.
    fn default() -> Self {
        ModelConfig { n_layer: 2, n_embd: 64, n_head: 4, seq_len: 64, vocab_size: 256 }
    }
}

impl ModelConfig {
    /// Check ranges; errors name the field and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        let range = |name: &str, v: usize, lo: usize, hi: usize| {
            if v < lo || v > hi {
                Err(format!("model.{name} = {v} is out of range (allowed {lo}..={hi})"))
            } else {
                Ok(())
            }
        };
        range("n_layer", self.n_layer, 1, 256)?;
        range("n_embd", self.n_embd, 8, 16384)?;
        range("n_head", self.n_head, 1, 256)?;
        range("seq_len", self.seq_len, 2, 65536)?;
        range("vocab_size", self.vocab_size, 2, 1 << 20)?;
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!("model.n_embd = {} must be divisible by model.n_head = {}", self.n_embd, self.n_head));
        }
        Ok(())
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }
}

/// Precision level (what `--level` selects); see ARCHITECTURE.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
pub enum Level {
    /// BF16 linear layers, f32 masters and moments.
    #[serde(rename = "bf16")]
    #[value(name = "bf16")]
    Bf16,
    /// FP8 products and weight gradients, FP16 masters, f32 moments.
    #[value(name = "O1")]
    O1,
    /// O1 with the FP8/FP16 Adam (6 bytes per parameter).
    #[value(name = "O2")]
    O2,
    /// O2 with masters and optimizer state sharded over data-parallel ranks (ZeRO).
    #[value(name = "O3")]
    O3,
}

impl Level {
    /// The levels a single process runs (O3 needs several ranks to mean anything).
    pub const ALL: [Level; 3] = [Level::Bf16, Level::O1, Level::O2];

    /// FP8 linear layers?
    pub fn fp8(self) -> bool {
        self != Level::Bf16
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Bf16 => "bf16",
            Level::O1 => "O1",
            Level::O2 => "O2",
            Level::O3 => "O3",
        })
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" | "BF16" => Ok(Level::Bf16),
            "O1" | "o1" => Ok(Level::O1),
            "O2" | "o2" => Ok(Level::O2),
            "O3" | "o3" => Ok(Level::O3),
            other => Err(format!("unknown level '{other}' (allowed: bf16, O1, O2, O3)")),
        }
    }
}

/// What the backward pass recomputes instead of keeping from the forward pass
/// (`train.recompute`). Recomputation gives the same bits (the same operations on the
/// same inputs); it trades time for activation memory.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every saved activation.
    #[default]
    None,
    /// GELU's output (the MLP projection's input, FP8 or BF16): recomputed from the
    /// stored pre-activation before each layer's MLP backward (a table lookup per
    /// value), one buffer for all layers instead of one per layer.
    Gelu,
    /// The linear layers' saved inputs (both layernorms' outputs, the attention output
    /// and its cast, GELU's output) and the attention output itself: recomputed before
    /// each branch's backward (layernorm and GELU from what the block keeps, attention's
    /// forward again from the kept QKV), into buffers shared by all blocks.
    Cheap,
    /// Everything of a block but its output: the backward pass runs each block's forward
    /// again from its input (the previous block's output) just before the block's
    /// backward, into one set of buffers for all blocks (the MLP projection's product,
    /// whose output the backward does not read, is skipped).
    Full,
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Recompute::None => "none",
            Recompute::Gelu => "gelu",
            Recompute::Cheap => "cheap",
            Recompute::Full => "full",
        })
    }
}
