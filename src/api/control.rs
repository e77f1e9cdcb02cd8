//! [`VmHandle`] over the VM's [`VmControl`] and its serial hub: what the VMM process serves.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::handle::{
    ActionError, ExitCounts, SerialCounters, VmAction, VmHandle, VmInfo, VmMetrics, VmState,
};
use crate::api::serial::{SerialHub, SerialSubscription};
use crate::core::vm::{StopReason, VmControl, VmIo};
use crate::hypervisor::VcpuStats;

/// Writes host bytes into the guest's serial input (the 16550 receive buffer). It may
/// block while the guest's FIFO is full, because it runs on the handle's input thread.
pub type SerialInput = Arc<dyn Fn(&[u8]) + Send + Sync>;
/// Reads every vCPU's counters while the vCPUs run.
pub type StatsReader = Arc<dyn Fn() -> Vec<VcpuStats> + Send + Sync>;
/// Asks the guest to shut down and power off; the VMM's real VMs type Ctrl-Alt-Del.
pub type PowerButton = Arc<dyn Fn() + Send + Sync>;

/// The parts of one boot of the VM that the handle drives. A reset replaces them.
#[derive(Clone)]
pub struct Boot {
    pub control: Arc<VmControl>,
    pub io: Arc<VmIo>,
    pub serial_input: SerialInput,
    /// `None` when the backend keeps its counters inside the vCPU threads.
    pub stats: Option<StatsReader>,
    /// `None` when the machine has no power button, so that a stop ends the vCPUs at once.
    pub power_button: Option<PowerButton>,
    /// Backend name reported by `GET /vm`.
    pub backend: String,
}

/// Fixed facts about the VM that the handle reports.
pub struct VmIdentity {
    pub name: String,
    pub vcpus: u8,
    pub memory_mib: u64,
}

/// How long a pause waits for every vCPU to leave guest code. A vCPU returns to the VMM
/// within one emulator time slice or one KVM exit, far below this.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Console input chunks queued for the guest before new input is dropped.
pub const INPUT_QUEUE_CHUNKS: usize = 256;

/// The VMM's [`VmHandle`]: actions go to the current boot's [`VmControl`].
///
/// Console input goes through a thread of its own, because delivering it waits for the
/// guest to drain its serial FIFO (forever while the VM is paused), and the API server
/// must keep serving meanwhile.
pub struct ControlHandle {
    identity: VmIdentity,
    started: Instant,
    serial: SerialHub,
    boot: Arc<Mutex<Option<Boot>>>,
    input: mpsc::SyncSender<Vec<u8>>,
    dropped_input: AtomicU64,
    boots: AtomicU32,
    /// Set by a stop that arrives while no boot is attached, so the VMM does not boot again.
    stop_requested: AtomicBool,
    reset_requested: AtomicBool,
    /// Set when a boot ended because the guest kernel reported a panic.
    guest_panicked: AtomicBool,
}

impl ControlHandle {
    /// Creates the handle and its input thread, which ends when the handle is dropped.
    pub fn new(identity: VmIdentity, serial: SerialHub) -> std::io::Result<ControlHandle> {
        let boot: Arc<Mutex<Option<Boot>>> = Arc::default();
        let (input, queued) = mpsc::sync_channel::<Vec<u8>>(INPUT_QUEUE_CHUNKS);
        let target = boot.clone();
        std::thread::Builder::new()
            .name("serial-input".into())
            .spawn(move || {
                for bytes in queued {
                    let current = target.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(boot) = current {
                        (boot.serial_input)(&bytes);
                    }
                }
            })?;
        Ok(ControlHandle {
            identity,
            started: Instant::now(),
            serial,
            boot,
            input,
            dropped_input: AtomicU64::new(0),
            boots: AtomicU32::new(0),
            stop_requested: AtomicBool::new(false),
            reset_requested: AtomicBool::new(false),
            guest_panicked: AtomicBool::new(false),
        })
    }

    /// Makes `boot` the target of actions. Returns false, and applies a pending stop to
    /// `boot`, when a stop arrived while the VM was being built.
    pub fn attach(&self, boot: Boot) -> bool {
        let mut current = self.boot.lock().unwrap_or_else(|e| e.into_inner());
        self.boots.fetch_add(1, Ordering::Relaxed);
        let stop = self.stop_requested.load(Ordering::SeqCst);
        if stop {
            boot.control.request_stop(StopReason::UserStop);
        }
        *current = Some(boot);
        !stop
    }

