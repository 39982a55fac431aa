//! Findings of the fuzz targets (fuzz/), each replayed through the very checks the fuzz target
//! applies (fuzz/src/checks.rs, compiled here with `#[path]`): `eval_input` reproducers are the
//! safetensors files under fuzz/regressions/eval_input/, `api` reproducers the cases below
//! (their raw fuzzer inputs are under fuzz/regressions/api/, replayed too).

#[path = "../fuzz/src/api.rs"]
mod api;
#[path = "../fuzz/src/checks.rs"]
mod checks;
#[path = "../fuzz/src/cli.rs"]
mod cli;
#[path = "../fuzz/src/eval_input.rs"]
mod eval_input;

use api::{
    BaselineSpec, Case, Dt, FitSpec, LayoutSpec, Op, Size, Source, Special, TargetInput, TargetSpec,
    TokenCall, TokenSpec, Val,
};

fn regression(target: &str, name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(target).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

fn eval_file(name: &str) {
    if let Err(e) = eval_input::run(&regression("eval_input", name)) {
        panic!("fuzz/regressions/eval_input/{name}: {e}");
    }
}

fn api_case(case: &Case) {
    if let Err(e) = api::run(case) {
        panic!("{e}\ncase: {case:?}");
    }
}

fn api_file(name: &str) {
    let bytes = regression("api", name);
    let u = arbitrary::Unstructured::new(&bytes);
    let case: Case = arbitrary::Arbitrary::arbitrary_take_rest(u).expect("a decodable api case");
    api_case(&case);
}

fn p10(m: i8, e: i16) -> Val {
    Val::Pow10 { m, e: e + 330 }
}

fn f(v: f64) -> Val {
    Val::Bits(v.to_bits())
}

fn vals(v: &[f64]) -> Vec<Val> {
    v.iter().map(|&x| f(x)).collect()
}

/// One group of `k` members, f64 everywhere, the given values and call.
fn case(k: u8, logp: &[f64], logp_old: &[f64], scores: &[f64], op: Op) -> Case {
    Case {
        layout: LayoutSpec::Uniform { groups: Size::Small(1), k: Size::Small(k) },
        logp_dtype: Dt::F64,
        scores_dtype: Dt::F64,
        logp: vals(logp),
        logp_old: vals(logp_old),
        scores: vals(scores),
        wrong_len: None,
        op,
    }
}

fn eta(e: Val) -> TargetSpec {
    TargetSpec { eta: e, zero_std_threshold: None, no_anchor: false }
}

fn fit_default() -> FitSpec {
    FitSpec { kl: false, reduction: None, grad_scale: None, diagnostics: true }
}

fn tokens(call: TokenCall, temperature: f64, vocab: u8, tokens: Vec<u32>) -> Op {
    Op::Tokens(
        Box::new(TokenSpec {
            vocab: Size::Small(vocab),
            temperature: f(temperature),
            entropy: true,
            mean: false,
            seq_lens: vec![1],
            tokens,
            raw_tokens: false,
            mask: vec![],
            dim: 1,
            call,
        }),
        eta(Val::Special(Special::One)),
        fit_default(),
    )
}

// ---- The checks themselves: a valid case passes (so a failure below is the library's). ----

#[test]
fn a_sound_case_passes_every_check() {
    for op in [
        Op::Target(eta(p10(1, 0))),
        Op::TargetAndFit { with_old: true, target: eta(p10(1, 0)), fit: fit_default() },
        Op::Fit(TargetInput::Built(eta(p10(5, -1))), FitSpec { kl: true, ..fit_default() }),
        Op::Reinforce(BaselineSpec::Mean, fit_default()),
        tokens(TokenCall::FromLogits(Source::OnPolicy), 0.7, 3, vec![0, 2, 1, 1]),
    ] {
        api_case(&case(
            4,
            &[-1.0, -2.0, -0.5, -3.0],
            &[-1.1, f64::NEG_INFINITY, -0.4, -3.0],
            &[1.0, 0.0, 0.5, 1.0],
            op,
        ));
    }
}

#[test]
fn the_seed_files_pass_every_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/eval_input");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if let Err(msg) = eval_input::run(&std::fs::read(&p).unwrap()) {
            panic!("{}: {msg}", p.display());
        }
        n += 1;
    }
    assert!(n >= 10, "only {n} seed files in {}", dir.display());
}

// ---- eval_input findings (fuzz/regressions/eval_input/) ----

/// logp_old = [-1e17, -1e17]: the target comes out [1, 1] and `tpo eval` blames the user
/// ("group 0 sums to 2 ... pass the output of target()").
#[test]
fn eval_target_of_large_logp_old_sums_to_one() {
    eval_file("target-sums-to-2-large-logp-old");
}

/// logp = [-1e17, -1e17]: softmax(logp) = [1, 1], so the gradient does not sum to zero.
#[test]
fn eval_gradient_of_large_logp_sums_to_zero() {
    eval_file("grad-not-zero-sum-large-logp");
}

