//! Property tests of the f64 CPU reference against closed forms and against itself.

mod common;

use approx::assert_relative_eq;
use common::*;
use proptest::prelude::*;
use tpo::{bf16, cpu, f16, Anchor, FitConfig, GroupLayout, LossForm, Reduction, TargetConfig};

fn cfg(eta: f64) -> TargetConfig {
    TargetConfig::with_eta(eta)
}

fn sum_cfg() -> FitConfig {
    FitConfig { reduction: Reduction::Sum, ..FitConfig::default() }
}

/// Σ r u − η KL(r ‖ p_old), the objective the target maximises.
fn objective(r: &[f64], u: &[f64], logp_old: &[f64], eta: f64) -> f64 {
    r.iter()
        .zip(u)
        .zip(logp_old)
        .map(|((&ri, &ui), &lo)| if ri > 0.0 { ri * ui - eta * ri * (ri.ln() - lo) } else { 0.0 })
        .sum()
}

fn z(s: &[f64], l_old: &[f64]) -> Vec<f64> {
    let mut u = Vec::new();
    cpu::zscore(s, l_old, 1e-6, &mut u);
    u
}

#[test]
fn closed_form_two_members() {
    // l_old equal, s = [1, 0]: u = [1, -1], q = softmax([1/eta, -1/eta]).
    let layout = GroupLayout::uniform(1, 2).unwrap();
    for eta in [1e-12, 1e-3, 0.05, 0.5, 1.0, 3.0, 1e3, 1e6] {
        let q = cpu::target(&[0.0f64, 0.0], &[1.0f64, 0.0], &layout, &cfg(eta)).unwrap();
        let q0 = 1.0 / (1.0 + (-2.0 / eta).exp());
        assert_relative_eq!(q[0], q0, max_relative = 1e-15);
        // q1 = e^(-2/eta) / (1 + e^(-2/eta)), to full relative precision even when tiny.
        let q1 = (-2.0 / eta).exp() / (1.0 + (-2.0 / eta).exp());
        assert_relative_eq!(q[1], q1, max_relative = 1e-12);
        // Fit with l = [0, ln 3]: p = [1/4, 3/4], L = -q0 ln(1/4) - (1-q0) ln(3/4), grad = p - q.
        let out = cpu::fit(&[0.0f64, 3f64.ln()], &q, &layout, &FitConfig::default()).unwrap();
        let l = -q0 * 0.25f64.ln() - (1.0 - q0) * 0.75f64.ln();
        assert_relative_eq!(out.loss, l, max_relative = 1e-14);
        assert_relative_eq!(out.grad[0], 0.25 - q0, max_relative = 1e-13);
        assert_relative_eq!(out.grad[1], 0.75 - (1.0 - q0), max_relative = 1e-13);
    }
    // Anchor matters: p_old = [0.8, 0.2] scales the reweighting.
    let q = cpu::target(&[0.8f64.ln(), 0.2f64.ln()], &[1.0f64, 0.0], &layout, &cfg(1.0)).unwrap();
    let w0 = 0.8 * 1f64.exp();
    let w1 = 0.2 * (-1f64).exp();
    assert_relative_eq!(q[0], w0 / (w0 + w1), max_relative = 1e-15);
    // No anchor ignores p_old.
    let na = TargetConfig { anchor: Anchor::NoAnchor, ..cfg(1.0) };
    let q = cpu::target(&[0.8f64.ln(), 0.2f64.ln()], &[1.0f64, 0.0], &layout, &na).unwrap();
    assert_relative_eq!(q[0], 1.0 / (1.0 + (-2f64).exp()), max_relative = 1e-15);
}

/// The limit of the target as `eta -> 0`, computed independently of the reference's shifting:
/// `p_old` restricted to the members of the largest score (`u = u_max`), renormalised; `p_old`
/// itself for a zero-variance group (`u = 0`, so `q = p_old` at every `eta`).
fn eta_to_zero_limit(lo: &[f64], s: &[f64], no_anchor: bool) -> Vec<f64> {
    let u = z(s, lo);
    let inc = |i: usize| lo[i] != f64::NEG_INFINITY;
    let umax = (0..lo.len()).filter(|&i| inc(i)).map(|i| u[i]).fold(f64::NEG_INFINITY, f64::max);
    let top: Vec<bool> = (0..lo.len()).map(|i| inc(i) && u[i] == umax).collect();
    let w: Vec<f64> = (0..lo.len())
        .map(|i| match (top[i], no_anchor) {
            (false, _) => f64::NEG_INFINITY,
            (true, false) => lo[i],
            (true, true) => 0.0,
        })
        .collect();
    softmax(&w)
}

