; The embedded default guest of `monstervm run`.
;
; Flat binary, loaded at guest-physical LOAD_ADDR and entered in real mode with
; CS:IP = 0000:8000, interrupts disabled. It needs 64 KiB of RAM from address 0.
; It walks the x86 modes with its own tables, printing one line in each:
;
;   real mode        initializes COM1 (16550 at 0x3F8, 115200 8N1, polled)
;   protected mode   flat 32-bit segments from GDT, builds the page tables
;   long mode        identity map of the first 1 GiB with 2 MiB pages
;
; In long mode it prints the banner, the TSC, the TSC rate measured against
; PIT channel 2 (ports 0x42, 0x43, 0x61) and the CMOS RTC time (ports 0x70,
; 0x71), then echoes every byte received on COM1 until it reads 'q'. It
; echoes a carriage return as CR LF so that a raw terminal starts a new line.
; While it waits for input it also polls the i8042 keyboard (ports 0x60 and
; 0x64), so that Ctrl-Alt-Del typed by the VMM shuts it down as 'q' does.
; On either it requests ACPI S5 through PM1A_CNT_PORT and, if that write
; returns, stops with CLI; HLT.
;
; Guest-physical memory used:
;   0x1000 - 0x3fff   PML4, PDPT and page directory
;   0x6000 - 0x6fff   stack (grows down from 0x7000)
;   0x8000 - ...      this image (code, GDT, strings)

bits 16
org 0x8000

%define LOAD_ADDR       0x8000
%define STACK_TOP       0x7000
%define PML4_ADDR       0x1000
%define PDPT_ADDR       0x2000
%define PD_ADDR         0x3000

%define COM1            0x3f8
%define UART_RBR        (COM1 + 0)      ; receive buffer (DLAB = 0)
%define UART_THR        (COM1 + 0)      ; transmit holding (DLAB = 0)
%define UART_DLL        (COM1 + 0)      ; divisor latch low (DLAB = 1)
%define UART_IER        (COM1 + 1)      ; interrupt enable (DLAB = 0)
%define UART_DLM        (COM1 + 1)      ; divisor latch high (DLAB = 1)
%define UART_FCR        (COM1 + 2)      ; FIFO control
%define UART_LCR        (COM1 + 3)      ; line control
%define UART_MCR        (COM1 + 4)      ; modem control
%define UART_LSR        (COM1 + 5)      ; line status
%define LSR_DATA_READY  0x01
%define LSR_THR_EMPTY   0x20

%define PIT_CH2         0x42
%define PIT_MODE        0x43
%define PIT_GATE        0x61            ; bit 0 gates channel 2, bit 5 is its output
%define PIT_HZ          1193182
%define PIT_COUNT       11932           ; about 10 ms at PIT_HZ
%define PIT_RUNS        3
; Polls of the PIT count before the measurement gives up, so that a machine
; whose PIT does not count still reaches the echo loop. At an estimated 3 us per
; poll (three port accesses) on hardware KVM, the 10 ms count takes about 3000.
%define PIT_MAX_POLLS   0x100000

