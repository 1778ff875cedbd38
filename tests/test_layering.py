"""nanoseek's dependencies run one way: no import cycles, and no layer imports one above it.

Every module of nanoseek/ is parsed with `ast` (nothing is imported), and every import counts:
at module level, inside a function, under TYPE_CHECKING. A function-local import is as much a
dependency as one at the top; it only hides it. The groups and their order:

    config, tasks, data, model; fsio, presets, machine, malloc, analysis    the bottom
    checkpoint, fp8, dist                                                   below training
    train (train/rl included), infer, eval                                  training, inference
    serve                                                                   above inference
    recipes (train/pipeline.py, speedrun.py, speedrun_report.py), cli       on top

Checked: no cycle between groups; each group imports none of the groups FORBIDDEN names; and
no two modules import each other at run time (an import under TYPE_CHECKING never runs, so it
may point back, for an annotation).
"""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parent.parent / "nanoseek"

# recipes live in train/ and at the top level, but sit above everything except the CLI
RECIPES = {"nanoseek.train.pipeline", "nanoseek.speedrun", "nanoseek.speedrun_report"}
BOTTOM = ("config", "tasks", "data", "model", "fsio", "presets", "machine", "malloc", "analysis")
ABOVE_MODEL = {"train", "infer", "eval", "serve", "dist", "recipes", "cli"}
ABOVE_TRAINING = {"train", "infer", "eval", "serve", "recipes", "cli"}
FORBIDDEN = {  # group -> the groups it may not import
    **dict.fromkeys(BOTTOM, ABOVE_MODEL),
    **dict.fromkeys(("checkpoint", "fp8", "dist"), ABOVE_TRAINING),
    "infer": {"train", "eval", "serve", "recipes", "cli"},
    "eval": {"train", "serve", "recipes", "cli"},
    "train": {"serve", "recipes", "cli"},
    "serve": {"train", "recipes", "cli"},
    "recipes": {"cli"},
    "api": {"recipes", "cli"},  # nanoseek/__init__.py: the public names
}

# Known violations, each (importing module, imported module), left for the owner of the
# importing file to remove; the tests fail on any edge not listed here, and on a listed edge
# that no longer exists (delete its line then). Empty: the graph is clean.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: pathlib.Path) -> str:
    parts = ["nanoseek", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def group(module: str) -> str:
    """A module's group: its sub-package (train/rl is train), or a top-level module's name."""
    if module in RECIPES:
        return "recipes"
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return "cli" if parts[1] == "__main__" else parts[1]


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def parse_imports(
    source: str, module: str, is_package: bool, known=MODULES
) -> list[tuple[str, int, bool]]:
    """(imported nanoseek module, line, runs at import or call time) for every import in the
    source of `module`, at any depth; `from pkg import name` names the submodule pkg.name
    where there is one."""
    tree = ast.parse(source)
    typing_only = _type_checking_only(tree)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        runs = id(node) not in typing_only
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, runs) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up level - 1 packages from this one
                parts = package.split(".")
                up = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{up}.{base}" if base else up
            targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base: None
                       for a in node.names}  # fmt: skip
            found += [(t, node.lineno, runs) for t in targets]
    return [f for f in found if f[0] == "nanoseek" or f[0].startswith("nanoseek.")]


def imports(module: str) -> list[tuple[str, int, bool]]:
    path = MODULES[module]
    return parse_imports(path.read_text(), module, path.name == "__init__.py")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def cross_group_edges() -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import from one group into another, except
    `import nanoseek` itself (the package, not a layer) and the allowed edges."""
    return [
        (m, target, line)
        for m in MODULES
        for target, line, _ in imports(m)
        if target != "nanoseek" and group(m) != group(target) and (m, target) not in ALLOWED
    ]


def test_the_parser_sees_every_kind_of_import():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import nanoseek.model.moe\n"
        "from nanoseek.config import ConfigError, ModelConfig\n"
        "from . import tokenizer, shards\n"  # relative, submodules
        "from ..tasks import resolve\n"  # two levels up
        "if TYPE_CHECKING:\n"
        "    from nanoseek.train.loop import Trainer\n"
        "def f():\n"
        "    from nanoseek.infer import Engine\n"
        "    import torch\n"
    )
    got = parse_imports(source, "nanoseek.data.corpus", is_package=False)
    assert got == [
        ("nanoseek.model.moe", 2, True),
        ("nanoseek.config", 3, True),
        ("nanoseek.data.tokenizer", 4, True),
        ("nanoseek.data.shards", 4, True),
        ("nanoseek.tasks.resolve", 5, True),
        ("nanoseek.train.loop", 7, False),
        ("nanoseek.infer", 9, True),
    ]
    assert group("nanoseek.train.rl.step") == "train" and group("nanoseek.speedrun") == "recipes"
    assert group("nanoseek.train.pipeline") == "recipes" and group("nanoseek.config") == "config"


def test_cycles_finds_each_loop_once():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}, "f": {"f"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_every_group_and_module_is_classified():
    """A new sub-package must be placed in the layer table before it can be checked."""
    groups = {group(m) for m in MODULES}
    assert groups <= set(FORBIDDEN) | {"cli"}, groups - set(FORBIDDEN) - {"cli"}
    assert RECIPES <= set(MODULES)
    stale = {e for e in ALLOWED if e[1] not in {t for t, _, _ in imports(e[0])}}
    assert not stale, f"allowed edges that no longer exist (delete them from ALLOWED): {stale}"


def test_no_import_cycle_between_groups():
    graph: dict[str, set[str]] = defaultdict(set)
    via = defaultdict(list)
    for m, target, line in cross_group_edges():
        graph[group(m)].add(group(target))
        via[group(m), group(target)].append(f"{MODULES[m].relative_to(ROOT.parent)}:{line}")
    found = cycles(graph)
    detail = [
        f"{a} -> {b}: {', '.join(via[a, b][:3])}"
        for c in found
        for a in c
        for b in sorted(graph[a] & set(c))
    ]
    assert not found, "import cycles between groups:\n" + "\n".join(detail)


def test_no_layer_imports_one_above_it():
    bad = [
        f"{MODULES[m].relative_to(ROOT.parent)}:{line}: {group(m)} imports {target} "
        f"({group(target)})"
        for m, target, line in cross_group_edges()
        if group(target) in FORBIDDEN.get(group(m), ())
    ]
    assert not bad, "\n".join(bad)


def test_no_two_modules_import_each_other_at_run_time():
    graph = {m: {t for t, _, runs in imports(m) if runs and t in MODULES} - {m} for m in MODULES}
    found = [c for c in cycles(graph) if not any((a, b) in ALLOWED for a in c for b in c)]
    assert not found, f"modules in an import cycle: {found}"
