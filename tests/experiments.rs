//! The tabular experiments: determinism, independence from threading, and their updates
//! checked against closed forms.

use tpo::cpu;
use tpo::experiments::tabular::*;
use tpo::GroupLayout;

#[test]
fn runs_are_deterministic_and_thread_independent() {
    let single = SingleConfig { seeds: 3, steps: 20, ..SingleConfig::default() };
    let multi = MultiConfig { seeds: 3, steps: 20, contexts: 7, ..MultiConfig::default() };
    let s = |m, k| single_run(&single, m, k, &CpuBackend);
    let m = |me, k| multi_run(&multi, me, k, &CpuBackend);
    let a = run_all(&SINGLE_METHODS, 3, 1, &s, &|| {}).unwrap();
    let b = run_all(&SINGLE_METHODS, 3, 4, &s, &|| {}).unwrap();
    assert_eq!(a, b);
    let a = run_all(&MULTI_METHODS, 3, 1, &m, &|| {}).unwrap();
    let b = run_all(&MULTI_METHODS, 3, 3, &m, &|| {}).unwrap();
    assert_eq!(a, b);
    // Different seeds differ.
    assert_ne!(
        single_run(&single, Method::Tpo, 0, &CpuBackend).unwrap(),
        single_run(&single, Method::Tpo, 1, &CpuBackend).unwrap()
    );
}

#[test]
fn tpo_backend_gives_q_minus_pi() {
    // One-hot scores over A actions: u = z-score of e_0, q = softmax(log pi + u).
    let z = [0.3, -1.0, 2.0, 0.0];
    let s = [1.0, 0.0, 0.0, 0.0];
    let g = CpuBackend.on_policy_grad(&z, &s, &GroupLayout::uniform(1, 4).unwrap(), 1.0).unwrap();
    let pi: Vec<f64> = {
        let l = cpu::logsumexp(&z);
        z.iter().map(|x| (x - l).exp()).collect()
    };
    let sd = (3.0f64).sqrt() / 4.0;
    let u = [0.75 / sd, -0.25 / sd, -0.25 / sd, -0.25 / sd];
    let w: Vec<f64> = pi.iter().zip(&u).map(|(p, u)| p * u.exp()).collect();
    let tot: f64 = w.iter().sum();
    for i in 0..4 {
        let want = pi[i] - w[i] / tot; // dL/dl = p - q
        assert!((g[i] - want).abs() < 1e-15, "{i}: {} vs {want}", g[i]);
    }
}

#[test]
fn curves_have_the_expected_shape() {
    let single = SingleConfig { seeds: 4, steps: 60, ..SingleConfig::default() };
    let curves =
        run_all(&SINGLE_METHODS, 4, 2, &|m, k| single_run(&single, m, k, &CpuBackend), &|| {}).unwrap();
    for c in &curves {
        assert_eq!(c.error_mean.len(), 60);
        // Zero init: the first error is exactly 1 - 1/A.
        assert!((c.error_mean[0] - 0.99).abs() < 1e-12 && c.error_se.as_ref().unwrap()[0] < 1e-12);
        assert!(c.misalignment_mean.iter().all(|m| (0.0..=2.0).contains(m)));
        // Every method makes progress within 60 steps of size 0.1.
        assert!(c.error_mean[59] < c.error_mean[0], "{:?}", c.method);
    }
    let multi = MultiConfig { seeds: 2, steps: 50, ..MultiConfig::default() };
    let curves = run_all(&MULTI_METHODS, 2, 2, &|m, k| multi_run(&multi, m, k, &CpuBackend), &|| {}).unwrap();
    let ce = curves.iter().find(|c| c.method == Method::Ce).unwrap();
    // CE is the reference direction: its misalignment is zero up to rounding.
    assert!(ce.misalignment_mean.iter().all(|&m| m < 1e-12));
    for c in &curves {
        assert!(c.error_mean.windows(2).all(|w| w[1] <= w[0] + 1e-12), "{:?} error must not rise", c.method);
    }
}

#[test]
fn misalignment_conventions() {
    assert_eq!(misalignment(&[0.0, 0.0], &[1.0, 0.0]), 1.0);
    assert!(misalignment(&[2.0, 0.0], &[1.0, 0.0]).abs() < 1e-16);
    assert!((misalignment(&[0.0, 1.0], &[1.0, 0.0]) - 1.0).abs() < 1e-16);
    assert!((misalignment(&[-1.0, 0.0], &[1.0, 0.0]) - 2.0).abs() < 1e-16);
}

#[test]
fn one_seed_has_no_standard_error() {
    // A standard error of 0 from one seed would be presented as a measured, perfectly certain
    // value; it is absent instead. Two seeds give the sample s.d. / sqrt(2).
    let run = |e: f64| Run { error: vec![e, e / 2.0], misalignment: vec![0.5, 0.25] };
    let one = summarise(Method::Tpo, &[run(0.4)]);
    assert_eq!(one.error_mean, [0.4, 0.2]);
    assert_eq!((one.error_se, one.misalignment_se), (None, None));
    let two = summarise(Method::Tpo, &[run(0.4), run(0.2)]);
    let se = two.error_se.unwrap();
    // Values 0.4 and 0.2: sample s.d. sqrt(0.02), s.e. sqrt(0.02 / 2) = 0.1.
    assert!((se[0] - 0.1).abs() < 1e-15 && (se[1] - 0.05).abs() < 1e-15, "{se:?}");
    assert_eq!(two.misalignment_se, Some(vec![0.0, 0.0]));
    // Through the runner too.
    let single = SingleConfig { seeds: 1, steps: 3, ..SingleConfig::default() };
    let curves =
        run_all(&SINGLE_METHODS, 1, 1, &|m, k| single_run(&single, m, k, &CpuBackend), &|| {}).unwrap();
    assert!(curves.iter().all(|c| c.error_se.is_none() && c.misalignment_se.is_none()));
}
