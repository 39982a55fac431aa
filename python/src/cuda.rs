//! The CUDA path (feature `cuda`): the crate's kernels on memory and a stream the caller owns.
//!
//! `tpo/__init__.py` hands CUDA tensors over as raw descriptors `(data_ptr, numel, dtype)` and
//! `torch.cuda.current_stream(device).cuda_stream`; outputs are tensors it allocated, borrowed
//! the same way. Everything runs through [`tpo::cuda::CudaTpo::borrow`] and
//! [`tpo::cuda::CudaTpo::with_borrowed_stream`]: the kernels run on the caller's stream, read the
//! caller's memory in place and write the results into the caller's output tensors (small
//! per-group and per-token results via a device copy from the library's own buffers). Each call
//! synchronises the stream once, to read the kernels' error word, so that bad data raises
//! `ValueError` at the call, as on the CPU.
//!
//! [`DeviceBuffer`] and [`DeviceStream`] make device memory and streams through the library
//! itself: the tests use them, on the emulated device, where no PyTorch CUDA exists.
//!
//! The `unsafe` of this crate lives here, in [`borrow`] and [`backend`]'s stream wrapping: a raw
//! address and a raw stream handle from Python are trusted to be what `tpo/__init__.py` took
//! from live tensors and the current stream, after the library's checks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use tpo::cpu::tokens::PathConfig;
use tpo::cuda::{
    Borrowed, CudaTpo, DeviceFloat, DeviceLayout, DeviceSequenceBatch, DeviceTarget, FitBuffers, FusedLinear,
    PathAlloc,
};
use tpo::{bf16, f16, GroupLayout};

use crate::{fail, fit_config, target_config, value_error, PathOpts};

/// A raw tensor as Python describes it: `(device address, number of elements, dtype name)`.
pub type Desc = (u64, usize, String);

/// One backend per device, its kernels loaded once; each call wraps the caller's stream around it.
fn base(device: usize) -> PyResult<Arc<CudaTpo>> {
    static BASES: OnceLock<Mutex<HashMap<usize, Arc<CudaTpo>>>> = OnceLock::new();
    let mut m = BASES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = m.get(&device) {
        return Ok(b.clone());
    }
    let b = Arc::new(CudaTpo::new(device).map_err(value_error)?);
    m.insert(device, b.clone());
    Ok(b)
}

/// The backend of `device` on the caller's stream `stream` (a raw `CUstream`, 0 for the legacy
/// default stream).
fn backend(device: usize, stream: u64) -> PyResult<CudaTpo> {
    let b = base(device)?;
    // SAFETY: `stream` is `torch.cuda.current_stream(device).cuda_stream` (or a DeviceStream's
    // handle), a live stream of the device's primary context, the context `CudaTpo::new` opened;
    // the wrapper lives only for this call, during which the caller's stream stays alive.
    Ok(unsafe { b.with_borrowed_stream(stream) })
}

/// A caller's tensor as a borrowed buffer of `T`, after checking its dtype name.
fn borrow<T: DeviceRepr>(tpo: &CudaTpo, name: &str, d: &Desc, dtype: &str) -> PyResult<Borrowed<T>> {
    if d.2 != dtype {
        return fail(format!("{name}: expected a {dtype} CUDA tensor, got {}", d.2));
    }
    // SAFETY: the descriptor is `(t.data_ptr(), t.numel(), dtype)` of a contiguous tensor that
    // `tpo/__init__.py` keeps alive across this call (it holds a reference), on this device;
    // `CudaTpo::borrow` checks the rest (alignment, device memory of this context, bounds).
    unsafe { tpo.borrow::<T>(name, d.0, d.1) }.map_err(value_error)
}

fn borrow_opt<T: DeviceRepr>(
    tpo: &CudaTpo,
    name: &str,
    d: &Option<Desc>,
    dtype: &str,
) -> PyResult<Option<Borrowed<T>>> {
    d.as_ref().map(|d| borrow::<T>(tpo, name, d, dtype)).transpose()
}

/// Copies a library buffer into the caller's output tensor `name` of `outs`, when it is there.
fn put<T: DeviceRepr>(
    tpo: &CudaTpo,
    outs: &HashMap<String, Desc>,
    name: &str,
    dtype: &str,
    at: usize,
    src: &CudaSlice<T>,
) -> PyResult<()> {
    if let Some(d) = outs.get(name) {
        let mut dst = borrow::<T>(tpo, name, d, dtype)?;
        dst.copy_from_at(tpo, at, src).map_err(value_error)?;
    }
    Ok(())
}

