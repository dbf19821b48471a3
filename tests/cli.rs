//! The binary as a user runs it.

use assert_cmd::Command;

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
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(sub)),
            "--help does not list {sub}:\n{help}"
        );
    }
}

#[test]
fn unbuilt_subcommands_say_so_in_one_line_and_fail() {
    let out = fp8train().args(["verify", "--backend", "cuda"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("fp8train verify: not built yet"), "{err}");
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
        for key in [
            "sgemm_gflops",
            "exact_f32_gflops",
            "exact_bf16_gflops",
            "exact_e4m3_gflops",
            "e4m3_over_sgemm",
        ] {
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
    let out = fp8train()
        .args(["bench", "gemm", "--backend", "cuda"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CUDA backend is not built"));
    let out = fp8train().args(["bench", "gemm", "--sizes", "abc"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2)); // clap usage error
}

#[test]
fn log_json_writes_json_lines() {
    let out = fp8train()
        .args(["--log-json", "bench", "gemm", "--sizes", "32", "--min-time", "0"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("bench gemm")).expect("a log record");
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(v["msg"], "bench gemm");
    assert_eq!(v["size"], 32);
    assert!(v["level"].is_string() && v["ts"].is_string());
}
