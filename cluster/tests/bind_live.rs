//! Binding on this machine: bind, read back, restore. (Alone in its test binary:
//! binding applies to the whole process.)

use fp8cluster::topo::{bind, hwloc, islands, plan};

#[test]
fn bind_to_the_plan_and_read_it_back() {
    let before = bind::current_cpus().unwrap();
    let m = hwloc::machine(None).unwrap();
    let isl = islands::resolve(&m, None, None).unwrap();
    let ranks = if m.gpus.is_empty() { m.cores.len().min(2) } else { m.gpus.len().min(2) };
    let p = plan(&m, &isl, ranks, 1).unwrap();
    let last = p.last().unwrap();
    let got = bind::bind_self(last).unwrap();
    assert_eq!(got.cpus, last.cpus, "read-back CPU binding");
    assert_eq!(bind::current_cpus().unwrap(), last.cpus);
    if let Ok(nodes) = &got.memory {
        assert_eq!(nodes, &last.numa_nodes);
    }
    eprintln!("bound to {got}");
    // Restore the original binding.
    let all = fp8cluster::topo::Placement { cpus: before.clone(), numa_nodes: vec![], ..last.clone() };
    assert_eq!(bind::bind_self(&all).unwrap().cpus, before);
}