/// The diagnostics rows of a group call into the caller's `[5, B]` float32 `stats` tensor, in the
/// order group_loss, kl_q_p, entropy_q, grad_norm, kl_q_pold (left as the caller filled it when
/// the target was stored).
fn put_stats<G: DeviceFloat>(
    tpo: &CudaTpo,
    outs: &HashMap<String, Desc>,
    fit: &FitBuffers<G>,
) -> PyResult<()> {
    let b = fit.group_loss.len();
    put(tpo, outs, "stats", "f32", 0, &fit.group_loss)?;
    let Some(st) = fit.stats.as_ref() else { return Ok(()) };
    let row = |i: usize| st.slice(i * b..(i + 1) * b);
    // The library's rows: [KL(q||p), H(q), |grad|] (fit) or [KL(q||p), H(q), KL(q||p_old), |grad|].
    let order: &[(usize, usize)] =
        if st.len() == 4 * b { &[(0, 1), (1, 2), (3, 3), (2, 4)] } else { &[(0, 1), (1, 2), (2, 3)] };
    if let Some(d) = outs.get("stats") {
        let mut dst = borrow::<f32>(tpo, "stats", d, "f32")?;
        for &(src, to) in order {
            dst.copy_from_at(tpo, to * b, &row(src)).map_err(value_error)?;
        }
    }
    Ok(())
}

fn outputs(outs: &Bound<'_, PyDict>) -> PyResult<HashMap<String, Desc>> {
    outs.extract()
}

/// The kernels' element type name for a dtype name.
fn float_kind(name: &str, d: &Desc) -> PyResult<&'static str> {
    match d.2.as_str() {
        "f32" => Ok("f32"),
        "bf16" => Ok("bf16"),
        "f16" => Ok("f16"),
        other => fail(format!(
            "{name} is {other} on CUDA: the kernels read float32, bfloat16 or float16 (convert it first)"
        )),
    }
}

/// The group loss on CUDA: [`CudaTpo::target_and_fit`] (or [`CudaTpo::fit`] with a stored
/// target) on the caller's tensors and stream. `outs` maps `loss` (f32, 1), `target` (f32, N),
/// `grad` (logp's dtype, N) and `stats` (f32, 5 B) to the caller's output tensors; any may be
/// left out.
#[pyfunction]
#[pyo3(signature = (device, stream, logp, sizes, scores, logp_old, target, eta, zero_std_threshold, anchored, kl, reduction, global_num_groups, grad_scale, outs))]
#[allow(clippy::too_many_arguments)]
pub fn cuda_group_loss(
    py: Python<'_>,
    device: usize,
    stream: u64,
    logp: Desc,
    sizes: Vec<usize>,
    scores: Option<Desc>,
    logp_old: Option<Desc>,
    target: Option<Desc>,
    eta: f64,
    zero_std_threshold: f64,
    anchored: bool,
    kl: bool,
    reduction: &str,
    global_num_groups: Option<f64>,
    grad_scale: f64,
    outs: &Bound<'_, PyDict>,
) -> PyResult<()> {
    let outs = outputs(outs)?;
    let layout = GroupLayout::from_sizes(&sizes).map_err(value_error)?;
    let fcfg = fit_config(kl, reduction, global_num_groups, grad_scale)?;
    let tcfg = target_config(eta, zero_std_threshold, anchored);
    let args = GroupArgs { device, stream, logp, layout, scores, logp_old, target, tcfg, fcfg, outs };
    py.detach(|| match float_kind("logp", &args.logp)? {
        "f32" => group_call::<f32>(&args),
        "bf16" => group_call::<bf16>(&args),
        _ => group_call::<f16>(&args),
    })
}

struct GroupArgs {
    device: usize,
    stream: u64,
    logp: Desc,
    layout: GroupLayout,
    scores: Option<Desc>,
    logp_old: Option<Desc>,
    target: Option<Desc>,
    tcfg: tpo::TargetConfig,
    fcfg: tpo::FitConfig,
    outs: HashMap<String, Desc>,
}

