//! Malformed images: each corrupted header field or table entry gives a typed error that
//! names it, and random corruption never panics.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::{qemu_img, qemu_io, Rng};
use monstervm::storage::qcow2::RepairMode;
use monstervm::storage::{BlockBackend, OpenOptions, Qcow2, StorageError};

fn be64(data: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(data[at..at + 8].try_into().unwrap())
}

/// Makes a valid image with data, a snapshot and a backing-less layout; returns its bytes.
fn valid_image(dir: &Path, options: &str) -> Vec<u8> {
    let path = dir.join("valid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        options,
        path.to_str().unwrap(),
        "4M",
    ]);
    qemu_io(&path, &["write -P 0x5a 0 200k", "write -P 0x6b 3M 10k"]);
    qemu_img(&["snapshot", "-c", "snap", path.to_str().unwrap()]);
    qemu_io(&path, &["write -P 0x7c 64k 64k"]);
    std::fs::read(&path).unwrap()
}

fn patched(base: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut data = base.to_vec();
    data[at..at + bytes.len()].copy_from_slice(bytes);
    data
}

fn open_bytes(dir: &Path, data: &[u8], read_only: bool) -> Result<Qcow2, StorageError> {
    let path = dir.join("bad.qcow2");
    std::fs::write(&path, data).unwrap();
    Qcow2::open(
        &path,
        &OpenOptions {
            read_only,
            ..OpenOptions::default()
        },
    )
}

#[test]
fn corrupted_header_fields_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let base = valid_image(dir.path(), "cluster_size=65536");
    let l1_offset = be64(&base, 40) as usize;
    let cases: Vec<(&str, usize, Vec<u8>)> = vec![
        ("magic", 0, b"QFI\x00".to_vec()),
        ("version", 4, 1u32.to_be_bytes().to_vec()),
        ("version", 4, 4u32.to_be_bytes().to_vec()),
        ("cluster_bits", 20, 8u32.to_be_bytes().to_vec()),
        ("cluster_bits", 20, 22u32.to_be_bytes().to_vec()),
        ("size", 24, (1u64 << 60).to_be_bytes().to_vec()),
        ("l1_size", 24, (1u64 << 40).to_be_bytes().to_vec()),
        ("l1_size", 36, u32::MAX.to_be_bytes().to_vec()),
        ("l1_size", 36, 0u32.to_be_bytes().to_vec()),
        ("l1_table_offset", 40, 0x10001u64.to_be_bytes().to_vec()),
        ("l1_table_offset", 40, (1u64 << 60).to_be_bytes().to_vec()),
        ("l1_table_offset", 40, (1u64 << 40).to_be_bytes().to_vec()),
        ("l1_table_offset", 40, 0x10000u64.to_be_bytes().to_vec()),
        ("refcount_table_offset", 48, 0u64.to_be_bytes().to_vec()),
        (
            "refcount_table_offset",
            48,
            0x10200u64.to_be_bytes().to_vec(),
        ),
        (
            "refcount_table_offset",
            48,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
        ("refcount_table_clusters", 56, 0u32.to_be_bytes().to_vec()),
        (
            "refcount_table_clusters",
            56,
            0x1000_0000u32.to_be_bytes().to_vec(),
        ),
        ("nb_snapshots", 60, 70_000u32.to_be_bytes().to_vec()),
        ("snapshots_offset", 64, 0x10008u64.to_be_bytes().to_vec()),
        ("refcount_order", 96, 7u32.to_be_bytes().to_vec()),
        ("header_length", 100, 100u32.to_be_bytes().to_vec()),
        ("header_length", 100, 0x2_0000u32.to_be_bytes().to_vec()),
        ("compression_type", 104, vec![2]),
        ("compression_type", 72, 8u64.to_be_bytes().to_vec()),
        ("backing_file_offset", 8, 0x2_0000u64.to_be_bytes().to_vec()),
        (
            "header extension length",
            116,
            0x10_0000u32.to_be_bytes().to_vec(),
        ),
    ];
    for (field, at, bytes) in cases {
        let data = patched(&base, at, &bytes);
        let err = open_bytes(dir.path(), &data, true).expect_err(field);
        match &err {
            StorageError::InvalidField { field: named, .. } => {
                assert_eq!(*named, field, "patch at {at}: {err}")
            }
            other => panic!("patch at {at} for {field}: expected InvalidField, got {other}"),
        }
    }

    let mut with_backing = patched(&base, 8, &0x1000u64.to_be_bytes());
    with_backing[16..20].copy_from_slice(&2000u32.to_be_bytes());
    let err = open_bytes(dir.path(), &with_backing, true).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::InvalidField {
                field: "backing_file_size",
                ..
            }
        ),
        "{err}"
    );

    let unknown_bit = patched(&base, 72, &(1u64 << 5).to_be_bytes());
    let err = open_bytes(dir.path(), &unknown_bit, true).unwrap_err();
    assert!(matches!(err, StorageError::Unsupported { .. }), "{err}");

    let encrypted = patched(&base, 32, &1u32.to_be_bytes());
    let err = open_bytes(dir.path(), &encrypted, true).unwrap_err();
    assert!(matches!(err, StorageError::Unsupported { .. }), "{err}");

    let corrupt_bit = patched(&base, 72, &2u64.to_be_bytes());
    let err = open_bytes(dir.path(), &corrupt_bit, false).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    assert!(
        open_bytes(dir.path(), &corrupt_bit, true).is_ok(),
        "corrupt images still open read-only"
    );

    let bad_l1 = patched(&base, l1_offset, &0x8000_0000_0001_0100u64.to_be_bytes());
    let err = open_bytes(dir.path(), &bad_l1, true).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");

    let reftable_offset = be64(&base, 48) as usize;
    let bad_reftable = patched(&base, reftable_offset, &0x3_0001u64.to_be_bytes());
    let err = open_bytes(dir.path(), &bad_reftable, true).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
}

