//! Images made and filled by qemu-img and qemu-io read exactly as `qemu-img convert -O raw`
//! reads them.

mod common;

use std::path::Path;

use common::{contents_by_qemu, contents_of, first_difference, qemu_img, qemu_io};
use monstervm::storage::{open_image, BackingPolicy, OpenOptions, StorageError};

const SIZE: &str = "8M";

/// Writes patterns at aligned, unaligned, cluster-crossing and zeroed ranges.
fn fill(image: &Path) {
    qemu_io(
        image,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 5000 3000",
            "write -P 0x33 1M 1M",
            "write -z 1152k 64k",
            "write -P 0x44 3M 4096",
            "write -P 0x55 3M 512",
            "discard 1536k 128k",
            "write -P 0x66 8388096 512",
            "write -P 0x77 4194303 2",
        ],
    );
}

fn assert_reads_like_qemu(image: &Path, dir: &Path, label: &str) {
    let expected = contents_by_qemu(image, dir);
    let backend = open_image(image, &OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("{label}: open failed: {e}"));
    let actual = contents_of(backend.as_ref());
    assert_eq!(actual.len(), expected.len(), "{label}: size");
    assert_eq!(
        first_difference(&actual, &expected),
        None,
        "{label}: first differing byte"
    );
}

#[test]
fn qemu_images_of_every_option_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        "compat=0.10",
        "compat=1.1",
        "cluster_size=512",
        "cluster_size=4096",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=2",
        "refcount_bits=4",
        "refcount_bits=8",
        "refcount_bits=32",
        "refcount_bits=64",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "extended_l2=on,cluster_size=2M",
        "lazy_refcounts=on",
        "compression_type=zstd",
    ];
    for options in cases {
        let image = dir.path().join("image.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            options,
            image.to_str().unwrap(),
            SIZE,
        ]);
        fill(&image);
        assert_reads_like_qemu(&image, dir.path(), options);
    }
}

#[test]
fn compressed_images_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        source.to_str().unwrap(),
        SIZE,
    ]);
    fill(&source);
    for options in [
        "compression_type=zlib",
        "compression_type=zstd",
        "compression_type=zlib,cluster_size=512",
        "compression_type=zlib,cluster_size=2M",
        "compression_type=zstd,extended_l2=on",
        "compat=0.10",
    ] {
        let image = dir.path().join("compressed.qcow2");
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            options,
            source.to_str().unwrap(),
            image.to_str().unwrap(),
        ]);
        let info = qemu_img(&["check", image.to_str().unwrap()]);
        assert!(
            info.contains("compressed clusters"),
            "{options}: qemu-img wrote no compressed clusters: {info}"
        );
        assert_reads_like_qemu(&image, dir.path(), options);
    }
}

#[test]
fn backing_chain_reads_through_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "4M"]);
    qemu_io(&base, &["write -P 0xa1 0 4M"]);

    // Relative backing names resolve against the overlay's folder.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        mid.to_str().unwrap(),
        "6M",
    ]);
    qemu_io(&mid, &["write -P 0xb2 64k 100k", "write -z 2M 64k"]);

    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        mid.to_str().unwrap(),
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        SIZE,
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0xc3 70k 3k",
            "write -P 0xc4 5M 1k",
            "write -z 300k 8k",
        ],
    );
    assert_reads_like_qemu(&top, dir.path(), "three-level chain");
}

#[test]
fn backing_deny_rejects_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let options = OpenOptions {
        read_only: true,
        backing: BackingPolicy::Deny,
        ..OpenOptions::default()
    };
    let err = open_image(&top, &options).unwrap_err();
    assert!(matches!(err, StorageError::BackingDenied { .. }), "{err}");
}

#[test]
fn backing_loop_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", a.to_str().unwrap(), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        b.to_str().unwrap(),
    ]);
    // Point a at b: qemu-img rebase -u changes only the header.
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
    ]);
    let err = open_image(&b, &OpenOptions::read_only()).unwrap_err();
    assert!(matches!(err, StorageError::BackingLoop { .. }), "{err}");
}

#[test]
fn backing_without_format_is_not_probed_as_raw() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "1M"]);
    // Old images name a backing file without its format; qemu-img no longer makes them.
    let options = monstervm::storage::qcow2::CreateOptions {
        size: 1 << 20,
        backing_file: Some("base.raw".into()),
        ..Default::default()
    };
    // Creation writes the image, then fails to reopen it through its backing file.
    let err = monstervm::storage::Qcow2::create(&top, &options).unwrap_err();
    assert!(
        matches!(err, StorageError::BackingFormatMissing { .. }),
        "{err}"
    );
    let err = open_image(&top, &OpenOptions::read_only()).unwrap_err();
    assert!(
        matches!(err, StorageError::BackingFormatMissing { .. }),
        "{err}"
    );
}

