"""The opt-in FP8 mode on a patched model (patch_model(fp8=True)): which projections take it, how far it
moves the loss and the adapters' gradients from bf16's, that the copies follow their weights (merges, in-place
writes), that it says why where it cannot run, and that a model trained in it learns like one in bf16.

On CPU the FP8 GEMMs are emulated from the dequantised operands (tuneforge_kernels/fp8.py), so the same
rounding is checked everywhere; the GPU cases run cuBLAS's e4m3 GEMMs.

Tolerances: e4m3 rounds each operand within 2^-4 of itself (~3.6% RMS). The loss of a tiny random model
averages many such products: measured 1e-4 from bf16's; 3% is the bound. The adapters' gradients pass through
two rounded GEMMs per layer and everything downstream of the rounded activations: all of them together
measured 12.8% from bf16's in norm (the same with the straight-through reference, so the kernels add nothing),
bound 20%. Per tensor the direction is the test (cosine over 0.9, measured 0.963): Q's and K's gradients in a
random model are differences of nearly equal terms (near-uniform attention), whose relative error is large.
"""

from __future__ import annotations

import pytest
import torch

from gpu_worker.patching import fp8_disabled, patch_model
from gpu_worker.patching.lora import lora_weights
from tests.gpu_worker.patching.conftest import (DEVICES_IMPLS, build_lora_model, lora_grads, needs_cuda, rel,
                                                tiny_config)
from tuneforge_kernels.fp8 import Fp8Weight

LOSS_TOL, GRAD_TOL, MIN_COSINE = 3e-2, 0.2, 0.9


def _batch(device, vocab=128, rows=2, seq=24):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (rows, seq), generator=g).to(device)


def _loss(model, x, device):
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        return model(input_ids=x, labels=x).loss


@pytest.mark.parametrize("device,impl", DEVICES_IMPLS)
def test_every_frozen_projection_takes_fp8_and_stays_near_bf16(device, impl):
    config = tiny_config(hidden_size=64, intermediate_size=96)
    stock, ours = build_lora_model(config, device), build_lora_model(config, device)
    report = patch_model(ours, impl=impl, fp8=True)
    assert report.counts["fp8_weights"] == 7 * config.num_hidden_layers and not report.notes
    assert report.counts["joined_weights"] == report.counts["padded_mlp"] == 0  # bf16 layouts: not with FP8
    layer = ours.get_base_model().model.layers[0]
    assert isinstance(lora_weights(layer.mlp.down_proj).weight, Fp8Weight)
    x = _batch(device)
    l_stock = _loss(stock, x, device)
    l_stock.backward()
    l_ours = _loss(ours, x, device)
    l_ours.backward()
    assert 0 < abs(l_ours.item() - l_stock.item()) / l_stock.item() < LOSS_TOL  # rounded, and not by much
    g_stock, g_ours = lora_grads(stock), lora_grads(ours)
    assert rel(torch.cat([g.flatten() for g in g_ours.values()]),
               torch.cat([g_stock[n].flatten() for n in g_ours])) < GRAD_TOL
    for n in g_stock:
        assert torch.nn.functional.cosine_similarity(g_ours[n].flatten(), g_stock[n].flatten(), dim=0) > MIN_COSINE, n
    with torch.no_grad(), fp8_disabled():  # bf16's weights: the stock model's loss
        read = lora_weights(layer.mlp.down_proj).weight  # on CUDA through a device copy: the bf16 weight is on the host
        assert isinstance(getattr(read, "param", read), torch.nn.Parameter), read
        l_bf16 = _loss(ours, x, device)
    tol = 1e-5 if device == "cpu" else 1e-2
    assert abs(l_bf16.item() - l_stock.item()) / l_stock.item() < tol


def test_copies_follow_their_weights():
    config = tiny_config()
    model = build_lora_model(config)
    patch_model(model, fp8=True)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    first = lora_weights(q).weight
    assert lora_weights(q).weight is first  # kept, not re-taken at each call
    # a merged adapter's delta is written through .data, which the copy cannot see: merging drops the copy
    # and unmerging takes a new one
    model.merge_adapter()
    assert isinstance(lora_weights(q).weight, torch.nn.Parameter) and q.base_layer._tf_fp8 is None
    model.unmerge_adapter()
    # taken again into the same buffers (CUDA graphs read them): the unmerged weight's values
    assert lora_weights(q).weight is first and first.matches(q.base_layer.weight)
    assert torch.equal(first.qweight.view(torch.uint8), Fp8Weight(q.base_layer.weight).qweight.view(torch.uint8))
    first_values = first.dequantize().clone()
    # an in-place write through the parameter: the copy is re-taken from the new values
    with torch.no_grad():
        q.base_layer.weight.mul_(2)
    again = lora_weights(q).weight
    assert again is first and torch.allclose(again.dequantize(), 2 * first_values, rtol=0.07)
    # merged and unloaded (the merged export): the plain layers compute with their merged bf16 weights
    x = _batch("cpu")
    with torch.no_grad():
        want = model(input_ids=x).logits
        merged = model.merge_and_unload()
        assert all(getattr(m, "_tf_fp8", None) is None for m in merged.modules())
        assert isinstance(lora_weights(merged.model.layers[0].self_attn.q_proj).weight, torch.nn.Parameter)
        got = merged(input_ids=x).logits
    # the FP8 model's logits against the merged one's: FP8's rounding apart (measured 0.042), the same function;
    # a merged model that read the stale copies would miss the adapter (1.45 away: init_lora_weights=False)
    assert rel(got, want) < 0.1


