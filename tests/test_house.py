"""The layout holds: measurement stays apart from the product, README's layout table matches
the tree, every command README.md and BENCHMARKS.md show parses, and the help lists the groups."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import tomllib
import typer
from typer.testing import CliRunner

from cluster.cli import app

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("protos", "recdata", "retrieval", "ranking", "gateway", "cluster")
# The command line is the one part of the product that may name the measurement package: its
# root registers the measurement commands, and `train --curve` draws with its plots.
COMMAND_LINE = ROOT / "cluster" / "cli"


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every import in a module, lazy imports inside functions included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def module_level_packages(path: Path) -> set[str]:
    """Top-level package of every import that runs when the module is imported."""
    found: set[str] = set()
    for node in ast.parse(path.read_text("utf-8")).body:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_no_product_module_imports_the_measurement_package() -> None:
    offenders = [str(path.relative_to(ROOT)) for package in PRODUCT for path in (ROOT / package).rglob("*.py")
                 if COMMAND_LINE not in path.parents and "bench" in imported_packages(path)]
    assert offenders == []


def test_the_command_line_loads_measurement_code_only_for_its_commands() -> None:
    eager = [str(path.relative_to(ROOT)) for path in COMMAND_LINE.glob("*.py")
             if path.name != "__init__.py" and "bench" in module_level_packages(path)]
    assert eager == []


def test_the_scan_sees_a_lazy_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from bench.harness import open_loop\n    return open_loop\n")
    assert "bench" in imported_packages(module)


def test_measurement_code_lives_only_in_the_measurement_package() -> None:
    stray = [str(p.relative_to(ROOT)) for package in PRODUCT for p in (ROOT / package).rglob("*.py")
             if re.match(r"(bench|loadtest|plots)", p.stem)]
    assert stray == []


def layout_table() -> set[str]:
    text = (ROOT / "README.md").read_text("utf-8")
    section = text[text.index("## Layout"):]
    section = section[: section.index("\n## ", 4)]
    return set(re.findall(r"^\| `([\w.-]+)/` \|", section, flags=re.MULTILINE))


def test_readme_layout_table_matches_the_tree() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert layout_table() == packages


def shell_blocks(markdown: str) -> list[str]:
    """The text of the document's fenced code blocks marked bash or sh, or not marked at all."""
    blocks, current, language = [], [], None
    for line in markdown.splitlines():
        if line.startswith("```"):
            if language is None:
                language = line[3:].strip() or "sh"
            else:
                if language in ("bash", "sh"):
                    blocks.append("\n".join(current))
                current, language = [], None
        elif language is not None:
            current.append(line)
    return blocks


def commands_in(markdown: str) -> list[list[str]]:
    """Every `recfunnel …` command in the document's shell blocks, as argument lists."""
    commands = []
    for block in shell_blocks(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            if re.match(r"\s*(\S+=\S+\s+)*recfunnel\s", line):  # after any VAR=value prefixes
                words = shlex.split(line, comments=True)
                words = words[words.index("recfunnel") + 1:]
                commands.append([w for w in words if w != "&"])
    return commands


# Typer carries its own copy of click: its usage errors are what a bad command line raises.
UsageError = typer.BadParameter.__mro__[1]


def parse(command: Any, args: list[str], name: str = "recfunnel", parent: Any = None) -> Any:
    """Parse `args` as the command line would, down to the leaf command, without running it;
    the leaf's context holds the parsed options."""
    context = command.make_context(name, list(args), parent=parent)
    if hasattr(command, "resolve_command"):  # a group: go on into the named command
        rest = [*context._protected_args, *context.args]
        sub_name, sub, sub_args = command.resolve_command(context, rest)
        assert sub is not None and sub_name is not None
        return parse(sub, sub_args, sub_name, context)
    return context


@pytest.mark.parametrize("document", ["README.md", "BENCHMARKS.md"])
def test_every_documented_command_parses(document: str) -> None:
    commands = commands_in((ROOT / document).read_text("utf-8"))
    assert len(commands) >= 10
    root = typer.main.get_command(app)
    for args in commands:
        if "VERSION" in args:  # a placeholder for a version `recfunnel versions` lists
            args = [a if a != "VERSION" else "ml-100k-20261201000000-abcdef" for a in args]
        try:
            parse(root, args)
        except UsageError as error:
            pytest.fail(f"`recfunnel {' '.join(args)}` in {document} does not parse: {error}")


def test_parsing_reaches_the_leaf_command() -> None:
    context = parse(typer.main.get_command(app), ["bench", "recall", "--items", "5000", "--json"])
    assert context.info_name == "recall" and context.params["items"] == 5000 and context.params["as_json"]


def test_a_bad_command_does_not_parse() -> None:
    with pytest.raises(UsageError):
        parse(typer.main.get_command(app), ["train", "--no-such-option"])
    with pytest.raises(UsageError):
        parse(typer.main.get_command(app), ["bench", "recall", "--items", "10"])  # below its minimum


def test_help_lists_the_command_groups() -> None:
    result = CliRunner().invoke(app, ["--help"], terminal_width=100)
    assert result.exit_code == 0
    for panel in ("Run the cluster", "Model versions", "Train and evaluate", "Measure"):
        assert panel in result.output
    bench = CliRunner().invoke(app, ["bench", "--help"], terminal_width=100)
    for name in ("serving", "recall", "transport", "train", "train-helpers", "loop", "soak", "ablations"):
        assert re.search(rf"│ {re.escape(name)}\s", bench.output), name


def test_license_is_an_spdx_expression() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    assert project["project"]["license"] == "Apache-2.0"
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])
    assert "bench*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
