"""Token counts of training files before a job is queued, without torch or transformers.

The scheduler calls ``estimate_job_tokens`` at the ``validating_files`` stage to store a job's
``estimated_tokens`` (trained tokens x epochs), from which the API quotes time and cost. It reads the
base model's ``tokenizer.json`` and ``tokenizer_config.json`` (and ``chat_template.jinja``) with the
``tokenizers`` library and renders chat templates with jinja2, through the very code the trainer
tokenizes with (``gpu_worker.data.encoding`` / ``templates``): for supervised data the counts are
the trainer's exactly (a test checks it on the built-in model).

Preference and KTO rows are read and tokenized by the preference trainer's own code
(``data.formats.preference_conversations``, ``data_preference.Renderer`` and ``fit``): the prompt (its
``input.tools`` and any assistant turn inside it included, never trained) rendered with the job's
template, each answer's tokens as the trainer cuts them; a pair counts the prompt with each answer
(trained: both answers), KTO the prompt with its completion (trained: the completion). GRPO prompts
count the prompt's tokens, and the job estimate is ``num_generations x max_completion_length``
generated tokens per prompt (an upper bound: generation may stop earlier). The job's trained tokens
leave out the examples the held-out split takes (``mixing.held_out_count``, the automatic split included).

``count_job_files`` gives each file's counts (the API's estimate reads the tokens processed, the
scheduler also whether a file is left with no example the trainer can use); ``local_tokenizer_dir``
finds a base model's tokenizer on this machine (nothing is downloaded: without one, no count is made).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

from gpu_worker.contract import PREFERENCE_METHODS, ChatTemplate, DataFormat, JobSpec, Method
from gpu_worker.data.encoding import TokenizerView, encode_record
from gpu_worker.data.formats import SFT_FORMATS, preference_conversations, to_sft
from gpu_worker.data.dedupe import exact_key
from gpu_worker.data.mixing import held_out_count, mixed_count
from gpu_worker.data_preference import Renderer, fit, parse_prompt
from gpu_worker.data.templates import TemplateError, resolve_template
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
    duplicates: int = 0  # examples dropped as exact repeats of an earlier one (with ``seen``: dedupe)

    @property
    def usable(self) -> int:
        """Examples the trainer keeps."""
        return self.examples - self.dropped - self.duplicates


def _pair_key(prompt: list[int], completions: list[list[int]], obj: dict[str, Any]) -> bytes:
    """A preference/KTO example's identity as the trainer dedupes it: its tokens (and a KTO label)."""
    h = hashlib.blake2b(repr((prompt, completions, obj.get("label"))).encode(), digest_size=16)
    return b"pair:" + h.digest()


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
    renderer = Renderer(view, template)
    validator = FileValidator(min_examples=0, format=format)
    examples = tokens = trained = truncated = dropped = duplicates = 0
    for raw in lines:
        before = validator.error_count
        obj = validator.feed(raw)
        if validator.error_count > before:
            raise TokenCountError(f"line {validator.line}: {validator.finish().errors[-1].reason}")
        if obj is None:
            continue
        fmt = validator.format
        examples += 1
        try:
            if fmt == DataFormat.prompt:
                n = len(renderer.prompt(parse_prompt(obj, param="training_file", line=validator.line)[0]))
                tokens += min(n, max_seq_length)
                truncated += n > max_seq_length
                continue
            if fmt not in SFT_FORMATS:  # as gpu_worker.data_preference.load_examples tokenizes the row
                conv, answers = preference_conversations(fmt, obj)
                prompt = renderer.prompt(conv)
                prompt, completions, cut = fit(prompt, [renderer.completion(conv, prompt, a) for a in answers], max_seq_length)
                truncated += cut
                if seen is not None:
                    key = _pair_key(prompt, completions, obj)
                    if key in seen:
                        duplicates += 1
                        continue
                    seen.add(key)
                tokens += sum(len(prompt) + len(c) for c in completions)
                trained += sum(len(c) for c in completions)
                continue
            encoded = [encode_record(view, template, to_sft(fmt, obj), max_seq_length, train_on_inputs=train_on_inputs)]
        except ValueError as err:  # the trainer refuses the line the same way: the supervised loader a
            if fmt in SFT_FORMATS and not isinstance(err, TemplateError):  # TemplateError, the preference one any ValueError
                raise
            raise TokenCountError(f"line {validator.line}: {err}") from None
        for example, cut in encoded:
            truncated += cut
            if not example.trained_tokens:
                dropped += 1
                continue
            if seen is not None:  # dedupe: the trainer drops exact repeats, across all files
                key = exact_key(example)
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
            tokens += len(example.input_ids)
            trained += example.trained_tokens
    return TokenStats(examples, tokens, trained, truncated, dropped, duplicates)


# The format each recipe but the supervised one reads every file in, whatever the spec declares
# (gpu_worker.recipes: preference, kto, grpo); the supervised recipe reads the declared (or detected) one.
_METHOD_READS = {Method.kto: DataFormat.kto, Method.grpo: DataFormat.prompt, **{m: DataFormat.preference for m in PREFERENCE_METHODS}}


