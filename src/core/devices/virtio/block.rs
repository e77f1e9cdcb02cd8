//! virtio-blk (virtio 1.x, section "Block Device") over any [`BlockBackend`].
//!
//! Requests are served on the thread that delivers the driver's notification. Every value
//! in a request (sector numbers, lengths, descriptor layout) comes from the guest and is
//! checked before it reaches the backend. A bad request completes with an error status
//! instead of stopping the device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::{
    device_type, DmaWriteHook, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX,
};
use crate::storage::BlockBackend;

/// Bytes per virtio-blk sector, fixed by the specification.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors per queue.
const QUEUE_SIZE: u16 = 256;
/// Largest data segment the device advertises (`size_max`), in bytes.
const SIZE_MAX: u32 = 1 << 20;
/// Largest number of data segments in one request (`seg_max`): the queue size minus the
/// header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes moved between the backend and guest memory per step of a request.
const CHUNK: usize = 128 << 10;
/// Largest number of ranges in one discard or write-zeroes request.
const MAX_RANGES: u32 = 64;
/// Length of the serial number returned by GET_ID.
const ID_BYTES: usize = 20;

// Feature bits.
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

// Status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Counters of one disk, exported as metrics.
#[derive(Debug, Default)]
pub struct BlockStats {
    pub read_requests: AtomicU64,
    pub write_requests: AtomicU64,
    pub flush_requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub failed_requests: AtomicU64,
    /// Chains so malformed that no status could be written back.
    pub malformed_chains: AtomicU64,
}

