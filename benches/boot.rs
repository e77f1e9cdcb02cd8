//! Linux boot to the init line, MonsterVM's emulator beside QEMU's TCG, in one run.
//!
//! ```text
//! cargo run --release -- guest fetch       # guest/vmlinuz and guest/initramfs.img
//! scripts/qemu-reference.sh                # QEMU 7.2 beside the machine's qemu-img
//! cargo bench --bench boot
//! ```
//!
//! Both engines boot the same kernel, initramfs, command line and memory size, with the
//! serial console on a pipe. The clock runs from spawning the process to the
//! `MONSTERVM-INIT` line that the initramfs prints. Resident memory beyond guest RAM is
//! read from /proc/PID/smaps at that moment: the process's total RSS minus the RSS of its
//! guest RAM mapping. MonsterVM then powers the guest off, and its exit log gives the
//! instructions retired, for the boot's MIPS.
//!
//! Environment: `MONSTERVM_BENCH_RUNS` (default 3), `MONSTERVM_GUEST_DIR` (default
//! `guest`), `QEMU_SYSTEM` (default the reference QEMU, then `qemu-system-x86_64` on PATH).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::{median, vmm_rss_kib};

const MEMORY_MIB: u64 = 256;
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 tsc=reliable";
const INIT_LINE: &str = "MONSTERVM-INIT";
const TIMEOUT: Duration = Duration::from_secs(1200);
const REFERENCE_QEMU: &str = "/opt/monstervm/qemu-reference/usr/bin/qemu-system-x86_64";

/// One boot's figures.
struct Boot {
    seconds: f64,
    vmm_rss_kib: u64,
    /// Instructions retired, from MonsterVM's exit log.
    instructions: Option<u64>,
}

fn main() {
    // `cargo bench` passes --bench; this harness takes no arguments.
    let runs: usize = std::env::var("MONSTERVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let guest = std::env::var_os("MONSTERVM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("guest"));
    let kernel = guest.join("vmlinuz");
    let initrd = guest.join("initramfs.img");
    if !kernel.is_file() || !initrd.is_file() {
        eprintln!(
            "no guest in {}: run `cargo run --release -- guest fetch` first",
            guest.display()
        );
        std::process::exit(1);
    }
    let qemu = find_qemu();

    println!("machine: {} cores, {}", cores(), cpu_model());
    println!(
        "guest: {} + {}, {MEMORY_MIB} MiB, cmdline {CMDLINE:?}",
        kernel.display(),
        initrd.display()
    );
    let mut monstervm_boots = Vec::new();
    let mut qemu_boots = Vec::new();
    for run in 1..=runs {
        let boot = boot_monstervm(&kernel, &initrd);
        println!(
            "run {run}: monstervm emulator {:.2} s, VMM RSS beyond guest RAM {} KiB, {} instructions",
            boot.seconds,
            boot.vmm_rss_kib,
            boot.instructions.map_or("?".to_string(), |n| n.to_string())
        );
        monstervm_boots.push(boot);
        if let Some(qemu) = &qemu {
            let boot = boot_qemu(qemu, &kernel, &initrd);
            println!(
                "run {run}: qemu tcg {:.2} s, VMM RSS beyond guest RAM {} KiB",
                boot.seconds, boot.vmm_rss_kib
            );
            qemu_boots.push(boot);
        }
    }

    let ours = median(
        &mut monstervm_boots
            .iter()
            .map(|b| b.seconds)
            .collect::<Vec<_>>(),
    );
    let our_rss = median(
        &mut monstervm_boots
            .iter()
            .map(|b| b.vmm_rss_kib as f64)
            .collect::<Vec<_>>(),
    );
    println!();
    println!("| engine | boot to init (median of {runs}) | VMM RSS beyond guest RAM |");
    println!("| --- | --- | --- |");
    println!(
        "| MonsterVM emulator | {ours:.2} s | {:.1} MiB |",
        our_rss / 1024.0
    );
    if !qemu_boots.is_empty() {
        let theirs = median(&mut qemu_boots.iter().map(|b| b.seconds).collect::<Vec<_>>());
        let their_rss = median(
            &mut qemu_boots
                .iter()
                .map(|b| b.vmm_rss_kib as f64)
                .collect::<Vec<_>>(),
        );
        println!(
            "| QEMU TCG (-M microvm) | {theirs:.2} s | {:.1} MiB |",
            their_rss / 1024.0
        );
        println!();
        println!("boot time ratio MonsterVM / QEMU: {:.2}", ours / theirs);
        println!(
            "VMM memory ratio MonsterVM / QEMU: {:.2}",
            our_rss / their_rss
        );
    } else {
        println!("QEMU not found: run scripts/qemu-reference.sh or set QEMU_SYSTEM");
    }
    let mut mips: Vec<f64> = monstervm_boots
        .iter()
        .filter_map(|b| b.instructions.map(|n| n as f64 / b.seconds / 1e6))
        .collect();
    if !mips.is_empty() {
        println!(
            "emulator speed over the boot: {:.1} MIPS (median)",
            median(&mut mips)
        );
    }
}

