use std::sync::Mutex;

use super::*;
use crate::core::devices::virtio::testing::TestQueue;
use crate::core::memory::create_guest_memory;
use crate::storage::StorageError;

/// An in-memory disk that records flushes.
#[derive(Debug)]
struct MemoryDisk {
    bytes: Mutex<Vec<u8>>,
    flushes: AtomicU64,
    read_only: bool,
}

impl MemoryDisk {
    fn new(size: usize, read_only: bool) -> Arc<Self> {
        let bytes = (0..size).map(|i| (i / 512) as u8).collect();
        Arc::new(MemoryDisk {
            bytes: Mutex::new(bytes),
            flushes: AtomicU64::new(0),
            read_only,
        })
    }
}

impl BlockBackend for MemoryDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        let bytes = self.bytes.lock().unwrap();
        buf.copy_from_slice(&bytes[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        let mut bytes = self.bytes.lock().unwrap();
        bytes[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), StorageError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        let mut bytes = self.bytes.lock().unwrap();
        bytes[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[derive(Default)]
struct CountingInterrupt(AtomicU64);

impl VirtioInterrupt for CountingInterrupt {
    fn notify_queue(&self, _queue: u16) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn notify_config(&self) {}
}

fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut bytes = kind.to_le_bytes().to_vec();
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&sector.to_le_bytes());
    bytes
}

/// Guest addresses of the data and status buffers of a request made by
/// [`submit_request`].
struct RequestBuffers {
    data: u64,
    status: u64,
}

/// Submits a three-descriptor request of type `kind` at `sector`: the header, `len` bytes
/// of data that start with `payload`, and a status byte of 0xff. The data buffer is
/// device-writable for the request types that return data (`T_IN`, `T_GET_ID`).
fn submit_request(
    queue: &mut TestQueue,
    kind: u32,
    sector: u64,
    payload: &[u8],
    len: u32,
) -> RequestBuffers {
    let device_writes_data = kind == T_IN || kind == T_GET_ID;
    let head = queue.buffer(&header(kind, sector), 16);
    let data = queue.buffer(payload, len);
    let status = queue.buffer(&[0xff], 1);
    queue.submit(&[
        (head, 16, false),
        (data, len, device_writes_data),
        (status, 1, true),
    ]);
    RequestBuffers { data, status }
}

struct Setup {
    memory: GuestMemoryMmap,
    disk: Arc<MemoryDisk>,
    device: VirtioBlock,
    interrupt: Arc<CountingInterrupt>,
}

fn setup(read_only: bool) -> Setup {
    let memory = create_guest_memory(8).unwrap();
    let disk = MemoryDisk::new(64 * 512, false);
    let device = VirtioBlock::new("vda", disk.clone(), read_only, "monstervm-disk-0");
    Setup {
        memory,
        disk,
        device,
        interrupt: Arc::new(CountingInterrupt::default()),
    }
}

fn activate(setup: &mut Setup, queue: &TestQueue) {
    setup
        .device
        .activate(
            setup.memory.clone(),
            vec![queue.device_queue()],
            setup.interrupt.clone(),
        )
        .unwrap();
}

#[test]
fn read_request_copies_sectors() {
    let mut s = setup(false);
    let memory = s.memory.clone();
    let mut queue = TestQueue::new(&memory, 0x10000, 16);
    activate(&mut s, &queue);

    let RequestBuffers { data, status, .. } = submit_request(&mut queue, T_IN, 3, &[], 1024);
    s.device.queue_notify(0);

    assert_eq!(queue.used_index(), 1);
    assert_eq!(queue.used_entry(0), (0, 1025));
    assert_eq!(queue.read(status, 1), vec![S_OK]);
    let bytes = queue.read(data, 1024);
    assert!(bytes[..512].iter().all(|&b| b == 3));
    assert!(bytes[512..].iter().all(|&b| b == 4));
    assert_eq!(s.interrupt.0.load(Ordering::SeqCst), 1);
}

#[test]
fn write_request_reaches_disk_and_flush_is_forwarded() {
    let mut s = setup(false);
    let memory = s.memory.clone();
    let mut queue = TestQueue::new(&memory, 0x10000, 16);
    activate(&mut s, &queue);

    let status = submit_request(&mut queue, T_OUT, 10, &[0xab; 512], 512).status;

    let flush = queue.buffer(&header(T_FLUSH, 0), 16);
    let flush_status = queue.buffer(&[0xff], 1);
    queue.submit(&[(flush, 16, false), (flush_status, 1, true)]);
    s.device.queue_notify(0);

    assert_eq!(queue.read(status, 1), vec![S_OK]);
    assert_eq!(queue.read(flush_status, 1), vec![S_OK]);
    assert!(s.disk.bytes.lock().unwrap()[10 * 512..11 * 512]
        .iter()
        .all(|&b| b == 0xab));
    assert_eq!(s.disk.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn read_only_disk_rejects_writes() {
    let mut s = setup(true);
    assert_ne!(s.device.features() & F_RO, 0);
    let memory = s.memory.clone();
    let mut queue = TestQueue::new(&memory, 0x10000, 16);
    activate(&mut s, &queue);

    let status = submit_request(&mut queue, T_OUT, 0, &[1; 512], 512).status;
    s.device.queue_notify(0);

    assert_eq!(queue.read(status, 1), vec![S_IOERR]);
    assert_eq!(s.disk.bytes.lock().unwrap()[0], 0);
}

#[test]
fn out_of_range_and_unaligned_requests_fail() {
    let mut s = setup(false);
    let memory = s.memory.clone();
    let mut queue = TestQueue::new(&memory, 0x10000, 16);
    activate(&mut s, &queue);

    let mut statuses = Vec::new();
    for (sector, len) in [(63, 1024), (u64::MAX, 512), (0, 100)] {
        statuses.push(submit_request(&mut queue, T_IN, sector, &[], len).status);
    }
    s.device.queue_notify(0);

    assert_eq!(queue.used_index(), 3);
    for status in statuses {
        assert_eq!(queue.read(status, 1), vec![S_IOERR]);
    }
    assert_eq!(s.device.stats().failed_requests.load(Ordering::SeqCst), 3);
}

#[test]
fn get_id_returns_serial_and_unknown_type_is_unsupported() {
    let mut s = setup(false);
    let memory = s.memory.clone();
    let mut queue = TestQueue::new(&memory, 0x10000, 16);
    activate(&mut s, &queue);

    let RequestBuffers {
        data: id, status, ..
    } = submit_request(&mut queue, T_GET_ID, 0, &[], 20);

    let bad = queue.buffer(&header(99, 0), 16);
    let bad_status = queue.buffer(&[0xff], 1);
    queue.submit(&[(bad, 16, false), (bad_status, 1, true)]);
    s.device.queue_notify(0);

    assert_eq!(&queue.read(id, 16), b"monstervm-disk-0");
    assert_eq!(queue.read(status, 1), vec![S_OK]);
    assert_eq!(queue.read(bad_status, 1), vec![S_UNSUPP]);
}

#[test]
fn discard_and_write_zeroes_clear_ranges() {
    let mut s = setup(false);
    let memory = s.memory.clone();
    let mut queue = TestQueue::new(&memory, 0x10000, 16);
    activate(&mut s, &queue);

    let mut range = 5u64.to_le_bytes().to_vec();
    range.extend_from_slice(&2u32.to_le_bytes());
    range.extend_from_slice(&0u32.to_le_bytes());
    let status = submit_request(&mut queue, T_WRITE_ZEROES, 0, &range, 16).status;
    s.device.queue_notify(0);

    assert_eq!(queue.read(status, 1), vec![S_OK]);
    let bytes = s.disk.bytes.lock().unwrap();
    assert!(bytes[5 * 512..7 * 512].iter().all(|&b| b == 0));
    assert!(bytes[7 * 512..8 * 512].iter().all(|&b| b == 7));
}

#[test]
fn malformed_chains_are_completed_without_panic() {
    let mut s = setup(false);
    let memory = s.memory.clone();
    let mut queue = TestQueue::new(&memory, 0x10000, 16);
    activate(&mut s, &queue);

    // No writable status byte.
    let head = queue.buffer(&header(T_IN, 0), 16);
    queue.submit(&[(head, 16, false)]);
    // A buffer outside guest memory.
    queue.submit(&[(0xffff_0000_0000, 16, false), (0x20000, 1, true)]);
    // A short header.
    let short = queue.buffer(&[0; 8], 8);
    let status = queue.buffer(&[0xff], 1);
    queue.submit(&[(short, 8, false), (status, 1, true)]);
    // A descriptor loop: 14 -> 15 -> 14.
    queue.write_descriptor(14, head, 16, 1, 15);
    queue.write_descriptor(15, head, 16, 1, 14);
    queue.publish(14);
    s.device.queue_notify(0);

    assert_eq!(queue.used_index(), 4);
    assert_eq!(queue.read(status, 1), vec![S_IOERR]);
}

#[test]
fn config_reports_capacity_in_sectors() {
    let s = setup(false);
    let mut capacity = [0u8; 8];
    s.device.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 64);
    let mut beyond = [0xffu8; 4];
    s.device.read_config(0x1000, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

/// Guest ranges (address, length) that a DMA write hook was called with.
type RecordedRanges = Arc<Mutex<Vec<(u64, u64)>>>;

/// Records every range passed to a DMA write hook.
fn recording_hook() -> (DmaWriteHook, RecordedRanges) {
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let recorded = ranges.clone();
    let hook: DmaWriteHook = Arc::new(move |gpa, len| recorded.lock().unwrap().push((gpa, len)));
    (hook, ranges)
}

#[test]
fn dma_hook_sees_read_data_and_rings() {
    let mut s = setup(false);
    let (hook, ranges) = recording_hook();
    s.device.set_dma_write_hook(hook);
    let memory = s.memory.clone();
    let mut queue = TestQueue::new(&memory, 0x10000, 16);
    activate(&mut s, &queue);

    // 1536 bytes read into two buffers, so the data spans two descriptors.
    let head = queue.buffer(&header(T_IN, 0), 16);
    let first = queue.buffer(&[], 1024);
    let second = queue.buffer(&[], 512);
    let status = queue.buffer(&[0xff], 1);
    queue.submit(&[
        (head, 16, false),
        (first, 1024, true),
        (second, 512, true),
        (status, 1, true),
    ]);
    s.device.queue_notify(0);

    assert_eq!(queue.read(status, 1), vec![S_OK]);
    let ranges = ranges.lock().unwrap().clone();
    assert!(ranges.contains(&(first, 1024)), "{ranges:x?}");
    assert!(ranges.contains(&(second, 512)), "{ranges:x?}");
    assert!(ranges.contains(&(status, 1)), "{ranges:x?}");
    // The used ring of a 16-entry queue at 0x12000: flags, index, 16 entries, avail_event.
    assert!(ranges.contains(&(0x12000, 6 + 16 * 8)), "{ranges:x?}");
    assert!(
        !ranges.iter().any(|&(gpa, _)| gpa == head),
        "the header is device-readable and must not be reported: {ranges:x?}"
    );
}

#[test]
fn dma_hook_reports_only_status_for_writes() {
    let mut s = setup(false);
    let (hook, ranges) = recording_hook();
    s.device.set_dma_write_hook(hook);
    let memory = s.memory.clone();
    let mut queue = TestQueue::new(&memory, 0x10000, 16);
    activate(&mut s, &queue);

    let RequestBuffers { data, status, .. } =
        submit_request(&mut queue, T_OUT, 1, &[0x5a; 512], 512);
    s.device.queue_notify(0);

    let ranges = ranges.lock().unwrap().clone();
    assert_eq!(ranges[0], (status, 1), "{ranges:x?}");
    assert!(
        !ranges.iter().any(|&(gpa, _)| gpa == data),
        "a disk write only reads guest memory: {ranges:x?}"
    );
}

#[test]
fn dma_hook_invalidates_emulator_code_watch() {
    use crate::core::cpu::CodeWatch;

    let mut s = setup(false);
    let watch = Arc::new(CodeWatch::new(&s.memory));
    let hook_watch = watch.clone();
    s.device
        .set_dma_write_hook(Arc::new(move |gpa, len| hook_watch.invalidate(gpa, len)));
    let memory = s.memory.clone();
    let mut queue = TestQueue::new(&memory, 0x10000, 16);
    activate(&mut s, &queue);

    let data = submit_request(&mut queue, T_IN, 2, &[], 512).data;
    // The device reads the disk into `data` only at the notify below.
    let page = data >> 12;
    let before = watch.mark_code(page).unwrap();
    s.device.queue_notify(0);

    assert_ne!(
        watch.stamp(page),
        before,
        "a disk read into a code page must change the page's stamp"
    );
}

#[test]
fn event_idx_avail_event_follows_served_requests() {
    let mut s = setup(false);
    let memory = s.memory.clone();
    let mut queue = TestQueue::new(&memory, 0x10000, 16);
    let mut device_queue = queue.device_queue();
    device_queue.set_event_idx(true);
    s.device
        .activate(s.memory.clone(), vec![device_queue], s.interrupt.clone())
        .unwrap();
    // avail_event sits after the 16 used-ring entries: base 0x12000 + 4 + 16 * 8.
    let avail_event = |memory: &GuestMemoryMmap| -> u16 {
        vm_memory::Bytes::read_obj(memory, vm_memory::GuestAddress(0x12000 + 4 + 16 * 8)).unwrap()
    };

    for served in 1..=2u16 {
        submit_request(&mut queue, T_IN, 0, &[], 512);
        s.device.queue_notify(0);

        assert_eq!(queue.used_index(), served);
        // A driver notifies only when its new available index passes avail_event, so
        // avail_event must follow every request served.
        assert_eq!(avail_event(&memory), served);
    }
}
