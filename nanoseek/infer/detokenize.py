"""Incremental detokenisation with stop strings: text deltas that never show a stop string.

Decoding token by token is wrong for byte-level BPE: one character (an emoji, a CJK glyph) may
span several tokens, and a lone token decodes to U+FFFD. `Detokenizer` re-decodes a short window
(`prefix_offset`..) and only releases text once it no longer ends in U+FFFD (the offsets scheme
of vLLM and text-generation-inference), so the cost per token stays constant.

Stop strings (OpenAI `stop`): the text is cut where the first stop string begins, and the stop
string itself is never returned. While the tail of the text could still be the start of a stop
string it is held back, so a streamed delta never has to be taken back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class TextDecoder(Protocol):  # nanoseek.data.tokenizer.Tokenizer, or anything with `decode`
    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str: ...


class Detokenizer:
    def __init__(
        self, tokenizer: TextDecoder, stop: Sequence[str] = (), skip_special_tokens: bool = True
    ):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0  # decode window: ids[prefix_offset:]
        self.text = ""  # all complete text so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of `text` already returned
        self.stopped: str | None = None  # the stop string that ended the text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        # an incomplete UTF-8 sequence at the end decodes to U+FFFD: wait for the next token
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def add(self, token_id: int) -> str:
        """Feed one token; returns the new text that is safe to show (maybe ""). After a stop
        string is found `stopped` is set and nothing more is returned."""
        if self.stopped is not None:
            return ""
        self.ids.append(token_id)
        self._advance(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """The text still held back, at the end of the generation."""
        if self.stopped is not None:
            return ""
        self._advance(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stop:
            # a stop string may straddle the previous delta: search from before `emitted`
            longest = max(len(s) for s in self.stop)
            lo = max(0, self.emitted - longest + 1)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, lo)) >= 0]
            if hits:
                cut, self.stopped = min(hits)
                self.text = self.text[:cut]
                end = cut
            elif not final:
                end -= _held_back(self.text, self.stop)
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
