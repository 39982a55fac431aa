//! The schedule of the fused linear path (`tpo::cuda::FusedLinear`, feature `cuda`): which GEMMs
//! and kernels it issues, on which parts of which buffers, in which order. It is pure data, so
//! that CI checks it without a GPU (`tests/linear_plan.rs` runs it on host buffers through an
//! emulation of cuBLAS and compares the result with [`crate::cpu::tokens::tpo_from_hidden`]); the
//! CUDA backend only turns each [`Step`] into a launch.
//!
//! Row-major tensors: hidden states `h [T, H]`, lm_head `W [V, H]`, logits `z = h W^T [T, V]`. A
//! row-major `[r, c]` matrix with row stride `ld` is a column-major `[c, r]` one with leading
//! dimension `ld`, which is how the GEMMs below are described.
//!
//! # The schedule
//! * **Forward**, in chunks of [`LinearPlan::forward_rows`] tokens (a multiple of [`GEMM_TILE`]):
//!   the chunk's logits, one GEMM of exactly `GEMM_TILE` rows per tile (a last, partial tile is
//!   staged into a zero-padded tile), then the token kernel reduces each row to its log-prob, row
//!   max and log-sum. Every token's logits come from a GEMM of the same shape, whatever the
//!   budget, so its log-prob does not depend on the chunk size.
//! * **Group**: sequence sums, the group loss and the broadcast to per-token gradients `g_t`.
//! * **Backward**, in blocks of [`LinearPlan::backward_rows`] tokens by
//!   [`LinearPlan::backward_cols`] vocabulary entries: the block's logits are recomputed, turned
//!   into their gradient in place with the forward's row statistics, then
//!   `dW[cols] (+)= dz^T h[rows]` and `dh[rows] (+)= dz W[cols]`, both in f32. Blocking the
//!   vocabulary keeps the f32 accumulators' traffic small: with a whole-batch token block (the
//!   usual case) `dW` is written once, not accumulated, and `dh` is accumulated once per
//!   vocabulary block. Blocking tokens instead would read and write all of `dW` (`V H` f32) once
//!   per chunk, which for `V = 151936, H = 4096` is 5 GB of traffic per chunk.
//!
//! The backward's recomputed logits come from GEMMs of another shape than the forward's and may
//! differ from them in the last bit of bf16; the gradient is then that of logits within one bf16
//! rounding of the forward's, well inside the bf16 error bound of the path.

use crate::error::{Result, TpoError};

/// Rows per forward logits GEMM; forward chunks are whole numbers of tiles.
pub const GEMM_TILE: usize = 128;

/// Backward vocabulary blocks narrower than the vocabulary are a multiple of this many columns
/// (rows of the workspace then start 128-byte aligned for bf16).
pub const VOCAB_ALIGN: usize = 64;

/// The narrowest vocabulary block the backward uses with a whole-batch token block; below it,
/// tokens are blocked too (see [`LinearPlan::new`]).
pub const MIN_BLOCK_COLS: usize = 1024;

/// One `C = op(A) op(B) + beta C` call: `C` is `m x n` column-major, `op(A)` is `m x k`,
/// `op(B)` is `k x n`; `trans_*` says whether `op` transposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmDesc {
    /// `op(A) = A^T`.
    pub trans_a: bool,
    /// `op(B) = B^T`.
    pub trans_b: bool,
    /// Rows of `C`.
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// The reduction length.
    pub k: usize,
    /// Leading dimension of `A`.
    pub lda: usize,
    /// Leading dimension of `B`.
    pub ldb: usize,
    /// Leading dimension of `C`.
    pub ldc: usize,
}

impl GemmDesc {
    /// Elements each of `A`, `B` and `C` spans from its first element: a column-major `r x c`
    /// matrix with leading dimension `ld` spans `(c - 1) ld + r`.
    pub fn extents(&self) -> [usize; 3] {
        // Saturating, so that an absurd descriptor reads as out of range rather than wrapping.
        let span = |rows: usize, cols: usize, ld: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                (cols - 1).saturating_mul(ld).saturating_add(rows)
            }
        };
        let (ar, ac) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        [span(ar, ac, self.lda), span(br, bc, self.ldb), span(self.m, self.n, self.ldc)]
    }
}

