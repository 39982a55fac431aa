#!/usr/bin/env bash
# Runs the GPU suite on the emulated CUDA device (emu/): the kernels' own source executed with SIMT
# semantics behind an emulated libcuda.so / libcublas.so, reached through cudarc exactly as on a GPU.
#
#   bash scripts/test-emulated-gpu.sh [ARGS]
#
# ARGS go to the test binary of `cargo test --release --features cuda --test gpu` (name filters).
# TPO_EMU_CHECK selects the mode:
#   (unset)    the emulator's own tests (emu/driver), the whole GPU suite at the emulated sizes
#              (TPO_GPU_TEST_SCALE=emulated), `tpo eval --backend cuda` on the example rollout,
#              `tpo reproduce tabular --backend cuda` checked against the CPU run, and the CUDA
#              benchmarks' calls once each (criterion --test: launch, status check) but the
#              262144x64 shape;
#   memcheck   AddressSanitizer + UBSan over the emulated memory and the host-built kernels
#              (out of bounds, use after free, misaligned accesses), on a subset;
#   racecheck  ThreadSanitizer on the OS-thread engine (shared/global races between barriers);
#   initcheck  valgrind: reads of device memory never written (the allocation poison).
# A sanitizer mode runs, unless ARGS name tests, a subset with few proptest cases.
# Works from a fresh clone: installs nvcc (scripts/install-nvcc.sh) when none is set up.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
mode="${TPO_EMU_CHECK:-default}"
case "$mode" in
  default | memcheck | racecheck | initcheck) ;;
  *) echo "test-emulated-gpu: TPO_EMU_CHECK must be unset, memcheck, racecheck or initcheck (got '$mode')" >&2; exit 2 ;;
esac
say() { echo "== emulated GPU [$mode]: $*"; }

if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null; then
  eval "$(scripts/install-nvcc.sh)"
fi
command -v c++ >/dev/null || { echo "test-emulated-gpu: needs a C++17 compiler (c++)" >&2; exit 1; }
if [ "$mode" = initcheck ] && ! command -v valgrind >/dev/null; then
  echo "test-emulated-gpu: initcheck needs valgrind (apt-get install valgrind)" >&2
  exit 1
fi

emu="$root/target/emu/$mode"
say "building the SIMT engine and the kernels (emu/build-kernels.sh)"
bash emu/build-kernels.sh "$mode" "$emu/engine"
say "building the emulated driver and cuBLAS (emu/driver/build.sh)"
bash emu/driver/build.sh "$emu/lib" "$emu/engine"
if [ "$mode" = default ]; then
  say "the emulated driver's own tests"
  bash emu/driver/build.sh test "$emu/driver-test"
fi

export LD_LIBRARY_PATH="$emu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TPO_GPU_TEST_SCALE=emulated
unset TPO_EMU_SM TPO_EMU_CUDA_VERSION

say "building the GPU suite"
# The same build gives the `tpo` binary the steps below run (Cargo builds a package's binaries for
# its integration tests). A separate `cargo build --bin tpo` would compile it again, with other
# features: without the dev-dependencies, Cargo unifies the shared crates' features differently.
built="$(cargo test --release --features cuda --test gpu --no-run --message-format=json-render-diagnostics)" ||
  { echo "$built"; exit 1; }
exe_of() { echo "$built" | python3 scripts/cargo_exe.py "$@"; }  # target name, kind
bin="$(exe_of gpu test)"
tpo="$(exe_of tpo bin)"
[ -x "$bin" ] || { echo "test-emulated-gpu: cannot find the GPU suite's test binary" >&2; exit 1; }
[ -x "$tpo" ] || { echo "test-emulated-gpu: cannot find the tpo binary built with the GPU suite" >&2; exit 1; }

# The subset the sanitizer modes run by default: every kernel family once, few cases.
subset=(fused_f32 fused_bf16_grad_bf16 split_target_then_fit large_groups_use_the_block_path
  groups_of_one_and_mixed_sizes device_errors_name_the_first_bad_element token_logprobs_and_backward
  end_to_end_from_logits token_blocks_accumulate_the_weight_gradient baselines_f32
  baseline_errors_are_one_line baselines_large_and_ragged_groups)
