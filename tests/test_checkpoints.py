"""checkpoints.py: loading a file never runs code (a pickle that would create a file is refused
through every path that loads one, in one line naming what it would create, and the file never
appears); the project's checkpoints hold plain data and round-trip; .safetensors + .json out
and in again give the same numbers; a full disk is one line that loses nothing; a checkpoint
that lacks what a script reads is one line naming what it lacks."""
import dataclasses
import importlib.util
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from util import checkpoints
import evaluate
import finetune
import model as M
from studies import reproduce
import train
from util.cli import UserError
from conftest import ROOT, fill_the_disk, fixture_path, make_esanet, one_line_error, real_sample, tiny

PRE = ["--subset", "16", "--batch_size", "16", "--epochs", "2", "--warmup_epochs", "1", "--vis_every", "0",
       "--device", "cpu"]
FT = ["--subset", "16", "--batch_size", "16", "--epochs", "1", "--device", "cpu"]


class MakesAFile:
    """Unpickled by a loader that runs code, it creates `marker` (os.system("touch ...")):
    what a malicious .pth does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def malicious(path, marker, kind="pretrain"):
    """A file laid out like the project's checkpoints, whose optimizer state is a MakesAFile."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cfg = tiny()
    torch.save({"model": {"global_tokens": torch.zeros(1, 1, cfg.width)}, "config": {"config": "tiny"},
                "kind": kind, "model_config": dataclasses.asdict(cfg), "dataset": "synthetic",
                "optimizer": MakesAFile(marker)}, path)
    return str(path)