#[test]
fn corrupted_snapshot_table_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let base = valid_image(dir.path(), "cluster_size=65536");
    let table = be64(&base, 64) as usize;
    let extra = patched(&base, table + 36, &2000u32.to_be_bytes());
    let err = open_bytes(dir.path(), &extra, true).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::InvalidField {
                field: "snapshot extra_data_size",
                ..
            }
        ),
        "{err}"
    );

    let l1_size = patched(&base, table + 8, &0x0100_0000u32.to_be_bytes());
    let err = open_bytes(dir.path(), &l1_size, true).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::InvalidField {
                field: "snapshot l1_size",
                ..
            }
        ),
        "{err}"
    );

    let l1_offset = patched(&base, table, &0x1234u64.to_be_bytes());
    let err = open_bytes(dir.path(), &l1_offset, true).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::InvalidField {
                field: "snapshot l1_table_offset",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn corrupted_l2_entries_fail_reads_with_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = valid_image(dir.path(), "cluster_size=65536");
    let l1_offset = be64(&base, 40) as usize;
    let l2_offset = (be64(&base, l1_offset) & 0x00ff_ffff_ffff_fe00) as usize;

    // Reserved bits 1-8 set in the first L2 entry.
    let mut reserved = base.clone();
    reserved[l2_offset + 7] |= 0x02;
    let image = open_bytes(dir.path(), &reserved, true).unwrap();
    let err = image.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");

    // A compressed descriptor pointing at bytes that are not a deflate stream.
    let compressed = patched(
        &base,
        l2_offset,
        &(0x4000_0000_0000_0000u64 | 0x1000).to_be_bytes(),
    );
    let image = open_bytes(dir.path(), &compressed, true).unwrap();
    let err = image.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert!(matches!(err, StorageError::Compression { .. }), "{err}");
}

/// Opens, reads, writes, snapshots and checks an image; any error is fine, a panic is not.
fn exercise(path: &Path) {
    let Ok(image) = Qcow2::open(path, &OpenOptions::default()) else {
        return;
    };
    let size = image.size().min(8 << 20);
    let mut buf = vec![0u8; 65536];
    let mut offset = 0;
    while offset + 65536 <= size {
        let _ = image.read_at(&mut buf, offset);
        offset += 65536;
    }
    let _ = image.write_at(&[0x42; 5000], 1000);
    let _ = image.write_zeroes(0, 65536.min(size));
    let _ = image.create_snapshot("fuzz");
    let _ = image.apply_snapshot("snap");
    let _ = image.check(RepairMode::None);
    let _ = image.close();
}

#[test]
fn random_corruption_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    for options in [
        "cluster_size=4096",
        "cluster_size=4096,compat=0.10",
        "cluster_size=512,refcount_bits=8",
        "cluster_size=16384,extended_l2=on",
    ] {
        let base = valid_image(dir.path(), options);
        let metadata_end = base.len().min(48 * 1024);
        let mut rng = Rng(0xbad_5eed);
        for round in 0..100 {
            let mut data = base.clone();
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(metadata_end as u64) as usize;
                data[at] = rng.next() as u8;
            }
            let path = dir.path().join("fuzz.qcow2");
            std::fs::write(&path, &data).unwrap();
            let t = std::time::Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| exercise(&path)));
            if t.elapsed().as_millis() > 300 {
                eprintln!("SLOW {options} round {round}: {:?}", t.elapsed());
                std::fs::write(format!("/tmp/pt/slow-{round}.qcow2"), &data).unwrap();
            }
            assert!(
                result.is_ok(),
                "{options}: round {round} panicked; the image is kept at {}",
                path.display()
            );
        }
    }
}
