//! Command-line front end: argument parsing and error reporting.

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
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// A clap usage error on one line: its message, any tip and the list it announces joined with
/// "; ", then where to find help. The usage synopsis and blank lines clap adds are dropped.
fn usage_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
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
    format!("{msg} (see '{help}')")
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
