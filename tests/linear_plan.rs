//! The fused linear path's schedule (src/linear_plan.rs, which src/cuda/linear.rs executes step
//! by step), checked without a GPU:
//! * its three GEMM descriptors, through an emulation of cuBLAS's column-major semantics, against
//!   row-major products;
//! * the whole schedule, run on host buffers (GEMMs emulated in f64, the token kernels' math in
//!   f64), against the f64 reference `tpo_from_hidden`, for the block sizes `LinearPlan::new`
//!   picks and for arbitrary ones: this covers the chunk and block loops, the tail staging, every
//!   operand offset and leading dimension, and when `dW` and `dh` accumulate;
//! * the block sizes `LinearPlan::new` picks at LLM scale.

use proptest::prelude::*;
use tpo::cpu::tokens::{self, group_path, PathConfig, SeqReduce, SequenceBatch, TargetSource, TokenConfig};
use tpo::experiments::rng::Rng;
use tpo::linear_plan::{self as plan, emulate, Buffer, LinearPlan, Step, GEMM_TILE, MIN_BLOCK_COLS};
use tpo::GroupLayout;

/// Row-major `[r, c]` matrix product `x [r, k] * y [k, c]`.
fn matmul(x: &[f64], y: &[f64], r: usize, k: usize, c: usize) -> Vec<f64> {
    let mut out = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            out[i * c + j] = (0..k).map(|p| x[i * k + p] * y[p * c + j]).sum();
        }
    }
    out
}

fn transpose(x: &[f64], r: usize, c: usize) -> Vec<f64> {
    let mut t = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = x[i * c + j];
        }
    }
    t
}

