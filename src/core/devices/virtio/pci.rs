//! The modern virtio-pci transport (virtio 1.x, section "Virtio Over PCI Bus") with MSI-X.
//!
//! BAR 0 (32-bit memory, 32 KiB) holds every register block:
//!
//! | offset   | block                                   |
//! |----------|-----------------------------------------|
//! | 0x0000   | common configuration                    |
//! | 0x1000   | ISR status                              |
//! | 0x2000   | device-specific configuration           |
//! | 0x3000   | queue notifications, 4 bytes per queue  |
//! | 0x4000   | MSI-X table, 16 bytes per vector        |
//! | 0x6000   | MSI-X pending bit array                 |
//!
//! Without MSI-X enabled, interrupts fall back to the ISR register and INTA#.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{status, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::core::devices::pci::config::BAR_COUNT;
use crate::core::devices::pci::{ConfigSpace, MemoryBar, PciDevice, PciIdentity};
use crate::hypervisor::IrqChip;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LENGTH: u64 = 0x40;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
const DEVICE_CONFIG_LENGTH: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between the notification addresses of consecutive queues.
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
/// "No vector" in the MSI-X vector registers.
const NO_VECTOR: u16 = 0xffff;
/// PCI capability ID of vendor-specific capabilities, which virtio uses.
const CAP_VENDOR: u8 = 0x09;
/// PCI capability ID of MSI-X.
const CAP_MSIX: u8 = 0x11;

/// virtio_pci_cap cfg_type values.
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// ISR status bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// One MSI-X table entry.
#[derive(Debug, Clone, Copy, Default)]
struct MsixEntry {
    address: u64,
    data: u32,
    masked: bool,
}

/// MSI-X state shared between the transport and the interrupt object the device holds.
struct MsixState {
    entries: Vec<MsixEntry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
}

/// The interrupt state a device's interrupt object shares with the transport: the MSI-X
/// table, vector assignments, the ISR and the INTx line.
struct InterruptState {
    msix: Mutex<MsixState>,
    /// MSI-X vector of each queue, then the configuration vector last.
    vectors: Mutex<Vec<u16>>,
    isr: AtomicU8,
    irq_chip: Arc<dyn IrqChip>,
    gsi: u32,
}

impl InterruptState {
    fn signal(&self, vector_index: usize, isr_bit: u8) {
        let vector = self
            .vectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(vector_index)
            .copied()
            .unwrap_or(NO_VECTOR);
        let mut msix = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        if msix.enabled {
            if vector == NO_VECTOR {
                return;
            }
            let index = usize::from(vector);
            let Some(entry) = msix.entries.get(index).copied() else {
                return;
            };
            if entry.masked || msix.function_masked {
                msix.pending[index] = true;
                return;
            }
            drop(msix);
            self.send_msi(entry);
            return;
        }
        drop(msix);

        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        if let Err(e) = self.irq_chip.set_irq(self.gsi, true) {
            tracing::warn!(gsi = self.gsi, error = %e, "failed to raise virtio INTx");
        }
    }

    fn send_msi(&self, entry: MsixEntry) {
        if let Err(e) = self.irq_chip.signal_msi(entry.address, entry.data) {
            tracing::warn!(address = format_args!("{:#x}", entry.address), error = %e, "failed to deliver virtio MSI");
        }
    }
}

struct TransportInterrupt {
    state: Arc<InterruptState>,
    queue_count: usize,
}

impl VirtioInterrupt for TransportInterrupt {
    fn notify_queue(&self, queue: u16) {
        self.state.signal(usize::from(queue), ISR_QUEUE);
    }

    fn notify_config(&self) {
        self.state.signal(self.queue_count, ISR_CONFIG);
    }
}

