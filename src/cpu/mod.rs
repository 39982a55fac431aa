//! The f64 CPU reference: the project's ground truth.
//!
//! Every function widens its inputs to `f64`, computes group by group in a fixed order, and
//! returns `f64` results. It is written for clarity and exactness rather than speed; the CUDA
//! kernels are tested against it.
//!
//! For one group (see [`TargetConfig`] for `u` and exclusion):
//!
//! * `p_old = softmax(l_old)`, `q = softmax(log p_old + u / eta)` (target);
//! * `p = softmax(l)`, `L = -sum_i q_i log p_i` or `KL(q || p)` (fit);
//! * `dL/dl = sum(q) * p - q`, which is `p - q` for a normalised target.

use crate::config::{Anchor, FitConfig, LossForm, TargetConfig};
use crate::error::{Result, TpoError};
use crate::layout::GroupLayout;
use crate::scalar::Scalar;

mod baselines;
pub mod tokens;
#[cfg(feature = "cuda")]
pub(crate) use baselines::{check_baseline, check_dg, check_grpo, check_ppo};
pub use baselines::{dg, grpo, ppo, reinforce, sigmoid, Baseline, DgConfig, GrpoConfig, PgConfig, PpoConfig};

/// A stored target may deviate from summing to one by at most this much per group
/// (room for bf16 storage of `q`, whose relative rounding is `2^-9`).
pub const TARGET_SUM_TOLERANCE: f64 = 1e-2;

/// Per-group diagnostics, one entry per group (structure of arrays).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GroupStats {
    /// `KL(q || p) = sum_i q_i (log q_i - log p_i)`: how far the policy is from its target.
    /// It shrinks to zero as the update self-extinguishes.
    pub kl_q_p: Vec<f64>,
    /// Entropy of the target, `H(q) = -sum_i q_i log q_i`.
    pub entropy_q: Vec<f64>,
    /// `KL(q || p_old)`: how far the target moved from the rollout policy (the size of the
    /// step asked for). `None` from [`fit`], which does not see `l_old`.
    pub kl_q_pold: Option<Vec<f64>>,
    /// Euclidean norm of the group's returned gradient (scale and reduction included).
    pub grad_norm: Vec<f64>,
}

/// Result of a fit: the scalar loss, the per-group losses and the gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct FitOutput {
    /// `w * sum_g L_g` with `w` from the reduction (not multiplied by `grad_scale`).
    pub loss: f64,
    /// Unreduced `L_g` per group (cross-entropy or KL, per [`LossForm`]).
    pub group_loss: Vec<f64>,
    /// `d(grad_scale * loss) / d l`, one entry per member.
    pub grad: Vec<f64>,
    /// Per-group diagnostics when [`FitConfig::diagnostics`] is set.
    pub stats: Option<GroupStats>,
}

/// Result of [`target_and_fit`]: the target (to keep for later epochs) and the fit.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetAndFit {
    /// The target `q`, one entry per member.
    pub target: Vec<f64>,
    /// Loss, per-group loss, gradient and diagnostics of fitting `l` to `q`.
    pub fit: FitOutput,
}

/// Builds the target `q` from the rollout log-probs `logp_old` and the `scores`.
///
/// `q_i = softmax_i(log p_old + u / eta)` per group, with `u` the population z-score of the
/// group's scores (see [`TargetConfig`]). Computed once at rollout and reused across epochs.
///
/// Errors: length mismatches, NaN/`+inf` in `logp_old`, non-finite scores, a group whose
/// `logp_old` is all `-inf`, an invalid configuration.
pub fn target<L: Scalar, S: Scalar>(
    logp_old: &[L],
    scores: &[S],
    layout: &GroupLayout,
    cfg: &TargetConfig,
) -> Result<Vec<f64>> {
    target_named("logp_old", logp_old, scores, layout, cfg)
}

/// [`target`] with the name its errors give the rollout log-probs.
fn target_named<L: Scalar, S: Scalar>(
    name: &'static str,
    logp_old: &[L],
    scores: &[S],
    layout: &GroupLayout,
    cfg: &TargetConfig,
) -> Result<Vec<f64>> {
    cfg.validate()?;
    layout.check_len(name, logp_old.len())?;
    layout.check_len("scores", scores.len())?;
    let mut q = vec![0.0; layout.len()];
    let (mut d, mut a) = (Vec::new(), Vec::new());
    for (g, r) in layout.ranges().enumerate() {
        let start = r.start;
        let lo = widen_logp(name, &logp_old[r.clone()], start)?;
        let s = widen_scores(&scores[r.clone()], start)?;
        if lo.iter().all(|&x| x == f64::NEG_INFINITY) {
            return Err(TpoError::AllExcluded { name, group: g });
        }
        relative_logits(&lo, &s, cfg, &mut d, &mut a);
        softmax_into(&a, &mut q[r]);
    }
    Ok(q)
}

