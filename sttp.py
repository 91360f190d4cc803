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
from typing import Optional

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

    def mean(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The global batch's `total` over its `count` (0 when the count is 0)."""
        return total / count.clamp_min(1)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """A sum over the global batch of per-shard sums (no gradient): `x` itself here."""
        return x

    def autocast(self):
        """The context the forward passes run in (mixed precision: runtime.py)."""
        return contextlib.nullcontext()

    def compiled(self, fn):
        """The function to call in place of `fn`, the network's forward and its losses:
        `fn` itself here; runtime.py's compiles it (--compile)."""
        return fn

    def step(self, model, optimizer, loss: torch.Tensor) -> None:
        """Backward and one optimiser step."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# The three choices the paper leaves open about the STTP token target (docs/method.md
# §4, decisions D4-D6); the first level of each is this project's first reading.
TOKEN_TARGETS = {
    # D4, where the target comes from. The paper: the teacher is "the teacher with complete
    # modality input" and "provides token-level knowledge of the missing modality".
    "last_teacher_step": "the tokens of the last teacher iteration's training forward (patch-masked, "
                         "before that iteration's optimiser step): no extra forward",
    "teacher_complete": "after the teacher steps, a no-grad forward of the updated network on the complete "
                        "input with every patch visible",
    "teacher_masked_fresh": "after the teacher steps, a no-grad forward of the updated network on the complete "
                            "input with the usual patch masking",
}
TOKEN_POSITIONS = {
    # D5, where the loss is taken. Figure 2: knowledge "of the missing modality".
    "all": "every patch position of every modality",
    "missing": "the positions of the modalities the student lacks (dropped by Algorithm 1)",
    "hidden": "every position the student does not see: its missing modalities and its masked patches",
}
TOKEN_NORMS = {
    # D6, the scale. The paper: "Cosine similarity is adopted to measure the token-level
    # reconstruction loss" (§3.5), nothing more.
    "none": "raw cosine of the tokens",
    "center": "cosine after subtracting the detached teacher's per-channel mean over the batch's tokens",
    "standardize": "cosine after standardising each channel by the detached teacher's mean and std",
}


@dataclass
class ObjectiveConfig:
    masking: masking.MaskingConfig = field(default_factory=masking.MaskingConfig)
    teacher_iters: int = 3        # teacher iterations per batch before the student's (§3.4)
    token_weight: float = 1.0     # the paper gives no weight: 1, like the pixel losses (D6)
    token_target: str = "last_teacher_step"   # TOKEN_TARGETS (D4)
    token_positions: str = "all"              # TOKEN_POSITIONS (D5)
    token_norm: str = "none"                  # TOKEN_NORMS (D6)
    runtime: Runtime = field(default_factory=Runtime)

    def __post_init__(self):
        for name, levels in (("token_target", TOKEN_TARGETS), ("token_positions", TOKEN_POSITIONS),
                             ("token_norm", TOKEN_NORMS)):
            if getattr(self, name) not in levels:
                raise ValueError(f"{name} must be one of {', '.join(levels)}, got {getattr(self, name)!r}")


# -----------------------------------------------------------------------------
# Losses


def _pixel_weight(patch_mask: torch.Tensor, grid, pixels_per_patch: int) -> torch.Tensor:
    """Bool[B, N] per patch -> float [B, h*P, w*P] per pixel."""
    B, (h, w), P = patch_mask.shape[0], grid, pixels_per_patch
    m = patch_mask.view(B, h, 1, w, 1).expand(B, h, P, w, P)
    return m.reshape(B, h * P, w * P).float()


def _masked_mean(per_pixel: torch.Tensor, weight: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Mean over the weighted pixels of each sample, then over the samples that have any
    (MultiMAE's nanmean: a sample whose modality had no masked pixel doesn't count; 0 when
    none has any). Written with `where` rather than by selecting those samples, so that no
    shape depends on the data (torch.compile then traces it as one graph)."""
    num = (per_pixel * weight).flatten(1).sum(1)
    den = weight.flatten(1).sum(1)
    has = den > 0
    per_sample = torch.where(has, num / torch.where(has, den, 1.0), 0.0)
    return runtime.mean(per_sample.sum(), has.sum())


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


def normalize_tokens(student: torch.Tensor, teacher: torch.Tensor, norm: str, runtime: Runtime = Runtime()):
    """One modality's tokens [B, N, d] for the cosine, by TOKEN_NORMS. The output tokens of
    all images share one dominant direction (the heads' biases, position and task
    embeddings: at initialisation two random tokens have cosine ~0.9), so the raw cosine
    hardly depends on the image. "center" subtracts the teacher's per-channel mean over the
    (global) batch's tokens, "standardize" also divides by its per-channel std. The same
    map, computed from the detached teacher, is applied to the student's prediction: the
    loss then compares the image-specific parts of the two, and the student is not asked to
    remove an offset that the teacher role, the same network, still produces. No gradient
    flows into the statistics."""
    t = teacher.detach().float()
    s = student.float()
    if norm == "none":
        return s, t
    count = torch.tensor(float(t.shape[0] * t.shape[1]), device=t.device)
    n = runtime.all_sum(count)
    mean = runtime.all_sum(t.sum((0, 1))) / n
    if norm == "center":
        return s - mean, t - mean
    var = runtime.all_sum(((t - mean) ** 2).sum((0, 1))) / (n - 1).clamp_min(1)
    std = torch.sqrt(var + 1e-6)
    return (s - mean) / std, (t - mean) / std


def token_loss(student: dict, teacher: dict, names, weight: Optional[torch.Tensor] = None,
               norm: str = "none", runtime: Runtime = Runtime()) -> torch.Tensor:
    """1 - cosine similarity of output token embeddings (§3.4). The teacher's side carries
    no gradient. With `weight` None: averaged over every patch position of each modality in
    `names`, then over the modalities (TOKEN_POSITIONS "all"). With `weight` [B, K*N] (the
    modalities in `names` order): the mean over the positions it selects, pooled."""
    cos = []
    for m in names:
        s, t = normalize_tokens(student[m], teacher[m], norm, runtime)
        cos.append(F.cosine_similarity(s, t, dim=-1))                          # [B, N]
    if weight is None:
        return torch.stack([1 - c.mean() for c in cos]).mean()
    loss = 1 - torch.cat(cos, dim=1)
    return runtime.mean((loss * weight).sum(), weight.sum())


def token_weight(positions: str, keep: torch.Tensor, hidden: torch.Tensor) -> Optional[torch.Tensor]:
    """Which token positions the loss is taken on (TOKEN_POSITIONS): None for all of them,
    else Float[B, K*N] from the student's Algorithm 1 outcome `keep` Bool[B, K] and its
    Masked.mask `hidden` Bool[B, K*N] (True = not seen by the encoder)."""
    if positions == "all":
        return None
    if positions == "missing":
        return (~keep).repeat_interleave(hidden.shape[1] // keep.shape[1], dim=1).float()
    return hidden.float()


# -----------------------------------------------------------------------------
# Shared mechanics


@dataclass
class Pass:
    """One masked forward of the pre-training network: its pixel losses and output token
    embeddings, what the encoder saw (Masked: mask True = hidden) and which modalities
    Algorithm 1 kept (Bool[B, K])."""
    losses: dict
    tokens: dict
    masked: masking.Masked
    keep: torch.Tensor


def _forward(model, inputs: dict, cfg: ObjectiveConfig, drop_modalities: bool, generator,
             complete: bool = False) -> Pass:
    """Mask (complete modalities, or Algorithm 1 first), run, and score the pixels. `model`
    is a MaskMentor, or whatever the runtime wraps it in (DDP syncs gradients in backward).
    complete=True: no masking at all, every patch of every modality visible (no draw)."""
    rt = cfg.runtime
    net = rt.network(model)
    any_input = inputs[net.inputs[0]]
    B, device = any_input.shape[0], any_input.device
    K, N = len(net.inputs), net.num_tokens(*image_size(inputs))
    with record_function("forward"):
        if complete:
            plan = masking.MaskPlan(torch.ones(B, K, dtype=torch.bool, device=device),
                                    torch.full((B, K), N, dtype=torch.long, device=device),
                                    torch.arange(K * N, dtype=torch.float32, device=device).expand(B, K * N),
                                    budget=K * N, padded=False)
        else:
            # Drawn for the global batch, this call's rows kept (Shard).
            plan = masking.plan_masking(B * rt.world, K, N, cfg.masking, drop_modalities, generator, device)
            plan = masking.MaskPlan(rt.rows(plan.keep), rt.rows(plan.num_visible), rt.rows(plan.noise),
                                    plan.budget, plan.padded)
        # The draws above stay outside: the network and its losses take them as inputs.
        losses, tokens, masked = rt.compiled(_masked_pass)(model, inputs, plan, rt)
        return Pass(losses, tokens, masked, plan.keep)


def _masked_pass(model, inputs: dict, plan: masking.MaskPlan, rt: Runtime):
    """The network on a masking plan, and its pixel losses (what --compile compiles)."""
    with rt.autocast():
        preds, tokens, masked = model(inputs, plan)
    return pixel_losses(preds, inputs, masked.mask, rt.network(model), rt), tokens, masked


def _student_token_loss(student: Pass, targets: dict, names, cfg: ObjectiveConfig) -> torch.Tensor:
    weight = token_weight(cfg.token_positions, student.keep, student.masked.mask)
    return token_loss(student.tokens, targets, names, weight, cfg.token_norm, cfg.runtime)


def _numbers(losses: dict, prefix: str = "") -> dict:
    return {prefix + k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}


# Logged names: pixel losses on complete modalities are "rgb", "depth", ...; on Algorithm 1
# (missing-modality) input they are "m2im_rgb", "m2im_depth", ..., whichever objective ran,
# so one loss curve spans the MIM warm-up and the later epochs.
M2IM = "m2im_"


def _pixel_objective(model, optimizer, batch, cfg, generator, drop_modalities: bool) -> dict:
    inputs = prepare_inputs(batch, cfg.runtime.network(model).inputs)
    losses = _forward(model, inputs, cfg, drop_modalities, generator).losses
    loss = sum(losses.values())
    cfg.runtime.step(model, optimizer, loss)
    return {"loss": float(loss.detach()), **_numbers(losses, M2IM if drop_modalities else "")}


@torch.no_grad()
def teacher_targets(teacher, inputs: dict, cfg: ObjectiveConfig, generator, last: Optional[Pass] = None) -> dict:
    """The token targets, by cfg.token_target (TOKEN_TARGETS), detached. `teacher` is the
    network in its teacher role (STTP: the same network, after its teacher steps; kd: the
    frozen separate teacher); `last` is the last teacher training forward, if there was one.
    The fresh forwards run on the bare network (no DDP: nothing to synchronise)."""
    if cfg.token_target == "last_teacher_step" and last is not None:
        tokens = last.tokens
    else:     # kd has no teacher steps: "last_teacher_step" is a fresh masked forward there
        net = cfg.runtime.network(teacher)
        tokens = _forward(net, inputs, cfg, False, generator, complete=cfg.token_target == "teacher_complete").tokens
    return {m: t.detach() for m, t in tokens.items()}


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
    student's token targets (teacher_targets) are detached: no gradient flows into them
    (each process holds the targets of its own rows)."""
    net = cfg.runtime.network(model)
    inputs = prepare_inputs(batch, net.inputs)
    logs = {}
    # Teacher role (§3.4): complete modalities, patch masking only, pixel loss; 3 steps.
    for _ in range(cfg.teacher_iters):
        last = _forward(model, inputs, cfg, False, generator)
        loss = sum(last.losses.values())
        cfg.runtime.step(model, optimizer, loss)
        for k, v in _numbers({"teacher_loss": loss, **last.losses}).items():
            logs[k] = logs.get(k, 0.0) + v / cfg.teacher_iters
    # By default the targets are the last teacher iteration's output token embeddings: they
    # were computed on complete modalities for this same batch, and reusing them costs no
    # extra forward pass (the paper stresses STTP's cost-effectiveness; decision D4).
    targets = teacher_targets(model, inputs, cfg, generator, last)
    # Student role: the same network on Algorithm 1 input; pixel and/or token loss; 1 step.
    student = _forward(model, inputs, cfg, True, generator)
    tok = _student_token_loss(student, targets, net.inputs, cfg)
    loss = cfg.token_weight * tok + (sum(student.losses.values()) if student_pixel_loss else 0.0)
    cfg.runtime.step(model, optimizer, loss)
    return {**logs, "loss": float(loss.detach()), "token": float(tok.detach()), **_numbers(student.losses, M2IM)}
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
    targets = teacher_targets(teacher, inputs, cfg, generator)
    student = _forward(model, inputs, cfg, True, generator)
    tok = _student_token_loss(student, targets, net.inputs, cfg)
    loss = sum(student.losses.values()) + cfg.token_weight * tok
    cfg.runtime.step(model, optimizer, loss)
    return {"loss": float(loss.detach()), "token": float(tok.detach()), **_numbers(student.losses, M2IM)}


OBJECTIVES = {"mim": mim, "m2im": m2im, "sttp": sttp, "token": token, "kd": kd}
