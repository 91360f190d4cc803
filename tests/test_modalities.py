"""The modality table: a modality added by one row is built, pre-trained and fine-tuned;
`--modalities` leaves one out."""
import dataclasses

import pytest
import torch

import finetune
import masking
import modalities
import model as M
import runtime
import sttp
import train
from conftest import smooth_batch
from modalities import Modality


@pytest.fixture
def normals(monkeypatch):
    """Surface normals as a 3-channel image, L1 loss, a segmenter input: one new row."""
    monkeypatch.setitem(modalities.MODALITIES, "normals", Modality("image", 3, 1, "l1", modalities.as_given))
    return ("rgb", "depth", "normals", "semseg")


def batch_with_normals(B=4, size=64):
    b = smooth_batch(B, size, classes=7)
    g = torch.Generator().manual_seed(5)
    b["normals"] = torch.nn.functional.normalize(torch.randn(B, 3, size, size, generator=g), dim=1)
    return b


def changed(before: dict, net: torch.nn.Module, prefix: str) -> bool:
    return any(not torch.equal(before[k], v) for k, v in net.state_dict().items() if k.startswith(prefix))


def test_a_row_of_the_table_gives_an_adapter_a_head_and_a_loss(normals):
    cfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=7, modalities=normals)
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
    losses = sttp.pixel_losses(preds, inputs, masked.mask, net)
    assert list(losses) == ["rgb", "norm_rgb", "depth", "normals", "semseg"]
    # The L1 of the table's row, on the patches hidden from the encoder.
    hidden = masked.mask[:, 2 * 64:3 * 64].view(4, 8, 1, 8, 1).expand(4, 8, 8, 8, 8).reshape(4, 64, 64)
    per_pixel = (preds["normals"] - inputs["normals"]).abs().mean(1)
    want = torch.stack([per_pixel[i][hidden[i]].mean() for i in range(4) if hidden[i].any()]).mean()
    torch.testing.assert_close(losses["normals"], want)


@pytest.mark.parametrize("mode", ["m2im", "sttp"])
def test_pretraining_steps_learn_the_new_modality(normals, mode):
    torch.manual_seed(0)
    net = M.MaskMentor(dataclasses.replace(M.PRESETS["tiny"], num_classes=7, modalities=normals))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    cfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=32))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    logs = sttp.OBJECTIVES[mode](net, opt, batch_with_normals(), cfg, torch.Generator().manual_seed(0))
    assert "m2im_normals" in logs
    assert changed(before, net, "input_adapters.normals.") and changed(before, net, "output_adapters.normals.")


def test_finetuning_takes_the_new_modality_as_an_input(normals):
    torch.manual_seed(0)
    cfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=7, modalities=normals)
    pre = M.MaskMentor(cfg)
    seg = M.Segmenter(cfg)
    assert seg.inputs == ("rgb", "depth", "normals")
    seg.load_state_dict(M.trunk_state_dict(pre.state_dict(), seg.inputs), strict=False)
    torch.testing.assert_close(seg.input_adapters["normals"].proj.weight, pre.input_adapters["normals"].proj.weight)
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    fcfg = finetune.FinetuneConfig(p_missing=1.0)
    rt = runtime.TrainingRuntime(torch.device("cpu"))
    logs = finetune.train_step(seg, opt, batch_with_normals(), fcfg, torch.Generator().manual_seed(0), rt)
    assert logs["loss"] > 0 and changed(before, seg, "input_adapters.normals.")
    seg.eval()
    only = modalities.prepare_inputs({"normals": batch_with_normals()["normals"]}, seg.inputs)
    assert seg(only).shape == (4, 7, 64, 64)


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
