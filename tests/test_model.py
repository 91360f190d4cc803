"""model.py: shapes for each preset and modality subset, MultiMAE conventions, invariances
(a dropped or absent modality must not leak into the output), and learning a fixed batch."""
import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

import masking
import modalities
import model as M
from util.runtime import resize_bilinear
from conftest import run_objective, smooth_batch, tiny

SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]


def batch(B=2, size=64, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(B, 3, size, size, generator=g),
            "depth": torch.rand(B, 1, size, size, generator=g) * 4 + 0.5,
            "semseg": torch.randint(0, classes, (B, size, size), generator=g)}


def plan_for(keep, N, budget, seed=0, scheme="dirichlet"):
    cfg = masking.MaskingConfig(budget=budget, patch_masking=scheme)
    g = torch.Generator().manual_seed(seed)
    counts = (masking.dirichlet_visible_counts(keep, budget, 1.0, g) if scheme == "dirichlet"
              else masking.mae_visible_counts(keep, N, cfg.mask_ratio))
    return masking.MaskPlan(keep, counts, torch.rand(keep.shape[0], keep.shape[1] * N, generator=g))


@pytest.mark.parametrize("preset,size,budget", [("tiny", 64, 32), pytest.param("base", 224, 98, marks=pytest.mark.slow)])
def test_pretraining_shapes_every_subset(preset, size, budget):
    cfg = dataclasses.replace(M.PRESETS[preset], num_classes=7)
    net = M.MaskMentor(cfg).eval()
    inputs = modalities.prepare_inputs(batch(1, size))
    N = net.num_tokens(size, size)
    p4 = cfg.patch_size // 4
    with torch.no_grad():
        for subset in SUBSETS:
            keep = torch.zeros(1, 3, dtype=torch.bool)
            keep[0, list(subset)] = True
            preds, tokens, masked = net(inputs, plan_for(keep, N, budget))
            assert preds["rgb"].shape == (1, 3, size, size) and preds["norm_rgb"].shape == (1, 3, size, size)
            assert preds["depth"].shape == (1, 1, size, size)
            assert preds["semseg"].shape == (1, 7, size // 4, size // 4)
            assert all(t.shape == (1, N, cfg.dec_width) for t in tokens.values())
            assert masked.visible.shape == (1, budget, cfg.width)
            assert preds["semseg"].shape[-1] == (size // cfg.patch_size) * p4


@pytest.mark.parametrize("preset,size", [("tiny", 64), ("tiny", 48), pytest.param("base", 224, marks=pytest.mark.slow)])
def test_segmenter_shapes_every_input(preset, size):
    cfg = dataclasses.replace(M.PRESETS[preset], num_classes=7)
    net = M.Segmenter(cfg).eval()
    inputs = modalities.prepare_inputs(batch(2, size))
    with torch.no_grad():
        for given in (("rgb",), ("depth",), ("rgb", "depth")):
            assert net({m: inputs[m] for m in given}).shape == (2, 7, size, size)
        out = net({"rgb": inputs["rgb"], "depth": inputs["depth"]}, torch.tensor([[True, False], [False, True]]))
        assert out.shape == (2, 7, size, size)


def test_segmenter_absent_modality_equals_missing_input():
    """Per-sample `present` (padding) must give what feeding one modality alone gives."""
    net = M.Segmenter(tiny()).eval()
    inputs = modalities.prepare_inputs(batch(3))
    present = torch.tensor([[True, False], [False, True], [True, True]])
    with torch.no_grad():
        mixed = net({"rgb": inputs["rgb"], "depth": inputs["depth"]}, present)
        rgb_only = net({"rgb": inputs["rgb"]})
        depth_only = net({"depth": inputs["depth"]})
        both = net({"rgb": inputs["rgb"], "depth": inputs["depth"]})
    torch.testing.assert_close(mixed[0], rgb_only[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], depth_only[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], both[2], atol=1e-5, rtol=1e-5)
    # and an absent modality's pixels really don't matter
    scrambled = {"rgb": torch.randn_like(inputs["rgb"]), "depth": inputs["depth"]}
    with torch.no_grad():
        again = net(scrambled, present)
    torch.testing.assert_close(again[1], mixed[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["dirichlet", "mae"])
def test_dropped_modality_does_not_leak(scheme):
    """Whatever a dropped modality contains, the network's outputs stay the same."""
    net = M.MaskMentor(tiny()).eval()
    b = batch(2)
    keep = torch.tensor([[True, False, True], [False, True, True]])
    plan = plan_for(keep, 64, 32, scheme=scheme)
    with torch.no_grad():
        preds, tokens, _ = net(modalities.prepare_inputs(b), plan)
        b2 = dict(b, depth=b["depth"].clone(), rgb=b["rgb"].clone())
        b2["depth"][0] = torch.rand_like(b2["depth"][0]) * 9 + 0.1   # sample 0 dropped depth
        b2["rgb"][1] = torch.randn_like(b2["rgb"][1])                 # sample 1 dropped rgb
        preds2, tokens2, _ = net(modalities.prepare_inputs(b2), plan)
    for k in preds:
        torch.testing.assert_close(preds[k], preds2[k], atol=1e-5, rtol=1e-5)
    for k in tokens:
        torch.testing.assert_close(tokens[k], tokens2[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,out", [((16, 16), (64, 64)), ((15, 9), (37, 40)), ((20, 20), (7, 13)),
                                      ((1, 5), (4, 5))])
def test_resize_bilinear_equals_interpolate(size, out):
    # The segmentation head's upsampling under torch.compile (two matmuls) computes what
    # F.interpolate does, values and gradients, up- and downsampling, odd sizes.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=g, requires_grad=True)
    got, want = resize_bilinear(x, out), F.interpolate(x, size=out, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    grad = torch.randn(want.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
                               rtol=0, atol=2e-5)


def test_sincos_matches_multimae_layout():
    """MultiMAE builds the table with meshgrid(w, h) and reads it back as (h w): at grid
    position (row, col) the first half encodes the row, the second the column."""
    h = w = 5
    dim = 16
    ours = M.sincos_pos_embed(h, w, dim, "cpu")[0]
    omega = 1.0 / (10000 ** (torch.arange(dim // 4) / (dim // 4)))
    gw, gh = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij")
    ow, oh = gw.flatten()[:, None] * omega, gh.flatten()[:, None] * omega
    theirs = torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], 1)     # row-major over (h, w) for h == w
    torch.testing.assert_close(ours, theirs)


def test_standardize_depth_matches_multimae_without_holes_and_skips_holes():
    d = torch.rand(2, 1, 20, 20) * 5 + 0.5
    z, valid = modalities.standardize_depth(d)
    s = torch.sort(d.flatten(1), 1)[0][:, 40:360]          # MultiMAE: int(0.1 n) .. int(0.9 n)
    ref = (d - s.mean(1)[:, None, None, None]) / torch.sqrt(s.var(1)[:, None, None, None] + 1e-6)
    torch.testing.assert_close(z, ref)
    assert valid.all()
    holes = d.clone()
    holes[:, :, :5] = 0
    z2, valid2 = modalities.standardize_depth(holes)
    assert not valid2[:, :, :5].any() and (z2[:, :, :5] == 0).all()
    s2 = torch.sort(d[:, :, 5:].flatten(1), 1)[0][:, 30:270]
    ref2 = (d[:, :, 5:] - s2.mean(1)[:, None, None, None]) / torch.sqrt(s2.var(1)[:, None, None, None] + 1e-6)
    torch.testing.assert_close(z2[:, :, 5:], ref2)


def test_multimae_parameter_names():
    names = set(M.MaskMentor(tiny()).state_dict())
    for key in ["global_tokens", "input_adapters.rgb.proj.weight", "input_adapters.semseg.class_emb.weight",
                "encoder.0.attn.qkv.weight", "encoder.3.mlp.fc2.bias", "encoder.0.norm1.weight",
                "output_adapters.depth.decoder.kv.weight", "output_adapters.rgb.proj_context.weight",
                "output_adapters.semseg.task_embeddings.rgb", "output_adapters.norm_rgb.out_proj.weight",
                "output_adapters.rgb.decoder_transformer.0.attn.qkv.weight", "output_adapters.rgb.mask_token"]:
        assert key in names, key
    seg = set(M.Segmenter(tiny()).state_dict())
    assert {"output_adapters.semseg.proj_dec.weight", "output_adapters.semseg.final_layer.weight"} <= seg
    trunk = M.trunk_state_dict(M.MaskMentor(tiny()).state_dict(), ("rgb", "depth"))
    assert set(trunk) == {k for k in seg if not k.startswith("output_adapters.")}


def test_pretraining_overfits_a_fixed_batch():
    torch.manual_seed(0)
    net = M.MaskMentor(tiny())
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    import sttp
    cfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=32))
    g = torch.Generator().manual_seed(0)
    b = smooth_batch()
    first = [run_objective("mim", net, opt, b, cfg, g)["loss"] for _ in range(3)]
    for _ in range(120):
        last = run_objective("mim", net, opt, b, cfg, g)["loss"]
    assert last < 0.5 * sum(first) / 3, (first, last)


def test_segmenter_overfits_a_fixed_batch():
    torch.manual_seed(0)
    net = M.Segmenter(tiny())
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    b = smooth_batch()
    inputs = modalities.prepare_inputs(b)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(net({"rgb": inputs["rgb"], "depth": inputs["depth"]}), b["semseg"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]