fn group_call<T: DeviceFloat>(a: &GroupArgs) -> PyResult<()> {
    let tpo = backend(a.device, a.stream)?;
    let dl = tpo.layout(&a.layout).map_err(value_error)?;
    let l = borrow::<T>(&tpo, "logp", &a.logp, T::SUFFIX)?;
    let stats = a.outs.contains_key("stats");
    let fcfg = tpo::FitConfig { diagnostics: stats, ..a.fcfg };
    let fit = match (&a.scores, &a.target) {
        (None, Some(q)) => {
            if a.logp_old.is_some() {
                return fail("a stored target is given: logp_old must then be None".into());
            }
            let q = borrow::<f32>(&tpo, "target", q, "f32")?;
            let mut out = tpo.alloc_fit::<T>(&dl, stats).map_err(value_error)?;
            tpo.fit(&l, &q, &dl, &fcfg, &mut out).map_err(value_error)?;
            put(&tpo, &a.outs, "target", "f32", 0, &q)?;
            out
        }
        (Some(s), None) => {
            let s = borrow::<f32>(&tpo, "scores", s, "f32")?;
            let old = borrow_opt::<T>(&tpo, "logp_old", &a.logp_old, T::SUFFIX)?;
            let mut out = tpo.alloc_fused::<T>(&dl, stats).map_err(value_error)?;
            tpo.target_and_fit(&l, old.as_deref(), &s, &dl, &a.tcfg, &fcfg, &mut out).map_err(value_error)?;
            put(&tpo, &a.outs, "target", "f32", 0, &out.q)?;
            out.fit
        }
        (Some(_), Some(_)) => {
            return fail(
                "a stored target is given: scores must then be None (the target is already built)".into(),
            )
        }
        (None, None) => return fail("scores are required (or a stored target from an earlier call)".into()),
    };
    put(&tpo, &a.outs, "loss", "f32", 0, &fit.loss)?;
    put(&tpo, &a.outs, "grad", T::SUFFIX, 0, &fit.grad)?;
    put_stats(&tpo, &a.outs, &fit)?;
    // The copies are queued first: the status read is the call's one wait on the stream, and it
    // comes after them (the library's buffers are freed in stream order after it).
    tpo.check(&fit.status, &dl).map_err(value_error)
}

/// The token batch of a path call, uploaded once for the call.
struct Tokens {
    seqs: DeviceLayout,
    groups: DeviceLayout,
}

fn layouts(tpo: &CudaTpo, seq_offsets: Vec<usize>, group_sizes: &[usize]) -> PyResult<Tokens> {
    let seqs = GroupLayout::from_offsets(seq_offsets).map_err(value_error)?;
    let groups = GroupLayout::from_sizes(group_sizes).map_err(value_error)?;
    Ok(Tokens {
        seqs: tpo.layout(&seqs).map_err(value_error)?,
        groups: tpo.layout(&groups).map_err(value_error)?,
    })
}

/// The per-sequence inputs of a path call: where the target comes from.
struct SeqInputs {
    scores: Option<Borrowed<f32>>,
    logp_old: Option<Borrowed<f32>>,
    target: Option<Borrowed<f32>>,
}

impl SeqInputs {
    fn read(
        tpo: &CudaTpo,
        scores: &Option<Desc>,
        logp_old: &Option<Desc>,
        target: &Option<Desc>,
    ) -> PyResult<Self> {
        Ok(SeqInputs {
            scores: borrow_opt(tpo, "scores", scores, "f32")?,
            logp_old: borrow_opt(tpo, "logp_old", logp_old, "f32")?,
            target: borrow_opt(tpo, "target", target, "f32")?,
        })
    }

    fn source(&self) -> PyResult<DeviceTarget<'_>> {
        match (&self.scores, &self.logp_old, &self.target) {
            (None, None, Some(q)) => Ok(DeviceTarget::Stored { target: q }),
            (Some(s), None, None) => Ok(DeviceTarget::OnPolicy { scores: s }),
            (Some(s), Some(o), None) => Ok(DeviceTarget::Rollout { logp_old: o, scores: s }),
            (_, _, Some(_)) => {
                fail("a stored target is given: scores and logp_old must then be None (the target is already built)".into())
            }
            (None, _, None) => fail("scores are required (or a stored target from an earlier call)".into()),
        }
    }
}

