"""sttp.py — the pre-training objectives: one function per row of the paper's tables.

    mim    complete modalities, patch masking, pixel loss             (MultiMAE; "+ MIM")
    m2im   Algorithm 1 first, then patch masking, pixel loss          ("+ M²IM", §3.3)
    sttp   per batch: 3 teacher iterations on complete modalities
           (= mim), then 1 student iteration on Algorithm 1 input with
           pixel loss + token loss to the teacher's detached tokens   ("+ M²IM + STTP", §3.4)
    token  as sttp, but the student has the token loss only          (Table 4, "Token-level MIM")
    kd     a separately pre-trained, frozen teacher gives the tokens;
           the student trains with pixel + token loss                 (Table 4, "KD + M²IM")

Each function takes one batch, does its optimiser step(s) on the shared network and
returns the numbers to log. The teacher and the student are the *same* network with
shared parameters (self-teaching): "teacher" and "student" are only two ways of masking
its input. The pixel loss is MultiMAE's (docs/method.md §2), one per row of the modality
table; the token loss is 1 - cosine similarity between the student's and the teacher's
output token embeddings (the output of the cross-attention module, at every patch
position of every modality; docs/method.md §4, decisions D4-D6).

Nothing here reads files, knows about epochs or about processes. How a step runs — its
backward and optimiser step, mixed precision, and which rows of the global batch this
call holds when torchrun splits it over processes — is the `Runtime` in the config: the
plain one-process float32 one below, or runtime.py's, which the scripts pass in.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.profiler import record_function

import masking
from model import MaskMentor, Shard, image_size
from modalities import IGNORE_INDEX, MODALITIES, prepare_inputs


class Runtime(Shard):
    """How the objectives' steps run: one process holding the whole batch, float32, a
    plain backward and optimiser step. runtime.py's subclass adds torchrun (each process a
    shard of the global batch, DistributedDataParallel), mixed precision, loss scaling and
    gradient clipping; the objectives call only these methods (and Shard's world/rows,
    with which every random draw is made for the global batch)."""

    def network(self, model: torch.nn.Module) -> torch.nn.Module:
        """The bare network (its cfg, num_tokens) inside whatever wraps it for training."""
        return model

    def sample_mean(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The mean over the global batch of one value per sample (those that have one);
        0, still attached to the graph through `like`, when no sample has one."""
        if values.numel() == 0:
            return like.sum() * 0.0
        return values.mean()

    def autocast(self):
        """The context the forward passes run in (mixed precision: runtime.py)."""
        return contextlib.nullcontext()

    def step(self, model, optimizer, loss: torch.Tensor) -> None:
        """Backward and one optimiser step."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@dataclass
class ObjectiveConfig:
    masking: masking.MaskingConfig = field(default_factory=masking.MaskingConfig)
    teacher_iters: int = 3        # teacher iterations per batch before the student's (§3.4)
    token_weight: float = 1.0     # the paper gives no weight: 1, like the pixel losses (D6)
    runtime: Runtime = field(default_factory=Runtime)


# -----------------------------------------------------------------------------
# Losses


def _pixel_weight(patch_mask: torch.Tensor, grid, pixels_per_patch: int) -> torch.Tensor:
    """Bool[B, N] per patch -> float [B, h*P, w*P] per pixel."""
    B, (h, w), P = patch_mask.shape[0], grid, pixels_per_patch
    m = patch_mask.view(B, h, 1, w, 1).expand(B, h, P, w, P)
    return m.reshape(B, h * P, w * P).float()


def _masked_mean(per_pixel: torch.Tensor, weight: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Mean over the weighted pixels of each sample, then over the samples that have any
    (MultiMAE's nanmean: a sample whose modality had no masked pixel doesn't count)."""
    num = (per_pixel * weight).flatten(1).sum(1)
    den = weight.flatten(1).sum(1)
    has = den > 0
    return runtime.sample_mean(num[has] / den[has], like=per_pixel)


