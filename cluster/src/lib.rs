//! `fp8cluster`: everything between processes and machines (MPI bootstrap,
//! collectives, hwloc topology and pinning). Built up by the cluster and topology work.
