//! TPO and its baselines as [candle](https://github.com/huggingface/candle) ops with a backward
//! (feature `candle`).
//!
//! Each function here returns a scalar loss [`Tensor`] that candle's autograd differentiates:
//! `loss.backward()?` calls the op's `bwd`, which asks the f64 CPU reference ([`crate::cpu`]) for
//! the gradient, with candle's upstream gradient as [`FitConfig::grad_scale`]. So a trainer that
//! scales the loss, adds other terms to it or accumulates several losses gets exactly the
//! reference's gradient, multiplied by the chain rule. The methods:
//!
//! * [`group_loss`]: TPO on a tensor of sequence log-probs `l [N]` split by a [`GroupLayout`].
//!   Per group, `q = softmax(log_softmax(l_old) + u / eta)` ([`cpu::target`]), held fixed, and
//!   `L = -sum_i q_i log softmax(l)_i` (or `KL(q || p)`); the loss is `w * sum_g L_g` with `w`
//!   from the [`Reduction`](crate::Reduction), and the backward is
//!   `dL/dl = grad_res * w * (sum(q) p - q)`, exactly [`cpu::fit`]'s gradient.
//! * [`loss_from_logits`]: the same loss from logits `z [T, V]` and sampled tokens, with
//!   `l_i = sum_t m_t log softmax(z_t / tau)_{y_t}` over sequence `i`'s completion tokens, and
//!   the backward `dL/dz_{t,v} = g_t (1{v = y_t} - softmax(z_t / tau)_v) / tau`
//!   ([`cpu::tokens::tpo_from_logits`]).
//! * [`policy_loss`]: one call for TPO and the policy-gradient baselines, chosen by a [`Method`]:
//!   REINFORCE ([`cpu::reinforce`]), PPO-clip ([`cpu::ppo`]), GRPO ([`cpu::grpo`]) and DG
//!   ([`cpu::dg`]), so that a trainer switches method by one argument.
//!
//! Inputs may be `f32`, `f64`, `bf16` or `f16` and live on any device: the op copies them to the
//! host, widens them to `f64` (exactly), computes with the reference, and returns the loss in the
//! input's dtype on the input's device; the gradient is rounded once, from `f64`, to the input's
//! dtype. The targets, scores and rollout log-probs are constants (no gradient flows into them).
//! Every error of the library comes back as a candle [`Error::Msg`](candle_core::Error::Msg) with
//! the library's one-line message; nothing panics on bad input.
//!
//! With the feature `candle-cuda` (candle-core's `cuda` beside tpo's `cuda`), [`group_loss`],
//! [`loss_from_logits`] and [`policy_loss`] (TPO through [`group_loss`]'s kernels with the
//! rollout's target, the baselines REINFORCE, PPO-clip, GRPO and DG through theirs) on an
//! `f32`, `bf16` or `f16` CUDA tensor run tpo's fused kernels on candle's CUDA storage and
//! stream, with no host round trip of the tensors (the module `candle_cuda.rs` says how; the
//! target and `seq_logp` are then `f32` tensors on the device; the rollout log-probs are read in
//! the log-probs' dtype, the scores and advantages in `f32`). Every other case (a CPU tensor,
//! `f64`, a Metal device, or a build without `candle-cuda`) takes the
//! host path: the same code for every device, through a
//! host round trip. The CUDA path is type-checked in CI and has not been run yet (no GPU was
//! available; `examples/candle_link` compares it with the CPU path on one); the host path on a
//! device has not been run on one either (the tests run on the CPU).
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use tpo::candle::{group_loss, GroupTarget, LossConfig};
//! use tpo::GroupLayout;
//!
//! let dev = Device::Cpu;
//! // Two prompts with three completions each: their sequence log-probs and scores.
//! let logp = Var::new(&[-3.0f32, -2.5, -4.0, -10.0, -11.0, -9.5], &dev)?;
//! let scores = Tensor::new(&[1.0f32, 0.0, 0.0, 0.2, 0.9, 0.1], &dev)?;
//! let layout = GroupLayout::uniform(2, 3)?;
//!
//! // First epoch, on-policy: the target is built from logp itself and kept for later epochs.
//! let out = group_loss(&logp, &layout, GroupTarget::OnPolicy { scores: &scores }, &LossConfig::default())?;
//! let grads = out.loss.backward()?;
//! let g = grads.get(&logp).expect("logp is a variable").to_vec1::<f32>()?;
//! assert!(g.iter().sum::<f32>().abs() < 1e-6); // p - q sums to zero over each group
//!
//! // A later epoch fits the stored target.
//! let later = group_loss(&logp, &layout, GroupTarget::Stored { target: &out.target }, &LossConfig::default())?;
//! assert_eq!(later.value, out.value);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::config::{FitConfig, TargetConfig};
use crate::cpu::tokens::{self, PathConfig, SequenceBatch, TargetSource};
use crate::cpu::{self, DgConfig, FitOutput, GroupStats, GrpoConfig, PgConfig, PpoConfig};
use crate::error::TpoError;
use crate::layout::GroupLayout;

