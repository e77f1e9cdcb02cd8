//! Fan-out of a VM's serial output to its log file and to live console viewers.
//!
//! The VM's 16550 writes its transmit bytes into a [`SerialSink`]. Each write is appended to
//! `serial.log`, kept in a tail buffer for viewers that attach later, and broadcast to every
//! [`SerialSubscription`]. A viewer that falls more than [`LIVE_QUEUE_CHUNKS`] writes behind
//! loses the oldest chunks instead of slowing the guest down.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use tokio::sync::broadcast;

/// Bytes of past output that a new viewer receives first.
pub const TAIL_BYTES: usize = 64 * 1024;
/// Writes queued per viewer before the slowest viewer starts losing output.
pub const LIVE_QUEUE_CHUNKS: usize = 1024;
/// Size at which `serial.log` is renamed to `serial.log.1` and started afresh, so that a
/// guest printing in a loop cannot fill the host's disk.
pub const MAX_LOG_BYTES: u64 = 16 << 20;

struct LogFile {
    path: PathBuf,
    file: File,
    size: u64,
}

impl LogFile {
    fn open(path: &Path) -> io::Result<LogFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.size + bytes.len() as u64 > MAX_LOG_BYTES {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            std::fs::rename(&self.path, rotated)?;
            *self = LogFile::open(&self.path)?;
        }
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }
}

struct HubInner {
    log: Mutex<Option<LogFile>>,
    tail: Mutex<VecDeque<u8>>,
    live: broadcast::Sender<Bytes>,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    viewers: AtomicU64,
    log_errors: AtomicU64,
}

/// The shared serial fan-out of one VM. Clones share the same buffers and viewers.
#[derive(Clone)]
pub struct SerialHub {
    inner: Arc<HubInner>,
}

impl SerialHub {
    /// Creates a hub that appends to `log_path`, or keeps output in memory only for `None`.
    pub fn new(log_path: Option<&Path>) -> io::Result<SerialHub> {
        let log = log_path.map(LogFile::open).transpose()?;
        let (live, _) = broadcast::channel(LIVE_QUEUE_CHUNKS);
        Ok(SerialHub {
            inner: Arc::new(HubInner {
                log: Mutex::new(log),
                tail: Mutex::new(VecDeque::with_capacity(TAIL_BYTES)),
                live,
                bytes_out: AtomicU64::new(0),
                bytes_in: AtomicU64::new(0),
                viewers: AtomicU64::new(0),
                log_errors: AtomicU64::new(0),
            }),
        })
    }

    /// Returns a writer to pass to the serial device as its output.
    pub fn sink(&self) -> SerialSink {
        SerialSink {
            inner: self.inner.clone(),
        }
    }

    /// Returns the buffered tail and a receiver for everything written after it.
    pub fn subscribe(&self) -> SerialSubscription {
        // Holding the tail lock while subscribing orders this against `publish`, so no
        // byte is both in the history and on the live channel, and none is in neither.
        let tail = self.inner.tail.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.inner.live.subscribe();
        let history = tail.iter().copied().collect();
        drop(tail);

        self.inner.viewers.fetch_add(1, Ordering::Relaxed);
        SerialSubscription {
            history,
            live,
            viewer: ViewerGuard {
                inner: self.inner.clone(),
            },
        }
    }

    /// Counts `count` bytes sent to the guest's serial input.
    pub fn record_input(&self, count: usize) {
        self.inner
            .bytes_in
            .fetch_add(count as u64, Ordering::Relaxed);
    }

    /// Bytes written by the guest so far.
    pub fn bytes_out(&self) -> u64 {
        self.inner.bytes_out.load(Ordering::Relaxed)
    }

    /// Bytes sent to the guest so far.
    pub fn bytes_in(&self) -> u64 {
        self.inner.bytes_in.load(Ordering::Relaxed)
    }

    /// Viewers subscribed now.
    pub fn viewers(&self) -> u64 {
        self.inner.viewers.load(Ordering::Relaxed)
    }
}

impl HubInner {
    fn publish(&self, bytes: &[u8]) {
        self.bytes_out
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);

