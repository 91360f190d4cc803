"""Careless use: nothing lost, nothing silent. A run folder is never overwritten without
--resume or --overwrite, bad flags and paths are one line before any work, worker errors
stay one line, a resumed or restarted run leaves a clean log; evaluate.py's outputs never
replace its inputs, and a full disk under any of them is one line that leaves no part of a
file."""
import copy
import json
import re
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from PIL import Image

from util import checkpoints
from util import engine, lr_sched, runs
import evaluate
import finetune
import masking
import train
from util.cli import UserError
from conftest import ROOT, fill_the_disk, finetuned, make_esanet, one_line_error, real_sample

PRE = ["--subset", "32", "--batch_size", "16", "--epochs", "2", "--warmup_epochs", "1", "--vis_every", "0"]


def log_epochs(folder) -> list:
    return [json.loads(line)["epoch"] for line in open(os.path.join(folder, "log.jsonl"))]


def test_a_folder_that_holds_a_run_is_refused_then_overwritten_on_request(tmp_path):
    out = str(tmp_path / "run")
    train.main(PRE + ["--out_dir", out])
    before = os.path.getmtime(os.path.join(out, "ckpt.pt"))
    for other in ([], ["--lr", "0.01"]):                  # the same settings or others
        with pytest.raises(UserError, match="holds a run .* --resume .* --overwrite"):
            train.main(PRE + other + ["--out_dir", out])
    assert os.path.getmtime(os.path.join(out, "ckpt.pt")) == before and log_epochs(out) == [1, 2]
    with pytest.raises(UserError, match="holds a run"):    # a pre-training folder given to finetune.py
        finetune.main(["--pretrained", os.path.join(out, "ckpt.pt"), "--subset", "32", "--out_dir", out])
    open(os.path.join(out, "ckpt.pt.tmp999"), "wb").close()        # what a crash mid-write leaves
    train.main(PRE + ["--out_dir", out, "--overwrite", "--epochs", "1"])
    assert log_epochs(out) == [1]                                     # no second epoch-1 line
    assert not [f for f in os.listdir(out) if ".tmp" in f or f == runs.PREVIOUS_RUN]   # the old run gone
    with pytest.raises(UserError, match="pass one of them"):
        train.main(PRE + ["--out_dir", out, "--overwrite", "--resume"])


