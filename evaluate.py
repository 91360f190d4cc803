"""evaluate.py — one fine-tuned checkpoint, three input conditions: rgb+depth, rgb only, depth only.

    python evaluate.py                      # out/finetune/ckpt.pt on its dataset's test split
    python evaluate.py --only depth         # just one condition
    python evaluate.py --out_json r.json

This is the paper's Tables 1-3 protocol: the *same* network is run with both modalities,
with rgb alone and with depth alone (the missing modality simply contributes no tokens),
in one pass over the split. mIoU and mAcc (mean per-class accuracy) come from one
confusion matrix per condition accumulated over the whole split (not averaged per image),
void (255) ignored, classes with an empty union skipped, x100 — the mmseg/MultiMAE
convention (SPEC.md §1). It prints a table (plus per-class IoU with class names) and
writes the same numbers as JSON: keys rgbd, rgb, depth, each with miou, macc,
per_class_iou.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M
from train import arg, load_checkpoint, parse_config, pick_device, run_cli, to_device

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
    split: str = arg("test", "split to evaluate", ("train", "test"))
    only: str = arg("", "evaluate just this input condition", ("", "rgbd", "rgb", "depth"))
    batch_size: int = arg(16, "images per batch")
    out_json: str = arg("out/eval/results.json", "where the numbers are written as JSON")
    workers: int = arg(0, "DataLoader worker processes")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")


def load_segmenter(path: str, device) -> tuple[M.Segmenter, dict]:
    ckpt = load_checkpoint(path, "fine-tuned")
    if ckpt.get("kind") != "finetune":
        raise data.UserError(f"{path}: a {ckpt.get('kind', 'unknown')} checkpoint, not a fine-tuned one "
                             f"(finetune.py writes those)")
    net = M.Segmenter(M.ModelConfig(**ckpt["model_config"]))
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval(), ckpt


def pad_to_multiple(batch: dict, multiple: int) -> dict:
    """Pad right/bottom so H and W divide by the patch size: rgb 0, depth 0 (= missing),
    labels 255 (ignored by the metrics)."""
    H, W = batch["semseg"].shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    if ph == 0 and pw == 0:
        return batch
    out = dict(batch)
    out["rgb"] = F.pad(batch["rgb"], (0, pw, 0, ph))
    out["depth"] = F.pad(batch["depth"], (0, pw, 0, ph))
    out["semseg"] = F.pad(batch["semseg"], (0, pw, 0, ph), value=M.IGNORE_INDEX)
    return out


@torch.no_grad()
def evaluate(net: M.Segmenter, loader, num_classes: int, settings, device) -> dict:
    """One pass over the loader; every batch is run once per input condition."""
    cms = {s: torch.zeros(num_classes, num_classes, dtype=torch.long) for s in settings}
    for batch in tqdm(loader, desc="evaluating", leave=False, dynamic_ncols=True):
        batch = pad_to_multiple(to_device(batch, device), net.cfg.patch_size)
        inputs = M.prepare_inputs({"rgb": batch["rgb"], "depth": batch["depth"]})
        for s in settings:
            logits = net({m: inputs[m] for m in SETTINGS[s]})
            cms[s] += confusion_matrix(logits.argmax(1), batch["semseg"], num_classes).cpu()
    return {s: scores(cm) for s, cm in cms.items()}


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
        raise data.UserError(f"--batch_size must be positive, got {cfg.batch_size}")
    device = pick_device(cfg.device)
    net, ckpt = load_segmenter(cfg.ckpt, device)
    dataset_name = cfg.dataset or ckpt["dataset"]
    names = data.CLASS_NAMES[dataset_name]
    if len(names) != net.cfg.num_classes:
        raise data.UserError(f"{cfg.ckpt}: the model predicts {net.cfg.num_classes} classes, "
                             f"{dataset_name} has {len(names)}")
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
    return out


if __name__ == "__main__":
    run_cli(main)
