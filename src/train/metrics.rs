//! `metrics.jsonl`: one typed record per line (the run's data and level, every step,
//! every evaluation, the end), appended whole so a killed run leaves whole lines; a
//! resume keeps the records up to its checkpoint.

use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// One line of `metrics.jsonl`, tagged by `kind`.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record<'a> {
    /// The run: its data, level and size.
    Data {
        description: &'a str,
        entropy_floor: Option<f64>,
        unigram_entropy: f64,
        level: String,
        params: u64,
        bytes_per_param: f64,
        scale_meta_bytes: u64,
        ranks: u64,
    },
    /// One training step.
    Step {
        step: u64,
        loss: f32,
        /// The loss's bit pattern (bit-identity checks compare these).
        loss_bits: u32,
        grad_norm: f32,
        lr: f32,
        ms: f64,
        tok_s: f64,
        /// The gradient (loss) scale.
        mu: f32,
        /// Skipped for non-finite gradients.
        skipped: bool,
        dy_saturated: u64,
        dy_elements: u64,
        comm_bytes: u64,
        comm_meta_bytes: u64,
        /// Bytes this rank sent in tensor-parallel collectives, and what they would be
        /// with BF16 instead of FP8 activations and gradients (tp > 1 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        tp_comm_bytes: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tp_comm_bf16_bytes: Option<u64>,
        /// The device pool's high-water mark so far (GPU backends; null elsewhere).
        pool_high_water_bytes: Option<u64>,
    },
    /// A validation pass.
    Eval { step: u64, val_loss: f32 },
    /// The end of the run.
    Final { step: u64, val_loss: f32, tok_s: f64, pool_high_water_bytes: Option<u64> },
}

/// Appends JSON lines to `metrics.jsonl`, each record in one `write` call, so a kill
/// leaves whole lines and at most one torn last line.
pub struct Metrics(std::fs::File);

/// What reopening `metrics.jsonl` for a resume kept and dropped.
#[derive(Debug, Default, PartialEq)]
pub struct MetricsResume {
    pub kept: usize,
    /// Records of steps after the checkpoint (they run again).
    pub dropped_later: usize,
    /// Lines that are not whole JSON records (a torn tail of a killed run).
    pub dropped_torn: usize,
}

/// `text` of `metrics.jsonl` reduced to the whole records up to step `limit`.
fn metrics_kept(text: &str, limit: u64) -> (String, MetricsResume) {
    let mut r = MetricsResume::default();
    let mut kept = String::new();
    let whole = if text.ends_with('\n') { text } else { &text[..text.rfind('\n').map_or(0, |i| i + 1)] };
    r.dropped_torn = usize::from(whole.len() < text.len());
    for line in whole.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Err(_) => r.dropped_torn += 1,
            Ok(v) if v["step"].as_u64().is_some_and(|s| s > limit) => r.dropped_later += 1,
            Ok(_) => {
                kept.push_str(line);
                kept.push('\n');
                r.kept += 1;
            }
        }
    }
    (kept, r)
}

impl Metrics {
    pub fn open(run_dir: &Path, keep_up_to_step: Option<u64>) -> Result<(Metrics, MetricsResume), String> {
        let path = run_dir.join("metrics.jsonl");
        let mut resume = MetricsResume::default();
        if let Some(limit) = keep_up_to_step {
            // Resuming: keep the whole records up to the checkpoint; later steps run
            // again. Replaced through a renamed temporary file: a kill now loses nothing.
            let old = match std::fs::read(&path) {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            };
            let (kept, r) = metrics_kept(&old, limit);
            resume = r;
            let tmp = run_dir.join(".metrics.jsonl.tmp");
            let err = |e: std::io::Error| format!("cannot rewrite {}: {e}", path.display());
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(kept.as_bytes()).and_then(|_| f.sync_all()).map_err(err)?;
            std::fs::rename(&tmp, &path).map_err(err)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        Ok((Metrics(f), resume))
    }
    pub fn write(&mut self, r: Record<'_>) -> std::io::Result<()> {
        let line = serde_json::to_string(&r).map_err(std::io::Error::other)?;
        // One write of the whole line (a File is unbuffered: no splitting by a buffer).
        self.0.write_all(format!("{line}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_keeps_whole_records_up_to_the_checkpoint() {
        let text = "{\"kind\":\"data\"}\n{\"kind\":\"step\",\"step\":1}\n{\"kind\":\"step\",\"step\":2}\n\
                    {\"kind\":\"step\",\"step\":3}\n{\"kind\":\"step\",\"st";
        let (kept, r) = metrics_kept(text, 2);
        assert_eq!(kept, "{\"kind\":\"data\"}\n{\"kind\":\"step\",\"step\":1}\n{\"kind\":\"step\",\"step\":2}\n");
        assert_eq!(r, MetricsResume { kept: 3, dropped_later: 1, dropped_torn: 1 });
        // A damaged line in the middle goes too; a clean file loses nothing.
        let (_, r) = metrics_kept("{\"step\":1}\n{\"ste\n{\"step\":2}\n", 9);
        assert_eq!(r, MetricsResume { kept: 2, dropped_later: 0, dropped_torn: 1 });
        let (kept, r) = metrics_kept("{\"step\":1}\n", 9);
        assert_eq!((kept.as_str(), r.dropped_torn), ("{\"step\":1}\n", 0));
    }

    #[test]
    fn records_are_tagged_json_lines() {
        let dir = std::env::temp_dir().join(format!("fp8train-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (mut m, _) = Metrics::open(&dir, None).unwrap();
        m.write(Record::Eval { step: 3, val_loss: 1.5 }).unwrap();
        m.write(Record::Final { step: 3, val_loss: 1.5, tok_s: 10.0, pool_high_water_bytes: None }).unwrap();
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0], serde_json::json!({"kind": "eval", "step": 3, "val_loss": 1.5}));
        assert_eq!(lines[1]["kind"], "final");
        assert!(lines[1]["pool_high_water_bytes"].is_null());
        // The form the GPU check's loss-bit comparison looks for.
        assert!(text.starts_with("{\"kind\":\"eval\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
