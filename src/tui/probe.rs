//! Sampling of the VMs in the state directory, off the drawing thread.
//!
//! Each VM is probed on a thread of its own, and a VM whose probe is still running is
//! skipped at the next tick. A slow or wedged VMM therefore delays only its own row, never
//! the dashboard or the other VMs.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::ApiClient;
use crate::cli::lifecycle::{observe_within, DisplayState};
use crate::cli::state::{StateDir, StateError, VmDir};
use crate::tui::app::Sample;

/// Time each API request of a probe may take before the VM shows as unresponsive.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes read from the end of the selected VM's serial log.
pub const SERIAL_TAIL_BYTES: u64 = 16 * 1024;

/// Outcome of one probe.
#[derive(Debug)]
pub enum ProbeResult {
    Sample(Box<Sample>),
    Failed { name: String, error: String },
}

/// Starts probes and collects their results.
pub struct Prober {
    state: StateDir,
    timeout: Duration,
    in_flight: Arc<Mutex<HashSet<String>>>,
    sender: Sender<ProbeResult>,
    receiver: Receiver<ProbeResult>,
}

impl Prober {
    /// Creates a prober of the VMs in `state` whose API requests time out after `timeout`.
    pub fn new(state: StateDir, timeout: Duration) -> Prober {
        let (sender, receiver) = mpsc::channel();
        Prober {
            state,
            timeout,
            in_flight: Arc::default(),
            sender,
            receiver,
        }
    }

    /// Lists the VMs and starts a probe of each VM that has none running. Returns the names
    /// of the VMs found.
    pub fn probe_all(&self) -> Result<Vec<String>, StateError> {
        let names = self.state.vm_names()?;
        for name in &names {
            let vm = self.state.vm(name)?;
            if !self
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone())
            {
                continue;
            }
            let in_flight = self.in_flight.clone();
            let sender = self.sender.clone();
            let timeout = self.timeout;
            let spawned = std::thread::Builder::new()
                .name(format!("probe-{name}"))
                .spawn(move || {
                    let result = probe(&vm, timeout);
                    in_flight
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(vm.name());
                    // The receiver is gone only when the dashboard has quit.
                    let _ = sender.send(result);
                });
            if let Err(error) = spawned {
                self.in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(name);
                tracing::warn!(vm = %name, %error, "failed to spawn a probe thread");
            }
        }
        Ok(names)
    }

    /// Returns the results that arrived since the last call.
    pub fn results(&self) -> Vec<ProbeResult> {
        self.receiver.try_iter().collect()
    }
}

/// Reads the status of `vm` and, while its VMM runs, its metrics.
fn probe(vm: &VmDir, timeout: Duration) -> ProbeResult {
    let status = match observe_within(vm, timeout) {
        Ok(status) => status,
        Err(error) => {
            return ProbeResult::Failed {
                name: vm.name().to_string(),
                error: error.to_string(),
            }
        }
    };
    let has_api = matches!(
        status.state,
        DisplayState::Running | DisplayState::Paused | DisplayState::Stopping
    );
    let metrics = if has_api {
        let client = ApiClient::unix(&vm.socket_path()).with_timeout(timeout);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()
            .and_then(|runtime| runtime.block_on(client.metrics()).ok())
    } else {
        None
    };
    ProbeResult::Sample(Box::new(Sample { status, metrics }))
}

/// Returns the last complete lines of the file at `path` within its final `max_bytes`,
/// made safe to draw by [`sanitize_line`]. A missing file has no lines.
pub fn read_serial_tail(path: &Path, max_bytes: u64) -> std::io::Result<Vec<String>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let size = file.metadata()?.len();
    let start = size.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(max_bytes).read_to_end(&mut bytes)?;

    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.split('\n').collect();
    if start > 0 && lines.len() > 1 {
        // The read began inside a line: its start is not in the buffer.
        lines.remove(0);
    }
    if lines.last() == Some(&"") {
        lines.pop();
    }
    Ok(lines.into_iter().map(sanitize_line).collect())
}

/// Turns one line of guest output into text that draws as the guest meant it, without
/// letting the guest control the host terminal: drops ANSI escape sequences and control
/// characters, keeps what follows the last carriage return, and expands tabs to 8 columns.
pub fn sanitize_line(line: &str) -> String {
    let line = line.trim_end_matches('\r');
    let line = line.rsplit('\r').next().unwrap_or_default();

    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => skip_escape_sequence(&mut chars),
            '\t' => {
                let width = out.chars().count();
                let spaces = 8 - width % 8;
                out.extend(std::iter::repeat_n(' ', spaces));
            }
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Consumes the rest of an escape sequence whose ESC was just read: CSI (`ESC [` up to a
/// final byte in `@`..=`~`), OSC (`ESC ]` up to BEL or `ESC \`), or a two-byte sequence.
fn skip_escape_sequence(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    match chars.next() {
        Some('[') => {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    return;
                }
            }
        }
        Some(']') => {
            while let Some(c) = chars.next() {
                if c == '\x07' {
                    return;
                }
                if c == '\x1b' && chars.peek() == Some(&'\\') {
                    chars.next();
                    return;
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_strips_terminal_control() {
        assert_eq!(sanitize_line("\x1b[1;31mred\x1b[0m text"), "red text");
        assert_eq!(sanitize_line("\x1b]0;title\x07shell$ "), "shell$ ");
        assert_eq!(sanitize_line("\x1b]2;t\x1b\\ok"), "ok");
        assert_eq!(
            sanitize_line("progress 10%\rprogress 99%\r"),
            "progress 99%"
        );
        assert_eq!(sanitize_line("a\tb"), "a       b");
        assert_eq!(sanitize_line("bell\x07\x08 \u{9b}"), "bell ");
    }

    #[test]
    fn tail_drops_partial_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        std::fs::write(&path, "first line\nsecond\nthird\n").unwrap();

        assert_eq!(
            read_serial_tail(&path, 1024).unwrap(),
            ["first line", "second", "third"]
        );
        // The last 12 bytes begin inside "second".
        assert_eq!(read_serial_tail(&path, 12).unwrap(), ["third"]);
        assert!(read_serial_tail(&dir.path().join("missing"), 10)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn tail_keeps_unfinished_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        std::fs::write(&path, b"boot\nlogin: \xff").unwrap();

        assert_eq!(
            read_serial_tail(&path, 1024).unwrap(),
            ["boot", "login: \u{fffd}"]
        );
    }
}
