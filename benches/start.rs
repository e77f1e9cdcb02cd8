//! Time from `monstervm start` to the VM's first API response, and the VMM's resident memory
//! beyond guest RAM, beside QEMU (`-M microvm`, time to the first QMP response), in one run.
//!
//! ```text
//! scripts/qemu-reference.sh      # QEMU 7.2 beside the machine's qemu-img
//! cargo bench --bench start
//! ```
//!
//! MonsterVM boots its embedded guest on the emulator backend. QEMU boots no guest code
//! before it answers QMP (its firmware starts after the monitor is up), so both figures
//! measure the VMM's own start-up: process spawn, memory, devices and the control socket.
//! `MONSTERVM_BENCH_RUNS` sets the number of runs (default 10); medians are printed.
//! `MONSTERVM_BENCH_BIN` measures another `monstervm` executable in place of the one that
//! Cargo built for the bench, such as the `dist` build or an older commit's build.
//!
//! MonsterVM gets two figures. `monstervm start` covers the client, the spawn of the VMM
//! and the build of the VM, until the API reports it running. The VMM alone (`monstervm
//! vmm NAME`, spawned by the bench) covers the interval that Firecracker's and QEMU's
//! figures cover: from spawning the process to its first API response.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{median, vmm_rss_kib};

const MEMORY_MIB: u64 = 64;
const REFERENCE_QEMU: &str = "/opt/monstervm/qemu-reference/usr/bin/qemu-system-x86_64";

fn main() {
    let runs: usize = std::env::var("MONSTERVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let work = tempfile::tempdir().expect("create a temporary folder");

    let mut ours = Vec::new();
    let mut ours_rss = Vec::new();
    for run in 0..runs {
        let (seconds, rss) = start_monstervm(work.path(), run);
        ours.push(seconds);
        ours_rss.push(rss as f64);
    }
    println!("| engine | start to API answer (median of {runs}) | VMM RSS beyond guest RAM |");
    println!("| --- | --- | --- |");
    let ours_time = median(&mut ours);
    let ours_memory = median(&mut ours_rss);
    println!(
        "| MonsterVM `start` to running (emulator, embedded guest) | {:.1} ms | {:.1} MiB |",
        ours_time * 1e3,
        ours_memory / 1024.0
    );
    let mut spawned = Vec::new();
    let mut spawned_rss = Vec::new();
    for run in 0..runs {
        let (seconds, rss) = spawn_vmm(work.path(), run);
        spawned.push(seconds);
        spawned_rss.push(rss as f64);
    }
    let spawned_time = median(&mut spawned);
    println!(
        "| MonsterVM VMM spawn to first API response | {:.2} ms | {:.1} MiB |",
        spawned_time * 1e3,
        median(&mut spawned_rss) / 1024.0
    );

    let Some(qemu) = find_qemu() else {
        println!("QEMU not found: run scripts/qemu-reference.sh or set QEMU_SYSTEM");
        return;
    };
    let mut theirs = Vec::new();
    let mut theirs_rss = Vec::new();
    for run in 0..runs {
        let (seconds, rss) = start_qemu(&qemu, work.path(), run);
        theirs.push(seconds);
        theirs_rss.push(rss as f64);
    }
    let theirs_time = median(&mut theirs);
    let theirs_memory = median(&mut theirs_rss);
    println!(
        "| QEMU -M microvm (QMP) | {:.1} ms | {:.1} MiB |",
        theirs_time * 1e3,
        theirs_memory / 1024.0
    );
    println!();
    println!(
        "start time ratio MonsterVM / QEMU: {:.2} (`start` to running), {:.2} (VMM spawn to API)",
        ours_time / theirs_time,
        spawned_time / theirs_time
    );
    println!(
        "VMM memory ratio MonsterVM / QEMU: {:.2}",
        ours_memory / theirs_memory
    );
}

/// Returns the `monstervm` executable to measure: `MONSTERVM_BENCH_BIN`, or the bench's own.
fn monstervm_bin() -> PathBuf {
    std::env::var_os("MONSTERVM_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_monstervm")))
}

