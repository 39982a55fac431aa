//! The control experiment (`tpo reproduce control`): determinism, each method's update through
//! the op against a hand computation, the summary measures, and the command line.

use std::path::PathBuf;
use std::process::Command;
use tpo::experiments::control::{
    collapsed, final_return, first_reaching, gradient, layout, mean_se, run_all, signal, target_stats, Batch,
    ControlConfig, ControlMethod, Frozen, Policy, ALL_METHODS, METHODS, OBS,
};
use tpo::experiments::rng::Rng;

fn small() -> ControlConfig {
    ControlConfig { seeds: 2, iterations: 3, starts: 2, group: 4, hidden: 16, ..ControlConfig::default() }
}

#[test]
fn short_runs_are_bit_identical_twice_and_on_any_number_of_threads() {
    let cfg = small();
    let runs = |threads| {
        let r = run_all(&cfg, &ALL_METHODS, &[1, 3], threads, &|| {}).unwrap();
        format!("{r:?}") // Debug prints every f64 exactly (shortest round trip)
    };
    let one = runs(1);
    assert_eq!(one, runs(1), "two runs differ");
    assert_eq!(one, runs(2), "2 threads differ from 1");
    assert_eq!(one, runs(3), "3 threads differ from 1");
    // The runs did something: every method changed its policy, so the update KL is positive.
    let r = run_all(&cfg, &ALL_METHODS, &[3], 2, &|| {}).unwrap();
    assert_eq!(r.len(), ALL_METHODS.len() * cfg.seeds);
    for run in &r {
        assert!(run.updates.iter().any(|u| u.kl_mean > 0.0), "{:?} did not move", run.method);
        assert!(run.returns.iter().all(|&x| (1.0..=500.0).contains(&x)));
        // The target statistics exist exactly for the TPO methods.
        assert!(run.updates.iter().all(|u| u.target.is_some() == run.method.is_tpo()), "{:?}", run.method);
    }
    // The default sweep is a subset of every method, keys are unique and round-trip.
    assert!(METHODS.iter().all(|m| ALL_METHODS.contains(m)));
    for m in ALL_METHODS {
        assert_eq!(ControlMethod::from_key(m.key()), Some(m));
    }
    assert_eq!(ControlMethod::from_key("TPO"), None);
    // Same seed, same start states and initial weights for every method: the first batch's
    // returns differ only through the action samples, which are the same too before any update.
    let first: Vec<f64> = r.iter().filter(|x| x.seed == 0).map(|x| x.returns[0]).collect();
    assert!(first.windows(2).all(|w| w[0] == w[1]), "{first:?}");
}

// ---------------------------------------------------------------------------------------------
// The update of each method against a hand computation.

/// `log pi(a | x)` and its gradient with respect to the parameters, in f64, by hand.
fn hand_logp(p: &Policy, x: &[f32; OBS], a: usize) -> (f64, Vec<f64>) {
    let h = p.hidden;
    let w = |i: usize| p.params[i] as f64;
    let (ob1, ow2, ob2) = (h * OBS, h * OBS + h, h * OBS + h + 2 * h);
    let mut pre = vec![0.0; h];
    let mut hid = vec![0.0; h];
    for j in 0..h {
        pre[j] = w(ob1 + j) + (0..OBS).map(|k| w(j * OBS + k) * x[k] as f64).sum::<f64>();
        hid[j] = pre[j].max(0.0);
    }
    let z: Vec<f64> =
        (0..2).map(|c| w(ob2 + c) + (0..h).map(|j| w(ow2 + c * h + j) * hid[j]).sum::<f64>()).collect();
    let m = z[0].max(z[1]);
    let lse = m + ((z[0] - m).exp() + (z[1] - m).exp()).ln();
    let pi: Vec<f64> = z.iter().map(|v| (v - lse).exp()).collect();
    let dz: Vec<f64> = (0..2).map(|c| f64::from(u8::from(c == a)) - pi[c]).collect();
    let mut g = vec![0.0; p.params.len()];
    for c in 0..2 {
        g[ob2 + c] = dz[c];
        for j in 0..h {
            g[ow2 + c * h + j] = dz[c] * hid[j];
        }
    }
    for j in 0..h {
        let dpre = if pre[j] > 0.0 { dz[0] * w(ow2 + j) + dz[1] * w(ow2 + h + j) } else { 0.0 };
        g[ob1 + j] = dpre;
        for k in 0..OBS {
            g[j * OBS + k] = dpre * x[k] as f64;
        }
    }
    (z[a] - lse, g)
}

