//! The CUDA kernels' per-group code (kernels/tpo.cu), compiled for the host with `TPO_HOST` and
//! run one lane per group, against the f64 reference. This checks the kernels' arithmetic
//! (f32, relative to group maxima), their exclusion and zero-variance handling, their stats layout
//! and their error words on every CI run, without a GPU. The parallel reductions (warp shuffles,
//! block trees) are covered by the GPU suite (tests/gpu.rs) on a GPU machine.
//!
//! Needs a C++17 compiler (`CXX`, else `c++`) with `_Float16` (GCC >= 12 or Clang on x86-64).

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::path::PathBuf;
use std::sync::OnceLock;
use tpo::status::decode_status;
use tpo::{bf16, cpu, f16, Anchor, FitConfig, GroupLayout, LossForm, Scalar, TargetConfig};

fn harness() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| compile_harness("harness"))
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Target = 0,
    Fit = 1,
    Fused = 2,
}

struct Out {
    status: u64,
    q: Vec<f64>,
    grad: Vec<f64>,
    group_loss: Vec<f64>,
    stats: Vec<f64>,
}

/// Runs the harness. `t`, `g`: 0 f32, 1 bf16, 2 f16 (values must already be representable).
#[allow(clippy::too_many_arguments)]
fn run(
    mode: Mode,
    t: u8,
    g: u8,
    layout: &GroupLayout,
    logp: &[f64],
    logp_old: Option<&[f64]>,
    scores: &[f64],
    q_in: &[f64],
    tc: &TargetConfig,
    coef: f64,
    kl: bool,
) -> Out {
    let (b, n) = (layout.num_groups(), layout.len());
    let offs: Vec<f64> = layout.offsets().iter().map(|&o| o as f64).collect();
    let mut input = format!(
        "{} {t} {g} {b} {n} {} {} {} {:e} {:e} {:e}\n{}\n",
        mode as u8,
        u8::from(logp_old.is_none()),
        u8::from(tc.anchor == Anchor::Anchored),
        u8::from(kl),
        tc.eta,
        tc.zero_std_threshold,
        coef,
        fmt_nums(&offs)
    );
    if mode != Mode::Target {
        input += &fmt_nums(logp);
    }
    if mode == Mode::Target {
        input += &fmt_nums(logp_old.unwrap());
    } else if mode == Mode::Fused {
        if let Some(o) = logp_old {
            input += &fmt_nums(o);
        }
    }
    if mode != Mode::Fit {
        input += &fmt_nums(scores);
    } else {
        input += &fmt_nums(q_in);
    }
    let words = run_harness(harness(), &input);
    let mut it = words.iter();
    let status: u64 = it.next().unwrap().parse().unwrap();
    let mut vals = it.map(|s| s.parse::<f64>().unwrap());
    let mut take = |k: usize| (&mut vals).take(k).collect::<Vec<f64>>();
    let q = if mode != Mode::Fit { take(n) } else { vec![] };
    let (grad, group_loss) = if mode != Mode::Target { (take(n), take(b)) } else { (vec![], vec![]) };
    let rows = match mode {
        Mode::Target => 2,
        Mode::Fit => 3,
        Mode::Fused => 4,
    };
    let stats = take(rows * b);
    Out { status, q, grad, group_loss, stats }
}

fn compare(name: &str, got: &[f64], want: &[f64], floor: f64, extra: f64) -> Result<(), TestCaseError> {
    within(name, got, want, floor, extra).map_err(TestCaseError::fail)
}

fn round<T: Scalar>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| T::from_f64(x).to_f64()).collect()
}

fn configs() -> impl Strategy<Value = (TargetConfig, FitConfig)> {
    kernel_configs(Just(true))
}

