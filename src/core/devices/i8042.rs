//! An i8042 keyboard controller (data port 0x60, status and command port 0x64).
//!
//! The model covers what Linux's i8042 and atkbd drivers use while probing. That is the
//! controller command byte (CTR), the self tests, enabling and disabling both ports, the
//! output buffer with its status bits and AUX loopback. Behind it sits a keyboard that
//! responds to reset, identify, echo, scancode-set selection and scanning on/off, and that
//! the VMM can make type keys ([`I8042::send_ctrl_alt_del`]). No PS/2 mouse is attached:
//! bytes sent to the AUX device come back as 0xFE (resend), so a mouse driver gives up at
//! once. The CPU reset line (command 0xFE, or
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
//!
//! Keystrokes travel as on a PC. The keyboard sends its bytes in the scancode set that the
//! guest selected (set 2 after reset) and keeps them while its scanning is off (command
//! 0xF5) or the controller's keyboard port is disabled (CTR bit 4). The controller takes
//! one byte whenever its output buffer is empty, translates it to set 1 while CTR bit 6 is
//! set (Linux's atkbd driver keeps the firmware's translation on and reads set 1), and
//! raises IRQ 1 if CTR bit 0 allows.

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
const KBD_CMD_ENABLE_SCANNING: u8 = 0xf4;
const KBD_CMD_DISABLE_SCANNING: u8 = 0xf5;
const KBD_CMD_RESET: u8 = 0xff;
/// Scancode set of a keyboard after reset.
const DEFAULT_SCANCODE_SET: u8 = 2;
/// Identify reply of an MF2 keyboard behind a translating controller.
const KBD_ID_MF2_TRANSLATED: [u8; 2] = [0xab, 0x41];
/// Identify reply of an MF2 keyboard.
const KBD_ID_MF2: [u8; 2] = [0xab, 0x83];

/// Keystroke bytes that the keyboard holds while it cannot send them. Ctrl-Alt-Del, the
/// longest sequence the VMM types, takes 11 bytes in scancode set 2.
const KEYBOARD_QUEUE_LIMIT: usize = 64;

/// Set-2 prefix of a key release.
const SET2_BREAK_PREFIX: u8 = 0xf0;
/// Prefix of the extended keys, the same in sets 1 and 2.
const EXTENDED_PREFIX: u8 = 0xe0;
/// Set-1 bit that marks a key release.
const SET1_BREAK_BIT: u8 = 0x80;

/// Ctrl-Alt-Del in scancode set 1: press left Ctrl, left Alt and Delete, then release them
/// in reverse order.
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// Ctrl-Alt-Del in scancode set 2, the same key presses as [`CTRL_ALT_DEL_SET1`].
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// Translates a set-2 make code to set 1, as the controller does while CTR bit 6 is set.
///
/// NOTE: the table covers the keys that the VMM types (Ctrl, Alt, Delete) and a few common
/// ones. Other codes pass through untranslated and are counted as ignored accesses.
fn translate_set2(code: u8) -> Option<u8> {
    Some(match code {
        0x76 => 0x01, // Escape
        0x16 => 0x02, // 1
        0x1e => 0x03, // 2
        0x66 => 0x0e, // Backspace
        0x0d => 0x0f, // Tab
        0x5a => 0x1c, // Enter
        0x14 => 0x1d, // left Ctrl
        0x1c => 0x1e, // A
        0x12 => 0x2a, // left Shift
        0x59 => 0x36, // right Shift
        0x11 => 0x38, // left Alt
        0x29 => 0x39, // Space
        0x58 => 0x3a, // Caps Lock
        0x71 => 0x53, // Delete (with the E0 prefix), keypad period without it
        _ => return None,
    })
}

/// The controller's output buffer has room for one byte. Replies queue behind it up to
/// this many bytes, which covers the longest reply (ACK plus a two-byte ID) several times.
const OUTPUT_QUEUE_LIMIT: usize = 16;

