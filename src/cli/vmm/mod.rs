//! The VMM process of one VM: `monstervm vmm NAME`, which `monstervm start` spawns.
//!
//! The process holds the VM's lock for its whole life, runs the VM on a thread of its own
//! and serves the API on `api.sock` (and on TCP when asked) until the VM ends. On a clean
//! exit it removes its pid file and sockets; when the VM fails it records why in
//! `last_error`. A process that dies without cleaning up is what `list` shows as crashed.

pub mod builder;
pub mod test_double;

use std::future::IntoFuture;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, watch};

use crate::api::control::Boot;
use crate::api::server;
use crate::api::{ControlHandle, SerialHub, VmAction, VmHandle, VmIdentity};
use crate::cli::state::{StateDir, VmDir, LOCK_FD_ENV, READY_FD_ENV};
use crate::core::vm::VmExit;
use crate::utils::config::VmConfig;
use builder::{BuildError, BuiltVm};

/// How long the API keeps serving open connections after the VM ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP listener of the API, in addition to its Unix socket.
#[derive(Debug, Clone)]
pub struct TcpApi {
    pub addr: SocketAddr,
    pub token: String,
}

/// Runs the VMM of VM `name` and returns the process exit status.
pub fn run(state: &StateDir, name: &str, tcp: Option<TcpApi>) -> anyhow::Result<i32> {
    let vm_dir = state.existing_vm(name)?;
    let inherited_lock: Option<RawFd> = match std::env::var(LOCK_FD_ENV) {
        Ok(fd) => Some(
            fd.parse()
                .with_context(|| format!("{LOCK_FD_ENV}={fd:?} is not a descriptor number"))?,
        ),
        Err(_) => None,
    };
    let ready_fd: Option<RawFd> = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|fd| fd.parse().ok())
        .filter(|&fd: &RawFd| fd > 2 && Some(fd) != inherited_lock && is_pipe(fd));
    close_inherited_descriptors(&[inherited_lock, ready_fd]);
    // SAFETY: the descriptor came from `start` through READY_FD_ENV, survived the close
    // above, and nothing else in this process owns it.
    let ready = ready_fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    let _lock = match inherited_lock {
        Some(fd) => vm_dir.adopt_lock(fd)?,
        None => vm_dir.try_lock()?,
    };
    let config = vm_dir.load_config()?;
    vm_dir.check_socket_path()?;

    // Anything here is left over from a VMM that died: the lock proves none runs now.
    vm_dir.remove_runtime_files()?;
    vm_dir.remove_file(&vm_dir.last_error_path())?;
    vm_dir.write_pid(std::process::id())?;
    record_panics(&vm_dir);
    tracing::info!(vm = %name, pid = std::process::id(), "VMM starting");

    let result = serve(&vm_dir, &config, tcp, ready);

    let code = match &result {
        Ok(VmExit::GuestPanic) => {
            tracing::error!(vm = %name, "VMM stopped: the guest kernel panicked");
            if let Err(write_error) =
                vm_dir.write_last_error("the guest kernel panicked (reported through pvpanic)")
            {
                tracing::error!(vm = %name, error = %write_error, "failed to record the last error");
            }
            crate::cli::EXIT_GUEST_PANIC
        }
        Ok(exit) => {
            tracing::info!(vm = %name, ?exit, "VMM stopped: {}", describe_exit(*exit));
            crate::cli::EXIT_OK
        }
        Err(error) => {
            tracing::error!(vm = %name, error = %format!("{error:#}"), "VMM failed");
            // A message already there came from the panic hook in this run and is the
            // more precise one.
            if vm_dir.read_last_error().is_none() {
                if let Err(write_error) = vm_dir.write_last_error(&format!("{error:#}")) {
                    tracing::error!(vm = %name, error = %write_error, "failed to record the last error");
                }
            }
            crate::cli::EXIT_FAILURE
        }
    };
    if let Err(error) = vm_dir.remove_runtime_files() {
        tracing::error!(vm = %name, %error, "failed to remove runtime files");
    }
    Ok(code)
}

