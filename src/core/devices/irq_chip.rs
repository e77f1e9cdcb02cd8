//! The interrupt controllers of the emulator backend wired together as on a PC: the 8259
//! pair, the IOAPIC and the local APIC of the one CPU, behind [`IrqChip`].
//!
//! Line numbers given to [`IrqChip::set_irq`] are ISA IRQs for 0-15 and IOAPIC pins for
//! 16-23. ISA lines reach both the PIC and the IOAPIC. One exception follows the usual PC
//! wiring: ISA IRQ 0 (the PIT) drives IOAPIC pin 2 ([`PIT_IOAPIC_PIN`]), so the MADT must
//! carry an interrupt source override from ISA IRQ 0 to GSI 2. Line 2 is the PIC cascade
//! and cannot be raised.
//!
//! IOAPIC messages go to the LAPIC, and the LAPIC's EOI broadcasts for level-triggered
//! vectors go back to the IOAPIC. The PIC's output reaches the CPU while the LAPIC is
//! disabled (in IA32_APIC_BASE or in the SVR) or while LINT0 is unmasked in ExtINT mode.
//! An ExtINT interrupt bypasses the LAPIC's priorities, so the PIC wins when both ask.
//!
//! PCI devices reach the LAPIC directly with message-signalled interrupts
//! ([`IrqChip::signal_msi`]).
//!
//! The emulated CPU polls [`EmulatedIrqChip::interrupt_pending`] between instructions and
//! calls [`EmulatedIrqChip::acknowledge`] to take a vector. The guest reaches the
//! controllers' registers through the bus devices from [`EmulatedIrqChip::bus_devices`].
//!
//! ```
//! use std::sync::Arc;
//!
//! use monstervm::core::devices::irq_chip::EmulatedIrqChip;
//! use monstervm::core::devices::{Bus, HostClock, WindowedDevice};
//! use monstervm::hypervisor::IrqChip;
//!
//! let chip = Arc::new(EmulatedIrqChip::new(Arc::new(HostClock::new()), 2_000_000_000).unwrap());
//! let (mut pio, mut mmio) = (Bus::new(), Bus::new());
//! for WindowedDevice { windows, device } in chip.bus_devices() {
//!     let bus = if windows[0].range.base > 0xffff { &mut mmio } else { &mut pio };
//!     bus.insert_windows(windows, device).unwrap();
//! }
//!
//! // The guest initializes the master PIC: vector base 0x20, IRQ 1 unmasked.
//! for (port, value) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xfd)] {
//!     pio.write(port, &[value]);
//! }
//! chip.pulse_irq(1).unwrap();
//!
//! // The CPU model, between two instructions with IF set:
//! assert!(chip.interrupt_pending());
//! assert_eq!(chip.acknowledge(), Some(0x21));
//! ```

use std::sync::{Arc, Mutex, MutexGuard};

use super::ioapic::{Ioapic, IOAPIC_PINS, IOAPIC_WINDOWS};
use super::lapic::{DeliveryMode, InterruptMessage, Lapic, LapicError, LAPIC_WINDOWS};
use super::pic::{Pic, CASCADE_LINE, PIC_WINDOWS};
use super::{BusDevice, Clock, WindowedDevice};
use crate::hypervisor::{HypervisorError, IrqChip};

/// IOAPIC pin that ISA IRQ 0 drives.
pub const PIT_IOAPIC_PIN: u32 = 2;
/// Address bits 63:20 of every MSI on x86: the 0xFEExxxxx interrupt window.
const MSI_ADDRESS_WINDOW: u64 = 0xfee;
const MSI_ADDRESS_DESTINATION_SHIFT: u32 = 12;
const MSI_ADDRESS_LOGICAL: u64 = 1 << 2;
const MSI_DATA_DELIVERY_MODE_SHIFT: u32 = 8;
const MSI_DATA_LEVEL_TRIGGERED: u32 = 1 << 15;
/// Number of ISA lines, which also reach the PIC.
const ISA_LINES: u32 = 16;
/// Bound on the message and EOI exchanges between IOAPIC and LAPIC after one event.
/// Each round settles every queued message, so more than two rounds means a loop.
const MAX_SETTLE_ROUNDS: usize = 8;

/// Hook run when an interrupt or NMI becomes pending, to wake a halted vCPU.
pub type WakeHook = Box<dyn Fn() + Send + Sync>;

/// The three controllers under one lock, so that routing reads one consistent state.
struct Controllers {
    pic: Pic,
    ioapic: Ioapic,
    lapic: Lapic,
}

