; Real-mode guest that drives the platform devices the way Linux's early boot does:
; the 16550 console, the CMOS clock, PIT channel 2 polled through port 0x61, the i8042
; self test, PIC-routed IRQ 0 from PIT channel 0, and ACPI S5 power-off.
;
; Expected serial output: "boot\r\n2024\r\npit ok\r\n55\r\nTTT\r\n", then power-off.

bits 16
org 0x1000

COM1        equ 0x3f8
PIC_VECTOR  equ 0x20

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7000

    ; 16550: 8N1 with divisor 1, as the kernel's early console programs it.
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

    mov si, msg_boot
    call puts

    ; CMOS: wait for update-in-progress to clear, then read century and year in BCD.
.uip:
    mov al, 0x0a
    out 0x70, al
    in al, 0x71
    test al, 0x80
    jnz .uip
    mov al, 0x32
    out 0x70, al
    in al, 0x71
    call puthex
    mov al, 0x09
    out 0x70, al
    in al, 0x71
    call puthex
    call newline

    ; PIT channel 2 in mode 0 with the gate on and the speaker off, polled through
    ; port 0x61 bit 5 until the count of 1000 runs out (the TSC calibration loop).
    in al, 0x61
    and al, 0xfd
    or al, 0x01
    out 0x61, al
    mov al, 0xb0
    out 0x43, al
    mov al, 0xe8
    out 0x42, al
    mov al, 0x03
    out 0x42, al
.out2:
    in al, 0x61
    test al, 0x20
    jz .out2
    mov si, msg_pit
    call puts

    ; i8042 controller self test: expect 0x55.
    mov al, 0xaa
    out 0x64, al
.obf:
    in al, 0x64
    test al, 1
    jz .obf
    in al, 0x60
    call puthex
    call newline

    ; PIC pair: vector bases 0x20 and 0x28, cascade on IRQ 2, only IRQ 0 unmasked.
    mov al, 0x11
    out 0x20, al
    out 0xa0, al
    mov al, PIC_VECTOR
    out 0x21, al
    mov al, PIC_VECTOR + 8
    out 0xa1, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x02
    out 0xa1, al
    mov al, 0x01
    out 0x21, al
    out 0xa1, al
    mov al, 0xfe
    out 0x21, al
    mov al, 0xff
    out 0xa1, al

    mov word [PIC_VECTOR * 4], timer_handler
    mov word [PIC_VECTOR * 4 + 2], 0

    ; PIT channel 0 in mode 2 with a count of 1193 (about 1 ms).
    mov al, 0x34
    out 0x43, al
    mov al, 0xa9
    out 0x40, al
    mov al, 0x04
    out 0x40, al

    sti
.wait:
    hlt
    cmp byte [ticks], 3
    jb .wait
    cli
    call newline

    ; ACPI PM1a_CNT: SLP_TYP 5 (S5) with SLP_EN.
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
    mov al, 0x20
    out 0x20, al
    pop ax
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

; Writes AL as two hexadecimal digits.
puthex:
    push ax
    shr al, 4
    call .nibble
    pop ax
.nibble:
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe .print
    add al, 7
.print:
    jmp putc

newline:
    mov al, 13
    call putc
    mov al, 10
    jmp putc

msg_boot: db "boot", 13, 10, 0
msg_pit:  db "pit ok", 13, 10, 0
ticks:    db 0