@dataclasses.dataclass(frozen=True)
class FileCount:
    param: str  # the job's field naming the file: training_file, extra_training_files[i], validation_file
    weight: float  # mixing weight (1 for the primary and validation files)
    stats: TokenStats


def count_job_files(store: ObjectStore, spec: JobSpec, tokenizer_dir: str | os.PathLike, *, validation: bool = False) -> list[FileCount]:
    """Every training file's counts, in the trainer's order (exact repeats across them are counted
    as ``duplicates`` when the job dedupes), and the validation file's last when ``validation``; each
    file read in the format its recipe reads it in. Raises ``TokenCountError`` for a missing file or a
    bad line."""
    opts, hp = spec.data, spec.hyperparameters
    view = TokenizerView.from_dir(tokenizer_dir)
    read_as = _METHOD_READS.get(spec.method)
    # each named by the job's field, never by its storage key (a tenant knows file ids, not our layout)
    files = [(spec.training_file_key, read_as or opts.format, 1.0, "training_file")]
    files += [(f.key, read_as or f.format, f.weight, f"extra_training_files[{i}]") for i, f in enumerate(opts.extra_training_files)]
    if validation and spec.validation_file_key:
        files.append((spec.validation_file_key, read_as or opts.format, 1.0, "validation_file"))
    seen: set[bytes] | None = set() if opts.dedupe else None
    counts = []
    for key, fmt, weight, param in files:
        try:
            stats = count_tokens(iter_lines(store, key), tokenizer_dir=tokenizer_dir, format=fmt, chat_template=opts.chat_template, max_seq_length=hp.max_seq_length,
                                 train_on_inputs=opts.train_on_inputs, view=view, seen=None if param == "validation_file" else seen)
        except ObjectNotFound:
            raise TokenCountError(f"{param}: the file is not in storage", param) from None
        except TokenCountError as err:
            raise TokenCountError(f"{param}: {err}", param) from None
        counts.append(FileCount(param, weight, stats))
    return counts


def job_tokens(spec: JobSpec, counts: Iterable[FileCount], *, trained: bool = True) -> int:
    """The job's tokens over all epochs from its training files' counts, each scaled by its mixing
    weight and by the held-out split: the loss-bearing ones (``trained``; GRPO: the generated ones),
    or all the model processes (GRPO: each prompt once per generation, with its generated tokens)."""
    p, total, counts = spec.method_params, 0.0, list(counts)
    for count in counts:
        stats = count.stats
        if count.param == "validation_file" or not stats.usable:
            continue
        if spec.method == Method.grpo:  # the loss covers generated tokens, not the file's
            generated = p.grpo_num_generations * p.grpo_max_completion_length
            per_example = generated if trained else p.grpo_num_generations * stats.tokens / stats.usable + generated
        else:
            per_example = (stats.trained_tokens if trained else stats.tokens) / stats.usable
        total += per_example * mixed_count(stats.usable, count.weight)
    if not spec.validation_file_key:  # the trainer holds out from the pooled training examples before mixing
        pool = sum(c.stats.usable for c in counts if c.param != "validation_file")
        if pool:
            total *= 1 - held_out_count(pool, spec.data.validation_split) / pool
    return int(round(total * spec.hyperparameters.n_epochs))


def unusable_file(spec: JobSpec, counts: Iterable[FileCount]) -> tuple[str, str] | None:
    """``(param, message)`` of the first file the supervised trainer would refuse for having no
    example left to train on, said as the trainer says it (gpu_worker.data.dataset), or None. Other
    methods keep every example (their truncation keeps part of each answer)."""
    if spec.method != Method.supervised:
        return None
    counts = list(counts)
    for count in counts:  # the trainer reads each file, then dedupes across them
        if not count.stats.examples - count.stats.dropped:
            dropped = count.stats.dropped
            why = f" ({dropped} lost every trained token to max_seq_length={spec.hyperparameters.max_seq_length})" if dropped else ""
            return count.param, f"the file has no usable example{why}"
    for count in counts:
        if count.param != "validation_file" and not count.stats.usable:
            return count.param, "no example left after duplicates and the held-out split were removed"
    return None


def estimate_job_tokens(store: ObjectStore, spec: JobSpec, tokenizer_dir: str | os.PathLike) -> int:
    """Trained tokens of the whole job: every training file's, scaled by its mixing weight and by
    the held-out split, times the epochs (GRPO: plus the generated tokens). Raises
    ``TokenCountError`` for a missing file or a bad line."""
    return job_tokens(spec, count_job_files(store, spec, tokenizer_dir))


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def local_tokenizer_dir(model: str, data_dir: str | os.PathLike) -> Path | None:
    """A folder on this machine holding ``model``'s ``tokenizer.json``: a built-in model's (once a
    worker here created it), a local model folder, or the model's snapshot in the Hugging Face cache
    (``refs/main``'s, else the newest). None: not here, and nothing is downloaded."""
    for candidate in (Path(data_dir) / "models" / model, Path(model).expanduser()):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    repo = _hf_hub_cache() / f"models--{model.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "tokenizer.json").is_file():
        return repo / "snapshots" / ref.read_text().strip()
    found = sorted((repo / "snapshots").glob("*/tokenizer.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None
