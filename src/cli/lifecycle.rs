//! The commands that manage VMs in the state directory: create, start, stop, pause,
//! resume, list, inspect, delete and logs.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::api::{ApiClient, ClientError, VmAction, VmInfo, VmMetrics, VmState};
use crate::cli::output::{self, format_duration, OutputFormat, Table};
use crate::cli::state::{StateDir, StateError, VmDir, LOCK_FD_ENV, READY_FD_ENV};
use crate::cli::vmm::TcpApi;
use crate::utils::config::VmConfig;

/// First interval between checks while waiting for a VMM to start or exit. The interval
/// doubles up to [`MAX_POLL_INTERVAL`], so a VMM that is ready within a few milliseconds
/// is seen within about as many, and a slow one costs few checks.
const FIRST_POLL_INTERVAL: Duration = Duration::from_micros(500);
/// Maximum interval between checks while waiting for a VMM to start or exit.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Creates a pipe whose ends close on exec; returns (read end, write end).
fn ready_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors that pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and no other object owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits up to `timeout` for the VMM to write to or close the readiness pipe `ready`.
/// Returns false once the pipe is closed (the VMM exited, or wrote and closed it), so the
/// caller falls back to sleeping.
fn wait_ready(ready: &OwnedFd, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd: ready.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `poll` is one valid pollfd and the count is 1.
    if unsafe { libc::poll(&mut poll, 1, millis) } <= 0 {
        return true;
    }
    let mut byte = [0u8; 1];
    // SAFETY: `byte` has room for the one byte requested, and the descriptor is open.
    let read = unsafe { libc::read(ready.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
    // A byte means "running": the next check of the API confirms it. End of file (or an
    // error) means nothing more will come.
    read == 1
}

/// Sleeps for `interval`, then doubles it up to [`MAX_POLL_INTERVAL`].
fn poll_sleep(interval: &mut Duration) {
    std::thread::sleep(*interval);
    *interval = (*interval * 2).min(MAX_POLL_INTERVAL);
}
/// How long `stop` waits for the API to accept a forced stop before it kills the VMM.
const FORCE_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long `stop` waits for the VMM to exit after a forced stop before it kills it.
const FORCE_EXIT_WAIT: Duration = Duration::from_secs(5);

/// How long `stop` waits for the kernel to reap a VMM after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Failures with their own exit status (see `docs/cli.md`).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("VM {name} is already running (pid {pid})")]
    AlreadyRunning { name: String, pid: String },
    #[error("VM {name} is not running: start it with `monstervm start {name}`")]
    NotRunning { name: String },
    #[error("VM {name} is running: stop it first, or pass --force to kill it")]
    StillRunning { name: String },
    #[error("VM {name} failed to start: {reason}")]
    StartFailed { name: String, reason: String },
    #[error("VM {name} did not become ready within {secs} s and was killed; see {log}")]
    StartTimeout {
        name: String,
        secs: u64,
        log: PathBuf,
    },
    #[error("VMM of VM {name} (pid {pid}) was still alive {secs} s after SIGKILL")]
    KillFailed { name: String, pid: u32, secs: u64 },
}

/// Returns the exit status for `error`, as documented in `docs/cli.md`.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    use crate::cli::{EXIT_CONFLICT, EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_TIMEOUT};
    if let Some(error) = error.downcast_ref::<LifecycleError>() {
        return match error {
            LifecycleError::AlreadyRunning { .. }
            | LifecycleError::NotRunning { .. }
            | LifecycleError::StillRunning { .. } => EXIT_CONFLICT,
            LifecycleError::StartTimeout { .. } => EXIT_TIMEOUT,
            LifecycleError::StartFailed { .. } | LifecycleError::KillFailed { .. } => EXIT_FAILURE,
        };
    }
    if let Some(error) = error.downcast_ref::<StateError>() {
        return match error {
            StateError::NotFound { .. } => EXIT_NOT_FOUND,
            StateError::AlreadyExists { .. } | StateError::Locked { .. } => EXIT_CONFLICT,
            _ => EXIT_FAILURE,
        };
    }
    if let Some(ClientError::Status { status, .. }) = error.downcast_ref::<ClientError>() {
        if *status == axum::http::StatusCode::CONFLICT {
            return EXIT_CONFLICT;
        }
    }
    EXIT_FAILURE
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime needs no resources that can run out")
        .block_on(future)
}

