"""The modality table: a modality added by one row travels through data.py (the sample,
its flip, collate's padding, the real-data augmentations), is pre-trained and fine-tuned;
`--modalities` leaves one out."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import finetune
import masking
import modalities
import model as M
from util import runtime
import sttp
import train
from modalities import Modality

C = data.num_classes("synthetic")


@pytest.fixture
def normals(monkeypatch):
    """Surface normals as a 3-channel image, L1 loss, a segmenter input: one new row."""
    monkeypatch.setitem(modalities.MODALITIES, "normals", Modality("image", 3, 1, "l1", modalities.as_given))
    return ("rgb", "depth", "normals", "semseg")


def normals_from_depth(depth):
    """Unit normals [3, H, W] of a depth map [1, H, W]: (-dz/dx, -dz/dy, 1) from the
    pixel gradients, normalised; a stand-in for a real normal estimator."""
    dz_dy, dz_dx = torch.gradient(depth[0])
    return F.normalize(torch.stack([-dz_dx, -dz_dy, torch.ones_like(dz_dx)]), dim=0)


class RoomsWithNormals(data.SyntheticRooms):
    """What the README asks of a user: the dataset's `maps` also returns a "normals" map."""

    def maps(self, index):
        maps = super().maps(index)
        return {**maps, "normals": normals_from_depth(maps["depth"])}


def batch_with_normals(B=4):
    """A training batch of the rooms with normals: flipped as the dataset flips, collated."""
    ds = RoomsWithNormals("train", train=True, seed=1)
    return data.collate([ds[i] for i in range(B)])


def changed(before: dict, net: torch.nn.Module, prefix: str) -> bool:
    return any(not torch.equal(before[k], v) for k, v in net.state_dict().items() if k.startswith(prefix))


# --- the new map through data.py --------------------------------------------------------


def test_a_map_needs_its_row():
    maps = data.SyntheticRooms("test").maps(0)
    with pytest.raises(ValueError, match="'normals' is not a row"):
        data.make_sample({**maps, "normals": normals_from_depth(maps["depth"])}, "x")


def test_the_synthetic_flip_and_collate_carry_the_new_map(normals):
    plain, aug = RoomsWithNormals("train"), RoomsWithNormals("train", train=True, seed=3)
    without = data.SyntheticRooms("train", train=True, seed=3)
    flips = 0
    for i in range(8):
        s, p, w = aug[i], plain[i], without[i]
        assert all(torch.equal(s[k], w[k]) for k in ("rgb", "depth", "semseg"))   # the same draws
        flipped = not torch.equal(s["rgb"], p["rgb"])
        assert torch.equal(s["normals"], p["normals"].flip(-1) if flipped else p["normals"])
        flips += flipped
    assert 0 < flips < 8
    # collate pads a smaller image's normals with 0 (an image's pad value), its labels with 255
    big, small = plain[0], RoomsWithNormals("test", image_size=48)[0]
    b = data.collate([big, small])
    assert b["normals"].shape == (2, 3, 64, 64) and torch.equal(b["normals"][1, :, :48, :48], small["normals"])
    assert (b["normals"][1, :, 48:] == 0).all() and (b["normals"][1, :, :, 48:] == 0).all()
    assert (b["semseg"][1, 48:] == 255).all() and torch.equal(b["normals"][0], big["normals"])
    assert torch.equal(data.center_crop(big, 32)["normals"], big["normals"][:, 16:48, 16:48])


def pixels(sample) -> torch.Tensor:
    """[H*W, 5]: each pixel's depth, normal and label, the maps data.py resamples nearest."""
    maps = torch.cat([sample["depth"], sample["normals"], sample["semseg"][None].float()])
    return maps.flatten(1).T


