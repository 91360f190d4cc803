"""sttp.py — the pre-training objectives: one function per row of the paper's tables, and
the one registry that says what each of them is.

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

`OBJECTIVES` holds each objective with the facts the rest of the project reads instead of
writing them again (`Objective`): how many optimiser steps it makes per batch (the equal
budgets of reproduce.py and report.py, the lr schedule of train.py --lr_schedule steps),
which of them see Algorithm 1 input (it then needs two modalities), whether it has a token loss (the
--token_* flags), whether it needs a separately pre-trained teacher (--teacher) and whether
a step may leave parameters without gradient (DDP's find_unused_parameters). Adding an
objective is one function here and one entry there.

Read top to bottom: the configuration, the objectives as the paper describes them, the
registry, then the mechanics they share (one training iteration, the student and its
targets, the losses), the token study's alternative readings of the target (one marked
section, kept because they reproduce results/token_study/), and last the plain `Runtime`.

Nothing here reads files, knows about epochs or about processes. How a step runs — its
backward and optimiser step, mixed precision, and which rows of the global batch this
call holds when torchrun splits it over processes — is the `Runtime` in the config: the
plain one-process float32 one at the end of this file, or runtime.py's, which the
scripts pass in.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.profiler import record_function

import masking
from model import MaskMentor, Shard, image_size
from modalities import IGNORE_INDEX, MODALITIES, prepare_inputs


@dataclass
class ObjectiveConfig:
    """Every setting of the objectives. Its defaults are the project's reading of the paper,
    written only here: the scripts' flags take their defaults from these fields."""
    masking: masking.MaskingConfig = field(default_factory=masking.MaskingConfig)
    teacher_iters: int = 3        # teacher iterations per batch before the student's (§3.4)
    token_weight: float = 1.0     # the paper gives no weight: 1, like the pixel losses (D6)
    # The three choices the paper leaves open about the token target (decisions D4-D6; the
    # levels are in the token study's section below). Chosen on validation data
    # (results/token_study/: every level within one σ of every other): the first reading
    # (FIRST_READING) with the teacher's per-channel standardisation.
    token_target: str = "last_teacher_step"   # TOKEN_TARGETS (D4)
    token_positions: str = "all"              # TOKEN_POSITIONS (D5)
    token_norm: str = "standardize"           # TOKEN_NORMS (D6)
    runtime: "Runtime" = field(default_factory=lambda: Runtime())

    def __post_init__(self):
        for name, levels in (("token_target", TOKEN_TARGETS), ("token_positions", TOKEN_POSITIONS),
                             ("token_norm", TOKEN_NORMS)):
            if getattr(self, name) not in levels:
                raise ValueError(f"{name} must be one of {', '.join(levels)}, got {getattr(self, name)!r}")


# -----------------------------------------------------------------------------
# The objectives


def mim(model, optimizer, batch, cfg: ObjectiveConfig, generator=None, teacher=None) -> dict:
    """Plain multi-modal MIM (MultiMAE): complete modalities, one step."""
    return _pixel_objective(model, optimizer, batch, cfg, generator, drop_modalities=False)


def m2im(model, optimizer, batch, cfg: ObjectiveConfig, generator=None, teacher=None) -> dict:
    """M²IM (§3.3): Algorithm 1 drops modalities, then patch masking; one step."""
    return _pixel_objective(model, optimizer, batch, cfg, generator, drop_modalities=True)


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
    return _student_step(model, optimizer, inputs, targets, cfg, generator, pixel_loss=True)


def _self_teaching(model, optimizer, batch, cfg, generator, student_pixel_loss: bool) -> dict:
    """Teacher and student are one network (under torchrun one DDP-wrapped network). Each of
    the teacher_iters + 1 iterations is an ordinary training iteration: a forward, a
    backward, its own optimiser step; no gradient carries over from one to the next. The
    student's token targets (teacher_targets) are detached: no gradient flows into them
    (each process holds the targets of its own rows). Under gradient accumulation every
    iteration accumulates over the same micro-batches, and the targets of the whole batch
    exist before the student's first micro-batch."""
    net = cfg.runtime.network(model)
    inputs = prepare_inputs(batch, net.inputs)
    logs = {}
    # Teacher role (§3.4): complete modalities, patch masking only, pixel loss; 3 steps.
    for _ in range(cfg.teacher_iters):
        plan = draw_plan(net, inputs, cfg, False, generator)
        numbers, passes = iteration(model, optimizer, inputs, plan, cfg, _pixel_loss)
        numbers = {"teacher_loss": numbers.pop("loss"), **numbers}
        for k, v in numbers.items():
            logs[k] = logs.get(k, 0.0) + v / cfg.teacher_iters
    # The targets are the last teacher iteration's output token embeddings: they were
    # computed on complete modalities for this same batch, and reusing them costs no extra
    # forward pass (the paper stresses STTP's cost-effectiveness; decision D4).
    last = {m: torch.cat([p.tokens[m].detach() for p in passes]) for m in net.inputs}
    targets = teacher_targets(model, inputs, cfg, generator, last)
    # Student role: the same network on Algorithm 1 input; pixel and/or token loss; 1 step.
    return {**logs, **_student_step(model, optimizer, inputs, targets, cfg, generator, student_pixel_loss)}


