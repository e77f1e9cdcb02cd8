; Real mode, entered at 0000:8000. Counts in ECX forever, so only a kick ends
; the run.
bits 16
org 0x8000

    xor ecx, ecx
.spin:
    inc ecx
    jmp .spin
