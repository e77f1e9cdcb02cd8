//! x87 data movement and arithmetic, run from NASM-assembled code.

use super::Machine;
use crate::core::cpu::flags::{CF, ZF};
use crate::core::cpu::CpuEvent;

/// Scratch memory for operands and results, identity-mapped by the prelude.
const DATA: u64 = 0x91000;

/// Runs `body` in 64-bit mode after FNINIT until its HLT and returns the machine.
fn run(body: &str) -> Machine {
    let mut m = Machine::long_mode(&format!("start:\n    fninit\n{body}\n    hlt\n"));
    assert_eq!(m.run(10_000), CpuEvent::Halted);
    assert_eq!(
        m.exception_count(),
        0,
        "unexpected exception {}",
        m.vector()
    );
    m
}

/// Runs `body` with the binary64 `value` at DATA and returns the binary64 at DATA + 8.
fn compute_f64(value: f64, body: &str) -> f64 {
    let setup = format!(
        "    mov rax, {:#x}\n    mov [abs {DATA:#x}], rax\n",
        value.to_bits()
    );
    let m = run(&format!("{setup}{body}"));
    f64::from_bits(m.read_u64(DATA + 8))
}

#[test]
fn x87_integer_load_add_store() {
    let m = run(
        "    mov dword [abs 0x91000], 3\n    fild dword [abs 0x91000]\n    fld1\n    faddp st1, st0\n    fstp qword [abs 0x91008]",
    );
    assert_eq!(f64::from_bits(m.read_u64(DATA + 8)), 4.0);
    // Every pushed value was popped: TOP is 0 again and the stack is empty.
    assert_eq!(m.cpu.x87.fsw & 0x3800, 0);
    assert_eq!(m.cpu.x87.ftw, 0);
}

#[test]
fn x87_division_and_reverse_forms() {
    let third = compute_f64(
        3.0,
        "    fld1\n    fld qword [abs 0x91000]\n    fdivp st1, st0\n    fstp qword [abs 0x91008]",
    );
    assert_eq!(third, 1.0 / 3.0);
    let three = compute_f64(
        3.0,
        "    fld1\n    fld qword [abs 0x91000]\n    fdivrp st1, st0\n    fstp qword [abs 0x91008]",
    );
    assert_eq!(three, 3.0);
    let difference = compute_f64(
        10.0,
        "    fld1\n    fsubr qword [abs 0x91000]\n    fstp qword [abs 0x91008]",
    );
    assert_eq!(difference, 9.0);
    let product = compute_f64(
        1.5,
        "    fld qword [abs 0x91000]\n    fmul st0, st0\n    fstp qword [abs 0x91008]",
    );
    assert_eq!(product, 2.25);
}

#[test]
fn x87_sqrt_chs_abs() {
    let root = compute_f64(
        2.0,
        "    fld qword [abs 0x91000]\n    fsqrt\n    fstp qword [abs 0x91008]",
    );
    assert_eq!(root, 2.0f64.sqrt());
    let negated = compute_f64(
        2.5,
        "    fld qword [abs 0x91000]\n    fchs\n    fstp qword [abs 0x91008]",
    );
    assert_eq!(negated, -2.5);
    let absolute = compute_f64(
        -7.25,
        "    fld qword [abs 0x91000]\n    fabs\n    fstp qword [abs 0x91008]",
    );
    assert_eq!(absolute, 7.25);
}

#[test]
fn x87_integer_store_rounds_by_fcw() {
    let m = run(
        "    mov rax, 0x4004000000000000\n    mov [abs 0x91000], rax\n    fld qword [abs 0x91000]\n    fistp dword [abs 0x91008]",
    );
    assert_eq!(m.read_u64(DATA + 8) as u32, 2, "2.5 rounds to even");
    // FCW 0x77f: rounding down, all exceptions masked.
    let m = run(
        "    mov rax, 0xc004000000000000\n    mov [abs 0x91000], rax\n    mov word [abs 0x91010], 0x77f\n    fldcw [abs 0x91010]\n    fld qword [abs 0x91000]\n    fistp qword [abs 0x91008]",
    );
    assert_eq!(m.read_u64(DATA + 8) as i64, -3, "-2.5 rounds down to -3");
    assert_ne!(m.cpu.x87.fsw & 0x20, 0, "inexact conversion sets PE");
}

