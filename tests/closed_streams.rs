//! `monstervm run` with a closed stdout or stderr: a closed stdout stops the VM with one
//! error line and status 1, and a closed stderr never panics.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

/// Exit status of a Rust program that panicked.
const PANIC_STATUS: i32 = 101;

fn monstervm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_monstervm"))
}

/// Reads `reader` until a line contains `text`; panics at end of input.
fn read_until(reader: &mut impl BufRead, text: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        assert_ne!(n, 0, "the output ended before {text:?}");
        if line.contains(text) {
            return;
        }
    }
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
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    read_until(&mut stdout, "Welcome");

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
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("1M")
        .status();
    let with_disk = match created {
        Ok(status) => status.success(),
        Err(e) => {
            eprintln!("qemu-img is not available ({e}); checking without a disk");
            false
        }
    };

    let mut command = monstervm();
    command.args(["run", "--backend", "emulator"]);
    if with_disk {
        command.arg("--disk").arg(&image);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    read_until(&mut stdout, "Welcome");
    drop(stdout);

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
