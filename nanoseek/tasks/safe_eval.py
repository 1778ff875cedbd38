"""Exact arithmetic on untrusted text: model completions and user files.

Footgun: never hand model output to Python's `eval`. `__import__('os').system(...)` is one string
away, and even "harmless" arithmetic like `9**9**9` hangs the process. R1-Zero reproductions
(TinyZero, Mini-R1) check countdown answers with a character whitelist plus a safe
evaluator; this is ours:

1. a length limit and a character whitelist (ASCII digits, `+ - * / ( ) .`, spaces), so names,
   attribute access, calls, strings and `**` cannot be spelled at all;
2. `ast.parse` and a walk over a whitelist of nodes (numbers, binary `+ - * /`, unary `-`/`+`);
   anything else, including `**` and `//`, is rejected by node type as a second line of defence;
3. `Fraction` arithmetic, so `1 / 3 * 3 == 1` exactly and no float rounding can fake a hit.

Division by zero and every malformed input raise `SafeEvalError`, never anything else.
"""

from __future__ import annotations

import ast
from fractions import Fraction

MAX_EXPR_CHARS = 256  # bounds work: the largest value has ~MAX_EXPR_CHARS digits
ALLOWED_CHARS = frozenset("0123456789+-*/(). ")

_BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class SafeEvalError(ValueError):
    """The text is not a plain arithmetic expression, or it has no value (division by zero)."""


def parse_safe(
    expr: str, *, max_chars: int = MAX_EXPR_CHARS, allow_decimals: bool = True
) -> ast.expr:
    """Parse `expr` into a syntax tree that uses whitelisted nodes only.

    Raises `SafeEvalError` for text over `max_chars`, any character outside `ALLOWED_CHARS`, a
    syntax error (including Python's refusal of leading zeros such as `007`), or a node outside the
    whitelist. With `allow_decimals=False` only integer literals are accepted.
    """
    if not isinstance(expr, str):
        raise SafeEvalError(f"expected a string, got {type(expr).__name__}")
    if len(expr) > max_chars:
        raise SafeEvalError(f"expression longer than {max_chars} characters")
    bad = sorted(set(expr) - ALLOWED_CHARS)
    if bad:
        raise SafeEvalError(f"characters not allowed: {''.join(bad)!r}")
    text = expr.strip()
    if not text:
        raise SafeEvalError("empty expression")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        # RecursionError/MemoryError: deeply nested input that still fits the length limit
        raise SafeEvalError(f"not a valid expression: {expr!r}") from err
    _check(tree.body, allow_decimals)
    return tree.body


def _check(node: ast.AST, allow_decimals: bool) -> None:
    """Reject any node outside the whitelist (iterative: no recursion limit on odd input)."""
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Constant):
            # type() not isinstance(): bool is an int subclass (unreachable via the charset anyway)
            if type(node.value) is int or (allow_decimals and type(node.value) is float):
                continue
            raise SafeEvalError(f"number not allowed: {node.value!r}")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            stack.append(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            stack.extend((node.left, node.right))
        else:
            raise SafeEvalError(f"operation not allowed: {type(node).__name__}")


def evaluate(node: ast.expr) -> Fraction:
    """Exact value of a tree returned by `parse_safe`; raises SafeEvalError on division by zero."""
    if isinstance(node, ast.Constant):
        if type(node.value) is float:
            # repr() is the shortest string that round-trips, so the literal 0.1 becomes 1/10,
            # not the binary double 3602879701896397/36028797018963968
            return Fraction(repr(node.value))
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        value = evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise SafeEvalError("division by zero")
        return _BINARY_OPS[type(node.op)](left, right)
    raise SafeEvalError(f"operation not allowed: {type(node).__name__}")


def safe_eval(
    expr: str, *, max_chars: int = MAX_EXPR_CHARS, allow_decimals: bool = True
) -> Fraction:
    """Exact value of an arithmetic expression from untrusted text; raises SafeEvalError."""
    try:
        return evaluate(parse_safe(expr, max_chars=max_chars, allow_decimals=allow_decimals))
    except RecursionError as err:  # a few hundred nested unary minuses, say
        raise SafeEvalError("expression nested too deeply") from err


def try_eval(expr: str, **kwargs) -> Fraction | None:
    """`safe_eval`, but None instead of an exception: for reward functions."""
    try:
        return safe_eval(expr, **kwargs)
    except SafeEvalError:
        return None


def integer_literals(node: ast.expr) -> list[int]:
    """The integer literals of a parsed expression, left to right (countdown's multiset check)."""
    # ast.walk is breadth-first; sort by source position so the order is the reading order
    nodes = [n for n in ast.walk(node) if isinstance(n, ast.Constant) and type(n.value) is int]
    nodes.sort(key=lambda n: (n.lineno, n.col_offset))
    return [n.value for n in nodes]
