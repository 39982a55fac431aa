//! The token kernels' per-row and per-sequence code (kernels/tokens.cu), compiled for the host
//! and run one lane at a time, against the f64 reference (src/cpu/tokens.rs). The block-level
//! reductions are covered by the GPU suite.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::path::PathBuf;
use std::sync::OnceLock;
use tpo::cpu::tokens::*;
use tpo::status::decode_status;
use tpo::{bf16, f16, GroupLayout};

fn harness() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| compile_harness("tokens"))
}

fn nums(words: &[String]) -> Vec<f64> {
    words.iter().map(|w| w.parse().unwrap()).collect()
}

fn round(t: u8, v: &[f64]) -> Vec<f64> {
    match t {
        1 => v.iter().map(|&x| bf16::from_f64(x).to_f64()).collect(),
        2 => v.iter().map(|&x| f16::from_f64(x).to_f64()).collect(),
        _ => v.iter().map(|&x| (x as f32) as f64).collect(),
    }
}

/// (status, logp, lse, entropy, row_max ++ log_sum) from the emulated forward kernel.
#[allow(clippy::type_complexity)]
fn forward(
    t: u8,
    logits: &[f64],
    vocab: usize,
    tokens: &[u32],
    tau: f64,
) -> (u64, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let rows = tokens.len();
    let tok: Vec<f64> = tokens.iter().map(|&y| f64::from(y)).collect();
    let input = format!("0 {t} {rows} {vocab} {:e}\n{}\n{}", 1.0 / tau, fmt_nums(logits), fmt_nums(&tok));
    let w = run_harness(harness(), &input);
    let status = w[0].parse().unwrap();
    let v = nums(&w[1..]);
    (
        status,
        v[..rows].to_vec(),
        v[rows..2 * rows].to_vec(),
        v[2 * rows..3 * rows].to_vec(),
        v[3 * rows..].to_vec(),
    )
}

fn check(name: &str, got: &[f64], want: &[f64], floor: f64, extra: f64) -> Result<(), TestCaseError> {
    within(name, got, want, floor, extra).map_err(TestCaseError::fail)
}

