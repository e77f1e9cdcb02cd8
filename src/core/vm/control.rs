//! Stop requests shared between devices, the console and the vCPU threads.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// A pause whose vCPUs did not all park in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parked} of {vcpus} vCPUs parked within {timeout:?}; the VM stays paused and the rest park at their next exit")]
pub struct PauseTimeout {
    pub parked: usize,
    pub vcpus: usize,
    pub timeout: Duration,
}

/// Pause request and the number of vCPUs that honour it, under one lock.
#[derive(Default)]
struct PauseState {
    paused: bool,
    /// vCPU threads waiting in [`VmControl::wait_while_paused`].
    parked: usize,
}

/// The shared stop and pause flags of one VM and the kickers of its vCPUs.
#[derive(Default)]
pub struct VmControl {
    stop: Mutex<Option<StopReason>>,
    kickers: Mutex<Vec<Arc<dyn VcpuKicker>>>,
    pause: Mutex<PauseState>,
    /// Signalled on resume and on stop requests, for parked vCPUs.
    resumed: Condvar,
    /// Signalled when a vCPU parks and on stop requests, for a waiting [`VmControl::pause`].
    parked_changed: Condvar,
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
        // Wake paused vCPUs and a waiting pause too, so they see the stop.
        drop(self.lock_pause());
        self.resumed.notify_all();
        self.parked_changed.notify_all();
        self.kick_all();
    }

    /// Makes every vCPU leave guest code and wait until `resume` or a stop request.
    ///
    /// Returns once every registered vCPU has parked, or a stop is pending, so that no
    /// guest instruction runs after it returns. After `timeout` it returns
    /// [`PauseTimeout`]; the VM stays paused then.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseTimeout> {
        let started = Instant::now();
        let vcpus = self.vcpu_count();
        let mut state = self.lock_pause();
        state.paused = true;
        tracing::info!("VM pause requested");
        self.kick_all();
        while state.parked < vcpus && self.stop_reason().is_none() {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                tracing::warn!(parked = state.parked, vcpus, "vCPUs did not park in time");
                return Err(PauseTimeout {
                    parked: state.parked,
                    vcpus,
                    timeout,
                });
            }
            state = self
                .parked_changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        tracing::info!(
            vcpus,
            wait_us = started.elapsed().as_micros() as u64,
            "VM paused"
        );
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.lock_pause().paused = false;
        tracing::info!("VM resume requested");
        self.resumed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.lock_pause().paused
    }

    /// Returns how many vCPUs wait in [`VmControl::wait_while_paused`] now.
    pub fn parked_vcpus(&self) -> usize {
        self.lock_pause().parked
    }

    /// Blocks the calling vCPU thread while the VM is paused and no stop is pending.
    pub fn wait_while_paused(&self) {
        let mut state = self.lock_pause();
        if !state.paused || self.stop_reason().is_some() {
            return;
        }
        state.parked += 1;
        self.parked_changed.notify_all();
        while state.paused && self.stop_reason().is_none() {
            state = self.resumed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
    }

    fn lock_pause(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn vcpu_count(&self) -> usize {
        self.kickers.lock().unwrap_or_else(|e| e.into_inner()).len()
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
        control.pause(Duration::ZERO).unwrap();
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
        control.pause(Duration::ZERO).unwrap();
        let waiter = {
            let control = control.clone();
            std::thread::spawn(move || control.wait_while_paused())
        };
        control.resume();
        waiter.join().unwrap();
        assert!(!control.is_paused());
    }

    /// Spawns a vCPU thread that runs "guest code" (counts) until kicked, then parks, as
    /// `run_vcpu` does.
    fn spawn_counting_vcpu(
        control: &Arc<VmControl>,
        count: Arc<AtomicUsize>,
    ) -> std::thread::JoinHandle<()> {
        let kicker = Arc::new(FlagKicker::default());
        control.add_kicker(kicker.clone());
        let control = control.clone();
        std::thread::spawn(move || loop {
            if control.stop_reason().is_some() {
                return;
            }
            control.wait_while_paused();
            while !kicker.0.swap(false, Ordering::SeqCst) {
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::yield_now();
            }
        })
    }

    #[derive(Default)]
    struct FlagKicker(std::sync::atomic::AtomicBool);

    impl VcpuKicker for FlagKicker {
        fn kick(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn pause_returns_after_every_vcpu_parks() {
        let control = VmControl::new();
        let counts: Vec<_> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let threads: Vec<_> = counts
            .iter()
            .map(|count| spawn_counting_vcpu(&control, count.clone()))
            .collect();

        control.pause(Duration::from_secs(30)).unwrap();
        let at_pause: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        assert_eq!(control.parked_vcpus(), 3);
        std::thread::sleep(Duration::from_millis(20));
        let later: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        assert_eq!(at_pause, later, "a parked vCPU kept running");

        control.resume();
        control.request_stop(StopReason::UserStop);
        for thread in threads {
            thread.join().unwrap();
        }
    }

    #[test]
    fn pause_times_out_when_vcpu_never_parks() {
        let control = VmControl::new();
        // Registered but never calls wait_while_paused, like a vCPU stuck in a device.
        control.add_kicker(Arc::new(CountingKicker::default()));

        let error = control.pause(Duration::from_millis(10)).unwrap_err();

        assert_eq!(error.parked, 0);
        assert_eq!(error.vcpus, 1);
        assert!(control.is_paused());
    }

    #[test]
    fn stop_ends_waiting_pause() {
        let control = VmControl::new();
        control.add_kicker(Arc::new(CountingKicker::default()));
        let stopper = {
            let control = control.clone();
            std::thread::spawn(move || {
                while !control.is_paused() {
                    std::thread::yield_now();
                }
                control.request_stop(StopReason::UserStop);
            })
        };

        assert!(control.pause(Duration::from_secs(30)).is_ok());
        stopper.join().unwrap();
    }
}
