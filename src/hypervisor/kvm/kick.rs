//! Kicking a vCPU thread out of KVM_RUN, and the tick that notices a halted vCPU.
//!
//! A kick sets a pending flag and sends [`kick_signal`] to the thread inside
//! `KvmVcpu::run`. The signal's handler sets `immediate_exit` in that vCPU's `kvm_run`
//! page, so KVM_RUN returns EINTR whether the signal lands inside the ioctl or just
//! before it, and the run loop sees the flag and returns `VcpuExit::Kicked`. A kick
//! while no thread runs the vCPU stays pending and ends the next `run` at once.
//!
//! The same signal also comes from a per-run POSIX timer every [`HALT_CHECK_INTERVAL`].
//! With the in-kernel irqchip, KVM keeps a vCPU that executes HLT inside KVM_RUN until
//! an interrupt arrives, so this tick is how `run` notices a vCPU halted with
//! interrupts disabled.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::hypervisor::{HypervisorError, VcpuKicker};

/// Offset of the kick signal from SIGRTMIN. Other code in the process must leave this
/// real-time signal alone.
pub const KICK_SIGNAL_OFFSET: c_int = 1;
/// Period of the tick that checks whether a vCPU in KVM_RUN has halted for good.
pub const HALT_CHECK_INTERVAL: Duration = Duration::from_millis(20);

/// Returns the signal number that kicks vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// `immediate_exit` byte of the `kvm_run` page of the vCPU that this thread is
    /// running, or null outside `KvmVcpu::run`.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Sets `immediate_exit` of the vCPU that the interrupted thread runs, if any.
extern "C" fn handle_kick_signal(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // A const-initialized thread-local of a type without Drop needs no lazy
    // initialization or destructor registration, so reading it is async-signal-safe.
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: `RunScope` sets the pointer to the `immediate_exit` byte of a mapped
        // `kvm_run` page and clears it before the vCPU, and so the mapping, can go away.
        // The kernel only reads this byte, so a volatile byte write races with nothing.
        unsafe { flag.write_volatile(1) };
    }
}

/// Installs the kick signal handler once per process.
pub fn install_kick_handler() -> Result<(), HypervisorError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        register_signal_handler(kick_signal(), handle_kick_signal).map_err(|e| e.errno())
    });
    result.map_err(|errno| HypervisorError::Kvm {
        call: "sigaction for the vCPU kick signal",
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// Kick state shared by a vCPU and its kickers.
#[derive(Debug, Default)]
pub struct KickState {
    pending: AtomicBool,
    /// The thread inside `KvmVcpu::run`, if any. Kicks signal it while holding this
    /// lock, and `run` clears it under the lock before returning, so a kick never
    /// signals a thread that has left `run` (or exited).
    thread: Mutex<Option<libc::pthread_t>>,
}

impl KickState {
    /// Consumes a pending kick.
    pub fn take_pending(&self) -> bool {
        self.pending.swap(false, Ordering::SeqCst)
    }

    fn set_thread(&self, thread: Option<libc::pthread_t>) {
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = thread;
    }
}

impl VcpuKicker for KickState {
    fn kick(&self) {
        self.pending.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(thread) = *thread {
            // SAFETY: `thread` is inside `run` until it clears this slot, which needs the
            // lock held here, so the pthread_t refers to a live thread.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

/// The part of `KvmVcpu::run` during which kicks and halt ticks reach this thread.
/// Dropping it stops both.
pub struct RunScope<'a> {
    state: &'a KickState,
    timer: libc::timer_t,
}

impl<'a> RunScope<'a> {
    /// Points the signal handler at `immediate_exit`, registers this thread for kicks
    /// and starts the halt tick.
    ///
    /// `immediate_exit` must point into a `kvm_run` mapping that outlives the scope.
    pub fn enter(state: &'a KickState, immediate_exit: *mut u8) -> Result<Self, HypervisorError> {
        install_kick_handler()?;
        unblock_kick_signal()?;
        // SAFETY: the caller keeps the mapping alive for the scope's lifetime. Clearing
        // a `1` left by an earlier kick loses nothing, because `pending` records kicks.
        unsafe { immediate_exit.write_volatile(0) };
        IMMEDIATE_EXIT.with(|cell| cell.set(immediate_exit));
        // SAFETY: pthread_self has no preconditions.
        state.set_thread(Some(unsafe { libc::pthread_self() }));

        match start_halt_tick() {
            Ok(timer) => Ok(RunScope { state, timer }),
            Err(error) => {
                state.set_thread(None);
                IMMEDIATE_EXIT.with(|cell| cell.set(std::ptr::null_mut()));
                Err(error)
            }
        }
    }
}

impl Drop for RunScope<'_> {
    fn drop(&mut self) {
        // SAFETY: `timer` came from timer_create in `enter` and is deleted only here.
        unsafe { libc::timer_delete(self.timer) };
        self.state.set_thread(None);
        IMMEDIATE_EXIT.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

/// Unblocks the kick signal in this thread, which may have inherited a mask that blocks
/// it; a blocked signal would leave the vCPU unkickable.
fn unblock_kick_signal() -> Result<(), HypervisorError> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t and the signal number is a valid real-time signal.
    let result = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    if result != 0 {
        return Err(HypervisorError::Kvm {
            call: "pthread_sigmask for the vCPU kick signal",
            source: std::io::Error::from_raw_os_error(result),
        });
    }
    Ok(())
}

/// Creates a timer that sends the kick signal to this thread every
/// [`HALT_CHECK_INTERVAL`].
fn start_halt_tick() -> Result<libc::timer_t, HypervisorError> {
    let timer_error = |call| HypervisorError::Kvm {
        call,
        source: std::io::Error::last_os_error(),
    };

    // SAFETY: sigevent is plain data, and all-zero is a valid value.
    let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
    event.sigev_notify = libc::SIGEV_THREAD_ID;
    event.sigev_signo = kick_signal();
    // SAFETY: gettid has no preconditions.
    event.sigev_notify_thread_id = unsafe { libc::gettid() };
    let mut timer: libc::timer_t = std::ptr::null_mut();
    // SAFETY: `event` and `timer` are valid for the call; the result is checked.
    if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
        return Err(timer_error("timer_create for the vCPU halt tick"));
    }

    let period = libc::timespec {
        tv_sec: HALT_CHECK_INTERVAL.as_secs() as libc::time_t,
        tv_nsec: HALT_CHECK_INTERVAL.subsec_nanos() as libc::c_long,
    };
    let schedule = libc::itimerspec {
        it_interval: period,
        it_value: period,
    };
    // SAFETY: `timer` was just created; `schedule` is valid for the call.
    if unsafe { libc::timer_settime(timer, 0, &schedule, std::ptr::null_mut()) } != 0 {
        let error = timer_error("timer_settime for the vCPU halt tick");
        // SAFETY: `timer` was created above and is not used again.
        unsafe { libc::timer_delete(timer) };
        return Err(error);
    }
    Ok(timer)
}
