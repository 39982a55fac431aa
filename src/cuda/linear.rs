//! TPO from hidden states and the lm_head without materialising the logits.
//!
//! The schedule (which GEMMs and kernels run on which parts of which buffers) is
//! `linear_plan`'s (src/linear_plan.rs, internal), tested on the host in CI; this module turns its steps into cuBLAS
//! calls and kernel launches. In short: the forward computes the logits `z = h W^T` chunk by chunk
//! into a bf16 workspace, one GEMM of [`GEMM_TILE`] rows at a time, and reduces each chunk to
//! log-probs (keeping the row max and log-sum); after the sequence sums and the group loss, the
//! backward recomputes the logits block by block (all tokens by a block of the vocabulary, when
//! the workspace allows), turns each block into its gradient in place, and feeds it to
//! `dW[block] = dz^T h` and `dh += dz W[block]`, both accumulated in f32.
//!
//! Memory: the workspace (at most the caller's budget, at least `GEMM_TILE x V` bf16), one staging
//! tile `[GEMM_TILE, H]` and O(T) per-token buffers, besides the outputs.
//!
//! Determinism: every token's logits, and so its log-prob, come from a GEMM of the same shape
//! whatever the budget; all reductions run in a fixed order without atomics.
//!
//! Status: written without a GPU. The schedule is checked on the host against
//! [`crate::cpu::tokens::tpo_from_hidden`] (tests/linear_plan.rs); the GPU suite (tests/gpu.rs)
//! checks this module against the same reference, and the chunk-size independence, on a device.

