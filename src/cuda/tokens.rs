//! Token-level CUDA calls: log-probs from logits, masked sequence sums, the gradient broadcast and
//! the backward to the logits, and the end-to-end path from logits to `dL/dlogits` (see
//! [`crate::cpu::tokens`] for the formulas and the f64 reference).
//!
//! Precision: all arithmetic is f32 on the logits as stored. Against the f64 reference on the
//! same stored values, f32 outputs (log-probs, lse, entropy, sequence sums) are within
//! `1e-5 (|r| + 1)`, and a logits gradient `g (onehot - p) / tau` within `1e-5 (|r| + |g| / tau)`
//! plus half an ulp of its storage type (`2^-9` relative for bf16, `2^-12` for f16). Storing
//! logits in bf16 moves a log-prob by up to `2^-8 max|z| / tau` before any kernel runs.

use super::{cuda_err, CudaTpo, DeviceFloat, DeviceLayout, DeviceStatus, FusedBuffers, KernelKey};
use crate::cpu::tokens::{PathConfig, SeqReduce, TokenConfig};
use crate::error::{Result, TpoError};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

pub(super) const KERNEL_KEYS: [KernelKey; 8] = [
    KernelKey::new("token_fwd", "", "f32", ""),
    KernelKey::new("token_fwd", "", "bf16", ""),
    KernelKey::new("token_fwd", "", "f16", ""),
    KernelKey::new("token_bwd", "", "f32", ""),
    KernelKey::new("token_bwd", "", "bf16", ""),
    KernelKey::new("token_bwd", "", "f16", ""),
    KernelKey::new("seq_reduce", "", "", ""),
    KernelKey::new("seq_broadcast", "", "", ""),
];
const ROW_THREADS: u32 = 256;

/// Must match `struct TokenParams` in kernels/tokens.cu.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct TokenParams {
    pub(super) logits: u64,
    pub(super) grad_out: u64,
    pub(super) tokens: u64,
    pub(super) logp: u64,
    pub(super) lse: u64,
    pub(super) row_max: u64,
    pub(super) log_sum: u64,
    pub(super) entropy: u64,
    pub(super) token_grad: u64,
    pub(super) status: u64,
    pub(super) rows: i64,
    pub(super) vocab: i64,
    pub(super) ld: i64,
    pub(super) col0: i64,
    pub(super) row0: i64,
    pub(super) inv_tau: f32,
    pub(super) pad: i32,
}
// SAFETY: repr(C), Copy, plain integers and floats matching the C struct passed by value.
unsafe impl DeviceRepr for TokenParams {}

impl TokenParams {
    /// `rows` whole rows of `vocab` logits (row stride `vocab`), no buffer set yet.
    pub(super) fn rows(rows: usize, vocab: usize, inv_tau: f32) -> Self {
        let (rows, vocab) = (rows as i64, vocab as i64);
        #[rustfmt::skip]
        let p = Self {
            logits: 0, grad_out: 0, tokens: 0, logp: 0, lse: 0, row_max: 0, log_sum: 0, entropy: 0,
            token_grad: 0, status: 0, rows, vocab, ld: vocab, col0: 0, row0: 0, inv_tau, pad: 0,
        };
        p
    }
}

/// Must match `struct SeqParams` in kernels/tokens.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SeqParams {
    token_logp: u64,
    offsets: u64,
    mask: u64,
    seq_grad: u64,
    seq_out: u64,
    token_grad_out: u64,
    n_seqs: i64,
    k: i64,
    mean: i32,
    pad: i32,
}
// SAFETY: as for TokenParams.
unsafe impl DeviceRepr for SeqParams {}

/// The device side of a batch (see [`crate::cpu::tokens::SequenceBatch`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceSequenceBatch<'a> {
    /// Sampled token ids `[T]`.
    pub tokens: &'a CudaSlice<u32>,
    /// Sequences as ranges of the `T` tokens.
    pub seqs: &'a DeviceLayout,
    /// Completion mask `[T]`, 1 for tokens that count towards `l_i`.
    pub mask: &'a CudaSlice<u8>,
    /// Groups as ranges of sequences.
    pub groups: &'a DeviceLayout,
}

