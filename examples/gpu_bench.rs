//! Times the fused CUDA kernel on the benchmark shapes and measures the device's copy bandwidth in
//! the same run, then the from-logits path at an LLM RL step's shape; writes one JSON object per line (for scripts/bench_table.py) and prints a table.
//!
//! `cargo run --release --features cuda --example gpu_bench -- [OUT.jsonl]`
//!
//! Method: inputs uploaded once (rotating among 4 input sets when a set fits in L2), 50 warm-up
//! calls, then 30 batches of back-to-back calls timed with CUDA events; the per-call time is the
//! median over batches. Copy bandwidth: a 1 GiB device-to-device copy, bytes read + written over
//! the median of 20 copies.

#[path = "../benches/shapes.rs"]
mod shapes;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use std::io::Write;
use tpo::cuda::{fused_bytes, CudaTpo, DeviceFloat, DeviceLayout};
use tpo::{bf16, FitConfig, TargetConfig};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds per call of `f`, from `batches` event-timed batches of `per_batch` calls.
fn time(tpo: &CudaTpo, batches: usize, per_batch: usize, mut f: impl FnMut(usize)) -> tpo::Result<f64> {
    let ctx = tpo.stream().context().clone();
    let ev = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| tpo::TpoError::Cuda(format!("{e:?}")))
    };
    let mut per_call = Vec::with_capacity(batches);
    let mut i = 0;
    for _ in 0..batches {
        let (start, end) = (ev()?, ev()?);
        start.record(tpo.stream()).map_err(|e| tpo::TpoError::Cuda(format!("{e:?}")))?;
        for _ in 0..per_batch {
            f(i);
            i += 1;
        }
        end.record(tpo.stream()).map_err(|e| tpo::TpoError::Cuda(format!("{e:?}")))?;
        end.synchronize().map_err(|e| tpo::TpoError::Cuda(format!("{e:?}")))?;
        let ms = start.elapsed_ms(&end).map_err(|e| tpo::TpoError::Cuda(format!("{e:?}")))?;
        per_call.push(f64::from(ms) / per_batch as f64);
    }
    Ok(median(per_call))
}

struct Set<T: DeviceFloat> {
    l: CudaSlice<T>,
    lo: CudaSlice<T>,
    s: CudaSlice<f32>,
}

fn bench<T: DeviceFloat>(tpo: &CudaTpo, copy_gbps: f64, rows: &mut Vec<String>) -> tpo::Result<()> {
    for (label, b, k) in shapes::SHAPES {
        let layout_h = tpo::GroupLayout::uniform(b, k)?;
        let size = std::mem::size_of::<T>();
        let bytes = fused_bytes(&layout_h, size, size, true);
        let nsets = if bytes < 48 << 20 { 4 } else { 1 };
        let layout: DeviceLayout = tpo.layout(&layout_h)?;
        let mut sets = Vec::new();
        for seed in 0..nsets {
            let inp = shapes::inputs(b, k, seed as u64 + 1);
            let conv = |v: &[f32]| v.iter().map(|&x| T::from_f64(f64::from(x))).collect::<Vec<T>>();
            sets.push(Set::<T> {
                l: tpo.to_device(&conv(&inp.logp))?,
                lo: tpo.to_device(&conv(&inp.logp_old))?,
                s: tpo.to_device(&inp.scores)?,
            });
        }
        let mut out = tpo.alloc_fused::<T>(&layout, false)?;
        let (tc, fc) = (TargetConfig::default(), FitConfig::default());
        let mut err = None;
        let mut call = |i: usize| {
            let st = &sets[i % sets.len()];
            if let Err(e) = tpo.target_and_fit(&st.l, Some(&st.lo), &st.s, &layout, &tc, &fc, &mut out) {
                err.get_or_insert(e);
            }
        };
        for i in 0..50 {
            call(i);
        }
        let per_batch = if bytes > 256 << 20 { 5 } else { 50 };
        let ms = time(tpo, 30, per_batch, &mut call)?;
        if let Some(e) = err {
            return Err(e);
        }
        tpo.check(&out.fit.status, &layout)?;
        let gbps = bytes as f64 / (ms * 1e-3) / 1e9;
        let row = format!(
            "{{\"impl\":\"tpo\",\"shape\":\"{label}\",\"B\":{b},\"K\":{k},\"dtype\":\"{}\",\"median_us\":{:.3},\"groups_per_s\":{:.4e},\"bytes\":{bytes},\"gbps\":{gbps:.1},\"copy_gbps\":{copy_gbps:.1}}}",
            T::NAME,
            ms * 1e3,
            b as f64 / (ms * 1e-3)
        );
        println!(
            "tpo fused fwd+bwd {:>10} {:>5}: {:>10.2} us  {:>10.3e} groups/s  {:>7.1} GB/s  ({:>5.1}% of copy)",
            label,
            T::NAME,
            ms * 1e3,
            b as f64 / (ms * 1e-3),
            gbps,
            100.0 * gbps / copy_gbps
        );
        rows.push(row);
    }
    Ok(())
}

