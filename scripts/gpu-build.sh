#!/usr/bin/env bash
# Builds, on a machine with Rust (no GPU needed), everything the GPU machine runs, into .gpu/
# (ignored by git). Then run scripts/gpu-run.sh there with .gpu carried along, e.g. with the
# workplace's device tool: command "bash scripts/gpu-run.sh", carry [".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/install-nvcc.sh)"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/bin

exe() { python3 scripts/cargo_exe.py "$@"; }  # cargo JSON on stdin -> the executable of target $1

cp "$(cargo test --release --features cuda,nvtx --test gpu --no-run --message-format=json | exe gpu)" .gpu/bin/gpu-tests
cp "$(cargo bench --features cuda,nvtx --bench cuda --no-run --message-format=json | exe cuda)" .gpu/bin/cuda-bench
cargo build --release --features cuda,nvtx --bin tpo --example gpu_bench
cp target/release/tpo target/release/examples/gpu_bench .gpu/bin/
strip .gpu/bin/* 2>/dev/null || true
# Liger-Kernel (pure Python, on Triton) for the fused-linear comparison; the GPU machine has no network.
mkdir -p .gpu/wheels
python3 -m pip download --quiet --no-deps --only-binary=:all: -d .gpu/wheels liger-kernel==0.8.5
cp "$(ls -t target/release/build/tpo-*/out/ptxas-report.txt | head -n 1)" .gpu/ptxas-report.txt
du -sh .gpu
echo "gpu-build: ready; run 'bash scripts/gpu-run.sh' on the GPU machine with .gpu carried"
