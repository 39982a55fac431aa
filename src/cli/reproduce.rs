//! `tpo reproduce tabular`: the paper's tabular bandit experiments with this library.

use super::output::{self, Policy, Scratch};
use super::plot::{self, seeds_text, Figure};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tpo::experiments::tabular::{
    multi_run, run_all, single_run, CpuBackend, MethodCurves, MultiConfig, SingleConfig, TpoBackend,
    MULTI_METHODS, SINGLE_METHODS,
};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Experiment {
    /// Both tabular bandit experiments (single context and multi context).
    Tabular,
    /// CartPole-v1 with an MLP policy: TPO against REINFORCE, PPO, GRPO and DG (through tpo::candle).
    Control,
    /// Token reversal with a candle transformer (--reward bag|terminal, --vocab, --length).
    Reversal,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The f64 CPU reference.
    Cpu,
    /// The CUDA kernels (needs a build with `--features cuda` and a GPU).
    Cuda,
}

#[derive(Args)]
pub struct ReproduceArgs {
    /// Which experiment to run.
    pub experiment: Experiment,
    /// Seeds averaged per method, >= 1 (default: 100 tabular, 20 control, 2 reversal).
    #[arg(long, value_parser = super::count, allow_hyphen_values = true)]
    pub seeds: Option<usize>,
    /// Steps per run, >= 1 (default: tabular the paper's, 150 single-context and 1000
    /// multi-context; control 60 rollout batches of 16 episodes; reversal 100 bag, 40 terminal).
    #[arg(long, value_parser = super::count, allow_hyphen_values = true)]
    pub steps: Option<usize>,
    /// control only: gradient epochs per rollout batch, >= 1 (default: the sweep 1, 4 and 16).
    #[arg(long, value_parser = super::count, allow_hyphen_values = true)]
    pub epochs: Option<usize>,
    /// control only: the methods to run, comma-separated keys (default: reinforce, ppo, grpo,
    /// dg, tpo, tpo_mean; also tpo_noanchor and tpo_step).
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// control only: the TPO methods' target temperature eta, > 0 (default 1).
    #[arg(long, value_parser = super::number, allow_hyphen_values = true)]
    pub tpo_eta: Option<f64>,
    /// Backend for TPO's target and fit.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
    /// Output folder for the JSON results and the figures (created if missing; default `results`,
    /// for control `results/control`, for reversal `results/reversal`). Existing result files in it are refused before the run
    /// starts, unless --force.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Overwrite existing result files in the --out folder (never a read-only file).
    #[arg(long)]
    pub force: bool,
    /// Worker threads, >= 1 (default: all cores). Results do not depend on it.
    #[arg(long, value_parser = super::count, allow_hyphen_values = true)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub reversal: super::reversal::ReversalArgs,
}