proptest! {
    // Each case runs the harness a few times: cap the shrinking so a failure reports in seconds.
    #![proptest_config(ProptestConfig { max_shrink_iters: 256, ..ProptestConfig::with_cases(64) })]

    #[test]
    fn forward_and_backward_match_reference(
        vocab in prop_oneof![1usize..20, 100usize..400],
        rows in 1usize..6,
        seed in prop::collection::vec(-1.0..1.0f64, 2400),
        scale in prop_oneof![Just(1.0f64), Just(30.0), Just(3000.0)],
        tau in prop_oneof![Just(1.0), 0.3..2.0f64],
        t in 0u8..3,
        masked in any::<bool>(),
        g in prop::collection::vec(-3.0..3.0f64, 6),
        split in 0.0..1.0f64,
    ) {
        let n = rows * vocab;
        let scale = if t == 2 { scale.min(30.0) } else { scale }; // f16 holds at most 65504
        let mut logits: Vec<f64> = (0..n).map(|i| seed[i % seed.len()] * scale + (i / seed.len()) as f64).collect();
        let tokens: Vec<u32> = (0..rows).map(|r| ((r * 7919 + 3) % vocab) as u32).collect();
        if masked && vocab > 1 {
            for r in 0..rows {
                let v = (tokens[r] as usize + 1) % vocab; // mask a vocabulary entry other than the token
                logits[r * vocab + v] = f64::NEG_INFINITY;
            }
        }
        let logits = round(t, &logits);
        let cfg = TokenConfig { temperature: tau, entropy: true, reduce: SeqReduce::Sum };
        let want = token_logprobs(&logits, vocab, &tokens, &cfg).unwrap();
        let (status, logp, lse, ent, shift) = forward(t, &logits, vocab, &tokens, tau);
        prop_assert_eq!(status, 0);
        check("logp", &logp, &want.logp, 1.0, 0.0)?;
        check("lse", &lse, &want.lse, 1.0, 0.0)?;
        check("entropy", &ent, want.entropy.as_ref().unwrap(), 1.0, 0.0)?;
        // Backward with a non-uniform upstream gradient, on the kernel's own lse.
        let g = &g[..rows];
        let tok: Vec<f64> = tokens.iter().map(|&y| f64::from(y)).collect();
        let input = format!("1 {t} {rows} {vocab} {:e}\n{}\n{}\n{}\n{}", 1.0 / tau, fmt_nums(&logits), fmt_nums(&tok), fmt_nums(&shift), fmt_nums(g));
        let d = nums(&run_harness(harness(), &input));
        let want_d = logits_grad(&logits, vocab, &tokens, g, &cfg).unwrap();
        // dz = g (onehot - p) / tau: natural scale max|g| / tau, plus the output's storage rounding.
        let gmax = g.iter().fold(0.0f64, |m, x| m.max(x.abs())) / tau;
        check("grad", &d, &want_d, gmax, storage_rtol(["f32", "bf16", "f16"][t as usize]))?;
        // The same backward over two vocabulary blocks, each in a buffer of its own with a padded
        // row stride (as the fused linear path runs it): the same values, no padding written.
        let split = ((split * vocab as f64) as usize).max(1);
        for (c0, cols) in [(0, split), (split, vocab - split)] {
            if cols == 0 {
                continue;
            }
            let input = format!("4 {t} {rows} {vocab} {:e} {c0} {cols}\n{}\n{}\n{}\n{}", 1.0 / tau, fmt_nums(&logits), fmt_nums(&tok), fmt_nums(&shift), fmt_nums(g));
            let w = nums(&run_harness(harness(), &input));
            prop_assert_eq!(w[0], 0.0, "padding written");
            for r in 0..rows {
                for v in 0..cols {
                    prop_assert_eq!(w[1 + r * cols + v], d[r * vocab + c0 + v], "row {} column {}", r, c0 + v);
                }
            }
        }
    }

    #[test]
    fn sequence_sums_and_broadcast_match_reference(
        lens in prop_oneof![
            prop::collection::vec(1usize..9, 1..8),
            (1usize..9, 1usize..8).prop_map(|(k, n)| vec![k; n]),
        ],
        mask_seed in prop::collection::vec(prop::bool::weighted(0.6), 64),
        vals in prop::collection::vec(-50.0..0.0f64, 64),
        mean in any::<bool>(),
    ) {
        let seqs = GroupLayout::from_sizes(&lens).unwrap();
        let n = seqs.len();
        let mask = &mask_seed[..n];
        let tl = round(0, &vals[..n]);
        let reduce = if mean { SeqReduce::Mean } else { SeqReduce::Sum };
        let offs: Vec<f64> = seqs.offsets().iter().map(|&o| o as f64).collect();
        let m: Vec<f64> = mask.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
        let uniform = lens.iter().all(|&l| l == lens[0]);
        let head = format!("{} {} {}\n{}\n{}\n", lens.len(), u8::from(mean), u8::from(uniform), fmt_nums(&offs), fmt_nums(&m));
        let got = nums(&run_harness(harness(), &format!("2 {head}{}", fmt_nums(&tl))));
        let want = sequence_logprobs(&tl, &seqs, mask, reduce).unwrap();
        check("seq", &got, &want, 1.0 + want.iter().fold(0.0f64, |a, x| a.max(x.abs())), 0.0)?;
        let sg = round(0, &vals[..lens.len()]);
        let got = nums(&run_harness(harness(), &format!("3 {head}{}", fmt_nums(&sg))));
        let want = token_grad_from_sequences(&sg, &seqs, mask, reduce).unwrap();
        check("broadcast", &got, &want, 1.0, 0.0)?;
    }
}

#[test]
fn error_words() {
    let layout = GroupLayout::uniform(2, 3).unwrap(); // rows of a [2, 3] logits tensor
    let (s, logp, ..) = forward(0, &[0.0, f64::NAN, 1.0, 0.0, 0.0, 0.0], 3, &[0, 1], 1.0);
    assert!(logp[0].is_nan() && !logp[1].is_nan());
    assert_eq!(
        decode_status(s, &layout).unwrap_err().to_string(),
        "logits[1] is NaN or +inf: logits must be finite, or -inf to mask a vocabulary entry"
    );
    let (s, ..) = forward(0, &[0.0, 1.0, 2.0, 0.0, f64::NEG_INFINITY, 0.0], 3, &[0, 1], 1.0);
    assert_eq!(
        decode_status(s, &layout).unwrap_err().to_string(),
        "logits[4] is -inf at a sampled token: its log-prob would be -inf"
    );
    let (s, ..) = forward(0, &[0.0, 1.0, 2.0, 0.0, 0.0, 0.0], 3, &[0, 7], 1.0);
    assert_eq!(decode_status(s, &layout).unwrap_err().to_string(), "tokens[1] is outside the vocabulary");
}