/// int64 group_sizes [2^63-1, 2^63-1, 4] for 3 members: the sum wraps (a panic with overflow
/// checks, "add up to 2" without).
#[test]
fn eval_group_sizes_that_overflow_are_refused_truthfully() {
    eval_file("group-sizes-overflow");
    let path = std::env::temp_dir().join(format!("tpo-fuzz-regression-{}.safetensors", std::process::id()));
    std::fs::write(&path, regression("eval_input", "group-sizes-overflow")).unwrap();
    let r = cli::input::load(&path);
    std::fs::remove_file(&path).unwrap();
    match r {
        Ok(_) => panic!("group_sizes that overflow were accepted"),
        Err(e) => assert!(!e.contains("add up to 2"), "the error states the wrapped sum: {e}"),
    }
}

/// A tensor name holding '\r' and '\n' (JSON escapes in the header) at an invalid offset: the
/// safetensors reader's message quotes the name, and the error came out three lines long.
#[test]
fn eval_error_quoting_a_name_with_newlines_is_one_line() {
    eval_file("newline-in-tensor-name");
}

/// No tensor 'logp' but one named "l\x7fgp" (DEL): the error lists the names the file holds, and
/// the DEL went out raw (found with the escaping planted out, by CI's fuzzing settings).
#[test]
fn eval_error_listing_a_name_with_a_control_character_is_escaped() {
    eval_file("del-in-tensor-name");
}

// ---- api findings: the small-eta class (target, fit, tokens) ----

/// The example: scores [1, 0, 0, 1], l_old = 0, eta = 1e-16 gives q = [1, 0, 0, 1].
#[test]
fn target_at_eta_1e_16_sums_to_one() {
    api_case(&case(4, &[], &[], &[1.0, 0.0, 0.0, 1.0], Op::Target(eta(p10(1, -16)))));
}

/// eta = 1e-14: the sum is off by 5e-3 (ln 2 rounded to the ulp of 1e14).
#[test]
fn target_at_eta_1e_14_sums_to_one() {
    api_case(&case(4, &[], &[], &[1.0, 0.0, 0.0, 1.0], Op::Target(eta(p10(1, -14)))));
}

/// The smallest subnormal eta: u / eta = inf, and the target is NaN.
#[test]
fn target_at_subnormal_eta_is_finite_or_refused() {
    api_case(&case(4, &[], &[], &[1.0, 0.0, 0.0, 1.0], Op::Target(eta(Val::Special(Special::MinSubnormal)))));
}

/// eta = 1: 44 members whose l_old are all about 1e290 get q = 1 each (sum 44): the same
/// rounding at any eta once |l_old| dwarfs ln K.
#[test]
fn target_of_huge_equal_logp_old_sums_to_one() {
    api_case(&case(4, &[], &[1e290], &[0.0], Op::Target(eta(p10(1, 0)))));
    api_file("target-large-logp-old-sums-to-44");
}

/// target_and_fit refuses the target it built itself ("pass the output of target()").
#[test]
fn target_and_fit_accepts_its_own_target() {
    api_case(&case(
        4,
        &[],
        &[],
        &[1.0, 0.0, 0.0, 1.0],
        Op::TargetAndFit { with_old: false, target: eta(p10(1, -16)), fit: fit_default() },
    ));
    api_file("target-and-fit-refuses-its-own-target");
}

/// fit with logp = [-1e17, -1e17]: softmax gives [1, 1], the gradient sums to 1 and the loss is 0.
#[test]
fn fit_of_large_logp_has_a_zero_sum_gradient() {
    api_case(&case(2, &[-1e17], &[], &[], Op::Fit(TargetInput::Uniform, fit_default())));
    api_file("fit-grad-large-logp-not-zero-sum");
}

/// token_logprobs at temperature 1e-17 with logits [1, 1]: lse as one f64 absorbs ln 2, so each
/// p = 1; the two parts `row_max` and `log_sum` keep it.
#[test]
fn token_logprobs_at_tiny_temperature_normalise() {
    api_case(&case(1, &[1.0], &[], &[], tokens(TokenCall::Logprobs, 1e-17, 2, vec![0])));
    api_file("token-logprobs-row-sum-tiny-temperature");
}

/// Tempered logits near 3e37: `z * (1/tau)` and `z / tau` differ by an ulp there, which moves
/// `log p` by ~1e21, so the reference must compute `s = z / tau` as documented (it multiplied).
#[test]
fn token_logprobs_divide_by_the_temperature() {
    api_file("token-logprobs-divided-not-multiplied");
}

/// A finite gradient whose norm was formed as `sqrt(sum (scale d)^2)`: the squares overflow, so
/// a huge grad_scale reported an infinite norm; the norm is now `|scale| sqrt(sum d^2)`.
#[test]
fn fit_grad_norm_is_finite_or_refused() {
    api_file("fit-grad-norm-overflows-for-a-finite-gradient");
    let fs = FitSpec { grad_scale: Some(f(1e200)), diagnostics: true, ..fit_default() };
    api_case(&case(2, &[-1.0, -2.0], &[], &[], Op::Fit(TargetInput::Uniform, fs)));
}

