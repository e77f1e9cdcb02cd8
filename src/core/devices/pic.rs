//! The PC's pair of 8259A programmable interrupt controllers, with the slave cascaded on
//! the master's IRQ 2, and the edge/level control registers (ELCR) of the PCI-era chipset.
//!
//! Device offsets: 0-1 are the master's command and data ports (0x20, 0x21), 2-3 the
//! slave's (0xA0, 0xA1), and 4-5 the ELCR of each (0x4D0, 0x4D1). The model implements
//! the initialization sequence ICW1-ICW4, OCW1 (mask), OCW2 (non-specific, specific and
//! rotating EOI, priority setting) and OCW3 (IRR/ISR read, poll, special mask mode),
//! automatic EOI, special fully nested mode, and edge or level triggering per line.
//!
//! Lines are edge-triggered unless the guest sets ICW1.LTIM or the line's ELCR bit. An
//! edge-triggered line latches a request in IRR on its rising edge and keeps it until the
//! CPU acknowledges it. A level-triggered line requests for as long as it is high.
//! The cascade input (master IRQ 2) follows the slave's output as a level, so no slave
//! request is lost when the slave stays asserted across an acknowledge.
//!
//! The CPU side is [`Pic::interrupt_pending`] (the INTR pin) and [`Pic::acknowledge`] (the
//! INTA cycle, returning the vector).
//!
//! Before the guest initializes it, the pair looks as PC firmware leaves it: vector bases
//! 0x08 and 0x70, every line masked except the cascade.

use super::{fill_unclaimed, BusDevice, DeviceWindow, GuestErrorLog};

/// I/O port of the master's command register.
pub const PIC_MASTER_PORT: u16 = 0x20;
/// I/O port of the slave's command register.
pub const PIC_SLAVE_PORT: u16 = 0xa0;
/// I/O port of the master's ELCR; the slave's follows it.
pub const ELCR_PORT: u16 = 0x4d0;
/// The three bus windows of the pair.
pub const PIC_WINDOWS: [DeviceWindow; 3] = [
    DeviceWindow::new("pic-master", PIC_MASTER_PORT as u64, 2, 0),
    DeviceWindow::new("pic-slave", PIC_SLAVE_PORT as u64, 2, 2),
    DeviceWindow::new("pic-elcr", ELCR_PORT as u64, 2, 4),
];
/// Number of interrupt lines of the pair.
pub const PIC_LINES: u32 = 16;
/// The master input that the slave's output drives.
pub const CASCADE_LINE: u32 = 2;

const DEVICE: &str = "pic";

const ICW1_ICW4_NEEDED: u8 = 1 << 0;
const ICW1_SINGLE: u8 = 1 << 1;
const ICW1_LEVEL_TRIGGERED: u8 = 1 << 3;
const ICW1_SELECT: u8 = 1 << 4;
const ICW4_8086_MODE: u8 = 1 << 0;
const ICW4_AUTO_EOI: u8 = 1 << 1;
const ICW4_SPECIAL_FULLY_NESTED: u8 = 1 << 4;
const OCW3_SELECT: u8 = 1 << 3;
const OCW3_READ_ISR: u8 = 1 << 0;
const OCW3_READ_REGISTER: u8 = 1 << 1;
const OCW3_POLL: u8 = 1 << 2;
const OCW3_SPECIAL_MASK: u8 = 1 << 5;
const OCW3_SPECIAL_MASK_ENABLE: u8 = 1 << 6;
const OCW2_LEVEL_MASK: u8 = 0b111;
const POLL_INTERRUPT: u8 = 1 << 7;

/// ELCR bits that exist: master IRQ 0, 1 and 2 and slave IRQ 8 and 13 are always edge.
const ELCR_MASTER_WRITABLE: u8 = 0xf8;
const ELCR_SLAVE_WRITABLE: u8 = 0xde;
/// Slave line whose vector is returned for a spurious interrupt.
const SPURIOUS_LINE: u8 = 7;

