//! The invariants every result of the public API must satisfy, shared by the fuzz targets and by
//! `tests/fuzz_regressions.rs` (which compiles this file with `#[path]`).
//!
//! * An error's message is one non-empty line (no line break or other control character); a
//!   call that builds its own target never refuses it as an invalid stored target.
//! * An `Ok` result is finite everywhere (losses, targets, gradients, diagnostics).
//! * A target `q` holds probabilities: `0 <= q_i <= 1`, `q_i = 0` for an excluded member
//!   (`l_old = -inf`), and each group sums to 1 within [`SUM_TOL`].
//! * A fit's gradient `c (sum(q) p - q)` (`c = grad_scale * w`) sums to zero over each group within
//!   `SUM_TOL * |c| * (sum(q) + 1)`: that holds exactly when `p = softmax(l)` sums to one.
//! * Cross-entropy is `>= 0`; `KL(q || p) >= Q ln Q` and `-Q ln Q <= H(q) <= Q ln K - Q ln Q` for
//!   a target summing to `Q` (`KL >= 0`, `0 <= H <= ln K` when `Q = 1`), within [`SUM_TOL`] scaled
//!   by the terms that were added.
//! * Token log-probs are `<= 0`, `sum_v exp((z_v / tau - row_max) - log_sum) = 1` with `lse = row_max + log_sum`, `0 <= entropy <= ln V`, and each
//!   row of `dL/dz` sums to zero (within the same tolerances).
//!
//! Each check returns `Err(description)` on the first violation; the fuzz targets panic with it.

use tpo::cpu::tokens::TokenLogprobs;
use tpo::{FitConfig, FitOutput, GroupLayout, LossForm, TargetAndFit};

/// Tolerance on a per-group sum of probabilities (targets, `softmax(l)`): `|sum - 1| <= 1e-9`.
///
/// Computed in f64 relative to the group's maximum, a softmax sums to one within a few hundred
/// ulps (`exp` of an argument rounded relative to its own size, then `K` additions); `1e-9`
/// leaves room for `K` up to about `10^6` and still catches any loss of the normalisation.
pub const SUM_TOL: f64 = 1e-9;

/// The outcome of a check: `Err` describes the first violated invariant.
pub type Check = Result<(), String>;

/// An error message must be one non-empty line: no line break (`\n`, `\r`, U+2028, U+2029) and no
/// other control character (a terminal escape, a tab) from whatever it quotes.
pub fn one_line(what: &str, msg: &str) -> Check {
    if msg.contains(['\n', '\r', '\u{2028}', '\u{2029}']) {
        return Err(format!("{what}: the error message spans several lines: {msg:?}"));
    }
    if let Some(c) = msg.chars().find(|c| c.is_control()) {
        return Err(format!("{what}: the error message holds the control character {c:?}: {msg:?}"));
    }
    if msg.trim().is_empty() {
        return Err(format!("{what}: empty error message"));
    }
    Ok(())
}

/// Checks the outcome of a call: a one-line error, or an `Ok` value passed to `ok`.
pub fn outcome<T, E: std::fmt::Display>(what: &str, r: &Result<T, E>, ok: impl FnOnce(&T) -> Check) -> Check {
    match r {
        Ok(v) => ok(v).map_err(|e| format!("{what}: {e}")),
        Err(e) => one_line(what, &e.to_string()),
    }
}

/// [`outcome`] for a call that builds its own target (`target_and_fit`, the token paths with an
/// on-policy or rollout source): it must never refuse that target as an invalid stored one.
pub fn built_target_outcome<T>(what: &str, r: &tpo::Result<T>, ok: impl FnOnce(&T) -> Check) -> Check {
    if let Err(e @ tpo::TpoError::BadTarget(_)) = r {
        return Err(format!("{what}: the target the call built itself was refused: {e}"));
    }
    outcome(what, r, ok)
}

fn finite(name: &str, v: &[f64]) -> Check {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(format!("Ok result with {name}[{i}] = {}", v[i])),
        None => Ok(()),
    }
}

fn len(name: &str, v: &[f64], want: usize) -> Check {
    if v.len() != want {
        return Err(format!("{name} has {} entries, expected {want}", v.len()));
    }
    Ok(())
}

/// A target `q` for the rollout log-probs `l_old` (widened to f64) over `layout`.
pub fn target(q: &[f64], l_old: &[f64], layout: &GroupLayout) -> Check {
    len("target", q, layout.len())?;
    finite("target", q)?;
    for (g, r) in layout.ranges().enumerate() {
        let mut sum = 0.0;
        for i in r {
            let v = q[i];
            if !(0.0..=1.0 + SUM_TOL).contains(&v) {
                return Err(format!("target[{i}] = {v:e} is not a probability"));
            }
            if l_old[i] == f64::NEG_INFINITY && v != 0.0 {
                return Err(format!("target[{i}] = {v:e} for an excluded member (l_old = -inf)"));
            }
            sum += v;
        }
        if (sum - 1.0).abs() > SUM_TOL {
            return Err(format!("the target of group {g} sums to {sum:.17e}, not 1 (tolerance {SUM_TOL:e})"));
        }
    }
    Ok(())
}

