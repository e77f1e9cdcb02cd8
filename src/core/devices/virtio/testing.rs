//! A minimal split-virtqueue driver for device-model tests: it lays out the descriptor
//! table and rings in guest memory and submits chains the way a guest driver does.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_WRITE: u16 = 2;

/// A queue of `size` entries at `base`: descriptors, then the available ring at
/// base + 0x1000, the used ring at base + 0x2000, and data buffers from base + 0x3000.
pub struct TestQueue<'a> {
    memory: &'a GuestMemoryMmap,
    base: u64,
    size: u16,
    next_descriptor: u16,
    avail_index: u16,
    next_buffer: u64,
}

impl<'a> TestQueue<'a> {
    pub fn new(memory: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        TestQueue {
            memory,
            base,
            size,
            next_descriptor: 0,
            avail_index: 0,
            next_buffer: base + 0x3000,
        }
    }

    /// Creates the device-side `Queue` for these rings, ready to use.
    pub fn device_queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        queue.set_desc_table_address(Some(self.base as u32), Some((self.base >> 32) as u32));
        let avail = self.base + 0x1000;
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        let used = self.base + 0x2000;
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        assert!(queue.is_valid(self.memory));
        queue
    }

    /// Allocates a buffer of `len` bytes filled with `data` (zero-padded).
    pub fn buffer(&mut self, data: &[u8], len: u32) -> u64 {
        let address = self.next_buffer;
        let mut bytes = data.to_vec();
        bytes.resize(len as usize, 0);
        self.memory
            .write_slice(&bytes, GuestAddress(address))
            .unwrap();
        self.next_buffer += (u64::from(len) + 15) & !15;
        address
    }

    /// Publishes a chain of (address, length, device-writable) buffers and returns the
    /// head descriptor index.
    pub fn submit(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_descriptor;
        for (i, &(address, len, writable)) in buffers.iter().enumerate() {
            let index = self.next_descriptor;
            self.next_descriptor = (self.next_descriptor + 1) % self.size;
            let mut flags = if writable { DESC_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= DESC_NEXT;
            }
            self.write_descriptor(index, address, len, flags, self.next_descriptor);
        }
        self.publish(head);
        head
    }

    /// Writes descriptor `index` directly, for malformed-chain tests.
    pub fn write_descriptor(&self, index: u16, address: u64, len: u32, flags: u16, next: u16) {
        let entry = GuestAddress(self.base + u64::from(index) * 16);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&address.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.memory.write_slice(&raw, entry).unwrap();
    }

    /// Puts `head` on the available ring.
    pub fn publish(&mut self, head: u16) {
        let avail = self.base + 0x1000;
        let slot = avail + 4 + u64::from(self.avail_index % self.size) * 2;
        self.memory.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_index = self.avail_index.wrapping_add(1);
        self.memory
            .write_obj(self.avail_index, GuestAddress(avail + 2))
            .unwrap();
    }

    /// Returns the used ring's index.
    pub fn used_index(&self) -> u16 {
        self.memory
            .read_obj(GuestAddress(self.base + 0x2000 + 2))
            .unwrap()
    }

    /// Returns used ring entry `n` as (descriptor id, written length).
    pub fn used_entry(&self, n: u16) -> (u32, u32) {
        let entry = self.base + 0x2000 + 4 + u64::from(n % self.size) * 8;
        let id = self.memory.read_obj(GuestAddress(entry)).unwrap();
        let len = self.memory.read_obj(GuestAddress(entry + 4)).unwrap();
        (id, len)
    }

    pub fn read(&self, address: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.memory
            .read_slice(&mut bytes, GuestAddress(address))
            .unwrap();
        bytes
    }
}