#[test]
fn snapshots_made_by_qemu_apply_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for options in [
        "compat=1.1",
        "compat=0.10",
        "extended_l2=on",
        "refcount_bits=8",
    ] {
        let image = dir.path().join("snap.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            options,
            image.to_str().unwrap(),
            SIZE,
        ]);
        qemu_io(&image, &["write -P 0x01 0 1M"]);
        qemu_img(&["snapshot", "-c", "first", image.to_str().unwrap()]);
        qemu_io(&image, &["write -P 0x02 512k 1M", "write -z 0 64k"]);
        qemu_img(&["snapshot", "-c", "second", image.to_str().unwrap()]);
        qemu_io(&image, &["write -P 0x03 100k 10k"]);
        assert_reads_like_qemu(&image, dir.path(), options);

        std::fs::copy(&image, &theirs).unwrap();
        qemu_img(&["snapshot", "-a", "first", theirs.to_str().unwrap()]);
        let qcow2 = monstervm::storage::Qcow2::open(&image, &OpenOptions::default()).unwrap();
        qcow2.apply_snapshot("first").unwrap();
        qcow2.close().unwrap();
        let ours = contents_by_qemu(&image, dir.path());
        let expected = contents_by_qemu(&theirs, dir.path());
        assert_eq!(
            first_difference(&ours, &expected),
            None,
            "{options}: after applying snapshot"
        );
        let (code, text) = common::qemu_check(&image);
        assert_eq!(code, 0, "{options}: qemu-img check after apply: {text}");
    }
}

#[test]
fn lazy_refcounts_are_repaired_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lazy.qcow2");
    let path = image.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        path,
        SIZE,
    ]);
    // qemu-io's abort command crashes it with refcount updates still postponed.
    let out = common::run_tool("qemu-io", &["-c", "write -P 3 0 300k", "-c", "abort", path]);
    assert!(!out.status.success(), "qemu-io abort should crash");
    let (code, report) = common::qemu_check(&image);
    assert_eq!(code, 2, "the crash must leave stale refcounts: {report}");

    let qcow2 = monstervm::storage::Qcow2::open(&image, &OpenOptions::default()).unwrap();
    qcow2.close().unwrap();
    let (code, report) = common::qemu_check(&image);
    assert_eq!(code, 0, "after repair: {report}");
    qemu_io(&image, &["read -P 3 0 300k"]);
}

#[test]
fn unknown_extension_kept_and_autoclear_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ext.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", image.to_str().unwrap(), SIZE]);
    let mut data = std::fs::read(&image).unwrap();
    // Insert an extension of an unknown type right after the 112-byte header.
    let extension: &[u8] = b"\x12\x34\x56\x78\x00\x00\x00\x05hello\x00\x00\x00";
    let tail = data[112..4096 - extension.len()].to_vec();
    data[112..112 + extension.len()].copy_from_slice(extension);
    data[112 + extension.len()..4096].copy_from_slice(&tail);
    // Autoclear bit 5 has no meaning yet; a writer must clear it.
    data[88..96].copy_from_slice(&(1u64 << 5).to_be_bytes());
    std::fs::write(&image, &data).unwrap();

    let qcow2 = monstervm::storage::Qcow2::open(&image, &OpenOptions::default()).unwrap();
    use monstervm::storage::BlockBackend;
    qcow2.write_at(&[1; 4096], 0).unwrap();
    qcow2.close().unwrap();

    let after = std::fs::read(&image).unwrap();
    let header_area = &after[..4096];
    assert!(
        header_area.windows(extension.len()).any(|w| w == extension),
        "unknown extension was dropped"
    );
    assert_eq!(&after[88..96], &[0u8; 8], "autoclear bits");
    let (code, report) = common::qemu_check(&image);
    assert_eq!(code, 0, "{report}");
    qemu_io(&image, &["read -P 1 0 4096"]);
}

#[test]
fn bitmaps_counted_then_dropped_by_writer() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("bitmaps.qcow2");
    let path = image.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", path, SIZE]);
    qemu_io(&image, &["write -P 1 0 1M"]);
    qemu_img(&["bitmap", "--add", path, "b0"]);
    qemu_io(&image, &["write -P 2 2M 1M"]);

    let qcow2 = monstervm::storage::Qcow2::open(&image, &OpenOptions::read_only()).unwrap();
    let report = qcow2
        .check(monstervm::storage::qcow2::RepairMode::None)
        .unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    drop(qcow2);

    // A writer cannot keep the bitmaps current, so it removes them and frees their clusters.
    let qcow2 = monstervm::storage::Qcow2::open(&image, &OpenOptions::default()).unwrap();
    qcow2.close().unwrap();
    let (code, report) = common::qemu_check(&image);
    assert_eq!(code, 0, "{report}");
    assert!(
        !qemu_img(&["info", path]).contains("bitmaps:"),
        "bitmaps extension still present"
    );
    qemu_io(&image, &["read -P 1 0 1M", "read -P 2 2M 1M"]);
}

#[test]
fn external_data_file_images_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("disk.data");
    for extra in ["", ",data_file_raw=on", ",extended_l2=on"] {
        let image = dir.path().join("external.qcow2");
        let options = format!("data_file={}{extra}", data.display());
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &options,
            image.to_str().unwrap(),
            SIZE,
        ]);
        fill(&image);
        assert_reads_like_qemu(&image, dir.path(), &options);

        let deny = OpenOptions {
            read_only: true,
            backing: BackingPolicy::Deny,
            ..OpenOptions::default()
        };
        let err = open_image(&image, &deny).unwrap_err();
        assert!(
            matches!(err, StorageError::BackingDenied { .. }),
            "{options}: {err}"
        );
    }
}