/// `z = h W^T` for `n` token rows and `cols` vocabulary rows of `W`, into `z` with row stride
/// `ldz`: `A = W` (from its first row in the block), `B = h`, `C = z`
/// (column-major `z^T = W h^T`).
pub fn logits(cols: usize, dim: usize, n: usize, ldz: usize) -> GemmDesc {
    GemmDesc { trans_a: true, trans_b: false, m: cols, n, k: dim, lda: dim, ldb: dim, ldc: ldz }
}

/// `dh = dz W` for `n` token rows and `cols` vocabulary entries, `dz` with row stride `ldz`:
/// `A = W`, `B = dz`, `C = dh` (column-major `dh^T = W^T dz^T`).
pub fn grad_hidden(cols: usize, dim: usize, n: usize, ldz: usize) -> GemmDesc {
    GemmDesc { trans_a: false, trans_b: false, m: dim, n, k: cols, lda: dim, ldb: ldz, ldc: dim }
}

/// `dW = dz^T h` over `n` token rows for `cols` vocabulary entries, `dz` with row stride `ldz`:
/// `A = h`, `B = dz`, `C = dW` (column-major `dW^T = h^T dz`).
pub fn grad_weight(cols: usize, dim: usize, n: usize, ldz: usize) -> GemmDesc {
    GemmDesc { trans_a: false, trans_b: true, m: dim, n: cols, k: n, lda: dim, ldb: ldz, ldc: dim }
}

/// cuBLAS's semantics on host slices (f64), for tests: `C = op(A) op(B) + beta C`, column-major,
/// `C` not read when `beta = 0`.
pub fn emulate(g: &GemmDesc, a: &[f64], b: &[f64], beta: f64, c: &mut [f64]) {
    let at = |i: usize, p: usize| if g.trans_a { a[p + i * g.lda] } else { a[i + p * g.lda] };
    let bt = |p: usize, j: usize| if g.trans_b { b[j + p * g.ldb] } else { b[p + j * g.ldb] };
    for j in 0..g.n {
        for i in 0..g.m {
            let s: f64 = (0..g.k).map(|p| at(i, p) * bt(p, j)).sum();
            let cij = &mut c[i + j * g.ldc];
            *cij = s + if beta == 0.0 { 0.0 } else { beta * *cij };
        }
    }
}

/// The buffers a [`Step`] works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// `h [T, H]`, bf16.
    Hidden,
    /// `W [V, H]`, bf16.
    Weight,
    /// One zero-padded tile of hidden rows `[GEMM_TILE, H]`, bf16.
    Stage,
    /// The logits workspace, bf16, [`LinearPlan::workspace_elems`] long.
    Workspace,
    /// `dL/dh [T, H]`, f32.
    GradHidden,
    /// `dL/dW [V, H]`, f32.
    GradWeight,
}

/// A GEMM operand: a buffer and the element its matrix starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    /// Which buffer.
    pub buffer: Buffer,
    /// Offset in elements of that buffer's type.
    pub offset: usize,
}

/// One GEMM of the schedule: `C = op(A) op(B) (+ C when accumulate)`, f32 accumulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmCall {
    /// Shapes, transposes and leading dimensions.
    pub desc: GemmDesc,
    /// `A`.
    pub a: Operand,
    /// `B`.
    pub b: Operand,
    /// `C`.
    pub c: Operand,
    /// `beta = 1` (add to `C`) rather than `beta = 0` (overwrite `C`, not read).
    pub accumulate: bool,
}

/// One step of the fused linear schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Zero the staging tile, then copy hidden rows `tok0..tok0 + rows` into its first rows.
    StageTail {
        /// First token.
        tok0: usize,
        /// Rows copied (fewer than [`GEMM_TILE`]).
        rows: usize,
    },
    /// A GEMM.
    Gemm(GemmCall),
    /// The token forward kernel on workspace rows `0..rows` (row stride `V`), which hold the
    /// logits of tokens `tok0..tok0 + rows`: log-prob, lse, row max, log-sum (and entropy).
    TokenForward {
        /// First token.
        tok0: usize,
        /// Rows.
        rows: usize,
    },
    /// Sequence sums, the group loss and the broadcast of `dL/dl` to per-token `g_t`.
    Group,
    /// The token backward kernel, in place on the workspace block `[rows, cols]` with row stride
    /// `ld`, which holds the logits of tokens `tok0..tok0 + rows` for vocabulary entries
    /// `col0..col0 + cols`: `dz = g_t (onehot(y_t) - p) / tau`.
    TokenBackward {
        /// First token.
        tok0: usize,
        /// Rows.
        rows: usize,
        /// First vocabulary entry.
        col0: usize,
        /// Vocabulary entries.
        cols: usize,
        /// Row stride of the block in the workspace.
        ld: usize,
    },
}

