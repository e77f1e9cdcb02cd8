use std::sync::Mutex;

use super::*;
use crate::core::memory::create_guest_memory;
use crate::hypervisor::HypervisorError;

/// Records interrupts instead of delivering them.
#[derive(Default)]
struct RecordingIrqChip {
    lines: Mutex<Vec<(u32, bool)>>,
    messages: Mutex<Vec<(u64, u32)>>,
}

impl IrqChip for RecordingIrqChip {
    fn set_irq(&self, gsi: u32, level: bool) -> Result<(), HypervisorError> {
        self.lines.lock().unwrap().push((gsi, level));
        Ok(())
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<(), HypervisorError> {
        self.messages.lock().unwrap().push((address, data));
        Ok(())
    }
}

/// What the test device saw, shared with the test body.
#[derive(Default)]
struct Observed {
    acked_features: u64,
    activated_queues: Vec<(u16, bool)>,
    notified: Vec<u16>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    resets: u32,
}

struct TestDevice {
    observed: Arc<Mutex<Observed>>,
    config: [u8; 8],
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        super::super::device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 128]
    }
    fn features(&self) -> u64 {
        1 << 5
    }
    fn set_acked_features(&mut self, features: u64) {
        self.observed.lock().unwrap().acked_features = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), super::super::VirtioError> {
        let mut observed = self.observed.lock().unwrap();
        observed.activated_queues = queues.iter().map(|q| (q.size(), q.ready())).collect();
        observed.interrupt = Some(interrupt);
        Ok(())
    }
    fn queue_notify(&mut self, queue: u16) {
        self.observed.lock().unwrap().notified.push(queue);
    }
    fn reset(&mut self) {
        self.observed.lock().unwrap().resets += 1;
    }
}

struct Fixture {
    transport: VirtioPciDevice,
    observed: Arc<Mutex<Observed>>,
    irq: Arc<RecordingIrqChip>,
}

fn fixture() -> Fixture {
    let observed = Arc::new(Mutex::new(Observed::default()));
    let irq = Arc::new(RecordingIrqChip::default());
    let device = TestDevice {
        observed: observed.clone(),
        config: [1, 2, 3, 4, 5, 6, 7, 8],
    };
    let transport = VirtioPciDevice::new(
        "test",
        Box::new(device),
        create_guest_memory(4).unwrap(),
        irq.clone(),
        0xe000_0000,
        10,
    );
    Fixture {
        transport,
        observed,
        irq,
    }
}

fn write32(transport: &mut VirtioPciDevice, offset: u64, value: u32) {
    transport.bar_write(0, offset, &value.to_le_bytes());
}

fn write16(transport: &mut VirtioPciDevice, offset: u64, value: u16) {
    transport.bar_write(0, offset, &value.to_le_bytes());
}

fn read32(transport: &mut VirtioPciDevice, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    transport.bar_read(0, offset, &mut data);
    u32::from_le_bytes(data)
}

fn read16(transport: &mut VirtioPciDevice, offset: u64) -> u16 {
    let mut data = [0u8; 2];
    transport.bar_read(0, offset, &mut data);
    u16::from_le_bytes(data)
}

/// Drives the driver side of initialisation as Linux's virtio_pci_modern does.
fn initialise(transport: &mut VirtioPciDevice, accept_version_1: bool) {
    transport.bar_write(0, 0x14, &[0]);
    transport.bar_write(0, 0x14, &[status::ACKNOWLEDGE]);
    transport.bar_write(0, 0x14, &[status::ACKNOWLEDGE | status::DRIVER]);

    write32(transport, 0x00, 1);
    let high = read32(transport, 0x04);
    assert_eq!(high & 1, 1, "VERSION_1 must be offered");
    write32(transport, 0x08, 0);
    write32(transport, 0x0c, 1 << 5);
    write32(transport, 0x08, 1);
    write32(transport, 0x0c, if accept_version_1 { 1 } else { 0 });
    transport.bar_write(
        0,
        0x14,
        &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK],
    );
}

fn setup_queue(transport: &mut VirtioPciDevice, index: u16, size: u16, base: u64) {
    write16(transport, 0x16, index);
    write16(transport, 0x18, size);
    for (offset, address) in [(0x20, base), (0x28, base + 0x1000), (0x30, base + 0x2000)] {
        write32(transport, offset, address as u32);
        write32(transport, offset + 4, (address >> 32) as u32);
    }
    write16(transport, 0x1c, 1);
}

#[test]
fn driver_initialisation_activates_device() {
    let Fixture {
        mut transport,
        observed,
        ..
    } = fixture();
    initialise(&mut transport, true);
    let mut status_byte = [0u8];
    transport.bar_read(0, 0x14, &mut status_byte);
    assert_ne!(status_byte[0] & status::FEATURES_OK, 0);
    assert_eq!(
        observed.lock().unwrap().acked_features,
        VIRTIO_F_VERSION_1 | 1 << 5
    );

    assert_eq!(read16(&mut transport, 0x12), 2);
    setup_queue(&mut transport, 0, 64, 0x10000);
    setup_queue(&mut transport, 1, 128, 0x20000);
    transport.bar_write(
        0,
        0x14,
        &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK],
    );

    assert_eq!(
        observed.lock().unwrap().activated_queues,
        vec![(64, true), (128, true)]
    );

    write16(&mut transport, NOTIFY_OFFSET + 4, 1);
    assert_eq!(observed.lock().unwrap().notified, vec![1]);
}

