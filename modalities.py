"""modalities.py — the one table of modalities: what each input is and how it is learned.

MaskMentor pre-trains on K = 3 modalities (paper §3.5): rgb, depth and semseg. Everything
the network, the objectives and the data need to know about one of them is a row of
`MODALITIES`:

    name     kind    channels  stride  loss  normalise            norm head  segmenter input  resample
    rgb      image   3         1       mse   as given (ImageNet)  yes        yes              bilinear
    depth    image   1         1       l1    standardize_depth    no         yes              nearest
    semseg   labels  classes   4       ce    subsample_labels     no         no               nearest

- kind "image": a dense float map; its input adapter is a patch projection
  (model.PatchedInputAdapter), its MIM head predicts `channels` values per pixel.
  kind "labels": a class map; its adapter embeds each class (model.SemSegInputAdapter),
  its head predicts one logit per class (channels = the dataset's number of classes).
- stride: the map's resolution is 1/stride of the image's (semseg at 1/4, MultiMAE).
- loss: the pixel loss on its masked patches (sttp.pixel_losses): MSE, L1 or
  cross-entropy; pixels the normaliser marks invalid (depth holes) or labelled
  IGNORE_INDEX (255, the labels' void) don't count.
- normalise: the data's tensor -> (the model's input and reconstruction target, a mask of
  valid pixels or None).
- norm head: MultiMAE's extra head that predicts the per-patch-normalised map (norm_rgb).
- segmenter input: fed to the fine-tuned segmenter; semseg is a pre-training input only.
- resample: how data.py scales the map when it augments (data.resample): "bilinear"
  (antialiased when shrinking) for rgb; "nearest" (default) invents no value, so no depth
  appears across an edge or a hole (0 stays missing) and labels stay class ids.
  data.py also pads each map from its kind: labels with IGNORE_INDEX, images with 0.

The model (model.py) builds one adapter and one head per row, the objectives (sttp.py) one
loss per row, in the table's order, which is also the order of the token sequence; the
data (data.py) pads, crops, flips and rescales every map a sample has as its row says. To
add a modality (surface normals, say) add a row, e.g.
    MODALITIES["normals"] = Modality("image", 3, 1, "l1", as_given)
and return a "normals" map from the dataset's `maps` (README, "Adding a modality");
`--modalities rgb,depth` leaves one out (docs/method.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

IGNORE_INDEX = 255      # the labels' void: not a class, ignored by every loss and metric


# -----------------------------------------------------------------------------
# Normalisers: the data's map -> (model input and target, valid pixels or None)


def as_given(x: torch.Tensor, stride: int = 1):
    """rgb arrives ImageNet-normalised from data.py: nothing to do."""
    return x, None


def standardize_depth(depth: torch.Tensor, stride: int = 1, eps: float = 1e-6):
    """MultiMAE's truncated standardisation of each depth map (docs/method.md, decision D10).

    Mean and std come from the 10-90 % quantile slice of the map's pixels, so a few far
    or near outliers don't set the scale. Unlike MultiMAE we use only valid pixels (depth
    > 0; 0 marks a sensor hole) and set holes to 0 (= the mean) afterwards.
    Returns (standardised [B,1,H,W], valid Bool[B,1,H,W]).
    """
    B = depth.shape[0]
    d = depth.reshape(B, -1)
    valid = d > 0
    n = valid.sum(dim=1, keepdim=True)
    s, _ = torch.sort(torch.where(valid, d, torch.full_like(d, float("inf"))), dim=1)  # valid first
    idx = torch.arange(d.shape[1], device=d.device).unsqueeze(0)
    sel = (idx >= (n * 0.1).floor()) & (idx < (n * 0.9).floor())
    cnt = sel.sum(dim=1, keepdim=True).clamp_min(1)
    mean = torch.where(sel, s, 0.0).sum(dim=1, keepdim=True) / cnt
    var = torch.where(sel, (s - mean) ** 2, 0.0).sum(dim=1, keepdim=True) / (cnt - 1).clamp_min(1)
    z = torch.where(valid, (d - mean) / torch.sqrt(var + eps), 0.0)
    return z.view_as(depth), valid.view_as(depth)


def subsample_labels(labels: torch.Tensor, stride: int):
    """A class map [B, H, W] at 1/stride resolution: the centre pixel of each stride x stride
    cell (labels can't be averaged; decision D11), keeping 255 = ignore."""
    return labels[:, stride // 2::stride, stride // 2::stride], None


# -----------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Modality:
    kind: str                     # "image" or "labels"
    channels: int                 # image channels; 0 for labels (= the dataset's classes)
    stride: int                   # resolution 1/stride of the image's
    loss: str                     # "mse", "l1" or "ce"
    normalise: Callable           # (map, stride) -> (input/target, valid mask or None)
    norm_head: bool = False       # MultiMAE's extra head on the per-patch-normalised map
    segmenter_input: bool = True  # an input of the fine-tuned segmenter
    resample: str = "nearest"     # how data.py scales the map: "nearest" or "bilinear"

    def __post_init__(self):
        if self.resample not in ("nearest", "bilinear") or (self.kind == "labels" and self.resample != "nearest"):
            raise ValueError(f"resample must be 'nearest' or 'bilinear' ('nearest' for labels), got {self.resample!r}")


MODALITIES = {
    "rgb": Modality("image", 3, 1, "mse", as_given, norm_head=True, resample="bilinear"),
    "depth": Modality("image", 1, 1, "l1", standardize_depth),
    "semseg": Modality("labels", 0, 4, "ce", subsample_labels, segmenter_input=False),
}
DEFAULT = tuple(MODALITIES)       # the paper's K = 3 pre-training inputs, in sequence order


# The paper's three input conditions (Tables 1-3): what one fine-tuned model is evaluated
# on, and what a dedicated model (finetune.py --inputs) always sees.
INPUT_CONDITIONS = {"rgbd": ("rgb", "depth"), "rgb": ("rgb",), "depth": ("depth",)}


def check(names) -> tuple:
    """`names` as a tuple, after checking each is a row of the table (ValueError if not)."""
    names = tuple(names)
    unknown = [m for m in names if m not in MODALITIES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"modalities must be distinct names from {', '.join(MODALITIES)}, got {','.join(names)}")
    return names


def segmenter_inputs(names) -> tuple:
    """The modalities the fine-tuned segmenter takes, in table order."""
    return tuple(m for m in names if MODALITIES[m].segmenter_input)


def prepare_inputs(batch: dict, names: Optional[tuple] = None) -> dict:
    """The data's sample dict -> the model's inputs (also the pre-training targets).

    Each modality present in `batch` (and in `names`, when given) goes through its row's
    normaliser; a valid-pixel mask, when there is one, is stored as "<name>_valid".
    """
    out = {}
    for m, spec in MODALITIES.items():
        if m in batch and (names is None or m in names):
            out[m], valid = spec.normalise(batch[m], spec.stride)
            if valid is not None:
                out[f"{m}_valid"] = valid
    return out
