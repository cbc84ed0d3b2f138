"""Preparing a base model for training: loading (plain or 4-bit NF4), the adapter (LoRA, rsLoRA, DoRA,
or none for full fine-tuning), then kernels and memory mode, and saving/restoring the trained weights.

Shared by recipes: each recipe calls ``check_device_support`` before anything heavy, then
``load_for_training`` (which wraps the model as ``spec.adapter`` asks) and
``apply_memory_mode_and_kernels``, which hands the model to ``gpu_worker.patching`` (Triton kernels,
activation checkpointing/offload). If the patching package is missing or refuses the model, training
goes on with stock PyTorch/PEFT modules and the returned log lines say so; the memory mode then falls
back to transformers' gradient checkpointing, the closest stock equivalent.

QLoRA (``quantization=nf4``) needs bitsandbytes on a CUDA GPU. Without one the job fails with
``UnsupportedOnDevice`` (FailedEvent code ``unsupported_on_device``): it never silently trains a
16-bit LoRA instead, which would cost a different amount of memory and give a different model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gpu_worker.contract import AdapterConfig, AdapterType, JobSpec, MemoryMode, Quantization, Runtime


class AdapterConfigError(ValueError):
    """The adapter configuration cannot be applied to this base model."""


class UnsupportedOnDevice(RuntimeError):
    """The job asks for something this worker's hardware cannot do (e.g. NF4 without CUDA).
    ``failure_code``/``param`` say how the trainer reports it."""

    failure_code = "unsupported_on_device"

    def __init__(self, message: str, *, param: str):
        super().__init__(message)
        self.param = param


def check_device_support(spec: JobSpec, device: str | None) -> None:
    """Fail before loading anything if ``spec`` cannot run on ``device`` (None: CUDA if present)."""
    if spec.quantization != Quantization.nf4:
        return
    import torch

    if device is not None and not device.startswith("cuda"):
        raise UnsupportedOnDevice(f"quantization=nf4 (QLoRA) needs a CUDA GPU; this trainer runs on {device!r}", param="quantization")
    if not torch.cuda.is_available():
        raise UnsupportedOnDevice("quantization=nf4 (QLoRA) needs a CUDA GPU with bitsandbytes; this worker has no CUDA device", param="quantization")
    if spec.adapter.type == AdapterType.full:
        raise UnsupportedOnDevice("quantization=nf4 trains an adapter over a frozen 4-bit base; full fine-tuning of 4-bit weights is not possible", param="adapter.type")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise UnsupportedOnDevice(f"quantization=nf4 needs bitsandbytes, which this worker lacks ({err})", param="quantization") from err


def load_for_training(spec: JobSpec, *, data_dir, device: str | None):
    """The base model of ``spec`` on ``device``, quantized if asked, wrapped for ``spec.adapter``."""
    from gpu_worker.loading import load_model

    if spec.quantization == Quantization.nf4:
        model = load_nf4_model(spec.base_model, data_dir=data_dir, device=device or "cuda")
    else:
        model = load_model(spec.base_model, data_dir=data_dir, device=device, dtype=spec.runtime.dtype)
    return wrap_for_training(model, spec.adapter)


def load_nf4_model(name: str, *, data_dir, device: str = "cuda"):
    """QLoRA's base: 4-bit NormalFloat weights with double quantization (the quantization constants
    are themselves quantized, ~0.4 bit/param saved) and bf16 compute. GPU only.

    Everything that is not quantized (embeddings, norms, head) stays bf16: the same layout as the
    kernel benchmark's QLoRA rows (bench/train_step.py) and Unsloth's. peft's
    ``prepare_model_for_kbit_training`` would upcast those to float32 (the head alone is 2 GB for a
    128k vocabulary) and mix dtypes under the fused kernels."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from gpu_worker.loading import ModelLoadError, _reason, resolve_model_path

    path = resolve_model_path(name, data_dir)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    index = torch.device(device).index
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, dtype=torch.bfloat16, device_map={"": index if index is not None else torch.cuda.current_device()}
        )
    except Exception as err:
        raise ModelLoadError(name, _reason(err)) from err
    return model


