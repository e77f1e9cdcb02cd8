//! Loads a real distribution kernel: `guest/vmlinuz` (from `monstervm guest fetch`) or the
//! first `/boot/vmlinuz-*`. Skips, saying why, where neither exists.

use std::path::PathBuf;

use monstervm::core::boot::linux::{load_linux, EntryProtocol, KernelFormat, LinuxBootSpec};
use monstervm::core::memory::create_guest_memory;
use vm_memory::{Bytes, GuestAddress};

fn find_kernel() -> Option<PathBuf> {
    let fetched = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest/vmlinuz");
    if fetched.is_file() {
        return Some(fetched);
    }
    let mut boot: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("vmlinuz-"))
        })
        .collect();
    boot.sort();
    boot.pop()
}

#[test]
fn real_kernel_loads() {
    let Some(kernel) = find_kernel() else {
        eprintln!(
            "skipping: no guest/vmlinuz (run `monstervm guest fetch`) and no /boot/vmlinuz-*"
        );
        return;
    };
    let bytes = std::fs::read(&kernel).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"070701 not a real archive").unwrap();
    let spec = LinuxBootSpec {
        initrd: Some(initrd),
        cmdline: "console=ttyS0 panic=-1".to_string(),
        ..LinuxBootSpec::new(&kernel)
    };

    let memory = create_guest_memory(256).unwrap();
    let boot = load_linux(&memory, &spec).unwrap();

    assert_eq!(boot.format, KernelFormat::BzImage, "{}", kernel.display());
    assert_eq!(boot.protocol, EntryProtocol::Linux64);
    assert_eq!(boot.cpu_state.rip, 0x10_0200);
    let version = boot
        .kernel_version
        .expect("a distribution bzImage has a version string");
    assert!(
        version.chars().next().unwrap().is_ascii_digit(),
        "{version}"
    );

    // The protected-mode code starts after (setup_sects + 1) sectors of the file.
    let setup_size = (usize::from(bytes[0x1f1]) + 1) * 512;
    let mut loaded = vec![0u8; 4096];
    memory
        .read_slice(&mut loaded, GuestAddress(0x10_0000))
        .unwrap();
    assert_eq!(loaded, bytes[setup_size..setup_size + 4096]);

    let initrd = boot.initrd.unwrap();
    assert!(initrd.address >= boot.kernel_required_end);
    assert!(initrd.address + initrd.size <= 256 << 20);
    eprintln!("loaded {} ({version})", kernel.display());
}
