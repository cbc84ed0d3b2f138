"""The compatibility check an adapter passes before the registry serves it, on the engine side.

Two halves that must agree:

- ``write_reference`` (the training side): after training, score a few fixed prompts with the trained
  model and store, per prompt position, the top-k next-token log-probabilities in
  ``reference_logits.safetensors`` next to the adapter. Top-k rather than full rows because a full row
  is the vocabulary (128k floats at 8B): three prompts' full rows would outweigh a rank-16 adapter.
- ``compare`` (the serving side): the engine attaches the adapter exactly as it would to serve it, scores
  the same token ids and compares the log-probabilities at the stored indices within a tolerance.

Plus the check no loader makes by itself: an adapter must not change the vocabulary (no LoRA on the
input embeddings or the output head), since a served base shares those with every other adapter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gpu_worker.engine import adapters
from gpu_worker.engine.errors import InvalidRequest

REFERENCE_FILE = "reference_logits.safetensors"
# Short, varied prompts (prose, code, digits): enough positions to catch a mis-applied scaling or a
# transposed matrix, cheap enough to score on CPU during registration.
REFERENCE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "1, 2, 3, 5, 8, 13,",
)
TOP_K = 64
# bf16 training on GPU vs fp32 scoring on the engine: measured max |Δ log p| on the tiny model was
# ~1e-5 in fp32 vs fp32; bf16 rounding of logits around |x|≈10 is ~0.06, so 0.1 separates "same
# model, other precision" from "wrong adapter" (a mis-scaled adapter moves log p by whole units).
DEFAULT_ATOL = 0.1


@dataclasses.dataclass(frozen=True)
class LogitReport:
    status: str  # "match" | "mismatch" | "no_reference"
    prompts: int = 0
    max_abs_diff: float | None = None
    top1_agreement: float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_VOCAB_LAYERS = ("lm_head", "embed_tokens", "wte", "embed_out", "word_embeddings")


def check_declared_vocabulary(folder: Path) -> None:
    """400 if the folder's config targets, or its weights contain, a vocabulary layer by name. Runs
    before ``read_adapter``, whose generic refusal of non-LoRA weights would hide the reason."""
    from safetensors import safe_open

    config = adapters.read_config(folder)
    targets = config.get("target_modules") or ()
    targets = [targets] if isinstance(targets, str) else list(targets)
    keys: list[str] = []
    weights = folder / adapters.WEIGHTS_FILE
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                keys = list(f.keys())
        except Exception:
            keys = []  # read_adapter reports the broken file
    for name in [*targets, *(config.get("modules_to_save") or ()), *keys]:
        hit = next((layer for layer in _VOCAB_LAYERS if isinstance(name, str) and layer in name.split(".")), None)
        if hit:
            raise InvalidRequest(
                f"adapter trains the vocabulary layer {hit!r} ({name!r}): adapters on embeddings or the output head "
                "cannot share a served base",
                param="lora_path",
                code="vocabulary_change",
            )


def check_vocabulary(files: adapters.AdapterFiles, model: torch.nn.Module) -> None:
    """400 if the adapter trains the input embeddings or the output head (a vocabulary change)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    frozen = {id(base.get_input_embeddings())}
    if base.get_output_embeddings() is not None:
        frozen.add(id(base.get_output_embeddings()))
    modules = dict(base.named_modules())
    for key in files.weights:
        module_name = adapters.weight_module(key)
        module = modules.get(module_name)
        layer = getattr(module, "base_layer", module)
        if layer is not None and id(layer) in frozen:
            raise InvalidRequest(
                f"adapter weight {key!r} changes the vocabulary layer {module_name!r}: adapters on embeddings or the "
                "output head cannot share a served base",
                param="lora_path",
                code="vocabulary_change",
            )


def reference_token_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in REFERENCE_PROMPTS]


@torch.inference_mode()
def log_probs(model: torch.nn.Module, ids: list[int], **kwargs) -> torch.Tensor:
    """[len(ids), vocab] next-token log-probabilities in fp32 for one prompt."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), **kwargs)
    return torch.log_softmax(out.logits[0].float(), dim=-1).cpu()


def write_reference(model: torch.nn.Module, tokenizer, folder: str | Path, *, top_k: int = TOP_K) -> Path:
    """Write ``reference_logits.safetensors`` into the adapter ``folder`` from the trained ``model``
    (a PeftModel with its adapter active). Call it after ``save_pretrained``."""
    tensors: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        for i, ids in enumerate(reference_token_ids(tokenizer)):
            logp = log_probs(model, ids)
            values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            tensors[f"ids_{i}"] = torch.tensor(ids, dtype=torch.int64)
            tensors[f"top_ids_{i}"] = indices.to(torch.int64).contiguous()
            tensors[f"top_logprobs_{i}"] = values.contiguous()
    finally:
        model.train(was_training)
    path = Path(folder) / REFERENCE_FILE
    save_file(tensors, str(path))
    return path


def read_reference(folder: Path) -> list[tuple[list[int], torch.Tensor, torch.Tensor]] | None:
    """[(ids, top_ids [L,k], top_logprobs [L,k])] or None when the folder has no reference."""
    path = folder / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception as err:  # a corrupt reference is the adapter's problem, reported as such
        raise InvalidRequest(f"{REFERENCE_FILE} is not a valid safetensors file: {err}", param="lora_path") from None
    out = []
    i = 0
    while f"ids_{i}" in tensors:
        ids, top_ids, top_lp = tensors[f"ids_{i}"], tensors.get(f"top_ids_{i}"), tensors.get(f"top_logprobs_{i}")
        if top_ids is None or top_lp is None or top_ids.shape != top_lp.shape or top_ids.shape[0] != ids.shape[0]:
            raise InvalidRequest(f"{REFERENCE_FILE}: prompt {i} has inconsistent tensors", param="lora_path")
        out.append((ids.tolist(), top_ids, top_lp))
        i += 1
    if not out:
        raise InvalidRequest(f"{REFERENCE_FILE} holds no prompts", param="lora_path")
    return out


def compare(reference, scored: list[torch.Tensor], *, atol: float = DEFAULT_ATOL) -> LogitReport:
    """Compare the engine's log-probabilities (one [L, vocab] per reference prompt) with the reference."""
    if reference is None:
        return LogitReport(status="no_reference")
    worst, agree, positions = 0.0, 0, 0
    for (ids, top_ids, top_lp), logp in zip(reference, scored, strict=True):
        if top_ids.max().item() >= logp.shape[-1]:
            raise InvalidRequest(f"{REFERENCE_FILE} names token ids outside the base vocabulary", param="lora_path", code="vocabulary_change")
        got = logp.gather(-1, top_ids)
        worst = max(worst, (got - top_lp).abs().max().item())
        agree += (logp.argmax(-1) == top_ids[:, 0]).sum().item()
        positions += len(ids)
    return LogitReport(
        status="match" if worst <= atol else "mismatch",
        prompts=len(reference),
        max_abs_diff=worst,
        top1_agreement=agree / positions,
    )
