"""evaluate.py as a deployed sensor fails: random missing inputs (the same seed, the same
numbers; r = 0 is rgb + depth, r = 1 is each sample's single input), degraded inputs, the
expected mIoU under independent sensor failures, test-time flips and scales (a mirror-
symmetric model on a symmetric input is unchanged by the flip), and bad flags in one line
before anything is loaded."""
import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
import model as M
from util import degrade
from util.cli import UserError
from conftest import finetuned, one_line_error, real_sample, save


C = data.num_classes("synthetic")


def rooms(n=16):
    """The first n synthetic test rooms as a loader of batches of 8."""
    ds = torch.utils.data.Subset(data.build_dataset("synthetic", split="test", image_size=64), range(n))
    return torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=data.collate)


def nyu_folder(root, n=4):
    """n windows of the real NYU image as a tiny NYUv2 in ESANet's layout (train = test)."""
    rgb, label40, depth, _ = real_sample()
    for split in ("train", "test"):
        for i in range(n):
            window = np.s_[60 * i:60 * i + 96, 80 * i:80 * i + 128]
            save(f"{root}/{split}/rgb/{i + 1:04d}.png", rgb[window])
            save(f"{root}/{split}/depth/{i + 1:04d}.png", (depth[window] * 1e3).astype(np.uint16))
            save(f"{root}/{split}/depth_raw/{i + 1:04d}.png", (depth[window] * 1e3).astype(np.uint16))
            save(f"{root}/{split}/labels_40/{i + 1:04d}.png", label40[window].astype(np.uint8))
    return str(root)


def run(tmp_path, *flags, model="nyu.pt"):
    chart = ["--chart", str(tmp_path / "chart.png")] if "--robustness" in flags else []
    return evaluate.main(["--ckpt", str(tmp_path / model), "--data_root", str(tmp_path / "nyu"),
                          "--out_json", str(tmp_path / "r.json"), "--save_vis", "", *chart, *flags])


# --- random missing inputs -------------------------------------------------------------------


def test_fixed_seeds_give_fixed_numbers_whatever_else_is_run(tmp_path):
    net = finetuned(tmp_path / "ckpt.pt")
    conditions, skipped = evaluate.robustness_conditions(evaluate.conditions_of(net), (0.5,), list(degrade.KINDS), 7)
    assert not skipped and [c.name for c in conditions] == ["clean", "random missing 50%", *degrade.DEGRADATIONS]
    first = evaluate.evaluate(net, rooms(), C, conditions, "cpu")
    assert evaluate.evaluate(net, rooms(), C, conditions, "cpu") == first
    # a condition's draws are its own: run alone (or with another seed for the rest) it gives the same numbers
    alone = [c for c in conditions if c.name in ("random missing 50%", "depth noise 5%")]
    assert evaluate.evaluate(net, rooms(), C, alone, "cpu") == {c.name: first[c.name] for c in alone}
    other = evaluate.robustness_conditions(evaluate.conditions_of(net), (0.5,), ["depth_holes", "depth_noise"], 8)[0]
    second = evaluate.evaluate(net, rooms(), C, other, "cpu")
    assert second["clean"] == first["clean"]                              # nothing random in it
    for name in ("random missing 50%", "depth holes 30%", "depth noise 5%"):
        assert second[name] != first[name], name                        # another seed draws otherwise


def test_random_missing_at_zero_is_rgb_and_depth_and_at_one_each_samples_single_input(tmp_path):
    net = finetuned(tmp_path / "ckpt.pt")
    batch = next(iter(rooms(8)))
    g = torch.Generator().manual_seed(0)
    none_missing = degrade.sample_present(8, 2, 0.0, g, "cpu")
    assert none_missing.all()
    preds = evaluate.predict(net, batch, ["rgbd", "rgb", "depth"])
    assert torch.equal(evaluate.predict(net, batch, [evaluate.MIXED], present=none_missing)[evaluate.MIXED],
                       preds["rgbd"])
    one_missing = degrade.sample_present(8, 2, 1.0, g, "cpu")
    assert (one_missing.sum(1) == 1).all() and 0 < one_missing[:, 0].sum() < 8        # both kinds occur
    mixed = evaluate.predict(net, batch, [evaluate.MIXED], present=one_missing)[evaluate.MIXED]
    inputs = evaluate.modalities.prepare_inputs(batch)
    for i, (rgb, depth) in enumerate(one_missing.tolist()):
        single = "rgb" if rgb else "depth"
        assert torch.equal(mixed[i], preds[single][i]), i
        with torch.no_grad():                  # the logits too, not only their argmax
            alone = net({single: inputs[single][i:i + 1]})
            shown = net({m: inputs[m][i:i + 1] for m in ("rgb", "depth")}, one_missing[i:i + 1])
        assert torch.allclose(alone, shown, atol=1e-5), i


