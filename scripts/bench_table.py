#!/usr/bin/env python3
"""Merges examples/gpu_bench.rs and scripts/torch_baseline.py results into a markdown table.

    python3 scripts/bench_table.py tpo.jsonl torch.jsonl
"""
import json
import sys

rows = [json.loads(l) for f in sys.argv[1:] for l in open(f) if l.strip()]
copy = next((r["copy_gbps"] for r in rows if r["impl"] == "copy"), None)
tcopy = next((r["copy_gbps"] for r in rows if r["impl"] == "torch_copy"), None)
t = {(r["impl"], r["shape"], r["dtype"]): r for r in rows if "shape" in r}
print(f"Device-to-device copy bandwidth: {copy} GB/s (cudarc memcpy), {tcopy} GB/s (torch copy_)\n")
print("| shape B×K | dtype | tpo fused fwd+bwd (µs) | groups/s | effective GB/s | % of copy BW | torch eager (µs) | torch.compile (µs) | speed-up vs eager | vs compile |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (impl, shape, dtype), r in sorted(t.items(), key=lambda kv: (kv[0][2], kv[1].get("B", 0) * kv[1].get("K", 0))):
    if impl != "tpo" or shape.startswith("hidden_"):
        continue
    e = t.get(("torch_eager", shape, dtype), {}).get("median_us")
    c = t.get(("torch_compile", shape, dtype), {}).get("median_us")
    us = r["median_us"]
    fmt = lambda x: f"{x:.1f}" if x is not None else "n/a"
    ratio = lambda x: f"{x / us:.1f}×" if x is not None else "n/a"
    print(f"| {shape} | {dtype} | {us:.2f} | {r['groups_per_s']:.3g} | {r['gbps']:.0f} | {100 * r['gbps'] / r['copy_gbps']:.0f}% | {fmt(e)} | {fmt(c)} | {ratio(e)} | {ratio(c)} |")

hidden = sorted({s for (i, s, d) in t if s.startswith("hidden_")})
if hidden:
    print("\nFused linear (hidden states x lm_head, forward + backward, bf16):\n")
    print("| shape | tpo (ms) | tpo GEMM rate (TFLOP/s) | tpo workspace / logits | GEMMs alone, torch (ms) | tpo / GEMMs | torch eager (ms) | torch.compile (ms) | Liger FLCE (ms) | peak extra GiB: tpo / eager / compile / Liger |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in hidden:
        get = lambda i, k="median_us": t.get((i, s, "bf16"), {}).get(k)
        ms = lambda i: f"{get(i) / 1e3:.2f}" if get(i) is not None else "n/a"
        ours, gem = get("tpo"), get("torch_gemms")
        ratio = f"{ours / gem:.2f}×" if ours and gem else "n/a"
        tf = get("tpo", "tflops")
        wsf = get("tpo", "workspace_fraction")
        peaks = " / ".join(f"{get(i, 'peak_extra_gib')}" for i in ("tpo", "torch_eager", "torch_compile", "liger_flce"))
        print(f"| {s} | {ms('tpo')} | {tf} | {100 * wsf:.1f}% | {ms('torch_gemms')} | {ratio} | {ms('torch_eager')} | {ms('torch_compile')} | {ms('liger_flce')} | {peaks} |" if wsf is not None else f"| {s} | n/a |")
    print("\nPeak extra memory: tpo's is the driver's free memory before its first call minus after, less "
          "its f32 gradient outputs (dh, dW); PyTorch's and Liger's are torch's peak allocation over the "
          "inputs, and include their bf16 gradients (h.grad, w.grad).")