@pytest.mark.parametrize("augment", [data.augment, data.augment_pretrain])
def test_the_real_data_augmentations_give_the_new_map_the_same_geometry(normals, augment, monkeypatch):
    rooms = RoomsWithNormals("test")
    padding = (0.0, 0.0, 0.0, 0.0, float(data.IGNORE_INDEX))
    for i in range(6):
        sample = data.make_sample(rooms.maps(i), f"room {i}")
        kwargs = {"scale_range": (0.5, 0.6)} if augment is data.augment and i == 0 else {}   # padded
        out = augment(sample, np.random.default_rng(i), 48, **kwargs)
        assert out["normals"].shape == (3, 48, 48) and out["id"] == f"room {i}"
        # the new map takes no draws: the other maps are what they are without it
        ref = augment({k: v for k, v in sample.items() if k != "normals"}, np.random.default_rng(i), 48, **kwargs)
        assert all(torch.equal(out[k], ref[k]) for k in ("rgb", "depth", "semseg"))
        # one geometry for every map, resampled nearest (the row's default): each pixel's
        # (depth, normal, label) is one of the source's, or padding (0, 0, 255)
        source = set(map(tuple, pixels(sample).tolist())) | {padding}
        got = set(map(tuple, pixels(out).tolist()))
        assert got <= source
        if kwargs:
            assert padding in got
    # how a map is resampled is a fact of its row: a copy of rgb stays rgb's copy when its
    # row says "bilinear" like rgb's, not with the default "nearest"
    sample = data.make_sample({**rooms.maps(0), "normals": rooms.maps(0)["rgb"].clone()}, "room 0")
    out = augment(sample, np.random.default_rng(1), 48)
    assert not torch.equal(out["normals"], out["rgb"])
    monkeypatch.setitem(modalities.MODALITIES, "normals", dataclasses.replace(modalities.MODALITIES["normals"],
                                                                              resample="bilinear"))
    out = augment(sample, np.random.default_rng(1), 48)
    assert torch.equal(out["normals"], out["rgb"])


# --- the new row in the model, the objectives and fine-tuning -------------------------------


def test_a_row_of_the_table_gives_an_adapter_a_head_and_a_loss(normals):
    cfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=C, modalities=normals)
    net = M.MaskMentor(cfg)
    assert list(net.input_adapters) == list(normals)
    assert set(net.output_adapters) == set(normals) | {"norm_rgb"}
    assert net.output_adapters["normals"].out_proj.out_features == 3 * 8 * 8
    assert set(net.output_adapters["rgb"].task_embeddings) == set(normals)
    inputs = modalities.prepare_inputs(batch_with_normals(), net.inputs)
    plan = masking.plan_masking(4, 4, net.num_tokens(64, 64), masking.MaskingConfig(budget=32), True,
                                torch.Generator().manual_seed(0))
    preds, tokens, masked = net(inputs, plan)
    assert masked.mask.shape == (4, 4 * 64) and tokens["normals"].shape == (4, 64, cfg.dec_width)
    weights = sttp.loss_weights(net, inputs, masked.mask, plan.keep, "all")
    losses = {k: m.value() for k, m in sttp.pixel_losses(preds, inputs, weights, net.cfg.patch_size).items()}
    assert list(losses) == ["rgb", "norm_rgb", "depth", "normals", "semseg"]
    # The L1 of the table's row, on the patches hidden from the encoder.
    hidden = masked.mask[:, 2 * 64:3 * 64].view(4, 8, 1, 8, 1).expand(4, 8, 8, 8, 8).reshape(4, 64, 64)
    per_pixel = (preds["normals"] - inputs["normals"]).abs().mean(1)
    want = torch.stack([per_pixel[i][hidden[i]].mean() for i in range(4) if hidden[i].any()]).mean()
    torch.testing.assert_close(losses["normals"], want)


