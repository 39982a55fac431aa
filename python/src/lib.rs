//! `tpo._native`: the Python extension module behind the `tpo` package.
//!
//! The PyTorch ops of `tpo/__init__.py` hand this module their tensors as native-endian `f64`
//! bytes (widened exactly from `f32`/`bf16`/`f16` by torch; token ids as `i64`, masks as `u8`),
//! and get back the loss, the target, the diagnostics and the gradients as `f64` bytes. Every
//! computation is the crate's f64 CPU reference ([`tpo::cpu`]); every library error becomes a
//! Python `ValueError` with the library's one-line message. No `unsafe` in this file: the bytes
//! are copied into aligned vectors with `bytemuck`.
//!
//! CUDA tensors take another road (feature `cuda`, module `cuda`): the crate's kernels on the
//! tensors' own memory and PyTorch's current stream, no copy through the host.
//!
//! Each function takes a `grad_scale`: the forward calls it with 1, the backward with the
//! upstream gradient `d(objective)/d(loss)` and the target the forward returned, so the gradient
//! is the reference's `grad_scale * w * (sum(q) p - q)` chained through the token path.

#[cfg(feature = "cuda")]
mod cuda;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use tpo::cpu::tokens::{self, PathConfig, SeqReduce, SequenceBatch, TargetSource, TokenConfig};
use tpo::cpu::{self, GroupStats};
use tpo::{Anchor, FitConfig, GroupLayout, LossForm, Reduction, TargetConfig, TpoError};

fn value_error(e: TpoError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn fail<T>(msg: String) -> PyResult<T> {
    Err(PyValueError::new_err(msg))
}

/// Native-endian `f64`s from bytes (copied, so the alignment of the Python buffer does not matter).
fn f64s(name: &str, b: &[u8]) -> PyResult<Vec<f64>> {
    if !b.len().is_multiple_of(8) {
        return fail(format!("{name}: {} bytes is not a whole number of f64 values", b.len()));
    }
    Ok(bytemuck::pod_collect_to_vec::<u8, f64>(b))
}

fn i64s(name: &str, b: &[u8]) -> PyResult<Vec<i64>> {
    if !b.len().is_multiple_of(8) {
        return fail(format!("{name}: {} bytes is not a whole number of i64 values", b.len()));
    }
    Ok(bytemuck::pod_collect_to_vec::<u8, i64>(b))
}

fn out_bytes<'py>(py: Python<'py>, v: &[f64]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, bytemuck::cast_slice(v))
}

/// The target configuration from the Python arguments (validated by the library).
fn target_config(eta: f64, zero_std_threshold: f64, anchored: bool) -> TargetConfig {
    TargetConfig {
        eta,
        zero_std_threshold,
        anchor: if anchored { Anchor::Anchored } else { Anchor::NoAnchor },
    }
}

/// The fit configuration: `reduction` is "mean" or "sum"; a global group count turns "mean" into
/// [`Reduction::GlobalMean`].
fn fit_config(
    kl: bool,
    reduction: &str,
    global_num_groups: Option<f64>,
    grad_scale: f64,
) -> PyResult<FitConfig> {
    let reduction = match (reduction, global_num_groups) {
        ("mean", None) => Reduction::Mean,
        ("mean", Some(n)) => Reduction::GlobalMean(n),
        ("sum", None) => Reduction::Sum,
        ("sum", Some(_)) => {
            return fail("global_num_groups applies to reduction=\"mean\" only, got reduction=\"sum\"".into())
        }
        (r, _) => return fail(format!("reduction must be \"mean\" or \"sum\", got {r:?}")),
    };
    let form = if kl { LossForm::Kl } else { LossForm::CrossEntropy };
    Ok(FitConfig { form, reduction, grad_scale, diagnostics: true })
}

/// Where the target comes from: exactly one of a stored target, or scores (with optional
/// rollout log-probs).
enum Source {
    OnPolicy(Vec<f64>),
    Rollout(Vec<f64>, Vec<f64>),
    Stored(Vec<f64>),
}

impl Source {
    fn read(scores: Option<&[u8]>, logp_old: Option<&[u8]>, target: Option<&[u8]>) -> PyResult<Self> {
        match (scores, logp_old, target) {
            (None, None, Some(q)) => Ok(Source::Stored(f64s("target", q)?)),
            (Some(s), None, None) => Ok(Source::OnPolicy(f64s("scores", s)?)),
            (Some(s), Some(o), None) => Ok(Source::Rollout(f64s("logp_old", o)?, f64s("scores", s)?)),
            (_, _, Some(_)) => {
                fail("a stored target is given: scores and logp_old must then be None (the target is already built)".into())
            }
            (None, _, None) => fail("scores are required (or a stored target from an earlier call)".into()),
        }
    }

    fn as_tokens(&self) -> TargetSource<'_> {
        match self {
            Source::OnPolicy(s) => TargetSource::OnPolicy { scores: s },
            Source::Rollout(o, s) => TargetSource::Rollout { logp_old: o, scores: s },
            Source::Stored(q) => TargetSource::Stored { target: q },
        }
    }
}