/// Where the group target comes from on the device (see [`crate::cpu::tokens::TargetSource`]).
#[derive(Debug, Clone, Copy)]
pub enum DeviceTarget<'a> {
    /// First epoch, on-policy: the target is built from the sequence log-probs themselves.
    OnPolicy {
        /// One score per sequence.
        scores: &'a CudaSlice<f32>,
    },
    /// First epoch with the rollout engine's sequence log-probs.
    Rollout {
        /// `l_old`, one per sequence.
        logp_old: &'a CudaSlice<f32>,
        /// One score per sequence.
        scores: &'a CudaSlice<f32>,
    },
    /// A later epoch: the target stored at rollout (e.g. [`CudaTpo::target`]'s output).
    Stored {
        /// `q`, one per sequence.
        target: &'a CudaSlice<f32>,
    },
}

/// What [`CudaTpo::alloc_logits_path`] allocates besides the required buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathAlloc {
    /// Per-token entropy.
    pub entropy: bool,
    /// Per-group diagnostics.
    pub stats: bool,
    /// Write `dL/dlogits` over the logits (no `grad_logits` buffer).
    pub in_place: bool,
    /// The batch will use [`DeviceTarget::Stored`] (diagnostics then have the fit's 3 rows).
    pub stored_target: bool,
}

/// Per-token outputs of [`CudaTpo::token_logprobs`], allocated once for `rows` tokens.
#[derive(Debug)]
pub struct TokenBuffers {
    /// `logp_t` of the sampled tokens.
    pub logp: CudaSlice<f32>,
    /// `lse_t` of the tempered logits.
    pub lse: CudaSlice<f32>,
    /// The row maximum `m_t` of the raw logits, read by the backward.
    pub row_max: CudaSlice<f32>,
    /// `log S_t = lse_t - m_t / tau`, kept apart from `m_t` so the backward's
    /// `p = exp((z - m) / tau - log S)` keeps its precision for large logits.
    pub log_sum: CudaSlice<f32>,
    /// `entropy_t`, when allocated.
    pub entropy: Option<CudaSlice<f32>>,
    /// The call's error word.
    pub status: DeviceStatus,
}

/// Everything [`CudaTpo::tpo_from_logits`] writes, allocated once for a batch shape.
#[derive(Debug)]
pub struct LogitsPathBuffers<G: DeviceFloat> {
    /// Token log-probs, lse, entropy.
    pub tokens: TokenBuffers,
    /// `l_i` per sequence.
    pub seq_logp: CudaSlice<f32>,
    /// Target, loss, per-group loss, `dL/dl` per sequence, diagnostics (the group call).
    pub group: FusedBuffers<f32>,
    /// `g_t`, the per-token upstream gradient.
    pub token_grad: CudaSlice<f32>,
    /// `dL/dlogits` (unless written in place over the logits).
    pub grad_logits: Option<CudaSlice<G>>,
}

impl CudaTpo {
    /// Allocates [`TokenBuffers`] for `rows` tokens.
    pub fn alloc_tokens(&self, rows: usize, entropy: bool) -> Result<TokenBuffers> {
        Ok(TokenBuffers {
            logp: self.zeros(rows)?,
            lse: self.zeros(rows)?,
            row_max: self.zeros(rows)?,
            log_sum: self.zeros(rows)?,
            entropy: if entropy { Some(self.zeros(rows)?) } else { None },
            status: self.status()?,
        })
    }

