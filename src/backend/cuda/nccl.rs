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

fn bytes<T: Copy>(x: &[T]) -> &[u8] {
    // SAFETY: T is a plain Copy value type (MPI-equivalent); viewing it as bytes is sound.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}
fn bytes_mut<T: Copy>(x: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; every byte pattern written back came from values of T.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut u8, std::mem::size_of_val(x)) }
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
    fn broadcast<T: Equivalence + Copy>(&self, buf: &mut [T], root: usize) {
        let r = (|| {
            let comm = self.cuda.comm(self.world)?;
            let mut dev = self.cuda.upload(bytes(buf))?;
            comm.broadcast_in_place(&mut dev, root as i32)
                .map_err(|e| BackendError::new("NCCL broadcast", format!("{e:?}")))?;
            self.cuda.download(&dev)
        })();
        bytes_mut(buf).copy_from_slice(&self.must(r));
    }
    fn all_gather<T: Equivalence + Copy>(&self, send: &[T], recv: &mut [T]) {
        let r = (|| {
            let comm = self.cuda.comm(self.world)?;
            let dev = self.cuda.upload(bytes(send))?;
            let mut out = self.cuda.zeros::<u8>(std::mem::size_of_val(recv))?;
            comm.all_gather(&dev, &mut out).map_err(|e| BackendError::new("NCCL all-gather", format!("{e:?}")))?;
            self.cuda.download(&out)
        })();
        bytes_mut(recv).copy_from_slice(&self.must(r));
    }
    fn all_to_all<T: Equivalence + Copy>(&self, send: &[T], recv: &mut [T]) {
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
