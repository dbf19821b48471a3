//! Benchmarks: each prints its figures next to a baseline measured in the same run.

pub mod comm;
pub mod fit;
pub mod gemm;
pub mod kernels;
pub mod report;
pub mod step;

use std::time::{Duration, Instant};

/// Run `f` at least `min_runs` times and for at least `min_time`; the median time.
pub fn median_time(min_runs: usize, min_time: Duration, mut f: impl FnMut()) -> Duration {
    f(); // warm-up (page faults, packing buffers, thread start)
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_runs || start.elapsed() < min_time {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}