fn check_fused(
    b: &Batch,
    t: u8,
    g: u8,
    with_old: bool,
    tc: &TargetConfig,
    fc: &FitConfig,
) -> Result<(), TestCaseError> {
    let layout = b.layout();
    let rnd = |v: &[f64]| match t {
        1 => round::<bf16>(v),
        2 => round::<f16>(v),
        _ => round::<f32>(v),
    };
    let (l, lo) = (rnd(&b.logp), rnd(&b.logp_old));
    let s = round::<f32>(&b.scores);
    let w = fc.reduction.weight(layout.num_groups()).unwrap();
    let got = run(
        Mode::Fused,
        t,
        g,
        &layout,
        &l,
        with_old.then_some(&lo[..]),
        &s,
        &[],
        tc,
        fc.grad_scale * w,
        fc.form == LossForm::Kl,
    );
    prop_assert_eq!(got.status, 0);
    let want = cpu::target_and_fit(&l, with_old.then_some(&lo[..]), &s, &layout, tc, fc).unwrap();
    let storage = storage_rtol(["f32", "bf16", "f16"][g as usize]);
    let coef = (fc.grad_scale * w).abs();
    let lscale = 1.0 + want.fit.group_loss.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    // The bounds are absolute + relative (`within`): |kernel - reference| <= 1e-5 (|reference| +
    // floor). At an extreme eta the target is nearly one-hot: members below the top score get
    // q ~ e^(-gap / eta), which the kernel and the reference both flush to 0 or compute from the
    // same shifted exponent with f32's relative error (the score term d / (sd eta) carries ~3 ulp,
    // the anchor l_old - L* ~1 ulp of the group's log-prob range), so no tolerance needs to grow
    // with 1 / eta; at a huge eta q -> p_old and the score term vanishes in both.
    compare("target", &got.q, &want.target, 1.0, 0.0)?;
    compare("grad", &got.grad, &want.fit.grad, coef, storage)?;
    compare("group_loss", &got.group_loss, &want.fit.group_loss, lscale, 0.0)?;
    let st = want.fit.stats.unwrap();
    let bn = layout.num_groups();
    compare("kl_q_p", &got.stats[..bn], &st.kl_q_p, lscale, 0.0)?;
    compare("entropy_q", &got.stats[bn..2 * bn], &st.entropy_q, lscale, 0.0)?;
    compare("kl_q_pold", &got.stats[2 * bn..3 * bn], st.kl_q_pold.as_ref().unwrap(), lscale, 0.0)?;
    compare("grad_norm", &got.stats[3 * bn..], &st.grad_norm, coef, storage)?;
    Ok(())
}

