//! The distributed step: everything ranks exchange while training, in one place. Per
//! step: the compute weights at O3 (each tensor's owner sends its compute form), the
//! overflow decision and the mean loss (agreed by every rank), and the gradient
//! reduction (the contract's FP8 reduction or the rank-order f32 sum); per checkpoint:
//! the weights gathered from their owners and every shard's size and digest.
//!
//! Transports: the gradient reduction and the O3 weight exchange go through the backend
//! (NCCL on GPUs, device to device; the MPI collectives in the simulator); the
//! agreements, the few-byte scales and the checkpoint gathering (bound for a file on
//! the host anyway) use the world's host collectives (MPI).

use crate::backend::{self, BResult, Backend};
use crate::model::gpt::{BackwardStats, Workspace};
use crate::model::params::{self, GradStore, Param};
use crate::model::shard;
use crate::model::tp::TpPlace;
use crate::model::{Gpt, Level};
use fp8cluster::reduce::CommBytes;
use fp8cluster::world::{Collectives, Group, World};

/// This rank's place in the run's grid (`World::groups`): the world, its
/// tensor-parallel group (`world.tp` consecutive ranks) and its data-parallel group (the
/// ranks at the same place in their tensor-parallel groups). At tp = 1 the data-parallel
/// group is the world.
pub struct Grid<'w> {
    pub world: &'w World,
    pub tp: Group<'w>,
    pub dp: Group<'w>,
}

impl<'w> Grid<'w> {
    /// The groups of `world`'s grid. Collective: every rank calls it.
    pub fn new(world: &'w World) -> Grid<'w> {
        let (tp, dp) = world.groups();
        Grid { world, tp, dp }
    }

    /// This rank's place in its tensor-parallel group, as the model takes it.
    pub fn tp_place(&self) -> TpPlace {
        TpPlace { rank: self.tp.rank, size: self.tp.size }
    }
}

/// This step's compute weights on every rank: derived from the masters this rank holds,
/// then, at O3 with several data-parallel ranks, each tensor's compute form from its
/// owner in the data-parallel group (over the backend's transport at tp = 1, where the
/// group is the world; through host copies at tp > 1).
pub fn prepare_weights<B: Backend>(be: &B, model: &Gpt<B>, ws: &mut Workspace<B>, grid: &Grid<'_>) -> BResult<()> {
    model.prepare_weights(be, ws)?;
    if model.level == Level::O3 && grid.dp.size > 1 {
        let device = (grid.world.tp == 1).then_some(grid.world);
        model.share_weights(be, ws, &grid.dp, device)?;
    }
    Ok(())
}

/// Every rank of the data-parallel group `dp` takes the same decisions: an overflow
/// anywhere skips the step everywhere, and the loss is the mean of the ranks' losses
/// (the ranks of a tensor-parallel group agreed theirs already).
pub fn agree<C: Collectives>(dp: &C, st: &mut BackwardStats) {
    let mut flags = [if st.overflow { 1.0 } else { 0.0 }];
    dp.all_reduce_max(&mut flags);
    st.overflow = flags[0] > 0.0;
    let mut losses = [st.loss];
    dp.all_reduce_sum(&mut losses);
    st.loss = losses[0] / dp.size() as f32;
}

/// Every stored gradient summed over the data-parallel group (FP8 by the contract's
/// reduction, f32 in rank order), tensor by tensor; the bytes moved. At tp = 1 the
/// group is the world and the backend's own transport runs (NCCL on GPUs); the
/// data-parallel groups of a tensor-parallel run go through host copies for now.
pub fn reduce_gradients<B: Backend>(be: &B, grid: &Grid<'_>, params: &mut [Param<B>]) -> BResult<CommBytes> {
    let mut comm = CommBytes::default();
    if grid.dp.size == 1 {
        return Ok(comm);
    }
    let world = grid.world;
    for p in params.iter_mut() {
        comm += match (&mut p.grad, world.tp == 1) {
            (GradStore::Fp8 { codes, scale }, true) => be.reduce_grad_fp8(world, codes, scale)?,
            (GradStore::F32(g), true) => be.reduce_grad_f32(world, g)?,
            (GradStore::Fp8 { codes, scale }, false) => backend::reduce_grad_fp8_host(be, &grid.dp, codes, scale)?,
            (GradStore::F32(g), false) => backend::reduce_grad_f32_host(be, &grid.dp, g)?,
        };
    }
    Ok(comm)
}

/// Each parameter's whole f32 weights, in order, from its owner (all local below O3 or
/// on one rank) and, at tp > 1, from every piece of the tensor-parallel group `tp`
/// (rebuilt in rank order: `shard::gather_pieces`), handed to `take` one tensor at a
/// time on every rank of `world` (O3) or of `tp`.
pub fn gather_weights<B: Backend, C: Collectives, T: Collectives>(
    be: &B,
    model: &Gpt<B>,
    world: &C,
    tp: &T,
    mut take: impl FnMut(&Param<B>, Vec<f32>) -> Result<(), String>,
) -> Result<(), String> {
    let sharded = model.level == Level::O3 && world.size() > 1;
    let whole = params::specs(&model.cfg);
    for (i, p) in model.params.iter().enumerate() {
        let mut v = p.master_f32(be)?.unwrap_or_else(|| vec![0f32; p.spec.numel()]);
        if sharded {
            world.broadcast(&mut v, p.owner);
        }
        if tp.size() > 1 {
            v = shard::gather_pieces(tp, &v, &whole[i].shape, shard::split_of(&model.cfg, i));
        }
        take(p, v)?;
    }
    Ok(())
}

/// Every rank's (bytes, SHA-256) of its shard, in rank order.
pub fn gather_digests<C: Collectives>(world: &C, mine: (u64, [u8; 32])) -> Vec<(u64, [u8; 32])> {
    let mut digest = [0u8; 40];
    digest[..8].copy_from_slice(&mine.0.to_le_bytes());
    digest[8..].copy_from_slice(&mine.1);
    let mut all = vec![0u8; 40 * world.size()];
    world.all_gather(&digest, &mut all);
    all.chunks(40)
        .map(|d| {
            let bytes = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
            (bytes, d[8..].try_into().expect("32 bytes"))
        })
        .collect()
}
