//! The `api` fuzz target's input (derived with `arbitrary`) and its driver: one call of the
//! public CPU API on a layout, a configuration and inputs of any dtype, checked by
//! [`crate::checks`].

use crate::checks::{self, Check};
use arbitrary::Arbitrary;
use tpo::cpu::{
    self,
    tokens::{self, PathConfig, SeqReduce, SequenceBatch, TargetSource, TokenConfig},
    Baseline, DgConfig, GrpoConfig, PgConfig,
};
use tpo::{bf16, f16, Anchor, FitConfig, GroupLayout, LossForm, Reduction, Scalar, TargetConfig};

/// The most members (or logits) a case materialises; larger layouts are still built and
/// queried, and given inputs of this length (which must be refused as a length mismatch).
pub const MAX_LEN: usize = 1 << 12;

/// A real number: small, any bit pattern (NaN payloads, subnormals, infinities), a power of ten
/// over the whole f64 range, or a named special value.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Val {
    /// `v / 4`.
    Small(i8),
    /// `f64::from_bits`.
    Bits(u64),
    /// `m * 10^e` with `e` folded into `[-330, 310]`.
    Pow10 { m: i8, e: i16 },
    /// A named value.
    Special(Special),
}

/// Named values at the edges of f64 (and of the narrower types).
#[derive(Arbitrary, Debug, Clone, Copy)]
#[allow(missing_docs)]
pub enum Special {
    Nan,
    Inf,
    NegInf,
    Zero,
    NegZero,
    MinSubnormal,
    MinNormal,
    Max,
    Lowest,
    Epsilon,
    F32Max,
    F16Max,
    One,
    NegOne,
}

impl Val {
    /// The value as f64.
    pub fn get(self) -> f64 {
        match self {
            Val::Small(v) => f64::from(v) / 4.0,
            Val::Bits(b) => f64::from_bits(b),
            Val::Pow10 { m, e } => f64::from(m) * 10f64.powi(i32::from(e).rem_euclid(641) - 330),
            Val::Special(s) => match s {
                Special::Nan => f64::NAN,
                Special::Inf => f64::INFINITY,
                Special::NegInf => f64::NEG_INFINITY,
                Special::Zero => 0.0,
                Special::NegZero => -0.0,
                Special::MinSubnormal => f64::from_bits(1),
                Special::MinNormal => f64::MIN_POSITIVE,
                Special::Max => f64::MAX,
                Special::Lowest => f64::MIN,
                Special::Epsilon => f64::EPSILON,
                Special::F32Max => f64::from(f32::MAX),
                Special::F16Max => 65504.0,
                Special::One => 1.0,
                Special::NegOne => -1.0,
            },
        }
    }
}

/// A size or offset: small, any `u64`, a power of two, or the extremes.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Size {
    /// `0..=255`.
    Small(u8),
    /// Any value.
    Raw(u64),
    /// `2^(p mod 64)`.
    Pow2(u8),
    /// `usize::MAX`.
    Max,
    /// `2^63 - 1`, the largest int64 a tensor can hold.
    I64Max,
}

impl Size {
    /// The size as usize.
    pub fn get(self) -> usize {
        let v: u64 = match self {
            Size::Small(v) => u64::from(v),
            Size::Raw(v) => v,
            Size::Pow2(p) => 1u64 << (p % 64),
            Size::Max => u64::MAX,
            Size::I64Max => i64::MAX as u64,
        };
        usize::try_from(v).unwrap_or(usize::MAX)
    }
}

/// How the group layout is built.
#[derive(Arbitrary, Debug, Clone)]
pub enum LayoutSpec {
    /// [`GroupLayout::uniform`].
    Uniform {
        /// Number of groups.
        groups: Size,
        /// Members per group.
        k: Size,
    },
    /// [`GroupLayout::from_sizes`].
    Sizes(Vec<Size>),
    /// [`GroupLayout::from_offsets`] on the given offsets.
    Offsets(Vec<Size>),
    /// [`GroupLayout::from_offsets`] on the running (wrapping) sums of these sizes, from 0.
    CumulativeOffsets(Vec<Size>),
}

impl LayoutSpec {
    /// Builds the layout (the constructor's result).
    pub fn build(&self) -> tpo::Result<GroupLayout> {
        match self {
            LayoutSpec::Uniform { groups, k } => GroupLayout::uniform(groups.get(), k.get()),
            LayoutSpec::Sizes(s) => GroupLayout::from_sizes(&s.iter().map(|x| x.get()).collect::<Vec<_>>()),
            LayoutSpec::Offsets(o) => GroupLayout::from_offsets(o.iter().map(|x| x.get()).collect()),
            LayoutSpec::CumulativeOffsets(s) => {
                let mut acc = 0usize;
                let mut o = vec![0];
                for x in s {
                    acc = acc.wrapping_add(x.get());
                    o.push(acc);
                }
                GroupLayout::from_offsets(o)
            }
        }
    }
}

/// Storage type of an input.
#[derive(Arbitrary, Debug, Clone, Copy)]
#[allow(missing_docs)]
pub enum Dt {
    F32,
    F64,
    Bf16,
    F16,
}

/// [`TargetConfig`] with every field drawn.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct TargetSpec {
    /// `eta`.
    pub eta: Val,
    /// `zero_std_threshold`: the default `1e-6` or a drawn value.
    pub zero_std_threshold: Option<Val>,
    /// The no-anchor ablation.
    pub no_anchor: bool,
}

impl TargetSpec {
    /// The configuration.
    pub fn get(&self) -> TargetConfig {
        TargetConfig {
            eta: self.eta.get(),
            zero_std_threshold: self.zero_std_threshold.map_or(1e-6, Val::get),
            anchor: if self.no_anchor { Anchor::NoAnchor } else { Anchor::Anchored },
        }
    }
}

/// [`FitConfig`] with every field drawn.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct FitSpec {
    /// KL instead of cross-entropy.
    pub kl: bool,
    /// `None`: mean; `Some(None)`: sum; `Some(Some(n))`: global mean over `n`.
    pub reduction: Option<Option<Val>>,
    /// `grad_scale` (1 when `None`).
    pub grad_scale: Option<Val>,
    /// Per-group diagnostics.
    pub diagnostics: bool,
}

impl FitSpec {
    /// The configuration.
    pub fn get(&self) -> FitConfig {
        FitConfig {
            form: if self.kl { LossForm::Kl } else { LossForm::CrossEntropy },
            reduction: match self.reduction {
                None => Reduction::Mean,
                Some(None) => Reduction::Sum,
                Some(Some(n)) => Reduction::GlobalMean(n.get()),
            },
            grad_scale: self.grad_scale.map_or(1.0, Val::get),
            diagnostics: self.diagnostics,
        }
    }
}

/// Where `fit` gets its stored target.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum TargetInput {
    /// `cpu::target(logp_old, scores)` with this configuration (skipped if it fails), stored in
    /// the scores' dtype.
    Built(TargetSpec),
    /// The `logp_old` values read as a target (usually refused).
    Raw,
    /// `1 / K` on every member.
    Uniform,
}

/// A baseline's advantage baseline.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum BaselineSpec {
    /// The group mean.
    Mean,
    /// A constant.
    Constant(Val),
}

impl BaselineSpec {
    fn get(self) -> Baseline {
        match self {
            BaselineSpec::Mean => Baseline::GroupMean,
            BaselineSpec::Constant(c) => Baseline::Constant(c.get()),
        }
    }
}

/// The token-level calls: sequences of tokens over a vocabulary, grouped by the case's layout.
#[derive(Arbitrary, Debug, Clone)]
pub struct TokenSpec {
    /// Vocabulary size.
    pub vocab: Size,
    /// Sampling temperature.
    pub temperature: Val,
    /// Compute the entropy.
    pub entropy: bool,
    /// Length-normalised sequence log-probs.
    pub mean: bool,
    /// Sequence lengths, cycled over the sequences (`0` is kept: an empty sequence).
    pub seq_lens: Vec<u8>,
    /// Sampled token ids, cycled; taken modulo the vocabulary unless `raw_tokens`.
    pub tokens: Vec<u32>,
    /// Keep the token ids as drawn (out-of-range ids must be refused).
    pub raw_tokens: bool,
    /// Completion mask, cycled (all true when empty).
    pub mask: Vec<bool>,
    /// Hidden size for the from-hidden path.
    pub dim: u8,
    /// Which call.
    pub call: TokenCall,
}

/// A token-level entry point.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum TokenCall {
    /// [`tokens::token_logprobs`].
    Logprobs,
    /// [`tokens::logits_grad`] with the case's `scores` as per-token upstream gradients.
    LogitsGrad,
    /// [`tokens::group_path`] on the token log-probs.
    GroupPath(Source),
    /// [`tokens::tpo_from_logits`].
    FromLogits(Source),
    /// [`tokens::tpo_from_hidden`].
    FromHidden(Source),
}

/// Which [`TargetSource`].
#[derive(Arbitrary, Debug, Clone, Copy)]
#[allow(missing_docs)]
pub enum Source {
    OnPolicy,
    Rollout,
    Stored,
}

/// The call under test.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// [`cpu::target`].
    Target(TargetSpec),
    /// [`cpu::fit`] of `logp` to a stored target.
    Fit(TargetInput, FitSpec),
    /// [`cpu::target_and_fit`], with `logp_old` or on-policy.
    TargetAndFit {
        /// Pass `logp_old` (else on-policy).
        with_old: bool,
        /// Target configuration.
        target: TargetSpec,
        /// Fit configuration.
        fit: FitSpec,
    },
    /// [`cpu::reinforce`].
    Reinforce(BaselineSpec, FitSpec),
    /// [`cpu::grpo`].
    Grpo {
        /// `clip_eps`.
        clip_eps: Val,
        /// `beta`.
        beta: Val,
        /// `zero_std_threshold`.
        zero_std_threshold: Val,
        /// Fit configuration.
        fit: FitSpec,
    },
    /// [`cpu::dg`].
    Dg {
        /// `eta`.
        eta: Val,
        /// Advantage baseline.
        baseline: BaselineSpec,
        /// Fit configuration.
        fit: FitSpec,
    },
    /// The token-level calls ([`cpu::tokens`]).
    Tokens(Box<TokenSpec>, TargetSpec, FitSpec),
}

/// One fuzz case.
///
/// Decoded (`Arbitrary`) as a header (layout, dtypes, lengths, call) followed by as many values as
/// the input has left, dealt in turn to `logp_old`, `scores` and `logp`: the fuzzer then gets
/// long, varied inputs from few bytes.
#[derive(Debug, Clone)]
pub struct Case {
    /// The groups.
    pub layout: LayoutSpec,
    /// Storage type of the log-probs (and logits, hidden states, weights).
    pub logp_dtype: Dt,
    /// Storage type of the scores (and of a stored target).
    pub scores_dtype: Dt,
    /// Values cycled into `logp` (empty: all zero).
    pub logp: Vec<Val>,
    /// Values cycled into `logp_old`.
    pub logp_old: Vec<Val>,
    /// Values cycled into `scores`.
    pub scores: Vec<Val>,
    /// Give `logp` this many elements instead of the layout's length.
    pub wrong_len: Option<u16>,
    /// The call.
    pub op: Op,
}

#[derive(Arbitrary)]
struct Head {
    layout: LayoutSpec,
    logp_dtype: Dt,
    scores_dtype: Dt,
    wrong_len: Option<u16>,
    op: Op,
}

impl Case {
    fn from_parts(h: Head, values: Vec<Val>) -> Self {
        let deal = |k: usize| values.iter().skip(k).step_by(3).copied().collect::<Vec<_>>();
        Case {
            layout: h.layout,
            logp_dtype: h.logp_dtype,
            scores_dtype: h.scores_dtype,
            logp_old: deal(0),
            scores: deal(1),
            logp: deal(2),
            wrong_len: h.wrong_len,
            op: h.op,
        }
    }
}

impl<'a> Arbitrary<'a> for Case {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let h = Head::arbitrary(u)?;
        let values = Vec::<Val>::arbitrary(u)?;
        Ok(Self::from_parts(h, values))
    }

    fn arbitrary_take_rest(mut u: arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let h = Head::arbitrary(&mut u)?;
        // Every remaining byte goes to values (no continuation flags), so that input length
        // turns straight into data.
        let mut values = Vec::new();
        while !u.is_empty() {
            values.push(Val::arbitrary(&mut u)?);
        }
        Ok(Self::from_parts(h, values))
    }
}

