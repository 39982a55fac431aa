//! `tpo reproduce reversal`'s pieces: the transformer's candle gradients against finite
//! differences, the cached forward against the full one, Muon's orthogonalisation and first
//! steps against their formulas, determinism (run to run and across thread counts), the reward
//! and error definitions on hand-made cases, and the CLI's one-line errors.

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use std::process::Command;
use tpo::experiments::muon::{newton_schulz, MuonAdam, MuonConfig, ParamKind};
use tpo::experiments::reversal::{
    self, error, target, token_rewards, Method, Model, ModelConfig, ReversalConfig, Reward, Trainer,
};
use tpo::experiments::rng::Rng;

type R<T> = candle_core::Result<T>;

fn tiny() -> ModelConfig {
    ModelConfig { vocab: 3, max_len: 8, d_model: 8, heads: 2, layers: 2, ffn_mult: 2 }
}

fn u32s(v: &[u32], shape: (usize, usize)) -> R<Tensor> {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
}

/// `sum(w * answer_logp)` for fixed prompts, answers and weights: a scalar touching every
/// parameter, both the shared-prompt path (`g = 2`) and the incremental cache.
fn objective(m: &Model, w: &Tensor) -> R<Tensor> {
    let prompts = u32s(&[0, 2, 1, 1, 1, 0, 2, 2], (2, 4))?;
    let answers = u32s(&[1, 0, 2, 2, 0, 0, 1, 1, 2, 1, 0, 1, 1, 1, 2, 0], (4, 4))?;
    (m.answer_logp(&prompts, &answers, 2)? * w)?.sum_all()
}

#[test]
fn transformer_gradients_match_finite_differences() -> R<()> {
    let m = Model::new(tiny(), DType::F64, &mut Rng::new(5))?;
    // Give the zero-initialised biases and unit norm scales generic values, so that every term
    // of the backward is exercised.
    let mut r = Rng::new(9);
    for (v, _) in m.params() {
        let noise: Vec<f64> = (0..v.elem_count()).map(|_| 0.3 * r.normal()).collect();
        let t = (v.as_tensor() + Tensor::from_vec(noise, v.shape(), &Device::Cpu)?)?;
        v.set(&t)?;
    }
    let w: Vec<f64> = (0..4 * 4 * 3).map(|_| r.normal()).collect();
    let w = Tensor::from_vec(w, (4, 4, 3), &Device::Cpu)?;
    let grads = objective(&m, &w)?.backward()?;
    let h = 1e-5;
    let mut checked = 0;
    for (p, (v, _)) in m.params().iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .expect("every parameter has a gradient")
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        // Three entries per parameter (all of the small ones).
        let n = base.len();
        for &i in &[0, n / 2, n - 1] {
            let at = |delta: f64| -> R<f64> {
                let mut x = base.clone();
                x[i] += delta;
                v.set(&Tensor::from_vec(x, v.shape(), &Device::Cpu)?)?;
                objective(&m, &w)?.to_scalar::<f64>()
            };
            let fd = (at(h)? - at(-h)?) / (2.0 * h);
            v.set(&Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu)?)?;
            let tol = 1e-6 * (1.0 + fd.abs());
            assert!(
                (g[i] - fd).abs() < tol,
                "parameter {p} entry {i}: candle {} vs finite difference {fd}",
                g[i]
            );
            checked += 1;
        }
    }
    assert!(checked >= 3 * 30, "{checked} entries checked");
    Ok(())
}