/// Path outputs shared by the logits and hidden calls: loss, target, seq_logp, stats,
/// token_logp, token_entropy.
fn put_path<G: DeviceFloat>(
    tpo: &CudaTpo,
    outs: &HashMap<String, Desc>,
    p: &tpo::cuda::LogitsPathBuffers<G>,
    inputs: &SeqInputs,
) -> PyResult<()> {
    put(tpo, outs, "loss", "f32", 0, &p.group.fit.loss)?;
    match &inputs.target {
        Some(q) => put(tpo, outs, "target", "f32", 0, q)?,
        None => put(tpo, outs, "target", "f32", 0, &p.group.q)?,
    }
    put(tpo, outs, "seq_logp", "f32", 0, &p.seq_logp)?;
    put(tpo, outs, "token_logp", "f32", 0, &p.tokens.logp)?;
    if let Some(e) = p.tokens.entropy.as_ref() {
        put(tpo, outs, "token_entropy", "f32", 0, e)?;
    }
    put_stats(tpo, outs, &p.group.fit)
}

/// The sequence batch of a path call, a dict from `tpo/_cuda.py`: token ids (int32), the
/// sequences' offsets, the completion mask (uint8), the group sizes over the sequences, and the
/// target's source (`scores` with optional `logp_old`, or a stored `target`; float32).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct PathBatch {
    tokens: Desc,
    seq_offsets: Vec<usize>,
    mask: Desc,
    group_sizes: Vec<usize>,
    scores: Option<Desc>,
    logp_old: Option<Desc>,
    target: Option<Desc>,
}

/// A path call's arguments, read once.
struct PathArgs {
    device: usize,
    stream: u64,
    batch: PathBatch,
    cfg: PathConfig,
    outs: HashMap<String, Desc>,
}

impl PathArgs {
    fn read(
        device: usize,
        stream: u64,
        batch: PathBatch,
        o: PathOpts,
        outs: &Bound<'_, PyDict>,
    ) -> PyResult<Self> {
        let cfg = o.config()?;
        Ok(PathArgs { device, stream, batch, cfg, outs: outputs(outs)? })
    }
}

/// TPO from logits on CUDA. Without `grad_in_place`, the forward
/// ([`CudaTpo::tpo_forward_from_logits`]: the logits are only read) writes `outs` (`loss`,
/// `target`, `seq_logp`, `stats`, `token_logp`, `token_entropy`); with it (a descriptor of a
/// copy of the logits that the caller gave up), the backward writes `dL/dlogits` over that copy
/// ([`CudaTpo::tpo_from_logits_borrowed`]).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn cuda_loss_from_logits(
    py: Python<'_>,
    device: usize,
    stream: u64,
    logits: Desc,
    vocab: usize,
    batch: PathBatch,
    opts: PathOpts,
    grad_in_place: Option<Desc>,
    outs: &Bound<'_, PyDict>,
) -> PyResult<()> {
    let a = PathArgs::read(device, stream, batch, opts, outs)?;
    py.detach(|| match float_kind("logits", &logits)? {
        "f32" => logits_call::<f32>(&a, &logits, vocab, grad_in_place.as_ref()),
        "bf16" => logits_call::<bf16>(&a, &logits, vocab, grad_in_place.as_ref()),
        _ => logits_call::<f16>(&a, &logits, vocab, grad_in_place.as_ref()),
    })
}

