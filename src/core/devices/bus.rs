//! An address-sorted bus that routes accesses to devices by range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{BusDevice, DeviceWindow};

/// Errors raised while building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around the address space")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} for {name} overlaps {other} at {other_base:#x}+{other_len:#x}")]
    Overlap {
        name: String,
        base: u64,
        len: u64,
        other: String,
        other_base: u64,
        other_len: u64,
    },
}

/// A half-open address range `[base, base + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    pub base: u64,
    pub len: u64,
}

impl BusRange {
    pub const fn new(base: u64, len: u64) -> Self {
        BusRange { base, len }
    }

    fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }
}

struct Entry {
    name: String,
    range: BusRange,
    /// Device offset of the range's first address.
    offset: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of devices at non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    /// Entries keyed by their base address.
    entries: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `range`; ranges must not overlap.
    pub fn insert(
        &mut self,
        name: &str,
        range: BusRange,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        self.insert_at_offset(name, range, 0, device)
    }

    /// Adds every window of a device that responds at several disjoint ranges (the PIC at
    /// 0x20 and 0xA0, the i8042 at 0x60 and 0x64), all sharing `device`.
    pub fn insert_windows(
        &mut self,
        windows: &[DeviceWindow],
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        for window in windows {
            self.insert_at_offset(window.name, window.range, window.offset, device.clone())?;
        }
        Ok(())
    }

    /// Adds `device` at `range` so that the range's first address reaches the device at
    /// `offset` rather than at 0.
    pub fn insert_at_offset(
        &mut self,
        name: &str,
        range: BusRange,
        offset: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if range.len == 0 || range.base.checked_add(range.len - 1).is_none() {
            return Err(BusError::InvalidRange {
                base: range.base,
                len: range.len,
            });
        }

        let neighbours = self
            .entries
            .range(..=range.last())
            .next_back()
            .into_iter()
            .chain(self.entries.range(range.base..=range.last()));
        for (_, other) in neighbours {
            if other.range.base <= range.last() && range.base <= other.range.last() {
                return Err(BusError::Overlap {
                    name: name.to_string(),
                    base: range.base,
                    len: range.len,
                    other: other.name.clone(),
                    other_base: other.range.base,
                    other_len: other.range.len,
                });
            }
        }

        self.entries.insert(
            range.base,
            Entry {
                name: name.to_string(),
                range,
                offset,
                device,
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let (_, entry) = self.entries.range(..=addr).next_back()?;
        let offset = addr - entry.range.base;
        (offset < entry.range.len).then_some((entry, entry.offset.wrapping_add(offset)))
    }

    /// Reads from the device at `addr`; returns false, leaving `data` unchanged, if no
    /// device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((entry, offset)) = self.find(addr) else {
            return false;
        };
        // A device that panicked while holding its lock stays usable: its state is plain
        // registers, and refusing all further accesses would only hang the guest.
        let mut device = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        device.read(offset, data);
        true
    }

    /// Writes to the device at `addr`; returns false if no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((entry, offset)) = self.find(addr) else {
            return false;
        };
        let mut device = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        device.write(offset, data);
        true
    }

    /// Returns the names and ranges of the devices, in address order.
    pub fn devices(&self) -> impl Iterator<Item = (&str, BusRange)> {
        self.entries.values().map(|e| (e.name.as_str(), e.range))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last write and returns its offset on reads.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_access_by_offset() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::new();
        bus.insert("probe", BusRange::new(0x3f8, 8), probe.clone())
            .unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);

        assert!(bus.write(0x3f9, &[0xaa]));
        assert_eq!(probe.lock().unwrap().last_write, Some((1, vec![0xaa])));
    }

    #[test]
    fn unclaimed_address_is_reported() {
        let mut bus = Bus::new();
        bus.insert(
            "probe",
            BusRange::new(0x10, 4),
            Arc::new(Mutex::new(Probe::default())),
        )
        .unwrap();

        let mut data = [0x55u8; 2];
        assert!(!bus.read(0x14, &mut data));
        assert_eq!(data, [0x55, 0x55]);
        assert!(!bus.read(0x0f, &mut data));
        assert!(!bus.write(0x14, &[1]));
    }

    #[test]
    fn windows_share_one_device() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let windows = [
            DeviceWindow::new("low", 0x20, 2, 0),
            DeviceWindow::new("high", 0xa0, 2, 2),
        ];
        let mut bus = Bus::new();
        bus.insert_windows(&windows, probe.clone()).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0xa1, &mut data));
        assert_eq!(data, [3]);
        assert!(bus.read(0x21, &mut data));
        assert_eq!(data, [1]);
        assert!(bus.write(0xa0, &[7]));
        assert_eq!(probe.lock().unwrap().last_write, Some((2, vec![7])));
        assert!(!bus.read(0x22, &mut data));
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let mut bus = Bus::new();
        let device = || Arc::new(Mutex::new(Probe::default()));
        bus.insert("a", BusRange::new(0x100, 0x10), device())
            .unwrap();

        for (base, len) in [(0x100, 1), (0x10f, 4), (0xf0, 0x11), (0x0, 0x1000)] {
            let err = bus
                .insert("b", BusRange::new(base, len), device())
                .unwrap_err();
            assert!(
                matches!(err, BusError::Overlap { .. }),
                "{base:#x}+{len:#x}"
            );
        }
        bus.insert("below", BusRange::new(0xf0, 0x10), device())
            .unwrap();
        bus.insert("above", BusRange::new(0x110, 0x10), device())
            .unwrap();
    }

    #[test]
    fn empty_or_wrapping_range_is_rejected() {
        let mut bus = Bus::new();
        let device = Arc::new(Mutex::new(Probe::default()));
        assert!(bus
            .insert("empty", BusRange::new(0, 0), device.clone())
            .is_err());
        assert!(bus
            .insert("wrap", BusRange::new(u64::MAX, 2), device)
            .is_err());
    }
}
