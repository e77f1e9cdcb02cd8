//! `monstervm top` and `monstervm shell` on a real terminal: tmux runs them, `send-keys`
//! types and `capture-pane` reads the screen.
//!
//! Each test skips, saying why, where tmux is not installed, and fails instead when the
//! `CI` environment variable is set, because `.ci/run` installs tmux.

mod lifecycle_common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lifecycle_common::{reap, StateDir, PATIENCE};

/// A tmux server of its own (`tmux -L NAME`), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` in a detached 120x30 session; `None` when tmux is missing.
    fn start(test: &str, command: &str) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "tmux is not installed; .ci/run installs it"
            );
            eprintln!("skipping {test}: tmux is not installed (apt-get install -y tmux)");
            return None;
        }
        let tmux = Tmux {
            socket: format!("monstervm-{test}-{}", std::process::id()),
        };
        tmux.run(&["new-session", "-d", "-x", "120", "-y", "30", command]);
        Some(tmux)
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let output = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux");
        assert!(
            output.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn send_keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend(keys);
        self.run(&args);
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p"]).stdout).into_owned()
    }

    /// Waits until the screen satisfies `condition`; fails with the last screen after
    /// the tests' patience runs out.
    fn wait_for_screen(&self, what: &str, condition: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let screen = self.screen();
            if condition(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {what}; the screen shows:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Returns true while the session's program runs.
    fn session_alive(&self) -> bool {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("has-session")
            .output()
            .is_ok_and(|output| output.status.success())
    }

    fn wait_for_exit(&self, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        while self.session_alive() {
            assert!(Instant::now() < deadline, "{what} did not exit");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

/// Returns the shell command that runs `monstervm ARGS` against `state` in tmux. The
/// command sets its own variables, because tmux copies only some of the client's
/// environment into a session.
fn monstervm_command(state: &Path, args: &str) -> String {
    format!(
        "env MONSTERVM_STATE_DIR='{}' MONSTERVM_TEST_DOUBLE_VM=1 '{}' {args}",
        state.display(),
        env!("CARGO_BIN_EXE_monstervm")
    )
}

#[test]
fn top_shows_running_vm() {
    let state = StateDir::new();
    let pid = state.start_vm("web", &[]);
    state.ok(&["create", "idle", "--memory", "16"]);
    let Some(tmux) = Tmux::start("top", &monstervm_command(state.path(), "top")) else {
        return;
    };

    let screen = tmux.wait_for_screen("the row of VM web", |screen| {
        screen
            .lines()
            .any(|line| line.contains("web") && line.contains("running"))
    });
    assert!(screen.contains("NAME"), "{screen}");
    assert!(screen.contains("q quit"), "help line missing:\n{screen}");
    let idle = screen.lines().find(|line| line.contains("idle"));
    assert!(
        idle.is_some_and(|line| line.starts_with("> ") && line.contains("stopped")),
        "the first VM is not selected:\n{screen}"
    );

    // Select web and pause it through the dashboard.
    tmux.send_keys(&["j"]);
    tmux.wait_for_screen("web selected", |screen| {
        screen.lines().any(|line| line.starts_with("> web"))
    });
    tmux.send_keys(&["p"]);
    tmux.wait_for_screen("web paused", |screen| {
        screen
            .lines()
            .any(|line| line.starts_with("> web") && line.contains("paused"))
    });
    assert_eq!(state.status("web")["state"], "paused");

    tmux.send_keys(&["p"]);
    tmux.wait_for_screen("web resumed", |screen| {
        screen
            .lines()
            .any(|line| line.starts_with("> web") && line.contains("running"))
    });

    // Attach to the console, type into the guest, see its echo, and return with Ctrl-].
    tmux.send_keys(&["a"]);
    tmux.wait_for_screen("the console", |screen| {
        screen.contains("Connected to VM web")
    });
    tmux.send_keys(&["hello-guest"]);
    tmux.wait_for_screen("the guest's echo", |screen| screen.contains("hello-guest"));
    tmux.send_keys(&["C-]"]);
    tmux.wait_for_screen("the dashboard after detaching", |screen| {
        screen.contains("detached from VM web")
    });
    tmux.wait_for_screen("the echo in the serial pane", |screen| {
        screen.contains("│hello-guest")
    });

    tmux.send_keys(&["q"]);
    tmux.wait_for_exit("monstervm top");
    state.ok(&["stop", "web"]);
    reap(pid);
}

#[test]
fn shell_completes_names() {
    let state = StateDir::new();
    state.ok(&["create", "webserver", "--memory", "16"]);
    let Some(tmux) = Tmux::start("shell", &monstervm_command(state.path(), "shell")) else {
        return;
    };
    // capture-pane drops trailing spaces, so a prompt shows as "monstervm>".
    tmux.wait_for_screen("the prompt", |screen| screen.contains("monstervm>"));

    tmux.send_keys(&["insp", "Tab"]);
    tmux.wait_for_screen("the completed command", |screen| {
        screen.contains("monstervm> inspect")
    });
    // "web" lands after the space that completion appended.
    tmux.send_keys(&["web", "Tab"]);
    tmux.wait_for_screen("the completed VM name", |screen| {
        screen.contains("monstervm> inspect webserver")
    });
    tmux.send_keys(&["Enter"]);
    let screen = tmux.wait_for_screen("the inspect output", |screen| {
        screen.contains("memory:") && screen.matches("monstervm>").count() == 2
    });
    assert!(screen.contains("name:        webserver"), "{screen}");

    // Ctrl-C ends a command that runs until interrupted, and the shell prompts again.
    tmux.send_keys(&["logs webserver --follow", "Enter"]);
    tmux.wait_for_screen("logs --follow to start", |screen| {
        screen.contains("monstervm> logs webserver --follow")
    });
    tmux.send_keys(&["C-c"]);
    tmux.wait_for_screen("the prompt after Ctrl-C", |screen| {
        screen.matches("monstervm>").count() == 3
    });
    assert!(tmux.session_alive(), "Ctrl-C ended the shell");

    // A line that starts with a space stays out of the history.
    tmux.send_keys(&[" list --output json", "Enter"]);
    tmux.wait_for_screen("the prompt after the JSON list", |screen| {
        let last = screen.lines().rfind(|line| !line.is_empty());
        screen.contains("\"memory_mib\": 16") && last == Some("monstervm>")
    });

    tmux.send_keys(&["C-d"]);
    tmux.wait_for_exit("monstervm shell");
    let history = std::fs::read_to_string(state.path().join("shell_history"))
        .expect("the shell saved its history");
    assert!(history.contains("inspect webserver"), "{history}");
    assert!(history.contains("logs webserver --follow"), "{history}");
    assert!(!history.contains("list --output json"), "{history}");
}

#[test]
fn top_survives_stopped_vmm() {
    let state = StateDir::new();
    let frozen = state.start_vm("frozen", &[]);
    let live = state.start_vm("live", &[]);
    // SAFETY: kill has no memory-safety preconditions; `frozen` is a VMM this test
    // started, reparented to this process and not yet reaped.
    unsafe { libc::kill(frozen, libc::SIGSTOP) };
    let Some(tmux) = Tmux::start("top-frozen", &monstervm_command(state.path(), "top")) else {
        // SAFETY: as above.
        unsafe { libc::kill(frozen, libc::SIGCONT) };
        return;
    };

    tmux.wait_for_screen("both rows", |screen| {
        let row = |name: &str, state: &str| {
            screen
                .lines()
                .any(|line| line.contains(name) && line.contains(state))
        };
        row("frozen", "unresponsive") && row("live", "running")
    });
    // The dashboard still takes keys while one VMM does not respond.
    tmux.send_keys(&["j", "p"]);
    tmux.wait_for_screen("live paused", |screen| {
        screen
            .lines()
            .any(|line| line.starts_with("> live") && line.contains("paused"))
    });

    tmux.send_keys(&["q"]);
    tmux.wait_for_exit("monstervm top");
    // SAFETY: as above.
    unsafe { libc::kill(frozen, libc::SIGCONT) };
    state.ok(&["stop", "frozen"]);
    state.ok(&["stop", "live"]);
    reap(frozen);
    reap(live);
}