def wrap_for_training(model, adapter: AdapterConfig):
    """Full fine-tuning: every weight trains, the model is returned as is. Otherwise freeze ``model``
    and attach a fresh LoRA adapter (DoRA when ``type=dora``; rank-stabilised scaling
    ``alpha/sqrt(r)`` when ``use_rslora``) to the requested projections."""
    if adapter.type == AdapterType.full:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return wrap_with_lora(model, adapter)


def wrap_with_lora(model, adapter: AdapterConfig):
    """Target names are Llama's; those the model lacks are skipped, and none present at all is an error.

    In a multimodal wrapper (Gemma 3's ``model.language_model`` beside ``vision_tower`` and
    ``multi_modal_projector``) the adapters go on the language model only: the vision tower's q/k/v
    share the names but get no gradient from text, and would ship untrained in the adapter. The
    restriction is PEFT's ``exclude_modules``, so the saved ``target_modules`` stay plain names
    (what serving's compatibility check reads)."""
    from peft import LoraConfig, get_peft_model

    text_prefix = _language_model_prefix(model)
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
                  if text_prefix is None or name.startswith(text_prefix + ".")}
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
        use_dora=adapter.type == AdapterType.dora,
        use_rslora=adapter.use_rslora,
        # every module outside the language model (a full match of PEFT's module key)
        exclude_modules=None if text_prefix is None else rf"(?!{re.escape(text_prefix)}\.).*",
    )
    return get_peft_model(model, config)


def _language_model_prefix(model) -> str | None:
    """The module path of a multimodal model's text decoder (``model.language_model`` in
    transformers' vision-language wrappers), or None for a text-only model."""
    found = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "language_model"]
    return min(found, key=len) if found else None


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def trainable_parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norm weights, biases) do not: decaying a norm's gain
    towards zero fights the normalisation (the usual GPT-2/Llama recipe). LoRA factors are all
    matrices, so for adapters this is a single group."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# --- saving and restoring the trained weights --------------------------------------------------------