def patch_normalize(img: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Each patch of the image standardised by its own mean/var over its pixels and
    channels (MAE's norm_pix_loss; MultiMAE's norm_rgb target)."""
    B, C, H, W = img.shape
    h, w = H // patch, W // patch
    x = img.view(B, C, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1).reshape(B, h, w, -1)
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps)
    return x.view(B, h, w, patch, patch, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def pixel_losses(preds: dict, inputs: dict, mask: torch.Tensor, model: MaskMentor,
                 runtime: Runtime = Runtime()) -> dict:
    """MultiMAE's reconstruction losses on the masked patches only, all weights 1, one per
    row of the modality table (its `loss`): rgb MSE (+ norm_rgb MSE to per-patch-normalised
    rgb), depth L1 on standardised depth (sensor holes excluded), semseg cross-entropy at
    1/4 resolution (255 excluded). `mask` is Masked.mask, True = hidden."""
    cfg = model.cfg
    grid = cfg.grid(*image_size(inputs))
    N = mask.shape[1] // len(model.inputs)
    out = {}
    for k, m in enumerate(model.inputs):
        spec, target = MODALITIES[m], inputs[m]
        w = _pixel_weight(mask[:, k * N:(k + 1) * N], grid, cfg.patch_size // spec.stride)
        if f"{m}_valid" in inputs:                       # e.g. depth holes: nothing to learn there
            w = w * inputs[f"{m}_valid"][:, 0]
        pred = preds[m].float()
        if spec.loss == "ce":
            per_pixel = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="none")
            w = w * (target != IGNORE_INDEX)
        elif spec.loss == "mse":
            per_pixel = (pred - target).pow(2).mean(1)
        elif spec.loss == "l1":
            per_pixel = (pred - target).abs().mean(1)
        else:
            raise ValueError(f"{m}: unknown loss {spec.loss!r} in modalities.MODALITIES")
        out[m] = _masked_mean(per_pixel, w, runtime)
        if f"norm_{m}" in preds:                          # MultiMAE's norm_rgb head
            normed = patch_normalize(target, cfg.patch_size)
            out[f"norm_{m}"] = _masked_mean((preds[f"norm_{m}"].float() - normed).pow(2).mean(1), w, runtime)
    return out


def token_loss(student: dict, teacher: dict, names) -> torch.Tensor:
    """1 - cosine similarity of output token embeddings, averaged over every patch
    position of every modality in `names` (§3.4). The teacher's side carries no gradient."""
    losses = [1 - F.cosine_similarity(student[m].float(), teacher[m].detach().float(), dim=-1).mean()
              for m in names]
    return torch.stack(losses).mean()


# -----------------------------------------------------------------------------
# Shared mechanics


def _forward(model, inputs: dict, cfg: ObjectiveConfig, drop_modalities: bool, generator):
    """Mask (complete modalities, or Algorithm 1 first), run, and score the pixels. `model`
    is a MaskMentor, or whatever the runtime wraps it in (DDP syncs gradients in backward)."""
    rt = cfg.runtime
    net = rt.network(model)
    any_input = inputs[net.inputs[0]]
    B, device = any_input.shape[0], any_input.device
    with record_function("forward"):
        # Drawn for the global batch, this call's rows kept (Shard).
        plan = masking.plan_masking(B * rt.world, len(net.inputs), net.num_tokens(*image_size(inputs)),
                                    cfg.masking, drop_modalities, generator, device)
        plan = masking.MaskPlan(rt.rows(plan.keep), rt.rows(plan.num_visible), rt.rows(plan.noise))
        with rt.autocast():
            preds, tokens, masked = model(inputs, plan)
        return pixel_losses(preds, inputs, masked.mask, net, rt), tokens


def _numbers(losses: dict, prefix: str = "") -> dict:
    return {prefix + k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}


# Logged names: pixel losses on complete modalities are "rgb", "depth", ...; on Algorithm 1
# (missing-modality) input they are "m2im_rgb", "m2im_depth", ..., whichever objective ran,
# so one loss curve spans the MIM warm-up and the later epochs.
M2IM = "m2im_"


def _pixel_objective(model, optimizer, batch, cfg, generator, drop_modalities: bool) -> dict:
    inputs = prepare_inputs(batch, cfg.runtime.network(model).inputs)
    losses, _ = _forward(model, inputs, cfg, drop_modalities, generator)
    loss = sum(losses.values())
    cfg.runtime.step(model, optimizer, loss)
    return {"loss": float(loss.detach()), **_numbers(losses, M2IM if drop_modalities else "")}


# -----------------------------------------------------------------------------
# The objectives


def mim(model, optimizer, batch, cfg: ObjectiveConfig, generator=None, teacher=None) -> dict:
    """Plain multi-modal MIM (MultiMAE): complete modalities, one step."""
    return _pixel_objective(model, optimizer, batch, cfg, generator, drop_modalities=False)


def m2im(model, optimizer, batch, cfg: ObjectiveConfig, generator=None, teacher=None) -> dict:
    """M²IM (§3.3): Algorithm 1 drops modalities, then patch masking; one step."""
    return _pixel_objective(model, optimizer, batch, cfg, generator, drop_modalities=True)


def _self_teaching(model, optimizer, batch, cfg, generator, student_pixel_loss: bool) -> dict:
    """Teacher and student are one network (under torchrun one DDP-wrapped network). Each of
    the teacher_iters + 1 iterations is an ordinary training iteration: a forward, a
    backward, its own optimiser step; no gradient carries over from one to the next. The
    student's token targets are the last teacher forward's tokens, detached: no gradient
    flows into them (each process holds the targets of its own rows)."""
    net = cfg.runtime.network(model)
    inputs = prepare_inputs(batch, net.inputs)
    logs = {}
    # Teacher role (§3.4): complete modalities, patch masking only, pixel loss; 3 steps.
    for _ in range(cfg.teacher_iters):
        losses, tokens = _forward(model, inputs, cfg, False, generator)
        loss = sum(losses.values())
        cfg.runtime.step(model, optimizer, loss)
        for k, v in _numbers({"teacher_loss": loss, **losses}).items():
            logs[k] = logs.get(k, 0.0) + v / cfg.teacher_iters
    # The token targets are the last teacher iteration's output token embeddings, detached:
    # they were computed on complete modalities for this same batch, and reusing them costs
    # no extra forward pass (the paper stresses STTP's cost-effectiveness; decision D4).
    targets = {m: tokens[m].detach() for m in net.inputs}
    # Student role: the same network on Algorithm 1 input; pixel and/or token loss; 1 step.
    losses, tokens = _forward(model, inputs, cfg, True, generator)
    tok = token_loss(tokens, targets, net.inputs)
    loss = cfg.token_weight * tok + (sum(losses.values()) if student_pixel_loss else 0.0)
    cfg.runtime.step(model, optimizer, loss)
    return {**logs, "loss": float(loss.detach()), "token": float(tok.detach()), **_numbers(losses, M2IM)}


def sttp(model, optimizer, batch, cfg: ObjectiveConfig, generator=None, teacher=None) -> dict:
    """STTP (§3.4): 3 teacher iterations, then 1 student iteration (pixel + token loss)."""
    return _self_teaching(model, optimizer, batch, cfg, generator, student_pixel_loss=True)


def token(model, optimizer, batch, cfg: ObjectiveConfig, generator=None, teacher=None) -> dict:
    """Table 4's token-level MIM: as sttp, but the student learns from the token loss only."""
    return _self_teaching(model, optimizer, batch, cfg, generator, student_pixel_loss=False)


def kd(model, optimizer, batch, cfg: ObjectiveConfig, generator=None, teacher=None) -> dict:
    """Table 4's KD + M²IM: a separate, frozen, pre-trained teacher (complete modalities)
    supplies the token targets; the student trains with pixel + token loss, one step.
    Under torchrun only the student is wrapped: the teacher has no gradient to synchronise."""
    if teacher is None:
        raise ValueError("kd needs a frozen teacher network")
    net = cfg.runtime.network(model)
    inputs = prepare_inputs(batch, net.inputs)
    with torch.no_grad():
        _, targets = _forward(teacher, inputs, cfg, False, generator)
    losses, tokens = _forward(model, inputs, cfg, True, generator)
    tok = token_loss(tokens, targets, net.inputs)
    loss = sum(losses.values()) + cfg.token_weight * tok
    cfg.runtime.step(model, optimizer, loss)
    return {"loss": float(loss.detach()), "token": float(tok.detach()), **_numbers(losses, M2IM)}


OBJECTIVES = {"mim": mim, "m2im": m2im, "sttp": sttp, "token": token, "kd": kd}
