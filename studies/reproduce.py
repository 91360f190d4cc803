"""studies/reproduce.py — the paper's ablations (Tables 3 and 4) at toy scale, with seeds, equal
budgets, the cost of each pre-training, and a robustness table the paper does not have.

    python studies/reproduce.py             # 6 variants x 3 seeds on the synthetic rooms (~43 min on 2 cores)
    python studies/reproduce.py --quick     # a miniature of everything (~2 min): checks the machinery, not the ordering

The paper's claim is an ordering (docs/method.md §8): on missing-modality input M²IM beats plain
multi-modal MIM, and STTP's self-teaching beats both, while costing less than a separately
trained teacher. For every seed, each variant below is pre-trained (train.py), fine-tuned
(finetune.py) and evaluated on rgb+depth, rgb only and depth only (evaluate.py), in-process,
with the same data, seeds and budgets:

    variant      pre-training (after the same MIM warm-up)          the paper's row
    baseline     none                                               Table 3 "baseline"
    mim          plain MIM on complete modalities throughout        Table 3 "+ MIM"
    m2im         M²IM (Algorithm 1, then patch masking)             Table 3 "+ M²IM", Table 4 "Pixel-level MIM"
    maskmentor   STTP: 3 teacher + 1 student step per batch         Table 3 "+ M²IM + STTP", Table 4 "MaskMentor"
    token        STTP with a token-loss-only student                Table 4 "Token-level MIM"
    kd           M²IM + the token loss to a separate, frozen        Table 4 "KD + M²IM"
                 teacher: the `mim` model of the same seed
    maskmentor_epochs  (not in the default run) STTP given M²IM's epochs, i.e. 4x the steps:
                 the budget of a comparison at equal epochs

Equal budgets. STTP makes 4 optimiser steps per batch (§3.4), the others one, so the
pixel-only variants get 4x as many epochs after the warm-up: every pre-training makes the
same number of optimiser steps, each on one batch of the same size, i.e. sees the same
number of images (counted, not assumed: see BudgetCounter), drawn from the same images in
the same per-epoch orders. Fine-tuning and evaluation are identical for all variants.
`kd` additionally needs its teacher's pre-training; the cost section says what that costs.
Note what equal steps mean for STTP: its 3 teacher steps reuse the batch they were drawn
for, so in the STTP phase it sees a quarter of the distinct batches M²IM sees.

Diagnostics (ablation.md's last sections): per-class IoU from each modality alone, the loss
logs, the token signal and the reconstruction of a missing modality on held-out images —
the checks to make before believing, or tuning, the tables.

This file runs experiments: it builds each run's flags, runs and counts them, and hands the
results on. What a run is measured with (the input conditions and degradations, the
diagnostics, the cue probe) is studies/diagnostics.py; the tables and charts are written by
studies/report.py (drawn by util/charts.py); the cost table's timing is bench.median_times.

Outputs in --out_dir (default results/): ablation.md (tables laid out like the paper's, its
NYU numbers beside ours, the diagnostics), ablation.json (everything, per seed), ablation.png (grouped bars
with ± 1 std). Every run keeps its checkpoints and logs under --work_dir; a finished run is
reused (if made with the same settings: else one line says so) and an interrupted one resumes
from its checkpoint (bit for bit), so re-running the command after a crash or Ctrl-C picks
up where it stopped.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import json
import multiprocessing
import os
import time
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from tqdm import tqdm

import data
import evaluate
import finetune
import masking
import model as M
import sttp
import train
from studies import bench, diagnostics, report
from util import rooms
from util.checkpoints import load_checkpoint
from util.cli import UserError, arg, check_numbers, parse_config, run_cli
from util import runs
from util.runs import Subset
from util.runtime import Runtime
from studies.report import (DEFAULT_VARIANTS, has_token_loss, REFERENCE_MODE, ROBUST_VARIANTS, VARIANT_FLAGS, VARIANTS,
                    ordering_checks, steps_per_batch, summarise, summarise_diagnostics, teacher_variant,
                    variant_epochs, write_markdown)

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class ReproConfig:
    """The paper's ablations at toy scale: variants x seeds, pre-trained, fine-tuned and evaluated."""
    seeds: int = arg(3, "seeds 0..N-1; tables show mean ± std over them (--study regime: 5)")
    variants: str = arg(",".join(DEFAULT_VARIANTS), "comma-separated variants to run (kd needs mim; also: "
                        "maskmentor_epochs, MaskMentor at M²IM's epochs = 4x the steps)")
    quick: bool = arg(False, "a miniature of everything for CI: checks the machinery, not the ordering")
    pretrain_images: int = arg(1500, "pre-training images (the first N of the synthetic training split)")
    finetune_images: int = arg(500, "labelled fine-tuning images (the first N of the training split)")
    test_images: int = arg(500, "test images (the first N of the synthetic test split)")
    val_images: int = arg(500, "validation images (the first N of the synthetic val split): choices are made on them")
    # 8, not train.py's 32: at this scale training is short of optimiser steps, not of images
    # (results/what_we_tried.md); on the CI CPU a step of 8 costs 0.37x one of 32.
    batch_size: int = arg(8, "images per batch, pre-training and fine-tuning")
    warmup_epochs: int = arg(1, "MIM warm-up epochs on complete modalities, every pre-trained variant")
    main_epochs: int = arg(2, "epochs of STTP after the warm-up (pixel-only variants: 4x as many)")
    finetune_epochs: int = arg(10, "fine-tuning epochs")
    token_target: str = arg("last_teacher_step", "the token-loss variants' target (train.py --token_target)",
                            tuple(sttp.TOKEN_TARGETS))
    token_positions: str = arg("all", "their token-loss positions (train.py --token_positions)",
                               tuple(sttp.TOKEN_POSITIONS))
    token_norm: str = arg("standardize", "their token normalisation (train.py --token_norm)",
                          tuple(sttp.TOKEN_NORMS))
    cues: float = arg(0.0, "the synthetic rooms' cue level for every run (util/rooms.py; 0 = the rooms without cues)")
    study: str = arg("", "instead of the ablation: 'token', the one-factor study of the token target, positions "
                     "and normalisation (results/token_study/); 'cues', MIM, M²IM and MaskMentor at cue levels "
                     "0, 0.5 and 1 (results/cues/); 'regime', from scratch against adapting a foundation, "
                     "dedicated against joint models (results/regime/); 'schedule', why STTP does not help: its "
                     "dilution, its repetition, its token target, and M²IM's label shortcut (results/schedule/)",
                     ("", "token", "cues", "regime", "schedule"))
    foundation_images: int = arg(8000, "--study regime: pool images the foundation is pre-trained on")
    foundation_epochs: int = arg(8, "--study regime: the foundation's epochs of MIM")
    foundation_batch: int = arg(16, "--study regime: the foundation's batch size")
    jobs: int = arg(2, "runs in parallel (processes of --threads threads each)")
    threads: int = arg(1, "torch threads per run")
    work_dir: str = arg("out/reproduce", "checkpoints and logs of every run (finished runs are reused)")
    out_dir: str = arg("results", "where ablation.md, ablation.json and ablation.png go (a study's: results/<study>/)")


