//! The VM's port-I/O and MMIO dispatch: the `IoHandler` every backend calls.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::core::devices::Bus;
use crate::hypervisor::IoHandler;

/// Unclaimed accesses are logged for the first this many, then only counted: a guest that
/// probes absent hardware in a loop must not flood the log.
const UNCLAIMED_LOG_LIMIT: u64 = 16;

/// The port-I/O and MMIO buses of one VM.
#[derive(Default)]
pub struct VmIo {
    pub pio: Bus,
    pub mmio: Bus,
    unclaimed: AtomicU64,
}

impl VmIo {
    pub fn new(pio: Bus, mmio: Bus) -> Self {
        VmIo {
            pio,
            mmio,
            unclaimed: AtomicU64::new(0),
        }
    }

    /// Returns how many accesses reached no device.
    pub fn unclaimed_accesses(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }

    fn note_unclaimed(&self, kind: &str, addr: u64, len: usize, write: bool) {
        let count = self.unclaimed.fetch_add(1, Ordering::Relaxed) + 1;
        if count <= UNCLAIMED_LOG_LIMIT {
            tracing::debug!(
                kind,
                addr = format_args!("{addr:#x}"),
                len,
                write,
                "guest accessed an address with no device"
            );
        }
        if count == UNCLAIMED_LOG_LIMIT {
            tracing::debug!("further accesses to absent devices are counted, not logged");
        }
    }
}

impl IoHandler for VmIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            // An ISA bus with nothing on it floats high.
            data.fill(0xff);
            self.note_unclaimed("pio", u64::from(port), data.len(), false);
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if !self.pio.write(u64::from(port), data) {
            self.note_unclaimed("pio", u64::from(port), data.len(), true);
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            data.fill(0xff);
            self.note_unclaimed("mmio", addr, data.len(), false);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) {
            self.note_unclaimed("mmio", addr, data.len(), true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_device_reads_all_ones() {
        let io = VmIo::default();
        let mut data = [0u8; 4];
        io.pio_read(0x80, &mut data);
        assert_eq!(data, [0xff; 4]);
        io.mmio_read(0xd000_0000, &mut data[..2]);
        assert_eq!(data[..2], [0xff, 0xff]);
        io.pio_write(0x80, &[1]);
        assert_eq!(io.unclaimed_accesses(), 3);
    }
}