proptest! {
    // Each case runs the harness a few times: cap the shrinking so a failure reports in seconds.
    #![proptest_config(ProptestConfig { max_shrink_iters: 256, ..ProptestConfig::with_cases(64) })]

    #[test]
    fn fused_matches_reference(b in small_batch(), with_old in any::<bool>(), (tc, fc) in configs(), dt in prop::sample::select(vec![(0u8, 0u8), (1, 0), (1, 1), (0, 1)])) {
        check_fused(&b, dt.0, dt.1, with_old, &tc, &fc)?;
    }

    #[test]
    fn fused_f16(b in batch(1..=6, 1..=12, -8.0, 0.0), (tc, fc) in configs()) {
        check_fused(&b, 2, 2, true, &tc, &fc)?;
    }

    #[test]
    fn extreme_magnitudes_exclusions_and_close_scores(
        b in batch(1..=6, 1..=40, -20.0, 0.0),
        off in -5000.0..5000.0f64,
        drop in prop::collection::vec(any::<bool>(), 40),
        s_off in prop_oneof![Just(0.0), Just(1000.0), Just(-1e6)],
        (tc, fc) in configs(),
    ) {
        let mut b = b;
        let layout = b.layout();
        for r in layout.ranges() {
            for i in r.clone() {
                b.logp[i] += off;
                b.logp_old[i] += off;
                b.scores[i] += s_off;
                if i > r.start && drop[i % 40] {
                    b.logp_old[i] = f64::NEG_INFINITY;
                    b.logp[i] = f64::NEG_INFINITY;
                }
            }
        }
        check_fused(&b, 0, 0, true, &tc, &fc)?;
    }

    #[test]
    fn zero_variance_with_large_equal_scores(b in small_batch(), v in prop_oneof![-1e30..1e30f64, -10.0..10.0f64]) {
        // Equal scores of any magnitude give u = 0 exactly: q = p_old and zero on-policy gradient.
        let mut b = b;
        b.scores = vec![v; b.len()];
        let layout = b.layout();
        let l = round::<f32>(&b.logp_old);
        let s = round::<f32>(&b.scores);
        let got = run(Mode::Fused, 0, 0, &layout, &l, None, &s, &[], &TargetConfig::default(), 1.0, false);
        prop_assert!(got.grad.iter().all(|g| g.abs() < 1e-6), "{:?}", got.grad);
    }

    #[test]
    fn target_then_fit_match_reference(b in small_batch(), (tc, fc) in configs(), qs in 0.995..1.005f64) {
        let layout = b.layout();
        let (l, lo) = (round::<f32>(&b.logp), round::<f32>(&b.logp_old));
        let s = round::<f32>(&b.scores);
        let t = run(Mode::Target, 0, 0, &layout, &[], Some(&lo), &s, &[], &tc, 0.0, false);
        prop_assert_eq!(t.status, 0);
        let want_q = cpu::target(&lo, &s, &layout, &tc).unwrap();
        compare("target", &t.q, &want_q, 1.0, 0.0)?;
        // A stored target may sum to 1 +- 1% (rounded storage): the gradient is sum(q) p - q.
        let q32 = round::<f32>(&t.q.iter().map(|x| x * qs).collect::<Vec<_>>());
        let w = fc.reduction.weight(layout.num_groups()).unwrap();
        let f = run(Mode::Fit, 0, 0, &layout, &l, None, &[], &q32, &tc, fc.grad_scale * w, fc.form == LossForm::Kl);
        prop_assert_eq!(f.status, 0);
        let want = cpu::fit(&l, &q32, &layout, &fc).unwrap();
        let coef = (fc.grad_scale * w).abs();
        let lscale = 1.0 + want.group_loss.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        compare("grad", &f.grad, &want.grad, coef, 0.0)?;
        compare("group_loss", &f.group_loss, &want.group_loss, lscale, 0.0)?;
        let bn = layout.num_groups();
        compare("grad_norm", &f.stats[2 * bn..], &want.stats.unwrap().grad_norm, coef, 0.0)?;
    }
}

#[test]
fn large_group() {
    let b = seeded_batch(vec![20_000], 9, 30.0, 0.05);
    check_fused(
        &b,
        0,
        0,
        true,
        &TargetConfig::default(),
        &FitConfig { diagnostics: true, ..FitConfig::default() },
    )
    .unwrap();
}

#[test]
fn extreme_eta_fixed_cases() {
    // Issue 11's group (two top-scored members with different l_old: at a small eta the target is
    // p_old on them, e^-1 : e^-3) beside ragged random groups, at etas where the old kernels lost
    // the anchor (1e-14), where 1 / eta overflows f32 (1e-40, subnormal in f32) or f64 (5e-324),
    // and where it underflows f32 (1e39 and above).
    let issue = Batch {
        sizes: vec![4, 3, 1],
        logp_old: vec![-1.0, -2.0, -3.0, -3.0, -0.5, -7.0, -0.5, -2.0],
        logp: vec![-1.5, -2.0, -2.5, -2.0, -1.0, -1.0, -1.0, -3.0],
        scores: vec![1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 0.5, 1.0],
    };
    let etas = [1e-14, 1e-30, 1e-40, f64::from_bits(1), 1e-12, 1e-3, 0.3, 2.0, 1e6, 1e39, 1e300];
    let fc = FitConfig { diagnostics: true, form: LossForm::Kl, ..FitConfig::default() };
    for &eta in &etas {
        for anchor in [Anchor::Anchored, Anchor::NoAnchor] {
            let tc = TargetConfig { eta, anchor, ..TargetConfig::default() };
            for (t, g) in [(0u8, 0u8), (1, 0), (1, 1), (2, 2)] {
                check_fused(&issue, t, g, true, &tc, &fc)
                    .unwrap_or_else(|e| panic!("eta {eta:e} {anchor:?} {t}/{g}: {e}"));
            }
            for seed in 0..3 {
                let mut b = seeded_batch(vec![7, 1, 30, 12], seed, 30.0, 0.4);
                // Continuous scores too, and some excluded members.
                for (i, s) in b.scores.iter_mut().enumerate() {
                    if i % 3 == 1 {
                        *s += 0.25 * (i % 5) as f64;
                    }
                }
                for i in [3usize, 20, 21] {
                    b.logp_old[i] = f64::NEG_INFINITY;
                    b.logp[i] = f64::NEG_INFINITY;
                }
                for with_old in [true, false] {
                    check_fused(&b, 0, 0, with_old, &tc, &fc)
                        .unwrap_or_else(|e| panic!("eta {eta:e} {anchor:?} seed {seed}: {e}"));
                }
            }
        }
    }
    // The kernel's target on issue 11's group is the limit, not [1, 0, 0, 1].
    let layout = issue.layout();
    let lo = round::<f32>(&issue.logp_old);
    for eta in [1e-14, 1e-40] {
        let t = run(
            Mode::Target,
            0,
            0,
            &layout,
            &[],
            Some(&lo),
            &issue.scores,
            &[],
            &TargetConfig::with_eta(eta),
            0.0,
            false,
        );
        let q0 = 1.0 / (1.0 + (-2f64).exp());
        let want = [q0, 0.0, 0.0, 1.0 - q0];
        assert!(
            t.q.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-6),
            "eta {eta:e}: q = {:?}",
            &t.q[..4]
        );
    }
}

