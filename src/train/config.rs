//! The run configuration: a TOML file and/or `--set key=value` overrides on top of
//! the embedded default. Unknown keys, wrong types and out-of-range values are errors
//! that name the field (and the allowed range).

use crate::data::DataConfig;
use crate::model::{Level, ModelConfig};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Precision level: "bf16", "O1" or "O2".
    pub level: Level,
    /// Backend: "sim" (the CPU simulator), "cuda" or "auto".
    pub backend: String,
    /// GEMM class on GPUs: "exact" (bit-identical to the simulator) or "fast" (cuBLASLt).
    pub gemm: String,
    pub steps: u64,
    pub batch_size: usize,
    /// Peak learning rate (after warmup); cosine decay to lr * min_lr_frac.
    pub lr: f32,
    pub min_lr_frac: f32,
    pub warmup_steps: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f32,
    pub seed: u64,
    /// Print a step line every this many steps (and the first and last).
    pub log_every: u64,
    /// Validation loss every this many steps (0 = only at the end).
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Amax history length of delayed scaling (activations, output gradients).
    pub amax_window: usize,
    /// The gradient scale mu doubles after this many steps without overflow or saturation.
    pub mu_growth_interval: u64,
    /// mu halves when more than this fraction of reduced gradient values saturate
    /// (FP8 gradient communication between ranks).
    pub saturation_threshold: f64,
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// Fault injection: poison the gradients of this step (1-based; 0 = never).
    pub inject_nan_at_step: u64,
    /// Fault injection for distributed runs: rank `fault_rank` dies ("exit") or stops
    /// answering ("hang") at step `fault_at_step` (1-based; 0 = never).
    pub fault_rank: u64,
    pub fault_at_step: u64,
    pub fault_kind: String,
    /// Seconds a silent peer is waited for before the run stops naming it.
    pub peer_timeout_s: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            level: Level::O2,
            backend: "sim".into(),
            gemm: "exact".into(),
            steps: 1200,
            batch_size: 16,
            lr: 3e-3,
            min_lr_frac: 0.1,
            warmup_steps: 20,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 1337,
            log_every: 50,
            eval_every: 200,
            eval_batches: 8,
            amax_window: 16,
            mu_growth_interval: 1000,
            saturation_threshold: 1e-5,
            checkpoint_every: 0,
            inject_nan_at_step: 0,
            fault_rank: 0,
            fault_at_step: 0,
            fault_kind: "exit".into(),
            peer_timeout_s: 30,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Folder that holds run folders.
    pub out_dir: String,
    /// Run folder name (empty: made from the level, seed and time).
    pub name: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig { out_dir: "runs".into(), name: String::new() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub data: DataConfig,
    pub run: RunConfig,
}

