//! The host-CPU oracle: runs user-mode instruction snippets natively and on the
//! emulator from the same state, so that the host CPU checks the emulator.
//!
//! - [`state`]: [`UserState`] (GPRs, user RFLAGS bits, XMM, MXCSR, a data area at a fixed
//!   address) and the address layout both sides share.
//! - [`native`]: [`run_native`], which executes a snippet in a forked child.
//! - [`emulator`]: [`run_emulated`], which executes a snippet on the emulator in 64-bit
//!   user mode.
//! - [`generate`]: a seeded generator of random snippets and states per instruction class.
//! - [`compare`]: the comparison of a native and an emulated output state.
//! - [`registers`]: reads and writes of GPRs of any width inside a [`UserState`].
//! - [`undefined`]: the flags and registers that the architecture leaves undefined after
//!   an instruction, which a comparison must ignore.

pub mod compare;
pub mod emulator;
pub mod generate;
pub mod native;
pub mod registers;
pub mod state;
pub mod undefined;

use std::io;
use std::time::Duration;

pub use emulator::run_emulated;
pub use native::{run_native, run_native_with_timeout};
pub use state::{Fault, UserState};

/// Errors of the oracle. A snippet that raises an exception is not an error: its output
/// state carries the [`Fault`].
#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    /// A forked child ended without sending its report.
    #[error("oracle child {pid} died without a report ({status}); run the snippet under gdb with `set follow-fork-mode child`")]
    ChildDied { pid: i32, status: String },
    /// The child could not build the snippet's address space.
    #[error(
        "oracle child failed to {step}; check that nothing else maps the oracle's fixed addresses"
    )]
    ChildSetup {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// The snippet is longer than the code page allows.
    #[error("snippet is {len} bytes, more than the maximum {max}")]
    CodeTooLong { len: usize, max: usize },
    /// The input's data area does not have the fixed size.
    #[error("data area is {len} bytes, expected exactly {expected}")]
    DataSize { len: usize, expected: usize },
    /// The emulator stopped with an error, such as an unimplemented instruction.
    #[error("emulator failed")]
    Emulator(#[source] crate::core::cpu::CpuError),
    /// The emulator panicked, which guest input must never make it do.
    #[error("emulator panicked: {message}")]
    EmulatorPanicked { message: String },
    /// The emulator retired the maximum number of instructions without reaching the end
    /// of the snippet.
    #[error("emulator ran {max} instructions without reaching the end of the snippet (rip {rip:#x}); check branch targets")]
    EmulatorRunaway { max: u64, rip: u64 },
    /// The emulator stopped in a way that a user-mode snippet cannot cause.
    #[error("emulator stopped unexpectedly: {reason} at rip {rip:#x}")]
    EmulatorStopped { reason: &'static str, rip: u64 },
    /// fork failed.
    #[error("failed to fork the oracle child")]
    Fork(#[source] io::Error),
    /// Building or reading the emulator's guest memory failed.
    #[error("emulator guest memory access failed: {0}")]
    GuestMemory(String),
    /// The input's MXCSR sets bits that this CPU reserves; FXRSTOR would raise #GP.
    #[error("MXCSR {mxcsr:#x} sets bits outside the host's MXCSR_MASK {mask:#x}")]
    InvalidMxcsr { mxcsr: u32, mask: u32 },
    /// The child sent a report of unknown kind.
    #[error("oracle child sent a report of unknown kind {kind}")]
    MalformedReport { kind: u32 },
    /// Creating the pipe to the child failed.
    #[error("failed to create the pipe to the oracle child")]
    Pipe(#[source] io::Error),
    /// Reading the child's report failed.
    #[error("failed to read the oracle child's report")]
    Read(#[source] io::Error),
    /// A fault hit the runner's own code, outside the snippet: the snippet jumped away, or
    /// the input state could not be loaded.
    #[error("fault outside the snippet: {fault}")]
    RunnerFault { fault: Fault },
    /// The child did not finish in time and was killed, so the snippet probably loops.
    #[error("oracle child {pid} timed out after {timeout:?} and was killed; check the snippet for an endless loop")]
    TimedOut { pid: i32, timeout: Duration },
}
