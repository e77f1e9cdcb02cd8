//! Exception and interrupt delivery: IDT gates, error codes, IST, the interrupt shadow,
//! HLT wake-up, double and triple faults, and real-mode IVT delivery.

use super::{Machine, IST_STACK, RESULTS};
use crate::core::cpu::exceptions::{BP, DF, GP, UD};
use crate::core::cpu::CpuEvent;

fn run_long(source: &str) -> Machine {
    let mut m = Machine::long_mode(source);
    assert_eq!(m.run(10_000), CpuEvent::Halted);
    m
}

#[test]
fn int3_is_a_trap_in_long_mode() {
    let m = run_long("start:\n lea rbx, [rel after]\n int3\nafter:\n hlt\n");
    assert_eq!(m.vector(), u64::from(BP));
    assert_eq!(m.fault_rip(), m.cpu.gpr[3], "return address is after INT3");
}

#[test]
fn ud2_is_a_fault() {
    let m = run_long("start:\n lea rbx, [rel here]\nhere:\n ud2\n hlt\n");
    assert_eq!(m.vector(), u64::from(UD));
    assert_eq!(
        m.fault_rip(),
        m.cpu.gpr[3],
        "return address is the UD2 itself"
    );
}

#[test]
fn bad_selector_gp_has_selector_error_code() {
    let m = run_long("start:\n mov ax, 0x58\n mov ds, ax\n hlt\n");
    assert_eq!(m.vector(), u64::from(GP));
    assert_eq!(m.error_code(), 0x58);
}

#[test]
fn software_int_checks_gate_dpl() {
    // INT 3 from CPL 3 through a DPL 0 gate raises #GP(vector * 8 + 2).
    let body = r#"
start:
    push 0x2b
    push 0x50000
    push 0x2
    push 0x33
    lea rax, [rel user]
    push rax
    iretq
user:
    int3
    hlt
"#;
    let m = run_long(body);
    assert_eq!(m.vector(), u64::from(GP));
    assert_eq!(m.error_code(), u64::from(BP) * 8 + 2);
}

#[test]
fn external_interrupt_waits_for_sti_shadow() {
    let body = r#"
start:
    SET_GATE 0x20, irq
    xor ebx, ebx
    sti
    mov ebx, 1
    mov ebx, 2
    hlt
irq:
    mov [abs 0x91000], rbx
    hlt
"#;
    let mut m = Machine::long_mode(body);
    m.bus.interrupts.push_back(0x20);
    assert_eq!(m.run(10_000), CpuEvent::Halted);
    assert_eq!(
        m.read_u64(0x91000),
        1,
        "the instruction after STI runs first"
    );
}

#[test]
fn mov_ss_blocks_interrupts_for_one_instruction() {
    let body = r#"
start:
    SET_GATE 0x20, irq
    xor ebx, ebx
    mov ax, ss
    sti
    nop
    mov ss, ax
    mov ebx, 1
    mov ebx, 2
    hlt
irq:
    mov [abs 0x91000], rbx
    hlt
"#;
    let mut m = Machine::long_mode(body);
    // Run up to and including MOV SS with nothing pending.
    assert_eq!(m.run(14), CpuEvent::BudgetExhausted);
    m.bus.interrupts.push_back(0x20);
    assert_eq!(m.run(10_000), CpuEvent::Halted);
    assert_eq!(m.read_u64(0x91000), 1);
}

#[test]
fn hlt_wakes_on_interrupt_and_iretq_returns() {
    let body = r#"
start:
    SET_GATE 0x21, irq
    sti
    hlt
    mov qword [abs 0x91008], 2
    cli
    hlt
irq:
    mov qword [abs 0x91000], 1
    iretq
"#;
    let mut m = Machine::long_mode(body);
    assert_eq!(m.run(10_000), CpuEvent::Halted);
    assert_eq!(
        m.run(10_000),
        CpuEvent::Halted,
        "still halted with nothing pending"
    );
    let before = m.cpu.instructions();
    m.bus.interrupts.push_back(0x21);
    assert_eq!(m.run(10_000), CpuEvent::Halted);
    assert_eq!(m.read_u64(0x91000), 1);
    assert_eq!(m.read_u64(0x91008), 2, "IRETQ resumed after the first HLT");
    assert!(m.cpu.instructions() > before);
}

