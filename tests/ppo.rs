//! `cpu::ppo`, the PPO-clip reference: gradient against finite differences and the closed form,
//! agreement with GRPO without its KL term, and its errors.

mod common;

use common::*;
use proptest::prelude::*;
use tpo::cpu::{self, GrpoConfig, PpoConfig};
use tpo::{FitConfig, GroupLayout, Reduction};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn ppo_gradient_is_finite_difference(
        b in batch(1..=6, 1..=12, -3.0, 0.0), eps in 0.05..0.5f64, scale in -2.0..2.0f64, red in prop_oneof![Just(Reduction::Mean), Just(Reduction::Sum)],
    ) {
        let layout = b.layout();
        let cfg = PpoConfig { clip_eps: eps };
        let fc = FitConfig { grad_scale: scale, reduction: red, ..FitConfig::default() };
        let adv = &b.scores;
        let out = cpu::ppo(&b.logp, &b.logp_old, adv, &layout, &cfg, &fc).unwrap();
        // Skip members within h of a clip boundary, where the surrogate has a kink.
        let near_kink = b.logp.iter().zip(&b.logp_old).any(|(l, o)| {
            let rho = (l - o).exp();
            (rho - 1.0 - eps).abs() < 1e-4 || (rho - 1.0 + eps).abs() < 1e-4
        });
        prop_assume!(!near_kink);
        let fd = central_differences(&b.logp, 1e-6, |l| cpu::ppo(l, &b.logp_old, adv, &layout, &cfg, &fc).unwrap().loss);
        for (i, fd) in fd.into_iter().enumerate() {
            let fd = scale * fd;
            prop_assert!((fd - out.grad[i]).abs() < 1e-6 + 1e-5 * fd.abs(), "member {}: fd {} vs grad {}", i, fd, out.grad[i]);
        }
    }

    #[test]
    fn ppo_matches_its_closed_form(b in batch(1..=6, 1..=12, -3.0, 0.0), eps in 0.05..0.5f64) {
        // Uniform weights: w = 1/B under the mean, 1/K within the group.
        let layout = b.layout();
        let out = cpu::ppo(&b.logp, &b.logp_old, &b.scores, &layout, &PpoConfig { clip_eps: eps }, &FitConfig::default()).unwrap();
        let nb = layout.num_groups() as f64;
        let mut loss = 0.0;
        for r in layout.ranges() {
            let k = r.len() as f64;
            for i in r {
                let (rho, a) = ((b.logp[i] - b.logp_old[i]).exp(), b.scores[i]);
                let clipped = rho.clamp(1.0 - eps, 1.0 + eps);
                loss -= (rho * a).min(clipped * a) / (k * nb);
                // The gradient vanishes where the clipped term is the smaller one: the ratio has
                // left the trust region in the direction the advantage pushes it.
                let outside = (a > 0.0 && rho > 1.0 + eps) || (a < 0.0 && rho < 1.0 - eps);
                let want = if outside { 0.0 } else { -rho * a / (k * nb) };
                prop_assert!((out.grad[i] - want).abs() <= 1e-14 * (1.0 + want.abs()), "member {}: {} vs {}", i, out.grad[i], want);
            }
        }
        prop_assert!((out.loss - loss).abs() <= 1e-12 * (1.0 + loss.abs()), "{} vs {}", out.loss, loss);
    }

    #[test]
    fn ppo_on_z_scores_is_grpo_without_kl(b in small_batch(), eps in 0.05..0.5f64) {
        let layout = b.layout();
        let (lo, l): (Vec<f64>, Vec<f64>) = b.logp_old.iter().map(|&o| (o, o + 0.3 * (o.sin()))).unzip();
        let mut z = vec![0.0; b.len()];
        let mut u = Vec::new();
        for r in layout.ranges() {
            cpu::zscore(&b.scores[r.clone()], &lo[r.clone()], 1e-6, &mut u);
            z[r].copy_from_slice(&u);
        }
        let fc = FitConfig::default();
        let p = cpu::ppo(&l, &lo, &z, &layout, &PpoConfig { clip_eps: eps }, &fc).unwrap();
        let g = cpu::grpo(&l, &lo, &b.scores, &layout, &GrpoConfig { clip_eps: eps, beta: 0.0, ..GrpoConfig::default() }, &fc).unwrap();
        prop_assert_eq!(p, g);
    }
}

#[test]
fn on_policy_ppo_is_reinforce_with_the_given_advantages() {
    let layout = GroupLayout::uniform(1, 4).unwrap();
    let l = [-1.0, -2.0, -0.5, -3.0];
    let a = [1.0, -0.5, 0.25, 0.0];
    let out = cpu::ppo(&l, &l, &a, &layout, &PpoConfig::default(), &FitConfig::default()).unwrap();
    assert_eq!(out.grad, vec![-0.25, 0.125, -0.0625, -0.0]);
    assert_eq!(out.loss, -(1.0 - 0.5 + 0.25) / 4.0);
}

#[test]
fn ppo_errors_name_the_problem() {
    let layout = GroupLayout::uniform(2, 2).unwrap();
    let l = [-1.0, -2.0, -0.5, -3.0];
    let fc = FitConfig::default();
    let e = |r: tpo::Result<tpo::FitOutput>| r.unwrap_err().to_string();
    for eps in [0.0, 1.0, -0.1, f64::NAN] {
        assert!(e(cpu::ppo(&l, &l, &[0.0; 4], &layout, &PpoConfig { clip_eps: eps }, &fc))
            .starts_with("clip_eps must be finite and in (0, 1)"));
    }
    assert_eq!(
        e(cpu::ppo(&l, &l, &[0.0, 1.0, f64::INFINITY, 0.0], &layout, &PpoConfig::default(), &fc)),
        "advantages[2] is inf: advantages must be finite"
    );
    assert_eq!(
        e(cpu::ppo(&l, &l, &[0.0; 3], &layout, &PpoConfig::default(), &fc)),
        "advantages has 3 elements, layout expects 4"
    );
    assert_eq!(
        e(cpu::ppo(&l, &[-1.0, f64::NEG_INFINITY, 0.0, 0.0], &[0.0; 4], &layout, &PpoConfig::default(), &fc)),
        "logp_old[1] is -inf: the baseline losses need finite log-probs"
    );
}
