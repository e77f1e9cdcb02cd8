//! The transport-free control interface of one running VM.
//!
//! The HTTP server in [`crate::api::server`] turns requests into calls on [`VmHandle`], so
//! the same operations can be driven by tests, the REPL or another transport without HTTP.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::api::serial::SerialSubscription;

/// Lifecycle state of a VM as its VMM process reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// The VMM is building the VM: at start-up and between the boots of an API reset.
    Starting,
    /// The vCPUs run the guest.
    Running,
    /// The vCPUs wait at their next exit until a resume or a stop.
    Paused,
    /// A stop is pending and the VMM process is about to exit.
    Stopping,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
        })
    }
}

/// An operation requested through `PUT /vm/actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmAction {
    Pause,
    Resume,
    /// Ends the VM and its VMM process.
    Stop,
    /// Rebuilds the VM from its definition and boots it again in the same VMM process.
    Reset,
}

impl fmt::Display for VmAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmAction::Pause => "pause",
            VmAction::Resume => "resume",
            VmAction::Stop => "stop",
            VmAction::Reset => "reset",
        })
    }
}

/// Body of `GET /vm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub state: VmState,
    /// Engine that runs the guest: `kvm`, `emulator`, or `test-double` in lifecycle tests.
    pub backend: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Process ID of the VMM.
    pub pid: u32,
    /// Seconds since the VMM process started.
    pub uptime_secs: f64,
    /// Number of times the VM was built and booted: 1, plus one per API reset.
    pub boots: u32,
    /// Whether the guest kernel reported a panic through the pvpanic device, which ends
    /// the VM.
    #[serde(default)]
    pub guest_panicked: bool,
}

/// Exit counters summed over every vCPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    pub pio: u64,
    pub mmio: u64,
    pub halt: u64,
}

/// Serial console traffic since the VMM started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialCounters {
    /// Bytes the guest wrote to its serial port.
    pub bytes_out: u64,
    /// Bytes sent to the guest's serial input by console viewers.
    pub bytes_in: u64,
    /// Console viewers connected now.
    pub viewers: u64,
}

/// Body of `GET /vm/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmMetrics {
    pub uptime_secs: f64,
    pub memory_mib: u64,
    /// `None` when the backend does not publish its counters while the vCPUs run.
    pub exits: Option<ExitCounts>,
    /// Instructions retired; `None` where the exit counters are missing, zero on KVM.
    pub instructions: Option<u64>,
    /// Port and MMIO accesses that reached no device.
    pub unclaimed_io_accesses: u64,
    pub serial: SerialCounters,
}

/// An action that the VM's current state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} VM {name}: it is {state}")]
pub struct ActionError {
    pub name: String,
    pub action: VmAction,
    pub state: VmState,
}

/// Control of one running VM, implemented by the VMM process and by test doubles.
pub trait VmHandle: Send + Sync {
    /// Returns the VM's identity, state and size.
    fn info(&self) -> VmInfo;

    /// Pauses, resumes, stops or resets the VM.
    ///
    /// Stopping a VM that is already stopping succeeds, so that retries are harmless; every
    /// other action that the state does not allow returns an [`ActionError`].
    fn action(&self, action: VmAction) -> Result<(), ActionError>;

    /// Returns the VM's counters.
    fn metrics(&self) -> VmMetrics;

    /// Returns the recent serial output and a receiver of the bytes that follow it.
    fn subscribe_serial(&self) -> SerialSubscription;

    /// Sends host bytes to the guest's serial input.
    fn send_serial(&self, bytes: &[u8]);
}
