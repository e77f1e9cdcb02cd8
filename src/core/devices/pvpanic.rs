//! QEMU's ISA pvpanic device: one I/O port through which a guest kernel reports a panic.
//!
//! The guest finds the device through the DSDT (a device with _HID `QEMU0001` and the port
//! in its _CRS), reads the port to learn which events the device supports, and writes an
//! event bit when it happens. Linux's pvpanic driver (drivers/misc/pvpanic, the
//! `pvpanic-mmio` module in 6.1, which also binds to I/O ports) writes
//! [`PVPANIC_PANICKED`] from its panic notifier, before the reboot that `panic=-1` asks for.
//!
//! A panic event ends the VM through [`PlatformRequest::GuestPanic`]. A crash-loaded event
//! (a kdump kernel took over) is only logged, as QEMU reports it without stopping.

use std::sync::Arc;

use super::{BusDevice, DeviceWindow, GuestErrorLog, PlatformControl, PlatformRequest};

/// The I/O port of QEMU's ISA pvpanic device.
pub const PVPANIC_PORT: u16 = 0x505;
/// ACPI hardware ID under which the DSDT announces the device.
pub const PVPANIC_HID: &str = "QEMU0001";
/// Event bit: the guest kernel panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: a crash kernel was loaded after a panic.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// The events the device reports as supported when the guest reads the port.
pub const PVPANIC_EVENTS: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
/// The bus window of the device.
pub const PVPANIC_WINDOWS: [DeviceWindow; 1] =
    [DeviceWindow::new("pvpanic", PVPANIC_PORT as u64, 1, 0)];

const DEVICE: &str = "pvpanic";

/// The pvpanic port.
pub struct PvPanic {
    platform: Arc<dyn PlatformControl>,
    unknown_events: GuestErrorLog,
}

impl PvPanic {
    /// Creates the device; a panic event goes to `platform`.
    pub fn new(platform: Arc<dyn PlatformControl>) -> Self {
        PvPanic {
            platform,
            unknown_events: GuestErrorLog::default(),
        }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_EVENTS;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&events) = data.first() else {
            return;
        };
        if events & !PVPANIC_EVENTS != 0 {
            self.unknown_events.record(
                DEVICE,
                format_args!(
                    "guest wrote unknown pvpanic events {events:#04x}; ignoring those bits"
                ),
            );
        }
        if events & PVPANIC_CRASH_LOADED != 0 {
            tracing::warn!(
                device = DEVICE,
                "guest reports that a crash kernel was loaded after a panic"
            );
        }
        if events & PVPANIC_PANICKED != 0 {
            tracing::error!(device = DEVICE, "guest kernel panicked; stopping the VM");
            self.platform.request(PlatformRequest::GuestPanic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::devices::test_utils::RecordingPlatform;

    fn device() -> (PvPanic, Arc<RecordingPlatform>) {
        let platform = Arc::new(RecordingPlatform::default());
        (PvPanic::new(platform.clone()), platform)
    }

    #[test]
    fn read_reports_supported_events() {
        let (mut pvpanic, _) = device();
        let mut data = [0xffu8; 1];
        pvpanic.read(0, &mut data);
        assert_eq!(data, [PVPANIC_EVENTS]);
    }

    #[test]
    fn panic_event_requests_guest_panic() {
        let (mut pvpanic, platform) = device();
        pvpanic.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(
            *platform.requests.lock().unwrap(),
            [PlatformRequest::GuestPanic]
        );
    }

    #[test]
    fn crash_loaded_and_unknown_events_do_not_stop() {
        let (mut pvpanic, platform) = device();
        pvpanic.write(0, &[PVPANIC_CRASH_LOADED]);
        pvpanic.write(0, &[0x80]);
        pvpanic.write(0, &[]);
        assert!(platform.requests.lock().unwrap().is_empty());
        assert_eq!(pvpanic.unknown_events.count(), 1);
    }
}