args=("$@")
run_suite() {
  case "$mode" in
    default)
      # The README's command, on the emulated device.
      cargo test --release --features cuda --test gpu -- "${args[@]}"
      ;;
    memcheck)
      [ ${#args[@]} -gt 0 ] || args=("${subset[@]}")
      TPO_GPU_CASES="${TPO_GPU_CASES:-3}" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}" \
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" LD_PRELOAD="$(cat "$emu/engine/preload")" \
        "$bin" --test-threads=1 "${args[@]}"
      ;;
    racecheck)
      # One OS thread per CUDA thread here (about 3 minutes for this subset on 2 cores): launches
      # of hundreds of blocks (4096 groups of one, the fused linear path, the logits-path
      # proptests) are left to memcheck; the token kernels run on a few long rows
      # (full_vocabulary_rows). Left to memcheck too: fused_bf16_grad_bf16 (the fused kernels'
      # barriers and shared memory are raced with f32 here and with bf16 inputs in
      # large_groups_use_the_block_path and split_target_then_fit) and baseline_errors_are_one_line
      # (about 40 launches, 90 s under TSan; the status word's atomics it exercises are the shared
      # `report` of tpo_common.cuh, raced here by device_errors_name_the_first_bad_element).
      [ ${#args[@]} -gt 0 ] || args=(fused_f32 split_target_then_fit
        large_groups_use_the_block_path device_errors_name_the_first_bad_element full_vocabulary_rows
        baselines_f32)
      # The Rust test binary and its std are not instrumented: their synchronisation (futex
      # mutexes, atomics, libtest's channels) is invisible to TSan, so a report with a frame in
      # them is spurious. A race between two CUDA threads has both stacks in libcuda.so (the
      # engine's threads), and streams run synchronously, so nothing of the device is hidden.
      printf '%s\n' 'race:deps/gpu-' 'race:3std4sync' 'race:4core4sync' >"$emu/tsan.supp"
      TPO_GPU_CASES="${TPO_GPU_CASES:-1}" \
        TSAN_OPTIONS="halt_on_error=1:suppressions=$emu/tsan.supp:${TSAN_OPTIONS:-}" \
        LD_PRELOAD="$(cat "$emu/engine/preload")" "$bin" --test-threads=1 "${args[@]}"
      ;;
    initcheck)
      [ ${#args[@]} -gt 0 ] || args=(fused_f32 split_target_then_fit token_logprobs_and_backward)
      TPO_GPU_CASES="${TPO_GPU_CASES:-2}" valgrind --tool=memcheck --error-exitcode=99 --undef-value-errors=yes \
        --track-origins=yes --suppressions=/dev/null -q "$bin" --test-threads=1 "${args[@]}"
      ;;
  esac
}
# Every step runs even when an earlier one failed; the script fails at the end if any did.
failed=()
finish() {
  if [ ${#failed[@]} -gt 0 ]; then
    say "FAILED: ${failed[*]}"
    exit 1
  fi
  say "all steps passed"
  exit 0
}
say "the GPU suite (tests/gpu.rs)"
run_suite || failed+=("tests/gpu.rs")

if [ "$mode" != default ] || [ ${#args[@]} -gt 0 ]; then
  finish
fi

say "tpo eval --backend cuda (examples/data/rollout.safetensors)"
eval_out="$("$tpo" eval examples/data/rollout.safetensors --backend cuda)" || failed+=("tpo eval")
echo "$eval_out"
echo "$eval_out" | python3 -c '
import re, sys
text = sys.stdin.read()
m = re.search(r"loss ([0-9.e+-]+), group_loss ([0-9.e+-]+), target ([0-9.e+-]+), grad ([0-9.e+-]+)", text)
if not m:
    sys.exit("tpo eval --backend cuda printed no comparison with the reference")
worst = max(float(x) for x in m.groups())
# f32 kernels against the f64 reference on this file (values of order 0.1 .. 1): differences
# of order 1e-8 .. 1e-7.
if not worst <= 1e-5:
    sys.exit(f"tpo eval --backend cuda: largest difference {worst:.3e} from the reference (> 1e-5)")
print(f"eval: largest difference from the reference {worst:.3e} (bound 1e-5)")
' || failed+=("tpo eval --backend cuda")

# The embedded fatbin (SASS sm_80 + sm_90, PTX compute_90) on other emulated devices and drivers:
# an A100 runs its SASS, a newer GPU JITs the PTX, a Turing GPU has neither, and a CUDA 12.8
# driver cannot JIT ISA 9.0 PTX (but runs the SASS where there is some).
say "the embedded fatbin on other devices and drivers (TPO_EMU_SM, TPO_EMU_CUDA_VERSION)"
fatbin_case() {  # SM CUDA_VERSION expect(ok|fail)
  local out rc=0
  out="$(TPO_EMU_SM="$1" TPO_EMU_CUDA_VERSION="$2" "$tpo" eval examples/data/rollout.safetensors --backend cuda 2>&1)" || rc=$?
  if [ "$3" = ok ] && [ $rc -eq 0 ] && echo "$out" | grep -q "sm_$1"; then
    echo "sm_$1, CUDA $2: loads, as expected"
  elif [ "$3" = fail ] && [ $rc -ne 0 ] && echo "$out" | grep -q "cannot load the kernels"; then
    echo "sm_$1, CUDA $2: refused, as expected: $(echo "$out" | grep -m1 "cannot load")"
  else
    echo "$out"
    failed+=("fatbin on sm_$1 with CUDA $2 (expected: $3)")
  fi
}
fatbin_case 80 13000 ok
fatbin_case 100 13000 ok
fatbin_case 90 12080 ok
fatbin_case 100 12080 fail
fatbin_case 75 13000 fail

say "tpo reproduce tabular --backend cuda against the CPU run"
rep="$emu/reproduce"
rm -rf "$rep"
if "$tpo" reproduce tabular --seeds 2 --steps 20 --backend cpu --out "$rep/cpu" >/dev/null &&
  "$tpo" reproduce tabular --seeds 2 --steps 20 --backend cuda --out "$rep/cuda" >/dev/null; then
  python3 - "$rep/cpu" "$rep/cuda" <<'EOF' || failed+=("tpo reproduce tabular --backend cuda")
import json, math, sys
cpu_dir, cuda_dir = sys.argv[1], sys.argv[2]
def leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x
worst = (0.0, "")
for name in ("tabular_single.json", "tabular_multi.json"):
    a = dict(leaves(json.load(open(f"{cpu_dir}/{name}"))))
    b = dict(leaves(json.load(open(f"{cuda_dir}/{name}"))))
    if a.keys() != b.keys():
        sys.exit(f"reproduce: {name} differs in structure between the CPU and CUDA runs")
    for k, x in a.items():
        y = b[k]
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            d = abs(x - y) / (1.0 + abs(x))
            if not d <= worst[0]:
                worst = (d, f"{name}{k}: cpu {x} cuda {y}")
        elif "backend" not in k.lower() and x != y and not (isinstance(x, str) and "cpu" in x.lower()):
            sys.exit(f"reproduce: {name}{k} differs: {x!r} vs {y!r}")
# The CUDA backend computes TPO's gradient in f32: curves agree to f32 accuracy over 20 steps.
if not worst[0] <= 1e-3:
    sys.exit(f"reproduce: CUDA run differs from the CPU run by {worst[0]:.3e} (relative, > 1e-3) at {worst[1]}")
print(f"reproduce: CUDA curves match the CPU run (largest relative difference {worst[0]:.3e}, bound 1e-3)")
EOF
else
  failed+=("tpo reproduce tabular")
fi

# benches/cuda.rs has no correctness part of its own beyond its status check: criterion's --test
# runs each benchmark's calls once, launch and check. The 262144x64 shape (16.7M members) is left
# to the GPU suite's benchmark_shape_262144_by_64 at the emulated size.
say "the CUDA benchmarks' calls, once each (cargo bench --bench cuda -- --test), but 262144x64"
cargo bench --features cuda --bench cuda -- --test 'fwd_bwd/(64x8|1024x16|16384x16|8x100000)$' ||
  failed+=("benches/cuda.rs")
finish
