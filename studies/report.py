"""studies/report.py — the ablation's rows and how its results are written: the variants of the
paper's Tables 3 and 4 with the paper's NYUDepthV2 numbers, and the writers of
results/ablation.md (tables laid out like the paper's, ordering checks, cost, robustness,
diagnostics) and ablation.png (grouped bars, ± 1 std), and of the studies' results (token
study, cue sweep, regime study).

studies/reproduce.py runs the variants and hands its result dicts here; nothing in this file
trains or evaluates anything, and nothing here draws: the charts' numbers go to util/charts.py.
"""
from __future__ import annotations

import math
import statistics

import modalities
import sttp
from util import charts, rooms
from util.lr_sched import lr_at

# -----------------------------------------------------------------------------
# The variants, and the paper's NYUDepthV2 numbers for them (Tables 3 and 4; mIoU, mAcc)

VARIANTS = {
    #  name        train.py --mode    label in our tables       paper: rgbd, rgb, depth (mIoU, mAcc)
    "baseline":   (None,   "baseline (no pre-training)", ((56.0, 68.7), (46.7, 56.3), (33.8, 44.2))),
    "mim":        ("mim",  "+ MIM",                      ((56.8, 69.9), (47.2, 59.2), (38.9, 50.6))),
    "m2im":       ("m2im", "+ M²IM (pixel-level)",       ((56.8, 70.0), (52.0, 65.9), (42.5, 55.2))),
    "maskmentor": ("sttp", "+ M²IM + STTP (MaskMentor)", ((57.9, 70.4), (53.3, 66.5), (44.0, 56.8))),
    "token":      ("token", "token-level MIM",           ((56.6, 69.2), (50.4, 63.3), (39.5, 50.3))),
    "kd":         ("kd",   "KD + M²IM (separate teacher)", ((56.8, 69.3), (50.7, 65.1), (43.1, 55.8))),
    # Not run by default: MaskMentor given M²IM's epochs, i.e. 4x the optimiser steps (but the
    # same distinct batches), the budget a comparison at equal epochs gives it.
    "maskmentor_epochs": ("sttp", "MaskMentor, M²IM's epochs (4x steps)", ((57.9, 70.4), (53.3, 66.5), (44.0, 56.8))),
    # The regime study's (results/regime/): STTP's schedule without its token loss, and the
    # foundation every "adapt" run starts from (MIM on the rooms' pool split). No paper rows.
    "tw0": ("sttp", "STTP, token weight 0", None),
    "foundation": ("mim", "the foundation (MIM on the pool)", None),
    # The schedule study's (results/schedule/PROTOCOL.md): STTP's schedule taken apart, its
    # token target undiluted and unrepeated, the label shortcut, the dose.
    "m2im_x4": ("m2im_x4", "M²IM x4 per batch (repetition)", None),
    "mix25": ("mix25", "M²IM 1 step in 4, else MIM (dilution)", None),
    "kd_foundation": ("kd", "M²IM + token loss to the frozen foundation", None),
    "self_fresh": ("sttp", "M²IM + token loss to its own complete forward", None),
    "mim_rgbd": ("mim", "MIM without label maps", None),
    "m2im_rgbd": ("m2im", "M²IM without label maps", None),
    "maskmentor_ti1": ("sttp", "MaskMentor, 1 teacher step", None),
    "tw0_ti1": ("sttp", "STTP token weight 0, 1 teacher step", None),
}
# train.py flags a variant adds to its mode (and which the equal-step budget reads: --teacher_iters)
VARIANT_FLAGS = {"tw0": ("--token_weight", "0"), "self_fresh": ("--teacher_iters", "0"),
                 "mim_rgbd": ("--modalities", "rgb,depth"), "m2im_rgbd": ("--modalities", "rgb,depth"),
                 "maskmentor_ti1": ("--teacher_iters", "1"), "tw0_ti1": ("--teacher_iters", "1", "--token_weight", "0")}
# A variant whose frozen teacher is not the first default variant of its objective's `teacher` mode.
VARIANT_TEACHER = {"kd_foundation": "foundation"}
DEFAULT_VARIANTS = ("baseline", "mim", "m2im", "maskmentor", "token", "kd")
EQUAL_EPOCHS = ("maskmentor_epochs",)             # the variants outside the equal-step budget
TABLE3 = ("baseline", "mim", "m2im", "maskmentor", "maskmentor_epochs")
TABLE4 = ("m2im", "token", "kd", "maskmentor")
SETTINGS = tuple(modalities.INPUT_CONDITIONS)     # the three input conditions
CONDITION_NAMES = {"rgbd": "rgb + depth", "rgb": "rgb only", "depth": "depth only"}   # in charts and tables
ROBUST_VARIANTS = ("mim", "maskmentor")           # the checkpoints the robustness table compares
DIAG_IMAGES = 256          # held-out (test-split) images for the pre-training diagnostics
# The objective whose epochs `--main_epochs` counts: every other variant gets as many optimiser
# steps (its own steps per batch, sttp.OBJECTIVES, decide how many epochs that is).
REFERENCE_MODE = "sttp"


def steps_per_batch(mode: str, teacher_iters: int | None = None) -> int:
    """Optimiser steps per batch of a --mode, at the objectives' default settings (the
    teacher iterations reproduce.py runs with) unless `teacher_iters` is given:
    sttp.OBJECTIVES says."""
    cfg = sttp.ObjectiveConfig() if teacher_iters is None else sttp.ObjectiveConfig(teacher_iters=teacher_iters)
    return sttp.OBJECTIVES[mode].steps_per_batch(cfg)


def variant_teacher_iters(variant: str):
    """The --teacher_iters a variant's flags set (VARIANT_FLAGS), else None (the default)."""
    flags = VARIANT_FLAGS.get(variant, ())
    return int(flags[flags.index("--teacher_iters") + 1]) if "--teacher_iters" in flags else None


def pretrain_epochs(mode: str, warmup: int, main: int, teacher_iters: int | None = None) -> int:
    """Total epochs of a variant so that all make the same optimiser steps: the warm-up
    (plain MIM, one step a batch) plus `main` epochs of REFERENCE_MODE-sized work."""
    steps, per_batch = main * steps_per_batch(REFERENCE_MODE), steps_per_batch(mode, teacher_iters)
    if steps % per_batch:
        raise ValueError(f"--mode {mode} makes {per_batch} optimiser steps a batch: {main} {REFERENCE_MODE} "
                         f"epoch(s) ({steps} steps a batch-epoch) are no whole number of its epochs")
    return warmup + steps // per_batch


def variant_epochs(variant: str, warmup: int, main: int) -> int:
    """A variant's pre-training epochs: the equal-step budget, except for EQUAL_EPOCHS."""
    if variant in EQUAL_EPOCHS:
        return pretrain_epochs("m2im", warmup, main)
    return pretrain_epochs(VARIANTS[variant][0], warmup, main, variant_teacher_iters(variant))


def teacher_variant(variant: str):
    """The variant whose pre-training is `variant`'s frozen teacher (kd: the mim run of the
    same seed; VARIANT_TEACHER's), or None: the first default variant run with the
    objective's `teacher` mode."""
    if variant in VARIANT_TEACHER:
        return VARIANT_TEACHER[variant]
    mode = VARIANTS[variant][0]
    wanted = mode and sttp.OBJECTIVES[mode].teacher
    return next((v for v in DEFAULT_VARIANTS if wanted and VARIANTS[v][0] == wanted), None)


# -----------------------------------------------------------------------------
# Summaries: mean ± std over seeds, the tables, the chart