use super::tokens::{DeviceSequenceBatch, DeviceTarget, LogitsPathBuffers, PathAlloc, TokenParams};
use super::{cuda_err, CudaTpo, DeviceLayout, KernelKey};
use crate::cpu::tokens::PathConfig;
use crate::error::{Result, TpoError};
use crate::linear_plan::{Buffer, GemmCall, LinearPlan, Step};
use cudarc::cublas::{result as blas, sys as bsys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use std::ffi::c_void;
use std::sync::Arc;

pub use crate::linear_plan::GEMM_TILE;

/// The fused linear + TPO call's workspace, sized once from a memory budget.
///
/// It is bound to the stream of the [`CudaTpo`] it was made with (its cuBLAS handle issues its
/// GEMMs there): every later call must pass a `CudaTpo` on that same stream, or it is refused,
/// since GEMMs and kernels on two unordered streams would race on the workspace.
pub struct FusedLinear {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    vocab: usize,
    dim: usize,
    workspace: CudaSlice<bf16>,
    stage_h: CudaSlice<bf16>,
    /// The last batch's plan and steps, reused while the batch size stays the same.
    schedule: Option<(LinearPlan, Vec<Step>)>,
}

/// Outputs of [`FusedLinear::tpo_from_hidden`].
#[derive(Debug)]
pub struct LinearOutputs {
    /// Token log-probs, sequence log-probs, target, loss, per-token gradients (as from logits;
    /// there is no `grad_logits`: the logits gradient lives only in the workspace).
    pub path: LogitsPathBuffers<bf16>,
    /// `dL/dh = sum_v dz[t, v] W[v]`, `[T, H]`, accumulated in f32 over vocabulary blocks.
    pub grad_hidden: CudaSlice<f32>,
    /// `dL/dW = sum_t dz[t, v] h[t]`, `[V, H]`, accumulated in f32.
    pub grad_weight: CudaSlice<f32>,
}

fn gemm_err(e: impl std::fmt::Debug) -> TpoError {
    TpoError::Cuda(format!("cuBLAS: {e:?}"))
}

/// `base` advanced by `elems` elements of `T`.
fn at<T>(base: u64, elems: usize) -> u64 {
    base + (elems * std::mem::size_of::<T>()) as u64
}

impl FusedLinear {
    /// A workspace for a vocabulary of `vocab` and hidden size `dim`, using at most
    /// `workspace_budget` bytes for the bf16 logits workspace (rounded down to whole
    /// `GEMM_TILE x vocab` tiles, at least one).
    pub fn new(tpo: &CudaTpo, vocab: usize, dim: usize, workspace_budget: usize) -> Result<Self> {
        if vocab == 0 || dim == 0 || vocab > i32::MAX as usize || dim > i32::MAX as usize {
            return Err(TpoError::BadConfig {
                name: "vocab and hidden size",
                requirement: "in 1..2^31",
                got: vocab as f64,
            });
        }
        let elems = LinearPlan::workspace_elems(vocab, workspace_budget);
        let blas = CudaBlas::new(tpo.stream.clone()).map_err(|e| {
            TpoError::Cuda(format!(
                "cannot start cuBLAS (is libcublas from CUDA 13 on the library path?): {e:?}"
            ))
        })?;
        let (workspace, stage_h) = (tpo.zeros(elems)?, tpo.zeros(GEMM_TILE * dim)?);
        Ok(Self { blas, stream: tpo.stream.clone(), vocab, dim, workspace, stage_h, schedule: None })
    }

    /// Refuses a `CudaTpo` on another stream than the one this workspace was made for.
    fn same_stream(&self, tpo: &CudaTpo) -> Result<()> {
        if self.stream.cu_stream() == tpo.stream.cu_stream() {
            Ok(())
        } else {
            Err(TpoError::Cuda(
                "this FusedLinear was made with a CudaTpo on another stream: its cuBLAS handle issues \
                 its GEMMs there; make the FusedLinear with the CudaTpo you call it with"
                    .into(),
            ))
        }
    }

    /// Tokens per forward chunk for a batch of `tokens` (a multiple of [`GEMM_TILE`]); see
    /// [`plan`](Self::plan) for the backward's blocks.
    pub fn chunk_rows(&self, tokens: usize) -> Result<usize> {
        Ok(self.plan(tokens)?.forward_rows)
    }

    /// How a batch of `tokens` is split over the workspace.
    pub fn plan(&self, tokens: usize) -> Result<LinearPlan> {
        LinearPlan::new(tokens, self.vocab, self.dim, self.workspace.len())
    }

    /// Bytes of the logits workspace.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.len() * 2
    }

    /// Allocates the outputs for a batch (`opts.in_place` is implied: the logits gradient lives
    /// only in the workspace).
    pub fn alloc_outputs(
        &self,
        tpo: &CudaTpo,
        seqs: &DeviceLayout,
        groups: &DeviceLayout,
        opts: PathAlloc,
    ) -> Result<LinearOutputs> {
        self.same_stream(tpo)?;
        let t = seqs.host.len();
        let path =
            tpo.alloc_logits_path::<bf16>(self.vocab, seqs, groups, PathAlloc { in_place: true, ..opts })?;
        Ok(LinearOutputs {
            path,
            grad_hidden: tpo.zeros(t * self.dim)?,
            grad_weight: tpo.zeros(self.vocab * self.dim)?,
        })
    }

    /// The whole path from hidden states `[T, H]` and the lm_head `[V, H]` (both bf16) to the
    /// loss and the gradients for the hidden states and the weight (see
    /// [`crate::cpu::tokens::tpo_from_hidden`]). No host synchronisation, no allocation.
    #[allow(clippy::too_many_arguments)]
    pub fn tpo_from_hidden(
        &mut self,
        tpo: &CudaTpo,
        hidden: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        batch: &DeviceSequenceBatch,
        source: DeviceTarget,
        cfg: &PathConfig,
        out: &mut LinearOutputs,
    ) -> Result<()> {
        self.call(tpo, hidden, weight, batch, source, cfg, out, false)
    }

    /// The forward half of [`tpo_from_hidden`](Self::tpo_from_hidden): the logits GEMMs, the
    /// token log-probs, the sequence sums and the group call (loss, target, per-token gradients
    /// `g_t`), without the backward's GEMMs; `out.grad_hidden` and `out.grad_weight` are not
    /// written. Its log-probs and loss are bit-identical to the whole path's (the same GEMMs and
    /// kernels on the same chunks). For an autograd forward whose backward runs the whole path.
    #[allow(clippy::too_many_arguments)]
    pub fn tpo_forward_from_hidden(
        &mut self,
        tpo: &CudaTpo,
        hidden: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        batch: &DeviceSequenceBatch,
        source: DeviceTarget,
        cfg: &PathConfig,
        out: &mut LinearOutputs,
    ) -> Result<()> {
        self.call(tpo, hidden, weight, batch, source, cfg, out, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn call(
        &mut self,
        tpo: &CudaTpo,
        hidden: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        batch: &DeviceSequenceBatch,
        source: DeviceTarget,
        cfg: &PathConfig,
        out: &mut LinearOutputs,
        forward_only: bool,
    ) -> Result<()> {
        self.same_stream(tpo)?;
        let tok = &cfg.tokens;
        let (t, v, d) = (batch.seqs.host.len(), self.vocab, self.dim);
        let tokens_out = &out.path.tokens;
        for (name, got, want) in [
            // Saturating: an overflowing product matches no slice length (at most isize::MAX).
            ("hidden", hidden.len(), t.saturating_mul(d)),
            ("weight", weight.len(), v * d),
            ("tokens", batch.tokens.len(), t),
            ("grad_hidden output", out.grad_hidden.len(), t.saturating_mul(d)),
            ("grad_weight output", out.grad_weight.len(), v * d),
            ("token outputs", tokens_out.logp.len(), t),
            ("token outputs (lse)", tokens_out.lse.len(), t),
            ("token outputs (row max)", tokens_out.row_max.len(), t),
            ("token outputs (log-sum)", tokens_out.log_sum.len(), t),
            ("token outputs (entropy)", tokens_out.entropy.as_ref().map_or(t, |e| e.len()), t),
            ("token gradient", out.path.token_grad.len(), t),
        ] {
            if got != want {
                return Err(TpoError::LengthMismatch { name, got, expected: want });
            }
        }
        if !(tok.temperature.is_finite() && tok.temperature > 0.0) {
            return Err(TpoError::BadConfig {
                name: "temperature",
                requirement: "finite and > 0",
                got: tok.temperature,
            });
        }
        let plan = self.plan(t)?;
        let (plan, steps) = match self.schedule.take() {
            Some((p, steps)) if p == plan => (p, steps),
            _ => (plan, plan.steps()),
        };
        let _range = tpo.range("tpo::tpo_from_hidden");
        // The forward is every step up to the group call, which comes once, between the forward
        // chunks and the backward blocks.
        let upto = if forward_only {
            steps.iter().position(|s| matches!(s, Step::Group)).map_or(steps.len(), |i| i + 1)
        } else {
            steps.len()
        };
        let r = self.run(tpo, &plan, &steps[..upto], hidden, weight, batch, source, cfg, out);
        self.schedule = Some((plan, steps));
        r
    }

    /// Runs a plan's steps (see [`tpo_from_hidden`](Self::tpo_from_hidden), which checked the
    /// buffers against the plan).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        tpo: &CudaTpo,
        plan: &LinearPlan,
        steps: &[Step],
        hidden: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        batch: &DeviceSequenceBatch,
        source: DeviceTarget,
        cfg: &PathConfig,
        out: &mut LinearOutputs,
    ) -> Result<()> {
        let (t, v, d) = (plan.tokens, plan.vocab, plan.dim);
        tpo.reset(&mut out.path.tokens.status)?;
        let inv_tau = (1.0 / cfg.tokens.temperature) as f32;
        for &step in steps {
            match step {
                Step::StageTail { tok0, rows } => {
                    // A partial tile: its rows into a zeroed tile, so the GEMM keeps its shape.
                    tpo.stream.memset_zeros(&mut self.stage_h).map_err(|e| cuda_err("memset", e))?;
                    let src = hidden.slice(tok0 * d..(tok0 + rows) * d);
                    let mut dst = self.stage_h.slice_mut(0..rows * d);
                    tpo.stream.memcpy_dtod(&src, &mut dst).map_err(|e| cuda_err("device copy", e))?;
                }
                Step::Gemm(g) => {
                    plan.check_gemm(&g, self.workspace.len())?;
                    self.gemm(tpo, &g, hidden, weight, out)?;
                }
                Step::TokenForward { tok0, rows } => {
                    if rows * v > self.workspace.len() || tok0 + rows > t {
                        return Err(TpoError::Cuda(format!("fused linear schedule: bad chunk {step:?}")));
                    }
                    let p =
                        self.token_params(tpo, batch, &mut out.path, tok0, rows, (0, v, v), inv_tau, false);
                    tpo.launch_rows(KernelKey::new("token_fwd", "", "bf16", ""), rows, p)?;
                }
                Step::Group => tpo.sequence_group_backward(batch, source, cfg, &mut out.path)?,
                Step::TokenBackward { tok0, rows, col0, cols, ld } => {
                    if (rows - 1) * ld + cols > self.workspace.len() || col0 + cols > v || tok0 + rows > t {
                        return Err(TpoError::Cuda(format!("fused linear schedule: bad block {step:?}")));
                    }
                    let p = self.token_params(
                        tpo,
                        batch,
                        &mut out.path,
                        tok0,
                        rows,
                        (col0, cols, ld),
                        inv_tau,
                        true,
                    );
                    tpo.launch_rows(KernelKey::new("token_bwd", "", "bf16", ""), rows, p)?;
                }
            }
        }
        Ok(())
    }

    /// One GEMM of the schedule, f32 accumulation, operands at their buffers' offsets.
    fn gemm(
        &mut self,
        tpo: &CudaTpo,
        g: &GemmCall,
        hidden: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        out: &mut LinearOutputs,
    ) -> Result<()> {
        use bsys::cudaDataType::{CUDA_R_16BF as BF16, CUDA_R_32F as F32};
        let s = &tpo.stream;
        // Raw addresses; the guards are no-ops (event tracking is off, see CudaTpo::new) and
        // every launch is on this one stream.
        let mut addr = |b: Buffer, off: usize| match b {
            Buffer::Hidden => (at::<bf16>(hidden.device_ptr(s).0, off), BF16),
            Buffer::Weight => (at::<bf16>(weight.device_ptr(s).0, off), BF16),
            Buffer::Stage => (at::<bf16>(self.stage_h.device_ptr(s).0, off), BF16),
            Buffer::Workspace => (at::<bf16>(self.workspace.device_ptr_mut(s).0, off), BF16),
            Buffer::GradHidden => (at::<f32>(out.grad_hidden.device_ptr_mut(s).0, off), F32),
            Buffer::GradWeight => (at::<f32>(out.grad_weight.device_ptr_mut(s).0, off), F32),
        };
        let (a, b, c) =
            (addr(g.a.buffer, g.a.offset), addr(g.b.buffer, g.b.offset), addr(g.c.buffer, g.c.offset));
        let d = &g.desc;
        let op = |t: bool| {
            if t {
                bsys::cublasOperation_t::CUBLAS_OP_T
            } else {
                bsys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
        // SAFETY: plan.check_gemm confirmed that A, B and C, from their offsets, span no more than
        // their buffers, whose lengths tpo_from_hidden checked against (T, V, H) and the
        // workspace's; each buffer's element type matches the data type passed with it; alpha
        // and beta are host f32 scalars, as in cuBLAS's default host pointer mode; the handle is
        // bound to the backend's stream, which orders this call after the steps before it.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                op(d.trans_a),
                op(d.trans_b),
                d.m as i32,
                d.n as i32,
                d.k as i32,
                &alpha as *const f32 as *const c_void,
                a.0 as *const c_void,
                a.1,
                d.lda as i32,
                b.0 as *const c_void,
                b.1,
                d.ldb as i32,
                &beta as *const f32 as *const c_void,
                c.0 as *mut c_void,
                c.1,
                d.ldc as i32,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(gemm_err)
    }

    /// Token-kernel parameters for workspace rows `0..rows` = tokens `tok0..tok0 + rows`, over
    /// the vocabulary block `(col0, cols, ld)` (the whole vocabulary, row stride V, in the
    /// forward).
    #[allow(clippy::too_many_arguments)]
    fn token_params(
        &mut self,
        tpo: &CudaTpo,
        batch: &DeviceSequenceBatch,
        path: &mut LogitsPathBuffers<bf16>,
        tok0: usize,
        rows: usize,
        (col0, cols, ld): (usize, usize, usize),
        inv_tau: f32,
        backward: bool,
    ) -> TokenParams {
        let s = &tpo.stream;
        let f = |p: u64| at::<f32>(p, tok0);
        let (z, _a) = self.workspace.device_ptr_mut(s);
        let (y, _b) = batch.tokens.device_ptr(s);
        let (lp, _c) = path.tokens.logp.device_ptr_mut(s);
        let (lse, _d) = path.tokens.lse.device_ptr_mut(s);
        let (m, _e) = path.tokens.row_max.device_ptr_mut(s);
        let (ls, _f) = path.tokens.log_sum.device_ptr_mut(s);
        let (tg, _g) = path.token_grad.device_ptr(s);
        let (st, _h) = path.tokens.status.0.device_ptr_mut(s);
        let (ent, _i) = super::opt_ptr_mut(path.tokens.entropy.as_mut(), s);
        let block = TokenParams {
            ld: ld as i64,
            col0: col0 as i64,
            row0: tok0 as i64,
            ..TokenParams::rows(rows, cols, inv_tau)
        };
        if backward {
            TokenParams {
                logits: z,
                grad_out: z,
                tokens: at::<u32>(y, tok0),
                row_max: f(m),
                log_sum: f(ls),
                token_grad: f(tg),
                ..block
            }
        } else {
            let entropy = if ent == 0 { 0 } else { f(ent) };
            TokenParams {
                logits: z,
                tokens: at::<u32>(y, tok0),
                logp: f(lp),
                lse: f(lse),
                row_max: f(m),
                log_sum: f(ls),
                entropy,
                status: st,
                ..block
            }
        }
    }
}
