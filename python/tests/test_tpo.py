"""tpo's PyTorch ops against the plain-PyTorch TPO of reference.py, on random CPU tensors."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref  # noqa: E402

import tpo  # noqa: E402

NEG_INF = float("-inf")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance of one rounding to the dtype (the op rounds its float64 result once).
RTOL = {torch.float64: 1e-9, torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def close(got, want, dtype, what, scale=None):
    """got (in dtype) is want (float64) rounded once, up to RTOL of the largest magnitude."""
    want = want.detach().double()
    got = got.detach().double()
    s = scale if scale is not None else max(want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item()
    assert err <= RTOL[dtype] * s + 1e-300, f"{what}: max error {err:.3e} over scale {s:.3e} ({dtype})"


def ragged_sizes(g, rng):
    sizes = [int(rng.integers(1, 9)) for _ in range(int(rng.integers(1, 6)))]
    return sizes


def make_group_case(seed, dtype, exclusions):
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = ragged_sizes(None, rng)
    n = sum(sizes)
    logp = torch.tensor(rng.normal(-20, 8, n), dtype=torch.float64).to(dtype).double()
    scores = torch.tensor(rng.choice([0.0, 1.0, 0.5, rng.normal()], n))
    logp_old = (logp + torch.tensor(rng.normal(0, 0.5, n))).to(dtype).double()
    if exclusions:
        # Exclude one member of each group with at least two (never a whole group).
        off = 0
        for k in sizes:
            if k >= 2:
                j = off + int(rng.integers(0, k))
                logp_old[j] = NEG_INF
                logp[j] = NEG_INF
            off += k
    eta = float(10 ** rng.uniform(-3, 3))
    return sizes, logp, scores, logp_old, eta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("source", ["on_policy", "rollout"])
def test_group_loss_matches_paper_reference(dtype, seed, source):
    sizes, logp64, scores, logp_old, eta = make_group_case(seed, dtype, exclusions=seed % 3 == 0)
    if source == "on_policy":
        logp_old = None
    reduction = ["mean", "sum"][seed % 2]
    c = 0.5 + seed  # an upstream scale: the backward must chain it
    # The op on the dtype's tensor; the reference on the same values, widened.
    x = logp64.to(dtype).clone().requires_grad_(True)
    old = None if logp_old is None else logp_old.to(dtype)
    loss, q, diag = tpo.group_loss(x, scores, sizes, logp_old=old, eta=eta, reduction=reduction,
                                   return_target=True, diagnostics=True)  # fmt: skip
    (c * loss).backward()
    r = logp64.detach().clone().requires_grad_(True)
    want, q_ref, per_group = ref.group_loss(r, scores, sizes, logp_old=logp_old, eta=eta, reduction=reduction)
    (c * want).backward()
    assert loss.dtype == dtype and q.dtype == torch.float64
    close(loss, want, dtype, "loss")
    close(q, q_ref, torch.float64, "target", scale=1.0)
    close(x.grad, r.grad, dtype, "gradient", scale=max(r.grad.abs().max().item(), 1e-300))
    close(diag["group_loss"], per_group, torch.float64, "per-group loss")
    assert torch.all(q[logp64 == NEG_INF] == 0)
    assert x.grad[logp64 == NEG_INF].abs().sum() == 0


@pytest.mark.parametrize("eta", [1e-3, 1e-2, 0.1, 1.0, 10.0, 1e2, 1e3])
def test_eta_range_loss_target_gradient(eta):
    g = torch.Generator().manual_seed(7)
    sizes = [3, 1, 6, 4]
    n = sum(sizes)
    logp = (torch.randn(n, generator=g, dtype=torch.float64) * 5 - 10).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    loss, q = tpo.group_loss(logp, scores, sizes, logp_old=old, eta=eta, return_target=True)
    loss.backward()
    r = logp.detach().clone().requires_grad_(True)
    want, q_ref, _ = ref.group_loss(r, scores, sizes, logp_old=old, eta=eta)
    want.backward()
    close(loss, want, torch.float64, "loss")
    close(q, q_ref, torch.float64, "target", scale=1.0)
    close(logp.grad, r.grad, torch.float64, "gradient")


def test_eta_extremes_reach_the_documented_limits():
    # eta -> 0: p_old restricted to each group's best-scored members, renormalised; eta -> inf: p_old.
    logp_old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -1.5], dtype=torch.float64)
    scores = torch.tensor([1.0, 1.0, 0.0, 0.2, 0.7, 0.7], dtype=torch.float64)
    sizes = [3, 3]
    _, q = tpo.group_loss(logp_old, scores, sizes, logp_old=logp_old, eta=1e-12, return_target=True)
    p1 = torch.softmax(logp_old[:2], 0)
    want = torch.cat([p1, torch.zeros(1), torch.zeros(1), torch.full((2,), 0.5, dtype=torch.float64)])
    torch.testing.assert_close(q, want, rtol=1e-12, atol=1e-300)
    _, q = tpo.group_loss(logp_old, scores, sizes, logp_old=logp_old, eta=1e6, return_target=True)
    p_old = torch.cat([torch.softmax(logp_old[:3], 0), torch.softmax(logp_old[3:], 0)])
    torch.testing.assert_close(q, p_old, rtol=1e-5, atol=0)


def test_stored_target_later_epoch_and_kl_form():
    g = torch.Generator().manual_seed(3)
    sizes = [4, 4, 2]
    n = sum(sizes)
    l0 = torch.randn(n, generator=g, dtype=torch.float64)
    scores = torch.randn(n, generator=g, dtype=torch.float64)
    _, q = tpo.group_loss(l0, scores, sizes, return_target=True)
    l1 = (l0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    for kl in (False, True):
        l1.grad = None
        loss, diag = tpo.group_loss(l1, None, sizes, target=q, loss_form="kl" if kl else "cross_entropy",
                                    diagnostics=True)  # fmt: skip
        loss.backward()
        r = l1.detach().clone().requires_grad_(True)
        want, _ = ref.fit(r, q, sizes, kl=kl)
        want.backward()
        close(loss, want, torch.float64, f"loss (kl={kl})")
        close(l1.grad, r.grad, torch.float64, "gradient")
        assert diag["kl_q_pold"] is None
        close(diag["entropy_q"] + diag["kl_q_p"], ref.fit(l1, q, sizes, reduction="sum")[1],
              torch.float64, "H(q) + KL(q||p) = cross-entropy")  # fmt: skip


def test_group_index_any_order_equals_contiguous_groups():
    g = torch.Generator().manual_seed(5)
    sizes = [3, 5, 2]
    n = sum(sizes)
    logp = torch.randn(n, generator=g, dtype=torch.float64)
    scores = torch.randn(n, generator=g, dtype=torch.float64)
    ids = torch.repeat_interleave(torch.tensor([10, 20, 30]), torch.tensor(sizes))
    perm = torch.randperm(n, generator=g)
    a = logp.clone().requires_grad_(True)
    la, qa = tpo.group_loss(a, scores, sizes, return_target=True)
    la.backward()
    b = logp[perm].clone().requires_grad_(True)
    lb, qb, d = tpo.group_loss(b, scores[perm], group_index=ids[perm], return_target=True, diagnostics=True)
    lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-13, atol=0)
    torch.testing.assert_close(qb, qa[perm], rtol=1e-13, atol=1e-300)
    torch.testing.assert_close(b.grad, a.grad[perm], rtol=1e-12, atol=1e-15)
    assert d["group_ids"].tolist() == [10, 20, 30]


def test_token_paths_take_a_contiguous_group_index_in_any_id_order():
    g = torch.Generator().manual_seed(13)
    z = torch.randn(8, 5, generator=g, dtype=torch.float64)
    tok = torch.randint(0, 5, (8,), generator=g)
    args = (tok, [0, 2, 3, 5, 6, 8], torch.ones(8), torch.randn(5, generator=g))
    a = tpo.loss_from_logits(z, *args, [3, 2])
    b = tpo.loss_from_logits(z, *args, group_index=torch.tensor([7, 7, 7, 2, 2]))
    assert a.item() == b.item()


def test_non_contiguous_inputs_are_handled():
    g = torch.Generator().manual_seed(11)
    base = torch.randn(16, generator=g, dtype=torch.float32)
    scores = torch.randn(16, generator=g)
    x = base[::2]
    assert not x.is_contiguous()
    la = tpo.group_loss(x, scores[::2], 4)
    lb = tpo.group_loss(x.contiguous(), scores[::2].contiguous(), 4)
    assert la.item() == lb.item()
    z = torch.randn(7, 12, generator=g).t()  # [12, 7], non-contiguous
    assert not z.is_contiguous()
    tok = torch.randint(0, 7, (12,), generator=g)
    args = (tok, [0, 4, 9, 12], torch.ones(12), torch.tensor([1.0, 0.0, 2.0]), 3)
    assert tpo.loss_from_logits(z, *args).item() == tpo.loss_from_logits(z.contiguous(), *args).item()


def test_deterministic_bit_identical():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(20, 11, generator=g, requires_grad=True)
    tok = torch.randint(0, 11, (20,), generator=g)
    args = (tok, [0, 5, 9, 14, 20], torch.ones(20), torch.randn(4, generator=g), 2)
    outs = []
    for _ in range(2):
        z.grad = None
        loss = tpo.loss_from_logits(z, *args)
        loss.backward()
        outs.append((loss.item(), z.grad.clone()))
    assert outs[0][0] == outs[1][0] and torch.equal(outs[0][1], outs[1][1])


def make_token_case(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    v = int(torch.randint(2, 17, (1,), generator=g))
    group_sizes = [int(k) for k in torch.randint(1, 5, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)]
    s = sum(group_sizes)
    lens = torch.randint(1, 6, (s,), generator=g)
    offsets = [0] + torch.cumsum(lens, 0).tolist()
    t = offsets[-1]
    logits = (torch.randn(t, v, generator=g, dtype=torch.float64) * 3).to(dtype).double()
    tokens = torch.randint(0, v, (t,), generator=g)
    if seed % 2 == 0 and v > 2:
        # Mask a vocabulary entry (-inf) that no sampled token uses.
        banned = (tokens + 1) % v
        logits[torch.arange(t), banned] = NEG_INF
    mask = (torch.rand(t, generator=g) < 0.8).float()
    scores = torch.randn(s, generator=g, dtype=torch.float64)
    return logits, tokens, offsets, mask, scores, group_sizes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(8))
def test_loss_from_logits_matches_paper_reference(dtype, seed):
    logits, tokens, offsets, mask, scores, gs = make_token_case(seed, dtype)
    temperature = [1.0, 0.7, 1.3][seed % 3]
    seq_reduce = ["sum", "mean"][seed % 2]
    eta = float(10 ** ((seed % 7) - 3))
    z = logits.to(dtype).clone().requires_grad_(True)
    loss, q, diag = tpo.loss_from_logits(z, tokens, offsets, mask, scores, gs, eta=eta, temperature=temperature,
                                         seq_reduce=seq_reduce, return_target=True, diagnostics=True)  # fmt: skip
    (1.7 * loss).backward()
    r = logits.detach().clone().requires_grad_(True)
    want, q_ref, _ = ref.loss_from_logits(r, tokens, offsets, mask, scores, gs, eta=eta,
                                          temperature=temperature, seq_reduce=seq_reduce)  # fmt: skip
    (1.7 * want).backward()
    close(loss, want, dtype, "loss", scale=max(abs(want.item()), 1.0))
    close(q, q_ref, torch.float64, "target", scale=1.0)
    close(z.grad, r.grad, dtype, "gradient of the logits")
    assert diag["seq_logp"].shape == (len(offsets) - 1,)
    assert torch.all(z.grad[logits == NEG_INF] == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_loss_from_hidden_matches_paper_reference(dtype):
    g = torch.Generator().manual_seed(21)
    t, h, v = 14, 6, 9
    hidden = torch.randn(t, h, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    tokens = torch.randint(0, v, (t,), generator=g)
    offsets, gs = [0, 3, 6, 10, 14], [2, 2]
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1])
    scores = torch.tensor([1.0, 0.0, 0.3, 0.9])
    hx, wx = hidden.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = tpo.loss_from_hidden(hx, wx, tokens, offsets, mask, scores, gs, eta=0.5, memory_budget=1 << 20)
    loss.backward()
    hr, wr = hidden.double().clone().requires_grad_(True), w.double().clone().requires_grad_(True)
    want, _, _ = ref.loss_from_logits(hr @ wr.t(), tokens, offsets, mask, scores, gs, eta=0.5)
    want.backward()
    close(loss, want, dtype, "loss", scale=max(abs(want.item()), 1.0))
    close(hx.grad, hr.grad, dtype, "gradient of the hidden states")
    close(wx.grad, wr.grad, dtype, "gradient of the lm_head")


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(9)
    sizes = [3, 1, 4]
    logp = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    old = torch.randn(8, generator=g, dtype=torch.float64)
    scores = torch.randn(8, generator=g, dtype=torch.float64)
    # The target is built from logp_old (a constant): the loss is a smooth function of logp.
    assert torch.autograd.gradcheck(lambda x: tpo.group_loss(x, scores, sizes, logp_old=old, eta=0.3), (logp,))
    z = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tok = torch.randint(0, 5, (9,), generator=g)
    offs, mask, sc = [0, 2, 5, 9], torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1]), torch.randn(3, generator=g)
    lold = torch.randn(3, generator=g, dtype=torch.float64) - 5
    assert torch.autograd.gradcheck(
        lambda x: tpo.loss_from_logits(x, tok, offs, mask, sc, 3, logp_old=lold, temperature=0.8), (z,)
    )
    hid = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    _, q = tpo.loss_from_hidden(hid.detach(), w.detach(), tok, offs, mask, sc, 3, return_target=True)
    assert torch.autograd.gradcheck(
        lambda a, b: tpo.loss_from_hidden(a, b, tok, offs, mask, None, 3, target=q, seq_reduce="mean"), (hid, w)
    )


def test_torch_compile_of_a_function_calling_the_ops():
    torch._dynamo.reset()
    sizes = [4, 4]

    def step(logp, scores, z, tok):
        a = tpo.group_loss(logp, scores, sizes, eta=0.5)
        b = tpo.loss_from_logits(z, tok, [0, 3, 6], torch.ones(6), scores[:2], 2)
        return 2.0 * a + b.square()

    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator().manual_seed(4)
    logp = torch.randn(8, generator=g, requires_grad=True)
    scores = torch.randn(8, generator=g)
    z = torch.randn(6, 5, generator=g, requires_grad=True)
    tok = torch.randint(0, 5, (6,), generator=g)
    out = compiled(logp, scores, z, tok)
    out.backward()
    g1, gz1 = logp.grad.clone(), z.grad.clone()
    logp.grad = z.grad = None
    want = step(logp, scores, z, tok)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(g1, logp.grad)
    torch.testing.assert_close(gz1, z.grad)


def test_torch_compile_with_group_index_and_a_stored_target():
    # group_index is data-dependent (a graph break, not an error); the stored target is an input.
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    logp = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 0, 1, 0, 1, 0])
    _, q = tpo.group_loss(logp, torch.randn(6, generator=g), group_index=ids, return_target=True)

    def later(x):
        return tpo.group_loss(x, None, group_index=ids, target=q) * 3.0

    out = torch.compile(later)(logp)
    (gc,) = torch.autograd.grad(out, logp)
    want = later(logp)
    (ge,) = torch.autograd.grad(want, logp)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(gc, ge)


def test_ops_pass_torch_library_opcheck():
    g = torch.Generator().manual_seed(8)
    logp = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(6, generator=g, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.tpo.group_loss.default,
        (logp, [2, 4], scores, None, None, 1.0, 1e-6, True, False, "mean", None),
    )


def test_data_parallel_global_num_groups_sums_to_the_global_mean():
    g = torch.Generator().manual_seed(12)
    sizes = [3, 3, 2, 4]
    n = sum(sizes)
    logp = torch.randn(n, generator=g, dtype=torch.float64)
    scores = torch.randn(n, generator=g, dtype=torch.float64)
    full = logp.clone().requires_grad_(True)
    tpo.group_loss(full, scores, sizes).backward()
    # Two "ranks" (or micro-batches) of whole groups, each normalised by the global count.
    assert tpo.global_num_groups(2) == 2  # no process group: the local count
    grads, total = [], 0.0
    for lo, hi, sz in ((0, 6, [3, 3]), (6, 12, [2, 4])):
        part = logp[lo:hi].clone().requires_grad_(True)
        loss = tpo.group_loss(part, scores[lo:hi], sz, global_num_groups=len(sizes))
        loss.backward()
        grads.append(part.grad)
        total += loss.item()
    torch.testing.assert_close(torch.cat(grads), full.grad, rtol=1e-13, atol=1e-16)
    assert math.isclose(total, tpo.group_loss(logp, scores, sizes).item(), rel_tol=1e-13)


# ---------------------------------------------------------------------------------------------
# Bad inputs: a ValueError with a one-line message, never a crash.

X = torch.tensor([-1.0, -2.0, -3.0, -4.0])
S = torch.tensor([1.0, 0.0, 0.5, 0.2])
Z = torch.randn(4, 3)
TOK = torch.tensor([0, 1, 2, 0])

BAD = [
    ("nan logp", lambda: tpo.group_loss(torch.tensor([math.nan, 1.0, 2.0, 3.0]), S, 2), r"logp\[0\] is NaN"),
    ("+inf logp", lambda: tpo.group_loss(torch.tensor([1.0, math.inf, 2.0, 3.0]), S, 2), r"logp\[1\] is inf"),
    ("all excluded", lambda: tpo.group_loss(torch.tensor([NEG_INF, NEG_INF, 2.0, 3.0]), S, 2), "every logp value is -inf"),
    ("nan score", lambda: tpo.group_loss(X, torch.tensor([1.0, math.nan, 0.0, 0.0]), 2), r"scores\[1\] is NaN"),
    ("eta 0", lambda: tpo.group_loss(X, S, 2, eta=0.0), "eta must be finite and > 0"),
    ("eta nan", lambda: tpo.group_loss(X, S, 2, eta=math.nan), "eta must be finite and > 0"),
    ("eta inf", lambda: tpo.group_loss(X, S, 2, eta=math.inf), "eta must be finite and > 0"),
    ("short scores", lambda: tpo.group_loss(X, S[:3], 2), "scores has 3 elements, expected 4"),
    ("sizes sum", lambda: tpo.group_loss(X, S, [1, 2]), "group_sizes sum to 3"),
    ("empty group", lambda: tpo.group_loss(X, S, [0, 4]), "group 0 is empty"),
    ("uniform K", lambda: tpo.group_loss(X, S, 3), "does not divide"),
    ("no groups", lambda: tpo.group_loss(X, S), "exactly one of group_sizes and group_index"),
    ("int logp", lambda: tpo.group_loss(torch.tensor([1, 2, 3, 4]), S, 2), "logp has dtype torch.int64"),
    ("2-D logp", lambda: tpo.group_loss(X.reshape(2, 2), S, 2), "logp must be 1-D"),
    ("not a tensor", lambda: tpo.group_loss([1.0, 2.0], S, 2), "logp must be a torch.Tensor"),
    ("reduction", lambda: tpo.group_loss(X, S, 2, reduction="max"), 'reduction must be "mean" or "sum"'),
    ("global n 0", lambda: tpo.group_loss(X, S, 2, global_num_groups=0), "global group count must be finite and > 0"),
    ("global with sum", lambda: tpo.group_loss(X, S, 2, reduction="sum", global_num_groups=4), "global_num_groups applies"),
    ("target and scores", lambda: tpo.group_loss(X, S, 2, target=torch.full((4,), 0.5)), "stored target is given"),
    ("no scores", lambda: tpo.group_loss(X, None, 2), "scores are required"),
    ("bad target sum", lambda: tpo.group_loss(X, None, 2, target=torch.tensor([0.5, 0.9, 0.5, 0.5])), "group 0 sums to 1.39"),
    ("negative target", lambda: tpo.group_loss(X, None, 2, target=torch.tensor([-0.5, 1.5, 0.5, 0.5])), r"target\[0\] is -0.5"),
    ("infinite loss", lambda: tpo.group_loss(torch.tensor([NEG_INF, 1.0, 2.0, 3.0]), None, 2, target=torch.full((4,), 0.5)), "cross-entropy is infinite"),
    ("loss form", lambda: tpo.group_loss(X, S, 2, loss_form="l2"), "loss_form must be"),
    ("token id", lambda: tpo.loss_from_logits(Z, torch.tensor([0, 1, 3, 0]), [0, 2, 4], torch.ones(4), S[:2], 2), "token id"),
    ("negative token", lambda: tpo.loss_from_logits(Z, torch.tensor([0, -100, 1, 0]), [0, 2, 4], torch.ones(4), S[:2], 2), r"tokens\[1\] is -100"),
    ("float tokens", lambda: tpo.loss_from_logits(Z, TOK.float(), [0, 2, 4], torch.ones(4), S[:2], 2), "tokens has dtype torch.float32"),
    ("offsets end", lambda: tpo.loss_from_logits(Z, TOK, [0, 2, 3], torch.ones(4), S[:2], 2), "seq_offsets end at 3"),
    ("offsets order", lambda: tpo.loss_from_logits(Z, TOK, [0, 3, 2, 4], torch.ones(4), S[:3], 3), "offsets must increase"),
    ("offsets start", lambda: tpo.loss_from_logits(Z, TOK, [1, 2, 4], torch.ones(4), S[:2], 2), r"offsets\[0\] is 1"),
    ("temperature", lambda: tpo.loss_from_logits(Z, TOK, [0, 2, 4], torch.ones(4), S[:2], 2, temperature=0.0), "temperature must be"),
    ("temperature None", lambda: tpo.loss_from_logits(Z, TOK, [0, 2, 4], torch.ones(4), S[:2], 2, temperature=None), "temperature must be a number"),
    ("no mask", lambda: tpo.loss_from_logits(Z, TOK, [0, 2, 4], None, S[:2], 2), "tokens and completion_mask are required"),
    ("seq_reduce", lambda: tpo.loss_from_logits(Z, TOK, [0, 2, 4], torch.ones(4), S[:2], 2, seq_reduce="max"), "seq_reduce must be"),
    ("sampled -inf", lambda: tpo.loss_from_logits(torch.tensor([[NEG_INF, 0.0]] * 2), torch.tensor([0, 1]), [0, 1, 2], torch.ones(2), S[:2], 2), "sampled token's logit must be finite"),
    ("nan logits", lambda: tpo.loss_from_logits(torch.tensor([[math.nan, 0.0]] * 2), torch.tensor([1, 1]), [0, 1, 2], torch.ones(2), S[:2], 2), r"logits\[0\] is NaN"),
    ("mask length", lambda: tpo.loss_from_logits(Z, TOK, [0, 2, 4], torch.ones(3), S[:2], 2), "completion_mask has 3 elements"),
    ("group_index order", lambda: tpo.loss_from_logits(Z, TOK, [0, 1, 2, 3, 4], torch.ones(4), S, group_index=torch.tensor([0, 1, 0, 1])), "contiguously"),
    ("hidden dtype", lambda: tpo.loss_from_hidden(torch.randn(4, 2), torch.randn(3, 2, dtype=torch.float64), TOK, [0, 2, 4], torch.ones(4), S[:2], 2), "give one dtype"),
    ("hidden dim", lambda: tpo.loss_from_hidden(torch.randn(4, 2), torch.randn(3, 5), TOK, [0, 2, 4], torch.ones(4), S[:2], 2), "features per token"),
    ("budget", lambda: tpo.loss_from_hidden(torch.randn(4, 2), torch.randn(3, 2), TOK, [0, 2, 4], torch.ones(4), S[:2], 2, memory_budget=64), "over memory_budget=64"),
]


@pytest.mark.parametrize("name,call,message", BAD, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_raises_value_error_with_one_line_message(name, call, message):
    with pytest.raises(ValueError, match=message) as e:
        call()
    assert "\n" not in str(e.value), f"{name}: multi-line message {e.value!r}"


def test_devices_are_checked():
    # No torch CUDA here: stand-ins whose .device is all the check reads, and a meta tensor.
    with pytest.raises(ValueError, match="logp is on meta"):
        tpo.group_loss(torch.empty(4, device="meta"), S, 2)
    with pytest.raises(ValueError, match=r"scores is on cuda:1, but the call's main input is on cuda:0"):
        tpo._check_device(_FakeDevice(1), "scores", torch.device("cuda", 0))
    with pytest.raises(ValueError, match=r"scores is on cuda:0, but the call's main input is on cpu"):
        tpo._check_device(_FakeDevice(0), "scores", torch.device("cpu"))
    # Constants on the CPU are accepted beside a CUDA input (the CUDA path copies them over).
    tpo._check_device(torch.zeros(2), "scores", torch.device("cuda", 0))
    assert tpo._native.HAS_CUDA, "the wheel is built with its CUDA path"


class _FakeDevice:
    """Stands in for a CUDA tensor: only .device is read by the check."""

    def __init__(self, index: int):
        self.device = torch.device("cuda", index)
