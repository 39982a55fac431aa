//! Times the fused CUDA kernel on the benchmark shapes and measures the device's copy bandwidth in
//! the same run; writes one JSON object per line (for scripts/bench_table.py) and prints a table.
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
    if let Some(p) = path {
        let mut f = std::fs::File::create(p)?;
        for r in rows {
            writeln!(f, "{r}")?;
        }
    }
    Ok(())
}
