//! Muon for weight matrices and Adam(W) for the other parameters, on candle [`Var`]s, as the
//! token-reversal experiments of the TPO paper train their transformer (the authors' code calls
//! `optax.contrib.muon(learning_rate)` with its defaults; this follows optax 0.2.8's definition).
//!
//! For a parameter `W` with gradient `g` at update `t = 1, 2, ...` (one count for all parameters):
//!
//! * **Muon** (a parameter treated as an `r x c` matrix): the momentum
//!   `m_t = beta m_{t-1} + (1 - beta) g` (`beta = 0.95`), its Nesterov look-ahead with bias
//!   correction `m^ = beta m_t / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t)`, then the
//!   Newton–Schulz orthogonalisation `O = NS5(m^)`: `X = m^ / (||m^||_F + 1e-8)` (transposed
//!   first when `r > c`), five times `A = X X^T`, `X <- a X + (b A + c A A) X` with
//!   `(a, b, c) = (3.4445, -4.7750, 2.0315)`, transposed back; the update is
//!   `W <- W - lr sqrt(max(1, c / r)) O`.
//! * **Adam** (NAdam-style Nesterov, as optax's `adamw(..., nesterov=True)`; weight decay 0, so
//!   AdamW and Adam agree): `m_t = b1 m + (1 - b1) g`, `v_t = b2 v + (1 - b2) g^2`,
//!   `m^ = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)`, `v^ = v_t / (1 - b2^t)`,
//!   `W <- W - lr m^ / (sqrt(v^) + 1e-8)`, `b1 = 0.9`, `b2 = 0.999`.
//!
//! Which parameters are matrices follows the authors' model as optax labels it: a parameter whose
//! array has two dimensions in Flax gets Muon (embeddings, position embeddings, dense kernels,
//! the attention's query/key/value *biases* of shape `[heads, head_dim]`), every other one Adam
//! (norm scales and offsets, dense biases, and the attention's 3-D query/key/value/output kernels).

use candle_core::{DType, Result, Tensor, Var};

/// Newton–Schulz coefficients `(a, b, c)` of optax's default quintic iteration.
pub const NS_COEFFS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);
/// Newton–Schulz iterations.
pub const NS_STEPS: usize = 5;

/// How a parameter is updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Muon, with the parameter viewed as a `rows x cols` matrix (`rows * cols` elements).
    Muon {
        /// Rows (the fan-in axis).
        rows: usize,
        /// Columns (the fan-out axis).
        cols: usize,
    },
    /// Adam.
    Adam,
}

/// Hyper-parameters of [`MuonAdam`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MuonConfig {
    /// Learning rate of both parts (the authors pass `10 x` the experiment's `1e-4`: `1e-3`).
    pub lr: f64,
    /// Muon momentum `beta` (0.95).
    pub beta: f64,
    /// Adam `b1` (0.9).
    pub b1: f64,
    /// Adam `b2` (0.999).
    pub b2: f64,
    /// Adam's denominator offset and Muon's normalisation offset (1e-8).
    pub eps: f64,
}

impl Default for MuonConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta: 0.95, b1: 0.9, b2: 0.999, eps: 1e-8 }
    }
}

struct Slot {
    var: Var,
    kind: ParamKind,
    m: Tensor,
    v: Option<Tensor>,
}

/// The optimiser: one state per parameter, one shared update count.
pub struct MuonAdam {
    cfg: MuonConfig,
    slots: Vec<Slot>,
    t: i32,
}

impl MuonAdam {
    /// An optimiser over `params`. Errors if a Muon parameter's element count is not
    /// `rows * cols`.
    pub fn new(params: Vec<(Var, ParamKind)>, cfg: MuonConfig) -> Result<Self> {
        let mut slots = Vec::with_capacity(params.len());
        for (var, kind) in params {
            if let ParamKind::Muon { rows, cols } = kind {
                if rows * cols != var.elem_count() || rows == 0 || cols == 0 {
                    candle_core::bail!(
                        "muon: a parameter of shape {:?} cannot be viewed as a {rows} x {cols} matrix",
                        var.dims()
                    );
                }
            }
            let m = var.zeros_like()?;
            let v = match kind {
                ParamKind::Adam => Some(var.zeros_like()?),
                ParamKind::Muon { .. } => None,
            };
            slots.push(Slot { var, kind, m, v });
        }
        Ok(Self { cfg, slots, t: 0 })
    }

    /// Updates performed so far.
    pub fn count(&self) -> i32 {
        self.t
    }

    /// One update from the gradients in `grads` (a parameter without a gradient gets a zero one).
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        self.t += 1;
        let t = self.t;
        let c = self.cfg;
        for s in &mut self.slots {
            let g = match grads.get(s.var.as_tensor()) {
                Some(g) => g.detach(),
                None => s.var.zeros_like()?,
            };
            match s.kind {
                ParamKind::Muon { rows, cols } => {
                    let beta = c.beta;
                    s.m = ((&s.m * beta)? + (&g * (1.0 - beta))?)?;
                    let m_hat = ((&s.m * (beta / (1.0 - beta.powi(t + 1))))?
                        + (&g * ((1.0 - beta) / (1.0 - beta.powi(t))))?)?;
                    let o = newton_schulz(&m_hat.reshape((rows, cols))?, c.eps)?;
                    let scale = (cols as f64 / rows as f64).max(1.0).sqrt();
                    let w = (s.var.as_tensor() - (o.reshape(s.var.shape())? * (c.lr * scale))?)?;
                    s.var.set(&w)?;
                }
                ParamKind::Adam => {
                    let (b1, b2) = (c.b1, c.b2);
                    let v = s.v.as_ref().expect("an Adam slot has a second moment");
                    s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
                    let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let m_hat = ((&s.m * (b1 / (1.0 - b1.powi(t + 1))))?
                        + (&g * ((1.0 - b1) / (1.0 - b1.powi(t))))?)?;
                    let v_hat = (&v * (1.0 / (1.0 - b2.powi(t))))?;
                    let upd = m_hat.div(&(v_hat.sqrt()? + c.eps)?)?;
                    let w = (s.var.as_tensor() - (upd * c.lr)?)?;
                    s.var.set(&w)?;
                    s.v = Some(v);
                }
            }
        }
        Ok(())
    }
}

/// The Newton–Schulz orthogonalisation of a matrix `x [r, c]` (see the [module](self) docs):
/// an approximation of `U V^T` for `x = U S V^T`, whose singular values lie near 1 (roughly in
/// `[0.7, 1.2]` after five steps for a well-conditioned input).
pub fn newton_schulz(x: &Tensor, eps: f64) -> Result<Tensor> {
    let (r, c) = x.dims2()?;
    let mut x = if r > c { x.t()?.contiguous()? } else { x.clone() };
    let norm = x.to_dtype(DType::F64)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    x = (x * (1.0 / (norm + eps)))?;
    let (a, b, cc) = NS_COEFFS;
    for _ in 0..NS_STEPS {
        let xt = x.t()?.contiguous()?;
        let aa = x.matmul(&xt)?;
        let bm = ((&aa * b)? + (aa.matmul(&aa)? * cc)?)?;
        x = ((&x * a)? + bm.matmul(&x)?)?;
    }
    if r > c {
        x.t()?.contiguous()
    } else {
        Ok(x)
    }
}
