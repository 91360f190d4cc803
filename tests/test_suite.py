"""The suite's own rule: on CI no test skips but for a missing GPU (the hooks at the end of
tests/conftest.py). A run of pytest on small made-up tests, with that conftest as its
plugin, shows every other way of skipping reported as a failure naming its reason, and a
skip for a missing GPU still a skip."""
import os
import re
import subprocess
import sys

from conftest import ROOT

TESTS = '''
import pytest

def test_passes():
    pass

def test_importorskip():
    pytest.importorskip("no_such_package_at_all")

@pytest.mark.skipif(True, reason="onnx is not installed")
def test_skipif_marker():
    pass

@pytest.fixture
def built_op():
    pytest.skip("the C++ extension is not built")

def test_skip_in_a_fixture(built_op):
    pass

def test_no_cuda_device():
    pytest.skip("no CUDA device")

@pytest.mark.skipif(True, reason="needs a GPU")
def test_gpu_marker():
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_failure():
    assert False
'''

MODULE_SKIP = '''
import pytest
pytest.skip("h5py is missing", allow_module_level=True)

def test_never_collected():
    pass
'''


def test_only_a_missing_gpu_may_skip(tmp_path):
    (tmp_path / "test_made_up.py").write_text(TESTS)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rA", "-q",
                        "--continue-on-collection-errors", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout
    outcome = {}                               # test (or module) -> outcome, from the -rA summary
    for status, node in re.findall(r"^(PASSED|FAILED|ERROR|XFAIL) (\S+)", out, re.M):
        outcome[node.split("::")[-1].removesuffix(".py")] = status
    assert p.returncode == 1, out[-3000:]
    assert outcome == {"test_passes": "PASSED", "test_expected_failure": "XFAIL",
                       "test_importorskip": "FAILED",          # a skip in the test body: its call fails
                       "test_skipif_marker": "ERROR",          # a skip while setting up: its setup fails
                       "test_skip_in_a_fixture": "ERROR",
                       "test_module_skip": "ERROR"}, out[-3000:]
    assert sorted(re.findall(r"^SKIPPED \[1\] \S+: (.*)$", out, re.M)) == ["needs a GPU", "no CUDA device"], out
    for reason in ("no_such_package_at_all", "onnx is not installed", "the C++ extension is not built",
                   "h5py is missing"):
        assert re.search(rf"skipped \(.*{re.escape(reason)}.*\), but a test may skip only for a missing GPU", out), \
            (reason, out[-3000:])