#[cfg(feature = "candle-cuda")]
#[path = "candle_cuda.rs"]
mod cuda;

/// candle's result type, which every function here returns.
pub type Result<T> = candle_core::Result<T>;

/// A library error as a candle error carrying the library's one-line message (no backtrace
/// appended, whatever `RUST_BACKTRACE` says).
fn err(e: TpoError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Returns a one-line candle error built like `format!`.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err(candle_core::Error::Msg(format!($($arg)*)))
    };
}

/// Where the TPO target `q` comes from.
///
/// Scores and rollout log-probs are per member of the groups (per sequence in
/// [`loss_from_logits`]); any numeric dtype, any device. They are constants of the loss.
#[derive(Debug, Clone, Copy)]
pub enum GroupTarget<'a> {
    /// First epoch, on-policy (`l_old = l`): `q = softmax(log_softmax(l) + u / eta)` is built
    /// from the log-probs being differentiated, detached, so the gradient is `p_old - q`.
    OnPolicy {
        /// One score per member, `[N]`.
        scores: &'a Tensor,
    },
    /// First epoch with the rollout engine's log-probs: `q = softmax(log_softmax(l_old) + u / eta)`.
    Rollout {
        /// `l_old`, `[N]`: finite, or `-inf` to exclude a member.
        logp_old: &'a Tensor,
        /// One score per member, `[N]`.
        scores: &'a Tensor,
    },
    /// A later epoch: the target returned by the first epoch ([`GroupLoss::target`]).
    Stored {
        /// `q`, `[N]`: a distribution over each group.
        target: &'a Tensor,
    },
}

/// How [`group_loss`] builds its target and reduces its loss.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossConfig {
    /// Temperature `eta`, zero-variance threshold and anchoring of the target (unused with
    /// [`GroupTarget::Stored`]).
    pub target: TargetConfig,
    /// Loss form, reduction and diagnostics. `grad_scale` must be 1: the upstream gradient comes
    /// from autograd (scale the loss tensor instead).
    pub fit: FitConfig,
}

/// Result of [`group_loss`].
#[derive(Debug, Clone)]
pub struct GroupLoss {
    /// The scalar loss `w * sum_g L_g`, in the log-probs' dtype and on their device; its
    /// backward is `w * (sum(q) p - q)` times the upstream gradient.
    pub loss: Tensor,
    /// The loss as computed in `f64`.
    pub value: f64,
    /// The target `q`, `[N]`, in `f64` on the CPU (where the op reads it), or in `f32` on the
    /// device for the CUDA path: keep it for later epochs ([`GroupTarget::Stored`]).
    pub target: Tensor,
    /// `L_g` per group, unreduced.
    pub group_loss: Vec<f64>,
    /// Per-group diagnostics when [`FitConfig::diagnostics`] is set (`KL(q || p_old)` included
    /// for the first-epoch targets).
    pub stats: Option<GroupStats>,
}

/// The host copy of a [`GroupTarget`].
#[derive(Debug, Clone)]
enum Source {
    OnPolicy { scores: Vec<f64> },
    Rollout { logp_old: Vec<f64>, scores: Vec<f64> },
    Stored { target: Vec<f64> },
}

impl Source {
    fn read(t: GroupTarget<'_>, n: usize) -> Result<Self> {
        Ok(match t {
            GroupTarget::OnPolicy { scores } => Source::OnPolicy { scores: host(scores, "scores", n)? },
            GroupTarget::Rollout { logp_old, scores } => Source::Rollout {
                logp_old: host(logp_old, "logp_old", n)?,
                scores: host(scores, "scores", n)?,
            },
            GroupTarget::Stored { target } => Source::Stored { target: host(target, "target", n)? },
        })
    }

