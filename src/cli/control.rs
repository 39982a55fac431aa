//! `tpo reproduce control`: CartPole-v1 with a neural policy, TPO against REINFORCE, PPO, GRPO
//! and DG, every update through `tpo::candle::policy_loss` (see `tpo::experiments::control`).
//!
//! Writes into `--out` (default `results/control`): `summary.json` (per epoch setting and method:
//! final return, steps to 475, collapse fraction, update KL and gradient norms), `control.json`
//! (the configuration, mean ± s.e. curves and every seed's curves) and the figures
//! `control_returns.{png,svg}`, `control_stability.{png,svg}` and, when a TPO method ran,
//! `control_target.{png,svg}` (the first epoch's target against its anchor).

use super::output::{self, Policy, Scratch};
use super::plot::{register_font, seeds_text, segments, step_ticks, LogAxis};
use super::reproduce::ReproduceArgs;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tpo::experiments::control::{
    collapsed, final_return, first_reaching, mean_se, run_all, ControlConfig, ControlMethod, RunCurves,
    TargetStats, ALL_METHODS, METHODS,
};

/// The epoch settings swept when `--epochs` is not given.
pub const EPOCH_SWEEP: [usize; 3] = [1, 4, 16];

/// Rollout batches per run when `--steps` is not given.
pub const DEFAULT_ITERATIONS: usize = 60;

/// The files a run writes.
const FILES: [&str; 8] = [
    "summary.json",
    "control.json",
    "control_returns.png",
    "control_returns.svg",
    "control_stability.png",
    "control_stability.svg",
    "control_target.png",
    "control_target.svg",
];