/// Creates and starts a VM, returns the seconds `start` took (it returns once the API
/// responds) and the VMM's RSS beyond guest RAM, then stops and deletes the VM.
fn start_monstervm(work: &Path, run: usize) -> (f64, u64) {
    let state = work.join("state");
    let name = format!("bench{run}");
    let monstervm = |args: &[&str]| {
        let output = Command::new(monstervm_bin())
            .env("MONSTERVM_STATE_DIR", &state)
            .args(args)
            .output()
            .expect("run monstervm");
        assert!(
            output.status.success(),
            "monstervm {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let memory = MEMORY_MIB.to_string();
    monstervm(&[
        "create",
        &name,
        "--backend",
        "emulator",
        "--memory",
        &memory,
    ]);

    let started = Instant::now();
    let output = monstervm(&["--output", "json", "start", &name]);
    let seconds = started.elapsed().as_secs_f64();
    let pid = serde_json::from_str::<serde_json::Value>(&output).expect("start prints JSON")["pid"]
        .as_u64()
        .expect("start prints the pid") as u32;
    let rss = vmm_rss_kib(pid, MEMORY_MIB << 10);

    monstervm(&["stop", "--force", &name]);
    monstervm(&["delete", &name]);
    (seconds, rss)
}

/// Spawns `monstervm vmm NAME` directly, returns the seconds until `GET /vm` first
/// responds and the VMM's RSS beyond guest RAM at that moment, then kills it.
fn spawn_vmm(work: &Path, run: usize) -> (f64, u64) {
    let state = work.join("state");
    let name = format!("spawn{run}");
    let memory = MEMORY_MIB.to_string();
    let monstervm = |args: &[&str]| {
        let status = Command::new(monstervm_bin())
            .env("MONSTERVM_STATE_DIR", &state)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("run monstervm");
        assert!(status.success(), "monstervm {args:?} failed with {status}");
    };
    monstervm(&[
        "create",
        &name,
        "--backend",
        "emulator",
        "--memory",
        &memory,
    ]);
    let socket = state.join("vms").join(&name).join("api.sock");

    let started = Instant::now();
    let mut child = Command::new(monstervm_bin())
        .env("MONSTERVM_STATE_DIR", &state)
        .args(["vmm", &name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the VMM");
    loop {
        if let Some(status) = api_status(&socket) {
            assert!(status.contains(" 200 "), "GET /vm: {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the VMM API never responded"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let seconds = started.elapsed().as_secs_f64();
    let rss = vmm_rss_kib(child.id(), MEMORY_MIB << 10);

    let _ = child.kill();
    let _ = child.wait();
    monstervm(&["delete", "--force", &name]);
    (seconds, rss)
}

/// Sends `GET /vm` to the API socket; returns the response's status line, or `None` while
/// nothing listens.
fn api_status(socket: &Path) -> Option<String> {
    let stream = UnixStream::connect(socket).ok()?;
    (&stream)
        .write_all(b"GET /vm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).ok()?;
    (!line.is_empty()).then_some(line)
}

/// Starts QEMU with a QMP socket, returns the seconds until QMP responds to
/// `qmp_capabilities` and QEMU's RSS beyond guest RAM, then kills it.
fn start_qemu(qemu: &Path, work: &Path, run: usize) -> (f64, u64) {
    let socket = work.join(format!("qmp{run}.sock"));
    let mut command = Command::new(qemu);
    if qemu == Path::new(REFERENCE_QEMU) {
        command.args(["-L", "/opt/monstervm/qemu-reference/usr/share/qemu"]);
    }
    let started = Instant::now();
    let mut child = command
        .args(["-M", "microvm", "-accel", "tcg", "-m"])
        .arg(MEMORY_MIB.to_string())
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start QEMU");
    let stream = loop {
        if let Ok(stream) = UnixStream::connect(&socket) {
            break stream;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "QMP never answered"
        );
        std::thread::sleep(Duration::from_micros(200));
    };
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).expect("QMP greeting");
    (&stream)
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    reader
        .read_line(&mut line)
        .expect("QMP response to qmp_capabilities");
    let seconds = started.elapsed().as_secs_f64();
    let rss = vmm_rss_kib(child.id(), MEMORY_MIB << 10);
    let _ = child.kill();
    let _ = child.wait();
    (seconds, rss)
}

fn find_qemu() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("QEMU_SYSTEM") {
        return Some(PathBuf::from(path));
    }
    Path::new(REFERENCE_QEMU)
        .is_file()
        .then(|| PathBuf::from(REFERENCE_QEMU))
}