    fn as_tokens(&self) -> TargetSource<'_> {
        match self {
            Source::OnPolicy { scores } => TargetSource::OnPolicy { scores },
            Source::Rollout { logp_old, scores } => TargetSource::Rollout { logp_old, scores },
            Source::Stored { target } => TargetSource::Stored { target },
        }
    }
}

/// Checks `t` is 1-D with `n` elements and copies it to the host as `f64` (exact for every
/// float and integer dtype up to 2^53).
fn host(t: &Tensor, name: &str, n: usize) -> Result<Vec<f64>> {
    check_1d(t, name, n)?;
    t.detach().to_device(&Device::Cpu)?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

fn check_1d(t: &Tensor, name: &str, n: usize) -> Result<()> {
    if t.rank() != 1 || t.dims()[0] != n {
        fail!("{name} has shape {:?}, the layout expects a 1-D tensor of {n} elements", t.dims());
    }
    Ok(())
}

fn check_float(t: &Tensor, name: &str) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 | DType::BF16 | DType::F16 => Ok(()),
        d => fail!("{name} has dtype {}: expected f32, f64, bf16 or f16", d.as_str()),
    }
}

fn check_unit_scale(fit: &FitConfig) -> Result<()> {
    if fit.grad_scale != 1.0 {
        return Err(err(TpoError::BadConfig {
            name:
                "grad_scale (tpo::candle takes the upstream gradient from autograd: scale the loss instead)",
            requirement: "1",
            got: fit.grad_scale,
        }));
    }
    Ok(())
}

/// The upstream gradient of a scalar loss, as `f64`.
fn upstream(grad_res: &Tensor) -> Result<f64> {
    if grad_res.elem_count() != 1 {
        fail!("tpo::candle: the upstream gradient of a scalar loss has {} elements", grad_res.elem_count());
    }
    let g =
        grad_res.detach().to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(g[0])
}

/// The op's input as a contiguous `f64` slice (the wrappers hand the ops contiguous `f64`).
fn slice_f64<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [f64]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F64(v), Some((a, b))) => Ok(&v[a..b]),
        _ => fail!("tpo::candle: {name} must reach the op as a contiguous f64 tensor"),
    }
}

/// A scalar `f64` output.
fn scalar_out(v: f64) -> (CpuStorage, Shape) {
    (CpuStorage::F64(vec![v]), Shape::from(()))
}

/// Moves `x` to the host in `f64` (differentiably), applies `op`, and brings the scalar back to
/// `x`'s device and dtype.
fn apply_on_host<C: CustomOp1 + Send + Sync + 'static>(x: &Tensor, op: C) -> Result<Tensor> {
    let host = x.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.contiguous()?;
    host.apply_op1(op)?.to_dtype(x.dtype())?.to_device(x.device())
}

/// What an op's forward leaves for its caller and for its backward.
type Slot<T> = Arc<Mutex<Option<T>>>;

/// Takes what the forward left (for the caller, after the forward).
fn take_slot<T>(slot: &Slot<T>) -> Result<T> {
    match slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(v) => Ok(v),
        None => fail!("tpo::candle: the op's forward did not run"),
    }
}

fn put_slot<T>(slot: &Mutex<Option<T>>, v: T) {
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
}

/// The target the forward built, for the backward (which may run more than once).
fn stored_target(slot: &Mutex<Option<Vec<f64>>>) -> Result<Vec<f64>> {
    match slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        Some(q) => Ok(q.clone()),
        None => fail!("tpo::candle: backward before the op's forward"),
    }
}

// ---------------------------------------------------------------------------------------------
// (a) The group loss on sequence log-probs.

struct GroupLossOp {
    layout: GroupLayout,
    source: Source,
    cfg: LossConfig,
    /// The target built by the forward, for the backward.
    q: Mutex<Option<Vec<f64>>>,
    /// The target and the fit of the forward, for the caller.
    out: Slot<(Vec<f64>, FitOutput)>,
}

