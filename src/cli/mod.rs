//! The `monstervm` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Writes to stderr like `eprint!` but ignores failures: a stderr whose reader went away
/// (EPIPE) must not end a command with a panic.
macro_rules! report_inline {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

/// Writes a line to stderr like `eprintln!` but ignores failures, as [`report_inline!`].
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod disk;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::api::VmAction;
use crate::core::vm::builder::{build_vm, BuiltVm, GuestKind};
use crate::core::vm::console::ConsoleInput;
use crate::core::vm::{StopReason, VmExit};
use crate::hypervisor::BackendChoice;
use crate::utils::config::{DiskConfig, VmConfig};
use crate::utils::logger;

pub mod console;
pub mod lifecycle;
pub mod numbers;
pub mod output;
pub mod shell;
pub mod signals;
pub mod state;
pub mod terminal;
pub mod vmm;

use output::OutputFormat;
use signals::StopSignal;
use state::StateDir;

/// Exit status for success, including a guest that powered off.
pub const EXIT_OK: i32 = 0;
/// Exit status for a failure: bad input, a backend error or a guest crash.
pub const EXIT_FAILURE: i32 = 1;
/// Exit status for invalid command-line usage (as clap reports it).
pub const EXIT_USAGE: i32 = 2;
/// Exit status when the named VM does not exist.
pub const EXIT_NOT_FOUND: i32 = 3;
/// Exit status when the VM's state does not allow the command (already exists, already
/// running, not running, already paused, ...).
pub const EXIT_CONFLICT: i32 = 4;
/// Exit status when a VM did not become ready in time.
pub const EXIT_TIMEOUT: i32 = 5;
/// Exit status when the guest kernel reported a panic through the pvpanic device.
pub const EXIT_GUEST_PANIC: i32 = 6;

/// Environment variable read by `start` and `vmm` for the API's TCP address.
pub const API_LISTEN_ENV: &str = "MONSTERVM_API_LISTEN";
/// Environment variable read by `start` and `vmm` for the API's bearer token.
pub const API_TOKEN_ENV: &str = "MONSTERVM_API_TOKEN";
/// Environment variable read for `--output` when the option is absent.
pub const OUTPUT_ENV: &str = "MONSTERVM_OUTPUT";
/// Environment variable read for `--log-level` when the option is absent.
pub const LOG_LEVEL_ENV: &str = "MONSTERVM_LOG";
/// Shortest bearer token accepted, in bytes.
pub const MIN_TOKEN_BYTES: usize = 16;

#[derive(Parser, Debug)]
#[command(
    name = "monstervm",
    version,
    about = "Run fast, observable virtual machines"
)]
struct Cli {
    /// Log filter: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "warn", env = LOG_LEVEL_ENV)]
    log_level: String,

    /// Folder that contains the VMs made by `create` [default: $XDG_STATE_HOME/monstervm or
    /// ~/.local/state/monstervm].
    #[arg(long, global = true, value_name = "DIR", env = state::STATE_DIR_ENV)]
    state_dir: Option<PathBuf>,

    /// Output of commands that print data: aligned tables, or JSON for scripts. No short
    /// form, because `disk create` and `disk convert` take qemu-img's `-o OPTS`.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table, env = OUTPUT_ENV)]
    output: OutputFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM in the foreground with its serial console on this terminal.
    Run(RunArgs),
    /// Store a VM definition in the state directory.
    Create(CreateArgs),
    /// Launch the VM's VMM process in the background and wait until the VM runs.
    Start(StartArgs),
    /// Stop a running VM: ask through its API, then kill its VMM after --timeout.
    Stop(StopArgs),
    /// Pause a running VM's vCPUs.
    Pause(NameArg),
    /// Resume a paused VM.
    Resume(NameArg),
    /// List the VMs in the state directory with their state.
    #[command(visible_alias = "ls")]
    List,
    /// Show a VM's definition, state, counters and files.
    Inspect(NameArg),
    /// Remove a VM and its files from the state directory.
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
    /// Print a VM's serial log (or its VMM's log with --vmm).
    Logs(LogsArgs),
    /// Attach this terminal to a running VM's serial console; Ctrl-] detaches.
    Console(NameArg),
    /// Show a live dashboard of every VM, with keys to start, stop, pause and attach.
    Top,
    /// Read monstervm commands line by line, with history and tab completion.
    Shell,
    /// The VMM process of one VM, as `start` spawns it.
    #[command(hide = true)]
    Vmm(VmmArgs),
    /// Build or fetch test guests.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Create, inspect, check, convert, resize and snapshot disk images.
    Disk(disk::DiskArgs),
}

