//! Builds the test guest's root disk: a raw ext4 image with a static BusyBox and an init
//! script, made by `mke2fs -d` from a staging folder, so no root privileges or loop
//! devices are needed.
//!
//! The initramfs's `/init` finds the disk by its label [`ROOT_LABEL`] (or by `root=` on
//! the kernel command line), mounts it and switches to it.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

/// File system label of the root disk, which the initramfs looks for.
pub const ROOT_LABEL: &str = "monstervm-root";

/// Start of the line that the root disk's init prints once it runs from the disk, followed
/// by ` uptime=<seconds>`. Tests wait for it on the serial console.
pub const ROOT_MARKER: &str = "MONSTERVM-ROOT";

/// Size of the image in MiB: BusyBox takes about 2 MiB, and the rest leaves room for
/// test files and for a 64 MiB sequential read of the whole device.
pub const ROOTFS_MIB: u64 = 128;

/// The root disk's `/sbin/init`. The initramfs moves /proc, /sys and /dev into the new
/// root before `switch_root`, so they are mounted here only when missing.
///
/// The initramfs turned the kernel's Ctrl-Alt-Del reboot off before `switch_root`, so the
/// kernel sends SIGINT to this script instead: `monstervm stop` lands in its trap, which
/// flushes, remounts the root read-only and powers off. The shell runs in the background
/// with `wait`, because a shell runs traps only between commands and `wait` is one.
pub const ROOT_INIT_SCRIPT: &str = r#"#!/bin/sh
# /sbin/init of the MonsterVM root disk, written by `monstervm guest fetch`.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
[ -e /bin/ls ] || /bin/busybox --install -s

[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
[ -e /dev/pts/ptmx ] || mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
hostname monstervm

read -r uptime idle < /proc/uptime
echo "MONSTERVM-ROOT uptime=$uptime"

trap 'echo "MONSTERVM-ROOT Ctrl-Alt-Del received, powering off"; sync; umount -a -r 2>/dev/null; poweroff -f' INT
setsid cttyhack sh &
wait $!
echo "MONSTERVM-ROOT shell exited, powering off"
sync
poweroff -f
"#;

/// Errors raised while building the root disk.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "mke2fs is not installed; install Debian's e2fsprogs package (apt-get install e2fsprogs)"
    )]
    Mke2fsMissing,
    #[error("`mke2fs` failed with {status} while writing {path}: {stderr}")]
    Mke2fsFailed {
        path: PathBuf,
        status: String,
        stderr: String,
    },
}

/// The image written.
#[derive(Debug, Clone, Serialize)]
pub struct RootfsSummary {
    pub path: PathBuf,
    /// Virtual size in bytes.
    pub size: u64,
    /// BusyBox applet links made in the image; zero means the init script installs them
    /// at boot.
    pub applet_links: usize,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io {
        action,
        path,
        source,
    }
}

/// Writes the root disk image to `output` with `busybox` as `/bin/busybox`, staging the
/// tree in `work` (created, and left for the caller to remove).
pub fn build_rootfs(
    busybox: &Path,
    work: &Path,
    output: &Path,
) -> Result<RootfsSummary, RootfsError> {
    let tree = work.join("rootfs");
    stage_tree(busybox, &tree)?;
    let applet_links = link_applets(busybox, &tree)?;

    let size = ROOTFS_MIB << 20;
    let file = fs::File::create(output).map_err(io_error("create", output))?;
    file.set_len(size)
        .map_err(io_error("set length of", output))?;
    drop(file);
    run_mke2fs(&tree, output)?;

    Ok(RootfsSummary {
        path: output.to_path_buf(),
        size,
        applet_links,
    })
}

/// Lays out the root tree: folders, BusyBox, `/bin/sh` and the init script.
fn stage_tree(busybox: &Path, tree: &Path) -> Result<(), RootfsError> {
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root", "etc", "mnt",
        "lib",
    ] {
        let path = tree.join(dir);
        fs::create_dir_all(&path).map_err(io_error("create folder", &path))?;
    }
    let target = tree.join("bin/busybox");
    fs::copy(busybox, &target).map_err(io_error("copy BusyBox to", &target))?;
    set_mode(&target, 0o755)?;
    let sh = tree.join("bin/sh");
    symlink("busybox", &sh).map_err(io_error("create symlink", &sh))?;

    let init = tree.join("sbin/init");
    fs::write(&init, ROOT_INIT_SCRIPT).map_err(io_error("write", &init))?;
    set_mode(&init, 0o755)?;
    let hostname = tree.join("etc/hostname");
    fs::write(&hostname, "monstervm\n").map_err(io_error("write", &hostname))?;
    set_mode(&tree.join("tmp"), 0o1777)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), RootfsError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_error("set permissions of", path))
}

