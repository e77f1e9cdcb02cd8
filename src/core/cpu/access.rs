//! The CPU's path to memory: segmentation, translation through the TLB or a page walk,
//! and physical accesses to RAM or MMIO.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::bus::CpuBus;
use super::exceptions::{Exception, PF_ID, PF_P, PF_RSVD, PF_US, PF_WR};
use super::mmu::{self, Access, PagingMode, PagingRegisters, WalkError};
use super::msr::is_canonical;
use super::state::{Cpu, Mode, CR0_PG, EFER_NXE, FS, GS, SS};
use super::Exit;

/// Privilege of a memory access, for the user/supervisor page check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// The current privilege level decides (CPL 3 is user).
    Current,
    /// A supervisor access whatever the CPL: descriptor tables, the TSS, and the
    /// kernel stack during interrupt delivery.
    Supervisor,
    /// A user access (interrupt delivery onto a CPL 3 stack).
    User,
}

/// The host mapping of one guest RAM region, cached so that aligned loads and stores skip
/// the region lookup in `GuestMemoryMmap`.
///
/// It is filled only between [`RamWindow::open`] and [`RamWindow::close`], which
/// `Cpu::run` calls around each slice while it borrows the bus, whose memory keeps the
/// mapping alive. `Cpu::run` is the only public entry point that reaches memory, and it
/// opens the window (dropping any stale host address) before its first access.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RamWindow {
    /// Guest-physical address of the region's first byte.
    start: u64,
    /// Length of the region in bytes, or zero when no region is cached.
    len: u64,
    /// Host address of the region's first byte.
    host: usize,
    /// Whether `Cpu::run` is executing, so that a region found now may be cached.
    open: bool,
}

impl RamWindow {
    /// Allows caching for the duration of one `Cpu::run` call.
    pub(crate) fn open(&mut self) {
        *self = RamWindow {
            open: true,
            ..RamWindow::default()
        };
    }

    /// Drops the cached region and stops caching.
    pub(crate) fn close(&mut self) {
        *self = RamWindow::default();
    }

    /// Returns the host address of the `size` bytes at `phys` if they lie in the region.
    #[inline(always)]
    fn host_address(&self, phys: u64, size: u8) -> Option<usize> {
        let offset = phys.wrapping_sub(self.start);
        if offset < self.len && self.len - offset >= u64::from(size) {
            Some(self.host + offset as usize)
        } else {
            None
        }
    }

    /// Caches the RAM region that contains `phys`, if any and if the window is open.
    #[cold]
    fn fill(&mut self, memory: &GuestMemoryMmap, phys: u64) {
        if !self.open {
            return;
        }
        if let Some(region) = memory.find_region(GuestAddress(phys)) {
            if let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) {
                self.start = region.start_addr().0;
                self.len = region.len();
                self.host = host as usize;
            }
        }
    }
}

/// Loads `size` bytes (1, 2, 4 or 8) from host address `host` atomically.
///
/// # Safety
///
/// `host` must point to `size` mapped bytes aligned to `size`.
#[inline(always)]
unsafe fn load_host(host: usize, size: u8) -> u64 {
    // SAFETY: the caller guarantees a mapped, aligned location of this size.
    unsafe {
        match size {
            1 => u64::from(AtomicU8::from_ptr(host as *mut u8).load(Ordering::Relaxed)),
            2 => u64::from(AtomicU16::from_ptr(host as *mut u16).load(Ordering::Relaxed)),
            4 => u64::from(AtomicU32::from_ptr(host as *mut u32).load(Ordering::Relaxed)),
            _ => AtomicU64::from_ptr(host as *mut u64).load(Ordering::Relaxed),
        }
    }
}

/// Stores the low `size` bytes (1, 2, 4 or 8) of `value` at host address `host`
/// atomically.
///
/// # Safety
///
/// `host` must point to `size` mapped, writable bytes aligned to `size`.
#[inline(always)]
unsafe fn store_host(host: usize, size: u8, value: u64) {
    // SAFETY: the caller guarantees a mapped, writable, aligned location of this size.
    unsafe {
        match size {
            1 => AtomicU8::from_ptr(host as *mut u8).store(value as u8, Ordering::Relaxed),
            2 => AtomicU16::from_ptr(host as *mut u16).store(value as u16, Ordering::Relaxed),
            4 => AtomicU32::from_ptr(host as *mut u32).store(value as u32, Ordering::Relaxed),
            _ => AtomicU64::from_ptr(host as *mut u64).store(value, Ordering::Relaxed),
        }
    }
}

