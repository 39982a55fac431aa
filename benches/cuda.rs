//! Criterion benchmarks of the fused CUDA kernel (`cargo bench --features cuda --bench cuda`).
//!
//! Timed with CUDA events around `iters` back-to-back calls after criterion's warm-up; each call
//! is `CudaTpo::target_and_fit` (status reset, fused kernel, loss reduction). Throughput is the
//! fewest bytes the call must move (`tpo::cuda::fused_bytes`). Needs a GPU.

#[path = "shapes.rs"]
mod shapes;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::sys::CUevent_flags;
use std::time::Duration;
use tpo::cuda::{fused_bytes, CudaTpo, DeviceFloat};
use tpo::{bf16, FitConfig, TargetConfig};

fn bench_dtype<T: DeviceFloat>(c: &mut Criterion, tpo: &CudaTpo) {
    let mut g = c.benchmark_group(format!("cuda_target_and_fit_{}", T::NAME));
    g.sample_size(30).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for (label, b, k) in shapes::SHAPES {
        let inp = shapes::inputs(b, k, 1);
        let conv = |v: &[f32]| v.iter().map(|&x| T::from_f64(f64::from(x))).collect::<Vec<T>>();
        let layout = tpo.layout(&inp.layout).expect("layout");
        let l = tpo.to_device(&conv(&inp.logp)).expect("upload");
        let lo = tpo.to_device(&conv(&inp.logp_old)).expect("upload");
        let s = tpo.to_device(&inp.scores).expect("upload");
        let mut out = tpo.alloc_fused::<T>(&layout, false).expect("alloc");
        let size = std::mem::size_of::<T>();
        g.throughput(Throughput::Bytes(fused_bytes(&inp.layout, size, size, true)));
        let ctx = tpo.stream().context().clone();
        g.bench_function(BenchmarkId::new("fwd_bwd", label), |bench| {
            bench.iter_custom(|iters| {
                let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
                let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
                start.record(tpo.stream()).expect("record");
                for _ in 0..iters {
                    tpo.target_and_fit(
                        &l,
                        Some(&lo),
                        &s,
                        &layout,
                        &TargetConfig::default(),
                        &FitConfig::default(),
                        &mut out,
                    )
                    .expect("launch");
                }
                end.record(tpo.stream()).expect("record");
                end.synchronize().expect("sync");
                Duration::from_secs_f64(f64::from(start.elapsed_ms(&end).expect("elapsed")) / 1e3)
            })
        });
        tpo.check(&out.fit.status, &layout).expect("valid inputs");
    }
    g.finish();
}

fn bench_cuda(c: &mut Criterion) {
    let tpo = CudaTpo::new(0).unwrap_or_else(|e| panic!("the CUDA benchmarks need a GPU: {e}"));
    bench_dtype::<f32>(c, &tpo);
    bench_dtype::<bf16>(c, &tpo);
}

criterion_group!(benches, bench_cuda);
criterion_main!(benches);
