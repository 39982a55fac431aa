//! `tpo reproduce reversal`: the paper's token-reversal experiments (a candle transformer trained
//! through `tpo::candle`), with its summary, per-seed curves and figures.

use super::output::{self, Policy, Scratch};
use super::plot::{
    clipped, decade, decade_label, register_font, seeds_text, segments, step_ticks, LogAxis, Ticked,
};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use tpo::experiments::reversal::{self, Method, ReversalConfig, Reward};

/// The reward of `tpo reproduce reversal`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RewardArg {
    /// Dense bag-of-tokens reward, token-level groups: tpo_token, grpo_token, ppo, dg.
    Bag,
    /// Terminal exact-match reward, sequence-level groups: tpo, grpo, grpo_no_kl, ppo, dg.
    Terminal,
}

/// The flags only `reproduce reversal` takes.
#[derive(Args)]
pub struct ReversalArgs {
    /// reversal: the reward (bag: dense, token-level groups; terminal: exact match, K rollouts per
    /// prompt).
    #[arg(long, value_enum)]
    pub reward: Option<RewardArg>,
    /// reversal: vocabulary size V, >= 2 (default 2).
    #[arg(long, value_parser = super::count, allow_hyphen_values = true)]
    pub vocab: Option<usize>,
    /// reversal: sequence length H, 1..=512 (default: 10 for bag, 7 for terminal).
    #[arg(long, value_parser = super::count, allow_hyphen_values = true)]
    pub length: Option<usize>,
}

impl ReversalArgs {
    /// The first reversal-only flag given, for experiments that do not take them.
    pub fn any_given(&self) -> Option<&'static str> {
        if self.reward.is_some() {
            Some("--reward")
        } else if self.vocab.is_some() {
            Some("--vocab")
        } else if self.length.is_some() {
            Some("--length")
        } else {
            None
        }
    }
}

/// Default seeds and steps per reward (chosen so that a default run takes <= 15 minutes on the
/// shared 2-core machine; see the README for the measured times and the paper's settings).
pub const DEFAULT_SEEDS: usize = 2;
const DEFAULT_STEPS_BAG: usize = 100;
const DEFAULT_STEPS_TERMINAL: usize = 40;

const FILES: [&str; 4] = ["summary.json", "reversal.json", "reversal.png", "reversal.svg"];

/// Everything `run` needs from the `reproduce` flags.
pub struct Request<'a> {
    pub args: &'a ReversalArgs,
    pub seeds: Option<usize>,
    pub steps: Option<usize>,
    pub out: &'a Path,
    pub force: bool,
    pub threads: Option<usize>,
}

