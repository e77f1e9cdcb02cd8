//! An i8042 keyboard controller (data port 0x60, status and command port 0x64).
//!
//! The model covers what Linux's i8042 and atkbd drivers use while probing: the
//! controller command byte (CTR), the self tests, enabling and disabling both ports, the
//! output buffer with its status bits, AUX loopback, and a keyboard that responds to reset,
//! identify and echo. No PS/2 mouse is attached: bytes sent to the AUX device come back as
//! 0xFE (resend), so a mouse driver gives up at once. The CPU reset line (command 0xFE, or
//! any pulse or output-port write with bit 0 clear) reaches the VM through
//! [`PlatformControl::request`] with [`PlatformRequest::Reset`].
//!
//! The vm-superio crate's i8042 implements only the reset command and reads every
//! register as 0, which Linux's probe takes for a missing controller, so this model is
//! written from the controller's documented command set instead.
//!
//! Status register (read at port 0x64):
//!
//! | bit | meaning |
//! | --- | --- |
//! | 0 | output buffer full: a byte is waiting at port 0x60 |
//! | 1 | input buffer full: always 0, because every write is taken at once |
//! | 2 | system flag, copied from CTR bit 2 |
//! | 3 | the last write went to port 0x64 (a command) rather than port 0x60 (data) |
//! | 4 | keyboard not inhibited: always 1 |
//! | 5 | the waiting byte came from the AUX port |

use std::collections::VecDeque;
use std::sync::Arc;

use super::{
    fill_unclaimed, BusDevice, DeviceWindow, GuestErrorLog, PlatformControl, PlatformRequest,
};
use crate::hypervisor::IrqChip;

/// I/O port of the data register.
pub const I8042_DATA_PORT: u16 = 0x60;
/// I/O port of the status (read) and command (write) register.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// ISA interrupt line of the keyboard port.
pub const KEYBOARD_IRQ: u32 = 1;
/// ISA interrupt line of the AUX (mouse) port.
pub const AUX_IRQ: u32 = 12;
/// Device offset of the data register.
pub const DATA_OFFSET: u64 = 0;
/// Device offset of the status and command register.
pub const COMMAND_OFFSET: u64 = 4;
/// The two bus windows of the controller. Port 0x61 between them belongs to the PIT.
pub const I8042_WINDOWS: [DeviceWindow; 2] = [
    DeviceWindow::new("i8042-data", I8042_DATA_PORT as u64, 1, DATA_OFFSET),
    DeviceWindow::new(
        "i8042-command",
        I8042_COMMAND_PORT as u64,
        1,
        COMMAND_OFFSET,
    ),
];

const DEVICE: &str = "i8042";

const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
const STATUS_NOT_INHIBITED: u8 = 1 << 4;
const STATUS_AUX_DATA: u8 = 1 << 5;

const CTR_KEYBOARD_INT: u8 = 1 << 0;
const CTR_AUX_INT: u8 = 1 << 1;
const CTR_SYSTEM_FLAG: u8 = 1 << 2;
const CTR_KEYBOARD_DISABLED: u8 = 1 << 4;
const CTR_AUX_DISABLED: u8 = 1 << 5;
const CTR_TRANSLATE: u8 = 1 << 6;
/// Command byte left by PC firmware: keyboard interrupt on, system flag set, AUX clock
/// off, scancode translation on.
const CTR_DEFAULT: u8 = CTR_KEYBOARD_INT | CTR_SYSTEM_FLAG | CTR_AUX_DISABLED | CTR_TRANSLATE;

/// Output port bit 0: the CPU reset line, active low.
const OUTPUT_PORT_RESET_INACTIVE: u8 = 1 << 0;
/// Output port bit 1: the A20 gate.
const OUTPUT_PORT_A20: u8 = 1 << 1;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KEYBOARD: u8 = 0xab;
const CMD_DISABLE_KEYBOARD: u8 = 0xad;
const CMD_ENABLE_KEYBOARD: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KEYBOARD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_READ_TEST_INPUTS: u8 = 0xe0;
/// Commands 0xF0-0xFF pulse output port bits 0-3 low for each clear bit of the command;
/// 0xFE pulses only bit 0, the reset line.
const CMD_PULSE_FIRST: u8 = 0xf0;