impl CustomOp1 for GroupLossOp {
    fn name(&self) -> &'static str {
        "tpo-group-loss"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let logp = slice_f64(s, l, "logp")?;
        let (tc, fc, layout) = (&self.cfg.target, &self.cfg.fit, &self.layout);
        let (q, fit) = match &self.source {
            Source::OnPolicy { scores } => {
                let r = cpu::target_and_fit(logp, None, scores, layout, tc, fc).map_err(err)?;
                (r.target, r.fit)
            }
            Source::Rollout { logp_old, scores } => {
                let r = cpu::target_and_fit(logp, Some(logp_old), scores, layout, tc, fc).map_err(err)?;
                (r.target, r.fit)
            }
            Source::Stored { target } => (target.clone(), cpu::fit(logp, target, layout, fc).map_err(err)?),
        };
        let loss = fit.loss;
        put_slot(&self.q, q.clone());
        put_slot(&self.out, (q, fit));
        Ok(scalar_out(loss))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // The fit to the forward's target with the upstream gradient as its scale: the same
        // arithmetic as the reference's `fit` (and `target_and_fit`) with that `grad_scale`.
        let q = stored_target(&self.q)?;
        let fc = FitConfig { grad_scale: upstream(grad_res)?, diagnostics: false, ..self.cfg.fit };
        let logp = arg.flatten_all()?.to_vec1::<f64>()?;
        let g = cpu::fit(&logp, &q, &self.layout, &fc).map_err(err)?.grad;
        Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?))
    }
}

/// The TPO group loss on sequence log-probs `logp [N]` (see the [module](self) docs).
///
/// `logp` is 1-D with `layout.len()` elements, `f32`/`f64`/`bf16`/`f16`, finite or `-inf` (an
/// excluded member, which must then have `q = 0`). Returns the scalar loss, whose backward is
/// `dL/dl = grad_res * w * (sum(q) p - q)`, with the target and the diagnostics.
///
/// Errors: a shape or dtype mismatch, `cfg.fit.grad_scale != 1`, and every error of
/// [`cpu::target_and_fit`] / [`cpu::fit`] (non-finite values, a group all `-inf`, a stored target
/// that is not a distribution, ...), with the library's message.
pub fn group_loss(
    logp: &Tensor,
    layout: &GroupLayout,
    target: GroupTarget<'_>,
    cfg: &LossConfig,
) -> Result<GroupLoss> {
    check_float(logp, "logp")?;
    check_1d(logp, "logp", layout.len())?;
    check_unit_scale(&cfg.fit)?;
    #[cfg(feature = "candle-cuda")]
    if logp.device().is_cuda() && logp.dtype() != DType::F64 {
        return cuda::group_loss(logp, layout, target, cfg);
    }
    let source = Source::read(target, layout.len())?;
    let out = Slot::default();
    let op = GroupLossOp { layout: layout.clone(), source, cfg: *cfg, q: Mutex::default(), out: out.clone() };
    let loss = apply_on_host(logp, op)?;
    let (q, fit) = take_slot(&out)?;
    let n = q.len();
    Ok(GroupLoss {
        loss,
        value: fit.loss,
        target: Tensor::from_vec(q, n, &Device::Cpu)?,
        group_loss: fit.group_loss,
        stats: fit.stats,
    })
}

// ---------------------------------------------------------------------------------------------
// (b) From logits.

/// The token side of a batch for [`loss_from_logits`]: sampled tokens packed into sequences,
/// which form the groups.
#[derive(Debug, Clone, Copy)]
pub struct TokenBatch<'a> {
    /// Sampled token ids `[T]`, `u32` or `i64` (each in `0..V`).
    pub tokens: &'a Tensor,
    /// Sequences as ranges of the `T` tokens (a [`GroupLayout`] over tokens, cu_seqlens-style).
    pub seqs: &'a GroupLayout,
    /// Completion mask `[T]`, any dtype: nonzero marks a token that counts towards `l_i`.
    pub mask: &'a Tensor,
    /// Groups (prompts) as ranges of sequences (a [`GroupLayout`] over the sequences).
    pub groups: &'a GroupLayout,
}

