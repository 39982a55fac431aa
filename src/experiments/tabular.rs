//! The paper's two tabular bandit experiments (setups in the project's TPO notes).
//!
//! **Single context.** `A` actions, one correct action `y* = 0`, logits start at zero. Each
//! step samples `B` actions from `pi`, rewards `1{a = y*}`, and takes a normalised step
//! `z += alpha * g / |g|`. PG, DG and GRPO build `g` from the batch through the library's
//! [`reinforce`](crate::cpu::reinforce), [`dg`](crate::cpu::dg) and
//! [`grpo`](crate::cpu::grpo) losses on the sampled log-probs (chain rule
//! `dl_b/dz = e_{a_b} - pi`); TPO treats all `A` actions as one group whose scores are the
//! batch average of `(r - 0.5) * onehot(a)` and goes through the library's target and fit
//! (`g = q - pi`). Error `1 - pi(y*)` is measured before each step; misalignment is
//! `1 - cos(g, g*)` with `g* = pi(y*) (e_{y*} - pi)`.
//!
//! **Multi context.** `N` contexts of `A` actions, logits `N(0, 1)`, correct action 0 in each,
//! exact population directions per context (`p = pi(y)`, `v = e_y - pi`): CE `v`, PG `p v`,
//! GRPO `sqrt(p / (1 - p)) v`, DG `p sigmoid(-log p / eta) v`, and TPO from one-hot scores
//! through the library (`N` groups of `A`). One normalised step over all contexts jointly;
//! error (mean `1 - pi(y)`) after each step; misalignment `1 - cos(g, g_CE)` over the
//! concatenation. A zero direction counts as orthogonal (misalignment 1) and takes no step.

use super::rng::Rng;
use crate::cpu::{self, Baseline, DgConfig, GrpoConfig, PgConfig};
use crate::error::{Result, TpoError};
use crate::{FitConfig, GroupLayout, Reduction, TargetConfig};

/// The methods compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// REINFORCE with a baseline.
    Pg,
    /// The delightful (sigmoid-gated) policy gradient.
    Dg,
    /// GRPO (clipped surrogate, group z-scored advantages, reverse KL).
    Grpo,
    /// Target Policy Optimization.
    Tpo,
    /// The supervised cross-entropy oracle `e_y - pi` (multi-context only).
    Ce,
}

impl Method {
    /// The name used in tables, JSON and plots.
    pub fn name(self) -> &'static str {
        match self {
            Method::Pg => "PG",
            Method::Dg => "DG",
            Method::Grpo => "GRPO",
            Method::Tpo => "TPO",
            Method::Ce => "CE",
        }
    }
}

/// Computes TPO's update through the library on some backend.
pub trait TpoBackend: Sync {
    /// The gradient `d L / d l` of TPO's summed loss, on-policy (`l_old = l = logits`), for
    /// the given scores and layout: the target from [`cpu::target`]-like construction, then
    /// the fit. The update direction is its negative, `q - pi`.
    fn on_policy_grad(
        &self,
        logits: &[f64],
        scores: &[f64],
        layout: &GroupLayout,
        eta: f64,
    ) -> Result<Vec<f64>>;
    /// A short name for reports.
    fn name(&self) -> &'static str;
}

/// The f64 CPU reference backend: [`cpu::target`] followed by [`cpu::fit`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl TpoBackend for CpuBackend {
    fn on_policy_grad(
        &self,
        logits: &[f64],
        scores: &[f64],
        layout: &GroupLayout,
        eta: f64,
    ) -> Result<Vec<f64>> {
        let q = cpu::target(logits, scores, layout, &TargetConfig::with_eta(eta))?;
        let fit = FitConfig { reduction: Reduction::Sum, ..FitConfig::default() };
        Ok(cpu::fit(logits, &q, layout, &fit)?.grad)
    }
    fn name(&self) -> &'static str {
        "cpu"
    }
}

/// Configuration of the single-context experiment (defaults are the paper's).
#[derive(Debug, Clone, PartialEq)]
pub struct SingleConfig {
    /// Number of actions `A` (100).
    pub actions: usize,
    /// Samples per step `B` (100).
    pub batch: usize,
    /// Step size `alpha` of the normalised step (0.1).
    pub alpha: f64,
    /// TPO's and DG's temperature `eta` (1).
    pub eta: f64,
    /// Number of steps (150).
    pub steps: usize,
    /// Number of seeds averaged (100).
    pub seeds: usize,
    /// First seed; run `i` uses seed `seed + i`.
    pub seed: u64,
}

