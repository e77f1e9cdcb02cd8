//! The VM specification: what `monstervm run` and `monstervm create` take, loaded from
//! command-line options or from a TOML or JSON file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hypervisor::BackendChoice;

/// Default guest RAM in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Largest vCPU count accepted; the MP table and the local APIC IDs are 8-bit.
pub const MAX_VCPUS: u8 = 64;
/// Range of `vcpus`.
pub const VCPUS_LIMIT: NumericLimit = NumericLimit {
    min: 1,
    max: MAX_VCPUS as u64,
    unit: "vCPUs",
};
/// Range of `memory_mib`. The minimum is what the boot structures need. The maximum, 1 TiB,
/// keeps byte sizes far from u64 overflow, and the host's own RAM is checked when the VM
/// is built.
pub const MEMORY_MIB_LIMIT: NumericLimit = NumericLimit {
    min: crate::core::memory::MIN_MEMORY_MIB,
    max: 1 << 20,
    unit: "MiB",
};
/// Largest number of disks: PCI bus 0 has 32 slots and the host bridge takes slot 0.
pub const MAX_DISKS: usize = 31;
/// Longest disk serial number in bytes, the size of virtio-blk's GET_ID response.
pub const MAX_DISK_SERIAL_BYTES: usize = 20;
/// Largest config file read, in bytes; a VM spec is a few hundred bytes.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Errors raised while loading or checking a VM spec.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("invalid TOML in config file {path}{location}: {message}")]
    Toml {
        path: PathBuf,
        /// ", line N, key K" where the parser's span locates the error, or empty.
        location: String,
        message: String,
    },
    #[error("invalid JSON in config file {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid value for {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// The inclusive range of a numeric setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NumericLimit {
    pub min: u64,
    pub max: u64,
    /// Unit named in messages, such as "MiB".
    pub unit: &'static str,
}

impl NumericLimit {
    /// Returns the allowed range as a phrase for messages.
    pub fn describe(&self) -> String {
        format!("give {} to {} {}", self.min, self.max, self.unit)
    }

    /// Returns `value` if it lies in the range, or a message naming it and the range.
    pub fn check(&self, value: u64) -> Result<u64, String> {
        if (self.min..=self.max).contains(&value) {
            Ok(value)
        } else {
            Err(format!("{value} is out of range: {}", self.describe()))
        }
    }
}

/// One VM's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Name used in logs, the state directory and the API.
    #[serde(default = "default_name")]
    pub name: String,
    /// Linux kernel (bzImage or ELF vmlinux); `None` boots the embedded guest.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initramfs loaded next to the kernel.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` uses [`default_cmdline`].
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Which engine runs the guest.
    #[serde(default)]
    pub backend: BackendChoice,
    /// Virtio-blk disks, in the order the guest enumerates them (vda, vdb, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
}

/// One virtio-blk disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Image file; a relative path is relative to the working directory of the VMM.
    pub path: PathBuf,
    /// Present the disk to the guest as read-only and open the image without write access.
    #[serde(default)]
    pub read_only: bool,
    /// Image format; `auto` opens a file with the qcow2 magic as qcow2 and anything else as
    /// raw.
    #[serde(default)]
    pub format: DiskFormat,
    /// Whether the image may name backing or external data files.
    #[serde(default)]
    pub backing: DiskBacking,
    /// Serial number the guest reads with GET_ID (for example /sys/block/vda/serial), at
    /// most 20 printable ASCII bytes; `None` uses the disk's position, `disk0`, `disk1`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Whether the image is locked against other writers, with QEMU's lock bytes.
    #[serde(default, skip_serializing_if = "DiskLocking::is_on")]
    pub locking: DiskLocking,
}

/// Image format of a [`DiskConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Auto,
    Raw,
    Qcow2,
}

/// Backing-file policy of a [`DiskConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBacking {
    /// Follow backing files named by the image.
    #[default]
    Allow,
    /// Reject an image that names any other file: the setting for untrusted images.
    Deny,
}

/// Image locking of a [`DiskConfig`], as QEMU's `file.locking` option sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskLocking {
    /// Lock the image: writing excludes every other user, and reading excludes writers.
    #[default]
    On,
    /// Take no lock, for file systems without OFD locks or writers coordinated otherwise.
    Off,
}

impl DiskLocking {
    fn is_on(&self) -> bool {
        *self == DiskLocking::On
    }
}

/// Keys accepted after the path in `--disk PATH,KEY=VALUE,...`, for error messages.
const DISK_KEYS: &str =
    "readonly, format=auto|raw|qcow2, backing=allow|deny, serial=S, locking=on|off";

