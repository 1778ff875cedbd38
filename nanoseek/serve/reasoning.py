"""Split R1-style output into `reasoning_content` (inside `<think>...</think>`) and `content`.

DeepSeek-R1 writes its chain of thought between `<think>` and `</think>`, then the answer
[R1 §2.3]. The API returns the two separately: DeepSeek's own API and most UIs
read `reasoning_content`. Two ways the output can start:
- the chat template already opened the block (our template ends the generation prompt with
  `<think>\\n`, as R1's does), so the output starts *inside* the thought: `opened=True`;
- the template did not open it and the model writes `<think>` itself, as its first text.
A thought with no closing tag (the model ran out of tokens) is all reasoning and no content.

`ReasoningSplitter` works on streamed text deltas, where a tag can arrive in pieces
(`"</th"` then `"ink>"`, since the tag is one token for our tokenizer but several for others,
and the engine holds text back around stop strings): a tail that could still begin a tag is held
until the next delta decides. Whitespace between the parts (`"</think>\\n\\n"`) is dropped:
leading whitespace of both parts and trailing whitespace of the reasoning. Feeding the whole
text at once gives exactly the concatenation of the streamed pieces, so streamed and
non-streamed responses agree.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


def prompt_opens_think(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves a think block open (the output starts inside it)."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Incremental splitter; `feed(delta)` per text delta, then `finish()` once at the end."""

    def __init__(self, opened: bool = False):
        # start: nothing seen yet (a `<think>` may still come); think: inside; content: after
        self.state = "think" if opened else "start"
        self.buf = ""  # text not yet assigned to a part
        self.ws = ""  # reasoning whitespace held until we know it is not the trailing kind
        self.started_reasoning = False  # leading whitespace of each part is dropped
        self.started_content = False

    def feed(self, text: str) -> Split:
        out = Split()
        self.buf += text
        while self.buf:
            if self.state == "start":
                stripped = self.buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.state, self.buf = "think", stripped[len(THINK_OPEN) :]
                elif THINK_OPEN.startswith(stripped):  # "", "<", "<th"...: wait for more
                    break
                else:
                    self.state = "content"
            elif self.state == "think":
                end = self.buf.find(THINK_CLOSE)
                if end >= 0:
                    out.reasoning += self._reasoning(self.buf[:end], final=True)
                    self.state, self.buf = "content", self.buf[end + len(THINK_CLOSE) :]
                    continue
                keep = _partial_suffix(self.buf, THINK_CLOSE)
                cut = len(self.buf) - keep
                out.reasoning += self._reasoning(self.buf[:cut], final=False)
                self.buf = self.buf[cut:]
                break
            else:  # content: everything, less the leading whitespace
                text, self.buf = self.buf, ""
                if not self.started_content:
                    text = text.lstrip()
                    self.started_content = bool(text)
                out.content += text
        return out

    def finish(self) -> Split:
        """The text still held back (a partial tag is ordinary text after all)."""
        out = Split()
        if self.state == "think":
            out.reasoning = self._reasoning(self.buf, final=True)
        elif self.buf.strip():  # start state with a partial "<thi": content
            out.content = self.buf.lstrip()
        self.buf = ""
        return out

    def _reasoning(self, text: str, final: bool) -> str:
        """Reasoning text with leading whitespace dropped and trailing whitespace held back
        (and dropped when the thought ends)."""
        if not self.started_reasoning:
            text = text.lstrip()
            self.started_reasoning = bool(text)
        text = self.ws + text
        body = text.rstrip()
        self.ws = "" if final else text[len(body) :]
        return body


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str | None]:
    """Whole-text split: (reasoning_content, content), None for a part that is empty."""
    s = ReasoningSplitter(opened)
    a, b = s.feed(text), s.finish()
    reasoning, content = a.reasoning + b.reasoning, a.content + b.content
    return reasoning or None, content or None
