//! Console input: feeds host bytes into the guest's 16550 as fast as the guest reads them.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::core::devices::serial::Serial;

/// Maximum wait for the guest to drain the receive FIFO before trying again, which bounds
/// the delay if a drain notification is missed.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Delivers console input to a UART whose receive FIFO holds only a few bytes.
#[derive(Clone)]
pub struct ConsoleInput {
    serial: Arc<Mutex<Serial>>,
    drained: Arc<(Mutex<bool>, Condvar)>,
}

impl ConsoleInput {
    /// Wraps `serial` and registers the drain hook that wakes blocked senders.
    pub fn new(serial: Arc<Mutex<Serial>>) -> Self {
        let drained = Arc::new((Mutex::new(false), Condvar::new()));
        {
            let drained = drained.clone();
            let guard = serial.lock().unwrap_or_else(|e| e.into_inner());
            guard.set_input_drained_hook(Box::new(move || {
                *drained.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
                drained.1.notify_all();
            }));
        }
        ConsoleInput { serial, drained }
    }

    /// Sends every byte of `input`, waiting while the FIFO is full. Returns early, with
    /// the number of bytes delivered, once `stopped` returns true.
    pub fn send(&self, input: &[u8], stopped: &dyn Fn() -> bool) -> usize {
        let mut sent = 0;
        while sent < input.len() {
            let taken = self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(&input[sent..]);
            sent += taken;
            if sent == input.len() || stopped() {
                break;
            }
            if taken == 0 {
                let (flag, condvar) = &*self.drained;
                let mut drained = flag.lock().unwrap_or_else(|e| e.into_inner());
                if !*drained {
                    drained = condvar
                        .wait_timeout(drained, DRAIN_POLL)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                *drained = false;
            }
        }
        sent
    }
}
