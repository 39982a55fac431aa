//! Fused CPU candle ops for the token-reversal transformer (feature `candle`), each one pass over
//! its data with a hand-written one-pass backward, in place of the chains of candle tensor ops
//! they replace (each of which is a separate pass that allocates a fresh buffer):
//!
//! * [`layer_norm`]: `y = gamma (x - mu) / sqrt(var + eps) + beta` over the last dimension;
//! * [`causal_attention`]: `softmax(scale q k^T + causal mask) v` per head, keys and values of
//!   earlier positions (a key/value cache) included;
//! * [`log_softmax`]: `x - log sum exp x` over the last dimension;
//! * [`gelu`]: the tanh-approximated GELU, and [`bias_gelu`]: `gelu(x + b)`;
//! * [`add_bias`]: `x + b` with `b` broadcast over the leading dimensions of `x` (candle's
//!   backward of a broadcast add sums the gradient with a strided reduction, a tenth of a PPO
//!   step).
//!
//! Each has its composite candle form beside it (`*_composite`), which the tests compare it with
//! (values and gradients, `f32` and `f64`). Sums are accumulated in `f64` in a fixed order on one
//! thread and rounded once to the tensor's dtype (`f32` or `f64`), so the results are the same
//! bits run to run and for any thread count; they are close to, not bit-identical with, the
//! composite forms' (which round every intermediate to the dtype). CPU tensors only.
//!
//! Their loops are compiled once per instruction set (baseline x86-64, AVX2 with FMA and, with the
//! feature `avx512`, AVX-512) and run in the widest the processor has (a private `widest`, through
//! `pulp`); every copy gives the same bits (a unit test compares them block by block).

use std::sync::OnceLock;

use rayon::prelude::*;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType, D,
};

/// `f32` or `f64`: the dtypes these ops compute in.
trait Real: WithDType + Copy {
    fn f(self) -> f64;
    fn of(x: f64) -> Self;
    /// One row of [`bias_gelu`]'s forward: `y_j = gelu(x_j + b_j)` and, when `ds` is not empty,
    /// `ds_j = gelu'(x_j + b_j)`. `f64` computes with `f64::exp`; `f32` in `f32` with
    /// [`exp_f32`], in a loop the compiler vectorises (the FFN's GELU was a quarter of a
    /// training step with a scalar `f64` `exp` per element).
    fn gelu_row(xs: &[Self], b: &[Self], ys: &mut [Self], ds: &mut [Self]);
}

impl Real for f32 {
    #[inline(always)]
    fn f(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    fn gelu_row(xs: &[f32], b: &[f32], ys: &mut [f32], ds: &mut [f32]) {
        widest(GeluRowF32 { xs, b, ys, ds });
    }
}

/// [`Real::gelu_row`] for `f32`, run by [`widest`].
struct GeluRowF32<'a> {
    xs: &'a [f32],
    b: &'a [f32],
    ys: &'a mut [f32],
    ds: &'a mut [f32],
}

impl Block for GeluRowF32<'_> {
    type Out = ();
    #[inline(always)]
    fn run<S: pulp::Simd>(self) {
        let Self { xs, b, ys, ds } = self;
        if ds.is_empty() {
            for ((y, &x), &bj) in ys.iter_mut().zip(xs).zip(b) {
                let z = x + bj;
                *y = z * gelu_sig_f32(z);
            }
        } else {
            for (((y, d), &x), &bj) in ys.iter_mut().zip(ds.iter_mut()).zip(xs).zip(b) {
                let z = x + bj;
                let s = gelu_sig_f32(z);
                *y = z * s;
                *d = s + z * s * (1.0 - s) * GELU_C2_F32 * (1.0 + 3.0 * GELU_A_F32 * z * z);
            }
        }
    }
}

/// A piece of a fused op's work (a block of rows, a sequence), written once and compiled by
/// [`widest`] once per instruction set: `run` and this module's helpers that it calls are
/// `#[inline(always)]`, and `S` keeps the copies apart.
trait Block {
    type Out;
    fn run<S: pulp::Simd>(self) -> Self::Out;
}

struct Widest<B>(B);

impl<B: Block> pulp::WithSimd for Widest<B> {
    type Output = B::Out;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> B::Out {
        self.0.run::<S>()
    }
}

/// Runs `block` in its copy for the widest instruction set this processor has, as `pulp` finds it
/// at run time: AVX-512 (feature `avx512`), AVX2 with FMA, or baseline x86-64 (SSE2). The loops
/// that vectorise then use vectors of up to 8 `f64` or 16 `f32` lanes instead of 2 or 4 (those
/// that call `f64::exp` or add into one running sum stay scalar), and the results are the same
/// bits in every copy: each lane does the same operations in the same order, because Rust never
/// fuses a multiply and an add, nor reorders a sum, on its own. The unit test
/// `every_instruction_set_gives_the_same_bits` compares every copy of every block with the
/// baseline's, bit for bit.
#[inline(always)]
fn widest<B: Block>(block: B) -> B::Out {
    pulp::Arch::new().dispatch(Widest(block))
}

/// `sigmoid(2 c (z + a z^3))` in `f32`, so that `gelu(z) = z` times it.
#[inline(always)]
fn gelu_sig_f32(z: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-GELU_C2_F32 * (z + GELU_A_F32 * z * z * z)))
}

/// [`GELU_C`] doubled and [`GELU_A`], in `f32`, for the `f32` GELU.
const GELU_C2_F32: f32 = (2.0 * GELU_C) as f32;
const GELU_A_F32: f32 = GELU_A as f32;

impl Real for f64 {
    #[inline(always)]
    fn f(self) -> f64 {
        self
    }
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    fn gelu_row(xs: &[f64], b: &[f64], ys: &mut [f64], ds: &mut [f64]) {
        for (j, ((y, &x), &bj)) in ys.iter_mut().zip(xs).zip(b).enumerate() {
            let z = x + bj;
            let s = gelu_sig(z);
            *y = z * s;
            if let Some(d) = ds.get_mut(j) {
                *d = s + 2.0 * z * s * (1.0 - s) * GELU_C * (1.0 + 3.0 * GELU_A * z * z);
            }
        }
    }
}

/// `e^x` in `f32` without branches or calls, so that loops over it vectorise: `x` clamped to
/// `[-87.3, 88]` (where `e^x` is a normal `f32`; the result saturates at `e^-87.3` and `e^88`),
/// `x = k ln 2 + r` with `k` the nearest integer to `x / ln 2` (rounded by the `1.5 * 2^23`
/// shift) and `|r| <= ln 2 / 2` (`ln 2` split in two parts, Cody and Waite), `e^r` by Cephes'
/// degree-7 polynomial, and `2^k` built in the exponent bits. Relative error below `3e-7` over
/// the whole range (the unit test below, against `f64::exp`; `tests/fused.rs` checks
/// [`bias_gelu`] built on it). NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 355.0 / 512.0; // 0.693359375, exact in a few bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.0);
    let t = x * LOG2E + SHIFT;
    let k = t - SHIFT;
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // t's low mantissa bits hold k (two's complement, |k| <= 127); 2^k = (k + 127) << 23.
    let k_bits = t.to_bits().wrapping_sub(SHIFT.to_bits()).wrapping_add(127) << 23;
    er * f32::from_bits(k_bits)
}

