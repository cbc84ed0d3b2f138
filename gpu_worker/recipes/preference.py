"""Pairwise preference recipes: DPO, IPO, ORPO and SimPO on (prompt, chosen, rejected) pairs.

The recipe is ``preference_loop.train`` with ``PairObjective``: each micro-batch of pairs is one
forward pass over its chosen and rejected completions stacked (2B rows), summed completion log-probs
per row, and for DPO and IPO the same under the reference model (the adapter disabled); the loss is
the method's formula in ``losses.py``:

    dpo    sigmoid loss on summed log-ratios          (beta)
    ipo    squared loss on length-averaged log-ratios (beta)
    orpo   chosen NLL + beta * odds-ratio loss, reference-free (beta is the paper's lambda)
    simpo  length-averaged log-probs with target margin gamma, reference-free (beta, simpo_gamma)

Logged per step: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (the share of
pairs whose chosen reward beats the rejected one) and, for ORPO, the chosen NLL.
"""

from __future__ import annotations

import torch

from gpu_worker.contract import DataFormat, JobSpec, Method, PREFERENCE_METHODS
from gpu_worker.data import DataError
from gpu_worker.data_preference import Loaded, PreferencePair, load_examples
from gpu_worker.recipes.completion_batches import batch_tokens, collate_completions
from gpu_worker.recipes import RunContext
from gpu_worker.recipes import losses
from gpu_worker.recipes.preference_loop import MicroResult, reference, sequence_logps, train


def check_format(spec: JobSpec, wanted: DataFormat) -> None:
    """The declared data format must be ``auto`` or the one ``spec.method`` trains on."""
    if spec.data.format not in (DataFormat.auto, wanted):
        raise DataError(f"method {spec.method.value} trains on {wanted.value} data, not {spec.data.format.value}", param="training_file")


class PairObjective:
    def __init__(self, spec: JobSpec):
        if spec.method not in PREFERENCE_METHODS:
            raise ValueError(f"{spec.method.value} is not a pairwise preference method")
        self.method = spec.method
        self.name = spec.method.value
        self.params = spec.method_params
        self.max_seq_length = spec.hyperparameters.max_seq_length
        self.pack_width = self.max_seq_length if spec.data.packing else None
        self.pad = 0  # the tokenizer's, once ``load`` has seen it
        self.uses_reference = spec.method in (Method.dpo, Method.ipo)
        self.chat_template = spec.data.chat_template

    def load(self, store, tokenizer, key: str, param: str) -> Loaded:
        self.pad = tokenizer.pad_token_id
        return load_examples(store, key, tokenizer, DataFormat.preference, max_seq_length=self.max_seq_length, param=param, chat_template=self.chat_template)

    def pair_loss(self, model, pairs: list[PreferencePair], device) -> tuple[losses.PairLoss, torch.Tensor, int, int]:
        """Per-pair losses and rewards; also the chosen NLL, trained and seen token counts."""
        batch = collate_completions([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad, device, pack_width=self.pack_width)
        n = len(pairs)
        logps, counts = sequence_logps(model, batch)
        avg = logps / counts.clamp(min=1)
        beta = self.params.beta
        if self.uses_reference:
            with reference(model):
                ref_logps, _ = sequence_logps(model, batch)
            ref_avg = ref_logps / counts.clamp(min=1)
        if self.method == Method.dpo:
            out = losses.dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta)
        elif self.method == Method.ipo:
            out = losses.ipo_loss(avg[:n], avg[n:], ref_avg[:n], ref_avg[n:], beta)
        elif self.method == Method.orpo:
            out = losses.orpo_loss(avg[:n], avg[n:], -avg[:n], beta)
        else:
            out = losses.simpo_loss(avg[:n], avg[n:], beta, self.params.simpo_gamma)
        return out, -avg[:n].detach(), int(counts.sum()), batch_tokens(batch)

    def micro_step(self, model, pairs: list[PreferencePair], step_examples: int, device) -> MicroResult:
        out, chosen_nll, trained, seen = self.pair_loss(model, pairs, device)
        metrics = out.metrics()
        if self.method == Method.orpo:
            metrics["nll/chosen"] = chosen_nll.mean().item()
        return MicroResult(out.losses.sum() / step_examples, metrics, trained, seen)

    def validate(self, model, pairs: list[PreferencePair], device) -> tuple[float, None]:
        return self.pair_loss(model, pairs, device)[0].losses.sum().item(), None


def run(spec: JobSpec, ctx: RunContext):
    check_format(spec, DataFormat.preference)
    return train(spec, ctx, PairObjective(spec))