/// Errors raised by [`Pic::set_irq`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PicError {
    #[error("PIC line {line} is out of range: the pair has lines 0 to 15")]
    InvalidLine { line: u32 },
    #[error(
        "PIC line 2 is the cascade from the slave and cannot be raised; use line 9 for ISA IRQ 2"
    )]
    CascadeLine,
}

/// Next expected step of a chip's initialization sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InitStep {
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A.
#[derive(Debug, Clone)]
struct Chip {
    is_master: bool,
    irr: u8,
    isr: u8,
    imr: u8,
    /// Current level of each input, for edge detection and level-triggered requests.
    levels: u8,
    elcr: u8,
    elcr_writable: u8,
    level_triggered_all: bool,
    vector_base: u8,
    /// The line with the highest priority; rotation moves it.
    priority_base: u8,
    init_step: InitStep,
    icw4_needed: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    special_mask: bool,
    read_isr: bool,
    poll: bool,
}

impl Chip {
    fn new(is_master: bool, vector_base: u8, elcr_writable: u8) -> Self {
        Chip {
            is_master,
            irr: 0,
            isr: 0,
            imr: if is_master {
                !(1 << CASCADE_LINE)
            } else {
                0xff
            },
            levels: 0,
            elcr: 0,
            elcr_writable,
            level_triggered_all: false,
            vector_base,
            priority_base: 0,
            init_step: InitStep::Ready,
            icw4_needed: false,
            single: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_fully_nested: false,
            special_mask: false,
            read_isr: false,
            poll: false,
        }
    }

    fn is_level_triggered(&self, line: u8) -> bool {
        let cascade = self.is_master && u32::from(line) == CASCADE_LINE;
        cascade || self.level_triggered_all || self.elcr & (1 << line) != 0
    }

