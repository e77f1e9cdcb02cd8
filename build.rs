//! Assembles the embedded default guest (`src/core/asm/boot.asm`) with NASM into
//! `$OUT_DIR/boot.bin`, which `core::boot::embedded` includes.
//!
//! Where NASM is not installed, the build copies the committed image
//! `src/core/asm/boot.bin` instead and warns. The test `committed_image_matches_source`
//! keeps that image equal to the source. Set `NASM` to use an assembler at another path.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "src/core/asm/boot.asm";
const COMMITTED_IMAGE: &str = "src/core/asm/boot.bin";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed={COMMITTED_IMAGE}");
    println!("cargo:rerun-if-env-changed=NASM");

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let output = out_dir.join("boot.bin");
    let nasm = std::env::var("NASM").unwrap_or_else(|_| "nasm".to_string());

    match Command::new(&nasm)
        .args(["-f", "bin", "-o"])
        .arg(&output)
        .arg(SOURCE)
        .output()
    {
        Ok(result) if result.status.success() => {}
        Ok(result) => panic!(
            "{nasm} failed to assemble {SOURCE} ({}):\n{}",
            result.status,
            String::from_utf8_lossy(&result.stderr)
        ),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            println!(
                "cargo:warning=NASM ({nasm}) not found, so the embedded guest comes from the \
                 committed {COMMITTED_IMAGE}; install nasm to assemble {SOURCE}"
            );
            copy_committed_image(Path::new(COMMITTED_IMAGE), &output);
        }
        Err(error) => panic!("failed to run {nasm} on {SOURCE}: {error}"),
    }
}

fn copy_committed_image(image: &Path, output: &Path) {
    if let Err(error) = std::fs::copy(image, output) {
        panic!(
            "failed to copy {} to {}: {error}",
            image.display(),
            output.display()
        );
    }
}
