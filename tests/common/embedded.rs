//! Runs of the embedded guest (`monstervm run` without `--kernel`), which prints a banner
//! from long mode and then echoes its serial input until it reads `q`.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

/// Text of the embedded guest's banner line.
pub const BANNER: &str = "Welcome";

/// Starts `monstervm run --backend emulator` with `args`, and stdin, stdout and stderr
/// piped.
pub fn spawn_embedded<S: AsRef<OsStr>>(args: &[S]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_monstervm"))
        .args(["run", "--backend", "emulator"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start monstervm run")
}

/// Reads the child's stdout until the banner, which the guest prints after every disk is
/// open, and returns the rest of stdout. Panics with the child's stderr if stdout ends
/// first.
pub fn wait_for_banner(child: &mut Child) -> BufReader<ChildStdout> {
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdout.read_line(&mut line).unwrap();
        if n == 0 {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            panic!("monstervm run ended before the guest's banner: {stderr}");
        }
        if line.contains(BANNER) {
            return stdout;
        }
    }
}

/// Returns whether qemu-img runs here; prints why a test skips where it does not.
pub fn qemu_img_available() -> bool {
    match Command::new("qemu-img").arg("--version").output() {
        Ok(output) => output.status.success(),
        Err(e) => {
            eprintln!("skipping: qemu-img is not available ({e}); install qemu-utils");
            false
        }
    }
}

/// Creates a qcow2 image of `size` (as qemu-img takes it, "64M") at `path`, over the raw
/// image `backing` if given.
pub fn create_qcow2(path: &Path, size: &str, backing: Option<&Path>) {
    let mut command = Command::new("qemu-img");
    command.args(["create", "-q", "-f", "qcow2"]);
    if let Some(backing) = backing {
        command.args(["-F", "raw", "-b"]).arg(backing);
    }
    let status = command.arg(path).arg(size).status().unwrap();
    assert!(
        status.success(),
        "qemu-img create {} failed",
        path.display()
    );
}
