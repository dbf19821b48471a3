//! The training loop: one clear line per logged step, a run folder with the resolved
//! config, metrics as JSON lines, checkpoints and a loss-curve plot.

pub mod checkpoint;
pub mod config;
pub mod dist;
pub mod lock;
pub mod metrics;
pub mod report;

use crate::backend::BResult;
use crate::backend::Backend;
use crate::data::{self, Dataset};
use crate::model::gpt::Workspace;
use crate::model::Gpt;
use checkpoint::LoopState;
use config::Config;
use dist::Grid;
use fp8cluster::reduce::CommBytes;
use fp8cluster::world::{Collectives, World};
use fp8sim::ops::adamw::StepControl;
use metrics::{Metrics, Record};
use slog::{info, warn, Logger};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Learning rate of step `step` (0-based): linear warmup, then cosine decay to
/// `lr * min_lr_frac`. Host-side scalar, computed in f64 with [`cos_pi`].
pub fn lr_at(cfg: &config::TrainConfig, step: u64) -> f32 {
    let lr = cfg.lr as f64;
    if step < cfg.warmup_steps {
        return (lr * (step + 1) as f64 / cfg.warmup_steps as f64) as f32;
    }
    let span = cfg.steps.saturating_sub(cfg.warmup_steps).max(1);
    let frac = ((step - cfg.warmup_steps) as f64 / span as f64).min(1.0);
    let min = lr * cfg.min_lr_frac as f64;
    (min + (lr - min) * 0.5 * (1.0 + cos_pi(frac))) as f32
}

/// cos(pi * x) for x in [0, 1] by its Taylor series (plain arithmetic, so every
/// machine computes the same schedule, whatever its libm).
pub fn cos_pi(x: f64) -> f64 {
    let a = std::f64::consts::PI * x.clamp(0.0, 1.0);
    let a2 = a * a;
    let (mut term, mut sum) = (1.0f64, 1.0f64);
    for k in 1..30 {
        term *= -a2 / ((2 * k - 1) * (2 * k)) as f64;
        sum += term;
    }
    sum
}

/// Smallest and largest gradient scale mu (powers of two, so unscaling is exact).
const MU_MIN: f32 = 1.0 / 16_777_216.0;
const MU_MAX: f32 = 16_777_216.0;

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub run_dir: PathBuf,
    pub final_val_loss: f32,
    pub train_losses: Vec<f32>,
    pub tokens_per_s: f64,
    pub bytes_per_param: f64,
    pub meta_bytes: usize,
    pub num_params: usize,
    pub skipped_steps: u64,
    pub final_mu: f32,
}

/// Validation loss: mean over the fixed validation batches (batch means added in
/// order, then divided by the count); every rank of a tensor-parallel group the same.
pub fn val_loss<B: Backend>(
    be: &B,
    model: &mut Gpt<B>,
    ws: &mut Workspace<B>,
    batches: &[(Vec<u32>, Vec<u32>)],
    grid: &Grid<'_>,
) -> BResult<f32> {
    Ok({
        dist::prepare_weights(be, model, ws, grid)?;
        let mut sum = 0f32;
        for (x, y) in batches {
            sum += if grid.tp.size > 1 {
                model.eval_loss_tp(be, &grid.tp, ws, x, y)?
            } else {
                model.eval_loss(be, ws, x, y)?
            };
        }
        sum / batches.len() as f32
    })
}

/// Where training starts: fresh, or from a checkpoint.
pub enum Start<B: Backend> {
    Fresh,
    Resume(Box<Gpt<B>>, LoopState),
}

/// What a run prints on the console (rank 0; the run folder gets everything anyway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Console {
    /// A progress bar, the step lines printed above it.
    Progress,
    /// One line per logged step and the run's summary lines on stdout.
    Lines,
    /// Nothing (a caller printing a document of its own, e.g. `bench train --json`).
    Quiet,
}

