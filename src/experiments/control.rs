//! The control experiment behind `tpo reproduce control` (feature `candle`): CartPole-v1
//! ([`super::cartpole`]) with a neural policy trained by TPO and the policy-gradient baselines,
//! every update through [`crate::candle::policy_loss`].
//!
//! # Setup
//!
//! * **Policy**: an MLP `4 -> 64 -> 2` with ReLU, `pi(a | s) = softmax(W2 relu(W1 s + b1) + b2)_a`,
//!   initialised like PyTorch's `nn.Linear` (weights and biases uniform in `±1/sqrt(fan_in)`),
//!   trained with Adam (`lr = 1e-3`, `betas = (0.9, 0.999)`, `eps = 1e-8`, PyTorch's update in
//!   f32). The parameters are a plain `f32` vector; each gradient step wraps them in candle
//!   [`Var`]s, runs the forward pass and the method's loss in candle, and calls
//!   `loss.backward()`, whose backward through the loss is the op's (the library's reference
//!   gradient).
//! * **Rollouts** (identical for every method): an iteration draws `starts` start states (a
//!   CartPole reset each) and runs `group` episodes from each (the same start state, independent
//!   action samples), all `starts * group` episodes in lockstep with a plain-Rust copy of the
//!   forward pass (not a loss: it only samples actions). An episode's score is its return (its
//!   length: every step earns 1; at most 500).
//! * **Updates**: `epochs` full-batch Adam steps per iteration on the iteration's rollouts. The
//!   rollout log-probs `l_old` (and from them TPO's target, DG's gate, the PPO/GRPO ratios' base)
//!   are those of the first epoch's forward pass, which runs on the rollout weights: they are
//!   frozen and reused for every epoch.
//!
//! # How each method maps onto the ops
//!
//! Groups are always the `group` episodes from one start state. With `R_i` episode `i`'s return
//! and `l_i = sum_t log pi(a_t | s_t)` its sequence log-prob:
//!
//! * `reinforce`: [`Method::reinforce`] on the sequence log-probs `l_i`, scores `R_i`, group-mean
//!   baseline: `L = -(1/K) sum_i (R_i - mean R) l_i` per group, the REINFORCE estimator with the
//!   whole return credited to every step of its episode.
//! * `dg`: [`Method::dg`] (`eta = 1`) on the sequence log-probs: REINFORCE gated by
//!   `sigmoid((R_i - mean R) (-l_old_i) / eta)`. The sequence surprisal `-l_old_i` is large
//!   (tens to hundreds of nats), so the gate is near 1 for episodes above the group mean and near
//!   0 below it.
//! * `tpo`: [`Method::tpo`] (`eta = 1`) on the sequence log-probs: per group
//!   `q = softmax(log_softmax(l_old) + z(R) / eta)` and `L = -sum_i q_i log softmax(l)_i`, the
//!   paper's sequence-level TPO ("K rollouts from one start state form a group; scores =
//!   returns"). `q` depends only on the frozen `l_old` and the returns, so every epoch fits the
//!   same target.
//! * `tpo_mean`: [`Method::tpo`] on length-normalised sequence log-probs
//!   `l_i = (1/n_i) sum_t log pi(a_t | s_t)` (what the token API calls `SeqReduce::Mean`), same
//!   groups and target. With sums, `p_old = softmax(l_old)` over episodes of 10-500 steps puts
//!   most of its mass on one episode, usually a short, low-return one (a short episode is a
//!   product of fewer step probabilities), and `z(R) / eta` moves log-weights by a few nats only,
//!   so `q` stays near `p_old` ([`TargetStats`] measures this); per-step means are comparable
//!   across lengths.
//! * `tpo_noanchor`: [`Method::Tpo`] with [`Anchor::NoAnchor`] on the sequence log-probs:
//!   `q = softmax(z(R) / eta)`, the paper's no-anchor ablation.
//! * `tpo_step`: [`Method::tpo`] on the per-step log-probs with GRPO's groups (every step of a
//!   start state's episodes, scored by its episode's return, z-scored over the group's steps):
//!   the analogue of the paper's TPO_token.
//! * `ppo`: [`Method::ppo_clip`] (`eps = 0.2`) on the per-step log-probs `log pi(a_t | s_t)`,
//!   one group holding every step of the batch (the loss is the mean over the batch's steps, as
//!   in PPO implementations). There is no critic (the policy is the MLP alone): a step's
//!   advantage is its episode's return minus the mean return of the episodes from the same start
//!   state, then normalised over the batch's steps, `(A - mean) / (sd + 1e-8)` with the sample
//!   deviation, as PPO implementations normalise advantages.
//! * `grpo`: [`Method::grpo`] (`eps = 0.2`, `beta = 0.04`) on the per-step log-probs, with each
//!   step scored by its episode's return; the op z-scores the scores over the group's steps (so
//!   an episode weighs by its length in the group's mean and deviation) and averages over the
//!   group's steps, like a token-level GRPO loss with the sequence reward on every token.
//!
//! PPO and GRPO use per-step ratios because that is how practitioners use them (per-token ratios
//! in LLM training): a ratio of whole-episode probabilities leaves the clip range after the
//! smallest change. REINFORCE's gradient is the same in either form.
//!
//! # Measures
//!
//! Per iteration: the mean return of its `starts * group` episodes (the return curve), the
//! environment steps so far, `KL(pi_new || pi_old)` of the iteration's update averaged over the
//! batch's states (with its maximum over states), and the global gradient norm of each Adam step
//! (mean and maximum over the iteration's epochs); for the TPO methods, the first epoch's target
//! against its anchor ([`TargetStats`]). See [`first_reaching`], [`collapsed`] and
//! [`final_return`] for the summary measures.
//!
//! Everything is deterministic: a run depends only on its configuration, method, epochs and
//! seed (the start states and the initial weights depend only on the seed, so every method
//! starts from the same network and sees the same start states). Runs are independent, so
//! running them on several threads ([`run_all`]) gives bit-identical results.

