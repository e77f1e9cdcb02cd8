//! The dashboard's state and its key handling, free of terminal and I/O so that tests can
//! drive it with plain values.

use std::collections::BTreeMap;

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::api::VmMetrics;
use crate::cli::lifecycle::{DisplayState, VmStatus};

/// One probe of one VM: its status and, while a VMM runs, its counters.
#[derive(Debug, Clone)]
pub struct Sample {
    pub status: VmStatus,
    /// `None` when no VMM runs or its metrics request failed.
    pub metrics: Option<VmMetrics>,
}

/// Counters of one VMM at one moment, kept to compute rates from the next sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counters {
    pub pid: Option<u32>,
    /// The VMM's own uptime, so that rates do not depend on when the probe ran.
    pub uptime_secs: f64,
    /// Port-I/O, MMIO and halt exits summed over every vCPU.
    pub exits: Option<u64>,
    pub instructions: Option<u64>,
}

impl Counters {
    fn from_sample(sample: &Sample) -> Option<Counters> {
        let metrics = sample.metrics.as_ref()?;
        Some(Counters {
            pid: sample.status.pid,
            uptime_secs: metrics.uptime_secs,
            exits: metrics.exits.as_ref().map(|e| e.pio + e.mmio + e.halt),
            instructions: metrics.instructions,
        })
    }
}

/// Rates between two samples of the same VMM, per second of the VMM's uptime.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub exits_per_sec: Option<f64>,
    pub instructions_per_sec: Option<f64>,
}

/// Computes the rates from `previous` to `current`. A rate is `None` when a counter is
/// missing from either sample, the VMM changed (another pid), no time passed, or a counter
/// went backwards (an API reset rebuilds the vCPUs and restarts their counters).
pub fn compute_rates(previous: &Counters, current: &Counters) -> Rates {
    let elapsed = current.uptime_secs - previous.uptime_secs;
    if previous.pid != current.pid || elapsed <= 0.0 {
        return Rates::default();
    }
    let rate = |before: Option<u64>, after: Option<u64>| {
        let delta = after?.checked_sub(before?)?;
        Some(delta as f64 / elapsed)
    };
    Rates {
        exits_per_sec: rate(previous.exits, current.exits),
        instructions_per_sec: rate(previous.instructions, current.instructions),
    }
}

/// One VM as the dashboard shows it.
#[derive(Debug, Clone)]
pub struct VmRow {
    pub status: VmStatus,
    pub rates: Rates,
    /// Counters of the latest sample, the base for the next rates.
    counters: Option<Counters>,
}

/// A lifecycle command that a key requests for one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmCommand {
    Start,
    Stop,
    Pause,
    Resume,
}

impl VmCommand {
    /// Returns the `monstervm` subcommand that performs it.
    pub fn subcommand(self) -> &'static str {
        match self {
            VmCommand::Start => "start",
            VmCommand::Stop => "stop",
            VmCommand::Pause => "pause",
            VmCommand::Resume => "resume",
        }
    }
}

/// Action that the event loop takes after a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    None,
    Quit,
    /// Run `monstervm <command> NAME` in the background.
    Run {
        command: VmCommand,
        name: String,
    },
    /// Leave the dashboard for `monstervm console NAME` until the user detaches.
    Attach {
        name: String,
    },
}

/// The dashboard's state.
#[derive(Debug, Default)]
pub struct App {
    /// Rows sorted by VM name.
    rows: BTreeMap<String, VmRow>,
    /// Name of the selected VM, so that the selection follows it when rows come and go.
    selected: Option<String>,
    /// Last line of the status bar: the outcome of the latest command, or why a key did
    /// nothing.
    pub message: String,
    /// Lines of the selected VM's serial log, oldest first.
    pub serial_tail: Vec<String>,
    /// State directory shown in the title line.
    pub state_dir: String,
    /// False until a key moves the selection; before that the first row is selected,
    /// whatever order the first samples arrive in.
    selection_moved: bool,
}

