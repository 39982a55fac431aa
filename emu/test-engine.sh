#!/usr/bin/env bash
# Tests of the SIMT engine (emu/tests/engine_tests.cpp) in every build mode, and the real
# kernels/*.cu compiled with the shim in every mode.
#   bash emu/test-engine.sh [MODE...]     MODE: default memcheck racecheck initcheck (all by default)
# Builds under ${TPO_EMU_BUILD_DIR:-target/emu}/MODE. Needs g++ (C++17, _Float16) and, for
# initcheck, valgrind (apt-get install valgrind).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${TPO_EMU_BUILD_DIR:-$root/target/emu}
CXX=${CXX:-g++}
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(default memcheck racecheck initcheck)
failures=0
fail() {
    echo "FAILED: $*"
    failures=$((failures + 1))
}

# Cases that must pass under any schedule (the expected-failure cases name the thread that the
# forward schedule meets first, so they run under the default schedule only).
pass_cases=(block_sum group_reduce warp_reduce shuffles partial_warp atomics shared_isolation index3d sync_preds real_fit real_token_fwd)

# expect_report LOG PATTERN CMD...: CMD must fail and print PATTERN (a sanitizer's report).
expect_report() {
    local log=$1 pattern=$2
    shift 2
    "$@" >"$log" 2>&1
    local rc=$?
    if [ $rc = 0 ] || ! grep -q "$pattern" "$log"; then
        fail "'$*' (rc $rc) did not report '$pattern'; log: $log"
    else
        echo "ok   $(basename "$log" .log) reported: $(grep -m1 "$pattern" "$log" | sed 's/^==[0-9]*== //')"
    fi
}

for mode in "${modes[@]}"; do
    echo "=== $mode"
    out=$build/$mode
    if ! bash "$root/emu/build-kernels.sh" "$mode" "$out"; then
        fail "build-kernels.sh $mode"
        continue
    fi
    bin=$out/engine_tests
    src=$root/emu/tests/engine_tests.cpp
    if [ ! -x "$bin" ] || [ -n "$(find "$src" "$out/libtpo_emu.a" -newer "$bin" 2>/dev/null)" ]; then
        # shellcheck disable=SC2046
        if ! $CXX $(cat "$out/cxxflags") -DTPO_EMU -include "$root/emu/cuda_shim.h" -I"$root/emu" -I"$root/kernels" \
            "$src" "$out/libtpo_emu.a" $(cat "$out/ldflags") -o "$bin"; then
            fail "compiling engine_tests ($mode)"
            continue
        fi
    fi
    case $mode in
    default)
        "$bin" || fail "engine_tests (default)"
        # As the driver ships it: a shared library that the process dlopen()s.
        # shellcheck disable=SC2046
        if $CXX -shared -o "$out/libtpo_emu_smoke.so" -Wl,--whole-archive "$out/libtpo_emu.a" -Wl,--no-whole-archive \
            $(cat "$out/ldflags") &&
            $CXX -std=c++17 -O1 -I"$root/emu" "$root/emu/tests/dlopen_smoke.cpp" -ldl -o "$out/dlopen_smoke"; then
            "$out/dlopen_smoke" "$out/libtpo_emu_smoke.so" || fail "dlopen smoke test"
        else
            fail "building the dlopen smoke test"
        fi
        for sched in reverse random:7 random:123456789; do
            echo "--- TPO_EMU_SCHEDULE=$sched TPO_EMU_WORKERS=1"
            TPO_EMU_SCHEDULE=$sched TPO_EMU_WORKERS=1 "$bin" "${pass_cases[@]}" real_schedules || fail "engine_tests under $sched"
        done
        ;;
    memcheck)
        export ASAN_OPTIONS=detect_leaks=0
        "$bin" || fail "engine_tests (memcheck)"
        expect_report "$out/oob_read.log" "AddressSanitizer: heap-buffer-overflow" "$bin" oob_read
        expect_report "$out/misaligned_load16.log" "misaligned address" "$bin" misaligned_load16
        unset ASAN_OPTIONS
        ;;
    racecheck)
        # One OS thread per CUDA thread under ThreadSanitizer: small shapes only.
        small=(block_sum shuffles partial_warp sync_preds index3d fail_two_barriers fail_deadlock fail_xor32)
        TSAN_OPTIONS=halt_on_error=1 "$bin" "${small[@]}" || fail "engine_tests (racecheck, threads engine)"
        TSAN_OPTIONS=halt_on_error=1 TPO_EMU_ENGINE=fibers TPO_EMU_SCHEDULE=random:3 "$bin" shuffles partial_warp ||
            fail "engine_tests (racecheck, fibers engine)"
        expect_report "$out/race_shared.log" "ThreadSanitizer: data race" env TSAN_OPTIONS=halt_on_error=1 "$bin" race_shared
        expect_report "$out/race_global.log" "ThreadSanitizer: data race" env TSAN_OPTIONS=halt_on_error=1 "$bin" race_global
        ;;
    initcheck)
        if ! command -v valgrind >/dev/null; then
            fail "initcheck needs valgrind (apt-get install valgrind)"
            continue
        fi
        valgrind -q --error-exitcode=99 "$bin" block_sum shuffles partial_warp sync_preds fail_deadlock fail_trap real_token_fwd ||
            fail "engine_tests (initcheck, valgrind)"
        expect_report "$out/uninit_read.log" "depends on uninitialised value" valgrind -q --error-exitcode=99 "$bin" uninit_read
        ;;
    *) fail "unknown mode $mode" ;;
    esac
done
if [ $failures -gt 0 ]; then
    echo "emu/test-engine.sh: $failures failure(s)"
    exit 1
fi
echo "emu/test-engine.sh: all passed (${modes[*]})"
