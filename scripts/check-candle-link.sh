#!/usr/bin/env bash
# CI: a binary that depends on tpo (features `cuda` and `candle-cuda`) and candle-core (feature
# `cuda`) must build, i.e. the two crates' cudarc features must unify and tpo's candle CUDA ops
# must compile against candle's CUDA backend (examples/candle_link, its own workspace, so tpo's
# own builds never compile candle).
#
#   scripts/check-candle-link.sh          type-checks it (`cargo check`), with candle-kernels'
#                                         nvcc calls answered by scripts/nvcc-standin-for-candle-kernels.sh
#                                         (empty PTX and libraries, which a type check never reads):
#                                         every build script runs, cudarc's feature checks too, and
#                                         the Rust of every crate (candle-kernels, candle-core, tpo)
#                                         is compiled for real; tpo's own kernels get the real nvcc.
#                                         About 2 minutes. This is what CI runs.
#   scripts/check-candle-link.sh --real   the same type check with the real nvcc for candle's
#                                         kernels too: 49 min measured on a shared, busy 2-core
#                                         machine (load average 12-14), cold.
#   scripts/check-candle-link.sh --build  also links it (`cargo build`, real nvcc): candle's `cuda`
#                                         feature links libcuda, libcublas, libcublasLt, libcurand
#                                         and libnvrtc, which a machine without a CUDA driver and
#                                         toolkit libraries does not have; use it where they are.
#
# Needs nvcc (installed by scripts/install-nvcc.sh into NVCC_DIR, default .cuda; no GPU needed) and
# crates.io.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
eval "$("$root/scripts/install-nvcc.sh" ${NVCC_DIR:+"$NVCC_DIR"})"
# candle-kernels asks nvidia-smi for the compute capability unless told: sm_90 (H100/H200).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
mode="${1:-}"
case "$mode" in
  "" | --real | --build) ;;
  *) echo "check-candle-link: unknown option '$mode' (none, --real or --build)" >&2; exit 2 ;;
esac
if [ -z "$mode" ]; then
  export REAL_NVCC="${NVCC:-$(command -v nvcc)}"
  export NVCC="$root/scripts/nvcc-standin-for-candle-kernels.sh"
fi
cd "$root/examples/candle_link"
start=$(date +%s)
cargo check --locked
echo "check-candle-link: cargo check passed in $(( $(date +%s) - start )) s${mode:+ ($mode)}"
if [ "$mode" = "--build" ]; then
  cargo build --locked
  echo "check-candle-link: cargo build passed in $(( $(date +%s) - start )) s"
fi
