//! Building a test guest: the Debian kernel and a BusyBox initramfs.
//!
//! `fetch` gets the packages and writes the files, `initramfs` lays out the archive,
//! `cpio` writes and reads the newc format, and `modules` resolves module dependencies.

pub mod cpio;
pub mod fetch;
pub mod initramfs;
pub mod modules;

pub use fetch::{fetch_guest, FetchError, FetchOptions, FetchedGuest};
pub use initramfs::INIT_MARKER;
