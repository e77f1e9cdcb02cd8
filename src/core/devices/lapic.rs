//! The local APIC of a single CPU in xAPIC mode (MMIO at 0xFEE00000).
//!
//! The model covers the registers a uniprocessor Linux guest uses. These are ID, version,
//! TPR and PPR, EOI, LDR and DFR, the spurious-interrupt vector register (SVR), ISR, TMR
//! and IRR, and the error status register. The ICR sends interrupts to this CPU itself.
//! The six LVT entries are timer, thermal, performance counter, LINT0, LINT1 and error,
//! and the timer runs in one-shot, periodic or TSC-deadline mode with a divide register.
//!
//! The timer counts at [`LAPIC_TIMER_FREQUENCY_HZ`] divided by the divide configuration.
//! Like the PIT it is not stepped: reads of the current count use the [`Clock`], and the
//! event loop calls [`Lapic::next_deadline`] and [`Lapic::advance`] with the same clock's
//! monotonic time. In TSC-deadline mode the deadline is converted to that time scale with
//! the TSC frequency given at construction, on the assumption that the TSC reads
//! `monotonic_ns * tsc_hz / 10^9`, which [`ns_to_tsc`] computes for the CPU model.
//!
//! The CPU side is [`Lapic::interrupt_pending`] and [`Lapic::acknowledge`]. Register
//! accesses must be 4 bytes wide at 16-byte aligned offsets, as the SDM requires. Other
//! accesses read as all ones and are counted.
//!
//! A write to the divide register while the timer runs keeps the current count and
//! counts the rest at the new rate.

use std::sync::Arc;

use super::{fill_unclaimed, BusDevice, Clock, DeviceWindow, GuestErrorLog};
use crate::core::memory::LAPIC_BASE;

/// Size of the LAPIC's MMIO page.
pub const LAPIC_MMIO_LEN: u64 = 0x1000;
/// The bus window of the LAPIC.
pub const LAPIC_WINDOWS: [DeviceWindow; 1] =
    [DeviceWindow::new("lapic", LAPIC_BASE, LAPIC_MMIO_LEN, 0)];
/// Frequency of the timer before the divide configuration, which the CPU model reports in
/// CPUID (leaf 0x15 or a hypervisor leaf) so that the guest skips calibration.
pub const LAPIC_TIMER_FREQUENCY_HZ: u64 = 1_000_000_000;
/// Value of the version register: version 0x14 (integrated xAPIC), six LVT entries.
pub const LAPIC_VERSION: u32 = 0x0005_0014;

/// IA32_APIC_BASE bit 8: this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE bit 10: x2APIC mode, which this model does not implement.
pub const APIC_BASE_X2APIC: u64 = 1 << 10;
/// IA32_APIC_BASE bit 11: the APIC is globally enabled.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;

const DEVICE: &str = "lapic";
const NANOS_PER_SECOND: u128 = 1_000_000_000;

const REG_ID: u64 = 0x020;
const REG_VERSION: u64 = 0x030;
const REG_TPR: u64 = 0x080;
const REG_APR: u64 = 0x090;
const REG_PPR: u64 = 0x0a0;
const REG_EOI: u64 = 0x0b0;
const REG_RRD: u64 = 0x0c0;
const REG_LDR: u64 = 0x0d0;
const REG_DFR: u64 = 0x0e0;
const REG_SVR: u64 = 0x0f0;
const REG_ISR: u64 = 0x100;
const REG_TMR: u64 = 0x180;
const REG_IRR: u64 = 0x200;
const REG_ESR: u64 = 0x280;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_ERROR: u64 = 0x370;
const REG_TIMER_INITIAL: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3e0;

const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
const LVT_COUNT: usize = 6;
const LVT_MASKED: u32 = 1 << 16;
const LVT_VECTOR: u32 = 0xff;
const LVT_DELIVERY_MODE_SHIFT: u32 = 8;
/// Writable bits of each LVT entry, in register order: the timer has its mode, the
/// thermal and performance entries a delivery mode, LINT0 and LINT1 also polarity and
/// trigger mode, the error entry only vector and mask.
const LVT_WRITABLE: [u32; LVT_COUNT] = [
    0x0007_00ff,
    0x0001_07ff,
    0x0001_07ff,
    0x0001_a7ff,
    0x0001_a7ff,
    0x0001_00ff,
];
const TIMER_MODE_SHIFT: u32 = 17;
// Timer mode 0 is one-shot. The reserved mode 3 behaves as one-shot too.
const TIMER_MODE_PERIODIC: u32 = 1;
const TIMER_MODE_TSC_DEADLINE: u32 = 2;

const SVR_ENABLE: u32 = 1 << 8;
/// Writable SVR bits: vector, software enable, focus processor checking.
const SVR_WRITABLE: u32 = 0x3ff;
const DFR_MODEL_FLAT: u32 = 0xf;
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
const ICR_WRITABLE_LOW: u32 = 0x000c_cfff;
const ICR_DESTINATION_SHIFT: u32 = 24;
const ICR_SHORTHAND_SHIFT: u32 = 18;
const ICR_LOGICAL: u32 = 1 << 11;
/// Vectors 0-15 are reserved for exceptions and cannot be delivered as interrupts.
const FIRST_VALID_VECTOR: u8 = 16;

/// Delivery mode of an interrupt message: bits 10:8 of a redirection entry, an LVT entry
/// or the ICR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
    /// The reserved encoding 0b011.
    Reserved,
}

impl DeliveryMode {
    /// Decodes the three delivery-mode bits (only the low three bits of `bits` count).
    pub fn from_bits(bits: u32) -> Self {
        match bits & 0b111 {
            0b000 => DeliveryMode::Fixed,
            0b001 => DeliveryMode::LowestPriority,
            0b010 => DeliveryMode::Smi,
            0b100 => DeliveryMode::Nmi,
            0b101 => DeliveryMode::Init,
            0b110 => DeliveryMode::StartUp,
            0b111 => DeliveryMode::ExtInt,
            _ => DeliveryMode::Reserved,
        }
    }
}

