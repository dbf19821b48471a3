//! NVLink connections read from NVML on the live machine, when the driver's
//! `libnvidia-ml.so.1` is present (loaded at run time; nothing is needed to build).
//!
//! Per GPU: the fabric clique id when the GPU is on an NVSwitch fabric
//! (`nvmlDeviceGetGpuFabricInfo`, state completed), otherwise each active NVLink's
//! remote PCI device (`nvmlDeviceGetNvLinkRemotePciInfo_v2`): a GPU joins that GPU, a
//! non-GPU remote (an NVSwitch) joins every GPU linked to the same switch.

use super::machine::Machine;
use libloading::{Library, Symbol};
use std::collections::BTreeMap;
use std::os::raw::{c_char, c_int, c_uint, c_void};

const NVML_SUCCESS: c_int = 0;
const MAX_LINKS: c_uint = 18;
const FABRIC_STATE_COMPLETED: u8 = 3;

#[repr(C)]
#[derive(Clone, Copy)]
struct PciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

#[repr(C)]
struct FabricInfo {
    cluster_uuid: [u8; 16],
    status: c_int,
    clique_id: c_uint,
    state: u8,
}

type Device = *mut c_void;

fn bus_string(p: &PciInfo) -> String {
    // The text form carries domain, bus, device and function.
    let raw: Vec<u8> = p.bus_id.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    normalize(&String::from_utf8_lossy(&raw))
}

/// `00000000:00:06.0` -> `0000:00:06.0`.
pub fn normalize(bus: &str) -> String {
    let b = bus.trim().to_ascii_lowercase();
    match b.split_once(':') {
        Some((dom, rest)) => match u32::from_str_radix(dom, 16) {
            Ok(d) => format!("{d:04x}:{rest}"),
            Err(_) => b,
        },
        None => b,
    }
}

/// What NVML says about the GPUs of `m`: NVLink connections between GPU indices, and a
/// note on how they were found. `Err` when NVML is absent or fails.
pub fn nvlinks(m: &Machine) -> Result<(Vec<(usize, usize)>, String), String> {
    // SAFETY: loading the NVIDIA management library runs its initialisers only.
    let lib =
        unsafe { Library::new("libnvidia-ml.so.1") }.map_err(|_| "NVML (libnvidia-ml.so.1) not found".to_string())?;
    // SAFETY: the signatures below are NVML's documented C API.
    unsafe {
        let init: Symbol<unsafe extern "C" fn() -> c_int> = lib.get(b"nvmlInit_v2").map_err(|e| e.to_string())?;
        let count: Symbol<unsafe extern "C" fn(*mut c_uint) -> c_int> =
            lib.get(b"nvmlDeviceGetCount_v2").map_err(|e| e.to_string())?;
        let handle: Symbol<unsafe extern "C" fn(c_uint, *mut Device) -> c_int> =
            lib.get(b"nvmlDeviceGetHandleByIndex_v2").map_err(|e| e.to_string())?;
        let pci: Symbol<unsafe extern "C" fn(Device, *mut PciInfo) -> c_int> =
            lib.get(b"nvmlDeviceGetPciInfo_v3").map_err(|e| e.to_string())?;
        let link_state: Symbol<unsafe extern "C" fn(Device, c_uint, *mut c_int) -> c_int> =
            lib.get(b"nvmlDeviceGetNvLinkState").map_err(|e| e.to_string())?;
        let remote: Symbol<unsafe extern "C" fn(Device, c_uint, *mut PciInfo) -> c_int> =
            lib.get(b"nvmlDeviceGetNvLinkRemotePciInfo_v2").map_err(|e| e.to_string())?;
        let fabric: Option<Symbol<unsafe extern "C" fn(Device, *mut FabricInfo) -> c_int>> =
            lib.get(b"nvmlDeviceGetGpuFabricInfo").ok();
        if init() != NVML_SUCCESS {
            return Err("NVML present but nvmlInit failed (no driver?)".into());
        }
        let mut n: c_uint = 0;
        if count(&mut n) != NVML_SUCCESS {
            return Err("NVML: cannot count devices".into());
        }
        let index_of = |bus: &str| m.gpus.iter().position(|g| g.bus_id == bus);
        // Every GPU NVML sees (also those hidden from CUDA), to tell GPUs from switches.
        let mut devices = Vec::new();
        for i in 0..n {
            let mut dev: Device = std::ptr::null_mut();
            let mut info: PciInfo = std::mem::zeroed();
            if handle(i, &mut dev) == NVML_SUCCESS && pci(dev, &mut info) == NVML_SUCCESS {
                devices.push((dev, bus_string(&info)));
            }
        }
        let mut cliques: BTreeMap<(u128, u32), Vec<usize>> = BTreeMap::new();
        let mut via_switch: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut links = Vec::new();
        let mut used_fabric = false;
        for (dev, bus) in &devices {
            let Some(me) = index_of(bus) else { continue }; // not in the plan (hidden from CUDA)
            if let Some(f) = &fabric {
                let mut fi: FabricInfo = std::mem::zeroed();
                if f(*dev, &mut fi) == NVML_SUCCESS && fi.status == NVML_SUCCESS && fi.state == FABRIC_STATE_COMPLETED {
                    cliques.entry((u128::from_le_bytes(fi.cluster_uuid), fi.clique_id)).or_default().push(me);
                    used_fabric = true;
                    continue;
                }
            }
            for l in 0..MAX_LINKS {
                let mut active: c_int = 0;
                if link_state(*dev, l, &mut active) != NVML_SUCCESS || active == 0 {
                    continue;
                }
                let mut r: PciInfo = std::mem::zeroed();
                if remote(*dev, l, &mut r) != NVML_SUCCESS {
                    continue;
                }
                let rb = bus_string(&r);
                match index_of(&rb) {
                    Some(other) if other != me => links.push((me.min(other), me.max(other))),
                    Some(_) => {}
                    None if devices.iter().any(|d| d.1 == rb) => {} // a GPU outside the plan
                    None => via_switch.entry(rb).or_default().push(me),
                }
            }
        }
        for members in cliques.values().chain(via_switch.values()) {
            for w in members.windows(2) {
                links.push((w[0].min(w[1]), w[0].max(w[1])));
            }
        }
        links.sort();
        links.dedup();
        let how = if used_fabric { "fabric clique ids" } else { "NVLink remote PCI ids" };
        let note = format!("{} NVLink connection(s) from {how}", links.len());
        Ok((links, note))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bus_ids_normalise() {
        assert_eq!(super::normalize("00000000:00:06.0"), "0000:00:06.0");
        assert_eq!(super::normalize("0000000A:1B:00.0"), "000a:1b:00.0");
    }
}
