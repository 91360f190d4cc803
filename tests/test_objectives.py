"""The registry of objectives (sttp.OBJECTIVES): what each declares is what it does, the
docs say the same, and an objective added the way the README says (one function + one
entry) gets the CLI, the equal-step budget, the lr schedule and DDP right by itself."""
import dataclasses
import os
import re
import subprocess
import sys
import unittest.mock as mock

import pytest
import torch

import masking
import model as M
from studies import report
from studies import reproduce
import sttp
import train
from conftest import ROOT, smooth_batch
from util.runtime import Runtime


def test_the_docs_table_is_the_registry():
    doc = open(os.path.join(ROOT, "docs", "cli.md")).read()
    table = doc.split("## The objectives", 1)[1]
    rows = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert rows == set(sttp.OBJECTIVES)
    yes = lambda b: "yes" if b else "no"
    for name, o in sttp.OBJECTIVES.items():
        first_sentence = " ".join(o.run.__doc__.split())
        first_sentence = first_sentence[:first_sentence.index(". ") + 1] if ". " in first_sentence else first_sentence
        cfg = sttp.ObjectiveConfig()
        ordinal = lambda i: f"{i + 1}{'st' if i == 0 else 'nd' if i == 1 else 'rd' if i == 2 else 'th'}"
        missing = ", ".join(ordinal(i) for i in o.missing_modality_steps(cfg)) or "—"
        row = (f"| `{name}` | {o.steps_per_batch(cfg)} | {missing} | "
               f"{yes(o.token_loss)} | {f'`--mode {o.teacher}`' if o.teacher else '—'} | "
               f"{yes(o.unused_parameters)} | {first_sentence} |")
        assert row in table, row


def test_steps_per_batch_is_what_each_objective_does():
    for name, o in sttp.OBJECTIVES.items():
        torch.manual_seed(0)
        net = M.MaskMentor(dataclasses.replace(M.PRESETS["tiny"], num_classes=7))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        cfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=32), teacher_iters=2)
        teacher = M.MaskMentor(net.cfg).eval().requires_grad_(False) if o.teacher else None
        Runtime(torch.device("cpu")).run_objective(o, net, opt, smooth_batch(), cfg, torch.Generator().manual_seed(0),
                                                   teacher)
        assert opt.state[net.global_tokens]["step"].item() == o.steps_per_batch(cfg), name


# A toy objective, added as the README says: two M²IM iterations per batch, each learning
# the rgb pixels only, so the depth and semseg heads get no gradient (DDP must be told).
def _rgb_loss(p, targets):
    return {k: m for k, m in p.losses.items() if k in ("rgb", "norm_rgb")}


def twice(cfg, generator=None):
    """Two M²IM iterations per batch, rgb pixels only."""
    logs = {}
    for _ in range(2):
        p = yield sttp.Iteration(drop_modalities=True, loss=_rgb_loss)
        logs = {k: logs.get(k, 0.0) + v / 2 for k, v in p.logs.items()}
    return logs


TOY = sttp.Objective(twice, steps_per_batch=lambda cfg: 2, missing_modality_steps=lambda cfg: (0, 1),
                     unused_parameters=True)
PRE = ["--subset", "32", "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1", "--budget", "24",
       "--vis_every", "0"]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(sttp.OBJECTIVES, "twice", TOY)
    monkeypatch.setitem(report.VARIANTS, "toy", ("twice", "two rgb-only M²IM steps", report.VARIANTS["m2im"][2]))


