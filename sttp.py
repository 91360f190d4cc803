"""sttp.py — the pre-training objectives of the paper's tables, and the losses they learn from.

§3.4 of the paper, as it states it: "the pre-trained model simultaneously acts as the
teacher and student under the STTP framework. The teacher is trained with multi-modal MIM,
where the input data is from complete modalities, and data masking is only performed on
the patch level. [...] the student is trained in the M²IM style with input data of missing
modalities which has been masked using the proposed two-stage masking approach. The
student learns to reconstruct both the masked patch of all modalities as well as the token
embeddings produced by the teacher. For each input batch during training, we first train
the teacher network for three iterations and then train the student for one iteration."
§3.5: "Cosine similarity is adopted to measure the token-level reconstruction loss while
the pixel-level reconstruction loss follows the implementation of [MultiMAE]."

Each objective below is that sentence as code: a generator that yields its iterations one
by one. An `Iteration` says which input the network sees (complete modalities with patch
masking; Algorithm 1 first; or everything visible), which loss it learns from and which
targets that loss compares with. Whoever runs the objective (train.py hands it to util/)
draws the masking, runs the network, makes one optimiser step on the loss, and sends back
what the forward produced (a `Pass`): the teacher's output tokens become the student's
targets, detached, so no gradient reaches the teacher through them.

    mim    complete modalities, patch masking, pixel loss             (MultiMAE; "+ MIM")
    m2im   Algorithm 1 first, then patch masking, pixel loss          ("+ M²IM", §3.3)
    sttp   3 teacher iterations (= mim), then 1 student iteration on
           Algorithm 1 input: pixel loss + token loss to the teacher  ("+ M²IM + STTP", §3.4)
    token  as sttp, the student with the token loss only              (Table 4, "Token-level MIM")
    kd     a separately pre-trained, frozen teacher gives the tokens;
           the student learns pixel + token loss, one iteration       (Table 4, "KD + M²IM")

and two controls that take STTP's schedule apart (results/schedule/): `m2im_x4`, its
repetition (four M²IM steps on each batch), and `mix25`, its dilution (one step a batch,
M²IM one time in four, else MIM).

The teacher and the student are the same network (self-teaching): "teacher" and "student"
are only two ways of masking its input. Read top to bottom: the configuration, the
objectives, what an iteration is, the registry (what each objective is, declared once), the
losses (§3.5), and last, in one marked section, the token study's readings of what the
paper leaves open about the token target (docs/method.md D4-D6).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import masking
from model import image_size
from modalities import IGNORE_INDEX, MODALITIES


@dataclass
class ObjectiveConfig:
    """Every setting of the objectives. Its defaults are the project's reading of the paper,
    written only here: the scripts' flags take their defaults from these fields."""
    masking: masking.MaskingConfig = field(default_factory=masking.MaskingConfig)
    teacher_iters: int = 3        # teacher iterations per batch before the student's (§3.4)
    token_weight: float = 1.0     # the paper gives no weight: 1, like the pixel losses (D6)
    # What the paper leaves open about the token target (D4-D6; the levels are in the last
    # section). Chosen on validation data (results/token_study/: every level within one σ of
    # every other): the first reading with the teacher's per-channel standardisation.
    token_target: str = "last_teacher_step"   # TOKEN_TARGETS (D4)
    token_positions: str = "all"              # TOKEN_POSITIONS (D5)
    token_norm: str = "standardize"           # TOKEN_NORMS (D6)

    def __post_init__(self):
        for name, levels in (("token_target", TOKEN_TARGETS), ("token_positions", TOKEN_POSITIONS),
                             ("token_norm", TOKEN_NORMS)):
            if getattr(self, name) not in levels:
                raise ValueError(f"{name} must be one of {', '.join(levels)}, got {getattr(self, name)!r}")


# -----------------------------------------------------------------------------
# The objectives


def mim(cfg: ObjectiveConfig, generator=None):
    """Plain multi-modal MIM (MultiMAE): complete modalities, patch masking, one iteration."""
    p = yield Iteration(loss=pixel_loss)
    return p.logs


def m2im(cfg: ObjectiveConfig, generator=None):
    """M²IM (§3.3): Algorithm 1 drops modalities, then patch masking; one iteration."""
    p = yield Iteration(drop_modalities=True, loss=pixel_loss)
    return _on_missing_input(p.logs)


