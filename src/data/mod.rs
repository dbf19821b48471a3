//! Training data: the embedded grammar corpus, raw text files (byte-level or GPT-2
//! BPE tokens), and llm.c token shards; the train/validation split; batch sampling.
//!
//! Batches are sampled by the counter-based RNG keyed by (seed, step, row), so the
//! data position of a run is its step number: a resumed run sees exactly the batches
//! the uninterrupted run would have seen.

pub mod grammar;
pub mod shards;

use fp8sim::rng;
use serde::{Deserialize, Serialize};

/// How text becomes tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per byte (vocabulary 256).
    Byte,
    /// GPT-2 BPE (tiktoken r50k_base, vocabulary 50257).
    Gpt2,
}

impl TokenizerKind {
    pub fn vocab_size(self) -> usize {
        match self {
            TokenizerKind::Byte => 256,
            TokenizerKind::Gpt2 => 50257,
        }
    }

    pub fn encode(self, text: &str) -> Vec<u32> {
        match self {
            TokenizerKind::Byte => text.bytes().map(u32::from).collect(),
            TokenizerKind::Gpt2 => tiktoken_rs::r50k_base_singleton().encode_ordinary(text),
        }
    }

    pub fn decode(self, tokens: &[u32]) -> String {
        match self {
            TokenizerKind::Byte => {
                String::from_utf8_lossy(&tokens.iter().map(|&t| t.min(255) as u8).collect::<Vec<_>>()).into_owned()
            }
            TokenizerKind::Gpt2 => tiktoken_rs::r50k_base_singleton()
                .decode(tokens.to_vec())
                .unwrap_or_else(|_| "<undecodable tokens>".into()),
        }
    }
}

/// Where the tokens come from.
/// Where the tokens come from (`data.source`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The embedded grammar corpus.
    Embedded,
    /// A text file.
    Text,
    /// llm.c token shards.
    Bin,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// "embedded" (the grammar corpus), "text" (a text file) or "bin" (llm.c shards).
    pub source: Source,
    /// Text file, or training shard(s) for "bin" (comma separated).
    pub path: String,
    /// Validation shard(s) for "bin" (comma separated); empty: split off the training data.
    pub val_path: String,
    pub tokenizer: TokenizerKind,
    /// Fraction of the tokens held out for validation when no val_path is given.
    pub val_fraction: f64,
    /// Size of the embedded corpus in bytes.
    pub corpus_bytes: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: Source::Embedded,
            path: String::new(),
            val_path: String::new(),
            tokenizer: TokenizerKind::Byte,
            val_fraction: 0.1,
            corpus_bytes: 1 << 20,
        }
    }
}

impl DataConfig {
    pub fn validate(&self) -> Result<(), String> {
        match self.source {
            Source::Embedded => {
                if self.tokenizer != TokenizerKind::Byte {
                    return Err("data.tokenizer must be \"byte\" for data.source = \"embedded\"".into());
                }
                if !(10_000..=(1 << 30)).contains(&self.corpus_bytes) {
                    return Err(format!(
                        "data.corpus_bytes = {} is out of range (allowed 10000..=1073741824)",
                        self.corpus_bytes
                    ));
                }
            }
            Source::Text | Source::Bin => {
                if self.path.is_empty() {
                    return Err(format!("data.path is required for data.source = \"{:?}\"", self.source).to_lowercase());
                }
            }
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return Err(format!(
                "data.val_fraction = {} is out of range (allowed: strictly between 0 and 1)",
                self.val_fraction
            ));
        }
        Ok(())
    }
}

/// Tokens ready for training.
pub struct Dataset {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    pub tokenizer: TokenizerKind,
    pub description: String,
    /// Exact entropy rate (nats/token) when the source knows it (embedded corpus).
    pub entropy_floor: Option<f64>,
    /// Entropy of the training tokens' unigram frequencies (nats/token).
    pub unigram_entropy: f64,
}