/// The contiguous data of a CPU storage.
fn data<'a, T: Real>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: the inputs must be contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// A contiguous CPU tensor's data, read in place under its storage's read lock.
struct View {
    t: Tensor,
}

impl View {
    fn new(t: &Tensor) -> Result<Self> {
        Ok(Self { t: t.contiguous()? })
    }

    fn with<T: Real, R>(&self, op: &str, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
        let (st, l) = self.t.storage_and_layout();
        match &*st {
            Storage::Cpu(s) => f(data::<T>(s, l, op)?),
            _ => candle_core::bail!("{op}: CPU tensors only"),
        }
    }
}

/// Whether a gradient may flow back to one of `ts` (then an op keeps what its backward needs).
fn tracked(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

fn to_tensor<T: Real>(v: Vec<T>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

fn float_only(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: f32 or f64 tensors only"))
}

// ---------------------------------------------------------------------------------------------
// Ops run outside candle's graph.

/// One of these ops run outside candle's autograd graph (`apply_op*_no_bwd`), with its inputs and
/// output, so that a hand-written backward pass over a whole model (the reversal transformer's,
/// `super::reversal`) can call the op's backward itself: the same code, on the same values, as
/// candle's backward would call, without the graph's bookkeeping.
pub(crate) struct Taped<C> {
    op: C,
    args: Vec<Tensor>,
    out: Tensor,
}

impl<C> Taped<C> {
    /// The op's output.
    pub(crate) fn out(&self) -> &Tensor {
        &self.out
    }
}

fn needed(g: Option<Tensor>, op: &str) -> Result<Tensor> {
    g.ok_or_else(|| candle_core::Error::Msg(format!("{op}: the backward gave no gradient")))
}

impl<C: CustomOp1> Taped<C> {
    fn run1(op: C, x: &Tensor) -> Result<Self> {
        let x = x.contiguous()?;
        let out = x.apply_op1_no_bwd(&op)?;
        Ok(Self { op, args: vec![x], out })
    }

    /// The gradient of the input, from the output's `dy`.
    pub(crate) fn back1(&self, dy: &Tensor) -> Result<Tensor> {
        needed(self.op.bwd(&self.args[0], &self.out, dy)?, self.op.name())
    }
}

impl<C: CustomOp2> Taped<C> {
    fn run2(op: C, a: &Tensor, b: &Tensor) -> Result<Self> {
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let out = a.apply_op2_no_bwd(&b, &op)?;
        Ok(Self { op, args: vec![a, b], out })
    }

    /// The gradients of the two inputs, from the output's `dy`.
    pub(crate) fn back2(&self, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let (ga, gb) = self.op.bwd(&self.args[0], &self.args[1], &self.out, dy)?;
        let n = self.op.name();
        Ok((needed(ga, n)?, needed(gb, n)?))
    }
}

impl<C: CustomOp3> Taped<C> {
    fn run3(op: C, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Self> {
        let (a, b, c) = (a.contiguous()?, b.contiguous()?, c.contiguous()?);
        let out = a.apply_op3_no_bwd(&b, &c, &op)?;
        Ok(Self { op, args: vec![a, b, c], out })
    }

    /// The gradients of the three inputs, from the output's `dy`.
    pub(crate) fn back3(&self, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (ga, gb, gc) = self.op.bwd(&self.args[0], &self.args[1], &self.args[2], &self.out, dy)?;
        let n = self.op.name();
        Ok((needed(ga, n)?, needed(gb, n)?, needed(gc, n)?))
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm.

/// LayerNorm over the last dimension `d` of `x` (any shape `[.., d]`) with scale `gamma [d]` and
/// offset `beta [d]`: per row, `mu = mean x`, `var = mean (x - mu)^2`,
/// `y = gamma (x - mu) / sqrt(var + eps) + beta`, as one op. Backward (per row, `r = 1/sqrt(var +
/// eps)`, `xh = (x - mu) r`, `u = gamma dy`): `dx = r (u - mean u - xh mean(u xh))`,
/// `dgamma = sum_rows dy xh`, `dbeta = sum_rows dy`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let op = LayerNorm::checked(x, gamma, beta, eps, tracked(&[x, gamma, beta]))?;
    x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)
}

/// [`layer_norm`] run outside candle's graph, kept for a backward called by hand.
pub(crate) fn layer_norm_taped(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Taped<LayerNorm>> {
    Taped::run3(LayerNorm::checked(x, gamma, beta, eps, true)?, x, gamma, beta)
}

impl LayerNorm {
    fn checked(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64, save: bool) -> Result<Self> {
        let d = x.dim(D::Minus1)?;
        if gamma.dims() != [d] || beta.dims() != [d] {
            candle_core::bail!(
                "layer_norm: gamma {:?} and beta {:?} must be [{d}], the last dimension of x",
                gamma.dims(),
                beta.dims()
            );
        }
        if !(eps.is_finite() && eps >= 0.0) {
            candle_core::bail!("layer_norm: eps must be finite and >= 0, got {eps}");
        }
        Ok(LayerNorm { eps, save, saved: OnceLock::new() })
    }
}

/// The composite candle form of [`layer_norm`] (mean, centre, variance, divide, scale, shift).
pub fn layer_norm_composite(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(gamma)?.broadcast_add(beta)
}

pub(crate) struct LayerNorm {
    eps: f64,
    /// Whether a backward may follow (an input is tracked).
    save: bool,
    /// The forward's normalised input and scales, for the backward.
    saved: OnceLock<LnSaved>,
}

/// `xh = (x - mu) r` per element and `r = 1/sqrt(var + eps)` per row, in `f64`.
struct LnSaved {
    xh: Vec<f64>,
    r: Vec<f64>,
}

/// Per row: mean and `1/sqrt(var + eps)`.
#[inline(always)]
fn row_stats<T: Real>(row: &[T], eps: f64) -> (f64, f64) {
    let d = row.len() as f64;
    let mu = lanes(row, row, |v, _| v) / d;
    let var = lanes(row, row, |v, _| (v - mu) * (v - mu)) / d;
    (mu, 1.0 / (var + eps).sqrt())
}

/// The output and the forward's `xh` and per-row `r` ([`LnSaved`]; empty without `save`). Blocks
/// of [`ROWS`] rows in parallel.
fn ln_fwd<T: Real>(x: &[T], g: &[T], b: &[T], eps: f64, save: bool) -> (Vec<T>, LnSaved) {
    let d = g.len().max(1);
    let rows = x.len() / d;
    let mut y = vec![T::of(0.0); x.len()];
    let mut xh = vec![0.0f64; if save { x.len() } else { 0 }];
    let mut r = vec![0.0f64; if save { rows } else { 0 }];
    let one = |xs: &[T], ys: &mut [T], hs: &mut [f64], rs: &mut [f64]| {
        widest(LnFwdRows { xs, g, b, eps, save, ys, hs, rs });
    };
    if save {
        x.par_chunks(ROWS * d)
            .zip(y.par_chunks_mut(ROWS * d))
            .zip(xh.par_chunks_mut(ROWS * d))
            .zip(r.par_chunks_mut(ROWS))
            .with_min_len(min_len())
            .for_each(|(((xs, ys), hs), rs)| one(xs, ys, hs, rs));
    } else {
        x.par_chunks(ROWS * d)
            .zip(y.par_chunks_mut(ROWS * d))
            .with_min_len(min_len())
            .for_each(|(xs, ys)| one(xs, ys, &mut [], &mut []));
    }
    (y, LnSaved { xh, r })
}

/// A block of [`ln_fwd`]'s rows.
struct LnFwdRows<'a, T> {
    xs: &'a [T],
    g: &'a [T],
    b: &'a [T],
    eps: f64,
    save: bool,
    ys: &'a mut [T],
    hs: &'a mut [f64],
    rs: &'a mut [f64],
}

impl<T: Real> Block for LnFwdRows<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run<S: pulp::Simd>(self) {
        let Self { xs, g, b, eps, save, ys, hs, rs } = self;
        let d = g.len().max(1);
        // Two copies of the row loop, with and without `xh`: branch-free and iterated, not indexed,
        // both vectorise (one loop that tested `save` and indexed `xh` per element ran scalar, at
        // about twice the time). The same arithmetic per element either way.
        if save {
            for (((row, yr), hr), r) in
                xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)).zip(hs.chunks_exact_mut(d)).zip(rs.iter_mut())
            {
                let (mu, rr) = row_stats(row, eps);
                for ((((&v, &gj), &bj), y), h) in
                    row.iter().zip(g).zip(b).zip(yr.iter_mut()).zip(hr.iter_mut())
                {
                    *h = (v.f() - mu) * rr;
                    *y = T::of(gj.f() * *h + bj.f());
                }
                *r = rr;
            }
        } else {
            for (row, yr) in xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)) {
                let (mu, rr) = row_stats(row, eps);
                for (((&v, &gj), &bj), y) in row.iter().zip(g).zip(b).zip(yr.iter_mut()) {
                    let h = (v.f() - mu) * rr;
                    *y = T::of(gj.f() * h + bj.f());
                }
            }
        }
    }
}

