"""Every script's --help works: the first command a new user types (argparse expands % in
help strings, which once made train.py --help and finetune.py --help crash)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# Every file that runs as a script, at the top level and in studies/ and tools/ (setup.py is
# pip's, not a user's command).
SCRIPTS = sorted(os.path.join(d, f) if d else f for d in ("", "studies", "tools")
                 for f in os.listdir(os.path.join(ROOT, d)) if f.endswith(".py") and f != "setup.py"
                 and 'if __name__ == "__main__":' in open(os.path.join(ROOT, d, f)).read())


def test_the_scripts_are_found():
    assert {"train.py", "finetune.py", "evaluate.py", "studies/reproduce.py", "studies/bench.py",
            "tools/prepare_nyu.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_works(script):
    p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("usage:") and "--help" in p.stdout
    assert "Traceback" not in p.stderr


def test_a_help_description_is_whole_sentences():
    p = subprocess.run([sys.executable, "studies/bench.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    description = " ".join(p.stdout.split("\n\n")[1].split())
    first = " ".join(open(os.path.join(ROOT, "studies", "bench.py")).read().split('"""')[1].split("\n\n")[0].split())
    assert description == first and description.endswith("."), description   # the docstring's whole first paragraph


def test_a_module_run_as_a_command_says_what_to_run():
    """data.py once had a prepare-nyu command; it is a module: one line naming the converter, exit 2."""
    p = subprocess.run([sys.executable, "data.py", "prepare-nyu", "--mat", "x.mat"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "python tools/prepare_nyu.py" in p.stderr, p.stderr
