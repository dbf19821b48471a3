//! The processes of a run: MPI bootstrap (through rsmpi) when launched by `mpirun`,
//! a world of one otherwise; node-local ranks; the data x tensor-parallel grid;
//! agreement checks; and the collectives every backend's gradient path uses.
//!
//! All reductions that add numbers do it in rank order on the receiving side (never
//! MPI's own reduction order), so results are identical run to run and equal to the
//! simulator's on GPUs.

use mpi::collective::SystemOperation;
pub use mpi::datatype::Equivalence;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Was this process started by an MPI launcher?
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

struct Mpi {
    _universe: mpi::environment::Universe,
    world: SimpleCommunicator,
}

/// This process's place in the run.
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// Rank among the processes of this node, and how many there are.
    pub local_rank: usize,
    pub local_size: usize,
    /// Grid: tensor-parallel size (innermost, inside a node) and data-parallel size.
    pub tp: usize,
    pub dp: usize,
    mpi: Option<Mpi>,
    /// How long a collective may wait for the other ranks, and the current step (for
    /// messages).
    timeout: Cell<Duration>,
    step: Cell<u64>,
}

impl World {
    /// A world of one (no MPI).
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
            tp: 1,
            dp: 1,
            mpi: None,
            timeout: Cell::new(Duration::from_secs(30)),
            step: Cell::new(0),
        }
    }

    /// Join the run: MPI when launched by mpirun, else a world of one.
    pub fn init(tp: usize) -> Result<World, String> {
        let mut w = if launched_by_mpi() {
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .ok_or("MPI was already initialised in this process")?;
            let world = universe.world();
            let local = world.split_shared(world.rank());
            World {
                rank: world.rank() as usize,
                size: world.size() as usize,
                local_rank: local.rank() as usize,
                local_size: local.size() as usize,
                tp: 1,
                dp: 1,
                mpi: Some(Mpi { _universe: universe, world }),
                timeout: Cell::new(Duration::from_secs(30)),
                step: Cell::new(0),
            }
        } else {
            World::single()
        };
        w.set_grid(tp)?;
        Ok(w)
    }

    /// Set the grid: tensor-parallel size `tp` (groups of `tp` consecutive ranks, inside
    /// one node) and data parallel over the rest. An error names what does not divide.
    pub fn set_grid(&mut self, tp: usize) -> Result<(), String> {
        let tp = tp.max(1);
        if !self.local_size.is_multiple_of(tp) || !self.size.is_multiple_of(tp) {
            return Err(format!(
                "--tp {tp} (train.tp) does not divide the {} rank(s) of this node ({} in all): tensor-parallel \
                 groups are {tp} consecutive ranks of one node; launch a multiple of {tp} ranks per node \
                 (mpirun -np N) or choose another --tp",
                self.local_size, self.size
            ));
        }
        self.tp = tp;
        self.dp = self.size / tp;
        Ok(())
    }

    /// How long any collective waits for the other ranks before the run stops.
    pub fn set_timeout(&self, t: Duration) {
        self.timeout.set(t);
    }

    /// The step being run (named in fault messages).
    pub fn set_step(&self, s: u64) {
        self.step.set(s);
    }

    fn comm(&self) -> Option<&SimpleCommunicator> {
        self.mpi.as_ref().map(|m| &m.world)
    }

    /// Stop every rank (MPI_Abort) after printing `why`; in a world of one, exit.
    pub fn abort(&self, why: &str) -> ! {
        eprintln!("fp8train rank {}: {why}", self.rank);
        match self.comm() {
            Some(c) => c.abort(3),
            None => std::process::exit(3),
        }
    }

    /// Check that every rank holds the same `value` for `what` (config hash, binary
    /// version, ...); the error names the ranks that differ from rank 0.
    pub fn check_same(&self, what: &str, value: u64) -> Result<(), String> {
        let all = self.all_gather_vec(&[value]);
        let odd: Vec<String> =
            all.iter().enumerate().filter(|(_, &v)| v != all[0]).map(|(r, v)| format!("rank {r} ({v:016x})")).collect();
        if odd.is_empty() {
            Ok(())
        } else {
            Err(format!("ranks disagree on the {what}: rank 0 has {:016x}, but {}", all[0], odd.join(", ")))
        }
    }

    /// All ranks' `send` slices, concatenated in rank order.
    pub fn all_gather_vec<T: Equivalence + bytemuck::Pod + Default>(&self, send: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); send.len() * self.size];
        self.all_gather(send, &mut out);
        out
    }

    /// Check in with every peer before `step`, waiting at most `timeout`; a silent peer
    /// stops the run with a message naming it.
    pub fn heartbeat(&self, step: u64, timeout: Duration) {
        self.set_step(step);
        self.roll_call(77, step, timeout, &format!("before step {}", step + 1));
    }

    /// Exchange `value` with every peer on `tag` (non-blocking, polled until
    /// `timeout`); if anyone stays silent, stop the run naming them. (It never leaves
    /// unfinished requests behind: it aborts inside the request scope.)
    fn roll_call(&self, tag: i32, value: u64, timeout: Duration, context: &str) {
        let Some(c) = self.comm() else { return };
        let me = [value];
        let mut got = vec![[u64::MAX]; self.size];
        let deadline = Instant::now() + timeout;
        mpi::request::scope(|scope| {
            let mut recvs: Vec<_> = got
                .iter_mut()
                .enumerate()
                .filter(|(r, _)| *r != self.rank)
                .map(|(r, slot)| {
                    (r, Some(c.process_at_rank(r as i32).immediate_receive_into_with_tag(scope, slot, tag)))
                })
                .collect();
            let mut sends: Vec<_> = (0..self.size)
                .filter(|&r| r != self.rank)
                .map(|r| Some(c.process_at_rank(r as i32).immediate_send_with_tag(scope, &me, tag)))
                .collect();
            loop {
                for (_, req) in recvs.iter_mut() {
                    if let Some(q) = req.take() {
                        *req = q.test().err();
                    }
                }
                for req in sends.iter_mut() {
                    if let Some(q) = req.take() {
                        *req = q.test().err();
                    }
                }
                let waiting: Vec<usize> = recvs.iter().filter(|(_, q)| q.is_some()).map(|(r, _)| *r).collect();
                if waiting.is_empty() && sends.iter().all(Option::is_none) {
                    return;
                }
                if Instant::now() > deadline {
                    let names: Vec<String> = waiting.iter().map(|r| format!("rank {r}")).collect();
                    let who = if names.is_empty() { "a peer".to_string() } else { names.join(", ") };
                    self.abort(&format!(
                        "{who} did not answer within {} s ({context}); stopping the run",
                        timeout.as_secs_f64()
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    }

    /// Poll a collective until it completes; past the timeout, find out who is silent
    /// (a roll call every live rank joins when its own wait times out) and stop the run
    /// naming them.
    fn wait<'a, D: ?Sized, S: mpi::request::Scope<'a>>(&self, mut req: mpi::request::Request<'a, D, S>, what: &str) {
        let deadline = Instant::now() + self.timeout.get();
        let mut spins = 0u32;
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if Instant::now() > deadline {
                std::mem::forget(req);
                // Every live rank stuck here joins this roll call when its own wait
                // times out; whoever does not is named.
                let window = self.timeout.get().min(Duration::from_secs(10));
                self.roll_call(78, self.step.get(), window, &format!("{what}, step {}", self.step.get() + 1));
                self.abort(&format!("{what} at step {} made no progress", self.step.get() + 1));
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

/// The collectives of the gradient path, over typed buffers. The MPI implementation
/// serves the simulator; the NCCL one will serve GPUs.
pub trait Collectives {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    fn barrier(&self);
    /// `buf` from rank `root` to all.
    fn broadcast<T: Equivalence + bytemuck::Pod>(&self, buf: &mut [T], root: usize);
    /// Every rank's `send` (same length everywhere) into `recv`, in rank order.
    fn all_gather<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]);
    /// Chunk r of `send` goes to rank r; `recv` holds the chunks from every rank in
    /// rank order (equal chunk sizes).
    fn all_to_all<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]);
    /// Elementwise maximum (order-free).
    fn all_reduce_max(&self, buf: &mut [f32]);
    /// Chunk r of `send` summed over ranks in rank order lands on rank r (`recv` is
    /// one chunk): all-to-all, then add ranks 0, 1, ...
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) {
        let k = recv.len();
        assert_eq!(send.len(), k * self.size(), "reduce_scatter_sum: buffer sizes");
        let mut all = vec![0f32; send.len()];
        self.all_to_all(send, &mut all);
        for (i, out) in recv.iter_mut().enumerate() {
            let mut acc = 0f32;
            for r in 0..self.size() {
                acc += all[r * k + i];
            }
            *out = acc;
        }
    }
    /// Elementwise sum in rank order (deterministic): all-gather, then add ranks 0, 1, ...
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let all = {
            let mut v = vec![0f32; buf.len() * self.size()];
            self.all_gather(buf, &mut v);
            v
        };
        let n = buf.len();
        for (i, b) in buf.iter_mut().enumerate() {
            let mut acc = 0f32;
            for r in 0..self.size() {
                acc += all[r * n + i];
            }
            *b = acc;
        }
    }
}

/// A communicator the collectives run on (the whole world or a group of it), with the
/// world's timeout machinery.
struct On<'a> {
    w: &'a World,
    c: Option<&'a SimpleCommunicator>,
    size: usize,
}

impl On<'_> {
    fn barrier(&self) {
        if let Some(c) = self.c {
            self.w.wait(c.immediate_barrier(), "barrier");
        }
    }
    fn broadcast<T: Equivalence + bytemuck::Pod>(&self, buf: &mut [T], root: usize) {
        if let Some(c) = self.c {
            mpi::request::scope(|sc| {
                self.w.wait(c.process_at_rank(root as i32).immediate_broadcast_into(sc, buf), "broadcast")
            });
        }
    }
    fn all_gather<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]) {
        assert_eq!(recv.len(), send.len() * self.size, "all_gather: receive buffer size");
        match self.c {
            Some(c) => mpi::request::scope(|sc| self.w.wait(c.immediate_all_gather_into(sc, send, recv), "all-gather")),
            None => recv.copy_from_slice(send),
        }
    }
    fn all_to_all<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]) {
        assert!(send.len() == recv.len() && send.len().is_multiple_of(self.size), "all_to_all: buffer sizes");
        match self.c {
            Some(c) => mpi::request::scope(|sc| self.w.wait(c.immediate_all_to_all_into(sc, send, recv), "all-to-all")),
            None => recv.copy_from_slice(send),
        }
    }
    fn all_reduce_max(&self, buf: &mut [f32]) {
        if let Some(c) = self.c {
            let send = buf.to_vec();
            mpi::request::scope(|sc| {
                self.w.wait(c.immediate_all_reduce_into(sc, &send[..], buf, SystemOperation::max()), "all-reduce max")
            });
        }
    }
}