impl DiskConfig {
    /// Creates a writable disk of detected format with backing files allowed.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            read_only: false,
            format: DiskFormat::Auto,
            backing: DiskBacking::Allow,
            serial: None,
            locking: DiskLocking::On,
        }
    }

    /// Checks the values that need no file system access.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(invalid_disk("the image path is empty".to_string()));
        }
        if let Some(serial) = &self.serial {
            if serial.is_empty()
                || serial.len() > MAX_DISK_SERIAL_BYTES
                || !serial.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid_disk(format!(
                    "serial {serial:?} of {} must be 1 to {MAX_DISK_SERIAL_BYTES} printable ASCII characters without spaces",
                    self.path.display()
                )));
            }
        }
        Ok(())
    }
}

fn invalid_disk(message: String) -> ConfigError {
    ConfigError::Invalid {
        field: "disk",
        message,
    }
}

fn parse_switch(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(invalid_disk(format!(
            "invalid value {value:?} for {key}: use on or off"
        ))),
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;

    /// Parses `PATH[,readonly][,format=raw|qcow2][,backing=deny][,serial=S][,locking=off]`.
    ///
    /// NOTE: the first comma ends the path, so an image whose path contains a comma must
    /// be given in a config file instead.
    fn from_str(text: &str) -> Result<Self, ConfigError> {
        let mut parts = text.split(',');
        let path = parts.next().unwrap_or_default();
        let mut disk = DiskConfig::new(path);
        let mut seen: Vec<&str> = Vec::new();
        for option in parts {
            let (key, value) = match option.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (option, None),
            };
            // `ro` is another spelling of `readonly`, so both count as one key.
            let canonical = if key == "ro" { "readonly" } else { key };
            if seen.contains(&canonical) {
                return Err(invalid_disk(format!(
                    "duplicate option {canonical:?} in {text:?}: give each key once; supported: {DISK_KEYS}"
                )));
            }
            seen.push(canonical);
            match (key, value) {
                ("readonly" | "ro", None) => disk.read_only = true,
                ("readonly" | "ro", Some(value)) => disk.read_only = parse_switch(key, value)?,
                ("format", Some("auto")) => disk.format = DiskFormat::Auto,
                ("format", Some("raw")) => disk.format = DiskFormat::Raw,
                ("format", Some("qcow2")) => disk.format = DiskFormat::Qcow2,
                ("backing", Some("allow")) => disk.backing = DiskBacking::Allow,
                ("backing", Some("deny")) => disk.backing = DiskBacking::Deny,
                ("serial", Some(serial)) => disk.serial = Some(serial.to_string()),
                ("locking", Some(value)) => {
                    disk.locking = if parse_switch(key, value)? {
                        DiskLocking::On
                    } else {
                        DiskLocking::Off
                    }
                }
                ("format" | "backing" | "serial" | "locking", value) => {
                    return Err(invalid_disk(format!(
                        "invalid value {:?} for {key} in {text:?}; supported: {DISK_KEYS}",
                        value.unwrap_or("")
                    )))
                }
                _ => {
                    return Err(invalid_disk(format!(
                        "unknown option {option:?} in {text:?}; supported: {DISK_KEYS}"
                    )))
                }
            }
        }
        disk.validate()?;
        Ok(disk)
    }
}

/// Describes where `span` of a TOML document lies: ", line N, key K (in [TABLE])" with
/// the parts that can be found, or an empty string without a span.
///
/// serde's type errors name only the expected type, so the key comes from the line the
/// span starts on: the text before its `=`, or the key itself for an unknown-key error.
fn toml_location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line_number = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = &text[line_start..line_end];

    let mut location = format!(", line {line_number}");
    let key = match line.split_once('=') {
        Some((key, _)) => key.trim(),
        None => text[start..span.end.min(line_end).max(start)].trim(),
    };
    if !key.is_empty() && !key.starts_with('[') {
        location.push_str(&format!(", key {key}"));
        let table = before
            .lines()
            .rev()
            .map(str::trim)
            .find(|line| line.starts_with('['));
        if let Some(table) = table {
            location.push_str(&format!(" (in {table})"));
        }
    }
    location
}

fn default_name() -> String {
    "vm0".to_string()
}

fn default_memory() -> u64 {
    DEFAULT_MEMORY_MIB
}

fn default_vcpus() -> u8 {
    1
}

