//! A driver for the serial console of a `monstervm run` that boots the fetched Debian
//! guest: start it, wait for text, type lines, power the guest off.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The console output of a running `monstervm run`, collected by reader threads.
pub struct Console {
    pub child: Child,
    stdin: ChildStdin,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Console {
    /// Starts `monstervm run --backend emulator` with the guest's kernel and initramfs from
    /// `guest` and the extra options in `args`.
    pub fn start<S: AsRef<OsStr>>(guest: &Path, args: &[S]) -> Console {
        let mut child = Command::new(env!("CARGO_BIN_EXE_monstervm"))
            .args(["run", "--backend", "emulator", "--kernel"])
            .arg(guest.join("vmlinuz"))
            .arg("--initrd")
            .arg(guest.join("initramfs.img"))
            .args(args)
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

    /// Returns stdout and stderr so far, interleaved as they arrived.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until the output after byte `from` contains `pattern`; returns the offset
    /// just past it. Panics with the output's tail on timeout.
    pub fn wait_for(&mut self, pattern: &str, from: usize, timeout: Duration) -> usize {
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

    /// Types `line` into the guest's console.
    pub fn send(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    /// Powers the guest off from its shell and checks that `monstervm run` exits 0.
    pub fn power_off(mut self, position: usize, timeout: Duration) {
        self.send("poweroff -f\n");
        self.wait_for("monstervm: the guest powered off", position, timeout);
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "monstervm run exited with {status}:\n{}",
            self.text()
        );
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Returns the folder of the fetched guest that contains every file of `files`, fetching
/// it once, or why the test must skip.
///
/// The folder is `MONSTERVM_GUEST_DIR`, `./guest` (where the README and `.ci/run` fetch
/// it) or `target/guest`, where this fetches it if neither has the files.
pub fn guest_dir(files: &[&str]) -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("MONSTERVM_GUEST_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let has_files = |dir: &Path| files.iter().all(|name| dir.join(name).is_file());
    if has_files(&manifest.join("guest")) {
        return Ok(manifest.join("guest"));
    }
    let dir = manifest.join("target/guest");
    if has_files(&dir) {
        return Ok(dir);
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        return Err(format!(
            "apt-get is missing, so the Debian kernel cannot be fetched; set MONSTERVM_GUEST_DIR to a folder with {}",
            files.join(", ")
        ));
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
    if !has_files(&dir) {
        return Err(format!(
            "guest fetch wrote only some of {} (install e2fsprogs for the mke2fs of rootfs.img): {}",
            files.join(", "),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(dir)
}

/// Returns the fetched guest folder with every file of `files` for a test that boots
/// Linux, or `None` after printing why the test skips: in debug builds, where the
/// unoptimised emulator needs many minutes for a boot, and where the guest is missing.
pub fn guest_for_boot_test(files: &[&str]) -> Option<PathBuf> {
    if cfg!(debug_assertions) {
        eprintln!("skipping: a Linux boot on the unoptimised emulator takes too long; run `cargo test --release`");
        return None;
    }
    match guest_dir(files) {
        Ok(dir) => Some(dir),
        Err(reason) => {
            eprintln!("skipping: {reason}");
            None
        }
    }
}