/// The collectives of `Collectives` on `$t`, through its `on()`.
macro_rules! collectives_via_on {
    ($t:ty) => {
        impl Collectives for $t {
            fn rank(&self) -> usize {
                self.rank
            }
            fn size(&self) -> usize {
                self.size
            }
            fn barrier(&self) {
                self.on().barrier()
            }
            fn broadcast<T: Equivalence + bytemuck::Pod>(&self, buf: &mut [T], root: usize) {
                self.on().broadcast(buf, root)
            }
            fn all_gather<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]) {
                self.on().all_gather(send, recv)
            }
            fn all_to_all<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]) {
                self.on().all_to_all(send, recv)
            }
            fn all_reduce_max(&self, buf: &mut [f32]) {
                self.on().all_reduce_max(buf)
            }
        }
    };
}

impl World {
    fn on(&self) -> On<'_> {
        On { w: self, c: self.comm(), size: self.size }
    }

    /// This rank's tensor-parallel group (the `tp` consecutive ranks tp * g .. that share
    /// a node) and data-parallel group (the ranks with the same place in their
    /// tensor-parallel group), each with its own communicator; ranks inside a group are
    /// numbered in world-rank order. Collective: every rank must call it.
    pub fn groups(&self) -> (Group<'_>, Group<'_>) {
        let split = |color: usize| {
            self.comm().map(|c| {
                c.split_by_color(mpi::topology::Color::with_value(color as i32)).expect("every rank passes a color")
            })
        };
        let (tp_comm, dp_comm) = (split(self.rank / self.tp), split(self.rank % self.tp));
        (
            Group { world: self, comm: tp_comm, rank: self.rank % self.tp, size: self.tp },
            Group { world: self, comm: dp_comm, rank: self.rank / self.tp, size: self.dp },
        )
    }
}