    fn set_level(&mut self, line: u8, level: bool) {
        let bit = 1 << line;
        if self.is_level_triggered(line) {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.levels & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
    }

    /// Returns the priority (0 is highest) of the most urgent line in `lines`.
    fn highest_priority(&self, lines: u8) -> Option<u8> {
        (0..8).find(|priority| lines & (1 << ((priority + self.priority_base) & 7)) != 0)
    }

    /// Returns the line this chip would signal to the CPU (or to the master) now.
    fn pending_line(&self) -> Option<u8> {
        let requested = self.highest_priority(self.irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && self.is_master {
            in_service &= !(1 << CASCADE_LINE);
        }
        let serving = self.highest_priority(in_service).unwrap_or(8);
        (requested < serving).then_some((requested + self.priority_base) & 7)
    }

    /// Moves `line` from IRR to ISR, as the INTA cycle does.
    fn acknowledge(&mut self, line: u8) {
        let bit = 1 << line;
        if !self.is_level_triggered(line) {
            self.irr &= !bit;
        }
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_base = (line + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
    }

    /// Clears the most urgent in-service line and returns it.
    fn end_highest_in_service(&mut self) -> Option<u8> {
        let priority = self.highest_priority(self.isr)?;
        let line = (priority + self.priority_base) & 7;
        self.isr &= !(1 << line);
        Some(line)
    }

    fn write_command(&mut self, value: u8) -> Result<(), String> {
        if value & ICW1_SELECT != 0 {
            self.start_init(value);
            return Ok(());
        }
        if value & OCW3_SELECT != 0 {
            if value & OCW3_READ_REGISTER != 0 {
                self.read_isr = value & OCW3_READ_ISR != 0;
            }
            self.poll = value & OCW3_POLL != 0;
            if value & OCW3_SPECIAL_MASK_ENABLE != 0 {
                self.special_mask = value & OCW3_SPECIAL_MASK != 0;
            }
            return Ok(());
        }

        let level = value & OCW2_LEVEL_MASK;
        match value >> 5 {
            // Non-specific EOI.
            0b001 => {
                self.end_highest_in_service();
            }
            // Specific EOI.
            0b011 => self.isr &= !(1 << level),
            // Rotate on non-specific EOI.
            0b101 => {
                if let Some(line) = self.end_highest_in_service() {
                    self.priority_base = (line + 1) & 7;
                }
            }
            // Rotate on specific EOI.
            0b111 => {
                self.isr &= !(1 << level);
                self.priority_base = (level + 1) & 7;
            }
            // Set priority: `level` becomes the lowest.
            0b110 => self.priority_base = (level + 1) & 7,
            0b100 => self.rotate_on_auto_eoi = true,
            0b000 => self.rotate_on_auto_eoi = false,
            // 0b010 is a no-operation.
            _ => {}
        }
        Ok(())
    }

    fn start_init(&mut self, icw1: u8) {
        // ICW1 clears the mask, the in-service bits and the latched edges, resets priority
        // to IRQ 0 first and selects IRR for reads. Level-triggered requests stay.
        self.imr = 0;
        self.isr = 0;
        self.priority_base = 0;
        self.special_mask = false;
        self.read_isr = false;
        self.poll = false;
        self.auto_eoi = false;
        self.rotate_on_auto_eoi = false;
        self.special_fully_nested = false;
        self.icw4_needed = icw1 & ICW1_ICW4_NEEDED != 0;
        self.single = icw1 & ICW1_SINGLE != 0;
        self.level_triggered_all = icw1 & ICW1_LEVEL_TRIGGERED != 0;
        self.irr = 0;
        for line in 0..8 {
            if self.is_level_triggered(line) && self.levels & (1 << line) != 0 {
                self.irr |= 1 << line;
            }
        }
        self.init_step = InitStep::Icw2;
    }

    fn write_data(&mut self, value: u8) -> Result<(), String> {
        match self.init_step {
            InitStep::Ready => self.imr = value,
            InitStep::Icw2 => {
                self.vector_base = value & 0xf8;
                self.init_step = if !self.single {
                    InitStep::Icw3
                } else if self.icw4_needed {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            // ICW3 describes the wiring, which is fixed: the slave is on master IRQ 2.
            InitStep::Icw3 => {
                self.init_step = if self.icw4_needed {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw4 => {
                self.auto_eoi = value & ICW4_AUTO_EOI != 0;
                self.special_fully_nested = value & ICW4_SPECIAL_FULLY_NESTED != 0;
                self.init_step = InitStep::Ready;
                if value & ICW4_8086_MODE == 0 {
                    return Err(format!(
                        "ICW4 {value:#04x} selects 8080 mode, which is not emulated: vectors stay in 8086 form"
                    ));
                }
            }
        }
        Ok(())
    }

    fn read_command(&mut self) -> u8 {
        if self.poll {
            self.poll = false;
            return match self.pending_line() {
                Some(line) => {
                    self.acknowledge(line);
                    POLL_INTERRUPT | line
                }
                None => 0,
            };
        }
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// Counters of the PIC pair, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PicStats {
    /// Spurious interrupts returned by [`Pic::acknowledge`].
    pub spurious: u64,
    /// Guest accesses ignored for a wrong size, an unused offset or an unsupported mode.
    pub ignored_accesses: u64,
}

/// The master and slave 8259A.
pub struct Pic {
    master: Chip,
    slave: Chip,
    spurious: u64,
    ignored_accesses: GuestErrorLog,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Creates the pair in the state PC firmware leaves it in (see the module docs).
    pub fn new() -> Self {
        Pic {
            master: Chip::new(true, 0x08, ELCR_MASTER_WRITABLE),
            slave: Chip::new(false, 0x70, ELCR_SLAVE_WRITABLE),
            spurious: 0,
            ignored_accesses: GuestErrorLog::default(),
        }
    }

    /// Sets the level of input `line` (0-7 on the master, 8-15 on the slave).
    pub fn set_irq(&mut self, line: u32, level: bool) -> Result<(), PicError> {
        match line {
            CASCADE_LINE => return Err(PicError::CascadeLine),
            0..=7 => self.master.set_level(line as u8, level),
            8..=15 => self.slave.set_level((line - 8) as u8, level),
            _ => return Err(PicError::InvalidLine { line }),
        }
        self.update_cascade();
        Ok(())
    }

    /// Returns true while the master asserts INTR: an unmasked request outranks every
    /// interrupt in service.
    pub fn interrupt_pending(&self) -> bool {
        self.master.pending_line().is_some()
    }

    /// Runs the INTA cycle: marks the most urgent request in service and returns its
    /// vector. Returns `None` if nothing is pending. A slave request withdrawn after it
    /// reached the master (masked meanwhile) yields the slave's spurious vector, as the
    /// slave's IRQ 15 does on real hardware.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let line = self.master.pending_line()?;
        self.master.acknowledge(line);
        let vector = if u32::from(line) != CASCADE_LINE {
            self.master.vector_base | line
        } else if let Some(slave_line) = self.slave.pending_line() {
            self.slave.acknowledge(slave_line);
            self.slave.vector_base | slave_line
        } else {
            self.spurious += 1;
            self.slave.vector_base | SPURIOUS_LINE
        };
        self.update_cascade();
        Some(vector)
    }

    /// Returns true if `line` has a request latched in IRR that its mask bit lets through,
    /// so it waits for the CPU. Returns false for the cascade line and lines above 15.
    pub fn is_requested(&self, line: u32) -> bool {
        let (chip, bit) = match line {
            CASCADE_LINE => return false,
            0..=7 => (&self.master, line),
            8..=15 => (&self.slave, line - 8),
            _ => return false,
        };
        chip.irr & !chip.imr & (1 << bit) != 0
    }

    /// Returns the pair's counters.
    pub fn stats(&self) -> PicStats {
        PicStats {
            spurious: self.spurious,
            ignored_accesses: self.ignored_accesses.count(),
        }
    }

    fn update_cascade(&mut self) {
        let slave_output = self.slave.pending_line().is_some();
        self.master.set_level(CASCADE_LINE as u8, slave_output);
    }

    fn record_ignored(&mut self, message: std::fmt::Arguments<'_>) {
        self.ignored_accesses.record(DEVICE, message);
    }
}

impl BusDevice for Pic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            self.record_ignored(format_args!(
                "ignored {}-byte read at offset {offset:#x}: the PIC takes only 1-byte accesses",
                data.len()
            ));
            fill_unclaimed(data);
            return;
        }
        data[0] = match offset {
            0 => self.master.read_command(),
            1 => self.master.imr,
            2 => self.slave.read_command(),
            3 => self.slave.imr,
            4 => self.master.elcr,
            5 => self.slave.elcr,
            _ => {
                self.record_ignored(format_args!("ignored read at offset {offset:#x}"));
                0xff
            }
        };
        // A poll read acknowledges an interrupt, which changes the slave's output.
        self.update_cascade();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else {
            self.record_ignored(format_args!(
                "ignored {}-byte write at offset {offset:#x}: the PIC takes only 1-byte accesses",
                data.len()
            ));
            return;
        };
        let result = match offset {
            0 => self.master.write_command(value),
            1 => self.master.write_data(value),
            2 => self.slave.write_command(value),
            3 => self.slave.write_data(value),
            4 => {
                self.master.elcr = value & self.master.elcr_writable;
                Ok(())
            }
            5 => {
                self.slave.elcr = value & self.slave.elcr_writable;
                Ok(())
            }
            _ => Err(format!(
                "ignored write of {value:#04x} at offset {offset:#x}"
            )),
        };
        if let Err(message) = result {
            self.record_ignored(format_args!("{message}"));
        }
        self.update_cascade();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASTER_CMD: u64 = 0;
    const MASTER_DATA: u64 = 1;
    const SLAVE_CMD: u64 = 2;
    const SLAVE_DATA: u64 = 3;
    const NON_SPECIFIC_EOI: u8 = 0x20;

    /// Initializes the pair as Linux does: vector bases 0x30 and 0x38, edge-triggered,
    /// cascade on IRQ 2, 8086 mode with `icw4` extra bits, every line unmasked.
    fn linux_pic(icw4: u8) -> Pic {
        let mut pic = Pic::new();
        for (cmd, data, base, cascade) in [
            (MASTER_CMD, MASTER_DATA, 0x30, 0x04),
            (SLAVE_CMD, SLAVE_DATA, 0x38, 0x02),
        ] {
            pic.write(cmd, &[0x11]);
            pic.write(data, &[base]);
            pic.write(data, &[cascade]);
            pic.write(data, &[0x01 | icw4]);
            pic.write(data, &[0x00]);
        }
        pic
    }

    fn pulse(pic: &mut Pic, line: u32) {
        pic.set_irq(line, true).unwrap();
        pic.set_irq(line, false).unwrap();
    }

    fn read(pic: &mut Pic, offset: u64) -> u8 {
        let mut data = [0];
        pic.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn edge_interrupt_is_delivered_once() {
        let mut pic = linux_pic(0);

        pulse(&mut pic, 1);

        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x31));
        assert!(!pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn edge_needs_new_rising_edge() {
        let mut pic = linux_pic(0);
        pic.set_irq(0, true).unwrap();
        assert_eq!(pic.acknowledge(), Some(0x30));
        pic.write(MASTER_CMD, &[NON_SPECIFIC_EOI]);

        pic.set_irq(0, true).unwrap();
        assert!(!pic.interrupt_pending(), "still high, no new edge");
        pic.set_irq(0, false).unwrap();
        pic.set_irq(0, true).unwrap();

        assert_eq!(pic.acknowledge(), Some(0x30));
    }

    #[test]
    fn in_service_blocks_lower_priority() {
        let mut pic = linux_pic(0);
        pulse(&mut pic, 3);
        assert_eq!(pic.acknowledge(), Some(0x33));

        pulse(&mut pic, 4);
        assert!(!pic.interrupt_pending(), "IRQ 4 waits for EOI of IRQ 3");
        pulse(&mut pic, 1);
        assert_eq!(pic.acknowledge(), Some(0x31), "IRQ 1 preempts");
        pic.write(MASTER_CMD, &[NON_SPECIFIC_EOI]);
        assert!(
            !pic.interrupt_pending(),
            "the EOI ended IRQ 1, IRQ 3 still in service"
        );
        pic.write(MASTER_CMD, &[NON_SPECIFIC_EOI]);

        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn specific_eoi_clears_named_line() {
        let mut pic = linux_pic(0);
        pulse(&mut pic, 5);
        pulse(&mut pic, 6);
        assert_eq!(pic.acknowledge(), Some(0x35));

        pic.write(MASTER_CMD, &[0x60 | 6]);
        assert!(!pic.interrupt_pending(), "IRQ 5 is still in service");
        pic.write(MASTER_CMD, &[0x60 | 5]);

        assert_eq!(pic.acknowledge(), Some(0x36));
    }

    #[test]
    fn mask_hides_request() {
        let mut pic = linux_pic(0);
        pic.write(MASTER_DATA, &[0x01]);

        pulse(&mut pic, 0);
        assert!(!pic.interrupt_pending());
        assert_eq!(read(&mut pic, MASTER_DATA), 0x01);
        pic.write(MASTER_DATA, &[0x00]);

        assert_eq!(pic.acknowledge(), Some(0x30), "the edge stayed latched");
    }

    #[test]
    fn slave_interrupt_goes_through_cascade() {
        let mut pic = linux_pic(0);

        pulse(&mut pic, 12);

        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x3c));
        pic.write(SLAVE_CMD, &[NON_SPECIFIC_EOI]);
        pic.write(MASTER_CMD, &[NON_SPECIFIC_EOI]);
        assert!(!pic.interrupt_pending());
    }

    #[test]
    fn two_slave_requests_both_arrive() {
        let mut pic = linux_pic(0);
        pulse(&mut pic, 8);
        pulse(&mut pic, 14);

        assert_eq!(pic.acknowledge(), Some(0x38));
        pic.write(SLAVE_CMD, &[NON_SPECIFIC_EOI]);
        pic.write(MASTER_CMD, &[NON_SPECIFIC_EOI]);

        assert_eq!(pic.acknowledge(), Some(0x3e));
    }

    #[test]
    fn slave_in_auto_eoi_keeps_cascade_up() {
        let mut pic = linux_pic(ICW4_AUTO_EOI);
        pulse(&mut pic, 9);
        pulse(&mut pic, 10);

        assert_eq!(pic.acknowledge(), Some(0x39));
        assert_eq!(pic.acknowledge(), Some(0x3a));
        assert_eq!(pic.acknowledge(), None);
        assert_eq!(
            read_isr(&mut pic, MASTER_CMD),
            0,
            "auto-EOI sets no ISR bit"
        );
    }

    fn read_isr(pic: &mut Pic, command: u64) -> u8 {
        pic.write(command, &[0x0b]);
        let isr = read(pic, command);
        pic.write(command, &[0x0a]);
        isr
    }

    #[test]
    fn withdrawn_slave_request_is_spurious() {
        let mut pic = linux_pic(0);
        pulse(&mut pic, 11);
        assert!(pic.interrupt_pending());

        pic.master.irr |= 1 << CASCADE_LINE;
        pic.slave.imr = 0xff;

        assert_eq!(pic.acknowledge(), Some(0x3f));
        assert_eq!(pic.stats().spurious, 1);
    }

    #[test]
    fn level_line_requests_until_lowered() {
        let mut pic = linux_pic(0);
        pic.write(5, &[0x08]);
        pic.set_irq(11, true).unwrap();

        assert_eq!(pic.acknowledge(), Some(0x3b));
        pic.write(SLAVE_CMD, &[NON_SPECIFIC_EOI]);
        pic.write(MASTER_CMD, &[NON_SPECIFIC_EOI]);
        assert_eq!(pic.acknowledge(), Some(0x3b), "still high");
        pic.write(SLAVE_CMD, &[NON_SPECIFIC_EOI]);
        pic.write(MASTER_CMD, &[NON_SPECIFIC_EOI]);
        pic.set_irq(11, false).unwrap();

        assert!(!pic.interrupt_pending());
    }

    #[test]
    fn requested_lines_follow_irr_and_mask() {
        let mut pic = linux_pic(0);
        pulse(&mut pic, 0);
        pulse(&mut pic, 10);

        assert!(pic.is_requested(0));
        assert!(pic.is_requested(10));
        assert!(!pic.is_requested(1));
        assert!(!pic.is_requested(CASCADE_LINE));
        assert!(!pic.is_requested(99));
        pic.write(MASTER_DATA, &[0x01]);
        assert!(!pic.is_requested(0), "masked");
        pic.write(MASTER_DATA, &[0x00]);
        pic.acknowledge();

        assert!(!pic.is_requested(0), "moved to ISR");
    }

    #[test]
    fn elcr_keeps_writable_bits() {
        let mut pic = Pic::new();

        pic.write(4, &[0xff]);
        pic.write(5, &[0xff]);

        assert_eq!(read(&mut pic, 4), ELCR_MASTER_WRITABLE);
        assert_eq!(read(&mut pic, 5), ELCR_SLAVE_WRITABLE);
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = linux_pic(ICW4_AUTO_EOI);
        pulse(&mut pic, 3);

        assert_eq!(pic.acknowledge(), Some(0x33));
        pulse(&mut pic, 4);

        assert_eq!(pic.acknowledge(), Some(0x34), "no EOI needed");
    }

    #[test]
    fn rotation_changes_priority() {
        let mut pic = linux_pic(0);
        // Make IRQ 3 the lowest priority, so IRQ 4 is the highest.
        pic.write(MASTER_CMD, &[0xc0 | 3]);

        pulse(&mut pic, 1);
        pulse(&mut pic, 5);
        assert_eq!(pic.acknowledge(), Some(0x35));
        // Rotate on non-specific EOI: IRQ 5 becomes the lowest.
        pic.write(MASTER_CMD, &[0xa0]);

        assert_eq!(pic.acknowledge(), Some(0x31));
    }

    #[test]
    fn special_mask_allows_lower_priority() {
        let mut pic = linux_pic(0);
        pulse(&mut pic, 3);
        assert_eq!(pic.acknowledge(), Some(0x33));

        pic.write(MASTER_DATA, &[0x08]);
        pic.write(MASTER_CMD, &[0x68]);
        pulse(&mut pic, 6);

        assert_eq!(pic.acknowledge(), Some(0x36));
    }

    #[test]
    fn registers_read_through_ocw3() {
        let mut pic = linux_pic(0);
        pulse(&mut pic, 4);
        pulse(&mut pic, 6);
        assert_eq!(read(&mut pic, MASTER_CMD), 0x50, "IRR by default");

        pic.acknowledge();

        assert_eq!(read_isr(&mut pic, MASTER_CMD), 0x10);
        assert_eq!(read(&mut pic, MASTER_CMD), 0x40);
    }

    #[test]
    fn poll_acknowledges_interrupt() {
        let mut pic = linux_pic(0);
        pulse(&mut pic, 7);

        pic.write(MASTER_CMD, &[0x0c]);
        assert_eq!(read(&mut pic, MASTER_CMD), 0x87);
        pic.write(MASTER_CMD, &[0x0c]);

        assert_eq!(read(&mut pic, MASTER_CMD), 0x00, "IRQ 7 in service");
    }

    #[test]
    fn icw1_resets_state() {
        let mut pic = linux_pic(0);
        pulse(&mut pic, 1);
        pic.acknowledge();
        pulse(&mut pic, 4);
        pic.write(MASTER_DATA, &[0xff]);

        pic.write(MASTER_CMD, &[0x11]);

        assert_eq!(read(&mut pic, MASTER_DATA), 0x00, "ICW1 clears IMR");
        pic.write(MASTER_DATA, &[0x20]);
        pic.write(MASTER_DATA, &[0x04]);
        pic.write(MASTER_DATA, &[0x01]);
        assert_eq!(read(&mut pic, MASTER_CMD), 0x00, "IRR cleared");
        assert_eq!(read_isr(&mut pic, MASTER_CMD), 0x00, "ISR cleared");
        pulse(&mut pic, 0);
        assert_eq!(pic.acknowledge(), Some(0x20), "new vector base");
    }

    #[test]
    fn firmware_state_masks_lines() {
        let mut pic = Pic::new();

        pulse(&mut pic, 0);
        pulse(&mut pic, 9);

        assert!(!pic.interrupt_pending());
        assert_eq!(read(&mut pic, MASTER_DATA), 0xfb);
        assert_eq!(read(&mut pic, SLAVE_DATA), 0xff);
    }

    #[test]
    fn invalid_lines_are_rejected() {
        let mut pic = linux_pic(0);

        assert_eq!(
            pic.set_irq(16, true),
            Err(PicError::InvalidLine { line: 16 })
        );
        assert_eq!(
            pic.set_irq(u32::MAX, true),
            Err(PicError::InvalidLine { line: u32::MAX })
        );
        assert_eq!(pic.set_irq(CASCADE_LINE, true), Err(PicError::CascadeLine));
        assert!(!pic.interrupt_pending());
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let mut pic = linux_pic(0);

        let mut wide = [0u8; 2];
        pic.read(MASTER_DATA, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        pic.write(MASTER_DATA, &[0xff, 0xff]);
        assert_eq!(
            read(&mut pic, MASTER_DATA),
            0x00,
            "the mask was not written"
        );
        pic.write(6, &[0x11]);
        pic.write(u64::MAX, &[]);
        assert_eq!(read(&mut pic, u64::MAX), 0xff);
        pic.write(MASTER_CMD, &[0x11]);
        pic.write(MASTER_DATA, &[0x30]);
        pic.write(MASTER_DATA, &[0x04]);
        pic.write(MASTER_DATA, &[0x00]);

        assert_eq!(pic.stats().ignored_accesses, 6, "8080 mode is counted too");
    }
}