const SELF_TEST_PASSED: u8 = 0x55;
const PORT_TEST_PASSED: u8 = 0x00;

const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const KBD_CMD_SET_LEDS: u8 = 0xed;
const KBD_CMD_ECHO: u8 = 0xee;
const KBD_CMD_SCANCODE_SET: u8 = 0xf0;
const KBD_CMD_IDENTIFY: u8 = 0xf2;
const KBD_CMD_TYPEMATIC: u8 = 0xf3;
const KBD_CMD_RESET: u8 = 0xff;
/// Identify reply of an MF2 keyboard behind a translating controller.
const KBD_ID_MF2_TRANSLATED: [u8; 2] = [0xab, 0x41];
/// Identify reply of an MF2 keyboard.
const KBD_ID_MF2: [u8; 2] = [0xab, 0x83];

/// The controller's output buffer holds one byte; replies queue behind it up to this
/// many bytes, which covers the longest reply (ACK plus a two-byte ID) several times.
const OUTPUT_QUEUE_LIMIT: usize = 16;

/// Where a byte in the output buffer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Keyboard,
    Aux,
}

/// A controller command waiting for its parameter byte at port 0x60.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingWrite {
    Ctr,
    OutputPort,
    KeyboardOutput,
    AuxOutput,
    AuxDevice,
    /// A byte of controller RAM (commands 0x61-0x7F), which is accepted and dropped.
    Ram,
    /// The parameter of a keyboard command (LEDs, typematic rate, scancode set).
    KeyboardParameter(u8),
}

/// Counters of the controller, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct I8042Stats {
    /// Reset requests sent to the platform.
    pub resets: u64,
    /// Guest accesses or commands ignored as malformed or unsupported.
    pub ignored_accesses: u64,
    /// Interrupts that the interrupt controller failed to take.
    pub irq_failures: u64,
}

/// The i8042 controller with a keyboard and an empty AUX port.
pub struct I8042 {
    irq_chip: Arc<dyn IrqChip>,
    platform: Arc<dyn PlatformControl>,
    ctr: u8,
    output_port: u8,
    last_was_command: bool,
    pending: Option<PendingWrite>,
    output: VecDeque<(u8, Source)>,
    /// The byte last read at port 0x60, returned again when the buffer is empty.
    last_output: u8,
    resets: u64,
    ignored_accesses: GuestErrorLog,
    irq_failures: GuestErrorLog,
}

impl I8042 {
    /// Creates a controller that raises [`KEYBOARD_IRQ`] and [`AUX_IRQ`] on `irq_chip`
    /// and sends reset requests to `platform`.
    pub fn new(irq_chip: Arc<dyn IrqChip>, platform: Arc<dyn PlatformControl>) -> Self {
        I8042 {
            irq_chip,
            platform,
            ctr: CTR_DEFAULT,
            output_port: OUTPUT_PORT_RESET_INACTIVE | OUTPUT_PORT_A20,
            last_was_command: false,
            pending: None,
            output: VecDeque::new(),
            last_output: 0,
            resets: 0,
            ignored_accesses: GuestErrorLog::default(),
            irq_failures: GuestErrorLog::default(),
        }
    }

    /// Queues scancodes from the host keyboard, as if keys were pressed. Returns how many
    /// bytes were queued; the rest are dropped once the queue contains
    /// [`OUTPUT_QUEUE_LIMIT`] bytes.
    pub fn enqueue_keyboard_input(&mut self, scancodes: &[u8]) -> usize {
        let mut queued = 0;
        for &byte in scancodes {
            if !self.push_output(byte, Source::Keyboard) {
                break;
            }
            queued += 1;
        }
        queued
    }

