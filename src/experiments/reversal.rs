//! The TPO paper's token-reversal experiments with a candle transformer (feature `candle`).
//!
//! **Task.** A prompt `x` of `H` tokens drawn uniformly from a vocabulary of `V`; the policy
//! writes `H` tokens `a_1..a_H` after it and should write the prompt reversed, `y_t = x_{H+1-t}`.
//! The token rewards ([`token_rewards`]) are, per position, `r_t = 1{a_t = y_t}` (bag of tokens,
//! [`Reward::Bag`]) or, at every position, the exact match `r_t = prod_s 1{a_s = y_s}`
//! ([`Reward::Terminal`]). A rollout's score is the mean of its token rewards.
//!
//! **Policy.** A 2-layer pre-norm causal transformer ([`Model`]): token and learned position
//! embeddings (`d_model = 64`), per layer `x + Attn(LN(x))` (2 heads, scaled dot product, causal)
//! then `x + W2 gelu(W1 LN(x))` (FFN `x4`, tanh-approximated GELU), a final LayerNorm and a linear
//! head, log-softmax over the vocabulary; LayerNorm offset `1e-6`; initialised as Flax does
//! (embeddings `N(0, 1/64)`, position embeddings `N(0, 0.02^2)`, kernels truncated-normal with
//! variance `1/fan_in`, biases 0, norm scales 1). Trained by [`MuonAdam`] (Muon for matrices,
//! Adam elsewhere) at `10 x lr`, as the authors' code does.
//!
//! **Methods** ([`Method`]); every update is `tpo::candle::policy_loss` on the transformer's
//! log-probs, differentiated by candle's autograd down to those log-probs; the trainer only forms
//! the inputs. From there the transformer's own backward is hand-written
//! ([`Model::answer_logp_taped`], [`AnswerTape::backward`]): it calls, op by op, the same
//! functions on the same values as candle's autograd through [`Model::answer_logp`] would, and
//! adds the gradients of a tensor used more than once in the order candle adds them, so the
//! gradients, and the whole training run, are the same values (`tests/reversal.rs` trains every
//! method both ways and compares the parameters; zeros may differ in sign). What it saves is
//! candle's bookkeeping: its backward gives every tensor of the graph a zeroed gradient buffer
//! and adds each contribution into it: 15–33% of a sequence-level step's time (BENCHMARKS.md).
//! [`Trainer::set_candle_autograd`] switches back to candle's autograd.
//!
//! * token-level groups (bag reward): at each of the `H` prefix states of one behaviour rollout
//!   per prompt, `K` next-token candidates are drawn from the current policy; the behaviour
//!   continues with the first. Groups are the `B H` states, members the candidates' token
//!   log-probs, scores their rewards `1{c = y_t}`. `tpo_token` is [`CMethod::Tpo`] (`eta`),
//!   `grpo_token` [`CMethod::Grpo`] (clip 0.2, `beta = 0.04`).
//! * sequence-level groups: `K` rollouts per prompt; members are sequence log-probs
//!   `l = sum_t log pi(a_t | ...)`, scores the rollouts' mean token reward (`tpo`, `grpo`,
//!   `grpo_no_kl` with `beta = 0`).
//! * one rollout per prompt with per-token terms (`ppo`, `dg`): token log-probs, grouped by
//!   position (groups of the `B` tokens at one position), so the group-mean baseline is the
//!   authors' per-position batch mean: PPO-clip (0.2) on `A = r - mean_b r` and DG
//!   (`eta`, the same advantages, one epoch).
//!
//! The authors' code sums the per-member terms over a group (over positions for PPO and DG) and
//! averages over groups; `policy_loss` averages within a group too, so the trainer multiplies the
//! loss by the group size (`K` for GRPO, `H` for PPO and DG). TPO's cross-entropy is already the
//! authors' (mean over groups). The rollout log-probs `l_old` are the first epoch's (same
//! parameters as the rollout), so the first epoch is exactly on-policy.
//!
//! **Error** of a step ([`StepOutcome::error`]): `1 -` the mean token reward of that step's
//! rollouts before its update (the behaviour rollouts for the token-level methods, all `B K`
//! rollouts for the sequence-level ones): the fraction of wrong tokens for the bag reward, the
//! exact-match error for the terminal one.
//!
//! Deterministic: prompts and samples come from [`Rng`] streams keyed by seed, step and method,
//! and candle's CPU kernels and the fused ops of [`super::fused`] give the same bits for any
//! thread count.

use candle_core::{DType, Device, Result, Tensor, Var};

pub use super::fused::gelu;
use super::fused::{self, Taped};

use super::muon::{MuonAdam, MuonConfig, ParamKind};
use super::rng::Rng;
use crate::candle::{policy_loss, Method as CMethod};
use crate::{FitConfig, GroupLayout};

/// The reward of a rollout (see the [module](self) docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reward {
    /// Dense: `r_t = 1{a_t = y_t}`.
    Bag,
    /// Sparse: every `r_t` is the exact match of the whole sequence.
    Terminal,
}

/// The training methods of the experiments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// TPO on token-level groups (dense reward only), 4 epochs.
    TpoToken,
    /// GRPO (clip 0.2, KL 0.04) on token-level groups (dense reward only), 4 epochs.
    GrpoToken,
    /// PPO-clip (0.2) per token with the per-position batch-mean baseline, 4 epochs.
    Ppo,
    /// DG (`eta`) per token with the per-position batch-mean baseline, 1 epoch.
    Dg,
    /// TPO on sequence-level groups of `K` rollouts per prompt, 4 epochs.
    Tpo,
    /// GRPO (clip 0.2, KL 0.04) on sequence-level groups, 4 epochs.
    Grpo,
    /// GRPO without the KL term, on sequence-level groups, 4 epochs.
    GrpoNoKl,
}

impl Method {
    /// Every method, in the order of the results.
    pub const ALL: [Method; 7] = [
        Method::TpoToken,
        Method::GrpoToken,
        Method::Ppo,
        Method::Dg,
        Method::Tpo,
        Method::Grpo,
        Method::GrpoNoKl,
    ];

