//! The command line (clap). Each subcommand's arguments live here; the work lives in
//! the module named after it.

pub use crate::model::Level;
pub use crate::train::config::{Backend, Gemm};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "fp8train",
    version,
    about = "FP8 mixed-precision training of GPT-style models: mpirun + NCCL on GPUs, a bit-exact CPU simulator everywhere"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Worker threads of the simulator backend (0 = one per core).
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,

    /// Log records as JSON lines (on stderr) instead of readable text.
    #[arg(long, global = true)]
    pub log_json: bool,

    /// Lowest log level shown.
    #[arg(long, global = true, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
}

/// A count that must be at least 1 (`--tp 0` is an error, not 1).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a whole number: {e}")),
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn to_slog(self) -> slog::Level {
        match self {
            LogLevel::Error => slog::Level::Error,
            LogLevel::Warning => slog::Level::Warning,
            LogLevel::Info => slog::Level::Info,
            LogLevel::Debug => slog::Level::Debug,
            LogLevel::Trace => slog::Level::Trace,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a GPT (with no arguments: a small model on the embedded corpus, in the simulator).
    Train(TrainArgs),
    /// Print the validation loss of a checkpoint.
    Eval(EvalArgs),
    /// Generate text from a checkpoint.
    Sample(SampleArgs),
    /// Regenerate a run folder's report (loss-curve plot) and print its summary.
    Report(ReportArgs),
    /// Show the machine's topology and the rank -> GPU -> CPU/memory placement plan.
    Topo(TopoArgs),
    /// Benchmarks that print figures against a baseline measured in the same run.
    Bench(BenchArgs),
    /// Check the CUDA backend against the simulator, op by op.
    Verify(VerifyArgs),
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Train(_) => "train",
            Command::Eval(_) => "eval",
            Command::Sample(_) => "sample",
            Command::Report(_) => "report",
            Command::Topo(_) => "topo",
            Command::Bench(_) => "bench",
            Command::Verify(_) => "verify",
        }
    }
}

#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// TOML config file (any subset of the [model], [train], [data], [run] tables).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Override one setting, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Precision level (= --set train.level=...).
    #[arg(long, value_enum, ignore_case = true)]
    pub level: Option<Level>,
    /// Training steps (= --set train.steps=...).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Backend (= --set train.backend=...).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// GEMM class on GPUs (= --set train.gemm=...).
    #[arg(long, value_enum)]
    pub gemm: Option<Gemm>,
    /// Tensor-parallel size (= --set train.tp=...): groups of N consecutive ranks split
    /// every block, data parallel across the groups (mpirun -np a multiple of N).
    #[arg(long, value_parser = at_least_one)]
    pub tp: Option<usize>,
    /// Folder for run folders (= --set run.out_dir=...).
    #[arg(long)]
    pub out: Option<String>,
    /// Run folder name (= --set run.name=...).
    #[arg(long)]
    pub name: Option<String>,
    /// Continue from a checkpoint folder or a run folder (its newest checkpoint).
    #[arg(long)]
    pub resume: Option<std::path::PathBuf>,
    /// No progress bar even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    /// Do not bind this process to the CPUs and memory of its placement.
    #[arg(long)]
    pub no_bind: bool,
    /// Declare the node's NVLink islands (as `topo --islands`, e.g. "0-7") when neither
    /// NVML nor the topology reports them; tensor-parallel groups must lie inside one.
    #[arg(long)]
    pub islands: Option<String>,
}

#[derive(Args, Debug, Default, Clone)]
pub struct TopoArgs {
    /// Ranks on this node (default: one per GPU, or 1 without GPUs).
    #[arg(long)]
    pub ranks_per_node: Option<usize>,
    /// Tensor-parallel size (groups of consecutive ranks, inside one NVLink island).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub tp: usize,
    /// Read the machine from an hwloc XML file instead of discovering it.
    #[arg(long)]
    pub topology_xml: Option<std::path::PathBuf>,
    /// An NCCL topology file (NCCL_TOPO_FILE format): the machine when no hwloc XML is
    /// given, and its NVLink entries for the islands.
    #[arg(long)]
    pub nccl_topo: Option<std::path::PathBuf>,
    /// Declare NVLink islands, e.g. "0-7" or "0-3 4-7".
    #[arg(long)]
    pub islands: Option<String>,
    /// Print JSON instead of the summary and table.
    #[arg(long)]
    pub json: bool,
    /// Write this machine's hwloc XML to a file (to make a fixture of a real machine).
    #[arg(long)]
    pub export_xml: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Backend to check against the simulator.
    #[arg(long, value_enum, default_value_t = Backend::Cuda)]
    pub backend: Backend,
    /// Sweep 2^28 instead of all 2^32 f32 inputs.
    #[arg(long)]
    pub quick: bool,
    /// Only check the collectives and the gradient reductions (run under mpirun):
    /// over MPI, and over NCCL when the ranks have GPUs.
    #[arg(long)]
    pub collectives: bool,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint folder or run folder.
    pub checkpoint: std::path::PathBuf,
    /// Validation batches (default: the run's train.eval_batches).
    #[arg(long)]
    pub batches: Option<usize>,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Checkpoint folder or run folder.
    pub checkpoint: std::path::PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "the ")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run folder.
    pub run: std::path::PathBuf,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// The exact GEMM (f32, BF16, FP8 inputs) against an optimised f32 SGEMM (matrixmultiply).
    Gemm(GemmBenchArgs),
    /// Train the embedded default at every level; final validation loss and tokens/s side by side.
    Train(TrainBenchArgs),
    /// Time whole training steps of a GPT shape (tok/s, MFU, peak memory, phases).
    Step(StepBenchArgs),
    /// Time the collectives over the ranks of an mpirun (bus bandwidth per size) and
    /// count a model's gradient bytes on the wire (FP8 vs BF16 vs FP32).
    Comm(CommBenchArgs),
    /// The largest batch of model shapes that fits a GPU at each level and recompute
    /// setting, by the memory estimate (a plan to confirm with `bench step`).
    Fit(FitBenchArgs),
    /// Build a report (report.md, bandwidth and tokens/s plots) from a bench folder: the
    /// launch kit's `bench` job output (comm.json and run folders).
    Report(BenchReportArgs),
    /// The bandwidth-bound ops of a step (layernorm, GELU, residual, casts, cross-entropy,
    /// AdamW) at a model's shapes, as GB/s and as a fraction of a device copy's.
    Kernels(KernelsBenchArgs),
}

