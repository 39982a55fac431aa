//! Command-line front end: argument parsing and error reporting.

/// `println!` for the tool's report on stdout, through [`report`]: a reader that went away
/// (`tpo eval f | head -1`) ends the report, not the run, and never panics.
macro_rules! outln {
    () => {
        $crate::cli::report(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::report(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` through [`report`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::report(format_args!($($arg)*))
    };
}

mod control;
mod eval;
mod input;
mod output;
mod plot;
mod reproduce;
mod reversal;
mod tensors;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "tpo", version, about = "Target Policy Optimization: reference evaluation and experiments")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate the TPO loss on tensors dumped from a trainer (safetensors) with the f64 reference.
    Eval(eval::EvalArgs),
    /// Reproduce the paper's experiments with this library (TPO against PG, DG, GRPO, CE).
    Reproduce(reproduce::ReproduceArgs),
}

/// Parses the command line and runs it; every failure becomes a one-line message and exit code 1
/// (2 for usage errors, as clap reports them, condensed to one line by [`usage_error`]).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if !e.use_stderr() || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                // --help, --version, or `tpo` alone: the full text is what was asked for.
                let _ = e.print();
                return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
            }
            eprintln!("{}", usage_error(&e));
            return ExitCode::from(2);
        }
    };
    let res = match cli.command {
        Command::Eval(a) => eval::run(a),
        Command::Reproduce(a) => reproduce::run(a),
    };
    match res {
        Ok(()) if REPORT_FAILED.load(std::sync::atomic::Ordering::Relaxed) => ExitCode::from(1),
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            // One line whatever the message quotes (a path given on the command line may hold a
            // newline too).
            eprintln!("error: {}", tensors::printable(&msg));
            ExitCode::from(1)
        }
    }
}

/// Set when the report could not be written for a reason other than a closed pipe.
static REPORT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes part of the report to stdout. `println!` panics when stdout is gone (a closed pipe:
/// `tpo eval f | head -1`); here the first failed write ends the report, and the run goes on to
/// write its files. A closed pipe is the reader's choice and leaves the exit status alone; any
/// other failure (a full disk behind a redirect) is said once on stderr, and the run exits 1.
pub(crate) fn report(args: std::fmt::Arguments) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    static ENDED: AtomicBool = AtomicBool::new(false);
    if ENDED.load(Ordering::Relaxed) {
        return;
    }
    // stdout writes each line out at its newline, so a failure shows on the line that meets it.
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        ENDED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            REPORT_FAILED.store(true, Ordering::Relaxed);
            eprintln!("error: cannot write the report to stdout ({e}); the rest of it is left out");
        }
    }
}

/// A path as the tool prints it: `display()`, with control characters escaped (one line).
pub(crate) fn shown(p: &std::path::Path) -> String {
    tensors::printable(&p.display().to_string())
}

/// A clap usage error on one line: its message, any tip and the list it announces joined with
/// "; ", then where to find help. The usage synopsis and blank lines clap adds are dropped.
fn usage_error(e: &clap::Error) -> String {
    // The text with its styles as ANSI sequences, removed here: `to_string()` would also delete
    // the control characters of an argument clap quotes, misquoting it.
    let mut text = strip_csi(&e.render().ansi().to_string());
    // Escape the control characters of what clap may quote from the command line (an argument,
    // the name or the value either side of its '=', or one flag of a short cluster) before the
    // text is split into lines: a newline in a value shows as `\n` instead of breaking the line.
    let mut quoted: Vec<String> = Vec::new();
    for arg in std::env::args_os().skip(1) {
        let arg = strip_csi(&arg.to_string_lossy());
        if let Some((name, value)) = arg.split_once('=') {
            quoted.extend([name.to_string(), value.to_string()]);
        }
        if let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.starts_with('-')) {
            quoted.extend(cluster.chars().map(|c| format!("-{c}")));
        }
        quoted.push(arg);
    }
    quoted.retain(|q| tensors::printable(q) != *q);
    // Longest first, so that an argument that ends another is not escaped inside it first.
    quoted.sort_by_key(|q| std::cmp::Reverse(q.len()));
    for q in quoted {
        // Ends with the closing quote: `'{q}'`, and clap's tip `'-- {q}'`.
        text = text.replace(&format!("{q}'"), &format!("{}'", tensors::printable(&q)));
    }
    let mut parts: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            continue;
        }
        match parts.last_mut() {
            // "the following required arguments were not provided:" and its list.
            Some(last) if last.ends_with(':') => {
                last.push(' ');
                last.push_str(line);
            }
            Some(last) if last.ends_with('>') && (line.starts_with('<') || line.starts_with("--")) => {
                last.push_str(", ");
                last.push_str(line);
            }
            // "[possible values: a, b]" loses its brackets.
            _ => parts
                .push(line.strip_prefix('[').and_then(|l| l.strip_suffix(']')).unwrap_or(line).to_string()),
        }
    }
    let mut msg = parts.join("; ");
    if !msg.starts_with("error:") {
        msg = format!("error: {msg}");
    }
    // `args_os`: `args` panics on an argument that is not valid UTF-8.
    let sub = std::env::args_os().nth(1);
    let help = match sub.as_ref().and_then(|s| s.to_str()) {
        Some(sub @ ("eval" | "reproduce")) => format!("tpo {sub} --help"),
        _ => "tpo --help".to_string(),
    };
    tensors::printable(&format!("{msg} (see '{help}')"))
}

/// `s` without the ANSI colour sequences clap styles its messages with (`ESC [ params m`, params
/// digits, `;` or `:`). Any other escape is left for [`tensors::printable`] to show.
fn strip_csi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let params = after
            .strip_prefix('[')
            .map(|p| p.trim_start_matches(|c: char| c.is_ascii_digit() || c == ';' || c == ':'));
        match params.and_then(|p| p.strip_prefix('m')) {
            Some(tail) => rest = tail,
            None => {
                out.push('\x1b');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Parses a count that must be at least 1 (`--seeds`, `--steps`, `--threads`).
pub(crate) fn count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number, at least 1".into()),
    }
}

/// Parses a real number (`--eta`, `--zero-std-threshold`); its range is checked by the library,
/// whose error names the parameter and the allowed values.
pub(crate) fn number(s: &str) -> Result<f64, String> {
    s.trim().parse::<f64>().map_err(|_| "expected a number, such as 0.5 or 1e-3".into())
}
