//! Shared proptest strategies and helpers for the test suites.
#![allow(dead_code)]

use proptest::prelude::*;
use tpo::GroupLayout;

/// A batch of groups: sizes plus per-member rollout log-probs, current log-probs and scores.
#[derive(Debug, Clone)]
pub struct Batch {
    pub sizes: Vec<usize>,
    pub logp_old: Vec<f64>,
    pub logp: Vec<f64>,
    pub scores: Vec<f64>,
}

impl Batch {
    pub fn layout(&self) -> GroupLayout {
        GroupLayout::from_sizes(&self.sizes).unwrap()
    }
    pub fn len(&self) -> usize {
        self.sizes.iter().sum()
    }
}

/// Scores: binary pass/fail (many ties and zero-variance groups) or continuous.
pub fn score() -> impl Strategy<Value = f64> {
    prop_oneof![prop::sample::select(vec![0.0, 1.0]), -10.0..10.0f64]
}

/// Ragged batches of `groups` groups with sizes in `ksize`, log-probs in `[lo, hi]`.
pub fn batch(
    groups: std::ops::RangeInclusive<usize>,
    ksize: std::ops::RangeInclusive<usize>,
    lo: f64,
    hi: f64,
) -> impl Strategy<Value = Batch> {
    prop::collection::vec(ksize, groups).prop_flat_map(move |sizes| {
        let n: usize = sizes.iter().sum();
        (
            Just(sizes),
            prop::collection::vec(lo..hi, n),
            prop::collection::vec(lo..hi, n),
            prop::collection::vec(score(), n),
        )
            .prop_map(|(sizes, logp_old, logp, scores)| Batch { sizes, logp_old, logp, scores })
    })
}

/// The usual batches: 1..=6 groups of 1..=12 members, log-probs in [-30, 5].
pub fn small_batch() -> impl Strategy<Value = Batch> {
    batch(1..=6, 1..=12, -30.0, 5.0)
}

/// The target temperature: log-uniform over `[1e-12, 1e6]` (sometimes exactly 1), so every test
/// sees near-one-hot targets (`eta` far below the z-score gaps) and near-`p_old` ones alike.
pub fn eta() -> impl Strategy<Value = f64> {
    prop_oneof![1 => Just(1.0), 9 => (-12.0..=6.0f64).prop_map(|x| 10f64.powf(x))]
}

/// `log softmax` of one group, in f64.
pub fn log_softmax(l: &[f64]) -> Vec<f64> {
    let lse = tpo::cpu::logsumexp(l);
    l.iter().map(|x| x - lse).collect()
}

pub fn softmax(l: &[f64]) -> Vec<f64> {
    log_softmax(l).into_iter().map(f64::exp).collect()
}

/// `|a - b| <= abs + rel * max(|a|, |b|)` elementwise, with a message naming the first miss.
pub fn close(a: &[f64], b: &[f64], abs: f64, rel: f64) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("lengths differ: {} vs {}", a.len(), b.len()));
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if !approx::relative_eq!(*x, *y, epsilon = abs, max_relative = rel) {
            return Err(format!("element {i}: {x} vs {y}"));
        }
    }
    Ok(())
}

/// Relative tolerance of f32 kernel outputs (tests/gpu.rs, tests/host_emulation.rs).
pub const KERNEL_RTOL: f64 = 1e-5;

/// Extra relative tolerance of an output stored in `bf16` (half an ulp, `2^-9`), `f16`
/// (`2^-12`) or `f32` (none).
pub fn storage_rtol(name: &str) -> f64 {
    match name {
        "bf16" => 2f64.powi(-9),
        "f16" => 2f64.powi(-12),
        _ => 0.0,
    }
}

/// The kernels' accuracy bound: `|x - r| <= (KERNEL_RTOL + extra) * (|r| + floor)` for every element,
/// where `floor` is the output's natural scale (1 for probabilities, `|coef|` for gradients
/// `coef * (p - q)`, `1 + |L|` for losses and diagnostics): f32 arithmetic leaves an absolute
/// error of a few ulps of that scale even on entries that are themselves near zero. An output
/// stored in f16 may also be off by half its subnormal spacing, `2^-25`.
pub fn within(name: &str, got: &[f64], want: &[f64], floor: f64, extra: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{name}: {} elements, expected {}", got.len(), want.len()));
    }
    let abs = if extra == storage_rtol("f16") { 2f64.powi(-25) } else { 0.0 };
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = (KERNEL_RTOL + extra) * (w.abs() + floor) + abs;
        let err = (g - w).abs();
        if err.is_nan() || err > tol {
            return Err(format!("{name}[{i}]: kernel {g} vs reference {w} (tolerance {tol:e})"));
        }
    }
    Ok(())
}

