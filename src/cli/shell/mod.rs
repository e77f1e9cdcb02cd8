//! `monstervm shell`: an interactive prompt that runs `monstervm` commands.
//!
//! Each line is split into words as a POSIX shell would, with quotes and backslashes but
//! no variables or globs. The same clap definition as the command line parses the words,
//! so a usage error or `--help` prints exactly what `monstervm` would print. A valid line then
//! runs as `monstervm WORDS...` in a child process with the shell's state directory, log
//! level and output format in its environment. A child process keeps commands that own
//! the terminal (`console`, `run`, `logs --follow`, `top`) from leaving threads that read
//! the shell's input, and lets Ctrl-C end the command without ending the shell.
//!
//! From a terminal the shell keeps its history in `<state>/shell_history` and completes
//! commands, options and VM names with Tab. From a pipe it reads one command per line
//! without a prompt or history, and exits at end of input with the last command's status.

pub mod complete;

use std::io::IsTerminal;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use rustyline::completion::{Completer, FilenameCompleter, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{CompletionType, Config, Editor, Helper};

use crate::cli::output::OutputFormat;
use crate::cli::state::{StateDir, STATE_DIR_ENV};
use crate::cli::{Cli, Command as CliCommand, EXIT_OK, EXIT_USAGE, LOG_LEVEL_ENV, OUTPUT_ENV};
use complete::Completion;

/// File in the state directory that keeps the history of interactive sessions.
pub const HISTORY_FILE: &str = "shell_history";
/// Lines of history kept.
pub const MAX_HISTORY_LINES: usize = 1000;
/// Prompt shown on a terminal.
pub const PROMPT: &str = "monstervm> ";

/// Global options of the `monstervm shell` invocation, passed on to every command.
pub struct Globals {
    pub log_level: String,
    pub output: OutputFormat,
}

/// Next step of the shell after one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineOutcome {
    /// The line ran (or was empty) and the shell reads the next one.
    Status(i32),
    /// `exit` or `quit`: end the shell with this status.
    Exit(i32),
}

/// Meaning of one line, found before anything runs.
#[derive(Debug)]
pub enum Parsed {
    Empty,
    Exit(Option<i32>),
    /// Text to print (the help of `help`), and the status to record.
    Print {
        text: String,
        status: i32,
    },
    /// A usage error, or the help or version text, as clap reports it.
    Clap(clap::Error),
    /// Run `monstervm WORDS...`.
    Run(Vec<String>),
}

/// Splits and parses one line without running anything.
pub fn parse_line(line: &str) -> Parsed {
    let Some(mut words) = shlex::split(line) else {
        return Parsed::Print {
            text: "monstervm: error: unmatched quote in the line: close it, or escape it with a backslash\n".to_string(),
            status: EXIT_USAGE,
        };
    };
    if words.len() > 1 && words[0] == "monstervm" {
        // A command pasted with the program name runs as it would in a terminal.
        words.remove(0);
    }
    let Some(first) = words.first() else {
        return Parsed::Empty;
    };
    match first.as_str() {
        "exit" | "quit" => {
            return match words.get(1).map(|code| code.parse::<i32>()) {
                None => Parsed::Exit(None),
                Some(Ok(code)) => Parsed::Exit(Some(code)),
                Some(Err(_)) => Parsed::Print {
                    text: format!(
                        "monstervm: error: invalid exit status {:?}: give an integer\n",
                        words[1]
                    ),
                    status: EXIT_USAGE,
                },
            };
        }
        "help" if words.len() == 1 => {
            let mut text = Cli::command().render_help().to_string();
            text.push_str(
                "\nShell commands:\n  help [COMMAND]  Print this help, or the help of COMMAND\n  exit [STATUS]   Leave the shell (also `quit` and Ctrl-D)\n",
            );
            return Parsed::Print {
                text,
                status: EXIT_OK,
            };
        }
        "help" => {
            let mut args = words[1..].to_vec();
            args.push("--help".to_string());
            return parse_words(args);
        }
        _ => {}
    }
    parse_words(words)
}

