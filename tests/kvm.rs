//! The KVM backend against real /dev/kvm, with NASM-assembled guests.
//!
//! Each test skips with a printed reason where KVM cannot be opened, and fails instead
//! when MONSTERVM_REQUIRE_KVM=1.

#![cfg(target_os = "linux")]

mod guests;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use guests::{assemble, load_program, program, EntryMode, RecordingIo, SerialStub, EXIT_PORT};
use monstervm::core::boot::embedded;
use monstervm::core::devices::{Bus, BusDevice, BusRange, PlatformControl, PlatformRequest};
use monstervm::core::memory::create_guest_memory;
use monstervm::core::vm::{Vm, VmControl, VmExit, VmIo};
use monstervm::hypervisor::kvm::{
    open_kvm, probe_hardware_speed, KvmVm, PROBE_INSTRUCTIONS, SOFTWARE_SPEED_LIMIT,
};
use monstervm::hypervisor::{HypervisorError, HypervisorVm, IrqChip, Vcpu, VcpuExit};
use vm_memory::GuestMemoryMmap;

/// Returns whether KVM is usable. Otherwise it prints why the test skips, or panics
/// when MONSTERVM_REQUIRE_KVM=1.
fn kvm_available(test: &str) -> bool {
    match open_kvm() {
        Ok(_) => true,
        Err(error) => {
            if std::env::var("MONSTERVM_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: MONSTERVM_REQUIRE_KVM=1 but KVM is unusable: {error}");
            }
            eprintln!("skipping {test}: {error}");
            false
        }
    }
}

/// A KVM VM with 16 MiB of RAM and vCPU 0, with `io` wired to kick that vCPU.
struct TestVm {
    memory: GuestMemoryMmap,
    vm: KvmVm,
    vcpu: Box<dyn Vcpu>,
    io: RecordingIo,
}

fn new_test_vm(stop_port: u16) -> TestVm {
    let memory = create_guest_memory(16).unwrap();
    let vm = KvmVm::new(&memory).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let io = RecordingIo::new(stop_port);
    io.kicker.set(vcpu.kicker()).ok().unwrap();
    io.irq_chip.set(vm.irq_chip()).ok().unwrap();
    TestVm {
        memory,
        vm,
        vcpu,
        io,
    }
}

/// Assembles and runs the program `name` from the table and checks its final state.
fn run_program(name: &str) {
    if !kvm_available(name) {
        return;
    }
    let program = program(name);
    let code = assemble(name);
    let mut test = new_test_vm(EXIT_PORT);
    let entry = load_program(&test.memory, &code, program.mode);
    test.vcpu.set_state(&entry).unwrap();

    let exit = test.vcpu.run(&test.io).unwrap();

    let state = test.vcpu.state().unwrap();
    let recorded = test.io.recorded.lock().unwrap();
    guests::assert_final_state(program, &exit, &state, &test.memory, &recorded);
}

#[test]
fn real_mode_checksum() {
    run_program("real_checksum");
}

#[test]
fn exit_port_read_completes() {
    run_program("real_exit_read");
}

#[test]
fn protected_mode_crc32() {
    run_program("protected_crc32");
}

#[test]
fn long_mode_page_walk() {
    run_program("long_pagewalk");
}

#[test]
fn lapic_lints_set_like_firmware() {
    run_program("long_lapic");
}

#[test]
fn msi_reaches_guest_handler() {
    run_program("long_msi");
}

#[test]
fn ioapic_line_reaches_guest_handler() {
    run_program("long_ioapic");
}

#[test]
fn msi_outside_apic_window_rejected() {
    if !kvm_available("msi_outside_apic_window_rejected") {
        return;
    }
    let test = new_test_vm(EXIT_PORT);

    let error = test
        .vm
        .irq_chip()
        .signal_msi(0xfed0_0000, 0x40)
        .unwrap_err();

    assert!(error.to_string().contains("0xfed00000"), "{error}");
}

#[test]
fn triple_fault_shuts_down() {
    run_program("triple_fault");
}

#[test]
fn halt_counts_in_stats() {
    if !kvm_available("halt_counts_in_stats") {
        return;
    }
    let mut test = new_test_vm(EXIT_PORT);
    let entry = load_program(&test.memory, &assemble("real_checksum"), EntryMode::Real);
    test.vcpu.set_state(&entry).unwrap();

    assert_eq!(test.vcpu.run(&test.io).unwrap(), VcpuExit::Halted);

    let stats = test.vcpu.stats();
    assert_eq!(stats.halt_exits, 1);
    assert_eq!(stats.pio_exits, 4, "three REP OUTSB bytes and one OUT");
    assert_eq!(stats.mmio_exits, 0);
}

