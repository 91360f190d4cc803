"""docs/cli.md documents every command-line flag, and CI runs the README's own commands."""
import argparse
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
