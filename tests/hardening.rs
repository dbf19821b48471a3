//! Run folders under damage and misuse: torn metrics, stray or incomplete checkpoints,
//! finished runs, foreign checkpoints, concurrent processes. Each case once failed.

mod common;

use assert_cmd::Command;
use common::{records, TINY};
use std::path::{Path, PathBuf};

fn fp8train() -> Command {
    Command::cargo_bin("fp8train").expect("binary is built")
}

fn train_cmd(out: &Path, name: &str, extra: &[&str]) -> Command {
    let mut cmd = fp8train();
    cmd.args(["--threads", "2", "train", "--out", out.to_str().unwrap(), "--name", name]);
    cmd.args(TINY).args(["--set", "train.batch_size=4"]).args(extra);
    cmd
}

fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// stderr of a command that must fail with exit code 1 (an error, not a panic or abort).
fn err(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

fn resume(run: &Path, extra: &[&str]) -> Command {
    let mut cmd = fp8train();
    cmd.args(["--threads", "2", "train", "--no-progress", "--resume", run.to_str().unwrap()]).args(extra);
    cmd
}

fn ckpt(run: &Path, step: u64) -> PathBuf {
    run.join(format!("checkpoints/step-{step:06}"))
}

#[test]
fn torn_metrics_tail_is_dropped_on_resume_and_report_reads_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    ok(&mut train_cmd(dir.path(), "r", &["--steps", "4", "--set", "train.checkpoint_every=2"]));
    // A kill in the middle of a record: the file ends in half a line.
    let metrics = run.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"kind\":\"step\",\"step\":5,\"lo");
    std::fs::write(&metrics, &text).unwrap();
    let summary = ok(fp8train().args(["report", run.to_str().unwrap()]));
    assert!(summary.contains("skipped 1 unreadable line"), "{summary}");
    let o = resume(&run, &["--steps", "6"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("torn record"));
    // Every line whole, steps 1..6 once each.
    let steps: Vec<u64> = records(&run, "step").iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    let summary = ok(fp8train().args(["report", run.to_str().unwrap()]));
    assert!(!summary.contains("unreadable"), "{summary}");
}

#[test]
fn newest_complete_checkpoint_is_chosen_by_step_number() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    ok(&mut train_cmd(dir.path(), "r", &["--steps", "4", "--set", "train.checkpoint_every=2"]));
    let cks = run.join("checkpoints");
    // Strays: an empty folder that sorts last by name, a non-step name, and a folder
    // whose step sorts first by name but is the highest number (7 digits).
    std::fs::create_dir(cks.join("step-999999")).unwrap();
    std::fs::create_dir(cks.join("step-zzz")).unwrap();
    let big = cks.join("step-1000000");
    std::fs::create_dir(&big).unwrap();
    for f in ["model.safetensors", "state.safetensors", "manifest.json"] {
        std::fs::copy(ckpt(&run, 4).join(f), big.join(f)).unwrap();
    }
    // Its manifest says step 4: passed over too, named.
    let o = fp8train().args(["eval", run.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("at step 4"));
    // A damaged newest checkpoint: resume falls back to step 2 and says why.
    std::fs::remove_dir_all(&big).unwrap();
    let st = ckpt(&run, 4).join("state.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&st, bytes).unwrap();
    let o = resume(&run, &["--steps", "5"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("step-000004") && e.contains("SHA-256") && e.contains("step-999999"), "{e}");
    let steps: Vec<u64> = records(&run, "step").iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5], "steps 3 and 4 ran again from the step-2 checkpoint");
    // Nothing complete at all: a clear error naming each.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("checkpoints/step-000001")).unwrap();
    let e = err(fp8train().args(["eval", empty.to_str().unwrap()]));
    assert!(e.contains("no complete checkpoint") && e.contains("manifest.json"), "{e}");
}

#[test]
fn damaged_weights_say_checksum_before_anything_is_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    ok(&mut train_cmd(dir.path(), "r", &["--steps", "2"]));
    let model = ckpt(&run, 2).join("model.safetensors");
    let good = std::fs::read(&model).unwrap();
    let mut bad = good.clone();
    bad[0] ^= 0xff; // the header length: parsing first would say HeaderTooSmall
    std::fs::write(&model, &bad).unwrap();
    let e = err(&mut resume(&ckpt(&run, 2), &["--steps", "3"]));
    assert!(e.contains("SHA-256") && !e.contains("HeaderTooSmall"), "{e}");
    // Much larger than its manifest entry: refused by size, before reading it.
    let mut big = good.clone();
    big.resize(good.len() * 4, 0);
    std::fs::write(&model, &big).unwrap();
    let e = err(&mut resume(&ckpt(&run, 2), &["--steps", "3"]));
    assert!(e.contains("the manifest says") && e.contains(&good.len().to_string()), "{e}");
}