# -----------------------------------------------------------------------------
# The registry: what each objective is, declared once


@dataclass(frozen=True)
class Objective:
    """An objective and the facts about it that the scripts read (train.py's checks, the lr
    schedule and DDP; reproduce.py's and report.py's equal budgets and variants; bench.py;
    docs/cli.md's table of objectives, kept in step by a test). Calling it runs it."""
    run: Callable                 # (model, optimizer, batch, cfg, generator, teacher) -> logs
    steps_per_batch: Callable = lambda cfg: 1   # ObjectiveConfig -> optimiser steps per batch
    # ObjectiveConfig -> which of a batch's steps (0-based) see Algorithm 1 input, i.e. miss
    # modalities: the steps M²IM adds to MIM.
    missing_modality_steps: Callable = lambda cfg: ()
    token_loss: bool = False                    # has a token loss: --token_* apply
    teacher: Optional[str] = None               # needs a frozen teacher pre-trained by this objective
    unused_parameters: bool = False             # a step may leave parameters without gradient (DDP)

    def __call__(self, model, optimizer, batch, cfg: ObjectiveConfig, generator=None, teacher=None) -> dict:
        return self.run(model, optimizer, batch, cfg, generator, teacher)

    @property
    def drops_modalities(self) -> bool:
        """Whether it uses Algorithm 1 (and so needs at least two modalities)."""
        return bool(self.missing_modality_steps(ObjectiveConfig()))


def _teacher_and_student(cfg: ObjectiveConfig) -> int:
    return cfg.teacher_iters + 1


def _every_step(cfg: ObjectiveConfig) -> tuple:
    return (0,)


def _the_student(cfg: ObjectiveConfig) -> tuple:
    return (cfg.teacher_iters,)


OBJECTIVES = {
    "mim": Objective(mim),
    "m2im": Objective(m2im, missing_modality_steps=_every_step),
    "sttp": Objective(sttp, _teacher_and_student, _the_student, token_loss=True),
    # The token-only student reaches neither the MIM heads' pixel layers (decoder_transformer,
    # out_proj) nor the norm_rgb head: under torchrun DDP must expect unused parameters
    # (tests/test_distributed.py checks both ways).
    "token": Objective(token, _teacher_and_student, _the_student, token_loss=True, unused_parameters=True),
    "kd": Objective(kd, missing_modality_steps=_every_step, token_loss=True, teacher="mim"),
}


# -----------------------------------------------------------------------------
# One training iteration: masking, forward, loss, optimiser step


@dataclass
class Pass:
    """One masked forward of the pre-training network: its pixel losses and output token
    embeddings, what the encoder saw (Masked: mask True = hidden) and which modalities
    Algorithm 1 kept (Bool[B, K])."""
    losses: dict
    tokens: dict
    masked: masking.Masked
    keep: torch.Tensor


def draw_plan(net, inputs: dict, cfg: ObjectiveConfig, drop_modalities: bool, generator,
              complete: bool = False) -> masking.MaskPlan:
    """The masking of one batch (complete modalities, or Algorithm 1 first): drawn for the
    global batch, this call's rows kept (Shard). complete=True: no masking at all, every
    patch of every modality visible (no draw)."""
    rt = cfg.runtime
    any_input = inputs[net.inputs[0]]
    B, device = any_input.shape[0], any_input.device
    K, N = len(net.inputs), net.num_tokens(*image_size(inputs))
    if complete:
        return masking.MaskPlan(torch.ones(B, K, dtype=torch.bool, device=device),
                                torch.full((B, K), N, dtype=torch.long, device=device),
                                torch.arange(K * N, dtype=torch.float32, device=device).expand(B, K * N),
                                budget=K * N, padded=False)
    plan = masking.plan_masking(B * rt.world, K, N, cfg.masking, drop_modalities, generator, device)
    return _rows(plan, rt.rows)