def sttp(cfg: ObjectiveConfig, generator=None, student_pixel_loss: bool = True):
    """STTP (§3.4): teacher_iters (3) teacher iterations on complete modalities, then one
    student iteration on Algorithm 1 input with pixel and token loss."""
    logs = {}
    for _ in range(cfg.teacher_iters):
        teacher = yield Iteration(loss=pixel_loss)         # the teacher: MIM on complete modalities
        numbers = {"teacher_loss": teacher.logs["loss"], **_terms(teacher.logs)}
        for k, v in numbers.items():
            logs[k] = logs.get(k, 0.0) + v / cfg.teacher_iters
    if cfg.token_target == "last_teacher_step":
        # The last teacher iteration's output tokens: computed on complete modalities for this
        # same batch, at no extra cost (the paper stresses STTP's cost-effectiveness; D4).
        if not cfg.teacher_iters:
            raise ValueError("teacher_iters 0 leaves no teacher iteration whose tokens could be the target")
        tokens = teacher.tokens
    else:
        tokens = (yield fresh_target(cfg)).tokens
    student = yield student_iteration(tokens, cfg, student_pixel_loss)
    return {**logs, **_student_logs(student.logs)}


def token(cfg: ObjectiveConfig, generator=None):
    """Table 4's token-level MIM: as sttp, but the student learns from the token loss only."""
    return sttp(cfg, generator, student_pixel_loss=False)


def kd(cfg: ObjectiveConfig, generator=None):
    """Table 4's KD + M²IM: a separate, frozen, pre-trained teacher (complete modalities)
    supplies the token targets; the student trains with pixel + token loss, one step."""
    target = yield fresh_target(cfg, teacher=True)
    student = yield student_iteration(target.tokens, cfg)
    return _student_logs(student.logs)


# The schedule study's arms (results/schedule/): STTP's schedule taken apart. STTP makes
# teacher_iters + 1 optimiser steps on each batch, one of them on Algorithm 1 input; these
# two keep one of those facts each, without a token loss. Not the paper's: controls.


def m2im_x4(cfg: ObjectiveConfig, generator=None):
    """M²IM on each batch as many times as STTP steps on it (teacher_iters + 1 = 4): the
    repetition of STTP's schedule without its dilution (results/schedule/)."""
    logs, n = {}, cfg.teacher_iters + 1
    for _ in range(n):
        p = yield Iteration(drop_modalities=True, loss=pixel_loss)
        for k, v in _on_missing_input(p.logs).items():
            logs[k] = logs.get(k, 0.0) + v / n
    return logs


def mix25(cfg: ObjectiveConfig, generator=None):
    """One step per batch, fresh batches: M²IM with probability 1 / (teacher_iters + 1) (1 in 4,
    drawn from the masking generator), else MIM: the dilution of STTP's schedule without its
    repetition (results/schedule/)."""
    device = generator.device if generator is not None else None
    if float(torch.rand((), generator=generator, device=device)) < 1 / (cfg.teacher_iters + 1):
        return (yield from m2im(cfg, generator))
    return (yield from mim(cfg, generator))


def student_iteration(tokens: dict, cfg: ObjectiveConfig, pixel: bool = True) -> Iteration:
    """The student's iteration: Algorithm 1 input; the token loss to `tokens`, detached (no
    gradient flows into the teacher), plus the pixel loss unless `pixel` is False. The
    targets are those of the heads that reconstruct a modality (MultiMAE's extra norm_rgb
    head is left out); their normalisation statistics are the whole batch's."""
    targets = {m: t.detach() for m, t in tokens.items() if m in MODALITIES}
    stats = None if cfg.token_norm == "none" else {m: token_stats(t, cfg.token_norm) for m, t in targets.items()}
    return Iteration(drop_modalities=True, targets=targets,
                     loss=functools.partial(_student_loss, cfg=cfg, stats=stats, pixel=pixel))


def fresh_target(cfg: ObjectiveConfig, teacher: bool = False) -> Iteration:
    """A forward without gradient whose output tokens are the target (TOKEN_TARGETS other
    than the default, and kd's separate teacher): complete modalities, with every patch
    visible ("teacher_complete") or with the usual patch masking."""
    return Iteration(all_visible=cfg.token_target == "teacher_complete", teacher=teacher)


def _student_loss(p: Pass, targets: dict, cfg: ObjectiveConfig, stats, pixel: bool) -> dict:
    tok = token_loss(p.tokens, targets, list(targets), p.weights["token"], cfg.token_norm, stats)
    return {**(p.losses if pixel else {}), "token": Mean(tok.total, tok.count, cfg.token_weight)}


