#!/usr/bin/env python3
"""Writes the seed corpus of the `eval_input` fuzz target (fuzz/corpus/eval_input/) and the
hand-made reproducers of its findings (fuzz/regressions/eval_input/).

Standard library only: a safetensors file is an 8-byte little-endian header length, a JSON
header, then the tensors' bytes. Run from anywhere: `python3 fuzz/make_seeds.py`.
Valid files (uniform, ragged, every float dtype, -inf exclusions, K = 1, extreme magnitudes)
and invalid ones (truncated, bad header, wrong dtype or shape, NaN, negative or 2-D sizes).
"""
import json
import math
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "eval_input")

FMT = {"F64": ("<d", 8), "F32": ("<f", 4), "I64": ("<q", 8), "I32": ("<i", 4), "U8": ("<B", 1)}


def pack(dtype, values):
    if dtype == "BF16":
        return b"".join(struct.pack("<f", v)[2:] for v in values)
    if dtype == "F16":
        return b"".join(struct.pack("<e", v) for v in values)
    f, _ = FMT[dtype]
    return b"".join(struct.pack(f, v) for v in values)


def st(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, values) -> safetensors bytes."""
    header, data = {}, b""
    for name, dtype, shape, values in tensors:
        b = pack(dtype, values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main():
    os.makedirs(OUT, exist_ok=True)
    seeds = {}
    shutil.copy(os.path.join(HERE, "..", "examples", "data", "rollout.safetensors"),
                os.path.join(OUT, "valid-rollout-f32-8x16"))
    ninf = -math.inf
    seeds["valid-ragged-f64-excluded"] = st([
        ("logp", "F64", [8], [-1.0, -2.0, -0.5, -3.0, -1.5, -2.5, -0.1, -9.0]),
        ("logp_old", "F64", [8], [-1.1, ninf, -0.4, -3.0, -1.4, ninf, -0.2, -8.0]),
        ("scores", "F64", [8], [1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.25, 0.0]),
        ("group_sizes", "I64", [3], [3, 1, 4]),
    ])
    seeds["valid-bf16-onpolicy-2x4"] = st([
        ("logp", "BF16", [2, 4], [-3.0, -2.5, -4.0, -3.25, -10.0, -11.0, -9.5, -12.0]),
        ("scores", "BF16", [2, 4], [1.0, 0.0, 0.0, 1.0, 0.25, 0.875, 0.125, 0.5]),
    ])
    seeds["valid-f16-k1"] = st([("logp", "F16", [1, 1], [-0.5]), ("scores", "F16", [1, 1], [1.0])])
    seeds["valid-f32-i32-sizes-extreme"] = st([
        ("logp", "F32", [5], [-3.0e38, -1e-45, 0.0, -1e30, -7.0]),
        ("scores", "F32", [5], [3.0e38, -3.0e38, 1e-45, 0.0, 1.0]),
        ("group_sizes", "I32", [2], [2, 3]),
    ], metadata={"producer": "seed"})
    seeds["invalid-empty"] = b""
    seeds["invalid-truncated"] = seeds["valid-bf16-onpolicy-2x4"][:40]
    seeds["invalid-header-length"] = struct.pack("<Q", 2**63) + b"{}"
    seeds["invalid-json"] = struct.pack("<Q", 8) + b'{"logp":'
    seeds["invalid-int-logp"] = st([("logp", "I32", [1, 2], [1, 2]), ("scores", "F32", [1, 2], [0.0, 1.0])])
    seeds["invalid-shape-mismatch"] = st([
        ("logp", "F32", [2, 2], [-1.0] * 4), ("scores", "F32", [4], [0.0] * 4)])
    seeds["invalid-nan-scores"] = st([
        ("logp", "F64", [1, 3], [-1.0, -2.0, -3.0]), ("scores", "F64", [1, 3], [0.0, math.nan, 1.0])])
    seeds["invalid-negative-sizes"] = st([
        ("logp", "F32", [2], [-1.0, -2.0]), ("scores", "F32", [2], [0.0, 1.0]),
        ("group_sizes", "I64", [2], [3, -1])])
    seeds["invalid-2d-sizes"] = st([
        ("logp", "F32", [2], [-1.0, -2.0]), ("scores", "F32", [2], [0.0, 1.0]),
        ("group_sizes", "U8", [1, 1], [2])])
    seeds["invalid-3d-logp"] = st([
        ("logp", "F32", [1, 1, 2], [-1.0, -2.0]), ("scores", "F32", [1, 1, 2], [0.0, 1.0])])
    seeds["invalid-all-excluded"] = st([
        ("logp", "F32", [1, 2], [-1.0, -2.0]), ("logp_old", "F32", [1, 2], [ninf, ninf]),
        ("scores", "F32", [1, 2], [0.0, 1.0])])
    for name, b in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(b)


def regressions():
    """Minimal reproducers of the findings (fuzz/regressions/eval_input/), replayed by
    tests/fuzz_regressions.rs."""
    out = os.path.join(HERE, "regressions", "eval_input")
    os.makedirs(out, exist_ok=True)
    files = {
        # logp_old of magnitude 1e17: l + u / eta rounds to l, and l - (max + ln 2) to 0, so the
        # target is [1, 1] (sums to 2); fit() then refuses it as "pass the output of target()".
        "target-sums-to-2-large-logp-old": st([
            ("logp", "F64", [1, 2], [-1.0, -1.0]),
            ("logp_old", "F64", [1, 2], [-1e17, -1e17]),
            ("scores", "F64", [1, 2], [0.0, 1.0])]),
        # logp of magnitude 1e17: softmax(logp) = [1, 1], so the gradient p - q sums to 1, not 0.
        "grad-not-zero-sum-large-logp": st([
            ("logp", "F64", [1, 2], [-1e17, -1e17]),
            ("logp_old", "F64", [1, 2], [-1.0, -2.0]),
            ("scores", "F64", [1, 2], [0.0, 1.0])]),
        # The int64 group_sizes: the sum wraps to 2 (a panic with overflow checks on).
        "group-sizes-overflow": st([
            ("logp", "F32", [3], [-1.0, -2.0, -3.0]),
            ("scores", "F32", [3], [0.0, 1.0, 0.5]),
            ("group_sizes", "I64", [3], [2**63 - 1, 2**63 - 1, 4])]),
    }
    for name, b in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(b)


if __name__ == "__main__":
    main()
    regressions()