def save_trained(model, folder: Path, *, base_model: str, tokenizer=None) -> list[str]:
    """Write what training produced to ``folder``: the standard PEFT pair for an adapter, or the whole
    model (config + safetensors, with the tokenizer) for full fine-tuning. Returns the file names."""
    from gpu_worker.checkpoint import save_adapter

    if is_peft(model):
        return save_adapter(model, folder, base_model=base_model)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "tuneforge_base_model.json").write_text(json.dumps({"base_model": base_model}))
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def load_trained(model, folder: Path) -> None:
    """Put weights written by ``save_trained`` back into ``model`` (same architecture and adapter)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights are saved once; anything else missing means the folder is not this model's.
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise AdapterConfigError(f"saved weights in {folder} do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or ()
    return set(tied if not isinstance(tied, dict) else tied.keys())


def save_full_checkpoint(store, key: str, *, model, optimizer, rng: dict, state: dict, base_model: str) -> None:
    """``checkpoint.save_checkpoint`` for full fine-tuning: the same folder layout, marker and
    no-pickle rule, with the whole model (``model.safetensors`` + config) where an adapter would be.
    (``checkpoint.py`` saves adapters only; a weights hook there would let this fold back in.)"""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from gpu_worker import checkpoint as ckpt
    from gpu_worker.storage import delete_prefix, put_dir

    if store.exists(f"{key}/{ckpt.MARKER}"):
        store.delete(f"{key}/{ckpt.MARKER}")
    delete_prefix(store, key)
    with tempfile.TemporaryDirectory(prefix="tuneforge-ckpt-") as tmp:
        out = Path(tmp)
        save_trained(model, out, base_model=base_model)
        opt_tensors, opt_meta = ckpt._optimizer_split(optimizer.state_dict())
        save_file(opt_tensors, out / "optimizer.safetensors")
        rng_tensors = {"torch": rng["torch"], **{f"cuda.{i}": s for i, s in enumerate(rng.get("cuda", []))}}
        save_file({k: torch.as_tensor(v).contiguous() for k, v in rng_tensors.items()}, out / "rng.safetensors")
        full_state = {**state, "optimizer": opt_meta, "python_rng": ckpt._python_rng_to_json(rng["python"])}
        (out / ckpt.STATE_FILE).write_text(json.dumps(full_state, indent=1, sort_keys=True))
        put_dir(store, out, key)
    store.put_bytes(f"{key}/{ckpt.MARKER}", b"ok\n")


def load_full_checkpoint(store, key: str, *, model, optimizer) -> tuple[dict, dict]:
    """Counterpart of ``save_full_checkpoint``; returns ``(state, rng)`` like ``load_checkpoint``."""
    import tempfile

    import torch
    from safetensors.torch import load_file

    from gpu_worker import checkpoint as ckpt
    from gpu_worker.storage import get_dir

    key = key.rstrip("/")
    if not ckpt.is_complete(store, key):
        raise ckpt.CheckpointError(f"checkpoint {key!r} is missing or incomplete (no {ckpt.MARKER} marker)")
    with tempfile.TemporaryDirectory(prefix="tuneforge-ckpt-") as tmp:
        get_dir(store, key, tmp)
        out = Path(tmp)
        try:
            state = json.loads((out / ckpt.STATE_FILE).read_text())
            opt_tensors = load_file(out / "optimizer.safetensors")
            rng_tensors = load_file(out / "rng.safetensors")
            (out / "optimizer.safetensors").unlink()
            (out / "rng.safetensors").unlink()
            load_trained(model, out)
        except (OSError, ValueError, KeyError, AdapterConfigError) as err:
            raise ckpt.CheckpointError(f"checkpoint {key!r} is unreadable: {err}") from err
    optimizer.load_state_dict(ckpt._optimizer_join(opt_tensors, state.pop("optimizer")))
    cuda = [rng_tensors[k] for k in sorted((k for k in rng_tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    rng = {"python": ckpt._python_rng_from_json(state.pop("python_rng")), "torch": rng_tensors["torch"].to(torch.uint8)}
    if cuda:
        rng["cuda"] = cuda
    return state, rng


# --- kernels and memory mode -------------------------------------------------------------------------


def apply_memory_mode_and_kernels(model, runtime: Runtime) -> list[tuple[str, str]]:
    """Patch ``model`` in place as ``runtime`` asks; returns ``(message, level)`` lines to log. With
    ``runtime.fp8`` the recipe reports its validation measurements in bf16 beside FP8's
    (``fp8_against_bf16``)."""
    fp8_stock = [("fp8 needs the training kernels; this job trains in bf16", "warn")] if runtime.fp8 else []
    try:
        from gpu_worker.patching import patch_model
    except ImportError as err:
        return [(f"Training kernels unavailable ({err}); training on the stock PyTorch path", "warn"), *fp8_stock, *_stock_memory_mode(model, runtime.memory_mode)]
    try:
        report = patch_model(model, enabled=runtime.use_kernels, memory_mode=runtime.memory_mode.value,
                             cuda_graphs=runtime.cuda_graphs, fp8=runtime.fp8, attention=runtime.attention.value)
    except Exception as err:  # a patcher bug must not kill the job: the stock path is always correct
        return [(f"Training kernels failed to apply ({type(err).__name__}: {err}); training on the stock PyTorch path", "warn"), *fp8_stock, *_stock_memory_mode(model, runtime.memory_mode)]
    reason = getattr(report, "reason", None)
    if reason:
        return [(f"Training on the stock path: {reason} (memory mode {runtime.memory_mode.value})", "info"), *fp8_stock]
    counts = getattr(report, "counts", None) or {}
    patched = ", ".join(getattr(report, "patched", ()) or ()) or "all supported ops"
    graphs = counts.get("cuda_graph_layers")
    graphs = f"; the {graphs} decoder layers replay as CUDA graphs on a GPU once the batch shape repeats" if graphs else ""
    fa4, batched = counts.get("fa4_attention"), counts.get("fa4_batched_attention")
    rows = "every row" if batched == fa4 else "packed rows" + (f" (batched rows in {batched})" if batched else "")
    fa4 = f"; FlashAttention-4 computes the attention of {rows} in {fa4} layers" if fa4 else ""
    lines = [(f"Training kernels applied: {patched} (memory mode {runtime.memory_mode.value}){graphs}{fa4}", "info")]
    notes = getattr(report, "notes", ())
    if counts.get("fp8_weights"):
        copies = sum(m._tf_fp8.qweight.numel() for m in model.modules() if getattr(m, "_tf_fp8", None) is not None) / 1e9
        host = counts.get("fp8_host_bytes", 0) / 1e9
        where = f"the bf16 weights ({host:.3g} GB) wait in host memory" if host else "beside the bf16 weights"
        lines.append((f"FP8: {counts['fp8_weights']} frozen projections compute their forward and input-gradient GEMMs in e4m3 (not exact bf16; their copies take {copies:.3g} GB, {where}); each validation measurement is reported in bf16 beside it", "info"))
    elif runtime.fp8 and not notes:
        lines.append(("fp8 asked for, but no frozen projection can take it (full fine-tuning trains them; 4-bit weights stay 4-bit); this job trains in bf16", "warn"))
    return lines + [(f"Training kernels: {note}", "warn") for note in notes]


def fp8_active(model) -> bool:
    """Whether some projection of ``model`` computes in FP8 (``patch_model(fp8=True)`` attached copies)."""
    return any(hasattr(m, "_tf_fp8") for m in model.modules())


def fp8_against_bf16(measure, what: str, fp8: dict[str, float | None] | None = None) -> str:
    """``measure() -> {quantity: value or None}`` (losses, rewards; no gradient) with the FP8 GEMMs (``fp8``:
    already measured so) and with bf16's, as one line for the job's events: what FP8 changes in them."""
    from gpu_worker.patching import fp8_disabled

    fp8 = measure() if fp8 is None else fp8
    with fp8_disabled():
        bf16 = measure()
    said = []
    for name, value in fp8.items():
        if value is None or bf16.get(name) is None:
            continue
        change = (value - bf16[name]) / abs(bf16[name]) * 100 if bf16[name] else float("nan")
        said.append(f"{name} {value:.4f} with FP8 GEMMs, {bf16[name]:.4f} in bf16 ({change:+.2f}%)")
    return f"FP8 against bf16 ({what}): " + "; ".join(said)


def cuda_graph_summary(model) -> str | None:
    """What the decoder layers' CUDA graphs did in this run (``gpu_worker.patching.graphs``), for the job's
    events; None where the model has none or never ran a training step on a GPU."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    graphs = getattr(layers[0], "_tf_graphs", None) if layers else None
    if graphs is None:
        return None
    status = graphs.status
    if status["disabled"]:
        return f"CUDA graphs turned off after {status['replays']} layer replays: {status['disabled']}"
    if not status["captures"]:
        return None
    return f"CUDA graphs: {status['captures']} capture(s), {status['replays']} layer replays"


def _stock_memory_mode(model, mode: MemoryMode) -> list[tuple[str, str]]:
    if mode == MemoryMode.off:
        return []
    # Non-reentrant checkpointing works with a frozen base model without forcing input gradients.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == MemoryMode.offload:
        return [("Activation offload needs the training kernels; using gradient checkpointing instead", "warn")]
    return [("Gradient checkpointing enabled (stock transformers)", "info")]


def cuda_peak_memory_gb(device) -> float | None:
    """Peak allocated GPU memory since the last call (then reset), or None off GPU."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak

