//! Placement plans on real topologies and on the project's synthetic NDv5 hwloc XML,
//! all committed under `cluster/fixtures/` (SOURCES.md there says where each came from).

use fp8cluster::topo::machine::{parse_ranges, Machine};
use fp8cluster::topo::{hwloc, islands, nccl, plan, IslandSource, PlanError};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn r(s: &str) -> Vec<u32> {
    parse_ranges(s).unwrap()
}

/// (cpus, numa, gpu, island, tp_group) of one rank.
type Row = (Vec<u32>, Vec<u32>, usize, usize, usize);

fn plan_of(m: &Machine, declared: Option<&str>, ranks: usize, tp: usize) -> Vec<Row> {
    let isl = islands::resolve(m, declared, None).unwrap();
    plan(m, &isl, ranks, tp)
        .unwrap()
        .into_iter()
        .map(|p| (p.cpus, p.numa_nodes, p.gpu.unwrap(), p.island.unwrap(), p.tp_group))
        .collect()
}

#[test]
fn g4dn_metal_8_gpus_on_2_numa_nodes() {
    let m = hwloc::machine(Some(&fixture("g4dnmetal.xml"))).unwrap();
    assert_eq!((m.cores.len(), m.pus(), m.numa_nodes.len(), m.gpus.len()), (48, 96, 2, 8));
    for g in &m.gpus[..4] {
        assert_eq!(g.local_pus, r("0-23,48-71"), "GPU {} locality", g.index);
        assert_eq!(g.numa_nodes, vec![0]);
    }
    for g in &m.gpus[4..] {
        assert_eq!(g.local_pus, r("24-47,72-95"));
    }
    assert_eq!(m.gpus[0].bus_id, "0000:18:00.0");
    assert_eq!(m.gpus[7].bus_id, "0000:f5:00.0");
    let isl = islands::resolve(&m, None, None).unwrap();
    assert_eq!(isl.source, IslandSource::Unknown); // T4s over PCIe: no NVLink
                                                   // 8 ranks: each GPU's package split 4 ways, 6 whole cores each, siblings together.
    let p = plan_of(&m, None, 8, 1);
    let want = [
        ("0-5,48-53", 0),
        ("6-11,54-59", 0),
        ("12-17,60-65", 0),
        ("18-23,66-71", 0),
        ("24-29,72-77", 1),
        ("30-35,78-83", 1),
        ("36-41,84-89", 1),
        ("42-47,90-95", 1),
    ];
    for (rank, (cpus, numa)) in want.iter().enumerate() {
        assert_eq!(p[rank], (r(cpus), vec![*numa], rank, rank, rank), "rank {rank}");
    }
    // 2 ranks: GPUs 0 and 1 share package 0 (12 cores each); package 1 unused.
    let p = plan_of(&m, None, 2, 1);
    assert_eq!(p[0].0, r("0-11,48-59"));
    assert_eq!(p[1].0, r("12-23,60-71"));
    // Tensor parallel over PCIe-only GPUs crosses islands unless declared.
    let isl = islands::resolve(&m, None, None).unwrap();
    assert!(matches!(plan(&m, &isl, 8, 2), Err(PlanError::GroupCrossesIslands { .. })));
    let p = plan_of(&m, Some("0-3 4-7"), 8, 4);
    assert_eq!(
        p.iter().map(|x| (x.3, x.4)).collect::<Vec<_>>(),
        vec![(0, 0), (0, 0), (0, 0), (0, 0), (1, 1), (1, 1), (1, 1), (1, 1)]
    );
}

#[test]
fn dgx2_16_gpus_one_nvswitch_island() {
    let m = hwloc::machine(Some(&fixture("nvidiaDGX2.xml"))).unwrap();
    assert_eq!(m.gpus.len(), 16);
    assert!(m.nvswitches > 0);
    assert!(m.gpus.iter().all(|g| g.pci_id == "10de:1db8"));
    let isl = islands::resolve(&m, None, None).unwrap();
    assert_eq!(isl.source, IslandSource::HwlocNvswitch);
    assert_eq!(isl.groups, vec![(0..16).collect::<Vec<_>>()]);
    // This hwloc test fixture keeps only 2 cores per package (0-1 and 24-25).
    assert_eq!(m.gpus[0].local_pus, r("0-1"));
    assert_eq!(m.gpus[8].local_pus, r("24-25"));
    let p = plan_of(&m, None, 2, 2);
    assert_eq!(p, vec![(vec![0], vec![0], 0, 0, 0), (vec![1], vec![0], 1, 0, 0)]);
    // 16 ranks: 8 ranks would share 2 cores near each package.
    assert!(matches!(plan(&m, &isl, 16, 8), Err(PlanError::TooFewCores { cores: 2, ranks: 8, .. })));
}

