//! Proof that a trainer can link tpo's CUDA backend beside candle's: this binary depends on
//! tpo (feature `cuda`) and candle-core (feature `cuda`), whose cudarc features must unify
//! (tpo's `fallback-dynamic-loading` gives way to candle's `dynamic-linking`; both take the CUDA
//! version from the toolkit). `scripts/check-candle-link.sh` builds it in CI.
//!
//! Run on a machine with a GPU, it computes one TPO target with tpo's kernels and one tensor op
//! with candle on the same device; without one, it reports both backends' errors in one line each.

use tpo::{GroupLayout, TargetConfig};

fn main() -> std::process::ExitCode {
    let layout = match GroupLayout::uniform(1, 4) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let logp_old = [-1.0f32, -2.0, -0.5, -3.0];
    let scores = [1.0f32, 0.0, 0.0, 1.0];
    let mut ok = true;
    match tpo::cpu::target(&logp_old, &scores, &layout, &TargetConfig::with_eta(1.0)) {
        Ok(q) => println!("tpo cpu target: {q:?}"),
        Err(e) => {
            eprintln!("tpo cpu: {e}");
            ok = false;
        }
    }
    match candle_core::Device::new_cuda(0) {
        Ok(dev) => match candle_core::Tensor::new(&[1.0f32, 2.0, 3.0], &dev).and_then(|t| t.sum_all()) {
            Ok(t) => println!("candle cuda: sum = {t}"),
            Err(e) => {
                eprintln!("candle cuda: {e}");
                ok = false;
            }
        },
        Err(e) => {
            eprintln!("candle cuda: no device: {e}");
            ok = false;
        }
    }
    match tpo::cuda::CudaTpo::new(0) {
        Ok(_) => println!("tpo cuda: device 0 ready"),
        Err(e) => {
            eprintln!("tpo cuda: {e}");
            ok = false;
        }
    }
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}
