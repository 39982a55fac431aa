#!/usr/bin/env bash
# The Python wheel's tests (python/, issue 12), on a machine without a GPU:
#
#   bash scripts/test-python.sh
#
# 1. maturin (pinned) into a build venv, `maturin build --release`: the abi3 wheel, in .py/dist/,
#    with its CUDA path (the crate's kernels, so nvcc: scripts/install-nvcc.sh, no GPU needed).
# 2. torch, pytest and numpy (pinned) from PyPI into .py/torch-env, once: PyPI's Linux torch pulls
#    the nvidia-* CUDA packages (about 5.4 GB installed, 2 to 4 min here); the venv is kept and reused
#    while the pins are unchanged (pip keeps no cache of those downloads on this machine).
# 3. A FRESH venv (.py/fresh, remade every run) that sees that torch through a .pth file; the wheel
#    is installed into it with `pip install --no-index` (so its dependency on torch is satisfied by
#    the installed torch, nothing downloaded), and `python -c "import tpo"` must work.
#    TPO_PY_FRESH_TORCH=1 installs torch from PyPI into the fresh venv itself instead (slower).
# 4. pytest python/tests in the fresh venv; "no tests collected" (exit 5) is a failure. Then
#    python/tests/test_cuda_emulated.py again on the emulated CUDA device (emu/, built here if
#    scripts/test-emulated-gpu.sh has not): the wheel's CUDA calls on device memory and streams
#    made through the library, against the CPU path.
# 5. The TRL recipe, python/examples/trl_tpo.py, in a venv beside the same torch with trl and
#    transformers pinned (installed once into .py/trl-env); TPO_PY_SKIP_RECIPES=1 skips it.
#
# Everything it installs lives under .py/ (gitignored). It needs python3 with venv, and cargo.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

MATURIN="maturin==1.16.0"
RECIPE_DEPS="trl==1.16.0 transformers==5.24.0"
TEST_DEPS="torch==2.15.0 pytest==9.2.0 numpy==2.4.6"
py="$root/.py"
mkdir -p "$py"
pip_q=(--quiet --disable-pip-version-check --root-user-action=ignore)
# python3 with venv and ensurepip (Debian ships ensurepip in python3-venv).
if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  apt-get update -qq && apt-get install -y -qq python3 python3-venv python3-dev >/dev/null
fi

site_of() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

# A venv at $1 holding the pinned packages $2 (remade when the pins change).
pinned_venv() {
  local dir="$1" want="$2"
  if [ ! -f "$dir/.installed" ] || [ "$(cat "$dir/.installed")" != "$want" ]; then
    rm -rf "$dir"
    python3 -m venv "$dir"
    # shellcheck disable=SC2086
    "$dir/bin/python" -m pip install "${pip_q[@]}" $want >&2
    echo "$want" > "$dir/.installed"
  fi
}

if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null; then
  eval "$(scripts/install-nvcc.sh)"
fi

echo "== build the wheel ($MATURIN)"
pinned_venv "$py/build" "$MATURIN"
rm -rf "$py/dist"
(cd python && "$py/build/bin/maturin" build --release --quiet -o "$py/dist")
wheel="$(ls "$py"/dist/tpo-*.whl)"
echo "built $wheel"

echo "== a fresh venv with torch from PyPI ($TEST_DEPS)"
rm -rf "$py/fresh"
python3 -m venv "$py/fresh"
if [ "${TPO_PY_FRESH_TORCH:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  "$py/fresh/bin/python" -m pip install "${pip_q[@]}" $TEST_DEPS
else
  pinned_venv "$py/torch-env" "$TEST_DEPS"
  # The venv's own old setuptools would shadow torch-env's (torch requires setuptools>=77).
  "$py/fresh/bin/python" -m pip uninstall "${pip_q[@]}" -y setuptools
  site_of "$py/torch-env" > "$(site_of "$py/fresh")/torch-env.pth"
fi
"$py/fresh/bin/python" -m pip install "${pip_q[@]}" --no-index "$wheel"

echo "== import tpo (no GPU)"
(cd "$py" && "$py/fresh/bin/python" -c "import tpo, torch; print('tpo', tpo.__version__, 'with torch', torch.__version__, 'from', tpo.__file__)")

echo "== pytest python/tests"
set +e
(cd python/tests && "$py/fresh/bin/python" -m pytest -p no:cacheprovider -q .)
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: python/tests must hold the suite"
  exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"

echo "== the wheel's CUDA path on the emulated CUDA device (python/tests/test_cuda_emulated.py)"
emu="$root/target/emu/default"
bash emu/build-kernels.sh default "$emu/engine"
bash emu/driver/build.sh "$emu/lib" "$emu/engine"
(cd python/tests && TPO_EMU_LIB="$emu/lib" LD_LIBRARY_PATH="$emu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "$py/fresh/bin/python" -m pytest -p no:cacheprovider -q -rs test_cuda_emulated.py)

if [ "${TPO_PY_SKIP_RECIPES:-0}" != 1 ] && [ "${TPO_PY_FRESH_TORCH:-0}" != 1 ]; then
  echo "== the TRL recipe: python/examples/trl_tpo.py ($RECIPE_DEPS)"
  want="$RECIPE_DEPS $TEST_DEPS"
  if [ ! -f "$py/trl-env/.installed" ] || [ "$(cat "$py/trl-env/.installed")" != "$want" ]; then
    rm -rf "$py/trl-env"
    python3 -m venv "$py/trl-env"
    "$py/trl-env/bin/python" -m pip uninstall "${pip_q[@]}" -y setuptools
    site_of "$py/torch-env" > "$(site_of "$py/trl-env")/torch-env.pth"
    # shellcheck disable=SC2086
    "$py/trl-env/bin/python" -m pip install "${pip_q[@]}" $RECIPE_DEPS
    echo "$want" > "$py/trl-env/.installed"
  fi
  "$py/trl-env/bin/python" -m pip install "${pip_q[@]}" --no-index --no-deps --force-reinstall "$wheel"
  log="$py/trl_tpo.log"
  if (cd "$py" && "$py/trl-env/bin/python" "$root/python/examples/trl_tpo.py" > "$log" 2>&1); then
    grep -E "^generation|loss decreased" "$log"
  else
    tail -n 30 "$log"
    echo "the TRL recipe failed (its whole output: $log)"
    exit 1
  fi
fi
