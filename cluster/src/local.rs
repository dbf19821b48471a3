//! Ranks as threads of one process: a [`Collectives`] group whose members exchange
//! through shared memory, with the same results (same rank order, same sums) as the
//! MPI groups. For testing what runs over a group (tensor-parallel layers, the
//! contract's reductions) in `cargo test`, without mpirun; every member must make the
//! same calls in the same order, as with MPI.

use crate::world::Collectives;
use mpi::datatype::Equivalence;
use std::sync::{Arc, Barrier, Mutex};

struct Shared {
    barrier: Barrier,
    /// One byte buffer per rank: what it contributes to the collective under way.
    slots: Mutex<Vec<Vec<u8>>>,
}

/// One member of a group of threads (see [`local_group`]).
pub struct LocalRank {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

/// A group of `size` members, one per thread that will run it.
pub fn local_group(size: usize) -> Vec<LocalRank> {
    assert!(size > 0, "a group needs a member");
    let shared = Arc::new(Shared { barrier: Barrier::new(size), slots: Mutex::new(vec![Vec::new(); size]) });
    (0..size).map(|rank| LocalRank { rank, size, shared: shared.clone() }).collect()
}

/// Run `f` on every member of a group of `size`, each on its own thread; the results
/// in rank order.
pub fn run_group<R: Send>(size: usize, f: impl Fn(&LocalRank) -> R + Sync) -> Vec<R> {
    let group = local_group(size);
    std::thread::scope(|s| {
        let handles: Vec<_> = group.iter().map(|g| s.spawn(|| f(g))).collect();
        handles.into_iter().map(|h| h.join().expect("a group member panicked")).collect()
    })
}

impl LocalRank {
    /// Publish `bytes` as this rank's contribution, wait for everyone's, read them with
    /// `read` (every rank's bytes in rank order), then wait again so that the slots can
    /// be reused by the next collective.
    fn exchange(&self, bytes: &[u8], read: impl FnOnce(&[Vec<u8>])) {
        self.shared.slots.lock().expect("slots")[self.rank] = bytes.to_vec();
        self.shared.barrier.wait();
        {
            let slots = self.shared.slots.lock().expect("slots");
            read(&slots);
        }
        self.shared.barrier.wait();
    }
}

impl Collectives for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn barrier(&self) {
        self.shared.barrier.wait();
    }
    fn broadcast<T: Equivalence + bytemuck::Pod>(&self, buf: &mut [T], root: usize) {
        let mine: &[u8] = if self.rank == root { bytemuck::cast_slice(buf) } else { &[] };
        let mine = mine.to_vec();
        self.exchange(&mine, |all| {
            if self.rank != root {
                bytemuck::cast_slice_mut::<T, u8>(buf).copy_from_slice(&all[root]);
            }
        });
    }
    fn all_gather<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]) {
        assert_eq!(recv.len(), send.len() * self.size, "all_gather: buffer sizes");
        self.exchange(bytemuck::cast_slice(send), |all| {
            let out = bytemuck::cast_slice_mut::<T, u8>(recv);
            let k = std::mem::size_of_val(send);
            for (r, bytes) in all.iter().enumerate() {
                out[r * k..(r + 1) * k].copy_from_slice(bytes);
            }
        });
    }
    fn all_to_all<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]) {
        assert_eq!(send.len(), recv.len(), "all_to_all: buffer sizes");
        assert!(send.len().is_multiple_of(self.size), "all_to_all: {} elements over {} ranks", send.len(), self.size);
        self.exchange(bytemuck::cast_slice(send), |all| {
            let out = bytemuck::cast_slice_mut::<T, u8>(recv);
            let k = std::mem::size_of_val(send) / self.size;
            for (r, bytes) in all.iter().enumerate() {
                // Chunk `self.rank` of rank r's send lands at place r.
                out[r * k..(r + 1) * k].copy_from_slice(&bytes[self.rank * k..(self.rank + 1) * k]);
            }
        });
    }
    fn all_reduce_max(&self, buf: &mut [f32]) {
        let mine = bytemuck::cast_slice::<f32, u8>(buf).to_vec();
        self.exchange(&mine, |all| {
            for (i, x) in buf.iter_mut().enumerate() {
                for bytes in all {
                    let v: f32 = bytemuck::cast_slice::<u8, f32>(bytes)[i];
                    // As MPI's MAX: a NaN on any rank is not guaranteed to win; the
                    // contract's callers send non-finite values as infinity (tp.rs).
                    if v > *x {
                        *x = v;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_of_threads_give_rank_ordered_results() {
        let out = run_group(3, |g| {
            let r = g.rank() as u32;
            let mut gathered = vec![0u32; 6];
            g.all_gather(&[10 * r, 10 * r + 1], &mut gathered);
            let mut b = if r == 1 { vec![7u32, 8] } else { vec![0, 0] };
            g.broadcast(&mut b, 1);
            let send: Vec<u32> = (0..3).map(|k| 100 * r + k).collect();
            let mut a2a = vec![0u32; 3];
            g.all_to_all(&send, &mut a2a);
            let mut mx = vec![r as f32, -(r as f32)];
            g.all_reduce_max(&mut mx);
            let mut rs = vec![0f32; 1];
            g.reduce_scatter_sum(&[1.0 + r as f32, 2.0, 3.0], &mut rs);
            (gathered, b, a2a, mx, rs)
        });
        for (r, (gathered, b, a2a, mx, rs)) in out.into_iter().enumerate() {
            assert_eq!(gathered, vec![0, 1, 10, 11, 20, 21]);
            assert_eq!(b, vec![7, 8]);
            let r32 = r as u32;
            assert_eq!(a2a, vec![r32, 100 + r32, 200 + r32], "rank {r}: chunk r of every rank, in rank order");
            assert_eq!(mx, vec![2.0, 0.0]);
            let want = [1.0 + 2.0 + 3.0, 6.0, 9.0][r];
            assert_eq!(rs, vec![want], "rank {r}: its chunk summed over ranks");
        }
    }

    #[test]
    fn the_fp8_tensor_parallel_collectives_match_their_definitions_on_threads() {
        use crate::tp::{all_gather_fp8, reduce_scatter_fp8};
        use fp8sim::fp8::{decode, encode_scaled, Fp8Format};
        use fp8sim::scaling::scale_from_amax;
        let shards: Vec<Vec<f32>> = (0..4).map(|r| (0..8).map(|i| (r * 8 + i) as f32 * 0.37 - 5.0).collect()).collect();
        let out = run_group(4, |g| all_gather_fp8(g, &shards[g.rank()], Fp8Format::E4M3, 1.0));
        // Definition: one scale from the largest |x| anywhere, every shard cast with it.
        let all: Vec<f32> = shards.concat();
        let amax = all.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = scale_from_amax(Fp8Format::E4M3, amax, 0, 1.0);
        let mut want = vec![0u8; all.len()];
        encode_scaled(Fp8Format::E4M3, &all, scale, &mut want);
        for (codes, s, _) in &out {
            assert_eq!((codes, *s), (&want, scale));
        }
        // Reduce-scatter: chunk r of every rank's partial, decoded with that rank's
        // scale, summed in rank order from +0.
        let partial: Vec<Vec<f32>> =
            (0..2).map(|r| (0..6).map(|i| (i as f32 - 2.5) * (r as f32 + 1.0)).collect()).collect();
        let got = run_group(2, |g| {
            let mut o = vec![0f32; 3];
            reduce_scatter_fp8(g, &partial[g.rank()], Fp8Format::E4M3, &mut o);
            o
        });
        for (r, o) in got.iter().enumerate() {
            for (i, v) in o.iter().enumerate() {
                let mut acc = 0f32;
                for p in &partial {
                    let a = p.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let s = scale_from_amax(Fp8Format::E4M3, a, 0, 1.0);
                    let mut q = [0u8];
                    encode_scaled(Fp8Format::E4M3, &[p[r * 3 + i]], s, &mut q);
                    acc += decode(Fp8Format::E4M3, q[0]) * (1.0 / s);
                }
                assert_eq!(v.to_bits(), acc.to_bits(), "rank {r} element {i}");
            }
        }
    }
}