fn zscore(s: &[f64]) -> Vec<f64> {
    let k = s.len() as f64;
    let mean = s.iter().sum::<f64>() / k;
    let sd = (s.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / k).sqrt();
    s.iter().map(|x| if sd <= 1e-6 { 0.0 } else { (x - mean) / sd }).collect()
}

fn softmax(l: &[f64]) -> Vec<f64> {
    let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `dL/dl` per member and the loss (PPO's `sig` are its advantages), by the textbook formulas (see the module docs of
/// `tpo::experiments::control` for the mapping), for members grouped by `groups` (ranges).
fn hand_dl(
    m: ControlMethod,
    cfg: &ControlConfig,
    l: &[f64],
    lo: &[f64],
    sig: &[f64],
    groups: &[std::ops::Range<usize>],
) -> (f64, Vec<f64>) {
    let nb = groups.len() as f64;
    let mut d = vec![0.0; l.len()];
    let mut loss = 0.0;
    for r in groups {
        let k = r.len() as f64;
        let (l, lo, s) = (&l[r.clone()], &lo[r.clone()], &sig[r.clone()]);
        let mean = s.iter().sum::<f64>() / k;
        let out = &mut d[r.clone()];
        match m {
            ControlMethod::Reinforce => {
                for i in 0..l.len() {
                    loss -= (s[i] - mean) * l[i] / k / nb;
                    out[i] = -(s[i] - mean) / k / nb;
                }
            }
            ControlMethod::Dg => {
                for i in 0..l.len() {
                    let a = s[i] - mean;
                    let gate = sigmoid(a * (-lo[i]) / cfg.dg_eta);
                    loss -= gate * a * l[i] / k / nb;
                    out[i] = -gate * a / k / nb;
                }
            }
            ControlMethod::Tpo
            | ControlMethod::TpoMean
            | ControlMethod::TpoStep
            | ControlMethod::TpoNoAnchor => {
                let u = zscore(s);
                let lq: Vec<f64> = if m == ControlMethod::TpoNoAnchor {
                    u.iter().map(|b| b / cfg.tpo_eta).collect()
                } else {
                    lo.iter().zip(&u).map(|(a, b)| a + b / cfg.tpo_eta).collect()
                };
                let (p, q) = (softmax(l), softmax(&lq));
                for i in 0..l.len() {
                    loss -= q[i] * p[i].ln() / nb;
                    out[i] = (p[i] - q[i]) / nb;
                }
            }
            ControlMethod::Ppo | ControlMethod::Grpo => {
                let a = if m == ControlMethod::Grpo { zscore(s) } else { s.to_vec() };
                for i in 0..l.len() {
                    let r = l[i] - lo[i];
                    let rho = r.exp();
                    let un = rho * a[i];
                    let cl = rho.clamp(1.0 - cfg.clip, 1.0 + cfg.clip) * a[i];
                    let beta = if m == ControlMethod::Grpo { cfg.beta } else { 0.0 };
                    loss += (-un.min(cl) + beta * ((-r).exp() + r - 1.0)) / k / nb;
                    let ds = if un <= cl { -rho * a[i] } else { 0.0 };
                    out[i] = (ds + beta * (1.0 - (-r).exp())) / k / nb;
                }
            }
        }
    }
    (loss, d)
}

/// A hand-made batch: 2 start states × 2 episodes of lengths 3, 1 | 2, 4, random observations
/// and actions, returns = lengths.
fn hand_batch() -> Batch {
    let lengths = vec![3, 1, 2, 4];
    let t: usize = lengths.iter().sum();
    let mut rng = Rng::new(11);
    let obs: Vec<[f32; OBS]> = (0..t).map(|_| std::array::from_fn(|_| (rng.normal() * 0.5) as f32)).collect();
    let actions: Vec<u32> = (0..t).map(|_| u32::from(rng.uniform() < 0.5)).collect();
    Batch {
        old_log_probs: vec![[0.0; 2]; t],
        returns: lengths.iter().map(|&n| n as f64).collect(),
        obs,
        actions,
        lengths,
        group: 2,
    }
}

#[test]
fn every_update_goes_through_the_op_and_equals_a_hand_computation() {
    let cfg = ControlConfig { hidden: 6, clip: 0.2, ..ControlConfig::default() };
    let mut rng = Rng::new(5);
    let policy = Policy::init(cfg.hidden, &mut rng);
    let batch = hand_batch();
    let per: Vec<(f64, Vec<f64>)> =
        batch.obs.iter().zip(&batch.actions).map(|(x, &a)| hand_logp(&policy, x, a as usize)).collect();
    for m in ALL_METHODS {
        // Members: steps (PPO, GRPO, TPO-step) or episodes (sequence log-prob = sum of the
        // steps', or their mean for TPO-mean).
        let mut members: Vec<(f64, Vec<f64>)> = Vec::new();
        let mut groups = Vec::new();
        let mut sig = Vec::new();
        let mut start = 0;
        for (gi, lens) in batch.lengths.chunks(batch.group).enumerate() {
            let g0 = members.len();
            let rets = &batch.returns[gi * batch.group..(gi + 1) * batch.group];
            let mean = rets.iter().sum::<f64>() / rets.len() as f64;
            for (e, &n) in lens.iter().enumerate() {
                let steps = &per[start..start + n];
                start += n;
                if m.per_step() {
                    for s in steps {
                        members.push(s.clone());
                        sig.push(if m == ControlMethod::Ppo { rets[e] - mean } else { rets[e] });
                    }
                } else {
                    let w = if m == ControlMethod::TpoMean { 1.0 / n as f64 } else { 1.0 };
                    let l = steps.iter().map(|s| w * s.0).sum();
                    let mut g = vec![0.0; policy.params.len()];
                    for s in steps {
                        g.iter_mut().zip(&s.1).for_each(|(a, b)| *a += w * b);
                    }
                    members.push((l, g));
                    sig.push(rets[e]);
                }
            }
            groups.push(g0..members.len());
        }
        if m == ControlMethod::Ppo {
            // One group of every step; advantages normalised over the steps (sample deviation).
            groups.clear();
            groups.push(0..members.len());
            let n = sig.len() as f64;
            let mean = sig.iter().sum::<f64>() / n;
            let sd = (sig.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)).sqrt() + 1e-8;
            sig.iter_mut().for_each(|x| *x = (*x - mean) / sd);
        }
        let l: Vec<f64> = members.iter().map(|x| x.0).collect();
        // First epoch (l_old = l), then a later epoch with l_old moved away, so that the PPO and
        // GRPO ratios leave the clip range for some members and DG's gate and TPO's target
        // depend on l_old.
        let shifted: Vec<f32> =
            l.iter().enumerate().map(|(i, &x)| (x + [0.5, -0.3, 0.05, -0.02, 0.3][i % 5]) as f32).collect();
        for frozen in [None, Some(Frozen { logp_old: shifted.clone() })] {
            let lo: Vec<f64> = match &frozen {
                None => {
                    // The op sees the f32 forward's log-probs: take them from it.
                    gradient(&policy, &batch, m, &cfg, None).unwrap().logp.iter().map(|&x| x as f64).collect()
                }
                Some(f) => f.logp_old.iter().map(|&x| x as f64).collect(),
            };
            let got = gradient(&policy, &batch, m, &cfg, frozen.as_ref()).unwrap();
            let (want_loss, dl) = hand_dl(m, &cfg, &l, &lo, &sig, &groups);
            let mut want = vec![0.0; policy.params.len()];
            for (mem, d) in members.iter().zip(&dl) {
                want.iter_mut().zip(&mem.1).for_each(|(w, g)| *w += d * g);
            }
            let scale = want.iter().fold(0.0f64, |a, b| a.max(b.abs())).max(1e-3);
            for (i, (g, w)) in got.grad.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 2e-4 * scale,
                    "{:?} ({}): dL/dtheta[{i}] = {g}, by hand {w}",
                    m,
                    if frozen.is_some() { "later epoch" } else { "first epoch" }
                );
            }
            assert!(
                (got.loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
                "{m:?}: loss {} vs hand {want_loss}",
                got.loss
            );
            assert!(want.iter().any(|&w| w.abs() > 1e-6), "{m:?}: the hand gradient is zero");
        }
    }
}

