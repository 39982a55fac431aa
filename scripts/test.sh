#!/usr/bin/env bash
# The project's test command (README "Quick start"): every test, on a fresh machine.
#
#   bash scripts/test.sh
#
# 1. The CPU suite: `cargo test --release --features candle` (the f64 reference, properties, the
#    kernels' code on the host, the CLI, the experiments, the candle ops; tests/cartpole.rs
#    replays Gymnasium's own CartPole-v1, so a pinned gymnasium is installed first into .pydeps/
#    from PyPI).
# 2. The GPU suite on the emulated CUDA device: scripts/test-emulated-gpu.sh (it installs nvcc and
#    builds the emulator itself).
# 3. The Python wheel (python/): scripts/test-python.sh builds it, installs it into a fresh venv
#    beside PyPI's torch, and runs pytest and the TRL recipe (about 6 min and 5.9 GB cold).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

pydeps="$root/.pydeps"
want="gymnasium==1.2.2 numpy==2.2.6"
if [ ! -f "$pydeps/.installed" ] || [ "$(cat "$pydeps/.installed")" != "$want" ]; then
  rm -rf "$pydeps"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --target "$pydeps" $want >&2
  echo "$want" > "$pydeps/.installed"
fi
export PYTHONPATH="$pydeps${PYTHONPATH:+:$PYTHONPATH}"

echo "== CPU suite: cargo test --release --features candle"
cargo test --release --features candle

echo "== GPU suite on the emulated CUDA device: scripts/test-emulated-gpu.sh"
bash scripts/test-emulated-gpu.sh

echo "== the Python wheel: scripts/test-python.sh"
bash scripts/test-python.sh
