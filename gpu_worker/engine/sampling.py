"""Sampling parameters of one request and the choice of its next token from a row of logits.

Each request draws from its own ``torch.Generator`` (seeded from the request's ``seed`` when given), so
its samples do not depend on which other requests share its batch. Temperature 0 is greedy.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def make_generator(self) -> torch.Generator:
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()  # fresh entropy from the OS
        else:
            generator.manual_seed(self.seed)
        return generator


def apply_penalties(logits: torch.Tensor, output_ids: list[int], params: SamplingParams) -> torch.Tensor:
    """OpenAI's presence/frequency penalties over the tokens generated so far (not the prompt)."""
    if not output_ids or (params.presence_penalty == 0 and params.frequency_penalty == 0):
        return logits
    ids, counts = torch.tensor(output_ids, device=logits.device).unique(return_counts=True)
    penalty = params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    logits = logits.clone()
    logits[ids] -= penalty
    return logits


def sample(logits: torch.Tensor, output_ids: list[int], params: SamplingParams, generator: torch.Generator) -> int:
    """The next token for one sequence. ``logits``: [vocab], any float dtype, any device."""
    logits = apply_penalties(logits.float(), output_ids, params)
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1).cpu()
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is
        # still short of top_p (so the most likely token always stays).
        keep = (sorted_probs.cumsum(0) - sorted_probs) < params.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, seqs) -> list[int]:
    """The next token of every row. ``logits``: [rows, vocab]; ``seqs``: per row, anything with
    ``params``, ``output_ids`` and ``generator``. Plain greedy rows share one argmax, so a batch of
    them costs one device-to-host copy instead of one per row."""
    tokens: list[int | None] = [None] * len(seqs)
    plain = [i for i, seq in enumerate(seqs) if seq.params.greedy and not seq.params.penalised]
    if plain:
        rows = logits.index_select(0, torch.tensor(plain, device=logits.device))
        for i, token in zip(plain, rows.argmax(dim=-1).tolist()):
            tokens[i] = token
    for i, seq in enumerate(seqs):
        if tokens[i] is None:
            tokens[i] = sample(logits[i], seq.output_ids, seq.params, seq.generator)
    return tokens
