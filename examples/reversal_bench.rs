//! Per-step wall time of `tpo reproduce reversal`'s trainer, one seed, per method: the side of
//! BENCHMARKS.md's comparison with the authors' JAX code that runs here.
//!
//! `cargo run --release --example reversal_bench -- [STEPS] [WARMUP] [METHOD|all] [autograd]`
//! (default 10 timed steps after 2 untimed ones, every method; `autograd`: through candle's
//! autograd instead of the transformer's hand-written backward, for comparison). Prints the median
//! and mean seconds per step for the dense task (H = 10, V = 2: tpo_token, grpo_token, ppo, dg) and
//! the terminal task (H = 7, V = 2: tpo, grpo).

use std::time::Instant;

/// The `tpo` binary's allocator (src/main.rs): candle allocates a fresh buffer per tensor op, and
/// glibc's malloc hands large ones back to the kernel at every free.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tpo::experiments::reversal::{Method, ReversalConfig, Reward, Trainer};

fn main() -> Result<(), String> {
    // As `tpo reproduce reversal` runs one job: candle's element-wise pool off (its spin barriers
    // cost more than they save on small tensors), the matrix products on the cores asked for.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // The matrix products' threads, set as `tpo reproduce reversal` sets them for one job (every
    // core): unset, candle reads /proc/cpuinfo at every matrix product to count the cores.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().map_or(Ok(10), |s| s.parse()).map_err(|_| "STEPS: a whole number")?;
    let warmup: usize = args.next().map_or(Ok(2), |s| s.parse()).map_err(|_| "WARMUP: a whole number")?;
    if steps == 0 {
        return Err("STEPS: at least 1".into());
    }
    let only: Option<String> = args.next().filter(|m| m != "all");
    let autograd = match args.next().as_deref() {
        None => false,
        Some("autograd") => true,
        Some(x) => return Err(format!("the fourth argument is `autograd` or nothing, got {x}")),
    };
    let cases = [
        (Reward::Bag, 10, Method::TpoToken),
        (Reward::Bag, 10, Method::GrpoToken),
        (Reward::Bag, 10, Method::Ppo),
        (Reward::Bag, 10, Method::Dg),
        (Reward::Terminal, 7, Method::Tpo),
        (Reward::Terminal, 7, Method::Grpo),
    ];
    println!("method       task            median s/step   mean s/step   ({steps} steps after {warmup})");
    for (reward, h, m) in cases {
        if only.as_deref().is_some_and(|o| o != m.name()) {
            continue;
        }
        let cfg = ReversalConfig::paper(reward, 2, h, warmup + steps);
        let mut tr = Trainer::new(&cfg, m, 0)?;
        tr.set_candle_autograd(autograd);
        for _ in 0..warmup {
            tr.step()?;
        }
        let mut times = Vec::with_capacity(steps);
        for _ in 0..steps {
            let t = Instant::now();
            tr.step()?;
            times.push(t.elapsed().as_secs_f64());
        }
        let mean = times.iter().sum::<f64>() / steps as f64;
        times.sort_by(f64::total_cmp);
        let med = times[steps / 2];
        let task = format!("{:?} H={h} V=2", reward).to_lowercase();
        println!("{:<12} {:<15} {:>14.4} {:>13.4}", m.name(), task, med, mean);
    }
    Ok(())
}