/// Runs the experiment with the arguments of `tpo reproduce control`.
pub fn run(a: ReproduceArgs) -> Result<(), String> {
    if a.backend != super::reproduce::Backend::Cpu {
        return Err("reproduce control runs on the CPU (candle's CPU backend): drop --backend".into());
    }
    let seeds = a.seeds.unwrap_or(20);
    let iterations = a.steps.unwrap_or(DEFAULT_ITERATIONS);
    if seeds == 0 || iterations == 0 || a.threads == Some(0) || a.epochs == Some(0) {
        return Err("--seeds, --steps, --epochs and --threads must be at least 1".into());
    }
    let epochs: Vec<usize> = a.epochs.map_or(EPOCH_SWEEP.to_vec(), |e| vec![e]);
    let methods = methods(a.methods.as_deref())?;
    if let Some(eta) = a.tpo_eta {
        if !(eta.is_finite() && eta > 0.0) {
            return Err(format!("--tpo-eta must be finite and > 0, got {eta}"));
        }
    }
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("results/control"));
    let policy = Policy::new(a.force, &[]);
    if out.exists() && !out.is_dir() {
        return Err(format!("--out {} is not a folder", out.display()));
    }
    let tpo_ran = methods.iter().any(|m| m.is_tpo());
    // control_target is written only when a TPO variant runs.
    for name in FILES.iter().filter(|n| tpo_ran || !n.starts_with("control_target")) {
        output::check(&out.join(name), &policy)?;
    }
    let threads =
        a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    // The runs are parallel; candle's matrix products stay on their own thread.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    std::fs::create_dir_all(&out)
        .map_err(|e| format!("cannot create the folder {}: {}", out.display(), io_text(&e)))?;

    let cfg = ControlConfig { seeds, iterations, ..ControlConfig::default() };
    let cfg = ControlConfig { tpo_eta: a.tpo_eta.unwrap_or(cfg.tpo_eta), ..cfg };
    let t0 = Instant::now();
    let total = epochs.len() * methods.len() * seeds;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("control [{bar:40}] {pos}/{len} runs ({elapsed}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let runs = run_all(&cfg, &methods, &epochs, threads, &|| bar.inc(1))?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();

    let stats: Vec<(usize, Vec<MethodStats>)> = epochs
        .iter()
        .map(|&e| {
            let ms = methods
                .iter()
                .map(|&m| {
                    let rs: Vec<&RunCurves> =
                        runs.iter().filter(|r| r.method == m && r.epochs == e).collect();
                    MethodStats::new(&cfg, m, e, &rs)
                })
                .collect();
            (e, ms)
        })
        .collect();

    let episodes = cfg.starts * cfg.group;
    let config = json!({
        "env": "CartPole-v1 (Gymnasium's dynamics, termination |x| > 2.4 or |theta| > 12 deg, truncation at 500 steps)",
        "policy": format!("MLP 4 -> {} -> 2, ReLU, PyTorch nn.Linear initialisation", cfg.hidden),
        "optimizer": format!("Adam, lr {}, betas (0.9, 0.999), eps 1e-8, one full-batch step per epoch", cfg.lr),
        "seeds": cfg.seeds,
        "iterations": cfg.iterations,
        "start_states_per_iteration": cfg.starts,
        "episodes_per_start_state": cfg.group,
        "episodes_per_iteration": episodes,
        "epochs": epochs,
        "clip": cfg.clip,
        "grpo_beta": cfg.beta,
        "tpo_eta": cfg.tpo_eta,
        "dg_eta": cfg.dg_eta,
        "seed": cfg.seed,
        "threshold": cfg.threshold,
        "collapse_below": cfg.collapse,
        "final_window": cfg.final_window,
        "threads": threads,
        "seconds": secs,
        "methods": methods.iter().map(|m| m.key()).collect::<Vec<_>>(),
        "mapping": methods.iter().map(|m| (m.key().to_string(), Value::String(m.mapping().into()))).collect::<Map<_, _>>(),
        "l_old": "log-probs of the first epoch's forward pass (the rollout weights), frozen for every epoch of the batch",
    });
    write_summary(&out, &policy, &cfg, &config, &stats)?;
    write_curves(&out, &policy, &config, &stats, &runs)?;
    let title = format!(
        "CartPole-v1, MLP 4-{}-2, Adam lr {}: {} start states × {} episodes per batch, {}",
        cfg.hidden,
        cfg.lr,
        cfg.starts,
        cfg.group,
        seeds_text(cfg.seeds)
    );
    draw(&out, "control_returns", &policy, Fig::Returns, &title, &cfg, &stats)?;
    draw(&out, "control_stability", &policy, Fig::Stability, &title, &cfg, &stats)?;
    if tpo_ran {
        draw(&out, "control_target", &policy, Fig::Target, &title, &cfg, &stats)?;
    } else {
        // A figure of an earlier run is the user's: left in place, but said to be stale.
        for ext in ["png", "svg"] {
            let old = out.join(format!("control_target.{ext}"));
            if old.exists() {
                eprintln!(
                    "note: {} is from an earlier run (no TPO method ran now, so none was drawn); left in place",
                    super::shown(&old)
                );
            }
        }
    }

    table(&cfg, &stats);
    outln!(
        "{}, {} iterations × {} episodes, {} threads, {:.1} s; wrote {}/{{summary,control}}.json, \
         control_{{{}}}.{{png,svg}}",
        seeds_text(cfg.seeds),
        cfg.iterations,
        episodes,
        threads,
        secs,
        super::shown(&out),
        if tpo_ran { "returns,stability,target" } else { "returns,stability" }
    );
    Ok(())
}

/// The methods of `--methods` (keys, in the order given), or [`METHODS`] without it.
fn methods(keys: Option<&[String]>) -> Result<Vec<ControlMethod>, String> {
    let Some(keys) = keys else { return Ok(METHODS.to_vec()) };
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let m = ControlMethod::from_key(k.trim()).ok_or_else(|| {
            let all: Vec<&str> = ALL_METHODS.iter().map(|m| m.key()).collect();
            format!("--methods: unknown method '{k}' (expected some of {})", all.join(", "))
        })?;
        if out.contains(&m) {
            return Err(format!("--methods: '{k}' is given twice"));
        }
        out.push(m);
    }
    if out.is_empty() {
        return Err("--methods: give at least one method".into());
    }
    Ok(out)
}

/// One method's results at one epoch setting.
struct MethodStats {
    method: ControlMethod,
    epochs: usize,
    /// Mean and s.e. over seeds, per iteration: return, cumulative env steps, update KL (mean
    /// over states) and gradient norm (mean over epochs).
    ret: (Vec<f64>, Option<Vec<f64>>),
    env_steps: Vec<f64>,
    kl: (Vec<f64>, Option<Vec<f64>>),
    grad: (Vec<f64>, Option<Vec<f64>>),
    final_: (f64, Option<f64>),
    /// Iteration at which the mean curve first reaches the threshold.
    iter_to_threshold: Option<usize>,
    per_seed_steps: Vec<Option<u64>>,
    solved: usize,
    collapsed: usize,
    kl_mean: f64,
    kl_max: f64,
    kl_max_state: f64,
    grad_mean: f64,
    grad_max: f64,
    /// TPO methods: mean over seeds, per iteration, of each [`TargetStats`] field (in the order
    /// of [`TARGET_FIELDS`]).
    target: Option<Vec<Vec<f64>>>,
}

