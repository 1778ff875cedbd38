"""Chat templates: rendered exactly as transformers renders them, and read for their structure.

Rendering. A template is Jinja run in an `ImmutableSandboxedEnvironment` (a template from a
downloaded tokenizer directory is untrusted: it may not touch Python internals or mutate the
inputs) with the options and globals `transformers.AutoTokenizer.apply_chat_template` gives it:
trim_blocks, lstrip_blocks, the loopcontrols extension, a `{% generation %}` block (rendered as
its body; transformers uses it to mark assistant tokens), `raise_exception`, `strftime_now`, a
`tojson` that does not escape HTML, `dict` and an underscore-refusing `namespace`; the variables
are `messages`, `tools`/`documents` (None), `add_generation_prompt` and every special token the
tokenizer defines (`bos_token`, `eos_token`, `pad_token`, ...), by the names of its config.
Same inputs, same text: tests compare the two on DeepSeek-R1's, ChatML and Llama-3's templates.

Structure. Nothing about a template is assumed (no role markers, no end-of-turn names); what
SFT masking, stopping and `generate --chat` need is read off renders of the template itself:
render the conversation so far, then again with an assistant message whose content is a
sentinel. The text between the two renders up to the sentinel is the assistant *header*
(`<｜Assistant｜>`, `<|im_start|>assistant\\n`, `<|start_header_id|>assistant<|end_header_id|>
\\n\\n`); the text after the sentinel is the *turn end* (`<｜end▁of▁sentence｜>`,
`<|im_end|>\\n`, `<|eot_id|>`), whose first added token is the token a reply stops on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_ROLES = ("system", "user", "assistant")
# private-use code points: no template trims, escapes or matches them, no tokenizer merges them
SENTINEL = "\ue000nanoseek-sentinel\ue001"
Render = Callable[..., str]  # (messages, add_generation_prompt=False) -> text


class TemplateRaised(TemplateError, ValueError):
    """`raise_exception(...)` called by a template (a ValueError too, for callers that catch
    bad messages as ValueError; transformers raises a TemplateError)."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers replaces Jinja's filter: no HTML escaping, and these options exposed
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _TemplateDict:
    """`dict(...)` in a template, without the class itself (no attribute type-hackery)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _environment():
    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers' tag)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore names (no route to CPython internals)."""

        def __init__(*args, **kwargs):  # Jinja's own signature trick: `namespace(self=...)`
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a template may not set the attribute {name!r}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = Namespace
    return env


@lru_cache(maxsize=16)
def compile_template(template: str):
    """The compiled template (cached: servers render one template for every request)."""
    return _environment().from_string(template)


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in CHAT_ROLES:
            raise ValueError(f"message {i}: needs role in {CHAT_ROLES}, got {m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    **special_tokens: str | None,
) -> str:
    """Render a chat template as transformers does; `special_tokens` are the tokenizer's named
    tokens (bos_token=..., eos_token=...), None values left out as transformers leaves them."""
    check_messages(messages)
    tokens = {k: v for k, v in special_tokens.items() if v is not None}
    return compile_template(template).render(
        messages=[{"role": m["role"], "content": m["content"]} for m in messages],
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **tokens,
    )


# ------------------------------------------------------------------------------ structure
@dataclass(frozen=True)
class Turn:
    """How the template renders the assistant turn that follows a given conversation.

    header: the text before the assistant's content; turn_end: the text after it;
    generation_prompt: what `add_generation_prompt=True` appends; opened: the part of the
    generation prompt past the header, which the prompt already wrote into the reply (R1:
    "<think>\\n"), so what a reader of the reply sees first."""

    header: str
    turn_end: str
    generation_prompt: str

    @property
    def opened(self) -> str:
        gp, h = self.generation_prompt, self.header
        return gp[len(h) :] if h and gp.startswith(h) else ""


def _safe(render: Render, messages, **kw) -> str | None:
    try:
        return render(messages, **kw)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):
        return None


def assistant_turn(render: Render, messages: Sequence[Mapping[str, str]]) -> Turn:
    """The assistant turn after `messages`, read off renders with a sentinel content.
    Raises ValueError when the template does not render an assistant message's content
    verbatim after the conversation before it."""
    messages = list(messages)
    before = _safe(render, messages) if messages else _safe(render, []) or ""
    if before is None:
        raise ValueError("the chat template cannot render the conversation before the reply")
    probe = render(messages + [{"role": "assistant", "content": SENTINEL}])
    at = probe.find(SENTINEL)
    if at < 0 or not probe.startswith(before) or at < len(before):
        raise ValueError(
            "the chat template does not render an assistant message's content after the "
            "conversation before it, so the reply cannot be located"
        )
    gen = _safe(render, messages, add_generation_prompt=True) if messages else None
    prompt = gen[len(before) :] if gen is not None and gen.startswith(before) else ""
    return Turn(probe[len(before) : at], probe[at + len(SENTINEL) :], prompt)


def first_added_token(text: str, added: Sequence[str]) -> tuple[int, str] | None:
    """(position, token) of the earliest added token in `text` (the longest at a tie)."""
    best: tuple[int, str] | None = None
    for tok in added:
        at = text.find(tok) if tok else -1
        if at >= 0 and (best is None or (at, -len(tok)) < (best[0], -len(best[1]))):
            best = (at, tok)
    return best


def end_of_turn(turn_end: str, added: Sequence[str]) -> str:
    """The part of a turn end a reply must produce: up to and including its first added
    token (`<|im_end|>` of `<|im_end|>\\n`); all of it when it has none."""
    hit = first_added_token(turn_end, added)
    return turn_end if hit is None else turn_end[: hit[0] + len(hit[1])]


def assistant_spans(
    render: Render, messages: Sequence[Mapping[str, str]], added: Sequence[str]
) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [start, end) character spans of what each assistant message
    contributes as the reply: its rendered content and the end of its turn up to the first
    added token, never its header nor what follows the end-of-turn token).

    Each prefix of the conversation must render as a prefix of the whole (turn after turn);
    a template that rewrites earlier turns (drops a system message placed late, strips old
    reasoning) raises ValueError naming the message."""
    check_messages(messages)
    texts = [render(messages[:i]) if i else _safe(render, []) or "" for i in range(len(messages))]
    texts.append(render(messages))
    spans = []
    for i, (before, after) in enumerate(zip(texts, texts[1:])):
        if not after.startswith(before):
            raise ValueError(
                f"message {i} changes the text rendered before it (system messages must come first)"
            )
        if messages[i]["role"] != "assistant":
            continue
        turn = assistant_turn(render, messages[:i])
        piece = after[len(before) :]
        if not piece.startswith(turn.header):
            raise ValueError(f"assistant message {i} does not start with {turn.header!r}")
        start, end = len(before) + len(turn.header), len(after)
        if turn.turn_end and piece.endswith(turn.turn_end):
            end -= len(turn.turn_end) - len(end_of_turn(turn.turn_end, added))
        spans.append((start, end))
    return texts[-1], spans