impl Controllers {
    /// Returns true if the PIC's INTR output reaches the CPU.
    fn pic_reaches_cpu(&self) -> bool {
        !self.lapic.hardware_enabled()
            || !self.lapic.software_enabled()
            || self.lapic.lint0_passes_extint()
    }

    fn interrupt_pending(&self) -> bool {
        (self.pic_reaches_cpu() && self.pic.interrupt_pending()) || self.lapic.interrupt_pending()
    }

    /// Moves IOAPIC messages to the LAPIC and LAPIC EOI broadcasts to the IOAPIC until
    /// neither has anything left.
    fn settle(&mut self) {
        for _ in 0..MAX_SETTLE_ROUNDS {
            let messages = self.ioapic.take_messages();
            let eois = self.lapic.take_eoi_broadcasts();
            if messages.is_empty() && eois.is_empty() {
                return;
            }
            for message in &messages {
                self.lapic.accept(message);
            }
            for vector in eois {
                self.ioapic.end_of_interrupt(vector);
            }
        }
        tracing::warn!(
            rounds = MAX_SETTLE_ROUNDS,
            "IOAPIC and LAPIC still exchange messages after the round limit; the rest waits for the next event"
        );
    }
}

/// Controller whose registers a bus device exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Pic,
    Ioapic,
    Lapic,
}

/// The PIC pair, IOAPIC and LAPIC of the emulator backend.
pub struct EmulatedIrqChip {
    controllers: Mutex<Controllers>,
    wake_hook: Mutex<Option<WakeHook>>,
}

impl EmulatedIrqChip {
    /// Creates the controllers in their reset state. The LAPIC (APIC ID 0) reads time from
    /// `clock` and converts TSC deadlines with `tsc_hz`.
    pub fn new(clock: Arc<dyn Clock>, tsc_hz: u64) -> Result<Self, LapicError> {
        Ok(EmulatedIrqChip {
            controllers: Mutex::new(Controllers {
                pic: Pic::new(),
                ioapic: Ioapic::new(),
                lapic: Lapic::new(0, clock, tsc_hz)?,
            }),
            wake_hook: Mutex::new(None),
        })
    }

    /// Registers `hook`, replacing any earlier one, to run after a change that leaves an
    /// interrupt or NMI pending. It runs on the thread that made the change, after the
    /// controllers are unlocked, and may run when the vCPU is not halted.
    pub fn set_wake_hook(&self, hook: WakeHook) {
        *self.wake_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Returns true if the CPU has a maskable interrupt to take.
    pub fn interrupt_pending(&self) -> bool {
        self.lock().interrupt_pending()
    }

    /// Takes the most urgent maskable interrupt and returns its vector, or `None` if none
    /// is pending. The PIC's ExtINT interrupt comes first when it reaches the CPU.
    pub fn acknowledge(&self) -> Option<u8> {
        let mut controllers = self.lock();
        if controllers.pic_reaches_cpu() && controllers.pic.interrupt_pending() {
            return controllers.pic.acknowledge();
        }
        controllers.lapic.acknowledge()
    }

    /// Returns true while an edge raised on line `gsi` still waits for the CPU: latched in
    /// an unmasked PIC IRR bit that reaches the CPU, or in the LAPIC's IRR through an
    /// unmasked IOAPIC pin. A timer source can hold back the next tick until this is false,
    /// so that ticks missed while the guest ran with interrupts off are delivered one by
    /// one rather than merged, as KVM's PIT does by reinjecting them.
    pub fn line_pending(&self, gsi: u32) -> bool {
        let controllers = self.lock();
        let pic =
            gsi < ISA_LINES && controllers.pic_reaches_cpu() && controllers.pic.is_requested(gsi);
        let pin = if gsi == 0 { PIT_IOAPIC_PIN } else { gsi };
        let apic = controllers
            .ioapic
            .unmasked_vector(pin)
            .is_some_and(|vector| controllers.lapic.is_requested(vector));
        pic || apic
    }

    /// Takes a pending NMI.
    pub fn take_nmi(&self) -> bool {
        self.lock().lapic.take_nmi()
    }

    /// Returns the monotonic time of the next LAPIC timer expiration, as
    /// [`Lapic::next_deadline`] does.
    pub fn next_deadline(&self, now_ns: u64) -> Option<u64> {
        self.lock().lapic.next_deadline(now_ns)
    }

    /// Fires the LAPIC timer if it is due at `now_ns`. Returns true if it expired.
    pub fn advance(&self, now_ns: u64) -> bool {
        let expired = self.lock().lapic.advance(now_ns);
        self.wake_if_pending();
        expired
    }

    /// Runs `f` on the LAPIC, for the CPU's accesses that bypass MMIO: the
    /// IA32_APIC_BASE and IA32_TSC_DEADLINE MSRs and CR8.
    pub fn with_lapic<R>(&self, f: impl FnOnce(&mut Lapic) -> R) -> R {
        let result = {
            let mut controllers = self.lock();
            let result = f(&mut controllers.lapic);
            controllers.settle();
            result
        };
        self.wake_if_pending();
        result
    }

    /// Returns the bus devices of the PIC pair (with the ELCR), the IOAPIC and the LAPIC,
    /// each with the windows to register through [`super::Bus::insert_windows`]. They
    /// share this chip's state.
    pub fn bus_devices(self: &Arc<Self>) -> Vec<WindowedDevice> {
        let device = |target| -> Arc<Mutex<dyn BusDevice>> {
            Arc::new(Mutex::new(ControllerRegisters {
                chip: self.clone(),
                target,
            }))
        };
        vec![
            WindowedDevice {
                windows: &PIC_WINDOWS,
                device: device(Target::Pic),
            },
            WindowedDevice {
                windows: &IOAPIC_WINDOWS,
                device: device(Target::Ioapic),
            },
            WindowedDevice {
                windows: &LAPIC_WINDOWS,
                device: device(Target::Lapic),
            },
        ]
    }

    fn lock(&self) -> MutexGuard<'_, Controllers> {
        // The controllers hold plain registers, so a panic elsewhere leaves them usable.
        self.controllers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_if_pending(&self) {
        let pending = {
            let controllers = self.lock();
            controllers.interrupt_pending() || controllers.lapic.nmi_pending()
        };
        if !pending {
            return;
        }
        let hook = self.wake_hook.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hook) = hook.as_ref() {
            hook();
        }
    }
}

