//! `tpo::candle`: candle's gradients through each op equal the f64 reference, in every dtype and
//! under non-trivial upstream gradients; a few SGD steps of small models trained through the ops
//! equal the same steps done by hand; bad input gives the library's one-line error.

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use tpo::candle::{group_loss, loss_from_logits, policy_loss, GroupTarget, LossConfig, Method, TokenBatch};
use tpo::cpu::tokens::{self, PathConfig, SeqReduce, SequenceBatch, TargetSource, TokenConfig};
use tpo::cpu::{self, Baseline, DgConfig, FitOutput, GrpoConfig, PgConfig, PpoConfig};
use tpo::{bf16, f16, FitConfig, GroupLayout, LossForm, Reduction, TargetConfig};

type R<T> = candle_core::Result<T>;

/// Rounds an `f64` to `dt` and back, as candle's `to_dtype` does.
fn round(dt: DType, v: f64) -> f64 {
    match dt {
        DType::F64 => v,
        DType::F32 => f64::from(v as f32),
        DType::BF16 => bf16::from_f64(v).to_f64(),
        DType::F16 => f16::from_f64(v).to_f64(),
        _ => unreachable!(),
    }
}

/// A tensor of `dt` holding `v` rounded to `dt`.
fn tensor(v: &[f64], dt: DType) -> R<Tensor> {
    Tensor::new(v, &Device::Cpu)?.to_dtype(dt)
}

/// The values of a tensor, widened to `f64`.
fn values(t: &Tensor) -> R<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![DType::F64, DType::F32, DType::BF16, DType::F16])
}

/// How the loss reaches the objective that `backward` starts from.
#[derive(Debug, Clone, Copy)]
enum Upstream {
    /// `c * loss`: upstream `c`.
    Scale(f64),
    /// `loss^2`: upstream `2 * loss` (data-dependent).
    Square,
    /// `c * loss + sum(x)`: upstream `c`, plus 1 on every element of the differentiated input.
    PlusSum(f64),
}

fn upstream() -> impl Strategy<Value = Upstream> {
    prop_oneof![
        prop::sample::select(vec![1.0, 2.5, -0.75]).prop_map(Upstream::Scale),
        Just(Upstream::Square),
        prop::sample::select(vec![1.0, -3.0]).prop_map(Upstream::PlusSum),
    ]
}

impl Upstream {
    /// The objective built on `loss`, whose gradient candle computes with respect to `x`.
    fn objective(self, loss: &Tensor, x: &Tensor) -> R<Tensor> {
        match self {
            Upstream::Scale(c) => loss.affine(c, 0.0),
            Upstream::Square => loss.sqr(),
            Upstream::PlusSum(c) => loss.affine(c, 0.0)? + x.sum_all()?,
        }
    }

    /// The upstream gradient `d objective / d loss` at the loss tensor's value `loss_value`.
    fn scale(self, loss_value: f64) -> f64 {
        match self {
            Upstream::Scale(c) | Upstream::PlusSum(c) => c,
            Upstream::Square => 2.0 * loss_value,
        }
    }

    /// The gradient candle must give for `x`, from the reference's gradient `grad` of the loss
    /// (already scaled by [`scale`](Self::scale)), rounded to `dt` as candle stores it.
    fn expected(self, grad: &[f64], dt: DType) -> Vec<f64> {
        match self {
            Upstream::PlusSum(_) => grad.iter().map(|&g| round(dt, round(dt, g) + 1.0)).collect(),
            _ => grad.iter().map(|&g| round(dt, g)).collect(),
        }
    }

    /// Elementwise tolerance: none, except for the sum, whose addition candle does in `dt`
    /// (bf16 and f16 add through f32).
    fn tolerance(self, dt: DType, want: f64) -> f64 {
        match (self, dt) {
            (Upstream::PlusSum(_), DType::BF16) => 2f64.powi(-8) * want.abs(),
            (Upstream::PlusSum(_), DType::F16) => 2f64.powi(-11) * want.abs(),
            _ => 0.0,
        }
    }
}

/// Runs `objective.backward()` and compares the gradient of `x` with `expected`.
fn check_grad(
    up: Upstream,
    loss: &Tensor,
    x: &Var,
    reference_grad: impl Fn(f64) -> Result<Vec<f64>, TestCaseError>,
) -> Result<(), TestCaseError> {
    let dt = x.dtype();
    let loss_value = values(loss).unwrap()[0];
    let obj = up.objective(loss, x.as_tensor()).unwrap();
    let grads = obj.backward().unwrap();
    let got = values(grads.get(x.as_tensor()).expect("the input has a gradient")).unwrap();
    let want = up.expected(&reference_grad(up.scale(loss_value))?, dt);
    prop_assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let tol = up.tolerance(dt, *w);
        prop_assert!(
            (g - w).abs() <= tol,
            "{:?} {:?}: grad[{}] = {} vs reference {} (tol {})",
            dt,
            up,
            i,
            g,
            w,
            tol
        );
    }
    Ok(())
}