/// Train per `cfg` into `run_dir`. Prints one line per logged step on stdout (through
/// the progress bar when there is one), unless `console` is quiet.
pub fn train<B: Backend>(
    be: &B,
    cfg: &Config,
    start: Start<B>,
    run_dir: &Path,
    log: &Logger,
    console: Console,
    world: &World,
) -> Result<RunOutcome, String> {
    let lead = world.rank == 0;
    // Rank 0 prints (what every rank would print alike), unless told to keep quiet.
    let speak = lead && console != Console::Quiet;
    let progress = console == Console::Progress;
    cfg.validate()?;
    let tc = &cfg.train;
    let ds = Dataset::load(&cfg.data, tc.seed)?;
    ds.check_fits(cfg.model.seq_len)?;
    if tc.fault_at_step > 0 && tc.fault_rank >= world.size as u64 {
        return Err(format!(
            "train.fault_rank = {} names no rank: the run has {} rank(s) (0..{})",
            tc.fault_rank,
            world.size,
            world.size - 1
        ));
    }
    let _lock = if lead {
        std::fs::create_dir_all(run_dir).map_err(|e| format!("cannot create run folder {}: {e}", run_dir.display()))?;
        let l = lock::RunLock::acquire(run_dir)?;
        if let Some(pid) = l.taken_over_from {
            info!(log, "run folder lock taken over from a process that has ended"; "pid" => pid);
        }
        Some(l)
    } else {
        None
    };
    if world.tp != tc.tp.max(1) {
        return Err(format!(
            "train.tp = {} but the ranks were joined at tensor-parallel size {} (World::set_grid)",
            tc.tp, world.tp
        ));
    }
    let grid = Grid::new(world);
    let resumed = matches!(start, Start::Resume(..));
    let (mut model, mut ls) = match start {
        Start::Fresh => (
            Gpt::new_tp(
                be,
                &cfg.model,
                tc.level,
                tc.seed,
                tc.amax_window,
                grid.dp.rank,
                grid.dp.size,
                grid.tp_place(),
            )?,
            LoopState { step: 0, opt_steps: 0, mu_bits: 1f32.to_bits(), good_steps: 0 },
        ),
        Start::Resume(m, s) => (*m, s),
    };
    if model.tp != grid.tp_place() {
        return Err(format!(
            "the model holds tensor-parallel piece {:?} but this rank's place is {:?}",
            model.tp,
            grid.tp_place()
        ));
    }
    model.recompute = tc.recompute;
    if lead && tc.recompute == crate::model::Recompute::Gelu && tc.level.fp8() {
        // (gpt::Kept: at the FP8 levels GELU's backward reads an E4M3 copy of its input,
        // kept or recomputed alike, and the recomputation needs the BF16 input kept.)
        warn!(log, "train.recompute = \"gelu\" saves no memory at this level: GELU's backward keeps an E4M3 copy \
                    of its input, as large as the BF16 input that recomputing GELU needs; it costs one GELU forward \
                    per layer (\"full\" recomputes each block from its input and saves most activation memory)";
              "level" => tc.level.to_string());
    }
    let mut metrics = if lead {
        std::fs::write(run_dir.join("config.toml"), cfg.to_toml())
            .map_err(|e| format!("cannot write {}: {e}", run_dir.join("config.toml").display()))?;
        let (m, r) = Metrics::open(run_dir, resumed.then_some(ls.step))?;
        if r.dropped_torn > 0 {
            warn!(log, "metrics.jsonl: dropped a torn record (the previous run was killed while writing it)";
                  "lines" => r.dropped_torn);
        }
        Some(m)
    } else {
        None
    };
    let mut metrics_warned = false;
    let mut emit = |v: Record<'_>| {
        if let Some(m) = metrics.as_mut() {
            if let Err(e) = m.write(v) {
                // Training goes on (checkpoints hold the state); say so once.
                if !metrics_warned {
                    warn!(log, "metrics.jsonl: a record could not be written (disk full?)"; "error" => e.to_string());
                    metrics_warned = true;
                }
            }
        }
    };
    let (b, t) = (tc.batch_size, cfg.model.seq_len);
    let mut ws = model.workspace(be, b, t)?;
    let val = data::val_batches(&ds.val, b, t, tc.eval_batches);

    let np = model.num_params();
    let opt_bytes = world.all_gather_vec(&[model.optimizer_bytes(be) as u64]);
    let (data_bytes, meta_bytes) = model.state_bytes(be);
    let bpp = data_bytes as f64 / np as f64;
    info!(log, "run"; "dir" => run_dir.display().to_string(), "backend" => be.name(), "level" => tc.level.to_string(),
          "params" => np, "data" => &ds.description, "resumed_at_step" => if resumed { ls.step } else { 0 });
    if speak {
        let pieces = if world.tp > 1 {
            let whole = crate::model::params::whole_count(&cfg.model);
            format!(" on this rank (its tensor-parallel pieces of the model's {whole})")
        } else {
            String::new()
        };
        println!(
            "fp8train: {} parameters{pieces}, level {}: {:.2} bytes/param in weights + gradients + optimizer state \
             (measured from the buffers held; + {} bytes of scale metadata)",
            np, tc.level, bpp, meta_bytes
        );
        if world.size > 1 {
            println!(
                "fp8train: optimizer state (masters + moments) per rank: {} bytes (ranks 0..{})",
                opt_bytes.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(" / "),
                world.size - 1
            );
            println!(
                "fp8train: {} ranks (data parallel {} x tensor parallel {}), {} rows per data-parallel rank, {} \
                 rows per step",
                world.size,
                world.dp,
                world.tp,
                b,
                b * world.dp
            );
        }
    }
    if !resumed {
        emit(Record::Data {
            description: &ds.description,
            entropy_floor: ds.entropy_floor,
            unigram_entropy: ds.unigram_entropy,
            level: tc.level.to_string(),
            params: np as u64,
            bytes_per_param: bpp,
            scale_meta_bytes: meta_bytes as u64,
            ranks: world.size as u64,
        });
    }

    let pb = (progress && speak).then(|| {
        let pb = indicatif::ProgressBar::new(tc.steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps  {elapsed_precise} elapsed, ETA {eta}  {msg}",
            )
            .expect("template"),
        );
        pb.set_position(ls.step);
        pb
    });
    let say = |line: String| match &pb {
        _ if !speak => {}
        Some(pb) => pb.println(line),
        None => println!("{line}"),
    };

    start_control(be, &mut model, tc, &ls)?;
    let mut train_losses = Vec::new();
    let mut skipped = 0u64;
    let run_start = Instant::now();
    let mut tokens_done = 0u64;
    let mut peak_memory = 0u64;
    let mut last_val = f32::NAN;
    // Step s + 1 is launched before step s's figures are taken, so the host never waits
    // on the device between steps (the figures were copied behind step s's work); a step
    // after which the model is read (evaluation, a checkpoint, the end) is finished first.
    let boundary = |done: u64| {
        done == tc.steps
            || (tc.eval_every > 0 && done.is_multiple_of(tc.eval_every))
            || (tc.checkpoint_every > 0 && done.is_multiple_of(tc.checkpoint_every))
    };
    // `end`: when the next step was launched (the host waited for this one's work before
    // it could), or now if it is reported first.
    let mut report = |f: InFlight,
                      model: &mut Gpt<B>,
                      ws: &mut Workspace<B>,
                      ls: &mut LoopState,
                      end: Instant|
     -> Result<(), String> {
        let step = f.step;
        let so = f.launched.finish(ls)?;
        let mu = f32::from_bits(ls.mu_bits);
        let (st, comm, norm) = (so.stats, so.comm, so.norm);
        if st.overflow {
            skipped += 1;
            warn!(log, "overflow: non-finite gradients, step skipped"; "step" => step + 1, "mu_old" => so.mu_before, "mu_new" => mu);
        }
        ls.step = step + 1;
        // The step's time: from its launch to the next one's (or to now).
        let secs = end.duration_since(f.t0).as_secs_f64();
        tokens_done += (b * t * world.dp) as u64;
        let tok_s = (b * t * world.dp) as f64 / secs;
        train_losses.push(st.loss);
        // Device memory (GPU backends): the pool's high-water mark so far.
        let mem = be.memory();
        let high_water = mem.map(|m| m.pool_high_water);
        peak_memory = peak_memory.max(high_water.unwrap_or(0));
        emit(Record::Step {
            step: ls.step,
            loss: st.loss,
            loss_bits: st.loss.to_bits(),
            grad_norm: norm,
            lr: f.lr,
            ms: secs * 1e3,
            tok_s,
            mu,
            skipped: st.overflow,
            dy_saturated: st.saturated,
            dy_elements: st.cast_elements,
            comm_bytes: comm.payload,
            comm_meta_bytes: comm.meta,
            tp_comm_bytes: so.tp.map(|x| x.total()),
            tp_comm_bf16_bytes: so.tp.map(|x| x.bf16_equivalent()),
            pool_high_water_bytes: high_water,
        });
        if ls.step == 1 || ls.step.is_multiple_of(tc.log_every) || ls.step == tc.steps || st.overflow {
            let mut line = format!(
                "step {:>5}/{} | loss {:.4} | norm {:.4} | lr {:.2e} | {:.1} ms | {:.0} tok/s",
                ls.step,
                tc.steps,
                st.loss,
                norm,
                f.lr,
                secs * 1e3,
                tok_s
            );
            if world.dp > 1 {
                line += &format!(" | grad comm {:.1} KiB/rank", comm.payload as f64 / 1024.0);
            }
            if let Some(x) = so.tp {
                line += &format!(
                    " | tp comm {:.1} KiB/rank (BF16 would move {:.1})",
                    x.total() as f64 / 1024.0,
                    x.bf16_equivalent() as f64 / 1024.0
                );
            }
            if let Some(h) = high_water {
                line += &format!(" | mem {:.2} GiB", h as f64 / (1u64 << 30) as f64);
            }
            if st.overflow {
                line += &format!(" | skipped: non-finite gradients, mu -> {mu}");
            }
            say(line);
        }
        if let Some(pb) = &pb {
            pb.set_position(ls.step);
            pb.set_message(format!("loss {:.4}", st.loss));
        }
        let eval_now = ls.step == tc.steps || (tc.eval_every > 0 && ls.step.is_multiple_of(tc.eval_every));
        if eval_now {
            last_val = val_loss(be, model, ws, &val, &grid)?;
            emit(Record::Eval { step: ls.step, val_loss: last_val });
            say(format!("step {:>5}/{} | val loss {:.4}", ls.step, tc.steps, last_val));
        }
        let at_end = ls.step == tc.steps && tc.checkpoint_at_end;
        if at_end || (tc.checkpoint_every > 0 && ls.step.is_multiple_of(tc.checkpoint_every)) {
            if let Some(dir) = checkpoint::save(be, run_dir, model, cfg, *ls, &grid)? {
                info!(log, "checkpoint written"; "dir" => dir.display().to_string());
            }
            world.barrier();
        }
        Ok(())
    };
    let mut next = ls.step;
    let mut inflight: Option<InFlight> = None;
    loop {
        if let Some(f) = inflight.take_if(|f| boundary(f.step + 1) || next >= tc.steps) {
            report(f, &mut model, &mut ws, &mut ls, Instant::now())?;
        }
        if next >= tc.steps {
            break;
        }
        let step = next;
        let timeout = std::time::Duration::from_secs(tc.peer_timeout_s);
        world.set_timeout(timeout);
        world.heartbeat(step, timeout);
        if tc.fault_rank == world.rank as u64 && tc.fault_at_step == step + 1 {
            fault(tc.fault_kind, world.rank);
        }
        let t0 = Instant::now();
        let lr = lr_at(tc, step);
        // Every rank of a tensor-parallel group takes its data-parallel rank's rows.
        let (x, y) = data::train_batch(&ds.train, tc.seed, step, grid.dp.rank * b, b, t);
        let inject = tc.inject_nan_at_step == step + 1 && world.rank == 0;
        let launched = launch_step(be, &mut model, &mut ws, tc, (&x, &y), lr, &grid, inject)?;
        next += 1;
        if let Some(prev) = inflight.replace(InFlight { step, lr, t0, launched }) {
            report(prev, &mut model, &mut ws, &mut ls, t0)?;
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let tokens_per_s = tokens_done as f64 / run_start.elapsed().as_secs_f64().max(1e-9);
    emit(Record::Final {
        step: ls.step,
        val_loss: last_val,
        tok_s: tokens_per_s,
        pool_high_water_bytes: (peak_memory > 0).then_some(peak_memory),
    });
    drop(metrics);
    if lead {
        match report::write_plot(run_dir) {
            Ok(p) => info!(log, "loss curve"; "file" => p.display().to_string()),
            Err(e) => warn!(log, "no loss curve"; "error" => e),
        }
    }
    if speak {
        let floor = ds.entropy_floor.map(|f| format!(", entropy floor {f:.4}")).unwrap_or_default();
        let mem = if peak_memory > 0 {
            format!(" | peak device memory {:.2} GiB (pool)", peak_memory as f64 / (1u64 << 30) as f64)
        } else {
            String::new()
        };
        println!(
            "fp8train: final val loss {:.4} (unigram entropy {:.4}{}) | {:.0} tok/s{mem} | run folder {}",
            last_val,
            ds.unigram_entropy,
            floor,
            tokens_per_s,
            run_dir.display()
        );
    }
    Ok(RunOutcome {
        run_dir: run_dir.to_path_buf(),
        final_val_loss: last_val,
        train_losses,
        tokens_per_s,
        bytes_per_param: bpp,
        meta_bytes,
        num_params: np,
        skipped_steps: skipped,
        final_mu: f32::from_bits(ls.mu_bits),
    })
}

/// A launched step of the training loop, waiting for its figures.
struct InFlight {
    /// 0-based.
    step: u64,
    lr: f32,
    t0: Instant,
    launched: LaunchedStep,
}

/// What one training step did.
pub struct StepOutcome {
    pub stats: crate::model::gpt::BackwardStats,
    /// Gradient norm (NaN on a skipped step).
    pub norm: f32,
    pub comm: CommBytes,
    /// Bytes this rank sent in tensor-parallel collectives (tp > 1).
    pub tp: Option<crate::model::tp::TpTraffic>,
    /// mu before the step.
    pub mu_before: f32,
}

/// One optimizer step on batch `(x, y)`, launched and then read back
/// ([`launch_step`], [`LaunchedStep::finish`]). `bench step` runs exactly this; the
/// training loop runs the same two halves with the next step launched in between.
#[allow(clippy::too_many_arguments)]
pub fn train_step<B: Backend>(
    be: &B,
    model: &mut Gpt<B>,
    ws: &mut Workspace<B>,
    tc: &config::TrainConfig,
    (x, y): (&[u32], &[u32]),
    lr: f32,
    ls: &mut LoopState,
    grid: &Grid<'_>,
    inject: bool,
) -> BResult<StepOutcome> {
    launch_step(be, model, ws, tc, (x, y), lr, grid, inject)?.finish(ls)
}

/// A step whose work is queued, with its figures on their way to the host.
pub struct LaunchedStep {
    stats: crate::model::gpt::BackwardStats,
    comm: CommBytes,
    tp: Option<crate::model::tp::TpTraffic>,
    record: crate::model::gpt::PendingRecord,
}

impl LaunchedStep {
    /// Wait for the step's figures (the loss, the norm, the controller's counts, which go
    /// into `ls`).
    pub fn finish(self, ls: &mut LoopState) -> BResult<StepOutcome> {
        let mut st = self.stats;
        let c = self.record.finish(&mut st)?;
        ls.opt_steps = c.opt_steps as u64;
        ls.good_steps = c.good_steps as u64;
        ls.mu_bits = c.mu.to_bits();
        Ok(StepOutcome { stats: st, norm: c.norm, comm: self.comm, tp: self.tp, mu_before: c.mu_before })
    }
}

/// Queue one optimizer step on batch `(x, y)`: weights for this step, forward and
/// backward, the overflow decision and the loss agreed by every rank, gradient
/// reduction, clipping, AdamW, and mu's update. The decisions run on the device (the
/// step controller, `fp8sim::ops::adamw::step_control`), so on one rank nothing is read
/// back: the step's figures are copied behind its work ([`LaunchedStep::finish`] takes
/// them). With several data-parallel ranks the loss and the overflow flag are agreed
/// over MPI first (a read-back mid-step). At tp > 1 the model's pass runs over the
/// tensor-parallel group (`Gpt::forward_backward_tp`, `Gpt::control_step_tp`) and the
/// gradients are reduced over the data-parallel group only.
#[allow(clippy::too_many_arguments)]
pub fn launch_step<B: Backend>(
    be: &B,
    model: &mut Gpt<B>,
    ws: &mut Workspace<B>,
    tc: &config::TrainConfig,
    (x, y): (&[u32], &[u32]),
    lr: f32,
    grid: &Grid<'_>,
    inject: bool,
) -> BResult<LaunchedStep> {
    Ok({
        let split = grid.tp.size > 1;
        dist::prepare_weights(be, model, ws, grid)?;
        let st = if split {
            model.forward_backward_tp(be, &grid.tp, ws, x, y, inject)?
        } else {
            model.forward_backward(be, ws, x, y, inject)?
        };
        let mut comm = CommBytes::default();
        if grid.dp.size > 1 {
            let mut agreed = st;
            model.step_record(be, ws, &mut agreed)?;
            dist::agree(&grid.dp, &mut agreed);
            model.set_agreed(be, agreed.loss, agreed.overflow)?;
            if !agreed.overflow {
                comm = dist::reduce_gradients(be, grid, &mut model.params)?;
            }
        }
        let control = StepControl {
            grad_clip: tc.grad_clip,
            ranks: grid.dp.size as f32,
            beta1: tc.beta1,
            beta2: tc.beta2,
            mu_growth_interval: u32::try_from(tc.mu_growth_interval).unwrap_or(u32::MAX),
            mu_min: MU_MIN,
            mu_max: MU_MAX,
        };
        if split {
            model.control_step_tp(be, &grid.tp, &control)?;
        } else {
            model.control_step(be, &control)?;
        }
        model.adamw_step(be, lr, tc.beta1, tc.beta2, tc.eps, tc.weight_decay)?;
        let tp = split.then_some(ws.tp_traffic);
        LaunchedStep { stats: st, comm, tp, record: model.request_record(be, ws)? }
    })
}

/// Start the model's step controller from the loop state (a run's start or resume).
pub fn start_control<B: Backend>(be: &B, model: &mut Gpt<B>, tc: &config::TrainConfig, ls: &LoopState) -> BResult<()> {
    let count = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    model.set_control(be, f32::from_bits(ls.mu_bits), count(ls.opt_steps), count(ls.good_steps), tc.beta1, tc.beta2)
}

/// Fault injection for the fault tests: die or stop answering.
fn fault(kind: config::FaultKind, rank: usize) {
    match kind {
        config::FaultKind::Hang => {
            eprintln!("fp8train rank {rank}: injected fault: stop answering");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        // Die as a killed process does: no handler, no message of its own.
        config::FaultKind::Exit => {
            // SAFETY: raising a signal on this process has no memory-safety preconditions.
            unsafe { libc::raise(libc::SIGKILL) };
            unreachable!("SIGKILL cannot be caught")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_and_cosine() {
        for x in [0.0, 0.1, 0.25, 0.5, 0.77, 1.0] {
            assert!((cos_pi(x) - (std::f64::consts::PI * x).cos()).abs() < 1e-14);
        }
        let tc = config::TrainConfig { steps: 100, warmup_steps: 10, lr: 1.0, min_lr_frac: 0.1, ..Default::default() };
        assert_eq!(lr_at(&tc, 0), 0.1);
        assert_eq!(lr_at(&tc, 9), 1.0);
        assert_eq!(lr_at(&tc, 10), 1.0);
        assert!((lr_at(&tc, 99) - 0.1).abs() < 1e-3);
        assert!(lr_at(&tc, 55) < 0.6 && lr_at(&tc, 55) > 0.5);
    }
}
