//! Stop requests shared between devices, the console and the vCPU threads.

use std::sync::{Arc, Condvar, Mutex};

use crate::core::devices::{PlatformControl, PlatformRequest};
use crate::hypervisor::VcpuKicker;

/// The reason a VM stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked to power off.
    PowerOff,
    /// The guest asked to reset; `run` ends the VM as QEMU's `-no-reboot` does.
    Reset,
    /// The user or an API client asked the VMM to stop.
    UserStop,
    /// The guest kernel reported a panic through the pvpanic device.
    GuestPanic,
}

/// The shared stop and pause flags of one VM and the kickers of its vCPUs.
#[derive(Default)]
pub struct VmControl {
    stop: Mutex<Option<StopReason>>,
    kickers: Mutex<Vec<Arc<dyn VcpuKicker>>>,
    paused: Mutex<bool>,
    resumed: Condvar,
}

impl VmControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a vCPU so that stop requests interrupt it.
    pub fn add_kicker(&self, kicker: Arc<dyn VcpuKicker>) {
        self.kickers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(kicker);
    }

    /// Records `reason` unless a stop is already pending, then kicks every vCPU.
    pub fn request_stop(&self, reason: StopReason) {
        {
            let mut stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
            if stop.is_none() {
                tracing::info!(?reason, "VM stop requested");
                *stop = Some(reason);
            }
        }
        // Wake paused vCPUs too, so they see the stop.
        drop(self.paused.lock().unwrap_or_else(|e| e.into_inner()));
        self.resumed.notify_all();
        self.kick_all();
    }

    /// Makes every vCPU wait at its next exit until `resume` or a stop request.
    pub fn pause(&self) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = true;
        tracing::info!("VM pause requested");
        self.kick_all();
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = false;
        tracing::info!("VM resume requested");
        self.resumed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks the calling vCPU thread while the VM is paused and no stop is pending.
    pub fn wait_while_paused(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        while *paused && self.stop_reason().is_none() {
            paused = self.resumed.wait(paused).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn kick_all(&self) {
        for kicker in self
            .kickers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            kicker.kick();
        }
    }

    /// Returns the pending stop reason, if any.
    pub fn stop_reason(&self) -> Option<StopReason> {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PlatformControl for VmControl {
    fn request(&self, request: PlatformRequest) {
        self.request_stop(match request {
            PlatformRequest::PowerOff => StopReason::PowerOff,
            PlatformRequest::Reset => StopReason::Reset,
            PlatformRequest::GuestPanic => StopReason::GuestPanic,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct CountingKicker(AtomicUsize);

    impl VcpuKicker for CountingKicker {
        fn kick(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn first_stop_reason_wins_and_kicks() {
        let control = VmControl::new();
        let kicker = Arc::new(CountingKicker::default());
        control.add_kicker(kicker.clone());

        control.request(PlatformRequest::PowerOff);
        control.request_stop(StopReason::UserStop);

        assert_eq!(control.stop_reason(), Some(StopReason::PowerOff));
        assert_eq!(kicker.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn stop_releases_paused_vcpu() {
        let control = VmControl::new();
        control.pause();
        assert!(control.is_paused());

        let waiter = {
            let control = control.clone();
            std::thread::spawn(move || control.wait_while_paused())
        };
        control.request_stop(StopReason::UserStop);
        waiter.join().unwrap();
    }

    #[test]
    fn resume_releases_paused_vcpu() {
        let control = VmControl::new();
        control.pause();
        let waiter = {
            let control = control.clone();
            std::thread::spawn(move || control.wait_while_paused())
        };
        control.resume();
        waiter.join().unwrap();
        assert!(!control.is_paused());
    }
}