/// Compiles a host-emulation harness (tests/host_emulation/*.cpp, which include the kernels with
/// `TPO_HOST`) once per test binary, with `CXX` or `c++`. A failed compile is remembered too, so
/// that a test and its shrinking fail at once rather than recompiling for every case.
pub fn compile_harness(name: &str) -> std::path::PathBuf {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static BUILT: Mutex<Option<HashMap<String, Result<std::path::PathBuf, String>>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let r = built.get_or_insert_with(HashMap::new).entry(name.to_string()).or_insert_with(|| compile(name));
    r.clone().unwrap_or_else(|e| panic!("{e}"))
}

fn compile(name: &str) -> Result<std::path::PathBuf, String> {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let bin = dir.join(format!("tpo-{name}"));
    let src =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/host_emulation/{name}.cpp"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = std::process::Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror"])
        // Undefined behaviour (a misaligned vector access, an overflow) aborts the harness.
        .args(["-fsanitize=undefined", "-fno-sanitize-recover=all", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run the C++ compiler {cxx}: {e}"))?;
    if !out.status.success() {
        return Err(format!("compiling {name} failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(bin)
}

/// Runs a harness with `input` on stdin and returns its whitespace-separated output.
pub fn run_harness(bin: &std::path::Path, input: &str) -> Vec<String> {
    use std::io::Write;
    let mut child = std::process::Command::new(bin)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("harness starts");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write input");
    let out = child.wait_with_output().expect("harness runs");
    assert!(out.status.success(), "harness failed");
    String::from_utf8(out.stdout).expect("utf-8").split_whitespace().map(String::from).collect()
}

/// Formats numbers for a harness's stdin (NaN and infinities as C's strtod reads them).
pub fn fmt_nums(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:e} ")).collect::<String>().replace("NaN", "nan")
}

/// Target and fit configurations the kernel suites draw from: eta, anchoring, loss form,
/// reduction, upstream scale; diagnostics on when `diagnostics` draws true.
pub fn kernel_configs(
    diagnostics: impl Strategy<Value = bool>,
) -> impl Strategy<Value = (tpo::TargetConfig, tpo::FitConfig)> {
    use tpo::{Anchor, FitConfig, LossForm, Reduction, TargetConfig};
    (
        eta(),
        any::<bool>(),
        prop_oneof![Just(LossForm::CrossEntropy), Just(LossForm::Kl)],
        prop_oneof![
            Just(Reduction::Mean),
            Just(Reduction::Sum),
            (1.0..1e4f64).prop_map(Reduction::GlobalMean)
        ],
        -3.0..3.0f64,
        diagnostics,
    )
        .prop_map(|(eta, anchored, form, reduction, grad_scale, diagnostics)| {
            (
                TargetConfig {
                    eta,
                    anchor: if anchored { Anchor::Anchored } else { Anchor::NoAnchor },
                    ..TargetConfig::default()
                },
                FitConfig { form, reduction, grad_scale, diagnostics },
            )
        })
}

/// Central differences `(f(x + h e_i) - f(x - h e_i)) / 2h` for every coordinate `i` of `x`.
pub fn central_differences(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let v = x[i];
            x[i] = v + h;
            let up = f(&x);
            x[i] = v - h;
            let dn = f(&x);
            x[i] = v;
            (up - dn) / (2.0 * h)
        })
        .collect()
}

/// A deterministic batch for the large-shape kernel tests: log-probs uniform in `[-scale, 0]`,
/// binary scores that pass with probability `pass_rate`.
pub fn seeded_batch(sizes: Vec<usize>, seed: u64, scale: f64, pass_rate: f64) -> Batch {
    let mut rng = tpo::experiments::rng::Rng::new(seed);
    let n: usize = sizes.iter().sum();
    Batch {
        sizes,
        logp_old: (0..n).map(|_| -scale * rng.uniform()).collect(),
        logp: (0..n).map(|_| -scale * rng.uniform()).collect(),
        scores: (0..n).map(|_| if rng.uniform() < pass_rate { 1.0 } else { 0.0 }).collect(),
    }
}