impl Cpu {
    pub(crate) fn paging_registers(&self) -> PagingRegisters {
        PagingRegisters {
            cr0: self.cr0,
            cr3: self.cr3,
            cr4: self.cr4,
            efer: self.efer,
        }
    }

    /// Returns the linear address of `offset` in segment `seg`, or #GP/#SS for a
    /// non-canonical address in 64-bit mode.
    ///
    /// NOTE: segment limits and access rights are not checked for data accesses.
    #[inline]
    pub(crate) fn linear(&self, seg: usize, offset: u64) -> Result<u64, Exception> {
        if self.mode() == Mode::Long64 {
            let linear = if seg == FS || seg == GS {
                self.seg[seg].base.wrapping_add(offset)
            } else {
                offset
            };
            if !is_canonical(linear) {
                return Err(if seg == SS {
                    Exception::ss(0)
                } else {
                    Exception::gp(0)
                });
            }
            Ok(linear)
        } else {
            Ok(self.seg[seg].base.wrapping_add(offset) & 0xffff_ffff)
        }
    }

    /// Translates `linear` for `access`, raising #PF on failure.
    #[inline]
    pub(crate) fn translate(
        &mut self,
        bus: &mut dyn CpuBus,
        linear: u64,
        access: Access,
        privilege: Privilege,
    ) -> Result<u64, Exception> {
        if self.cr0 & CR0_PG == 0 {
            return Ok(linear);
        }
        let user = match privilege {
            Privilege::Current => self.cpl() == 3,
            Privilege::Supervisor => false,
            Privilege::User => true,
        };
        if let Some(phys) = self.tlb.lookup(linear, access, user) {
            return Ok(phys);
        }
        self.translate_slow(bus, linear, access, user)
    }

    #[cold]
    #[inline(never)]
    fn translate_slow(
        &mut self,
        bus: &mut dyn CpuBus,
        linear: u64,
        access: Access,
        user: bool,
    ) -> Result<u64, Exception> {
        let regs = self.paging_registers();
        let mut code = 0u32;
        if access == Access::Write {
            code |= PF_WR;
        }
        if user {
            code |= PF_US;
        }
        if access == Access::Execute && self.efer & EFER_NXE != 0 {
            code |= PF_ID;
        }

        let fault = |cpu: &mut Cpu, code: u32| {
            cpu.cr2 = linear;
            Exception::pf(code)
        };
        let t = match mmu::walk(bus.memory(), &regs, linear) {
            Ok(t) => t,
            Err(WalkError::NonCanonical { .. }) => return Err(Exception::gp(0)),
            Err(WalkError::NotPresent { .. }) | Err(WalkError::OutsideRam { .. }) => {
                return Err(fault(self, code));
            }
            Err(WalkError::Reserved { .. }) => return Err(fault(self, code | PF_P | PF_RSVD)),
        };

        let wp = self.cr0 & super::state::CR0_WP != 0;
        let allowed = match access {
            Access::Read => !user || t.user,
            Access::Write => {
                if user {
                    t.user && t.writable
                } else {
                    t.writable || !wp
                }
            }
            Access::Execute => !t.no_execute && (!user || t.user),
        };
        if !allowed {
            return Err(fault(self, code | PF_P));
        }

        mmu::mark_accessed(bus.memory(), &t, access == Access::Write);
        let mut cached = t;
        cached.dirty |= access == Access::Write;
        if regs.mode() != PagingMode::Disabled {
            self.tlb.insert(linear, &cached, &regs);
        }
        Ok(t.phys)
    }

    /// Reads guest-physical memory: RAM directly, anything else through MMIO.
    #[inline]
    pub(crate) fn phys_read(&mut self, bus: &mut dyn CpuBus, phys: u64, data: &mut [u8]) {
        // Callers keep `data` within one page, so it lies in one RAM region or none.
        if let Some(region) = bus.memory().find_region(GuestAddress(phys)) {
            let offset = MemoryRegionAddress(phys - region.start_addr().0);
            if region.read_slice(data, offset).is_ok() {
                return;
            }
        }
        bus.mmio_read(phys, data);
    }

    /// Writes guest-physical memory and invalidates decoded code on the page.
    #[inline]
    pub(crate) fn phys_write(&mut self, bus: &mut dyn CpuBus, phys: u64, data: &[u8]) {
        if let Some(region) = bus.memory().find_region(GuestAddress(phys)) {
            let offset = MemoryRegionAddress(phys - region.start_addr().0);
            if region.write_slice(data, offset).is_ok() {
                self.code_watch.note_write(phys >> 12);
                return;
            }
        }
        bus.mmio_write(phys, data);
    }

