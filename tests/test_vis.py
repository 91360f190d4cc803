"""vis.py's colour maps and figures, train.py's reconstruction pictures, evaluate.py's
--save_vis and single-image mode."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import masking
import model as M
import train
from util import vis
from conftest import make_esanet, real_sample


# --- colour maps -----------------------------------------------------------------------


def test_depth_colours_range_and_holes():
    depth = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 9.0]], dtype=np.float32)
    out = vis.depth_colours(depth, lo=1.0, hi=4.0)
    assert out.shape == (1, 6, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == vis.MISSING                        # 0 m = hole
    assert (out[0, 1] == vis.DEPTH_LUT[0]).all() and (out[0, 4] == vis.DEPTH_LUT[255]).all()
    assert (out[0, 5] == out[0, 4]).all()                         # beyond the range: clipped
    assert (out[0, 2] == vis.DEPTH_LUT[85]).all()                 # linear in between
    # no valid depth is drawn in the hole colour, and the map runs between distinct ends
    assert not (vis.DEPTH_LUT == np.array(vis.MISSING)).all(axis=1).any()
    assert np.abs(vis.DEPTH_LUT[0].astype(int) - vis.DEPTH_LUT[255]).sum() > 100


def test_depth_range_ignores_outliers_and_holes():
    d = np.concatenate([np.zeros(50), np.linspace(1, 3, 1000), [80.0]])
    lo, hi = vis.depth_range(d)
    assert 1.0 <= lo < 1.1 and 2.9 < hi <= 3.0
    assert vis.depth_range(np.zeros(4)) == (0.0, 1.0)             # all missing: no crash


def test_label_colours_use_the_palette_and_black_void():
    pal = data.palette("nyu")
    label = torch.tensor([[0, 39, 255], [7, 7, 1]])
    out = vis.label_colours(label, pal)
    assert (out[0, 0] == pal[0]).all() and (out[0, 1] == pal[39]).all() and (out[1, 2] == pal[1]).all()
    assert tuple(out[0, 2]) == vis.MISSING
    assert len({tuple(c) for c in pal}) == 40 and not (pal == 0).all(axis=1).any()
    with pytest.raises(ValueError, match="label ids"):
        vis.label_colours(torch.tensor([[40]]), pal)


def colour_count(img: Image.Image, colour) -> int:
    a = np.asarray(img.convert("RGB"))
    return int((a == np.array(colour, dtype=np.uint8)).all(-1).sum())


def test_segmentation_figure_shows_every_panel_and_a_legend():
    s = data.build_dataset("synthetic", split="test")[0]
    pal, names = data.palette("synthetic"), data.SYNTHETIC_CLASSES
    wrong = torch.full_like(s["semseg"], 3)                      # "rug" everywhere
    img = vis.segmentation_figure(s, {"rgbd": s["semseg"].clamp(max=9), "rgb": wrong, "depth": wrong}, names, pal)
    scale = vis._cell_height(64) // 64
    gt = s["semseg"]
    for c in torch.unique(gt[gt != 255]).tolist():
        n = int((gt == c).sum()) * scale * scale
        # ground-truth panel + the rgbd prediction panel + a legend swatch
        assert colour_count(img, pal[c]) >= 2 * n
    # the rug panels of the two wrong predictions are there too
    assert colour_count(img, pal[3]) >= 2 * 64 * 64 * scale * scale
    assert img.width > 6 * 64 * scale and img.height > 64 * scale


# --- Figure 4: reconstructions ---------------------------------------------------------


def tiny_pretrain_net():
    torch.manual_seed(0)
    return M.MaskMentor(dataclasses.replace(M.PRESETS["tiny"], num_classes=10)).eval()


def test_reconstruct_hides_what_each_condition_says():
    net = tiny_pretrain_net()
    batch = data.collate([data.build_dataset("synthetic", split="test")[i] for i in range(2)])
    mcfg = masking.MaskingConfig(budget=20)
    g = torch.Generator().manual_seed(0)
    n = 8 * 8
    for keep in vis.RECON_CONDITIONS.values():
        _, preds, hidden = vis.reconstruct(net, batch, keep, mcfg, g)
        assert hidden.shape == (2, 3, 8, 8)
        visible = (~hidden).flatten(2).sum(-1)                   # per sample and modality
        assert (visible.sum(1) == 20).all()
        for k, m in enumerate(net.inputs):
            if keep is not None and m not in keep:
                assert (visible[:, k] == 0).all()
        assert preds["rgb"].shape == (2, 3, 64, 64) and preds["semseg"].shape == (2, 10, 16, 16)
    assert net.training is False
    # rgb only: the whole budget on rgb, the rest of rgb hidden
    _, _, hidden = vis.reconstruct(net, batch, ("rgb",), mcfg, g)
    assert (hidden[:, 0].flatten(1).sum(-1) == n - 20).all()


def test_reconstruction_figure_leaves_the_global_rng_and_train_mode_alone():
    net = tiny_pretrain_net().train()
    batch = data.collate([data.build_dataset("synthetic", split="test")[0]])
    state = torch.get_rng_state()
    a = vis.reconstruction_figure(net, batch, masking.MaskingConfig(budget=20), 3,
                                  data.palette("synthetic"), data.SYNTHETIC_CLASSES)
    assert torch.equal(state, torch.get_rng_state()) and net.training
    b = vis.reconstruction_figure(net, batch, masking.MaskingConfig(budget=20), 3,
                                  data.palette("synthetic"), data.SYNTHETIC_CLASSES)
    assert np.array_equal(np.asarray(a), np.asarray(b))           # same seed, same picture
    assert colour_count(a, vis.HIDDEN) > 0                        # masked inputs shown greyed


@pytest.mark.slow
def test_training_writes_pictures_without_changing_the_run(tmp_path):
    args = ["--subset", "24", "--batch_size", "8", "--epochs", "3", "--warmup_epochs", "1", "--budget", "24"]
    train.main(args + ["--out_dir", str(tmp_path / "a"), "--vis_every", "2"])
    train.main(args + ["--out_dir", str(tmp_path / "b"), "--vis_every", "0"])
    assert sorted(f for f in os.listdir(tmp_path / "a") if f.startswith("recon")) == \
        ["recon_epoch002.png", "recon_epoch003.png"]
    assert not any(f.startswith("recon") for f in os.listdir(tmp_path / "b"))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- evaluate.py: --save_vis and single-image mode -------------------------------------


def fake_finetuned(path, dataset="synthetic"):
    """An untrained Segmenter saved the way finetune.py saves one."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=data.num_classes(dataset))
    net = M.Segmenter(cfg)
    torch.save({"kind": "finetune", "model_config": dataclasses.asdict(cfg), "model": net.state_dict(),
                "dataset": dataset, "config": {}}, path)
    return net.eval()


