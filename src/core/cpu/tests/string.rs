//! String instructions with REP prefixes, address sizes, direction, and faults in the
//! middle of a repetition.

use super::Machine;
use crate::core::cpu::flags::ZF;
use crate::core::cpu::CpuEvent;

fn run(body: &str) -> Machine {
    let mut m = Machine::long_mode(&format!("start:\n{body}\n    hlt\n"));
    assert_eq!(m.run(100_000), CpuEvent::Halted);
    m
}

#[test]
fn rep_movsb_and_stosq() {
    let m = run(r#"
    mov rdi, 0x91000
    mov rax, 0x0101010101010101
    mov rcx, 4
    rep stosq
    mov rsi, 0x91000
    mov rdi, 0x92000
    mov rcx, 30
    rep movsb
"#);
    assert_eq!(m.read_u64(0x92000), 0x0101_0101_0101_0101);
    assert_eq!(m.read_u64(0x92018) & 0xffff_ffff_ffff, 0x0101_0101_0101);
    assert_eq!(m.read_u64(0x92018) >> 48, 0, "only 30 bytes copied");
    assert_eq!(m.cpu.gpr[1], 0);
    assert_eq!(m.cpu.gpr[6], 0x9101e);
    assert_eq!(m.cpu.gpr[7], 0x9201e);
}

#[test]
fn backward_copy_with_df() {
    let m = run(r#"
    mov qword [abs 0x91000], 0x44332211
    std
    mov rsi, 0x91003
    mov rdi, 0x92003
    mov ecx, 4
    rep movsb
    cld
"#);
    assert_eq!(m.read_u64(0x92000) & 0xffff_ffff, 0x4433_2211);
    assert_eq!(m.cpu.gpr[6], 0x90fff);
}

#[test]
fn repe_cmpsb_stops_at_difference() {
    let m = run(r#"
    mov rax, 0x0044332211
    mov [abs 0x91000], rax
    mov rax, 0x0055332211
    mov [abs 0x92000], rax
    mov rsi, 0x91000
    mov rdi, 0x92000
    mov ecx, 8
    repe cmpsb
"#);
    assert_eq!(m.cpu.gpr[1], 4, "stopped after the 4th byte");
    assert_eq!(m.cpu.rflags() & ZF, 0);
}

#[test]
fn repne_scasb_finds_byte() {
    let m = run(r#"
    mov rax, 0x00776655
    mov [abs 0x91000], rax
    mov rdi, 0x91000
    mov al, 0x66
    mov rcx, -1
    repne scasb
"#);
    assert_eq!(m.cpu.gpr[7], 0x91002);
    assert_eq!(m.cpu.gpr[1], u64::MAX - 2);
    assert_eq!(m.cpu.rflags() & ZF, ZF);
}

#[test]
fn address_size_prefix_uses_32_bit_registers() {
    let m = run(r#"
    mov rdi, 0xffffffff00091000
    mov al, 0x5a
    mov rcx, 0xffffffff00000002
    a32 rep stosb
"#);
    assert_eq!(m.read_u64(0x91000) & 0xffff, 0x5a5a);
    assert_eq!(m.cpu.gpr[7], 0x91002, "EDI advanced and zero-extended");
    assert_eq!(m.cpu.gpr[1], 0, "ECX counted down and zero-extended");
}

#[test]
fn fault_in_middle_of_rep_keeps_progress() {
    // Copy 0x20 bytes into a destination that crosses into a not-present page.
    let mut m = Machine::long_mode(
        "start:\n mov rsi, 0x91000\n mov rdi, 0x1efff0\n mov ecx, 0x20\n rep movsb\n hlt\n",
    );
    m.set_pte(0x1f_0000, 0);
    assert_eq!(m.run(100_000), CpuEvent::Halted);
    assert_eq!(m.vector(), 14);
    assert_eq!(m.cr2(), 0x1f_0000);
    assert_eq!(m.error_code(), 2, "write to a not-present page");
    assert_eq!(m.cpu.gpr[1], 0x10, "16 bytes were copied before the fault");
    assert_eq!(m.cpu.gpr[7], 0x1f_0000);
    assert_eq!(m.cpu.gpr[6], 0x91010);
}

#[test]
fn port_string_io() {
    let mut m = Machine::long_mode(
        "start:\n mov rsi, 0x91000\n mov dword [rsi], 0x64636261\n mov dx, 0x3f8\n mov ecx, 4\n rep outsb\n mov rdi, 0x92000\n mov ecx, 2\n rep insw\n hlt\n",
    );
    m.bus.port_input = 0xbeef;
    assert_eq!(m.run(1000), CpuEvent::Halted);
    let written: Vec<u32> = m.bus.port_writes.iter().map(|&(_, v)| v).collect();
    assert_eq!(written, vec![0x61, 0x62, 0x63, 0x64]);
    assert_eq!(m.read_u64(0x92000) & 0xffff_ffff, 0xbeef_beef);
}

#[test]
fn forward_overlap_movsb_repeats() {
    // Copying [0x91000, +8) to 0x91002 element by element smears the first two bytes over
    // the range, as on hardware. A block copy would move the original bytes instead.
    let m = run(r#"
    mov rdi, 0x91000
    mov rax, 0x0807060504030201
    stosq
    mov rsi, 0x91000
    mov rdi, 0x91002
    mov rcx, 8
    rep movsb
"#);
    assert_eq!(m.read_u64(0x91000), 0x0201_0201_0201_0201);
    assert_eq!(m.read_u64(0x91008) & 0xffff, 0x0201);
}

#[test]
fn long_rep_stosd_restarts() {
    // 40,000 doublewords (160,000 bytes) cross 40 pages and the per-step byte limit, so
    // the instruction restarts several times from its registers.
    let m = run(r#"
    mov rdi, 0x100004
    mov eax, 0xa5a5a5a5
    mov rcx, 40000
    rep stosd
"#);
    assert_eq!(
        m.read_u64(0x100000) & 0xffff_ffff,
        0,
        "the byte before the range"
    );
    assert_eq!(m.read_u64(0x100004), 0xa5a5_a5a5_a5a5_a5a5);
    assert_eq!(m.read_u64(0x100004 + 159_992), 0xa5a5_a5a5_a5a5_a5a5);
    assert_eq!(
        m.read_u64(0x100004 + 160_000),
        0,
        "the byte after the range"
    );
    assert_eq!(m.cpu.gpr[1], 0);
    assert_eq!(m.cpu.gpr[7], 0x100004 + 160_000);
}
