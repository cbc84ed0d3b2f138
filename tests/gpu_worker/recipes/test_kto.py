"""KTO: unpaired rows read (bad labels named by line), the loss on a fixed batch equals the formula
with the mismatched-pair reference point, and the built-in model learns to favour desirable answers."""

from __future__ import annotations

import pytest

from gpu_worker.contract import CompletedEvent, DataFormat, JobSpec, MethodParams, MetricsEvent
from gpu_worker.data import DataError
from gpu_worker.data_preference import detect_format, load_examples
from test_preference import run_job  # same directory: pytest puts it on sys.path


def kto_rows(sentiment_rows, n: int, seed: int = 0) -> list[dict]:
    """The toy preference task unpaired: even rows the polite answer (desirable), odd rows curt."""
    rows = []
    for i, r in enumerate(sentiment_rows(n, seed)):
        good = i % 2 == 0
        answer = f"I think it is {r['messages'][-1]['content']}, thank you." if good else "No."
        rows.append({"prompt": r["messages"][:-1], "completion": answer, "label": good})
    return rows


@pytest.fixture
def tokenizer():
    from gpu_worker.builtin import build_tokenizer

    return build_tokenizer(2048)


@pytest.mark.parametrize(
    "row, words",
    [
        ({"prompt": "q", "completion": "a"}, "missing 'label'"),
        ({"prompt": "q", "completion": "a", "label": 1}, "'label' must be true"),
        ({"prompt": "q", "completion": 5, "label": True}, "'completion' must be a string"),
    ],
)
def test_bad_kto_rows_name_their_line(store, write_jsonl, tokenizer, row, words):
    write_jsonl(store, "k.jsonl", [{"prompt": "q", "completion": "a", "label": False}, row])
    assert detect_format(store, "k.jsonl") == DataFormat.kto
    with pytest.raises(DataError) as err:
        load_examples(store, "k.jsonl", tokenizer, DataFormat.kto, max_seq_length=64)
    assert err.value.line == 2 and words in str(err.value)


def test_kto_loss_on_a_batch_uses_the_mismatched_reference_point(micro_model_dir, store, write_jsonl, sentiment_rows, tokenizer):
    import torch

    from gpu_worker.contract import AdapterConfig
    from gpu_worker.recipes.completion_batches import collate_completions
    from gpu_worker.loading import load_model
    from gpu_worker.recipes.kto import KTOObjective
    from gpu_worker.recipes.model_setup import wrap_with_lora
    from gpu_worker.recipes.preference_loop import sequence_logps

    write_jsonl(store, "k.jsonl", kto_rows(sentiment_rows, 3))
    spec = JobSpec(job_id="j", org_id="o", base_model=str(micro_model_dir), method="kto", seed=0, training_file_key="k.jsonl", output_prefix="x",
                   hyperparameters={"n_epochs": 1, "batch_size": 3, "learning_rate": 1e-3}, method_params=MethodParams(beta=0.5, kto_desirable_weight=2.0))
    objective = KTOObjective(spec)
    rows = list(objective.load(store, tokenizer, "k.jsonl", "training_file").examples)
    base = load_model(str(micro_model_dir), data_dir=".", device="cpu")
    model = wrap_with_lora(load_model(str(micro_model_dir), data_dir=".", device="cpu"), AdapterConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    losses, rewards, z0, _, _ = objective.example_losses(model, rows, "cpu")

    # By hand: policy and base log-probs of each row, and of completion i+1 under prompt i.
    def logps(m, completions):
        with torch.no_grad():
            return sequence_logps(m, collate_completions([r.prompt for r in rows], completions, tokenizer.pad_token_id))[0].tolist()

    own = [r.completion for r in rows]
    shifted = [rows[(i + 1) % 3].completion for i in range(3)]
    pol, ref, pol_kl, ref_kl = logps(model, own), logps(base, own), logps(model, shifted), logps(base, shifted)
    expected_z0 = max(0.0, sum(a - b for a, b in zip(pol_kl, ref_kl)) / 3)
    assert z0.item() == pytest.approx(expected_z0, abs=1e-5)
    for i, r in enumerate(rows):
        ratio = pol[i] - ref[i]
        value = torch.sigmoid(torch.tensor(0.5 * ((ratio - expected_z0) if r.desirable else (expected_z0 - ratio)))).item()
        assert losses[i].item() == pytest.approx((2.0 if r.desirable else 1.0) * (1 - value), abs=1e-5)
        assert rewards[i].item() == pytest.approx(0.5 * ratio, abs=1e-5)


def test_kto_learns_to_favour_desirable_answers(builtin_data_dir, store, write_jsonl, sentiment_rows, make_spec):
    from gpu_worker.builtin import TINY

    write_jsonl(store, "files/train.jsonl", kto_rows(sentiment_rows, 32))
    write_jsonl(store, "files/valid.jsonl", kto_rows(sentiment_rows, 16, seed=1))
    spec = make_spec(TINY, method="kto", validation_file_key="files/valid.jsonl", runtime={"eval_every_steps": 4},
                     hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 96})
    rec, result = run_job(spec, store, builtin_data_dir)
    valid = [m.valid_loss for m in rec.of(MetricsEvent) if m.valid_loss is not None]
    assert len(valid) == 4 and valid[-1] < valid[0], valid
    good, bad = rec.method_metrics("rewards/desirable"), rec.method_metrics("rewards/undesirable")
    assert sum(good[-4:]) / 4 - sum(bad[-4:]) / 4 > sum(good[:4]) / 4 - sum(bad[:4]) / 4, (good, bad)
    assert any(e.type == "log" and e.message.startswith("KTO data: 16 desirable, 16 undesirable") for e in rec.events)
    assert isinstance(result, CompletedEvent) and result.steps == 16
