"""studies/diagnostics.py — the checks to make before believing (or tuning) a result: what the
input degradations do to a model, whether pre-training converged and taught what it is
meant to, and what the synthetic rooms' cross-modal cues give before anything is trained.

    evaluate_conditions(net, dataset, 50, robustness=True)  # mIoU per input condition, clean and degraded
    pretrain_diagnostics("out/reproduce/mim/seed0/pretrain") # loss log, reconstruction from one modality, token signal
    cross_modal_predictability(0.5)                         # per class: how well one modality predicts the other

studies/reproduce.py runs the experiments and calls these on every run (its robustness table and
ablation.md's diagnostics sections); studies/report.py writes what they return. Nothing here
trains a model: the predictability probe fits a small regressor of its own.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import evaluate
import masking
import model as M
import modalities
import sttp
import train
from studies.report import DIAG_IMAGES, steps_per_batch
from util import rooms, vis
from util.degrade import DEGRADATIONS
from util.checkpoints import load_checkpoint

# -----------------------------------------------------------------------------
# Degraded inputs (the robustness table): util/degrade.py's degradations, scored by evaluate.py's
# loop. Each degradation has a generator of its own, seeded 1000 + its position in
# DEGRADATIONS, so that every checkpoint of the studies sees exactly the same corrupted images.


def evaluate_conditions(net: M.Segmenter, dataset, batch_size: int, robustness: bool) -> dict:
    """mIoU/mAcc on clean input under the three settings and, with `robustness`, under each
    degradation with rgb+depth and with the degraded modality alone (a dedicated model: the
    settings it has)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=data.collate)
    possible = evaluate.conditions_of(net)                  # a dedicated model: its own only
    conditions = [evaluate.Condition("clean", tuple(possible))]
    if robustness:
        conditions += [evaluate.Condition(name, tuple(s for s in ("rgbd", mod) if s in possible), degradation=name,
                                          seed=1000 + i)
                       for i, (name, (mod, _, _)) in enumerate(DEGRADATIONS.items(), start=1)]
    results = evaluate.evaluate(net, loader, net.cfg.num_classes, conditions, torch.device("cpu"))
    out = {c: {s: {"miou": r["miou"], "macc": r["macc"]} for s, r in rs.items()} for c, rs in results.items()}
    for s, r in results["clean"].items():                  # for the complementarity check (diagnostics)
        out["clean"][s]["per_class_iou"] = r["per_class_iou"]
    return out


# -----------------------------------------------------------------------------
# Pre-training runs: the checks to make before believing (or tuning) the tables. Is the data
# really complementary (per-class IoU from rgb alone and depth alone, from the runs'
# evaluations)? Are the budgets equal (BudgetCounter)? Does pre-training converge (the
# loss logs)? Is the teacher's token signal about the image? Does M²IM teach what it is
# meant to, i.e. does it predict a missing modality from the other better than MIM does?
# The last two are measured on held-out images for every pre-trained checkpoint.

def token_agreement(student: dict, teacher: dict) -> dict:
    """How much of the token target is about the image. The token loss (1 - cos) of the
    student's tokens against the teacher's for the same images ("matched") and against
    the teacher's for other images (the batch rolled by one: "other image"), raw and after
    subtracting the teacher's mean token at each position of each modality ("centred").
    If the raw loss hardly grows with the wrong image's target, the target is mostly what
    every image shares (position and task embeddings) and carries little content."""
    names = [m for m in teacher if m in modalities.MODALITIES]        # not the norm_rgb head's
    mean = {m: t.mean(0, keepdim=True) for m, t in teacher.items()}
    other = {m: t.roll(1, 0) for m, t in teacher.items()}
    centred = lambda d: {m: d[m] - mean[m] for m in d}
    loss = lambda s, t: float(sttp.token_loss(s, t, names).value())
    return {"raw_matched": loss(student, teacher), "raw_other_image": loss(student, other),
            "centred_matched": loss(centred(student), centred(teacher)),
            "centred_other_image": loss(centred(student), centred(other))}


PIXEL_TERMS = ("rgb", "norm_rgb", "depth", "semseg")


