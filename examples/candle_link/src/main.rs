//! Proof that a trainer can link tpo's CUDA backend beside candle's: this binary depends on
//! tpo (features `cuda` and `candle-cuda`) and candle-core (feature `cuda`), whose cudarc features
//! must unify (tpo's `fallback-dynamic-loading` gives way to candle's `dynamic-linking`; both take
//! the CUDA version from the toolkit). `scripts/check-candle-link.sh` type-checks it in CI.
//!
//! Run on a machine with a GPU, it checks `tpo::candle`'s CUDA path (tpo's kernels on candle's
//! CUDA storage and stream) against its CPU path: the group loss and the loss from logits, their
//! values, targets and gradients, in f32 and bf16, and exits nonzero on a mismatch. Without a GPU
//! it reports, one line each, why it cannot run.

use candle_core::{DType, Device, Tensor, Var};
use tpo::candle::{group_loss, loss_from_logits, GroupTarget, LossConfig, TokenBatch};
use tpo::cpu::tokens::PathConfig;
use tpo::GroupLayout;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// Largest `|a - b| / (|b| + scale)` over two tensors (as f64 on the host).
fn rel(a: &Tensor, b: &Tensor, scale: f64) -> R<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if a.len() != b.len() {
        return Err(format!("{} elements against {}", a.len(), b.len()).into());
    }
    Ok(a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (y.abs() + scale)).fold(0.0, f64::max))
}

fn check(name: &str, err: f64, tol: f64) -> bool {
    let ok = err <= tol;
    println!("{} {name}: max relative difference {err:.2e} (tolerance {tol:.0e})", if ok { "ok  " } else { "FAIL" });
    ok
}

/// tpo::candle on `dev` against the CPU path, in `dtype`.
fn compare(dev: &Device, dtype: DType) -> R<bool> {
    let tol = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
    let mut ok = true;
    // Group loss: 3 prompts with 1, 4 and 300 completions (a warp and a block group).
    let layout = GroupLayout::from_sizes(&[1, 4, 300])?;
    let n = layout.len();
    let logp: Vec<f32> = (0..n).map(|i| -5.0 - ((i * 37) % 11) as f32 * 0.4).collect();
    let scores: Vec<f32> = (0..n).map(|i| ((i * 13) % 3) as f32).collect();
    let cfg = LossConfig::default();
    let mut runs = Vec::new();
    for d in [dev, &Device::Cpu] {
        let x = Var::from_tensor(&Tensor::new(logp.as_slice(), d)?.to_dtype(dtype)?)?;
        let s = Tensor::new(scores.as_slice(), d)?;
        let out = group_loss(&x, &layout, GroupTarget::OnPolicy { scores: &s }, &cfg)?;
        let g = out.loss.backward()?.get(&x).ok_or("no gradient")?.clone();
        runs.push((out.value, out.target, g));
    }
    ok &= check(&format!("group loss value ({dtype:?})"), (runs[0].0 - runs[1].0).abs() / (runs[1].0.abs() + 1.0), tol);
    ok &= check(&format!("group loss target ({dtype:?})"), rel(&runs[0].1, &runs[1].1, 1.0)?, tol);
    ok &= check(&format!("group loss gradient ({dtype:?})"), rel(&runs[0].2, &runs[1].2, 1.0 / 3.0)?, tol);
    // From logits: 4 sequences of 3 tokens, 2 groups, V = 50.
    let (t, v) = (12usize, 50usize);
    let z: Vec<f32> = (0..t * v).map(|i| ((i * 7919) % 101) as f32 / 25.0 - 2.0).collect();
    let y: Vec<u32> = (0..t as u32).map(|i| (i * 17) % v as u32).collect();
    let m: Vec<f32> = (0..t).map(|i| if i % 3 == 0 { 0.0 } else { 1.0 }).collect();
    let (seqs, groups) = (GroupLayout::uniform(4, 3)?, GroupLayout::uniform(2, 2)?);
    let sc = [1.0f32, 0.0, 0.5, 0.2];
    let mut runs = Vec::new();
    for d in [dev, &Device::Cpu] {
        let x = Var::from_tensor(&Tensor::from_vec(z.clone(), (t, v), d)?.to_dtype(dtype)?)?;
        let (yt, mt, st) = (Tensor::new(y.as_slice(), d)?, Tensor::new(m.as_slice(), d)?, Tensor::new(&sc, d)?);
        let batch = TokenBatch { tokens: &yt, seqs: &seqs, mask: &mt, groups: &groups };
        let out = loss_from_logits(&x, &batch, GroupTarget::OnPolicy { scores: &st }, &PathConfig::default())?;
        let g = out.loss.backward()?.get(&x).ok_or("no gradient")?.clone();
        runs.push((out.value, out.seq_logp, g));
    }
    ok &= check(&format!("logits loss value ({dtype:?})"), (runs[0].0 - runs[1].0).abs() / (runs[1].0.abs() + 1.0), tol);
    ok &= check(&format!("logits seq_logp ({dtype:?})"), rel(&runs[0].1, &runs[1].1, 1.0)?, tol);
    ok &= check(&format!("logits gradient ({dtype:?})"), rel(&runs[0].2, &runs[1].2, 0.5)?, tol);
    Ok(ok)
}

fn main() -> std::process::ExitCode {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("candle cuda: no device: {}", e.to_string().lines().next().unwrap_or(""));
            if let Err(e) = tpo::cuda::CudaTpo::new(0) {
                eprintln!("tpo cuda: {e}");
            }
            return std::process::ExitCode::from(1);
        }
    };
    let mut ok = true;
    for dtype in [DType::F32, DType::BF16] {
        match compare(&dev, dtype) {
            Ok(o) => ok &= o,
            Err(e) => {
                eprintln!("FAIL {dtype:?}: {e}");
                ok = false;
            }
        }
    }
    if ok {
        println!("tpo::candle on CUDA matches the CPU path");
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}