/// `(dx, dgamma, dbeta)` from the forward's [`LnSaved`]. Blocks of [`ROWS`] rows in parallel.
fn ln_bwd<T: Real>(saved: &LnSaved, g: &[T], dy: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = g.len().max(1);
    let mut dx = vec![T::of(0.0); dy.len()];
    let parts: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(ROWS * d)
        .zip(saved.xh.par_chunks(ROWS * d))
        .zip(dy.par_chunks(ROWS * d))
        .zip(saved.r.par_chunks(ROWS))
        .with_min_len(min_len())
        .map(|(((dxs, hs), gs), rs)| widest(LnBwdRows { g, dxs, hs, gs, rs }))
        .collect();
    let (dgs, dbs): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    let r = |v: Vec<f64>| v.into_iter().map(T::of).collect();
    (dx, r(column_sums(dgs, d)), r(column_sums(dbs, d)))
}

/// A block of [`ln_bwd`]'s rows: writes their `dx`, returns their sums of `dgamma` and `dbeta`.
struct LnBwdRows<'a, T> {
    g: &'a [T],
    dxs: &'a mut [T],
    hs: &'a [f64],
    gs: &'a [T],
    rs: &'a [f64],
}

impl<T: Real> Block for LnBwdRows<'_, T> {
    type Out = (Vec<f64>, Vec<f64>);
    #[inline(always)]
    fn run<S: pulp::Simd>(self) -> Self::Out {
        let Self { g, dxs, hs, gs, rs } = self;
        let d = g.len().max(1);
        let mut dg = vec![0.0f64; d];
        let mut db = vec![0.0f64; d];
        let mut u = vec![0.0f64; d];
        for (((dxr, xh), dyr), &r) in
            dxs.chunks_exact_mut(d).zip(hs.chunks_exact(d)).zip(gs.chunks_exact(d)).zip(rs)
        {
            // Iterators, not indices: no bounds checks, so the loops vectorise.
            for (((((uj, dgj), dbj), &gj), &dy), &xhj) in
                u.iter_mut().zip(dg.iter_mut()).zip(db.iter_mut()).zip(g).zip(dyr).zip(xh)
            {
                let dyj = dy.f();
                *uj = gj.f() * dyj;
                *dgj += dyj * xhj;
                *dbj += dyj;
            }
            let (su, sux) = (lanes(&u, &u, |a, _| a), lanes(&u, xh, |a, b| a * b));
            let (mu_u, mu_ux) = (su / d as f64, sux / d as f64);
            for ((dx, &uj), &xhj) in dxr.iter_mut().zip(&u).zip(xh) {
                *dx = T::of(r * (uj - mu_u - xhj * mu_ux));
            }
        }
        (dg, db)
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let (out, saved) = match s1 {
            CpuStorage::F32(_) => {
                let (y, sv) =
                    ln_fwd::<f32>(data(s1, l1, n)?, data(s2, l2, n)?, data(s3, l3, n)?, self.eps, self.save);
                (CpuStorage::F32(y), sv)
            }
            CpuStorage::F64(_) => {
                let (y, sv) =
                    ln_fwd::<f64>(data(s1, l1, n)?, data(s2, l2, n)?, data(s3, l3, n)?, self.eps, self.save);
                (CpuStorage::F64(y), sv)
            }
            _ => return Err(float_only(n)),
        };
        if self.save {
            let _ = self.saved.set(saved);
        }
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = self.name();
        let Some(saved) = self.saved.get() else {
            candle_core::bail!("{n}: backward before forward");
        };
        let (vg, vd) = (View::new(gamma)?, View::new(grad)?);
        fn go<T: Real>(
            n: &str,
            saved: &LnSaved,
            vg: &View,
            vd: &View,
            xs: &Shape,
            gs: &Shape,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (dx, dg, db) = vg.with::<T, _>(n, |g| vd.with::<T, _>(n, |dy| Ok(ln_bwd(saved, g, dy))))?;
            Ok((Some(to_tensor(dx, xs)?), Some(to_tensor(dg, gs)?), Some(to_tensor(db, gs)?)))
        }
        match x.dtype() {
            DType::F32 => go::<f32>(n, saved, &vg, &vd, x.shape(), gamma.shape()),
            DType::F64 => go::<f64>(n, saved, &vg, &vd, x.shape(), gamma.shape()),
            _ => Err(float_only(n)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Causal multi-head attention.

/// Causal multi-head attention as one op: `q [N, L, heads, dh]`, keys and values
/// `k, v [N, Lk, heads, dh]` with `Lk >= L` (the queries are the last `L` of the `Lk` positions;
/// the first `Lk - L` keys and values come from a cache); per sequence and head, query `i` sees
/// keys `j <= i + Lk - L`: `p_ij = softmax_j(scale q_i . k_j)`, `o_i = sum_j p_ij v_j`; the output
/// is `[N, L, heads, dh]`. Backward (`do` the output's gradient): `dv_j = sum_i p_ij do_i`,
/// `ds_ij = p_ij (do_i . v_j - do_i . o_i)`, `dq_i = scale sum_j ds_ij k_j`,
/// `dk_j = scale sum_i ds_ij q_i`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let op = Attention::checked(q, k, v, scale, tracked(&[q, k, v]))?;
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`causal_attention`] run outside candle's graph, kept for a backward called by hand.
pub(crate) fn causal_attention_taped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Taped<Attention>> {
    Taped::run3(Attention::checked(q, k, v, scale, true)?, q, k, v)
}

impl Attention {
    fn checked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, save: bool) -> Result<Self> {
        let (n, l, h, dh) = q.dims4()?;
        let (nk, lk, hk, dhk) = k.dims4()?;
        if (nk, hk, dhk) != (n, h, dh) || v.dims() != k.dims() || lk < l {
            candle_core::bail!(
                "causal_attention: q {:?}, k {:?}, v {:?} do not fit (want q [N, L, heads, dh], k = v [N, Lk >= L, heads, dh])",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if !scale.is_finite() {
            candle_core::bail!("causal_attention: the scale must be finite, got {scale}");
        }
        Ok(Attention { scale, save, probs: OnceLock::new() })
    }
}

/// The composite candle form of [`causal_attention`] (heads to the front, `q k^T`, scale, an
/// additive `-inf` mask, softmax, `p v`, heads back).
pub fn causal_attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, l, _, _) = q.dims4()?;
    let lk = k.dim(1)?;
    let q = q.transpose(1, 2)?.contiguous()?;
    let k = k.transpose(1, 2)?.contiguous()?;
    let v = v.transpose(1, 2)?.contiguous()?;
    let mut att = (q.matmul(&k.t()?)? * scale)?;
    if l > 1 {
        let off = lk - l;
        let m: Vec<f64> = (0..l)
            .flat_map(|i| (0..lk).map(move |j| if j <= off + i { 0.0 } else { f64::NEG_INFINITY }))
            .collect();
        let m = Tensor::from_vec(m, (l, lk), q.device())?.to_dtype(q.dtype())?;
        att = att.broadcast_add(&m)?;
    }
    let mx = att.max_keepdim(D::Minus1)?.detach();
    let e = att.broadcast_sub(&mx)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}

pub(crate) struct Attention {
    scale: f64,
    /// Whether a backward may follow (an input is tracked).
    save: bool,
    /// The forward's probabilities, `[N, L, heads, Lk]` (0 beyond the causal limit), for the
    /// backward.
    probs: OnceLock<Vec<f64>>,
}

#[derive(Clone, Copy, Debug)]
struct AttShape {
    n: usize,
    l: usize,
    lk: usize,
    h: usize,
    dh: usize,
}

impl AttShape {
    fn of(q: &Shape, k: &Shape) -> Result<Self> {
        let (n, l, h, dh) = q.dims4()?;
        let lk = k.dims4()?.1;
        Ok(Self { n, l, lk, h, dh })
    }
    /// Offset of row `t` (position) of sequence `b`, head `hh`, in a `[N, T, heads, dh]` tensor.
    #[inline(always)]
    fn at(&self, t_len: usize, b: usize, t: usize, hh: usize) -> usize {
        ((b * t_len + t) * self.h + hh) * self.dh
    }
}

#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
    lanes(a, b, |x, y| x * y)
}