use candle_core::{DType, Device, Tensor, Var};

use crate::candle::{policy_loss, Method};
use crate::config::{Anchor, FitConfig, TargetConfig};
use crate::error::TpoError;
use crate::experiments::cartpole::CartPole;
use crate::experiments::rng::Rng;
use crate::layout::GroupLayout;

/// The experiment's result type: errors are one-line messages.
pub type Result<T> = std::result::Result<T, String>;

/// Observation size.
pub const OBS: usize = 4;
/// Number of actions.
pub const ACTIONS: usize = 2;

/// A method of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlMethod {
    /// REINFORCE with the group-mean baseline, on sequence log-probs.
    Reinforce,
    /// PPO-clip on per-step log-probs, advantages = return minus the start state's mean return,
    /// normalised over the batch's steps.
    Ppo,
    /// GRPO on per-step log-probs, scored by the episode's return.
    Grpo,
    /// DG on sequence log-probs.
    Dg,
    /// TPO on sequence log-probs (the sequence-level TPO).
    Tpo,
    /// TPO on length-normalised sequence log-probs `l_i = (1/n_i) sum_t log pi(a_t | s_t)` (the
    /// mean the token API calls `SeqReduce::Mean`).
    TpoMean,
    /// TPO on sequence log-probs with the no-anchor target `q = softmax(z(R) / eta)`
    /// ([`Anchor::NoAnchor`]).
    TpoNoAnchor,
    /// TPO on per-step log-probs, GRPO's grouping: a group is every step of the episodes from one
    /// start state, each scored by its episode's return (the analogue of the paper's TPO_token).
    TpoStep,
}

/// The methods a default run compares, in the order of the tables and figures.
pub const METHODS: [ControlMethod; 6] = [
    ControlMethod::Reinforce,
    ControlMethod::Ppo,
    ControlMethod::Grpo,
    ControlMethod::Dg,
    ControlMethod::Tpo,
    ControlMethod::TpoMean,
];

/// Every method `--methods` accepts, in the order of the tables and figures.
pub const ALL_METHODS: [ControlMethod; 8] = [
    ControlMethod::Reinforce,
    ControlMethod::Ppo,
    ControlMethod::Grpo,
    ControlMethod::Dg,
    ControlMethod::Tpo,
    ControlMethod::TpoMean,
    ControlMethod::TpoNoAnchor,
    ControlMethod::TpoStep,
];