def test_save_vis_on_the_real_nyu_fixture(tmp_path):
    rgb, label40, depth, _ = real_sample()
    make_esanet(str(tmp_path / "nyu"), rgb[:120, :160], label40[:120, :160], depth[:120, :160])
    fake_finetuned(tmp_path / "ckpt.pt", "nyu")
    evaluate.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--dataset", "nyu", "--data_root", str(tmp_path / "nyu"),
                   "--out_json", str(tmp_path / "r.json"), "--save_vis", str(tmp_path / "vis"), "--num_vis", "3"])
    files = os.listdir(tmp_path / "vis")
    assert files == ["000_0001.png"]                              # one test image
    img = Image.open(tmp_path / "vis" / files[0])
    assert img.width > 6 * 120 and img.height > 120
    gt = np.where(label40[:120, :160] == 0, 255, label40[:120, :160].astype(int) - 1)
    for c in np.unique(gt[gt != 255]):                           # the ground truth panel
        assert colour_count(img, data.palette("nyu")[c]) >= (gt == c).sum()


def write_rgbd(tmp_path, sample):
    rgb = data.denormalize_rgb(sample["rgb"])
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    mm = np.round(sample["depth"][0].numpy() * 1000).astype(np.uint16)
    Image.fromarray(mm).save(tmp_path / "d.png")
    return torch.from_numpy(mm.astype(np.float32) / 1000)


def test_single_image_mode_writes_class_ids_with_the_palette(tmp_path):
    net = fake_finetuned(tmp_path / "ckpt.pt")
    sample = data.build_dataset("synthetic", split="test", image_size=56)[0]
    depth_m = write_rgbd(tmp_path, sample)
    batch = {"rgb": sample["rgb"][None], "depth": depth_m[None, None]}
    expected = evaluate.predict(net, batch, list(evaluate.SETTINGS))
    ckpt = ["--ckpt", str(tmp_path / "ckpt.pt")]
    for flags, setting in ((["--rgb", str(tmp_path / "rgb.png"), "--depth", str(tmp_path / "d.png")], "rgbd"),
                           (["--rgb", str(tmp_path / "rgb.png")], "rgb"),
                           (["--depth", str(tmp_path / "d.png")], "depth")):
        out = tmp_path / f"seg_{setting}.png"
        r = evaluate.main(ckpt + flags + ["--out", str(out)])
        assert r["setting"] == setting
        img = Image.open(out)
        assert img.mode == "P" and img.size == (56, 56)
        assert np.array_equal(np.asarray(img), expected[setting][0].numpy())
        assert np.array_equal(np.array(img.getpalette()[:30]).reshape(10, 3), data.palette("synthetic"))
    # depth in metres as .npy, and a PNG in other units via --depth_scale
    np.save(tmp_path / "d.npy", depth_m.numpy())
    evaluate.main(ckpt + ["--depth", str(tmp_path / "d.npy"), "--out", str(tmp_path / "npy.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "npy.png")), expected["depth"][0].numpy())
    Image.fromarray((depth_m.numpy() * 5000).round().astype(np.uint16)).save(tmp_path / "d5.png")
    evaluate.main(ckpt + ["--depth", str(tmp_path / "d5.png"), "--depth_scale", "0.0002",
                          "--out", str(tmp_path / "d5seg.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d5seg.png")), expected["depth"][0].numpy())


def test_single_image_mode_bad_input(tmp_path):
    fake_finetuned(tmp_path / "ckpt.pt")
    sample = data.build_dataset("synthetic", split="test")[0]
    write_rgbd(tmp_path, sample)
    Image.fromarray(np.full((32, 64), 2000, np.uint16)).save(tmp_path / "small.png")       # 2 m
    np.save(tmp_path / "nan.npy", np.full((64, 64), np.nan, np.float32))
    ckpt = ["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "o.png")]
    cases = [(["--rgb", str(tmp_path / "rgb.png"), "--depth", str(tmp_path / "small.png")], "small.png", "differs"),
             (["--depth", str(tmp_path / "nan.npy")], "nan.npy", "NaN"),
             (["--rgb", str(tmp_path / "nope.png")], "nope.png", "not found"),
             (["--rgb", str(tmp_path / "rgb.png"), "--depth", str(tmp_path / "rgb.png")], "rgb.png", "8-bit"),
             (["--depth", str(tmp_path / "d.png"), "--depth_scale", "0"], "--depth_scale", "positive")]
    for flags, *needles in cases:
        with pytest.raises(data.UserError) as e:
            evaluate.main(ckpt + flags)
        assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)
