"""GRPO on prompts with rewards from the closed set: ``preference_loop.train`` with ``GRPOObjective``.

Per micro-batch of ``batch_size`` prompts (Shao et al. 2024, "DeepSeekMath", sec. 4):

1. sample ``grpo_num_generations`` completions of each prompt from the current policy (adapter on,
   dropout off) at ``grpo_temperature`` (no top-k/top-p: the loss assumes the model's own
   distribution), up to ``grpo_max_completion_length`` tokens or the end-of-turn token;
2. score each decoded completion with the job's rewards (``rewards.py``: exact_match, regex_match,
   json_schema, length_penalty, weighted and summed) against its prompt's row;
3. group-normalise the rewards into advantages and take one policy-gradient step on the clipped
   surrogate with a k3 KL penalty to the reference model (the adapter disabled), weight ``beta``
   (``losses.grpo_advantages``, ``losses.grpo_loss``).

Sampling draws from torch's global generator, which checkpoints capture at step boundaries, so a
resumed GRPO run samples the same completions as the uninterrupted one. Logged per step: reward
(mean), reward_std (mean within-group std), each reward's unweighted mean, kl, completion_length.
Validation (and the evaluation gate, best step and early stopping) uses the mean reward of one
greedy completion per validation prompt; there is no validation loss (valid_loss stays empty).
With ``data.packing`` the policy and reference forward passes run on the completions packed into
rows of ``max_seq_length`` tokens.
"""

from __future__ import annotations

import math

import torch

from gpu_worker.contract import DataFormat, JobSpec, LogEvent
from gpu_worker.data import DataError
from gpu_worker.data_preference import Loaded, PromptExample, Renderer, load_examples
from gpu_worker.recipes.completion_batches import batch_tokens, collate_completions
from gpu_worker.recipes import RunContext, losses
from gpu_worker.recipes.preference_loop import MicroResult, reference, token_logps, train
from gpu_worker.recipes.rewards import MethodParamsError, RewardSet, build_rewards


class GRPOObjective:
    name = "grpo"
    uses_reference = True

    def __init__(self, spec: JobSpec, ctx: RunContext | None = None):
        p = spec.method_params
        self.params = p
        warn = None if ctx is None else (lambda message: ctx.emit(LogEvent(level="warn", message=message)))
        self.rewards: RewardSet = build_rewards(p, warn=warn)
        self.max_prompt_length = spec.hyperparameters.max_seq_length - p.grpo_max_completion_length
        if self.max_prompt_length < 1:
            raise MethodParamsError(
                f"{p.grpo_max_completion_length} completion tokens leave no room for a prompt within max_seq_length={spec.hyperparameters.max_seq_length}",
                param="method_params.grpo_max_completion_length",
            )
        self.pack_width = spec.hyperparameters.max_seq_length if spec.data.packing else None
        self.chat_template = spec.data.chat_template
        self.tokenizer = None
        self.stop_ids: tuple[int, ...] = ()  # what ends a completion: EOS and the template's end-of-turn token

    def load(self, store, tokenizer, key: str, param: str) -> Loaded:
        self.tokenizer = tokenizer
        self.stop_ids = Renderer.of(tokenizer, self.chat_template).stop_ids()
        return load_examples(
            store, key, tokenizer, DataFormat.prompt, max_seq_length=self.max_prompt_length,
            max_prompt_length=self.max_prompt_length, required_fields=self.rewards.reference_fields, param=param,
            chat_template=self.chat_template,
        )

    @torch.no_grad()
    def sample(self, model, prompts: list[PromptExample], device, *, greedy: bool = False) -> list[list[int]]:
        """``num_generations`` completions of each prompt, consecutive per prompt (``greedy``: one,
        the most likely), as token lists ending at (and including) the first end-of-turn token
        (``stop_ids``: EOS, or the chat template's own end of turn)."""
        from transformers import GenerationConfig

        tok, g = self.tokenizer, 1 if greedy else self.params.grpo_num_generations
        width = max(len(p.prompt) for p in prompts)
        # Left padding: every row's next token comes right after its prompt.
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p.prompt) :] = torch.tensor(list(p.prompt), dtype=torch.long)
            mask[row, width - len(p.prompt) :] = 1
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=self.params.grpo_temperature, top_k=0, top_p=1.0)
        config = GenerationConfig(
            **sampling, max_new_tokens=self.params.grpo_max_completion_length, num_return_sequences=g,
            pad_token_id=tok.pad_token_id, eos_token_id=list(self.stop_ids or (tok.eos_token_id,)),
        )
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        finally:
            model.train(was_training)
        completions, stops = [], set(self.stop_ids or (tok.eos_token_id,))
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            completions.append(row[:end])
        return completions

    def micro_step(self, model, prompts: list[PromptExample], step_examples: int, device) -> MicroResult:
        g = self.params.grpo_num_generations
        completions = self.sample(model, prompts, device)
        rows = [p for p in prompts for _ in range(g)]
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        scored = [self.rewards.scored(t, len(c), r.row) for t, c, r in zip(texts, completions, rows)]
        scores, parts = [total for total, _ in scored], [part for _, part in scored]
        if not all(math.isfinite(s) for s in scores):  # the contract's bounds keep them finite: never train on it
            raise MethodParamsError(f"a completion's reward is not finite ({max(scores, key=abs)}): check the rewards' "
                                    "weights and scales", param="method_params.rewards")
        rewards = torch.tensor(scores, dtype=torch.float32, device=device)
        advantages = losses.grpo_advantages(rewards, g)
        batch = collate_completions([r.prompt for r in rows], completions, self.tokenizer.pad_token_id, device, pack_width=self.pack_width)
        policy, mask = token_logps(model, batch)
        with reference(model):
            ref, _ = token_logps(model, batch)
        per_completion, kl = losses.grpo_loss(policy, policy.detach(), ref, advantages, mask, self.params.beta)
        metrics = {
            "reward": rewards.mean().item(),
            "reward_std": rewards.view(-1, g).std(dim=1).mean().item(),
            "kl": kl.mean().item(),
            "completion_length": sum(len(c) for c in completions) / len(completions),
        }
        for name in parts[0]:
            metrics[f"rewards/{name}"] = sum(part[name] for part in parts) / len(parts)
        # Mean over the step's completions: each prompt contributes g of them.
        return MicroResult(per_completion.sum() / (step_examples * g), metrics, int(mask.sum()), batch_tokens(batch))

    def validate(self, model, prompts: list[PromptExample], device) -> tuple[None, float]:
        completions = self.sample(model, prompts, device, greedy=True)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return None, sum(self.rewards.score(t, len(c), p.row) for t, c, p in zip(texts, completions, prompts))


def run(spec: JobSpec, ctx: RunContext):
    objective = GRPOObjective(spec, ctx)  # checks the rewards before anything is loaded
    if spec.data.format not in (DataFormat.auto, DataFormat.prompt, DataFormat.chat):
        raise DataError(f"method grpo trains on prompt (or chat) data, not {spec.data.format.value}", param="training_file")
    return train(spec, ctx, objective)
