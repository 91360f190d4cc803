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
its input. The pixel loss is MultiMAE's (SPEC.md §2), the token loss is
1 - cosine similarity between the student's and the teacher's output token embeddings
(the output of the cross-attention module, at every patch position of every modality).
Nothing here reads files or knows about epochs: that is train.py.

Under torchrun (several processes, DistributedDataParallel; train.py sets it up) the
objectives take the DDP-wrapped network and this process's rows of the global batch. Every
random draw is made for the global batch with the generator all processes share, and every
loss is this process's share of the global-batch loss (`global_mean`), so two processes
compute what one would: see "Several processes" below.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

import masking
from model import MODALITIES, IGNORE_INDEX, MaskMentor, prepare_inputs


@dataclass
class ObjectiveConfig:
    masking: masking.MaskingConfig = field(default_factory=masking.MaskingConfig)
    teacher_iters: int = 3        # teacher iterations per batch before the student's (§3.4)
    token_weight: float = 1.0     # the paper gives no weight: 1, like the pixel losses
    clip_grad: float = 0.0        # 0 = off (MultiMAE pre-trains without clipping)
    amp_dtype: Optional[torch.dtype] = None   # autocast to torch.bfloat16 / float16; None = fp32
    scaler: Optional[torch.amp.GradScaler] = None   # float16's loss scaler (state: in the checkpoint)


# -----------------------------------------------------------------------------
# Several processes (torchrun + DistributedDataParallel, set up by train.py)
#
# Each process holds a contiguous slice of every global batch (train.Loop). Two rules make
# a run on P processes compute what one process does on the same global batch:
#   - randomness per sample is drawn for the whole global batch, from the generator every
#     process seeds alike, and each process keeps its rows (`rank_rows`);
#   - a loss that is a mean over samples or pixels is this process's sum divided by the
#     global count (`global_mean`), so the mean of the processes' gradients, which DDP
#     all-reduces, is the one-process gradient. (The token loss, a mean over the same
#     number of tokens per sample, needs nothing: every process has as many samples.)
# Without torchrun (one process) none of this runs: the code paths are the plain ones.


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless torchrun started several."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DDP wrapper (its attributes: cfg, num_tokens, ...); itself otherwise."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def rank_rows(x: torch.Tensor) -> torch.Tensor:
    """This process's rows of a tensor drawn for the global batch (the slice train.Loop gives it)."""
    rank, world = rank_and_world()
    return x.chunk(world)[rank] if world > 1 else x