#[test]
fn cached_forward_equals_the_full_forward() -> R<()> {
    let m = Model::new(tiny(), DType::F64, &mut Rng::new(2))?;
    let prompts = [2u32, 0, 1];
    let answers = [1u32, 1, 0];
    let full: Vec<u32> = prompts.iter().chain(&answers).copied().collect();
    let (lp_full, _) = m.forward(&u32s(&full, (1, 6))?, 0, None)?;
    let want = lp_full.narrow(1, 2, 3)?.flatten_all()?.to_vec1::<f64>()?;
    let got = m
        .answer_logp(&u32s(&prompts, (1, 3))?, &u32s(&answers, (1, 3))?, 1)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    // Token by token with the cache, as the rollout runs it.
    let (lp, mut kv) = m.forward(&u32s(&prompts, (1, 3))?, 0, None)?;
    let mut steps = vec![lp.narrow(1, 2, 1)?.flatten_all()?.to_vec1::<f64>()?];
    for (t, &a) in answers[..2].iter().enumerate() {
        let (lp, kv2) = m.forward(&u32s(&[a], (1, 1))?, 3 + t, Some(&kv))?;
        kv = kv2;
        steps.push(lp.flatten_all()?.to_vec1::<f64>()?);
    }
    for (a, b) in steps.concat().iter().zip(&want) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    // Each row is a distribution.
    for row in want.chunks(3) {
        assert!((row.iter().map(|x| x.exp()).sum::<f64>() - 1.0).abs() < 1e-12);
    }
    Ok(())
}

/// `a == b` element by element (so `-0 == +0`; NaN never equal), with the place of the first
/// difference.
fn same_values(what: &str, a: &Tensor, b: &Tensor) -> R<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (x, y) = (
        a.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
    );
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        assert!(p == q, "{what}: entry {i}: {p:e} vs {q:e}");
    }
    Ok(())
}

/// Candle's autograd through [`Model::answer_logp`] and the hand-written backward of
/// [`Model::answer_logp_taped`] on the model `cfg` (parameters perturbed from their initial values,
/// so that no bias is 0 and no scale 1), for `b` prompts of `h` tokens with `g` answers each and
/// the objective `sum(w * lp)` with random `w`: equal log-probs and gradients.
#[allow(clippy::too_many_arguments)] // the case a property test draws
fn compare_backwards(cfg: ModelConfig, dtype: DType, b: usize, h: usize, g: usize, seed: u64) -> R<()> {
    let m = Model::new(cfg, dtype, &mut Rng::new(seed))?;
    let mut r = Rng::new(seed ^ 0xABCD);
    for (v, _) in m.params() {
        let noise: Vec<f64> = (0..v.elem_count()).map(|_| 0.3 * r.normal()).collect();
        let t = (v.as_tensor() + Tensor::from_vec(noise, v.shape(), &Device::Cpu)?.to_dtype(dtype)?)?;
        v.set(&t)?;
    }
    let vocab = cfg.vocab;
    let tok = |n: usize, r: &mut Rng| -> Vec<u32> {
        (0..n).map(|_| (r.next_u64() % vocab as u64) as u32).collect()
    };
    let prompts = u32s(&tok(b * h, &mut r), (b, h))?;
    let answers = u32s(&tok(b * g * h, &mut r), (b * g, h))?;
    let w: Vec<f64> = (0..b * g * h * vocab).map(|_| r.normal()).collect();
    let w = Tensor::from_vec(w, (b * g, h, vocab), &Device::Cpu)?.to_dtype(dtype)?;
    let lp = m.answer_logp(&prompts, &answers, g)?;
    let grads = (&lp * &w)?.sum_all()?.backward()?;
    let (lp2, tape) = m.answer_logp_taped(&prompts, &answers, g)?;
    let case = format!("{cfg:?} {dtype:?} B={b} H={h} G={g} seed {seed}");
    same_values(&format!("{case}: log-probs"), &lp, &lp2)?;
    // The gradient of sum(w * lp) with respect to lp is w.
    let mine = tape.backward(&m, &w)?;
    assert_eq!(mine.len(), m.params().len());
    for (p, ((v, _), g2)) in m.params().iter().zip(&mine).enumerate() {
        let g1 = grads.get(v.as_tensor()).expect("every parameter has a gradient");
        same_values(&format!("{case}: parameter {p}"), g1, g2)?;
    }
    Ok(())
}