/// State shown by `list` and `inspect`: the VMM's own states plus those seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DisplayState {
    /// No VMM runs and the last run ended cleanly (or there was none).
    Stopped,
    Starting,
    Running,
    Paused,
    Stopping,
    /// No VMM runs and the last run ended in failure, for the reason in `last_error`.
    Crashed,
    /// A VMM holds the lock but its API does not respond.
    Unresponsive,
    /// The definition in `vm.toml` cannot be loaded.
    Invalid,
}

impl DisplayState {
    /// Returns the lowercase name that `list` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            DisplayState::Stopped => "stopped",
            DisplayState::Starting => "starting",
            DisplayState::Running => "running",
            DisplayState::Paused => "paused",
            DisplayState::Stopping => "stopping",
            DisplayState::Crashed => "crashed",
            DisplayState::Unresponsive => "unresponsive",
            DisplayState::Invalid => "invalid",
        }
    }
}

impl From<VmState> for DisplayState {
    fn from(state: VmState) -> DisplayState {
        match state {
            VmState::Starting => DisplayState::Starting,
            VmState::Running => DisplayState::Running,
            VmState::Paused => DisplayState::Paused,
            VmState::Stopping => DisplayState::Stopping,
        }
    }
}

/// One VM as `list` prints it. Field names are stable for scripts.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    pub name: String,
    pub state: DisplayState,
    /// VMM process ID while one runs.
    pub pid: Option<u32>,
    /// Backend in use while running; the configured choice (`auto`, `kvm`, `emulator`)
    /// otherwise.
    pub backend: Option<String>,
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u64>,
    pub uptime_secs: Option<f64>,
    /// Reason the last run failed, or the reason the VM cannot be inspected now.
    pub last_error: Option<String>,
    #[serde(skip)]
    config: Option<VmConfig>,
    #[serde(skip)]
    info: Option<VmInfo>,
}

impl VmStatus {
    /// Creates the status of VM `name` in `state` with every other field unknown.
    pub fn new(name: &str, state: DisplayState) -> VmStatus {
        VmStatus {
            name: name.to_string(),
            state,
            pid: None,
            backend: None,
            vcpus: None,
            memory_mib: None,
            uptime_secs: None,
            last_error: None,
            config: None,
            info: None,
        }
    }
}

/// Joins an error and its sources with ": ", as `{:#}` does for anyhow errors.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Finds out whether VM `vm` runs, asking its API when a VMM holds the lock. A VMM found
/// dead without having cleaned up is recorded as crashed and its stale files are removed.
pub fn observe(vm: &VmDir) -> Result<VmStatus, StateError> {
    observe_within(vm, crate::api::client::DEFAULT_TIMEOUT)
}

/// Does what [`observe`] does, but reports the VM unresponsive when its API does not
/// respond within `timeout`.
pub fn observe_within(vm: &VmDir, timeout: Duration) -> Result<VmStatus, StateError> {
    let config = vm.load_config();
    let mut status = VmStatus::new(vm.name(), DisplayState::Stopped);
    match config {
        Ok(config) => {
            status.backend = Some(config.backend.to_string());
            status.vcpus = Some(config.vcpus);
            status.memory_mib = Some(config.memory_mib);
            status.config = Some(config);
        }
        Err(error) => {
            status.state = DisplayState::Invalid;
            status.last_error = Some(error.to_string());
            return Ok(status);
        }
    }

    if vm.is_locked()? {
        status.pid = vm.read_pid();
        match block_on(
            ApiClient::unix(&vm.socket_path())
                .with_timeout(timeout)
                .info(),
        ) {
            Ok(info) => {
                status.state = info.state.into();
                status.pid = Some(info.pid);
                if !info.backend.is_empty() {
                    status.backend = Some(info.backend.clone());
                }
                status.uptime_secs = Some(info.uptime_secs);
                status.info = Some(info);
            }
            Err(_) if !vm.socket_path().exists() => status.state = DisplayState::Starting,
            Err(error) => {
                status.state = DisplayState::Unresponsive;
                status.last_error = Some(error_chain(&error));
            }
        }
        return Ok(status);
    }

    if let Some(pid) = vm.read_pid() {
        // The lock is free but the pid file remains: the VMM died without cleaning up.
        // Taking the lock keeps a concurrent `start` from losing its fresh files.
        if let Ok(_lock) = vm.try_lock() {
            if vm.read_last_error().is_none() {
                vm.write_last_error(&format!(
                    "VMM process {pid} ended without cleaning up: it was killed or crashed; see {}",
                    vm.vmm_log_path().display()
                ))?;
            }
            vm.remove_runtime_files()?;
            tracing::info!(vm = %vm.name(), pid, "removed the files of a dead VMM");
        }
    }
    if let Some(error) = vm.read_last_error() {
        status.state = DisplayState::Crashed;
        status.last_error = Some(error);
    }
    Ok(status)
}