#[test]
fn error_words_name_the_first_bad_element() {
    let layout = GroupLayout::from_sizes(&[3, 2, 4]).unwrap();
    let ok = [-1.0, -2.0, -3.0, -1.0, -2.0, -1.0, -2.0, -3.0, -4.0];
    let s = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
    let tc = TargetConfig::default();
    let fused = |l: &[f64], old: Option<&[f64]>, s: &[f64]| {
        let o = run(Mode::Fused, 0, 0, &layout, l, old, s, &[], &tc, 1.0, false);
        assert!(o.group_loss.iter().any(|x| x.is_nan()), "a group with an error has a NaN loss");
        decode_status(o.status, &layout).unwrap_err().to_string()
    };
    let mut bad = ok;
    bad[7] = f64::NAN;
    bad[4] = f64::INFINITY;
    assert_eq!(
        fused(&bad, None, &s),
        "logp[4] is NaN or +inf: log-probs must be finite, or -inf to exclude a member"
    );
    assert_eq!(
        fused(&ok, Some(&bad), &s),
        "logp_old[4] is NaN or +inf: log-probs must be finite, or -inf to exclude a member"
    );
    let mut old = ok;
    old[3] = f64::NEG_INFINITY;
    old[4] = f64::NEG_INFINITY;
    assert_eq!(
        fused(&ok, Some(&old), &s),
        "group 1: every logp_old value is -inf, so the group's distribution is undefined"
    );
    let mut l = ok;
    l[0] = f64::NEG_INFINITY;
    assert_eq!(
        fused(&l, Some(&ok), &s),
        "logp[0] is -inf where the target is positive: the cross-entropy is infinite"
    );
    let mut sb = s;
    sb[6] = f64::NEG_INFINITY;
    assert_eq!(fused(&ok, None, &sb), "scores[6] is not finite: scores must be finite");
    let q = [0.5, 0.6, 0.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25];
    let f = run(Mode::Fit, 0, 0, &layout, &ok, None, &[], &q, &tc, 1.0, false);
    assert_eq!(
        decode_status(f.status, &layout).unwrap_err().to_string(),
        "invalid target: group 0 does not sum to 1 (within 0.01): pass the output of target()"
    );
    let q = [0.5, 0.5, 0.0, 1.5, -0.5, 0.25, 0.25, 0.25, 0.25];
    let f = run(Mode::Fit, 0, 0, &layout, &ok, None, &[], &q, &tc, 1.0, false);
    assert_eq!(
        decode_status(f.status, &layout).unwrap_err().to_string(),
        "target[4] is negative or not finite: a target holds probabilities in [0, 1]"
    );
    // Valid inputs leave the word at zero.
    let o = run(Mode::Fused, 0, 0, &layout, &ok, None, &s, &[], &tc, 1.0, false);
    assert_eq!(o.status, 0);
    assert!(decode_status(0, &layout).is_ok());
}