/// An interrupt message on the APIC bus, as the IOAPIC or the ICR sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptMessage {
    pub vector: u8,
    pub delivery_mode: DeliveryMode,
    /// Destination is a logical mask matched against LDR, rather than an APIC ID.
    pub logical_destination: bool,
    pub destination: u8,
    pub level_triggered: bool,
}

/// Errors raised by the CPU-side configuration of the LAPIC.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LapicError {
    #[error("TSC frequency is 0 Hz: the LAPIC needs the CPU's TSC rate for TSC-deadline mode")]
    InvalidTscFrequency,
    #[error("IA32_APIC_BASE value {value:#x} enables x2APIC mode, which is not emulated: advertise no x2APIC in CPUID")]
    X2apicUnsupported { value: u64 },
    #[error("IA32_APIC_BASE value {value:#x} moves the APIC to {base:#x}: only {LAPIC_BASE:#x} is emulated")]
    RelocationUnsupported { value: u64, base: u64 },
}

/// Converts monotonic nanoseconds to TSC ticks at `tsc_hz`.
pub fn ns_to_tsc(ns: u64, tsc_hz: u64) -> u64 {
    let tsc = u128::from(ns) * u128::from(tsc_hz) / NANOS_PER_SECOND;
    u64::try_from(tsc).unwrap_or(u64::MAX)
}

/// Converts a TSC value at `tsc_hz` to the first monotonic nanosecond at which the TSC
/// has reached it.
fn tsc_to_ns(tsc: u64, tsc_hz: u64) -> u64 {
    let ns = (u128::from(tsc) * NANOS_PER_SECOND).div_ceil(u128::from(tsc_hz));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// A 256-bit vector register (ISR, TMR, IRR) stored as eight 32-bit words, as the MMIO
/// page lays it out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct VectorSet([u32; 8]);

impl VectorSet {
    fn set(&mut self, vector: u8) {
        self.0[usize::from(vector / 32)] |= 1 << (vector % 32);
    }

    fn clear(&mut self, vector: u8) {
        self.0[usize::from(vector / 32)] &= !(1 << (vector % 32));
    }

    fn contains(&self, vector: u8) -> bool {
        self.0[usize::from(vector / 32)] & (1 << (vector % 32)) != 0
    }

    fn highest(&self) -> Option<u8> {
        let (index, word) = self.0.iter().enumerate().rev().find(|(_, w)| **w != 0)?;
        Some((index * 32) as u8 + (31 - word.leading_zeros()) as u8)
    }
}

/// Counters of the LAPIC, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LapicStats {
    /// Timer expirations that raised or would have raised the timer vector.
    pub timer_expirations: u64,
    /// Messages dropped: wrong destination, APIC disabled, illegal vector, or a delivery
    /// mode (SMI, INIT, start-up, ExtINT) that a single CPU model does not act on.
    pub dropped_messages: u64,
    /// Guest accesses ignored for a wrong size, an unaligned or reserved offset, or a write
    /// to a read-only register.
    pub ignored_accesses: u64,
}

/// The local APIC of one CPU.
pub struct Lapic {
    clock: Arc<dyn Clock>,
    tsc_hz: u64,
    apic_base: u64,
    id: u32,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: VectorSet,
    tmr: VectorSet,
    irr: VectorSet,
    esr: u32,
    pending_esr: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; LVT_COUNT],
    timer_initial: u32,
    timer_divide: u32,
    /// Monotonic time at which the initial count was written, while the timer runs in
    /// one-shot or periodic mode.
    timer_start_ns: Option<u64>,
    /// Timer periods since `timer_start_ns` already reported by `advance`.
    timer_periods_reported: u64,
    /// IA32_TSC_DEADLINE, 0 when disarmed.
    tsc_deadline: u64,
    nmi_pending: bool,
    /// Vectors of level-triggered interrupts that received an EOI, for the IOAPIC.
    eoi_broadcasts: Vec<u8>,
    timer_expirations: u64,
    dropped_messages: GuestErrorLog,
    ignored_accesses: GuestErrorLog,
}

