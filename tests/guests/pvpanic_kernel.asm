; A 64-bit ELF "kernel" for `monstervm run --kernel`: it checks that the pvpanic port
; (0x505) reports the panic event, prints a line on COM1, reports a panic there, and then
; resets the machine through the i8042 as a Linux kernel booted with panic=-1 would.
; Without the pvpanic event bit it prints "no pvpanic" and halts instead.

BITS 64
org 0x1000000

%define COM1        0x3f8
%define PVPANIC     0x505
%define PANICKED    1

ehdr:
  db 0x7f, 'ELF', 2, 1, 1, 0
  times 8 db 0
  dw 2, 62                      ; executable, x86-64
  dd 1
  dq entry, phdrs - ehdr, 0
  dd 0
  dw 64, 56, 1, 64, 0, 0
phdrs:
  dd 1, 5                       ; PT_LOAD, read and execute
  dq 0, 0x1000000, 0x1000000, file_end - ehdr, file_end - ehdr, 0x1000

entry:
  mov dx, PVPANIC
  in al, dx
  test al, PANICKED
  jz .missing
  lea rsi, [rel panicking]
  call print
  mov dx, PVPANIC
  mov al, PANICKED
  out dx, al
  mov al, 0xfe                  ; i8042 command: pulse the reset line
  out 0x64, al
  jmp .halt
.missing:
  lea rsi, [rel missing]
  call print
.halt:
  cli
  hlt
  jmp .halt

; Writes the NUL-terminated string at rsi to COM1 (the device accepts a byte at any time).
print:
  mov dx, COM1
.next:
  lodsb
  test al, al
  jz .done
  out dx, al
  jmp .next
.done:
  ret

panicking: db 'Kernel panic - not syncing: test guest', 13, 10, 0
missing:   db 'no pvpanic', 13, 10, 0
file_end:
