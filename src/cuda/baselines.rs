//! The policy-gradient baselines of [`crate::cpu`] (REINFORCE, PPO-clip, GRPO, DG) fused on the
//! device: `kernels/baselines.cu`, one launch per size class of the layout plus the device-side
//! reduction of the scalar loss, like [`CudaTpo::fit`].

use super::{cuda_err, opt_ptr, CudaTpo, DeviceFloat, DeviceLayout, FitBuffers, GroupParams, KernelKey};
use crate::config::FitConfig;
use crate::cpu::{Baseline, DgConfig, GrpoConfig, PgConfig, PpoConfig};
use crate::error::{Result, TpoError};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

/// A baseline loss and its configuration, for [`CudaTpo::baseline`]. Each computes, per group of
/// `K` members, exactly what its CPU reference computes (in f32 arithmetic), with
/// `r_i = l_i - l_old_i` and `rho_i = exp(r_i)`:
///
/// * [`Reinforce`](Self::Reinforce) ([`crate::cpu::reinforce`]): `A_i = s_i - b`,
///   `L = -(1/K) sum_i A_i l_i`, `dL/dl_i = -A_i / K`;
/// * [`Ppo`](Self::Ppo) ([`crate::cpu::ppo`]), advantages `A` given in place of the scores:
///   `L = -(1/K) sum_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i)`,
///   `dL/dl_i = -(1/K) rho_i A_i [rho_i A_i <= clip(rho_i, 1 - eps, 1 + eps) A_i]`;
/// * [`Grpo`](Self::Grpo) ([`crate::cpu::grpo`]): `A` the population z-score of the group's
///   scores (0 when their deviation is at most `zero_std_threshold`), the PPO surrogate plus
///   `(beta/K) sum_i (exp(-r_i) + r_i - 1)`, whose derivative adds `(beta/K) (1 - exp(-r_i))`;
/// * [`Dg`](Self::Dg) ([`crate::cpu::dg`]): `A_i = s_i - b`,
///   `g_i = sigmoid(A_i (-l_old_i) / eta)` (a constant of the loss),
///   `L = -(1/K) sum_i g_i A_i l_i`, `dL/dl_i = -g_i A_i / K`;
///
/// `b` the group's mean score ([`Baseline::GroupMean`]) or a constant ([`Baseline::Constant`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaselineLoss {
    /// REINFORCE with a baseline (reads no `logp_old`).
    Reinforce(PgConfig),
    /// PPO-clip with caller-given advantages (the `scores` argument holds them).
    Ppo(PpoConfig),
    /// GRPO: z-scored scores, clipped surrogate, reverse-KL penalty.
    Grpo(GrpoConfig),
    /// DG, the sigmoid-gated REINFORCE.
    Dg(DgConfig),
}

impl BaselineLoss {
    /// The kernels' method number (`BL_REINFORCE` ... in kernels/baselines.cu).
    fn method(&self) -> i32 {
        match self {
            Self::Reinforce(_) => 0,
            Self::Ppo(_) => 1,
            Self::Grpo(_) => 2,
            Self::Dg(_) => 3,
        }
    }

    /// Validates the configuration as the CPU reference does.
    fn validate(&self) -> Result<()> {
        match self {
            Self::Reinforce(c) => crate::cpu::check_baseline(c.baseline),
            Self::Ppo(c) => crate::cpu::check_ppo(c),
            Self::Grpo(c) => crate::cpu::check_grpo(c),
            Self::Dg(c) => crate::cpu::check_dg(c),
        }
    }
}

/// Kernel parameters; must match `struct BaselineParams` in `kernels/baselines.cu` field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct BaselineParams {
    logp: u64,
    logp_old: u64,
    scores: u64,
    offsets: u64,
    grad: u64,
    group_loss: u64,
    status: u64,
    num_groups: i64,
    k: i64,
    group_ids: u64,
    num_items: i64,
    baseline: f64,
    eta: f64,
    beta: f64,
    zero_std_threshold: f64,
    grad_coef: f64,
    clip_lo: f32,
    clip_hi: f32,
    method: i32,
    group_mean: i32,
}

