//! `fp8train topo`, and the placement used at training start.

use crate::cli::TopoArgs;
use fp8cluster::topo::{self, cuda, hwloc, islands, nccl, nvml, plan, Islands, Machine, Placement};
use serde_json::json;

/// The machine and its islands as the flags describe them.
pub fn machine_and_islands(a: &TopoArgs) -> Result<(Machine, Islands), String> {
    let err = |e: topo::TopoError| e.to_string();
    let mut m = match (&a.topology_xml, &a.nccl_topo) {
        (Some(x), _) => hwloc::machine(Some(x)).map_err(err)?,
        (None, Some(n)) => nccl::machine(n).map_err(err)?,
        (None, None) => hwloc::machine(None).map_err(err)?,
    };
    if let (Some(_), Some(n)) = (&a.topology_xml, &a.nccl_topo) {
        // Machine from hwloc, NVLink entries from the NCCL file (matched by bus id).
        let nm = nccl::machine(n).map_err(err)?;
        if nm.nvlink_info {
            let idx = |bus: &str| m.gpus.iter().position(|g| g.bus_id == bus);
            let mut links = Vec::new();
            for &(x, y) in &nm.nvlinks {
                let (bx, by) = (&nm.gpus[x].bus_id, &nm.gpus[y].bus_id);
                match (idx(bx), idx(by)) {
                    (Some(i), Some(j)) => links.push((i, j)),
                    _ => {
                        return Err(format!(
                            "--nccl-topo {}: GPU {bx} or {by} is not in the hwloc topology",
                            n.display()
                        ))
                    }
                }
            }
            m.nvlinks = links;
            m.nvlink_info = true;
        }
    }
    // CUDA and NVML describe the live machine only.
    let live = a.topology_xml.is_none() && a.nccl_topo.is_none();
    if live && !m.gpus.is_empty() {
        match cuda::bus_ids() {
            Ok(ids) => {
                cuda::apply_ordinals(&mut m, &ids)?;
                m.source += ", GPUs in CUDA order";
            }
            Err(why) => m.source += &format!(", GPUs in bus-id order ({why})"),
        }
    }
    let nvml = if live && a.islands.is_none() && !m.gpus.is_empty() { Some(nvml::nvlinks(&m)) } else { None };
    let isl = match nvml {
        Some(Ok(found)) => islands::resolve(&m, None, Some(found))?,
        Some(Err(why)) => {
            let mut isl = islands::resolve(&m, a.islands.as_deref(), None)?;
            isl.detail = format!("{}; NVML: {why}", isl.detail);
            isl
        }
        None => islands::resolve(&m, a.islands.as_deref(), None)?,
    };
    Ok((m, isl))
}

/// The placement of every local rank.
pub fn placement(a: &TopoArgs) -> Result<(Machine, Islands, Vec<Placement>), String> {
    let (m, isl) = machine_and_islands(a)?;
    let ranks = a.ranks_per_node.unwrap_or(m.gpus.len().max(1));
    let p = plan(&m, &isl, ranks, a.tp).map_err(|e| e.to_string())?;
    Ok((m, isl, p))
}

pub fn topo_cmd(a: &TopoArgs) -> Result<(), String> {
    if let Some(path) = &a.export_xml {
        hwloc::export_xml(path).map_err(|e| e.to_string())?;
        eprintln!("wrote this machine's hwloc XML to {}", path.display());
    }
    let (m, isl, p) = placement(a)?;
    if a.json {
        println!("{}", json!({"machine": m, "islands": isl, "tp": a.tp.max(1), "plan": p}));
        return Ok(());
    }
    println!("{}", m.summary());
    let groups: Vec<String> = isl
        .groups
        .iter()
        .map(|g| format!("[{}]", topo::machine::ranges(&g.iter().map(|&x| x as u32).collect::<Vec<_>>())))
        .collect();
    println!(
        "NVLink islands ({}): {} — {}",
        isl.source,
        if groups.is_empty() { "none".into() } else { groups.join(" ") },
        isl.detail
    );
    println!("plan: {} rank(s) on this node, tensor parallel {}", p.len(), a.tp.max(1));
    print!("{}", topo::plan::table(&p));
    Ok(())
}