/// `monstervm create`.
pub fn create(state: &StateDir, config: &VmConfig, format: OutputFormat) -> anyhow::Result<i32> {
    let vm = state.create_vm(config)?;
    tracing::info!(vm = %config.name, path = %vm.path().display(), "VM created");

    #[derive(Serialize)]
    struct Created<'a> {
        name: &'a str,
        path: String,
    }
    let created = Created {
        name: &config.name,
        path: vm.path().display().to_string(),
    };
    output::print(format, &created, |c| {
        format!("Created VM {} in {}\n", c.name, c.path)
    });
    Ok(crate::cli::EXIT_OK)
}

/// Options of `monstervm start`.
pub struct StartOptions {
    pub wait: Duration,
    pub tcp: Option<TcpApi>,
    pub log_level: String,
}

/// `monstervm start`: spawns the VMM detached and waits until its API reports the VM
/// running.
pub fn start(
    state: &StateDir,
    name: &str,
    options: StartOptions,
    format: OutputFormat,
) -> anyhow::Result<i32> {
    let vm = state.existing_vm(name)?;
    vm.load_config()?;
    vm.check_socket_path()?;
    let lock = vm.try_lock().map_err(|error| match error {
        StateError::Locked { name } => anyhow::Error::new(LifecycleError::AlreadyRunning {
            name,
            pid: vm
                .read_pid()
                .map_or("unknown".into(), |pid| pid.to_string()),
        }),
        other => other.into(),
    })?;

    let log_path = vm.vmm_log_path();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("failed to open {}", log_path.display()))?;
    let executable = std::env::current_exe().context("failed to find the monstervm executable")?;
    let mut command = Command::new(executable);
    command
        .arg("--state-dir")
        .arg(state.root())
        .arg("--log-level")
        .arg(&options.log_level)
        .arg("vmm")
        .arg(name)
        .env(LOCK_FD_ENV, lock.raw_fd().to_string())
        .env_remove(crate::cli::API_LISTEN_ENV)
        .env_remove(crate::cli::API_TOKEN_ENV)
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .context("failed to duplicate the log descriptor")?,
        )
        .stderr(log);
    if let Some(tcp) = &options.tcp {
        // The token travels in the environment so that `ps` does not show it.
        command
            .env(crate::cli::API_LISTEN_ENV, tcp.addr.to_string())
            .env(crate::cli::API_TOKEN_ENV, &tcp.token);
    }
    let (ready_read, ready_write) =
        ready_pipe().context("failed to create the VMM readiness pipe")?;
    let ready_fd = ready_write.as_raw_fd();
    command.env(READY_FD_ENV, ready_fd.to_string());
    let lock_fd = lock.raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls only setsid and
    // fcntl, which are async-signal-safe, on descriptors that are open in the parent.
    unsafe {
        command.pre_exec(move || {
            // A new session detaches the VMM from this terminal, so that closing the
            // terminal or pressing Ctrl-C in it does not reach the VM.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Keep the locked descriptor and the pipe's write end open across exec: the
            // VMM inherits the lock and reports readiness through the pipe.
            for fd in [lock_fd, ready_fd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }

    let started = Instant::now();
    let mut child = command.spawn().context("failed to spawn the VMM process")?;
    // The child's copy of the descriptor now holds the lock on its own, and only the
    // child's write end keeps the pipe open.
    drop(lock);
    drop(ready_write);
    let mut pipe_open = true;
    tracing::info!(vm = %name, pid = child.id(), "VMM spawned");

    let client = ApiClient::unix(&vm.socket_path());
    let mut interval = FIRST_POLL_INTERVAL;
    loop {
        if let Some(status) = child
            .try_wait()
            .context("failed to check the VMM process")?
        {
            let reason = vm.read_last_error().unwrap_or_else(|| {
                format!("the VMM exited with {status}; see {}", log_path.display())
            });
            return Err(LifecycleError::StartFailed {
                name: name.to_string(),
                reason,
            }
            .into());
        }
        if let Ok(info) = block_on(client.info()) {
            if info.state != VmState::Starting {
                break;
            }
        }
        if started.elapsed() > options.wait {
            let _ = child.kill();
            let _ = child.wait();
            if let Ok(_lock) = vm.try_lock() {
                vm.remove_runtime_files()?;
            }
            return Err(LifecycleError::StartTimeout {
                name: name.to_string(),
                secs: options.wait.as_secs(),
                log: log_path,
            }
            .into());
        }
        if pipe_open {
            pipe_open = wait_ready(&ready_read, MAX_POLL_INTERVAL);
        } else {
            poll_sleep(&mut interval);
        }
    }

    #[derive(Serialize)]
    struct Started<'a> {
        name: &'a str,
        pid: u32,
        startup_secs: f64,
    }
    let report = Started {
        name,
        pid: child.id(),
        startup_secs: started.elapsed().as_secs_f64(),
    };
    output::print(format, &report, |r| {
        format!(
            "Started VM {} (pid {}) in {:.3} s\n",
            r.name, r.pid, r.startup_secs
        )
    });
    Ok(crate::cli::EXIT_OK)
}

/// Returns an error unless a VMM of `vm` runs.
fn require_running(vm: &VmDir) -> anyhow::Result<()> {
    if !vm.is_locked()? {
        // Records a crash, if that is why it is not running.
        observe(vm)?;
        return Err(LifecycleError::NotRunning {
            name: vm.name().to_string(),
        }
        .into());
    }
    Ok(())
}

/// Waits until no process holds `vm`'s lock; returns false on timeout.
fn wait_for_exit(vm: &VmDir, timeout: Duration) -> Result<bool, StateError> {
    let deadline = Instant::now() + timeout;
    let mut interval = FIRST_POLL_INTERVAL;
    loop {
        if !vm.is_locked()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        poll_sleep(&mut interval);
    }
}

/// Returns true if process `pid` runs `monstervm ... vmm NAME`, so that a reused process
/// ID never gets killed.
fn is_vmm_of(pid: u32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2)
        .any(|pair| pair[0] == b"vmm" && pair[1] == name.as_bytes())
}

