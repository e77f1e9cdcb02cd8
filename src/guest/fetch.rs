//! `monstervm guest fetch`: downloads Debian's cloud kernel and static BusyBox with
//! `apt-get download`, unpacks them with `dpkg-deb -x`, and writes `vmlinuz`,
//! `initramfs.img`, the ELF `vmlinux` extracted from `vmlinuz` and the ext4 root disk
//! `rootfs.img`. No step needs root.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::initramfs::{build_initramfs, InitramfsError, ModuleSource};
use super::rootfs::{build_rootfs, RootfsError};
use crate::core::boot::image::{probe, KernelImage};
use crate::core::boot::vmlinux::extract_vmlinux;

/// Meta-package whose dependency is the current cloud kernel image package.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
/// Package with the statically linked BusyBox.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// How to get the guest without this command, appended to errors about apt-get.
const MANUAL_STEPS: &str = "to supply the guest by hand, run `apt-get download linux-image-cloud-amd64 busybox-static` on a Debian 12 machine, \
then `apt-get download` the linux-image-<version>-cloud-amd64 package that the first one depends on, and pass the folder \
with the two real .deb files as `monstervm guest fetch --debs FOLDER`; or put a bzImage at DIR/vmlinuz and a newc cpio \
initramfs with a static BusyBox and an /init script at DIR/initramfs.img";

/// Output folder and package source of `guest fetch`.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Output folder, created if missing.
    pub dir: PathBuf,
    /// Folder with already downloaded `linux-image-*-cloud-amd64_*.deb` and
    /// `busybox-static_*.deb`; `None` downloads them with apt-get.
    pub debs: Option<PathBuf>,
}

/// The files written.
#[derive(Debug, Clone, Serialize)]
pub struct FetchedGuest {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The newc cpio archive.
    pub initramfs: PathBuf,
    /// The ELF vmlinux extracted from the bzImage, for booting without the in-kernel
    /// decompressor; `None` where the payload's compression is not supported.
    pub vmlinux: Option<PathBuf>,
    /// The raw ext4 root disk with BusyBox; `None` where mke2fs is not installed.
    pub rootfs: Option<PathBuf>,
    /// Kernel release, as `uname -r` prints it in the guest.
    pub kernel_version: String,
    /// Name of the .deb that held the kernel.
    pub kernel_package: String,
    /// Kernel modules in the initramfs, in load order.
    pub modules: Vec<String>,
    /// Virtio modules that the kernel package lacks (built in, or absent).
    pub missing_modules: Vec<String>,
}

/// Errors raised by `guest fetch`.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("`{command}` failed with {status}: {stderr}; {MANUAL_STEPS}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{path} is not a bootable bzImage: {reason}")]
    BadKernel { path: PathBuf, reason: String },
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("package {package} has no {what}; {MANUAL_STEPS}")]
    PackageContents { package: String, what: String },
    #[error("{tool} is not installed (it comes with Debian's {package} package); {MANUAL_STEPS}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
}

/// A folder removed when dropped, for the downloads and unpacked packages.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), %error, "failed to remove temporary folder");
        }
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FetchError {
    let path = path.to_path_buf();
    move |source| FetchError::Io {
        action,
        path,
        source,
    }
}