fn put_stats(d: &Bound<'_, PyDict>, stats: &Option<GroupStats>) -> PyResult<()> {
    let py = d.py();
    if let Some(st) = stats {
        d.set_item("kl_q_p", out_bytes(py, &st.kl_q_p))?;
        d.set_item("entropy_q", out_bytes(py, &st.entropy_q))?;
        d.set_item("grad_norm", out_bytes(py, &st.grad_norm))?;
        match &st.kl_q_pold {
            Some(k) => d.set_item("kl_q_pold", out_bytes(py, k))?,
            None => d.set_item("kl_q_pold", py.None())?,
        }
    }
    Ok(())
}

/// TPO on sequence log-probs: [`cpu::target_and_fit`] (or [`cpu::fit`] with a stored target).
///
/// Returns a dict: `loss` (float), `group_loss`, `target`, `grad` (`dL/dl` times `grad_scale`),
/// `kl_q_p`, `entropy_q`, `grad_norm`, `kl_q_pold` (bytes of f64, or None).
#[pyfunction]
#[pyo3(signature = (logp, sizes, scores, logp_old, target, eta, zero_std_threshold, anchored, kl, reduction, global_num_groups, grad_scale))]
#[allow(clippy::too_many_arguments)]
fn group_loss<'py>(
    py: Python<'py>,
    logp: &[u8],
    sizes: Vec<usize>,
    scores: Option<&[u8]>,
    logp_old: Option<&[u8]>,
    target: Option<&[u8]>,
    eta: f64,
    zero_std_threshold: f64,
    anchored: bool,
    kl: bool,
    reduction: &str,
    global_num_groups: Option<f64>,
    grad_scale: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let layout = GroupLayout::from_sizes(&sizes).map_err(value_error)?;
    let l = f64s("logp", logp)?;
    let fcfg = fit_config(kl, reduction, global_num_groups, grad_scale)?;
    let tcfg = target_config(eta, zero_std_threshold, anchored);
    let source = Source::read(scores, logp_old, target)?;
    // The reference runs without the GIL: other Python threads go on meanwhile.
    let (q, fit) = py
        .detach(|| match source {
            Source::Stored(q) => cpu::fit(&l, &q, &layout, &fcfg).map(|f| (q, f)),
            Source::OnPolicy(s) => {
                cpu::target_and_fit(&l, None, &s, &layout, &tcfg, &fcfg).map(|r| (r.target, r.fit))
            }
            Source::Rollout(o, s) => {
                cpu::target_and_fit(&l, Some(&o), &s, &layout, &tcfg, &fcfg).map(|r| (r.target, r.fit))
            }
        })
        .map_err(value_error)?;
    let d = PyDict::new(py);
    d.set_item("loss", fit.loss)?;
    d.set_item("group_loss", out_bytes(py, &fit.group_loss))?;
    d.set_item("target", out_bytes(py, &q))?;
    d.set_item("grad", out_bytes(py, &fit.grad))?;
    put_stats(&d, &fit.stats)?;
    Ok(d)
}

/// The token side of a batch, read from the Python arguments.
struct Batch {
    tokens: Vec<u32>,
    seqs: GroupLayout,
    mask: Vec<bool>,
    groups: GroupLayout,
}

impl Batch {
    fn read(tokens: &[u8], seq_offsets: Vec<usize>, mask: &[u8], group_sizes: Vec<usize>) -> PyResult<Self> {
        let tokens = i64s("tokens", tokens)?
            .into_iter()
            .enumerate()
            .map(|(i, y)| match u32::try_from(y) {
                Ok(y) => Ok(y),
                Err(_) => fail(format!("tokens[{i}] is {y}: token ids must be in 0..V")),
            })
            .collect::<PyResult<Vec<u32>>>()?;
        let seqs = GroupLayout::from_offsets(seq_offsets).map_err(value_error)?;
        let groups = GroupLayout::from_sizes(&group_sizes).map_err(value_error)?;
        Ok(Batch { tokens, seqs, mask: mask.iter().map(|&m| m != 0).collect(), groups })
    }

    fn view(&self) -> SequenceBatch<'_> {
        SequenceBatch { tokens: &self.tokens, seqs: &self.seqs, mask: &self.mask, groups: &self.groups }
    }
}

/// The options of a path call, a dict from Python (`tpo/_common.py`'s `path_opts`): the token
/// side (`temperature`, `entropy`, `seq_reduce`), the target (`eta`, `zero_std_threshold`,
/// `anchored`) and the fit (`kl`, `reduction`, `global_num_groups`, `grad_scale`).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub(crate) struct PathOpts {
    temperature: f64,
    entropy: bool,
    seq_reduce: String,
    eta: f64,
    zero_std_threshold: f64,
    anchored: bool,
    kl: bool,
    reduction: String,
    global_num_groups: Option<f64>,
    grad_scale: f64,
}

