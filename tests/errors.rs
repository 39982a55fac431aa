//! Bad input gets a clear error, never a panic and never a silent NaN.

use tpo::{cpu, FitConfig, GroupLayout, Reduction, TargetConfig, TpoError};

fn msg<T: std::fmt::Debug>(r: Result<T, TpoError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn layout_errors() {
    assert_eq!(msg(GroupLayout::uniform(0, 4)), "the layout has no groups: at least one group is required");
    assert_eq!(msg(GroupLayout::uniform(3, 0)), "group 0 is empty: every group needs at least one member");
    assert_eq!(
        msg(GroupLayout::from_sizes(&[4, 0, 2])),
        "group 1 is empty: every group needs at least one member"
    );
    assert_eq!(msg(GroupLayout::from_sizes(&[])), "the layout has no groups: at least one group is required");
    assert_eq!(msg(GroupLayout::from_offsets(vec![1, 3])), "invalid offsets: offsets[0] is 1, must be 0");
    assert_eq!(
        msg(GroupLayout::from_offsets(vec![0, 3, 3, 5])),
        "group 1 is empty: every group needs at least one member"
    );
    assert!(msg(GroupLayout::from_offsets(vec![0, 5, 3])).contains("offsets must increase"));
    assert!(msg(GroupLayout::from_offsets(vec![])).contains("B + 1 offsets"));
    assert!(matches!(GroupLayout::from_offsets(vec![0]), Err(TpoError::NoGroups)));
    assert!(msg(GroupLayout::uniform(usize::MAX, 2)).contains("overflow"));
    assert!(msg(GroupLayout::from_sizes(&[usize::MAX, 2])).contains("overflow"));
    let l = GroupLayout::from_offsets(vec![0, 2, 7]).unwrap();
    assert_eq!((l.num_groups(), l.len(), l.max_group_size(), l.range(1)), (2, 7, 5, 2..7));
}

#[test]
fn length_mismatches_name_the_input() {
    let layout = GroupLayout::uniform(128, 4).unwrap();
    let l = vec![0.0f32; 512];
    let s = vec![0.0f32; 511];
    assert_eq!(
        msg(cpu::target(&l, &s, &layout, &TargetConfig::default())),
        "scores has 511 elements, layout expects 512"
    );
    assert_eq!(
        msg(cpu::fit(&l[..500], &l, &layout, &FitConfig::default())),
        "logp has 500 elements, layout expects 512"
    );
}

#[test]
fn config_errors() {
    let layout = GroupLayout::uniform(1, 2).unwrap();
    let x = [0.0f64, 0.0];
    for eta in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = msg(cpu::target(&x, &x, &layout, &TargetConfig::with_eta(eta)));
        assert!(e.starts_with("eta must be finite and > 0, got"), "{e}");
    }
    assert_eq!(
        msg(cpu::target(&x, &x, &layout, &TargetConfig::with_eta(0.0))),
        "eta must be finite and > 0, got 0"
    );
    let t = TargetConfig { zero_std_threshold: -1.0, ..TargetConfig::default() };
    assert!(msg(cpu::target(&x, &x, &layout, &t)).contains("zero_std_threshold"));
    let q = [0.5f64, 0.5];
    for n in [0.0, -2.0, f64::NAN] {
        let f = FitConfig { reduction: Reduction::GlobalMean(n), ..FitConfig::default() };
        assert!(msg(cpu::fit(&x, &q, &layout, &f)).contains("global group count must be finite and > 0"));
    }
    let f = FitConfig { grad_scale: f64::NAN, ..FitConfig::default() };
    assert!(msg(cpu::fit(&x, &q, &layout, &f)).contains("grad_scale must be finite"));
}

