//! The stream-ordered memory pool: cudarc allocates with `cuMemAllocAsync` from the
//! device's default pool. By default that pool hands freed memory back to the driver at
//! every synchronisation, so a step's scratch buffers would be mapped again each step;
//! here it keeps what it has (release threshold: unlimited). Its high-water mark of
//! memory in use is the device-memory figure runs report.

use cudarc::driver::sys::{self, CUmemPool_attribute as Attr};
use cudarc::driver::CudaContext;
use std::sync::Arc;

pub struct Pool {
    pool: sys::CUmemoryPool,
}

fn check(r: sys::CUresult, what: &str) -> Result<(), String> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("CUDA memory pool: {what}: {r:?}"))
    }
}

impl Pool {
    /// The default pool of the context's device, set to keep freed memory.
    pub fn of_device(ctx: &Arc<CudaContext>) -> Result<Pool, String> {
        ctx.bind_to_thread().map_err(|e| format!("CUDA: {e}"))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: valid device handle and out-pointer.
        check(unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }, "default pool")?;
        let keep = u64::MAX;
        // SAFETY: the attribute takes a u64 (cuuint64_t).
        check(
            unsafe {
                sys::cuMemPoolSetAttribute(pool, Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &keep as *const u64 as *mut _)
            },
            "release threshold",
        )?;
        Ok(Pool { pool })
    }

    fn get(&self, attr: Attr) -> u64 {
        let mut v = 0u64;
        // SAFETY: the attribute is a u64.
        let r = unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _) };
        if r == sys::CUresult::CUDA_SUCCESS {
            v
        } else {
            0
        }
    }

    /// Bytes in use now.
    pub fn used(&self) -> u64 {
        self.get(Attr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// Most bytes in use at once since the start (or the last reset).
    pub fn high_water(&self) -> u64 {
        self.get(Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    /// Bytes the pool holds from the driver, at most, since the start (or the last reset).
    pub fn reserved_high_water(&self) -> u64 {
        self.get(Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)
    }

    /// Start the high-water marks again from what is in use now.
    pub fn reset_high_water(&self) {
        let zero = 0u64;
        for attr in [Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH] {
            // SAFETY: resetting a high-water mark takes a u64 zero.
            unsafe { sys::cuMemPoolSetAttribute(self.pool, attr, &zero as *const u64 as *mut _) };
        }
    }
}
