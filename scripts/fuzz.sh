#!/usr/bin/env bash
# Fuzzes `tpo eval`'s input reader and the public CPU API for a bounded time per target, on the
# stable toolchain; CI calls it. Installs what it needs: a C++ compiler (libFuzzer is C++, built
# by the libfuzzer-sys crate) and cargo-fuzz.
#
#   scripts/fuzz.sh [SECONDS]    # each target runs SECONDS (default 60) from its seed corpus
#
# FUZZ_SEED=N fixes libFuzzer's random seed and starts from the seed corpus alone (CI sets it:
# a CI run then mutates the same sequence of inputs each time; how far along it gets in the time
# depends on the machine's speed); unset, every run draws a new seed and continues from the
# inputs earlier runs kept in fuzz/work/.
#
# Stable works because the targets are built with `--sanitizer none`: libFuzzer needs only the
# SanitizerCoverage instrumentation (stable `-C` flags), not AddressSanitizer (`-Z`, nightly);
# the code under test has no `unsafe`, so the fuzzer looks for panics, aborts and broken
# invariants (fuzz/src/checks.rs), with overflow checks and debug assertions on.
# Exit status 1 if any target finds a failing input; it is saved under fuzz/artifacts/<target>/
# and `cargo fuzz run --sanitizer none <target> <file>` replays it.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || { echo "usage: scripts/fuzz.sh [SECONDS > 0], got '$secs'" >&2; exit 2; }
[[ -z "${FUZZ_SEED:-}" || "$FUZZ_SEED" =~ ^[1-9][0-9]*$ ]] || { echo "FUZZ_SEED must be a positive integer, got '$FUZZ_SEED'" >&2; exit 2; }

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

failed=()
for target in eval_input api; do
    # New inputs go to an ignored work folder, so the seed corpus in the repository stays as is.
    work="fuzz/work/$target"
    # With a fixed seed, start from the seed corpus alone (not from inputs earlier runs kept).
    [[ -n "${FUZZ_SEED:-}" ]] && rm -rf "$work"
    mkdir -p "$work"
    # No length ramp-up (-len_control=0): the api target turns input length into data, and a
    # one-minute run would otherwise spend itself on tiny inputs.
    extra=(-len_control=0)
    [[ -f "fuzz/$target.dict" ]] && extra+=("-dict=$target.dict")
    [[ "$target" == api ]] && extra+=(-max_len=2048)
    [[ -n "${FUZZ_SEED:-}" ]] && extra+=("-seed=$FUZZ_SEED")
    echo "== fuzz $target for ${secs}s"
    if ! (cd fuzz && "${cargo[@]}" fuzz run --sanitizer none "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${extra[@]}"); then
        failed+=("$target")
    fi
done
if ((${#failed[@]})); then
    echo "fuzzing found failing inputs in: ${failed[*]} (see fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: no failure in ${secs}s per target"
