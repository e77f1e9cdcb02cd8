//! Comparison of two output states, ignoring what the architecture leaves undefined.

use std::fmt;

use super::state::{describe_flags, Fault, UserState, DATA_ADDR, GPR_NAMES, USER_RFLAGS_MASK};
use super::undefined::Undefined;

/// One difference between the expected (native) and the actual (emulated) output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The differing field, such as `rax`, `rflags` or `data 0x10011230`.
    pub field: String,
    pub expected: String,
    pub actual: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: expected {}, actual {}",
            self.field, self.expected, self.actual
        )
    }
}

/// Compares `actual` with `expected` and returns every difference.
///
/// When the snippet ended normally, the bits in `undefined` are ignored. When it
/// faulted, nothing is ignored: the faulting instruction did not execute, so the state
/// is the one before it. Faults must agree in vector and RIP; #PF also in the faulting
/// address (CR2) and error code, #GP, #SS and #AC in the error code. The kernel's
/// `si_addr` of other faults has no architectural counterpart and is not compared.
pub fn compare(expected: &UserState, actual: &UserState, undefined: &Undefined) -> Vec<Mismatch> {
    let mut mismatches = Vec::new();
    compare_faults(
        expected.fault.as_ref(),
        actual.fault.as_ref(),
        &mut mismatches,
    );
    let ignore = if expected.fault.is_none() && actual.fault.is_none() {
        undefined.clone()
    } else {
        Undefined::default()
    };

    for (index, name) in GPR_NAMES.iter().enumerate() {
        let mask = ignore
            .gprs
            .iter()
            .filter(|(register, _)| *register == index)
            .fold(u64::MAX, |mask, (_, bits)| mask & !bits);
        if expected.gprs[index] & mask != actual.gprs[index] & mask {
            mismatches.push(Mismatch {
                field: (*name).to_string(),
                expected: format!("{:#018x}", expected.gprs[index]),
                actual: format!("{:#018x}", actual.gprs[index]),
            });
        }
    }

    let flags_mask = USER_RFLAGS_MASK & !ignore.flags;
    if expected.rflags & flags_mask != actual.rflags & flags_mask {
        mismatches.push(Mismatch {
            field: format!("rflags (compared: {})", describe_flags(flags_mask)),
            expected: format!("[{}]", describe_flags(expected.rflags & flags_mask)),
            actual: format!("[{}]", describe_flags(actual.rflags & flags_mask)),
        });
    }

    for index in 0..16 {
        if expected.xmm[index] != actual.xmm[index] {
            mismatches.push(Mismatch {
                field: format!("xmm{index}"),
                expected: format!("{:#034x}", expected.xmm[index]),
                actual: format!("{:#034x}", actual.xmm[index]),
            });
        }
    }
    if expected.mxcsr != actual.mxcsr {
        mismatches.push(Mismatch {
            field: "mxcsr".to_string(),
            expected: format!("{:#x}", expected.mxcsr),
            actual: format!("{:#x}", actual.mxcsr),
        });
    }

    compare_data(expected, actual, &ignore, &mut mismatches);
    mismatches
}

fn compare_faults(
    expected: Option<&Fault>,
    actual: Option<&Fault>,
    mismatches: &mut Vec<Mismatch>,
) {
    let describe = |fault: Option<&Fault>| match fault {
        Some(fault) => format!("{} at rip {:#x}", fault.vector_name(), fault.rip),
        None => "no fault".to_string(),
    };
    let (Some(expected_fault), Some(actual_fault)) = (expected, actual) else {
        if expected.is_some() != actual.is_some() {
            mismatches.push(Mismatch {
                field: "fault".to_string(),
                expected: describe(expected),
                actual: describe(actual),
            });
        }
        return;
    };
    if expected_fault.vector != actual_fault.vector || expected_fault.rip != actual_fault.rip {
        mismatches.push(Mismatch {
            field: "fault".to_string(),
            expected: describe(expected),
            actual: describe(actual),
        });
        return;
    }
    let has_error_code = matches!(expected_fault.vector, 12 | 13 | 14 | 17);
    if has_error_code && expected_fault.error_code != actual_fault.error_code {
        mismatches.push(Mismatch {
            field: format!("{} error code", expected_fault.vector_name()),
            expected: format!("{:#x}", expected_fault.error_code),
            actual: format!("{:#x}", actual_fault.error_code),
        });
    }
    if expected_fault.vector == 14 && expected_fault.address != actual_fault.address {
        mismatches.push(Mismatch {
            field: "#PF address (CR2)".to_string(),
            expected: format!("{:#x}", expected_fault.address),
            actual: format!("{:#x}", actual_fault.address),
        });
    }
}

