//! Helpers shared by the integration tests that train through the binary.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A tiny model and corpus so each run takes a fraction of a second.
pub const TINY: &[&str] = &[
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_embd=32",
    "--set",
    "model.n_head=2",
    "--set",
    "model.seq_len=16",
    "--set",
    "data.corpus_bytes=20000",
    "--set",
    "train.eval_batches=2",
    "--set",
    "train.warmup_steps=2",
    "--no-progress",
];

/// The records of `kind` ("data", "step", "eval", "final") in a run's metrics.
pub fn records(run: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// A checkpoint file's bytes.
pub fn file(run: &Path, step: u64, name: &str) -> Vec<u8> {
    std::fs::read(run.join(format!("checkpoints/step-{step:06}/{name}"))).unwrap()
}

/// Every tensor of a checkpoint file (name, dtype, bytes); metadata (which names the
/// run folder) left out.
pub fn tensors(run: &Path, step: u64, name: &str) -> Vec<(String, String, Vec<u8>)> {
    let bytes = file(run, step, name);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> =
        st.tensors().into_iter().map(|(n, t)| (n, format!("{:?}", t.dtype()), t.data().to_vec())).collect();
    v.sort();
    v
}

pub fn binary() -> PathBuf {
    assert_cmd::cargo::cargo_bin("fp8train")
}

/// `mpirun -np N fp8train --threads 1 train TINY extra` into `out/name`.
pub fn mpirun(np: usize, out: &Path, name: &str, extra: &[&str]) -> Output {
    let o = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()])
        .arg(binary())
        .args(["--threads", "1", "train", "--out", out.to_str().unwrap(), "--name", name])
        .args(TINY)
        .args(extra)
        .output()
        .expect("mpirun is required for these tests (scripts/bootstrap installs openmpi-bin)");
    o
}

pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "run failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn steps(run: &Path) -> Vec<serde_json::Value> {
    records(run, "step")
}

pub fn loss_bits(run: &Path) -> Vec<u64> {
    steps(run).iter().map(|v| v["loss_bits"].as_u64().unwrap()).collect()
}