fn parse_words(words: Vec<String>) -> Parsed {
    let argv = std::iter::once("monstervm".to_string()).chain(words.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(cli) => match cli.command {
            CliCommand::Shell => Parsed::Print {
                text: "monstervm: error: already in monstervm shell\n".to_string(),
                status: EXIT_USAGE,
            },
            _ => Parsed::Run(words),
        },
        Err(error) => Parsed::Clap(error),
    }
}

/// Completes commands, options and VM names, and file paths where an argument is one.
struct ShellHelper {
    state: StateDir,
    files: FilenameCompleter,
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _context: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let vm_names = self.state.vm_names().unwrap_or_default();
        match complete::complete(line, pos, &vm_names) {
            Completion::Words { start, words } => Ok((
                start,
                words
                    .into_iter()
                    .map(|word| Pair {
                        replacement: format!("{word} "),
                        display: word,
                    })
                    .collect(),
            )),
            Completion::Files => self.files.complete_path(line, pos),
        }
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}

impl Highlighter for ShellHelper {}

impl Validator for ShellHelper {}

impl Helper for ShellHelper {}

/// Keeps SIGINT from ending the shell while a command runs: the child, in the same
/// process group, gets the signal and ends. The handler does nothing, and exec resets
/// handled signals to their default in the child, unlike ignored ones.
fn ignore_interrupts_in_shell() {
    extern "C" fn on_interrupt(_signal: libc::c_int) {}
    // SAFETY: sigaction with a zeroed struct, an empty mask and a handler that touches no
    // state is async-signal-safe; `action` lives across the call.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_interrupt as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
}

/// Runs `monstervm WORDS...` and returns its exit status.
fn run_command(
    executable: &Path,
    words: &[String],
    state: &StateDir,
    globals: &Globals,
    interactive: bool,
) -> i32 {
    let output = match globals.output {
        OutputFormat::Table => "table",
        OutputFormat::Json => "json",
    };
    let mut command = Command::new(executable);
    command
        .args(words)
        .env(STATE_DIR_ENV, state.root())
        .env(LOG_LEVEL_ENV, &globals.log_level)
        .env(OUTPUT_ENV, output);
    if !interactive {
        // Lines the shell has read ahead must not reach the command.
        command.stdin(Stdio::null());
    }
    match command.status() {
        Ok(status) => status.code().unwrap_or_else(|| {
            // Ended by a signal: report it as a shell does, 128 plus the signal number.
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        }),
        Err(error) => {
            report!(
                "monstervm: error: failed to run {}: {error}",
                executable.display()
            );
            crate::cli::EXIT_FAILURE
        }
    }
}

/// Parses and runs one line.
fn execute_line(
    line: &str,
    executable: &Path,
    state: &StateDir,
    globals: &Globals,
    interactive: bool,
    last_status: i32,
) -> LineOutcome {
    match parse_line(line) {
        Parsed::Empty => LineOutcome::Status(last_status),
        Parsed::Exit(code) => LineOutcome::Exit(code.unwrap_or(last_status)),
        Parsed::Print { text, status } => {
            if status == EXIT_OK {
                print!("{text}");
            } else {
                report_inline!("{text}");
            }
            LineOutcome::Status(status)
        }
        Parsed::Clap(error) => {
            // clap colours the text only where the stream is a terminal, as `monstervm`
            // itself does.
            let _ = error.print();
            LineOutcome::Status(if error.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_OK
            })
        }
        Parsed::Run(words) => {
            LineOutcome::Status(run_command(executable, &words, state, globals, interactive))
        }
    }
}

fn save_history(editor: &mut Editor<ShellHelper, DefaultHistory>, path: &Path) {
    let saved = editor.save_history(path).and_then(|()| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(ReadlineError::from)
    });
    if let Err(error) = saved {
        tracing::warn!(path = %path.display(), %error, "failed to save the shell history");
    }
}

