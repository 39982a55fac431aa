#!/usr/bin/env bash
# Installs a pinned CUDA 13.0 nvcc (with ptxas, NVVM, the runtime and CCCL headers) from PyPI into a
# local folder, without a GPU or a system CUDA toolkit, and prints how to point the build at it.
#
#   scripts/install-nvcc.sh [DIR]        (DIR defaults to .cuda in the repository root)
#
# CUDA 13.0 is pinned because the lent GPUs' driver supports CUDA 13.0: PTX from a newer nvcc
# would not load there. Then: eval "$(scripts/install-nvcc.sh)" exports CUDA_HOME and NVCC and puts nvcc on PATH.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$root/.cuda}"
site="$dir/site"
pkgs=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
)
if [ ! -f "$dir/.installed" ] || [ "$(cat "$dir/.installed")" != "${pkgs[*]}" ]; then
  rm -rf "$site"
  mkdir -p "$site"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$site" "${pkgs[@]}" >&2
  echo "${pkgs[*]}" > "$dir/.installed"
fi
nvcc="$(find "$site" -path '*/bin/nvcc' -type f | head -n 1)"
[ -n "$nvcc" ] || { echo "install-nvcc: nvcc not found under $site" >&2; exit 1; }
home="$(dirname "$(dirname "$nvcc")")"
chmod +x "$home"/bin/* "$home"/nvvm/bin/* 2>/dev/null || true
echo "install-nvcc: $("$nvcc" --version | tail -n 2 | head -n 1)" >&2
# nvcc also goes on PATH: cudarc (feature `cuda-version-from-build-system`) asks `nvcc --version`.
echo "export CUDA_HOME='$home' NVCC='$nvcc' PATH='$home/bin':\"\$PATH\""