def global_mean(local_sum: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
    """Under DDP: this process's share of a mean over the global batch, i.e. its sum over the
    global count, times the number of processes because DDP averages the gradients over
    them. The gradient is then the one-process gradient of the global-batch mean, and the
    mean over processes of the returned values is that mean (train.Loop logs it). The count
    is all-reduced without gradient; a global count of 0 gives 0 (the sum is empty)."""
    count = local_count.detach().to(torch.int64)
    dist.all_reduce(count)
    return local_sum * (dist.get_world_size() / count.clamp_min(1))


# -----------------------------------------------------------------------------
# Losses


def _pixel_weight(patch_mask: torch.Tensor, grid, pixels_per_patch: int) -> torch.Tensor:
    """Bool[B, N] per patch -> float [B, h*P, w*P] per pixel."""
    B, (h, w), P = patch_mask.shape[0], grid, pixels_per_patch
    m = patch_mask.view(B, h, 1, w, 1).expand(B, h, P, w, P)
    return m.reshape(B, h * P, w * P).float()


def _masked_mean(per_pixel: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over the weighted pixels of each sample, then over the samples that have any
    (MultiMAE's nanmean: a sample whose modality had no masked pixel doesn't count)."""
    num = (per_pixel * weight).flatten(1).sum(1)
    den = weight.flatten(1).sum(1)
    has = den > 0
    if rank_and_world()[1] > 1:           # the mean over the global batch's samples
        return global_mean((num[has] / den[has]).sum(), has.sum())
    if not has.any():
        return per_pixel.sum() * 0.0      # keeps the graph; nothing to reconstruct
    return (num[has] / den[has]).mean()


def patch_normalize(img: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Each patch of the image standardised by its own mean/var over its pixels and
    channels (MAE's norm_pix_loss; MultiMAE's norm_rgb target)."""
    B, C, H, W = img.shape
    h, w = H // patch, W // patch
    x = img.view(B, C, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1).reshape(B, h, w, -1)
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps)
    return x.view(B, h, w, patch, patch, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def pixel_losses(preds: dict, inputs: dict, mask: torch.Tensor, model: MaskMentor) -> dict:
    """MultiMAE's reconstruction losses on the masked patches only, all weights 1:
    rgb MSE (+ norm_rgb MSE to per-patch-normalised rgb), depth L1 on standardised depth
    (sensor holes excluded), semseg cross-entropy at 1/4 resolution (255 excluded)."""
    cfg = model.cfg
    grid = cfg.grid(*inputs["rgb"].shape[-2:])
    N = mask.shape[1] // len(MODALITIES)
    hidden = {m: mask[:, k * N:(k + 1) * N] for k, m in enumerate(MODALITIES)}
    p, p4 = cfg.patch_size, cfg.patch_size // cfg.semseg_stride

    w = _pixel_weight(hidden["rgb"], grid, p)
    out = {"rgb": _masked_mean((preds["rgb"].float() - inputs["rgb"]).pow(2).mean(1), w)}
    if "norm_rgb" in preds:
        target = patch_normalize(inputs["rgb"], p)
        out["norm_rgb"] = _masked_mean((preds["norm_rgb"].float() - target).pow(2).mean(1), w)
    w = _pixel_weight(hidden["depth"], grid, p) * inputs["depth_valid"][:, 0]
    out["depth"] = _masked_mean((preds["depth"].float() - inputs["depth"]).abs()[:, 0], w)
    target = inputs["semseg"]
    ce = F.cross_entropy(preds["semseg"].float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    w = _pixel_weight(hidden["semseg"], grid, p4) * (target != IGNORE_INDEX)
    out["semseg"] = _masked_mean(ce, w)
    return out


def token_loss(student: dict, teacher: dict) -> torch.Tensor:
    """1 - cosine similarity of output token embeddings, averaged over every patch
    position of every modality (§3.4). The teacher's side carries no gradient."""
    losses = [1 - F.cosine_similarity(student[m].float(), teacher[m].detach().float(), dim=-1).mean()
              for m in MODALITIES]
    return torch.stack(losses).mean()


# -----------------------------------------------------------------------------
# Shared mechanics


def autocast(device, dtype: Optional[torch.dtype]):
    """torch.autocast to `dtype` on the device's type; no context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def optimizer_step(model, optimizer, loss: torch.Tensor, clip_grad: float = 0.0,
                   scaler: Optional[torch.amp.GradScaler] = None) -> None:
    """Backward and one optimiser step (also finetune.py's). With float16's GradScaler the
    loss is scaled for the backward and the gradients unscaled before clipping, so
    `clip_grad` bounds the true gradient norm; scaler.step skips a step whose gradients
    overflowed (the same on every process: DDP all-reduces them first)."""
    optimizer.zero_grad(set_to_none=True)
    with record_function("backward"):
        (loss if scaler is None else scaler.scale(loss)).backward()
    with record_function("optimizer"):
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()


def _forward(model, inputs: dict, cfg: ObjectiveConfig, drop_modalities: bool,
             generator: Optional[torch.Generator]):
    """Mask (complete modalities, or Algorithm 1 first), run, and score the pixels. `model`
    is a MaskMentor, or one wrapped in DDP (its forward then syncs the gradients in backward)."""
    net = unwrap(model)
    B, _, H, W = inputs["rgb"].shape
    world = rank_and_world()[1]
    with record_function("forward"):
        # Drawn for the global batch (B rows per process), this process's rows kept.
        plan = masking.plan_masking(B * world, len(MODALITIES), net.num_tokens(H, W), cfg.masking,
                                    drop_modalities, generator, inputs["rgb"].device)
        if world > 1:
            plan = masking.MaskPlan(rank_rows(plan.keep), rank_rows(plan.num_visible), rank_rows(plan.noise))
        with autocast(inputs["rgb"].device, cfg.amp_dtype):
            preds, tokens, masked = model(inputs, plan)
        return pixel_losses(preds, inputs, masked.mask, net), tokens


def _step(model, optimizer, loss: torch.Tensor, cfg: ObjectiveConfig) -> None:
    optimizer_step(model, optimizer, loss, cfg.clip_grad, cfg.scaler)


def _numbers(losses: dict, prefix: str = "") -> dict:
    return {prefix + k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}


# Logged names: pixel losses on complete modalities are "rgb", "depth", ...; on Algorithm 1
# (missing-modality) input they are "m2im_rgb", "m2im_depth", ..., whichever objective ran,
# so one loss curve spans the MIM warm-up and the later epochs.
M2IM = "m2im_"


def _pixel_objective(model, optimizer, batch, cfg, generator, drop_modalities: bool) -> dict:
    inputs = prepare_inputs(batch, unwrap(model).cfg.semseg_stride)
    losses, _ = _forward(model, inputs, cfg, drop_modalities, generator)
    loss = sum(losses.values())
    _step(model, optimizer, loss, cfg)
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
    """Teacher and student are one network, under DDP one DDP-wrapped network. Each of the
    teacher_iters + 1 iterations is a plain DDP iteration: a forward, a backward that
    all-reduces the gradients, and its own optimiser step. So no gradient ever accumulates
    across iterations and `no_sync` has no use here. The student's token targets are the
    last teacher forward's tokens, detached: no gradient flows into them, so they need no
    synchronisation (each process holds the targets of its own rows). In --mode token part
    of the MIM heads gets no gradient from the student; train.py tells DDP so
    (find_unused_parameters)."""
    inputs = prepare_inputs(batch, unwrap(model).cfg.semseg_stride)
    logs = {}
    # Teacher role (§3.4): complete modalities, patch masking only, pixel loss; 3 steps.
    for _ in range(cfg.teacher_iters):
        losses, tokens = _forward(model, inputs, cfg, False, generator)
        loss = sum(losses.values())
        _step(model, optimizer, loss, cfg)
        for k, v in _numbers({"teacher_loss": loss, **losses}).items():
            logs[k] = logs.get(k, 0.0) + v / cfg.teacher_iters
    # The token targets are the last teacher iteration's output token embeddings, detached:
    # they were computed on complete modalities for this same batch, and reusing them costs
    # no extra forward pass (the paper stresses STTP's cost-effectiveness).
    targets = {m: tokens[m].detach() for m in MODALITIES}
    # Student role: the same network on Algorithm 1 input; pixel and/or token loss; 1 step.
    losses, tokens = _forward(model, inputs, cfg, True, generator)
    tok = token_loss(tokens, targets)
    loss = cfg.token_weight * tok + (sum(losses.values()) if student_pixel_loss else 0.0)
    _step(model, optimizer, loss, cfg)
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
    Under DDP only the student is wrapped: the teacher has no gradient to synchronise."""
    if teacher is None:
        raise ValueError("kd needs a frozen teacher network")
    inputs = prepare_inputs(batch, unwrap(model).cfg.semseg_stride)
    with torch.no_grad():
        _, targets = _forward(teacher, inputs, cfg, False, generator)
    losses, tokens = _forward(model, inputs, cfg, True, generator)
    tok = token_loss(tokens, targets)
    loss = sum(losses.values()) + cfg.token_weight * tok
    _step(model, optimizer, loss, cfg)
    return {"loss": float(loss.detach()), "token": float(tok.detach()), **_numbers(losses, M2IM)}


OBJECTIVES = {"mim": mim, "m2im": m2im, "sttp": sttp, "token": token, "kd": kd}