def mean_std(values: list) -> tuple:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def by_variant(results: list) -> dict:
    """The result dicts grouped per variant, in VARIANTS' order and by seed."""
    out = {}
    for r in sorted(results, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"])):
        out.setdefault(r["variant"], []).append(r)
    return out


def summarise(results: list) -> dict:
    out = {}
    for v, runs in by_variant(results).items():
        conds = {}
        for c in runs[0]:
            # the input conditions: "clean" and the degradations (test), and "val" (validation)
            if isinstance(runs[0][c], dict) and c not in ("pretrain", "finetune", "diagnostics", "token"):
                conds[c] = {s: {k: mean_std([r[c][s][k] for r in runs]) for k in ("miou", "macc")}
                            for s in runs[0][c]}
        out[v] = {"seeds": [r["seed"] for r in runs], **conds,
                  "pretrain_steps": sorted({r["pretrain"]["steps"] for r in runs if r["pretrain"]}),
                  "pretrain_images": sorted({r["pretrain"]["images"] for r in runs if r["pretrain"]}),
                  "finetune_steps": sorted({r["finetune"]["steps"] for r in runs}),
                  "pretrain_seconds": mean_std([r["pretrain"]["seconds"] for r in runs]) if runs[0]["pretrain"] else None}
    return out


def _nanmean(values: list) -> float:
    ok = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(ok) if ok else math.nan


def summarise_diagnostics(results: list) -> dict:
    """The runs' diagnostics (see "Diagnostics" above), averaged over seeds, per variant."""
    out = {"per_class_iou": {}, "pretrain": {}, "finetune_log": {}}
    for v, runs in by_variant(results).items():
        out["per_class_iou"][v] = {s: [_nanmean([r["clean"][s]["per_class_iou"][c] for r in runs])
                                       for c in range(len(runs[0]["clean"][s]["per_class_iou"]))]
                                   for s in SETTINGS}
        diags = [r["diagnostics"] for r in runs]
        out["finetune_log"][v] = {k: _nanmean([d["finetune_log"][k] for d in diags])
                                  for k in ("last", "last_epoch_drop", "last_epoch_steps")}
        pre = [d["pretrain"] for d in diags if d["pretrain"]]
        if pre:
            log_keys = [k for k in pre[0]["train_log"] if all(k in p["train_log"] for p in pre)]
            out["pretrain"][v] = {
                "train_log": {k: _nanmean([p["train_log"][k] for p in pre]) for k in log_keys},
                "reconstruction": {c: {k: _nanmean([p["reconstruction"][c][k] for p in pre]) for k in terms}
                                   for c, terms in pre[0]["reconstruction"].items()},
                "tokens": {k: _nanmean([p["tokens"][k] for p in pre]) for k in pre[0]["tokens"]}}
    return out


def _diagnostics_markdown(diag: dict) -> list:
    L = ["## Diagnostics: the checks behind the tables", "",
         "Means over seeds. They answer, in order: is the data really complementary, are the budgets "
         "equal (the Budgets table below: counted), does pre-training converge, is the teacher's "
         "token signal about the image, and does M²IM learn what it is meant to (predict a missing "
         "modality from the other)?", ""]
    pci = diag["per_class_iou"]
    shown = [v for v in ("baseline", "mim", "maskmentor") if v in pci]
    if shown:
        L += ["### Complementarity: per-class IoU from rgb alone and depth alone", "",
              "`needs` is what data.py builds each class to need. A class that needs depth should score far "
              "lower from rgb alone than from depth alone, and the other way round.", "",
              "| class | needs | " + " | ".join(f"{v}: rgb only | {v}: depth only" for v in shown) + " |",
              "|---|---|" + "---|---|" * len(shown)]
        for c, name in enumerate(rooms.SYNTHETIC_CLASSES):
            cells = [f"{pci[v][s][c]:.1f}" for v in shown for s in ("rgb", "depth")]
            L.append(f"| {name} | {rooms.SYNTHETIC_CUE[name]} | " + " | ".join(cells) + " |")
        L.append("")
    pre = diag["pretrain"]
    if pre:
        L += ["### Convergence: training losses", "",
              "Pixel loss of the pre-training (on complete input where the run has it, i.e. STTP's teacher "
              "steps; on Algorithm 1 input for m2im and kd), first and last epoch, and how much the last "
              "epoch still lowered it (relative) in how many optimiser steps; the same for fine-tuning's cross-entropy.", "",
              "| variant | pre-training loss first → last | last epoch's drop, in steps | final token loss (training) "
              "| fine-tuning loss, last | last epoch's drop, in steps |", "|---|---|---|---|---|---|"]
        for v in VARIANTS:
            ft = diag["finetune_log"].get(v)
            ftc = f"{ft['last']:.3f} | {100 * ft['last_epoch_drop']:.1f} % in {ft['last_epoch_steps']:.0f}" if ft else "— | —"
            if v in pre:
                t = pre[v]["train_log"]
                tok = f"{t['token_last']:.4f}" if "token_last" in t else "—"
                L.append(f"| {v} | {t['first']:.3f} → {t['last']:.3f} | {100 * t['last_epoch_drop']:.1f} % in "
                         f"{t['last_epoch_steps']:.0f} | {tok} | {ftc} |")
            elif ft:
                L.append(f"| {v} | — | — | — | {ftc} |")
        L += ["", "### The teacher's token signal, on held-out images", "",
              f"1 − cos between a student pass (Algorithm 1 input) and a teacher pass (complete input) of the same "
              f"network on {DIAG_IMAGES} test images: for the same images (matched) and against other images' "
              "teacher tokens; raw, and centred (the teacher's mean token at each position removed). Where the raw "
              "loss for the wrong image is barely above the matched one, most of what the cosine compares is "
              "shared by all images; the centred numbers show the image-specific part.", "",
              "| variant | raw: matched | raw: other image | centred: matched | centred: other image |",
              "|---|---|---|---|---|"]
        for v in VARIANTS:
            if v in pre:
                t = pre[v]["tokens"]
                L.append(f"| {v} | {t['raw_matched']:.4f} | {t['raw_other_image']:.4f} | "
                         f"{t['centred_matched']:.3f} | {t['centred_other_image']:.3f} |")
        L += ["", "### What pre-training learned: held-out reconstruction from one modality", "",
              f"Pixel losses on {DIAG_IMAGES} test images with the kept modalities fixed (each run's own patch "
              "masking on what is kept). Under \"rgb only\" all of depth is hidden, so its depth L1 is depth "
              "*predicted from rgb*; under \"depth only\" the rgb MSE is rgb predicted from depth. This is "
              "the skill M²IM is designed to add over MIM. Lower is better.", "",
              "| variant | depth L1 from rgb only | rgb MSE from depth only | semseg CE from rgb only | "
              "semseg CE from depth only | complete input: rgb MSE | depth L1 |", "|---|---|---|---|---|---|---|"]
        for v in VARIANTS:
            if v in pre:
                r = pre[v]["reconstruction"]
                L.append(f"| {v} | {r['rgb only']['depth']:.3f} | {r['depth only']['rgb']:.3f} | "
                         f"{r['rgb only']['semseg']:.3f} | {r['depth only']['semseg']:.3f} | "
                         f"{r['complete input']['rgb']:.3f} | {r['complete input']['depth']:.3f} |")
        L.append("")
    return L


def _pm(ms: tuple) -> str:
    return f"{ms[0]:.1f} ± {ms[1]:.1f}"


def _table(summary: dict, rows, label_of) -> list:
    head = "| variant | rgb+depth mIoU | mAcc | rgb only mIoU | mAcc | depth only mIoU | mAcc | paper NYU mIoU (rgbd / rgb / depth) |"
    lines = [head, "|" + "---|" * 8]
    for v in rows:
        if v not in summary:
            continue
        paper = VARIANTS[v][2]
        cells = [_pm(summary[v]["clean"][s][k]) for s in SETTINGS for k in ("miou", "macc")]
        lines.append(f"| {label_of(v)} | " + " | ".join(cells) + f" | {' / '.join(str(p[0]) for p in paper)} |")
    return lines


def ordering_checks(summary: dict) -> list:
    """The paper's claims as comparisons of our means, with the gap in pooled stds."""
    claims = [("m2im", "mim", "M²IM > MIM"), ("maskmentor", "m2im", "STTP > M²IM"),
              ("maskmentor", "mim", "MaskMentor > MIM"), ("maskmentor", "token", "pixel + token > token only"),
              ("maskmentor", "kd", "self-teaching > separate teacher"), ("mim", "baseline", "MIM > no pre-training"),
              ("maskmentor_epochs", "m2im", "STTP > M²IM at equal epochs (4x steps)")]
    lines = ["| claim | rgb+depth | rgb only | depth only |", "|---|---|---|---|"]
    for a, b, text in claims:
        if a not in summary or b not in summary:
            continue
        cells = []
        for s in SETTINGS:
            (ma, sa), (mb, sb) = summary[a]["clean"][s]["miou"], summary[b]["clean"][s]["miou"]
            pooled = math.sqrt((sa ** 2 + sb ** 2) / 2)
            gap = f", {(ma - mb) / pooled:+.1f} σ" if pooled > 0 else ""
            cells.append(f"{'yes' if ma > mb else '**no**'} ({ma - mb:+.1f}{gap})")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(cfg, summary: dict, cost: dict, meta: dict, path: str, diag: dict = None) -> None:
    n, S = cfg.seeds, steps_per_batch(REFERENCE_MODE)
    L = [f"# MaskMentor ablations at toy scale (`python studies/reproduce.py{' --quick' if cfg.quick else ''}`)", "",
         f"Synthetic RGB-D rooms (data.py), tiny model, {n} seed(s), mean ± std (sample std over seeds) of mIoU / "
         f"mAcc on {cfg.test_images} test images. Pre-training: {cfg.pretrain_images} images, batch {cfg.batch_size}, "
         f"{cfg.warmup_epochs} MIM warm-up epoch(s) + {cfg.main_epochs} STTP epochs, or {S}x that many epochs of a "
         f"one-step objective — the same optimiser steps and images for every variant (table at the end)"
         f"{f', except maskmentor_epochs: M²IM' + chr(39) + f's epochs, {S}x the steps' if 'maskmentor_epochs' in summary else ''}. "
         f"Fine-tuning: the first {cfg.finetune_images} training images, {cfg.finetune_epochs} epochs, random "
         f"rgb-only / depth-only / both per sample. Wall time of this invocation: {meta['wall_minutes']:.1f} min "
         f"({meta['runs_reused']} of {meta['runs']} runs reused from an earlier invocation) on {meta['machine']}; "
         f"the runs themselves took {meta['run_minutes']:.1f} min of one core each, added up.",
         "", "The paper's columns are NYUDepthV2 with ViT-B and 500 + 500 epochs: compare the *ordering* of the "
         "rows, not the numbers.", "",
         "## Table 3: M²IM and STTP", "", *_table(summary, TABLE3, lambda v: VARIANTS[v][1]), "",
         "## Table 4: self-teaching and token/pixel supervision", "",
         *_table(summary, TABLE4, lambda v: {"m2im": "pixel-level MIM (M²IM)"}.get(v, VARIANTS[v][1])), "",
         "## Does the paper's ordering appear? (mIoU difference, and in pooled seed stds)", "",
         *ordering_checks(summary), ""]
    if cost:
        pb, wr = cost["per_batch_s"], cost["whole_ratio"]
        L += ["## Cost of pre-training (measured side by side in this run)", "",
              f"One batch of {cost['batch_size']} images, tiny model, {cost['threads']} thread(s), median of "
              "interleaved repeats:", "",
              "| objective | s / batch | vs MIM per batch | optimiser steps / batch | vs MIM per step |", "|---|---|---|---|---|",
              *[f"| {m} | {pb[m]:.3f} | {cost['per_batch_ratio'][m]:.2f}x | {steps_per_batch(m.split()[0])} | "
                f"{cost['per_step_ratio'][m]:.2f}x |" for m in pb], "",
              "Whole pre-training at this script's equal budgets (from the per-batch times): "
              + ", ".join(f"{k} {wr[k]:.2f}x" for k in wr) + " of MIM. kd pays for its teacher's pre-training "
              "and a teacher forward pass per step; STTP's token targets come from its own last teacher step, free.", ""]
    robust = [v for v in ROBUST_VARIANTS if v in summary and len(summary[v]) > 0 and "depth holes 10%" in summary[v]]
    if robust:
        L += ["## Robustness: degraded inputs (beyond the paper)", "",
              "mIoU with rgb+depth and with the degraded modality alone; the same corrupted images for every model.", "",
              "| condition | " + " | ".join(f"{VARIANTS[v][1]}: {s}" for v in robust for s in ("rgb+depth", "alone")) + " |",
              "|---|" + "---|" * (2 * len(robust))]
        conditions = [c for c, x in summary[robust[0]].items() if isinstance(x, dict) and c != "val"]  # clean first
        for cond in conditions:
            cells = []
            for v in robust:
                mod = None if cond == "clean" else cond.split()[0]        # "depth holes 10%": depth
                cells.append(_pm(summary[v][cond]["rgbd"]["miou"]))
                cells.append("—" if mod is None else f"{mod}: {_pm(summary[v][cond][mod]['miou'])}")
            L.append(f"| {cond} | " + " | ".join(cells) + " |")
        L.append("")
    if diag:
        L += _diagnostics_markdown(diag)
    L += ["## Budgets (counted during the runs)", "",
          "| variant | optimiser steps | images seen | fine-tuning steps | pre-training wall time, s (parallel runs) |",
          "|---|---|---|---|---|"]
    for v, s in summary.items():
        secs = _pm(s["pretrain_seconds"]) if s["pretrain_seconds"] else "—"
        L.append(f"| {v} | {', '.join(map(str, s['pretrain_steps'])) or '—'} | "
                 f"{', '.join(map(str, s['pretrain_images'])) or '—'} | {', '.join(map(str, s['finetune_steps']))} | {secs} |")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def ablation_chart(summary: dict, path: str, title: str) -> None:
    """results/ablation.png: grouped bars, input condition x variant, mean mIoU ± 1 std."""
    bars = {VARIANTS[v][1]: [summary[v]["clean"][s]["miou"] for s in SETTINGS] for v in VARIANTS if v in summary}
    charts.bar_chart([CONDITION_NAMES[s] for s in SETTINGS], bars, path, title, "mIoU")


# -----------------------------------------------------------------------------
# The token study (studies/reproduce.py --study token): one factor at a time, chosen on validation


def study_score(run: dict) -> float:
    """The selection score of one run: the mean of its validation mIoU from rgb only and
    from depth only (the missing-modality conditions the token loss is meant to help)."""
    return (run["val"]["rgb"]["miou"] + run["val"]["depth"]["miou"]) / 2


def study_scores(results: list) -> dict:
    """Per configuration (a run's "name"): the score's mean and std over seeds, validation
    and test mIoU per input condition, and the token diagnostics, averaged over seeds."""
    groups = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        groups.setdefault(r["name"], []).append(r)
    out = {}
    for name, runs in groups.items():
        tok = [r["diagnostics"]["pretrain"]["tokens"] for r in runs]
        out[name] = {"seeds": [r["seed"] for r in runs], "score": mean_std([study_score(r) for r in runs]),
                     "val": {s: mean_std([r["val"][s]["miou"] for r in runs]) for s in SETTINGS},
                     "test": {s: mean_std([r["clean"][s]["miou"] for r in runs]) for s in SETTINGS},
                     "grad_share": mean_std([t["grad_share"] for t in tok]),
                     "centred_matched": mean_std([t["centred_matched"] for t in tok]),
                     "centred_other_image": mean_std([t["centred_other_image"] for t in tok]),
                     "token_last": mean_std([r["diagnostics"]["pretrain"]["train_log"].get("token_last", math.nan)
                                             for r in runs])}
    return out


def pooled_std(a: tuple, b: tuple) -> float:
    return math.sqrt((a[1] ** 2 + b[1] ** 2) / 2)


def select(names: list, per_config: dict, costs: dict, cost_tolerance: float = 0.05) -> str:
    """The selection rule of results/token_study/PROTOCOL.md: the highest validation score
    (study_score, mean over seeds) wins, but every configuration whose score is less than
    one pooled std (pooled_std of the two) below the best's is a candidate too, and among
    the candidates the cheapest wins (cost: seconds per STTP batch; costs within
    `cost_tolerance` of the cheapest count as equal); among equally cheap ones, the best score."""
    best = max(names, key=lambda n: per_config[n]["score"][0])
    top = per_config[best]["score"]
    candidates = [n for n in names if n == best or top[0] - per_config[n]["score"][0] < pooled_std(top, per_config[n]["score"])]
    cheapest = min(costs[n] for n in candidates)
    cheap = [n for n in candidates if costs[n] <= cheapest * (1 + cost_tolerance)]
    return max(cheap, key=lambda n: per_config[n]["score"][0])


def write_token_study(study: dict, path: str) -> None:
    """results/token_study/token_study.md: the one-factor table on validation, the choice, the
    test table beside the first reading's, the cost of each target, the diagnostics."""
    pc, costs, cfg = study["per_config"], study["costs"], study["config"]
    first = "maskmentor"
    names = list(pc)
    L = ["# The STTP token target, positions and normalisation: one factor at a time "
         "(`python studies/reproduce.py --study token`)", "",
         f"MaskMentor (STTP) at the ablation's recipe: {cfg['pretrain_images']} pre-training images, batch "
         f"{cfg['batch_size']}, {cfg['warmup_epochs']} MIM warm-up epoch(s) + {cfg['main_epochs']} STTP epochs "
         f"(equal optimiser steps for every configuration), {cfg['finetune_epochs']} fine-tuning epochs; "
         f"{cfg['seeds']} seeds; validation: the first {cfg['val_images']} images of the synthetic val split, "
         f"test: the first {cfg['test_images']} of the test split. The protocol and the selection rule were "
         "written before the first run: [PROTOCOL.md](PROTOCOL.md).", "",
         "## Validation (the choice is made here)", "",
         "Score = mean of rgb-only and depth-only validation mIoU; mean ± std over seeds. "
         "Cost = seconds per STTP batch, relative to the first reading.", "",
         "| configuration | score | rgb+depth | rgb only | depth only | cost | token grad / pixel grad | "
         "centred 1-cos: same / other image |", "|---|---|---|---|---|---|---|---|"]
    for n in names:
        c = pc[n]
        L.append(f"| {n} | {_pm(c['score'])} | " + " | ".join(_pm(c['val'][s]) for s in SETTINGS) +
                 f" | {costs[n] / costs[first]:.2f}x | {c['grad_share'][0]:.3f} | "
                 f"{c['centred_matched'][0]:.3f} / {c['centred_other_image'][0]:.3f} |")
    factors = ("token_target", "token_positions", "token_norm")
    L += ["", "Best level of each factor (by the rule, among the first reading and that factor's levels): " +
          ", ".join(f"{f} → {b}" for f, b in zip(factors, study["factor_best"])) +
          f"; their combination: `{study['combination']}`.", "",
          f"**Chosen (the rule over every configuration above): `{study['chosen']}`.**", "",
          "## Test (reported, not used for the choice)", "",
          "| configuration | rgb+depth | rgb only | depth only |", "|---|---|---|---|"]
    for n in names:
        mark = " (chosen)" if n == study["chosen"] else (" (first reading)" if n == first else "")
        L.append(f"| {n}{mark} | " + " | ".join(_pm(pc[n]['test'][s]) for s in SETTINGS) + " |")
    cost = study["cost"]
    L += ["", "## Cost of each target (measured side by side, median of interleaved repeats)", "",
          "| objective | s / batch | vs an STTP batch |", "|---|---|---|",
          *[f"| {m} | {cost['per_batch_s'][m]:.3f} | {cost['per_batch_s'][m] / cost['per_batch_s']['sttp']:.2f}x |"
            for m in cost["per_batch_s"]], "",
          f"Wall time {study['meta']['wall_minutes']:.1f} min for {study['meta']['runs']} runs "
          f"({study['meta']['machine']}).", ""]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


# -----------------------------------------------------------------------------
# The cue sweep (studies/reproduce.py --study cues): does M²IM help when the rooms have cues?

# The classes that differ from their surroundings by one modality only (rooms.SYNTHETIC_CUE),
# and the modality each lacks without cues.
ONE_MODALITY_CLASSES = {"rug": "rgb", "poster": "rgb", "pillar": "depth", "ball": "depth"}
CUE_DIFFERENCES = (("m2im", "mim", "M²IM − MIM"), ("maskmentor", "m2im", "MaskMentor − M²IM"))


def difference(summary: dict, a: str, b: str, setting: str, n: int) -> tuple:
    """(mean of a − mean of b, the std of that difference of means: sqrt((σa² + σb²) / n))."""
    (ma, sa), (mb, sb) = summary[a]["clean"][setting]["miou"], summary[b]["clean"][setting]["miou"]
    return ma - mb, math.sqrt((sa ** 2 + sb ** 2) / n)


def write_cues(sweep: dict, path: str, png: str) -> None:
    """results/cues/cues.md and cues.png: predictability, mIoU per level and variant, the
    differences with their σ, the one-modality classes' IoU."""
    levels, cfg = sweep["levels"], sweep["config"]
    n = cfg["seeds"]
    classes = list(rooms.SYNTHETIC_CLASSES)
    L = ["# Cross-modal cues in the synthetic rooms (`python studies/reproduce.py --study cues`)", "",
         f"MIM, M²IM and MaskMentor (token settings: {cfg['token_target']}, {cfg['token_positions']}, "
         f"{cfg['token_norm']}) pre-trained, fine-tuned and evaluated on rooms at cue levels "
         f"{', '.join(levels)}; {n} seeds; the ablation's recipe and counted budgets ({cfg['pretrain_images']} "
         f"pre-training images, batch {cfg['batch_size']}, {cfg['warmup_epochs']} + {cfg['main_epochs']} STTP-sized "
         f"epochs, {cfg['finetune_epochs']} fine-tuning epochs); test: the first {cfg['test_images']} test images "
         "at the same cue level. Protocol, written before the first run: [PROTOCOL.md](PROTOCOL.md).", "",
         "## What the knob does, before any training", "",
         "Held-out R² of a small regressor per class (1 = exact, 0 = no better than the image's mean; "
         "diagnostics.cross_modal_predictability): how well one modality predicts the other.", ""]
    pred = sweep["predictability"]
    for kind in ("depth_from_rgb", "orientation_from_rgb", "rgb_from_depth"):
        L += [f"**{kind.replace('_', ' ')}**", "", "| cues | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
        for x, p in pred.items():
            L.append(f"| {x} | " + " | ".join(f"{p[kind].get(c, math.nan):.2f}" for c in classes) + " |")
        L.append("")
    L += ["## mIoU (test), mean ± std over seeds", "",
          "| cues | variant | rgb + depth | rgb only | depth only |", "|---|---|---|---|---|"]
    for x, lv in levels.items():
        for v, s in lv["summary"].items():
            L.append(f"| {x} | {VARIANTS[v][1]} | " + " | ".join(_pm(s['clean'][st]['miou']) for st in SETTINGS) + " |")
    L += ["", "## The differences the paper claims, against cue strength", "",
          f"Mean difference ± its σ (sqrt((σa² + σb²)/{n})); **bold** where it exceeds its σ.", "",
          "| cues | " + " | ".join(f"{label}, {st}" for _, _, label in CUE_DIFFERENCES for st in ("rgb only", "depth only"))
          + " |", "|---|" + "---|" * 4]
    panels = {f"{st} only: mIoU difference": {} for st in ("rgb", "depth")}        # the chart's
    for x, lv in levels.items():
        cells = []
        for a, b, label in CUE_DIFFERENCES:
            for st in ("rgb", "depth"):
                d, e = difference(lv["summary"], a, b, st, n)
                panels[f"{st} only: mIoU difference"].setdefault(label, []).append((float(x), d, e))
                cells.append(f"**{d:+.1f} ± {e:.1f}**" if abs(d) > e else f"{d:+.1f} ± {e:.1f}")
        L.append(f"| {x} | " + " | ".join(cells) + " |")
    L += ["", "![differences against cue strength](cues.png)", "",
          "## The classes one modality alone lacks", "",
          "IoU, mean over seeds, from rgb only and from depth only (rug and poster need rgb, pillar and ball "
          "need depth without cues).", "",
          "| cues | variant | " + " | ".join(f"{c} ({s})" for c in ONE_MODALITY_CLASSES for s in ("rgb", "depth")) + " |",
          "|---|---|" + "---|" * (2 * len(ONE_MODALITY_CLASSES))]
    for x, lv in levels.items():
        for v, per in lv["per_class_iou"].items():
            cells = [f"{per[s][classes.index(c)]:.1f}" for c in ONE_MODALITY_CLASSES for s in ("rgb", "depth")]
            L.append(f"| {x} | {VARIANTS[v][1]} | " + " | ".join(cells) + " |")
    meta = sweep["meta"]
    L += ["", f"Wall time {meta['wall_minutes']:.1f} min for {meta['runs']} runs ({meta['machine']}).", ""]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    charts.line_chart(panels, png, ("cues 0", "cues 1"))


# -----------------------------------------------------------------------------
# The regime study (studies/reproduce.py --study regime): scratch against adapting a foundation


def regime_score(run: dict) -> float:
    """The pilot's score of one run: the mean of its validation mIoU over the three input
    conditions (results/regime/PROTOCOL.md: it does not look at differences between variants)."""
    return statistics.fmean(run["val"][s]["miou"] for s in SETTINGS)


def choose_pilot_lr(results: list, lrs) -> float:
    """The protocol's rule: the adapt-regime pre-training lr whose pilot runs (mim and m2im,
    jointly fine-tuned) have the highest mean score; within 0.1 of the best, the smaller lr."""
    scores = pilot_scores(results, lrs)
    best = max(scores.values())
    return min(lr for lr, sc in scores.items() if sc >= best - 0.1)


def pilot_scores(results: list, lrs) -> dict:
    """{lr: mean regime_score} over the pilot's runs: adapt regime, mim and m2im, joint."""
    return {lr: statistics.fmean(regime_score(r) for r in results if r["regime"] == "adapt" and r["lr"] == lr
                                 and r["variant"] in ("mim", "m2im") and r["inputs"] == "any"
                                 and not r["layer_decay"])
            for lr in lrs}


def integrated_lr(mode: str, warmup_epochs: int, epochs: int, batches: int, lr: float, min_lr: float,
                  lr_warmup_epochs: float, schedule: str) -> dict:
    """What a pre-training's learning-rate schedule gives it, computed from the schedule
    (util/engine.Loop's two clocks) and the objective's declared steps (sttp.OBJECTIVES): the
    optimiser steps and the sum of their lr, over all steps and over the steps that see
    Algorithm 1 input. `schedule` "batches": lr_at of the batch position; "steps": of the
    optimiser step position (train.py --lr_schedule). studies/reproduce.py's BudgetCounter counts the
    same during the runs."""
    cfg = sttp.ObjectiveConfig()
    per = lambda e: 1 if e < warmup_epochs else sttp.OBJECTIVES[mode].steps_per_batch(cfg)
    missing = lambda e: () if e < warmup_epochs else sttp.OBJECTIVES[mode].missing_modality_steps(cfg)
    position = lambda e, b: sum(batches * per(i) for i in range(e)) + b * per(e)
    by_steps = schedule == "steps"
    total = position(epochs, 0) if by_steps else epochs * batches
    warm = int(lr_warmup_epochs * batches)
    warm = position(*divmod(warm, batches)) if by_steps else warm
    out = {"steps": 0, "lr": 0.0, "missing_steps": 0, "missing_lr": 0.0}
    for e in range(epochs):
        for b in range(batches):
            for k in range(per(e)):
                x = lr_at(position(e, b) + k if by_steps else e * batches + b, total, warm, lr, min_lr)
                out["steps"] += 1
                out["lr"] += x
                if k in missing(e):
                    out["missing_steps"] += 1
                    out["missing_lr"] += x
    return out


def integrated_lr_table(variants, warmup_epochs: int, main_epochs: int, batches: int, lr_warmup_epochs: float) -> dict:
    """{variant: {schedule: integrated_lr at a peak lr of 1}}: Σ lr in units of steps at the
    peak lr, for the equal-step budgets (variant_epochs) under both schedules."""
    return {v: {sch: integrated_lr(VARIANTS[v][0], warmup_epochs, variant_epochs(v, warmup_epochs, main_epochs),
                                   batches, 1.0, 0.0, lr_warmup_epochs, sch) for sch in ("batches", "steps")}
            for v in variants}


REGIME_CONTRASTS = (("m2im", "mim", "M²IM − MIM"), ("maskmentor", "m2im", "MaskMentor − M²IM"),
                    ("maskmentor", "tw0", "MaskMentor − tw0"))


def runs_of(results: list, **match) -> dict:
    """{seed: run} of the runs whose fields equal `match` (variant, regime, lr, inputs,
    layer_decay; inputs "any" and layer_decay 0 unless given)."""
    match = {"inputs": "any", "layer_decay": 0.0, **match}
    return {r["seed"]: r for r in results if all(r.get(k) == v for k, v in match.items())}


def paired(a: dict, b: dict, setting: str) -> dict:
    """Per-seed differences a − b of test mIoU (the seeds both have), their mean ± sd, the
    half-width of the mean's 95 % confidence interval (Student t, n − 1 degrees of freedom)
    and whether that interval excludes 0 (the protocol's "clear")."""
    return contrast([(1, a), (-1, b)], setting)


def test_miou(run: dict, setting: str) -> float:
    return run["clean"][setting]["miou"]


def contrast(terms: list, setting: str, value=test_miou) -> dict:
    """paired() for any signed sum of arms: terms [(sign, {seed: run}), ...], per seed
    Σ sign · value(run, setting) over the seeds every arm has (e.g. an interaction
    a − b − c + d)."""
    from scipy.stats import t
    seeds = sorted(set.intersection(*(set(runs) for _, runs in terms)))
    diffs = [sum(sign * value(runs[s], setting) for sign, runs in terms) for s in seeds]
    m, sd = mean_std(diffs) if diffs else (math.nan, math.nan)
    half = float(t.ppf(0.975, len(diffs) - 1)) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    return {"seeds": seeds, "diffs": diffs, "mean": m, "sd": sd, "ci95": half, "clear": abs(m) > half}


def _diff_cell(d: dict) -> str:
    if not d["diffs"]:
        return "—"
    text = f"{d['mean']:+.2f} ± {d['sd']:.2f}"
    ci = f" (95 % CI ±{d['ci95']:.2f})" if math.isfinite(d["ci95"]) else ""
    return f"**{text}**{ci} clear" if d["clear"] else f"{text}{ci}"


def _miou_cell(runs: dict, setting: str) -> str:
    values = [r["clean"][setting]["miou"] for r in runs.values() if setting in r["clean"]]
    return _pm(mean_std(values)) + f" (n={len(values)})" if values else "—"


def run_seconds(runs: list) -> float:
    """The runs' own time, summed: pre-training (none for the baseline), fine-tuning, evaluation."""
    return sum(r[st]["seconds"] for r in runs for st in ("pretrain", "finetune") if r[st]) + \
        sum(r["eval_seconds"] for r in runs)


def write_regime(study: dict, path: str, png: str) -> None:
    """results/regime/regime.md and regime.png: the pilot and its choice, the foundation, then
    each row of the protocol with paired differences per seed, the integrated lr, every run."""
    R, cfg, lr_a = study["runs"], study["config"], study["chosen_lr"]
    regimes = {"adapt": dict(regime="adapt", lr=lr_a), "scratch": dict(regime="scratch", lr=0.0)}
    variant = lambda v, reg, **kw: runs_of(R, variant=v, **({**regimes[reg], "lr": 0.0} if v == "baseline"
                                                            else regimes[reg]), **kw)
    L = ["# Scratch against adaptation, joint against dedicated (`python studies/reproduce.py --study regime`)", "",
         f"Protocol, written before the first run: [PROTOCOL.md](PROTOCOL.md). Synthetic rooms, tiny model; "
         f"pre-training {cfg['pretrain_images']} images, batch {cfg['batch_size']}, {cfg['warmup_epochs']} MIM warm-up "
         f"epoch(s) + {cfg['main_epochs']} STTP-sized epochs for every variant, the lr schedule indexed by optimiser "
         f"steps; fine-tuning {cfg['finetune_images']} images, {cfg['finetune_epochs']} epochs; test = the first "
         f"{cfg['test_images']} test images, validation = the first {cfg['val_images']} val images. The foundation "
         f"(one per seed): MIM on {cfg['foundation_images']} pool scenes, batch {cfg['foundation_batch']}, "
         f"{cfg['foundation_epochs']} epochs. Differences are paired by seed: mean ± sd over seeds; **clear** = the "
         f"95 % confidence interval of the mean (Student t, n − 1 degrees of freedom) excludes 0.", "",
         "## Step 0: the adapt regime's pre-training lr, chosen on validation", "",
         "| lr | mim: val mIoU (mean of the 3 conditions) | m2im | score |", "|---|---|---|---|"]
    pilot_seeds = 2                            # the protocol's pilot: seeds 0 and 1, as the rule used them
    scores = pilot_scores([r for r in R if r["seed"] < pilot_seeds], study["pilot_lrs"])
    for lr in study["pilot_lrs"]:
        cells = [_pm(mean_std([regime_score(r) for s, r in runs_of(R, variant=v, regime="adapt", lr=lr).items()
                               if s < pilot_seeds])) for v in ("mim", "m2im")]
        L.append(f"| {lr:g}{' (chosen)' if lr == lr_a else ''} | {cells[0]} | {cells[1]} | {scores[lr]:.2f} |")
    L += ["", "## The foundation: its MIM loss", "",
          "| seed | pixel loss, first → last epoch | last epoch's drop |", "|---|---|---|"]
    for s, f in enumerate(study["foundation"]):
        L.append(f"| {s} | {f['first']:.3f} → {f['last']:.3f} | {100 * f['last_epoch_drop']:.1f} % |")
    settings = ("rgb", "depth", "rgbd")
    label = CONDITION_NAMES
    # regime.png: each contrast's mean with whiskers of its 95 % confidence interval (the rule
    # that calls a difference clear), a panel per regime; a single seed has no interval
    panels = {"adapt": {}, "scratch": {}, "frozen": {}}
    ci95 = lambda d: (d["mean"], d["ci95"]) if len(d["diffs"]) > 1 else None
    for reg, title in (("adapt", "The paper's regime: adapting the foundation"),
                       ("scratch", "Today's regime: from scratch (step schedule)")):
        L += ["", f"## {title}", "", "Test mIoU, mean ± sd over seeds.", "",
              "| variant | " + " | ".join(label[s] for s in settings) + " |", "|---|---|---|---|"]
        for v in ("baseline", "mim", "m2im", "maskmentor", "tw0"):
            runs = variant(v, reg)
            if runs:
                name = "none (the foundation as it is)" if v == "baseline" and reg == "adapt" else VARIANTS[v][1]
                L.append(f"| {name} | " + " | ".join(_miou_cell(runs, s) for s in settings) + " |")
        L += ["", "| paired difference | " + " | ".join(label[s] for s in settings) + " |", "|---|---|---|---|"]
        for a, b, text in REGIME_CONTRASTS + (("mim", "baseline", "MIM − none"),):
            ds = [paired(variant(a, reg), variant(b, reg), s) for s in settings]
            panels[reg][text] = [ci95(d) for d in ds]
            L.append(f"| {text} | " + " | ".join(_diff_cell(d) for d in ds) + " |")
        L += ["", f"Headroom: dedicated models against the joint one (mim, {reg} regime).", "",
              "| | rgb only | depth only |", "|---|---|---|"]
        joint = variant("mim", reg)
        ded = {i: variant("mim", reg, inputs=i) for i in ("rgb", "depth")}
        L.append("| joint model | " + " | ".join(_miou_cell(joint, s) for s in ("rgb", "depth")) + " |")
        L.append("| dedicated model | " + " | ".join(_miou_cell(ded[s], s) for s in ("rgb", "depth")) + " |")
        L.append("| headroom (dedicated − joint) | " +
                 " | ".join(_diff_cell(paired(ded[s], joint, s)) for s in ("rgb", "depth")) + " |")
    frozen = {v: variant(v, "adapt", layer_decay=study["near_frozen"]) for v in ("mim", "m2im")}
    L += ["", f"## Fine-tuning's share: a near-frozen encoder (--layer_decay {study['near_frozen']:g}, adapt regime)",
          "", "| variant | " + " | ".join(label[s] for s in settings) + " |", "|---|---|---|---|"]
    for v, runs in frozen.items():
        L.append(f"| {VARIANTS[v][1]} | " + " | ".join(_miou_cell(runs, s) for s in settings) + " |")
    ds = [paired(frozen["m2im"], frozen["mim"], s) for s in settings]
    panels["frozen"]["M²IM − MIM"] = [ci95(d) for d in ds]
    L.append("| M²IM − MIM (paired) | " + " | ".join(_diff_cell(d) for d in ds) + " |")
    L += ["", "## Integrated learning rate (Σ lr / peak lr: steps at the peak lr)", "",
          "Under both schedules, from the schedule and the objectives' declared steps; the runs' counted sums "
          "(BudgetCounter) beside them for the step schedule they used.", "",
          "| variant | batch schedule: all steps | its Algorithm-1 steps | step schedule: all steps | its Algorithm-1 steps "
          "| counted in the runs: all | Algorithm-1 | Algorithm-1 steps |", "|---|---|---|---|---|---|---|---|"]
    for v, t in study["integrated_lr"].items():
        counted = [r["pretrain"] for r in variant(v, "scratch").values() if r["pretrain"]]
        c = counted[0] if counted else {}
        L.append(f"| {v} | {t['batches']['lr']:.1f} | {t['batches']['missing_lr']:.1f} | {t['steps']['lr']:.1f} | "
                 f"{t['steps']['missing_lr']:.1f} | {c.get('integrated_lr', math.nan) / study['scratch_lr']:.1f} | "
                 f"{c.get('missing_modality_lr', math.nan) / study['scratch_lr']:.1f} | "
                 f"{c.get('missing_modality_steps', '—')} |")
    L += ["", "## Every run (test mIoU rgb+depth / rgb only / depth only; validation the same)", "",
          "| regime | variant | lr | inputs | layer decay | seed | test | validation |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(R, key=lambda r: (r["regime"], r["variant"], r["lr"], r["inputs"], r["layer_decay"], r["seed"])):
        cell = lambda d: " / ".join(f"{d[s]['miou']:.2f}" if s in d else "—" for s in ("rgbd", "rgb", "depth"))
        lr = "—" if r["variant"] == "baseline" else f"{r['lr'] or study['scratch_lr']:g}"   # 0: train.py's default
        L.append(f"| {r['regime']} | {r['variant']} | {lr} | {r['inputs']} | {r['layer_decay'] or '—'} | "
                 f"{r['seed']} | {cell(r['clean'])} | {cell(r['val'])} |")
    meta = study["meta"]
    own = run_seconds(R)
    L += ["", f"{meta['runs']} runs; their own time summed: {own / 60:.0f} min of one thread each "
          f"({meta['machine']}); the last invocation's wall time {meta['wall_minutes']:.1f} min (finished runs "
          f"are reused, not rerun).", ""]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    charts.dot_chart({"adapting the foundation": panels["adapt"], "from scratch": panels["scratch"],
                      "near-frozen fine-tuning": panels["frozen"]}, [label[s] for s in settings], png)


# -----------------------------------------------------------------------------
# The schedule study (results/schedule/PROTOCOL.md)

# (name, [(sign, arm), ...]) per group of the protocol; an arm is a VARIANTS key.
SCHEDULE_CONTRASTS = {
    "A: the schedule's 2 x 2, no token loss": [
        ("dilution: mix25 − M²IM", [(1, "mix25"), (-1, "m2im")]),
        ("repetition: M²IM x4 − M²IM", [(1, "m2im_x4"), (-1, "m2im")]),
        ("both: tw0 − M²IM", [(1, "tw0"), (-1, "m2im")]),
        ("interaction: tw0 − mix25 − M²IM x4 + M²IM", [(1, "tw0"), (-1, "mix25"), (-1, "m2im_x4"), (1, "m2im")])],
    "B: the token target undiluted, unrepeated": [
        ("frozen foundation: KD − M²IM", [(1, "kd_foundation"), (-1, "m2im")]),
        ("fresh target: own complete forward − M²IM", [(1, "self_fresh"), (-1, "m2im")]),
        ("token in STTP: MaskMentor − tw0", [(1, "maskmentor"), (-1, "tw0")]),
        ("MaskMentor: MaskMentor − M²IM", [(1, "maskmentor"), (-1, "m2im")])],
    "C: the label shortcut": [
        ("with label maps: M²IM − MIM", [(1, "m2im"), (-1, "mim")]),
        ("without: M²IM − MIM (rgb, depth)", [(1, "m2im_rgbd"), (-1, "mim_rgbd")]),
        ("with − without", [(1, "m2im"), (-1, "mim"), (-1, "m2im_rgbd"), (1, "mim_rgbd")])],
    "D: the dose (1 teacher step)": [
        ("token loss: MaskMentor − tw0, 1 teacher step", [(1, "maskmentor_ti1"), (-1, "tw0_ti1")]),
        ("1 in 2: tw0 1 teacher step − M²IM", [(1, "tw0_ti1"), (-1, "m2im")]),
        ("dose: tw0 1 teacher step − tw0 3", [(1, "tw0_ti1"), (-1, "tw0")])],
}
SCHEDULE_ARMS = ("mim", "m2im", "maskmentor", "tw0", "m2im_x4", "mix25", "kd_foundation", "self_fresh",
                 "mim_rgbd", "m2im_rgbd", "maskmentor_ti1", "tw0_ti1")
CUE_GROUPS = ("either", "rgb", "depth", "both")       # rooms.SYNTHETIC_CUE: what a class needs


def group_iou(run: dict, setting: str, group: str) -> float:
    """A run's mean test IoU over the classes that need `group` (rooms.SYNTHETIC_CUE)."""
    ious = run["clean"][setting]["per_class_iou"]
    vals = [ious[i] for i, c in enumerate(rooms.SYNTHETIC_CLASSES)
            if rooms.SYNTHETIC_CUE[c] == group and not math.isnan(ious[i])]
    return statistics.fmean(vals) if vals else math.nan


def schedule_verdicts(arm) -> list:
    """results/schedule/PROTOCOL.md's decision rules applied to the contrasts (rgb only unless
    a rule says otherwise), one line each; `arm(variant)` gives {seed: run}. An arm that was
    not run is said to be missing, never judged."""
    d = lambda *terms, s="rgb": contrast([(sign, arm(v)) for sign, v in terms], s)
    have = lambda *vs: all(arm(v) for v in vs)
    ci = lambda x: f"{x['mean']:+.2f} (95 % CI ±{x['ci95']:.2f}, n={len(x['diffs'])})"
    effect = lambda x: ("helps" if x["mean"] > 0 else "harms") if x["clear"] else "no effect detectable at this n"
    L = []
    if have("tw0", "mix25", "m2im_x4", "m2im"):
        both = d((1, "tw0"), (-1, "m2im"))
        for name, v in (("Dilution", "mix25"), ("Repetition", "m2im_x4")):
            x = d((1, v), (-1, "m2im"))
            explains = x["clear"] and both["mean"] < 0 and x["mean"] <= both["mean"] / 2
            L.append(f"- **{name}** ({v} − M²IM) {ci(x)}: {'explains' if explains else 'does not explain'} "
                     f"the deficit of STTP without its token loss, tw0 − M²IM {ci(both)} (explains: clear, negative "
                     f"and at least half of it).")
        inter = d((1, "tw0"), (-1, "mix25"), (-1, "m2im_x4"), (1, "m2im"))
        L.append(f"- The two **{'do not add up' if inter['clear'] else 'add up'}**: interaction {ci(inter)}.")
    for name, v, base in (("from the frozen foundation (KD)", "kd_foundation", "m2im"),
                          ("from the same network's complete forward", "self_fresh", "m2im"),
                          ("from an EMA teacher", "ema", "m2im"),
                          ("in STTP, diluted and repeated (MaskMentor − tw0)", "maskmentor", "tw0"),
                          ("at one teacher step (MaskMentor − tw0, 1 teacher step)", "maskmentor_ti1", "tw0_ti1")):
        x = d((1, v), (-1, base)) if have(v, base) else None
        L.append(f"- The token target {name}: " + (f"**{effect(x)}**, {ci(x)}." if x else "not run."))
    if have("m2im", "mim", "m2im_rgbd", "mim_rgbd"):
        w, wo = d((1, "m2im"), (-1, "mim")), d((1, "m2im_rgbd"), (-1, "mim_rgbd"))
        dd = d((1, "m2im"), (-1, "mim"), (-1, "m2im_rgbd"), (1, "mim_rgbd"))
        survives = wo["clear"] and wo["mean"] > 0
        L.append(f"- M²IM's gain **{'survives' if survives else 'does not survive'} without label maps**: M²IM − MIM "
                 f"{ci(wo)} without them, {ci(w)} with them; the share that survives {wo['mean'] / w['mean']:.0%}; "
                 f"with − without {ci(dd)}.")
    if have("tw0_ti1", "tw0", "m2im"):
        L.append(f"- The dose: tw0 at one teacher step − M²IM {ci(d((1, 'tw0_ti1'), (-1, 'm2im')))} against "
                 f"{ci(d((1, 'tw0'), (-1, 'm2im')))} at three.")
    flagged = []
    for v in (v for v in VARIANTS if has_token_loss(v) and have(v, "m2im")):
        x = {s: d((1, v), (-1, "m2im"), s=s) for s in ("rgb", "depth", "rgbd")}
        if x["rgb"]["clear"] and x["rgb"]["mean"] > 0 and not any(x[s]["clear"] and x[s]["mean"] < 0
                                                                   for s in ("depth", "rgbd")):
            flagged.append(v)
    L.append("- A flag: " + (", ".join(VARIANTS[v][1] for v in flagged) + " is clearly above M²IM on rgb only and "
             "not clearly below it elsewhere: a train.py flag" if flagged else
             "none; no arm with a token loss is clearly above M²IM on rgb only without being clearly below it on "
             "depth only or rgb + depth."))
    return L


def write_schedule(study: dict, path: str, png: str) -> None:
    """results/schedule/schedule.md and schedule.png: the lr pilot and its choice, the arms,
    every contrast of the protocol paired by seed, the decomposition, the label shortcut by
    class group, the diagnostics and budgets, every run."""
    R, cfg, lr = study["runs"], study["config"], study["chosen_lr"]
    arm = lambda v, lr=lr: runs_of(R, variant=v, regime="adapt", lr=lr)
    settings = ("rgb", "depth", "rgbd")
    L = ["# Why STTP does not help here (`python studies/reproduce.py --study schedule`)", "",
         f"Protocol, written before the first run: [PROTOCOL.md](PROTOCOL.md). The adapt regime of "
         f"[results/regime](../regime/regime.md): each seed's foundation (MIM on {cfg['foundation_images']} pool "
         f"scenes, batch {cfg['foundation_batch']}, {cfg['foundation_epochs']} epochs) adapted on "
         f"{cfg['pretrain_images']} training images, batch {cfg['batch_size']}, {cfg['warmup_epochs']} MIM warm-up "
         f"epoch(s) + {cfg['main_epochs']} STTP-sized epochs for every arm (the same counted optimiser steps), the lr "
         f"indexed by optimiser steps; fine-tuning {cfg['finetune_images']} images, {cfg['finetune_epochs']} epochs; "
         f"test = the first {cfg['test_images']} test images, validation = the first {cfg['val_images']} val "
         f"images. Differences are paired by seed: mean ± sd over seeds; **clear** = the 95 % confidence interval "
         f"of the mean (Student t, n − 1 degrees of freedom) excludes 0. Primary readout: rgb only.", "",
         "## What the protocol's rules say", "", *schedule_verdicts(arm), "",
         "## Step 0: the pre-training lr, chosen on validation (seeds 0 and 1)", "",
         "| lr | mim: val mIoU (mean of the 3 conditions) | m2im | score |", "|---|---|---|---|"]
    for k, sc in study.get("regime_pilot", {}).items():
        L.append(f"| {k} (the regime study's, quoted) | | | {sc:.2f} |")
    scores = pilot_scores([r for r in R if r["seed"] < 2], study["pilot_lrs"])
    for p in study["pilot_lrs"]:
        cells = [_pm(mean_std([regime_score(r) for s, r in arm(v, p).items() if s < 2])) for v in ("mim", "m2im")]
        L.append(f"| {p:g}{' (chosen)' if p == lr else ''} | {cells[0]} | {cells[1]} | {scores[p]:.2f} |")
    L += ["", "## The arms", "", "Test mIoU, mean ± sd over seeds; the held-out reconstruction of depth from rgb "
          "only (L1 on standardised depth, 256 test images); the token loss of the arms that have one against "
          "the matched and a wrong image's target (raw cosine), and its gradient's share of the pixel loss's on "
          "the encoder; the counted Algorithm-1 steps and all optimiser steps of each run.", "",
          "| arm | " + " | ".join(CONDITION_NAMES[s] for s in settings) +
          " | depth from rgb L1 | token: matched / other image | token grad share | Algorithm-1 steps |",
          "|---|---|---|---|---|---|---|---|"]
    for v in SCHEDULE_ARMS:
        runs = arm(v)
        if not runs:
            continue
        diag = [r["diagnostics"]["pretrain"] for r in runs.values() if r["diagnostics"]["pretrain"]]
        recon = _pm3(mean_std([d["reconstruction"]["rgb only"]["depth"] for d in diag])) if diag else "—"
        tok = grad = "—"
        if diag and has_token_loss(v):
            tok = f"{statistics.fmean(d['tokens']['raw_matched'] for d in diag):.3f} / " \
                  f"{statistics.fmean(d['tokens']['raw_other_image'] for d in diag):.3f}"
            grad = f"{statistics.fmean(d['tokens']['grad_share'] for d in diag):.2f}"
        miss = sorted({r["pretrain"]["missing_modality_steps"] for r in runs.values()})
        steps = sorted({r["pretrain"]["optimizer_steps"] for r in runs.values()})
        L.append(f"| {VARIANTS[v][1]} | " + " | ".join(_miou_cell(runs, s) for s in settings) +
                 f" | {recon} | {tok} | {grad} | {', '.join(map(str, miss))} (steps: {', '.join(map(str, steps))}) |")
    panels = {}
    ci95 = lambda d: (d["mean"], d["ci95"]) if len(d["diffs"]) > 1 else None
    for group, rows in SCHEDULE_CONTRASTS.items():
        L += ["", f"## {group}", "", "| paired difference | " + " | ".join(CONDITION_NAMES[s] for s in settings) +
              " | n |", "|---|---|---|---|---|"]
        panels[group.split(":")[0]] = {}
        for name, terms in rows:
            ds = [contrast([(sign, arm(v)) for sign, v in terms], s) for s in settings]
            panels[group.split(":")[0]][name.split(":")[0]] = [ci95(d) for d in ds]
            L.append(f"| {name} | " + " | ".join(_diff_cell(d) for d in ds) + f" | {len(ds[0]['diffs'])} |")
    # The decomposition, per seed (rgb only)
    L += ["", "## The decomposition, per seed (rgb only)", "",
          "| seed | tw0 − M²IM | mix25 − M²IM | M²IM x4 − M²IM | their sum |", "|---|---|---|---|---|"]
    parts = {k: contrast(t, "rgb") for k, t in (("both", [(1, arm("tw0")), (-1, arm("m2im"))]),
                                                 ("dilution", [(1, arm("mix25")), (-1, arm("m2im"))]),
                                                 ("repetition", [(1, arm("m2im_x4")), (-1, arm("m2im"))]))}
    common = sorted(set(parts["both"]["seeds"]) & set(parts["dilution"]["seeds"]) & set(parts["repetition"]["seeds"]))
    for s in common:
        x = {k: p["diffs"][p["seeds"].index(s)] for k, p in parts.items()}
        L.append(f"| {s} | {x['both']:+.2f} | {x['dilution']:+.2f} | {x['repetition']:+.2f} | "
                 f"{x['dilution'] + x['repetition']:+.2f} |")
    # The label shortcut by class group
    L += ["", "## M²IM − MIM by the cue a class needs (test IoU, rgb only and depth only)", "",
          "Classes grouped by rooms.SYNTHETIC_CUE (either: floor, wall, ceiling; rgb: rug, poster; depth: pillar, "
          "ball; both: disc, box, table); per seed the mean IoU over the group's classes.", "",
          "| group | input | with label maps | without | with − without |", "|---|---|---|---|---|"]
    for g in CUE_GROUPS:
        for s in ("rgb", "depth"):
            val = lambda run, st, g=g: group_iou(run, st, g)
            w = contrast([(1, arm("m2im")), (-1, arm("mim"))], s, val)
            wo = contrast([(1, arm("m2im_rgbd")), (-1, arm("mim_rgbd"))], s, val)
            dd = contrast([(1, arm("m2im")), (-1, arm("mim")), (-1, arm("m2im_rgbd")), (1, arm("mim_rgbd"))], s, val)
            L.append(f"| {g} | {CONDITION_NAMES[s]} | {_diff_cell(w)} | {_diff_cell(wo)} | {_diff_cell(dd)} |")
    L += ["", "## The foundations: their MIM loss", "",
          "| seed | pixel loss, first → last epoch | last epoch's drop |", "|---|---|---|"]
    for s, f in enumerate(study["foundation"]):
        L.append(f"| {s} | {f['first']:.3f} → {f['last']:.3f} | {100 * f['last_epoch_drop']:.1f} % |")
    L += ["", "## Every run (test mIoU rgb+depth / rgb only / depth only; validation the same; counted budget)", "",
          "| arm | lr | seed | test | validation | steps | images | Σ lr | Algorithm-1 steps | Σ lr on them |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(R, key=lambda r: (r["variant"], r["lr"], r["seed"])):
        cell = lambda d: " / ".join(f"{d[s]['miou']:.2f}" if s in d else "—" for s in ("rgbd", "rgb", "depth"))
        b = r["pretrain"] or {}
        L.append(f"| {r['variant']} | {r['lr']:g} | {r['seed']} | {cell(r['clean'])} | {cell(r['val'])} | "
                 f"{b.get('optimizer_steps', '—')} | {b.get('images', '—')} | {b.get('integrated_lr', math.nan):.3f} | "
                 f"{b.get('missing_modality_steps', '—')} | {b.get('missing_modality_lr', math.nan):.3f} |")
    meta = study["meta"]
    L += ["", f"{meta['runs']} runs of the study; their own time summed: {meta['run_minutes']:.0f} min of one "
          f"thread each ({meta['machine']}); this invocation's wall time {meta['wall_minutes']:.1f} min (finished "
          f"runs are reused, not rerun).", ""]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    charts.dot_chart(panels, [CONDITION_NAMES[s] for s in settings], png)


def _pm3(ms: tuple) -> str:
    return f"{ms[0]:.3f} ± {ms[1]:.3f}"


def has_token_loss(variant: str) -> bool:
    mode = VARIANTS[variant][0]
    return mode is not None and sttp.OBJECTIVES[mode].token_loss
