#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with .gpu/ built by scripts/gpu-build.sh
# (compute-sanitizer needs a Firecracker machine; on gVisor it refuses the device):
# the GPU suite, compute-sanitizer memcheck and racecheck, `tpo eval/reproduce --backend cuda`,
# and the benchmarks (our kernel, PyTorch eager and torch.compile, copy bandwidth) side by side.
# Results go to $OUT (default ./gpu-out): summary.log, table.md, tpo.jsonl, torch.jsonl,
# memcheck.log, racecheck.log, criterion.log. Exits non-zero if a check failed.
#
#   bash scripts/gpu-run.sh [all|check|bench]
#
# `check` (suite, sanitizers, tpo eval/reproduce) and `bench` (benchmarks and table) are meant to
# fit in one 10-minute device command each (not yet timed on a GPU); `all` runs both.
set -uo pipefail
stage="${1:-all}"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
B=.gpu/bin
fail=0
exec > >(tee "$OUT/summary.log") 2>&1
step() { echo; echo "== $*"; }

# cuBLAS and NVTX for the Rust binaries come from the CUDA 13 wheels next to PyTorch.
NV=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null)
for d in $(find "$NV/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null); do LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
export LD_LIBRARY_PATH
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
nvcc --version 2>/dev/null | tail -n 2 || true
cat .gpu/ptxas-report.txt | grep -c SPILL | sed 's/^/kernels that spill: /'

if [ "$stage" = all ] || [ "$stage" = check ]; then
step "GPU suite (tests/gpu.rs)"
$B/gpu-tests --test-threads 1 || { fail=1; echo "GPU SUITE FAILED"; }

# The sanitizers slow kernels 10-100x: few proptest cases, the largest shapes skipped, the block
# path (groups > 256) kept for racecheck, which checks shared memory.
san() {
  local tool=$1
  TPO_GPU_CASES=3 compute-sanitizer --tool "$tool" --error-exitcode 9 $B/gpu-tests --test-threads 1 \
    --skip a_million_groups --skip benchmark_shape_262144_by_64 > "$OUT/$tool.log" 2>&1
  local rc=$?
  tail -n 5 "$OUT/$tool.log"
  [ $rc -eq 0 ] || { fail=1; echo "$tool: FAILED (rc $rc)"; }
}
step "compute-sanitizer memcheck"
san memcheck
step "compute-sanitizer racecheck"
san racecheck

step "tpo eval --backend cuda"
$B/tpo eval examples/data/rollout.safetensors --backend cuda || fail=1
step "tpo reproduce tabular --backend cuda (10 seeds)"
$B/tpo reproduce tabular --backend cuda --seeds 10 --threads 1 --out /tmp/repro-cuda | tail -n 16 || fail=1

fi

if [ "$stage" = all ] || [ "$stage" = bench ]; then
step "benchmarks: tpo (examples/gpu_bench.rs)"
$B/gpu_bench "$OUT/tpo.jsonl" || fail=1
step "benchmarks: PyTorch eager and torch.compile (scripts/torch_baseline.py)"
PYTHONUNBUFFERED=1 python3 scripts/torch_baseline.py --json "$OUT/torch.jsonl" || fail=1
step "criterion (benches/cuda.rs)"
$B/cuda-bench --bench > "$OUT/criterion.log" 2>&1 || fail=1
grep -E "^cuda_|time:|thrpt:" "$OUT/criterion.log" | head -n 40

step "table"
python3 scripts/bench_table.py "$OUT/tpo.jsonl" "$OUT/torch.jsonl" | tee "$OUT/table.md"
fi
echo
[ $fail -eq 0 ] && echo "gpu-run: all checks passed" || echo "gpu-run: SOME CHECKS FAILED"
exit $fail
