"""evaluate.py beyond the metrics: padding to the fine-tuning grid, images and folders,
the checkpoint's data conventions, large images, ONNX export, output paths checked up
front, one-line errors from DataLoader workers, a dedicated (single-input) model in every
mode."""
import dataclasses
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import modalities
import model as M
from util import vis
from util.cli import UserError
from conftest import finetuned, fixture_path, make_esanet, one_line_error, real_sample


def fixture_batch(h=None, w=None):
    """The real NYU image #1 (or its top-left h x w) as a batch: rgb normalised, raw depth
    in metres (with holes)."""
    rgb, _, _, raw = real_sample()
    rgb, raw = rgb[:h, :w], raw[:h, :w]
    return {"rgb": data.normalize_rgb(rgb)[None], "depth": torch.from_numpy(raw).float()[None, None]}


def logits(net, batch, setting):
    inputs = modalities.prepare_inputs(batch)
    with torch.no_grad():
        return net({m: inputs[m] for m in evaluate.SETTINGS[setting]})


# --- evaluation sees the grid fine-tuning saw (D16) ---------------------------------------


def test_padded_size():
    assert evaluate.padded_size(480, 640, 640, 16) == (640, 640)
    assert evaluate.padded_size(530, 730, 640, 16) == (640, 736)      # SUN: wider than the crop
    assert evaluate.padded_size(72, 100, 96, 8) == (96, 104)
    assert evaluate.padded_size(200, 300, 96, 8) == (200, 304)


def test_prediction_equals_the_image_on_a_crop_sized_canvas():
    # A scaled-down paper setting: crop 96 (640), image 72x96 (480x640), patch 8, and a
    # loaded 7x7 position table that is interpolated to whatever grid the image gets.
    torch.manual_seed(0)
    cfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=40, image_size=96)
    net = M.Segmenter(cfg).eval()
    for adapter in net.input_adapters.values():
        adapter.pos_emb = torch.randn(1, cfg.width, 7, 7)
    batch = fixture_batch(72, 96)
    canvas = {"rgb": torch.zeros(1, 3, 96, 96), "depth": torch.zeros(1, 1, 96, 96)}   # rgb mean, depth missing
    canvas["rgb"][..., :72, :] = batch["rgb"]
    canvas["depth"][..., :72, :] = batch["depth"]
    preds = evaluate.predict(net, batch, list(evaluate.SETTINGS))
    for s in evaluate.SETTINGS:
        expected = logits(net, canvas, s).argmax(1)[:, :72, :]
        assert preds[s].shape == (1, 72, 96) and torch.equal(preds[s], expected), s
        # without the padding the table would be squeezed to 9x12: another prediction
        assert not torch.allclose(logits(net, batch, s), logits(net, canvas, s)[..., :72, :], atol=1e-3)


