"""Loading base models: one path for built-in models, local folders and Hugging Face hub ids.

The trainer and the inference engine both load their base model here, so they agree on the weights,
the dtype and the chat template. A name is resolved in this order: a built-in model (created locally on
first use, see ``builtin.py``), an existing local folder, else a Hugging Face hub id handed to the same
``from_pretrained`` call (which needs network access or a warm hub cache). Any failure becomes a
``ModelLoadError`` naming the model, which the trainer reports as ``model_load_failed``.

A tokenizer without a chat template gets ChatML, so every model can be fine-tuned on chat data; it
also gets a padding token (its end-of-sequence token) if it has none.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gpu_worker.builtin import CHATML_TEMPLATE, ensure_builtin, is_builtin
from gpu_worker.contract import DType

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """The base model could not be loaded; the message names it and says why."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"could not load base model {name!r}: {reason}")
        self.name = name
        self.reason = reason


def resolve_model_path(name: str, data_dir: str | os.PathLike) -> str:
    """Where ``from_pretrained`` should look for ``name``: a built-in model's folder (created if
    needed), an existing local folder, or the name itself as a hub id."""
    if not name or not name.strip():
        raise ModelLoadError(name, "empty model name")
    if is_builtin(name):
        return str(ensure_builtin(name, data_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.is_absolute() or name.startswith((".", "~")):
        raise ModelLoadError(name, "no such local folder")
    return name


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: DType, device: str):
    """``auto`` is bf16 on a GPU that supports it, else float32 (CPU half precision is slow and
    lossy, so it is used only when asked for explicitly)."""
    import torch

    if dtype == DType.auto:
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16, DType.float16: torch.float16}[dtype]


def load_tokenizer(name: str, *, data_dir: str | os.PathLike):
    """The tokenizer of ``name``, with a chat template and a padding token guaranteed."""
    path = resolve_model_path(name, data_dir)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # OSError, ValueError, hub errors: all mean "cannot load this model"
        raise ModelLoadError(name, _reason(err)) from err
    return ensure_chat_ready(tokenizer)


def ensure_chat_ready(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        log.info("tokenizer has no chat template; using ChatML")
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(getattr(tokenizer, "name_or_path", "?"), "tokenizer has neither pad nor eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, data_dir: str | os.PathLike, device: str | None = None, dtype: DType = DType.auto):
    """Load the weights of ``name`` on ``device`` (default: CUDA if available, else CPU) in ``dtype``
    (default: bf16 on a capable GPU, else float32). Raises ``ModelLoadError``."""
    path = resolve_model_path(name, data_dir)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        model.to(device)
    except Exception as err:
        raise ModelLoadError(name, _reason(err)) from err
    return model


def load_base_model(name: str, *, data_dir: str | os.PathLike, device: str | None = None, dtype: DType = DType.auto):
    """Load ``(model, tokenizer)`` for ``name``; see ``load_model`` for device and dtype."""
    tokenizer = load_tokenizer(name, data_dir=data_dir)
    model = load_model(name, data_dir=data_dir, device=device, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
