"""The ``offload`` memory mode computes what ``checkpointing`` computes, whatever the timing of its
side-stream copies, and keeps no layer input around after backward; backward of a layer prefetches the
input of the layer below it; its recompute skips the MLP's down projection exactly where the layer
discards the MLP's output."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch

from gpu_worker.patching import patch_model
from gpu_worker.patching import memory
from tests.gpu_worker.patching.conftest import DEVICES_IMPLS, build_lora_model, lora_grads, rel, tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(device, mode, layers=4, impl=None, model_type="llama"):
    model = build_lora_model(tiny_config(model_type, num_hidden_layers=layers), device)
    patch_model(model, memory_mode=mode, impl=impl)
    return model


def _steps(model, device, n=2, shape=(4, 32)):
    """``n`` forward/backward passes (gradients accumulate), float32 throughout."""
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        x = torch.randint(0, 128, shape, generator=g).to(device)
        model(input_ids=x, labels=x).loss.backward()
    return lora_grads(model)


def _state(model):
    base = model.get_base_model()
    return base.model.layers[0]._gradient_checkpointing_func.state


@pytest.mark.parametrize("device,impl", DEVICES_IMPLS)
def test_offload_equals_checkpointing(device, impl):
    # the interpreter runs each Triton program in Python: a smaller case there
    layers, kw = (2, dict(n=1, shape=(2, 16))) if impl == "triton" else (4, {})
    ref = _steps(_model(device, "checkpointing", layers, impl), device, **kw)
    ours = _steps(_model(device, "offload", layers, impl), device, **kw)
    assert ref.keys() == ours.keys()
    # the same kernels on the same inputs (the skipped down projection is never read); on CUDA only the
    # attention backward may reassociate
    worst = max(rel(ours[n], ref[n]) for n in ref)
    assert worst < (1e-6 if device == "cpu" else 1e-5), worst


@pytest.mark.parametrize("device,impl", DEVICES_IMPLS)
@pytest.mark.parametrize("mode,model_type", [("checkpointing", "llama"), ("offload", "llama"), ("offload", "phi3")])
@pytest.mark.parametrize("kind", ["stream", "philox"])
def test_the_recompute_draws_the_forwards_dropout_masks(monkeypatch, device, impl, mode, model_type, kind):
    """Adapter dropout (drawn by the fused nodes, see test_patch_llama): a recomputing memory mode must draw
    the masks its forward drew, as torch's checkpointing does, so its gradients are those of the loss it
    computed; the same loss and gradients as keeping every activation under one seed, and the random
    stream left where that run leaves it. In ``offload`` the recompute's MLP is deferred and its Q/K/V and
    O replayed: they draw the masks all the same (Phi-3: one mask for gate_up_proj's two halves, read by the
    deferred MLP's blocks of 5 rows). ``philox``: CUDA's masks (seeds drawn from the generator), on the CPU
    too."""
    import tuneforge_kernels.lora_mlp as mod

    if device == "cuda" and kind == "stream":
        pytest.skip("CUDA draws philox masks only")
    monkeypatch.setattr(mod, "_DEFERRED_ROWS", 5)
    monkeypatch.setattr("tuneforge_kernels.dropout._seeds.cpu", kind == "philox")
    results = []
    for m in ("off", mode):
        model = build_lora_model(tiny_config(model_type, num_hidden_layers=3), device, lora_dropout=0.3)
        patch_model(model, memory_mode=m, impl=impl)
        torch.manual_seed(11)
        x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4)).to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        results.append((loss.item(), lora_grads(model), torch.rand(3).tolist()))
    (loss_off, g_off, after_off), (loss_mode, g_mode, after_mode) = results
    assert loss_mode == pytest.approx(loss_off, rel=1e-5)
    assert max(rel(g_mode[n], g_off[n]) for n in g_off) < 1e-4
    assert after_mode == after_off


@pytest.mark.parametrize("model_type,skips", [("llama", True), ("qwen3", True), ("gemma2", False),
                                              ("phi3", False)])
def test_recompute_skips_the_down_projection_where_the_output_is_discarded(monkeypatch, model_type, skips):
    """Llama/Qwen3 layers add the MLP's output to the residual and return it; Gemma 2 normalises it
    first and Phi-3 applies dropout, so there the recompute must compute it."""
    import tuneforge_kernels.lora_mlp as mod

    calls = []
    act_forward = mod._act_forward
    monkeypatch.setattr(mod, "_act_forward", lambda *a: calls.append(1) or act_forward(*a))
    layers = 2
    model = _model("cpu", "offload", layers=layers, impl="triton", model_type=model_type)
    x = torch.randint(0, 128, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    # forward runs every layer's MLP once; the recompute once more unless it skips
    assert len(calls) == (layers if skips else 2 * layers)


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_recompute_replays_the_attention_projections(monkeypatch, model_type):
    """The forward keeps the q/k/v and O outputs; the recompute reads the base weights of those projections
    only in backward (dx), never to recompute the outputs: 2 products per weight group and pass, not 3
    (a group: q/k/v joined in one buffer, as the patcher stores them for small models, or each of
    Phi-3's qkv_proj and o_proj)."""
    from tests.kernels.conftest import count_matmuls

    layers = 2
    model = _model("cpu", "offload", layers=layers, impl="triton", model_type=model_type)
    weights = [p for n, p in model.named_parameters() if "self_attn" in n and "base_layer" in n]
    x = torch.randint(0, 128, (2, 16))
    with count_matmuls(weights) as n:
        model(input_ids=x, labels=x).loss.backward()
    groups = 2  # llama: q/k/v joined, o; Phi-3: qkv_proj, o_proj
    assert n["reading"] == 2 * groups * layers
    state = _state(model)
    assert state.last() is None or not state.last().extras


@pytest.mark.parametrize("inputs,stashes,stashing_layers,resident_layers",
                         [(4, 1, 1, 0), (4, 2, 2, 0), (4, 4, 4, 0), (2, 0, 0, 2), (0, 0, 0, 4)])
def test_the_host_budget_bounds_the_stashes_and_the_inputs(monkeypatch, inputs, stashes, stashing_layers,
                                                           resident_layers):
    """Pinned host memory is bounded (a budget of ``inputs`` layer inputs and ``stashes`` stashes). A layer
    stashes if the copies held (its own input included), one more stash and the inputs of the layers above
    it fit: each layer's input keeps its place, so the first layers do not take it all for stashes (the first
    layer stashes before any stash size is known). A layer input that would pass the budget stays on the
    device. Layers that do not stash recompute their q/k/v and O (a base-weight read more per projection),
    and the gradients are checkpointing's either way."""
    from tests.kernels.conftest import count_matmuls

    layers = 4
    x = torch.randint(0, 128, (2, 16))
    ref = _model("cpu", "checkpointing", layers, impl="triton")
    ref(input_ids=x, labels=x).loss.backward()
    model = _model("cpu", "offload", layers, impl="triton")
    config = model.get_base_model().config
    head = config.hidden_size // config.num_attention_heads
    per_token = 4  # float32 bytes
    layer_input = x.numel() * config.hidden_size * per_token
    stash = x.numel() * ((config.num_attention_heads + 2 * config.num_key_value_heads) * head
                         + config.hidden_size) * per_token
    state = _state(model)
    assert state.layers == layers
    state.host_budget = inputs * layer_input + stashes * stash
    weights = [p for n, p in model.named_parameters() if "self_attn" in n and "base_layer" in n]
    with count_matmuls(weights) as n, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model(input_ids=x, labels=x).loss
        held = sum(c.host_bytes() for c in state.live)
        loss.backward()
    said = " ".join(str(w.message) for w in caught)
    assert ("recompute their projections" in said) == (stashing_layers < layers - resident_layers)
    assert ("keep their input in device memory" in said) == (resident_layers > 0)
    assert held == (layers - resident_layers) * layer_input + stashing_layers * stash <= state.host_budget
    # per layer two weight groups (q/k/v joined, o). forward: 2 products a layer; backward: dx (2) and,
    # in the layers that did not stash, the recompute (2)
    assert n["reading"] == 2 * layers * 2 + 2 * (layers - stashing_layers)
    assert state.resident == resident_layers
    assert state.over_budget == layers - resident_layers - stashing_layers
    g_ref, g = lora_grads(ref), lora_grads(model)
    assert max(rel(g[n], g_ref[n]) for n in g_ref) < 1e-6


def test_copies_are_made_of_blocks_the_pinned_allocator_rounds_little(monkeypatch):
    """torch's pinned allocator rounds each block up to a power of two: a copy in row blocks takes less
    than a row more per block (and ``bytes_for`` says so before it is made); the values come back whole,
    whatever the tensor's layout."""
    assert memory.row_blocks(0, 8) == []
    assert memory.row_blocks(5, 2**20) == [4, 1]  # 4 MiB, then 1 MiB
    blocks = memory.row_blocks(327_680, 8192)  # an 8B layer input at 327,680 tokens: 2.5 GiB
    assert sum(blocks) == 327_680 and [n * 8192 for n in blocks] == [2**31, 2**29]
    odd = memory.row_blocks(1_000_003, 6)
    assert sum(odd) == 1_000_003 and all(n * 6 > (1 << (n * 6).bit_length() - 1) - 6 for n in odd[:-1])
    monkeypatch.setattr(memory, "BLOCK_FLOOR", 64)
    stream = None
    for t in (torch.randn(3, 7, 10), torch.randn(10, 21).t(), torch.randn(5, 12)[:, 2:9], torch.tensor(2.5)):
        copy = memory._HostTensor(t, stream)
        assert torch.equal(copy.to(torch.device("cpu")), t)
        assert copy.host_bytes == t.nbytes == memory._HostTensor.bytes_for(t)  # not pinned: exact
    assert len(memory._HostTensor(torch.randn(3, 7, 10), stream).blocks) > 1


def test_the_host_budget_reads_a_container_limit(monkeypatch, tmp_path):
    from gpu_worker.patching import memory

    limit = tmp_path / "memory.max"
    limit.write_text("1073741824\n")
    monkeypatch.setattr(memory, "_CGROUP_LIMITS", (str(tmp_path / "absent"), str(limit)))
    assert memory.host_memory_bytes() == 2**30
    limit.write_text("max\n")  # no limit: the machine's memory
    assert memory.host_memory_bytes() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_a_recompute_that_takes_another_path_fails_loudly():
    model = _model("cpu", "offload", layers=1, impl="triton")
    x = torch.randint(0, 128, (2, 16))
    loss = model(input_ids=x, labels=x).loss
    copy = _state(model).last()
    copy.tags[1] = ("o", 0)  # as if the forward had stashed O where the recompute expects Q
    with pytest.raises(RuntimeError, match="another path"):
        loss.backward()


@pytest.mark.gpu
@needs_cuda
def test_offload_is_right_when_the_copies_are_slow(monkeypatch):
    """The side stream is held back ~20 ms before every copy in either direction. If a layer input
    were freed for reuse before its copy to the host ran, or read on the device before its copy back
    finished, the recompute would see other data and the gradients would be O(1) off."""
    model = _model("cuda", "offload", layers=6)
    state = _state(model)
    state.stream = torch.cuda.Stream()
    sleep = lambda: torch.cuda._sleep(40_000_000)  # noqa: E731  (cycles: ~20 ms at 2 GHz)

    new_copy, prefetch = state.new_copy, memory._HostCopy.prefetch

    def slow_new_copy(hidden):
        with torch.cuda.stream(state.stream):
            sleep()
        return new_copy(hidden)

    def slow_prefetch(self):
        with torch.cuda.stream(self.stream):
            sleep()
        prefetch(self)

    monkeypatch.setattr(state, "new_copy", slow_new_copy)
    monkeypatch.setattr(memory._HostCopy, "prefetch", slow_prefetch)
    ours = _steps(model, "cuda")
    ref = _steps(_model("cuda", "checkpointing", layers=6), "cuda")
    worst = max(rel(ours[n], ref[n]) for n in ref)
    assert worst < 1e-5, worst


def test_backward_prefetches_the_layer_below_and_frees_every_copy(monkeypatch):
    model = _model("cpu", "offload", layers=4)
    copies, fetched = [], []
    init, fetch = memory._HostCopy.__init__, memory._HostCopy.fetch

    def recording_init(self, *a, **kw):
        init(self, *a, **kw)
        copies.append(self)

    def recording_fetch(self):
        below = self.previous() if self.previous is not None else None
        out = fetch(self)
        # by the time this layer's recompute runs, the layer below is already on its way back
        fetched.append((copies.index(self), below is None or below.on_device is not None))
        return out

    monkeypatch.setattr(memory._HostCopy, "__init__", recording_init)
    monkeypatch.setattr(memory._HostCopy, "fetch", recording_fetch)
    _steps(model, "cpu", n=2)
    assert len(copies) == 8  # 4 layers x 2 passes
    # each pass's backward fetches its layers top-down; the second pass does not chain to the first
    assert [i for i, _ in fetched] == [3, 2, 1, 0, 7, 6, 5, 4]
    assert all(prefetched for _, prefetched in fetched)
    assert copies[4].previous is None
    assert all(c.host is None and c.on_device is None for c in copies)


def test_a_dropped_graph_frees_its_host_copies():
    model = _model("cpu", "offload", layers=3)
    x = torch.randint(0, 128, (2, 16))
    model(input_ids=x, labels=x).loss  # graph dropped, no backward
    gc.collect()
    state = _state(model)
    assert state.last is not None and state.last() is None
    model(input_ids=x, labels=x).loss.backward()  # the next pass chains to nothing stale
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.gpu
@needs_cuda
def test_offload_peak_does_not_grow_with_depth_as_checkpointing_does():
    """What the mode is for: checkpointing keeps every layer's input on the device, offload only the few
    in flight (the layer in use with its stashed projection outputs, the prefetched one, the ones being
    copied out). So going from 4 to 12 layers adds 8 layer inputs to checkpointing's peak and about
    nothing to offload's, beyond what both add (weights, adapters, their gradients). A fixed difference
    between the two modes (offload's in-flight stash can exceed a shallow model's checkpoints) is not
    what this measures."""
    shape = (2, 2048)
    peaks = {}
    for layers in (4, 12):
        config = tiny_config("llama", num_hidden_layers=layers, hidden_size=1024, intermediate_size=96,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
        for mode in ("checkpointing", "offload"):
            model = build_lora_model(config, "cuda")
            patch_model(model, memory_mode=mode)
            _steps(model, "cuda", n=1, shape=shape)  # warm-up: optimizer-free, grads stay allocated
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            _steps(model, "cuda", n=1, shape=shape)
            torch.cuda.synchronize()
            peaks[mode, layers] = torch.cuda.max_memory_allocated()
            del model
            gc.collect()
            torch.cuda.empty_cache()
    input_bytes = shape[0] * shape[1] * 1024 * 4  # float32 model
    growth = {mode: peaks[mode, 12] - peaks[mode, 4] for mode in ("checkpointing", "offload")}
    assert growth["checkpointing"] - growth["offload"] >= 0.9 * 8 * input_bytes, (growth, peaks)


def test_offload_leaves_the_embedding_on_the_device_in_a_deepspeed_run(monkeypatch, tmp_path):
    """A multi-GPU rank has its process group up before the memory mode applies; ZeRO's collectives
    expect device memory, so the table is not moved there (and is, without a process group)."""
    import torch.distributed as dist

    moved = []
    monkeypatch.setattr(memory, "move_input_embedding_to_host", lambda model: moved.append(model))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        memory.apply_memory_mode(build_lora_model(tiny_config("llama"), "cpu"), "offload")
    finally:
        dist.destroy_process_group()
    assert moved == []
    memory.apply_memory_mode(build_lora_model(tiny_config("llama"), "cpu"), "offload")
    assert len(moved) == 1


@pytest.mark.gpu
@needs_cuda
def test_offload_keeps_a_frozen_untied_input_embedding_in_host_memory():
    """The table leaves device memory; training, generation and merging see the same values."""
    config = tiny_config("llama", vocab_size=4096)
    ref = build_lora_model(config, "cuda")
    patch_model(ref, memory_mode="checkpointing")
    model = build_lora_model(config, "cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    patch_model(model, memory_mode="offload")
    emb = model.get_base_model().get_input_embeddings()
    table = emb.weight.numel() * emb.weight.element_size()
    assert emb.weight.is_cuda and not emb.weight.requires_grad
    assert before - torch.cuda.memory_allocated() >= table
    assert torch.equal(emb.weight, ref.get_base_model().get_input_embeddings().weight)
    g_ref, g_ours = _steps(ref, "cuda"), _steps(model, "cuda")
    assert max(rel(g_ours[n], g_ref[n]) for n in g_ref) < 1e-5
    ref.eval(), model.eval()
    x = torch.randint(0, 4096, (1, 6), device="cuda")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=x, **kw), ref.generate(input_ids=x, **kw))
        merged, merged_ref = model.merge_and_unload(), ref.merge_and_unload()
        assert rel(merged(input_ids=x).logits, merged_ref(input_ids=x).logits) < 1e-5


@pytest.mark.gpu
@needs_cuda
def test_a_host_resident_embedding_exports_its_values(tmp_path):
    """The export path (gpu_worker/export.py save_merged) copies every tensor of the merged state dict to
    the CPU: the host-resident table must come back with its values, and a saved model reloads equal."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", vocab_size=4096)
    model = build_lora_model(config, "cuda")
    table = model.get_base_model().get_input_embeddings().weight.detach().cpu().clone()
    patch_model(model, memory_mode="offload")
    merged = model.merge_and_unload()
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    assert torch.equal(state["model.embed_tokens.weight"], table)
    merged.save_pretrained(tmp_path, state_dict=state, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.get_input_embeddings().weight, table)


@pytest.mark.gpu
@needs_cuda
def test_a_tied_or_trainable_embedding_stays_on_the_device():
    for config, trainable in ((tiny_config("llama", tie_word_embeddings=True), False), (tiny_config("llama"), True)):
        model = build_lora_model(config, "cuda")
        emb = model.get_base_model().get_input_embeddings()
        emb.weight.requires_grad_(trainable)
        ptr = emb.weight.data_ptr()
        patch_model(model, memory_mode="offload")
        assert emb.weight.data_ptr() == ptr and "forward" not in vars(emb)


def test_the_host_budget_warnings_reach_the_job_events():
    """The trainer turns its own warnings into warn-level LogEvents (gpu_worker.train): the budget's
    warnings name a place in gpu_worker, so the job's events say that layers kept their inputs on the device
    and recomputed their projections; a warning from elsewhere stays in the logs only."""
    from gpu_worker.train import warnings_as_events

    events = []
    model = _model("cpu", "offload", layers=4, impl="triton")
    x = torch.randint(0, 128, (2, 16))
    _state(model).host_budget = 2 * x.numel() * model.get_base_model().config.hidden_size * 4  # two inputs
    with warnings.catch_warnings(record=True), warnings_as_events(events.append):
        warnings.simplefilter("always")
        model(input_ids=x, labels=x).loss.backward()
        warnings.warn("a library's own warning")
    said = [e.message for e in events]
    assert [e.level for e in events] == ["warn", "warn"]
    assert any("keep their input in device memory" in m for m in said)
    assert any("recompute their projections" in m for m in said)