/// Runs the shell until `exit` or end of input; returns the exit status.
pub fn run(state: &StateDir, globals: &Globals) -> anyhow::Result<i32> {
    let interactive = std::io::stdin().is_terminal();
    let executable = std::env::current_exe().context("failed to find the monstervm executable")?;
    let config = Config::builder()
        .max_history_size(MAX_HISTORY_LINES)?
        .history_ignore_space(true)
        .auto_add_history(false)
        .completion_type(CompletionType::List)
        .build();
    let mut editor: Editor<ShellHelper, DefaultHistory> = Editor::with_config(config)?;
    editor.set_helper(Some(ShellHelper {
        state: state.clone(),
        files: FilenameCompleter::new(),
    }));

    let history = state.root().join(HISTORY_FILE);
    if interactive {
        // From a pipe, Ctrl-C ends the shell too, as it ends a shell script.
        ignore_interrupts_in_shell();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state.root())
            .with_context(|| format!("failed to create {}", state.root().display()))?;
        match editor.load_history(&history) {
            Ok(()) => {}
            Err(ReadlineError::Io(error)) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %history.display(), %error, "failed to load the shell history")
            }
        }
        println!("monstervm shell: type help for the commands, Tab to complete, Ctrl-D to leave");
    }
    let prompt = if interactive { PROMPT } else { "" };

    let mut last_status = EXIT_OK;
    loop {
        let line = match editor.readline(prompt) {
            Ok(line) => line,
            // Ctrl-C at the prompt discards the line, as in a shell.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(error) => return Err(error).context("failed to read a line"),
        };
        if interactive && !line.trim().is_empty() {
            editor.add_history_entry(line.as_str())?;
            save_history(&mut editor, &history);
        }
        match execute_line(&line, &executable, state, globals, interactive, last_status) {
            LineOutcome::Status(status) => last_status = status,
            LineOutcome::Exit(status) => return Ok(status),
        }
    }
    Ok(last_status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_reach_the_cli_parser() {
        let Parsed::Run(words) = parse_line("stop 'my vm' --timeout 3") else {
            panic!("line not accepted");
        };
        assert_eq!(words, ["stop", "my vm", "--timeout", "3"]);
    }

    #[test]
    fn program_name_is_optional() {
        let Parsed::Run(words) = parse_line("monstervm list --output json") else {
            panic!("line not accepted");
        };
        assert_eq!(words, ["list", "--output", "json"]);
    }

    #[test]
    fn usage_errors_come_from_clap() {
        let Parsed::Clap(error) = parse_line("stop --bogus web") else {
            panic!("not a clap error");
        };
        assert!(error.use_stderr());
        assert_eq!(error.kind(), clap::error::ErrorKind::UnknownArgument);
    }

    #[test]
    fn help_of_a_command() {
        let Parsed::Clap(error) = parse_line("help stop") else {
            panic!("not clap help");
        };
        assert!(!error.use_stderr());
        let text = error.render().to_string();
        assert!(text.contains("--timeout"), "{text}");
    }

    #[test]
    fn builtins() {
        assert!(matches!(parse_line("   "), Parsed::Empty));
        assert!(matches!(parse_line("exit"), Parsed::Exit(None)));
        assert!(matches!(parse_line("quit 3"), Parsed::Exit(Some(3))));
        for line in ["exit x", "shell", "stop 'web"] {
            assert!(
                matches!(
                    parse_line(line),
                    Parsed::Print {
                        status: EXIT_USAGE,
                        ..
                    }
                ),
                "{line}"
            );
        }
        let Parsed::Print { text, status } = parse_line("help") else {
            panic!("help printed nothing");
        };
        assert_eq!(status, EXIT_OK);
        assert!(text.contains("Shell commands:"), "{text}");
        assert!(text.contains("inspect"), "{text}");
    }
}