#[test]
fn double_fault_runs_on_ist() {
    let mut m = Machine::long_mode("start:\n mov rax, [abs 0x1f0000]\n hlt\n");
    m.set_pte(0x1f_0000, 0);
    // #PF gate not present: the #NP during #PF delivery escalates to #DF.
    m.write_u64(super::IDT + 14 * 16, 0);
    let handler = m.read_u64(super::ORG + 8 + 8 * 8);
    m.set_gate(DF, handler, 1, 0);
    assert_eq!(m.run(10_000), CpuEvent::Halted);
    assert_eq!(m.vector(), u64::from(DF));
    assert_eq!(m.error_code(), 0);
    let rsp = m.read_u64(RESULTS + 40);
    assert!(
        rsp < IST_STACK && rsp > IST_STACK - 0x100,
        "handler ran on IST1: {rsp:#x}"
    );
}

#[test]
fn empty_idt_triple_faults() {
    let body = r#"
start:
    lidt [rel empty_idt]
    int3
    hlt
empty_idt:
    dw 0
    dq 0
"#;
    let mut m = Machine::long_mode(body);
    assert_eq!(m.run(10_000), CpuEvent::Shutdown);
}

#[test]
fn real_mode_ivt_delivery() {
    let source = r#"
bits 16
org 0x7c00
    xor ax, ax
    mov ds, ax
    mov word [0x10 * 4], int10
    mov word [0x10 * 4 + 2], 0
    mov word [0], divide_error
    mov word [2], 0
    mov ax, 0x1234
    int 0x10
    mov bx, ax
    xor cx, cx
fault:
    div cx
    hlt
int10:
    mov ax, 0x5678
    iret
divide_error:
    mov si, sp
    mov dx, [si]
    hlt
"#;
    let mut m = Machine::real_mode(source);
    assert_eq!(m.run(1000), CpuEvent::Halted);
    assert_eq!(
        m.cpu.gpr[3] & 0xffff,
        0x5678,
        "INT 0x10 handler ran and IRET returned"
    );
    let code = super::assemble(source);
    let fault_offset = code.windows(2).position(|w| w == [0xf7, 0xf1]).unwrap() as u64;
    assert_eq!(
        m.cpu.gpr[2] & 0xffff,
        0x7c00 + fault_offset,
        "#DE pushes the DIV's IP"
    );
    assert_eq!(m.cpu.gpr[4] & 0xffff, 0x7000 - 6);
}

#[test]
fn trap_flag_single_steps_one_instruction() {
    let body = r#"
start:
    SET_GATE 1, debug_handler
    pushfq
    or qword [rsp], 0x100
    popfq
    mov eax, 1
    mov eax, 2
    hlt
debug_handler:
    mov [abs 0x91000], rax
    mov rbx, [rsp]
    hlt
"#;
    let m = run_long(body);
    // POPF sets TF; the trap comes after the first instruction that runs with TF set.
    assert_eq!(m.read_u64(0x91000), 1);
    assert_ne!(m.cpu.dr[6] & (1 << 14), 0, "DR6.BS");
    assert_eq!(m.cpu.rflags() & 0x100, 0, "the handler runs with TF clear");
}

#[test]
fn user_mode_out_without_iopl_faults() {
    let body = r#"
start:
    push 0x2b
    push 0x50000
    push 0x2
    push 0x33
    lea rax, [rel user]
    push rax
    iretq
user:
    mov al, 1
    out 0x80, al
    hlt
"#;
    let mut m = Machine::long_mode(body);
    // The I/O bitmap offset points past the TSS limit: every port is denied.
    m.write_u64(super::TSS + 0x60, 0x0068_0000_0000_0000);
    assert_eq!(m.run(10_000), CpuEvent::Halted);
    assert_eq!(m.vector(), u64::from(GP));
    assert!(m.bus.port_writes.is_empty());
}
