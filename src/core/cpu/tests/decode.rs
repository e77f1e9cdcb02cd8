//! Decoded-instruction cache: self-modifying code, DMA invalidation, cross-page
//! instructions, and a speed measurement.

use std::time::Instant;

use super::Machine;
use crate::core::cpu::CpuEvent;

#[test]
fn self_modifying_code_is_seen() {
    // The loop body runs twice; between the runs the code rewrites the immediate of
    // `patched` from 1 to 2.
    let body = r#"
start:
    xor ebx, ebx
    mov ecx, 2
again:
patched:
    mov eax, 1
    add ebx, eax
    mov byte [rel patched + 1], 2
    dec ecx
    jnz again
    hlt
"#;
    let mut m = Machine::long_mode(body);
    assert_eq!(m.run(1000), CpuEvent::Halted);
    assert_eq!(
        m.cpu.gpr[3], 3,
        "first pass adds 1, second pass adds the patched 2"
    );
}

#[test]
fn store_to_next_instruction_seen() {
    // The store rewrites the immediate of the very next instruction, which was decoded
    // into the same block: the block must stop after the store, as a real CPU does.
    let body = r#"
start:
    mov byte [rel patched + 1], 5
patched:
    mov eax, 1
    hlt
"#;
    let mut m = Machine::long_mode(body);
    assert_eq!(m.run(100), CpuEvent::Halted);
    assert_eq!(m.cpu.gpr[0], 5);
}

#[test]
fn budget_splits_block() {
    let body = r#"
start:
    inc eax
    inc eax
    inc eax
    inc eax
    inc eax
    hlt
"#;
    let mut m = Machine::long_mode(body);
    // The prelude's first instruction jumps to `start`.
    assert_eq!(m.run(1), CpuEvent::BudgetExhausted);
    let before = m.cpu.instructions();
    assert_eq!(m.run(3), CpuEvent::BudgetExhausted);
    assert_eq!(m.cpu.instructions() - before, 3);
    assert_eq!(m.cpu.gpr[0], 3, "exactly three of the five INCs ran");
    assert_eq!(m.run(100), CpuEvent::Halted);
    assert_eq!(m.cpu.gpr[0], 5, "the rest of the block ran from the middle");
}

#[test]
fn block_fault_keeps_earlier_results() {
    // The load from an unmapped page faults after two instructions of the block have run.
    // Their results stay, and the faulting load leaves RAX unchanged.
    let body = r#"
start:
    mov ebx, 7
    mov ecx, 9
fault:
    mov rax, [0x40000000]
    mov edx, 1
    hlt
"#;
    let mut m = Machine::long_mode(body);
    m.cpu.gpr[0] = 0x1234;
    m.cpu.gpr[2] = 0;
    assert_eq!(m.run(100), CpuEvent::Halted);
    assert_eq!(m.vector(), 14);
    assert_eq!((m.cpu.gpr[3], m.cpu.gpr[1]), (7, 9));
    assert_eq!(m.cpu.gpr[0], 0x1234);
    assert_eq!(
        m.cpu.gpr[2], 0,
        "the instruction after the fault did not run"
    );
}

#[test]
fn dma_invalidation_through_code_watch() {
    let body = r#"
start:
    mov eax, 1
    jmp start
"#;
    let mut m = Machine::long_mode(body);
    assert_eq!(m.run(100), CpuEvent::BudgetExhausted);
    assert_eq!(m.cpu.gpr[0], 1);

    // A device rewrites the immediate behind the CPU's back: `mov eax, imm32` is B8 imm32.
    let code = super::assemble(&format!("{}\n{body}", super::PRELUDE));
    let offset = code
        .windows(5)
        .position(|w| w == [0xb8, 1, 0, 0, 0])
        .unwrap() as u64;
    let address = super::ORG + offset + 1;
    m.load(address, &[7]);
    m.cpu.code_watch().invalidate(address, 1);
    assert_eq!(m.run(100), CpuEvent::BudgetExhausted);
    assert_eq!(m.cpu.gpr[0], 7);
}

