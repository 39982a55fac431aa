#!/usr/bin/env bash
# CI: a binary that depends on tpo (feature `cuda`) and candle-core (feature `cuda`) must build,
# i.e. the two crates' cudarc features must unify (examples/candle_link, its own workspace, so
# tpo's own builds never compile candle).
#
#   scripts/check-candle-link.sh          type-checks it (`cargo check`): runs every build script,
#                                         so cudarc's feature checks, tpo's and candle's nvcc
#                                         kernel builds, and compiles both crates' Rust code;
#   scripts/check-candle-link.sh --build  also links it (`cargo build`): candle's `cuda` feature
#                                         links libcuda, libcublas, libcublasLt, libcurand and
#                                         libnvrtc, which a machine without a CUDA driver and
#                                         toolkit libraries does not have; use it where they are.
#
# Needs nvcc (installed by scripts/install-nvcc.sh into NVCC_DIR, default .cuda; no GPU needed) and
# crates.io. Cold, candle-kernels' nvcc build dominates: 49 min measured on a shared, busy 2-core
# machine (load average 12-14); a warm rerun takes seconds.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
eval "$("$root/scripts/install-nvcc.sh" ${NVCC_DIR:+"$NVCC_DIR"})"
# candle-kernels asks nvidia-smi for the compute capability unless told: sm_90 (H100/H200).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
cd "$root/examples/candle_link"
start=$(date +%s)
cargo check --locked
echo "check-candle-link: cargo check passed in $(( $(date +%s) - start )) s"
if [ "${1:-}" = "--build" ]; then
  cargo build --locked
  echo "check-candle-link: cargo build passed in $(( $(date +%s) - start )) s"
fi
