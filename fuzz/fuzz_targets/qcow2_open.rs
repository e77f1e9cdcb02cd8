//! Opens fuzzer-made bytes as a qcow2 image, then reads, writes, snapshots and checks it.
//! Any error is fine; a panic, a hang or a runaway allocation is a bug.
//!
//! Run: `cargo +nightly fuzz run qcow2_open` from the repository root. Seed the corpus
//! with small images from `qemu-img create` for faster coverage.

#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use monstervm::storage::qcow2::RepairMode;
use monstervm::storage::{BackingPolicy, BlockBackend, OpenOptions, Qcow2};

fuzz_target!(|data: &[u8]| {
    // The API opens paths, so each input goes through a file in memory-backed /dev/shm.
    let path = std::path::PathBuf::from(format!("/dev/shm/monstervm-fuzz-{}.qcow2", std::process::id()));
    let Ok(mut file) = std::fs::File::create(&path) else {
        return;
    };
    if file.write_all(data).is_err() {
        return;
    }
    drop(file);

    let options = OpenOptions {
        backing: BackingPolicy::Deny,
        ..OpenOptions::default()
    };
    if let Ok(image) = Qcow2::open(&path, &options) {
        let size = image.size().min(1 << 20);
        let mut buf = vec![0u8; 4096];
        let mut offset = 0;
        while offset + 4096 <= size {
            let _ = image.read_at(&mut buf, offset);
            offset += 65536;
        }
        let _ = image.write_at(&[0x42; 3000], 100);
        let _ = image.discard(0, size.min(65536));
        let _ = image.create_snapshot("fuzz");
        let _ = image.check(RepairMode::None);
        let _ = image.close();
    }
    let _ = std::fs::remove_file(&path);
});
