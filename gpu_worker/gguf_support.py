"""Which base models GGUF export supports, decided from a model's config alone, without torch.

``gpu_worker.export.write_gguf`` writes the Llama architecture only: ``model_type`` ``llama`` without
attention or MLP biases, with plain or Llama-3.1 RoPE scaling (its tokenizer must also be byte-level
BPE, which only the tokenizer's files tell). The API reads this rule to refuse ``export.gguf`` at job
creation for a base whose architecture is known not to be supported, and ``write_gguf`` refuses a
loaded model by it (with its ``config.to_dict()``), so the two cannot disagree.
Standard library only: the control plane imports it.
"""

from __future__ import annotations

from typing import Any, Mapping

GGUF_ARCHITECTURES = frozenset({"llama"})
GGUF_ROPE_TYPES = frozenset({"default", "llama3"})


def gguf_problem(config: Mapping[str, Any]) -> str | None:
    """Why a model with this ``config.json`` (or the part of it that is known) cannot be exported to
    GGUF, or None when nothing known rules it out."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        return f"GGUF export supports the Llama architecture; this model is {model_type!r}"
    biased = [name for name in ("attention_bias", "mlp_bias") if config.get(name)]
    if biased:
        return f"GGUF export supports the Llama architecture without biases; this model has {' and '.join(biased)}"
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in GGUF_ROPE_TYPES:
        return f"RoPE scaling {kind!r} is not exported to GGUF yet"
    return None
