//! The CUDA device layer (the start of the CUDA backend): the device chosen by
//! node-local rank, a stream, and the kernels of `kernels/` compiled once per process by
//! NVRTC for the device's architecture with the contract's flags. Libraries are loaded
//! at run time (cudarc `dynamic-loading`), so the binary builds and runs without CUDA.

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::sync::Arc;

/// Every kernel source, the shared header first (NVRTC then needs no include path).
const SOURCES: &[(&str, &str)] = &[
    ("fp8train_common.cuh", include_str!("../../../kernels/fp8train_common.cuh")),
    ("fp8.cu", include_str!("../../../kernels/fp8.cu")),
    ("math.cu", include_str!("../../../kernels/math.cu")),
    ("reduce.cu", include_str!("../../../kernels/reduce.cu")),
    ("elementwise.cu", include_str!("../../../kernels/elementwise.cu")),
    ("gemm.cu", include_str!("../../../kernels/gemm.cu")),
    ("layernorm.cu", include_str!("../../../kernels/layernorm.cu")),
    ("gelu.cu", include_str!("../../../kernels/gelu.cu")),
    ("encoder.cu", include_str!("../../../kernels/encoder.cu")),
    ("crossentropy.cu", include_str!("../../../kernels/crossentropy.cu")),
    ("attention.cu", include_str!("../../../kernels/attention.cu")),
    ("flash_attention.cu", include_str!("../../../kernels/flash_attention.cu")),
    ("flash_attention_sm90.cu", include_str!("../../../kernels/flash_attention_sm90.cu")),
    ("adamw.cu", include_str!("../../../kernels/adamw.cu")),
    ("cast_transpose.cu", include_str!("../../../kernels/cast_transpose.cu")),
    ("scaling.cu", include_str!("../../../kernels/scaling.cu")),
];

/// One GPU with the project's kernels loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub module: Arc<CudaModule>,
    pub name: String,
    pub arch: String,
    pub compile_ms: f64,
    /// The stream-ordered pool every buffer comes from.
    pub pool: pool::Pool,
}

/// Whether the CUDA driver and NVRTC libraries can be loaded here.
pub fn available() -> Result<(), String> {
    // SAFETY: these only try to load the shared libraries.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    match (driver, nvrtc) {
        (true, true) => Ok(()),
        (false, _) => Err("the CUDA driver library (libcuda.so.1) is not present".into()),
        (true, false) => Err("NVRTC (libnvrtc.so) is not present; put CUDA's lib64 on LD_LIBRARY_PATH".into()),
    }
}

/// The contract's compile flags for `arch` (e.g. `sm_90`).
pub fn compile_options(arch: &'static str) -> CompileOptions {
    CompileOptions {
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        use_fast_math: Some(false),
        arch: Some(arch),
        ..Default::default()
    }
}

