"""Reading a projection module (plain ``nn.Linear``, PEFT LoRA ``Linear``, or bitsandbytes ``Linear4bit``
under either) as the ``kernels.lora_mlp.LoraWeights`` the fused kernels take, or ``None`` when the fused
path cannot compute the same function (bias, DoRA, several active adapters, live dropout...), in
which case the caller runs the module's stock forward.

Read at every call, not at patch time: PEFT's ``disable_adapter()``, ``merge_adapter()`` and
``set_adapter()`` change what the module computes after patching.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.lora_mlp import LoraWeights


class _NF4Weight:
    """A bitsandbytes 4-bit weight, expanded on demand into a transient ``(out, in)`` tensor."""

    def __init__(self, param):
        self.param = param

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.param.data, self.param.quant_state)


def _base_weight(layer: nn.Module):
    if getattr(layer, "bias", None) is not None:
        return None
    weight = getattr(layer, "weight", None)
    if weight is None:
        return None
    if type(weight).__name__ == "Params4bit":
        return _NF4Weight(weight)
    if isinstance(layer, nn.Linear):
        return weight
    return None


def lora_weights(module: nn.Module) -> LoraWeights | None:
    base_layer = getattr(module, "base_layer", None)
    if base_layer is None:  # not PEFT-wrapped
        w = _base_weight(module)
        return None if w is None else LoraWeights(w)
    w = _base_weight(module.get_base_layer())
    if w is None:
        return None
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return LoraWeights(w)  # merged: the base already holds the delta; disabled: base only
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return LoraWeights(w)
    if len(active) > 1:
        return None
    name = active[0]
    if getattr(module, "use_dora", {}).get(name, False):
        return None
    dropout = module.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0 and module.training:
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or b.bias is not None:
        return None
    return LoraWeights(w, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]))
