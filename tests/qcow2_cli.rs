//! `monstervm disk` against qemu-img: the same exit codes, listings and images.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{qemu_check, qemu_img, qemu_io, Rng};

fn monstervm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_monstervm"))
        .arg("disk")
        .args(args)
        .output()
        .expect("run monstervm")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn be64(data: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(data[at..at + 8].try_into().unwrap())
}

/// Sets the 16-bit refcount of cluster `index` in the first refcount block of an image.
fn set_refcount(path: &Path, index: usize, value: u16) {
    let mut data = std::fs::read(path).unwrap();
    let reftable = be64(&data, 48) as usize;
    let block = be64(&data, reftable) as usize;
    data[block + 2 * index..block + 2 * index + 2].copy_from_slice(&value.to_be_bytes());
    std::fs::write(path, data).unwrap();
}

#[test]
fn create_and_info_agree_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("new.qcow2");
    let path = image.to_str().unwrap();
    let out = monstervm(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,refcount_bits=32,extended_l2=off",
        path,
        "100M",
    ]);
    assert!(out.status.success(), "{}", text(&out));

    let theirs: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output", "json", path])).unwrap();
    let out = monstervm(&["info", "--output", "json", path]);
    assert!(out.status.success(), "{}", text(&out));
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["virtual-size", "cluster-size", "format", "dirty-flag"] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    assert_eq!(
        ours["format-specific"]["data"],
        theirs["format-specific"]["data"]
    );
    assert_eq!(qemu_check(&image).0, 0);
}

#[test]
fn snapshot_list_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("snap.qcow2");
    let path = image.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", path, "4M"]);
    qemu_img(&["snapshot", "-c", "first", path]);
    let out = monstervm(&["snapshot", "-c", "second snapshot", path]);
    assert!(out.status.success(), "{}", text(&out));
    let out = monstervm(&["snapshot", "create", "third", path]);
    assert!(out.status.success(), "{}", text(&out));

    let theirs = Command::new("qemu-img")
        .args(["snapshot", "-l", path])
        .env("TZ", "UTC")
        .output()
        .unwrap();
    let ours = monstervm(&["snapshot", "-l", path]);
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout)
    );

    let out = monstervm(&["snapshot", "delete", "second snapshot", path]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = qemu_img(&["snapshot", "-l", path]);
    assert!(
        !listing.contains("second snapshot") && listing.contains("third"),
        "{listing}"
    );
    assert_eq!(qemu_check(&image).0, 0);
}

#[test]
fn check_exit_codes_and_leak_repair() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("leaky.qcow2");
    let path = image.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", path, "4M"]);
    qemu_io(&image, &["write -P 9 0 128k"]);

    let clean = monstervm(&["check", path]);
    assert_eq!(clean.status.code(), Some(0), "{}", text(&clean));

    // Append a cluster that nothing references but whose refcount is 1: a leak.
    let len = std::fs::metadata(&image).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    file.set_len(len + 65536).unwrap();
    set_refcount(&image, (len / 65536) as usize, 1);
    assert_eq!(qemu_check(&image).0, 3, "qemu-img sees the leak");
    let leaks = monstervm(&["check", path]);
    assert_eq!(leaks.status.code(), Some(3), "{}", text(&leaks));
    assert!(
        text(&leaks).contains("1 leaked clusters were found"),
        "{}",
        text(&leaks)
    );

    let json = monstervm(&["check", "--output", "json", path]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["leaks"], 1);

    let repaired = monstervm(&["check", "-r", "leaks", path]);
    assert_eq!(repaired.status.code(), Some(0), "{}", text(&repaired));
    assert_eq!(qemu_check(&image).0, 0, "{}", qemu_check(&image).1);
}

