//! Training in the simulator, through the binary as a user runs it.

mod common;

use assert_cmd::Command;
use common::{records, tensors, TINY};
use std::path::Path;

fn fp8train() -> Command {
    Command::cargo_bin("fp8train").expect("binary is built")
}

/// Run `train` with TINY + `extra` into `out/name`; returns stdout.
fn train(out: &Path, name: &str, threads: usize, extra: &[&str]) -> String {
    let mut cmd = fp8train();
    cmd.args(["--threads", &threads.to_string(), "train", "--out", out.to_str().unwrap(), "--name", name]);
    cmd.args(TINY).args(["--set", "train.batch_size=4"]).args(extra);
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "train failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn loss_bits(run: &Path) -> Vec<(u64, u64)> {
    records(run, "step").iter().map(|v| (v["step"].as_u64().unwrap(), v["loss_bits"].as_u64().unwrap())).collect()
}

#[test]
fn same_seed_same_loss_bits_whatever_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    for level in ["bf16", "O1", "O2"] {
        let runs: Vec<_> = [1, 2, 4]
            .iter()
            .map(|&t| {
                let name = format!("{level}-t{t}");
                train(dir.path(), &name, t, &["--level", level, "--steps", "6"]);
                loss_bits(&dir.path().join(name))
            })
            .collect();
        assert_eq!(runs[0].len(), 6);
        assert_eq!(runs[0], runs[1], "{level}: 1 vs 2 threads");
        assert_eq!(runs[0], runs[2], "{level}: 1 vs 4 threads");
        // A different seed changes the bits (the comparison above can fail).
        let other = format!("{level}-seed");
        train(dir.path(), &other, 2, &["--level", level, "--steps", "6", "--set", "train.seed=99"]);
        assert_ne!(loss_bits(&dir.path().join(other)), runs[0]);
    }
}

#[test]
fn resume_is_bit_identical_at_every_level() {
    let dir = tempfile::tempdir().unwrap();
    for level in ["bf16", "O1", "O2"] {
        let straight = format!("{level}-straight");
        train(dir.path(), &straight, 2, &["--level", level, "--steps", "8", "--set", "train.checkpoint_every=4"]);
        let a = dir.path().join(&straight);
        // Resume from the step-4 checkpoint into a new run folder.
        let resumed = format!("{level}-resumed");
        let ckpt = a.join("checkpoints/step-000004");
        let o = fp8train()
            .args(["--threads", "2", "train", "--no-progress", "--resume", ckpt.to_str().unwrap()])
            .args(["--out", dir.path().to_str().unwrap(), "--name", &resumed])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let b = dir.path().join(&resumed);
        let tail_a: Vec<_> = loss_bits(&a).into_iter().filter(|s| s.0 > 4).collect();
        let tail_b = loss_bits(&b);
        assert_eq!(tail_b.len(), 4, "{level}");
        assert_eq!(tail_a, tail_b, "{level}: losses after resume");
        for f in ["model.safetensors", "state.safetensors"] {
            assert!(tensors(&a, 8, f) == tensors(&b, 8, f), "{level}: {f} differs after resume");
        }
    }
    // Resuming in place (no --name) continues the same run folder to a later step.
    let run = dir.path().join("O2-straight");
    let o = fp8train()
        .args(["--threads", "2", "train", "--no-progress", "--steps", "10", "--resume", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let steps: Vec<u64> = loss_bits(&run).iter().map(|s| s.0).collect();
    assert_eq!(steps, (1..=10).collect::<Vec<_>>());
}

#[test]
fn bytes_per_param_match_the_levels_table() {
    let dir = tempfile::tempdir().unwrap();
    for (level, want) in [("bf16", "16.00"), ("O1", "11.00"), ("O2", "6.00")] {
        let out = train(dir.path(), level, 2, &["--level", level, "--steps", "1"]);
        assert!(out.contains(&format!("level {level}: {want} bytes/param")), "{out}");
    }
}

/// `train.recompute = "gelu"` saves nothing at the FP8 levels (GELU's backward keeps an
/// E4M3 copy either way): the run says so, and only there.
#[test]
fn gelu_recomputation_at_fp8_levels_is_flagged_as_saving_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (level, flagged) in [("O2", true), ("O1", true), ("bf16", false)] {
        let mut cmd = fp8train();
        cmd.args(["--threads", "2", "train", "--out", dir.path().to_str().unwrap(), "--name", level, "--level", level]);
        cmd.args(TINY).args(["--set", "train.batch_size=4", "--steps", "1", "--set", "train.recompute=gelu"]);
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.contains("saves no memory at this level"), flagged, "{level}: {err}");
    }
}