pub fn run(r: Request) -> Result<(), String> {
    let reward = match r.args.reward.unwrap_or(RewardArg::Bag) {
        RewardArg::Bag => Reward::Bag,
        RewardArg::Terminal => Reward::Terminal,
    };
    let vocab = r.args.vocab.unwrap_or(2);
    let length = r.args.length.unwrap_or(if reward == Reward::Bag { 10 } else { 7 });
    let seeds = r.seeds.unwrap_or(DEFAULT_SEEDS);
    let steps =
        r.steps.unwrap_or(if reward == Reward::Bag { DEFAULT_STEPS_BAG } else { DEFAULT_STEPS_TERMINAL });
    if seeds == 0 || steps == 0 || r.threads == Some(0) {
        return Err("--seeds, --steps and --threads must be at least 1".into());
    }
    let cfg = ReversalConfig::paper(reward, vocab, length, steps);
    let methods = Method::for_reward(reward);
    for &m in methods {
        cfg.validate(m)?;
    }
    let policy = Policy::new(r.force, &[]);
    if r.out.exists() && !r.out.is_dir() {
        return Err(format!("--out {} is not a folder", r.out.display()));
    }
    for name in FILES {
        output::check(&r.out.join(name), &policy)?;
    }
    let jobs: Vec<(Method, usize)> = methods.iter().flat_map(|&m| (0..seeds).map(move |s| (m, s))).collect();
    let threads =
        r.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let workers = threads.min(jobs.len());
    // The threads left over go to candle's matrix products (results do not depend on them).
    let inner = (threads / workers).max(1);
    std::env::set_var("RAYON_NUM_THREADS", inner.to_string());
    // candle's element-wise thread pool spins at barriers: on tensors this small it costs more
    // than it saves (measured), so it is off; the matrix products use `inner` threads.
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    std::fs::create_dir_all(r.out)
        .map_err(|e| format!("cannot create the folder {}: {}", r.out.display(), io_text(&e)))?;

    let bar = ProgressBar::new((jobs.len() * steps) as u64);
    bar.set_style(
        ProgressStyle::with_template("reversal {msg} [{bar:40}] {pos}/{len} steps ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("{} V={vocab} H={length}", reward_name(reward)));
    let t0 = Instant::now();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<RunResult>>> = Mutex::new(vec![None; jobs.len()]);
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&(m, s)) = jobs.get(i) else { break };
                let out = reversal::run(&cfg, m, s as u64, &|| bar.inc(1));
                let failed = out.is_err();
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(out);
                if failed {
                    // Stop handing out work; the first error is reported.
                    next.store(jobs.len(), Ordering::SeqCst);
                }
            });
        }
    });
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut curves: Vec<(Method, Vec<Vec<f64>>)> = methods.iter().map(|&m| (m, Vec::new())).collect();
    for (i, res) in results.into_iter().enumerate() {
        match res {
            Some(Ok(c)) => curves[methods.iter().position(|&m| m == jobs[i].0).unwrap_or(0)].1.push(c),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    if curves.iter().any(|(_, c)| c.len() != seeds) {
        return Err("a run did not finish (another run failed first)".into());
    }
    let stats: Vec<Stats> = curves.iter().map(|(m, c)| Stats::new(*m, c)).collect();
    let metric = match reward {
        Reward::Bag => "sequence error: 1 - mean bag-of-tokens reward of the step's behaviour rollouts",
        Reward::Terminal => {
            "exact-match error: 1 - fraction of the step's rollouts that equal the reversed prompt"
        }
    };
    let config = json!({
        "reward": reward_name(reward),
        "vocab": vocab,
        "length": length,
        "batch": cfg.batch,
        "k": cfg.k,
        "epochs": cfg.epochs,
        "dg_epochs": 1,
        "lr": cfg.lr,
        "optimizer": "Muon (2-D Flax parameters) + Adam (others), both at 10 x lr, as optax.contrib.muon",
        "eta": cfg.eta,
        "clip": cfg.clip,
        "grpo_kl_beta": cfg.beta,
        "steps": steps,
        "seeds": seeds,
        "model": {"d_model": 64, "heads": 2, "layers": 2, "ffn_mult": 4, "positions": 2 * length},
        "threads": threads,
        "seconds": secs,
    });
    // summary.json
    let mut ms = Map::new();
    for s in &stats {
        ms.insert(
            s.method.name().into(),
            json!({
                "final": s.fin,
                "final_se": s.fin_se,
                "steps_to_threshold": s.to_threshold,
                "seeds_reaching_threshold": s.seeds_reaching,
                "best_mean": s.mean.iter().copied().fold(f64::INFINITY, f64::min),
            }),
        );
    }
    let summary = json!({
        "metric": metric,
        "threshold": THRESHOLD,
        "final_is": "mean over seeds of the mean error over the last 10% of steps (at least 1)",
        "steps_to_threshold_is": "first step index (0-based, updates done before the measured rollouts) at which the \
                                  mean error over seeds is below the threshold; null if never",
        "methods": ms,
        "config": config,
    });
    write_json(&r.out.join("summary.json"), &policy, &summary)?;
    // reversal.json: per-seed curves.
    let mut mc = Map::new();
    for ((m, c), s) in curves.iter().zip(&stats) {
        mc.insert(m.name().into(), json!({"per_seed": c, "mean": s.mean, "se": s.se}));
    }
    let doc = json!({
        "config": config,
        "metric": metric,
        "statistics": "mean over seeds; se: sample standard deviation over seeds / sqrt(seeds), null with 1 seed",
        "steps": (0..steps).collect::<Vec<_>>(),
        "methods": mc,
    });
    write_json(&r.out.join("reversal.json"), &policy, &doc)?;
    let title = format!(
        "Token reversal, {} reward (V = {vocab}, H = {length}, B = {}, K = {}, {})",
        reward_name(reward),
        cfg.batch,
        cfg.k,
        seeds_text(seeds)
    );
    draw(r.out, "reversal", &policy, &title, y_axis(reward), &stats, seeds)?;

    outln!("Token reversal, {} reward, V = {vocab}, H = {length}: {metric}", reward_name(reward));
    outln!("{:<12}{:>20}{:>22}{:>14}", "method", "final (± s.e.)", "steps to 1% error", "best mean");
    for s in &stats {
        let fin = match s.fin_se {
            Some(se) => format!("{:.4} ± {:.4}", s.fin, se),
            None => format!("{:.4}", s.fin),
        };
        let to = s.to_threshold.map_or("never".to_string(), |n| n.to_string());
        let best = s.mean.iter().copied().fold(f64::INFINITY, f64::min);
        outln!("{:<12}{:>20}{:>22}{:>14.4}", s.method.name(), fin, to, best);
    }
    outln!(
        "{}, {steps} steps, {threads} threads, {secs:.1} s; wrote {}/{{summary.json,reversal.json,reversal.png,reversal.svg}}",
        seeds_text(seeds),
        super::shown(r.out)
    );
    Ok(())
}

/// One run's error curve, or why it failed.
type RunResult = Result<Vec<f64>, String>;

/// The error threshold of `steps_to_threshold` (1%).
pub const THRESHOLD: f64 = 0.01;

fn reward_name(r: Reward) -> &'static str {
    match r {
        Reward::Bag => "bag",
        Reward::Terminal => "terminal",
    }
}

