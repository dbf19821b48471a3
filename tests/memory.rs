//! The memory estimate that refuses oversized runs must hold what a run really takes:
//! a counting allocator measures the peak of building a model and its workspace and
//! running training steps in the simulator, and the estimate must bound it from above
//! without being loose. (One test in this binary: the counter is process-wide.)

use fp8cluster::world::World;
use fp8sim::ops::attention::AttnShape;
use fp8train::backend::sim::Sim;
use fp8train::backend::Backend;
use fp8train::model::{memory, Gpt, Level, ModelConfig, Recompute};
use fp8train::train::checkpoint::LoopState;
use fp8train::train::config::TrainConfig;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

struct Counting;
static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = NOW.fetch_add(by, SeqCst) + by;
    PEAK.fetch_max(now, SeqCst);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counts are kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        NOW.fetch_sub(l.size(), SeqCst);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            NOW.fetch_sub(l.size(), SeqCst);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn estimate_bounds_the_measured_peak_at_every_level() {
    let _ = rayon::ThreadPoolBuilder::new().num_threads(2).build_global();
    let world = World::single();
    for (level, layers, c, nh, t, v, b, recompute) in [
        (Level::Bf16, 2, 64, 4, 64, 256, 4, Recompute::None),
        (Level::O1, 2, 64, 4, 64, 256, 4, Recompute::None),
        (Level::O2, 3, 96, 3, 128, 512, 2, Recompute::None),
        (Level::O2, 3, 96, 3, 128, 512, 2, Recompute::Gelu),
        (Level::Bf16, 2, 64, 4, 64, 256, 4, Recompute::Gelu),
        (Level::O2, 3, 96, 3, 128, 512, 2, Recompute::Cheap),
        (Level::Bf16, 2, 64, 4, 64, 256, 4, Recompute::Cheap),
        (Level::O2, 3, 96, 3, 128, 512, 2, Recompute::Full),
        (Level::Bf16, 2, 64, 4, 64, 256, 4, Recompute::Full),
    ] {
        let cfg = ModelConfig { n_layer: layers, n_embd: c, n_head: nh, seq_len: t, vocab_size: v };
        let tc = TrainConfig { level, batch_size: b, recompute, ..Default::default() };
        let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % v) as u32).collect();
        let base = NOW.load(SeqCst);
        PEAK.store(base, SeqCst);
        {
            let be = Sim;
            let mut model = Gpt::new(&be, &cfg, level, 1, tc.amax_window, 0, 1).unwrap();
            model.recompute = recompute;
            let mut ws = model.workspace(&be, b, t).unwrap();
            let mut ls = LoopState { step: 0, opt_steps: 0, mu_bits: 1f32.to_bits(), good_steps: 0 };
            fp8train::train::start_control(&be, &mut model, &tc, &ls).unwrap();
            for _ in 0..2 {
                fp8train::train::train_step(
                    &be,
                    &mut model,
                    &mut ws,
                    &tc,
                    (&tokens, &tokens),
                    1e-3,
                    &mut ls,
                    &fp8train::train::dist::Grid::new(&world),
                    false,
                )
                .unwrap();
            }
        }
        let peak = (PEAK.load(SeqCst) - base) as u64;
        let scratch = Sim.op_scratch(AttnShape { b, t, c, nh });
        let est = memory::estimate(&cfg, level, recompute, 1, b, t, scratch).total();
        assert!(est >= peak, "{level} recompute {recompute}: estimate {est} below the measured peak {peak}");
        assert!(
            est <= peak + peak / 2,
            "{level} recompute {recompute}: estimate {est} far above the measured peak {peak}"
        );
        eprintln!(
            "{level} recompute {recompute}: measured peak {peak} bytes, estimate {est} ({:.2}x)",
            est as f64 / peak as f64
        );
    }
    // Tensor parallel 2: both ranks as threads of this process (their host-staged
    // collectives' buffers included); each rank's estimate bounds its share.
    for (level, recompute) in [
        (Level::O2, Recompute::None),
        (Level::Bf16, Recompute::None),
        (Level::O2, Recompute::Full),
        (Level::O2, Recompute::Cheap),
    ] {
        let (layers, c, nh, t, v, b) = (2, 64, 4, 64, 256, 4);
        let cfg = ModelConfig { n_layer: layers, n_embd: c, n_head: nh, seq_len: t, vocab_size: v };
        let tc = TrainConfig { level, batch_size: b, recompute, ..Default::default() };
        let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % v) as u32).collect();
        let base = NOW.load(SeqCst);
        PEAK.store(base, SeqCst);
        fp8cluster::local::run_group(2, |g| {
            use fp8cluster::world::Collectives;
            let be = Sim;
            let place = fp8train::model::tp::TpPlace { rank: g.rank(), size: 2 };
            let mut model = Gpt::new_tp(&be, &cfg, level, 1, tc.amax_window, 0, 1, place).unwrap();
            model.recompute = recompute;
            let mut ws = model.workspace(&be, b, t).unwrap();
            let ls = LoopState { step: 0, opt_steps: 0, mu_bits: 1f32.to_bits(), good_steps: 0 };
            fp8train::train::start_control(&be, &mut model, &tc, &ls).unwrap();
            let control = fp8sim::ops::adamw::StepControl {
                grad_clip: 1.0,
                ranks: 1.0,
                beta1: 0.9,
                beta2: 0.95,
                mu_growth_interval: 1000,
                mu_min: 1.0,
                mu_max: 1.0,
            };
            for _ in 0..2 {
                model.prepare_weights(&be, &mut ws).unwrap();
                model.forward_backward_tp(&be, g, &mut ws, &tokens, &tokens, false).unwrap();
                model.control_step_tp(&be, g, &control).unwrap();
                model.adamw_step(&be, 1e-3, 0.9, 0.95, 1e-8, 0.1).unwrap();
            }
        });
        let peak = (PEAK.load(SeqCst) - base) as u64;
        let scratch = Sim.op_scratch(AttnShape { b, t, c: c / 2, nh: nh / 2 });
        let est = memory::estimate_tp(&cfg, level, recompute, 1, 2, b, t, scratch).total();
        let one = memory::estimate(&cfg, level, recompute, 1, b, t, scratch).total();
        eprintln!(
            "tp 2 {level} recompute {recompute}: both ranks' peak {peak} bytes, 2 x estimate {} ({:.2}x; tp 1 {one})",
            2 * est,
            (2 * est) as f64 / peak as f64
        );
        assert!(
            2 * est >= peak,
            "tp 2 {level} recompute {recompute}: 2 x estimate {est} below the measured peak {peak}"
        );
        assert!(est < one, "tp 2 {level}: a rank's estimate {est} is not below one rank alone's {one}");
    }
}