#[test]
fn kick_from_other_thread_stops_guest() {
    if !kvm_available("kick_from_other_thread_stops_guest") {
        return;
    }
    let mut test = new_test_vm(EXIT_PORT);
    let entry = load_program(&test.memory, &assemble("spin"), EntryMode::Real);
    test.vcpu.set_state(&entry).unwrap();
    let kicker = test.vcpu.kicker();
    let kicking = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        kicker.kick();
    });

    let exit = test.vcpu.run(&test.io).unwrap();
    kicking.join().unwrap();

    assert_eq!(exit, VcpuExit::Kicked);
    let state = test.vcpu.state().unwrap();
    assert!(
        (0x8000..0x8010).contains(&state.rip),
        "rip {:#x} left the spin loop",
        state.rip
    );

    // The vCPU resumes where it stopped, and the counter keeps growing.
    let count_before = state.gprs[1] as u32;
    let kicker = test.vcpu.kicker();
    let kicking = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        kicker.kick();
    });
    assert_eq!(test.vcpu.run(&test.io).unwrap(), VcpuExit::Kicked);
    kicking.join().unwrap();
    let count_after = test.vcpu.state().unwrap().gprs[1] as u32;
    assert!(
        count_after > count_before,
        "{count_after} <= {count_before}"
    );
}

#[test]
fn kick_before_run_returns_at_once() {
    if !kvm_available("kick_before_run_returns_at_once") {
        return;
    }
    let mut test = new_test_vm(EXIT_PORT);
    let entry = load_program(&test.memory, &assemble("spin"), EntryMode::Real);
    test.vcpu.set_state(&entry).unwrap();

    test.vcpu.kicker().kick();
    let exit = test.vcpu.run(&test.io).unwrap();

    assert_eq!(exit, VcpuExit::Kicked);
    assert_eq!(
        test.vcpu.state().unwrap().rip,
        0x8000,
        "the guest never ran"
    );
}

#[test]
fn state_round_trips_long_mode() {
    if !kvm_available("state_round_trips_long_mode") {
        return;
    }
    let mut test = new_test_vm(EXIT_PORT);
    let mut entry = guests::entry_state(&test.memory, EntryMode::Long);
    for (i, gpr) in entry.gprs.iter_mut().enumerate() {
        *gpr = 0x0101_0101_0101_0101 * (i as u64 + 1);
    }
    entry.msrs = vec![(0xc000_0082, 0xffff_ffff_8100_0000), (0x174, 0x10)];

    test.vcpu.set_state(&entry).unwrap();
    let state = test.vcpu.state().unwrap();

    assert_eq!(state.gprs, entry.gprs);
    assert_eq!(state.rip, entry.rip);
    assert_eq!(state.cs, entry.cs);
    assert_eq!(state.ss, entry.ss);
    assert_eq!(state.gdt, entry.gdt);
    assert_eq!(state.cr0, entry.cr0);
    assert_eq!(state.cr3, entry.cr3);
    assert_eq!(state.cr4, entry.cr4);
    assert_eq!(state.efer, entry.efer);
    assert!(
        state.msrs.contains(&(0xc000_0082, 0xffff_ffff_8100_0000)),
        "LSTAR"
    );
    assert!(state.msrs.contains(&(0x174, 0x10)), "SYSENTER_CS");
}

#[test]
fn state_rejects_unknown_msr() {
    if !kvm_available("state_rejects_unknown_msr") {
        return;
    }
    let mut test = new_test_vm(EXIT_PORT);
    let mut entry = embedded::real_mode_state(0, 0x8000);
    entry.msrs = vec![(0xdead_0000, 1)];

    let error = test.vcpu.set_state(&entry).unwrap_err();

    assert!(error.to_string().contains("0xdead0000"), "{error}");
}

#[test]
fn irq_line_out_of_range_rejected() {
    if !kvm_available("irq_line_out_of_range_rejected") {
        return;
    }
    let test = new_test_vm(EXIT_PORT);
    let irq_chip: Arc<dyn IrqChip> = test.vm.irq_chip();

    irq_chip.set_irq(4, true).unwrap();
    irq_chip.pulse_irq(23).unwrap();
    let error = irq_chip.set_irq(24, true).unwrap_err();

    assert!(
        matches!(error, HypervisorError::InvalidIrq { gsi: 24, max: 23 }),
        "{error}"
    );
}