        if let Some(log) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            if let Err(error) = log.append(bytes) {
                // Count repeats so that a full disk does not flood the VMM log.
                if self.log_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::error!(path = %log.path.display(), %error, "failed to write serial log; later failures are not logged");
                }
            }
        }

        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let keep = bytes.len().min(TAIL_BYTES);
        let excess = (tail.len() + keep).saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
        tail.extend(&bytes[bytes.len() - keep..]);
        // An error only means that nobody is watching.
        let _ = self.live.send(Bytes::copy_from_slice(bytes));
    }
}

/// The `std::io::Write` end of a [`SerialHub`]: the serial device's output.
///
/// Writes never fail, so a broken log file or a slow viewer cannot stop the guest.
#[derive(Clone)]
pub struct SerialSink {
    inner: Arc<HubInner>,
}

impl Write for SerialSink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if !bytes.is_empty() {
            self.inner.publish(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One viewer's view of the serial output.
pub struct SerialSubscription {
    /// Output written before the subscription, at most [`TAIL_BYTES`].
    pub history: Vec<u8>,
    /// Output written after it. `RecvError::Lagged` reports chunks this viewer lost.
    pub live: broadcast::Receiver<Bytes>,
    viewer: ViewerGuard,
}

impl SerialSubscription {
    /// Splits the subscription into its parts; the guard counts the viewer until dropped.
    pub fn into_parts(self) -> (Vec<u8>, broadcast::Receiver<Bytes>, ViewerGuard) {
        (self.history, self.live, self.viewer)
    }
}

/// Counts a connected viewer for the metrics until it is dropped.
pub struct ViewerGuard {
    inner: Arc<HubInner>,
}

impl Drop for ViewerGuard {
    fn drop(&mut self) {
        self.inner.viewers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_log_tail_and_viewer() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let hub = SerialHub::new(Some(&log)).unwrap();
        let mut sink = hub.sink();

        sink.write_all(b"boot\r\n").unwrap();
        let mut subscription = hub.subscribe();
        sink.write_all(b"login: ").unwrap();

        assert_eq!(subscription.history, b"boot\r\n");
        assert_eq!(&subscription.live.try_recv().unwrap()[..], b"login: ");
        assert_eq!(std::fs::read(&log).unwrap(), b"boot\r\nlogin: ");
        assert_eq!(hub.bytes_out(), 13);
    }

    #[test]
    fn tail_keeps_latest_bytes() {
        let hub = SerialHub::new(None).unwrap();
        let mut sink = hub.sink();
        let chunk = vec![b'a'; TAIL_BYTES - 1];

        sink.write_all(&chunk).unwrap();
        sink.write_all(b"xyz").unwrap();

        let history = hub.subscribe().history;
        assert_eq!(history.len(), TAIL_BYTES);
        assert!(history.ends_with(b"axyz"));
    }

    #[test]
    fn oversized_write_keeps_its_end() {
        let hub = SerialHub::new(None).unwrap();
        let mut chunk = vec![b'a'; TAIL_BYTES + 10];
        chunk.extend_from_slice(b"end");

        hub.sink().write_all(&chunk).unwrap();

        let history = hub.subscribe().history;
        assert_eq!(history.len(), TAIL_BYTES);
        assert!(history.ends_with(b"aend"));
    }

    #[test]
    fn viewers_are_counted_until_dropped() {
        let hub = SerialHub::new(None).unwrap();
        let first = hub.subscribe();
        let second = hub.subscribe();
        assert_eq!(hub.viewers(), 2);

        drop(first);
        assert_eq!(hub.viewers(), 1);
        drop(second);
        assert_eq!(hub.viewers(), 0);
    }

    #[test]
    fn log_rotates_at_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(&log, vec![b'x'; MAX_LOG_BYTES as usize - 2]).unwrap();
        let hub = SerialHub::new(Some(&log)).unwrap();

        hub.sink().write_all(b"new").unwrap();

        assert_eq!(std::fs::read(&log).unwrap(), b"new");
        let rotated = dir.path().join("serial.log.1");
        assert_eq!(std::fs::metadata(rotated).unwrap().len(), MAX_LOG_BYTES - 2);
    }
}
