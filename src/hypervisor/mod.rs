//! Hypervisor backends behind one set of traits: KVM, the built-in emulator, and
//! Hypervisor.framework on macOS.

#[cfg(target_os = "linux")]
pub mod emulator;
pub mod kvm;
pub mod probe_cache;
pub mod traits;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use traits::{
    CpuState, DescriptorTable, FpuState, IoHandler, IrqChip, Segment, SharedVcpuStats, Vcpu,
    VcpuExit, VcpuKicker, VcpuStats,
};

/// Errors raised by a backend.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("KVM is not available at {path}: {reason}; use --backend emulator or --backend auto")]
    KvmUnavailable { path: String, reason: String },
    #[error("KVM call {call} failed: {source}")]
    Kvm {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the backend does not support {what}")]
    Unsupported { what: String },
    #[error("interrupt line {gsi} is out of range (0 to {max})")]
    InvalidIrq { gsi: u32, max: u32 },
    #[error("KVM speed probe failed (--backend emulator or --backend kvm skips it): {reason}")]
    ProbeFailed { reason: String },
    #[error("vCPU {id} failed: {reason}\n{state}")]
    VcpuFailed {
        id: u32,
        reason: String,
        state: Box<CpuState>,
    },
}

/// Which engine runs the guest's instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Kvm,
    Emulator,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Kvm => "kvm",
            BackendKind::Emulator => "emulator",
        })
    }
}

/// The backend requested by the user: a fixed one, or `auto` to pick the fastest that works.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Kvm,
    Emulator,
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "kvm" => Ok(BackendChoice::Kvm),
            "emulator" => Ok(BackendChoice::Emulator),
            other => Err(format!(
                "unknown backend {other:?}: expected auto, kvm or emulator"
            )),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Kvm => "kvm",
            BackendChoice::Emulator => "emulator",
        })
    }
}

/// Devices that a backend emulates in user space, by bus.
#[derive(Default)]
pub struct PlatformDevices {
    /// Devices on the port-I/O bus.
    pub pio: Vec<crate::core::devices::WindowedDevice>,
    /// Devices on the MMIO bus.
    pub mmio: Vec<crate::core::devices::WindowedDevice>,
}

/// One VM of a backend: owns the vCPUs' shared state and the interrupt controllers.
pub trait HypervisorVm: Send + Sync {
    /// The backend's kind.
    fn kind(&self) -> BackendKind;

    /// The interrupt controllers that devices raise their lines on.
    fn irq_chip(&self) -> Arc<dyn IrqChip>;

    /// Devices that this backend emulates in user space and the VM must put on its buses
    /// (the PIC, PIT and IOAPIC on the emulator; nothing on KVM, which has them in-kernel).
    fn platform_devices(&self) -> PlatformDevices;

    /// Creates vCPU `id` with the CPUID table that this backend implements.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>, HypervisorError>;
}

/// The backend chosen for a VM and why, for the log and `monstervm inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSelection {
    pub kind: BackendKind,
    pub reason: String,
}

/// Resolves `choice` to a backend. `auto` runs the KVM speed probe and picks KVM only
/// where it runs guests at hardware speed; a KVM that emulates instructions in software,
/// or none at all, gives the emulator.
pub fn select_backend(choice: BackendChoice) -> Result<BackendSelection, HypervisorError> {
    match choice {
        BackendChoice::Emulator => Ok(BackendSelection {
            kind: BackendKind::Emulator,
            reason: "requested with --backend emulator".to_string(),
        }),
        BackendChoice::Kvm => {
            kvm::open_kvm()?;
            Ok(BackendSelection {
                kind: BackendKind::Kvm,
                reason: "requested with --backend kvm".to_string(),
            })
        }
        BackendChoice::Auto => Ok(select_auto()),
    }
}

/// Picks KVM when the speed probe (cached for this host boot) says it runs at hardware
/// speed, and the emulator otherwise.
fn select_auto() -> BackendSelection {
    let verdict = match probe_cache::load() {
        Some(cached) => Ok((
            cached.hardware_speed,
            format!("{} (cached for this host boot)", cached.summary),
        )),
        None => kvm::probe_hardware_speed().map(|probe| {
            probe_cache::store(&probe_cache::CachedProbe {
                hardware_speed: probe.hardware_speed,
                summary: probe.to_string(),
            });
            (probe.hardware_speed, probe.to_string())
        }),
    };
    match verdict {
        Ok((true, summary)) => BackendSelection {
            kind: BackendKind::Kvm,
            reason: summary,
        },
        Ok((false, summary)) => BackendSelection {
            kind: BackendKind::Emulator,
            reason: format!("{summary}; the built-in emulator is faster here"),
        },
        Err(e) => BackendSelection {
            kind: BackendKind::Emulator,
            reason: format!("KVM is unusable ({e})"),
        },
    }
}