#[test]
fn target_stats_equal_a_hand_computation() {
    let cfg = ControlConfig { tpo_eta: 0.7, ..ControlConfig::default() };
    let batch = hand_batch(); // groups: episodes of lengths 3, 1 | 2, 4 (returns = lengths)
    let logp_old = [-2.1f32, -0.4, -1.5, -2.9];
    for m in [ControlMethod::Tpo, ControlMethod::TpoNoAnchor] {
        let got = target_stats(m, &cfg, &batch, &logp_old).unwrap().unwrap();
        let mut want = [0.0f64; 5];
        for g in [0..2, 2..4] {
            let lo: Vec<f64> = logp_old[g.clone()].iter().map(|&x| x as f64).collect();
            let u = zscore(&batch.returns[g.clone()]);
            let p = softmax(&lo);
            let lq: Vec<f64> = if m == ControlMethod::Tpo {
                lo.iter().zip(&u).map(|(a, b)| a + b / cfg.tpo_eta).collect()
            } else {
                u.iter().map(|b| b / cfg.tpo_eta).collect()
            };
            let q = softmax(&lq);
            want[0] += (0..2).map(|i| q[i] * (q[i] / p[i]).ln()).sum::<f64>() / 2.0;
            want[1] += p[0].max(p[1]) / 2.0;
            want[2] += q[0].max(q[1]) / 2.0;
            want[3] += (0..2).map(|i| 0.5 * (p[i] - q[i]).abs()).sum::<f64>() / 2.0;
            want[4] += (0..2).map(|i| p[i] * u[i]).sum::<f64>() / 2.0;
        }
        let got = [got.kl_q_pold, got.max_pold, got.max_q, got.tv, got.pold_z];
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{m:?} field {i}: {g} vs hand {w}");
        }
    }
    // The per-step TPO's groups are the start states' steps; the baselines have no target.
    let steps = vec![-0.7f32; batch.steps()];
    let t = target_stats(ControlMethod::TpoStep, &cfg, &batch, &steps).unwrap().unwrap();
    assert_eq!(layout(ControlMethod::TpoStep, &batch).unwrap().num_groups(), 2);
    assert_eq!(signal(ControlMethod::TpoStep, &batch).len(), batch.steps());
    assert!((t.max_pold - (0.25 + 1.0 / 6.0) / 2.0).abs() < 1e-12, "{t:?}");
    assert_eq!(target_stats(ControlMethod::Grpo, &cfg, &batch, &steps).unwrap(), None);
}

