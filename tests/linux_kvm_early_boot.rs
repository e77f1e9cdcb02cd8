//! Starts the real Debian kernel on /dev/kvm with the state and tables that `load_linux`
//! builds, and checks what the kernel's early console prints about them: the command
//! line, the e820 map and the ACPI tables.
//!
//! The vCPU runs the ELF vmlinux extracted from `guest/vmlinuz` (from
//! `monstervm guest fetch`) through the 64-bit entry and the PVH entry, and the bzImage
//! itself in an ignored test because its decompressor is slow here. Serial output on port 0x3f8 is
//! collected, every other port reads as all ones, and the run stops once the kernel has
//! parsed the MADT, at a halt or shutdown, or after a time budget. The budget only bounds
//! the run: the checks are on the output. Skips, saying why, without /dev/kvm (fails
//! instead with MONSTERVM_REQUIRE_KVM=1) or without the kernel.

#![cfg(target_os = "linux")]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit};
use monstervm::core::boot::linux::{load_linux, EntryPreference, LinuxBootSpec};
use monstervm::core::boot::vmlinux::extract_vmlinux;
use monstervm::core::memory::create_guest_memory;
use monstervm::hypervisor::{CpuState, Segment};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

const COM1: u16 = 0x3f8;
/// Line status register value: transmitter empty and holding register empty.
const LSR_IDLE: u8 = 0x60;
/// The line the kernel prints after it has parsed the MADT's interrupt overrides.
const STOP_LINE: &str = "ACPI: Using ACPI (MADT) for SMP configuration information";
/// Bound on the run, because this host's KVM may emulate guest instructions slowly.
const RUN_BUDGET: Duration = Duration::from_secs(600);
/// Bound on a run that starts with the bzImage's decompressor.
const BZIMAGE_RUN_BUDGET: Duration = Duration::from_secs(1800);

fn skip_or_fail(reason: &str) {
    if std::env::var("MONSTERVM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("MONSTERVM_REQUIRE_KVM=1 but {reason}");
    }
    eprintln!("skipping: {reason}");
}

fn kvm_segment_from(segment: &Segment) -> kvm_segment {
    kvm_segment {
        base: segment.base,
        limit: segment.limit,
        selector: segment.selector,
        type_: segment.type_,
        present: u8::from(segment.present),
        dpl: segment.dpl,
        db: u8::from(segment.db),
        s: u8::from(segment.s),
        l: u8::from(segment.l),
        g: u8::from(segment.g),
        avl: 0,
        unusable: u8::from(segment.unusable),
        padding: 0,
    }
}

/// Runs the vCPU from `state` and returns everything written to COM1.
fn run_kernel(memory: &vm_memory::GuestMemoryMmap, state: &CpuState, budget: Duration) -> String {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config::default()).unwrap();
    for (slot, region) in memory.iter().enumerate() {
        let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
        let mapping = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping belongs to `memory`, which outlives the VM.
        unsafe { vm.set_user_memory_region(mapping).unwrap() };
    }

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 {
            // Hide XSAVE and OSXSAVE (and AVX, which needs them) and CMPXCHG16B, because
            // KVM on hosts that emulate guest instructions in software fails on them.
            entry.ecx &= !((1 << 26) | (1 << 27) | (1 << 28) | (1 << 13));
        }
        // Leaf 7 lists AVX2, AVX-512 and other extensions that need XSAVE.
        if entry.function == 7 && entry.index == 0 {
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
    }
    vcpu.set_cpuid2(&cpuid).unwrap();

    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs = kvm_segment_from(&state.cs);
    sregs.ds = kvm_segment_from(&state.ds);
    sregs.es = kvm_segment_from(&state.es);
    sregs.fs = kvm_segment_from(&state.fs);
    sregs.gs = kvm_segment_from(&state.gs);
    sregs.ss = kvm_segment_from(&state.ss);
    sregs.tr = kvm_segment_from(&state.tr);
    sregs.ldt = kvm_segment_from(&state.ldt);
    sregs.gdt.base = state.gdt.base;
    sregs.gdt.limit = state.gdt.limit;
    sregs.idt.base = state.idt.base;
    sregs.idt.limit = state.idt.limit;
    sregs.cr0 = state.cr0;
    sregs.cr3 = state.cr3;
    sregs.cr4 = state.cr4;
    sregs.efer = state.efer;
    vcpu.set_sregs(&sregs).unwrap();

    let mut regs = vcpu.get_regs().unwrap();
    [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi,
    ] = state.gprs[..8].try_into().unwrap();
    regs.rip = state.rip;
    regs.rflags = state.rflags;
    vcpu.set_regs(&regs).unwrap();

    let mut output = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(COM1, data)) => {
                output.extend_from_slice(data);
                if String::from_utf8_lossy(&output).contains(STOP_LINE) {
                    break;
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                data.fill(0xff);
                if port == COM1 + 5 {
                    data[0] = LSR_IDLE;
                }
            }
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(exit) => {
                eprintln!("vCPU stopped: {exit:?}");
                break;
            }
            Err(error) => {
                eprintln!("KVM_RUN failed: {error}");
                break;
            }
        }
    }
    eprintln!("ran {:?}", start.elapsed());
    String::from_utf8_lossy(&output).into_owned()
}

