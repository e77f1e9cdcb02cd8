//! `monstervm top`: a live dashboard of the VMs in the state directory.
//!
//! The drawing thread sends no API request, so a slow VMM cannot freeze the screen.
//! [`probe::Prober`] samples each VM on a thread of its own once per [`REFRESH_INTERVAL`],
//! and lifecycle keys run `monstervm start`, `stop`, `pause` or `resume` as child
//! processes on other threads. Their outcome appears in the status line.
//! Attaching leaves the dashboard for `monstervm console` and returns when it ends.

pub mod app;
pub mod probe;
pub mod view;

use std::io::{IsTerminal, Stdout};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crossterm::event::{self, Event};
use crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;

use crate::cli::state::StateDir;
use app::{App, Effect, VmCommand};
use probe::{ProbeResult, Prober, PROBE_TIMEOUT, SERIAL_TAIL_BYTES};

/// Time between two samples of every VM.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Maximum wait for a key before the loop checks for new samples.
const INPUT_POLL: Duration = Duration::from_millis(100);

type DashboardTerminal = Terminal<CrosstermBackend<Stdout>>;

/// Puts the terminal in raw mode on the alternate screen, and restores it when dropped,
/// including while a panic unwinds.
struct TerminalGuard {
    terminal: DashboardTerminal,
}

impl TerminalGuard {
    fn enter() -> anyhow::Result<TerminalGuard> {
        enable_raw_mode().context("failed to put the terminal in raw mode")?;
        let mut stdout = std::io::stdout();
        if let Err(error) = crossterm::execute!(stdout, EnterAlternateScreen) {
            let _ = disable_raw_mode();
            return Err(error).context("failed to switch to the alternate screen");
        }
        let terminal = Terminal::new(CrosstermBackend::new(stdout))?;
        Ok(TerminalGuard { terminal })
    }

    /// Gives the terminal back in its normal mode, for a child process.
    fn suspend(&mut self) -> anyhow::Result<()> {
        crossterm::execute!(self.terminal.backend_mut(), LeaveAlternateScreen)?;
        disable_raw_mode()?;
        self.terminal.show_cursor()?;
        Ok(())
    }

    /// Takes the terminal back after [`TerminalGuard::suspend`].
    fn resume(&mut self) -> anyhow::Result<()> {
        enable_raw_mode()?;
        crossterm::execute!(self.terminal.backend_mut(), EnterAlternateScreen)?;
        self.terminal.clear()?;
        Ok(())
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = crossterm::execute!(self.terminal.backend_mut(), LeaveAlternateScreen);
        let _ = disable_raw_mode();
        let _ = self.terminal.show_cursor();
    }
}

/// Runs the dashboard of the VMs in `state` until the user quits; returns the exit status.
pub fn run(state: &StateDir) -> anyhow::Result<i32> {
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        anyhow::bail!("monstervm top needs a terminal; use `monstervm list` in scripts");
    }
    let executable = std::env::current_exe().context("failed to find the monstervm executable")?;
    let mut guard = TerminalGuard::enter()?;
    event_loop(&mut guard, state, &executable)?;
    Ok(crate::cli::EXIT_OK)
}

