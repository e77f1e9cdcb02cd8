//! One VM: guest memory, buses and devices, vCPUs, and the loop that runs them.

pub mod builder;
pub mod console;
pub mod control;
pub mod disks;
pub mod io;

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

pub use control::{PauseTimeout, StopReason, VmControl};
pub use io::VmIo;

use crate::hypervisor::{CpuState, HypervisorError, HypervisorVm, Vcpu, VcpuExit};

/// Errors that end a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("the guest triple-faulted (the CPU reset itself); vCPU {id} registers:\n{state}")]
    TripleFault { id: u32, state: Box<CpuState> },
    #[error("{count} vCPUs requested, but the {backend} backend runs only {max}: lower --vcpus")]
    TooManyVcpus {
        count: u32,
        max: u32,
        backend: String,
    },
}

/// The way a VM ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine.
    Reset,
    /// The guest halted its only vCPU with interrupts disabled, so it can never resume.
    Halted,
    /// The user or an API client stopped the VM.
    UserStop,
    /// The guest kernel reported a panic through the pvpanic device.
    GuestPanic,
}

/// A VM ready to run: memory loaded, devices on their buses, vCPUs in their boot state.
pub struct Vm {
    name: String,
    memory: GuestMemoryMmap,
    backend: Arc<dyn HypervisorVm>,
    io: Arc<VmIo>,
    control: Arc<VmControl>,
    vcpus: Vec<Box<dyn Vcpu>>,
}

impl Vm {
    /// Assembles a VM from parts built by `core::vm::builder`-style code or by tests.
    ///
    /// Registers every vCPU's kicker with `control`, so stop requests reach them.
    pub fn from_parts(
        name: String,
        memory: GuestMemoryMmap,
        backend: Arc<dyn HypervisorVm>,
        io: Arc<VmIo>,
        control: Arc<VmControl>,
        vcpus: Vec<Box<dyn Vcpu>>,
    ) -> Self {
        for vcpu in &vcpus {
            control.add_kicker(vcpu.kicker());
        }
        Vm {
            name,
            memory,
            backend,
            io,
            control,
            vcpus,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn backend(&self) -> &Arc<dyn HypervisorVm> {
        &self.backend
    }

    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    pub fn io(&self) -> &Arc<VmIo> {
        &self.io
    }

    /// Runs every vCPU until the guest powers off, resets or halts for good, or a stop is
    /// requested. vCPU 0 runs on the calling thread and the others on threads of their own.
    pub fn run(&mut self) -> Result<VmExit, VmError> {
        tracing::info!(vm = %self.name, backend = %self.backend.kind(), vcpus = self.vcpus.len(), "VM starting");
        let result = std::thread::scope(|scope| {
            let (first, rest) = self
                .vcpus
                .split_first_mut()
                .expect("a VM has at least one vCPU");
            let mut others = Vec::new();
            for (index, vcpu) in rest.iter_mut().enumerate() {
                let id = index as u32 + 1;
                let io = &self.io;
                let control = &self.control;
                others.push(scope.spawn(move || {
                    let result = run_vcpu(id, vcpu.as_mut(), io, control);
                    if result.is_err() {
                        // A failed vCPU takes the whole VM down, as on hardware.
                        control.request_stop(StopReason::UserStop);
                    }
                    result
                }));
            }

            let mut result = run_vcpu(0, first.as_mut(), &self.io, &self.control);
            // vCPU 0 ended the VM: stop the others before joining them.
            self.control.request_stop(StopReason::UserStop);
            for handle in others {
                match handle.join() {
                    Ok(Err(e)) if result.is_ok() => result = Err(e),
                    Ok(Err(e)) => {
                        tracing::warn!(vm = %self.name, error = %e, "secondary vCPU also failed")
                    }
                    Ok(Ok(_)) => {}
                    Err(_) => tracing::error!(vm = %self.name, "secondary vCPU thread panicked"),
                }
            }
            result
        });

        match &result {
            Ok(exit) => tracing::info!(vm = %self.name, ?exit, "VM stopped"),
            Err(e) => tracing::error!(vm = %self.name, error = %e, "VM failed"),
        }
        result
    }

    /// Returns every vCPU's counters; safe to call while the VM runs.
    pub fn vcpu_stats(&self) -> Vec<crate::hypervisor::VcpuStats> {
        self.vcpus.iter().map(|vcpu| vcpu.stats()).collect()
    }

    /// Returns every vCPU's counter block, which other threads may read while the VM runs.
    pub fn shared_vcpu_stats(&self) -> Vec<Arc<crate::hypervisor::SharedVcpuStats>> {
        self.vcpus.iter().map(|vcpu| vcpu.shared_stats()).collect()
    }

    /// Returns the architectural state of vCPU `id`.
    pub fn vcpu_state(&self, id: usize) -> Option<Result<CpuState, HypervisorError>> {
        self.vcpus.get(id).map(|vcpu| vcpu.state())
    }
}

/// Runs one vCPU until the VM must stop.
fn run_vcpu(
    id: u32,
    vcpu: &mut dyn Vcpu,
    io: &VmIo,
    control: &VmControl,
) -> Result<VmExit, VmError> {
    loop {
        if let Some(reason) = control.stop_reason() {
            return Ok(exit_for(reason));
        }
        control.wait_while_paused();
        if let Some(reason) = control.stop_reason() {
            return Ok(exit_for(reason));
        }
        match vcpu.run(io)? {
            VcpuExit::Kicked => continue,
            VcpuExit::Halted => {
                // A guest that powered off through a device usually halts right after;
                // the request it made is the reason the VM ends.
                if let Some(reason) = control.stop_reason() {
                    return Ok(exit_for(reason));
                }
                tracing::info!(vcpu = id, "vCPU halted with interrupts disabled");
                control.request_stop(StopReason::UserStop);
                return Ok(VmExit::Halted);
            }
            VcpuExit::Shutdown => {
                let state = vcpu.state()?;
                control.request_stop(StopReason::UserStop);
                return Err(VmError::TripleFault {
                    id,
                    state: Box::new(state),
                });
            }
        }
    }
}

fn exit_for(reason: StopReason) -> VmExit {
    match reason {
        StopReason::PowerOff => VmExit::PowerOff,
        StopReason::Reset => VmExit::Reset,
        StopReason::UserStop => VmExit::UserStop,
        StopReason::GuestPanic => VmExit::GuestPanic,
    }
}
