//! The f64 reference for TPO from model outputs: token log-probs from logits (or from hidden
//! states times the lm_head), masked sequence sums, the group loss, and the backward to the
//! logits (and to the hidden states and the weight).
//!
//! For `T` tokens over a vocabulary of `V`, logits `z [T, V]` (row-major), sampled tokens
//! `y [T]` and a sampling temperature `tau > 0`, with `s = z / tau`:
//!
//! * `lse_t = log sum_v exp(s_{t,v})`, `logp_t = s_{t,y_t} - lse_t`,
//!   `entropy_t = lse_t - sum_v p_{t,v} s_{t,v}` with `p_t = softmax(s_t)`;
//! * sequence `i` (a range of tokens, [`GroupLayout`] over tokens) with completion mask `m`:
//!   `l_i = sum_t m_t logp_t` ([`SeqReduce::Sum`]) or that over `n_i = sum_t m_t`
//!   ([`SeqReduce::Mean`]; `l_i = 0` when `n_i = 0`);
//! * the group loss on `l` ([`crate::cpu::fit`]), giving `G_i = dL/dl_i`;
//! * per-token upstream `g_t = m_t G_i` (Sum) or `m_t G_i / n_i` (Mean), and
//!   `dL/dz_{t,v} = g_t (1{v = y_t} - p_{t,v}) / tau`;
//! * from hidden states `h [T, H]` and the lm_head `W [V, H]`: `z_t = W h_t`,
//!   `dL/dh_t = sum_v dL/dz_{t,v} W_v`, `dL/dW_v = sum_t dL/dz_{t,v} h_t`.

use super::{fit, target, target_and_fit, FitOutput};
use crate::config::{FitConfig, TargetConfig};
use crate::error::{Result, TpoError};
use crate::layout::GroupLayout;
use crate::scalar::Scalar;

/// How a sequence's token log-probs combine into its log-prob `l_i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeqReduce {
    /// `l_i = sum_t m_t logp_t`, the sequence log-probability (the default).
    #[default]
    Sum,
    /// `l_i = sum_t m_t logp_t / n_i`, length-normalised (`0` for a sequence with no
    /// completion tokens).
    Mean,
}

/// Token-level options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenConfig {
    /// Sampling temperature `tau > 0` the logits are divided by (default 1).
    pub temperature: f64,
    /// Compute the per-token entropy (default off).
    pub entropy: bool,
    /// Sequence reduction (default sum).
    pub reduce: SeqReduce,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self { temperature: 1.0, entropy: false, reduce: SeqReduce::Sum }
    }
}

impl TokenConfig {
    fn validate(&self) -> Result<()> {
        // 1/tau must be finite too: a subnormal tau would turn every logit into +-inf or NaN.
        if !(self.temperature.is_finite() && self.temperature > 0.0 && (1.0 / self.temperature).is_finite()) {
            return Err(TpoError::BadConfig {
                name: "temperature",
                requirement: "finite and > 0, with 1/temperature finite (temperature >= 2^-1022)",
                got: self.temperature,
            });
        }
        Ok(())
    }
}

/// Per-token results of [`token_logprobs`].
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// `logp_t` of the sampled token.
    pub logp: Vec<f64>,
    /// `lse_t = row_max_t + log_sum_t` of the tempered logits, rounded to one `f64`. Past
    /// `|s| ~ 1e16` the rounding swallows `log_sum_t`; use the two parts for exact work.
    pub lse: Vec<f64>,
    /// `row_max_t = max_v s_{t,v}`, the first part of `lse_t` (the kernels keep the same split,
    /// with the maximum of the raw logits `z`, i.e. `tau` times this).
    pub row_max: Vec<f64>,
    /// `log_sum_t = ln sum_v exp(s_{t,v} - row_max_t)`, in `[0, ln V]`: the second part of `lse_t`,
    /// so `p_{t,v} = exp((s_{t,v} - row_max_t) - log_sum_t)` for the computed `s` at any magnitude
    /// (`lse_t` as one number loses `log_sum_t` once `|s|` is past ~1e16).
    pub log_sum: Vec<f64>,
    /// `entropy_t`, when asked for.
    pub entropy: Option<Vec<f64>>,
}