impl App {
    /// Creates an empty dashboard of the VMs in `state_dir`.
    pub fn new(state_dir: &str) -> App {
        App {
            state_dir: state_dir.to_string(),
            ..App::default()
        }
    }

    /// Records a new sample of one VM and updates its rates.
    pub fn apply_sample(&mut self, sample: Sample) {
        let name = sample.status.name.clone();
        let counters = Counters::from_sample(&sample);
        let previous = self.rows.get(&name).and_then(|row| row.counters);
        let rates = match (&previous, &counters) {
            (Some(previous), Some(current)) => compute_rates(previous, current),
            _ => Rates::default(),
        };
        self.rows.insert(
            name,
            VmRow {
                status: sample.status,
                rates,
                counters,
            },
        );
        if self.selected.is_none() || !self.selection_moved {
            self.selected = self.rows.keys().next().cloned();
        }
    }

    /// Drops the VMs that are no longer in the state directory; `names` are those that are.
    pub fn retain_vms(&mut self, names: &[String]) {
        let before: Vec<String> = self.rows.keys().cloned().collect();
        self.rows.retain(|name, _| names.contains(name));
        if let Some(selected) = &self.selected {
            if !self.rows.contains_key(selected) {
                // Select the row that took the removed one's place, or the new last row.
                let position = before.iter().position(|name| name == selected).unwrap_or(0);
                self.selected = self
                    .rows
                    .keys()
                    .nth(position)
                    .or_else(|| self.rows.keys().last())
                    .cloned();
            }
        }
    }

    pub fn rows(&self) -> impl Iterator<Item = &VmRow> {
        self.rows.values()
    }

    pub fn row_count(&self) -> usize {
        self.rows.len()
    }

    pub fn selected_name(&self) -> Option<&str> {
        self.selected.as_deref()
    }

    /// Returns the position of the selected row.
    pub fn selected_index(&self) -> Option<usize> {
        let selected = self.selected.as_ref()?;
        self.rows.keys().position(|name| name == selected)
    }

    pub fn selected_row(&self) -> Option<&VmRow> {
        self.rows.get(self.selected.as_ref()?)
    }

    fn move_selection(&mut self, down: bool) {
        self.selection_moved = true;
        let Some(index) = self.selected_index() else {
            self.selected = self.rows.keys().next().cloned();
            return;
        };
        let target = if down {
            (index + 1).min(self.rows.len() - 1)
        } else {
            index.saturating_sub(1)
        };
        self.selected = self.rows.keys().nth(target).cloned();
    }

    /// Applies one key and returns what the event loop must do.
    pub fn handle_key(&mut self, key: KeyEvent) -> Effect {
        if key.kind != KeyEventKind::Press {
            return Effect::None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) {
            return match key.code {
                KeyCode::Char('c') => Effect::Quit,
                _ => Effect::None,
            };
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => Effect::Quit,
            KeyCode::Up | KeyCode::Char('k') => {
                self.move_selection(false);
                Effect::None
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.move_selection(true);
                Effect::None
            }
            KeyCode::Char('s') => self.request(VmCommand::Start),
            KeyCode::Char('x') => self.request(VmCommand::Stop),
            KeyCode::Char('p') => match self.selected_row().map(|row| row.status.state) {
                Some(DisplayState::Paused) => self.request(VmCommand::Resume),
                _ => self.request(VmCommand::Pause),
            },
            KeyCode::Char('a') => self.attach(),
            _ => Effect::None,
        }
    }

