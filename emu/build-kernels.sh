#!/usr/bin/env bash
# Builds the SIMT engine, every kernel of kernels/*.cu and the generated registry for one mode:
#   bash emu/build-kernels.sh MODE OUTDIR      MODE: default | memcheck | racecheck | initcheck
#   bash emu/build-kernels.sh --print-cxxflags MODE
# Writes OUTDIR/libtpo_emu.a (-fPIC objects), OUTDIR/cxxflags, OUTDIR/ldflags, OUTDIR/preload
# (see emu/README.md). Recompiles an object only when its inputs, the compiler or the flags changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
CXX=${CXX:-g++}

# The one place where each mode's flags are defined.
flags_for() {
    case $1 in
    default) echo "-O2 -mtls-dialect=gnu2" ;;  # TLS descriptors: cheap threadIdx/__shared__ in a dlopen()ed library
    memcheck) echo "-O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all -DTPO_EMU_ASAN" ;;
    racecheck) echo "-O1 -fsanitize=thread -DTPO_EMU_TSAN -DTPO_EMU_SHARED_STATIC" ;;
    initcheck) echo "-O1 -DTPO_EMU_VALGRIND" ;;
    *) echo "build-kernels: unknown mode '$1' (default, memcheck, racecheck or initcheck)" >&2; return 1 ;;
    esac
}
ldflags_for() {
    case $1 in
    memcheck) echo "-pthread -fsanitize=address,undefined" ;;
    racecheck) echo "-pthread -fsanitize=thread" ;;
    *) echo "-pthread" ;;
    esac
}
preload_for() {
    case $1 in
    memcheck) $CXX -print-file-name=libasan.so ;;
    racecheck) $CXX -print-file-name=libtsan.so ;;
    *) echo "" ;;
    esac
}
common="-std=c++17 -fPIC -g -pthread -ffp-contract=off -fno-strict-aliasing -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas -Wno-sign-compare -fmacro-prefix-map=$root/="

if [ "${1:-}" = "--print-cxxflags" ]; then
    echo "$common $(flags_for "${2:?mode}")"
    exit 0
fi
mode=${1:?usage: build-kernels.sh MODE OUTDIR}
out=${2:?usage: build-kernels.sh MODE OUTDIR}
mflags=$(flags_for "$mode")
cxxflags="$common $mflags"
mkdir -p "$out/gen" "$out/obj"
out=$(cd "$out" && pwd)
# One build at a time per OUTDIR (parallel cargo build scripts or test runs may share it).
if command -v flock >/dev/null; then
    exec 9>"$out/.lock"
    flock 9
fi

kernels=("$root"/kernels/*.cu)
bash "$root/emu/gen_registry.sh" "$CXX" "$out/gen" "${kernels[@]}"

compiler_id=$($CXX --version | head -1)
headers=$(cat "$root"/emu/*.h "$root"/kernels/*.cuh | sha256sum)
# obj NAME SRC [extra -I/-include flags]: compiles SRC to obj/NAME.o unless nothing changed.
pids=()
names=()
compile() {
    local name=$1 src=$2
    shift 2
    local inputs
    inputs=$( (echo "$compiler_id $cxxflags $*"; echo "$headers"; cat "$src"; [ "$name" = "${name#k_}" ] || cat "$root"/kernels/*.cu) | sha256sum | cut -d' ' -f1)
    if [ -f "$out/obj/$name.o" ] && [ "$(cat "$out/obj/$name.hash" 2>/dev/null)" = "$inputs" ]; then
        return 0
    fi
    rm -f "$out/obj/$name.o" "$out/obj/$name.hash"
    echo "build-kernels [$mode]: compiling $name" >&2
    (
        # shellcheck disable=SC2086
        $CXX $cxxflags "$@" -c "$src" -o "$out/obj/$name.o.tmp" &&
            mv "$out/obj/$name.o.tmp" "$out/obj/$name.o" && echo "$inputs" >"$out/obj/$name.hash"
    ) &
    pids+=($!)
    names+=("$name")
}
compile engine "$root/emu/engine.cpp" -I"$root/emu"
compile registry "$out/gen/registry.cpp" -I"$root/emu"
for k in "${kernels[@]}"; do
    stem=$(basename "$k" .cu)
    compile "k_$stem" "$out/gen/k_$stem.cpp" -DTPO_EMU -include "$root/emu/cuda_shim.h" -I"$root/emu" -I"$root/kernels"
done
fail=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "build-kernels [$mode]: compiling ${names[$i]} failed" >&2
        fail=1
    fi
done
[ $fail = 0 ] || exit 1

objs=("$out/obj/engine.o" "$out/obj/registry.o")
for k in "${kernels[@]}"; do objs+=("$out/obj/k_$(basename "$k" .cu).o"); done
if [ ! -f "$out/libtpo_emu.a" ] || [ -n "$(find "${objs[@]}" -newer "$out/libtpo_emu.a" 2>/dev/null)" ]; then
    rm -f "$out/libtpo_emu.a.tmp"
    ar rcs "$out/libtpo_emu.a.tmp" "${objs[@]}"
    mv "$out/libtpo_emu.a.tmp" "$out/libtpo_emu.a"
fi
echo "$cxxflags" >"$out/cxxflags"
ldflags_for "$mode" >"$out/ldflags"
preload_for "$mode" >"$out/preload"
