//! Finite inputs at the edges of f64's range (found in review): every call returns a finite,
//! right answer or a one-line error, never an infinity or NaN as `Ok`.

use tpo::cpu::{self, tokens, PgConfig};
use tpo::{FitConfig, GroupLayout, Reduction};

fn one_line(e: tpo::TpoError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n') && !s.is_empty(), "{s:?}");
    s
}

/// Equal scores near f64::MAX have advantages exactly 0 under the group-mean baseline, for any
/// K (sum(x / K) rounded past MAX for K = 3 and gave 2e292 for K = 7).
#[test]
fn equal_huge_scores_have_zero_advantage() {
    for k in 1..=16 {
        let layout = GroupLayout::uniform(1, k).unwrap();
        let l: Vec<f64> = (0..k).map(|i| -1.0 - i as f64).collect();
        let s = vec![f64::MAX; k];
        let r = cpu::reinforce(&l, &s, &layout, &PgConfig::default(), &FitConfig::default()).unwrap();
        assert_eq!(r.loss, 0.0, "K = {k}");
        assert!(r.grad.iter().all(|&g| g == 0.0), "K = {k}: {:?}", r.grad);
    }
}

/// Logits more than f64::MAX apart: the far one has p = 0 and adds nothing to the entropy (it
/// was NaN); the sampled token there is refused (its log-prob was -inf as Ok).
#[test]
fn logits_more_than_max_apart() {
    let cfg = tokens::TokenConfig { entropy: true, ..Default::default() };
    let r = tokens::token_logprobs(&[f64::MAX, -f64::MAX], 2, &[0], &cfg).unwrap();
    assert_eq!(r.logp, vec![0.0]);
    assert_eq!(r.entropy.unwrap(), vec![0.0]);
    let e = one_line(tokens::token_logprobs(&[f64::MAX, -f64::MAX], 2, &[1], &cfg).unwrap_err());
    assert!(e.contains("more than f64::MAX below the row's maximum"), "{e}");
}

/// A tiny gradient's norm does not underflow to 0 (d^2 < 1e-324), a huge one's does not
/// overflow, and it equals the returned gradient's norm.
#[test]
fn gradient_norm_at_both_ends() {
    let layout = GroupLayout::uniform(1, 2).unwrap();
    for (l, scale) in [([0.0f64, -391.0], 1e200), ([0.0, -391.0], 1.0), ([0.0, -1.0], 1e300)] {
        let fit = FitConfig { grad_scale: scale, diagnostics: true, ..Default::default() };
        let r = cpu::fit(&l, &[1.0f64, 0.0], &layout, &fit).unwrap();
        let m = r.grad.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        let norm = m * r.grad.iter().map(|x| (x / m).powi(2)).sum::<f64>().sqrt();
        let got = r.stats.unwrap().grad_norm[0];
        assert!(
            norm > 0.0 && (got - norm).abs() <= 1e-14 * norm,
            "l {l:?} scale {scale}: {got:e} vs {norm:e}"
        );
    }
}

/// grad_scale near f64::MAX with a stored target summing to a little over 1: grad_scale * d is
/// past f64's range; refused (it was [inf, -inf] as Ok).
#[test]
fn overflowing_gradient_is_refused() {
    let layout = GroupLayout::uniform(1, 2).unwrap();
    let fit = FitConfig { grad_scale: f64::MAX, reduction: Reduction::Sum, ..Default::default() };
    let e = one_line(cpu::fit(&[0.0f64, -1000.0], &[0.0f64, 1.005], &layout, &fit).unwrap_err());
    assert!(e.starts_with("fit: the gradient at member 0 overflows f64 (grad_scale"), "{e}");
}

/// Log-probs more than f64::MAX apart with mass on the far one: the log-softmax is past f64's
/// range, said as such (it was blamed on a -inf log-prob the user never passed).
#[test]
fn logp_more_than_max_apart() {
    let layout = GroupLayout::uniform(1, 2).unwrap();
    let e = one_line(
        cpu::fit(&[f64::MAX, -f64::MAX], &[0.5f64, 0.5], &layout, &FitConfig::default()).unwrap_err(),
    );
    assert!(e.starts_with("fit: logp[1] overflows f64"), "{e}");
}
