; Guest that takes its interrupts through the local APIC and the IOAPIC, as Linux does
; once it leaves the PIC: a periodic LAPIC timer, a self-IPI through the ICR, and the
; serial receive interrupt routed from IOAPIC pin 4. The PIC stays masked.
;
; It runs in real mode with 4 GiB data segment limits ("unreal mode") to reach the APIC
; pages, because the KVM of some hosts cannot emulate IRET in protected mode and ends the
; run with KVM_EXIT_INTERNAL_ERROR.
;
; Expected serial output: "apic\r\nTTT\r\nI\r\nok\r\n" when the host sends "ok", then
; power-off.

bits 16
org 0x1000

COM1        equ 0x3f8
LAPIC       equ 0xfee00000
IOAPIC      equ 0xfec00000
TIMER_VEC   equ 0x30
SERIAL_VEC  equ 0x31
IPI_VEC     equ 0x32

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000

    ; Load flat 4 GiB data segments in protected mode and return to real mode. DS and ES
    ; keep their 4 GiB limits as long as they are not loaded again.
    lgdt [gdt_descriptor]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp 0x08:.protected
.protected:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov eax, cr0
    and eax, ~1
    mov cr0, eax
    jmp 0x00:.real
.real:

    mov word [TIMER_VEC * 4], timer_handler
    mov word [TIMER_VEC * 4 + 2], 0
    mov word [SERIAL_VEC * 4], serial_handler
    mov word [SERIAL_VEC * 4 + 2], 0
    mov word [IPI_VEC * 4], ipi_handler
    mov word [IPI_VEC * 4 + 2], 0
    mov word [0xff * 4], spurious_handler
    mov word [0xff * 4 + 2], 0

    ; 16550: 8N1, divisor 1.
    mov dx, COM1 + 3
    mov al, 0x83
    out dx, al
    mov dx, COM1
    mov al, 1
    out dx, al
    mov dx, COM1 + 1
    xor al, al
    out dx, al
    mov dx, COM1 + 3
    mov al, 0x03
    out dx, al
    mov si, msg_apic
    call puts

    ; Mask both PICs.
    mov al, 0xff
    out 0x21, al
    out 0xa1, al

    ; LAPIC: software enable with spurious vector 0xff, periodic timer every 100000
    ; ticks with the divider at 1.
    mov dword [dword LAPIC + 0xf0], 0x1ff
    mov dword [dword LAPIC + 0x3e0], 0x0b
    mov dword [dword LAPIC + 0x320], (1 << 17) | TIMER_VEC
    mov dword [dword LAPIC + 0x380], 100000

    ; IOAPIC pin 4 (COM1): edge, active high, physical destination 0.
    mov dword [dword IOAPIC], 0x19
    mov dword [dword IOAPIC + 0x10], 0
    mov dword [dword IOAPIC], 0x18
    mov dword [dword IOAPIC + 0x10], SERIAL_VEC

    ; 16550: raise the receive interrupt.
    mov dx, COM1 + 1
    mov al, 1
    out dx, al

    sti
.ticks:
    hlt
    cmp byte [ticks], 3
    jb .ticks
    ; Stop the timer: an initial count of 0 disarms it.
    mov dword [dword LAPIC + 0x380], 0
    call newline

    ; Self-IPI through the ICR shorthand "self".
    mov dword [dword LAPIC + 0x310], 0
    mov dword [dword LAPIC + 0x300], (1 << 18) | IPI_VEC
.ipi:
    hlt
    cmp byte [ipis], 1
    jb .ipi
    call newline

.input:
    hlt
    cmp byte [received], 2
    jb .input
    call newline

    ; ACPI PM1a_CNT: SLP_TYP 5 (S5) with SLP_EN.
    cli
    mov dx, 0x604
    mov ax, (5 << 10) | (1 << 13)
    out dx, ax
.dead:
    hlt
    jmp .dead

timer_handler:
    push ax
    inc byte [ticks]
    mov al, 'T'
    call putc
    mov dword [dword LAPIC + 0xb0], 0
    pop ax
    iret

ipi_handler:
    push ax
    inc byte [ipis]
    mov al, 'I'
    call putc
    mov dword [dword LAPIC + 0xb0], 0
    pop ax
    iret

; Echoes every received byte.
serial_handler:
    push ax
    push dx
.next:
    mov dx, COM1 + 5
    in al, dx
    test al, 1
    jz .done
    mov dx, COM1
    in al, dx
    call putc
    inc byte [received]
    jmp .next
.done:
    mov dword [dword LAPIC + 0xb0], 0
    pop dx
    pop ax
    iret

spurious_handler:
    iret

; Writes AL to COM1 once the transmit holding register is empty.
putc:
    push dx
    push ax
    mov dx, COM1 + 5
.busy:
    in al, dx
    test al, 0x20
    jz .busy
    pop ax
    mov dx, COM1
    out dx, al
    pop dx
    ret

; Writes the zero-terminated string at DS:SI.
puts:
    lodsb
    test al, al
    jz .done
    call putc
    jmp puts
.done:
    ret

newline:
    mov al, 13
    call putc
    mov al, 10
    jmp putc

align 8
gdt:
    dq 0
    dq 0x00009a000000ffff   ; 0x08: 16-bit code, base 0, 64 KiB
    dq 0x00cf92000000ffff   ; 0x10: flat data, 4 GiB
gdt_descriptor:
    dw gdt_descriptor - gdt - 1
    dd gdt

msg_apic: db "apic", 13, 10, 0
ticks:    db 0
ipis:     db 0
received: db 0
