"""util/degrade.py — degraded inputs: what a failing RGB-D sensor does to a batch. A modality
missing for some samples (the per-sample draw fine-tuning trains with), or present but
damaged: depth holes, noisy depth, coarse depth steps, dark rgb, blurred rgb.

    present = sample_present(B, 2, 0.5, g, "cpu")       # Bool[B, 2]: which of rgb, depth each sample shows
    batch = degrade(batch, "depth holes 30%", g)         # one modality damaged, the rest as it was
    KINDS["depth_holes"]                                 # its levels: the names of DEGRADATIONS it has

One implementation for everything that corrupts inputs: finetune.py draws its missing
modalities with sample_present, evaluate.py --robustness scores a checkpoint under every
entry of DEGRADATIONS and under random missing inputs, and studies/diagnostics.py builds the
studies' robustness table from the same entries. Every random draw comes from the generator
passed in, never the global one: the same seed gives every model exactly the same corrupted
images and the same missing inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import data


def sample_present(batch_size: int, num_inputs: int, p_missing: float, generator, device) -> torch.Tensor:
    """Which of the segmenter's inputs each sample shows: Bool[B, num_inputs] (decision D9
    of docs/method.md). With probability p_missing a sample misses some of them, each
    proper non-empty subset equally likely, else it shows all. For (rgb, depth): rgb only
    with p_missing/2, depth only with p_missing/2, both otherwise (never neither). One
    uniform number per sample decides: below p_missing/2 it loses rgb, from there to
    p_missing it loses depth."""
    u = torch.rand(batch_size, generator=generator, device=device)
    present = torch.ones(batch_size, num_inputs, dtype=torch.bool, device=device)
    subsets = 2 ** num_inputs - 2                 # what a sample may miss: not nothing, not all
    for j in range(subsets):
        chosen = (u >= p_missing * j / subsets) & (u < p_missing * (j + 1) / subsets)
        for k in range(num_inputs):
            if (j + 1) >> k & 1:                  # bit k of j + 1: input k is missing
                present[:, k] &= ~chosen
    return present


# -----------------------------------------------------------------------------
# Damaged maps. Each takes the batch's depth (metres, 0 = missing) or rgb (in [0, 1]) and a
# generator, and returns the degraded map.


def depth_holes(depth: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """Missing depth (0) on `ratio` of each image's pixels, in blobs as a Kinect loses them
    (dark, shiny or distant surfaces), not salt noise: a coarse random field upsampled and
    its lowest `ratio` of pixels."""
    B, _, H, W = depth.shape
    field = torch.rand(B, 1, max(1, H // 8), max(1, W // 8), generator=g)
    field = F.interpolate(field, size=(H, W), mode="bilinear", align_corners=False).flatten(1)
    lowest = field.topk(round(ratio * H * W), dim=1, largest=False).indices   # exactly that many, ties or not
    holes = torch.zeros_like(field, dtype=torch.bool).scatter_(1, lowest, True)
    return depth.masked_fill(holes.view(B, 1, H, W), 0.0)


def depth_noise(depth: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    """Gaussian noise with a standard deviation of `sigma` x depth (it grows with distance);
    missing pixels stay missing."""
    noisy = depth * (1 + sigma * torch.randn(depth.shape, generator=g))
    return torch.where(depth > 0, noisy.clamp_min(0.05), depth)


def depth_quantise(depth: torch.Tensor, step: float, g: torch.Generator) -> torch.Tensor:
    """Depth rounded to multiples of `step` metres (a coarse sensor or a lossy 8-bit export)."""
    q = (depth / step).round().clamp_min(1) * step
    return torch.where(depth > 0, q, depth)


def rgb_dark(rgb: torch.Tensor, gain: float, g: torch.Generator) -> torch.Tensor:
    """Under-exposure: intensities times `gain`, then re-quantised to 8 bits (the lost
    precision is what makes low light hard, not the scale alone)."""
    return (rgb * gain * 255).round() / 255


def rgb_blur(rgb: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur (defocus / motion) of `sigma` pixels, reflecting at the borders."""
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=rgb.dtype)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    C = rgb.shape[1]
    out = F.conv2d(F.pad(rgb, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


#              name                 modality  function, parameter
DEGRADATIONS = {"depth holes 10%":  ("depth", depth_holes, 0.10),
                "depth holes 30%":  ("depth", depth_holes, 0.30),
                "depth holes 50%":  ("depth", depth_holes, 0.50),
                "depth noise 5%":   ("depth", depth_noise, 0.05),
                "depth 0.25 m steps": ("depth", depth_quantise, 0.25),
                "rgb dark x0.2":    ("rgb", rgb_dark, 0.2),
                "rgb blur 1.5 px":  ("rgb", rgb_blur, 1.5)}

# The degradations by kind (the function's name, what evaluate.py --degradations names),
# each with its levels: the names of its entries above, in their order.
KINDS = {fn.__name__: [n for n, (_, f, _) in DEGRADATIONS.items() if f is fn] for _, fn, _ in DEGRADATIONS.values()}


def degrade(batch: dict, name: str, g: torch.Generator) -> dict:
    """The batch with one modality degraded (rgb, normalised as data.py normalises it, is
    un-normalised for it and back); every other entry is the batch's own."""
    modality, fn, param = DEGRADATIONS[name]
    out = dict(batch)
    if modality == "depth":
        out["depth"] = fn(batch["depth"], param, g)
    else:
        mean, std = torch.tensor(data.RGB_MEAN).view(1, 3, 1, 1), torch.tensor(data.RGB_STD).view(1, 3, 1, 1)
        out["rgb"] = (fn((batch["rgb"] * std + mean).clamp(0, 1), param, g) - mean) / std
    return out
