//! The collectives trait on NCCL (host slices in and out, NCCL moving the bytes
//! between GPUs): the NCCL implementation that `fp8cluster::check` verifies alongside
//! the MPI one. The training step's gradient reduction uses NCCL on device buffers
//! directly (`Cuda::reduce_grad_*`).

use super::Cuda;
use crate::backend::{BResult, Backend, BackendError};
use cudarc::nccl::ReduceOp;
use fp8cluster::world::Equivalence;
use fp8cluster::world::{Collectives, World};

/// NCCL over the ranks of `world` (the communicator is made once, as for training).
pub struct NcclCollectives<'a> {
    pub cuda: &'a Cuda,
    pub world: &'a World,
}

fn bytes<T: bytemuck::Pod>(x: &[T]) -> &[u8] {
    bytemuck::cast_slice(x)
}
fn bytes_mut<T: bytemuck::Pod>(x: &mut [T]) -> &mut [u8] {
    bytemuck::cast_slice_mut(x)
}

impl Collectives for NcclCollectives<'_> {
    fn rank(&self) -> usize {
        self.world.rank
    }
    fn size(&self) -> usize {
        self.world.size
    }
    fn barrier(&self) {
        let mut one = [0f32];
        self.all_reduce_max(&mut one);
    }
    fn broadcast<T: Equivalence + bytemuck::Pod>(&self, buf: &mut [T], root: usize) {
        let r = (|| {
            let comm = self.cuda.comm(self.world)?;
            let mut dev = self.cuda.upload(bytes(buf))?;
            comm.broadcast_in_place(&mut dev, root as i32)
                .map_err(|e| BackendError::new("NCCL broadcast", format!("{e:?}")))?;
            self.cuda.download(&dev)
        })();
        bytes_mut(buf).copy_from_slice(&self.must(r));
    }
    fn all_gather<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]) {
        let r = (|| {
            let comm = self.cuda.comm(self.world)?;
            let dev = self.cuda.upload(bytes(send))?;
            let mut out = self.cuda.zeros::<u8>(std::mem::size_of_val(recv))?;
            comm.all_gather(&dev, &mut out).map_err(|e| BackendError::new("NCCL all-gather", format!("{e:?}")))?;
            self.cuda.download(&out)
        })();
        bytes_mut(recv).copy_from_slice(&self.must(r));
    }
    fn all_to_all<T: Equivalence + bytemuck::Pod>(&self, send: &[T], recv: &mut [T]) {
        let r = (|| {
            let comm = self.cuda.comm(self.world)?;
            let dev = self.cuda.upload(bytes(send))?;
            let chunk = std::mem::size_of_val(send) / self.world.size;
            let out = self.cuda.all_to_all(comm, &dev, chunk)?;
            self.cuda.download(&out)
        })();
        bytes_mut(recv).copy_from_slice(&self.must(r));
    }
    fn all_reduce_max(&self, buf: &mut [f32]) {
        let r = (|| {
            let comm = self.cuda.comm(self.world)?;
            let dev = self.cuda.upload(buf)?;
            let mut out = self.cuda.zeros::<f32>(buf.len())?;
            comm.all_reduce(&dev, &mut out, &ReduceOp::Max)
                .map_err(|e| BackendError::new("NCCL all-reduce", format!("{e:?}")))?;
            self.cuda.download(&out)
        })();
        buf.copy_from_slice(&self.must(r));
    }
}

impl NcclCollectives<'_> {
    /// The collectives interface has no error path: a device or NCCL error stops every
    /// rank, naming this one and the op.
    fn must<T>(&self, r: BResult<T>) -> T {
        r.unwrap_or_else(|e| self.world.abort(&e.to_string()))
    }
}
