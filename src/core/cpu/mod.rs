//! The x86-64 emulator's CPU, and the host-CPU oracle that checks it.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod oracle;
