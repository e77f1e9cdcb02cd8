//! Port-I/O and MMIO buses and the devices on them.
//!
//! A device is a plain struct implementing [`BusDevice`]: it sees accesses as offsets
//! into its own range and knows nothing of the backend or the event loop, so unit tests
//! drive it directly. A device that responds at several disjoint ranges exports them as
//! [`DeviceWindow`]s, which [`Bus::insert_windows`] registers in one call.
//!
//! Guest accesses never panic a device. A malformed access (a wrong size, a reserved
//! register, an offset outside the device) reads as all ones, drops the write, and is
//! counted by a [`GuestErrorLog`] that logs only the first occurrences.

pub mod acpi_pm;
pub mod bus;
pub mod i8042;
pub mod ioapic;
pub mod irq_chip;
pub mod lapic;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod pvpanic;
pub mod rtc;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusError, BusRange};

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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
    /// The guest kernel reported a panic through the pvpanic device.
    GuestPanic,
}

/// The VM's side of power-off and reset lines: devices call it, and the VM loop stops
/// every vCPU and acts on the request.
pub trait PlatformControl: Send + Sync {
    /// Records `request` and makes every vCPU return to the VM loop.
    fn request(&self, request: PlatformRequest);
}

/// One address range of a device, and the device offset that its first address maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceWindow {
    /// Name shown in bus listings and overlap errors.
    pub name: &'static str,
    /// Bus addresses (I/O ports or guest-physical addresses) of the window.
    pub range: BusRange,
    /// Device offset seen for `range.base`.
    pub offset: u64,
}

impl DeviceWindow {
    /// Creates a window of `len` addresses at `base` that reaches the device from `offset`.
    pub const fn new(name: &'static str, base: u64, len: u64, offset: u64) -> Self {
        DeviceWindow {
            name,
            range: BusRange::new(base, len),
            offset,
        }
    }
}

/// A device together with the bus windows to register it at.
pub struct WindowedDevice {
    /// Windows to pass to [`Bus::insert_windows`].
    pub windows: &'static [DeviceWindow],
    /// The device shared by every window.
    pub device: Arc<Mutex<dyn BusDevice>>,
}

/// A source of time for devices that read a clock inside a register access (the ACPI PM
/// timer, the RTC). Tests pass a manual clock so that their results do not depend on when
/// they run.
pub trait Clock: Send + Sync {
    /// Nanoseconds since a fixed point in the past; never decreases.
    fn monotonic_ns(&self) -> u64;
    /// Nanoseconds since the Unix epoch in UTC, as the host's wall clock reads.
    fn wall_ns(&self) -> u64;
}

/// The host's clocks: `Instant` for monotonic time, `SystemTime` for wall time.
#[derive(Debug, Clone, Copy)]
pub struct HostClock {
    start: Instant,
}

