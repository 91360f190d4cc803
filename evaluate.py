"""evaluate.py — one fine-tuned checkpoint, three input conditions: rgb+depth, rgb only, depth only.

    python evaluate.py                      # out/finetune/ckpt.pt on its dataset's test split
    python evaluate.py --only depth         # just one condition
    python evaluate.py --out_json r.json
    python evaluate.py --rgb img.png --depth d.png --out seg.png   # one image, either input optional
    python evaluate.py --rgb imgs/ --depth depths/ --out segs/     # every image of a folder
    python evaluate.py --export_onnx onnx/  # rgbd.onnx, rgb.onnx, depth.onnx (docs/deploy.md)
    python evaluate.py --export_safetensors model.safetensors   # + model.json: the model to share
    python evaluate.py --robustness         # + random missing and degraded inputs: table, JSON, chart
    python evaluate.py --sensor_failure 0.1,0.3                  # the expected mIoU as sensors fail
    python evaluate.py --flip --scales 0.75,1,1.25               # test-time flip and multi-scale

This is the paper's Tables 1-3 protocol: the *same* network is run with both modalities,
with rgb alone and with depth alone (the missing modality simply contributes no tokens),
in one pass over the split. mIoU and mAcc (mean per-class accuracy) come from one
confusion matrix per condition accumulated over the whole split (not averaged per image),
void (255) ignored, classes with an empty union skipped, x100 — the mmseg/MultiMAE
convention (docs/method.md §1). It prints a table (plus per-class IoU with class names) and
writes the same numbers as JSON: keys rgbd, rgb, depth, each with miou, macc,
per_class_iou. It also draws the paper's Figure 3 for the first --num_vis images (util/vis.py):
rgb | depth | ground truth | prediction from rgb+depth, rgb only, depth only.

Every prediction (`predict`) sees the grid fine-tuning saw: an image smaller than the
fine-tuning crop is padded at the bottom/right to the crop (rgb 0 = the mean, depth 0 =
missing), as MultiMAE pads its test images, and the prediction is cropped back (decision
D16). Images and folders of images (`--rgb`, `--depth`) are read with the conventions the
checkpoint carries (classes, rgb normalisation, crop size: `ckpt["data"]`); a very large
image is segmented at a bounded size (MAX_SIDE) and its class map scaled back. The ONNX
graphs are the same forward at a fixed crop-sized input. Every output path is checked
before the model is loaded, so a typo costs a second, not an evaluation, and an output
that is an input (--rgb, --depth, --ckpt) is refused then: nothing the user gave is ever
replaced. Every file is written whole or not at all (cli.write_atomic): a full disk is one
line naming the file. A dedicated model (finetune.py --inputs rgb or depth) is run on its
own input condition only, in every mode.

As a deployed sensor fails (docs/deploy.md, "When a sensor fails"): --robustness adds
conditions to the same pass over the split, each image missing rgb or depth at random
(`MIXED`: each sample its own inputs) or with one modality degraded (util/degrade.py, the
studies' degradations); --sensor_failure turns the three clean conditions into the expected
mIoU under independent failures; --flip and --scales average the class probabilities of
several views of every image (`TTA`), wherever evaluate.py predicts.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import model as M
import modalities
from util import charts, vis
from util.checkpoints import export_safetensors, is_safetensors, json_path, load_checkpoint, load_weights
from util.cli import (UserError, arg, check_not_input, check_numbers, check_output, one_line, parse_config, pick_device,
                 run_cli, write_atomic, write_png)
from util.degrade import DEGRADATIONS, KINDS, degrade, sample_present
from util.engine import to_device
from util.layouts import check_same_size, read_depth_file, read_rgb

SETTINGS = modalities.INPUT_CONDITIONS
# The long side of an image given with --rgb / --depth is limited to MAX_SIDE x the
# fine-tuning crop (1280 px for the paper's 640). See segment().
MAX_SIDE = 2
RGB_EXTS, DEPTH_EXTS = (".png", ".jpg", ".jpeg"), (".png", ".npy")


# -----------------------------------------------------------------------------
# Metrics


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = M.IGNORE_INDEX) -> torch.Tensor:
    """C x C counts, rows = ground truth, columns = prediction, ignored pixels left out."""
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"ground-truth labels must be in [0, {num_classes}) or {ignore_index}, "
                         f"found {int(t.min())}..{int(t.max())}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes)


def scores(cm: torch.Tensor) -> dict:
    """mIoU, mAcc and per-class IoU (x100) from a confusion matrix. A class absent from
    both ground truth and prediction has no IoU (nan, skipped by the mean); a class absent
    from the ground truth has no accuracy."""
    cm = cm.double()
    tp = cm.diag()
    gt, predicted = cm.sum(1), cm.sum(0)
    union = gt + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.nan)
    return {"miou": 100 * float(iou.nanmean()), "macc": 100 * float(acc.nanmean()),
            "per_class_iou": (100 * iou).tolist()}


# -----------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Evaluate a fine-tuned checkpoint on rgb+depth, rgb only and depth only (and, with
    --robustness, on random missing and degraded inputs)."""
    ckpt: str = arg("out/finetune/ckpt.pt", "fine-tuned checkpoint (finetune.py's ckpt.pt, or an exported "
                                            ".safetensors with its .json)")
    dataset: str = arg("", "dataset (default: the one the checkpoint was fine-tuned on)", ("",) + data.DATASETS)
    cues: float = arg(-1.0, "synthetic rooms: their cue level, 0 to 1 (default -1: the checkpoint's)")
    data_root: str = arg("", "dataset folder (default: data/<dataset>)")
    split: str = arg("test", "split to evaluate (val: the synthetic rooms only)", data.SPLITS)
    only: str = arg("", "evaluate (or export) just this input condition", ("", "rgbd", "rgb", "depth"))
    batch_size: int = arg(16, "images per batch")
    out_json: str = arg("out/eval/results.json", "where the numbers are written as JSON")
    save_vis: str = arg("out/eval/vis", "folder for Figure-3 pictures of the first --num_vis images ('' = none)")
    num_vis: int = arg(4, "how many images get a picture")
    rgb: str = arg("", "segment this rgb image, or every image in this folder (with or without --depth)")
    depth: str = arg("", "this depth image, or a folder of them matched to --rgb by name "
                         "(16-bit PNG, or .npy in metres)")
    depth_scale: float = arg(0.001, "--depth: metres per unit of the depth PNGs (0.001 = mm)")
    out: str = arg("", "where class maps go (palette PNG, pixel = class id): a .png file for one image, "
                       "a folder for folders ('' = seg.png or seg/)")
    robustness: bool = arg(False, "also score random missing inputs (--rates) and degraded inputs (--degradations): "
                                  "a table, the same numbers in --out_json, a chart (--chart)")
    rates: str = arg("0.25,0.5,0.75", "--robustness: rates r of random missing inputs, comma-separated: each sample "
                                      "independently loses rgb with probability r/2 or depth with r/2, never both")
    degradations: str = arg("all", "--robustness: degradations, each at its levels: all, none, or some of "
                                   + ",".join(KINDS))
    seed: int = arg(0, "--robustness: seed of the random missing inputs and the degradations' noise "
                       "(the same seed, the same numbers)")
    chart: str = arg("out/eval/robustness.png", "--robustness: where the chart of mIoU per condition and level goes")
    sensor_failure: str = arg("", "P_RGB,P_DEPTH: also the expected mIoU when rgb fails with probability P_RGB and "
                                  "depth with P_DEPTH, independently; both failing scores 0 (docs/deploy.md)")
    flip: bool = arg(False, "test-time augmentation: average the class probabilities with those of the mirrored "
                            "image (every condition, dataset, images and folders)")
    scales: str = arg("1", "test-time scales, comma-separated (e.g. 0.75,1,1.25): their class probabilities averaged")
    export_onnx: str = arg("", "write one ONNX graph per input condition into this folder, check them, and stop")
    export_safetensors: str = arg("", "write the --ckpt's weights (fine-tuned or pre-training) to this .safetensors "
                                      "file and what they need to be used to the .json beside it, and stop")
    overwrite: bool = arg(False, "--export_safetensors: replace its .safetensors and .json if they exist")
    workers: int = arg(0, "DataLoader worker processes")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")