def _rows(plan: masking.MaskPlan, take) -> masking.MaskPlan:
    """The plan of some rows of the batch (`take` picks them from a tensor); its budget and
    padding, which compiled code reads instead of the data, are the whole plan's."""
    return masking.MaskPlan(take(plan.keep), take(plan.num_visible), take(plan.noise), plan.budget, plan.padded)


def _run(model, inputs: dict, plan: masking.MaskPlan, cfg: ObjectiveConfig, counts=None) -> Pass:
    """Run the network on `inputs` masked by `plan` and score the pixels. `model` is a
    MaskMentor, or whatever the runtime wraps it in (DDP syncs gradients in backward)."""
    rt = cfg.runtime
    with record_function("forward"):
        losses, tokens, masked = rt.compiled(_masked_pass)(model, inputs, plan, rt, counts)
        return Pass(losses, tokens, masked, plan.keep)


def _masked_pass(model, inputs: dict, plan: masking.MaskPlan, rt: "Runtime", counts=None):
    """The network on a masking plan, and its pixel losses (what --compile compiles; the
    plan's random draws stay outside, as inputs)."""
    with rt.autocast():
        preds, tokens, masked = model(inputs, plan)
    return pixel_losses(preds, inputs, masked.mask, rt.network(model), rt, counts), tokens, masked


def _forward(model, inputs: dict, cfg: ObjectiveConfig, drop_modalities: bool, generator,
             complete: bool = False) -> Pass:
    """Mask (draw_plan), run, and score the pixels: one forward of the whole batch."""
    plan = draw_plan(cfg.runtime.network(model), inputs, cfg, drop_modalities, generator, complete)
    return _run(model, inputs, plan, cfg)


def _hidden(plan: masking.MaskPlan) -> torch.Tensor:
    """Masked.mask of the forward that `plan` will make (True = hidden), without the
    forward: the reference gather on zero-width tokens (no data moved)."""
    empty = plan.noise.new_zeros(*plan.noise.shape, 0)
    return masking.mask_gather_reference(empty, plan.noise, plan.num_visible)[2]


def iteration(model, optimizer, inputs: dict, plan: masking.MaskPlan, cfg: ObjectiveConfig, loss_of) -> tuple:
    """One training iteration on the batch masked by `plan`: forward, loss_of(pass, rows) ->
    (loss, {name: tensor to log}), backward, optimiser step. When the runtime accumulates
    gradients over micro-batches, each micro-batch is a slice `rows` of the batch, and the
    pixel losses' denominators are counted over the whole batch first, so that the micro-
    batches' gradients add up to the batch's. Returns (summed logs, the passes)."""
    rt = cfg.runtime
    net = rt.network(model)
    counts = None
    if rt.micro_steps > 1:
        counts = pixel_loss_counts(inputs, plan, net, rt)

    def forward(rows):
        part = _rows(plan, lambda x: x[rows])
        p = _run(model, {k: v[rows] for k, v in inputs.items()}, part, cfg, counts)
        loss, terms = loss_of(p, rows)
        return loss, (p, _numbers({"loss": loss, **terms}))

    outs = rt.accumulate(model, optimizer, forward, plan.keep.shape[0])
    logs = {}
    for _, (_, numbers) in outs:
        for k, v in numbers.items():
            logs[k] = logs.get(k, 0.0) + v
    return logs, [p for _, (p, _) in outs]


def _numbers(losses: dict, prefix: str = "") -> dict:
    return {prefix + k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}


# Logged names: pixel losses on complete modalities are "rgb", "depth", ...; on Algorithm 1
# (missing-modality) input they are "m2im_rgb", "m2im_depth", ..., whichever objective ran,
# so one loss curve spans the MIM warm-up and the later epochs.
M2IM = "m2im_"


def _pixel_loss(p: Pass, rows) -> tuple:
    return sum(p.losses.values()), p.losses


def _pixel_objective(model, optimizer, batch, cfg, generator, drop_modalities: bool) -> dict:
    net = cfg.runtime.network(model)
    inputs = prepare_inputs(batch, net.inputs)
    plan = draw_plan(net, inputs, cfg, drop_modalities, generator)
    logs, _ = iteration(model, optimizer, inputs, plan, cfg, _pixel_loss)
    prefix = M2IM if drop_modalities else ""
    return {"loss": logs.pop("loss"), **{prefix + k: v for k, v in logs.items()}}