#[test]
fn threshold_collapse_and_final_measures() {
    let curve = [20.0, 100.0, 474.9, 475.0, 500.0, 300.0, 199.9, 480.0];
    assert_eq!(first_reaching(&curve, 475.0), Some(3));
    assert_eq!(first_reaching(&curve[..3], 475.0), None);
    // Falls below 200 after first reaching 475 (index 6): collapsed.
    assert!(collapsed(&curve, 475.0, 200.0));
    // Dips to 200 exactly or stays above: not collapsed; below 200 only before solving: not.
    assert!(!collapsed(&[10.0, 475.0, 200.0, 480.0], 475.0, 200.0));
    assert!(!collapsed(&[10.0, 150.0, 475.0, 490.0], 475.0, 200.0));
    assert!(!collapsed(&[10.0, 150.0, 300.0], 475.0, 200.0));
    assert_eq!(final_return(&curve, 2), (199.9 + 480.0) / 2.0);
    assert_eq!(final_return(&curve[..1], 10), 20.0);
    let (m, se) = mean_se(&[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(m, 2.5);
    assert!((se.unwrap() - (5.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-15);
    assert_eq!(mean_se(&[7.0]), (7.0, None));
}

// ---------------------------------------------------------------------------------------------
// The command line.

fn tpo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tpo")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tpo-control-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn cli_errors_are_one_line() {
    let d = tmp("errors");
    let o = d.to_str().unwrap();
    for (args, want, code) in [
        (
            vec!["reproduce", "control", "--seeds", "0", "--out", o],
            "error: invalid value '0' for '--seeds <SEEDS>': must be at least 1 (see 'tpo reproduce --help')",
            2,
        ),
        (
            vec!["reproduce", "control", "--epochs", "0", "--out", o],
            "error: invalid value '0' for '--epochs <EPOCHS>': must be at least 1 (see 'tpo reproduce --help')",
            2,
        ),
        (
            vec!["reproduce", "control", "--steps", "x", "--out", o],
            "error: invalid value 'x' for '--steps <STEPS>': expected a whole number, at least 1 (see 'tpo reproduce --help')",
            2,
        ),
        (vec!["reproduce", "tabular", "--epochs", "4", "--out", o], "error: --epochs applies to `tpo reproduce control` only", 1),
        (vec!["reproduce", "tabular", "--methods", "tpo", "--out", o], "error: --methods applies to `tpo reproduce control` only", 1),
        (vec!["reproduce", "reversal", "--tpo-eta", "2", "--out", o], "error: --tpo-eta applies to `tpo reproduce control` only", 1),
        (
            vec!["reproduce", "control", "--methods", "tpo,TPO", "--out", o],
            "error: --methods: unknown method 'TPO' (expected some of reinforce, ppo, grpo, dg, tpo, tpo_mean, tpo_noanchor, tpo_step)",
            1,
        ),
        (vec!["reproduce", "control", "--methods", "dg,tpo,dg", "--out", o], "error: --methods: 'dg' is given twice", 1),
        (vec!["reproduce", "control", "--tpo-eta", "0", "--out", o], "error: --tpo-eta must be finite and > 0, got 0", 1),
        (vec!["reproduce", "control", "--tpo-eta", "inf", "--out", o], "error: --tpo-eta must be finite and > 0, got inf", 1),
        (
            vec!["reproduce", "control", "--backend", "cuda", "--out", o],
            "error: reproduce control runs on the CPU (candle's CPU backend): drop --backend",
            1,
        ),
    ] {
        let (c, _, stderr) = tpo(&args);
        assert_eq!(c, code, "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end(), want, "{args:?}");
        assert!(!d.exists(), "{args:?} wrote something");
    }
}

#[test]
fn cli_writes_summary_curves_and_figures_and_keeps_existing_files() {
    let d = tmp("run");
    let run = |dir: &PathBuf, threads: &str| {
        let args = [
            "reproduce",
            "control",
            "--seeds",
            "2",
            "--steps",
            "3",
            "--epochs",
            "2",
            "--threads",
            threads,
            "--out",
        ];
        let out = Command::new(env!("CARGO_BIN_EXE_tpo")).args(args).arg(dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let stdout = run(&d, "1");
    assert!(stdout.contains("2 epochs per batch") && stdout.contains("TPO"), "{stdout}");
    let read = |dir: &PathBuf, f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };
    let s = read(&d, "summary.json");
    assert_eq!(s["threshold"], 475.0);
    assert!(s["metric"].is_string());
    let keys: Vec<&str> = METHODS.iter().map(|m| m.key()).collect();
    assert_eq!(keys, ["reinforce", "ppo", "grpo", "dg", "tpo", "tpo_mean"]);
    assert_eq!(s["methods"].as_object().unwrap().len(), keys.len());
    for key in keys {
        let m = &s["methods"][key];
        assert!(m["final"].is_f64() && m["final_se"].is_f64(), "{key}: {m}");
        assert!(m["steps_to_threshold"].is_null() || m["steps_to_threshold"].is_u64(), "{key}: {m}");
        assert_eq!(s["by_epochs"]["2"]["methods"][key], *m);
        // The target against its anchor: TPO methods only.
        let tpo = key.starts_with("tpo");
        assert_eq!(m["target"].is_object(), tpo, "{key}: {m}");
        if tpo {
            for f in ["kl_q_pold", "max_pold", "max_q", "tv_pold_q", "pold_z"] {
                assert!(
                    m["target"][f]["mean"].is_f64() && m["target"][f]["first_batch"].is_f64(),
                    "{key} {f}"
                );
            }
        }
    }
    assert_eq!(s["methods_epochs"], 2);
    let c = read(&d, "control.json");
    assert_eq!(c["runs"].as_array().unwrap().len(), METHODS.len() * 2);
    assert_eq!(c["curves"]["2"]["tpo_mean"]["target_mean"]["max_pold"].as_array().unwrap().len(), 3);
    assert_eq!(c["curves"]["2"]["tpo"]["return_mean"].as_array().unwrap().len(), 3);
    assert_eq!(c["config"]["episodes_per_iteration"], 16);
    for f in [
        "control_returns.png",
        "control_stability.png",
        "control_target.png",
        "control_returns.svg",
        "control_stability.svg",
        "control_target.svg",
    ] {
        assert!(std::fs::metadata(d.join(f)).unwrap().len() > 5_000, "{f}");
    }
    // Another thread count gives the same runs.
    let d2 = tmp("run2");
    run(&d2, "2");
    assert_eq!(c["runs"], read(&d2, "control.json")["runs"]);
    // A second run into the same folder refuses before running.
    let (code, _, stderr) =
        tpo(&["reproduce", "control", "--seeds", "1", "--steps", "1", "--out", d.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("already exists (pass --force to overwrite it)") && stderr.lines().count() == 1,
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&d2);
}

#[test]
fn cli_methods_runs_only_the_methods_given() {
    let d = tmp("methods");
    let (code, stdout, stderr) = tpo(&[
        "reproduce",
        "control",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--methods",
        "tpo_step,grpo",
        "--tpo-eta",
        "0.5",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("TPO-step") && !stdout.contains("REINFORCE"), "{stdout}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap();
    let keys: Vec<&String> = s["methods"].as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(s["methods"]["tpo_step"]["target"].is_object() && s["methods"]["grpo"]["target"].is_null());
    assert_eq!(s["config"]["tpo_eta"], 0.5);
    assert_eq!(s["config"]["methods"], serde_json::json!(["tpo_step", "grpo"]));
    assert!(d.join("control_target.png").exists() && d.join("control_target.svg").exists());
    // Without a TPO method there is no target figure.
    let d2 = tmp("methods2");
    let o2 = d2.to_str().unwrap();
    let (code, _, stderr) = tpo(&[
        "reproduce",
        "control",
        "--seeds",
        "1",
        "--steps",
        "1",
        "--epochs",
        "1",
        "--methods",
        "ppo",
        "--out",
        o2,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(d2.join("control_returns.png").exists() && !d2.join("control_target.png").exists());
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&d2);
}
