"""evaluate.py — one fine-tuned checkpoint, three input conditions: rgb+depth, rgb only, depth only.

    python evaluate.py                      # out/finetune/ckpt.pt on its dataset's test split
    python evaluate.py --only depth         # just one condition
    python evaluate.py --out_json r.json
    python evaluate.py --rgb img.png --depth d.png --out seg.png   # one image, either input optional

This is the paper's Tables 1-3 protocol: the *same* network is run with both modalities,
with rgb alone and with depth alone (the missing modality simply contributes no tokens),
in one pass over the split. mIoU and mAcc (mean per-class accuracy) come from one
confusion matrix per condition accumulated over the whole split (not averaged per image),
void (255) ignored, classes with an empty union skipped, x100 — the mmseg/MultiMAE
convention (docs/method.md §1). It prints a table (plus per-class IoU with class names) and
writes the same numbers as JSON: keys rgbd, rgb, depth, each with miou, macc,
per_class_iou. It also draws the paper's Figure 3 for the first --num_vis images (vis.py):
rgb | depth | ground truth | prediction from rgb+depth, rgb only, depth only.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import model as M
import modalities
import vis
from cli import UserError, arg, parse_config, pick_device, run_cli
from engine import load_checkpoint, to_device

SETTINGS = {"rgbd": ("rgb", "depth"), "rgb": ("rgb",), "depth": ("depth",)}


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
    """Evaluate a fine-tuned checkpoint on rgb+depth, rgb only and depth only."""
    ckpt: str = arg("out/finetune/ckpt.pt", "fine-tuned checkpoint (finetune.py's output)")
    dataset: str = arg("", "dataset (default: the one the checkpoint was fine-tuned on)", ("",) + data.DATASETS)
    data_root: str = arg("", "dataset folder (default: data/<dataset>)")
    split: str = arg("test", "split to evaluate (val: the synthetic rooms only)", data.SPLITS)
    only: str = arg("", "evaluate just this input condition", ("", "rgbd", "rgb", "depth"))
    batch_size: int = arg(16, "images per batch")
    out_json: str = arg("out/eval/results.json", "where the numbers are written as JSON")
    save_vis: str = arg("out/eval/vis", "folder for Figure-3 pictures of the first --num_vis images ('' = none)")
    num_vis: int = arg(4, "how many images get a picture")
    rgb: str = arg("", "single-image mode: segment this rgb image (with or without --depth)")
    depth: str = arg("", "single-image mode: this depth image (16-bit PNG, or .npy in metres)")
    depth_scale: float = arg(0.001, "single-image mode: metres per unit of the depth PNG (0.001 = mm)")
    out: str = arg("seg.png", "single-image mode: the predicted class map (palette PNG, pixel = class id)")
    workers: int = arg(0, "DataLoader worker processes")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")


def load_segmenter(path: str, device) -> tuple[M.Segmenter, dict]:
    ckpt = load_checkpoint(path, "finetune")
    net = M.Segmenter(M.ModelConfig.from_dict(ckpt["model_config"]))
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval(), ckpt


@torch.no_grad()
def predict(net: M.Segmenter, batch: dict, settings) -> dict:
    """{setting: class map Long[B, H, W]} for a batch of rgb and/or depth (any size: padded
    to the patch grid for the network, the prediction cropped back)."""
    H, W = next(batch[m] for m in ("rgb", "depth") if m in batch).shape[-2:]
    p = net.cfg.patch_size
    padded = {m: F.pad(batch[m], (0, -W % p, 0, -H % p)) for m in ("rgb", "depth") if m in batch}
    inputs = modalities.prepare_inputs(padded)
    return {s: net({m: inputs[m] for m in SETTINGS[s]}).argmax(1)[:, :H, :W] for s in settings}


@torch.no_grad()
def evaluate(net: M.Segmenter, loader, num_classes: int, settings, device) -> dict:
    """One pass over the loader; every batch is run once per input condition."""
    cms = {s: torch.zeros(num_classes, num_classes, dtype=torch.long) for s in settings}
    for batch in tqdm(loader, desc="evaluating", leave=False, dynamic_ncols=True, disable=None):
        batch = to_device(batch, device)
        for s, pred in predict(net, batch, settings).items():
            cms[s] += confusion_matrix(pred, batch["semseg"], num_classes).cpu()
    return {s: scores(cm) for s, cm in cms.items()}


def save_pictures(net: M.Segmenter, dataset, n: int, folder: str, dataset_name: str, device) -> list:
    """The paper's Figure 3 for the first n images: rgb | depth | ground truth | the
    prediction with rgb+depth, rgb only and depth only (always all three), one PNG each."""
    os.makedirs(folder, exist_ok=True)
    names, palette = data.CLASS_NAMES[dataset_name], data.palette(dataset_name)
    paths = []
    for i in range(min(n, len(dataset))):
        sample = dataset[i]
        batch = to_device(data.collate([sample]), device)
        preds = {s: p[0].cpu() for s, p in predict(net, batch, SETTINGS).items()}
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(str(sample["id"])))[0])
        paths.append(os.path.join(folder, f"{i:03d}_{name}.png"))
        vis.segmentation_figure(sample, preds, names, palette).save(paths[-1])
    return paths


def segment_one_image(cfg, net: M.Segmenter, dataset_name: str, device) -> dict:
    """Single-image mode: --rgb and/or --depth in, a palette PNG of class ids out."""
    batch = {}
    if cfg.rgb:
        rgb = data.read_rgb(cfg.rgb)
        batch["rgb"] = data.normalize_rgb(rgb)[None]
    if cfg.depth:
        depth = data.read_depth_file(cfg.depth, cfg.depth_scale)
        if cfg.rgb:
            data.check_same_size(cfg.rgb, rgb, {cfg.depth: depth})
        batch["depth"] = torch.from_numpy(depth)[None, None]
    setting = "rgbd" if cfg.rgb and cfg.depth else ("rgb" if cfg.rgb else "depth")
    pred = predict(net, to_device(batch, device), [setting])[setting][0].cpu()
    names = data.CLASS_NAMES[dataset_name]
    img = Image.fromarray(pred.numpy().astype(np.uint8), mode="P")
    img.putpalette(data.palette(dataset_name).reshape(-1).tolist())
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    img.save(cfg.out)
    counts = torch.bincount(pred.flatten(), minlength=len(names)).double() / pred.numel()
    top = ", ".join(f"{names[c]} {100 * counts[c]:.0f}%" for c in counts.argsort(descending=True)[:5] if counts[c] > 0)
    print(f"{setting} input, {pred.shape[1]}x{pred.shape[0]}: wrote {cfg.out} (pixel value = {dataset_name} class id); {top}")
    return {"setting": setting, "pred": pred}


def format_table(results: dict, class_names) -> str:
    settings = list(results)
    lines = ["input    mIoU   mAcc", *(f"{s:7s} {r['miou']:6.2f} {r['macc']:6.2f}" for s, r in results.items()),
             "", "per-class IoU".ljust(22) + "".join(f"{s:>8s}" for s in settings)]
    for c, name in enumerate(class_names):
        vals = [results[s]["per_class_iou"][c] for s in settings]
        lines.append(f"{name[:22]:22s}" + "".join("     n/a" if v != v else f"{v:8.2f}" for v in vals))
    return "\n".join(lines)


def main(argv=None):
    cfg, _ = parse_config(EvalConfig, argv)
    if cfg.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {cfg.batch_size}")
    if cfg.num_vis < 0 or cfg.depth_scale <= 0:
        raise UserError("--num_vis must be >= 0 and --depth_scale positive")
    device = pick_device(cfg.device)
    net, ckpt = load_segmenter(cfg.ckpt, device)
    dataset_name = cfg.dataset or ckpt["dataset"]
    names = data.CLASS_NAMES[dataset_name]
    if len(names) != net.cfg.num_classes:
        raise UserError(f"{cfg.ckpt}: the model predicts {net.cfg.num_classes} classes, "
                             f"{dataset_name} has {len(names)}")
    if cfg.rgb or cfg.depth:
        return segment_one_image(cfg, net, dataset_name, device)
    dataset = data.build_dataset(dataset_name, cfg.data_root or None, cfg.split, train=False,
                                 image_size=net.cfg.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         collate_fn=data.collate)
    settings = [cfg.only] if cfg.only else list(SETTINGS)
    print(f"evaluating {cfg.ckpt} on {dataset_name} {cfg.split} ({len(dataset)} images): {', '.join(settings)}")
    results = evaluate(net, loader, net.cfg.num_classes, settings, device)
    print(format_table(results, names))
    out = {s: {"miou": r["miou"], "macc": r["macc"],
               "per_class_iou": {n: (None if v != v else v) for n, v in zip(names, r["per_class_iou"])}}
           for s, r in results.items()}
    out["meta"] = {"ckpt": cfg.ckpt, "dataset": dataset_name, "split": cfg.split, "images": len(dataset)}
    os.makedirs(os.path.dirname(cfg.out_json) or ".", exist_ok=True)
    with open(cfg.out_json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {cfg.out_json}")
    if cfg.save_vis and cfg.num_vis:
        paths = save_pictures(net, dataset, cfg.num_vis, cfg.save_vis, dataset_name, device)
        print(f"wrote {len(paths)} picture(s) to {cfg.save_vis}")
    return out


if __name__ == "__main__":
    run_cli(main)
