//! Mode switches: real mode to protected mode to long mode, and exception delivery
//! through a 32-bit IDT.

use super::Machine;
use crate::core::cpu::{CpuEvent, Mode};

/// Real mode at 0x7c00 to 32-bit protected mode; `body32` runs with flat segments and
/// `IDT32` is available as a label for a 32-bit IDT.
const TO_PROTECTED: &str = r#"
bits 16
org 0x7c00
    cli
    xor ax, ax
    mov ds, ax
    lgdt [gdt_descriptor]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp 0x08:protected
align 8
gdt:
    dq 0
    dq 0x00cf9a000000ffff      ; 0x08: 32-bit code
    dq 0x00cf92000000ffff      ; 0x10: data
    dq 0x00af9a000000ffff      ; 0x18: 64-bit code
gdt_end:
gdt_descriptor:
    dw gdt_end - gdt - 1
    dd gdt
bits 32
protected:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x7000
"#;

#[test]
fn real_to_long_mode_switch() {
    let source = format!(
        "{TO_PROTECTED}{}",
        r#"
    ; Identity-map 2 MiB with one large page: PML4 at 0x20000, PDPT 0x21000, PD 0x22000.
    mov edi, 0x20000
    xor eax, eax
    mov ecx, 3 * 4096 / 4
    rep stosd
    mov dword [0x20000], 0x21003
    mov dword [0x21000], 0x22003
    mov dword [0x22000], 0x83
    mov eax, 0x20000
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20               ; PAE
    mov cr4, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100              ; LME
    wrmsr
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    jmp 0x18:long_mode
bits 64
long_mode:
    mov rax, 0x1122334455667788
    mov rdx, 0xe9
    out dx, al
    mov [0x3000], rax
    hlt
"#
    );
    let mut m = Machine::real_mode(&source);
    assert_eq!(m.run(100_000), CpuEvent::Halted);
    assert_eq!(m.cpu.mode(), Mode::Long64);
    assert!(m.cpu.long_mode());
    assert_eq!(m.bus.port_writes, vec![(0xe9, 0x88)]);
    assert_eq!(m.read_u64(0x3000), 0x1122_3344_5566_7788);
}

#[test]
fn protected_mode_idt_delivers_ud_and_gp() {
    let source = format!(
        "{TO_PROTECTED}{}",
        r#"
    ; Gates for #UD (6) and #GP (13), 32-bit interrupt gates to selector 0x08.
    mov eax, ud_handler
    mov [idt + 6 * 8], ax
    mov word [idt + 6 * 8 + 2], 0x08
    mov word [idt + 6 * 8 + 4], 0x8e00
    shr eax, 16
    mov [idt + 6 * 8 + 6], ax
    mov eax, gp_handler
    mov [idt + 13 * 8], ax
    mov word [idt + 13 * 8 + 2], 0x08
    mov word [idt + 13 * 8 + 4], 0x8e00
    shr eax, 16
    mov [idt + 13 * 8 + 6], ax
    lidt [idt_descriptor]
    ud2
    mov ax, 0x2b
    mov fs, ax
    hlt
ud_handler:
    mov ebx, [esp]            ; faulting EIP
    add dword [esp], 2        ; skip UD2
    iretd
gp_handler:
    mov ecx, [esp]            ; error code
    mov esi, [esp + 4]        ; faulting EIP
    hlt
idt_descriptor:
    dw 32 * 8 - 1
    dd idt
align 8
idt:
    times 32 dq 0
"#
    );
    let mut m = Machine::real_mode(&source);
    assert_eq!(m.run(100_000), CpuEvent::Halted);
    assert_eq!(m.cpu.mode(), Mode::Protected32);
    let code = super::assemble(&source);
    let ud2 = code.windows(2).position(|w| w == [0x0f, 0x0b]).unwrap() as u64;
    assert_eq!(m.cpu.gpr[3], 0x7c00 + ud2, "#UD pushes the UD2's EIP");
    assert_eq!(m.cpu.gpr[1], 0x28, "#GP error code is the selector");
    assert_eq!(
        m.cpu.gpr[6],
        0x7c00 + ud2 + 2 + 4,
        "#GP at the MOV FS after UD2 and MOV AX"
    );
}

#[test]
fn compatibility_mode_round_trip() {
    // From 64-bit code, RETFQ to the 32-bit code segment 0x08, run 32-bit code there,
    // then far-jump back to the 64-bit segment 0x10.
    let body = r#"
start:
    push 0x08
    lea rax, [rel compat]
    push rax
    o64 retf
bits 32
compat:
    mov eax, 0x12345678
    push eax
    pop ebx
    mov [0x91000], ebx
    jmp 0x10:back
bits 64
back:
    hlt
"#;
    let mut m = Machine::long_mode(body);
    assert_eq!(m.run(1000), CpuEvent::Halted);
    assert_eq!(m.exception_count(), 0);
    assert_eq!(m.read_u64(0x91000), 0x1234_5678);
    assert_eq!(m.cpu.mode(), Mode::Long64);
    assert_eq!(m.cpu.seg[crate::core::cpu::state::CS].selector, 0x10);
}

#[test]
fn legacy_paging_with_4m_pages() {
    let source = format!(
        "{TO_PROTECTED}{}",
        r#"
    ; Page directory at 0x20000: PDE 0 maps 0-4 MiB, PDE 1 maps 4-8 MiB to 0-4 MiB.
    mov edi, 0x20000
    xor eax, eax
    mov ecx, 1024
    rep stosd
    mov dword [0x20000], 0x83
    mov dword [0x20004], 0x83
    mov dword [0x3000], 0xcafe
    mov eax, 0x20000
    mov cr3, eax
    mov eax, cr4
    or eax, 0x10               ; PSE
    mov cr4, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    mov ebx, [0x403000]
    hlt
"#
    );
    let mut m = Machine::real_mode(&source);
    assert_eq!(m.run(100_000), CpuEvent::Halted);
    assert_eq!(m.cpu.gpr[3], 0xcafe);
    assert!(!m.cpu.long_mode());
}

#[test]
fn startup_ipi_starts_real_mode_at_vector() {
    let mut m = Machine::long_mode("start:\n hlt\n");
    assert_eq!(m.run(10), CpuEvent::Halted);
    // An AP trampoline at 0x9000 (vector 9): MOV AX, CS; HLT.
    m.load(0x9000, &[0x8c, 0xc8, 0xf4]);
    m.cpu.start_up(9);
    assert_eq!(m.cpu.mode(), Mode::Real);
    assert!(!m.cpu.is_halted());
    assert_eq!(m.run(10), CpuEvent::Halted);
    assert_eq!(m.cpu.gpr[0] & 0xffff, 0x0900);
    assert_eq!(m.cpu.rip, 3);
    assert!(m.cpu.instructions() >= 3, "the counter survives INIT");
}
