//! A per-boot cache of the KVM speed probe, so that `--backend auto` measures KVM once per
//! host boot instead of at every VM start (the probe takes up to half a second where KVM
//! emulates instructions in software).
//!
//! The cache is a small text file in a folder only the current user can write:
//! `$XDG_RUNTIME_DIR/monstervm/kvm-probe`, or `/tmp/monstervm-UID/kvm-probe`. It records
//! the kernel's boot ID, so a reboot (which may load or unload KVM) invalidates it. Any
//! file that does not parse, belongs to someone else or is group- or world-writable is
//! ignored and replaced.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

/// Set to `1` to ignore the cache and probe again.
pub const FRESH_PROBE_ENV: &str = "MONSTERVM_FRESH_KVM_PROBE";

/// A remembered probe verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedProbe {
    pub hardware_speed: bool,
    /// The probe's own summary, for the log.
    pub summary: String,
}

fn boot_id() -> Option<String> {
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_string())
}

fn cache_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("monstervm"),
        _ => PathBuf::from(format!("/tmp/monstervm-{uid}")),
    }
}

/// Returns true if `path` is ours and writable by us alone.
fn is_private(path: &std::path::Path) -> bool {
    // SAFETY: as in `cache_dir`.
    let uid = unsafe { libc::getuid() };
    match fs::symlink_metadata(path) {
        Ok(meta) => meta.uid() == uid && meta.mode() & 0o022 == 0 && !meta.file_type().is_symlink(),
        Err(_) => false,
    }
}

/// Returns the cached verdict for this boot, if any.
pub fn load() -> Option<CachedProbe> {
    if std::env::var_os(FRESH_PROBE_ENV).is_some_and(|v| v == "1") {
        return None;
    }
    let dir = cache_dir();
    let path = dir.join("kvm-probe");
    if !is_private(&dir) || !is_private(&path) {
        return None;
    }
    let text = fs::read_to_string(&path).ok()?;
    parse(&text, &boot_id()?)
}

fn parse(text: &str, boot_id: &str) -> Option<CachedProbe> {
    let mut lines = text.lines();
    if lines.next()?.strip_prefix("boot_id=")? != boot_id {
        return None;
    }
    let hardware_speed = match lines.next()?.strip_prefix("hardware_speed=")? {
        "true" => true,
        "false" => false,
        _ => return None,
    };
    let summary = lines.next()?.strip_prefix("summary=")?.to_string();
    Some(CachedProbe {
        hardware_speed,
        summary,
    })
}

/// Stores a verdict; failures only cost a probe at the next start, so they are logged.
pub fn store(probe: &CachedProbe) {
    let Some(boot_id) = boot_id() else { return };
    let dir = cache_dir();
    if let Err(e) = fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&dir)
    {
        tracing::debug!(dir = %dir.display(), error = %e, "failed to create the KVM probe cache folder");
        return;
    }
    if !is_private(&dir) {
        tracing::warn!(dir = %dir.display(), "not caching the KVM probe: the folder is not private to this user");
        return;
    }
    let text = format!(
        "boot_id={boot_id}\nhardware_speed={}\nsummary={}\n",
        probe.hardware_speed,
        probe.summary.replace('\n', " ")
    );
    let temporary = dir.join(format!("kvm-probe.{}", std::process::id()));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .and_then(|()| fs::rename(&temporary, dir.join("kvm-probe")));
    if let Err(e) = written {
        let _ = fs::remove_file(&temporary);
        tracing::debug!(dir = %dir.display(), error = %e, "failed to cache the KVM probe");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_text_round_trips() {
        let text = "boot_id=abc\nhardware_speed=false\nsummary=KVM ran 5 instructions\n";
        let parsed = parse(text, "abc").unwrap();
        assert!(!parsed.hardware_speed);
        assert_eq!(parsed.summary, "KVM ran 5 instructions");
    }

    #[test]
    fn other_boot_or_garbage_is_ignored() {
        let text = "boot_id=abc\nhardware_speed=true\nsummary=x\n";
        assert_eq!(parse(text, "def"), None);
        assert_eq!(
            parse("boot_id=abc\nhardware_speed=maybe\nsummary=x\n", "abc"),
            None
        );
        assert_eq!(parse("", "abc"), None);
        assert_eq!(parse("boot_id=abc\n", "abc"), None);
    }
}