/// Per-method statistics over seeds.
struct Stats {
    method: Method,
    mean: Vec<f64>,
    se: Option<Vec<f64>>,
    fin: f64,
    fin_se: Option<f64>,
    to_threshold: Option<usize>,
    seeds_reaching: usize,
}

impl Stats {
    fn new(method: Method, c: &[Vec<f64>]) -> Self {
        let n = c.len();
        let steps = c[0].len();
        let mean_sd = |vals: &[f64]| {
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let sd = if vals.len() >= 2 {
                Some((vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (vals.len() - 1) as f64).sqrt())
            } else {
                None
            };
            (m, sd)
        };
        let mut mean = Vec::with_capacity(steps);
        let mut se = Vec::with_capacity(steps);
        for t in 0..steps {
            let col: Vec<f64> = c.iter().map(|s| s[t]).collect();
            let (m, sd) = mean_sd(&col);
            mean.push(m);
            se.push(sd.map(|x| x / (n as f64).sqrt()));
        }
        let tail = (steps / 10).max(1);
        let per_seed: Vec<f64> =
            c.iter().map(|s| s[steps - tail..].iter().sum::<f64>() / tail as f64).collect();
        let (fin, sd) = mean_sd(&per_seed);
        Stats {
            method,
            to_threshold: mean.iter().position(|&m| m < THRESHOLD),
            seeds_reaching: c.iter().filter(|s| s.iter().any(|&e| e < THRESHOLD)).count(),
            mean,
            se: if n >= 2 { Some(se.into_iter().map(|x| x.unwrap_or(0.0)).collect()) } else { None },
            fin,
            fin_se: sd.map(|x| x / (n as f64).sqrt()),
        }
    }
}

/// The error axis of a reward: its short label (on every panel) and its definition (in the
/// caption).
#[derive(Clone, Copy)]
struct YAxis {
    label: &'static str,
    meaning: &'static str,
}