/// `sum_j f(a_j, b_j)` over the common length, in `f64`, in [`LANES`] interleaved partial sums
/// (element `j` into sum `j mod LANES`) added in a fixed tree at the end: one serial chain of
/// additions would bound the speed by the adder's latency, independent sums vectorise. The order
/// is fixed, so the result is the same bits on every run and thread count.
#[inline(always)]
fn lanes<T: Real>(a: &[T], b: &[T], f: impl Fn(f64, f64) -> f64) -> f64 {
    let n = a.len().min(b.len());
    let (ca, cb) = (a[..n].chunks_exact(LANES), b[..n].chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    let mut acc = [0.0f64; LANES];
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(x[l].f(), y[l].f());
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += f(x.f(), y.f());
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Partial sums of [`lanes`].
const LANES: usize = 8;

/// The probabilities `p[0..=last]` of query row `qi` against keys `0..=last` (in `p`).
#[allow(clippy::too_many_arguments)] // the sequence, head and row that the indices name
#[inline(always)]
fn att_probs<T: Real>(
    qi: &[T],
    k: &[T],
    s: AttShape,
    b: usize,
    hh: usize,
    last: usize,
    scale: f64,
    p: &mut [f64],
) {
    let mut m = f64::NEG_INFINITY;
    for (j, pj) in p.iter_mut().enumerate().take(last + 1) {
        let o = s.at(s.lk, b, j, hh);
        *pj = scale * dot(qi, &k[o..o + s.dh]);
        m = m.max(*pj);
    }
    let mut z = 0.0;
    for pj in p.iter_mut().take(last + 1) {
        *pj = (*pj - m).exp();
        z += *pj;
    }
    for pj in p.iter_mut().take(last + 1) {
        *pj /= z;
    }
}

/// The output and the probabilities `[N, L, heads, Lk]`. Sequences in parallel (each one's
/// arithmetic is the same on any thread).
/// (Without `save`, the probabilities of one row at a time, returned empty.)
fn att_fwd<T: Real>(q: &[T], k: &[T], v: &[T], s: AttShape, scale: f64, save: bool) -> (Vec<T>, Vec<f64>) {
    let mut out = vec![T::of(0.0); q.len()];
    let mut probs = vec![0.0f64; if save { s.n * s.l * s.h * s.lk } else { 0 }];
    let per_q = s.l * s.h * s.dh;
    let per_p = s.l * s.h * s.lk;
    let one = |b: usize, out: &mut [T], probs: &mut [f64]| {
        widest(AttFwdSeq { q, k, v, s, scale, save, b, out, probs });
    };
    if save {
        out.par_chunks_mut(per_q.max(1))
            .zip(probs.par_chunks_mut(per_p.max(1)))
            .enumerate()
            .with_min_len(min_len())
            .for_each(|(b, (o, p))| one(b, o, p));
    } else {
        out.par_chunks_mut(per_q.max(1))
            .enumerate()
            .with_min_len(min_len())
            .for_each(|(b, o)| one(b, o, &mut []));
    }
    (out, probs)
}

/// One sequence of [`att_fwd`]: its output rows and (with `save`) its probabilities.
struct AttFwdSeq<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    s: AttShape,
    scale: f64,
    save: bool,
    b: usize,
    out: &'a mut [T],
    probs: &'a mut [f64],
}

impl<T: Real> Block for AttFwdSeq<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run<S: pulp::Simd>(self) {
        let Self { q, k, v, s, scale, save, b, out, probs } = self;
        let off = s.lk - s.l;
        let per_q = s.l * s.h * s.dh;
        let mut acc = vec![0.0f64; s.dh];
        let mut scratch = vec![0.0f64; s.lk];
        for i in 0..s.l {
            for hh in 0..s.h {
                let oq = s.at(s.l, b, i, hh);
                let last = i + off;
                let p = if save {
                    let op = (i * s.h + hh) * s.lk;
                    &mut probs[op..op + s.lk]
                } else {
                    &mut scratch[..]
                };
                att_probs(&q[oq..oq + s.dh], k, s, b, hh, last, scale, p);
                acc.iter_mut().for_each(|a| *a = 0.0);
                for (j, &pj) in p.iter().enumerate().take(last + 1) {
                    let ov = s.at(s.lk, b, j, hh);
                    for (a, &vv) in acc.iter_mut().zip(&v[ov..ov + s.dh]) {
                        *a += pj * vv.f();
                    }
                }
                let oo = oq - b * per_q;
                for (o, &a) in out[oo..oo + s.dh].iter_mut().zip(&acc) {
                    *o = T::of(a);
                }
            }
        }
    }
}

