//! MonsterVM: a virtualization engine that runs unmodified x86-64 guests on KVM or on its
//! own emulator.
//!
//! The module map: `cli` (the `monstervm` command and its shell), `tui` (the `monstervm
//! top` dashboard), `core` (the VM model, memory, devices, the emulator's CPU and guest
//! boot), `hypervisor` (backends behind one set of traits), `storage`, `network`,
//! `security`, `guest` (building the test guest) and `utils`.

pub mod api;
pub mod cli;
pub mod core;
pub mod guest;
pub mod hypervisor;
pub mod storage;
pub mod tui;
pub mod utils;