#[test]
fn h200x2_two_gpus_one_numa_node() {
    let m = hwloc::machine(Some(&fixture("h200x2-lstopo.xml"))).unwrap();
    assert_eq!((m.cores.len(), m.numa_nodes.len()), (32, 1));
    assert_eq!(m.gpus.iter().map(|g| g.bus_id.as_str()).collect::<Vec<_>>(), vec!["0000:00:06.0", "0000:00:07.0"]);
    assert_eq!(m.gpus[0].pci_id, "10de:2335");
    let p = plan_of(&m, None, 2, 1);
    assert_eq!(p, vec![(r("0-15"), vec![0], 0, 0, 0), (r("16-31"), vec![0], 1, 1, 1)]);
    // NV18 between the two is not visible to hwloc: tp 2 needs NVML or a declaration.
    let isl = islands::resolve(&m, None, None).unwrap();
    let e = plan(&m, &isl, 2, 2).unwrap_err().to_string();
    assert!(e.contains("would cross NVLink islands") && e.contains("--islands 0-1"), "{e}");
    let p = plan_of(&m, Some("0-1"), 2, 2);
    assert_eq!((p[0].3, p[1].3, p[1].4), (0, 0, 0));
}

#[test]
fn ndv5_nccl_topology_and_synthetic_hwloc_agree() {
    let n = nccl::machine(&fixture("ndv5-topo.xml")).unwrap();
    assert_eq!((n.gpus.len(), n.numa_nodes.len(), n.cores.len()), (8, 2, 96));
    assert!(!n.nvlink_info, "Azure's file lists no NVLink entries");
    let bus: Vec<&str> = n.gpus.iter().map(|g| g.bus_id.as_str()).collect();
    assert_eq!(
        bus,
        vec![
            "0001:00:00.0",
            "0002:00:00.0",
            "0003:00:00.0",
            "0008:00:00.0",
            "0009:00:00.0",
            "000a:00:00.0",
            "000b:00:00.0",
            "000c:00:00.0"
        ]
    );
    let h = hwloc::machine(Some(&fixture("ndv5-synthetic.xml"))).unwrap();
    assert_eq!((h.gpus.len(), h.numa_nodes.len(), h.cores.len()), (8, 2, 96));
    assert_eq!(h.gpus.iter().map(|g| g.bus_id.as_str()).collect::<Vec<_>>(), bus);
    let from_nccl = plan_of(&n, Some("0-7"), 8, 8);
    let from_hwloc = plan_of(&h, Some("0-7"), 8, 8);
    assert_eq!(from_nccl, from_hwloc);
    for (rank, p) in from_hwloc.iter().enumerate() {
        let lo = 12 * rank as u32;
        assert_eq!(p.0, (lo..lo + 12).collect::<Vec<_>>(), "rank {rank}");
        assert_eq!(p.1, vec![u32::from(rank >= 4)]);
        assert_eq!((p.3, p.4), (0, 0));
    }
    // 4 ranks: GPUs 0-3 share socket 0, 12 cores each.
    let p = plan_of(&h, Some("0-7"), 4, 2);
    assert_eq!(p[3].0, r("36-47"));
    assert_eq!(p.iter().map(|x| x.4).collect::<Vec<_>>(), vec![0, 0, 1, 1]);
}