fn event_loop(
    guard: &mut TerminalGuard,
    state: &StateDir,
    executable: &Path,
) -> anyhow::Result<()> {
    let prober = Prober::new(state.clone(), PROBE_TIMEOUT);
    let (outcome_sender, outcomes) = mpsc::channel::<String>();
    let mut app = App::new(&state.root().display().to_string());
    let mut next_refresh = Instant::now();
    let mut tail_of: Option<String> = None;

    loop {
        if Instant::now() >= next_refresh {
            match prober.probe_all() {
                Ok(names) => app.retain_vms(&names),
                Err(error) => app.message = format!("failed to list the VMs: {error}"),
            }
            refresh_serial_tail(&mut app, state);
            tail_of = app.selected_name().map(str::to_string);
            next_refresh = Instant::now() + REFRESH_INTERVAL;
        }
        for result in prober.results() {
            match result {
                ProbeResult::Sample(sample) => app.apply_sample(*sample),
                ProbeResult::Failed { name, error } => {
                    tracing::debug!(vm = %name, %error, "probe failed");
                    app.message = format!("failed to read VM {name}: {error}");
                }
            }
        }
        for outcome in outcomes.try_iter() {
            app.message = outcome;
            // Show the command's effect now rather than at the next tick.
            next_refresh = Instant::now();
        }
        if app.selected_name() != tail_of.as_deref() {
            refresh_serial_tail(&mut app, state);
            tail_of = app.selected_name().map(str::to_string);
        }

        guard.terminal.draw(|frame| view::render(frame, &app))?;

        let wait = next_refresh
            .saturating_duration_since(Instant::now())
            .min(INPUT_POLL);
        if !event::poll(wait)? {
            continue;
        }
        let Event::Key(key) = event::read()? else {
            // A resize needs nothing more than the next draw.
            continue;
        };
        match app.handle_key(key) {
            Effect::None => {}
            Effect::Quit => return Ok(()),
            Effect::Run { command, name } => spawn_command(
                executable,
                state.root(),
                command,
                name,
                outcome_sender.clone(),
            ),
            Effect::Attach { name } => {
                guard.suspend()?;
                app.message = attach(executable, state.root(), &name);
                guard.resume()?;
                next_refresh = Instant::now();
            }
        }
    }
}

fn refresh_serial_tail(app: &mut App, state: &StateDir) {
    let Some(name) = app.selected_name() else {
        app.serial_tail.clear();
        return;
    };
    let path = match state.vm(name) {
        Ok(vm) => vm.serial_log_path(),
        Err(_) => PathBuf::new(),
    };
    app.serial_tail = match probe::read_serial_tail(&path, SERIAL_TAIL_BYTES) {
        Ok(lines) => lines,
        Err(error) => vec![format!("failed to read {}: {error}", path.display())],
    };
}

fn monstervm(executable: &Path, state_root: &Path) -> Command {
    let mut command = Command::new(executable);
    // The status line shows the first line of the table output, even where
    // MONSTERVM_OUTPUT asks for JSON.
    command
        .arg("--state-dir")
        .arg(state_root)
        .arg("--output")
        .arg("table");
    command
}

/// Runs `monstervm COMMAND NAME` on a thread and sends the line for the status bar.
fn spawn_command(
    executable: &Path,
    state_root: &Path,
    command: VmCommand,
    name: String,
    outcome: Sender<String>,
) {
    let mut child = monstervm(executable, state_root);
    child
        .arg(command.subcommand())
        .arg(&name)
        .stdin(Stdio::null());
    let spawned = std::thread::Builder::new()
        .name(format!("{}-{name}", command.subcommand()))
        .spawn(move || {
            let message = match child.output() {
                Ok(output) if output.status.success() => {
                    let stdout = String::from_utf8_lossy(&output.stdout);
                    stdout.lines().next().unwrap_or_default().to_string()
                }
                Ok(output) => {
                    let stderr = String::from_utf8_lossy(&output.stderr);
                    let last = stderr.lines().last().unwrap_or_default();
                    last.strip_prefix("monstervm: ").unwrap_or(last).to_string()
                }
                Err(error) => format!("failed to run monstervm {}: {error}", command.subcommand()),
            };
            let _ = outcome.send(message);
        });
    if let Err(error) = spawned {
        tracing::warn!(vm = %name, %error, "failed to spawn a command thread");
    }
}

/// Runs `monstervm console NAME` on this terminal and returns the line for the status bar.
fn attach(executable: &Path, state_root: &Path, name: &str) -> String {
    let status = monstervm(executable, state_root)
        .arg("console")
        .arg(name)
        .status();
    match status {
        Ok(status) if status.success() => format!("detached from VM {name}"),
        Ok(status) => format!("monstervm console {name} ended with {status}"),
        Err(error) => format!("failed to run monstervm console: {error}"),
    }
}
