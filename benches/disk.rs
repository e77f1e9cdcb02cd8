//! MonsterVM's block layer beside `qemu-img bench` on the same images, in one run.
//!
//! ```text
//! cargo bench --bench disk
//! ```
//!
//! Every case creates its image with qemu-img in a temporary folder, runs MonsterVM's
//! `BlockBackend` over it in this process, then recreates the image and runs
//! `qemu-img bench` over it as a child process. Both engines get the same request size,
//! count, offsets, queue depth (1: `BlockBackend` serves one request at a time), cache mode
//! (page cache: buffered pread/pwrite against `-t writeback`) and write pattern byte.
//! Neither timing includes opening or closing the image or a final flush: qemu-img bench
//! times only its request loop, and so does this harness.
//!
//! `qemu-img bench` has no random pattern, so the "random" rows use one strided pattern for
//! both engines. Request k goes to offset `k * step mod size`, with a step of a prime number
//! of 4 KiB blocks. That walk visits 4 KiB blocks in a scattered order and never touches the
//! same cluster twice in a row. After each write case the two engines' images are compared with
//! `qemu-img compare`, so that a row only stands when both did the same work.
//!
//! The images live on tmpfs (`/dev/shm`) by default, so the figures measure the two block
//! layers over the page cache and not the writeback speed of a disk shared with other
//! jobs. qemu-img and MonsterVM's qcow2 backend fdatasync on close, outside the timed loop,
//! and on a slow disk that sync dominates the wall time of a run.
//!
//! Environment: `MONSTERVM_BENCH_RUNS` (runs per case, default 3; the table shows the
//! median), `MONSTERVM_BENCH_DIR` (folder for the images, default `/dev/shm` where it
//! exists, else the system temp folder), `QEMU_IMG` (default `qemu-img` on PATH).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use monstervm::storage::{open_image, ImageFormat, OpenOptions};

/// Virtual size of every image: 65,536 blocks of 4 KiB, 4,096 clusters of 64 KiB.
const IMAGE_SIZE: u64 = 256 << 20;
/// Byte written by write requests of both engines (qemu-img's `--pattern`).
const PATTERN: u8 = 0xa5;
/// Step of the strided "random" pattern in 4 KiB blocks. 10007 is prime, so it is coprime
/// to the 65,536 blocks of the image and the walk visits every block once before repeating.
const STRIDE_BLOCKS: u64 = 10007;

/// Starting state of an image before a run.
#[derive(Clone, Copy)]
enum ImageKind {
    /// Raw file with its blocks reserved by fallocate.
    Raw,
    /// qcow2 with no cluster allocated.
    FreshQcow2,
    /// qcow2 with every cluster allocated and its file blocks reserved by fallocate.
    AllocatedQcow2,
}

impl ImageKind {
    fn label(self) -> &'static str {
        match self {
            ImageKind::Raw => "raw",
            ImageKind::FreshQcow2 => "qcow2, fresh",
            ImageKind::AllocatedQcow2 => "qcow2, allocated",
        }
    }

    fn format(self) -> ImageFormat {
        match self {
            ImageKind::Raw => ImageFormat::Raw,
            ImageKind::FreshQcow2 | ImageKind::AllocatedQcow2 => ImageFormat::Qcow2,
        }
    }

    /// Returns the `qemu-img create -o` options that produce this starting state.
    fn create_options(self) -> Option<&'static str> {
        match self {
            ImageKind::Raw | ImageKind::AllocatedQcow2 => Some("preallocation=falloc"),
            ImageKind::FreshQcow2 => None,
        }
    }
}

/// One request stream, described with qemu-img bench's parameters.
#[derive(Clone, Copy)]
struct Workload {
    label: &'static str,
    pattern: &'static str,
    write: bool,
    /// Request size in bytes (`-s`).
    request: u64,
    /// Offset increment in bytes (`-S`).
    step: u64,
    /// Number of requests (`-c`).
    count: u64,
}