@pytest.mark.slow
def test_padding_effect_on_the_real_image(capsys):
    """How many pixels change class on the real 480x640 NYU image when it is padded to the
    640 crop instead of run at 30x40 patches, for a small untrained model (width 128,
    patch 16) with MultiMAE's stored 14x14 sin-cos table loaded as its position table."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=40, image_size=640, patch_size=16)
    net = M.Segmenter(cfg).eval()
    table = M.sincos_pos_embed(14, 14, cfg.width, "cpu").transpose(1, 2).reshape(1, cfg.width, 14, 14)
    for adapter in net.input_adapters.values():
        adapter.pos_emb = table.clone()
    batch = fixture_batch()
    new = evaluate.predict(net, batch, list(evaluate.SETTINGS))
    changed = {s: float((new[s] != logits(net, batch, s).argmax(1)).float().mean()) for s in evaluate.SETTINGS}
    with capsys.disabled():
        print("\npadding to the 640 crop changes the class of " +
              ", ".join(f"{100 * v:.1f}% ({s})" for s, v in changed.items()) + " of the fixture's pixels")
    assert all(v > 0 for v in changed.values())


# --- images and folders, with the checkpoint's conventions --------------------------------


def write_pair(folder, name, rgb, depth_m, depth_ext=".png"):
    os.makedirs(folder / "rgb", exist_ok=True)
    os.makedirs(folder / "depth", exist_ok=True)
    Image.fromarray(rgb).save(folder / "rgb" / f"{name}.png")
    if depth_ext == ".npy":
        np.save(folder / "depth" / f"{name}.npy", depth_m.astype(np.float32))
    else:
        Image.fromarray(np.round(depth_m * 1000).astype(np.uint16)).save(folder / "depth" / f"{name}.png")


def fixture_crops(n=3, size=(48, 64)):
    """n different windows of the real image: rgb uint8, depth in metres (mm-rounded)."""
    rgb, _, _, raw = real_sample()
    h, w = size
    return [(rgb[40 * i:40 * i + h, 50 * i:50 * i + w], np.round(raw[40 * i:40 * i + h, 50 * i:50 * i + w], 3))
            for i in range(n)]


def test_folder_mode_writes_one_class_map_per_image(tmp_path):
    net = finetuned(tmp_path / "ckpt.pt", "nyu")
    crops = fixture_crops()
    for i, (rgb, depth) in enumerate(crops):
        write_pair(tmp_path, f"img{i}", rgb, depth, ".npy" if i == 1 else ".png")
    ckpt = ["--ckpt", str(tmp_path / "ckpt.pt")]
    for flags, setting in ((["--rgb", str(tmp_path / "rgb"), "--depth", str(tmp_path / "depth")], "rgbd"),
                           (["--depth", str(tmp_path / "depth")], "depth")):
        out = tmp_path / f"out_{setting}"
        r = evaluate.main(ckpt + flags + ["--out", str(out)])
        assert r["setting"] == setting and sorted(os.listdir(out)) == ["img0.png", "img1.png", "img2.png"]
        for i, (rgb, depth) in enumerate(crops):
            batch = {"rgb": data.normalize_rgb(rgb)[None], "depth": torch.from_numpy(depth).float()[None, None]}
            expected = evaluate.predict(net, batch, [setting])[setting][0]
            img = Image.open(out / f"img{i}.png")
            assert img.mode == "P" and np.array_equal(np.asarray(img), expected.numpy())
    # a single file keeps working, and gives the same map as the folder
    evaluate.main(ckpt + ["--rgb", str(tmp_path / "rgb" / "img0.png"), "--depth", str(tmp_path / "depth" / "img0.png"),
                          "--out", str(tmp_path / "one.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")),
                          np.asarray(Image.open(tmp_path / "out_rgbd" / "img0.png")))


def test_folder_mode_names_the_files_without_a_partner(tmp_path):
    finetuned(tmp_path / "ckpt.pt")
    for i, (rgb, depth) in enumerate(fixture_crops()):
        write_pair(tmp_path, f"img{i}", rgb, depth)
    os.remove(tmp_path / "depth" / "img1.png")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "depth" / "extra.png")
    ckpt = ["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "out")]
    with pytest.raises(UserError) as e:
        evaluate.main(ckpt + ["--rgb", str(tmp_path / "rgb"), "--depth", str(tmp_path / "depth")])
    one_line_error(e, "img1.png", "extra.png", "no partner")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError) as e:                   # a folder and a file
        evaluate.main(ckpt + ["--rgb", str(tmp_path / "rgb"), "--depth", str(tmp_path / "depth" / "img0.png")])
    one_line_error(e, "two files or two folders")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError) as e:
        evaluate.main(ckpt + ["--rgb", str(tmp_path / "empty")])
    one_line_error(e, "empty", "no images")


def test_single_image_uses_the_checkpoints_data_conventions(tmp_path, capsys):
    classes = [f"class{c}" for c in range(10)]
    conventions = {"dataset": "synthetic", "classes": classes, "image_size": 96, "rgb_mean": [0.5, 0.4, 0.3],
                   "rgb_std": [0.2, 0.3, 0.25], "depth_unit": "metres", "ignore_index": 255}
    net = finetuned(tmp_path / "ckpt.pt", conventions=conventions, table=(6, 6))
    rgb, depth = fixture_crops(1)[0]
    write_pair(tmp_path, "a", rgb, depth)
    evaluate.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--rgb", str(tmp_path / "rgb" / "a.png"),
                   "--out", str(tmp_path / "seg.png")])
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.3, 0.25]).view(3, 1, 1)
    expected = evaluate.predict(net, {"rgb": x[None]}, ["rgb"], crop=96)["rgb"][0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "seg.png")), expected.numpy())
    out = capsys.readouterr().out
    assert "padded to 96x96" in out and re.search(r"class\d+ \d+%", out.splitlines()[-1]), out
    assert not torch.equal(expected, evaluate.predict(net, {"rgb": x[None]}, ["rgb"])["rgb"][0])   # crop 64
    conventions["depth_unit"] = "millimetres"
    finetuned(tmp_path / "mm.pt", conventions=conventions)
    with pytest.raises(UserError) as e:
        evaluate.main(["--ckpt", str(tmp_path / "mm.pt"), "--rgb", str(tmp_path / "rgb" / "a.png"),
                       "--out", str(tmp_path / "seg.png")])
    one_line_error(e, "mm.pt", "millimetres")


def test_a_large_image_is_segmented_at_a_bounded_size(tmp_path, monkeypatch, capsys):
    net = finetuned(tmp_path / "ckpt.pt", "nyu")
    rgb, _, _, _ = real_sample()
    big = np.asarray(Image.fromarray(rgb).resize((1200, 900), Image.BILINEAR))
    Image.fromarray(big).save(tmp_path / "big.png")
    monkeypatch.setattr(evaluate, "MAX_SIDE", 3)           # 3 x the tiny model's 64 px crop: 192
    evaluate.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--rgb", str(tmp_path / "big.png"),
                   "--out", str(tmp_path / "seg.png")])
    line = capsys.readouterr().out.splitlines()[0]
    assert "1200x900" in line and "192x144" in line, line
    small = evaluate.resize({"rgb": data.normalize_rgb(big)[None]}, 144, 192)
    pred = evaluate.predict(net, small, ["rgb"])["rgb"].float()
    expected = torch.nn.functional.interpolate(pred[:, None], (900, 1200), mode="nearest-exact")[0, 0]
    out = np.asarray(Image.open(tmp_path / "seg.png"))
    assert out.shape == (900, 1200) and np.array_equal(out, expected.numpy())
    # The note comes before the image is decoded; in a folder, a line for each such image.
    decoded = []
    real_read = evaluate.read_rgb
    monkeypatch.setattr(evaluate, "read_rgb", lambda p: decoded.append(capsys.readouterr().out) or real_read(p))
    evaluate.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--rgb", str(tmp_path / "big.png"),
                   "--out", str(tmp_path / "seg.png")])
    assert "segmented at 192x144" in decoded[0], decoded
    monkeypatch.setattr(evaluate, "read_rgb", real_read)
    os.makedirs(tmp_path / "imgs")
    Image.fromarray(big).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(rgb[:100, :100]).save(tmp_path / "imgs" / "b.png")
    capsys.readouterr()
    evaluate.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--rgb", str(tmp_path / "imgs"), "--out", str(tmp_path / "segs/")])
    out = capsys.readouterr().out
    assert "a.png: 1200x900" in out and "b.png" not in out and "segs//" not in out and "segs/ " in out, out


# --- ONNX ----------------------------------------------------------------------------------


def test_default_onnx_check_images_are_synthetic_rooms_one_with_depth_holes():
    conv = evaluate.Conventions("synthetic", data.CLASS_NAMES["synthetic"], 32, data.RGB_MEAN, data.RGB_STD)
    images = evaluate.check_images(conv)
    rooms = data.build_dataset("synthetic", split="test", image_size=32)
    assert [n for n, _ in images] == ["synthetic room 0 (32x32 padded to 32x32)",
                                      "synthetic room 1 with depth holes (32x32 padded to 32x32)"]
    plain, holes = (b["depth"][0, 0] for _, b in images)
    assert torch.equal(plain, rooms[0]["depth"][0]) and torch.equal(images[1][1]["rgb"][0], rooms[1]["rgb"])
    made = (holes == 0) & (rooms[1]["depth"][0] > 0)                  # holes the check added
    assert made.float().mean() > 0.1 and torch.equal(holes[~made], rooms[1]["depth"][0][~made])
    assert (holes > 0).any()                                           # still a depth map to standardise


@pytest.mark.slow
def test_onnx_export_matches_pytorch(tmp_path):
    import onnxruntime as ort                  # requirements.txt: CI tests the export
    net = finetuned(tmp_path / "ckpt.pt", "nyu")
    conv = evaluate.conventions(evaluate.load_segmenter(str(tmp_path / "ckpt.pt"), "cpu")[1], net, "ckpt.pt")
    # checked on the real NYU image #1 (640x480 fitted into 64x48), filled and raw (holey) depth
    real = [(f"NYU #1, {kind} depth", evaluate.read_inputs(fixture_path("nyu_0001", "rgb.jpg"),
                                                            fixture_path("nyu_0001", f"depth_{kind}.png"), 1e-4, conv))
            for kind in ("filled", "raw")]                                 # x10000 PNGs; raw has holes
    r = evaluate.export_onnx(net, conv, str(tmp_path / "onnx"), list(evaluate.SETTINGS), check_on=real)
    assert sorted(os.listdir(tmp_path / "onnx")) == ["depth.onnx", "rgb.onnx", "rgbd.onnx"]
    for s, res in r.items():
        # float32 through the same operations; ~1e-6 measured, 1e-3 leaves room for other CPUs
        assert res["max_abs_diff"] < 1e-3 and res["class_differs"] == 0, (s, res)
        assert isinstance(res["opset"], int) and res["opset"] >= 13
    # what docs/deploy.md does: pad a 48x64 image to the 64 crop, run, crop back = predict()
    batch = fixture_batch(48, 64)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "rgbd.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["image_size"] == "64" and meta["classes"].startswith('["wall", "floor"')
    feed = {m: torch.nn.functional.pad(x, (0, 0, 0, 16)).numpy() for m, x in batch.items()}
    out_logits, classes = session.run(None, feed)
    assert out_logits.shape == (1, 40, 64, 64) and classes.shape == (1, 64, 64)
    expected = evaluate.predict(net, batch, ["rgbd"])["rgbd"]
    assert np.array_equal(classes[:, :48], expected.numpy())


# --- output paths: checked before anything is loaded ----------------------------------------


def unwritable_folder(tmp_path):
    """A folder nothing can be created in: read-only, or (as root, who writes anyway) a
    path under a regular file."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):
        return ro
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file"