def test_the_bf16_weights_wait_in_host_memory_and_every_reader_still_works():
    """FP8 mode keeps the projections' bf16 weights in host memory (lora.keep_fp8_sources_on_host): the
    copies follow them without quantising again; a bf16 measurement reads each through a device copy; a
    merge, a stock forward and an in-place write bring the weight back first."""
    from gpu_worker.patching.lora import keep_fp8_sources_on_host

    ref, model = build_lora_model(tiny_config()), build_lora_model(tiny_config())
    patch_model(ref, fp8=True)
    patch_model(model, fp8=True)  # a CPU model: moved to new host storage below, which exercises the same paths
    layers = model.get_base_model().model.layers
    moved = sum(keep_fp8_sources_on_host(layer) for layer in layers)
    q = layers[0].self_attn.q_proj
    weights = [m.weight for layer in layers for m in layer.modules() if "_tf_fp8" in m.__dict__]
    assert moved == sum(w.numel() * w.element_size() for w in weights) and len(weights) == 7 * len(layers)
    assert sum(keep_fp8_sources_on_host(layer) for layer in layers) == 0  # once
    copy = lora_weights(q).weight
    assert copy is q.base_layer._tf_fp8 and copy.matches(q.base_layer.weight)  # followed, not taken again
    x = _batch("cpu")
    with torch.no_grad():
        assert torch.equal(model(input_ids=x, labels=x).loss, ref(input_ids=x, labels=x).loss)
        with fp8_disabled():
            read = lora_weights(q).weight
            assert not isinstance(read, torch.Tensor) and torch.equal(read.dequantize(), q.base_layer.weight)
            assert torch.equal(model(input_ids=x, labels=x).loss, ref(input_ids=x, labels=x).loss)
    # a stock forward of the projection (as PEFT's, where the fused path declines) brings it back, once
    k = layers[0].self_attn.k_proj.base_layer
    storage = k.weight.data_ptr()
    k(torch.randn(3, k.in_features))
    assert "_tf_on_host" not in k.__dict__ and k.weight.data_ptr() != storage and k._tf_fp8.matches(k.weight)
    assert not k._forward_pre_hooks
    # an in-place write into the host copy: back to device memory, quantised again from the new values
    values = copy.dequantize().clone()
    with torch.no_grad():
        q.base_layer.weight.mul_(2)
    assert lora_weights(q).weight is copy and "_tf_on_host" not in q.base_layer.__dict__
    assert torch.allclose(copy.dequantize(), 2 * values, rtol=0.07)
    # merged and unloaded: every merged weight in device memory, the merged model the FP8 one's function
    with torch.no_grad():
        q.base_layer.weight.div_(2)
        want = model(input_ids=x).logits
        merged = model.merge_and_unload()
        projections = [m for n, m in merged.named_modules() if n.endswith(
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))]
        assert len(projections) == len(weights) and all("_tf_on_host" not in m.__dict__ for m in projections)
        assert rel(merged(input_ids=x).logits, want) < 0.1


@pytest.mark.gpu
@needs_cuda
def test_the_bf16_weights_leave_device_memory():
    """On a GPU the moved weights are pinned host memory read as CUDA tensors, and the device holds that
    much less; the loss is FP8's as before, and the bf16 measurement the stock model's."""
    config = tiny_config(hidden_size=256, intermediate_size=512)
    stock, model = build_lora_model(config, "cuda"), build_lora_model(config, "cuda")
    before = torch.cuda.memory_allocated()
    moved = patch_model(model, fp8=True).counts["fp8_host_bytes"]
    w = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    on_host = [m.weight for m in model.modules() if "_tf_on_host" in m.__dict__]
    assert w.is_cuda and len(on_host) == 7 * 2 and moved == sum(t.numel() * t.element_size() for t in on_host)
    # e4m3 copies in (half the bytes, and a row scale each), the bf16 weights out
    assert torch.cuda.memory_allocated() < before - moved * 0.4
    x = _batch("cuda")
    with torch.no_grad(), fp8_disabled():
        tol = 1e-2
        l_bf16, l_stock = _loss(model, x, "cuda"), _loss(stock, x, "cuda")
        assert abs(l_bf16.item() - l_stock.item()) / l_stock.item() < tol
    loss = _loss(model, x, "cuda")
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in lora_grads(model).values())


