//! `fp8train`: the runtime of one rank — backends, model, training loop, data,
//! checkpoints, benchmarks and the command line. The numerics live in `fp8sim`,
//! everything between processes and machines in `fp8cluster`.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod cmd;
pub mod data;
pub mod logging;
pub mod model;
pub mod train;
