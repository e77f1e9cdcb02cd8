//! SIGTERM, SIGINT and SIGHUP stop `monstervm run` in order: the disks are closed, so a
//! qcow2 image is clean afterwards, and the exit status is 128 + the signal number.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// Byte offset of the qcow2 header's incompatible-features field, whose bit 0 is the dirty bit.
const INCOMPATIBLE_FEATURES_OFFSET: usize = 72;

fn qemu_img_available() -> bool {
    match Command::new("qemu-img").arg("--version").output() {
        Ok(output) => output.status.success(),
        Err(e) => {
            eprintln!("skipping: qemu-img is not available ({e}); install qemu-utils");
            false
        }
    }
}

fn incompatible_features(image: &Path) -> u64 {
    let data = std::fs::read(image).unwrap();
    let field = &data[INCOMPATIBLE_FEATURES_OFFSET..INCOMPATIBLE_FEATURES_OFFSET + 8];
    u64::from_be_bytes(field.try_into().unwrap())
}

/// Boots the embedded guest with a qcow2 data disk, sends `signal` once the guest runs,
/// and checks the exit status, the message and the image.
fn check_stop_on_signal(signal: libc::c_int, name: &str) {
    if !qemu_img_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("data.qcow2");
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .status()
        .unwrap();
    assert!(created.success(), "qemu-img create failed");

    let mut child = Command::new(env!("CARGO_BIN_EXE_monstervm"))
        .args(["run", "--backend", "emulator", "--disk"])
        .arg(&image)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The guest prints its banner from long mode, after the disk is open and marked dirty.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdout.read_line(&mut line).unwrap();
        assert_ne!(n, 0, "the guest ended before its banner");
        if line.contains("Welcome") {
            break;
        }
    }
    assert_eq!(
        incompatible_features(&image) & 1,
        1,
        "the running VM should hold the image dirty"
    );

    // SAFETY: kill only sends a signal to the child this test spawned.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(sent, 0, "kill failed");
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(128 + signal), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("stopped by {name}")),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains(&format!("signal={name}")),
        "no log line names the signal: {stderr}"
    );
    assert_eq!(incompatible_features(&image), 0, "the image was left dirty");
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn sigterm_closes_qcow2_disk() {
    check_stop_on_signal(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_closes_qcow2_disk() {
    check_stop_on_signal(libc::SIGINT, "SIGINT");
}

#[test]
fn sighup_closes_qcow2_disk() {
    check_stop_on_signal(libc::SIGHUP, "SIGHUP");
}
