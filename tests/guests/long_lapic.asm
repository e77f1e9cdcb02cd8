; 64-bit long mode with the harness's identity map, entered at 0x8000. Reads
; the local APIC at its default base 0xFEE00000: LVT LINT0 into EAX, LVT LINT1
; into EBX and the APIC ID register into ECX, then halts. Firmware leaves
; LINT0 in ExtINT mode (the PIC's path) and LINT1 in NMI mode.
bits 64
org 0x8000

    mov rsi, 0xfee00000
    mov eax, [rsi + 0x350]
    mov ebx, [rsi + 0x360]
    mov ecx, [rsi + 0x20]
    hlt