def test_resume_rewrites_the_log_from_the_checkpoint_and_works_after_a_move(tmp_path):
    a = tmp_path / "a"
    train.main(PRE + ["--out_dir", str(a), "--stop_after", "3"])     # inside epoch 2
    with open(a / "log.jsonl", "a") as f:                            # an epoch logged after the checkpoint
        f.write(json.dumps({"epoch": 2, "mode": "sttp", "loss": 1.0}) + "\n")
    moved = tmp_path / "moved"
    os.rename(a, moved)
    train.main(["--resume", "--out_dir", str(moved)])
    assert log_epochs(moved) == [1, 2]
    uninterrupted = tmp_path / "b"
    train.main(PRE + ["--out_dir", str(uninterrupted)])
    x = torch.load(moved / "ckpt.pt", weights_only=False)["model"]
    y = torch.load(uninterrupted / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("saved_fused,resumed_fused", [(True, False), (False, True)])
def test_resume_may_switch_the_optimizer_implementation(saved_fused, resumed_fused):
    # --compile picks AdamW's fused kernel and is run-control: a resume takes the
    # checkpoint's moments and hyperparameters, and this invocation's implementation.
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    saved = torch.optim.AdamW(net.parameters(), lr=0.1, fused=saved_fused)
    for _ in range(2):
        saved.zero_grad()
        net(torch.randn(5, 4)).square().sum().backward()
        saved.step()
    resumed = torch.optim.AdamW(net.parameters(), lr=0.5, fused=resumed_fused)
    checkpoints.load_optimizer_state(resumed, copy.deepcopy(saved.state_dict()))   # as from torch.load
    assert [g["fused"] for g in resumed.param_groups] == [resumed_fused]
    assert [g["lr"] for g in resumed.param_groups] == [0.1]            # the checkpoint's
    start = [p.detach().clone() for p in net.parameters()]
    saved.step()
    by_saved = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p, w in zip(net.parameters(), start):
            p.copy_(w)
    resumed.step()                                                     # the same update
    for p, w, want in zip(net.parameters(), start, by_saved):
        assert not torch.equal(p, w)
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flags,words", [
    (["--out_dir", ""], "--out_dir is empty"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr_warmup_epochs", "nan"], "--lr_warmup_epochs must be a finite number"),
    (["--weight_decay", "nan"], "--weight_decay must be a finite number"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--token_weight", "nan"], "--token_weight must be a finite number"),
    (["--clip_grad", "nan"], "--clip_grad must be a finite number"),
    (["--min_lr", "nan"], "--min_lr must be a finite number"),
    (["--min_lr", "1"], "--min_lr 1.0 is above --lr"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--alpha", "inf"], "--alpha must be a finite number"),
    (["--p_drop", "nan"], "--p_drop must be a finite number"),
    (["--device", "foo"], "--device foo: choose auto, cpu, cuda or cuda:N"),
    (["--device", "gpu"], "--device gpu: choose"),
    (["--data_root", "data/nyu"], "the synthetic rooms are generated"),
    (["--teacher", "t.pt"], "--teacher is the frozen teacher of --mode kd"),
    # nothing finetune.py could segment from (it failed there with an IndexError)
    (["--modalities", "semseg", "--mode", "mim"], "--modalities semseg: none of them is an input a segmenter takes "
                                                  "(rgb, depth), so finetune.py could not use this pre-training"),
    (["--epoch", "1"], "unrecognized arguments: --epoch"),          # no abbreviations
])
def test_bad_flags_are_one_line_before_any_work(tmp_path, flags, words):
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train.main(["--out_dir", str(out)] + flags if "--out_dir" not in flags else flags)
    assert "\n" not in str(e.value) and words in str(e.value), str(e.value)
    assert not out.exists()


def test_output_paths_are_checked_up_front(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="a file is there, not a folder"):
        train.main(["--out_dir", str(tmp_path / "file")])
    with pytest.raises(UserError, match="is a file, not a folder"):
        finetune.main(["--pretrained", "none", "--out_dir", str(tmp_path / "file" / "sub")])


def test_dirichlet_alpha_nan_does_not_hang():
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            masking.dirichlet_visible_counts(torch.ones(2, 3, dtype=torch.bool), 8, alpha)


def test_finetuning_writes_the_loss_curve_it_promises(tmp_path):
    finetune.main(["--pretrained", "none", "--subset", "32", "--batch_size", "16", "--epochs", "1",
                   "--out_dir", str(tmp_path)])
    assert (tmp_path / "loss_curve.png").stat().st_size > 0


@pytest.mark.slow
def test_a_data_error_in_a_worker_process_is_one_line(tmp_path):
    rgb, label40, depth, _ = real_sample()
    make_esanet(str(tmp_path / "nyu"), rgb, label40, depth)
    from PIL import Image
    bad = np.full(label40.shape, 99, np.uint8)                   # read in the worker, not at start-up
    Image.fromarray(bad).save(tmp_path / "nyu" / "train" / "labels_40" / "0001.png")
    p = subprocess.run([sys.executable, "finetune.py", "--dataset", "nyu", "--data_root", str(tmp_path / "nyu"),
                        "--pretrained", "none", "--batch_size", "1", "--epochs", "1", "--workers", "1",
                        "--out_dir", str(tmp_path / "ft")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "outside the class set" in lines[0], \
        p.stderr[-2000:]


def run_files(folder) -> dict:
    """The folder's files (its .previous_run/ too) and their bytes."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of PRE (2 epochs of 2 batches; m2im, one step a batch, is quick),
    made once; copy(dest) gives a copy."""
    folder = str(tmp_path_factory.mktemp("finished") / "run")
    train.main(PRE + ["--mode", "m2im", "--out_dir", folder])
    return lambda dest: str(shutil.copytree(folder, dest))


NAN = ["--overwrite", "--lr", "1e6", "--lr_warmup_epochs", "0"]      # the NaN guard at batch 2 (issue 20)


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, finished, monkeypatch):
    out = finished(tmp_path / "run")
    old = run_files(out)
    with pytest.raises(UserError, match="the loss became nan"):
        train.main(PRE + ["--out_dir", out] + NAN)
    assert run_files(out) == old

    def interrupted(obj, path):                   # Ctrl-C twice while the first checkpoint is written
        open(f"{path}.tmp1", "wb").close()
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(PRE + ["--out_dir", out, "--overwrite", "--epochs", "1"])
    assert run_files(out) == old


def test_an_overwrite_killed_before_its_first_checkpoint_is_named(tmp_path, finished):
    out = tmp_path / "run"
    finished(out)
    old = run_files(out)
    aside = out / runs.PREVIOUS_RUN          # what kill -9 leaves: the old run aside, a new log
    aside.mkdir()
    for f in os.listdir(out):
        if f != runs.PREVIOUS_RUN:
            os.rename(out / f, aside / f)
    (out / "log.jsonl").write_text(json.dumps({"epoch": 1, "mode": "mim", "loss": 1.0}) + "\n")
    for flags in ([], ["--resume"]):
        with pytest.raises(UserError) as e:
            train.main(PRE + ["--out_dir", str(out)] + flags)
        one_line_error(e, str(aside), "move those files back", "--overwrite")
    # --overwrite goes on; failing before its first checkpoint, it puts the older run back.
    with pytest.raises(UserError, match="the loss became nan"):
        train.main(PRE + ["--out_dir", str(out)] + NAN)
    assert run_files(out) == old
    # Killed after the new run's first checkpoint: .previous_run beside a ckpt.pt is a leftover.
    aside.mkdir()
    (aside / "log.jsonl").write_text("")
    train.main(["--out_dir", str(out), "--resume"])           # a finished run: nothing to do
    assert not aside.exists()


def test_a_run_stopped_before_its_first_checkpoint_offers_overwrite(tmp_path, finished):
    out = tmp_path / "run"
    finished(out)
    os.remove(out / "ckpt.pt")                     # killed while writing it: a log, a temporary file
    open(out / "ckpt.pt.tmp123", "wb").close()
    for flags in ([], ["--resume"]):
        with pytest.raises(UserError) as e:
            train.main(PRE + ["--out_dir", str(out)] + flags)
        msg = one_line_error(e, "no ckpt.pt", "nothing to resume", "--overwrite")
        assert "pass --resume" not in msg
    with pytest.raises(UserError) as e:
        train.main(["--resume", "--out_dir", str(tmp_path / "empty")])
    one_line_error(e, "ckpt.pt", "nothing to resume", "without --resume")


def test_resume_with_more_epochs_extends_a_finished_run(tmp_path, finished, monkeypatch):
    out = finished(tmp_path / "run")                # 2 epochs of 2 batches
    with pytest.raises(UserError) as e:
        train.main(["--resume", "--out_dir", out, "--epochs", "1"])
    one_line_error(e, "--epochs 1", "has done 2 epoch(s)", "--epochs 2 or more")
    with pytest.raises(UserError, match="--lr 0.5 differs"):             # the other settings still may not change
        train.main(["--resume", "--out_dir", out, "--epochs", "3", "--lr", "0.5"])
    lrs = []
    monkeypatch.setattr(engine, "set_lr", lambda optimizer, lr: lrs.append(lr))
    train.main(["--resume", "--out_dir", out, "--epochs", "3"])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert log_epochs(out) == [1, 2, 3] and ckpt["epoch"] == 3 and ckpt["config"]["epochs"] == 3
    cfg = train.TrainConfig()
    assert lrs == [lr_sched.lr_at(4 + b, 6, 1, cfg.lr, cfg.min_lr) for b in range(2)]    # over the new total


def test_a_checkpoint_with_other_weights_is_one_line(tmp_path, finished):
    out = tmp_path / "run"
    finished(out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    ckpt["model"]["output_adapters.lidar.weight"] = torch.zeros(1)
    missing = sorted(ckpt["model"])[0]
    del ckpt["model"][missing]
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(UserError) as e:
        train.main(["--resume", "--out_dir", str(out), "--epochs", "3"])
    one_line_error(e, str(out / "ckpt.pt"), f"1 missing: {missing}", "1 unexpected: output_adapters.lidar.weight")


# --- evaluate.py: an output never replaces an input ------------------------------------------


def files_and_bytes(folder) -> dict:
    """Every file under `folder` (links as where they point) and its bytes or target."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = os.readlink(p) if os.path.islink(p) else open(p, "rb").read()
    return out


def test_no_output_of_evaluate_replaces_an_input(tmp_path):
    finetuned(tmp_path / "ckpt.pt")
    checkpoints.export_safetensors(checkpoints.load_checkpoint(str(tmp_path / "ckpt.pt")), str(tmp_path / "m.safetensors"))
    for folder in ("imgs", "deps", "o2", "onnx"):
        os.makedirs(tmp_path / folder)
    rgb = np.zeros((8, 8, 3), np.uint8)
    depth = np.full((8, 8), 2000, np.uint16)
    for path, array in (("in.png", rgb), ("d.png", depth), ("imgs/a.png", rgb), ("deps/a.png", depth)):
        Image.fromarray(array).save(tmp_path / path)
    os.symlink(tmp_path / "in.png", tmp_path / "link.png")
    os.symlink(tmp_path / "imgs" / "a.png", tmp_path / "o2" / "a.png")     # a class map's name that is an input
    shutil.copy(tmp_path / "ckpt.pt", tmp_path / "onnx" / "rgb.onnx")       # a checkpoint where a graph would go
    before = files_and_bytes(tmp_path)
    t = lambda *p: str(tmp_path.joinpath(*p))
    ckpt, st = ["--ckpt", t("ckpt.pt")], ["--ckpt", t("m.safetensors")]
    cases = [
        (ckpt + ["--rgb", t("in.png"), "--out", t("in.png")], f"--out {t('in.png')}: that is the --rgb file"),
        (ckpt + ["--depth", t("d.png"), "--out", t(".", "d.png")], "that is the --depth file", t("d.png")),
        (ckpt + ["--rgb", t("in.png"), "--depth", t("d.png"), "--out", t("link.png")], "link.png: that is the --rgb file"),
        (ckpt + ["--rgb", t("imgs"), "--out", t("imgs")], f"--out {t('imgs')}: that is the --rgb folder"),
        (ckpt + ["--rgb", t("imgs"), "--depth", t("deps"), "--out", t("deps") + "/"], "that is the --depth folder"),
        (ckpt + ["--rgb", t("imgs"), "--out", t("o2")], f"--out {t('o2', 'a.png')}: that is the --rgb file",
         t("imgs", "a.png")),
        (ckpt + ["--out_json", t("ckpt.pt")], f"--out_json {t('ckpt.pt')}: that is the --ckpt file"),
        (ckpt + ["--save_vis", t("ckpt.pt")], f"--save_vis {t('ckpt.pt')}: that is the --ckpt file"),
        (st + ["--out_json", t("m.json")], f"--out_json {t('m.json')}: that is the --ckpt's .json file"),
        (st + ["--export_safetensors", t("m.safetensors")], "--export_safetensors", "that is the --ckpt file"),
        (["--ckpt", t("m.json"), "--export_safetensors", t("m.safetensors")],
         f"--export_safetensors's .json {t('m.json')}: that is the --ckpt file"),
        (["--ckpt", t("onnx", "rgb.onnx"), "--export_onnx", t("onnx")], f"--export_onnx {t('onnx', 'rgb.onnx')}: that "
                                                                          f"is the --ckpt file"),
    ]
    for flags, *needles in cases:
        with pytest.raises(UserError) as e:
            evaluate.main(flags)
        one_line_error(e, *needles, "an input; outputs never replace inputs: give another")
    assert files_and_bytes(tmp_path) == before                      # nothing written, nothing replaced
    # A folder inside an input folder is another folder: the class maps go there.
    evaluate.main(ckpt + ["--rgb", t("imgs"), "--out", t("imgs", "seg")])
    assert os.listdir(tmp_path / "imgs" / "seg") == ["a.png"] and files_and_bytes(tmp_path / "imgs")["a.png"] == \
        before["imgs/a.png"]


# --- a full disk under evaluate.py's outputs: one line, no part of a file ----------------------


def no_temporary_files(folder) -> bool:
    return not [f for _, _, files in os.walk(folder) for f in files if ".tmp" in f]


def test_a_full_disk_under_evaluate_is_one_line(tmp_path, monkeypatch):
    rgb, label40, depth, _ = real_sample()
    make_esanet(str(tmp_path / "nyu"), rgb[:96, :128], label40[:96, :128], depth[:96, :128])
    finetuned(tmp_path / "ckpt.pt", "nyu")
    for i in range(3):
        os.makedirs(tmp_path / "imgs", exist_ok=True)
        Image.fromarray(rgb[40 * i:40 * i + 48, 50 * i:50 * i + 64]).save(tmp_path / "imgs" / f"img{i}.png")
    ckpt = ["--ckpt", str(tmp_path / "ckpt.pt")]
    dataset = ckpt + ["--data_root", str(tmp_path / "nyu")]
    # files pointed at a full device: --out_json, and --out through a link
    with pytest.raises(UserError) as e:
        evaluate.main(dataset + ["--out_json", "/dev/full", "--save_vis", ""])
    one_line_error(e, "/dev/full: no space left on device")
    os.symlink("/dev/full", tmp_path / "full.png")
    with pytest.raises(UserError) as e:
        evaluate.main(ckpt + ["--rgb", str(tmp_path / "imgs" / "img0.png"), "--out", str(tmp_path / "full.png")])
    one_line_error(e, f"{tmp_path / 'full.png'}: no space left on device")
    # folders: the disk fills while the second class map, or the first picture, is written
    evaluate.main(ckpt + ["--rgb", str(tmp_path / "imgs"), "--out", str(tmp_path / "ok")])
    evaluate.main(dataset + ["--out_json", str(tmp_path / "ok.json"), "--save_vis", ""])
    with monkeypatch.context() as m:
        fill_the_disk(m, room=os.path.getsize(tmp_path / "ok" / "img0.png") + 10)
        with pytest.raises(UserError) as e:
            evaluate.main(ckpt + ["--rgb", str(tmp_path / "imgs"), "--out", str(tmp_path / "segs")])
    one_line_error(e, f"{tmp_path / 'segs' / 'img1.png'}: no space left on device (nothing there was changed)")
    assert files_and_bytes(tmp_path / "segs") == {"img0.png": open(tmp_path / "ok" / "img0.png", "rb").read()}
    with monkeypatch.context() as m:
        fill_the_disk(m, room=os.path.getsize(tmp_path / "ok.json") + 10)
        with pytest.raises(UserError) as e:
            evaluate.main(dataset + ["--out_json", str(tmp_path / "r.json"), "--save_vis", str(tmp_path / "vis")])
    one_line_error(e, f"{tmp_path / 'vis' / '000_0001.png'}: no space left on device")
    assert os.listdir(tmp_path / "vis") == [] and open(tmp_path / "r.json").read() == open(tmp_path / "ok.json").read()
    assert no_temporary_files(tmp_path)


@pytest.mark.slow
def test_a_full_disk_under_an_onnx_export_is_one_line(tmp_path, capsys):
    finetuned(tmp_path / "ckpt.pt")
    os.makedirs(tmp_path / "onnx")
    os.symlink("/dev/full", tmp_path / "onnx" / "rgb.onnx")
    with pytest.raises(UserError) as e:
        evaluate.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--export_onnx", str(tmp_path / "onnx"), "--only", "rgb"])
    one_line_error(e, f"{tmp_path / 'onnx' / 'rgb.onnx'}: no space left on device")
    assert "exporter failed" not in capsys.readouterr().out           # no second exporter tried on a full disk
    assert os.listdir(tmp_path / "onnx") == ["rgb.onnx"] and os.path.islink(tmp_path / "onnx" / "rgb.onnx")


# --- one run per folder (issue 28) ----------------------------------------------------------------

HOLD = """import sys, time
sys.path.insert(0, {root!r})
from util import runs
runs.claim_out_dir({out!r})
print("held", flush=True)
time.sleep(120)
"""


def test_a_folder_another_run_holds_is_refused(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, out=out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--overwrite"]):
            with pytest.raises(UserError) as e:
                train.main(PRE + extra + ["--out_dir", out])
            one_line_error(e, f"another run (process {holder.pid}) is using it", os.path.join(out, runs.LOCK))
        with pytest.raises(UserError, match="is using it"):
            finetune.main(["--pretrained", "none", "--subset", "32", "--out_dir", out])
        assert os.listdir(out) == [runs.LOCK]                     # nothing written, the holder's lock kept
    finally:
        holder.kill()
        holder.wait()
    # its holder killed (kill -9 leaves the lock): named, with what to do
    with pytest.raises(UserError) as e:
        train.main(PRE + ["--out_dir", out])
    one_line_error(e, f"left by process {holder.pid}, which is no longer running", f"remove {out}")
    os.remove(os.path.join(out, runs.LOCK))
    train.main(PRE + ["--out_dir", out, "--epochs", "1"])
    assert runs.LOCK not in os.listdir(out)                       # the run let it go at its end


def test_a_run_lets_its_folder_go_however_it_ends(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="the loss became nan"):
        train.main(PRE + ["--out_dir", str(out), "--lr", "1e30"])
    assert runs.LOCK not in os.listdir(out)
    with pytest.raises(UserError, match="holds a run"):            # refused: nothing left either
        train.main(PRE + ["--out_dir", str(out)])
    assert runs.LOCK not in os.listdir(out)
    with pytest.raises(UserError):                                 # refused at its checks: no folder made
        train.main(PRE + ["--out_dir", str(tmp_path / "new"), "--resume"])
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder(tmp_path):
    out = str(tmp_path / "run")
    cmd = lambda seed: [sys.executable, "train.py", *PRE, "--epochs", "1", "--seed", str(seed), "--out_dir", out]
    procs = [subprocess.Popen(cmd(s), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert re.search(r"is using it|holds a run", refused) and refused.count("\n") == 1, refused
    winner = 1 + [rc for rc, _ in results].index(0)
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["seed"] == winner
    assert runs.LOCK not in os.listdir(out)
