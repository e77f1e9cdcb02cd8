//! A 16550A UART (COM1 at I/O port 0x3F8, IRQ 4), built on `vm-superio`'s register model.
//!
//! Transmitted bytes go to any [`std::io::Write`] sink. Input from the host goes in with
//! [`Serial::enqueue_input`] into the UART's 64-byte receive FIFO and raises the
//! interrupt by pulsing a line of an [`IrqChip`]. The FIFO is bounded, so the VM checks
//! [`Serial::input_capacity`] before it reads more from the host and registers a hook
//! with [`Serial::set_input_drained_hook`] to learn when the guest has emptied the FIFO.
//!
//! Register offsets from the base port, as in the 16550A data sheet:
//!
//! | offset | read | write |
//! | --- | --- | --- |
//! | 0 | RBR (receive buffer); DLL when LCR.DLAB = 1 | THR (transmit); DLL |
//! | 1 | IER (interrupt enable); DLM when LCR.DLAB = 1 | IER; DLM |
//! | 2 | IIR (interrupt identification) | FCR (FIFO control, ignored) |
//! | 3 | LCR (line control) | LCR |
//! | 4 | MCR (modem control) | MCR |
//! | 5 | LSR (line status) | ignored |
//! | 6 | MSR (modem status) | ignored |
//! | 7 | SCR (scratch) | SCR |
//!
//! Only single-byte accesses reach the registers: wider ones read as all ones and drop
//! their writes, and are counted.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::serial::{Error as UartError, SerialEvents};
use vm_superio::Trigger;

use super::{fill_unclaimed, BusDevice, DeviceWindow, GuestErrorLog};
use crate::hypervisor::{HypervisorError, IrqChip};

/// Base I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// ISA interrupt line (and GSI) of COM1.
pub const COM1_IRQ: u32 = 4;
/// Number of I/O ports a 16550 decodes.
pub const SERIAL_PORT_LEN: u64 = 8;
/// The bus window of COM1.
pub const COM1_WINDOWS: [DeviceWindow; 1] = [DeviceWindow::new(
    "serial-com1",
    COM1_PORT as u64,
    SERIAL_PORT_LEN,
    0,
)];

/// Name used in log records.
const DEVICE: &str = "serial";

/// An interrupt line on an [`IrqChip`], pulsed once per interrupt the UART raises.
struct IrqLine {
    chip: Arc<dyn IrqChip>,
    gsi: u32,
}

impl Trigger for IrqLine {
    type E = HypervisorError;

    fn trigger(&self) -> Result<(), HypervisorError> {
        self.chip.pulse_irq(self.gsi)
    }
}

/// Hook run when the guest has read the last byte of the receive FIFO.
type DrainedHook = Box<dyn Fn() + Send + Sync>;

/// Counters and the drained hook, shared with the `vm-superio` event callbacks.
#[derive(Default)]
struct Events {
    bytes_out: AtomicU64,
    bytes_lost: AtomicU64,
    input_drained: Mutex<Option<DrainedHook>>,
}

impl SerialEvents for Events {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        self.bytes_out.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        self.bytes_lost.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {
        let hook = self.input_drained.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hook) = hook.as_ref() {
            hook();
        }
    }
}

/// Counters of one UART, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SerialStats {
    /// Bytes the guest transmitted that reached the output sink.
    pub bytes_out: u64,
    /// Bytes the guest transmitted that the output sink failed to take.
    pub bytes_lost: u64,
    /// Interrupts that the interrupt controller failed to take.
    pub irq_failures: u64,
    /// Guest accesses ignored for a wrong size or an offset outside the UART.
    pub ignored_accesses: u64,
}

/// The output sink type of [`Serial`].
pub type SerialOutput = Box<dyn Write + Send>;

/// A 16550A UART on the port-I/O bus.
pub struct Serial {
    uart: vm_superio::Serial<IrqLine, Arc<Events>, SerialOutput>,
    events: Arc<Events>,
    ignored_accesses: GuestErrorLog,
    irq_failures: GuestErrorLog,
    output_failures: GuestErrorLog,
}

impl Serial {
    /// Creates a UART that writes transmitted bytes to `out` and raises its interrupt by
    /// pulsing `gsi` on `irq_chip` ([`COM1_IRQ`] for COM1).
    pub fn new(irq_chip: Arc<dyn IrqChip>, gsi: u32, out: SerialOutput) -> Self {
        let events = Arc::new(Events::default());
        let line = IrqLine {
            chip: irq_chip,
            gsi,
        };
        Serial {
            uart: vm_superio::Serial::with_events(line, events.clone(), out),
            events,
            ignored_accesses: GuestErrorLog::default(),
            irq_failures: GuestErrorLog::default(),
            output_failures: GuestErrorLog::default(),
        }
    }

