#!/usr/bin/env bash
# A stand-in nvcc for type-checking a binary that uses candle-core's `cuda` feature
# (scripts/check-candle-link.sh, default mode). Called from candle-kernels' build script
# (cargo sets CARGO_PKG_NAME=candle-kernels for it), it writes EMPTY outputs instead of compiling
# candle's CUDA kernels: `--ptx --output-directory D f.cu` gets D/f.ptx holding one comment,
# `-c -o f.o` an empty object, `--lib -o x.a` an empty archive. `cargo check` reads none of
# their contents, so the type check of every Rust crate (candle-kernels, candle-core, cudarc's
# feature unification, tpo) is the real one; only the GPU code of candle's kernels is not built
# (about 49 minutes of nvcc on a 2-core machine; `check-candle-link.sh --build` builds it for real).
# Every other caller, and every query such as `--version`, gets the real nvcc ($REAL_NVCC).
set -euo pipefail
real="${REAL_NVCC:?REAL_NVCC must name the real nvcc}"
if [ "${CARGO_PKG_NAME:-}" != candle-kernels ]; then
  exec "$real" "$@"
fi
orig=("$@")
out="" outdir="" mode="" srcs=()
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift 2 ;;
    --output-directory) outdir="$2"; shift 2 ;;
    --ptx) mode=ptx; shift ;;
    -c) mode=obj; shift ;;
    --lib) mode=lib; shift ;;
    *.cu) srcs+=("$1"); shift ;;
    *) shift ;;
  esac
done
case "$mode" in
  ptx)
    for s in "${srcs[@]}"; do
      f="${out:-${outdir:-.}/$(basename "${s%.cu}").ptx}"
      echo "// stand-in: candle-kernels' PTX is not compiled in a type check" > "$f"
    done ;;
  obj) : > "${out:?-c without -o}" ;;
  lib) printf '!<arch>\n' > "${out:?--lib without -o}" ;;
  *) exec "$real" "${orig[@]}" ;;
esac
