"""Incremental detokenisation with stop strings, for streaming text token by token.

Decoding each new token on its own is wrong for byte-level and SentencePiece vocabularies (a character
can span tokens, a leading space depends on the previous token), and decoding the whole output every
step is quadratic. This keeps a short window, as vLLM and TGI do: the text of ``ids[prefix:]`` minus the
text of ``ids[prefix:read]`` is what the newest tokens add, held back while it ends in an incomplete
character. The window starts with a few prompt tokens so the first output token decodes with its
context (its leading space included).

Stop strings: text is emitted only once no stop string can still begin in it; when one appears the text
is cut just before it.
"""

from __future__ import annotations

# Prompt tokens used as decoding context for the first output tokens (vLLM uses the same number).
_CONTEXT_TOKENS = 5


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self.text = ""  # decoded output so far (cut at a stop string once one is found)
        self._emitted = 0  # characters of ``text`` handed out so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that may be emitted now (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        self._advance(final=False)
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """Everything still held back, once no more tokens will come: an incomplete character at the
        very end decodes as U+FFFD, as ``tokenizer.decode`` of the whole output would show it."""
        if not self.stopped:
            self._advance(final=True)
        return self._release(final=True)

    def _advance(self, *, final: bool) -> None:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            start = len(self.text)
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._find_stop(start)

    def _find_stop(self, start: int) -> None:
        if not self._stop:
            return
        longest = max(map(len, self._stop))
        # A stop string may straddle what was already there and the new text.
        search_from = max(0, start - longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _release(self, *, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self._emitted)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best