# Logged names: pixel losses on complete modalities are "rgb", "depth", ...; on Algorithm 1
# (missing-modality) input they are "m2im_rgb", "m2im_depth", ..., whichever objective ran,
# so one loss curve spans the MIM warm-up and the later epochs.
M2IM = "m2im_"


def _terms(logs: dict) -> dict:
    return {k: v for k, v in logs.items() if k != "loss"}


def _on_missing_input(logs: dict) -> dict:
    return {"loss": logs["loss"], **{M2IM + k: v for k, v in _terms(logs).items()}}


def _student_logs(logs: dict) -> dict:
    pixel = {M2IM + k: v for k, v in _terms(logs).items() if k != "token"}
    return {"loss": logs["loss"], "token": logs["token"], **pixel}


# -----------------------------------------------------------------------------
# An iteration, and what its forward produced


@dataclass
class Iteration:
    """One iteration of an objective. `loss` given: a training iteration (forward, the loss,
    backward, one optimiser step); None: a forward without gradient whose outputs the
    objective uses (a target)."""
    drop_modalities: bool = False      # Algorithm 1 before the patch masking (M²IM, the student)
    all_visible: bool = False          # no masking at all: every patch of every modality seen
    loss: Optional[Callable] = None    # (Pass, targets) -> {name: Mean}; the loss is their sum
    targets: dict = field(default_factory=dict)   # what `loss` compares with, one row per sample
    teacher: bool = False              # run kd's frozen, separate teacher, not the network


@dataclass
class Pass:
    """What one forward of the pre-training network produced: its pixel losses, its output
    token embeddings per head, what it hid (True = a reconstruction target), which
    modalities Algorithm 1 kept, and which pixels and token positions the losses take.
    Sent back to the objective: its numbers (`logs`) and tokens, of the whole batch."""
    losses: dict                       # {name: Mean}, pixel_losses
    tokens: dict                       # {head: [B, N, d]}
    hidden: torch.Tensor               # Bool[B, K*N], masking.Masked.mask
    keep: torch.Tensor                 # Bool[B, K]
    weights: dict = field(default_factory=dict)   # loss_weights
    logs: dict = field(default_factory=dict)      # {"loss": ..., name: ...} as numbers


def input_plan(it: Iteration, batch_size: int, num_modalities: int, num_tokens: int, cfg: ObjectiveConfig,
               generator, device) -> masking.MaskPlan:
    """What the network sees in iteration `it`: everything, or the patch masking of complete
    modalities, or Algorithm 1 then the patch masking (masking.plan_masking)."""
    if it.all_visible:
        return masking.all_visible(batch_size, num_modalities, num_tokens, device)
    return masking.plan_masking(batch_size, num_modalities, num_tokens, cfg.masking, it.drop_modalities,
                                generator, device)


def masked_forward(model, inputs: dict, plan: masking.MaskPlan, weights: dict, patch_size: int) -> Pass:
    """The network on `inputs` masked by `plan`, and its pixel losses on the pixels
    `weights` says (loss_weights)."""
    preds, tokens, masked = model(inputs, plan)
    return Pass(pixel_losses(preds, inputs, weights, patch_size), tokens, masked.mask, plan.keep, weights)


# -----------------------------------------------------------------------------
# The registry: what each objective is, declared once


@dataclass(frozen=True)
class Objective:
    """An objective and the facts about it that the scripts read (train.py's checks and lr
    schedule, studies/reproduce.py's and studies/report.py's equal budgets, studies/bench.py, docs/cli.md's table of
    objectives, which a test keeps in step). Calling it starts its generator of iterations."""
    run: Callable                 # (cfg, generator) -> a generator of Iterations, returning its logs
    steps_per_batch: Callable = lambda cfg: 1   # ObjectiveConfig -> optimiser steps per batch
    # ObjectiveConfig -> which of a batch's steps (0-based) see Algorithm 1 input, i.e. miss
    # modalities: the steps M²IM adds to MIM.
    missing_modality_steps: Callable = lambda cfg: ()
    token_loss: bool = False                    # has a token loss: --token_* apply
    teacher: Optional[str] = None               # needs a frozen teacher pre-trained by this objective
    unused_parameters: bool = False             # a step may leave parameters without gradient

    def __call__(self, cfg: ObjectiveConfig, generator=None):
        return self.run(cfg, generator)

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
    # out_proj) nor the norm_rgb head (tests/test_distributed.py checks that DDP is told).
    "token": Objective(token, _teacher_and_student, _the_student, token_loss=True, unused_parameters=True),
    "kd": Objective(kd, missing_modality_steps=_every_step, token_loss=True, teacher="mim"),
    "m2im_x4": Objective(m2im_x4, _teacher_and_student, lambda cfg: tuple(range(cfg.teacher_iters + 1))),
    # Its Algorithm-1 steps are drawn: declared as "may", counted in the runs (studies/).
    "mix25": Objective(mix25, missing_modality_steps=_every_step),
}


