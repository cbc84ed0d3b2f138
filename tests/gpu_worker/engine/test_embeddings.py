"""Embeddings over real HTTP with the stock ``openai`` SDK: each input's vector is the stock (PEFT)
model's last hidden state, L2-normalised, for the base and for an adapter; base64 (the SDK's default)
and float agree; usage counts every input token; bad inputs are 400s."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.gpu_worker.engine.conftest import TINY
from tests.gpu_worker.engine.test_server import loaded

TEXTS = ["The food was great", "A terrible and awful night, the coffee was cold"]


@pytest.fixture(scope="module")
def client(engine):
    return openai.OpenAI(base_url=engine.url + "/v1", api_key="unused", max_retries=0)


def _reference(reference, adapter_dir, text: str) -> torch.Tensor:
    ids = torch.tensor([reference.tokenizer(text)["input_ids"]])
    model = reference.model(adapter_dir)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return torch.nn.functional.normalize(hidden[0, -1].float(), dim=-1)


@pytest.mark.parametrize("adapter", [None, "mlp"])
def test_embeddings_equal_the_stock_models_last_hidden_state(engine, client, adapter_dirs, reference, adapter):
    model = loaded(engine, adapter_dirs[adapter]) if adapter else TINY
    resp = client.embeddings.create(model=model, input=TEXTS)  # base64 on the wire (the SDK's default)
    as_floats = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    assert [d.index for d in resp.data] == [0, 1]
    for text, got, floats in zip(TEXTS, resp.data, as_floats.data):
        expected = _reference(reference, adapter_dirs[adapter] if adapter else None, text)
        torch.testing.assert_close(torch.tensor(got.embedding), expected, atol=1e-5, rtol=0)
        assert got.embedding == pytest.approx(floats.embedding, abs=1e-7)
    tokens = sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert (resp.usage.prompt_tokens, resp.usage.total_tokens) == (tokens, tokens)


def test_an_adapter_changes_the_embedding(engine, client, adapter_dirs):
    base = client.embeddings.create(model=TINY, input=TEXTS[0], encoding_format="float").data[0].embedding
    tuned = client.embeddings.create(model=loaded(engine, adapter_dirs["all"]), input=TEXTS[0], encoding_format="float").data[0].embedding
    assert not torch.allclose(torch.tensor(base), torch.tensor(tuned), atol=1e-3)


@pytest.mark.parametrize("kwargs", [dict(input=""), dict(input=[]), dict(input="x", dimensions=8), dict(input=[[10**9]])])
def test_bad_inputs_are_400(client, kwargs):
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=TINY, **kwargs)
