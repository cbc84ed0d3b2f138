"""A job's supervised data: files from the object store to the examples the loop trains on.

``load_sft_data`` is the one call a recipe makes: it reads the primary training file and every
``spec.data.extra_training_files`` entry (each in its declared or detected format), checks every
line with the upload rules (``validation.py``; the first bad line fails with its number), tokenizes
with the chat template the spec picks, drops exact duplicates (``spec.data.dedupe``) and reports
near ones, holds out ``validation_split`` (automatic when unset: ``mixing.held_out_count``) when
there is no validation file, mixes the files by
weight, and packs rows (``spec.data.packing``). What happened is in ``SftData.stats``, which the
recipe logs (``stats.log_events()``). An example cut at ``max_seq_length`` is counted; one left with
no trained token is dropped and counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from gpu_worker.contract import ChatTemplate, DataFormat, JobSpec, LogEvent, Method
from gpu_worker.data.dedupe import DedupeReport, Item, dedupe, overlap
from gpu_worker.data.encoding import Example, TokenizerView, encode_record
from gpu_worker.data.formats import Conversation, chat_message, to_sft
from gpu_worker.data.mixing import AUTO_SPLIT_FRACTION, AUTO_SPLIT_MAX, hold_out, mix
from gpu_worker.data.packing import pack
from gpu_worker.data.templates import TemplateError, resolve_template
from gpu_worker.storage import ObjectNotFound, ObjectStore, iter_lines
from gpu_worker.record_checks import check_format_for_method
from gpu_worker.validation import FileValidator, near_key


class DataError(ValueError):
    """A training or validation file is unusable; the message names the line and the problem."""

    def __init__(self, message: str, *, param: str, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.param = param
        self.line = line


@dataclasses.dataclass(frozen=True)
class Dataset:
    examples: tuple[Example, ...]  # packed rows when the job packs (training set only)
    truncated: int  # examples cut to max_seq_length
    dropped: int  # examples with no trained token left after truncation


@dataclasses.dataclass(frozen=True)
class FileStats:
    param: str  # "training_file", "extra_training_files[0]", "validation_file"
    key: str
    format: str
    examples: int  # usable examples read
    truncated: int
    dropped: int
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataStats:
    """What loading did, for the job's log."""

    files: tuple[FileStats, ...]  # training files, primary first
    validation: FileStats | None
    dedupe: DedupeReport
    held_out: int  # training examples moved to validation (validation_split)
    valid_overlap: int  # validation examples identical to a training example
    train_examples: int  # after dedupe, split and mixing
    packed_rows: int | None  # rows after packing; None when not packing
    max_seq_length: int
    split_rule: str = "validation_split"  # how ``held_out`` was chosen, for the log (``split_rule``)

    def messages(self) -> list[tuple[str, str]]:
        out = []
        for f in self.files + ((self.validation,) if self.validation else ()):
            out.append(("info", f"{f.param}: {f.examples} {f.format} examples" + (f", weight {f.weight:g}" if f.weight != 1 else "")))
            if f.truncated:
                out.append(("warn", f"{f.param}: {f.truncated} examples were longer than max_seq_length={self.max_seq_length} tokens and were truncated"))
            if f.dropped:
                out.append(("warn", f"{f.param}: {f.dropped} examples had no trained token left after truncation and were skipped"))
        if self.dedupe.exact:
            done = "removed" if self.dedupe.removed else "kept (dedupe is off)"
            out.append(("warn", f"{self.dedupe.exact} exact duplicate training examples {done}"))
        if self.dedupe.near:
            pairs = ", ".join(f"{_where(a)} ~ {_where(b)}" for a, b in self.dedupe.near_pairs)
            out.append(("warn", f"{self.dedupe.near} near-duplicate training examples (same text up to case, punctuation and spacing), e.g. {pairs}"))
        if self.held_out:
            out.append(("info", f"held out {self.held_out} training examples for validation ({self.split_rule})"))
        if self.valid_overlap:
            out.append(("warn", f"{self.valid_overlap} validation examples also appear in the training data"))
        packed = f", packed into {self.packed_rows} rows of up to {self.max_seq_length} tokens" if self.packed_rows is not None else ""
        out.append(("info", f"training on {self.train_examples} examples per epoch{packed}"))
        return out

    def log_events(self) -> list[LogEvent]:
        return [LogEvent(level=level, message=msg) for level, msg in self.messages()]


def split_rule(split: float | None) -> str:
    """How the held-out split was chosen, in the words of the job's log."""
    if split is None:
        return (f"automatic: {AUTO_SPLIT_FRACTION:.0%} of the training examples, at most {AUTO_SPLIT_MAX}, as there is no "
                "validation file; data.validation_split=0 turns it off")
    return f"validation_split={split:g}"


def _where(at: tuple[int, int]) -> str:
    source, line = at
    return f"line {line}" if source == 0 else f"extra file {source - 1} line {line}"


@dataclasses.dataclass(frozen=True)
class SftData:
    train: Dataset
    valid: Dataset | None
    stats: DataStats


def iter_records(store: ObjectStore, key: str, *, format: DataFormat | str = DataFormat.auto, param: str) -> Iterator[tuple[int, DataFormat, dict[str, Any]]]:
    """``(line number, the file's format, record)`` for every valid line, checked with the upload
    rules; raises ``DataError`` naming the first bad line (or a missing file)."""
    validator = FileValidator(min_examples=1, format=format)
    try:
        for raw in iter_lines(store, key):
            errors_before = validator.error_count
            obj = validator.feed(raw)
            if validator.error_count > errors_before:
                raise DataError(validator.finish().errors[-1].reason, param=param, line=validator.line)
            if obj is not None:
                yield validator.line, validator.format, obj
    except ObjectNotFound:
        raise DataError(f"file {key!r} not found in storage", param=param) from None


