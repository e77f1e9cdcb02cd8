//! Building a VM from its definition: the one function through which the VMM process
//! gets a runnable VM.

use crate::api::control::{PowerButton, SerialInput, StatsReader};
use crate::api::SerialSink;
use crate::core::vm::console::ConsoleInput;
use crate::core::vm::Vm;
use crate::utils::config::VmConfig;
use std::sync::Arc;

/// A VM ready to run, with the hooks that the API needs while it runs.
pub struct BuiltVm {
    pub vm: Vm,
    /// Backend name that `GET /vm` reports, normally `vm.backend().kind()`.
    pub backend: String,
    /// Delivers console input to the guest's serial port.
    pub serial_input: SerialInput,
    /// Reads the vCPUs' exit counters while they run; `None` if the backend cannot.
    pub stats: Option<StatsReader>,
    /// Asks the guest to shut down: types Ctrl-Alt-Del on its i8042 keyboard. `None` if the
    /// machine has no such path, and then an API stop ends the vCPUs at once.
    pub power_button: Option<PowerButton>,
}

pub use crate::core::vm::builder::BuildError;

/// Builds the VM that `config` describes, with `serial_out` as its serial port's output.
///
/// The VMM calls this once per boot: at start and again after each API reset.
pub fn build_vm(config: &VmConfig, serial_out: SerialSink) -> Result<BuiltVm, BuildError> {
    let built = crate::core::vm::builder::build_vm(config, Box::new(serial_out))?;
    let input = ConsoleInput::new(built.serial);
    let control = built.vm.control().clone();
    let vcpu_stats = built.vm.shared_vcpu_stats();
    let keyboard = built.keyboard;
    let power_button: PowerButton = Arc::new(move || {
        keyboard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send_ctrl_alt_del();
    });
    let stats: StatsReader = Arc::new(move || vcpu_stats.iter().map(|s| s.snapshot()).collect());
    let serial_input: SerialInput = Arc::new(move |bytes: &[u8]| {
        input.send(bytes, &|| control.stop_reason().is_some());
    });
    Ok(BuiltVm {
        backend: built.backend.kind.to_string(),
        vm: built.vm,
        serial_input,
        stats: Some(stats),
        power_button: Some(power_button),
    })
}