/// Reports each differing 16-byte line of the data area once.
fn compare_data(
    expected: &UserState,
    actual: &UserState,
    ignore: &Undefined,
    mismatches: &mut Vec<Mismatch>,
) {
    if expected.data.len() != actual.data.len() {
        mismatches.push(Mismatch {
            field: "data length".to_string(),
            expected: expected.data.len().to_string(),
            actual: actual.data.len().to_string(),
        });
        return;
    }
    let ignored = |offset: usize| ignore.data.iter().any(|range| range.contains(&offset));
    let lines = expected.data.chunks(16).zip(actual.data.chunks(16));
    for (line, (expected_line, actual_line)) in lines.enumerate() {
        let differs = expected_line
            .iter()
            .zip(actual_line)
            .enumerate()
            .any(|(column, (left, right))| left != right && !ignored(line * 16 + column));
        if differs {
            mismatches.push(Mismatch {
                field: format!("data {:#x}", DATA_ADDR + (line as u64) * 16),
                expected: hex_bytes(expected_line),
                actual: hex_bytes(actual_line),
            });
        }
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::cpu::oracle::state::{FLAG_AF, FLAG_CF};

    #[test]
    fn identical_states_match() {
        let state = UserState::new();
        assert!(compare(&state, &state, &Undefined::default()).is_empty());
    }

    #[test]
    fn undefined_flag_ignored_defined_flag_reported() {
        let expected = UserState::new();
        let mut actual = UserState::new();
        actual.rflags |= FLAG_AF;
        let undefined = Undefined {
            flags: FLAG_AF,
            ..Undefined::default()
        };
        assert!(compare(&expected, &actual, &undefined).is_empty());

        actual.rflags |= FLAG_CF;
        let mismatches = compare(&expected, &actual, &undefined);
        assert_eq!(mismatches.len(), 1);
        assert!(mismatches[0].field.starts_with("rflags"));
    }

    #[test]
    fn undefined_bits_count_after_fault() {
        let mut expected = UserState::new();
        expected.fault = Some(Fault {
            signal: 8,
            vector: 0,
            error_code: 0,
            rip: 0x1000_0000,
            address: 0,
        });
        let mut actual = expected.clone();
        actual.gprs[0] = 1;
        let undefined = Undefined {
            gprs: vec![(0, u64::MAX)],
            ..Undefined::default()
        };
        let mismatches = compare(&expected, &actual, &undefined);
        assert_eq!(mismatches.len(), 1);
        assert_eq!(mismatches[0].field, "rax");
    }

    #[test]
    fn missing_fault_reported() {
        let mut expected = UserState::new();
        expected.fault = Some(Fault {
            signal: 11,
            vector: 14,
            error_code: 4,
            rip: 0x1000_0000,
            address: 0x1001_4000,
        });
        let actual = UserState::new();
        let mismatches = compare(&expected, &actual, &Undefined::default());
        assert_eq!(mismatches.len(), 1);
        assert_eq!(mismatches[0].field, "fault");
    }

    #[test]
    fn data_difference_names_line() {
        let expected = UserState::new();
        let mut actual = UserState::new();
        actual.data[0x21] = 1;
        let mismatches = compare(&expected, &actual, &Undefined::default());
        assert_eq!(mismatches.len(), 1);
        assert_eq!(mismatches[0].field, format!("data {:#x}", DATA_ADDR + 0x20));
    }
}