def test_random_missing_scores_as_its_draws_say(tmp_path):
    """r = 0 scores exactly as rgb + depth; r = 1 as the confusion matrix of each sample's
    single-input prediction, the inputs drawn from the condition's own generator."""
    net = finetuned(tmp_path / "ckpt.pt")
    conditions = [evaluate.Condition("clean", ("rgbd", "rgb", "depth")),
                  evaluate.Condition("r0", (evaluate.MIXED,), missing=0.0, seed=3),
                  evaluate.Condition("r1", (evaluate.MIXED,), missing=1.0, seed=4)]
    r = evaluate.evaluate(net, rooms(), C, conditions, "cpu")
    assert r["r0"]["mixed"] == r["clean"]["rgbd"]
    g, cm = torch.Generator().manual_seed(4), torch.zeros(C, C, dtype=torch.long)
    for batch in rooms():
        present = degrade.sample_present(8, 2, 1.0, g, "cpu")
        preds = evaluate.predict(net, batch, ["rgb", "depth"])
        pred = torch.where(present[:, 0, None, None], preds["rgb"], preds["depth"])
        cm += evaluate.confusion_matrix(pred, batch["semseg"], C)
    assert r["r1"]["mixed"] == evaluate.scores(cm)
    assert r["clean"]["rgb"]["miou"] != r["clean"]["depth"]["miou"]      # so the mixture is a real test


# --- the command line: table, JSON, chart; the sensor-failure expectation --------------------


def test_robustness_table_json_and_chart(tmp_path, capsys):
    nyu_folder(tmp_path / "nyu")
    finetuned(tmp_path / "nyu.pt", "nyu")
    out = run(tmp_path, "--robustness", "--rates", "0.25,1", "--degradations", "depth_holes,rgb_dark",
              "--sensor_failure", "0.1,0.3")
    text = capsys.readouterr().out
    rows = ["clean", "random missing 25%", "random missing 100%", "depth holes 10%", "depth holes 30%",
            "depth holes 50%", "rgb dark x0.2"]
    assert list(out["robustness"]) == rows
    assert set(out["robustness"]["depth holes 10%"]) == {"rgbd", "depth"} and set(out["robustness"]["rgb dark x0.2"]) \
        == {"rgbd", "rgb"}
    assert out["robustness"]["clean"] == {s: {"miou": out[s]["miou"], "macc": out[s]["macc"]} for s in evaluate.SETTINGS}
    assert json.load(open(tmp_path / "r.json")) == json.loads(json.dumps(out))
    assert "robustness (single scale, no flip; seed 0" in text
    for c, rs in out["robustness"].items():                        # every number printed as written
        for s, r in rs.items():
            assert any(line.split()[-3:] == [s, f"{r['miou']:.2f}", f"{r['macc']:.2f}"] and line.startswith(c)
                       for line in text.splitlines()), (c, s)
    chart = Image.open(tmp_path / "chart.png")
    assert chart.format == "PNG" and chart.size[0] == 900
    # the expectation over the four outcomes, both failed scoring 0
    f, m = out["sensor_failure"], {s: out[s]["miou"] for s in evaluate.SETTINGS}
    expected = 0.9 * 0.7 * m["rgbd"] + 0.9 * 0.3 * m["rgb"] + 0.1 * 0.7 * m["depth"]
    assert f["expected_miou"] == pytest.approx(expected) and f["outcomes"]["none"] == {"probability": pytest.approx(0.03),
                                                                                      "miou": 0.0}
    assert f["expected_miou_given_an_input"] == pytest.approx(expected / 0.97)
    assert f"expected mIoU {expected:.2f} (neither input: scored 0)" in text
    assert out["meta"]["tta"] == {"flip": False, "scales": [1.0]} and out["meta"]["seed"] == 0


