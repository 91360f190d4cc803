"""Several processes and mixed precision: `torchrun --nproc_per_node 2` (DDP over Gloo on
the CPU) computes what one process computes on the same global batches, resumes on
another number of processes, tells DDP correctly which parameters may get no gradient,
and closes its process group before the interpreter exits; --dtype bfloat16 / float16 and
--compile run."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from util import cli
import finetune
import masking
import modalities
import model as M
from util import runtime
import sttp
import train
from conftest import ROOT, key_bias_free, run_objective, smooth_batch

# 32 images in batches of 8: 4 batches per epoch, one MIM warm-up epoch, then one of --mode.
PRE = ["--subset", "32", "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1", "--budget", "24",
       "--vis_every", "0"]
FT = ["--subset", "32", "--batch_size", "8", "--epochs", "2"]


def torchrun(script, *args, nproc=2):
    """Run a script under torchrun on nproc CPU processes; returns (exit status, stdout, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(nproc), script, *map(str, args)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_run(a: dict, b: dict) -> None:
    """Two checkpoints of the same run: same position, random state, weights and losses, up to
    the float rounding of summing the gradients in another order."""
    assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"])
    assert torch.equal(a["rng_state"]["mask"], b["rng_state"]["mask"])
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(key_bias_free(k, a["model"][k]), key_bias_free(k, b["model"][k]),
                                   atol=1e-5, rtol=1e-4, msg=k)
    assert [h["epoch"] for h in a["history"]] == [h["epoch"] for h in b["history"]]
    for ha, hb in zip(a["history"], b["history"]):
        assert ha.keys() == hb.keys()
        for k in ha:
            if k not in ("epoch", "mode", "_sums"):
                assert ha[k] == pytest.approx(hb[k], rel=1e-5), k


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """mode -> the checkpoint of an uninterrupted one-process run of PRE, made once per module."""
    root, runs = tmp_path_factory.mktemp("one"), {}

    def run(mode):
        if mode not in runs:
            out = root / mode
            extra = ["--teacher", run("mim")] if mode == "kd" else []
            train.main(PRE + ["--mode", mode, "--out_dir", str(out)] + extra)
            runs[mode] = str(out / "ckpt.pt")
        return runs[mode]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sttp", "token", "kd"])
def test_two_processes_equal_one(tmp_path, one_process, mode):
    # sttp: 3 teacher + 1 student DDP steps per batch; token: its student leaves the pixel
    # heads without gradient (find_unused_parameters); kd: an unwrapped frozen teacher.
    extra = ["--teacher", one_process("mim")] if mode == "kd" else []
    rc, out, err = torchrun("train.py", *PRE, "--mode", mode, "--out_dir", tmp_path, *extra)
    assert rc == 0, err[-3000:]
    assert "4 per process" in out and "weights were equal at every checkpoint" in out
    assert out.count("epoch 2/2") == 1                      # only rank 0 prints
    assert_same_run(load(one_process(mode)), load(tmp_path / "ckpt.pt"))


@pytest.mark.slow
def test_two_processes_equal_one_with_the_token_options(tmp_path):
    # teacher_complete: a no-grad forward of the bare network; missing: a mean over a count
    # that differs between the processes (runtime.mean); standardize: statistics over the
    # global batch's tokens (runtime.all_sum).
    args = PRE + ["--token_target", "teacher_complete", "--token_positions", "missing", "--token_norm", "standardize"]
    train.main(args + ["--out_dir", str(tmp_path / "one")])
    rc, out, err = torchrun("train.py", *args, "--out_dir", tmp_path / "two")
    assert rc == 0, err[-3000:]
    assert_same_run(load(tmp_path / "one" / "ckpt.pt"), load(tmp_path / "two" / "ckpt.pt"))


@pytest.mark.slow
def test_finetune_two_processes_equal_one(tmp_path, one_process):
    # Stochastic depth on: its draws, like the modality choice, are made for the global batch.
    args = FT + ["--pretrained", one_process("sttp"), "--drop_path", "0.2"]
    finetune.main(args + ["--out_dir", str(tmp_path / "one")])
    rc, out, err = torchrun("finetune.py", *args, "--out_dir", tmp_path / "two")
    assert rc == 0, err[-3000:]
    assert_same_run(load(tmp_path / "one" / "ckpt.pt"), load(tmp_path / "two" / "ckpt.pt"))


@pytest.mark.slow
def test_resume_on_another_number_of_processes(tmp_path, one_process):
    # Stopped inside the sttp epoch (batch 2 of 4), resumed with the other process count.
    rc, _, err = torchrun("train.py", *PRE, "--out_dir", tmp_path / "a", "--stop_after", "6")
    assert rc == 0, err[-3000:]
    train.main(["--resume", "--out_dir", str(tmp_path / "a")])
    train.main(PRE + ["--out_dir", str(tmp_path / "b"), "--stop_after", "6"])
    rc, _, err = torchrun("train.py", "--resume", "--out_dir", tmp_path / "b")
    assert rc == 0, err[-3000:]
    uninterrupted = load(one_process("sttp"))
    assert_same_run(uninterrupted, load(tmp_path / "a" / "ckpt.pt"))
    assert_same_run(uninterrupted, load(tmp_path / "b" / "ckpt.pt"))


@pytest.mark.slow
def test_batch_size_must_divide_among_the_processes(tmp_path):
    rc, _, err = torchrun("train.py", *PRE, "--batch_size", "9", "--out_dir", tmp_path)
    assert rc != 0 and "error: --batch_size 9 is not divisible by the 2 processes" in err


# A script's main() under torchrun that leaves behind what train.py's does: a DDP network (its
# constructor imports torch._dynamo) and collectives on tensors made in Python. An atexit hook
# (run after run_cli, before the interpreter finalises) prints the Gloo threads still alive.
CLOSING = """
import atexit, os, sys
sys.path.insert(0, {root!r})
import torch
from util import cli, runtime

def gloo_threads():
    names = (open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    return sorted(n for n in names if "gloo" in n)

atexit.register(lambda: sys.stderr.write(f"gloo threads at exit: {{gloo_threads()}}\\n"))

def main():
    _, _, device = runtime.init_distributed(torch.device("cpu"))
    net = runtime.Runtime(device).wrap(torch.nn.Linear(2, 2))
    net(torch.ones(4, 2)).sum().backward()
    torch.distributed.all_reduce(torch.ones(3))

cli.run_cli(main)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads from /proc")
def test_the_process_group_is_closed_before_the_interpreter_exits(tmp_path):
    # A Gloo worker thread that frees a collective's Python tensor once the interpreter is
    # finalising aborts the process ("terminate called without an active exception", exit
    # -6, issue 20): run_cli joins them first (cli.close_distributed).
    script = tmp_path / "closing.py"
    script.write_text(CLOSING.format(root=ROOT))
    rc, _, err = torchrun(script)
    assert rc == 0, err[-3000:]
    assert err.count("gloo threads at exit: []") == 2, err[-3000:]


def params_without_grad(net) -> set:
    return {n for n, p in net.named_parameters() if p.grad is None}


@pytest.mark.parametrize("mode", list(sttp.OBJECTIVES))
def test_which_parameters_get_no_gradient(mode):
    """What train.py tells DDP (find_unused_parameters where sttp.OBJECTIVES declares
    unused_parameters: --mode token): after each objective, the gradients of its last
    backward are there (zero_grad sets them to None) exactly when it declares none unused."""
    torch.manual_seed(0)
    net = M.MaskMentor(dataclasses.replace(M.PRESETS["tiny"], num_classes=7))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    cfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=32, p_drop=0.9))   # many drops
    teacher = M.MaskMentor(net.cfg).requires_grad_(False)
    run_objective(mode, net, opt, smooth_batch(), cfg, torch.Generator().manual_seed(0), teacher)
    missing = params_without_grad(net)
    assert bool(missing) == sttp.OBJECTIVES[mode].unused_parameters
    if mode == "token":        # the token loss reaches neither the heads' pixel layers nor norm_rgb's head
        assert all(".decoder_transformer." in n or ".out_proj." in n or ".norm_rgb." in n for n in missing)
        assert any(".norm_rgb.decoder." in n for n in missing)


def test_segmenter_gives_every_parameter_a_gradient_with_a_missing_modality():
    """finetune.py wraps the Segmenter without find_unused_parameters: a process whose
    samples all miss depth (or rgb) still reaches every parameter."""
    net = M.Segmenter(dataclasses.replace(M.PRESETS["tiny"], num_classes=7))
    b = smooth_batch()
    inputs = modalities.prepare_inputs({"rgb": b["rgb"], "depth": b["depth"]})
    for present in ([True, False], [False, True]):
        net.zero_grad(set_to_none=True)
        present = torch.tensor([present] * b["rgb"].shape[0])
        finetune.segmentation_loss(net(inputs, present), b["semseg"]).backward()
        assert not params_without_grad(net)


def test_bfloat16_on_cpu(tmp_path):
    train.main(PRE + ["--out_dir", str(tmp_path / "fp32"), "--stop_after", "2"])
    bf16 = train.main(PRE + ["--out_dir", str(tmp_path / "bf16"), "--stop_after", "2", "--dtype", "bfloat16"])
    a, b = load(tmp_path / "fp32" / "ckpt.pt"), load(tmp_path / "bf16" / "ckpt.pt")
    assert b["config"]["dtype"] == "bfloat16" and "scaler" not in b
    assert a["history"][0]["loss"] != b["history"][0]["loss"]                     # autocast ran ...
    assert a["history"][0]["loss"] == pytest.approx(b["history"][0]["loss"], rel=0.05)   # ... and works
    assert all(p.dtype == torch.float32 for p in bf16.parameters())      # autocast: weights stay fp32
    finetune.main(FT + ["--pretrained", str(tmp_path / "bf16" / "ckpt.pt"), "--dtype", "bfloat16",
                        "--stop_after", "1", "--out_dir", str(tmp_path / "ft")])


@pytest.mark.slow
def test_float16_scales_the_loss_and_resumes_exactly(tmp_path):
    # CPU autocast supports float16 in this torch; the GradScaler's state is checkpointed.
    args = PRE + ["--dtype", "float16", "--clip_grad", "1"]
    train.main(args + ["--out_dir", str(tmp_path / "a")])
    train.main(args + ["--out_dir", str(tmp_path / "b"), "--stop_after", "5"])
    train.main(["--resume", "--out_dir", str(tmp_path / "b")])
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    assert a["scaler"]["scale"] > 0 and a["scaler"] == b["scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.isfinite(v).all() for v in a["model"].values())


def test_dtype_errors_are_one_line():
    with pytest.raises(cli.UserError, match="--dtype float16: autocast on meta does not support it"):
        runtime.autocast_dtype("float16", torch.device("meta"))
    with pytest.raises(cli.UserError, match="--dtype"):
        train.main(["--dtype", "float64"])


@pytest.mark.slow
def test_compile_matches_eager(tmp_path):
    train.main(PRE + ["--out_dir", str(tmp_path / "eager"), "--stop_after", "2"])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train.main(PRE + ["--out_dir", str(tmp_path / "compiled"), "--stop_after", "2", "--compile"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1     # the whole pass, compiled
    a, b = load(tmp_path / "eager" / "ckpt.pt"), load(tmp_path / "compiled" / "ckpt.pt")
    assert a["model"].keys() == b["model"].keys()                 # compiling keeps the parameter names
    assert a["history"][0]["loss"] == pytest.approx(b["history"][0]["loss"], rel=1e-4)