/// Fits the policy log-probs `logp` to a stored target `q`: loss, per-group loss, gradient.
///
/// Per group: `log p = l - logsumexp(l)`, `L = -sum q log p` (or `KL(q || p)`), and the
/// gradient `grad_scale * w * (sum(q) * p - q)` (see [`FitConfig`]).
///
/// `logp` may hold `-inf` (probability zero) only where `q = 0`. Errors: length mismatches,
/// NaN/`+inf` in `logp`, a group all `-inf`, a target with negative or non-finite entries or
/// a group sum off one by more than [`TARGET_SUM_TOLERANCE`], an infinite loss.
pub fn fit<L: Scalar, Q: Scalar>(
    logp: &[L],
    target: &[Q],
    layout: &GroupLayout,
    cfg: &FitConfig,
) -> Result<FitOutput> {
    let w = cfg.validate(layout.num_groups())?;
    layout.check_len("logp", logp.len())?;
    layout.check_len("target", target.len())?;
    let b = layout.num_groups();
    let mut group_loss = Vec::with_capacity(b);
    let mut grad = vec![0.0; layout.len()];
    let mut stats = cfg.diagnostics.then(|| GroupStats {
        kl_q_p: Vec::with_capacity(b),
        entropy_q: Vec::with_capacity(b),
        kl_q_pold: None,
        grad_norm: Vec::with_capacity(b),
    });
    for (g, r) in layout.ranges().enumerate() {
        let start = r.start;
        let l = widen_logp("logp", &logp[r.clone()], start)?;
        if l.iter().all(|&x| x == f64::NEG_INFINITY) {
            return Err(TpoError::AllExcluded { name: "logp", group: g });
        }
        let q = widen_target(&target[r.clone()], start, g)?;
        let gs = fit_group(&l, &q, start, cfg.form, cfg.grad_scale * w, &mut grad[r])?;
        group_loss.push(gs.loss);
        if let Some(st) = stats.as_mut() {
            if !gs.grad_norm.is_finite() {
                return Err(TpoError::BadConfig {
                    name: "grad_scale (group gradient norm past f64's range)",
                    requirement: "small enough that the reported gradient norm is finite",
                    got: cfg.grad_scale,
                });
            }
            st.kl_q_p.push(gs.kl);
            st.entropy_q.push(gs.entropy);
            st.grad_norm.push(gs.grad_norm);
        }
    }
    let loss = reduce_loss(
        "fit",
        w,
        &group_loss,
        "log-probs near f64::MAX make the cross-entropy past f64's range",
    )?;
    Ok(FitOutput { loss, group_loss, grad, stats })
}

/// The fused first-epoch call: builds the target from `logp_old` (or from `logp` itself when
/// `logp_old` is `None`, the on-policy case `l_old = l`) and fits `logp` to it, as
/// [`target`] followed by [`fit`]. On-policy the gradient is `p_old - q`.
///
/// With [`FitConfig::diagnostics`] the stats include `KL(q || p_old)`.
pub fn target_and_fit<L: Scalar, S: Scalar>(
    logp: &[L],
    logp_old: Option<&[L]>,
    scores: &[S],
    layout: &GroupLayout,
    tcfg: &TargetConfig,
    fcfg: &FitConfig,
) -> Result<TargetAndFit> {
    let (name, old) = match logp_old {
        Some(o) => ("logp_old", o),
        None => ("logp", logp),
    };
    let q = target_named(name, old, scores, layout, tcfg)?;
    let mut fit = fit(logp, &q, layout, fcfg)?;
    if let Some(st) = fit.stats.as_mut() {
        let mut kl = Vec::with_capacity(layout.num_groups());
        for r in layout.ranges() {
            let lo: Vec<f64> = old[r.clone()].iter().map(|x| x.to_f64()).collect();
            let mut lp = vec![0.0; lo.len()];
            log_softmax_into(&lo, &mut lp);
            kl.push(kl_div(&q[r], lp.into_iter()));
        }
        st.kl_q_pold = Some(kl);
    }
    Ok(TargetAndFit { target: q, fit })
}