impl HostClock {
    /// Creates a clock whose monotonic time starts at 0 now.
    pub fn new() -> Self {
        HostClock {
            start: Instant::now(),
        }
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn monotonic_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn wall_ns(&self) -> u64 {
        // A host clock set before 1970 reads as the epoch.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// Number of events of one kind that are logged before the log thins out to every power
/// of two.
const GUEST_ERROR_LOG_BURST: u64 = 8;

/// A counter of guest-triggered warnings for one device, such as malformed accesses and
/// failed interrupt injections. It logs the first [`GUEST_ERROR_LOG_BURST`] through
/// `tracing` and after that only every power of two, so a guest hammering a bad register
/// cannot flood the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GuestErrorLog {
    count: u64,
}

impl GuestErrorLog {
    /// Counts one event on `device` and logs `message` if this occurrence is due.
    pub fn record(&mut self, device: &'static str, message: fmt::Arguments<'_>) {
        self.count = self.count.saturating_add(1);
        if self.count <= GUEST_ERROR_LOG_BURST || self.count.is_power_of_two() {
            tracing::warn!(device, count = self.count, "{message}");
        }
    }

    /// Number of events counted so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Fills `data` with all ones, which is what a read that no register decodes returns on a PC.
fn fill_unclaimed(data: &mut [u8]) {
    data.fill(0xff);
}

/// Helpers shared by the device tests.
#[cfg(test)]
pub(crate) mod test_utils {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use crate::hypervisor::{HypervisorError, IrqChip};

    use super::{Clock, PlatformControl, PlatformRequest};

    /// A clock that moves only when a test sets it.
    #[derive(Default)]
    pub struct ManualClock {
        pub monotonic: AtomicU64,
        pub wall: AtomicU64,
    }

    impl ManualClock {
        /// Moves both clocks forward by `ns` nanoseconds.
        pub fn advance(&self, ns: u64) {
            self.monotonic.fetch_add(ns, Ordering::SeqCst);
            self.wall.fetch_add(ns, Ordering::SeqCst);
        }
    }

    impl Clock for ManualClock {
        fn monotonic_ns(&self) -> u64 {
            self.monotonic.load(Ordering::SeqCst)
        }

        fn wall_ns(&self) -> u64 {
            self.wall.load(Ordering::SeqCst)
        }
    }

    /// An interrupt controller that records every line change.
    #[derive(Default)]
    pub struct RecordingIrqChip {
        /// `(gsi, level)` in call order.
        pub events: Mutex<Vec<(u32, bool)>>,
        /// When set, every call fails as a backend error would.
        pub fail: bool,
    }

    impl RecordingIrqChip {
        /// Returns the recorded events and clears the record.
        pub fn take(&self) -> Vec<(u32, bool)> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }

        /// Returns how many times `gsi` went from low to high.
        pub fn rising_edges(&self, gsi: u32) -> usize {
            self.events
                .lock()
                .unwrap()
                .iter()
                .filter(|&&(line, level)| line == gsi && level)
                .count()
        }
    }

    impl IrqChip for RecordingIrqChip {
        fn set_irq(&self, gsi: u32, level: bool) -> Result<(), HypervisorError> {
            if self.fail {
                return Err(HypervisorError::InvalidIrq { gsi, max: 0 });
            }
            self.events.lock().unwrap().push((gsi, level));
            Ok(())
        }
    }

    /// A platform that records power-off and reset requests.
    #[derive(Default)]
    pub struct RecordingPlatform {
        pub requests: Mutex<Vec<PlatformRequest>>,
    }

    impl PlatformControl for RecordingPlatform {
        fn request(&self, request: PlatformRequest) {
            self.requests.lock().unwrap().push(request);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::test_utils::{ManualClock, RecordingIrqChip, RecordingPlatform};
    use super::*;
    use crate::hypervisor::IrqChip;

    /// A xorshift64 generator, so that the random-access test is repeatable.
    struct Xorshift(u64);

    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Sends `count` random reads and writes to `device`: offsets mostly inside
    /// `0..range` with some far outside, and sizes 0 to 8 bytes.
    fn hammer(device: &mut dyn BusDevice, range: u64, seed: u64, count: usize) {
        let mut random = Xorshift(seed);
        for _ in 0..count {
            let choice = random.next();
            let offset = if choice % 16 == 0 {
                random.next()
            } else {
                random.next() % range
            };
            let len = (choice >> 8) as usize % 9;
            let mut data = [0u8; 8];
            if choice & 0x10 != 0 {
                device.read(offset, &mut data[..len]);
            } else {
                data = random.next().to_le_bytes();
                device.write(offset, &data[..len]);
            }
        }
    }

    #[test]
    fn random_accesses_never_panic() {
        let clock = Arc::new(ManualClock::default());
        let chip = Arc::new(RecordingIrqChip::default());
        let platform = Arc::new(RecordingPlatform::default());
        let irq_chip = Arc::new(irq_chip::EmulatedIrqChip::new(clock.clone(), 1_000_000).unwrap());
        let mut devices: Vec<(Box<dyn BusDevice>, u64)> = vec![
            (
                Box::new(serial::Serial::new(
                    chip.clone(),
                    4,
                    Box::new(std::io::sink()),
                )),
                serial::SERIAL_PORT_LEN,
            ),
            (
                Box::new(i8042::I8042::new(chip.clone(), platform.clone())),
                5,
            ),
            (Box::new(rtc::Rtc::new(clock.clone(), 1 << 30)), 2),
            (Box::new(pit::Pit::new(clock.clone())), 5),
            (Box::new(pic::Pic::new()), 6),
            (Box::new(ioapic::Ioapic::new()), 0x20),
            (
                Box::new(lapic::Lapic::new(0, clock.clone(), 1_000_000).unwrap()),
                lapic::LAPIC_MMIO_LEN,
            ),
            (
                Box::new(acpi_pm::AcpiPm::new(platform.clone(), clock.clone())),
                0x10,
            ),
        ];
        for WindowedDevice { windows, device } in irq_chip.bus_devices() {
            let len = windows
                .iter()
                .map(|w| w.offset + w.range.len)
                .max()
                .unwrap();
            devices.push((Box::new(SharedDevice(device)), len));
        }

        // Clocks near the end of their range must not overflow any arithmetic.
        let epochs = [0, u64::MAX / 2, u64::MAX - 30_000_000_000];
        for (index, (device, range)) in devices.iter_mut().enumerate() {
            for (round, epoch) in (0..30u64).zip(epochs.iter().cycle()) {
                clock
                    .monotonic
                    .store(epoch + 1_000_003 * round, Ordering::SeqCst);
                clock
                    .wall
                    .store(epoch + 7_000_001 * round, Ordering::SeqCst);
                let seed = 0x9e37_79b9 + index as u64 * 97 + round;
                hammer(device.as_mut(), *range, seed, 5_000);
            }
        }

        // The interrupt controllers stay usable after the barrage.
        for gsi in [0, 1, 4, 8, 16, 23] {
            irq_chip.pulse_irq(gsi).unwrap();
        }
        let acknowledged = (0..1000)
            .take_while(|_| irq_chip.acknowledge().is_some())
            .count();
        assert!(acknowledged < 1000, "acknowledge keeps returning vectors");
    }

    /// A bus device reached through its shared handle, as the bus stores it.
    struct SharedDevice(Arc<Mutex<dyn BusDevice>>);

    impl BusDevice for SharedDevice {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.0.lock().unwrap().read(offset, data);
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().write(offset, data);
        }
    }

    #[test]
    fn guest_error_log_counts_every_access() {
        let mut log = GuestErrorLog::default();
        for i in 0..100u64 {
            log.record("test", format_args!("access {i}"));
        }
        assert_eq!(log.count(), 100);
    }
}
