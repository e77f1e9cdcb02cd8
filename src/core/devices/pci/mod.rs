//! The PCI host bridge: configuration mechanism #1 on ports 0xCF8-0xCFF, bus 0 only, and
//! an MMIO window that routes accesses to whichever function's BAR contains them.
//!
//! BARs are assigned by the VMM before boot, but the guest may move them: the window looks
//! BARs up on every access, so a relocated BAR keeps working.

pub mod config;

use std::sync::{Arc, Mutex};

pub use config::{ConfigSpace, MemoryBar, PciIdentity};

use super::BusDevice;

/// First I/O port of configuration mechanism #1 (CONFIG_ADDRESS; CONFIG_DATA is at +4).
pub const CONFIG_PORT_BASE: u64 = 0xcf8;
/// Ports claimed by configuration mechanism #1.
pub const CONFIG_PORT_LEN: u64 = 8;
/// Device slots on bus 0.
pub const MAX_DEVICES: usize = 32;

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    fn config(&self) -> &ConfigSpace;
    fn config_mut(&mut self) -> &mut ConfigSpace;

    /// Reads `data.len()` bytes at `offset` into memory BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` into memory BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// Reads config register `register`; devices with live registers override it.
    fn read_config(&mut self, register: usize) -> u32 {
        self.config().read_register(register)
    }

    /// Writes config register bytes; devices that react to writes override it.
    fn write_config(&mut self, register: usize, offset: usize, data: &[u8]) {
        self.config_mut().write_register(register, offset, data);
    }
}

/// The host bridge function at 00:00.0, which Linux's configuration-mechanism probe looks
/// for before it trusts ports 0xCF8/0xCFC.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(
                PciIdentity {
                    // Intel 440FX, the host bridge guests know best.
                    vendor_id: 0x8086,
                    device_id: 0x1237,
                    subsystem_vendor_id: 0,
                    subsystem_id: 0,
                    revision: 2,
                    class: [0x06, 0x00, 0x00],
                },
                0,
            ),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// The functions on bus 0, by slot.
pub struct PciRoot {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
}

/// Errors raised while populating the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error(
        "PCI bus 0 has no free slot left for {name} (all {MAX_DEVICES} are used): remove a device"
    )]
    NoFreeSlot { name: String },
}

impl PciRoot {
    /// Creates bus 0 with the host bridge in slot 0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = vec![None; MAX_DEVICES];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        PciRoot { slots }
    }

    /// Puts `device` in the first free slot and returns the slot number.
    pub fn add(
        &mut self,
        name: &str,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<usize, PciError> {
        let slot =
            self.slots
                .iter()
                .position(Option::is_none)
                .ok_or_else(|| PciError::NoFreeSlot {
                    name: name.to_string(),
                })?;
        self.slots[slot] = Some(device);
        tracing::debug!(device = name, slot, "PCI device added");
        Ok(slot)
    }

    fn device(&self, slot: usize) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        self.slots.get(slot)?.as_ref()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(device: &Arc<Mutex<dyn PciDevice>>) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

/// Configuration mechanism #1 on ports 0xCF8-0xCFF.
pub struct PciConfigPorts {
    root: Arc<PciRoot>,
    /// CONFIG_ADDRESS: enable bit 31, bus 23:16, device 15:11, function 10:8, register 7:2.
    address: u32,
}

impl PciConfigPorts {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigPorts { root, address: 0 }
    }

    /// Returns the device and register that CONFIG_ADDRESS selects, when enabled and on
    /// bus 0 function 0 (the only ones populated).
    fn selected(&self) -> Option<(&Arc<Mutex<dyn PciDevice>>, usize)> {
        if self.address & (1 << 31) == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let slot = (self.address >> 11) & 0x1f;
        let function = (self.address >> 8) & 0x7;
        let register = ((self.address >> 2) & 0x3f) as usize;
        if bus != 0 || function != 0 {
            return None;
        }
        Some((self.root.device(slot as usize)?, register))
    }
}

impl BusDevice for PciConfigPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => {
                let value = self.address.to_le_bytes();
                copy_from_register(&value, offset as usize, data);
            }
            4..=7 => {
                let value = match self.selected() {
                    Some((device, register)) => lock(device).read_config(register),
                    None => u32::MAX,
                };
                copy_from_register(&value.to_le_bytes(), offset as usize - 4, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Only full dword writes change CONFIG_ADDRESS; byte writes to 0xCF8-0xCFB
            // belong to other mechanisms that we do not implement.
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes(data.try_into().unwrap()) & 0x80ff_fffc;
            }
            4..=7 => {
                let start = offset as usize - 4;
                if start + data.len() > 4 {
                    return;
                }
                if let Some((device, register)) = self.selected() {
                    lock(device).write_config(register, start, data);
                }
            }
            _ => {}
        }
    }
}

fn copy_from_register(value: &[u8; 4], start: usize, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = value.get(start + i).copied().unwrap_or(0xff);
    }
}

/// The MMIO window for 32-bit and 64-bit memory BARs.
pub struct PciMmioWindow {
    root: Arc<PciRoot>,
    /// Guest-physical address of offset 0 of this window on the MMIO bus.
    base: u64,
}

