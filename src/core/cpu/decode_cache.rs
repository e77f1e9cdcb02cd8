//! Decoded-instruction caches, keyed by guest-physical address, and the per-page write
//! generations that invalidate them.
//!
//! [`BlockCache`] holds straight-line runs of decoded instructions (blocks), which the
//! interpreter executes without fetching, translating or looking up each instruction;
//! [`DecodeCache`] holds single instructions for the cases a block cannot serve
//! (single-stepping, instructions that cross a page, code in MMIO).
//!
//! Every 4 KiB page of guest RAM has a 32-bit stamp in [`CodeWatch`]. Bit 0 is set once
//! some CPU decoded code from the page, and the other bits count writes made while bit 0
//! was set. A cached instruction stores the stamp it was decoded under and is used only
//! while the stamp is unchanged. So a write to a code page retires every cached
//! instruction of that page, whether it comes from the CPU's own stores, from another CPU
//! or from device DMA through [`CodeWatch::invalidate`]. The cost is one atomic load per
//! store.

use std::sync::atomic::{AtomicU32, Ordering};

use iced_x86::Instruction;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use super::exceptions::Exception;
use super::ops::fast::{self, FastHandler, Operands};
use super::ops::{handler, Handler};

/// Write stamps of every guest RAM page, shared by all CPUs and DMA-capable devices.
pub struct CodeWatch {
    stamps: Box<[AtomicU32]>,
}

impl CodeWatch {
    /// Creates stamps for every page up to the last byte of `memory`.
    pub fn new(memory: &GuestMemoryMmap) -> Self {
        Self::with_pages((memory.last_addr().0 >> 12) + 1)
    }

    /// Creates stamps for `pages` pages of 4 KiB starting at guest-physical 0.
    pub fn with_pages(pages: u64) -> Self {
        let stamps = (0..pages).map(|_| AtomicU32::new(0)).collect();
        CodeWatch { stamps }
    }

    /// Invalidates decoded code in the guest-physical range `[gpa, gpa + len)`.
    ///
    /// Devices call this after DMA into guest RAM; it is cheap for pages that hold no
    /// decoded code and safe to call from any thread.
    pub fn invalidate(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> 12;
        let last = gpa.saturating_add(len - 1) >> 12;
        for page in first..=last.min(self.stamps.len() as u64 - 1) {
            self.note_write(page);
        }
    }