#[derive(Args, Debug)]
pub struct NameArg {
    /// Name of the VM.
    pub name: String,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Name of the VM: letters, digits, '-', '_' and '.', at most 64 characters.
    pub name: String,
    #[command(flatten)]
    pub vm: VmArgs,
}

/// The API's TCP listener options, shared by `start` and `vmm`.
#[derive(Args, Debug)]
pub struct TcpApiArgs {
    /// Also serve the API on this TCP address (for example 127.0.0.1:8080); needs
    /// --api-token.
    #[arg(long, value_name = "ADDR", env = API_LISTEN_ENV, requires = "api_token")]
    pub api_listen: Option<SocketAddr>,
    /// Bearer token that TCP clients must send, at least 16 characters.
    #[arg(long, value_name = "TOKEN", env = API_TOKEN_ENV, hide_env_values = true)]
    pub api_token: Option<String>,
}

impl TcpApiArgs {
    fn to_tcp_api(&self) -> anyhow::Result<Option<vmm::TcpApi>> {
        let (Some(addr), Some(token)) = (self.api_listen, &self.api_token) else {
            return Ok(None);
        };
        if token.len() < MIN_TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!(
                "invalid --api-token: give at least {MIN_TOKEN_BYTES} printable ASCII characters without spaces"
            );
        }
        Ok(Some(vmm::TcpApi {
            addr,
            token: token.clone(),
        }))
    }
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// Name of the VM.
    pub name: String,
    /// Seconds to wait for the VM to run before killing its VMM and failing, up to 604800.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = numbers::parse_timeout_secs)]
    pub timeout: u64,
    #[command(flatten)]
    pub tcp: TcpApiArgs,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// Name of the VM.
    pub name: String,
    /// Seconds to wait after the stop request before killing the VMM with SIGKILL, up to
    /// 604800.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = numbers::parse_timeout_secs)]
    pub timeout: u64,
    /// Kill the VMM with SIGKILL at once.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Name of the VM.
    pub name: String,
    /// Kill the VM first if it is running.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Name of the VM.
    pub name: String,
    /// Keep printing what is appended, until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print the VMM's own log instead of the guest's serial output.
    #[arg(long)]
    pub vmm: bool,
}

#[derive(Args, Debug)]
pub struct VmmArgs {
    /// Name of the VM.
    pub name: String,
    #[command(flatten)]
    pub tcp: TcpApiArgs,
}

#[derive(Subcommand, Debug)]
enum GuestCommand {
    /// Download Debian's cloud kernel and BusyBox and write DIR/vmlinuz,
    /// DIR/initramfs.img, DIR/vmlinux and the ext4 root disk DIR/rootfs.img.
    Fetch(GuestFetchArgs),
}

#[derive(Args, Debug)]
pub struct GuestFetchArgs {
    /// Folder for vmlinuz, initramfs.img and vmlinux, created if missing.
    #[arg(long, value_name = "DIR", default_value = "guest")]
    pub dir: PathBuf,
    /// Use the linux-image-<version>-cloud-amd64 and busybox-static .deb files in FOLDER
    /// instead of downloading them with apt-get.
    #[arg(long, value_name = "FOLDER")]
    pub debs: Option<PathBuf>,
}

