"""The CUDA path of the ops: the tpo crate's kernels on CUDA tensors, on PyTorch's current stream.

Tensors cross to the native module as raw descriptors ``(data_ptr, numel, dtype)`` of contiguous
tensors kept alive across the call, with ``torch.cuda.current_stream(device).cuda_stream``; the
kernels read the tensors' memory in place and write into output tensors allocated here, ordered
on that stream. The native module checks every address with the driver (device memory of the
device's primary context, aligned, inside its allocation) before use.

Each call waits for the current stream (to read the kernels' error words, and the small results
the native side copies out), so that bad data raises ``ValueError`` at the call, as on the CPU;
for the same reason the ops cannot be captured in a CUDA graph (refused with ``ValueError``). The kernels compute in float32: log-probs
and logits are read in float32, bfloat16 or float16 (float64 is refused), scores, ``logp_old``
(for the token paths) and stored targets are read as float32, the target and diagnostics are
float32 widened to float64 for the op's outputs, the loss is returned in the input's dtype.
``group_loss`` reads ``logp_old`` in ``logp``'s dtype. ``loss_from_hidden`` runs the fused
bfloat16 path (GEMMs with float32 accumulation) and takes bfloat16 ``hidden`` and weight only.
"""

import math
from typing import List, Optional

import torch
from torch import Tensor

from . import _native
from ._common import path_opts as _opts

_F64 = torch.float64
_KIND = {
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
    torch.int32: "i32",
    torch.uint8: "u8",
}
# Rows of one tile of the fused linear path's logits workspace (tpo::cuda::GEMM_TILE).
GEMM_TILE = 128
# The fused linear path's default logits workspace: at most this many bytes (whole tiles).
DEFAULT_WORKSPACE = 1 << 30


def _desc(t: Tensor):
    """A contiguous tensor as ``(address, elements, dtype)``; the caller keeps ``t`` alive."""
    if not t.is_contiguous():
        raise ValueError("tpo internal error: a non-contiguous tensor reached the CUDA call")
    return (t.data_ptr(), t.numel(), _KIND[t.dtype])


def _on(t: Optional[Tensor], device, dtype) -> Optional[Tensor]:
    return None if t is None else t.detach().to(device=device, dtype=dtype).contiguous()


def _call(device: torch.device, native, *args) -> None:
    """Runs ``native(ordinal, stream, *args)`` for tensors on ``device``, on its current stream.

    The native side makes the device's primary context current (as PyTorch's own calls do); the
    ``torch.cuda.device`` block puts the caller's current device back afterwards. The call waits
    for the stream to read the kernels' error words, which a CUDA graph cannot capture: refused.
    """
    if torch.cuda.is_current_stream_capturing():
        raise ValueError(
            "tpo's CUDA ops wait for the stream to report bad data, so they cannot be captured in a "
            "CUDA graph (torch.cuda.graph, torch.compile(mode=\"reduce-overhead\")); call them outside it"
        )
    with torch.cuda.device(device):
        native(torch.cuda.current_device(), torch.cuda.current_stream(device).cuda_stream, *args)


def _group_outs(device, n: int, b: int, grad_dtype=None):
    outs = {
        "loss": torch.full((1,), math.nan, device=device, dtype=torch.float32),
        "target": torch.full((n,), math.nan, device=device, dtype=torch.float32),
        "stats": torch.full((5, b), math.nan, device=device, dtype=torch.float32),
    }
    if grad_dtype is not None:
        outs["grad"] = torch.full((n,), math.nan, device=device, dtype=grad_dtype)
    return outs


def _descs(outs: dict) -> dict:
    return {k: _desc(v) for k, v in outs.items()}


def _stats64(stats: Tensor) -> List[Tensor]:
    return [stats[i].to(_F64) for i in range(5)]


def group_loss(logp, sizes, scores, logp_old, target, eta, zst, anchored, kl, reduction, gng):
    """The forward of ``tpo::group_loss`` on CUDA: (loss, q, group_loss, kl_q_p, entropy_q,
    grad_norm, kl_q_pold), as the CPU implementation returns them."""
    dev = logp.device
    x = logp.detach().contiguous()
    s, o, q = _on(scores, dev, torch.float32), _on(logp_old, dev, x.dtype), _on(target, dev, torch.float32)
    outs = _group_outs(dev, x.shape[0], len(sizes))
    _call(
        dev, _native.cuda_group_loss, _desc(x), sizes, _opt(s), _opt(o), _opt(q), eta, zst, anchored, kl,
        reduction, gng, 1.0, _descs(outs),
    )  # fmt: skip
    loss = outs["loss"].reshape(()).to(logp.dtype)
    return (loss, outs["target"].to(_F64), *_stats64(outs["stats"]))