    /// Records a write to `page`: bumps its stamp if code was decoded from it.
    #[inline]
    pub fn note_write(&self, page: u64) {
        if let Some(stamp) = self.stamps.get(page as usize) {
            if stamp.load(Ordering::Relaxed) & 1 != 0 {
                // Adding one to an odd stamp clears bit 0 and carries into the count.
                stamp.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Marks `page` as holding decoded code and returns its stamp, or `None` for a page
    /// outside RAM, whose code is never cached.
    pub(crate) fn mark_code(&self, page: u64) -> Option<u32> {
        let stamp = self.stamps.get(page as usize)?;
        Some(stamp.fetch_or(1, Ordering::AcqRel) | 1)
    }

    #[inline]
    pub(crate) fn stamp(&self, page: u64) -> u32 {
        self.stamps
            .get(page as usize)
            .map_or(0, |stamp| stamp.load(Ordering::Acquire))
    }
}

/// Number of single-instruction cache entries; a power of two.
const CACHE_SIZE: usize = 4096;

/// Number of block cache slots; a power of two.
const BLOCK_SLOTS: usize = 16384;

/// Maximum number of instructions in one block, which bounds the latency of interrupts (taken only
/// between blocks) and the cost of decoding a block that runs once.
pub(crate) const BLOCK_MAX_INSTRUCTIONS: usize = 64;

/// One decoded instruction of a block.
pub(crate) struct BlockEntry {
    pub(crate) instruction: Instruction,
    /// The function that executes `instruction`.
    pub(crate) handler: Handler,
    /// A specialized handler for `operands`, which replaces `handler` when present.
    pub(crate) fast: Option<FastHandler>,
    pub(crate) operands: Operands,
    /// Length of the instruction in bytes.
    pub(crate) len: u8,
    /// Whether the instruction may write memory, after which the block checks that its
    /// code page is unchanged.
    pub(crate) writes_memory: bool,
}

/// Instructions decoded from consecutive addresses of one page, executed in order until
/// one branches, faults or writes to the page.
pub(crate) struct Block {
    /// `tag(phys, bits)` of the first instruction.
    tag: u64,
    /// Stamp of the code page when the block was decoded.
    pub(crate) stamp: u32,
    /// Guest-physical page number of every instruction in the block.
    pub(crate) page: u64,
    pub(crate) entries: Vec<BlockEntry>,
}

impl Block {
    /// Starts an empty block for the code at `phys` in `bits`-bit mode, decoded under
    /// `stamp` (from [`CodeWatch::mark_code`], taken before reading the bytes).
    pub(crate) fn new(phys: u64, bits: u32, stamp: u32) -> Self {
        Block {
            tag: tag(phys, bits),
            stamp,
            page: phys >> 12,
            entries: Vec::with_capacity(16),
        }
    }

    /// Appends a decoded instruction.
    pub(crate) fn push(&mut self, instruction: &Instruction) {
        let specialized = if self.tag & 3 == tag(0, 64) {
            fast::select(instruction)
        } else {
            None
        };
        let (fast, operands) = match specialized {
            Some((fast, operands)) => (Some(fast), operands),
            None => (None, Operands::EMPTY),
        };
        self.entries.push(BlockEntry {
            instruction: *instruction,
            handler: handler(instruction),
            fast,
            operands,
            len: instruction.len() as u8,
            writes_memory: may_write_memory(instruction),
        });
    }
}

/// Returns whether `instruction` may write guest memory: it has a memory operand (the
/// destination or not, which is conservative), uses the stack, or is a string or
/// system instruction with implicit memory operands.
fn may_write_memory(instruction: &Instruction) -> bool {
    use iced_x86::OpKind;
    (0..instruction.op_count()).any(|n| {
        matches!(
            instruction.op_kind(n),
            OpKind::Memory
                | OpKind::MemorySegSI
                | OpKind::MemorySegESI
                | OpKind::MemorySegRSI
                | OpKind::MemorySegDI
                | OpKind::MemorySegEDI
                | OpKind::MemorySegRDI
                | OpKind::MemoryESDI
                | OpKind::MemoryESEDI
                | OpKind::MemoryESRDI
        )
    }) || instruction.stack_pointer_increment() != 0
        || instruction.op_count() == 0
}

/// A direct-mapped cache of blocks.
///
/// The interpreter takes a block out of its slot to run it and puts it back afterwards,
/// so that the handlers can borrow the CPU mutably while the block is borrowed too.
pub(crate) struct BlockCache {
    slots: Box<[Option<Box<Block>>]>,
    /// Lookups that had to decode a block.
    pub(crate) misses: u64,
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockCache {
    /// Creates an empty cache.
    pub(crate) fn new() -> Self {
        BlockCache {
            slots: (0..BLOCK_SLOTS).map(|_| None).collect(),
            misses: 0,
        }
    }

    /// Takes the valid block that starts at `phys` for `bits`-bit code out of its slot.
    #[inline]
    pub(crate) fn take(&mut self, watch: &CodeWatch, phys: u64, bits: u32) -> Option<Box<Block>> {
        let slot = &mut self.slots[block_slot(phys)];
        match slot {
            Some(block)
                if block.tag == tag(phys, bits) && block.stamp == watch.stamp(phys >> 12) =>
            {
                slot.take()
            }
            _ => {
                self.misses += 1;
                None
            }
        }
    }

    /// Puts a block (taken or newly decoded) into its slot, replacing what is there.
    #[inline]
    pub(crate) fn put(&mut self, block: Box<Block>) {
        let index = block_slot(block.tag >> 2);
        self.slots[index] = Some(block);
    }

    /// Drops every block.
    pub(crate) fn clear(&mut self) {
        self.slots.iter_mut().for_each(|slot| *slot = None);
    }
}

#[inline]
fn block_slot(phys: u64) -> usize {
    (phys ^ (phys >> 12) ^ (phys >> 25)) as usize & (BLOCK_SLOTS - 1)
}

#[derive(Clone, Copy)]
struct Entry {
    /// `phys << 2 | bits / 32` (1, 2 or 3 for 16, 32 and 64-bit code); zero when empty.
    tag: u64,
    stamp: u32,
    instruction: Instruction,
    /// The function that executes `instruction`, chosen when it was decoded.
    handler: Handler,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            tag: 0,
            stamp: 0,
            instruction: Instruction::default(),
            handler: |_, _, _| Err(Exception::ud().into()),
        }
    }
}

/// A direct-mapped cache of decoded instructions that lie within one page.
pub(crate) struct DecodeCache {
    entries: Box<[Entry]>,
    /// Lookups that had to decode.
    pub(crate) misses: u64,
}

impl Default for DecodeCache {
    fn default() -> Self {
        Self::new()
    }
}

#[inline]
fn tag(phys: u64, bits: u32) -> u64 {
    phys << 2 | u64::from(bits / 32 + 1)
}

#[inline]
fn slot(phys: u64) -> usize {
    (phys ^ (phys >> 13)) as usize & (CACHE_SIZE - 1)
}

impl DecodeCache {
    /// Creates an empty cache.
    pub(crate) fn new() -> Self {
        DecodeCache {
            // One more entry than slots: the scratch entry for uncacheable instructions.
            entries: vec![Entry::default(); CACHE_SIZE + 1].into_boxed_slice(),
            misses: 0,
        }
    }

    /// Returns the slot of the instruction decoded at `phys` for `bits`-bit code, if it
    /// is still valid.
    #[inline]
    pub(crate) fn get(&mut self, watch: &CodeWatch, phys: u64, bits: u32) -> Option<usize> {
        let index = slot(phys);
        let entry = &self.entries[index];
        if entry.tag == tag(phys, bits) && entry.stamp == watch.stamp(phys >> 12) {
            Some(index)
        } else {
            self.misses += 1;
            None
        }
    }

    /// Returns the instruction in `slot` (from `get`, `insert` or `scratch`) and the
    /// handler that executes it.
    #[inline]
    pub(crate) fn instruction(&self, slot: usize) -> (Instruction, Handler) {
        let entry = &self.entries[slot];
        (entry.instruction, entry.handler)
    }

    /// Stores an instruction that must not be cached (it crosses a page or was fetched
    /// from MMIO) in the scratch slot and returns that slot.
    pub(crate) fn scratch(&mut self, instruction: &Instruction) -> usize {
        self.entries[CACHE_SIZE] = Entry {
            tag: 0,
            stamp: 0,
            instruction: *instruction,
            handler: handler(instruction),
        };
        CACHE_SIZE
    }

    /// Starts caching the code page of `phys`; returns the stamp to pass to `insert`.
    ///
    /// Call this before reading the instruction bytes, so that a write racing with the
    /// read changes the stamp and the entry is never used.
    pub(crate) fn begin_decode(&self, watch: &CodeWatch, phys: u64) -> Option<u32> {
        watch.mark_code(phys >> 12)
    }

    /// Stores `instruction`, decoded at `phys` under `stamp`, and returns its slot.
    pub(crate) fn insert(
        &mut self,
        phys: u64,
        bits: u32,
        stamp: u32,
        instruction: &Instruction,
    ) -> usize {
        let index = slot(phys);
        self.entries[index] = Entry {
            tag: tag(phys, bits),
            stamp,
            instruction: *instruction,
            handler: handler(instruction),
        };
        index
    }

    /// Drops every entry.
    pub(crate) fn clear(&mut self) {
        self.entries.fill(Entry::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_to_code_page_invalidates() {
        let watch = CodeWatch::with_pages(4);
        let mut cache = DecodeCache::new();
        let instruction = Instruction::default();
        let stamp = cache.begin_decode(&watch, 0x1010).unwrap();
        cache.insert(0x1010, 64, stamp, &instruction);
        assert_eq!(cache.get(&watch, 0x1010, 64), Some(slot(0x1010)));
        assert!(cache.get(&watch, 0x1010, 32).is_none(), "other code size");

        watch.invalidate(0x1fff, 1);
        assert!(cache.get(&watch, 0x1010, 64).is_none());
    }

    #[test]
    fn write_to_data_page_keeps_stamp() {
        let watch = CodeWatch::with_pages(4);
        let before = watch.stamp(2);
        watch.invalidate(0x2000, 0x1000);
        assert_eq!(watch.stamp(2), before);
        watch.invalidate(0x3000, u64::MAX);
    }
}
