//! The CPU implementation of every op. One op = one file here, one
//! `kernels/<op>.cu` with the same name, one cross-backend test.

pub mod adamw;
pub mod attention;
pub mod cast_transpose;
pub mod crossentropy;
pub mod encoder;
pub mod gelu;
pub mod gemm;
pub mod layernorm;

#[cfg(test)]
pub(crate) mod gradcheck;
