"""TPO written the paper's way in plain PyTorch (float64, autograd): the oracle of the tests.

Per group: u = (s - mean s) / std s over the members whose l_old is finite (population std;
u = 0 when std <= 1e-6), q = softmax(log_softmax(l_old) + u / eta) (q = 0 where l_old = -inf),
held fixed, and L = -sum_i q_i log_softmax(l)_i. The gradient is whatever autograd makes of that.
"""

import torch

NEG_INF = float("-inf")


def target(logp_old, scores, sizes, eta=1.0, zero_std_threshold=1e-6, anchor=True):
    lo_all = logp_old.detach().double()
    s_all = scores.detach().double()
    qs, off = [], 0
    for k in sizes:
        lo, s = lo_all[off : off + k], s_all[off : off + k]
        inc = lo != NEG_INF
        u = torch.zeros(k, dtype=torch.float64)
        si = s[inc]
        sd = si.std(unbiased=False) if si.numel() > 0 else torch.tensor(0.0, dtype=torch.float64)
        if sd > zero_std_threshold:
            u[inc] = (si - si.mean()) / sd
        base = torch.log_softmax(lo, 0) if anchor else torch.where(inc, 0.0, NEG_INF).double()
        a = torch.where(inc, base + u / eta, torch.full_like(base, NEG_INF))
        qs.append(torch.softmax(a, 0))
        off += k
    return torch.cat(qs)


def fit(logp, q, sizes, reduction="mean", global_num_groups=None, kl=False):
    """Loss w * sum_g L_g as a differentiable function of logp (q a constant)."""
    losses, off = [], 0
    for k in sizes:
        lp = torch.log_softmax(logp[off : off + k].double(), 0)
        qg = q[off : off + k]
        pos = qg > 0
        loss = -(qg[pos] * lp[pos]).sum()
        if kl:
            loss = loss + (qg[pos] * qg[pos].log()).sum()
        losses.append(loss)
        off += k
    total = torch.stack(losses).sum()
    if global_num_groups is not None:
        return total / global_num_groups, torch.stack(losses)
    if reduction == "mean":
        return total / len(sizes), torch.stack(losses)
    return total, torch.stack(losses)


def group_loss(logp, scores, sizes, logp_old=None, eta=1.0, **kw):
    q = target(logp if logp_old is None else logp_old, scores, sizes, eta)
    loss, per_group = fit(logp, q, sizes, **kw)
    return loss, q, per_group


def token_logp(logits, tokens, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, -1).gather(1, tokens.long()[:, None])[:, 0]


def seq_logp(tl, offsets, mask, seq_reduce="sum"):
    out = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        m = mask[a:b].double()
        s = (tl[a:b] * m).sum() if m.sum() > 0 else tl[a:b].sum() * 0.0
        if seq_reduce == "mean":
            s = s / m.sum() if m.sum() > 0 else s * 0.0
        out.append(s)
    return torch.stack(out)


def loss_from_logits(logits, tokens, offsets, mask, scores, sizes, logp_old=None, eta=1.0,
                     temperature=1.0, seq_reduce="sum", **kw):  # fmt: skip
    tl = token_logp(logits, tokens, temperature)
    tl = torch.where(mask.bool(), tl, torch.zeros_like(tl))
    l = seq_logp(tl, offsets, mask, seq_reduce)
    return group_loss(l, scores, sizes, logp_old=logp_old, eta=eta, **kw)
