; Real mode, entered at 0000:8000. Reads a byte from the test exit port 0xF4,
; which ends the run; the harness answers EXIT_PORT_READ_BYTE (0x42), so AL
; holds it once the IN is complete.
bits 16
org 0x8000

    xor ax, ax
    in al, 0xf4
    hlt