fn y_axis(reward: Reward) -> YAxis {
    match reward {
        Reward::Bag => YAxis {
            label: "sequence error",
            meaning: "Sequence error: 1 − the mean token reward of the step's rollouts (the fraction of answer positions that are wrong).",
        },
        Reward::Terminal => YAxis {
            label: "exact-match error",
            meaning: "Exact-match error: 1 − the fraction of the step's rollouts that equal the reversed prompt.",
        },
    }
}

fn color(m: Method) -> RGBColor {
    match m {
        Method::TpoToken | Method::Tpo => RGBColor(148, 103, 189),
        Method::GrpoToken | Method::Grpo => RGBColor(44, 160, 44),
        Method::GrpoNoKl => RGBColor(23, 190, 207),
        Method::Ppo => RGBColor(31, 119, 180),
        Method::Dg => RGBColor(214, 39, 40),
    }
}

fn write_json(path: &Path, policy: &Policy, v: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    output::write(path, policy, text.as_bytes())
}

fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_string()
}

fn draw(
    out: &Path,
    stem: &str,
    policy: &Policy,
    title: &str,
    y: YAxis,
    stats: &[Stats],
    seeds: usize,
) -> Result<(), String> {
    let scratch = Scratch::new_in(out).map_err(|e| {
        format!("cannot write the figures {stem}.png and .svg in {}: {}", out.display(), io_text(&e))
    })?;
    let base = scratch.path().join(stem);
    let rename = |msg: String| msg.replace(&scratch.path().display().to_string(), &out.display().to_string());
    register_font();
    let size = figure_size(stats.len(), caption(stats, &shared_axis(stats), y, seeds).len());
    {
        let png = base.with_extension("png");
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        figure(&root, title, y, stats, seeds)
            .map_err(|e| rename(format!("drawing {}: {e}", png.display())))?;
        root.present().map_err(|e| rename(format!("writing {}: {e}", png.display())))?;
    }
    {
        let svg = base.with_extension("svg");
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        figure(&root, title, y, stats, seeds)
            .map_err(|e| rename(format!("drawing {}: {e}", svg.display())))?;
        root.present().map_err(|e| rename(format!("writing {}: {e}", svg.display())))?;
    }
    for ext in ["png", "svg"] {
        let name = format!("{stem}.{ext}");
        let bytes = std::fs::read(scratch.path().join(&name))
            .map_err(|e| format!("cannot write {}: {}", out.join(&name).display(), io_text(&e)))?;
        output::write(&out.join(&name), policy, &bytes)?;
    }
    Ok(())
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Pixel heights of the figure: one panel per method, stacked, sharing the step axis.
const PANEL_H: u32 = 190;
const X_LABELS_H: u32 = 45;
const WIDTH: u32 = 1000;

/// The figure's size in pixels for `methods` panels and `notes` lines of caption.
fn figure_size(methods: usize, notes: usize) -> (u32, u32) {
    (WIDTH, 30 + PANEL_H * methods as u32 + X_LABELS_H + 8 + 20 * notes as u32)
}

/// The caption under the panels: what lines and bands are, and what sits on the bottom edge.
fn caption(stats: &[Stats], axis: &LogAxis, y: YAxis, seeds: usize) -> Vec<String> {
    let mut lines = vec![y.meaning.to_string()];
    lines.push(if seeds >= 2 {
        format!(
            "One panel per method. Coloured line: its mean over {}; shaded band: ±1 standard error of the mean (s.d. over seeds / √{seeds}).",
            seeds_text(seeds)
        )
    } else {
        "One panel per method. Coloured line: its 1 seed (no bands: one seed has no standard error)."
            .to_string()
    });
    let others = if stats.len() > 1 {
        "Thin grey lines: the other methods' lines (without bands or ▼), for comparison. "
    } else {
        ""
    };
    lines.push(format!("{others}Dashed grey line: the 1% threshold of “steps to 1% error”."));
    lines.extend(clipped(axis, stats.iter().map(|s| (s.method.name(), s.mean.as_slice()))).notes());
    let cut = stats
        .iter()
        .any(|s| s.se.as_ref().is_some_and(|se| s.mean.iter().zip(se).any(|(m, e)| m - e < axis.floor())));
    if cut {
        lines.push(
            "Lower band edges below the bottom of the log axis (or at or below 0) are cut there.".to_string(),
        );
    }
    lines
}

/// The log axis every panel shares: every mean, every upper band edge and the threshold.
fn shared_axis(stats: &[Stats]) -> LogAxis {
    LogAxis::from_data(stats.iter().flat_map(|s| {
        let upper: Vec<f64> = match &s.se {
            Some(se) => s.mean.iter().zip(se).map(|(m, e)| m + e).collect(),
            None => Vec::new(),
        };
        s.mean.iter().copied().chain(upper).chain(std::iter::once(THRESHOLD))
    }))
}

fn figure<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    y: YAxis,
    stats: &[Stats],
    seeds: usize,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let axis = shared_axis(stats);
    let lines = caption(stats, &axis, y, seeds);
    let n = stats.len() as u32;
    let (body, footer) = root.split_vertically(PANEL_H * n + X_LABELS_H);
    let mut rest = body;
    for (i, s) in stats.iter().enumerate() {
        let last = i + 1 == stats.len();
        let (area, below) = rest.split_vertically(PANEL_H + if last { X_LABELS_H } else { 0 });
        panel(&area, s, stats, &axis, y.label, last)?;
        rest = below;
    }
    let small = ("sans-serif", 15).into_font().color(&BLACK);
    for (i, line) in lines.iter().enumerate() {
        footer.draw_text(line, &small, (20, 2 + 20 * i as i32))?;
    }
    Ok(())
}