/// Options shared by `run` and `create`.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Linux kernel to boot (bzImage or ELF vmlinux); without it the embedded guest boots.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to load beside the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1 tsc=reliable"].
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest RAM in MiB, 2 to 1048576 [default: 256].
    #[arg(long, value_name = "MIB", value_parser = numbers::parse_memory_mib)]
    pub memory: Option<u64>,
    /// Number of virtual CPUs, 1 to 64 [default: 1].
    #[arg(long, value_name = "N", value_parser = numbers::parse_vcpus)]
    pub vcpus: Option<u8>,
    /// Engine that runs the guest: auto picks KVM only where it runs at hardware speed.
    #[arg(long, value_name = "auto|kvm|emulator")]
    pub backend: Option<BackendChoice>,
    /// Virtio-blk disk, repeatable: the first is /dev/vda in the guest, the next vdb.
    /// `readonly` shows it read-only, `format` skips detection, `backing=deny` rejects
    /// images that name other files (for untrusted images), `serial` sets the ID the guest
    /// reads, and `locking=off` skips the QEMU-compatible image lock. Replaces the disks of
    /// --config.
    #[arg(
        long = "disk",
        value_name = "PATH[,readonly][,format=raw|qcow2][,backing=deny][,serial=S][,locking=off]"
    )]
    pub disks: Vec<DiskConfig>,
    /// VM spec in TOML (or JSON with a .json extension); options given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
}

impl VmArgs {
    /// Builds the VM spec: the config file if given, then the options on top.
    pub fn to_config(&self) -> anyhow::Result<VmConfig> {
        let mut config = match &self.config {
            Some(path) => VmConfig::load(path)?,
            None => VmConfig::default(),
        };
        if let Some(kernel) = &self.kernel {
            config.kernel = Some(kernel.clone());
        }
        if let Some(initrd) = &self.initrd {
            config.initrd = Some(initrd.clone());
        }
        if let Some(cmdline) = &self.cmdline {
            config.cmdline = Some(cmdline.clone());
        }
        if let Some(memory) = self.memory {
            config.memory_mib = memory;
        }
        if let Some(vcpus) = self.vcpus {
            config.vcpus = vcpus;
        }
        if let Some(backend) = self.backend {
            config.backend = backend;
        }
        if !self.disks.is_empty() {
            config.disks = self.disks.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

/// Runs the command line and returns the process exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
        }
    };
    logger::init(&cli.log_level);

    let result = dispatch(cli);
    match result {
        Ok(code) => code,
        Err(e) => {
            report!("monstervm: error: {}", error_chain(&e));
            lifecycle::exit_code(&e)
        }
    }
}

/// Formats an error and its causes on one line, leaving out causes whose text the message
/// before them already contains (most of our errors embed their source's message).
fn error_chain(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let format = cli.output;
    let command = match cli.command {
        Command::Run(args) => return run(args),
        Command::Guest(GuestCommand::Fetch(args)) => return guest_fetch(args, format),
        Command::Disk(args) => return disk::run(args, format),
        command => command,
    };
    let state = StateDir::resolve(cli.state_dir.as_deref())?;
    match command {
        Command::Run(_) | Command::Guest(_) | Command::Disk(_) => unreachable!("handled above"),
        Command::Create(args) => {
            let mut config = args.vm.to_config()?;
            config.name = args.name;
            config.validate()?;
            lifecycle::create(&state, &config, format)
        }
        Command::Start(args) => {
            // The VMM logs starts, stops and errors at info level unless --log-level sets another.
            let log_level = if cli.log_level == "warn" {
                "info".to_string()
            } else {
                cli.log_level.clone()
            };
            let options = lifecycle::StartOptions {
                wait: Duration::from_secs(args.timeout),
                tcp: args.tcp.to_tcp_api()?,
                log_level,
            };
            lifecycle::start(&state, &args.name, options, format)
        }
        Command::Stop(args) => lifecycle::stop(
            &state,
            &args.name,
            Duration::from_secs(args.timeout),
            args.force,
            format,
        ),
        Command::Pause(args) => lifecycle::act(&state, &args.name, VmAction::Pause, format),
        Command::Resume(args) => lifecycle::act(&state, &args.name, VmAction::Resume, format),
        Command::List => lifecycle::list(&state, format),
        Command::Inspect(args) => lifecycle::inspect(&state, &args.name, format),
        Command::Delete(args) => lifecycle::delete(&state, &args.name, args.force, format),
        Command::Logs(args) => lifecycle::logs(&state, &args.name, args.vmm, args.follow),
        Command::Console(args) => {
            let vm = state.existing_vm(&args.name)?;
            if !vm.is_locked()? {
                return Err(lifecycle::LifecycleError::NotRunning { name: args.name }.into());
            }
            console::attach(&vm)?;
            Ok(EXIT_OK)
        }
        Command::Vmm(args) => vmm::run(&state, &args.name, args.tcp.to_tcp_api()?),
        Command::Top => crate::tui::run(&state),
        Command::Shell => shell::run(
            &state,
            &shell::Globals {
                log_level: cli.log_level.clone(),
                output: format,
            },
        ),
    }
}