fn logits_call<T: DeviceFloat>(
    a: &PathArgs,
    logits: &Desc,
    vocab: usize,
    grad: Option<&Desc>,
) -> PyResult<()> {
    let tpo = backend(a.device, a.stream)?;
    let t = layouts(&tpo, a.batch.seq_offsets.clone(), &a.batch.group_sizes)?;
    // Token ids cross as int32, read as u32: a negative id becomes >= 2^31 and is refused by the
    // kernel as out of the vocabulary.
    let y = borrow::<u32>(&tpo, "tokens", &a.batch.tokens, "i32")?;
    let m = borrow::<u8>(&tpo, "completion_mask", &a.batch.mask, "u8")?;
    let inputs = SeqInputs::read(&tpo, &a.batch.scores, &a.batch.logp_old, &a.batch.target)?;
    let source = inputs.source()?;
    let batch = DeviceSequenceBatch { tokens: &y, seqs: &t.seqs, mask: &m, groups: &t.groups };
    let alloc = PathAlloc {
        entropy: a.cfg.tokens.entropy,
        stats: a.outs.contains_key("stats"),
        in_place: true,
        stored_target: inputs.target.is_some(),
    };
    let cfg = PathConfig { fit: tpo::FitConfig { diagnostics: alloc.stats, ..a.cfg.fit }, ..a.cfg };
    let mut out = tpo.alloc_logits_path::<T>(vocab, &t.seqs, &t.groups, alloc).map_err(value_error)?;
    match grad {
        None => {
            let z = borrow::<T>(&tpo, "logits", logits, T::SUFFIX)?;
            tpo.tpo_forward_from_logits(&z, vocab, &batch, source, &cfg, &mut out).map_err(value_error)?;
        }
        Some(g) => {
            let mut z = borrow::<T>(&tpo, "logits (gradient buffer)", g, T::SUFFIX)?;
            if z.len() != logits.1 {
                return fail(format!("gradient buffer: {} elements, the logits have {}", z.len(), logits.1));
            }
            tpo.tpo_from_logits_borrowed(&mut z, vocab, &batch, source, &cfg, &mut out)
                .map_err(value_error)?;
        }
    }
    // Copies first, then the status reads, which wait on the stream once (see group_call).
    put_path(&tpo, &a.outs, &out, &inputs)?;
    tpo.check(&out.tokens.status, &t.seqs).map_err(value_error)?;
    tpo.check(&out.group.fit.status, &t.groups).map_err(value_error)
}

/// TPO from hidden states `[T, dim]` and the lm_head `[V, dim]` (both bfloat16) on CUDA:
/// [`FusedLinear::tpo_from_hidden`] with a logits workspace of at most `memory_budget` bytes.
/// `outs` as for [`cuda_loss_from_logits`], plus `grad_hidden` (f32, T dim) and `grad_weight`
/// (f32, V dim).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn cuda_loss_from_hidden(
    py: Python<'_>,
    device: usize,
    stream: u64,
    hidden: Desc,
    weight: Desc,
    dim: usize,
    batch: PathBatch,
    opts: PathOpts,
    memory_budget: usize,
    outs: &Bound<'_, PyDict>,
) -> PyResult<()> {
    let a = PathArgs::read(device, stream, batch, opts, outs)?;
    py.detach(|| hidden_call(&a, &hidden, &weight, dim, memory_budget))
}

/// The key of a cached [`FusedLinear`]: device, stream, vocabulary, hidden size, budget.
type LinearKey = (usize, u64, usize, usize, usize);

/// The last [`FusedLinear`] of each device, kept for the next call with the same key: its cuBLAS
/// handle (whose creation and destruction cost, and whose destruction waits for the device) and
/// its logits workspace (`memory_budget` bytes, held outside PyTorch's allocator meanwhile).
fn linear_cache() -> &'static Mutex<HashMap<usize, (LinearKey, FusedLinear)>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, (LinearKey, FusedLinear)>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn hidden_call(a: &PathArgs, hidden: &Desc, weight: &Desc, dim: usize, budget: usize) -> PyResult<()> {
    let tpo = backend(a.device, a.stream)?;
    if dim == 0 || !weight.1.is_multiple_of(dim) {
        return fail(format!("lm_head_weight: {} elements is not a whole number of rows of {dim}", weight.1));
    }
    let vocab = weight.1 / dim;
    let t = layouts(&tpo, a.batch.seq_offsets.clone(), &a.batch.group_sizes)?;
    let h = borrow::<bf16>(&tpo, "hidden", hidden, "bf16")?;
    let w = borrow::<bf16>(&tpo, "lm_head_weight", weight, "bf16")?;
    let y = borrow::<u32>(&tpo, "tokens", &a.batch.tokens, "i32")?;
    let m = borrow::<u8>(&tpo, "completion_mask", &a.batch.mask, "u8")?;
    let inputs = SeqInputs::read(&tpo, &a.batch.scores, &a.batch.logp_old, &a.batch.target)?;
    let source = inputs.source()?;
    let batch = DeviceSequenceBatch { tokens: &y, seqs: &t.seqs, mask: &m, groups: &t.groups };
    let alloc = PathAlloc {
        entropy: a.cfg.tokens.entropy,
        stats: a.outs.contains_key("stats"),
        in_place: true,
        stored_target: inputs.target.is_some(),
    };
    let cfg = PathConfig { fit: tpo::FitConfig { diagnostics: alloc.stats, ..a.cfg.fit }, ..a.cfg };
    // Without gradient outputs (the autograd forward), only the forward half runs.
    let grads = a.outs.contains_key("grad_hidden") || a.outs.contains_key("grad_weight");
    let key = (a.device, a.stream, vocab, dim, budget);
    let mut cache = linear_cache().lock().unwrap_or_else(|e| e.into_inner());
    let fl = match cache.remove(&a.device) {
        Some((k, fl)) if k == key => fl,
        _ => FusedLinear::new(&tpo, vocab, dim, budget).map_err(value_error)?,
    };
    let fl = &mut cache.entry(a.device).or_insert((key, fl)).1;
    let mut out = fl.alloc_outputs(&tpo, &t.seqs, &t.groups, alloc).map_err(value_error)?;
    if grads {
        fl.tpo_from_hidden(&tpo, &h, &w, &batch, source, &cfg, &mut out).map_err(value_error)?;
    } else {
        fl.tpo_forward_from_hidden(&tpo, &h, &w, &batch, source, &cfg, &mut out).map_err(value_error)?;
    }
    drop(cache);
    // Copies first, then the status reads, which wait on the stream once (see group_call).
    put_path(&tpo, &a.outs, &out.path, &inputs)?;
    put(&tpo, &a.outs, "grad_hidden", "f32", 0, &out.grad_hidden)?;
    put(&tpo, &a.outs, "grad_weight", "f32", 0, &out.grad_weight)?;
    tpo.check(&out.path.tokens.status, &t.seqs).map_err(value_error)?;
    tpo.check(&out.path.group.fit.status, &t.groups).map_err(value_error)
}

