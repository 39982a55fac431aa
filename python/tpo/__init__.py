"""Target Policy Optimization (TPO, arXiv 2604.06159) losses as PyTorch custom ops.

For a group of ``K`` completions of one prompt with sequence log-probs ``l``, rollout log-probs
``l_old`` and scores ``s``:

* ``u = (s - mean(s)) / std(s)`` (population deviation; ``u = 0`` for a zero-variance group),
* the target ``q = softmax(log_softmax(l_old) + u / eta)``, held fixed,
* the loss ``L = -sum_i q_i log softmax(l)_i``, whose gradient is ``dL/dl = p - q``.

The batch loss is ``w * sum_g L_g`` with ``w = 1/B`` (``reduction="mean"``), ``1`` (``"sum"``) or
``1/global_num_groups`` (data-parallel ranks and gradient-accumulation micro-batches).

Three calls, each a ``torch.library.custom_op`` with a registered autograd formula and a fake
(meta) implementation, so they work under ``torch.compile``:

* :func:`group_loss` on sequence log-probs ``[N]``;
* :func:`loss_from_logits` on logits ``[T, V]`` with sampled tokens, backward into the logits;
* :func:`loss_from_hidden` on hidden states ``[T, H]`` and the lm_head weight ``[V, H]``,
  backward into both.

CPU tensors run the ``tpo`` Rust crate's f64 CPU reference (``tpo::cpu``): inputs in float32,
bfloat16, float16 or float64 are widened exactly to float64, the loss comes back in the input's
dtype and each gradient is rounded once from float64.

CUDA tensors run the crate's fused CUDA kernels on the tensors' own memory, ordered on
``torch.cuda.current_stream()`` (see ``tpo/_cuda.py`` for the dtypes: the kernels compute in
float32 and read float32, bfloat16 or float16; ``loss_from_hidden`` takes bfloat16). The wheel
imports without a GPU; its CUDA path needs an NVIDIA driver and loads it at the first CUDA call.
Every bad input raises ``ValueError`` with the library's one-line message.
"""

import ctypes
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _native
from ._common import path_opts as _opts

if getattr(_native, "HAS_CUDA", False):
    from . import _cuda
else:  # a wheel built without the `cuda` feature
    _cuda = None

__all__ = ["group_loss", "loss_from_logits", "loss_from_hidden", "global_num_groups"]
__version__ = "0.1.0"

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# Tensors to and from the native module: float64 (or int64, uint8) bytes in native byte order.


def _bytes(t: Tensor, dtype: torch.dtype) -> bytes:
    t = t.detach().to(device="cpu", dtype=dtype).contiguous()
    if t.numel() == 0:
        return b""
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def _opt_bytes(t: Optional[Tensor]) -> Optional[bytes]:
    return None if t is None else _bytes(t, _F64)


def _tensor(b: bytes, shape=None, dtype: torch.dtype = _F64) -> Tensor:
    t = torch.frombuffer(bytearray(b), dtype=_F64) if b else torch.empty(0, dtype=_F64)
    if shape is not None:
        t = t.reshape(shape)
    return t.to(dtype)


def _nan(n: int) -> Tensor:
    return torch.full((n,), math.nan, dtype=_F64)


def _stats(d: dict, b: int) -> List[Tensor]:
    out = [_tensor(d[k]) for k in ("group_loss", "kl_q_p", "entropy_q", "grad_norm")]
    out.append(_nan(b) if d["kl_q_pold"] is None else _tensor(d["kl_q_pold"]))
    return out


def _fake_stats(like: Tensor, b: int) -> List[Tensor]:
    return [like.new_empty((b,), dtype=_F64) for _ in range(5)]


# ---------------------------------------------------------------------------------------------
# (a) The group loss on sequence log-probs.


