"""util/degrade.py: each degradation does what it says and leaves the rest alone; fine-tuning
draws its missing inputs with the same function that evaluate.py --robustness scores with
(its rates: tests/test_modalities.py)."""
import pytest
import torch

import data
import finetune
from util import degrade as D


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_depth_holes_cover_the_asked_ratio(ratio):
    depth = torch.rand(4, 1, 64, 48) * 5 + 0.5
    out = D.depth_holes(depth, ratio, torch.Generator().manual_seed(0))
    measured = (out == 0).float().mean(dim=(1, 2, 3))
    assert torch.allclose(measured, torch.full_like(measured, ratio), atol=1 / (64 * 48))
    assert torch.equal(out[out > 0], depth[out > 0])                   # the rest untouched
    # blobs, not salt: most hole pixels have a hole as right-hand neighbour
    holes = out == 0
    assert (holes[..., 1:] & holes[..., :-1]).sum() > 0.8 * holes[..., 1:].sum()


def test_depth_noise_and_quantisation_keep_missing_pixels_missing():
    g = torch.Generator().manual_seed(0)
    depth = torch.full((2, 1, 64, 64), 3.0)
    depth[:, :, :8] = 0
    noisy = D.depth_noise(depth, 0.05, g)
    assert (noisy[:, :, :8] == 0).all()
    rel = noisy[:, :, 8:] / 3.0 - 1
    assert abs(float(rel.std()) - 0.05) < 0.005 and abs(float(rel.mean())) < 0.005
    q = D.depth_quantise(torch.tensor([0.0, 0.3, 1.12, 2.9]), 0.25, g)
    assert q.tolist() == [0.0, 0.25, 1.0, 3.0]


def test_rgb_degradations():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 32, 32)
    dark = D.rgb_dark(rgb, 0.2, g)
    assert torch.allclose(dark, rgb * 0.2, atol=0.5 / 255) and torch.equal(dark, (dark * 255).round() / 255)
    flat = torch.full((1, 3, 16, 16), 0.4)
    assert torch.allclose(D.rgb_blur(flat, 1.5, g), flat)
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2
    checker = checker.float().expand(1, 3, 32, 32)
    blurred = D.rgb_blur(checker, 1.5, g)
    assert blurred.std() < 0.1 * checker.std() and abs(float(blurred.mean() - checker.mean())) < 0.01
    # degrade() works on normalised rgb and changes only the degraded modality
    batch = {"rgb": data.normalize_rgb((rgb[0].permute(1, 2, 0) * 255).byte().numpy())[None],
             "depth": torch.ones(1, 1, 32, 32), "semseg": torch.zeros(1, 32, 32, dtype=torch.long)}
    out = D.degrade(batch, "rgb dark x0.2", g)
    assert out["depth"] is batch["depth"] and out["rgb"].mean() < batch["rgb"].mean()


def test_one_draw_of_missing_inputs_for_training_and_evaluation():
    assert finetune.sample_present is D.sample_present
    assert set(D.KINDS) == {"depth_holes", "depth_noise", "depth_quantise", "rgb_dark", "rgb_blur"}
    assert D.KINDS["depth_holes"] == ["depth holes 10%", "depth holes 30%", "depth holes 50%"]
    assert [n for names in D.KINDS.values() for n in names] == list(D.DEGRADATIONS)
