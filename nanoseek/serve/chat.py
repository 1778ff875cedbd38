"""`nanoseek chat`: a multi-turn terminal chat that streams, with thinking set apart.

On a terminal the thought is dim and the answer plain; elsewhere (a pipe, a file, NO_COLOR) the
parts are labelled `[thinking]` and `[answer]`, so a script can drive the chat line by line:

    printf 'hi\\n/reset\\nwhat is 2+2?\\n' | nanoseek chat runs/r1/model

Commands: /exit (or /quit, or end of input), /reset (forget the conversation), /help.
Only the answers go back into the history, not the thoughts: R1's template drops earlier
reasoning, and it would eat the context. When the history no longer fits the context the
oldest turns are dropped.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.serve.reasoning import ReasoningSplitter, Split, prompt_opens_think

DIM, RESET = "\033[2;3m", "\033[0m"  # dim italic: the thought
HELP = "commands: /exit (or end of input) leaves, /reset starts a new conversation, /help"
MIN_NEW_TOKENS = 16  # drop old turns rather than leave the answer less room than this


class ChatSession:
    """The conversation and its replies; one request at a time through `engine.stream`."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        params: SamplingParams,
        system: str | None = None,
    ):
        self.engine, self.tokenizer, self.params = engine, tokenizer, params
        self.system = system
        self.history: list[dict[str, str]] = []
        self.last_stats = ""

    def reset(self) -> None:
        self.history = []

    def _prompt(self, user: str) -> tuple[list[int], str, int]:
        """(prompt ids, rendered text, max new tokens), dropping the oldest turns to fit."""
        context = self.engine.max_seq_len - self.engine.num_draft
        while True:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages += self.history + [{"role": "user", "content": user}]
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            ids = self.tokenizer.encode(text)  # the rendered template starts with bos already
            room = context - len(ids)
            if room >= min(MIN_NEW_TOKENS, self.params.max_new_tokens) or not self.history:
                break
            self.history = self.history[2:]  # the oldest user + assistant pair
        if room < 1:
            raise ValueError(
                f"the message is {len(ids)} tokens with the template; the context is {context}"
            )
        return ids, text, min(room, self.params.max_new_tokens)

    def reply(self, user: str) -> Iterator[Split]:
        """Stream the reply to `user` as (reasoning, content) parts; the answer joins the
        history when the stream ends (also when it is interrupted)."""
        ids, text, n_new = self._prompt(user)
        params = dataclasses.replace(self.params, max_new_tokens=n_new)
        splitter = ReasoningSplitter(prompt_opens_think(text))
        answer, n, reason, t0 = [], 0, None, time.perf_counter()
        try:
            for delta in self.engine.stream([ids], params):
                part = splitter.feed(delta.text)
                n += len(delta.token_ids)
                reason = delta.finish_reason or reason
                if delta.finished:
                    tail = splitter.finish()
                    part.reasoning += tail.reasoning
                    part.content += tail.content
                answer.append(part.content)
                if part:
                    yield part
        finally:
            self.history += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": "".join(answer)},
            ]
            dt = time.perf_counter() - t0
            self.last_stats = f"{n} tokens, {n / max(dt, 1e-9):.1f} tokens/s, {reason or 'stopped'}"


class Printer:
    """Writes streamed parts: dim thought and plain answer, or `[thinking]`/`[answer]` labels."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.mode: str | None = None  # the part being written: None, "reasoning", "content"

    def write(self, part: Split) -> None:
        if part.reasoning:
            if self.mode != "reasoning":
                self.out.write("" if self.color else "[thinking] ")
                self.mode = "reasoning"
            # style each piece on its own, so an interrupt never leaves the terminal dim
            self.out.write(f"{DIM}{part.reasoning}{RESET}" if self.color else part.reasoning)
        if part.content:
            if self.mode != "content":
                gap = "\n\n" if self.mode == "reasoning" else ""
                self.out.write(gap if self.color else gap[:1] + "[answer] ")
                self.mode = "content"
            self.out.write(part.content)
        self.out.flush()

    def end(self) -> None:
        if self.mode is None and not self.color:
            self.out.write("[answer] ")
        self.out.write("\n")
        self.out.flush()
        self.mode = None


def _read_line(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    """The next line, None at end of input; a terminal gets readline editing and history."""
    if interactive and stdin is sys.stdin and stdout is sys.stdout:
        # optional: not on every platform; importing it gives input() line editing, which only
        # a terminal is to get
        import readline  # noqa: F401

        try:
            return input(">>> ")
        except EOFError:
            stdout.write("\n")
            return None
    if interactive:
        stdout.write(">>> ")
        stdout.flush()
    return stdin.readline() or None


def run_chat(
    session: ChatSession,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    color: bool | None = None,
) -> int:
    """The read-reply loop (default streams: sys.std*); returns 0 at /exit or end of input.
    color None: dim the thinking when stdout is a terminal, else label it."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    if color is None:
        color = stdout.isatty()
    if interactive:
        print(f"chatting with the model; {HELP}", file=stderr)
    printer = Printer(stdout, color)
    while True:
        try:
            line = _read_line(stdin, stdout, interactive)
        except KeyboardInterrupt:
            stdout.write("\n")
            return 0
        if line is None:  # end of input
            return 0
        user = line.rstrip("\n").strip()
        if not user:
            continue
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            session.reset()
            print("(conversation reset)", file=stderr if interactive else stdout)
            continue
        if user == "/help" or (user.startswith("/") and " " not in user):
            print(HELP, file=stderr if interactive else stdout)
            continue
        try:
            for part in session.reply(user):
                printer.write(part)
        except KeyboardInterrupt:  # stops this reply, not the chat
            printer.write(Split(content=" [interrupted]"))
        except ValueError as e:
            print(f"error: {e}", file=stderr)
            continue
        printer.end()
        if interactive:
            print(
                f"{DIM if color else ''}({session.last_stats}){RESET if color else ''}", file=stderr
            )
