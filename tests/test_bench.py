"""studies/bench.py --deploy: the deployed segmenter's cost per input condition. Its FLOP count
is the hand count of the tiny model's matmuls and convolutions; the table has a row per
device and input; a bad size is one line."""
import dataclasses
import sys

import pytest
import torch

import evaluate
import model as M
from studies import bench


def hand_count(cfg: M.ModelConfig, H: int, W: int, inputs: tuple) -> int:
    """FLOPs (a multiply-add = 2) of the Segmenter's matmuls and convolutions on one H x W
    image with these inputs, counted from the architecture (model.py)."""
    D, P, N = cfg.width, cfg.patch_size, (H // cfg.patch_size) * (W // cfg.patch_size)
    channels = {"rgb": 3, "depth": 1}
    flops = sum(2 * N * channels[m] * P * P * D for m in inputs)              # patch projections
    L = len(inputs) * N + cfg.num_global_tokens                               # tokens in the encoder
    hidden = int(D * cfg.mlp_ratio)
    block = 2 * L * D * 3 * D + 2 * 2 * L * L * D + 2 * L * D * D + 2 * 2 * L * D * hidden   # qkv, QK^T + AV, proj, MLP
    flops += cfg.depth * block
    r, dim = P // 4, cfg.seg_dim
    pixels = N * r * r                                                          # the head's 1/4-resolution map
    flops += 2 * N * D * r * r * dim                                            # tokens -> pixels (proj_dec)
    flops += cfg.seg_depth * (2 * pixels * dim * 49 + 2 * 2 * pixels * dim * 4 * dim)   # dwconv 7x7, 2 pointwise
    flops += 2 * pixels * dim * cfg.num_classes                                 # the final 1x1 conv
    return flops


@pytest.mark.parametrize("setting", list(evaluate.SETTINGS))
def test_flops_of_the_tiny_model_are_its_hand_count(setting):
    cfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=40)
    net = M.Segmenter(cfg).eval()
    batch = {"rgb": torch.randn(1, 3, 64, 96), "depth": torch.rand(1, 1, 64, 96) + 1}      # no padding at crop 64
    counted = bench.deploy_flops(lambda: evaluate.predict(net, batch, [setting], 64))
    assert counted == pytest.approx(hand_count(cfg, 64, 96, evaluate.SETTINGS[setting]), rel=0.02)


def test_the_deploy_table(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--deploy", "tiny", "--deploy_size", "100x60", "--deploy_reps", "1"])
    table = bench.main()
    out = capsys.readouterr().out
    assert "one 100x60 image, run at 104x64" in out                    # padded to the crop, rounded to the patch
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    assert set(table) == {(d, s) for d in devices for s in evaluate.SETTINGS}
    net, _, _ = bench.deploy_model("tiny")
    assert table["cpu", "rgbd"]["params"] == sum(p.numel() for p in net.parameters())
    adapter = lambda m: sum(p.numel() for p in net.input_adapters[m].parameters())
    assert table["cpu", "rgb"]["params"] == table["cpu", "rgbd"]["params"] - adapter("depth")
    assert table["cpu", "depth"]["params"] == table["cpu", "rgbd"]["params"] - adapter("rgb")
    cfg = net.cfg
    for s, names in evaluate.SETTINGS.items():
        assert table["cpu", s]["flops"] == pytest.approx(hand_count(cfg, 64, 104, names), rel=0.02)
        assert table["cpu", s]["seconds"] > 0 and table["cpu", s]["peak_bytes"] > 0
        assert any(line.startswith(f"cpu    {s:6}") for line in out.splitlines()), s


@pytest.mark.parametrize("size", ["640", "640x0", "axb", "640x480x3", "9000x480"])
def test_a_bad_deploy_size_is_one_line(size, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--deploy", "tiny", "--deploy_size", size])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert str(e.value) == f"studies/bench.py: --deploy_size {size}: give WIDTHxHEIGHT in pixels, each 1 to 8192 " \
                           f"(e.g. 640x480)"


def test_deploy_names_a_preset_or_a_file(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--deploy", str(tmp_path / "nothing.pt")])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert "neither a preset (tiny, base) nor a file" in str(e.value) and "\n" not in str(e.value)


def test_the_profiler_keeps_stderr_less_kinetos_log_lines(capfd):
    """What C++ or Python writes to stderr while bench profiles reaches the user afterwards;
    only kineto's own log lines (its start/stop notes, the missing GPU) are dropped."""
    import os
    import torch
    with bench.profiled(activities=[torch.profiler.ProfilerActivity.CPU]):
        os.write(2, b"USDT:2026-12-07 17:50:10 23368:23368 SyncActivityProfilerHandler.cpp:39] profiler_start\n"
                    b"a warning of our own\n"
                    b"ERROR:2026-12-07 17:50:10 23368:23368 DeviceProperties.cpp:56] gpuGetDeviceCount failed\n")
        torch.ones(3).sum()
    assert capfd.readouterr().err == "a warning of our own\n"
