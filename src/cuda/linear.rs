//! TPO from hidden states and the lm_head without materialising the logits.
//!
//! Tokens are processed in chunks: each chunk's logits `z = h W^T` are computed by cuBLAS (bf16
//! operands, f32 accumulation) into a workspace of `chunk_rows x V` bf16, and reduced by the token
//! kernel to log-probs (plus the row max and log-sum kept for the backward). After the sequence
//! sums and the group loss, the backward recomputes each chunk's logits, turns them into their
//! gradient in place, and feeds them to two more GEMMs: `dh = dz W` (bf16) and `dW += dz^T h`
//! (f32, accumulated over chunks in a fixed order). Peak extra memory is the workspace
//! (`chunk_rows * V * 2` bytes, from the caller's budget) plus O(T) per-token buffers.
//!
//! Determinism: the logits GEMM is always issued on tiles of [`GEMM_TILE`] rows (the last tile
//! padded with zero rows), so every row's logits, and so its log-prob, come from a GEMM of the
//! same shape whatever the chunk size; `dW` accumulates tile by tile in token order.
//!
//! Status: written without a GPU; the GPU suite (tests/gpu.rs) checks it against
//! [`crate::cpu::tokens::tpo_from_hidden`] and the chunk-size independence when run on one.

use super::tokens::{DeviceSequenceBatch, DeviceTarget, LogitsPathBuffers, PathAlloc, TokenParams};
use super::{cuda_err, CudaTpo, DeviceLayout};
use crate::cpu::tokens::{PathConfig, TokenConfig};
use crate::error::{Result, TpoError};
use crate::gemm_plan;
use cudarc::cublas::{result as blas, sys as bsys, CudaBlas};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;
use std::ffi::c_void;

/// Rows per logits GEMM; chunks are whole numbers of tiles.
pub const GEMM_TILE: usize = 128;

/// The fused linear + TPO call's workspace, sized once from a memory budget.
pub struct FusedLinear {
    blas: CudaBlas,
    vocab: usize,
    dim: usize,
    chunk_rows: usize,
    workspace: CudaSlice<bf16>,
    stage_h: CudaSlice<bf16>,
}

/// Outputs of [`FusedLinear::tpo_from_hidden`].
#[derive(Debug)]
pub struct LinearOutputs {
    /// Token log-probs, sequence log-probs, target, loss, per-token gradients (as from logits;
    /// its `grad_logits` is unused: the logits gradient lives only in the workspace).
    pub path: LogitsPathBuffers<bf16>,
    /// `dL/dh`, `[T, H]`, bf16.
    pub grad_hidden: CudaSlice<bf16>,
    /// `dL/dW`, `[V, H]`, accumulated in f32.
    pub grad_weight: CudaSlice<f32>,
}

fn gemm_err(e: impl std::fmt::Debug) -> TpoError {
    TpoError::Cuda(format!("cuBLAS: {e:?}"))
}

impl FusedLinear {
    /// A workspace for a vocabulary of `vocab`, hidden size `dim`, using at most
    /// `workspace_budget` bytes for the logits chunk (at least one tile of [`GEMM_TILE`] rows).
    pub fn new(tpo: &CudaTpo, vocab: usize, dim: usize, workspace_budget: usize) -> Result<Self> {
        if vocab == 0 || dim == 0 || vocab > i32::MAX as usize || dim > i32::MAX as usize {
            return Err(TpoError::BadConfig {
                name: "vocab and hidden size",
                requirement: "in 1..2^31",
                got: vocab as f64,
            });
        }
        let tiles = (workspace_budget / (vocab * 2) / GEMM_TILE).max(1);
        let chunk_rows = tiles * GEMM_TILE;
        let blas = CudaBlas::new(tpo.stream.clone()).map_err(|e| {
            TpoError::Cuda(format!(
                "cannot start cuBLAS (is libcublas from CUDA 13 on the library path?): {e:?}"
            ))
        })?;
        Ok(Self {
            blas,
            vocab,
            dim,
            chunk_rows,
            workspace: tpo.zeros(chunk_rows * vocab)?,
            stage_h: tpo.zeros(GEMM_TILE * dim)?,
        })
    }

