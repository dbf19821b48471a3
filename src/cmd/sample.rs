//! `fp8train sample`: text from a checkpoint.

use super::fits;
use crate::backend::sim::Sim;
use crate::cli::SampleArgs;
use crate::train::checkpoint;
use fp8sim::rng;

/// RNG stream tag of sampling.
const SAMPLE_TAG: u16 = 4;

pub fn sample_cmd(a: &SampleArgs) -> Result<(), String> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        return Err(format!("sample --temperature must be >= 0, got {}", a.temperature));
    }
    let be = Sim;
    let mut one = checkpoint::peek_config(&a.checkpoint)?;
    one.train.batch_size = 1;
    fits(&be, &one, 1, "sample")?;
    let (cfg, mut model, _) = checkpoint::load_for_inference(&be, &a.checkpoint)?;
    let tok = cfg.data.tokenizer;
    let (t, v) = (cfg.model.seq_len, cfg.model.vocab_size);
    let mut tokens = tok.encode(&a.prompt);
    if tokens.is_empty() {
        return Err("sample --prompt must not be empty".into());
    }
    let mut ws = model.workspace(&be, 1, t)?;
    model.prepare_weights(&be, &mut ws)?;
    let prompt_len = tokens.len();
    for i in 0..a.tokens {
        let ctx: Vec<u32> = tokens[tokens.len().saturating_sub(t)..].to_vec();
        let pos = ctx.len() - 1;
        let mut x = ctx.clone();
        x.resize(t, 0); // causal: padding after `pos` does not change its logits
        let logits = model.logits_row(&be, &mut ws, &x, pos)?;
        let row = &logits[..];
        let next = if a.temperature == 0.0 {
            row.iter().enumerate().fold((0, f32::NEG_INFINITY), |m, (j, &l)| if l > m.1 { (j, l) } else { m }).0
        } else {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let w: Vec<f64> = row.iter().map(|&l| ((l as f64 - m) / a.temperature).exp()).collect();
            let total: f64 = w.iter().sum();
            let u = rng::uniform(a.seed, rng::stream(SAMPLE_TAG, i as u32, 0), 0) as f64 * total;
            let mut acc = 0.0;
            w.iter()
                .position(|&p| {
                    acc += p;
                    u < acc
                })
                .unwrap_or(v - 1)
        };
        tokens.push(next as u32);
    }
    println!("{}{}", a.prompt, tok.decode(&tokens[prompt_len..]));
    Ok(())
}