fn find_qemu() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("QEMU_SYSTEM") {
        return Some(PathBuf::from(path));
    }
    if Path::new(REFERENCE_QEMU).is_file() {
        return Some(PathBuf::from(REFERENCE_QEMU));
    }
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("qemu-system-x86_64"))
}

fn boot_monstervm(kernel: &Path, initrd: &Path) -> Boot {
    let mut command = Command::new(env!("CARGO_BIN_EXE_monstervm"));
    command
        .args([
            "--log-level",
            "info",
            "run",
            "--backend",
            "emulator",
            "--memory",
        ])
        .arg(MEMORY_MIB.to_string())
        .args(["--cmdline", CMDLINE, "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd);
    let (seconds, vmm_rss_kib, mut stdin, mut child, stderr) = boot_to_init(command);

    let _ = stdin.write_all(b"poweroff -f\n");
    let _ = stdin.flush();
    let mut log = String::new();
    let _ = child.wait();
    let _ = BufReader::new(stderr).read_to_string(&mut log);
    let instructions = log
        .lines()
        .find(|line| line.contains("vCPU counters at exit"))
        .and_then(|line| line.split("instructions=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    Boot {
        seconds,
        vmm_rss_kib,
        instructions,
    }
}

fn boot_qemu(qemu: &Path, kernel: &Path, initrd: &Path) -> Boot {
    let mut command = Command::new(qemu);
    if qemu == Path::new(REFERENCE_QEMU) {
        command.args(["-L", "/opt/monstervm/qemu-reference/usr/share/qemu"]);
        command.args(["-L", "/opt/monstervm/qemu-reference/usr/share/seabios"]);
    }
    command
        .args(["-M", "microvm", "-accel", "tcg", "-m"])
        .arg(MEMORY_MIB.to_string())
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-append", CMDLINE, "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd);
    let (seconds, vmm_rss_kib, _stdin, mut child, _stderr) = boot_to_init(command);
    let _ = child.kill();
    let _ = child.wait();
    Boot {
        seconds,
        vmm_rss_kib,
        instructions: None,
    }
}

/// Spawns `command`, waits for the init line on stdout and measures the process then.
fn boot_to_init(
    mut command: Command,
) -> (
    f64,
    u64,
    std::process::ChildStdin,
    std::process::Child,
    std::process::ChildStderr,
) {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start the engine");
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();

    let (found_tx, found_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        let mut sent = false;
        // Keep draining after the init line so the engine never blocks on a full pipe.
        while reader
            .read_until(b'\n', &mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            if !sent && String::from_utf8_lossy(&line).contains(INIT_LINE) {
                let _ = found_tx.send(());
                sent = true;
            }
            line.clear();
        }
    });
    if found_rx.recv_timeout(TIMEOUT).is_err() {
        let _ = child.kill();
        panic!("no {INIT_LINE} line within {TIMEOUT:?}");
    }
    let seconds = started.elapsed().as_secs_f64();
    let rss = vmm_rss_kib(child.id(), MEMORY_MIB << 10);
    (seconds, rss, stdin, child, stderr)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}