    /// Allocates [`LogitsPathBuffers`] for a batch shape, once.
    pub fn alloc_logits_path<G: DeviceFloat>(
        &self,
        vocab: usize,
        seqs: &DeviceLayout,
        groups: &DeviceLayout,
        opts: PathAlloc,
    ) -> Result<LogitsPathBuffers<G>> {
        let rows = seqs.host.len();
        let mut group = self.alloc_fused::<f32>(groups, opts.stats)?;
        if opts.stats && opts.stored_target {
            group.fit.stats = Some(self.zeros(3 * groups.host.num_groups())?);
        }
        Ok(LogitsPathBuffers {
            tokens: self.alloc_tokens(rows, opts.entropy)?,
            seq_logp: self.zeros(seqs.host.num_groups())?,
            group,
            token_grad: self.zeros(rows)?,
            grad_logits: if opts.in_place { None } else { Some(self.zeros(rows * vocab)?) },
        })
    }

    /// Token log-probs from logits `[rows, vocab]` in one pass (see [`crate::cpu::tokens::token_logprobs`]).
    pub fn token_logprobs<T: DeviceFloat>(
        &self,
        logits: &CudaSlice<T>,
        vocab: usize,
        tokens: &CudaSlice<u32>,
        cfg: &TokenConfig,
        out: &mut TokenBuffers,
    ) -> Result<()> {
        let rows = check_logits(logits.len(), vocab, tokens.len(), cfg)?;
        if [out.logp.len(), out.lse.len(), out.row_max.len(), out.log_sum.len()].iter().any(|&l| l != rows)
            || out.entropy.as_ref().is_some_and(|e| e.len() != rows)
        {
            return Err(TpoError::LengthMismatch {
                name: "token outputs",
                got: out.logp.len(),
                expected: rows,
            });
        }
        let _range = self.range("tpo::token_logprobs");
        self.reset(&mut out.status)?;
        let s = &self.stream;
        let (p_z, _a) = logits.device_ptr(s);
        let (p_y, _b) = tokens.device_ptr(s);
        let (p_l, _c) = out.logp.device_ptr_mut(s);
        let (p_lse, _d) = out.lse.device_ptr_mut(s);
        let (p_e, _e) = super::opt_ptr_mut(out.entropy.as_mut(), s);
        let (p_st, _f) = out.status.0.device_ptr_mut(s);
        let (p_m, _g) = out.row_max.device_ptr_mut(s);
        let (p_ls, _h) = out.log_sum.device_ptr_mut(s);
        let params = TokenParams {
            logits: p_z,
            tokens: p_y,
            logp: p_l,
            lse: p_lse,
            row_max: p_m,
            log_sum: p_ls,
            entropy: p_e,
            status: p_st,
            ..TokenParams::rows(rows, vocab, (1.0 / cfg.temperature) as f32)
        };
        self.launch_rows(KernelKey::new("token_fwd", "", T::SUFFIX, ""), rows, params)
    }

    /// `dL/dz = g_t (onehot(y_t) - softmax(z_t / tau)) / tau` into `grad` (shaped like the
    /// logits, in their dtype), for any per-token upstream `token_grad`; reads the row statistics
    /// `fwd` written by [`token_logprobs`](Self::token_logprobs) on the same logits.
    #[allow(clippy::too_many_arguments)]
    pub fn logits_backward<T: DeviceFloat>(
        &self,
        logits: &CudaSlice<T>,
        vocab: usize,
        tokens: &CudaSlice<u32>,
        fwd: &TokenBuffers,
        token_grad: &CudaSlice<f32>,
        cfg: &TokenConfig,
        grad: &mut CudaSlice<T>,
    ) -> Result<()> {
        let rows = check_logits(logits.len(), vocab, tokens.len(), cfg)?;
        if grad.len() != logits.len() {
            return Err(TpoError::LengthMismatch {
                name: "gradient output",
                got: grad.len(),
                expected: logits.len(),
            });
        }
        check_rows_len(rows, fwd, token_grad.len())?;
        let s = &self.stream;
        let (p_z, _a) = logits.device_ptr(s);
        let (p_g, _b) = grad.device_ptr_mut(s);
        self.launch_bwd::<T>(p_z, p_g, vocab, rows, tokens, fwd, token_grad, cfg)
    }