fn check_tokens(name: &'static str, tokens: &[u32], n: usize, vocab: usize) -> Result<()> {
    if tokens.len() != n {
        return Err(TpoError::LengthMismatch { name, got: tokens.len(), expected: n });
    }
    if let Some(t) = tokens.iter().position(|&y| y as usize >= vocab) {
        return Err(TpoError::BadConfig {
            name: "token id (must be < vocabulary size)",
            requirement: "in range",
            got: f64::from(tokens[t]),
        });
    }
    Ok(())
}

fn rows<T: Scalar>(logits: &[T], vocab: usize) -> Result<usize> {
    if vocab == 0 {
        return Err(TpoError::BadConfig { name: "vocabulary size", requirement: ">= 1", got: 0.0 });
    }
    if !logits.len().is_multiple_of(vocab) {
        return Err(TpoError::LengthMismatch {
            name: "logits",
            got: logits.len(),
            expected: (logits.len() / vocab + 1) * vocab,
        });
    }
    Ok(logits.len() / vocab)
}

/// Token log-probs (and log-sum-exp, and optionally entropy) from logits `[T, V]`.
///
/// Logits may be `-inf` (masked vocabulary entries) but not NaN or `+inf`, and the sampled
/// token's logit must be finite.
pub fn token_logprobs<T: Scalar>(
    logits: &[T],
    vocab: usize,
    tokens: &[u32],
    cfg: &TokenConfig,
) -> Result<TokenLogprobs> {
    cfg.validate()?;
    let n = rows(logits, vocab)?;
    check_tokens("tokens", tokens, n, vocab)?;
    let mut out = TokenLogprobs {
        logp: Vec::with_capacity(n),
        lse: Vec::with_capacity(n),
        row_max: Vec::with_capacity(n),
        log_sum: Vec::with_capacity(n),
        entropy: cfg.entropy.then(|| Vec::with_capacity(n)),
    };
    let mut s = vec![0.0; vocab];
    for t in 0..n {
        for (v, x) in logits[t * vocab..(t + 1) * vocab].iter().enumerate() {
            let z = x.to_f64();
            if z.is_nan() || z == f64::INFINITY {
                return Err(TpoError::NonFinite {
                    name: "logits",
                    index: t * vocab + v,
                    value: z,
                    allowed: "logits must be finite, or -inf to mask a vocabulary entry",
                });
            }
            // s = z / tau, divided (not z * (1/tau)) as documented: at |s| past ~1e16 one rounding
            // of s moves log p by more than 1, so the two roundings must not differ.
            s[v] = z / cfg.temperature;
            if s[v].is_infinite() && z.is_finite() {
                return Err(TpoError::NonFinite {
                    name: "logits",
                    index: t * vocab + v,
                    value: z,
                    allowed: "logit / temperature overflows f64: raise the temperature or rescale the logits",
                });
            }
        }
        let y = tokens[t] as usize;
        if s[y] == f64::NEG_INFINITY {
            return Err(TpoError::NonFinite {
                name: "logits",
                index: t * vocab + y,
                value: f64::NEG_INFINITY,
                allowed: "the sampled token's logit must be finite (its log-prob would be -inf)",
            });
        }
        // log p_y = (s_y - max) - ln S: forming max + ln S first would lose ln S for |s| past ~1e16.
        let (mx, ln_s) = super::logsumexp_parts(&s);
        let lse = mx + ln_s;
        if s[y] - mx == f64::NEG_INFINITY {
            return Err(TpoError::NonFinite {
                name: "logits",
                index: t * vocab + y,
                value: s[y],
                allowed: "the sampled token's logit / temperature is more than f64::MAX below the row's maximum (its log-prob is past f64's range)",
            });
        }
        out.logp.push((s[y] - mx) - ln_s);
        out.lse.push(lse);
        out.row_max.push(mx);
        out.log_sum.push(ln_s);
        if let Some(e) = out.entropy.as_mut() {
            // H = lse - sum_v p_v s_v = ln S - sum_v p_v (s_v - max), every term relative to max.
            // A member more than f64::MAX below the maximum (d = -inf) has p = 0 and adds nothing.
            let mean_d: f64 =
                s.iter().map(|&x| x - mx).filter(|d| d.is_finite()).map(|d| (d - ln_s).exp() * d).sum();
            e.push(ln_s - mean_d);
        }
    }
    Ok(out)
}

