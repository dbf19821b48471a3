//! `fp8train topo`, and the placement used at training start.

use crate::cli::TopoArgs;
use fp8cluster::topo::{self, hwloc, islands, nccl, plan, Islands, Machine, Placement};
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
    let isl = islands::resolve(&m, a.islands.as_deref(), None)?;
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
        println!(
            "{}",
            json!({"machine": m, "islands": isl, "tp": a.tp.max(1), "plan": p})
        );
        return Ok(());
    }
    println!("{}", m.summary());
    let groups: Vec<String> = isl
        .groups
        .iter()
        .map(|g| {
            format!(
                "[{}]",
                topo::machine::ranges(&g.iter().map(|&x| x as u32).collect::<Vec<_>>())
            )
        })
        .collect();
    println!(
        "NVLink islands ({}): {} — {}",
        isl.source,
        if groups.is_empty() {
            "none".into()
        } else {
            groups.join(" ")
        },
        isl.detail
    );
    println!(
        "plan: {} rank(s) on this node, tensor parallel {}",
        p.len(),
        a.tp.max(1)
    );
    print!("{}", topo::plan::table(&p));
    Ok(())
}
