//! The native runner: executes a snippet on the host CPU in a forked child process.
//!
//! The child maps three regions at fixed addresses with `MAP_FIXED_NOREPLACE`:
//!
//! ```text
//! CODE_ADDR     snippet bytes, then `jmp [rip+0]; dq exit_stub`      (read, execute)
//! DATA_ADDR     the data area of the input state                      (read, write)
//! CONTROL_ADDR  the `Control` block: input registers, the report      (read, write)
//! ```
//!
//! `enter` loads every register from the control block and jumps to the snippet. The
//! snippet ends in the exit stub, which stores every register into the report and calls
//! `child_finish`. A fault ends in `child_signal` instead, which copies the registers
//! from the signal frame. Both send the report and then the data area through a pipe and
//! exit. The child calls only libc's thin system-call wrappers (mmap, mprotect,
//! sigaction, write, _exit and the like), which take no locks, and it allocates nothing,
//! because `fork` copies a multi-threaded parent in which another thread may hold the
//! allocator's lock.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::state::{
    Fault, UserState, CODE_ADDR, CODE_CAPACITY, DATA_ADDR, DATA_SIZE, FIXED_RFLAGS, MXCSR_DEFAULT,
};
use super::OracleError;

/// The watchdog of [`run_native`]: a child that has not reported after this long is
/// killed. Generous because the test machines are shared and forking a large test binary
/// can take a while under load.
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(10);

/// Address of the control block in the child. It must stay below 2 GiB so that the entry
/// and exit stubs reach it with 32-bit absolute addresses, which need no free register.
const CONTROL_ADDR: u64 = 0x1010_0000;
/// Bytes mapped for the control block.
const CONTROL_SIZE: usize = 0x2000;
/// Bytes mapped for the signal handler's alternate stack.
const SIGNAL_STACK_SIZE: usize = 0x10000;
/// The code after the snippet: `jmp qword ptr [rip+0]` followed by the exit stub's address.
const TRAILER_LEN: usize = 14;

/// `Report::kind` of a snippet that reached its end.
const KIND_END: u32 = 1;
/// `Report::kind` of a snippet stopped by a signal.
const KIND_FAULT: u32 = 2;
/// `Report::kind` of a child that could not set up the snippet's address space.
const KIND_SETUP_FAILED: u32 = 3;

/// Steps of the child's setup, named in [`OracleError::ChildSetup`].
const SETUP_STEPS: [&str; 6] = [
    "map the control block",
    "map the data area",
    "map the code page",
    "protect the code page",
    "map the signal stack",
    "install the signal handlers",
];

/// The message that the child sends first through the pipe; the data area follows.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Report {
    /// The FXSAVE image at the end of the snippet or at the fault.
    fxsave: [u8; 512],
    gprs: [u64; 16],
    rflags: u64,
    kind: u32,
    signal: i32,
    /// Index into `SETUP_STEPS` when `kind` is `KIND_SETUP_FAILED`.
    setup_step: u32,
    setup_errno: i32,
    vector: u64,
    error_code: u64,
    address: u64,
    rip: u64,
}

/// The block at `CONTROL_ADDR` through which the stubs and the signal handler exchange
/// state without any register or static variable.
#[repr(C, align(64))]
struct Control {
    report: Report,
    fxsave_in: [u8; 512],
    gprs_in: [u64; 16],
    rflags_in: u64,
    entry: u64,
    host_rsp: u64,
    pipe_fd: u64,
    mxcsr_default: u32,
    _padding: u32,
    /// The exit stub's stack while it stores RFLAGS.
    scratch: [u64; 8],
}

const _: () = assert!(size_of::<Control>() <= CONTROL_SIZE);
const _: () = assert!(CONTROL_ADDR + (CONTROL_SIZE as u64) < 0x8000_0000);

const REPORT_FXSAVE: u64 = CONTROL_ADDR + offset_of!(Control, report) as u64;
const REPORT_GPRS: u64 =
    CONTROL_ADDR + (offset_of!(Control, report) + offset_of!(Report, gprs)) as u64;
const REPORT_RFLAGS: u64 =
    CONTROL_ADDR + (offset_of!(Control, report) + offset_of!(Report, rflags)) as u64;
