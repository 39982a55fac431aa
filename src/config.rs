//! Configuration of the target construction and of the fit.

use crate::error::{Result, TpoError};

/// Whether the target is anchored to the rollout policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Anchor {
    /// `q = softmax(log p_old + u / eta)` (TPO; the default).
    #[default]
    Anchored,
    /// `q = softmax(u / eta)` over the members that are not excluded: the paper's no-anchor ablation.
    NoAnchor,
}

/// How the target is built from the rollout log-probs and the scores.
///
/// For a group with scores `s_1..s_K` (over its non-excluded members, see below):
/// `mu = mean(s)`, `sigma = sqrt(mean((s - mu)^2))` (population deviation),
/// `u_i = (s_i - mu) / sigma`, or `u_i = 0` for all `i` when `sigma <= zero_std_threshold`.
/// Then `q = softmax(log_softmax(l_old) + u / eta)` ([`Anchor::Anchored`]) or
/// `q = softmax(u / eta)` ([`Anchor::NoAnchor`]).
///
/// A member whose `l_old` is `-inf` is *excluded*: its `p_old` is 0, it takes no part in the
/// group's score statistics, and its target is `q = 0` (in both anchor modes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetConfig {
    /// Temperature `eta > 0` of the reweighting `exp(u / eta)`. Default 1. Every finite
    /// `eta > 0` is exact, subnormal ones included: as `eta -> 0` the target tends to `p_old`
    /// restricted to the group's best-scored members, renormalised (uniform over them with
    /// [`Anchor::NoAnchor`]); as `eta -> inf`, to `p_old`.
    pub eta: f64,
    /// Absolute threshold on the population standard deviation of a group's raw scores at
    /// or below which the group counts as zero-variance (`u = 0`). Default `1e-6`, as in the
    /// authors' code.
    pub zero_std_threshold: f64,
    /// Anchored (default) or no-anchor target.
    pub anchor: Anchor,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self { eta: 1.0, zero_std_threshold: 1e-6, anchor: Anchor::Anchored }
    }
}

impl TargetConfig {
    /// The default configuration with temperature `eta`.
    pub fn with_eta(eta: f64) -> Self {
        Self { eta, ..Self::default() }
    }

    /// Checks `eta` is finite and > 0 and the threshold finite and >= 0.
    pub fn validate(&self) -> Result<()> {
        if !(self.eta.is_finite() && self.eta > 0.0) {
            return Err(TpoError::BadConfig { name: "eta", requirement: "finite and > 0", got: self.eta });
        }
        if !(self.zero_std_threshold.is_finite() && self.zero_std_threshold >= 0.0) {
            return Err(TpoError::BadConfig {
                name: "zero_std_threshold",
                requirement: "finite and >= 0",
                got: self.zero_std_threshold,
            });
        }
        Ok(())
    }
}

/// Which loss value is reported. Both have the gradient `p - q` (`q` is held fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossForm {
    /// Cross-entropy to the target, `L = -sum_i q_i log p_i` (the paper's loss; the default).
    #[default]
    CrossEntropy,
    /// `KL(q || p) = sum_i q_i (log q_i - log p_i) = L - H(q)`: zero at the optimum.
    Kl,
}

/// How per-group losses combine into the scalar loss, and so how the gradient is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Reduction {
    /// `loss = (1/B) sum_g L_g` over the `B` groups of this call (the default).
    #[default]
    Mean,
    /// `loss = sum_g L_g`.
    Sum,
    /// `loss = (1/n) sum_g L_g` for a caller-given global group count `n`: for data-parallel
    /// ranks and gradient-accumulation micro-batches, `n` is the number of groups over all
    /// ranks and micro-batches of the step, so the summed gradients equal the global mean's.
    GlobalMean(f64),
}

impl Reduction {
    /// The weight `w` each group's loss gets: `1/B`, `1` or `1/n`.
    pub fn weight(&self, groups: usize) -> Result<f64> {
        match *self {
            Reduction::Mean => Ok(1.0 / groups as f64),
            Reduction::Sum => Ok(1.0),
            Reduction::GlobalMean(n) => {
                // 1/n must be finite too: a subnormal n would make every loss and gradient infinite.
                if n.is_finite() && n > 0.0 && (1.0 / n).is_finite() {
                    Ok(1.0 / n)
                } else {
                    Err(TpoError::BadConfig {
                        name: "global group count",
                        requirement: "finite and > 0, with 1/n finite (n >= 2^-1022)",
                        got: n,
                    })
                }
            }
        }
    }
}

/// How the policy is fitted to the target.
///
/// The scalar loss is `loss = w * sum_g L_g` with `w` from [`Reduction::weight`] and `L_g`
/// the group's cross-entropy or KL ([`LossForm`]); the gradient returned is
/// `grad_scale * w * (sum(q_g) * p - q)` per group, which is `grad_scale * w * (p - q)` for
/// a normalised target: `grad_scale` is the upstream gradient `d(objective)/d(loss)` that an
/// autograd backward receives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitConfig {
    /// Loss form reported (the gradient is the same for both). Default cross-entropy.
    pub form: LossForm,
    /// Reduction over groups. Default mean.
    pub reduction: Reduction,
    /// Upstream gradient multiplying the returned gradient. Default 1.
    pub grad_scale: f64,
    /// Compute the per-group [`GroupStats`](crate::GroupStats). Default off.
    pub diagnostics: bool,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self { form: LossForm::CrossEntropy, reduction: Reduction::Mean, grad_scale: 1.0, diagnostics: false }
    }
}

impl FitConfig {
    /// Checks the upstream scale is finite and the reduction valid.
    pub fn validate(&self, groups: usize) -> Result<f64> {
        if !self.grad_scale.is_finite() {
            return Err(TpoError::BadConfig {
                name: "grad_scale",
                requirement: "finite",
                got: self.grad_scale,
            });
        }
        let w = self.reduction.weight(groups)?;
        // The gradient is scaled by grad_scale * w: an overflowing product would make every
        // gradient infinite.
        if !(self.grad_scale * w).is_finite() {
            return Err(TpoError::BadConfig {
                name: "grad_scale times the reduction weight",
                requirement: "finite",
                got: self.grad_scale * w,
            });
        }
        Ok(w)
    }
}