/// How the fused linear path splits a batch of `tokens` rows over its workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearPlan {
    /// `T`.
    pub tokens: usize,
    /// `V`.
    pub vocab: usize,
    /// `H`.
    pub dim: usize,
    /// Tokens per forward chunk (a multiple of [`GEMM_TILE`]).
    pub forward_rows: usize,
    /// Tokens per backward block (`T` unless the workspace is too small for
    /// [`MIN_BLOCK_COLS`]-wide blocks of every token).
    pub backward_rows: usize,
    /// Vocabulary entries per backward block (the last may be narrower).
    pub backward_cols: usize,
}

impl LinearPlan {
    /// The workspace, in elements, for a budget of `budget_bytes` of bf16: whole forward tiles of
    /// `GEMM_TILE x vocab`, at least one.
    /// Saturates at `usize::MAX` for a vocabulary so large that one tile overflows (which
    /// [`new`](Self::new) then refuses).
    pub fn workspace_elems(vocab: usize, budget_bytes: usize) -> usize {
        let tile = GEMM_TILE.saturating_mul(vocab).max(1);
        (budget_bytes / 2 / tile).max(1).saturating_mul(tile)
    }

    /// The plan for `tokens` rows with a workspace of `workspace` elements (from
    /// [`workspace_elems`](Self::workspace_elems)).
    ///
    /// The backward takes every token in one block when that leaves blocks of at least
    /// [`MIN_BLOCK_COLS`] vocabulary entries (or the whole vocabulary); otherwise it uses square-ish
    /// blocks of about `sqrt(workspace)` on each side, which minimises the f32 accumulators'
    /// traffic for a given workspace.
    pub fn new(tokens: usize, vocab: usize, dim: usize, workspace: usize) -> Result<Self> {
        if tokens == 0 {
            return Err(TpoError::BadConfig { name: "tokens", requirement: "at least 1", got: 0.0 });
        }
        if vocab == 0 || dim == 0 || GEMM_TILE.checked_mul(vocab).is_none_or(|tile| workspace < tile) {
            return Err(TpoError::BadConfig {
                name: "fused linear workspace (elements)",
                requirement: "at least GEMM_TILE x vocab, with vocab and dim >= 1",
                got: workspace as f64,
            });
        }
        // Forward chunks need not be longer than the batch (rounded up to whole tiles).
        let forward_rows = (workspace / vocab / GEMM_TILE).min(tokens.div_ceil(GEMM_TILE)) * GEMM_TILE;
        let whole = workspace / tokens;
        let (backward_rows, backward_cols) = if whole >= vocab {
            (tokens, vocab)
        } else if whole / VOCAB_ALIGN * VOCAB_ALIGN >= MIN_BLOCK_COLS {
            (tokens, whole / VOCAB_ALIGN * VOCAB_ALIGN)
        } else {
            let side = ((workspace as f64).sqrt() as usize / VOCAB_ALIGN * VOCAB_ALIGN).max(VOCAB_ALIGN);
            let cols = side.min(vocab);
            (tokens.min(workspace / cols), cols)
        };
        Self::with_blocks(tokens, vocab, dim, forward_rows, backward_rows, backward_cols)
    }

    /// A plan with given blocks: `forward_rows` a positive multiple of [`GEMM_TILE`],
    /// `backward_rows` in `1..=tokens`, `backward_cols` in `1..=vocab`. It needs a workspace of
    /// [`workspace_needed`](Self::workspace_needed) elements.
    pub fn with_blocks(
        tokens: usize,
        vocab: usize,
        dim: usize,
        forward_rows: usize,
        backward_rows: usize,
        backward_cols: usize,
    ) -> Result<Self> {
        let bad =
            |name, requirement, got: usize| Err(TpoError::BadConfig { name, requirement, got: got as f64 });
        if tokens == 0 || vocab == 0 || dim == 0 {
            return bad("tokens, vocab and dim", "at least 1", 0);
        }
        if forward_rows == 0 || !forward_rows.is_multiple_of(GEMM_TILE) {
            return bad("forward rows", "a positive multiple of GEMM_TILE", forward_rows);
        }
        if backward_rows == 0 || backward_rows > tokens {
            return bad("backward rows", "in 1..=tokens", backward_rows);
        }
        if backward_cols == 0 || backward_cols > vocab {
            return bad("backward columns", "in 1..=vocab", backward_cols);
        }
        // Every offset and extent the steps compute is below one of these products.
        for (what, a, b) in [
            ("tokens x dim", tokens, dim),
            ("vocab x dim", vocab, dim),
            ("tokens x vocab", tokens, vocab),
            ("forward rows x vocab", forward_rows, vocab),
            ("GEMM_TILE x dim", GEMM_TILE, dim),
        ] {
            if a.checked_mul(b).is_none() {
                return Err(TpoError::SizeOverflow(format!("{what} = {a} x {b}")));
            }
        }
        Ok(Self { tokens, vocab, dim, forward_rows, backward_rows, backward_cols })
    }