def _pixel_loss(row: dict):
    """An epoch's pixel loss: on complete input (mim epochs, STTP's teacher steps) where the
    log has it, else on Algorithm 1 input (m2im, kd); None for fine-tuning's logs."""
    for prefix in ("", sttp.M2IM):
        if all(prefix + k in row for k in PIXEL_TERMS):
            return sum(row[prefix + k] for k in PIXEL_TERMS)
    return None


def loss_log(path: str, batches_per_epoch: int) -> dict:
    """First and last epoch's training loss from a run's log.jsonl (pre-training: the pixel
    loss, `_pixel_loss`; fine-tuning: the cross-entropy), and how much the last epoch still
    lowered it (relative) in how many optimiser steps (an STTP epoch has 4 a batch): a run
    far from converged still drops a lot at its end."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    series = [p if (p := _pixel_loss(r)) is not None else r["loss"] for r in rows]
    prev = series[-2] if len(series) > 1 else series[0]
    drop = (prev - series[-1]) / prev
    mode = rows[-1].get("mode", "")                 # "" for fine-tuning: one step a batch
    steps = batches_per_epoch * (steps_per_batch(mode) if mode else 1)
    out = {"epochs": len(rows), "first": series[0], "last": series[-1], "last_epoch_drop": drop,
           "last_epoch_steps": steps}
    if "token" in rows[-1]:                 # the self-teaching and kd runs' token loss
        out["token_last"] = rows[-1]["token"]
    return out


def pretrain_diagnostics(pretrain_dir: str, n_images: int = DIAG_IMAGES) -> dict:
    """For one pre-training run: its loss log, the held-out reconstruction losses from
    complete input, rgb only and depth only (Algorithm 1's outcome fixed, the run's own
    patch masking; a dropped modality's patches are all targets, so e.g. "depth" under
    "rgb only" is depth predicted from rgb), the token agreement of the teacher's targets
    (as the run builds them: its --token_target) with a student pass (Algorithm 1) on the
    same images, and the token loss's pull on the encoder: the norm of its gradient on the
    encoder (blocks, input adapters, global token) over that of the pixel loss, for that
    student pass (with the run's --token_positions, --token_norm and --token_weight)."""
    ckpt = load_checkpoint(os.path.join(pretrain_dir, "ckpt.pt"), "pretrain")
    net = M.MaskMentor(M.ModelConfig.from_dict(ckpt["model_config"]))
    net.load_state_dict(ckpt["model"])
    net.eval()
    ocfg = train.objective_config(train.TrainConfig(**ckpt["config"]))
    mcfg = ocfg.masking
    test = data.build_dataset("synthetic", None, "test", image_size=net.cfg.image_size,
                              cues=ckpt["config"].get("cues", 0.0))
    batch = data.collate([test[i] for i in range(min(n_images, len(test)))])
    inputs = modalities.prepare_inputs(batch, net.inputs)
    B = batch["rgb"].shape[0]
    K, N = len(net.inputs), net.num_tokens(*M.image_size(inputs))
    recon = {}
    with torch.no_grad():
        for cond, keep in vis.RECON_CONDITIONS.items():
            kept = torch.tensor([keep is None or m in keep for m in net.inputs]).expand(B, K)
            plan = masking.plan_masking(B, K, N, mcfg, False, torch.Generator().manual_seed(0), keep=kept)
            recon[cond] = {k: float(v.value()) for k, v in _forward(net, inputs, plan, "all").losses.items()}
    g = torch.Generator().manual_seed(1)
    # The run's own target (a fresh forward: "last_teacher_step" is a teacher pass without its step)
    with torch.no_grad():
        target = _forward(net, inputs, sttp.input_plan(sttp.fresh_target(ocfg), B, K, N, ocfg, g, "cpu"), "all")
    it = sttp.student_iteration(target.tokens, ocfg)
    student = _forward(net, inputs, sttp.input_plan(it, B, K, N, ocfg, g, "cpu"), ocfg.token_positions)
    tokens = token_agreement({m: student.tokens[m].detach() for m in it.targets}, it.targets)
    encoder = [p for n, p in net.named_parameters() if n.startswith(("encoder.", "input_adapters.", "global_tokens"))]
    norm = lambda loss: float(torch.cat([g.flatten() for g in torch.autograd.grad(
        loss, encoder, retain_graph=True, allow_unused=True) if g is not None]).norm())
    pixel = norm(sum(m.value() for m in student.losses.values()))
    token = it.loss(student, it.targets)["token"]
    tokens["grad_share"] = norm(token.weight * token.value()) / pixel
    batches = ckpt["config"]["subset"] // ckpt["config"]["batch_size"]       # the loader drops the last
    return {"train_log": loss_log(os.path.join(pretrain_dir, "log.jsonl"), batches), "reconstruction": recon,
            "tokens": tokens}


def _forward(net: M.MaskMentor, inputs: dict, plan, token_positions: str) -> sttp.Pass:
    """One forward of a pre-training network on one process, as util/runtime.py runs it."""
    weights = sttp.loss_weights(net, inputs, masking.hidden_mask(plan), plan.keep, token_positions)
    return sttp.masked_forward(net, inputs, plan, weights, net.cfg.patch_size)


# -----------------------------------------------------------------------------
# The synthetic rooms' cross-modal cues (util/rooms.py, "Cross-modal cues"): what the knob does,
# measured before anything is trained: per class, how well a small regressor predicts one
# modality from a neighbourhood of the other.

_PROBE_STEPS = (1, 2, 4)                  # a 5x5 window at these pixel spacings: 5 to 17 pixels of context
_PROBE_PIXELS = 64                        # training pixels per class per image (class-balanced)
_PROBES = (("depth_from_rgb", "rgb_in", "depth"), ("orientation_from_rgb", "rgb_in", "slope"),
           ("rgb_from_depth", "depth_in", "luma"))


def cross_modal_predictability(cues: float, n_images: int = 200, size: int = rooms.SYNTHETIC_SIZE,
                               split: str = "val", seed: int = 0) -> dict:
    """Per class, how well each modality predicts the other at this cue level.

    Three class-blind regressors are fitted on scenes n_images..2 n_images - 1 of `split`
    and scored on the held-out scenes 0..n_images - 1 (rendered as render_synthetic does,
    at this cue level): inputs from the sensor's image, targets from the clean
    (noise-free) maps.

      depth_from_rgb        inputs: log rgb minus its image mean, in a 5x5 window at
                            spacings of 1, 2 and 4 pixels (the image box-blurred to each
                            spacing), and the pixel's position. Target: log depth,
                            standardised per image (how near the pixel is, for its room).
      orientation_from_rgb  the same inputs. Target: the slope of log depth, (d/du, d/dv)
                            by central differences: the surface's orientation in the
                            scale-free form one image can tell. Shading encodes
                            orientation, not distance, so this is where it shows most.
                            Pixels where log depth jumps by more than 0.1 (an occlusion
                            edge, no slope) are left out.
      rgb_from_depth        inputs: log depth minus its image mean (0 in holes) and the
                            hole mask, on the same windows, and the position. Target: the
                            log luminance, standardised per image.

    Each regressor is an MLP (two hidden layers of 128 ReLUs, Adam, 2000 steps of 512
    pixels; _fit_mlp), fitted on _PROBE_PIXELS pixels per class per image so that rare classes
    (ball, pillar) weigh as much as the walls. Ridge regression on the same windows did
    not find the rgb cues (its depth-from-rgb scores on pillar and ball did not rise from
    cues 0 to 1): they are nonlinear in the pixels (a shading change whose sign depends
    on the light's side, "darker here than around" in a crease).

    score[class] = 1 - sum |y - y_hat|^2 / sum |y - y_image|^2 over the scored pixels of
    that class (void and missing targets left out), where y_image is the image's mean
    target: R² against the class-blind baseline "every pixel is like the image's
    average". 1 = predicted exactly, 0 = no better than the baseline, < 0 = worse (the
    class is mistaken for another). The same scenes at every cue level; the fit's noise
    (seed, which scenes) moves a rare class's score by up to ±0.3. About 45 s per call on
    one CPU core at the defaults.

    What it shows at the defaults (seed 0), cues 0 -> 0.5 -> 1. Depth predicts rgb where
    it did not (rgb_from_depth: pillar -0.82 -> -0.29 -> 0.12, ball -0.01 -> 0.30 -> 0.59,
    disc 0.05 -> 0.44 -> 0.51, poster 0.09 -> 0.53 -> 0.62, wall -0.89 -> -0.13; floor and
    ceiling fall, 0.44 -> 0.19 and 0.76 -> 0.35: shading and contact shadows vary their
    brightness in ways a 17-pixel depth window only partly sees). rgb tells the pillar's
    orientation (orientation_from_rgb 0.01 -> 0.03 -> 0.23: its shaded side faces). How
    near a pixel is (depth_from_rgb) moves by no more than the probe's noise for any
    class (ball -0.11 -> -0.03, pillar 0.18 -> 0.14, disc 0.22 -> 0.23 here; other seeds,
    fitting scenes and image counts gave ball -0.2..+0.5, disc 0.0..+0.4, pillar
    -0.2..+0.1): the pillar's front face is shaded like the wall behind it and its side
    faces like the side walls, and at 64x64 a ball's shading spans few pixels. Over the
    runs we made (with this fit and with an earlier numpy one of the same MLP, which drew
    other pixels and batches), the gains that always held are the pillar's orientation
    (+0.09 or more) and rgb from depth on pillar, ball, disc and poster (+0.4 or more).

    Returns {"depth_from_rgb": {class: score}, "orientation_from_rgb": {...},
    "rgb_from_depth": {...}, "pixels": {class: pixels scored by depth_from_rgb}, "cues",
    "n_images", "size", "split", "seed", "seconds"}.
    """
    t0 = time.perf_counter()
    if not 1 <= n_images <= rooms.SYNTHETIC_LENGTH[split] // 2:
        raise ValueError(f"n_images must be in 1..{rooms.SYNTHETIC_LENGTH[split] // 2} for the {split} split "
                         f"(as many again are fitted on), got {n_images}")
    g = torch.Generator().manual_seed(seed)          # which pixels are fitted on, the fits' draws
    # Fit: class-balanced training pixels from each fitting scene, then one MLP per probe.
    pools = {name: ([], []) for name, _, _ in _PROBES}
    for index in range(n_images, 2 * n_images):
        s = _probe_sample(split, index, size, cues)
        for name, x_key, y_key in _PROBES:
            ok = s[y_key + "_ok"]
            for c in np.unique(s["label"][ok]):
                where = np.flatnonzero(ok & (s["label"] == c))
                where = where[torch.randperm(where.size, generator=g)[:_PROBE_PIXELS].numpy()]
                pools[name][0].append(s[x_key][where])
                pools[name][1].append(s[y_key][where])
    predict = {name: _fit_mlp(np.vstack(x), np.vstack(y), g) for name, (x, y) in pools.items()}
    # Score: per class, the squared error and that of the image-mean baseline.
    C = len(rooms.SYNTHETIC_CLASSES)
    err, base, count = ({name: np.zeros(C) for name, _, _ in _PROBES} for _ in range(3))
    for index in range(n_images):
        s = _probe_sample(split, index, size, cues)
        for name, x_key, y_key in _PROBES:
            ok = s[y_key + "_ok"]
            y, label = s[y_key][ok], s["label"][ok]
            err[name] += np.bincount(label, ((y - predict[name](s[x_key][ok])) ** 2).sum(1), minlength=C)
            base[name] += np.bincount(label, ((y - y.mean(0)) ** 2).sum(1), minlength=C)
            count[name] += np.bincount(label, minlength=C)
    out = {"cues": float(cues), "n_images": n_images, "size": size, "split": split, "seed": seed}
    for name, _, _ in _PROBES:
        out[name] = {c: float(1.0 - err[name][k] / base[name][k]) if count[name][k] else float("nan")
                     for k, c in enumerate(rooms.SYNTHETIC_CLASSES)}
    out["pixels"] = {c: int(count["depth_from_rgb"][k]) for k, c in enumerate(rooms.SYNTHETIC_CLASSES)}
    out["seconds"] = time.perf_counter() - t0
    return out


def _probe_sample(split: str, index: int, size: int, cues: float) -> dict:
    """One scene as cross_modal_predictability reads it: inputs (float32 [H*W, F]), targets
    ([H*W, k]) with their masks of pixels to use, labels; all flat over the pixels."""
    rgb, depth, label, clean = rooms.render_with_clean(split, index, size, float(cues))
    u, v = (a.reshape(-1, 1) for a in np.meshgrid(np.arange(size) / size - 0.5, np.arange(size) / size - 0.5))
    log_rgb = np.log(rgb / 255.0 + 0.02)          # + 0.02: black pixels stay finite
    holes = depth == 0
    log_z = np.log(np.where(holes, 1.0, depth))
    log_z = np.where(holes, 0.0, log_z - log_z[~holes].mean())
    z = np.log(clean["depth"])
    slope = np.zeros((size, size, 2))
    slope[:, 1:-1, 0] = 0.5 * (z[:, 2:] - z[:, :-2])
    slope[1:-1, :, 1] = 0.5 * (z[2:] - z[:-2])
    has_slope = (np.abs(slope) < 0.1).all(-1)
    has_slope[[0, -1]] = has_slope[:, [0, -1]] = False
    luma = np.log(clean["rgb"] @ np.array([0.299, 0.587, 0.114]) + 0.02)
    labelled = label.ravel() != modalities.IGNORE_INDEX
    return {"rgb_in": np.hstack([_windows(log_rgb - log_rgb.mean((0, 1))), u, v]).astype(np.float32),
            "depth_in": np.hstack([_windows(np.stack([log_z, holes], -1)), u, v]).astype(np.float32),
            "label": label.ravel(),
            "depth": ((z - z.mean()) / z.std()).reshape(-1, 1), "depth_ok": labelled,
            "slope": slope.reshape(-1, 2), "slope_ok": labelled & has_slope.ravel(),
            "luma": ((luma - luma.mean()) / (luma.std() + 1e-6)).reshape(-1, 1), "luma_ok": labelled}


def _windows(x: np.ndarray) -> np.ndarray:
    """x [H, W, C] -> [H*W, C * 25 * len(_PROBE_STEPS)]: for each spacing s, the 5x5 window
    of pixels s apart around each pixel, in x box-blurred over (2 (s // 2) + 1)^2 pixels
    (so each sample stands for its stretch of image); edges repeat the border."""
    H, W, C = x.shape
    out = []
    for s in _PROBE_STEPS:
        r = s // 2
        blurred = x
        if r:                             # box blur through an integral image
            padded = np.pad(x, ((r + 1, r), (r + 1, r), (0, 0)), mode="edge")
            cum = padded.cumsum(0).cumsum(1)
            k = 2 * r + 1
            blurred = (cum[k:, k:] - cum[:-k, k:] - cum[k:, :-k] + cum[:-k, :-k]) / (k * k)
        padded = np.pad(blurred, ((2 * s, 2 * s), (2 * s, 2 * s), (0, 0)), mode="edge")
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                out.append(padded[2 * s + dy * s:2 * s + dy * s + H, 2 * s + dx * s:2 * s + dx * s + W])
    return np.concatenate(out, -1).reshape(H * W, -1)


def _fit_mlp(x: np.ndarray, y: np.ndarray, g: torch.Generator, hidden: int = 128,
             steps: int = 2000, batch: int = 512, lr: float = 1e-3):
    """Fit y ~ MLP(x) (two hidden layers of ReLUs, He-initialised, squared error, Adam) on
    [n, features] and [n, targets] arrays, every random draw from `g`; returns predict(x),
    numpy in and out. Inputs and targets are standardised with the training set's
    statistics, predictions returned in the targets' units."""
    x, y = (torch.from_numpy(a.astype(np.float32)) for a in (x, y))
    x_mean, x_std = x.mean(0), x.std(0, correction=0) + 1e-6
    y_mean, y_std = y.mean(0), y.std(0, correction=0) + 1e-6
    xs, ys = (x - x_mean) / x_std, (y - y_mean) / y_std
    # Built on the meta device and initialised from g: the global RNG is left alone.
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden, device="meta"), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, hidden, device="meta"), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, y.shape[1], device="meta")).to_empty(device="cpu")
    for layer in net[::2]:
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=g)
        torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    with _one_thread():
        for _ in range(steps):
            idx = torch.randint(len(xs), (batch,), generator=g)
            loss = F.mse_loss(net(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    def predict(x_new: np.ndarray) -> np.ndarray:
        with torch.no_grad(), _one_thread():
            return (net((torch.from_numpy(x_new) - x_mean) / x_std) * y_std + y_mean).numpy()
    return predict


@contextlib.contextmanager
def _one_thread():
    """torch on one thread inside: the probe's matrices are small, and more threads only wait
    for each other (on a busy 2-core machine two threads made its fit 40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