const FXSAVE_IN: u64 = CONTROL_ADDR + offset_of!(Control, fxsave_in) as u64;
const GPRS_IN: u64 = CONTROL_ADDR + offset_of!(Control, gprs_in) as u64;
const RFLAGS_IN: u64 = CONTROL_ADDR + offset_of!(Control, rflags_in) as u64;
const ENTRY: u64 = CONTROL_ADDR + offset_of!(Control, entry) as u64;
const HOST_RSP: u64 = CONTROL_ADDR + offset_of!(Control, host_rsp) as u64;
const MXCSR_DEFAULT_SLOT: u64 = CONTROL_ADDR + offset_of!(Control, mxcsr_default) as u64;
const SCRATCH_TOP: u64 = CONTROL_ADDR + (offset_of!(Control, scratch) + 64) as u64;

const _: () = assert!(REPORT_FXSAVE % 16 == 0 && FXSAVE_IN % 16 == 0);

// The exit stub. The snippet's trailer jumps here with the snippet's final registers. It
// stores the GPRs first with plain MOVs, which change no flag, then RFLAGS through a
// scratch stack in the control block, then the SSE state. It resets RFLAGS (a POPF in
// the snippet may have set AC or TF) and MXCSR, restores the stack that `enter` left,
// and calls `child_finish`, which never returns.
std::arch::global_asm!(
    ".globl monstervm_oracle_exit_stub",
    ".p2align 4",
    "monstervm_oracle_exit_stub:",
    "mov qword ptr [{gprs} + 0], rax",
    "mov qword ptr [{gprs} + 8], rcx",
    "mov qword ptr [{gprs} + 16], rdx",
    "mov qword ptr [{gprs} + 24], rbx",
    "mov qword ptr [{gprs} + 32], rsp",
    "mov qword ptr [{gprs} + 40], rbp",
    "mov qword ptr [{gprs} + 48], rsi",
    "mov qword ptr [{gprs} + 56], rdi",
    "mov qword ptr [{gprs} + 64], r8",
    "mov qword ptr [{gprs} + 72], r9",
    "mov qword ptr [{gprs} + 80], r10",
    "mov qword ptr [{gprs} + 88], r11",
    "mov qword ptr [{gprs} + 96], r12",
    "mov qword ptr [{gprs} + 104], r13",
    "mov qword ptr [{gprs} + 112], r14",
    "mov qword ptr [{gprs} + 120], r15",
    "mov rsp, {scratch_top}",
    "pushfq",
    "pop qword ptr [{rflags}]",
    "push {fixed_rflags}",
    "popfq",
    "fxsave [{fxsave}]",
    "ldmxcsr [{mxcsr_default}]",
    "mov rsp, qword ptr [{host_rsp}]",
    "and rsp, -16",
    "call {finish}",
    "ud2",
    gprs = const REPORT_GPRS,
    rflags = const REPORT_RFLAGS,
    fxsave = const REPORT_FXSAVE,
    scratch_top = const SCRATCH_TOP,
    mxcsr_default = const MXCSR_DEFAULT_SLOT,
    host_rsp = const HOST_RSP,
    fixed_rflags = const FIXED_RFLAGS,
    finish = sym child_finish,
);

extern "C" {
    /// The exit stub defined above. Only its address is used.
    fn monstervm_oracle_exit_stub();
}

/// Runs `code` natively from the state `input` and returns the state at its end, or at
/// the fault that stopped it, with [`DEFAULT_WATCHDOG`] as the time limit.
///
/// The snippet starts at [`CODE_ADDR`] and must end by falling through its last byte.
/// A jump out of the snippet ends in [`OracleError::RunnerFault`] or
/// [`OracleError::TimedOut`], and so does an endless loop.
pub fn run_native(code: &[u8], input: &UserState) -> Result<UserState, OracleError> {
    run_native_with_timeout(code, input, DEFAULT_WATCHDOG)
}