// SAFETY: `BaselineParams` is `repr(C)`, `Copy`, holds only plain integers and floats (device
// addresses as u64), and its layout matches the C struct the kernels take by value.
unsafe impl DeviceRepr for BaselineParams {}

impl GroupParams for BaselineParams {
    fn with_items(self, group_ids: u64, num_items: i64) -> Self {
        Self { group_ids, num_items, ..self }
    }
}

/// Every entry point of kernels/baselines.cu.
pub(super) fn kernel_keys() -> Vec<KernelKey> {
    let types = ["f32", "bf16", "f16"];
    let mut keys = vec![KernelKey::new("baseline_reduce", "", "", "")];
    for path in ["warp", "block"] {
        for t in types {
            for g in types {
                keys.push(KernelKey::new("baseline", path, t, g));
            }
        }
    }
    keys
}

impl CudaTpo {
    /// A policy-gradient baseline loss on the device (see [`BaselineLoss`] for each formula; the
    /// CPU references are [`crate::cpu::reinforce`], [`ppo`](crate::cpu::ppo),
    /// [`grpo`](crate::cpu::grpo) and [`dg`](crate::cpu::dg)): writes the per-group loss `L_g`,
    /// the scalar loss `w * sum_g L_g` (`w` from `fit.reduction`, reduced on the device in a
    /// fixed order) and the gradient `d(grad_scale * loss) / d l` into `out` (allocated with
    /// [`alloc_fit`](Self::alloc_fit) with `stats = false`: these losses have no diagnostics).
    ///
    /// `scores` are the rollouts' scores, or for [`BaselineLoss::Ppo`] the advantages.
    /// `logp_old` are the rollout log-probs of PPO, GRPO and DG (`None`: on-policy, `logp`
    /// itself); REINFORCE reads none. Log-probs must be finite (no `-inf` exclusion, as on the
    /// CPU). `fit.form` and `fit.diagnostics` play no part.
    ///
    /// Like [`fit`](Self::fit), nothing is allocated and nothing waits for the device; data
    /// errors (a non-finite log-prob, score or advantage; a loss or gradient past f32's range or
    /// the gradient type's) are recorded in `out.status` and the affected groups' outputs are
    /// NaN: [`check`](Self::check) returns the first as a one-line error. Configuration and
    /// length errors are returned at once, as the CPU reference returns them.
    #[allow(clippy::too_many_arguments)]
    pub fn baseline<T: DeviceFloat, G: DeviceFloat>(
        &self,
        loss: &BaselineLoss,
        logp: &CudaSlice<T>,
        logp_old: Option<&CudaSlice<T>>,
        scores: &CudaSlice<f32>,
        layout: &DeviceLayout,
        fit: &FitConfig,
        out: &mut FitBuffers<G>,
    ) -> Result<()> {
        loss.validate()?;
        let l = &layout.host;
        let w = fit.validate(l.num_groups())?;
        l.check_len("logp", logp.len())?;
        if let (Some(o), false) = (logp_old, matches!(loss, BaselineLoss::Reinforce(_))) {
            l.check_len("logp_old", o.len())?;
        }
        l.check_len(
            if matches!(loss, BaselineLoss::Ppo(_)) { "advantages" } else { "scores" },
            scores.len(),
        )?;
        l.check_len("gradient output", out.grad.len())?;
        if out.group_loss.len() != l.num_groups() {
            return Err(TpoError::LengthMismatch {
                name: "group_loss output",
                got: out.group_loss.len(),
                expected: l.num_groups(),
            });
        }
        if let Some(st) = &out.stats {
            return Err(TpoError::LengthMismatch {
                name:
                    "stats output (the baseline losses compute no diagnostics: allocate with stats = false)",
                got: st.len(),
                expected: 0,
            });
        }
        let (baseline, group_mean) = match loss {
            BaselineLoss::Reinforce(PgConfig { baseline }) | BaselineLoss::Dg(DgConfig { baseline, .. }) => {
                match baseline {
                    Baseline::GroupMean => (0.0, 1),
                    Baseline::Constant(c) => (*c, 0),
                }
            }
            _ => (0.0, 0),
        };
        let (clip_lo, clip_hi) = match loss {
            BaselineLoss::Ppo(PpoConfig { clip_eps }) | BaselineLoss::Grpo(GrpoConfig { clip_eps, .. }) => {
                ((1.0 - clip_eps) as f32, (1.0 + clip_eps) as f32)
            }
            _ => (1.0, 1.0),
        };
        let (beta, zero_std_threshold) = match loss {
            BaselineLoss::Grpo(c) => (c.beta, c.zero_std_threshold),
            _ => (0.0, 0.0),
        };
        let eta = if let BaselineLoss::Dg(c) = loss { c.eta } else { 1.0 };

        let _range = self.range("tpo::baseline");
        self.reset(&mut out.status)?;
        {
            let s = &self.stream;
            let (p_l, _a) = logp.device_ptr(s);
            let (p_old, _b) = match logp_old {
                Some(o) => {
                    let (p, g) = o.device_ptr(s);
                    (p, Some(g))
                }
                None => (p_l, None),
            };
            let (p_s, _c) = scores.device_ptr(s);
            let (p_off, _d) = opt_ptr(layout.offsets.as_ref(), s);
            let (p_g, _e) = out.grad.device_ptr_mut(s);
            let (p_gl, _f) = out.group_loss.device_ptr_mut(s);
            let (p_status, _h) = out.status.0.device_ptr_mut(s);
            let params = BaselineParams {
                logp: p_l,
                logp_old: p_old,
                scores: p_s,
                offsets: p_off,
                grad: p_g,
                group_loss: p_gl,
                status: p_status,
                num_groups: l.num_groups() as i64,
                k: l.uniform_size().unwrap_or(0) as i64,
                group_ids: 0,
                num_items: 0,
                baseline,
                eta,
                beta,
                zero_std_threshold,
                grad_coef: fit.grad_scale * w,
                clip_lo,
                clip_hi,
                method: loss.method(),
                group_mean,
            };
            self.launch_group("baseline", T::SUFFIX, Some(G::SUFFIX), layout, params)?;
        }
        let s = &self.stream;

        // The scalar loss, reported as an overflow (code 19 + method, at the index past every
        // member) when its f32 value is past the range.
        let f = self.kernel(KernelKey::new("baseline_reduce", "", "", ""))?;
        let n = out.group_loss.len() as i64;
        let index = l.len() as i64;
        let code = 19u32 + loss.method() as u32;
        let mut builder = s.launch_builder(f);
        // The group launch's guards are dropped: these are plain borrows again.
        builder
            .arg(&out.group_loss)
            .arg(&n)
            .arg(&w)
            .arg(&mut out.loss)
            .arg(&mut out.status.0)
            .arg(&index)
            .arg(&code);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the kernel reads `n` = group_loss.len() floats, writes one float to `loss`
        // (allocated with at least one element) and may raise the one-word status with an
        // integer atomic; a single block of 1024 threads as it expects; all on this stream.
        unsafe { builder.launch(cfg) }.map_err(|e| cuda_err("launching tpo_baseline_reduce", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels take the parameters by value: the Rust struct has the C layout's size (no GPU
    /// needed; the C side is 11 eight-byte fields, 5 doubles, 4 four-byte fields).
    #[test]
    fn baseline_params_have_the_c_layout() {
        assert_eq!(std::mem::size_of::<BaselineParams>(), 11 * 8 + 5 * 8 + 4 * 4);
        assert_eq!(kernel_keys().len(), 19);
    }
}
