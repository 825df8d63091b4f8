"""The package's architecture: no import cycles between modules or between pipeline stages,
and the public entry points stay where the README and the demos say."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "divscope"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """divscope modules a file imports anywhere (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports a.b, or the module a.b.c when c is one
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        out |= {n for n in names if n in MODULES and n.startswith("divscope")}
    return out


def graph() -> dict[str, set[str]]:
    return {m: imported_modules(p) - {m} for m, p in MODULES.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of nodes (first == last), or None; plain depth-first search."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    g = graph()
    # a package's __init__ re-exporting its own modules is not a cycle; everything else is
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in g.items()}
    assert find_cycle(edges) is None


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PKG / parts[-1]).is_dir() else "<top>"


def test_pipeline_stages_form_a_dag():
    """Subpackages (pipeline stages) depend on each other in one direction only."""
    edges: dict[str, set[str]] = {}
    for m, deps in graph().items():
        edges.setdefault(stage(m), set()).update(stage(d) for d in deps if stage(d) != stage(m))
    # the top level (runmeta, gcpause, the losses entry point) is used by and uses stages;
    # only the CLI and the entry points may reach down, so check the stages among themselves
    stages = {s: {d for d in deps if d != "<top>"} for s, deps in edges.items() if s != "<top>"}
    assert find_cycle(stages) is None, stages


def test_only_runmeta_bounded_and_gcpause_are_shared_top_level_modules():
    users = {
        d for m, deps in graph().items() if stage(m) != "<top>" for d in deps if stage(d) == "<top>"
    }
    assert users <= {"divscope", "divscope.runmeta", "divscope.bounded", "divscope.gcpause"}


@pytest.mark.parametrize(
    "module, names",
    [
        (
            "divscope.losses",
            ["KLRegularizer", "kl_divergence", "js_divergence", "generalized_jsd"],
        ),
        ("divscope.samples", ["load_pair", "load_samples", "write_samples_jsonl"]),
        ("divscope.models", ["load_model"]),
        ("divscope.personas.pipeline", ["run_personas", "write_outputs"]),
        ("divscope.personas.data", ["load_personas", "load_questions"]),
        ("divscope.estimators.ranking", ["rank_prompts", "category_summary"]),
        ("divscope.report.html", ["build_report"]),
        ("divscope.cli", ["main", "build_parser", "format_ranking"]),
        ("divscope.diff.pipeline", ["run_diff", "read_prompts"]),
        ("divscope.diff.outputs", ["write_outputs"]),
    ],
)
def test_public_entry_points(module, names):
    mod = importlib.import_module(module)
    assert all(callable(getattr(mod, n)) for n in names)


def test_losses_entry_point_is_the_implementation():
    from divscope import losses
    from divscope.divergence import losses as impl

    assert losses.KLRegularizer is impl.KLRegularizer
    assert losses.kl_divergence is impl.kl_divergence


def test_nothing_in_the_engine_imports_the_cli():
    """The CLI is the top: it uses the stages, no stage (or top-level module) uses it."""
    users = {
        m
        for m, deps in graph().items()
        if not m.startswith("divscope.cli") and any(d.startswith("divscope.cli") for d in deps)
    }
    assert users <= {"divscope.__main__"}, users


def test_each_cli_command_is_one_module_with_its_parser_and_handler():
    """Adding a command is one module (``add_parser``, ``run``) and its entry in COMMANDS."""
    from divscope import cli

    shared = {"__init__", "__main__", "common"}
    modules = {p.stem for p in (PKG / "cli").glob("*.py")} - shared
    assert {m.__name__.rsplit(".", 1)[-1] for m in cli.COMMANDS} == modules
    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(sub.choices) == [m.__name__.rsplit(".", 1)[-1] for m in cli.COMMANDS]
    for m in cli.COMMANDS:
        assert callable(m.add_parser) and callable(m.run)