impl Gpu {
    /// Open CUDA device `ordinal` and compile the kernels for it.
    pub fn open(ordinal: usize) -> Result<Gpu, String> {
        available()?;
        let n = CudaContext::device_count().map_err(|e| format!("CUDA: cannot count devices: {e}"))?;
        if ordinal >= n.max(0) as usize {
            return Err(format!("CUDA device {ordinal} does not exist ({n} visible)"));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA device {ordinal}: {e}"))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| format!("CUDA: {e}"))?;
        // Hopper (9.0) is compiled as sm_90a, so that its warpgroup products (wgmma, the
        // flash kernels of flash_attention_sm90.cu) exist; everything else is the same code.
        let suffix = if (major, minor) == (9, 0) { "a" } else { "" };
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}{suffix}").into_boxed_str());
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let src: String = SOURCES
            .iter()
            .map(|(file, text)| {
                let body = text.replace("#pragma once", "");
                format!("// ---- {file}\n{body}\n")
            })
            .collect();
        // Compiled once per process and architecture (a second device or backend
        // instance reuses the PTX).
        static PTX: std::sync::Mutex<Vec<(String, cudarc::nvrtc::Ptx)>> = std::sync::Mutex::new(Vec::new());
        let t = std::time::Instant::now();
        let cached =
            PTX.lock().map_err(|_| "PTX cache poisoned")?.iter().find(|(a, _)| a == arch).map(|(_, p)| p.clone());
        let ptx = match cached {
            Some(p) => p,
            None => {
                // NVRTC takes tens of seconds for the whole set (the flash and tiled
                // attention kernels unroll a lot): the PTX is kept on disk, keyed by the
                // sources, the flags and the architecture.
                let key = ptx_cache_key(&src, arch);
                let file = ptx_cache_dir().map(|d| d.join(format!("kernels-{arch}-{key:016x}.ptx")));
                let p = match file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
                    Some(text) if text.contains(".entry") => cudarc::nvrtc::Ptx::from_src(text),
                    _ => {
                        let p = compile_ptx_with_opts(src, compile_options(arch)).map_err(|e| format!("NVRTC: {e}"))?;
                        if let Some(f) = &file {
                            store_ptx(f, &p.to_src());
                        }
                        p
                    }
                };
                PTX.lock().map_err(|_| "PTX cache poisoned")?.push((arch.to_string(), p.clone()));
                p
            }
        };
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let module = ctx.load_module(ptx).map_err(|e| format!("CUDA: cannot load the kernels: {e}"))?;
        // One stream: cudarc's per-buffer event tracking (for several streams) only costs.
        // SAFETY: every buffer of this backend is used on this one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let pool = pool::Pool::of_device(&ctx)?;
        Ok(Gpu { ctx, stream, module, name, arch: arch.to_string(), compile_ms, pool })
    }

    pub fn function(&self, name: &str) -> Result<CudaFunction, String> {
        self.module.load_function(name).map_err(|e| format!("CUDA: kernel {name}: {e}"))
    }
}

/// Where compiled kernels are kept: `$FP8TRAIN_CACHE`, else `$XDG_CACHE_HOME/fp8train`,
/// else `~/.cache/fp8train` (None: no cache).
pub fn ptx_cache_dir() -> Option<std::path::PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    env("FP8TRAIN_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("fp8train")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("fp8train")))
}

/// The cache key: the kernel sources, the compile flags and the architecture.
pub fn ptx_cache_key(src: &str, arch: &str) -> u64 {
    let o = compile_options("sm_90");
    let flags = format!("{:?}{:?}{:?}{:?}{:?}", o.fmad, o.prec_div, o.prec_sqrt, o.ftz, o.use_fast_math);
    fp8cluster::world::fnv1a(format!("{src}\0{flags}\0{arch}").as_bytes())
}

/// Write `text` to `file` atomically (temporary file, then rename); a failure only
/// means the next run compiles again.
fn store_ptx(file: &std::path::Path, text: &str) {
    let Some(dir) = file.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    if let Ok(mut tmp) = tempfile::NamedTempFile::new_in(dir) {
        use std::io::Write;
        if tmp.write_all(text.as_bytes()).is_ok() {
            let _ = tmp.persist(file);
        }
    }
}

mod lt;
pub mod nccl;
mod ops;
pub mod pool;
pub use ops::{cuda_memory_overhead, flash_scratch_bytes, op_scratch_without_attention, Cuda};

#[cfg(test)]
mod tests {
    #[test]
    fn flags_are_the_contracts() {
        let o = super::compile_options("sm_90");
        assert_eq!(
            (o.fmad, o.prec_div, o.prec_sqrt, o.ftz, o.use_fast_math),
            (Some(false), Some(true), Some(true), Some(false), Some(false))
        );
    }

    #[test]
    fn ptx_cache_key_follows_sources_and_arch() {
        let k = super::ptx_cache_key("a", "sm_90");
        assert_eq!(k, super::ptx_cache_key("a", "sm_90"));
        assert_ne!(k, super::ptx_cache_key("b", "sm_90"));
        assert_ne!(k, super::ptx_cache_key("a", "sm_80"));
    }

    #[test]
    fn stored_ptx_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub").join("k.ptx");
        super::store_ptx(&f, ".entry x");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), ".entry x");
    }

    #[test]
    fn kernel_sources_are_embedded() {
        assert!(super::SOURCES.iter().any(|(_, s)| s.contains("cvt.rn.satfinite.e4m3x2.f32")));
        assert!(super::SOURCES.iter().any(|(_, s)| s.contains("fp8_encode_sweep")));
    }
}
