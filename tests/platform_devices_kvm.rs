//! Runs NASM-assembled guests on /dev/kvm with no in-kernel interrupt controller, so every
//! port and APIC access reaches the user-space platform devices. One real-mode guest uses
//! the 16550, the CMOS RTC, the PIT with port 0x61, the i8042, the PIC pair inside
//! `EmulatedIrqChip`, and the ACPI PM block. One 32-bit guest takes its interrupts through
//! the LAPIC (timer, self-IPI) and the IOAPIC (serial input).
//!
//! Time is virtual: every port or MMIO access moves the clock by one microsecond, and a
//! halt jumps it to the next timer deadline, so the outcome does not depend on the host's
//! speed. Interrupts are injected only when the guest halts, which both guests do while
//! they wait.
//!
//! Needs `nasm`. Without a usable /dev/kvm the test prints why and passes, unless
//! MONSTERVM_REQUIRE_KVM=1 is set.

#![cfg(target_os = "linux")]

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

use monstervm::core::devices::acpi_pm::{AcpiPm, ACPI_PM_WINDOWS};
use monstervm::core::devices::i8042::{I8042, I8042_WINDOWS};
use monstervm::core::devices::irq_chip::EmulatedIrqChip;
use monstervm::core::devices::pit::{Pit, PIT_IRQ, PIT_WINDOWS};
use monstervm::core::devices::rtc::{Rtc, RTC_WINDOWS};
use monstervm::core::devices::serial::{Serial, COM1_IRQ, COM1_WINDOWS};
use monstervm::core::devices::{Bus, Clock, PlatformControl, PlatformRequest, WindowedDevice};
use monstervm::core::vm::VmIo;
use monstervm::hypervisor::{IoHandler, IrqChip};

const GUEST_MEMORY: usize = 1 << 20;
const LOAD_ADDRESS: u64 = 0x1000;
/// Virtual time that one port access takes.
const ACCESS_NS: u64 = 1_000;
/// 2024-02-29 23:59:58.5 UTC, half a second away from any update-in-progress window.
const WALL_START_NS: u64 = 1_709_251_198_500_000_000;
/// Upper bound on vCPU exits; each guest needs a few thousand.
const MAX_EXITS: usize = 100_000;

/// A clock that moves only when the test moves it.
struct VirtualClock {
    monotonic: AtomicU64,
}

impl VirtualClock {
    fn advance(&self, ns: u64) {
        self.monotonic.fetch_add(ns, Ordering::SeqCst);
    }

    fn advance_to(&self, ns: u64) {
        self.monotonic.fetch_max(ns, Ordering::SeqCst);
    }
}

impl Clock for VirtualClock {
    fn monotonic_ns(&self) -> u64 {
        self.monotonic.load(Ordering::SeqCst)
    }

    fn wall_ns(&self) -> u64 {
        WALL_START_NS + self.monotonic_ns()
    }
}

#[derive(Default)]
struct RecordingPlatform {
    requests: Mutex<Vec<PlatformRequest>>,
}

impl PlatformControl for RecordingPlatform {
    fn request(&self, request: PlatformRequest) {
        self.requests.lock().unwrap().push(request);
    }
}

/// A serial sink that the test reads after the run.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Guest RAM mapped in this process, unmapped on drop.
struct GuestRam {
    host: *mut u8,
    len: usize,
}

impl GuestRam {
    fn new(len: usize) -> Self {
        // SAFETY: an anonymous private mapping with no address hint touches no existing
        // memory; the result is checked against MAP_FAILED below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED, "mmap of guest RAM failed");
        GuestRam {
            host: host.cast(),
            len,
        }
    }

    fn load(&mut self, address: u64, bytes: &[u8]) {
        let start = usize::try_from(address).unwrap();
        assert!(start + bytes.len() <= self.len, "guest image does not fit");
        // SAFETY: the range was checked against the mapping's length just above, and the
        // mapping is writable and owned by `self`.
        let ram = unsafe { std::slice::from_raw_parts_mut(self.host, self.len) };
        ram[start..start + bytes.len()].copy_from_slice(bytes);
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `host` and `len` describe the mapping created in `new`, which nothing
        // uses after the VM that referenced it has been dropped.
        unsafe {
            libc::munmap(self.host.cast(), self.len);
        }
    }
}