#[test]
fn embedded_guest_echoes_and_powers_off() {
    if !kvm_available("embedded_guest_echoes_and_powers_off") {
        return;
    }
    let mut test = new_test_vm(embedded::PM1A_CNT_PORT);
    let entry = embedded::load(&test.memory).unwrap();
    test.vcpu.set_state(&entry).unwrap();
    test.io
        .recorded
        .lock()
        .unwrap()
        .serial
        .input
        .extend(b"hi\rq");

    let exit = test.vcpu.run(&test.io).unwrap();

    assert_eq!(exit, VcpuExit::Kicked, "{}", test.vcpu.state().unwrap());
    let recorded = test.io.recorded.lock().unwrap();
    let output = String::from_utf8_lossy(&recorded.serial.output).into_owned();
    for expected in [
        "MonsterVM boot: real mode\r\n",
        "MonsterVM boot: protected mode\r\n",
        "MonsterVM boot: long mode\r\n",
        "Welcome to the MonsterVM embedded guest.\r\n",
        "TSC: 0x",
        " MHz (timed against PIT channel 2)\r\n",
        "RTC time: unavailable\r\n",
        "Type to echo, 'q' to power off.\r\nhi\r\n\r\nPowering off.\r\n",
    ] {
        assert!(
            output.contains(expected),
            "missing {expected:?} in {output:?}"
        );
    }
    assert!(
        recorded.serial.input.is_empty(),
        "the guest read every byte"
    );
    let power_off = (
        embedded::PM1A_CNT_PORT,
        embedded::PM1A_SLEEP_S5.to_le_bytes().to_vec(),
    );
    assert_eq!(recorded.port_writes.last(), Some(&power_off), "{output}");
}

/// An ACPI PM1a control register that powers the VM off on SLP_EN with SLP_TYP 5.
struct PowerOffStub {
    control: Arc<VmControl>,
    writes: Vec<Vec<u8>>,
}

impl BusDevice for PowerOffStub {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.writes.push(data.to_vec());
        if data == embedded::PM1A_SLEEP_S5.to_le_bytes() {
            self.control.request(PlatformRequest::PowerOff);
        }
    }
}

#[test]
fn embedded_guest_powers_off_vm_loop() {
    if !kvm_available("embedded_guest_powers_off_vm_loop") {
        return;
    }
    let memory = create_guest_memory(16).unwrap();
    let backend: Arc<dyn HypervisorVm> = Arc::new(KvmVm::new(&memory).unwrap());
    let mut vcpu = backend.create_vcpu(0).unwrap();
    vcpu.set_state(&embedded::load(&memory).unwrap()).unwrap();
    let control = VmControl::new();
    let serial = Arc::new(Mutex::new(SerialStub::default()));
    serial.lock().unwrap().input.extend(b"ok q");
    let power = Arc::new(Mutex::new(PowerOffStub {
        control: Arc::clone(&control),
        writes: Vec::new(),
    }));
    let mut pio = Bus::new();
    pio.insert("serial", BusRange::new(0x3f8, 8), serial.clone())
        .unwrap();
    pio.insert(
        "pm1a_cnt",
        BusRange::new(u64::from(embedded::PM1A_CNT_PORT), 2),
        power.clone(),
    )
    .unwrap();
    let io = Arc::new(VmIo::new(pio, Bus::new()));
    let mut vm = Vm::from_parts("embedded".into(), memory, backend, io, control, vec![vcpu]);

    let exit = vm.run().unwrap();

    assert_eq!(exit, VmExit::PowerOff);
    let output = String::from_utf8_lossy(&serial.lock().unwrap().output).into_owned();
    assert!(
        output.contains("Welcome to the MonsterVM embedded guest."),
        "{output}"
    );
    assert!(
        output.contains("power off.\r\nok \r\nPowering off.\r\n"),
        "{output}"
    );
    eprintln!("{output}");
    assert_eq!(power.lock().unwrap().writes, vec![vec![0x00, 0x34]]);
}

#[test]
fn probe_measures_loop() {
    if !kvm_available("probe_measures_loop") {
        return;
    }

    let probe = probe_hardware_speed().unwrap();

    eprintln!("{probe}");
    assert!(probe.instructions > 0, "{probe}");
    assert!(probe.instructions <= PROBE_INSTRUCTIONS, "{probe}");
    assert!(!probe.elapsed.is_zero(), "{probe}");
    assert_eq!(
        probe.hardware_speed,
        probe.instructions_per_second >= SOFTWARE_SPEED_LIMIT
    );
}

#[test]
fn fetch_from_mmio_fails_with_dump() {
    if !kvm_available("fetch_from_mmio_fails_with_dump") {
        return;
    }
    let mut test = new_test_vm(EXIT_PORT);
    let entry = load_program(&test.memory, &assemble("long_fetch_mmio"), EntryMode::Long);
    test.vcpu.set_state(&entry).unwrap();

    let error = test.vcpu.run(&test.io).unwrap_err();

    let message = error.to_string();
    assert!(
        matches!(error, HypervisorError::VcpuFailed { id: 0, .. }),
        "{message}"
    );
    assert!(message.contains("KVM_EXIT_INTERNAL_ERROR"), "{message}");
    assert!(message.contains("rip=00000000d0000000"), "{message}");
}