#[test]
fn check_reports_and_repairs_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("bad.qcow2");
    let path = image.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", path, "4M"]);
    qemu_io(&image, &["write -P 9 0 64k"]);
    // The data cluster of guest offset 0 is the last one qemu-img allocated.
    let last = (std::fs::metadata(&image).unwrap().len() / 65536 - 1) as usize;
    set_refcount(&image, last, 0);
    assert_eq!(qemu_check(&image).0, 2, "qemu-img sees the corruption");
    let out = monstervm(&["check", path]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let out = monstervm(&["check", "-r", "all", path]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (code, report) = qemu_check(&image);
    assert_eq!(code, 0, "{report}");
    qemu_io(&image, &["read -P 9 0 64k"]);
}

#[test]
fn convert_and_resize_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        source.to_str().unwrap(),
        "6M",
    ]);
    qemu_io(&source, &["write -P 1 0 1M", "write -P 2 3M 100k"]);
    for (options, compress) in [
        ("compat=1.1", true),
        ("compression_type=zstd", true),
        ("compat=0.10", false),
    ] {
        let out_path = dir.path().join("converted.qcow2");
        let out_str = out_path.to_str().unwrap();
        let mut args = vec!["convert", "-p", "-O", "qcow2", "-o", options];
        if compress {
            args.push("-c");
        }
        args.extend([source.to_str().unwrap(), out_str]);
        let out = monstervm(&args);
        assert!(out.status.success(), "{options}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("100.00/100%"),
            "{options}: no progress"
        );
        assert_eq!(qemu_check(&out_path).0, 0, "{options}");
        qemu_img(&["compare", source.to_str().unwrap(), out_str]);

        let out = monstervm(&["resize", out_str, "+10M"]);
        assert!(out.status.success(), "{options}: {}", text(&out));
        let info: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output", "json", out_str])).unwrap();
        assert_eq!(info["virtual-size"], 16 << 20, "{options}");
        assert_eq!(qemu_check(&out_path).0, 0, "{options}");
    }

    let raw = dir.path().join("out.raw");
    let out = monstervm(&[
        "convert",
        "-O",
        "raw",
        source.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    qemu_img(&[
        "compare",
        "-F",
        "raw",
        source.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
}

/// Environment variable naming the image that `crash_child_writer` writes to.
const CRASH_IMAGE_ENV: &str = "MONSTERVM_TEST_CRASH_IMAGE";

/// The child half of `kill_during_writes_leaves_no_corruption`: writes clusters whose
/// bytes encode their guest offset, with flushes in between, until it is killed. Without
/// the environment variable it returns at once.
#[test]
fn crash_child_writer() {
    let Some(path) = std::env::var_os(CRASH_IMAGE_ENV) else {
        return;
    };
    use monstervm::storage::{BlockBackend, OpenOptions, Qcow2};
    let image = Qcow2::open(Path::new(&path), &OpenOptions::default()).unwrap();
    let mut rng = Rng(7);
    let size = image.size();
    loop {
        let cluster = rng.below(size / 4096);
        let block: Vec<u8> = (0..4096u64)
            .map(|i| (cluster * 4096 + i).to_le_bytes()[i as usize % 8] ^ 0x5a)
            .collect();
        image.write_at(&block, cluster * 4096).unwrap();
        if rng.below(8) == 0 {
            image.discard(rng.below(size / 4096) * 4096, 4096).unwrap();
        }
        if rng.below(16) == 0 {
            image.flush().unwrap();
        }
    }
}

#[test]
fn kill_during_writes_leaves_no_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.qcow2");
    let path = target.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        path,
        "64M",
    ]);
    let size_before = std::fs::metadata(&target).unwrap().len();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child_writer", "--nocapture"])
        .env(CRASH_IMAGE_ENV, &target)
        .spawn()
        .unwrap();
    // Wait until the writer has flushed a good amount of metadata, then kill it.
    loop {
        let len = std::fs::metadata(&target).unwrap().len();
        if len > size_before + (8 << 20) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("writer exited ({status}) before it could be killed");
        }
        std::thread::yield_now();
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let (code, report) = qemu_check(&target);
    assert!(
        code == 0 || code == 3,
        "a crash may leak clusters but not corrupt: {report}"
    );
    assert!(
        report.contains("allocated"),
        "the writer flushed no mapped data: {report}"
    );

    // Every cluster reads either what the writer put there or zeros.
    let view = common::contents_by_qemu(&target, dir.path());
    for (cluster, got) in view.chunks(4096).enumerate() {
        let cluster = cluster as u64;
        let want: Vec<u8> = (0..4096u64)
            .map(|i| (cluster * 4096 + i).to_le_bytes()[i as usize % 8] ^ 0x5a)
            .collect();
        assert!(
            got == want.as_slice() || got.iter().all(|&b| b == 0),
            "cluster {cluster} holds neither its data nor zeros"
        );
    }

    // The dirty bit makes the next writer rebuild the refcounts, which also drops leaks.
    let out = monstervm(&["check", "-r", "leaks", path]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (code, report) = qemu_check(&target);
    assert_eq!(code, 0, "{report}");
    assert!(!report.contains("leaked"), "{report}");
}