/// Runs `code` like [`run_native`], killing the child after `timeout`.
pub fn run_native_with_timeout(
    code: &[u8],
    input: &UserState,
    timeout: Duration,
) -> Result<UserState, OracleError> {
    let max_code = CODE_CAPACITY - TRAILER_LEN;
    if code.len() > max_code {
        return Err(OracleError::CodeTooLong {
            len: code.len(),
            max: max_code,
        });
    }
    if input.data.len() != DATA_SIZE {
        return Err(OracleError::DataSize {
            len: input.data.len(),
            expected: DATA_SIZE,
        });
    }
    let mask = host_mxcsr_mask();
    if input.mxcsr & !mask != 0 {
        return Err(OracleError::InvalidMxcsr {
            mxcsr: input.mxcsr,
            mask,
        });
    }

    let mut image = Vec::with_capacity(code.len() + TRAILER_LEN);
    image.extend_from_slice(code);
    image.extend_from_slice(&[0xFF, 0x25, 0, 0, 0, 0]);
    image.extend_from_slice(
        &(monstervm_oracle_exit_stub as *const () as usize as u64).to_le_bytes(),
    );
    let control = initial_control(input);

    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors that pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(OracleError::Pipe(io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and have no other owner.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: the child runs only `child_main`, which calls lock-free system-call
    // wrappers, allocates nothing and never returns into the parent's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(OracleError::Fork(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: this is the freshly forked child; the buffers were built before fork.
        unsafe { child_main(&image, &control, &input.data, writer.as_raw_fd()) }
    }
    drop(writer);

    let received = receive_report(&reader, pid, timeout);
    let status = reap(pid);
    let bytes = received?;
    if bytes.len() < size_of::<Report>() + DATA_SIZE {
        return Err(OracleError::ChildDied {
            pid,
            status: describe_wait_status(status),
        });
    }
    decode_report(&bytes, code.len())
}

/// Builds the control block that the child copies to `CONTROL_ADDR`.
fn initial_control(input: &UserState) -> Box<Control> {
    // SAFETY: `Control` contains only integers and byte arrays, for which zero is valid.
    let mut control: Box<Control> = Box::new(unsafe { std::mem::zeroed() });
    // FCW 0x037F masks every x87 exception; the abridged tag word 0 marks the stack empty.
    control.fxsave_in[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
    control.fxsave_in[24..28].copy_from_slice(&input.mxcsr.to_le_bytes());
    for (index, value) in input.xmm.iter().enumerate() {
        let offset = 160 + 16 * index;
        control.fxsave_in[offset..offset + 16].copy_from_slice(&value.to_le_bytes());
    }
    control.gprs_in = input.gprs;
    control.rflags_in = input.effective_rflags();
    control.entry = CODE_ADDR;
    control.mxcsr_default = MXCSR_DEFAULT;
    control
}

/// Reads the report and the data area from the child, killing it when `timeout` passes.
fn receive_report(
    reader: &OwnedFd,
    pid: libc::pid_t,
    timeout: Duration,
) -> Result<Vec<u8>, OracleError> {
    let expected = size_of::<Report>() + DATA_SIZE;
    let mut bytes = vec![0u8; expected];
    let mut filled = 0;
    let deadline = Instant::now() + timeout;
    while filled < expected {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut pollfd = libc::pollfd {
            fd: reader.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let wait_ms = remaining.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pollfd` is one valid, initialized entry.
        let ready = unsafe { libc::poll(&mut pollfd, 1, wait_ms) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            kill_child(pid);
            return Err(OracleError::Read(error));
        }
        if ready == 0 {
            kill_child(pid);
            return Err(OracleError::TimedOut { pid, timeout });
        }
        // SAFETY: the destination is the unfilled tail of `bytes`.
        let count = unsafe {
            libc::read(
                reader.as_raw_fd(),
                bytes[filled..].as_mut_ptr().cast(),
                expected - filled,
            )
        };
        if count < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            kill_child(pid);
            return Err(OracleError::Read(error));
        }
        if count == 0 {
            break;
        }
        filled += count as usize;
    }
    bytes.truncate(filled);
    Ok(bytes)
}

fn kill_child(pid: libc::pid_t) {
    // SAFETY: `pid` is our own child, not yet reaped, so the id cannot have been reused.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Waits for the child to exit and returns its wait status.
fn reap(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid output location; `pid` is our own child.
        let result = unsafe { libc::waitpid(pid, &mut status, 0) };
        if result >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return status;
        }
    }
}

fn describe_wait_status(status: libc::c_int) -> String {
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else {
        format!("wait status {status:#x}")
    }
}

/// Turns the child's bytes into the output state.
fn decode_report(bytes: &[u8], code_len: usize) -> Result<UserState, OracleError> {
    // SAFETY: `bytes` contains at least size_of::<Report>() bytes written by the child from
    // a `Report`, and every bit pattern is a valid `Report`; read_unaligned copes with
    // the Vec's alignment.
    let report: Report = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let data = bytes[size_of::<Report>()..].to_vec();
    if report.kind == KIND_SETUP_FAILED {
        let step = SETUP_STEPS
            .get(report.setup_step as usize)
            .copied()
            .unwrap_or("unknown step");
        return Err(OracleError::ChildSetup {
            step,
            source: io::Error::from_raw_os_error(report.setup_errno),
        });
    }

    let fxsave = &report.fxsave;
    let mut xmm = [0u128; 16];
    for (index, value) in xmm.iter_mut().enumerate() {
        let offset = 160 + 16 * index;
        let mut lane = [0u8; 16];
        lane.copy_from_slice(&fxsave[offset..offset + 16]);
        *value = u128::from_le_bytes(lane);
    }
    let mut mxcsr_bytes = [0u8; 4];
    mxcsr_bytes.copy_from_slice(&fxsave[24..28]);
    let mut output = UserState {
        gprs: report.gprs,
        rflags: report.rflags,
        xmm,
        mxcsr: u32::from_le_bytes(mxcsr_bytes),
        data,
        fault: None,
    };

    match report.kind {
        KIND_END => Ok(output),
        KIND_FAULT => {
            let fault = Fault {
                signal: report.signal,
                vector: report.vector as u8,
                error_code: report.error_code,
                rip: report.rip,
                address: report.address,
            };
            let end = CODE_ADDR + code_len as u64;
            if !(CODE_ADDR..end).contains(&fault.rip) {
                return Err(OracleError::RunnerFault { fault });
            }
            output.fault = Some(fault);
            Ok(output)
        }
        kind => Err(OracleError::MalformedReport { kind }),
    }
}

/// Reads MXCSR_MASK, the MXCSR bits that this CPU supports, from an FXSAVE image.
pub fn host_mxcsr_mask() -> u32 {
    static MASK: OnceLock<u32> = OnceLock::new();
    *MASK.get_or_init(|| {
        #[repr(C, align(16))]
        struct Area([u8; 512]);
        let mut area = Area([0; 512]);
        // SAFETY: FXSAVE writes 512 bytes to a 16-byte aligned buffer of that size.
        unsafe {
            std::arch::asm!("fxsave [{}]", in(reg) area.0.as_mut_ptr(), options(nostack));
        }
        let mask = u32::from_le_bytes([area.0[28], area.0[29], area.0[30], area.0[31]]);
        // A zero MXCSR_MASK means that the CPU predates the field. Such CPUs support
        // the mask 0xFFBF.
        if mask == 0 {
            0xFFBF
        } else {
            mask
        }
    })
}

/// Sets up the snippet's address space in the forked child and runs it. Never returns:
/// the exit stub, the signal handler or a setup failure ends the process.
///
/// # Safety
///
/// Call only in a child fresh from `fork`, with buffers that the parent built before it.
unsafe fn child_main(image: &[u8], control: &Control, data: &[u8], pipe_fd: i32) -> ! {
    // SAFETY: the caller guarantees that this is a forked child, in which nothing else
    // runs, so remapping fixed addresses and jumping into the snippet hurts no one.
    unsafe {
        // Die with the parent instead of lingering if it is killed while we run.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        let mut step = 0;
        if map_fixed(
            CONTROL_ADDR,
            CONTROL_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
        ) {
            let block = CONTROL_ADDR as *mut Control;
            std::ptr::copy_nonoverlapping(control, block, 1);
            (*block).pipe_fd = pipe_fd as u64;
            step = 1;
            if map_fixed(DATA_ADDR, DATA_SIZE, libc::PROT_READ | libc::PROT_WRITE) {
                std::ptr::copy_nonoverlapping(data.as_ptr(), DATA_ADDR as *mut u8, DATA_SIZE);
                step = 2;
                if map_fixed(CODE_ADDR, CODE_CAPACITY, libc::PROT_READ | libc::PROT_WRITE) {
                    std::ptr::copy_nonoverlapping(
                        image.as_ptr(),
                        CODE_ADDR as *mut u8,
                        image.len(),
                    );
                    step = 3;
                    let code = CODE_ADDR as *mut libc::c_void;
                    if libc::mprotect(code, CODE_CAPACITY, libc::PROT_READ | libc::PROT_EXEC) == 0 {
                        step = 4;
                        if install_signal_handlers(&mut step) {
                            enter();
                        }
                    }
                }
            }
        }
        let errno = *libc::__errno_location();
        report_setup_failure(pipe_fd, step, errno)
    }
}

/// Maps `len` bytes at exactly `addr`, failing if anything is mapped there already.
///
/// # Safety
///
/// Only for the forked child.
unsafe fn map_fixed(addr: u64, len: usize, prot: libc::c_int) -> bool {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let mapped = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    mapped as u64 == addr
}

/// Installs `child_signal` for the signals that exceptions raise, on an alternate stack
/// because the snippet's RSP may point anywhere. Advances `step` past the stack mapping.
///
/// # Safety
///
/// Only for the forked child.
unsafe fn install_signal_handlers(step: &mut u32) -> bool {
    // SAFETY: plain syscalls on freshly initialized structures in the forked child.
    unsafe {
        let stack = libc::mmap(
            std::ptr::null_mut(),
            SIGNAL_STACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if stack == libc::MAP_FAILED {
            return false;
        }
        let alternate = libc::stack_t {
            ss_sp: stack,
            ss_flags: 0,
            ss_size: SIGNAL_STACK_SIZE,
        };
        if libc::sigaltstack(&alternate, std::ptr::null_mut()) != 0 {
            return false;
        }
        *step = 5;

        let signals = [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGTRAP,
        ];
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = child_signal as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigfillset(&mut action.sa_mask);
        let mut unblock: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut unblock);
        for signal in signals {
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return false;
            }
            libc::sigaddset(&mut unblock, signal);
        }
        libc::sigprocmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut()) == 0
    }
}

/// Loads the input registers from the control block and jumps to the snippet.
///
/// # Safety
///
/// Only for the forked child, after the control block, data area and code page exist.
unsafe fn enter() -> ! {
    // SAFETY: the control block is mapped at CONTROL_ADDR and holds a valid FXSAVE image
    // (MXCSR checked against MXCSR_MASK by the parent). The code page ends with a jump to
    // the exit stub, and nothing returns here.
    unsafe {
        std::arch::asm!(
            "mov qword ptr [{host_rsp}], rsp",
            "fxrstor [{fxsave}]",
            "push qword ptr [{rflags}]",
            "popfq",
            "mov rax, qword ptr [{gprs} + 0]",
            "mov rcx, qword ptr [{gprs} + 8]",
            "mov rdx, qword ptr [{gprs} + 16]",
            "mov rbx, qword ptr [{gprs} + 24]",
            "mov rbp, qword ptr [{gprs} + 40]",
            "mov rsi, qword ptr [{gprs} + 48]",
            "mov rdi, qword ptr [{gprs} + 56]",
            "mov r8, qword ptr [{gprs} + 64]",
            "mov r9, qword ptr [{gprs} + 72]",
            "mov r10, qword ptr [{gprs} + 80]",
            "mov r11, qword ptr [{gprs} + 88]",
            "mov r12, qword ptr [{gprs} + 96]",
            "mov r13, qword ptr [{gprs} + 104]",
            "mov r14, qword ptr [{gprs} + 112]",
            "mov r15, qword ptr [{gprs} + 120]",
            "mov rsp, qword ptr [{gprs} + 32]",
            "jmp qword ptr [{entry}]",
            host_rsp = const HOST_RSP,
            fxsave = const FXSAVE_IN,
            rflags = const RFLAGS_IN,
            gprs = const GPRS_IN,
            entry = const ENTRY,
            options(noreturn),
        )
    }
}

/// Called by the exit stub once the final state is in the report.
extern "C" fn child_finish() -> ! {
    // SAFETY: only the exit stub calls this, in the child, with the control block mapped.
    unsafe {
        let block = CONTROL_ADDR as *mut Control;
        (*block).report.kind = KIND_END;
        send_report_and_exit()
    }
}

/// The handler for SIGSEGV, SIGBUS, SIGFPE, SIGILL and SIGTRAP in the child: records the
/// registers of the signal frame and the exception, then reports.
extern "C" fn child_signal(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // Signal-frame register indices in encoding order (RAX, RCX, ..., R15).
    const GREG_ORDER: [libc::c_int; 16] = [
        libc::REG_RAX,
        libc::REG_RCX,
        libc::REG_RDX,
        libc::REG_RBX,
        libc::REG_RSP,
        libc::REG_RBP,
        libc::REG_RSI,
        libc::REG_RDI,
        libc::REG_R8,
        libc::REG_R9,
        libc::REG_R10,
        libc::REG_R11,
        libc::REG_R12,
        libc::REG_R13,
        libc::REG_R14,
        libc::REG_R15,
    ];
    // SAFETY: the kernel passes a valid siginfo and ucontext to an SA_SIGINFO handler,
    // and the control block is mapped before any handler is installed.
    unsafe {
        let context = &*(context as *const libc::ucontext_t);
        let gregs = &context.uc_mcontext.gregs;
        let report = &mut (*(CONTROL_ADDR as *mut Control)).report;
        for (slot, index) in report.gprs.iter_mut().zip(GREG_ORDER) {
            *slot = gregs[index as usize] as u64;
        }
        report.rflags = gregs[libc::REG_EFL as usize] as u64;
        report.rip = gregs[libc::REG_RIP as usize] as u64;
        report.vector = gregs[libc::REG_TRAPNO as usize] as u64;
        report.error_code = gregs[libc::REG_ERR as usize] as u64;
        report.address = (*info).si_addr() as u64;
        if report.vector == 14 {
            report.address = gregs[libc::REG_CR2 as usize] as u64;
        }
        report.signal = signal;
        let fpregs = context.uc_mcontext.fpregs;
        if !fpregs.is_null() {
            // The signal frame's FPU area starts with the FXSAVE layout.
            std::ptr::copy_nonoverlapping(fpregs.cast::<u8>(), report.fxsave.as_mut_ptr(), 512);
        }
        report.kind = KIND_FAULT;
        send_report_and_exit()
    }
}

/// Sends the report and the data area through the pipe and exits the child.
///
/// # Safety
///
/// Only in the child, with the control block and data area mapped.
unsafe fn send_report_and_exit() -> ! {
    // SAFETY: both regions are mapped and at least as long as the lengths written.
    unsafe {
        let block = CONTROL_ADDR as *const Control;
        let fd = (*block).pipe_fd as i32;
        let report = std::ptr::addr_of!((*block).report).cast::<u8>();
        write_all(fd, report, size_of::<Report>());
        write_all(fd, DATA_ADDR as *const u8, DATA_SIZE);
        libc::_exit(0)
    }
}

/// Sends a report that names the failed setup step, built on the stack because the
/// control block may be missing, then exits.
///
/// # Safety
///
/// Only in the child.
unsafe fn report_setup_failure(fd: i32, step: u32, errno: i32) -> ! {
    // SAFETY: `Report` is plain data, valid when zeroed; the writes stay inside it.
    unsafe {
        let mut report: Report = std::mem::zeroed();
        report.kind = KIND_SETUP_FAILED;
        report.setup_step = step;
        report.setup_errno = errno;
        write_all(fd, (&report as *const Report).cast(), size_of::<Report>());
        // The parent expects the data area too; zeros are as good as any.
        let zeros = [0u8; 512];
        for _ in 0..DATA_SIZE / zeros.len() {
            write_all(fd, zeros.as_ptr(), zeros.len());
        }
        libc::_exit(0)
    }
}

/// Writes `len` bytes from `bytes` to `fd`, retrying short and interrupted writes.
///
/// # Safety
///
/// `bytes` must be readable for `len` bytes.
unsafe fn write_all(fd: i32, bytes: *const u8, len: usize) {
    let mut done = 0;
    while done < len {
        // SAFETY: the caller guarantees that `bytes..bytes+len` is readable.
        let count = unsafe { libc::write(fd, bytes.add(done).cast(), len - done) };
        if count > 0 {
            done += count as usize;
        // SAFETY: reading errno of this thread.
        } else if count < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
            continue;
        } else {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::cpu::oracle::state::{FLAG_CF, FLAG_DF, FLAG_ZF, RCX, RSP};

    fn state_with(gprs: &[(usize, u64)]) -> UserState {
        let mut state = UserState::new();
        for (index, value) in gprs {
            state.gprs[*index] = *value;
        }
        state
    }

    #[test]
    fn add_sets_result_and_flags() {
        // add rax, rbx
        let input = state_with(&[(0, u64::MAX), (3, 1)]);
        let output = run_native(&[0x48, 0x01, 0xD8], &input).unwrap();
        assert_eq!(output.fault, None);
        assert_eq!(output.gprs[0], 0);
        assert_eq!(output.gprs[3], 1);
        assert_ne!(output.rflags & FLAG_CF, 0);
        assert_ne!(output.rflags & FLAG_ZF, 0);
    }

    #[test]
    fn registers_round_trip_unchanged() {
        let mut input = UserState::new();
        for (index, value) in input.gprs.iter_mut().enumerate() {
            *value =
                0x0101_0101_0101_0101u64.wrapping_mul(index as u64 + 1) ^ 0x8000_0000_0000_0000;
        }
        for (index, value) in input.xmm.iter_mut().enumerate() {
            *value = (index as u128 + 1).wrapping_mul(0x1111_2222_3333_4444_5555_6666_7777_8888);
        }
        input.rflags = FLAG_DF | FLAG_CF;
        input.mxcsr = 0x7F80 | 0x40;
        input.data[5] = 0xAB;
        let output = run_native(&[0x90], &input).unwrap();
        assert_eq!(output.gprs, input.gprs);
        assert_eq!(output.xmm, input.xmm);
        assert_eq!(output.mxcsr, input.mxcsr);
        assert_eq!(output.rflags, input.effective_rflags());
        assert_eq!(output.data, input.data);
    }

    #[test]
    fn store_reaches_data_area() {
        // mov [rcx + 8], rax
        let input = state_with(&[(0, 0x1122_3344_5566_7788), (RCX, DATA_ADDR)]);
        let output = run_native(&[0x48, 0x89, 0x41, 0x08], &input).unwrap();
        assert_eq!(&output.data[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
    }

    #[test]
    fn push_uses_snippet_stack() {
        // push rax
        let top = DATA_ADDR + 0x100;
        let input = state_with(&[(0, 0xDEAD_BEEF), (RSP, top)]);
        let output = run_native(&[0x50], &input).unwrap();
        assert_eq!(output.gprs[RSP], top - 8);
        assert_eq!(&output.data[0xF8..0x100], &0xDEAD_BEEFu64.to_le_bytes());
    }

    #[test]
    fn divide_by_zero_reports_de() {
        // nop; div rcx
        let input = state_with(&[(0, 5)]);
        let output = run_native(&[0x90, 0x48, 0xF7, 0xF1], &input).unwrap();
        let fault = output.fault.expect("div by zero must fault");
        assert_eq!(fault.vector, 0);
        assert_eq!(fault.signal, libc::SIGFPE);
        assert_eq!(fault.rip, CODE_ADDR + 1);
        assert_eq!(output.gprs[0], 5);
    }

    #[test]
    fn unmapped_load_reports_page_fault() {
        // mov rax, [rcx]
        let address = DATA_ADDR + DATA_SIZE as u64 + 8;
        let input = state_with(&[(RCX, address)]);
        let output = run_native(&[0x48, 0x8B, 0x01], &input).unwrap();
        let fault = output.fault.expect("load from the guard page must fault");
        assert_eq!(fault.vector, 14);
        assert_eq!(fault.address, address);
        // User-mode read of a not-present page.
        assert_eq!(fault.error_code, 0b100);
    }

    #[test]
    fn ud2_reports_invalid_opcode() {
        let output = run_native(&[0x0F, 0x0B], &UserState::new()).unwrap();
        let fault = output.fault.expect("ud2 must fault");
        assert_eq!(fault.vector, 6);
        assert_eq!(fault.signal, libc::SIGILL);
    }

    #[test]
    fn endless_loop_times_out() {
        // jmp $
        let result =
            run_native_with_timeout(&[0xEB, 0xFE], &UserState::new(), Duration::from_millis(200));
        assert!(
            matches!(result, Err(OracleError::TimedOut { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn jump_out_of_snippet_is_runner_fault() {
        // jmp rax, with rax = 0
        let result = run_native(&[0xFF, 0xE0], &UserState::new());
        assert!(
            matches!(result, Err(OracleError::RunnerFault { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn reserved_mxcsr_bits_rejected() {
        let mut input = UserState::new();
        input.mxcsr = 0x1_0000;
        let result = run_native(&[0x90], &input);
        assert!(
            matches!(result, Err(OracleError::InvalidMxcsr { .. })),
            "{result:?}"
        );
    }
}
