//! Resolution of `--backend` into the backend that runs the guest.

use super::{BackendChoice, BackendKind, HypervisorError};

#[cfg(target_os = "linux")]
use super::kvm::{open_kvm, probe_hardware_speed, KvmProbe};

/// The backend picked for a VM and why, for the caller to log.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSelection {
    pub kind: BackendKind,
    pub reason: String,
}

/// Resolves `choice`: a fixed backend stays as given once it is usable, and `auto` runs
/// the KVM speed probe and picks KVM only where it runs at hardware speed.
///
/// Fails only for `kvm` when KVM is unusable.
pub fn select_backend(choice: BackendChoice) -> Result<BackendSelection, HypervisorError> {
    #[cfg(target_os = "linux")]
    {
        select_backend_with(choice, || open_kvm().map(drop), probe_hardware_speed)
    }
    #[cfg(not(target_os = "linux"))]
    {
        match choice {
            BackendChoice::Kvm => Err(HypervisorError::Unsupported {
                what: "KVM on this operating system: use --backend emulator".to_string(),
            }),
            BackendChoice::Auto | BackendChoice::Emulator => Ok(BackendSelection {
                kind: BackendKind::Emulator,
                reason: "KVM exists only on Linux".to_string(),
            }),
        }
    }
}

/// Resolves `choice` as [`select_backend`] does, with the KVM check and the probe
/// passed in so that tests can replace them.
#[cfg(target_os = "linux")]
pub fn select_backend_with(
    choice: BackendChoice,
    check_kvm: impl FnOnce() -> Result<(), HypervisorError>,
    probe: impl FnOnce() -> Result<KvmProbe, HypervisorError>,
) -> Result<BackendSelection, HypervisorError> {
    let selection = |kind, reason: String| Ok(BackendSelection { kind, reason });
    match choice {
        BackendChoice::Emulator => selection(BackendKind::Emulator, "--backend emulator".into()),
        BackendChoice::Kvm => {
            check_kvm()?;
            selection(BackendKind::Kvm, "--backend kvm".into())
        }
        BackendChoice::Auto => match probe() {
            Ok(result) if result.hardware_speed => selection(BackendKind::Kvm, result.to_string()),
            Ok(result) => selection(BackendKind::Emulator, result.to_string()),
            Err(error) => {
                if !matches!(error, HypervisorError::KvmUnavailable { .. }) {
                    tracing::warn!(%error, "KVM speed probe failed, so --backend auto picks the emulator");
                }
                selection(BackendKind::Emulator, error.to_string())
            }
        },
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::time::Duration;

    use super::*;

    fn probe_result(instructions_per_second: f64) -> KvmProbe {
        KvmProbe {
            instructions: 1_000_000,
            elapsed: Duration::from_millis(1),
            instructions_per_second,
            hardware_speed: instructions_per_second >= super::super::kvm::SOFTWARE_SPEED_LIMIT,
        }
    }

    fn kvm_missing() -> Result<(), HypervisorError> {
        Err(HypervisorError::KvmUnavailable {
            path: "/dev/kvm".into(),
            reason: "No such file or directory (os error 2)".into(),
        })
    }

    #[test]
    fn auto_picks_kvm_at_hardware_speed() {
        let selection =
            select_backend_with(BackendChoice::Auto, || Ok(()), || Ok(probe_result(2e9))).unwrap();

        assert_eq!(selection.kind, BackendKind::Kvm);
        assert!(
            selection.reason.contains("hardware speed"),
            "{}",
            selection.reason
        );
    }

    #[test]
    fn auto_picks_emulator_when_kvm_slow() {
        let selection =
            select_backend_with(BackendChoice::Auto, || Ok(()), || Ok(probe_result(2e6))).unwrap();

        assert_eq!(selection.kind, BackendKind::Emulator);
        assert!(
            selection.reason.contains("software emulation"),
            "{}",
            selection.reason
        );
    }

    #[test]
    fn auto_picks_emulator_without_kvm() {
        let selection = select_backend_with(BackendChoice::Auto, kvm_missing, || {
            kvm_missing().map(|()| probe_result(0.0))
        })
        .unwrap();

        assert_eq!(selection.kind, BackendKind::Emulator);
        assert!(
            selection.reason.contains("/dev/kvm"),
            "{}",
            selection.reason
        );
    }

    #[test]
    fn fixed_kvm_fails_without_kvm() {
        let probe_unused = || -> Result<KvmProbe, HypervisorError> { panic!("probe ran") };

        let error = select_backend_with(BackendChoice::Kvm, kvm_missing, probe_unused).unwrap_err();

        assert!(error.to_string().contains("--backend emulator"), "{error}");
    }

    #[test]
    fn fixed_emulator_skips_probe() {
        let probe_unused = || -> Result<KvmProbe, HypervisorError> { panic!("probe ran") };

        let selection =
            select_backend_with(BackendChoice::Emulator, kvm_missing, probe_unused).unwrap();

        assert_eq!(selection.kind, BackendKind::Emulator);
    }
}
