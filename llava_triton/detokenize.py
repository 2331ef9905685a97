"""Token ids to text deltas for streaming: incremental detokenization and stop strings.

Every delta a `TextStream` returns is final: the deltas joined equal
`tokenizer.decode(ids, skip_special_tokens=True)` of all the ids pushed, whenever the stream
ends. Decoding token by token would break multi-byte characters and the leading-space rules of
SentencePiece/BPE tokenizers, so each step decodes a short window of ids and returns only the
part that is new and that no later token can change:

- Text ending in U+FFFD (an incomplete UTF-8 sequence of a byte-level BPE) waits for the next token.
- A run of byte-fallback tokens (`<0x00>`..`<0xFF>`, SentencePiece-style tokenizers) waits until a
  token that is not a byte ends it: the decoder turns a run that is not valid UTF-8 into one
  U+FFFD per byte, so an appended byte can rewrite text the run already decoded to (`<0x61>`
  alone is "a"; followed by `<0xE4>` and a word, both are U+FFFD).
  Ids that `skip_special_tokens` drops (special tokens, ids past the tokenizer's vocabulary) do
  not end a run: the decoder never sees them.

The tokenizers library's `DecodeStream` makes neither guarantee (it emits a valid byte run at
once and fails on the rewrite), hence this class.

Stop strings act on the same final text: text that may be the start of a stop string is held
back until it is known not to be, so a streamed answer never shows a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

_INCOMPLETE = "\ufffd"  # what a tokenizer decodes a partial UTF-8 sequence to
BYTE_FALLBACK_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))


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


class Detokenizer:
    """What streaming needs to know of one tokenizer, worked out once (a `TextStream` per request
    shares it): its decode, its byte-fallback ids, and the ids its decode skips."""

    def __init__(self, tokenizer: Any) -> None:
        self.decode = fast_decoder(tokenizer)
        vocab = tokenizer.get_vocab()
        self.byte_ids = frozenset(vocab[token] for token in BYTE_FALLBACK_TOKENS if token in vocab)
        self._vocab_ids = frozenset(vocab.values())
        self._special_ids = frozenset(
            [token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special]
            + list(tokenizer.all_special_ids))

    def is_skipped(self, token_id: int) -> bool:
        """Whether `decode(..., skip_special_tokens=True)` drops the id (the decoder never sees it)."""
        return token_id in self._special_ids or token_id not in self._vocab_ids


class TextStream:
    def __init__(self, detokenizer: Detokenizer, stop: Sequence[str] = ()):
        self.detokenizer = detokenizer
        self._decode = detokenizer.decode
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # ids before this are already in `text`
        self._open_byte_run = False  # the last id the decoder sees is a byte-fallback token
        self.text = ""  # the final text so far (its tail may be held back for the stop strings)
        self._emitted = 0  # characters of `text` already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that can be shown now ("" if none yet)."""
        if self.stopped:
            return ""
        token_id = int(token_id)
        self.ids.append(token_id)
        if token_id in self.detokenizer.byte_ids:
            self._open_byte_run = True
        elif not self.detokenizer.is_skipped(token_id):
            self._open_byte_run = False
        if not self._open_byte_run:
            self._read(final=False)
        return self._release()

    def finish(self) -> str:
        """The generation ended: return whatever is still held back."""
        if not self.stopped and self._read_offset < len(self.ids):
            self._read(final=True)
        return self._release(final=True)

    def _read(self, final: bool) -> None:
        """Move the window's new text into `text` if it is final (or the stream is)."""
        window = self.ids[self._prefix_offset:]
        read = self._read_offset - self._prefix_offset
        prefix = self._decode(window[:read])
        full = self._decode(window)
        if final or (len(full) > len(prefix) and not full.endswith(_INCOMPLETE)):
            # The window starts where an earlier read ended (a character and byte-run boundary), so
            # its first `read` ids decode to the same text alone as followed by the new ones.
            self.text += full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)

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
