//! Configuration, errors and logging shared by every module.

pub mod config;
pub mod logger;