fn range<T: PartialOrd + std::fmt::Display>(name: &str, v: T, lo: T, hi: T) -> Result<(), String> {
    if v < lo || v > hi {
        Err(format!("{name} = {v} is out of range (allowed {lo}..={hi})"))
    } else {
        Ok(())
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        self.model.validate()?;
        self.data.validate()?;
        let t = &self.train;
        if !matches!(t.backend.as_str(), "sim" | "auto" | "cuda") {
            return Err(format!("train.backend = \"{}\" is not one of \"sim\", \"cuda\", \"auto\"", t.backend));
        }
        if !matches!(t.gemm.as_str(), "exact" | "fast") {
            return Err(format!("train.gemm = \"{}\" is not one of \"exact\", \"fast\"", t.gemm));
        }
        if t.gemm == "fast" && t.backend == "sim" {
            return Err("train.gemm = \"fast\" needs a GPU (--backend cuda); the simulator is exact only".into());
        }
        range("train.steps", t.steps, 1, 10_000_000)?;
        range("train.batch_size", t.batch_size, 1, 65536)?;
        range("train.lr", t.lr, 0.0, 10.0)?;
        range("train.min_lr_frac", t.min_lr_frac, 0.0, 1.0)?;
        range("train.warmup_steps", t.warmup_steps, 0, 10_000_000)?;
        range("train.weight_decay", t.weight_decay, 0.0, 10.0)?;
        range("train.beta1", t.beta1, 0.0, 0.999_999)?;
        range("train.beta2", t.beta2, 0.0, 0.999_999_9)?;
        range("train.eps", t.eps, 1e-30, 1.0)?;
        range("train.grad_clip", t.grad_clip, 0.0, 1e6)?;
        range("train.log_every", t.log_every, 1, 10_000_000)?;
        range("train.eval_batches", t.eval_batches, 1, 100_000)?;
        range("train.amax_window", t.amax_window, 1, 1024)?;
        range("train.mu_growth_interval", t.mu_growth_interval, 1, 10_000_000)?;
        range("train.saturation_threshold", t.saturation_threshold, 0.0, 1.0)?;
        range("train.peer_timeout_s", t.peer_timeout_s, 1, 3600)?;
        if !matches!(t.fault_kind.as_str(), "exit" | "hang") {
            return Err(format!("train.fault_kind = \"{}\" is not one of \"exit\", \"hang\"", t.fault_kind));
        }
        if !t.lr.is_finite() || !t.eps.is_finite() {
            return Err("train.lr and train.eps must be finite".into());
        }
        if self.data.tokenizer.vocab_size() > self.model.vocab_size {
            return Err(format!(
                "model.vocab_size = {} is smaller than the {:?} tokenizer's vocabulary ({})",
                self.model.vocab_size,
                self.data.tokenizer,
                self.data.tokenizer.vocab_size()
            ));
        }
        Ok(())
    }

    /// Parse TOML text (a full or partial config) over the defaults.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| format!("config: {}", e.message()).replace('\n', " "))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Apply `key=value` overrides (`train.lr=1e-3`, `train.level=O1`): the value is
    /// read as TOML, or as a string when it is not valid TOML.
    pub fn with_overrides(&self, sets: &[String]) -> Result<Config, String> {
        let mut tree: toml::Value = toml::Value::try_from(self).expect("config serialises");
        for set in sets {
            let (key, raw) =
                set.split_once('=').ok_or_else(|| format!("--set {set}: expected key=value (e.g. train.lr=1e-3)"))?;
            let key = key.trim();
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {}", raw.trim()))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
            let parts: Vec<&str> = key.split('.').collect();
            let (last, path) = parts.split_last().ok_or_else(|| format!("--set {set}: empty key"))?;
            let mut node = &mut tree;
            for p in path {
                node = node
                    .get_mut(*p)
                    .filter(|n| n.is_table())
                    .ok_or_else(|| format!("--set {key}: unknown section '{p}' (sections: model, train, data, run)"))?;
            }
            let table = node.as_table_mut().ok_or_else(|| format!("--set {key}: not a field"))?;
            if !table.contains_key(*last) {
                let known: Vec<&String> = table.keys().collect();
                return Err(format!("--set {key}: unknown field '{last}' (fields here: {known:?})"));
            }
            // Keep float fields float when given an integer (train.lr=1).
            let value = match (&table[*last], value) {
                (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
                (_, v) => v,
            };
            table.insert(last.to_string(), value);
        }
        tree.try_into().map_err(|e: toml::de::Error| format!("config: {}", e.message()).replace('\n', " "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn overrides_and_errors_name_the_field() {
        let c = Config::default()
            .with_overrides(&["train.lr=0.01".into(), "train.level=O1".into(), "model.n_layer=3".into()])
            .unwrap();
        assert_eq!((c.train.lr, c.train.level, c.model.n_layer), (0.01, Level::O1, 3));
        let e = Config::default().with_overrides(&["train.lrr=1".into()]).unwrap_err();
        assert!(e.contains("unknown field 'lrr'"), "{e}");
        let e = Config::default().with_overrides(&["train.steps=abc".into()]).unwrap_err();
        assert!(e.contains("steps") || e.contains("invalid type"), "{e}");
        let e = Config::default().with_overrides(&["train.level=O7".into()]).unwrap_err();
        assert!(e.contains("O7") || e.contains("unknown variant"), "{e}");
        let bad = Config::default().with_overrides(&["model.n_head=5".into()]).unwrap();
        assert!(bad.validate().unwrap_err().contains("model.n_embd = 64 must be divisible by model.n_head = 5"));
        let bad = Config::default().with_overrides(&["train.beta1=1.5".into()]).unwrap();
        assert!(bad.validate().unwrap_err().contains("train.beta1 = 1.5 is out of range"));
        let e = Config::from_toml("[train]\nstepz = 3\n").unwrap_err();
        assert!(e.contains("stepz"), "{e}");
    }
}