impl Workload {
    /// Returns the offset of every request in order, as qemu-img bench computes them:
    /// start at 0, add the step, wrap modulo the image size. Image size, step and request
    /// size are multiples of the request size, so no request crosses the end of the image.
    fn offsets(&self) -> impl Iterator<Item = u64> {
        let step = self.step;
        std::iter::successors(Some(0u64), move |offset| Some((offset + step) % IMAGE_SIZE))
            .take(self.count as usize)
    }
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        label: "4 KiB random read",
        pattern: "strided",
        write: false,
        request: 4096,
        step: STRIDE_BLOCKS * 4096,
        count: 20_000,
    },
    Workload {
        label: "4 KiB random write",
        pattern: "strided",
        write: true,
        request: 4096,
        step: STRIDE_BLOCKS * 4096,
        count: 20_000,
    },
    Workload {
        label: "64 KiB sequential read",
        pattern: "sequential",
        write: false,
        request: 65536,
        step: 65536,
        count: IMAGE_SIZE / 65536,
    },
    Workload {
        label: "64 KiB sequential write",
        pattern: "sequential",
        write: true,
        request: 65536,
        step: 65536,
        count: IMAGE_SIZE / 65536,
    },
];

const IMAGES: [ImageKind; 3] = [
    ImageKind::Raw,
    ImageKind::FreshQcow2,
    ImageKind::AllocatedQcow2,
];

/// Median figures of one case.
struct Row {
    image: ImageKind,
    workload: Workload,
    monstervm_seconds: f64,
    qemu_seconds: f64,
    /// Whether the two engines' images were identical after every write run.
    same_contents: bool,
}

