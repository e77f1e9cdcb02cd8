//! Assembles the embedded default guest (`src/core/asm/boot.asm`) with NASM into
//! `$OUT_DIR/boot.bin`, which `core::boot::embedded` includes.
//!
//! Where NASM is not installed, the build copies the committed image
//! `src/core/asm/boot.bin` instead and warns. The test `committed_image_matches_source`
//! keeps that image equal to the source. Set `NASM` to use an assembler at another path.
//!
//! It also installs xterm.js for the web console with `npm ci` from `web/package-lock.json`
//! (in `$OUT_DIR/web`, so the source tree stays untouched) and copies `xterm.js` and
//! `xterm.css` to `$OUT_DIR/web-assets/`, which `api::web` includes. Where npm is missing
//! or fails (for example, offline), both files are left empty with a warning, and the page
//! falls back to the plain-text terminal in `web/console.js`. Set `NPM` to use npm at
//! another path.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "src/core/asm/boot.asm";
const COMMITTED_IMAGE: &str = "src/core/asm/boot.bin";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed={COMMITTED_IMAGE}");
    println!("cargo:rerun-if-env-changed=NASM");

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    bundle_xterm(&out_dir);
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

const WEB_PACKAGE: &str = "web/package.json";
const WEB_LOCK: &str = "web/package-lock.json";
/// The files taken from the `@xterm/xterm` package, and their names in `web-assets/`.
const XTERM_FILES: [(&str, &str); 2] = [
    ("node_modules/@xterm/xterm/lib/xterm.js", "xterm.js"),
    ("node_modules/@xterm/xterm/css/xterm.css", "xterm.css"),
];

fn bundle_xterm(out_dir: &Path) {
    println!("cargo:rerun-if-changed={WEB_PACKAGE}");
    println!("cargo:rerun-if-changed={WEB_LOCK}");
    println!("cargo:rerun-if-env-changed=NPM");

    let assets = out_dir.join("web-assets");
    create_dir(&assets);
    match install_xterm(out_dir) {
        Ok(package_dir) => {
            for (source, name) in XTERM_FILES {
                let source = package_dir.join(source);
                if let Err(error) = std::fs::copy(&source, assets.join(name)) {
                    panic!(
                        "npm installed @xterm/xterm but {} is unreadable: {error}",
                        source.display()
                    );
                }
            }
        }
        Err(reason) => {
            println!(
                "cargo:warning=xterm.js is not bundled ({reason}), so the web console uses \
                 its plain-text terminal; install npm and reach the npm registry to bundle it"
            );
            for (_, name) in XTERM_FILES {
                if let Err(error) = std::fs::write(assets.join(name), "") {
                    panic!("failed to write {}: {error}", assets.join(name).display());
                }
            }
        }
    }
}

/// Runs `npm ci` on copies of the web package files and returns the folder it installed
/// into, or why it could not.
fn install_xterm(out_dir: &Path) -> Result<PathBuf, String> {
    let npm = std::env::var("NPM").unwrap_or_else(|_| "npm".to_string());
    let package_dir = out_dir.join("web");
    create_dir(&package_dir);
    for file in [WEB_PACKAGE, WEB_LOCK] {
        let target = package_dir.join(Path::new(file).file_name().expect("a file name"));
        if let Err(error) = std::fs::copy(file, &target) {
            panic!("failed to copy {file} to {}: {error}", target.display());
        }
    }
    // Only the runtime dependency: playwright-core is for the browser test, which installs
    // it into web/ itself.
    let result = Command::new(&npm)
        .args([
            "ci",
            "--omit=dev",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
        ])
        .current_dir(&package_dir)
        .output();
    match result {
        Ok(result) if result.status.success() => Ok(package_dir),
        Ok(result) => Err(format!(
            "{npm} ci failed with {}: {}",
            result.status,
            String::from_utf8_lossy(&result.stderr).trim()
        )),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{npm} not found"))
        }
        Err(error) => Err(format!("failed to run {npm}: {error}")),
    }
}

fn create_dir(path: &Path) {
    if let Err(error) = std::fs::create_dir_all(path) {
        panic!("failed to create {}: {error}", path.display());
    }
}