#[test]
fn instruction_crossing_pages_decodes() {
    // `mov rax, imm64` (10 bytes) starting 3 bytes before a page boundary.
    let body = r#"
start:
    jmp near 0x10ffd
times 0xffd - ($ - $$) nop
    mov rax, 0x1122334455667788
    hlt
"#;
    let mut m = Machine::long_mode(body);
    assert_eq!(m.run(100), CpuEvent::Halted);
    assert_eq!(m.cpu.gpr[0], 0x1122_3344_5566_7788);

    // A fault on the second page reports the fetch's linear address.
    let mut m = Machine::long_mode(body);
    m.set_pte(0x11000, 0);
    assert_eq!(m.run(100), CpuEvent::Halted);
    assert_eq!(m.vector(), 14);
    assert_eq!(m.cr2(), 0x11000);
}

/// Prints the emulator's speed on a register loop (no assertion on time).
#[test]
fn register_loop_speed() {
    let body = r#"
start:
    mov ecx, 2000000
    xor eax, eax
again:
    add eax, ecx
    xor edx, eax
    dec ecx
    jnz again
    hlt
"#;
    let mut m = Machine::long_mode(body);
    let started = Instant::now();
    assert_eq!(m.run(u64::MAX), CpuEvent::Halted);
    let elapsed = started.elapsed().as_secs_f64();
    let instructions = m.cpu.instructions();
    assert!(instructions > 8_000_000);
    println!(
        "register loop: {instructions} instructions in {elapsed:.3} s = {:.1} MIPS (decode cache misses {})",
        instructions as f64 / elapsed / 1e6,
        m.cpu.decode_cache.misses
    );
}

/// Prints the emulator's speed on compiled-C-style integer code: a multi-precision
/// multiply-subtract over 32-bit halves, with loads, stores, flags and conditional moves,
/// the shape of the kernel's generic bignum loops (no assertion on time).
#[test]
fn bignum_loop_speed() {
    let body = r#"
start:
    mov r15, 20000              ; passes over the 64-limb vector
    mov r9, 0x9e3779b9          ; multiplier, low half
    mov r10, 0x7f4a7c15         ; multiplier, high half
pass:
    lea rbx, [rel limbs]
    lea rdi, [rel result]
    mov r8d, -64
    xor esi, esi                ; borrow limb
limb:
    mov rcx, [rbx]
    mov rdx, rcx
    mov ecx, ecx
    shr rdx, 32
    mov rax, rcx
    imul rax, r9
    mov r13, rdx
    imul r13, r9
    imul rcx, r10
    imul rdx, r10
    mov r14, rax
    mov eax, eax
    shr r14, 32
    add rcx, r13
    add rcx, r14
    mov r14, rdx
    cmp rcx, r13
    mov r13, rcx
    cmovae rdx, r14
    add rax, rsi
    shl r13, 32
    add rax, r13
    cmp rax, rsi
    setb sil
    shr rcx, 32
    mov r13, [rdi]
    movzx esi, sil
    sub r13, rax
    adc rsi, rcx
    mov [rdi], r13
    add rsi, rdx
    add rbx, 8
    add rdi, 8
    add r8d, 1
    jne limb
    dec r15
    jnz pass
    hlt
align 4096                  ; data on its own page: stores to a code page flush it
limbs:
%assign i 0
%rep 64
    dq 0x0123456789abcdef * (i + 1)
%assign i i + 1
%endrep
result:
    times 64 dq 0
"#;
    let mut m = Machine::long_mode(body);
    let started = Instant::now();
    assert_eq!(m.run(u64::MAX), CpuEvent::Halted);
    let elapsed = started.elapsed().as_secs_f64();
    let instructions = m.cpu.instructions();
    assert!(instructions > 40_000_000);
    println!(
        "bignum loop: {instructions} instructions in {elapsed:.3} s = {:.1} MIPS",
        instructions as f64 / elapsed / 1e6
    );
}
