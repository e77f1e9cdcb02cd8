//! Building a test guest: the Debian kernel and a BusyBox initramfs.