/// Result of `monstervm stop`.
#[derive(Debug, Serialize)]
pub struct Stopped {
    pub name: String,
    /// True when SIGKILL ended the VMM.
    pub killed: bool,
    pub stop_secs: f64,
}

/// `monstervm stop`: requests a stop through the API. If the VMM is still alive after
/// `timeout` (at once with `force`), it requests a forced stop, which ends the vCPUs and
/// closes the disks, and it sends SIGKILL if the VMM does not respond or exit.
pub fn stop(
    state: &StateDir,
    name: &str,
    timeout: Duration,
    force: bool,
    format: OutputFormat,
) -> anyhow::Result<i32> {
    let vm = state.existing_vm(name)?;
    let report = stop_vm(&vm, timeout, force)?;
    output::print(format, &report, |r| {
        let how = if r.killed { " (killed)" } else { "" };
        format!("Stopped VM {}{how} in {:.3} s\n", r.name, r.stop_secs)
    });
    Ok(crate::cli::EXIT_OK)
}

/// Stops the VMM of `vm` as `monstervm stop` does, without printing.
pub fn stop_vm(vm: &VmDir, timeout: Duration, force: bool) -> anyhow::Result<Stopped> {
    let name = vm.name();
    require_running(vm)?;
    let started = Instant::now();

    let mut killed = false;
    let mut exited = false;
    if !force {
        match block_on(ApiClient::unix(&vm.socket_path()).action(VmAction::Stop)) {
            Ok(()) => {
                exited = wait_for_exit(vm, timeout)?;
                if exited {
                    tracing::info!(vm = %name, secs = started.elapsed().as_secs_f64(), "the VMM exited after the stop request");
                } else {
                    tracing::warn!(vm = %name, timeout_secs = timeout.as_secs_f64(), "the VM did not stop within the timeout; killing the VMM");
                }
            }
            Err(error) => {
                tracing::warn!(vm = %name, %error, "stop through the API failed; killing the VMM")
            }
        }
    }
    if !exited {
        // The API's forced stop ends the vCPUs and still closes the disks in order, so
        // qcow2 images stay clean. SIGKILL is left for a VMM that does not respond.
        let client = ApiClient::unix(&vm.socket_path()).with_timeout(FORCE_ANSWER_TIMEOUT);
        match block_on(client.action(VmAction::ForceStop)) {
            Ok(()) => {
                exited = wait_for_exit(vm, FORCE_EXIT_WAIT)?;
                if !exited {
                    tracing::warn!(vm = %name, "the VMM did not exit after a forced stop; killing it");
                }
            }
            Err(error) => {
                tracing::warn!(vm = %name, %error, "forced stop through the API failed; killing the VMM")
            }
        }
    }
    if !exited {
        let pid = vm.read_pid().with_context(|| {
            format!(
                "pid file {} is missing although a VMM holds the VM's lock; kill the VMM by hand",
                vm.pid_path().display()
            )
        })?;
        if is_vmm_of(pid, name) {
            tracing::info!(vm = %name, pid, "killing the VMM with SIGKILL");
            // SAFETY: kill has no memory-safety preconditions; `pid` was checked above to
            // be this VM's VMM.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            killed = true;
        }
        if !wait_for_exit(vm, KILL_WAIT)? {
            return Err(LifecycleError::KillFailed {
                name: name.to_string(),
                pid,
                secs: KILL_WAIT.as_secs(),
            }
            .into());
        }
        // A killed VMM leaves its files behind; it was stopped on request, not crashed.
        if let Ok(_lock) = vm.try_lock() {
            vm.remove_runtime_files()?;
        }
    }

    Ok(Stopped {
        name: name.to_string(),
        killed,
        stop_secs: started.elapsed().as_secs_f64(),
    })
}