/// Sequence log-probs for the group tests: groups of 1..=8 members, some of them excluded
/// (`l_old = -inf`, and then `l = -inf` too for some), never a whole group.
#[derive(Debug, Clone)]
struct Groups {
    sizes: Vec<usize>,
    logp: Vec<f64>,
    logp_old: Vec<f64>,
    scores: Vec<f64>,
}

fn groups() -> impl Strategy<Value = Groups> {
    prop::collection::vec(1..=8usize, 1..=5).prop_flat_map(|sizes| {
        let n: usize = sizes.iter().sum();
        let member =
            (-30.0..5.0f64, -30.0..5.0f64, prop_oneof![Just(0.0), Just(1.0), -10.0..10.0f64], 0..10u8);
        (Just(sizes), prop::collection::vec(member, n)).prop_map(|(sizes, m)| {
            let mut g = Groups { sizes: sizes.clone(), logp: vec![], logp_old: vec![], scores: vec![] };
            let mut first = 0;
            for &k in &sizes {
                for (j, &(l, lo, s, ex)) in m[first..first + k].iter().enumerate() {
                    let excluded = j > 0 && ex < 2;
                    g.logp_old.push(if excluded { f64::NEG_INFINITY } else { lo });
                    g.logp.push(if excluded && ex == 0 { f64::NEG_INFINITY } else { l });
                    g.scores.push(s);
                }
                first += k;
            }
            g
        })
    })
}

fn eta() -> impl Strategy<Value = f64> {
    (-12.0..6.0f64).prop_map(|e| 10f64.powf(e))
}

fn reduction() -> impl Strategy<Value = Reduction> {
    prop_oneof![Just(Reduction::Mean), Just(Reduction::Sum), (0.5..20.0f64).prop_map(Reduction::GlobalMean)]
}

fn form() -> impl Strategy<Value = LossForm> {
    prop_oneof![Just(LossForm::CrossEntropy), Just(LossForm::Kl)]
}

#[derive(Debug, Clone, Copy)]
enum Which {
    OnPolicy,
    Rollout,
    Stored,
}

