//! The VM model: guest memory, buses and devices, the emulator's CPU, guest loading.

pub mod boot;
pub mod cpu;
pub mod devices;
pub mod memory;
pub mod vm;
