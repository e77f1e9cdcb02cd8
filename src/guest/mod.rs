//! Building a test guest: the Debian kernel, a BusyBox initramfs and a BusyBox root disk.
//!
//! `fetch` gets the packages and writes the files, `initramfs` lays out the archive,
//! `rootfs` makes the ext4 root disk, `cpio` writes and reads the newc format, and
//! `modules` resolves module dependencies.

pub mod cpio;
pub mod fetch;
pub mod initramfs;
pub mod modules;
pub mod rootfs;

pub use fetch::{fetch_guest, FetchError, FetchOptions, FetchedGuest};
pub use initramfs::INIT_MARKER;
pub use rootfs::{ROOT_LABEL, ROOT_MARKER};
