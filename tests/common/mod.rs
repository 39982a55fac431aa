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

pub fn eta() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1.0), 0.05..20.0f64]
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