# -----------------------------------------------------------------------------
# The checkpoint and the data conventions it carries


@dataclass
class Conventions:
    """What the model expects of its inputs and means by its outputs. Fine-tuned
    checkpoints carry it as ckpt["data"]; older ones only name their dataset, whose
    classes and ImageNet statistics (data.py) were then the only possibility."""
    dataset: str
    classes: tuple
    image_size: int            # the fine-tuning crop: images are padded up to it (D16)
    rgb_mean: tuple
    rgb_std: tuple

    def palette(self) -> np.ndarray:
        return data.palette(self.dataset)


def load_segmenter(path: str, device) -> tuple[M.Segmenter, dict]:
    ckpt = load_checkpoint(path, "finetune")
    net = M.Segmenter(M.ModelConfig.from_dict(ckpt["model_config"]))
    load_weights(net, ckpt, path)
    return net.to(device).eval(), ckpt


def conventions(ckpt: dict, net: M.Segmenter, path: str, dataset: str = "") -> Conventions:
    """The checkpoint's data conventions; `dataset` (--dataset) overrides its class set."""
    d = ckpt.get("data")
    if d is None:
        conv = Conventions(ckpt["dataset"], data.CLASS_NAMES[ckpt["dataset"]], net.cfg.image_size,
                           data.RGB_MEAN, data.RGB_STD)
    else:                 # its types and ranges checked by util/checkpoints.load_checkpoint
        conv = Conventions(d["dataset"], tuple(d["classes"]), int(d["image_size"]),
                           tuple(d["rgb_mean"]), tuple(d["rgb_std"]))
    if dataset and dataset != conv.dataset:
        conv.dataset, conv.classes = dataset, data.CLASS_NAMES[dataset]
    if conv.dataset not in data.DATASETS:
        raise UserError(f"{path}: fine-tuned on {conv.dataset!r}, a dataset this version has no palette for")
    if len(conv.classes) != net.cfg.num_classes:
        raise UserError(f"{path}: the model predicts {net.cfg.num_classes} classes, "
                        f"{conv.dataset} has {len(conv.classes)}")
    return conv


# -----------------------------------------------------------------------------
# Prediction: every image padded to (at least) the grid fine-tuning saw; test-time flips and scales


