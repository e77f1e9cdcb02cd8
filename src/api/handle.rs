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
    /// Parks every vCPU; the request returns once all of them have left guest code.
    Pause,
    Resume,
    /// Asks the guest to power off (Ctrl-Alt-Del) and ends the VMM when it does. A paused
    /// VM, or one whose machine has no way to ask, is stopped at once.
    Stop,
    /// Ends the vCPUs and the VMM at once without asking the guest, in any state. The
    /// request body is `{"action": "stop", "force": true}`.
    #[serde(skip)]
    ForceStop,
    /// Types Ctrl-Alt-Del for the guest and nothing more: the guest decides whether it
    /// powers off, reboots or ignores it.
    Shutdown,
    /// Rebuilds the VM from its definition and boots it again in the same VMM process.
    Reset,
}

impl VmAction {
    /// Returns the body of `PUT /vm/actions` that requests this action.
    pub fn request_body(self) -> serde_json::Value {
        match self {
            VmAction::ForceStop => serde_json::json!({"action": "stop", "force": true}),
            action => serde_json::json!({ "action": action }),
        }
    }
}

impl fmt::Display for VmAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmAction::Pause => "pause",
            VmAction::Resume => "resume",
            VmAction::Stop => "stop",
            VmAction::ForceStop => "force-stop",
            VmAction::Shutdown => "shutdown",
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

/// An action that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The VM's current state does not allow the action.
    #[error("cannot {action} VM {name}: it is {state}")]
    InvalidState {
        name: String,
        action: VmAction,
        state: VmState,
    },
    /// The machine has no way to ask the guest to shut down.
    #[error("cannot shut down VM {name} gracefully: its machine has no keyboard controller to type Ctrl-Alt-Del; stop it instead")]
    NoShutdownRequest { name: String },
    /// Some vCPUs did not park in time. The VM stays paused and the rest park at their
    /// next exit.
    #[error("VM {name} did not finish pausing: {parked} of {vcpus} vCPUs parked within {timeout_secs} s; resume it, or stop it with force")]
    PauseTimedOut {
        name: String,
        parked: usize,
        vcpus: usize,
        timeout_secs: u64,
    },
}

/// Control of one running VM, implemented by the VMM process and by test doubles.
pub trait VmHandle: Send + Sync {
    /// Returns the VM's identity, state and size.
    fn info(&self) -> VmInfo;

    /// Pauses, resumes, stops, shuts down or resets the VM.
    ///
    /// Stopping a VM that is already stopping succeeds, so that retries are harmless, and a
    /// forced stop succeeds in every state. Every other action that the state does not
    /// allow returns an [`ActionError`].
    fn action(&self, action: VmAction) -> Result<(), ActionError>;

    /// Returns the VM's counters.
    fn metrics(&self) -> VmMetrics;

    /// Returns the recent serial output and a receiver of the bytes that follow it.
    fn subscribe_serial(&self) -> SerialSubscription;

    /// Sends host bytes to the guest's serial input.
    fn send_serial(&self, bytes: &[u8]);
}
