//! Machine descriptions from an NCCL topology file (`<system version="1">`, the format
//! of `NCCL_TOPO_FILE`; Azure ships one per GPU VM type): `<cpu numaid affinity>`
//! elements with nested `<pci>` devices; GPUs are class 03xx; `<nvlink target=...>`
//! children, when present, give NVLink connections. Such files carry no core/SMT
//! structure: every CPU of an affinity mask counts as one core.

use super::machine::{Gpu, Machine, NumaNode};
use super::TopoError;
use std::path::Path;

/// CPUs of an NCCL affinity mask: comma-separated 32-bit hex words, most significant first.
fn parse_affinity(mask: &str) -> Result<Vec<u32>, String> {
    let words: Vec<&str> = mask.split(',').map(str::trim).collect();
    let mut cpus = Vec::new();
    for (i, w) in words.iter().rev().enumerate() {
        let v = u32::from_str_radix(w.trim_start_matches("0x"), 16).map_err(|_| format!("bad affinity word '{w}'"))?;
        for bit in 0..32 {
            if v >> bit & 1 == 1 {
                cpus.push((i * 32 + bit) as u32);
            }
        }
    }
    Ok(cpus)
}

fn norm_bus_id(b: &str) -> String {
    b.trim().to_ascii_lowercase()
}

pub fn machine(path: &Path) -> Result<Machine, TopoError> {
    let err = |m: String| TopoError::Read(format!("NCCL topology {}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let opts = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    let doc = roxmltree::Document::parse_with_options(&text, opts).map_err(|e| err(format!("malformed XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "system" {
        return Err(err(format!(
            "root element is <{}>, expected <system> (is this an hwloc XML? use --topology-xml)",
            root.tag_name().name()
        )));
    }
    let mut numa_nodes = Vec::new();
    let mut gpus = Vec::new();
    let mut links_by_bus: Vec<(String, String)> = Vec::new();
    let mut nvlink_info = false;
    for cpu in root.children().filter(|n| n.has_tag_name("cpu")) {
        let numa: u32 = cpu
            .attribute("numaid")
            .ok_or_else(|| err("a <cpu> element has no numaid".into()))?
            .parse()
            .map_err(|_| err("a <cpu> numaid is not a number".into()))?;
        let pus = parse_affinity(
            cpu.attribute("affinity").ok_or_else(|| err(format!("<cpu numaid=\"{numa}\"> has no affinity")))?,
        )
        .map_err(&err)?;
        for pci in cpu.descendants().filter(|n| n.has_tag_name("pci")) {
            let class = pci.attribute("class").unwrap_or("");
            if !class.to_ascii_lowercase().starts_with("0x03") {
                continue;
            }
            let bus = norm_bus_id(pci.attribute("busid").ok_or_else(|| err("a GPU <pci> has no busid".into()))?);
            for l in pci.children().filter(|n| n.has_tag_name("nvlink")) {
                nvlink_info = true;
                if let Some(t) = l.attribute("target") {
                    links_by_bus.push((bus.clone(), norm_bus_id(t)));
                }
            }
            gpus.push(Gpu {
                index: 0,
                bus_id: bus,
                pci_id: "10de:? (NCCL topology)".into(),
                locality: format!("NUMANode {numa}"),
                local_pus: pus.clone(),
                numa_nodes: vec![numa],
            });
        }
        numa_nodes.push(NumaNode { os_index: numa, pus });
    }
    gpus.sort_by(|a, b| a.bus_id.cmp(&b.bus_id));
    for (i, g) in gpus.iter_mut().enumerate() {
        g.index = i;
    }
    let idx = |b: &str| gpus.iter().position(|g| g.bus_id == b);
    // A link to a non-GPU target (an NVSwitch) joins every GPU linked to that target.
    let mut nvlinks = Vec::new();
    let mut via: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (a, t) in &links_by_bus {
        let Some(ia) = idx(a) else { continue };
        match idx(t) {
            Some(it) => nvlinks.push((ia.min(it), ia.max(it))),
            None => via.entry(t.clone()).or_default().push(ia),
        }
    }
    for members in via.values() {
        for w in members.windows(2) {
            nvlinks.push((w[0].min(w[1]), w[0].max(w[1])));
        }
    }
    nvlinks.sort();
    nvlinks.dedup();
    let mut all: Vec<u32> = numa_nodes.iter().flat_map(|n: &NumaNode| n.pus.clone()).collect();
    all.sort_unstable();
    all.dedup();
    Ok(Machine {
        source: format!("NCCL topology {}", path.display()),
        cores: all.into_iter().map(|p| vec![p]).collect(),
        numa_nodes,
        gpus,
        nvswitches: 0,
        nvlinks,
        nvlink_info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_masks() {
        assert_eq!(parse_affinity("00000000,0000ffff,ffffffff").unwrap(), (0..48).collect::<Vec<_>>());
        assert_eq!(parse_affinity("ffffffff,ffff0000,00000000").unwrap(), (48..96).collect::<Vec<_>>());
        assert!(parse_affinity("zz").is_err());
    }
}