/// `(dq, dk, dv)` from the forward's probabilities `probs` ([`att_fwd`]). Sequences in parallel
/// (a sequence's keys and values get gradients from its own queries only).
fn att_bwd<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    dout: &[T],
    probs: &[f64],
    s: AttShape,
    scale: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let per_q = s.l * s.h * s.dh;
    let per_k = s.lk * s.h * s.dh;
    let mut dq = vec![T::of(0.0); q.len()];
    let mut dk = vec![T::of(0.0); k.len()];
    let mut dv = vec![T::of(0.0); v.len()];
    let one = |b: usize, dq_out: &mut [T], dk_out: &mut [T], dv_out: &mut [T]| {
        widest(AttBwdSeq { q, k, v, dout, probs, s, scale, b, dq_out, dk_out, dv_out });
    };
    dq.par_chunks_mut(per_q.max(1))
        .zip(dk.par_chunks_mut(per_k.max(1)))
        .zip(dv.par_chunks_mut(per_k.max(1)))
        .enumerate()
        .with_min_len(min_len())
        .for_each(|(b, ((a, c), d))| one(b, a, c, d));
    (dq, dk, dv)
}

/// One sequence of [`att_bwd`]: the gradients of its queries, keys and values.
struct AttBwdSeq<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    dout: &'a [T],
    probs: &'a [f64],
    s: AttShape,
    scale: f64,
    b: usize,
    dq_out: &'a mut [T],
    dk_out: &'a mut [T],
    dv_out: &'a mut [T],
}

impl<T: Real> Block for AttBwdSeq<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run<S: pulp::Simd>(self) {
        let Self { q, k, v, dout, probs, s, scale, b, dq_out, dk_out, dv_out } = self;
        let per_q = s.l * s.h * s.dh;
        let per_k = s.lk * s.h * s.dh;
        let off = s.lk - s.l;
        let mut dq = vec![0.0f64; per_q];
        let mut dk = vec![0.0f64; per_k];
        let mut dv = vec![0.0f64; per_k];
        let mut dp = vec![0.0f64; s.lk];
        for i in 0..s.l {
            for hh in 0..s.h {
                let oq = s.at(s.l, b, i, hh);
                let lq = oq - b * per_q;
                let last = i + off;
                let qi = &q[oq..oq + s.dh];
                let doi = &dout[oq..oq + s.dh];
                let op = ((b * s.l + i) * s.h + hh) * s.lk;
                let p = &probs[op..op + s.lk];
                // dp_ij = do_i . v_j; sum_j p_ij dp_ij = do_i . o_i.
                let mut pdp = 0.0;
                for j in 0..=last {
                    let ov = s.at(s.lk, b, j, hh);
                    let lv = ov - b * per_k;
                    dp[j] = dot(doi, &v[ov..ov + s.dh]);
                    pdp += p[j] * dp[j];
                    for (g, &d) in dv[lv..lv + s.dh].iter_mut().zip(doi) {
                        *g += p[j] * d.f();
                    }
                }
                for j in 0..=last {
                    let ds = scale * p[j] * (dp[j] - pdp);
                    let ok = s.at(s.lk, b, j, hh);
                    let lk = ok - b * per_k;
                    for (g, &kk) in dq[lq..lq + s.dh].iter_mut().zip(&k[ok..ok + s.dh]) {
                        *g += ds * kk.f();
                    }
                    for (g, &qq) in dk[lk..lk + s.dh].iter_mut().zip(qi) {
                        *g += ds * qq.f();
                    }
                }
            }
        }
        for (o, &g) in dq_out.iter_mut().zip(&dq) {
            *o = T::of(g);
        }
        for (o, &g) in dk_out.iter_mut().zip(&dk) {
            *o = T::of(g);
        }
        for (o, &g) in dv_out.iter_mut().zip(&dv) {
            *o = T::of(g);
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let s = AttShape::of(l1.shape(), l2.shape())?;
        let out = match s1 {
            CpuStorage::F32(_) => {
                let (o, p) = att_fwd::<f32>(
                    data(s1, l1, n)?,
                    data(s2, l2, n)?,
                    data(s3, l3, n)?,
                    s,
                    self.scale,
                    self.save,
                );
                (CpuStorage::F32(o), p)
            }
            CpuStorage::F64(_) => {
                let (o, p) = att_fwd::<f64>(
                    data(s1, l1, n)?,
                    data(s2, l2, n)?,
                    data(s3, l3, n)?,
                    s,
                    self.scale,
                    self.save,
                );
                (CpuStorage::F64(o), p)
            }
            _ => return Err(float_only(n)),
        };
        let (out, probs) = out;
        // A second forward of the same op (none in candle) would keep the first's probabilities.
        if self.save {
            let _ = self.probs.set(probs);
        }
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = self.name();
        let s = AttShape::of(q.shape(), k.shape())?;
        let Some(probs) = self.probs.get() else {
            candle_core::bail!("{n}: backward before forward");
        };
        let views = [View::new(q)?, View::new(k)?, View::new(v)?, View::new(grad)?];
        fn go<T: Real>(
            n: &str,
            w: &[View; 4],
            probs: &[f64],
            s: AttShape,
            scale: f64,
            qs: &Shape,
            ks: &Shape,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (dq, dk, dv) = w[0].with::<T, _>(n, |q| {
                w[1].with::<T, _>(n, |k| {
                    w[2].with::<T, _>(n, |v| {
                        w[3].with::<T, _>(n, |g| Ok(att_bwd(q, k, v, g, probs, s, scale)))
                    })
                })
            })?;
            Ok((Some(to_tensor(dq, qs)?), Some(to_tensor(dk, ks)?), Some(to_tensor(dv, ks)?)))
        }
        match q.dtype() {
            DType::F32 => go::<f32>(n, &views, probs, s, self.scale, q.shape(), k.shape()),
            DType::F64 => go::<f64>(n, &views, probs, s, self.scale, q.shape(), k.shape()),
            _ => Err(float_only(n)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Log-softmax.

/// Log-softmax over the last dimension, as one op: `y_i = x_i - m - log sum_j exp(x_j - m)`,
/// `m = max_j x_j`. Backward: `dx_i = dy_i - exp(y_i) sum_j dy_j`.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(LogSoftmax)
}

/// [`log_softmax`] run outside candle's graph, kept for a backward called by hand.
pub(crate) fn log_softmax_taped(x: &Tensor) -> Result<Taped<LogSoftmax>> {
    Taped::run1(LogSoftmax, x)
}

/// The composite candle form of [`log_softmax`] (max, shift, exp, sum, log, subtract).
pub fn log_softmax_composite(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&m)?;
    let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
    s.broadcast_sub(&lse)
}

pub(crate) struct LogSoftmax;

fn lsm_fwd<T: Real>(x: &[T], d: usize) -> Vec<T> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v.f()));
        let ls = row.iter().map(|&v| (v.f() - m).exp()).sum::<f64>().ln();
        y.extend(row.iter().map(|&v| T::of((v.f() - m) - ls)));
    }
    y
}

