//! Drawing of the dashboard from an [`App`].

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, TableState};
use ratatui::Frame;

use crate::cli::lifecycle::DisplayState;
use crate::cli::output::format_duration;
use crate::tui::app::{App, VmRow};

/// The keys, as the help line shows them.
pub const HELP_LINE: &str =
    "↑/↓ or j/k select  s start  x stop  p pause/resume  a attach (Ctrl-] returns)  q quit";

const HEADERS: [&str; 8] = [
    "NAME", "STATE", "BACKEND", "VCPUS", "MEMORY", "UPTIME", "EXITS/S", "INSTR/S",
];

/// Formats a rate with an SI suffix: `950`, `12.3k`, `4.56M`, `1.20G`; `-` when unknown.
pub fn format_rate(rate: Option<f64>) -> String {
    let Some(rate) = rate else {
        return "-".to_string();
    };
    let scaled = [(1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(unit, _)| rate >= *unit);
    match scaled {
        Some((unit, suffix)) => {
            let value = rate / unit;
            let decimals = if value >= 100.0 {
                0
            } else if value >= 10.0 {
                1
            } else {
                2
            };
            format!("{value:.decimals$}{suffix}")
        }
        None => format!("{rate:.0}"),
    }
}

fn dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |value| value.to_string())
}

fn state_style(state: DisplayState) -> Style {
    match state {
        DisplayState::Running => Style::new().fg(Color::Green),
        DisplayState::Paused | DisplayState::Starting | DisplayState::Stopping => {
            Style::new().fg(Color::Yellow)
        }
        DisplayState::Crashed | DisplayState::Unresponsive | DisplayState::Invalid => {
            Style::new().fg(Color::Red)
        }
        DisplayState::Stopped => Style::new(),
    }
}

fn table_row(row: &VmRow) -> Row<'static> {
    let status = &row.status;
    Row::new(vec![
        Cell::from(status.name.clone()),
        Cell::from(status.state.as_str()).style(state_style(status.state)),
        Cell::from(dash(status.backend.as_deref())),
        Cell::from(dash(status.vcpus)),
        Cell::from(dash(status.memory_mib.map(|mib| format!("{mib} MiB")))),
        Cell::from(dash(status.uptime_secs.map(format_duration))),
        Cell::from(format_rate(row.rates.exits_per_sec)),
        Cell::from(format_rate(row.rates.instructions_per_sec)),
    ])
}

/// Draws the whole dashboard into `frame`.
pub fn render(frame: &mut Frame, app: &App) {
    let area = frame.area();
    // The table takes the rows it needs (plus its header), but leaves at least half the
    // screen to the serial log.
    let table_height = (app.row_count() as u16 + 1).min(area.height / 2).max(2);
    let [title, table, detail, serial, status, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(table_height),
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);

    let count = app.row_count();
    let plural = if count == 1 { "" } else { "s" };
    frame.render_widget(
        Paragraph::new(format!(
            "monstervm top: {count} VM{plural} in {}",
            app.state_dir
        ))
        .style(Style::new().add_modifier(Modifier::BOLD)),
        title,
    );

    render_table(frame, app, table);
    render_detail(frame, app, detail);
    render_serial(frame, app, serial);

    frame.render_widget(Paragraph::new(app.message.as_str()), status);
    frame.render_widget(
        Paragraph::new(HELP_LINE).style(Style::new().add_modifier(Modifier::DIM)),
        help,
    );
}

fn render_table(frame: &mut Frame, app: &App, area: Rect) {
    let header = Row::new(HEADERS).style(Style::new().add_modifier(Modifier::BOLD));
    // VM names are at most 64 characters (the rule of `create`).
    let name_width = app
        .rows()
        .map(|row| row.status.name.chars().count())
        .max()
        .unwrap_or(0)
        .max(HEADERS[0].len()) as u16;
    let widths = [
        Constraint::Length(name_width),
        Constraint::Length(12),
        Constraint::Length(11),
        Constraint::Length(5),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(8),
    ];
    let table = Table::new(app.rows().map(table_row), widths)
        .header(header)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("> ");
    let mut state = TableState::new().with_selected(app.selected_index());
    frame.render_stateful_widget(table, area, &mut state);
}

/// Draws the selected VM's last error, the reason a crashed VM is crashed.
fn render_detail(frame: &mut Frame, app: &App, area: Rect) {
    let Some(row) = app.selected_row() else {
        return;
    };
    let Some(error) = &row.status.last_error else {
        return;
    };
    // Only the first line fits, as in `monstervm list`.
    let first_line = error.lines().next().unwrap_or_default();
    let line = Line::from(vec![
        Span::styled("error: ", Style::new().fg(Color::Red)),
        Span::raw(first_line.to_string()),
    ]);
    frame.render_widget(Paragraph::new(line), area);
}