/// Population z-score of `s` over the members whose `l_old` is not `-inf`; zero for the
/// excluded members, and for all members when the deviation is `<= threshold`.
///
/// Computed on the scores scaled by an exact power of two (`t = s 2^-e`, `|t| < 1`) and measured
/// from the group's top score (`d_i = t_i - max t`), so that scores near the `f64` range do not
/// overflow and equal scores give exactly zero deviation; the threshold applies to the deviation
/// of the raw scores.
pub fn zscore(s: &[f64], l_old: &[f64], threshold: f64, u: &mut Vec<f64>) {
    u.clear();
    u.resize(s.len(), 0.0);
    let mut d = Vec::new();
    if let Some((mean, sd)) = score_deviations(s, l_old, threshold, &mut d) {
        for i in 0..s.len() {
            if l_old[i] != f64::NEG_INFINITY {
                u[i] = (d[i] - mean) / sd;
            }
        }
    }
}

/// Deviations `d_i = t_i - max_j t_j` of the scaled scores `t = s 2^-e` (`e` such that
/// `max |s| 2^-e` lies in `[1/2, 1)`, so the scaling is exact) over the members whose `l_old` is
/// not `-inf` (0 for the others), with their mean and population deviation: `Some((mean, sd))`,
/// so that `u_i = (d_i - mean) / sd`, or `None` for a zero-variance group (`u = 0`).
fn score_deviations(s: &[f64], l_old: &[f64], threshold: f64, d: &mut Vec<f64>) -> Option<(f64, f64)> {
    d.clear();
    d.resize(s.len(), 0.0);
    let inc = |i: usize| l_old[i] != f64::NEG_INFINITY;
    let n = (0..s.len()).filter(|&i| inc(i)).count();
    let m = (0..s.len()).filter(|&i| inc(i)).map(|i| s[i].abs()).fold(0.0, f64::max);
    if n == 0 || m == 0.0 {
        return None;
    }
    let e = binary_exponent(m);
    let top = (0..s.len()).filter(|&i| inc(i)).map(|i| ldexp(s[i], -e)).fold(f64::NEG_INFINITY, f64::max);
    for i in (0..s.len()).filter(|&i| inc(i)) {
        d[i] = ldexp(s[i], -e) - top;
    }
    let mean = (0..s.len()).filter(|&i| inc(i)).map(|i| d[i]).sum::<f64>() / n as f64;
    let var = (0..s.len()).filter(|&i| inc(i)).map(|i| (d[i] - mean).powi(2)).sum::<f64>() / n as f64;
    let sd = var.sqrt();
    if sd == 0.0 || ldexp(sd, e) <= threshold {
        return None;
    }
    Some((mean, sd))
}

/// The group's log-weights relative to their maximum, `a_i - max_j a_j` (`a_i` itself for a
/// zero-variance group), with
/// `a_i = [anchored] l_old_i + u_i / eta` (`-inf` for excluded members), written to `a`.
///
/// `a_i` itself is never formed: `u_i / eta` overflows for a small `eta`, and `l_old_i + u_i / eta`
/// loses the anchor's digits long before. With `u_max` the largest `u` and `L*` the largest `l_old`
/// among the members where `u = u_max`, the difference is computed as
/// `h_i = (l_old_i / 2 - L* / 2) + (u_i - u_max) / (2 eta)`, then `2 (h_i - max_j h_j)`: both terms
/// of `h_i` are at most the `f64` range (the halving keeps `l_old_i - L*` from overflowing), the
/// score term is `<= 0` and exactly 0 where `u = u_max`, so `max h >= 0` is finite and the result
/// has no NaN for any finite `eta > 0`. As `eta -> 0` it tends to `l_old_i - L*` on the members with
/// `u = u_max` and `-inf` elsewhere: the target becomes `p_old` restricted to the best-scored
/// members, renormalised. `u_i - u_max = d_i / sd` is exact up to one rounding (see
/// [`score_deviations`]).
fn relative_logits(lo: &[f64], s: &[f64], cfg: &TargetConfig, d: &mut Vec<f64>, a: &mut Vec<f64>) {
    let anchored = cfg.anchor == Anchor::Anchored;
    a.clear();
    let Some((_, sd)) = score_deviations(s, lo, cfg.zero_std_threshold, d) else {
        // Zero variance, u = 0: a = l_old (or 0) as it stands, so that q = p_old exactly for every eta.
        a.extend(lo.iter().map(|&l| match (l == f64::NEG_INFINITY, anchored) {
            (true, _) => f64::NEG_INFINITY,
            (false, true) => l,
            (false, false) => 0.0,
        }));
        return;
    };
    // Half of (u_i - u_max) / eta: <= 0, and exactly 0 where u_i = u_max (`d_i = 0`).
    a.extend(d.iter().map(|&di| if di != 0.0 { 0.5 * (di / sd / cfg.eta) } else { 0.0 }));
    let inc = |i: usize| lo[i] != f64::NEG_INFINITY;
    let l_star = if anchored {
        (0..lo.len()).filter(|&i| inc(i) && a[i] == 0.0).map(|i| lo[i]).fold(f64::NEG_INFINITY, f64::max)
    } else {
        0.0
    };
    for i in 0..lo.len() {
        a[i] = match (inc(i), anchored) {
            (false, _) => f64::NEG_INFINITY,
            (true, true) => (0.5 * lo[i] - 0.5 * l_star) + a[i],
            (true, false) => a[i],
        };
    }
    let h_max = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for x in a.iter_mut() {
        *x = 2.0 * (*x - h_max);
    }
}