/// A fit of the policy to the target `q` over `layout` under `cfg`.
pub fn fit(out: &FitOutput, q: &[f64], layout: &GroupLayout, cfg: &FitConfig) -> Check {
    let b = layout.num_groups();
    if !out.loss.is_finite() {
        return Err(format!("Ok result with loss = {}", out.loss));
    }
    len("group_loss", &out.group_loss, b)?;
    finite("group_loss", &out.group_loss)?;
    len("grad", &out.grad, layout.len())?;
    finite("grad", &out.grad)?;
    let w = cfg.validate(b).map_err(|e| format!("the call succeeded but its FitConfig is invalid: {e}"))?;
    let c = (cfg.grad_scale * w).abs();
    for (g, r) in layout.ranges().enumerate() {
        let qsum: f64 = q[r.clone()].iter().sum();
        let gsum: f64 = out.grad[r.clone()].iter().sum();
        let tol = SUM_TOL * c * (qsum + 1.0) + 4.0 * r.len() as f64 * f64::from_bits(1);
        if gsum.abs() > tol {
            return Err(format!(
                "the gradient of group {g} sums to {gsum:e}, not 0 (|c| = {c:e}, sum(q) = {qsum}): \
                 softmax(logp) does not sum to 1"
            ));
        }
        let l = out.group_loss[g];
        let ltol = SUM_TOL * (1.0 + l.abs());
        let lb = match cfg.form {
            LossForm::CrossEntropy => 0.0,
            LossForm::Kl => xlogx(qsum),
        };
        if l < lb - ltol {
            return Err(format!("group {g}'s loss is {l:e} < {lb:e} (sum(q) = {qsum})"));
        }
    }
    if let Some(st) = &out.stats {
        for (name, v) in [("kl_q_p", &st.kl_q_p), ("entropy_q", &st.entropy_q), ("grad_norm", &st.grad_norm)]
        {
            len(name, v, b)?;
            finite(name, v)?;
        }
        if let Some(k) = &st.kl_q_pold {
            len("kl_q_pold", k, b)?;
            finite("kl_q_pold", k)?;
        }
        for (g, r) in layout.ranges().enumerate() {
            let h = st.entropy_q[g];
            let qsum: f64 = q[r.clone()].iter().sum();
            let (hlo, hhi) = (-xlogx(qsum), qsum * (r.len() as f64).ln() - xlogx(qsum));
            let htol = SUM_TOL * (1.0 + hhi.abs());
            if h < hlo - htol || h > hhi + htol {
                return Err(format!(
                    "group {g}'s H(q) = {h:e} is outside [{hlo:e}, {hhi:e}] (sum(q) = {qsum})"
                ));
            }
            let ce = match cfg.form {
                LossForm::CrossEntropy => out.group_loss[g],
                LossForm::Kl => st.kl_q_p[g] + h,
            };
            let ktol = SUM_TOL * (1.0 + ce.abs() + h.abs());
            if st.kl_q_p[g] < xlogx(qsum) - ktol {
                return Err(format!("group {g}'s KL(q || p) = {:e} < {:e}", st.kl_q_p[g], xlogx(qsum)));
            }
            if let Some(k) = &st.kl_q_pold {
                if k[g] < xlogx(qsum) - ktol.max(SUM_TOL * (1.0 + k[g].abs())) {
                    return Err(format!("group {g}'s KL(q || p_old) = {:e} < {:e}", k[g], xlogx(qsum)));
                }
            }
            // The reported norm is the returned gradient's Euclidean norm (computed here scaled by
            // its largest entry, so neither overflow nor underflow hides a mismatch).
            let gr = &out.grad[r.clone()];
            let m = gr.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            let norm =
                if m == 0.0 { 0.0 } else { m * gr.iter().map(|x| (x / m).powi(2)).sum::<f64>().sqrt() };
            // Slack of a few units of the last place of the subnormal range: a subnormal norm
            // holds only a few significant bits, so two correct roundings may differ by one.
            if (st.grad_norm[g] - norm).abs() > 1e-12 * norm + 4.0 * f64::from_bits(1) {
                return Err(format!(
                    "group {g}'s gradient norm is {:e}, the gradient's is {norm:e}",
                    st.grad_norm[g]
                ));
            }
        }
    }
    Ok(())
}