impl ControlMethod {
    /// The key used in the JSON and by `--methods` (`reinforce`, `ppo`, `grpo`, `dg`, `tpo`,
    /// `tpo_mean`, `tpo_noanchor`, `tpo_step`).
    pub fn key(self) -> &'static str {
        match self {
            ControlMethod::Reinforce => "reinforce",
            ControlMethod::Ppo => "ppo",
            ControlMethod::Grpo => "grpo",
            ControlMethod::Dg => "dg",
            ControlMethod::Tpo => "tpo",
            ControlMethod::TpoMean => "tpo_mean",
            ControlMethod::TpoNoAnchor => "tpo_noanchor",
            ControlMethod::TpoStep => "tpo_step",
        }
    }

    /// The method with key `key` (see [`ControlMethod::key`]), if any.
    pub fn from_key(key: &str) -> Option<Self> {
        ALL_METHODS.into_iter().find(|m| m.key() == key)
    }

    /// The name used in tables and figures.
    pub fn label(self) -> &'static str {
        match self {
            ControlMethod::Reinforce => "REINFORCE",
            ControlMethod::Ppo => "PPO",
            ControlMethod::Grpo => "GRPO",
            ControlMethod::Dg => "DG",
            ControlMethod::Tpo => "TPO",
            ControlMethod::TpoMean => "TPO-mean",
            ControlMethod::TpoNoAnchor => "TPO-noanchor",
            ControlMethod::TpoStep => "TPO-step",
        }
    }

    /// Whether the method's members are steps (`true`) or episodes (`false`).
    pub fn per_step(self) -> bool {
        matches!(self, ControlMethod::Ppo | ControlMethod::Grpo | ControlMethod::TpoStep)
    }

    /// Whether the method is a TPO variant (its update fits a target `q`).
    pub fn is_tpo(self) -> bool {
        matches!(
            self,
            ControlMethod::Tpo | ControlMethod::TpoMean | ControlMethod::TpoNoAnchor | ControlMethod::TpoStep
        )
    }

    /// How the method maps onto the ops, in words (for the JSON configuration).
    pub fn mapping(self) -> &'static str {
        match self {
            ControlMethod::Reinforce => {
                "Method::reinforce (group-mean baseline) on sequence log-probs l_i = sum_t log pi(a_t|s_t); \
                 group = the episodes from one start state; scores = returns"
            }
            ControlMethod::Ppo => {
                "Method::ppo_clip(clip) on per-step log-probs; one group = every step of the batch (loss = mean \
                 over steps); advantage of a step = its episode's return minus the mean return of the episodes \
                 from its start state, normalised over the batch's steps ((A - mean) / (sd + 1e-8), sample sd)"
            }
            ControlMethod::Grpo => {
                "Method::grpo(clip, beta) on per-step log-probs; group = every step of the episodes from one \
                 start state; score of a step = its episode's return (the op z-scores over the group's steps, \
                 so each episode weighs by its length)"
            }
            ControlMethod::Dg => {
                "Method::dg(eta) (group-mean baseline, gate sigmoid(A (-l_old) / eta)) on sequence log-probs; \
                 group = the episodes from one start state; scores = returns"
            }
            ControlMethod::Tpo => {
                "Method::tpo(eta) on sequence log-probs: q = softmax(log_softmax(l_old) + z(R)/eta) per group \
                 of episodes from one start state; scores = returns"
            }
            ControlMethod::TpoMean => {
                "Method::tpo(eta) on length-normalised sequence log-probs l_i = (1/n_i) sum_t log pi(a_t|s_t) \
                 (SeqReduce::Mean): q = softmax(log_softmax(l_old) + z(R)/eta) per group of episodes from one \
                 start state; scores = returns"
            }
            ControlMethod::TpoNoAnchor => {
                "Method::Tpo with Anchor::NoAnchor on sequence log-probs: q = softmax(z(R)/eta) per group of \
                 episodes from one start state; scores = returns"
            }
            ControlMethod::TpoStep => {
                "Method::tpo(eta) on per-step log-probs: group = every step of the episodes from one start \
                 state (as GRPO); score of a step = its episode's return; q = softmax(log_softmax(l_old) + \
                 z(R)/eta) over the group's steps (z over the steps, so each episode weighs by its length)"
            }
        }
    }

    /// The op's method for this configuration.
    pub fn op(self, cfg: &ControlConfig) -> Method {
        match self {
            ControlMethod::Reinforce => Method::reinforce(),
            ControlMethod::Ppo => Method::ppo_clip(cfg.clip),
            ControlMethod::Grpo => Method::grpo(cfg.clip, cfg.beta),
            ControlMethod::Dg => Method::dg(cfg.dg_eta),
            ControlMethod::Tpo | ControlMethod::TpoMean | ControlMethod::TpoStep => Method::tpo(cfg.tpo_eta),
            ControlMethod::TpoNoAnchor => {
                Method::Tpo(TargetConfig { anchor: Anchor::NoAnchor, ..TargetConfig::with_eta(cfg.tpo_eta) })
            }
        }
    }
}

/// The experiment's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    /// Seeds per method and epoch setting.
    pub seeds: usize,
    /// Rollout batches (iterations) per run: every method gets the same number of episodes.
    pub iterations: usize,
    /// Start states per iteration (the number of groups).
    pub starts: usize,
    /// Episodes per start state (the group size `K`).
    pub group: usize,
    /// Hidden units of the MLP.
    pub hidden: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// PPO's and GRPO's clip range.
    pub clip: f64,
    /// GRPO's KL weight.
    pub beta: f64,
    /// TPO's temperature.
    pub tpo_eta: f64,
    /// DG's gate temperature.
    pub dg_eta: f64,
    /// Base seed: run `s` uses `seed + s`.
    pub seed: u64,
    /// The average return that counts as solved.
    pub threshold: f64,
    /// The average return below which a solved run counts as collapsed.
    pub collapse: f64,
    /// Iterations averaged for the final return.
    pub final_window: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            seeds: 20,
            iterations: 60,
            starts: 2,
            group: 8,
            hidden: 64,
            lr: 1e-3,
            clip: 0.2,
            beta: 0.04,
            tpo_eta: 1.0,
            dg_eta: 1.0,
            seed: 0,
            threshold: 475.0,
            collapse: 200.0,
            final_window: 10,
        }
    }
}

