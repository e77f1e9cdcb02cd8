//! The `monstervm` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::hypervisor::BackendChoice;
use crate::utils::config::VmConfig;
use crate::utils::logger;

/// Exit status for success, including a guest that powered off.
pub const EXIT_OK: i32 = 0;
/// Exit status for a failure: bad input, a backend error or a guest crash.
pub const EXIT_FAILURE: i32 = 1;
/// Exit status for invalid command-line usage (as clap reports it).
pub const EXIT_USAGE: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "monstervm",
    version,
    about = "Run fast, observable virtual machines"
)]
struct Cli {
    /// Log filter: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "warn", env = "MONSTERVM_LOG")]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM in the foreground with its serial console on this terminal.
    Run(RunArgs),
    /// Build or fetch test guests.
    #[command(subcommand)]
    Guest(GuestCommand),
}

#[derive(Subcommand, Debug)]
enum GuestCommand {
    /// Download Debian's cloud kernel and BusyBox and write DIR/vmlinuz,
    /// DIR/initramfs.img and DIR/vmlinux.
    Fetch(GuestFetchArgs),
}

/// Output format of a command's result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON object on standard output.
    Json,
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
    /// Result format: text or json (progress goes to standard error either way).
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
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
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1 nokaslr"].
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest RAM in MiB [default: 256].
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
    /// Number of virtual CPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u8>,
    /// Engine that runs the guest: auto picks KVM only where it runs at hardware speed.
    #[arg(long, value_name = "auto|kvm|emulator")]
    pub backend: Option<BackendChoice>,
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

    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Guest(GuestCommand::Fetch(args)) => guest_fetch(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("monstervm: error: {e:#}");
            EXIT_FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<i32> {
    let config = args.vm.to_config()?;
    anyhow::bail!(
        "running VM {} is not implemented yet; the boot path is being built",
        config.name
    )
}

fn guest_fetch(args: GuestFetchArgs) -> anyhow::Result<i32> {
    let options = crate::guest::FetchOptions {
        dir: args.dir,
        debs: args.debs,
    };
    let guest = crate::guest::fetch_guest(&options, &mut |line| eprintln!("{line}"))?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&guest)?),
        OutputFormat::Text => {
            println!("kernel:    {}", guest.kernel.display());
            println!("initramfs: {}", guest.initramfs.display());
            if let Some(vmlinux) = &guest.vmlinux {
                println!("vmlinux:   {}", vmlinux.display());
            }
            println!(
                "boot it with: monstervm run --kernel {} --initrd {}",
                guest.kernel.display(),
                guest.initramfs.display()
            );
        }
    }
    Ok(EXIT_OK)
}
