//! Images MonsterVM writes under a seeded random workload of writes, zeroing, discards,
//! snapshots and reopens pass `qemu-img check` and match the expected contents under
//! `qemu-img compare`, snapshots included.

mod common;

use std::path::Path;

use common::{
    contents_by_qemu, contents_of, first_difference, qemu_check, qemu_img, run_tool, Rng,
};
use monstervm::storage::qcow2::{CompressionType, CreateOptions};
use monstervm::storage::{BlockBackend, ImageFormat, OpenOptions, Qcow2};

const SIZE: u64 = 8 << 20;

struct Case {
    label: &'static str,
    options: CreateOptions,
    with_backing: bool,
    /// Most snapshots alive at once. Applying a snapshot adds its references before it
    /// drops the old ones, so 2-bit refcounts (max 3) allow only one.
    max_snapshots: usize,
}

fn cases() -> Vec<Case> {
    let base = CreateOptions {
        size: SIZE,
        ..CreateOptions::default()
    };
    let with = |label, options: CreateOptions, with_backing, max_snapshots| Case {
        label,
        options,
        with_backing,
        max_snapshots,
    };

    let v2 = CreateOptions {
        version: 2,
        ..base.clone()
    };
    let c512 = CreateOptions {
        cluster_size: 512,
        ..base.clone()
    };
    let c2m = CreateOptions {
        cluster_size: 2 << 20,
        ..base.clone()
    };
    let r2 = CreateOptions {
        cluster_size: 4096,
        refcount_bits: 2,
        ..base.clone()
    };
    let r1 = CreateOptions {
        refcount_bits: 1,
        ..base.clone()
    };
    let r64 = CreateOptions {
        refcount_bits: 64,
        cluster_size: 512,
        ..base.clone()
    };
    let ext = CreateOptions {
        extended_l2: true,
        ..base.clone()
    };
    let ext16k = CreateOptions {
        extended_l2: true,
        cluster_size: 16384,
        ..base.clone()
    };
    let zstd = CreateOptions {
        compression: CompressionType::Zstd,
        ..base.clone()
    };

    vec![
        with("default", base.clone(), false, 4),
        with("version 2", v2.clone(), false, 4),
        with("512 B clusters", c512, false, 4),
        with("2 MiB clusters", c2m, false, 4),
        with("4 KiB clusters, 2-bit refcounts", r2, false, 1),
        with("1-bit refcounts", r1, false, 0),
        with("64-bit refcounts", r64, false, 4),
        with("extended L2", ext, false, 4),
        with("zstd", zstd, false, 4),
        with("backing file", base, true, 4),
        with("version 2 with backing file", v2, true, 4),
        with("extended L2 with backing file", ext16k, true, 4),
    ]
}