impl IrqChip for EmulatedIrqChip {
    fn set_irq(&self, gsi: u32, level: bool) -> Result<(), HypervisorError> {
        if gsi == CASCADE_LINE {
            return Err(HypervisorError::Unsupported {
                what: "raising line 2, which is the PIC cascade (the PIT is ISA IRQ 0)".into(),
            });
        }
        if gsi >= IOAPIC_PINS {
            return Err(HypervisorError::InvalidIrq {
                gsi,
                max: IOAPIC_PINS - 1,
            });
        }

        {
            let mut controllers = self.lock();
            let pin = if gsi == 0 { PIT_IOAPIC_PIN } else { gsi };
            if gsi < ISA_LINES {
                // The range checks above leave only valid PIC lines.
                let _ = controllers.pic.set_irq(gsi, level);
            }
            let _ = controllers.ioapic.set_irq(pin, level);
            controllers.settle();
        }
        self.wake_if_pending();
        Ok(())
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<(), HypervisorError> {
        if address >> 20 != MSI_ADDRESS_WINDOW {
            return Err(HypervisorError::Unsupported {
                what: format!(
                    "an MSI to address {address:#x}: x86 MSIs go to 0xfee00000-0xfeefffff"
                ),
            });
        }
        let message = InterruptMessage {
            vector: data as u8,
            delivery_mode: DeliveryMode::from_bits(data >> MSI_DATA_DELIVERY_MODE_SHIFT),
            logical_destination: address & MSI_ADDRESS_LOGICAL != 0,
            destination: (address >> MSI_ADDRESS_DESTINATION_SHIFT) as u8,
            level_triggered: data & MSI_DATA_LEVEL_TRIGGERED != 0,
        };
        self.lock().lapic.accept(&message);
        self.wake_if_pending();
        Ok(())
    }
}

/// The register window of one controller on a bus.
struct ControllerRegisters {
    chip: Arc<EmulatedIrqChip>,
    target: Target,
}

impl BusDevice for ControllerRegisters {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut controllers = self.chip.lock();
        match self.target {
            Target::Pic => controllers.pic.read(offset, data),
            Target::Ioapic => controllers.ioapic.read(offset, data),
            Target::Lapic => controllers.lapic.read(offset, data),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        {
            let mut controllers = self.chip.lock();
            match self.target {
                Target::Pic => controllers.pic.write(offset, data),
                Target::Ioapic => controllers.ioapic.write(offset, data),
                Target::Lapic => controllers.lapic.write(offset, data),
            }
            controllers.settle();
        }
        self.chip.wake_if_pending();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::core::devices::test_utils::ManualClock;
    use crate::core::devices::Bus;
    use crate::core::memory::{IOAPIC_BASE, LAPIC_BASE};

    /// A chip with its registers on a port bus and an MMIO bus, as a VM wires it.
    struct Machine {
        chip: Arc<EmulatedIrqChip>,
        ports: Bus,
        mmio: Bus,
        clock: Arc<ManualClock>,
    }

    fn machine() -> Machine {
        let clock = Arc::new(ManualClock::default());
        let chip = Arc::new(EmulatedIrqChip::new(clock.clone(), 1_000_000_000).unwrap());
        let mut ports = Bus::new();
        let mut mmio = Bus::new();
        for WindowedDevice { windows, device } in chip.bus_devices() {
            let bus = if windows[0].range.base > 0xffff {
                &mut mmio
            } else {
                &mut ports
            };
            bus.insert_windows(windows, device).unwrap();
        }
        Machine {
            chip,
            ports,
            mmio,
            clock,
        }
    }

    impl Machine {
        fn outb(&self, port: u64, value: u8) {
            assert!(self.ports.write(port, &[value]), "port {port:#x}");
        }

        fn write32(&self, address: u64, value: u32) {
            assert!(
                self.mmio.write(address, &value.to_le_bytes()),
                "{address:#x}"
            );
        }

        fn read32(&self, address: u64) -> u32 {
            let mut data = [0u8; 4];
            assert!(self.mmio.read(address, &mut data), "{address:#x}");
            u32::from_le_bytes(data)
        }

        /// Programs the PIC pair as Linux does, with vector bases 0x30 and 0x38.
        fn init_pic(&self, mask_master: u8, mask_slave: u8) {
            for (command, base, cascade, mask) in [
                (0x20, 0x30, 0x04, mask_master),
                (0xa0, 0x38, 0x02, mask_slave),
            ] {
                self.outb(command, 0x11);
                self.outb(command + 1, base);
                self.outb(command + 1, cascade);
                self.outb(command + 1, 0x01);
                self.outb(command + 1, mask);
            }
        }

        fn enable_lapic(&self) {
            self.write32(LAPIC_BASE + 0xf0, 0x1ff);
        }

        fn program_ioapic(&self, pin: u32, entry: u64) {
            let register = 0x10 + 2 * pin;
            self.write32(IOAPIC_BASE, register + 1);
            self.write32(IOAPIC_BASE + 0x10, (entry >> 32) as u32);
            self.write32(IOAPIC_BASE, register);
            self.write32(IOAPIC_BASE + 0x10, entry as u32);
        }
    }

    #[test]
    fn pic_delivers_while_lapic_disabled() {
        let m = machine();
        m.init_pic(0x00, 0x00);

        m.chip.pulse_irq(4).unwrap();

        assert!(m.chip.interrupt_pending());
        assert_eq!(m.chip.acknowledge(), Some(0x34));
        assert!(!m.chip.interrupt_pending());
    }

    #[test]
    fn ioapic_delivers_through_lapic() {
        let m = machine();
        m.init_pic(0xff, 0xff);
        m.enable_lapic();
        m.program_ioapic(4, 0x41);

        m.chip.pulse_irq(4).unwrap();

        assert_eq!(m.chip.acknowledge(), Some(0x41));
        m.write32(LAPIC_BASE + 0xb0, 0);
        assert!(!m.chip.interrupt_pending());
    }

    #[test]
    fn enabled_lapic_blocks_pic_output() {
        let m = machine();
        m.init_pic(0x00, 0x00);
        m.enable_lapic();

        m.chip.pulse_irq(1).unwrap();

        assert!(!m.chip.interrupt_pending());
    }

    #[test]
    fn lint0_extint_passes_pic_output() {
        let m = machine();
        m.init_pic(0x00, 0x00);
        m.enable_lapic();
        m.write32(LAPIC_BASE + 0x350, 0x700);

        m.chip.pulse_irq(1).unwrap();

        assert_eq!(m.chip.acknowledge(), Some(0x31));
    }

    #[test]
    fn isa_irq0_uses_ioapic_pin2() {
        let m = machine();
        m.init_pic(0xff, 0xff);
        m.enable_lapic();
        m.program_ioapic(0, 0x50);
        m.program_ioapic(2, 0x52);

        m.chip.pulse_irq(0).unwrap();

        assert_eq!(m.chip.acknowledge(), Some(0x52));
        assert_eq!(m.chip.acknowledge(), None);
    }

    #[test]
    fn level_pci_interrupt_redelivers_after_eoi() {
        let m = machine();
        m.enable_lapic();
        m.program_ioapic(16, (1 << 15) | 0x60);
        m.chip.set_irq(16, true).unwrap();

        assert_eq!(m.chip.acknowledge(), Some(0x60));
        m.write32(LAPIC_BASE + 0xb0, 0);
        assert_eq!(m.chip.acknowledge(), Some(0x60), "still asserted");
        m.chip.set_irq(16, false).unwrap();
        m.write32(LAPIC_BASE + 0xb0, 0);

        assert!(!m.chip.interrupt_pending());
    }

    #[test]
    fn line_pending_until_acknowledged() {
        let m = machine();
        m.init_pic(0x00, 0x00);
        m.chip.pulse_irq(0).unwrap();
        assert!(m.chip.line_pending(0), "latched in the PIC");
        assert_eq!(m.chip.acknowledge(), Some(0x30));
        assert!(!m.chip.line_pending(0));

        m.init_pic(0xff, 0xff);
        m.enable_lapic();
        m.program_ioapic(2, 0x40);
        m.chip.pulse_irq(0).unwrap();
        assert!(m.chip.line_pending(0), "latched in the LAPIC through pin 2");
        assert_eq!(m.chip.acknowledge(), Some(0x40));

        assert!(!m.chip.line_pending(0));
        assert!(!m.chip.line_pending(99));
    }

    #[test]
    fn ioapic_nmi_reaches_cpu() {
        let m = machine();
        m.enable_lapic();
        m.program_ioapic(5, 0x400);

        m.chip.pulse_irq(5).unwrap();

        assert!(m.chip.take_nmi());
        assert!(!m.chip.interrupt_pending());
    }

    #[test]
    fn lapic_timer_through_chip() {
        let m = machine();
        m.enable_lapic();
        let start = m.clock.monotonic_ns();
        m.write32(LAPIC_BASE + 0x3e0, 0b1011);
        m.write32(LAPIC_BASE + 0x320, 0xec);
        m.write32(LAPIC_BASE + 0x380, 500);

        assert_eq!(m.chip.next_deadline(start), Some(start + 500));
        assert!(m.chip.advance(start + 500));

        assert_eq!(m.chip.acknowledge(), Some(0xec));
        assert_eq!(
            m.read32(LAPIC_BASE + 0x100 + 0x70),
            1 << 12,
            "ISR bit of 0xec"
        );
    }

    #[test]
    fn wake_hook_runs_when_pending() {
        let m = machine();
        m.init_pic(0x00, 0x00);
        let wakes = Arc::new(AtomicUsize::new(0));
        let counter = wakes.clone();
        m.chip.set_wake_hook(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));

        m.outb(0x21, 0xff);
        m.chip.pulse_irq(3).unwrap();
        assert_eq!(wakes.load(Ordering::SeqCst), 0, "masked");
        m.outb(0x21, 0x00);

        assert_eq!(wakes.load(Ordering::SeqCst), 1, "unmasking woke the CPU");
    }

