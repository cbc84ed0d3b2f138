"""The engine half of an adapter's compatibility check on vLLM, which has no check route of its own.

The training side stored, for a few fixed prompts, the trained model's top-k next-token
log-probabilities (``gpu_worker.engine.compat.write_reference``: ``reference_logits.safetensors`` next to
the adapter). Here a vLLM replica of the base scores the same token ids with the adapter attached,
through its OpenAI completions API: the adapter is named as the model (so vLLM's resolver plugin loads it
from object storage exactly as for a client's request) and ``prompt_logprobs`` asks for the top-k
log-probabilities at every prompt position. The prompt is the reference ids plus one more token, so
that position ``t + 1`` of vLLM's answer is the distribution after ``ids[:t + 1]``: reference row ``t``.

Compared: every token vLLM returns at a position that the reference also holds (the reference keeps 64,
vLLM returns at most ``--max-logprobs``, 20 by default), within ``atol``; and how often the two agree
on the most likely token. No torch and no safetensors package: the gateway installs without them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gpu_worker.storage import ObjectNotFound, ObjectStore

if TYPE_CHECKING:
    from serving.engines import EnginePool

REFERENCE_FILE = "reference_logits.safetensors"  # gpu_worker.engine.compat.REFERENCE_FILE
VLLM_MAX_LOGPROBS = 20  # vLLM's default --max-logprobs: the most prompt_logprobs it returns per position
DEFAULT_ATOL = 0.1  # as gpu_worker.engine.compat.DEFAULT_ATOL: bf16 serving vs the training side
_DTYPES = {"I64": np.int64, "F32": np.float32, "F16": np.float16}


@dataclass(frozen=True)
class ReferencePrompt:
    ids: list[int]
    top_ids: np.ndarray  # [L, k] int64, row t: the most likely tokens after ids[:t + 1]
    top_logprobs: np.ndarray  # [L, k]


class BadReference(ValueError):
    """The adapter's reference file is unreadable or inconsistent (the adapter's fault)."""


class UnusableAnswer(ValueError):
    """The engine's scoring answer cannot be read as prompt_logprobs of the prompt it was sent: the
    engine's problem (or its configuration's), which says nothing about the adapter."""


def parse_reference(data: bytes) -> list[ReferencePrompt]:
    """The prompts of a ``reference_logits.safetensors`` file (safetensors: u64 header length, JSON
    header, raw little-endian tensors)."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        body = memoryview(data)[8 + length :]
        tensors = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES[meta["dtype"]]
            start, end = meta["data_offsets"]
            tensors[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(meta["shape"])
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise BadReference(f"{REFERENCE_FILE} is not a readable safetensors file of int64/float tensors: {err!r}") from None
    prompts = []
    while f"ids_{len(prompts)}" in tensors:
        i = len(prompts)
        ids, top_ids, top_lp = tensors[f"ids_{i}"], tensors.get(f"top_ids_{i}"), tensors.get(f"top_logprobs_{i}")
        if top_ids is None or top_lp is None or top_ids.shape != top_lp.shape or top_ids.ndim != 2 or top_ids.shape[0] != ids.shape[0]:
            raise BadReference(f"{REFERENCE_FILE}: prompt {i} has inconsistent tensors")
        prompts.append(ReferencePrompt([int(t) for t in ids], top_ids.astype(np.int64), top_lp.astype(np.float32)))
    if not prompts:
        raise BadReference(f"{REFERENCE_FILE} holds no prompts")
    return prompts


def read_reference(store: ObjectStore, adapter_key: str) -> list[ReferencePrompt] | None:
    try:
        data = store.get_bytes(f"{adapter_key.rstrip('/')}/{REFERENCE_FILE}")
    except ObjectNotFound:
        return None
    return parse_reference(data)


def scoring_request(model: str, prompt: ReferencePrompt, k: int) -> dict[str, Any]:
    """The completions request that makes vLLM score ``prompt`` (one extra token so that the last
    reference row is scored too; its identity does not matter)."""
    return {
        "model": model,
        "prompt": prompt.ids + [int(prompt.top_ids[-1, 0])],
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": k,
    }


def compare(prompts: list[ReferencePrompt], answers: list[dict[str, Any]], *, atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Compare vLLM's ``prompt_logprobs`` answers (one completions response per prompt) with the
    reference. Returns the report the registry stores (the shape of ``LogitReport.as_dict``)."""
    worst, agree, positions, compared = 0.0, 0, 0, 0
    for prompt, answer in zip(prompts, answers, strict=True):
        rows = _prompt_logprobs(answer)
        if len(rows) != len(prompt.ids) + 1:
            raise UnusableAnswer(f"the engine scored {len(rows)} positions for a prompt of {len(prompt.ids) + 1} tokens")
        for t in range(len(prompt.ids)):
            got = rows[t + 1]  # the distribution after ids[:t + 1]
            if not got:
                raise UnusableAnswer(f"the engine returned no log-probabilities at position {t + 1}")
            reference = dict(zip(prompt.top_ids[t].tolist(), prompt.top_logprobs[t].tolist()))
            for token, logprob in got.items():
                if token in reference:
                    worst = max(worst, abs(logprob - reference[token]))
                    compared += 1
            best = max(got, key=got.get)
            agree += int(best == int(prompt.top_ids[t, 0]))
            positions += 1
    if compared == 0:
        raise BadReference("the engine's most likely tokens and the reference's share none")
    return {
        "status": "match" if worst <= atol else "mismatch",
        "prompts": len(prompts),
        "max_abs_diff": worst,
        "top1_agreement": agree / positions,
        "compared_logprobs": compared,
    }


def _prompt_logprobs(answer: dict[str, Any]) -> list[dict[int, float]]:
    """vLLM's ``choices[0].prompt_logprobs``: per prompt position None (the first) or a mapping of token id
    (a JSON string key) to ``{"logprob": x, "rank": r, ...}``."""
    try:
        rows = answer["choices"][0]["prompt_logprobs"]
        return [{} if row is None else {int(token): float(v["logprob"]) for token, v in row.items()} for row in rows]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise UnusableAnswer(f"the engine's answer has no usable prompt_logprobs: {err!r}") from None


async def check_on_vllm(engines: EnginePool, base: str, adapter_id: str, prompts: list[ReferencePrompt], *, atol: float = DEFAULT_ATOL) -> tuple[int, dict[str, Any]]:
    """(status, body): 200 with the logit report, or the engine's error status with its body (the
    registry tells a refusal of the adapter, 400/422, from the engine's own trouble: 404 when the
    resolver found or loaded nothing, 5xx)."""
    k = min(VLLM_MAX_LOGPROBS, prompts[0].top_ids.shape[1])
    answers = []
    for prompt in prompts:
        status, body = await engines.post_json(base, "/v1/completions", scoring_request(adapter_id, prompt, k), what="check the adapter", adapter_id=adapter_id)
        if status != 200:
            return status, body
        answers.append(body)
    return 200, {"engine": "vllm", "logits": compare(prompts, answers, atol=atol)}
