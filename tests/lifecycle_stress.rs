//! Twenty VMs booting the embedded guest, started, listed, stopped and deleted ten times
//! over, leave no VMM process, socket, file or descriptor behind.

mod lifecycle_common;

use lifecycle_common::{fd_count, reap, StateDir};

const VMS: usize = 20;
const ROUNDS: usize = 10;

/// Returns the pids of live (not zombie) processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let mentions = |bytes: &[u8]| String::from_utf8_lossy(bytes).contains(needle);
        if !cmdline.is_empty() && (mentions(&cmdline) || mentions(&environ)) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn twenty_vms_ten_rounds_leave_nothing() {
    let state = StateDir::with_real_vms();
    let state_path = state.path().to_string_lossy().into_owned();
    let own_fds = fd_count(std::process::id() as i32);
    let names: Vec<String> = (0..VMS).map(|i| format!("vm{i:02}")).collect();

    for round in 0..ROUNDS {
        let mut pids = Vec::new();
        for name in &names {
            state.ok(&["create", name, "--memory", "16", "--backend", "emulator"]);
            let started = state.json(&["start", name]);
            pids.push(started["pid"].as_i64().expect("start prints the pid") as i32);
        }

        let listed = state.json(&["list"]);
        let rows = listed.as_array().unwrap();
        assert_eq!(rows.len(), VMS, "round {round}: {listed}");
        for row in rows {
            assert_eq!(row["state"], "running", "round {round}: {row}");
            assert_eq!(row["backend"], "emulator", "round {round}: {row}");
        }

        for name in &names {
            state.ok(&["stop", name]);
        }
        for pid in pids {
            let status = reap(pid).expect("the VMM is reparented to the test");
            assert!(
                libc::WIFEXITED(status),
                "round {round}: VMM {pid} ended with {status:#x}"
            );
        }
        for name in &names {
            state.ok(&["delete", name]);
        }

        assert_eq!(
            state.json(&["list"]),
            serde_json::json!([]),
            "round {round}"
        );
        let left: Vec<_> = std::fs::read_dir(state.path().join("vms"))
            .map(|dir| dir.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "round {round}: left behind {left:?}");
        let live = processes_mentioning(&state_path);
        assert!(live.is_empty(), "round {round}: processes left {live:?}");
    }

    assert_eq!(
        fd_count(std::process::id() as i32),
        own_fds,
        "the test leaked descriptors"
    );
}