# -----------------------------------------------------------------------------
# Losses (§3.5)


@dataclass
class Mean:
    """A loss term: a mean over the batch, written as a sum and what it is divided by, so
    that its value is known whatever part of the batch the sum was taken on. value =
    total / count (0 when count is 0); count None: `total` is the mean itself, every sample
    weighing the same. `weight` multiplies the term in the loss."""
    total: torch.Tensor
    count: Optional[torch.Tensor] = None
    weight: float = 1.0

    def value(self) -> torch.Tensor:
        return self.total if self.count is None else self.total / self.count.clamp_min(1)


@dataclass
class Weights:
    """Which pixels (or token positions) of each sample a loss takes (`map`, float, one row
    per sample; None: all of them) and how many samples or positions its mean is over."""
    map: Optional[torch.Tensor]
    count: Optional[torch.Tensor]


def pixel_loss(p: Pass, targets: dict) -> dict:
    """The loss of MIM, M²IM and the teacher: the pixel losses, summed."""
    return p.losses


def _pixel_weight(patch_mask: torch.Tensor, grid, pixels_per_patch: int) -> torch.Tensor:
    """Bool[B, N] per patch -> float [B, h*P, w*P] per pixel."""
    B, (h, w), P = patch_mask.shape[0], grid, pixels_per_patch
    m = patch_mask.view(B, h, 1, w, 1).expand(B, h, P, w, P)
    return m.reshape(B, h * P, w * P).float()