MIXED = "mixed"      # a setting beside SETTINGS': each sample its own inputs (predict's `present`)


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation (--flip, --scales): the views whose class probabilities a
    prediction averages. The default, one view at scale 1 unmirrored, is the plain prediction."""
    flip: bool = False
    scales: tuple = (1.0,)

    def views(self) -> list:
        """(scale, mirrored) of every view, in the order they are run."""
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]

    @property
    def plain(self) -> bool:
        return self.views() == [(1.0, False)]

    def __str__(self) -> str:
        scales = "single scale" if self.scales == (1.0,) else "scales " + ", ".join(f"{s:g}" for s in self.scales)
        return f"{scales}, {'flip' if self.flip else 'no flip'}"


PLAIN = TTA()


def conditions_of(net: M.Segmenter) -> list:
    """The input conditions (SETTINGS) a segmenter can be run on: all three for a joint or
    rgb+depth model, only its own for a dedicated rgb or depth model (finetune.py --inputs)."""
    return [s for s, names in SETTINGS.items() if all(m in net.inputs for m in names)]


def padded_size(H: int, W: int, crop: int, patch: int) -> tuple[int, int]:
    """The size an H x W image is run at: at least crop x crop, rounded up to the patch."""
    return -(-max(H, crop) // patch) * patch, -(-max(W, crop) // patch) * patch


@torch.no_grad()
def logits_at(net: M.Segmenter, batch: dict, names: tuple, crop: int, present=None) -> torch.Tensor:
    """Logits [B, C, H, W] from the batch's inputs `names` (normalised rgb [B,3,H,W], depth
    in metres [B,1,H,W]); `present` as Segmenter.forward takes it.

    Fine-tuning sees crop x crop windows (`crop`: net.cfg.image_size unless the checkpoint
    says otherwise; 640 in the paper's setting), so a position table loaded with --init is
    interpolated to the crop's grid (40x40). Run at 480x640, the same table would be
    interpolated to 30x40 and every vertical position squeezed by 4/3. So, as MultiMAE does
    at test time, the batch is padded at the bottom/right to at least the crop in both
    dimensions (and to a multiple of the patch): the image keeps the positions it was
    trained with, and the logits are cropped back. Padding is rgb 0 (the mean colour after
    normalisation) and depth 0 (missing; depth is standardised over valid pixels only, so
    its statistics don't change) — what the training crops are padded with. A dimension
    larger than the crop keeps its size (rounded up to the patch). Decision D16 of
    docs/method.md.
    """
    H, W = batch[names[0]].shape[-2:]
    Hp, Wp = padded_size(H, W, crop, net.cfg.patch_size)
    inputs = modalities.prepare_inputs({m: F.pad(batch[m], (0, Wp - W, 0, Hp - H)) for m in names})
    return net({m: inputs[m] for m in names}, present)[..., :H, :W]


@torch.no_grad()
def probabilities(net: M.Segmenter, batch: dict, names: tuple, crop: int, tta: TTA, present=None) -> torch.Tensor:
    """Class probabilities [B, C, H, W] averaged over the views of `tta`, as mmseg's aug_test
    averages them: each view is the batch rescaled by its scale (rgb bilinear, depth
    nearest: `resize`, as data.py rescales each modality) and/or mirrored left-right, run
    as logits_at runs any image (padded to the fine-tuning grid), its logits mirrored back,
    resized to H x W (bilinear) and softmaxed there, at full resolution."""
    H, W = batch[names[0]].shape[-2:]
    total = 0.0
    for scale, flip in tta.views():
        view = {m: batch[m] for m in names}
        if scale != 1:
            view = resize(view, max(1, round(H * scale)), max(1, round(W * scale)))
        if flip:
            view = {m: x.flip(-1) for m, x in view.items()}
        logits = logits_at(net, view, names, crop, present)
        if flip:
            logits = logits.flip(-1)
        if logits.shape[-2:] != (H, W):
            logits = F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)
        total = total + logits.softmax(1)
    return total / len(tta.views())


@torch.no_grad()
def predict(net: M.Segmenter, batch: dict, settings, crop: int | None = None, tta: TTA = PLAIN,
            present: torch.Tensor | None = None) -> dict:
    """{setting: class map Long[B, H, W]} for a batch of normalised rgb [B,3,H,W] and/or
    depth in metres [B,1,H,W], every image run on the fine-tuning grid (logits_at; `crop`,
    default net.cfg.image_size). A setting is a key of SETTINGS (those inputs of every
    sample), or MIXED: every input given, `present` (Bool[B, len(net.inputs)]) choosing
    each sample's. With `tta`, the argmax of the views' mean probabilities; without, of the
    plain logits (no softmax, which could only turn near-ties into ties)."""
    crop = crop or net.cfg.image_size
    out = {}
    for s in settings:
        if s == MIXED and present is None:
            raise ValueError("the mixed setting needs `present`: which inputs each sample shows")
        names, shown = (net.inputs, present) if s == MIXED else (SETTINGS[s], None)
        out[s] = (logits_at(net, batch, names, crop, shown) if tta.plain else
                  probabilities(net, batch, names, crop, tta, shown)).argmax(1)
    return out


def batches(loader):
    """The loader's batches, with one-line errors from worker processes too: a UserError
    raised in a DataLoader worker (an unreadable file, say) comes back from torch wrapped in
    the worker's traceback; callers (run_cli, studies/reproduce.py, tests) get the original line."""
    try:
        yield from loader
    except UserError as e:
        raise UserError(one_line(e)) from None


# -----------------------------------------------------------------------------
# Evaluation: one pass over the split, under every condition asked for


@dataclass(frozen=True)
class Condition:
    """What is done to every batch before it is segmented, and the inputs it is then scored
    on: the clean split, a degradation (util/degrade.py), or inputs missing at random."""
    name: str                    # "clean", "random missing 25%", a name of DEGRADATIONS
    settings: tuple              # keys of SETTINGS, or (MIXED,)
    degradation: str = ""        # a name of DEGRADATIONS, applied first
    missing: float = 0.0         # MIXED: each sample misses rgb with p missing/2, or depth with p missing/2
    seed: int = 0                # of the condition's own generator: its draws and nobody else's


def condition_seed(seed: int, name: str) -> int:
    """The seed of a condition's generator under --seed: a function of the seed and the
    condition's name only, so a condition draws the same whichever others are run with it.
    32 bits (a CRC of both), as torch's CPU generator keeps only the low 32 bits of a seed."""
    return zlib.crc32(f"{seed}/{name}".encode())


def robustness_conditions(possible: list, rates, kinds, seed: int) -> tuple[list, list]:
    """--robustness's rows for a model run on `possible` (conditions_of): clean; random
    missing at each rate (needs both inputs); each degradation of `kinds` at its levels,
    scored with rgb+depth and with the degraded modality alone (those of them it has).
    Returns (the conditions, the names of those it cannot score)."""
    conditions, skipped = [Condition("clean", tuple(possible))], []
    for r in rates:
        name = f"random missing {100 * r:g}%"
        if "rgbd" in possible:
            conditions.append(Condition(name, (MIXED,), missing=r, seed=condition_seed(seed, name)))
        else:
            skipped.append(name)
    for kind in kinds:
        for name in KINDS[kind]:
            settings = tuple(s for s in ("rgbd", DEGRADATIONS[name][0]) if s in possible)
            if settings:
                conditions.append(Condition(name, settings, degradation=name, seed=condition_seed(seed, name)))
            else:
                skipped.append(name)
    return conditions, skipped


@torch.no_grad()
def evaluate(net: M.Segmenter, loader, num_classes: int, conditions: list, device, tta: TTA = PLAIN) -> dict:
    """{condition name: {setting: scores}} from one pass over the loader. Every batch goes
    through each condition: its degradation, on the CPU from the condition's own generator
    (the same corrupted images on any device), then, for MIXED, which inputs each sample
    keeps (util.degrade.sample_present, the draw fine-tuning trains with, from the same
    generator), then a prediction per setting; one confusion matrix per (condition,
    setting) over the whole split."""
    generators = {c.name: torch.Generator().manual_seed(c.seed) for c in conditions}
    cms = {(c.name, s): torch.zeros(num_classes, num_classes, dtype=torch.long) for c in conditions for s in c.settings}
    for batch in tqdm(batches(loader), total=len(loader), desc="evaluating", leave=False,
                      dynamic_ncols=True, disable=None):
        clean = to_device(batch, device)
        for c in conditions:
            g = generators[c.name]
            b = to_device(degrade(batch, c.degradation, g), device) if c.degradation else clean
            present = None
            if MIXED in c.settings:
                B = batch["semseg"].shape[0]
                present = sample_present(B, len(net.inputs), c.missing, g, "cpu").to(device)
            for s, pred in predict(net, b, c.settings, tta=tta, present=present).items():
                cms[c.name, s] += confusion_matrix(pred, b["semseg"], num_classes).cpu()
    return {c.name: {s: scores(cms[c.name, s]) for s in c.settings} for c in conditions}


def sensor_failure(clean: dict, p_rgb: float, p_depth: float) -> dict:
    """The expected mIoU of a deployed model whose rgb fails with probability p_rgb and whose
    depth fails with p_depth, independently (docs/deploy.md): the four outcomes' mIoU
    (`clean`: the rgbd, rgb and depth results) weighted by their probabilities, the outcome
    "both failed" scoring 0 (there is nothing to segment from: every labelled pixel is
    missed). Also the chance of that outcome, and the expectation given at least one input."""
    chance = {"rgbd": (1 - p_rgb) * (1 - p_depth), "rgb": (1 - p_rgb) * p_depth, "depth": p_rgb * (1 - p_depth),
              "none": p_rgb * p_depth}
    miou = {**{s: clean[s]["miou"] for s in SETTINGS}, "none": 0.0}
    expected = sum(chance[s] * miou[s] for s in chance)
    return {"p_rgb": p_rgb, "p_depth": p_depth,
            "outcomes": {s: {"probability": chance[s], "miou": miou[s]} for s in chance},
            "expected_miou": expected,
            "expected_miou_given_an_input": expected / (1 - chance["none"]) if chance["none"] < 1 else None}


def save_pictures(net: M.Segmenter, dataset, n: int, folder: str, dataset_name: str, device,
                  tta: TTA = PLAIN) -> list:
    """The paper's Figure 3 for the first n images: rgb | depth | ground truth | the
    prediction with rgb+depth, rgb only and depth only (all three, whatever --only says; a
    dedicated model's own condition only; with the evaluation's `tta`), one PNG each."""
    names, palette = data.CLASS_NAMES[dataset_name], data.palette(dataset_name)
    paths = []
    for i in range(min(n, len(dataset))):
        sample = dataset[i]
        batch = to_device(data.collate([sample]), device)
        preds = {s: p[0].cpu() for s, p in predict(net, batch, conditions_of(net), tta=tta).items()}
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(str(sample["id"])))[0])
        paths.append(os.path.join(folder, f"{i:03d}_{name}.png"))
        figure = vis.segmentation_figure(sample, preds, names, palette)
        write_png(paths[-1], figure)
    return paths


