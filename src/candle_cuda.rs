//! [`crate::candle`]'s TPO ops on CUDA tensors (feature `candle-cuda`): the crate's kernels on
//! candle's CUDA storage, ordered on the candle device's stream, with no host round trip of the
//! tensors.
//!
//! [`group_loss`](super::group_loss), [`loss_from_logits`](super::loss_from_logits) and the
//! baselines of [`policy_loss`](super::policy_loss) (REINFORCE, PPO-clip, GRPO, DG, through
//! [`CudaTpo::baseline`]) come here for an `f32`, `bf16` or `f16` tensor on a CUDA device (`f64`
//! tensors keep the host path: the kernels compute in `f32`; so does `policy_loss`'s TPO).
//! Each op's forward runs the fused kernels on the tensor's storage in place (through
//! [`CudaTpo::window`], as the storage may start at an offset) on the device's stream
//! ([`CudaTpo::on_stream`]); its backward is a second op that fits the forward's target with
//! the upstream gradient as scale, writing the gradient into a fresh storage (for the logits, a
//! copy of them that the kernel overwrites). Each forward synchronises once, to read the
//! kernels' error word (bad data is an error at the call, as on the CPU) and the small host-side
//! results (`value`, per-group losses and diagnostics). The target and `seq_logp` stay on the
//! device, as `f32`.
//!
//! Status: type-checked in CI beside candle-core's `cuda` feature
//! (`scripts/check-candle-link.sh`); not run yet, as no GPU was available (`examples/candle_link`
//! compares it with the CPU path on one). The library calls it makes are the ones `tests/gpu.rs`
//! runs on the emulated device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, DeviceRepr};

use super::{
    err, put_slot, take_slot, upstream, GroupLoss, GroupTarget, LogitsLoss, LossConfig, Result, Slot,
};
use crate::config::FitConfig;
use crate::cpu::tokens::PathConfig;
use crate::cpu::GroupStats;
use crate::cuda::{
    BaselineLoss, CudaTpo, DeviceFloat, DeviceLayout, DeviceSequenceBatch, DeviceTarget, FitBuffers,
    PathAlloc, Window,
};
use crate::layout::GroupLayout;

macro_rules! fail {
    ($($arg:tt)*) => {
        return Err(candle_core::Error::Msg(format!($($arg)*)))
    };
}

/// The backend of a candle CUDA device: the kernels loaded once per device, on the device's stream.
fn backend(dev: &CudaDevice) -> Result<CudaTpo> {
    static BASES: OnceLock<Mutex<HashMap<usize, Arc<CudaTpo>>>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let ordinal = stream.context().ordinal();
    let base = {
        let mut m = BASES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        match m.get(&ordinal) {
            Some(b) => b.clone(),
            None => {
                let b = Arc::new(CudaTpo::new(ordinal).map_err(err)?);
                m.insert(ordinal, b.clone());
                b
            }
        }
    };
    base.on_stream(&stream).map_err(err)
}

/// The CUDA storage of a tensor's storage guard.
fn cuda_storage<'a>(s: &'a Storage, name: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => fail!("tpo::candle: {name} must be on the CUDA device of the op's input"),
    }
}

/// The elements of a contiguous tensor view as a `CudaSlice` of `T` for the kernels.
fn window<'a, T: CudaDType + DeviceRepr + 'a>(
    tpo: &'a CudaTpo,
    s: &'a CudaStorage,
    l: &Layout,
    name: &str,
) -> Result<Window<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        fail!("tpo::candle: {name} must be contiguous");
    };
    tpo.window(s.as_cuda_slice::<T>()?, a..b).map_err(err)
}

/// A device buffer as a candle tensor of `shape` (no gradient).
fn tensor<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

fn to_f64(tpo: &CudaTpo, s: &CudaSlice<f32>) -> Result<Vec<f64>> {
    Ok(tpo.to_host(s).map_err(err)?.into_iter().map(f64::from).collect())
}

/// The target's source on the device: `f32` scores and stored targets, rollout log-probs in the
/// log-probs' dtype (group loss) or `f32` (from logits); contiguous, on the input's device.
enum DevSource {
    OnPolicy { scores: Tensor },
    Rollout { logp_old: Tensor, scores: Tensor },
    Stored { target: Tensor },
}

