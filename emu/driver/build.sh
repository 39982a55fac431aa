#!/usr/bin/env bash
# Builds the emulated driver and cuBLAS:
#
#   emu/driver/build.sh OUTDIR ENGINE_DIR  libcuda.so (+ .so.1) and libcublas.so (+ .so.13) in OUTDIR,
#                                          linked with the SIMT engine that emu/build-kernels.sh MODE
#                                          ENGINE_DIR built (ENGINE_DIR/libtpo_emu.a, compiled and
#                                          linked with that mode's ENGINE_DIR/cxxflags and ldflags)
#   emu/driver/build.sh test OUTDIR        builds the driver against the test registry
#                                          (tests/test_engine.cpp) in OUTDIR and runs tests/driver_test.cpp
#
# CXX (default c++) and EMU_CXXFLAGS (added to the flags) apply.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cxx="${CXX:-c++}"
flags=(-std=c++17 -O2 -g -fPIC -fvisibility=hidden -Wall -Wextra -Wno-unused-parameter)
# shellcheck disable=SC2206
extra=(${EMU_CXXFLAGS:-})

build() {  # OUTDIR LDFLAGS ENGINE...
  local out="$1" ld="$2"
  shift 2
  mkdir -p "$out"
  # Rebuild only when a source, the engine, the compiler or a flag changed.
  local stamp
  stamp="$( ("$cxx" --version | head -n 1; echo "${flags[*]} ${extra[*]} $ld $*"; cat "$here"/*.cpp "$here"/*.h "$here/../engine.h"; for f in "$@"; do [ ! -f "$f" ] || cat "$f"; done) | sha256sum | cut -d' ' -f1)"
  if [ -f "$out/libcuda.so.1" ] && [ -f "$out/libcublas.so.13" ] && [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  rm -f "$out/.stamp"
  # shellcheck disable=SC2086
  "$cxx" "${flags[@]}" "${extra[@]}" -shared -Wl,-soname,libcuda.so.1 -o "$out/libcuda.so.1.tmp" \
    "$here/driver.cpp" "$here/loader.cpp" "$@" $ld -lpthread
  mv "$out/libcuda.so.1.tmp" "$out/libcuda.so.1"
  ln -sf libcuda.so.1 "$out/libcuda.so"
  # shellcheck disable=SC2086
  "$cxx" "${flags[@]}" "${extra[@]}" -shared -Wl,-soname,libcublas.so.13 -o "$out/libcublas.so.13.tmp" \
    "$here/cublas.cpp" -L"$out" -l:libcuda.so.1 -Wl,-rpath,'$ORIGIN' $ld -lpthread
  mv "$out/libcublas.so.13.tmp" "$out/libcublas.so.13"
  ln -sf libcublas.so.13 "$out/libcublas.so"
  echo "$stamp" >"$out/.stamp"
}

if [ "${1:-}" = test ]; then
  out="${2:?usage: build.sh test OUTDIR}"
  build "$out" "" "$here/tests/test_engine.cpp"
  "$cxx" "${flags[@]}" "${extra[@]}" -o "$out/driver_test" "$here/tests/driver_test.cpp" \
    -L"$out" -l:libcuda.so.1 -l:libcublas.so.13 -Wl,-rpath,"$out"
  # The expected errors' one-line messages go to a log, shown when a test fails.
  if "$out/driver_test" 2>"$out/driver_test.stderr"; then
    exit 0
  fi
  cat "$out/driver_test.stderr" >&2
  exit 1
fi
[ $# -eq 2 ] || { echo "usage: build.sh OUTDIR ENGINE_DIR | build.sh test OUTDIR" >&2; exit 2; }
out="$1"
engine="$(cd "$2" && pwd)"
[ -f "$engine/libtpo_emu.a" ] || { echo "build.sh: no $engine/libtpo_emu.a (run emu/build-kernels.sh MODE $2)" >&2; exit 1; }
# The engine's mode decides the sanitizer flags; the driver is built with the same ones.
# shellcheck disable=SC2207
extra+=($(cat "$engine/cxxflags" 2>/dev/null || true))
build "$out" "$(cat "$engine/ldflags" 2>/dev/null || echo -pthread)" \
  -Wl,--whole-archive "$engine/libtpo_emu.a" -Wl,--no-whole-archive