/// Fetches the packages, unpacks them and writes `vmlinuz` and `initramfs.img` into
/// `options.dir`, calling `progress` with one line per step.
pub fn fetch_guest(
    options: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<FetchedGuest, FetchError> {
    fs::create_dir_all(&options.dir).map_err(io_error("create folder", &options.dir))?;
    let work = WorkDir(options.dir.join(format!(".fetch-{}", std::process::id())));
    let debs_dir = work.0.join("debs");
    fs::create_dir_all(&debs_dir).map_err(io_error("create folder", &debs_dir))?;

    let (kernel_deb, busybox_deb) = match &options.debs {
        Some(folder) => find_local_debs(folder)?,
        None => download_debs(&debs_dir, progress)?,
    };

    let kernel_tree = work.0.join("kernel");
    let busybox_tree = work.0.join("busybox");
    progress(&format!("unpacking {}", file_name(&kernel_deb)));
    unpack(&kernel_deb, &kernel_tree)?;
    progress(&format!("unpacking {}", file_name(&busybox_deb)));
    unpack(&busybox_deb, &busybox_tree)?;

    let kernel_package = file_name(&kernel_deb);
    let (vmlinuz, kernel_version) = find_kernel(&kernel_tree, &kernel_package)?;
    check_bzimage(&vmlinuz)?;
    let busybox = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| busybox_tree.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| FetchError::PackageContents {
            package: file_name(&busybox_deb),
            what: "bin/busybox".to_string(),
        })?;

    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| kernel_tree.join(p).join(&kernel_version))
        .find(|p| p.is_dir())
        .map(|root| ModuleSource {
            root,
            version: kernel_version.clone(),
        });
    if modules.is_none() {
        tracing::warn!(package = %kernel_package, "kernel package has no modules folder");
    }

    let kernel = options.dir.join("vmlinuz");
    let kernel_tmp = work.0.join("vmlinuz");
    fs::copy(&vmlinuz, &kernel_tmp).map_err(io_error("copy kernel to", &kernel_tmp))?;
    fs::rename(&kernel_tmp, &kernel).map_err(io_error("write", &kernel))?;
    progress(&format!("wrote {} ({kernel_version})", kernel.display()));
    let vmlinux = write_vmlinux(&kernel, &options.dir.join("vmlinux"), &work.0, progress)?;

    let initramfs = options.dir.join("initramfs.img");
    let initramfs_tmp = work.0.join("initramfs.img");
    let summary = build_initramfs(&busybox, modules.as_ref(), &initramfs_tmp)?;
    fs::rename(&initramfs_tmp, &initramfs).map_err(io_error("write", &initramfs))?;
    progress(&format!(
        "wrote {} ({} KiB, modules: {})",
        initramfs.display(),
        summary.size / 1024,
        if summary.modules.is_empty() {
            "none".to_string()
        } else {
            summary.modules.join(" ")
        }
    ));

    let rootfs = write_rootfs(&busybox, &options.dir.join("rootfs.img"), &work.0, progress)?;

    Ok(FetchedGuest {
        kernel,
        initramfs,
        vmlinux,
        rootfs,
        kernel_version,
        kernel_package,
        modules: summary.modules,
        missing_modules: summary.missing_modules,
    })
}