#[test]
fn nvlink_entries_of_an_nccl_file_make_islands() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("topo.xml");
    let gpu = |b: &str, links: &str| format!(r#"<pci busid="{b}" class="0x030200">{links}</pci>"#);
    let sw = r#"<nvlink target="0000:aa:00.0" count="6" tclass="0x068000"/>"#;
    let xml = format!(
        r#"<system version="1"><cpu numaid="0" affinity="0000000f">{}{}{}{}</cpu></system>"#,
        gpu("0000:01:00.0", sw),
        gpu("0000:02:00.0", sw),
        gpu("0000:03:00.0", r#"<nvlink target="0000:04:00.0" count="4"/>"#),
        gpu("0000:04:00.0", "")
    );
    std::fs::write(&f, xml).unwrap();
    let m = nccl::machine(&f).unwrap();
    let isl = islands::resolve(&m, None, None).unwrap();
    assert_eq!(isl.source, IslandSource::NcclTopo);
    assert_eq!(isl.groups, vec![vec![0, 1], vec![2, 3]]);
    let e = plan(&m, &isl, 4, 4).unwrap_err();
    assert!(matches!(e, PlanError::GroupCrossesIslands { .. }), "{e}");
    assert_eq!(
        plan(&m, &isl, 4, 2).unwrap().iter().map(|p| p.island).collect::<Vec<_>>(),
        vec![Some(0), Some(0), Some(1), Some(1)]
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let e = hwloc::machine(Some(&PathBuf::from("/nonexistent/topo.xml"))).unwrap_err().to_string();
    assert!(e.contains("no such file"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.xml");
    std::fs::write(&bad, "<topology version=\"2.0\"><object type=").unwrap();
    let e = hwloc::machine(Some(&bad)).unwrap_err().to_string();
    assert!(e.contains("bad.xml") && e.contains("cannot load"), "{e}");
    let e = nccl::machine(&bad).unwrap_err().to_string();
    assert!(e.contains("malformed XML"), "{e}");
    let e = nccl::machine(&fixture("g4dnmetal.xml")).unwrap_err().to_string();
    assert!(e.contains("expected <system>"), "{e}");
    let m = hwloc::machine(Some(&fixture("h200x2-lstopo.xml"))).unwrap();
    let isl = islands::resolve(&m, None, None).unwrap();
    assert_eq!(plan(&m, &isl, 3, 1).unwrap_err(), PlanError::MoreRanksThanGpus { ranks: 3, gpus: 2 });
    assert_eq!(plan(&m, &isl, 0, 1).unwrap_err(), PlanError::NoRanks);
    let g4 = hwloc::machine(Some(&fixture("g4dnmetal.xml"))).unwrap();
    let isl = islands::resolve(&g4, Some("0-2 3-7"), None).unwrap();
    let e = plan(&g4, &isl, 2, 2).unwrap_err();
    assert!(matches!(e, PlanError::TpDoesNotDivideIsland { tp: 2, size: 3, .. }), "{e}");
    assert!(plan(&g4, &isl, 3, 2).unwrap_err().to_string().contains("--tp 2 does not divide --ranks-per-node 3"));
    assert!(islands::resolve(&g4, Some("0-9"), None).unwrap_err().contains("GPU 8 does not exist"));
}

#[test]
fn a_machine_without_gpus_splits_its_cores() {
    let m = Machine {
        source: "test".into(),
        cores: (0..10).map(|c| vec![c]).collect(),
        numa_nodes: vec![
            fp8cluster::topo::machine::NumaNode { os_index: 0, pus: (0..5).collect() },
            fp8cluster::topo::machine::NumaNode { os_index: 1, pus: (5..10).collect() },
        ],
        gpus: vec![],
        nvswitches: 0,
        nvlinks: vec![],
        nvlink_info: false,
    };
    let isl = islands::resolve(&m, None, None).unwrap();
    let p = plan(&m, &isl, 3, 1).unwrap();
    assert_eq!(p.iter().map(|x| x.cpus.clone()).collect::<Vec<_>>(), vec![r("0-3"), r("4-6"), r("7-9")]);
    assert_eq!(p[1].numa_nodes, vec![0, 1]);
    assert_eq!(plan(&m, &isl, 11, 1).unwrap_err(), PlanError::MoreRanksThanCores { ranks: 11, cores: 10 });
}

#[test]
fn h200x2_exported_by_fp8train_topo_matches_the_lstopo_capture() {
    // cluster/fixtures/h200x2-export.xml was written by `fp8train topo --export-xml` on
    // the lent 2x H200 machine (2026-11-29); cluster/fixtures/h200x2-lstopo.xml by lstopo.
    let ours = hwloc::machine(Some(&fixture("h200x2-export.xml"))).unwrap();
    let theirs = hwloc::machine(Some(&fixture("h200x2-lstopo.xml"))).unwrap();
    assert_eq!(
        ours.gpus.iter().map(|g| &g.bus_id).collect::<Vec<_>>(),
        theirs.gpus.iter().map(|g| &g.bus_id).collect::<Vec<_>>()
    );
    assert_eq!(plan_of(&ours, Some("0-1"), 2, 2), plan_of(&theirs, Some("0-1"), 2, 2));
}

#[test]
fn an_xml_that_crashes_hwloc_is_an_error() {
    // libhwloc segfaults on this file (a duplicated core): read in a child process, the
    // crash becomes an error naming the file.
    let e = hwloc::machine(Some(&fixture("bad-duplicate-core.xml"))).unwrap_err().to_string();
    assert!(e.contains("bad-duplicate-core.xml") && e.contains("hwloc crashed reading it"), "{e}");
}
