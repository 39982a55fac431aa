//! Criterion benchmarks of the f64 CPU reference (fused target + fit, f32 inputs).
//!
//! `cargo bench --bench cpu`. Throughput is reported in bytes of the inputs and outputs as the
//! GPU kernel would move them (see `tpo::cuda::fused_bytes`), and in groups per second.

#[path = "shapes.rs"]
mod shapes;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use tpo::{cpu, FitConfig, TargetConfig};

fn bench_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_target_and_fit");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for (label, b, k) in shapes::SHAPES {
        let inp = shapes::inputs(b, k, 1);
        g.throughput(Throughput::Elements(b as u64));
        g.bench_function(BenchmarkId::new("groups", label), |bench| {
            bench.iter(|| {
                cpu::target_and_fit(
                    &inp.logp,
                    Some(&inp.logp_old),
                    &inp.scores,
                    &inp.layout,
                    &TargetConfig::default(),
                    &FitConfig::default(),
                )
                .expect("valid inputs")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_cpu);
criterion_main!(benches);