/// `monstervm pause` and `monstervm resume`.
pub fn act(
    state: &StateDir,
    name: &str,
    action: VmAction,
    format: OutputFormat,
) -> anyhow::Result<i32> {
    let vm = state.existing_vm(name)?;
    require_running(&vm)?;
    let client = ApiClient::unix(&vm.socket_path());
    block_on(client.action(action))?;
    let info = block_on(client.info())?;

    #[derive(Serialize)]
    struct Acted<'a> {
        name: &'a str,
        state: VmState,
    }
    let report = Acted {
        name,
        state: info.state,
    };
    output::print(format, &report, |r| {
        format!("VM {} is {}\n", r.name, r.state)
    });
    Ok(crate::cli::EXIT_OK)
}

fn dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// `monstervm list`.
pub fn list(state: &StateDir, format: OutputFormat) -> anyhow::Result<i32> {
    let mut statuses = Vec::new();
    for name in state.vm_names()? {
        statuses.push(observe(&state.vm(&name)?)?);
    }
    output::print(format, &statuses, |statuses| {
        let mut table = Table::new(&[
            "NAME", "STATE", "PID", "BACKEND", "VCPUS", "MEMORY", "UPTIME", "ERROR",
        ]);
        for s in statuses {
            // Only the first line of a multi-line error fits in a table row.
            let error = s.last_error.as_deref().and_then(|e| e.lines().next());
            table.push(vec![
                s.name.clone(),
                s.state.as_str().to_string(),
                dash(s.pid),
                dash(s.backend.as_deref()),
                dash(s.vcpus),
                dash(s.memory_mib.map(|m| format!("{m} MiB"))),
                dash(s.uptime_secs.map(format_duration)),
                dash(error),
            ]);
        }
        table.render()
    });
    Ok(crate::cli::EXIT_OK)
}

/// Paths of one VM's files, as `inspect` prints them.
#[derive(Serialize)]
struct VmPaths {
    dir: String,
    config: String,
    api_socket: String,
    serial_log: String,
    vmm_log: String,
}

#[derive(Serialize)]
struct Inspection {
    #[serde(flatten)]
    status: VmStatus,
    config: Option<VmConfig>,
    runtime: Option<VmInfo>,
    metrics: Option<VmMetrics>,
    paths: VmPaths,
}

/// `monstervm inspect`.
pub fn inspect(state: &StateDir, name: &str, format: OutputFormat) -> anyhow::Result<i32> {
    let vm = state.existing_vm(name)?;
    let status = observe(&vm)?;
    let metrics = match status.info {
        Some(_) => block_on(ApiClient::unix(&vm.socket_path()).metrics()).ok(),
        None => None,
    };
    let report = Inspection {
        config: status.config.clone(),
        runtime: status.info.clone(),
        status,
        metrics,
        paths: VmPaths {
            dir: vm.path().display().to_string(),
            config: vm.config_path().display().to_string(),
            api_socket: vm.socket_path().display().to_string(),
            serial_log: vm.serial_log_path().display().to_string(),
            vmm_log: vm.vmm_log_path().display().to_string(),
        },
    };
    output::print(format, &report, render_inspection);
    Ok(crate::cli::EXIT_OK)
}

