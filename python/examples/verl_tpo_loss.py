"""TPO as a verl policy loss: drop this file into your verl project and select it by name.

verl calls a registered policy loss with its (batch, response_length) tensors:

    compute_policy_loss_tpo(old_log_prob, log_prob, advantages, response_mask,
                            loss_agg_mode, config, rollout_is_weights) -> (loss, metrics)

This one forms each response's sequence log-prob (masked sums of the token log-probs, now and at
rollout) and calls `tpo.group_loss` over the groups of `config.rollout_n` responses of a prompt:
the target `q = softmax(log_softmax(l_old) + zscore(s) / eta)` per group, and the loss
`-sum q log softmax(l)` averaged over groups. The score `s` of a response is its advantage
(GRPO's advantage is one value per response, broadcast over its tokens): GRPO's
`(r - mean) / (std + eps)` is an affine map of the rewards within a group, which leaves the
z-score, and so the target, unchanged.

Select it (verl 0.9 option names) and keep every micro-batch made of whole, contiguous groups:

    algorithm.adv_estimator=grpo
    actor_rollout_ref.actor.policy_loss.loss_mode=tpo
    actor_rollout_ref.actor.use_dynamic_bsz=False    # token-balanced micro-batches would split groups
    actor_rollout_ref.actor.shuffle=False
    trainer.balance_batch=False                       # re-balancing across ranks reorders responses
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=<a multiple of rollout.n>

and import this module in the process that builds the actor (for example from your reward or
entry-point module), so that `@register_policy_loss("tpo")` has run. The temperature is `TPO_ETA`
below (verl's PolicyLossConfig has no field for it).

Data-parallel normalisation follows verl's `agg_loss`: when verl sets `config.global_batch_info`
(dp_size, global_batch_size in responses), the loss is `(1 / n) sum_g L_g` over this micro-batch's
groups with `n = global_batch_size / (rollout_n * dp_size)`, so that after FSDP averages the
gradients over ranks and micro-batches accumulate, the update is the mean over all the mini-batch's
groups. Without it (a direct call), the mean over this call's groups.
"""

from __future__ import annotations

import torch

import tpo

try:
    from verl.trainer.ppo.core_algos import register_policy_loss
except ImportError:  # verl not installed: the function still works (and is tested) on its own

    def register_policy_loss(name):
        return lambda f: f


TPO_ETA = 1.0


def _get(obj, name, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


@register_policy_loss("tpo")
def compute_policy_loss_tpo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """TPO's group loss on verl's tensors (all `(batch, response_length)`); `loss_agg_mode` does not
    apply (TPO's loss is a mean over groups). Returns `(loss, metrics)` as verl expects."""
    if rollout_is_weights is not None:
        raise ValueError("the TPO loss takes no rollout importance weights: disable rollout correction")
    n = int(_get(config, "rollout_n", 0) or 0)
    if n < 1:
        raise ValueError("config.rollout_n (responses per prompt) is required to form TPO's groups")
    b = log_prob.shape[0]
    if b % n != 0:
        raise ValueError(f"a micro-batch of {b} responses does not hold whole groups of rollout_n={n}")
    mask = response_mask.to(log_prob.dtype)
    l = (log_prob * mask).sum(-1)
    l_old = (old_log_prob.detach() * mask).sum(-1)
    scores = (advantages.detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    info = _get(config, "global_batch_info", None) or {}
    gbs, dp = info.get("global_batch_size"), info.get("dp_size") or 1
    gng = None if gbs is None else float(gbs) / (n * float(dp))
    eta = _get(_get(config, "policy_loss"), "tpo_eta", None) or TPO_ETA
    loss, diag = tpo.group_loss(l, scores, n, logp_old=l_old, eta=eta, global_num_groups=gng, diagnostics=True)
    with torch.no_grad():
        ppo_kl = ((old_log_prob - log_prob) * mask).sum() / mask.sum().clamp(min=1)
    metrics = {
        "actor/tpo_kl_q_p": diag["kl_q_p"].mean().item(),
        "actor/tpo_entropy_q": diag["entropy_q"].mean().item(),
        "actor/tpo_kl_q_pold": diag["kl_q_pold"].mean().item(),
        "actor/ppo_kl": ppo_kl.item(),
    }
    return loss, metrics
