#!/usr/bin/env python3
"""PyTorch baseline for the fused TPO kernel: the same loss written the paper's way.

    python3 scripts/torch_baseline.py [--json OUT.jsonl]

For each benchmark shape (B groups of K) and dtype (f32, bf16) it times forward + backward of

    u    = z-score of the scores (population std; 0 where std <= 1e-6)
    q    = softmax(log_softmax(logp_old) + u / eta).detach()
    loss = -(q * log_softmax(logp)).sum(-1).mean();  loss.backward()

eagerly and under torch.compile, with CUDA events: 20 warm-up steps (after compilation), then 30
batches of back-to-back steps, the median per step. It also measures the device-to-device copy
bandwidth (1 GiB, bytes read + written) in the same run. One JSON object per line, like
examples/gpu_bench.rs, so scripts/bench_table.py can put them side by side.
"""
import argparse
import json
import statistics

import torch

SHAPES = [("64x8", 64, 8), ("1024x16", 1024, 16), ("16384x16", 16384, 16), ("262144x64", 262144, 64), ("8x100000", 8, 100000)]


def tpo_loss(logp, logp_old, scores, eta: float = 1.0):
    mean = scores.mean(-1, keepdim=True)
    std = scores.std(-1, unbiased=False, keepdim=True)
    u = torch.where(std > 1e-6, (scores - mean) / std, torch.zeros_like(scores))
    q = torch.softmax(torch.log_softmax(logp_old.float(), -1) + u / eta, -1).detach()
    return -(q * torch.log_softmax(logp.float(), -1)).sum(-1).mean()


def inputs(b, k, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logp_old = (-200.0 * torch.rand(b, k, device="cuda", generator=g) - 20.0).to(dtype)
    logp = (logp_old.float() + 0.1 * (torch.rand(b, k, device="cuda", generator=g) - 0.5)).to(dtype).requires_grad_(True)
    scores = (torch.rand(b, k, device="cuda", generator=g) < 0.4).float()
    return logp, logp_old, scores


def median_ms(step, batches=30, per_batch=50):
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_batch):
            step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per_batch)
    return statistics.median(times)


def bench(fn, b, k, dtype):
    nbytes = b * k * (2 * torch.finfo(dtype).bits // 8 + 4 + 4 + torch.finfo(dtype).bits // 8)
    sets = [inputs(b, k, dtype, s) for s in range(4 if nbytes < (48 << 20) else 1)]
    i = [0]

    def step():
        logp, logp_old, scores = sets[i[0] % len(sets)]
        i[0] += 1
        logp.grad = None
        fn(logp, logp_old, scores).backward()

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    return median_ms(step, per_batch=5 if nbytes > (256 << 20) else 50)


def from_logits_loss(logits, tokens, mask, logp_old, scores, nseq, b, k):
    """The from-logits path the plain PyTorch way: fp32 log_softmax over the vocabulary, gather,
    masked sequence sums, then the TPO group loss on the sequence log-probs."""
    lp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    l = (lp * mask).view(nseq, -1).sum(-1)
    return tpo_loss(l.view(b, k), logp_old.view(b, k), scores.view(b, k))


def bench_logits(fn, label):
    nseq, length, vocab, b, k = 128, 128, 151936, 8, 16
    t = nseq * length
    g = torch.Generator(device="cuda").manual_seed(3)
    logits = (8 * torch.rand(t, vocab, device="cuda", generator=g) - 4).to(torch.bfloat16).requires_grad_(True)
    tokens = torch.randint(0, vocab, (t,), device="cuda", generator=g)
    mask = (torch.arange(t, device="cuda") % length >= 16).float()
    scores = (torch.rand(nseq, device="cuda", generator=g) < 0.5).float()
    logp_old = -100 * torch.rand(nseq, device="cuda", generator=g)

    def step():
        logits.grad = None
        fn(logits, tokens, mask, logp_old, scores, nseq, b, k).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, batches=10, per_batch=2)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{label:>13} from-logits T={t} V={vocab} bf16: {ms:.3f} ms, peak {peak:.1f} GiB")
    return {"impl": label, "shape": f"logits_T{t}_V{vocab}", "B": nseq, "K": length, "dtype": "bf16",
            "median_us": round(ms * 1e3, 3), "peak_gib": round(peak, 2)}