fn assemble_guest(dir: &Path, name: &str) -> Vec<u8> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/guests")
        .join(format!("{name}.asm"));
    let output = dir.join(format!("{name}.bin"));
    let status = Command::new("nasm")
        .args(["-f", "bin", "-o"])
        .arg(&output)
        .arg(&source)
        .status()
        .expect("failed to run nasm: install it (Debian package nasm)");
    assert!(status.success(), "nasm failed on {}", source.display());
    std::fs::read(&output).unwrap()
}

/// Returns KVM, or `None` after printing why the test skips.
fn open_kvm() -> Option<Kvm> {
    let required = std::env::var("MONSTERVM_REQUIRE_KVM").is_ok_and(|v| v == "1");
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) if !required => {
            eprintln!("skipping: /dev/kvm is not usable ({e}); set MONSTERVM_REQUIRE_KVM=1 to fail instead");
            None
        }
        Err(e) => panic!("/dev/kvm is not usable: {e}"),
    }
}

/// The platform devices of a PC on a port bus and an MMIO bus.
struct Machine {
    clock: Arc<VirtualClock>,
    platform: Arc<RecordingPlatform>,
    chip: Arc<EmulatedIrqChip>,
    console: Console,
    pit: Arc<Mutex<Pit>>,
    serial: Arc<Mutex<Serial>>,
    io: VmIo,
}

impl Machine {
    fn new() -> Self {
        let clock = Arc::new(VirtualClock {
            monotonic: AtomicU64::new(0),
        });
        let platform = Arc::new(RecordingPlatform::default());
        let chip = Arc::new(EmulatedIrqChip::new(clock.clone(), 1_000_000_000).unwrap());
        let console = Console::default();
        let pit = Arc::new(Mutex::new(Pit::new(clock.clone())));
        let serial = Arc::new(Mutex::new(Serial::new(
            chip.clone(),
            COM1_IRQ,
            Box::new(console.clone()),
        )));

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        pio.insert_windows(&COM1_WINDOWS, serial.clone()).unwrap();
        pio.insert_windows(&PIT_WINDOWS, pit.clone()).unwrap();
        pio.insert_windows(
            &RTC_WINDOWS,
            Arc::new(Mutex::new(Rtc::new(clock.clone(), GUEST_MEMORY as u64))),
        )
        .unwrap();
        pio.insert_windows(
            &I8042_WINDOWS,
            Arc::new(Mutex::new(I8042::new(chip.clone(), platform.clone()))),
        )
        .unwrap();
        pio.insert_windows(
            &ACPI_PM_WINDOWS,
            Arc::new(Mutex::new(AcpiPm::new(platform.clone(), clock.clone()))),
        )
        .unwrap();
        for WindowedDevice { windows, device } in chip.bus_devices() {
            let bus = if windows[0].range.base > 0xffff {
                &mut mmio
            } else {
                &mut pio
            };
            bus.insert_windows(windows, device).unwrap();
        }

        Machine {
            clock,
            platform,
            chip,
            console,
            pit,
            serial,
            io: VmIo::new(pio, mmio),
        }
    }

    fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.console.0.lock().unwrap()).into_owned()
    }

    /// Runs `image` from [`LOAD_ADDRESS`] in real mode until the guest requests a power-off
    /// or reset. At each halt, `wake` returns the vector to inject. Returns the injected
    /// vectors.
    fn run(&self, kvm: &Kvm, image: &[u8], mut wake: impl FnMut(&Machine) -> u8) -> Vec<u8> {
        let mut ram = GuestRam::new(GUEST_MEMORY);
        ram.load(LOAD_ADDRESS, image);
        let vm = kvm.create_vm().expect("KVM_CREATE_VM failed");
        // Intel CPUs without unrestricted guest run real mode through a TSS in this page.
        let _ = vm.set_tss_address(0xfffb_d000);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: GUEST_MEMORY as u64,
            userspace_addr: ram.host as u64,
        };
        // SAFETY: the region describes `ram`, which outlives `vm` because it is declared
        // first and dropped last.
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION failed");
        let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU failed");
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = LOAD_ADDRESS;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs).unwrap();

        let mut injected = Vec::new();
        for _ in 0..MAX_EXITS {
            match vcpu.run().expect("KVM_RUN failed") {
                VcpuExit::IoOut(port, data) => {
                    self.clock.advance(ACCESS_NS);
                    self.io.pio_write(port, data);
                }
                VcpuExit::IoIn(port, data) => {
                    self.clock.advance(ACCESS_NS);
                    self.io.pio_read(port, data);
                }
                VcpuExit::MmioWrite(address, data) => {
                    self.clock.advance(ACCESS_NS);
                    self.io.mmio_write(address, data);
                }
                VcpuExit::MmioRead(address, data) => {
                    self.clock.advance(ACCESS_NS);
                    self.io.mmio_read(address, data);
                }
                VcpuExit::Hlt => {
                    let vector = wake(self);
                    injected.push(vector);
                    let mut events = vcpu.get_vcpu_events().unwrap();
                    events.interrupt.injected = 1;
                    events.interrupt.nr = vector;
                    events.interrupt.soft = 0;
                    vcpu.set_vcpu_events(&events).unwrap();
                }
                other => {
                    let exit = format!("{other:?}");
                    let rip = vcpu.get_regs().map(|regs| regs.rip);
                    panic!(
                        "unexpected exit {exit} at rip {rip:x?}; console so far: {:?}",
                        self.console_text()
                    );
                }
            }
            if !self.platform.requests.lock().unwrap().is_empty() {
                return injected;
            }
        }
        panic!(
            "the guest did not power off within {MAX_EXITS} exits; console so far: {:?}",
            self.console_text()
        );
    }
}

#[test]
fn real_mode_guest_drives_platform_devices() {
    let Some(kvm) = open_kvm() else {
        return;
    };
    let workdir = tempfile::tempdir().unwrap();
    let image = assemble_guest(workdir.path(), "platform_devices");
    let machine = Machine::new();

    let injected = machine.run(&kvm, &image, |m| {
        let now = m.clock.monotonic_ns();
        let deadline = m
            .pit
            .lock()
            .unwrap()
            .next_deadline(now)
            .expect("the guest halted with no PIT interrupt armed");
        m.clock.advance_to(deadline);
        if m.pit.lock().unwrap().advance(deadline) > 0 {
            m.chip.pulse_irq(PIT_IRQ).unwrap();
        }
        m.chip
            .acknowledge()
            .expect("the PIT edge left no interrupt pending")
    });

    assert_eq!(
        machine.console_text(),
        "boot\r\n2024\r\npit ok\r\n55\r\nTTT\r\n"
    );
    assert_eq!(
        *machine.platform.requests.lock().unwrap(),
        [PlatformRequest::PowerOff]
    );
    assert_eq!(injected, [0x20, 0x20, 0x20], "IRQ 0 at the remapped base");
    assert!(!machine.chip.interrupt_pending());
}

#[test]
fn protected_mode_guest_uses_lapic_and_ioapic() {
    let Some(kvm) = open_kvm() else {
        return;
    };
    let workdir = tempfile::tempdir().unwrap();
    let image = assemble_guest(workdir.path(), "apic_devices");
    let machine = Machine::new();
    let mut input_sent = false;

    let injected = machine.run(&kvm, &image, |m| {
        if !m.chip.interrupt_pending() {
            let now = m.clock.monotonic_ns();
            if let Some(deadline) = m.chip.next_deadline(now) {
                m.clock.advance_to(deadline);
                assert!(m.chip.advance(deadline), "the LAPIC timer was due");
            } else if !input_sent {
                input_sent = true;
                assert_eq!(m.serial.lock().unwrap().enqueue_input(b"ok"), 2);
            } else {
                panic!(
                    "the guest halted with nothing to wake it: {:?}",
                    m.console_text()
                );
            }
        }
        m.chip
            .acknowledge()
            .expect("the wake-up left no interrupt pending")
    });

    assert_eq!(machine.console_text(), "apic\r\nTTT\r\nI\r\nok\r\n");
    assert_eq!(injected, [0x30, 0x30, 0x30, 0x32, 0x31]);
    assert_eq!(
        *machine.platform.requests.lock().unwrap(),
        [PlatformRequest::PowerOff]
    );
    assert!(!machine.chip.interrupt_pending());
}
