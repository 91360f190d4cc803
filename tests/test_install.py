"""setup.py: a non-editable install holds every module of the project and a working op."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def top_level_modules(folder):
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "setup.py")


@pytest.mark.slow
def test_a_plain_install_imports_every_module(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:                                # a clean copy: no build outputs, no venv
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            shutil.copy(os.path.join(ROOT, rel), src / rel)
    target = tmp_path / "site"
    env = dict(os.environ, MASKMENTOR_BUILD_CUDA="0")       # the C++ build is enough here
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--quiet",
                        "--target", str(target), str(src)], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    modules = top_level_modules(ROOT)
    installed = {f.split(".")[0] for f in os.listdir(target)}
    assert set(modules) <= installed, set(modules) - installed
    code = (f"import importlib, ops\n"
            f"for m in {modules!r}: assert importlib.import_module(m).__file__.startswith({str(target)!r}), m\n"
            f"assert ops.LOADED and not ops.CUDA, ops.backend()\n"
            f"print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