@torch.library.custom_op("tpo::group_loss", mutates_args=())
def _group_loss_op(
    logp: Tensor,
    sizes: List[int],
    scores: Optional[Tensor],
    logp_old: Optional[Tensor],
    target: Optional[Tensor],
    eta: float,
    zero_std_threshold: float,
    anchored: bool,
    kl: bool,
    reduction: str,
    global_num_groups: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if logp.is_cuda:
        return _cuda.group_loss(
            logp, sizes, scores, logp_old, target, eta, zero_std_threshold, anchored, kl,
            reduction, global_num_groups,
        )  # fmt: skip
    d = _native.group_loss(
        _bytes(logp, _F64), sizes, _opt_bytes(scores), _opt_bytes(logp_old), _opt_bytes(target),
        eta, zero_std_threshold, anchored, kl, reduction, global_num_groups, 1.0,
    )  # fmt: skip
    loss = torch.tensor(d["loss"], dtype=_F64).to(logp.dtype)
    return (loss, _tensor(d["target"]), *_stats(d, len(sizes)))


@_group_loss_op.register_fake
def _(logp, sizes, scores, logp_old, target, eta, zero_std_threshold, anchored, kl, reduction, gng):
    n = logp.shape[0]
    return (logp.new_empty(()), logp.new_empty((n,), dtype=_F64), *_fake_stats(logp, len(sizes)))


@torch.library.custom_op("tpo::group_loss_backward", mutates_args=())
def _group_loss_bwd(
    grad: Tensor,
    logp: Tensor,
    target: Tensor,
    sizes: List[int],
    kl: bool,
    reduction: str,
    global_num_groups: Optional[float],
) -> Tensor:
    if logp.is_cuda:
        return _cuda.group_loss_grad(grad, logp, target, sizes, kl, reduction, global_num_groups)
    d = _native.group_loss(
        _bytes(logp, _F64), sizes, None, None, _bytes(target, _F64),
        1.0, 1e-6, True, kl, reduction, global_num_groups, float(grad),
    )  # fmt: skip
    return _tensor(d["grad"], logp.shape, logp.dtype)


@_group_loss_bwd.register_fake
def _(grad, logp, target, sizes, kl, reduction, gng):
    return torch.empty_like(logp)


def _group_loss_setup(ctx, inputs, output):
    logp, sizes, _s, _o, _t, _eta, _z, _a, kl, reduction, gng = inputs
    ctx.save_for_backward(logp, output[1])
    ctx.args = (sizes, kl, reduction, gng)


def _group_loss_backward(ctx, grad, *_unused):
    logp, target = ctx.saved_tensors
    g = torch.ops.tpo.group_loss_backward(grad, logp, target, *ctx.args)
    return (g,) + (None,) * 10


torch.library.register_autograd(
    "tpo::group_loss", _group_loss_backward, setup_context=_group_loss_setup
)

# ---------------------------------------------------------------------------------------------
# (b) From logits and (c) from hidden states.

_PATH_ARGS = "temperature, entropy, seq_reduce, eta, zero_std_threshold, anchored, kl, reduction, gng"


@torch.library.custom_op("tpo::loss_from_logits", mutates_args=())
def _logits_op(
    logits: Tensor,
    tokens: Tensor,
    seq_offsets: List[int],
    mask: Tensor,
    group_sizes: List[int],
    scores: Optional[Tensor],
    logp_old: Optional[Tensor],
    target: Optional[Tensor],
    temperature: float,
    entropy: bool,
    seq_reduce: str,
    eta: float,
    zero_std_threshold: float,
    anchored: bool,
    kl: bool,
    reduction: str,
    global_num_groups: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if logits.is_cuda:
        return _cuda.logits_forward(
            logits, tokens, seq_offsets, mask, group_sizes, scores, logp_old, target, temperature,
            entropy, seq_reduce, eta, zero_std_threshold, anchored, kl, reduction, global_num_groups,
        )  # fmt: skip
    d = _native.loss_from_logits(
        _bytes(logits, _F64), logits.shape[-1], _bytes(tokens, torch.int64), seq_offsets,
        _bytes(mask, torch.uint8), group_sizes, _opt_bytes(scores), _opt_bytes(logp_old),
        _opt_bytes(target), _opts(temperature, entropy, seq_reduce, eta, zero_std_threshold, anchored,
        kl, reduction, global_num_groups, 1.0),
    )  # fmt: skip
    return _path_outputs(d, logits, len(group_sizes))


def _path_outputs(d: dict, like: Tensor, b: int):
    loss = torch.tensor(d["loss"], dtype=_F64).to(like.dtype)
    tl = _tensor(d["token_logp"])
    ent = _nan(tl.shape[0]) if d["token_entropy"] is None else _tensor(d["token_entropy"])
    return (loss, _tensor(d["target"]), _tensor(d["seq_logp"]), *_stats(d, b), tl, ent)


def _fake_path(like: Tensor, t: int, seq_offsets: List[int], group_sizes: List[int]):
    s = len(seq_offsets) - 1
    f = lambda n: like.new_empty((n,), dtype=_F64)  # noqa: E731
    return (like.new_empty(()), f(s), f(s), *_fake_stats(like, len(group_sizes)), f(t), f(t))


@_logits_op.register_fake
def _(logits, tokens, seq_offsets, mask, group_sizes, scores, logp_old, target, *cfg):
    return _fake_path(logits, logits.shape[0], seq_offsets, group_sizes)


@torch.library.custom_op("tpo::loss_from_logits_backward", mutates_args=())
def _logits_bwd(
    grad: Tensor,
    logits: Tensor,
    tokens: Tensor,
    seq_offsets: List[int],
    mask: Tensor,
    group_sizes: List[int],
    target: Tensor,
    temperature: float,
    seq_reduce: str,
    kl: bool,
    reduction: str,
    global_num_groups: Optional[float],
) -> Tensor:
    if logits.is_cuda:
        return _cuda.logits_grad(
            grad, logits, tokens, seq_offsets, mask, group_sizes, target, temperature, seq_reduce,
            kl, reduction, global_num_groups,
        )  # fmt: skip
    d = _native.loss_from_logits(
        _bytes(logits, _F64), logits.shape[-1], _bytes(tokens, torch.int64), seq_offsets,
        _bytes(mask, torch.uint8), group_sizes, None, None, _bytes(target, _F64),
        _opts(temperature, False, seq_reduce, 1.0, 1e-6, True, kl, reduction, global_num_groups, float(grad)),
    )  # fmt: skip
    return _tensor(d["grad_logits"], logits.shape, logits.dtype)


@_logits_bwd.register_fake
def _(grad, logits, *rest):
    return torch.empty_like(logits)


def _logits_setup(ctx, inputs, output):
    logits, tokens, seq_offsets, mask, group_sizes = inputs[:5]
    temperature, _entropy, seq_reduce, _eta, _z, _a, kl, reduction, gng = inputs[8:]
    ctx.save_for_backward(logits, tokens, mask, output[1])
    ctx.args = (seq_offsets, group_sizes, temperature, seq_reduce, kl, reduction, gng)


def _logits_backward(ctx, grad, *_unused):
    logits, tokens, mask, target = ctx.saved_tensors
    so, gs, temperature, seq_reduce, kl, reduction, gng = ctx.args
    g = torch.ops.tpo.loss_from_logits_backward(
        grad, logits, tokens, so, mask, gs, target, temperature, seq_reduce, kl, reduction, gng
    )
    return (g,) + (None,) * 16


torch.library.register_autograd("tpo::loss_from_logits", _logits_backward, setup_context=_logits_setup)


@torch.library.custom_op("tpo::loss_from_hidden", mutates_args=())
def _hidden_op(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    seq_offsets: List[int],
    mask: Tensor,
    group_sizes: List[int],
    scores: Optional[Tensor],
    logp_old: Optional[Tensor],
    target: Optional[Tensor],
    temperature: float,
    entropy: bool,
    seq_reduce: str,
    eta: float,
    zero_std_threshold: float,
    anchored: bool,
    kl: bool,
    reduction: str,
    global_num_groups: Optional[float],
    memory_budget: Optional[int],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if hidden.is_cuda:
        return _cuda.hidden_forward(
            hidden, weight, tokens, seq_offsets, mask, group_sizes, scores, logp_old, target,
            temperature, entropy, seq_reduce, eta, zero_std_threshold, anchored, kl, reduction,
            global_num_groups, memory_budget,
        )  # fmt: skip
    d = _native.loss_from_hidden(
        _bytes(hidden, _F64), _bytes(weight, _F64), hidden.shape[-1], _bytes(tokens, torch.int64),
        seq_offsets, _bytes(mask, torch.uint8), group_sizes, _opt_bytes(scores),
        _opt_bytes(logp_old), _opt_bytes(target), _opts(temperature, entropy, seq_reduce, eta,
        zero_std_threshold, anchored, kl, reduction, global_num_groups, 1.0),
    )  # fmt: skip
    return _path_outputs(d, hidden, len(group_sizes))


@_hidden_op.register_fake
def _(hidden, weight, tokens, seq_offsets, mask, group_sizes, *rest):
    return _fake_path(hidden, hidden.shape[0], seq_offsets, group_sizes)


@torch.library.custom_op("tpo::loss_from_hidden_backward", mutates_args=())
def _hidden_bwd(
    grad: Tensor,
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    seq_offsets: List[int],
    mask: Tensor,
    group_sizes: List[int],
    target: Tensor,
    temperature: float,
    seq_reduce: str,
    kl: bool,
    reduction: str,
    global_num_groups: Optional[float],
    memory_budget: Optional[int],
) -> Tuple[Tensor, Tensor]:
    if hidden.is_cuda:
        return _cuda.hidden_grad(
            grad, hidden, weight, tokens, seq_offsets, mask, group_sizes, target, temperature,
            seq_reduce, kl, reduction, global_num_groups, memory_budget,
        )  # fmt: skip
    d = _native.loss_from_hidden(
        _bytes(hidden, _F64), _bytes(weight, _F64), hidden.shape[-1], _bytes(tokens, torch.int64),
        seq_offsets, _bytes(mask, torch.uint8), group_sizes, None, None, _bytes(target, _F64),
        _opts(temperature, False, seq_reduce, 1.0, 1e-6, True, kl, reduction, global_num_groups,
        float(grad)),
    )  # fmt: skip
    return (
        _tensor(d["grad_hidden"], hidden.shape, hidden.dtype),
        _tensor(d["grad_weight"], weight.shape, weight.dtype),
    )


@_hidden_bwd.register_fake
def _(grad, hidden, weight, *rest):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _hidden_setup(ctx, inputs, output):
    hidden, weight, tokens, seq_offsets, mask, group_sizes = inputs[:6]
    temperature, _entropy, seq_reduce, _eta, _z, _a, kl, reduction, gng, budget = inputs[9:]
    ctx.save_for_backward(hidden, weight, tokens, mask, output[1])
    ctx.args = (seq_offsets, group_sizes, temperature, seq_reduce, kl, reduction, gng, budget)


def _hidden_backward(ctx, grad, *_unused):
    hidden, weight, tokens, mask, target = ctx.saved_tensors
    so, gs, temperature, seq_reduce, kl, reduction, gng, budget = ctx.args
    gh, gw = torch.ops.tpo.loss_from_hidden_backward(
        grad, hidden, weight, tokens, so, mask, gs, target, temperature, seq_reduce, kl, reduction, gng, budget
    )
    return (gh, gw) + (None,) * 17


torch.library.register_autograd("tpo::loss_from_hidden", _hidden_backward, setup_context=_hidden_setup)

# ---------------------------------------------------------------------------------------------
# Argument checking shared by the public calls: every problem is a one-line ValueError.

Groups = Union[int, Sequence[int], Tensor, None]


def _check_float(t, name: str, ndim: int, device: Optional[torch.device] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} has dtype {t.dtype}: expected float32, bfloat16, float16 or float64")
    _check_device(t, name, device)
    if t.is_cuda and t.dtype == torch.float64:
        raise ValueError(
            f"{name} is float64 on {t.device}: the CUDA kernels read float32, bfloat16 or float16 "
            "(convert it, or run the float64 reference on the CPU)"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _check_device(t: Tensor, name: str, device: Optional[torch.device]) -> None:
    """CPU and CUDA tensors are accepted. ``device`` is the call's main input's: the other inputs
    must be on it, but for constants on the CPU, which the CUDA path copies to the device."""
    if t.device.type == "cuda":
        if _cuda is None:
            raise ValueError(
                f"{name} is on {t.device}: this tpo wheel was built without its CUDA path "
                "(the `cuda` feature); move it with .cpu()"
            )
        if device is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, but the call's main input is on {device}")
    elif t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}: tpo runs on CPU and CUDA tensors")


def _check_values(t, name: str, n: Optional[int], kinds: str, device=None) -> Optional[Tensor]:
    """A 1-D constant input (scores, logp_old, target, tokens, mask) of n elements."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t)
    _check_device(t, name, device)
    if t.is_complex():
        raise ValueError(f"{name} has dtype {t.dtype}: complex values are not accepted")
    if kinds == "int" and (t.is_floating_point() or t.dtype == torch.bool):
        raise ValueError(f"{name} has dtype {t.dtype}: expected an integer dtype")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} elements, expected {n}")
    return t.detach()


def _int_list(x, name: str) -> List[int]:
    if isinstance(x, Tensor):
        if x.is_floating_point() or x.dtype == torch.bool or x.dim() != 1:
            raise ValueError(f"{name} must be a 1-D integer tensor or a list of ints")
        x = x.tolist()
    try:
        out = [int(v) for v in x]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of ints, got {x!r}") from None
    if any(v < 0 for v in out):
        raise ValueError(f"{name} holds a negative value: {out}")
    return out


def _layout(n: int, group_sizes: Groups, group_index, device=None) -> Tuple[List[int], Optional[Tensor]]:
    """Group sizes over n members, and the permutation that makes groups contiguous (or None)."""
    if (group_sizes is None) == (group_index is None):
        raise ValueError("give exactly one of group_sizes and group_index")
    if group_index is not None:
        idx = _check_values(group_index, "group_index", n, "int", device)
        if device is not None:
            idx = idx.to(device)
        order = torch.argsort(idx, stable=True)
        _, counts = torch.unique_consecutive(idx[order], return_counts=True)
        sizes = counts.tolist()
        contiguous = bool(torch.equal(order, torch.arange(n, device=order.device)))
        return sizes, None if contiguous else order
    if isinstance(group_sizes, int) and not isinstance(group_sizes, bool):
        if group_sizes <= 0 or n % group_sizes != 0:
            raise ValueError(f"group_sizes={group_sizes} (uniform groups) does not divide {n} members")
        return [group_sizes] * (n // group_sizes), None
    sizes = _int_list(group_sizes, "group_sizes")
    if sum(sizes) != n:
        raise ValueError(f"group_sizes sum to {sum(sizes)}, but there are {n} members")
    return sizes, None


def _number(x, name: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {x!r}") from None


def _config(eta, zero_std_threshold, reduction, global_num_groups, loss_form, anchor):
    if loss_form not in ("cross_entropy", "kl"):
        raise ValueError(f'loss_form must be "cross_entropy" or "kl", got {loss_form!r}')
    try:
        eta, zst = float(eta), float(zero_std_threshold)
        gng = None if global_num_groups is None else float(global_num_groups)
    except (TypeError, ValueError):
        raise ValueError("eta, zero_std_threshold and global_num_groups must be numbers") from None
    if not isinstance(reduction, str):
        raise ValueError(f'reduction must be "mean" or "sum", got {reduction!r}')
    return eta, zst, bool(anchor), loss_form == "kl", reduction, gng


def _diag(out: Sequence[Tensor], has_old: bool, stored: bool) -> dict:
    _loss, _q, group_loss, kl_q_p, entropy_q, grad_norm, kl_q_pold = out[:7]
    d = {"group_loss": group_loss, "kl_q_p": kl_q_p, "entropy_q": entropy_q, "grad_norm": grad_norm}
    d["kl_q_pold"] = None if stored else kl_q_pold
    return d


def _result(loss, target, diag, return_target: bool, diagnostics: bool):
    # Only the loss carries a gradient: the target and the diagnostics are constants.
    target = target.detach()
    if diag is not None:
        diag = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in diag.items()}
    out = (loss,)
    if return_target:
        out += (target,)
    if diagnostics:
        out += (diag,)
    return out[0] if len(out) == 1 else out


# ---------------------------------------------------------------------------------------------
# The public calls.


def group_loss(
    logp: Tensor,
    scores: Optional[Tensor] = None,
    group_sizes: Groups = None,
    *,
    group_index: Optional[Tensor] = None,
    logp_old: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    eta: float = 1.0,
    reduction: str = "mean",
    global_num_groups: Optional[float] = None,
    return_target: bool = False,
    diagnostics: bool = False,
    loss_form: str = "cross_entropy",
    anchor: bool = True,
    zero_std_threshold: float = 1e-6,
):
    """The TPO loss on sequence log-probs ``logp [N]`` split into groups.

    Groups are given by ``group_sizes`` (an int ``K`` for uniform groups, or the sizes of
    contiguous groups, summing to ``N``) or by ``group_index`` (a group id per member, in any
    order: members are gathered by id, the gradient scattered back).

    The target: ``q = softmax(log_softmax(l_old) + u / eta)`` per group with
    ``u = zscore(scores)``; ``l_old`` is ``logp_old`` when given, else ``logp`` itself, detached
    (first epoch, on-policy). A later epoch passes the stored ``target`` (and no scores). A member
    whose ``l_old`` is ``-inf`` is excluded (``q = 0``). ``anchor=False`` gives
    ``q = softmax(u / eta)``.

    The loss: ``w * sum_g L_g`` with ``L_g = -sum_i q_i log softmax(l)_i`` (or ``KL(q || p)``
    with ``loss_form="kl"``) and ``w = 1/B`` (mean), ``1`` (sum) or ``1/global_num_groups``.
    Its backward is ``dL/dl = w * (sum(q) p - q)`` per group; no gradient reaches the scores,
    ``logp_old`` or the target.

    Returns the scalar loss in ``logp``'s dtype; with ``return_target=True`` also ``q`` (float64,
    in ``logp``'s member order); with ``diagnostics=True`` also a dict of float64 tensors per group:
    ``group_loss``, ``kl_q_p``, ``entropy_q``, ``grad_norm`` (of ``w (p - q)``) and ``kl_q_pold``
    (``KL(q || p_old)``; None with a stored target). With ``group_index``, groups are in sorted-id
    order and the dict has ``group_ids``.
    """
    _check_float(logp, "logp", 1)
    n, dev = logp.shape[0], logp.device
    sizes, order = _layout(n, group_sizes, group_index, dev)
    scores = _check_values(scores, "scores", n, "real", dev)
    logp_old = _check_values(logp_old, "logp_old", n, "real", dev)
    target = _check_values(target, "target", n, "real", dev)
    if order is not None:
        scores, logp_old, target = (None if t is None else t.to(dev) for t in (scores, logp_old, target))
    cfg = _config(eta, zero_std_threshold, reduction, global_num_groups, loss_form, anchor)
    x = logp
    if order is not None:
        x = logp[order]
        scores, logp_old, target = (None if t is None else t[order] for t in (scores, logp_old, target))
    out = torch.ops.tpo.group_loss(x, sizes, scores, logp_old, target, *cfg)
    q = out[1]
    if order is not None:
        q = torch.empty_like(q).index_copy_(0, order, q)
    diag = _diag(out, logp_old is not None, target is not None) if diagnostics else None
    if diag is not None and group_index is not None:
        diag["group_ids"] = torch.unique(torch.as_tensor(group_index))
    return _result(out[0], q, diag, return_target, diagnostics)


def _token_args(tokens, seq_offsets, completion_mask, t: int, device=None):
    tokens = _check_values(tokens, "tokens", t, "int", device)
    offsets = _int_list(seq_offsets, "seq_offsets")
    if len(offsets) < 2:
        raise ValueError("seq_offsets needs S + 1 >= 2 entries (cu_seqlens: 0, end of sequence 1, ...)")
    if offsets[-1] != t:
        raise ValueError(f"seq_offsets end at {offsets[-1]}, but there are {t} tokens")
    if tokens is None or completion_mask is None:
        raise ValueError("tokens and completion_mask are required (1-D, one entry per token row)")
    mask = _check_values(completion_mask, "completion_mask", t, "real", device)
    return tokens, offsets, mask.ne(0)


def _seq_args(s, scores, group_sizes, group_index, logp_old, target, device=None):
    if group_index is not None:
        if group_sizes is not None:
            raise ValueError("give exactly one of group_sizes and group_index")
        idx = _check_values(group_index, "group_index", s, "int", device)
        ids, counts = torch.unique_consecutive(idx, return_counts=True)
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError(
                "group_index must list each group's sequences contiguously in the token paths "
                "(reorder the sequences, or pass group_sizes)"
            )
        sizes = counts.tolist()
    else:
        sizes, _ = _layout(s, group_sizes, None)
    vals = [_check_values(v, name, s, "real", device) for v, name in ((scores, "scores"), (logp_old, "logp_old"), (target, "target"))]
    return sizes, vals


def _check_budget(memory_budget, t: int, v: int, cuda: bool) -> None:
    if memory_budget is None:
        return
    need = 2 * t * v * 8
    if not (isinstance(memory_budget, int) and not isinstance(memory_budget, bool) and memory_budget > 0):
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    if cuda:
        return  # the CUDA path's logits workspace: checked by tpo._cuda.workspace_budget
    if need > memory_budget:
        raise ValueError(
            f"the CPU path materialises the logits and their gradient in float64 ({need} bytes for "
            f"{t} tokens x {v} vocabulary entries), over memory_budget={memory_budget}: split the batch"
        )


def loss_from_logits(
    logits: Tensor,
    tokens: Tensor,
    seq_offsets: Union[Sequence[int], Tensor],
    completion_mask: Tensor,
    scores: Optional[Tensor] = None,
    group_sizes: Groups = None,
    *,
    group_index: Optional[Tensor] = None,
    logp_old: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    eta: float = 1.0,
    temperature: float = 1.0,
    seq_reduce: str = "sum",
    reduction: str = "mean",
    global_num_groups: Optional[float] = None,
    return_target: bool = False,
    diagnostics: bool = False,
    loss_form: str = "cross_entropy",
    anchor: bool = True,
    zero_std_threshold: float = 1e-6,
):
    """The TPO loss from logits ``[T, V]`` of ``S`` sequences packed along ``T``.

    ``tokens [T]`` are the sampled ids, ``seq_offsets`` the ``S + 1`` cu_seqlens-style offsets of
    the sequences, ``completion_mask [T]`` marks the tokens that count (nonzero). Per token,
    ``logp_t = log softmax(z_t / temperature)[y_t]``; per sequence ``l_i = sum_t m_t logp_t``
    (``seq_reduce="mean"``: divided by the completion length). Then :func:`group_loss` on ``l``
    with groups over the sequences (``scores``, ``logp_old``, ``target`` are per sequence). The
    backward reaches the logits: ``dL/dz_{t,v} = g_t (1{v = y_t} - softmax(z_t / tau)_v) / tau``.

    Diagnostics add ``seq_logp`` (``l``), ``token_logp`` and ``token_entropy`` (float64) to
    :func:`group_loss`'s dict.
    """
    _check_float(logits, "logits", 2)
    t, v = logits.shape
    dev = logits.device
    tokens, offsets, mask = _token_args(tokens, seq_offsets, completion_mask, t, dev)
    sizes, (scores, logp_old, target) = _seq_args(len(offsets) - 1, scores, group_sizes, group_index, logp_old, target, dev)
    cfg = _config(eta, zero_std_threshold, reduction, global_num_groups, loss_form, anchor)
    eta, zst, anc, kl, red, gng = cfg
    out = torch.ops.tpo.loss_from_logits(
        logits, tokens, offsets, mask, sizes, scores, logp_old, target,
        _number(temperature, "temperature"), diagnostics, seq_reduce, eta, zst, anc, kl, red, gng,
    )  # fmt: skip
    return _token_result(out, logp_old is not None, target is not None, return_target, diagnostics)


def _token_result(out, has_old, stored, return_target, diagnostics):
    loss, q, seq_logp = out[0], out[1], out[2]
    diag = None
    if diagnostics:
        diag = _diag((loss, q, *out[3:8]), has_old, stored)
        diag.update(seq_logp=seq_logp, token_logp=out[8], token_entropy=out[9])
    return _result(loss, q, diag, return_target, diagnostics)


def loss_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    tokens: Tensor,
    seq_offsets: Union[Sequence[int], Tensor],
    completion_mask: Tensor,
    scores: Optional[Tensor] = None,
    group_sizes: Groups = None,
    *,
    group_index: Optional[Tensor] = None,
    logp_old: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    eta: float = 1.0,
    temperature: float = 1.0,
    seq_reduce: str = "sum",
    reduction: str = "mean",
    global_num_groups: Optional[float] = None,
    memory_budget: Optional[int] = None,
    return_target: bool = False,
    diagnostics: bool = False,
    loss_form: str = "cross_entropy",
    anchor: bool = True,
    zero_std_threshold: float = 1e-6,
):
    """:func:`loss_from_logits` on ``z = hidden @ lm_head_weight.T`` (``hidden [T, H]``,
    ``lm_head_weight [V, H]``, same dtype), with the backward into both:
    ``dL/dh = dL/dz W`` and ``dL/dW = dL/dz^T h``.

    This build runs the crate's CPU reference, which materialises the logits and their gradient
    in float64 (``2 T V 8`` bytes); ``memory_budget`` (bytes) refuses a batch that needs more.

    CUDA tensors run the crate's fused path, which never materialises the logits: the logits are
    computed ``GEMM_TILE = 128`` tokens at a time into a bfloat16 workspace of at most
    ``memory_budget`` bytes (default: whole tiles up to 1 GiB; below one tile, ``128 V 2`` bytes,
    is refused), reduced to log-probs, and recomputed block by block for the backward, whose
    GEMMs accumulate ``dL/dh`` and ``dL/dW`` in float32. It takes bfloat16 ``hidden`` and
    ``lm_head_weight``; the gradients come back in bfloat16. The backward recomputes the path
    (one more forward's work) rather than keeping float32 gradients from the forward.
    """
    _check_float(hidden, "hidden", 2)
    _check_float(lm_head_weight, "lm_head_weight", 2, hidden.device)
    dev = hidden.device
    if hidden.is_cuda and hidden.dtype != torch.bfloat16:
        raise ValueError(
            f"hidden is {hidden.dtype} on {hidden.device}: the CUDA path of loss_from_hidden is the "
            "fused bfloat16 one; pass bfloat16 hidden and lm_head_weight (or use loss_from_logits)"
        )
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but lm_head_weight is {lm_head_weight.dtype}: give one dtype")
    if hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden has {hidden.shape[1]} features per token but lm_head_weight rows have {lm_head_weight.shape[1]}"
        )
    t = hidden.shape[0]
    _check_budget(memory_budget, t, lm_head_weight.shape[0], hidden.is_cuda)
    tokens, offsets, mask = _token_args(tokens, seq_offsets, completion_mask, t, dev)
    sizes, (scores, logp_old, target) = _seq_args(len(offsets) - 1, scores, group_sizes, group_index, logp_old, target, dev)
    eta, zst, anc, kl, red, gng = _config(eta, zero_std_threshold, reduction, global_num_groups, loss_form, anchor)
    out = torch.ops.tpo.loss_from_hidden(
        hidden, lm_head_weight, tokens, offsets, mask, sizes, scores, logp_old, target,
        _number(temperature, "temperature"), diagnostics, seq_reduce, eta, zst, anc, kl, red, gng,
        memory_budget,
    )  # fmt: skip
    return _token_result(out, logp_old is not None, target is not None, return_target, diagnostics)


def global_num_groups(num_local_groups: int, group=None) -> int:
    """The number of groups over all data-parallel ranks of a step: ``all_reduce(SUM)`` of each
    rank's count when ``torch.distributed`` is initialised, else the local count. Pass it as
    ``global_num_groups`` so every rank's loss is ``(1/n) sum`` of its own groups and the summed
    gradients equal the global mean's. Groups must not be split across ranks or micro-batches
    (add each micro-batch's count to ``num_local_groups`` for gradient accumulation)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return int(num_local_groups)
    t = torch.tensor([int(num_local_groups)], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t.item())
