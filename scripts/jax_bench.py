"""Per-step time of the authors' JAX code on this machine's CPU: the JAX side of BENCHMARKS.md's
side-by-side comparison with `cargo run --release --example reversal_bench`.

    python scripts/jax_bench.py STEPS [--seeds N] [--reps R] [METHOD ...]

It needs a checkout of the authors' repository (JeanKaddour/tpo), kept outside this one, whose
`src/` is found through TPO_JAX_SRC (default /tmp/jaxtpo/src), and jax, flax and optax in the
Python that runs it (BENCHMARKS.md names the versions). It calls their
`_build_trial_run_fns(...)` (the jitted per-seed run of `_trial.py`) for N seeds (default 1),
B = 100, K = 8, 4 epochs, V = 2, with STEPS episodes: once (compile + run, printed), then R more
times (default 2), and prints the fastest repeat divided by STEPS (compile excluded). Methods: tpo_token, grpo_token, ppo, dg
(bag-of-tokens reward, H = 10) and tpo, grpo (terminal reward, H = 7); default: all six.

`--seeds N` (default 1) runs seeds 0 to N - 1 in one call, as their code runs a table's seeds (the
per-seed run is vmapped over the seeds), and prints the seconds per step of all N together: the
throughput a 20-seed table needs. `--reps R` (default 2) sets the timed repeats.
"""

import os
import sys
import time

sys.path.insert(0, os.environ.get("TPO_JAX_SRC", "/tmp/jaxtpo/src"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tpo.experiments._trial import _build_trial_run_fns  # noqa: E402

CASES = [
    ("tpo_token", 10, "bag_of_tokens"),
    ("grpo_token", 10, "bag_of_tokens"),
    ("ppo", 10, "bag_of_tokens"),
    ("dg", 10, "bag_of_tokens"),
    ("tpo", 7, "terminal"),
    ("grpo", 7, "terminal"),
]


def bench(algo, h, reward, steps, n_seeds=1, reps=2):
    # Positional arguments of _build_trial_run_fns: algorithms, H, V, episodes, B, lr, eta,
    # PPO clip, epochs, K, task, reward, TPO's eta.
    fns = _build_trial_run_fns((algo,), h, 2, steps, 100, 1e-4, 1.0, 0.2, 4, 8, "reverse_copy", reward, 1.0)
    f = fns[algo]
    seeds = jnp.arange(0, n_seeds)
    t = time.time()
    jax.block_until_ready(f(seeds))
    c = time.time() - t
    runs = []
    for _ in range(reps):
        t = time.time()
        jax.block_until_ready(f(seeds))
        runs.append(time.time() - t)
    r = min(runs)
    print(
        f"jax {algo:<11} {reward:<13} H={h} compile+run {c:7.2f} s, run {r:7.2f} s "
        f"({steps} steps, {n_seeds} seed{'s' if n_seeds > 1 else ''}): {r / steps:.4f} s/step",
        flush=True,
    )


def count(args, flag, default):
    """The value of `flag N` in `args` (removed from it), a whole number >= 1, or `default`."""
    if flag not in args:
        return default
    i = args.index(flag)
    if i + 1 >= len(args) or not args[i + 1].isdecimal() or int(args[i + 1]) < 1:
        sys.exit(f"{flag} takes a whole number >= 1")
    n = int(args[i + 1])
    del args[i : i + 2]
    return n


if __name__ == "__main__":
    usage = "usage: python scripts/jax_bench.py STEPS [--seeds N] [--reps R] [METHOD ...]  (STEPS >= 1)"
    if len(sys.argv) < 2 or not sys.argv[1].isdecimal() or int(sys.argv[1]) < 1:
        sys.exit(usage)
    steps = int(sys.argv[1])
    rest = sys.argv[2:]
    n_seeds = count(rest, "--seeds", 1)
    reps = count(rest, "--reps", 2)
    for a in rest:
        if a.startswith("-"):
            sys.exit(f"unknown or repeated option {a!r}; {usage}")
    only = rest or None
    known = {a for a, _, _ in CASES}
    bad = [m for m in (only or []) if m not in known]
    if bad:
        sys.exit(f"unknown method {bad[0]!r}: one of {', '.join(a for a, _, _ in CASES)}")
    for a, h, r in CASES:
        if only is None or a in only:
            bench(a, h, r, steps, n_seeds, reps)