/// Transport-side registers of one queue.
#[derive(Debug, Clone, Copy)]
struct QueueRegisters {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// A virtio device model on the PCI transport.
pub struct VirtioPciDevice {
    name: String,
    config: ConfigSpace,
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: Arc<InterruptState>,
    msix_capability: usize,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    device_status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueRegisters>,
    activated: bool,
}

impl VirtioPciDevice {
    /// Wraps `device` as a PCI function with BAR 0 at `bar_address` and INTA# on `gsi`.
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        irq_chip: Arc<dyn IrqChip>,
        bar_address: u64,
        gsi: u32,
    ) -> Self {
        let device_type = device.device_type();
        let class = match device_type {
            super::device_type::BLOCK => [0x01, 0x00, 0x00],
            super::device_type::NET => [0x02, 0x00, 0x00],
            _ => [0xff, 0x00, 0x00],
        };
        let mut config = ConfigSpace::new(
            PciIdentity {
                vendor_id: 0x1af4,
                device_id: 0x1040 + device_type as u16,
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 0x40,
                revision: 1,
                class,
            },
            1,
        );
        // Report the INTx line so drivers that read it from config space find it.
        config.set_bytes(0x3c, &[gsi as u8]);
        config.add_memory_bar(
            0,
            MemoryBar {
                size: BAR_SIZE,
                is_64bit: false,
            },
            bar_address,
        );

        let queues: Vec<QueueRegisters> = device
            .queue_max_sizes()
            .iter()
            .map(|&max_size| QueueRegisters {
                max_size,
                size: max_size,
                enabled: false,
                desc: 0,
                driver: 0,
                device: 0,
            })
            .collect();
        let vector_count = queues.len() + 1;

        for (cfg_type, offset, length) in [
            (CFG_COMMON, COMMON_OFFSET, COMMON_LENGTH),
            (CFG_ISR, ISR_OFFSET, 1),
            (CFG_DEVICE, DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_LENGTH),
        ] {
            config.add_capability(
                CAP_VENDOR,
                &virtio_cap_body(cfg_type, offset, length, None),
                &[],
            );
        }
        let notify_length = queues.len() as u64 * u64::from(NOTIFY_MULTIPLIER);
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap_body(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                notify_length,
                Some(NOTIFY_MULTIPLIER),
            ),
            &[],
        );