def test_the_expectation_at_the_corners():
    clean = {"rgbd": {"miou": 60.0}, "rgb": {"miou": 40.0}, "depth": {"miou": 50.0}}
    assert evaluate.sensor_failure(clean, 0, 0)["expected_miou"] == 60.0
    assert evaluate.sensor_failure(clean, 1, 0)["expected_miou"] == 50.0      # rgb always fails: depth only
    assert evaluate.sensor_failure(clean, 0, 1)["expected_miou"] == 40.0
    both = evaluate.sensor_failure(clean, 1, 1)
    assert both["expected_miou"] == 0.0 and both["expected_miou_given_an_input"] is None
    half = evaluate.sensor_failure(clean, 0.5, 0.5)
    assert half["expected_miou"] == pytest.approx((60 + 40 + 50 + 0) / 4)
    assert half["expected_miou_given_an_input"] == pytest.approx(50.0)


def test_a_single_input_model_scores_what_it_has_and_says_what_it_skips(tmp_path, capsys):
    nyu_folder(tmp_path / "nyu", n=2)
    finetuned(tmp_path / "rgb.pt", "nyu", modalities=("rgb",))
    out = run(tmp_path, "--robustness", model="rgb.pt")
    said = capsys.readouterr().out
    assert list(out["robustness"]) == ["clean", "rgb dark x0.2", "rgb blur 1.5 px"]
    assert all(set(rs) == {"rgb"} for rs in out["robustness"].values())
    skipped = ["random missing 25%", "random missing 50%", "random missing 75%", *degrade.KINDS["depth_holes"],
               "depth noise 5%", "depth 0.25 m steps"]
    assert f"rgb.pt takes rgb only: --robustness skips {', '.join(skipped)}" in said
    assert out["meta"]["skipped"] == skipped
    with pytest.raises(UserError) as e:
        run(tmp_path, "--sensor_failure", "0.1,0.1", model="rgb.pt")
    one_line_error(e, "--sensor_failure", "takes rgb only", "rgb only and depth only")


# --- test-time flips and scales --------------------------------------------------------------


def confident(net: M.Segmenter) -> M.Segmenter:
    """The untrained network with its logits scaled up 30 times: far from uniform
    probabilities, so that what a flip changes shows."""
    with torch.no_grad():
        head = net.output_adapters["semseg"].final_layer
        head.weight.mul_(30)
        head.bias.mul_(30)
    return net


def mirror_symmetric(net: M.Segmenter) -> M.Segmenter:
    """The network made left-right equivariant (mirrored input -> mirrored output): every
    spatial kernel mirror-symmetric (patch projections, the head's depthwise convolutions and
    its token-to-pixels map) and a mirror-symmetric position table at the 8x8 grid."""
    with torch.no_grad():
        for adapter in net.input_adapters.values():
            adapter.proj.weight.copy_((adapter.proj.weight + adapter.proj.weight.flip(-1)) / 2)
            table = torch.randn(1, net.cfg.width, 8, 8)
            adapter.pos_emb = (table + table.flip(-1)) / 2
        head = net.output_adapters["semseg"]
        r, dim = head.r, head.dim
        w = head.proj_dec.weight.view(r, r, dim, -1)              # rows: (sub-row, sub-column, channel)
        head.proj_dec.weight.copy_(((w + w.flip(1)) / 2).reshape(r * r * dim, -1))
        b = head.proj_dec.bias.view(r, r, dim)
        head.proj_dec.bias.copy_(((b + b.flip(1)) / 2).reshape(-1))
        for block in head.blocks:
            block.dwconv.weight.copy_((block.dwconv.weight + block.dwconv.weight.flip(-1)) / 2)
    return net