impl DevSource {
    fn new(t: GroupTarget<'_>, device: &candle_core::Device, n: usize, old_dtype: DType) -> Result<Self> {
        let put = |x: &Tensor, name: &str, dtype: DType| -> Result<Tensor> {
            super::check_1d(x, name, n)?;
            x.detach().to_device(device)?.to_dtype(dtype)?.contiguous()
        };
        Ok(match t {
            GroupTarget::OnPolicy { scores } => {
                DevSource::OnPolicy { scores: put(scores, "scores", DType::F32)? }
            }
            GroupTarget::Rollout { logp_old, scores } => DevSource::Rollout {
                logp_old: put(logp_old, "logp_old", old_dtype)?,
                scores: put(scores, "scores", DType::F32)?,
            },
            GroupTarget::Stored { target } => {
                DevSource::Stored { target: put(target, "target", DType::F32)? }
            }
        })
    }
}

/// What a forward leaves for its caller.
struct GroupOut {
    q: Tensor,
    value: f64,
    group_loss: Vec<f64>,
    stats: Option<GroupStats>,
}

/// Reads a forward's fit outputs to the host (synchronises).
fn fit_to_host<G: DeviceFloat>(
    tpo: &CudaTpo,
    fit: &FitBuffers<G>,
    dl: &DeviceLayout,
) -> Result<(f64, Vec<f64>, Option<GroupStats>)> {
    let value = to_f64(tpo, &fit.loss)?[0];
    Ok((value, to_f64(tpo, &fit.group_loss)?, tpo.stats_to_host(fit, dl).map_err(err)?))
}

/// Dispatches `$f::<T>` on a CUDA storage's dtype.
macro_rules! by_dtype {
    ($s:expr, $f:ident ( $($a:expr),* )) => {
        match $s.dtype() {
            DType::F32 => $f::<f32>($($a),*),
            DType::BF16 => $f::<half::bf16>($($a),*),
            DType::F16 => $f::<half::f16>($($a),*),
            d => fail!("tpo::candle: the CUDA kernels read f32, bf16 or f16, not {}", d.as_str()),
        }
    };
}

/// `impl CustomOp1` for an op that runs only on CUDA: its `name`; a `cpu_fwd` that refuses a CPU
/// tensor with one line naming the op (`what`); a `cuda_fwd` that dispatches `fwd::<T>(op, s, l)`
/// on the storage's dtype (`by_dtype!`); and the op's `bwd`, if it has one, given as is.
macro_rules! cuda_op {
    ($op:ty, $name:literal, $what:literal, $fwd:ident $(, $($bwd:tt)+)?) => {
        impl CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                fail!(concat!("tpo::candle: the CUDA ", $what, " got a CPU tensor"))
            }

            fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
                by_dtype!(s, $fwd(self, s, l))
            }

            $($($bwd)+)?
        }
    };
}

// ---- the group loss ---------------------------------------------------------------------------

struct GroupOp {
    layout: GroupLayout,
    source: DevSource,
    cfg: LossConfig,
    q: Mutex<Option<Tensor>>,
    out: Slot<GroupOut>,
}

fn group_fwd<T: DeviceFloat + CudaDType>(
    op: &GroupOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let tpo = backend(dev)?;
    let logp = window::<T>(&tpo, s, l, "logp")?;
    let dl = tpo.layout(&op.layout).map_err(err)?;
    let (tc, fc) = (&op.cfg.target, &op.cfg.fit);
    let (q, fit) = match &op.source {
        DevSource::Stored { target } => {
            let (g, tl) = target.storage_and_layout();
            let qw = window::<f32>(&tpo, cuda_storage(&g, "target")?, tl, "target")?;
            let mut out = tpo.alloc_fit::<T>(&dl, fc.diagnostics).map_err(err)?;
            tpo.fit(&logp, &qw, &dl, fc, &mut out).map_err(err)?;
            tpo.check(&out.status, &dl).map_err(err)?;
            (target.clone(), out)
        }
        DevSource::OnPolicy { scores } | DevSource::Rollout { scores, .. } => {
            let (sg, sl) = scores.storage_and_layout();
            let sw = window::<f32>(&tpo, cuda_storage(&sg, "scores")?, sl, "scores")?;
            let old = match &op.source {
                DevSource::Rollout { logp_old, .. } => Some(logp_old.storage_and_layout()),
                _ => None,
            };
            let ow = match &old {
                Some((g, ol)) => Some(window::<T>(&tpo, cuda_storage(g, "logp_old")?, ol, "logp_old")?),
                None => None,
            };
            let mut out = tpo.alloc_fused::<T>(&dl, fc.diagnostics).map_err(err)?;
            tpo.target_and_fit(&logp, ow.as_deref(), &sw, &dl, tc, fc, &mut out).map_err(err)?;
            tpo.check(&out.fit.status, &dl).map_err(err)?;
            let n = out.q.len();
            (tensor(out.q, dev, n), out.fit)
        }
    };
    let (value, group_loss, stats) = fit_to_host(&tpo, &fit, &dl)?;
    put_slot(&op.q, q.clone());
    put_slot(&op.out, GroupOut { q, value, group_loss, stats });
    Ok((CudaStorage::wrap_cuda_slice(fit.loss, dev.clone()), Shape::from(())))
}

