//! The GPT-2 model on the backend interface: parameters and their storage per
//! precision level, FP8/BF16 linear layers, forward and backward (llm.c style).

pub mod config;
pub mod gpt;
pub mod linear;
pub mod memory;
pub mod params;
pub mod shard;
pub mod tp;

pub use config::{Level, ModelConfig, Recompute};
pub use gpt::Gpt;
