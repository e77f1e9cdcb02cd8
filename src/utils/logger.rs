//! Tracing setup for the `monstervm` binary.

use std::io::{IsTerminal, Write};

use tracing_subscriber::EnvFilter;

/// Installs a stderr subscriber. `RUST_LOG` wins over `level` when it is set.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        // Colour codes only on a terminal: the VMM's stderr is its log file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        // The subscriber reports its own write failures with eprintln!, which panics
        // when stderr is a closed pipe.
        .log_internal_errors(false)
        .try_init();
}

/// Stderr for log lines. A failed write is dropped, so that a closed stderr (a reader
/// that went away, EPIPE) never stops the program that logs.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