/// Creates a symlink to BusyBox for every applet that `busybox --list-full` names, and
/// returns how many it made. A BusyBox that cannot list its applets gets none, and the
/// init script installs them at boot instead.
fn link_applets(busybox: &Path, tree: &Path) -> Result<usize, RootfsError> {
    let output = match Command::new(busybox).arg("--list-full").output() {
        Ok(output) if output.status.success() => output,
        Ok(output) => {
            tracing::warn!(status = %output.status, "busybox --list-full failed; applets are installed at boot");
            return Ok(0);
        }
        Err(error) => {
            tracing::warn!(%error, "failed to run busybox --list-full; applets are installed at boot");
            return Ok(0);
        }
    };
    let mut count = 0;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let relative = Path::new(line.trim());
        // Accept only plain relative paths such as `usr/bin/awk`.
        let depth = relative.components().count();
        if !(2..=3).contains(&depth)
            || !relative
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            continue;
        }
        let link = tree.join(relative);
        if link.symlink_metadata().is_ok() {
            continue; // bin/sh and bin/busybox are already there.
        }
        let target = if depth == 2 {
            "../bin/busybox"
        } else {
            "../../bin/busybox"
        };
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(io_error("create folder", parent))?;
        }
        symlink(target, &link).map_err(io_error("create symlink", &link))?;
        count += 1;
    }
    Ok(count)
}

fn run_mke2fs(tree: &Path, output: &Path) -> Result<(), RootfsError> {
    // Lazy inode-table and journal initialisation would make the guest kernel zero them
    // in the background after the first mount, writing to the disk while a test runs.
    let result = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", ROOT_LABEL])
        .args([
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
        ])
        .arg("-d")
        .arg(tree)
        .arg(output)
        .output();
    let result = match result {
        Ok(result) => result,
        Err(error) if error.kind() == ErrorKind::NotFound => {
            return Err(RootfsError::Mke2fsMissing)
        }
        Err(source) => {
            return Err(RootfsError::Io {
                action: "run mke2fs for",
                path: output.to_path_buf(),
                source,
            })
        }
    };
    if !result.status.success() {
        return Err(RootfsError::Mke2fsFailed {
            path: output.to_path_buf(),
            status: result.status.to_string(),
            stderr: String::from_utf8_lossy(&result.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_init_script_passes_busybox_syntax_check() {
        let status = Command::new("busybox")
            .args(["sh", "-n", "-c", ROOT_INIT_SCRIPT])
            .status();
        match status {
            Ok(status) => assert!(status.success(), "BusyBox sh rejects the root init script"),
            Err(e) => eprintln!("skipping: busybox is not available ({e}); install busybox-static"),
        }
        assert!(ROOT_INIT_SCRIPT.contains(&format!("echo \"{ROOT_MARKER} uptime=$uptime\"")));
    }

    #[test]
    fn rootfs_image_is_labelled_ext4_with_init() {
        let Ok(busybox) = which("busybox") else {
            eprintln!("skipping: busybox is not installed; install busybox-static");
            return;
        };
        if which("mke2fs").is_err() || which("debugfs").is_err() {
            eprintln!("skipping: mke2fs or debugfs is missing; install e2fsprogs");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("rootfs.img");

        let summary = build_rootfs(&busybox, dir.path(), &image).unwrap();
        assert_eq!(summary.size, ROOTFS_MIB << 20);
        assert_eq!(fs::metadata(&image).unwrap().len(), ROOTFS_MIB << 20);
        assert!(summary.applet_links > 50, "{summary:?}");

        // The ext4 magic 0xEF53 at byte 56 of the superblock, which starts at 1024.
        let bytes = fs::read(&image).unwrap();
        assert_eq!(&bytes[1024 + 56..1024 + 58], &[0x53, 0xef]);
        // The volume label at byte 120 of the superblock.
        let label = &bytes[1024 + 120..1024 + 120 + ROOT_LABEL.len()];
        assert_eq!(label, ROOT_LABEL.as_bytes());

        let init = debugfs_cat(&image, "/sbin/init");
        assert_eq!(init, ROOT_INIT_SCRIPT);
        let fsck = Command::new("e2fsck")
            .args(["-n", "-f"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck found errors: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }

    fn which(program: &str) -> Result<PathBuf, ()> {
        let output = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .map_err(|_| ())?;
        let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if output.status.success() && !path.is_empty() {
            Ok(PathBuf::from(path))
        } else {
            Err(())
        }
    }

    fn debugfs_cat(image: &Path, path: &str) -> String {
        let output = Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(image)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}