    /// Returns the effect of `command` on the selected VM, or sets a message saying why
    /// its state does not allow it.
    fn request(&mut self, command: VmCommand) -> Effect {
        let Some(row) = self.selected_row() else {
            self.message = "no VM selected".to_string();
            return Effect::None;
        };
        let name = row.status.name.clone();
        let state = row.status.state;
        let allowed = match command {
            VmCommand::Start => matches!(state, DisplayState::Stopped | DisplayState::Crashed),
            VmCommand::Stop => matches!(
                state,
                DisplayState::Starting
                    | DisplayState::Running
                    | DisplayState::Paused
                    | DisplayState::Stopping
                    | DisplayState::Unresponsive
            ),
            VmCommand::Pause => state == DisplayState::Running,
            VmCommand::Resume => state == DisplayState::Paused,
        };
        if !allowed {
            self.message = format!(
                "cannot {} VM {name}: it is {}",
                command.subcommand(),
                state.as_str()
            );
            return Effect::None;
        }
        self.message = format!("{} {name} ...", command.subcommand());
        Effect::Run { command, name }
    }

    fn attach(&mut self) -> Effect {
        let Some(row) = self.selected_row() else {
            self.message = "no VM selected".to_string();
            return Effect::None;
        };
        let name = row.status.name.clone();
        match row.status.state {
            DisplayState::Running | DisplayState::Paused => Effect::Attach { name },
            state => {
                let hint = match state {
                    DisplayState::Stopped | DisplayState::Crashed => "; press s to start it",
                    _ => "",
                };
                self.message =
                    format!("cannot attach to VM {name}: it is {}{hint}", state.as_str());
                Effect::None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ExitCounts, SerialCounters};

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn sample(name: &str, state: DisplayState) -> Sample {
        Sample {
            status: VmStatus::new(name, state),
            metrics: None,
        }
    }

    fn metrics(uptime_secs: f64, exits: Option<u64>, instructions: Option<u64>) -> VmMetrics {
        VmMetrics {
            uptime_secs,
            memory_mib: 16,
            exits: exits.map(|pio| ExitCounts {
                pio,
                mmio: 0,
                halt: 0,
            }),
            instructions,
            unclaimed_io_accesses: 0,
            serial: SerialCounters::default(),
        }
    }

    fn app_with(vms: &[(&str, DisplayState)]) -> App {
        let mut app = App::new("/state");
        for (name, state) in vms {
            app.apply_sample(sample(name, *state));
        }
        app
    }

    #[test]
    fn selection_moves_and_stops_at_ends() {
        let mut app = app_with(&[
            ("a", DisplayState::Running),
            ("b", DisplayState::Stopped),
            ("c", DisplayState::Paused),
        ]);
        assert_eq!(app.selected_name(), Some("a"));

        assert_eq!(app.handle_key(key(KeyCode::Up)), Effect::None);
        assert_eq!(app.selected_name(), Some("a"));
        app.handle_key(key(KeyCode::Down));
        assert_eq!(app.selected_name(), Some("b"));
        app.handle_key(key(KeyCode::Char('j')));
        app.handle_key(key(KeyCode::Char('j')));
        assert_eq!(app.selected_name(), Some("c"));
        app.handle_key(key(KeyCode::Char('k')));
        assert_eq!(app.selected_name(), Some("b"));
    }

    #[test]
    fn selection_follows_removed_vm() {
        let mut app = app_with(&[("a", DisplayState::Running), ("b", DisplayState::Stopped)]);
        app.handle_key(key(KeyCode::Down));

        app.retain_vms(&["a".to_string()]);

        assert_eq!(app.selected_name(), Some("a"));
        app.retain_vms(&[]);
        assert_eq!(app.selected_name(), None);
    }

    #[test]
    fn lifecycle_keys_match_state() {
        let mut app = app_with(&[
            ("run", DisplayState::Running),
            ("zed", DisplayState::Crashed),
        ]);

        let stop = app.handle_key(key(KeyCode::Char('x')));
        assert_eq!(
            stop,
            Effect::Run {
                command: VmCommand::Stop,
                name: "run".into()
            }
        );
        let pause = app.handle_key(key(KeyCode::Char('p')));
        assert_eq!(
            pause,
            Effect::Run {
                command: VmCommand::Pause,
                name: "run".into()
            }
        );
        assert_eq!(
            app.handle_key(key(KeyCode::Char('a'))),
            Effect::Attach { name: "run".into() }
        );
        assert_eq!(app.handle_key(key(KeyCode::Char('s'))), Effect::None);
        assert_eq!(app.message, "cannot start VM run: it is running");

        app.handle_key(key(KeyCode::Down));
        assert_eq!(
            app.handle_key(key(KeyCode::Char('s'))),
            Effect::Run {
                command: VmCommand::Start,
                name: "zed".into()
            }
        );
        assert_eq!(app.handle_key(key(KeyCode::Char('x'))), Effect::None);
        assert_eq!(app.message, "cannot stop VM zed: it is crashed");
        assert_eq!(app.handle_key(key(KeyCode::Char('a'))), Effect::None);
        assert!(
            app.message.contains("press s to start it"),
            "{}",
            app.message
        );
    }

    #[test]
    fn p_resumes_paused_vm() {
        let mut app = app_with(&[("vm", DisplayState::Paused)]);
        assert_eq!(
            app.handle_key(key(KeyCode::Char('p'))),
            Effect::Run {
                command: VmCommand::Resume,
                name: "vm".into()
            }
        );
    }

    #[test]
    fn quit_keys() {
        let mut app = app_with(&[]);
        assert_eq!(app.handle_key(key(KeyCode::Char('q'))), Effect::Quit);
        assert_eq!(app.handle_key(key(KeyCode::Esc)), Effect::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(app.handle_key(ctrl_c), Effect::Quit);
        assert_eq!(app.handle_key(key(KeyCode::Char('x'))), Effect::None);
        assert_eq!(app.message, "no VM selected");
    }

    #[test]
    fn key_release_is_ignored() {
        let mut app = app_with(&[("a", DisplayState::Running)]);
        let mut release = key(KeyCode::Char('q'));
        release.kind = KeyEventKind::Release;
        assert_eq!(app.handle_key(release), Effect::None);
    }

    #[test]
    fn rates_from_successive_samples() {
        let mut app = app_with(&[]);
        let mut first = sample("vm", DisplayState::Running);
        first.status.pid = Some(7);
        first.metrics = Some(metrics(10.0, Some(1_000), Some(5_000_000)));
        let mut second = first.clone();
        second.metrics = Some(metrics(12.0, Some(3_000), Some(9_000_000)));

        app.apply_sample(first);
        assert_eq!(app.selected_row().unwrap().rates, Rates::default());
        app.apply_sample(second);

        let rates = app.selected_row().unwrap().rates;
        assert_eq!(rates.exits_per_sec, Some(1_000.0));
        assert_eq!(rates.instructions_per_sec, Some(2_000_000.0));
    }

    #[test]
    fn rates_unknown_across_vmms_and_resets() {
        let base = Counters {
            pid: Some(7),
            uptime_secs: 10.0,
            exits: Some(100),
            instructions: None,
        };
        let other_vmm = Counters {
            pid: Some(8),
            uptime_secs: 11.0,
            exits: Some(200),
            ..base
        };
        assert_eq!(compute_rates(&base, &other_vmm), Rates::default());
        let counters_restarted = Counters {
            uptime_secs: 11.0,
            exits: Some(5),
            ..base
        };
        assert_eq!(
            compute_rates(&base, &counters_restarted).exits_per_sec,
            None
        );
        let no_time = Counters {
            exits: Some(200),
            ..base
        };
        assert_eq!(compute_rates(&base, &no_time).exits_per_sec, None);
        let later = Counters {
            uptime_secs: 12.0,
            exits: Some(300),
            ..base
        };
        let rates = compute_rates(&base, &later);
        assert_eq!(rates.exits_per_sec, Some(100.0));
        assert_eq!(rates.instructions_per_sec, None);
    }
}