#[test]
fn injected_nan_skips_the_step_and_backs_off_mu() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(
        dir.path(),
        "nan",
        2,
        &["--level", "O2", "--steps", "5", "--set", "train.inject_nan_at_step=3", "--set", "train.checkpoint_every=1"],
    );
    assert!(out.contains("step     3/5") && out.contains("skipped: non-finite gradients, mu -> 0.5"), "{out}");
    let run = dir.path().join("nan");
    let steps = records(&run, "step");
    let skipped: Vec<bool> = steps.iter().map(|v| v["skipped"].as_bool().unwrap()).collect();
    assert_eq!(skipped, vec![false, false, true, false, false]);
    let mu: Vec<f64> = steps.iter().map(|v| v["mu"].as_f64().unwrap()).collect();
    assert_eq!(mu, vec![1.0, 1.0, 0.5, 0.5, 0.5]);
    assert!(steps.iter().all(|v| v["loss"].as_f64().unwrap().is_finite()));
    // The skipped step left weights and optimizer state as they were.
    assert!(tensors(&run, 2, "state.safetensors") == tensors(&run, 3, "state.safetensors"));
    assert!(tensors(&run, 3, "model.safetensors") != tensors(&run, 4, "model.safetensors"));
}

#[test]
fn learns_below_the_unigram_entropy_and_writes_a_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(
        dir.path(),
        "learn",
        2,
        &[
            "--level",
            "O2",
            "--steps",
            "300",
            "--set",
            "train.lr=0.01",
            "--set",
            "train.warmup_steps=10",
            "--set",
            "model.seq_len=32",
            "--set",
            "model.n_embd=64",
            "--set",
            "model.n_head=4",
            "--set",
            "train.batch_size=8",
            "--set",
            "data.corpus_bytes=100000",
            "--set",
            "train.log_every=50",
        ],
    );
    let run = dir.path().join("learn");
    let data = &records(&run, "data")[0];
    let unigram = data["unigram_entropy"].as_f64().unwrap();
    let floor = data["entropy_floor"].as_f64().unwrap();
    let last_val = records(&run, "eval").last().unwrap()["val_loss"].as_f64().unwrap();
    let first = records(&run, "step")[0]["loss"].as_f64().unwrap();
    assert!(first > 5.0, "initial loss {first} should be near ln(256)");
    assert!(last_val < 0.9 * unigram && last_val > floor, "val {last_val}, unigram {unigram}, floor {floor}");
    // One line per logged step, the run folder's files.
    assert_eq!(out.lines().filter(|l| l.starts_with("step ") && l.contains("tok/s")).count(), 7, "{out}");
    for f in ["config.toml", "metrics.jsonl", "loss.svg", "checkpoints/step-000300/manifest.json"] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    // report regenerates the plot; eval and sample use the checkpoint.
    std::fs::remove_file(run.join("loss.svg")).unwrap();
    let o = fp8train().args(["report", run.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success());
    let svg = std::fs::read_to_string(run.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("entropy floor"));
    let o = fp8train().args(["eval", run.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.starts_with("val loss "), "{text}");
    let v: f64 = text.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((v - last_val).abs() < 1e-3, "eval {v} vs training's {last_val}");
    let o = fp8train().args(["sample", run.to_str().unwrap(), "--prompt", "the ", "--tokens", "40"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.starts_with("the ") && text.len() > 30, "{text}");
}

#[test]
fn corrupt_or_truncated_checkpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), "c", 2, &["--steps", "2"]);
    let ck = dir.path().join("c/checkpoints/step-000002");
    let state = ck.join("state.safetensors");
    let good = std::fs::read(&state).unwrap();
    let expect_err = |needle: &str| {
        let o = fp8train().args(["eval", ck.to_str().unwrap()]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "want '{needle}' in: {err}");
    };
    std::fs::write(&state, &good[..good.len() / 2]).unwrap();
    expect_err("truncated");
    let mut flipped = good.clone();
    let mid = flipped.len() - 100;
    flipped[mid] ^= 1;
    std::fs::write(&state, &flipped).unwrap();
    expect_err("SHA-256");
    std::fs::write(&state, &good).unwrap();
    std::fs::remove_file(ck.join("manifest.json")).unwrap();
    expect_err("not a checkpoint");
}