#[test]
fn hand_written_backward_equals_candle_autograd() -> R<()> {
    // The shared prompt with several continuations, one continuation, a single position (no
    // continuation pass), in both dtypes.
    for (dtype, seed) in [(DType::F64, 3u64), (DType::F32, 4)] {
        for &(b, h, g) in &[(2usize, 4usize, 2usize), (3, 3, 1), (2, 1, 3), (1, 4, 1)] {
            compare_backwards(tiny(), dtype, b, h, g, seed)?;
        }
    }
    // The paper's model, as the trainer runs it (f32, V = 2, a 7-token prompt, 8 answers each).
    compare_backwards(ModelConfig::paper(2, 14), DType::F32, 5, 7, 8, 1)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The same on random shapes: vocabulary, width, heads, layers, FFN width, prompts, length,
    /// answers per prompt, dtype.
    #[test]
    fn hand_written_backward_equals_candle_autograd_on_random_shapes(
        vocab in 2usize..6,
        dh in 1usize..5,
        heads in 1usize..4,
        layers in 1usize..4,
        ffn_mult in 1usize..4,
        b in 1usize..4,
        h in 1usize..6,
        g in 1usize..4,
        extra_len in 0usize..3,
        f64_ in any::<bool>(),
        seed in any::<u64>(),
    ) {
        // Positions 0..2H - 1 are used; a longer table leaves rows without a gradient.
        let cfg = ModelConfig { vocab, max_len: 2 * h - 1 + extra_len, d_model: heads * dh, heads, layers, ffn_mult };
        let dtype = if f64_ { DType::F64 } else { DType::F32 };
        compare_backwards(cfg, dtype, b, h, g, seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}

#[test]
fn answer_logp_refuses_bad_shapes_with_an_error() -> R<()> {
    let m = Model::new(tiny(), DType::F32, &mut Rng::new(1))?;
    let p = u32s(&[0, 1, 2, 0], (2, 2))?;
    let a = u32s(&[1, 1, 0, 0, 2, 2, 1, 0], (4, 2))?;
    let cases: Vec<(&str, Tensor, Tensor, usize)> = vec![
        ("g >= 1", p.clone(), a.clone(), 0),
        ("want [2, 2]", p.clone(), a.clone(), 1),
        ("at least 1 token", u32s(&[], (2, 0))?, u32s(&[], (4, 0))?, 2),
    ];
    for (want, p, a, g) in cases {
        for e in [m.answer_logp(&p, &a, g).err(), m.answer_logp_taped(&p, &a, g).err()] {
            // (candle appends a backtrace when RUST_BACKTRACE is set; the message is its first line.)
            let e = e.expect("refused").to_string();
            assert!(e.lines().next().is_some_and(|l| l.contains(want)), "{e}");
        }
    }
    let (_, tape) = m.answer_logp_taped(&p, &a, 2)?;
    let e = tape.backward(&m, &Tensor::zeros((4, 3, 3), DType::F32, &Device::Cpu)?).expect_err("refused");
    assert!(e.to_string().contains("want [4, 2, 3]"), "{e}");
    let shallow = Model::new(ModelConfig { layers: 1, ..tiny() }, DType::F32, &mut Rng::new(1))?;
    let e =
        tape.backward(&shallow, &Tensor::zeros((4, 2, 3), DType::F32, &Device::Cpu)?).expect_err("refused");
    assert!(e.to_string().contains("2 layers, not this one of 1"), "{e}");
    Ok(())
}

#[test]
fn training_with_the_hand_written_backward_equals_training_with_autograd() -> Result<(), String> {
    for reward in [Reward::Bag, Reward::Terminal] {
        for &m in Method::for_reward(reward) {
            let cfg = small(reward);
            let (mut t1, mut t2) = (Trainer::new(&cfg, m, 11)?, Trainer::new(&cfg, m, 11)?);
            t1.set_candle_autograd(true);
            for _ in 0..3 {
                let (o1, o2) = (t1.step()?, t2.step()?);
                assert_eq!(o1.loss.to_bits(), o2.loss.to_bits(), "{}: loss", m.name());
                assert_eq!(o1.error.to_bits(), o2.error.to_bits(), "{}: error", m.name());
            }
            assert_eq!(params_of(&t1), params_of(&t2), "{}: parameters differ", m.name());
        }
    }
    Ok(())
}

/// Eigenvalues of a symmetric matrix (cyclic Jacobi).
#[allow(clippy::needless_range_loop)] // the rotation reads two columns at once
fn eigenvalues(mut a: Vec<Vec<f64>>) -> Vec<f64> {
    let n = a.len();
    for _ in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j].powi(2))
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..n).map(|i| a[i][i]).collect()
}

