//! The platform as the CPU sees it: guest RAM, port I/O, MMIO, the time stamp counter and
//! the interrupt controller's output.

use vm_memory::GuestMemoryMmap;

/// Access from the CPU core to the rest of the machine.
///
/// The CPU reads and writes guest RAM directly through [`CpuBus::memory`]. Physical
/// addresses outside RAM go to `mmio_read` and `mmio_write`, split so that no access
/// crosses a 4 KiB page. Unclaimed port and MMIO reads are expected to fill `data` with
/// all ones, as on a PC.
pub trait CpuBus {
    /// Guest RAM. It must be the same memory for the whole of one `Cpu::run` call, because
    /// the CPU caches host addresses of its regions until `run` returns.
    fn memory(&self) -> &GuestMemoryMmap;
    /// Reads `data.len()` bytes (1, 2 or 4) from I/O port `port`.
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    /// Writes `data` (1, 2 or 4 bytes) to I/O port `port`.
    fn pio_write(&mut self, port: u16, data: &[u8]);
    /// Reads from the guest-physical address `addr`, which is not RAM.
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]);
    /// Writes to the guest-physical address `addr`, which is not RAM.
    fn mmio_write(&mut self, addr: u64, data: &[u8]);
    /// Returns the guest's time stamp counter before the CPU adds its `IA32_TSC` offset.
    fn tsc(&mut self) -> u64;
    /// Returns whether the interrupt controllers have a maskable interrupt for this CPU.
    fn interrupt_pending(&self) -> bool;
    /// Accepts the highest-priority pending interrupt and returns its vector, or `None`
    /// when it vanished since `interrupt_pending` (a spurious interrupt).
    fn acknowledge_interrupt(&mut self) -> Option<u8>;
}
