//! PCI type 0 configuration space with BARs that size themselves as the guest probes them.

/// Bytes in a conventional (non-extended) configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION_ID: usize = 0x08;
const CLASS_CODE: usize = 0x09;
const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;

/// Command register bit that enables decoding of memory BARs.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register bit that enables bus mastering (DMA).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Status register bit: a capability list starts at `CAPABILITIES_POINTER`.
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Number of BAR slots in a type 0 header.
pub const BAR_COUNT: usize = 6;
/// First byte of the capability area; capabilities are laid out upwards from here.
const FIRST_CAPABILITY: usize = 0x40;

/// A memory BAR: 32-bit, or 64-bit using two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBar {
    /// Size in bytes; a power of two of at least 16.
    pub size: u64,
    pub is_64bit: bool,
}

/// Identity of a function, written into the header.
#[derive(Debug, Clone, Copy)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    pub revision: u8,
    /// Base class, subclass and programming interface.
    pub class: [u8; 3],
}

/// The configuration space of one function: the bytes, a mask of guest-writable bits,
/// and the BAR layout.
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<MemoryBar>; BAR_COUNT],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl ConfigSpace {
    /// Creates a header for `identity` with interrupt pin `pin` (0 for none, 1 for INTA#).
    pub fn new(identity: PciIdentity, pin: u8) -> Self {
        let mut space = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: [None; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        space.set_u16(VENDOR_ID, identity.vendor_id);
        space.set_u16(DEVICE_ID, identity.device_id);
        space.bytes[REVISION_ID] = identity.revision;
        // Class code bytes are stored programming interface first.
        space.bytes[CLASS_CODE] = identity.class[2];
        space.bytes[CLASS_CODE + 1] = identity.class[1];
        space.bytes[CLASS_CODE + 2] = identity.class[0];
        space.bytes[HEADER_TYPE] = 0;
        space.set_u16(SUBSYSTEM_VENDOR_ID, identity.subsystem_vendor_id);
        space.set_u16(SUBSYSTEM_ID, identity.subsystem_id);
        space.bytes[INTERRUPT_PIN] = pin;

        // I/O space, memory space, bus master and INTx disable are the command bits a
        // guest may change; the interrupt line is scratch space for the guest's records.
        space.set_writable_u16(COMMAND, 0x0007 | (1 << 10));
        space.writable[INTERRUPT_LINE] = 0xff;
        space
    }

    /// Declares BAR `index` as a memory BAR at `address`; a 64-bit BAR also takes slot
    /// `index + 1`.
    ///
    /// # Panics
    /// On a size that is not a power of two of at least 16, or a slot out of range: the
    /// device models call this with constants.
    pub fn add_memory_bar(&mut self, index: usize, bar: MemoryBar, address: u64) {
        assert!(
            bar.size.is_power_of_two() && bar.size >= 16,
            "invalid BAR size {:#x}",
            bar.size
        );
        let slots = if bar.is_64bit { 2 } else { 1 };
        assert!(index + slots <= BAR_COUNT, "BAR {index} does not fit");

        self.bars[index] = Some(bar);
        let mask = !(bar.size - 1);
        let type_bits: u32 = if bar.is_64bit { 0b100 } else { 0 };
        let offset = BAR0 + index * 4;
        self.set_u32(offset, (address & mask) as u32 | type_bits);
        self.set_writable_u32(offset, (mask as u32) & !0xf);
        if bar.is_64bit {
            self.set_u32(offset + 4, (address >> 32) as u32);
            self.set_writable_u32(offset + 4, (mask >> 32) as u32);
        }
    }

    /// Appends a vendor-neutral capability with ID `id` and body `body` (the bytes after
    /// the ID and next pointer) and returns its offset. `writable` marks bytes of the body
    /// the guest may change.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let offset = self.next_capability;
        let length = 2 + body.len();
        assert!(
            offset + length <= CONFIG_SPACE_SIZE,
            "capabilities overflow the config space"
        );

        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..offset + length].copy_from_slice(body);
        for (i, mask) in writable.iter().enumerate() {
            self.writable[offset + 2 + i] = *mask;
        }
        match self.last_capability {
            Some(previous) => self.bytes[previous + 1] = offset as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = offset as u8;
                let status = self.u16_at(STATUS) | STATUS_CAPABILITIES_LIST;
                self.set_u16(STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        // Capabilities start on dword boundaries.
        self.next_capability = (offset + length + 3) & !3;
        offset
    }

    /// Reads the 32-bit register at dword index `register`.
    pub fn read_register(&self, register: usize) -> u32 {
        let offset = register * 4;
        if offset + 4 > CONFIG_SPACE_SIZE {
            return u32::MAX;
        }
        self.u32_at(offset)
    }

    /// Writes `data` at byte `offset` within dword `register`, keeping read-only bits.
    pub fn write_register(&mut self, register: usize, offset: usize, data: &[u8]) {
        let start = register * 4 + offset;
        if offset + data.len() > 4 || start + data.len() > CONFIG_SPACE_SIZE {
            return;
        }
        for (i, byte) in data.iter().enumerate() {
            let mask = self.writable[start + i];
            let old = self.bytes[start + i];
            self.bytes[start + i] = (old & !mask) | (byte & mask);
        }
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// Returns the guest-physical address of memory BAR `index`, if it is a memory BAR.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let offset = BAR0 + index * 4;
        let low = u64::from(self.u32_at(offset) & !0xf);
        let high = if bar.is_64bit {
            u64::from(self.u32_at(offset + 4))
        } else {
            0
        };
        Some(high << 32 | low)
    }

    /// Returns the layout of BAR `index`, if declared.
    pub fn bar(&self, index: usize) -> Option<MemoryBar> {
        self.bars.get(index).copied().flatten()
    }

    /// Reads a byte range for device models (capability bodies they own).
    pub fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        &self.bytes[offset..offset + len]
    }

    /// Overwrites a byte range regardless of the writable mask (device-side updates).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    fn u32_at(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes[offset..offset + 4].try_into().unwrap())
    }

    fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn set_writable_u16(&mut self, offset: usize, mask: u16) {
        self.writable[offset..offset + 2].copy_from_slice(&mask.to_le_bytes());
    }

    fn set_writable_u32(&mut self, offset: usize, mask: u32) {
        self.writable[offset..offset + 4].copy_from_slice(&mask.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PciIdentity {
        PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x0040,
            revision: 1,
            class: [0x01, 0x00, 0x00],
        }
    }

    #[test]
    fn header_holds_identity() {
        let space = ConfigSpace::new(identity(), 1);
        assert_eq!(space.read_register(0), 0x1042_1af4);
        assert_eq!(space.read_register(2), 0x0100_0001);
        assert_eq!(space.read_register(0x3c / 4) >> 8 & 0xff, 1);
    }

    #[test]
    fn bar_sizing_probe_returns_size_mask() {
        let mut space = ConfigSpace::new(identity(), 0);
        space.add_memory_bar(
            0,
            MemoryBar {
                size: 0x4000,
                is_64bit: false,
            },
            0xe000_0000,
        );
        assert_eq!(space.bar_address(0), Some(0xe000_0000));

        space.write_register(4, 0, &u32::MAX.to_le_bytes());
        assert_eq!(space.read_register(4), 0xffff_c000);

        space.write_register(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(space.bar_address(0), Some(0xd000_0000));
    }

    #[test]
    fn bar_64bit_spans_two_slots() {
        let mut space = ConfigSpace::new(identity(), 0);
        space.add_memory_bar(
            2,
            MemoryBar {
                size: 0x1000,
                is_64bit: true,
            },
            0x1_2345_6000,
        );
        assert_eq!(space.read_register(6) & 0xf, 0b100);
        assert_eq!(space.bar_address(2), Some(0x1_2345_6000));
        space.write_register(7, 0, &u32::MAX.to_le_bytes());
        assert_eq!(space.read_register(7), u32::MAX);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut space = ConfigSpace::new(identity(), 0);
        space.write_register(0, 0, &[0, 0, 0, 0]);
        assert_eq!(space.read_register(0), 0x1042_1af4);
        // Out-of-range registers and straddling writes are dropped, not panics.
        space.write_register(64, 0, &[1]);
        space.write_register(1, 3, &[1, 2]);
        assert_eq!(space.read_register(64), u32::MAX);
    }

    #[test]
    fn capabilities_form_a_list() {
        let mut space = ConfigSpace::new(identity(), 0);
        let first = space.add_capability(0x09, &[14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        let second = space.add_capability(0x11, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 0xc0]);
        assert_eq!(first, 0x40);
        assert_eq!(space.read_register(0x34 / 4) & 0xff, first as u32);
        assert_eq!(space.bytes(first + 1, 1)[0] as usize, second);
        assert_ne!(
            space.read_register(1) & (u32::from(STATUS_CAPABILITIES_LIST) << 16),
            0
        );
    }
}