    /// Loads a little-endian value of `size` bytes (1, 2, 4 or 8) that does not cross a
    /// page: an aligned RAM access is one load, anything else goes through `phys_read`.
    #[inline(always)]
    pub(crate) fn phys_load(&mut self, bus: &mut dyn CpuBus, phys: u64, size: u8) -> u64 {
        if phys & (u64::from(size) - 1) == 0 {
            if let Some(host) = self.ram.host_address(phys, size) {
                // SAFETY: `host_address` checked that the `size` bytes lie in the cached
                // region, which stays mapped while `run` borrows the bus (see
                // `RamWindow`). The host mapping is page-aligned and `phys` is aligned to
                // `size`, so the atomic types' alignment holds. Atomic loads keep a
                // concurrent write by a device or another vCPU from being a data race.
                return unsafe { load_host(host, size) };
            }
        }
        self.phys_load_slow(bus, phys, size)
    }

    /// `phys_load` for an address outside the cached RAM window or not aligned.
    #[inline(never)]
    fn phys_load_slow(&mut self, bus: &mut dyn CpuBus, phys: u64, size: u8) -> u64 {
        if phys & (u64::from(size) - 1) == 0 {
            self.ram.fill(bus.memory(), phys);
            if let Some(region) = bus.memory().find_region(GuestAddress(phys)) {
                let offset = MemoryRegionAddress(phys - region.start_addr().0);
                let value = match size {
                    1 => region.load::<u8>(offset, Ordering::Relaxed).map(u64::from),
                    2 => region.load::<u16>(offset, Ordering::Relaxed).map(u64::from),
                    4 => region.load::<u32>(offset, Ordering::Relaxed).map(u64::from),
                    _ => region.load::<u64>(offset, Ordering::Relaxed),
                };
                if let Ok(value) = value {
                    return value;
                }
            }
        }
        let mut bytes = [0u8; 8];
        self.phys_read(bus, phys, &mut bytes[..size as usize]);
        u64::from_le_bytes(bytes)
    }

    /// Stores the low `size` bytes of `value` without crossing a page, as `phys_load`.
    #[inline(always)]
    pub(crate) fn phys_store(&mut self, bus: &mut dyn CpuBus, phys: u64, size: u8, value: u64) {
        if phys & (u64::from(size) - 1) == 0 {
            if let Some(host) = self.ram.host_address(phys, size) {
                // SAFETY: as in `phys_load`: the bytes lie in the cached region, which
                // stays mapped during `run`, the address is aligned, and the store is atomic.
                unsafe { store_host(host, size, value) };
                self.code_watch.note_write(phys >> 12);
                return;
            }
        }
        self.phys_store_slow(bus, phys, size, value);
    }

    /// `phys_store` for an address outside the cached RAM window or not aligned.
    #[inline(never)]
    fn phys_store_slow(&mut self, bus: &mut dyn CpuBus, phys: u64, size: u8, value: u64) {
        if phys & (u64::from(size) - 1) == 0 {
            self.ram.fill(bus.memory(), phys);
            if let Some(region) = bus.memory().find_region(GuestAddress(phys)) {
                let offset = MemoryRegionAddress(phys - region.start_addr().0);
                let stored = match size {
                    1 => region.store(value as u8, offset, Ordering::Relaxed),
                    2 => region.store(value as u16, offset, Ordering::Relaxed),
                    4 => region.store(value as u32, offset, Ordering::Relaxed),
                    _ => region.store(value, offset, Ordering::Relaxed),
                };
                if stored.is_ok() {
                    self.code_watch.note_write(phys >> 12);
                    return;
                }
            }
        }
        self.phys_write(bus, phys, &value.to_le_bytes()[..size as usize]);
    }

    /// Reads `data.len()` bytes (at most 4096) at linear address `linear`.
    pub(crate) fn read_linear(
        &mut self,
        bus: &mut dyn CpuBus,
        linear: u64,
        data: &mut [u8],
        privilege: Privilege,
    ) -> Result<(), Exception> {
        let first = (0x1000 - (linear & 0xfff) as usize).min(data.len());
        let phys = self.translate(bus, linear, Access::Read, privilege)?;
        if first == data.len() {
            self.phys_read(bus, phys, data);
            return Ok(());
        }
        let second_linear = self.wrap_linear(linear.wrapping_add(first as u64));
        let second = self.translate(bus, second_linear, Access::Read, privilege)?;
        let (head, tail) = data.split_at_mut(first);
        self.phys_read(bus, phys, head);
        self.phys_read(bus, second, tail);
        Ok(())
    }