fn lsm_bwd<T: Real>(y: &[T], dy: &[T], d: usize) -> Vec<T> {
    let mut dx = Vec::with_capacity(y.len());
    for (yr, gr) in y.chunks_exact(d).zip(dy.chunks_exact(d)) {
        let sg: f64 = gr.iter().map(|&g| g.f()).sum();
        dx.extend(yr.iter().zip(gr).map(|(&y, &g)| T::of(g.f() - y.f().exp() * sg)));
    }
    dx
}

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "fused-log-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(lsm_fwd::<f32>(data(s, l, n)?, d)),
            CpuStorage::F64(_) => CpuStorage::F64(lsm_fwd::<f64>(data(s, l, n)?, d)),
            _ => return Err(float_only(n)),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = self.name();
        let d = arg.dims().last().copied().unwrap_or(1).max(1);
        let (vy, vg) = (View::new(res)?, View::new(grad)?);
        let dx = match arg.dtype() {
            DType::F32 => to_tensor(
                vy.with::<f32, _>(n, |y| vg.with::<f32, _>(n, |g| Ok(lsm_bwd(y, g, d))))?,
                arg.shape(),
            )?,
            DType::F64 => to_tensor(
                vy.with::<f64, _>(n, |y| vg.with::<f64, _>(n, |g| Ok(lsm_bwd(y, g, d))))?,
                arg.shape(),
            )?,
            _ => return Err(float_only(n)),
        };
        Ok(Some(dx))
    }
}

// ---------------------------------------------------------------------------------------------
// GELU.

/// Flax's default GELU, the tanh approximation `gelu(x) = x/2 (1 + tanh(u))`,
/// `u = c (x + a x^3)`, `c = sqrt(2/pi)`, `a = 0.044715`, as one op, computed through the
/// identity `(1 + tanh u)/2 = sigma(2u)` (`sigma` the logistic function; one `exp` instead of a
/// `tanh`): `gelu(x) = x sigma(2u)`. Backward `gelu'(x) = sigma(2u) + 2 x sigma(2u) (1 -
/// sigma(2u)) c (1 + 3 a x^2)` (the same as `(1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2)`,
/// `t = tanh u`). Computed in `f64`, rounded once to the dtype.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluTanh)
}

/// The composite candle form of [`gelu`]: `x/2 (1 + tanh(c (x + a x^3)))` from candle's tensor
/// ops, differentiated by candle (candle's own `gelu` has the same forward but a backward with
/// six-digit constants).
pub fn gelu_composite(x: &Tensor) -> Result<Tensor> {
    let u = ((x + (x.sqr()? * x)?.affine(GELU_A, 0.0)?)? * GELU_C)?;
    (x * 0.5)? * (u.tanh()? + 1.0)?
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)
const GELU_A: f64 = 0.044_715;

/// `sigma(2u)`, `u = c (x + a x^3)`.
fn gelu_sig(x: f64) -> f64 {
    1.0 / (1.0 + (-2.0 * GELU_C * (x + GELU_A * x * x * x)).exp())
}

fn gelu_f(x: f64) -> f64 {
    x * gelu_sig(x)
}

fn gelu_df(x: f64) -> f64 {
    let s = gelu_sig(x);
    s + 2.0 * x * s * (1.0 - s) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(data::<f32>(s, l, n)?.iter().map(|&x| gelu_f(x.f()) as f32).collect())
            }
            CpuStorage::F64(_) => CpuStorage::F64(data::<f64>(s, l, n)?.iter().map(|&x| gelu_f(x)).collect()),
            _ => return Err(float_only(n)),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = self.name();
        let (vx, vg) = (View::new(arg)?, View::new(grad)?);
        fn go<T: Real>(vx: &View, vg: &View, n: &str, shape: &Shape) -> Result<Tensor> {
            let d = vx.with::<T, _>(n, |x| {
                vg.with::<T, _>(n, |g| {
                    Ok(x.iter().zip(g).map(|(&x, &g)| T::of(g.f() * gelu_df(x.f()))).collect())
                })
            })?;
            to_tensor::<T>(d, shape)
        }
        let d = match arg.dtype() {
            DType::F32 => go::<f32>(&vx, &vg, n, arg.shape())?,
            DType::F64 => go::<f64>(&vx, &vg, n, arg.shape())?,
            _ => return Err(float_only(n)),
        };
        Ok(Some(d))
    }
}

// ---------------------------------------------------------------------------------------------
// Bias add.

/// `y = x + b` where `b`'s shape is the trailing dimensions of `x`'s (a bias `[d]` for `x [.., d]`,
/// position embeddings `[L, d]` for `x [N, L, d]`), as one op. Backward: `dx = dy`,
/// `db = sum over the leading indices of dy` (row by row, in order).
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_bias(x, b)?;
    x.contiguous()?.apply_op2(&b.contiguous()?, AddBias)
}

/// [`add_bias`] run outside candle's graph, kept for a backward called by hand.
pub(crate) fn add_bias_taped(x: &Tensor, b: &Tensor) -> Result<Taped<AddBias>> {
    check_bias(x, b)?;
    Taped::run2(AddBias, x, b)
}

fn check_bias(x: &Tensor, b: &Tensor) -> Result<()> {
    let (xd, bd) = (x.dims(), b.dims());
    if bd.len() > xd.len() || xd[xd.len() - bd.len()..] != *bd {
        candle_core::bail!("add_bias: b {bd:?} must be the trailing dimensions of x {xd:?}");
    }
    Ok(())
}

/// The composite candle form of [`add_bias`] (`broadcast_add`).
pub fn add_bias_composite(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_add(b)
}

pub(crate) struct AddBias;

fn bias_fwd<T: Real>(x: &[T], b: &[T]) -> Vec<T> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(b.len().max(1)) {
        y.extend(row.iter().zip(b).map(|(&x, &b)| T::of(x.f() + b.f())));
    }
    y
}

fn bias_bwd<T: Real>(dy: &[T], m: usize) -> Vec<T> {
    let mut db = vec![0.0f64; m];
    for row in dy.chunks_exact(m.max(1)) {
        for (a, &g) in db.iter_mut().zip(row) {
            *a += g.f();
        }
    }
    db.into_iter().map(T::of).collect()
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "fused-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(bias_fwd::<f32>(data(s1, l1, n)?, data(s2, l2, n)?)),
            CpuStorage::F64(_) => CpuStorage::F64(bias_fwd::<f64>(data(s1, l1, n)?, data(s2, l2, n)?)),
            _ => return Err(float_only(n)),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = self.name();
        let vg = View::new(grad)?;
        let m = b.elem_count();
        let db = match b.dtype() {
            DType::F32 => to_tensor(vg.with::<f32, _>(n, |g| Ok(bias_bwd(g, m)))?, b.shape())?,
            DType::F64 => to_tensor(vg.with::<f64, _>(n, |g| Ok(bias_bwd(g, m)))?, b.shape())?,
            _ => return Err(float_only(n)),
        };
        Ok((Some(grad.clone()), Some(db)))
    }
}

// ---------------------------------------------------------------------------------------------
// Bias add and GELU.

/// `y = gelu(x + b)` ([`gelu`]) for `x [.., d]` and a bias `b [d]`, as one op. Backward, with
/// `z = x + b`: `dx = dy gelu'(z)`, `db = sum over the rows of dx`; the forward keeps `gelu'(z)`
/// (rounded to the dtype) for it when an input is tracked. `f64` computes as [`gelu`]; `f32`
/// computes `z`, `gelu(z)` and `gelu'(z)` in `f32` with a polynomial `exp` (relative error about
/// `1e-7`; the same bits on every x86-64 and every run), `db` in `f64`.
pub fn bias_gelu(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let op = BiasGelu::checked(x, b, tracked(&[x, b]))?;
    x.contiguous()?.apply_op2(&b.contiguous()?, op)
}

/// [`bias_gelu`] run outside candle's graph, kept for a backward called by hand.
pub(crate) fn bias_gelu_taped(x: &Tensor, b: &Tensor) -> Result<Taped<BiasGelu>> {
    Taped::run2(BiasGelu::checked(x, b, true)?, x, b)
}