/// Masked per-sequence reduction of token log-probs (`seqs` partitions the tokens).
pub fn sequence_logprobs(
    token_logp: &[f64],
    seqs: &GroupLayout,
    mask: &[bool],
    reduce: SeqReduce,
) -> Result<Vec<f64>> {
    seqs.check_len("token log-probs", token_logp.len())?;
    seqs.check_len("mask", mask.len())?;
    Ok(seqs
        .ranges()
        .map(|r| {
            let n = r.clone().filter(|&t| mask[t]).count();
            let s: f64 = r.filter(|&t| mask[t]).map(|t| token_logp[t]).sum();
            match reduce {
                SeqReduce::Sum => s,
                SeqReduce::Mean if n == 0 => 0.0,
                SeqReduce::Mean => s / n as f64,
            }
        })
        .collect())
}

/// Broadcasts per-sequence gradients `G_i` to per-token upstream gradients `g_t`.
pub fn token_grad_from_sequences(
    seq_grad: &[f64],
    seqs: &GroupLayout,
    mask: &[bool],
    reduce: SeqReduce,
) -> Result<Vec<f64>> {
    if seq_grad.len() != seqs.num_groups() {
        return Err(TpoError::LengthMismatch {
            name: "sequence gradient",
            got: seq_grad.len(),
            expected: seqs.num_groups(),
        });
    }
    seqs.check_len("mask", mask.len())?;
    let mut g = vec![0.0; seqs.len()];
    for (i, r) in seqs.ranges().enumerate() {
        let n = r.clone().filter(|&t| mask[t]).count();
        let w = match reduce {
            SeqReduce::Sum => seq_grad[i],
            SeqReduce::Mean if n == 0 => 0.0,
            SeqReduce::Mean => seq_grad[i] / n as f64,
        };
        for t in r.filter(|&t| mask[t]) {
            g[t] = w;
        }
    }
    Ok(g)
}

/// `dL/dz_{t,v} = g_t (1{v = y_t} - softmax(z_t / tau)_v) / tau` for any per-token upstream `g`.
pub fn logits_grad<T: Scalar>(
    logits: &[T],
    vocab: usize,
    tokens: &[u32],
    token_grad: &[f64],
    cfg: &TokenConfig,
) -> Result<Vec<f64>> {
    let tl = token_logprobs(logits, vocab, tokens, &TokenConfig { entropy: false, ..*cfg })?;
    if token_grad.len() != tl.logp.len() {
        return Err(TpoError::LengthMismatch {
            name: "token gradient",
            got: token_grad.len(),
            expected: tl.logp.len(),
        });
    }
    if let Some(t) = token_grad.iter().position(|g| !g.is_finite()) {
        return Err(TpoError::NonFinite {
            name: "token gradient",
            index: t,
            value: token_grad[t],
            allowed: "the upstream gradient must be finite",
        });
    }
    let tau = cfg.temperature;
    let mut d = vec![0.0; logits.len()];
    for t in 0..tl.logp.len() {
        let g = token_grad[t];
        // p_v = exp((s_v - max) - ln S) with token_logprobs' own two parts (not exp(s_v - lse)).
        let (mx, ln_s) = (tl.row_max[t], tl.log_sum[t]);
        for v in 0..vocab {
            let s = logits[t * vocab + v].to_f64() / tau;
            let p = if s == f64::NEG_INFINITY { 0.0 } else { ((s - mx) - ln_s).exp() };
            let onehot = if v == tokens[t] as usize { 1.0 } else { 0.0 };
            // (g / tau) first: g * (1 - p) in the subnormal range keeps few digits, which the
            // division by a tiny tau would then magnify; g * (...) / tau only where g / tau alone
            // overflows (every |onehot - p| <= 1).
            let x = if (g / tau).is_finite() { (g / tau) * (onehot - p) } else { g * (onehot - p) / tau };
            if !x.is_finite() {
                return Err(TpoError::NonFinite {
                    name: "logits gradient",
                    index: t * vocab + v,
                    value: x,
                    allowed: "token gradient / temperature overflows f64: scale the upstream gradient down",
                });
            }
            d[t * vocab + v] = x;
        }
    }
    Ok(d)
}

