"""Built-in base models: small models the platform creates locally, with no model hub.

"tuneforge-tiny" is a tiny randomly initialised ``LlamaForCausalLM`` with a byte-level BPE tokenizer
trained here, with the ``tokenizers`` library, on a small embedded corpus. It exists so that the whole
platform (training, serving, the README demo) runs on a laptop CPU with no download: the random model
knows nothing, and a LoRA fine-tune visibly teaches it a task.

Creation is deterministic (fixed seed, fixed corpus: the same bytes every time), cached under
``<data_dir>/models/<name>/`` and safe against two processes creating it at once: the first takes an
``fcntl`` lock, builds into a temporary folder next to the target and renames it into place; the
second waits for the lock and finds the finished folder.

The name is also ``scheduler.settings.BUILTIN_BASE_MODEL``; it is repeated here because the worker
never imports the control plane (a test checks the two agree).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

# ChatML with {% generation %} markers, so transformers can return an assistant-token mask (loss only
# on what the assistant says, its <|im_end|> included); kept with the torch-free templates.
from gpu_worker.data.templates import CHATML_TEMPLATE

TINY = "tuneforge-tiny"

CHATML_SPECIAL_TOKENS = ("<pad>", "<s>", "<|im_start|>", "<|im_end|>")

# A small, fixed English corpus: enough for BPE merges of common words, chat roles and the kind of
# short reviews and questions the demo uses. Changing it changes the built-in model (and its hash).
_CORPUS = """
You are a helpful assistant. The user asks a question and the assistant answers it.
system user assistant question answer review sentiment positive negative neutral
Classify the sentiment of this review. Answer with one word: positive or negative.
The food was great and the service was friendly. I loved the fresh bread and the warm soup.
The room was dirty, the staff was rude and the coffee was cold. A terrible and awful night.
This movie is wonderful, the story is brilliant and the actors are excellent and charming.
The book was boring, the plot was weak and the ending was disappointing and dull.
What a fantastic product: reliable, fast, elegant and cheap. I would recommend it to a friend.
Broken on arrival, slow, noisy and expensive. The worst purchase I have made this year.
The weather today is sunny with a light wind from the west, and tomorrow it will rain.
One, two, three, four, five, six, seven, eight, nine, ten. First, second, third, last.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday morning afternoon evening night
The quick brown fox jumps over the lazy dog while the cat sleeps near the window.
Please summarize the following text in one sentence. Translate this sentence into French.
What is the capital of France? Paris is the capital of France. Who wrote this letter?
The garden was beautiful, the flowers were bright and the hosts were kind and generous.
The hotel was noisy, the bed was hard and the price was too high for such a poor place.
We had a pleasant stay: clean rooms, tasty food, lovely views and a perfect location.
Customer support never answered, the app crashed often and the update made it worse.
Great, good, nice, superb, amazing, delightful, happy, glad, enjoyable, impressive.
Bad, poor, horrible, ugly, sad, angry, annoying, awful, mediocre, unpleasant, broken.
I think that it is a very good idea, but we should ask them before we start the work.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Symbols: , . ; : ! ? ( ) [ ] { } " ' - + = / * %
def main(): return print("hello world") if x > 0 else None  # code comments and variables
"""


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """Architecture of a built-in model. Sizes were chosen with the demo task (see
    scheduler/demo_data.py): small enough to train in about a minute on two CPU cores."""

    vocab_size: int  # BPE target; the real size is the trained vocabulary, padded to a multiple of 64
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    # Larger than Llama's 0.02: with a frozen random lm_head the logit margin a LoRA can reach grows
    # with the weight scale; at 0.02 the tiny model could not become confident in one answer token.
    initializer_range: float
    seed: int


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    TINY: BuiltinModel(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        initializer_range=0.05,
        seed=1234,
    ),
}


class UnknownBuiltinModel(KeyError):
    pass


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


def builtin_path(name: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "models" / name


def ensure_builtin(name: str, data_dir: str | os.PathLike) -> Path:
    """Return the folder of built-in model ``name``, creating it on first use (process-safe)."""
    if name not in BUILTIN_MODELS:
        raise UnknownBuiltinModel(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    target = builtin_path(name, data_dir)
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _complete(target):  # another process built it while we waited for the lock
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
            try:
                _build(BUILTIN_MODELS[name], tmp)
                (tmp / _MARKER).write_text("ok\n")
                if target.exists():  # a leftover without its marker: an interrupted older build
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


_MARKER = ".complete"


def _complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def build_tokenizer(vocab_size: int):
    """Train the byte-level BPE tokenizer on the embedded corpus (deterministic) and wrap it for
    transformers, with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so frequent words win merges over one-off pairs; a single thread-free pass
    # over a fixed list keeps the result identical from run to run.
    lines = [line for line in _CORPUS.strip().splitlines() if line.strip()]
    # Each word once more on its own line, so the forms that follow a newline (a chat role, the
    # first word of an answer) get merges too, not only the space-prefixed ones.
    words = sorted({w for line in lines for w in re.findall(r"[A-Za-z]+", line)})
    tok.train_from_iterator(lines * 4 + words * 2, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def _build(spec: BuiltinModel, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(spec.vocab_size)
    vocab = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    # Fork the RNG so building the model never disturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