/// `n` values cycled from `v` (zeros when `v` is empty).
fn cycle(v: &[Val], n: usize) -> Vec<f64> {
    if v.is_empty() {
        return vec![0.0; n];
    }
    (0..n).map(|i| v[i % v.len()].get()).collect()
}

fn conv<T: Scalar>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

fn widen<T: Scalar>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// Runs the case; `Err` names the violated invariant.
pub fn run(case: &Case) -> Check {
    let layout = case.layout.build();
    checks::outcome("layout", &layout, layout_invariants)?;
    let Ok(layout) = layout else { return Ok(()) };
    let n = layout.len().min(MAX_LEN);
    match (case.logp_dtype, case.scores_dtype) {
        (Dt::F32, s) => with_scores::<f32>(case, &layout, n, s),
        (Dt::F64, s) => with_scores::<f64>(case, &layout, n, s),
        (Dt::Bf16, s) => with_scores::<bf16>(case, &layout, n, s),
        (Dt::F16, s) => with_scores::<f16>(case, &layout, n, s),
    }
}

fn with_scores<L: Scalar>(case: &Case, layout: &GroupLayout, n: usize, s: Dt) -> Check {
    match s {
        Dt::F32 => typed::<L, f32>(case, layout, n),
        Dt::F64 => typed::<L, f64>(case, layout, n),
        Dt::Bf16 => typed::<L, bf16>(case, layout, n),
        Dt::F16 => typed::<L, f16>(case, layout, n),
    }
}

/// What a valid layout must say about itself (only what is cheap for huge layouts).
// `len() == 0` on purpose: `is_empty()` is a constant `false`, the length is what is checked.
#[allow(clippy::len_zero)]
fn layout_invariants(l: &GroupLayout) -> Check {
    let b = l.num_groups();
    if b == 0 || l.is_empty() || l.len() == 0 {
        return Err(format!("a valid layout with {b} groups and {} members", l.len()));
    }
    let maxk = l.max_group_size();
    if maxk == 0 || maxk > l.len() {
        return Err(format!("max_group_size {maxk} of a layout of {} members", l.len()));
    }
    if let Some(k) = l.uniform_size() {
        if k != maxk || k.checked_mul(b) != Some(l.len()) {
            return Err(format!("uniform layout: K = {k}, B = {b}, N = {}", l.len()));
        }
    }
    if b <= MAX_LEN {
        let o = l.offsets();
        if o.len() != b + 1 || o[0] != 0 || o[b] != l.len() {
            return Err(format!("offsets {o:?} of a layout of {b} groups and {} members", l.len()));
        }
        for g in 0..b {
            if l.range(g) != (o[g]..o[g + 1]) || o[g + 1] <= o[g] {
                return Err(format!("group {g}: range {:?}, offsets {}..{}", l.range(g), o[g], o[g + 1]));
            }
        }
    }
    Ok(())
}

