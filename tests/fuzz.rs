//! Fuzzing the inputs a user hands fp8train: config text and `--set` overrides,
//! checkpoints (damaged bytes, and damage the manifest agrees with), llm.c shards and
//! text files. The property: an error or success, never a panic, and never an
//! allocation beyond what the input justifies (a test process with a panic or an abort
//! fails). Bounded case counts keep CI fast; each test prints how many it tried.

mod common;

use fp8train::backend::sim::Sim;
use fp8train::data::{shards, DataConfig, Dataset, Source, TokenizerKind};
use fp8train::train::checkpoint;
use fp8train::train::config::Config;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use sha2::Digest;
use std::path::Path;

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(RunnerConfig { cases, failure_persistence: None, ..RunnerConfig::default() })
}

const SECTIONS: &[&str] = &["model", "train", "data", "run", "optim", ""];
const KEYS: &[&str] = &[
    "n_layer",
    "n_embd",
    "n_head",
    "seq_len",
    "vocab_size",
    "level",
    "backend",
    "gemm",
    "steps",
    "batch_size",
    "lr",
    "min_lr_frac",
    "warmup_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "eps",
    "grad_clip",
    "seed",
    "log_every",
    "eval_every",
    "eval_batches",
    "amax_window",
    "mu_growth_interval",
    "checkpoint_every",
    "inject_nan_at_step",
    "fault_rank",
    "fault_at_step",
    "fault_kind",
    "peer_timeout_s",
    "source",
    "path",
    "val_path",
    "tokenizer",
    "val_fraction",
    "corpus_bytes",
    "out_dir",
    "name",
    "saturation_threshold",
    "zzz",
];
const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "3",
    "64",
    "65536",
    "4294967296",
    "18446744073709551615",
    "1e-3",
    "0.5",
    "1.5",
    "-0.0",
    "nan",
    "inf",
    "-inf",
    "\"O2\"",
    "\"bf16\"",
    "\"O9\"",
    "\"sim\"",
    "\"cuda\"",
    "\"fast\"",
    "\"text\"",
    "\"bin\"",
    "\"gpt2\"",
    "\"\"",
    "true",
    "[1, 2]",
    "{ a = 1 }",
    "\"hang\"",
    "1979-05-27",
];

#[test]
fn config_text_and_overrides_never_panic() {
    let line = (0..SECTIONS.len(), 0..KEYS.len(), 0..VALUES.len());
    let doc = proptest::collection::vec(line, 0..12);
    let tried = std::cell::Cell::new(0u32);
    runner(1500)
        .run(
            &(doc, any::<String>(), proptest::collection::vec((0..KEYS.len(), 0..VALUES.len()), 0..4)),
            |(d, raw, sets)| {
                tried.set(tried.get() + 1);
                let mut text = String::new();
                let mut last = "";
                for (s, k, v) in d {
                    if SECTIONS[s] != last && !SECTIONS[s].is_empty() {
                        text += &format!("[{}]\n", SECTIONS[s]);
                        last = SECTIONS[s];
                    }
                    text += &format!("{} = {}\n", KEYS[k], VALUES[v]);
                }
                for t in [text.as_str(), raw.as_str()] {
                    if let Ok(c) = Config::from_toml(t) {
                        let _ = c.validate();
                    }
                }
                let sets: Vec<String> = sets
                    .iter()
                    .map(|&(k, v)| format!("{}.{}={}", SECTIONS[k % 4], KEYS[k], VALUES[v]))
                    .chain(std::iter::once(raw.clone()))
                    .collect();
                if let Ok(c) = Config::default().with_overrides(&sets) {
                    let _ = c.validate();
                }
                Ok(())
            },
        )
        .unwrap();
    eprintln!("fuzz config: {} cases", tried.get());
}