/// Device memory made by the library itself (not by PyTorch): what the tests borrow on the
/// emulated device, where PyTorch has no CUDA. `DeviceBuffer(device, data)` uploads bytes;
/// `DeviceBuffer.poisoned(device, nbytes)` holds `0xFF` bytes (NaN in every float type).
#[pyclass(module = "tpo._native")]
pub struct DeviceBuffer {
    tpo: Arc<CudaTpo>,
    buf: CudaSlice<u8>,
}

#[pymethods]
impl DeviceBuffer {
    #[new]
    fn new(py: Python<'_>, device: usize, data: &[u8]) -> PyResult<Self> {
        let tpo = base(device)?;
        let buf = py
            .detach(|| tpo.to_device(if data.is_empty() { &[0u8][..] } else { data }))
            .map_err(value_error)?;
        tpo.synchronize().map_err(value_error)?;
        Ok(Self { tpo, buf })
    }

    /// `nbytes` bytes of `0xFF`.
    #[staticmethod]
    fn poisoned(py: Python<'_>, device: usize, nbytes: usize) -> PyResult<Self> {
        Self::new(py, device, &vec![0xFFu8; nbytes.max(1)])
    }

    /// The device address (as `Tensor.data_ptr()`).
    #[getter]
    fn ptr(&self) -> u64 {
        self.buf.device_ptr(self.tpo.stream()).0
    }

    /// The contents (synchronises the library's stream).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let v = py.detach(|| self.tpo.to_host(&self.buf)).map_err(value_error)?;
        Ok(PyBytes::new(py, &v))
    }
}

/// A stream made by the library (as `torch.cuda.Stream()`); `handle` is its raw `CUstream`
/// (as `torch.cuda.Stream().cuda_stream`).
#[pyclass(module = "tpo._native")]
pub struct DeviceStream {
    stream: Arc<CudaStream>,
}

#[pymethods]
impl DeviceStream {
    #[new]
    fn new(device: usize) -> PyResult<Self> {
        let tpo = base(device)?;
        let stream = tpo
            .stream()
            .context()
            .new_stream()
            .map_err(|e| value_error(tpo::TpoError::Cuda(format!("cannot create a stream: {e:?}"))))?;
        Ok(Self { stream })
    }

    #[getter]
    fn handle(&self) -> u64 {
        self.stream.cu_stream() as u64
    }

    /// Waits for the stream's work.
    fn synchronize(&self) -> PyResult<()> {
        self.stream.synchronize().map_err(|e| value_error(tpo::TpoError::Cuda(format!("{e:?}"))))
    }
}

/// Adds the CUDA functions and classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_group_loss, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_loss_from_logits, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_loss_from_hidden, m)?)?;
    m.add_class::<DeviceBuffer>()?;
    m.add_class::<DeviceStream>()?;
    Ok(())
}