/// The singular values of `o [r, c]`, as the square roots of the eigenvalues of the smaller Gram matrix.
fn singular_values(o: &Tensor) -> R<Vec<f64>> {
    let (r, c) = o.dims2()?;
    let o = o.to_dtype(DType::F64)?;
    let g = if r <= c { o.matmul(&o.t()?)? } else { o.t()?.matmul(&o)? };
    let g = g.to_vec2::<f64>()?;
    Ok(eigenvalues(g).into_iter().map(|e| e.max(0.0).sqrt()).collect())
}

#[test]
fn newton_schulz_gives_near_orthogonal_updates() -> R<()> {
    let mut r = Rng::new(3);
    for &(rows, cols) in &[(64usize, 256usize), (256, 64), (2, 32), (16, 64), (64, 2)] {
        // An input with one direction ten times the others.
        let x: Vec<f64> =
            (0..rows * cols).map(|i| r.normal() * (1.0 + 9.0 * ((i % cols) == 0) as u8 as f64)).collect();
        let x = Tensor::from_vec(x, (rows, cols), &Device::Cpu)?.to_dtype(DType::F32)?;
        let o = newton_schulz(&x, 1e-8)?;
        assert_eq!(o.dims2()?, (rows, cols));
        let sv = singular_values(&o)?;
        let (lo, hi) = sv.iter().fold((f64::INFINITY, 0.0f64), |(l, h), &s| (l.min(s), h.max(s)));
        // Five quintic steps map every singular value of a normalised input that is not tiny
        // into about [0.68, 1.13]; the one far larger direction is no larger than the rest.
        assert!(hi < 1.25, "{rows}x{cols}: largest singular value {hi}");
        let near_one = sv.iter().filter(|&&s| (0.6..1.25).contains(&s)).count();
        assert!(
            near_one * 10 >= sv.len() * 9,
            "{rows}x{cols}: singular values {lo}..{hi}, {near_one} of {} near 1",
            sv.len()
        );
    }
    Ok(())
}

#[test]
fn muon_and_adam_first_steps_follow_their_formulas() -> R<()> {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::zeros((4, 8), DType::F64, &dev)?)?;
    let b = Var::from_tensor(&Tensor::zeros(5, DType::F64, &dev)?)?;
    let lr = 1e-3;
    let mut opt = MuonAdam::new(
        vec![(w.clone(), ParamKind::Muon { rows: 4, cols: 8 }), (b.clone(), ParamKind::Adam)],
        MuonConfig { lr, ..MuonConfig::default() },
    )?;
    let mut r = Rng::new(4);
    let gw: Vec<f64> = (0..32).map(|_| r.normal()).collect();
    let gb = [0.5f64, -2.0, 1e-3, -1e-3, 3.0];
    let gwt = Tensor::from_vec(gw, (4, 8), &dev)?;
    let gbt = Tensor::new(&gb, &dev)?;
    let loss = ((w.as_tensor() * &gwt)?.sum_all()? + (b.as_tensor() * &gbt)?.sum_all()?)?;
    opt.step(&loss.backward()?)?;
    // Adam, Nesterov form, step 1: m^ = g (b1 / (1 + b1) + 1), v^ = g^2, so every entry moves by
    // lr (1 + b1 / (1 + b1)) against the sign of its gradient.
    let db = b.as_tensor().to_vec1::<f64>()?;
    let k = 1.0 + 0.9 / 1.9;
    for (d, g) in db.iter().zip(&gb) {
        let want = -lr * k * g / (g.abs() + 1e-8);
        assert!((d - want).abs() < 1e-12, "Adam step {d} vs {want}");
    }
    // Muon, step 1: the update is -lr sqrt(max(1, 8/4)) NS(m^), m^ a multiple of g: its singular
    // values are sqrt(2) lr times near-1 values, and it points against the gradient.
    let dw = w.as_tensor().clone();
    let sv = singular_values(&(&dw / (lr * 2f64.sqrt()))?)?;
    assert!(sv.iter().all(|&s| (0.6..1.25).contains(&s)), "Muon update singular values {sv:?}");
    let along = (&dw * &gwt)?.sum_all()?.to_scalar::<f64>()?;
    assert!(along < 0.0, "the Muon step must descend: <dW, g> = {along}");
    assert_eq!(opt.count(), 1);
    // A parameter that cannot be the matrix it is declared as is refused.
    let bad = MuonAdam::new(vec![(b, ParamKind::Muon { rows: 2, cols: 2 })], MuonConfig::default());
    assert!(bad.is_err());
    Ok(())
}