#[test]
fn step_records_carry_the_pool_high_water_field() {
    // The simulator has no device pool: the field is there, null (GPU runs fill it and
    // print "mem X GiB" on the step line and the peak on the final line).
    let dir = tempfile::tempdir().unwrap();
    let out = train(dir.path(), "m", 2, &["--steps", "2"]);
    let run = dir.path().join("m");
    for kind in ["step", "final"] {
        let recs = records(&run, kind);
        assert!(
            !recs.is_empty() && recs.iter().all(|v| v.get("pool_high_water_bytes") == Some(&serde_json::Value::Null))
        );
    }
    assert!(!out.contains("mem ") && !out.contains("peak device memory"), "{out}");
}

#[test]
fn bad_config_values_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let o = fp8train()
            .args(["train", "--no-progress", "--out", dir.path().to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(run(&["--set", "train.beta1=1.5"]).contains("train.beta1 = 1.5 is out of range (allowed 0..=0.999999)"));
    assert!(run(&["--set", "train.nope=1"]).contains("unknown field 'nope'"));
    let o = fp8train().args(["train", "--level", "O9"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(2) && e.contains("'O9'") && e.contains("bf16, O1, O2, O3"), "{e}");
    assert!(run(&["--set", "train.level=\"O9\""]).contains("--set train.level=\"O9\""));
    assert!(run(&["--set", "train.lr=nan"]).contains("train.lr = NaN is out of range"));
    assert!(run(&["--set", "model.n_head=3"]).contains("model.n_head = 3"));
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[train]\nsteps = \"many\"\n").unwrap();
    assert!(run(&["--config", cfg.to_str().unwrap()]).contains("bad.toml"));
    assert!(run(&["--set", "data.source=\"text\""]).contains("data.path is required"));
}

#[test]
fn trains_on_text_files_and_llmc_shards() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.txt");
    let para = "It was the best of times, it was the worst of times, it was the age of wisdom. ";
    std::fs::write(&text, para.repeat(200)).unwrap();
    let t = text.to_str().unwrap();
    let out = train(
        dir.path(),
        "bytes",
        2,
        &["--steps", "3", "--set", "data.source=\"text\"", "--set", &format!("data.path=\"{t}\"")],
    );
    assert!(out.contains("final val loss"), "{out}");
    // GPT-2 BPE: the vocabulary needs a model that holds it.
    let out = train(
        dir.path(),
        "bpe",
        2,
        &[
            "--steps",
            "2",
            "--set",
            "data.source=\"text\"",
            "--set",
            &format!("data.path=\"{t}\""),
            "--set",
            "data.tokenizer=\"gpt2\"",
            "--set",
            "model.vocab_size=50304",
        ],
    );
    assert!(out.contains("final val loss"), "{out}");
    // llm.c shards (uint16 tokens) for train and validation.
    let toks: Vec<u16> = (0..5000u32).map(|i| (i * 7 % 300) as u16).collect();
    let (tr, va) = (dir.path().join("d_train.bin"), dir.path().join("d_val.bin"));
    fp8train::data::shards::write_u16(&tr, &toks).unwrap();
    fp8train::data::shards::write_u16(&va, &toks[..1000]).unwrap();
    let out = train(
        dir.path(),
        "shards",
        2,
        &[
            "--steps",
            "2",
            "--set",
            "data.source=\"bin\"",
            "--set",
            &format!("data.path=\"{}\"", tr.display()),
            "--set",
            &format!("data.val_path=\"{}\"", va.display()),
            "--set",
            "data.tokenizer=\"gpt2\"",
            "--set",
            "model.vocab_size=50304",
        ],
    );
    assert!(out.contains("final val loss"), "{out}");
}

#[test]
fn checkpoint_at_end_false_keeps_no_state_and_every_metric() {
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), "kept", 2, &["--level", "O2", "--steps", "3"]);
    train(dir.path(), "trial", 2, &["--level", "O2", "--steps", "3", "--set", "train.checkpoint_at_end=false"]);
    let has_checkpoint = |name: &str| {
        let c = dir.path().join(name).join("checkpoints");
        c.exists() && std::fs::read_dir(&c).unwrap().next().is_some()
    };
    assert!(has_checkpoint("kept"), "the default writes a checkpoint after the last step");
    assert!(!has_checkpoint("trial"), "train.checkpoint_at_end=false writes none");
    assert_eq!(loss_bits(&dir.path().join("trial")), loss_bits(&dir.path().join("kept")));
    // Periodic checkpoints still come with it.
    let every = ["--level", "O2", "--steps", "4", "--set", "train.checkpoint_at_end=false"];
    train(dir.path(), "every", 2, &[&every[..], &["--set", "train.checkpoint_every=2"]].concat());
    assert!(has_checkpoint("every"));
}