/// `[r, c]` rows copied into a buffer with row stride `ld`, the padding NaN.
fn strided(x: &[f64], r: usize, c: usize, ld: usize) -> Vec<f64> {
    let mut out = vec![f64::NAN; (r - 1) * ld + c];
    for i in 0..r {
        out[i * ld..i * ld + c].copy_from_slice(&x[i * c..(i + 1) * c]);
    }
    out
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

proptest! {
    #[test]
    fn the_three_gemms_compute_the_row_major_products(
        v in 1usize..9, d in 1usize..7, n in 1usize..6, pad in 0usize..3,
        seed in prop::collection::vec(-1.0..1.0f64, 200),
    ) {
        let take = |off: usize, len: usize| (0..len).map(|i| seed[(off + i) % seed.len()]).collect::<Vec<f64>>();
        let ld = v + pad; // the logits' row stride (a backward block's is its width or more)
        let h = take(0, n * d); // [n, d]
        let w = take(7, v * d); // [V, d]
        let dz = take(13, n * v); // [n, V]
        // z = h W^T  [n, V], rows ld apart
        let g = plan::logits(v, d, n, ld);
        let mut z = vec![f64::NAN; g.extents()[2]];
        emulate(&g, &w, &h, 0.0, &mut z);
        let want = strided(&matmul(&h, &transpose(&w, v, d), n, d, v), n, v, ld);
        prop_assert!(z.iter().zip(&want).all(|(a, b)| (a.is_nan() && b.is_nan()) || (a - b).abs() < 1e-9 * (1.0 + b.abs())));
        // dh = dz W  [n, d], dz rows ld apart
        let g = plan::grad_hidden(v, d, n, ld);
        let mut dh = vec![f64::NAN; n * d];
        emulate(&g, &w, &strided(&dz, n, v, ld), 0.0, &mut dh);
        prop_assert!(close(&dh, &matmul(&dz, &w, n, v, d), 1e-9));
        // dW += dz^T h  [V, d], on top of a previous tile's.
        let prev = take(29, v * d);
        let mut dw = prev.clone();
        emulate(&plan::grad_weight(v, d, n, ld), &h, &strided(&dz, n, v, ld), 1.0, &mut dw);
        let want: Vec<f64> = matmul(&transpose(&dz, n, v), &h, v, n, d).iter().zip(&prev).map(|(a, b)| a + b).collect();
        prop_assert!(close(&dw, &want, 1e-9));
    }
}

/// A batch for the fused path: `h [T, d]`, `W [V, d]`, ragged sequences in groups.
#[derive(Debug, Clone)]
struct Case {
    vocab: usize,
    dim: usize,
    hidden: Vec<f64>,
    weight: Vec<f64>,
    tokens: Vec<u32>,
    seq_lens: Vec<usize>,
    group_sizes: Vec<usize>,
    mask: Vec<bool>,
    scores: Vec<f64>,
    logp_old: Vec<f64>,
}

fn case(max_tokens_per_seq: usize) -> impl Strategy<Value = Case> {
    (prop_oneof![1usize..5, 60usize..300], 1usize..5, prop::collection::vec(1usize..=4, 1..=24), any::<u64>())
        .prop_map(move |(vocab, dim, group_sizes, seed)| {
            let mut rng = Rng::new(seed);
            let nseq: usize = group_sizes.iter().sum();
            let seq_lens: Vec<usize> =
                (0..nseq).map(|_| 1 + (rng.uniform() * max_tokens_per_seq as f64) as usize).collect();
            let t: usize = seq_lens.iter().sum();
            let mut u = |a: f64| a * (2.0 * rng.uniform() - 1.0);
            let hidden = (0..t * dim).map(|_| u(1.0)).collect();
            let weight = (0..vocab * dim).map(|_| u(2.0)).collect();
            let tokens = (0..t).map(|_| ((u(1.0) + 1.0) * vocab as f64) as u32 % vocab as u32).collect();
            let mask = (0..t).map(|_| u(1.0) > -0.6).collect();
            let scores = (0..nseq).map(|_| if u(1.0) > 0.0 { 1.0 } else { u(2.0) }).collect();
            let logp_old = (0..nseq).map(|_| -20.0 + u(10.0)).collect();
            Case { vocab, dim, hidden, weight, tokens, seq_lens, group_sizes, mask, scores, logp_old }
        })
}

/// What running a schedule on the host produced.
struct Outputs {
    logp: Vec<f64>,
    loss: f64,
    grad_hidden: Vec<f64>,
    grad_weight: Vec<f64>,
}

/// Runs `plan`'s steps on host buffers: GEMMs through `emulate` (in bounds, checked by
/// `LinearPlan::check_gemm` and by slicing), the token kernels' math in f64. Checks on the way
/// that every forward logits GEMM has exactly `GEMM_TILE` rows, that each token is reduced once
/// and each logits element turned into its gradient once. Outputs start as NaN, so an element
/// never written, or accumulated onto before it was written, shows.
fn run(p: &LinearPlan, c: &Case, batch: &SequenceBatch, source: TargetSource, cfg: &PathConfig) -> Outputs {
    let (t, v, d) = (p.tokens, p.vocab, p.dim);
    let workspace = p.workspace_needed();
    let tau = cfg.tokens.temperature;
    let mut bufs: Vec<Vec<f64>> = [Buffer::Hidden, Buffer::Weight, Buffer::Stage, Buffer::Workspace]
        .iter()
        .map(|&b| vec![f64::NAN; p.buffer_len(b, workspace)])
        .collect();
    bufs[0] = c.hidden.clone();
    bufs[1] = c.weight.clone();
    bufs.push(vec![f64::NAN; t * d]); // GradHidden
    bufs.push(vec![f64::NAN; v * d]); // GradWeight
    let index = |b: Buffer| match b {
        Buffer::Hidden => 0,
        Buffer::Weight => 1,
        Buffer::Stage => 2,
        Buffer::Workspace => 3,
        Buffer::GradHidden => 4,
        Buffer::GradWeight => 5,
    };
    let (mut logp, mut row_max, mut log_sum) = (vec![f64::NAN; t], vec![f64::NAN; t], vec![f64::NAN; t]);
    let (mut reduced, mut turned) = (vec![0u32; t], vec![0u32; t * v]);
    let mut group = None;
    for step in p.steps() {
        match step {
            Step::StageTail { tok0, rows } => {
                assert!(rows < GEMM_TILE);
                let src = bufs[0][tok0 * d..(tok0 + rows) * d].to_vec();
                bufs[2].fill(0.0);
                bufs[2][..rows * d].copy_from_slice(&src);
            }
            Step::Gemm(g) => {
                p.check_gemm(&g, workspace).unwrap();
                if group.is_none() {
                    assert_eq!((g.c.buffer, g.desc.n), (Buffer::Workspace, GEMM_TILE), "forward GEMM {g:?}");
                }
                let [ea, eb, ec] = g.desc.extents();
                let a = bufs[index(g.a.buffer)][g.a.offset..g.a.offset + ea].to_vec();
                let b = bufs[index(g.b.buffer)][g.b.offset..g.b.offset + eb].to_vec();
                let beta = if g.accumulate { 1.0 } else { 0.0 };
                emulate(&g.desc, &a, &b, beta, &mut bufs[index(g.c.buffer)][g.c.offset..g.c.offset + ec]);
            }
            Step::TokenForward { tok0, rows } => {
                for r in 0..rows {
                    let z = &bufs[3][r * v..(r + 1) * v];
                    let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                    let ls = z.iter().map(|&x| ((x - m) / tau).exp()).sum::<f64>().ln();
                    let tk = tok0 + r;
                    logp[tk] = (z[c.tokens[tk] as usize] - m) / tau - ls;
                    (row_max[tk], log_sum[tk]) = (m, ls);
                    reduced[tk] += 1;
                }
            }
            Step::Group => {
                assert!(reduced.iter().all(|&n| n == 1), "each token reduced once: {reduced:?}");
                group = Some(group_path(&logp, batch, source, cfg).unwrap());
                bufs[3].fill(f64::NAN); // the backward must not rely on the forward's logits
            }
            Step::TokenBackward { tok0, rows, col0, cols, ld } => {
                let g = &group.as_ref().expect("backward before the group step").token_grad;
                for r in 0..rows {
                    let tk = tok0 + r;
                    for j in 0..cols {
                        let z = &mut bufs[3][r * ld + j];
                        let pv = ((*z - row_max[tk]) / tau - log_sum[tk]).exp();
                        let onehot = if col0 + j == c.tokens[tk] as usize { 1.0 } else { 0.0 };
                        *z = g[tk] * (onehot - pv) / tau;
                        turned[tk * v + col0 + j] += 1;
                    }
                }
            }
        }
    }
    assert!(turned.iter().all(|&n| n == 1), "each logit turned into its gradient once");
    let grad_weight = bufs.pop().unwrap();
    let grad_hidden = bufs.pop().unwrap();
    Outputs { logp, loss: group.expect("no group step").fit.loss, grad_hidden, grad_weight }
}

fn check_against_reference(
    p: &LinearPlan,
    c: &Case,
    tau: f64,
    mean: bool,
    stored: bool,
) -> Result<(), TestCaseError> {
    let seqs = GroupLayout::from_sizes(&c.seq_lens).unwrap();
    let groups = GroupLayout::from_sizes(&c.group_sizes).unwrap();
    let batch = SequenceBatch { tokens: &c.tokens, seqs: &seqs, mask: &c.mask, groups: &groups };
    let reduce = if mean { SeqReduce::Mean } else { SeqReduce::Sum };
    let cfg = PathConfig {
        tokens: TokenConfig { temperature: tau, entropy: false, reduce },
        ..PathConfig::default()
    };
    let q = tpo::cpu::target(&c.logp_old, &c.scores, &groups, &cfg.target).unwrap();
    let source = if stored {
        TargetSource::Stored { target: &q }
    } else {
        TargetSource::Rollout { logp_old: &c.logp_old, scores: &c.scores }
    };
    let want = tokens::tpo_from_hidden(&c.hidden, &c.weight, c.dim, &batch, source, &cfg).unwrap();
    let got = run(p, c, &batch, source, &cfg);
    prop_assert!(close(&got.logp, &want.logits_path.tokens.logp, 1e-10), "logp");
    prop_assert!(
        (got.loss - want.logits_path.fit.loss).abs() <= 1e-10 * (1.0 + want.logits_path.fit.loss.abs())
    );
    prop_assert!(close(&got.grad_hidden, &want.grad_hidden, 1e-10), "grad_hidden");
    prop_assert!(close(&got.grad_weight, &want.grad_weight, 1e-10), "grad_weight");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The blocks `LinearPlan::new` picks from a budget of one to three forward tiles.
    #[test]
    fn the_schedule_computes_the_reference_path(
        c in case(24), tiles in 1usize..=3, tau in prop_oneof![Just(1.0), 0.5..2.0f64],
        mean in any::<bool>(), stored in any::<bool>(),
    ) {
        let t = c.tokens.len();
        let budget = tiles * GEMM_TILE * c.vocab * 2;
        let ws = LinearPlan::workspace_elems(c.vocab, budget);
        let p = LinearPlan::new(t, c.vocab, c.dim, ws).unwrap();
        prop_assert!(p.workspace_needed() <= ws);
        check_against_reference(&p, &c, tau, mean, stored)?;
    }

    /// Any blocks: several forward chunks, partial tiles, token and vocabulary blocks of every
    /// size, so that both `dW` and `dh` accumulate.
    #[test]
    fn any_blocks_compute_the_reference_path(
        c in case(12), fwd_tiles in 1usize..=3, rows_frac in 0.0..1.0f64, cols_frac in 0.0..1.0f64,
        mean in any::<bool>(),
    ) {
        let t = c.tokens.len();
        let rows = 1 + (rows_frac * t as f64) as usize % t;
        let cols = 1 + (cols_frac * c.vocab as f64) as usize % c.vocab;
        let p = LinearPlan::with_blocks(t, c.vocab, c.dim, fwd_tiles * GEMM_TILE, rows, cols).unwrap();
        check_against_reference(&p, &c, 1.0, mean, false)?;
    }

    /// At LLM scale, the blocks fit the workspace, use every token at once when that leaves
    /// vocabulary blocks of at least MIN_BLOCK_COLS, and the forward chunk is whole tiles.
    #[test]
    fn blocks_fit_the_workspace_at_scale(
        t in 1usize..200_000, v in prop_oneof![Just(151_936usize), 1usize..300_000],
        budget_mb in prop_oneof![Just(0usize), 1usize..20_000],
    ) {
        let ws = LinearPlan::workspace_elems(v, budget_mb << 20);
        prop_assert!(ws >= GEMM_TILE * v && (ws <= (budget_mb << 20) / 2 || ws == GEMM_TILE * v));
        let p = LinearPlan::new(t, v, 4096, ws).unwrap();
        prop_assert!(p.workspace_needed() <= ws);
        prop_assert!(p.forward_rows.is_multiple_of(GEMM_TILE) && p.forward_rows >= GEMM_TILE);
        prop_assert!(p.forward_rows < t + GEMM_TILE);
        if ws / t >= v.min(MIN_BLOCK_COLS) {
            prop_assert_eq!(p.backward_rows, t);
        }
        if p.backward_cols < v {
            prop_assert_eq!(p.backward_cols % plan::VOCAB_ALIGN, 0);
        }
    }
}

#[test]
fn the_benchmark_shape_gets_one_token_block() {
    // T = 16384, V = 151936 with 5% of the logits as budget: 6 forward tiles (the workspace),
    // all tokens at once in the backward, vocabulary blocks of 7104 (21 full ones and a narrower
    // last one).
    let (t, v) = (16_384, 151_936);
    let ws = LinearPlan::workspace_elems(v, t * v * 2 / 20);
    let p = LinearPlan::new(t, v, 4096, ws).unwrap();
    assert_eq!((p.forward_rows, p.backward_rows, p.backward_cols), (768, t, 7104));
    let steps = p.steps();
    let gemms = steps.iter().filter(|s| matches!(s, Step::Gemm(_))).count();
    assert_eq!(gemms, 128 + 22 * 3);
    // dW is written once per block (no accumulation), dh accumulated over the vocabulary blocks.
    for s in &steps {
        if let Step::Gemm(g) = s {
            if g.c.buffer == Buffer::GradWeight {
                assert!(!g.accumulate);
            }
        }
    }
}

#[test]
fn bad_plans_are_errors() {
    let msg = |r: tpo::Result<LinearPlan>| r.unwrap_err().to_string();
    assert_eq!(msg(LinearPlan::new(0, 10, 4, 1 << 20)), "tokens must be at least 1, got 0");
    assert!(msg(LinearPlan::new(5, 10, 4, 10)).starts_with("fused linear workspace (elements) must be"));
    assert!(msg(LinearPlan::with_blocks(5, 10, 4, 100, 5, 10)).starts_with("forward rows must be"));
    assert!(msg(LinearPlan::with_blocks(5, 10, 4, 128, 6, 10)).starts_with("backward rows must be"));
    assert!(msg(LinearPlan::with_blocks(5, 10, 4, 128, 5, 11)).starts_with("backward columns must be"));
    // A GEMM reaching past its buffer is an error, not a stray write.
    let p = LinearPlan::with_blocks(5, 10, 4, 128, 5, 10).unwrap();
    let mut g = match p.steps()[p.steps().len() - 1] {
        Step::Gemm(g) => g,
        s => panic!("{s:?}"),
    };
    g.c.offset += 1;
    assert!(p.check_gemm(&g, p.workspace_needed()).unwrap_err().to_string().contains("GradHidden"));
}