#[test]
fn rewards_and_errors_on_hand_made_cases() {
    assert_eq!(target(&[1, 0, 0, 1, 1]), [1, 1, 0, 0, 1]);
    assert_eq!(target(&[3]), [3]);
    let y = target(&[0, 1, 2]); // [2, 1, 0]
                                // Bag of tokens: one reward per position.
    assert_eq!(token_rewards(&[2, 1, 0], &y, Reward::Bag), [1.0, 1.0, 1.0]);
    assert_eq!(token_rewards(&[2, 0, 0], &y, Reward::Bag), [1.0, 0.0, 1.0]);
    assert_eq!(token_rewards(&[0, 1, 2], &y, Reward::Bag), [0.0, 1.0, 0.0]);
    // Terminal: the exact match at every position.
    assert_eq!(token_rewards(&[2, 1, 0], &y, Reward::Terminal), [1.0, 1.0, 1.0]);
    assert_eq!(token_rewards(&[2, 1, 1], &y, Reward::Terminal), [0.0, 0.0, 0.0]);
    // Error = 1 - mean token reward: fraction of wrong tokens (bag) or of inexact rollouts.
    let bag: Vec<f64> = [[2, 1, 0], [2, 0, 0], [0, 1, 2], [1, 1, 1]]
        .iter()
        .flat_map(|a| token_rewards(a, &y, Reward::Bag))
        .collect();
    assert!((error(&bag) - 5.0 / 12.0).abs() < 1e-15); // 3 + 2 + 1 + 1 of 12 right
    let term: Vec<f64> = [[2, 1, 0], [2, 0, 0], [2, 1, 0], [1, 1, 1]]
        .iter()
        .flat_map(|a| token_rewards(a, &y, Reward::Terminal))
        .collect();
    assert!((error(&term) - 0.5).abs() < 1e-15);
}

/// A few prompts of a short task (V = 2, H = 2 for the terminal reward, so that exact matches,
/// and with them nonzero advantages, occur from the start).
fn small(reward: Reward) -> ReversalConfig {
    match reward {
        Reward::Bag => ReversalConfig { batch: 6, k: 3, epochs: 2, ..ReversalConfig::paper(reward, 3, 3, 3) },
        Reward::Terminal => {
            ReversalConfig { batch: 8, k: 3, epochs: 2, ..ReversalConfig::paper(reward, 2, 2, 3) }
        }
    }
}

