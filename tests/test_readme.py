"""docs/cli.md documents every command-line flag, CI runs the README's own commands, and
the README's file table lists the files in an order their imports keep."""
import argparse
import ast
import glob
import os
import re
from dataclasses import fields

import pytest

import evaluate
import finetune
from tools import prepare_nyu
from studies import reproduce
import train
from conftest import ROOT

README = open(os.path.join(ROOT, "README.md")).read()
CLI_DOC = open(os.path.join(ROOT, "docs", "cli.md")).read()


def section(script: str) -> str:
    """docs/cli.md's flag table of one script."""
    m = re.search(rf"^### {re.escape(script)}\n(.*?)(?=^### |^## |\Z)", CLI_DOC, re.S | re.M)
    assert m, f"docs/cli.md has no '### {script}' section"
    return m.group(1)


@pytest.mark.parametrize("script,cls", [("train.py", train.TrainConfig), ("finetune.py", finetune.FinetuneConfig),
                                        ("evaluate.py", evaluate.EvalConfig),
                                        ("studies/reproduce.py", reproduce.ReproConfig),
                                        ("tools/prepare_nyu.py", prepare_nyu.PrepareConfig)])
def test_every_flag_is_documented(script, cls):
    table = section(script)
    documented = set(re.findall(r"^\| `--(\w+)", table, re.M))
    assert documented == {f.name for f in fields(cls)}
    for f in fields(cls):      # with its one-line help
        assert f.metadata["help"] in table, f.name


def test_every_bench_flag_is_documented():
    from studies import bench
    table = section("studies/bench.py")
    documented = set(re.findall(r"^\| `(--\w+)`", table, re.M))
    actions = [a for a in bench.parser()._actions if a.option_strings and a.help not in (None, argparse.SUPPRESS)
               and a.dest != "help"]
    assert documented == {a.option_strings[0] for a in actions}
    for a in actions:          # with its help
        assert a.help in table, a.dest


def test_ci_runs_the_readme_commands():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    blocks = re.findall(r"```bash\n(.*?)```", README.split("## Two commands", 1)[1], re.S)[:2]
    assert len(blocks) == 2 and "pip install" in blocks[0] and "pytest" in blocks[1]
    assert "README.md" in ci and "Two commands" in ci       # it extracts them, so they can't drift


PACKAGES = ("util", "studies", "tools")
METHOD = ("modalities", "masking", "model", "sttp")


def project_modules() -> dict:
    """{module name: path} of every project module: top level, util/, studies/, tools/."""
    mods = {os.path.basename(f)[:-3]: f for f in glob.glob(os.path.join(ROOT, "*.py"))}
    for p in PACKAGES:
        for f in glob.glob(os.path.join(ROOT, p, "*.py")):
            name = os.path.basename(f)[:-3]
            mods[p if name == "__init__" else f"{p}.{name}"] = f
    return mods


def imports_of(path: str, mods: dict) -> set:
    """The project modules a file imports, at any depth (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in mods and n not in PACKAGES}
    return out


def readme_rows(heading: str) -> list:
    """The file names of each row of one of the README's "Reading the code" tables."""
    text = README.split("## Reading the code", 1)[1].split("\n## ", 1)[0]
    table = text.split(heading, 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if line.startswith("| `"):
            folder = cells[0].strip("`/") if cells[0].endswith("/`") and len(cells) == 3 else ""
            names = re.findall(r"`(\w+)\.py`", cells[1] if folder else cells[0])
            rows.append([f"{folder}.{n}" if folder else n for n in names])
    return rows


def test_the_top_level_reads_in_import_order():
    """"Reading the code": the top level in the order a student reads it, each file importing
    (at any depth) only top-level files above it; the method files import nothing else of
    the project; the three commands none of each other."""
    mods = project_modules()
    top = {m for m in mods if "." not in m and m not in PACKAGES} - {"setup"}
    rows = readme_rows("The top level")
    row_of = {n: i for i, names in enumerate(rows) for n in names}
    assert set(row_of) == top
    for name in sorted(top):
        for other in sorted(imports_of(mods[name], mods)):
            if "." not in other:
                assert row_of[other] < row_of[name] or other == name, f"{name}.py imports {other}.py, listed below it"
    for name in METHOD:
        assert imports_of(mods[name], mods) <= set(METHOD), f"{name}.py imports beyond the method files"
    scripts = {"train", "finetune", "evaluate"}
    for name in scripts:
        assert not imports_of(mods[name], mods) & scripts, name


def test_the_folders_are_listed_and_imports_go_one_way():
    """Every module of util/, studies/ and tools/ is in the README's folder table; util/
    imports nothing of studies/ or tools/, studies/ nothing of tools/; and no import cycle at
    any depth among all the project's modules."""
    mods = project_modules()
    listed = {n for names in readme_rows("Three folders") for n in names}
    assert listed == {m for m in mods if "." in m}
    for name in mods:
        if name.startswith("util."):
            assert not {i for i in imports_of(mods[name], mods) if i.startswith(("studies.", "tools."))}, name
        if name.startswith("studies."):
            assert not {i for i in imports_of(mods[name], mods) if i.startswith("tools.")}, name
    graph = {m: imports_of(p, mods) - {m} for m, p in mods.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in graph[m]:
            assert state.get(n) != "open", f"import cycle: {' -> '.join(path + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
