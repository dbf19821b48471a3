//! CUDA device ordinals by PCI bus id, read from the driver (`libcuda.so.1`, loaded at
//! run time; nothing is needed to build). With CUDA present, local rank r uses CUDA
//! device r, so the plan lists the GPUs CUDA sees (honouring CUDA_VISIBLE_DEVICES) in
//! CUDA's order, each matched to hwloc's PCI device by bus id.

use super::machine::Machine;
use super::nvml::normalize;
use libloading::{Library, Symbol};
use std::os::raw::{c_char, c_int, c_uint};

/// Bus id of every CUDA device, by ordinal. `Err` when the driver is absent or fails.
pub fn bus_ids() -> Result<Vec<String>, String> {
    // SAFETY: loading the CUDA driver library runs its initialisers only.
    let lib =
        unsafe { Library::new("libcuda.so.1") }.map_err(|_| "CUDA driver (libcuda.so.1) not found".to_string())?;
    // SAFETY: the signatures below are the CUDA driver API's.
    unsafe {
        let init: Symbol<unsafe extern "C" fn(c_uint) -> c_int> = lib.get(b"cuInit").map_err(|e| e.to_string())?;
        let count: Symbol<unsafe extern "C" fn(*mut c_int) -> c_int> =
            lib.get(b"cuDeviceGetCount").map_err(|e| e.to_string())?;
        let get: Symbol<unsafe extern "C" fn(*mut c_int, c_int) -> c_int> =
            lib.get(b"cuDeviceGet").map_err(|e| e.to_string())?;
        let bus: Symbol<unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int> =
            lib.get(b"cuDeviceGetPCIBusId").map_err(|e| e.to_string())?;
        let rc = init(0);
        if rc != 0 {
            return Err(format!("cuInit failed with CUDA error {rc} (no usable GPU?)"));
        }
        let mut n: c_int = 0;
        if count(&mut n) != 0 {
            return Err("cuDeviceGetCount failed".into());
        }
        let mut out = Vec::new();
        for i in 0..n {
            let mut dev: c_int = 0;
            let mut buf = [0 as c_char; 32];
            if get(&mut dev, i) != 0 || bus(buf.as_mut_ptr(), 32, dev) != 0 {
                return Err(format!("cannot read the PCI bus id of CUDA device {i}"));
            }
            let raw: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
            out.push(normalize(&String::from_utf8_lossy(&raw)));
        }
        Ok(out)
    }
}

/// Order `m`'s GPUs as CUDA numbers them (dropping GPUs CUDA does not see); a CUDA bus
/// id that the topology lacks is an error.
pub fn apply_ordinals(m: &mut Machine, cuda: &[String]) -> Result<(), String> {
    let mut gpus = Vec::new();
    for (ordinal, b) in cuda.iter().enumerate() {
        let g = m.gpus.iter().find(|g| &g.bus_id == b).ok_or_else(|| {
            format!("CUDA device {ordinal} has PCI bus id {b}, which the topology does not list (unknown GPU bus id)")
        })?;
        let mut g = g.clone();
        g.index = ordinal;
        gpus.push(g);
    }
    m.gpus = gpus;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topo::machine::Gpu;

    fn gpu(b: &str, i: usize) -> Gpu {
        Gpu {
            index: i,
            bus_id: b.into(),
            pci_id: String::new(),
            locality: String::new(),
            local_pus: vec![],
            numa_nodes: vec![],
        }
    }

    #[test]
    fn ordinals_follow_cuda_and_unknown_bus_ids_fail() {
        let mut m = Machine {
            source: "t".into(),
            cores: vec![],
            numa_nodes: vec![],
            gpus: vec![gpu("0000:06:00.0", 0), gpu("0000:07:00.0", 1), gpu("0000:08:00.0", 2)],
            nvswitches: 0,
            nvlinks: vec![],
            nvlink_info: false,
        };
        // CUDA_VISIBLE_DEVICES=2,0 -> two devices, in that order.
        apply_ordinals(&mut m, &["0000:08:00.0".into(), "0000:06:00.0".into()]).unwrap();
        assert_eq!(
            m.gpus.iter().map(|g| (g.index, g.bus_id.as_str())).collect::<Vec<_>>(),
            vec![(0, "0000:08:00.0"), (1, "0000:06:00.0")]
        );
        let e = apply_ordinals(&mut m, &["0000:99:00.0".into()]).unwrap_err();
        assert!(e.contains("unknown GPU bus id") && e.contains("0000:99:00.0"), "{e}");
    }
}
