"""The CUDA path without a GPU: the native module's CUDA calls on the emulated device.

No PyTorch CUDA is possible here, so the device memory comes from the library itself
(``_native.DeviceBuffer``) and the stream too (``_native.DeviceStream``, as ``torch.cuda.Stream``):
the calls get raw ``(address, elements, dtype)`` descriptors and a raw stream handle exactly as
``tpo/_cuda.py`` passes a CUDA tensor's ``data_ptr()`` and ``current_stream().cuda_stream``.
Every result is compared with the CPU path of the same package (the crate's f64 reference) on the
same stored values. What this proves: the pointer import, the borrowed-stream handling, the
output copies and the error paths, on the kernels' own source run by the emulated device
(``emu/``); not PyTorch's CUDA tensors, its caching allocator or a real GPU.

Runs when ``TPO_EMU_LIB`` names the emulated driver's folder and it is on ``LD_LIBRARY_PATH``
(``scripts/test-python.sh`` does both); skipped otherwise.
"""

import math
import os

import pytest
import torch

import tpo
from tpo import _native

pytestmark = [
    pytest.mark.skipif(
        not os.environ.get("TPO_EMU_LIB"), reason="needs the emulated CUDA device (scripts/test-python.sh)"
    ),
    # torch's CPU autograd probes CUDA once, finds the emulated libcuda.so on LD_LIBRARY_PATH and
    # warns that its own CUDA cannot start (the emulator does not implement the runtime's calls):
    # expected, as torch's CUDA is not used here.
    pytest.mark.filterwarnings("ignore:CUDA initialization:UserWarning"),
]

KIND = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int32: "i32", torch.uint8: "u8"}
STORAGE = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


class Dev:
    """A CPU tensor's copy in device memory made by the library, with its descriptor."""

    def __init__(self, t: torch.Tensor):
        self.t = t.contiguous()
        self.buf = _native.DeviceBuffer(0, self.t.view(torch.uint8).numpy().tobytes())

    @classmethod
    def poisoned(cls, shape, dtype):
        return cls(torch.full(shape, math.nan, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))

    def desc(self):
        return (self.buf.ptr, self.t.numel(), KIND[self.t.dtype])

    def get(self) -> torch.Tensor:
        raw = torch.frombuffer(bytearray(self.buf.to_bytes()), dtype=self.t.dtype)
        return raw[: self.t.numel()].reshape(self.t.shape)


def close(name, got, want, scale, rtol=1e-5):
    got, want = got.double(), want.double()
    err = (got - want).abs()
    bound = rtol * (want.abs() + scale)
    bad = ~(err <= bound)
    assert not bad.any(), f"{name}: {int(bad.sum())} of {got.numel()} off, e.g. got {got[bad][:3].tolist()} want {want[bad][:3].tolist()}"


def ragged(rng, n_groups, big=False):
    sizes = [int(rng.integers(1, 9)) for _ in range(n_groups)]
    sizes[0] = 1  # K = 1
    if big:
        sizes.append(300)  # the block path (K > 256)
    return sizes


@pytest.fixture(scope="module")
def stream():
    return _native.DeviceStream(0)


