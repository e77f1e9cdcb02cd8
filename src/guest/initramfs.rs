//! Builds the test guest's initramfs: a static BusyBox, an `/init` script and the virtio
//! driver modules, as an uncompressed newc cpio archive.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::cpio::CpioWriter;
use super::modules::{index_modules, modules_dep, resolve, Module, ModuleError};

/// Start of the line that `/init` prints once the system is up, followed by
/// ` uptime=<seconds>`; tests wait for it on the serial console.
pub const INIT_MARKER: &str = "MONSTERVM-INIT";

/// Modules that `/init` loads, with their dependencies: the virtio-pci transport, the
/// block and network drivers, and the ACPI pvpanic driver (`pvpanic-mmio`, which also
/// binds to the I/O port of QEMU0001) that reports a kernel panic to the VMM.
pub const GUEST_MODULES: [&str; 4] = ["virtio_pci", "virtio_blk", "virtio_net", "pvpanic_mmio"];

/// File under `/lib/modules` listing the module paths to load, one a line, dependencies
/// first.
const LOAD_ORDER_FILE: &str = "lib/modules/load-order";

/// The `/init` script. BusyBox installs its applet links first, so every later command is
/// an applet. With a root disk (see `rootfs`) it switches to the disk's `/sbin/init`.
/// Otherwise it hands PID 1 to BusyBox init, which runs [`INITTAB`]: the shell on the
/// console and the power-off on Ctrl-Alt-Del.
pub const INIT_SCRIPT: &str = r#"#!/bin/sh
# /init of the MonsterVM test guest, written by `monstervm guest fetch`.
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

mount -t proc proc /proc
# Until BusyBox init takes over, Ctrl-Alt-Del sends SIGINT here instead of rebooting,
# and this script powers off as init's ctrlaltdel entry does.
echo 0 > /proc/sys/kernel/ctrl-alt-del
trap /etc/init.d/ctrl-alt-del INT
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
hostname monstervm

# Virtio and pvpanic drivers, dependencies first. A module that is missing or built in
# fails quietly.
if [ -f /lib/modules/load-order ]; then
    while read -r module; do
        insmod "/lib/modules/$module" 2>/dev/null
    done < /lib/modules/load-order
fi

read -r uptime idle < /proc/uptime
echo "MONSTERVM-INIT uptime=$uptime"

# Root disk: the device named by root= (a path, LABEL= or UUID=), or else the disk
# labelled monstervm-root. Without either, the shell below runs from the initramfs.
root=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
    esac
done
case "$root" in
    "") root=$(findfs LABEL=monstervm-root 2>/dev/null) ;;
    LABEL=*|UUID=*) root=$(findfs "$root" 2>/dev/null) ;;
    *)
        tries=0
        while [ ! -b "$root" ] && [ "$tries" -lt 10 ]; do
            sleep 1
            tries=$((tries + 1))
        done
        ;;
esac
if [ -n "$root" ] && [ -b "$root" ]; then
    mkdir -p /newroot
    if mount -o rw "$root" /newroot 2>/dev/null || mount -o ro "$root" /newroot; then
        if [ -x /newroot/sbin/init ]; then
            echo "MONSTERVM-INIT switching root to $root"
            umount /tmp
            mount --move /dev /newroot/dev
            mount --move /proc /newroot/proc
            mount --move /sys /newroot/sys
            exec switch_root /newroot /sbin/init
        fi
        echo "MONSTERVM-INIT $root has no /sbin/init; staying in the initramfs"
        umount /newroot
    else
        echo "MONSTERVM-INIT failed to mount $root; staying in the initramfs"
    fi
elif [ -n "$root" ]; then
    echo "MONSTERVM-INIT root device $root not found; staying in the initramfs"
fi

exec /sbin/init
"#;

/// `/etc/inittab` for BusyBox init. BusyBox init turns the kernel's Ctrl-Alt-Del reboot
/// off (the kernel then sends SIGINT to PID 1 instead) and runs the `ctrlaltdel` entry on
/// that signal, so a VMM's stop request powers the guest off instead of rebooting it.
pub const INITTAB: &str = "\
# /etc/inittab of the MonsterVM test guest, written by `monstervm guest fetch`.
::once:/etc/init.d/console-shell
::ctrlaltdel:/etc/init.d/ctrl-alt-del
";

/// The shell on the console. `cttyhack` opens the console named by `console=` (for
/// example /dev/ttyS0) as the controlling terminal, so the shell has job control and
/// typed commands echo. Leaving the shell powers the guest off.
pub const CONSOLE_SHELL_SCRIPT: &str = r#"#!/bin/sh
setsid cttyhack sh
echo "MONSTERVM-INIT shell exited, powering off"
poweroff -f
"#;