#[test]
fn small_eta_gives_the_limit_not_a_wrong_target() {
    // Issue 11: eta = 1e-14 gave q = [0.8825, 0, 0, 0.1194] (sum 1.0019) and eta <= 1e-16 gave
    // [1, 0, 0, 1] (sum 2): l_old + u / eta lost the anchor's digits, then u / eta swamped it.
    let layout = GroupLayout::uniform(1, 4).unwrap();
    let (lo, s) = ([-1.0f64, -2.0, -3.0, -3.0], [1.0f64, 0.0, 0.0, 1.0]);
    // u = [1, -1, -1, 1]: the limit is p_old on members 0 and 3, e^-1 : e^-3.
    let (q0, q3) = (1.0 / (1.0 + (-2f64).exp()), (-2f64).exp() / (1.0 + (-2f64).exp()));
    let limit = [q0, 0.0, 0.0, q3];
    // The gap u_max - u = 2 makes members 1 and 2 weigh e^(-2 / eta): below 1e-16 from eta ~ 0.05.
    let subnormal = f64::from_bits(1);
    for eta in [1e-2, 1e-6, 1e-10, 1e-14, 1e-16, 1e-20, 1e-100, 1e-300, 1e-310, subnormal] {
        for fused in [false, true] {
            let q = if fused {
                let fc = FitConfig { diagnostics: true, ..FitConfig::default() };
                let out = cpu::target_and_fit(&lo, None, &s, &layout, &cfg(eta), &fc).unwrap();
                // On-policy: the gradient is p_old - q, the loss H(q) + KL(q || p_old).
                let p_old = softmax(&lo);
                let st = out.fit.stats.as_ref().unwrap();
                let kl_old = q0 * (q0 / p_old[0]).ln() + q3 * (q3 / p_old[3]).ln();
                let h = -q0 * q0.ln() - q3 * q3.ln();
                assert_relative_eq!(st.kl_q_pold.as_ref().unwrap()[0], kl_old, max_relative = 1e-14);
                assert_relative_eq!(st.entropy_q[0], h, max_relative = 1e-14);
                assert_relative_eq!(out.fit.loss, h + kl_old, max_relative = 1e-14);
                for i in 0..4 {
                    assert_relative_eq!(
                        out.fit.grad[i],
                        p_old[i] - limit[i],
                        epsilon = 1e-16,
                        max_relative = 1e-14
                    );
                }
                out.target
            } else {
                cpu::target(&lo, &s, &layout, &cfg(eta)).unwrap()
            };
            let c = close(&q, &limit, 1e-16, 1e-15);
            assert!(c.is_ok(), "eta {eta:e}: {c:?}");
            assert!((q.iter().sum::<f64>() - 1.0).abs() <= 4.0 * f64::EPSILON, "eta {eta:e}: q = {q:?}");
        }
    }
    // No anchor: uniform over the best members. Excluded members stay at 0.
    let na = TargetConfig { anchor: Anchor::NoAnchor, ..cfg(1e-300) };
    assert_eq!(cpu::target(&lo, &s, &layout, &na).unwrap(), vec![0.5, 0.0, 0.0, 0.5]);
    let ex = [-1.0, -2.0, -3.0, f64::NEG_INFINITY];
    let q = cpu::target(&ex, &s, &layout, &cfg(1e-40)).unwrap();
    assert_eq!(q, vec![1.0, 0.0, 0.0, 0.0]);
    // A large eta leaves p_old: u / eta = 1e-300 is far below an ulp of log p_old.
    let q = cpu::target(&lo, &s, &layout, &cfg(1e300)).unwrap();
    assert!(close(&q, &softmax(&lo), 0.0, 1e-15).is_ok(), "{q:?}");
    // Huge log-probs of opposite signs do not overflow the shift (l_old_i - L* is 2e308).
    let q =
        cpu::target(&[-1e308f64, 1e308], &[1.0f64, 0.0], &GroupLayout::uniform(1, 2).unwrap(), &cfg(1e-300))
            .unwrap();
    assert_eq!(q, vec![0.0, 1.0]);
    let q =
        cpu::target(&[-1e308f64, 1e308], &[1.0f64, 0.0], &GroupLayout::uniform(1, 2).unwrap(), &cfg(1e-310))
            .unwrap();
    assert_eq!(q, vec![1.0, 0.0]);
}