#[test]
fn non_finite_values() {
    let layout = GroupLayout::uniform(2, 2).unwrap();
    let ok = [0.0f64; 4];
    let mut bad = ok;
    bad[3] = f64::NAN;
    assert_eq!(
        msg(cpu::target(&bad, &ok, &layout, &TargetConfig::default())),
        "logp_old[3] is NaN: log-probs must be finite, or -inf to exclude a member"
    );
    bad[3] = f64::INFINITY;
    assert!(msg(cpu::target(&bad, &ok, &layout, &TargetConfig::default())).starts_with("logp_old[3] is inf"));
    assert!(msg(cpu::target(&ok, &bad, &layout, &TargetConfig::default()))
        .starts_with("scores[3] is inf: scores must be finite"));
    bad[3] = f64::NEG_INFINITY;
    assert!(msg(cpu::target(&ok, &bad, &layout, &TargetConfig::default())).starts_with("scores[3] is -inf"));
    let q = [0.5f64; 4];
    bad[3] = f64::NAN;
    assert!(msg(cpu::fit(&bad, &q, &layout, &FitConfig::default())).starts_with("logp[3] is NaN"));
}

#[test]
fn excluded_and_infinite_cases() {
    let layout = GroupLayout::uniform(2, 2).unwrap();
    let ninf = f64::NEG_INFINITY;
    let s = [1.0f64, 0.0, 1.0, 0.0];
    assert_eq!(
        msg(cpu::target(&[0.0, 0.0, ninf, ninf], &s, &layout, &TargetConfig::default())),
        "group 1: every logp_old value is -inf, so the group's distribution is undefined"
    );
    let q = [0.5f64, 0.5, 0.0, 1.0];
    assert_eq!(
        msg(cpu::fit(&[0.0, 0.0, 0.0, ninf], &q, &layout, &FitConfig::default())),
        "logp[3] is -inf but the target gives it q = 1: the cross-entropy is infinite"
    );
    // -inf where q = 0 is fine.
    let out =
        cpu::fit(&[0.0, 0.0, 0.0, ninf], &[0.5f64, 0.5, 1.0, 0.0], &layout, &FitConfig::default()).unwrap();
    assert!(out.loss.is_finite() && out.grad.iter().all(|g| g.is_finite()));
}

#[test]
fn invalid_targets() {
    let layout = GroupLayout::uniform(1, 2).unwrap();
    let l = [0.0f64, 0.0];
    assert!(msg(cpu::fit(&l, &[0.5f64, 0.6], &layout, &FitConfig::default())).contains("group 0 sums to 1.1"));
    assert!(msg(cpu::fit(&l, &[1.5f64, -0.5], &layout, &FitConfig::default())).contains("target[1] is -0.5"));
    assert!(msg(cpu::fit(&l, &[f64::NAN, 1.0], &layout, &FitConfig::default())).contains("target[0] is NaN"));
}

#[test]
fn sizes_that_overflow_are_refused_not_wrapped() {
    use tpo::linear_plan::{logits, Buffer, GemmCall, LinearPlan, Operand};
    // Sizes near usize::MAX: every sum and product of sizes is checked (issue 11).
    assert!(msg(GroupLayout::from_sizes(&[usize::MAX / 2 + 1, usize::MAX / 2 + 1, 4])).contains("overflow"));
    let half = usize::MAX / 2 + 1;
    assert_eq!(
        msg(LinearPlan::with_blocks(half, 4, 8, 128, 1, 1)),
        format!("tokens x dim = {half} x 8: too large, the size overflows")
    );
    assert_eq!(
        msg(LinearPlan::with_blocks(2, half, 4, 128, 1, 1)),
        format!("vocab x dim = {half} x 4: too large, the size overflows")
    );
    assert!(msg(LinearPlan::new(1, half, 1, usize::MAX)).contains("workspace"));
    assert_eq!(LinearPlan::workspace_elems(half, 1 << 30), usize::MAX);
    // A GEMM whose extent wraps around usize is out of range, not a small extent.
    let plan = LinearPlan::with_blocks(4, 8, 2, 128, 4, 8).unwrap();
    let huge = logits(8, 2, 2, usize::MAX);
    assert_eq!(huge.extents()[2], usize::MAX);
    let at = |buffer, offset| Operand { buffer, offset };
    let call = GemmCall {
        desc: huge,
        a: at(Buffer::Weight, 0),
        b: at(Buffer::Hidden, 0),
        c: at(Buffer::Workspace, 1),
        accumulate: false,
    };
    assert!(msg(plan.check_gemm(&call, 1 << 20)).contains("would reach element"));
}
