//! The user-mode state that a snippet starts from and ends in, and the fixed address
//! layout that both the native runner and the emulator harness use.

use std::fmt;

/// Virtual address of the first snippet byte. The code page is mapped read and execute.
pub const CODE_ADDR: u64 = 0x1000_0000;
/// Bytes reserved for the code page; a snippet plus the native runner's 14-byte trailer
/// must fit.
pub const CODE_CAPACITY: usize = 0x1000;
/// Virtual address of the data area, read and write. The pages right below and above it
/// stay unmapped, so an access that leaves the area raises #PF on both sides.
pub const DATA_ADDR: u64 = 0x1001_0000;
/// Size of the data area in bytes (4 pages).
pub const DATA_SIZE: usize = 0x4000;

/// Carry flag.
pub const FLAG_CF: u64 = 1 << 0;
/// Parity flag.
pub const FLAG_PF: u64 = 1 << 2;
/// Auxiliary carry flag.
pub const FLAG_AF: u64 = 1 << 4;
/// Zero flag.
pub const FLAG_ZF: u64 = 1 << 6;
/// Sign flag.
pub const FLAG_SF: u64 = 1 << 7;
/// Direction flag.
pub const FLAG_DF: u64 = 1 << 10;
/// Overflow flag.
pub const FLAG_OF: u64 = 1 << 11;
/// Interrupt flag: always set in a user-mode process.
pub const FLAG_IF: u64 = 1 << 9;
/// Bit 1 of RFLAGS, reserved and always set.
pub const FLAG_RESERVED1: u64 = 1 << 1;
/// The six arithmetic (status) flags.
pub const ARITHMETIC_FLAGS: u64 = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF;
/// The RFLAGS bits that a [`UserState`] sets and compares: the arithmetic flags and DF.
/// Every other bit is fixed: IF and bit 1 set, the rest clear.
pub const USER_RFLAGS_MASK: u64 = ARITHMETIC_FLAGS | FLAG_DF;
/// The fixed RFLAGS bits of a user-mode snippet.
pub const FIXED_RFLAGS: u64 = FLAG_IF | FLAG_RESERVED1;

/// MXCSR after reset: all exceptions masked, round to nearest, no FTZ or DAZ.
pub const MXCSR_DEFAULT: u32 = 0x1F80;

/// GPR names in encoding order, the order of [`UserState::gprs`].
pub const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// Index of RCX in [`UserState::gprs`].
pub const RCX: usize = 1;
/// Index of RSP in [`UserState::gprs`].
pub const RSP: usize = 4;
/// Index of RBP in [`UserState::gprs`].
pub const RBP: usize = 5;
/// Index of RSI in [`UserState::gprs`].
pub const RSI: usize = 6;
/// Index of RDI in [`UserState::gprs`].
pub const RDI: usize = 7;

/// The architectural state that a user-mode snippet reads and writes: GPRs, the user-visible RFLAGS
/// bits, the SSE registers and the data area at [`DATA_ADDR`].
#[derive(Clone, PartialEq, Eq)]
pub struct UserState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15, in encoding order.
    pub gprs: [u64; 16],
    /// RFLAGS. Only the bits in [`USER_RFLAGS_MASK`] are loaded; the runners force the
    /// rest to [`FIXED_RFLAGS`]. Outputs hold the full value that the CPU stored.
    pub rflags: u64,
    /// XMM0-XMM15, as little-endian 128-bit integers.
    pub xmm: [u128; 16],
    /// MXCSR. Bits that the host's MXCSR_MASK reports as reserved are rejected.
    pub mxcsr: u32,
    /// Contents of the data area, exactly [`DATA_SIZE`] bytes.
    pub data: Vec<u8>,
    /// The exception that stopped the snippet; `None` in inputs and when the snippet ran
    /// to its end. In a faulting output the registers are those at the faulting
    /// instruction, before it executed.
    pub fault: Option<Fault>,
}