fn write_raw(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// Applies a discard to the model: whole clusters read as zeros afterwards, except on a
/// version 2 image over a backing file, where the format has no zero clusters.
fn model_discard(model: &mut [u8], offset: u64, len: u64, cluster: u64, keeps_backing: bool) {
    if keeps_backing {
        return;
    }
    let start = offset.next_multiple_of(cluster);
    let end = ((offset + len) / cluster * cluster).max(start);
    model[start as usize..end as usize].fill(0);
}

fn run_case(case: &Case, seed: u64, dir: &Path) {
    let label = case.label;
    let image_path = dir.join("image.qcow2");
    let mut options = case.options.clone();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(seed);

    if case.with_backing {
        let base = dir.join("base.raw");
        for (i, byte) in model.iter_mut().enumerate() {
            *byte = (i / 4096 % 251) as u8 | 1;
        }
        write_raw(&base, &model);
        options.backing_file = Some("base.raw".into());
        options.backing_format = Some(ImageFormat::Raw);
    }
    let cluster = options.cluster_size;
    let keeps_backing = case.with_backing && options.version == 2;

    let mut image = Qcow2::create(&image_path, &options).unwrap();
    let mut saved: Vec<(String, Vec<u8>)> = Vec::new();
    for step in 0..400 {
        let op = rng.below(100);
        let offset = rng.below(SIZE);
        let max_len = if rng.below(4) == 0 { 300_000 } else { 9000 };
        let len = (rng.below(max_len) + 1).min(SIZE - offset);
        match op {
            0..=59 => {
                let fill = rng.next() as u8;
                let data: Vec<u8> = (0..len)
                    .map(|i| fill.wrapping_add((i / 512) as u8))
                    .collect();
                image.write_at(&data, offset).unwrap();
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            60..=69 => {
                image.write_zeroes(offset, len).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            70..=79 => {
                image.discard(offset, len).unwrap();
                model_discard(&mut model, offset, len, cluster, keeps_backing);
            }
            80..=84 if saved.len() < case.max_snapshots => {
                let name = format!("s{step}");
                image.create_snapshot(&name).unwrap();
                saved.push((name, model.clone()));
            }
            85..=87 if !saved.is_empty() => {
                let (name, data) = &saved[rng.below(saved.len() as u64) as usize];
                image.apply_snapshot(name).unwrap();
                model.copy_from_slice(data);
            }
            88..=89 if !saved.is_empty() => {
                let index = rng.below(saved.len() as u64) as usize;
                let (name, _) = saved.remove(index);
                image.delete_snapshot(&name).unwrap();
            }
            90..=94 => image.flush().unwrap(),
            95..=99 => {
                image.close().unwrap();
                image = Qcow2::open(&image_path, &OpenOptions::default()).unwrap();
            }
            _ => {}
        }
        // Comparing after every step finds the failing operation, at 400 full reads a case.
        if std::env::var_os("MONSTERVM_TEST_CHECK_EACH_STEP").is_some() {
            let actual = contents_of(&image);
            if let Some(at) = first_difference(&actual, &model) {
                panic!("{label}: step {step} op {op} offset {offset:#x} len {len:#x}: differs at {at:#x}: {} vs {}", actual[at], model[at]);
            }
        }
        if step % 100 == 99 {
            let actual = contents_of(&image);
            assert_eq!(
                first_difference(&actual, &model),
                None,
                "{label}: contents after step {step}"
            );
        }
    }
    image.close().unwrap();

    let (code, text) = qemu_check(&image_path);
    assert_eq!(code, 0, "{label}: qemu-img check: {text}");
    assert!(
        text.contains("No errors were found"),
        "{label}: qemu-img check: {text}"
    );

    let expected = dir.join("expected.raw");
    write_raw(&expected, &model);
    let out = run_tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            expected.to_str().unwrap(),
            image_path.to_str().unwrap(),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{label}: qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Each remaining snapshot, applied by qemu-img, contains what the model saved.
    for (name, data) in &saved {
        let copy = dir.join("copy.qcow2");
        std::fs::copy(&image_path, &copy).unwrap();
        qemu_img(&["snapshot", "-a", name, copy.to_str().unwrap()]);
        write_raw(&expected, data);
        let out = run_tool(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                expected.to_str().unwrap(),
                copy.to_str().unwrap(),
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{label}: snapshot {name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn random_workloads_pass_qemu_check() {
    for (i, case) in cases().iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        run_case(case, 0x5eed_0000 + i as u64, dir.path());
    }
}

#[test]
fn refcount_table_grows_with_small_clusters() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters and
    // the first refcount table 4096 of them, so 8 MiB of data forces the table to grow.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    let options = CreateOptions {
        size: 16 << 20,
        cluster_size: 512,
        refcount_bits: 64,
        ..CreateOptions::default()
    };
    let image = Qcow2::create(&path, &options).unwrap();
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
    image.write_at(&data, 4 << 20).unwrap();
    image.close().unwrap();
    let (code, text) = qemu_check(&path);
    assert_eq!(code, 0, "{text}");
    let image = Qcow2::open(&path, &OpenOptions::read_only()).unwrap();
    let mut back = vec![0u8; data.len()];
    image.read_at(&mut back, 4 << 20).unwrap();
    assert_eq!(first_difference(&back, &data), None);
}

#[test]
fn dirty_bit_tracks_open_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty.qcow2");
    let image = Qcow2::create(
        &path,
        &CreateOptions {
            size: 1 << 20,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    image.write_at(&[1; 4096], 0).unwrap();
    let header = std::fs::read(&path).unwrap();
    assert_eq!(header[79] & 1, 1, "dirty bit while open");
    image.close().unwrap();
    let header = std::fs::read(&path).unwrap();
    assert_eq!(header[79] & 1, 0, "dirty bit after close");
}

#[test]
fn compressed_writes_pass_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    for compression in [CompressionType::Zlib, CompressionType::Zstd] {
        let path = dir.path().join("packed.qcow2");
        let options = CreateOptions {
            size: 4 << 20,
            compression,
            ..CreateOptions::default()
        };
        let image = Qcow2::create(&path, &options).unwrap();
        let mut model = vec![0u8; 4 << 20];
        for (i, chunk) in model.chunks_mut(65536).enumerate() {
            for (j, byte) in chunk.iter_mut().enumerate() {
                *byte = ((i * 7 + j / 100) % 256) as u8;
            }
        }
        for (i, chunk) in model.chunks(65536).enumerate() {
            image.write_compressed(chunk, (i as u64) * 65536).unwrap();
        }
        // Overwriting a compressed cluster copies it into a normal one.
        image.write_at(&[0xee; 1000], 70_000).unwrap();
        model[70_000..71_000].fill(0xee);
        image.close().unwrap();
        let (code, text) = qemu_check(&path);
        assert_eq!(code, 0, "{compression:?}: {text}");
        assert!(
            text.contains("compressed clusters"),
            "{compression:?}: {text}"
        );
        let actual = common::contents_by_qemu(&path, dir.path());
        assert_eq!(first_difference(&actual, &model), None, "{compression:?}");
    }
}

#[test]
fn refcount_overflow_fails_cleanly() {
    // 2-bit refcounts hold at most 3: the active tables and two snapshots.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("narrow.qcow2");
    let options = CreateOptions {
        size: 1 << 20,
        refcount_bits: 2,
        ..CreateOptions::default()
    };
    let image = Qcow2::create(&path, &options).unwrap();
    image.write_at(&[7; 200_000], 0).unwrap();
    image.create_snapshot("one").unwrap();
    image.create_snapshot("two").unwrap();
    let err = image.create_snapshot("three").unwrap_err();
    assert!(
        matches!(
            err,
            monstervm::storage::StorageError::RefcountOverflow {
                max: 3,
                bits: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(image.snapshots().len(), 2);
    image.write_at(&[8; 1000], 500).unwrap();
    image.close().unwrap();
    let (code, text) = qemu_check(&path);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn data_file_workload_passes_qemu_check() {
    for extra in ["", ",data_file_raw=on", ",extended_l2=on"] {
        let dir = tempfile::tempdir().unwrap();
        let image_path = dir.path().join("image.qcow2");
        let path = image_path.to_str().unwrap();
        // qemu-img creates a relative data file name in its working folder, so pass a
        // full path.
        let data = dir.path().join("disk.data");
        let options = format!("data_file={}{extra}", data.display());
        let options = options.as_str();
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, path, "8M"]);

        let image = Qcow2::open(&image_path, &OpenOptions::default()).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = Rng(0xda7a);
        for _ in 0..300 {
            let offset = rng.below(SIZE);
            let len = (rng.below(100_000) + 1).min(SIZE - offset);
            let range = offset as usize..(offset + len) as usize;
            match rng.below(10) {
                0..=6 => {
                    let fill = rng.next() as u8;
                    image.write_at(&vec![fill; len as usize], offset).unwrap();
                    model[range].fill(fill);
                }
                7 => {
                    image.write_zeroes(offset, len).unwrap();
                    model[range].fill(0);
                }
                8 => {
                    image.discard(offset, len).unwrap();
                    model_discard(&mut model, offset, len, 65536, false);
                }
                _ => image.flush().unwrap(),
            }
        }
        let err = image.create_snapshot("none").unwrap_err();
        assert!(
            matches!(err, monstervm::storage::StorageError::Unsupported { .. }),
            "{options}: {err}"
        );
        assert_eq!(
            first_difference(&contents_of(&image), &model),
            None,
            "{options}"
        );
        image.close().unwrap();

        let (code, text) = qemu_check(&image_path);
        assert_eq!(code, 0, "{options}: qemu-img check: {text}");
        let expected = dir.path().join("expected.raw");
        write_raw(&expected, &model);
        let out = run_tool(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                expected.to_str().unwrap(),
                path,
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{options}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Writes `data` at `offset` through MonsterVM and into the expected contents.
fn write_both(image: &Qcow2, expected: &mut [u8], data: &[u8], offset: u64) {
    image.write_at(data, offset).unwrap();
    expected[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

#[test]
fn partial_writes_into_new_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.qcow2");
    let options = CreateOptions {
        size: SIZE,
        ..CreateOptions::default()
    };
    let cluster = options.cluster_size;
    let image = Qcow2::create(&path, &options).unwrap();
    let mut expected = vec![0u8; SIZE as usize];

    // New clusters past the end of the file, out of order and not cluster-aligned: only the
    // guest data is written, and the rest of each cluster must still read as zeros.
    write_both(&image, &mut expected, &[0x11; 4096], 5 * cluster + 4096);
    write_both(&image, &mut expected, &[0x22; 5536], 2 * cluster + 60000);
    write_both(&image, &mut expected, &[0x33; 512], 9 * cluster);

    // A discarded cluster frees a host cluster that still contains 0x44 bytes, and the
    // next allocation reuses it: the bytes around the new data must become zeros.
    write_both(&image, &mut expected, &[0x44; 65536], 3 * cluster);
    image.discard(3 * cluster, cluster).unwrap();
    expected[3 * cluster as usize..4 * cluster as usize].fill(0);
    write_both(&image, &mut expected, &[0x55; 4096], 7 * cluster + 8192);

    let ours = contents_of(&image);
    assert_eq!(
        first_difference(&ours, &expected),
        None,
        "MonsterVM reads back other contents"
    );
    image.close().unwrap();

    let (code, text) = qemu_check(&path);
    assert_eq!(code, 0, "qemu-img check: {text}");
    let theirs = contents_by_qemu(&path, dir.path());
    assert_eq!(
        first_difference(&theirs, &expected),
        None,
        "qemu-img reads back other contents"
    );
}