/// `e` with `x` in `[2^(e-1), 2^e)`, for a finite `x > 0` (subnormals included).
pub(crate) fn binary_exponent(x: f64) -> i32 {
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    if biased != 0 {
        biased - 1022
    } else {
        // Subnormal: x = mantissa 2^-1074, its top bit at position p gives e = p - 1073.
        let mantissa = bits & ((1u64 << 52) - 1);
        (63 - mantissa.leading_zeros() as i32) - 1073
    }
}

/// `x 2^k`, exact whenever the result is a normal number, for `k` in `[-2044, 2046]`.
pub(crate) fn ldexp(x: f64, k: i32) -> f64 {
    let pow2 = |j: i32| f64::from_bits(((j + 1023) as u64) << 52);
    let k1 = k / 2;
    x * pow2(k1) * pow2(k - k1)
}

/// `log sum_i exp(a_i)`, stable; `-inf` entries contribute nothing (at least one must be finite).
pub fn logsumexp(a: &[f64]) -> f64 {
    let (mx, ln_s) = logsumexp_parts(a);
    mx + ln_s
}

/// `logsumexp(a)` in two parts, `(m, ln S)` with `m = max a` and `S = sum exp(a - m)`, so that
/// `a_i - logsumexp(a)` can be formed as `(a_i - m) - ln S`: rounding `m + ln S` first loses
/// `ln S` entirely once `|m|` is past about `1e16` (`[-1e17, -1e17]` would get `p = [1, 1]`).
/// `(-inf, 0)` when every `a_i` is `-inf`.
pub fn logsumexp_parts(a: &[f64]) -> (f64, f64) {
    let mx = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return (mx, 0.0);
    }
    (mx, a.iter().map(|&x| (x - mx).exp()).sum::<f64>().ln())
}

/// `log softmax(a)_i = (a_i - max a) - ln sum exp(a - max a)`, `-inf` where `a_i` is.
pub fn log_softmax_into(a: &[f64], out: &mut [f64]) {
    let (mx, ln_s) = logsumexp_parts(a);
    for (o, &x) in out.iter_mut().zip(a) {
        *o = if x == f64::NEG_INFINITY { x } else { (x - mx) - ln_s };
    }
}

/// `out_i = exp(a_i - logsumexp(a))`, computed as `exp((a_i - max a) - ln S)`.
pub fn softmax_into(a: &[f64], out: &mut [f64]) {
    log_softmax_into(a, out);
    for o in out.iter_mut() {
        *o = o.exp();
    }
}

/// `sum_i q_i (log q_i - logp_i)` over the members with `q_i > 0`.
fn kl_div(q: &[f64], logp: impl Iterator<Item = f64>) -> f64 {
    q.iter().zip(logp).filter(|(&qi, _)| qi > 0.0).map(|(&qi, lp)| qi * (qi.ln() - lp)).sum()
}

struct GroupFit {
    loss: f64,
    kl: f64,
    entropy: f64,
    grad_norm: f64,
}