/// Window after the first stop signal in which the same signal again counts as the same
/// request rather than a request to exit at once.
const SIGNAL_ECHO_WINDOW: std::time::Duration = std::time::Duration::from_millis(200);

fn run(args: RunArgs) -> anyhow::Result<i32> {
    let config = args.vm.to_config()?;
    // Before any thread starts, so that every thread of the VM inherits the mask.
    let stop_signals =
        signals::block_stop_signals().context("failed to block SIGTERM, SIGINT and SIGHUP")?;
    let (console, console_out) = terminal::ConsoleOutput::new();
    let BuiltVm {
        mut vm,
        serial,
        backend,
        guest,
        ..
    } = build_vm(&config, Box::new(console))?;
    {
        let control = vm.control().clone();
        console_out.on_failure(move || control.request_stop(StopReason::UserStop));
    }

    let raw_mode = terminal::RawModeGuard::enable(terminal::stdin_fd());
    let guest_name = match &guest {
        GuestKind::Embedded => "the embedded guest".to_string(),
        GuestKind::Linux { version } => format!(
            "Linux {}",
            version.as_deref().unwrap_or("(unknown version)")
        ),
    };
    tracing::info!(vm = %config.name, guest = %guest_name, backend = %backend.kind, "booting");
    if raw_mode.is_some() {
        report_inline!(
            "monstervm: booting {guest_name} on the {} backend; press Ctrl-] to quit\r\n",
            backend.kind
        );
    }

    let input = ConsoleInput::new(serial);
    let input_control = vm.control().clone();
    let quit_control = vm.control().clone();
    terminal::spawn_stdin_reader(
        raw_mode.is_some(),
        move |bytes| {
            input.send(bytes, &|| input_control.stop_reason().is_some());
        },
        move || quit_control.request_stop(StopReason::UserStop),
    )?;

    let received = Arc::new(OnceLock::new());
    {
        let received = received.clone();
        let first_at = std::sync::Mutex::new(None::<std::time::Instant>);
        let control = vm.control().clone();
        let terminal = raw_mode.as_ref().map(|guard| guard.saved());
        stop_signals
            .spawn_waiter(move |signal: StopSignal| {
                if received.set(signal).is_ok() {
                    tracing::warn!(%signal, "stopping the VM on a signal");
                    control.request_stop(StopReason::UserStop);
                    *first_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
                    return;
                }
                // GNU timeout and shells deliver one request to the process and then to its
                // group, so the same signal twice in quick succession is still one request.
                let since_first = first_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .map(|at| at.elapsed());
                if received.get() == Some(&signal)
                    && since_first.is_some_and(|elapsed| elapsed < SIGNAL_ECHO_WINDOW)
                {
                    tracing::debug!(%signal, "the same signal again at once; still stopping in order");
                    return;
                }
                tracing::error!(%signal, "signal repeated while the VM stops; exiting without closing the disks");
                if let Some(terminal) = terminal {
                    terminal.restore();
                }
                std::process::exit(signal.exit_status());
            })
            .context("failed to start the signal thread")?;
    }

    let started = std::time::Instant::now();
    let result = vm.run();
    drop(raw_mode);
    let elapsed = started.elapsed();
    for (id, stats) in vm.vcpu_stats().iter().enumerate() {
        tracing::info!(
            vm = %config.name,
            vcpu = id,
            instructions = stats.instructions,
            pio_exits = stats.pio_exits,
            mmio_exits = stats.mmio_exits,
            halt_exits = stats.halt_exits,
            seconds = elapsed.as_secs_f64(),
            "vCPU counters at exit"
        );
    }
    // Dropping the VM flushes and closes its disks, which clears the qcow2 dirty bit.
    drop(vm);
    tracing::info!(vm = %config.name, "disks closed");
    let exit = result?;

    if let Some(error) = console_out.failure() {
        anyhow::bail!(
            "failed to write the guest console to stdout ({error}), so the VM was stopped"
        );
    }
    if let Some(signal) = received.get() {
        report!("monstervm: stopped by {signal}");
        return Ok(signal.exit_status());
    }
    if exit == VmExit::GuestPanic {
        report!("monstervm: the guest kernel panicked (reported through pvpanic)");
        return Ok(EXIT_GUEST_PANIC);
    }
    let message = match exit {
        VmExit::GuestPanic => unreachable!("handled above"),
        VmExit::PowerOff => "the guest powered off",
        VmExit::Reset => "the guest reset the machine",
        VmExit::Halted => "the guest halted its CPU with interrupts disabled",
        VmExit::UserStop => "stopped at the user's request",
    };
    report!("monstervm: {message}");
    Ok(EXIT_OK)
}