/// A damaged copy of checkpoint `src` in `dst`: file `which`, operation `op` at `at`;
/// `agree`: the manifest is rewritten to the damaged file's size and digest, so the
/// parser behind the checksum is reached.
fn damage(src: &Path, dst: &Path, which: usize, op: u8, at: usize, byte: u8, agree: bool) {
    let files = ["model.safetensors", "state.safetensors", "manifest.json"];
    std::fs::create_dir_all(dst).unwrap();
    for f in files {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let name = files[which % 3];
    let mut b = std::fs::read(dst.join(name)).unwrap();
    let i = at % b.len().max(1);
    match op % 5 {
        0 => b[i] ^= byte | 1,
        1 => b.truncate(i),
        2 => b.extend(std::iter::repeat_n(byte, i % 4096)),
        // The safetensors header length (first 8 bytes): tiny, huge, or off by a little.
        3 => {
            let len = [(at as u64) % 64, u64::MAX, b.len() as u64 + 1][usize::from(byte) % 3];
            b[..8].copy_from_slice(&len.to_le_bytes())
        }
        _ => b[i..].iter_mut().take(64).for_each(|x| *x = byte),
    }
    std::fs::write(dst.join(name), &b).unwrap();
    if agree && name != "manifest.json" {
        let m = std::fs::read_to_string(dst.join("manifest.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&m).unwrap();
        v["files"][name]["bytes"] = b.len().into();
        v["files"][name]["sha256"] =
            sha2::Sha256::digest(&b).iter().map(|x| format!("{x:02x}")).collect::<String>().into();
        std::fs::write(dst.join("manifest.json"), v.to_string()).unwrap();
    }
}

#[test]
fn damaged_checkpoints_are_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let o = assert_cmd::Command::cargo_bin("fp8train")
        .unwrap()
        .args(["--threads", "1", "train", "--out", dir.path().to_str().unwrap(), "--name", "r", "--steps", "1"])
        .args(common::TINY)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let src = dir.path().join("r/checkpoints/step-000001");
    let tried = std::cell::Cell::new(0u32);
    let loaded = std::cell::Cell::new(0u32);
    runner(400)
        .run(&(0..3usize, any::<u8>(), any::<usize>(), any::<u8>(), any::<bool>()), |(which, op, at, byte, agree)| {
            tried.set(tried.get() + 1);
            let dst = dir.path().join(format!("case-{}", tried.get()));
            damage(&src, &dst, which, op, at, byte, agree);
            let r = checkpoint::load(&Sim, &dst, 0, 1, fp8train::model::tp::TpPlace::ONE);
            loaded.set(loaded.get() + u32::from(r.is_ok()));
            let _ = checkpoint::load_for_inference(&Sim, &dst);
            let _ = checkpoint::peek_config(&dst);
            std::fs::remove_dir_all(&dst).unwrap();
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz checkpoints: {} cases ({} still loaded: damage in padding or metadata)", tried.get(), loaded.get());
}

#[test]
fn token_shards_and_text_files_are_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.bin");
    let p = path.to_str().unwrap().to_string();
    let tried = std::cell::Cell::new(0u32);
    let header = (prop_oneof![Just(shards::MAGIC), any::<i32>()], -1i32..4, any::<i32>(), 0usize..5000);
    runner(600)
        .run(&(header, proptest::collection::vec(any::<u8>(), 0..64)), |((magic, version, count, body), tail)| {
            tried.set(tried.get() + 1);
            let mut h = [0i32; 256];
            h[0] = magic;
            h[1] = version;
            h[2] = if count.rem_euclid(3) == 0 { (body / 2) as i32 } else { count };
            let mut bytes: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
            bytes.extend(std::iter::repeat_n(7u8, body));
            if tried.get().is_multiple_of(5) {
                bytes.truncate(tail.len() * 16);
            }
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(toks) = shards::read(&p) {
                assert_eq!(toks.len(), (bytes.len() - 1024) / if version == 1 { 2 } else { 4 });
            }
            // The same bytes as a text file, both tokenizers, through the dataset loader.
            for (tokenizer, source) in [
                (TokenizerKind::Byte, Source::Text),
                (TokenizerKind::Gpt2, Source::Text),
                (TokenizerKind::Gpt2, Source::Bin),
            ] {
                let cfg = DataConfig { source, path: p.clone(), tokenizer, ..DataConfig::default() };
                if let Ok(ds) = Dataset::load(&cfg, 1) {
                    let _ = ds.check_fits(16);
                }
            }
            let mut t = tail.clone();
            t.extend(b"the end");
            std::fs::write(&path, &t).unwrap();
            let cfg = DataConfig { source: Source::Text, path: p.clone(), ..DataConfig::default() };
            let _ = Dataset::load(&cfg, 1).map(|d| d.check_fits(16));
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz shards and text: {} cases", tried.get());
}