def _fake_onnx(monkeypatch):
    """--export_onnx's check that onnx is installed passes (the load comes before any export)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "onnx" else find_spec(name, *a))


# Every path that loads a file of weights: (how to run it, where the file goes, its kind).
LOADERS = {
    "train --init": (lambda p, d: train.main(PRE + ["--init", p, "--out_dir", d]), "w.pth", "pretrain"),
    "finetune --init": (lambda p, d: finetune.main(FT + ["--init", p, "--out_dir", d]), "w.pth", "pretrain"),
    "finetune --pretrained": (lambda p, d: finetune.main(FT + ["--pretrained", p, "--out_dir", d]), "w.pth",
                              "pretrain"),
    "train --mode kd --teacher": (lambda p, d: train.main(PRE + ["--mode", "kd", "--teacher", p, "--out_dir", d]),
                                  "w.pth", "pretrain"),
    "evaluate --ckpt": (lambda p, d: evaluate.main(["--ckpt", p, "--out_json", f"{d}/r.json", "--save_vis", ""]),
                        "w.pth", "finetune"),
    "evaluate --ckpt --rgb": (lambda p, d: evaluate.main(["--ckpt", p, "--rgb", fixture_path("nyu_0001", "rgb.jpg"),
                                                          "--out", f"{d}/seg.png"]), "w.pth", "finetune"),
    "evaluate --ckpt --export_onnx": (lambda p, d: evaluate.main(["--ckpt", p, "--export_onnx", f"{d}/onnx"]),
                                      "w.pth", "finetune"),
    "evaluate --ckpt --export_safetensors": (
        lambda p, d: evaluate.main(["--ckpt", p, "--export_safetensors", f"{d}/m.safetensors"]), "w.pth", "finetune"),
    "train --resume": (lambda p, d: train.main(["--resume", "--out_dir", d]), "run/ckpt.pt", "pretrain"),
    "finetune --resume": (lambda p, d: finetune.main(["--resume", "--out_dir", d]), "run/ckpt.pt", "finetune"),
    # reproduce.py reads a finished run's ckpt.pt (its optimiser's step count): here a run
    # whose checkpoint was replaced by a malicious one.
    "reproduce _stage": (lambda p, d: reproduce._stage(d, lambda argv: None, []), "run/ckpt.pt", "pretrain"),
}


@pytest.mark.parametrize("name", list(LOADERS))
def test_a_pickle_that_would_run_code_is_refused_on_every_path(name, tmp_path, monkeypatch):
    run, where, kind = LOADERS[name]
    marker = tmp_path / "marker"
    path = malicious(tmp_path / where, marker, kind)
    if "export_onnx" in name:
        _fake_onnx(monkeypatch)
    with pytest.raises(UserError) as e:
        run(path, str(tmp_path / "run"))
    one_line_error(e, path, "refused: the file's pickle would create", "system", "only tensors and plain data")
    assert not marker.exists()


@pytest.mark.parametrize("payload,named", [
    (lambda m: (os.system, (f"touch {shlex.quote(m)}",)), "system"),
    (lambda m: (open, (m, "w")), "open"),
    (lambda m: (__import__("pathlib").Path.touch, (__import__("pathlib").Path(m),)), "getattr"),
])
def test_the_refusal_names_what_the_pickle_would_create(payload, named, tmp_path):
    marker = str(tmp_path / "marker")

    class Payload:
        def __reduce__(self):
            return payload(marker)

    torch.save({"model": {}, "args": Payload()}, tmp_path / "x.pth")
    with pytest.raises(UserError) as e:
        checkpoints.load_checkpoint(str(tmp_path / "x.pth"), "pretrain")
    one_line_error(e, "refused", named)
    assert not os.path.exists(marker)


def test_the_command_line_says_it_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    path = malicious(tmp_path / "ckpt.pt", marker, "finetune")
    p = subprocess.run([sys.executable, "evaluate.py", "--ckpt", path, "--out_json", str(tmp_path / "r.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}: refused"), p.stderr
    assert not marker.exists()


# --- the project's own checkpoints ------------------------------------------------------------


def test_own_checkpoints_are_plain_data_and_round_trip(tmp_path):
    """Pre-training with float16's loss scaler (its state is saved too) and fine-tuning from
    it: each checkpoint loads with weights_only=True and no allow-list, and load_checkpoint
    gives back what torch.save wrote."""
    pre, ft = str(tmp_path / "pre"), str(tmp_path / "ft")
    train.main(PRE + ["--dtype", "float16", "--stop_after", "1", "--out_dir", pre])
    finetune.main(FT + ["--pretrained", f"{pre}/ckpt.pt", "--out_dir", ft])
    for folder, kind in ((pre, "pretrain"), (ft, "finetune")):
        plain = torch.load(f"{folder}/ckpt.pt", weights_only=True)       # no allow-list
        ckpt = checkpoints.load_checkpoint(f"{folder}/ckpt.pt", kind, resume=True)
        assert ckpt.keys() == plain.keys() and ckpt["config"] == plain["config"] and ckpt["history"] == plain["history"]
        assert all(torch.equal(ckpt["model"][k], v) for k, v in plain["model"].items())
    assert "scale" in torch.load(f"{pre}/ckpt.pt", weights_only=True)["scaler"]


def test_a_checkpoint_that_is_not_plain_data_is_not_written(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(TypeError, match=r"checkpoint\['history'\]\[0\]\['loss'\] is a numpy.float64, not plain"):
        checkpoints.save_checkpoint({"model": {}, "history": [{"loss": np.float64(1.0)}]}, str(path))
    assert not os.listdir(tmp_path)


# --- a full disk ----------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoints.save_checkpoint({"model": {"w": torch.zeros(4)}, "epoch": 1}, path)
    before = open(path, "rb").read()
    fill_the_disk(monkeypatch)
    with pytest.raises(UserError) as e:
        checkpoints.save_checkpoint({"model": {"w": torch.randn(100_000)}, "epoch": 2}, path)
    one_line_error(e, path, "no space left on device", "nothing there was changed")
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["ckpt.pt"]   # no temporary file
    with pytest.raises(UserError, match="no space left on device"):             # an export too
        checkpoints.export_safetensors({"model": {"w": torch.randn(100_000)}}, str(tmp_path / "m.safetensors"))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_failing_torch_save_is_one_line(tmp_path, monkeypatch):
    def fails(obj, f):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598\nmore")

    monkeypatch.setattr(torch, "save", fails)
    with pytest.raises(UserError) as e:
        checkpoints.save_checkpoint({"model": {}}, str(tmp_path / "ckpt.pt"))
    one_line_error(e, "ckpt.pt: cannot be written ([enforce fail")
    assert not os.listdir(tmp_path)


def test_training_onto_a_full_disk_stops_with_one_line(tmp_path, monkeypatch):
    fill_the_disk(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train.main(PRE + ["--stop_after", "1", "--out_dir", str(out)])
    one_line_error(e, out / "ckpt.pt", "no space left on device")
    assert not [f for f in os.listdir(out) if "ckpt" in f]


def test_a_disk_too_full_for_the_log_stops_with_one_line(tmp_path, monkeypatch):
    # log.jsonl (a line per epoch) and the loss curve are written whole too: the first write
    # of the run fails here, and leaves neither half a line nor a temporary file
    fill_the_disk(monkeypatch, room=50)
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train.main(PRE + ["--stop_after", "1", "--out_dir", str(out)])
    one_line_error(e, out / "log.jsonl", "no space left on device")
    assert os.listdir(out) == []


# --- what each script needs ---------------------------------------------------------------------


def _saved(path, drop=(), **changes):
    """A tiny fine-tuned checkpoint laid out as finetune.py writes one, minus `drop`, with `changes`."""
    cfg = tiny()
    ckpt = {"model": M.Segmenter(cfg).state_dict(), "config": {"config": "tiny"}, "kind": "finetune",
            "model_config": dataclasses.asdict(cfg), "dataset": "synthetic", **changes}
    torch.save({k: v for k, v in ckpt.items() if k not in drop}, path)
    return str(path)


def test_a_checkpoint_lacking_what_a_script_reads_is_one_line(tmp_path):
    ev = lambda p: evaluate.main(["--ckpt", p, "--out_json", str(tmp_path / "r.json"), "--save_vis", ""])
    with pytest.raises(UserError) as e:
        ev(_saved(tmp_path / "a.pt", drop=("model_config",)))
    one_line_error(e, "a.pt: not a MaskMentor fine-tuned checkpoint: it lacks model_config")
    with pytest.raises(UserError) as e:
        finetune.main(FT + ["--pretrained", _saved(tmp_path / "b.pt", drop=("model_config",), kind="pretrain"),
                            "--out_dir", str(tmp_path / "ft")])
    one_line_error(e, "b.pt: not a MaskMentor pre-training checkpoint: it lacks model_config")
    with pytest.raises(UserError) as e:
        ev(_saved(tmp_path / "c.pt", drop=("dataset",)))
    one_line_error(e, "c.pt", "it lacks data")
    with pytest.raises(UserError) as e:                          # MAE's layout given as a MaskMentor checkpoint
        torch.save({"model": {"cls_token": torch.zeros(1)}, "epoch": 1}, tmp_path / "mae.pth")
        ev(str(tmp_path / "mae.pth"))
    one_line_error(e, "it lacks config, model_config, kind", "--init reads MAE")
    with pytest.raises(UserError) as e:
        ev(_saved(tmp_path / "d.pt", model={"w": "not a tensor"}))
    one_line_error(e, "d.pt", "its model['w'] is a str, not a tensor")
    with pytest.raises(UserError) as e:
        ev(_saved(tmp_path / "e.pt", kind="pretrain"))
    one_line_error(e, "e.pt: a pre-training checkpoint, not a fine-tuned one (finetune.py writes those)")
    with pytest.raises(UserError) as e:
        ev(_saved(tmp_path / "f.pt", model_config={**dataclasses.asdict(tiny()), "colour": 1}))
    one_line_error(e, "f.pt: its model_config does not fit this version", "colour")
    with pytest.raises(UserError) as e:
        ev(_saved(tmp_path / "g.pt", model_config=dataclasses.asdict(tiny(width=64))))
    one_line_error(e, "g.pt: its weights do not fit the network its settings build")
    with pytest.raises(UserError) as e:                          # an export cannot be resumed
        checkpoints.load_checkpoint(_saved(tmp_path / "h.pt"), "finetune", resume=True)
    one_line_error(e, "h.pt", "it lacks optimizer, rng_state, epoch, batch, history")


# --- .safetensors + .json ------------------------------------------------------------------------


def test_an_exported_fine_tuned_model_evaluates_to_the_same_numbers(tmp_path):
    rgb, label40, depth, _ = real_sample()
    root = str(tmp_path / "nyu")
    make_esanet(root, rgb[:96, :128], label40[:96, :128], depth[:96, :128])
    finetune.main(["--dataset", "nyu", "--data_root", root, "--pretrained", "none", "--batch_size", "1",
                   "--epochs", "1", "--device", "cpu", "--out_dir", str(tmp_path / "ft")])
    shared = str(tmp_path / "share" / "model.safetensors")
    evaluate.main(["--ckpt", str(tmp_path / "ft" / "ckpt.pt"), "--export_safetensors", shared])
    assert sorted(os.listdir(tmp_path / "share")) == ["model.json", "model.safetensors"]
    results = [evaluate.main(["--ckpt", ckpt, "--data_root", root, "--out_json", str(tmp_path / f"{i}.json"),
                              "--save_vis", "", "--device", "cpu"])
               for i, ckpt in enumerate((str(tmp_path / "ft" / "ckpt.pt"), shared))]
    for r in results:
        r.pop("meta")
    assert results[0] == results[1]
    seg = [evaluate.main(["--ckpt", ckpt, "--rgb", fixture_path("nyu_0001", "rgb.jpg"), "--out",
                          str(tmp_path / f"seg{i}.png")])["pred"] for i, ckpt in enumerate((str(tmp_path / "ft/ckpt.pt"), shared))]
    assert torch.equal(seg[0], seg[1])                          # and the data conventions came along
    os.remove(tmp_path / "share" / "model.json")
    with pytest.raises(UserError) as e:
        evaluate.main(["--ckpt", shared, "--save_vis", ""])
    one_line_error(e, "model.safetensors: no", "model.json beside it")


def test_an_exported_pre_training_checkpoint_fine_tunes_and_initialises_alike(tmp_path):
    pre = str(tmp_path / "pre" / "ckpt.pt")
    train.main(PRE + ["--stop_after", "1", "--out_dir", str(tmp_path / "pre")])
    shared = str(tmp_path / "pre.safetensors")
    evaluate.main(["--ckpt", pre, "--export_safetensors", shared])
    weights = []
    for i, source in enumerate((pre, shared)):
        finetune.main(FT + ["--pretrained", source, "--stop_after", "1", "--out_dir", str(tmp_path / f"ft{i}")])
        weights.append(torch.load(tmp_path / f"ft{i}" / "ckpt.pt", weights_only=True)["model"])
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    nets = [M.MaskMentor(M.ModelConfig.from_dict(checkpoints.load_checkpoint(pre)["model_config"])) for _ in range(2)]
    for net, source in zip(nets, (pre, shared)):
        checkpoints.init_encoder(net, source)
    own = M.MaskMentor(nets[0].cfg)
    own.load_state_dict(torch.load(pre, weights_only=True)["model"])
    for k, v in own.state_dict().items():
        assert torch.equal(nets[0].state_dict()[k], nets[1].state_dict()[k]), k
        if k.startswith(("encoder.", "global_tokens", "input_adapters.")):
            assert torch.equal(nets[1].state_dict()[k], v), k


def test_export_checks_its_output_before_any_work(tmp_path):
    missing = ["--ckpt", str(tmp_path / "no_such_ckpt.pt")]     # never reached
    (tmp_path / "file").write_text("x")
    for flags, words in ((["--export_safetensors", str(tmp_path / "m.pt")], "must end in .safetensors"),
                         (["--export_safetensors", str(tmp_path / "file" / "m.safetensors")], "is a file, not a folder"),
                         (["--export_safetensors", str(tmp_path / "m.safetensors"), "--export_onnx", "o"],
                          "in another run")):
        with pytest.raises(UserError) as e:
            evaluate.main(missing + flags)
        one_line_error(e, words)


# --- what a loaded file holds: fields and tensors (issue 28) --------------------------------------


@pytest.fixture(scope="module")
def shared_model(tmp_path_factory):
    """A tiny fine-tuned model exported as .safetensors + .json; returns (folder, its json)."""
    d = tmp_path_factory.mktemp("shared")
    from conftest import finetuned
    import data
    finetuned(d / "ckpt.pt", conventions=data.conventions("synthetic", 64))
    evaluate.main(["--ckpt", str(d / "ckpt.pt"), "--export_safetensors", str(d / "m.safetensors")])
    import json
    return d, json.load(open(d / "m.json"))


@pytest.mark.parametrize("where,value,words", [
    (("data", "image_size"), "big", "data.image_size must be a positive integer, got 'big'"),
    (("data", "classes"), None, "data.classes must be a list of 10 class names"),
    (("data", "classes"), ["a"] * 3, "data.classes must be a list of 10 class names"),
    (("data", "rgb_std"), [0, 0, 0], "data.rgb_std must be a list of 3 positive finite numbers"),
    (("data", "rgb_mean"), [0.5, "x", 0.3], "data.rgb_mean must be a list of 3 finite numbers"),
    (("data", "depth_unit"), "inches", "data.depth_unit must be 'metres'"),
    (("data", "dataset"), "kitti", "data.dataset must be one of synthetic, nyu, sun"),
    (("model_config", "image_size"), "big", "model_config.image_size must be a positive integer"),
    (("model_config", "num_heads"), 3, "model_config.width 128 must be a multiple of 4 and of num_heads 3"),
    (("model_config", "drop_path"), 2.0, "drop_path must be in [0, 1)"),
    (("model_config",), [1, 2], "its model_config is a list, not a dict"),
])
def test_every_field_of_a_shared_models_json_is_checked(shared_model, tmp_path, where, value, words):
    import json
    d, meta = shared_model
    meta = json.loads(json.dumps(meta))
    target = meta
    for k in where[:-1]:
        target = target[k]
    target[where[-1]] = value
    shutil_copy = __import__("shutil").copy
    shutil_copy(d / "m.safetensors", tmp_path / "m.safetensors")
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        evaluate.main(["--ckpt", str(tmp_path / "m.safetensors"), "--save_vis", "", "--out_json",
                       str(tmp_path / "r.json")])
    one_line_error(e, str(tmp_path / "m.json"), words)
    assert not (tmp_path / "r.json").exists()


def _weights(path, change):
    """A tiny fine-tuned checkpoint whose state dict went through `change` (key, tensor) -> tensor."""
    cfg = tiny()
    state = {k: change(k, v) for k, v in M.Segmenter(cfg).state_dict().items()}
    torch.save({"model": state, "config": {"config": "tiny"}, "kind": "finetune",
                "model_config": dataclasses.asdict(cfg), "dataset": "synthetic"}, path)
    return str(path)


@pytest.mark.parametrize("change,words", [
    (lambda k, v: v.to(torch.int32) if k.endswith("weight") else v, "torch.int32, not floating point"),
    (lambda k, v: v.to(torch.complex64) if k.endswith("qkv.weight") else v, "torch.complex64, not floating point"),
    (lambda k, v: torch.full_like(v, float("nan")), "holds NaN or infinite values"),
    (lambda k, v: v.masked_fill(v.abs() >= 0, float("inf")) if k == "global_tokens" else v, "NaN or infinite"),
])
def test_weights_of_the_wrong_kind_are_refused(tmp_path, change, words):
    path = _weights(tmp_path / "w.pt", change)
    with pytest.raises(UserError) as e:
        evaluate.main(["--ckpt", path, "--rgb", fixture_path("nyu_0001", "rgb.jpg"), "--out", str(tmp_path / "s.png")])
    one_line_error(e, "w.pt", words)
    assert not (tmp_path / "s.png").exists()


def test_a_view_claiming_more_than_its_storage_is_refused_before_it_is_materialised(tmp_path):
    # 100000 x 100000 float32 values (40 GB) claimed by a stride-0 view of one number
    huge = torch.zeros(1).as_strided((100000, 100000), (0, 0))
    path = _weights(tmp_path / "v.pt", lambda k, v: huge if k == "global_tokens" else v)
    for argv in (["--ckpt", path, "--export_safetensors", str(tmp_path / "x.safetensors")],
                 ["--ckpt", path, "--save_vis", "", "--out_json", str(tmp_path / "r.json")]):
        with pytest.raises(UserError) as e:
            evaluate.main(argv)
        one_line_error(e, "v.pt", "global_tokens claims (100000, 100000)", "a crafted view, refused")
    assert not (tmp_path / "x.safetensors").exists()
    torch.save({"blocks.0.norm1.weight": huge}, tmp_path / "vit.pth")               # through --init too
    with pytest.raises(UserError) as e:
        train.main(PRE + ["--init", str(tmp_path / "vit.pth"), "--out_dir", str(tmp_path / "run")])
    one_line_error(e, "--init", "vit.pth", "a crafted view, refused")


def test_init_refuses_integer_weights_it_would_load(tmp_path):
    import timm
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    state = {k: (v.to(torch.int64) if k == "blocks.0.attn.qkv.weight" else v) for k, v in vit.state_dict().items()}
    torch.save(state, tmp_path / "vit.pth")
    net = M.MaskMentor(M.PRESETS["base"])
    with pytest.raises(UserError) as e:
        checkpoints.init_encoder(net, str(tmp_path / "vit.pth"))
    one_line_error(e, "--init", "encoder.0.attn.qkv.weight is torch.int64, not floating point")


def test_an_export_never_replaces_an_existing_file_unasked(tmp_path, shared_model):
    d, _ = shared_model
    (tmp_path / "m.json").write_text("{}")                                   # only the .json is there
    with pytest.raises(UserError) as e:
        evaluate.main(["--ckpt", str(d / "ckpt.pt"), "--export_safetensors", str(tmp_path / "m.safetensors")])
    one_line_error(e, "m.json: exists", "--overwrite")
    assert (tmp_path / "m.json").read_text() == "{}" and not (tmp_path / "m.safetensors").exists()
    evaluate.main(["--ckpt", str(d / "ckpt.pt"), "--export_safetensors", str(tmp_path / "m.safetensors"),
                   "--overwrite"])
    assert (tmp_path / "m.json").read_text() != "{}"
    with pytest.raises(UserError, match="--overwrite replaces an existing --export_safetensors pair"):
        evaluate.main(["--ckpt", str(d / "ckpt.pt"), "--overwrite"])


def test_the_extension_is_read_in_any_case(tmp_path, shared_model):
    d, _ = shared_model
    import shutil
    shutil.copy(d / "m.safetensors", tmp_path / "M.SAFETENSORS")
    shutil.copy(d / "m.json", tmp_path / "M.json")
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "M.SAFETENSORS"), "finetune")
    same = checkpoints.load_checkpoint(str(d / "m.safetensors"), "finetune")
    assert all(torch.equal(ckpt["model"][k], same["model"][k]) for k in same["model"])
    evaluate.main(["--ckpt", str(d / "ckpt.pt"), "--export_safetensors", str(tmp_path / "out.SafeTensors")])
    assert (tmp_path / "out.json").exists()