def group_loss_grad(grad: Tensor, logp, target, sizes, kl, reduction, gng) -> Tensor:
    """The backward of ``tpo::group_loss`` on CUDA: ``grad * w (sum(q) p - q)`` in logp's dtype."""
    dev = logp.device
    x = logp.detach().contiguous()
    q = _on(target, dev, torch.float32)
    outs = {"grad": torch.full((x.shape[0],), math.nan, device=dev, dtype=x.dtype)}
    _call(
        dev, _native.cuda_group_loss, _desc(x), sizes, None, None, _desc(q), 1.0, 1e-6, True, kl, reduction,
        gng, float(grad), _descs(outs),
    )  # fmt: skip
    return outs["grad"].reshape(logp.shape)


def _opt(t: Optional[Tensor]):
    return None if t is None else _desc(t)


def _path_inputs(dev, tokens, mask, scores, logp_old, target):
    # Token ids cross as int32; the kernels refuse ids outside the vocabulary, negative ones too
    # (read as u32), but an int64 id of 2^32 or more would wrap into it: refused here.
    if tokens.dtype == torch.int64 and tokens.numel() and int(tokens.max()) >= 2**31:
        raise ValueError(f"tokens holds {int(tokens.max())}: token ids must be in 0..V")
    return (
        tokens.detach().to(device=dev, dtype=torch.int32).contiguous(),
        mask.detach().to(device=dev, dtype=torch.uint8).contiguous(),
        _on(scores, dev, torch.float32),
        _on(logp_old, dev, torch.float32),
        _on(target, dev, torch.float32),
    )


def _batch(y, seq_offsets, m, group_sizes, s, o, q) -> dict:
    """The native ``PathBatch`` (the tensors must stay alive across the call)."""
    return {
        "tokens": _desc(y),
        "seq_offsets": list(seq_offsets),
        "mask": _desc(m),
        "group_sizes": list(group_sizes),
        "scores": _opt(s),
        "logp_old": _opt(o),
        "target": _opt(q),
    }


def _path_outs(dev, t: int, s: int, b: int, entropy: bool) -> dict:
    f = lambda n: torch.full((n,), math.nan, device=dev, dtype=torch.float32)  # noqa: E731
    outs = {
        "loss": f(1),
        "target": f(s),
        "seq_logp": f(s),
        "stats": torch.full((5, b), math.nan, device=dev, dtype=torch.float32),
        "token_logp": f(t),
    }
    if entropy:
        outs["token_entropy"] = f(t)
    return outs


def _path_result(outs: dict, like: Tensor, t: int):
    loss = outs["loss"].reshape(()).to(like.dtype)
    ent = outs["token_entropy"].to(_F64) if "token_entropy" in outs else torch.full(
        (t,), math.nan, device=like.device, dtype=_F64
    )
    return (
        loss,
        outs["target"].to(_F64),
        outs["seq_logp"].to(_F64),
        *_stats64(outs["stats"]),
        outs["token_logp"].to(_F64),
        ent,
    )


def logits_forward(logits, tokens, seq_offsets, mask, group_sizes, scores, logp_old, target, temperature,
                   entropy, seq_reduce, eta, zst, anchored, kl, reduction, gng):  # fmt: skip
    """The forward of ``tpo::loss_from_logits`` on CUDA (the logits are only read)."""
    dev = logits.device
    z = logits.detach().contiguous()
    t, v = z.shape
    y, m, s, o, q = _path_inputs(dev, tokens, mask, scores, logp_old, target)
    outs = _path_outs(dev, t, len(seq_offsets) - 1, len(group_sizes), entropy)
    _call(
        dev, _native.cuda_loss_from_logits, _desc(z), v, _batch(y, seq_offsets, m, group_sizes, s, o, q),
        _opts(temperature, entropy, seq_reduce, eta, zst, anchored, kl, reduction, gng, 1.0),
        None, _descs(outs),
    )  # fmt: skip
    return _path_result(outs, logits, t)


