//! `monstervm shell` fed through a pipe: each line runs as the same command would on the
//! command line, and the shell exits at end of input with the last command's status.

mod lifecycle_common;

use std::io::Write;
use std::process::{Output, Stdio};

use lifecycle_common::{reap, StateDir};

/// Runs `monstervm [GLOBALS] shell` with `input` on its stdin.
fn shell(state: &StateDir, globals: &[&str], input: &str) -> Output {
    let mut child = state
        .command()
        .args(globals)
        .arg("shell")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn monstervm shell");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .expect("write the shell's input");
    child.wait_with_output().expect("wait for monstervm shell")
}

#[test]
fn pipe_runs_lines_in_order() {
    let state = StateDir::new();
    let pid = state.start_vm("web", &[]);

    let output = shell(
        &state,
        &[],
        "create db --memory 16\n\n  list\npause web\nstop --bogus web\ninspect 'db'\nstop web\n",
    );

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Created VM db in"), "{stdout}");
    let list = stdout.lines().skip_while(|line| !line.starts_with("NAME"));
    let rows: Vec<&str> = list.take(3).collect();
    assert!(rows[1].starts_with("db "), "{stdout}");
    assert!(
        rows[2].starts_with("web ") && rows[2].contains("running"),
        "{stdout}"
    );
    assert!(stdout.contains("VM web is paused"), "{stdout}");
    assert!(stderr.contains("unexpected argument '--bogus'"), "{stderr}");
    assert!(stdout.contains("memory:      16 MiB"), "{stdout}");
    assert!(stdout.contains("Stopped VM web"), "{stdout}");
    assert!(stdout.find("Created VM db") < stdout.find("Stopped VM web"));
    reap(pid);
    assert_eq!(state.status("web")["state"], "stopped");
    assert!(
        !state.path().join("shell_history").exists(),
        "a piped session must not write history"
    );
}

#[test]
fn exit_status_is_last_command() {
    let state = StateDir::new();

    let missing = shell(&state, &[], "list\ninspect ghost\n");
    assert_eq!(missing.status.code(), Some(3), "inspect of a missing VM");

    let usage = shell(&state, &[], "list --bogus\n");
    assert_eq!(usage.status.code(), Some(2));

    let explicit = shell(&state, &[], "inspect ghost\nexit 7\nlist\n");
    assert_eq!(explicit.status.code(), Some(7), "exit ends the shell");
    assert!(explicit.stdout.is_empty(), "list ran after exit");

    let nested = shell(&state, &[], "shell\n");
    assert_eq!(nested.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&nested.stderr);
    assert!(stderr.contains("already in monstervm shell"), "{stderr}");
}

#[test]
fn shell_options_reach_commands() {
    let state = StateDir::new();
    state.ok(&["create", "web", "--memory", "16"]);
    let other = tempfile::tempdir().unwrap();

    let json = shell(&state, &["--output", "json"], "list\nlist --output table\n");
    let stdout = String::from_utf8_lossy(&json.stdout);
    assert!(json.status.success(), "{stdout}");
    let (first, second) = stdout.split_at(stdout.find("NAME").expect("table output"));
    let list: serde_json::Value = serde_json::from_str(first).expect("JSON from the first list");
    assert_eq!(list[0]["name"], "web");
    assert!(second.contains("web"), "{second}");

    let elsewhere = shell(
        &state,
        &["--state-dir", other.path().to_str().unwrap()],
        "list --output json\n",
    );
    let stdout = String::from_utf8_lossy(&elsewhere.stdout);
    assert_eq!(stdout.trim(), "[]", "--state-dir of the shell was not used");
}

#[test]
fn help_lists_commands_and_builtins() {
    let state = StateDir::new();

    let output = shell(&state, &[], "help\nhelp stop\n");

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("Shell commands:"), "{stdout}");
    assert!(stdout.contains("console"), "{stdout}");
    assert!(stdout.contains("Usage: monstervm stop"), "{stdout}");
    assert!(stdout.contains("--force"), "{stdout}");
}