        // MSI-X: message control (table size - 1), table at BAR 0 + 0x4000, PBA at 0x6000.
        let mut msix_body = Vec::with_capacity(10);
        msix_body.extend_from_slice(&((vector_count - 1) as u16).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        // Only the enable (bit 15) and function mask (bit 14) bits are writable.
        let msix_capability = config.add_capability(CAP_MSIX, &msix_body, &[0x00, 0xc0]);

        let interrupt = Arc::new(InterruptState {
            msix: Mutex::new(MsixState {
                entries: vec![
                    MsixEntry {
                        masked: true,
                        ..MsixEntry::default()
                    };
                    vector_count
                ],
                pending: vec![false; vector_count],
                enabled: false,
                function_masked: false,
            }),
            vectors: Mutex::new(vec![NO_VECTOR; vector_count]),
            isr: AtomicU8::new(0),
            irq_chip,
            gsi,
        });

        VirtioPciDevice {
            name: name.to_string(),
            config,
            device,
            memory,
            interrupt,
            msix_capability,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            device_status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            activated: false,
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegisters> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn reset(&mut self) {
        if self.activated {
            tracing::debug!(device = %self.name, "virtio device reset");
        }
        self.device.reset();
        self.activated = false;
        self.device_status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for queue in &mut self.queues {
            *queue = QueueRegisters {
                max_size: queue.max_size,
                size: queue.max_size,
                enabled: false,
                desc: 0,
                driver: 0,
                device: 0,
            };
        }
        self.interrupt
            .vectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fill(NO_VECTOR);
        self.interrupt.isr.store(0, Ordering::SeqCst);
        let _ = self.interrupt.irq_chip.set_irq(self.interrupt.gsi, false);
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & status::FEATURES_OK != 0 && self.device_status & status::FEATURES_OK == 0 {
            // A driver that does not accept VERSION_1 cannot use the modern transport:
            // leave FEATURES_OK clear so the driver reads back the rejection.
            if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                tracing::warn!(device = %self.name, features = format_args!("{:#x}", self.driver_features), "driver did not accept VIRTIO_F_VERSION_1");
                self.device_status = value & !status::FEATURES_OK;
                return;
            }
            self.device.set_acked_features(self.driver_features);
        }
        self.device_status = value;
        if value & status::DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, registers) in self.queues.iter().enumerate() {
            let mut queue = match Queue::new(registers.max_size) {
                Ok(queue) => queue,
                Err(e) => {
                    tracing::error!(device = %self.name, queue = index, error = ?e, "failed to create virtio queue");
                    self.device_status |= status::DEVICE_NEEDS_RESET;
                    return;
                }
            };
            queue.set_size(registers.size);
            queue.set_desc_table_address(
                Some(registers.desc as u32),
                Some((registers.desc >> 32) as u32),
            );
            queue.set_avail_ring_address(
                Some(registers.driver as u32),
                Some((registers.driver >> 32) as u32),
            );
            queue.set_used_ring_address(
                Some(registers.device as u32),
                Some((registers.device >> 32) as u32),
            );
            queue.set_event_idx(self.driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0);
            queue.set_ready(registers.enabled);
            if registers.enabled && !queue.is_valid(&self.memory) {
                tracing::warn!(device = %self.name, queue = index, "driver enabled a queue with invalid rings");
                self.device_status |= status::DEVICE_NEEDS_RESET;
                return;
            }
            queues.push(queue);
        }

        let interrupt = Arc::new(TransportInterrupt {
            state: self.interrupt.clone(),
            queue_count: self.queues.len(),
        });
        match self.device.activate(self.memory.clone(), queues, interrupt) {
            Ok(()) => {
                self.activated = true;
                tracing::info!(device = %self.name, features = format_args!("{:#x}", self.driver_features), "virtio device activated");
            }
            Err(e) => {
                tracing::warn!(device = %self.name, error = %e, "virtio device failed to activate");
                self.device_status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let vectors = self
            .interrupt
            .vectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let queue_count = self.queues.len();
        let queue = self.queues.get(usize::from(self.queue_select)).copied();
        let value: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.offered_features() & 0xffff_ffff,
                1 => self.offered_features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(vectors[queue_count]),
            0x12 => queue_count as u64,
            0x14 => u64::from(self.device_status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => queue.map_or(0, |q| u64::from(q.size)),
            0x1a => queue.map_or(u64::from(NO_VECTOR), |_| {
                u64::from(vectors[usize::from(self.queue_select)])
            }),
            0x1c => queue.map_or(0, |q| u64::from(q.enabled)),
            // Queue i's notification address is NOTIFY_OFFSET + i * NOTIFY_MULTIPLIER.
            0x1e => u64::from(self.queue_select),
            0x20..=0x27 => queue.map_or(0, |q| q.desc >> ((offset - 0x20) * 8)),
            0x28..=0x2f => queue.map_or(0, |q| q.driver >> ((offset - 0x28) * 8)),
            0x30..=0x37 => queue.map_or(0, |q| q.device >> ((offset - 0x30) * 8)),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let len = data.len().min(8);
        data[..len].copy_from_slice(&bytes[..len]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let len = data.len().min(8);
        bytes[..len].copy_from_slice(&data[..len]);
        let value = u64::from_le_bytes(bytes);
        let queue_count = self.queues.len();

        // Queue registers are frozen once the driver set DRIVER_OK, except through reset.
        let live = self.device_status & status::DRIVER_OK != 0;
        match offset {
            0x00 => self.device_feature_select = value as u32,
            0x08 => self.driver_feature_select = value as u32,
            0x0c if self.device_status & status::FEATURES_OK == 0 => {
                let offered = self.offered_features();
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | (value & 0xffff_ffff & offered)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | ((value << 32) & offered)
                    }
                    _ => {}
                }
            }
            0x10 => self.set_vector(queue_count, value as u16),
            0x14 => self.set_status(value as u8),
            0x16 => self.queue_select = value as u16,
            0x18 if !live => {
                if let Some(queue) = self.selected_queue() {
                    let size = value as u16;
                    // Split-ring sizes are powers of two up to the device maximum.
                    if size.is_power_of_two() && size <= queue.max_size {
                        queue.size = size;
                    }
                }
            }
            0x1a => {
                let index = usize::from(self.queue_select);
                if index < queue_count {
                    self.set_vector(index, value as u16);
                }
            }
            0x1c if !live => {
                if let Some(queue) = self.selected_queue() {
                    queue.enabled = value & 1 == 1;
                }
            }
            0x20..=0x37 if !live => {
                let Some(queue) = self.selected_queue() else {
                    return;
                };
                let (field, base) = match offset {
                    0x20..=0x27 => (&mut queue.desc, 0x20),
                    0x28..=0x2f => (&mut queue.driver, 0x28),
                    _ => (&mut queue.device, 0x30),
                };
                let shift = (offset - base) * 8;
                let mask = if len >= 8 {
                    u64::MAX
                } else {
                    ((1u64 << (len * 8)) - 1) << shift
                };
                *field = (*field & !mask) | ((value << shift) & mask);
            }
            _ => {}
        }
    }

    /// Assigns MSI-X vector `vector` to slot `index` (queues, then config); an
    /// out-of-range vector reads back as NO_VECTOR, which signals the rejection to the driver.
    fn set_vector(&mut self, index: usize, vector: u16) {
        let table_size = self
            .interrupt
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len();
        let vector = if usize::from(vector) < table_size {
            vector
        } else {
            NO_VECTOR
        };
        if let Some(slot) = self
            .interrupt
            .vectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(index)
        {
            *slot = vector;
        }
    }

    fn read_msix(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let msix = self
            .interrupt
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if offset >= MSIX_PBA_OFFSET {
            let first = ((offset - MSIX_PBA_OFFSET) * 8) as usize;
            for (byte_index, byte) in data.iter_mut().enumerate() {
                for bit in 0..8 {
                    if msix
                        .pending
                        .get(first + byte_index * 8 + bit)
                        .copied()
                        .unwrap_or(false)
                    {
                        *byte |= 1 << bit;
                    }
                }
            }
            return;
        }
        let relative = offset - MSIX_TABLE_OFFSET;
        let index = (relative / 16) as usize;
        let Some(entry) = msix.entries.get(index) else {
            return;
        };
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&entry.address.to_le_bytes());
        raw[8..12].copy_from_slice(&entry.data.to_le_bytes());
        raw[12..16].copy_from_slice(&u32::from(entry.masked).to_le_bytes());
        let start = (relative % 16) as usize;
        let len = data.len().min(16 - start);
        data[..len].copy_from_slice(&raw[start..start + len]);
    }

    fn write_msix(&mut self, offset: u64, data: &[u8]) {
        if offset >= MSIX_PBA_OFFSET {
            return; // The pending bit array is read-only.
        }
        let relative = offset - MSIX_TABLE_OFFSET;
        let index = (relative / 16) as usize;
        let start = (relative % 16) as usize;
        let mut msix = self
            .interrupt
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(entry) = msix.entries.get_mut(index) else {
            return;
        };
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&entry.address.to_le_bytes());
        raw[8..12].copy_from_slice(&entry.data.to_le_bytes());
        raw[12..16].copy_from_slice(&u32::from(entry.masked).to_le_bytes());
        let len = data.len().min(16 - start);
        raw[start..start + len].copy_from_slice(&data[..len]);
        entry.address = u64::from_le_bytes(raw[..8].try_into().unwrap());
        entry.data = u32::from_le_bytes(raw[8..12].try_into().unwrap());
        entry.masked = raw[12] & 1 == 1;

        // Unmasking an entry with a pending message delivers it now.
        let entry = *entry;
        if !entry.masked && !msix.function_masked && msix.enabled && msix.pending[index] {
            msix.pending[index] = false;
            drop(msix);
            self.interrupt.send_msi(entry);
        }
    }

