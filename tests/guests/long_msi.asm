; 64-bit long mode with the harness's identity map, entered at 0x8000.
; Installs an interrupt gate for vector 0x40 in an IDT at 0x9000, enables the
; local APIC, enables interrupts and writes port 0xF0, which makes the harness
; signal an MSI with vector 0x40 to APIC 0. It then waits in HLT. The handler
; acknowledges the interrupt, writes 0x40 to port 0xE9 and halts with
; interrupts disabled.
bits 64
org 0x8000

%define IDT         0x9000
%define VECTOR      0x40
%define LAPIC       0xfee00000

    lea rax, [rel handler]
    mov rdi, IDT + VECTOR * 16
    mov [rdi], ax                   ; offset 15:0
    mov word [rdi + 2], 0x18        ; 64-bit code selector
    mov word [rdi + 4], 0x8e00      ; present, DPL 0, 64-bit interrupt gate
    shr rax, 16
    mov [rdi + 6], ax               ; offset 31:16
    shr rax, 16
    mov [rdi + 8], eax              ; offset 63:32
    mov dword [rdi + 12], 0
    lidt [idt_descriptor]

    mov rsi, LAPIC
    mov dword [rsi + 0x80], 0       ; task priority 0
    mov dword [rsi + 0xf0], 0x1ff   ; spurious vector 0xFF, APIC enabled

    sti
    xor eax, eax
    out 0xf0, al
.wait:
    hlt
    jmp .wait

handler:
    mov rsi, LAPIC
    mov dword [rsi + 0xb0], 0       ; EOI
    mov al, VECTOR
    out 0xe9, al
    cli
    hlt

idt_descriptor:
    dw VECTOR * 16 + 15
    dq IDT