impl BiasGelu {
    fn checked(x: &Tensor, b: &Tensor, save: bool) -> Result<Self> {
        let d = x.dim(D::Minus1)?;
        if b.dims() != [d] {
            candle_core::bail!("bias_gelu: b {:?} must be [{d}], the last dimension of x", b.dims());
        }
        Ok(BiasGelu { save, deriv: OnceLock::new() })
    }
}

/// The composite candle form of [`bias_gelu`]: [`gelu_composite`] of `broadcast_add`.
pub fn bias_gelu_composite(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    gelu_composite(&x.broadcast_add(b)?)
}

pub(crate) struct BiasGelu {
    /// Whether a backward may follow (an input is tracked).
    save: bool,
    /// `gelu'(x + b)` of the forward (in the dtype), for the backward.
    deriv: OnceLock<CpuStorage>,
}

/// The least number of blocks a rayon task takes: 1 (split freely) in a pool of several threads;
/// everything (no split, so the work stays on the calling thread) in a pool of one, as when
/// `tpo reproduce reversal` runs one job per core and each job's thread calls these ops: one
/// shared pool thread would serialise them. The blocks and their order are the same either way.
fn min_len() -> usize {
    if rayon::current_num_threads() > 1 {
        1
    } else {
        usize::MAX
    }
}

/// Rows per parallel block of the row-wise ops: fixed, so that the sums over rows (added block by
/// block, in order) do not depend on the thread count.
const ROWS: usize = 64;

/// The sums over the rows of `[rows, d]` data, block by block (blocks of [`ROWS`] rows summed in
/// parallel, then added in order).
fn column_sums(parts: Vec<Vec<f64>>, d: usize) -> Vec<f64> {
    let mut sum = vec![0.0f64; d];
    for p in parts {
        for (a, b) in sum.iter_mut().zip(p) {
            *a += b;
        }
    }
    sum
}

/// The output and `gelu'(x + b)` (empty without `save`).
fn bias_gelu_fwd<T: Real>(x: &[T], b: &[T], save: bool) -> (Vec<T>, Vec<T>) {
    let d = b.len().max(1);
    let mut y = vec![T::of(0.0); x.len()];
    let mut dy = vec![T::of(0.0); if save { x.len() } else { 0 }];
    let one = |xs: &[T], ys: &mut [T], ds: &mut [T]| {
        for (r, (xr, yr)) in xs.chunks(d).zip(ys.chunks_mut(d)).enumerate() {
            let dr = if save { &mut ds[r * d..(r + 1) * d] } else { &mut [][..] };
            T::gelu_row(xr, b, yr, dr);
        }
    };
    if save {
        x.par_chunks(ROWS * d)
            .zip(y.par_chunks_mut(ROWS * d))
            .zip(dy.par_chunks_mut(ROWS * d))
            .with_min_len(min_len())
            .for_each(|((xs, ys), ds)| one(xs, ys, ds));
    } else {
        x.par_chunks(ROWS * d)
            .zip(y.par_chunks_mut(ROWS * d))
            .with_min_len(min_len())
            .for_each(|(xs, ys)| one(xs, ys, &mut []));
    }
    (y, dy)
}

