//! Paging: #PF error codes and CR2, accessed and dirty bits, TLB invalidation, MMIO.

use super::{Machine, RESULTS};
use crate::core::cpu::exceptions::{PF, PF_ID, PF_P, PF_US, PF_WR};
use crate::core::cpu::CpuEvent;

const PAGE: u64 = 0x1f_0000;

fn fault(body: &str, setup: impl Fn(&Machine)) -> Machine {
    let mut m = Machine::long_mode(&format!("start:\n{body}\n    hlt\n"));
    setup(&m);
    assert_eq!(m.run(10_000), CpuEvent::Halted);
    m
}

#[test]
fn not_present_read_faults() {
    let m = fault("mov rax, [abs 0x1f0008]", |m| m.set_pte(PAGE, 0));
    assert_eq!(m.exception_count(), 1);
    assert_eq!(m.vector(), u64::from(PF));
    assert_eq!(m.error_code(), 0);
    assert_eq!(m.cr2(), 0x1f_0008);
}

#[test]
fn write_to_read_only_page_faults_with_wp() {
    let m = fault("mov qword [abs 0x1f0010], 1", |m| {
        m.set_pte(PAGE, PAGE | 0x5)
    });
    assert_eq!(m.vector(), u64::from(PF));
    assert_eq!(m.error_code(), u64::from(PF_P | PF_WR));
    assert_eq!(m.cr2(), 0x1f_0010);
}

#[test]
fn supervisor_write_ignores_read_only_without_wp() {
    let m = fault(
        "mov rax, cr0\n btr rax, 16\n mov cr0, rax\n mov qword [abs 0x1f0010], 7",
        |m| m.set_pte(PAGE, PAGE | 0x5),
    );
    assert_eq!(m.exception_count(), 0);
    assert_eq!(m.read_u64(0x1f_0010), 7);
}

#[test]
fn execute_of_nx_page_faults() {
    let m = fault("mov rax, 0x1f0000\n mov byte [rax], 0xf4\n jmp rax", |m| {
        m.set_pte(PAGE, PAGE | 0x7 | (1 << 63))
    });
    assert_eq!(m.vector(), u64::from(PF));
    assert_eq!(m.error_code(), u64::from(PF_P | PF_ID));
    assert_eq!(m.cr2(), PAGE);
}

#[test]
fn reserved_bit_sets_rsvd() {
    let m = fault("mov rax, [abs 0x1f0000]", |m| {
        m.set_pte(PAGE, PAGE | 0x7 | (1 << 45))
    });
    assert_eq!(
        m.error_code(),
        u64::from(PF_P | crate::core::cpu::exceptions::PF_RSVD)
    );
}

#[test]
fn user_access_to_supervisor_page_faults() {
    // IRETQ to CPL 3 at `user`, which reads a supervisor-only page.
    let body = r#"
    push 0x2b
    push 0x50000
    push 0x2
    push 0x33
    push user
    iretq
user:
    mov rax, [abs 0x1f0000]
    hlt
"#;
    let m = fault(body, |m| m.set_pte(PAGE, PAGE | 0x3));
    assert_eq!(m.vector(), u64::from(PF));
    assert_eq!(
        m.error_code(),
        u64::from(PF_P | PF_US),
        "present but supervisor-only"
    );
    // The handler ran on TSS.RSP0: frame of SS, RSP, RFLAGS, CS, RIP, error code.
    let rsp = m.read_u64(RESULTS + 40);
    assert_eq!(
        rsp,
        super::KERNEL_STACK - 5 * 8,
        "after popping vector and error code"
    );
    assert_eq!(m.read_u64(rsp + 8), 0x33, "saved CS");
    assert_eq!(m.read_u64(rsp + 32), 0x2b, "saved SS");
}

#[test]
fn accessed_and_dirty_bits_are_set() {
    let m = fault(
        "mov rax, [abs 0x1f0000]\n mov qword [abs 0x1f1000], 1",
        |_| {},
    );
    assert_eq!(
        m.read_u64(super::PT0 + 0x1f0 * 8) & 0x60,
        0x20,
        "read sets A only"
    );
    assert_eq!(
        m.read_u64(super::PT0 + 0x1f1 * 8) & 0x60,
        0x60,
        "write sets A and D"
    );
}

#[test]
fn invlpg_drops_stale_translation() {
    // Remap 0x1f0000 to 0x1f1000 after a first read; without INVLPG the TLB keeps the
    // old mapping, with it the new one is used.
    let body = r#"
    mov qword [abs 0x1f0000], 1
    mov qword [abs 0x1f1000], 2
    mov rax, [abs 0x1f0000]
    mov qword [abs 0x4000 + 0x1f0 * 8], 0x1f1007
    mov rbx, [abs 0x1f0000]
    invlpg [abs 0x1f0000]
    mov rcx, [abs 0x1f0000]
"#;
    let m = fault(body, |_| {});
    assert_eq!(m.cpu.gpr[0], 1);
    assert_eq!(m.cpu.gpr[3], 1, "stale TLB entry until INVLPG");
    assert_eq!(m.cpu.gpr[1], 2);
}

#[test]
fn cr3_write_keeps_global_pages() {
    let body = r#"
    mov rax, cr4
    or rax, 0x80
    mov cr4, rax
    mov rax, [abs 0x1f0000]
    mov rax, [abs 0x1f2000]
    mov qword [abs 0x4000 + 0x1f0 * 8], 0x1f1007
    mov qword [abs 0x4000 + 0x1f2 * 8], 0x1f1107
    mov rax, cr3
    mov cr3, rax
    mov rbx, [abs 0x1f0000]
    mov rcx, [abs 0x1f2000]
"#;
    let m = fault(body, |m| {
        m.write_u64(0x1f_0000, 10);
        m.write_u64(0x1f_1000, 11);
        m.write_u64(0x1f_2000, 12);
        m.set_pte(0x1f_2000, 0x1f_2000 | 0x107);
    });
    assert_eq!(
        m.cpu.gpr[3], 11,
        "non-global entry flushed by the CR3 write"
    );
    assert_eq!(m.cpu.gpr[1], 12, "global entry kept");
}

#[test]
fn mmio_outside_ram() {
    let m = fault(
        "mov rax, 0xfee00000\n mov dword [rax + 0xb0], 0x1234\n mov ebx, [rax + 0x20]",
        |_| {},
    );
    assert_eq!(m.bus.mmio_writes, vec![(0xfee0_00b0, 0x1234)]);
    assert_eq!(m.cpu.gpr[3], (0xfee0_0020u64 ^ 0x5a5a_5a5a) & 0xffff_ffff);
}