impl Dataset {
    pub fn load(cfg: &DataConfig, seed: u64) -> Result<Dataset, String> {
        cfg.validate()?;
        let (tokens, val, description, floor) = match cfg.source {
            Source::Embedded => {
                let g = grammar::Grammar::new();
                let text = g.generate(seed, cfg.corpus_bytes);
                let toks: Vec<u32> = text.iter().map(|&b| b as u32).collect();
                (toks, None, format!("embedded grammar corpus, {} bytes", cfg.corpus_bytes), Some(g.entropy_per_byte()))
            }
            Source::Text => {
                let text = std::fs::read_to_string(&cfg.path)
                    .map_err(|e| format!("data.path: cannot read text file {}: {e}", cfg.path))?;
                let toks = cfg.tokenizer.encode(&text);
                let d = format!("text file {} ({} tokens, {:?} tokenizer)", cfg.path, toks.len(), cfg.tokenizer);
                (toks, None, d, None)
            }
            Source::Bin => {
                let toks = shards::read_many(&cfg.path)?;
                let val = if cfg.val_path.is_empty() { None } else { Some(shards::read_many(&cfg.val_path)?) };
                (toks, val, format!("llm.c shards {}", cfg.path), None)
            }
        };
        let (train, val) = match val {
            Some(v) => (tokens, v),
            None => {
                let n_val = ((tokens.len() as f64) * cfg.val_fraction).round() as usize;
                let split = tokens.len() - n_val;
                (tokens[..split].to_vec(), tokens[split..].to_vec())
            }
        };
        let vocab = cfg.tokenizer.vocab_size();
        if let Some(bad) = train.iter().chain(&val).find(|&&t| t as usize >= vocab) {
            return Err(format!("data: token id {bad} does not fit the {:?} vocabulary of {vocab}", cfg.tokenizer));
        }
        let unigram_entropy = grammar::unigram_entropy(&train);
        Ok(Dataset { train, val, tokenizer: cfg.tokenizer, description, entropy_floor: floor, unigram_entropy })
    }

    /// Check both splits hold at least one window of `t + 1` tokens.
    pub fn check_fits(&self, t: usize) -> Result<(), String> {
        for (name, d) in [("training", &self.train), ("validation", &self.val)] {
            if d.len() < t + 2 {
                return Err(format!(
                    "data: the {name} split has {} tokens, fewer than model.seq_len + 2 = {}",
                    d.len(),
                    t + 2
                ));
            }
        }
        Ok(())
    }
}

/// RNG stream tag of batch sampling.
pub const DATA_TAG: u16 = 2;

/// Inputs and next-token targets of `b` windows of `t` tokens starting at `offsets`.
fn windows(data: &[u32], offsets: impl Iterator<Item = usize>, t: usize) -> (Vec<u32>, Vec<u32>) {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for o in offsets {
        x.extend_from_slice(&data[o..o + t]);
        y.extend_from_slice(&data[o + 1..o + t + 1]);
    }
    (x, y)
}

/// Rows `first_row..first_row + b` of the global training batch of `step`: row r
/// starts at a uniform offset drawn from (seed, step, r), mapped to the range by a
/// 32 x 32 -> 64-bit multiply (Lemire). Data-parallel rank k takes rows k*b.., so N
/// ranks of b rows see exactly the batch of one rank with N*b rows.
pub fn train_batch(data: &[u32], seed: u64, step: u64, first_row: usize, b: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
    let range = (data.len() - t - 1) as u64;
    let offs = (first_row..first_row + b).map(|r| {
        let bits = rng::bits(seed, rng::stream(DATA_TAG, step as u32, r as u32), 0) as u64;
        ((bits * range) >> 32) as usize
    });
    windows(data, offs, t)
}

/// `nb` fixed validation batches: windows spread evenly over the split.
pub fn val_batches(data: &[u32], b: usize, t: usize, nb: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let range = data.len() - t - 1;
    let total = b * nb;
    (0..nb).map(|k| windows(data, (0..b).map(|r| (k * b + r) * range / total.max(1)), t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_windows_with_shifted_targets_and_deterministic() {
        let data: Vec<u32> = (0..1000).collect();
        let (x, y) = train_batch(&data, 1, 5, 0, 4, 16);
        assert_eq!(x.len(), 64);
        for r in 0..4 {
            for i in 0..16 {
                assert_eq!(y[r * 16 + i], x[r * 16 + i] + 1);
            }
        }
        assert_eq!((x.clone(), y.clone()), train_batch(&data, 1, 5, 0, 4, 16));
        assert_ne!(x, train_batch(&data, 1, 6, 0, 4, 16).0);
        // Rows 2..4 alone are the second half of the same batch.
        assert_eq!(train_batch(&data, 1, 5, 2, 2, 16).0, x[32..].to_vec());
        let v = val_batches(&data, 4, 16, 3);
        assert_eq!(v.len(), 3);
        assert!(v.iter().all(|(x, _)| x.iter().all(|&t| (t as usize) < 1000 - 1)));
    }

    #[test]
    fn tokenizers_round_trip() {
        let s = "Hello, FP8 world! ünïcödé";
        for k in [TokenizerKind::Byte, TokenizerKind::Gpt2] {
            assert_eq!(k.decode(&k.encode(s)), s);
        }
        assert_eq!(TokenizerKind::Gpt2.encode("Hello world"), vec![15496, 995]);
    }
}