fn guest_fetch(args: GuestFetchArgs, format: OutputFormat) -> anyhow::Result<i32> {
    // The fetch runs tools in other working directories, so relative paths must be
    // resolved against this one first.
    let dir = std::path::absolute(&args.dir)
        .with_context(|| format!("invalid --dir {}", args.dir.display()))?;
    let debs = args
        .debs
        .map(|debs| {
            std::path::absolute(&debs).with_context(|| format!("invalid --debs {}", debs.display()))
        })
        .transpose()?;
    let options = crate::guest::FetchOptions { dir, debs };
    let guest = crate::guest::fetch_guest(&options, &mut |line| report!("{line}"))?;
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&guest)?),
        OutputFormat::Table => {
            println!("kernel:    {}", guest.kernel.display());
            println!("initramfs: {}", guest.initramfs.display());
            if let Some(vmlinux) = &guest.vmlinux {
                println!("vmlinux:   {}", vmlinux.display());
            }
            if let Some(rootfs) = &guest.rootfs {
                println!("rootfs:    {}", rootfs.display());
            }
            println!(
                "boot it with: monstervm run --kernel {} --initrd {}",
                guest.kernel.display(),
                guest.initramfs.display()
            );
            if let Some(rootfs) = &guest.rootfs {
                println!(
                    "root on a copy-on-write disk: monstervm disk create -f qcow2 -b {} -F raw overlay.qcow2, then add --disk overlay.qcow2",
                    rootfs.display()
                );
            }
        }
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<VmArgs, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("monstervm").chain(args.iter().copied()))?;
        match cli.command {
            Command::Run(run) => Ok(run.vm),
            other => panic!("parsed {other:?} instead of run"),
        }
    }

    #[test]
    fn repeated_disk_options_keep_order() {
        let args = run_args(&[
            "run",
            "--disk",
            "root.qcow2,backing=deny",
            "--disk",
            "data.img,readonly,serial=data",
        ])
        .unwrap();
        let config = args.to_config().unwrap();
        assert_eq!(config.disks.len(), 2);
        assert_eq!(config.disks[0].path, PathBuf::from("root.qcow2"));
        assert!(config.disks[1].read_only);
        assert_eq!(config.disks[1].serial.as_deref(), Some("data"));
    }

    #[test]
    fn bad_disk_option_is_a_usage_error() {
        let error = run_args(&["run", "--disk", "a.img,format=vmdk"]).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(error.to_string().contains("vmdk"), "{error}");
    }
}
