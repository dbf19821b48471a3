//! `fp8train eval`: a checkpoint's validation loss.

use super::fits;
use crate::backend::sim::Sim;
use crate::cli::EvalArgs;
use crate::data::{self, Dataset};
use crate::train::{self, checkpoint};
use fp8cluster::world::World;

pub fn eval_cmd(a: &EvalArgs) -> Result<(), String> {
    let be = Sim;
    fits(&be, &checkpoint::peek_config(&a.checkpoint)?, 1, "eval")?;
    let (cfg, mut model, step) = checkpoint::load_for_inference(&be, &a.checkpoint)?;
    let ds = Dataset::load(&cfg.data, cfg.train.seed)?;
    ds.check_fits(cfg.model.seq_len)?;
    let nb = a.batches.unwrap_or(cfg.train.eval_batches);
    if nb == 0 {
        return Err("eval --batches must be at least 1".into());
    }
    let mut ws = model.workspace(&be, cfg.train.batch_size, cfg.model.seq_len)?;
    let batches = data::val_batches(&ds.val, cfg.train.batch_size, cfg.model.seq_len, nb);
    let loss = train::val_loss(&be, &mut model, &mut ws, &batches, &crate::train::dist::Grid::new(&World::single()))?;
    println!(
        "val loss {loss:.4} at step {} ({} batches of {} x {} tokens, level {}; f32 bits {:#010x})",
        step,
        nb,
        cfg.train.batch_size,
        cfg.model.seq_len,
        cfg.train.level,
        loss.to_bits()
    );
    Ok(())
}
