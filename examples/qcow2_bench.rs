//! Measures sequential 4 KiB writes and reads on a new qcow2 image, for comparison with
//! `qemu-img bench -w -t writeback -s 4k -c COUNT` and `qemu-img bench -t writeback -s 4k
//! -c COUNT` on an image of the same layout.
//!
//! Usage: `cargo run --release --example qcow2_bench -- IMAGE [COUNT]`

use std::path::PathBuf;
use std::time::Instant;

use monstervm::storage::qcow2::CreateOptions;
use monstervm::storage::{BlockBackend, Qcow2};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().ok_or("usage: qcow2_bench IMAGE [COUNT]")?);
    let count: u64 = args
        .next()
        .map(|c| c.parse())
        .transpose()?
        .unwrap_or(75_000);
    let block = vec![0xa5u8; 4096];
    let options = CreateOptions {
        size: 4 << 30,
        ..CreateOptions::default()
    };
    let image = Qcow2::create(&path, &options)?;

    let start = Instant::now();
    for i in 0..count {
        image.write_at(&block, i * 4096)?;
    }
    image.flush()?;
    let write_secs = start.elapsed().as_secs_f64();

    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    for i in 0..count {
        image.read_at(&mut buf, i * 4096)?;
    }
    let read_secs = start.elapsed().as_secs_f64();
    image.close()?;

    println!(
        "{count} writes of 4 KiB: {write_secs:.3} s ({:.0} ops/s)",
        count as f64 / write_secs
    );
    println!(
        "{count} reads of 4 KiB: {read_secs:.3} s ({:.0} ops/s)",
        count as f64 / read_secs
    );
    Ok(())
}