/// One method's panel: its mean and band in its colour over the other methods' means in grey;
/// step labels only on the bottom panel.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: &Stats,
    all: &[Stats],
    axis: &LogAxis,
    y_label: &str,
    bottom: bool,
) -> DrawResult<DB> {
    let steps = s.mean.len();
    let (x0, x1) = (0.0, (steps.max(2) - 1) as f64);
    let (lo, hi) = (axis.floor(), decade(axis.hi));
    let y_of = |v: f64| v.clamp(lo, hi).log10();
    let mut chart = ChartBuilder::on(area)
        .margin_left(12)
        .margin_top(14)
        .margin_bottom(if bottom { 8 } else { 0 })
        .margin_right(30)
        .x_label_area_size(if bottom { X_LABELS_H - 8 } else { 0 })
        .y_label_area_size(80)
        .build_cartesian_2d(
            Ticked { range: x0..x1, bold: step_ticks(x0, x1), light: Vec::new() },
            axis.ticked(),
        )?;
    let mut mesh = chart.configure_mesh();
    mesh.y_desc(y_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| decade_label(decade(v.round() as i32)))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15));
    if bottom {
        mesh.x_desc("step (error of the step's rollouts, before its update)");
    }
    mesh.draw()?;
    let thr = y_of(THRESHOLD);
    chart.draw_series(DashedLineSeries::new(
        vec![(x0, thr), (x1, thr)],
        8,
        6,
        RGBColor(120, 120, 120).stroke_width(1),
    ))?;
    // The others' means at width 1: one path each (plotters draws a 1-pixel path segment by
    // segment, without the joins that [`segments`] avoids for wide lines).
    let grey = RGBColor(150, 150, 150);
    for (k, o) in all.iter().filter(|o| o.method != s.method).enumerate() {
        let pts: Vec<(f64, f64)> =
            o.mean.iter().enumerate().map(|(t, &m)| (t as f64, y_of(axis.place(m).0))).collect();
        let drawn =
            chart.draw_series(std::iter::once(PathElement::new(pts, grey.mix(0.55).stroke_width(1))))?;
        if k == 0 {
            drawn
                .label("the other methods")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], grey.stroke_width(2)));
        }
    }
    let c = color(s.method);
    let xs: Vec<f64> = (0..steps).map(|t| t as f64).collect();
    if let Some(se) = &s.se {
        let mut band: Vec<(f64, f64)> =
            xs.iter().zip(s.mean.iter().zip(se)).map(|(&x, (m, e))| (x, y_of(m + e))).collect();
        band.extend(xs.iter().zip(s.mean.iter().zip(se)).rev().map(|(&x, (m, e))| (x, y_of(m - e))));
        chart.draw_series(std::iter::once(Polygon::new(band, c.mix(0.22).filled())))?;
    }
    let pts: Vec<(f64, f64)> = xs.iter().zip(&s.mean).map(|(&x, &m)| (x, y_of(axis.place(m).0))).collect();
    chart
        .draw_series(segments(pts.iter().copied(), c.stroke_width(2)))?
        .label(s.method.name())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
    for (&(x, y), &m) in pts.iter().zip(&s.mean) {
        if axis.place(m).1 {
            let tri = EmptyElement::at((x, y)) + Polygon::new(vec![(-5, -9), (5, -9), (0, -1)], c.filled());
            chart.plotting_area().draw(&tri)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws the figure into memory and returns its pixels and size.
    fn render(stats: &[Stats], seeds: usize) -> (Vec<u8>, (u32, u32)) {
        register_font();
        let y = y_axis(Reward::Terminal);
        let size = figure_size(stats.len(), caption(stats, &shared_axis(stats), y, seeds).len());
        let mut buf = vec![0u8; (size.0 * size.1 * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
            figure(&root, "test", y, stats, seeds).unwrap();
            root.present().unwrap();
        }
        (buf, size)
    }

    #[test]
    fn each_method_is_drawn_in_its_own_panel_in_order() {
        // Five methods whose curves cross each other, two seeds (bands), zeros (markers).
        let methods = Method::for_reward(Reward::Terminal);
        let stats: Vec<Stats> = methods
            .iter()
            .enumerate()
            .map(|(k, &m)| {
                let curve = |phase: f64| -> Vec<f64> {
                    (0..300i32)
                        .map(|t| {
                            let v = 0.5 + 0.5 * (f64::from(t) / (20.0 + 7.0 * k as f64) + phase).sin();
                            if t % 97 == 0 {
                                0.0
                            } else {
                                v * 10f64.powi(-t / 100)
                            }
                        })
                        .collect()
                };
                Stats::new(m, &[curve(0.0), curve(1.0)])
            })
            .collect();
        let (buf, (w, h)) = render(&stats, 2);
        // Pixels of a method's exact colour right of the legend (which holds a swatch of it):
        // its line, which spans every step.
        let px = |x: u32, y: u32| &buf[((y * w + x) * 3) as usize..][..3];
        let mut last_bottom = 0;
        for s in &stats {
            let RGBColor(r, g, b) = color(s.method);
            let hit = |x: u32, y: u32| px(x, y) == [r, g, b];
            let rows: Vec<u32> = (0..h).filter(|&y| (400..w).any(|x| hit(x, y))).collect();
            let (top, bottom) = (*rows.first().expect("the method is drawn"), *rows.last().unwrap());
            let columns = (400..w).filter(|&x| (0..h).any(|y| hit(x, y))).count() as u32;
            assert!(columns > (w - 400) / 2, "{}: its line covers {columns} columns", s.method.name());
            assert!(
                top >= last_bottom,
                "{}: drawn at rows {top}..{bottom}, above the panel before it",
                s.method.name()
            );
            assert!(bottom - top <= PANEL_H, "{}: spans rows {top}..{bottom}", s.method.name());
            last_bottom = bottom;
        }
        // The caption fits: nothing is drawn in the last rows.
        assert!(
            buf[((h - 12) * w * 3) as usize..].iter().all(|&v| v == 255),
            "the caption runs off the figure"
        );
    }
}
