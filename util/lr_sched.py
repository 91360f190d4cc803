"""util/lr_sched.py — the learning rate as a function of the step, and the optimiser's
parameter groups (MAE's util/lr_sched.py and util/lr_decay.py, in one file).

Linear warm-up from 0, then a cosine to `minimum` (MultiMAE / MAE). util/engine.py sets it
before every optimiser step from the schedule's position: the batches begun, or with
--lr_schedule steps the optimiser steps taken.
"""
from __future__ import annotations

import math


def lr_at(it: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warm-up from 0, then cosine decay to `minimum` (MultiMAE / MAE)."""
    if it < warmup:
        return base * it / warmup
    progress = (it - warmup) / max(1, total - warmup)
    return minimum + (base - minimum) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def param_groups(model, weight_decay: float, layer_decay: float = 1.0) -> list:
    """AdamW groups: no weight decay on biases, norms and embeddings/tokens; with
    layer_decay < 1 the lr shrinks by that factor per encoder block going down to the
    input (BEiT/MultiMAE fine-tuning: adapters and global token are layer 0, the head
    is layer depth+1)."""
    depth = len(model.encoder)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("input_adapters.", "global_tokens")):
            layer = 0
        elif name.startswith("encoder."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        no_wd = p.dim() == 1 or name.endswith(("global_tokens", "mask_token")) or "task_embeddings" in name \
            or "class_emb" in name
        scale = layer_decay ** (depth + 1 - layer)
        key = (scale, no_wd)
        groups.setdefault(key, {"params": [], "lr_scale": scale, "weight_decay": 0.0 if no_wd else weight_decay})
        groups[key]["params"].append(p)
    return list(groups.values())
