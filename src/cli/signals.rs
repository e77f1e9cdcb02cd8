//! The signals that end `monstervm run`: SIGTERM, SIGINT and SIGHUP.
//!
//! Their default action kills the process at once, which leaves qcow2 images marked dirty
//! and the terminal in raw mode. `run` blocks them before it starts any thread, so every
//! thread inherits the mask, and one thread of its own takes them with `sigwait` and asks
//! the VM to stop. The process then exits with status 128 + the signal number, as a shell
//! reports a process killed by that signal.

use std::fmt;

/// The signals that stop a VM run in the foreground.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// A signal that stops `monstervm run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSignal(libc::c_int);

impl StopSignal {
    /// Returns the conventional name, such as `SIGTERM`.
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::SIGTERM => "SIGTERM",
            libc::SIGINT => "SIGINT",
            libc::SIGHUP => "SIGHUP",
            _ => "an unexpected signal",
        }
    }

    /// Returns the signal number.
    pub fn number(self) -> i32 {
        self.0
    }

    /// Returns the exit status that reports this signal: 128 + its number.
    pub fn exit_status(self) -> i32 {
        128 + self.0
    }
}

impl fmt::Display for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The set of stop signals, blocked in the thread that created it.
pub struct BlockedStopSignals {
    set: libc::sigset_t,
}

/// Blocks the stop signals in the calling thread and in every thread it spawns afterwards.
///
/// Call it before the first thread starts: a thread spawned earlier keeps the default
/// action and would let a signal kill the process.
pub fn block_stop_signals() -> std::io::Result<BlockedStopSignals> {
    // SAFETY: sigset_t is plain old data, and sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in STOP_SIGNALS {
        // SAFETY: `set` was initialised by sigemptyset and `signal` is a valid number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    // SAFETY: `set` is initialised, and a null old-set pointer is allowed.
    let result = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if result != 0 {
        return Err(std::io::Error::from_raw_os_error(result));
    }
    Ok(BlockedStopSignals { set })
}

impl BlockedStopSignals {
    /// Starts a thread that waits for the stop signals and calls `on_signal` for each one,
    /// the first and every repeat, until the process exits.
    pub fn spawn_waiter<F>(self, mut on_signal: F) -> std::io::Result<()>
    where
        F: FnMut(StopSignal) + Send + 'static,
    {
        let set = self.set;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut signal: libc::c_int = 0;
                // SAFETY: `set` is an initialised sigset_t whose signals this thread has
                // blocked (it inherited the mask), and `signal` is a valid out pointer.
                let result = unsafe { libc::sigwait(&set, &mut signal) };
                if result != 0 {
                    tracing::error!(error = %std::io::Error::from_raw_os_error(result), "sigwait failed; stop signals are no longer handled");
                    return;
                }
                on_signal(StopSignal(signal));
            })
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_is_128_plus_number() {
        assert_eq!(StopSignal(libc::SIGTERM).exit_status(), 143);
        assert_eq!(StopSignal(libc::SIGINT).exit_status(), 130);
        assert_eq!(StopSignal(libc::SIGHUP).exit_status(), 129);
    }

    #[test]
    fn names_are_conventional() {
        assert_eq!(StopSignal(libc::SIGHUP).to_string(), "SIGHUP");
        assert_eq!(StopSignal(libc::SIGINT).name(), "SIGINT");
    }
}