    /// Picks up MSI-X enable and function-mask changes after a config-space write.
    fn sync_msix_control(&mut self) {
        let control_bytes = self.config.bytes(self.msix_capability + 2, 2);
        let control = u16::from_le_bytes([control_bytes[0], control_bytes[1]]);
        let mut msix = self
            .interrupt
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        msix.enabled = control & (1 << 15) != 0;
        msix.function_masked = control & (1 << 14) != 0;
        if !msix.enabled || msix.function_masked {
            return;
        }
        let mut ready = Vec::new();
        for index in 0..msix.entries.len() {
            if msix.pending[index] && !msix.entries[index].masked {
                msix.pending[index] = false;
                ready.push(msix.entries[index]);
            }
        }
        drop(msix);
        for entry in ready {
            self.interrupt.send_msi(entry);
        }
    }
}

/// Builds the body of a virtio_pci_cap (everything after the ID and next pointer).
fn virtio_cap_body(
    cfg_type: u8,
    offset: u64,
    length: u64,
    notify_multiplier: Option<u32>,
) -> Vec<u8> {
    let cap_len: u8 = if notify_multiplier.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(multiplier) = notify_multiplier {
        body.extend_from_slice(&multiplier.to_le_bytes());
    }
    body
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn write_config(&mut self, register: usize, offset: usize, data: &[u8]) {
        self.config.write_register(register, offset, data);
        let start = register * 4 + offset;
        let control = self.msix_capability + 2;
        if start < control + 2 && control < start + data.len() {
            self.sync_msix_control();
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 || bar >= BAR_COUNT {
            data.fill(0xff);
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LENGTH => self.read_common(o - COMMON_OFFSET, data),
            ISR_OFFSET => {
                // Reading the ISR acknowledges the interrupt and lowers INTx.
                data.fill(0);
                data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst);
                let _ = self.interrupt.irq_chip.set_irq(self.interrupt.gsi, false);
            }
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_LENGTH)
                .contains(&o) =>
            {
                self.device.read_config(o - DEVICE_CONFIG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..BAR_SIZE).contains(&o) => self.read_msix(o, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LENGTH => self.write_common(o - COMMON_OFFSET, data),
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_LENGTH)
                .contains(&o) =>
            {
                self.device.write_config(o - DEVICE_CONFIG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                let queue = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as u16;
                if self.activated && usize::from(queue) < self.queues.len() {
                    self.device.queue_notify(queue);
                }
            }
            o if (MSIX_TABLE_OFFSET..BAR_SIZE).contains(&o) => self.write_msix(o, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