/// `z = h W^T`: logits `[T, V]` from hidden states `h [T, H]` and the lm_head `W [V, H]`.
pub fn linear_logits<T: Scalar>(hidden: &[T], weight: &[T], dim: usize) -> Result<Vec<f64>> {
    if dim == 0 || !hidden.len().is_multiple_of(dim) || !weight.len().is_multiple_of(dim) {
        return Err(TpoError::BadConfig {
            name: "hidden size (must divide the hidden states' and the weight's lengths)",
            requirement: "a divisor",
            got: dim as f64,
        });
    }
    let (n, vocab) = (hidden.len() / dim, weight.len() / dim);
    let len = n.checked_mul(vocab).ok_or_else(|| {
        TpoError::SizeOverflow(format!("{n} tokens x {vocab} vocabulary entries of logits"))
    })?;
    let mut z = vec![0.0; len];
    for t in 0..n {
        for v in 0..vocab {
            z[t * vocab + v] =
                (0..dim).map(|k| hidden[t * dim + k].to_f64() * weight[v * dim + k].to_f64()).sum();
        }
    }
    Ok(z)
}

/// The sequence side of a batch: sampled tokens packed into sequences, which form the groups.
#[derive(Debug, Clone, Copy)]
pub struct SequenceBatch<'a> {
    /// Sampled token ids `[T]`.
    pub tokens: &'a [u32],
    /// Sequences as ranges of tokens (cu_seqlens-style; a [`GroupLayout`] over the `T` tokens).
    pub seqs: &'a GroupLayout,
    /// Completion mask `[T]`: `true` for tokens that count towards `l_i`.
    pub mask: &'a [bool],
    /// Groups (prompts) as ranges of sequences (a [`GroupLayout`] over the sequences).
    pub groups: &'a GroupLayout,
}

/// Token, target and fit configuration of the end-to-end calls.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PathConfig {
    /// Temperature, entropy and sequence reduction.
    pub tokens: TokenConfig,
    /// How the target is built (unused with a stored target).
    pub target: TargetConfig,
    /// Loss form, reduction, upstream scale, diagnostics.
    pub fit: FitConfig,
}

/// Where the group target comes from in the end-to-end calls.
#[derive(Debug, Clone, Copy)]
pub enum TargetSource<'a> {
    /// First epoch, on-policy: the target is built from the sequence log-probs themselves.
    OnPolicy {
        /// One score per sequence.
        scores: &'a [f64],
    },
    /// First epoch with the rollout engine's sequence log-probs.
    Rollout {
        /// `l_old`, one per sequence.
        logp_old: &'a [f64],
        /// One score per sequence.
        scores: &'a [f64],
    },
    /// A later epoch: the target stored at rollout.
    Stored {
        /// `q`, one per sequence.
        target: &'a [f64],
    },
}

/// The middle of the end-to-end paths, from token log-probs to per-token upstream gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPath {
    /// `l_i = sum (or mean) over sequence i's completion tokens of logp_t`.
    pub seq_logp: Vec<f64>,
    /// The target `q` used (built here or the stored one).
    pub target: Vec<f64>,
    /// Loss, per-group loss, `dL/dl` per sequence, diagnostics.
    pub fit: FitOutput,
    /// `g_t = dL/dlogp_t`: `dL/dl_i` (divided by the completion length for a mean) on sequence
    /// `i`'s completion tokens, 0 elsewhere.
    pub token_grad: Vec<f64>,
}

/// From token log-probs `[T]` to the per-token upstream gradient: the sequence sums, the TPO group
/// loss over the batch's groups (building the target from `source`, or fitting a stored one), and
/// the broadcast of `dL/dl` back to the tokens.
pub fn group_path(
    token_logp: &[f64],
    batch: &SequenceBatch,
    source: TargetSource,
    cfg: &PathConfig,
) -> Result<GroupPath> {
    let SequenceBatch { seqs, mask, groups, .. } = *batch;
    let (reduce, tcfg, fcfg) = (cfg.tokens.reduce, &cfg.target, &cfg.fit);
    seqs.check_len("tokens", token_logp.len())?;
    if groups.len() != seqs.num_groups() {
        return Err(TpoError::LengthMismatch {
            name: "sequences (the group layout counts sequences)",
            got: seqs.num_groups(),
            expected: groups.len(),
        });
    }
    let l = sequence_logprobs(token_logp, seqs, mask, reduce)?;
    let (q, fit) = match source {
        TargetSource::OnPolicy { scores } => {
            let r = target_and_fit(&l, None, scores, groups, tcfg, fcfg)?;
            (r.target, r.fit)
        }
        TargetSource::Rollout { logp_old, scores } => {
            let r = target_and_fit(&l, Some(logp_old), scores, groups, tcfg, fcfg)?;
            (r.target, r.fit)
        }
        TargetSource::Stored { target: q } => (q.to_vec(), fit(&l, q, groups, fcfg)?),
    };
    let g = token_grad_from_sequences(&fit.grad, seqs, mask, reduce)?;
    Ok(GroupPath { seq_logp: l, target: q, fit, token_grad: g })
}