def test_a_new_objective_trains_through_train_py(toy, tmp_path):
    train.main(PRE + ["--mode", "twice", "--out_dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    # 4 batches of MIM warm-up (1 step each), then 4 batches of 2 steps
    assert ckpt["optimizer"]["state"][0]["step"].item() == 4 + 4 * 2
    assert ckpt["history"][1]["mode"] == "twice" and "rgb" in ckpt["history"][1]
    with pytest.raises(train.UserError, match="drops modalities and needs at least two"):
        train.main(PRE + ["--mode", "twice", "--modalities", "rgb", "--out_dir", str(tmp_path / "x")])
    with pytest.raises(train.UserError, match="--token_norm: the token loss belongs to --mode sttp, token, kd"):
        train.main(PRE + ["--mode", "twice", "--token_norm", "none", "--out_dir", str(tmp_path / "x")])


def test_a_new_objective_gets_the_equal_step_budget(toy, tmp_path):
    """reproduce.py gives it as many optimiser steps, on as many images, as MaskMentor."""
    cfg = reproduce.parse(["--quick", "--variants", "maskmentor,toy", "--work_dir", str(tmp_path),
                           "--pretrain_images", "32", "--batch_size", "16"])
    assert report.variant_epochs("toy", 1, 1) == 1 + report.steps_per_batch("sttp") // 2
    budgets = {}
    for v in ("maskmentor", "toy"):
        argv = reproduce.pretrain_argv(cfg, reproduce.Spec(v), 0)
        out_dir = os.path.join(reproduce.run_dir(cfg, reproduce.Spec(v), 0), "pretrain")
        budgets[v] = reproduce._stage(out_dir, train.main, argv)
    assert budgets["toy"]["steps"] == budgets["maskmentor"]["steps"] == 2 + 2 * 4
    assert budgets["toy"]["images"] == budgets["maskmentor"]["images"]
    assert "--token_norm" not in reproduce.pretrain_argv(cfg, reproduce.Spec("toy"), 0)   # no token loss
    # A budget the objective can't meet in whole epochs is refused, not rounded.
    with pytest.raises(ValueError, match="no whole number"), \
            mock.patch.object(report, "steps_per_batch", lambda mode, ti=None: 3 if mode == "sttp" else 2):
        report.pretrain_epochs("twice", 1, 1)


WRAPPER = """import sys
sys.path.insert(0, {tests!r})
import sttp, train
from util import cli
from test_objectives import TOY
sttp.OBJECTIVES["twice"] = TOY
cli.run_cli(lambda: train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_new_objective_runs_on_two_processes(toy, tmp_path):
    """Its declared unused parameters reach DDP: two processes compute what one does."""
    from test_distributed import assert_same_run
    train.main(PRE + ["--mode", "twice", "--out_dir", str(tmp_path / "one")])
    script = tmp_path / "train_twice.py"
    script.write_text(WRAPPER.format(tests=os.path.join(ROOT, "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), *PRE, "--mode", "twice", "--out_dir", str(tmp_path / "two")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    load = lambda d: torch.load(tmp_path / d / "ckpt.pt", map_location="cpu", weights_only=False)
    assert_same_run(load("one"), load("two"))


def test_the_schedule_controls_do_what_they_declare(monkeypatch):
    """m2im_x4: STTP's steps on each batch, all on Algorithm 1 input; mix25: one step per batch,
    on Algorithm 1 input one time in four (drawn from the masking generator), else MIM's."""
    torch.manual_seed(0)
    net = M.MaskMentor(dataclasses.replace(M.PRESETS["tiny"], num_classes=7))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    cfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=32))
    drops, real = [], masking.plan_masking
    monkeypatch.setattr(masking, "plan_masking", lambda *a, **k: drops.append(a[4]) or real(*a, **k))
    rt, g = Runtime(torch.device("cpu")), torch.Generator().manual_seed(0)
    logs = rt.run_objective(sttp.OBJECTIVES["m2im_x4"], net, opt, smooth_batch(), cfg, g)
    assert drops == [True] * 4 and opt.state[net.global_tokens]["step"].item() == 4
    assert set(logs) == {"loss", "m2im_rgb", "m2im_norm_rgb", "m2im_depth", "m2im_semseg"}
    # mix25's first iteration, for 4000 batches: Algorithm 1 one time in four
    picks = [next(sttp.OBJECTIVES["mix25"](cfg, g)).drop_modalities for _ in range(4000)]
    assert abs(sum(picks) / 4000 - 0.25) < 0.025              # binomial sd 0.0068: 3.6 sd
    logs = rt.run_objective(sttp.OBJECTIVES["mix25"], net, opt, smooth_batch(), cfg, g)
    assert opt.state[net.global_tokens]["step"].item() == 5     # one step