impl ControlConfig {
    /// Checks the configuration for runs of `epochs` epochs: counts >= 1, `lr` finite and > 0,
    /// `tpo_eta` and `dg_eta` finite and > 0; errors are one line.
    pub fn validate(&self, epochs: usize) -> Result<()> {
        for (name, v) in [
            ("seeds", self.seeds),
            ("iterations", self.iterations),
            ("starts", self.starts),
            ("group", self.group),
            ("hidden", self.hidden),
            ("final_window", self.final_window),
            ("epochs", epochs),
        ] {
            if v == 0 {
                return Err(TpoError::BadConfig { name, requirement: ">= 1", got: 0.0 }.to_string());
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(
                TpoError::BadConfig { name: "lr", requirement: "finite and > 0", got: self.lr }.to_string()
            );
        }
        for (name, v) in [("tpo_eta", self.tpo_eta), ("dg_eta", self.dg_eta)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(TpoError::BadConfig { name, requirement: "finite and > 0", got: v }.to_string());
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The policy.

/// The MLP's parameters, flat: `W1 [hidden, 4]`, `b1 [hidden]`, `W2 [2, hidden]`, `b2 [2]`
/// (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Hidden units.
    pub hidden: usize,
    /// The parameters in the order above.
    pub params: Vec<f32>,
}

impl Policy {
    /// PyTorch's `nn.Linear` initialisation: every weight and bias of a layer uniform in
    /// `±1/sqrt(fan_in)`, drawn from `rng`.
    pub fn init(hidden: usize, rng: &mut Rng) -> Self {
        let mut params = Vec::with_capacity(Self::len(hidden));
        let b1 = 1.0 / (OBS as f64).sqrt();
        let b2 = 1.0 / (hidden as f64).sqrt();
        for (n, bound) in [(hidden * OBS, b1), (hidden, b1), (ACTIONS * hidden, b2), (ACTIONS, b2)] {
            params.extend((0..n).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32));
        }
        Self { hidden, params }
    }

    /// Number of parameters for `hidden` units.
    pub fn len(hidden: usize) -> usize {
        hidden * OBS + hidden + ACTIONS * hidden + ACTIONS
    }

    fn split(&self) -> (&[f32], &[f32], &[f32], &[f32]) {
        let h = self.hidden;
        let (w1, rest) = self.params.split_at(h * OBS);
        let (b1, rest) = rest.split_at(h);
        let (w2, b2) = rest.split_at(ACTIONS * h);
        (w1, b1, w2, b2)
    }

    /// The logits for one observation, in f32 in a fixed order (the rollout-time forward pass).
    pub fn logits(&self, obs: &[f32; OBS]) -> [f32; ACTIONS] {
        let (w1, b1, w2, b2) = self.split();
        let mut z = [b2[0], b2[1]];
        for j in 0..self.hidden {
            let row = &w1[j * OBS..(j + 1) * OBS];
            let mut a = b1[j];
            for k in 0..OBS {
                a += row[k] * obs[k];
            }
            let h = a.max(0.0);
            z[0] += w2[j] * h;
            z[1] += w2[self.hidden + j] * h;
        }
        z
    }

    /// `log pi(. | s)` in f64 from the f32 logits.
    pub fn log_probs(&self, obs: &[f32; OBS]) -> [f64; ACTIONS] {
        log_softmax2(self.logits(obs))
    }
}

fn log_softmax2(z: [f32; 2]) -> [f64; 2] {
    let (a, b) = (z[0] as f64, z[1] as f64);
    let m = a.max(b);
    let lse = m + ((a - m).exp() + (b - m).exp()).ln();
    [a - lse, b - lse]
}

// ---------------------------------------------------------------------------------------------
// Rollouts.

/// One iteration's rollouts, episodes ordered group by group.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Observations of every step, episode after episode.
    pub obs: Vec<[f32; OBS]>,
    /// The action taken at every step.
    pub actions: Vec<u32>,
    /// Steps per episode.
    pub lengths: Vec<usize>,
    /// Episodes per group (`starts` groups of `group` episodes).
    pub group: usize,
    /// Return per episode.
    pub returns: Vec<f64>,
    /// `log pi_old(. | s)` at every step, from the rollout-time forward pass (for the KL).
    pub old_log_probs: Vec<[f64; ACTIONS]>,
}

impl Batch {
    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.obs.len()
    }
}