/// `x ln x` (0 at 0): for a non-negative `q` summing to `Q`, `KL(q || p) >= Q ln Q` for any
/// distribution `p` and `-Q ln Q <= H(q) <= Q ln K - Q ln Q` (log-sum inequality, Jensen), which
/// are `KL >= 0` and `0 <= H <= ln K` for a normalised target. A stored target may be off one by
/// up to [`tpo::cpu::TARGET_SUM_TOLERANCE`].
fn xlogx(x: f64) -> f64 {
    if x > 0.0 {
        x * x.ln()
    } else {
        0.0
    }
}

/// The first-epoch call: the target built from `l_old` (widened; `logp` when on-policy) and the fit.
pub fn target_and_fit(r: &TargetAndFit, l_old: &[f64], layout: &GroupLayout, cfg: &FitConfig) -> Check {
    target(&r.target, l_old, layout)?;
    fit(&r.fit, &r.target, layout, cfg)
}

/// A baseline loss (REINFORCE, GRPO, DG): finite loss, per-group losses and gradient.
pub fn baseline(out: &FitOutput, layout: &GroupLayout) -> Check {
    if !out.loss.is_finite() {
        return Err(format!("Ok result with loss = {}", out.loss));
    }
    len("group_loss", &out.group_loss, layout.num_groups())?;
    finite("group_loss", &out.group_loss)?;
    len("grad", &out.grad, layout.len())?;
    finite("grad", &out.grad)
}

/// Token log-probs of `rows` rows of the tempered logits `s = z / tau` (widened), vocabulary `vocab`.
pub fn token_logprobs(tl: &TokenLogprobs, s: &[f64], vocab: usize) -> Check {
    let rows = tl.logp.len();
    len("lse", &tl.lse, rows)?;
    len("row_max", &tl.row_max, rows)?;
    len("log_sum", &tl.log_sum, rows)?;
    finite("token logp", &tl.logp)?;
    finite("lse", &tl.lse)?;
    finite("row_max", &tl.row_max)?;
    finite("log_sum", &tl.log_sum)?;
    if s.len() != rows * vocab {
        return Err(format!("{rows} token log-probs for {} logits of vocabulary {vocab}", s.len()));
    }
    for t in 0..rows {
        if tl.logp[t] > 0.0 {
            return Err(format!("token {t}'s log-prob is {:e} > 0", tl.logp[t]));
        }
        let row = &s[t * vocab..(t + 1) * vocab];
        let (mx, ln_s) = (tl.row_max[t], tl.log_sum[t]);
        let psum: f64 = row.iter().map(|&x| ((x - mx) - ln_s).exp()).sum();
        if (psum - 1.0).abs() > SUM_TOL {
            return Err(format!(
                "row {t}: sum_v exp((s_v - row_max) - log_sum) = {psum:.17e}, not 1 (row_max = {mx:e}, log_sum = {ln_s:e})"
            ));
        }
        // lse is the two parts rounded to one f64.
        if tl.lse[t] != mx + ln_s {
            return Err(format!("row {t}: lse = {:e} is not row_max + log_sum = {:e}", tl.lse[t], mx + ln_s));
        }
    }
    if let Some(e) = &tl.entropy {
        len("entropy", e, rows)?;
        finite("entropy", e)?;
        let vmax = (vocab as f64).ln();
        for (t, &h) in e.iter().enumerate() {
            if h < -SUM_TOL * (1.0 + vmax) || h > vmax + SUM_TOL * (1.0 + vmax) {
                return Err(format!("token {t}'s entropy {h:e} is outside [0, ln V = {vmax:e}]"));
            }
        }
    }
    Ok(())
}

/// `dL/dz` for per-token upstream gradients `g` at temperature `tau`: finite, each row summing to
/// `g_t (1 - sum_v p_v) / tau = 0`.
pub fn logits_grad(d: &[f64], g: &[f64], vocab: usize, tau: f64) -> Check {
    finite("grad_logits", d)?;
    if d.len() != g.len() * vocab {
        return Err(format!(
            "grad_logits has {} entries for {} tokens of vocabulary {vocab}",
            d.len(),
            g.len()
        ));
    }
    for (t, &gt) in g.iter().enumerate() {
        let sum: f64 = d[t * vocab..(t + 1) * vocab].iter().sum();
        let tol = SUM_TOL * 2.0 * (gt / tau).abs() + 4.0 * vocab as f64 * f64::from_bits(1);
        if sum.abs() > tol {
            return Err(format!("row {t} of grad_logits sums to {sum:e}, not 0 (g = {gt:e}, tau = {tau:e})"));
        }
    }
    Ok(())
}

/// Any other `Ok` vector must be finite.
pub fn all_finite(name: &str, v: &[f64]) -> Check {
    finite(name, v)
}