# -----------------------------------------------------------------------------
# Images and folders of images (--rgb, --depth)


def read_inputs(rgb_path: str, depth_path: str, depth_scale: float, conv: Conventions) -> dict:
    """One image pair as a batch of one: rgb normalised with the checkpoint's statistics
    [1,3,H,W], depth in metres [1,1,H,W]; either may be absent ("")."""
    batch = {}
    if rgb_path:
        rgb = read_rgb(rgb_path)
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)   # as data.normalize_rgb
        mean, std = torch.tensor(conv.rgb_mean).view(3, 1, 1), torch.tensor(conv.rgb_std).view(3, 1, 1)
        batch["rgb"] = x.sub_(mean).div_(std)[None]          # in place: a large photo is not held twice
    if depth_path:
        depth = read_depth_file(depth_path, depth_scale)
        if rgb_path:
            check_same_size(rgb_path, rgb, {depth_path: depth})
        batch["depth"] = torch.from_numpy(depth)[None, None]
    return batch


def stored_size(path: str):
    """(H, W) of an image or .npy depth file from its header, without decoding it; None if
    the header cannot be read (reading the file then says what is wrong with it)."""
    try:
        if path.lower().endswith(".npy"):
            return tuple(np.load(path, mmap_mode="r").shape[:2])
        with Image.open(path) as img:
            return img.size[::-1]
    except Exception:
        return None


def working_size(H: int, W: int, crop: int) -> tuple[int, int]:
    """The size an H x W image is segmented at: its own, unless the long side exceeds
    MAX_SIDE x crop; then scaled down to that, keeping the aspect ratio."""
    limit = MAX_SIDE * crop
    if max(H, W) <= limit:
        return H, W
    s = limit / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))


def resize(batch: dict, h: int, w: int) -> dict:
    """rgb bilinear (antialiased), depth nearest so that no depth is invented across an edge
    or a hole (as data.augment rescales)."""
    out = dict(batch)
    if "rgb" in batch:
        out["rgb"] = F.interpolate(batch["rgb"], (h, w), mode="bilinear", align_corners=False, antialias=True)
    if "depth" in batch:
        out["depth"] = F.interpolate(batch["depth"], (h, w), mode="nearest-exact")
    return out


def segment(net: M.Segmenter, batch: dict, setting: str, crop: int, device, tta: TTA = PLAIN) -> torch.Tensor:
    """Class map Long[H, W] of one image (a batch of one), whatever its size.

    Full-image attention grows with the square of the tokens: a 4000x3000 photo at patch
    16 is 47k tokens per modality, minutes on a CPU and tens of GB. It is also far from
    what the model learnt: fine-tuning rescales images by 0.5-2 before taking crops, so
    objects are never much larger than at 2x a 640x480 view. So instead of tiling at full
    resolution (each tile would see a few fragments of an object at a scale never trained
    on), the image is scaled down to a long side of MAX_SIDE x crop, segmented whole, and
    the class map scaled back up with nearest (class ids can't be interpolated). `tta`'s
    views are taken of the image at that size."""
    H, W = next(batch[m] for m in ("rgb", "depth") if m in batch).shape[-2:]
    h, w = working_size(H, W, crop)
    small = batch if (h, w) == (H, W) else resize(batch, h, w)
    pred = predict(net, to_device(small, device), [setting], crop, tta)[setting].cpu()
    if (h, w) != (H, W):
        pred = F.interpolate(pred[:, None].float(), (H, W), mode="nearest-exact")[:, 0].long()
    return pred[0]


def size_note(H: int, W: int, crop: int) -> str:
    """What will happen to an H x W image, for the line printed before the work."""
    h, w = working_size(H, W, crop)
    if (h, w) != (H, W):
        return (f"{W}x{H}, larger than {MAX_SIDE * crop} px (MAX_SIDE = {MAX_SIDE} x the {crop} px fine-tuning "
                f"crop): segmented at {w}x{h}, class map scaled back to {W}x{H} (nearest)")
    Hp, Wp = padded_size(H, W, crop, 1)
    return f"{W}x{H}" + (f" padded to {Wp}x{Hp}, the fine-tuning crop" if (Hp, Wp) != (H, W) else "")


def write_class_map(pred: torch.Tensor, path: str, palette: np.ndarray) -> None:
    """A palette PNG: opening it shows colours, reading it gives class ids."""
    img = Image.fromarray(pred.numpy().astype(np.uint8), mode="P")
    img.putpalette(palette.reshape(-1).tolist())
    write_png(path, img)


def input_setting(cfg) -> str:
    """The input condition of --rgb and/or --depth."""
    return "rgbd" if cfg.rgb and cfg.depth else ("rgb" if cfg.rgb else "depth")


def segment_one_image(cfg, net: M.Segmenter, conv: Conventions, device) -> dict:
    """--rgb and/or --depth files in, a palette PNG of class ids out."""
    out = cfg.out or "seg.png"
    setting = input_setting(cfg)
    size = stored_size(cfg.rgb or cfg.depth)           # said before the (large) image is decoded
    batch = None if size else read_inputs(cfg.rgb, cfg.depth, cfg.depth_scale, conv)
    H, W = size or next(iter(batch.values())).shape[-2:]
    tta = tta_of(cfg)
    print(f"segmenting {cfg.rgb or cfg.depth} ({setting} input, {size_note(H, W, conv.image_size)}; {tta}) "
          f"on {device}")
    batch = batch or read_inputs(cfg.rgb, cfg.depth, cfg.depth_scale, conv)
    pred = segment(net, batch, setting, conv.image_size, device, tta)
    write_class_map(pred, out, conv.palette())
    names = conv.classes
    counts = torch.bincount(pred.flatten(), minlength=len(names)).double() / pred.numel()
    top = ", ".join(f"{names[c]} {100 * counts[c]:.0f}%" for c in counts.argsort(descending=True)[:5] if counts[c] > 0)
    print(f"wrote {out} (pixel value = {conv.dataset} class id); {top}")
    return {"setting": setting, "pred": pred}