/// Runs `starts * group` episodes of `policy` (`group` from each of `starts` fresh start
/// states drawn from `env_rng`), sampling actions from `act_rng`, in lockstep.
pub fn rollout(policy: &Policy, starts: usize, group: usize, env_rng: &mut Rng, act_rng: &mut Rng) -> Batch {
    let n = starts * group;
    let mut envs = Vec::with_capacity(n);
    for _ in 0..starts {
        let e = CartPole::reset(env_rng);
        for _ in 0..group {
            envs.push(e.clone());
        }
    }
    let mut obs: Vec<Vec<[f32; OBS]>> = vec![Vec::new(); n];
    let mut acts: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut olds: Vec<Vec<[f64; ACTIONS]>> = vec![Vec::new(); n];
    let mut returns = vec![0.0; n];
    let mut live: Vec<usize> = (0..n).collect();
    while !live.is_empty() {
        for &i in &live {
            let o = envs[i].obs();
            let lp = policy.log_probs(&o);
            let a = usize::from(act_rng.uniform() < lp[1].exp());
            let t = envs[i].step(a).expect("a live episode takes action 0 or 1");
            returns[i] += t.reward;
            obs[i].push(o);
            acts[i].push(a as u32);
            olds[i].push(lp);
        }
        live.retain(|&i| !envs[i].done());
    }
    Batch {
        lengths: obs.iter().map(Vec::len).collect(),
        obs: obs.concat(),
        actions: acts.concat(),
        group,
        returns,
        old_log_probs: olds.concat(),
    }
}

// ---------------------------------------------------------------------------------------------
// The update.

/// The candle forward pass: per-step `log pi(a_t | s_t)` `[T]` from parameter variables.
fn step_log_probs(vars: &[Var; 4], x: &Tensor, actions: &Tensor) -> candle_core::Result<Tensor> {
    let h = x.matmul(&vars[0].t()?)?.broadcast_add(&vars[1])?.relu()?;
    let z = h.matmul(&vars[2].t()?)?.broadcast_add(&vars[3])?;
    let lse = z.log_sum_exp(1)?;
    z.gather(actions, 1)?.squeeze(1)?.sub(&lse)
}

/// What the loss is fitted to: the frozen per-member `l_old` and the per-member signal.
#[derive(Debug, Clone, PartialEq)]
pub struct Frozen {
    /// The members' rollout log-probs (episodes or steps).
    pub logp_old: Vec<f32>,
}

/// The members' signal for `method`: returns per episode (REINFORCE, DG, TPO); per step, the
/// episode's return (GRPO) or PPO's advantage: the episode's return minus its group's mean
/// return, normalised over every step of the batch as PPO implementations do
/// (`(A - mean) / (sd + 1e-8)`, sample deviation over the steps).
pub fn signal(method: ControlMethod, batch: &Batch) -> Vec<f64> {
    let per_episode: Vec<f64> = match method {
        ControlMethod::Ppo => {
            let mut a = Vec::with_capacity(batch.returns.len());
            for g in batch.returns.chunks(batch.group) {
                let mean = g.iter().sum::<f64>() / g.len() as f64;
                a.extend(g.iter().map(|r| r - mean));
            }
            a
        }
        _ => batch.returns.clone(),
    };
    if !method.per_step() {
        return per_episode;
    }
    let mut s: Vec<f64> =
        batch.lengths.iter().zip(&per_episode).flat_map(|(&n, &s)| std::iter::repeat_n(s, n)).collect();
    if method == ControlMethod::Ppo {
        let n = s.len() as f64;
        let mean = s.iter().sum::<f64>() / n;
        let var = if s.len() > 1 {
            s.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        let sd = var.sqrt() + 1e-8;
        s.iter_mut().for_each(|x| *x = (*x - mean) / sd);
    }
    s
}

/// The members' layout: groups of `group` episodes (REINFORCE, DG, TPO), of their steps (GRPO),
/// or one group of every step of the batch (PPO: its loss is the mean over the batch's steps).
pub fn layout(method: ControlMethod, batch: &Batch) -> crate::Result<GroupLayout> {
    let groups = batch.lengths.len() / batch.group;
    if method == ControlMethod::Ppo {
        GroupLayout::uniform(1, batch.steps())
    } else if method.per_step() {
        let sizes: Vec<usize> = batch.lengths.chunks(batch.group).map(|c| c.iter().sum()).collect();
        GroupLayout::from_sizes(&sizes)
    } else {
        GroupLayout::uniform(groups, batch.group)
    }
}

/// One gradient evaluation: the loss value, the members' current log-probs and the gradient
/// of the loss with respect to the parameters (same order as [`Policy::params`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Gradient {
    /// The loss, as the op computed it in f64.
    pub loss: f64,
    /// The members' log-probs under `policy` (`l`), f32.
    pub logp: Vec<f32>,
    /// `dL/dtheta`.
    pub grad: Vec<f32>,
}