/// The [`TargetStats`] fields as named in the JSON.
const TARGET_FIELDS: [&str; 5] = ["kl_q_pold", "max_pold", "max_q", "tv_pold_q", "pold_z"];

fn target_fields(t: &TargetStats) -> [f64; 5] {
    [t.kl_q_pold, t.max_pold, t.max_q, t.tv, t.pold_z]
}

fn columns(rs: &[&RunCurves], f: impl Fn(&RunCurves, usize) -> f64) -> (Vec<f64>, Option<Vec<f64>>) {
    let n = rs.first().map_or(0, |r| r.returns.len());
    let (mut m, mut s) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let col: Vec<f64> = rs.iter().map(|r| f(r, i)).collect();
        let (a, b) = mean_se(&col);
        m.push(a);
        s.push(b);
    }
    let se = if rs.len() >= 2 { Some(s.into_iter().map(|x| x.unwrap_or(0.0)).collect()) } else { None };
    (m, se)
}

impl MethodStats {
    fn new(cfg: &ControlConfig, method: ControlMethod, epochs: usize, rs: &[&RunCurves]) -> Self {
        let ret = columns(rs, |r, i| r.returns[i]);
        let env_steps = columns(rs, |r, i| r.env_steps[i] as f64).0;
        let kl = columns(rs, |r, i| r.updates[i].kl_mean);
        let grad = columns(rs, |r, i| r.updates[i].grad_norm_mean);
        let finals: Vec<f64> = rs.iter().map(|r| final_return(&r.returns, cfg.final_window)).collect();
        let per_seed_steps = rs
            .iter()
            .map(|r| first_reaching(&r.returns, cfg.threshold).map(|i| r.env_steps[i]))
            .collect::<Vec<_>>();
        let solved = per_seed_steps.iter().filter(|s| s.is_some()).count();
        let n_coll = rs.iter().filter(|r| collapsed(&r.returns, cfg.threshold, cfg.collapse)).count();
        let all = |f: &dyn Fn(&RunCurves) -> Vec<f64>| rs.iter().flat_map(|r| f(r)).collect::<Vec<f64>>();
        let kls = all(&|r| r.updates.iter().map(|u| u.kl_mean).collect());
        let gs = all(&|r| r.updates.iter().map(|u| u.grad_norm_mean).collect());
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let max = |v: &[f64]| v.iter().copied().fold(0.0f64, f64::max);
        let target = if rs.iter().all(|r| r.updates.iter().all(|u| u.target.is_some())) && method.is_tpo() {
            Some(
                (0..TARGET_FIELDS.len())
                    .map(|f| {
                        columns(rs, |r, i| r.updates[i].target.as_ref().map_or(0.0, |t| target_fields(t)[f]))
                            .0
                    })
                    .collect(),
            )
        } else {
            None
        };
        Self {
            target,
            method,
            epochs,
            iter_to_threshold: first_reaching(&ret.0, cfg.threshold),
            ret,
            env_steps,
            kl,
            grad,
            final_: mean_se(&finals),
            per_seed_steps,
            solved,
            collapsed: n_coll,
            kl_mean: mean(&kls),
            kl_max: max(&kls),
            kl_max_state: rs.iter().flat_map(|r| r.updates.iter().map(|u| u.kl_max)).fold(0.0, f64::max),
            grad_mean: mean(&gs),
            grad_max: rs.iter().flat_map(|r| r.updates.iter().map(|u| u.grad_norm_max)).fold(0.0, f64::max),
        }
    }

    fn steps_to_threshold(&self) -> Option<u64> {
        self.iter_to_threshold.map(|i| self.env_steps[i].round() as u64)
    }

