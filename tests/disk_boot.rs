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
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::console::{guest_for_boot_test, Console};

/// Maximum wait for the root disk's init line. A boot takes minutes on this emulator
/// under load.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// Maximum wait for a command's output once the shell runs.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// Starts `monstervm run` with the guest and `disk`, a `--disk` value.
fn start_with_disk(guest: &Path, disk: &str) -> Console {
    Console::start(guest, &["--disk", disk])
}

/// Waits for the root disk's shell prompt; returns the offset past it.
fn wait_for_root_shell(console: &mut Console) -> usize {
    let booted = Instant::now();
    let position = console.wait_for("MONSTERVM-ROOT uptime=", 0, BOOT_TIMEOUT);
    eprintln!(
        "root disk init reached after {:.1} s",
        booted.elapsed().as_secs_f64()
    );
    console.wait_for("# ", position, COMMAND_TIMEOUT)
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

/// Copies the guest's raw root disk into a new folder and creates a qcow2 overlay over
/// the copy with `monstervm disk create`. The overlay names the base by a relative path,
/// and a hash of the private copy catches any write that reaches it. Returns the folder,
/// the base and the overlay.
fn overlay_on_copy(guest: &Path) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("rootfs.img");
    std::fs::copy(guest.join("rootfs.img"), &base).unwrap();
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
    (work, base, overlay)
}

#[test]
fn root_on_qcow2_overlay_persists() {
    let Some(guest) = guest_for_boot_test(&["vmlinuz", "initramfs.img", "rootfs.img"]) else {
        return;
    };

    let (_work, base, overlay) = overlay_on_copy(&guest);
    let base_hash = file_hash(&base);

    // First boot: the root is the overlay, read-write; write a file and sync it.
    let mut console = start_with_disk(&guest, overlay.to_str().unwrap());
    let mut position = wait_for_root_shell(&mut console);
    console.send("grep ' / ' /proc/mounts\n");
    position = console.wait_for("/dev/vda / ext4 rw", position, COMMAND_TIMEOUT);
    // The shell computes the numbers, so the output cannot be the terminal's echo.
    console.send("echo persisted-$((6*7)) > /root/note.txt; sync; echo written-$((2+3))\n");
    position = console.wait_for("written-5", position, COMMAND_TIMEOUT);
    console.power_off(position, COMMAND_TIMEOUT);

    let (code, report) = common::qemu_check(&overlay);
    assert_eq!(code, 0, "qemu-img check after the first boot:\n{report}");

    // Second boot: the file is back.
    let mut console = start_with_disk(&guest, overlay.to_str().unwrap());
    let mut position = wait_for_root_shell(&mut console);
    console.send("cat /root/note.txt\n");
    position = console.wait_for("persisted-42", position, COMMAND_TIMEOUT);
    console.power_off(position, COMMAND_TIMEOUT);

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
    let Some(guest) = guest_for_boot_test(&["vmlinuz", "initramfs.img", "rootfs.img"]) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("rootfs.img");
    std::fs::copy(guest.join("rootfs.img"), &base).unwrap();
    let base_hash = file_hash(&base);

    // The device offers VIRTIO_BLK_F_RO, so the rw mount fails and /init mounts it ro.
    let mut console = start_with_disk(&guest, &format!("{},readonly", base.display()));
    let mut position = wait_for_root_shell(&mut console);
    console.send("grep ' / ' /proc/mounts; cat /sys/block/vda/ro\n");
    position = console.wait_for("/dev/vda / ext4 ro", position, COMMAND_TIMEOUT);
    position = console.wait_for("\n1", position, COMMAND_TIMEOUT);
    console.send("touch /root/x || echo rejected-$((2+3))\n");
    position = console.wait_for("rejected-5", position, COMMAND_TIMEOUT);
    console.power_off(position, COMMAND_TIMEOUT);

    assert_eq!(
        file_hash(&base),
        base_hash,
        "a read-only disk's image changed"
    );
}

/// Byte offset of the qcow2 header's incompatible-features field, whose bit 0 is the dirty
/// bit.
const INCOMPATIBLE_FEATURES_OFFSET: usize = 72;

#[test]
fn sigterm_leaves_root_overlay_clean() {
    let Some(guest) = guest_for_boot_test(&["vmlinuz", "initramfs.img", "rootfs.img"]) else {
        return;
    };
    let (_work, _base, overlay) = overlay_on_copy(&guest);

    // The guest mounts the overlay read-write and writes to it while it boots.
    let mut console = start_with_disk(&guest, overlay.to_str().unwrap());
    let position = wait_for_root_shell(&mut console);
    console.send("echo unsynced-$((6*7)) > /root/note.txt; echo typed-$((2+3))\n");
    console.wait_for("typed-5", position, COMMAND_TIMEOUT);

    // SAFETY: kill only signals the monstervm process this test started.
    let sent = unsafe { libc::kill(console.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0, "kill failed");
    let status = console.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        console.text()
    );
    assert!(
        console.text().contains("stopped by SIGTERM"),
        "{}",
        console.text()
    );

    let header = std::fs::read(&overlay).unwrap();
    let features = u64::from_be_bytes(
        header[INCOMPATIBLE_FEATURES_OFFSET..INCOMPATIBLE_FEATURES_OFFSET + 8]
            .try_into()
            .unwrap(),
    );
    assert_eq!(features & 1, 0, "SIGTERM left the overlay marked dirty");
    let (code, report) = common::qemu_check(&overlay);
    assert_eq!(code, 0, "qemu-img check after SIGTERM:\n{report}");
}