    /// [`logits_backward`](Self::logits_backward) written over the logits buffer itself, saving
    /// a `[rows, vocab]` allocation (the logits are consumed).
    pub fn logits_backward_in_place<T: DeviceFloat>(
        &self,
        logits: &mut CudaSlice<T>,
        vocab: usize,
        tokens: &CudaSlice<u32>,
        fwd: &TokenBuffers,
        token_grad: &CudaSlice<f32>,
        cfg: &TokenConfig,
    ) -> Result<()> {
        let rows = check_logits(logits.len(), vocab, tokens.len(), cfg)?;
        check_rows_len(rows, fwd, token_grad.len())?;
        let s = &self.stream;
        let (p_z, _a) = logits.device_ptr_mut(s);
        self.launch_bwd::<T>(p_z, p_z, vocab, rows, tokens, fwd, token_grad, cfg)
    }

    /// Masked per-sequence reduction of token log-probs (`seqs` is a layout over tokens; `mask`
    /// holds 1 for completion tokens).
    pub fn sequence_logprobs(
        &self,
        token_logp: &CudaSlice<f32>,
        seqs: &DeviceLayout,
        mask: &CudaSlice<u8>,
        reduce: SeqReduce,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.seq_call("seq_reduce", seqs, mask, reduce, Some(token_logp), None, Some(out), None)
    }

    /// Broadcasts per-sequence gradients to per-token upstream gradients (the adjoint of
    /// [`sequence_logprobs`](Self::sequence_logprobs)).
    pub fn broadcast_sequence_grad(
        &self,
        seq_grad: &CudaSlice<f32>,
        seqs: &DeviceLayout,
        mask: &CudaSlice<u8>,
        reduce: SeqReduce,
        token_grad: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.seq_call("seq_broadcast", seqs, mask, reduce, None, Some(seq_grad), None, Some(token_grad))
    }

    /// The whole path on the device (see [`crate::cpu::tokens::tpo_from_logits`]): token
    /// log-probs, sequence sums, the TPO group call (building the target, or fitting a stored
    /// one), the broadcast and the backward to the logits (in place when `out.grad_logits` is
    /// `None`). Seven launches, no allocation, no host synchronisation.
    pub fn tpo_from_logits<T: DeviceFloat>(
        &self,
        logits: &mut CudaSlice<T>,
        vocab: usize,
        batch: &DeviceSequenceBatch,
        source: DeviceTarget,
        cfg: &PathConfig,
        out: &mut LogitsPathBuffers<T>,
    ) -> Result<()> {
        let _range = self.range("tpo::tpo_from_logits");
        self.token_logprobs(logits, vocab, batch.tokens, &cfg.tokens, &mut out.tokens)?;
        self.sequence_group_backward(batch, source, cfg, out)?;
        let (tok, y) = (&cfg.tokens, batch.tokens);
        match out.grad_logits.as_mut() {
            Some(g) => self.logits_backward(logits, vocab, y, &out.tokens, &out.token_grad, tok, g),
            None => self.logits_backward_in_place(logits, vocab, y, &out.tokens, &out.token_grad, tok),
        }
    }

    /// The forward half of [`tpo_from_logits`](Self::tpo_from_logits): token log-probs, sequence
    /// sums and the group call (loss, target, per-sequence and per-token gradients
    /// `dL/dl_i`, `g_t`), without the backward to the logits, which are only read. A trainer that
    /// needs the loss now and `dL/dlogits` later (an autograd forward) calls this, then
    /// [`logits_backward`](Self::logits_backward) with `out.tokens` and `out.token_grad`. Five
    /// launches, no allocation, no host synchronisation.
    pub fn tpo_forward_from_logits<T: DeviceFloat, G: DeviceFloat>(
        &self,
        logits: &CudaSlice<T>,
        vocab: usize,
        batch: &DeviceSequenceBatch,
        source: DeviceTarget,
        cfg: &PathConfig,
        out: &mut LogitsPathBuffers<G>,
    ) -> Result<()> {
        let _range = self.range("tpo::tpo_forward_from_logits");
        self.token_logprobs(logits, vocab, batch.tokens, &cfg.tokens, &mut out.tokens)?;
        self.sequence_group_backward(batch, source, cfg, out)
    }