def list_images(folder: str, exts: tuple) -> dict:
    """{file name without extension: path} of the images in a folder."""
    out = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if ext.lower() in exts and not f.startswith("."):
            if stem in out:
                raise UserError(f"{folder}: {os.path.basename(out[stem])} and {f} have the same name; "
                                f"class maps are named after their input, keep one")
            out[stem] = os.path.join(folder, f)
    if not out:
        raise UserError(f"{folder}: no images ({', '.join(exts)}) in it")
    return out


def _few(paths: list, most: int = 4) -> str:
    return ", ".join(paths[:most]) + (f" and {len(paths) - most} more" if len(paths) > most else "")


def folder_pairs(rgb_dir: str, depth_dir: str) -> list:
    """[(name, rgb path or "", depth path or "")], rgb and depth matched by file name
    without extension; a file without its partner is an error naming it."""
    rgbs = list_images(rgb_dir, RGB_EXTS) if rgb_dir else {}
    depths = list_images(depth_dir, DEPTH_EXTS) if depth_dir else {}
    if rgb_dir and depth_dir:
        lonely = [rgbs[s] for s in rgbs if s not in depths] + [depths[s] for s in depths if s not in rgbs]
        if lonely:
            raise UserError(f"--rgb {rgb_dir} and --depth {depth_dir} are matched by file name without "
                            f"extension: no partner for {_few(lonely)}")
    return [(s, rgbs.get(s, ""), depths.get(s, "")) for s in sorted(rgbs or depths)]


def segment_folder(cfg, net: M.Segmenter, conv: Conventions, device) -> dict:
    """Every image of --rgb and/or --depth folders -> <--out>/<name>.png."""
    out = os.path.join(cfg.out or "seg", "")           # one trailing separator, however --out ends
    pairs = folder_pairs(cfg.rgb, cfg.depth)
    setting, tta = input_setting(cfg), tta_of(cfg)
    print(f"segmenting {len(pairs)} image(s) of {cfg.rgb or cfg.depth} ({setting} input; {tta}) into {out} on "
          f"{device}; a long side over {MAX_SIDE * conv.image_size} px is segmented at that size")
    palette, written = conv.palette(), []
    for name, rgb, depth in tqdm(pairs, desc="segmenting", unit="image", dynamic_ncols=True, disable=None):
        size = stored_size(rgb or depth)
        if size and working_size(*size, conv.image_size) != size:
            tqdm.write(f"{rgb or depth}: {size_note(*size, conv.image_size)}")
        batch = read_inputs(rgb, depth, cfg.depth_scale, conv)
        written.append(os.path.join(out, name + ".png"))
        write_class_map(segment(net, batch, setting, conv.image_size, device, tta), written[-1], palette)
    print(f"wrote {len(written)} class map(s) to {out} (pixel value = {conv.dataset} class id)")
    return {"setting": setting, "written": written}


# -----------------------------------------------------------------------------
# ONNX export


class ExportGraph(nn.Module):
    """What one exported graph computes, for one input condition: the inputs as
    read_inputs gives them (normalised rgb [1,3,S,S], depth in metres [1,1,S,S], S = the
    fine-tuning crop) -> (logits [1,C,S,S], class ids Long[1,S,S]). The depth
    standardisation is inside; the padding to S is the caller's (docs/deploy.md).

    The depth statistics are sums over the whole map (~300k pixels at 640x640).
    onnxruntime's float32 ReduceSum accumulates them less accurately than PyTorch's
    pairwise sums (measured: standardised depth off by 5e-4, ViT-B logits by 1e-3), so the
    graph standardises depth in float64: then it matches PyTorch's float32 to 1 ulp."""

    def __init__(self, net: M.Segmenter, names: tuple):
        super().__init__()
        self.net, self.names = net, names

    def forward(self, *images):
        batch = {m: x.double() if m == "depth" else x for m, x in zip(self.names, images)}
        inputs = modalities.prepare_inputs(batch)
        logits = self.net({m: inputs[m].float() for m in self.names})
        return logits, logits.argmax(1)


def export_graph(graph: ExportGraph, example: tuple, path: str) -> str:
    """torch.onnx.export with the default (dynamo) exporter, else the TorchScript one.
    Returns which exporter wrote the file."""
    names = dict(input_names=list(graph.names), output_names=["logits", "classes"])
    try:
        torch.onnx.export(graph, example, path, external_data=False, verbose=False, **names)
        how = "dynamo"
    except OSError:                 # the file could not be written (a full disk): no exporter can
        raise
    except Exception as e:          # any other exporter failure: try the older exporter once
        print(f"  the dynamo exporter failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              f"using dynamo=False")
        with warnings.catch_warnings():   # the input size is fixed: shape branches are constants
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)   # "legacy exporter": said above
            torch.onnx.export(graph, example, path, dynamo=False, **names)
        how = "torchscript (dynamo=False)"
    return how


