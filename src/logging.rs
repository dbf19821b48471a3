//! Logging with slog: readable lines on a terminal (or any stderr), JSON lines with
//! `--log-json`. Records go to stderr so that stdout stays for a command's output
//! (tables, JSON documents).

use slog::{o, Drain, Level, Logger};

/// Log output style.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the asynchronous drain alive; dropping it flushes pending records.
pub struct LogGuard(#[allow(dead_code)] Option<slog_async::AsyncGuard>);

/// Build the process logger. `level` filters records below it.
pub fn init(format: LogFormat, level: Level) -> (Logger, LogGuard) {
    let (drain, guard) = match format {
        LogFormat::Json => {
            let json = slog_json::Json::new(std::io::stderr()).add_default_keys().build().fuse();
            slog_async::Async::new(json).build_with_guard()
        }
        LogFormat::Text => {
            let decorator = slog_term::TermDecorator::new().stderr().build();
            let term = slog_term::FullFormat::new(decorator).build().fuse();
            slog_async::Async::new(term).build_with_guard()
        }
    };
    let drain = drain.filter_level(level).fuse();
    (Logger::root(drain, o!()), LogGuard(Some(guard)))
}