def test_says_why_where_it_cannot_run(monkeypatch):
    from gpu_worker.contract import Runtime
    from gpu_worker.recipes.model_setup import apply_memory_mode_and_kernels
    import tuneforge_kernels.fp8 as fp8

    config = tiny_config()
    lines = apply_memory_mode_and_kernels(build_lora_model(config), Runtime(fp8=True))
    assert [level for _, level in lines] == ["info", "info"] and lines[1][0].startswith("FP8: 14 frozen")
    per_layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 96 * 64  # q, k, v, o, gate, up, down of tiny_config()
    assert f"copies take {2 * per_layer / 1e9:.3g} GB" in lines[1][0]
    # full fine-tuning: every projection trains, none is frozen to take FP8
    full = build_lora_model(config).get_base_model()
    for p in full.parameters():
        p.requires_grad_(True)
    lines = apply_memory_mode_and_kernels(full, Runtime(fp8=True))
    assert any(level == "warn" and "full fine-tuning" in m for m, level in lines)
    # memory mode offload: measured no faster with FP8, whose copies would take memory
    report = patch_model(build_lora_model(config), fp8=True, memory_mode="offload")
    assert report.counts["fp8_weights"] == 0 and "offload gains no speed" in report.notes[0]
    assert patch_model(build_lora_model(config), fp8=True, memory_mode="checkpointing").counts["fp8_weights"] == 14
    # a device without FP8 GEMMs
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: False)
    report = patch_model(build_lora_model(config), fp8=True)
    assert report.counts["fp8_weights"] == 0 and "has no FP8 GEMMs" in report.notes[0]


VOCAB, STEPS, WINDOW = 32, 200, 25


def _curve(fp8: bool, device: str) -> list[float]:
    # the toy task of test_convergence.py: each row counts upwards mod the vocabulary
    model = build_lora_model(tiny_config("llama", vocab_size=VOCAB, initializer_range=0.3), device)
    assert patch_model(model, fp8=fp8).uses_kernels
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g, losses = torch.Generator().manual_seed(0), []
    for _ in range(STEPS):
        x = ((torch.randint(0, VOCAB, (8, 1), generator=g) + torch.arange(16)) % VOCAB).to(device)
        loss = _loss(model, x, device)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_learns_like_bf16(device):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bf16, fp8 = _curve(False, device), _curve(True, device)
    finally:
        torch.set_num_threads(threads)
    assert bf16[-1] < 0.1 * bf16[0] and fp8[-1] < 0.1 * fp8[0], (bf16[-1], fp8[-1])
    means = [(sum(c[i:i + WINDOW]) / WINDOW for c in (bf16, fp8)) for i in range(0, STEPS, WINDOW)]
    for a, b in means:  # 25-step means within 10% (+0.03 where the late means are small)
        assert abs(a - b) < 0.1 * a + 3e-2


# frozen projections without bias per layer: Qwen2's q/k/v carry biases (they keep bf16); Phi-3 fuses q/k/v and gate/up
FP8_PER_LAYER = {"llama": 7, "mistral": 7, "qwen2": 7, "qwen3": 7, "gemma": 7, "gemma2": 7, "gemma3_text": 7, "phi3": 4}


@pytest.mark.parametrize("arch", sorted(FP8_PER_LAYER))
def test_every_family_reads_each_copy_it_takes(arch, monkeypatch):
    """Every copy taken is read by a forward (none is memory for nothing), and the loss stays near bf16's."""
    import gpu_worker.patching.lora as lora

    config = tiny_config(arch)
    model = build_lora_model(config)
    report = patch_model(model, fp8=True)
    assert report.counts["fp8_weights"] == FP8_PER_LAYER[arch] * config.num_hidden_layers
    read, real = set(), lora._fp8_weight

    def spy(layer, weight):
        got = real(layer, weight)
        if got is not weight:
            read.add(id(layer))
        return got

    monkeypatch.setattr(lora, "_fp8_weight", spy)
    x = _batch("cpu")
    with torch.no_grad():
        l_fp8 = _loss(model, x, "cpu")
        with fp8_disabled():
            l_bf16 = _loss(model, x, "cpu")
    assert len(read) == report.counts["fp8_weights"]
    assert 0 < abs(l_fp8.item() - l_bf16.item()) / l_bf16.item() < LOSS_TOL


def test_kernels_off_says_fp8_is_not_used():
    from gpu_worker.contract import Runtime
    from gpu_worker.recipes.model_setup import apply_memory_mode_and_kernels

    model = build_lora_model(tiny_config())
    lines = apply_memory_mode_and_kernels(model, Runtime(use_kernels=False, fp8=True))
    assert lines[-1] == ("fp8 needs the training kernels; this job trains in bf16", "warn")
    assert not any(hasattr(m, "_tf_fp8") for m in model.modules())
