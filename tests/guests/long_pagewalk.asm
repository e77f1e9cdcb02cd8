; 64-bit long mode, entered at 0x8000 with CR3 = 0x1000 holding an identity map
; of the first 4 GiB in 2 MiB pages (PML4 0x1000, PDPT 0x2000, PDs 0x3000-0x6fff)
; and RSP = 0x8000.
;
; 1. Maps virtual 0x40000000 to physical 0x200000 through a new page directory
;    at 0x10000, writes a quadword through the alias and reads it back from the
;    physical address: RBX = 0x1122334455667788.
; 2. Walks the page tables in software for virtual 0x40000123: RAX = 0x200123.
; 3. Writes 0xCAFEF00D to MMIO address 0xD0000000 and reads a doubleword from
;    0xD0000008 into R12.
; 4. Reads CPUID leaf 0 EAX into R15 and leaf 1 ECX and EDX into R13 and R14.
; Then halts.
bits 64
org 0x8000

%define NEW_PD      0x10000
%define ALIAS       0x40000000
%define TARGET      0x200000
%define OFFSET      0x123

    ; Step 1: zero the new directory, map one 2 MiB page, link it as PDPT[1].
    mov rdi, NEW_PD
    xor eax, eax
    mov ecx, 512
    rep stosq
    mov qword [NEW_PD], TARGET | 0x83
    mov rax, cr3
    and rax, ~0xfff
    mov rdx, [rax]              ; PML4[0]
    and rdx, ~0xfff
    mov qword [rdx + 8], NEW_PD | 0x03
    mov rax, cr3
    mov cr3, rax                ; flush the TLB
    mov rax, 0x1122334455667788
    mov [ALIAS + OFFSET], rax
    mov rbx, [TARGET + OFFSET]

    ; Step 2: walk CR3 -> PML4 -> PDPT -> PD for ALIAS + OFFSET.
    mov rsi, ALIAS + OFFSET
    call translate

    ; Step 3: MMIO outside RAM. A 32-bit displacement would sign-extend, so the
    ; address goes through a register.
    mov rdi, 0xd0000000
    mov dword [rdi], 0xcafef00d
    mov r12d, [rdi + 8]

    ; Step 4: CPUID.
    push rax
    push rbx
    xor eax, eax
    cpuid
    mov r15, rax
    mov eax, 1
    cpuid
    mov r13, rcx
    mov r14, rdx
    pop rbx
    pop rax
    hlt

; Returns in RAX the physical address that RSI maps to through 2 MiB pages, or
; all ones when an entry on the way is not present.
translate:
    mov rcx, 0x000ffffffffff000 ; physical-address bits of a table entry
    mov rax, cr3
    and rax, rcx
    mov rdx, rsi
    shr rdx, 39
    and edx, 511
    mov rax, [rax + rdx * 8]    ; PML4E
    test al, 1
    jz .missing
    and rax, rcx
    mov rdx, rsi
    shr rdx, 30
    and edx, 511
    mov rax, [rax + rdx * 8]    ; PDPTE
    test al, 1
    jz .missing
    and rax, rcx
    mov rdx, rsi
    shr rdx, 21
    and edx, 511
    mov rax, [rax + rdx * 8]    ; PDE, a 2 MiB page
    test al, 1
    jz .missing
    mov rcx, 0x000fffffffe00000
    and rax, rcx
    mov rdx, rsi
    and edx, 0x1fffff
    or rax, rdx
    ret
.missing:
    mov rax, -1
    ret