@pytest.fixture
def restore_modes(tmp_path):
    yield
    for p in tmp_path.rglob("*"):
        if p.is_dir():
            p.chmod(0o700)


def test_output_paths_fail_before_the_model_is_loaded(tmp_path, restore_modes):
    ro = unwritable_folder(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
    missing_ckpt = ["--ckpt", str(tmp_path / "no_such_ckpt.pt")]     # never reached
    image = ["--rgb", str(tmp_path / "in.png")]
    cases = [(["--out_json", str(ro / "r.json")], "--out_json", ro.name),
             (["--out_json", str(tmp_path / "folder")], "--out_json", "a folder is there"),
             (["--out_json", str(tmp_path / "file.txt" / "r.json")], "--out_json", "file.txt", "is a file"),
             (["--save_vis", str(tmp_path / "file.txt")], "--save_vis", "file.txt", "a file is there"),
             (["--save_vis", str(ro / "vis")], "--save_vis", ro.name),
             (image + ["--out", str(tmp_path / "seg.jpg")], "--out", "seg.jpg", ".png"),
             (image + ["--out", str(tmp_path / "seg")], "--out", "no extension"),
             (image + ["--out", str(ro / "seg.png")], "--out", ro.name),
             (["--rgb", str(tmp_path / "folder"), "--out", str(tmp_path / "file.txt")], "--out", "a file is there"),
             (["--export_onnx", str(tmp_path / "file.txt")], "--export_onnx", "a file is there"),
             (["--export_onnx", str(ro / "onnx")], "--export_onnx", ro.name)]
    for flags, *needles in cases:
        with pytest.raises(UserError) as e:
            evaluate.main(missing_ckpt + flags)
        one_line_error(e, *needles)
    assert os.listdir(tmp_path / "folder") == []


# --- DataLoader workers --------------------------------------------------------------------


def test_a_worker_error_is_one_line(tmp_path):
    rgb, label40, depth, _ = real_sample()
    make_esanet(str(tmp_path / "nyu"), rgb[:48, :64], label40[:48, :64], depth[:48, :64])
    bad = tmp_path / "nyu" / "test" / "rgb" / "0001.png"
    bad.write_bytes(b"not a png")
    finetuned(tmp_path / "ckpt.pt", "nyu")
    args = ["--ckpt", str(tmp_path / "ckpt.pt"), "--data_root", str(tmp_path / "nyu"),
            "--out_json", str(tmp_path / "r.json"), "--save_vis", ""]
    for workers in ("0", "1"):
        with pytest.raises(UserError) as e:
            evaluate.main(args + ["--workers", workers])
        msg = one_line_error(e, str(bad), "cannot read")
        assert not msg.startswith("Caught"), msg


@pytest.mark.slow
def test_onnx_export_falls_back_to_the_torchscript_exporter(tmp_path, monkeypatch, capsys):
    finetuned(tmp_path / "ckpt.pt", "nyu")
    export = torch.onnx.export

    def dynamo_fails(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("the dynamo exporter cannot handle this\n(a long report)")
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    r = evaluate.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--export_onnx", str(tmp_path / "onnx"), "--only", "rgb"])
    assert list(r) == ["rgb"] and r["rgb"]["exporter"].startswith("torchscript")
    assert r["rgb"]["max_abs_diff"] < 1e-3 and r["rgb"]["class_differs"] == 0
    out = capsys.readouterr().out
    assert "cannot handle this); using dynamo=False" in out and "long report" not in out
    assert "synthetic room 1 with depth holes" in out                  # the default check images


# --- a dedicated model (finetune.py --inputs depth): its own condition, in every mode --------


def test_a_dedicated_depth_model_in_every_mode(tmp_path, capsys):
    rgb, label40, depth, _ = real_sample()
    make_esanet(str(tmp_path / "nyu"), rgb[:96, :128], label40[:96, :128], depth[:96, :128])
    net = finetuned(tmp_path / "ckpt.pt", "nyu", modalities=("depth",))
    assert net.inputs == ("depth",)
    ckpt = ["--ckpt", str(tmp_path / "ckpt.pt")]
    # the dataset: depth only, said so; Figure 3 shows the depth prediction alone
    out = evaluate.main(ckpt + ["--data_root", str(tmp_path / "nyu"), "--out_json", str(tmp_path / "r.json"),
                                "--save_vis", str(tmp_path / "vis")])
    assert set(out) == {"depth", "meta"} and "takes depth only: skipping rgbd, rgb" in capsys.readouterr().out
    sample = data.build_dataset("nyu", str(tmp_path / "nyu"), "test", image_size=64)[0]
    pred = evaluate.predict(net, data.collate([sample]), ["depth"])["depth"][0]
    expected = vis.segmentation_figure(sample, {"depth": pred}, data.CLASS_NAMES["nyu"], data.palette("nyu"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "vis" / "000_0001.png")), np.asarray(expected))
    # one image: --depth alone; --rgb, alone or with --depth, is one line and writes nothing
    rgb_path, depth_path = tmp_path / "nyu" / "test" / "rgb" / "0001.png", tmp_path / "nyu" / "test" / "depth" / "0001.png"
    r = evaluate.main(ckpt + ["--depth", str(depth_path), "--out", str(tmp_path / "seg.png")])
    assert r["setting"] == "depth"
    for flags, words in ((["--rgb", str(rgb_path)], "--rgb: "), (["--rgb", str(rgb_path), "--depth", str(depth_path)],
                                                                 "--rgb and --depth: ")):
        with pytest.raises(UserError) as e:
            evaluate.main(ckpt + flags + ["--out", str(tmp_path / "other.png")])
        one_line_error(e, words, "ckpt.pt takes depth only", "give --depth")
        assert not (tmp_path / "other.png").exists()
    # folders alike
    with pytest.raises(UserError) as e:
        evaluate.main(ckpt + ["--rgb", str(rgb_path.parent), "--out", str(tmp_path / "segs")])
    one_line_error(e, "--rgb: ", "takes depth only")
    # ONNX: --only a condition it lacks is one line (the export itself: test_onnx_export_of_a_dedicated_model)
    with pytest.raises(UserError) as e:
        evaluate.main(ckpt + ["--export_onnx", str(tmp_path / "onnx"), "--only", "rgbd"])
    one_line_error(e, "--only rgbd", "takes depth only")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
def test_onnx_export_of_a_dedicated_model(tmp_path, capsys):
    finetuned(tmp_path / "ckpt.pt", modalities=("depth",))
    r = evaluate.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--export_onnx", str(tmp_path / "onnx")])
    assert list(r) == ["depth"] and os.listdir(tmp_path / "onnx") == ["depth.onnx"]
    assert r["depth"]["max_abs_diff"] < 1e-3 and r["depth"]["class_differs"] == 0
    assert "takes depth only: skipping rgbd, rgb" in capsys.readouterr().out


@pytest.mark.parametrize("cues", ["-0.5", "-2", "1.5", "-1.0001"])
def test_cues_other_than_minus_one_or_zero_to_one_are_refused(cues):
    with pytest.raises(UserError) as e:
        evaluate.main(["--ckpt", "no_such_ckpt.pt", "--cues", cues])
    one_line_error(e, "--cues must be in [0, 1], or -1 for the checkpoint's level", f"got {float(cues)}")


@pytest.mark.parametrize("cues", ["-1", "0", "0.5", "1"])
def test_cues_minus_one_and_zero_to_one_are_taken(cues, tmp_path):
    with pytest.raises(UserError) as e:                     # past the flags: the checkpoint is looked for
        evaluate.main(["--ckpt", str(tmp_path / "no_such_ckpt.pt"), "--cues", cues,
                       "--out_json", str(tmp_path / "r.json")])
    one_line_error(e, "no_such_ckpt.pt: no fine-tuned checkpoint there")