#[derive(Args, Debug)]
pub struct KernelsBenchArgs {
    /// Model shape whose tensors are used: gpt2-124m, gpt-1.3b, gpt-6.7b, gpt-13b, or
    /// `default` (the embedded default).
    #[arg(long, default_value = "gpt-1.3b")]
    pub model: String,
    /// Sequences per batch (default: the shape's `bench step` batch).
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long, value_enum, default_value_t = Backend::Cuda)]
    pub backend: Backend,
    /// Timed runs per op (the median is shown), after one warm-up run.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Print only the JSON document (no table).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FitBenchArgs {
    /// Model shapes, comma-separated (gpt2-124m, gpt-1.3b, gpt-6.7b, gpt-13b).
    #[arg(long, default_value = "gpt-1.3b,gpt-6.7b,gpt-13b")]
    pub models: String,
    /// GPU memory available to the run in GiB: what `bench step` and `train` compare the
    /// estimate with (an H200 has 139.8 in all and 139.25 free once a CUDA context exists).
    #[arg(long, default_value_t = 139.25)]
    pub memory: f64,
    /// Largest batch tried.
    #[arg(long, default_value_t = 4096)]
    pub max_batch: usize,
    /// Print only the JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchReportArgs {
    /// The bench folder.
    pub dir: std::path::PathBuf,
}

#[derive(Args, Debug)]
pub struct CommBenchArgs {
    /// Message sizes (bytes; K, M, G suffixes), comma-separated.
    #[arg(long, default_value = "1K,16K,256K,4M,64M")]
    pub sizes: String,
    /// Timed iterations per size (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Also count this model's gradient bytes per step (gpt2-124m, gpt-1.3b, ...).
    #[arg(long)]
    pub model: Option<String>,
    /// Transport: the simulator's MPI collectives (`sim`).
    #[arg(long, value_enum, default_value_t = Backend::Sim)]
    pub backend: Backend,
    /// Print only the JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StepBenchArgs {
    /// Model shape: gpt2-124m, gpt-1.3b, gpt-6.7b, gpt-13b, or `default` (the embedded
    /// default); --set model.*=... changes any of it.
    #[arg(long, default_value = "gpt2-124m")]
    pub model: String,
    /// Override model settings, e.g. --set model.n_layer=2 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Precision level.
    #[arg(long, value_enum, ignore_case = true, default_value_t = Level::O2)]
    pub level: Level,
    /// Rows per step (default: the shape's usual batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Sequence length (default: the shape's).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Backend to measure.
    #[arg(long, value_enum, default_value_t = Backend::Cuda)]
    pub backend: Backend,
    /// GEMM class.
    #[arg(long, value_enum, default_value_t = Gemm::Fast)]
    pub gemm: Gemm,
    /// Steps run before timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// On a GPU, warm up for at least this many seconds as well (more steps if needed):
    /// a GPU that was idle runs its first second or so of work slower.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Tensor-parallel size under mpirun (data parallel over the rest of the ranks;
    /// --batch rows per data-parallel rank).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub tp: usize,
    /// Print only the JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TrainBenchArgs {
    /// Steps per level (default: the embedded default's).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Override settings of every run, e.g. --set train.batch_size=8 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Folder for the runs (default: a temporary folder, removed afterwards).
    #[arg(long)]
    pub out: Option<String>,
    /// Print only the JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GemmBenchArgs {
    /// Backend to measure.
    #[arg(long, value_enum, default_value_t = Backend::Sim)]
    pub backend: Backend,

    /// Square sizes m = n = k, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![512, 1024, 2048])]
    pub sizes: Vec<usize>,

    /// Minimum measuring time per GEMM and size, in seconds (at least 3 runs each).
    #[arg(long, default_value_t = 0.5)]
    pub min_time: f64,

    /// Print only the JSON document (no table).
    #[arg(long)]
    pub json: bool,
}
