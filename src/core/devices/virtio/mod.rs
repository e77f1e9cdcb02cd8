//! Virtio devices (version 1.x) and their PCI transport.
//!
//! A device model implements [`VirtioDevice`]: its features, its configuration space and
//! what it does with its queues. [`pci::VirtioPciDevice`] wraps a model into a PCI
//! function with the modern virtio-pci capabilities and an MSI-X table.

pub mod block;
pub mod pci;
#[cfg(test)]
pub mod testing;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Feature bit: the device follows virtio 1.0 or later (required by the modern transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: the device accepts the used and available event indexes.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device status bits written by the driver.
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
}

/// Device types from the virtio specification, section "Device Types".
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
}

/// Callback that a device calls with (guest-physical address, length in bytes) after it
/// wrote that range of guest RAM. The emulator backend uses it to drop decoded
/// instructions of pages that a disk read refilled.
pub type DmaWriteHook = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// The interrupt path from a device model to the driver: used buffers and config changes.
pub trait VirtioInterrupt: Send + Sync {
    /// Signals that queue `queue` has new used buffers.
    fn notify_queue(&self, queue: u16);
    /// Signals that the device configuration changed.
    fn notify_config(&self);
}

/// Errors raised by a device model while it activates or serves its queues.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("the driver activated the device with queue {queue} not ready")]
    QueueNotReady { queue: u16 },
    #[error("queue {queue} is invalid: its rings lie outside guest memory or its size is wrong")]
    InvalidQueue { queue: u16 },
    #[error("virtio queue error on queue {queue}: {source}")]
    Queue {
        queue: u16,
        #[source]
        source: virtio_queue::Error,
    },
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// Returns the device type (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// Returns the maximum size of each queue, one entry per queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Returns the features the device offers.
    fn features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving `queues` after the driver set DRIVER_OK.
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioError>;
    /// Handles a driver notification for queue `queue`.
    fn queue_notify(&mut self, queue: u16);
    /// Stops serving the queues and clears the negotiated state.
    fn reset(&mut self);
}
