//! The run configuration: a TOML file and/or `--set key=value` overrides on top of
//! the embedded default. Unknown keys, wrong types and out-of-range values are errors
//! that name the field (and the allowed range).

use crate::data::DataConfig;
use crate::model::{Level, ModelConfig, Recompute};
use serde::{Deserialize, Serialize};

/// Where the numerics run (`train.backend`, `--backend`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The CPU simulator (bit-exact reference).
    Sim,
    /// NVIDIA GPUs through CUDA.
    Cuda,
    /// CUDA when a GPU is usable, else the simulator.
    Auto,
}

/// The class of matrix products on GPUs (`train.gemm`, `--gemm`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Gemm {
    /// Bit-identical to the simulator.
    Exact,
    /// cuBLASLt and flash attention, held to measured bounds.
    Fast,
}

impl std::fmt::Display for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if *self == Gemm::Fast { "fast" } else { "exact" })
    }
}

/// What an injected rank fault does (`train.fault_kind`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// The rank dies (SIGKILL).
    Exit,
    /// The rank stops answering.
    Hang,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Precision level: "bf16", "O1" or "O2".
    pub level: Level,
    /// Backend: "sim" (the CPU simulator), "cuda" or "auto".
    pub backend: Backend,
    /// GEMM class on GPUs: "exact" (bit-identical to the simulator) or "fast" (cuBLASLt).
    pub gemm: Gemm,
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
    /// The gradient scale mu doubles after this many steps without overflow.
    pub mu_growth_interval: u64,
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// Write a checkpoint after the last step (false: a benchmark or a trial run whose
    /// state is not kept; a 13B O2 checkpoint is about 64 GB).
    pub checkpoint_at_end: bool,
    /// Fault injection: poison the gradients of this step (1-based; 0 = never).
    pub inject_nan_at_step: u64,
    /// Fault injection for distributed runs: rank `fault_rank` dies ("exit") or stops
    /// answering ("hang") at step `fault_at_step` (1-based; 0 = never).
    pub fault_rank: u64,
    pub fault_at_step: u64,
    pub fault_kind: FaultKind,
    /// Seconds a silent peer is waited for before the run stops naming it.
    pub peer_timeout_s: u64,
    /// Activations recomputed in the backward pass: "none", "gelu", "cheap" or "full"
    /// (`gpt::Kept` says what each keeps).
    pub recompute: Recompute,
    /// Tensor-parallel size: groups of this many consecutive ranks (inside one node's
    /// NVLink island) split every block Megatron-style, data parallel across the groups.
    pub tp: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            level: Level::O2,
            backend: Backend::Sim,
            gemm: Gemm::Exact,
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
            checkpoint_every: 0,
            checkpoint_at_end: true,
            inject_nan_at_step: 0,
            fault_rank: 0,
            fault_at_step: 0,
            fault_kind: FaultKind::Exit,
            peer_timeout_s: 30,
            recompute: Recompute::None,
            tp: 1,
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

/// `lo <= v <= hi`, else an error naming the field; NaN is never in range.
pub fn range<T: PartialOrd + std::fmt::Display>(name: &str, v: T, lo: T, hi: T) -> Result<(), String> {
    if !(v >= lo && v <= hi) {
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
        if t.gemm == Gemm::Fast && t.backend == Backend::Sim {
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
        range("train.peer_timeout_s", t.peer_timeout_s, 1, 3600)?;
        range("train.tp", t.tp, 1, 1024)?;
        if t.tp > 1 {
            crate::model::shard::check(&self.model, t.tp)?;
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

    /// Parse TOML text (a full or partial config) over the defaults. Errors name the
    /// field (`section.key`) and the line.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        // Settings of earlier versions that nothing reads any more (kept in old checkpoints).
        if let Some(toml::Value::Table(t)) = table.get_mut("train") {
            t.remove("saturation_threshold");
        }
        let cfg = Config::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
            // Locate the field by parsing the text itself, which keeps the spans.
            toml::from_str::<Config>(text).err().map(|e| toml_error(text, &e)).unwrap_or_else(|| e.message().into())
        })?;
        Ok(cfg)
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
            // Checked one by one, so an error blames the setting that caused it.
            Config::deserialize(tree.clone())
                .map_err(|e: toml::de::Error| format!("--set {key}={}: {}", raw.trim(), e.message().trim()))?;
        }
        tree.try_into().map_err(|e: toml::de::Error| format!("config: {}", e.message()).replace('\n', " "))
    }
}