    fn summary(&self) -> Value {
        json!({
            "final": self.final_.0,
            "final_se": self.final_.1,
            "steps_to_threshold": self.steps_to_threshold(),
            "updates_to_threshold": self.iter_to_threshold.map(|i| i * self.epochs),
            "iterations_to_threshold": self.iter_to_threshold.map(|i| i + 1),
            "seeds_reaching_threshold": self.solved,
            "per_seed_steps_to_threshold": self.per_seed_steps,
            "collapsed": self.collapsed,
            "collapse_fraction": if self.solved > 0 { Some(self.collapsed as f64 / self.solved as f64) } else { None },
            "update_kl_mean": self.kl_mean,
            "update_kl_max": self.kl_max,
            "update_kl_max_over_states": self.kl_max_state,
            "grad_norm_mean": self.grad_mean,
            "grad_norm_max": self.grad_max,
            "target": self.target.as_ref().map(|t| {
                let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
                let n = t[0].len();
                let w = 10.min(n);
                TARGET_FIELDS.iter().zip(t).map(|(k, v)| {
                    (k.to_string(), json!({"mean": mean(v), "first_batch": v[0], "last_10_batches": mean(&v[n - w..])}))
                }).collect::<Map<_, _>>()
            }),
        })
    }
}

fn write_summary(
    out: &Path,
    policy: &Policy,
    cfg: &ControlConfig,
    config: &Value,
    stats: &[(usize, Vec<MethodStats>)],
) -> Result<(), String> {
    let by_epochs: Map<String, Value> = stats
        .iter()
        .map(|(e, ms)| {
            let methods: Map<String, Value> =
                ms.iter().map(|m| (m.method.key().to_string(), m.summary())).collect();
            (e.to_string(), json!({ "methods": methods }))
        })
        .collect();
    // The top-level `methods` is the paper's setting (4 epochs) when it ran, else the first.
    let main = stats.iter().find(|(e, _)| *e == 4).unwrap_or(&stats[0]);
    let methods: Map<String, Value> =
        main.1.iter().map(|m| (m.method.key().to_string(), m.summary())).collect();
    let doc = json!({
        "metric": "mean return of each rollout batch's episodes (CartPole-v1, max 500)",
        "threshold": cfg.threshold,
        "methods_epochs": main.0,
        "methods": methods,
        "by_epochs": by_epochs,
        "definitions": {
            "final": "mean over seeds of each seed's mean return over its last `final_window` batches; final_se: its standard error (null with 1 seed)",
            "steps_to_threshold": "environment steps (mean over seeds, cumulative) by the first batch at which the mean-over-seeds return curve reaches the threshold; null if it never does",
            "updates_to_threshold": "Adam steps taken before that batch was rolled out ((iterations_to_threshold - 1) × epochs); iterations_to_threshold counts the rollout batches up to and including it",
            "per_seed_steps_to_threshold": "per seed: environment steps by its first batch with mean return >= threshold, or null",
            "collapse_fraction": "collapsed / seeds_reaching_threshold: a seed collapses when a later batch's mean return falls below collapse_below after it first reached the threshold; null if no seed reached it",
            "update_kl_mean": "KL(pi_new || pi_old) of each batch's update (all its epochs), averaged over the batch's states, then over batches and seeds",
            "update_kl_max": "the largest batch-averaged update KL over all batches and seeds (the overshoot)",
            "update_kl_max_over_states": "the largest single-state KL of any update",
            "grad_norm_mean": "global L2 norm of the loss gradient per Adam step, averaged over epochs, batches and seeds",
            "grad_norm_max": "its largest value at any Adam step",
            "target": "TPO methods only (null otherwise): the target q of each batch's first epoch against its anchor p_old = softmax(l_old), per group then averaged over the batch's groups and over seeds; `mean` over all batches, `first_batch`, `last_10_batches`. kl_q_pold = KL(q || p_old); max_pold = max_i p_old_i; max_q = max_i q_i; tv_pold_q = (1/2) sum_i |p_old_i - q_i| (the first epoch's gradient p - q, as a total variation); pold_z = sum_i p_old_i z_i (the anchor's expected z-scored return: negative when it favours the group's low-return members)",
        },
        "config": config,
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    output::write(&out.join("summary.json"), policy, text.as_bytes())
}

fn write_curves(
    out: &Path,
    policy: &Policy,
    config: &Value,
    stats: &[(usize, Vec<MethodStats>)],
    runs: &[RunCurves],
) -> Result<(), String> {
    let mut curves = Map::new();
    for (e, ms) in stats {
        let m: Map<String, Value> = ms
            .iter()
            .map(|m| {
                (
                    m.method.key().to_string(),
                    json!({
                        "return_mean": m.ret.0, "return_se": m.ret.1,
                        "env_steps_mean": m.env_steps,
                        "update_kl_mean": m.kl.0, "update_kl_se": m.kl.1,
                        "grad_norm_mean": m.grad.0, "grad_norm_se": m.grad.1,
                        "target_mean": m.target.as_ref().map(|t| {
                            TARGET_FIELDS.iter().zip(t).map(|(k, v)| (k.to_string(), json!(v))).collect::<Map<_, _>>()
                        }),
                    }),
                )
            })
            .collect();
        curves.insert(e.to_string(), Value::Object(m));
    }
    let per_seed: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "method": r.method.key(), "epochs": r.epochs, "seed": r.seed,
                "returns": r.returns, "env_steps": r.env_steps,
                "update_kl_mean": r.updates.iter().map(|u| u.kl_mean).collect::<Vec<_>>(),
                "update_kl_max_over_states": r.updates.iter().map(|u| u.kl_max).collect::<Vec<_>>(),
                "grad_norm_mean": r.updates.iter().map(|u| u.grad_norm_mean).collect::<Vec<_>>(),
                "grad_norm_max": r.updates.iter().map(|u| u.grad_norm_max).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = json!({
        "config": config,
        "statistics": "*_mean: mean over seeds per batch; *_se: standard error of that mean (sample s.d. over seeds / sqrt(seeds)), null with 1 seed. Index i = rollout batch i + 1; its return is measured on its rollouts, before its update",
        "curves": curves,
        "runs": per_seed,
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    output::write(&out.join("control.json"), policy, text.as_bytes())
}

fn table(cfg: &ControlConfig, stats: &[(usize, Vec<MethodStats>)]) {
    let se = |s: Option<f64>| s.map_or(String::new(), |s| format!(" ± {s:.1}"));
    for (e, ms) in stats {
        outln!(
            "{e} epoch{} per batch: final return (last {} batches), steps to mean return {}, collapse after solving, update KL, gradient norm",
            if *e == 1 { "" } else { "s" },
            cfg.final_window,
            cfg.threshold
        );
        outln!(
            "{:<14}{:>16}{:>16}{:>10}{:>12}{:>11}{:>11}{:>11}{:>11}",
            "method",
            "final",
            "steps to 475",
            "solved",
            "collapsed",
            "KL mean",
            "KL max",
            "|g| mean",
            "|g| max"
        );
        for m in ms {
            let steps = m.steps_to_threshold().map_or("never".to_string(), |s| s.to_string());
            outln!(
                "{:<14}{:>16}{:>16}{:>10}{:>12}{:>11.2e}{:>11.2e}{:>11.2e}{:>11.2e}",
                m.method.label(),
                format!("{:.1}{}", m.final_.0, se(m.final_.1)),
                steps,
                format!("{}/{}", m.solved, cfg.seeds),
                format!("{}/{}", m.collapsed, m.solved),
                m.kl_mean,
                m.kl_max,
                m.grad_mean,
                m.grad_max
            );
        }
        outln!();
    }
}

// ---------------------------------------------------------------------------------------------
// Figures.

fn color(m: ControlMethod) -> RGBColor {
    match m {
        ControlMethod::Reinforce => RGBColor(31, 119, 180),
        ControlMethod::Ppo => RGBColor(255, 127, 14),
        ControlMethod::Grpo => RGBColor(44, 160, 44),
        ControlMethod::Dg => RGBColor(214, 39, 40),
        ControlMethod::Tpo => RGBColor(148, 103, 189),
        ControlMethod::TpoMean => RGBColor(140, 86, 75),
        ControlMethod::TpoNoAnchor => RGBColor(188, 189, 34),
        ControlMethod::TpoStep => RGBColor(23, 190, 207),
    }
}

fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_string()
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// The figures.
#[derive(Clone, Copy)]
enum Fig {
    Returns,
    Stability,
    /// The TPO methods' target against its anchor (drawn when a TPO method ran).
    Target,
}

/// Draws `out/stem.{png,svg}` through a scratch folder and [`output::write`].
fn draw(
    out: &Path,
    stem: &str,
    policy: &Policy,
    fig: Fig,
    title: &str,
    cfg: &ControlConfig,
    stats: &[(usize, Vec<MethodStats>)],
) -> Result<(), String> {
    register_font();
    let scratch = Scratch::new_in(out).map_err(|e| {
        format!("cannot write the figures {stem}.png and .svg in {}: {}", out.display(), io_text(&e))
    })?;
    let width = 420 + 480 * stats.len() as u32;
    let size = (width.max(900), if matches!(fig, Fig::Returns) { 620 } else { 1000 });
    let paint = |name: &str| -> Result<(), String> {
        let path = scratch.path().join(name);
        let e = |x: String| format!("cannot draw {}: {x}", out.join(name).display());
        if name.ends_with(".png") {
            let root = BitMapBackend::new(&path, size).into_drawing_area();
            paint(&root, fig, title, cfg, stats).map_err(|x| e(x.to_string()))?;
            root.present().map_err(|x| e(x.to_string()))?;
        } else {
            let root = SVGBackend::new(&path, size).into_drawing_area();
            paint(&root, fig, title, cfg, stats).map_err(|x| e(x.to_string()))?;
            root.present().map_err(|x| e(x.to_string()))?;
        }
        let bytes = std::fs::read(&path)
            .map_err(|x| format!("cannot write {}: {}", out.join(name).display(), io_text(&x)))?;
        output::write(&out.join(name), policy, &bytes)
    };
    paint(&format!("{stem}.png"))?;
    paint(&format!("{stem}.svg"))
}

fn paint<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    fig: Fig,
    title: &str,
    cfg: &ControlConfig,
    stats: &[(usize, Vec<MethodStats>)],
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let band = if cfg.seeds >= 2 {
        format!(
            "Lines: mean over {}. Shaded bands: ±1 standard error of the mean (s.d. over seeds / √{}).",
            seeds_text(cfg.seeds),
            cfg.seeds
        )
    } else {
        "Lines: 1 seed. No bands: one seed has no standard error.".to_string()
    };
    let batch = format!(
        "x axis: rollout batch ({} episodes each: {} start states × {} episodes); every method gets the same batches.",
        cfg.starts * cfg.group,
        cfg.starts,
        cfg.group
    );
    let band = if matches!(fig, Fig::Target) {
        format!("Lines: mean over {} (no bands).", seeds_text(cfg.seeds))
    } else {
        band
    };
    let mut lines = vec![band, batch];
    match fig {
        Fig::Returns => {
            lines.push(format!(
                "Return: mean episode return of the batch, measured before its update. Dashed line: {} (solved).",
                cfg.threshold
            ));
            let (_, h) = root.dim_in_pixel();
            let (body, footer) = root.split_vertically(h.saturating_sub(12 + 20 * lines.len() as u32));
            let panels = body.split_evenly((1, stats.len()));
            for (k, (e, ms)) in stats.iter().enumerate() {
                returns_panel(&panels[k], *e, ms, cfg, k == 0)?;
            }
            footer_text(&footer, &lines)
        }
        Fig::Target => {
            lines.push(
                "TPO methods: the target q and its anchor p_old = softmax(l_old) of each batch, per group, averaged over its groups."
                    .to_string(),
            );
            lines.push(
                "Top: ½ Σ_i |p_old,i − q_i| (total variation; the size of the first epoch's gradient p_old − q)."
                    .to_string(),
            );
            lines.push(
                "Bottom: Σ_i p_old,i z_i, the anchor's expected z-scored return (< 0: the anchor favours the group's low returns)."
                    .to_string(),
            );
            let (_, h) = root.dim_in_pixel();
            let (body, footer) = root.split_vertically(h.saturating_sub(12 + 20 * lines.len() as u32));
            let panels = body.split_evenly((2, stats.len()));
            for (k, (e, ms)) in stats.iter().enumerate() {
                target_panel(&panels[k], *e, ms, cfg, 3, "TV(p_old, q)", k == 0)?;
                target_panel(&panels[stats.len() + k], *e, ms, cfg, 4, "E_p_old[z(R)]", false)?;
            }
            footer_text(&footer, &lines)
        }
        Fig::Stability => {
            lines.push(
                "Top: KL(π_new ‖ π_old) of each batch's update (all its epochs), averaged over the batch's states."
                    .to_string(),
            );
            lines.push(
                "Bottom: global gradient norm ‖∇L‖ per Adam step, averaged over the batch's epochs."
                    .to_string(),
            );
            let kl_axis =
                LogAxis::from_data(stats.iter().flat_map(|(_, ms)| ms.iter().flat_map(|m| upper(&m.kl))));
            let g_axis =
                LogAxis::from_data(stats.iter().flat_map(|(_, ms)| ms.iter().flat_map(|m| upper(&m.grad))));
            let mut zero = Vec::new();
            let mut below = Vec::new();
            for (_, ms) in stats {
                for m in ms {
                    for (data, axis) in [(&m.kl.0, &kl_axis), (&m.grad.0, &g_axis)] {
                        if data.iter().any(|&v| v <= 0.0) && !zero.contains(&m.method.label()) {
                            zero.push(m.method.label());
                        }
                        if data.iter().any(|&v| v > 0.0 && axis.place(v).1)
                            && !below.contains(&m.method.label())
                        {
                            below.push(m.method.label());
                        }
                    }
                }
            }
            if !zero.is_empty() {
                lines.push(format!(
                    "▼ on the bottom edge: mean exactly 0, which a log axis cannot show ({}).",
                    zero.join(", ")
                ));
                lines.push(
                    "(A gradient norm of 0 in every seed: every group's episodes scored alike, so every loss was flat.)"
                        .to_string(),
                );
            }
            if !below.is_empty() {
                lines.push(format!(
                    "▼ on the bottom edge: mean below the axis, drawn at it ({}).",
                    below.join(", ")
                ));
            }
            lines.push(
                "Lower band edges below the bottom of a log axis (or at or below 0) are cut there."
                    .to_string(),
            );
            let (_, h) = root.dim_in_pixel();
            let (body, footer) = root.split_vertically(h.saturating_sub(12 + 20 * lines.len() as u32));
            let panels = body.split_evenly((2, stats.len()));
            for (k, (e, ms)) in stats.iter().enumerate() {
                log_panel(&panels[k], *e, ms, cfg, &kl_axis, "update KL(π_new ‖ π_old)", |m| &m.kl, k == 0)?;
                log_panel(
                    &panels[stats.len() + k],
                    *e,
                    ms,
                    cfg,
                    &g_axis,
                    "gradient norm ‖∇L‖",
                    |m| &m.grad,
                    false,
                )?;
            }
            footer_text(&footer, &lines)
        }
    }
}

fn upper(c: &(Vec<f64>, Option<Vec<f64>>)) -> Vec<f64> {
    match &c.1 {
        Some(se) => c.0.iter().zip(se).map(|(m, s)| m + s).chain(c.0.iter().copied()).collect(),
        None => c.0.clone(),
    }
}

fn footer_text<DB: DrawingBackend>(footer: &DrawingArea<DB, Shift>, lines: &[String]) -> DrawResult<DB> {
    let small = ("sans-serif", 15).into_font().color(&BLACK);
    for (i, line) in lines.iter().enumerate() {
        footer.draw_text(line, &small, (40, 4 + 20 * i as i32))?;
    }
    Ok(())
}

fn epochs_caption(e: usize) -> String {
    format!("{e} epoch{} per batch", if e == 1 { "" } else { "s" })
}

fn returns_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    epochs: usize,
    ms: &[MethodStats],
    cfg: &ControlConfig,
    legend: bool,
) -> DrawResult<DB> {
    let n = cfg.iterations as f64;
    // The y axis holds every band edge: nothing is clipped.
    let (mut lo, mut hi) = (0.0f64, 500.0f64);
    for m in ms {
        for (i, &v) in m.ret.0.iter().enumerate() {
            let s = m.ret.1.as_ref().map_or(0.0, |s| s[i]);
            lo = lo.min(v - s);
            hi = hi.max(v + s);
        }
    }
    let mut chart = ChartBuilder::on(area)
        .caption(epochs_caption(epochs), ("sans-serif", 20))
        .margin(10)
        .margin_right(24)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n, lo..hi + 10.0)?;
    chart
        .configure_mesh()
        .x_desc("rollout batch")
        .y_desc("mean episode return")
        .x_labels(10)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let xs: Vec<f64> = (1..=cfg.iterations).map(|i| i as f64).collect();
    chart.draw_series(DashedLineSeries::new(
        [(0.0, cfg.threshold), (n, cfg.threshold)],
        6,
        4,
        BLACK.stroke_width(1),
    ))?;
    for m in ms {
        let c = color(m.method);
        if let Some(se) = &m.ret.1 {
            let mut band: Vec<(f64, f64)> =
                xs.iter().zip(m.ret.0.iter().zip(se)).map(|(&x, (y, e))| (x, y + e)).collect();
            band.extend(xs.iter().zip(m.ret.0.iter().zip(se)).rev().map(|(&x, (y, e))| (x, y - e)));
            chart.draw_series(std::iter::once(Polygon::new(band, c.mix(0.15).filled())))?;
        }
        chart
            .draw_series(segments(xs.iter().copied().zip(m.ret.0.iter().copied()), c.stroke_width(2)))?
            .label(m.method.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

/// One [`TargetStats`] field (index `field` of [`TARGET_FIELDS`]) per batch for the TPO methods,
/// on a linear axis that holds every value (and 0).
fn target_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    epochs: usize,
    ms: &[MethodStats],
    cfg: &ControlConfig,
    field: usize,
    y_label: &str,
    legend: bool,
) -> DrawResult<DB> {
    let n = cfg.iterations as f64;
    let (mut lo, mut hi) = (0.0f64, 0.0f64);
    for v in ms.iter().filter_map(|m| m.target.as_ref()).flat_map(|t| t[field].iter()) {
        lo = lo.min(*v);
        hi = hi.max(*v);
    }
    let pad = 0.05 * (hi - lo).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(epochs_caption(epochs), ("sans-serif", 18))
        .margin(10)
        .margin_right(24)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n, lo - pad..hi + pad)?;
    chart
        .configure_mesh()
        .x_desc("rollout batch")
        .y_desc(y_label)
        .x_labels(10)
        .x_label_formatter(&|v| format!("{v:.0}"))
        // No "-0.00": a label that rounds to zero is "0.00".
        .y_label_formatter(&|v| format!("{:.2}", if v.abs() < 0.005 { 0.0 } else { *v }))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    chart.draw_series(LineSeries::new([(0.0, 0.0), (n, 0.0)], BLACK.stroke_width(1)))?;
    let xs: Vec<f64> = (1..=cfg.iterations).map(|i| i as f64).collect();
    for m in ms {
        let Some(t) = &m.target else { continue };
        let c = color(m.method);
        chart
            .draw_series(segments(xs.iter().copied().zip(t[field].iter().copied()), c.stroke_width(2)))?
            .label(m.method.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn log_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    epochs: usize,
    ms: &[MethodStats],
    cfg: &ControlConfig,
    axis: &LogAxis,
    y_label: &str,
    pick: impl Fn(&MethodStats) -> &(Vec<f64>, Option<Vec<f64>>),
    legend: bool,
) -> DrawResult<DB> {
    use super::plot::{decade, Ticked};
    let n = cfg.iterations as f64;
    let (floor, top) = (axis.floor(), decade(axis.hi));
    let y_of = |v: f64| v.clamp(floor, top).log10();
    let mut chart = ChartBuilder::on(area)
        .caption(epochs_caption(epochs), ("sans-serif", 18))
        .margin(10)
        .margin_right(24)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            Ticked { range: 0.0..n, bold: step_ticks(0.0, n), light: Vec::new() },
            axis.ticked(),
        )?;
    chart
        .configure_mesh()
        .x_desc("rollout batch")
        .y_desc(y_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{:.0e}", decade(v.round() as i32)))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    let xs: Vec<f64> = (1..=cfg.iterations).map(|i| i as f64).collect();
    for m in ms {
        let c = color(m.method);
        let (mean, se) = pick(m);
        if let Some(se) = se {
            let mut band: Vec<(f64, f64)> =
                xs.iter().zip(mean.iter().zip(se)).map(|(&x, (y, e))| (x, y_of(y + e))).collect();
            band.extend(xs.iter().zip(mean.iter().zip(se)).rev().map(|(&x, (y, e))| (x, y_of(y - e))));
            chart.draw_series(std::iter::once(Polygon::new(band, c.mix(0.15).filled())))?;
        }
        let placed: Vec<(f64, f64, bool)> = xs
            .iter()
            .zip(mean)
            .map(|(&x, &y)| {
                let (yd, below) = axis.place(y);
                (x, y_of(yd), below)
            })
            .collect();
        chart
            .draw_series(segments(placed.iter().map(|&(x, y, _)| (x, y)), c.stroke_width(2)))?
            .label(m.method.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
        for &(x, y, below) in &placed {
            if below {
                let tri =
                    EmptyElement::at((x, y)) + Polygon::new(vec![(-4, -8), (4, -8), (0, -1)], c.filled());
                chart.plotting_area().draw(&tri)?;
            }
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}