    /// Detaches the finished boot and returns whether an API reset asked to boot again.
    pub fn detach(&self) -> bool {
        let mut current = self.boot.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(Self::panicked) {
            self.guest_panicked.store(true, Ordering::SeqCst);
        }
        *current = None;
        let reset = self.reset_requested.swap(false, Ordering::SeqCst);
        reset && !self.stop_requested.load(Ordering::SeqCst)
    }

    /// Returns the serial hub that this handle's consoles read from.
    pub fn serial(&self) -> &SerialHub {
        &self.serial
    }

    fn panicked(boot: &Boot) -> bool {
        boot.control.stop_reason() == Some(StopReason::GuestPanic)
    }

    fn current(&self) -> Option<Boot> {
        self.boot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn state_of(&self, boot: Option<&Boot>) -> VmState {
        match boot {
            _ if self.stop_requested.load(Ordering::SeqCst) => VmState::Stopping,
            None => VmState::Starting,
            Some(boot) if boot.control.stop_reason().is_some() => VmState::Stopping,
            Some(boot) if boot.control.is_paused() => VmState::Paused,
            Some(_) => VmState::Running,
        }
    }

    /// Pauses the current boot and waits until its vCPUs have parked. The wait happens
    /// without the boot lock, so that `GET /vm` and other actions keep being served.
    fn pause(&self) -> Result<(), ActionError> {
        let name = &self.identity.name;
        let control = {
            let current = self.boot.lock().unwrap_or_else(|e| e.into_inner());
            match (self.state_of(current.as_ref()), current.as_ref()) {
                (VmState::Running, Some(boot)) => boot.control.clone(),
                (state, _) => return Err(self.reject(VmAction::Pause, state)),
            }
        };
        tracing::info!(vm = %name, "pause requested through the API");
        control
            .pause(PAUSE_TIMEOUT)
            .map_err(|timeout| ActionError::PauseTimedOut {
                name: name.clone(),
                parked: timeout.parked,
                vcpus: timeout.vcpus,
                timeout_secs: PAUSE_TIMEOUT.as_secs(),
            })
    }

    fn reject(&self, action: VmAction, state: VmState) -> ActionError {
        ActionError::InvalidState {
            name: self.identity.name.clone(),
            action,
            state,
        }
    }
}

impl VmHandle for ControlHandle {
    fn info(&self) -> VmInfo {
        let boot = self.current();
        let guest_panicked =
            self.guest_panicked.load(Ordering::SeqCst) || boot.as_ref().is_some_and(Self::panicked);
        VmInfo {
            guest_panicked,
            name: self.identity.name.clone(),
            state: self.state_of(boot.as_ref()),
            backend: boot.map(|b| b.backend).unwrap_or_default(),
            vcpus: self.identity.vcpus,
            memory_mib: self.identity.memory_mib,
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            boots: self.boots.load(Ordering::Relaxed),
        }
    }

    fn action(&self, action: VmAction) -> Result<(), ActionError> {
        if action == VmAction::Pause {
            return self.pause();
        }
        // The lock keeps `attach` from slipping a new boot in between the check and the act.
        let current = self.boot.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.state_of(current.as_ref());
        let name = &self.identity.name;
        match (action, state, current.as_ref()) {
            (VmAction::ForceStop, _, boot) => {
                self.stop_requested.store(true, Ordering::SeqCst);
                tracing::info!(vm = %name, "forced stop requested through the API; ending the vCPUs");
                if let Some(boot) = boot {
                    boot.control.request_stop(StopReason::UserStop);
                }
                Ok(())
            }
            (VmAction::Stop, VmState::Stopping, _) => Ok(()),
            (VmAction::Stop, _, boot) => {
                self.stop_requested.store(true, Ordering::SeqCst);
                match boot {
                    // A paused guest cannot act on the request, so it is stopped at once.
                    Some(Boot {
                        power_button: Some(press),
                        control,
                        ..
                    }) if !control.is_paused() => {
                        tracing::info!(vm = %name, "stop requested through the API; asking the guest to power off");
                        press();
                    }
                    Some(boot) => {
                        tracing::info!(vm = %name, "stop requested through the API; ending the vCPUs");
                        boot.control.request_stop(StopReason::UserStop);
                    }
                    None => {
                        tracing::info!(vm = %name, "stop requested through the API before boot")
                    }
                }
                Ok(())
            }
            (VmAction::Shutdown, VmState::Running, Some(boot)) => {
                let Some(press) = &boot.power_button else {
                    return Err(ActionError::NoShutdownRequest { name: name.clone() });
                };
                tracing::info!(vm = %name, "shutdown requested through the API; asking the guest to power off");
                press();
                Ok(())
            }
            (VmAction::Resume, VmState::Paused, Some(boot)) => {
                tracing::info!(vm = %name, "resume requested through the API");
                boot.control.resume();
                Ok(())
            }
            (VmAction::Reset, VmState::Running | VmState::Paused, Some(boot)) => {
                tracing::info!(vm = %name, "reset requested through the API");
                self.reset_requested.store(true, Ordering::SeqCst);
                boot.control.request_stop(StopReason::Reset);
                Ok(())
            }
            (action, state, _) => Err(self.reject(action, state)),
        }
    }