fn typed<L: Scalar, S: Scalar>(case: &Case, layout: &GroupLayout, n: usize) -> Check {
    let nl = case.wrong_len.map_or(n, usize::from);
    let logp: Vec<L> = conv(&cycle(&case.logp, nl));
    let logp_old: Vec<L> = conv(&cycle(&case.logp_old, n));
    let scores: Vec<S> = conv(&cycle(&case.scores, n));
    match &case.op {
        Op::Target(t) => {
            let r = cpu::target(&logp_old, &scores, layout, &t.get());
            checks::outcome("target", &r, |q| checks::target(q, &widen(&logp_old), layout))
        }
        Op::Fit(src, f) => {
            let q: Vec<S> = match src {
                TargetInput::Built(t) => match cpu::target(&logp_old, &scores, layout, &t.get()) {
                    Ok(q) => conv(&q),
                    Err(_) => return Ok(()),
                },
                TargetInput::Raw => conv(&widen(&logp_old)),
                TargetInput::Uniform => {
                    let mut q = vec![0.0; n];
                    if n == layout.len() {
                        for r in layout.ranges() {
                            let k = r.len() as f64;
                            q[r].iter_mut().for_each(|x| *x = 1.0 / k);
                        }
                    }
                    conv(&q)
                }
            };
            let cfg = f.get();
            let r = cpu::fit(&logp, &q, layout, &cfg);
            checks::outcome("fit", &r, |o| checks::fit(o, &widen(&q), layout, &cfg))
        }
        Op::TargetAndFit { with_old, target, fit } => {
            let old = with_old.then_some(logp_old.as_slice());
            let cfg = fit.get();
            let r = cpu::target_and_fit(&logp, old, &scores, layout, &target.get(), &cfg);
            let l_old = widen(old.unwrap_or(&logp));
            checks::built_target_outcome("target_and_fit", &r, |o| {
                checks::target_and_fit(o, &l_old, layout, &cfg)
            })
        }
        Op::Reinforce(b, f) => {
            let r = cpu::reinforce(&logp, &scores, layout, &PgConfig { baseline: b.get() }, &f.get());
            checks::outcome("reinforce", &r, |o| checks::baseline(o, layout))
        }
        Op::Grpo { clip_eps, beta, zero_std_threshold, fit } => {
            let cfg = GrpoConfig {
                clip_eps: clip_eps.get(),
                beta: beta.get(),
                zero_std_threshold: zero_std_threshold.get(),
            };
            let r = cpu::grpo(&logp, &logp_old, &scores, layout, &cfg, &fit.get());
            checks::outcome("grpo", &r, |o| checks::baseline(o, layout))
        }
        Op::Dg { eta, baseline, fit } => {
            let cfg = DgConfig { eta: eta.get(), baseline: baseline.get() };
            let r = cpu::dg(&logp, &logp_old, &scores, layout, &cfg, &fit.get());
            checks::outcome("dg", &r, |o| checks::baseline(o, layout))
        }
        Op::Tokens(t, target, fit) => {
            let cfg = PathConfig { tokens: token_config(t), target: target.get(), fit: fit.get() };
            token_case::<L>(case, t, &cfg, layout, n)
        }
    }
}

fn token_config(t: &TokenSpec) -> TokenConfig {
    TokenConfig {
        temperature: t.temperature.get(),
        entropy: t.entropy,
        reduce: if t.mean { SeqReduce::Mean } else { SeqReduce::Sum },
    }
}