impl PciMmioWindow {
    pub fn new(root: Arc<PciRoot>, base: u64) -> Self {
        PciMmioWindow { root, base }
    }

    /// Runs `access` on the device and BAR containing `addr`, with the offset into the BAR.
    fn with_bar<F>(&self, addr: u64, len: usize, access: F) -> bool
    where
        F: FnOnce(&mut dyn PciDevice, usize, u64),
    {
        for device in self.root.slots.iter().flatten() {
            let mut device = lock(device);
            if device.config().command() & config::COMMAND_MEMORY_SPACE == 0 {
                continue;
            }
            for bar in 0..config::BAR_COUNT {
                let (Some(layout), Some(start)) =
                    (device.config().bar(bar), device.config().bar_address(bar))
                else {
                    continue;
                };
                if start == 0 {
                    continue;
                }
                let end = start.saturating_add(layout.size);
                if addr >= start && addr.saturating_add(len as u64) <= end {
                    access(&mut *device, bar, addr - start);
                    return true;
                }
            }
        }
        false
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = self.base + offset;
        let len = data.len();
        if !self.with_bar(addr, len, |device, bar, bar_offset| {
            device.bar_read(bar, bar_offset, data)
        }) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let addr = self.base + offset;
        self.with_bar(addr, data.len(), |device, bar, bar_offset| {
            device.bar_write(bar, bar_offset, data)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function with one 4 KiB memory BAR whose bytes read back their offset.
    struct TestFunction {
        config: ConfigSpace,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl TestFunction {
        fn new(bar_address: u64) -> Self {
            let mut config = ConfigSpace::new(
                PciIdentity {
                    vendor_id: 0x1234,
                    device_id: 0x5678,
                    subsystem_vendor_id: 0,
                    subsystem_id: 0,
                    revision: 0,
                    class: [0xff, 0, 0],
                },
                1,
            );
            config.add_memory_bar(
                0,
                MemoryBar {
                    size: 0x1000,
                    is_64bit: false,
                },
                bar_address,
            );
            TestFunction {
                config,
                last_write: None,
            }
        }
    }

    impl PciDevice for TestFunction {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
    }

    fn config_read(ports: &mut PciConfigPorts, slot: u32, register: u32) -> u32 {
        ports.write(0, &(0x8000_0000 | slot << 11 | register << 2).to_le_bytes());
        let mut data = [0u8; 4];
        ports.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    fn config_write(ports: &mut PciConfigPorts, slot: u32, register: u32, value: u32) {
        ports.write(0, &(0x8000_0000 | slot << 11 | register << 2).to_le_bytes());
        ports.write(4, &value.to_le_bytes());
    }

    #[test]
    fn host_bridge_answers_at_slot_zero() {
        let mut ports = PciConfigPorts::new(Arc::new(PciRoot::new()));
        assert_eq!(config_read(&mut ports, 0, 0), 0x1237_8086);
        assert_eq!(config_read(&mut ports, 0, 2) >> 16, 0x0600);
        assert_eq!(config_read(&mut ports, 5, 0), u32::MAX);
    }

    #[test]
    fn config_address_reads_back() {
        let mut ports = PciConfigPorts::new(Arc::new(PciRoot::new()));
        ports.write(0, &0x8000_0000u32.to_le_bytes());
        let mut data = [0u8; 4];
        ports.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8000_0000);
    }

    #[test]
    fn mmio_window_follows_relocated_bar() {
        let function = Arc::new(Mutex::new(TestFunction::new(0xe000_0000)));
        let mut root = PciRoot::new();
        let slot = root.add("test", function.clone()).unwrap() as u32;
        let root = Arc::new(root);
        let mut ports = PciConfigPorts::new(root.clone());
        let mut window = PciMmioWindow::new(root, 0xc000_0000);

        // Memory decoding is off until the guest enables it.
        let mut data = [0u8; 1];
        window.read(0x2000_0010, &mut data);
        assert_eq!(data, [0xff]);

        config_write(&mut ports, slot, 1, u32::from(config::COMMAND_MEMORY_SPACE));
        window.read(0x2000_0010, &mut data);
        assert_eq!(data, [0x10]);

        config_write(&mut ports, slot, 4, 0xd000_0000);
        window.write(0x1000_0020, &[7]);
        assert_eq!(
            function.lock().unwrap().last_write,
            Some((0, 0x20, vec![7]))
        );
        window.read(0x2000_0010, &mut data);
        assert_eq!(data, [0xff]);
    }

    #[test]
    fn access_straddling_bar_end_is_dropped() {
        let function = Arc::new(Mutex::new(TestFunction::new(0xe000_0000)));
        let mut root = PciRoot::new();
        let slot = root.add("test", function).unwrap() as u32;
        let root = Arc::new(root);
        let mut ports = PciConfigPorts::new(root.clone());
        config_write(&mut ports, slot, 1, u32::from(config::COMMAND_MEMORY_SPACE));
        let mut window = PciMmioWindow::new(root, 0xe000_0000);

        let mut data = [0u8; 4];
        window.read(0xffe, &mut data);
        assert_eq!(data, [0xff; 4]);
    }
}