/// A TOML error as `config: section.key (line N): what`.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else { return format!("config: {what}") };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    let section = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| !k.is_empty() && !k.starts_with('['));
    match (section, key) {
        (Some(s), Some(k)) => format!("config: {s}.{k} (line {line_no}): {what}"),
        (None, Some(k)) => format!("config: {k} (line {line_no}): {what}"),
        _ => format!("config: line {line_no} (`{line}`): {what}"),
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

    #[test]
    fn partial_tables_typed_errors_and_nan() {
        // Any subset of any table works.
        let c = Config::from_toml("[model]\nn_layer = 3\n[data]\nsource = \"text\"\npath = \"x.txt\"\n").unwrap();
        assert_eq!((c.model.n_layer, c.model.n_embd, c.data.val_path.as_str()), (3, 64, ""));
        // A wrong type names the field and the line.
        let e = Config::from_toml("[run]\nname = \"a\"\n\n[train]\nlr = 1e-3\nsteps = \"many\"\n").unwrap_err();
        assert!(e.contains("train.steps (line 6)") && e.contains("expected u64"), "{e}");
        let e = Config::from_toml("[train]\nbackend = \"tpu\"\n").unwrap_err();
        assert!(e.contains("train.backend") && e.contains("tpu"), "{e}");
        // --set blames its own key, not a later one.
        let e = Config::default().with_overrides(&["train.steps=\"x\"".into(), "train.lr=0.1".into()]).unwrap_err();
        assert!(e.starts_with("--set train.steps=\"x\""), "{e}");
        // NaN (and infinities) are out of every range.
        for f in ["beta1", "beta2", "weight_decay", "min_lr_frac", "grad_clip", "lr", "eps"] {
            for v in ["nan", "inf"] {
                let c = Config::default().with_overrides(&[format!("train.{f}={v}")]).unwrap();
                let e = c.validate().unwrap_err();
                assert!(e.contains(&format!("train.{f} = ")), "{f}={v}: {e}");
            }
        }
        let c = Config::default().with_overrides(&["data.val_fraction=nan".into()]).unwrap();
        assert!(c.validate().unwrap_err().contains("data.val_fraction"));
        // A setting of an older version is dropped, not an error.
        assert!(Config::from_toml("[train]\nsaturation_threshold = 1e-5\n").is_ok());
    }

    #[test]
    fn recompute_setting() {
        assert_eq!(Config::default().train.recompute, Recompute::None);
        let c = Config::default().with_overrides(&["train.recompute=\"gelu\"".into()]).unwrap();
        assert_eq!(c.train.recompute, Recompute::Gelu);
        let c = Config::from_toml("[train]\nrecompute = \"none\"\n").unwrap();
        assert_eq!(c.train.recompute, Recompute::None);
        let c = Config::from_toml("[train]\nrecompute = \"full\"\n").unwrap();
        assert_eq!(c.train.recompute, Recompute::Full);
        let c = Config::default().with_overrides(&["train.recompute=cheap".into()]).unwrap();
        assert_eq!(c.train.recompute, Recompute::Cheap);
        let e = Config::from_toml("[train]\nrecompute = \"everything\"\n").unwrap_err();
        assert!(e.contains("train.recompute") && e.contains("everything") && e.contains("gelu"), "{e}");
    }
}