%define KBD_DATA        0x60
%define KBD_STATUS      0x64
%define KBD_OUTPUT_FULL 0x01            ; status bit 0: a byte waits at KBD_DATA
%define KBD_AUX_DATA    0x20            ; status bit 5: that byte is from the mouse port
; Scancode set 1, which the i8042 delivers while it translates (the state the
; VMM's controller starts in). Bit 7 of a code marks a key release.
%define SC_EXTENDED     0xe0
%define SC_RELEASE      0x80
%define SC_CTRL         0x1d            ; left Ctrl; right Ctrl is E0 1D
%define SC_ALT          0x38            ; left Alt; right Alt is E0 38
%define SC_DELETE       0x53            ; Delete is E0 53
%define MOD_CTRL        0x01
%define MOD_ALT         0x02

%define CMOS_INDEX      0x70
%define CMOS_DATA       0x71
%define CMOS_MAX_POLLS  0x1000

; ACPI PM1a control register: a 16-bit write of SLP_TYP = 5 (bits 10-12, the
; S5 soft-off state of the platform's \_S5 package) with SLP_EN (bit 13)
; powers the machine off.
%define PM1A_CNT_PORT   0x604
%define PM1A_SLEEP_S5   ((5 << 10) | (1 << 13))

%define SEL_CODE32      0x08
%define SEL_DATA        0x10
%define SEL_CODE64      0x18

%define MSR_EFER        0xc0000080
%define EFER_LME        (1 << 8)
%define CR0_PE          (1 << 0)
%define CR0_PG          (1 << 31)
%define CR4_PAE         (1 << 5)

; ---------------------------------------------------------------- real mode
start16:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, STACK_TOP

    call uart_init16
    mov si, msg_real
    call puts16

    lgdt [gdt_descriptor]
    mov eax, cr0
    or eax, CR0_PE
    mov cr0, eax
    jmp SEL_CODE32:start32

; Programs COM1 for 115200 baud, 8 data bits, no parity, 1 stop bit, FIFOs on,
; no interrupts.
uart_init16:
    mov dx, UART_IER
    xor al, al
    out dx, al
    mov dx, UART_LCR
    mov al, 0x80                ; DLAB = 1 to reach the divisor latch
    out dx, al
    mov dx, UART_DLL
    mov al, 1                   ; divisor 1 = 115200 baud
    out dx, al
    mov dx, UART_DLM
    xor al, al
    out dx, al
    mov dx, UART_LCR
    mov al, 0x03                ; 8N1, DLAB = 0
    out dx, al
    mov dx, UART_FCR
    mov al, 0x07                ; enable and clear both FIFOs
    out dx, al
    mov dx, UART_MCR
    mov al, 0x03                ; DTR and RTS
    out dx, al
    ret

; Writes the NUL-terminated string at DS:SI to COM1.
puts16:
    lodsb
    test al, al
    jz .done
    mov bl, al
    mov dx, UART_LSR
.wait:
    in al, dx
    test al, LSR_THR_EMPTY
    jz .wait
    mov dx, UART_THR
    mov al, bl
    out dx, al
    jmp puts16
.done:
    ret

; ---------------------------------------------------------- protected mode
bits 32
start32:
    mov ax, SEL_DATA
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    mov esp, STACK_TOP

    mov esi, msg_protected
    call puts32

    ; Zero the three tables, then link PML4[0] -> PDPT -> PD.
    mov edi, PML4_ADDR
    xor eax, eax
    mov ecx, (3 * 4096) / 4
    rep stosd
    mov dword [PML4_ADDR], PDPT_ADDR | 0x03     ; present, writable
    mov dword [PDPT_ADDR], PD_ADDR | 0x03

    ; 512 directory entries of 2 MiB pages: present, writable, PS.
    mov edi, PD_ADDR
    mov eax, 0x83
    mov ecx, 512
.fill_pd:
    mov [edi], eax
    mov dword [edi + 4], 0
    add eax, 0x200000
    add edi, 8
    loop .fill_pd

    mov eax, PML4_ADDR
    mov cr3, eax
    mov eax, cr4
    or eax, CR4_PAE
    mov cr4, eax
    mov ecx, MSR_EFER
    rdmsr
    or eax, EFER_LME
    wrmsr
    mov eax, cr0
    or eax, CR0_PG
    mov cr0, eax
    jmp SEL_CODE64:start64

; Writes the NUL-terminated string at DS:ESI to COM1.
puts32:
    lodsb
    test al, al
    jz .done
    mov bl, al
    mov dx, UART_LSR
.wait:
    in al, dx
    test al, LSR_THR_EMPTY
    jz .wait
    mov dx, UART_THR
    mov al, bl
    out dx, al
    jmp puts32
.done:
    ret

; --------------------------------------------------------------- long mode
bits 64
start64:
    mov ax, SEL_DATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, STACK_TOP

    lea rsi, [rel msg_long]
    call puts64
    lea rsi, [rel msg_banner]
    call puts64

    ; TSC at this point, in hex.
    lea rsi, [rel msg_tsc]
    call puts64
    rdtsc
    shl rdx, 32
    or rax, rdx
    call print_hex64
    call newline64

    call measure_tsc_rate
    call print_rtc_time

    lea rsi, [rel msg_echo]
    call puts64

echo_loop:
    call getc64
    cmp al, 'q'
    je power_off
    cmp al, 0x0d
    jne .plain
    call putc64
    mov al, 0x0a
.plain:
    call putc64
    jmp echo_loop

ctrl_alt_del:
    lea rsi, [rel msg_ctrl_alt_del]
    call puts64
power_off:
    lea rsi, [rel msg_bye]
    call puts64
    mov dx, PM1A_CNT_PORT
    mov ax, PM1A_SLEEP_S5
    out dx, ax
    ; The platform has no ACPI power-off at that port: stop here.
.halt:
    cli
    hlt
    jmp .halt

; Prints the TSC rate in MHz, timed against PIT channel 2. Each run reads the
; TSC before the PIT at the start and after it at the end, so a vCPU preempted
; in between can only inflate the TSC count; the fewest of PIT_RUNS runs wins.
measure_tsc_rate:
    lea rsi, [rel msg_rate]
    call puts64

    mov r11, -1                 ; fewest ticks so far
    mov r10d, PIT_RUNS
.run:
    call time_pit_count
    jc .missing
    cmp rax, r11
    cmovb r11, rax
    dec r10d
    jnz .run

    mov rax, r11                ; TSC ticks in PIT_COUNT / PIT_HZ seconds
    ; MHz = ticks * PIT_HZ / PIT_COUNT / 1e6
    mov rcx, PIT_HZ
    mul rcx
    mov rcx, PIT_COUNT * 1000000
    div rcx
    call print_dec64
    lea rsi, [rel msg_mhz]
    jmp puts64
.missing:
    lea rsi, [rel msg_no_pit]
    jmp puts64

; Counts TSC ticks while PIT channel 2 counts down at least PIT_COUNT ticks,
; reading the counter through latch commands. Returns in RAX the TSC ticks
; scaled to exactly PIT_COUNT PIT ticks with CF clear, or sets CF when no PIT
; channel 2 counts.
time_pit_count:
    in al, PIT_GATE
    and al, 0xfc                ; gate low, speaker off
    out PIT_GATE, al
    mov al, 0xb0                ; channel 2, lobyte/hibyte, mode 0, binary
    out PIT_MODE, al
    xor al, al                  ; count 0 means 65536, about 55 ms
    out PIT_CH2, al
    out PIT_CH2, al
    ; Mode 0 holds the output low until the count expires, so a high output now
    ; means that no PIT answers (the port reads as all ones).
    in al, PIT_GATE
    test al, 0x20
    jnz .absent
    or al, 0x01                 ; gate high: the count starts
    out PIT_GATE, al

    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax                 ; TSC at the start, read before the PIT
    call read_pit_count
    mov r9d, eax                ; PIT count at the start

    mov ecx, PIT_MAX_POLLS
.poll:
    call read_pit_count
    mov edx, r9d
    sub dx, ax                  ; PIT ticks so far, modulo 65536
    cmp dx, PIT_COUNT
    jae .done
    pause
    dec ecx
    jnz .poll
.absent:
    stc
    ret

.done:
    movzx r9d, dx               ; PIT ticks, read before the TSC
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, r8
    mov rcx, PIT_COUNT
    mul rcx
    div r9
    clc
    ret

; Latches PIT channel 2 and returns its count in AX.
read_pit_count:
    mov al, 0x80                ; counter latch command for channel 2
    out PIT_MODE, al
    in al, PIT_CH2
    mov ah, al
    in al, PIT_CH2
    xchg al, ah                 ; low byte came first
    ret

; Prints the CMOS RTC time as HH:MM:SS. The RTC keeps BCD by default, so each
; register prints as two hex digits. Status register A reads 0xFF where no RTC
; answers, and then the time prints as unavailable.
print_rtc_time:
    lea rsi, [rel msg_rtc]
    call puts64

    mov ecx, CMOS_MAX_POLLS     ; wait while an update is in progress
.wait_update:
    mov al, 0x0a
    out CMOS_INDEX, al
    in al, CMOS_DATA
    cmp al, 0xff
    je .missing
    test al, 0x80
    jz .read
    dec ecx
    jnz .wait_update
.read:
    mov bl, 0x04                ; hours
    call print_cmos_byte
    mov al, ':'
    call putc64
    mov bl, 0x02                ; minutes
    call print_cmos_byte
    mov al, ':'
    call putc64
    mov bl, 0x00                ; seconds
    call print_cmos_byte
    jmp newline64
.missing:
    lea rsi, [rel msg_no_rtc]
    jmp puts64

; Prints CMOS register BL as two hex digits.
print_cmos_byte:
    mov al, bl
    out CMOS_INDEX, al
    in al, CMOS_DATA
    movzx eax, al
    mov ecx, 2
    jmp print_hex_digits

; Prints RAX as 16 hex digits.
print_hex64:
    mov ecx, 16
; Prints the low ECX nibbles of RAX as hex digits, most significant first.
print_hex_digits:
    mov rdx, rax
    lea edi, [ecx * 4]
    mov r9d, ecx
.next:
    sub edi, 4
    mov rax, rdx
    mov ecx, edi
    shr rax, cl
    and eax, 0x0f
    lea r10, [rel hex_digits]
    mov al, [r10 + rax]
    push rdx
    call putc64
    pop rdx
    dec r9d
    jnz .next
    ret

; Prints RAX as an unsigned decimal number.
print_dec64:
    mov rcx, 10
    xor r9d, r9d                ; digits pushed
.divide:
    xor edx, edx
    div rcx
    add dl, '0'
    push rdx
    inc r9d
    test rax, rax
    jnz .divide
.emit:
    pop rax
    call putc64
    dec r9d
    jnz .emit
    ret

newline64:
    lea rsi, [rel msg_newline]
; Writes the NUL-terminated string at RSI to COM1.
puts64:
    lodsb
    test al, al
    jz .done
    call putc64
    jmp puts64
.done:
    ret

; Writes AL to COM1 once the transmit holding register is empty.
putc64:
    push rdx
    mov ah, al
    mov dx, UART_LSR
.wait:
    in al, dx
    test al, LSR_THR_EMPTY
    jz .wait
    mov dx, UART_THR
    mov al, ah
    out dx, al
    pop rdx
    ret

; Waits for a byte from COM1 and returns it in AL. Meanwhile it passes each
; keyboard byte to keyboard_byte and drops bytes from the mouse port.
; NOTE: it busy-polls both status registers, so a guest waiting for input
; keeps its vCPU at full load.
getc64:
    mov dx, UART_LSR
    in al, dx
    test al, LSR_DATA_READY
    jnz .ready
    in al, KBD_STATUS
    test al, KBD_OUTPUT_FULL
    jz .idle
    mov cl, al
    in al, KBD_DATA             ; reading empties the buffer in both cases
    test cl, KBD_AUX_DATA
    jnz .idle
    call keyboard_byte
.idle:
    pause
    jmp getc64
.ready:
    mov dx, UART_RBR
    in al, dx
    ret

; Tracks Ctrl and Alt from the set-1 scancode in AL and jumps to ctrl_alt_del
; when Delete is pressed while both are held. Left and right keys count alike,
; because the extended prefix is skipped.
keyboard_byte:
    cmp al, SC_EXTENDED
    je .done
    mov cl, al
    and cl, ~SC_RELEASE
    mov ch, MOD_CTRL
    cmp cl, SC_CTRL
    je .modifier
    mov ch, MOD_ALT
    cmp cl, SC_ALT
    je .modifier
    cmp al, SC_DELETE
    jne .done
    cmp byte [rel key_modifiers], MOD_CTRL | MOD_ALT
    je ctrl_alt_del             ; never returns, so the stack needs no cleanup
    ret
.modifier:
    test al, SC_RELEASE
    jnz .release
    or [rel key_modifiers], ch
    ret
.release:
    not ch
    and [rel key_modifiers], ch
.done:
    ret

; ------------------------------------------------------------------- data
align 8
gdt:
    dq 0                        ; null descriptor
    dq 0x00cf9a000000ffff       ; 0x08: 32-bit code, base 0, limit 4 GiB
    dq 0x00cf92000000ffff       ; 0x10: data, base 0, limit 4 GiB
    dq 0x00af9a000000ffff       ; 0x18: 64-bit code
gdt_end:

gdt_descriptor:
    dw gdt_end - gdt - 1
    dd gdt

key_modifiers:  db 0                  ; MOD_CTRL and MOD_ALT held now
hex_digits:     db "0123456789abcdef"
msg_real:       db "MonsterVM boot: real mode", 13, 10, 0
msg_protected:  db "MonsterVM boot: protected mode", 13, 10, 0
msg_long:       db "MonsterVM boot: long mode", 13, 10, 0
msg_banner:     db 13, 10, "Welcome to the MonsterVM embedded guest.", 13, 10, 0
msg_tsc:        db "TSC: 0x", 0
msg_rate:       db "TSC rate: ", 0
msg_mhz:        db " MHz (timed against PIT channel 2)", 13, 10, 0
msg_no_pit:     db "unknown (no PIT channel 2 that expires)", 13, 10, 0
msg_rtc:        db "RTC time: ", 0
msg_no_rtc:     db "unavailable", 13, 10, 0
msg_echo:       db "Type to echo, 'q' to power off.", 13, 10, 0
msg_ctrl_alt_del: db 13, 10, "Ctrl-Alt-Del pressed.", 0
msg_bye:        db 13, 10, "Powering off.", 13, 10, 0
msg_newline:    db 13, 10, 0