impl PathOpts {
    /// The library's configuration (its checks give the errors).
    pub(crate) fn config(&self) -> PyResult<PathConfig> {
        let reduce = match self.seq_reduce.as_str() {
            "sum" => SeqReduce::Sum,
            "mean" => SeqReduce::Mean,
            r => return fail(format!("seq_reduce must be \"sum\" or \"mean\", got {r:?}")),
        };
        Ok(PathConfig {
            tokens: TokenConfig { temperature: self.temperature, entropy: self.entropy, reduce },
            target: target_config(self.eta, self.zero_std_threshold, self.anchored),
            fit: fit_config(self.kl, &self.reduction, self.global_num_groups, self.grad_scale)?,
        })
    }
}

fn put_logits_path(d: &Bound<'_, PyDict>, p: &tokens::LogitsPath) -> PyResult<()> {
    let py = d.py();
    d.set_item("loss", p.fit.loss)?;
    d.set_item("group_loss", out_bytes(py, &p.fit.group_loss))?;
    d.set_item("target", out_bytes(py, &p.target))?;
    d.set_item("seq_logp", out_bytes(py, &p.seq_logp))?;
    d.set_item("token_logp", out_bytes(py, &p.tokens.logp))?;
    match &p.tokens.entropy {
        Some(e) => d.set_item("token_entropy", out_bytes(py, e))?,
        None => d.set_item("token_entropy", py.None())?,
    }
    put_stats(d, &p.fit.stats)
}

/// TPO from logits `[T, vocab]`: [`tokens::tpo_from_logits`]. Returns what [`group_loss`] does
/// (but `grad`) plus `seq_logp`, `token_logp`, `token_entropy` and `grad_logits`.
#[pyfunction]
#[pyo3(signature = (logits, vocab, tokens, seq_offsets, mask, group_sizes, scores, logp_old, target, opts))]
#[allow(clippy::too_many_arguments)]
fn loss_from_logits<'py>(
    py: Python<'py>,
    logits: &[u8],
    vocab: usize,
    tokens: &[u8],
    seq_offsets: Vec<usize>,
    mask: &[u8],
    group_sizes: Vec<usize>,
    scores: Option<&[u8]>,
    logp_old: Option<&[u8]>,
    target: Option<&[u8]>,
    opts: PathOpts,
) -> PyResult<Bound<'py, PyDict>> {
    let z = f64s("logits", logits)?;
    let batch = Batch::read(tokens, seq_offsets, mask, group_sizes)?;
    let source = Source::read(scores, logp_old, target)?;
    let cfg = opts.config()?;
    let p = py
        .detach(|| tokens::tpo_from_logits(&z, vocab, &batch.view(), source.as_tokens(), &cfg))
        .map_err(value_error)?;
    let d = PyDict::new(py);
    put_logits_path(&d, &p)?;
    d.set_item("grad_logits", out_bytes(py, &p.grad_logits))?;
    Ok(d)
}

/// TPO from hidden states `[T, dim]` and the lm_head `[V, dim]`: [`tokens::tpo_from_hidden`].
/// Returns what [`loss_from_logits`] does plus `grad_hidden` and `grad_weight` (no `grad_logits`).
#[pyfunction]
#[pyo3(signature = (hidden, weight, dim, tokens, seq_offsets, mask, group_sizes, scores, logp_old, target, opts))]
#[allow(clippy::too_many_arguments)]
fn loss_from_hidden<'py>(
    py: Python<'py>,
    hidden: &[u8],
    weight: &[u8],
    dim: usize,
    tokens: &[u8],
    seq_offsets: Vec<usize>,
    mask: &[u8],
    group_sizes: Vec<usize>,
    scores: Option<&[u8]>,
    logp_old: Option<&[u8]>,
    target: Option<&[u8]>,
    opts: PathOpts,
) -> PyResult<Bound<'py, PyDict>> {
    let h = f64s("hidden", hidden)?;
    let w = f64s("lm_head_weight", weight)?;
    let batch = Batch::read(tokens, seq_offsets, mask, group_sizes)?;
    let source = Source::read(scores, logp_old, target)?;
    let cfg = opts.config()?;
    let p = py
        .detach(|| tokens::tpo_from_hidden(&h, &w, dim, &batch.view(), source.as_tokens(), &cfg))
        .map_err(value_error)?;
    let d = PyDict::new(py);
    put_logits_path(&d, &p.logits_path)?;
    d.set_item("grad_hidden", out_bytes(py, &p.grad_hidden))?;
    d.set_item("grad_weight", out_bytes(py, &p.grad_weight))?;
    Ok(d)
}

/// The extension module: the three paths above.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(group_loss, m)?)?;
    m.add_function(wrap_pyfunction!(loss_from_logits, m)?)?;
    m.add_function(wrap_pyfunction!(loss_from_hidden, m)?)?;
    #[cfg(feature = "cuda")]
    cuda::register(m)?;
    m.add("HAS_CUDA", cfg!(feature = "cuda"))?;
    Ok(())
}
