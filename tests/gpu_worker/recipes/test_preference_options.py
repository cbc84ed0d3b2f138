"""The preference/KTO/GRPO loop takes the supervised options too: several files mixed by weight,
exact duplicates dropped, a held-out validation split, packed micro-batches (equal to padded ones),
the best step kept, early stopping, the evaluation gate against the base model, and the loggers."""

from __future__ import annotations

import pytest

from gpu_worker.contract import CompletedEvent, DataFormat, LogEvent, MetricsEvent
from gpu_worker.data_preference import load_examples, load_run_data
from gpu_worker.recipes.completion_batches import collate_completions

from test_preference import preference_rows, run_job


@pytest.fixture
def tokenizer():
    from gpu_worker.builtin import build_tokenizer

    return build_tokenizer(2048)


def _swap(rows):
    """The opposite preference: what training on ``rows`` learns makes these worse."""
    return [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]


def _dpo(make_spec, base, **overrides):
    hp = {"n_epochs": 2, "batch_size": 2, "learning_rate": 5e-3, "gradient_accumulation_steps": 1} | overrides.pop("hyperparameters", {})
    return make_spec(str(base), method="dpo", adapter={"rank": 4, "alpha": 8.0}, hyperparameters=hp, runtime={"eval_every_steps": 1} | overrides.pop("runtime", {}), **overrides)


# --- data --------------------------------------------------------------------------------------------


def test_files_are_deduplicated_split_and_mixed_by_weight(store, write_jsonl, sentiment_rows, tokenizer, make_spec):
    rows = preference_rows(sentiment_rows, 12)
    write_jsonl(store, "files/train.jsonl", rows + rows[:2])  # two exact duplicates
    write_jsonl(store, "files/extra.jsonl", preference_rows(sentiment_rows, 4, seed=5, openai=True))
    spec = make_spec("m", method="dpo", data={"extra_training_files": [{"key": "files/extra.jsonl", "weight": 2.0}], "validation_split": 0.25})

    def read(key, param):
        return load_examples(store, key, tokenizer, DataFormat.preference, max_seq_length=128, param=param)

    data = load_run_data(spec, read)
    assert data.files == (("training_file", 14), ("extra_training_files[0]", 4))
    assert data.duplicates == 2 and data.held_out == round(0.25 * 16) == len(data.valid)
    ident = lambda p: bytes(p.prompt) + bytes(p.chosen)  # noqa: E731
    extra = {ident(p) for p in read("files/extra.jsonl", "x").examples}
    assert len(extra) == 4
    in_train = [p for p in data.train if ident(p) in extra]
    kept_extra = 4 - sum(ident(p) in extra for p in data.valid)
    assert len(in_train) == 2 * kept_extra  # weight 2: every extra example twice
    assert len(data.train) == (16 - data.held_out - kept_extra) + 2 * kept_extra
    # the same seed, the same split; nothing of the validation set is trained on
    assert load_run_data(spec, read) == data
    assert not {ident(p) for p in data.valid} & {ident(p) for p in data.train}


def test_a_file_emptied_by_the_split_is_an_error(store, write_jsonl, sentiment_rows, tokenizer, make_spec):
    from gpu_worker.data import DataError

    rows = preference_rows(sentiment_rows, 4)
    write_jsonl(store, "files/train.jsonl", rows)
    write_jsonl(store, "files/extra.jsonl", rows[:1])  # a duplicate of a training row: dropped
    spec = make_spec("m", method="dpo", data={"extra_training_files": [{"key": "files/extra.jsonl"}]})
    read = lambda key, param: load_examples(store, key, tokenizer, DataFormat.preference, max_seq_length=128, param=param)  # noqa: E731
    with pytest.raises(DataError, match="no example left") as err:
        load_run_data(spec, read)
    assert err.value.param == "extra_training_files[0]"


# --- packing -----------------------------------------------------------------------------------------


def test_packed_sequences_give_the_padded_log_probs_and_gradients(micro_model_dir, store, write_jsonl, sentiment_rows, tokenizer):
    import torch

    from gpu_worker.contract import AdapterConfig
    from gpu_worker.loading import load_model
    from gpu_worker.recipes.model_setup import wrap_with_lora
    from gpu_worker.recipes.preference_loop import sequence_logps, token_logps

    write_jsonl(store, "p.jsonl", preference_rows(sentiment_rows, 5, label=True))
    pairs = load_examples(store, "p.jsonl", tokenizer, DataFormat.preference, max_seq_length=96).examples
    prompts, answers = [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]
    torch.manual_seed(0)
    model = wrap_with_lora(load_model(str(micro_model_dir), data_dir=".", device="cpu"), AdapterConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.train()

    def run(batch):
        model.zero_grad()
        logps, counts = sequence_logps(model, batch)
        logps.sum().backward()
        return logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded = collate_completions(prompts, answers, tokenizer.pad_token_id)
    packed = collate_completions(prompts, answers, tokenizer.pad_token_id, pack_width=96)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # 10 sequences in fewer rows
    assert int(packed["tokens"]) == int(padded["attention_mask"].sum())
    (a, ca, ga), (b, cb, gb) = run(padded), run(packed)
    assert torch.equal(ca, cb)
    # float32 sums of a few hundred log-probs, attention over different row layouts: 1e-5 relative
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), (a, b)
    # gradients: float32 sums in another order; measured here up to 2.4e-6 on tensors of magnitude ~2.5,
    # so the bound is relative to each tensor's scale (a wrong position or mask moves them by ~1e-1)
    assert ga.keys() == gb.keys() and all(torch.allclose(ga[k], gb[k], rtol=1e-4, atol=1e-5 * float(gb[k].abs().max())) for k in ga)
    # per-token layout too (what GRPO's token-level loss reads)
    with torch.no_grad():
        (ta, ma), (tb, mb) = token_logps(model, padded), token_logps(model, packed)
    assert torch.equal(ma, mb) and torch.allclose(ta, tb, atol=1e-4)


