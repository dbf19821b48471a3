//! The placement plan of one node: rank -> GPU -> CPU set -> memory node, and the
//! tensor-parallel groups.
//!
//! - Local rank r drives GPU r (bus-id order).
//! - Its CPU set is the whole cores of the GPU's nearest non-I/O ancestor, split evenly
//!   (in rank order, sizes differing by at most one core) among the ranks whose GPUs
//!   share that ancestor; hyperthread siblings stay together.
//! - Memory binds to the NUMA node(s) of those cores.
//! - Tensor-parallel groups are consecutive ranks (tensor parallel innermost); each
//!   group must lie inside one NVLink island, and the tensor-parallel size must divide
//!   the islands it uses.
//! - On a machine without GPUs (the simulator), the node's cores are split evenly
//!   among the ranks in order.

use super::islands::Islands;
use super::machine::{ranges, Machine};
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Placement {
    pub local_rank: usize,
    pub gpu: Option<usize>,
    pub bus_id: Option<String>,
    /// PUs (OS numbering) to bind to.
    pub cpus: Vec<u32>,
    pub cores: usize,
    pub numa_nodes: Vec<u32>,
    pub tp_group: usize,
    pub island: Option<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("--ranks-per-node must be at least 1")]
    NoRanks,
    #[error("--ranks-per-node {ranks} is more than the {gpus} GPU(s) of this machine")]
    MoreRanksThanGpus { ranks: usize, gpus: usize },
    #[error("--ranks-per-node {ranks} is more than the {cores} cores of this machine")]
    MoreRanksThanCores { ranks: usize, cores: usize },
    #[error("--tp {tp} does not divide --ranks-per-node {ranks}")]
    TpDoesNotDivideRanks { tp: usize, ranks: usize },
    #[error("--tp {tp} does not divide NVLink island {island} ({size} GPUs: {gpus}); tensor-parallel groups must tile the islands")]
    TpDoesNotDivideIsland { tp: usize, island: usize, size: usize, gpus: String },
    #[error(
        "tensor-parallel group {group} (GPUs {gpus}) would cross NVLink islands; islands: {islands} ({source_name})"
    )]
    GroupCrossesIslands { group: usize, gpus: String, islands: String, source_name: String },
    #[error("only {cores} whole core(s) near GPU {gpu} ({locality}) for {ranks} rank(s)")]
    TooFewCores { gpu: usize, locality: String, cores: usize, ranks: usize },
}

/// Split `cores` into `k` consecutive blocks whose sizes differ by at most one.
fn split(cores: &[Vec<u32>], k: usize) -> Vec<Vec<Vec<u32>>> {
    let (base, extra) = (cores.len() / k, cores.len() % k);
    let mut out = Vec::new();
    let mut at = 0;
    for i in 0..k {
        let n = base + usize::from(i < extra);
        out.push(cores[at..at + n].to_vec());
        at += n;
    }
    out
}

pub fn plan(m: &Machine, islands: &Islands, ranks: usize, tp: usize) -> Result<Vec<Placement>, PlanError> {
    if ranks == 0 {
        return Err(PlanError::NoRanks);
    }
    let tp = tp.max(1);
    if !ranks.is_multiple_of(tp) {
        return Err(PlanError::TpDoesNotDivideRanks { tp, ranks });
    }
    if m.gpus.is_empty() {
        if ranks > m.cores.len() {
            return Err(PlanError::MoreRanksThanCores { ranks, cores: m.cores.len() });
        }
        return Ok(split(&m.cores, ranks)
            .into_iter()
            .enumerate()
            .map(|(r, cs)| {
                let mut cpus: Vec<u32> = cs.concat();
                cpus.sort_unstable();
                Placement {
                    local_rank: r,
                    gpu: None,
                    bus_id: None,
                    numa_nodes: m.numa_of(&cpus),
                    cores: cs.len(),
                    cpus,
                    tp_group: r / tp,
                    island: None,
                }
            })
            .collect());
    }
    if ranks > m.gpus.len() {
        return Err(PlanError::MoreRanksThanGpus { ranks, gpus: m.gpus.len() });
    }
    // Tensor-parallel groups inside islands, tiling them.
    let list = |v: &[usize]| ranges(&v.iter().map(|&x| x as u32).collect::<Vec<_>>());
    for g in 0..ranks / tp {
        let gpus: Vec<usize> = (g * tp..(g + 1) * tp).collect();
        let isl = islands.of(gpus[0]);
        if gpus.iter().any(|&x| islands.of(x) != isl) {
            return Err(PlanError::GroupCrossesIslands {
                group: g,
                gpus: list(&gpus),
                islands: islands.groups.iter().map(|i| format!("[{}]", list(i))).collect::<Vec<_>>().join(" "),
                source_name: format!("{}: {}", islands.source, islands.detail),
            });
        }
        if let Some(i) = isl {
            let size = islands.groups[i].len();
            if !size.is_multiple_of(tp) {
                return Err(PlanError::TpDoesNotDivideIsland { tp, island: i, size, gpus: list(&islands.groups[i]) });
            }
        }
    }
    // CPU sets: ranks sharing a locality split its whole cores.
    let mut out: Vec<Option<Placement>> = vec![None; ranks];
    for r in 0..ranks {
        if out[r].is_some() {
            continue;
        }
        let loc = &m.gpus[r].local_pus;
        let sharing: Vec<usize> = (r..ranks).filter(|&q| &m.gpus[q].local_pus == loc).collect();
        let cores: Vec<Vec<u32>> = m.cores.iter().filter(|c| c.iter().all(|p| loc.contains(p))).cloned().collect();
        if cores.len() < sharing.len() {
            return Err(PlanError::TooFewCores {
                gpu: r,
                locality: m.gpus[r].locality.clone(),
                cores: cores.len(),
                ranks: sharing.len(),
            });
        }
        for (q, cs) in sharing.iter().zip(split(&cores, sharing.len())) {
            let mut cpus: Vec<u32> = cs.concat();
            cpus.sort_unstable();
            let gpu = &m.gpus[*q];
            let numa = m.numa_of(&cpus);
            out[*q] = Some(Placement {
                local_rank: *q,
                gpu: Some(gpu.index),
                bus_id: Some(gpu.bus_id.clone()),
                numa_nodes: if numa.is_empty() { gpu.numa_nodes.clone() } else { numa },
                cores: cs.len(),
                cpus,
                tp_group: q / tp,
                island: islands.of(gpu.index),
            });
        }
    }
    Ok(out.into_iter().map(|p| p.expect("every rank placed")).collect())
}

/// The plan as a table.
pub fn table(plan: &[Placement]) -> String {
    let mut s = String::from("rank | GPU | bus id       | CPUs                 | cores | NUMA | TP group | island\n");
    s += "-----|-----|--------------|----------------------|-------|------|----------|-------\n";
    for p in plan {
        s += &format!(
            "{:>4} | {:>3} | {:<12} | {:<20} | {:>5} | {:<4} | {:>8} | {}\n",
            p.local_rank,
            p.gpu.map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
            p.bus_id.clone().unwrap_or_else(|| "-".into()),
            ranges(&p.cpus),
            p.cores,
            ranges(&p.numa_nodes),
            p.tp_group,
            p.island.map(|i| i.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    s
}