    /// The part of the path between the token log-probs and the logits backward: sequence sums,
    /// the group call, and the broadcast to per-token upstream gradients.
    pub(super) fn sequence_group_backward<G: DeviceFloat>(
        &self,
        batch: &DeviceSequenceBatch,
        source: DeviceTarget,
        cfg: &PathConfig,
        out: &mut LogitsPathBuffers<G>,
    ) -> Result<()> {
        let DeviceSequenceBatch { seqs, mask, groups, .. } = *batch;
        if groups.host.len() != seqs.host.num_groups() {
            return Err(TpoError::LengthMismatch {
                name: "sequences (the group layout counts sequences)",
                got: seqs.host.num_groups(),
                expected: groups.host.len(),
            });
        }
        let reduce = cfg.tokens.reduce;
        self.sequence_logprobs(&out.tokens.logp, seqs, mask, reduce, &mut out.seq_logp)?;
        match source {
            DeviceTarget::OnPolicy { scores } => self.target_and_fit(
                &out.seq_logp,
                None,
                scores,
                groups,
                &cfg.target,
                &cfg.fit,
                &mut out.group,
            )?,
            DeviceTarget::Rollout { logp_old, scores } => self.target_and_fit(
                &out.seq_logp,
                Some(logp_old),
                scores,
                groups,
                &cfg.target,
                &cfg.fit,
                &mut out.group,
            )?,
            DeviceTarget::Stored { target } => {
                self.fit(&out.seq_logp, target, groups, &cfg.fit, &mut out.group.fit)?
            }
        }
        self.broadcast_sequence_grad(&out.group.fit.grad, seqs, mask, reduce, &mut out.token_grad)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_bwd<T: DeviceFloat>(
        &self,
        p_z: u64,
        p_g: u64,
        vocab: usize,
        rows: usize,
        tokens: &CudaSlice<u32>,
        fwd: &TokenBuffers,
        token_grad: &CudaSlice<f32>,
        cfg: &TokenConfig,
    ) -> Result<()> {
        let _range = self.range("tpo::logits_backward");
        let s = &self.stream;
        let (p_y, _a) = tokens.device_ptr(s);
        let (p_m, _b) = fwd.row_max.device_ptr(s);
        let (p_ls, _d) = fwd.log_sum.device_ptr(s);
        let (p_tg, _c) = token_grad.device_ptr(s);
        let params = TokenParams {
            logits: p_z,
            grad_out: p_g,
            tokens: p_y,
            row_max: p_m,
            log_sum: p_ls,
            token_grad: p_tg,
            ..TokenParams::rows(rows, vocab, (1.0 / cfg.temperature) as f32)
        };
        self.launch_rows(KernelKey::new("token_bwd", "", T::SUFFIX, ""), rows, params)
    }

    pub(super) fn launch_rows(&self, key: KernelKey, rows: usize, params: TokenParams) -> Result<()> {
        let f = self.kernel(key)?;
        let grid = (rows as u64).min(u64::from(self.sm_count) * 16).max(1) as u32;
        let cfg =
            LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream.launch_builder(f);
        b.arg(&params);
        // SAFETY: the caller checked every buffer against the parameters: logits and the gradient
        // span at least (rows - 1) * ld + vocab elements (ld = vocab but for the fused linear
        // path's blocks, which it checks against its workspace), per-token buffers rows elements
        // from their (offset) pointers. The kernel reads and writes only columns 0..vocab of rows
        // 0..rows, and reads the `tokens[t]`-th logit only after checking `tokens[t] < vocab`.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&format!("launching {}", key.name()), e))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn seq_call(
        &self,
        kind: &'static str,
        seqs: &DeviceLayout,
        mask: &CudaSlice<u8>,
        reduce: SeqReduce,
        token_logp: Option<&CudaSlice<f32>>,
        seq_grad: Option<&CudaSlice<f32>>,
        seq_out: Option<&mut CudaSlice<f32>>,
        token_out: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let l = &seqs.host;
        l.check_len("mask", mask.len())?;
        for (n, len, want) in [
            ("token log-probs", token_logp.map(|x| x.len()), l.len()),
            ("sequence gradient", seq_grad.map(|x| x.len()), l.num_groups()),
            ("sequence output", seq_out.as_ref().map(|x| x.len()), l.num_groups()),
            ("token gradient output", token_out.as_ref().map(|x| x.len()), l.len()),
        ] {
            if let Some(got) = len.filter(|&g| g != want) {
                return Err(TpoError::LengthMismatch { name: n, got, expected: want });
            }
        }
        // Uniform sequence layouts have no offsets on the device: the kernel uses k instead.
        let s = &self.stream;
        let (p_off, _a) = super::opt_ptr(seqs.offsets.as_ref(), s);
        let (p_m, _b) = mask.device_ptr(s);
        let (p_tl, _c) = super::opt_ptr(token_logp, s);
        let (p_sg, _d) = super::opt_ptr(seq_grad, s);
        let (p_so, _e) = super::opt_ptr_mut(seq_out, s);
        let (p_to, _f) = super::opt_ptr_mut(token_out, s);
        let params = SeqParams {
            token_logp: p_tl,
            offsets: p_off,
            mask: p_m,
            seq_grad: p_sg,
            seq_out: p_so,
            token_grad_out: p_to,
            n_seqs: l.num_groups() as i64,
            k: l.uniform_size().unwrap_or(0) as i64,
            mean: i32::from(reduce == SeqReduce::Mean),
            pad: 0,
        };
        let key = KernelKey::new(kind, "", "", "");
        let f = self.kernel(key)?;
        let grid = (l.num_groups() as u64).div_ceil(8).min(u64::from(self.sm_count) * 32).max(1) as u32;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream.launch_builder(f);
        b.arg(&params);
        // SAFETY: offsets (or n_seqs * k for a uniform layout) end at mask.len(); every per-token and
        // per-sequence buffer the kernel touches was checked against the layout above.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&format!("launching {}", key.name()), e))?;
        Ok(())
    }
}

fn check_logits(len: usize, vocab: usize, rows: usize, cfg: &TokenConfig) -> Result<usize> {
    if !(cfg.temperature.is_finite() && cfg.temperature > 0.0) {
        return Err(TpoError::BadConfig {
            name: "temperature",
            requirement: "finite and > 0",
            got: cfg.temperature,
        });
    }
    let Some(expected) = rows.checked_mul(vocab).filter(|_| vocab > 0) else {
        return Err(if vocab == 0 {
            TpoError::LengthMismatch { name: "logits", got: len, expected: 0 }
        } else {
            TpoError::SizeOverflow(format!("{rows} rows x {vocab} vocabulary entries of logits"))
        });
    };
    if len != expected {
        return Err(TpoError::LengthMismatch { name: "logits", got: len, expected });
    }
    Ok(rows)
}

fn check_rows_len(rows: usize, fwd: &TokenBuffers, token_grad: usize) -> Result<()> {
    for (name, got) in
        [("row_max", fwd.row_max.len()), ("log_sum", fwd.log_sum.len()), ("token gradient", token_grad)]
    {
        if got != rows {
            return Err(TpoError::LengthMismatch { name, got, expected: rows });
        }
    }
    Ok(())
}