fn render_inspection(report: &Inspection) -> String {
    let status = &report.status;
    let mut fields = vec![
        ("name", status.name.clone()),
        ("state", status.state.as_str().to_string()),
        ("pid", dash(status.pid)),
        ("backend", dash(status.backend.as_deref())),
        ("vcpus", dash(status.vcpus)),
        (
            "memory",
            dash(status.memory_mib.map(|m| format!("{m} MiB"))),
        ),
        ("uptime", dash(status.uptime_secs.map(format_duration))),
    ];
    if let Some(config) = &report.config {
        fields.push(("kernel", dash(config.kernel.as_ref().map(|p| p.display()))));
        fields.push(("initrd", dash(config.initrd.as_ref().map(|p| p.display()))));
        fields.push(("cmdline", config.effective_cmdline().to_string()));
    }
    if let Some(info) = &report.runtime {
        fields.push(("boots", info.boots.to_string()));
    }
    if let Some(metrics) = &report.metrics {
        let exits = metrics
            .exits
            .as_ref()
            .map(|e| format!("pio {} / mmio {} / halt {}", e.pio, e.mmio, e.halt));
        fields.push(("exits", dash(exits)));
        fields.push(("instructions", dash(metrics.instructions)));
        fields.push((
            "serial",
            format!(
                "{} bytes out / {} bytes in / {} viewers",
                metrics.serial.bytes_out, metrics.serial.bytes_in, metrics.serial.viewers
            ),
        ));
    }
    fields.push(("last_error", dash(status.last_error.as_deref())));
    fields.push(("dir", report.paths.dir.clone()));
    fields.push(("api_socket", report.paths.api_socket.clone()));
    fields.push(("serial_log", report.paths.serial_log.clone()));
    fields.push(("vmm_log", report.paths.vmm_log.clone()));
    output::render_fields(&fields)
}

/// `monstervm delete`.
pub fn delete(
    state: &StateDir,
    name: &str,
    force: bool,
    format: OutputFormat,
) -> anyhow::Result<i32> {
    let vm = state.existing_vm(name)?;
    let lock = match vm.try_lock() {
        Ok(lock) => lock,
        Err(StateError::Locked { .. }) if force => {
            stop_vm(&vm, Duration::ZERO, true)?;
            vm.try_lock()?
        }
        Err(StateError::Locked { .. }) => {
            return Err(LifecycleError::StillRunning {
                name: name.to_string(),
            }
            .into())
        }
        Err(other) => return Err(other.into()),
    };
    std::fs::remove_dir_all(vm.path())
        .with_context(|| format!("failed to remove {}", vm.path().display()))?;
    drop(lock);
    tracing::info!(vm = %name, "VM deleted");

    #[derive(Serialize)]
    struct Deleted<'a> {
        name: &'a str,
    }
    output::print(format, &Deleted { name }, |d| {
        format!("Deleted VM {}\n", d.name)
    });
    Ok(crate::cli::EXIT_OK)
}

/// `monstervm logs`: prints the serial log (or the VMM's log), then with `follow` keeps
/// printing what is appended until interrupted.
pub fn logs(state: &StateDir, name: &str, vmm_log: bool, follow: bool) -> anyhow::Result<i32> {
    let vm = state.existing_vm(name)?;
    let path = if vmm_log {
        vm.vmm_log_path()
    } else {
        vm.serial_log_path()
    };
    let mut stdout = std::io::stdout().lock();
    let mut offset = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match std::fs::File::open(&path) {
            Ok(mut file) => {
                let size = file.metadata()?.len();
                if size < offset {
                    // The log was rotated or truncated: start again from its beginning.
                    offset = 0;
                }
                file.seek(SeekFrom::Start(offset))?;
                loop {
                    let count = file.read(&mut buffer)?;
                    if count == 0 {
                        break;
                    }
                    stdout.write_all(&buffer[..count])?;
                    offset += count as u64;
                }
                stdout.flush()?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
        }
        if !follow {
            return Ok(crate::cli::EXIT_OK);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
