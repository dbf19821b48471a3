//! `fp8train train`: a fresh run or a resumed one, on one rank or under mpirun.

use super::fits;
use crate::backend::cuda::Cuda;
use crate::backend::sim::Sim;
use crate::backend::Backend;
use crate::cli::{self, Gemm, TrainArgs};
use crate::train::config::Config;
use crate::train::{self, checkpoint, Start};
use fp8cluster::world::{fnv1a, Collectives, World};
use slog::{info, warn, Logger};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// `cfg` with `train`'s `--set` overrides, then its flags set on the typed config.
fn with_flags(cfg: &Config, a: &TrainArgs) -> Result<Config, String> {
    let mut cfg = cfg.with_overrides(&a.sets)?;
    if let Some(l) = a.level {
        cfg.train.level = l;
    }
    if let Some(s) = a.steps {
        cfg.train.steps = s;
    }
    if let Some(b) = a.backend {
        cfg.train.backend = b;
    }
    if let Some(g) = a.gemm {
        cfg.train.gemm = g;
    }
    if let Some(tp) = a.tp {
        cfg.train.tp = tp;
    }
    if let Some(o) = &a.out {
        cfg.run.out_dir = o.clone();
    }
    if let Some(n) = &a.name {
        cfg.run.name = n.clone();
    }
    Ok(cfg)
}

/// The run folder for a new run; `check`: refuse one that already holds a run.
fn new_run_dir(cfg: &Config, check: bool) -> Result<PathBuf, String> {
    let name = if cfg.run.name.is_empty() {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        format!("{}-s{}-{}", cfg.train.level, cfg.train.seed, secs)
    } else {
        cfg.run.name.clone()
    };
    let dir = Path::new(&cfg.run.out_dir).join(name);
    if check && dir.join("metrics.jsonl").exists() || dir.join("checkpoints").exists() {
        return Err(format!(
            "run folder {} already holds a run; continue it with --resume {} or choose another --name",
            dir.display(),
            dir.display()
        ));
    }
    Ok(dir)
}

/// Join the run (MPI under mpirun) and agree on the binary.
fn join() -> Result<World, String> {
    let world = World::init(1)?;
    let exe = std::env::current_exe()
        .and_then(std::fs::read)
        .map_err(|e| format!("cannot read this program's own file to check it against the other ranks: {e}"))?;
    world.check_same("fp8train binary (different builds on different ranks?)", fnv1a(&exe))?;
    Ok(world)
}