@pytest.mark.parametrize("mode", ["m2im", "sttp"])
def test_pretraining_steps_learn_the_new_modality(normals, mode):
    torch.manual_seed(0)
    net = M.MaskMentor(dataclasses.replace(M.PRESETS["tiny"], num_classes=C, modalities=normals))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    cfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=32))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    logs = runtime.Runtime(torch.device("cpu")).run_objective(sttp.OBJECTIVES[mode], net, opt, batch_with_normals(),
                                                              cfg, torch.Generator().manual_seed(0))
    assert "m2im_normals" in logs
    assert changed(before, net, "input_adapters.normals.") and changed(before, net, "output_adapters.normals.")


def test_finetuning_takes_the_new_modality_as_an_input(normals):
    torch.manual_seed(0)
    cfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=C, modalities=normals)
    pre = M.MaskMentor(cfg)
    seg = M.Segmenter(cfg)
    assert seg.inputs == ("rgb", "depth", "normals")
    seg.load_state_dict(M.trunk_state_dict(pre.state_dict(), seg.inputs), strict=False)
    torch.testing.assert_close(seg.input_adapters["normals"].proj.weight, pre.input_adapters["normals"].proj.weight)
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    fcfg = finetune.FinetuneConfig(p_missing=1.0)
    rt = runtime.Runtime(torch.device("cpu"))
    batch = batch_with_normals()
    logs = finetune.train_step(seg, opt, batch, fcfg, torch.Generator().manual_seed(0), rt)
    assert logs["loss"] > 0 and changed(before, seg, "input_adapters.normals.")
    seg.eval()
    only = modalities.prepare_inputs({"normals": batch["normals"]}, seg.inputs)
    assert seg(only).shape == (4, C, 64, 64)


def test_sample_present_with_three_inputs_draws_every_proper_subset():
    present = finetune.sample_present(60000, 3, 0.6, torch.Generator().manual_seed(0), "cpu")
    assert present.any(1).all()                                    # never nothing
    full = present.all(1).float().mean().item()
    assert full == pytest.approx(0.4, abs=0.01)
    subsets = {}
    for row in present[~present.all(1)].tolist():
        subsets[tuple(row)] = subsets.get(tuple(row), 0) + 1
    assert len(subsets) == 6                                        # 2^3 - 2 proper, non-empty subsets
    assert all(n / 60000 == pytest.approx(0.1, abs=0.01) for n in subsets.values())


def test_two_inputs_keep_the_one_in_each_of_rgb_only_depth_only():
    """For (rgb, depth): rgb only with p/2, depth only with p/2 (decision D9)."""
    u = torch.rand(100000, generator=torch.Generator().manual_seed(3))
    present = finetune.sample_present(100000, 2, 2 / 3, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(present[:, 0], u >= 1 / 3) and torch.equal(present[:, 1], (u < 1 / 3) | (u >= 2 / 3))


@pytest.mark.slow
def test_pretraining_without_semantic_maps(tmp_path):
    """--modalities rgb,depth: no semseg adapter or head; fine-tuning takes it as usual."""
    args = ["--subset", "32", "--batch_size", "16", "--epochs", "2", "--warmup_epochs", "1", "--vis_every", "1",
            "--modalities", "rgb,depth", "--device", "cpu"]
    net = train.main(args + ["--out_dir", str(tmp_path / "pre")])
    assert net.inputs == ("rgb", "depth") and set(net.output_adapters) == {"rgb", "depth", "norm_rgb"}
    assert (tmp_path / "pre" / "recon_epoch002.png").exists()
    seg = finetune.main(["--pretrained", str(tmp_path / "pre" / "ckpt.pt"), "--subset", "32", "--batch_size", "16",
                         "--epochs", "1", "--out_dir", str(tmp_path / "ft")])
    assert seg.inputs == ("rgb", "depth")


def test_bad_modalities_are_one_line_errors(tmp_path):
    for value, words in [("rgb,sonar", "sonar"), ("rgb,rgb", "distinct"), ("rgb", "needs at least two")]:
        with pytest.raises(train.UserError, match=words):
            train.main(["--modalities", value, "--out_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
