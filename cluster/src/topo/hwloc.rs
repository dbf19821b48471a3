//! Machine descriptions from hwloc: the live machine or an hwloc XML export.

use super::machine::{Gpu, Machine, NumaNode};
use super::TopoError;
use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::ObjectType;
use hwlocality::object::TopologyObject;
use hwlocality::topology::builder::TypeFilter;
use hwlocality::topology::export::xml::XMLExportFlags;
use hwlocality::Topology;
use std::path::Path;

const NVIDIA: u16 = 0x10de;

/// Build an hwloc topology with I/O devices, live or from `xml`.
pub fn load(xml: Option<&Path>) -> Result<Topology, TopoError> {
    let err = |what: String| TopoError::Read(what);
    let mut b = Topology::builder();
    if let Some(p) = xml {
        if !p.is_file() {
            return Err(err(format!("topology XML {}: no such file", p.display())));
        }
        b = b.from_xml_file(p).map_err(|e| err(format!("topology XML {}: cannot load: {e}", p.display())))?;
    }
    let b = b.with_io_type_filter(TypeFilter::KeepAll).map_err(|e| err(format!("hwloc: {e}")))?;
    b.build().map_err(|e| match xml {
        Some(p) => {
            err(format!("topology XML {}: hwloc cannot load it (malformed or not hwloc XML?): {e}", p.display()))
        }
        None => err(format!("hwloc: cannot discover this machine: {e}")),
    })
}

fn pus_of(obj: &TopologyObject) -> Vec<u32> {
    obj.cpuset().map(|s| s.iter_set().map(|i| usize::from(i) as u32).collect()).unwrap_or_default()
}

fn nodes_of(obj: &TopologyObject) -> Vec<u32> {
    obj.nodeset().map(|s| s.iter_set().map(|i| usize::from(i) as u32).collect()).unwrap_or_default()
}

/// Describe a loaded hwloc topology.
pub fn describe(topo: &Topology, source: String) -> Machine {
    let mut cores: Vec<Vec<u32>> = topo.objects_with_type(ObjectType::Core).map(pus_of).collect();
    if cores.is_empty() {
        cores = topo.objects_with_type(ObjectType::PU).map(pus_of).collect();
    }
    cores.sort();
    let numa_nodes = topo
        .objects_with_type(ObjectType::NUMANode)
        .map(|n| NumaNode { os_index: n.os_index().unwrap_or(0) as u32, pus: pus_of(n) })
        .collect();
    let mut gpus = Vec::new();
    let mut nvswitches = 0;
    for obj in topo.objects_with_type(ObjectType::PCIDevice) {
        let Some(ObjectAttributes::PCIDevice(pci)) = obj.attributes() else {
            continue;
        };
        if pci.vendor_id() != NVIDIA {
            continue;
        }
        let class = pci.class_id();
        if class == 0x0680 {
            nvswitches += 1;
        }
        if class >> 8 != 0x03 {
            continue;
        }
        let anc = obj.first_non_io_ancestor();
        gpus.push(Gpu {
            index: 0,
            bus_id: format!("{:04x}:{:02x}:{:02x}.{:x}", pci.domain(), pci.bus_id(), pci.bus_device(), pci.function()),
            pci_id: format!("{:04x}:{:04x}", pci.vendor_id(), pci.device_id()),
            locality: anc
                .map(|a| format!("{} {}", a.object_type(), a.os_index().map(|i| i.to_string()).unwrap_or_default()))
                .unwrap_or_else(|| "Machine".into())
                .trim()
                .to_string(),
            local_pus: anc.map(pus_of).unwrap_or_default(),
            numa_nodes: anc.map(nodes_of).unwrap_or_default(),
        });
    }
    gpus.sort_by(|a, b| a.bus_id.cmp(&b.bus_id));
    for (i, g) in gpus.iter_mut().enumerate() {
        g.index = i;
    }
    Machine { source, cores, numa_nodes, gpus, nvswitches, nvlinks: Vec::new(), nvlink_info: false }
}

/// The live machine, or an hwloc XML file.
pub fn machine(xml: Option<&Path>) -> Result<Machine, TopoError> {
    let topo = load(xml)?;
    let source = match xml {
        Some(p) => format!("hwloc XML {}", p.display()),
        None => "this machine (hwloc)".to_string(),
    };
    Ok(describe(&topo, source))
}

/// Write the live machine's topology as hwloc XML (so real machines become fixtures).
pub fn export_xml(path: &Path) -> Result<(), TopoError> {
    let topo = load(None)?;
    topo.export_xml_file(Some(path), XMLExportFlags::empty())
        .map_err(|e| TopoError::Read(format!("cannot write hwloc XML to {}: {e}", path.display())))
}
