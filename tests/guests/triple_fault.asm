; 32-bit protected mode, entered at 0x8000. Loads an empty IDT and executes
; UD2: the #UD cannot be delivered, nor the #GP and #DF that follow, so the
; CPU shuts down (a triple fault).
bits 32
org 0x8000

    lidt [empty_idt]
    ud2
    hlt

empty_idt:
    dw 0
    dd 0