cuda_op!(
    GroupOp,
    "tpo-group-loss-cuda",
    "group loss",
    group_fwd,
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let Some(q) = self.q.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            fail!("tpo::candle: backward before the op's forward");
        };
        let fit = FitConfig { grad_scale: upstream(grad_res)?, diagnostics: false, ..self.cfg.fit };
        arg.apply_op1_no_bwd(&GroupGradOp { layout: self.layout.clone(), q, fit }).map(Some)
    }
);

/// `d(grad_scale * L)/dl` against a stored target, into a fresh storage in `l`'s dtype.
struct GroupGradOp {
    layout: GroupLayout,
    q: Tensor,
    fit: FitConfig,
}

fn group_grad<T: DeviceFloat + CudaDType>(
    op: &GroupGradOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let tpo = backend(&s.device)?;
    let logp = window::<T>(&tpo, s, l, "logp")?;
    let (g, ql) = op.q.storage_and_layout();
    let q = window::<f32>(&tpo, cuda_storage(&g, "target")?, ql, "target")?;
    let dl = tpo.layout(&op.layout).map_err(err)?;
    let mut out = tpo.alloc_fit::<T>(&dl, false).map_err(err)?;
    tpo.fit(&logp, &q, &dl, &op.fit, &mut out).map_err(err)?;
    tpo.check(&out.status, &dl).map_err(err)?;
    Ok((CudaStorage::wrap_cuda_slice(out.grad, s.device.clone()), l.shape().clone()))
}

cuda_op!(GroupGradOp, "tpo-group-loss-cuda-grad", "group loss's backward", group_grad);

/// [`super::group_loss`] for a CUDA tensor (checked by the caller: 1-D, `f32`/`bf16`/`f16`, unit
/// `grad_scale`).
pub(super) fn group_loss(
    logp: &Tensor,
    layout: &GroupLayout,
    target: GroupTarget<'_>,
    cfg: &LossConfig,
) -> Result<GroupLoss> {
    let x = logp.contiguous()?;
    let source = DevSource::new(target, x.device(), layout.len(), x.dtype())?;
    let out = Slot::default();
    let op = GroupOp { layout: layout.clone(), source, cfg: *cfg, q: Mutex::default(), out: out.clone() };
    let loss = x.apply_op1(op)?.to_dtype(logp.dtype())?;
    let r = take_slot(&out)?;
    Ok(GroupLoss { loss, value: r.value, target: r.q, group_loss: r.group_loss, stats: r.stats })
}

// ---- from logits ------------------------------------------------------------------------------

/// A token batch on the device: `u32` token ids and a `u8` completion mask.
struct DevBatch {
    vocab: usize,
    tokens: Tensor,
    mask: Tensor,
    seqs: GroupLayout,
    groups: GroupLayout,
}

struct LogitsOut {
    q: Tensor,
    seq_logp: Tensor,
    entropy: Option<Vec<f64>>,
    value: f64,
    group_loss: Vec<f64>,
    stats: Option<GroupStats>,
}

struct LogitsOp {
    batch: DevBatch,
    source: DevSource,
    cfg: PathConfig,
    q: Mutex<Option<Tensor>>,
    out: Slot<LogitsOut>,
}

