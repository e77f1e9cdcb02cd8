; 64-bit long mode with the harness's identity map, entered at 0x8000. Turns on
; SSE (CR4.OSFXSR) and stores the FPU and SSE state with FXSAVE at 0x9000
; (FCW at +0, MXCSR at +24, XMM3 at +208), then halts. The stores show the
; state that the harness set before entry.
bits 64
org 0x8000

    mov rax, cr4
    or rax, 1 << 9
    mov cr4, rax
    fxsave [0x9000]
    hlt