impl Default for SingleConfig {
    fn default() -> Self {
        Self { actions: 100, batch: 100, alpha: 0.1, eta: 1.0, steps: 150, seeds: 100, seed: 0 }
    }
}

/// Configuration of the multi-context experiment (defaults are the paper's).
#[derive(Debug, Clone, PartialEq)]
pub struct MultiConfig {
    /// Number of contexts `N` (100).
    pub contexts: usize,
    /// Actions per context `A` (10).
    pub actions: usize,
    /// Step size `alpha` (0.1).
    pub alpha: f64,
    /// TPO's and DG's temperature `eta` (1).
    pub eta: f64,
    /// Number of steps (1000).
    pub steps: usize,
    /// Number of seeds averaged (100).
    pub seeds: usize,
    /// First seed; run `i` uses seed `seed + i`.
    pub seed: u64,
}

impl Default for MultiConfig {
    fn default() -> Self {
        Self { contexts: 100, actions: 10, alpha: 0.1, eta: 1.0, steps: 1000, seeds: 100, seed: 0 }
    }
}

/// One run's curves: error and misalignment per step.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Error at each step.
    pub error: Vec<f64>,
    /// Misalignment at each step.
    pub misalignment: Vec<f64>,
}

/// A method's curves averaged over seeds: means and standard errors (sample standard
/// deviation over seeds divided by `sqrt(seeds)`; `None` for a single seed, which has none).
#[derive(Debug, Clone, PartialEq)]
pub struct MethodCurves {
    /// The method.
    pub method: Method,
    /// Mean error per step.
    pub error_mean: Vec<f64>,
    /// Standard error of the error per step (`None` with one seed).
    pub error_se: Option<Vec<f64>>,
    /// Mean misalignment per step.
    pub misalignment_mean: Vec<f64>,
    /// Standard error of the misalignment per step (`None` with one seed).
    pub misalignment_se: Option<Vec<f64>>,
}

impl MethodCurves {
    /// The first step whose mean error is below `level`.
    pub fn first_below(&self, level: f64) -> Option<usize> {
        self.error_mean.iter().position(|&e| e < level)
    }
}

/// The methods of the single-context experiment, in plotting order.
pub const SINGLE_METHODS: [Method; 4] = [Method::Pg, Method::Dg, Method::Grpo, Method::Tpo];
/// The methods of the multi-context experiment, in plotting order.
pub const MULTI_METHODS: [Method; 5] = [Method::Pg, Method::Dg, Method::Grpo, Method::Tpo, Method::Ce];