QUICK = dict(seeds=2, pretrain_images=64, finetune_images=64, test_images=32, val_images=32, batch_size=16,
             warmup_epochs=1, main_epochs=1, finetune_epochs=2, work_dir="out/reproduce-quick",
             out_dir="out/reproduce-quick/results", foundation_images=64, foundation_epochs=1)
# Where each study writes, unless --out_dir says otherwise; the regime study's key contrasts
# want 5 seeds (results/regime/PROTOCOL.md).
STUDY_DEFAULTS = {"token": dict(out_dir="results/token_study"), "cues": dict(out_dir="results/cues"),
                  "regime": dict(out_dir="results/regime", seeds=5), "schedule": dict(out_dir="results/schedule", seeds=5)}


def parse(argv=None) -> ReproConfig:
    cfg, given = parse_config(ReproConfig, argv)
    for defaults in (STUDY_DEFAULTS.get(cfg.study, {}), QUICK if cfg.quick else {}):
        # the study's, then the miniature's defaults; flags given explicitly still win
        cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if k not in given})
    names = [v for v in cfg.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UserError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    for v in names:
        teacher = teacher_variant(v)
        if teacher and teacher not in names:
            raise UserError(f"--variants: {v}'s teacher is the {teacher} run, so {v} needs {teacher} too")
    for name in ("seeds", "pretrain_images", "finetune_images", "test_images", "val_images", "batch_size",
                 "main_epochs", "finetune_epochs", "jobs", "threads", "foundation_images", "foundation_epochs",
                 "foundation_batch"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.warmup_epochs < 0:
        raise UserError(f"--warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    check_numbers(cfg, unit=("cues",))
    if cfg.foundation_images > rooms.SYNTHETIC_LENGTH["pool"]:
        raise UserError(f"--foundation_images {cfg.foundation_images}: the pool has {rooms.SYNTHETIC_LENGTH['pool']}")
    for name in ("pretrain_images", "finetune_images"):
        if getattr(cfg, name) < cfg.batch_size:
            raise UserError(f"--{name} {getattr(cfg, name)} is fewer than --batch_size {cfg.batch_size}")
    return dataclasses.replace(cfg, variants=",".join(names))


TOKEN_FLAGS = ("token_target", "token_positions", "token_norm")
FIRST_READING = sttp.FIRST_READING     # D4-D6 as first read; runs are named relative to it


@dataclass(frozen=True)
class Spec:
    """One configuration to run: a variant and, for the token-loss variants, the token
    target, positions and normalisation (sttp.TOKEN_TARGETS, ...); for the regime study
    (results/regime/) also where pre-training starts, its lr and schedule, and how the
    model is fine-tuned. Its name, e.g. "maskmentor+teacher_complete+hidden" or
    "m2im+adapt+lr0.0003+steps", names the folder of its pre-training (each level name is
    unique; the defaults add nothing, so the ablation's folders stay as they were), and
    `finetune_dir` the folder of its fine-tuning inside it."""
    variant: str
    token: tuple = FIRST_READING
    regime: str = "scratch"       # "adapt": pre-training starts from the seed's foundation (--init)
    lr: float = 0.0               # pre-training --lr (0: train.py's default)
    schedule: str = "batches"     # train.py --lr_schedule
    inputs: str = "any"           # finetune.py --inputs
    layer_decay: float = 0.0      # finetune.py --layer_decay (0: its default)

    def __post_init__(self):
        # A variant without a token loss has no token settings: one Spec per such run, so
        # that kd's teacher, Spec("mim"), is the mim run whatever the token defaults are.
        if not has_token_loss(self.variant):
            object.__setattr__(self, "token", FIRST_READING)
        if VARIANTS[self.variant][0] is None:      # no pre-training: no pre-training lr or schedule
            object.__setattr__(self, "lr", 0.0)
            object.__setattr__(self, "schedule", "batches")

    @property
    def name(self) -> str:
        parts = [self.variant]
        if has_token_loss(self.variant) and self.token != FIRST_READING:
            parts += [lv for lv, d in zip(self.token, FIRST_READING) if lv != d]
        parts += [f"lr{self.lr:g}"] if self.lr else []
        parts += [self.schedule] if self.schedule != "batches" else []
        return "+".join(parts + (["adapt"] if self.regime == "adapt" else []))

    @property
    def finetune_dir(self) -> str:
        return "-".join(["finetune"] + ([self.inputs] if self.inputs != "any" else []) +
                        ([f"ld{self.layer_decay:g}"] if self.layer_decay else []))

    def pretraining(self) -> "Spec":
        """The Spec of this one's pre-training run (which several fine-tunings share)."""
        return dataclasses.replace(self, inputs="any", layer_decay=0.0)


def specs(cfg: ReproConfig) -> list:
    """The configurations of the ablation: every --variants with the --token_* levels."""
    token = tuple(getattr(cfg, f) for f in TOKEN_FLAGS)
    return [Spec(v, token) for v in cfg.variants.split(",")]


def run_dir(cfg: ReproConfig, spec: Spec, seed: int) -> str:
    """<work_dir>[/cues<level>]/<configuration>/seed<N>: the rooms without cues keep the
    ablation's folders, so that the cue sweep's level 0 reuses its runs."""
    return os.path.join(cfg.work_dir, *([f"cues{cfg.cues:g}"] if cfg.cues else []), spec.name, f"seed{seed}")


FOUNDATION = Spec("foundation")


def foundation_ckpt(cfg: ReproConfig, seed: int) -> str:
    """The seed's foundation checkpoint: MIM pre-training on the synthetic rooms' pool split
    (the regime study's stand-in for released MultiMAE weights)."""
    return os.path.join(run_dir(cfg, FOUNDATION, seed), "pretrain", "ckpt.pt")


def cue_argv(cfg: ReproConfig) -> list:
    return ["--cues", cfg.cues] if cfg.cues else []


def pretrain_argv(cfg: ReproConfig, spec: Spec, seed: int) -> list:
    mode = VARIANTS[spec.variant][0]
    out = ["--vis_every", 0, "--device", "cpu", "--out_dir", os.path.join(run_dir(cfg, spec, seed), "pretrain")]
    if spec == FOUNDATION:               # MIM throughout, on the pool (results/regime/PROTOCOL.md)
        e = cfg.foundation_epochs
        return [str(a) for a in ["--mode", "mim", "--split", "pool", "--subset", cfg.foundation_images,
                                 "--batch_size", cfg.foundation_batch, "--epochs", e, "--warmup_epochs", e,
                                 "--seed", seed] + out + cue_argv(cfg)]
    argv = ["--mode", mode, "--epochs", variant_epochs(spec.variant, cfg.warmup_epochs, cfg.main_epochs),
            "--warmup_epochs", cfg.warmup_epochs, "--subset", cfg.pretrain_images,
            "--batch_size", cfg.batch_size, "--teacher_iters", sttp.ObjectiveConfig.teacher_iters, "--seed", seed]
    argv += out + cue_argv(cfg) + list(VARIANT_FLAGS.get(spec.variant, ()))
    if spec.regime == "adapt":
        argv += ["--init", foundation_ckpt(cfg, seed)]
    if spec.lr:
        argv += ["--lr", spec.lr]
    if spec.schedule != "batches":
        argv += ["--lr_schedule", spec.schedule]
    if has_token_loss(spec.variant):   # explicit, whatever train.py's defaults are
        argv += [a for f, lv in zip(TOKEN_FLAGS, spec.token) for a in (f"--{f}", lv)]
    if teacher_variant(spec.variant):
        argv += ["--teacher", os.path.join(run_dir(cfg, Spec(teacher_variant(spec.variant)), seed), "pretrain",
                                           "ckpt.pt")]
    return [str(a) for a in argv]


def finetune_argv(cfg: ReproConfig, spec: Spec, seed: int) -> list:
    d = run_dir(cfg, spec, seed)
    if VARIANTS[spec.variant][0] is not None:
        pretrained = os.path.join(d, "pretrain", "ckpt.pt")
    else:                                # no pre-training: a random encoder, or the foundation as it is
        pretrained = foundation_ckpt(cfg, seed) if spec.regime == "adapt" else "none"
    argv = ["--pretrained", pretrained, "--subset", cfg.finetune_images,
            "--epochs", cfg.finetune_epochs, "--batch_size", cfg.batch_size, "--seed", seed,
            "--device", "cpu", "--out_dir", os.path.join(d, spec.finetune_dir)] + cue_argv(cfg)
    argv += ["--inputs", spec.inputs] if spec.inputs != "any" else []
    argv += ["--layer_decay", spec.layer_decay] if spec.layer_decay else []
    return [str(a) for a in argv]


# -----------------------------------------------------------------------------
# Counting the budget


class BudgetCounter:
    """Counts, inside a `with` block, the optimiser steps taken, the images each one learned
    from (the batch rows of the training-mode forward passes with gradient since the
    previous step) and the learning rate each step was taken with, with global hooks, so
    train.py and finetune.py need no change. A frozen teacher (eval mode, no gradient) is
    not counted: it teaches, it doesn't learn. Steps whose forward passes missed a modality
    (a pre-training masking plan that dropped one for some sample: Algorithm 1) are
    "missing-modality steps"; `lr` and `missing_lr` are the integrated learning rate (the
    sum of the base lr, i.e. before layer decay, over the steps) over all steps and over those."""

    def __enter__(self):
        self.steps, self.images, self.per_step, self._pending = 0, 0, set(), 0
        self.missing_steps, self.lr, self.missing_lr, self._missing = 0, 0.0, 0.0, False
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._forward),
                       register_optimizer_step_pre_hook(self._step),
                       # after the step: the lr it used (a schedule may set it in a pre-hook of its own)
                       register_optimizer_step_post_hook(self._stepped)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()

    def _forward(self, module, args):
        if isinstance(module, (M.MaskMentor, M.Segmenter)) and module.training and torch.is_grad_enabled():
            self._pending += next(iter(args[0].values())).shape[0]
            if isinstance(module, M.MaskMentor) and len(args) > 1 and not bool(args[1].keep.all()):
                self._missing = True

    def _step(self, optimizer, args, kwargs):
        self.steps += 1
        self.images += self._pending
        self.per_step.add(self._pending)
        self._pending = 0

    def _stepped(self, optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        lr = group["lr"] / group.get("lr_scale", 1.0)
        self.lr += lr
        if self._missing:
            self.missing_steps += 1
            self.missing_lr += lr
        self._missing = False

    def summary(self) -> dict:
        return {"steps": self.steps, "images": self.images, "images_per_step": sorted(self.per_step),
                "missing_modality_steps": self.missing_steps, "integrated_lr": self.lr,
                "missing_modality_lr": self.missing_lr}


# -----------------------------------------------------------------------------
# One run: pre-train (not for the baseline), fine-tune, evaluate. Runs in a worker process.


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    rooms.render_cache = {}          # every run of this worker reads the same scenes


@contextlib.contextmanager
def _logged(path: str):
    """Send a sub-run's prints (and its disabled progress bars) to its own log file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def _write_json(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _stage(out_dir: str, main, argv: list) -> dict:
    """Run train.main or finetune.main once into out_dir (resuming its checkpoint if an
    earlier attempt was interrupted) and record its budget; a finished stage is reused."""
    done = os.path.join(out_dir, "budget.json")
    if os.path.isfile(done):
        info = json.load(open(done))
        if info.get("argv") != argv:     # reusing it would silently mix two experiments
            raise UserError(f"{out_dir}: finished earlier with other settings; give another --work_dir "
                                 f"or delete that folder")
        return info
    resume = os.path.isfile(os.path.join(out_dir, "ckpt.pt"))
    if runs.stale_lock(out_dir):          # this study's own run, killed: its folder is free again
        os.remove(os.path.join(out_dir, runs.LOCK))
    t0 = time.time()
    with _logged(os.path.join(out_dir, "output.txt")), BudgetCounter() as count:
        main(argv + (["--resume"] if resume else []))
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), resume=True)
    steps = int(next(iter(ckpt["optimizer"]["state"].values()))["step"])   # AdamW's own count, resumes included
    info = {**count.summary(), "optimizer_steps": steps, "seconds": time.time() - t0, "resumed": resume, "argv": argv}
    _write_json(info, done)
    return info


def run_variant(cfg: ReproConfig, spec: Spec, seed: int, stage: str) -> dict:
    """stage "pretrain": train.py for this configuration and seed. stage "finetune":
    finetune.py, then evaluation on validation and test; writes and returns the run's result.json."""
    d = run_dir(cfg, spec, seed)
    pretrained = VARIANTS[spec.variant][0] is not None
    ft_dir = os.path.join(d, spec.finetune_dir)
    if stage == "pretrain":
        pre_dir = os.path.join(d, "pretrain")
        info = _stage(pre_dir, train.main, pretrain_argv(cfg, spec, seed))
        diag_path = os.path.join(pre_dir, "diagnostics.json")
        if not os.path.isfile(diag_path):
            _write_json(diagnostics.pretrain_diagnostics(pre_dir), diag_path)
        return info
    result_path = os.path.join(d, f"result{spec.finetune_dir[len('finetune'):]}.json")
    if os.path.isfile(result_path):
        result = json.load(open(result_path))
        if (result.get("test_images"), result.get("val_images")) == (cfg.test_images, cfg.val_images) \
                and result["finetune"].get("argv") == finetune_argv(cfg, spec, seed):
            return result
        # else: evaluated with other settings; _stage below says so if the fine-tuning differs
    pre = json.load(open(os.path.join(d, "pretrain", "budget.json"))) if pretrained else None
    pre_diag = json.load(open(os.path.join(d, "pretrain", "diagnostics.json"))) if pretrained else None
    fine = _stage(ft_dir, finetune.main, finetune_argv(cfg, spec, seed))
    net, _ = evaluate.load_segmenter(os.path.join(ft_dir, "ckpt.pt"), "cpu")
    split = lambda name, n: Subset(data.build_dataset("synthetic", None, name, image_size=net.cfg.image_size,
                                                      cues=cfg.cues), n)
    t0 = time.time()
    val = diagnostics.evaluate_conditions(net, split("val", cfg.val_images), 50, robustness=False)["clean"]
    scores = diagnostics.evaluate_conditions(net, split("test", cfg.test_images), 50,
                                             robustness=spec.variant in ROBUST_VARIANTS and cfg.study != "regime")
    result = {"variant": spec.variant, "name": spec.name, "token": dict(zip(TOKEN_FLAGS, spec.token)), "seed": seed,
              "cues": cfg.cues, **{f: getattr(spec, f) for f in ("regime", "lr", "schedule", "inputs", "layer_decay")},
              "test_images": cfg.test_images, "val_images": cfg.val_images, "pretrain": pre, "finetune": fine,
              "eval_seconds": time.time() - t0, "val": val,
              "diagnostics": {"pretrain": pre_diag,
                              "finetune_log": diagnostics.loss_log(os.path.join(ft_dir, "log.jsonl"),
                                                                   cfg.finetune_images // cfg.batch_size)},
              **scores}
    _write_json(result, result_path)
    return result


def needs(spec: Spec, seed: int, stage: str) -> list:
    """The runs a run waits for: a fine-tuning its pre-training (or, for the adapt regime's
    no-pre-training variant, the foundation it starts from); a pre-training its frozen
    teacher's (kd: the mim run) and, in the adapt regime, the seed's foundation."""
    pretrained = VARIANTS[spec.variant][0] is not None
    if stage == "finetune":
        return [(spec.pretraining(), seed, "pretrain")] if pretrained else \
            [(FOUNDATION, seed, "pretrain")] if spec.regime == "adapt" else []
    teacher = teacher_variant(spec.variant)
    return ([(Spec(teacher), seed, "pretrain")] if teacher else []) + \
        ([(FOUNDATION, seed, "pretrain")] if spec.regime == "adapt" else [])


def each_seed(cfg: ReproConfig, todo_specs: list, seeds=None) -> list:
    """(spec, seed) for every configuration and seed (0 .. --seeds-1 unless given)."""
    return [(sp, s) for sp in todo_specs for s in (range(cfg.seeds) if seeds is None else seeds)]


def tasks(runs: list) -> list:
    """The (spec, seed, stage) runs that fine-tune each (configuration, seed) of `runs` and
    the runs they wait for (`needs`), each once: pre-trainings before fine-tunings, those
    other pre-trainings wait for (foundations, teachers) first, else in the order given."""
    todo = []

    def add(task):                        # what it waits for first
        if task not in todo:
            for dep in needs(*task):
                add(dep)
            todo.append(task)

    for sp, s in runs:
        add((sp, s, "finetune"))
    first = {dep for task in todo if task[2] == "pretrain" for dep in needs(*task)}    # foundations, teachers
    return sorted(todo, key=lambda t: (t[2] != "pretrain", t not in first))       # stable: else as given


def run_all(cfg: ReproConfig, runs: list) -> list:
    """Every run of tasks(runs) (`runs`: (spec, seed) pairs, e.g. each_seed), `--jobs` at a
    time, each as soon as the runs it needs are done. Returns the fine-tunings' result dicts."""
    todo = tasks(runs)

    results, done, running = [], set(), {}
    ctx = multiprocessing.get_context("spawn")
    bar = tqdm(total=len(todo), desc="runs", dynamic_ncols=True)
    with cf.ProcessPoolExecutor(cfg.jobs, mp_context=ctx, initializer=_init_worker, initargs=(cfg.threads,)) as pool:
        while todo or running:
            for task in [t for t in todo if all(n in done for n in needs(*t))][: cfg.jobs - len(running)]:
                todo.remove(task)
                running[pool.submit(run_variant, cfg, *task)] = task
            if not running:                 # never spin: what is left waits for nothing that runs
                raise RuntimeError(f"no run can start: {[(sp.name, s, stage) for sp, s, stage in todo]}")
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                task = running.pop(fut)
                out = fut.result()          # a failed run stops everything, with its traceback
                done.add(task)
                if task[2] == "finetune":
                    results.append(out)
                bar.set_postfix_str(f"{task[0].name} seed {task[1]} {task[2]}")
                bar.update()
    bar.close()
    return results


# -----------------------------------------------------------------------------
# The cost of each pre-training, measured side by side in this process


def measure_cost(cfg: ReproConfig, repeats: int = 7) -> dict:
    """Seconds per pre-training batch of mim, sttp (3 teacher + 1 student steps) and kd
    (a frozen teacher's forward + 1 student step) on the same batch, interleaved so that
    load changes hit all three alike, after a round of warm-up; medians (bench.median_times).
    From them the whole pre-training's cost under this script's equal-step budgets, kd
    including its teacher's pre-training. With --threads threads, as each run has (more
    threads than free cores make every timing meaningless: OpenMP threads spin while they
    wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _measure_cost(cfg, repeats)
    finally:
        torch.set_num_threads(threads)


def _measure_cost(cfg: ReproConfig, repeats: int) -> dict:
    torch.manual_seed(0)
    model_cfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=data.num_classes("synthetic"))
    net, teacher = M.MaskMentor(model_cfg), M.MaskMentor(model_cfg).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    ds = data.build_dataset("synthetic", None, "train", train=True, image_size=model_cfg.image_size)
    batch = data.collate([ds[i] for i in range(cfg.batch_size)])
    ocfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=train.TRAIN_PRESETS["tiny"]["budget"]))
    g = torch.Generator().manual_seed(0)
    # "sttp <target>": STTP with that --token_target (the default, last_teacher_step, is "sttp")
    runs = {"mim": ocfg, "sttp": ocfg, "kd": ocfg,
            **{f"sttp {t}": dataclasses.replace(ocfg, token_target=t) for t in list(sttp.TOKEN_TARGETS)[1:]}}
    rt = Runtime(torch.device("cpu"))
    one_batch = lambda name: lambda: rt.run_objective(sttp.OBJECTIVES[name.split()[0]], net, opt, batch, runs[name],
                                                      g, teacher)
    times = bench.median_times([one_batch(m) for m in runs], torch.device("cpu"), repeats, warmup=1)
    per_batch = dict(zip(runs, times))
    batches = cfg.pretrain_images // cfg.batch_size
    W, E = cfg.warmup_epochs * batches, cfg.main_epochs * batches           # warm-up / STTP batches
    S = steps_per_batch(REFERENCE_MODE)
    whole = {"mim": (W + S * E) * per_batch["mim"],
             "maskmentor": W * per_batch["mim"] + E * per_batch["sttp"],
             "kd (teacher + student)": (W + S * E) * per_batch["mim"] + W * per_batch["mim"] + S * E * per_batch["kd"]}
    return {"batch_size": cfg.batch_size, "threads": torch.get_num_threads(), "per_batch_s": per_batch,
            "per_batch_ratio": {m: t / per_batch["mim"] for m, t in per_batch.items()},
            "per_step_ratio": {m: per_batch[m] / steps_per_batch(m.split()[0]) / per_batch["mim"] for m in per_batch},
            "vs_sttp_batch": {m: per_batch[m] / per_batch["sttp"] for m in per_batch if m.startswith("sttp")},
            "whole_pretraining_s": whole, "whole_ratio": {k: v / whole["mim"] for k, v in whole.items()}}


# -----------------------------------------------------------------------------


def count_runs(cfg: ReproConfig, runs: list) -> tuple:
    """(runs, runs already finished) of `tasks`: a run is one pre-training or one fine-tuning
    + evaluation."""
    stages = [os.path.join(run_dir(cfg, sp, seed), "pretrain" if stage == "pretrain" else sp.finetune_dir)
              for sp, seed, stage in tasks(runs)]
    return len(stages), sum(os.path.isfile(os.path.join(d, "budget.json")) for d in stages)


def token_study(cfg: ReproConfig) -> dict:
    """`--study token`: MaskMentor with one factor of its token loss changed at a time from
    the first reading (D4-D6), then with each factor's best level; chosen on the validation
    split by report.select, reported on test (results/token_study/PROTOCOL.md, written
    before the first run)."""
    t0 = time.time()
    base = Spec("maskmentor")
    one_factor = [Spec("maskmentor", FIRST_READING[:i] + (level,) + FIRST_READING[i + 1:])
                  for i, levels in enumerate((sttp.TOKEN_TARGETS, sttp.TOKEN_POSITIONS, sttp.TOKEN_NORMS))
                  for level in levels if level != FIRST_READING[i]]
    print(f"token study: {1 + len(one_factor)} configurations x {cfg.seeds} seed(s), then the combination; "
          f"runs in {cfg.work_dir}, results in {cfg.out_dir}")
    cost = measure_cost(cfg, repeats=2 if cfg.quick else 7)
    results = run_all(cfg, each_seed(cfg, [base] + one_factor))
    per_config = report.study_scores(results)
    costs = {sp.name: cost["per_batch_s"]["sttp" if sp.token[0] == FIRST_READING[0] else f"sttp {sp.token[0]}"]
             for sp in [base] + one_factor}
    best = [report.select([sp.name for sp in [base] + one_factor if sp.token[:i] + sp.token[i + 1:] ==
                           FIRST_READING[:i] + FIRST_READING[i + 1:]], per_config, costs)
            for i in range(3)]
    combo = Spec("maskmentor", tuple(next(sp for sp in [base] + one_factor if sp.name == b).token[i]
                                     for i, b in enumerate(best)))
    configs = [base] + one_factor + ([combo] if combo not in [base] + one_factor else [])
    if combo not in [base] + one_factor:
        results += run_all(cfg, each_seed(cfg, [combo]))
        per_config = report.study_scores(results)
    costs[combo.name] = cost["per_batch_s"]["sttp" if combo.token[0] == FIRST_READING[0] else f"sttp {combo.token[0]}"]
    chosen = report.select([sp.name for sp in configs], per_config, costs)
    meta = {"wall_minutes": (time.time() - t0) / 60, "runs": count_runs(cfg, each_seed(cfg, configs))[0],
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}
    out = {"config": dataclasses.asdict(cfg), "meta": meta, "cost": cost, "costs": costs, "per_config": per_config,
           "factor_best": best, "combination": combo.name, "chosen": chosen,
           "tokens": {sp.name: dict(zip(TOKEN_FLAGS, sp.token)) for sp in configs}, "runs": results}
    os.makedirs(cfg.out_dir, exist_ok=True)
    _write_json(out, os.path.join(cfg.out_dir, "token_study.json"))
    report.write_token_study(out, os.path.join(cfg.out_dir, "token_study.md"))
    print(f"chosen on validation: {chosen}; wrote {cfg.out_dir}/token_study.md in {meta['wall_minutes']:.1f} min")
    return out


CUE_LEVELS = (0.0, 0.5, 1.0)
CUE_VARIANTS = ("mim", "m2im", "maskmentor")


def cue_study(cfg: ReproConfig) -> dict:
    """`--study cues`: MIM, M²IM and MaskMentor (with --token_*) at cue levels 0, 0.5, 1,
    each the ablation's recipe and seeds (results/cues/PROTOCOL.md, written before the first
    run). Level 0 reuses the ablation's runs. First, before anything is trained, how well
    one modality predicts the other in the rooms at each level (diagnostics.cross_modal_predictability)."""
    t0 = time.time()
    token = tuple(getattr(cfg, f) for f in TOKEN_FLAGS)
    todo = [Spec(v, token) for v in CUE_VARIANTS]
    print(f"cue sweep: {', '.join(CUE_VARIANTS)} x cues {', '.join(f'{x:g}' for x in CUE_LEVELS)} x {cfg.seeds} "
          f"seed(s); runs in {cfg.work_dir}, results in {cfg.out_dir}")
    n_images = 40 if cfg.quick else 200
    predictability = {f"{x:g}": diagnostics.cross_modal_predictability(x, n_images=n_images) for x in CUE_LEVELS}
    levels, runs = {}, 0
    for x in CUE_LEVELS:
        c = dataclasses.replace(cfg, cues=x)
        results = run_all(c, each_seed(c, todo))
        runs += count_runs(c, each_seed(c, todo))[0]
        levels[f"{x:g}"] = {"summary": summarise(results),
                            "per_class_iou": summarise_diagnostics(results)["per_class_iou"], "runs": results}
    out = {"config": dataclasses.asdict(cfg), "predictability": predictability, "levels": levels,
           "meta": {"wall_minutes": (time.time() - t0) / 60, "runs": runs,
                    "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}}
    os.makedirs(cfg.out_dir, exist_ok=True)
    _write_json(out, os.path.join(cfg.out_dir, "cues.json"))
    report.write_cues(out, os.path.join(cfg.out_dir, "cues.md"), os.path.join(cfg.out_dir, "cues.png"))
    print(f"wrote {cfg.out_dir}/cues.md, cues.json, cues.png in {out['meta']['wall_minutes']:.1f} min")
    return out


PILOT_LRS = (1e-4, 3e-4, 1e-3)        # the adapt regime's pre-training lr, chosen on validation
NEAR_FROZEN = 0.001                   # finetune.py --layer_decay of "fine-tuning's share"
REGIME_VARIANTS = ("mim", "m2im", "maskmentor", "tw0")


def regime_study(cfg: ReproConfig) -> dict:
    """`--study regime` (results/regime/PROTOCOL.md, written before the first run): from
    scratch against adapting the seed's foundation, every pre-training on the lr schedule
    indexed by optimiser steps. First the one choice, the adapt regime's lr, on validation
    (mim and m2im, the first two seeds), with every foundation and the foundations fine-tuned
    directly; then the rows: the paper's regime, the headroom (dedicated against joint models),
    fine-tuning's share (a near-frozen encoder) and today's regime."""
    t0 = time.time()
    token = tuple(getattr(cfg, f) for f in TOKEN_FLAGS)
    key, secondary, pilot_seeds = range(cfg.seeds), range(min(3, cfg.seeds)), range(min(2, cfg.seeds))
    adapt = lambda v, lr, **kw: Spec(v, token, regime="adapt", lr=lr, schedule="steps", **kw)
    scratch = lambda v, **kw: Spec(v, token, schedule="steps", **kw)
    print(f"regime study: {cfg.seeds} seed(s) for the key rows, {len(secondary)} for the others; runs in "
          f"{cfg.work_dir}, results in {cfg.out_dir}")
    pilot = [(adapt(v, lr), s) for lr in PILOT_LRS for v in ("mim", "m2im") for s in pilot_seeds]
    results = run_all(cfg, pilot + [(adapt("baseline", 0.0), s) for s in key])
    lr_a = report.choose_pilot_lr(results, PILOT_LRS)
    print(f"chosen on validation: adapt-regime pre-training lr {lr_a:g}")
    # tw0 gets 3 seeds: the protocol's time rule (seeds of rows 3, 4 and tw0 are cut first),
    # applied because the 2-core machine's session could not hold all 98 runs with 5 for tw0
    rows = [(adapt(v, lr_a), s) for v in REGIME_VARIANTS for s in (secondary if v == "tw0" else key)] + \
        [(adapt("mim", lr_a, inputs=i), s) for i in ("rgb", "depth") for s in key] + \
        [(scratch("mim", inputs=i), s) for i in ("any", "rgb", "depth") for s in key] + \
        [(adapt(v, lr_a, layer_decay=NEAR_FROZEN), s) for v in ("mim", "m2im") for s in secondary] + \
        [(scratch(v), s) for v in ("baseline",) + REGIME_VARIANTS[1:] for s in secondary]
    results += run_all(cfg, [r for r in rows if r not in pilot])
    meta = {"wall_minutes": (time.time() - t0) / 60, "runs": count_runs(cfg, pilot + rows)[0],
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}
    foundation = [diagnostics.loss_log(os.path.join(run_dir(cfg, FOUNDATION, s), "pretrain", "log.jsonl"),
                                       cfg.foundation_images // cfg.foundation_batch) for s in key]
    out = {"config": dataclasses.asdict(cfg), "meta": meta, "pilot_lrs": list(PILOT_LRS), "chosen_lr": lr_a,
           "scratch_lr": train.TRAIN_PRESETS["tiny"]["lr"],
           "near_frozen": NEAR_FROZEN, "foundation": foundation,
           "integrated_lr": report.integrated_lr_table(REGIME_VARIANTS, cfg.warmup_epochs, cfg.main_epochs,
                                                         cfg.pretrain_images // cfg.batch_size,
                                                         train.TRAIN_PRESETS["tiny"]["lr_warmup_epochs"]),
           "runs": results}
    os.makedirs(cfg.out_dir, exist_ok=True)
    _write_json(out, os.path.join(cfg.out_dir, "regime.json"))
    report.write_regime(out, os.path.join(cfg.out_dir, "regime.md"), os.path.join(cfg.out_dir, "regime.png"))
    print(f"wrote {cfg.out_dir}/regime.md, regime.json, regime.png in {meta['wall_minutes']:.1f} min")
    return out


SCHEDULE_LRS = (1e-3, 3e-3)              # the regime study's choice and one step above it
SCHEDULE_NEXT_LR = 1e-2                   # tried only if 3e-3 wins (results/schedule/PROTOCOL.md)
# The arms (PROTOCOL.md), in the order their seeds are kept when time runs short: the last
# groups lose seeds first.
SCHEDULE_KEY = ("mim", "m2im", "maskmentor", "tw0")
SCHEDULE_B = ("kd_foundation", "self_fresh")
SCHEDULE_D = ("maskmentor_ti1", "tw0_ti1")
SCHEDULE_A = ("m2im_x4", "mix25")
SCHEDULE_C = ("mim_rgbd", "m2im_rgbd")
FRESH_TARGET = ("teacher_complete", "all", "standardize")     # the B arms' token target


def schedule_specs(cfg: ReproConfig, lr: float) -> list:
    """(spec, seed) of every arm of the schedule study at the pre-training lr `lr`, in the
    order of the protocol's priorities (key arms, B, D, A, C), seeds per arm as it says."""
    token = tuple(getattr(cfg, f) for f in TOKEN_FLAGS)
    spec = lambda v: Spec(v, FRESH_TARGET if v in SCHEDULE_B else token, regime="adapt", lr=lr, schedule="steps")
    few = range(min(3, cfg.seeds))
    return [(spec(v), s) for group, seeds in ((SCHEDULE_KEY, range(cfg.seeds)), (SCHEDULE_B, range(cfg.seeds)),
                                             (SCHEDULE_D, few), (SCHEDULE_A, range(cfg.seeds)),
                                             (SCHEDULE_C, range(cfg.seeds)))
            for v in group for s in seeds]


def regime_pilot(cfg: ReproConfig) -> dict:
    """The regime study's pilot scores of the lrs below SCHEDULE_LRS (quoted, not rerun), from
    its regime.json beside --out_dir; {} when it is not there."""
    path = os.path.join(os.path.dirname(os.path.abspath(cfg.out_dir)), "regime", "regime.json")
    if not os.path.isfile(path):
        return {}
    regime = json.load(open(path))
    lower = [lr for lr in regime["pilot_lrs"] if lr < min(SCHEDULE_LRS)]
    pilot = [r for r in regime["runs"] if r["seed"] < 2]          # the pilot's seeds, as the rule used them
    return {f"{lr:g}": sc for lr, sc in report.pilot_scores(pilot, lower).items()}


def schedule_study(cfg: ReproConfig) -> dict:
    """`--study schedule` (results/schedule/PROTOCOL.md, written before the first run): in the
    regime study's adapt regime, the pre-training lr one step further on validation (mim and
    m2im, seeds 0 and 1), then STTP's schedule taken apart (A: dilution x repetition without
    the token loss), the token target undiluted and unrepeated (B), M²IM without label maps (C)
    and one teacher step (D), paired by seed; written to schedule.md, .json and .png."""
    t0 = time.time()
    adapt = lambda v, lr: Spec(v, tuple(getattr(cfg, f) for f in TOKEN_FLAGS), regime="adapt", lr=lr,
                               schedule="steps")
    pilot_seeds = range(min(2, cfg.seeds))
    lrs = list(SCHEDULE_LRS)
    print(f"schedule study: {cfg.seeds} seed(s) for the key arms; runs in {cfg.work_dir}, results in {cfg.out_dir}")
    results = run_all(cfg, [(adapt(v, lr), s) for lr in lrs for v in ("mim", "m2im") for s in pilot_seeds])
    lr = report.choose_pilot_lr(results, lrs)
    if lr == lrs[-1]:
        lrs.append(SCHEDULE_NEXT_LR)
        results += run_all(cfg, [(adapt(v, SCHEDULE_NEXT_LR), s) for v in ("mim", "m2im") for s in pilot_seeds])
        lr = report.choose_pilot_lr(results, lrs)
    print(f"chosen on validation: pre-training lr {lr:g}")
    rows = schedule_specs(cfg, lr)
    done = {(r["name"], r["seed"]) for r in results}
    results += run_all(cfg, [(sp, s) for sp, s in rows if (sp.name, s) not in done])
    run_seconds = report.run_seconds(results)
    meta = {"wall_minutes": (time.time() - t0) / 60, "run_minutes": run_seconds / 60,
            "runs": count_runs(cfg, rows)[0], "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}
    foundation = [diagnostics.loss_log(os.path.join(run_dir(cfg, FOUNDATION, s), "pretrain", "log.jsonl"),
                                       cfg.foundation_images // cfg.foundation_batch) for s in range(cfg.seeds)]
    out = {"config": dataclasses.asdict(cfg), "meta": meta, "pilot_lrs": lrs, "chosen_lr": lr,
           "regime_pilot": regime_pilot(cfg), "foundation": foundation, "runs": results}
    os.makedirs(cfg.out_dir, exist_ok=True)
    _write_json(out, os.path.join(cfg.out_dir, "schedule.json"))
    report.write_schedule(out, os.path.join(cfg.out_dir, "schedule.md"), os.path.join(cfg.out_dir, "schedule.png"))
    print(f"wrote {cfg.out_dir}/schedule.md, schedule.json, schedule.png in {meta['wall_minutes']:.1f} min")
    return out


def main(argv=None) -> dict:
    cfg = parse(argv)
    if cfg.study == "token":
        return token_study(cfg)
    if cfg.study == "cues":
        return cue_study(cfg)
    if cfg.study == "regime":
        return regime_study(cfg)
    if cfg.study == "schedule":
        return schedule_study(cfg)
    t0 = time.time()
    n_runs, before = count_runs(cfg, each_seed(cfg, specs(cfg)))
    print(f"reproduce: {cfg.variants} x {cfg.seeds} seed(s), {cfg.jobs} job(s) of {cfg.threads} thread(s); "
          f"runs in {cfg.work_dir}, results in {cfg.out_dir}")
    cost = measure_cost(cfg, repeats=2 if cfg.quick else 7)
    print("cost per pre-training batch: " + ", ".join(f"{m} {s:.3f} s ({cost['per_batch_ratio'][m]:.2f}x)"
                                                      for m, s in cost["per_batch_s"].items()))
    results = run_all(cfg, each_seed(cfg, specs(cfg)))
    summary = summarise(results)
    diag = summarise_diagnostics(results)
    run_seconds = report.run_seconds(results)
    meta = {"wall_minutes": (time.time() - t0) / 60, "runs": n_runs, "runs_reused": before,
            "run_minutes": run_seconds / 60,
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}
    os.makedirs(cfg.out_dir, exist_ok=True)
    _write_json({"config": dataclasses.asdict(cfg), "meta": meta, "cost": cost, "summary": summary, "diagnostics": diag,
                 "paper_nyu": {v: VARIANTS[v][2] for v in VARIANTS}, "runs": results},
                os.path.join(cfg.out_dir, "ablation.json"))
    write_markdown(cfg, summary, cost, meta, os.path.join(cfg.out_dir, "ablation.md"), diag)
    report.ablation_chart(summary, os.path.join(cfg.out_dir, "ablation.png"),
                          f"mIoU on synthetic test images, mean ± std over {cfg.seeds} seed(s)")
    print("\n".join(ordering_checks(summary)))
    print(f"wrote {cfg.out_dir}/ablation.md, ablation.json, ablation.png in {meta['wall_minutes']:.1f} min")
    return {"summary": summary, "cost": cost, "meta": meta, "results": results, "diagnostics": diag}


if __name__ == "__main__":
    run_cli(main)
