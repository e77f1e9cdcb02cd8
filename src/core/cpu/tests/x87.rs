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
