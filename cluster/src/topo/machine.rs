//! The machine as the planner sees it, whatever source it came from.

use serde::{Deserialize, Serialize};

/// One NVIDIA GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    /// Position in PCI bus-id order (the CUDA ordinal with CUDA_DEVICE_ORDER=PCI_BUS_ID).
    pub index: usize,
    /// `dddd:bb:dd.f`, lower case.
    pub bus_id: String,
    /// `vendor:device` PCI ids when known (hwloc), e.g. `10de:2335`.
    pub pci_id: String,
    /// The GPU's nearest non-I/O ancestor, e.g. `Package 0` or `NUMANode 1`.
    pub locality: String,
    /// PUs (logical CPUs, OS numbering) of that ancestor.
    pub local_pus: Vec<u32>,
    /// NUMA nodes (OS numbering) of that ancestor.
    pub numa_nodes: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NumaNode {
    pub os_index: u32,
    pub pus: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Where the description came from.
    pub source: String,
    /// Each core's PUs (hyperthread siblings together), ordered by first PU.
    pub cores: Vec<Vec<u32>>,
    pub numa_nodes: Vec<NumaNode>,
    /// GPUs in bus-id order.
    pub gpus: Vec<Gpu>,
    /// NVIDIA NVSwitch PCI devices (class 0680) seen.
    pub nvswitches: usize,
    /// NVLink connections between GPUs (by index) when the source lists them.
    pub nvlinks: Vec<(usize, usize)>,
    /// The source listed NVLink information at all (NCCL topology files may not).
    pub nvlink_info: bool,
}

impl Machine {
    pub fn pus(&self) -> usize {
        self.cores.iter().map(Vec::len).sum()
    }

    /// The NUMA nodes holding any of `pus`.
    pub fn numa_of(&self, pus: &[u32]) -> Vec<u32> {
        self.numa_nodes.iter().filter(|n| n.pus.iter().any(|p| pus.contains(p))).map(|n| n.os_index).collect()
    }

    /// One-paragraph human summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} cores ({} PUs), {} NUMA node(s), {} NVIDIA GPU(s)",
            self.source,
            self.cores.len(),
            self.pus(),
            self.numa_nodes.len(),
            self.gpus.len()
        );
        if self.nvswitches > 0 {
            s += &format!(", {} NVSwitch(es)", self.nvswitches);
        }
        for n in &self.numa_nodes {
            s += &format!("\n  NUMA node {}: CPUs {}", n.os_index, ranges(&n.pus));
        }
        for g in &self.gpus {
            s += &format!(
                "\n  GPU {} {} [{}] near {} (CPUs {}, NUMA {})",
                g.index,
                g.bus_id,
                g.pci_id,
                g.locality,
                ranges(&g.local_pus),
                ranges(&g.numa_nodes)
            );
        }
        s
    }
}

/// `0-23,48-71` style list.
pub fn ranges(v: &[u32]) -> String {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j { v[i].to_string() } else { format!("{}-{}", v[i], v[j]) });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

/// Most ids a list may hold (CPUs, GPUs): far above any machine, far below what would
/// exhaust memory for a typo like `0-4294967295`.
pub const MAX_IDS: usize = 1 << 16;

/// Parse `0-3,8,10-11` into a sorted list.
pub fn parse_ranges(s: &str) -> Result<Vec<u32>, String> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |x: &str| x.trim().parse::<u32>().map_err(|_| format!("'{x}' is not a number"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range '{part}' runs backwards"));
                }
                if (b - a) as usize >= MAX_IDS - v.len().min(MAX_IDS - 1) {
                    return Err(format!("range '{part}' holds more than {MAX_IDS} ids in all"));
                }
                v.extend(a..=b);
            }
            None => v.push(num(part)?),
        }
        if v.len() > MAX_IDS {
            return Err(format!("'{s}' lists more than {MAX_IDS} ids"));
        }
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_ranges_are_errors_not_allocations() {
        assert!(parse_ranges("0-4294967295").unwrap_err().contains("more than 65536"));
        assert!(parse_ranges("0-40000,50000-90000").unwrap_err().contains("more than 65536"));
        assert_eq!(parse_ranges("0-65535").unwrap().len(), 65536);
    }

    #[test]
    fn range_lists() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(parse_ranges("0-2,5, 7-8").unwrap(), vec![0, 1, 2, 5, 7, 8]);
        assert!(parse_ranges("3-1").is_err());
        assert!(parse_ranges("x").is_err());
    }
}
