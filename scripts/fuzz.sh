#!/usr/bin/env bash
# Fuzzes `tpo eval`'s input reader and the public CPU API, each target for a bounded time or a
# fixed number of inputs, on the stable toolchain; CI calls it. Installs what it needs: a C++
# compiler (libFuzzer is C++, built by the libfuzzer-sys crate) and cargo-fuzz.
#
#   scripts/fuzz.sh [SECONDS]              # each target SECONDS (default 60), new random seed
#   FUZZ_SEED=N scripts/fuzz.sh [SECONDS]  # each target a fixed number of inputs, seed N
#
# Unset, FUZZ_SEED lets every run draw a new seed and continue from the inputs earlier runs kept
# in fuzz/work/: that is for exploring. Set (CI sets it), a run starts from the seed corpus alone
# (passed as a sorted list) with libFuzzer's seed fixed to N and stops after a fixed number of
# inputs per target (FUZZ_RUNS, default 1200000 for eval_input and 300000 for api: about a minute
# each on a 2-core machine), so how far it gets does not depend on the machine's speed. SECONDS is
# then only a cap (default 600): a run that reaches it is cut short, and the script exits 3 saying
# so. (A time bound alone made the verdict depend on the machine's speed: one CI run found an
# input that earlier 60 s runs of the same seed had not reached.) Such a run also turns off what
# else varies between runs: libFuzzer's periodic corpus reload (time-based; -reload=0)
# and address-space randomisation (`setarch -R`, where it is installed and allowed: compared
# addresses feed libFuzzer's dictionary). With both, two api runs of 100,000 inputs here printed
# identical progress lines. eval_input's still differ from start-up on (probably the safetensors
# reader's header, kept in a std HashMap randomly keyed per process; the scratch file's path
# holds the process id too), so a rare find there may show in one run and not in the next.
#
# Stable works because the targets are built with `--sanitizer none`: libFuzzer needs only the
# SanitizerCoverage instrumentation (stable `-C` flags), not AddressSanitizer (`-Z`, nightly);
# the code under test has no `unsafe`, so the fuzzer looks for panics, aborts and broken
# invariants (fuzz/src/checks.rs), with overflow checks and debug assertions on.
# Exit status 1 if any target finds a failing input (or fails to build or run): the input is saved
# under fuzz/artifacts/<target>/, printed again at the end in base64, and
# `cargo fuzz run --sanitizer none <target> <file>` (from fuzz/) replays it.
set -euo pipefail
cd "$(dirname "$0")/.."

seeded="${FUZZ_SEED:+1}"
secs="${1:-$([[ -n "$seeded" ]] && echo 600 || echo 60)}"
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || { echo "usage: scripts/fuzz.sh [SECONDS > 0], got '$secs'" >&2; exit 2; }
# VAR, if set, must be an integer from 1 to MAX.
in_range() {
    local v="${!1:-}"
    [[ -z "$v" || ( "$v" =~ ^[1-9][0-9]{0,9}$ && "$v" -le "$2" ) ]] || { echo "$1 must be an integer from 1 to $2, got '$v'" >&2; exit 2; }
}
# libFuzzer reads -seed as an unsigned int (0 meaning a random seed), -runs as an int.
in_range FUZZ_SEED 4294967295
in_range FUZZ_RUNS 2147483647
[[ -z "${FUZZ_RUNS:-}" || -n "$seeded" ]] || { echo "FUZZ_RUNS needs FUZZ_SEED (a fixed number of inputs is for a reproducible run)" >&2; exit 2; }

cargo=(cargo)
if command -v rustup >/dev/null; then
    rustup toolchain list | grep -q '^stable' || rustup toolchain install stable --profile minimal
    cargo=(cargo +stable)
fi
command -v c++ >/dev/null || { apt-get update -qq && apt-get install -y -qq g++ >/dev/null; }
if ! "${cargo[@]}" fuzz --version >/dev/null 2>&1; then
    "${cargo[@]}" install cargo-fuzz --locked
fi
"${cargo[@]}" fuzz --version

# No address-space randomisation for a seeded run, where `setarch -R` is installed and allowed.
norand=()
if [[ -n "$seeded" ]] && setarch "$(uname -m)" -R true 2>/dev/null; then
    norand=(setarch "$(uname -m)" -R)
fi
# New inputs go to an ignored work folder, so the seed corpus in the repository stays as is; a
# seeded run has a folder of its own, emptied first (it starts from the seed corpus alone), so the
# inputs that exploring runs kept in fuzz/work/<target> stay.
base="fuzz/work"
[[ -n "$seeded" ]] && base="fuzz/work/seeded"
failed=()
capped=()
for target in eval_input api; do
    work="$base/$target"
    [[ -n "$seeded" ]] && rm -rf "$work"
    mkdir -p "$work"
    # No length ramp-up (-len_control=0): the api target turns input length into data, and a
    # one-minute run would otherwise spend itself on tiny inputs.
    extra=(-len_control=0)
    [[ -f "fuzz/$target.dict" ]] && extra+=("-dict=$target.dict")
    [[ "$target" == api ]] && extra+=(-max_len=2048)
    runs=""
    if [[ -n "$seeded" ]]; then
        case "$target" in
            eval_input) runs="${FUZZ_RUNS:-1200000}" ;;
            *) runs="${FUZZ_RUNS:-300000}" ;;
        esac
        # The seeds as a sorted list (a directory is read in the file system's order).
        seeds="${base#fuzz/}/$target.seeds"
        # No final newline: libFuzzer would take it as part of the last name and skip that file.
        (cd fuzz && find "corpus/$target" -type f | LC_ALL=C sort | paste -sd, - | tr -d '\n') > "fuzz/$seeds"
        # libFuzzer saves new inputs in its first corpus folder, the only one here.
        dirs=("${work#fuzz/}")
        extra+=("-seed_inputs=@$seeds" "-seed=$FUZZ_SEED" "-runs=$runs" -reload=0)
        if ((${#norand[@]})); then aslr="off"; else aslr="on: setarch -R is not available or not allowed here"; fi
        echo "== fuzz $target: $runs inputs from seed $FUZZ_SEED (cap ${secs}s; address randomisation $aslr)"
    else
        # libFuzzer saves new inputs in its first corpus folder: work/, not the tracked seeds.
        dirs=("${work#fuzz/}" "corpus/$target")
        echo "== fuzz $target for ${secs}s"
    fi
    log="$base/$target.log"
    # The folders before `--`: cargo-fuzz passes what follows `--` ahead of them.
    if ! (cd fuzz && ${norand[@]+"${norand[@]}"} "${cargo[@]}" fuzz run --sanitizer none "$target" "${dirs[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${extra[@]}") 2>&1 | tee "$log"; then
        failed+=("$target")
    elif [[ -n "$runs" ]]; then
        done_runs="$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)"
        if [[ -z "$done_runs" ]] || ((done_runs < runs)); then
            echo "fuzz $target: stopped by the ${secs}s cap after ${done_runs:-an unknown number of} of $runs inputs" >&2
            capped+=("$target")
        fi
    fi
done
if ((${#failed[@]})); then
    # The finding, again at the end, where a CI log's tail shows it: what failed, and each input
    # this run saved, in base64 (`base64 -d > f` and `cargo fuzz run --sanitizer none <target> f`).
    for target in "${failed[@]}"; do
        grep -A1 -E "panicked at|ERROR: libFuzzer|SUMMARY: libFuzzer|^error(\[E[0-9]+\])?:" "$base/$target.log" | head -n 8 >&2 || true
        sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$base/$target.log" | while IFS= read -r f; do
            [[ -f "$f" ]] || continue
            echo "$f ($(wc -c < "$f") bytes), base64: $(base64 < "$f" | tr -d '\n')" >&2
        done
    done
    echo "fuzzing failed in: ${failed[*]} (a failing input, saved under fuzz/artifacts/, or a build or run error: see above)" >&2
    exit 1
fi
if ((${#capped[@]})); then
    echo "fuzzing was cut short by the ${secs}s cap in: ${capped[*]} (no failure in the inputs it ran; give a larger cap)" >&2
    exit 3
fi
if [[ -n "$seeded" ]]; then
    echo "fuzz: no failure (seed $FUZZ_SEED)"
else
    echo "fuzz: no failure in ${secs}s per target"
fi
