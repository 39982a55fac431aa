//! The comparison losses (REINFORCE, GRPO, DG): gradients against finite differences and
//! closed forms.

mod common;

use common::*;
use proptest::prelude::*;
use tpo::cpu::{self, Baseline, DgConfig, GrpoConfig, PgConfig};
use tpo::{FitConfig, FitOutput, GroupLayout, Reduction};

/// Checks `out.grad` against central differences of `loss_at(l)`.
fn check_fd(
    l: &[f64],
    out: &FitOutput,
    scale: f64,
    loss_at: impl Fn(&[f64]) -> f64,
) -> Result<(), TestCaseError> {
    for (i, fd) in central_differences(l, 1e-6, loss_at).into_iter().enumerate() {
        let fd = scale * fd;
        prop_assert!(
            (fd - out.grad[i]).abs() < 1e-6 + 1e-5 * fd.abs(),
            "member {}: fd {} vs grad {}",
            i,
            fd,
            out.grad[i]
        );
    }
    Ok(())
}

fn baseline() -> impl Strategy<Value = Baseline> {
    prop_oneof![Just(Baseline::GroupMean), (-1.0..1.0f64).prop_map(Baseline::Constant)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn reinforce_gradient_is_finite_difference(b in small_batch(), base in baseline(), scale in -2.0..2.0f64) {
        let layout = b.layout();
        let cfg = PgConfig { baseline: base };
        let fc = FitConfig { grad_scale: scale, ..FitConfig::default() };
        let out = cpu::reinforce(&b.logp, &b.scores, &layout, &cfg, &fc).unwrap();
        check_fd(&b.logp, &out, scale, |l| cpu::reinforce(l, &b.scores, &layout, &cfg, &fc).unwrap().loss)?;
    }

    #[test]
    fn grpo_gradient_is_finite_difference(b in batch(1..=6, 1..=12, -3.0, 0.0), eps in 0.05..0.5f64, beta in 0.0..0.5f64) {
        // l and l_old within a few nats of each other, so both clipped and unclipped terms occur.
        let layout = b.layout();
        let cfg = GrpoConfig { clip_eps: eps, beta, ..GrpoConfig::default() };
        let fc = FitConfig { reduction: Reduction::Sum, ..FitConfig::default() };
        let out = cpu::grpo(&b.logp, &b.logp_old, &b.scores, &layout, &cfg, &fc).unwrap();
        // Skip members sitting within h of a clip boundary, where the surrogate has a kink.
        let near_kink = b.logp.iter().zip(&b.logp_old).any(|(l, o)| {
            let rho = (l - o).exp();
            (rho - 1.0 - eps).abs() < 1e-4 || (rho - 1.0 + eps).abs() < 1e-4
        });
        prop_assume!(!near_kink);
        check_fd(&b.logp, &out, 1.0, |l| cpu::grpo(l, &b.logp_old, &b.scores, &layout, &cfg, &fc).unwrap().loss)?;
    }

    #[test]
    fn dg_gradient_is_finite_difference(b in small_batch(), eta in 0.1..5.0f64, base in baseline()) {
        let layout = b.layout();
        let cfg = DgConfig { eta, baseline: base };
        let fc = FitConfig::default();
        let out = cpu::dg(&b.logp, &b.logp_old, &b.scores, &layout, &cfg, &fc).unwrap();
        check_fd(&b.logp, &out, 1.0, |l| cpu::dg(l, &b.logp_old, &b.scores, &layout, &cfg, &fc).unwrap().loss)?;
    }

    #[test]
    fn on_policy_grpo_is_reinforce_with_z_scored_advantages(b in small_batch()) {
        // At l = l_old: rho = 1, nothing is clipped, the KL gradient is zero.
        let layout = b.layout();
        let g = cpu::grpo(&b.logp_old, &b.logp_old, &b.scores, &layout, &GrpoConfig::default(), &FitConfig::default()).unwrap();
        let mut z = Vec::new();
        for r in layout.ranges() {
            cpu::zscore(&b.scores[r.clone()], &b.logp_old[r.clone()], 1e-6, &mut z);
            let k = r.len() as f64;
            let want: Vec<f64> = z.iter().map(|a| -a / k / layout.num_groups() as f64).collect();
            prop_assert!(close(&g.grad[r], &want, 1e-15, 1e-12).is_ok());
        }
    }

    #[test]
    fn baseline_gradients_sum_to_zero_with_group_mean(b in small_batch()) {
        // Centred advantages: REINFORCE and on-policy GRPO gradients sum to zero per group.
        let layout = b.layout();
        let pg = cpu::reinforce(&b.logp, &b.scores, &layout, &PgConfig::default(), &FitConfig::default()).unwrap();
        let gr = cpu::grpo(&b.logp_old, &b.logp_old, &b.scores, &layout, &GrpoConfig::default(), &FitConfig::default()).unwrap();
        for r in layout.ranges() {
            prop_assert!(pg.grad[r.clone()].iter().sum::<f64>().abs() < 1e-12);
            prop_assert!(gr.grad[r].iter().sum::<f64>().abs() < 1e-12);
        }
    }

    #[test]
    fn baseline_reductions_agree(b in small_batch(), n in 1.0..100.0f64) {
        let layout = b.layout();
        let groups = layout.num_groups() as f64;
        let run = |reduction| cpu::dg(&b.logp, &b.logp_old, &b.scores, &layout, &DgConfig::default(), &FitConfig { reduction, ..FitConfig::default() }).unwrap();
        let (m, s, g) = (run(Reduction::Mean), run(Reduction::Sum), run(Reduction::GlobalMean(n)));
        prop_assert!((s.loss - m.loss * groups).abs() < 1e-9 * (1.0 + s.loss.abs()));
        prop_assert!((g.loss - s.loss / n).abs() < 1e-9 * (1.0 + s.loss.abs()));
        prop_assert!(close(&s.grad, &m.grad.iter().map(|x| x * groups).collect::<Vec<_>>(), 1e-15, 1e-12).is_ok());
    }
}

#[test]
fn closed_forms() {
    let layout = GroupLayout::uniform(1, 2).unwrap();
    // REINFORCE, b = 0.5: A = [0.5, -0.5], grad = -A/2.
    let pg = cpu::reinforce(
        &[-1.0f64, -2.0],
        &[1.0f64, 0.0],
        &layout,
        &PgConfig { baseline: Baseline::Constant(0.5) },
        &FitConfig::default(),
    )
    .unwrap();
    assert_eq!(pg.grad, vec![-0.25, 0.25]);
    // loss = -(0.5 * (-1) + (-0.5) * (-2)) / 2 = -0.25
    assert!((pg.loss + 0.25).abs() < 1e-15);
    // DG: gate sigmoid(A * (-l_old) / eta).
    let dg = cpu::dg(
        &[-1.0f64, -2.0],
        &[-1.0f64, -2.0],
        &[1.0f64, 0.0],
        &layout,
        &DgConfig { eta: 1.0, baseline: Baseline::Constant(0.5) },
        &FitConfig::default(),
    )
    .unwrap();
    let g0 = 1.0 / (1.0 + (-0.5f64).exp());
    let g1 = 1.0 / (1.0 + (-1.0f64).exp()); // A = -0.5, -l_old = 2: chi = -1
    assert!((dg.grad[0] - (-g0 * 0.5 / 2.0)).abs() < 1e-15);
    let g1 = 1.0 - g1;
    assert!((dg.grad[1] - (g1 * 0.5 / 2.0)).abs() < 1e-15);
    // GRPO: A = [1, -1]; member 0 with rho = 2 > 1.2 and A > 0 is clipped (no surrogate
    // gradient), member 1 with rho = 0.5 < 0.8 and A < 0 is clipped too.
    let cfg = GrpoConfig { beta: 0.0, ..GrpoConfig::default() };
    let g = cpu::grpo(
        &[2f64.ln(), 0.5f64.ln()],
        &[0.0f64, 0.0],
        &[1.0f64, 0.0],
        &layout,
        &cfg,
        &FitConfig::default(),
    )
    .unwrap();
    assert_eq!(g.grad, vec![0.0, 0.0]);
    assert!((g.loss - (-(1.2 * 1.0) + 0.8) / 2.0).abs() < 1e-15);
    // rho = 2 with A < 0 is not clipped: gradient -rho * A / K = 1.
    let g = cpu::grpo(
        &[0.5f64.ln(), 2f64.ln()],
        &[0.0f64, 0.0],
        &[1.0f64, 0.0],
        &layout,
        &cfg,
        &FitConfig::default(),
    )
    .unwrap();
    assert!((g.grad[1] - 1.0).abs() < 1e-15, "{:?}", g.grad);
}

#[test]
fn baseline_errors() {
    let layout = GroupLayout::uniform(1, 2).unwrap();
    let x = [0.0f64, -1.0];
    let e = cpu::grpo(
        &x,
        &x,
        &x,
        &layout,
        &GrpoConfig { clip_eps: 1.5, ..GrpoConfig::default() },
        &FitConfig::default(),
    );
    assert_eq!(e.unwrap_err().to_string(), "clip_eps must be finite and in (0, 1), got 1.5");
    let e =
        cpu::dg(&x, &x, &x, &layout, &DgConfig { eta: 0.0, ..DgConfig::default() }, &FitConfig::default());
    assert_eq!(e.unwrap_err().to_string(), "eta must be finite and > 0, got 0");
    let e = cpu::reinforce(
        &[0.0f64, f64::NEG_INFINITY],
        &x,
        &layout,
        &PgConfig::default(),
        &FitConfig::default(),
    );
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("logp[1] is -inf: the baseline losses need finite log-probs"));
    let e = cpu::reinforce(&x, &[0.0f64], &layout, &PgConfig::default(), &FitConfig::default());
    assert_eq!(e.unwrap_err().to_string(), "scores has 1 elements, layout expects 2");
}