/// The path's buffers for a batch, with `stored` telling whether the target is a stored one.
fn path_run<T: DeviceFloat + CudaDType>(
    tpo: &CudaTpo,
    b: &DevBatch,
    source: &DevSource,
    cfg: &PathConfig,
    logits: &mut PathLogits<'_, T>,
) -> Result<crate::cuda::LogitsPathBuffers<T>> {
    let (seqs, groups) = (tpo.layout(&b.seqs).map_err(err)?, tpo.layout(&b.groups).map_err(err)?);
    let (yg, yl) = b.tokens.storage_and_layout();
    let y = window::<u32>(tpo, cuda_storage(&yg, "tokens")?, yl, "tokens")?;
    let (mg, ml) = b.mask.storage_and_layout();
    let m = window::<u8>(tpo, cuda_storage(&mg, "mask")?, ml, "mask")?;
    let batch = DeviceSequenceBatch { tokens: &y, seqs: &seqs, mask: &m, groups: &groups };
    let guards: Vec<_> = match source {
        DevSource::OnPolicy { scores } => vec![scores.storage_and_layout()],
        DevSource::Rollout { logp_old, scores } => {
            vec![logp_old.storage_and_layout(), scores.storage_and_layout()]
        }
        DevSource::Stored { target } => vec![target.storage_and_layout()],
    };
    let mut w = Vec::new();
    for (g, l) in &guards {
        w.push(window::<f32>(tpo, cuda_storage(g, "the target's source")?, l, "the target's source")?);
    }
    let src = match (source, &w[..]) {
        (DevSource::OnPolicy { .. }, [s]) => DeviceTarget::OnPolicy { scores: s },
        (DevSource::Rollout { .. }, [o, s]) => DeviceTarget::Rollout { logp_old: o, scores: s },
        (DevSource::Stored { .. }, [q]) => DeviceTarget::Stored { target: q },
        _ => fail!("tpo::candle: internal error: target source"),
    };
    let alloc = PathAlloc {
        entropy: cfg.tokens.entropy,
        stats: cfg.fit.diagnostics,
        in_place: true,
        stored_target: matches!(source, DevSource::Stored { .. }),
    };
    let mut out = tpo.alloc_logits_path::<T>(b.vocab, &seqs, &groups, alloc).map_err(err)?;
    match logits {
        PathLogits::Read(z) => tpo.tpo_forward_from_logits(z, b.vocab, &batch, src, cfg, &mut out),
        PathLogits::Overwrite(z) => tpo.tpo_from_logits(z, b.vocab, &batch, src, cfg, &mut out),
    }
    .map_err(err)?;
    tpo.check(&out.tokens.status, &seqs).map_err(err)?;
    tpo.check(&out.group.fit.status, &groups).map_err(err)?;
    Ok(out)
}

/// The logits a path run reads (forward) or overwrites with their gradient (backward).
enum PathLogits<'a, T> {
    Read(&'a CudaSlice<T>),
    Overwrite(&'a mut CudaSlice<T>),
}

fn logits_fwd<T: DeviceFloat + CudaDType>(
    op: &LogitsOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let tpo = backend(dev)?;
    let z = window::<T>(&tpo, s, l, "logits")?;
    let out = path_run::<T>(&tpo, &op.batch, &op.source, &op.cfg, &mut PathLogits::Read(&z))?;
    let dl = tpo.layout(&op.batch.groups).map_err(err)?;
    let (value, group_loss, stats) = fit_to_host(&tpo, &out.group.fit, &dl)?;
    let entropy = match out.tokens.entropy.as_ref() {
        Some(e) => Some(to_f64(&tpo, e)?),
        None => None,
    };
    let n = out.seq_logp.len();
    let q = match &op.source {
        DevSource::Stored { target } => target.clone(),
        _ => tensor(out.group.q, dev, n),
    };
    put_slot(&op.q, q.clone());
    let seq_logp = tensor(out.seq_logp, dev, n);
    put_slot(&op.out, LogitsOut { q, seq_logp, entropy, value, group_loss, stats });
    Ok((CudaStorage::wrap_cuda_slice(out.group.fit.loss, dev.clone()), Shape::from(())))
}

cuda_op!(
    LogitsOp,
    "tpo-loss-from-logits-cuda",
    "loss from logits",
    logits_fwd,
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let Some(q) = self.q.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            fail!("tpo::candle: backward before the op's forward");
        };
        let mut cfg = self.cfg;
        cfg.fit = FitConfig { grad_scale: upstream(grad_res)?, diagnostics: false, ..cfg.fit };
        cfg.tokens.entropy = false;
        let b = &self.batch;
        let batch = DevBatch {
            vocab: b.vocab,
            tokens: b.tokens.clone(),
            mask: b.mask.clone(),
            seqs: b.seqs.clone(),
            groups: b.groups.clone(),
        };
        arg.apply_op1_no_bwd(&LogitsGradOp { batch, q, cfg }).map(Some)
    }
);

