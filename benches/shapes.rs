//! Shapes and inputs shared by the benchmarks (`benches/*.rs`, `examples/gpu_bench.rs`).
#![allow(dead_code)]

use tpo::experiments::rng::Rng;
use tpo::GroupLayout;

/// (label, groups B, group size K): the shapes plus a large-K case.
pub const SHAPES: [(&str, usize, usize); 5] = [
    ("64x8", 64, 8),
    ("1024x16", 1024, 16),
    ("16384x16", 16384, 16),
    ("262144x64", 262_144, 64),
    ("8x100000", 8, 100_000),
];

/// Sequence-level log-probs (sums over ~100 tokens), a slightly moved policy, binary scores.
pub struct Inputs {
    pub layout: GroupLayout,
    pub logp: Vec<f32>,
    pub logp_old: Vec<f32>,
    pub scores: Vec<f32>,
}

pub fn inputs(b: usize, k: usize, seed: u64) -> Inputs {
    let mut rng = Rng::new(seed);
    let n = b * k;
    let logp_old: Vec<f32> = (0..n).map(|_| (-200.0 * rng.uniform() - 20.0) as f32).collect();
    let logp = logp_old.iter().map(|&x| x + (0.1 * (rng.uniform() - 0.5)) as f32).collect();
    let scores = (0..n).map(|_| if rng.uniform() < 0.4 { 1.0 } else { 0.0 }).collect();
    Inputs { layout: GroupLayout::uniform(b, k).expect("valid shape"), logp, logp_old, scores }
}
