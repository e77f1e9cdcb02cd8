//! The emulator backend: MonsterVM's own x86-64 CPU (`core::cpu`) behind the same traits
//! as KVM, with the platform's interrupt controllers and PIT emulated in user space.
//!
//! A vCPU runs the CPU in slices of [`SLICE_INSTRUCTIONS`]. Between slices it fires the PIT
//! and LAPIC timers that are due and checks for kicks. When the guest halts with
//! interrupts enabled, the vCPU thread sleeps until the next timer deadline or until a
//! device raises an interrupt; a halt with interrupts disabled ends `run` with
//! `VcpuExit::Halted`, because nothing can wake the CPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vm_memory::GuestMemoryMmap;

use super::{
    BackendKind, CpuState, HypervisorError, HypervisorVm, IoHandler, IrqChip, PlatformDevices,
    SharedVcpuStats, Vcpu, VcpuExit, VcpuKicker,
};
use crate::core::cpu::{CodeWatch, Cpu, CpuBus, CpuConfig, CpuEvent};
use crate::core::devices::irq_chip::EmulatedIrqChip;
use crate::core::devices::lapic::ns_to_tsc;
use crate::core::devices::pit::{Pit, PIT_IRQ, PIT_WINDOWS};
use crate::core::devices::{Clock, HostClock, WindowedDevice};

/// Instructions run between two checks of timers and kicks. At tens of millions of
/// instructions per second this bounds timer and kick latency to well under a millisecond.
pub const SLICE_INSTRUCTIONS: u64 = 20_000;
/// Frequency of the emulated TSC and of the LAPIC timer, in Hz.
pub const TSC_HZ: u64 = 1_000_000_000;
/// Maximum sleep of a halted vCPU without a timer deadline, so that a lost wake-up costs
/// at most this much latency.
const MAX_HALT_SLEEP: Duration = Duration::from_millis(50);

/// Wakes a halted vCPU thread: set by interrupt sources and kicks, cleared by the vCPU.
#[derive(Default)]
struct Waker {
    woken: Mutex<bool>,
    condvar: Condvar,
}

impl Waker {
    fn wake(&self) {
        *self.woken.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.condvar.notify_all();
    }