def bench_hidden(label, dim):
    """The hidden-state path: logits = h W^T (bf16), then from_logits_loss, forward + backward to
    h and W; 'torch_gemms' times the same four GEMMs alone (logits twice, dh, dW), and
    'liger_flce' Liger-Kernel's fused linear cross-entropy on the same shapes (a CE loss, not
    TPO: the nearest fused-linear kernel it ships)."""
    nseq, length, vocab, b, k = 128, 128, 151936, 8, 16
    t = nseq * length
    g = torch.Generator(device="cuda").manual_seed(dim)
    h = (0.5 * torch.randn(t, dim, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_(True)
    w = (0.02 * torch.randn(vocab, dim, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_(True)
    tokens = torch.randint(0, vocab, (t,), device="cuda", generator=g)
    mask = (torch.arange(t, device="cuda") % length >= 16).float()
    scores = (torch.rand(nseq, device="cuda", generator=g) < 0.5).float()
    logp_old = -100 * torch.rand(nseq, device="cuda", generator=g)
    if label == "torch_gemms":
        dz = torch.randn(t, vocab, device="cuda", dtype=torch.bfloat16)
        hd, wd = h.detach(), w.detach()

        def step():
            hd @ wd.T
            hd @ wd.T
            dz @ wd
            dz.T @ hd
    elif label == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        flce = LigerFusedLinearCrossEntropyLoss()

        def step():
            h.grad = w.grad = None
            flce(w, h, tokens).backward()
    else:
        loss_fn = from_logits_loss if label == "torch_eager" else torch.compile(from_logits_loss)

        def step():
            h.grad = w.grad = None
            loss_fn(h @ w.T, tokens, mask, logp_old, scores, nseq, b, k).backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = median_ms(step, batches=5, per_batch=1)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    print(f"{label:>13} hidden T={t} H={dim} V={vocab}: {ms:.2f} ms, peak extra {extra:.2f} GiB")
    return {"impl": label, "shape": f"hidden_T{t}_H{dim}_V{vocab}", "B": nseq, "K": length, "dtype": "bf16",
            "median_us": round(ms * 1e3, 1), "peak_extra_gib": round(extra, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    n = 1 << 28
    src, dst = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    src.uniform_()
    copy_ms = median_ms(lambda: dst.copy_(src), batches=20, per_batch=1)
    copy_gbps = 2 * n * 4 / (copy_ms * 1e-3) / 1e9
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"device-to-device copy (torch): {copy_gbps:.1f} GB/s")
    rows.append({"impl": "torch_copy", "copy_gbps": round(copy_gbps, 1)})
    del src, dst
    compiled = torch.compile(tpo_loss)
    for dtype, dname in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
        for label, b, k in SHAPES:
            for impl, fn in [("torch_eager", tpo_loss), ("torch_compile", compiled)]:
                try:
                    ms = bench(fn, b, k, dtype)
                except Exception as e:  # report, keep going
                    print(f"{impl} {label} {dname}: failed: {type(e).__name__}: {e}")
                    continue
                rows.append({"impl": impl, "shape": label, "B": b, "K": k, "dtype": dname, "median_us": round(ms * 1e3, 3)})
                print(f"{impl:>13} {label:>10} {dname:>5}: {ms * 1e3:10.2f} us")
    for impl, fn in [("torch_eager", from_logits_loss), ("torch_compile", torch.compile(from_logits_loss))]:
        try:
            rows.append(bench_logits(fn, impl))
        except Exception as e:  # out of memory, compile failure: report, keep going
            print(f"{impl} from-logits: failed: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    for dim in (2048, 4096):
        for impl in ("torch_gemms", "torch_eager", "torch_compile", "liger_flce"):
            try:
                rows.append(bench_hidden(impl, dim))
            except Exception as e:
                print(f"{impl} hidden H={dim}: failed: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