def add_metadata(path: str, conv: Conventions, setting: str) -> int:
    """Store the data conventions in the ONNX file (session.get_modelmeta().custom_metadata_map);
    returns the graph's opset."""
    import onnx
    m = onnx.load(path)
    meta = {"classes": json.dumps(list(conv.classes)), "dataset": conv.dataset, "input_condition": setting,
            "image_size": str(conv.image_size), "rgb_mean": json.dumps(list(conv.rgb_mean)),
            "rgb_std": json.dumps(list(conv.rgb_std)), "depth_unit": "metres, 0 = missing",
            "padding": "bottom/right to image_size: rgb 0 (after normalisation), depth 0"}
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, path)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def synthetic_check_images(S: int) -> list:
    """The default check images: two synthetic test rooms rendered at S x S, as (name,
    {rgb, depth}) batches of one, the second with holes in its depth (a block and a
    scatter of pixels set to 0, as a Kinect leaves them). Holes change which pixels the
    depth standardisation's sums run over, the part of the graph that float accuracy
    moves most (see ExportGraph), so the check always includes them."""
    test = data.build_dataset("synthetic", split="test", image_size=S)
    first, second = test[0], test[1]
    holes = second["depth"].clone()
    holes[..., : S // 3, S // 2:] = 0
    holes[..., ::5, ::3] = 0
    return [("synthetic room 0", {"rgb": first["rgb"][None], "depth": first["depth"][None]}),
            ("synthetic room 1 with depth holes", {"rgb": second["rgb"][None], "depth": holes[None]})]


def check_images(conv: Conventions, pairs: list | None = None) -> list:
    """(name, {rgb, depth}) inputs of the graph's size S to compare ONNX and PyTorch on:
    `pairs` ((name, {rgb [1,3,H,W] normalised, depth [1,1,H,W] metres}) of any size, e.g.
    read_inputs of a real image) or by default synthetic_check_images(S), each fitted
    into S x S (scaled down if larger, as segment() does) and padded as predict() pads."""
    S = conv.image_size
    out = []
    for name, batch in pairs or synthetic_check_images(S):
        H, W = batch["rgb"].shape[-2:]
        scale = min(1.0, S / max(H, W))                                  # fitted into S x S
        h, w = round(H * scale), round(W * scale)
        batch = resize(batch, h, w) if (h, w) != (H, W) else batch
        out.append((f"{name} ({w}x{h} padded to {S}x{S})",
                    {m: F.pad(x, (0, S - w, 0, S - h)) for m, x in batch.items()}))
    return out


def compare(path: str, graph: ExportGraph, images: list) -> dict:
    """Run the ONNX file with onnxruntime and the network in PyTorch on the same inputs:
    the largest absolute difference of the logits and the share of pixels whose class differs."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()        # as many threads as PyTorch
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    worst, differ = 0.0, 0.0
    for _, batch in images:
        feed = [batch[m] for m in graph.names]
        logits, classes = session.run(None, {m: x.numpy() for m, x in zip(graph.names, feed)})
        with torch.no_grad():                      # the plain PyTorch forward, as predict() runs it
            inputs = modalities.prepare_inputs(dict(zip(graph.names, feed)))
            ref_logits = graph.net({m: inputs[m] for m in graph.names})
            ref_classes = ref_logits.argmax(1)
        worst = max(worst, float(np.abs(logits - ref_logits.numpy()).max()))
        differ = max(differ, float((classes != ref_classes.numpy()).mean()))
    return {"max_abs_diff": worst, "class_differs": differ}


def export_onnx(net: M.Segmenter, conv: Conventions, folder: str, settings, check_on: list | None = None) -> dict:
    """<folder>/<setting>.onnx for each input condition, each checked against PyTorch on
    `check_on` (see check_images; default: synthetic rooms, one with depth holes)."""
    net = net.cpu().eval()
    S = conv.image_size
    have_ort = importlib.util.find_spec("onnxruntime") is not None
    images = check_images(conv, check_on) if have_ort else []
    print(f"exporting {', '.join(settings)} at {S}x{S} to {folder}/" +
          (f"; checked with onnxruntime on {len(images)} image(s): {'; '.join(n for n, _ in images)}"
           if have_ort else "; onnxruntime is not installed: the graphs are not checked"))
    results = {}
    for s in settings:
        graph = ExportGraph(net, SETTINGS[s]).eval()
        example = tuple(images[0][1][m] if images else torch.zeros(1, 3 if m == "rgb" else 1, S, S)
                        for m in graph.names)
        path = os.path.join(folder, f"{s}.onnx")
        start = time.time()
        r = {"path": path}

        def write(f):                    # the exporters and onnx write by name: the temporary file's
            r.update(exporter=export_graph(graph, example, f.name), opset=add_metadata(f.name, conv, s))
        write_atomic(path, write)
        r["seconds"] = time.time() - start
        line = f"wrote {path} ({r['exporter']} exporter, opset {r['opset']}, {r['seconds']:.1f} s)"
        if have_ort:
            r.update(compare(path, graph, images))
            line += (f"; onnxruntime vs PyTorch: max |logit diff| {r['max_abs_diff']:.2e}, "
                     f"class differs at {100 * r['class_differs']:.3f}% of pixels")
        print(line)
        results[s] = r
    return results


# -----------------------------------------------------------------------------
# The robustness and test-time flags, read and checked before anything is loaded

# --scales: at most this factor (at 4 a 640x480 image is run at 2560x1920: 19 200 patches per
# modality, far past the 0.5-2 fine-tuning rescales; more is a typo, not a test-time view).
MAX_SCALE = 4.0
ROBUSTNESS_FLAGS = ("rates", "degradations", "seed", "chart")      # what only --robustness reads


def number_list(text: str, flag: str, distinct: bool = True) -> tuple:
    """The finite numbers of a comma-separated flag; one line naming the flag otherwise."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text}: give comma-separated numbers") from None
    for v in values:
        if not math.isfinite(v):
            raise UserError(f"{flag} {text}: {v} is not a finite number")
    if distinct and len(set(values)) < len(values):
        raise UserError(f"{flag} {text}: a value is listed twice")
    return values


def tta_of(cfg) -> TTA:
    """--flip and --scales."""
    scales = number_list(cfg.scales, "--scales")
    for s in scales:
        if not 0 < s <= MAX_SCALE:
            raise UserError(f"--scales {cfg.scales}: every scale must be in (0, {MAX_SCALE:g}], got {s:g}")
    return TTA(cfg.flip, scales)


def rates_of(cfg) -> tuple:
    """--rates: each in [0, 1]."""
    rates = number_list(cfg.rates, "--rates")
    for r in rates:
        if not 0 <= r <= 1:
            raise UserError(f"--rates {cfg.rates}: a rate is a probability, in [0, 1], got {r:g}")
    return rates


def kinds_of(cfg) -> list:
    """--degradations: all, none, or kinds of util/degrade.py (KINDS)."""
    if cfg.degradations in ("all", "none"):
        return list(KINDS) if cfg.degradations == "all" else []
    kinds = cfg.degradations.split(",")
    for k in kinds:
        if k not in KINDS:
            raise UserError(f"--degradations {cfg.degradations}: unknown degradation {k!r}; choose all, none or "
                            f"some of {','.join(KINDS)}")
    if len(set(kinds)) < len(kinds):
        raise UserError(f"--degradations {cfg.degradations}: a degradation is listed twice")
    return kinds


def failure_of(cfg) -> tuple | None:
    """--sensor_failure P_RGB,P_DEPTH: two probabilities, or None."""
    if not cfg.sensor_failure:
        return None
    p = number_list(cfg.sensor_failure, "--sensor_failure", distinct=False)
    if len(p) != 2 or not all(0 <= x <= 1 for x in p):
        raise UserError(f"--sensor_failure {cfg.sensor_failure}: give P_RGB,P_DEPTH, two probabilities in [0, 1]")
    return p


