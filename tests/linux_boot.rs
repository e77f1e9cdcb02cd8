//! Boots Debian's stock cloud kernel with the BusyBox initramfs from `monstervm guest
//! fetch` on the emulator backend, types commands into the serial console and powers the
//! guest off, exactly as a user does from the README.
//!
//! The guest comes from `MONSTERVM_GUEST_DIR`, `./guest` (where the README and `.ci/run`
//! fetch it) or `target/guest`, where the test fetches it once if neither exists.
//! The test skips, saying why, in debug builds (the unoptimised emulator needs many
//! minutes for a boot; run `cargo test --release`) and where apt-get cannot download the
//! kernel.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Maximum wait for the init line. A boot takes minutes on this emulator under load.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// Maximum wait for a command's output once the shell runs.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The console output of a running `monstervm run`, collected by a reader thread.
struct Console {
    child: Child,
    stdin: ChildStdin,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Console {
    fn start(kernel: &Path, initrd: &Path) -> Console {
        let mut child = Command::new(env!("CARGO_BIN_EXE_monstervm"))
            .args(["run", "--backend", "emulator", "--kernel"])
            .arg(kernel)
            .arg("--initrd")
            .arg(initrd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start monstervm run");
        let stdin = child.stdin.take().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().extend_from_slice(&buffer[..n]);
                }
            });
        }
        Console {
            child,
            stdin,
            output,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until the output after byte `from` contains `pattern`; returns the offset
    /// just past it. Panics with the output's tail on timeout.
    fn wait_for(&mut self, pattern: &str, from: usize, timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            let text = self.text();
            if let Some(position) = text.get(from..).and_then(|rest| rest.find(pattern)) {
                return from + position + pattern.len();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "monstervm exited with {status} before printing {pattern:?}; output:\n{text}"
                );
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let tail: String = text
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!("timed out after {timeout:?} waiting for {pattern:?}; output tail:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn send(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Returns the guest folder, fetching it once, or why the test must skip.
fn guest_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("MONSTERVM_GUEST_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let is_guest =
        |dir: &Path| dir.join("vmlinuz").is_file() && dir.join("initramfs.img").is_file();
    // `.ci/run` and the README fetch into ./guest; otherwise fetch into target/guest.
    if is_guest(&manifest.join("guest")) {
        return Ok(manifest.join("guest"));
    }
    let dir = manifest.join("target/guest");
    if is_guest(&dir) {
        return Ok(dir);
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        return Err("apt-get is missing, so the Debian kernel cannot be fetched; set MONSTERVM_GUEST_DIR to a folder with vmlinuz and initramfs.img".into());
    }
    let output = Command::new(env!("CARGO_BIN_EXE_monstervm"))
        .args(["guest", "fetch", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "guest fetch failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(dir)
}

#[test]
fn debian_kernel_boots_to_shell() {
    if cfg!(debug_assertions) {
        eprintln!("skipping: a Linux boot on the unoptimised emulator takes too long; run `cargo test --release`");
        return;
    }
    let dir = match guest_dir() {
        Ok(dir) => dir,
        Err(reason) => {
            eprintln!("skipping: {reason}");
            return;
        }
    };
    let mut console = Console::start(&dir.join("vmlinuz"), &dir.join("initramfs.img"));

    let booted = Instant::now();
    let mut position = console.wait_for("MONSTERVM-INIT uptime=", 0, BOOT_TIMEOUT);
    eprintln!("init reached after {:.1} s", booted.elapsed().as_secs_f64());
    position = console.wait_for("# ", position, COMMAND_TIMEOUT);

    console.send("uname -r\n");
    position = console.wait_for("-cloud-amd64", position, COMMAND_TIMEOUT);

    // The shell computes 6*7, so seeing 42 proves a shell ran the line, not a terminal echo.
    console.send("echo monstervm-$((6*7))\n");
    position = console.wait_for("monstervm-42", position, COMMAND_TIMEOUT);

    console.send("poweroff -f\n");
    console.wait_for(
        "monstervm: the guest powered off",
        position,
        COMMAND_TIMEOUT,
    );
    let status = console.child.wait().unwrap();
    assert!(
        status.success(),
        "monstervm run exited with {status}:\n{}",
        console.text()
    );
}

#[path = "lifecycle_common/mod.rs"]
mod lifecycle_common;

/// Boots the Debian kernel in a VMM started by `monstervm start`, then checks that
/// `monstervm stop` powers it off through Ctrl-Alt-Del. The kernel's atkbd driver reads
/// the keys from the i8042, and BusyBox init runs the initramfs's `ctrlaltdel` action.
/// The VMM must exit with status 0 without being killed.
///
/// Slow: the boot takes about a minute of CPU time on the emulator, more under load.
#[test]
fn debian_kernel_powers_off_on_stop() {
    if cfg!(debug_assertions) {
        eprintln!("skipping: a Linux boot on the unoptimised emulator takes too long; run `cargo test --release`");
        return;
    }
    let dir = match guest_dir() {
        Ok(dir) => dir,
        Err(reason) => {
            eprintln!("skipping: {reason}");
            return;
        }
    };
    let state = lifecycle_common::StateDir::with_real_vms();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.img");
    state.ok(&[
        "create",
        "linux",
        "--memory",
        "256",
        "--backend",
        "emulator",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    let pid = state.json(&["start", "linux"])["pid"].as_i64().unwrap() as i32;
    let serial_log = state.vm_dir("linux").join("serial.log");
    let read_serial = || std::fs::read_to_string(&serial_log).unwrap_or_default();

    let booted = Instant::now();
    while !read_serial().contains("MONSTERVM-INIT uptime=") {
        assert!(
            booted.elapsed() < BOOT_TIMEOUT,
            "no init line within {BOOT_TIMEOUT:?}:\n{}",
            read_serial()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("init reached after {:.1} s", booted.elapsed().as_secs_f64());
    // BusyBox init has taken over once the shell that it starts prints its banner.
    while !read_serial().contains("built-in shell") {
        assert!(
            booted.elapsed() < BOOT_TIMEOUT,
            "no shell within {BOOT_TIMEOUT:?}:\n{}",
            read_serial()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let timeout = COMMAND_TIMEOUT.as_secs().to_string();
    let stopped = state.json(&["stop", "linux", "--timeout", &timeout]);

    let serial = read_serial();
    assert_eq!(stopped["killed"], false, "{stopped}; serial:\n{serial}");
    let status = lifecycle_common::reap(pid).expect("the VMM is reparented to the test");
    assert!(libc::WIFEXITED(status), "wait status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "serial:\n{serial}");
    assert!(
        serial.contains("MONSTERVM-INIT Ctrl-Alt-Del received, powering off"),
        "init did not run its ctrlaltdel action:\n{serial}"
    );
    let vmm_log = std::fs::read_to_string(state.vm_dir("linux").join("vmm.log")).unwrap();
    assert!(vmm_log.contains("the guest powered off"), "{vmm_log}");
}