/// Extracts the ELF vmlinux from `bzimage` into `output`. A payload that cannot be
/// decoded is reported and skipped, because the bzImage alone boots the guest.
fn write_vmlinux(
    bzimage: &Path,
    output: &Path,
    work: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<PathBuf>, FetchError> {
    let bytes = fs::read(bzimage).map_err(io_error("read", bzimage))?;
    let vmlinux = match extract_vmlinux(&bytes) {
        Ok(vmlinux) => vmlinux,
        Err(error) => {
            progress(&format!("not writing {}: {error}", output.display()));
            return Ok(None);
        }
    };
    let tmp = work.join("vmlinux");
    fs::write(&tmp, &vmlinux).map_err(io_error("write", &tmp))?;
    fs::rename(&tmp, output).map_err(io_error("write", output))?;
    progress(&format!(
        "wrote {} (ELF, {} KiB, extracted from the bzImage)",
        output.display(),
        vmlinux.len() / 1024
    ));
    Ok(Some(output.to_path_buf()))
}

/// Writes the root disk to `output`. Without mke2fs it reports and skips the disk,
/// because the kernel and initramfs boot without it.
fn write_rootfs(
    busybox: &Path,
    output: &Path,
    work: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<PathBuf>, FetchError> {
    let tmp = work.join("rootfs.img");
    match build_rootfs(busybox, work, &tmp) {
        Ok(summary) => {
            fs::rename(&tmp, output).map_err(io_error("write", output))?;
            progress(&format!(
                "wrote {} (raw ext4, {} MiB, {} BusyBox applet links)",
                output.display(),
                summary.size >> 20,
                summary.applet_links
            ));
            Ok(Some(output.to_path_buf()))
        }
        Err(error @ RootfsError::Mke2fsMissing) => {
            progress(&format!("not writing {}: {error}", output.display()));
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs `program` with `args` in `cwd` and returns its standard output.
fn run(program: &'static str, args: &[&str], cwd: &Path) -> Result<String, FetchError> {
    let output = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .map_err(|source| match source.kind() {
            ErrorKind::NotFound => FetchError::ToolMissing {
                tool: program,
                package: if program == "apt-get" { "apt" } else { "dpkg" },
            },
            _ => FetchError::Io {
                action: "run",
                path: PathBuf::from(program),
                source,
            },
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last_lines: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(FetchError::CommandFailed {
            command: format!("{program} {}", args.join(" ")),
            status: output.status.to_string(),
            stderr: last_lines.into_iter().rev().collect::<Vec<_>>().join(" / "),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Downloads one package into `dir` and returns the path of its .deb.
fn apt_download(
    package: &str,
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    progress(&format!("downloading {package} with apt-get"));
    run("apt-get", &["download", "-q", package], dir)?;
    let prefix = format!("{package}_");
    let found = fs::read_dir(dir)
        .map_err(io_error("list", dir))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            let name = file_name(path);
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .ok_or_else(|| FetchError::PackageContents {
            package: package.to_string(),
            what: format!(".deb file in {} after apt-get download", dir.display()),
        })?;
    let size = fs::metadata(&found).map(|m| m.len()).unwrap_or(0);
    progress(&format!(
        "downloaded {} ({} KiB)",
        file_name(&found),
        size / 1024
    ));
    Ok(found)
}

/// Downloads the kernel (through its meta-package's dependency) and BusyBox.
fn download_debs(
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(PathBuf, PathBuf), FetchError> {
    let meta = apt_download(KERNEL_META_PACKAGE, dir, progress)?;
    let meta_str = meta.to_string_lossy().into_owned();
    let depends = run("dpkg-deb", &["-f", &meta_str, "Depends"], dir)?;
    let image_package = image_dependency(&depends).ok_or_else(|| FetchError::PackageContents {
        package: file_name(&meta),
        what: format!("linux-image-* dependency (Depends: {})", depends.trim()),
    })?;
    let kernel = apt_download(&image_package, dir, progress)?;
    let busybox = apt_download(BUSYBOX_PACKAGE, dir, progress)?;
    Ok((kernel, busybox))
}

/// Returns the first `linux-image-*` package named in a Depends field such as
/// `linux-image-6.1.0-28-cloud-amd64 (= 6.1.119-1)`.
pub fn image_dependency(depends: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|item| item.split_whitespace().next().unwrap_or(""))
        .find(|name| name.starts_with("linux-image-") && *name != KERNEL_META_PACKAGE)
        .map(str::to_string)
}

/// Finds the kernel image and BusyBox .deb files in a folder given with `--debs`.
fn find_local_debs(folder: &Path) -> Result<(PathBuf, PathBuf), FetchError> {
    let mut kernel = None;
    let mut busybox = None;
    for entry in fs::read_dir(folder).map_err(io_error("list", folder))? {
        let path = entry.map_err(io_error("list", folder))?.path();
        let name = file_name(&path);
        if !name.ends_with(".deb") {
            continue;
        }
        if name.starts_with("linux-image-") && !name.starts_with(&format!("{KERNEL_META_PACKAGE}_"))
        {
            kernel = Some(path);
        } else if name.starts_with(&format!("{BUSYBOX_PACKAGE}_")) {
            busybox = Some(path);
        }
    }
    let missing = |what: &str| FetchError::PackageContents {
        package: folder.display().to_string(),
        what: what.to_string(),
    };
    Ok((
        kernel.ok_or_else(|| missing("linux-image-<version>-cloud-amd64_*.deb"))?,
        busybox.ok_or_else(|| missing("busybox-static_*.deb"))?,
    ))
}

fn unpack(deb: &Path, target: &Path) -> Result<(), FetchError> {
    fs::create_dir_all(target).map_err(io_error("create folder", target))?;
    let deb_str = deb.to_string_lossy().into_owned();
    let target_str = target.to_string_lossy().into_owned();
    run("dpkg-deb", &["-x", &deb_str, &target_str], target)?;
    Ok(())
}

/// Returns the unpacked `boot/vmlinuz-<version>` and its version.
fn find_kernel(tree: &Path, package: &str) -> Result<(PathBuf, String), FetchError> {
    let boot = tree.join("boot");
    let missing = || FetchError::PackageContents {
        package: package.to_string(),
        what: "boot/vmlinuz-* (is it the meta-package instead of the image package?)".to_string(),
    };
    let entries = fs::read_dir(&boot).map_err(|_| missing())?;
    for entry in entries {
        let path = entry.map_err(io_error("list", &boot))?.path();
        if let Some(version) = file_name(&path).strip_prefix("vmlinuz-") {
            return Ok((path.clone(), version.to_string()));
        }
    }
    Err(missing())
}

fn check_bzimage(path: &Path) -> Result<(), FetchError> {
    let mut file = fs::File::open(path).map_err(io_error("open", path))?;
    match probe(&mut file).map_err(io_error("read", path))? {
        Ok(KernelImage::BzImage(_)) => Ok(()),
        Ok(KernelImage::Elf(_)) => Err(FetchError::BadKernel {
            path: path.to_path_buf(),
            reason: "it is an ELF file, not a bzImage".to_string(),
        }),
        Err(error) => Err(FetchError::BadKernel {
            path: path.to_path_buf(),
            reason: error.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_dependency_is_parsed() {
        assert_eq!(
            image_dependency("linux-image-6.1.0-28-cloud-amd64 (= 6.1.119-1)").as_deref(),
            Some("linux-image-6.1.0-28-cloud-amd64")
        );
        assert_eq!(
            image_dependency("foo, linux-image-6.1.0-9-cloud-amd64-unsigned | bar").as_deref(),
            Some("linux-image-6.1.0-9-cloud-amd64-unsigned")
        );
        assert_eq!(image_dependency("libc6 (>= 2.36)"), None);
    }

    #[test]
    fn local_debs_are_found() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "linux-image-cloud-amd64_6.1.119-1_amd64.deb",
            "linux-image-6.1.0-28-cloud-amd64_6.1.119-1_amd64.deb",
            "busybox-static_1.35.0-4_amd64.deb",
            "notes.txt",
        ] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        let (kernel, busybox) = find_local_debs(dir.path()).unwrap();
        assert_eq!(
            file_name(&kernel),
            "linux-image-6.1.0-28-cloud-amd64_6.1.119-1_amd64.deb"
        );
        assert_eq!(file_name(&busybox), "busybox-static_1.35.0-4_amd64.deb");
    }

    #[test]
    fn missing_local_debs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("busybox-static_1_amd64.deb"), b"").unwrap();
        let err = find_local_debs(dir.path()).unwrap_err().to_string();
        assert!(err.contains("linux-image-<version>-cloud-amd64"), "{err}");
        assert!(err.contains("--debs"), "{err}");
    }

    #[test]
    fn missing_tool_names_manual_steps() {
        let err = FetchError::ToolMissing {
            tool: "apt-get",
            package: "apt",
        }
        .to_string();
        assert!(err.contains("apt-get is not installed"), "{err}");
        assert!(err.contains("DIR/vmlinuz"), "{err}");
    }
}