/// Result of [`loss_from_logits`].
#[derive(Debug, Clone)]
pub struct LogitsLoss {
    /// The scalar loss, in the logits' dtype and on their device; its backward reaches the logits.
    pub loss: Tensor,
    /// The loss as computed in `f64`.
    pub value: f64,
    /// The target `q`, one per sequence, `f64` on the CPU (`f32` on the device for the CUDA
    /// path): keep it for later epochs.
    pub target: Tensor,
    /// `l_i` per sequence, `f64` on the CPU (`f32` on the device for the CUDA path; a constant:
    /// at rollout, the `l_old` of [`GroupTarget::Rollout`] for later calls).
    pub seq_logp: Tensor,
    /// Per-token entropy when [`TokenConfig::entropy`](crate::cpu::tokens::TokenConfig::entropy)
    /// is set.
    pub entropy: Option<Vec<f64>>,
    /// `L_g` per group, unreduced.
    pub group_loss: Vec<f64>,
    /// Per-group diagnostics when [`FitConfig::diagnostics`] is set.
    pub stats: Option<GroupStats>,
}

/// The host copy of a [`TokenBatch`].
struct HostBatch {
    vocab: usize,
    tokens: Vec<u32>,
    seqs: GroupLayout,
    mask: Vec<bool>,
    groups: GroupLayout,
}

impl HostBatch {
    fn view(&self) -> SequenceBatch<'_> {
        SequenceBatch { tokens: &self.tokens, seqs: &self.seqs, mask: &self.mask, groups: &self.groups }
    }
}

fn host_tokens(t: &Tensor, n: usize) -> Result<Vec<u32>> {
    check_1d(t, "tokens", n)?;
    let t = t.detach().to_device(&Device::Cpu)?;
    match t.dtype() {
        DType::U32 => t.to_vec1::<u32>(),
        DType::I64 => t
            .to_vec1::<i64>()?
            .into_iter()
            .enumerate()
            .map(|(i, y)| {
                u32::try_from(y).or_else(|_| fail!("tokens[{i}] is {y}: token ids must be in 0..V"))
            })
            .collect(),
        d => fail!("tokens has dtype {}: expected u32 or i64", d.as_str()),
    }
}

struct LogitsOp {
    batch: HostBatch,
    source: Source,
    cfg: PathConfig,
    q: Mutex<Option<Vec<f64>>>,
    out: Slot<tokens::LogitsPath>,
}

impl CustomOp1 for LogitsOp {
    fn name(&self) -> &'static str {
        "tpo-loss-from-logits"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let z = slice_f64(s, l, "logits")?;
        let b = &self.batch;
        let r = tokens::tpo_from_logits(z, b.vocab, &b.view(), self.source.as_tokens(), &self.cfg)
            .map_err(err)?;
        let loss = r.fit.loss;
        put_slot(&self.q, r.target.clone());
        put_slot(&self.out, r);
        Ok(scalar_out(loss))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // The forward's path with its target stored and the upstream gradient as the scale: the
        // reference's arithmetic for that `grad_scale`.
        let q = stored_target(&self.q)?;
        let mut cfg = self.cfg;
        cfg.fit = FitConfig { grad_scale: upstream(grad_res)?, diagnostics: false, ..cfg.fit };
        cfg.tokens.entropy = false;
        let z = arg.flatten_all()?.to_vec1::<f64>()?;
        let b = &self.batch;
        let g = tokens::tpo_from_logits(&z, b.vocab, &b.view(), TargetSource::Stored { target: &q }, &cfg)
            .map_err(err)?
            .grad_logits;
        Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?))
    }
}