# -----------------------------------------------------------------------------
# The student and its teacher's tokens


@torch.no_grad()
def teacher_targets(teacher, inputs: dict, cfg: ObjectiveConfig, generator, last: Optional[dict] = None) -> dict:
    """The token targets, by cfg.token_target (TOKEN_TARGETS), detached. `teacher` is the
    network in its teacher role (STTP: the same network, after its teacher steps; kd: the
    frozen separate teacher); `last` is the tokens of the last teacher training forward, if
    there was one. The fresh forwards run on the bare network (no DDP: nothing to
    synchronise), on the whole batch (without gradients, even under accumulation)."""
    if cfg.token_target == "last_teacher_step" and last is not None:
        tokens = last
    else:     # kd has no teacher steps: "last_teacher_step" is a fresh masked forward there
        tokens = _fresh_teacher_tokens(teacher, inputs, cfg, generator)
    return {m: t.detach() for m, t in tokens.items()}


def _student_token_loss(student: Pass, targets: dict, names, cfg: ObjectiveConfig, stats=None,
                        count=None) -> torch.Tensor:
    weight = token_weight(cfg.token_positions, student.keep, student.masked.mask)
    return token_loss(student.tokens, targets, names, weight, cfg.token_norm, cfg.runtime, stats, count)


def _student_step(model, optimizer, inputs: dict, targets: dict, cfg: ObjectiveConfig, generator,
                  pixel_loss: bool) -> dict:
    """The student's iteration: Algorithm 1 input, token loss to the detached `targets`
    (and the pixel loss); one optimiser step. Over micro-batches, the token loss's
    normalisation statistics and position count are those of the whole batch."""
    rt = cfg.runtime
    net = rt.network(model)
    plan = draw_plan(net, inputs, cfg, True, generator)
    stats = count = None
    if rt.micro_steps > 1:
        if cfg.token_norm != "none":
            stats = {m: token_stats(targets[m], cfg.token_norm, rt) for m in net.inputs}
        weight = token_weight(cfg.token_positions, plan.keep, _hidden(plan))
        count = None if weight is None else rt.all_sum(weight.sum())

    def loss_of(student, rows):
        tok = _student_token_loss(student, {m: t[rows] for m, t in targets.items()}, net.inputs, cfg, stats, count)
        loss = cfg.token_weight * tok + (sum(student.losses.values()) if pixel_loss else 0.0)
        return loss, {"token": tok, **{M2IM + k: v for k, v in student.losses.items()}}

    return iteration(model, optimizer, inputs, plan, cfg, loss_of)[0]


# -----------------------------------------------------------------------------
# Losses (§3.5)


def _pixel_weight(patch_mask: torch.Tensor, grid, pixels_per_patch: int) -> torch.Tensor:
    """Bool[B, N] per patch -> float [B, h*P, w*P] per pixel."""
    B, (h, w), P = patch_mask.shape[0], grid, pixels_per_patch
    m = patch_mask.view(B, h, 1, w, 1).expand(B, h, P, w, P)
    return m.reshape(B, h * P, w * P).float()


def _masked_mean(per_pixel: torch.Tensor, weight: torch.Tensor, runtime: "Runtime", count=None) -> torch.Tensor:
    """Mean over the weighted pixels of each sample, then over the samples that have any
    (MultiMAE's nanmean: a sample whose modality had no masked pixel doesn't count; 0 when
    none has any). Written with `where` rather than by selecting those samples, so that no
    shape depends on the data (torch.compile then traces it as one graph)."""
    num = (per_pixel * weight).flatten(1).sum(1)
    den = weight.flatten(1).sum(1)
    has = den > 0
    per_sample = torch.where(has, num / torch.where(has, den, 1.0), 0.0)
    return runtime.mean(per_sample.sum(), has.sum(), count)