fn cerr(e: candle_core::Error) -> String {
    // candle's errors from the op carry the library's one-line message.
    let s = e.to_string();
    s.lines().next().unwrap_or("candle error").to_string()
}

/// The loss and its gradient for `method` on `batch` under `policy`, through
/// [`crate::candle::policy_loss`]; `frozen` is `None` for the first epoch (then `l_old = l`,
/// the log-probs of this very forward pass, detached).
pub fn gradient(
    policy: &Policy,
    batch: &Batch,
    method: ControlMethod,
    cfg: &ControlConfig,
    frozen: Option<&Frozen>,
) -> Result<Gradient> {
    let inner = || -> candle_core::Result<(f64, Vec<f32>, Vec<f32>)> {
        let dev = Device::Cpu;
        let h = policy.hidden;
        let (w1, b1, w2, b2) = policy.split();
        let vars = [
            Var::from_vec(w1.to_vec(), (h, OBS), &dev)?,
            Var::from_vec(b1.to_vec(), h, &dev)?,
            Var::from_vec(w2.to_vec(), (ACTIONS, h), &dev)?,
            Var::from_vec(b2.to_vec(), ACTIONS, &dev)?,
        ];
        let t = batch.steps();
        let x = Tensor::from_vec(batch.obs.concat(), (t, OBS), &dev)?;
        let acts = Tensor::from_vec(batch.actions.clone(), (t, 1), &dev)?;
        let per_step = step_log_probs(&vars, &x, &acts)?;
        let l = if method.per_step() {
            per_step
        } else {
            // l_i = sum of episode i's per-step log-probs (a 0/1 segment matrix [episodes, T]),
            // or their mean for TPO-mean (entries 1/n_i).
            let m = batch.lengths.len();
            let mut seg = vec![0f32; m * t];
            let mut start = 0;
            for (i, &n) in batch.lengths.iter().enumerate() {
                let w = if method == ControlMethod::TpoMean { 1.0 / n as f32 } else { 1.0 };
                seg[i * t + start..i * t + start + n].iter_mut().for_each(|v| *v = w);
                start += n;
            }
            Tensor::from_vec(seg, (m, t), &dev)?.matmul(&per_step.unsqueeze(1)?)?.squeeze(1)?
        };
        let n = l.dims()[0];
        let l_old = match frozen {
            Some(f) => Tensor::from_vec(f.logp_old.clone(), n, &dev)?,
            None => l.detach(),
        };
        let sig = Tensor::from_vec(signal(method, batch), n, &dev)?;
        let lay = layout(method, batch).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let out = policy_loss(&method.op(cfg), &l, &l_old, &sig, &lay, &FitConfig::default())?;
        let grads = out.loss.backward()?;
        let mut g = Vec::with_capacity(policy.params.len());
        for v in &vars {
            match grads.get(v) {
                Some(t) => g.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                None => g.extend(std::iter::repeat_n(0.0, v.elem_count())),
            }
        }
        Ok((out.value, l.to_vec1::<f32>()?, g))
    };
    let (loss, logp, grad) = inner().map_err(cerr)?;
    Ok(Gradient { loss, logp, grad })
}

/// Adam (PyTorch's update, in f32): `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
/// `theta -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    /// Learning rate.
    pub lr: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    const B1: f32 = 0.9;
    const B2: f32 = 0.999;
    const EPS: f32 = 1e-8;

    /// Fresh moments for `n` parameters.
    pub fn new(n: usize, lr: f64) -> Self {
        Self { lr: lr as f32, m: vec![0.0; n], v: vec![0.0; n], t: 0 }
    }

    /// One step on `params` with gradient `g`.
    pub fn step(&mut self, params: &mut [f32], g: &[f32]) {
        self.t += 1;
        let bc1 = 1.0 - Self::B1.powi(self.t);
        let bc2 = 1.0 - Self::B2.powi(self.t);
        for i in 0..params.len() {
            self.m[i] = Self::B1 * self.m[i] + (1.0 - Self::B1) * g[i];
            self.v[i] = Self::B2 * self.v[i] + (1.0 - Self::B2) * g[i] * g[i];
            let denom = (self.v[i] / bc2).sqrt() + Self::EPS;
            params[i] -= self.lr * (self.m[i] / bc1) / denom;
        }
    }
}