/// Port that a byte in the output buffer came from.
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
    /// Keystroke bytes that the VMM typed and the keyboard dropped because its queue
    /// was full.
    pub dropped_keystrokes: u64,
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
    /// Keystroke bytes, in the keyboard's scancode set, that the keyboard has yet to send.
    keystrokes: VecDeque<u8>,
    /// Scancode set selected with keyboard command 0xF0: 1, 2 or 3.
    scancode_set: u8,
    /// Whether the keyboard sends keystrokes (commands 0xF4 and 0xF5).
    scanning: bool,
    /// The translator saw a set-2 release prefix and sets bit 7 of the next code.
    translating_break: bool,
    resets: u64,
    dropped_keystrokes: u64,
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
            keystrokes: VecDeque::new(),
            scancode_set: DEFAULT_SCANCODE_SET,
            scanning: true,
            translating_break: false,
            resets: 0,
            dropped_keystrokes: 0,
            ignored_accesses: GuestErrorLog::default(),
            irq_failures: GuestErrorLog::default(),
        }
    }

    /// Makes the keyboard send `bytes`, which are scancodes in the keyboard's current set
    /// (see [`I8042::scancode_set`]), as if keys were pressed. Returns how many bytes were
    /// queued. The rest are dropped once the keyboard holds [`KEYBOARD_QUEUE_LIMIT`] bytes.
    pub fn enqueue_keyboard_input(&mut self, bytes: &[u8]) -> usize {
        let room = KEYBOARD_QUEUE_LIMIT - self.keystrokes.len();
        let queued = bytes.len().min(room);
        self.keystrokes.extend(&bytes[..queued]);
        let dropped = (bytes.len() - queued) as u64;
        if dropped > 0 {
            self.dropped_keystrokes += dropped;
            tracing::warn!(dropped, "i8042 keyboard queue is full; dropping keystrokes");
        }
        self.deliver_keystrokes();
        queued
    }

    /// Types Ctrl-Alt-Del on the keyboard: press and release, in the scancode set that
    /// the guest selected. A PC guest takes it as a request to shut down or reboot (Linux
    /// runs its `ctrlaltdel` action). Returns false if the keyboard's queue had no room
    /// for the whole sequence, and then nothing is queued.
    pub fn send_ctrl_alt_del(&mut self) -> bool {
        // NOTE: set 3 has no Ctrl-Alt-Del sequence of its own here; it gets set 2's.
        let sequence: &[u8] = if self.scancode_set == 1 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL_SET2
        };
        if KEYBOARD_QUEUE_LIMIT - self.keystrokes.len() < sequence.len() {
            self.dropped_keystrokes += sequence.len() as u64;
            tracing::warn!("i8042 keyboard queue is full; Ctrl-Alt-Del was not typed");
            return false;
        }
        tracing::info!(
            scancode_set = self.scancode_set,
            translated = self.ctr & CTR_TRANSLATE != 0,
            "typing Ctrl-Alt-Del on the i8042 keyboard"
        );
        self.enqueue_keyboard_input(sequence);
        true
    }

    /// Returns the scancode set that the guest selected: 2 after reset.
    pub fn scancode_set(&self) -> u8 {
        self.scancode_set
    }

    /// Returns the controller's counters.
    pub fn stats(&self) -> I8042Stats {
        I8042Stats {
            resets: self.resets,
            ignored_accesses: self.ignored_accesses.count(),
            irq_failures: self.irq_failures.count(),
            dropped_keystrokes: self.dropped_keystrokes,
        }
    }

    /// Moves held keystrokes into the output buffer, one byte each time it is empty, while
    /// the keyboard scans and its port is enabled. Bytes that translation swallows (the
    /// set-2 release prefix) do not fill the buffer, so the loop takes the next one.
    fn deliver_keystrokes(&mut self) {
        while self.output.is_empty() && self.scanning && self.ctr & CTR_KEYBOARD_DISABLED == 0 {
            let Some(byte) = self.keystrokes.pop_front() else {
                return;
            };
            if let Some(byte) = self.translate(byte) {
                self.push_output(byte, Source::Keyboard);
            }
        }
    }

    /// Returns the byte that the controller puts in its output buffer for keyboard byte
    /// `byte`, or `None` when translation absorbs it.
    fn translate(&mut self, byte: u8) -> Option<u8> {
        if self.ctr & CTR_TRANSLATE == 0 {
            return Some(byte);
        }
        if byte == SET2_BREAK_PREFIX {
            self.translating_break = true;
            return None;
        }
        let translated = match byte {
            EXTENDED_PREFIX => EXTENDED_PREFIX,
            _ => match translate_set2(byte) {
                Some(code) => code,
                None => {
                    self.ignored_accesses.record(
                        DEVICE,
                        format_args!("passed set-2 scancode {byte:#04x} through untranslated: it is missing from the translation table"),
                    );
                    byte
                }
            },
        };
        if translated == EXTENDED_PREFIX {
            return Some(translated);
        }
        let release = std::mem::take(&mut self.translating_break);
        Some(if release {
            translated | SET1_BREAK_BIT
        } else {
            translated
        })
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
            self.deliver_keystrokes();
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
            CMD_ENABLE_KEYBOARD => {
                self.ctr &= !CTR_KEYBOARD_DISABLED;
                self.deliver_keystrokes();
            }
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
                self.deliver_keystrokes();
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
                self.keystrokes.clear();
                self.scancode_set = DEFAULT_SCANCODE_SET;
                self.scanning = true;
                self.push_output(KBD_ACK, Source::Keyboard);
                self.push_output(KBD_SELF_TEST_PASSED, Source::Keyboard);
            }
            KBD_CMD_ENABLE_SCANNING => {
                self.push_output(KBD_ACK, Source::Keyboard);
                self.scanning = true;
            }
            KBD_CMD_DISABLE_SCANNING => {
                self.push_output(KBD_ACK, Source::Keyboard);
                self.scanning = false;
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
            // Set defaults (0xF6) and the rest are acknowledged.
            _ => {
                self.push_output(KBD_ACK, Source::Keyboard);
            }
        }
    }

    fn keyboard_parameter(&mut self, command: u8, value: u8) {
        self.push_output(KBD_ACK, Source::Keyboard);
        if command != KBD_CMD_SCANCODE_SET {
            return;
        }
        match value {
            // Parameter 0 queries the current set.
            0 => {
                self.push_output(self.scancode_set, Source::Keyboard);
            }
            1..=3 => self.scancode_set = value,
            _ => self.ignored_accesses.record(
                DEVICE,
                format_args!("ignored invalid scancode set {value:#04x}: sets 1 to 3 exist"),
            ),
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
    fn each_keystroke_raises_interrupt() {
        let mut f = fixture();
        f.command(CMD_WRITE_CTR);
        f.data_write(CTR_KEYBOARD_INT);
        f.chip.take();

        // Without translation the bytes arrive as the keyboard sends them.
        assert_eq!(f.i8042.enqueue_keyboard_input(&[0x1c, 0xf0, 0x1c]), 3);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), 1);
        assert_eq!(f.data(), 0x1c);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), 2);
        assert_eq!(f.data(), 0xf0);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), 3);
        assert_eq!(f.data(), 0x1c);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), 3);
        assert_eq!(f.status() & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn keyboard_queue_is_bounded() {
        let mut f = fixture();

        let queued = f.i8042.enqueue_keyboard_input(&[0x1c; 100]);

        assert_eq!(queued, KEYBOARD_QUEUE_LIMIT);
        assert_eq!(
            f.i8042.stats().dropped_keystrokes,
            100 - KEYBOARD_QUEUE_LIMIT as u64
        );
        assert_eq!(f.drain().len(), KEYBOARD_QUEUE_LIMIT);
    }

    #[test]
    fn ctrl_alt_del_is_translated_to_set1() {
        let mut f = fixture();
        f.chip.take();

        assert!(f.i8042.send_ctrl_alt_del());

        assert_eq!(f.drain(), CTRL_ALT_DEL_SET1);
        assert_eq!(f.chip.rising_edges(KEYBOARD_IRQ), CTRL_ALT_DEL_SET1.len());
    }

    #[test]
    fn ctrl_alt_del_untranslated_is_set2() {
        let mut f = fixture();
        f.command(CMD_WRITE_CTR);
        f.data_write(CTR_KEYBOARD_INT);

        assert!(f.i8042.send_ctrl_alt_del());

        assert_eq!(f.drain(), CTRL_ALT_DEL_SET2);
    }

    #[test]
    fn ctrl_alt_del_follows_selected_set() {
        let mut f = fixture();
        f.command(CMD_WRITE_CTR);
        f.data_write(CTR_KEYBOARD_INT);
        f.data_write(KBD_CMD_SCANCODE_SET);
        f.data_write(1);
        assert_eq!(f.drain(), [KBD_ACK, KBD_ACK]);
        assert_eq!(f.i8042.scancode_set(), 1);

        assert!(f.i8042.send_ctrl_alt_del());

        assert_eq!(f.drain(), CTRL_ALT_DEL_SET1);
        f.data_write(KBD_CMD_SCANCODE_SET);
        f.data_write(0);
        assert_eq!(f.drain(), [KBD_ACK, KBD_ACK, 1]);
    }

    #[test]
    fn keystrokes_wait_for_enabled_port() {
        let mut f = fixture();
        f.command(CMD_DISABLE_KEYBOARD);

        assert!(f.i8042.send_ctrl_alt_del());
        assert_eq!(f.status() & STATUS_OUTPUT_FULL, 0);

        f.command(CMD_ENABLE_KEYBOARD);
        assert_eq!(f.drain(), CTRL_ALT_DEL_SET1);
    }

    #[test]
    fn keystrokes_wait_for_scanning() {
        let mut f = fixture();
        f.data_write(KBD_CMD_DISABLE_SCANNING);
        assert_eq!(f.drain(), [KBD_ACK]);

        assert!(f.i8042.send_ctrl_alt_del());
        assert_eq!(f.status() & STATUS_OUTPUT_FULL, 0);

        f.data_write(KBD_CMD_ENABLE_SCANNING);
        let mut bytes = f.drain();
        assert_eq!(bytes.remove(0), KBD_ACK);
        assert_eq!(bytes, CTRL_ALT_DEL_SET1);
    }

    #[test]
    fn keyboard_reset_restores_set2_and_drops_keys() {
        let mut f = fixture();
        f.data_write(KBD_CMD_DISABLE_SCANNING);
        f.data_write(KBD_CMD_SCANCODE_SET);
        f.data_write(1);
        f.drain();
        assert!(f.i8042.send_ctrl_alt_del());

        f.data_write(KBD_CMD_RESET);

        assert_eq!(f.drain(), [KBD_ACK, KBD_SELF_TEST_PASSED]);
        assert_eq!(f.i8042.scancode_set(), DEFAULT_SCANCODE_SET);
    }

    #[test]
    fn full_keyboard_queue_rejects_whole_sequence() {
        let mut f = fixture();
        f.command(CMD_DISABLE_KEYBOARD);
        f.i8042
            .enqueue_keyboard_input(&[0x1c; KEYBOARD_QUEUE_LIMIT - 4]);

        assert!(!f.i8042.send_ctrl_alt_del());

        f.command(CMD_ENABLE_KEYBOARD);
        assert_eq!(f.drain().len(), KEYBOARD_QUEUE_LIMIT - 4);
    }

    #[test]
    fn invalid_scancode_set_is_ignored() {
        let mut f = fixture();

        f.data_write(KBD_CMD_SCANCODE_SET);
        f.data_write(7);

        assert_eq!(f.drain(), [KBD_ACK, KBD_ACK]);
        assert_eq!(f.i8042.scancode_set(), DEFAULT_SCANCODE_SET);
        assert_eq!(f.i8042.stats().ignored_accesses, 1);
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