def _read(store, key, *, fmt, param, view, template, max_len, train_on_inputs, source=0, weight=1.0) -> tuple[list[Item], FileStats]:
    items, truncated, dropped, seen_format = [], 0, 0, None
    for line, seen_format, obj in iter_records(store, key, format=fmt, param=param):
        if (why := check_format_for_method(seen_format, Method.supervised)) is not None:
            raise DataError(why, param=param, line=line)
        try:
            example, cut = encode_record(view, template, to_sft(seen_format, obj), max_len, train_on_inputs=train_on_inputs)
        except TemplateError as err:
            raise DataError(str(err), param=param, line=line) from None
        truncated += cut
        if example.trained_tokens:
            items.append(Item(example, source, line, near_key(obj)))
        else:
            dropped += 1
    if not items:
        why = f" ({dropped} lost every trained token to max_seq_length={max_len})" if dropped else ""
        raise DataError(f"the file has no usable example{why}", param=param)
    return items, FileStats(param, key, seen_format.value, len(items), truncated, dropped, weight)


def tokenizer_view(tokenizer, chat_template: ChatTemplate | str = ChatTemplate.auto) -> tuple[TokenizerView, str]:
    """The view every tokenization goes through, and the chat template source to render with."""
    view = TokenizerView.from_hf(tokenizer)
    return view, resolve_template(chat_template, view.chat_template)


def load_dataset(store: ObjectStore, key: str, tokenizer, max_seq_length: int, *, param: str = "training_file", format: DataFormat | str = DataFormat.auto, chat_template: ChatTemplate | str = ChatTemplate.auto, train_on_inputs: bool = False) -> Dataset:
    """Read, check and tokenize one supervised file. Raises ``DataError``."""
    view, template = tokenizer_view(tokenizer, chat_template)
    items, stats = _read(store, key, fmt=format, param=param, view=view, template=template, max_len=max_seq_length, train_on_inputs=train_on_inputs)
    return Dataset(tuple(i.example for i in items), stats.truncated, stats.dropped)


def load_sft_data(store: ObjectStore, spec: JobSpec, tokenizer) -> SftData:
    """Everything a supervised recipe trains and validates on; raises ``DataError``."""
    opts, max_len = spec.data, spec.hyperparameters.max_seq_length
    view, template = tokenizer_view(tokenizer, opts.chat_template)
    common = dict(view=view, template=template, max_len=max_len, train_on_inputs=opts.train_on_inputs)
    sources = [(spec.training_file_key, opts.format, "training_file", 1.0)]
    sources += [(f.key, f.format, f"extra_training_files[{i}]", f.weight) for i, f in enumerate(opts.extra_training_files)]
    items, files = [], []
    for source, (key, fmt, param, weight) in enumerate(sources):
        read, stats = _read(store, key, fmt=fmt, param=param, source=source, weight=weight, **common)
        items += read
        files.append(stats)
    items, report = dedupe(items, remove=opts.dedupe)

    valid_items, valid_stats, held = [], None, 0
    if spec.validation_file_key:
        valid_items, valid_stats = _read(store, spec.validation_file_key, fmt=opts.format, param="validation_file", **common)
    else:  # validation_split, or the automatic split (mixing.held_out_count)
        items, valid_items = hold_out(items, opts.validation_split, spec.seed)
        held = len(valid_items)
    groups = [[i.example for i in items if i.source == s] for s in range(len(sources))]
    if not all(groups):
        empty = next(s for s, g in enumerate(groups) if not g)
        raise DataError("no example left after duplicates and the held-out split were removed", param=sources[empty][2])
    train = mix(groups, [w for *_, w in sources], spec.seed)
    rows = pack(train, max_len, spec.seed) if opts.packing else None
    stats = DataStats(
        files=tuple(files),
        validation=valid_stats,
        dedupe=report,
        held_out=held,
        valid_overlap=overlap(valid_items, items) if valid_stats else 0,
        train_examples=len(train),
        packed_rows=len(rows) if rows is not None else None,
        max_seq_length=max_len,
        split_rule=split_rule(opts.validation_split),
    )
    valid = None
    if valid_items:
        valid = Dataset(tuple(i.example for i in valid_items), valid_stats.truncated if valid_stats else 0, valid_stats.dropped if valid_stats else 0)
    truncated, dropped = sum(f.truncated for f in files), sum(f.dropped for f in files)
    return SftData(Dataset(tuple(rows if rows is not None else train), truncated, dropped), valid, stats)


def tokenize_messages(tokenizer, messages: list[dict[str, Any]], max_seq_length: int, *, tools: list[dict[str, Any]] | None = None, chat_template: ChatTemplate | str = ChatTemplate.auto, train_on_inputs: bool = False) -> tuple[Example, bool]:
    """Tokenize one conversation (``{"role", "content", "weight"?}``, with OpenAI's ``tool_calls`` /
    ``tool_call_id`` and the ``tools`` list where it calls tools); returns the example and whether it
    was truncated."""
    view, template = tokenizer_view(tokenizer, chat_template)
    record = Conversation(tuple(chat_message(m) for m in messages), tuple(tools) if tools else None)
    return encode_record(view, template, record, max_seq_length, train_on_inputs=train_on_inputs)
