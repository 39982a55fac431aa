#!/usr/bin/env bash
# Builds the emulated driver and cuBLAS:
#
#   emu/driver/build.sh OUTDIR ENGINE...   libcuda.so (+ .so.1) and libcublas.so (+ .so.13) in OUTDIR,
#                                          linked with the SIMT engine (ENGINE: its object files or
#                                          static archives, built by the engine's own build script)
#   emu/driver/build.sh test OUTDIR        builds the driver against the test registry
#                                          (tests/test_engine.cpp) in OUTDIR and runs tests/driver_test.cpp
#
# CXX (default c++) and EMU_CXXFLAGS (e.g. the sanitizer flags of TPO_EMU_CHECK's mode) apply.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cxx="${CXX:-c++}"
flags=(-std=c++17 -O2 -g -fPIC -fvisibility=hidden -Wall -Wextra -Wno-unused-parameter)
# shellcheck disable=SC2206
extra=(${EMU_CXXFLAGS:-})

build() {  # OUTDIR ENGINE...
  local out="$1"
  shift
  mkdir -p "$out"
  "$cxx" "${flags[@]}" "${extra[@]}" -shared -Wl,-soname,libcuda.so.1 -o "$out/libcuda.so.1" \
    "$here/driver.cpp" "$here/loader.cpp" "$@" -lpthread
  ln -sf libcuda.so.1 "$out/libcuda.so"
  "$cxx" "${flags[@]}" "${extra[@]}" -shared -Wl,-soname,libcublas.so.13 -o "$out/libcublas.so.13" \
    "$here/cublas.cpp" -L"$out" -l:libcuda.so.1 -Wl,-rpath,'$ORIGIN' -lpthread
  ln -sf libcublas.so.13 "$out/libcublas.so"
}

if [ "${1:-}" = test ]; then
  out="${2:?usage: build.sh test OUTDIR}"
  build "$out" "$here/tests/test_engine.cpp"
  "$cxx" "${flags[@]}" "${extra[@]}" -o "$out/driver_test" "$here/tests/driver_test.cpp" \
    -L"$out" -l:libcuda.so.1 -l:libcublas.so.13 -Wl,-rpath,"$out"
  "$out/driver_test"
  exit
fi
[ $# -ge 2 ] || { echo "usage: build.sh OUTDIR ENGINE... | build.sh test OUTDIR" >&2; exit 2; }
build "$@"
