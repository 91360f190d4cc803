"""setup.py: a non-editable install holds every module of the project (top level, util/, studies/,
tools/) and a working op."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def project_modules(folder):
    """The top-level modules and those of the packages util/, studies/, tools/."""
    top = [f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "setup.py"]
    packaged = [f"{p}.{f[:-3]}" for p in ("util", "studies", "tools") for f in os.listdir(os.path.join(folder, p))
                if f.endswith(".py") and f != "__init__.py"]
    return sorted(top + packaged)


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
    modules = project_modules(ROOT)
    installed = {f.split(".")[0] for f in os.listdir(target)}
    assert {m.split(".")[0] for m in modules} <= installed, {m.split(".")[0] for m in modules} - installed
    code = (f"import importlib\nfrom util import ops\n"
            f"for m in {modules!r}: assert importlib.import_module(m).__file__.startswith({str(target)!r}), m\n"
            f"assert ops.LOADED and not ops.CUDA, ops.backend()\n"
            f"print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