    /// Writes `data` (at most 4096 bytes) at linear address `linear`; both pages are
    /// translated before anything is written, so a #PF leaves memory unchanged.
    pub(crate) fn write_linear(
        &mut self,
        bus: &mut dyn CpuBus,
        linear: u64,
        data: &[u8],
        privilege: Privilege,
    ) -> Result<(), Exception> {
        let first = (0x1000 - (linear & 0xfff) as usize).min(data.len());
        let phys = self.translate(bus, linear, Access::Write, privilege)?;
        if first == data.len() {
            self.phys_write(bus, phys, data);
            return Ok(());
        }
        let second_linear = self.wrap_linear(linear.wrapping_add(first as u64));
        let second = self.translate(bus, second_linear, Access::Write, privilege)?;
        self.phys_write(bus, phys, &data[..first]);
        self.phys_write(bus, second, &data[first..]);
        Ok(())
    }

    /// Reads `data.len()` bytes (at most 4096) at `linear` for a read-modify-write
    /// instruction. Both pages are translated as writes, because the processor checks
    /// the destination's write permission before it reads: a #PF reports the W bit.
    pub(crate) fn read_linear_for_write(
        &mut self,
        bus: &mut dyn CpuBus,
        linear: u64,
        data: &mut [u8],
    ) -> Result<(), Exception> {
        let first = (0x1000 - (linear & 0xfff) as usize).min(data.len());
        let phys = self.translate(bus, linear, Access::Write, Privilege::Current)?;
        if first == data.len() {
            self.phys_read(bus, phys, data);
            return Ok(());
        }
        let second_linear = self.wrap_linear(linear.wrapping_add(first as u64));
        let second = self.translate(bus, second_linear, Access::Write, Privilege::Current)?;
        let (head, tail) = data.split_at_mut(first);
        self.phys_read(bus, phys, head);
        self.phys_read(bus, second, tail);
        Ok(())
    }

    /// Truncates a linear address to 32 bits outside long mode.
    #[inline]
    fn wrap_linear(&self, linear: u64) -> u64 {
        if self.long_mode() {
            linear
        } else {
            linear & 0xffff_ffff
        }
    }

