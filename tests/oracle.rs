//! Differential tests of MonsterVM's x86 emulator against the host CPU.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::collections::BTreeMap;

use monstervm::core::cpu::oracle::generate::{Class, Generator};
use monstervm::core::cpu::oracle::run_native;

/// Every generated snippet runs natively without a runner error, twice with the same
/// result, so that the oracle itself is deterministic.
#[test]
fn native_runs_are_reproducible() {
    let mut generator = Generator::new(0x5EED);
    for class in Class::ALL {
        let missing = class.missing_host_features();
        if !missing.is_empty() {
            println!(
                "{:<20} skipped: the host CPU lacks {}",
                class.name(),
                missing.join(", ")
            );
            continue;
        }
        let mut faults = BTreeMap::new();
        for _ in 0..100 {
            let case = generator.generate(class);
            let run = || {
                run_native(&case.code, &case.input)
                    .unwrap_or_else(|error| panic!("{error}\n{}{}", case.disassembly(), case.input))
            };
            let first = run();
            let second = run();
            assert_eq!(
                first,
                second,
                "two native runs differ:\n{}",
                case.disassembly()
            );
            if let Some(fault) = first.fault {
                *faults.entry(fault.vector_name()).or_insert(0) += 1;
            }
        }
        println!("{:<20} 100 cases, faults {faults:?}", class.name());
    }
}