/// Tensor-parallel groups of `tp` consecutive ranks of the `ranks` on machine `m` must
/// each lie inside one NVLink island (and tile it): an error naming the GPUs otherwise.
/// A machine without GPUs (the simulator) has nothing to check.
pub fn check_tp_islands(m: &Machine, isl: &Islands, ranks: usize, tp: usize) -> Result<(), String> {
    if tp <= 1 || m.gpus.is_empty() {
        return Ok(());
    }
    match plan(m, isl, ranks, tp) {
        Err(e @ (plan::PlanError::GroupCrossesIslands { .. } | plan::PlanError::TpDoesNotDivideIsland { .. })) => {
            Err(format!("--tp {tp}: {e}; `fp8train topo --tp {tp}` shows the plan"))
        }
        _ => Ok(()),
    }
}

/// Bind this process (local rank `local_rank` of `ranks_per_node`, tensor-parallel
/// size `tp`) per the live machine's plan and log what the operating system reports.
/// Binding failures are warnings (training runs unbound rather than not at all); with
/// `gpus` (a GPU backend), tensor-parallel groups that would cross NVLink islands are an
/// error. `bind`: false checks the islands only. `islands`: declared islands (as `topo
/// --islands`) for a machine that does not report its NVLinks.
pub fn bind_at_start(
    local_rank: usize,
    ranks_per_node: usize,
    tp: usize,
    gpus: bool,
    bind: bool,
    islands: Option<String>,
    log: &slog::Logger,
) -> Result<(), String> {
    let args = TopoArgs { ranks_per_node: Some(ranks_per_node), tp, islands, ..Default::default() };
    if gpus && tp > 1 {
        if let Ok((m, isl)) = machine_and_islands(&args) {
            check_tp_islands(&m, &isl, ranks_per_node, tp)?;
        }
    }
    if !bind {
        return Ok(());
    }
    let placed = placement(&args).and_then(|(_, _, p)| {
        let me = p.into_iter().nth(local_rank).ok_or_else(|| format!("no placement for local rank {local_rank}"))?;
        let got = topo::bind::bind_self(&me)?;
        Ok((me, got))
    });
    match placed {
        Ok((me, got)) => {
            slog::info!(log, "bound"; "local_rank" => local_rank, "gpu" => me.gpu.map(|g| g.to_string()).unwrap_or_else(|| "none".into()), "binding" => got.to_string())
        }
        Err(e) => slog::warn!(log, "running unbound"; "reason" => e),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/fixtures").join(name)
    }

    /// Training refuses tensor-parallel groups that would cross NVLink islands, naming
    /// the GPUs: the g4dn.metal's 8 T4s have no NVLink (each its own island); an NDv5's
    /// 8 H100s are one NVSwitch island; a machine without GPUs is not checked.
    #[test]
    fn tensor_parallel_groups_stay_inside_nvlink_islands() {
        let g4 = hwloc::machine(Some(&fixture("g4dnmetal.xml"))).unwrap();
        let isl = islands::resolve(&g4, None, None).unwrap();
        let e = check_tp_islands(&g4, &isl, 8, 2).unwrap_err();
        assert!(e.contains("--tp 2") && e.contains("GPUs 0-1") && e.contains("cross NVLink islands"), "{e}");
        assert!(check_tp_islands(&g4, &isl, 8, 1).is_ok());
        let declared = islands::resolve(&g4, Some("0-3 4-7"), None).unwrap();
        assert!(check_tp_islands(&g4, &declared, 8, 4).is_ok());
        assert!(check_tp_islands(&g4, &declared, 8, 8).unwrap_err().contains("GPUs 0-7"));
        // Azure's NCCL file for NDv5 lists no NVLink entries: declared, as `--islands 0-7`.
        let ndv5 = nccl::machine(&fixture("ndv5-topo.xml")).unwrap();
        let isl = islands::resolve(&ndv5, Some("0-7"), None).unwrap();
        assert!(check_tp_islands(&ndv5, &isl, 8, 8).is_ok());
        let undeclared = islands::resolve(&ndv5, None, None).unwrap();
        assert!(check_tp_islands(&ndv5, &undeclared, 8, 8).is_err());
        let mut cpu_only = g4.clone();
        cpu_only.gpus.clear();
        assert!(check_tp_islands(&cpu_only, &islands::resolve(&cpu_only, None, None).unwrap(), 2, 2).is_ok());
    }
}