/// `dL/dlogits` for the stored target, written by the kernels over a copy of the logits.
struct LogitsGradOp {
    batch: DevBatch,
    q: Tensor,
    cfg: PathConfig,
}

fn logits_grad<T: DeviceFloat + CudaDType>(
    op: &LogitsGradOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let tpo = backend(&s.device)?;
    let mut g = {
        let z = window::<T>(&tpo, s, l, "logits")?;
        tpo.stream().clone_dtod(&*z).map_err(|e| err(crate::TpoError::Cuda(format!("device copy: {e:?}"))))?
    };
    let source = DevSource::Stored { target: op.q.clone() };
    path_run::<T>(&tpo, &op.batch, &source, &op.cfg, &mut PathLogits::Overwrite(&mut g))?;
    Ok((CudaStorage::wrap_cuda_slice(g, s.device.clone()), l.shape().clone()))
}

cuda_op!(LogitsGradOp, "tpo-loss-from-logits-cuda-grad", "loss from logits' backward", logits_grad);

/// [`super::loss_from_logits`] for CUDA logits (checked by the caller: `[T, V]`,
/// `f32`/`bf16`/`f16`, layouts consistent, unit `grad_scale`).
pub(super) fn loss_from_logits(
    logits: &Tensor,
    batch: &super::TokenBatch<'_>,
    target: GroupTarget<'_>,
    cfg: &PathConfig,
    vocab: usize,
) -> Result<LogitsLoss> {
    let z = logits.contiguous()?;
    let dev = z.device();
    let t = batch.seqs.len();
    super::check_1d(batch.tokens, "tokens", t)?;
    super::check_1d(batch.mask, "mask", t)?;
    let tokens = match batch.tokens.dtype() {
        DType::U32 | DType::I64 => {
            batch.tokens.detach().to_device(dev)?.to_dtype(DType::U32)?.contiguous()?
        }
        d => fail!("tokens has dtype {}: expected u32 or i64", d.as_str()),
    };
    let mask = batch.mask.detach().to_device(dev)?.ne(0.0)?.to_dtype(DType::U8)?.contiguous()?;
    let b = DevBatch { vocab, tokens, mask, seqs: batch.seqs.clone(), groups: batch.groups.clone() };
    let source = DevSource::new(target, dev, batch.groups.len(), DType::F32)?;
    let out = Slot::default();
    let op = LogitsOp { batch: b, source, cfg: *cfg, q: Mutex::default(), out: out.clone() };
    let loss = z.apply_op1(op)?.to_dtype(logits.dtype())?;
    let r = take_slot(&out)?;
    Ok(LogitsLoss {
        loss,
        value: r.value,
        target: r.q,
        seq_logp: r.seq_logp,
        entropy: r.entropy,
        group_loss: r.group_loss,
        stats: r.stats,
    })
}

// ---- the baselines of policy_loss -------------------------------------------------------------

/// The baseline loss of a [`Method`](super::Method) (`None` for TPO, which keeps its own path).
pub(super) fn baseline_of(method: &super::Method) -> Option<BaselineLoss> {
    use super::Method;
    match *method {
        Method::Tpo(_) => None,
        Method::Reinforce(c) => Some(BaselineLoss::Reinforce(c)),
        Method::PpoClip(c) => Some(BaselineLoss::Ppo(c)),
        Method::Grpo(c) => Some(BaselineLoss::Grpo(c)),
        Method::Dg(c) => Some(BaselineLoss::Dg(c)),
    }
}

/// A baseline's inputs on the device: rollout log-probs in the log-probs' dtype, the scores (or
/// advantages) in `f32`, contiguous, on the input's device.
struct PolicyInputs {
    loss: BaselineLoss,
    layout: GroupLayout,
    logp_old: Tensor,
    signal: Tensor,
    signal_name: &'static str,
}