/// Rank 0's value of `s` on every rank.
fn agree_string(world: &World, s: &str) -> String {
    let mut len = [s.len() as u64];
    world.broadcast(&mut len, 0);
    let mut bytes = s.as_bytes().to_vec();
    bytes.resize(len[0] as usize, 0);
    world.broadcast(&mut bytes, 0);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Stop when the ranks were given different configs.
fn check_config(world: &World, cfg: &Config) -> Result<(), String> {
    world.check_same("config (every rank must get the same flags and config file)", fnv1a(cfg.to_toml().as_bytes()))
}

pub fn train_cmd(a: &TrainArgs, log: &Logger) -> Result<(), String> {
    let progress = !a.no_progress && std::io::stderr().is_terminal();
    let mut world = join()?;
    world_train(a, log, progress, &mut world).inspect_err(|e| {
        if world.size > 1 {
            // One rank's error stops all of them rather than leaving them waiting.
            world.abort(e);
        }
    })
}

/// The config a fresh run starts from: the file (if any), then the flags.
fn fresh_config(a: &TrainArgs) -> Result<Config, String> {
    let base = match &a.config {
        Some(p) => Config::from_toml(
            &std::fs::read_to_string(p).map_err(|e| format!("--config {}: cannot read: {e}", p.display()))?,
        )
        .map_err(|e| format!("--config {}: {e}", p.display()))?,
        None => Config::default(),
    };
    let cfg = with_flags(&base, a)?;
    cfg.validate()?;
    Ok(cfg)
}

fn world_train(a: &TrainArgs, log: &Logger, progress: bool, world: &mut World) -> Result<(), String> {
    // A fresh run's config is read once here and handed on; a resume reads it from the
    // checkpoint it loads.
    let fresh = if a.resume.is_none() { Some(fresh_config(a)?) } else { None };
    let tc = match (&a.resume, &fresh) {
        (Some(path), _) => with_flags(&checkpoint::peek_config(path)?, a)?.train,
        (None, Some(cfg)) => cfg.train.clone(),
        (None, None) => unreachable!("a fresh run has its config"),
    };
    // The grid (dp x tp), then this rank's place on the node: bound next to its GPU,
    // tensor-parallel groups inside NVLink islands.
    world.set_grid(tc.tp)?;
    let world = &*world;
    super::topo::bind_at_start(
        world.local_rank,
        world.local_size,
        world.tp,
        tc.backend != cli::Backend::Sim,
        !a.no_bind,
        a.islands.clone(),
        log,
    )?;
    // Waits on silent peers from here on follow the run's setting (not the default).
    world.set_timeout(std::time::Duration::from_secs(tc.peer_timeout_s));
    let gpu = |rank: usize| {
        let d = super::cuda_device(rank)?;
        if tc.gemm == Gemm::Fast {
            Cuda::new_fast(d)
        } else {
            Cuda::new(d)
        }
    };
    match tc.backend {
        cli::Backend::Sim => run_on(&Sim, a, fresh.clone(), log, progress, world),
        cli::Backend::Cuda => run_on(&gpu(world.local_rank)?, a, fresh.clone(), log, progress, world),
        cli::Backend::Auto => match gpu(world.local_rank) {
            Ok(c) => {
                info!(log, "backend auto: using CUDA"; "gpu" => &c.gpu().name, "arch" => &c.gpu().arch);
                run_on(&c, a, fresh.clone(), log, progress, world)
            }
            Err(why) => {
                info!(log, "backend auto: no usable GPU, using the simulator"; "reason" => why);
                run_on(&Sim, a, fresh.clone(), log, progress, world)
            }
        },
    }
}

fn run_on<B: Backend>(
    be: &B,
    a: &TrainArgs,
    fresh: Option<Config>,
    log: &Logger,
    progress: bool,
    world: &World,
) -> Result<(), String> {
    if let Some(path) = &a.resume {
        let found = checkpoint::resolve(path)?;
        fits(be, &with_flags(&checkpoint::peek_config(&found.dir)?, a)?, world.dp, "this run")?;
        if world.rank == 0 {
            for why in &found.skipped {
                warn!(log, "resume: passed over a checkpoint"; "why" => why);
            }
        }
        let tp = crate::model::tp::TpPlace { rank: world.rank % world.tp, size: world.tp };
        let (ckpt_cfg, model, state) = checkpoint::load(be, &found.dir, world.rank / world.tp, world.dp, tp)?;
        let cfg = with_flags(&ckpt_cfg, a)?;
        for (what, same) in [
            ("model", cfg.model == ckpt_cfg.model),
            ("train.level", cfg.train.level == ckpt_cfg.train.level),
            ("train.seed", cfg.train.seed == ckpt_cfg.train.seed),
            ("data", cfg.data == ckpt_cfg.data),
        ] {
            if !same {
                return Err(format!("--resume: {what} cannot change when resuming a checkpoint"));
            }
        }
        if state.step >= cfg.train.steps {
            return Err(format!(
                "--resume: the checkpoint is at step {} and train.steps = {}: nothing to train; pass --steps N \
                 with N > {} to train further",
                state.step, cfg.train.steps, state.step
            ));
        }
        check_config(world, &cfg)?;
        let run_dir = if a.out.is_some() || a.name.is_some() {
            PathBuf::from(agree_string(world, &new_run_dir(&cfg, world.rank == 0)?.to_string_lossy()))
        } else {
            // The run folder that holds the checkpoint; its config must describe it.
            let run = found
                .dir
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .ok_or("--resume: cannot find the run folder")?;
            check_run_config(&run, &ckpt_cfg)?;
            run
        };
        info!(log, "resuming"; "checkpoint" => path.display().to_string(), "step" => state.step);
        train::train(be, &cfg, Start::Resume(Box::new(model), state), &run_dir, log, console(progress), world)?;
        return Ok(());
    }
    let mut cfg = match fresh {
        Some(c) => c,
        None => fresh_config(a)?,
    };
    fits(be, &cfg, world.dp, "this run")?;
    // Rank 0 names the run folder (the default name holds the time).
    let run_dir = PathBuf::from(agree_string(world, &new_run_dir(&cfg, world.rank == 0)?.to_string_lossy()));
    cfg.run.name = run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    check_config(world, &cfg)?;
    train::train(be, &cfg, Start::Fresh, &run_dir, log, console(progress), world)?;
    Ok(())
}

/// A checkpoint resumed inside its run folder must be of that run: the folder's
/// `config.toml` and the checkpoint agree on the model, level, seed and data.
fn check_run_config(run: &Path, ckpt: &Config) -> Result<(), String> {
    let path = run.join("config.toml");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let own = Config::from_toml(&text).map_err(|e| format!("--resume: {}: {e}", path.display()))?;
    let differ: Vec<&str> = [
        ("model", own.model == ckpt.model),
        ("train.level", own.train.level == ckpt.train.level),
        ("train.seed", own.train.seed == ckpt.train.seed),
        ("data", own.data == ckpt.data),
    ]
    .iter()
    .filter(|(_, same)| !same)
    .map(|(what, _)| *what)
    .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "--resume: the checkpoint does not belong to run folder {}: its {} differ from the run's config.toml \
             (a checkpoint of another run copied in?); resume it into a new folder with --name",
            run.display(),
            differ.join(", ")
        ))
    }
}

/// The console output of a run: a progress bar on a terminal, else step lines.
fn console(progress: bool) -> train::Console {
    if progress {
        train::Console::Progress
    } else {
        train::Console::Lines
    }
}
