//! The serial console on the user's terminal.
//!
//! When stdin is a TTY it is put in raw mode, so every key reaches the guest, and
//! [`ESCAPE_KEY`] ends the VM. When stdin is a pipe or a file, bytes pass through as they
//! come and end of input leaves the VM running, so scripts and tests can drive the guest.

use std::io::{Read, Write as _};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

/// Ctrl-] (0x1d), the key that ends `monstervm run` and detaches `monstervm console` from
/// a raw-mode terminal, as in telnet and `virsh console`.
pub const ESCAPE_KEY: u8 = 0x1d;

/// Restores the terminal's settings when dropped.
pub struct RawModeGuard {
    saved: SavedTerminal,
}

/// A terminal's settings from before raw mode, which any thread can put back.
#[derive(Clone, Copy)]
pub struct SavedTerminal {
    fd: RawFd,
    settings: libc::termios,
}

impl SavedTerminal {
    /// Puts the saved settings back on the terminal.
    pub fn restore(&self) {
        // SAFETY: `settings` came from tcgetattr on the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.settings) };
    }
}

impl RawModeGuard {
    /// Puts `fd` in raw mode if it is a TTY; returns `None` for pipes and files.
    pub fn enable(fd: RawFd) -> Option<RawModeGuard> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }

        // SAFETY: termios is plain old data, so all zeros is a valid value to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios for tcgetattr to write.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "failed to read terminal settings; console stays in line mode");
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so that host-side messages still start at column 0.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: `raw` is a fully initialised termios from tcgetattr.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "failed to set raw mode; console stays in line mode");
            return None;
        }
        Some(RawModeGuard {
            saved: SavedTerminal {
                fd,
                settings: saved,
            },
        })
    }

    /// Returns the settings this guard restores, for a path that exits without dropping it.
    pub fn saved(&self) -> SavedTerminal {
        self.saved
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        self.saved.restore();
    }
}

/// The input thread's action for a chunk of bytes read from stdin.
pub enum InputAction<'a> {
    /// Send these bytes to the guest.
    Forward(&'a [u8]),
    /// Send these bytes, then end the VM: the escape key was pressed.
    ForwardThenQuit(&'a [u8]),
}

/// Splits `chunk` at the escape key when the terminal is in raw mode.
pub fn scan_input(chunk: &[u8], raw_mode: bool) -> InputAction<'_> {
    if raw_mode {
        if let Some(pos) = chunk.iter().position(|&b| b == ESCAPE_KEY) {
            return InputAction::ForwardThenQuit(&chunk[..pos]);
        }
    }
    InputAction::Forward(chunk)
}

/// Reads stdin on a thread of its own and hands each chunk to `forward`; calls `quit`
/// when the escape key is pressed in raw mode. End of input stops the thread only.
pub fn spawn_stdin_reader<F, Q>(raw_mode: bool, mut forward: F, quit: Q) -> std::io::Result<()>
where
    F: FnMut(&[u8]) + Send + 'static,
    Q: FnOnce() + Send + 'static,
{
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            let mut stdin = stdin.lock();
            let mut buffer = [0u8; 256];
            loop {
                let n = match stdin.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "failed to read stdin; console input stops");
                        return;
                    }
                };
                match scan_input(&buffer[..n], raw_mode) {
                    InputAction::Forward(bytes) => forward(bytes),
                    InputAction::ForwardThenQuit(bytes) => {
                        forward(bytes);
                        quit();
                        return;
                    }
                }
            }
        })
        .map(|_| ())
}

/// The guest's serial output on stdout, flushed at every write so that each character
/// appears as the guest sends it.
pub struct ConsoleOutput {
    status: Arc<ConsoleStatus>,
}

/// The first write error of a [`ConsoleOutput`], and the action it triggers.
#[derive(Default)]
pub struct ConsoleStatus {
    error: Mutex<Option<String>>,
    on_failure: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl ConsoleOutput {
    /// Creates the console output and the status that reports its failure.
    pub fn new() -> (ConsoleOutput, Arc<ConsoleStatus>) {
        let status = Arc::new(ConsoleStatus::default());
        let output = ConsoleOutput {
            status: status.clone(),
        };
        (output, status)
    }

    fn write_stdout(buf: &[u8]) -> std::io::Result<()> {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(buf)?;
        stdout.flush()
    }
}

impl std::io::Write for ConsoleOutput {
    /// Writes `buf` to stdout. After a failed write the output is dropped but reported as
    /// written, because the failure action stops the VM and `run` reports the error once.
    /// Returning the error would make the serial device log every byte that follows.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.status.failure().is_none() {
            if let Err(error) = Self::write_stdout(buf) {
                self.status.fail(&error);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.status.failure().is_none() {
            if let Err(error) = std::io::stdout().lock().flush() {
                self.status.fail(&error);
            }
        }
        Ok(())
    }
}

impl ConsoleStatus {
    /// Returns the first write error, if stdout failed.
    pub fn failure(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets the action to run once when a write fails, or at once if one already failed.
    pub fn on_failure(&self, action: impl Fn() + Send + Sync + 'static) {
        if self.on_failure.set(Box::new(action)).is_ok() && self.failure().is_some() {
            if let Some(action) = self.on_failure.get() {
                action();
            }
        }
    }

    fn fail(&self, error: &std::io::Error) {
        {
            let mut recorded = self.error.lock().unwrap_or_else(|e| e.into_inner());
            if recorded.is_some() {
                return;
            }
            *recorded = Some(error.to_string());
        }
        tracing::debug!(%error, "writing the console to stdout failed");
        if let Some(action) = self.on_failure.get() {
            action();
        }
    }
}

/// Returns stdin's descriptor.
pub fn stdin_fd() -> RawFd {
    std::io::stdin().as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_key_splits_input_in_raw_mode() {
        match scan_input(b"ls\x1dmore", true) {
            InputAction::ForwardThenQuit(bytes) => assert_eq!(bytes, b"ls"),
            InputAction::Forward(_) => panic!("escape key was not detected"),
        }
    }

    #[test]
    fn escape_key_passes_through_from_pipes() {
        match scan_input(b"ls\x1d", false) {
            InputAction::Forward(bytes) => assert_eq!(bytes, b"ls\x1d"),
            InputAction::ForwardThenQuit(_) => panic!("pipes have no escape key"),
        }
    }

    #[test]
    fn pipe_is_not_raw() {
        let (read_end, _write_end) = std::io::pipe().unwrap();
        assert!(RawModeGuard::enable(read_end.as_raw_fd()).is_none());
    }
}