fn which() -> impl Strategy<Value = Which> {
    prop::sample::select(vec![Which::OnPolicy, Which::Rollout, Which::Stored])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (a) The group loss: the loss and candle's gradient equal `cpu::target_and_fit` / `cpu::fit`
    /// on the values the op sees, for all three target sources.
    #[test]
    fn group_loss_gradient_is_the_reference(
        g in groups(), dt in dtype(), eta in eta(), which in which(), up in upstream(),
        red in reduction(), form in form(),
    ) {
        let layout = GroupLayout::from_sizes(&g.sizes).unwrap();
        // On-policy, the target comes from logp itself, so logp carries the exclusions.
        let logp_vals = if let Which::OnPolicy = which { &g.logp_old } else { &g.logp };
        let x = Var::from_tensor(&tensor(logp_vals, dt).unwrap()).unwrap();
        let old = tensor(&g.logp_old, dt).unwrap();
        let scores = tensor(&g.scores, dt).unwrap();
        // What the op sees, widened exactly.
        let (l, lo, s) = (values(&x).unwrap(), values(&old).unwrap(), values(&scores).unwrap());
        let tc = TargetConfig::with_eta(eta);
        let fc = FitConfig { reduction: red, form, diagnostics: true, ..FitConfig::default() };
        let cfg = LossConfig { target: tc, fit: fc };
        let q_rollout = cpu::target(&lo, &s, &layout, &tc).unwrap();
        // A stored target kept in the dtype, as a trainer may keep it.
        let stored = tensor(&q_rollout, dt).unwrap();
        let q_stored = values(&stored).unwrap();
        let target = match which {
            Which::OnPolicy => GroupTarget::OnPolicy { scores: &scores },
            Which::Rollout => GroupTarget::Rollout { logp_old: &old, scores: &scores },
            Which::Stored => GroupTarget::Stored { target: &stored },
        };
        let reference = |scale: f64| -> Result<(Vec<f64>, FitOutput), TestCaseError> {
            let f = FitConfig { grad_scale: scale, ..fc };
            Ok(match which {
                Which::OnPolicy => { let r = cpu::target_and_fit(&l, None, &s, &layout, &tc, &f).unwrap(); (r.target, r.fit) }
                Which::Rollout => { let r = cpu::target_and_fit(&l, Some(&lo), &s, &layout, &tc, &f).unwrap(); (r.target, r.fit) }
                Which::Stored => (q_stored.clone(), cpu::fit(&l, &q_stored, &layout, &f).unwrap()),
            })
        };
        let out = group_loss(&x, &layout, target, &cfg).unwrap();
        let (q, fit) = reference(1.0)?;
        prop_assert_eq!(out.value, fit.loss);
        prop_assert_eq!(values(&out.loss).unwrap(), vec![round(dt, fit.loss)]);
        prop_assert_eq!(out.loss.dtype(), dt);
        prop_assert_eq!(values(&out.target).unwrap(), q);
        prop_assert_eq!(&out.group_loss, &fit.group_loss);
        prop_assert_eq!(&out.stats, &fit.stats);
        check_grad(up, &out.loss, &x, |scale| Ok(reference(scale)?.1.grad))?;
    }

    /// (b) From logits: candle's gradient to the logits equals `cpu::tokens::tpo_from_logits`'s
    /// `grad_logits`, with masked vocabulary entries, masked tokens, sum and mean reductions and
    /// both token dtypes.
    #[test]
    fn logits_loss_gradient_is_the_reference(
        case in logits_case(), dt in dtype(), eta in eta(), which in which(), up in upstream(),
        red in reduction(), tau in prop_oneof![Just(1.0), 0.3..3.0f64], mean in any::<bool>(),
        entropy in any::<bool>(), i64_tokens in any::<bool>(),
    ) {
        let LogitsCase { vocab, logits, tokens: toks, seq_sizes, mask, group_sizes, logp_old, scores } = case;
        let t = toks.len();
        let seqs = GroupLayout::from_sizes(&seq_sizes).unwrap();
        let groups = GroupLayout::from_sizes(&group_sizes).unwrap();
        let x = Var::from_tensor(&tensor(&logits, dt).unwrap().reshape((t, vocab)).unwrap()).unwrap();
        let z = values(&x).unwrap();
        let tok_t = if i64_tokens {
            Tensor::new(toks.iter().map(|&y| i64::from(y)).collect::<Vec<_>>(), &Device::Cpu).unwrap()
        } else {
            Tensor::new(toks.as_slice(), &Device::Cpu).unwrap()
        };
        let mask_t = Tensor::new(mask.iter().map(|&m| u8::from(m)).collect::<Vec<_>>(), &Device::Cpu).unwrap();
        let batch = TokenBatch { tokens: &tok_t, seqs: &seqs, mask: &mask_t, groups: &groups };
        let cfg = PathConfig {
            tokens: TokenConfig { temperature: tau, entropy, reduce: if mean { SeqReduce::Mean } else { SeqReduce::Sum } },
            target: TargetConfig::with_eta(eta),
            fit: FitConfig { reduction: red, diagnostics: true, ..FitConfig::default() },
        };
        let hb = SequenceBatch { tokens: &toks, seqs: &seqs, mask: &mask, groups: &groups };
        let q_rollout = tokens::rollout_target(&logp_old, &scores, &groups, &cfg.target).unwrap();
        let (old_t, scores_t, q_t) = (
            Tensor::new(logp_old.as_slice(), &Device::Cpu).unwrap(),
            Tensor::new(scores.as_slice(), &Device::Cpu).unwrap(),
            Tensor::new(q_rollout.as_slice(), &Device::Cpu).unwrap(),
        );
        let (target, source) = match which {
            Which::OnPolicy => (GroupTarget::OnPolicy { scores: &scores_t }, TargetSource::OnPolicy { scores: &scores }),
            Which::Rollout => (
                GroupTarget::Rollout { logp_old: &old_t, scores: &scores_t },
                TargetSource::Rollout { logp_old: &logp_old, scores: &scores },
            ),
            Which::Stored => (GroupTarget::Stored { target: &q_t }, TargetSource::Stored { target: &q_rollout }),
        };
        let reference = |scale: f64| {
            let mut c = cfg;
            c.fit.grad_scale = scale;
            tokens::tpo_from_logits(&z, vocab, &hb, source, &c).unwrap()
        };
        let out = loss_from_logits(&x, &batch, target, &cfg).unwrap();
        let r = reference(1.0);
        prop_assert_eq!(out.value, r.fit.loss);
        prop_assert_eq!(values(&out.loss).unwrap(), vec![round(dt, r.fit.loss)]);
        prop_assert_eq!(values(&out.target).unwrap(), r.target);
        prop_assert_eq!(values(&out.seq_logp).unwrap(), r.seq_logp);
        prop_assert_eq!(&out.entropy, &r.tokens.entropy);
        prop_assert_eq!(&out.stats, &r.fit.stats);
        check_grad(up, &out.loss, &x, |scale| Ok(reference(scale).grad_logits))?;
    }

    /// (c) Every method of `policy_loss`: candle's gradient equals the method's reference.
    #[test]
    fn policy_loss_gradient_is_the_reference(
        sizes in prop::collection::vec(1..=8usize, 1..=5), seed in any::<u64>(), dt in dtype(),
        m in method(), up in upstream(), red in reduction(),
    ) {
        let layout = GroupLayout::from_sizes(&sizes).unwrap();
        let n = layout.len();
        // l and l_old within a nat of each other, so that PPO and GRPO clip some terms.
        let mut rng = Lcg(seed);
        let lo_vals: Vec<f64> = (0..n).map(|_| -4.0 * rng.unit()).collect();
        let l_vals: Vec<f64> = lo_vals.iter().map(|&o| o + 1.0 * (rng.unit() - 0.5)).collect();
        let s_vals: Vec<f64> = (0..n).map(|_| if rng.unit() < 0.3 { 1.0 } else { 4.0 * rng.unit() - 2.0 }).collect();
        let x = Var::from_tensor(&tensor(&l_vals, dt).unwrap()).unwrap();
        let old = tensor(&lo_vals, dt).unwrap();
        let sig = tensor(&s_vals, dt).unwrap();
        let (l, lo, s) = (values(&x).unwrap(), values(&old).unwrap(), values(&sig).unwrap());
        let fc = FitConfig { reduction: red, ..FitConfig::default() };
        let reference = |scale: f64| {
            let f = FitConfig { grad_scale: scale, ..fc };
            match m {
                Method::Tpo(tc) => cpu::target_and_fit(&l, Some(&lo), &s, &layout, &tc, &f).unwrap().fit,
                Method::Reinforce(c) => cpu::reinforce(&l, &s, &layout, &c, &f).unwrap(),
                Method::PpoClip(c) => cpu::ppo(&l, &lo, &s, &layout, &c, &f).unwrap(),
                Method::Grpo(c) => cpu::grpo(&l, &lo, &s, &layout, &c, &f).unwrap(),
                Method::Dg(c) => cpu::dg(&l, &lo, &s, &layout, &c, &f).unwrap(),
            }
        };
        let out = policy_loss(&m, &x, &old, &sig, &layout, &fc).unwrap();
        let r = reference(1.0);
        prop_assert_eq!(out.value, r.loss);
        prop_assert_eq!(values(&out.loss).unwrap(), vec![round(dt, r.loss)]);
        prop_assert_eq!(&out.group_loss, &r.group_loss);
        check_grad(up, &out.loss, &x, |scale| Ok(reference(scale).grad))?;
    }
}

