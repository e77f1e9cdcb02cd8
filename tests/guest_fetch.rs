//! Runs `monstervm guest fetch` into a temporary folder with the machine's apt-get and
//! checks the kernel and initramfs it writes. Skips, saying why, where apt-get is missing
//! or has no candidate for the kernel package.

use std::path::PathBuf;
use std::process::Command;

use monstervm::core::boot::linux::{load_linux, KernelFormat, LinuxBootSpec};
use monstervm::core::memory::create_guest_memory;
use monstervm::guest::cpio::{read_archive, S_IFMT, S_IFREG};
use monstervm::guest::initramfs::INIT_SCRIPT;

/// Returns why apt-get cannot download the kernel here, or `None` if it can.
fn apt_unavailable() -> Option<String> {
    let output = match Command::new("apt-cache")
        .args(["policy", "linux-image-cloud-amd64"])
        .output()
    {
        Ok(output) => output,
        Err(e) => return Some(format!("apt-cache is not available ({e})")),
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let candidate = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim);
    match candidate {
        Some(version) if version != "(none)" => None,
        _ => Some("apt has no candidate for linux-image-cloud-amd64 (run apt-get update)".into()),
    }
}

#[test]
fn fetch_writes_bootable_guest() {
    if let Some(reason) = apt_unavailable() {
        eprintln!("skipping: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest_dir = dir.path().join("guest");
    let output = Command::new(env!("CARGO_BIN_EXE_monstervm"))
        .args(["guest", "fetch", "--output", "json", "--dir"])
        .arg(&guest_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "guest fetch failed: {stderr}");
    assert!(stderr.contains("downloading busybox-static"), "{stderr}");

    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let kernel = PathBuf::from(result["kernel"].as_str().unwrap());
    let initramfs = PathBuf::from(result["initramfs"].as_str().unwrap());
    assert_eq!(kernel, guest_dir.join("vmlinuz"));
    assert_eq!(initramfs, guest_dir.join("initramfs.img"));
    let version = result["kernel_version"].as_str().unwrap().to_string();
    assert!(version.ends_with("-cloud-amd64"), "{version}");
    let modules: Vec<&str> = result["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for wanted in ["virtio_pci", "virtio_blk", "virtio_net", "pvpanic_mmio"] {
        assert!(
            modules.contains(&wanted),
            "{wanted} missing from {modules:?}"
        );
    }
    let position = |name: &str| modules.iter().position(|m| *m == name).unwrap();
    assert!(position("virtio_ring") < position("virtio_pci"));
    assert!(position("pvpanic") < position("pvpanic_mmio"));
    // The temporary download folder is gone.
    let leftovers: Vec<_> = std::fs::read_dir(&guest_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    // vmlinuz, initramfs.img, vmlinux and rootfs.img (CI installs e2fsprogs for mke2fs).
    assert_eq!(leftovers.len(), 4, "{leftovers:?}");
    let rootfs = PathBuf::from(result["rootfs"].as_str().unwrap());
    assert_eq!(rootfs, guest_dir.join("rootfs.img"));
    // The ext4 superblock starts at byte 1024 and has the magic 0xEF53 at offset 56.
    let rootfs_bytes = std::fs::read(&rootfs).unwrap();
    assert_eq!(&rootfs_bytes[1024 + 56..1024 + 58], &[0x53, 0xef]);
    let vmlinux = PathBuf::from(result["vmlinux"].as_str().unwrap());
    assert_eq!(vmlinux, guest_dir.join("vmlinux"));
    assert!(std::fs::read(&vmlinux).unwrap().starts_with(b"\x7fELF"));

    let archive = std::fs::read(&initramfs).unwrap();
    let entries = read_archive(&archive).unwrap();
    let find = |path: &str| {
        entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("{path} missing from the initramfs"))
    };
    assert_eq!(find("init").data, INIT_SCRIPT.as_bytes());
    let busybox = find("bin/busybox");
    assert_eq!(busybox.mode & S_IFMT, S_IFREG);
    assert!(busybox.data.starts_with(b"\x7fELF"));
    let load_order = String::from_utf8(find("lib/modules/load-order").data.clone()).unwrap();
    assert_eq!(load_order.lines().count(), modules.len());
    for line in load_order.lines() {
        let module = find(&format!("lib/modules/{line}"));
        assert!(module.data.starts_with(b"\x7fELF"), "{line}");
        assert!(line.starts_with(&version), "{line}");
    }
    find(&format!("lib/modules/{version}/modules.dep"));

    match Command::new("cpio")
        .args(["-t", "--quiet", "-F"])
        .arg(&initramfs)
        .output()
    {
        Ok(listing) => {
            assert!(listing.status.success(), "cpio -t rejected the initramfs");
            let names = String::from_utf8(listing.stdout).unwrap();
            assert_eq!(names.lines().count(), entries.len());
        }
        Err(e) => eprintln!("not checking with cpio -t: {e}; install it with apt-get install cpio"),
    }

    let spec = LinuxBootSpec {
        initrd: Some(initramfs),
        cmdline: "console=ttyS0".to_string(),
        ..LinuxBootSpec::new(&kernel)
    };
    let memory = create_guest_memory(256).unwrap();
    let boot = load_linux(&memory, &spec).unwrap();
    assert_eq!(boot.format, KernelFormat::BzImage);
    assert!(boot.kernel_version.unwrap().starts_with(&version));
    assert_eq!(boot.initrd.unwrap().size, archive.len() as u64);
}
