//! Bad input to `monstervm run` gets one clear line on stderr and a non-zero exit status,
//! never a panic, and nothing boots.

use std::path::Path;
use std::process::{Command, Output};

fn monstervm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_monstervm"))
        .args(args)
        .output()
        .expect("failed to run monstervm")
}

/// Checks that `output` failed with `status` and one error line containing `expected`.
fn assert_rejected(output: &Output, status: i32, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(status), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "the guest printed: {:?}",
        output.stdout
    );
}

#[test]
fn missing_kernel_file() {
    let output = monstervm(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_rejected(&output, 1, "kernel file /nonexistent/vmlinuz not found");
    assert_eq!(String::from_utf8_lossy(&output.stderr).lines().count(), 1);
}

#[test]
fn file_that_is_not_a_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "not a kernel at all\n".repeat(100)).unwrap();
    let output = monstervm(&["run", "--kernel", path.to_str().unwrap()]);
    assert_rejected(&output, 1, "is not a bootable Linux kernel");
}

#[test]
fn initramfs_larger_than_memory() {
    let kernel = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/vmlinuz");
    if !kernel.is_file() {
        eprintln!("skipping: no guest/vmlinuz; run `monstervm guest fetch --dir guest`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("big.img");
    let file = std::fs::File::create(&initrd).unwrap();
    file.set_len(100 << 20).unwrap();
    let output = monstervm(&[
        "run",
        "--memory",
        "96",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    assert_rejected(&output, 1, "larger than the 96 MiB of guest memory");
}

#[test]
fn memory_out_of_range_is_usage_error() {
    assert_rejected(
        &monstervm(&["run", "--memory", "0"]),
        2,
        "0 is out of range: give 2 to 1048576 MiB",
    );
    assert_rejected(
        &monstervm(&["run", "--memory", "999999999"]),
        2,
        "999999999 is out of range",
    );
}

#[test]
fn memory_beyond_host() {
    // The maximum of --memory, 1 TiB, is more than this host has unless it is very large.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let host_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal in /proc/meminfo");
    if host_kib >= 1 << 30 {
        eprintln!("skipping: this host has 1 TiB of RAM or more");
        return;
    }
    let output = monstervm(&["run", "--memory", "1048576"]);
    assert_rejected(&output, 1, "exceeds this host's");
}

#[test]
fn vcpus_out_of_range_is_usage_error() {
    for value in ["300", "65", "0"] {
        let output = monstervm(&["run", "--vcpus", value]);
        assert_rejected(
            &output,
            2,
            &format!("{value} is out of range: give 1 to 64 vCPUs"),
        );
    }
}

#[test]
fn timeout_out_of_range_is_usage_error() {
    let output = monstervm(&["stop", "vm0", "--timeout", "18446744073709551615"]);
    assert_rejected(&output, 2, "is out of range: give 0 to 604800 seconds");
}

#[test]
fn unknown_backend_is_usage_error() {
    let output = monstervm(&["run", "--backend", "bochs"]);
    assert_rejected(&output, 2, "unknown backend \"bochs\"");
}

#[test]
fn initramfs_without_kernel() {
    let output = monstervm(&["run", "--initrd", "/tmp/initramfs.img"]);
    assert_rejected(&output, 1, "an initramfs needs a kernel");
}

#[test]
fn missing_config_file() {
    let output = monstervm(&["run", "--config", "/nonexistent/vm.toml"]);
    assert_rejected(
        &output,
        1,
        "failed to read config file /nonexistent/vm.toml",
    );
}

#[test]
fn config_type_error_names_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.toml");
    std::fs::write(&path, "name = \"web\"\nmemory_mib = \"lots\"\n").unwrap();
    let output = monstervm(&["run", "--config", path.to_str().unwrap()]);
    assert_rejected(
        &output,
        1,
        &format!(
            "invalid TOML in config file {}, line 2, key memory_mib: invalid type: string \"lots\", expected u64",
            path.display()
        ),
    );
    assert_eq!(String::from_utf8_lossy(&output.stderr).lines().count(), 1);
}

/// Runs `monstervm run --backend kvm` in a private mount namespace where `/dev/kvm` is
/// replaced by `replacement` (a shell command), or returns `None` where namespaces cannot
/// be created (not root, no unshare).
fn run_with_hidden_kvm(replacement: &str) -> Option<Output> {
    let script = format!(
        "{replacement} || exit 99; exec {} run --backend kvm",
        env!("CARGO_BIN_EXE_monstervm")
    );
    let output = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .ok()?;
    (output.status.code() != Some(99)
        && !String::from_utf8_lossy(&output.stderr).contains("unshare:"))
    .then_some(output)
}

#[test]
fn kvm_backend_without_kvm_device() {
    let Some(output) = run_with_hidden_kvm("mount -t tmpfs none /dev") else {
        eprintln!("skipping: cannot create a mount namespace here (needs root and unshare)");
        return;
    };
    assert_rejected(&output, 1, "KVM is not available at /dev/kvm");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--backend emulator"));
}

#[test]
fn kvm_backend_with_unusable_device() {
    let Some(output) = run_with_hidden_kvm("mount --bind /dev/null /dev/kvm") else {
        eprintln!("skipping: cannot create a mount namespace here (needs root and unshare)");
        return;
    };
    assert_rejected(&output, 1, "not a KVM device");
}

#[test]
fn bzimage_cut_to_one_mib() {
    let kernel = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/vmlinuz");
    if !kernel.is_file() {
        eprintln!("skipping: no guest/vmlinuz; run `monstervm guest fetch --dir guest`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("vmlinuz-cut");
    let mut bytes = std::fs::read(&kernel).unwrap();
    bytes.truncate(1 << 20);
    std::fs::write(&short, &bytes).unwrap();

    let output = monstervm(&[
        "run",
        "--backend",
        "emulator",
        "--kernel",
        short.to_str().unwrap(),
    ]);
    assert_rejected(
        &output,
        1,
        "the bzImage is truncated: the file is 1048576 bytes",
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("syssize"), "{stderr}");
    assert!(!stderr.contains("triple"), "{stderr}");
}

#[test]
fn duplicate_disk_key_is_usage_error() {
    let output = monstervm(&["run", "--disk", "x.img,format=raw,format=qcow2"]);
    assert_rejected(&output, 2, "duplicate option \"format\"");
    assert!(String::from_utf8_lossy(&output.stderr).contains("supported: readonly"));
}