fn fit_group(
    l: &[f64],
    q: &[f64],
    start: usize,
    form: LossForm,
    scale: f64,
    grad: &mut [f64],
) -> Result<GroupFit> {
    let (mx, ln_s) = logsumexp_parts(l);
    let qsum: f64 = q.iter().sum();
    let (mut ce, mut kl, mut ent, mut dmax) = (0.0, 0.0, 0.0, 0.0f64);
    for i in 0..l.len() {
        let lp = if l[i] == f64::NEG_INFINITY { l[i] } else { (l[i] - mx) - ln_s };
        if q[i] > 0.0 {
            if lp == f64::NEG_INFINITY && l[i].is_finite() {
                return Err(TpoError::Overflow {
                    method: "fit",
                    place: format!("logp[{}]", start + i),
                    cause: "it is more than f64::MAX below its group's maximum, so its log-softmax is past f64's range",
                });
            }
            if lp == f64::NEG_INFINITY {
                return Err(TpoError::InfiniteLoss { index: start + i, q: q[i] });
            }
            let lq = q[i].ln();
            ce -= q[i] * lp;
            kl += q[i] * (lq - lp);
            ent -= q[i] * lq;
        }
        let d = qsum * lp.exp() - q[i];
        grad[i] = d;
        dmax = f64::max(dmax, d.abs());
    }
    // |scale| m sqrt(sum (d/m)^2) with m = max |d|: squaring scale d overflows, squaring d alone
    // underflows below ~1e-162. (Past f64's range only for |scale| near f64::MAX; the caller
    // refuses that if it reports the norm.)
    let grad_norm = if dmax == 0.0 {
        0.0
    } else {
        scale.abs() * dmax * grad.iter().map(|d| (d / dmax).powi(2)).sum::<f64>().sqrt()
    };
    for (i, g) in grad.iter_mut().enumerate() {
        *g *= scale;
        if !g.is_finite() {
            return Err(TpoError::Overflow {
                method: "fit",
                place: format!("the gradient at member {}", start + i),
                cause: "grad_scale times (sum(q) p - q) is past f64's range: reduce grad_scale",
            });
        }
    }
    let loss = match form {
        LossForm::CrossEntropy => ce,
        LossForm::Kl => kl,
    };
    Ok(GroupFit { loss, kl, entropy: ent, grad_norm })
}

/// `sum_g w L_g`, each term scaled before the sum (a mean of group losses near `f64::MAX` stays
/// finite); a loss past f64's range is refused with [`TpoError::Overflow`].
pub(crate) fn reduce_loss(
    method: &'static str,
    w: f64,
    group_loss: &[f64],
    cause: &'static str,
) -> Result<f64> {
    let loss: f64 = group_loss.iter().map(|g| w * g).sum();
    match group_loss.iter().position(|g| !g.is_finite()) {
        Some(g) => Err(TpoError::Overflow { method, place: format!("group {g}"), cause }),
        None if !loss.is_finite() => {
            Err(TpoError::Overflow { method, place: "the loss reduced over groups".into(), cause })
        }
        None => Ok(loss),
    }
}

pub(crate) fn widen_logp<T: Scalar>(name: &'static str, x: &[T], start: usize) -> Result<Vec<f64>> {
    x.iter()
        .enumerate()
        .map(|(i, v)| {
            let v = v.to_f64();
            if v.is_nan() || v == f64::INFINITY {
                Err(TpoError::NonFinite {
                    name,
                    index: start + i,
                    value: v,
                    allowed: "log-probs must be finite, or -inf to exclude a member",
                })
            } else {
                Ok(v)
            }
        })
        .collect()
}

pub(crate) fn widen_scores<T: Scalar>(x: &[T], start: usize) -> Result<Vec<f64>> {
    x.iter()
        .enumerate()
        .map(|(i, v)| {
            let v = v.to_f64();
            if v.is_finite() {
                Ok(v)
            } else {
                Err(TpoError::NonFinite {
                    name: "scores",
                    index: start + i,
                    value: v,
                    allowed: "scores must be finite",
                })
            }
        })
        .collect()
}

fn widen_target<T: Scalar>(x: &[T], start: usize, g: usize) -> Result<Vec<f64>> {
    let q: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    for (i, &v) in q.iter().enumerate() {
        if !v.is_finite() || v < 0.0 {
            return Err(TpoError::BadTarget(format!(
                "target[{}] is {v}: a target holds probabilities in [0, 1]",
                start + i
            )));
        }
    }
    let sum: f64 = q.iter().sum();
    if (sum - 1.0).abs() > TARGET_SUM_TOLERANCE {
        return Err(TpoError::BadTarget(format!(
            "group {g} sums to {sum}, expected 1: pass the output of target()"
        )));
    }
    Ok(q)
}