def group_call(stream, logp, sizes, scores=None, logp_old=None, target=None, eta=1.0, grad_scale=1.0, reduction="mean"):
    n, b = logp.numel(), len(sizes)
    outs = {
        "loss": Dev.poisoned((1,), torch.float32),
        "target": Dev.poisoned((n,), torch.float32),
        "grad": Dev.poisoned((n,), logp.dtype),
        "stats": Dev.poisoned((5, b), torch.float32),
    }
    ins = {k: (None if v is None else Dev(v)) for k, v in (("s", scores), ("o", logp_old), ("q", target))}
    lp = Dev(logp)
    _native.cuda_group_loss(
        0, stream.handle, lp.desc(), sizes, *(None if v is None else v.desc() for v in ins.values()),
        eta, 1e-6, True, False, reduction, None, grad_scale, {k: v.desc() for k, v in outs.items()},
    )  # fmt: skip
    return {k: v.get() for k, v in outs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eta", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("kind", ["on_policy", "rollout", "stored"])
def test_group_loss_matches_the_cpu_reference(stream, dtype, eta, kind):
    import numpy as np

    rng = np.random.default_rng(hash((str(dtype), eta, kind)) % 2**32)
    sizes = ragged(rng, 12, big=(kind == "rollout"))
    n = sum(sizes)
    logp = torch.tensor(rng.normal(-5, 3, n)).to(dtype)
    old = torch.tensor(rng.normal(-5, 3, n)).to(dtype)
    scores = torch.tensor(rng.integers(0, 3, n), dtype=torch.float32)
    # The reference on exactly the stored values, in float64.
    lp64 = logp.double().requires_grad_()
    kw = {"scores": scores.double(), "eta": eta}
    if kind == "rollout":
        kw["logp_old"] = old.double()
    loss, q, diag = tpo.group_loss(lp64, group_sizes=sizes, return_target=True, diagnostics=True, **kw)
    if kind == "stored":
        q32 = q.float()
        lp64 = logp.double().requires_grad_()
        loss, _q, diag = tpo.group_loss(lp64, group_sizes=sizes, target=q32.double(), return_target=True, diagnostics=True)
        got = group_call(stream, logp, sizes, target=q32, grad_scale=0.5)
    else:
        got = group_call(stream, logp, sizes, scores=scores, logp_old=old if kind == "rollout" else None, eta=eta, grad_scale=0.5)
    (0.5 * loss).backward()
    w = 1.0 / len(sizes)
    lscale = 1.0 + diag["group_loss"].abs().max().item()
    close("loss", got["loss"][0:1], loss.detach().reshape(1), lscale * len(sizes) * w, 2e-5)
    close("target", got["target"], (q32 if kind == "stored" else q).double(), 1.0)
    close("grad", got["grad"], lp64.grad, 0.5 * w, 1e-5 + STORAGE[dtype])
    st = got["stats"]
    close("group_loss", st[0], diag["group_loss"], lscale)
    close("kl_q_p", st[1], diag["kl_q_p"], lscale)
    close("entropy_q", st[2], diag["entropy_q"], lscale)
    # |grad| of the returned gradient, which carries grad_scale (0.5) besides w.
    close("grad_norm", st[3], 0.5 * diag["grad_norm"], 0.5 * w, 1e-5 + STORAGE[dtype])
    if kind == "stored":
        assert torch.isnan(st[4]).all(), "kl_q_pold written for a stored target"
    else:
        close("kl_q_pold", st[4], diag["kl_q_pold"], lscale)


def test_results_are_bit_identical_on_any_stream(stream):
    logp = torch.linspace(-9, -1, 40).to(torch.bfloat16)
    scores = torch.arange(40, dtype=torch.float32) % 3
    sizes = [1, 7, 32]
    a = group_call(stream, logp, sizes, scores=scores)
    b = group_call(_native.DeviceStream(0), logp, sizes, scores=scores)

    class Legacy:  # the legacy default stream, handle 0
        handle = 0

    c = group_call(Legacy, logp, sizes, scores=scores)
    for k in a:
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
        assert torch.equal(a[k].view(torch.uint8), c[k].view(torch.uint8)), k


def path_inputs(rng, lens, vocab):
    t = sum(lens)
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    tokens = torch.tensor(rng.integers(0, vocab, t), dtype=torch.int32)
    # The first token of each sequence is its prompt. Sequences of a group have equal lengths, so
    # that p = softmax(l) is spread over the group and the gradient p - q is far from 0.
    mask = torch.ones(t, dtype=torch.uint8)
    mask[offsets[:-1]] = 0
    scores = torch.tensor(rng.integers(0, 2, len(lens)), dtype=torch.float32)
    return offsets, tokens, mask, scores


def batch(tokens, offsets, mask, groups, scores=None, logp_old=None, target=None):
    """The native PathBatch from Devs."""
    d = lambda x: None if x is None else x.desc()  # noqa: E731
    return {"tokens": tokens.desc(), "seq_offsets": offsets, "mask": mask.desc(), "group_sizes": groups,
            "scores": d(scores), "logp_old": d(logp_old), "target": d(target)}  # fmt: skip


def opts(temperature=1.0, entropy=False, grad_scale=1.0, **kw):
    """The native PathOpts."""
    o = {"temperature": temperature, "entropy": entropy, "seq_reduce": "sum", "eta": 1.0, "zero_std_threshold": 1e-6,
         "anchored": True, "kl": False, "reduction": "mean", "global_num_groups": None, "grad_scale": grad_scale}  # fmt: skip
    o.update(kw)
    return o


def path_outs(t, s, b):
    f = lambda n: Dev.poisoned((n,), torch.float32)  # noqa: E731
    return {"loss": f(1), "target": f(s), "seq_logp": f(s), "stats": Dev.poisoned((5, b), torch.float32), "token_logp": f(t), "token_entropy": f(t)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_from_logits_forward_and_backward(stream, dtype):
    import numpy as np

    rng = np.random.default_rng(3)
    lens, vocab, groups = [4, 4, 1, 3, 3, 3], 257, [2, 1, 3]
    offsets, tokens, mask, scores = path_inputs(rng, lens, vocab)
    t = sum(lens)
    z = torch.tensor(rng.normal(0, 1, (t, vocab))).to(dtype)
    zd, yd, md, sd = Dev(z), Dev(tokens), Dev(mask), Dev(scores)
    outs = path_outs(t, len(lens), len(groups))
    _native.cuda_loss_from_logits(
        0, stream.handle, zd.desc(), vocab, batch(yd, offsets, md, groups, scores=sd),
        opts(temperature=0.9, entropy=True), None, {k: v.desc() for k, v in outs.items()},
    )  # fmt: skip
    got = {k: v.get() for k, v in outs.items()}
    assert torch.equal(zd.get().view(torch.uint8), z.view(torch.uint8)), "the forward wrote the logits"
    z64 = z.double().requires_grad_()
    loss, q, diag = tpo.loss_from_logits(
        z64, tokens.long(), offsets, mask, scores.double(), groups, temperature=0.9,
        return_target=True, diagnostics=True,
    )  # fmt: skip
    lscale = 1.0 + diag["seq_logp"].abs().max().item()
    close("seq_logp", got["seq_logp"], diag["seq_logp"], lscale)
    close("token_logp", got["token_logp"], diag["token_logp"], 1.0)
    close("token_entropy", got["token_entropy"], diag["token_entropy"], 1.0)
    close("target", got["target"], q, 1.0)
    close("loss", got["loss"], loss.detach().reshape(1), lscale, 4e-5)
    # Backward: the kernels write dL/dlogits over a copy of the logits, scaled by the upstream 2.
    (2.0 * loss).backward()
    assert z64.grad.abs().max() > 1e-2, "the test's gradient is too small to tell a wrong one"
    g = Dev(z)
    qd = Dev(got["target"])
    _native.cuda_loss_from_logits(
        0, stream.handle, zd.desc(), vocab, batch(yd, offsets, md, groups, target=qd),
        opts(temperature=0.9, grad_scale=2.0), g.desc(), {},
    )  # fmt: skip
    close("dlogits", g.get(), z64.grad, 2.0 / 0.9 / len(groups), 1e-4 + STORAGE[dtype])


def test_loss_from_hidden_matches_the_reference_on_the_same_bf16_values(stream):
    import numpy as np

    rng = np.random.default_rng(4)
    lens, vocab, dim, groups = [50, 50, 150, 150], 300, 32, [2, 2]
    offsets, tokens, mask, scores = path_inputs(rng, lens, vocab)
    t = sum(lens)
    h = torch.tensor(rng.normal(0, 0.5, (t, dim))).to(torch.bfloat16)
    w = torch.tensor(rng.normal(0, 0.2, (vocab, dim))).to(torch.bfloat16)
    outs = path_outs(t, len(lens), len(groups))
    outs["grad_hidden"] = Dev.poisoned((t, dim), torch.float32)
    outs["grad_weight"] = Dev.poisoned((vocab, dim), torch.float32)
    ins = [Dev(x) for x in (h, w, tokens, mask, scores)]
    _native.cuda_loss_from_hidden(
        0, stream.handle, ins[0].desc(), ins[1].desc(), dim, batch(ins[2], offsets, ins[3], groups, scores=ins[4]),
        opts(), 128 * vocab * 2, {k: v.desc() for k, v in outs.items()},
    )  # fmt: skip
    got = {k: v.get() for k, v in outs.items()}
    # Without gradient outputs only the forward half runs (as the autograd forward calls it):
    # the same loss, target and log-probs, bit for bit.
    fwd = path_outs(t, len(lens), len(groups))
    _native.cuda_loss_from_hidden(
        0, stream.handle, ins[0].desc(), ins[1].desc(), dim, batch(ins[2], offsets, ins[3], groups, scores=ins[4]),
        opts(), 128 * vocab * 2, {k: v.desc() for k, v in fwd.items()},
    )  # fmt: skip
    for k in ("loss", "target", "token_logp", "seq_logp"):
        assert torch.equal(fwd[k].get().view(torch.uint8), got[k].view(torch.uint8)), k
    # The reference on the bf16 logits the device computes (its workspace dtype).
    z = (h.double() @ w.double().T).to(torch.bfloat16).double().requires_grad_()
    loss, q = tpo.loss_from_logits(z, tokens.long(), offsets, mask, scores.double(), groups, return_target=True)
    loss.backward()
    assert z.grad.abs().max() > 1e-3, "the test's gradient is too small to tell a wrong one"
    close("loss", got["loss"], loss.detach().reshape(1), 1.0, 1.0 / 256)
    close("target", got["target"], q, 1.0, 1.0 / 256)
    dz = z.grad
    gh, gw = dz @ w.double(), dz.T @ h.double()
    close("grad_hidden", got["grad_hidden"], gh, gh.abs().max().item(), 1.0 / 128)
    close("grad_weight", got["grad_weight"], gw, gw.abs().max().item(), 1.0 / 128)
    assert torch.isnan(got["token_entropy"]).all(), "entropy written though not asked for"


def test_bad_input_raises_one_line_value_errors(stream):
    logp = Dev(torch.full((8,), -2.0))
    scores = Dev(torch.arange(8, dtype=torch.float32))
    outs = {"loss": Dev.poisoned((1,), torch.float32)}
    od = {k: v.desc() for k, v in outs.items()}
    p, n, k = logp.desc()
    nan = Dev(torch.tensor([-1.0, float("nan"), -2.0, -3.0]))

    def call(lp=logp.desc(), s=scores.desc(), sizes=(4, 4), handle=None, o=od):
        _native.cuda_group_loss(0, stream.handle if handle is None else handle, lp, list(sizes), s, None, None, 1.0, 1e-6, True, False, "mean", None, 1.0, o)

    cases = [
        ("misaligned", lambda: call(lp=(p + 2, n, k)), "not aligned"),
        ("past the end", lambda: call(lp=(p, n + 1, k)), "run past the end of its allocation"),
        ("not device memory", lambda: call(lp=(64, n, k)), "not device memory"),
        ("float64", lambda: call(lp=(p, n, "f64")), "float32, bfloat16 or float16"),
        ("dtype name", lambda: call(s=scores.desc()[:2] + ("bf16",)), "expected a f32 CUDA tensor"),
        ("sizes", lambda: call(sizes=(4, 3)), "7"),
        ("NaN log-prob", lambda: call(lp=nan.desc(), s=(scores.buf.ptr, 4, "f32"), sizes=(2, 2)), "NaN"),
        # The emulated driver checks stream handles; a real one does not (a bad handle is
        # undefined behaviour there), so this checks the error path, not a guarantee.
        ("unknown stream", lambda: call(handle=12345), "stream"),
        ("output too short", lambda: call(o={"loss": (outs["loss"].buf.ptr, 1, "f32"), "target": (outs["loss"].buf.ptr, 8, "f32")}), "past the end"),
    ]
    for name, f, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            f()
        assert "\n" not in str(e.value), f"{name}: {e.value!r}"
    # Token ids out of the vocabulary (a negative int32 id reads as >= 2^31).
    z = Dev(torch.zeros(4, 5))
    for bad in (5, -1):
        y = Dev(torch.tensor([0, 1, bad, 2], dtype=torch.int32))
        m = Dev(torch.ones(4, dtype=torch.uint8))
        with pytest.raises(ValueError, match="token") as e:
            b = batch(y, [0, 2, 4], m, [2])
            b["scores"] = (scores.buf.ptr, 2, "f32")
            _native.cuda_loss_from_logits(0, stream.handle, z.desc(), 5, b, opts(), None, {})
        assert "\n" not in str(e.value)
    # After all of that the device still works.
    good = group_call(stream, torch.full((4,), -1.0), [2, 2], scores=torch.arange(4, dtype=torch.float32))
    assert torch.isfinite(good["loss"]).all()
