//! Port-I/O and MMIO buses and the devices on them.
//!
//! A device is a plain struct implementing [`BusDevice`]: it sees accesses as offsets
//! into its own range and knows nothing of the backend or the event loop, so unit tests
//! drive it directly.

pub mod bus;
pub mod pci;
pub mod virtio;

pub use bus::{Bus, BusError, BusRange};

/// A device reachable through port I/O or MMIO.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A request from the guest that ends or restarts the whole machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformRequest {
    /// Power off (ACPI S5, or a reboot with `reboot=k`-style halting where configured).
    PowerOff,
    /// Reset the machine (the i8042 reset line, a triple fault, ACPI reset).
    Reset,
}

/// The VM's side of power-off and reset lines: devices call it, and the VM loop stops
/// every vCPU and acts on the request.
pub trait PlatformControl: Send + Sync {
    /// Records `request` and makes every vCPU return to the VM loop.
    fn request(&self, request: PlatformRequest);
}