#[test]
fn x87_frndint_rounds_to_nearest_even() {
    let rounded = compute_f64(
        3.5,
        "    fld qword [abs 0x91000]\n    frndint\n    fstp qword [abs 0x91008]",
    );
    assert_eq!(rounded, 4.0);
    let rounded = compute_f64(
        -0.25,
        "    fld qword [abs 0x91000]\n    frndint\n    fstp qword [abs 0x91008]",
    );
    assert_eq!(rounded.to_bits(), (-0.0f64).to_bits());
}

#[test]
fn x87_extended_load_store_exact() {
    // 1 + 2^-63 needs all 64 significand bits, more than binary64 holds.
    let m = run(
        "    mov rax, 0x8000000000000001\n    mov [abs 0x91000], rax\n    mov word [abs 0x91008], 0x3fff\n    fld tword [abs 0x91000]\n    fstp tword [abs 0x91020]",
    );
    assert_eq!(m.read_u64(DATA + 0x20), 0x8000_0000_0000_0001);
    assert_eq!(m.read_u64(DATA + 0x28) & 0xffff, 0x3fff);
}

#[test]
fn x87_single_store_rounds() {
    let m = run(
        "    mov rax, 0x3fb999999999999a\n    mov [abs 0x91000], rax\n    fld qword [abs 0x91000]\n    fstp dword [abs 0x91008]",
    );
    assert_eq!(m.read_u64(DATA + 8) as u32, 0.1f32.to_bits());
    assert_ne!(m.cpu.x87.fsw & 0x20, 0, "rounding 0.1 to binary32 sets PE");
}

#[test]
fn x87_compare_sets_condition_codes() {
    // ST0 = 1, ST1 = 2: FCOM finds ST0 below, so C0 is set and C3 clear.
    let m = run(
        "    fld1\n    fld1\n    fadd st0, st0\n    fxch st1\n    fcom st1\n    fnstsw ax\n    mov [abs 0x91000], rax",
    );
    let status = m.read_u64(DATA) as u16;
    assert_ne!(status & 0x100, 0, "C0");
    assert_eq!(status & 0x4000, 0, "C3");
    // FUCOMIP of equal values sets ZF and clears CF, then pops one register.
    let m = run("    fld1\n    fld1\n    fucomip st0, st1");
    assert_ne!(m.cpu.rflags() & ZF, 0);
    assert_eq!(m.cpu.rflags() & CF, 0);
    assert_eq!(
        (m.cpu.x87.fsw >> 11) & 7,
        7,
        "one register left on the stack"
    );
}

#[test]
fn x87_stack_overflow_sets_invalid_and_sf() {
    let pushes = "    fld1\n".repeat(9);
    let m = run(&pushes);
    let status = m.cpu.x87.fsw;
    assert_ne!(status & 0x1, 0, "IE");
    assert_ne!(status & 0x40, 0, "SF");
    assert_ne!(status & 0x200, 0, "C1 marks an overflow");
}

/// Returns the 80-bit value stored at `address` as (exponent and sign, significand).
fn read_extended(m: &Machine, address: u64) -> (u16, u64) {
    (m.read_u64(address + 8) as u16, m.read_u64(address))
}

#[test]
fn x87_division_keeps_64_bits() {
    let m = run(
        "    mov dword [abs 0x91000], 3\n    fild dword [abs 0x91000]\n    fld1\n    fdivrp st1, st0\n    fstp tword [abs 0x91020]",
    );
    assert_eq!(
        read_extended(&m, DATA + 0x20),
        (0x3ffd, 0xaaaa_aaaa_aaaa_aaab)
    );
    // FCW 0x27f selects 53-bit precision, which rounds like binary64.
    let m = run(
        "    mov word [abs 0x91010], 0x27f\n    fldcw [abs 0x91010]\n    mov dword [abs 0x91000], 3\n    fild dword [abs 0x91000]\n    fld1\n    fdivrp st1, st0\n    fstp tword [abs 0x91020]",
    );
    assert_eq!(
        read_extended(&m, DATA + 0x20),
        (0x3ffd, 0xaaaa_aaaa_aaaa_a800)
    );
}

