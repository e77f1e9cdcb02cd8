//! Image locks of `monstervm run` against itself and against QEMU's tools, which take the
//! same OFD lock bytes.

mod common;

use std::io::{BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Output, Stdio};

use common::embedded::{create_qcow2, spawn_embedded, wait_for_banner};

fn qemu_tools_available() -> bool {
    let found = ["qemu-img", "qemu-io", "qemu-nbd"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success())
    });
    if !found {
        eprintln!("skipping: qemu-img, qemu-io or qemu-nbd is missing; install qemu-utils");
    }
    found
}

/// Creates a 64 MiB qcow2 image in a new folder, or returns `None` (after saying why) where
/// a QEMU tool is missing.
fn new_image() -> Option<(tempfile::TempDir, std::path::PathBuf)> {
    if !qemu_tools_available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, "64M", None);
    Some((dir, image))
}

/// Runs `monstervm run` on the emulator with `disks` and returns its output. The embedded
/// guest gets no input, so only a run that fails before booting returns.
fn run_expecting_failure(disks: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_monstervm"));
    command.args(["run", "--backend", "emulator"]);
    for disk in disks {
        command.args(["--disk", disk]);
    }
    command.stdin(Stdio::null()).output().unwrap()
}

/// A `monstervm run` of the embedded guest that has booted with its disks open.
struct RunningVm {
    child: Child,
    /// The rest of the console output, kept open because a closed stdout stops the VM.
    _stdout: BufReader<ChildStdout>,
}

impl RunningVm {
    fn start(disks: &[&str]) -> RunningVm {
        let mut args = Vec::new();
        for disk in disks {
            args.extend(["--disk", disk]);
        }
        let mut child = spawn_embedded(&args);
        let stdout = wait_for_banner(&mut child);
        RunningVm {
            child,
            _stdout: stdout,
        }
    }

    /// Sends `q`, on which the embedded guest powers off, and checks that run succeeds.
    fn stop(mut self) {
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(b"q").unwrap();
        drop(stdin);
        let output = self.child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "run failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn same_image_twice_in_one_vm() {
    let Some((_dir, image)) = new_image() else {
        return;
    };
    let path = image.to_str().unwrap();

    let output = run_expecting_failure(&[path, path]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("failed to lock"), "{stderr}");
    assert!(stderr.contains("disk.qcow2"), "{stderr}");
    assert!(stderr.contains("this process"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn second_vm_names_first() {
    let Some((_dir, image)) = new_image() else {
        return;
    };
    let path = image.to_str().unwrap();

    let first = RunningVm::start(&[path]);
    let output = run_expecting_failure(&[path]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("process {} (monstervm)", first.child.id())),
        "{stderr}"
    );

    // Read-only opens share with each other but not with a writer.
    let read_only = format!("{path},readonly");
    let output = run_expecting_failure(&[&read_only]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    first.stop();
}

#[test]
fn read_only_vms_share_image() {
    let Some((_dir, image)) = new_image() else {
        return;
    };
    let read_only = format!("{},readonly", image.to_str().unwrap());

    let first = RunningVm::start(&[&read_only]);
    let second = RunningVm::start(&[&read_only]);
    second.stop();
    first.stop();
}

#[test]
fn qemu_img_info_needs_force_share() {
    let Some((_dir, image)) = new_image() else {
        return;
    };
    let path = image.to_str().unwrap();

    let vm = RunningVm::start(&[path]);
    let info = Command::new("qemu-img")
        .args(["info", path])
        .output()
        .unwrap();
    let stderr = stderr_of(&info);
    assert!(!info.status.success(), "qemu-img info ignored the lock");
    assert!(
        stderr.contains("Failed to get shared \"write\" lock"),
        "{stderr}"
    );

    let shared = Command::new("qemu-img")
        .args(["info", "-U", path])
        .output()
        .unwrap();
    assert!(shared.status.success(), "{}", stderr_of(&shared));

    let ours = Command::new(env!("CARGO_BIN_EXE_monstervm"))
        .args(["disk", "info", path])
        .output()
        .unwrap();
    assert_eq!(ours.status.code(), Some(1), "{}", stderr_of(&ours));
    let ours_shared = Command::new(env!("CARGO_BIN_EXE_monstervm"))
        .args(["disk", "info", "-U", path])
        .output()
        .unwrap();
    assert!(ours_shared.status.success(), "{}", stderr_of(&ours_shared));
    vm.stop();
}

#[test]
fn backing_file_locked_for_read() {
    if !qemu_tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 64 << 20]).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    create_qcow2(&overlay, "64M", Some(&base));

    let vm = RunningVm::start(&[overlay.to_str().unwrap()]);
    let write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(&base)
        .output()
        .unwrap();
    let stderr = stderr_of(&write);
    assert!(
        stderr.contains("Failed to get \"write\" lock"),
        "qemu-io wrote into a backing file in use: {stderr}"
    );
    let read = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 0 512"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(read.status.success(), "{}", stderr_of(&read));
    vm.stop();
}

/// A qemu-nbd server on an image, stopped when dropped.
struct NbdServer {
    pid: libc::pid_t,
}

impl NbdServer {
    fn start(image: &Path, dir: &Path) -> NbdServer {
        let socket = dir.join("nbd.sock");
        let pid_file = dir.join("nbd.pid");
        // --fork returns once the server has opened (and locked) the image.
        let status = Command::new("qemu-nbd")
            .arg("--fork")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", pid_file.display()))
            .args(["-f", "qcow2"])
            .arg(image)
            .status()
            .unwrap();
        assert!(status.success(), "qemu-nbd failed to start");
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        NbdServer { pid }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        // SAFETY: kill only signals the qemu-nbd server this test started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
    }
}

#[test]
fn qemu_nbd_blocks_run() {
    let Some((dir, image)) = new_image() else {
        return;
    };
    let path = image.to_str().unwrap();
    let _server = NbdServer::start(&image, dir.path());

    let output = run_expecting_failure(&[path]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("(qemu-nbd)"), "{stderr}");
    assert!(stderr.contains("locking=off"), "{stderr}");

    // locking=off skips the check, as QEMU's file.locking=off does.
    let unlocked = RunningVm::start(&[&format!("{path},locking=off,readonly")]);
    unlocked.stop();
}
