//! `monstervm run` with a closed stdout or stderr: a closed stdout stops the VM with one
//! error line and status 1, and a closed stderr never panics.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::embedded::{create_qcow2, qemu_img_available, spawn_embedded, wait_for_banner};

/// Exit status of a Rust program that panicked.
const PANIC_STATUS: i32 = 101;

fn monstervm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_monstervm"))
}

#[test]
fn closed_stderr_does_not_panic() {
    // info level logs many lines, each of which meets the closed pipe.
    let mut child = monstervm()
        .args(["--log-level", "info", "run", "--backend", "emulator"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    // Kept open: a closed stdout would stop the VM, which the test below covers.
    let _stdout = wait_for_banner(&mut child);

    child.stdin.take().unwrap().write_all(b"q").unwrap();
    let status = child.wait().unwrap();
    assert_ne!(status.code(), Some(PANIC_STATUS), "run panicked");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn closed_stderr_on_error_path() {
    let mut child = monstervm()
        .args(["run", "--kernel", "/nonexistent/vmlinuz"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
}

#[test]
fn closed_stdout_stops_vm() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("data.qcow2");
    let with_disk = qemu_img_available();
    let mut args = Vec::new();
    if with_disk {
        create_qcow2(&image, "1M", None);
        args.extend([Path::new("--disk"), &image]);
    }
    let mut child = spawn_embedded(&args);
    drop(wait_for_banner(&mut child));

    // The guest echoes this byte, and the echo meets the closed pipe.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"x").unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    drop(stdin);

    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("error"))
        .collect();
    assert_eq!(errors.len(), 1, "stderr: {stderr}");
    assert!(
        errors[0].contains("failed to write the guest console to stdout"),
        "{stderr}"
    );
    assert!(errors[0].contains("Broken pipe"), "{stderr}");
    if with_disk {
        let check = Command::new("qemu-img")
            .arg("check")
            .arg(&image)
            .output()
            .unwrap();
        assert!(check.status.success(), "the disk was not closed cleanly");
    }
}
