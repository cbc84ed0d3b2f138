"""Preparing a loaded base model for adapter training: the LoRA wrapper, then kernels and memory mode.

Shared by recipes: each recipe loads a base model, calls ``wrap_with_lora`` and then
``apply_memory_mode_and_kernels``, which hands the PEFT model to ``gpu_worker.patching`` (Triton
kernels, activation checkpointing/offload). If the patching package is missing or refuses the model,
training goes on with stock PyTorch/PEFT modules and the returned log lines say so; the memory mode
then falls back to transformers' gradient checkpointing, the closest stock equivalent.
"""

from __future__ import annotations

from gpu_worker.contract import AdapterConfig, MemoryMode, Runtime


class AdapterConfigError(ValueError):
    """The adapter configuration cannot be applied to this base model."""


def wrap_with_lora(model, adapter: AdapterConfig):
    """Freeze ``model`` and attach a fresh LoRA adapter to the requested projections. Target names are
    Llama's; those the model lacks are skipped, and none present at all is an error."""
    from peft import LoraConfig, get_peft_model

    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t.value for t in adapter.target_modules if t.value in leaf_names]
    if not targets:
        wanted = ", ".join(t.value for t in adapter.target_modules)
        raise AdapterConfigError(f"none of the adapter target modules ({wanted}) exist in {type(model).__name__}")
    config = LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def apply_memory_mode_and_kernels(model, runtime: Runtime) -> list[tuple[str, str]]:
    """Patch ``model`` in place as ``runtime`` asks; returns ``(message, level)`` lines to log."""
    try:
        from gpu_worker.patching import patch_model
    except ImportError as err:
        return [(f"Training kernels unavailable ({err}); training on the stock PyTorch path", "warn"), *_stock_memory_mode(model, runtime.memory_mode)]
    try:
        report = patch_model(model, enabled=runtime.use_kernels, memory_mode=runtime.memory_mode.value)
    except Exception as err:  # a patcher bug must not kill the job: the stock path is always correct
        return [(f"Training kernels failed to apply ({type(err).__name__}: {err}); training on the stock PyTorch path", "warn"), *_stock_memory_mode(model, runtime.memory_mode)]
    reason = getattr(report, "reason", None)
    if reason:
        return [(f"Training on the stock path: {reason} (memory mode {runtime.memory_mode.value})", "info")]
    patched = ", ".join(getattr(report, "patched", ()) or ()) or "all supported ops"
    return [(f"Training kernels applied: {patched} (memory mode {runtime.memory_mode.value})", "info")]


def _stock_memory_mode(model, mode: MemoryMode) -> list[tuple[str, str]]:
    if mode == MemoryMode.off:
        return []
    # Non-reentrant checkpointing works with a frozen base model without forcing input gradients.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == MemoryMode.offload:
        return [("Activation offload needs the training kernels; using gradient checkpointing instead", "warn")]
    return [("Gradient checkpointing enabled (stock transformers)", "info")]