/// The from-logits path (`CudaTpo::tpo_from_logits`, out of place) at an LLM RL step's shape:
/// T = 16384 tokens = 128 sequences x 128 tokens (8 prompts x 16 completions), V = 151936, bf16.
/// Bytes that must move: the logits read by the forward and again by the backward, and the
/// gradient written once: 3 T V 2 bytes (the backward needs the group gradient, so the two passes
/// cannot be fused).
fn bench_logits(tpo: &CudaTpo, copy_gbps: f64, rows: &mut Vec<String>) -> tpo::Result<()> {
    use tpo::cpu::tokens::PathConfig;
    use tpo::cuda::{DeviceSequenceBatch, DeviceTarget, PathAlloc};
    let (nseq, len, vocab) = (128usize, 128usize, 151_936usize);
    let t = nseq * len;
    let mut rng = tpo::experiments::rng::Rng::new(3);
    let mut z = Vec::with_capacity(t * vocab);
    for _ in 0..t * vocab {
        z.push(bf16::from_f32((8.0 * rng.uniform() - 4.0) as f32));
    }
    let toks: Vec<u32> = (0..t).map(|_| (rng.uniform() * vocab as f64) as u32 % vocab as u32).collect();
    let mask: Vec<u8> = (0..t).map(|i| u8::from(i % len >= 16)).collect(); // 16 prompt tokens per sequence
    let scores: Vec<f32> = (0..nseq).map(|_| if rng.uniform() < 0.5 { 1.0 } else { 0.0 }).collect();
    let old: Vec<f32> = (0..nseq).map(|_| -100.0 * rng.uniform() as f32).collect();
    let seqs = tpo.layout(&tpo::GroupLayout::uniform(nseq, len)?)?;
    let groups = tpo.layout(&tpo::GroupLayout::uniform(8, 16)?)?;
    let mut zd = tpo.to_device(&z)?;
    drop(z);
    let (y, m) = (tpo.to_device(&toks)?, tpo.to_device(&mask)?);
    let (s, o) = (tpo.to_device(&scores)?, tpo.to_device(&old)?);
    let mut out = tpo.alloc_logits_path::<bf16>(vocab, &seqs, &groups, PathAlloc::default())?;
    let batch = DeviceSequenceBatch { tokens: &y, seqs: &seqs, mask: &m, groups: &groups };
    let source = DeviceTarget::Rollout { logp_old: &o, scores: &s };
    let cfg = PathConfig::default();
    let mut err = None;
    let mut call = |_: usize| {
        if let Err(e) = tpo.tpo_from_logits(&mut zd, vocab, &batch, source, &cfg, &mut out) {
            err.get_or_insert(e);
        }
    };
    for i in 0..3 {
        call(i);
    }
    let ms = time(tpo, 10, 2, &mut call)?;
    if let Some(e) = err {
        return Err(e);
    }
    tpo.check(&out.group.fit.status, &groups)?;
    let bytes = 3 * (t * vocab * 2) as u64;
    let gbps = bytes as f64 / (ms * 1e-3) / 1e9;
    println!(
        "tpo from-logits fwd+bwd T={t} V={vocab} bf16: {:.3} ms  {gbps:.1} GB/s  ({:.1}% of copy)",
        ms,
        100.0 * gbps / copy_gbps
    );
    rows.push(format!(
        "{{\"impl\":\"tpo\",\"shape\":\"logits_T{t}_V{vocab}\",\"B\":{nseq},\"K\":{len},\"dtype\":\"bf16\",\"median_us\":{:.3},\"groups_per_s\":{:.4e},\"bytes\":{bytes},\"gbps\":{gbps:.1},\"copy_gbps\":{copy_gbps:.1}}}",
        ms * 1e3,
        8.0 / (ms * 1e-3)
    ));
    Ok(())
}