    /// Appends host input to the receive FIFO and raises the receive interrupt if the
    /// guest enabled it. Returns how many bytes the FIFO took: fewer than `input.len()`,
    /// possibly 0, when it fills up, and 0 while the guest keeps the UART in loopback mode.
    /// The VM keeps the rest and retries after the drained hook runs.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let before = self.uart.fifo_capacity();
        match self.uart.enqueue_raw_bytes(input) {
            Ok(_) | Err(UartError::FullFifo) => {}
            Err(UartError::Trigger(e)) => self.irq_failures.record(
                DEVICE,
                format_args!("failed to raise the receive interrupt: {e}"),
            ),
            Err(UartError::IOError(e)) => self
                .output_failures
                .record(DEVICE, format_args!("input error: {e}")),
        }
        before - self.uart.fifo_capacity()
    }

    /// Returns how many more input bytes the receive FIFO takes now.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Registers `hook`, replacing any earlier one, to run each time a guest read leaves
    /// the receive FIFO empty. The hook runs on the vCPU thread inside the bus access, so
    /// it must only signal the event loop (write an eventfd, set a flag), never block or
    /// touch this UART. It may run more than once per drain, because a guest that reads
    /// the empty receive buffer again runs it again.
    pub fn set_input_drained_hook(&self, hook: DrainedHook) {
        *self
            .events
            .input_drained
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Returns the UART's counters.
    pub fn stats(&self) -> SerialStats {
        SerialStats {
            bytes_out: self.events.bytes_out.load(Ordering::Relaxed),
            bytes_lost: self.events.bytes_lost.load(Ordering::Relaxed),
            irq_failures: self.irq_failures.count(),
            ignored_accesses: self.ignored_accesses.count(),
        }
    }

    /// Returns the register offset of a well-formed single-byte access, or counts the
    /// access as ignored.
    fn register(&mut self, offset: u64, len: usize, kind: &str) -> Option<u8> {
        if len == 1 && offset < SERIAL_PORT_LEN {
            return Some(offset as u8);
        }
        self.ignored_accesses.record(
            DEVICE,
            format_args!("ignored {len}-byte {kind} at offset {offset:#x}: only 1-byte accesses to offsets 0-7 are valid"),
        );
        None
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.register(offset, data.len(), "read") {
            Some(register) => data[0] = self.uart.read(register),
            None => fill_unclaimed(data),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(register) = self.register(offset, data.len(), "write") else {
            return;
        };
        match self.uart.write(register, data[0]) {
            Ok(()) | Err(UartError::FullFifo) => {}
            Err(UartError::Trigger(e)) => self.irq_failures.record(
                DEVICE,
                format_args!("failed to raise the serial interrupt: {e}"),
            ),
            // The byte is already counted as lost through `Events::tx_lost_byte`.
            Err(UartError::IOError(e)) => self.output_failures.record(
                DEVICE,
                format_args!("failed to write guest output to the serial sink: {e}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::core::devices::test_utils::RecordingIrqChip;

    const THR: u64 = 0;
    const RBR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;

    /// A sink that tests can read after handing it to the UART.
    #[derive(Clone, Default)]
    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A sink whose every write fails, as a closed pipe would.
    struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial_with_buffer() -> (Serial, Arc<RecordingIrqChip>, SharedBuffer) {
        let chip = Arc::new(RecordingIrqChip::default());
        let buffer = SharedBuffer::default();
        let serial = Serial::new(chip.clone(), COM1_IRQ, Box::new(buffer.clone()));
        (serial, chip, buffer)
    }

    fn read(serial: &mut Serial, offset: u64) -> u8 {
        let mut data = [0u8];
        serial.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn transmitted_bytes_reach_sink() {
        let (mut serial, _, buffer) = serial_with_buffer();

        for &byte in b"login: " {
            serial.write(THR, &[byte]);
        }

        assert_eq!(buffer.0.lock().unwrap().as_slice(), b"login: ");
        assert_eq!(serial.stats().bytes_out, 7);
        assert_ne!(read(&mut serial, LSR) & LSR_THR_EMPTY, 0);
    }

    #[test]
    fn transmit_raises_thre_interrupt() {
        let (mut serial, chip, _) = serial_with_buffer();
        serial.write(IER, &[IER_THRE]);
        assert_eq!(
            chip.rising_edges(COM1_IRQ),
            1,
            "enabling THRE fires at once"
        );
        assert_eq!(read(&mut serial, IIR) & 0x0f, 0x02, "THR empty pending");
        assert_eq!(
            read(&mut serial, IIR) & 0x0f,
            0x01,
            "reading IIR cleared it"
        );
        chip.take();

        serial.write(THR, b"x");

        assert_eq!(chip.take(), vec![(COM1_IRQ, true), (COM1_IRQ, false)]);
        assert_eq!(read(&mut serial, IIR) & 0x0f, 0x02, "THR empty pending");
    }

    #[test]
    fn input_raises_receive_interrupt() {
        let (mut serial, chip, _) = serial_with_buffer();
        serial.write(IER, &[IER_RDA]);

        assert_eq!(serial.enqueue_input(b"ls"), 2);

        assert_eq!(chip.rising_edges(COM1_IRQ), 1);
        assert_eq!(read(&mut serial, IIR) & 0x0f, 0x04, "data available");
        assert_ne!(read(&mut serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read(&mut serial, RBR), b'l');
        assert_eq!(read(&mut serial, RBR), b's');
        assert_eq!(read(&mut serial, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_without_rda_enabled_is_silent() {
        let (mut serial, chip, _) = serial_with_buffer();

        assert_eq!(serial.enqueue_input(b"a"), 1);

        assert!(chip.take().is_empty());
        assert_eq!(read(&mut serial, RBR), b'a');
    }

    #[test]
    fn input_stops_at_fifo_capacity() {
        let (mut serial, _, _) = serial_with_buffer();
        let capacity = serial.input_capacity();
        assert!(capacity > 0);

        let input = vec![b'x'; capacity + 10];
        assert_eq!(serial.enqueue_input(&input), capacity);
        assert_eq!(serial.input_capacity(), 0);
        assert_eq!(serial.enqueue_input(b"y"), 0);

        read(&mut serial, RBR);
        assert_eq!(serial.input_capacity(), 1);
        assert_eq!(serial.enqueue_input(b"yz"), 1);
    }

    #[test]
    fn drained_hook_runs_on_last_read() {
        let (mut serial, _, _) = serial_with_buffer();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        serial.set_input_drained_hook(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        serial.enqueue_input(b"ab");

        read(&mut serial, RBR);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        read(&mut serial, RBR);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn divisor_latch_and_scratch_round_trip() {
        let (mut serial, _, buffer) = serial_with_buffer();

        serial.write(LCR, &[0x83]);
        serial.write(0, &[0x01]);
        serial.write(1, &[0x00]);
        assert_eq!(read(&mut serial, 0), 0x01);
        serial.write(LCR, &[0x03]);
        serial.write(SCR, &[0x5a]);

        assert_eq!(read(&mut serial, SCR), 0x5a);
        assert!(
            buffer.0.lock().unwrap().is_empty(),
            "DLL write is no output"
        );
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let (mut serial, chip, buffer) = serial_with_buffer();

        let mut wide = [0u8; 2];
        serial.read(THR, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        let mut empty: [u8; 0] = [];
        serial.read(THR, &mut empty);
        serial.write(THR, b"ab");
        serial.write(THR, &[]);
        serial.write(SERIAL_PORT_LEN, b"c");
        serial.write(u64::MAX, b"d");
        let mut byte = [0u8];
        serial.read(u64::MAX, &mut byte);

        assert_eq!(byte, [0xff]);
        assert!(buffer.0.lock().unwrap().is_empty());
        assert!(chip.take().is_empty());
        assert_eq!(serial.stats().ignored_accesses, 7);
    }

    #[test]
    fn failing_sink_counts_lost_bytes() {
        let chip = Arc::new(RecordingIrqChip::default());
        let mut serial = Serial::new(chip, COM1_IRQ, Box::new(BrokenPipe));

        serial.write(THR, b"a");
        serial.write(THR, b"b");

        let stats = serial.stats();
        assert_eq!(stats.bytes_lost, 2);
        assert_eq!(stats.bytes_out, 0);
    }

    #[test]
    fn failing_irq_chip_is_counted() {
        let chip = Arc::new(RecordingIrqChip {
            fail: true,
            ..Default::default()
        });
        let mut serial = Serial::new(chip, COM1_IRQ, Box::new(io::sink()));
        serial.write(IER, &[IER_RDA]);

        assert_eq!(
            serial.enqueue_input(b"q"),
            1,
            "the byte still enters the FIFO"
        );
        assert_eq!(serial.stats().irq_failures, 1);
        assert_eq!(read(&mut serial, RBR), b'q');
    }
}