def patch_normalize(img: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Each patch of the image standardised by its own mean/var over its pixels and
    channels (MAE's norm_pix_loss; MultiMAE's norm_rgb target)."""
    B, C, H, W = img.shape
    h, w = H // patch, W // patch
    x = img.view(B, C, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1).reshape(B, h, w, -1)
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps)
    return x.view(B, h, w, patch, patch, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def _loss_weights(inputs: dict, mask: torch.Tensor, model: MaskMentor) -> dict:
    """Which pixels each modality's pixel loss counts: float [B, H, W] per modality, the
    masked patches (`mask`: Masked.mask, True = hidden) less the invalid pixels (sensor
    holes, unlabelled pixels)."""
    cfg = model.cfg
    grid = cfg.grid(*image_size(inputs))
    N = mask.shape[1] // len(model.inputs)
    weights = {}
    for k, m in enumerate(model.inputs):
        w = _pixel_weight(mask[:, k * N:(k + 1) * N], grid, cfg.patch_size // MODALITIES[m].stride)
        if f"{m}_valid" in inputs:                       # e.g. depth holes: nothing to learn there
            w = w * inputs[f"{m}_valid"][:, 0]
        if MODALITIES[m].loss == "ce":
            w = w * (inputs[m] != IGNORE_INDEX)
        weights[m] = w
    return weights


def pixel_losses(preds: dict, inputs: dict, mask: torch.Tensor, model: MaskMentor,
                 runtime: Optional["Runtime"] = None, counts: Optional[dict] = None) -> dict:
    """MultiMAE's reconstruction losses on the masked patches only, all weights 1, one per
    row of the modality table (its `loss`): rgb MSE (+ norm_rgb MSE to per-patch-normalised
    rgb), depth L1 on standardised depth (sensor holes excluded), semseg cross-entropy at
    1/4 resolution (255 excluded). `mask` is Masked.mask, True = hidden. `runtime`: the
    plain one-process Runtime when None. `counts` (pixel_loss_counts), when these rows are a
    micro-batch: the global batch's number of samples each loss averages over."""
    cfg = model.cfg
    runtime = runtime or Runtime()
    counts = counts or {}
    out = {}
    for m, w in _loss_weights(inputs, mask, model).items():
        spec, target = MODALITIES[m], inputs[m]
        pred = preds[m].float()
        if spec.loss == "ce":
            per_pixel = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="none")
        elif spec.loss == "mse":
            per_pixel = (pred - target).pow(2).mean(1)
        elif spec.loss == "l1":
            per_pixel = (pred - target).abs().mean(1)
        else:
            raise ValueError(f"{m}: unknown loss {spec.loss!r} in modalities.MODALITIES")
        out[m] = _masked_mean(per_pixel, w, runtime, counts.get(m))
        if f"norm_{m}" in preds:                          # MultiMAE's norm_rgb head
            normed = patch_normalize(target, cfg.patch_size)
            out[f"norm_{m}"] = _masked_mean((preds[f"norm_{m}"].float() - normed).pow(2).mean(1), w, runtime,
                                            counts.get(m))
    return out


def pixel_loss_counts(inputs: dict, plan: masking.MaskPlan, model: MaskMentor, runtime: "Runtime") -> dict:
    """For gradient accumulation: per modality, how many samples of the global batch have a
    pixel its loss counts (the denominators of _masked_mean), known from the masking plan
    and the inputs before any forward."""
    return {m: runtime.all_sum((w.flatten(1).sum(1) > 0).sum())
            for m, w in _loss_weights(inputs, _hidden(plan), model).items()}


