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
import prepare_nyu
import reproduce
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
                                        ("reproduce.py", reproduce.ReproConfig),
                                        ("prepare_nyu.py", prepare_nyu.PrepareConfig)])
def test_every_flag_is_documented(script, cls):
    table = section(script)
    documented = set(re.findall(r"^\| `--(\w+)", table, re.M))
    assert documented == {f.name for f in fields(cls)}
    for f in fields(cls):      # with its one-line help
        assert f.metadata["help"] in table, f.name


def test_every_bench_flag_is_documented():
    import bench
    table = section("bench.py")
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


def test_each_file_imports_only_files_above_it_in_the_readme_table():
    """"Reading the code": "a batch flows down the list, each file importing only those
    above it". Every top-level module but setup.py (the build, importing no project file)
    is in the table, and each imports only project files of rows above its own or of its
    own row (a row that names several files, such as `ops.py`, `csrc/`, is one concept). Module-level
    imports only: an import inside a function is not checked (none breaks the order today)."""
    table = README.split("## Reading the code", 1)[1].split("\n## ", 1)[0]
    rows = [re.findall(r"`(\w+)\.py`", line.split("|")[1]) for line in table.splitlines()
            if line.startswith("| `")]
    row_of = {name: i for i, names in enumerate(rows) for name in names}
    modules = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "*.py"))} - {"setup"}
    assert set(row_of) == modules
    for name in sorted(modules | {"setup"}):
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        imported = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
        for other in sorted(imported & modules):
            assert name != "setup" and row_of[other] <= row_of[name], f"{name}.py imports {other}.py, listed below it"
