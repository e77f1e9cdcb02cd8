//! MonsterVM: a virtualization engine that runs unmodified x86-64 guests on KVM or on its
//! own emulator.
//!
//! The module map: `cli` is the `monstervm` command and its shell, and `tui` the `monstervm
//! top` dashboard. `core` holds the VM model, memory, devices, the emulator's CPU and guest
//! boot, and `hypervisor` the backends behind one set of traits. `api` is the per-VM
//! control API, `storage` the disk image formats, `guest` builds the test guest, and
//! `utils` holds configuration and logging.

pub mod api;
pub mod cli;
pub mod core;
pub mod guest;
pub mod hypervisor;
pub mod storage;
pub mod tui;
pub mod utils;