/// The TPO target of one batch against its anchor, averaged over the batch's groups. With
/// `p_old = softmax(l_old)`, `q` the method's target and `u = z(R)` the group's z-scored scores
/// (population deviation; `u = 0` for a zero-variance group), per group:
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetStats {
    /// `KL(q || p_old) = sum_i q_i (ln q_i - ln p_old_i)`: the step the target asks for.
    pub kl_q_pold: f64,
    /// `max_i p_old_i`: how concentrated the anchor is.
    pub max_pold: f64,
    /// `max_i q_i`.
    pub max_q: f64,
    /// `(1/2) sum_i |p_old_i - q_i|` (total variation): on the first epoch, where `p = p_old`,
    /// the size of the gradient `p - q` with respect to the members' log-probs.
    pub tv: f64,
    /// `sum_i p_old_i u_i`: the anchor's expected z-score (negative when the anchor favours
    /// the group's low-return members).
    pub pold_z: f64,
}

/// [`TargetStats`] of `method`'s target for rollout log-probs `logp_old` (one per member of
/// `method`'s layout on `batch`); `None` for the methods that are not TPO.
pub fn target_stats(
    method: ControlMethod,
    cfg: &ControlConfig,
    batch: &Batch,
    logp_old: &[f32],
) -> Result<Option<TargetStats>> {
    let Method::Tpo(tc) = method.op(cfg) else { return Ok(None) };
    let lay = layout(method, batch).map_err(|e| e.to_string())?;
    let sig = signal(method, batch);
    let q = crate::cpu::target(logp_old, &sig, &lay, &tc).map_err(|e| e.to_string())?;
    let mut acc = [0.0f64; 5];
    for g in 0..lay.num_groups() {
        let r = lay.range(g);
        let lo: Vec<f64> = logp_old[r.clone()].iter().map(|&x| x as f64).collect();
        let m = lo.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + lo.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        let lp: Vec<f64> = lo.iter().map(|x| x - lse).collect();
        let s = &sig[r.clone()];
        let k = s.len() as f64;
        let mean = s.iter().sum::<f64>() / k;
        let sd = (s.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / k).sqrt();
        let u: Vec<f64> =
            s.iter().map(|x| if sd <= tc.zero_std_threshold { 0.0 } else { (x - mean) / sd }).collect();
        let qg = &q[r];
        let mut st = [0.0f64; 5];
        for i in 0..lp.len() {
            let p = lp[i].exp();
            if qg[i] > 0.0 {
                st[0] += qg[i] * (qg[i].ln() - lp[i]);
            }
            st[1] = st[1].max(p);
            st[2] = st[2].max(qg[i]);
            st[3] += 0.5 * (p - qg[i]).abs();
            st[4] += p * u[i];
        }
        for (a, b) in acc.iter_mut().zip(st) {
            *a += b;
        }
    }
    let n = lay.num_groups().max(1) as f64;
    Ok(Some(TargetStats {
        kl_q_pold: acc[0] / n,
        max_pold: acc[1] / n,
        max_q: acc[2] / n,
        tv: acc[3] / n,
        pold_z: acc[4] / n,
    }))
}

/// What one iteration's update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    /// The TPO methods' target against its anchor at the batch's first epoch (`None` for the
    /// baselines).
    pub target: Option<TargetStats>,
    /// `KL(pi_new || pi_old)` averaged over the batch's states.
    pub kl_mean: f64,
    /// Its maximum over the batch's states.
    pub kl_max: f64,
    /// The global gradient norm, averaged over the epochs.
    pub grad_norm_mean: f64,
    /// Its maximum over the epochs.
    pub grad_norm_max: f64,
}

/// `epochs` Adam steps of `method` on `batch`, the rollout log-probs frozen at the first.
pub fn update(
    policy: &mut Policy,
    adam: &mut Adam,
    batch: &Batch,
    method: ControlMethod,
    cfg: &ControlConfig,
    epochs: usize,
) -> Result<UpdateStats> {
    let mut frozen: Option<Frozen> = None;
    let mut target = None;
    let (mut gsum, mut gmax) = (0.0f64, 0.0f64);
    for _ in 0..epochs {
        let g = gradient(policy, batch, method, cfg, frozen.as_ref())?;
        let norm = g.grad.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
        if !norm.is_finite() {
            return Err(format!("{}: the gradient is not finite", method.label()));
        }
        gsum += norm;
        gmax = gmax.max(norm);
        adam.step(&mut policy.params, &g.grad);
        if frozen.is_none() {
            target = target_stats(method, cfg, batch, &g.logp)?;
            frozen = Some(Frozen { logp_old: g.logp });
        }
    }
    let (mut ksum, mut kmax) = (0.0f64, 0.0f64);
    for (o, old) in batch.obs.iter().zip(&batch.old_log_probs) {
        let new = policy.log_probs(o);
        let kl: f64 = (0..ACTIONS).map(|a| new[a].exp() * (new[a] - old[a])).sum::<f64>().max(0.0);
        ksum += kl;
        kmax = kmax.max(kl);
    }
    Ok(UpdateStats {
        target,
        kl_mean: ksum / batch.steps() as f64,
        kl_max: kmax,
        grad_norm_mean: gsum / epochs as f64,
        grad_norm_max: gmax,
    })
}

