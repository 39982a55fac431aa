"""The CUDA path through real PyTorch CUDA tensors: runs only where torch sees a GPU.

On a machine without one (this project's CI) every test here is skipped; the native CUDA calls
are covered there by test_cuda_emulated.py on the emulated device. Where a GPU exists these
check what the emulator cannot: PyTorch's own tensors, its caching allocator and its current
stream, against the CPU path (the crate's f64 reference) on the same values.
"""

import pytest
import torch

import tpo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")


def close(name, got, want, scale, rtol):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    bad = ~((got - want).abs() <= rtol * (want.abs() + scale))
    assert not bad.any(), f"{name}: {int(bad.sum())} of {got.numel()} off"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_group_loss_on_cuda_tensors_matches_the_cpu(dtype):
    g = torch.Generator().manual_seed(1)
    sizes = [1, 5, 8, 300]
    n = sum(sizes)
    logp = (torch.randn(n, generator=g) * 3 - 5).to(dtype)
    scores = torch.randint(0, 3, (n,), generator=g).float()
    x = logp.cuda().requires_grad_()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # a non-default current stream
        loss, q, d = tpo.group_loss(x, scores.cuda(), sizes, return_target=True, diagnostics=True)
        loss.backward()
    torch.cuda.synchronize()
    r = logp.double().requires_grad_()
    rl, rq, rd = tpo.group_loss(r, scores.double(), sizes, return_target=True, diagnostics=True)
    rl.backward()
    close("loss", loss, rl, 1.0, 1e-4)
    close("target", q, rq, 1.0, 1e-5)
    close("grad", x.grad, r.grad, 1.0 / len(sizes), 1e-5 + {torch.float32: 0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype])
    close("kl_q_p", d["kl_q_p"], rd["kl_q_p"], 1.0, 1e-4)


def test_loss_from_logits_and_hidden_on_cuda_tensors_match_the_cpu():
    g = torch.Generator().manual_seed(2)
    t, v, h = 12, 50, 16
    offsets, sizes = [0, 3, 6, 9, 12], [2, 2]
    tokens = torch.randint(0, v, (t,), generator=g)
    mask = torch.ones(t)
    mask[offsets[:-1]] = 0
    scores = torch.tensor([1.0, 0.0, 0.5, 0.2])
    z = torch.randn(t, v, generator=g)
    zc = z.cuda().requires_grad_()
    loss = tpo.loss_from_logits(zc, tokens.cuda(), offsets, mask.cuda(), scores.cuda(), sizes)
    loss.backward()
    zr = z.double().requires_grad_()
    lr = tpo.loss_from_logits(zr, tokens, offsets, mask, scores.double(), sizes)
    lr.backward()
    close("loss", loss, lr, 1.0, 1e-4)
    close("dlogits", zc.grad, zr.grad, 0.5, 1e-4)
    hid = (torch.randn(t, h, generator=g) * 0.5).bfloat16()
    w = (torch.randn(v, h, generator=g) * 0.2).bfloat16()
    hc, wc = hid.cuda().requires_grad_(), w.cuda().requires_grad_()
    loss = tpo.loss_from_hidden(hc, wc, tokens.cuda(), offsets, mask.cuda(), scores.cuda(), sizes)
    loss.backward()
    hr, wr = hid.double().requires_grad_(), w.double().requires_grad_()
    lr = tpo.loss_from_hidden(hr, wr, tokens, offsets, mask, scores.double(), sizes)
    lr.backward()
    close("hidden loss", loss, lr, 1.0, 1.0 / 128)
    close("grad_hidden", hc.grad, hr.grad, hr.grad.abs().max().item(), 1.0 / 64)
    close("grad_weight", wc.grad, wr.grad, wr.grad.abs().max().item(), 1.0 / 64)


@pytest.mark.parametrize("kind", ["rollout", "stored"])
def test_rollout_and_stored_targets_on_a_side_stream(kind):
    g = torch.Generator().manual_seed(3)
    sizes = [3, 1, 6]
    n = sum(sizes)
    logp = torch.randn(n, generator=g) * 2 - 4
    old = logp + 0.3 * torch.randn(n, generator=g)
    scores = torch.rand(n, generator=g)
    r = logp.double().requires_grad_()
    _, q = tpo.group_loss(r.detach(), scores.double(), sizes, logp_old=old.double(), return_target=True)
    kw = {"logp_old": old.double()} if kind == "rollout" else {"target": q}
    sc = scores.double() if kind == "rollout" else None
    rl, rd = tpo.group_loss(r, sc, sizes, diagnostics=True, **kw)
    rl.backward()
    x = logp.cuda().requires_grad_()
    kwc = {"logp_old": old.cuda()} if kind == "rollout" else {"target": q.cuda()}
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        loss, d = tpo.group_loss(x, None if sc is None else scores.cuda(), sizes, diagnostics=True, **kwc)
        loss.backward()
    torch.cuda.synchronize()
    close("loss", loss, rl, 1.0, 1e-4)
    close("grad", x.grad, r.grad, 1.0 / len(sizes), 1e-5)
    close("kl_q_p", d["kl_q_p"], rd["kl_q_p"], 1.0, 1e-4)
    if kind == "rollout":
        close("kl_q_pold", d["kl_q_pold"], rd["kl_q_pold"], 1.0, 1e-4)


def test_token_paths_on_a_side_stream_with_diagnostics():
    g = torch.Generator().manual_seed(4)
    t, v, h = 12, 40, 16
    offsets, sizes = [0, 4, 8, 12], [3]
    tokens = torch.randint(0, v, (t,), generator=g)
    mask = torch.ones(t)
    scores = torch.tensor([1.0, 0.0, 0.5])
    z = torch.randn(t, v, generator=g)
    _, rq, rd = tpo.loss_from_logits(z.double(), tokens, offsets, mask, scores.double(), sizes, return_target=True, diagnostics=True)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        _, q, d = tpo.loss_from_logits(z.cuda(), tokens.cuda(), offsets, mask.cuda(), scores.cuda(), sizes, return_target=True, diagnostics=True)
    torch.cuda.synchronize()
    close("target", q, rq, 1.0, 1e-5)
    for k in ("seq_logp", "token_logp", "kl_q_p", "entropy_q"):
        close(k, d[k], rd[k], 1.0, 1e-4)
    hid = (torch.randn(t, h, generator=g) * 0.5).bfloat16()
    w = (torch.randn(v, h, generator=g) * 0.2).bfloat16()
    rl = tpo.loss_from_hidden(hid.double(), w.double(), tokens, offsets, mask, scores.double(), sizes)
    with torch.cuda.stream(s):
        loss = tpo.loss_from_hidden(hid.cuda(), w.cuda(), tokens.cuda(), offsets, mask.cuda(), scores.cuda(), sizes)
    torch.cuda.synchronize()
    close("hidden loss", loss, rl, 1.0, 1.0 / 128)