/// Log-probs near f64::MAX: each group's cross-entropy is finite, but `w * sum_g L_g` summed
/// them first and overflowed; the reduction now scales each term, and a loss truly past f64's
/// range is refused with one line.
#[test]
fn fit_loss_with_logp_near_max_is_finite_or_refused() {
    api_file("fit-loss-inf-logp-near-max-1");
    api_file("fit-loss-inf-logp-near-max-2");
}

/// tpo_from_hidden with values near f16::MAX and a 126-wide hidden state: the backward's sums
/// `sum_v dL/dz W` reached inf - inf = NaN, returned as Ok; now refused with one line.
#[test]
fn from_hidden_gradient_is_finite_or_refused() {
    api_file("from-hidden-grad-nan-huge-products");
}

/// logits_grad with a subnormal upstream gradient (1.7e-320) and tau = 4e-94: g (1 - p) kept
/// few digits before the division magnified them, so the row summed to 3e-229 against terms of
/// 4e-227; the reference now divides by tau first.
#[test]
fn logits_grad_with_subnormal_upstream_sums_to_zero() {
    api_file("logits-grad-subnormal-upstream-tiny-temperature");
}

// ---- api findings outside the list ----

/// A subnormal temperature: 1 / tau = inf and 0 * inf = NaN log-probs, returned as Ok.
#[test]
fn token_logprobs_at_subnormal_temperature_are_finite_or_refused() {
    api_case(&case(1, &[0.0], &[], &[], tokens(TokenCall::Logprobs, f64::from_bits(1), 2, vec![0])));
}

/// Reduction::GlobalMean(n) with a subnormal n: w = 1 / n = inf, loss and gradient NaN.
#[test]
fn fit_with_subnormal_global_count_is_finite_or_refused() {
    let fs = FitSpec { reduction: Some(Some(f(5e-324))), ..fit_default() };
    api_case(&case(2, &[-1.0, -2.0], &[], &[], Op::Fit(TargetInput::Uniform, fs)));
    api_file("fit-nan-global-mean-subnormal");
}

/// grad_scale * w overflows (1e300 * 1e300): an infinite gradient returned as Ok.
#[test]
fn fit_with_overflowing_scale_is_finite_or_refused() {
    let fs = FitSpec { reduction: Some(Some(f(1e-300))), grad_scale: Some(f(1e300)), ..fit_default() };
    api_case(&case(2, &[-1.0, -2.0], &[], &[], Op::Fit(TargetInput::Uniform, fs)));
}

/// REINFORCE's group-mean baseline with scores [MAX, MAX]: the sum overflows, A = -inf.
#[test]
fn reinforce_with_huge_scores_is_finite_or_refused() {
    api_case(&case(2, &[-1.0, -2.0], &[], &[f64::MAX], Op::Reinforce(BaselineSpec::Mean, fit_default())));
    api_file("reinforce-loss-inf-huge-values");
}

/// DG: -(1/K) sum g A l overflows for finite A and l (scores -MAX, logp -4), and the group-mean
/// baseline overflows as in REINFORCE.
#[test]
fn dg_with_huge_scores_is_finite_or_refused() {
    let op = Op::Dg { eta: p10(1, 0), baseline: BaselineSpec::Constant(p10(1, 0)), fit: fit_default() };
    api_case(&case(2, &[-4.0], &[-1.0], &[f64::MIN, 0.0], op));
    api_file("dg-loss-inf-huge-scores");
    api_file("dg-loss-nan-group-mean-overflow");
}

/// GRPO with logp - logp_old = -1000: the KL penalty exp(-r) overflows to an infinite loss.
#[test]
fn grpo_with_a_large_log_ratio_is_finite_or_refused() {
    let op = Op::Grpo { clip_eps: f(0.2), beta: f(0.04), zero_std_threshold: f(1e-6), fit: fit_default() };
    api_case(&case(2, &[-1001.0, -1.0], &[-1.0], &[0.0, 1.0], op));
}

/// logits_grad passes a NaN upstream gradient through to Ok(NaN) (it validates the logits,
/// not `token_grad`).
#[test]
fn logits_grad_with_nan_upstream_is_refused() {
    api_case(&case(1, &[0.0, 1.0], &[], &[f64::NAN], tokens(TokenCall::LogitsGrad, 1.0, 2, vec![0])));
    api_file("logits-grad-nan-upstream");
}

/// target_and_fit whose group gradient norm is subnormal (about 1.69e-321): the library's norm
/// and the check's differed by one unit of the subnormal range's last place, two correct
/// roundings of a value that has only a few significant bits; the check allows a few such units.
#[test]
fn target_and_fit_subnormal_grad_norm_within_a_few_subnormal_units() {
    api_file("target-and-fit-grad-norm-subnormal-one-ulp");
}

/// Every raw input under fuzz/regressions/api/ replays through the checks, so a file kept there
/// is never left out of the tests (one was, for a while, before this test).
#[test]
fn every_api_regression_file_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/api");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in &names {
        api_file(name);
    }
    assert!(names.len() >= 16, "only {} files in {}", names.len(), dir.display());
}