def logits_grad(grad, logits, tokens, seq_offsets, mask, group_sizes, target, temperature, seq_reduce, kl,
                reduction, gng) -> Tensor:  # fmt: skip
    """The backward of ``tpo::loss_from_logits`` on CUDA: dL/dlogits, written by the kernels over
    a copy of the logits (one ``[T, V]`` buffer, which is the returned gradient)."""
    dev = logits.device
    g = logits.detach().clone(memory_format=torch.contiguous_format)
    y, m, _s, _o, q = _path_inputs(dev, tokens, mask, None, None, target)
    _call(
        dev, _native.cuda_loss_from_logits, _desc(g), g.shape[1], _batch(y, seq_offsets, m, group_sizes, None, None, q),
        _opts(temperature, False, seq_reduce, 1.0, 1e-6, True, kl, reduction, gng, float(grad)),
        _desc(g), {},
    )  # fmt: skip
    return g.reshape(logits.shape)


def workspace_budget(memory_budget: Optional[int], t: int, v: int) -> int:
    """The fused linear path's logits workspace in bytes: ``memory_budget``, or whole tiles of
    ``GEMM_TILE x V`` bfloat16 up to ``DEFAULT_WORKSPACE`` (at least one, at most what ``T``
    tokens need). A budget below one tile is refused: the path cannot run in less."""
    tile = GEMM_TILE * v * 2
    if memory_budget is not None:
        if memory_budget < tile:
            raise ValueError(
                f"memory_budget={memory_budget} bytes is below one tile of the CUDA path's logits "
                f"workspace ({GEMM_TILE} tokens x {v} vocabulary entries in bfloat16 = {tile} bytes)"
            )
        return int(memory_budget)
    tiles = max(1, min(DEFAULT_WORKSPACE // tile, -(-t // GEMM_TILE)))
    return tiles * tile


def _hidden_call(hidden, weight, tokens, seq_offsets, mask, group_sizes, scores, logp_old, target, temperature,
                 entropy, seq_reduce, eta, zst, anchored, kl, reduction, gng, grad_scale, budget, grads):  # fmt: skip
    dev = hidden.device
    h, w = hidden.detach().contiguous(), weight.detach().contiguous()
    t, d = h.shape
    y, m, s, o, q = _path_inputs(dev, tokens, mask, scores, logp_old, target)
    outs = _path_outs(dev, t, len(seq_offsets) - 1, len(group_sizes), entropy)
    if grads:
        outs = {
            "grad_hidden": torch.full((t, d), math.nan, device=dev, dtype=torch.float32),
            "grad_weight": torch.full(tuple(w.shape), math.nan, device=dev, dtype=torch.float32),
        }
    _call(
        dev, _native.cuda_loss_from_hidden, _desc(h), _desc(w), d, _batch(y, seq_offsets, m, group_sizes, s, o, q),
        _opts(temperature, entropy, seq_reduce, eta, zst, anchored, kl, reduction, gng, grad_scale),
        workspace_budget(budget, t, w.shape[0]), _descs(outs),
    )  # fmt: skip
    return outs


def hidden_forward(hidden, weight, tokens, seq_offsets, mask, group_sizes, scores, logp_old, target,
                   temperature, entropy, seq_reduce, eta, zst, anchored, kl, reduction, gng, budget):  # fmt: skip
    """The forward of ``tpo::loss_from_hidden`` on CUDA (the fused path; its gradients, computed
    with the loss, are dropped here and recomputed by the backward)."""
    outs = _hidden_call(hidden, weight, tokens, seq_offsets, mask, group_sizes, scores, logp_old, target,
                        temperature, entropy, seq_reduce, eta, zst, anchored, kl, reduction, gng, 1.0,
                        budget, False)  # fmt: skip
    return _path_result(outs, hidden, hidden.shape[0])


def hidden_grad(grad, hidden, weight, tokens, seq_offsets, mask, group_sizes, target, temperature, seq_reduce,
                kl, reduction, gng, budget):  # fmt: skip
    """The backward of ``tpo::loss_from_hidden`` on CUDA: (dL/dhidden, dL/dweight), accumulated
    in float32 by the kernels, returned in the inputs' dtype."""
    outs = _hidden_call(hidden, weight, tokens, seq_offsets, mask, group_sizes, None, None, target,
                        temperature, False, seq_reduce, 1.0, 1e-6, True, kl, reduction, gng,
                        float(grad), budget, True)  # fmt: skip
    return outs["grad_hidden"].to(hidden.dtype), outs["grad_weight"].to(weight.dtype)
