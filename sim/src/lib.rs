//! `fp8sim`: fp8train's numerics contract in executable form.
//!
//! Everything here is pure Rust, deterministic, and independent of the thread count:
//! the CUDA kernels in `kernels/` follow the same operation order, so the simulator
//! is the reference every GPU result is checked against (bit for bit for the
//! `exact` class of ops). The contract itself is written down in the repository's
//! `ARCHITECTURE.md`.

pub mod fp8;
pub mod half16;
pub mod math;
pub mod ops;
pub mod par;
pub mod reduce;
pub mod rng;
pub mod scaling;

pub use fp8::Fp8Format;
pub use scaling::{DelayedScaling, ScaledTensor, ScalingConfig};
