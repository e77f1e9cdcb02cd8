//! SIGTERM, SIGINT and SIGHUP stop `monstervm run` in order: the disks are closed, so a
//! qcow2 image is clean afterwards, and the exit status is 128 + the signal number.

mod common;

use std::path::Path;

use common::embedded::{create_qcow2, qemu_img_available, spawn_embedded, wait_for_banner};

/// Byte offset of the qcow2 header's incompatible-features field, whose bit 0 is the dirty bit.
const INCOMPATIBLE_FEATURES_OFFSET: usize = 72;

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
    create_qcow2(&image, "64M", None);

    let mut child = spawn_embedded(&[Path::new("--disk"), &image]);
    // The banner comes from long mode, after the disk is open and marked dirty.
    let _stdout = wait_for_banner(&mut child);
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
    let (code, report) = common::qemu_check(&image);
    assert_eq!(code, 0, "qemu-img check: {report}");
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