/// Returns which path ended the VM, for the log that `stop` leaves behind.
fn describe_exit(exit: VmExit) -> &'static str {
    match exit {
        VmExit::PowerOff => "the guest powered off",
        VmExit::Reset => "the guest reset the machine",
        VmExit::Halted => "the guest halted for good",
        VmExit::UserStop => "the VMM ended the vCPUs on request, without the guest",
        VmExit::GuestPanic => "the guest kernel panicked (reported through pvpanic)",
    }
}

/// Returns true if `fd` is an open pipe.
fn is_pipe(fd: RawFd) -> bool {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` is a valid buffer for fstat to fill; a descriptor that is not open
    // yields EBADF.
    let result = unsafe { libc::fstat(fd, &mut stat) };
    result == 0 && stat.st_mode & libc::S_IFMT == libc::S_IFIFO
}

/// Closes every descriptor above stderr except those in `keep`.
///
/// The VMM outlives the command that started it. A descriptor that leaked into it without
/// close-on-exec (a caller's pipe, a build tool's jobserver) would stay open for the VM's
/// whole life, and the reader at the other end would never see end of file.
fn close_inherited_descriptors(keep: &[Option<RawFd>]) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        tracing::warn!("failed to list /proc/self/fd; inherited descriptors stay open");
        return;
    };
    let descriptors: Vec<RawFd> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    // The directory's own descriptor was in the list and is closed by now, so closing it
    // again fails harmlessly with EBADF.
    for fd in descriptors {
        if fd > 2 && !keep.contains(&Some(fd)) {
            // SAFETY: this runs before the VMM opens any descriptor of its own, so every
            // one listed came from the parent and no object in this process owns it.
            unsafe { libc::close(fd) };
        }
    }
}

/// Writes a panic's message to `last_error` before the default hook prints it.
fn record_panics(vm_dir: &VmDir) {
    let vm_dir = vm_dir.clone();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let _ = vm_dir.write_last_error(&format!("VMM panicked: {info}"));
        default_hook(info);
    }));
}

/// Serves the API while the VM runs; returns how the VM ended.
///
/// `ready`, the write end of `start`'s pipe, gets one byte once the first boot runs.
fn serve(
    vm_dir: &VmDir,
    config: &VmConfig,
    tcp: Option<TcpApi>,
    ready: Option<OwnedFd>,
) -> anyhow::Result<VmExit> {
    let serial_log = vm_dir.serial_log_path();
    let hub = SerialHub::new(Some(&serial_log))
        .with_context(|| format!("failed to open serial log {}", serial_log.display()))?;
    let identity = VmIdentity {
        name: config.name.clone(),
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
    };
    let handle = Arc::new(
        ControlHandle::new(identity, hub).context("failed to start the serial input thread")?,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;

    runtime.block_on(async {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let socket_path = vm_dir.socket_path();
        let unix = UnixListener::bind(&socket_path)
            .with_context(|| format!("failed to bind API socket {}", socket_path.display()))?;
        std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("failed to restrict {}", socket_path.display()))?;

        let mut servers = Vec::new();
        let router = server::router(handle.clone(), shutdown_rx.clone(), None);
        servers.push(tokio::spawn(
            axum::serve(unix, router)
                .with_graceful_shutdown(ended(shutdown_rx.clone()))
                .into_future(),
        ));
        if let Some(tcp) = tcp {
            let listener = TcpListener::bind(tcp.addr)
                .await
                .with_context(|| format!("failed to listen on {}", tcp.addr))?;
            let local = listener.local_addr()?;
            let addr_path = vm_dir.api_addr_path();
            std::fs::write(&addr_path, format!("{local}\n"))
                .with_context(|| format!("failed to write {}", addr_path.display()))?;
            tracing::info!(vm = %config.name, addr = %local, "API listening on TCP");
            let router = server::router(handle.clone(), shutdown_rx.clone(), Some(tcp.token));
            servers.push(tokio::spawn(
                axum::serve(listener, router)
                    .with_graceful_shutdown(ended(shutdown_rx.clone()))
                    .into_future(),
            ));
        }

        let (done_tx, mut done_rx) = oneshot::channel();
        let vm_thread = {
            let config = config.clone();
            let handle = handle.clone();
            std::thread::Builder::new()
                .name("vm".into())
                .spawn(move || {
                    let result = run_boots(&config, &handle, ready);
                    let _ = done_tx.send(());
                    result
                })
                .context("failed to spawn the VM thread")?
        };

        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        // Set by the first SIGTERM or SIGINT: when the guest must have powered off.
        let mut force_at: Option<tokio::time::Instant> = None;
        loop {
            let grace_over = async {
                match force_at {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut done_rx => break,
                _ = terminate.recv() => force_at = request_stop(&*handle, "SIGTERM", force_at),
                _ = interrupt.recv() => force_at = request_stop(&*handle, "SIGINT", force_at),
                _ = grace_over => {
                    tracing::warn!(
                        vm = %config.name,
                        grace_secs = SIGNAL_STOP_GRACE.as_secs(),
                        "the guest did not power off after the stop signal; ending its vCPUs"
                    );
                    let _ = handle.action(VmAction::ForceStop);
                    force_at = None;
                }
            }
        }

        let _ = shutdown_tx.send(true);
        for server in servers {
            match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => tracing::error!(vm = %config.name, %error, "API server failed"),
                Ok(Err(error)) => tracing::error!(vm = %config.name, %error, "API server task failed"),
                Err(_) => tracing::warn!(vm = %config.name, "API clients still connected after the VM ended; closing them"),
            }
        }
        match vm_thread.join() {
            Ok(result) => result,
            Err(_) => anyhow::bail!("the VM thread panicked; see vmm.log"),
        }
    })
}

async fn ended(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|ended| *ended).await;
}

/// How long the VMM waits for the guest to power off after SIGTERM or SIGINT before it
/// ends the vCPUs, as `monstervm stop` does by default.
const SIGNAL_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Requests a guest power-off on the first stop signal and returns the deadline after
/// which the VMM ends the vCPUs anyway. A repeated signal (`pending` is set) ends them
/// at once.
fn request_stop(
    handle: &dyn VmHandle,
    signal: &str,
    pending: Option<tokio::time::Instant>,
) -> Option<tokio::time::Instant> {
    let name = handle.info().name;
    // ControlHandle accepts a stop in every state, so the results have nothing to report.
    if pending.is_some() {
        tracing::warn!(vm = %name, signal, "stop signal repeated; ending the vCPUs now");
        let _ = handle.action(VmAction::ForceStop);
        return None;
    }
    tracing::info!(
        vm = %name,
        signal,
        grace_secs = SIGNAL_STOP_GRACE.as_secs(),
        "asking the guest to power off on a signal"
    );
    let _ = handle.action(VmAction::Stop);
    Some(tokio::time::Instant::now() + SIGNAL_STOP_GRACE)
}

fn build(config: &VmConfig, handle: &ControlHandle) -> Result<BuiltVm, BuildError> {
    let serial_out = handle.serial().sink();
    if test_double::requested() {
        tracing::warn!(vm = %config.name, "building the lifecycle TEST DOUBLE instead of a real VM");
        return test_double::build(config, serial_out);
    }
    builder::build_vm(config, serial_out)
}

/// Builds and runs the VM, and builds it again after each API reset. Tells `start`
/// through `ready` when the first boot runs.
fn run_boots(
    config: &VmConfig,
    handle: &ControlHandle,
    mut ready: Option<OwnedFd>,
) -> anyhow::Result<VmExit> {
    loop {
        let BuiltVm {
            mut vm,
            backend,
            serial_input,
            stats,
            power_button,
        } = build(config, handle)?;
        handle.attach(Boot {
            control: vm.control().clone(),
            io: vm.io().clone(),
            serial_input,
            stats,
            power_button,
            backend,
        });
        if let Some(ready) = ready.take() {
            // Closing the descriptor after the byte ends `start`'s wait either way. A
            // failed write only makes `start` fall back to polling the API.
            let _ = std::fs::File::from(ready).write_all(b"r");
        }

        let exit = vm.run();
        let boot_again = handle.detach();
        match exit {
            Ok(VmExit::Reset) if boot_again => {
                tracing::info!(vm = %config.name, "booting again after an API reset");
            }
            Ok(exit) => return Ok(exit),
            Err(error) => return Err(error.into()),
        }
    }
}