/// The `ctrlaltdel` action: flush and unmount the file systems, then power off.
pub const CTRL_ALT_DEL_SCRIPT: &str = r#"#!/bin/sh
echo "MONSTERVM-INIT Ctrl-Alt-Del received, powering off"
sync
umount -a -r 2>/dev/null
poweroff -f
"#;

/// Errors raised while building the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("failed to read BusyBox binary {path}: {source}")]
    ReadBusybox {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read kernel module {path}: {source}")]
    ReadModule {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error("failed to write initramfs {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The kernel modules to include: the unpacked `/lib/modules/<version>` folder.
#[derive(Debug, Clone)]
pub struct ModuleSource {
    /// The `lib/modules/<version>` folder.
    pub root: PathBuf,
    /// The kernel release, as `uname -r` prints it in the guest.
    pub version: String,
}

/// Contents summary of a written archive.
#[derive(Debug, Clone, Serialize)]
pub struct InitramfsSummary {
    pub path: PathBuf,
    pub size: u64,
    /// Names of the modules included, in load order.
    pub modules: Vec<String>,
    /// Wanted modules that the kernel package does not have (built in, or absent).
    pub missing_modules: Vec<String>,
}

/// Writes the initramfs to `output` with `busybox` as `/bin/busybox` and, if given, the
/// virtio modules from `modules`.
pub fn build_initramfs(
    busybox: &Path,
    modules: Option<&ModuleSource>,
    output: &Path,
) -> Result<InitramfsSummary, InitramfsError> {
    let busybox_bytes = std::fs::read(busybox).map_err(|source| InitramfsError::ReadBusybox {
        path: busybox.to_path_buf(),
        source,
    })?;

    let (resolved, missing) = match modules {
        Some(source) => {
            let index = index_modules(&source.root)?;
            resolve(&source.root, &index, &GUEST_MODULES)?
        }
        None => (Vec::new(), Vec::new()),
    };

    let write_error = |source| InitramfsError::Write {
        path: output.to_path_buf(),
        source,
    };
    let file = File::create(output).map_err(write_error)?;
    let mut archive = CpioWriter::new(BufWriter::new(file));
    write_tree(&mut archive, &busybox_bytes, modules, &resolved).map_err(|e| match e {
        TreeError::Io(source) => write_error(source),
        TreeError::Module { path, source } => InitramfsError::ReadModule { path, source },
    })?;
    let writer = archive.finish().map_err(write_error)?;
    let file = writer
        .into_inner()
        .map_err(|e| write_error(e.into_error()))?;
    let size = file.metadata().map_err(write_error)?.len();

    Ok(InitramfsSummary {
        path: output.to_path_buf(),
        size,
        modules: resolved.iter().map(|m| m.name.clone()).collect(),
        missing_modules: missing,
    })
}

enum TreeError {
    Io(std::io::Error),
    Module {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<std::io::Error> for TreeError {
    fn from(error: std::io::Error) -> Self {
        TreeError::Io(error)
    }
}

fn write_tree<W: std::io::Write>(
    archive: &mut CpioWriter<W>,
    busybox: &[u8],
    source: Option<&ModuleSource>,
    modules: &[Module],
) -> Result<(), TreeError> {
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "root",
        "etc",
        "etc/init.d",
        "lib",
        "lib/modules",
    ] {
        archive.add_directory(dir, 0o755)?;
    }
    // The kernel opens /dev/console for init's standard streams before /init mounts
    // devtmpfs, so the node must exist in the archive.
    archive.add_char_device("dev/console", 0o600, 5, 1)?;
    archive.add_file("bin/busybox", 0o755, busybox)?;
    archive.add_symlink("bin/sh", "busybox")?;
    archive.add_file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    archive.add_file("etc/hostname", 0o644, b"monstervm\n")?;
    archive.add_file("etc/inittab", 0o644, INITTAB.as_bytes())?;
    archive.add_file(
        "etc/init.d/console-shell",
        0o755,
        CONSOLE_SHELL_SCRIPT.as_bytes(),
    )?;
    archive.add_file(
        "etc/init.d/ctrl-alt-del",
        0o755,
        CTRL_ALT_DEL_SCRIPT.as_bytes(),
    )?;

    let Some(source) = source else {
        return Ok(());
    };
    let version_dir = format!("lib/modules/{}", source.version);
    archive.add_directory(&version_dir, 0o755)?;
    let mut created = std::collections::HashSet::new();
    let mut load_order = String::new();
    for module in modules {
        // Create each parent folder once, outermost first.
        let mut parent = PathBuf::from(&version_dir);
        if let Some(dirs) = module.relative_path.parent() {
            for component in dirs.components() {
                parent.push(component);
                let dir = parent.display().to_string();
                if created.insert(dir.clone()) {
                    archive.add_directory(&dir, 0o755)?;
                }
            }
        }
        let path = source.root.join(&module.relative_path);
        let bytes = std::fs::read(&path).map_err(|source| TreeError::Module {
            path: path.clone(),
            source,
        })?;
        let relative = format!("{}/{}", source.version, module.relative_path.display());
        archive.add_file(&format!("lib/modules/{relative}"), 0o644, &bytes)?;
        load_order.push_str(&relative);
        load_order.push('\n');
    }
    archive.add_file(
        &format!("{version_dir}/modules.dep"),
        0o644,
        modules_dep(modules).as_bytes(),
    )?;
    archive.add_file(LOAD_ORDER_FILE, 0o644, load_order.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::cpio::{read_archive, S_IFCHR, S_IFMT, S_IFREG};

    #[test]
    fn archive_without_modules() {
        let dir = tempfile::tempdir().unwrap();
        let busybox = dir.path().join("busybox");
        std::fs::write(&busybox, b"fake busybox").unwrap();
        let output = dir.path().join("initramfs.img");

        let summary = build_initramfs(&busybox, None, &output).unwrap();
        assert!(summary.modules.is_empty());
        let bytes = std::fs::read(&output).unwrap();
        assert_eq!(summary.size, bytes.len() as u64);

        let entries = read_archive(&bytes).unwrap();
        let find = |path: &str| entries.iter().find(|e| e.path == path).unwrap();
        let init = find("init");
        assert_eq!(init.mode & S_IFMT, S_IFREG);
        assert_eq!(init.mode & 0o111, 0o111, "init must be executable");
        assert_eq!(init.data, INIT_SCRIPT.as_bytes());
        assert_eq!(find("bin/busybox").data, b"fake busybox");
        let console = find("dev/console");
        assert_eq!(console.mode & S_IFMT, S_IFCHR);
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
        assert!(!entries.iter().any(|e| e.path == "lib/modules/load-order"));
        assert_eq!(find("etc/inittab").data, INITTAB.as_bytes());
        for (path, script) in [
            ("etc/init.d/console-shell", CONSOLE_SHELL_SCRIPT),
            ("etc/init.d/ctrl-alt-del", CTRL_ALT_DEL_SCRIPT),
        ] {
            let entry = find(path);
            assert_eq!(entry.data, script.as_bytes(), "{path}");
            assert_eq!(entry.mode & 0o111, 0o111, "{path} must be executable");
        }
    }

    #[test]
    fn inittab_powers_off_on_ctrl_alt_del() {
        assert!(INITTAB.contains("::ctrlaltdel:/etc/init.d/ctrl-alt-del\n"));
        assert!(INITTAB.contains("::once:/etc/init.d/console-shell\n"));
        assert!(INIT_SCRIPT.trim_end().ends_with("exec /sbin/init"));
        assert!(INIT_SCRIPT.contains("echo 0 > /proc/sys/kernel/ctrl-alt-del\n"));
        assert!(INIT_SCRIPT.contains("trap /etc/init.d/ctrl-alt-del INT\n"));
        assert!(CTRL_ALT_DEL_SCRIPT.contains("sync\n"));
        assert!(CTRL_ALT_DEL_SCRIPT.trim_end().ends_with("poweroff -f"));
    }

    #[test]
    fn init_script_prints_marker() {
        assert!(INIT_SCRIPT.starts_with("#!/bin/sh\n"));
        assert!(INIT_SCRIPT.contains(&format!("echo \"{INIT_MARKER} uptime=$uptime\"")));
        assert!(INIT_SCRIPT.contains("mount -t devtmpfs devtmpfs /dev"));
        assert!(CONSOLE_SHELL_SCRIPT.contains("setsid cttyhack sh"));
        assert!(INIT_SCRIPT.contains(&format!(
            "findfs LABEL={}",
            crate::guest::rootfs::ROOT_LABEL
        )));
        assert!(INIT_SCRIPT.contains("exec switch_root /newroot /sbin/init"));
    }

    #[test]
    fn init_script_runs_under_busybox() {
        // Run each script's syntax check with the host's BusyBox shell.
        for script in [INIT_SCRIPT, CONSOLE_SHELL_SCRIPT, CTRL_ALT_DEL_SCRIPT] {
            let status = std::process::Command::new("busybox")
                .args(["sh", "-n", "-c", script])
                .status();
            match status {
                Ok(status) => assert!(status.success(), "BusyBox sh rejects {script}"),
                Err(e) => {
                    eprintln!("skipping: busybox is not available ({e}); install busybox-static");
                    return;
                }
            }
        }
    }
}