fn render_serial(frame: &mut Frame, app: &App, area: Rect) {
    let title = match app.selected_name() {
        Some(name) => format!(" serial: {name} "),
        None => " serial ".to_string(),
    };
    let block = Block::new().borders(Borders::ALL).title(title);
    let visible = block.inner(area).height as usize;
    let skip = app.serial_tail.len().saturating_sub(visible);
    let lines: Vec<Line> = app.serial_tail[skip..]
        .iter()
        .map(|line| Line::raw(line.as_str()))
        .collect();
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::lifecycle::VmStatus;
    use crate::tui::app::Sample;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn draw(app: &App, width: u16, height: u16) -> Terminal<TestBackend> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| render(frame, app)).unwrap();
        terminal
    }

    fn lines(terminal: &Terminal<TestBackend>) -> Vec<String> {
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| {
                let line: String = (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect();
                line.trim_end().to_string()
            })
            .collect()
    }

    fn dashboard() -> App {
        let mut app = App::new("/var/lib/mvm");
        let mut web = VmStatus::new("web", DisplayState::Running);
        web.pid = Some(4242);
        web.backend = Some("emulator".into());
        web.vcpus = Some(2);
        web.memory_mib = Some(512);
        web.uptime_secs = Some(723.0);
        app.apply_sample(Sample {
            status: web,
            metrics: None,
        });
        let mut db = VmStatus::new("db", DisplayState::Crashed);
        db.backend = Some("kvm".into());
        db.vcpus = Some(1);
        db.memory_mib = Some(256);
        db.last_error = Some("guest triple fault at rip 0x1000\nsecond line".into());
        app.apply_sample(Sample {
            status: db,
            metrics: None,
        });
        app.serial_tail = vec!["Linux version 6.1".into(), "login:".into()];
        app.message = "Started VM web (pid 4242) in 0.031 s".into();
        app
    }

    #[test]
    fn snapshot_of_dashboard() {
        let app = dashboard();
        // Rows sort by name, so the crashed "db" comes first and is selected.
        assert_eq!(app.selected_name(), Some("db"));

        let terminal = draw(&app, 90, 14);

        let expected = [
            "monstervm top: 2 VMs in /var/lib/mvm",
            "  NAME STATE        BACKEND     VCPUS MEMORY     UPTIME  EXITS/S  INSTR/S",
            "> db   crashed      kvm         1     256 MiB    -       -        -",
            "  web  running      emulator    2     512 MiB    12m03s  -        -",
            "error: guest triple fault at rip 0x1000",
            &format!("┌ serial: db {}┐", "─".repeat(76)),
            &format!("│{:<88}│", "Linux version 6.1"),
            &format!("│{:<88}│", "login:"),
            &format!("│{:<88}│", ""),
            &format!("│{:<88}│", ""),
            &format!("│{:<88}│", ""),
            &format!("└{}┘", "─".repeat(88)),
            "Started VM web (pid 4242) in 0.031 s",
            HELP_LINE,
        ];
        assert_eq!(lines(&terminal), expected);
    }

    #[test]
    fn selected_row_is_highlighted() {
        let mut app = dashboard();
        app.handle_key(crossterm::event::KeyEvent::from(
            crossterm::event::KeyCode::Down,
        ));

        let terminal = draw(&app, 90, 14);

        let buffer = terminal.backend().buffer();
        let text = lines(&terminal);
        assert!(text[3].starts_with("> web"), "{}", text[3]);
        assert!(text[2].starts_with("  db"), "{}", text[2]);
        assert!(buffer[(4, 3)].modifier.contains(Modifier::REVERSED));
        assert!(!buffer[(4, 2)].modifier.contains(Modifier::REVERSED));
        assert_eq!(buffer[(7, 2)].fg, Color::Red, "crashed state is red");
        assert_eq!(buffer[(7, 3)].fg, Color::Green, "running state is green");
        // The running VM has no error, so the error line is empty.
        assert_eq!(text[4], "");
        assert_eq!(text[5].trim_end_matches(['─', '┐']), "┌ serial: web ");
    }

    #[test]
    fn rates_format_with_si_suffixes() {
        assert_eq!(format_rate(None), "-");
        assert_eq!(format_rate(Some(0.0)), "0");
        assert_eq!(format_rate(Some(950.4)), "950");
        assert_eq!(format_rate(Some(12_345.0)), "12.3k");
        assert_eq!(format_rate(Some(4_560_000.0)), "4.56M");
        assert_eq!(format_rate(Some(123_000_000.0)), "123M");
        assert_eq!(format_rate(Some(1_200_000_000.0)), "1.20G");
    }
}
