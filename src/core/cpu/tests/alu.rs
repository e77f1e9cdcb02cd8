//! Integer instructions: results and the exact arithmetic flags.

use super::Machine;
use crate::core::cpu::flags::{AF, CF, OF, PF, SF, ZF};
use crate::core::cpu::CpuEvent;

const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

/// Runs `body` in 64-bit mode until its HLT and returns the machine.
fn run(body: &str) -> Machine {
    let mut m = Machine::long_mode(&format!("start:\n{body}\n    hlt\n"));
    assert_eq!(m.run(10_000), CpuEvent::Halted);
    assert_eq!(
        m.exception_count(),
        0,
        "unexpected exception {}",
        m.vector()
    );
    m
}

fn flags_after(body: &str) -> u64 {
    run(body).cpu.rflags() & ARITH
}

#[test]
fn add_flag_edge_cases() {
    assert_eq!(flags_after("mov al, 0x7f\n add al, 1"), OF | SF | AF);
    assert_eq!(flags_after("mov al, 0xff\n add al, 1"), CF | ZF | PF | AF);
    assert_eq!(
        flags_after("mov eax, 0xffffffff\n add eax, 1"),
        CF | ZF | PF | AF
    );
    assert_eq!(flags_after("mov rax, -1\n add rax, 2"), CF | AF);
}

#[test]
fn sub_and_compare_flags() {
    assert_eq!(flags_after("xor eax, eax\n sub eax, 1"), CF | SF | PF | AF);
    assert_eq!(flags_after("mov ax, 0x8000\n cmp ax, 1"), OF | PF | AF);
    assert_eq!(flags_after("mov ecx, 5\n cmp ecx, 5"), ZF | PF);
}

#[test]
fn adc_sbb_use_carry() {
    let m =
        run("mov rax, -1\n add rax, 1\n mov rbx, 5\n adc rbx, 0\n stc\n mov rcx, 0\n sbb rcx, 0");
    assert_eq!(m.cpu.gpr[3], 6);
    assert_eq!(m.cpu.gpr[1], u64::MAX);
    assert_eq!(m.cpu.rflags() & CF, CF);
    // ADC with a carry that makes the result equal to the destination must set CF.
    assert_eq!(
        flags_after("stc\n mov al, 0x10\n mov bl, 0xff\n adc al, bl") & CF,
        CF
    );
}

#[test]
fn inc_dec_keep_carry() {
    assert_eq!(
        flags_after("stc\n mov al, 0x7f\n inc al"),
        CF | OF | SF | AF
    );
    assert_eq!(flags_after("clc\n mov al, 0x80\n dec al"), OF | AF);
    assert_eq!(flags_after("stc\n mov eax, 1\n dec eax"), CF | ZF | PF);
}

#[test]
fn neg_sets_carry_unless_zero() {
    assert_eq!(flags_after("mov eax, 0\n neg eax"), ZF | PF);
    assert_eq!(flags_after("mov al, 0x80\n neg al"), CF | OF | SF);
}

#[test]
fn logic_clears_carry_and_overflow() {
    assert_eq!(flags_after("stc\n mov eax, 0xf0\n and eax, 0x0f"), ZF | PF);
    let m = run("mov eax, -1\n mov rbx, 0x1122334455667788\n xor ebx, eax");
    assert_eq!(m.cpu.gpr[3], 0xaa99_8877, "32-bit result zero-extends");
}

#[test]
fn shifts_and_rotates() {
    let m = run("mov al, 0x81\n shl al, 1");
    assert_eq!(m.cpu.gpr[0] & 0xff, 0x02);
    assert_eq!(m.cpu.rflags() & (CF | OF), CF | OF);

    let m = run("mov eax, 0x80000001\n sar eax, 1");
    assert_eq!(m.cpu.gpr[0], 0xc000_0000);
    assert_eq!(m.cpu.rflags() & (CF | OF), CF);

    let m = run("mov rax, 0x8000000000000001\n rol rax, 1");
    assert_eq!(m.cpu.gpr[0], 3);
    assert_eq!(m.cpu.rflags() & (CF | OF), CF | OF);

    let m = run("stc\n mov al, 0x80\n rcl al, 1");
    assert_eq!(m.cpu.gpr[0] & 0xff, 0x01);
    assert_eq!(m.cpu.rflags() & CF, CF);

    let m = run("clc\n mov bl, 0x01\n rcr bl, 2");
    assert_eq!(m.cpu.gpr[3] & 0xff, 0x80, "9-bit rotation through CF");

    // A zero count changes no flags.
    assert_eq!(
        flags_after("mov ecx, 0\n mov eax, 1\n add eax, -1\n shl eax, cl"),
        CF | ZF | PF | AF
    );

    let m = run("mov eax, 0x12345678\n mov edx, 0x9abcdef0\n shld eax, edx, 8\n mov ebx, 0x12345678\n shrd ebx, edx, 8");
    assert_eq!(m.cpu.gpr[0], 0x3456_789a);
    assert_eq!(m.cpu.gpr[3], 0xf012_3456);
}

#[test]
fn multiply_and_divide() {
    let m = run("mov rax, 0x100000000\n mov rcx, 0x100000000\n mul rcx");
    assert_eq!((m.cpu.gpr[0], m.cpu.gpr[2]), (0, 1));
    assert_eq!(m.cpu.rflags() & (CF | OF), CF | OF);

    let m = run("mov eax, -3\n mov ecx, 7\n imul ecx");
    assert_eq!(m.cpu.gpr[0], (-21i32) as u32 as u64);
    assert_eq!(m.cpu.gpr[2], 0xffff_ffff);
    assert_eq!(m.cpu.rflags() & (CF | OF), 0);

    let m = run("mov eax, 0x40000000\n imul eax, eax, 4");
    assert_eq!(m.cpu.gpr[0], 0);
    assert_eq!(m.cpu.rflags() & (CF | OF), CF | OF);

    let m = run("mov rdx, 1\n mov rax, 5\n mov rcx, 2\n div rcx");
    assert_eq!((m.cpu.gpr[0], m.cpu.gpr[2]), (0x8000_0000_0000_0002, 1));

    let m = run("mov eax, -7\n cdq\n mov ecx, 2\n idiv ecx");
    assert_eq!((m.cpu.gpr[0], m.cpu.gpr[2]), (0xffff_fffd, 0xffff_ffff));
}

#[test]
fn divide_errors_raise_de() {
    for body in [
        "xor ecx, ecx\n div ecx",
        "mov edx, 2\n mov ecx, 2\n div ecx",
        "mov eax, 0x80000000\n cdq\n mov ecx, -1\n idiv ecx",
    ] {
        let mut m = Machine::long_mode(&format!("start:\n{body}\n hlt\n"));
        assert_eq!(m.run(1000), CpuEvent::Halted);
        assert_eq!(m.exception_count(), 1, "{body}");
        assert_eq!(m.vector(), 0, "{body}");
    }
}

#[test]
fn bit_instructions() {
    let m = run("mov rax, 0x10\n bsf rcx, rax\n bsr rdx, rax\n mov rbx, 0xf0\n popcnt rsi, rbx\n lzcnt rdi, rbx");
    assert_eq!(m.cpu.gpr[1], 4);
    assert_eq!(m.cpu.gpr[2], 4);
    assert_eq!(m.cpu.gpr[6], 4);
    assert_eq!(m.cpu.gpr[7], 56);

    let m = run("mov rcx, 77\n xor eax, eax\n bsf rcx, rax");
    assert_eq!(m.cpu.gpr[1], 77, "BSF of zero keeps the destination");
    assert_eq!(m.cpu.rflags() & ZF, ZF);

    // BT with a register offset addresses memory outside the operand.
    let m = run("mov qword [abs 0x91000], 0\n mov rax, 68\n bts qword [abs 0x91000], rax\n bt qword [abs 0x91000], rax");
    assert_eq!(m.read_u64(0x91008), 0x10);
    assert_eq!(m.cpu.rflags() & CF, CF);

    let m = run("mov eax, 0x11223344\n bswap eax\n mov rbx, 0x0102030405060708\n bswap rbx");
    assert_eq!(m.cpu.gpr[0], 0x4433_2211);
    assert_eq!(m.cpu.gpr[3], 0x0807_0605_0403_0201);
}

#[test]
fn exchange_instructions() {
    let m = run(
        "mov qword [abs 0x91000], 10\n mov rax, 10\n mov rcx, 20\n lock cmpxchg [abs 0x91000], rcx",
    );
    assert_eq!(m.read_u64(0x91000), 20);
    assert_eq!(m.cpu.rflags() & ZF, ZF);

    let m =
        run("mov qword [abs 0x91000], 10\n mov eax, 11\n mov ecx, 20\n cmpxchg [abs 0x91000], ecx");
    assert_eq!(m.cpu.gpr[0], 10);
    assert_eq!(m.cpu.rflags() & ZF, 0);

    let m = run("mov qword [abs 0x91000], 5\n mov rax, 3\n lock xadd [abs 0x91000], rax");
    assert_eq!((m.read_u64(0x91000), m.cpu.gpr[0]), (8, 5));

    let m = run(
        "mov qword [abs 0x91000], 1\n mov qword [abs 0x91008], 2\n mov rax, 1\n mov rdx, 2\n mov rbx, 3\n mov rcx, 4\n cmpxchg16b [abs 0x91000]",
    );
    assert_eq!((m.read_u64(0x91000), m.read_u64(0x91008)), (3, 4));

    let m = run("mov rax, 0x0000000200000001\n mov [abs 0x91000], rax\n xor eax, eax\n xor edx, edx\n cmpxchg8b [abs 0x91000]");
    assert_eq!((m.cpu.gpr[0], m.cpu.gpr[2]), (1, 2));
}

#[test]
fn conditional_moves_and_sets() {
    let m = run("mov rax, -1\n mov ecx, 1\n cmp ecx, 2\n cmovg eax, ecx\n setl bl\n setg bh");
    assert_eq!(
        m.cpu.gpr[0], 0xffff_ffff,
        "false 32-bit CMOV still zero-extends"
    );
    assert_eq!(m.cpu.gpr[3] & 0xffff, 0x0001);
}

#[test]
fn conversions_and_lahf() {
    let m =
        run("mov eax, 0x80\n cbw\n mov ebx, eax\n mov eax, 0x80000000\n cdqe\n mov rcx, rax\n cqo");
    assert_eq!(m.cpu.gpr[3] & 0xffff, 0xff80);
    assert_eq!(m.cpu.gpr[1], 0xffff_ffff_8000_0000);
    assert_eq!(m.cpu.gpr[2], u64::MAX);

    let m = run("xor eax, eax\n stc\n lahf\n mov bl, ah\n mov ah, 0xc1\n sahf");
    assert_eq!(m.cpu.gpr[3] & 0xff, 0x47);
    assert_eq!(m.cpu.rflags() & (SF | ZF | CF), SF | ZF | CF);
}
