; Real mode, entered at 0000:8000 with DS = SS = 0.
; Sums 1..100 with LOOP, checksums TABLE through a CALL, sends three bytes to
; port 0xE9 with REP OUTSB and one to port 0x80 with OUT, then halts.
;
; Results: [0x9000] = 5050 (word), BX = [0x9002] = byte sum of TABLE,
; DX = [0x9004] = XOR of TABLE's bytes.
bits 16
org 0x8000

    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7000

    mov cx, 100
.sum:
    add ax, cx
    loop .sum
    mov [0x9000], ax

    mov si, table
    mov cx, table_end - table
    call checksum
    mov [0x9002], bx
    mov [0x9004], dx

    mov si, message
    mov cx, 3
    mov dx, 0xe9
    rep outsb
    mov al, 0x5a
    out 0x80, al
    mov dx, [0x9004]
    hlt

; Returns in BX the 16-bit sum and in DX the XOR of the CX bytes at DS:SI.
checksum:
    xor bx, bx
    xor dx, dx
.next:
    lodsb
    movzx ax, al
    add bx, ax
    xor dl, al
    loop .next
    ret

table:      db "MonsterVM", 0x01, 0xff, 0x80
table_end:
message:    db "abc"