def loss_weights(net, inputs: dict, hidden: torch.Tensor, keep: torch.Tensor, token_positions: str) -> dict:
    """Which pixels each modality's pixel loss takes: its masked patches (`hidden`, True =
    hidden from the encoder) less the invalid pixels (sensor holes, unlabelled pixels);
    the samples that have any count (MultiMAE's mean over samples). And under "token" the
    token loss's positions (token_weight). Known from the masking, before any forward."""
    cfg = net.cfg
    grid = cfg.grid(*image_size(inputs))
    N = hidden.shape[1] // len(net.inputs)
    weights = {}
    for k, m in enumerate(net.inputs):
        w = _pixel_weight(hidden[:, k * N:(k + 1) * N], grid, cfg.patch_size // MODALITIES[m].stride)
        if f"{m}_valid" in inputs:                       # e.g. depth holes: nothing to learn there
            w = w * inputs[f"{m}_valid"][:, 0]
        if MODALITIES[m].loss == "ce":
            w = w * (inputs[m] != IGNORE_INDEX)
        weights[m] = Weights(w, (w.flatten(1).sum(1) > 0).sum())
    position = token_weight(token_positions, keep, hidden)
    weights["token"] = Weights(position, None if position is None else position.sum())
    return weights


def _masked_mean(per_pixel: torch.Tensor, w: Weights) -> Mean:
    """Mean over the weighted pixels of each sample, then over the samples that have any
    (MultiMAE's nanmean: a sample whose modality had no masked pixel doesn't count; 0 when
    none has any). Written with `where` rather than by selecting those samples, so that no
    shape depends on the data."""
    num = (per_pixel * w.map).flatten(1).sum(1)
    den = w.map.flatten(1).sum(1)
    has = den > 0
    return Mean(torch.where(has, num / torch.where(has, den, 1.0), 0.0).sum(), w.count)


def patch_normalize(img: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Each patch of the image standardised by its own mean/var over its pixels and
    channels (MAE's norm_pix_loss; MultiMAE's norm_rgb target)."""
    B, C, H, W = img.shape
    h, w = H // patch, W // patch
    x = img.view(B, C, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1).reshape(B, h, w, -1)
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps)
    return x.view(B, h, w, patch, patch, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def pixel_losses(preds: dict, inputs: dict, weights: dict, patch_size: int) -> dict:
    """MultiMAE's reconstruction losses on the masked patches only, all weights 1, one per
    row of the modality table (its `loss`): rgb MSE (+ norm_rgb MSE to per-patch-normalised
    rgb), depth L1 on standardised depth (sensor holes excluded), semseg cross-entropy at
    1/4 resolution (255 excluded), each on the pixels `weights` (loss_weights) gives."""
    out = {}
    for m in [h for h in preds if h in MODALITIES]:       # a head per modality, in sequence order
        spec, w, target, pred = MODALITIES[m], weights[m], inputs[m], preds[m].float()
        if spec.loss == "ce":
            per_pixel = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="none")
        elif spec.loss == "mse":
            per_pixel = (pred - target).pow(2).mean(1)
        elif spec.loss == "l1":
            per_pixel = (pred - target).abs().mean(1)
        else:
            raise ValueError(f"{m}: unknown loss {spec.loss!r} in modalities.MODALITIES")
        out[m] = _masked_mean(per_pixel, w)
        if f"norm_{m}" in preds:                          # MultiMAE's norm_rgb head
            normed = patch_normalize(target, patch_size)
            out[f"norm_{m}"] = _masked_mean((preds[f"norm_{m}"].float() - normed).pow(2).mean(1), w)
    return out


def token_loss(student: dict, teacher: dict, names, positions: Optional[Weights] = None, norm: str = "none",
               stats: Optional[dict] = None) -> Mean:
    """1 - cosine similarity of output token embeddings (§3.4, §3.5), averaged over every
    patch position of each modality in `names`, then over the modalities. The teacher's
    side carries no gradient. Each modality's tokens are first normalised by `norm`
    (normalize_tokens; `stats`: the whole batch's token_stats, else computed from
    `teacher`). `positions` (loss_weights' "token": a map [B, K*N], the modalities in
    `names` order), when it has a map: the mean over the positions it selects instead,
    pooled (TOKEN_POSITIONS)."""
    cos = []
    for m in names:
        s, t = normalize_tokens(student[m], teacher[m], norm, (stats or {}).get(m))
        cos.append(F.cosine_similarity(s, t, dim=-1))                          # [B, N]
    if positions is None or positions.map is None:
        return Mean(torch.stack([1 - c.mean() for c in cos]).mean())
    return Mean(((1 - torch.cat(cos, dim=1)) * positions.map).sum(), positions.count)


# -----------------------------------------------------------------------------
# The token study's readings (results/token_study/, docs/method.md D4-D6).
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


def token_weight(positions: str, keep: torch.Tensor, hidden: torch.Tensor) -> Optional[torch.Tensor]:
    """Which token positions the loss is taken on (TOKEN_POSITIONS): None for all of them,
    else Float[B, K*N] from the student's Algorithm 1 outcome `keep` Bool[B, K] and what it
    does not see, `hidden` Bool[B, K*N]."""
    if positions == "all":
        return None
    if positions == "missing":
        return (~keep).repeat_interleave(hidden.shape[1] // keep.shape[1], dim=1).float()
    return hidden.float()


def normalize_tokens(student: torch.Tensor, teacher: torch.Tensor, norm: str, stats=None):
    """One modality's tokens [B, N, d] for the cosine, by TOKEN_NORMS. The output tokens of
    all images share one dominant direction (the heads' biases, position and task
    embeddings: at initialisation two random tokens have cosine ~0.9), so the raw cosine
    hardly depends on the image. "standardize" (the default) subtracts the teacher's
    per-channel mean over the batch's tokens and divides by its per-channel std; "center"
    only subtracts. The same map, computed from the detached teacher, is applied to the
    student's prediction: the loss then compares the image-specific parts of the two, and
    the student is not asked to remove an offset that the teacher role, the same network,
    still produces. No gradient flows into the statistics (`stats`: token_stats)."""
    t = teacher.detach().float()
    s = student.float()
    if norm == "none":
        return s, t
    mean, std = stats if stats is not None else token_stats(teacher, norm)
    if norm == "center":
        return s - mean, t - mean
    return (s - mean) / std, (t - mean) / std


def token_stats(teacher: torch.Tensor, norm: str):
    """The detached teacher's per-channel mean and std (None for "center") over every token
    of the batch, for normalize_tokens."""
    t = teacher.detach().float()
    n = torch.tensor(float(t.shape[0] * t.shape[1]), device=t.device)
    mean = t.sum((0, 1)) / n
    if norm == "center":
        return mean, None
    var = ((t - mean) ** 2).sum((0, 1)) / (n - 1).clamp_min(1)
    return mean, torch.sqrt(var + 1e-6)