def token_loss(student: dict, teacher: dict, names, weight: Optional[torch.Tensor] = None,
               norm: str = "none", runtime: Optional["Runtime"] = None, stats: Optional[dict] = None,
               count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 - cosine similarity of output token embeddings (§3.4), each modality's tokens first
    normalised by `norm` (normalize_tokens; STTP's default, cfg.token_norm, standardises).
    The teacher's side carries no gradient. With `weight` None: averaged over every patch
    position of each modality in `names`, then over the modalities (TOKEN_POSITIONS "all").
    With `weight` [B, K*N] (the modalities in `names` order): the mean over the positions it
    selects, pooled. When these rows are a micro-batch: `stats` (token_stats per modality)
    and `count` (the weight's sum) of the global batch."""
    runtime = runtime or Runtime()
    cos = []
    for m in names:
        s, t = normalize_tokens(student[m], teacher[m], norm, runtime, (stats or {}).get(m))
        cos.append(F.cosine_similarity(s, t, dim=-1))                          # [B, N]
    if weight is None:
        return runtime.share(torch.stack([1 - c.mean() for c in cos]).mean())
    loss = 1 - torch.cat(cos, dim=1)
    return runtime.mean((loss * weight).sum(), weight.sum(), count)


def normalize_tokens(student: torch.Tensor, teacher: torch.Tensor, norm: str, runtime: Optional["Runtime"] = None,
                     stats=None):
    """One modality's tokens [B, N, d] for the cosine, by TOKEN_NORMS. The output tokens of
    all images share one dominant direction (the heads' biases, position and task
    embeddings: at initialisation two random tokens have cosine ~0.9), so the raw cosine
    hardly depends on the image. "standardize" (the default) subtracts the teacher's
    per-channel mean over the (global) batch's tokens and divides by its per-channel std;
    "center" only subtracts. The same map, computed from the detached teacher, is applied
    to the student's prediction: the loss then compares the image-specific parts of the
    two, and the student is not asked to remove an offset that the teacher role, the same
    network, still produces. No gradient flows into the statistics. `stats`: token_stats of
    the global batch's targets, when these rows are a micro-batch (None: computed from
    `teacher`)."""
    t = teacher.detach().float()
    s = student.float()
    if norm == "none":
        return s, t
    mean, std = stats if stats is not None else token_stats(teacher, norm, runtime or Runtime())
    if norm == "center":
        return s - mean, t - mean
    return (s - mean) / std, (t - mean) / std


def token_stats(teacher: torch.Tensor, norm: str, runtime: Optional["Runtime"] = None):
    """The detached teacher's per-channel mean and std (None for "center") over every token
    of the global batch, for normalize_tokens."""
    runtime = runtime or Runtime()
    t = teacher.detach().float()
    count = torch.tensor(float(t.shape[0] * t.shape[1]), device=t.device)
    n = runtime.all_sum(count)
    mean = runtime.all_sum(t.sum((0, 1))) / n
    if norm == "center":
        return mean, None
    var = runtime.all_sum(((t - mean) ** 2).sum((0, 1))) / (n - 1).clamp_min(1)
    return mean, torch.sqrt(var + 1e-6)


# -----------------------------------------------------------------------------
# The token study's alternative readings (results/token_study/, docs/method.md D4-D6).
# The paper says only that the student learns the teacher's token embeddings by a cosine
# loss (§3.4, §3.5). Each choice it leaves open has levels, the first of each being this
# project's first reading (FIRST_READING); the study compared them one at a time on
# validation data and kept them all, so that `--token_target/--token_positions/--token_norm`
# reproduce its runs. ObjectiveConfig holds the chosen levels.

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
# (token_target, token_positions, token_norm) as first read: the study names its runs by
# how they differ from it.
FIRST_READING = ("last_teacher_step", "all", "none")


def _fresh_teacher_tokens(teacher, inputs: dict, cfg: ObjectiveConfig, generator) -> dict:
    """The targets of "teacher_complete" and "teacher_masked_fresh" (and kd's, which has no
    teacher step to reuse): a fresh no-grad forward of the teacher on complete modalities,
    with every patch visible or with the usual patch masking."""
    net = cfg.runtime.network(teacher)
    return _forward(net, inputs, cfg, False, generator, complete=cfg.token_target == "teacher_complete").tokens


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
# How a step runs: the plain runtime (runtime.py's TrainingRuntime extends it)


class Runtime(Shard):
    """How the objectives' steps run: one process holding the whole batch, float32, a
    plain backward and optimiser step. runtime.py's subclass adds torchrun (each process a
    shard of the global batch, DistributedDataParallel), mixed precision, loss scaling and
    gradient clipping; the objectives call only these methods (and Shard's world/rows,
    with which every random draw is made for the global batch)."""

    def network(self, model: torch.nn.Module) -> torch.nn.Module:
        """The bare network (its cfg, num_tokens) inside whatever wraps it for training."""
        return model

    micro_steps = 1   # forwards per optimiser step (gradient accumulation, runtime.py)

    def mean(self, total: torch.Tensor, count: torch.Tensor, global_count=None) -> torch.Tensor:
        """The global batch's `total` over its `count` (0 when the count is 0);
        `global_count`, when given, is the count of the whole global batch (these rows
        are a micro-batch of it)."""
        return total / (count if global_count is None else global_count).clamp_min(1)

    def share(self, x: torch.Tensor) -> torch.Tensor:
        """A mean over equally many values per sample, taken over this forward's rows: its
        share of the global batch's mean (itself here; over micro-batches, a fraction)."""
        return x

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

    def accumulate(self, model, optimizer, forward, batch_size: int) -> list:
        """One optimiser step over the batch's rows: `forward(rows)` runs the forward of the
        rows `rows` (a slice) and returns (loss, anything), the loss's denominators being
        those of the whole global batch. Here it runs once on every row, then step();
        runtime.py's --accum_steps runs it on micro-batches of rows one after another,
        their gradients adding up. Returns the list of what `forward` returned."""
        out = forward(slice(0, batch_size))
        self.step(model, optimizer, out[0])
        return [out]
