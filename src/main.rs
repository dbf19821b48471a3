use clap::Parser;
use fp8train::cli::{BenchWhat, Cli, Command};
use fp8train::cmd;
use fp8train::logging::{self, LogFormat};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads =
        if cli.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { cli.threads };
    // The SGEMM baseline sizes its own pool from this variable: same threads as ours.
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
    }
    if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global() {
        eprintln!("fp8train: cannot start {threads} worker threads: {e}");
        return ExitCode::FAILURE;
    }
    let format = if cli.log_json { LogFormat::Json } else { LogFormat::Text };
    let (log, _guard) = logging::init(format, cli.log_level.to_slog());

    let result = match &cli.command {
        Command::Bench(b) => match &b.what {
            BenchWhat::Train(args) => cmd::bench_train::bench_train_cmd(args, &log),
            BenchWhat::Step(args) => fp8train::bench::step::run(args, &log),
            BenchWhat::Comm(args) => fp8train::bench::comm::run(args),
            BenchWhat::Report(args) => fp8train::bench::report::run(args),
            BenchWhat::Fit(args) => fp8train::bench::fit::run(args),
            BenchWhat::Kernels(args) => fp8train::bench::kernels::run(args).map(|report| {
                let json = serde_json::to_string(&report).expect("report serialises");
                if !args.json {
                    print!("{}", fp8train::bench::kernels::table(&report));
                }
                println!("{json}");
            }),
            BenchWhat::Gemm(args) => fp8train::bench::gemm::run(args, &log).map(|report| {
                let json = serde_json::to_string(&report).expect("report serialises");
                if args.json {
                    println!("{json}");
                } else {
                    print!("{}", fp8train::bench::gemm::table(&report));
                    println!("{json}");
                }
            }),
        },
        Command::Train(a) => cmd::train::train_cmd(a, &log),
        Command::Eval(a) => cmd::eval::eval_cmd(a),
        Command::Sample(a) => cmd::sample::sample_cmd(a),
        Command::Report(a) => cmd::report::report_cmd(a),
        Command::Topo(a) => cmd::topo::topo_cmd(a),
        Command::Verify(a) => cmd::verify::verify_cmd(a, &log),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.log_json {
                slog::error!(log, "{}", e);
            } else {
                eprintln!("fp8train: error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