/// The TPO loss from logits `[T, V]` (see the [module](self) docs): token log-probs of the
/// sampled tokens at temperature `tau`, masked per-sequence sums (or means), the group loss over
/// `batch.groups`, and the backward to the logits,
/// `dL/dz_{t,v} = g_t (1{v = y_t} - softmax(z_t / tau)_v) / tau` with `g_t = m_t dL/dl_i`
/// (divided by the completion length for [`SeqReduce::Mean`](crate::cpu::tokens::SeqReduce)).
///
/// `target` holds one value per sequence. Logits may be `-inf` (masked vocabulary entries) but
/// the sampled token's logit must be finite. Errors: shapes, dtypes, token ids out of range,
/// `cfg.fit.grad_scale != 1`, and every error of [`cpu::tokens::tpo_from_logits`].
pub fn loss_from_logits(
    logits: &Tensor,
    batch: &TokenBatch<'_>,
    target: GroupTarget<'_>,
    cfg: &PathConfig,
) -> Result<LogitsLoss> {
    check_float(logits, "logits")?;
    let (t, vocab) = match logits.dims() {
        &[t, v] => (t, v),
        d => fail!("logits has shape {d:?}: expected [T, V]"),
    };
    check_unit_scale(&cfg.fit)?;
    if batch.seqs.len() != t {
        fail!("the sequence layout covers {} tokens, the logits have {t} rows", batch.seqs.len());
    }
    if batch.groups.len() != batch.seqs.num_groups() {
        fail!(
            "the group layout covers {} sequences, the sequence layout has {}",
            batch.groups.len(),
            batch.seqs.num_groups()
        );
    }
    #[cfg(feature = "candle-cuda")]
    if logits.device().is_cuda() && logits.dtype() != DType::F64 {
        return cuda::loss_from_logits(logits, batch, target, cfg, vocab);
    }
    let hb = HostBatch {
        vocab,
        tokens: host_tokens(batch.tokens, t)?,
        seqs: batch.seqs.clone(),
        mask: host(batch.mask, "mask", t)?.into_iter().map(|m| m != 0.0).collect(),
        groups: batch.groups.clone(),
    };
    let source = Source::read(target, batch.groups.len())?;
    let out = Slot::default();
    let op = LogitsOp { batch: hb, source, cfg: *cfg, q: Mutex::default(), out: out.clone() };
    let loss = apply_on_host(logits, op)?;
    let r = take_slot(&out)?;
    let n = r.target.len();
    let dev = &Device::Cpu;
    Ok(LogitsLoss {
        loss,
        value: r.fit.loss,
        target: Tensor::from_vec(r.target, n, dev)?,
        seq_logp: Tensor::from_vec(r.seq_logp, n, dev)?,
        entropy: r.tokens.entropy,
        group_loss: r.fit.group_loss,
        stats: r.fit.stats,
    })
}

// ---------------------------------------------------------------------------------------------
// (c) One call for every method.

/// The policy-update rule of [`policy_loss`]: TPO or one of the policy-gradient baselines.
///
/// All take the current log-probs `l`, the rollout log-probs `l_old` and one signal per member:
/// the raw scores, except for [`Method::PpoClip`], whose signal is the advantages as given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// TPO: `q = softmax(log_softmax(l_old) + u / eta)` from the scores, `L = -sum q log p`,
    /// `dL/dl = sum(q) p - q` ([`cpu::target_and_fit`]). `q` depends only on `l_old` and the
    /// scores, so every epoch on the same rollout fits the same target.
    Tpo(TargetConfig),
    /// REINFORCE with a baseline: `L = -(1/K) sum A_i l_i`, `A = s - b` ([`cpu::reinforce`];
    /// `l_old` is not used).
    Reinforce(PgConfig),
    /// PPO-clip with given advantages: `L = -(1/K) sum min(rho A, clip(rho, 1 +- eps) A)`,
    /// `rho = exp(l - l_old)` ([`cpu::ppo`]).
    PpoClip(PpoConfig),
    /// GRPO: PPO-clip on group z-scored scores plus `beta (exp(-r) + r - 1)`, `r = l - l_old`
    /// ([`cpu::grpo`]).
    Grpo(GrpoConfig),
    /// DG: REINFORCE gated by `sigmoid(A (-l_old) / eta)` ([`cpu::dg`]).
    Dg(DgConfig),
}

impl Method {
    /// TPO with temperature `eta` (anchored target, default zero-variance threshold).
    pub fn tpo(eta: f64) -> Self {
        Method::Tpo(TargetConfig::with_eta(eta))
    }
    /// REINFORCE with the group-mean baseline.
    pub fn reinforce() -> Self {
        Method::Reinforce(PgConfig::default())
    }
    /// PPO-clip with clip range `eps`.
    pub fn ppo_clip(eps: f64) -> Self {
        Method::PpoClip(PpoConfig { clip_eps: eps })
    }
    /// GRPO with clip range `eps` and KL weight `beta`.
    pub fn grpo(eps: f64, beta: f64) -> Self {
        Method::Grpo(GrpoConfig { clip_eps: eps, beta, ..GrpoConfig::default() })
    }
    /// DG with gate temperature `eta` and the group-mean baseline.
    pub fn dg(eta: f64) -> Self {
        Method::Dg(DgConfig { eta, ..DgConfig::default() })
    }

