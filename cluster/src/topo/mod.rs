//! Topology: what the machine looks like (cores, NUMA nodes, GPUs by PCI bus id, NVLink
//! islands), where each rank of a node should run (the placement plan), and binding a
//! process to its place.
//!
//! Sources: hwloc (the live machine or an exported hwloc XML, via `hwlocality`), or an
//! NCCL topology file (the format Azure ships for its GPU VMs). GPUs are found as
//! NVIDIA PCI devices (vendor 10de, class 03xx), never through hwloc's CUDA/NVML
//! plugins, and numbered in PCI bus-id order (CUDA's order with
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID`; the CUDA backend maps ordinals by bus id).

pub mod bind;
pub mod cuda;
pub mod hwloc;
pub mod islands;
pub mod machine;
pub mod nccl;
pub mod nvml;
pub mod plan;

pub use islands::{IslandSource, Islands};
pub use machine::{Gpu, Machine};
pub use plan::{plan, Placement, PlanError};

/// Errors reading a topology.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TopoError {
    #[error("{0}")]
    Read(String),
}
