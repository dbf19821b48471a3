//! Data-parallel helpers over rayon's current pool. Work is split into fixed-size
//! chunks that each produce their own outputs, so results never depend on the
//! number of threads.

use rayon::prelude::*;

/// Elements per parallel task for element-wise ops.
pub const CHUNK: usize = 1 << 14;

/// Run `f` over matching chunks of `src` and `dst` (same length), in parallel when
/// the slices are large.
pub fn for_chunks2<S: Sync, D: Send>(src: &[S], dst: &mut [D], f: impl Fn(&[S], &mut [D]) + Sync) {
    debug_assert_eq!(src.len(), dst.len());
    if src.len() <= CHUNK {
        f(src, dst);
    } else {
        src.par_chunks(CHUNK).zip(dst.par_chunks_mut(CHUNK)).for_each(|(s, d)| f(s, d));
    }
}

/// Run `f` over chunks of `dst` with the chunk's start offset, in parallel when large.
pub fn for_chunks_mut<D: Send>(dst: &mut [D], f: impl Fn(usize, &mut [D]) + Sync) {
    if dst.len() <= CHUNK {
        f(0, dst);
    } else {
        dst.par_chunks_mut(CHUNK).enumerate().for_each(|(i, d)| f(i * CHUNK, d));
    }
}
