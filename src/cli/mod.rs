//! Command-line front end: argument parsing and error reporting.

mod eval;
mod plot;
mod reproduce;
mod tensors;

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
/// (2 for usage errors, as clap reports them).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
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
