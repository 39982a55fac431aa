//! A small trainer that links `tpo::candle`: a linear softmax policy on a contextual bandit,
//! trained with TPO or a baseline chosen by one argument.
//!
//! ```sh
//! cargo run --release --features candle --example candle_train -- tpo   # or reinforce, ppo, grpo, dg
//! ```
//!
//! Each step samples `K` actions for each of `B` contexts from the current policy (the groups),
//! scores them (1 for the context's correct action, else 0), keeps the rollout log-probs, and
//! runs `EPOCHS` SGD updates through `tpo::candle::policy_loss`; candle's autograd takes the
//! gradient from the op to the policy's weights. It prints the mean reward as it goes and exits
//! with an error if the policy did not learn.

use candle_core::{DType, Device, Tensor, Var, D};
use tpo::candle::{policy_loss, Method};
use tpo::{FitConfig, GroupLayout};

const CONTEXTS: usize = 8;
const ACTIONS: usize = 6;
const FEATURES: usize = 8;
const B: usize = 16;
const K: usize = 8;
const EPOCHS: usize = 4;
const STEPS: usize = 60;
const LR: f64 = 0.5;

/// A small deterministic generator (the example needs no `rand`).
struct Lcg(u64);

impl Lcg {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n - 1)
    }
    /// Samples from the probabilities `p`.
    fn sample(&mut self, p: &[f64]) -> usize {
        let mut u = self.unit();
        for (i, &pi) in p.iter().enumerate() {
            if u < pi {
                return i;
            }
            u -= pi;
        }
        p.len() - 1
    }
}

/// `log pi(a_i | c_i)` for the policy `softmax(W x_c)`, differentiable in `W`.
fn logp(w: &Tensor, x: &Tensor, ctx: &Tensor, act: &Tensor) -> candle_core::Result<Tensor> {
    let logits = x.index_select(ctx, 0)?.matmul(&w.t()?)?; // [N, A]
    let lse = logits.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = logits.broadcast_sub(&lse)?; // [N, A]
    logp.gather(&act.unsqueeze(1)?, 1)?.squeeze(1)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "tpo".into());
    let method = match name.as_str() {
        "tpo" => Method::tpo(1.0),
        "reinforce" => Method::reinforce(),
        "ppo" => Method::ppo_clip(0.2),
        "grpo" => Method::grpo(0.2, 0.04),
        "dg" => Method::dg(1.0),
        other => {
            return Err(format!("unknown method {other}: expected tpo, reinforce, ppo, grpo or dg").into())
        }
    };
    let dev = Device::Cpu;
    let mut rng = Lcg(1);
    // Context features and the correct action of each context.
    let feats: Vec<f64> = (0..CONTEXTS * FEATURES).map(|_| rng.unit() * 2.0 - 1.0).collect();
    let x = Tensor::from_vec(feats, (CONTEXTS, FEATURES), &dev)?;
    let correct: Vec<usize> = (0..CONTEXTS).map(|_| rng.below(ACTIONS)).collect();
    let w = Var::zeros((ACTIONS, FEATURES), DType::F64, &dev)?;
    let layout = GroupLayout::uniform(B, K)?;
    let mut curve = Vec::with_capacity(STEPS);
    for step in 0..STEPS {
        // Rollout: B contexts, K actions each from the current policy.
        let probs = x.matmul(&w.as_tensor().t()?)?.exp()?;
        let probs = probs.broadcast_div(&probs.sum_keepdim(1)?)?.to_vec2::<f64>()?;
        let (mut ctx, mut act, mut reward) = (vec![], vec![], vec![]);
        for _ in 0..B {
            let c = rng.below(CONTEXTS);
            for _ in 0..K {
                let a = rng.sample(&probs[c]);
                ctx.push(c as u32);
                act.push(a as u32);
                reward.push(f64::from(u8::from(a == correct[c])));
            }
        }
        let mean = reward.iter().sum::<f64>() / reward.len() as f64;
        curve.push(mean);
        let ctx = Tensor::new(ctx.as_slice(), &dev)?;
        let act = Tensor::new(act.as_slice(), &dev)?;
        let scores = Tensor::new(reward.as_slice(), &dev)?;
        let logp_old = logp(w.as_tensor(), &x, &ctx, &act)?.detach();
        // PPO takes advantages: here the reward minus the group's mean.
        let signal = match method {
            Method::PpoClip(_) => scores
                .reshape((B, K))?
                .broadcast_sub(&scores.reshape((B, K))?.mean_keepdim(1)?)?
                .flatten_all()?,
            _ => scores.clone(),
        };
        let epochs = if matches!(method, Method::Dg(_) | Method::Reinforce(_)) { 1 } else { EPOCHS };
        for _ in 0..epochs {
            let l = logp(w.as_tensor(), &x, &ctx, &act)?;
            let out = policy_loss(&method, &l, &logp_old, &signal, &layout, &FitConfig::default())?;
            let grads = out.loss.backward()?;
            let g = grads.get(w.as_tensor()).ok_or("no gradient for W")?;
            w.set(&(w.as_tensor() - g.affine(LR, 0.0)?)?)?;
        }
        if step % 10 == 0 || step == STEPS - 1 {
            println!("{name}: step {step:3}  mean reward {mean:.3}");
        }
    }
    // Mean reward over the first and the last ten steps.
    let first = curve[..10].iter().sum::<f64>() / 10.0;
    let last = curve[STEPS - 10..].iter().sum::<f64>() / 10.0;
    println!("{name}: mean reward {first:.3} over the first 10 steps, {last:.3} over the last 10");
    if last <= first {
        return Err(format!("{name} did not learn: mean reward {first:.3} -> {last:.3}").into());
    }
    Ok(())
}