    /// The key of the method in the results (`tpo_token`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Method::TpoToken => "tpo_token",
            Method::GrpoToken => "grpo_token",
            Method::Ppo => "ppo",
            Method::Dg => "dg",
            Method::Tpo => "tpo",
            Method::Grpo => "grpo",
            Method::GrpoNoKl => "grpo_no_kl",
        }
    }

    /// The method called `name`.
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The paper's methods for a reward: token-level TPO/GRPO, PPO and DG for the bag reward;
    /// sequence-level TPO/GRPO (with and without KL), PPO and DG for the terminal one.
    pub fn for_reward(r: Reward) -> &'static [Method] {
        match r {
            Reward::Bag => &[Method::TpoToken, Method::GrpoToken, Method::Ppo, Method::Dg],
            Reward::Terminal => &[Method::Tpo, Method::Grpo, Method::GrpoNoKl, Method::Ppo, Method::Dg],
        }
    }

    fn is_token_level(self) -> bool {
        matches!(self, Method::TpoToken | Method::GrpoToken)
    }

    fn is_sequence_level(self) -> bool {
        matches!(self, Method::Tpo | Method::Grpo | Method::GrpoNoKl)
    }

    fn id(self) -> u64 {
        Method::ALL.iter().position(|&m| m == self).unwrap_or(0) as u64
    }
}

/// The transformer's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelConfig {
    /// Vocabulary `V`.
    pub vocab: usize,
    /// Positions (`2 H`: prompt and answer).
    pub max_len: usize,
    /// Width (64).
    pub d_model: usize,
    /// Attention heads (2).
    pub heads: usize,
    /// Layers (2).
    pub layers: usize,
    /// FFN width multiplier (4).
    pub ffn_mult: usize,
}

impl ModelConfig {
    /// The paper's transformer for vocabulary `vocab` and sequences of `max_len` positions.
    pub fn paper(vocab: usize, max_len: usize) -> Self {
        Self { vocab, max_len, d_model: 64, heads: 2, layers: 2, ffn_mult: 4 }
    }
}

/// One experiment's settings (the paper's by [`ReversalConfig::paper`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReversalConfig {
    /// The reward.
    pub reward: Reward,
    /// Vocabulary `V >= 2`.
    pub vocab: usize,
    /// Sequence length `H >= 1`.
    pub length: usize,
    /// Prompts per step `B` (100).
    pub batch: usize,
    /// Group size `K` (8): candidates per state or rollouts per prompt.
    pub k: usize,
    /// Gradient epochs per batch (4; DG always 1).
    pub epochs: usize,
    /// The experiment's learning rate (1e-4; the optimiser runs at 10x, as in the authors' code).
    pub lr: f64,
    /// TPO's `eta` and DG's gate temperature (1).
    pub eta: f64,
    /// PPO/GRPO clip range (0.2).
    pub clip: f64,
    /// GRPO's KL weight (0.04).
    pub beta: f64,
    /// Steps per run.
    pub steps: usize,
}

impl ReversalConfig {
    /// The paper's settings for a reward, vocabulary and length, with `steps` steps.
    pub fn paper(reward: Reward, vocab: usize, length: usize, steps: usize) -> Self {
        Self {
            reward,
            vocab,
            length,
            batch: 100,
            k: 8,
            epochs: 4,
            lr: 1e-4,
            eta: 1.0,
            clip: 0.2,
            beta: 0.04,
            steps,
        }
    }

    /// Checks the settings and that `method` fits the reward (token-level groups need the bag
    /// reward, as in the authors' code). One-line errors.
    pub fn validate(&self, method: Method) -> std::result::Result<(), String> {
        if self.vocab < 2 {
            return Err(format!("the vocabulary must have at least 2 tokens, got {}", self.vocab));
        }
        if self.vocab > 1 << 16 {
            return Err(format!("the vocabulary must have at most 65536 tokens, got {}", self.vocab));
        }
        if self.length == 0 || self.length > 512 {
            return Err(format!("the sequence length must be in 1..=512, got {}", self.length));
        }
        if self.batch == 0 || self.k == 0 || self.epochs == 0 || self.steps == 0 {
            return Err("batch, group size, epochs and steps must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("the learning rate must be finite and > 0, got {}", self.lr));
        }
        if method.is_token_level() && self.reward == Reward::Terminal {
            return Err(format!(
                "{} needs the bag reward: token-level groups are defined for dense rewards only",
                method.name()
            ));
        }
        Ok(())
    }
}

/// The target of a prompt: the prompt reversed.
pub fn target(prompt: &[u32]) -> Vec<u32> {
    prompt.iter().rev().copied().collect()
}

/// The token rewards of `actions` against `target` (same length; see [`Reward`]).
pub fn token_rewards(actions: &[u32], target: &[u32], reward: Reward) -> Vec<f64> {
    let correct: Vec<f64> = actions.iter().zip(target).map(|(a, y)| f64::from(u8::from(a == y))).collect();
    match reward {
        Reward::Bag => correct,
        Reward::Terminal => {
            let all = if correct.iter().all(|&c| c == 1.0) { 1.0 } else { 0.0 };
            vec![all; correct.len()]
        }
    }
}

/// `1 - mean(rewards)`: the error of a batch of token rewards.
pub fn error(rewards: &[f64]) -> f64 {
    1.0 - rewards.iter().sum::<f64>() / rewards.len() as f64
}

// ---------------------------------------------------------------------------------------------
// The transformer.

struct Block {
    ln1: (Var, Var),
    wq: Var,
    bq: Var,
    wk: Var,
    bk: Var,
    wv: Var,
    bv: Var,
    wo: Var,
    bo: Var,
    ln2: (Var, Var),
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
}

/// Keys and values of the positions seen so far, per layer, `[N, L, heads, d_head]` each.
pub type KvCache = Vec<(Tensor, Tensor)>;

/// The causal transformer policy (see the [module](self) docs).
pub struct Model {
    cfg: ModelConfig,
    tok: Var,
    pos: Var,
    blocks: Vec<Block>,
    lnf: (Var, Var),
    head_w: Var,
    head_b: Var,
    params: Vec<(Var, ParamKind)>,
}

const LN_EPS: f64 = 1e-6;

impl Model {
    /// A freshly initialised model (Flax's initialisers, drawn from `rng`) in `dtype` on the CPU.
    pub fn new(cfg: ModelConfig, dtype: DType, rng: &mut Rng) -> Result<Self> {
        let (d, v, h) = (cfg.d_model, cfg.vocab, cfg.heads);
        if cfg.heads == 0 || d % cfg.heads != 0 {
            candle_core::bail!("d_model {d} is not a multiple of the {} heads", cfg.heads);
        }
        let dh = d / h;
        let f = cfg.ffn_mult * d;
        let mut params = Vec::new();
        let dev = Device::Cpu;
        let mut mk = |shape: &[usize], init: Init, kind: ParamKind, rng: &mut Rng| -> Result<Var> {
            let n: usize = shape.iter().product();
            let vals: Vec<f64> = (0..n).map(|_| init.draw(rng)).collect();
            let t = Tensor::from_vec(vals, shape, &dev)?.to_dtype(dtype)?;
            let var = Var::from_tensor(&t)?;
            params.push((var.clone(), kind));
            Ok(var)
        };
        let mat = |r: usize, c: usize| ParamKind::Muon { rows: r, cols: c };
        let tok = mk(&[v, d], Init::Normal(1.0 / (d as f64).sqrt()), mat(v, d), rng)?;
        let pos = mk(&[cfg.max_len, d], Init::Normal(0.02), mat(cfg.max_len, d), rng)?;
        let mut blocks = Vec::new();
        let lecun = |fan_in: usize| Init::TruncNormal(1.0 / (fan_in as f64).sqrt());
        for _ in 0..cfg.layers {
            let ln1 = (
                mk(&[d], Init::Const(1.0), ParamKind::Adam, rng)?,
                mk(&[d], Init::Const(0.0), ParamKind::Adam, rng)?,
            );
            // Flax's query/key/value kernels are [d, heads, d_head] (3-D: Adam) and their biases
            // [heads, d_head] (2-D: Muon); the output kernel is [heads, d_head, d] (Adam).
            let wq = mk(&[d, d], lecun(d), ParamKind::Adam, rng)?;
            let bq = mk(&[d], Init::Const(0.0), mat(h, dh), rng)?;
            let wk = mk(&[d, d], lecun(d), ParamKind::Adam, rng)?;
            let bk = mk(&[d], Init::Const(0.0), mat(h, dh), rng)?;
            let wv = mk(&[d, d], lecun(d), ParamKind::Adam, rng)?;
            let bv = mk(&[d], Init::Const(0.0), mat(h, dh), rng)?;
            let wo = mk(&[d, d], lecun(d), ParamKind::Adam, rng)?;
            let bo = mk(&[d], Init::Const(0.0), ParamKind::Adam, rng)?;
            let ln2 = (
                mk(&[d], Init::Const(1.0), ParamKind::Adam, rng)?,
                mk(&[d], Init::Const(0.0), ParamKind::Adam, rng)?,
            );
            let w1 = mk(&[d, f], lecun(d), mat(d, f), rng)?;
            let b1 = mk(&[f], Init::Const(0.0), ParamKind::Adam, rng)?;
            let w2 = mk(&[f, d], lecun(f), mat(f, d), rng)?;
            let b2 = mk(&[d], Init::Const(0.0), ParamKind::Adam, rng)?;
            blocks.push(Block { ln1, wq, bq, wk, bk, wv, bv, wo, bo, ln2, w1, b1, w2, b2 });
        }
        let lnf = (
            mk(&[d], Init::Const(1.0), ParamKind::Adam, rng)?,
            mk(&[d], Init::Const(0.0), ParamKind::Adam, rng)?,
        );
        let head_w = mk(&[d, v], lecun(d), mat(d, v), rng)?;
        let head_b = mk(&[v], Init::Const(0.0), ParamKind::Adam, rng)?;
        Ok(Self { cfg, tok, pos, blocks, lnf, head_w, head_b, params })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Every parameter with the optimiser part it belongs to.
    pub fn params(&self) -> &[(Var, ParamKind)] {
        &self.params
    }

    /// Log-probabilities `[N, L, V]` of the next token after each of `tokens [N, L]` (u32 ids),
    /// which sit at positions `start..start + L` after the cached ones (`past`, covering
    /// positions `0..start`, or none when `start = 0`); also the keys and values of all
    /// `start + L` positions, for a later call.
    pub fn forward(
        &self,
        tokens: &Tensor,
        start: usize,
        past: Option<&KvCache>,
    ) -> Result<(Tensor, KvCache)> {
        self.forward_with(tokens, start, past, true)
    }

    /// Checks that positions `start..start + l` fit the model and that `past` (required when
    /// `start > 0`) holds exactly the positions `0..start` in every layer.
    fn check_positions(&self, start: usize, l: usize, past: Option<&KvCache>) -> Result<()> {
        let c = &self.cfg;
        if start + l > c.max_len {
            candle_core::bail!("positions {start}..{} exceed the model's {}", start + l, c.max_len);
        }
        match past {
            None if start != 0 => {
                candle_core::bail!("a forward from position {start} needs the cached positions before it")
            }
            Some(p) if p.len() != self.blocks.len() => {
                candle_core::bail!("the cache has {} layers, the model {}", p.len(), self.blocks.len())
            }
            Some(p) => {
                for (pk, pv) in p {
                    if pk.dim(1)? != start || pv.dim(1)? != start {
                        candle_core::bail!(
                            "the cache holds {} positions, the forward starts at {start}",
                            pk.dim(1)?
                        );
                    }
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// [`Model::forward`]; with `track = false` on the parameters' values detached from them (no
    /// gradient graph: the rollouts), with the same results.
    fn forward_with(
        &self,
        tokens: &Tensor,
        start: usize,
        past: Option<&KvCache>,
        track: bool,
    ) -> Result<(Tensor, KvCache)> {
        let t = |v: &Var| if track { v.as_tensor().clone() } else { v.as_tensor().detach() };
        let (n, l) = tokens.dims2()?;
        let c = &self.cfg;
        let (d, h) = (c.d_model, c.heads);
        let dh = d / h;
        self.check_positions(start, l, past)?;
        let x = t(&self.tok).index_select(&tokens.flatten_all()?, 0)?.reshape((n, l, d))?;
        let mut x = fused::add_bias(&x, &t(&self.pos).narrow(0, start, l)?)?;
        let scale = 1.0 / (dh as f64).sqrt();
        let mut cache = Vec::with_capacity(self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            let y = layer_norm(&x, &b.ln1, &t)?.reshape((n * l, d))?;
            let heads = |w: &Var, bias: &Var| -> Result<Tensor> {
                linear(&y, &t(w), &t(bias))?.reshape((n, l, h, dh))
            };
            let q = heads(&b.wq, &b.bq)?;
            let (k, v) = after_past(past, i, heads(&b.wk, &b.bk)?, heads(&b.wv, &b.bv)?)?;
            // Query i (position start + i) sees keys 0..=start + i.
            let o = fused::causal_attention(&q, &k, &v, scale)?.reshape((n * l, d))?;
            x = (x + linear(&o, &t(&b.wo), &t(&b.bo))?.reshape((n, l, d))?)?;
            let y = layer_norm(&x, &b.ln2, &t)?.reshape((n * l, d))?;
            let y = fused::bias_gelu(&y.matmul(&t(&b.w1))?, &t(&b.b1))?;
            let y = linear(&y, &t(&b.w2), &t(&b.b2))?;
            x = (x + y.reshape((n, l, d))?)?;
            cache.push((k, v));
        }
        let x = layer_norm(&x, &self.lnf, &t)?.reshape((n * l, d))?;
        let logits = linear(&x, &t(&self.head_w), &t(&self.head_b))?.reshape((n, l, c.vocab))?;
        Ok((fused::log_softmax(&logits)?, cache))
    }

    /// Log-probabilities `[B G, H, V]` at the `H` answer positions of the sequences
    /// `prompt_b ++ actions_{b,g}`: `prompts [B, H]`, `actions [B G, H]` (rows `b G .. b G + G`
    /// continue prompt `b`). The prompt is run once per prompt and its keys and values shared
    /// by its `G` continuations (a causal model's prompt positions do not see the answer).
    pub fn answer_logp(&self, prompts: &Tensor, actions: &Tensor, g: usize) -> Result<Tensor> {
        let (b, h) = check_answers(prompts, actions, g)?;
        let (lp, kv) = self.forward(prompts, 0, None)?;
        let (first, kv) = share_prompt(&lp, kv, b, g)?;
        if h == 1 {
            return Ok(first);
        }
        let (rest, _) = self.forward(&actions.narrow(1, 0, h - 1)?.contiguous()?, h, Some(&kv))?;
        Tensor::cat(&[&first, &rest], 1)
    }
}

// ---------------------------------------------------------------------------------------------
// The transformer's hand-written backward.

/// What one taped forward ([`Model::forward_taped`]) keeps for its backward.
struct PassTape {
    start: usize,
    tokens: Tensor,
    embed: Taped<fused::AddBias>,
    layers: Vec<LayerTape>,
    lnf: Taped<fused::LayerNorm>,
    xf: Tensor,
    head: Taped<fused::AddBias>,
    lsm: Taped<fused::LogSoftmax>,
}

/// One layer of a [`PassTape`].
struct LayerTape {
    ln1: Taped<fused::LayerNorm>,
    y1: Tensor,
    q: Taped<fused::AddBias>,
    k: Taped<fused::AddBias>,
    v: Taped<fused::AddBias>,
    att: Taped<fused::Attention>,
    o: Tensor,
    out: Taped<fused::AddBias>,
    ln2: Taped<fused::LayerNorm>,
    y2: Tensor,
    up: Taped<fused::BiasGelu>,
    down: Taped<fused::AddBias>,
}

/// What [`Model::answer_logp_taped`] keeps for [`AnswerTape::backward`].
pub struct AnswerTape {
    b: usize,
    h: usize,
    g: usize,
    prompt: PassTape,
    rest: Option<PassTape>,
}

/// The gradients of one pass: per parameter (in [`Model::params`] order), and of the cached keys
/// and values it read (per layer).
type PassGrads = (Vec<Tensor>, Vec<(Tensor, Tensor)>);

impl Model {
    /// [`Model::forward`] outside candle's graph, keeping what [`Model::backward_pass`] needs.
    /// The same ops on the same values, so the same results.
    fn forward_taped(
        &self,
        tokens: &Tensor,
        start: usize,
        past: Option<&KvCache>,
    ) -> Result<(PassTape, KvCache)> {
        let t = |v: &Var| v.as_tensor().detach();
        let (n, l) = tokens.dims2()?;
        let c = &self.cfg;
        let (d, h) = (c.d_model, c.heads);
        let dh = d / h;
        self.check_positions(start, l, past)?;
        let tokens = tokens.flatten_all()?;
        let x = t(&self.tok).index_select(&tokens, 0)?.reshape((n, l, d))?;
        let embed = fused::add_bias_taped(&x, &t(&self.pos).narrow(0, start, l)?)?;
        let mut x = embed.out().clone();
        let scale = 1.0 / (dh as f64).sqrt();
        let mut cache = Vec::with_capacity(self.blocks.len());
        let mut layers = Vec::with_capacity(self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            let ln1 = fused::layer_norm_taped(&x, &t(&b.ln1.0), &t(&b.ln1.1), LN_EPS)?;
            let y1 = ln1.out().reshape((n * l, d))?;
            let lin = |y: &Tensor, w: &Var, bias: &Var| fused::add_bias_taped(&y.matmul(&t(w))?, &t(bias));
            let (q, k, v) = (lin(&y1, &b.wq, &b.bq)?, lin(&y1, &b.wk, &b.bk)?, lin(&y1, &b.wv, &b.bv)?);
            let qh = q.out().reshape((n, l, h, dh))?;
            let heads = |t: &Taped<fused::AddBias>| t.out().reshape((n, l, h, dh));
            let (kh, vh) = after_past(past, i, heads(&k)?, heads(&v)?)?;
            let att = fused::causal_attention_taped(&qh, &kh, &vh, scale)?;
            let o = att.out().reshape((n * l, d))?;
            let out = lin(&o, &b.wo, &b.bo)?;
            x = (x + out.out().reshape((n, l, d))?)?;
            let ln2 = fused::layer_norm_taped(&x, &t(&b.ln2.0), &t(&b.ln2.1), LN_EPS)?;
            let y2 = ln2.out().reshape((n * l, d))?;
            let up = fused::bias_gelu_taped(&y2.matmul(&t(&b.w1))?, &t(&b.b1))?;
            let down = lin(up.out(), &b.w2, &b.b2)?;
            x = (x + down.out().reshape((n, l, d))?)?;
            cache.push((kh, vh));
            layers.push(LayerTape { ln1, y1, q, k, v, att, o, out, ln2, y2, up, down });
        }
        let lnf = fused::layer_norm_taped(&x, &t(&self.lnf.0), &t(&self.lnf.1), LN_EPS)?;
        let xf = lnf.out().reshape((n * l, d))?;
        let head = fused::add_bias_taped(&xf.matmul(&t(&self.head_w))?, &t(&self.head_b))?;
        let lsm = fused::log_softmax_taped(&head.out().reshape((n, l, c.vocab))?)?;
        Ok((PassTape { start, tokens, embed, layers, lnf, xf, head, lsm }, cache))
    }

    /// The backward of one taped pass from the gradient `dlp` of its log-probs and `dkv`, extra
    /// gradients of the keys and values it returned (those read by a later pass): candle's
    /// backward of [`Model::forward`], op by op, computed by the same functions, the gradients
    /// of a tensor used twice added as candle adds them. The token embeddings' gradient is
    /// `d_tok` with this pass's rows added into it one by one (candle's `index_add` into the
    /// gradient summed so far).
    fn backward_pass(
        &self,
        tp: &PassTape,
        dlp: &Tensor,
        dkv: Option<&[(Tensor, Tensor)]>,
        d_tok: &Tensor,
    ) -> Result<PassGrads> {
        let t = |v: &Var| v.as_tensor().detach();
        let c = &self.cfg;
        let (n, l, _) = dlp.dims3()?;
        let (d, h) = (c.d_model, c.heads);
        let dh = d / h;
        // `y = x w` for `x [M, in]`: dx = dy w^T, dw = x^T dy (candle's matmul backward).
        let mm = |x: &Tensor, w: &Var, dy: &Tensor| -> Result<(Tensor, Tensor)> {
            Ok((dy.matmul(&t(w).t()?)?, x.t()?.matmul(dy)?))
        };
        let dlogits = tp.lsm.back1(dlp)?.reshape((n * l, c.vocab))?;
        let (dmm, d_head_b) = tp.head.back2(&dlogits)?;
        let (dxf, d_head_w) = mm(&tp.xf, &self.head_w, &dmm)?;
        let (mut dx, d_lnf_g, d_lnf_b) = tp.lnf.back3(&dxf.reshape((n, l, d))?)?;
        let mut layer_grads = Vec::with_capacity(self.blocks.len());
        let mut dpast = Vec::with_capacity(self.blocks.len());
        for (i, (b, lt)) in self.blocks.iter().zip(&tp.layers).enumerate().rev() {
            // x_out = x_mid + down(gelu(up(ln2(x_mid)))).
            let (dmm, d_b2) = lt.down.back2(&dx.reshape((n * l, d))?)?;
            let (dup, d_w2) = mm(lt.up.out(), &b.w2, &dmm)?;
            let (dh1, d_b1) = lt.up.back2(&dup)?;
            let (dy2, d_w1) = mm(&lt.y2, &b.w1, &dh1)?;
            let (dx2, d_ln2_g, d_ln2_b) = lt.ln2.back3(&dy2.reshape((n, l, d))?)?;
            let dmid = (&dx + dx2)?;
            // x_mid = x_in + out(att(q, k, v)).
            let (dmm, d_bo) = lt.out.back2(&dmid.reshape((n * l, d))?)?;
            let (do_, d_wo) = mm(&lt.o, &b.wo, &dmm)?;
            let (dq, mut dk, mut dv) = lt.att.back3(&do_.reshape((n, l, h, dh))?)?;
            if tp.start > 0 {
                dpast.push((dk.narrow(1, 0, tp.start)?, dv.narrow(1, 0, tp.start)?));
                dk = dk.narrow(1, tp.start, l)?;
                dv = dv.narrow(1, tp.start, l)?;
            }
            if let Some(extra) = dkv {
                dk = (dk + &extra[i].0)?;
                dv = (dv + &extra[i].1)?;
            }
            let (dmq, d_bq) = lt.q.back2(&dq.reshape((n * l, d))?)?;
            let (dmk, d_bk) = lt.k.back2(&dk.reshape((n * l, d))?)?;
            let (dmv, d_bv) = lt.v.back2(&dv.reshape((n * l, d))?)?;
            let (dyq, d_wq) = mm(&lt.y1, &b.wq, &dmq)?;
            let (dyk, d_wk) = mm(&lt.y1, &b.wk, &dmk)?;
            let (dyv, d_wv) = mm(&lt.y1, &b.wv, &dmv)?;
            let dy1 = ((dyv + dyk)? + dyq)?;
            let (dx1, d_ln1_g, d_ln1_b) = lt.ln1.back3(&dy1.reshape((n, l, d))?)?;
            dx = (dmid + dx1)?;
            layer_grads.push(vec![
                d_ln1_g, d_ln1_b, d_wq, d_bq, d_wk, d_bk, d_wv, d_bv, d_wo, d_bo, d_ln2_g, d_ln2_b, d_w1,
                d_b1, d_w2, d_b2,
            ]);
        }
        layer_grads.reverse();
        dpast.reverse();
        // x0 = tok[tokens] + pos[start..start + l].
        let (demb, dpos) = tp.embed.back2(&dx)?;
        let d_tok = d_tok.index_add(&tp.tokens, &demb.reshape((n * l, d))?, 0)?;
        let mut parts = Vec::with_capacity(3);
        if tp.start > 0 {
            parts.push(Tensor::zeros((tp.start, d), dpos.dtype(), dpos.device())?);
        }
        parts.push(dpos);
        if tp.start + l < c.max_len {
            parts.push(Tensor::zeros((c.max_len - tp.start - l, d), dx.dtype(), dx.device())?);
        }
        let d_pos = Tensor::cat(&parts, 0)?;
        let mut grads = vec![d_tok, d_pos];
        grads.extend(layer_grads.into_iter().flatten());
        grads.extend([d_lnf_g, d_lnf_b, d_head_w, d_head_b]);
        Ok((grads, dpast))
    }

    /// [`Model::answer_logp`] with a hand-written backward: the log-probabilities `[B G, H, V]`
    /// (no graph) and an [`AnswerTape`] whose [`AnswerTape::backward`] gives the parameters'
    /// gradients from theirs. The same values as candle's autograd through
    /// [`Model::answer_logp`] (the same ops on the same values, gradients added in the same order;
    /// `tests/reversal.rs` compares them), without the graph's bookkeeping: candle's backward
    /// starts each tensor's gradient from a zeroed buffer and adds every contribution into it.
    pub fn answer_logp_taped(
        &self,
        prompts: &Tensor,
        actions: &Tensor,
        g: usize,
    ) -> Result<(Tensor, AnswerTape)> {
        let (b, h) = check_answers(prompts, actions, g)?;
        let (prompt, kv) = self.forward_taped(prompts, 0, None)?;
        let (first, kv) = share_prompt(prompt.lsm.out(), kv, b, g)?;
        if h == 1 {
            return Ok((first, AnswerTape { b, h, g, prompt, rest: None }));
        }
        let (rest, _) = self.forward_taped(&actions.narrow(1, 0, h - 1)?.contiguous()?, h, Some(&kv))?;
        let lp = Tensor::cat(&[&first, rest.lsm.out()], 1)?;
        Ok((lp, AnswerTape { b, h, g, prompt, rest: Some(rest) }))
    }
}

impl AnswerTape {
    /// The gradient of each parameter of `model` (in [`Model::params`] order) from `dlp`, the
    /// gradient of the log-probabilities that [`Model::answer_logp_taped`] returned. `model` is
    /// the one that made the tape, its parameters unchanged since (the backward reads the
    /// weights); a model of another depth or a `dlp` of another shape is an error.
    pub fn backward(&self, model: &Model, dlp: &Tensor) -> Result<Vec<Tensor>> {
        let (b, h, g) = (self.b, self.h, self.g);
        if model.blocks.len() != self.prompt.layers.len() {
            candle_core::bail!(
                "the tape was made by a model of {} layers, not this one of {}",
                self.prompt.layers.len(),
                model.blocks.len()
            );
        }
        let want = [b * g, h, model.cfg.vocab];
        if dlp.dims() != want {
            candle_core::bail!("the log-probs' gradient is {:?}, want {want:?}", dlp.dims());
        }
        let idx = if g > 1 { Some(repeat_index(b, g)?) } else { None };
        // Candle's backward reaches the continuation pass first.
        let mut d_tok = model.tok.as_tensor().zeros_like()?;
        let (dfirst, rest) = match &self.rest {
            Some(rest) => {
                let dfirst = dlp.narrow(1, 0, 1)?;
                let drest = dlp.narrow(1, 1, h - 1)?.contiguous()?;
                let (grads, dpast) = model.backward_pass(rest, &drest, None, &d_tok)?;
                d_tok = grads[0].clone();
                (dfirst, Some((grads, dpast)))
            }
            None => (dlp.clone(), None),
        };
        // first = lp_prompt[:, h - 1] (repeated G times).
        let gather = |d: &Tensor| -> Result<Tensor> {
            match &idx {
                Some(idx) => {
                    let mut dims = d.dims().to_vec();
                    dims[0] = b;
                    Tensor::zeros(dims, d.dtype(), d.device())?.index_add(idx, &d.contiguous()?, 0)
                }
                None => Ok(d.clone()),
            }
        };
        let dfirst = gather(&dfirst)?;
        let dprompt = if h > 1 {
            let (_, _, v) = dfirst.dims3()?;
            Tensor::cat(&[&Tensor::zeros((b, h - 1, v), dfirst.dtype(), dfirst.device())?, &dfirst], 1)?
        } else {
            dfirst
        };
        let dkv = match &rest {
            Some((_, dpast)) => {
                Some(dpast.iter().map(|(k, v)| Ok((gather(k)?, gather(v)?))).collect::<Result<Vec<_>>>()?)
            }
            None => None,
        };
        let (mut grads, _) = model.backward_pass(&self.prompt, &dprompt, dkv.as_deref(), &d_tok)?;
        if let Some((rg, _)) = rest {
            // The token embeddings' (index 0) already hold both passes'.
            for (a, r) in grads.iter_mut().zip(rg).skip(1) {
                *a = (&*a + r)?;
            }
        }
        Ok(grads)
    }
}

/// Row indices `0,..,0, 1,..,1, ...` (each of `0..b` repeated `g` times).
fn repeat_index(b: usize, g: usize) -> Result<Tensor> {
    let idx: Vec<u32> = (0..b as u32).flat_map(|i| std::iter::repeat_n(i, g)).collect();
    Tensor::from_vec(idx, b * g, &Device::Cpu)
}

/// `(B, H)` of `prompts [B, H]`, after checking that `H >= 1`, `g >= 1` and `actions` is
/// `[B g, H]` (one-line errors).
fn check_answers(prompts: &Tensor, actions: &Tensor, g: usize) -> Result<(usize, usize)> {
    let (b, h) = prompts.dims2()?;
    if h == 0 || g == 0 {
        candle_core::bail!("answers need prompts of at least 1 token and g >= 1, got H = {h}, g = {g}");
    }
    if actions.dims() != [b * g, h] {
        candle_core::bail!(
            "actions are {:?}, want [{}, {h}] ({b} prompts x {g} answers)",
            actions.dims(),
            b * g
        );
    }
    Ok((b, h))
}

/// From a prompt pass over `b` prompts (log-probs `lp [B, H, V]` and keys and values `kv`): the
/// log-probs at its last position, `[B G, 1, V]`, and the keys and values, `[B G, H, ..]`, each
/// prompt's repeated for its `g` continuations (rows `b G .. b G + G`).
fn share_prompt(lp: &Tensor, kv: KvCache, b: usize, g: usize) -> Result<(Tensor, KvCache)> {
    let h = lp.dim(1)?;
    let last = lp.narrow(1, h - 1, 1)?.contiguous()?;
    if g == 1 {
        return Ok((last, kv));
    }
    let idx = repeat_index(b, g)?;
    let kv = kv
        .into_iter()
        .map(|(k, v)| Ok((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?)))
        .collect::<Result<_>>()?;
    Ok((last.index_select(&idx, 0)?, kv))
}

/// `(k, v)` of layer `i`, `[N, L, heads, dh]`, after the cached ones of `past` (when given; the
/// positions were checked by [`Model::check_positions`]).
fn after_past(past: Option<&KvCache>, i: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    match past {
        Some(p) => {
            let (pk, pv) = &p[i];
            Ok((Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?))
        }
        None => Ok((k, v)),
    }
}

#[derive(Clone, Copy)]
enum Init {
    Const(f64),
    Normal(f64),
    /// Flax's `lecun_normal`: a normal truncated to +-2 standard deviations, rescaled so that the
    /// standard deviation is the given one.
    TruncNormal(f64),
}

impl Init {
    fn draw(self, rng: &mut Rng) -> f64 {
        match self {
            Init::Const(c) => c,
            Init::Normal(s) => s * rng.normal(),
            Init::TruncNormal(s) => loop {
                let z = rng.normal();
                if z.abs() <= 2.0 {
                    // The standard deviation of a standard normal truncated to [-2, 2].
                    break s * z / 0.879_625_661_034_239_8;
                }
            },
        }
    }
}

/// `x W + b` for `x [M, in]`.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    fused::add_bias(&x.matmul(w)?, b)
}

/// LayerNorm over the last dimension with scale and offset ([`fused::layer_norm`]).
/// (`t` gives a parameter's tensor, tracked or detached.)
fn layer_norm(x: &Tensor, (g, b): &(Var, Var), t: &dyn Fn(&Var) -> Tensor) -> Result<Tensor> {
    fused::layer_norm(x, &t(g), &t(b), LN_EPS)
}

// ---------------------------------------------------------------------------------------------
// Training.

/// What one step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// `1 -` the mean token reward of the step's rollouts, before its update.
    pub error: f64,
    /// The first epoch's loss value (as `policy_loss` reports it, times the group-size factor).
    pub loss: f64,
}

/// One seed of one method: model, optimiser and random streams.
pub struct Trainer {
    cfg: ReversalConfig,
    method: Method,
    seed: u64,
    model: Model,
    opt: MuonAdam,
    step: usize,
    autograd: bool,
}

/// A seed for the stream of `(seed, step, purpose)`, via splitmix64 mixing inside [`Rng::new`].
fn stream(seed: u64, step: usize, method: Option<Method>, purpose: u64) -> Rng {
    let mut r = Rng::new(seed ^ 0x005E_ED0F_7E7E);
    let a = r.next_u64();
    let key = a
        ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ method.map_or(0, |m| (m.id() + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
        ^ purpose.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
    Rng::new(key)
}

/// Sampled token and candidates of a rollout.
struct Rollout {
    /// Behaviour tokens `[N, H]`.
    actions: Vec<u32>,
    /// Candidates `[N, H, C]` (the behaviour token is candidate 0).
    cands: Vec<u32>,
}

impl Trainer {
    /// A trainer for `method` and `seed` (the model's initialisation depends on the seed only,
    /// so every method starts from the same parameters).
    pub fn new(cfg: &ReversalConfig, method: Method, seed: u64) -> std::result::Result<Self, String> {
        cfg.validate(method)?;
        let mcfg = ModelConfig::paper(cfg.vocab, 2 * cfg.length);
        let mut init = stream(seed, 0, None, 1);
        let model = Model::new(mcfg, DType::F32, &mut init).map_err(|e| e.to_string())?;
        let opt =
            MuonAdam::new(model.params().to_vec(), MuonConfig { lr: 10.0 * cfg.lr, ..MuonConfig::default() })
                .map_err(|e| e.to_string())?;
        Ok(Self { cfg: *cfg, method, seed, model, opt, step: 0, autograd: false })
    }

    /// Differentiate the loss through the transformer with candle's autograd (`true`) or with the
    /// model's hand-written backward ([`Model::answer_logp_taped`], the default): the same values
    /// either way (`tests/reversal.rs` trains with both and compares), the hand-written one
    /// faster. Either way the loss and its gradient with respect to the log-probabilities are
    /// [`policy_loss`]'s.
    pub fn set_candle_autograd(&mut self, on: bool) {
        self.autograd = on;
    }

    /// The model being trained.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The prompts `[B, H]` of step `step` of this seed (the same for every method).
    pub fn prompts(&self, step: usize) -> Vec<u32> {
        let mut r = stream(self.seed, step, None, 2);
        let v = self.cfg.vocab as u64;
        (0..self.cfg.batch * self.cfg.length).map(|_| (r.next_u64() % v) as u32).collect()
    }

    /// Samples `rep` rollouts per prompt with `c` candidates per state from the current policy.
    fn rollout(&self, prompts: &[u32], rep: usize, c: usize, rng: &mut Rng) -> Result<Rollout> {
        let (b, h, v) = (self.cfg.batch, self.cfg.length, self.cfg.vocab);
        let n = b * rep;
        let pt = Tensor::from_vec(prompts.to_vec(), (b, h), &Device::Cpu)?;
        let (lp, kv) = self.model.forward_with(&pt, 0, None, false)?;
        let (mut last, mut kv) = share_prompt(&lp, kv, b, rep)?;
        let mut actions = vec![0u32; n * h];
        let mut cands = vec![0u32; n * h * c];
        let mut cdf = vec![0.0f64; v];
        for t in 0..h {
            let lpv = last.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let mut next = vec![0u32; n];
            for i in 0..n {
                let mut acc = 0.0;
                for (j, x) in lpv[i * v..(i + 1) * v].iter().enumerate() {
                    acc += f64::from(*x).exp();
                    cdf[j] = acc;
                }
                for k in 0..c {
                    let a = rng.categorical(&cdf) as u32;
                    cands[(i * h + t) * c + k] = a;
                }
                let a = cands[(i * h + t) * c];
                actions[i * h + t] = a;
                next[i] = a;
            }
            if t + 1 < h {
                let nt = Tensor::from_vec(next, (n, 1), &Device::Cpu)?;
                let (lp, kv2) = self.model.forward_with(&nt, h + t, Some(&kv), false)?;
                last = lp.detach();
                kv = kv2.into_iter().map(|(k, v)| (k.detach(), v.detach())).collect();
            }
        }
        Ok(Rollout { actions, cands })
    }

    /// Runs one step: rollouts, then the method's epochs of updates.
    pub fn step(&mut self) -> std::result::Result<StepOutcome, String> {
        let s = self.step;
        self.step += 1;
        self.run_step(s).map_err(|e| format!("{} seed {} step {s}: {e}", self.method.name(), self.seed))
    }

    fn run_step(&mut self, s: usize) -> Result<StepOutcome> {
        let cfg = self.cfg;
        let (b, h, k) = (cfg.batch, cfg.length, cfg.k);
        let prompts = self.prompts(s);
        let targets: Vec<u32> = prompts.chunks(h).flat_map(target).collect();
        let mut rng = stream(self.seed, s, Some(self.method), 3);
        let dev = Device::Cpu;
        let pt = Tensor::from_vec(prompts.clone(), (b, h), &dev)?;
        let fit = FitConfig::default();
        let m = self.method;
        let (rep, c) = if m.is_token_level() {
            (1, k)
        } else if m.is_sequence_level() {
            (k, 1)
        } else {
            (1, 1)
        };
        let ro = self.rollout(&prompts, rep, c, &mut rng)?;
        let n = b * rep;
        let at = Tensor::from_vec(ro.actions.clone(), (n, h), &dev)?;
        // Per sequence: token rewards of the behaviour tokens.
        let mut tok_r = Vec::with_capacity(n * h);
        for i in 0..n {
            let y = &targets[(i / rep) * h..(i / rep + 1) * h];
            tok_r.extend(token_rewards(&ro.actions[i * h..(i + 1) * h], y, cfg.reward));
        }
        let err = error(&tok_r);
        let epochs = if m == Method::Dg { 1 } else { cfg.epochs };

        // The members, their scores (or advantages) and the layout, per family.
        let (layout, signal, scale): (GroupLayout, Vec<f64>, f64) = if m.is_token_level() {
            // Groups: the B H states; members: the K candidates; scores 1{c = y_t}.
            let sc: Vec<f64> =
                (0..b * h * k).map(|j| f64::from(u8::from(ro.cands[j] == targets[j / k]))).collect();
            let scale = if m == Method::GrpoToken { k as f64 } else { 1.0 };
            (GroupLayout::uniform(b * h, k).map_err(lib)?, sc, scale)
        } else if m.is_sequence_level() {
            let sc: Vec<f64> = tok_r.chunks(h).map(|r| r.iter().sum::<f64>() / h as f64).collect();
            let scale = if m == Method::Tpo { 1.0 } else { k as f64 };
            (GroupLayout::uniform(b, k).map_err(lib)?, sc, scale)
        } else {
            // Position-major: group t holds the B tokens at position t.
            let mut sig = vec![0.0; h * b];
            for t in 0..h {
                let mean = (0..b).map(|i| tok_r[i * h + t]).sum::<f64>() / b as f64;
                for i in 0..b {
                    let r = tok_r[i * h + t];
                    sig[t * b + i] = if m == Method::Ppo { r - mean } else { r };
                }
            }
            (GroupLayout::uniform(h, b).map_err(lib)?, sig, h as f64)
        };
        let method = match m {
            Method::TpoToken | Method::Tpo => CMethod::tpo(cfg.eta),
            Method::GrpoToken | Method::Grpo => CMethod::grpo(cfg.clip, cfg.beta),
            Method::GrpoNoKl => CMethod::grpo(cfg.clip, 0.0),
            Method::Ppo => CMethod::ppo_clip(cfg.clip),
            Method::Dg => CMethod::dg(cfg.eta),
        };
        let signal = Tensor::from_vec(signal, layout.len(), &dev)?;
        let cand_t = if m.is_token_level() {
            Some(Tensor::from_vec(ro.cands.clone(), (b, h, k), &dev)?)
        } else {
            None
        };
        let mut old: Option<Tensor> = None;
        let mut first_loss = 0.0;
        for e in 0..epochs {
            // [N, H, V]: through candle's graph, or a leaf whose gradient the model's hand-written
            // backward takes on.
            let (lp, tape) = if self.autograd {
                (self.model.answer_logp(&pt, &at, rep)?, None)
            } else {
                let (lp, tape) = self.model.answer_logp_taped(&pt, &at, rep)?;
                let var = Var::from_tensor(&lp)?;
                (var.as_tensor().clone(), Some((var, tape)))
            };
            let members = if let Some(ct) = &cand_t {
                lp.gather(ct, 2)?.flatten_all()?
            } else {
                let tl = lp.gather(&at.unsqueeze(2)?, 2)?.squeeze(2)?; // [N, H]
                if m.is_sequence_level() {
                    tl.sum(1)?
                } else {
                    tl.t()?.contiguous()?.flatten_all()?
                }
            };
            let lo = match &old {
                Some(o) => o.clone(),
                None => {
                    let o = members.detach().copy()?;
                    old = Some(o.clone());
                    o
                }
            };
            let out = policy_loss(&method, &members, &lo, &signal, &layout, &fit)?;
            if e == 0 {
                first_loss = out.value * scale;
            }
            let loss = (out.loss * scale)?;
            let mut grads = loss.backward()?;
            if let Some((var, tape)) = tape {
                let dlp = match grads.get(var.as_tensor()) {
                    Some(g) => g.clone(),
                    None => var.zeros_like()?,
                };
                let pg = tape.backward(&self.model, &dlp)?;
                for ((p, _), g) in self.model.params().iter().zip(pg) {
                    grads.insert(p.as_tensor(), g);
                }
            }
            self.opt.step(&grads)?;
        }
        Ok(StepOutcome { error: err, loss: first_loss })
    }
}

fn lib(e: crate::TpoError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// One run: `cfg.steps` steps of `method` from `seed`, calling `tick` after each; the error curve.
pub fn run(
    cfg: &ReversalConfig,
    method: Method,
    seed: u64,
    tick: &dyn Fn(),
) -> std::result::Result<Vec<f64>, String> {
    let mut tr = Trainer::new(cfg, method, seed)?;
    let mut curve = Vec::with_capacity(cfg.steps);
    for _ in 0..cfg.steps {
        let out = tr.step()?;
        if !out.error.is_finite() || !out.loss.is_finite() {
            return Err(format!("{} seed {seed}: a non-finite error or loss", method.name()));
        }
        curve.push(out.error);
        tick();
    }
    Ok(curve)
}