    /// Returns the controller's counters.
    pub fn stats(&self) -> I8042Stats {
        I8042Stats {
            resets: self.resets,
            ignored_accesses: self.ignored_accesses.count(),
            irq_failures: self.irq_failures.count(),
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_NOT_INHIBITED;
        if self.ctr & CTR_SYSTEM_FLAG != 0 {
            status |= STATUS_SYSTEM_FLAG;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        match self.output.front() {
            Some((_, Source::Keyboard)) => status |= STATUS_OUTPUT_FULL,
            Some((_, Source::Aux)) => status |= STATUS_OUTPUT_FULL | STATUS_AUX_DATA,
            None => {}
        }
        status
    }

    /// Appends a byte to the output queue and raises its interrupt if it is now the one
    /// waiting at port 0x60. Returns false if the queue is full and the byte was dropped.
    fn push_output(&mut self, byte: u8, source: Source) -> bool {
        if self.output.len() >= OUTPUT_QUEUE_LIMIT {
            return false;
        }
        self.output.push_back((byte, source));
        if self.output.len() == 1 {
            self.raise_output_interrupt();
        }
        true
    }

    fn raise_output_interrupt(&mut self) {
        let (line, enabled) = match self.output.front() {
            Some((_, Source::Keyboard)) => (KEYBOARD_IRQ, self.ctr & CTR_KEYBOARD_INT != 0),
            Some((_, Source::Aux)) => (AUX_IRQ, self.ctr & CTR_AUX_INT != 0),
            None => return,
        };
        if !enabled {
            return;
        }
        if let Err(e) = self.irq_chip.pulse_irq(line) {
            self.irq_failures.record(
                DEVICE,
                format_args!("failed to raise interrupt line {line}: {e}"),
            );
        }
    }

    fn read_data(&mut self) -> u8 {
        if let Some((byte, _)) = self.output.pop_front() {
            self.last_output = byte;
            self.raise_output_interrupt();
        }
        self.last_output
    }

    fn request_reset(&mut self) {
        self.resets += 1;
        tracing::info!("guest requested a CPU reset through the i8042");
        self.platform.request(PlatformRequest::Reset);
    }

    fn write_command(&mut self, command: u8) {
        self.last_was_command = true;
        self.pending = None;
        match command {
            CMD_READ_CTR => {
                self.push_output(self.ctr, Source::Keyboard);
            }
            0x21..=0x3f => {
                self.push_output(0, Source::Keyboard);
            }
            CMD_WRITE_CTR => self.pending = Some(PendingWrite::Ctr),
            0x61..=0x7f => self.pending = Some(PendingWrite::Ram),
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLED,
            CMD_TEST_AUX | CMD_TEST_KEYBOARD => {
                self.push_output(PORT_TEST_PASSED, Source::Keyboard);
            }
            CMD_SELF_TEST => {
                self.ctr |= CTR_SYSTEM_FLAG;
                self.push_output(SELF_TEST_PASSED, Source::Keyboard);
            }
            CMD_DISABLE_KEYBOARD => self.ctr |= CTR_KEYBOARD_DISABLED,
            CMD_ENABLE_KEYBOARD => self.ctr &= !CTR_KEYBOARD_DISABLED,
            CMD_READ_INPUT_PORT | CMD_READ_TEST_INPUTS => {
                self.push_output(0, Source::Keyboard);
            }
            CMD_READ_OUTPUT_PORT => {
                self.push_output(self.output_port, Source::Keyboard);
            }
            CMD_WRITE_OUTPUT_PORT => self.pending = Some(PendingWrite::OutputPort),
            CMD_WRITE_KEYBOARD_OUTPUT => self.pending = Some(PendingWrite::KeyboardOutput),
            CMD_WRITE_AUX_OUTPUT => self.pending = Some(PendingWrite::AuxOutput),
            CMD_WRITE_AUX => self.pending = Some(PendingWrite::AuxDevice),
            CMD_PULSE_FIRST..=0xff => {
                if command & OUTPUT_PORT_RESET_INACTIVE == 0 {
                    self.request_reset();
                }
            }
            _ => self.ignored_accesses.record(
                DEVICE,
                format_args!("ignored unsupported controller command {command:#04x}"),
            ),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.last_was_command = false;
        match self.pending.take() {
            Some(PendingWrite::Ctr) => {
                self.ctr = value;
                // A newly enabled interrupt fires for a byte that is already waiting.
                self.raise_output_interrupt();
            }
            Some(PendingWrite::OutputPort) => {
                // NOTE: the A20 gate (bit 1) is recorded but not emulated: A20 stays on.
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_INACTIVE == 0 {
                    self.request_reset();
                }
            }
            Some(PendingWrite::KeyboardOutput) => {
                self.push_output(value, Source::Keyboard);
            }
            Some(PendingWrite::AuxOutput) => {
                self.push_output(value, Source::Aux);
            }
            Some(PendingWrite::AuxDevice) => {
                // No mouse is attached: every byte sent to it is refused.
                self.push_output(KBD_RESEND, Source::Aux);
            }
            Some(PendingWrite::Ram) => {}
            Some(PendingWrite::KeyboardParameter(command)) => {
                self.keyboard_parameter(command, value)
            }
            None => self.keyboard_command(value),
        }
    }

    /// Executes a command byte sent to the keyboard itself and queues its reply.
    fn keyboard_command(&mut self, command: u8) {
        match command {
            KBD_CMD_RESET => {
                self.push_output(KBD_ACK, Source::Keyboard);
                self.push_output(KBD_SELF_TEST_PASSED, Source::Keyboard);
            }
            KBD_CMD_IDENTIFY => {
                let id = if self.ctr & CTR_TRANSLATE != 0 {
                    KBD_ID_MF2_TRANSLATED
                } else {
                    KBD_ID_MF2
                };
                self.push_output(KBD_ACK, Source::Keyboard);
                for byte in id {
                    self.push_output(byte, Source::Keyboard);
                }
            }
            KBD_CMD_ECHO => {
                self.push_output(KBD_CMD_ECHO, Source::Keyboard);
            }
            KBD_CMD_SET_LEDS | KBD_CMD_TYPEMATIC | KBD_CMD_SCANCODE_SET => {
                self.pending = Some(PendingWrite::KeyboardParameter(command));
                self.push_output(KBD_ACK, Source::Keyboard);
            }
            // Enable and disable scanning, set defaults and the rest are acknowledged.
            _ => {
                self.push_output(KBD_ACK, Source::Keyboard);
            }
        }
    }

    fn keyboard_parameter(&mut self, command: u8, value: u8) {
        self.push_output(KBD_ACK, Source::Keyboard);
        if command == KBD_CMD_SCANCODE_SET && value == 0 {
            // Parameter 0 queries the current set: scancode set 2.
            self.push_output(2, Source::Keyboard);
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (DATA_OFFSET, 1) => data[0] = self.read_data(),
            (COMMAND_OFFSET, 1) => data[0] = self.status(),
            _ => {
                self.ignored_accesses.record(
                    DEVICE,
                    format_args!(
                        "ignored {}-byte read at offset {offset:#x}: only 1-byte accesses to ports 0x60 and 0x64 are valid",
                        data.len()
                    ),
                );
                fill_unclaimed(data);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, &[value]) => self.write_data(value),
            (COMMAND_OFFSET, &[command]) => self.write_command(command),
            _ => self.ignored_accesses.record(
                DEVICE,
                format_args!(
                    "ignored {}-byte write at offset {offset:#x}: only 1-byte accesses to ports 0x60 and 0x64 are valid",
                    data.len()
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::devices::test_utils::{RecordingIrqChip, RecordingPlatform};

    struct Fixture {
        i8042: I8042,
        chip: Arc<RecordingIrqChip>,
        platform: Arc<RecordingPlatform>,
    }

    fn fixture() -> Fixture {
        let chip = Arc::new(RecordingIrqChip::default());
        let platform = Arc::new(RecordingPlatform::default());
        Fixture {
            i8042: I8042::new(chip.clone(), platform.clone()),
            chip,
            platform,
        }
    }

    impl Fixture {
        fn command(&mut self, command: u8) {
            self.i8042.write(COMMAND_OFFSET, &[command]);
        }

        fn data_write(&mut self, value: u8) {
            self.i8042.write(DATA_OFFSET, &[value]);
        }

        fn status(&mut self) -> u8 {
            let mut data = [0];
            self.i8042.read(COMMAND_OFFSET, &mut data);
            data[0]
        }

        fn data(&mut self) -> u8 {
            let mut data = [0];
            self.i8042.read(DATA_OFFSET, &mut data);
            data[0]
        }

        /// Reads every waiting byte, checking the output-full bit before each.
        fn drain(&mut self) -> Vec<u8> {
            let mut bytes = Vec::new();
            while self.status() & STATUS_OUTPUT_FULL != 0 {
                bytes.push(self.data());
            }
            bytes
        }
    }

    #[test]
    fn reset_command_requests_reset() {
        let mut f = fixture();

        f.command(0xfe);

        assert_eq!(
            *f.platform.requests.lock().unwrap(),
            [PlatformRequest::Reset]
        );
        assert_eq!(f.i8042.stats().resets, 1);
    }

    #[test]
    fn pulse_without_reset_bit_is_harmless() {
        let mut f = fixture();

        f.command(0xff);
        f.command(0xfd);

        assert!(f.platform.requests.lock().unwrap().is_empty());
    }

    #[test]
    fn output_port_write_can_reset() {
        let mut f = fixture();

        f.command(CMD_WRITE_OUTPUT_PORT);
        f.data_write(0x03);
        assert!(f.platform.requests.lock().unwrap().is_empty());
        f.command(CMD_WRITE_OUTPUT_PORT);
        f.data_write(0x02);

        assert_eq!(
            *f.platform.requests.lock().unwrap(),
            [PlatformRequest::Reset]
        );
        f.command(CMD_READ_OUTPUT_PORT);
        assert_eq!(f.drain(), [0x02]);
    }

    #[test]
    fn self_tests_pass() {
        let mut f = fixture();

        f.command(CMD_SELF_TEST);
        assert_eq!(f.drain(), [SELF_TEST_PASSED]);
        f.command(CMD_TEST_KEYBOARD);
        assert_eq!(f.drain(), [PORT_TEST_PASSED]);
        f.command(CMD_TEST_AUX);
        assert_eq!(f.drain(), [PORT_TEST_PASSED]);
    }

    #[test]
    fn command_byte_round_trips() {
        let mut f = fixture();
        f.command(CMD_READ_CTR);
        assert_eq!(f.drain(), [CTR_DEFAULT]);

        f.command(CMD_WRITE_CTR);
        f.data_write(0x30);
        f.command(CMD_READ_CTR);

        assert_eq!(f.drain(), [0x30]);
        assert_eq!(f.status() & STATUS_SYSTEM_FLAG, 0);
    }

    #[test]
    fn port_enable_commands_change_ctr() {
        let mut f = fixture();

        f.command(CMD_ENABLE_AUX);
        f.command(CMD_DISABLE_KEYBOARD);
        f.command(CMD_READ_CTR);
        let ctr = f.drain()[0];
        assert_eq!(ctr & CTR_AUX_DISABLED, 0);
        assert_ne!(ctr & CTR_KEYBOARD_DISABLED, 0);

        f.command(CMD_DISABLE_AUX);
        f.command(CMD_ENABLE_KEYBOARD);
        f.command(CMD_READ_CTR);
        let ctr = f.drain()[0];
        assert_ne!(ctr & CTR_AUX_DISABLED, 0);
        assert_eq!(ctr & CTR_KEYBOARD_DISABLED, 0);
    }

    #[test]
    fn status_reports_command_and_aux_bits() {
        let mut f = fixture();
        f.command(CMD_WRITE_AUX_OUTPUT);
        assert_ne!(f.status() & STATUS_LAST_WAS_COMMAND, 0);

        f.data_write(0x5a);

        let status = f.status();
        assert_eq!(status & STATUS_LAST_WAS_COMMAND, 0);
        assert_ne!(status & STATUS_AUX_DATA, 0);
        assert_ne!(status & STATUS_OUTPUT_FULL, 0);
        assert_eq!(f.data(), 0x5a);
        assert_eq!(f.status() & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA), 0);
    }

    #[test]
    fn aux_device_is_absent() {
        let mut f = fixture();

        f.command(CMD_WRITE_AUX);
        f.data_write(0xf2);

        assert_eq!(f.drain(), [KBD_RESEND]);
    }

    #[test]
    fn keyboard_answers_reset_and_identify() {
        let mut f = fixture();

        f.data_write(KBD_CMD_RESET);
        assert_eq!(f.drain(), [KBD_ACK, KBD_SELF_TEST_PASSED]);
        f.data_write(KBD_CMD_IDENTIFY);
        assert_eq!(f.drain(), [KBD_ACK, 0xab, 0x41]);
        f.data_write(KBD_CMD_ECHO);
        assert_eq!(f.drain(), [KBD_CMD_ECHO]);
        f.data_write(KBD_CMD_SET_LEDS);
        f.data_write(0x07);
        assert_eq!(f.drain(), [KBD_ACK, KBD_ACK]);
        f.data_write(KBD_CMD_SCANCODE_SET);
        f.data_write(0);
        assert_eq!(f.drain(), [KBD_ACK, KBD_ACK, 2]);
    }

    #[test]
    fn keyboard_interrupt_follows_ctr() {
        let mut f = fixture();

        f.command(CMD_SELF_TEST);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), 1);
        f.drain();

        f.command(CMD_WRITE_CTR);
        f.data_write(CTR_SYSTEM_FLAG);
        f.chip.take();
        f.command(CMD_SELF_TEST);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), 0);

        // Enabling the interrupt with a byte waiting raises it.
        f.command(CMD_WRITE_CTR);
        f.data_write(CTR_SYSTEM_FLAG | CTR_KEYBOARD_INT);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), 1);
    }

