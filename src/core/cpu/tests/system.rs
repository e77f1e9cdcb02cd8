//! System instructions (CPUID, MSRs, SYSCALL/SYSRET, SWAPGS, RDTSC) and SSE/x87 state.

use super::Machine;
use crate::core::cpu::exceptions::GP;
use crate::core::cpu::state::GS;
use crate::core::cpu::CpuEvent;

fn run(body: &str) -> Machine {
    let mut m = Machine::long_mode(&format!("start:\n{body}\n    hlt\n"));
    assert_eq!(m.run(100_000), CpuEvent::Halted);
    m
}

#[test]
fn cpuid_from_guest() {
    let m = run("mov eax, 1\n cpuid");
    assert_eq!((m.cpu.gpr[3] >> 8) & 0xff, 8, "CLFLUSH line size");
    assert_ne!(m.cpu.gpr[1] & (1 << 31), 0, "hypervisor bit");
    let m = run("mov eax, 0x80000001\n cpuid");
    assert_ne!(m.cpu.gpr[2] & (1 << 29), 0, "long mode");
}

#[test]
fn unknown_msr_raises_gp() {
    let m = run("mov ecx, 0x12345678\n rdmsr");
    assert_eq!(m.exception_count(), 1);
    assert_eq!(m.vector(), u64::from(GP));
    assert_eq!(m.error_code(), 0);
}

#[test]
fn msr_round_trip_and_canonical_check() {
    let m = run("mov ecx, 0xc0000082\n mov eax, 0x12345678\n mov edx, 0x8000\n wrmsr");
    assert_eq!(
        m.exception_count(),
        1,
        "0x0000800012345678 is not canonical"
    );
    let m = run("mov ecx, 0xc0000082\n mov eax, 0x12345678\n mov edx, 0xffff8000\n wrmsr\n xor eax, eax\n xor edx, edx\n rdmsr");
    assert_eq!(m.exception_count(), 0);
    assert_eq!((m.cpu.gpr[2] << 32) | m.cpu.gpr[0], 0xffff_8000_1234_5678);
}

#[test]
fn syscall_sysret_round_trip() {
    // Linux's selectors: STAR[47:32] = 0x10 (kernel CS), STAR[63:48] = 0x23 (user CS32).
    let body = r#"
    mov ecx, 0xc0000081
    xor eax, eax
    mov edx, 0x00230010
    wrmsr
    mov ecx, 0xc0000082
    lea rax, [rel entry]
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov ecx, 0xc0000084
    mov eax, 0x200            ; clear IF on entry
    xor edx, edx
    wrmsr
    push 0x2b
    push 0x50000
    push 0x202
    push 0x33
    lea rax, [rel user]
    push rax
    iretq
user:
    mov r12, cs
    syscall
    mov r13, cs
    mov r14, 0x77
    hlt                       ; #GP at CPL 3
entry:
    mov r15, cs
    pushfq
    pop rbx
    o64 sysret
"#;
    let m = run(body);
    assert_eq!(m.cpu.gpr[12], 0x33);
    assert_eq!(m.cpu.gpr[15], 0x10, "kernel CS from STAR");
    assert_eq!(m.cpu.gpr[3] & 0x200, 0, "FMASK cleared IF");
    assert_eq!(m.cpu.gpr[11] & 0x200, 0x200, "R11 holds the user RFLAGS");
    assert_eq!(m.cpu.gpr[13], 0x33, "SYSRETQ returned to 64-bit user code");
    assert_eq!(m.cpu.gpr[14], 0x77);
    assert_eq!(m.vector(), u64::from(GP), "HLT at CPL 3 faults");
}

#[test]
fn swapgs_exchanges_bases() {
    let m = run("mov ecx, 0xc0000102\n mov eax, 0x1000\n xor edx, edx\n wrmsr\n swapgs\n mov qword [gs:8], 5");
    assert_eq!(m.cpu.seg[GS].base, 0x1000);
    assert_eq!(m.read_u64(0x1008), 5);
}