def check_evaluation_flags(cfg, given) -> None:
    """The values of --robustness's flags, --sensor_failure, --flip and --scales, and their
    company: what only --robustness reads is refused without it (`given`: the flags on the
    command line), and --only with the two that need every input condition."""
    tta_of(cfg)
    failure_of(cfg)
    if cfg.robustness:
        rates_of(cfg), kinds_of(cfg)
        check_numbers(cfg, non_negative=("seed",))
        if not cfg.chart.lower().endswith(".png"):
            raise UserError(f"--chart {cfg.chart}: the chart is a PNG, the name must end in .png")
    else:
        unread = [f for f in ROBUSTNESS_FLAGS if f in given]
        if unread:
            raise UserError(f"--{unread[0]} is read by --robustness only: add --robustness, or leave it out")
    for flag, on in (("--robustness", cfg.robustness), ("--sensor_failure", cfg.sensor_failure)):
        if on and cfg.only:
            raise UserError(f"{flag} scores every input condition the model has: leave out --only {cfg.only}")


def evaluation_only(cfg) -> str:
    """The first of the flags that change what is predicted (--robustness, --sensor_failure,
    --flip, --scales) that is given, or ""; an export has no use for them."""
    for flag, on in (("--robustness", cfg.robustness), ("--sensor_failure", cfg.sensor_failure),
                     ("--flip", cfg.flip), ("--scales", tta_of(cfg).scales != (1.0,))):
        if on:
            return flag
    return ""


# -----------------------------------------------------------------------------
# Output paths, checked before anything is loaded


def check_png(path: str, flag: str) -> None:
    """A class-map file: a .png (lossless, with a palette) that can be written."""
    ext = os.path.splitext(path)[1]
    if ext.lower() != ".png":
        raise UserError(f"{flag} {path}: class maps are palette PNGs, the name must end in .png "
                        f"(got {ext or 'no extension'})")
    check_output(path, flag, "file")


def check_request(cfg, given=()) -> str:
    """Flags and output paths, before the model is loaded (`given`: the flags on the command
    line). Returns the mode: "safetensors", "export", "folder", "image" or "dataset"."""
    check_numbers(cfg, positive=("batch_size", "depth_scale"), non_negative=("num_vis", "workers"), finite=("cues",))
    if cfg.cues != -1 and not 0 <= cfg.cues <= 1:
        raise UserError(f"--cues must be in [0, 1], or -1 for the checkpoint's level, got {cfg.cues}")
    check_evaluation_flags(cfg, given)
    if (cfg.export_safetensors or cfg.export_onnx) and evaluation_only(cfg):
        raise UserError(f"{evaluation_only(cfg)} changes what is predicted, not the model: export "
                        f"(--export_safetensors, --export_onnx) without it")
    if (cfg.rgb or cfg.depth) and (cfg.robustness or cfg.sensor_failure):
        raise UserError(f"{'--robustness' if cfg.robustness else '--sensor_failure'} scores a dataset's split: "
                        f"segment images (--rgb, --depth) in another run")
    inputs = [("--ckpt", cfg.ckpt)]
    if is_safetensors(cfg.ckpt):
        inputs.append(("--ckpt's .json", json_path(cfg.ckpt)))
    if cfg.export_safetensors:
        if cfg.export_onnx or cfg.rgb or cfg.depth:
            raise UserError("--export_safetensors writes the weights and stops; export ONNX or segment images "
                            "(--export_onnx, --rgb, --depth) in another run")
        if not is_safetensors(cfg.export_safetensors):
            raise UserError(f"--export_safetensors {cfg.export_safetensors}: the name must end in .safetensors "
                            f"(its .json goes beside it)")
        outputs = [("--export_safetensors", cfg.export_safetensors),
                   ("--export_safetensors's .json", json_path(cfg.export_safetensors))]
        check_not_input(outputs, inputs)
        for flag, p in outputs:
            check_output(p, flag, "file")
            if os.path.exists(p) and not cfg.overwrite:      # the pair is one output: neither half is replaced unasked
                raise UserError(f"{flag} {p}: exists; pass --overwrite to replace it, or give another name")
        return "safetensors"
    if cfg.overwrite:
        raise UserError("--overwrite replaces an existing --export_safetensors pair; it does nothing here")
    if cfg.export_onnx:
        if cfg.rgb or cfg.depth:
            raise UserError("--export_onnx exports the model; segment images (--rgb, --depth) in another run")
        if importlib.util.find_spec("onnx") is None:
            raise UserError("--export_onnx needs the onnx package: pip install -r requirements.txt "
                            "(onnx, onnxscript, onnxruntime)")
        check_not_input([("--export_onnx", cfg.export_onnx)] +
                        [("--export_onnx", os.path.join(cfg.export_onnx, f"{s}.onnx")) for s in SETTINGS], inputs)
        check_output(cfg.export_onnx, "--export_onnx")
        return "export"
    if cfg.rgb or cfg.depth:
        given = [(f, p) for f, p in (("--rgb", cfg.rgb), ("--depth", cfg.depth)) if p]
        for flag, p in given:
            if not os.path.exists(p):
                raise UserError(f"{flag} {p}: file not found")
        folders = [os.path.isdir(p) for _, p in given]
        if any(folders) and not all(folders):
            raise UserError(f"{' and '.join(f'{f} {p}' for f, p in given)}: give two files or two folders")
        if all(folders):
            out = cfg.out or "seg"
            check_not_input([("--out", out)], inputs + given)
            check_output(out, "--out")
            pairs = folder_pairs(cfg.rgb, cfg.depth)
            listed = [(f, p) for _, rgb, depth in pairs for f, p in (("--rgb", rgb), ("--depth", depth))]
            check_not_input([("--out", os.path.join(out, name + ".png")) for name, _, _ in pairs], inputs + listed)
            return "folder"
        check_not_input([("--out", cfg.out or "seg.png")], inputs + given)
        check_png(cfg.out or "seg.png", "--out")
        return "image"
    check_not_input([("--out_json", cfg.out_json), ("--save_vis", cfg.save_vis)] +
                    ([("--chart", cfg.chart)] if cfg.robustness else []), inputs)
    check_output(cfg.out_json, "--out_json", "file")
    if cfg.robustness:
        check_output(cfg.chart, "--chart", "file")
    if cfg.save_vis and cfg.num_vis:
        check_output(cfg.save_vis, "--save_vis")
    return "dataset"


SETTING_NAMES = {"rgbd": "rgb + depth", "rgb": "rgb only", "depth": "depth only", MIXED: "random missing, per sample"}


def format_table(results: dict, class_names, tta: TTA = PLAIN) -> str:
    settings = list(results)
    lines = [f"input    mIoU   mAcc   ({tta})", *(f"{s:7s} {r['miou']:6.2f} {r['macc']:6.2f}" for s, r in results.items()),
             "", "per-class IoU".ljust(22) + "".join(f"{s:>8s}" for s in settings)]
    for c, name in enumerate(class_names):
        vals = [results[s]["per_class_iou"][c] for s in settings]
        lines.append(f"{name[:22]:22s}" + "".join("     n/a" if v != v else f"{v:8.2f}" for v in vals))
    return "\n".join(lines)