/// The command line used when none is given: serial console, and a failure or reboot
/// ends the VM instead of hanging it.
///
/// `tsc=reliable` turns off the kernel's TSC watchdog. Both backends give the guest a TSC
/// that follows the host's monotonic clock, but on the emulator the PIT ticks that the
/// watchdog compares against arrive late while the guest runs slowly, and the kernel would
/// otherwise drop the TSC for the coarse jiffies clock.
pub fn default_cmdline() -> &'static str {
    "console=ttyS0 reboot=k panic=-1 tsc=reliable"
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: default_name(),
            kernel: None,
            initrd: None,
            cmdline: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
            backend: BackendChoice::Auto,
            disks: Vec::new(),
        }
    }
}

impl VmConfig {
    /// Loads a spec from a `.json` file, or from TOML for any other extension.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
                size,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;

        let config: VmConfig = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|source| ConfigError::Json {
                path: path.to_path_buf(),
                source,
            })?
        } else {
            toml::from_str(&text).map_err(|e| ConfigError::Toml {
                path: path.to_path_buf(),
                location: toml_location(&text, e.span()),
                message: e.message().trim_end().replace('\n', ", "),
            })?
        };
        config.validate()?;
        Ok(config)
    }

    /// Serializes the spec as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a VmConfig always serializes to TOML")
    }

    /// Checks the values that need no file system access.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            || self.name.starts_with('.')
        {
            return Err(ConfigError::Invalid {
                field: "name",
                message: format!(
                    "{:?} must be 1 to 64 characters of letters, digits, '-', '_' or '.', not starting with '.'",
                    self.name
                ),
            });
        }
        if let Err(message) = VCPUS_LIMIT.check(self.vcpus.into()) {
            return Err(ConfigError::Invalid {
                field: "vcpus",
                message,
            });
        }
        if let Err(message) = MEMORY_MIB_LIMIT.check(self.memory_mib) {
            return Err(ConfigError::Invalid {
                field: "memory_mib",
                message,
            });
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return Err(ConfigError::Invalid {
                field: "initrd",
                message: "an initramfs needs a kernel: add --kernel".to_string(),
            });
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::Invalid {
                field: "disks",
                message: format!(
                    "{} disks given, but PCI bus 0 holds at most {MAX_DISKS}",
                    self.disks.len()
                ),
            });
        }
        for disk in &self.disks {
            disk.validate()?;
        }
        if let Some(cmdline) = &self.cmdline {
            if cmdline.len() >= 2048 || cmdline.contains('\0') {
                return Err(ConfigError::Invalid {
                    field: "cmdline",
                    message: "must be shorter than 2048 bytes and contain no NUL byte".to_string(),
                });
            }
        }
        Ok(())
    }

    /// Returns the kernel command line in effect.
    pub fn effective_cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(default_cmdline())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_spec_loads_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(
            &path,
            "name = \"web\"\nmemory_mib = 512\nbackend = \"emulator\"\n",
        )
        .unwrap();

        let config = VmConfig::load(&path).unwrap();
        assert_eq!(config.name, "web");
        assert_eq!(config.memory_mib, 512);
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.backend, BackendChoice::Emulator);
        assert_eq!(config.kernel, None);
    }

    #[test]
    fn toml_round_trips() {
        let config = VmConfig {
            kernel: Some("/boot/vmlinuz".into()),
            cmdline: Some("console=ttyS0".into()),
            ..VmConfig::default()
        };
        let parsed: VmConfig = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(parsed, config);
    }

    #[test]
    fn unknown_field_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(&path, "memroy_mib = 512\n").unwrap();

        let message = VmConfig::load(&path).unwrap_err().to_string();
        assert!(message.contains("memroy_mib"), "{message}");
    }

    #[test]
    fn toml_type_error_names_line_key_and_type() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(&path, "name = \"web\"\nvcpus = \"two\"\n").unwrap();

        let message = VmConfig::load(&path).unwrap_err().to_string();
        assert!(message.contains("vm.toml"), "{message}");
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("key vcpus"), "{message}");
        assert!(message.contains("expected u8"), "{message}");
    }

    #[test]
    fn toml_error_in_table_names_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(
            &path,
            "memory_mib = 64\n\n[[disks]]\npath = \"a.img\"\nread_only = \"yes\"\n",
        )
        .unwrap();

        let message = VmConfig::load(&path).unwrap_err().to_string();
        assert!(message.contains("line 5"), "{message}");
        assert!(
            message.contains("key read_only (in [[disks]])"),
            "{message}"
        );
        assert!(message.contains("expected a boolean"), "{message}");
    }

    #[test]
    fn json_spec_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        std::fs::write(&path, r#"{"name": "a", "vcpus": 2}"#).unwrap();
        assert_eq!(VmConfig::load(&path).unwrap().vcpus, 2);
    }

    #[test]
    fn disk_option_parses_every_key() {
        let disk: DiskConfig = "img/a.qcow2,readonly,format=qcow2,backing=deny,serial=root-1"
            .parse()
            .unwrap();
        assert_eq!(disk.path, PathBuf::from("img/a.qcow2"));
        assert!(disk.read_only);
        assert_eq!(disk.format, DiskFormat::Qcow2);
        assert_eq!(disk.backing, DiskBacking::Deny);
        assert_eq!(disk.serial.as_deref(), Some("root-1"));

        let plain: DiskConfig = "disk.img".parse().unwrap();
        assert_eq!(plain, DiskConfig::new("disk.img"));
        let explicit: DiskConfig = "disk.img,readonly=off,format=raw".parse().unwrap();
        assert!(!explicit.read_only);
        assert_eq!(explicit.format, DiskFormat::Raw);
        assert_eq!(explicit.locking, DiskLocking::On);
        let unlocked: DiskConfig = "disk.img,locking=off".parse().unwrap();
        assert_eq!(unlocked.locking, DiskLocking::Off);
    }

    #[test]
    fn disk_option_errors_name_key_or_value() {
        let cases = [
            ("a.img,redonly", "\"redonly\""),
            ("a.img,format=vmdk", "\"vmdk\""),
            ("a.img,backing=maybe", "\"maybe\""),
            ("a.img,readonly=perhaps", "\"perhaps\""),
            ("a.img,serial=has space", "\"has space\""),
            (
                "a.img,serial=123456789012345678901",
                "123456789012345678901",
            ),
            (",readonly", "path is empty"),
        ];
        for (text, expected) in cases {
            let message = text.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(message.contains(expected), "{text}: {message}");
        }
    }

    #[test]
    fn disk_option_rejects_duplicate_and_unknown_keys() {
        let cases = [
            (
                "a.img,format=raw,format=qcow2",
                "duplicate option \"format\"",
            ),
            ("a.img,format=raw,format=raw", "duplicate option \"format\""),
            ("a.img,readonly,ro", "duplicate option \"readonly\""),
            ("a.img,serial=a,serial=b", "duplicate option \"serial\""),
            (
                "a.img,locking=off,locking=on",
                "duplicate option \"locking\"",
            ),
            ("a.img,size=1G", "unknown option \"size=1G\""),
        ];
        for (text, expected) in cases {
            let message = text.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(message.contains(expected), "{text}: {message}");
            assert!(
                message.contains(&format!("supported: {DISK_KEYS}")),
                "{text}: {message}"
            );
        }
    }

    #[test]
    fn disks_load_from_toml_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("vm.toml");
        std::fs::write(
            &toml_path,
            "[[disks]]\npath = \"root.qcow2\"\nformat = \"qcow2\"\nbacking = \"deny\"\n\n\
             [[disks]]\npath = \"data.img\"\nread_only = true\nserial = \"data\"\n",
        )
        .unwrap();
        let config = VmConfig::load(&toml_path).unwrap();
        assert_eq!(config.disks.len(), 2);
        assert_eq!(config.disks[0].format, DiskFormat::Qcow2);
        assert_eq!(config.disks[0].backing, DiskBacking::Deny);
        assert!(config.disks[1].read_only);
        assert_eq!(config.disks[1].serial.as_deref(), Some("data"));

        let parsed: VmConfig = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(parsed, config);

        let json_path = dir.path().join("vm.json");
        std::fs::write(
            &json_path,
            r#"{"disks": [{"path": "a.img", "format": "raw"}]}"#,
        )
        .unwrap();
        assert_eq!(
            VmConfig::load(&json_path).unwrap().disks[0].format,
            DiskFormat::Raw
        );
    }

    #[test]
    fn disk_spec_rejects_unknown_key_and_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(&path, "[[disks]]\npath = \"a.img\"\nreadonly = true\n").unwrap();
        let message = VmConfig::load(&path).unwrap_err().to_string();
        assert!(message.contains("readonly"), "{message}");

        std::fs::write(&path, "[[disks]]\npath = \"a.img\"\nformat = \"vmdk\"\n").unwrap();
        let message = VmConfig::load(&path).unwrap_err().to_string();
        assert!(message.contains("vmdk"), "{message}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        let cases = [
            VmConfig {
                vcpus: 0,
                ..VmConfig::default()
            },
            VmConfig {
                name: "../x".into(),
                ..VmConfig::default()
            },
            VmConfig {
                initrd: Some("i".into()),
                ..VmConfig::default()
            },
            VmConfig {
                cmdline: Some("a\0b".into()),
                ..VmConfig::default()
            },
            VmConfig {
                disks: vec![DiskConfig::new("a.img"); MAX_DISKS + 1],
                ..VmConfig::default()
            },
        ];
        for config in cases {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }
}
