//! Measures whether KVM runs guest instructions at hardware speed.
//!
//! Where the host kernel offers /dev/kvm without hardware virtualization underneath
//! (nested setups that emulate the guest in software), KVM runs guests orders of
//! magnitude slower than the CPU, and the built-in emulator is the faster backend.
//! `--backend auto` runs this probe to tell the two apart.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{CpuidCheck, KvmVm};
use crate::core::boot::embedded::real_mode_state;
use crate::hypervisor::{HypervisorError, IoHandler, Vcpu, VcpuExit, VcpuKicker};

/// Iterations of the probe's `dec ecx; jnz` loop.
const PROBE_ITERATIONS: u32 = 5_000_000;
/// Guest instructions the probe runs when it completes: the loop plus the MOV before
/// it and the OUT after it.
pub const PROBE_INSTRUCTIONS: u64 = 2 * PROBE_ITERATIONS as u64 + 2;
/// Guest instructions per second below which KVM counts as software emulation.
/// A current x86 core retires the probe loop at an estimated 3e9 per second or more (one
/// iteration per cycle). The kvm_pvm module on Linux 6.18, which emulates in software,
/// ran it at 1.9e6 per second on a 2-core cloud VM (`probe_measures_loop` in
/// tests/kvm.rs). 1e8 leaves a wide margin on both sides.
pub const SOFTWARE_SPEED_LIMIT: f64 = 1e8;
/// Time after which the probe stops the guest and rates the part of the loop it ran.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Port the probe guest writes to when the loop ends.
const PROBE_DONE_PORT: u16 = 0xf4;
/// Guest-physical address of the probe code.
const PROBE_CODE_ADDRESS: u16 = 0x1000;
/// Guest RAM given to the probe VM.
const PROBE_MEMORY_BYTES: usize = 0x10000;

/// Returns the probe's real-mode code: `mov ecx, PROBE_ITERATIONS; l: dec ecx; jnz l;
/// out 0xf4, al; hlt`.
fn probe_code() -> Vec<u8> {
    let mut code = vec![0x66, 0xb9];
    code.extend_from_slice(&PROBE_ITERATIONS.to_le_bytes());
    code.extend_from_slice(&[0x66, 0x49, 0x75, 0xfc, 0xe6, PROBE_DONE_PORT as u8, 0xf4]);
    code
}

/// The result of [`probe_hardware_speed`].
#[derive(Debug, Clone, PartialEq)]
pub struct KvmProbe {
    /// Guest instructions that ran.
    pub instructions: u64,
    /// Wall-clock time of the run, from the first KVM_RUN to the exit.
    pub elapsed: Duration,
    /// `instructions` per second of `elapsed`.
    pub instructions_per_second: f64,
    /// Whether the rate reaches [`SOFTWARE_SPEED_LIMIT`], so KVM uses the CPU's
    /// virtualization hardware.
    pub hardware_speed: bool,
}

impl fmt::Display for KvmProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KVM ran {} guest instructions in {:.3} ms ({:.1} million per second, {} the \
             {:.0} million per second that hardware virtualization reaches): {}",
            self.instructions,
            self.elapsed.as_secs_f64() * 1e3,
            self.instructions_per_second / 1e6,
            if self.hardware_speed {
                "above"
            } else {
                "below"
            },
            SOFTWARE_SPEED_LIMIT / 1e6,
            if self.hardware_speed {
                "hardware speed"
            } else {
                "software emulation"
            }
        )
    }
}

/// Kicks the probe vCPU when the guest writes to [`PROBE_DONE_PORT`].
struct ProbeIo {
    kicker: Arc<dyn VcpuKicker>,
    done: AtomicBool,
}

impl IoHandler for ProbeIo {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&self, port: u16, _data: &[u8]) {
        if port == PROBE_DONE_PORT {
            self.done.store(true, Ordering::SeqCst);
            self.kicker.kick();
        }
    }

    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

/// Runs a fixed loop of [`PROBE_INSTRUCTIONS`] guest instructions on a fresh KVM VM and
/// rates KVM's speed.
///
/// The run stops after at most about 500 ms, and then the probe rates the part of the
/// loop that ran. Fails with `HypervisorError::KvmUnavailable` when /dev/kvm is missing
/// or unusable.
pub fn probe_hardware_speed() -> Result<KvmProbe, HypervisorError> {
    let memory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PROBE_MEMORY_BYTES)]).map_err(|e| {
            HypervisorError::ProbeFailed {
                reason: format!("failed to map {PROBE_MEMORY_BYTES:#x} bytes of guest memory: {e}"),
            }
        })?;
    memory
        .write_slice(&probe_code(), GuestAddress(u64::from(PROBE_CODE_ADDRESS)))
        .map_err(|e| HypervisorError::ProbeFailed {
            reason: format!("failed to write the probe code: {e}"),
        })?;

    let vm = KvmVm::new(&memory)?;
    let mut vcpu = vm.new_vcpu(0, CpuidCheck::Skip)?;
    vcpu.set_state(&real_mode_state(0, PROBE_CODE_ADDRESS))?;
    let io = ProbeIo {
        kicker: vcpu.kicker(),
        done: AtomicBool::new(false),
    };

    let (finished, finished_receiver) = mpsc::channel::<()>();
    let watchdog_kicker = vcpu.kicker();
    let watchdog = std::thread::spawn(move || {
        if finished_receiver.recv_timeout(PROBE_TIMEOUT).is_err() {
            watchdog_kicker.kick();
        }
    });
    let start = Instant::now();
    let exit = vcpu.run(&io);
    let elapsed = start.elapsed();
    let _ = finished.send(());
    let _ = watchdog.join();

    let exit = exit?;
    let instructions = if io.done.load(Ordering::SeqCst) {
        PROBE_INSTRUCTIONS
    } else if exit == VcpuExit::Kicked {
        // The watchdog stopped the loop: count the iterations that ECX shows as done.
        let remaining = vcpu.state()?.gprs[1] as u32;
        1 + 2 * u64::from(PROBE_ITERATIONS.saturating_sub(remaining))
    } else {
        return Err(HypervisorError::ProbeFailed {
            reason: format!(
                "the probe guest stopped with {exit:?} before its loop ended\n{}",
                vcpu.state()?
            ),
        });
    };

    let instructions_per_second = instructions as f64 / elapsed.as_secs_f64().max(1e-9);
    Ok(KvmProbe {
        instructions,
        elapsed,
        instructions_per_second,
        hardware_speed: instructions_per_second >= SOFTWARE_SPEED_LIMIT,
    })
}
