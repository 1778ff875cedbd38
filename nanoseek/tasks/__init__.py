"""Verifiable task families: generation, train/test split, answer extraction and checking.

Pure Python (no torch). Built-in tasks, registered on import:
`arithmetic` (+ - * mixed), `addition`, `subtraction`, `multiplication`, `countdown`,
`linear_equation`. Add your own with `register_task` or from a JSONL file with `JsonlTask`
(`resolve_task` turns a `--task` value, name or file, into a Task).

    from nanoseek.tasks import get_task, format_prompt
    task = get_task("countdown")
    problem = task.generate(1, split="test", seed=0, level=3)[0]
    prompt = format_prompt(problem.question)          # ends in "Assistant: <think>"
    reward = float(task.verify_completion(problem, completion))
"""

from nanoseek.tasks import arithmetic, countdown, linear_equation  # noqa: F401 - registers tasks
from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tasks.base import (
    SPLITS,
    TASKS,
    TEST_FRACTION,
    Problem,
    Task,
    TaskError,
    get_task,
    list_tasks,
    register_task,
    split_of,
)
from nanoseek.tasks.countdown import CountdownTask
from nanoseek.tasks.extract import (
    answers_match,
    check_format,
    extract_answer,
    extract_boxed,
    extract_last_number,
    extract_tag,
    parse_number,
)
from nanoseek.tasks.jsonl import JsonlTask, is_task_file, load_jsonl
from nanoseek.tasks.linear_equation import LinearEquationTask
from nanoseek.tasks.resolve import resolve_task
from nanoseek.tasks.safe_eval import SafeEvalError, safe_eval, try_eval
from nanoseek.tasks.templates import (
    R1_ZERO_SYSTEM,
    TEMPLATES,
    format_chat,
    format_completion,
    format_document,
    format_prompt,
)

__all__ = [
    "SPLITS",
    "TASKS",
    "TEMPLATES",
    "TEST_FRACTION",
    "R1_ZERO_SYSTEM",
    "ArithmeticTask",
    "CountdownTask",
    "JsonlTask",
    "LinearEquationTask",
    "Problem",
    "SafeEvalError",
    "Task",
    "TaskError",
    "answers_match",
    "check_format",
    "extract_answer",
    "extract_boxed",
    "extract_last_number",
    "extract_tag",
    "format_chat",
    "format_completion",
    "format_document",
    "format_prompt",
    "get_task",
    "is_task_file",
    "list_tasks",
    "load_jsonl",
    "parse_number",
    "register_task",
    "resolve_task",
    "safe_eval",
    "split_of",
    "try_eval",
]
