//! Boots Debian's stock cloud kernel on the emulator backend with its root file system on
//! a virtio-blk disk: a qcow2 overlay made by `monstervm disk create` over the raw ext4
//! `rootfs.img` from `monstervm guest fetch`. The first boot writes a file and powers off;
//! the second boot reads it back. Then `qemu-img check` must find the overlay clean and
//! the raw base must be unchanged.
//!
//! The guest comes from `MONSTERVM_GUEST_DIR`, `./guest` (where the README and `.ci/run`
//! fetch it) or `target/guest`, where the test fetches it once if neither has a root
//! disk. The test skips, saying why, in debug builds (the unoptimised emulator needs many
//! minutes for a boot; run `cargo test --release`) and where apt-get cannot download the
//! kernel.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Maximum wait for the root disk's init line. A boot takes minutes on this emulator
/// under load.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// Maximum wait for a command's output once the shell runs.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// The console output of a running `monstervm run`, collected by reader threads.
struct Console {
    child: Child,
    stdin: ChildStdin,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Console {
    /// Starts `monstervm run` with the guest's kernel and initramfs and `disk`, a `--disk`
    /// value.
    fn start(guest: &Path, disk: &str) -> Console {
        let mut child = Command::new(env!("CARGO_BIN_EXE_monstervm"))
            .args(["run", "--backend", "emulator", "--kernel"])
            .arg(guest.join("vmlinuz"))
            .arg("--initrd")
            .arg(guest.join("initramfs.img"))
            .arg("--disk")
            .arg(disk)
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

    /// Waits for the root disk's shell prompt; returns the offset past it.
    fn wait_for_root_shell(&mut self) -> usize {
        let booted = Instant::now();
        let position = self.wait_for("MONSTERVM-ROOT uptime=", 0, BOOT_TIMEOUT);
        eprintln!(
            "root disk init reached after {:.1} s",
            booted.elapsed().as_secs_f64()
        );
        self.wait_for("# ", position, COMMAND_TIMEOUT)
    }

    /// Powers the guest off from its shell and checks that `monstervm run` exits 0.
    fn power_off(mut self, position: usize) {
        self.send("poweroff -f\n");
        self.wait_for(
            "monstervm: the guest powered off",
            position,
            COMMAND_TIMEOUT,
        );
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

/// Returns the guest folder with a root disk, fetching it once, or why the test must skip.
fn guest_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("MONSTERVM_GUEST_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let is_guest = |dir: &Path| {
        ["vmlinuz", "initramfs.img", "rootfs.img"]
            .iter()
            .all(|name| dir.join(name).is_file())
    };
    if is_guest(&manifest.join("guest")) {
        return Ok(manifest.join("guest"));
    }
    let dir = manifest.join("target/guest");
    if is_guest(&dir) {
        return Ok(dir);
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        return Err("apt-get is missing, so the Debian kernel cannot be fetched; set MONSTERVM_GUEST_DIR to a folder with vmlinuz, initramfs.img and rootfs.img".into());
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
    if !dir.join("rootfs.img").is_file() {
        return Err(format!(
            "guest fetch wrote no rootfs.img (install e2fsprogs for mke2fs): {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(dir)
}

/// Hashes a whole file, to tell whether it changed.
fn file_hash(path: &Path) -> u64 {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = DefaultHasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).unwrap();
        if n == 0 {
            return hasher.finish();
        }
        hasher.write(&buffer[..n]);
    }
}

#[test]
fn root_on_qcow2_overlay_persists() {
    if cfg!(debug_assertions) {
        eprintln!("skipping: a Linux boot on the unoptimised emulator takes too long; run `cargo test --release`");
        return;
    }
    let guest = match guest_dir() {
        Ok(dir) => dir,
        Err(reason) => {
            eprintln!("skipping: {reason}");
            return;
        }
    };

    // A private copy of the base, so the overlay names it by a relative path and the hash
    // catches any write that reaches it.
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("rootfs.img");
    std::fs::copy(guest.join("rootfs.img"), &base).unwrap();
    let base_hash = file_hash(&base);
    let overlay = work.path().join("overlay.qcow2");
    let create = Command::new(env!("CARGO_BIN_EXE_monstervm"))
        .args([
            "disk",
            "create",
            "-f",
            "qcow2",
            "-b",
            "rootfs.img",
            "-F",
            "raw",
            "overlay.qcow2",
        ])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(
        create.status.success(),
        "monstervm disk create failed: {}",
        String::from_utf8_lossy(&create.stderr)
    );

    // First boot: the root is the overlay, read-write; write a file and sync it.
    let mut console = Console::start(&guest, overlay.to_str().unwrap());
    let mut position = console.wait_for_root_shell();
    console.send("grep ' / ' /proc/mounts\n");
    position = console.wait_for("/dev/vda / ext4 rw", position, COMMAND_TIMEOUT);
    // The shell computes the numbers, so the output cannot be the terminal's echo.
    console.send("echo persisted-$((6*7)) > /root/note.txt; sync; echo written-$((2+3))\n");
    position = console.wait_for("written-5", position, COMMAND_TIMEOUT);
    console.power_off(position);

    let (code, report) = common::qemu_check(&overlay);
    assert_eq!(code, 0, "qemu-img check after the first boot:\n{report}");

    // Second boot: the file is back.
    let mut console = Console::start(&guest, overlay.to_str().unwrap());
    let mut position = console.wait_for_root_shell();
    console.send("cat /root/note.txt\n");
    position = console.wait_for("persisted-42", position, COMMAND_TIMEOUT);
    console.power_off(position);

    let (code, report) = common::qemu_check(&overlay);
    assert_eq!(code, 0, "qemu-img check after the second boot:\n{report}");
    assert!(report.contains("No errors were found"), "{report}");
    assert_eq!(
        file_hash(&base),
        base_hash,
        "the raw base changed, so a guest write went past the overlay"
    );
}

#[test]
fn read_only_disk_mounts_read_only() {
    if cfg!(debug_assertions) {
        eprintln!("skipping: a Linux boot on the unoptimised emulator takes too long; run `cargo test --release`");
        return;
    }
    let guest = match guest_dir() {
        Ok(dir) => dir,
        Err(reason) => {
            eprintln!("skipping: {reason}");
            return;
        }
    };
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("rootfs.img");
    std::fs::copy(guest.join("rootfs.img"), &base).unwrap();
    let base_hash = file_hash(&base);

    // The device offers VIRTIO_BLK_F_RO, so the rw mount fails and /init mounts it ro.
    let mut console = Console::start(&guest, &format!("{},readonly", base.display()));
    let mut position = console.wait_for_root_shell();
    console.send("grep ' / ' /proc/mounts; cat /sys/block/vda/ro\n");
    position = console.wait_for("/dev/vda / ext4 ro", position, COMMAND_TIMEOUT);
    position = console.wait_for("\n1", position, COMMAND_TIMEOUT);
    console.send("touch /root/x || echo rejected-$((2+3))\n");
    position = console.wait_for("rejected-5", position, COMMAND_TIMEOUT);
    console.power_off(position);

    assert_eq!(
        file_hash(&base),
        base_hash,
        "a read-only disk's image changed"
    );
}