    /// The reference: loss, per-group loss and `d(fit.grad_scale * loss)/dl`.
    fn eval(
        &self,
        l: &[f64],
        lo: &[f64],
        s: &[f64],
        layout: &GroupLayout,
        fit: &FitConfig,
    ) -> crate::Result<FitOutput> {
        match self {
            Method::Tpo(tc) => Ok(cpu::target_and_fit(l, Some(lo), s, layout, tc, fit)?.fit),
            Method::Reinforce(c) => cpu::reinforce(l, s, layout, c, fit),
            Method::PpoClip(c) => cpu::ppo(l, lo, s, layout, c, fit),
            Method::Grpo(c) => cpu::grpo(l, lo, s, layout, c, fit),
            Method::Dg(c) => cpu::dg(l, lo, s, layout, c, fit),
        }
    }
}

/// Result of [`policy_loss`].
#[derive(Debug, Clone)]
pub struct PolicyLoss {
    /// The scalar loss, in `logp`'s dtype and on its device; its backward is the method's
    /// gradient times the upstream gradient.
    pub loss: Tensor,
    /// The loss as computed in `f64`.
    pub value: f64,
    /// Per-group loss, unreduced.
    pub group_loss: Vec<f64>,
    /// TPO's per-group diagnostics when [`FitConfig::diagnostics`] is set (`None` for the
    /// baselines).
    pub stats: Option<GroupStats>,
}

struct PolicyOp {
    method: Method,
    layout: GroupLayout,
    logp_old: Vec<f64>,
    signal: Vec<f64>,
    fit: FitConfig,
    out: Slot<FitOutput>,
}

impl CustomOp1 for PolicyOp {
    fn name(&self) -> &'static str {
        "tpo-policy-loss"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let logp = slice_f64(s, l, "logp")?;
        let r = self.method.eval(logp, &self.logp_old, &self.signal, &self.layout, &self.fit).map_err(err)?;
        let loss = r.loss;
        put_slot(&self.out, r);
        Ok(scalar_out(loss))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let fc = FitConfig { grad_scale: upstream(grad_res)?, diagnostics: false, ..self.fit };
        let logp = arg.flatten_all()?.to_vec1::<f64>()?;
        let g = self.method.eval(&logp, &self.logp_old, &self.signal, &self.layout, &fc).map_err(err)?.grad;
        Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?))
    }
}

/// TPO or a baseline, chosen by `method`, on sequence log-probs `logp [N]` (see [`Method`]).
///
/// `logp_old` (rollout log-probs) and `signal` (scores; advantages for [`Method::PpoClip`]) are
/// 1-D with `layout.len()` elements and constants of the loss; the loss is reduced by
/// `fit.reduction` and its backward is exactly the method's reference gradient times the
/// upstream gradient. Errors: shapes, dtypes, `fit.grad_scale != 1`, and the method's own
/// errors (the baselines need finite log-probs), with the library's message.
pub fn policy_loss(
    method: &Method,
    logp: &Tensor,
    logp_old: &Tensor,
    signal: &Tensor,
    layout: &GroupLayout,
    fit: &FitConfig,
) -> Result<PolicyLoss> {
    check_float(logp, "logp")?;
    let n = layout.len();
    check_1d(logp, "logp", n)?;
    check_unit_scale(fit)?;
    #[cfg(feature = "candle-cuda")]
    if logp.device().is_cuda() && logp.dtype() != DType::F64 {
        if let Some(loss) = cuda::baseline_of(method) {
            return cuda::policy_loss(loss, logp, logp_old, signal, layout, fit);
        }
        if let Method::Tpo(tc) = method {
            // TPO's policy loss is group_loss with the rollout's target (cpu::target_and_fit).
            let target = GroupTarget::Rollout { logp_old, scores: signal };
            let g = cuda::group_loss(logp, layout, target, &LossConfig { target: *tc, fit: *fit })?;
            return Ok(PolicyLoss { loss: g.loss, value: g.value, group_loss: g.group_loss, stats: g.stats });
        }
    }
    let signal_name = if matches!(method, Method::PpoClip(_)) { "advantages" } else { "scores" };
    let out = Slot::default();
    let op = PolicyOp {
        method: *method,
        layout: layout.clone(),
        logp_old: host(logp_old, "logp_old", n)?,
        signal: host(signal, signal_name, n)?,
        fit: *fit,
        out: out.clone(),
    };
    let loss = apply_on_host(logp, op)?;
    let r = take_slot(&out)?;
    Ok(PolicyLoss { loss, value: r.loss, group_loss: r.group_loss, stats: r.stats })
}