/// The fused linear path (`FusedLinear::tpo_from_hidden`): T = 16384 tokens (128 sequences of
/// 128), V = 151936, H in {2048, 4096}, bf16, with a workspace budget of 5% of what the
/// materialised bf16 logits would take. Reports time, the rate of its four GEMMs (8 T V H flops:
/// logits, recomputed logits, dh, dW), the workspace's share of the materialised logits, and the
/// device memory the call takes beyond its inputs and its two f32 gradient outputs (workspace,
/// staging tile, per-token buffers and whatever cuBLAS allocates), read from the driver's free
/// memory before and after the first call.
fn bench_hidden(tpo: &CudaTpo, rows: &mut Vec<String>) -> tpo::Result<()> {
    use tpo::cpu::tokens::PathConfig;
    use tpo::cuda::{DeviceSequenceBatch, DeviceTarget, FusedLinear, PathAlloc};
    let (nseq, len, vocab) = (128usize, 128usize, 151_936usize);
    let t = nseq * len;
    for dim in [2048usize, 4096] {
        let mut rng = tpo::experiments::rng::Rng::new(dim as u64);
        let h: Vec<bf16> = (0..t * dim).map(|_| bf16::from_f64(rng.normal() * 0.5)).collect();
        let w: Vec<bf16> = (0..vocab * dim).map(|_| bf16::from_f64(rng.normal() * 0.02)).collect();
        let toks: Vec<u32> = (0..t).map(|_| (rng.uniform() * vocab as f64) as u32 % vocab as u32).collect();
        let mask: Vec<u8> = (0..t).map(|i| u8::from(i % len >= 16)).collect();
        let scores: Vec<f32> = (0..nseq).map(|_| if rng.uniform() < 0.5 { 1.0 } else { 0.0 }).collect();
        let old: Vec<f32> = (0..nseq).map(|_| -100.0 * rng.uniform() as f32).collect();
        let seqs = tpo.layout(&tpo::GroupLayout::uniform(nseq, len)?)?;
        let groups = tpo.layout(&tpo::GroupLayout::uniform(8, 16)?)?;
        let (hd, wd) = (tpo.to_device(&h)?, tpo.to_device(&w)?);
        drop((h, w));
        let (y, m) = (tpo.to_device(&toks)?, tpo.to_device(&mask)?);
        let (s, o) = (tpo.to_device(&scores)?, tpo.to_device(&old)?);
        let logits_bytes = t * vocab * 2;
        let free = || -> tpo::Result<usize> {
            tpo.stream().synchronize().map_err(|e| tpo::TpoError::Cuda(format!("{e:?}")))?;
            let (f, _) =
                tpo.stream().context().mem_get_info().map_err(|e| tpo::TpoError::Cuda(format!("{e:?}")))?;
            Ok(f)
        };
        let free0 = free()?;
        let mut fl = FusedLinear::new(tpo, vocab, dim, logits_bytes / 20)?;
        println!("fused linear plan for H={dim}: {:?}", fl.plan(t)?);
        let mut out = fl.alloc_outputs(tpo, &seqs, &groups, PathAlloc::default())?;
        let batch = DeviceSequenceBatch { tokens: &y, seqs: &seqs, mask: &m, groups: &groups };
        let source = DeviceTarget::Rollout { logp_old: &o, scores: &s };
        let cfg = PathConfig::default();
        let mut err = None;
        let mut call = |_: usize| {
            if let Err(e) = fl.tpo_from_hidden(tpo, &hd, &wd, &batch, source, &cfg, &mut out) {
                err.get_or_insert(e);
            }
        };
        call(0);
        let outputs_bytes = (t * dim + vocab * dim) * 4;
        let extra = free0.saturating_sub(free()?).saturating_sub(outputs_bytes) as f64;
        let ms = time(tpo, 5, 1, &mut call)?;
        if let Some(e) = err {
            return Err(e);
        }
        tpo.check(&out.path.group.fit.status, &groups)?;
        println!(
            "fused linear H={dim}: extra device memory {:.3} GiB = {:.1}% of the logits ({:.2} GiB); f32 gradient outputs {:.2} GiB",
            extra / 2f64.powi(30),
            100.0 * extra / logits_bytes as f64,
            logits_bytes as f64 / 2f64.powi(30),
            outputs_bytes as f64 / 2f64.powi(30)
        );
        let tflops = 8.0 * (t * vocab * dim) as f64 / (ms * 1e-3) / 1e12;
        let ws = fl.workspace_bytes() as f64 / logits_bytes as f64;
        println!(
            "tpo fused linear fwd+bwd T={t} H={dim} V={vocab}: {ms:.2} ms, {tflops:.0} TFLOP/s over its GEMMs, workspace {:.0} MB = {:.1}% of the logits",
            fl.workspace_bytes() as f64 / 1e6,
            100.0 * ws
        );
        rows.push(format!(
            "{{\"impl\":\"tpo\",\"shape\":\"hidden_T{t}_H{dim}_V{vocab}\",\"B\":{nseq},\"K\":{len},\"dtype\":\"bf16\",\"median_us\":{:.1},\"groups_per_s\":{:.4e},\"bytes\":0,\"gbps\":0,\"copy_gbps\":1,\"tflops\":{tflops:.1},\"workspace_fraction\":{ws:.4},\"peak_extra_gib\":{:.3}}}",
            ms * 1e3,
            8.0 / (ms * 1e-3),
            extra / 2f64.powi(30)
        ));
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1);
    let tpo = CudaTpo::new(0)?;
    println!("device: {}", tpo.device_name()?);
    // Copy bandwidth: 1 GiB device to device.
    let n = 1usize << 28; // f32 elements
    let src: CudaSlice<f32> = tpo.stream().alloc_zeros(n).map_err(|e| format!("{e:?}"))?;
    let mut dst: CudaSlice<f32> = tpo.stream().alloc_zeros(n).map_err(|e| format!("{e:?}"))?;
    let mut err = None;
    let ms = time(&tpo, 20, 1, |_| {
        if let Err(e) = tpo.stream().memcpy_dtod(&src, &mut dst) {
            err.get_or_insert(e);
        }
    })?;
    if let Some(e) = err {
        return Err(format!("{e:?}").into());
    }
    let copy_gbps = 2.0 * (n * 4) as f64 / (ms * 1e-3) / 1e9;
    println!("device-to-device copy: {copy_gbps:.1} GB/s (read + write)");
    let mut rows = vec![format!("{{\"impl\":\"copy\",\"copy_gbps\":{copy_gbps:.1}}}")];
    bench::<f32>(&tpo, copy_gbps, &mut rows)?;
    bench::<bf16>(&tpo, copy_gbps, &mut rows)?;
    drop((src, dst));
    bench_logits(&tpo, copy_gbps, &mut rows)?;
    bench_hidden(&tpo, &mut rows)?;
    if let Some(p) = path {
        let mut f = std::fs::File::create(p)?;
        for r in rows {
            writeln!(f, "{r}")?;
        }
    }
    Ok(())
}