fn backend(b: Backend) -> Result<Box<dyn TpoBackend>, String> {
    match b {
        Backend::Cpu => Ok(Box::new(CpuBackend)),
        Backend::Cuda => cuda_backend(),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend() -> Result<Box<dyn TpoBackend>, String> {
    Err("this tpo was built without CUDA: rebuild with `cargo build --release --features cuda`".into())
}

#[cfg(feature = "cuda")]
fn cuda_backend() -> Result<Box<dyn TpoBackend>, String> {
    tpo::cuda::TabularCudaBackend::new()
        .map(|b| Box::new(b) as Box<dyn TpoBackend>)
        .map_err(|e| e.to_string())
}

pub fn run(a: ReproduceArgs) -> Result<(), String> {
    if a.experiment != Experiment::Reversal {
        if let Some(flag) = a.reversal.any_given() {
            return Err(format!("{flag} applies to reversal only"));
        }
    }
    if a.experiment != Experiment::Control && a.epochs.is_some() {
        return Err("--epochs applies to `tpo reproduce control` only".into());
    }
    if a.experiment != Experiment::Control && a.methods.is_some() {
        return Err("--methods applies to `tpo reproduce control` only".into());
    }
    if a.experiment != Experiment::Control && a.tpo_eta.is_some() {
        return Err("--tpo-eta applies to `tpo reproduce control` only".into());
    }
    if a.experiment == Experiment::Control {
        return super::control::run(a);
    }
    if a.experiment == Experiment::Reversal {
        if a.backend != Backend::Cpu {
            return Err("--backend applies to tabular only (reversal runs on candle's CPU backend)".into());
        }
        let out = a.out.clone().unwrap_or_else(|| PathBuf::from("results/reversal"));
        return super::reversal::run(super::reversal::Request {
            args: &a.reversal,
            seeds: a.seeds,
            steps: a.steps,
            out: &out,
            force: a.force,
            threads: a.threads,
        });
    }
    let (seeds, out) = (a.seeds.unwrap_or(100), a.out.clone().unwrap_or_else(|| PathBuf::from("results")));
    // The parsers refuse 0; these guard callers that build the arguments by hand.
    if seeds == 0 {
        return Err("--seeds must be at least 1".into());
    }
    if a.steps == Some(0) || a.threads == Some(0) {
        return Err("--steps and --threads must be at least 1".into());
    }
    let policy = Policy::new(a.force, &[]);
    // Every file is checked before the run, so a long run never ends in a refusal.
    if out.exists() && !out.is_dir() {
        return Err(format!("--out {} is not a folder", out.display()));
    }
    for name in FILES {
        output::check(&out.join(name), &policy)?;
    }
    let be = backend(a.backend)?;
    let threads =
        a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    std::fs::create_dir_all(&out)
        .map_err(|e| format!("cannot create the folder {}: {}", out.display(), io_text(&e)))?;

    let single = SingleConfig { seeds, steps: a.steps.unwrap_or(150), ..SingleConfig::default() };
    let multi = MultiConfig { seeds, steps: a.steps.unwrap_or(1000), ..MultiConfig::default() };
    let t0 = Instant::now();

    let bar = progress(SINGLE_METHODS.len() * seeds, "single context");
    let be_ref: &dyn TpoBackend = be.as_ref();
    let job = |m, s| single_run(&single, m, s, be_ref);
    let single_curves =
        run_all(&SINGLE_METHODS, seeds, threads, &job, &|| bar.inc(1)).map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let single_steps: Vec<f64> = (0..single.steps).map(|t| t as f64).collect();
    let single_config = json!({
        "actions": single.actions,
        "batch": single.batch,
        "alpha": single.alpha,
        "eta": single.eta,
        "steps": single.steps,
        "seeds": single.seeds,
        "seed": single.seed,
    });
    write_json(
        &out.join("tabular_single.json"),
        &policy,
        single_config,
        &single_steps,
        &single_curves,
        "before",
    )?;
    draw(
        &out,
        "tabular_single",
        &policy,
        &Figure {
            title: &format!(
                "Single context (A = {}, B = {}, α = {}, {}, TPO on {})",
                single.actions,
                single.batch,
                single.alpha,
                seeds_text(single.seeds),
                be.name()
            ),
            steps: &single_steps,
            curves: &single_curves,
            seeds: single.seeds,
            x_label: "step (error measured before it)",
            error_label: "error 1 − π(y*)",
            misalignment_label: "1 − cos(g, g*_{PG})",
        },
    )?;

    let bar = progress(MULTI_METHODS.len() * seeds, "multi context");
    let job = |m, s| multi_run(&multi, m, s, be_ref);
    let multi_curves =
        run_all(&MULTI_METHODS, seeds, threads, &job, &|| bar.inc(1)).map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let multi_steps: Vec<f64> = (1..=multi.steps).map(|t| t as f64).collect();
    let multi_config = json!({
        "contexts": multi.contexts,
        "actions": multi.actions,
        "alpha": multi.alpha,
        "eta": multi.eta,
        "steps": multi.steps,
        "seeds": multi.seeds,
        "seed": multi.seed,
    });
    write_json(&out.join("tabular_multi.json"), &policy, multi_config, &multi_steps, &multi_curves, "after")?;
    draw(
        &out,
        "tabular_multi",
        &policy,
        &Figure {
            title: &format!(
                "Multi context (N = {}, A = {}, α = {}, {}, exact updates, TPO on {})",
                multi.contexts,
                multi.actions,
                multi.alpha,
                seeds_text(multi.seeds),
                be.name()
            ),
            steps: &multi_steps,
            curves: &multi_curves,
            seeds: multi.seeds,
            x_label: "step (error measured after it)",
            error_label: "mean error 1 − π(y)",
            misalignment_label: "1 − cos(g, g_{CE})",
        },
    )?;

    let over = if seeds >= 2 {
        format!("means over {}", seeds_text(seeds))
    } else {
        "1 seed: no standard errors (null in the JSON)".to_string()
    };
    outln!("Single context: error 1 − π(y*) before the step (misalignment to g*_PG in brackets), {over}");
    table(&single_curves, &single_steps, &[0, 25, 50, 100]);
    outln!();
    outln!("Multi context: mean error 1 − π(y) after the step (misalignment to g_CE in brackets), {over}");
    table(&multi_curves, &multi_steps, &[1, 10, 100, 500]);
    outln!();
    outln!(
        "{}, TPO on {}, {} threads, {:.1} s; wrote {}/tabular_{{single,multi}}.{{json,png,svg}}",
        seeds_text(seeds),
        be.name(),
        threads,
        t0.elapsed().as_secs_f64(),
        super::shown(&out)
    );
    Ok(())
}

/// The files a run writes into the --out folder.
const FILES: [&str; 6] = [
    "tabular_single.json",
    "tabular_single.png",
    "tabular_single.svg",
    "tabular_multi.json",
    "tabular_multi.png",
    "tabular_multi.svg",
];

/// An I/O error as text, without the "(os error N)" suffix.
fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_string()
}

/// Draws `out/stem.png` and `out/stem.svg`. The figure code writes to paths of its own, so it
/// draws into a private scratch folder whose files then go through [`output::write`]; errors name
/// the final paths.
fn draw(out: &Path, stem: &str, policy: &Policy, fig: &Figure) -> Result<(), String> {
    let scratch = Scratch::new_in(out).map_err(|e| {
        format!("cannot write the figures {stem}.png and .svg in {}: {}", out.display(), io_text(&e))
    })?;
    let rename = |msg: String| msg.replace(&scratch.path().display().to_string(), &out.display().to_string());
    plot::draw(fig, &scratch.path().join(stem)).map_err(rename)?;
    for ext in ["png", "svg"] {
        let name = format!("{stem}.{ext}");
        let bytes = std::fs::read(scratch.path().join(&name))
            .map_err(|e| format!("cannot write {}: {}", out.join(&name).display(), io_text(&e)))?;
        output::write(&out.join(&name), policy, &bytes)?;
    }
    Ok(())
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>15} [{bar:40}] {pos}/{len} runs ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Prints per method the error (and misalignment) at the given step numbers (as in the JSON's
/// `steps`), the final values and the first step with mean error below 1%.
fn table(curves: &[MethodCurves], steps: &[f64], at: &[usize]) {
    let cols: Vec<(usize, usize)> = at
        .iter()
        .filter_map(|&s| steps.iter().position(|&x| x as usize == s).map(|i| (s, i)))
        .chain(std::iter::once((steps.len() - 1, steps.len() - 1)).map(|(_, i)| (steps[i] as usize, i)))
        .fold(Vec::new(), |mut v, c| {
            if !v.contains(&c) {
                v.push(c);
            }
            v
        });
    out!("{:<6}", "method");
    for (s, _) in &cols {
        out!("{:>22}", format!("step {s}"));
    }
    outln!("{:>16}", "error < 1% at");
    for c in curves {
        out!("{:<6}", c.method.name());
        for &(_, i) in &cols {
            out!("{:>22}", format!("{:.3e} ({:.2e})", c.error_mean[i], c.misalignment_mean[i]));
        }
        let first = c.first_below(0.01).map_or("never".to_string(), |i| format!("step {}", steps[i]));
        outln!("{first:>16}");
    }
}

fn write_json(
    path: &Path,
    policy: &Policy,
    mut config: Value,
    steps: &[f64],
    curves: &[MethodCurves],
    when: &str,
) -> Result<(), String> {
    let mut methods = Map::new();
    for c in curves {
        methods.insert(
            c.method.name().to_string(),
            json!({
                "error_mean": c.error_mean,
                "error_se": c.error_se,
                "misalignment_mean": c.misalignment_mean,
                "misalignment_se": c.misalignment_se,
            }),
        );
    }
    if let Value::Object(o) = &mut config {
        o.insert("error_measured".into(), Value::String(format!("{when} each step")));
    }
    let steps: Vec<u64> = steps.iter().map(|&s| s as u64).collect();
    let doc = json!({
        "config": config,
        "statistics": "*_mean: mean over seeds; *_se: standard error of that mean (sample standard \
                       deviation over seeds / sqrt(seeds)), null with 1 seed, which has none",
        "steps": steps,
        "methods": methods,
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    output::write(path, policy, text.as_bytes())
}
