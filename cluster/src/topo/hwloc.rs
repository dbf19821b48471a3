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
    match xml {
        Some(p) => machine_from_xml(p),
        None => Ok(describe(&load(None)?, "this machine (hwloc)".to_string())),
    }
}

/// An hwloc XML file, read in a forked child process: libhwloc (2.10) crashes with
/// SIGSEGV on some inconsistent files (found by fuzzing: a duplicated core whose cpuset
/// overlaps another), and a user's bad file must be an error, not a crash. The child
/// sends the description (or hwloc's error) back as JSON through a pipe.
fn machine_from_xml(p: &Path) -> Result<Machine, TopoError> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let err = |what: String| TopoError::Read(what);
    if !p.is_file() {
        return Err(err(format!("topology XML {}: no such file", p.display())));
    }
    let source = format!("hwloc XML {}", p.display());
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array it is given.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(err(format!(
            "topology XML {}: cannot create a pipe: {}",
            p.display(),
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: the child only reads the file with hwloc, writes to the pipe and calls
    // _exit (no unwinding, no destructors, no buffered output of the parent's). glibc
    // resets malloc's locks in the child, so allocating there is safe.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let out: Result<Machine, String> = load(Some(p)).map(|t| describe(&t, source)).map_err(|e| e.to_string());
        let json = serde_json::to_vec(&out).unwrap_or_default();
        let mut off = 0;
        while off < json.len() {
            // SAFETY: writing bytes of a live buffer to the pipe's write end.
            let n = unsafe { libc::write(fds[1], json[off..].as_ptr().cast(), json.len() - off) };
            if n <= 0 {
                break;
            }
            off += n as usize;
        }
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: the write end belongs to the child now; the read end is ours alone.
    unsafe { libc::close(fds[1]) };
    let mut reader = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    if pid < 0 {
        return Err(err(format!("topology XML {}: cannot fork: {}", p.display(), std::io::Error::last_os_error())));
    }
    let mut json = Vec::new();
    let _ = reader.read_to_end(&mut json);
    let mut status = 0;
    // SAFETY: waits for the child created above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        return Err(err(format!(
            "topology XML {}: hwloc crashed reading it (signal {}): the file is not a consistent topology",
            p.display(),
            libc::WTERMSIG(status)
        )));
    }
    match serde_json::from_slice::<Result<Machine, String>>(&json) {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(err(e)),
        Err(e) => Err(err(format!("topology XML {}: reading it failed ({e})", p.display()))),
    }
}

/// Write the live machine's topology as hwloc XML (so real machines become fixtures).
pub fn export_xml(path: &Path) -> Result<(), TopoError> {
    let topo = load(None)?;
    topo.export_xml_file(Some(path), XMLExportFlags::empty())
        .map_err(|e| TopoError::Read(format!("cannot write hwloc XML to {}: {e}", path.display())))
}
