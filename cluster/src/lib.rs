//! `fp8cluster`: everything between processes and machines (MPI bootstrap,
//! collectives, hwloc topology and pinning).

pub mod check;
pub mod local;
pub mod reduce;
pub mod topo;
pub mod tp;
pub mod world;
pub mod zero;

/// The MPI library's own version string (Open MPI, MPICH, ...), as linked.
pub fn mpi_library_version() -> String {
    mpi::environment::library_version().unwrap_or_else(|_| "unknown MPI library".into())
}

/// The hwloc API version this binary was built against, as "X.Y.Z".
pub fn hwloc_api_version() -> String {
    let v = hwlocality::hwloc_api_version();
    format!("{}.{}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff)
}

#[cfg(test)]
mod tests {
    #[test]
    fn links_the_system_mpi_and_hwloc() {
        let mpi = super::mpi_library_version();
        assert!(mpi.contains("Open MPI") || mpi.contains("MPICH"), "unexpected MPI library: {mpi}");
        let hw = super::hwloc_api_version();
        assert!(hw.starts_with("2."), "hwloc API {hw}");
    }
}
