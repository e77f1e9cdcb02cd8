//! VM lifecycle through the real `monstervm` binary: create, start, list, pause, resume,
//! stop, delete, crash detection and the console, in a temporary state directory.

mod lifecycle_common;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;

use lifecycle_common::{process_exists, reap, wait_until, StateDir};

#[test]
fn lifecycle_round_trip() {
    let state = StateDir::new();
    state.ok(&["create", "web", "--memory", "16", "--vcpus", "2"]);
    assert_eq!(state.status("web")["state"], "stopped");

    let started = state.ok(&["start", "web"]);
    assert!(started.starts_with("Started VM web (pid "), "{started}");
    let running = state.status("web");
    assert_eq!(running["state"], "running");
    assert_eq!(running["backend"], "test-double");
    assert_eq!(running["vcpus"], 2);
    let pid = running["pid"].as_i64().unwrap() as i32;
    assert!(process_exists(pid));
    // A pipe inherited from the test would keep `output()` of later commands waiting.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap();
        assert!(
            !target.to_string_lossy().starts_with("pipe:"),
            "VMM holds {target:?}"
        );
    }

    assert_eq!(state.json(&["pause", "web"])["state"], "paused");
    assert_eq!(state.status("web")["state"], "paused");
    assert_eq!(state.json(&["resume", "web"])["state"], "running");
    assert_eq!(state.status("web")["state"], "running");

    let stopped = state.json(&["stop", "web"]);
    assert_eq!(stopped["killed"], false);
    let status = reap(pid).expect("the VMM is reparented to the test");
    assert!(
        libc::WIFEXITED(status),
        "VMM ended with wait status {status:#x}"
    );
    assert_eq!(libc::WEXITSTATUS(status), 0);
    let serial = state.ok(&["logs", "web"]);
    assert!(
        serial.contains("power button pressed; powering off"),
        "stop did not go through the guest: {serial}"
    );
    assert_eq!(state.status("web")["state"], "stopped");
    let vm_dir = state.vm_dir("web");
    assert!(!vm_dir.join("api.sock").exists(), "socket left behind");
    assert!(!vm_dir.join("pid").exists(), "pid file left behind");

    state.ok(&["delete", "web"]);
    assert!(!vm_dir.exists());
    assert_eq!(state.json(&["list"]), serde_json::json!([]));
}

#[test]
fn table_output_is_aligned() {
    let state = StateDir::new();
    state.ok(&["create", "a", "--memory", "16"]);
    state.ok(&["create", "longer-name", "--memory", "32"]);

    let table = state.ok(&["list"]);

    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME         STATE"), "{table}");
    assert!(lines[1].starts_with("a            stopped"), "{table}");
    assert!(lines[2].starts_with("longer-name  stopped"), "{table}");
    let state_column = lines[0].find("STATE").unwrap();
    for line in &lines[1..] {
        assert_eq!(line.find("stopped"), Some(state_column), "{table}");
    }
}

#[test]
fn state_changes_are_rejected_with_exit_codes() {
    let state = StateDir::new();
    let pid = state.start_vm("vm1", &[]);

    let again = state.run(&["start", "vm1"]);
    assert_eq!(again.status.code(), Some(4));
    let message = String::from_utf8_lossy(&again.stderr);
    assert!(message.contains("already running"), "{message}");

    let resume = state.run(&["resume", "vm1"]);
    assert_eq!(resume.status.code(), Some(4));
    let message = String::from_utf8_lossy(&resume.stderr);
    assert!(
        message.contains("cannot resume VM vm1: it is running"),
        "{message}"
    );

    let create = state.run(&["create", "vm1"]);
    assert_eq!(create.status.code(), Some(4));

    let delete = state.run(&["delete", "vm1"]);
    assert_eq!(delete.status.code(), Some(4));
    assert!(state.vm_dir("vm1").exists());

    for args in [
        ["start", "ghost"],
        ["stop", "ghost"],
        ["inspect", "ghost"],
        ["delete", "ghost"],
    ] {
        assert_eq!(state.run(&args).status.code(), Some(3), "{args:?}");
    }

    state.ok(&["stop", "vm1"]);
    reap(pid);
    for args in [["pause", "vm1"], ["stop", "vm1"], ["console", "vm1"]] {
        assert_eq!(state.run(&args).status.code(), Some(4), "{args:?}");
    }
}

