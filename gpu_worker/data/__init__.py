"""Training data: JSONL files in the object store to labelled, optionally packed, batches.

The recipes' interface (stable names; import them from ``gpu_worker.data``):

- ``load_sft_data(store, spec, tokenizer) -> SftData(train, valid, stats)``: every supervised file of
  the job (``spec.training_file_key`` + ``spec.data.extra_training_files``, each in its declared or
  detected format: chat (with OpenAI tool calling), ShareGPT, Alpaca, completion, raw text), checked line by line, tokenized
  with ``spec.data.chat_template`` (loss on assistant tokens, or everything with
  ``train_on_inputs``), deduplicated (``dedupe``), split (``validation_split`` when there is no
  validation file), mixed by weight and packed (``packing``). ``train.examples`` are rows to batch;
  ``valid`` is never packed (None when there is no validation data); emit ``stats.log_events()``.
- ``epoch_batches(n, batch_size, seed, epoch)`` / ``sequential_batches(n, batch_size)``: indices of
  each batch; ``DataPosition`` is what a checkpoint stores to resume the stream exactly.
- ``collate(rows, pad_token_id, device=None, packing=None, width=None)``: a dict to call the model with,
  rows padded to the longest or to ``width`` (SFT passes ``max_seq_length`` for packed rows: one shape). Plain
  rows give ``input_ids``, ``attention_mask``, ``labels``; packed rows give ``input_ids``,
  ``labels``, ``position_ids`` (restarting per example), ``use_cache`` (a False 0-d tensor) and NO
  ``attention_mask``: transformers then keeps attention inside each example, but only with no KV
  cache, so pass the batch whole (``model(**batch)``) and never override ``use_cache=True``. Count tokens with ``token_counts(rows)`` -> (trained,
  processed), not from ``attention_mask``, which packed batches do not have.
- ``load_dataset(store, key, tokenizer, max_seq_length, param=..., format=..., chat_template=...,
  train_on_inputs=...) -> Dataset``: one file, nothing else done (evaluation sets, tests).
- ``iter_records(store, key, format=..., param=...)``: (line, format, record) of every valid line
  of any format, for recipes that tokenize their own (preference, KTO, prompts).
- ``DataError(message, param=, line=)``: a file that cannot train; the message names the line.

Submodules: ``formats`` (record -> conversation or segments), ``templates`` (chat templates and the
renderer), ``encoding`` (tokens and labels, shared with ``gpu_worker.tokencount``), ``packing``,
``mixing`` (weights, held-out split), ``dedupe``, ``batches``, ``dataset`` (the loaders).
"""

from gpu_worker.data.batches import DataPosition, collate, epoch_batches, sequential_batches, token_counts
from gpu_worker.data.dataset import (
    DataError,
    Dataset,
    DataStats,
    FileStats,
    SftData,
    iter_records,
    load_dataset,
    load_sft_data,
    tokenize_messages,
    tokenizer_view,
)
from gpu_worker.data.encoding import IGNORE_INDEX, Example, TokenizerView, encode_record
from gpu_worker.data.packing import pack

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DataPosition",
    "DataStats",
    "Dataset",
    "Example",
    "FileStats",
    "SftData",
    "TokenizerView",
    "collate",
    "encode_record",
    "epoch_batches",
    "iter_records",
    "load_dataset",
    "load_sft_data",
    "pack",
    "sequential_batches",
    "token_counts",
    "tokenize_messages",
    "tokenizer_view",
]
