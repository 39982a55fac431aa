//! The fused linear path's GEMM descriptors (src/gemm_plan.rs, used by src/cuda/linear.rs),
//! run through an emulation of cuBLAS's column-major semantics, against row-major products.

use proptest::prelude::*;
use tpo::gemm_plan::{self, emulate};

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

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9 * (1.0 + y.abs()))
}

proptest! {
    #[test]
    fn the_three_gemms_compute_the_row_major_products(
        v in 1usize..9, d in 1usize..7, n in 1usize..6,
        seed in prop::collection::vec(-1.0..1.0f64, 200),
    ) {
        let take = |off: usize, len: usize| (0..len).map(|i| seed[(off + i) % seed.len()]).collect::<Vec<f64>>();
        let h = take(0, n * d); // [n, d]
        let w = take(7, v * d); // [V, d]
        let dz = take(13, n * v); // [n, V]
        // z = h W^T  [n, V]
        let mut z = vec![f64::NAN; n * v];
        emulate(&gemm_plan::logits(v, d, n), &w, &h, 0.0, &mut z);
        prop_assert!(close(&z, &matmul(&h, &transpose(&w, v, d), n, d, v)));
        // dh = dz W  [n, d]
        let mut dh = vec![f64::NAN; n * d];
        emulate(&gemm_plan::grad_hidden(v, d, n), &w, &dz, 0.0, &mut dh);
        prop_assert!(close(&dh, &matmul(&dz, &w, n, v, d)));
        // dW += dz^T h  [V, d], accumulated over two tiles.
        let prev = take(29, v * d);
        let mut dw = prev.clone();
        emulate(&gemm_plan::grad_weight(v, d, n), &h, &dz, 1.0, &mut dw);
        let want: Vec<f64> = matmul(&transpose(&dz, n, v), &h, v, n, d).iter().zip(&prev).map(|(a, b)| a + b).collect();
        prop_assert!(close(&dw, &want));
    }
}
