//! The CPU implementation of every op. One op = one file here, one
//! `kernels/<op>.cu` with the same name, one cross-backend test.

pub mod cast_transpose;
pub mod gemm;
