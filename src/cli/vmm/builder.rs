//! Building a VM from its definition: the one function through which the VMM process
//! gets a runnable VM.

use crate::api::control::{PowerButton, SerialInput, StatsReader};
use crate::api::SerialSink;
use crate::core::memory::MemoryError;
use crate::core::vm::Vm;
use crate::hypervisor::HypervisorError;
use crate::utils::config::VmConfig;

/// A VM ready to run, with the hooks that the API needs while it runs.
pub struct BuiltVm {
    pub vm: Vm,
    /// Backend name that `GET /vm` reports, normally `vm.backend().kind()`.
    pub backend: String,
    /// Delivers console input to the guest's serial port.
    pub serial_input: SerialInput,
    /// Reads the vCPUs' exit counters while they run; `None` if the backend cannot.
    pub stats: Option<StatsReader>,
    /// Presses the guest's power button (an ACPI power-button event); `None` if the
    /// machine has none, and then an API stop ends the vCPUs at once.
    pub power_button: Option<PowerButton>,
}

/// Errors raised while building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "VM {name} cannot boot: this build of monstervm has no boot path yet (backend, devices and guest loader)"
    )]
    BootPathMissing { name: String },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
}

/// Builds the VM that `config` describes, with `serial_out` as its serial port's output.
///
/// The VMM calls this once per boot: at start and again after each API reset.
pub fn build_vm(config: &VmConfig, serial_out: SerialSink) -> Result<BuiltVm, BuildError> {
    // TODO: choose the backend, map guest memory, put the 16550 (writing to `serial_out`)
    // and the other devices on the buses and load the guest, as `monstervm run` will.
    let _ = serial_out;
    Err(BuildError::BootPathMissing {
        name: config.name.clone(),
    })
}
