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
