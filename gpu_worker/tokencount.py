"""Token counts of training files before a job is queued, without torch or transformers.

The scheduler calls ``estimate_job_tokens`` at the ``validating_files`` stage to store a job's
``estimated_tokens`` (trained tokens x epochs), from which the API quotes time and cost. It reads the
base model's ``tokenizer.json`` and ``tokenizer_config.json`` (and ``chat_template.jinja``) with the
``tokenizers`` library and renders chat templates with jinja2, through the very code the trainer
tokenizes with (``gpu_worker.data.encoding`` / ``templates``): for supervised data the counts are
the trainer's exactly (a test checks it on the built-in model).

Other methods are estimates of the tokens their loss covers: preference pairs count the prompt with
each answer (trained: both answers), KTO the prompt with its completion (trained: the completion),
GRPO prompts count the prompt's tokens, and the job estimate is ``num_generations x
max_completion_length`` generated tokens per prompt (an upper bound: generation may stop earlier).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

from gpu_worker.contract import ChatTemplate, DataFormat, JobSpec, Method
from gpu_worker.data.encoding import TokenizerView, encode_record
from gpu_worker.data.formats import SFT_FORMATS, Conversation, to_sft
from gpu_worker.data.dedupe import exact_key
from gpu_worker.data.mixing import mixed_count
from gpu_worker.data.templates import render, resolve_template
from gpu_worker.storage import ObjectNotFound, ObjectStore, iter_lines
from gpu_worker.validation import FileValidator


class TokenCountError(ValueError):
    """A file cannot be counted (a bad line, a missing file); the message names the line, ``param`` the
    job's field that names the file (``training_file``, ``extra_training_files[i]``)."""

    def __init__(self, message: str, param: str = "training_file"):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class TokenStats:
    examples: int
    tokens: int  # tokens the model reads (after truncation)
    trained_tokens: int  # tokens carrying a loss
    truncated: int  # examples cut at max_seq_length
    dropped: int = 0  # examples left with no trained token after truncation (the trainer skips them)


def _messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value, "weight": 1}]
    return [{"role": m["role"], "content": m.get("content") or "", "weight": 1} for m in value]


def _answer(value: Any) -> str:
    return value if isinstance(value, str) else value[0].get("content") or ""


def _conversations(fmt: DataFormat, obj: dict[str, Any]) -> list[Conversation]:
    """Preference and KTO records as the conversations their loss reads: prompt + each answer."""
    if fmt == DataFormat.preference:
        if "input" in obj:
            prompt, answers = obj["input"]["messages"], (obj["preferred_output"], obj["non_preferred_output"])
        else:
            prompt, answers = obj["prompt"], (obj["chosen"], obj["rejected"])
    else:
        prompt, answers = obj["prompt"], (obj["completion"],)
    head = _messages(prompt)
    return [Conversation(tuple(head + [{"role": "assistant", "content": _answer(a), "weight": 1}])) for a in answers]


def _prompt_messages(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if "prompt" in obj:
        return _messages(obj["prompt"])
    messages = _messages(obj["messages"])
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages  # drop the reference answer


def count_tokens(
    lines: Iterable[bytes | str],
    *,
    tokenizer_dir: str | os.PathLike,
    format: DataFormat | str = DataFormat.auto,
    chat_template: ChatTemplate | str = ChatTemplate.auto,
    max_seq_length: int,
    train_on_inputs: bool = False,
    view: TokenizerView | None = None,
    seen: set[bytes] | None = None,
) -> TokenStats:
    """Count the tokens of one JSONL file as the trainer would tokenize it; raises
    ``TokenCountError`` on the first bad line."""
    view = view or TokenizerView.from_dir(tokenizer_dir)
    template = resolve_template(chat_template, view.chat_template)
    validator = FileValidator(min_examples=0, format=format)
    examples = tokens = trained = truncated = dropped = 0
    for raw in lines:
        before = validator.error_count
        obj = validator.feed(raw)
        if validator.error_count > before:
            raise TokenCountError(f"line {validator.line}: {validator.finish().errors[-1].reason}")
        if obj is None:
            continue
        fmt = validator.format
        examples += 1
        if fmt == DataFormat.prompt:
            text, _ = render(template, _prompt_messages(obj), special_tokens=view.special_tokens, add_generation_prompt=True)
            n = len(view.encode(text)[0])
            tokens += min(n, max_seq_length)
            truncated += n > max_seq_length
            continue
        records = [to_sft(fmt, obj)] if fmt in SFT_FORMATS else _conversations(fmt, obj)
        for record in records:
            example, cut = encode_record(view, template, record, max_seq_length, train_on_inputs=train_on_inputs)
            truncated += cut
            if not example.trained_tokens:
                dropped += 1
                continue
            if seen is not None:  # dedupe: the trainer drops exact repeats, across all files
                key = exact_key(example)
                if key in seen:
                    dropped += 1
                    continue
                seen.add(key)
            tokens += len(example.input_ids)
            trained += example.trained_tokens
    return TokenStats(examples, tokens, trained, truncated, dropped)


def estimate_job_tokens(store: ObjectStore, spec: JobSpec, tokenizer_dir: str | os.PathLike) -> int:
    """Trained tokens of the whole job: every training file's, scaled by its mixing weight and by
    the held-out split, times the epochs (GRPO: plus the generated tokens). Raises
    ``TokenCountError`` for a missing file or a bad line."""
    opts, hp = spec.data, spec.hyperparameters
    view = TokenizerView.from_dir(tokenizer_dir)
    # each named by the job's field, never by its storage key (a tenant knows file ids, not our layout)
    files = [(spec.training_file_key, opts.format, 1.0, "training_file")]
    files += [(f.key, f.format, f.weight, f"extra_training_files[{i}]") for i, f in enumerate(opts.extra_training_files)]
    total = 0.0
    seen: set[bytes] | None = set() if opts.dedupe else None
    for key, fmt, weight, param in files:
        try:
            stats = count_tokens(iter_lines(store, key), tokenizer_dir=tokenizer_dir, format=fmt, chat_template=opts.chat_template, max_seq_length=hp.max_seq_length, train_on_inputs=opts.train_on_inputs, view=view, seen=seen)
        except ObjectNotFound:
            raise TokenCountError(f"{param}: the file is not in storage", param) from None
        except TokenCountError as err:
            raise TokenCountError(f"{param}: {err}", param) from None
        usable = stats.examples - stats.dropped
        if not usable:
            continue
        per_example = stats.trained_tokens / usable
        if spec.method == Method.grpo:  # the loss covers generated tokens, not the file's
            per_example = spec.method_params.grpo_num_generations * spec.method_params.grpo_max_completion_length
        total += per_example * mixed_count(usable, weight)
    if not spec.validation_file_key and opts.validation_split:
        total *= 1 - opts.validation_split
    return int(round(total * hp.n_epochs))