def format_robustness(results: dict, tta: TTA, seed: int) -> str:
    """--robustness's table: a row per condition and input (MIXED: each sample its own)."""
    w = max(len("condition"), *map(len, results))
    lines = [f"robustness ({tta}; seed {seed}; input {MIXED}: each sample its own)",
             f"{'condition':{w}s}  input    mIoU   mAcc"]
    lines += [f"{c:{w}s}  {s:6s} {r['miou']:6.2f} {r['macc']:6.2f}" for c, rs in results.items() for s, r in rs.items()]
    return "\n".join(lines)


def format_failure(f: dict, tta: TTA) -> str:
    """--sensor_failure's table: each outcome's chance and mIoU, then the expectation."""
    names = {"rgbd": "rgb + depth", "rgb": "rgb only", "depth": "depth only", "none": "neither"}
    lines = [f"sensor failure: rgb fails with p = {f['p_rgb']:g}, depth with p = {f['p_depth']:g}, independently ({tta})",
             "outcome        chance   mIoU"]
    lines += [f"{names[s]:12s} {o['probability']:8.4f} {o['miou']:6.2f}" for s, o in f["outcomes"].items()]
    given = f["expected_miou_given_an_input"]
    lines.append(f"expected mIoU {f['expected_miou']:.2f} (neither input: scored 0)" +
                 (f"; given at least one input (chance {1 - f['outcomes']['none']['probability']:.4f}): {given:.2f}"
                  if given is not None else ""))
    return "\n".join(lines)


def robustness_chart(results: dict, path: str, title: str) -> None:
    """mIoU per condition and level, a bar per input each row was scored on."""
    series = [s for s in SETTING_NAMES if any(s in rs for rs in results.values())]
    bars = {SETTING_NAMES[s]: [rs[s]["miou"] if s in rs else None for rs in results.values()] for s in series}
    charts.row_chart(list(results), bars, path, title, "mIoU")


def main(argv=None):
    cfg, given = parse_config(EvalConfig, argv)
    mode = check_request(cfg, given)
    if mode == "safetensors":
        ckpt = load_checkpoint(cfg.ckpt)
        paths = export_safetensors(ckpt, cfg.export_safetensors)
        reader = "evaluate.py --ckpt" if ckpt["kind"] == "finetune" else "finetune.py --pretrained"
        print(f"wrote {paths[0]} ({len(ckpt['model'])} tensors) and {paths[1]}: {reader} {paths[0]} reads them "
              f"as it reads {cfg.ckpt}, --init reads the encoder")
        return {"written": paths}
    device = pick_device("cpu" if mode == "export" else cfg.device)
    net, ckpt = load_segmenter(cfg.ckpt, device)
    conv = conventions(ckpt, net, cfg.ckpt, cfg.dataset)
    possible, takes = conditions_of(net), f"{cfg.ckpt} takes {' and '.join(net.inputs)} only"
    if mode in ("folder", "image"):
        if input_setting(cfg) not in possible:            # a dedicated model given another input
            shown = SETTINGS[input_setting(cfg)]
            raise UserError(f"{' and '.join(f'--{m}' for m in shown)}: {takes}: give "
                            f"{' and '.join(f'--{m}' for m in net.inputs)}{' alone' if len(shown) > 1 else ''}")
        return segment_folder(cfg, net, conv, device) if mode == "folder" else \
            segment_one_image(cfg, net, conv, device)
    if cfg.only and cfg.only not in possible:
        raise UserError(f"--only {cfg.only}: {takes}")
    failure, tta = failure_of(cfg), tta_of(cfg)
    if failure and len(possible) < len(SETTINGS):
        raise UserError(f"--sensor_failure: {takes}: the expectation needs rgb + depth, rgb only and depth only")
    settings = [cfg.only] if cfg.only else possible
    if len(possible) < len(SETTINGS) and not cfg.only:
        print(f"{takes}: skipping {', '.join(s for s in SETTINGS if s not in possible)}")
    if mode == "export":
        return export_onnx(net, conv, cfg.export_onnx, settings)
    conditions = [Condition("clean", tuple(settings))]
    if cfg.robustness:
        conditions, skipped = robustness_conditions(possible, rates_of(cfg), kinds_of(cfg), cfg.seed)
        if skipped:
            print(f"{takes}: --robustness skips {', '.join(skipped)}")
    dataset_name, names = conv.dataset, conv.classes
    cues = cfg.cues if cfg.cues >= 0 else ckpt.get("data", {}).get("cues", 0.0) if dataset_name == "synthetic" else 0.0
    dataset = data.build_dataset(dataset_name, cfg.data_root or None, cfg.split, train=False,
                                 image_size=net.cfg.image_size, cues=cues)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         collate_fn=data.collate)
    print(f"evaluating {cfg.ckpt} on {dataset_name} {cfg.split} ({len(dataset)} images): {', '.join(settings)}; "
          f"{tta}" + (f"; {len(conditions)} conditions (--robustness)" if cfg.robustness else ""))
    results = evaluate(net, loader, net.cfg.num_classes, conditions, device, tta)
    clean = results["clean"]
    print(format_table(clean, names, tta))
    out = {s: {"miou": r["miou"], "macc": r["macc"],
               "per_class_iou": {n: (None if v != v else v) for n, v in zip(names, r["per_class_iou"])}}
           for s, r in clean.items()}
    if cfg.robustness:
        print()
        print(format_robustness(results, tta, cfg.seed))
        out["robustness"] = {c: {s: {"miou": r["miou"], "macc": r["macc"]} for s, r in rs.items()}
                             for c, rs in results.items()}
    if failure:
        out["sensor_failure"] = sensor_failure(clean, *failure)
        print()
        print(format_failure(out["sensor_failure"], tta))
    out["meta"] = {"ckpt": cfg.ckpt, "dataset": dataset_name, "split": cfg.split, "images": len(dataset),
                   "tta": {"flip": tta.flip, "scales": list(tta.scales)},
                   **({"seed": cfg.seed, "skipped": skipped} if cfg.robustness else {})}
    write_atomic(cfg.out_json, lambda f: f.write(json.dumps(out, indent=2).encode()))
    print(f"wrote {cfg.out_json}")
    if cfg.robustness:
        robustness_chart(out["robustness"], cfg.chart, f"{cfg.ckpt} on {dataset_name} {cfg.split}: mIoU per "
                                                       f"condition ({tta}; seed {cfg.seed})")
        print(f"wrote {cfg.chart}")
    if cfg.save_vis and cfg.num_vis:
        paths = save_pictures(net, dataset, cfg.num_vis, cfg.save_vis, dataset_name, device, tta)
        print(f"wrote {len(paths)} picture(s) to {cfg.save_vis}")
    return out


if __name__ == "__main__":
    run_cli(main)
