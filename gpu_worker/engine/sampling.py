"""Sampling parameters of one request and the choice of its next token from a row of logits.

Each request draws from its own ``torch.Generator`` (seeded from the request's ``seed`` when given), so
its samples do not depend on which other requests share its batch. Temperatures below
``GREEDY_BELOW`` (0 included) are greedy.

Every valid OpenAI parameter value gives a valid distribution: the arithmetic is float32 on logits
shifted to a maximum of 0 (so dividing by the temperature cannot overflow), and top_p always keeps
the most likely token. A row whose logits have no usable value (NaN, or all -inf: a broken model, not
a request) raises ``SamplingFailed``; ``sample_rows`` hands that back for the row alone, so the loop
fails one request and not the batch it shares a step with.
"""

from __future__ import annotations

import dataclasses

import torch

# Below this temperature a row is sampled greedily; vLLM uses the same bound (``_SAMPLING_EPS``). At
# 1e-5 the top token already takes all the mass unless another logit is within ~1e-3 of it (a ratio
# of e^-100), so nothing is lost; and tinier temperatures break float32 arithmetic (1e-300 is 0 in
# float32: the top logit becomes 0 / 0 = NaN, which torch.multinomial refuses).
GREEDY_BELOW = 1e-5

_FLOAT32_MAX = torch.finfo(torch.float32).max


class SamplingFailed(Exception):
    """One row's logits admit no distribution to sample from."""


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
        if not self.temperature >= 0:  # NaN fails this too
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

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
    if bool(logits.isnan().any() | (logits.max() == -torch.inf)):  # one device sync, not two
        raise SamplingFailed("the model's logits for this request are NaN or all -inf")
    if params.greedy:
        return int(logits.argmax())
    # Shifted so the top logit is 0 before dividing: every value is then in [-inf, 0] whatever the
    # temperature, so nothing overflows to +inf (whose softmax is NaN) and the ordering of huge logits
    # survives. +inf (a half-precision overflow) is clamped first, as inf - inf would be NaN.
    logits = logits.clamp(max=_FLOAT32_MAX)
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1).cpu()
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is
        # still short of top_p. The first token is kept explicitly: a top_p below float32's smallest
        # value (1e-300) rounds to 0 in the comparison and would otherwise keep nothing.
        keep = (sorted_probs.cumsum(0) - sorted_probs) < params.top_p
        keep[0] = True
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, seqs) -> list[int | Exception]:
    """The next token of every row, or the exception that sampling that row raised (the caller fails
    that request alone). ``logits``: [rows, vocab]; ``seqs``: per row, anything with ``params``,
    ``output_ids`` and ``generator``. Plain greedy rows share one argmax, so a batch of them costs one
    device-to-host copy instead of one per row."""
    tokens: list[int | Exception | None] = [None] * len(seqs)
    plain = [i for i, seq in enumerate(seqs) if seq.params.greedy and not seq.params.penalised]
    if plain:
        rows = logits.index_select(0, torch.tensor(plain, device=logits.device))
        # A NaN row's argmax is an arbitrary token: flag it in the same copy, and sample() refuses it.
        usable = ~rows.isnan().any(dim=-1) & (rows.amax(dim=-1) > -torch.inf)
        best = torch.stack([rows.argmax(dim=-1), usable.long()]).tolist()
        for i, token, ok in zip(plain, *best):
            tokens[i] = token if ok else None
    for i, seq in enumerate(seqs):
        if tokens[i] is None:
            try:
                tokens[i] = sample(logits[i], seq.output_ids, seq.params, seq.generator)
            except Exception as err:  # this row's own sampling: its failure is not the batch's
                tokens[i] = err
    return tokens