/// Which kernel file to start.
enum KernelFile {
    BzImage,
    Vmlinux,
}

/// Loads the Debian kernel with `entry`, runs it and checks what it printed. Returns
/// without checking, after saying why, where KVM or the kernel is missing.
fn boot_and_check(file: KernelFile, entry: EntryPreference, budget: Duration) {
    if let Err(error) = std::fs::File::open("/dev/kvm") {
        skip_or_fail(&format!("/dev/kvm cannot be opened ({error})"));
        return;
    }
    let vmlinuz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest/vmlinuz");
    if !vmlinuz.is_file() {
        eprintln!(
            "skipping: no {} (run `monstervm guest fetch`)",
            vmlinuz.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = match file {
        KernelFile::BzImage => vmlinuz,
        KernelFile::Vmlinux => {
            let bzimage = std::fs::read(&vmlinuz).unwrap();
            let vmlinux = match extract_vmlinux(&bzimage) {
                Ok(vmlinux) => vmlinux,
                Err(error) => {
                    eprintln!(
                        "skipping: cannot extract vmlinux from {}: {error}",
                        vmlinuz.display()
                    );
                    return;
                }
            };
            let path = dir.path().join("vmlinux");
            std::fs::write(&path, vmlinux).unwrap();
            path
        }
    };

    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 nokaslr panic=-1";
    let memory = create_guest_memory(256).unwrap();
    let spec = LinuxBootSpec {
        cmdline: cmdline.to_string(),
        vcpus: 2,
        entry,
        ..LinuxBootSpec::new(&kernel)
    };
    let boot = load_linux(&memory, &spec).unwrap();
    let console = run_kernel(&memory, &boot.cpu_state, budget);
    eprintln!("{console}");

    assert!(
        console.contains(&format!("Command line: {cmdline}")),
        "command line"
    );
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "low RAM in the e820 map"
    );
    assert!(
        console.contains("BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved"),
        "reserved area in the e820 map"
    );
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "high RAM in the e820 map"
    );
    assert!(
        console.contains("ACPI: RSDP 0x00000000000E0000"),
        "RSDP found"
    );
    for table in ["XSDT", "FACP", "DSDT", "FACS", "APIC"] {
        let listed = console.matches(&format!("ACPI: {table} 0x")).count();
        assert_eq!(listed, 1, "{table} listed {listed} times");
    }
    assert!(
        !console.contains("Incorrect checksum"),
        "a table checksum is wrong"
    );
    assert!(
        console.contains("ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2"),
        "IRQ 0 override"
    );
    assert!(
        console.contains("ACPI: PM-Timer IO Port: 0x608"),
        "PM timer from the FADT"
    );
    assert!(
        console.contains("IOAPIC[0]: apic_id 2"),
        "IOAPIC from the MADT"
    );
    assert!(console.contains(STOP_LINE), "MADT used for SMP");
}

#[test]
fn vmlinux_64bit_entry_reads_tables() {
    boot_and_check(KernelFile::Vmlinux, EntryPreference::Linux64, RUN_BUDGET);
}

#[test]
fn vmlinux_pvh_entry_reads_tables() {
    boot_and_check(KernelFile::Vmlinux, EntryPreference::Pvh, RUN_BUDGET);
}

#[test]
#[ignore = "runs the bzImage's decompressor, which takes minutes on software-emulated KVM"]
fn bzimage_64bit_entry_reads_tables() {
    boot_and_check(
        KernelFile::BzImage,
        EntryPreference::Linux64,
        BZIMAGE_RUN_BUDGET,
    );
}
