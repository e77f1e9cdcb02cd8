//! The VM specification: what `monstervm run` and `monstervm create` take, loaded from
//! command-line options or from a TOML or JSON file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hypervisor::BackendChoice;

/// Default guest RAM in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Largest vCPU count accepted; the MP table and the local APIC IDs are 8-bit.
pub const MAX_VCPUS: u8 = 64;
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
    #[error("invalid TOML in config file {path}: {message}")]
    Toml { path: PathBuf, message: String },
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
                message: e.message().to_string(),
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
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Invalid {
                field: "vcpus",
                message: format!("{} is out of range: give 1 to {MAX_VCPUS}", self.vcpus),
            });
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return Err(ConfigError::Invalid {
                field: "initrd",
                message: "an initramfs needs a kernel: add --kernel".to_string(),
            });
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
    fn json_spec_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        std::fs::write(&path, r#"{"name": "a", "vcpus": 2}"#).unwrap();
        assert_eq!(VmConfig::load(&path).unwrap().vcpus, 2);
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
        ];
        for config in cases {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }
}
