"""TPO in TRL: a GRPOTrainer whose loss is tpo.loss_from_hidden, with whole groups per step.

Runs on the CPU in about a minute, with nothing downloaded: a tiny randomly initialised Llama built
from a config, a character-level tokenizer built here, and a reward function on strings (the share
of the letter "a" in the completion). Run it with the `tpo` wheel, `trl` and `transformers` installed:

    python python/examples/trl_tpo.py

How the subclass works:

* Each generation batch is scored by TRL as usual. `_generate_and_score_completions` then tags
  every completion with its group (its prompt: TRL repeats each prompt `num_generations` times,
  contiguously) and records its sequence log-prob at rollout, `l_old`, computed by tpo itself.
* `_compute_loss` runs the model's trunk for the last hidden states and hands them, with the
  lm_head weight, to `tpo.loss_from_hidden`. The target per group is
  `q = softmax(log_softmax(l_old) + zscore(scores) / eta)`. TRL's advantages serve as the scores:
  they are an affine map of the rewards within each group (rewards minus the group mean, divided by
  a positive scale), and the z-score is unchanged by such a map, so the target is the one the raw
  rewards give.
* TRL shuffles the generation batch before splitting it into micro-batches, so this recipe needs
  `steps_per_generation=1` (one micro-batch per generation batch): each step then sees whole
  groups, which the loss checks. `num_iterations` epochs fit the same target; the loss on a batch
  falls from one iteration to the next, which the script asserts.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

import tpo


class TPOTrainer(GRPOTrainer):
    """GRPOTrainer with the TPO loss of `tpo.loss_from_hidden` (eta: TPO's temperature)."""

    def __init__(self, *args, tpo_eta: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.steps_per_generation != 1:
            raise ValueError("TPOTrainer needs steps_per_generation=1 so that every step holds whole groups")
        self.tpo_eta = tpo_eta
        self.tpo_losses: list[tuple[int, float]] = []  # (generation index, loss) per step

    def _trunk_and_head(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.model(input_ids=ids, attention_mask=attention).last_hidden_state
        c = completion_ids.shape[1]
        # The state before each completion token predicts it.
        h = hidden[:, -c - 1 : -1, :]
        b = h.shape[0]
        return h.reshape(b * c, -1), base.lm_head.weight, completion_ids.reshape(-1), c, b

    def _tpo_call(self, model, inputs, **kw):
        h, w, tokens, c, b = self._trunk_and_head(model, inputs)
        group = inputs["tpo_group"]
        order = torch.argsort(group, stable=True)  # TRL shuffled the batch: regroup it
        _, sizes = torch.unique_consecutive(group[order], return_counts=True)
        if torch.any(sizes != self.num_generations):
            raise ValueError("a micro-batch holds a partial group: TPO needs whole groups per step")
        h = h.reshape(b, c, -1)[order].reshape(b * c, -1)
        tokens = tokens.reshape(b, c)[order].reshape(-1)
        mask = inputs["completion_mask"][order].reshape(-1)
        offsets = list(range(0, b * c + 1, c))
        return tpo.loss_from_hidden(
            h.float(), w.float(), tokens, offsets, mask, inputs["advantages"][order].float(), sizes.tolist(),
            eta=self.tpo_eta, temperature=self.temperature,
            global_num_groups=tpo.global_num_groups(len(sizes)), **kw,
        ), order  # fmt: skip

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        n = out["completion_ids"].shape[0]
        first = self.accelerator.process_index * n
        out["tpo_group"] = (first + torch.arange(n, device=out["completion_ids"].device)) // self.num_generations
        # l_old: the sequence log-probs at rollout, computed by tpo on the same path as the loss.
        with torch.no_grad():
            (_, diag), order = self._tpo_call(self.model, out, diagnostics=True)
        l_old = torch.empty_like(diag["seq_logp"])
        l_old[order] = diag["seq_logp"]
        out["tpo_logp_old"] = l_old
        self._tpo_generation = getattr(self, "_tpo_generation", -1) + 1
        return out

    def _compute_loss(self, model, inputs):
        order = torch.argsort(inputs["tpo_group"], stable=True)
        loss, _ = self._tpo_call(model, inputs, logp_old=inputs["tpo_logp_old"][order])
        self.tpo_losses.append((self._tpo_generation, loss.item()))
        return loss


def char_tokenizer() -> PreTrainedTokenizerFast:
    chars = list("abcdefghijklmnopqrstuvwxyz ")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{ch: i + 3 for i, ch in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def reward_share_of_a(completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]


def main() -> int:
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    prompts = Dataset.from_dict({"prompt": ["say a", "the cat", "banana", "hello"] * 8})
    iterations = 4
    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, per_device_train_batch_size=8, num_generations=4,
            steps_per_generation=1, num_iterations=iterations, max_completion_length=6,
            max_steps=12, learning_rate=3e-3, beta=0.0, temperature=1.0, logging_steps=4,
            report_to="none", use_cpu=True, save_strategy="no", seed=0, bf16=False,
        )  # fmt: skip
        trainer = TPOTrainer(
            model=model, reward_funcs=reward_share_of_a, args=args, train_dataset=prompts,
            processing_class=tokenizer, tpo_eta=0.5,
        )  # fmt: skip
        trainer.train()
    by_gen: dict[int, list[float]] = {}
    for g, loss in trainer.tpo_losses:
        by_gen.setdefault(g, []).append(loss)
    ok = True
    for g, losses in sorted(by_gen.items()):
        print(f"generation {g}: TPO loss over {len(losses)} iterations: " + ", ".join(f"{x:.5f}" for x in losses))
        ok &= len(losses) == iterations and losses[-1] < losses[0]
    print("the loss decreased within every generation batch" if ok else "the loss did NOT decrease")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