/// Scores near `f64::MAX` whose group mean is representable: the baseline is formed without
/// overflowing the sum, and the loss is the exact closed form.
#[test]
fn group_mean_of_huge_scores() {
    let layout = GroupLayout::uniform(1, 2).unwrap();
    let (l, s) = ([-1.0f64, -2.0], [f64::MAX, f64::MAX / 2.0]);
    let fit = FitConfig::default();
    // b = 0.75 MAX, A = [0.25 MAX, -0.25 MAX]; L = -(1/2)(-0.25 MAX + 0.5 MAX) = -0.125 MAX.
    let r = cpu::reinforce(&l, &s, &layout, &PgConfig::default(), &fit).unwrap();
    let near = |x: f64, want: f64| (x / want - 1.0).abs() < 1e-15;
    assert!(near(r.loss, -0.125 * f64::MAX), "{}", r.loss);
    assert!(near(r.grad[0], -0.125 * f64::MAX) && near(r.grad[1], 0.125 * f64::MAX), "{:?}", r.grad);
    // DG with l_old = 0: every gate is sigmoid(0) = 1/2, half of REINFORCE.
    let d = cpu::dg(&l, &[0.0, 0.0], &s, &layout, &DgConfig::default(), &fit).unwrap();
    assert!(near(d.loss, -0.0625 * f64::MAX), "{}", d.loss);
}

/// A loss past f64's range from finite inputs is refused with one line naming the method and
/// group, never returned as an infinity.
#[test]
fn overflowing_losses_are_refused() {
    let layout = GroupLayout::from_sizes(&[1, 2]).unwrap();
    let fit = FitConfig::default();
    let e = cpu::reinforce(
        &[-1.0f64, -4.0, -1.0],
        &[0.0f64, f64::MAX, -f64::MAX],
        &layout,
        &PgConfig { baseline: Baseline::Constant(0.0) },
        &fit,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("reinforce: group 1 overflows f64 (an advantage, or advantage times log-prob"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    // GRPO: r = logp - logp_old = -1000, so the KL term exp(-r) overflows.
    let e = cpu::grpo(
        &[0.0f64, -1001.0, -1.0],
        &[0.0f64, -1.0, -1.0],
        &[0.0f64, 0.0, 1.0],
        &layout,
        &GrpoConfig::default(),
        &fit,
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("grpo: group 1 overflows f64"), "{e}");
}
