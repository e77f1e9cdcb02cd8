//! A guest kernel panic reported through pvpanic ends `monstervm run` with status 6, even
//! when the guest resets the machine right after, as Linux does with `panic=-1`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Exit status of `run` after a guest panic, as docs/cli.md documents it.
const EXIT_GUEST_PANIC: i32 = 6;

/// Assembles tests/guests/pvpanic_kernel.asm into `dir`, or returns `None` (after saying
/// why) where NASM is missing.
fn assemble_kernel(dir: &Path) -> Option<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/pvpanic_kernel.asm");
    let output = dir.join("pvpanic.elf");
    match Command::new("nasm")
        .args(["-f", "bin", "-o"])
        .arg(&output)
        .arg(&source)
        .status()
    {
        Ok(status) => {
            assert!(status.success(), "nasm failed on {}", source.display());
            Some(output)
        }
        Err(e) => {
            eprintln!("skipping: nasm is not available ({e}); install nasm");
            None
        }
    }
}

fn run_panicking_guest(backend: &str) -> Option<std::process::Output> {
    let dir = tempfile::tempdir().unwrap();
    let kernel = assemble_kernel(dir.path())?;
    let output = Command::new(env!("CARGO_BIN_EXE_monstervm"))
        .args(["run", "--memory", "64", "--backend", backend, "--kernel"])
        .arg(&kernel)
        .output()
        .unwrap();
    Some(output)
}

fn check_panic_exit(output: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.contains("Kernel panic - not syncing"),
        "the guest did not find the pvpanic port: {stdout}"
    );
    assert_eq!(
        output.status.code(),
        Some(EXIT_GUEST_PANIC),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("guest kernel panicked"), "{stderr}");
    assert!(!stderr.contains("reset the machine"), "{stderr}");
}

#[test]
fn panic_ends_run_on_emulator() {
    let Some(output) = run_panicking_guest("emulator") else {
        return;
    };
    check_panic_exit(&output);
}

#[test]
fn panic_ends_run_on_kvm() {
    if !Path::new("/dev/kvm").exists() {
        assert!(
            std::env::var("MONSTERVM_REQUIRE_KVM").as_deref() != Ok("1"),
            "MONSTERVM_REQUIRE_KVM=1 but /dev/kvm is missing"
        );
        eprintln!("skipping: /dev/kvm is missing");
        return;
    }
    let Some(output) = run_panicking_guest("kvm") else {
        return;
    };
    check_panic_exit(&output);
}
