"""The three scripts end to end on the embedded synthetic data: the pipeline runs, an
interrupted run resumes bit for bit, bad flags get one clear line."""
import json
import subprocess
import sys

import pytest
import torch

from util import engine, lr_sched
import evaluate
import finetune
import train
from util.cli import UserError
from conftest import ROOT


def cli(*args, cwd=None):
    """Run a script as a user would; returns (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.slow
def test_train_finetune_evaluate_smoke(tmp_path):
    pre, ft, res = tmp_path / "pre", tmp_path / "ft", tmp_path / "res.json"
    rc, out, err = cli("train.py", "--subset", "64", "--epochs", "2", "--warmup_epochs", "1",
                       "--out_dir", str(pre))
    assert rc == 0, err
    assert (pre / "ckpt.pt").is_file() and (pre / "loss_curve.png").is_file()
    log = [json.loads(line) for line in open(pre / "log.jsonl")]
    assert [h["mode"] for h in log] == ["mim", "sttp"]
    assert {"rgb", "depth", "semseg", "m2im_rgb", "m2im_depth", "m2im_semseg", "token"} <= set(log[1])
    rc, out, err = cli("finetune.py", "--pretrained", str(pre / "ckpt.pt"), "--subset", "64", "--epochs", "2",
                       "--out_dir", str(ft))
    assert rc == 0, err
    rc, out, err = cli("evaluate.py", "--ckpt", str(ft / "ckpt.pt"), "--out_json", str(res))
    assert rc == 0, err
    r = json.load(open(res))
    names = train.data.CLASS_NAMES["synthetic"]
    for setting in ("rgbd", "rgb", "depth"):
        assert 0 <= r[setting]["miou"] <= 100 and 0 <= r[setting]["macc"] <= 100
        assert list(r[setting]["per_class_iou"]) == list(names)
    assert "mIoU" in out and names[0] in out


def run_train(out_dir, *extra):
    return train.main(["--subset", "24", "--batch_size", "8", "--epochs", "3", "--warmup_epochs", "1",
                       "--out_dir", str(out_dir), "--budget", "24", *extra])


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    run_train(tmp_path / "a")
    # Interrupted twice: mid-epoch (after 4 of 9 batches, inside the first sttp epoch),
    # then at an epoch boundary; each part starts a fresh process state.
    run_train(tmp_path / "b", "--stop_after", "4")
    train.main(["--resume", "--out_dir", str(tmp_path / "b"), "--stop_after", "2"])
    train.main(["--resume", "--out_dir", str(tmp_path / "b")])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"]) == (3, 0)
    assert same_state(a["model"], b["model"])
    assert torch.equal(a["rng_state"]["mask"], b["rng_state"]["mask"])
    assert [round(h["loss"], 6) for h in a["history"]] == [round(h["loss"], 6) for h in b["history"]]


@pytest.mark.slow
def test_finetune_resume_equals_uninterrupted(tmp_path):
    run_train(tmp_path / "pre", "--epochs", "1")
    # Stochastic depth draws from the global RNG, which the resumed partial epoch must not
    # shift (engine.Loop._batches: the DataLoader's seed).
    args = ["--pretrained", str(tmp_path / "pre" / "ckpt.pt"), "--subset", "24", "--batch_size", "8",
            "--epochs", "2", "--drop_path", "0.2"]
    finetune.main(args + ["--out_dir", str(tmp_path / "a")])
    finetune.main(args + ["--out_dir", str(tmp_path / "b"), "--stop_after", "2"])
    finetune.main(["--resume", "--out_dir", str(tmp_path / "b")])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert same_state(a["model"], b["model"])


def test_resume_refuses_a_changed_setting(tmp_path):
    run_train(tmp_path / "a", "--stop_after", "1")
    with pytest.raises(UserError, match="--lr"):
        train.main(["--resume", "--out_dir", str(tmp_path / "a"), "--lr", "0.5"])


@pytest.mark.parametrize("script,args,needle", [
    ("train.py", ["--p_drop", "2"], "--p_drop"),
    ("train.py", ["--mode", "bert"], "--mode"),
    ("train.py", ["--epochs", "three"], "--epochs"),
    ("train.py", ["--budget", "500"], "--budget"),
    ("train.py", ["--mode", "kd"], "--teacher"),
    ("train.py", ["--dataset", "nyu", "--data_root", "/nonexistent/nyu"], "nyu"),
    ("train.py", ["--resume", "--out_dir", "/nonexistent/run"], "ckpt.pt"),
    ("finetune.py", ["--pretrained", "/nonexistent/ckpt.pt"], "train.py"),
    ("finetune.py", ["--p_missing", "-1", "--pretrained", "none"], "--p_missing"),
    ("evaluate.py", ["--ckpt", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    ("evaluate.py", ["--only", "lidar"], "--only"),
])
def test_bad_input_gets_one_line(script, args, needle):
    rc, out, err = cli(script, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err


def test_checkpoints_of_the_wrong_kind_are_refused(tmp_path):
    run_train(tmp_path / "pre", "--stop_after", "1")
    pre = str(tmp_path / "pre" / "ckpt.pt")
    with pytest.raises(UserError, match="not a fine-tuned one"):
        evaluate.main(["--ckpt", pre])
    with pytest.raises(UserError, match="not a fine-tuned one"):
        finetune.main(["--resume", "--out_dir", str(tmp_path / "pre")])
    finetune.main(["--pretrained", pre, "--subset", "24", "--batch_size", "8", "--stop_after", "1",
                   "--out_dir", str(tmp_path / "ft")])
    ft = str(tmp_path / "ft" / "ckpt.pt")
    for wrong in (["--mode", "kd", "--teacher", ft], ["--resume", "--out_dir", str(tmp_path / "ft")]):
        with pytest.raises(UserError, match="not a pre-training one"):
            run_train(tmp_path / "kd", *wrong) if "--teacher" in wrong else train.main(wrong)
    with pytest.raises(UserError, match="not a pre-training one"):
        finetune.main(["--pretrained", ft, "--out_dir", str(tmp_path / "ft2")])


def test_lr_schedule():
    assert lr_sched.lr_at(0, 100, 10, 1.0, 0.0) == 0.0
    assert lr_sched.lr_at(5, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_sched.lr_at(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_sched.lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)    # half-way down the cosine
    assert lr_sched.lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_layer_decay_groups():
    import model as M
    net = M.Segmenter(M.PRESETS["tiny"])
    groups = lr_sched.param_groups(net, 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    depth = len(net.encoder)
    assert scale[id(net.output_adapters["semseg"].final_layer.weight)] == 1.0
    assert scale[id(net.encoder[depth - 1].attn.qkv.weight)] == 0.5
    assert scale[id(net.input_adapters["rgb"].proj.weight)] == 0.5 ** (depth + 1)
    assert wd[id(net.encoder[0].attn.qkv.bias)] == 0.0 and wd[id(net.global_tokens)] == 0.0
    assert wd[id(net.encoder[0].attn.qkv.weight)] == 0.05


def test_dedicated_models(tmp_path, monkeypatch, capsys):
    """finetune.py --inputs: a dedicated rgb model has only the rgb adapter, is evaluated on
    rgb only (and says it skips the rest); a dedicated rgbd model always sees both inputs;
    --p_missing belongs to --inputs any."""
    base = ["--pretrained", "none", "--subset", "16", "--batch_size", "8", "--epochs", "1"]
    seen = []
    real = finetune.sample_present
    monkeypatch.setattr(finetune, "sample_present", lambda *a: seen.append(real(*a)) or seen[-1])
    finetune.main(base + ["--inputs", "rgbd", "--out_dir", str(tmp_path / "rgbd")])
    assert seen and all(p.all() for p in seen)
    net = finetune.main(base + ["--inputs", "rgb", "--out_dir", str(tmp_path / "rgb")])
    assert net.inputs == ("rgb",) and not any(k.startswith("input_adapters.depth") for k in net.state_dict())
    capsys.readouterr()
    out = evaluate.main(["--ckpt", str(tmp_path / "rgb" / "ckpt.pt"), "--out_json", str(tmp_path / "r.json"),
                         "--save_vis", ""])
    assert set(out) == {"rgb", "meta"} and "skipping rgbd, depth" in capsys.readouterr().out
    with pytest.raises(UserError, match="--only depth: .* takes rgb only"):
        evaluate.main(["--ckpt", str(tmp_path / "rgb" / "ckpt.pt"), "--only", "depth"])
    with pytest.raises(UserError, match="--p_missing chooses the inputs of --inputs any"):
        finetune.main(base + ["--inputs", "depth", "--p_missing", "0.5", "--out_dir", str(tmp_path / "d")])


def test_the_first_line_names_the_split_it_trains_on(tmp_path, capsys):
    train.main(["--split", "pool", "--subset", "16", "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "1",
                "--vis_every", "0", "--stop_after", "1", "--out_dir", str(tmp_path / "run")])
    first = capsys.readouterr().out.splitlines()[0]
    assert "on synthetic pool split (16 images)" in first, first