#[test]
fn concurrent_starts_run_one_vmm() {
    let state = StateDir::new();
    state.ok(&["create", "race", "--memory", "16"]);

    let starts: Vec<_> = (0..4)
        .map(|_| {
            state
                .command()
                .args(["start", "race"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outcomes: Vec<_> = starts
        .into_iter()
        .map(|child| child.wait_with_output().unwrap().status.code())
        .collect();

    let winners = outcomes.iter().filter(|code| **code == Some(0)).count();
    assert_eq!(winners, 1, "exit codes {outcomes:?}");
    assert_eq!(outcomes.iter().filter(|code| **code == Some(4)).count(), 3);
    let pid = state.status("race")["pid"].as_i64().unwrap() as i32;
    state.ok(&["stop", "race"]);
    reap(pid);
}

#[test]
fn killed_vmm_shows_as_crashed() {
    let state = StateDir::new();
    let pid = state.start_vm("victim", &[]);

    // SAFETY: kill has no memory-safety preconditions; `pid` is our VMM, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = reap(pid).expect("the VMM is reparented to the test");
    assert!(libc::WIFSIGNALED(status));

    let crashed = state.status("victim");
    assert_eq!(crashed["state"], "crashed");
    let error = crashed["last_error"].as_str().unwrap();
    assert!(
        error.contains(&format!("VMM process {pid} ended")),
        "{error}"
    );
    assert!(!state.socket("victim").exists(), "stale socket kept");
    assert_eq!(
        state.status("victim")["state"],
        "crashed",
        "crash forgotten"
    );

    let pid = state.json(&["start", "victim"])["pid"].as_i64().unwrap() as i32;
    let restarted = state.status("victim");
    assert_eq!(restarted["state"], "running");
    assert_eq!(restarted["last_error"], serde_json::Value::Null);
    state.ok(&["stop", "victim"]);
    reap(pid);
}

#[test]
fn failed_boot_is_reported_by_start() {
    let state = StateDir::new();
    // The maximum of --memory, 1 TiB, is more guest RAM than a test host has, so building
    // the VM fails inside the VMM.
    state.ok(&["create", "huge", "--memory", "1048576"]);

    let output = state.run(&["start", "huge"]);

    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("VM huge failed to start"), "{message}");
    assert!(message.contains("lower --memory"), "{message}");
    let status = state.status("huge");
    assert_eq!(status["state"], "crashed");
    assert!(status["last_error"]
        .as_str()
        .unwrap()
        .contains("lower --memory"));
}

#[test]
fn force_stop_and_force_delete_end_the_vmm() {
    let state = StateDir::new();
    let pid = state.start_vm("a", &[]);
    let stopped = state.json(&["stop", "a", "--force"]);
    assert_eq!(stopped["killed"], false, "the API's forced stop ended it");
    let status = reap(pid).unwrap();
    assert!(libc::WIFEXITED(status), "wait status {status:#x}");
    assert_eq!(
        state.status("a")["state"],
        "stopped",
        "a requested kill is not a crash"
    );

    let pid = state.json(&["start", "a"])["pid"].as_i64().unwrap() as i32;
    // The JSON parse also checks that the implied stop prints nothing of its own.
    assert_eq!(state.json(&["delete", "a", "--force"])["name"], "a");
    assert!(reap(pid).is_some());
    assert!(!state.vm_dir("a").exists());
}

#[test]
fn inspect_reports_config_runtime_and_metrics() {
    let state = StateDir::new();
    let pid = state.start_vm("box", &[]);

    let report = state.json(&["inspect", "box"]);

    assert_eq!(report["state"], "running");
    assert_eq!(report["config"]["memory_mib"], 16);
    assert_eq!(report["runtime"]["boots"], 1);
    assert_eq!(report["runtime"]["pid"], pid);
    let banner_bytes = report["metrics"]["serial"]["bytes_out"].as_u64().unwrap();
    assert!(banner_bytes > 0, "{report}");
    assert!(report["paths"]["api_socket"]
        .as_str()
        .unwrap()
        .ends_with("box/api.sock"));
    let table = state.ok(&["inspect", "box"]);
    assert!(table.contains("state:"), "{table}");
    assert!(table.contains("running"), "{table}");

    state.ok(&["stop", "box"]);
    reap(pid);
    let report = state.json(&["inspect", "box"]);
    assert_eq!(report["state"], "stopped");
    assert_eq!(report["runtime"], serde_json::Value::Null);
}

#[test]
fn logs_print_serial_output() {
    let state = StateDir::new();
    let pid = state.start_vm("chatty", &[]);

    let logs = state.ok(&["logs", "chatty"]);
    assert!(
        logs.contains("monstervm test double: VM chatty booted"),
        "{logs}"
    );

    let mut follower = state
        .command()
        .args(["logs", "chatty", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = follower.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("booted") {
        let count = stdout.read(&mut buffer).unwrap();
        assert!(count > 0, "logs --follow ended early");
        seen.extend_from_slice(&buffer[..count]);
    }
    follower.kill().unwrap();
    follower.wait().unwrap();

    let vmm_log = state.ok(&["logs", "chatty", "--vmm"]);
    assert!(vmm_log.contains("VMM starting"), "{vmm_log}");
    assert!(!vmm_log.contains('\x1b'), "colour codes in the log file");
    state.ok(&["stop", "chatty"]);
    reap(pid);
}

/// Opens a pseudo-terminal; returns (master, slave).
fn open_pty() -> (OwnedFd, OwnedFd) {
    let mut master = -1;
    let mut slave = -1;
    // SAFETY: openpty writes two descriptors; the name, termios and winsize pointers may
    // be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: openpty just opened both descriptors, and no other code owns them.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Everything read so far from a terminal, with a cursor past the last match. A thread
/// reads the terminal so that a broken console fails the test instead of hanging it.
struct Transcript {
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
    cursor: usize,
}

impl Transcript {
    fn new(mut master: std::fs::File) -> Transcript {
        let (sender, chunks) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 1024];
            while let Ok(count) = master.read(&mut buffer) {
                if count == 0 || sender.send(buffer[..count].to_vec()).is_err() {
                    break;
                }
            }
        });
        Transcript {
            chunks,
            seen: Vec::new(),
            cursor: 0,
        }
    }

    /// Reads until `needle` appears after the previous match.
    fn expect(&mut self, needle: &str) {
        loop {
            let text = String::from_utf8_lossy(&self.seen[self.cursor..]).into_owned();
            if let Some(position) = text.find(needle) {
                self.cursor += position + needle.len();
                return;
            }
            match self.chunks.recv_timeout(lifecycle_common::PATIENCE) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(error) => panic!("no {needle:?} on the terminal ({error}); got {text:?}"),
            }
        }
    }
}

#[test]
fn console_echoes_and_detaches_on_escape_key() {
    let state = StateDir::new();
    let pid = state.start_vm("tty", &[]);
    let (master, slave) = open_pty();

    let mut console = state
        .command()
        .args(["console", "tty"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut writer = std::fs::File::from(master.try_clone().unwrap());
    let mut terminal = Transcript::new(std::fs::File::from(master));
    terminal.expect("press Ctrl-] to detach");
    terminal.expect("booted");

    writer.write_all(b"ping").unwrap();
    terminal.expect("ping");
    writer.write_all(&[0x1d]).unwrap();
    let status = console.wait().unwrap();

    assert!(status.success(), "console exited with {status}");
    assert_eq!(state.status("tty")["state"], "running");
    let metrics = state.json(&["inspect", "tty"])["metrics"].clone();
    assert_eq!(metrics["serial"]["bytes_in"], 4);
    wait_until("the console viewer to be released", || {
        state.json(&["inspect", "tty"])["metrics"]["serial"]["viewers"] == 0
    });
    state.ok(&["stop", "tty"]);
    reap(pid);
}

#[test]
fn stopped_vmm_is_unresponsive_then_killed() {
    let state = StateDir::new();
    let pid = state.start_vm("frozen", &[]);
    // SAFETY: kill has no memory-safety preconditions; `pid` is our VMM, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);

    let status = state.status("frozen");
    assert_eq!(status["state"], "unresponsive");
    let error = status["last_error"].as_str().unwrap();
    assert!(error.contains("did not respond"), "{error}");

    let stopped = state.json(&["stop", "frozen", "--timeout", "1"]);
    assert_eq!(stopped["killed"], true);
    let wait_status = reap(pid).unwrap();
    assert!(libc::WIFSIGNALED(wait_status));
    assert_eq!(libc::WTERMSIG(wait_status), libc::SIGKILL);
    assert_eq!(state.status("frozen")["state"], "stopped");
}

#[test]
fn stop_forces_guest_ignoring_power_button() {
    let state = StateDir::new();
    state.ok(&[
        "create",
        "stubborn",
        "--memory",
        "16",
        "--cmdline",
        "console=ttyS0 ignore-power-button",
    ]);
    let pid = state.json(&["start", "stubborn"])["pid"].as_i64().unwrap() as i32;

    let stopped = state.json(&["stop", "stubborn", "--timeout", "1"]);

    assert_eq!(
        stopped["killed"], false,
        "the forced stop after the timeout ended it"
    );
    let wait_status = reap(pid).unwrap();
    assert!(libc::WIFEXITED(wait_status), "wait status {wait_status:#x}");
    let serial = state.ok(&["logs", "stubborn"]);
    assert!(
        serial.contains("power button pressed; ignoring it"),
        "{serial}"
    );
    assert_eq!(state.status("stubborn")["state"], "stopped");
}

#[test]
fn repeated_sigterm_ends_stubborn_vmm() {
    let state = StateDir::new();
    state.ok(&[
        "create",
        "deaf",
        "--memory",
        "16",
        "--cmdline",
        "console=ttyS0 ignore-power-button",
    ]);
    let pid = state.json(&["start", "deaf"])["pid"].as_i64().unwrap() as i32;

    // The first SIGTERM requests a power-off, which the guest ignores. The second SIGTERM
    // ends the vCPUs.
    // SAFETY: kill has no memory-safety preconditions; `pid` is our VMM, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_until("the guest to ignore the power-off request", || {
        state
            .ok(&["logs", "deaf"])
            .contains("power button pressed; ignoring it")
    });
    assert_eq!(state.status("deaf")["state"], "stopping");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);

    let wait_status = reap(pid).unwrap();
    assert!(libc::WIFEXITED(wait_status), "wait status {wait_status:#x}");
    assert_eq!(state.status("deaf")["state"], "stopped");
}

/// Returns whether /dev/kvm opens. Otherwise it prints why `test` skips, or panics when
/// MONSTERVM_REQUIRE_KVM=1.
fn kvm_usable(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(error) => {
            if std::env::var("MONSTERVM_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: MONSTERVM_REQUIRE_KVM=1 but /dev/kvm failed to open: {error}");
            }
            eprintln!("skipping {test}: /dev/kvm failed to open: {error}");
            false
        }
    }
}

