//! Helpers shared by the integration tests: running qemu-img and qemu-io, a seeded PRNG,
//! a driver for the serial console of a booting Linux guest ([`console`]) and runs of the
//! embedded guest ([`embedded`]).

#![allow(dead_code)]

pub mod console;
pub mod embedded;

use std::path::Path;
use std::process::{Command, Output};

use monstervm::storage::BlockBackend;

/// Runs a tool and returns its output; panics with the command line if it cannot start.
pub fn run_tool(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} {args:?} ({e}); install qemu-utils"))
}

/// Runs qemu-img and panics with its output unless it exits 0.
pub fn qemu_img(args: &[&str]) -> String {
    let out = run_tool("qemu-img", args);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-io commands on an image (format detected by qemu-io) and panics on failure.
pub fn qemu_io(image: &Path, commands: &[&str]) {
    let mut args = Vec::new();
    for command in commands {
        args.push("-c");
        args.push(command);
    }
    let path = image.to_str().expect("UTF-8 path");
    args.push(path);
    let out = run_tool("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed") && !stdout.contains("error"),
        "qemu-io {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Returns the guest contents of an image as `qemu-img convert -O raw` reads them.
pub fn contents_by_qemu(image: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("qemu-view.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    data
}

/// Reads a whole backend in 1 MiB requests.
pub fn contents_of(backend: &dyn BlockBackend) -> Vec<u8> {
    let mut data = vec![0u8; backend.size() as usize];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        backend.read_at(chunk, (i as u64) << 20).unwrap();
    }
    data
}

/// Returns the first offset where two buffers differ, for readable assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// `qemu-img check` exit status and output.
pub fn qemu_check(image: &Path) -> (i32, String) {
    let out = run_tool("qemu-img", &["check", image.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// SplitMix64: a small seeded generator, so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Returns a value in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}
