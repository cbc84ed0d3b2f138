"""KTO on unpaired (prompt, completion, desirable?) rows: ``preference_loop.train`` with ``KTOObjective``.

Each micro-batch runs the policy on its rows and the reference model (the adapter disabled) on the
same rows and on mismatched rows: completion ``i + 1`` under prompt ``i`` (cyclically), the pairs the
KTO paper and TRL estimate KL(policy || reference) from. Their mean log-ratio, clamped at zero and
without gradient, is the reference point z0 of ``losses.kto_loss``; the mismatched policy pass runs
without gradient too, since z0 carries none. A micro-batch of one row has no mismatched pair: its
z0 comes from the row itself (documented bias; use a batch size of 2 or more).

``method_params``: beta, kto_desirable_weight, kto_undesirable_weight (the paper suggests weights
making ``w_D * n_desirable / (w_U * n_undesirable)`` between 1 and 4/3; the recipe logs the ratio).
Logged per step: kl (z0), rewards/desirable, rewards/undesirable (mean beta * log-ratio of each kind,
0 when a step had none of that kind).
"""

from __future__ import annotations

import torch

from gpu_worker.contract import DataFormat, JobSpec, LogEvent
from gpu_worker.data_preference import KTOExample, Loaded, load_examples
from gpu_worker.recipes.completion_batches import batch_tokens, collate_completions
from gpu_worker.recipes import RunContext, losses
from gpu_worker.recipes.preference import check_format
from gpu_worker.recipes.preference_loop import MicroResult, reference, sequence_logps, train


class KTOObjective:
    name = "kto"
    uses_reference = True

    def __init__(self, spec: JobSpec, ctx: RunContext | None = None):
        self.params = spec.method_params
        self.max_seq_length = spec.hyperparameters.max_seq_length
        self.pack_width = self.max_seq_length if spec.data.packing else None
        self.pad = 0
        self.chat_template = spec.data.chat_template
        self._ctx = ctx

    def load(self, store, tokenizer, key: str, param: str) -> Loaded:
        self.pad = tokenizer.pad_token_id
        data = load_examples(store, key, tokenizer, DataFormat.kto, max_seq_length=self.max_seq_length, param=param, chat_template=self.chat_template)
        if param == "training_file" and self._ctx is not None:
            n_good = sum(e.desirable for e in data.examples)
            n_bad = len(data.examples) - n_good
            ratio = (self.params.kto_desirable_weight * n_good) / (self.params.kto_undesirable_weight * n_bad) if n_bad else float("inf")
            self._ctx.emit(LogEvent(message=f"KTO data: {n_good} desirable, {n_bad} undesirable; weighted ratio {ratio:.2f} (the paper recommends 1 to 1.33)"))
        return data

    def example_losses(self, model, rows: list[KTOExample], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """Per-row losses and rewards, z0, trained and seen token counts."""
        prompts = [r.prompt for r in rows]
        batch = collate_completions(prompts, [r.completion for r in rows], self.pad, device, pack_width=self.pack_width)
        shifted = [rows[(i + 1) % len(rows)].completion for i in range(len(rows))]
        # A prompt and another row's completion may together exceed a packed row: the width is the
        # longest such pair then (they were never cut to fit together).
        width = None if self.pack_width is None else max(self.pack_width, max(len(p) + len(c) for p, c in zip(prompts, shifted)))
        mismatched = collate_completions(prompts, shifted, self.pad, device, pack_width=width)
        logps, counts = sequence_logps(model, batch)
        with torch.no_grad():
            policy_kl, _ = sequence_logps(model, mismatched)
        with reference(model):
            ref_logps, _ = sequence_logps(model, batch)
            ref_kl, _ = sequence_logps(model, mismatched)
        z0 = losses.kto_reference_point(policy_kl, ref_kl)
        desirable = torch.tensor([r.desirable for r in rows], device=logps.device)
        p = self.params
        row_losses, rewards = losses.kto_loss(logps, ref_logps, desirable, z0, p.beta, p.kto_desirable_weight, p.kto_undesirable_weight)
        return row_losses, rewards, z0, int(counts.sum()), batch_tokens(batch)

    def micro_step(self, model, rows: list[KTOExample], step_examples: int, device) -> MicroResult:
        row_losses, rewards, z0, trained, seen = self.example_losses(model, rows, device)
        good = torch.tensor([r.desirable for r in rows], device=rewards.device)
        metrics = {
            "kl": z0.item(),
            "rewards/desirable": rewards[good].mean().item() if good.any() else 0.0,
            "rewards/undesirable": rewards[~good].mean().item() if (~good).any() else 0.0,
        }
        return MicroResult(row_losses.sum() / step_examples, metrics, trained, seen)

    def validate(self, model, rows: list[KTOExample], device) -> tuple[float, None]:
        return self.example_losses(model, rows, device)[0].sum().item(), None


def run(spec: JobSpec, ctx: RunContext):
    check_format(spec, DataFormat.kto)
    return train(spec, ctx, KTOObjective(spec, ctx))