#[test]
fn zscore_uses_population_deviation() {
    // s = [0, 0, 0, 1]: mean 1/4, population std sqrt(3)/4.
    let u = z(&[0.0, 0.0, 0.0, 1.0], &[0.0; 4]);
    let sd = 3f64.sqrt() / 4.0;
    assert_relative_eq!(u[3], 0.75 / sd, max_relative = 1e-15);
    assert_relative_eq!(u[0], -0.25 / sd, max_relative = 1e-15);
    // Deviation at or below the threshold counts as zero.
    assert_eq!(z(&[1.0, 1.0 + 1e-7], &[0.0; 2]), vec![0.0, 0.0]);
    // Scores near the f64 range do not overflow.
    let u = z(&[1e308, -1e308], &[0.0; 2]);
    assert_eq!(u, vec![1.0, -1.0]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gradient_is_finite_difference_of_loss(b in small_batch(), eta in eta(), form in prop::sample::select(vec![LossForm::CrossEntropy, LossForm::Kl])) {
        let layout = b.layout();
        let q = cpu::target(&b.logp_old, &b.scores, &layout, &cfg(eta)).unwrap();
        let fc = FitConfig { form, grad_scale: 1.7, ..FitConfig::default() };
        let out = cpu::fit(&b.logp, &q, &layout, &fc).unwrap();
        let loss = |l: &[f64]| cpu::fit(l, &q, &layout, &fc).unwrap().loss;
        for (i, fd) in central_differences(&b.logp, 1e-5, loss).into_iter().enumerate() {
            let fd = 1.7 * fd;
            prop_assert!((fd - out.grad[i]).abs() < 1e-7 + 1e-6 * fd.abs(), "member {}: fd {} vs grad {}", i, fd, out.grad[i]);
        }
    }

    #[test]
    fn gradient_sums_to_zero_per_group(b in small_batch(), eta in eta()) {
        let layout = b.layout();
        let out = cpu::target_and_fit(&b.logp, Some(&b.logp_old), &b.scores, &layout, &cfg(eta), &sum_cfg()).unwrap();
        for r in layout.ranges() {
            let s: f64 = out.fit.grad[r.clone()].iter().sum();
            let m: f64 = out.fit.grad[r].iter().map(|g| g.abs()).sum();
            prop_assert!(s.abs() <= 1e-14 * (1.0 + m), "group gradient sums to {}", s);
        }
    }

    #[test]
    fn shift_invariance_of_logp_and_logp_old(b in small_batch(), eta in eta(), shifts in prop::collection::vec(-1000.0..1000.0f64, 6)) {
        let layout = b.layout();
        let mut lo2 = b.logp_old.clone();
        let mut l2 = b.logp.clone();
        for (g, r) in layout.ranges().enumerate() {
            for i in r { lo2[i] += shifts[g]; l2[i] -= 0.5 * shifts[g]; }
        }
        let a = cpu::target_and_fit(&b.logp, Some(&b.logp_old), &b.scores, &layout, &cfg(eta), &FitConfig::default()).unwrap();
        let c = cpu::target_and_fit(&l2, Some(&lo2), &b.scores, &layout, &cfg(eta), &FitConfig::default()).unwrap();
        prop_assert!(close(&a.target, &c.target, 1e-12, 1e-9).is_ok(), "{:?}", close(&a.target, &c.target, 1e-12, 1e-9));
        prop_assert!(close(&a.fit.grad, &c.fit.grad, 1e-12, 1e-9).is_ok());
        prop_assert!(close(&a.fit.group_loss, &c.fit.group_loss, 1e-10, 1e-9).is_ok());
    }

    #[test]
    fn target_invariant_under_affine_scores(b in small_batch(), eta in eta(), a in 0.01..100.0f64, off in -100.0..100.0f64) {
        let layout = b.layout();
        let s2: Vec<f64> = b.scores.iter().map(|s| a * s + off).collect();
        let q1 = cpu::target(&b.logp_old, &b.scores, &layout, &cfg(eta)).unwrap();
        let q2 = cpu::target(&b.logp_old, &s2, &layout, &cfg(eta)).unwrap();
        let c = close(&q1, &q2, 1e-12, 1e-8);
        prop_assert!(c.is_ok(), "{:?}", c);
    }

    #[test]
    fn zero_variance_group_keeps_p_old_and_on_policy_gradient_vanishes(b in small_batch(), eta in eta(), val in -5.0..5.0f64) {
        let layout = b.layout();
        let s = vec![val; b.len()];
        let q = cpu::target(&b.logp_old, &s, &layout, &cfg(eta)).unwrap();
        for r in layout.ranges() {
            let p_old = softmax(&b.logp_old[r.clone()]);
            prop_assert!(close(&q[r], &p_old, 1e-15, 1e-12).is_ok());
        }
        let out = cpu::target_and_fit(&b.logp_old, None, &s, &layout, &cfg(eta), &FitConfig::default()).unwrap();
        prop_assert!(out.fit.grad.iter().all(|g| g.abs() < 1e-14), "{:?}", out.fit.grad);
    }

    #[test]
    fn on_policy_gradient_is_p_old_minus_q(b in small_batch(), eta in eta()) {
        let layout = b.layout();
        let out = cpu::target_and_fit(&b.logp_old, None, &b.scores, &layout, &cfg(eta), &sum_cfg()).unwrap();
        for r in layout.ranges() {
            let p_old = softmax(&b.logp_old[r.clone()]);
            let want: Vec<f64> = p_old.iter().zip(&out.target[r.clone()]).map(|(p, q)| p - q).collect();
            prop_assert!(close(&out.fit.grad[r], &want, 1e-13, 1e-10).is_ok());
        }
    }

    #[test]
    fn target_maximises_the_regularised_objective(
        b in batch(1..=3, 2..=10, -8.0, 2.0),
        eta in eta(),
        weights in prop::collection::vec(0.0..1.0f64, 10),
        t in 1e-4..1e-2f64,
    ) {
        let layout = b.layout();
        let q = cpu::target(&b.logp_old, &b.scores, &layout, &cfg(eta)).unwrap();
        for r in layout.ranges() {
            let lo = log_softmax(&b.logp_old[r.clone()]);
            let u = z(&b.scores[r.clone()], &lo);
            let qg = &q[r.clone()];
            let best = objective(qg, &u, &lo, eta);
            // The objective sums terms of size up to ~eta |r log(r / p_old)|: its rounding grows with eta.
            let tol = 1e-12 * (1.0 + eta);
            // A random point of the simplex.
            let k = qg.len();
            let tot: f64 = weights[..k].iter().sum::<f64>() + 1e-12;
            let rnd: Vec<f64> = weights[..k].iter().map(|w| (w + 1e-12 / k as f64) / tot).collect();
            prop_assert!(objective(&rnd, &u, &lo, eta) <= best + tol);
            // Small perturbations toward each vertex stay below.
            for j in 0..k {
                let pert: Vec<f64> = (0..k).map(|i| (1.0 - t) * qg[i] + if i == j { t } else { 0.0 }).collect();
                prop_assert!(objective(&pert, &u, &lo, eta) <= best + tol, "vertex {}", j);
            }
        }
    }

    #[test]
    fn loss_bounds_entropy_with_equality_iff_p_is_q(b in batch(1..=6, 1..=12, -10.0, 2.0), eta in eta()) {
        let layout = b.layout();
        let q = cpu::target(&b.logp_old, &b.scores, &layout, &cfg(eta)).unwrap();
        let fc = FitConfig { diagnostics: true, reduction: Reduction::Sum, ..FitConfig::default() };
        let out = cpu::fit(&b.logp, &q, &layout, &fc).unwrap();
        let st = out.stats.unwrap();
        for (g, r) in layout.ranges().enumerate() {
            prop_assert!(out.group_loss[g] >= st.entropy_q[g] - 1e-12);
            // Pinsker: KL(q‖p) ≥ ½‖p − q‖₁², so the bound is strict whenever p ≠ q.
            let p = softmax(&b.logp[r.clone()]);
            let l1: f64 = p.iter().zip(&q[r.clone()]).map(|(a, c)| (a - c).abs()).sum();
            prop_assert!(st.kl_q_p[g] >= 0.5 * l1 * l1 - 1e-12);
            prop_assert!((out.group_loss[g] - st.entropy_q[g] - st.kl_q_p[g]).abs() < 1e-9 * (1.0 + out.group_loss[g]));
        }
        // Equality at p = q: fitting l = log q gives loss = H(q) and a zero gradient.
        let lq: Vec<f64> = q.iter().map(|x| x.ln()).collect();
        let at = cpu::fit(&lq, &q, &layout, &fc).unwrap();
        let st = at.stats.unwrap();
        for g in 0..layout.num_groups() {
            prop_assert!((at.group_loss[g] - st.entropy_q[g]).abs() < 1e-12 * (1.0 + st.entropy_q[g]));
            prop_assert!(st.kl_q_p[g].abs() < 1e-12);
        }
        prop_assert!(at.grad.iter().all(|g| g.abs() < 1e-14));
    }

    #[test]
    fn reweighting_is_ordered_like_the_scores(b in small_batch(), eta in eta()) {
        // log(q_i / p_old_i) = u_i / eta - const is ordered like the scores, and equal for equal
        // scores. At a small eta many q_i underflow: a ratio is only read where q_i is a normal
        // number (a subnormal q has too few digits); where q_j underflowed, its ratio is only known
        // to lie below log(MIN_POSITIVE) - log p_old_j.
        let layout = b.layout();
        let q = cpu::target(&b.logp_old, &b.scores, &layout, &cfg(eta)).unwrap();
        for r in layout.ranges() {
            let lo = log_softmax(&b.logp_old[r.clone()]);
            let ratio: Vec<Option<f64>> =
                q[r.clone()].iter().zip(&lo).map(|(&q, l)| (q >= f64::MIN_POSITIVE).then(|| q.ln() - l)).collect();
            let s = &b.scores[r];
            for i in 0..s.len() {
                for j in 0..s.len() {
                    let bound_j = ratio[j].unwrap_or(f64::MIN_POSITIVE.ln() - lo[j]);
                    if let (true, Some(ri)) = (s[i] <= s[j], ratio[i]) {
                        prop_assert!(ri <= bound_j + 1e-9, "s {} <= {} but log ratio {} > {}", s[i], s[j], ri, bound_j);
                    }
                    if let (true, Some(ri), Some(rj)) = (s[i] == s[j], ratio[i], ratio[j]) {
                        prop_assert!((ri - rj).abs() <= 1e-9, "equal scores, log ratios {} and {}", ri, rj);
                    }
                }
            }
        }
    }

    #[test]
    fn ragged_equals_groups_one_by_one(b in batch(1..=8, 1..=40, -30.0, 5.0), eta in eta()) {
        let layout = b.layout();
        let fc = FitConfig { diagnostics: true, reduction: Reduction::Sum, ..FitConfig::default() };
        let all = cpu::target_and_fit(&b.logp, Some(&b.logp_old), &b.scores, &layout, &cfg(eta), &fc).unwrap();
        let st = all.fit.stats.as_ref().unwrap();
        for (g, r) in layout.ranges().enumerate() {
            let one = GroupLayout::uniform(1, r.len()).unwrap();
            let o = cpu::target_and_fit(&b.logp[r.clone()], Some(&b.logp_old[r.clone()]), &b.scores[r.clone()], &one, &cfg(eta), &fc).unwrap();
            prop_assert_eq!(&o.target[..], &all.target[r.clone()]);
            prop_assert_eq!(&o.fit.grad[..], &all.fit.grad[r.clone()]);
            prop_assert_eq!(o.fit.group_loss[0], all.fit.group_loss[g]);
            let os = o.fit.stats.unwrap();
            prop_assert_eq!(os.kl_q_p[0], st.kl_q_p[g]);
            prop_assert_eq!(os.kl_q_pold.unwrap()[0], st.kl_q_pold.as_ref().unwrap()[g]);
        }
    }

    #[test]
    fn uniform_layout_equals_ragged_of_equal_sizes(groups in 1usize..8, k in 1usize..20, seed in prop::collection::vec(-20.0..0.0f64, 160), s in prop::collection::vec(score(), 160)) {
        let n = groups * k;
        let u = GroupLayout::uniform(groups, k).unwrap();
        let r = GroupLayout::from_sizes(&vec![k; groups]).unwrap();
        let a = cpu::target_and_fit(&seed[..n], None, &s[..n], &u, &cfg(1.0), &FitConfig::default()).unwrap();
        let c = cpu::target_and_fit(&seed[..n], None, &s[..n], &r, &cfg(1.0), &FitConfig::default()).unwrap();
        prop_assert_eq!(a, c);
    }

    #[test]
    fn reductions_agree(b in small_batch(), eta in eta(), n in 1.0..1e4f64, scale in -4.0..4.0f64) {
        let layout = b.layout();
        let groups = layout.num_groups() as f64;
        let q = cpu::target(&b.logp_old, &b.scores, &layout, &cfg(eta)).unwrap();
        let run = |reduction| cpu::fit(&b.logp, &q, &layout, &FitConfig { reduction, grad_scale: scale, ..FitConfig::default() }).unwrap();
        let (mean, sum, glob) = (run(Reduction::Mean), run(Reduction::Sum), run(Reduction::GlobalMean(n)));
        prop_assert!(approx::relative_eq!(sum.loss, mean.loss * groups, epsilon = 1e-12, max_relative = 1e-12));
        prop_assert!(approx::relative_eq!(glob.loss, sum.loss / n, epsilon = 1e-12, max_relative = 1e-12));
        prop_assert_eq!(&mean.group_loss, &sum.group_loss);
        let s_from_mean: Vec<f64> = mean.grad.iter().map(|g| g * groups).collect();
        let g_from_sum: Vec<f64> = sum.grad.iter().map(|g| g / n).collect();
        prop_assert!(close(&sum.grad, &s_from_mean, 1e-14, 1e-12).is_ok());
        prop_assert!(close(&glob.grad, &g_from_sum, 1e-14, 1e-12).is_ok());
        let plain = cpu::fit(&b.logp, &q, &layout, &FitConfig { reduction: Reduction::Sum, ..FitConfig::default() }).unwrap();
        let scaled: Vec<f64> = plain.grad.iter().map(|g| g * scale).collect();
        prop_assert!(close(&sum.grad, &scaled, 1e-14, 1e-12).is_ok());
        prop_assert_eq!(sum.loss, plain.loss);
    }

    #[test]
    fn groups_of_one_have_zero_loss_and_gradient(groups in 1usize..50, l in prop::collection::vec(-3000.0..3000.0f64, 50), s in prop::collection::vec(score(), 50), eta in eta()) {
        let layout = GroupLayout::uniform(groups, 1).unwrap();
        let out = cpu::target_and_fit(&l[..groups], None, &s[..groups], &layout, &cfg(eta), &FitConfig::default()).unwrap();
        prop_assert!(out.target.iter().all(|&q| q == 1.0));
        prop_assert_eq!(out.fit.loss, 0.0);
        prop_assert!(out.fit.grad.iter().all(|&g| g == 0.0));
    }

    #[test]
    fn minus_inf_excludes_members(b in batch(1..=5, 2..=12, -30.0, 5.0), eta in eta(), pick in prop::collection::vec(any::<bool>(), 60), no_anchor in any::<bool>()) {
        let layout = b.layout();
        let tc = TargetConfig { anchor: if no_anchor { Anchor::NoAnchor } else { Anchor::Anchored }, ..cfg(eta) };
        let mut lo = b.logp_old.clone();
        let mut l = b.logp.clone();
        for r in layout.ranges() {
            // Exclude the picked members of each group, keeping its first one.
            for i in r.start + 1..r.end {
                if pick[i % pick.len()] { lo[i] = f64::NEG_INFINITY; l[i] = f64::NEG_INFINITY; }
            }
        }
        let out = cpu::target_and_fit(&l, Some(&lo), &b.scores, &layout, &tc, &FitConfig::default()).unwrap();
        prop_assert!(out.fit.loss.is_finite());
        for r in layout.ranges() {
            let keep: Vec<usize> = r.clone().filter(|&i| lo[i].is_finite()).collect();
            for i in r.clone() {
                if !lo[i].is_finite() {
                    prop_assert_eq!(out.target[i], 0.0);
                    prop_assert_eq!(out.fit.grad[i], 0.0);
                }
            }
            // The group with its excluded members removed gives the same target.
            let sub = GroupLayout::uniform(1, keep.len()).unwrap();
            let lk: Vec<f64> = keep.iter().map(|&i| lo[i]).collect();
            let sk: Vec<f64> = keep.iter().map(|&i| b.scores[i]).collect();
            let qk = cpu::target(&lk, &sk, &sub, &tc).unwrap();
            let qa: Vec<f64> = keep.iter().map(|&i| out.target[i]).collect();
            prop_assert!(close(&qa, &qk, 1e-15, 1e-12).is_ok());
        }
    }

    #[test]
    fn extreme_finite_inputs_give_finite_outputs(
        b in batch(1..=4, 1..=64, -9000.0, 9000.0),
        big in prop::sample::select(vec![1e-300, 1e-30, 1.0, 1e30, 1e300, f64::MAX / 16.0]),
        eta in prop::sample::select(vec![f64::from_bits(1), 1e-300, 1e-40, 1e-14, 1e-3, 1.0, 1e3, 1e6, 1e300]),
    ) {
        let layout = b.layout();
        let s: Vec<f64> = b.scores.iter().map(|x| x * big).collect();
        let fc = FitConfig { diagnostics: true, ..FitConfig::default() };
        let out = cpu::target_and_fit(&b.logp, Some(&b.logp_old), &s, &layout, &cfg(eta), &fc).unwrap();
        prop_assert!(out.target.iter().all(|x| x.is_finite() && *x >= 0.0));
        prop_assert!(out.fit.grad.iter().all(|x| x.is_finite()));
        prop_assert!(out.fit.group_loss.iter().all(|x| x.is_finite()));
        prop_assert!(out.fit.loss.is_finite());
        let st = out.fit.stats.unwrap();
        prop_assert!(st.kl_q_p.iter().chain(&st.entropy_q).chain(&st.grad_norm).chain(st.kl_q_pold.as_ref().unwrap()).all(|x| x.is_finite()));
        for r in layout.ranges() {
            let qs: f64 = out.target[r].iter().sum();
            prop_assert!((qs - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn tiny_eta_reaches_the_limit_monotonically(
        b in batch(1..=5, 1..=12, -30.0, 5.0),
        pick in prop::collection::vec(any::<bool>(), 60),
        no_anchor in any::<bool>(),
        exps in prop::collection::vec(-12.0..6.0f64, 4),
    ) {
        // Against the independently computed eta -> 0 limit (p_old on the best-scored members):
        // the mass q puts on those members never decreases as eta decreases, their ratios are
        // those of p_old at every eta, and below every gap of u (the scores are at least ~1e-9
        // apart, so u gaps exceed ~1e-10; any eta <= 1e-20 makes e^(-gap / eta) underflow) q is
        // the limit to rounding, down to subnormal eta, where 1 / eta overflows.
        let layout = b.layout();
        let mut lo = b.logp_old.clone();
        for r in layout.ranges() {
            for i in r.start + 1..r.end {
                if pick[i % pick.len()] { lo[i] = f64::NEG_INFINITY; }
            }
        }
        let tc = |eta: f64| TargetConfig { anchor: if no_anchor { Anchor::NoAnchor } else { Anchor::Anchored }, ..cfg(eta) };
        let mut etas: Vec<f64> = exps.iter().map(|x| 10f64.powf(*x)).collect();
        etas.sort_by(|a, c| c.partial_cmp(a).unwrap());
        etas.extend([1e-20, 1e-100, 1e-300, f64::from_bits(1)]);
        let qs: Vec<Vec<f64>> = etas.iter().map(|&e| cpu::target(&lo, &b.scores, &layout, &tc(e)).unwrap()).collect();
        for r in layout.ranges() {
            let limit = eta_to_zero_limit(&lo[r.clone()], &b.scores[r.clone()], no_anchor);
            let top: Vec<usize> = r.clone().filter(|&i| limit[i - r.start] > 0.0).collect();
            let mut mass_before = 0.0;
            for (k, q) in qs.iter().enumerate() {
                let mass: f64 = top.iter().map(|&i| q[i]).sum();
                prop_assert!(mass >= mass_before - 1e-15, "eta {:e}: mass on the best {} < {} at a larger eta", etas[k], mass, mass_before);
                mass_before = mass;
                // Within the best members q is proportional to p_old (to 1 when no anchor).
                for w in top.windows(2) {
                    let (i, j) = (w[0], w[1]);
                    if q[i] >= f64::MIN_POSITIVE && q[j] >= f64::MIN_POSITIVE {
                        let want = if no_anchor { 0.0 } else { lo[i] - lo[j] };
                        prop_assert!(((q[i] / q[j]).ln() - want).abs() <= 1e-12 * (1.0 + want.abs()));
                    }
                }
                if etas[k] <= 1e-20 {
                    let c = close(&q[r.clone()], &limit, 1e-16, 1e-14);
                    prop_assert!(c.is_ok(), "eta {:e}: {:?}", etas[k], c);
                }
            }
        }
    }

    #[test]
    fn diagnostics_are_consistent(b in small_batch(), eta in eta(), scale in 0.1..3.0f64) {
        let layout = b.layout();
        let fc = FitConfig { diagnostics: true, form: LossForm::Kl, grad_scale: scale, ..FitConfig::default() };
        let on = cpu::target_and_fit(&b.logp_old, None, &b.scores, &layout, &cfg(eta), &fc).unwrap();
        let st = on.fit.stats.as_ref().unwrap();
        // On-policy p = p_old, so both KLs agree; the KL form reports KL(q‖p).
        prop_assert!(close(st.kl_q_pold.as_ref().unwrap(), &st.kl_q_p, 1e-15, 1e-12).is_ok());
        prop_assert_eq!(&on.fit.group_loss, &st.kl_q_p);
        for (g, r) in layout.ranges().enumerate() {
            let n: f64 = on.fit.grad[r].iter().map(|x| x * x).sum::<f64>().sqrt();
            prop_assert!((n - st.grad_norm[g]).abs() <= 1e-15 + 1e-12 * n);
            prop_assert!(st.kl_q_p[g] >= -1e-15 && st.entropy_q[g] >= -1e-15);
        }
    }

    #[test]
    fn large_groups(k in 1000usize..3000, eta in eta(), seed in any::<u64>()) {
        // Token-level / full-action-set groups: one group of thousands of members.
        let mut x = seed;
        let mut next = || { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (x >> 11) as f64 / (1u64 << 53) as f64 };
        let lo: Vec<f64> = (0..k).map(|_| -20.0 * next()).collect();
        let s: Vec<f64> = (0..k).map(|_| if next() < 0.1 { 1.0 } else { 0.0 }).collect();
        let layout = GroupLayout::uniform(1, k).unwrap();
        let out = cpu::target_and_fit(&lo, None, &s, &layout, &cfg(eta), &sum_cfg()).unwrap();
        let qs: f64 = out.target.iter().sum();
        prop_assert!((qs - 1.0).abs() < 1e-12);
        prop_assert!(out.fit.grad.iter().sum::<f64>().abs() < 1e-12);
    }

    #[test]
    fn half_and_single_precision_inputs_are_widened_exactly(b in small_batch(), eta in eta()) {
        let layout = b.layout();
        let lo16: Vec<bf16> = b.logp_old.iter().map(|&x| bf16::from_f64(x)).collect();
        let lo16w: Vec<f64> = lo16.iter().map(|x| x.to_f64()).collect();
        let s16: Vec<f16> = b.scores.iter().map(|&x| f16::from_f64(x)).collect();
        let s16w: Vec<f64> = s16.iter().map(|x| x.to_f64()).collect();
        let a = cpu::target(&lo16, &s16, &layout, &cfg(eta)).unwrap();
        let c = cpu::target(&lo16w, &s16w, &layout, &cfg(eta)).unwrap();
        prop_assert_eq!(&a, &c);
        let l32: Vec<f32> = b.logp.iter().map(|&x| x as f32).collect();
        let l32w: Vec<f64> = l32.iter().map(|&x| f64::from(x)).collect();
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let a32w: Vec<f64> = a32.iter().map(|&x| f64::from(x)).collect();
        prop_assert_eq!(cpu::fit(&l32, &a32, &layout, &FitConfig::default()).unwrap(), cpu::fit(&l32w, &a32w, &layout, &FitConfig::default()).unwrap());
    }
}