impl UserState {
    /// Creates a state with zeroed registers and data, default MXCSR and clear flags.
    pub fn new() -> Self {
        Self {
            gprs: [0; 16],
            rflags: FIXED_RFLAGS,
            xmm: [0; 16],
            mxcsr: MXCSR_DEFAULT,
            data: vec![0; DATA_SIZE],
            fault: None,
        }
    }

    /// Returns the RFLAGS value that a runner loads for this state: the user bits from
    /// `rflags` and the fixed bits.
    pub fn effective_rflags(&self) -> u64 {
        (self.rflags & USER_RFLAGS_MASK) | FIXED_RFLAGS
    }
}

impl Default for UserState {
    fn default() -> Self {
        Self::new()
    }
}

/// An exception raised by a snippet, as the host kernel reported it to the child process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The signal that the kernel sent (SIGSEGV, SIGBUS, SIGFPE, SIGILL or SIGTRAP); 0 in
    /// the emulator's outputs, which have no kernel in between.
    pub signal: i32,
    /// The exception vector (the kernel's trap number): 0 for #DE, 6 for #UD, 13 for #GP,
    /// 14 for #PF, 17 for #AC, 19 for #XM.
    pub vector: u8,
    /// The error code that the CPU pushed, as the kernel passed it on; 0 for vectors
    /// without one.
    pub error_code: u64,
    /// RIP of the faulting instruction.
    pub rip: u64,
    /// The faulting linear address (CR2) for #PF. For other vectors, the kernel's
    /// `si_addr` in native outputs and 0 in the emulator's.
    pub address: u64,
}

impl Fault {
    /// Returns the conventional mnemonic of the vector, such as `#GP`.
    pub fn vector_name(&self) -> &'static str {
        vector_name(self.vector)
    }
}

/// Returns the conventional mnemonic of exception vector `vector`, such as `#PF` for 14.
pub fn vector_name(vector: u8) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        _ => "#??",
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (vector {}, signal {}) error code {:#x} at rip {:#x}, address {:#x}",
            self.vector_name(),
            self.vector,
            self.signal,
            self.error_code,
            self.rip,
            self.address
        )
    }
}

impl fmt::Debug for UserState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Prints the registers, flags, MXCSR, the nonzero XMM registers and the fault if any.
/// The data area is left out because it is 1,024 lines long; [`UserState::data_lines`]
/// prints parts of it.
impl fmt::Display for UserState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (row, names) in GPR_NAMES.chunks(4).enumerate() {
            for (column, name) in names.iter().enumerate() {
                write!(f, "{name:>3}={:016x} ", self.gprs[row * 4 + column])?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "rflags={:#x} [{}] mxcsr={:#x}",
            self.rflags,
            describe_flags(self.rflags),
            self.mxcsr
        )?;
        for (index, value) in self.xmm.iter().enumerate() {
            if *value != 0 {
                writeln!(f, "xmm{index}={value:032x}")?;
            }
        }
        if let Some(fault) = &self.fault {
            writeln!(f, "fault: {fault}")?;
        }
        Ok(())
    }
}

impl UserState {
    /// Formats the 16-byte lines of the data area that contain a byte of `range`
    /// (offsets from [`DATA_ADDR`]), one line each with its address.
    pub fn data_lines(&self, range: std::ops::Range<usize>) -> String {
        let mut text = String::new();
        let first = range.start / 16;
        let last = range.end.div_ceil(16).min(self.data.len() / 16);
        for line in first..last {
            let bytes = &self.data[line * 16..line * 16 + 16];
            let hex: Vec<String> = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
            text.push_str(&format!(
                "data {:#x}: {}\n",
                DATA_ADDR + (line as u64) * 16,
                hex.join(" ")
            ));
        }
        text
    }
}

/// Formats the user-visible flags of `rflags` as their names, such as `CF ZF DF`.
pub fn describe_flags(rflags: u64) -> String {
    let names = [
        (FLAG_CF, "CF"),
        (FLAG_PF, "PF"),
        (FLAG_AF, "AF"),
        (FLAG_ZF, "ZF"),
        (FLAG_SF, "SF"),
        (FLAG_DF, "DF"),
        (FLAG_OF, "OF"),
    ];
    let set: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| rflags & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    set.join(" ")
}