    /// Tokens per chunk (a multiple of [`GEMM_TILE`]).
    pub fn chunk_rows(&self) -> usize {
        self.chunk_rows
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
    /// [`crate::cpu::tokens::tpo_from_hidden`]).
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
        let (tokens, tok) = (batch.tokens, &cfg.tokens);
        let (t, v, d) = (batch.seqs.host.len(), self.vocab, self.dim);
        for (name, got, want) in [
            ("hidden", hidden.len(), t * d),
            ("weight", weight.len(), v * d),
            ("tokens", tokens.len(), t),
            ("grad_hidden output", out.grad_hidden.len(), t * d),
            ("grad_weight output", out.grad_weight.len(), v * d),
            ("token outputs", out.path.tokens.logp.len(), t),
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
        let _range = tpo.range("tpo::tpo_from_hidden");
        tpo.reset(&mut out.path.tokens.status)?;
        // Forward: log-probs chunk by chunk.
        for c0 in (0..t).step_by(self.chunk_rows) {
            let rows = self.chunk_rows.min(t - c0);
            self.logits_chunk(tpo, hidden, weight, c0, rows)?;
            let p = self.row_params(tpo, tokens, &mut out.path, c0, rows, tok, 0);
            tpo.launch_rows("tpo_token_fwd_bf16", rows, p)?;
        }
        tpo.sequence_group_backward(batch, source, cfg, &mut out.path)?;
        // Backward: recompute each chunk, its gradient in place, then dh and dW.
        for c0 in (0..t).step_by(self.chunk_rows) {
            let rows = self.chunk_rows.min(t - c0);
            self.logits_chunk(tpo, hidden, weight, c0, rows)?;
            let p = self.row_params(tpo, tokens, &mut out.path, c0, rows, tok, 1);
            tpo.launch_rows("tpo_token_bwd_bf16", rows, p)?;
            for r0 in (0..rows).step_by(GEMM_TILE) {
                let n = GEMM_TILE.min(rows - r0);
                let first = c0 == 0 && r0 == 0;
                self.backward_gemms(tpo, hidden, weight, out, c0 + r0, r0, n, first)?;
            }
        }
        Ok(())
    }

    /// Fills workspace rows `0..rows` with the logits of tokens `c0..c0 + rows`, one GEMM of
    /// `GEMM_TILE` rows per tile (the last tile padded with zero hidden rows).
    fn logits_chunk(
        &mut self,
        tpo: &CudaTpo,
        hidden: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        c0: usize,
        rows: usize,
    ) -> Result<()> {
        let (v, d) = (self.vocab, self.dim);
        for r0 in (0..rows).step_by(GEMM_TILE) {
            let n = GEMM_TILE.min(rows - r0);
            let s = &tpo.stream;
            let h_ptr = if n == GEMM_TILE {
                hidden.device_ptr(s).0 + ((c0 + r0) * d * 2) as u64
            } else {
                // Tail: copy the valid rows into a zeroed tile so the GEMM keeps its shape.
                tpo.stream.memset_zeros(&mut self.stage_h).map_err(|e| cuda_err("memset", e))?;
                let src = hidden.slice((c0 + r0) * d..(c0 + r0 + n) * d);
                let mut dst = self.stage_h.slice_mut(0..n * d);
                tpo.stream.memcpy_dtod(&src, &mut dst).map_err(|e| cuda_err("device copy", e))?;
                self.stage_h.device_ptr(s).0
            };
            // Raw addresses (the guards are no-ops: event tracking is off, see CudaTpo::new).
            let w_ptr = weight.device_ptr(s).0;
            let z_ptr = self.workspace.device_ptr_mut(s).0 + (r0 * v * 2) as u64;
            let bf = bsys::cudaDataType::CUDA_R_16BF;
            self.gemm(&gemm_plan::logits(v, d, GEMM_TILE), (w_ptr, bf), (h_ptr, bf), (z_ptr, bf), 0.0)?;
        }
        Ok(())
    }

    /// `dh[rows] = dz W` and `dW += dz^T h[rows]` for `n` tokens starting at `tok0`, whose logits
    /// gradient sits at workspace row `r0`.
    #[allow(clippy::too_many_arguments)]
    fn backward_gemms(
        &mut self,
        tpo: &CudaTpo,
        hidden: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        out: &mut LinearOutputs,
        tok0: usize,
        r0: usize,
        n: usize,
        first: bool,
    ) -> Result<()> {
        let (v, d) = (self.vocab, self.dim);
        let s = &tpo.stream;
        let w_ptr = weight.device_ptr(s).0;
        let h_ptr = hidden.device_ptr(s).0 + (tok0 * d * 2) as u64;
        let z_ptr = self.workspace.device_ptr(s).0 + (r0 * v * 2) as u64;
        let dh_ptr = out.grad_hidden.device_ptr_mut(s).0 + (tok0 * d * 2) as u64;
        let dw_ptr = out.grad_weight.device_ptr_mut(s).0;
        use bsys::cudaDataType::{CUDA_R_16BF as BF16, CUDA_R_32F as F32};
        self.gemm(&gemm_plan::grad_hidden(v, d, n), (w_ptr, BF16), (z_ptr, BF16), (dh_ptr, BF16), 0.0)?;
        let beta = if first { 0.0 } else { 1.0 };
        self.gemm(&gemm_plan::grad_weight(v, d, n), (h_ptr, BF16), (z_ptr, BF16), (dw_ptr, F32), beta)
    }

    /// One GEMM of the plan ([`gemm_plan`]), f32 accumulation.
    fn gemm(
        &self,
        g: &gemm_plan::GemmDesc,
        a: (u64, bsys::cudaDataType),
        b: (u64, bsys::cudaDataType),
        c: (u64, bsys::cudaDataType),
        beta: f32,
    ) -> Result<()> {
        let op = |t: bool| {
            if t {
                bsys::cublasOperation_t::CUBLAS_OP_T
            } else {
                bsys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let alpha = 1.0f32;
        // SAFETY: the addresses are offsets into live device buffers whose sizes the callers
        // derived from the same (V, Hd, T) checked in tpo_from_hidden: A, B and C each span at
        // least (ld x columns) elements of their type; alpha and beta are host f32 scalars, as in
        // cuBLAS's default host pointer mode; the handle is bound to the backend's stream.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                op(g.trans_a),
                op(g.trans_b),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                &alpha as *const f32 as *const c_void,
                a.0 as *const c_void,
                a.1,
                g.lda as i32,
                b.0 as *const c_void,
                b.1,
                g.ldb as i32,
                &beta as *const f32 as *const c_void,
                c.0 as *mut c_void,
                c.1,
                g.ldc as i32,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(gemm_err)
    }

    /// Token-kernel parameters for workspace rows `0..rows` = tokens `c0..c0 + rows`.
    #[allow(clippy::too_many_arguments)]
    fn row_params(
        &mut self,
        tpo: &CudaTpo,
        tokens: &CudaSlice<u32>,
        path: &mut LogitsPathBuffers<bf16>,
        c0: usize,
        rows: usize,
        tok: &TokenConfig,
        backward: u8,
    ) -> TokenParams {
        let s = &tpo.stream;
        let off4 = (c0 * 4) as u64;
        let (z, _a) = self.workspace.device_ptr_mut(s);
        let (y, _b) = tokens.device_ptr(s);
        let (lp, _c) = path.tokens.logp.device_ptr_mut(s);
        let (lse, _d) = path.tokens.lse.device_ptr_mut(s);
        let (m, _e) = path.tokens.row_max.device_ptr_mut(s);
        let (ls, _f) = path.tokens.log_sum.device_ptr_mut(s);
        let (tg, _g) = path.token_grad.device_ptr(s);
        let (st, _h) = path.tokens.status.0.device_ptr_mut(s);
        TokenParams {
            logits: z,
            grad_out: if backward == 1 { z } else { 0 },
            tokens: y + off4,
            logp: lp + off4,
            lse: lse + off4,
            row_max: m + off4,
            log_sum: ls + off4,
            entropy: 0,
            token_grad: if backward == 1 { tg + off4 } else { 0 },
            status: st,
            rows: rows as i64,
            vocab: self.vocab as i64,
            inv_tau: (1.0 / tok.temperature) as f32,
            pad: 0,
        }
    }
}