#[test]
fn finished_runs_and_foreign_checkpoints_are_refused_without_touching_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    ok(&mut train_cmd(dir.path(), "r", &["--steps", "3"]));
    let config = std::fs::read(run.join("config.toml")).unwrap();
    let metrics = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let e = err(&mut resume(&run, &[]));
    assert!(e.contains("at step 3") && e.contains("train.steps = 3") && e.contains("--steps"), "{e}");
    let e = err(&mut resume(&run, &["--steps", "2"]));
    assert!(e.contains("nothing to train"), "{e}");
    // A checkpoint of another model copied into this run folder.
    ok(&mut train_cmd(dir.path(), "other", &["--steps", "3", "--set", "model.n_embd=64"]));
    let theirs = ckpt(&dir.path().join("other"), 3);
    let mine = ckpt(&run, 3);
    std::fs::remove_dir_all(&mine).unwrap();
    std::fs::create_dir(&mine).unwrap();
    for f in ["model.safetensors", "state.safetensors", "manifest.json"] {
        std::fs::copy(theirs.join(f), mine.join(f)).unwrap();
    }
    let e = err(&mut resume(&run, &["--steps", "5"]));
    assert!(e.contains("does not belong to run folder") && e.contains("model"), "{e}");
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config, "config.toml untouched");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), metrics, "metrics untouched");
}