def test_flip_of_a_symmetric_input_is_the_plain_prediction(tmp_path):
    net = confident(finetuned(tmp_path / "ckpt.pt"))
    symmetric_net = mirror_symmetric(copy.deepcopy(net))
    batch = next(iter(rooms(8)))
    symmetric = {m: (batch[m] + batch[m].flip(-1)) / 2 for m in ("rgb", "depth")}
    flip = evaluate.TTA(flip=True)
    p = lambda net, b, names, tta: evaluate.probabilities(net, b, names, 64, tta)
    for s, names in evaluate.SETTINGS.items():
        plain = p(symmetric_net, symmetric, names, evaluate.PLAIN)
        assert torch.allclose(p(symmetric_net, symmetric, names, flip), plain, atol=1e-5), s
        assert torch.equal(evaluate.predict(symmetric_net, symmetric, [s], tta=flip)[s], plain.argmax(1)), s
        assert len(plain.argmax(1).unique()) > 1, s                           # a real segmentation
        # the mirrored view's logits are mirrored back: a mirror-equivariant model is unchanged on any input
        assert torch.allclose(p(symmetric_net, batch, names, flip), p(symmetric_net, batch, names, evaluate.PLAIN),
                              atol=1e-5), s
        # and a model that is not equivariant is changed by the flip
        assert not torch.allclose(p(net, batch, names, flip), p(net, batch, names, evaluate.PLAIN), atol=1e-2), s


def test_the_views_are_averaged_at_full_resolution(tmp_path):
    """Flip and scales: the mean of the softmax of each view's logits, mirrored back and
    resized (bilinear) to the image; a view is resized as `resize` does (rgb bilinear,
    depth nearest) and run padded to the fine-tuning crop like any image."""
    net = finetuned(tmp_path / "ckpt.pt")
    rooms4 = next(iter(rooms(4)))
    batch = {m: rooms4[m][..., :48, :56] for m in ("rgb", "depth")}             # 48x56: padded to the 64 crop
    logits = lambda b: evaluate.logits_at(net, b, ("rgb", "depth"), 64)
    small = evaluate.resize(batch, 36, 42)                                                   # scale 0.75
    views = [logits(batch), logits({m: x.flip(-1) for m, x in batch.items()}).flip(-1),
             F.interpolate(logits(small), (48, 56), mode="bilinear", align_corners=False)]
    expected = sum(v.softmax(1) for v in views) / 3
    assert views[2].shape == (4, C, 48, 56)
    got = evaluate.probabilities(net, batch, ("rgb", "depth"), 64, evaluate.TTA(True, (1.0,)))
    assert torch.allclose(got, (views[0].softmax(1) + views[1].softmax(1)) / 2, atol=1e-6)
    got = evaluate.probabilities(net, batch, ("rgb", "depth"), 64, evaluate.TTA(False, (1.0, 0.75)))
    assert torch.allclose(got, (views[0].softmax(1) + views[2].softmax(1)) / 2, atol=1e-6)
    three = evaluate.TTA(True, (1.0, 0.75))                 # 4 views: the 0.75 one mirrored too
    got = evaluate.probabilities(net, batch, ("rgb", "depth"), 64, three)
    mirrored = F.interpolate(logits({m: x.flip(-1) for m, x in small.items()}).flip(-1), (48, 56), mode="bilinear",
                             align_corners=False)
    assert torch.allclose(got, (sum(v.softmax(1) for v in views) + mirrored.softmax(1)) / 4, atol=1e-6)
    assert str(three) == "scales 1, 0.75, flip" and str(evaluate.PLAIN) == "single scale, no flip"


def test_flip_and_scales_for_the_test_set_images_and_folders(tmp_path, capsys):
    nyu_folder(tmp_path / "nyu", n=2)
    net = finetuned(tmp_path / "nyu.pt", "nyu")
    tta = ["--flip", "--scales", "0.75,1,1.25"]
    plain, out = run(tmp_path), run(tmp_path, *tta)
    assert out["meta"]["tta"] == {"flip": True, "scales": [0.75, 1.0, 1.25]} and out["rgbd"] != plain["rgbd"]
    assert "input    mIoU   mAcc   (scales 0.75, 1, 1.25, flip)" in capsys.readouterr().out
    # one image and a folder of them: the class maps are the TTA predictions
    rgb_dir, depth_dir = tmp_path / "nyu" / "test" / "rgb", tmp_path / "nyu" / "test" / "depth"
    evaluate.main(["--ckpt", str(tmp_path / "nyu.pt"), "--rgb", str(rgb_dir / "0001.png"), "--depth",
                   str(depth_dir / "0001.png"), "--out", str(tmp_path / "one.png"), *tta])
    assert "; scales 0.75, 1, 1.25, flip)" in capsys.readouterr().out
    evaluate.main(["--ckpt", str(tmp_path / "nyu.pt"), "--rgb", str(rgb_dir), "--out", str(tmp_path / "segs"), *tta])
    conv = evaluate.conventions(evaluate.load_segmenter(str(tmp_path / "nyu.pt"), "cpu")[1], net, "nyu.pt")
    t = evaluate.TTA(True, (0.75, 1.0, 1.25))
    batch = evaluate.read_inputs(str(rgb_dir / "0001.png"), str(depth_dir / "0001.png"), 0.001, conv)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")),
                          evaluate.predict(net, batch, ["rgbd"], tta=t)["rgbd"][0].numpy())
    for name in ("0001", "0002"):
        rgb_only = evaluate.read_inputs(str(rgb_dir / f"{name}.png"), "", 0.001, conv)
        expected = evaluate.predict(net, rgb_only, ["rgb"], tta=t)["rgb"][0]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "segs" / f"{name}.png")), expected.numpy())
        assert not torch.equal(expected, evaluate.predict(net, rgb_only, ["rgb"])["rgb"][0])