fn main() {
    // `cargo bench` passes --bench; this harness takes no arguments.
    let runs: usize = std::env::var("MONSTERVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3);
    let qemu_img = std::env::var_os("QEMU_IMG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-img"));
    let parent = std::env::var_os("MONSTERVM_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(default_image_dir);
    let dir = tempfile::tempdir_in(&parent).unwrap_or_else(|e| {
        panic!(
            "cannot create a temporary folder in {}: {e}; set MONSTERVM_BENCH_DIR",
            parent.display()
        )
    });

    println!("machine: {} cores, {}", cores(), cpu_model());
    println!("qemu-img: {}", qemu_img_version(&qemu_img));
    println!(
        "images: {} MiB virtual, 64 KiB clusters, in {} ({})",
        IMAGE_SIZE >> 20,
        parent.display(),
        file_system_type(&parent)
    );
    println!("runs per case: {runs} (the table shows the median)");
    println!();

    let mut rows = Vec::new();
    for image in IMAGES {
        for workload in WORKLOADS {
            rows.push(run_case(&qemu_img, dir.path(), image, workload, runs));
        }
    }
    print_table(&rows);

    if rows.iter().any(|row| !row.same_contents) {
        eprintln!("the engines wrote different contents in the rows marked \"contents differ\"; the comparison is invalid");
        std::process::exit(1);
    }
}

fn run_case(qemu_img: &Path, dir: &Path, image: ImageKind, workload: Workload, runs: usize) -> Row {
    let ours_path = dir.join(format!("monstervm.{}", image.format()));
    let theirs_path = dir.join(format!("qemu.{}", image.format()));
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut same_contents = true;
    for run in 0..runs {
        create_image(qemu_img, &ours_path, image);
        create_image(qemu_img, &theirs_path, image);
        // Alternate which engine goes first, so that neither always finds the other's
        // dirty pages still being written back.
        if run % 2 == 0 {
            ours.push(run_monstervm(&ours_path, image.format(), workload));
            theirs.push(run_qemu_img(
                qemu_img,
                &theirs_path,
                image.format(),
                workload,
            ));
        } else {
            theirs.push(run_qemu_img(
                qemu_img,
                &theirs_path,
                image.format(),
                workload,
            ));
            ours.push(run_monstervm(&ours_path, image.format(), workload));
        }
        if workload.write && !images_match(qemu_img, &ours_path, &theirs_path, image.format()) {
            same_contents = false;
        }
        remove(&ours_path);
        remove(&theirs_path);
    }
    let row = Row {
        image,
        workload,
        monstervm_seconds: median(ours),
        qemu_seconds: median(theirs),
        same_contents,
    };
    eprintln!(
        "{} / {}: monstervm {:.3} s, qemu-img {:.3} s",
        image.label(),
        workload.label,
        row.monstervm_seconds,
        row.qemu_seconds
    );
    row
}

fn create_image(qemu_img: &Path, path: &Path, image: ImageKind) {
    let mut command = Command::new(qemu_img);
    command.args(["create", "-q", "-f", image.format().name()]);
    if let Some(options) = image.create_options() {
        command.args(["-o", options]);
    }
    command.arg(path).arg(IMAGE_SIZE.to_string());
    run_checked(&mut command);
}

/// Runs the workload through MonsterVM's backend and returns the seconds of its request
/// loop.
fn run_monstervm(path: &Path, format: ImageFormat, workload: Workload) -> f64 {
    let options = OpenOptions {
        format: Some(format),
        ..OpenOptions::default()
    };
    let backend = open_image(path, &options)
        .unwrap_or_else(|e| panic!("MonsterVM cannot open {}: {e}", path.display()));
    let mut buf = vec![PATTERN; workload.request as usize];
    let started = Instant::now();
    for offset in workload.offsets() {
        let result = if workload.write {
            backend.write_at(&buf, offset)
        } else {
            backend.read_at(&mut buf, offset)
        };
        if let Err(e) = result {
            panic!("MonsterVM request at offset {offset:#x} failed: {e}");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(backend);
    seconds
}

/// Runs the workload through `qemu-img bench` and returns the seconds it reports.
fn run_qemu_img(qemu_img: &Path, path: &Path, format: ImageFormat, workload: Workload) -> f64 {
    let mut command = Command::new(qemu_img);
    command
        .args([
            "bench",
            "-f",
            format.name(),
            "-t",
            "writeback",
            "-i",
            "threads",
        ])
        .args(["-d", "1", "-o", "0"])
        .args(["-c", &workload.count.to_string()])
        .args(["-s", &workload.request.to_string()])
        .args(["-S", &workload.step.to_string()]);
    if workload.write {
        command.args(["-w", "--pattern", &PATTERN.to_string()]);
    }
    command.arg(path);
    let stdout = run_checked(&mut command);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("Run completed in "))
        .and_then(|rest| rest.strip_suffix(" seconds."))
        .and_then(|seconds| seconds.parse().ok())
        .unwrap_or_else(|| {
            panic!("no \"Run completed in\" line in qemu-img bench output:\n{stdout}")
        })
}

/// Returns whether `qemu-img compare` finds the two images identical.
fn images_match(qemu_img: &Path, a: &Path, b: &Path, format: ImageFormat) -> bool {
    let status = Command::new(qemu_img)
        .args(["compare", "-q", "-f", format.name(), "-F", format.name()])
        .arg(a)
        .arg(b)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", qemu_img.display()));
    status.success()
}

/// Runs `command`, panics with its output if it fails, and returns its stdout.
fn run_checked(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    if !output.status.success() {
        panic!(
            "{command:?} failed with {}:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        panic!("cannot remove {}: {e}", path.display());
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "| image | workload | MonsterVM MiB/s | MonsterVM IOPS | qemu-img MiB/s | qemu-img IOPS | ratio |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        let workload = row.workload;
        let bytes = (workload.request * workload.count) as f64;
        let mib = |seconds: f64| bytes / seconds / f64::from(1 << 20);
        let iops = |seconds: f64| workload.count as f64 / seconds;
        let ratio = row.qemu_seconds / row.monstervm_seconds;
        let note = if row.same_contents {
            ""
        } else {
            " (contents differ)"
        };
        println!(
            "| {} | {} ({}) | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}{note} |",
            row.image.label(),
            workload.label,
            workload.pattern,
            mib(row.monstervm_seconds),
            iops(row.monstervm_seconds),
            mib(row.qemu_seconds),
            iops(row.qemu_seconds),
            ratio,
        );
    }
    println!();
    println!("ratio = MonsterVM throughput / qemu-img throughput; below 1.00 MonsterVM is slower.");
    println!(
        "strided = offset k * {STRIDE_BLOCKS} * 4 KiB mod {} MiB for request k, the same for both engines.",
        IMAGE_SIZE >> 20
    );
    let slower: Vec<String> = rows
        .iter()
        .filter(|row| row.qemu_seconds < row.monstervm_seconds)
        .map(|row| format!("{} / {}", row.image.label(), row.workload.label))
        .collect();
    if slower.is_empty() {
        println!("no case is slower than qemu-img");
    } else {
        println!("slower than qemu-img: {}", slower.join("; "));
    }
}

fn default_image_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
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

fn qemu_img_version(qemu_img: &Path) -> String {
    let stdout = run_checked(Command::new(qemu_img).arg("--version"));
    stdout.lines().next().unwrap_or("unknown").to_string()
}

/// Returns the file system type of `dir` as `stat -f` names it.
fn file_system_type(dir: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown file system".to_string())
}
