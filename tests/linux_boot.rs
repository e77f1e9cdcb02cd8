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

use common::console::{guest_dir, Console};

/// Maximum wait for the init line. A boot takes minutes on this emulator under load.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// Maximum wait for a command's output once the shell runs.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn debian_kernel_boots_to_shell() {
    if cfg!(debug_assertions) {
        eprintln!("skipping: a Linux boot on the unoptimised emulator takes too long; run `cargo test --release`");
        return;
    }
    let dir = match guest_dir(&["vmlinuz", "initramfs.img"]) {
        Ok(dir) => dir,
        Err(reason) => {
            eprintln!("skipping: {reason}");
            return;
        }
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