/// Result of [`tpo_from_logits`].
#[derive(Debug, Clone, PartialEq)]
pub struct LogitsPath {
    /// Token log-probs, lse and entropy.
    pub tokens: TokenLogprobs,
    /// `l_i` per sequence.
    pub seq_logp: Vec<f64>,
    /// The target `q` used (built here or the stored one).
    pub target: Vec<f64>,
    /// Loss, per-group loss, `dL/dl` per sequence, diagnostics.
    pub fit: FitOutput,
    /// `g_t`, the per-token upstream gradient.
    pub token_grad: Vec<f64>,
    /// `dL/dz`, shaped like the logits.
    pub grad_logits: Vec<f64>,
}

/// The whole path from logits `[T, vocab]` to the gradient the model needs: token log-probs,
/// sequence sums, the TPO group loss over the batch's groups and the backward.
pub fn tpo_from_logits<T: Scalar>(
    logits: &[T],
    vocab: usize,
    batch: &SequenceBatch,
    source: TargetSource,
    cfg: &PathConfig,
) -> Result<LogitsPath> {
    let tl = token_logprobs(logits, vocab, batch.tokens, &cfg.tokens)?;
    let GroupPath { seq_logp, target, fit, token_grad } = group_path(&tl.logp, batch, source, cfg)?;
    let grad_logits = logits_grad(logits, vocab, batch.tokens, &token_grad, &cfg.tokens)?;
    Ok(LogitsPath { tokens: tl, seq_logp, target, fit, token_grad, grad_logits })
}

/// Result of [`tpo_from_hidden`]: the logits path plus the gradients of the linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenPath {
    /// Everything [`tpo_from_logits`] returns (on the logits `h W^T`).
    pub logits_path: LogitsPath,
    /// `dL/dh`, shaped like the hidden states `[T, H]`.
    pub grad_hidden: Vec<f64>,
    /// `dL/dW`, shaped like the weight `[V, H]`.
    pub grad_weight: Vec<f64>,
}

/// [`tpo_from_logits`] on `z = h W^T` (hidden states `[T, dim]`, weight `[V, dim]`), with the
/// backward through the linear layer.
pub fn tpo_from_hidden<T: Scalar>(
    hidden: &[T],
    weight: &[T],
    dim: usize,
    batch: &SequenceBatch,
    source: TargetSource,
    cfg: &PathConfig,
) -> Result<HiddenPath> {
    let z = linear_logits(hidden, weight, dim)?;
    let vocab = weight.len() / dim;
    let lp = tpo_from_logits(&z, vocab, batch, source, cfg)?;
    let n = hidden.len() / dim;
    let mut gh = vec![0.0; hidden.len()];
    let mut gw = vec![0.0; weight.len()];
    for t in 0..n {
        for v in 0..vocab {
            let d = lp.grad_logits[t * vocab + v];
            if d == 0.0 {
                continue;
            }
            for k in 0..dim {
                gh[t * dim + k] += d * weight[v * dim + k].to_f64();
                gw[v * dim + k] += d * hidden[t * dim + k].to_f64();
            }
        }
    }
    // Finite logits gradients times finite h and W can still sum past f64's range (or to
    // inf - inf = NaN): refuse rather than return them.
    for (name, g) in [("dL/dh", &gh), ("dL/dW", &gw)] {
        if let Some(i) = g.iter().position(|x| !x.is_finite()) {
            return Err(TpoError::Overflow {
                method: "tpo_from_hidden",
                place: format!("{name}[{i}]"),
                cause: "the logits gradient times the weight or hidden states sums past f64's range: rescale them",
            });
        }
    }
    Ok(HiddenPath { logits_path: lp, grad_hidden: gh, grad_weight: gw })
}

/// Builds the target for [`TargetSource::Stored`] from sequence log-probs at rollout.
pub fn rollout_target(
    seq_logp_old: &[f64],
    scores: &[f64],
    groups: &GroupLayout,
    cfg: &TargetConfig,
) -> Result<Vec<f64>> {
    target(seq_logp_old, scores, groups, cfg)
}
