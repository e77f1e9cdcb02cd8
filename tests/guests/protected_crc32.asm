; 32-bit protected mode with flat segments and paging off, entered at 0x8000.
; Computes the CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) of the
; ASCII digits "123456789", stores it at 0x9000 and writes it to the test exit
; port 0xF4 as a doubleword. The standard check value is 0xCBF43926.
bits 32
org 0x8000

    mov esp, 0x7000
    mov esi, digits
    mov ecx, digits_end - digits
    call crc32
    mov [0x9000], eax
    mov dx, 0xf4
    out dx, eax
    hlt

; Returns in EAX the CRC-32 of the ECX bytes at ESI.
crc32:
    mov eax, 0xffffffff
.byte:
    xor al, [esi]
    inc esi
    mov edx, 8
.bit:
    shr eax, 1
    jnc .no_xor
    xor eax, 0xedb88320
.no_xor:
    dec edx
    jnz .bit
    loop .byte
    not eax
    ret

digits:     db "123456789"
digits_end:
