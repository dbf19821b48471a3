//! NVLink islands: sets of GPUs joined by NVLink/NVSwitch. Tensor-parallel groups
//! must stay inside one. Sources, in order of preference: declared on the command
//! line (`--islands`), NVML on the live machine, an NCCL topology file's `<nvlink>`
//! entries, NVSwitch devices in hwloc (every GPU of an NVSwitch system is on the
//! fabric); otherwise every GPU is its own island.

use super::machine::{parse_ranges, Machine};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IslandSource {
    Declared,
    Nvml,
    NcclTopo,
    HwlocNvswitch,
    Unknown,
}

impl std::fmt::Display for IslandSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IslandSource::Declared => "declared (--islands)",
            IslandSource::Nvml => "NVML",
            IslandSource::NcclTopo => "NCCL topology file",
            IslandSource::HwlocNvswitch => "hwloc (NVSwitch devices present)",
            IslandSource::Unknown => "none found",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Islands {
    pub source: IslandSource,
    pub detail: String,
    /// GPU indices of each island, islands ordered by their first GPU.
    pub groups: Vec<Vec<usize>>,
}

impl Islands {
    /// The island holding `gpu`.
    pub fn of(&self, gpu: usize) -> Option<usize> {
        self.groups.iter().position(|g| g.contains(&gpu))
    }
}

/// Connected components of `links` over `n` GPUs.
fn components(n: usize, links: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(p: &mut [usize], x: usize) -> usize {
        let mut r = x;
        while p[r] != r {
            r = p[r];
        }
        p[x] = r;
        r
    }
    for &(a, b) in links {
        let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
        parent[ra.max(rb)] = ra.min(rb);
    }
    let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for g in 0..n {
        let r = find(&mut parent, g);
        groups.entry(r).or_default().push(g);
    }
    groups.into_values().collect()
}

/// Parse `--islands`: islands separated by spaces or ';', each a list like `0-3,6`.
/// GPUs not named form islands of their own.
pub fn parse_declared(spec: &str, n_gpus: usize) -> Result<Vec<Vec<usize>>, String> {
    let mut seen = vec![false; n_gpus];
    let mut groups = Vec::new();
    for part in spec.split([' ', ';']).map(str::trim).filter(|p| !p.is_empty()) {
        let ids = parse_ranges(part).map_err(|e| format!("--islands '{spec}': {e}"))?;
        let mut g = Vec::new();
        for id in ids {
            let id = id as usize;
            if id >= n_gpus {
                return Err(format!("--islands '{spec}': GPU {id} does not exist (the machine has {n_gpus} GPU(s))"));
            }
            if seen[id] {
                return Err(format!("--islands '{spec}': GPU {id} is in two islands"));
            }
            seen[id] = true;
            g.push(id);
        }
        groups.push(g);
    }
    groups.extend((0..n_gpus).filter(|&i| !seen[i]).map(|i| vec![i]));
    groups.sort();
    Ok(groups)
}

/// Decide the islands of `m`. `nvml`: NVLink links between GPU indices read from NVML
/// on the live machine (with a note on how), when NVML could be read.
pub fn resolve(
    m: &Machine,
    declared: Option<&str>,
    nvml: Option<(Vec<(usize, usize)>, String)>,
) -> Result<Islands, String> {
    let n = m.gpus.len();
    if let Some(spec) = declared {
        return Ok(Islands {
            source: IslandSource::Declared,
            detail: spec.to_string(),
            groups: parse_declared(spec, n)?,
        });
    }
    if let Some((links, detail)) = nvml {
        return Ok(Islands { source: IslandSource::Nvml, detail, groups: components(n, &links) });
    }
    if m.nvlink_info {
        return Ok(Islands {
            source: IslandSource::NcclTopo,
            detail: format!("{} NVLink connection(s)", m.nvlinks.len()),
            groups: components(n, &m.nvlinks),
        });
    }
    if m.nvswitches > 0 && n > 0 {
        return Ok(Islands {
            source: IslandSource::HwlocNvswitch,
            detail: format!("{} NVSwitch(es): all {n} GPUs on one fabric", m.nvswitches),
            groups: vec![(0..n).collect()],
        });
    }
    Ok(Islands {
        source: IslandSource::Unknown,
        detail: if n > 0 {
            format!("no NVLink information; each GPU is its own island (declare them, e.g. --islands 0-{})", n - 1)
        } else {
            "no GPUs".into()
        },
        groups: (0..n).map(|i| vec![i]).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_and_components() {
        assert_eq!(parse_declared("0-3 4-7", 8).unwrap(), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(parse_declared("0-1", 4).unwrap(), vec![vec![0, 1], vec![2], vec![3]]);
        assert!(parse_declared("0-8", 8).unwrap_err().contains("GPU 8 does not exist"));
        assert!(parse_declared("0-3;2-5", 8).unwrap_err().contains("GPU 2 is in two islands"));
        assert_eq!(components(5, &[(0, 1), (3, 4), (1, 2)]), vec![vec![0, 1, 2], vec![3, 4]]);
    }
}