#[test]
fn driver_without_version_1_is_refused() {
    let Fixture { mut transport, .. } = fixture();
    initialise(&mut transport, false);
    let mut status_byte = [0u8];
    transport.bar_read(0, 0x14, &mut status_byte);
    assert_eq!(status_byte[0] & status::FEATURES_OK, 0);
}

#[test]
fn invalid_queue_size_is_ignored() {
    let Fixture { mut transport, .. } = fixture();
    write16(&mut transport, 0x16, 0);
    write16(&mut transport, 0x18, 100);
    assert_eq!(read16(&mut transport, 0x18), 256);
    write16(&mut transport, 0x18, 512);
    assert_eq!(read16(&mut transport, 0x18), 256);
    // A queue index beyond the device's queues reads as size 0.
    write16(&mut transport, 0x16, 9);
    assert_eq!(read16(&mut transport, 0x18), 0);
}

#[test]
fn device_config_is_readable() {
    let Fixture { mut transport, .. } = fixture();
    assert_eq!(
        read32(&mut transport, DEVICE_CONFIG_OFFSET + 4),
        0x0807_0605
    );
}

#[test]
fn interrupts_without_msix_use_isr_and_intx() {
    let Fixture {
        mut transport,
        observed,
        irq,
    } = fixture();
    initialise(&mut transport, true);
    setup_queue(&mut transport, 0, 64, 0x10000);
    transport.bar_write(0, 0x14, &[0x0f]);

    let interrupt = observed.lock().unwrap().interrupt.clone().unwrap();
    interrupt.notify_queue(0);
    assert_eq!(irq.lines.lock().unwrap().last(), Some(&(10, true)));

    let mut isr = [0u8];
    transport.bar_read(0, ISR_OFFSET, &mut isr);
    assert_eq!(isr[0], ISR_QUEUE);
    assert_eq!(irq.lines.lock().unwrap().last(), Some(&(10, false)));
    transport.bar_read(0, ISR_OFFSET, &mut isr);
    assert_eq!(isr[0], 0, "reading the ISR clears it");
}

#[test]
fn msix_delivers_masks_and_replays_pending() {
    let Fixture {
        mut transport,
        observed,
        irq,
    } = fixture();

    // Enable MSI-X in the capability's message control.
    let control_offset = transport.msix_capability + 2;
    transport.write_config(
        control_offset / 4,
        control_offset % 4,
        &(1u16 << 15).to_le_bytes(),
    );

    // Vector 1: address and data, unmasked.
    let entry = MSIX_TABLE_OFFSET + 16;
    write32(&mut transport, entry, 0xfee0_0000);
    write32(&mut transport, entry + 4, 0);
    write32(&mut transport, entry + 8, 0x41);
    write32(&mut transport, entry + 12, 0);

    initialise(&mut transport, true);
    setup_queue(&mut transport, 0, 64, 0x10000);
    write16(&mut transport, 0x1a, 1);
    assert_eq!(read16(&mut transport, 0x1a), 1);
    transport.bar_write(0, 0x14, &[0x0f]);

    let interrupt = observed.lock().unwrap().interrupt.clone().unwrap();
    interrupt.notify_queue(0);
    assert_eq!(*irq.messages.lock().unwrap(), vec![(0xfee0_0000, 0x41)]);

    // Masked: the message waits in the pending bit array until unmasked.
    write32(&mut transport, entry + 12, 1);
    interrupt.notify_queue(0);
    assert_eq!(irq.messages.lock().unwrap().len(), 1);
    assert_eq!(read32(&mut transport, MSIX_PBA_OFFSET) & 0b10, 0b10);
    write32(&mut transport, entry + 12, 0);
    assert_eq!(irq.messages.lock().unwrap().len(), 2);
    assert_eq!(read32(&mut transport, MSIX_PBA_OFFSET), 0);
}

#[test]
fn out_of_range_vector_reads_as_no_vector() {
    let Fixture { mut transport, .. } = fixture();
    write16(&mut transport, 0x10, 7);
    assert_eq!(read16(&mut transport, 0x10), NO_VECTOR);
}

#[test]
fn status_zero_resets_device() {
    let Fixture {
        mut transport,
        observed,
        ..
    } = fixture();
    initialise(&mut transport, true);
    setup_queue(&mut transport, 0, 64, 0x10000);
    transport.bar_write(0, 0x14, &[0x0f]);
    transport.bar_write(0, 0x14, &[0]);
    assert_eq!(observed.lock().unwrap().resets, 2);
    write16(&mut transport, 0x16, 0);
    assert_eq!(read16(&mut transport, 0x1c), 0);
    assert_eq!(read16(&mut transport, 0x18), 256);
}

#[test]
fn odd_accesses_do_not_panic() {
    let Fixture { mut transport, .. } = fixture();
    let mut data = [0u8; 8];
    for offset in [
        0,
        0x3f,
        0x1000,
        0x2fff,
        0x3ffe,
        0x4000 + 16 * 3,
        0x5fff,
        0x6000,
        0x7fff,
    ] {
        transport.bar_read(0, offset, &mut data[..1]);
        transport.bar_write(0, offset, &data[..1]);
        transport.bar_read(1, offset, &mut data[..4]);
        transport.bar_write(1, offset, &data[..4]);
    }
}
