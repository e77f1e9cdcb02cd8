//! Guest loaders: each writes a guest into guest memory and returns the vCPU state to
//! enter it with.

pub mod embedded;
