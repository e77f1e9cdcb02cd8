//! Guest boot: loading Linux kernels and the firmware tables they read.

pub mod acpi;
pub mod aml;
pub mod e820;
pub mod entry;
pub mod image;
pub mod layout;
pub mod linux;
pub mod lz4;
pub mod mptable;
pub mod pvh;
pub mod vmlinux;