def test_a_sequence_longer_than_the_row_is_refused(tokenizer):
    from array import array

    with pytest.raises(ValueError, match="does not fit rows of 8"):
        collate_completions([array("i", [1] * 5)], [array("i", [2] * 5)], 0, pack_width=8)


@pytest.mark.parametrize("method", ["dpo", "kto", "grpo"])
def test_a_packed_run_trains_like_the_padded_one(method, micro_model_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    from gpu_worker.contract import MethodParams, Reward

    if method == "dpo":
        write_jsonl(store, "files/train.jsonl", preference_rows(sentiment_rows, 8))
        params = {}
    elif method == "kto":
        rows = [{"prompt": r["prompt"], "completion": c, "label": good} for r in preference_rows(sentiment_rows, 4) for c, good in ((r["chosen"], True), (r["rejected"], False))]
        write_jsonl(store, "files/train.jsonl", rows)
        params = {}
    else:
        write_jsonl(store, "files/train.jsonl", [{"prompt": f"Say {w}.", "answer": w} for w in ("one", "two", "three", "four")])
        params = {"grpo_num_generations": 4, "grpo_max_completion_length": 4, "rewards": (Reward(kind="exact_match"),)}
    spec = make_spec(str(micro_model_dir), method=method, method_params=MethodParams(**params), adapter={"rank": 4, "alpha": 8.0},
                     hyperparameters={"batch_size": 4, "learning_rate": 5e-3, "max_seq_length": 96})
    padded, _ = run_job(spec, store, tmp_path)
    packed, result = run_job(spec.model_copy(update={"data": spec.data.model_copy(update={"packing": True}), "output_prefix": "jobs/packed"}), store, tmp_path)
    assert isinstance(result, CompletedEvent)
    assert any("Packing each micro-batch" in e.message for e in packed.of(LogEvent))
    assert packed.losses == pytest.approx(padded.losses, rel=1e-4, abs=1e-5)


# --- evaluation: best step, early stopping, gate, loggers --------------------------------------------


def test_early_stopping_keeps_the_best_step_and_the_gate_reports_the_regression(micro_model_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    """Validation pairs prefer the opposite of the training pairs: the better the policy learns, the
    worse the validation loss, so the first evaluation is the best, patience 2 stops two after it,
    and the gate (tuned vs base on the validation set) fails the job when asked to."""
    from gpu_worker.evaluation import EvalRegression

    train = preference_rows(sentiment_rows, 12)
    write_jsonl(store, "files/train.jsonl", train)
    write_jsonl(store, "files/valid.jsonl", _swap(preference_rows(sentiment_rows, 4, seed=1)))
    spec = _dpo(make_spec, micro_model_dir, validation_file_key="files/valid.jsonl", evaluation={"early_stopping_patience": 2})
    rec, result = run_job(spec, store, tmp_path)
    valid = [m.valid_loss for m in rec.of(MetricsEvent)]
    assert len(valid) == 3 and valid[0] < valid[1] < valid[2], valid  # stopped at step 3 of 12
    assert any(e.message.startswith("Early stopping at step 3") for e in rec.of(LogEvent))
    assert result.best_step == 1 and result.steps == 3
    report = result.eval_report
    assert not report.passed and report.base_valid_loss == pytest.approx(0.6931, abs=1e-3)  # DPO's loss at the reference: log 2
    assert report.tuned_valid_loss > report.base_valid_loss

    # the kept adapter is step 1's: its validation loss is the one measured then
    assert report.tuned_valid_loss == pytest.approx(valid[0], rel=1e-5)
    failing = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"fail_on_regression": True}), "output_prefix": "jobs/gated"})
    with pytest.raises(EvalRegression, match="regressed"):
        run_job(failing, store, tmp_path)
    assert store.exists("jobs/gated/adapter/adapter_model.safetensors")  # saved, not promoted


def test_a_held_out_split_evaluates_and_the_gate_passes_on_a_learnable_task(micro_model_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    write_jsonl(store, "files/train.jsonl", preference_rows(sentiment_rows, 16))
    spec = _dpo(make_spec, micro_model_dir, data={"validation_split": 0.25}, runtime={"eval_every_steps": 0}, integrations={"tensorboard": True})
    rec, result = run_job(spec, store, tmp_path)
    assert any(e.message == "Held out 4 examples for validation (validation_split=0.25)" for e in rec.of(LogEvent))
    valid = [m.valid_loss for m in rec.of(MetricsEvent) if m.valid_loss is not None]
    assert len(valid) == 2 and valid[-1] < valid[0] < 0.6932  # once per epoch
    assert result.eval_report.passed and result.eval_report.examples == 4
    board = [a for a in result.artifacts if a.kind == "report" and a.filename == "tensorboard"]
    assert board and store.list(board[0].key)
