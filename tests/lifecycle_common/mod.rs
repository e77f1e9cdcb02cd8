//! Helpers shared by the integration tests that drive the real `monstervm` binary.
//!
//! Unless a test requests real VMs, the VMM processes these tests start build the
//! lifecycle TEST DOUBLE VM (see `src/cli/vmm/test_double.rs`): its vCPUs idle until
//! kicked and its serial port echoes input. Everything else, from the CLI to the VMM
//! process and its API, is the product.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Upper bound for conditions the tests wait for; reaching it means the feature is broken.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Makes this test process the reaper of orphaned descendants, so that VMMs (whose
/// parent `start` exits at once) are reparented here and can be waited for.
fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: PR_SET_CHILD_SUBREAPER only sets a flag on this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(rc, 0, "prctl(PR_SET_CHILD_SUBREAPER) failed");
    });
}

/// A state directory in a temporary folder. Dropping it kills any VMM still running.
pub struct StateDir {
    pub dir: tempfile::TempDir,
    /// When false, VMMs build the test-double VM instead of booting the configured guest.
    real_vms: bool,
}

impl StateDir {
    /// Creates a state directory whose VMMs build the test-double VM.
    pub fn new() -> StateDir {
        become_subreaper();
        StateDir {
            dir: tempfile::Builder::new()
                .prefix("mvm")
                .tempdir()
                .expect("create temporary state directory"),
            real_vms: false,
        }
    }

    /// Creates a state directory whose VMMs boot the configured guest for real.
    pub fn with_real_vms() -> StateDir {
        let mut state = StateDir::new();
        state.real_vms = true;
        state
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.path().join("vms").join(name)
    }

    /// Returns `monstervm` with this state directory, and the test-double VM selected unless
    /// the directory was made by [`StateDir::with_real_vms`].
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_monstervm"));
        command
            .env("MONSTERVM_STATE_DIR", self.path())
            .env_remove("MONSTERVM_API_LISTEN")
            .env_remove("MONSTERVM_API_TOKEN")
            .env_remove("RUST_LOG");
        if self.real_vms {
            command.env_remove("MONSTERVM_TEST_DOUBLE_VM");
        } else {
            command.env("MONSTERVM_TEST_DOUBLE_VM", "1");
        }
        command
    }

    /// Runs `monstervm ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run monstervm")
    }

    /// Runs `monstervm ARGS` and fails the test unless it exits with 0.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "monstervm {args:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Runs `monstervm ARGS --output json` and parses its output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&args)).expect("JSON output")
    }

    /// Returns the `list --output json` entry of VM `name`.
    pub fn status(&self, name: &str) -> serde_json::Value {
        let list = self.json(&["list"]);
        list.as_array()
            .expect("list prints an array")
            .iter()
            .find(|vm| vm["name"] == name)
            .unwrap_or_else(|| panic!("VM {name} missing from {list}"))
            .clone()
    }

    /// Creates and starts VM `name`; returns its VMM's process ID.
    pub fn start_vm(&self, name: &str, extra: &[&str]) -> i32 {
        self.ok(&["create", name, "--memory", "16"]);
        let mut args = vec!["start", name];
        args.extend(extra);
        let started = self.json(&args);
        started["pid"].as_i64().expect("start prints the pid") as i32
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("api.sock")
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let Ok(vms) = std::fs::read_dir(self.path().join("vms")) else {
            return;
        };
        for vm in vms.flatten() {
            if let Some(pid) = std::fs::read_to_string(vm.path().join("pid"))
                .ok()
                .and_then(|text| text.trim().parse::<i32>().ok())
            {
                // SAFETY: kill has no memory-safety preconditions. The pid belongs to a
                // VMM this test started, reparented to this process, so it is not reused
                // until reaped below.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                reap(pid);
            }
        }
    }
}

/// Waits for child `pid` to exit and returns its raw wait status, or `None` if it is not
/// a child of this process (already reaped).
pub fn reap(pid: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waitpid writes only into `status`.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    (rc == pid).then_some(status)
}

/// Returns true while process `pid` exists (zombies included).
pub fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Polls `condition` until it is true; fails the test after [`PATIENCE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Returns the number of open descriptors of process `pid`.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the VMM's descriptors")
        .count()
}
