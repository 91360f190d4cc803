"""Helpers several test files share: paths, the real NYU fixture, small models and batches,
a full disk; and the suite's one rule for skipping: a test may skip for a missing GPU only
(the hooks at the end; tests/test_suite.py shows them at work).

pytest puts tests/ on sys.path, so test files import these with `from conftest import ...`.
"""
import dataclasses
import errno
import io
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import masking
import model as M
import sttp
from util import cli
from util.runtime import Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
FIX = os.path.join(ROOT, "tests", "data")                             # small real files (ATTRIBUTION.md)


def fixture_path(*parts):
    return os.path.join(FIX, *parts)


def real_sample():
    """NYU labelled image #1: rgb uint8 [480, 640, 3], label40 uint8 (0 = void),
    filled depth in metres (float64, from the x10000 PNG), raw depth in metres (holes 0)."""
    rgb = np.asarray(Image.open(fixture_path("nyu_0001", "rgb.jpg")).convert("RGB"))
    label40 = np.asarray(Image.open(fixture_path("nyu_0001", "label40.png")))
    depth = np.asarray(Image.open(fixture_path("nyu_0001", "depth_filled.png"))).astype(np.float64) / 10000
    raw = np.asarray(Image.open(fixture_path("nyu_0001", "depth_raw.png"))).astype(np.float64) / 10000
    return rgb, label40, depth, raw


def one_line_error(excinfo, *needles):
    """The message of a pytest.raises(UserError) is one line naming every needle."""
    msg = str(excinfo.value)
    assert "\n" not in msg and msg, msg
    for n in needles:
        assert str(n) in msg, msg
    return msg


def save(path, array):
    """A numpy array as .npy or as an image file, creating its folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if str(path).endswith(".npy"):
        np.save(path, array)
    else:
        Image.fromarray(array).save(path)


def save_palette(path, label):
    """Labels as an 8-bit palette PNG, as MultiMAE and the NYU releases store them."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(data.palette("nyu").ravel().tolist())
    img.save(path)


def make_esanet(root, rgb, label40, depth):
    """NYUv2 in ESANet's layout (prepare_dataset.py: 1-based names, depth (m * 1e3).astype(uint16))."""
    for split in ("train", "test"):
        save(f"{root}/{split}/rgb/0001.png", rgb)
        save(f"{root}/{split}/depth/0001.png", (depth * 1e3).astype(np.uint16))
        save(f"{root}/{split}/depth_raw/0001.png", (depth * 1e3).astype(np.uint16))
        save(f"{root}/{split}/labels_40/0001.png", label40.astype(np.uint8))
        save(f"{root}/{split}/labels_894/0001.png", label40.astype(np.uint8))


def finetuned(path, dataset="synthetic", conventions=None, table=None, **cfg):
    """An untrained tiny Segmenter saved the way finetune.py saves one; `conventions`
    becomes ckpt["data"], `table` (h, w) gives every adapter a loaded position table, `cfg`
    replaces fields of the model config (modalities=("depth",): a dedicated depth model,
    as finetune.py --inputs depth makes one)."""
    torch.manual_seed(0)
    mcfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=data.num_classes(dataset), **cfg)
    net = M.Segmenter(mcfg)
    if table is not None:
        for adapter in net.input_adapters.values():
            adapter.pos_emb = torch.randn(1, mcfg.width, *table)
    ckpt = {"kind": "finetune", "model_config": dataclasses.asdict(mcfg), "model": net.state_dict(),
            "dataset": dataset, "config": {}}
    if conventions is not None:
        ckpt["data"] = conventions
    torch.save(ckpt, path)
    return net.eval()


def fill_the_disk(monkeypatch, room=4096):
    """From here on, the files cli.write_atomic opens (checkpoints, every output of
    evaluate.py and prepare_nyu.py) share a disk with `room` bytes left: the write that
    would pass it fails with ENOSPC, as on a full disk."""
    left = [room]

    class Disk(io.FileIO):
        def write(self, b):
            if len(b) > left[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            left[0] -= len(b)
            return super().write(b)

    monkeypatch.setattr(cli, "open", lambda p, mode: Disk(p, mode.replace("b", "")), raising=False)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny(**kw):
    """The tiny model preset with 7 classes."""
    return dataclasses.replace(M.PRESETS["tiny"], num_classes=7, **kw)


def smooth_batch(B=4, size=64, classes=7, seed=0):
    """Structured images (low-frequency patterns), so reconstruction is learnable."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(B, 5, 4, 4, generator=g)
    up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return {"rgb": up[:, :3], "depth": up[:, 3:4].abs() + 1.0,
            "semseg": (up[:, 4] * 2).round().clamp(-3, 3).long() + 3}


def run_objective(name, net, opt, batch, cfg, g, teacher=None, rt=None) -> dict:
    """One batch of objective `name` (sttp.OBJECTIVES) as train.py runs it: one process,
    float32 unless `rt` says otherwise."""
    return (rt or Runtime(torch.device("cpu"))).run_objective(sttp.OBJECTIVES[name], net, opt, batch, cfg, g,
                                                              teacher)


def one_forward(net, inputs, plan, token_positions="all") -> sttp.Pass:
    """One forward of a pre-training network on a masking plan and its pixel losses, as
    util/runtime.py runs it on one process (the loss weights from the plan)."""
    weights = sttp.loss_weights(net, inputs, masking.hidden_mask(plan), plan.keep, token_positions)
    return sttp.masked_forward(net, inputs, plan, weights, net.cfg.patch_size)


def key_bias_free(name: str, value: torch.Tensor) -> torch.Tensor:
    """The tensor without the key part of an attention bias. Softmax ignores a constant
    added to every key, so that bias's true gradient is exactly 0: what it gets is rounding
    noise, which AdamW's normalisation turns into lr-sized steps that differ whenever the
    summation order does (one process or two). Every other weight agrees to ~1e-6."""
    if name.endswith("qkv.bias"):
        n = value.shape[0] // 3
        return torch.cat([value[:n], value[2 * n:]])
    if name.endswith(".kv.bias"):
        return value[value.shape[0] // 2:]
    return value


# --- the suite's rule: no test skips on CI but for a missing GPU --------------------------------
#
# CI has no GPU, and every package and build the tests need (requirements.txt, setup.py):
# a test that skips there for anything else (a package, the compiled op, the git history)
# is a feature CI silently stops testing. So any other skip is turned into a failure that
# names its reason. This judges what happened, not how a test is written: a skip from a
# marker, a fixture, a helper, importorskip or a module-level pytest.skip, however spelled,
# is a skipped report here. What it cannot see: a reason that names a GPU falsely, or a
# test that returns early instead of skipping; review catches those.

GPU_REASON = re.compile(r"\b(cuda|gpus?)\b", re.I)


def only_gpu_skips(report) -> None:
    """A skipped report (xfail aside) whose reason says nothing of CUDA or a GPU becomes a failure."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not GPU_REASON.search(reason):
        report.outcome = "failed"
        report.longrepr = (f"skipped ({reason}), but a test may skip only for a missing GPU: CI installs every "
                           f"package and build the tests need (tests/conftest.py)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    only_gpu_skips((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    only_gpu_skips((yield).get_result())