#[test]
fn two_processes_cannot_train_into_one_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    ok(&mut train_cmd(dir.path(), "r", &["--steps", "2", "--set", "train.checkpoint_every=1"]));
    // A long resume holds the folder; a second resume of it is refused at once.
    let mut long = std::process::Command::new(assert_cmd::cargo::cargo_bin("fp8train"))
        .args(["--threads", "1", "train", "--no-progress", "--steps", "100000", "--resume", run.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = run.join(".lock");
    let pid = long.id().to_string();
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&lock).map(|s| s.trim() != pid).unwrap_or(true) {
        assert!(t0.elapsed().as_secs() < 60, "the first process never took the lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = resume(&run, &["--steps", "100000"]).output().unwrap();
    long.kill().unwrap();
    long.wait().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("in use by another fp8train process") && e.contains(&pid), "{e}");
    // The holder was killed: its lock went with it, and the next resume takes over.
    let last = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
        .max()
        .unwrap();
    let o = resume(&run, &["--steps", &(last + 1).to_string()]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && e.contains("lock taken over"), "{e}");
}

#[test]
fn settings_that_name_nothing_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = err(&mut train_cmd(dir.path(), "f", &["--set", "train.fault_at_step=2", "--set", "train.fault_rank=3"]));
    assert!(e.contains("train.fault_rank = 3") && e.contains("1 rank"), "{e}");
    let o = fp8train().args(["topo", "--tp", "0"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("--tp") && e.contains("at least 1"), "{e}");
}

#[test]
fn runs_too_large_for_the_machine_are_refused_with_the_figures() {
    let dir = tempfile::tempdir().unwrap();
    // Allowed shapes, each far beyond any machine's memory: refused before allocating.
    for sets in [
        &["model.n_layer=256", "model.n_embd=16384", "model.n_head=128"][..],
        &["model.seq_len=65536", "train.batch_size=4096"][..],
        &["model.vocab_size=1048576", "train.batch_size=65536"][..],
    ] {
        let mut cmd = fp8train();
        cmd.args(["train", "--no-progress", "--steps", "1", "--out", dir.path().to_str().unwrap()]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let e = err(&mut cmd);
        assert!(e.contains("this run needs about") && e.contains("GiB") && e.contains("available"), "{e}");
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing written for a refused run");
}

#[test]
fn kill_9_at_random_points_loses_no_checkpoint_and_no_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("k");
    let bin = assert_cmd::cargo::cargo_bin("fp8train");
    // Deterministic "random" kill times (xorshift), from right after start to well into
    // training: during start-up, checkpoint writes (every step), metrics writes, resumes.
    let mut x = 0x2545f4914f6cdd1du64;
    let mut kills = 0;
    let mut checked = std::collections::HashSet::new();
    for round in 0..20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let wait = std::time::Duration::from_millis(30 + x % 700);
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["--threads", "1", "train", "--steps", "100000"]);
        let resumable = std::fs::read_dir(run.join("checkpoints"))
            .map(|d| d.filter_map(Result::ok).any(|e| e.path().join("manifest.json").is_file()))
            .unwrap_or(false);
        if round == 0 || !resumable {
            // Killed before its first checkpoint was complete: start over.
            let _ = std::fs::remove_dir_all(&run);
            cmd.args(["--out", dir.path().to_str().unwrap(), "--name", "k"]).args(TINY);
            cmd.args(["--set", "train.checkpoint_every=1", "--set", "train.batch_size=4"]);
        } else {
            cmd.args(["--no-progress", "--resume", run.to_str().unwrap()]);
        }
        let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        std::thread::sleep(wait);
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("round {round}: the run ended ({status}) before the kill: {err}");
        }
        child.kill().unwrap(); // SIGKILL
        kills += 1;
        let out = child.wait_with_output().unwrap();
        assert!(out.status.code().is_none(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
        // Every checkpoint present is complete and loads; the metrics parse.
        if let Ok(entries) = std::fs::read_dir(run.join("checkpoints")) {
            for e in entries {
                let p = e.unwrap().path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue; // a temporary folder of a write the kill interrupted
                }
                let stamp = std::fs::metadata(p.join("manifest.json")).and_then(|m| m.modified()).ok();
                if !checked.insert((name.clone(), stamp)) {
                    continue; // loaded in an earlier round, unchanged since
                }
                let o = fp8train().args(["eval", p.to_str().unwrap(), "--batches", "1"]).output().unwrap();
                assert!(o.status.success(), "round {round}: {name}: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        if run.join("metrics.jsonl").is_file() {
            let o = fp8train().args(["report", run.to_str().unwrap()]).output().unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success() || String::from_utf8_lossy(&o.stderr).contains("no training steps"), "{text}");
        }
    }
    assert_eq!(kills, 20);
    // After all that the run resumes and finishes one more step cleanly. (When the last
    // kill came before a fresh start's first checkpoint, as on a slow machine, that
    // start runs to its first checkpoint first.)
    let resumable = std::fs::read_dir(run.join("checkpoints"))
        .map(|d| d.filter_map(Result::ok).any(|e| e.path().join("manifest.json").is_file()))
        .unwrap_or(false);
    if !resumable {
        let _ = std::fs::remove_dir_all(&run);
        let o = fp8train()
            .args(["--threads", "1", "train", "--steps", "1"])
            .args(["--out", dir.path().to_str().unwrap(), "--name", "k"])
            .args(TINY) // (with --no-progress)
            .args(["--set", "train.checkpoint_every=1", "--set", "train.batch_size=4"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let last = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| checkpoint_step(&e.unwrap().file_name().to_string_lossy()))
        .max()
        .unwrap();
    let o = resume(&run, &["--steps", &(last + 1).to_string()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let steps: Vec<u64> = records(&run, "step").iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=last + 1).collect::<Vec<_>>(), "each step recorded once, in order");
}

fn checkpoint_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

#[test]
fn a_checkpoint_write_that_fails_is_an_error_and_loses_nothing() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    ok(&mut train_cmd(dir.path(), "r", &["--steps", "2", "--set", "train.checkpoint_every=2"]));
    let metrics_before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    // Files may not grow beyond 50 KB (as on a full disk, every larger write fails): the
    // metrics and config fit, the step-4 checkpoint's weights file does not.
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("fp8train"));
    cmd.args(["--threads", "2", "train", "--no-progress", "--steps", "4", "--resume", run.to_str().unwrap()]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 50_000, rlim_max: 50_000 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("checkpoint: cannot write") && e.contains(".step-000004.tmp"), "{e}");
    // Nothing already written is lost: the step-2 checkpoint loads, no step-4 folder
    // exists, the metrics hold the old records and the new steps, whole.
    let o = fp8train().args(["eval", run.to_str().unwrap(), "--batches", "1"]).output().unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("at step 2"));
    assert!(!ckpt(&run, 4).exists());
    let after = std::fs::read(run.join("metrics.jsonl")).unwrap();
    assert!(after.starts_with(&metrics_before));
    let steps: Vec<u64> = records(&run, "step").iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
}