    /// Workspace elements the steps address: a forward chunk's logits, or a backward block's.
    pub fn workspace_needed(&self) -> usize {
        (self.forward_rows * self.vocab).max(self.backward_rows * self.backward_cols)
    }

    /// Every step of one forward + backward, in order.
    pub fn steps(&self) -> Vec<Step> {
        let (t, v, d) = (self.tokens, self.vocab, self.dim);
        let at = |buffer, offset| Operand { buffer, offset };
        let gemm = |desc, a, b, c, accumulate| Step::Gemm(GemmCall { desc, a, b, c, accumulate });
        let mut steps = Vec::new();
        for c0 in (0..t).step_by(self.forward_rows) {
            let rows = self.forward_rows.min(t - c0);
            for r0 in (0..rows).step_by(GEMM_TILE) {
                let n = GEMM_TILE.min(rows - r0);
                let src = if n == GEMM_TILE {
                    at(Buffer::Hidden, (c0 + r0) * d)
                } else {
                    steps.push(Step::StageTail { tok0: c0 + r0, rows: n });
                    at(Buffer::Stage, 0)
                };
                let z = at(Buffer::Workspace, r0 * v);
                steps.push(gemm(logits(v, d, GEMM_TILE, v), at(Buffer::Weight, 0), src, z, false));
            }
            steps.push(Step::TokenForward { tok0: c0, rows });
        }
        steps.push(Step::Group);
        let ld = self.backward_cols;
        for (bi, t0) in (0..t).step_by(self.backward_rows).enumerate() {
            let rows = self.backward_rows.min(t - t0);
            for (bj, v0) in (0..v).step_by(ld).enumerate() {
                let cols = ld.min(v - v0);
                let (ws, w, h) =
                    (at(Buffer::Workspace, 0), at(Buffer::Weight, v0 * d), at(Buffer::Hidden, t0 * d));
                steps.push(gemm(logits(cols, d, rows, ld), w, h, ws, false));
                steps.push(Step::TokenBackward { tok0: t0, rows, col0: v0, cols, ld });
                let dw = at(Buffer::GradWeight, v0 * d);
                steps.push(gemm(grad_weight(cols, d, rows, ld), h, ws, dw, bi > 0));
                let dh = at(Buffer::GradHidden, t0 * d);
                steps.push(gemm(grad_hidden(cols, d, rows, ld), w, ws, dh, bj > 0));
            }
        }
        steps
    }

    /// Elements of each buffer for this plan, as `steps` may address them.
    pub fn buffer_len(&self, buffer: Buffer, workspace: usize) -> usize {
        let (t, v, d) = (self.tokens, self.vocab, self.dim);
        match buffer {
            Buffer::Hidden | Buffer::GradHidden => t * d,
            Buffer::Weight | Buffer::GradWeight => v * d,
            Buffer::Stage => GEMM_TILE * d,
            Buffer::Workspace => workspace,
        }
    }

    /// Checks that a GEMM stays inside its buffers (`workspace` elements of workspace); the CUDA
    /// backend calls it before every launch, so a wrong schedule is an error, not a stray write.
    pub fn check_gemm(&self, g: &GemmCall, workspace: usize) -> Result<()> {
        for (op, extent) in [g.a, g.b, g.c].iter().zip(g.desc.extents()) {
            let len = self.buffer_len(op.buffer, workspace);
            if op.offset.saturating_add(extent) > len {
                return Err(TpoError::Cuda(format!(
                    "fused linear schedule: a GEMM would reach element {} of {:?} ({} elements)",
                    op.offset.saturating_add(extent),
                    op.buffer,
                    len
                )));
            }
        }
        Ok(())
    }
}