/// `(dx, db)`: `dx = dy gelu'`, `db` its sums over the rows.
fn bias_gelu_bwd<T: Real>(deriv: &[T], dy: &[T], d: usize) -> (Vec<T>, Vec<T>) {
    let d = d.max(1);
    let mut dx = vec![T::of(0.0); dy.len()];
    let parts: Vec<Vec<f64>> = dx
        .par_chunks_mut(ROWS * d)
        .zip(deriv.par_chunks(ROWS * d))
        .zip(dy.par_chunks(ROWS * d))
        .with_min_len(min_len())
        .map(|((dxs, ds), gs)| {
            let mut db = vec![0.0f64; d];
            for ((or, dr), gr) in dxs.chunks_mut(d).zip(ds.chunks(d)).zip(gs.chunks(d)) {
                for (((o, &dj), &gj), acc) in or.iter_mut().zip(dr).zip(gr).zip(db.iter_mut()) {
                    let g = gj.f() * dj.f();
                    *acc += g;
                    *o = T::of(g);
                }
            }
            db
        })
        .collect();
    (dx, column_sums(parts, d).into_iter().map(T::of).collect())
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "fused-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let (out, deriv) = match s1 {
            CpuStorage::F32(_) => {
                let (y, d) = bias_gelu_fwd::<f32>(data(s1, l1, n)?, data(s2, l2, n)?, self.save);
                (CpuStorage::F32(y), CpuStorage::F32(d))
            }
            CpuStorage::F64(_) => {
                let (y, d) = bias_gelu_fwd::<f64>(data(s1, l1, n)?, data(s2, l2, n)?, self.save);
                (CpuStorage::F64(y), CpuStorage::F64(d))
            }
            _ => return Err(float_only(n)),
        };
        if self.save {
            let _ = self.deriv.set(deriv);
        }
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = self.name();
        let Some(deriv) = self.deriv.get() else {
            candle_core::bail!("{n}: backward before forward");
        };
        let vg = View::new(grad)?;
        let d = b.elem_count();
        let (dx, db) = match x.dtype() {
            DType::F32 => {
                let dv = f32::cpu_storage_as_slice(deriv)?;
                let (dx, db) = vg.with::<f32, _>(n, |g| Ok(bias_gelu_bwd(dv, g, d)))?;
                (to_tensor(dx, x.shape())?, to_tensor(db, b.shape())?)
            }
            DType::F64 => {
                let dv = f64::cpu_storage_as_slice(deriv)?;
                let (dx, db) = vg.with::<f64, _>(n, |g| Ok(bias_gelu_bwd(dv, g, d)))?;
                (to_tensor(dx, x.shape())?, to_tensor(db, b.shape())?)
            }
            _ => return Err(float_only(n)),
        };
        Ok((Some(dx), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp_f32` against `f64::exp` over its whole range, every 2^-10 (and NaN, the clamps).
    #[test]
    fn exp_f32_is_within_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.3f64;
        while x <= 88.0 {
            let xf = x as f32;
            let want = f64::from(xf).exp();
            let got = f64::from(exp_f32(xf));
            worst = worst.max(((got - want) / want).abs());
            x += 1.0 / 1024.0;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(-1e30), exp_f32(-87.3));
        assert_eq!(exp_f32(1e30), exp_f32(88.0));
        assert!(exp_f32(88.0).is_finite() && exp_f32(-87.3) > 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    /// The instruction sets [`widest`] can choose here, baseline first.
    #[cfg(target_arch = "x86_64")]
    #[derive(Clone, Copy, Debug)]
    enum Isa {
        Scalar,
        V3,
        #[cfg(feature = "avx512")]
        V4,
    }

    #[cfg(target_arch = "x86_64")]
    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        if pulp::x86::V3::try_new().is_some() {
            v.push(Isa::V3);
        }
        #[cfg(feature = "avx512")]
        if pulp::x86::V4::try_new().is_some() {
            v.push(Isa::V4);
        }
        v
    }

    #[cfg(target_arch = "x86_64")]
    /// `block` in `isa`'s copy, as [`widest`] runs it where `isa` is the widest.
    fn run_on<B: Block>(isa: Isa, block: B) -> B::Out {
        use pulp::Simd;
        match isa {
            Isa::Scalar => Simd::vectorize(pulp::Scalar::new(), Widest(block)),
            Isa::V3 => Simd::vectorize(pulp::x86::V3::try_new().expect("V3"), Widest(block)),
            #[cfg(feature = "avx512")]
            Isa::V4 => Simd::vectorize(pulp::x86::V4::try_new().expect("V4"), Widest(block)),
        }
    }

    #[cfg(target_arch = "x86_64")]
    /// Values in about [-3, 3), a few of them large, from a fixed sequence.
    fn data<T: Real>(n: usize, seed: u64) -> Vec<T> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 11) as f64 / (1u64 << 53) as f64;
                T::of(if i % 29 == 5 { (u - 0.5) * 4e3 } else { (u - 0.5) * 6.0 })
            })
            .collect()
    }

    #[cfg(target_arch = "x86_64")]
    fn bits<T: Real>(v: &[T]) -> Vec<u64> {
        v.iter().map(|x| x.f().to_bits()).collect()
    }

    #[cfg(target_arch = "x86_64")]
    /// Every block's outputs, in one instruction set's copy, as bits.
    fn all_blocks<T: Real>(isa: Isa, d: usize, rows: usize, s: AttShape) -> Vec<Vec<u64>> {
        let mut out = Vec::new();
        // Layer norm forward and backward over `rows` rows of width `d`.
        let (x, g, b) = (data::<T>(rows * d, 1), data::<T>(d, 2), data::<T>(d, 3));
        let (mut y, mut hs, mut rs) = (vec![T::of(0.0); rows * d], vec![0.0; rows * d], vec![0.0; rows]);
        run_on(
            isa,
            LnFwdRows { xs: &x, g: &g, b: &b, eps: 1e-5, save: true, ys: &mut y, hs: &mut hs, rs: &mut rs },
        );
        let dy = data::<T>(rows * d, 4);
        let mut dx = vec![T::of(0.0); rows * d];
        let (dg, db) = run_on(isa, LnBwdRows { g: &g, dxs: &mut dx, hs: &hs, gs: &dy, rs: &rs });
        let mut y_nosave = vec![T::of(0.0); rows * d];
        let (xs, g, b, ys) = (&x[..], &g[..], &b[..], &mut y_nosave[..]);
        run_on(isa, LnFwdRows { xs, g, b, eps: 1e-5, save: false, ys, hs: &mut [], rs: &mut [] });
        // The forward's two loops (with and without the saved input) give the same output.
        assert_eq!(bits(&y), bits(&y_nosave), "layer norm forward with and without save, {isa:?}");
        out.extend([bits(&y), bits(&hs), bits(&rs), bits(&dx), bits(&dg), bits(&db), bits(&y_nosave)]);
        // Attention forward and backward, every sequence.
        let nq = s.n * s.l * s.h * s.dh;
        let nk = s.n * s.lk * s.h * s.dh;
        let (q, k, v) = (data::<T>(nq, 5), data::<T>(nk, 6), data::<T>(nk, 7));
        let dout = data::<T>(nq, 8);
        let per_q = s.l * s.h * s.dh;
        let per_k = s.lk * s.h * s.dh;
        let per_p = s.l * s.h * s.lk;
        let (mut o, mut p) = (vec![T::of(0.0); nq], vec![0.0; s.n * per_p]);
        let (mut dq, mut dk, mut dv) = (vec![T::of(0.0); nq], vec![T::of(0.0); nk], vec![T::of(0.0); nk]);
        for bi in 0..s.n {
            let (out, probs) = (&mut o[bi * per_q..(bi + 1) * per_q], &mut p[bi * per_p..(bi + 1) * per_p]);
            run_on(isa, AttFwdSeq { q: &q, k: &k, v: &v, s, scale: 0.25, save: true, b: bi, out, probs });
        }
        let mut o_nosave = vec![T::of(0.0); nq];
        for bi in 0..s.n {
            let out = &mut o_nosave[bi * per_q..(bi + 1) * per_q];
            run_on(
                isa,
                AttFwdSeq { q: &q, k: &k, v: &v, s, scale: 0.25, save: false, b: bi, out, probs: &mut [] },
            );
        }
        out.push(bits(&o_nosave));
        for bi in 0..s.n {
            run_on(
                isa,
                AttBwdSeq {
                    q: &q,
                    k: &k,
                    v: &v,
                    dout: &dout,
                    probs: &p,
                    s,
                    scale: 0.25,
                    b: bi,
                    dq_out: &mut dq[bi * per_q..(bi + 1) * per_q],
                    dk_out: &mut dk[bi * per_k..(bi + 1) * per_k],
                    dv_out: &mut dv[bi * per_k..(bi + 1) * per_k],
                },
            );
        }
        out.extend([bits(&o), p.iter().map(|x| x.to_bits()).collect(), bits(&dq), bits(&dk), bits(&dv)]);
        out
    }

    #[cfg(target_arch = "x86_64")]
    /// [`widest`]'s promise: every instruction set's copy of every block gives the baseline's
    /// bits, for `f32` and `f64`, at widths that are and are not multiples of the vector width.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let isas = isas();
        eprintln!("instruction sets compared: {isas:?}");
        // Every x86-64 processor of the last decade has AVX2; without a second copy to compare,
        // this test would compare nothing.
        assert!(isas.len() > 1, "only the baseline instruction set here: nothing to compare");
        for &(d, rows) in &[(64usize, 70usize), (13, 9), (1, 3), (256, 5)] {
            for &s in &[
                AttShape { n: 3, l: 5, lk: 5, h: 2, dh: 32 },
                AttShape { n: 2, l: 1, lk: 7, h: 3, dh: 5 },
                AttShape { n: 1, l: 4, lk: 9, h: 1, dh: 17 },
            ] {
                let base32 = all_blocks::<f32>(Isa::Scalar, d, rows, s);
                let base64 = all_blocks::<f64>(Isa::Scalar, d, rows, s);
                let (x, b) = (data::<f32>(rows * d, 9), data::<f32>(d, 10));
                // With the derivative (training) and without it (forward only).
                let gelu = |isa| {
                    let (mut y, mut dd) = (vec![0.0f32; rows * d], vec![0.0f32; rows * d]);
                    for ((xr, yr), dr) in x.chunks(d).zip(y.chunks_mut(d)).zip(dd.chunks_mut(d)) {
                        run_on(isa, GeluRowF32 { xs: xr, b: &b, ys: yr, ds: dr });
                    }
                    let mut y1 = vec![0.0f32; rows * d];
                    for (xr, yr) in x.chunks(d).zip(y1.chunks_mut(d)) {
                        run_on(isa, GeluRowF32 { xs: xr, b: &b, ys: yr, ds: &mut [] });
                    }
                    (bits(&y), bits(&dd), bits(&y1))
                };
                let base_gelu = gelu(Isa::Scalar);
                for &isa in &isas[1..] {
                    let what = format!("{isa:?}, d {d}, rows {rows}, {s:?}");
                    assert!(all_blocks::<f32>(isa, d, rows, s) == base32, "f32 blocks differ: {what}");
                    assert!(all_blocks::<f64>(isa, d, rows, s) == base64, "f64 blocks differ: {what}");
                    assert!(gelu(isa) == base_gelu, "f32 GELU differs: {what}");
                }
            }
        }
    }
}
