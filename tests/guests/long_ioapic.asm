; 64-bit long mode with the harness's identity map, entered at 0x8000.
; Masks both 8259 PICs, routes IOAPIC pin 4 (the COM1 line) to vector 0x41 on
; APIC 0 as an edge-triggered, active-high interrupt, enables the local APIC
; and interrupts, and writes port 0xF1, which makes the harness pulse GSI 4.
; The handler acknowledges the interrupt, writes 0x41 to port 0xE9 and halts
; with interrupts disabled.
bits 64
org 0x8000

%define IDT         0x9000
%define VECTOR      0x41
%define LAPIC       0xfee00000
%define IOAPIC      0xfec00000
%define PIN         4

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

    mov al, 0xff                    ; mask every PIC line, so only the IOAPIC
    out 0x21, al                    ; delivers pin 4
    out 0xa1, al

    mov rsi, IOAPIC                 ; redirection entry: IOREGSEL 0x10 + 2 * pin
    mov dword [rsi], 0x10 + 2 * PIN + 1
    mov dword [rsi + 0x10], 0       ; destination APIC 0
    mov dword [rsi], 0x10 + 2 * PIN
    mov dword [rsi + 0x10], VECTOR  ; fixed, physical, active high, edge, unmasked

    mov rsi, LAPIC
    mov dword [rsi + 0x80], 0       ; task priority 0
    mov dword [rsi + 0xf0], 0x1ff   ; spurious vector 0xFF, APIC enabled

    sti
    xor eax, eax
    out 0xf1, al
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
