"""Token ids to text deltas for streaming: incremental detokenization and stop strings.

Decoding token by token breaks multi-byte characters and the leading-space rules of
SentencePiece/BPE tokenizers, so each step decodes a short window of ids and emits only the
part that is new and complete. Text that may be the start of a stop string is held back
until it is known not to be, so a streamed answer never shows a stop string.
"""

from __future__ import annotations

from typing import Callable, Sequence

_INCOMPLETE = "\ufffd"  # what a tokenizer decodes a partial UTF-8 sequence to


def fast_decoder(tokenizer) -> Callable[[Sequence[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, without transformers' Python layer.

    Streaming decodes twice per token per sequence, and transformers' wrapper (argument
    conversion, clean-up options) costs several times the Rust decode itself. A fast tokenizer
    that does no clean-up (LLaVA's Llama tokenizer, our embedded one) decodes to exactly what
    its backend returns, so that is called directly; anything else keeps `decode`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return lambda ids: backend.decode(list(ids), skip_special_tokens=True)


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = (), decode: Callable[[Sequence[int]], str] | None = None):
        self.tokenizer = tokenizer
        self._decode = decode or fast_decoder(tokenizer)
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # ids before this are already in `text`
        self.text = ""  # everything decoded so far (may end with held-back text)
        self._emitted = 0  # characters of `text` already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that can be shown now ("" if none yet)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self._prefix_offset: self._read_offset])
        full = self._decode(self.ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(_INCOMPLETE):
            self.text += full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release()

    def finish(self) -> str:
        """The generation ended: return whatever is still held back."""
        if not self.stopped and self._read_offset < len(self.ids):
            prefix = self._decode(self.ids[self._prefix_offset: self._read_offset])
            full = self._decode(self.ids[self._prefix_offset:])
            self.text += full[len(prefix):]
            self._read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool = False) -> str:
        if self.stop and not self.stopped:
            # Only the new text (plus a stop string's length of the old) can contain a new match.
            search_from = max(0, self._emitted - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        delta = self.text[self._emitted: end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest
