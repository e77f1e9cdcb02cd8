//! Boots Debian's stock cloud kernel with the BusyBox initramfs from `monstervm guest
//! fetch` on the emulator backend, types commands into the serial console and powers the
//! guest off, exactly as a user does from the README.
//!
//! The guest comes from `MONSTERVM_GUEST_DIR`, `./guest` (where the README and `.ci/run`
//! fetch it) or `target/guest`, where the test fetches it once if neither exists.
//! The test skips, saying why, in debug builds (the unoptimised emulator needs many
//! minutes for a boot; run `cargo test --release`) and where apt-get cannot download the
//! kernel.

mod common;

use std::time::{Duration, Instant};

use common::console::{guest_for_boot_test, Console};
use monstervm::guest::cpio::read_archive;

/// Maximum wait for the init line. A boot takes minutes on this emulator under load.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// Maximum wait for a command's output once the shell runs.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn debian_kernel_boots_to_shell() {
    let Some(dir) = guest_for_boot_test(&["vmlinuz", "initramfs.img"]) else {
        return;
    };
    let mut console = Console::start::<&str>(&dir, &[]);

    let booted = Instant::now();
    let mut position = console.wait_for("MONSTERVM-INIT uptime=", 0, BOOT_TIMEOUT);
    eprintln!("init reached after {:.1} s", booted.elapsed().as_secs_f64());
    position = console.wait_for("# ", position, COMMAND_TIMEOUT);

    console.send("uname -r\n");
    position = console.wait_for("-cloud-amd64", position, COMMAND_TIMEOUT);

    // The shell computes 6*7, so seeing 42 proves a shell ran the line, not a terminal echo.
    console.send("echo monstervm-$((6*7))\n");
    position = console.wait_for("monstervm-42", position, COMMAND_TIMEOUT);

    console.power_off(position, COMMAND_TIMEOUT);
}

/// Exit status of `run` after the guest kernel reports a panic through pvpanic.
const EXIT_GUEST_PANIC: i32 = 6;

#[test]
fn kernel_panic_ends_run() {
    let Some(dir) = guest_for_boot_test(&["vmlinuz", "initramfs.img"]) else {
        return;
    };
    let initramfs = dir.join("initramfs.img");
    let archive = std::fs::read(&initramfs).unwrap();
    let has_driver = read_archive(&archive)
        .map(|entries| {
            entries
                .iter()
                .any(|entry| entry.path.ends_with("/pvpanic-mmio.ko"))
        })
        .unwrap_or(false);
    if !has_driver {
        eprintln!(
            "skipping: {} has no pvpanic-mmio.ko, so it predates the pvpanic device; run `monstervm guest fetch` again",
            initramfs.display()
        );
        return;
    }
    let mut console = Console::start::<&str>(&dir, &[]);

    let mut position = console.wait_for("MONSTERVM-INIT uptime=", 0, BOOT_TIMEOUT);
    position = console.wait_for("# ", position, COMMAND_TIMEOUT);
    // sysrq-c panics the kernel. The default command line has panic=-1, so the kernel
    // reboots at once; only the pvpanic event tells this apart from a requested reboot.
    console.send("echo c > /proc/sysrq-trigger\n");
    console.wait_for(
        "monstervm: the guest kernel panicked",
        position,
        COMMAND_TIMEOUT,
    );
    let status = console.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(EXIT_GUEST_PANIC),
        "output:\n{}",
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
/// Slow: the boot takes about 10 s of CPU time on the emulator, more under load.
#[test]
fn debian_kernel_powers_off_on_stop() {
    check_stop_powers_off(
        &["vmlinuz", "initramfs.img"],
        None,
        "MONSTERVM-INIT Ctrl-Alt-Del received, powering off",
    );
}

/// The same with the root on a qcow2 overlay of `rootfs.img`: the root disk's own init
/// must power off on Ctrl-Alt-Del too, and leave the overlay clean for `qemu-img check`.
#[test]
fn root_disk_powers_off_on_stop() {
    let Some(dir) = guest_for_boot_test(&["vmlinuz", "initramfs.img", "rootfs.img"]) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let overlay = work.path().join("overlay.qcow2");
    let base = dir.join("rootfs.img");
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&overlay)
        .status()
        .expect("run qemu-img (Debian package qemu-utils)");
    assert!(created.success());

    check_stop_powers_off(
        &["vmlinuz", "initramfs.img", "rootfs.img"],
        Some(&overlay),
        "MONSTERVM-ROOT Ctrl-Alt-Del received, powering off",
    );
    let check = std::process::Command::new("qemu-img")
        .arg("check")
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// Starts the guest in `files` (with `disk` as its root disk if given), waits for its
/// shell, stops it, and checks that it powered off by itself, printing `expected`.
fn check_stop_powers_off(files: &[&str], disk: Option<&std::path::Path>, expected: &str) {
    let Some(dir) = guest_for_boot_test(files) else {
        return;
    };
    let state = lifecycle_common::StateDir::with_real_vms();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.img");
    let mut create = vec![
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
    ];
    if let Some(disk) = disk {
        create.extend(["--disk", disk.to_str().unwrap()]);
    }
    state.ok(&create);
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
        serial.contains(expected),
        "init did not run its Ctrl-Alt-Del action:\n{serial}"
    );
    let vmm_log = std::fs::read_to_string(state.vm_dir("linux").join("vmm.log")).unwrap();
    assert!(vmm_log.contains("the guest powered off"), "{vmm_log}");
}
