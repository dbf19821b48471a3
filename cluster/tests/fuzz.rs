//! Fuzzing the topology inputs: hwloc XML and NCCL topology files (damaged copies of the
//! real fixtures) and `--islands` / CPU-list strings. The property: an error or a
//! machine, never a panic, and no allocation beyond what the input justifies. Each test
//! prints how many cases it tried.

use fp8cluster::topo::machine::parse_ranges;
use fp8cluster::topo::{hwloc, islands, nccl, plan};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)).unwrap()
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

/// `b` damaged: op 0 flips a byte, 1 truncates, 2 deletes a span, 3 duplicates a span,
/// 4 overwrites a span with one byte (digits too: numbers out of range).
fn damage(mut b: Vec<u8>, op: u8, at: usize, len: usize, byte: u8) -> Vec<u8> {
    let i = at % b.len().max(1);
    let j = (i + len % 400).min(b.len());
    match op % 5 {
        0 => b[i] ^= byte | 1,
        1 => b.truncate(i),
        2 => {
            b.drain(i..j);
        }
        3 => {
            let span: Vec<u8> = b[i..j].to_vec();
            b.splice(i..i, span);
        }
        _ => b[i..j].iter_mut().for_each(|x| *x = if byte.is_multiple_of(2) { b'9' } else { byte }),
    }
    b
}

#[test]
fn damaged_topology_files_are_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let tried = std::cell::Cell::new(0u32);
    let parsed = std::cell::Cell::new(0u32);
    let files = [
        ("g4dnmetal.xml", false),
        ("h200x2-lstopo.xml", false),
        ("ndv5-synthetic.xml", false),
        ("ndv5-topo.xml", true),
        ("ndv4-topo.xml", true),
    ];
    let originals: Vec<(Vec<u8>, bool)> = files.iter().map(|(f, n)| (fixture(f), *n)).collect();
    runner(300)
        .run(&(0..files.len(), any::<u8>(), any::<usize>(), any::<usize>(), any::<u8>()), |(f, op, at, len, byte)| {
            tried.set(tried.get() + 1);
            let (bytes, is_nccl) = &originals[f];
            let path = dir.path().join("topo.xml");
            std::fs::write(&path, damage(bytes.clone(), op, at, len, byte)).unwrap();
            let m = if *is_nccl { nccl::machine(&path) } else { hwloc::machine(Some(&path)) };
            if let Ok(m) = m {
                parsed.set(parsed.get() + 1);
                if let Ok(isl) = islands::resolve(&m, None, None) {
                    let _ = plan(&m, &isl, m.gpus.len().max(1), 1);
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz topology files: {} cases ({} still parsed)", tried.get(), parsed.get());
}

#[test]
fn island_and_cpu_lists_are_errors_never_panics() {
    let m =
        hwloc::machine(Some(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/ndv5-synthetic.xml"))).unwrap();
    let tried = std::cell::Cell::new(0u32);
    let spec = proptest::collection::vec(
        prop_oneof![
            Just("0".to_string()),
            Just("7".to_string()),
            Just("-".to_string()),
            Just(",".to_string()),
            Just(" ".to_string()),
            Just(";".to_string()),
            Just("4294967295".to_string()),
            Just("99999999999".to_string()),
            "[0-9]{1,3}",
            "\\PC{0,3}",
        ],
        0..10,
    )
    .prop_map(|parts| parts.concat());
    runner(2000)
        .run(&(spec, 1usize..9), |(s, tp)| {
            tried.set(tried.get() + 1);
            if let Ok(v) = parse_ranges(&s) {
                prop_assert!(v.windows(2).all(|w| w[0] < w[1]));
            }
            if let Ok(isl) = islands::resolve(&m, Some(&s), None) {
                let _ = plan(&m, &isl, 8, tp);
            }
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz island and CPU lists: {} cases", tried.get());
}