    /// Sleeps until woken or for `timeout`, whichever comes first.
    fn sleep(&self, timeout: Duration) {
        let mut woken = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        if !*woken {
            woken = self
                .condvar
                .wait_timeout(woken, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *woken = false;
    }
}

/// State shared by the VM and its vCPU: clocks, controllers, PIT and code stamps.
struct Platform {
    memory: GuestMemoryMmap,
    clock: Arc<HostClock>,
    irq_chip: Arc<EmulatedIrqChip>,
    pit: Arc<Mutex<Pit>>,
    code_watch: Arc<CodeWatch>,
    waker: Arc<Waker>,
    /// Set whenever a controller may have an interrupt for the CPU; lets the CPU skip
    /// locking the controllers at every instruction boundary.
    interrupt_hint: Arc<AtomicBool>,
}

/// A VM on the emulator backend.
pub struct EmulatorVm {
    platform: Arc<Platform>,
    vcpu_created: AtomicBool,
}

impl EmulatorVm {
    /// Creates the platform for `memory`: interrupt controllers, PIT and code stamps.
    pub fn new(memory: &GuestMemoryMmap) -> Result<Self, HypervisorError> {
        let clock = Arc::new(HostClock::new());
        let irq_chip = Arc::new(EmulatedIrqChip::new(clock.clone(), TSC_HZ).map_err(|e| {
            HypervisorError::Unsupported {
                what: format!("the emulated local APIC: {e}"),
            }
        })?);
        let waker = Arc::new(Waker::default());
        let interrupt_hint = Arc::new(AtomicBool::new(true));
        {
            let waker = waker.clone();
            let hint = interrupt_hint.clone();
            irq_chip.set_wake_hook(Box::new(move || {
                hint.store(true, Ordering::Release);
                waker.wake();
            }));
        }
        let pit = Arc::new(Mutex::new(Pit::new(clock.clone())));

        Ok(EmulatorVm {
            platform: Arc::new(Platform {
                memory: memory.clone(),
                clock,
                irq_chip,
                pit,
                code_watch: Arc::new(CodeWatch::new(memory)),
                waker,
                interrupt_hint,
            }),
            vcpu_created: AtomicBool::new(false),
        })
    }

    /// Returns the code stamps that DMA-capable devices must notify of their writes.
    pub fn code_watch(&self) -> Arc<CodeWatch> {
        self.platform.code_watch.clone()
    }
}

impl HypervisorVm for EmulatorVm {
    fn kind(&self) -> BackendKind {
        BackendKind::Emulator
    }

    fn irq_chip(&self) -> Arc<dyn IrqChip> {
        self.platform.irq_chip.clone()
    }

    fn platform_devices(&self) -> PlatformDevices {
        let mut devices = PlatformDevices::default();
        devices.pio.push(WindowedDevice {
            windows: &PIT_WINDOWS,
            device: self.platform.pit.clone(),
        });
        for device in self.platform.irq_chip.bus_devices() {
            // Port windows lie in the 64 KiB I/O space; the rest are MMIO.
            if device.windows.iter().all(|w| w.range.base <= 0xffff) {
                devices.pio.push(device);
            } else {
                devices.mmio.push(device);
            }
        }
        devices
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>, HypervisorError> {
        // NOTE: the emulated platform has one local APIC, so it runs one vCPU.
        if id != 0 || self.vcpu_created.swap(true, Ordering::SeqCst) {
            return Err(HypervisorError::Unsupported {
                what: format!("vCPU {id}: the emulator backend runs one vCPU; use --vcpus 1"),
            });
        }
        let config = CpuConfig {
            apic_id: 0,
            apic: true,
            tsc_hz: TSC_HZ,
        };
        let cpu = Cpu::new(config, self.platform.code_watch.clone());
        Ok(Box::new(EmulatorVcpu {
            id,
            cpu,
            platform: self.platform.clone(),
            kicker: Arc::new(EmulatorKicker {
                kicked: AtomicBool::new(false),
                waker: self.platform.waker.clone(),
            }),
            stats: Arc::default(),
        }))
    }
}

struct EmulatorKicker {
    kicked: AtomicBool,
    waker: Arc<Waker>,
}

impl VcpuKicker for EmulatorKicker {
    fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// One emulated vCPU.
pub struct EmulatorVcpu {
    id: u32,
    cpu: Cpu,
    platform: Arc<Platform>,
    kicker: Arc<EmulatorKicker>,
    stats: Arc<SharedVcpuStats>,
}

impl EmulatorVcpu {
    /// Fires the PIT and LAPIC timers that are due and returns the earliest next deadline.
    fn fire_timers(&self) -> Option<u64> {
        let platform = &self.platform;
        let now = platform.clock.monotonic_ns();
        let (pit_edges, pit_next) = {
            let mut pit = platform.pit.lock().unwrap_or_else(|e| e.into_inner());
            let edges = pit.advance(now);
            (edges, pit.next_deadline(now))
        };
        if pit_edges > 0 {
            if let Err(e) = platform.irq_chip.pulse_irq(PIT_IRQ) {
                tracing::warn!(vcpu = self.id, error = %e, "failed to raise the PIT interrupt");
            }
        }
        platform.irq_chip.advance(now);
        let lapic_next = platform.irq_chip.next_deadline(now);
        match (pit_next, lapic_next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Vcpu for EmulatorVcpu {
    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit, HypervisorError> {
        loop {
            if self.kicker.kicked.swap(false, Ordering::AcqRel) {
                return Ok(VcpuExit::Kicked);
            }
            let next_deadline = self.fire_timers();

            let mut bus = EmulatorBus {
                platform: &self.platform,
                io,
                stats: &self.stats,
            };
            let event = self.cpu.run(&mut bus, SLICE_INSTRUCTIONS);
            self.stats.set_instructions(self.cpu.instructions());
            let event = event.map_err(|e| HypervisorError::VcpuFailed {
                id: self.id,
                reason: e.to_string(),
                state: Box::new(self.cpu.state()),
            })?;

            match event {
                CpuEvent::BudgetExhausted => {}
                CpuEvent::Shutdown => return Ok(VcpuExit::Shutdown),
                CpuEvent::Halted => {
                    self.stats.count_halt_exit();
                    if self.cpu.rflags() & (1 << 9) == 0 {
                        // NOTE: NMIs, which could still wake the CPU, are not delivered by
                        // the emulator yet.
                        return Ok(VcpuExit::Halted);
                    }
                    let now = self.platform.clock.monotonic_ns();
                    let sleep = next_deadline
                        .map(|deadline| Duration::from_nanos(deadline.saturating_sub(now)))
                        .unwrap_or(MAX_HALT_SLEEP)
                        .min(MAX_HALT_SLEEP);
                    if !sleep.is_zero() && !self.platform.irq_chip.interrupt_pending() {
                        self.platform.waker.sleep(sleep);
                    }
                }
            }
        }
    }

    fn state(&self) -> Result<CpuState, HypervisorError> {
        Ok(self.cpu.state())
    }

    fn set_state(&mut self, state: &CpuState) -> Result<(), HypervisorError> {
        self.cpu.set_state(state);
        Ok(())
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn shared_stats(&self) -> Arc<SharedVcpuStats> {
        self.stats.clone()
    }
}

/// The CPU's view of the platform during one slice.
struct EmulatorBus<'a> {
    platform: &'a Platform,
    io: &'a dyn IoHandler,
    stats: &'a SharedVcpuStats,
}

impl CpuBus for EmulatorBus<'_> {
    fn memory(&self) -> &GuestMemoryMmap {
        &self.platform.memory
    }

    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.stats.count_pio_exit();
        self.io.pio_read(port, data);
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.stats.count_pio_exit();
        self.io.pio_write(port, data);
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.stats.count_mmio_exit();
        self.io.mmio_read(addr, data);
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.stats.count_mmio_exit();
        self.io.mmio_write(addr, data);
    }

    fn tsc(&mut self) -> u64 {
        ns_to_tsc(self.platform.clock.monotonic_ns(), TSC_HZ)
    }

    fn interrupt_pending(&self) -> bool {
        // This runs at every instruction boundary with IF set, so the common case is one
        // plain load. Clear the hint before looking, so that an interrupt raised during the
        // look sets it again and is seen at the next boundary.
        if !self.platform.interrupt_hint.load(Ordering::Relaxed)
            || !self.platform.interrupt_hint.swap(false, Ordering::AcqRel)
        {
            return false;
        }
        let pending = self.platform.irq_chip.interrupt_pending();
        if pending {
            self.platform.interrupt_hint.store(true, Ordering::Release);
        }
        pending
    }

    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        let vector = self.platform.irq_chip.acknowledge();
        // Another interrupt may be waiting behind this one.
        self.platform.interrupt_hint.store(true, Ordering::Release);
        vector
    }
}
