//! Tab completion for `monstervm shell`, driven by the clap definition of the CLI so that
//! it offers exactly the commands and options that the parser accepts.

use clap::{Arg, ArgAction, Command, CommandFactory};

use crate::cli::Cli;

/// Commands that the shell itself handles instead of the CLI.
pub const BUILTINS: [&str; 3] = ["exit", "help", "quit"];

/// Candidates for the word under the cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Candidates for the word that starts at byte `start` of the line, sorted.
    Words { start: usize, words: Vec<String> },
    /// The word is a file path: the caller completes it from the file system.
    Files,
}

/// Returns the CLI's command tree with global options copied into every subcommand.
fn command_tree() -> Command {
    let mut root = Cli::command();
    root.build();
    root
}

fn takes_value(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Set | ArgAction::Append)
}

/// Finds the option that `word` (`--name`, `--name=VALUE` or `-n`) names in `command`.
fn find_option<'a>(command: &'a Command, word: &str) -> Option<&'a Arg> {
    if let Some(long) = word.strip_prefix("--") {
        let long = long.split('=').next().unwrap_or_default();
        return command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(long));
    }
    let short = word.strip_prefix('-')?.chars().next()?;
    command
        .get_arguments()
        .find(|arg| arg.get_short() == Some(short))
}

fn find_subcommand<'a>(command: &'a Command, word: &str) -> Option<&'a Command> {
    command
        .get_subcommands()
        .find(|sub| sub.get_name() == word || sub.get_all_aliases().any(|alias| alias == word))
}

/// Returns the candidates for the word at byte `pos` of `line`; `vm_names` are the VMs in
/// the state directory.
pub fn complete(line: &str, pos: usize, vm_names: &[String]) -> Completion {
    let before = &line[..pos];
    let start = before
        .rfind(char::is_whitespace)
        .map_or(0, |index| index + 1);
    let prefix = &before[start..];
    let Some(mut words) = shlex::split(&before[..start]) else {
        // An open quote: the word boundaries are unknown.
        return Completion::Words {
            start,
            words: Vec::new(),
        };
    };
    if words.first().map(String::as_str) == Some("help") {
        // `help CMD ...` completes like `CMD ...`.
        words.remove(0);
    }

    let root = command_tree();
    let mut command = &root;
    let mut positionals = 0usize;
    let mut value_of: Option<&Arg> = None;
    for word in &words {
        if value_of.take().is_some() {
            continue;
        }
        if word.starts_with('-') && word.len() > 1 {
            if let Some(arg) = find_option(command, word) {
                if takes_value(arg) && !word.contains('=') && !is_attached_short(word) {
                    value_of = Some(arg);
                }
            }
            continue;
        }
        if positionals == 0 {
            if let Some(sub) = find_subcommand(command, word) {
                command = sub;
                continue;
            }
        }
        positionals += 1;
    }

    let candidates: Vec<String> = if let Some(arg) = value_of {
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|value| !value.is_hide_set())
            .map(|value| value.get_name().to_string())
            .collect();
        if values.is_empty() {
            return Completion::Files;
        }
        values
    } else if prefix.starts_with('-') {
        let mut options: Vec<String> = command
            .get_arguments()
            .filter(|arg| !arg.is_hide_set())
            .filter_map(|arg| arg.get_long().map(|long| format!("--{long}")))
            .collect();
        options.push("--help".to_string());
        options
    } else if command.has_subcommands() && positionals == 0 {
        let mut names: Vec<String> = command
            .get_subcommands()
            .filter(|sub| !sub.is_hide_set())
            .flat_map(|sub| {
                std::iter::once(sub.get_name().to_string())
                    .chain(sub.get_visible_aliases().map(str::to_string))
            })
            .collect();
        if std::ptr::eq(command, &root) && words.is_empty() {
            names.extend(BUILTINS.iter().map(|name| name.to_string()));
        }
        names
    } else if names_existing_vm(command, positionals) {
        vm_names.to_vec()
    } else {
        return Completion::Files;
    };

    let mut words: Vec<String> = candidates
        .into_iter()
        .filter(|candidate| candidate.starts_with(prefix))
        .collect();
    words.sort();
    words.dedup();
    Completion::Words { start, words }
}

/// Returns true for `-tVALUE`, a short option with its value in the same word.
fn is_attached_short(word: &str) -> bool {
    !word.starts_with("--") && word.chars().count() > 2
}

/// Returns true when positional number `index` of `command` is the name of an existing
/// VM: the `NAME` of every command but `create`, which takes a new one.
fn names_existing_vm(command: &Command, index: usize) -> bool {
    if command.get_name() == "create" {
        return false;
    }
    command
        .get_positionals()
        .nth(index)
        .is_some_and(|arg| arg.get_id() == "name")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        let vms = vec!["web".to_string(), "worker".to_string(), "db".to_string()];
        match complete(line, line.len(), &vms) {
            Completion::Words { words, .. } => words,
            Completion::Files => panic!("{line:?} completed as a file path"),
        }
    }

    #[test]
    fn first_word_offers_commands_and_builtins() {
        let all = words("");
        for expected in [
            "create", "start", "stop", "list", "ls", "top", "help", "exit",
        ] {
            assert!(
                all.contains(&expected.to_string()),
                "{expected} missing: {all:?}"
            );
        }
        assert!(!all.contains(&"vmm".to_string()), "hidden command offered");
        assert_eq!(words("st"), ["start", "stop"]);
    }

    #[test]
    fn name_argument_offers_vms() {
        assert_eq!(words("start w"), ["web", "worker"]);
        assert_eq!(words("console "), ["db", "web", "worker"]);
        assert_eq!(words("stop --force w"), ["web", "worker"]);
        assert_eq!(words("help st"), ["start", "stop"]);
    }

    #[test]
    fn create_takes_no_existing_name() {
        assert_eq!(complete("create w", 8, &["web".into()]), Completion::Files);
    }

    #[test]
    fn options_of_the_command() {
        let options = words("stop web --");
        assert!(options.contains(&"--timeout".to_string()), "{options:?}");
        assert!(options.contains(&"--force".to_string()), "{options:?}");
        assert!(options.contains(&"--state-dir".to_string()), "{options:?}");
        assert_eq!(words("stop web --f"), ["--force"]);
    }

    #[test]
    fn option_values_and_paths() {
        assert_eq!(words("list --output j"), ["json"]);
        assert_eq!(
            complete("create vm --kernel /bo", 22, &[]),
            Completion::Files
        );
        // The value of --timeout is not mistaken for the VM name.
        assert_eq!(words("stop --timeout 5 w"), ["web", "worker"]);
    }

    #[test]
    fn nested_subcommands() {
        let disk = words("disk ");
        assert!(disk.contains(&"create".to_string()), "{disk:?}");
        assert!(!disk.contains(&"exit".to_string()), "{disk:?}");
    }

    #[test]
    fn start_is_word_boundary() {
        let line = "stop we";
        match complete(line, line.len(), &["web".into()]) {
            Completion::Words { start, words } => {
                assert_eq!(start, 5);
                assert_eq!(words, ["web"]);
            }
            Completion::Files => panic!("completed as a file"),
        }
    }
}