/// Checks on one backend that `stop` makes the real embedded guest power off by itself:
/// the VMM types Ctrl-Alt-Del on the i8042, and the guest powers off through ACPI S5.
fn check_stop_is_graceful(backend: &str) {
    let state = StateDir::with_real_vms();
    state.ok(&["create", "polite", "--memory", "16", "--backend", backend]);
    let pid = state.json(&["start", "polite"])["pid"].as_i64().unwrap() as i32;
    wait_until("the guest's echo prompt", || {
        state.ok(&["logs", "polite"]).contains("Type to echo")
    });

    let stopped = state.json(&["stop", "polite", "--timeout", "60"]);

    assert_eq!(stopped["killed"], false, "{backend}: {stopped}");
    let status = reap(pid).expect("the VMM is reparented to the test");
    assert!(
        libc::WIFEXITED(status),
        "{backend}: wait status {status:#x}"
    );
    assert_eq!(libc::WEXITSTATUS(status), 0, "{backend}");
    let serial = state.ok(&["logs", "polite"]);
    assert!(
        serial.contains("Ctrl-Alt-Del pressed.\r\nPowering off."),
        "{backend}: the guest did not see Ctrl-Alt-Del: {serial}"
    );
    let vmm_log = std::fs::read_to_string(state.vm_dir("polite").join("vmm.log")).unwrap();
    assert!(
        vmm_log.contains("the guest powered off"),
        "{backend}: {vmm_log}"
    );
    let after = state.status("polite");
    assert_eq!(after["state"], "stopped", "{backend}");
    assert_eq!(after["last_error"], serde_json::Value::Null, "{backend}");
}

#[test]
fn stop_is_graceful_on_emulator() {
    check_stop_is_graceful("emulator");
}

#[test]
fn stop_is_graceful_on_kvm() {
    if kvm_usable("stop_is_graceful_on_kvm") {
        check_stop_is_graceful("kvm");
    }
}