#[test]
fn x87_sqrt_keeps_64_bits() {
    let m = run(
        "    mov dword [abs 0x91000], 2\n    fild dword [abs 0x91000]\n    fsqrt\n    fstp tword [abs 0x91020]",
    );
    assert_eq!(
        read_extended(&m, DATA + 0x20),
        (0x3fff, 0xb504_f333_f9de_6484)
    );
    assert_ne!(m.cpu.x87.fsw & 0x20, 0, "the root of 2 is inexact");
}

#[test]
fn x87_addition_exact_in_64_bits() {
    // (1 + 2^-63) + (1 + 2^-63) = 2 + 2^-62, exact with a 64-bit significand.
    let m = run(
        "    mov rax, 0x8000000000000001\n    mov [abs 0x91000], rax\n    mov word [abs 0x91008], 0x3fff\n    fld tword [abs 0x91000]\n    fld st0\n    faddp st1, st0\n    fstp tword [abs 0x91020]",
    );
    assert_eq!(
        read_extended(&m, DATA + 0x20),
        (0x4000, 0x8000_0000_0000_0001)
    );
    assert_eq!(m.cpu.x87.fsw & 0x20, 0, "exact sum leaves PE clear");
}

/// The sequence that `x87_matches_host_cpu` runs on both sides, for the pair of
/// binary64 values at RSI, storing seven 80-bit results 16 bytes apart at RDI.
const HOST_CHECK_SEQUENCE: &str = "
    fld qword [rsi + 8]
    fld qword [rsi]
    fadd st0, st1
    fstp tword [rdi]
    fld qword [rsi]
    fmul st0, st1
    fstp tword [rdi + 16]
    fld qword [rsi]
    fdiv st0, st1
    fstp tword [rdi + 32]
    fld qword [rsi]
    fsub st0, st1
    fstp tword [rdi + 48]
    fld qword [rsi]
    fdiv st0, st1
    fmul st0, st0
    fstp tword [rdi + 64]
    fld qword [rsi]
    fdiv st0, st1
    fabs
    fsqrt
    fstp tword [rdi + 80]
    fld qword [rsi]
    fdiv st0, st1
    fadd st0, st1
    fstp tword [rdi + 96]
    fstp st0
";

/// Runs `HOST_CHECK_SEQUENCE` on the host CPU.
#[cfg(target_arch = "x86_64")]
fn host_results(pair: &[f64; 2]) -> [u8; 112] {
    let mut results = [0u8; 112];
    // SAFETY: the sequence reads the 16 bytes of `pair` and writes the 112 bytes of
    // `results`, both valid for the whole block, and leaves the x87 stack empty after
    // FNINIT, which restores the default control word that the Rust ABI expects.
    unsafe {
        std::arch::asm!(
            "fninit",
            "fld qword ptr [{pair} + 8]",
            "fld qword ptr [{pair}]",
            "fadd st(0), st(1)",
            "fstp tbyte ptr [{out}]",
            "fld qword ptr [{pair}]",
            "fmul st(0), st(1)",
            "fstp tbyte ptr [{out} + 16]",
            "fld qword ptr [{pair}]",
            "fdiv st(0), st(1)",
            "fstp tbyte ptr [{out} + 32]",
            "fld qword ptr [{pair}]",
            "fsub st(0), st(1)",
            "fstp tbyte ptr [{out} + 48]",
            "fld qword ptr [{pair}]",
            "fdiv st(0), st(1)",
            "fmul st(0), st(0)",
            "fstp tbyte ptr [{out} + 64]",
            "fld qword ptr [{pair}]",
            "fdiv st(0), st(1)",
            "fabs",
            "fsqrt",
            "fstp tbyte ptr [{out} + 80]",
            "fld qword ptr [{pair}]",
            "fdiv st(0), st(1)",
            "fadd st(0), st(1)",
            "fstp tbyte ptr [{out} + 96]",
            "fstp st(0)",
            "fninit",
            pair = in(reg) pair.as_ptr(),
            out = in(reg) results.as_mut_ptr(),
            out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
            out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
        );
    }
    results
}

