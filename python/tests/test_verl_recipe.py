"""python/examples/verl_tpo_loss.py against a hand-written PyTorch TPO on verl-shaped tensors.

verl hands its policy loss (batch, response_length) tensors and GRPO advantages; the reference here
is built from the raw rewards, so the test also checks that the advantages give TPO's target.
"""

import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref  # noqa: E402

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "verl_tpo_loss", os.path.join(_here, "..", "examples", "verl_tpo_loss.py")
)
verl_tpo_loss = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(verl_tpo_loss)


def verl_batch(seed, groups, n, length):
    g = torch.Generator().manual_seed(seed)
    b = groups * n
    lens = torch.randint(1, length + 1, (b,), generator=g)
    mask = (torch.arange(length)[None, :] < lens[:, None]).to(torch.int64)
    old = -3 * torch.rand(b, length, generator=g)
    new = old + 0.2 * torch.randn(b, length, generator=g)
    rewards = torch.randint(0, 3, (b,), generator=g).float()  # ties and zero-variance groups happen
    # GRPO's advantage (verl's compute_grpo_outcome_advantage): per group, (r - mean) / (std + eps),
    # with the sample std, broadcast over the response's tokens.
    r = rewards.view(groups, n)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6) if n > 1 else r * 0
    adv = adv.reshape(b, 1) * mask
    return old, new, adv, mask, rewards


def config(n, eta, info=None):
    return SimpleNamespace(rollout_n=n, global_batch_info=info or {}, policy_loss=SimpleNamespace(tpo_eta=eta))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 4, 5])
def test_verl_loss_matches_hand_written_tpo(seed, n):
    groups, length, eta = 3, 7, [0.01, 0.3, 1.0, 10.0][seed % 4]
    old, new, adv, mask, rewards = verl_batch(seed, groups, n, length)
    x = new.clone().requires_grad_(True)
    loss, metrics = verl_tpo_loss.compute_policy_loss_tpo(old, x, adv, mask, "token-mean", config(n, eta))
    loss.backward()
    # The paper's way: sequence log-probs, the target from l_old and the raw rewards, cross-entropy.
    y = new.double().clone().requires_grad_(True)
    m = mask.double()
    want, _, _ = ref.group_loss((y * m).sum(-1), rewards.double(), [n] * groups,
                                logp_old=(old.double() * m).sum(-1), eta=eta)  # fmt: skip
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(x.grad[mask == 0] == 0)
    assert set(metrics) >= {"actor/tpo_kl_q_p", "actor/ppo_kl"}


def test_verl_global_batch_info_normalises_like_agg_loss():
    n, groups = 4, 2
    old, new, adv, mask, _ = verl_batch(1, groups, n, 5)
    local, _ = verl_tpo_loss.compute_policy_loss_tpo(old, new, adv, mask, config=config(n, 1.0))
    # Two ranks, each with two micro-batches of this size: 4x the groups, dp_size 2.
    info = {"dp_size": 2, "global_batch_size": 4 * groups * n}
    scaled, _ = verl_tpo_loss.compute_policy_loss_tpo(old, new, adv, mask, config=config(n, 1.0, info))
    # (1/n) sum with n = global groups / dp = 4 groups: half the local mean over 2 groups.
    torch.testing.assert_close(scaled, local / 2)


def test_verl_loss_refuses_partial_groups_and_missing_rollout_n():
    old, new, adv, mask, _ = verl_batch(2, 2, 4, 5)
    with pytest.raises(ValueError, match="whole groups"):
        verl_tpo_loss.compute_policy_loss_tpo(old[:6], new[:6], adv[:6], mask[:6], config=config(4, 1.0))
    with pytest.raises(ValueError, match="rollout_n"):
        verl_tpo_loss.compute_policy_loss_tpo(old, new, adv, mask, config=None)


def test_verl_registry_when_verl_is_installed():
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    assert core.get_policy_loss_fn("tpo") is verl_tpo_loss.compute_policy_loss_tpo


@pytest.mark.parametrize("norm_adv_by_std", [True, False])
def test_with_verl_itself_its_grpo_advantages_config_and_registry(norm_adv_by_std):
    """With verl installed: verl's GRPO advantage estimator, its ActorConfig and its loss registry."""
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    import numpy as np
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    n, groups, length = 4, 3, 6
    old, new, _, mask, rewards = verl_batch(7, groups, n, length)
    # verl puts the outcome reward on the last response token.
    token_rewards = torch.zeros(old.shape)
    token_rewards[torch.arange(len(rewards)), mask.sum(-1) - 1] = rewards
    index = np.repeat(np.array([f"prompt-{g}" for g in range(groups)], dtype=object), n)
    adv, _ = core.compute_grpo_outcome_advantage(token_rewards, mask, index, norm_adv_by_std_in_grpo=norm_adv_by_std)
    cfg = ActorConfig(strategy="fsdp", rollout_n=n, ppo_micro_batch_size_per_gpu=n * groups,
                      policy_loss=PolicyLossConfig(loss_mode="tpo"))  # fmt: skip
    fn = core.get_policy_loss_fn(cfg.policy_loss.get("loss_mode"))
    x = new.clone().requires_grad_(True)
    loss, _ = fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask.bool(),
                 loss_agg_mode=cfg.loss_agg_mode, config=cfg, rollout_is_weights=None)  # fmt: skip
    loss.backward()
    y = new.double().clone().requires_grad_(True)
    m = mask.double()
    eta = verl_tpo_loss.TPO_ETA
    want, _, _ = ref.group_loss((y * m).sum(-1), rewards.double(), [n] * groups,
                                logp_old=(old.double() * m).sum(-1), eta=eta)  # fmt: skip
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-7)