fn method() -> impl Strategy<Value = Method> {
    let baseline = prop_oneof![Just(Baseline::GroupMean), (-1.0..1.0f64).prop_map(Baseline::Constant)];
    prop_oneof![
        eta().prop_map(Method::tpo),
        baseline.clone().prop_map(|b| Method::Reinforce(PgConfig { baseline: b })),
        (0.05..0.5f64).prop_map(|e| Method::PpoClip(PpoConfig { clip_eps: e })),
        (0.05..0.5f64, 0.0..0.5f64).prop_map(|(e, b)| Method::Grpo(GrpoConfig {
            clip_eps: e,
            beta: b,
            ..GrpoConfig::default()
        })),
        (eta(), baseline).prop_map(|(eta, b)| Method::Dg(DgConfig { eta, baseline: b })),
    ]
}

/// A small deterministic generator for values that need no shrinking.
struct Lcg(u64);

impl Lcg {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone)]
struct LogitsCase {
    vocab: usize,
    logits: Vec<f64>,
    tokens: Vec<u32>,
    seq_sizes: Vec<usize>,
    mask: Vec<bool>,
    group_sizes: Vec<usize>,
    logp_old: Vec<f64>,
    scores: Vec<f64>,
}

/// 1..=4 groups of 1..=4 sequences of 1..=5 tokens over a vocabulary of 1..=6, some vocabulary
/// entries masked (`-inf`, never the sampled token), some tokens outside the completion, some
/// sequences excluded from the rollout target (`l_old = -inf`, never a whole group).
fn logits_case() -> impl Strategy<Value = LogitsCase> {
    (1..=6usize, prop::collection::vec(1..=4usize, 1..=4), any::<u64>()).prop_map(
        |(vocab, group_sizes, seed)| {
            let mut rng = Lcg(seed);
            let nseq: usize = group_sizes.iter().sum();
            let seq_sizes: Vec<usize> = (0..nseq).map(|_| 1 + (rng.unit() * 5.0) as usize).collect();
            let t: usize = seq_sizes.iter().sum();
            let tokens: Vec<u32> = (0..t).map(|_| (rng.unit() * vocab as f64) as u32).collect();
            let mut logits = Vec::with_capacity(t * vocab);
            for &y in &tokens {
                for v in 0..vocab as u32 {
                    let masked = v != y && rng.unit() < 0.15;
                    logits.push(if masked { f64::NEG_INFINITY } else { 8.0 * rng.unit() - 4.0 });
                }
            }
            let mask: Vec<bool> = (0..t).map(|_| rng.unit() < 0.8).collect();
            let mut logp_old = Vec::with_capacity(nseq);
            for &k in &group_sizes {
                for j in 0..k {
                    let excluded = j > 0 && rng.unit() < 0.2;
                    logp_old.push(if excluded { f64::NEG_INFINITY } else { -10.0 * rng.unit() });
                }
            }
            let scores = (0..nseq)
                .map(|_| if rng.unit() < 0.4 { (rng.unit() < 0.5) as u8 as f64 } else { rng.unit() })
                .collect();
            LogitsCase { vocab, logits, tokens, seq_sizes, mask, group_sizes, logp_old, scores }
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Training: a few SGD steps through the ops equal the same steps done by hand.

/// A linear policy `z_t = W x_t` (`W [V, H]`, candle `Var`) trained for 5 SGD steps through
/// `loss_from_logits` (the first on-policy, the next fitting the stored target, as a multi-epoch
/// trainer does), against the same steps with `W` updated by hand from the reference's
/// `grad_logits` and the chain rule `dL/dW = sum_t dL/dz_t x_t^T`.
#[test]
fn linear_policy_trained_through_loss_from_logits_matches_steps_by_hand() -> R<()> {
    let (vocab, hidden, lr) = (5usize, 3usize, 0.5);
    let seq_sizes = [3usize, 2, 4, 1, 3, 2, 3];
    let group_sizes = [3usize, 4];
    let t: usize = seq_sizes.iter().sum();
    let mut rng = Lcg(7);
    let xs: Vec<f64> = (0..t * hidden).map(|_| 2.0 * rng.unit() - 1.0).collect();
    let toks: Vec<u32> = (0..t).map(|_| (rng.unit() * vocab as f64) as u32).collect();
    let mask: Vec<bool> = (0..t).map(|i| i % 4 != 0).collect();
    let scores = [1.0, 0.0, 0.5, 0.2, 0.9, 0.9, 0.1];
    let w0: Vec<f64> = (0..vocab * hidden).map(|_| rng.unit() - 0.5).collect();
    let seqs = GroupLayout::from_sizes(&seq_sizes).unwrap();
    let groups = GroupLayout::from_sizes(&group_sizes).unwrap();
    let cfg = PathConfig { target: TargetConfig::with_eta(0.5), ..PathConfig::default() };

    // Through candle.
    let dev = Device::Cpu;
    let x = Tensor::from_vec(xs.clone(), (t, hidden), &dev)?;
    let w = Var::from_tensor(&Tensor::from_vec(w0.clone(), (vocab, hidden), &dev)?)?;
    let tok_t = Tensor::new(toks.as_slice(), &dev)?;
    let mask_t = Tensor::new(mask.iter().map(|&m| f32::from(u8::from(m))).collect::<Vec<_>>(), &dev)?;
    let scores_t = Tensor::new(&scores, &dev)?;
    let batch = TokenBatch { tokens: &tok_t, seqs: &seqs, mask: &mask_t, groups: &groups };
    let mut q: Option<Tensor> = None;
    let mut losses = vec![];
    for _ in 0..5 {
        let logits = x.matmul(&w.as_tensor().t()?)?;
        let target = match &q {
            None => GroupTarget::OnPolicy { scores: &scores_t },
            Some(q) => GroupTarget::Stored { target: q },
        };
        let out = loss_from_logits(&logits, &batch, target, &cfg)?;
        let grads = out.loss.backward()?;
        let gw = grads.get(w.as_tensor()).expect("W has a gradient");
        w.set(&(w.as_tensor() - gw.affine(lr, 0.0)?)?)?;
        losses.push(out.value);
        q.get_or_insert(out.target);
    }

    // By hand.
    let hb = SequenceBatch { tokens: &toks, seqs: &seqs, mask: &mask, groups: &groups };
    let mut wh = w0;
    let mut qh: Option<Vec<f64>> = None;
    for (step, loss) in losses.iter().enumerate() {
        let mut z = vec![0.0; t * vocab];
        for i in 0..t {
            for v in 0..vocab {
                z[i * vocab + v] = (0..hidden).map(|k| xs[i * hidden + k] * wh[v * hidden + k]).sum();
            }
        }
        let source = match &qh {
            None => TargetSource::OnPolicy { scores: &scores },
            Some(q) => TargetSource::Stored { target: q },
        };
        let r = tokens::tpo_from_logits(&z, vocab, &hb, source, &cfg).unwrap();
        assert!(
            (r.fit.loss - loss).abs() < 1e-12,
            "step {step}: loss {} by hand vs {loss} through candle",
            r.fit.loss
        );
        for v in 0..vocab {
            for k in 0..hidden {
                let d: f64 = (0..t).map(|i| r.grad_logits[i * vocab + v] * xs[i * hidden + k]).sum();
                wh[v * hidden + k] -= lr * d;
            }
        }
        qh.get_or_insert(r.target);
    }
    let wc = values(w.as_tensor())?;
    for (i, (a, b)) in wc.iter().zip(&wh).enumerate() {
        assert!((a - b).abs() < 1e-12, "W[{i}] after 5 steps: {a} through candle vs {b} by hand");
    }
    // The policy moved.
    assert!(losses[4] < losses[0], "losses {losses:?}");
    Ok(())
}

/// A softmax policy over `A` actions (`theta`, a candle `Var`), a batch of sampled actions in
/// groups, trained for 5 SGD steps through `policy_loss` with each method, against the steps
/// done by hand with the method's reference gradient `G = dL/dl` and
/// `dL/dtheta_v = sum_i G_i (1{v = a_i} - softmax(theta)_v)`.
#[test]
fn softmax_policy_trained_through_policy_loss_matches_steps_by_hand() -> R<()> {
    let actions = [0u32, 2, 2, 1, 3, 0, 1, 1, 2];
    let layout = GroupLayout::from_sizes(&[4, 1, 4]).unwrap();
    let scores = [1.0, 0.0, 0.5, 2.0, 1.0, 0.3, -1.0, 0.0, 0.7];
    let theta0 = [0.1, -0.2, 0.3, 0.0];
    let (na, lr) = (theta0.len(), 0.3);
    let dev = Device::Cpu;
    for m in [
        Method::tpo(0.7),
        Method::reinforce(),
        Method::ppo_clip(0.2),
        Method::grpo(0.2, 0.04),
        Method::dg(1.0),
    ] {
        let logp_of = |th: &[f64]| -> Vec<f64> {
            let lse = cpu::logsumexp(th);
            actions.iter().map(|&a| th[a as usize] - lse).collect()
        };
        let lo = logp_of(&theta0);
        // Through candle.
        let theta = Var::new(&theta0, &dev)?;
        let idx = Tensor::new(&actions, &dev)?;
        let old = Tensor::new(lo.as_slice(), &dev)?;
        let sig = Tensor::new(&scores, &dev)?;
        for _ in 0..5 {
            let lse = theta.exp()?.sum_all()?.log()?;
            let logp = theta.broadcast_sub(&lse)?.index_select(&idx, 0)?;
            let out = policy_loss(&m, &logp, &old, &sig, &layout, &FitConfig::default())?;
            let grads = out.loss.backward()?;
            let g = grads.get(theta.as_tensor()).expect("theta has a gradient");
            theta.set(&(theta.as_tensor() - g.affine(lr, 0.0)?)?)?;
        }
        // By hand.
        let mut th = theta0.to_vec();
        for _ in 0..5 {
            let l = logp_of(&th);
            let f = FitConfig::default();
            let gl = match m {
                Method::Tpo(tc) => {
                    cpu::target_and_fit(&l, Some(&lo), &scores, &layout, &tc, &f).unwrap().fit.grad
                }
                Method::Reinforce(c) => cpu::reinforce(&l, &scores, &layout, &c, &f).unwrap().grad,
                Method::PpoClip(c) => cpu::ppo(&l, &lo, &scores, &layout, &c, &f).unwrap().grad,
                Method::Grpo(c) => cpu::grpo(&l, &lo, &scores, &layout, &c, &f).unwrap().grad,
                Method::Dg(c) => cpu::dg(&l, &lo, &scores, &layout, &c, &f).unwrap().grad,
            };
            let lse = cpu::logsumexp(&th);
            let p: Vec<f64> = th.iter().map(|x| (x - lse).exp()).collect();
            let mut d = vec![0.0; na];
            for (i, &a) in actions.iter().enumerate() {
                for v in 0..na {
                    d[v] += gl[i] * (f64::from(u8::from(v == a as usize)) - p[v]);
                }
            }
            for v in 0..na {
                th[v] -= lr * d[v];
            }
        }
        let tc = values(theta.as_tensor())?;
        for v in 0..na {
            assert!(
                (tc[v] - th[v]).abs() < 1e-12,
                "{m:?}: theta[{v}] {} through candle vs {} by hand",
                tc[v],
                th[v]
            );
        }
        assert!(tc.iter().zip(&theta0).any(|(a, b)| a != b), "{m:?}: the policy did not move");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Errors: the library's one-line message, never a panic.

fn msg<T: std::fmt::Debug>(r: R<T>) -> String {
    r.expect_err("an error").to_string()
}

#[test]
fn bad_input_gives_the_library_message() -> R<()> {
    let dev = Device::Cpu;
    let layout = GroupLayout::uniform(2, 2).unwrap();
    let scores = Tensor::new(&[1.0f32, 0.0, 0.0, 1.0], &dev)?;
    let cfg = LossConfig::default();
    let on = GroupTarget::OnPolicy { scores: &scores };

    let nan = Tensor::new(&[-1.0f32, f32::NAN, -2.0, -3.0], &dev)?;
    let lib = cpu::target(&values(&nan)?, &values(&scores)?, &layout, &TargetConfig::default()).unwrap_err();
    let m = msg(group_loss(&nan, &layout, on, &cfg));
    assert_eq!(m, lib.to_string().replace("logp_old", "logp"));
    assert_eq!(m, "logp[1] is NaN: log-probs must be finite, or -inf to exclude a member");

    let ninf = Tensor::new(&[f32::NEG_INFINITY, f32::NEG_INFINITY, -2.0, -3.0], &dev)?;
    assert_eq!(
        msg(group_loss(&ninf, &layout, on, &cfg)),
        "group 0: every logp value is -inf, so the group's distribution is undefined"
    );

    let short = Tensor::new(&[-1.0f32, -2.0, -3.0], &dev)?;
    assert_eq!(
        msg(group_loss(&short, &layout, on, &cfg)),
        "logp has shape [3], the layout expects a 1-D tensor of 4 elements"
    );
    let ints = Tensor::new(&[1u32, 2, 3, 4], &dev)?;
    assert_eq!(
        msg(group_loss(&ints, &layout, on, &cfg)),
        "logp has dtype u32: expected f32, f64, bf16 or f16"
    );

    let l = Tensor::new(&[-1.0f32, -2.0, -2.0, -3.0], &dev)?;
    let bad_q = Tensor::new(&[0.5f32, 0.2, 0.5, 0.5], &dev)?;
    let m = msg(group_loss(&l, &layout, GroupTarget::Stored { target: &bad_q }, &cfg));
    assert!(m.starts_with("invalid target: group 0 sums to 0.7"), "{m}");
    let scaled = LossConfig { fit: FitConfig { grad_scale: 2.0, ..FitConfig::default() }, ..cfg };
    assert!(msg(group_loss(&l, &layout, on, &scaled))
        .starts_with("grad_scale (tpo::candle takes the upstream gradient"));
    let hot = LossConfig { target: TargetConfig::with_eta(0.0), ..cfg };
    assert_eq!(msg(group_loss(&l, &layout, on, &hot)), "eta must be finite and > 0, got 0");

    // Baselines.
    let inf_old = Tensor::new(&[-1.0f32, f32::NEG_INFINITY, -2.0, -3.0], &dev)?;
    let m = msg(policy_loss(&Method::grpo(0.2, 0.04), &l, &inf_old, &scores, &layout, &FitConfig::default()));
    assert_eq!(m, "logp_old[1] is -inf: the baseline losses need finite log-probs");
    let m = msg(policy_loss(&Method::ppo_clip(1.5), &l, &l, &scores, &layout, &FitConfig::default()));
    assert_eq!(m, "clip_eps must be finite and in (0, 1), got 1.5");
    let nan_adv = Tensor::new(&[0.0f32, 1.0, f32::NAN, 0.0], &dev)?;
    let m = msg(policy_loss(&Method::ppo_clip(0.2), &l, &l, &nan_adv, &layout, &FitConfig::default()));
    assert_eq!(m, "advantages[2] is NaN: advantages must be finite");

    // From logits.
    let seqs = GroupLayout::uniform(4, 2).unwrap();
    let logits = Tensor::zeros((8, 3), DType::F32, &dev)?;
    let mask = Tensor::ones(8, DType::U8, &dev)?;
    let neg = Tensor::new(&[0i64, 1, 2, -1, 0, 1, 2, 0], &dev)?;
    let b = TokenBatch { tokens: &neg, seqs: &seqs, mask: &mask, groups: &layout };
    let p = PathConfig::default();
    assert_eq!(msg(loss_from_logits(&logits, &b, on, &p)), "tokens[3] is -1: token ids must be in 0..V");
    let big = Tensor::new(&[0u32, 1, 2, 3, 0, 1, 2, 0], &dev)?;
    let b = TokenBatch { tokens: &big, ..b };
    assert!(msg(loss_from_logits(&logits, &b, on, &p)).starts_with("token id (must be < vocabulary size)"));
    let flat = Tensor::zeros(24, DType::F32, &dev)?;
    assert_eq!(msg(loss_from_logits(&flat, &b, on, &p)), "logits has shape [24]: expected [T, V]");
    let seven = Tensor::zeros((7, 3), DType::F32, &dev)?;
    assert_eq!(
        msg(loss_from_logits(&seven, &b, on, &p)),
        "the sequence layout covers 8 tokens, the logits have 7 rows"
    );
    Ok(())
}

/// The backward may run more than once (two objectives sharing the loss) and gives the same
/// gradient each time; bf16 logits give the f64 gradient rounded once.
#[test]
fn backward_twice_and_deterministic() -> R<()> {
    let dev = Device::Cpu;
    let layout = GroupLayout::from_sizes(&[3, 1, 2]).unwrap();
    let x = Var::new(&[-1.0f64, -2.0, -0.5, -3.0, -1.5, -1.25], &dev)?;
    let scores = Tensor::new(&[1.0f64, 0.0, 0.5, 1.0, 0.0, 2.0], &dev)?;
    let out = group_loss(&x, &layout, GroupTarget::OnPolicy { scores: &scores }, &LossConfig::default())?;
    let g1 = values(out.loss.backward()?.get(x.as_tensor()).unwrap())?;
    let g2 = values(out.loss.backward()?.get(x.as_tensor()).unwrap())?;
    assert_eq!(g1, g2);
    let again = group_loss(&x, &layout, GroupTarget::OnPolicy { scores: &scores }, &LossConfig::default())?;
    assert_eq!(values(again.loss.backward()?.get(x.as_tensor()).unwrap())?, g1);
    // K = 1 group: p = q = 1, zero gradient.
    assert_eq!(g1[3], 0.0);
    Ok(())
}

/// Strided views reach the ops correctly: log-probs as a column of a matrix, logits as the
/// transpose of a `[V, T]` matrix; the gradient lands on the viewed elements only.
#[test]
fn strided_inputs() -> R<()> {
    let dev = Device::Cpu;
    let layout = GroupLayout::from_sizes(&[2, 3]).unwrap();
    let l = [-1.0f64, -2.0, -0.5, -3.0, -1.5];
    let scores = [1.0f64, 0.0, 0.5, 1.0, 0.0];
    // Column 0 of a [5, 2] matrix holds l; column 1 is something else.
    let mut m = vec![0.0; 10];
    for (i, &x) in l.iter().enumerate() {
        m[2 * i] = x;
        m[2 * i + 1] = 7.0;
    }
    let w = Var::from_tensor(&Tensor::from_vec(m, (5, 2), &dev)?)?;
    let col = w.as_tensor().narrow(1, 0, 1)?.squeeze(1)?;
    assert!(!col.is_contiguous());
    let s = Tensor::new(&scores, &dev)?;
    let out = group_loss(&col, &layout, GroupTarget::OnPolicy { scores: &s }, &LossConfig::default())?;
    let g = values(out.loss.backward()?.get(w.as_tensor()).unwrap())?;
    let r = cpu::target_and_fit(&l, None, &scores, &layout, &TargetConfig::default(), &FitConfig::default())
        .unwrap();
    for i in 0..5 {
        assert_eq!(g[2 * i], r.fit.grad[i]);
        assert_eq!(g[2 * i + 1], 0.0);
    }

    // Logits [T, V] as the transpose of a [V, T] variable.
    let (t, vocab) = (5usize, 3usize);
    let zt: Vec<f64> = (0..t * vocab).map(|i| ((i * 7) % 11) as f64 * 0.3 - 1.0).collect();
    let v = Var::from_tensor(&Tensor::from_vec(zt.clone(), (vocab, t), &dev)?)?;
    let logits = v.as_tensor().t()?;
    assert!(!logits.is_contiguous());
    let toks = [0u32, 2, 1, 1, 0];
    let mask = [true, true, false, true, true];
    let seqs = GroupLayout::from_sizes(&[2, 1, 2]).unwrap();
    let groups = GroupLayout::from_sizes(&[2, 1]).unwrap();
    let sc = [1.0, 0.0, 0.5];
    let (tok_t, mask_t, sc_t) =
        (Tensor::new(&toks, &dev)?, Tensor::new(&[1u8, 1, 0, 1, 1], &dev)?, Tensor::new(&sc, &dev)?);
    let b = TokenBatch { tokens: &tok_t, seqs: &seqs, mask: &mask_t, groups: &groups };
    let out = loss_from_logits(&logits, &b, GroupTarget::OnPolicy { scores: &sc_t }, &PathConfig::default())?;
    let g = values(out.loss.backward()?.get(v.as_tensor()).unwrap())?;
    let z: Vec<f64> = (0..t * vocab).map(|i| zt[(i % vocab) * t + i / vocab]).collect();
    let hb = SequenceBatch { tokens: &toks, seqs: &seqs, mask: &mask, groups: &groups };
    let r = tokens::tpo_from_logits(
        &z,
        vocab,
        &hb,
        TargetSource::OnPolicy { scores: &sc },
        &PathConfig::default(),
    )
    .unwrap();
    for i in 0..t {
        for j in 0..vocab {
            assert_eq!(g[j * t + i], r.grad_logits[i * vocab + j], "dz[{i}, {j}]");
        }
    }
    assert!(r.grad_logits.iter().any(|&x| x != 0.0));
    Ok(())
}
