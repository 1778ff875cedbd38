import pytest

from nanoseek.tasks import (
    R1_ZERO_SYSTEM,
    TaskError,
    check_format,
    format_chat,
    format_completion,
    format_document,
    format_prompt,
    get_task,
)


def test_r1_zero_template_text():
    prompt = format_prompt("What is 2 + 2?")
    assert prompt.startswith("A conversation between User and Assistant. The user asks a question")
    assert "<think> </think> and <answer> </answer> tags" in prompt
    assert prompt.endswith("User: What is 2 + 2?\nAssistant: <think>")
    assert format_prompt("q", prefill=False).endswith("User: q\nAssistant:")
    # the short template is the tail of the full one, so a model trained on either knows both
    assert format_prompt("q").endswith(format_prompt("q", "short"))
    assert format_prompt("{q} {}").endswith("User: {q} {}\nAssistant: <think>")  # braces safe
    with pytest.raises(TaskError, match="valid templates: r1zero, short"):
        format_prompt("q", "chatml")


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "linear_equation"])
@pytest.mark.parametrize("template", ["r1zero", "short"])
def test_prompt_plus_completion_is_the_document(name, template):
    p = get_task(name).generate(1, seed=3)[0]
    completion = format_completion(p)
    assert format_prompt(p.question, template) + completion == format_document(p, template)
    assert check_format(completion)
    assert check_format(format_completion(p, prefilled=False), prefilled=False)
    assert completion.endswith(f"</think> <answer>{p.answer}</answer>")
    assert get_task(name).verify_completion(p, completion)


def test_chat_messages():
    p = get_task("linear_equation").generate(1, seed=0)[0]
    messages = format_chat(p)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == p.question
    assistant = messages[1]["content"]
    assert assistant.startswith("<think>\n") and assistant.endswith(f"<answer>{p.answer}</answer>")
    assert check_format(assistant, prefilled=False)
    with_system = format_chat(p, system=True, include_answer=False)
    assert with_system == [
        {"role": "system", "content": R1_ZERO_SYSTEM},
        {"role": "user", "content": p.question},
    ]
    assert format_chat(p, system="Be brief.")[0] == {"role": "system", "content": "Be brief."}