impl Lapic {
    /// Creates the LAPIC of the bootstrap processor with APIC ID `apic_id`, in the reset
    /// state: globally enabled, software-disabled, every LVT entry masked.
    pub fn new(apic_id: u8, clock: Arc<dyn Clock>, tsc_hz: u64) -> Result<Self, LapicError> {
        if tsc_hz == 0 {
            return Err(LapicError::InvalidTscFrequency);
        }
        Ok(Lapic {
            clock,
            tsc_hz,
            apic_base: LAPIC_BASE | APIC_BASE_ENABLE | APIC_BASE_BSP,
            id: u32::from(apic_id) << 24,
            tpr: 0,
            ldr: 0,
            dfr: u32::MAX,
            svr: 0xff,
            isr: VectorSet::default(),
            tmr: VectorSet::default(),
            irr: VectorSet::default(),
            esr: 0,
            pending_esr: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; LVT_COUNT],
            timer_initial: 0,
            timer_divide: 0,
            timer_start_ns: None,
            timer_periods_reported: 0,
            tsc_deadline: 0,
            nmi_pending: false,
            eoi_broadcasts: Vec::new(),
            timer_expirations: 0,
            dropped_messages: GuestErrorLog::default(),
            ignored_accesses: GuestErrorLog::default(),
        })
    }

    /// Returns true if the APIC is enabled in IA32_APIC_BASE.
    pub fn hardware_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    /// Returns true if the SVR's APIC software enable bit is set.
    pub fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// Returns true if LINT0 is unmasked in ExtINT mode, which passes the 8259's INTR
    /// through to the CPU (virtual wire mode).
    pub fn lint0_passes_extint(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        lint0 & LVT_MASKED == 0
            && DeliveryMode::from_bits(lint0 >> LVT_DELIVERY_MODE_SHIFT) == DeliveryMode::ExtInt
    }

    /// Returns the IA32_APIC_BASE MSR.
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// Writes the IA32_APIC_BASE MSR. Clearing the enable bit resets the APIC's registers,
    /// as on hardware.
    pub fn set_apic_base(&mut self, value: u64) -> Result<(), LapicError> {
        if value & APIC_BASE_X2APIC != 0 {
            return Err(LapicError::X2apicUnsupported { value });
        }
        let base = value & 0x000f_ffff_ffff_f000;
        if base != LAPIC_BASE {
            return Err(LapicError::RelocationUnsupported { value, base });
        }
        let enabling = value & APIC_BASE_ENABLE != 0;
        if !enabling && self.hardware_enabled() {
            let apic_id = (self.id >> 24) as u8;
            let fresh = Lapic::new(apic_id, self.clock.clone(), self.tsc_hz)?;
            *self = Lapic {
                dropped_messages: self.dropped_messages.clone(),
                ignored_accesses: self.ignored_accesses.clone(),
                timer_expirations: self.timer_expirations,
                ..fresh
            };
        }
        self.apic_base = (value & (APIC_BASE_ENABLE | APIC_BASE_BSP)) | LAPIC_BASE;
        Ok(())
    }

    /// Returns the task priority as CR8 shows it (TPR bits 7:4).
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// Sets the task priority from a write to CR8 (bits 3:0 become TPR bits 7:4).
    pub fn set_cr8(&mut self, value: u64) {
        self.tpr = ((value & 0xf) << 4) as u32;
    }

    /// Returns the IA32_TSC_DEADLINE MSR: the armed deadline, or 0.
    pub fn tsc_deadline(&self) -> u64 {
        self.tsc_deadline
    }

    /// Writes the IA32_TSC_DEADLINE MSR. Outside TSC-deadline mode the write is ignored,
    /// as the SDM specifies; 0 disarms the timer.
    pub fn set_tsc_deadline(&mut self, deadline: u64) {
        if self.timer_mode() == TIMER_MODE_TSC_DEADLINE {
            self.tsc_deadline = deadline;
        }
    }

    /// Returns true if an NMI (from LINT1, the ICR or an IOAPIC message) waits for the CPU.
    pub fn nmi_pending(&self) -> bool {
        self.nmi_pending
    }

    /// Returns true if `vector` is requested in IRR and not yet taken by the CPU.
    pub fn is_requested(&self, vector: u8) -> bool {
        self.irr.contains(vector)
    }

    /// Takes a pending NMI (from LINT1, the ICR or an IOAPIC message).
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    /// Takes the vectors of level-triggered interrupts that the guest ended with an EOI,
    /// which the IOAPIC must see to clear its remote IRR bits.
    pub fn take_eoi_broadcasts(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.eoi_broadcasts)
    }

    /// Returns the LAPIC's counters.
    pub fn stats(&self) -> LapicStats {
        LapicStats {
            timer_expirations: self.timer_expirations,
            dropped_messages: self.dropped_messages.count(),
            ignored_accesses: self.ignored_accesses.count(),
        }
    }

    /// Returns the processor priority: the TPR, or the class of the highest interrupt in
    /// service if that is higher.
    fn ppr(&self) -> u32 {
        let isr_class = self.isr.highest().map_or(0, |v| u32::from(v) & 0xf0);
        if (self.tpr & 0xf0) >= isr_class {
            self.tpr & 0xff
        } else {
            isr_class
        }
    }

    /// Returns true if IRR contains a vector whose priority class exceeds the processor
    /// priority, so the LAPIC asserts an interrupt to the CPU.
    pub fn interrupt_pending(&self) -> bool {
        self.deliverable_vector().is_some()
    }

    fn deliverable_vector(&self) -> Option<u8> {
        if !self.hardware_enabled() {
            return None;
        }
        let vector = self.irr.highest()?;
        (u32::from(vector) & 0xf0 > self.ppr() & 0xf0).then_some(vector)
    }

    /// Moves the highest deliverable vector from IRR to ISR and returns it, as the CPU
    /// does when it takes the interrupt. Returns `None` if nothing is deliverable.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = self.deliverable_vector()?;
        self.irr.clear(vector);
        self.isr.set(vector);
        Some(vector)
    }

    /// Delivers `message` if it is addressed to this APIC. Returns true if the LAPIC took
    /// it (set an IRR bit or a pending NMI).
    pub fn accept(&mut self, message: &InterruptMessage) -> bool {
        if !self.is_destination(message.logical_destination, message.destination) {
            self.dropped_messages.record(
                DEVICE,
                format_args!(
                    "dropped interrupt message for destination {:#04x} (logical: {}), which is not this CPU",
                    message.destination, message.logical_destination
                ),
            );
            return false;
        }
        self.deliver(
            message.delivery_mode,
            message.vector,
            message.level_triggered,
        )
    }

    fn is_destination(&self, logical: bool, destination: u8) -> bool {
        if destination == 0xff {
            return true;
        }
        if !logical {
            return u32::from(destination) == self.id >> 24;
        }
        let logical_id = (self.ldr >> 24) as u8;
        if self.dfr >> 28 == DFR_MODEL_FLAT {
            logical_id & destination != 0
        } else {
            logical_id >> 4 == destination >> 4 && logical_id & destination & 0xf != 0
        }
    }

    fn deliver(&mut self, mode: DeliveryMode, vector: u8, level_triggered: bool) -> bool {
        match mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.accept_fixed(vector, level_triggered)
            }
            DeliveryMode::Nmi => {
                self.nmi_pending = true;
                true
            }
            other => {
                self.dropped_messages.record(
                    DEVICE,
                    format_args!("dropped {other:?} interrupt message: a single CPU model does not act on it"),
                );
                false
            }
        }
    }

    fn accept_fixed(&mut self, vector: u8, level_triggered: bool) -> bool {
        if vector < FIRST_VALID_VECTOR {
            self.pending_esr |= ESR_RECEIVE_ILLEGAL_VECTOR;
            self.raise_error_interrupt();
            self.dropped_messages.record(
                DEVICE,
                format_args!(
                    "dropped illegal interrupt vector {vector}: vectors 0-15 are exceptions"
                ),
            );
            return false;
        }
        if !self.hardware_enabled() || !self.software_enabled() {
            self.dropped_messages.record(
                DEVICE,
                format_args!("dropped interrupt vector {vector:#04x}: the APIC is disabled"),
            );
            return false;
        }
        self.irr.set(vector);
        if level_triggered {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
        true
    }

    /// Raises the LVT error entry's vector if it is unmasked.
    fn raise_error_interrupt(&mut self) {
        let entry = self.lvt[LVT_ERROR];
        let vector = (entry & LVT_VECTOR) as u8;
        if entry & LVT_MASKED == 0 && vector >= FIRST_VALID_VECTOR && self.software_enabled() {
            self.irr.set(vector);
            self.tmr.clear(vector);
        }
    }

    /// Raises the interrupt of LVT entry `index` for an input that fired (timer, LINT1).
    fn raise_lvt(&mut self, index: usize) {
        let entry = self.lvt[index];
        if entry & LVT_MASKED != 0 {
            return;
        }
        let mode = if index == LVT_TIMER {
            DeliveryMode::Fixed
        } else {
            DeliveryMode::from_bits(entry >> LVT_DELIVERY_MODE_SHIFT)
        };
        self.deliver(mode, (entry & LVT_VECTOR) as u8, false);
    }

    /// Signals LINT1, which PCs wire to the NMI sources. The LVT entry decides what the
    /// CPU receives; Linux programs it for NMI delivery.
    pub fn raise_lint1(&mut self) {
        self.raise_lvt(LVT_LINT1);
    }

    fn end_of_interrupt(&mut self) {
        let Some(vector) = self.isr.highest() else {
            return;
        };
        self.isr.clear(vector);
        if self.tmr.contains(vector) {
            self.tmr.clear(vector);
            self.eoi_broadcasts.push(vector);
        }
    }

    fn timer_mode(&self) -> u32 {
        (self.lvt[LVT_TIMER] >> TIMER_MODE_SHIFT) & 0b11
    }

    fn timer_divisor(&self) -> u64 {
        // Bits 3, 1 and 0 form the exponent, where 0b111 means divide by 1.
        let code = ((self.timer_divide >> 1) & 0b100) | (self.timer_divide & 0b11);
        if code == 0b111 {
            1
        } else {
            2 << code
        }
    }

    fn timer_tick_ns(&self) -> u128 {
        u128::from(self.timer_divisor()) * NANOS_PER_SECOND / u128::from(LAPIC_TIMER_FREQUENCY_HZ)
    }

    fn timer_period_ns(&self) -> u64 {
        let period = u128::from(self.timer_initial) * self.timer_tick_ns();
        u64::try_from(period).unwrap_or(u64::MAX)
    }

    fn timer_current_count(&self, now_ns: u64) -> u32 {
        let Some(start_ns) = self.timer_start_ns else {
            return 0;
        };
        let ticks = u128::from(now_ns.saturating_sub(start_ns)) / self.timer_tick_ns();
        let initial = u128::from(self.timer_initial);
        let remaining = match self.timer_mode() {
            TIMER_MODE_PERIODIC => initial - ticks % initial,
            _ => initial.saturating_sub(ticks),
        };
        remaining as u32
    }

    /// Returns the monotonic time of the next timer expiration, or `None` if the timer is
    /// stopped. The result is `now_ns` when an expiration is due and not yet taken by
    /// [`Lapic::advance`].
    pub fn next_deadline(&self, now_ns: u64) -> Option<u64> {
        let deadline = match self.timer_mode() {
            TIMER_MODE_TSC_DEADLINE => {
                if self.tsc_deadline == 0 {
                    return None;
                }
                tsc_to_ns(self.tsc_deadline, self.tsc_hz)
            }
            mode => {
                let start_ns = self.timer_start_ns?;
                let next_period = self.timer_periods_reported + 1;
                if mode != TIMER_MODE_PERIODIC && next_period > 1 {
                    return None;
                }
                start_ns.saturating_add(self.timer_period_ns().saturating_mul(next_period))
            }
        };
        Some(deadline.max(now_ns))
    }

    /// Takes the timer expirations up to `now_ns` and raises the timer vector once if
    /// there were any and the LVT entry is unmasked. Returns true if the timer expired.
    /// Several missed periodic expirations raise one interrupt, because IRR has one bit
    /// per vector.
    pub fn advance(&mut self, now_ns: u64) -> bool {
        let expired = match self.timer_mode() {
            TIMER_MODE_TSC_DEADLINE => {
                let due =
                    self.tsc_deadline != 0 && now_ns >= tsc_to_ns(self.tsc_deadline, self.tsc_hz);
                if due {
                    self.tsc_deadline = 0;
                }
                due
            }
            mode => {
                let Some(start_ns) = self.timer_start_ns else {
                    return false;
                };
                let period = self.timer_period_ns().max(1);
                let periods = now_ns.saturating_sub(start_ns) / period;
                if periods <= self.timer_periods_reported {
                    false
                } else if mode == TIMER_MODE_PERIODIC {
                    self.timer_periods_reported = periods;
                    true
                } else {
                    self.timer_start_ns = None;
                    true
                }
            }
        };
        if expired {
            self.timer_expirations += 1;
            self.raise_lvt(LVT_TIMER);
        }
        expired
    }

    fn write_lvt(&mut self, index: usize, value: u32) {
        let mut entry = value & LVT_WRITABLE[index];
        if !self.software_enabled() {
            entry |= LVT_MASKED;
        }
        if index == LVT_TIMER {
            let old_mode = self.timer_mode();
            let new_mode = (entry >> TIMER_MODE_SHIFT) & 0b11;
            if old_mode != new_mode {
                // Switching modes disarms the timer, as the SDM specifies.
                self.timer_start_ns = None;
                self.timer_initial = 0;
                self.tsc_deadline = 0;
            }
        }
        self.lvt[index] = entry;
    }

    fn write_svr(&mut self, value: u32) {
        self.svr = value & SVR_WRITABLE;
        if !self.software_enabled() {
            for entry in &mut self.lvt {
                *entry |= LVT_MASKED;
            }
        }
    }

    fn write_icr(&mut self, value: u32) {
        self.icr_low = value & ICR_WRITABLE_LOW;
        let mode = DeliveryMode::from_bits(value >> LVT_DELIVERY_MODE_SHIFT);
        let vector = (value & LVT_VECTOR) as u8;
        let level_triggered = false;
        let to_self = match (value >> ICR_SHORTHAND_SHIFT) & 0b11 {
            0b00 => {
                let destination = (self.icr_high >> ICR_DESTINATION_SHIFT) as u8;
                self.is_destination(value & ICR_LOGICAL != 0, destination)
            }
            0b01 | 0b10 => true,
            _ => false,
        };
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
            && vector < FIRST_VALID_VECTOR
        {
            self.pending_esr |= ESR_SEND_ILLEGAL_VECTOR;
            self.raise_error_interrupt();
            return;
        }
        if to_self {
            self.deliver(mode, vector, level_triggered);
        } else {
            self.dropped_messages.record(
                DEVICE,
                format_args!("dropped IPI {value:#010x}: no other CPU exists"),
            );
        }
    }

    fn write_timer_initial(&mut self, value: u32, now_ns: u64) {
        if self.timer_mode() == TIMER_MODE_TSC_DEADLINE {
            return;
        }
        self.timer_initial = value;
        self.timer_periods_reported = 0;
        self.timer_start_ns = (value != 0).then_some(now_ns);
    }

    fn write_timer_divide(&mut self, value: u32, now_ns: u64) {
        if self.timer_start_ns.is_none() {
            self.timer_divide = value;
            return;
        }
        // Restart the count at the new rate from its current value, so that the ticks
        // already counted stay counted.
        let counted = self.timer_initial - self.timer_current_count(now_ns);
        self.timer_divide = value;
        let counted_ns = u128::from(counted) * self.timer_tick_ns();
        let counted_ns = u64::try_from(counted_ns).unwrap_or(u64::MAX);
        self.timer_start_ns = Some(now_ns.saturating_sub(counted_ns));
        self.timer_periods_reported = 0;
    }

    fn read_register(&mut self, offset: u64, now_ns: u64) -> Option<u32> {
        let value = match offset {
            REG_ID => self.id,
            REG_VERSION => LAPIC_VERSION,
            REG_TPR => self.tpr,
            REG_APR | REG_RRD => 0,
            REG_PPR => self.ppr(),
            REG_LDR => self.ldr,
            REG_DFR => self.dfr,
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr.0[((offset - REG_ISR) / 0x10) as usize],
            0x180..=0x1f0 => self.tmr.0[((offset - REG_TMR) / 0x10) as usize],
            0x200..=0x270 => self.irr.0[((offset - REG_IRR) / 0x10) as usize],
            REG_ESR => self.esr,
            REG_ICR_LOW => self.icr_low,
            REG_ICR_HIGH => self.icr_high,
            REG_LVT_TIMER..=REG_LVT_ERROR => self.lvt[((offset - REG_LVT_TIMER) / 0x10) as usize],
            REG_TIMER_INITIAL => self.timer_initial,
            REG_TIMER_CURRENT => self.timer_current_count(now_ns),
            REG_TIMER_DIVIDE => self.timer_divide,
            _ => return None,
        };
        Some(value)
    }

    /// Applies a register write. Returns false for a reserved or read-only register.
    fn write_register(&mut self, offset: u64, value: u32, now_ns: u64) -> bool {
        match offset {
            REG_ID => self.id = value & 0xff00_0000,
            REG_TPR => self.tpr = value & 0xff,
            REG_EOI => self.end_of_interrupt(),
            REG_LDR => self.ldr = value & 0xff00_0000,
            REG_DFR => self.dfr = value | 0x0fff_ffff,
            REG_SVR => self.write_svr(value),
            REG_ESR => self.esr = std::mem::take(&mut self.pending_esr),
            REG_ICR_LOW => self.write_icr(value),
            REG_ICR_HIGH => self.icr_high = value & 0xff00_0000,
            REG_LVT_TIMER..=REG_LVT_ERROR => {
                self.write_lvt(((offset - REG_LVT_TIMER) / 0x10) as usize, value)
            }
            REG_TIMER_INITIAL => self.write_timer_initial(value, now_ns),
            REG_TIMER_DIVIDE => self.write_timer_divide(value & 0b1011, now_ns),
            _ => return false,
        }
        true
    }

    fn access_is_valid(offset: u64, len: usize) -> bool {
        len == 4 && offset < LAPIC_MMIO_LEN && offset % 0x10 == 0
    }
}

impl BusDevice for Lapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !Self::access_is_valid(offset, data.len()) {
            self.ignored_accesses.record(
                DEVICE,
                format_args!(
                    "ignored {}-byte read at offset {offset:#x}: registers take 4-byte accesses at 16-byte aligned offsets",
                    data.len()
                ),
            );
            fill_unclaimed(data);
            return;
        }
        let now_ns = self.clock.monotonic_ns();
        let value = match self.read_register(offset, now_ns) {
            Some(value) => value,
            None => {
                self.ignored_accesses.record(
                    DEVICE,
                    format_args!("read of reserved register at offset {offset:#x}"),
                );
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.ignored_accesses.record(
                DEVICE,
                format_args!(
                    "ignored {}-byte write at offset {offset:#x}: registers take 4-byte accesses",
                    data.len()
                ),
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        let now_ns = self.clock.monotonic_ns();
        if !Self::access_is_valid(offset, data.len()) || !self.write_register(offset, value, now_ns)
        {
            self.ignored_accesses.record(
                DEVICE,
                format_args!("ignored write of {value:#x} to offset {offset:#x}: reserved, read-only or unaligned"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::core::devices::test_utils::ManualClock;

    const TSC_HZ: u64 = 2_000_000_000;

    fn lapic() -> (Lapic, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        clock.monotonic.store(1_000_000, Ordering::SeqCst);
        (Lapic::new(0, clock.clone(), TSC_HZ).unwrap(), clock)
    }

    fn enabled_lapic() -> (Lapic, Arc<ManualClock>) {
        let (mut lapic, clock) = lapic();
        write(&mut lapic, REG_SVR, SVR_ENABLE | 0xff);
        (lapic, clock)
    }

    fn read(lapic: &mut Lapic, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        lapic.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(lapic: &mut Lapic, offset: u64, value: u32) {
        lapic.write(offset, &value.to_le_bytes());
    }

    fn fixed(vector: u8, level_triggered: bool) -> InterruptMessage {
        InterruptMessage {
            vector,
            delivery_mode: DeliveryMode::Fixed,
            logical_destination: false,
            destination: 0,
            level_triggered,
        }
    }

    #[test]
    fn reset_state_matches_sdm() {
        let (mut lapic, _) = lapic();

        assert_eq!(read(&mut lapic, REG_VERSION), LAPIC_VERSION);
        assert_eq!(read(&mut lapic, REG_SVR), 0xff);
        assert_eq!(read(&mut lapic, REG_DFR), u32::MAX);
        for offset in (REG_LVT_TIMER..=REG_LVT_ERROR).step_by(0x10) {
            assert_eq!(read(&mut lapic, offset), LVT_MASKED, "{offset:#x}");
        }
        assert_eq!(lapic.apic_base(), 0xfee0_0900);
        assert!(!lapic.software_enabled());
    }

    #[test]
    fn fixed_interrupt_is_acknowledged() {
        let (mut lapic, _) = enabled_lapic();

        assert!(lapic.accept(&fixed(0x40, false)));

        assert!(lapic.interrupt_pending());
        assert_eq!(read(&mut lapic, REG_IRR + 0x20), 1);
        assert_eq!(lapic.acknowledge(), Some(0x40));
        assert_eq!(read(&mut lapic, REG_ISR + 0x20), 1);
        assert!(!lapic.interrupt_pending());
        write(&mut lapic, REG_EOI, 0);
        assert_eq!(read(&mut lapic, REG_ISR + 0x20), 0);
    }

    #[test]
    fn priority_orders_delivery() {
        let (mut lapic, _) = enabled_lapic();
        lapic.accept(&fixed(0x41, false));
        lapic.accept(&fixed(0x81, false));

        assert_eq!(lapic.acknowledge(), Some(0x81));
        assert_eq!(read(&mut lapic, REG_PPR), 0x80);
        assert!(
            !lapic.interrupt_pending(),
            "0x41 is below the in-service class"
        );
        lapic.accept(&fixed(0x82, false));
        assert!(!lapic.interrupt_pending(), "same class waits too");
        lapic.accept(&fixed(0x91, false));

        assert_eq!(lapic.acknowledge(), Some(0x91));
        write(&mut lapic, REG_EOI, 0);
        write(&mut lapic, REG_EOI, 0);
        assert_eq!(lapic.acknowledge(), Some(0x82));
    }

    #[test]
    fn tpr_blocks_lower_classes() {
        let (mut lapic, _) = enabled_lapic();
        write(&mut lapic, REG_TPR, 0x50);
        lapic.accept(&fixed(0x45, false));
        lapic.accept(&fixed(0x55, false));

        assert!(!lapic.interrupt_pending());
        assert_eq!(lapic.cr8(), 5);
        lapic.set_cr8(4);

        assert_eq!(lapic.acknowledge(), Some(0x55));
    }

    #[test]
    fn level_eoi_is_broadcast() {
        let (mut lapic, _) = enabled_lapic();
        lapic.accept(&fixed(0x30, true));
        lapic.accept(&fixed(0x31, false));
        assert_eq!(
            read(&mut lapic, REG_TMR + 0x10),
            1 << 16,
            "vector 0x30 is bit 16 of word 1"
        );

        assert_eq!(lapic.acknowledge(), Some(0x31));
        write(&mut lapic, REG_EOI, 0);
        assert!(lapic.take_eoi_broadcasts().is_empty(), "edge vector");
        assert_eq!(lapic.acknowledge(), Some(0x30));
        write(&mut lapic, REG_EOI, 0);

        assert_eq!(lapic.take_eoi_broadcasts(), vec![0x30]);
    }

    #[test]
    fn disabled_apic_drops_fixed_interrupts() {
        let (mut lapic, _) = lapic();

        assert!(!lapic.accept(&fixed(0x40, false)));

        assert!(!lapic.interrupt_pending());
        assert_eq!(lapic.stats().dropped_messages, 1);
    }

    #[test]
    fn illegal_vector_sets_esr() {
        let (mut lapic, _) = enabled_lapic();
        write(&mut lapic, REG_LVT_ERROR, 0xfe);

        assert!(!lapic.accept(&fixed(3, false)));
        write(&mut lapic, REG_ESR, 0);

        assert_eq!(read(&mut lapic, REG_ESR), ESR_RECEIVE_ILLEGAL_VECTOR);
        assert_eq!(lapic.acknowledge(), Some(0xfe), "error interrupt");
    }

    #[test]
    fn destination_matching() {
        let (mut lapic, _) = enabled_lapic();
        write(&mut lapic, REG_ID, 0x0300_0000);
        write(&mut lapic, REG_LDR, 0x0400_0000);
        let message = |logical, destination| InterruptMessage {
            logical_destination: logical,
            destination,
            ..fixed(0x50, false)
        };

        assert!(lapic.accept(&message(false, 3)));
        assert!(!lapic.accept(&message(false, 0)));
        assert!(lapic.accept(&message(false, 0xff)));
        assert!(lapic.accept(&message(true, 0x04)));
        assert!(!lapic.accept(&message(true, 0x01)));
        write(&mut lapic, REG_DFR, 0x0fff_ffff);
        write(&mut lapic, REG_LDR, 0x2100_0000);
        assert!(lapic.accept(&message(true, 0x23)), "cluster 2, member 1");
        assert!(!lapic.accept(&message(true, 0x11)), "wrong cluster");
    }

    #[test]
    fn self_ipi_through_icr() {
        let (mut lapic, _) = enabled_lapic();

        write(&mut lapic, REG_ICR_LOW, 0x0004_0060);
        assert_eq!(lapic.acknowledge(), Some(0x60));
        write(&mut lapic, REG_ICR_HIGH, 0);
        write(&mut lapic, REG_ICR_LOW, 0x0000_00a0);
        assert_eq!(
            lapic.acknowledge(),
            Some(0xa0),
            "physical destination 0 is this CPU"
        );
        write(&mut lapic, REG_ICR_LOW, 0x000c_00b0);
        assert!(!lapic.interrupt_pending(), "all-but-self reaches nobody");
        write(&mut lapic, REG_ICR_LOW, 0x0004_0400);

        assert!(lapic.take_nmi());
        assert_eq!(read(&mut lapic, REG_ICR_LOW) & (1 << 12), 0, "never busy");
    }

    #[test]
    fn one_shot_timer_fires_once() {
        let (mut lapic, clock) = enabled_lapic();
        let start = clock.monotonic_ns();
        write(&mut lapic, REG_TIMER_DIVIDE, 0b0011);
        write(&mut lapic, REG_LVT_TIMER, 0xec);
        write(&mut lapic, REG_TIMER_INITIAL, 1000);

        assert_eq!(lapic.next_deadline(start), Some(start + 16_000));
        clock.advance(4_000);
        assert_eq!(read(&mut lapic, REG_TIMER_CURRENT), 750);
        assert!(!lapic.advance(start + 15_999));
        assert!(lapic.advance(start + 16_000));
        assert_eq!(lapic.acknowledge(), Some(0xec));
        assert_eq!(lapic.next_deadline(start + 16_000), None);
        assert!(!lapic.advance(start + 100_000));
        clock.advance(100_000);
        assert_eq!(read(&mut lapic, REG_TIMER_CURRENT), 0);
    }

    #[test]
    fn periodic_timer_reloads() {
        let (mut lapic, clock) = enabled_lapic();
        let start = clock.monotonic_ns();
        write(&mut lapic, REG_TIMER_DIVIDE, 0b1011);
        write(
            &mut lapic,
            REG_LVT_TIMER,
            (TIMER_MODE_PERIODIC << 17) | 0xef,
        );
        write(&mut lapic, REG_TIMER_INITIAL, 100);

        assert!(lapic.advance(start + 100));
        assert_eq!(lapic.next_deadline(start + 100), Some(start + 200));
        assert!(lapic.advance(start + 450), "missed periods coalesce");
        assert_eq!(lapic.next_deadline(start + 450), Some(start + 500));
        clock.advance(450);
        assert_eq!(read(&mut lapic, REG_TIMER_CURRENT), 50);
        assert_eq!(lapic.stats().timer_expirations, 2);
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let (mut lapic, _) = enabled_lapic();
        write(&mut lapic, REG_TIMER_DIVIDE, 0b1010);
        write(
            &mut lapic,
            REG_LVT_TIMER,
            (TIMER_MODE_PERIODIC << 17) | 0xef,
        );
        write(&mut lapic, REG_TIMER_INITIAL, u32::MAX);

        assert!(lapic.advance(u64::MAX));
        assert_eq!(lapic.next_deadline(u64::MAX), Some(u64::MAX));
        assert!(!lapic.advance(0), "time going backwards reports nothing");

        write(
            &mut lapic,
            REG_LVT_TIMER,
            (TIMER_MODE_TSC_DEADLINE << 17) | 0xef,
        );
        lapic.set_tsc_deadline(u64::MAX);
        assert_eq!(
            lapic.next_deadline(0),
            Some(1 << 63),
            "u64::MAX ticks at 2 GHz"
        );
        assert!(lapic.advance(u64::MAX));
    }

    #[test]
    fn masked_timer_counts_without_interrupt() {
        let (mut lapic, clock) = enabled_lapic();
        let start = clock.monotonic_ns();
        write(&mut lapic, REG_TIMER_DIVIDE, 0b1011);
        write(&mut lapic, REG_LVT_TIMER, LVT_MASKED | 0xec);
        write(&mut lapic, REG_TIMER_INITIAL, 10);

        assert!(lapic.advance(start + 10));

        assert!(!lapic.interrupt_pending());
    }

    #[test]
    fn tsc_deadline_timer() {
        let (mut lapic, clock) = enabled_lapic();
        let now = clock.monotonic_ns();
        lapic.set_tsc_deadline(1);
        assert_eq!(lapic.tsc_deadline(), 0, "ignored outside deadline mode");
        write(
            &mut lapic,
            REG_LVT_TIMER,
            (TIMER_MODE_TSC_DEADLINE << 17) | 0xed,
        );
        write(&mut lapic, REG_TIMER_INITIAL, 100);
        assert_eq!(
            read(&mut lapic, REG_TIMER_INITIAL),
            0,
            "ignored in deadline mode"
        );

        let deadline_tsc = ns_to_tsc(now, TSC_HZ) + 2_000;
        lapic.set_tsc_deadline(deadline_tsc);

        assert_eq!(lapic.next_deadline(now), Some(now + 1_000));
        assert!(!lapic.advance(now + 999));
        assert!(lapic.advance(now + 1_000));
        assert_eq!(lapic.tsc_deadline(), 0, "disarmed after firing");
        assert_eq!(lapic.acknowledge(), Some(0xed));
        assert_eq!(lapic.next_deadline(now + 1_000), None);
    }

    #[test]
    fn divide_change_keeps_current_count() {
        let (mut lapic, clock) = enabled_lapic();
        write(&mut lapic, REG_TIMER_DIVIDE, 0b1011);
        write(&mut lapic, REG_LVT_TIMER, 0xec);
        write(&mut lapic, REG_TIMER_INITIAL, 1000);
        clock.advance(400);

        write(&mut lapic, REG_TIMER_DIVIDE, 0b0000);
        let change = clock.monotonic_ns();

        assert_eq!(read(&mut lapic, REG_TIMER_CURRENT), 600);
        clock.advance(200);
        assert_eq!(
            read(&mut lapic, REG_TIMER_CURRENT),
            500,
            "two ns per tick now"
        );
        assert_eq!(lapic.next_deadline(change), Some(change + 1200));
    }

    #[test]
    fn mode_switch_disarms_timer() {
        let (mut lapic, clock) = enabled_lapic();
        write(&mut lapic, REG_LVT_TIMER, 0xec);
        write(&mut lapic, REG_TIMER_INITIAL, 1000);

        write(
            &mut lapic,
            REG_LVT_TIMER,
            (TIMER_MODE_PERIODIC << 17) | 0xec,
        );

        assert_eq!(lapic.next_deadline(clock.monotonic_ns()), None);
        assert_eq!(read(&mut lapic, REG_TIMER_INITIAL), 0);
    }

    #[test]
    fn divide_register_encoding() {
        let (mut lapic, _) = lapic();
        let cases = [
            (0b0000, 2),
            (0b0001, 4),
            (0b0010, 8),
            (0b0011, 16),
            (0b1000, 32),
            (0b1001, 64),
            (0b1010, 128),
            (0b1011, 1),
        ];

        for (code, divisor) in cases {
            write(&mut lapic, REG_TIMER_DIVIDE, code);
            assert_eq!(lapic.timer_divisor(), divisor, "{code:#06b}");
        }
    }

    #[test]
    fn software_disable_masks_lvt() {
        let (mut lapic, _) = enabled_lapic();
        write(&mut lapic, REG_LVT_TIMER, 0xec);
        assert_eq!(read(&mut lapic, REG_LVT_TIMER), 0xec);

        write(&mut lapic, REG_SVR, 0xff);
        assert_eq!(read(&mut lapic, REG_LVT_TIMER), LVT_MASKED | 0xec);
        write(&mut lapic, REG_LVT_TIMER, 0xec);

        assert_eq!(
            read(&mut lapic, REG_LVT_TIMER),
            LVT_MASKED | 0xec,
            "stays masked"
        );
    }

    #[test]
    fn lint0_extint_and_lint1_nmi() {
        let (mut lapic, _) = enabled_lapic();
        assert!(!lapic.lint0_passes_extint());

        write(&mut lapic, 0x350, 0x700);
        write(&mut lapic, 0x360, 0x400);
        lapic.raise_lint1();

        assert!(lapic.lint0_passes_extint());
        assert!(lapic.take_nmi());
        assert!(!lapic.take_nmi());
    }

    #[test]
    fn apic_base_msr() {
        let (mut lapic, _) = enabled_lapic();
        lapic.accept(&fixed(0x40, false));

        assert_eq!(
            lapic.set_apic_base(0xfee0_0d00),
            Err(LapicError::X2apicUnsupported { value: 0xfee0_0d00 })
        );
        assert_eq!(
            lapic.set_apic_base(0xfed0_0900),
            Err(LapicError::RelocationUnsupported {
                value: 0xfed0_0900,
                base: 0xfed0_0000
            })
        );
        lapic.set_apic_base(0xfee0_0100).unwrap();
        assert!(!lapic.hardware_enabled());
        assert!(!lapic.interrupt_pending());
        lapic.set_apic_base(0xfee0_0900).unwrap();

        assert!(lapic.hardware_enabled());
        assert!(!lapic.software_enabled(), "the disable reset the registers");
        assert!(!lapic.interrupt_pending(), "IRR was cleared");
    }

    #[test]
    fn zero_tsc_frequency_is_rejected() {
        let clock = Arc::new(ManualClock::default());

        assert!(matches!(
            Lapic::new(0, clock, 0),
            Err(LapicError::InvalidTscFrequency)
        ));
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let (mut lapic, _) = enabled_lapic();

        let mut byte = [0u8; 1];
        lapic.read(REG_ID, &mut byte);
        assert_eq!(byte, [0xff]);
        let mut eight = [0u8; 8];
        lapic.read(REG_ID, &mut eight);
        assert_eq!(eight, [0xff; 8]);
        assert_eq!(read(&mut lapic, REG_ID + 4), u32::MAX);
        assert_eq!(read(&mut lapic, LAPIC_MMIO_LEN), u32::MAX);
        assert_eq!(read(&mut lapic, 0x2f0), 0, "reserved register");
        write(&mut lapic, REG_VERSION, 0);
        write(&mut lapic, REG_ID + 4, 0x0100_0000);
        lapic.write(REG_ID, &[1, 2]);
        lapic.write(u64::MAX, &[0; 4]);

        assert_eq!(read(&mut lapic, REG_VERSION), LAPIC_VERSION);
        assert_eq!(read(&mut lapic, REG_ID), 0);
        assert_eq!(lapic.stats().ignored_accesses, 9);
    }
}
