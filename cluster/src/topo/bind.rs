//! Binding this process to its placement (all its threads: hwloc's PROCESS flag).

use super::machine::ranges;
use super::plan::Placement;
use hwlocality::bitmap::BitmapIndex;
use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
use hwlocality::memory::nodeset::NodeSet;
use hwlocality::Topology;

fn index(i: u32) -> BitmapIndex {
    BitmapIndex::try_from(i as usize).expect("CPU and node numbers fit hwloc's index type")
}

/// What the operating system reports after binding.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    pub cpus: Vec<u32>,
    /// NUMA nodes memory is bound to, or why memory binding was not possible.
    pub memory: Result<Vec<u32>, String>,
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CPUs {}", ranges(&self.cpus))?;
        match &self.memory {
            Ok(n) => write!(f, ", memory on NUMA {}", ranges(n)),
            Err(e) => write!(f, ", memory not bound ({e})"),
        }
    }
}

/// The CPUs this process may run on now.
pub fn current_cpus() -> Result<Vec<u32>, String> {
    let topo = Topology::new().map_err(|e| format!("hwloc: {e}"))?;
    let set = topo.cpu_binding(CpuBindingFlags::PROCESS).map_err(|e| format!("cannot read the CPU binding: {e}"))?;
    Ok(set.iter_set().map(|i| usize::from(i) as u32).collect())
}

/// Bind CPUs (required) and memory (best effort: containers often forbid it) and read
/// both back.
pub fn bind_self(p: &Placement) -> Result<Binding, String> {
    let topo = Topology::new().map_err(|e| format!("hwloc: {e}"))?;
    let cpus: CpuSet = p.cpus.iter().map(|&c| index(c)).collect();
    topo.bind_cpu(&cpus, CpuBindingFlags::PROCESS)
        .map_err(|e| format!("cannot bind to CPUs {}: {e}", ranges(&p.cpus)))?;
    let got = current_cpus()?;
    let memory = if p.numa_nodes.is_empty() {
        Err("no NUMA node known".to_string())
    } else {
        let nodes: NodeSet = p.numa_nodes.iter().map(|&n| index(n)).collect();
        topo.bind_memory(&nodes, MemoryBindingPolicy::Bind, MemoryBindingFlags::PROCESS)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                topo.memory_binding::<NodeSet>(MemoryBindingFlags::PROCESS)
                    .map(|(set, _)| set.iter_set().map(|i| usize::from(i) as u32).collect())
                    .map_err(|e| e.to_string())
            })
    };
    Ok(Binding { cpus: got, memory })
}