    /// Reads a little-endian value of `size` bytes (1, 2, 4 or 8) at `seg:offset`.
    #[inline]
    pub(crate) fn read(
        &mut self,
        bus: &mut dyn CpuBus,
        seg: usize,
        offset: u64,
        size: u8,
    ) -> Result<u64, Exit> {
        let linear = self.linear(seg, offset)?;
        if (linear & 0xfff) + u64::from(size) <= 0x1000 {
            let phys = self.translate(bus, linear, Access::Read, Privilege::Current)?;
            return Ok(self.phys_load(bus, phys, size));
        }
        let mut bytes = [0u8; 8];
        self.read_linear(bus, linear, &mut bytes[..size as usize], Privilege::Current)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Reads the little-endian destination of `size` bytes (1 to 16) of a
    /// read-modify-write instruction at `seg:offset`, checked as a write.
    pub(crate) fn read_for_write(
        &mut self,
        bus: &mut dyn CpuBus,
        seg: usize,
        offset: u64,
        size: u8,
    ) -> Result<u128, Exit> {
        let linear = self.linear(seg, offset)?;
        if size <= 8 && (linear & 0xfff) + u64::from(size) <= 0x1000 {
            let phys = self.translate(bus, linear, Access::Write, Privilege::Current)?;
            return Ok(u128::from(self.phys_load(bus, phys, size)));
        }
        let mut bytes = [0u8; 16];
        self.read_linear_for_write(bus, linear, &mut bytes[..usize::from(size.min(16))])?;
        Ok(u128::from_le_bytes(bytes))
    }

    /// Writes the low `size` bytes of `value` at `seg:offset`.
    #[inline]
    pub(crate) fn write(
        &mut self,
        bus: &mut dyn CpuBus,
        seg: usize,
        offset: u64,
        size: u8,
        value: u64,
    ) -> Result<(), Exit> {
        let linear = self.linear(seg, offset)?;
        if (linear & 0xfff) + u64::from(size) <= 0x1000 {
            let phys = self.translate(bus, linear, Access::Write, Privilege::Current)?;
            self.phys_store(bus, phys, size, value);
            return Ok(());
        }
        let bytes = value.to_le_bytes();
        self.write_linear(bus, linear, &bytes[..size as usize], Privilege::Current)?;
        Ok(())
    }

    /// Reads 16 bytes at `seg:offset`; with `aligned`, a misaligned address raises #GP(0).
    pub(crate) fn read_u128(
        &mut self,
        bus: &mut dyn CpuBus,
        seg: usize,
        offset: u64,
        aligned: bool,
    ) -> Result<u128, Exit> {
        let linear = self.linear(seg, offset)?;
        if aligned && linear & 15 != 0 {
            return Err(Exception::gp(0).into());
        }
        let mut bytes = [0u8; 16];
        self.read_linear(bus, linear, &mut bytes, Privilege::Current)?;
        Ok(u128::from_le_bytes(bytes))
    }

    /// Writes 16 bytes at `seg:offset`; with `aligned`, a misaligned address raises #GP(0).
    pub(crate) fn write_u128(
        &mut self,
        bus: &mut dyn CpuBus,
        seg: usize,
        offset: u64,
        value: u128,
        aligned: bool,
    ) -> Result<(), Exit> {
        let linear = self.linear(seg, offset)?;
        if aligned && linear & 15 != 0 {
            return Err(Exception::gp(0).into());
        }
        self.write_linear(bus, linear, &value.to_le_bytes(), Privilege::Current)?;
        Ok(())
    }

    /// Returns the stack pointer width in bytes: 8 in 64-bit mode, else by SS.B.
    #[inline]
    pub(crate) fn stack_width(&self) -> u8 {
        if self.mode() == Mode::Long64 {
            8
        } else if self.seg[SS].db {
            4
        } else {
            2
        }
    }

    /// Returns RSP masked to the stack width.
    #[inline]
    fn stack_pointer(&self) -> u64 {
        self.gpr[4] & super::flags::size_mask(self.stack_width())
    }

    /// Stores `value` as the new stack pointer, keeping the bits above the stack width.
    #[inline]
    pub(crate) fn set_stack_pointer(&mut self, value: u64) {
        let mask = super::flags::size_mask(self.stack_width());
        self.gpr[4] = (self.gpr[4] & !mask) | (value & mask);
    }

    /// Pushes the low `size` bytes of `value`; RSP changes only if the write succeeds.
    #[inline]
    pub(crate) fn push(&mut self, bus: &mut dyn CpuBus, size: u8, value: u64) -> Result<(), Exit> {
        let sp = self.stack_pointer().wrapping_sub(u64::from(size))
            & super::flags::size_mask(self.stack_width());
        self.write(bus, SS, sp, size, value)?;
        self.set_stack_pointer(sp);
        Ok(())
    }

    /// Pops `size` bytes; RSP changes only if the read succeeds.
    #[inline]
    pub(crate) fn pop(&mut self, bus: &mut dyn CpuBus, size: u8) -> Result<u64, Exit> {
        let value = self.peek(bus, size, 0)?;
        let sp = self.stack_pointer().wrapping_add(u64::from(size));
        self.set_stack_pointer(sp);
        Ok(value)
    }

    /// Reads `size` bytes at `offset` bytes above the stack pointer without popping.
    pub(crate) fn peek(
        &mut self,
        bus: &mut dyn CpuBus,
        size: u8,
        offset: u64,
    ) -> Result<u64, Exit> {
        let sp =
            self.stack_pointer().wrapping_add(offset) & super::flags::size_mask(self.stack_width());
        self.read(bus, SS, sp, size)
    }

    /// Reads a system structure (descriptor table, TSS, IDT) at a linear address.
    pub(crate) fn read_system(
        &mut self,
        bus: &mut dyn CpuBus,
        linear: u64,
        size: u8,
    ) -> Result<u64, Exception> {
        let mut bytes = [0u8; 8];
        self.read_linear(
            bus,
            self.wrap_linear(linear),
            &mut bytes[..size as usize],
            Privilege::Supervisor,
        )?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Writes a system structure field (descriptor accessed and busy bits).
    pub(crate) fn write_system(
        &mut self,
        bus: &mut dyn CpuBus,
        linear: u64,
        size: u8,
        value: u64,
    ) -> Result<(), Exception> {
        let bytes = value.to_le_bytes();
        self.write_linear(
            bus,
            self.wrap_linear(linear),
            &bytes[..size as usize],
            Privilege::Supervisor,
        )
    }
}
