"""Prompt templates and training-document formats.

The R1-Zero template is the one from the R1 paper [R1 §2.2.3, Table 1]. Every stage uses these
functions so the format a model sees in pre-training, SFT and GRPO is byte-for-byte the same; the
most common GRPO failure, a format reward stuck at 0, is a template or prefill mismatch between
stages.

Invariant (tested): `format_prompt(q) + format_completion(p) == format_document(p)`, i.e. a
rollout that starts from the prefilled prompt and writes the worked solution reproduces the
pre-training document exactly.
"""

from __future__ import annotations

from nanoseek.tasks.base import Problem, TaskError
from nanoseek.tasks.extract import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

R1_ZERO_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>."
)

# `{question}` is substituted with str.replace, not str.format, so braces in a question are safe.
TEMPLATES: dict[str, str] = {
    # the paper's template: instruction, then the turn markers
    "r1zero": R1_ZERO_SYSTEM + " User: {question}\nAssistant:",
    # the same turn markers without the instruction, for byte/char-level tokenizers and very
    # short contexts (the think/answer tags are learnt from the documents themselves)
    "short": "User: {question}\nAssistant:",
}


def _template(name: str) -> str:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TaskError(
            f"unknown template {name!r}; valid templates: {', '.join(TEMPLATES)}"
        ) from None


def format_prompt(question: str, template: str = "r1zero", *, prefill: bool = True) -> str:
    """The prompt for `question`; with `prefill` it ends in "Assistant: <think>".

    Prefilling `<think>` (as TinyZero and Mini-R1 do) makes the model start reasoning at once;
    pair it with `check_format(..., prefilled=True)`.
    """
    text = _template(template).replace("{question}", question)
    return f"{text} {THINK_OPEN}" if prefill else text


def format_completion(problem: Problem, *, prefilled: bool = True) -> str:
    """The ideal completion: `<think>{solution}</think> <answer>{answer}</answer>`.

    With `prefilled=True` the leading `<think>` is omitted (the prompt already holds it).
    """
    body = f"{problem.solution}{THINK_CLOSE} {ANSWER_OPEN}{problem.answer}{ANSWER_CLOSE}"
    return body if prefilled else THINK_OPEN + body


def format_document(problem: Problem, template: str = "r1zero") -> str:
    """A complete training document: prompt, worked solution in `<think>`, answer in `<answer>`."""
    return format_prompt(problem.question, template, prefill=True) + format_completion(problem)


def format_chat(
    problem: Problem, *, system: bool | str = False, include_answer: bool = True
) -> list[dict[str, str]]:
    """The problem as chat messages for SFT (or, with `include_answer=False`, as an RL prompt).

    `system=True` puts the R1-Zero instruction in a system message; a string is used verbatim.
    The assistant message is `<think>\n{solution}</think> <answer>{answer}</answer>`: the newline
    matches the generation prompt of our chat template (`nanoseek.data.tokenizer.CHAT_TEMPLATE`
    ends in "<think>\n", as DeepSeek-R1's does), so SFT targets continue exactly where a
    generation starts.
    """
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": R1_ZERO_SYSTEM if system is True else system})
    messages.append({"role": "user", "content": problem.question})
    if include_answer:
        messages.append(
            {"role": "assistant", "content": f"{THINK_OPEN}\n{format_completion(problem)}"}
        )
    return messages
