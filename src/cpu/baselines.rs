//! Comparison losses for A/B experiments against TPO: REINFORCE with a baseline, PPO-clip, GRPO
//! and DG.
//!
//! They share TPO's conventions: a [`GroupLayout`], the [`FitConfig`] reduction and upstream
//! scale, and a [`FitOutput`] whose `grad` is `d(grad_scale * loss) / d l`. Within a group the
//! per-member terms are averaged (`1/K_g`), so a uniform batch under [`Reduction::Mean`]
//! averages over all samples, as the usual sample-mean estimators do. Log-probs must be finite
//! (no `-inf` exclusion here). Diagnostics are not computed ([`FitOutput::stats`] is `None`).
//!
//! [`Reduction::Mean`]: crate::Reduction::Mean

use super::{widen_logp, widen_scores, zscore, FitOutput};
use crate::config::FitConfig;
use crate::error::{Result, TpoError};
use crate::layout::GroupLayout;
use crate::scalar::Scalar;

/// The baseline subtracted from the scores to form advantages `A_i = s_i - b`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Baseline {
    /// `b` = the group's mean score (the default).
    #[default]
    GroupMean,
    /// A fixed `b` (the paper's tabular experiments use 0.5 for 0/1 rewards).
    Constant(f64),
}

/// REINFORCE with a baseline: per group `L = -(1/K) sum_i A_i l_i`, `dL/dl_i = -A_i / K`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PgConfig {
    /// Baseline of the advantages.
    pub baseline: Baseline,
}

/// GRPO: the clipped surrogate with group z-scored advantages plus a reverse-KL penalty to
/// the rollout policy. With `r_i = l_i - l_old_i`, `rho_i = exp(r_i)` and `A` the population
/// z-score of the group's scores (0 for a zero-variance group):
///
/// `L = (1/K) sum_i [ -min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i) + beta (exp(-r_i) + r_i - 1) ]`,
///
/// `dL/dl_i = (1/K) [ -rho_i A_i [unclipped term active] + beta (1 - exp(-r_i)) ]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoConfig {
    /// Clip range `eps` (default 0.2).
    pub clip_eps: f64,
    /// KL penalty weight `beta` (default 0.04).
    pub beta: f64,
    /// Deviation at or below which a group's advantages are zero (default `1e-6`).
    pub zero_std_threshold: f64,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self { clip_eps: 0.2, beta: 0.04, zero_std_threshold: 1e-6 }
    }
}

/// PPO's clipped surrogate with caller-given advantages `A` (PPO-clip, Schulman et al. 2017).
/// With `r_i = l_i - l_old_i` and `rho_i = exp(r_i)`:
///
/// `L = -(1/K) sum_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i)`,
///
/// `dL/dl_i = -(1/K) rho_i A_i [unclipped term active]`, where the unclipped term is active when
/// `rho_i A_i <= clip(rho_i, 1 - eps, 1 + eps) A_i` (ties count as active, as in [`grpo`]).
/// It is GRPO without the KL penalty and without z-scoring: the advantages (from a value
/// baseline, GAE, ...) are used as given. The usual mean over samples is a single group with
/// [`Reduction::Mean`](crate::Reduction::Mean), or groups of one, or any uniform layout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoConfig {
    /// Clip range `eps` in `(0, 1)` (default 0.2).
    pub clip_eps: f64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self { clip_eps: 0.2 }
    }
}

/// DG, the delightful gradient: REINFORCE with each term gated by
/// `g_i = sigmoid(A_i * (-l_old_i) / eta)`, the sign-aware surprisal under the rollout policy.
/// The gate is a constant of the loss (computed from `l_old`, not `l`):
/// `L = -(1/K) sum_i g_i A_i l_i`, `dL/dl_i = -g_i A_i / K`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DgConfig {
    /// Gate temperature `eta > 0` (default 1).
    pub eta: f64,
    /// Baseline of the advantages.
    pub baseline: Baseline,
}

impl Default for DgConfig {
    fn default() -> Self {
        Self { eta: 1.0, baseline: Baseline::GroupMean }
    }
}

/// REINFORCE with a baseline (see [`PgConfig`]).
pub fn reinforce<L: Scalar, S: Scalar>(
    logp: &[L],
    scores: &[S],
    layout: &GroupLayout,
    cfg: &PgConfig,
    fit: &FitConfig,
) -> Result<FitOutput> {
    check_baseline(cfg.baseline)?;
    per_group(Method::Reinforce, layout, fit, &[("logp", logp)], scores, |l, s, _, out| {
        let k = l[0].len() as f64;
        let adv = advantages(s, cfg.baseline);
        let mut loss = 0.0;
        for i in 0..s.len() {
            loss -= adv[i] * l[0][i] / k;
            out[i] = -adv[i] / k;
        }
        Ok(loss)
    })
}