/// A request failure, logged at debug level and counted.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("request header is missing or shorter than 16 bytes")]
    ShortHeader,
    #[error("request has no writable status byte")]
    NoStatus,
    #[error("data length {len} is not a multiple of {SECTOR_SIZE} bytes")]
    UnalignedLength { len: u64 },
    #[error("sectors {sector}+{sectors} lie beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("{count} ranges in one request exceed the limit of {MAX_RANGES}")]
    TooManyRanges { count: u64 },
    #[error("unsupported request type {kind}")]
    Unsupported { kind: u32 },
    #[error("guest memory access failed: {0}")]
    Memory(String),
    #[error(transparent)]
    Backend(#[from] crate::storage::StorageError),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported { .. } => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// A virtio-blk device model.
pub struct VirtioBlock {
    name: String,
    disk: Arc<dyn BlockBackend>,
    read_only: bool,
    serial: [u8; ID_BYTES],
    acked_features: u64,
    memory: Option<GuestMemoryMmap>,
    queue: Option<Queue>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    stats: Arc<BlockStats>,
    dma_write_hook: Option<DmaWriteHook>,
}

impl VirtioBlock {
    /// Creates a device over `disk`. `serial` is truncated to 20 bytes; `read_only` forces
    /// read-only even when the backend is writable.
    pub fn new(name: &str, disk: Arc<dyn BlockBackend>, read_only: bool, serial: &str) -> Self {
        let mut id = [0u8; ID_BYTES];
        let bytes = serial.as_bytes();
        let len = bytes.len().min(ID_BYTES);
        id[..len].copy_from_slice(&bytes[..len]);
        VirtioBlock {
            name: name.to_string(),
            read_only: read_only || disk.is_read_only(),
            disk,
            serial: id,
            acked_features: 0,
            memory: None,
            queue: None,
            interrupt: None,
            stats: Arc::new(BlockStats::default()),
            dma_write_hook: None,
        }
    }

    /// Sets the callback called for every guest RAM range the device writes: request data,
    /// status bytes and used-ring entries.
    pub fn set_dma_write_hook(&mut self, hook: DmaWriteHook) {
        self.dma_write_hook = Some(hook);
    }

    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    fn capacity_sectors(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut config = [0u8; 60];
        config[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // One queue.
        config[34..36].copy_from_slice(&1u16.to_le_bytes());
        // Discard: any length up to the whole disk in 32-bit sector counts, one range
        // limit, sector alignment 1.
        config[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_RANGES.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        config[48..52].copy_from_slice(&u32::MAX.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_RANGES.to_le_bytes());
        config[56] = 1;
        config
    }

    /// Serves every available request, then notifies the driver unless it suppressed
    /// notifications.
    fn process_queue(&mut self) {
        let (Some(memory), Some(queue)) = (self.memory.as_ref(), self.queue.as_mut()) else {
            return;
        };
        let mut used_any = false;
        loop {
            // Sets VRING_USED_F_NO_NOTIFY while the device drains the ring; with EVENT_IDX
            // the driver stops notifying by itself once avail_event is behind.
            if let Err(e) = queue.disable_notification(memory) {
                tracing::warn!(device = %self.name, error = ?e, "failed to disable virtio-blk notifications");
                break;
            }
            let mut served = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(memory) {
                let head = chain.head_index();
                let written = serve_chain(
                    &self.disk,
                    self.read_only,
                    &self.serial,
                    &self.stats,
                    memory,
                    chain,
                    self.dma_write_hook.as_ref(),
                );
                if let Err(e) = queue.add_used(memory, head, written) {
                    tracing::warn!(device = %self.name, error = ?e, "failed to return a virtio-blk request to the used ring");
                    break;
                }
                served += 1;
            }
            used_any |= served > 0;

            // Re-arm notifications: with EVENT_IDX this publishes avail_event, without
            // which the driver never notifies again after its first request. Requests
            // that arrived meanwhile are served in another pass, but a pass that serves
            // nothing ends the loop, because a corrupt available index would repeat it
            // forever.
            match queue.enable_notification(memory) {
                Ok(true) if served > 0 => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(device = %self.name, error = ?e, "failed to enable virtio-blk notifications");
                    break;
                }
            }
        }
        if let Some(hook) = &self.dma_write_hook {
            // The used ring: flags, index, one 8-byte entry per slot, then avail_event.
            hook(queue.used_ring(), 6 + 8 * u64::from(queue.size()));
        }
        if used_any && queue.needs_notification(memory).unwrap_or(true) {
            if let Some(interrupt) = &self.interrupt {
                interrupt.notify_queue(0);
            }
        }
    }
}

/// Serves one request and returns the number of bytes written into guest buffers, which
/// it reports to `dma_write_hook`.
fn serve_chain(
    disk: &Arc<dyn BlockBackend>,
    read_only: bool,
    serial: &[u8; ID_BYTES],
    stats: &BlockStats,
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    dma_write_hook: Option<&DmaWriteHook>,
) -> u32 {
    let writable: Vec<(u64, u32)> = match dma_write_hook {
        Some(_) => chain
            .clone()
            .writable()
            .map(|descriptor| (descriptor.addr().0, descriptor.len()))
            .collect(),
        None => Vec::new(),
    };
    let (mut reader, mut writer) = match (chain.clone().reader(memory), chain.writer(memory)) {
        (Ok(reader), Ok(writer)) => (reader, writer),
        _ => {
            stats.malformed_chains.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
    };
    if writer.available_bytes() == 0 {
        stats.malformed_chains.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %RequestError::NoStatus, "virtio-blk request dropped");
        return 0;
    }
    // The last writable byte is the status.
    let data_len = writer.available_bytes() - 1;
    let mut status_writer = match writer.split_at(data_len) {
        Ok(status) => status,
        Err(_) => {
            stats.malformed_chains.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
    };

    let result = execute(disk, read_only, serial, stats, &mut reader, &mut writer);
    let status = match &result {
        Ok(()) => S_OK,
        Err(e) => {
            stats.failed_requests.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "virtio-blk request failed");
            e.status()
        }
    };
    if status_writer.write_obj(status).is_err() {
        stats.malformed_chains.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(hook) = dma_write_hook {
        // Data fills the writable buffers from their start and the status is their last
        // byte.
        report_writes(hook, &writable, 0, writer.bytes_written() as u64);
        report_writes(
            hook,
            &writable,
            data_len as u64,
            status_writer.bytes_written() as u64,
        );
    }
    (writer.bytes_written() + status_writer.bytes_written()) as u32
}

/// Calls `hook` for each guest range that contains bytes `start..start + len` of a chain
/// whose writable buffers are `writable` (address, length), in chain order.
fn report_writes(hook: &DmaWriteHook, writable: &[(u64, u32)], start: u64, len: u64) {
    let end = start.saturating_add(len);
    let mut buffer_start = 0u64;
    for &(address, buffer_len) in writable {
        let buffer_end = buffer_start + u64::from(buffer_len);
        let first = start.max(buffer_start);
        let last = end.min(buffer_end);
        if first < last {
            hook(address.saturating_add(first - buffer_start), last - first);
        }
        if buffer_end >= end {
            break;
        }
        buffer_start = buffer_end;
    }
}

fn execute(
    disk: &Arc<dyn BlockBackend>,
    read_only: bool,
    serial: &[u8; ID_BYTES],
    stats: &BlockStats,
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
) -> Result<(), RequestError> {
    if reader.available_bytes() < 16 {
        return Err(RequestError::ShortHeader);
    }
    let kind: u32 = reader
        .read_obj()
        .map_err(|e| RequestError::Memory(e.to_string()))?;
    let _reserved: u32 = reader
        .read_obj()
        .map_err(|e| RequestError::Memory(e.to_string()))?;
    let sector: u64 = reader
        .read_obj()
        .map_err(|e| RequestError::Memory(e.to_string()))?;
    let capacity = disk.size() / SECTOR_SIZE;

    match kind {
        T_IN => {
            let len = writer.available_bytes() as u64;
            let offset = checked_range(sector, len, capacity)?;
            stats.read_requests.fetch_add(1, Ordering::Relaxed);
            let mut buffer = vec![0u8; CHUNK.min(len as usize)];
            let mut done = 0u64;
            while done < len {
                let step = CHUNK.min((len - done) as usize);
                disk.read_at(&mut buffer[..step], offset + done)?;
                std::io::Write::write_all(writer, &buffer[..step])
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                done += step as u64;
            }
            stats.read_bytes.fetch_add(len, Ordering::Relaxed);
            Ok(())
        }
        T_OUT => {
            if read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes() as u64;
            let offset = checked_range(sector, len, capacity)?;
            stats.write_requests.fetch_add(1, Ordering::Relaxed);
            let mut buffer = vec![0u8; CHUNK.min(len as usize)];
            let mut done = 0u64;
            while done < len {
                let step = CHUNK.min((len - done) as usize);
                std::io::Read::read_exact(reader, &mut buffer[..step])
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                disk.write_at(&buffer[..step], offset + done)?;
                done += step as u64;
            }
            stats.written_bytes.fetch_add(len, Ordering::Relaxed);
            Ok(())
        }
        T_FLUSH => {
            stats.flush_requests.fetch_add(1, Ordering::Relaxed);
            disk.flush()?;
            Ok(())
        }
        T_GET_ID => {
            let len = writer.available_bytes().min(ID_BYTES);
            std::io::Write::write_all(writer, &serial[..len])
                .map_err(|e| RequestError::Memory(e.to_string()))
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if read_only {
                return Err(RequestError::ReadOnly);
            }
            let count = reader.available_bytes() as u64 / 16;
            if count > u64::from(MAX_RANGES) {
                return Err(RequestError::TooManyRanges { count });
            }
            for _ in 0..count {
                let range_sector: u64 = reader
                    .read_obj()
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                let sectors: u32 = reader
                    .read_obj()
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                let _flags: u32 = reader
                    .read_obj()
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                let len = u64::from(sectors) * SECTOR_SIZE;
                let offset = checked_range(range_sector, len, capacity)?;
                if kind == T_DISCARD {
                    disk.discard(offset, len)?;
                } else {
                    disk.write_zeroes(offset, len)?;
                }
            }
            Ok(())
        }
        kind => Err(RequestError::Unsupported { kind }),
    }
}

/// Checks that `len` bytes from `sector` are whole sectors inside the disk and returns the
/// byte offset.
fn checked_range(sector: u64, len: u64, capacity: u64) -> Result<u64, RequestError> {
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength { len });
    }
    let sectors = len / SECTOR_SIZE;
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | VIRTIO_RING_F_EVENT_IDX;
        if self.read_only {
            features |= F_RO;
        } else {
            features |= F_DISCARD | F_WRITE_ZEROES;
        }
        features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The writeback byte (offset 32) is only writable with VIRTIO_BLK_F_CONFIG_WCE,
        // which is not offered: every write reaches the backend before completion.
        tracing::debug!(device = %self.name, offset, len = data.len(), "ignored write to virtio-blk config");
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioError> {
        let queue = queues
            .pop()
            .ok_or(VirtioError::QueueNotReady { queue: 0 })?;
        if !queue.ready() {
            return Err(VirtioError::QueueNotReady { queue: 0 });
        }
        self.memory = Some(memory);
        self.queue = Some(queue);
        self.interrupt = Some(interrupt);
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) {
        if queue == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.memory = None;
        self.queue = None;
        self.interrupt = None;
        self.acked_features = 0;
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
