; 64-bit long mode with the harness's identity map, entered at 0x8000. Jumps
; to 0xD0000000, an address with no RAM behind it. KVM cannot fetch
; instructions from MMIO, so the vCPU fails with an internal error.
bits 64
org 0x8000

    mov rax, 0xd0000000
    jmp rax