# --- bad input: one line, before the model is loaded -----------------------------------------


@pytest.mark.parametrize("flags,needles", [
    (["--robustness", "--rates", "0.25,1.5"], ["--rates", "in [0, 1]", "1.5"]),
    (["--robustness", "--rates", "-0.1"], ["--rates", "in [0, 1]"]),
    (["--robustness", "--rates", "0.5,nan"], ["--rates", "nan is not a finite number"]),
    (["--robustness", "--rates", "a,b"], ["--rates a,b", "comma-separated numbers"]),
    (["--robustness", "--rates", "0.5,0.5"], ["--rates", "listed twice"]),
    (["--robustness", "--degradations", "depth_holes,fog"], ["--degradations", "unknown degradation 'fog'",
                                                             "depth_holes,depth_noise"]),
    (["--robustness", "--seed", "-1"], ["--seed must be >= 0"]),
    (["--robustness", "--chart", "c.jpg"], ["--chart c.jpg", ".png"]),
    (["--robustness", "--only", "rgb"], ["--robustness", "leave out --only rgb"]),
    (["--sensor_failure", "0.1,0.2", "--only", "rgbd"], ["--sensor_failure", "--only rgbd"]),
    (["--sensor_failure", "0.1"], ["--sensor_failure 0.1", "P_RGB,P_DEPTH"]),
    (["--sensor_failure", "0.1,1.2"], ["--sensor_failure", "[0, 1]"]),
    (["--sensor_failure", "inf,0.1"], ["--sensor_failure", "inf is not a finite number"]),
    (["--scales", "0.75,0,1"], ["--scales", "in (0, 4]", "got 0"]),
    (["--scales", "-1"], ["--scales", "got -1"]),
    (["--scales", "nan"], ["--scales", "not a finite number"]),
    (["--scales", "1,9"], ["--scales", "got 9"]),
    (["--rates", "0.5"], ["--rates is read by --robustness only"]),
    (["--degradations", "none"], ["--degradations is read by --robustness only"]),
    (["--flip", "--export_onnx", "onnx"], ["--flip changes what is predicted", "export"]),
    (["--scales", "1,2", "--export_safetensors", "m.safetensors"], ["--scales", "export"]),
    (["--robustness", "--rgb", "x.png"], ["--robustness scores a dataset", "--rgb"]),
])
def test_bad_flags_are_one_line_before_the_model_is_loaded(flags, needles, tmp_path):
    with pytest.raises(UserError) as e:
        evaluate.main(["--ckpt", str(tmp_path / "no_such.pt"), "--out_json", str(tmp_path / "r.json"), *flags])
    one_line_error(e, *needles)
    assert "no_such.pt" not in str(e.value)                  # refused before the checkpoint is looked for


def test_good_flags_get_past_the_checks(tmp_path):
    for flags in (["--robustness", "--rates", "0,1", "--degradations", "none", "--seed", "3", "--chart",
                   str(tmp_path / "c.png")], ["--flip", "--scales", "0.5,1,2"], ["--sensor_failure", "0,1"]):
        with pytest.raises(UserError) as e:                  # the next thing: the missing checkpoint
            evaluate.main(["--ckpt", str(tmp_path / "no_such.pt"), "--out_json", str(tmp_path / "r.json"), *flags])
        one_line_error(e, "no_such.pt: no fine-tuned checkpoint there")
    assert not os.path.exists(tmp_path / "r.json")