fn softmax(z: &[f64]) -> Vec<f64> {
    let lse = cpu::logsumexp(z);
    z.iter().map(|x| (x - lse).exp()).collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `1 - cos(a, b)`; 1 when either vector is zero.
pub fn misalignment(a: &[f64], b: &[f64]) -> f64 {
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 {
        return 1.0;
    }
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    (1.0 - dot / (na * nb)).max(0.0)
}

/// `z += alpha * g / |g|`, or nothing when `g = 0`.
fn normalised_step(z: &mut [f64], g: &[f64], alpha: f64) {
    let n = norm(g);
    if n > 0.0 {
        for (zi, gi) in z.iter_mut().zip(g) {
            *zi += alpha * gi / n;
        }
    }
}

/// One seed of the single-context experiment for one method.
pub fn single_run(cfg: &SingleConfig, method: Method, run: usize, backend: &dyn TpoBackend) -> Result<Run> {
    let (a_n, b_n) = (cfg.actions, cfg.batch);
    if a_n < 2 || b_n < 1 || cfg.steps == 0 {
        return Err(TpoError::BadConfig {
            name: "single-context size",
            requirement: "A >= 2, B >= 1, steps >= 1",
            got: a_n as f64,
        });
    }
    let y = 0usize;
    let mut rng = Rng::new(cfg.seed.wrapping_add(run as u64));
    let mut z = vec![0.0; a_n];
    let batch = GroupLayout::uniform(1, b_n)?;
    let actions = GroupLayout::uniform(1, a_n)?;
    let sum = FitConfig { reduction: Reduction::Sum, ..FitConfig::default() };
    let half = Baseline::Constant(0.5);
    let mut out = Run { error: Vec::with_capacity(cfg.steps), misalignment: Vec::with_capacity(cfg.steps) };
    let mut cdf = vec![0.0; a_n];
    for _ in 0..cfg.steps {
        let pi = softmax(&z);
        out.error.push(1.0 - pi[y]);
        let mut acc = 0.0;
        for (c, p) in cdf.iter_mut().zip(&pi) {
            acc += p;
            *c = acc;
        }
        let sampled: Vec<usize> = (0..b_n).map(|_| rng.categorical(&cdf)).collect();
        let reward: Vec<f64> = sampled.iter().map(|&a| if a == y { 1.0 } else { 0.0 }).collect();
        let lse = cpu::logsumexp(&z);
        let logp: Vec<f64> = sampled.iter().map(|&a| z[a] - lse).collect();
        // d loss / d l_b for the sample-based losses; the ascent direction in logit space is
        // -sum_b dL/dl_b (e_{a_b} - pi).
        let dl = match method {
            Method::Pg => {
                Some(cpu::reinforce(&logp, &reward, &batch, &PgConfig { baseline: half }, &sum)?.grad)
            }
            Method::Dg => {
                let c = DgConfig { eta: cfg.eta, baseline: half };
                Some(cpu::dg(&logp, &logp, &reward, &batch, &c, &sum)?.grad)
            }
            Method::Grpo => {
                Some(cpu::grpo(&logp, &logp, &reward, &batch, &GrpoConfig::default(), &sum)?.grad)
            }
            Method::Tpo | Method::Ce => None,
        };
        let g: Vec<f64> = match (method, dl) {
            (_, Some(dl)) => {
                let mut g = vec![0.0; a_n];
                let total: f64 = dl.iter().sum();
                for (&a, d) in sampled.iter().zip(&dl) {
                    g[a] -= d;
                }
                for (gi, p) in g.iter_mut().zip(&pi) {
                    *gi += total * p;
                }
                g
            }
            (Method::Tpo, None) => {
                let mut s = vec![0.0; a_n];
                for (&a, r) in sampled.iter().zip(&reward) {
                    s[a] += (r - 0.5) / b_n as f64;
                }
                backend.on_policy_grad(&z, &s, &actions, cfg.eta)?.into_iter().map(|d| -d).collect()
            }
            _ => {
                return Err(TpoError::BadConfig {
                    name: "method (CE is multi-context only)",
                    requirement: "PG, DG, GRPO or TPO",
                    got: f64::NAN,
                })
            }
        };
        let oracle: Vec<f64> = (0..a_n).map(|j| pi[y] * (if j == y { 1.0 } else { 0.0 } - pi[j])).collect();
        out.misalignment.push(misalignment(&g, &oracle));
        normalised_step(&mut z, &g, cfg.alpha);
    }
    Ok(out)
}

/// One seed of the multi-context experiment for one method.
pub fn multi_run(cfg: &MultiConfig, method: Method, run: usize, backend: &dyn TpoBackend) -> Result<Run> {
    let (n, a_n) = (cfg.contexts, cfg.actions);
    if n < 1 || a_n < 2 || cfg.steps == 0 {
        return Err(TpoError::BadConfig {
            name: "multi-context size",
            requirement: "N >= 1, A >= 2, steps >= 1",
            got: a_n as f64,
        });
    }
    // A stream distinct from the single-context experiment's for the same seed.
    let mut rng = Rng::new(cfg.seed.wrapping_add(run as u64) ^ 0x6D75_6C74_6963_7478);
    let mut z: Vec<f64> = (0..n * a_n).map(|_| rng.normal()).collect();
    let layout = GroupLayout::uniform(n, a_n)?;
    let onehot: Vec<f64> = (0..n * a_n).map(|i| if i % a_n == 0 { 1.0 } else { 0.0 }).collect();
    let mut out = Run { error: Vec::with_capacity(cfg.steps), misalignment: Vec::with_capacity(cfg.steps) };
    let mut pi = vec![0.0; n * a_n];
    let mut v = vec![0.0; n * a_n];
    for _ in 0..cfg.steps {
        for c in 0..n {
            let r = c * a_n..(c + 1) * a_n;
            cpu::softmax_into(&z[r.clone()], &mut pi[r.clone()]);
            for i in r {
                v[i] = onehot[i] - pi[i];
            }
        }
        let g: Vec<f64> = if method == Method::Tpo {
            backend.on_policy_grad(&z, &onehot, &layout, cfg.eta)?.into_iter().map(|d| -d).collect()
        } else {
            let mut g = vec![0.0; n * a_n];
            for c in 0..n {
                let r = c * a_n..(c + 1) * a_n;
                let p = pi[r.start];
                let rest: f64 = pi[r.start + 1..r.end].iter().sum(); // 1 - p without cancellation
                let w = match method {
                    Method::Ce => 1.0,
                    Method::Pg => p,
                    Method::Grpo => (p / rest.max(f64::MIN_POSITIVE)).sqrt(),
                    Method::Dg => p * cpu::sigmoid(-p.ln() / cfg.eta),
                    Method::Tpo => unreachable!("handled above"),
                };
                for i in r {
                    g[i] = w * v[i];
                }
            }
            g
        };
        out.misalignment.push(misalignment(&g, &v));
        normalised_step(&mut z, &g, cfg.alpha);
        let mut err = 0.0;
        for c in 0..n {
            let r = c * a_n..(c + 1) * a_n;
            cpu::softmax_into(&z[r.clone()], &mut pi[r.clone()]);
            err += pi[r.start + 1..r.end].iter().sum::<f64>();
        }
        out.error.push(err / n as f64);
    }
    Ok(out)
}

/// Mean and standard error over runs, per step. The standard error needs two runs at least:
/// with one it is `None` (a sample of one has no spread to estimate), never a 0.
pub fn summarise(method: Method, runs: &[Run]) -> MethodCurves {
    let stat = |get: &dyn Fn(&Run) -> &Vec<f64>| -> (Vec<f64>, Option<Vec<f64>>) {
        let steps = runs.first().map_or(0, |r| get(r).len());
        let k = runs.len() as f64;
        let mean: Vec<f64> = (0..steps).map(|t| runs.iter().map(|r| get(r)[t]).sum::<f64>() / k).collect();
        if runs.len() < 2 {
            return (mean, None);
        }
        let se = (0..steps)
            .map(|t| {
                let var = runs.iter().map(|r| (get(r)[t] - mean[t]).powi(2)).sum::<f64>() / (k - 1.0);
                (var / k).sqrt()
            })
            .collect();
        (mean, Some(se))
    };
    let (error_mean, error_se) = stat(&|r| &r.error);
    let (misalignment_mean, misalignment_se) = stat(&|r| &r.misalignment);
    MethodCurves { method, error_mean, error_se, misalignment_mean, misalignment_se }
}

/// Runs `job(method, seed)` for every method and seed on `threads` threads, calling `tick`
/// after each, and returns each method's curves. Results do not depend on `threads`.
pub fn run_all(
    methods: &[Method],
    seeds: usize,
    threads: usize,
    job: &(dyn Fn(Method, usize) -> Result<Run> + Sync),
    tick: &(dyn Fn() + Sync),
) -> Result<Vec<MethodCurves>> {
    let jobs: Vec<(Method, usize)> = methods.iter().flat_map(|&m| (0..seeds).map(move |s| (m, s))).collect();
    let threads = threads.clamp(1, jobs.len().max(1));
    let mut results: Vec<Option<Result<Run>>> = (0..jobs.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let chunks: Vec<_> = results.chunks_mut(jobs.len().div_ceil(threads)).collect();
        let mut start = 0;
        for chunk in chunks {
            let mine = &jobs[start..start + chunk.len()];
            start += chunk.len();
            scope.spawn(move || {
                for (slot, &(m, s)) in chunk.iter_mut().zip(mine) {
                    *slot = Some(job(m, s));
                    tick();
                }
            });
        }
    });
    let mut runs = Vec::with_capacity(jobs.len());
    for r in results {
        runs.push(r.expect("every job ran")?);
    }
    Ok(methods.iter().enumerate().map(|(i, &m)| summarise(m, &runs[i * seeds..(i + 1) * seeds])).collect())
}
