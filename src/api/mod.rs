//! The control API of one VM process: the transport-free [`VmHandle`], its implementation
//! over the VM's control flags, the serial fan-out, and the axum server and client that
//! carry it over a Unix socket or TCP, and the web console page that the server embeds.

pub mod auth;
pub mod client;
pub mod control;
pub mod handle;
pub mod openapi;
pub mod serial;
pub mod server;
pub mod web;

pub use client::{ApiClient, ClientError};
pub use control::{Boot, ControlHandle, VmIdentity};
pub use handle::{
    ActionError, ExitCounts, SerialCounters, VmAction, VmHandle, VmInfo, VmMetrics, VmState,
};
pub use serial::{SerialHub, SerialSink, SerialSubscription};
