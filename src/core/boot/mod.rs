//! Guest loaders: each writes a guest into guest memory (with the firmware tables it
//! reads) and returns the vCPU state to enter it with.

pub mod acpi;
pub mod aml;
pub mod e820;
pub mod embedded;
pub mod entry;
pub mod image;
pub mod layout;
pub mod linux;
pub mod mptable;
pub mod pvh;