/// GRPO's clipped surrogate with a reverse-KL penalty (see [`GrpoConfig`]).
pub fn grpo<L: Scalar, S: Scalar>(
    logp: &[L],
    logp_old: &[L],
    scores: &[S],
    layout: &GroupLayout,
    cfg: &GrpoConfig,
    fit: &FitConfig,
) -> Result<FitOutput> {
    check_grpo(cfg)?;
    per_group(Method::Grpo, layout, fit, &[("logp", logp), ("logp_old", logp_old)], scores, |l, s, u, out| {
        let (l, lo) = (l[0], l[1]);
        let k = l.len() as f64;
        zscore(s, lo, cfg.zero_std_threshold, u);
        let mut loss = 0.0;
        for i in 0..s.len() {
            let r = l[i] - lo[i];
            let rho = r.exp();
            let a = u[i];
            let unclipped = rho * a;
            let clipped = rho.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * a;
            let kl = (-r).exp() + r - 1.0;
            loss += (-unclipped.min(clipped) + cfg.beta * kl) / k;
            let d_sur = if unclipped <= clipped { -rho * a } else { 0.0 };
            out[i] = (d_sur + cfg.beta * (1.0 - (-r).exp())) / k;
        }
        Ok(loss)
    })
}

/// PPO-clip with given advantages (see [`PpoConfig`]). Errors: length mismatches, non-finite
/// log-probs or advantages, `clip_eps` outside `(0, 1)`.
pub fn ppo<L: Scalar, A: Scalar>(
    logp: &[L],
    logp_old: &[L],
    advantages: &[A],
    layout: &GroupLayout,
    cfg: &PpoConfig,
    fit: &FitConfig,
) -> Result<FitOutput> {
    check_ppo(cfg)?;
    layout.check_len("advantages", advantages.len())?;
    if let Some(i) = advantages.iter().position(|a| !a.to_f64().is_finite()) {
        return Err(TpoError::NonFinite {
            name: "advantages",
            index: i,
            value: advantages[i].to_f64(),
            allowed: "advantages must be finite",
        });
    }
    per_group(
        Method::Ppo,
        layout,
        fit,
        &[("logp", logp), ("logp_old", logp_old)],
        advantages,
        |l, a, _, out| {
            let (l, lo) = (l[0], l[1]);
            let k = l.len() as f64;
            let mut loss = 0.0;
            for i in 0..a.len() {
                let rho = (l[i] - lo[i]).exp();
                let unclipped = rho * a[i];
                let clipped = rho.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * a[i];
                loss -= unclipped.min(clipped) / k;
                out[i] = if unclipped <= clipped { -unclipped / k } else { 0.0 };
            }
            Ok(loss)
        },
    )
}

/// DG, the sigmoid-gated REINFORCE (see [`DgConfig`]).
pub fn dg<L: Scalar, S: Scalar>(
    logp: &[L],
    logp_old: &[L],
    scores: &[S],
    layout: &GroupLayout,
    cfg: &DgConfig,
    fit: &FitConfig,
) -> Result<FitOutput> {
    check_dg(cfg)?;
    per_group(Method::Dg, layout, fit, &[("logp", logp), ("logp_old", logp_old)], scores, |l, s, _, out| {
        let (l, lo) = (l[0], l[1]);
        let k = l.len() as f64;
        let adv = advantages(s, cfg.baseline);
        let mut loss = 0.0;
        for i in 0..s.len() {
            let gate = sigmoid(adv[i] * (-lo[i]) / cfg.eta);
            loss -= gate * adv[i] * l[i] / k;
            out[i] = -gate * adv[i] / k;
        }
        Ok(loss)
    })
}

/// `1 / (1 + exp(-x))`, without overflow for large `|x|`.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Which loss [`per_group`] computes, for its overflow error.
#[derive(Clone, Copy)]
enum Method {
    Reinforce,
    Grpo,
    Ppo,
    Dg,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Reinforce => "reinforce",
            Method::Grpo => "grpo",
            Method::Ppo => "ppo",
            Method::Dg => "dg",
        }
    }

    fn cause(self) -> &'static str {
        match self {
            Method::Reinforce | Method::Dg => {
                "an advantage, or advantage times log-prob or grad_scale, is past f64's range: rescale the scores"
            }
            Method::Grpo => {
                "the ratio exp(logp - logp_old), the KL term exp(logp_old - logp), or a term times grad_scale is past f64's range"
            }
            Method::Ppo => "the ratio exp(logp - logp_old) times an advantage or grad_scale is past f64's range",
        }
    }
}

/// Validates a [`GrpoConfig`] (shared with the CUDA backend).
pub(crate) fn check_grpo(cfg: &GrpoConfig) -> Result<()> {
    for (name, v, req) in [
        ("clip_eps", cfg.clip_eps, "finite and in (0, 1)"),
        ("beta", cfg.beta, "finite and >= 0"),
        ("zero_std_threshold", cfg.zero_std_threshold, "finite and >= 0"),
    ] {
        let ok = v.is_finite() && v >= 0.0 && (name != "clip_eps" || (v > 0.0 && v < 1.0));
        if !ok {
            return Err(TpoError::BadConfig { name, requirement: req, got: v });
        }
    }
    Ok(())
}