// ---------------------------------------------------------------------------------------------
// Runs.

/// One run's curves, one entry per iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct RunCurves {
    /// The method.
    pub method: ControlMethod,
    /// Epochs per iteration.
    pub epochs: usize,
    /// Seed index.
    pub seed: usize,
    /// Mean return of the iteration's episodes (before its update).
    pub returns: Vec<f64>,
    /// Environment steps taken up to and including the iteration's rollouts.
    pub env_steps: Vec<u64>,
    /// The iteration's update statistics.
    pub updates: Vec<UpdateStats>,
}

/// The run of `method` with `epochs` epochs per iteration for seed index `seed`.
pub fn run(cfg: &ControlConfig, method: ControlMethod, epochs: usize, seed: usize) -> Result<RunCurves> {
    cfg.validate(epochs)?;
    let base = cfg.seed.wrapping_add(seed as u64);
    let mut init_rng = Rng::new(base ^ 0x1A17_0000_0000_0001);
    let mut env_rng = Rng::new(base ^ 0xE4F0_0000_0000_0002);
    let mut act_rng = Rng::new(base ^ 0xAC70_0000_0000_0003);
    let mut policy = Policy::init(cfg.hidden, &mut init_rng);
    let mut adam = Adam::new(policy.params.len(), cfg.lr);
    let mut out = RunCurves {
        method,
        epochs,
        seed,
        returns: Vec::with_capacity(cfg.iterations),
        env_steps: Vec::with_capacity(cfg.iterations),
        updates: Vec::with_capacity(cfg.iterations),
    };
    let mut steps = 0u64;
    for _ in 0..cfg.iterations {
        let batch = rollout(&policy, cfg.starts, cfg.group, &mut env_rng, &mut act_rng);
        steps += batch.steps() as u64;
        out.returns.push(batch.returns.iter().sum::<f64>() / batch.returns.len() as f64);
        out.env_steps.push(steps);
        out.updates.push(update(&mut policy, &mut adam, &batch, method, cfg, epochs)?);
    }
    Ok(out)
}

/// Every (epochs, method, seed) run on `threads` threads, in that order; `done` is called after
/// each run. The results do not depend on `threads`.
pub fn run_all(
    cfg: &ControlConfig,
    methods: &[ControlMethod],
    epochs: &[usize],
    threads: usize,
    done: &(dyn Fn() + Sync),
) -> Result<Vec<RunCurves>> {
    let mut jobs = Vec::new();
    for &e in epochs {
        for &m in methods {
            for s in 0..cfg.seeds {
                jobs.push((m, e, s));
            }
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Result<RunCurves>>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1).min(jobs.len().max(1)) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(m, e, s)) = jobs.get(i) else { break };
                let r = run(cfg, m, e, s);
                let failed = r.is_err();
                *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                done();
                if failed {
                    // Let the other workers stop too.
                    next.store(jobs.len(), std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let mut out = Vec::with_capacity(jobs.len());
    for s in slots {
        if let Some(r) = s.into_inner().unwrap_or_else(|p| p.into_inner()) {
            out.push(r?);
        }
    }
    if out.len() != jobs.len() {
        return Err("a control run failed before finishing".into());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Measures.

/// The first index at which `curve` reaches `threshold` (`>=`), if any.
pub fn first_reaching(curve: &[f64], threshold: f64) -> Option<usize> {
    curve.iter().position(|&r| r >= threshold)
}

/// Whether a run collapsed after solving: `curve` reaches `solved` and later falls below
/// `collapse` (strictly).
pub fn collapsed(curve: &[f64], solved: f64, collapse: f64) -> bool {
    match first_reaching(curve, solved) {
        Some(i) => curve[i + 1..].iter().any(|&r| r < collapse),
        None => false,
    }
}

/// The mean of the last `window` values (all of them if fewer).
pub fn final_return(curve: &[f64], window: usize) -> f64 {
    let w = window.clamp(1, curve.len().max(1));
    let tail = &curve[curve.len().saturating_sub(w)..];
    tail.iter().sum::<f64>() / tail.len().max(1) as f64
}

/// Mean and standard error (sample deviation / sqrt(n); `None` for fewer than two values).
pub fn mean_se(v: &[f64]) -> (f64, Option<f64>) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, None);
    }
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, Some((var / n).sqrt()))
}
