//! The subcommands, one module each (`train`, `eval`, `sample`, `report`, `topo`,
//! `verify`, `bench train`; the other benchmarks live in `bench`), and what they share.

pub mod bench_train;
pub mod eval;
pub mod report;
pub mod sample;
pub mod topo;
pub mod train;
pub mod verify;

use crate::backend::Backend;
use crate::model::memory;
use crate::train::config::Config;

/// Refuse, before allocating, a run that cannot fit in the backend's memory.
pub(crate) fn fits<B: Backend>(be: &B, cfg: &Config, ranks: usize, what: &str) -> Result<(), String> {
    let t = &cfg.train;
    memory::check(be, &cfg.model, t.level, t.recompute, ranks, t.tp, t.batch_size, what).map(|_| ())
}

/// The CUDA device of local rank `rank`: device `rank`, or the one `FP8TRAIN_CUDA_DEVICE`
/// names for every rank (several ranks on one GPU, to check multi-rank numerics on a
/// one-GPU machine: host-staged collectives work so, NCCL refuses two ranks of one
/// communicator on one device).
pub(crate) fn cuda_device(rank: usize) -> Result<usize, String> {
    match std::env::var("FP8TRAIN_CUDA_DEVICE") {
        Ok(v) => v.trim().parse().map_err(|_| format!("FP8TRAIN_CUDA_DEVICE = {v:?} is not a device number")),
        Err(_) => Ok(rank),
    }
}
