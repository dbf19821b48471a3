//! The binary as a user runs it.

use assert_cmd::Command;

mod common;

fn fp8train() -> Command {
    Command::cargo_bin("fp8train").expect("binary is built")
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn help_lists_every_subcommand() {
    let help = stdout_of(fp8train().arg("--help"));
    for sub in ["train", "eval", "sample", "report", "topo", "bench", "verify"] {
        assert!(help.lines().any(|l| l.trim_start().starts_with(sub)), "--help does not list {sub}:\n{help}");
    }
}

#[test]
fn verify_without_a_gpu_says_why_and_fails() {
    // No GPU (CI has none; elsewhere CUDA_VISIBLE_DEVICES hides them): a clear error, no panic.
    let out =
        fp8train().env("CUDA_VISIBLE_DEVICES", "").args(["verify", "--backend", "cuda", "--quick"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("verify --backend cuda: no usable GPU") && !err.contains("panicked"), "{err}");
    let out = fp8train().args(["verify", "--backend", "sim"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("use --backend cuda"));
}

#[test]
fn bench_gemm_prints_table_and_json_with_the_ratio() {
    let out = stdout_of(fp8train().args(["--threads", "2", "bench", "gemm", "--sizes", "64,96", "--min-time", "0"]));
    let mut lines = out.lines();
    assert!(lines.next().unwrap().contains("matrixmultiply"));
    assert!(out.contains("e4m3 / sgemm"));
    let json_line = out.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(json_line).expect("last line is JSON");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(v["threads"], 2);
    for (row, size) in rows.iter().zip([64, 96]) {
        assert_eq!(row["size"], size);
        for key in ["sgemm_gflops", "exact_f32_gflops", "exact_bf16_gflops", "exact_e4m3_gflops", "e4m3_over_sgemm"] {
            let x = row[key].as_f64().unwrap_or(0.0);
            assert!(x.is_finite() && x > 0.0, "{key} = {x}");
        }
        let ratio = row["sgemm_gflops"].as_f64().unwrap();
        let e4m3 = row["exact_e4m3_gflops"].as_f64().unwrap();
        assert!((row["e4m3_over_sgemm"].as_f64().unwrap() - e4m3 / ratio).abs() < 1e-9);
    }
    // --json prints the document alone.
    let only = stdout_of(fp8train().args(["bench", "gemm", "--sizes", "32", "--min-time", "0", "--json"]));
    assert_eq!(only.lines().count(), 1);
    serde_json::from_str::<serde_json::Value>(only.trim()).unwrap();
}

#[test]
fn bench_gemm_bad_input_is_a_clear_error() {
    let out = fp8train().args(["bench", "gemm", "--sizes", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sizes"));
    let out = fp8train().args(["bench", "gemm", "--backend", "cuda"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("GPU GEMM benchmark is not built yet"));
    let out = fp8train().args(["bench", "gemm", "--sizes", "abc"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2)); // clap usage error
}

#[test]
fn log_json_writes_json_lines() {
    let out = fp8train().args(["--log-json", "bench", "gemm", "--sizes", "32", "--min-time", "0"]).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("bench gemm")).expect("a log record");
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(v["msg"], "bench gemm");
    assert_eq!(v["size"], 32);
    assert!(v["level"].is_string() && v["ts"].is_string());
}

fn fixture_topology(name: &str) -> String {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cluster/fixtures").join(name);
    assert!(p.is_file(), "fixture {} is required", p.display());
    p.to_str().unwrap().to_string()
}

#[test]
fn topo_explains_the_ndv5_fixture_as_json_and_table() {
    let xml = concat!(env!("CARGO_MANIFEST_DIR"), "/cluster/fixtures/ndv5-synthetic.xml");
    let out = stdout_of(fp8train().args(["topo", "--topology-xml", xml, "--islands", "0-7", "--tp", "8", "--json"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let plan = v["plan"].as_array().unwrap();
    assert_eq!(plan.len(), 8);
    assert_eq!(v["islands"]["source"], "declared");
    let cpus: Vec<u64> = plan[7]["cpus"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect();
    assert_eq!(cpus, (84..96).collect::<Vec<_>>());
    assert_eq!(plan[7]["numa_nodes"], serde_json::json!([1]));
    assert_eq!(plan[7]["bus_id"], "000c:00:00.0");
    let table =
        stdout_of(fp8train().args(["topo", "--nccl-topo", &fixture_topology("ndv5-topo.xml"), "--islands", "0-7"]));
    assert!(
        table.contains("8 NVIDIA GPU(s)") && table.contains("NVLink islands (declared (--islands)): [0-7]"),
        "{table}"
    );
    assert!(table.contains("   7 |   7 | 000c:00:00.0 | 84-95"), "{table}");
}

#[test]
fn topo_bad_input_is_a_clear_error() {
    let err_of = |args: &[&str]| {
        let o = fp8train().arg("topo").args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let ndv5 = fixture_topology("ndv5-topo.xml");
    assert!(err_of(&["--nccl-topo", &ndv5, "--tp", "8"]).contains("--islands 0-7"));
    assert!(err_of(&["--nccl-topo", &ndv5, "--ranks-per-node", "9"]).contains("more than the 8 GPU(s)"));
    assert!(err_of(&["--topology-xml", "/nonexistent.xml"]).contains("/nonexistent.xml: no such file"));
    assert!(err_of(&["--nccl-topo", &ndv5, "--islands", "0-5", "--ranks-per-node", "2", "--tp", "4"])
        .contains("does not divide --ranks-per-node"));
    assert!(err_of(&["--nccl-topo", &ndv5, "--islands", "0-5", "--ranks-per-node", "4", "--tp", "4"])
        .contains("--tp 4 does not divide NVLink island 0 (6 GPUs"));
    // An NVLink entry naming a GPU bus id that the hwloc topology does not have.
    let dir = tempfile::tempdir().unwrap();
    let nccl = dir.path().join("links.xml");
    std::fs::write(
        &nccl,
        r#"<system version="1"><cpu numaid="0" affinity="ffffffff"><pci busid="0000:99:00.0" class="0x030200"><nvlink target="0000:9a:00.0" count="4"/></pci><pci busid="0000:9a:00.0" class="0x030200"/></cpu></system>"#,
    )
    .unwrap();
    let e = err_of(&["--topology-xml", &fixture_topology("g4dnmetal.xml"), "--nccl-topo", nccl.to_str().unwrap()]);
    assert!(e.contains("GPU 0000:99:00.0 or 0000:9a:00.0 is not in the hwloc topology"), "{e}");
}

#[test]
fn topo_exports_this_machine_as_a_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("me.xml");
    let live = stdout_of(fp8train().args(["topo", "--json", "--export-xml", xml.to_str().unwrap()]));
    let again = stdout_of(fp8train().args(["topo", "--json", "--topology-xml", xml.to_str().unwrap()]));
    let (a, b): (serde_json::Value, serde_json::Value) =
        (serde_json::from_str(live.trim()).unwrap(), serde_json::from_str(again.trim()).unwrap());
    assert_eq!(a["machine"]["cores"], b["machine"]["cores"]);
    assert_eq!(a["plan"], b["plan"]);
}

#[test]
fn bench_step_times_training_steps_on_the_simulator() {
    // The same step as `train` (train::train_step) on random tokens; the record says what ran.
    let out = stdout_of(fp8train().args([
        "--threads",
        "2",
        "bench",
        "step",
        "--model",
        "default",
        "--backend",
        "sim",
        "--gemm",
        "exact",
        "--level",
        "O2",
        "--batch",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
    ]));
    let r: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON document");
    assert_eq!(r["params"], 120576);
    assert_eq!((r["batch"].as_u64(), r["seq"].as_u64(), r["level"].as_str()), (Some(4), Some(64), Some("O2")));
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0 && r["step_ms_median"].as_f64().unwrap() > 0.0);
    // 6 N + 12 L d T FLOPs per token
    assert_eq!(r["flops_per_token"].as_f64().unwrap(), 6.0 * 120576.0 + 12.0 * 2.0 * 64.0 * 64.0);
    let loss = r["final_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    // The memory check's estimate is reported (the simulator has no allocator slack).
    let est = r["estimate_bytes"].as_u64().unwrap();
    assert!(est > 120576 * 6 && est < 1 << 30, "estimate {est}");
    assert_eq!(r["estimate_slack_bytes"].as_u64(), Some(0));
    for (args, says) in [
        (vec!["--model", "gpt-7"], "unknown shape"),
        (vec!["--model", "default", "--backend", "sim", "--gemm", "fast"], "needs --backend cuda"),
        (vec!["--model", "default", "--backend", "sim", "--gemm", "exact", "--level", "O3"], "O3"),
        (vec!["--model", "default", "--backend", "sim", "--gemm", "exact", "--steps", "0"], "--steps"),
        (vec!["--model", "default", "--backend", "sim", "--gemm", "exact", "--warmup-s=-1"], "--warmup-s"),
    ] {
        let out = fp8train().args(["bench", "step"]).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

/// The NDv5-class launch kit's dry runs print the commands for 2 nodes x 8 GPUs.
#[test]
fn launch_kit_dry_runs_for_two_nodes() {
    let kit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/launch/fp8train-launch");
    let run = |args: &[&str]| std::process::Command::new("bash").arg(&kit).args(args).output().unwrap();
    let o = run(&["mpirun", "--hosts", "n1,n2", "--dry-run", "--", "train", "--level", "O2"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{out}");
    for want in [
        "-np 16",
        "n1:8",
        "n2:8",
        "--map-by ppr:8:node",
        "--bind-to none",
        "NCCL_IB_PCI_RELAXED_ORDERING=1",
        "train --level O2",
    ] {
        assert!(out.contains(want), "missing {want:?} in {out}");
    }
    let o = run(&["slurm", "--nodes", "2", "--dry-run", "--", "train"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    for want in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "srun --mpi=pmix"] {
        assert!(out.contains(want), "missing {want:?} in {out}");
    }
    let o = run(&["bench", "--hosts", "n1,n2", "--out", "rep", "--dry-run"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.iter().any(|l| l.contains("-np 2") && l.contains("topo --ranks-per-node 8")), "{out}");
    assert!(lines.iter().any(|l| l.contains("-np 16") && l.contains("bench comm --model gpt-1.3b --json")), "{out}");
    for level in ["O2", "bf16"] {
        assert!(lines.iter().any(|l| l.contains("-np 16") && l.contains(&format!("--name dp-{level}"))), "{out}");
        assert!(
            lines.iter().any(|l| l.contains("-np 1 -H n1:1") && l.contains(&format!("--name one-{level}"))),
            "{out}"
        );
    }
    assert!(lines.last().is_some_and(|l| l.contains("bench report rep")), "{out}");
    // A tensor-parallel size that does not divide a node's GPUs is refused, named.
    let o = run(&["mpirun", "--hosts", "n1", "--tp", "3", "--dry-run", "--", "train"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--tp 3 must divide --gpus-per-node 8"));
}

#[test]
fn bench_kernels_measures_each_op_against_the_copy() {
    let args = ["--threads", "2", "bench", "kernels", "--backend", "sim", "--model", "default", "--reps", "1"];
    let out = stdout_of(fp8train().args(args));
    assert!(out.lines().next().unwrap().contains("fraction of a device copy"), "{out}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).expect("last line is JSON");
    let rows = v["rows"].as_array().unwrap();
    let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(ops[0], "copy (baseline)");
    for want in [
        "layernorm forward",
        "layernorm backward",
        "GELU forward",
        "GELU backward",
        "residual",
        "cross-entropy",
        "AdamW",
    ] {
        assert!(ops.iter().any(|o| o.starts_with(want)), "no {want} row in {ops:?}");
    }
    let copy = v["copy_gb_per_s"].as_f64().unwrap();
    for r in rows {
        let (ms, bytes, gbs) =
            (r["ms"].as_f64().unwrap(), r["bytes"].as_f64().unwrap(), r["gb_per_s"].as_f64().unwrap());
        assert!(ms > 0.0 && bytes > 0.0, "{r}");
        assert!((gbs - bytes / (ms * 1e-3) / 1e9).abs() <= 1e-9 * gbs.max(1.0), "{r}");
        assert!((r["of_copy"].as_f64().unwrap() - gbs / copy).abs() < 1e-9, "{r}");
    }
    // Bad input: a clear error, no panic.
    for bad in [&["--reps", "0"][..], &["--model", "gpt-99b"][..]] {
        let out = fp8train().args(["bench", "kernels", "--backend", "sim"]).args(bad).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked") && err.contains("bench"), "{bad:?}: {err}");
    }
}

/// `bench train --json` prints the JSON document alone (the runs' step lines stay in
/// their run folders), one row per level; without it the table comes first.
#[test]
fn bench_train_json_is_the_document_alone() {
    // The tests' tiny model (bench train takes its settings, not train's flags).
    let tiny: Vec<&str> = common::TINY.iter().copied().filter(|a| a.starts_with("--set") || a.contains('=')).collect();
    let out = stdout_of(fp8train().args(["--threads", "2", "bench", "train", "--steps", "2", "--json"]).args(&tiny));
    let doc: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not one JSON document: {e}\n{out}"));
    assert_eq!(doc["bench"], "train");
    let levels: Vec<&str> = doc["rows"].as_array().unwrap().iter().map(|r| r["level"].as_str().unwrap()).collect();
    assert_eq!(levels, ["bf16", "O1", "O2"]);
    let out = stdout_of(fp8train().args(["--threads", "2", "bench", "train", "--steps", "2"]).args(&tiny));
    assert!(out.lines().any(|l| l.starts_with("level |")) && out.trim_end().ends_with('}'), "{out}");
}
