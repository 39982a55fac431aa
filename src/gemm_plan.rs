//! The GEMMs the fused linear path (`tpo::cuda::FusedLinear`, feature `cuda`) issues, described in
//! cuBLAS's column-major convention, so that their shapes are tested on every CI run
//! (`tests/gemm_plan.rs`) against row-major products.
//!
//! Row-major tensors: hidden tile `h [n, d]`, weight `W [V, d]`, logits `z [n, V]`. A row-major
//! `[r, c]` matrix is a column-major `[c, r]` one with leading dimension `c`.

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

/// `z = h W^T` for `n` rows: `A = W`, `B = h`, `C = z` (column-major `z^T = W h^T`).
pub fn logits(vocab: usize, dim: usize, n: usize) -> GemmDesc {
    GemmDesc { trans_a: true, trans_b: false, m: vocab, n, k: dim, lda: dim, ldb: dim, ldc: vocab }
}

/// `dh = dz W` for `n` rows: `A = W`, `B = dz`, `C = dh` (column-major `dh^T = W^T' dz^T`).
pub fn grad_hidden(vocab: usize, dim: usize, n: usize) -> GemmDesc {
    GemmDesc { trans_a: false, trans_b: false, m: dim, n, k: vocab, lda: dim, ldb: vocab, ldc: dim }
}

/// `dW += dz^T h` over `n` rows: `A = h`, `B = dz`, `C = dW` (column-major `dW^T = h^T dz`).
pub fn grad_weight(vocab: usize, dim: usize, n: usize) -> GemmDesc {
    GemmDesc { trans_a: false, trans_b: true, m: dim, n: vocab, k: n, lda: dim, ldb: vocab, ldc: dim }
}

/// cuBLAS's semantics on host slices (f64), for tests: `C = op(A) op(B) + beta C`, column-major.
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