/// The token-level calls. The case's layout groups the sequences (one sequence per member);
/// `seq_lens` gives each sequence's tokens.
fn token_case<L: Scalar>(
    case: &Case,
    t: &TokenSpec,
    cfg: &PathConfig,
    groups: &GroupLayout,
    n: usize,
) -> Check {
    let vocab = t.vocab.get();
    let nseq = n;
    let lens: Vec<usize> = (0..nseq)
        .map(|i| if t.seq_lens.is_empty() { 1 } else { usize::from(t.seq_lens[i % t.seq_lens.len()]) })
        .collect();
    let ntok: usize = lens.iter().sum();
    let seqs = GroupLayout::from_sizes(&lens);
    checks::outcome("token layout", &seqs, |_| Ok(()))?;
    let Ok(seqs) = seqs else { return Ok(()) };
    let cells = ntok.saturating_mul(vocab.max(1)).max(ntok.saturating_mul(usize::from(t.dim)));
    if cells > MAX_LEN * 4 || ntok == 0 {
        // Still exercise the argument checks on a huge vocabulary with no logits.
        if cells > MAX_LEN * 4 {
            let logits: Vec<L> = conv(&cycle(&case.logp, MAX_LEN));
            let r = tokens::token_logprobs(&logits, vocab, &[0u32], &cfg.tokens);
            checks::outcome("token_logprobs", &r, |_| Ok(()))?;
        }
        return Ok(());
    }
    let logits: Vec<L> = conv(&cycle(&case.logp, ntok * vocab));
    let toks: Vec<u32> = (0..ntok)
        .map(|i| {
            let y = t.tokens.get(i % t.tokens.len().max(1)).copied().unwrap_or(0);
            if t.raw_tokens || vocab == 0 {
                y
            } else {
                (y as usize % vocab) as u32
            }
        })
        .collect();
    let mask: Vec<bool> =
        (0..ntok).map(|i| if t.mask.is_empty() { true } else { t.mask[i % t.mask.len()] }).collect();
    let scores = cycle(&case.scores, nseq);
    let logp_old = cycle(&case.logp_old, nseq);
    let stored = groups_target(&logp_old, &scores, groups, &cfg.target);
    let batch = SequenceBatch { tokens: &toks, seqs: &seqs, mask: &mask, groups };
    let source = |s: Source| -> Option<TargetSource<'_>> {
        Some(match s {
            Source::OnPolicy => TargetSource::OnPolicy { scores: &scores },
            Source::Rollout => TargetSource::Rollout { logp_old: &logp_old, scores: &scores },
            Source::Stored => TargetSource::Stored { target: stored.as_deref()? },
        })
    };
    let tau = cfg.tokens.temperature;
    let tempered: Vec<f64> = logits.iter().map(|x| x.to_f64() / tau).collect();
    match t.call {
        TokenCall::Logprobs => {
            let r = tokens::token_logprobs(&logits, vocab, &toks, &cfg.tokens);
            checks::outcome("token_logprobs", &r, |tl| checks::token_logprobs(tl, &tempered, vocab))
        }
        TokenCall::LogitsGrad => {
            let g = cycle(&case.scores, ntok);
            let r = tokens::logits_grad(&logits, vocab, &toks, &g, &cfg.tokens);
            checks::outcome("logits_grad", &r, |d| checks::logits_grad(d, &g, vocab, tau))
        }
        TokenCall::GroupPath(s) => {
            let Some(src) = source(s) else { return Ok(()) };
            let tl = match tokens::token_logprobs(&logits, vocab, &toks, &cfg.tokens) {
                Ok(tl) => tl,
                Err(_) => return Ok(()),
            };
            let r = tokens::group_path(&tl.logp, &batch, src, cfg);
            built(s, "group_path", &r, |p| {
                path_checks(&p.seq_logp, &p.target, &p.fit, &p.token_grad, s, &logp_old, groups, cfg)
            })
        }
        TokenCall::FromLogits(s) => {
            let Some(src) = source(s) else { return Ok(()) };
            let r = tokens::tpo_from_logits(&logits, vocab, &batch, src, cfg);
            built(s, "tpo_from_logits", &r, |p| {
                checks::token_logprobs(&p.tokens, &tempered, vocab)?;
                path_checks(&p.seq_logp, &p.target, &p.fit, &p.token_grad, s, &logp_old, groups, cfg)?;
                checks::logits_grad(&p.grad_logits, &p.token_grad, vocab, tau)
            })
        }
        TokenCall::FromHidden(s) => {
            let Some(src) = source(s) else { return Ok(()) };
            let dim = usize::from(t.dim);
            let hidden: Vec<L> = conv(&cycle(&case.logp, ntok * dim.max(1)));
            let weight: Vec<L> = conv(&cycle(&case.logp_old, vocab * dim.max(1)));
            let r = tokens::tpo_from_hidden(&hidden, &weight, dim, &batch, src, cfg);
            built(s, "tpo_from_hidden", &r, |h| {
                let p = &h.logits_path;
                path_checks(&p.seq_logp, &p.target, &p.fit, &p.token_grad, s, &logp_old, groups, cfg)?;
                checks::all_finite("grad_logits", &p.grad_logits)?;
                checks::all_finite("grad_hidden", &h.grad_hidden)?;
                checks::all_finite("grad_weight", &h.grad_weight)
            })
        }
    }
}

/// [`checks::built_target_outcome`] unless the target is a stored one.
fn built<T>(s: Source, what: &str, r: &tpo::Result<T>, ok: impl FnOnce(&T) -> Check) -> Check {
    match s {
        Source::Stored => checks::outcome(what, r, ok),
        _ => checks::built_target_outcome(what, r, ok),
    }
}

fn groups_target(l_old: &[f64], s: &[f64], groups: &GroupLayout, cfg: &TargetConfig) -> Option<Vec<f64>> {
    let r = tokens::rollout_target(l_old, s, groups, cfg);
    r.ok()
}

#[allow(clippy::too_many_arguments)]
fn path_checks(
    seq_logp: &[f64],
    q: &[f64],
    fit: &tpo::FitOutput,
    token_grad: &[f64],
    s: Source,
    logp_old: &[f64],
    groups: &GroupLayout,
    cfg: &PathConfig,
) -> Check {
    checks::all_finite("seq_logp", seq_logp)?;
    checks::all_finite("token_grad", token_grad)?;
    match s {
        Source::OnPolicy => checks::target(q, seq_logp, groups)?,
        Source::Rollout => checks::target(q, logp_old, groups)?,
        Source::Stored => {}
    }
    checks::fit(fit, q, groups, &cfg.fit)
}