    #[test]
    fn aux_interrupt_uses_line_12() {
        let mut f = fixture();
        f.command(CMD_WRITE_CTR);
        f.data_write(CTR_AUX_INT);
        f.chip.take();

        f.command(CMD_WRITE_AUX_OUTPUT);
        f.data_write(0x11);

        assert_eq!(f.chip.rising_edges(AUX_IRQ), 1);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), 0);
    }

    #[test]
    fn each_queued_byte_raises_interrupt() {
        let mut f = fixture();

        assert_eq!(f.i8042.enqueue_keyboard_input(&[0x1e, 0x9e]), 2);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), 1);
        assert_eq!(f.data(), 0x1e);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), 2);
        assert_eq!(f.data(), 0x9e);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), 2);
    }

    #[test]
    fn output_queue_is_bounded() {
        let mut f = fixture();

        let queued = f.i8042.enqueue_keyboard_input(&[0x1e; 100]);

        assert_eq!(queued, OUTPUT_QUEUE_LIMIT);
        assert_eq!(f.drain().len(), OUTPUT_QUEUE_LIMIT);
    }

    #[test]
    fn empty_buffer_repeats_last_byte() {
        let mut f = fixture();
        f.command(CMD_SELF_TEST);
        f.drain();

        assert_eq!(f.data(), SELF_TEST_PASSED);
        assert_eq!(f.status() & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let mut f = fixture();

        let mut wide = [0u8; 2];
        f.i8042.read(DATA_OFFSET, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        f.i8042.write(COMMAND_OFFSET, &[0xfe, 0xfe]);
        f.i8042.write(COMMAND_OFFSET, &[]);
        f.i8042.write(2, &[0xfe]);
        let mut byte = [0u8];
        f.i8042.read(u64::MAX, &mut byte);
        f.command(0x01);

        assert_eq!(byte, [0xff]);
        assert!(f.platform.requests.lock().unwrap().is_empty());
        assert_eq!(f.i8042.stats().ignored_accesses, 6);
    }
}