    #[test]
    fn apic_base_msr_through_chip() {
        let m = machine();
        m.init_pic(0x00, 0x00);
        m.enable_lapic();

        m.chip
            .with_lapic(|lapic| lapic.set_apic_base(0xfee0_0100))
            .unwrap();
        m.chip.pulse_irq(6).unwrap();

        assert_eq!(
            m.chip.acknowledge(),
            Some(0x36),
            "a disabled APIC passes the PIC"
        );
    }

    #[test]
    fn msi_reaches_lapic() {
        let m = machine();
        m.enable_lapic();

        m.chip.signal_msi(0xfee0_0000, 0x0045).unwrap();
        assert_eq!(m.chip.acknowledge(), Some(0x45));
        m.chip.signal_msi(0xfee0_1000, 0x0046).unwrap();
        assert!(!m.chip.interrupt_pending(), "APIC ID 1 is not this CPU");
        m.chip.signal_msi(0xfee0_0000, 0x0400).unwrap();

        assert!(m.chip.take_nmi());
    }

    #[test]
    fn msi_outside_window_is_rejected() {
        let m = machine();
        m.enable_lapic();

        let result = m.chip.signal_msi(0xfec0_0000, 0x0045);

        assert!(matches!(result, Err(HypervisorError::Unsupported { .. })));
        assert!(m.chip.signal_msi(0x1_fee0_0000, 0x45).is_err());
        assert!(!m.chip.interrupt_pending());
    }

    #[test]
    fn invalid_lines_are_rejected() {
        let m = machine();

        assert!(matches!(
            m.chip.set_irq(2, true),
            Err(HypervisorError::Unsupported { .. })
        ));
        assert!(matches!(
            m.chip.set_irq(24, true),
            Err(HypervisorError::InvalidIrq { gsi: 24, max: 23 })
        ));
        assert!(!m.chip.interrupt_pending());
    }
}