/// Validates a [`PpoConfig`] (shared with the CUDA backend).
pub(crate) fn check_ppo(cfg: &PpoConfig) -> Result<()> {
    if !(cfg.clip_eps.is_finite() && cfg.clip_eps > 0.0 && cfg.clip_eps < 1.0) {
        return Err(TpoError::BadConfig {
            name: "clip_eps",
            requirement: "finite and in (0, 1)",
            got: cfg.clip_eps,
        });
    }
    Ok(())
}

/// Validates a [`DgConfig`] (shared with the CUDA backend).
pub(crate) fn check_dg(cfg: &DgConfig) -> Result<()> {
    if !(cfg.eta.is_finite() && cfg.eta > 0.0) {
        return Err(TpoError::BadConfig { name: "eta", requirement: "finite and > 0", got: cfg.eta });
    }
    check_baseline(cfg.baseline)
}

/// Validates a [`Baseline`] (shared with the CUDA backend).
pub(crate) fn check_baseline(b: Baseline) -> Result<()> {
    match b {
        Baseline::Constant(c) if !c.is_finite() => {
            Err(TpoError::BadConfig { name: "baseline", requirement: "finite", got: c })
        }
        _ => Ok(()),
    }
}

fn advantages(s: &[f64], b: Baseline) -> Vec<f64> {
    match b {
        Baseline::GroupMean => centred(s),
        Baseline::Constant(c) => s.iter().map(|x| x - c).collect(),
    }
}

/// `s_i - mean(s)` for finite scores, without overflow where the mean itself is representable:
/// the scores are scaled by a power of two `2^-e` (exact) so the largest magnitude is below 1 and
/// shifted by their maximum, `t_i = 2^-e s_i - max_j 2^-e s_j`, then `A_i = 2^e (t_i - mean(t))`.
/// Equal scores give exactly 0 at any magnitude; an `A_i` past f64's range is `inf`, which the
/// caller refuses.
fn centred(s: &[f64]) -> Vec<f64> {
    let m = s.iter().map(|x| x.abs()).fold(0.0, f64::max);
    if m == 0.0 {
        return vec![0.0; s.len()];
    }
    let e = super::binary_exponent(m);
    let top = s.iter().map(|&x| super::ldexp(x, -e)).fold(f64::NEG_INFINITY, f64::max);
    let t: Vec<f64> = s.iter().map(|&x| super::ldexp(x, -e) - top).collect();
    let mean = t.iter().sum::<f64>() / t.len() as f64;
    t.iter().map(|&x| super::ldexp(x - mean, e)).collect()
}

/// Validates the inputs, then runs `f(logps, scores, scratch, grad_out) -> group loss` group by
/// group and applies the reduction and upstream scale.
fn per_group<L: Scalar, S: Scalar>(
    method: Method,
    layout: &GroupLayout,
    fit: &FitConfig,
    logps: &[(&'static str, &[L])],
    scores: &[S],
    mut f: impl FnMut(&[&[f64]], &[f64], &mut Vec<f64>, &mut [f64]) -> Result<f64>,
) -> Result<FitOutput> {
    let w = fit.validate(layout.num_groups())?;
    for (name, x) in logps {
        layout.check_len(name, x.len())?;
    }
    layout.check_len("scores", scores.len())?;
    let mut grad = vec![0.0; layout.len()];
    let mut group_loss = Vec::with_capacity(layout.num_groups());
    let mut scratch = Vec::new();
    for r in layout.ranges() {
        let mut wide = Vec::with_capacity(logps.len());
        for (name, x) in logps {
            let v = widen_logp(name, &x[r.clone()], r.start)?;
            if let Some(i) = v.iter().position(|x| x.is_infinite()) {
                return Err(TpoError::NonFinite {
                    name,
                    index: r.start + i,
                    value: v[i],
                    allowed: "the baseline losses need finite log-probs",
                });
            }
            wide.push(v);
        }
        let views: Vec<&[f64]> = wide.iter().map(Vec::as_slice).collect();
        let s = widen_scores(&scores[r.clone()], r.start)?;
        let out = &mut grad[r];
        let gl = f(&views, &s, &mut scratch, out)?;
        for g in out.iter_mut() {
            *g *= fit.grad_scale * w;
        }
        // Finite inputs can still give a loss or gradient past f64's range (advantages near
        // f64::MAX, exp of a large log ratio): refuse it rather than return an infinity.
        if !gl.is_finite() || out.iter().any(|g| !g.is_finite()) {
            return Err(TpoError::Overflow {
                method: method.name(),
                place: format!("group {}", group_loss.len()),
                cause: method.cause(),
            });
        }
        group_loss.push(gl);
    }
    let loss = super::reduce_loss(method.name(), w, &group_loss, method.cause())?;
    Ok(FitOutput { loss, group_loss, grad, stats: None })
}
