//! TEST DOUBLE: a VM whose vCPUs run no guest code, for the lifecycle tests.
//!
//! Most lifecycle tests set [`TEST_DOUBLE_ENV`], and the VMM then builds this VM instead of
//! calling [`build_vm`](super::builder::build_vm). A real guest would make them depend on
//! its boot time, and the real machine has no power button yet. Everything else is real:
//! the `Vm` run loop, its `VmControl` pause and stop handling, the serial fan-out, the API
//! and the process model. One test in `tests/api.rs` boots the embedded guest instead.
//!
//! Each vCPU blocks in `run` until it is kicked, like a guest idling in HLT with interrupts
//! enabled. The serial port prints a banner at boot and echoes its input, as a guest shell
//! with terminal echo does. Each echoed byte counts as one port-I/O exit. Its power button
//! makes it print a line and power off, unless the kernel command line contains
//! [`IGNORE_POWER_BUTTON`], which lets tests check that `stop` kills such a guest.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::builder::{BuildError, BuiltVm};
use crate::api::SerialSink;
use crate::core::devices::{PlatformControl, PlatformRequest};
use crate::core::memory::create_guest_memory;
use crate::core::vm::{Vm, VmControl, VmIo};
use crate::hypervisor::{
    BackendKind, CpuState, HypervisorError, HypervisorVm, IoHandler, IrqChip, PlatformDevices,
    SharedVcpuStats, Vcpu, VcpuExit, VcpuKicker, VcpuStats,
};
use crate::utils::config::VmConfig;

/// Set to `1` to make `monstervm vmm` build the test double instead of a real VM.
pub const TEST_DOUBLE_ENV: &str = "MONSTERVM_TEST_DOUBLE_VM";
/// Kernel command-line word that makes the test double ignore its power button.
pub const IGNORE_POWER_BUTTON: &str = "ignore-power-button";

/// Returns true when [`TEST_DOUBLE_ENV`] is set to `1`.
pub fn requested() -> bool {
    std::env::var_os(TEST_DOUBLE_ENV).is_some_and(|value| value == "1")
}

struct NoIrqChip;

impl IrqChip for NoIrqChip {
    fn set_irq(&self, _gsi: u32, _level: bool) -> Result<(), HypervisorError> {
        Ok(())
    }
}

struct IdleBackend;

impl HypervisorVm for IdleBackend {
    fn kind(&self) -> BackendKind {
        // BackendKind has no test variant; BuiltVm::backend reports "test-double" instead.
        BackendKind::Emulator
    }

    fn irq_chip(&self) -> Arc<dyn IrqChip> {
        Arc::new(NoIrqChip)
    }

    fn platform_devices(&self) -> PlatformDevices {
        PlatformDevices::default()
    }

    fn create_vcpu(&self, _id: u32) -> Result<Box<dyn Vcpu>, HypervisorError> {
        Ok(Box::new(IdleVcpu {
            kicker: Arc::new(IdleKicker::default()),
            stats: Arc::default(),
        }))
    }
}

#[derive(Default)]
struct IdleKicker {
    kicked: Mutex<bool>,
    wake: Condvar,
}

impl VcpuKicker for IdleKicker {
    fn kick(&self) {
        *self.kicked.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }
}

struct IdleVcpu {
    kicker: Arc<IdleKicker>,
    /// Stays zero: the test double reports its echo count through its own reader.
    stats: Arc<SharedVcpuStats>,
}

impl Vcpu for IdleVcpu {
    fn run(&mut self, _io: &dyn IoHandler) -> Result<VcpuExit, HypervisorError> {
        let mut kicked = self.kicker.kicked.lock().unwrap_or_else(|e| e.into_inner());
        while !*kicked {
            kicked = self
                .kicker
                .wake
                .wait(kicked)
                .unwrap_or_else(|e| e.into_inner());
        }
        *kicked = false;
        Ok(VcpuExit::Kicked)
    }

    fn state(&self) -> Result<CpuState, HypervisorError> {
        Ok(CpuState::default())
    }

    fn set_state(&mut self, _state: &CpuState) -> Result<(), HypervisorError> {
        Ok(())
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn shared_stats(&self) -> Arc<SharedVcpuStats> {
        self.stats.clone()
    }
}

/// Builds the test-double VM for `config`.
pub fn build(config: &VmConfig, serial_out: SerialSink) -> Result<BuiltVm, BuildError> {
    let memory = create_guest_memory(config.memory_mib)?;
    let backend: Arc<dyn HypervisorVm> = Arc::new(IdleBackend);
    let vcpus = (0..u32::from(config.vcpus))
        .map(|id| backend.create_vcpu(id))
        .collect::<Result<Vec<_>, _>>()?;
    let control = VmControl::new();
    let vm = Vm::from_parts(
        config.name.clone(),
        memory,
        backend,
        Arc::new(VmIo::default()),
        control.clone(),
        vcpus,
    );

    let mut banner = serial_out.clone();
    let _ = write!(
        banner,
        "monstervm test double: VM {} booted\r\n",
        config.name
    );

    let ignores_button = config
        .effective_cmdline()
        .split_whitespace()
        .any(|word| word == IGNORE_POWER_BUTTON);
    let console = serial_out.clone();
    let power_button = Arc::new(move || {
        // SerialSink clones share one hub, so a fresh clone writes to the same console.
        let mut console = console.clone();
        if ignores_button {
            let _ = console.write_all(b"power button pressed; ignoring it\r\n");
            return;
        }
        let _ = console.write_all(b"power button pressed; powering off\r\n");
        control.request(PlatformRequest::PowerOff);
    });

    let pio_exits = Arc::new(AtomicU64::new(0));
    let echo_count = pio_exits.clone();
    let echo = Mutex::new(serial_out);
    let serial_input = Arc::new(move |bytes: &[u8]| {
        echo_count.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let _ = echo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(bytes);
    });
    let vcpu_count = usize::from(config.vcpus);
    let stats = Arc::new(move || {
        let mut all = vec![VcpuStats::default(); vcpu_count];
        all[0].pio_exits = pio_exits.load(Ordering::Relaxed);
        all
    });

    Ok(BuiltVm {
        vm,
        backend: "test-double".to_string(),
        serial_input,
        stats: Some(stats),
        power_button: Some(power_button),
    })
}