#[cfg(target_arch = "x86_64")]
#[test]
fn x87_matches_host_cpu() {
    const PAIRS: u64 = 300;
    const INPUT: u64 = 0x200000;
    const OUTPUT: u64 = 0x300000;
    const STRIDE: u64 = 128;

    // Pairs of binary64 values of random sign, significand and exponent (2^-40 to
    // 2^40), from a fixed linear congruential sequence.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state
    };
    let mut pairs = Vec::new();
    for _ in 0..PAIRS {
        let mut pair = [0.0f64; 2];
        for value in &mut pair {
            let bits = next();
            let exponent = 1023 - 40 + (bits >> 56) % 81;
            *value = f64::from_bits((bits & 0x800f_ffff_ffff_ffff) | exponent << 52);
        }
        pairs.push(pair);
    }

    let program = format!(
        "    mov rsi, {INPUT:#x}\n    mov rdi, {OUTPUT:#x}\n    mov ecx, {PAIRS}\n.next:\n{HOST_CHECK_SEQUENCE}\n    add rsi, 16\n    add rdi, {STRIDE}\n    dec ecx\n    jnz .next"
    );
    let mut m = Machine::long_mode(&format!("start:\n    fninit\n{program}\n    hlt\n"));
    for (i, pair) in pairs.iter().enumerate() {
        let address = INPUT + 16 * i as u64;
        m.write_u64(address, pair[0].to_bits());
        m.write_u64(address + 8, pair[1].to_bits());
    }
    assert_eq!(m.run(1_000_000), CpuEvent::Halted);
    assert_eq!(
        m.exception_count(),
        0,
        "unexpected exception {}",
        m.vector()
    );

    let names = ["a+b", "a*b", "a/b", "a-b", "(a/b)^2", "sqrt|a/b|", "a/b+b"];
    for (i, pair) in pairs.iter().enumerate() {
        let expected = host_results(pair);
        let base = OUTPUT + STRIDE * i as u64;
        for (k, name) in names.iter().enumerate() {
            let offset = 16 * k;
            let host = (
                u16::from_le_bytes([expected[offset + 8], expected[offset + 9]]),
                u64::from_le_bytes(expected[offset..offset + 8].try_into().unwrap()),
            );
            let emulated = read_extended(&m, base + offset as u64);
            assert_eq!(
                emulated, host,
                "{name} for a = {:e}, b = {:e}",
                pair[0], pair[1]
            );
        }
    }
}

#[test]
fn x87_integer_operand_forms() {
    let m = run(
        "    mov dword [abs 0x91000], 10\n    mov word [abs 0x91004], 4\n    fild dword [abs 0x91000]\n    fidiv word [abs 0x91004]\n    fisubr dword [abs 0x91000]\n    fstp qword [abs 0x91008]",
    );
    assert_eq!(f64::from_bits(m.read_u64(DATA + 8)), 7.5, "10 - 10 / 4");
    // FICOM of 7 against 10 finds ST0 below; FTST of -1 finds it below zero.
    let m = run(
        "    mov dword [abs 0x91000], 10\n    mov dword [abs 0x91004], 7\n    fild dword [abs 0x91004]\n    ficom dword [abs 0x91000]\n    fnstsw ax\n    mov [abs 0x91008], ax\n    fld1\n    fchs\n    ftst\n    fnstsw ax\n    mov [abs 0x91010], ax",
    );
    assert_ne!(m.read_u64(DATA + 8) & 0x100, 0, "FICOM sets C0");
    assert_ne!(m.read_u64(DATA + 0x10) & 0x100, 0, "FTST sets C0");
}