fn params_of(t: &Trainer) -> Vec<Vec<f32>> {
    t.model()
        .params()
        .iter()
        .map(|(v, _)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn short_runs_are_deterministic_and_every_method_learns_something() -> Result<(), String> {
    for reward in [Reward::Bag, Reward::Terminal] {
        for &m in Method::for_reward(reward) {
            let cfg = small(reward);
            // candle's matrix products on one thread, then on two: the same bits.
            std::env::set_var("RAYON_NUM_THREADS", "1");
            let a = reversal::run(&cfg, m, 7, &|| {})?;
            std::env::set_var("RAYON_NUM_THREADS", "2");
            let b = reversal::run(&cfg, m, 7, &|| {})?;
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            let (mut t1, mut t2) = (Trainer::new(&cfg, m, 7)?, Trainer::new(&cfg, m, 7)?);
            let p0 = params_of(&t1);
            for _ in 0..2 {
                let (o1, o2) = (t1.step()?, t2.step()?);
                assert_eq!(o1.loss.to_bits(), o2.loss.to_bits(), "{}", m.name());
                assert!(o1.error.is_finite() && (0.0..=1.0).contains(&o1.error));
            }
            assert_eq!(params_of(&t1), params_of(&t2), "{}: parameters differ run to run", m.name());
            assert_ne!(params_of(&t1), p0, "{}: the update changed nothing", m.name());
            // Another seed gives other prompts.
            assert_ne!(t1.prompts(0), Trainer::new(&cfg, m, 8)?.prompts(0));
        }
    }
    // Token-level groups with the terminal reward are refused, as in the authors' code.
    let e = Trainer::new(&small(Reward::Terminal), Method::TpoToken, 0).err().expect("refused");
    assert!(e.contains("needs the bag reward"), "{e}");
    Ok(())
}

fn tpo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tpo"))
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tpo-reversal-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn cli_writes_the_same_results_with_one_or_two_threads() {
    let mut curves = Vec::new();
    for threads in ["1", "2"] {
        let out = scratch(&format!("threads{threads}"));
        let o = tpo()
            .args([
                "reproduce",
                "reversal",
                "--reward",
                "terminal",
                "--length",
                "2",
                "--seeds",
                "2",
                "--steps",
                "2",
            ])
            .args(["--threads", threads, "--out"])
            .arg(&out)
            .output()
            .expect("runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["threshold"], 0.01);
        for k in ["tpo", "grpo", "grpo_no_kl", "ppo", "dg"] {
            assert!(summary["methods"][k]["final"].is_f64(), "{k}");
            assert!(summary["methods"][k]["final_se"].is_f64(), "{k}");
        }
        for f in ["reversal.png", "reversal.svg"] {
            assert!(std::fs::metadata(out.join(f)).unwrap().len() > 1000);
        }
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("reversal.json")).unwrap()).unwrap();
        curves.push(doc["methods"].to_string());
        // A second run into the same folder is refused without --force, in one line.
        let again = tpo()
            .args([
                "reproduce",
                "reversal",
                "--reward",
                "terminal",
                "--length",
                "2",
                "--seeds",
                "1",
                "--steps",
                "1",
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&again.stderr);
        assert!(!again.status.success() && err.trim().lines().count() == 1, "{err}");
        let _ = std::fs::remove_dir_all(&out);
    }
    assert_eq!(curves[0], curves[1], "the curves depend on --threads");
}

#[test]
fn cli_errors_are_one_line() {
    let out = scratch("errors");
    let cases: &[(&[&str], &str)] = &[
        (&["reproduce", "reversal", "--vocab", "1"], "at least 2 tokens"),
        (&["reproduce", "reversal", "--length", "600"], "1..=512"),
        (&["reproduce", "reversal", "--length", "0"], "at least 1"),
        (&["reproduce", "reversal", "--reward", "sparse"], "invalid value"),
        (&["reproduce", "reversal", "--seeds", "x"], "whole number"),
        (&["reproduce", "tabular", "--vocab", "4"], "--vocab applies to reversal only"),
        (&["reproduce", "reversal", "--backend", "cuda"], "tabular only"),
    ];
    for (args, want) in cases {
        let o = tpo().args(*args).arg("--out").arg(&out).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // --out naming a file is refused before any work.
    std::fs::write(&out, b"mine").unwrap();
    let o = tpo().args(["reproduce", "reversal", "--steps", "1", "--out"]).arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.trim().lines().count() == 1 && err.contains("not a folder"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"mine");
    let _ = std::fs::remove_file(&out);
}