/// Runs the baseline kernel on `logp` with `fit` and checks its status (synchronises).
fn policy_run<T: DeviceFloat + CudaDType>(
    tpo: &CudaTpo,
    inp: &PolicyInputs,
    logp: &CudaSlice<T>,
    fit: &FitConfig,
) -> Result<FitBuffers<T>> {
    let dl = tpo.layout(&inp.layout).map_err(err)?;
    let (og, ol) = inp.logp_old.storage_and_layout();
    let old = window::<T>(tpo, cuda_storage(&og, "logp_old")?, ol, "logp_old")?;
    let (sg, sl) = inp.signal.storage_and_layout();
    let signal = window::<f32>(tpo, cuda_storage(&sg, inp.signal_name)?, sl, inp.signal_name)?;
    let mut out = tpo.alloc_fit::<T>(&dl, false).map_err(err)?;
    tpo.baseline(&inp.loss, logp, Some(&old), &signal, &dl, fit, &mut out).map_err(err)?;
    tpo.check(&out.status, &dl).map_err(err)?;
    Ok(out)
}

struct PolicyOp {
    inp: Arc<PolicyInputs>,
    fit: FitConfig,
    out: Slot<(f64, Vec<f64>)>,
}

fn policy_fwd<T: DeviceFloat + CudaDType>(
    op: &PolicyOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let tpo = backend(dev)?;
    let logp = window::<T>(&tpo, s, l, "logp")?;
    let out = policy_run::<T>(&tpo, &op.inp, &logp, &op.fit)?;
    let value = to_f64(&tpo, &out.loss)?[0];
    put_slot(&op.out, (value, to_f64(&tpo, &out.group_loss)?));
    Ok((CudaStorage::wrap_cuda_slice(out.loss, dev.clone()), Shape::from(())))
}

cuda_op!(
    PolicyOp,
    "tpo-policy-loss-cuda",
    "policy loss",
    policy_fwd,
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // The gradient at the current log-probs with the upstream gradient as grad_scale, as
        // the host path recomputes it.
        let fit = FitConfig { grad_scale: upstream(grad_res)?, diagnostics: false, ..self.fit };
        arg.apply_op1_no_bwd(&PolicyGradOp { inp: self.inp.clone(), fit }).map(Some)
    }
);

/// `d(grad_scale * L)/dl` of a baseline, into a fresh storage in `l`'s dtype.
struct PolicyGradOp {
    inp: Arc<PolicyInputs>,
    fit: FitConfig,
}

fn policy_grad<T: DeviceFloat + CudaDType>(
    op: &PolicyGradOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let tpo = backend(&s.device)?;
    let logp = window::<T>(&tpo, s, l, "logp")?;
    let out = policy_run::<T>(&tpo, &op.inp, &logp, &op.fit)?;
    Ok((CudaStorage::wrap_cuda_slice(out.grad, s.device.clone()), l.shape().clone()))
}

cuda_op!(PolicyGradOp, "tpo-policy-loss-cuda-grad", "policy loss's backward", policy_grad);

/// [`super::policy_loss`]'s baselines for a CUDA tensor (checked by the caller: 1-D,
/// `f32`/`bf16`/`f16`, unit `grad_scale`). `logp_old` is read in `logp`'s dtype (rounded to it,
/// as [`super::group_loss`] reads it), the scores or advantages in `f32`.
pub(super) fn policy_loss(
    loss: BaselineLoss,
    logp: &Tensor,
    logp_old: &Tensor,
    signal: &Tensor,
    layout: &GroupLayout,
    fit: &FitConfig,
) -> Result<super::PolicyLoss> {
    let x = logp.contiguous()?;
    let n = layout.len();
    let signal_name = if matches!(loss, BaselineLoss::Ppo(_)) { "advantages" } else { "scores" };
    let put = |t: &Tensor, name: &str, dtype: DType| -> Result<Tensor> {
        super::check_1d(t, name, n)?;
        t.detach().to_device(x.device())?.to_dtype(dtype)?.contiguous()
    };
    let inp = PolicyInputs {
        loss,
        layout: layout.clone(),
        logp_old: put(logp_old, "logp_old", x.dtype())?,
        signal: put(signal, signal_name, DType::F32)?,
        signal_name,
    };
    let out = Slot::default();
    let op = PolicyOp { inp: Arc::new(inp), fit: *fit, out: out.clone() };
    let loss = x.apply_op1(op)?.to_dtype(logp.dtype())?;
    let (value, group_loss) = take_slot(&out)?;
    Ok(super::PolicyLoss { loss, value, group_loss, stats: None })
}
