//! Output of the commands that print data: aligned tables for people, JSON for scripts.
//!
//! JSON field names are part of the command-line interface: scripts depend on them, so
//! rename one only together with `docs/cli.md`.

use std::fmt::Write as _;

use serde::Serialize;

/// How a command prints its result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people (`human` and `text` are accepted too, as qemu-img
    /// spells it).
    #[default]
    #[value(alias = "human", alias = "text")]
    Table,
    /// One JSON document on stdout, for scripts.
    Json,
}

/// A table with a header row; columns are padded to their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing cells print empty and extra cells are dropped.
    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    /// Formats the table with two spaces between columns and no trailing spaces.
    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }

        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (index, width) in widths.iter().enumerate().take(columns) {
                let cell = row.get(index).map(String::as_str).unwrap_or("");
                if index + 1 == columns {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Key-value lines for one object, keys padded to one width.
pub fn render_fields(fields: &[(&str, String)]) -> String {
    let width = fields.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in fields {
        let _ = writeln!(
            out,
            "{:<width$}  {value}",
            format!("{key}:"),
            width = width + 1
        );
    }
    out
}

/// Serializes `value` as pretty JSON with a trailing newline.
pub fn render_json<T: Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("CLI output types serialize");
    text.push('\n');
    text
}

/// Prints `value` in `format`: `table` builds the table text from it.
pub fn print<T: Serialize>(format: OutputFormat, value: &T, table: impl FnOnce(&T) -> String) {
    let text = match format {
        OutputFormat::Table => table(value),
        OutputFormat::Json => render_json(value),
    };
    print!("{text}");
}

/// Formats a duration in seconds as `45s`, `12m03s`, `5h07m` or `3d04h`.
pub fn format_duration(secs: f64) -> String {
    let secs = secs.max(0.0) as u64;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86400, secs % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(&["NAME", "STATE", "PID"]);
        table.push(vec!["web".into(), "running".into(), "4242".into()]);
        table.push(vec!["database-1".into(), "stopped".into(), "-".into()]);

        let text = table.render();

        let expected = "\
NAME        STATE    PID
web         running  4242
database-1  stopped  -
";
        assert_eq!(text, expected);
    }

    #[test]
    fn table_tolerates_short_rows() {
        let mut table = Table::new(&["A", "B"]);
        table.push(vec!["x".into()]);
        assert_eq!(table.render(), "A  B\nx\n");
    }

    #[test]
    fn fields_align_keys() {
        let text = render_fields(&[("name", "web".into()), ("memory_mib", "256".into())]);
        assert_eq!(text, "name:        web\nmemory_mib:  256\n");
    }

    #[test]
    fn durations_pick_two_units() {
        assert_eq!(format_duration(0.4), "0s");
        assert_eq!(format_duration(59.9), "59s");
        assert_eq!(format_duration(723.0), "12m03s");
        assert_eq!(format_duration(18_420.0), "5h07m");
        assert_eq!(format_duration(273_600.0), "3d04h");
    }
}
