//! The rate of candle's CPU matrix products at the reversal transformer's shapes, and the least
//! time each method's training step spends in them at that rate: a floor under the step time of
//! any implementation whose matrix products are no faster than candle's (BENCHMARKS.md compares
//! it with a third of the JAX step time).
//!
//! `cargo run --release --example matmul_rate -- [REPS]` (default 100) on `RAYON_NUM_THREADS`
//! threads (default: all cores, as one job of `tpo reproduce reversal`).
//!
//! Per position, each layer multiplies `[T, 64]` by q, k, v, o (`[64, 64]`) and the FFN's
//! `[64, 256]` and `[256, 64]`: `2 x 49152` flops forward, twice that backward
//! (`dX = dY W^T`, `dW = X^T dY`); two layers; the head (`V = 2` outputs) and the attention's
//! products (`<= 2 x 19` keys per query) are left out, so the floor is an underestimate. The
//! forward positions of a step: the dense task (`B = 100`, `H = 10`) runs `B (2H - 1) = 1900`
//! positions per forward (prompt, then the answer from the key/value cache), once for the rollout
//! and once per epoch (4 epochs; DG 1), each epoch followed by its backward; the terminal task
//! (`H = 7`, `K = 8` rollouts per prompt for TPO and GRPO) runs the prompt once per prompt and
//! the answer for each rollout: `100 x 7 + 800 x 6 = 5500` positions.

use std::time::Instant;

use candle_core::{Device, Tensor};

/// Seconds per call of `f`, the mean over `reps` calls after one untimed call.
fn time(reps: usize, f: &dyn Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    f()?;
    let s = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(s.elapsed().as_secs_f64() / reps as f64)
}

/// Seconds of one forward and of one backward of the two layers' products at `t` positions.
fn layer_seconds(t: usize, reps: usize) -> candle_core::Result<(f64, f64)> {
    let dev = Device::Cpu;
    let (d, f) = (64usize, 256usize);
    let shapes = [(d, d), (d, d), (d, d), (d, d), (d, f), (f, d)];
    let (mut fwd, mut bwd) = (0.0, 0.0);
    for &(i, o) in &shapes {
        let x = Tensor::randn(0f32, 1.0, (t, i), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (i, o), &dev)?;
        let dy = Tensor::randn(0f32, 1.0, (t, o), &dev)?;
        fwd += time(reps, &|| x.matmul(&w))?;
        bwd += time(reps, &|| dy.matmul(&w.t()?))? + time(reps, &|| x.t()?.matmul(&dy))?;
    }
    Ok((2.0 * fwd, 2.0 * bwd))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let reps: usize = std::env::args().nth(1).map_or(Ok(100), |s| s.parse())?;
    let flops_per_position = 2.0 * 2.0 * 49152.0; // two layers, forward
    println!("threads {}", std::env::var("RAYON_NUM_THREADS")?);
    println!(
        "{:<36} {:>5} {:>4} {:>4} {:>10} {:>8} {:>12}",
        "method (task)", "positions", "fwd", "bwd", "GFLOP/step", "GFLOP/s", "floor s/step"
    );
    let tasks: [(&str, usize, f64, f64); 3] = [
        ("tpo_token, grpo_token, ppo (dense)", 1900, 5.0, 4.0),
        ("dg (dense)", 1900, 2.0, 1.0),
        ("tpo, grpo (terminal H=7)", 5500, 5.0, 4.0),
    ];
    for (name, t, nf, nb) in tasks {
        let (sf, sb) = layer_seconds(t, reps)?;
        let flops = t as f64 * flops_per_position * (nf + 2.0 * nb);
        let secs = nf * sf + nb * sb;
        println!(
            "{name:<36} {t:>5} {nf:>4} {nb:>4} {:>10.2} {:>8.1} {:>12.4}",
            flops / 1e9,
            flops / secs / 1e9,
            secs
        );
    }
    Ok(())
}