#[test]
fn rdtsc_counts_and_offsets() {
    let m = run("rdtsc\n mov rbx, rax\n rdtsc\n sub rax, rbx\n mov rsi, rax");
    assert_eq!(m.cpu.gpr[6], 1000, "the test bus ticks 1000 per read");
    let m = run("mov ecx, 0x10\n xor edx, edx\n mov eax, 0x100000\n wrmsr\n rdtsc");
    assert_eq!(m.cpu.gpr[0], 0x100000 + 1000);
}

#[test]
fn sse_string_search_building_blocks() {
    let body = r#"
    mov rax, 0x6867666564636261
    mov [abs 0x91000], rax
    mov rax, 0x0070006e6d6c6b6a
    mov [abs 0x91008], rax
    movdqa xmm0, [abs 0x91000]
    pxor xmm1, xmm1
    pcmpeqb xmm1, xmm0
    pmovmskb eax, xmm1
    mov ebx, 0x61
    movd xmm2, ebx
    punpcklbw xmm2, xmm2
    punpcklwd xmm2, xmm2
    pshufd xmm2, xmm2, 0
    pcmpeqb xmm2, xmm0
    pmovmskb ecx, xmm2
    movdqu [abs 0x92001], xmm0
"#;
    let m = run(body);
    assert_eq!(m.cpu.gpr[0], 0xa000, "zero bytes at 13 and 15");
    assert_eq!(m.cpu.gpr[1], 0x0001, "'a' only at byte 0");
    assert_eq!(m.read_u64(0x92001), 0x6867_6665_6463_6261);
    assert_eq!(m.exception_count(), 0);
}

#[test]
fn misaligned_movdqa_raises_gp() {
    let m = run("movdqa xmm0, [abs 0x91008]");
    assert_eq!(m.vector(), u64::from(GP));
}

#[test]
fn scalar_double_arithmetic() {
    let body = r#"
    mov eax, 7
    cvtsi2sd xmm0, eax
    mov eax, 2
    cvtsi2sd xmm1, eax
    divsd xmm0, xmm1
    sqrtsd xmm2, xmm1
    mulsd xmm2, xmm2
    cvttsd2si rbx, xmm0
    cvtsd2si rcx, xmm0
    ucomisd xmm0, xmm1
    seta dl
    movq rsi, xmm2
"#;
    let m = run(body);
    assert_eq!(m.cpu.gpr[3], 3, "truncated 3.5");
    assert_eq!(m.cpu.gpr[1], 4, "3.5 rounds to even");
    assert_eq!(m.cpu.gpr[2] & 0xff, 1);
    assert!((f64::from_bits(m.cpu.gpr[6]) - 2.0).abs() < 1e-15);
}

#[test]
fn fxsave_fxrstor_round_trip() {
    let body = r#"
    mov rax, 0x1122334455667788
    movq xmm5, rax
    fninit
    mov word [abs 0x91800], 0x27f
    fldcw [abs 0x91800]
    fxsave [abs 0x91000]
    pxor xmm5, xmm5
    fninit
    fxrstor [abs 0x91000]
    movq rbx, xmm5
    fnstcw [abs 0x91802]
    stmxcsr [abs 0x91804]
"#;
    let m = run(body);
    assert_eq!(m.cpu.gpr[3], 0x1122_3344_5566_7788);
    assert_eq!(m.read_u64(0x91800) >> 16 & 0xffff, 0x27f);
    assert_eq!(m.read_u64(0x91000 + 160 + 5 * 16), 0x1122_3344_5566_7788);
    assert_eq!(
        m.read_u64(0x91000 + 24) & 0xffff_ffff,
        0x1f80,
        "MXCSR in the area"
    );
    assert_eq!(m.read_u64(0x91804) & 0xffff_ffff, 0x1f80);
}