    fn metrics(&self) -> VmMetrics {
        let boot = self.current();
        let stats = boot
            .as_ref()
            .and_then(|b| b.stats.as_ref())
            .map(|read| read());
        let exits = stats.as_ref().map(|all| ExitCounts {
            pio: all.iter().map(|s| s.pio_exits).sum(),
            mmio: all.iter().map(|s| s.mmio_exits).sum(),
            halt: all.iter().map(|s| s.halt_exits).sum(),
        });
        let instructions = stats.map(|all| all.iter().map(|s| s.instructions).sum());
        VmMetrics {
            uptime_secs: self.started.elapsed().as_secs_f64(),
            memory_mib: self.identity.memory_mib,
            exits,
            instructions,
            unclaimed_io_accesses: boot.map_or(0, |b| b.io.unclaimed_accesses()),
            serial: SerialCounters {
                bytes_out: self.serial.bytes_out(),
                bytes_in: self.serial.bytes_in(),
                viewers: self.serial.viewers(),
            },
        }
    }

    fn subscribe_serial(&self) -> SerialSubscription {
        self.serial.subscribe()
    }

    fn send_serial(&self, bytes: &[u8]) {
        self.serial.record_input(bytes.len());
        if self.input.try_send(bytes.to_vec()).is_err() {
            // Only a guest that stopped reading (or a paused VM) fills the queue, so
            // the first loss is logged and later ones are only counted.
            if self.dropped_input.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(vm = %self.identity.name, "serial input queue is full; dropping console input");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn handle() -> ControlHandle {
        let identity = VmIdentity {
            name: "t".into(),
            vcpus: 1,
            memory_mib: 16,
        };
        ControlHandle::new(identity, SerialHub::new(None).unwrap()).unwrap()
    }

    fn boot(received: Arc<AtomicUsize>) -> Boot {
        Boot {
            control: VmControl::new(),
            io: Arc::new(VmIo::default()),
            serial_input: Arc::new(move |bytes: &[u8]| {
                received.fetch_add(bytes.len(), Ordering::SeqCst);
            }),
            stats: None,
            power_button: None,
            backend: "emulator".into(),
        }
    }

    #[test]
    fn pause_resume_follow_state() {
        let handle = handle();
        let boot = boot(Arc::default());
        let control = boot.control.clone();
        assert!(handle.attach(boot));

        handle.action(VmAction::Pause).unwrap();
        assert!(control.is_paused());
        assert_eq!(handle.info().state, VmState::Paused);
        let error = handle.action(VmAction::Pause).unwrap_err();
        assert!(
            matches!(
                error,
                ActionError::InvalidState {
                    state: VmState::Paused,
                    ..
                }
            ),
            "{error:?}"
        );

        handle.action(VmAction::Resume).unwrap();
        assert_eq!(handle.info().state, VmState::Running);
        assert!(handle.action(VmAction::Resume).is_err());
    }

    #[test]
    fn blocked_input_keeps_actions_working() {
        let handle = handle();
        let release = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let mut boot = boot(Arc::default());
        let gate = release.clone();
        boot.serial_input = Arc::new(move |_: &[u8]| {
            let (open, wake) = &*gate;
            let mut open = open.lock().unwrap();
            while !*open {
                open = wake.wait(open).unwrap();
            }
        });
        handle.attach(boot);

        handle.send_serial(b"stuck");
        handle.action(VmAction::Pause).unwrap();
        handle.action(VmAction::Resume).unwrap();

        *release.0.lock().unwrap() = true;
        release.1.notify_all();
    }

    #[test]
    fn guest_panic_shows_in_info() {
        let handle = handle();
        let boot = boot(Arc::default());
        let control = boot.control.clone();
        handle.attach(boot);
        assert!(!handle.info().guest_panicked);

        control.request_stop(StopReason::GuestPanic);
        assert!(handle.info().guest_panicked);
        assert!(!handle.detach());
        assert!(
            handle.info().guest_panicked,
            "the panic must outlive the boot"
        );
    }

    #[test]
    fn stop_is_idempotent() {
        let handle = handle();
        let boot = boot(Arc::default());
        let control = boot.control.clone();
        handle.attach(boot);

        handle.action(VmAction::Stop).unwrap();
        handle.action(VmAction::Stop).unwrap();

        assert_eq!(control.stop_reason(), Some(StopReason::UserStop));
        assert_eq!(handle.info().state, VmState::Stopping);
        assert!(handle.action(VmAction::Pause).is_err());
        assert!(!handle.detach());
    }

    #[test]
    fn stop_presses_power_button_once() {
        let handle = handle();
        let presses = Arc::new(AtomicUsize::new(0));
        let mut boot = boot(Arc::default());
        let counter = presses.clone();
        boot.power_button = Some(Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        let control = boot.control.clone();
        handle.attach(boot);

        handle.action(VmAction::Stop).unwrap();
        handle.action(VmAction::Stop).unwrap();

        assert_eq!(presses.load(Ordering::SeqCst), 1);
        assert_eq!(
            control.stop_reason(),
            None,
            "the guest decides when to stop"
        );
        assert_eq!(handle.info().state, VmState::Stopping);
        assert!(!handle.detach(), "no boot after a stop");
    }

    #[test]
    fn force_stop_ends_vcpus_after_stop() {
        let handle = handle();
        let mut boot = boot(Arc::default());
        boot.power_button = Some(Arc::new(|| {}));
        let control = boot.control.clone();
        handle.attach(boot);

        handle.action(VmAction::Stop).unwrap();
        assert_eq!(control.stop_reason(), None);
        handle.action(VmAction::ForceStop).unwrap();

        assert_eq!(control.stop_reason(), Some(StopReason::UserStop));
        assert!(!handle.detach());
    }

    #[test]
    fn shutdown_presses_button_and_keeps_running() {
        let handle = handle();
        let presses = Arc::new(AtomicUsize::new(0));
        let mut boot = boot(Arc::default());
        let counter = presses.clone();
        boot.power_button = Some(Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        let control = boot.control.clone();
        handle.attach(boot);

        handle.action(VmAction::Shutdown).unwrap();
        handle.action(VmAction::Shutdown).unwrap();

        assert_eq!(presses.load(Ordering::SeqCst), 2);
        assert_eq!(control.stop_reason(), None);
        assert_eq!(handle.info().state, VmState::Running);
    }

    #[test]
    fn shutdown_without_button_is_rejected() {
        let handle = handle();
        handle.attach(boot(Arc::default()));

        let error = handle.action(VmAction::Shutdown).unwrap_err();

        assert!(
            matches!(error, ActionError::NoShutdownRequest { .. }),
            "{error:?}"
        );
        assert_eq!(handle.info().state, VmState::Running);
    }

    #[test]
    fn stop_ends_paused_vm_at_once() {
        let handle = handle();
        let mut boot = boot(Arc::default());
        boot.power_button = Some(Arc::new(|| panic!("a paused guest cannot see the button")));
        let control = boot.control.clone();
        handle.attach(boot);
        handle.action(VmAction::Pause).unwrap();

        handle.action(VmAction::Stop).unwrap();

        assert_eq!(control.stop_reason(), Some(StopReason::UserStop));
    }

    #[test]
    fn stop_before_attach_stops_next_boot() {
        let handle = handle();
        assert_eq!(handle.info().state, VmState::Starting);
        handle.action(VmAction::Stop).unwrap();

        let boot = boot(Arc::default());
        let control = boot.control.clone();
        assert!(!handle.attach(boot));
        assert_eq!(control.stop_reason(), Some(StopReason::UserStop));
    }

    #[test]
    fn reset_requests_another_boot() {
        let handle = handle();
        let boot = boot(Arc::default());
        let control = boot.control.clone();
        handle.attach(boot);

        handle.action(VmAction::Reset).unwrap();

        assert_eq!(control.stop_reason(), Some(StopReason::Reset));
        assert!(handle.detach());
        assert!(!handle.detach(), "a reset request is used once");
    }

    #[test]
    fn serial_input_reaches_boot() {
        let handle = handle();
        let received = Arc::new(AtomicUsize::new(0));
        handle.attach(boot(received.clone()));

        handle.send_serial(b"ls\n");

        // Delivery happens on the input thread; a broken path fails by never arriving.
        while received.load(Ordering::SeqCst) < 3 {
            std::thread::yield_now();
        }
        assert_eq!(received.load(Ordering::SeqCst), 3);
        assert_eq!(handle.metrics().serial.bytes_in, 3);
    }
}