/// A group of the world's ranks with its own communicator (see [`World::groups`]); its
/// collectives add in the group's rank order, like the world's.
pub struct Group<'w> {
    world: &'w World,
    comm: Option<SimpleCommunicator>,
    /// This rank's place in the group, and the group's size.
    pub rank: usize,
    pub size: usize,
}

impl Group<'_> {
    fn on(&self) -> On<'_> {
        On { w: self.world, c: self.comm.as_ref(), size: self.size }
    }
}

collectives_via_on!(World);
collectives_via_on!(Group<'_>);

/// FNV-1a, for agreement checks (not security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_of_one() {
        let w = World::init(1).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.dp, w.tp), (0, 1, 0, 1, 1));
        let mut v = vec![1.0, 2.0];
        w.all_reduce_sum(&mut v);
        w.all_reduce_max(&mut v);
        assert_eq!(v, vec![1.0, 2.0]);
        let mut one = [0f32; 2];
        w.reduce_scatter_sum(&[3.0, 4.0], &mut one);
        assert_eq!(one, [3.0, 4.0]);
        assert_eq!(w.all_gather_vec(&[7u8]), vec![7]);
        w.check_same("config", 5).unwrap();
        w.heartbeat(3, Duration::from_secs(1));
        assert!(World::init(2).err().expect("tp 2 on one rank fails").contains("does not divide"));
        let (tp, dp) = w.groups();
        assert_eq!((tp.rank(), tp.size(), dp.rank(), dp.size()), (0, 1, 0, 1));
        let mut g = [0u32; 1];
        tp.all_gather(&[9u32], &mut g);
        assert_eq!(g, [9]);
    }
}
